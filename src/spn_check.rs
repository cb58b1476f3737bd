//! The SPN self-check at start: the host's two migration SPNs,
//! `Microsoft Virtual System Migration Service/<short>` and `.../<fqdn>`, must be registered on
//! its own computer account, or no one can get a ticket to move a VM here (0x80090303).
//!
//! Like Hyper-V's VMMS, the daemon registers a missing SPN itself when its account may, and
//! otherwise logs event 14050 with the exact command that fixes it, and keeps running:
//!
//! ```text
//! setspn -S "Microsoft Virtual System Migration Service/hv2.lab.example.test" HV2$
//! ```
//!
//! # Who may register (measured on Samba 4.17)
//!
//! A computer account may write its own `servicePrincipalName` through the "Validated write to
//! service principal name" right that AD's default security descriptor grants to SELF. Samba
//! checks that right as Windows does: the **service class is free** (the migration class is
//! accepted, and so is its escaped twin), but the **host part must be the account's
//! `dNSHostName` or its short name**; anything else is refused with a constraint violation
//! ("acl: spn validation failed"). So with default ACLs a host registers its migration SPNs
//! itself. When an administrator removed that right (a deny ACE for SELF, as hardened domains
//! do), the write is refused with "insufficient access rights" and the daemon logs 14050.
//!
//! # Connection
//!
//! The directory is read and written with the host's own identity: a GSSAPI bind with the
//! process's Kerberos credentials, which the daemon points at its keytab (`KRB5_CLIENT_KTNAME`)
//! and a private in-memory cache before it starts any thread. On `ldap://` the bind negotiates
//! Kerberos sealing, so nothing travels in clear.

use vmgate_auth::directory::{
    Account, AccountKind, Bind, Directory, DirectoryConfig, DirectoryError,
};
use vmgate_auth::spn::Spn;

use vmgate_control::api::host::{SpnState, SpnStatus as Shown};
use vmgate_control::config::Config;
use vmgate_control::error::chain;

use crate::events::{Event, EventLog};

/// Errors of the SPN self-check that stop it before any SPN was looked at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpnCheckError {
    /// The configured SPNs are malformed (a bad `spn_class` or host name).
    #[error("the migration SPNs cannot be formed from the configuration")]
    BadSpn(#[source] vmgate_auth::spn::SpnError),
    /// The directory could not be reached or the bind failed.
    #[error("cannot connect to the directory as the host")]
    Connect(#[source] Box<DirectoryError>),
    /// The host's account could not be read.
    #[error("cannot read the computer account {account}")]
    Account {
        /// The account.
        account: String,
        /// Why.
        #[source]
        source: Box<DirectoryError>,
    },
}

/// What became of one SPN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpnStatus {
    /// It was registered on the host's account already.
    Present,
    /// It was missing and the daemon registered it.
    RegisteredNow,
    /// It is missing and could not be registered.
    Missing {
        /// Why it could not be registered.
        reason: String,
        /// The command that fixes it.
        fix: String,
    },
}

/// The result of the self-check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpnReport {
    /// The computer account (`HV2$`).
    pub account: String,
    /// Each migration SPN and what became of it (short name first).
    pub spns: Vec<(Spn, SpnStatus)>,
}

impl SpnReport {
    /// Whether both SPNs are registered now.
    pub fn all_registered(&self) -> bool {
        self.spns
            .iter()
            .all(|(_, s)| !matches!(s, SpnStatus::Missing { .. }))
    }

    /// The states for `host_show`.
    pub fn states(&self) -> Vec<SpnState> {
        self.spns
            .iter()
            .map(|(spn, s)| SpnState {
                spn: spn.to_string(),
                state: match s {
                    SpnStatus::Present => Shown::Registered,
                    SpnStatus::RegisteredNow => Shown::RegisteredNow,
                    SpnStatus::Missing { .. } => Shown::Missing,
                },
            })
            .collect()
    }

    /// The events that report it: 14052 when all were present, 14051 for each registered now,
    /// 14050 for each missing one.
    pub fn events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for (spn, status) in &self.spns {
            match status {
                SpnStatus::Present => {}
                SpnStatus::RegisteredNow => out.push(Event::SpnRegistered {
                    account: self.account.clone(),
                    spn: spn.to_string(),
                }),
                SpnStatus::Missing { reason, fix } => out.push(Event::SpnNotRegistered {
                    account: self.account.clone(),
                    spn: spn.to_string(),
                    reason: reason.clone(),
                    fix: fix.clone(),
                }),
            }
        }
        if self.all_registered() {
            out.push(Event::SpnOk {
                account: self.account.clone(),
                spns: self.spns.iter().map(|(s, _)| s.to_string()).collect(),
            });
        }
        out
    }
}

/// The command that registers `spn` on `account` (Windows `setspn`, also shipped by vmgate).
pub fn fix_command(spn: &Spn, account: &str) -> String {
    format!("setspn -S \"{spn}\" {account}")
}

/// Why a registration was refused, in an administrator's terms.
pub fn refusal_reason(err: &DirectoryError, account: &str) -> String {
    match err {
        DirectoryError::AccessDenied { text, .. } => format!(
            "the directory denied {account} the right to write its own servicePrincipalName \
             (\"Validated write to service principal name\" is not granted to SELF on the \
             account: {text})"
        ),
        // Constraint violation: for a computer's own SPN, AD's "Validated write to service
        // principal name" admits only its dNSHostName or short name as the host part.
        DirectoryError::Refused { code: 19, text, .. } => format!(
            "the directory refused the SPN as a constraint violation: a computer may register \
             only SPNs whose host part is the account's dNSHostName or short name ({text})"
        ),
        DirectoryError::SpnNotUnique { text, .. } => {
            format!("the SPN is registered on another account ({text})")
        }
        other => chain(other),
    }
}

/// Checks (and, when `register`, registers) the migration SPNs on `account_name` through an
/// open directory connection bound as the host.
pub fn check_on(
    dir: &Directory,
    account_name: &str,
    spns: &[Spn],
    register: bool,
) -> Result<SpnReport, SpnCheckError> {
    let read = |dir: &Directory| -> Result<Account, SpnCheckError> {
        dir.find_account_by_name(account_name, AccountKind::Computer)
            .map_err(|source| SpnCheckError::Account {
                account: account_name.to_owned(),
                source: Box::new(source),
            })
    };
    let mut account = read(dir)?;
    let mut out = Vec::new();
    for spn in spns {
        if account.has_spn(spn) {
            out.push((spn.clone(), SpnStatus::Present));
            continue;
        }
        let fix = fix_command(spn, account_name);
        // Held by another account? Registering would be refused (and would be wrong).
        let others: Vec<String> = match dir.spn_holders(spn) {
            Ok(holders) => holders
                .into_iter()
                .filter(|h| !h.dn.eq_ignore_ascii_case(&account.dn))
                .map(|h| h.sam_account_name)
                .collect(),
            Err(_) => Vec::new(),
        };
        if !others.is_empty() {
            let removal: Vec<String> = others
                .iter()
                .map(|o| format!("setspn -D \"{spn}\" {o}"))
                .collect();
            out.push((
                spn.clone(),
                SpnStatus::Missing {
                    reason: format!(
                        "it is registered on another account ({}), so tickets for it are \
                         encrypted for that account",
                        others.join(", ")
                    ),
                    fix: format!("{}; then {fix}", removal.join("; ")),
                },
            ));
            continue;
        }
        if !register {
            out.push((
                spn.clone(),
                SpnStatus::Missing {
                    reason: "automatic registration is off (register_spns = false)".to_owned(),
                    fix,
                },
            ));
            continue;
        }
        match dir.register_spn(&account, spn) {
            Ok(_) => {
                out.push((spn.clone(), SpnStatus::RegisteredNow));
                // The next add must see the values just written.
                account = read(dir)?;
            }
            Err(e) => out.push((
                spn.clone(),
                SpnStatus::Missing {
                    reason: refusal_reason(&e, account_name),
                    fix,
                },
            )),
        }
    }
    Ok(SpnReport {
        account: account_name.to_owned(),
        spns: out,
    })
}

/// The self-check as the daemon runs it at start: connects to the configured directory as the
/// host (GSSAPI with the process's credentials), checks and registers, and logs the events.
/// Never fails the daemon: when the check cannot run, event 14053 says why and the SPNs are
/// reported as unknown.
pub fn run(config: &Config, events: &EventLog) -> Result<SpnReport, SpnCheckError> {
    let result = check(config);
    match &result {
        Ok(report) => {
            for e in report.events() {
                events.emit(e);
            }
        }
        Err(e) => {
            events.emit(Event::SpnUnchecked {
                account: config.account.clone(),
                reason: chain(e),
            });
        }
    }
    result
}

fn check(config: &Config) -> Result<SpnReport, SpnCheckError> {
    let spns = config.migration_spns().map_err(SpnCheckError::BadSpn)?;
    let dir = Directory::connect(&DirectoryConfig::new(
        config.directory.url.clone(),
        config.directory.ca_file.clone(),
        Bind::Gssapi,
    ))
    .map_err(|e| SpnCheckError::Connect(Box::new(e)))?;
    check_on(&dir, &config.account, &spns, config.register_spns)
}

/// The states to show when the check could not run.
pub fn unknown_states(config: &Config) -> Vec<SpnState> {
    match config.migration_spns() {
        Ok(spns) => spns
            .iter()
            .map(|s| SpnState {
                spn: s.to_string(),
                state: Shown::Unknown,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(host: &str) -> Spn {
        Spn::new(vmgate_control::MIGRATION_SERVICE_CLASS, host).unwrap()
    }

    #[test]
    fn the_fix_is_the_exact_setspn_command() {
        assert_eq!(
            fix_command(&spn("hv2.lab.example.test"), "HV2$"),
            "setspn -S \"Microsoft Virtual System Migration Service/hv2.lab.example.test\" HV2$"
        );
    }

    #[test]
    fn reports_become_events() {
        let report = SpnReport {
            account: "HV2$".into(),
            spns: vec![
                (spn("hv2"), SpnStatus::RegisteredNow),
                (
                    spn("hv2.lab.example.test"),
                    SpnStatus::Missing {
                        reason: "denied".into(),
                        fix: fix_command(&spn("hv2.lab.example.test"), "HV2$"),
                    },
                ),
            ],
        };
        assert!(!report.all_registered());
        let ids: Vec<u32> = report.events().iter().map(Event::id).collect();
        assert_eq!(ids, [14051, 14050]);
        assert_eq!(
            report
                .states()
                .iter()
                .map(|s| s.state.as_str())
                .collect::<Vec<_>>(),
            ["registered_now", "missing"]
        );
        let ok = SpnReport {
            account: "HV2$".into(),
            spns: vec![
                (spn("hv2"), SpnStatus::Present),
                (spn("hv2.lab.example.test"), SpnStatus::Present),
            ],
        };
        let events = ok.events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id(), 14052);
    }

    #[test]
    fn refusals_are_explained() {
        let denied = DirectoryError::AccessDenied {
            op: "modify".into(),
            dn: "CN=HV2".into(),
            text: "insufficient access rights".into(),
        };
        let r = refusal_reason(&denied, "HV2$");
        assert!(
            r.starts_with(
                "the directory denied HV2$ the right to write its own servicePrincipalName"
            ),
            "{r}"
        );
        let validation = DirectoryError::Refused {
            op: "modify".into(),
            dn: "CN=HV2".into(),
            code: 19,
            text: "acl: spn validation failed for spn[x/other]".into(),
        };
        assert!(
            refusal_reason(&validation, "HV2$")
                .contains("host part is the account's dNSHostName or short name")
        );
    }
}
