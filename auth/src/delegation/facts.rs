//! The directory facts a delegation verdict is computed from, and the small pure helpers that
//! turn raw attribute values into them (userAccountControl bits, Samba's escaped SPN twins).
//!
//! Everything here is plain data: [`super::gather`] fills it from LDAP, the unit tests fill it
//! by hand, and [`super::analysis::analyze`] turns it into a verdict.

use std::fmt;

use serde::Serialize;

use crate::spn::{Spn, samba_twin, unescape_twin};

/// The service class of the migration SPN Hyper-V (and vmgate by default) uses.
pub const MIGRATION_SERVICE_CLASS: &str = "Microsoft Virtual System Migration Service";

/// The relative ID of the well-known "Protected Users" group (MS-DTYP 2.4.2.4).
pub const PROTECTED_USERS_RID: u32 = 525;

/// userAccountControl (MS-ADTS 2.2.16), with the bits delegation depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Uac(pub u32);

impl Uac {
    /// ACCOUNTDISABLE: the account is disabled.
    pub const ACCOUNTDISABLE: u32 = 0x0000_0002;
    /// LOCKOUT (in msDS-User-Account-Control-Computed): the account is locked out.
    pub const LOCKOUT: u32 = 0x0000_0010;
    /// NORMAL_ACCOUNT: a user account.
    pub const NORMAL_ACCOUNT: u32 = 0x0000_0200;
    /// WORKSTATION_TRUST_ACCOUNT: a computer (member) account.
    pub const WORKSTATION_TRUST_ACCOUNT: u32 = 0x0000_1000;
    /// SERVER_TRUST_ACCOUNT: a domain controller.
    pub const SERVER_TRUST_ACCOUNT: u32 = 0x0000_2000;
    /// TRUSTED_FOR_DELEGATION: unconstrained delegation ("Trust this computer for delegation
    /// to any service").
    pub const TRUSTED_FOR_DELEGATION: u32 = 0x0008_0000;
    /// NOT_DELEGATED: "Account is sensitive and cannot be delegated".
    pub const NOT_DELEGATED: u32 = 0x0010_0000;
    /// TRUSTED_TO_AUTH_FOR_DELEGATION: protocol transition ("Use any authentication protocol").
    pub const TRUSTED_TO_AUTH_FOR_DELEGATION: u32 = 0x0100_0000;

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    /// The value with `bits` set (`on`) or cleared.
    #[must_use]
    pub const fn with(self, bits: u32, on: bool) -> Uac {
        if on {
            Uac(self.0 | bits)
        } else {
            Uac(self.0 & !bits)
        }
    }

    /// TRUSTED_FOR_DELEGATION (unconstrained delegation).
    pub const fn unconstrained(self) -> bool {
        self.has(Self::TRUSTED_FOR_DELEGATION)
    }

    /// TRUSTED_TO_AUTH_FOR_DELEGATION (protocol transition, "use any authentication protocol").
    pub const fn protocol_transition(self) -> bool {
        self.has(Self::TRUSTED_TO_AUTH_FOR_DELEGATION)
    }

    /// NOT_DELEGATED ("sensitive and cannot be delegated").
    pub const fn not_delegated(self) -> bool {
        self.has(Self::NOT_DELEGATED)
    }

    /// ACCOUNTDISABLE.
    pub const fn disabled(self) -> bool {
        self.has(Self::ACCOUNTDISABLE)
    }

    /// The names of the delegation-related bits that are set, in a fixed order.
    pub fn delegation_flag_names(self) -> Vec<&'static str> {
        [
            (Self::TRUSTED_FOR_DELEGATION, "TRUSTED_FOR_DELEGATION"),
            (
                Self::TRUSTED_TO_AUTH_FOR_DELEGATION,
                "TRUSTED_TO_AUTH_FOR_DELEGATION",
            ),
            (Self::NOT_DELEGATED, "NOT_DELEGATED"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.has(*bit))
        .map(|(_, name)| name)
        .collect()
    }
}

impl fmt::Display for Uac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:08X}", self.0)
    }
}

/// Which kind of domain controller holds the directory: it decides whether SPNs with spaces
/// need their escaped twin stored (Samba's KDC looks them up by the escaped text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryKind {
    /// Samba AD: SPNs with spaces are stored twice, plain and escaped (`a\ b/host`).
    Samba,
    /// Windows AD: the plain form is enough.
    Windows,
}

impl DirectoryKind {
    /// Whether this directory's KDC needs the escaped twin of `spn` stored.
    pub fn needs_twin(self, spn: &str) -> bool {
        self == DirectoryKind::Samba && twin_of(spn).is_some()
    }
}

/// The escaped twin Samba's KDC needs for `spn` (see [`crate::spn`]), or `None` when the SPN
/// has nothing to escape or is not a well-formed SPN.
pub fn twin_of(spn: &str) -> Option<String> {
    Spn::parse(spn).ok().and_then(|s| samba_twin(&s))
}

/// One entry of msDS-AllowedToDelegateTo with its Samba twin collapsed into it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DelegateTo {
    /// The plain SPN (with spaces, as Windows stores it).
    pub spn: String,
    /// The plain form is stored.
    pub plain: bool,
    /// The escaped form is stored (for an SPN without spaces: same as `plain`).
    pub escaped: bool,
}

impl DelegateTo {
    /// Whether the KDC of `kind` will honour this entry.
    pub fn effective(&self, kind: DirectoryKind) -> bool {
        if kind.needs_twin(&self.spn) {
            self.escaped
        } else {
            self.plain || self.escaped
        }
    }
}

/// Collapses the raw values of msDS-AllowedToDelegateTo: each plain SPN and its escaped twin
/// become one [`DelegateTo`]. Comparison ignores ASCII case (SPNs are case-insensitive). The
/// order is that of each SPN's first appearance.
pub fn collapse_twins<S: AsRef<str>>(values: &[S]) -> Vec<DelegateTo> {
    let mut out: Vec<DelegateTo> = Vec::new();
    for value in values {
        let value = value.as_ref();
        let (plain, was_escaped) = match unescape_twin(value) {
            Some(plain) => (plain, true),
            None => (value.to_owned(), false),
        };
        let has_twin = twin_of(&plain).is_some();
        let entry = match out.iter_mut().find(|e| e.spn.eq_ignore_ascii_case(&plain)) {
            Some(e) => e,
            None => {
                out.push(DelegateTo {
                    spn: plain,
                    plain: false,
                    escaped: false,
                });
                match out.last_mut() {
                    Some(e) => e,
                    None => continue,
                }
            }
        };
        if !has_twin {
            entry.plain = true;
            entry.escaped = true;
        } else if was_escaped {
            entry.escaped = true;
        } else {
            entry.plain = true;
        }
    }
    out
}

/// A delegating (source) account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceAccount {
    /// The host's short name, as commands name it (`hv1`).
    pub host: String,
    /// The account (`HV1$`).
    pub account: String,
    /// Its userAccountControl.
    pub uac: Uac,
    /// msDS-AllowedToDelegateTo, twins collapsed.
    pub allowed_to: Vec<DelegateTo>,
}

impl SourceAccount {
    /// The entry for `spn` (case-insensitive), if listed in any form.
    pub fn delegate_entry(&self, spn: &str) -> Option<&DelegateTo> {
        self.allowed_to
            .iter()
            .find(|e| e.spn.eq_ignore_ascii_case(spn))
    }
}

/// The destination host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetHost {
    /// Short name (`hv2`).
    pub short: String,
    /// Fully qualified name (`hv2.lab.example.test`), from dNSHostName.
    pub fqdn: String,
    /// The account (`HV2$`).
    pub account: String,
}

/// Which accounts hold one of the destination's migration SPNs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpnHolders {
    /// The plain SPN.
    pub spn: String,
    /// Accounts (sAMAccountName) whose servicePrincipalName holds the plain form.
    pub plain: Vec<String>,
    /// Accounts holding the escaped twin (for an SPN without spaces: the same as `plain`).
    pub escaped: Vec<String>,
}

impl SpnHolders {
    /// The distinct accounts holding the SPN in either form (case-insensitive), in order.
    pub fn accounts(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for a in self.plain.iter().chain(self.escaped.iter()) {
            if !out.iter().any(|o| o.eq_ignore_ascii_case(a)) {
                out.push(a);
            }
        }
        out
    }
}

/// The user a move is started as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UserFacts {
    /// sAMAccountName (`alice`).
    pub name: String,
    /// userAccountControl.
    pub uac: Uac,
    /// Locked out (msDS-User-Account-Control-Computed LOCKOUT).
    pub locked: bool,
    /// Member (directly or through nested groups) of Protected Users (RID 525).
    pub protected_users: bool,
}

/// How the source host authenticates to the destination on the user's behalf (the host's
/// auth type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthType {
    /// Kerberos: the user's own ticket on the source, or constrained delegation (S4U2Proxy).
    #[default]
    Kerberos,
    /// CredSSP: the user's full credentials must be on the source.
    Credssp,
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthType::Kerberos => "kerberos",
            AuthType::Credssp => "credssp",
        })
    }
}

/// How the move is started, which decides what the source holds of the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MoveStart {
    /// The user runs the move on the source itself; the CLI hands the daemon the user's own
    /// ticket ("logged on to the source"). No delegation is needed.
    #[default]
    OnSource,
    /// The user starts the move from elsewhere and authenticates to the source with Kerberos:
    /// the source holds the user's (forwardable) service ticket, which is the evidence for
    /// S4U2Proxy — "Kerberos only" is enough.
    RemoteWithTicket,
    /// The source holds no ticket from the user (a queued job, a logon without Kerberos): it
    /// must obtain one itself with S4U2Self, which needs protocol transition.
    RemoteWithoutTicket,
    /// CredSSP only: the user forwards their credentials (a TGT) to the source explicitly.
    RemoteForwardingCredentials,
}

/// Everything the delegation verdict depends on, read from the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DelegationFacts {
    /// Samba or Windows (whether escaped twins matter).
    pub directory: DirectoryKind,
    /// The migration service class (default [`MIGRATION_SERVICE_CLASS`]).
    pub service_class: String,
    /// The source host's account.
    pub source: SourceAccount,
    /// The destination host.
    pub target: TargetHost,
    /// The holders of the destination's migration SPNs: the FQDN form first, then the short
    /// form. Forms not listed here are treated as not registered.
    pub target_spns: Vec<SpnHolders>,
    /// The user, when the check is about one (`None`: only host-level requirements).
    pub user: Option<UserFacts>,
    /// The source host's auth type.
    pub auth: AuthType,
    /// How the move is started.
    pub start: MoveStart,
    /// Whether the KDC refuses to delegate members of Protected Users (Windows DCs do; Samba's
    /// KDC before 4.19 does not, see [`protected_users_enforced`]).
    pub protected_users_enforced: bool,
}

impl DelegationFacts {
    /// The destination's migration SPNs this check is about, FQDN form first.
    pub fn migration_spns(&self) -> [String; 2] {
        migration_spns(&self.service_class, &self.target.short, &self.target.fqdn)
    }

    /// The holders recorded for `spn` (case-insensitive).
    pub fn holders(&self, spn: &str) -> Option<&SpnHolders> {
        self.target_spns
            .iter()
            .find(|h| h.spn.eq_ignore_ascii_case(spn))
    }
}

/// Whether a DC enforces "Protected Users" for delegation: every Windows DC; Samba from 4.19
/// (its Heimdal KDC before that ignores the group, as observed with 4.17). `vendor_version` is
/// the rootDSE's `vendorVersion` (`4.17.12-Debian`); an unreadable Samba version counts as
/// enforcing, the safe side.
pub fn protected_users_enforced(kind: DirectoryKind, vendor_version: Option<&str>) -> bool {
    if kind == DirectoryKind::Windows {
        return true;
    }
    let Some(v) = vendor_version else {
        return true;
    };
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) >= (4, 19),
        _ => true,
    }
}

/// `<class>/<fqdn>` and `<class>/<short>`, in that order (the FQDN form is what vmgate asks for
/// first; Hyper-V registers both).
pub fn migration_spns(service_class: &str, short: &str, fqdn: &str) -> [String; 2] {
    [
        format!("{service_class}/{fqdn}"),
        format!("{service_class}/{short}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";
    const M_ESC: &str = r"Microsoft\ Virtual\ System\ Migration\ Service/hv2.lab.example.test";

    #[test]
    fn twins_follow_the_spn_module() {
        assert_eq!(twin_of(M).as_deref(), Some(M_ESC));
        assert_eq!(twin_of("cifs/hv2"), None);
        assert_eq!(twin_of("not an spn"), None);
        assert!(DirectoryKind::Samba.needs_twin(M));
        assert!(!DirectoryKind::Windows.needs_twin(M));
        assert!(!DirectoryKind::Samba.needs_twin("cifs/hv2"));
    }

    #[test]
    fn collapse_merges_twins_case_insensitively() {
        let values = [M, "cifs/hv2", M_ESC, "CIFS/HV2", "a b/x"];
        let got = collapse_twins(&values);
        assert_eq!(
            got,
            vec![
                DelegateTo {
                    spn: M.into(),
                    plain: true,
                    escaped: true
                },
                DelegateTo {
                    spn: "cifs/hv2".into(),
                    plain: true,
                    escaped: true
                },
                DelegateTo {
                    spn: "a b/x".into(),
                    plain: true,
                    escaped: false
                },
            ]
        );
        assert!(got[0].effective(DirectoryKind::Samba));
        assert!(!got[2].effective(DirectoryKind::Samba));
        assert!(got[2].effective(DirectoryKind::Windows));
        let only_escaped = collapse_twins(&[M_ESC]);
        assert_eq!(only_escaped[0].spn, M);
        assert!(!only_escaped[0].plain && only_escaped[0].escaped);
    }

    #[test]
    fn protected_users_enforcement_by_dc() {
        use DirectoryKind::{Samba, Windows};
        assert!(protected_users_enforced(Windows, None));
        assert!(!protected_users_enforced(Samba, Some("4.17.12-Debian")));
        assert!(!protected_users_enforced(Samba, Some("4.18.0")));
        assert!(protected_users_enforced(Samba, Some("4.19.5-Ubuntu")));
        assert!(protected_users_enforced(Samba, Some("5.0.0")));
        assert!(protected_users_enforced(Samba, Some("garbage")));
        assert!(protected_users_enforced(Samba, None));
    }

    #[test]
    fn uac_bits() {
        let u = Uac(0x200 | Uac::NOT_DELEGATED);
        assert!(u.not_delegated() && !u.protocol_transition() && !u.unconstrained());
        assert_eq!(u.delegation_flag_names(), vec!["NOT_DELEGATED"]);
        let u = u
            .with(Uac::NOT_DELEGATED, false)
            .with(Uac::TRUSTED_TO_AUTH_FOR_DELEGATION, true);
        assert_eq!(u, Uac(0x0100_0200));
        assert_eq!(u.to_string(), "0x01000200");
    }

    #[test]
    fn holders_accounts_are_distinct() {
        let h = SpnHolders {
            spn: M.into(),
            plain: vec!["HV2$".into(), "HV3$".into()],
            escaped: vec!["hv2$".into()],
        };
        assert_eq!(h.accounts(), vec!["HV2$", "HV3$"]);
    }
}
