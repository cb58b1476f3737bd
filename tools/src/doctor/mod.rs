//! `vmgate doctor`: every prerequisite of a live move S→D, checked in order, every failure with
//! the Windows code, its cause in this deployment's terms, and the exact fix.
//!
//! ```text
//! vmgate doctor --from S --to D [--user U] [--auth kerberos|credssp]
//!               [--start remote|on-source|no-user-ticket|forward-credentials]
//!               [--keytab FILE] [--to-keytab FILE] [--user-ccache FILE]
//!               [--from-address IP[:PORT]] [--to-address IP[:PORT]]
//!               [--from-config FILE] [--to-config FILE] [--kdc HOST[:PORT]] [--realm REALM]
//!               [--admin-group NAME] [--json] [directory connection flags]
//! ```
//!
//! One line per check (`[pass]`, `[warn]`, `[FAIL]`, `[skip]`), then the verdict. A failed check
//! prints its [`Diagnosis`] (code, cause, fix) below its line. With `--json` the same is one JSON
//! document ([`Report`]).
//!
//! # The checks, in order ([`standard_checks`])
//!
//! | id | what | fails with |
//! |---|---|---|
//! | `clock-skew` | this host's clock against the KDC's (an AS-REQ's KRB-ERROR carries the KDC's time) | 0x80090324 beyond 5 minutes (a warning beyond 1) |
//! | `resolve-source`, `resolve-destination` | S's and D's addresses: `--from/--to-address`, `--from/--to-config`, `$VMGATE_LAB_DIR/H/vmgated.toml`, or this machine's resolver | 0x80090303 |
//! | `kdc` | a KDC of the realm answers on port 88 (`--kdc`, krb5.conf's `kdc =`, else DNS `_kerberos._tcp.REALM` SRV as libkrb5 finds them) | 0x80090311 |
//! | `ldap` | the directory answers and binds (the [`crate::conn`] flags; without a URL the DC DNS names for the realm) | the directory's code |
//! | `spn-fqdn`, `spn-short` | D's migration SPN registered exactly once, on D's account, with Samba's escaped twin | 0x80090303 missing or twin missing, 0x80090322 elsewhere or duplicated |
//! | `keytab` | S's keytab (`--keytab` or S's config) and D's (`--to-keytab` or D's config) hold the account's current key version (`msDS-KeyVersionNumber`); the fix is `vmgate host keytab refresh` on that host | 0x80090322 stale, 0x8009030D no key |
//! | `delegation` | S may act for U towards D for the auth type and the way the move starts (the delegation checker's analysis), confirmed by a live S4U exchange with S's keytab when given | 0x8009030E |
//! | `user-account` | U is enabled, not locked, not "sensitive and cannot be delegated", not in Protected Users | 0x8009030C, 0x8009030E |
//! | `user-authorized` | U is a member of D's admin group (`--admin-group`, D's config, or "Hyper-V Administrators") | 0x80070005 |
//! | `daemon-reachable` | D's vmgated answers on its migration addresses and accepts the user through its gateway as a move would reach it: TLS, Kerberos with the user's ticket (`--user-ccache`, `KRB5CCNAME`) for D's migration SPN, decrypted with D's key and bound to the TLS session, then D's authorization; its settings are read over that channel | 0x8007274D, or the code of the refusal (0x80090322 D's key, 0x80070005 not allowed, ...) |
//! | `migration-enabled` | D accepts live moves | 0x8007274D |
//! | `source-allowed` | S's address is on D's migration networks | 0x80070005 |
//! | `protocol-version` | S's protocol version (its daemon's, else this build's) is one D accepts | 0x80070032 |
//! | `vm-compatible` | with `--vm`: D's compatibility report for the VM through S's daemon (processor, switches, memory), each reason with its id | 0x80070032 |
//!
//! A check whose prerequisite failed (no KDC, no directory) is skipped and says why.
//!
//! # Exit codes ([`crate::exit`])
//!
//! 0 every check passed (warnings and skips allowed); 1 a check failed; 4 a failed check could
//! not reach something (KDC, directory); 2 usage (bad flag, unreadable configuration).
//!
//! # Adding checks (the extension point)
//!
//! The check list is data: [`standard_checks`] returns a `Vec<`[`Check`]`>`, and [`run_checks`]
//! runs any list in order against one [`Context`]. A check is an id, a title and a function
//! `fn(&mut Context) -> CheckResult`. To add the daemon checks (D's daemon reachable on its
//! migration addresses, migrations enabled, S's address allowed, protocol versions, VM
//! compatibility with `--vm`), write one function per check, push a [`Check`] for each after
//! the standard ones (see [`all_checks`], which is what `vmgate doctor` runs), and read what
//! the earlier checks found from the [`Context`]: [`Context::target_addresses`] (D's addresses
//! as resolved, for connecting), [`Context::source_addresses`] (S's, for "S's address
//! allowed"), [`Context::status_of`] (to skip when a prerequisite failed), [`Context::settings`]
//! (the flags and the hosts' configurations). Give a failure a [`Diagnosis`], and build it with
//! [`CheckResult::unreachable`] when the cause is that something did not answer (exit code 4).

mod checks;
mod daemon;
pub mod hosts;
pub mod kdc;
pub use vmgate_auth::krb::keytab;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;
use vmgate_auth::Diagnosis;
use vmgate_auth::delegation::{
    AuthType, DelegationError, DelegationFacts, MIGRATION_SERVICE_CLASS, MoveStart, Verdict,
};
use vmgate_auth::directory::{Account, Directory};

use crate::conn::{ConnArgs, ConnError};
use crate::delegation::AuthArg;
use crate::exit;

pub use hosts::HostConfig;

/// How the move is started (what S holds of the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StartArg {
    /// From elsewhere; the user authenticates to S with Kerberos (constrained delegation,
    /// "Kerberos only" is enough).
    Remote,
    /// On S itself, with the user's own ticket (nothing delegated).
    OnSource,
    /// S holds no ticket from the user (a queued job): protocol transition is needed.
    NoUserTicket,
    /// The user forwards a TGT to S (CredSSP).
    ForwardCredentials,
}

impl StartArg {
    fn start(self) -> MoveStart {
        match self {
            StartArg::Remote => MoveStart::RemoteWithTicket,
            StartArg::OnSource => MoveStart::OnSource,
            StartArg::NoUserTicket => MoveStart::RemoteWithoutTicket,
            StartArg::ForwardCredentials => MoveStart::RemoteForwardingCredentials,
        }
    }
}

/// `vmgate doctor` arguments.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The source host.
    #[arg(long = "from", value_name = "S")]
    pub from: String,
    /// The destination host.
    #[arg(long = "to", value_name = "D")]
    pub to: String,
    /// The user the move is started as.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The source host's auth type (default: `[migration] auth` of S's configuration, else
    /// kerberos).
    #[arg(long, value_enum)]
    pub auth: Option<AuthArg>,
    /// How the move is started.
    #[arg(long, value_enum, default_value = "remote")]
    pub start: StartArg,
    /// S's keytab: checks its key versions and runs the live S4U check (default: S's config).
    #[arg(long, value_name = "FILE")]
    pub keytab: Option<PathBuf>,
    /// D's keytab: checks its key versions and that D can decrypt the live check's ticket
    /// (default: D's config).
    #[arg(long = "to-keytab", value_name = "FILE")]
    pub to_keytab: Option<PathBuf>,
    /// The user's credential cache, for the live check of a move started with the user's own
    /// ticket (default: KRB5CCNAME).
    #[arg(long, value_name = "FILE")]
    pub user_ccache: Option<String>,
    /// S's address, instead of resolving its name.
    #[arg(long = "from-address", value_name = "IP[:PORT]")]
    pub from_address: Option<String>,
    /// D's address, instead of resolving its name.
    #[arg(long = "to-address", value_name = "IP[:PORT]")]
    pub to_address: Option<String>,
    /// S's vmgated configuration (addresses, keytab, auth type).
    #[arg(long = "from-config", value_name = "FILE")]
    pub from_config: Option<PathBuf>,
    /// D's vmgated configuration (addresses, keytab, admin group).
    #[arg(long = "to-config", value_name = "FILE")]
    pub to_config: Option<PathBuf>,
    /// The KDC to ask, instead of krb5.conf's `kdc =` lines or DNS.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub kdc: Option<String>,
    /// The Kerberos realm (default: the configurations', else krb5.conf's default_realm).
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// The group D admits (default: D's config admin_group, else "Hyper-V Administrators").
    #[arg(long = "admin-group", value_name = "NAME")]
    pub admin_group: Option<String>,
    /// The migration service class.
    #[arg(long, default_value = MIGRATION_SERVICE_CLASS)]
    pub service_class: String,
    /// Also check that D can take this VM of S (its compatibility report, as `vmgate compare`).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Switch renames to check the VM with (A=B, repeatable).
    #[arg(long = "switch-map", value_name = "A=B")]
    pub switch_map: Vec<String>,
    /// Check only the domain side (names, KDC, SPNs, keytabs, delegation, the user), not the
    /// daemons: for hosts whose vmgated is not installed yet.
    #[arg(long)]
    pub skip_daemon: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Directory connection.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Errors that keep the doctor from starting (usage).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// A configuration file or an address is unusable.
    #[error(transparent)]
    Hosts(#[from] hosts::HostsError),
    /// A configuration names an auth type vmgate does not know.
    #[error("{}: `[migration] auth` is \"{value}\"; the doctor checks kerberos and credssp", path.display())]
    UnknownAuth {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
    },
}

/// The doctor's inputs, resolved from the flags and the hosts' configurations.
#[derive(Clone, Debug)]
pub struct Settings {
    /// S as given.
    pub from: String,
    /// D as given.
    pub to: String,
    /// U.
    pub user: Option<String>,
    /// S's auth type.
    pub auth: AuthType,
    /// How the move starts.
    pub start: MoveStart,
    /// S's keytab and whether it was named explicitly (`--keytab`).
    pub source_keytab: Option<(PathBuf, bool)>,
    /// D's keytab and whether it was named explicitly (`--to-keytab`).
    pub target_keytab: Option<(PathBuf, bool)>,
    /// The user's ccache for the live check.
    pub user_ccache: Option<String>,
    /// `--from-address`.
    pub from_address: Option<SocketAddr>,
    /// `--to-address`.
    pub to_address: Option<SocketAddr>,
    /// S's configuration (`--from-config` or the lab's).
    pub from_config: Option<HostConfig>,
    /// D's configuration (`--to-config` or the lab's).
    pub to_config: Option<HostConfig>,
    /// `--kdc`.
    pub kdc: Option<String>,
    /// The realm, when known without asking anyone.
    pub realm: Option<String>,
    /// The group D admits.
    pub admin_group: String,
    /// The migration service class.
    pub service_class: String,
    /// The directory connection.
    pub conn: ConnArgs,
    /// `--vm`: the VM whose compatibility with D is checked.
    pub vm: Option<String>,
    /// `--switch-map` for that check.
    pub switch_map: Vec<String>,
}

impl Settings {
    /// Resolves the arguments: reads the configurations, parses the addresses.
    pub fn from_args(args: &DoctorArgs) -> Result<Settings, DoctorError> {
        let load =
            |flag: &Option<PathBuf>, host: &str| -> Result<Option<HostConfig>, DoctorError> {
                match flag {
                    Some(p) => Ok(Some(HostConfig::load(p)?)),
                    None => match hosts::lab_config(host) {
                        Some(p) => Ok(Some(HostConfig::load(&p)?)),
                        None => Ok(None),
                    },
                }
            };
        let from_config = load(&args.from_config, &args.from)?;
        let to_config = load(&args.to_config, &args.to)?;
        let address = |a: &Option<String>| a.as_deref().map(hosts::parse_address).transpose();
        let auth = match (
            args.auth,
            from_config.as_ref().and_then(|c| c.auth.as_ref()),
        ) {
            (Some(AuthArg::Kerberos), _) => AuthType::Kerberos,
            (Some(AuthArg::Credssp), _) => AuthType::Credssp,
            (None, Some(v)) if v.eq_ignore_ascii_case("kerberos") => AuthType::Kerberos,
            (None, Some(v)) if v.eq_ignore_ascii_case("credssp") => AuthType::Credssp,
            (None, Some(v)) => {
                return Err(DoctorError::UnknownAuth {
                    path: from_config
                        .as_ref()
                        .map(|c| c.path.clone())
                        .unwrap_or_default(),
                    value: v.clone(),
                });
            }
            (None, None) => AuthType::Kerberos,
        };
        let keytab = |flag: &Option<PathBuf>, cfg: &Option<HostConfig>| match flag {
            Some(p) => Some((p.clone(), true)),
            None => cfg
                .as_ref()
                .and_then(|c| c.keytab.clone())
                .map(|p| (p, false)),
        };
        let conn = args.conn.with_env(|n| std::env::var(n).ok());
        Ok(Settings {
            from: args.from.clone(),
            to: args.to.clone(),
            user: args.user.clone(),
            auth,
            start: args.start.start(),
            source_keytab: keytab(&args.keytab, &from_config),
            target_keytab: keytab(&args.to_keytab, &to_config),
            user_ccache: args
                .user_ccache
                .clone()
                .or_else(|| std::env::var("KRB5CCNAME").ok().filter(|v| !v.is_empty())),
            from_address: address(&args.from_address)?,
            to_address: address(&args.to_address)?,
            kdc: args.kdc.clone(),
            realm: args.realm.clone().or_else(|| {
                [&from_config, &to_config]
                    .into_iter()
                    .find_map(|c| c.as_ref().and_then(|c| c.realm.clone()))
            }),
            admin_group: args
                .admin_group
                .clone()
                .or_else(|| to_config.as_ref().and_then(|c| c.admin_group.clone()))
                .unwrap_or_else(|| vmgate_auth::authz::DEFAULT_GROUP.to_owned()),
            service_class: args.service_class.clone(),
            vm: args.vm.clone(),
            switch_map: args.switch_map.clone(),
            from_config,
            to_config,
            conn,
        })
    }
}

/// pass / warn / fail / skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The prerequisite holds.
    Pass,
    /// It holds, with something worth knowing.
    Warn,
    /// It does not hold: the move would fail.
    Fail,
    /// Not checked (a prerequisite failed, or nothing to check with).
    Skip,
}

impl Status {
    /// `[pass]`, `[warn]`, `[FAIL]`, `[skip]`.
    pub fn mark(self) -> &'static str {
        match self {
            Status::Pass => "[pass]",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
            Status::Skip => "[skip]",
        }
    }
}

/// What one check found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// The outcome.
    pub status: Status,
    /// One line: what holds, or what does not.
    pub summary: String,
    /// Further lines (requirements, live answers, notes).
    pub details: Vec<String>,
    /// For a failure: the Windows code, the cause and the fix.
    pub diagnosis: Option<Diagnosis>,
    /// The failure is that something did not answer (exit code 4).
    pub unreachable: bool,
}

impl CheckResult {
    fn new(status: Status, summary: impl Into<String>) -> CheckResult {
        CheckResult {
            status,
            summary: summary.into(),
            details: Vec::new(),
            diagnosis: None,
            unreachable: false,
        }
    }

    /// Passed.
    pub fn pass(summary: impl Into<String>) -> CheckResult {
        CheckResult::new(Status::Pass, summary)
    }

    /// Passed with a warning.
    pub fn warn(summary: impl Into<String>) -> CheckResult {
        CheckResult::new(Status::Warn, summary)
    }

    /// Not checked.
    pub fn skip(summary: impl Into<String>) -> CheckResult {
        CheckResult::new(Status::Skip, summary)
    }

    /// Failed, with the diagnosis.
    pub fn fail(summary: impl Into<String>, diagnosis: Diagnosis) -> CheckResult {
        CheckResult {
            diagnosis: Some(diagnosis),
            ..CheckResult::new(Status::Fail, summary)
        }
    }

    /// Failed because something did not answer (exit code 4).
    pub fn unreachable(summary: impl Into<String>, diagnosis: Diagnosis) -> CheckResult {
        CheckResult {
            unreachable: true,
            ..CheckResult::fail(summary, diagnosis)
        }
    }

    /// The same result with one more detail line.
    #[must_use]
    pub fn detail(mut self, line: impl Into<String>) -> CheckResult {
        self.details.push(line.into());
        self
    }
}

/// One check: an id (stable, for scripts), a title, and the function that runs it.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// `clock-skew`, `spn-fqdn`, ...
    pub id: &'static str,
    /// What is checked, in a few words.
    pub title: &'static str,
    /// The check.
    pub run: fn(&mut Context) -> CheckResult,
}

/// The facts the directory checks share, read once.
#[derive(Debug)]
pub struct Gathered {
    /// The delegation facts (user included when found).
    pub facts: DelegationFacts,
    /// The delegation checker's verdict on them.
    pub verdict: Verdict,
    /// S's account.
    pub source: Account,
    /// D's account.
    pub target: Account,
    /// U's account, or why it could not be read.
    pub user: Option<Result<Account, DelegationError>>,
}

/// What the checks share: the settings, what earlier checks found, and lazily opened
/// connections (the KDC's answer, the directory, the delegation facts).
#[derive(Debug)]
pub struct Context {
    settings: Settings,
    results: Vec<(&'static str, Status)>,
    source_addresses: Vec<SocketAddr>,
    target_addresses: Vec<SocketAddr>,
    default_realm: Option<Option<String>>,
    kdc_list: Option<vmgate_auth::discover::KdcList>,
    kdc: Option<Result<kdc::KdcTime, kdc::KdcError>>,
    directory: Option<Result<Directory, ConnError>>,
    gathered: Option<Result<Gathered, DelegationError>>,
    daemon_d: Option<daemon::Asked<vmgate_control::api::host::HostInfo>>,
}

impl Context {
    /// A context for `settings`; nothing is contacted until a check asks.
    pub fn new(settings: Settings) -> Context {
        Context {
            settings,
            results: Vec::new(),
            source_addresses: Vec::new(),
            target_addresses: Vec::new(),
            default_realm: None,
            kdc_list: None,
            kdc: None,
            directory: None,
            gathered: None,
            daemon_d: None,
        }
    }

    /// The resolved inputs.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The status of an earlier check (`None`: not run yet, or not in the list).
    pub fn status_of(&self, id: &str) -> Option<Status> {
        self.results.iter().find(|(i, _)| *i == id).map(|(_, s)| *s)
    }

    /// S's addresses, as `resolve-source` found them (empty until then, or if it failed).
    pub fn source_addresses(&self) -> &[SocketAddr] {
        &self.source_addresses
    }

    /// D's addresses, as `resolve-destination` found them.
    pub fn target_addresses(&self) -> &[SocketAddr] {
        &self.target_addresses
    }

    /// krb5.conf's `default_realm`, as libkrb5 reads it (asked once).
    pub fn default_realm(&mut self) -> Option<String> {
        self.default_realm
            .get_or_insert_with(|| vmgate_auth::discover::default_realm().ok())
            .clone()
    }

    /// Where the KDCs the probe asked were found (after `kdc` ran).
    pub fn kdc_list(&self) -> Option<&vmgate_auth::discover::KdcList> {
        self.kdc_list.as_ref()
    }

    /// The realm: `--realm`, the configurations', krb5.conf's default, or the directory's.
    pub fn realm(&mut self) -> Option<String> {
        if let Some(r) = &self.settings.realm {
            return Some(r.clone());
        }
        if let Some(r) = self.default_realm() {
            return Some(r);
        }
        self.directory().ok().map(Directory::realm)
    }

    /// S's account name as the KDC knows it (`hv1$`).
    pub fn source_account_name(&self) -> String {
        self.settings
            .from_config
            .as_ref()
            .and_then(|c| c.account.clone())
            .unwrap_or_else(|| {
                let short = self.settings.from.split('.').next().unwrap_or_default();
                format!("{}$", short.trim_end_matches('$'))
            })
            .to_ascii_lowercase()
    }

    /// The KDC's answer to the clock probe (asked once).
    pub fn kdc(&mut self) -> Result<&kdc::KdcTime, &kdc::KdcError> {
        let result = match self.kdc.take() {
            Some(r) => r,
            None => self.probe_kdc(),
        };
        self.kdc.insert(result).as_ref()
    }

    fn probe_kdc(&mut self) -> Result<kdc::KdcTime, kdc::KdcError> {
        let realm = self.realm().ok_or(kdc::KdcError::NoRealm)?;
        let addresses = match &self.settings.kdc {
            Some(k) => kdc::kdc_addresses(k)?,
            None => {
                // Where libkrb5 looks: krb5.conf's kdc lines, else DNS SRV records.
                let list = vmgate_auth::discover::kdcs(&realm)?;
                let addresses = list.addresses()?;
                self.kdc_list = Some(list);
                addresses
            }
        };
        kdc::probe(&addresses, &realm, &self.source_account_name())
    }

    /// The directory, connected and bound (once).
    pub fn directory(&mut self) -> Result<&Directory, &ConnError> {
        let conn = &self.settings.conn;
        self.directory
            .get_or_insert_with(|| conn.connect())
            .as_ref()
    }

    /// The delegation facts and verdict, and the accounts (read once).
    pub fn gathered(&mut self) -> Option<Result<&Gathered, &DelegationError>> {
        if self.gathered.is_none() {
            let settings = self.settings.clone();
            let dir = self.directory().ok()?.clone();
            self.gathered = Some(checks::gather(&dir, &settings));
        }
        self.gathered.as_ref().map(Result::as_ref)
    }
}

/// The checks that need only the domain, the auth library and the hosts' keytabs and
/// configurations, in order.
pub fn standard_checks() -> Vec<Check> {
    checks::standard()
}

/// Every check `vmgate doctor` runs: [`standard_checks`], then the daemon checks.
pub fn all_checks() -> Vec<Check> {
    let mut list = standard_checks();
    list.extend(daemon::checks());
    list
}

/// One check's outcome in the report.
#[derive(Clone, Debug, Serialize)]
pub struct CheckOutcome {
    /// The check's id.
    pub id: &'static str,
    /// Its title.
    pub title: &'static str,
    /// What it found.
    #[serde(flatten)]
    pub result: CheckResult,
}

/// The verdict over all checks.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// No check failed.
    pub ok: bool,
    /// Checks passed.
    pub passed: usize,
    /// Checks passed with a warning.
    pub warnings: usize,
    /// Checks failed.
    pub failed: usize,
    /// Checks skipped.
    pub skipped: usize,
    /// The first failure's diagnosis: the error the move would report first.
    pub error: Option<Diagnosis>,
    /// The exit code.
    pub exit_code: u8,
}

/// The doctor's report (the `--json` document).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// S.
    pub from: String,
    /// D.
    pub to: String,
    /// U.
    pub user: Option<String>,
    /// S's auth type.
    pub auth: AuthType,
    /// How the move starts.
    pub start: MoveStart,
    /// Every check, in order.
    pub checks: Vec<CheckOutcome>,
    /// The verdict.
    pub verdict: Summary,
}

/// Runs `checks` in order against `ctx`.
pub fn run_checks(ctx: &mut Context, checks: &[Check]) -> Report {
    let mut outcomes = Vec::new();
    for check in checks {
        let result = (check.run)(ctx);
        ctx.results.push((check.id, result.status));
        outcomes.push(CheckOutcome {
            id: check.id,
            title: check.title,
            result,
        });
    }
    let count = |s: Status| outcomes.iter().filter(|o| o.result.status == s).count();
    let failed = count(Status::Fail);
    let exit_code = if outcomes
        .iter()
        .any(|o| o.result.status == Status::Fail && o.result.unreachable)
    {
        exit::UNREACHABLE
    } else if failed > 0 {
        exit::REFUSED
    } else {
        exit::OK
    };
    let s = &ctx.settings;
    Report {
        from: s.from.clone(),
        to: s.to.clone(),
        user: s.user.clone(),
        auth: s.auth,
        start: s.start,
        verdict: Summary {
            ok: failed == 0,
            passed: count(Status::Pass),
            warnings: count(Status::Warn),
            failed,
            skipped: count(Status::Skip),
            error: outcomes
                .iter()
                .find(|o| o.result.status == Status::Fail)
                .and_then(|o| o.result.diagnosis.clone()),
            exit_code,
        },
        checks: outcomes,
    }
}

fn start_text(start: MoveStart, user: &str, source: &str) -> String {
    match start {
        MoveStart::OnSource => format!("started on {source} with {user}'s own ticket"),
        MoveStart::RemoteWithTicket => {
            format!("started remotely, {user} authenticating to {source} with Kerberos")
        }
        MoveStart::RemoteWithoutTicket => {
            format!("started without a ticket from {user}: {source} uses protocol transition")
        }
        MoveStart::RemoteForwardingCredentials => {
            format!("started remotely, {user} forwarding credentials to {source}")
        }
    }
}

/// The report as text: a header, one line per check (details and diagnosis indented below),
/// the verdict.
pub fn render(r: &Report) -> String {
    let user = r.user.as_deref().unwrap_or("the user");
    let mut out = format!(
        "vmgate doctor: live move {} -> {} as {user} (auth {}, {})\n",
        r.from,
        r.to,
        r.auth,
        start_text(r.start, user, &r.from)
    );
    let width = r.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
    for c in &r.checks {
        let _ = writeln!(
            out,
            "{} {:<width$}  {}",
            c.result.status.mark(),
            c.id,
            c.result.summary
        );
        for d in &c.result.details {
            let _ = writeln!(out, "         {d}");
        }
        if let Some(d) = &c.result.diagnosis {
            for line in d.to_string().lines() {
                let _ = writeln!(out, "         {line}");
            }
        }
    }
    let v = &r.verdict;
    let total = r.checks.len();
    match &v.error {
        None if v.ok => {
            let _ = writeln!(
                out,
                "Verdict: PASS: no check failed ({} passed, {} warning{}, {} skipped of {total}).",
                v.passed,
                v.warnings,
                if v.warnings == 1 { "" } else { "s" },
                v.skipped
            );
        }
        error => {
            let _ = write!(
                out,
                "Verdict: FAIL: {} of {total} checks failed ({} warning{})",
                v.failed,
                v.warnings,
                if v.warnings == 1 { "" } else { "s" }
            );
            match error {
                Some(d) => {
                    let _ = writeln!(
                        out,
                        "; a move {} -> {} would fail with {} ({}).",
                        r.from,
                        r.to,
                        d.code.hex(),
                        d.code.name()
                    );
                }
                None => out.push_str(".\n"),
            }
        }
    }
    out
}

/// Runs `vmgate doctor`, printing text or JSON; returns the exit code.
pub fn run_args(args: &DoctorArgs) -> u8 {
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(e) => {
            if args.json {
                println!("{}", crate::output::error_json(&e, exit::USAGE, None));
            } else {
                eprint!("{}", crate::output::error_report("vmgate doctor", &e, None));
            }
            return exit::USAGE;
        }
    };
    let mut ctx = Context::new(settings);
    let checks = if args.skip_daemon {
        standard_checks()
    } else {
        all_checks()
    };
    let report = run_checks(&mut ctx, &checks);
    if let Err(code) =
        crate::output::print_result("vmgate doctor", args.json, &report, || render(&report))
    {
        return code;
    }
    report.verdict.exit_code
}

/// Runs `vmgate doctor`.
pub fn run(args: DoctorArgs) -> ExitCode {
    exit::code(run_args(&args))
}

#[cfg(test)]
mod tests {
    use vmgate_auth::WinCode;

    use super::*;

    fn settings() -> Settings {
        Settings {
            from: "hv1".into(),
            to: "hv2".into(),
            user: Some("alice".into()),
            auth: AuthType::Kerberos,
            start: MoveStart::RemoteWithTicket,
            source_keytab: None,
            target_keytab: None,
            user_ccache: None,
            from_address: None,
            to_address: None,
            from_config: None,
            to_config: None,
            kdc: None,
            realm: Some("LAB.EXAMPLE.TEST".into()),
            admin_group: "Hyper-V Administrators".into(),
            service_class: MIGRATION_SERVICE_CLASS.into(),
            vm: None,
            switch_map: Vec::new(),
            conn: ConnArgs::default(),
        }
    }

    fn ok(_: &mut Context) -> CheckResult {
        CheckResult::pass("fine").detail("a detail")
    }

    fn after_ok(ctx: &mut Context) -> CheckResult {
        match ctx.status_of("first") {
            Some(Status::Pass) => CheckResult::warn("saw the first check pass"),
            other => CheckResult::fail(
                format!("first was {other:?}"),
                Diagnosis::new(WinCode::InvalidToken, "order"),
            ),
        }
    }

    fn broken(_: &mut Context) -> CheckResult {
        CheckResult::fail(
            "D's daemon refuses",
            Diagnosis::new(WinCode::AccessDenied, "S's address is not allowed on D")
                .with_fix("vmgate --host hv2 host set --network 127.0.0.11/32"),
        )
    }

    fn gone(_: &mut Context) -> CheckResult {
        CheckResult::unreachable(
            "D's daemon does not answer",
            Diagnosis::new(
                WinCode::ConnectionRefused,
                "nothing listens on 127.0.0.12:6600",
            ),
        )
    }

    fn check(id: &'static str, run: fn(&mut Context) -> CheckResult) -> Check {
        Check { id, title: id, run }
    }

    #[test]
    fn a_list_of_checks_runs_in_order_and_decides_the_exit_code() {
        let list = vec![check("first", ok), check("second", after_ok)];
        let r = run_checks(&mut Context::new(settings()), &list);
        assert_eq!(r.verdict.exit_code, exit::OK);
        assert_eq!((r.verdict.passed, r.verdict.warnings), (1, 1));
        let text = render(&r);
        assert!(
            text.contains("[pass] first   fine\n         a detail\n"),
            "{text}"
        );
        assert!(
            text.contains("[warn] second  saw the first check pass\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "Verdict: PASS: no check failed (1 passed, 1 warning, 0 skipped of 2).\n"
            ),
            "{text}"
        );

        let mut list = list;
        list.push(check("daemon-allows-source", broken));
        let r = run_checks(&mut Context::new(settings()), &list);
        assert_eq!(r.verdict.exit_code, exit::REFUSED);
        let text = render(&r);
        assert!(
            text.contains(
                "[FAIL] daemon-allows-source  D's daemon refuses\n         error 0x80070005 \
                 (E_ACCESSDENIED): Access is denied.\n           cause: S's address is not \
                 allowed on D\n           fix:   vmgate --host hv2 host set --network \
                 127.0.0.11/32\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "Verdict: FAIL: 1 of 3 checks failed (1 warning); a move hv1 -> hv2 would fail \
                 with 0x80070005 (E_ACCESSDENIED).\n"
            ),
            "{text}"
        );

        list.push(check("daemon-reachable", gone));
        let r = run_checks(&mut Context::new(settings()), &list);
        assert_eq!(r.verdict.exit_code, exit::UNREACHABLE);
        assert_eq!(
            r.verdict.error.as_ref().map(|d| d.code),
            Some(WinCode::AccessDenied)
        );
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][3]["id"], "daemon-reachable");
        assert_eq!(json["checks"][3]["status"], "fail");
        assert_eq!(json["checks"][3]["diagnosis"]["code"], "0x8007274D");
        assert_eq!(json["verdict"]["failed"], 2);
        assert_eq!(json["start"], "remote-with-ticket");
    }

    #[test]
    fn the_standard_checks_are_in_the_documented_order() {
        let ids: Vec<&str> = standard_checks().iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [
                "clock-skew",
                "resolve-source",
                "resolve-destination",
                "kdc",
                "ldap",
                "spn-fqdn",
                "spn-short",
                "keytab",
                "delegation",
                "user-account",
                "user-authorized"
            ]
        );
        let daemon: Vec<&str> = all_checks().iter().skip(ids.len()).map(|c| c.id).collect();
        assert_eq!(
            daemon,
            [
                "daemon-reachable",
                "migration-enabled",
                "source-allowed",
                "protocol-version",
                "vm-compatible"
            ]
        );
    }
}
