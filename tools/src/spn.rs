//! `vmgate spn ...`: add, delete, list, query and find duplicate SPNs (also behind `setspn`).
//!
//! Both front ends build the same [`Request`] and run it with [`execute`]; the outcome is
//! printed as Windows setspn's text ([`render_text`]) or as JSON (`--json`).
//!
//! | setspn | vmgate spn | what |
//! |---|---|---|
//! | `-S SPN ACCOUNT` | `add SPN ACCOUNT` | add after checking the domain for duplicates |
//! | `-A SPN ACCOUNT` | `add --no-check SPN ACCOUNT` | add without the check |
//! | `-D SPN ACCOUNT` | `delete SPN ACCOUNT` | delete (plain and Samba twin) |
//! | `-L ACCOUNT`, `ACCOUNT` | `list ACCOUNT` | list (twins shown once) |
//! | `-Q PATTERN` | `query PATTERN` | find accounts with matching SPNs (`*` wildcards) |
//! | `-X` | `duplicates` | SPNs registered on more than one account |
//! | `-R ACCOUNT` | `reset ACCOUNT` | (re)register `HOST/<name>` and `HOST/<dNSHostName>` |
//! | `-C` / `-U` | `--computer` / `--user` | the account is a computer / a user |
//! | `-F`, `-T DOMAIN` | — | forest / target domain: one domain here |
//!
//! Exit codes ([`crate::exit`]): 0 done (or `-Q` found, `-X` found none); 1 refused (duplicate
//! SPN, duplicates found by `-X`, SPN already on the account); 2 usage (bad flag, malformed SPN);
//! 3 not found (account, `-Q` found nothing, `-D` of an SPN the account does not hold);
//! 4 directory unreachable or TLS failure; 5 bind refused or not allowed.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use vmgate_auth::directory::spns::DuplicateSpn;
use vmgate_auth::directory::{Account, AccountKind, AccountName, Directory, DirectoryError};
use vmgate_auth::spn::{Spn, SpnPattern};

use crate::conn::{ConnArgs, directory_exit_code};
use crate::exit;
use crate::output::{self, SearchLevel};

/// One SPN operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Add `spn` to `account`; with `check`, first search the domain for holders (`-S`).
    Add {
        /// The SPN.
        spn: Spn,
        /// The account as typed.
        account: String,
        /// Check the domain for duplicates first (`-S`) or not (`-A`).
        check: bool,
    },
    /// Delete `spn` from `account` (`-D`).
    Delete {
        /// The SPN.
        spn: Spn,
        /// The account as typed.
        account: String,
    },
    /// List the SPNs of `account` (`-L`).
    List {
        /// The account as typed.
        account: String,
    },
    /// Find accounts with SPNs matching `pattern` (`-Q`).
    Query {
        /// The pattern.
        pattern: SpnPattern,
    },
    /// Find SPNs on more than one account (`-X`).
    Duplicates,
    /// Register `HOST/<short name>` and `HOST/<dNSHostName>` on a computer (`-R`).
    Reset {
        /// The account as typed.
        account: String,
    },
}

/// An operation with its modifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub operation: Operation,
    /// `-C` / `-U`.
    pub kind: AccountKind,
    /// `-F`.
    pub level: SearchLevel,
    /// `-T DOMAIN` (checked against the connected domain).
    pub target_domain: Option<String>,
}

impl Request {
    /// A request with default modifiers.
    pub fn new(operation: Operation) -> Request {
        Request {
            operation,
            kind: AccountKind::Any,
            level: SearchLevel::Domain,
            target_domain: None,
        }
    }
}

/// An account and its SPNs as shown to the user (twins collapsed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// The account's DN.
    pub dn: String,
    /// `sAMAccountName`.
    pub sam_account_name: String,
    /// The SPNs shown (all, or those relevant to the operation).
    pub spns: Vec<String>,
}

impl Holder {
    fn all(a: &Account) -> Holder {
        Holder {
            dn: a.dn.clone(),
            sam_account_name: a.sam_account_name.clone(),
            spns: a.spns(),
        }
    }
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The SPN was registered.
    Registered {
        /// The account's DN.
        account: String,
        /// The SPNs registered (as the user sees them).
        spns: Vec<String>,
        /// The values written (the plain SPN and, on Samba, its twin).
        values_written: Vec<String>,
        /// Whether the domain was checked for duplicates first.
        checked: bool,
    },
    /// `-S`: other accounts (or this one) already hold the SPN; nothing changed.
    DuplicateFound {
        /// The SPN.
        spn: String,
        /// Who holds it.
        holders: Vec<Holder>,
        /// Whether the domain was searched (`-S`) or only the account (`-A`).
        checked: bool,
    },
    /// The SPN was removed.
    Unregistered {
        /// The account's DN.
        account: String,
        /// The SPN removed.
        spns: Vec<String>,
        /// The values removed (plain and twin).
        values_removed: Vec<String>,
    },
    /// The account's SPNs.
    Listed {
        /// The account.
        account: Holder,
    },
    /// Accounts with SPNs matching the pattern.
    Queried {
        /// The pattern.
        pattern: String,
        /// Matching accounts with all their SPNs.
        accounts: Vec<Holder>,
    },
    /// SPNs on more than one account.
    Duplicates {
        /// The groups.
        groups: Vec<DuplicateSpn>,
    },
}

/// An outcome and where it was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The domain's DN (`Checking domain ...`).
    pub domain: String,
    /// Domain or forest.
    pub level: SearchLevel,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    /// The exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Outcome::DuplicateFound { .. } => exit::REFUSED,
            Outcome::Queried { accounts, .. } if accounts.is_empty() => exit::NOT_FOUND,
            Outcome::Duplicates { groups } if !groups.is_empty() => exit::REFUSED,
            _ => exit::OK,
        }
    }
}

/// Errors of an SPN command.
#[derive(Debug, thiserror::Error)]
pub enum SpnToolError {
    /// `-T` named a domain other than the connected one.
    #[error("this setspn searches one domain ({connected}); -T named another: {given}")]
    OtherDomain {
        /// The connected domain's DNS name.
        connected: String,
        /// What `-T` gave.
        given: String,
    },
    /// `-R` on an account that is not a computer.
    #[error("{dn} is not a computer account; -R resets the HOST SPNs of computers only")]
    NotAComputer {
        /// The account.
        dn: String,
    },
    /// A directory operation failed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

impl SpnToolError {
    /// The exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpnToolError::OtherDomain { .. } | SpnToolError::NotAComputer { .. } => exit::USAGE,
            SpnToolError::Directory(e) => directory_exit_code(e),
        }
    }
}

fn check_domain(dir: &Directory, target: Option<&str>) -> Result<(), SpnToolError> {
    let Some(given) = target else { return Ok(()) };
    let dns = dir.dns_domain();
    let first_label = dns.split('.').next().unwrap_or_default();
    let ok = given.is_empty()
        || given == "*"
        || given.eq_ignore_ascii_case(&dns)
        || given.eq_ignore_ascii_case(dir.base_dn())
        || given.eq_ignore_ascii_case(first_label);
    if ok {
        Ok(())
    } else {
        Err(SpnToolError::OtherDomain {
            connected: dns,
            given: given.to_owned(),
        })
    }
}

/// Runs one request against the directory.
pub fn execute(dir: &Directory, request: &Request) -> Result<Report, SpnToolError> {
    check_domain(dir, request.target_domain.as_deref())?;
    let find = |name: &str| -> Result<Account, SpnToolError> {
        Ok(dir.find_account(&AccountName::parse(name)?, request.kind)?)
    };
    let outcome = match &request.operation {
        Operation::Add {
            spn,
            account,
            check,
        } => {
            let target = find(account)?;
            let holders: Vec<Account> = if *check {
                dir.spn_holders(spn)?
            } else if target.has_spn(spn) {
                vec![target.clone()]
            } else {
                Vec::new()
            };
            if holders.is_empty() {
                let written = dir.register_spn(&target, spn)?;
                Outcome::Registered {
                    account: target.dn,
                    spns: vec![spn.to_string()],
                    values_written: written,
                    checked: *check,
                }
            } else {
                Outcome::DuplicateFound {
                    spn: spn.to_string(),
                    holders: holders
                        .iter()
                        .map(|a| Holder {
                            dn: a.dn.clone(),
                            sam_account_name: a.sam_account_name.clone(),
                            spns: a
                                .spns()
                                .into_iter()
                                .filter(|v| spn.matches_value(v))
                                .collect(),
                        })
                        .collect(),
                    checked: *check,
                }
            }
        }
        Operation::Delete { spn, account } => {
            let target = find(account)?;
            let removed = dir.unregister_spn(&target, spn)?;
            Outcome::Unregistered {
                account: target.dn,
                spns: vec![spn.to_string()],
                values_removed: removed,
            }
        }
        Operation::List { account } => Outcome::Listed {
            account: Holder::all(&find(account)?),
        },
        Operation::Query { pattern } => Outcome::Queried {
            pattern: pattern.to_string(),
            accounts: dir.query_spns(pattern)?.iter().map(Holder::all).collect(),
        },
        Operation::Duplicates => Outcome::Duplicates {
            groups: dir.find_duplicate_spns()?,
        },
        Operation::Reset { account } => {
            let target = find(account)?;
            if !target.is_computer() {
                return Err(SpnToolError::NotAComputer { dn: target.dn });
            }
            let mut wanted = Vec::new();
            if let Some(fqdn) = &target.dns_host_name {
                wanted.push(
                    Spn::new("HOST", fqdn).map_err(|_| SpnToolError::NotAComputer {
                        dn: target.dn.clone(),
                    })?,
                );
            }
            wanted.push(Spn::new("HOST", target.short_name()).map_err(|_| {
                SpnToolError::NotAComputer {
                    dn: target.dn.clone(),
                }
            })?);
            let mut written = Vec::new();
            let mut current = target.service_principal_names.clone();
            for spn in &wanted {
                let w = dir.add_spn_value(&target.dn, "servicePrincipalName", spn, &current)?;
                current.extend(w.iter().cloned());
                written.extend(w);
            }
            Outcome::Registered {
                account: target.dn,
                spns: wanted.iter().map(ToString::to_string).collect(),
                values_written: written,
                checked: false,
            }
        }
    };
    Ok(Report {
        domain: dir.base_dn().to_owned(),
        level: request.level,
        outcome,
    })
}

/// Windows setspn's text for a report.
pub fn render_text(report: &Report) -> String {
    let checking = output::checking(report.level, &report.domain);
    let pairs = |hs: &[Holder]| -> Vec<(String, Vec<String>)> {
        hs.iter().map(|h| (h.dn.clone(), h.spns.clone())).collect()
    };
    match &report.outcome {
        Outcome::Registered {
            account,
            spns,
            checked,
            ..
        } => {
            let body = output::registering(account, spns);
            if *checked {
                format!("{checking}\n{body}")
            } else {
                body
            }
        }
        Outcome::DuplicateFound {
            holders, checked, ..
        } => {
            let body = output::duplicate_found(&pairs(holders));
            if *checked {
                format!("{checking}{body}")
            } else {
                body
            }
        }
        Outcome::Unregistered { account, spns, .. } => output::unregistering(account, spns),
        Outcome::Listed { account } => output::registered(&account.dn, &account.spns),
        Outcome::Queried { accounts, .. } => {
            format!("{checking}{}", output::query(&pairs(accounts)))
        }
        Outcome::Duplicates { groups } => {
            let groups: Vec<(String, Vec<String>)> = groups
                .iter()
                .map(|g| (g.spn.clone(), g.accounts.clone()))
                .collect();
            format!("{checking}{}", output::duplicates(&groups))
        }
    }
}

/// Connects, runs the request, prints the result (text or JSON) and returns the exit code.
pub fn run_request(program: &str, conn: &ConnArgs, request: &Request, json: bool) -> u8 {
    let result = conn
        .connect()
        .map_err(|e| {
            (
                e.exit_code(),
                e.diagnosis(),
                Box::new(e) as Box<dyn std::error::Error>,
            )
        })
        .and_then(|dir| {
            execute(&dir, request).map_err(|e| {
                let diag = match &e {
                    SpnToolError::Directory(d) => d.diagnosis(),
                    _ => None,
                };
                (
                    e.exit_code(),
                    diag,
                    Box::new(e) as Box<dyn std::error::Error>,
                )
            })
        });
    match result {
        Ok(report) => {
            if let Err(code) = output::print_result(program, json, &report, || render_text(&report))
            {
                return code;
            }
            report.exit_code()
        }
        Err((code, diag, err)) => {
            if json {
                println!("{}", output::error_json(err.as_ref(), code, diag.as_ref()));
            } else {
                eprint!(
                    "{}",
                    output::error_report(program, err.as_ref(), diag.as_ref())
                );
            }
            code
        }
    }
}

/// `vmgate spn` arguments.
#[derive(Debug, Args)]
pub struct SpnArgs {
    /// The operation.
    #[command(subcommand)]
    pub command: SpnCommand,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// The account is a computer (setspn -C).
    #[arg(long, global = true, conflicts_with = "user")]
    pub computer: bool,
    /// The account is a user (setspn -U).
    #[arg(long, global = true)]
    pub user: bool,
    /// Directory connection.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `vmgate spn` operations.
#[derive(Debug, Subcommand)]
pub enum SpnCommand {
    /// Register an SPN on an account, after checking the domain for duplicates (setspn -S).
    Add {
        /// The SPN: class/host[:port][/name].
        #[arg(value_parser = parse_spn)]
        spn: Spn,
        /// The account: hv2, HV2$, alice or a DN.
        account: String,
        /// Do not check the domain for duplicates (setspn -A).
        #[arg(long)]
        no_check: bool,
    },
    /// Remove an SPN from an account (setspn -D).
    Delete {
        /// The SPN.
        #[arg(value_parser = parse_spn)]
        spn: Spn,
        /// The account.
        account: String,
    },
    /// List an account's SPNs (setspn -L).
    List {
        /// The account.
        account: String,
    },
    /// Find accounts whose SPNs match a pattern with * wildcards (setspn -Q).
    Query {
        /// The pattern, e.g. "*/hv2*".
        #[arg(value_parser = parse_pattern)]
        pattern: SpnPattern,
    },
    /// Find SPNs registered on more than one account (setspn -X).
    Duplicates,
    /// Register HOST/<name> and HOST/<dNSHostName> on a computer (setspn -R).
    Reset {
        /// The computer account.
        account: String,
    },
}

fn parse_spn(s: &str) -> Result<Spn, vmgate_auth::spn::SpnError> {
    Spn::parse(s)
}

fn parse_pattern(s: &str) -> Result<SpnPattern, vmgate_auth::spn::SpnError> {
    SpnPattern::parse(s)
}

impl SpnArgs {
    /// The request these arguments describe.
    pub fn request(&self) -> Request {
        let operation = match &self.command {
            SpnCommand::Add {
                spn,
                account,
                no_check,
            } => Operation::Add {
                spn: spn.clone(),
                account: account.clone(),
                check: !no_check,
            },
            SpnCommand::Delete { spn, account } => Operation::Delete {
                spn: spn.clone(),
                account: account.clone(),
            },
            SpnCommand::List { account } => Operation::List {
                account: account.clone(),
            },
            SpnCommand::Query { pattern } => Operation::Query {
                pattern: pattern.clone(),
            },
            SpnCommand::Duplicates => Operation::Duplicates,
            SpnCommand::Reset { account } => Operation::Reset {
                account: account.clone(),
            },
        };
        let mut request = Request::new(operation);
        request.kind = match (self.computer, self.user) {
            (true, _) => AccountKind::Computer,
            (false, true) => AccountKind::User,
            (false, false) => AccountKind::Any,
        };
        request
    }
}

/// Runs `vmgate spn`.
pub fn run(args: SpnArgs) -> ExitCode {
    exit::code(run_request(
        "vmgate spn",
        &args.conn,
        &args.request(),
        args.json,
    ))
}

/// Usage text of `setspn`.
pub const SETSPN_USAGE: &str = "\
Usage: setspn [modifiers switch] [accountname]
  accountname: hv2, HV2$, LAB\\hv2, hv2.lab.example.test, alice, or a DN

Edit mode switches:
  -R accountname       reset HOST ServicePrincipalName
  -S SPN accountname   add SPN after verifying no duplicates exist
  -A SPN accountname   add SPN without checking for duplicates
  -D SPN accountname   delete SPN
  -L accountname       list SPNs registered to the account
Edit mode modifiers:
  -C                   accountname is a computer account
  -U                   accountname is a user account
Query mode switches:
  -Q SPN               query for existence of SPN (* wildcards)
  -X                   search for duplicate SPNs
Query mode modifiers:
  -P                   accepted; no progress is printed anyway
  -F                   query at the forest level (one domain here)
  -T domain            query the given domain (\"\" or * for the current one)
Switches are case-insensitive and may start with - or /.

Connection (flags or variables):
  --ldap-url URL          VMGATE_LDAP_URL (ldaps://host[:port] or ldap://host[:port] + StartTLS)
  --ldap-ca FILE          VMGATE_LDAP_CA (PEM CAs to trust)
  --bind-user NAME        VMGATE_LDAP_BIND_USER (simple bind; Kerberos without it)
  --password-file FILE    VMGATE_LDAP_PASSWORD_FILE (first line is the password)
  --gssapi                bind with Kerberos (KRB5CCNAME) even when a bind user is set
  --insecure-skip-tls-verify  do not verify the DC's certificate (lab only)
";

/// What a `setspn` command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum SetspnCommand {
    /// `-?`, `/?`, `-h`, `--help`.
    Help,
    /// An operation, and the connection options (`--...`) to give to clap.
    Run {
        /// The request.
        request: Request,
        /// The `--` options, as given.
        conn_args: Vec<String>,
    },
}

/// A `setspn` command line that cannot be understood.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SetspnUsageError(pub String);

/// Connection options that take a value.
const VALUE_OPTIONS: [&str; 4] = ["--ldap-url", "--ldap-ca", "--bind-user", "--password-file"];

/// Parses Windows setspn's command line (without the program name).
///
/// Switches are one letter after `-` or `/`, in any case, in any order; a switch takes the
/// arguments that follow it (`-S SPN ACCOUNT`, `-T DOMAIN`). A lone account name means `-L`.
/// Options starting with `--` are connection options (see [`ConnArgs`]).
pub fn parse_setspn_args(args: &[String]) -> Result<SetspnCommand, SetspnUsageError> {
    let usage = |msg: String| Err(SetspnUsageError(msg));
    let mut conn_args = Vec::new();
    let mut mode: Option<(char, Vec<String>)> = None;
    let mut computer = false;
    let mut user = false;
    let mut forest = false;
    let mut target_domain = None;
    let mut positional: Vec<String> = Vec::new();
    let mut i = 0usize;
    let next = |i: &mut usize, what: &str, flag: char| -> Result<String, SetspnUsageError> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| SetspnUsageError(format!("-{flag} needs {what}")))
    };
    while let Some(arg) = args.get(i) {
        if arg == "--help" {
            return Ok(SetspnCommand::Help);
        }
        if arg.starts_with("--") {
            conn_args.push(arg.clone());
            if VALUE_OPTIONS.contains(&arg.as_str()) {
                i += 1;
                match args.get(i) {
                    Some(v) => conn_args.push(v.clone()),
                    None => return usage(format!("{arg} needs a value")),
                }
            }
            i += 1;
            continue;
        }
        let switch = match arg.strip_prefix(['-', '/']) {
            Some(rest) if rest.chars().count() == 1 => rest.chars().next(),
            _ => None,
        };
        let Some(letter) = switch.map(|c| c.to_ascii_uppercase()) else {
            if arg.starts_with('-') || arg.starts_with('/') {
                return usage(format!("unknown switch {arg}"));
            }
            positional.push(arg.clone());
            i += 1;
            continue;
        };
        match letter {
            '?' | 'H' => return Ok(SetspnCommand::Help),
            'C' => computer = true,
            'U' => user = true,
            'F' => forest = true,
            'P' => {}
            'T' => target_domain = Some(next(&mut i, "a domain", 'T')?),
            'R' | 'L' | 'A' | 'S' | 'D' | 'Q' | 'X' => {
                if let Some((previous, _)) = &mode {
                    return usage(format!(
                        "-{previous} and -{letter} cannot be combined: give one of -R -S -A -D -L -Q -X"
                    ));
                }
                let params = match letter {
                    'R' | 'L' => vec![next(&mut i, "an account name", letter)?],
                    'A' | 'S' | 'D' => vec![
                        next(&mut i, "an SPN and an account name", letter)?,
                        next(&mut i, "an account name after the SPN", letter)?,
                    ],
                    'Q' => vec![next(&mut i, "an SPN", letter)?],
                    _ => Vec::new(),
                };
                mode = Some((letter, params));
            }
            other => return usage(format!("unknown switch -{other}")),
        }
        i += 1;
    }
    if computer && user {
        return usage("-C and -U are exclusive".to_owned());
    }
    let mode = match (mode, positional.len()) {
        (Some(m), 0) => m,
        (None, 1) => ('L', positional.clone()),
        (None, 0) => return usage("no switch and no account name given".to_owned()),
        (_, _) => {
            return usage(format!(
                "unexpected argument {} (quote an SPN that has spaces)",
                positional.first().map(String::as_str).unwrap_or_default()
            ));
        }
    };
    let spn = |s: &str| Spn::parse(s).map_err(|e| SetspnUsageError(e.to_string()));
    let take = |k: usize| mode.1.get(k).cloned().unwrap_or_default();
    let operation = match mode.0 {
        'S' | 'A' => Operation::Add {
            spn: spn(&take(0))?,
            account: take(1),
            check: mode.0 == 'S',
        },
        'D' => Operation::Delete {
            spn: spn(&take(0))?,
            account: take(1),
        },
        'L' => Operation::List { account: take(0) },
        'R' => Operation::Reset { account: take(0) },
        'Q' => Operation::Query {
            pattern: SpnPattern::parse(&take(0)).map_err(|e| SetspnUsageError(e.to_string()))?,
        },
        _ => Operation::Duplicates,
    };
    Ok(SetspnCommand::Run {
        request: Request {
            operation,
            kind: match (computer, user) {
                (true, _) => AccountKind::Computer,
                (_, true) => AccountKind::User,
                _ => AccountKind::Any,
            },
            level: if forest {
                SearchLevel::Forest
            } else {
                SearchLevel::Domain
            },
            target_domain,
        },
        conn_args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIG: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";

    fn parse(args: &[&str]) -> Result<SetspnCommand, SetspnUsageError> {
        let v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        parse_setspn_args(&v)
    }

    fn request(args: &[&str]) -> Request {
        match parse(args).unwrap() {
            SetspnCommand::Run { request, .. } => request,
            SetspnCommand::Help => panic!("help"),
        }
    }

    #[test]
    fn parses_windows_switches_in_any_case_and_prefix() {
        let r = request(&["-S", MIG, "HV2"]);
        assert_eq!(
            r.operation,
            Operation::Add {
                spn: Spn::parse(MIG).unwrap(),
                account: "HV2".into(),
                check: true
            }
        );
        assert_eq!(r.kind, AccountKind::Any);
        let r = request(&["/a", MIG, "hv2$", "-c"]);
        assert!(matches!(r.operation, Operation::Add { check: false, .. }));
        assert_eq!(r.kind, AccountKind::Computer);
        assert_eq!(
            request(&["-d", "HOST/x", "CN=X,DC=lab"]).operation,
            Operation::Delete {
                spn: Spn::parse("HOST/x").unwrap(),
                account: "CN=X,DC=lab".into()
            }
        );
        assert_eq!(
            request(&["-L", "hv2"]).operation,
            Operation::List {
                account: "hv2".into()
            }
        );
        assert_eq!(
            request(&["hv2"]).operation,
            Operation::List {
                account: "hv2".into()
            }
        );
        let r = request(&["-T", "lab.example.test", "-F", "-Q", "*/hv2*", "-P"]);
        assert_eq!(
            r.operation,
            Operation::Query {
                pattern: SpnPattern::parse("*/hv2*").unwrap()
            }
        );
        assert_eq!(r.level, SearchLevel::Forest);
        assert_eq!(r.target_domain.as_deref(), Some("lab.example.test"));
        assert_eq!(request(&["-x"]).operation, Operation::Duplicates);
        assert_eq!(
            request(&["-U", "-R", "alice"]),
            Request {
                operation: Operation::Reset {
                    account: "alice".into()
                },
                kind: AccountKind::User,
                level: SearchLevel::Domain,
                target_domain: None
            }
        );
        assert_eq!(parse(&["-?"]).unwrap(), SetspnCommand::Help);
        assert_eq!(parse(&["/?"]).unwrap(), SetspnCommand::Help);
    }

    #[test]
    fn separates_connection_options() {
        match parse(&[
            "--ldap-url",
            "ldaps://127.0.0.10",
            "-L",
            "hv2",
            "--gssapi",
            "--ldap-ca=/ca.pem",
        ])
        .unwrap()
        {
            SetspnCommand::Run { conn_args, request } => {
                assert_eq!(
                    conn_args,
                    vec![
                        "--ldap-url",
                        "ldaps://127.0.0.10",
                        "--gssapi",
                        "--ldap-ca=/ca.pem"
                    ]
                );
                assert_eq!(
                    request.operation,
                    Operation::List {
                        account: "hv2".into()
                    }
                );
            }
            SetspnCommand::Help => panic!("help"),
        }
        assert!(parse(&["-L", "hv2", "--ldap-url"]).is_err());
    }

    #[test]
    fn rejects_bad_command_lines_with_a_reason() {
        let err = |args: &[&str]| parse(args).unwrap_err().0;
        assert_eq!(err(&[]), "no switch and no account name given");
        assert_eq!(err(&["-S", MIG]), "-S needs an account name after the SPN");
        assert_eq!(err(&["-L"]), "-L needs an account name");
        assert_eq!(err(&["-Z"]), "unknown switch -Z");
        assert_eq!(err(&["-SS"]), "unknown switch -SS");
        assert_eq!(err(&["-C", "-U", "-L", "x"]), "-C and -U are exclusive");
        assert!(err(&["-L", "a", "-X"]).contains("cannot be combined"));
        assert!(err(&["-L", "a", "b"]).contains("unexpected argument b"));
        assert_eq!(
            err(&["-S", "nonsense", "hv2"]),
            "\"nonsense\" is not an SPN: expected class/host[:port][/name]"
        );
        assert!(err(&["-Q", "a\\b"]).contains("backslash"));
    }

    fn report(outcome: Outcome) -> Report {
        Report {
            domain: "DC=lab,DC=example,DC=test".into(),
            level: SearchLevel::Domain,
            outcome,
        }
    }

    #[test]
    fn renders_setspn_text_and_exit_codes() {
        let dn = "CN=HV2,CN=Computers,DC=lab,DC=example,DC=test";
        let r = report(Outcome::Registered {
            account: dn.into(),
            spns: vec![MIG.into()],
            values_written: vec![],
            checked: true,
        });
        assert_eq!(
            render_text(&r),
            format!(
                "Checking domain DC=lab,DC=example,DC=test\n\nRegistering ServicePrincipalNames \
                 for {dn}\n\t{MIG}\nUpdated object\n"
            )
        );
        assert_eq!(r.exit_code(), exit::OK);
        let r = report(Outcome::DuplicateFound {
            spn: MIG.into(),
            holders: vec![Holder {
                dn: "CN=HV3,CN=Computers,DC=lab,DC=example,DC=test".into(),
                sam_account_name: "HV3$".into(),
                spns: vec![MIG.into()],
            }],
            checked: true,
        });
        assert_eq!(
            render_text(&r),
            format!(
                "Checking domain DC=lab,DC=example,DC=test\nCN=HV3,CN=Computers,DC=lab,DC=example,\
                 DC=test\n\t{MIG}\n\nDuplicate SPN found, aborting operation!\n"
            )
        );
        assert_eq!(r.exit_code(), exit::REFUSED);
        let r = report(Outcome::Queried {
            pattern: "x/*".into(),
            accounts: vec![],
        });
        assert_eq!(
            render_text(&r),
            "Checking domain DC=lab,DC=example,DC=test\n\nNo such SPN found.\n"
        );
        assert_eq!(r.exit_code(), exit::NOT_FOUND);
        let r = report(Outcome::Duplicates { groups: vec![] });
        assert_eq!(r.exit_code(), exit::OK);
        let json = serde_json::to_value(report(Outcome::Listed {
            account: Holder {
                dn: dn.into(),
                sam_account_name: "HV2$".into(),
                spns: vec![MIG.into()],
            },
        }))
        .unwrap();
        assert_eq!(json["result"], "listed");
        assert_eq!(json["account"]["spns"][0], MIG);
        assert_eq!(json["domain"], "DC=lab,DC=example,DC=test");
    }

    #[test]
    fn vmgate_spn_args_build_the_same_requests() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            spn: SpnArgs,
        }
        let cli =
            Cli::try_parse_from(["vmgate", "add", MIG, "hv2", "--no-check", "--computer"]).unwrap();
        let r = cli.spn.request();
        assert!(matches!(r.operation, Operation::Add { check: false, .. }));
        assert_eq!(r.kind, AccountKind::Computer);
        let cli = Cli::try_parse_from(["vmgate", "query", "*/hv2*", "--json"]).unwrap();
        assert!(cli.spn.json);
        assert!(Cli::try_parse_from(["vmgate", "add", "bad", "hv2"]).is_err());
    }
}
