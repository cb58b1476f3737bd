//! `vmgate delegation ...`: show, configure and check Kerberos delegation between hosts.
//!
//! ```text
//! vmgate delegation show ACCOUNT
//! vmgate delegation find
//! vmgate delegation add-service ACCOUNT SPN...
//! vmgate delegation del-service ACCOUNT SPN...
//! vmgate delegation for-any-protocol ACCOUNT on|off
//! vmgate delegation sensitive ACCOUNT on|off
//! vmgate delegation allow-migration --from S --to D [--any-protocol] [--both-ways]
//! vmgate delegation check --from S --to D [--user U] [--auth kerberos|credssp]
//!                         [--remote | --no-user-ticket | --forward-credentials]
//!                         [--live --keytab FILE [--user-ccache FILE] [--target-keytab FILE]]
//! ```
//!
//! Every command takes `--json` and the directory connection flags of [`crate::conn`].
//!
//! How `check` models the start of the move:
//!
//! | flags | the move is started | S needs |
//! |---|---|---|
//! | (none) | by U on S itself, with U's own ticket | nothing delegated |
//! | `--remote` | by U from elsewhere; U authenticates to S with Kerberos | constrained delegation, "Kerberos only" is enough |
//! | `--no-user-ticket` | without a ticket from U (a queued job, a logon without Kerberos) | constrained delegation with protocol transition |
//! | `--forward-credentials` | by U from elsewhere, forwarding a TGT (CredSSP) | U's TGT may be forwarded |
//!
//! Exit codes ([`crate::exit`]): 0 done / every requirement met (and, with `--live`, the KDC
//! issued every ticket); 1 a requirement is unmet or the KDC refused, or the directory refused
//! a change; 2 usage (bad flag, malformed SPN, missing --keytab); 3 not found (account, host,
//! an SPN to delete that is not listed, a keytab); 4 directory or KDC unreachable; 5 bind
//! refused or insufficient rights.

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use vmgate_auth::Diagnosis;
use vmgate_auth::delegation::configure::{self, AccountChange, MigrationOptions};
use vmgate_auth::delegation::gather::{self, AccountDelegation, CheckRequest, FindRow};
use vmgate_auth::delegation::live::{self, LiveReport, LiveRequest};
use vmgate_auth::delegation::{
    AuthType, DelegationError, DelegationFacts, MIGRATION_SERVICE_CLASS, MoveStart, Uac, Verdict,
    analyze,
};
use vmgate_auth::directory::{Directory, ErrorKind};
use vmgate_auth::spn::Spn;

use crate::conn::{ConnArgs, ConnError};
use crate::exit;
use crate::output;

/// `vmgate delegation` arguments.
#[derive(Debug, Args)]
pub struct DelegationArgs {
    /// The operation.
    #[command(subcommand)]
    pub command: DelegationCommand,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Directory connection.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Set the flag.
    On,
    /// Clear the flag.
    Off,
}

/// The auth type of the source host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthArg {
    /// Kerberos (constrained delegation when the move is started remotely).
    Kerberos,
    /// CredSSP (the user's credentials must be on the source).
    Credssp,
}

/// `vmgate delegation` operations.
#[derive(Debug, Subcommand)]
pub enum DelegationCommand {
    /// Show an account's delegation settings: flags, constrained and resource-based delegation.
    Show {
        /// The account: hv1, HV1$, alice, or a DN.
        account: String,
    },
    /// Every account in the domain with delegation configured (like Impacket's findDelegation).
    Find,
    /// Let ACCOUNT delegate to each SPN (msDS-AllowedToDelegateTo; Samba twins included).
    AddService {
        /// The account.
        account: String,
        /// The SPNs: class/host[:port][/name].
        #[arg(required = true)]
        spns: Vec<String>,
    },
    /// Stop ACCOUNT delegating to each SPN (plain form and Samba twin).
    DelService {
        /// The account.
        account: String,
        /// The SPNs.
        #[arg(required = true)]
        spns: Vec<String>,
    },
    /// "Use any authentication protocol" (TRUSTED_TO_AUTH_FOR_DELEGATION, protocol transition).
    ForAnyProtocol {
        /// The account.
        account: String,
        /// on or off.
        #[arg(value_enum)]
        state: Switch,
    },
    /// "Account is sensitive and cannot be delegated" (NOT_DELEGATED).
    Sensitive {
        /// The account.
        account: String,
        /// on or off.
        #[arg(value_enum)]
        state: Switch,
    },
    /// Let S delegate to what a live migration to D needs: D's migration SPN (FQDN and short)
    /// and cifs/D (FQDN and short).
    AllowMigration {
        /// The source host.
        #[arg(long = "from", value_name = "S")]
        from: String,
        /// The destination host.
        #[arg(long = "to", value_name = "D")]
        to: String,
        /// Also allow protocol transition on S ("use any authentication protocol").
        #[arg(long)]
        any_protocol: bool,
        /// Also let D delegate to S (moves back).
        #[arg(long)]
        both_ways: bool,
        /// The migration service class.
        #[arg(long, default_value = MIGRATION_SERVICE_CLASS)]
        service_class: String,
    },
    /// Every requirement of a live move S→D started as U, met or not, with the fix.
    Check(CheckArgs),
}

/// `vmgate delegation check` arguments.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The source host.
    #[arg(long = "from", value_name = "S")]
    pub from: String,
    /// The destination host.
    #[arg(long = "to", value_name = "D")]
    pub to: String,
    /// The user the move is started as.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The source host's auth type.
    #[arg(long, value_enum, default_value = "kerberos")]
    pub auth: AuthArg,
    /// The move is started from elsewhere; the user authenticates to S with Kerberos.
    #[arg(long)]
    pub remote: bool,
    /// S holds no ticket from the user (a queued job, a logon without Kerberos): protocol
    /// transition. Implies --remote.
    #[arg(long, conflicts_with = "forward_credentials")]
    pub no_user_ticket: bool,
    /// The user forwards a TGT to S (CredSSP). Implies --remote.
    #[arg(long)]
    pub forward_credentials: bool,
    /// The migration service class.
    #[arg(long, default_value = MIGRATION_SERVICE_CLASS)]
    pub service_class: String,
    /// Also ask the KDC for real (S4U2Self / S4U2Proxy with S's keytab) and compare.
    #[arg(long, requires = "keytab")]
    pub live: bool,
    /// S's keytab (for --live).
    #[arg(long, value_name = "FILE")]
    pub keytab: Option<PathBuf>,
    /// The user's credential cache (kinit), for --live when the move starts from the user's
    /// own ticket.
    #[arg(long, value_name = "FILE")]
    pub user_ccache: Option<String>,
    /// D's keytab (for --live): also check that D can decrypt the ticket.
    #[arg(long, value_name = "FILE")]
    pub target_keytab: Option<PathBuf>,
    /// The SPN of S that the user's ticket is for (default HOST/<S's FQDN>).
    #[arg(long, value_name = "SPN")]
    pub source_spn: Option<String>,
}

impl CheckArgs {
    /// How the move starts, from the flags.
    pub fn start(&self) -> MoveStart {
        if self.forward_credentials {
            MoveStart::RemoteForwardingCredentials
        } else if self.no_user_ticket {
            MoveStart::RemoteWithoutTicket
        } else if self.remote {
            MoveStart::RemoteWithTicket
        } else {
            MoveStart::OnSource
        }
    }

    fn auth(&self) -> AuthType {
        match self.auth {
            AuthArg::Kerberos => AuthType::Kerberos,
            AuthArg::Credssp => AuthType::Credssp,
        }
    }
}

/// The outcome of `check`.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The facts the verdict was computed from.
    pub facts: DelegationFacts,
    /// The verdict.
    pub verdict: Verdict,
    /// The live check, if asked for.
    pub live: Option<LiveReport>,
    /// Every requirement met (and every live ticket issued).
    pub ok: bool,
}

/// What a command produced.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// `show`.
    Show(AccountDelegation),
    /// `find`.
    Find(Vec<FindRow>),
    /// The configuration commands.
    Changed(Vec<AccountChange>),
    /// `check`.
    Check(Box<CheckReport>),
}

impl Outcome {
    fn exit_code(&self) -> u8 {
        match self {
            Outcome::Check(r) if !r.ok => exit::REFUSED,
            _ => exit::OK,
        }
    }
}

/// Errors of `vmgate delegation`.
#[derive(Debug, thiserror::Error)]
pub enum DelegationToolError {
    /// Connecting to the directory failed (boxed: connection errors are large).
    #[error(transparent)]
    Conn(Box<ConnError>),
    /// The operation failed.
    #[error(transparent)]
    Delegation(Box<DelegationError>),
}

impl From<ConnError> for DelegationToolError {
    fn from(e: ConnError) -> Self {
        DelegationToolError::Conn(Box::new(e))
    }
}

impl From<DelegationError> for DelegationToolError {
    fn from(e: DelegationError) -> Self {
        DelegationToolError::Delegation(Box::new(e))
    }
}

impl DelegationToolError {
    /// The exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            DelegationToolError::Conn(e) => e.exit_code(),
            DelegationToolError::Delegation(e) => match e.kind() {
                ErrorKind::Unreachable => exit::UNREACHABLE,
                ErrorKind::Denied => exit::DENIED,
                ErrorKind::NotFound => exit::NOT_FOUND,
                ErrorKind::Refused => exit::REFUSED,
                ErrorKind::Usage => exit::USAGE,
            },
        }
    }

    /// The Windows code, cause and fix, when there is one.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match self {
            DelegationToolError::Conn(e) => e.diagnosis(),
            DelegationToolError::Delegation(e) => match e.as_ref() {
                DelegationError::Directory(d) => d.diagnosis(),
                _ => None,
            },
        }
    }
}

fn switch(s: Switch) -> bool {
    s == Switch::On
}

/// Runs one operation against a connected directory.
pub fn execute(dir: &Directory, command: &DelegationCommand) -> Result<Outcome, DelegationError> {
    Ok(match command {
        DelegationCommand::Show { account } => Outcome::Show(gather::show(dir, account)?),
        DelegationCommand::Find => Outcome::Find(gather::find(dir)?),
        DelegationCommand::AddService { account, spns } => {
            Outcome::Changed(vec![configure::add_service(dir, account, spns)?])
        }
        DelegationCommand::DelService { account, spns } => {
            Outcome::Changed(vec![configure::del_service(dir, account, spns)?])
        }
        DelegationCommand::ForAnyProtocol { account, state } => {
            Outcome::Changed(vec![configure::set_flag(
                dir,
                account,
                Uac::TRUSTED_TO_AUTH_FOR_DELEGATION,
                switch(*state),
            )?])
        }
        DelegationCommand::Sensitive { account, state } => {
            Outcome::Changed(vec![configure::set_flag(
                dir,
                account,
                Uac::NOT_DELEGATED,
                switch(*state),
            )?])
        }
        DelegationCommand::AllowMigration {
            from,
            to,
            any_protocol,
            both_ways,
            service_class,
        } => Outcome::Changed(configure::allow_migration(
            dir,
            from,
            to,
            &MigrationOptions {
                any_protocol: *any_protocol,
                both_ways: *both_ways,
                service_class: service_class.clone(),
            },
        )?),
        DelegationCommand::Check(args) => Outcome::Check(Box::new(check(dir, args)?)),
    })
}

/// `check`: gather the facts, analyse, and with `--live` ask the KDC.
pub fn check(dir: &Directory, args: &CheckArgs) -> Result<CheckReport, DelegationError> {
    // Validate the service class before asking the directory anything.
    Spn::new(&args.service_class, "host")?;
    let request = CheckRequest {
        from: args.from.clone(),
        to: args.to.clone(),
        user: args.user.clone(),
        auth: args.auth(),
        start: args.start(),
        service_class: args.service_class.clone(),
    };
    let facts = gather::gather_facts(dir, &request)?;
    let verdict = analyze(&facts);
    let live = if args.live {
        Some(run_live(dir, args, &facts, &verdict)?)
    } else {
        None
    };
    let ok = verdict.ok() && live.as_ref().is_none_or(|l| l.ok);
    Ok(CheckReport {
        facts,
        verdict,
        live,
        ok,
    })
}

fn run_live(
    dir: &Directory,
    args: &CheckArgs,
    facts: &DelegationFacts,
    verdict: &Verdict,
) -> Result<LiveReport, DelegationError> {
    let Some(keytab) = args.keytab.clone() else {
        return Err(live::LiveError::NeedsKeytab.into());
    };
    let source = gather::find_host(dir, &args.from)?;
    let source_spn = match &args.source_spn {
        Some(s) => Spn::parse(s)?,
        None => Spn::new("HOST", &gather::host_fqdn(dir, &source))?,
    };
    let spns = facts
        .migration_spns()
        .iter()
        .map(|s| Spn::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let ccache_dir = vmgate_auth::delegation::live::scratch_ccache_dir("vmgate-delegation-check");
    let request = LiveRequest {
        realm: dir.realm(),
        keytab,
        source_account: facts.source.account.clone(),
        source_spn,
        target_keytab: args.target_keytab.clone(),
        target_account: facts.target.account.clone(),
        spns,
        user: facts.user.as_ref().map(|u| u.name.clone()),
        user_ccache: args.user_ccache.clone(),
        start: facts.start,
        auth: facts.auth,
        ccache_dir: ccache_dir.clone(),
    };
    let result = live::run(&request, verdict);
    // Only per-operation caches were in it, each removed when dropped.
    let _ = std::fs::remove_dir_all(&ccache_dir);
    Ok(result?)
}

/// Runs `vmgate delegation`, printing text or JSON; returns the exit code.
pub fn run_args(args: &DelegationArgs) -> u8 {
    let program = "vmgate delegation";
    let result = args
        .conn
        .connect()
        .map_err(DelegationToolError::from)
        .and_then(|dir| execute(&dir, &args.command).map_err(DelegationToolError::from));
    match result {
        Ok(outcome) => {
            if let Err(code) =
                output::print_result(program, args.json, &outcome, || render::outcome(&outcome))
            {
                return code;
            }
            outcome.exit_code()
        }
        Err(err) => {
            let code = err.exit_code();
            let diagnosis = err.diagnosis();
            if args.json {
                println!("{}", output::error_json(&err, code, diagnosis.as_ref()));
            } else {
                eprint!(
                    "{}",
                    output::error_report(program, &err, diagnosis.as_ref())
                );
            }
            code
        }
    }
}

/// Runs `vmgate delegation`.
pub fn run(args: DelegationArgs) -> ExitCode {
    exit::code(run_args(&args))
}
