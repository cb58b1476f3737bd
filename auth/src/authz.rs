//! Authorization of an authenticated peer: a local principal list or (recursive) AD group membership.
//!
//! The destination authorizes **the user**, not the source host (DESIGN.md §3): after Kerberos
//! says who the peer is ([`PeerAuthenticated`]), [`Authorizer::authorize`] checks the principal
//! against the host's local allow-list and then against the configured AD groups (default
//! "Hyper-V Administrators"), membership through nested groups included. Only a successful
//! check creates the zero-sized [`Authorized`] proof that the daemon's dispatch requires.
//!
//! Group membership comes from a [`GroupDirectory`]; [`LdapGroups`] implements it with the
//! directory client ([`crate::directory`]) using the **host's own** credentials: a GSSAPI bind
//! with the process's Kerberos credentials (a host process points `KRB5_CLIENT_KTNAME` at its
//! keytab and `KRB5CCNAME` at a private cache for itself — each host is its own process), or a
//! simple bind over TLS with an account the administrator gave it.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::channel::PeerAuthenticated;
use crate::directory::{AccountKind, Directory, DirectoryConfig, DirectoryError};
use crate::krb::Principal;
use crate::krb::diagnose::quote;
use crate::winerr::{Diagnosis, WinCode};

/// The group Hyper-V uses, and vmgate's default.
pub const DEFAULT_GROUP: &str = "Hyper-V Administrators";

/// Errors of group lookups.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The directory could not be asked.
    #[error("could not look up group membership in the directory")]
    Directory(#[source] Box<DirectoryError>),
    /// The configured group does not exist.
    #[error("the group \"{0}\" does not exist in the directory")]
    NoSuchGroup(String),
    /// The user does not exist.
    #[error("the account \"{0}\" does not exist in the directory")]
    NoSuchUser(String),
    /// A direct LDAP operation failed.
    #[error("the directory lookup failed: {0}")]
    Ldap(String),
}

/// Answers "is this principal (transitively) a member of that group?".
pub trait GroupDirectory: Send + Sync + fmt::Debug {
    /// Whether `user` is a member of the group named `group` (sAMAccountName, CN or DN),
    /// directly or through nested groups.
    fn is_member(&self, user: &Principal, group: &str) -> Result<bool, AuthzError>;
}

/// Proof that the peer passed authorization. Only [`Authorizer::authorize`] creates it.
#[derive(Debug)]
pub struct Authorized {
    _private: (),
}

/// Who may use this host.
#[derive(Clone, Debug)]
pub struct Authorizer {
    host: String,
    principals: Vec<Principal>,
    groups: Vec<String>,
    directory: Option<Arc<dyn GroupDirectory>>,
}

impl Authorizer {
    /// Nobody is allowed yet; `host` names this host in messages (`hv2`).
    pub fn new(host: impl Into<String>) -> Authorizer {
        Authorizer {
            host: host.into(),
            principals: Vec::new(),
            groups: Vec::new(),
            directory: None,
        }
    }

    /// Allows one principal (local allow-list).
    #[must_use]
    pub fn allow_principal(mut self, p: Principal) -> Authorizer {
        self.principals.push(p);
        self
    }

    /// Allows the members of an AD group, looked up in `directory`.
    #[must_use]
    pub fn allow_group(
        mut self,
        group: impl Into<String>,
        directory: Arc<dyn GroupDirectory>,
    ) -> Authorizer {
        self.groups.push(group.into());
        self.directory = Some(directory);
        self
    }

    /// The configured groups.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Checks the authenticated peer. A denial is E_ACCESSDENIED naming the groups and the fix.
    pub fn authorize(&self, peer: &PeerAuthenticated) -> Result<Authorized, Diagnosis> {
        self.authorize_principal(peer.principal())
    }

    fn authorize_principal(&self, user: &Principal) -> Result<Authorized, Diagnosis> {
        if self.principals.iter().any(|p| p.same_as(user)) {
            return Ok(Authorized { _private: () });
        }
        let mut lookup_failures = Vec::new();
        if let Some(dir) = &self.directory {
            for g in &self.groups {
                match dir.is_member(user, g) {
                    Ok(true) => return Ok(Authorized { _private: () }),
                    Ok(false) => {}
                    Err(e) => lookup_failures.push(format!("\"{g}\": {e}{}", source_text(&e))),
                }
            }
        }
        Err(self.denial(user, &lookup_failures))
    }

    fn denial(&self, user: &Principal, failures: &[String]) -> Diagnosis {
        let name = user.name();
        let mut cause = format!(
            "{user} authenticated, but is not allowed to use {}: ",
            self.host
        );
        match (self.groups.as_slice(), self.principals.is_empty()) {
            ([], true) => cause.push_str("no principal and no group is allowed on this host"),
            ([], false) => cause.push_str(&format!(
                "{user} is not in {}'s list of allowed principals",
                self.host
            )),
            (groups, _) => {
                let list = groups
                    .iter()
                    .map(|g| format!("\"{g}\""))
                    .collect::<Vec<_>>()
                    .join(" or ");
                cause.push_str(&format!(
                    "{name} is not a member of {list} (directly or through nested groups){}",
                    if self.principals.is_empty() {
                        String::new()
                    } else {
                        format!(" and not in {}'s list of allowed principals", self.host)
                    }
                ));
            }
        }
        if !failures.is_empty() {
            cause.push_str(&format!(
                "\nthe directory could not be asked about {}",
                failures.join("; ")
            ));
        }
        let fix = match self.groups.first() {
            Some(g) => format!(
                "samba-tool group addmembers {} {}   (Windows: Add-ADGroupMember -Identity {} -Members {})\nthe user then gets a new ticket: kdestroy; kinit {user}",
                quote(g),
                quote(name),
                quote(g),
                quote(name)
            ),
            None => format!("add {user} to {}'s allowed principals", self.host),
        };
        Diagnosis::new(WinCode::AccessDenied, cause).with_fix(fix)
    }
}

fn source_text(e: &AuthzError) -> String {
    use std::error::Error as _;
    e.source().map(|s| format!(" ({s})")).unwrap_or_default()
}

/// Where [`LdapGroups`] asks.
#[derive(Clone, Debug)]
pub enum LdapSource {
    /// Through the directory client ([`crate::directory`]): LDAPS or StartTLS, with its bind.
    Directory(DirectoryConfig),
    /// Plain `ldap://` with a SASL GSSAPI bind and GSSAPI **sealing** (every request and answer
    /// encrypted and integrity-protected by Kerberos), as the process's Kerberos credentials
    /// (`KRB5_CLIENT_KTNAME` / `KRB5CCNAME`: a host's own keytab). Samba refuses a GSSAPI bind
    /// without sign/seal over TLS ("Sign or Seal are required"), and ldap3 negotiates neither
    /// over TLS, so a host that binds with its own Kerberos identity uses this.
    SealedGssapi {
        /// `ldap://host[:port]`.
        url: String,
        /// The host for the SPN `ldap/<host>` (the DC's address or name as registered).
        spn_host: String,
        /// Limit for each operation.
        timeout: std::time::Duration,
    },
}

/// Group membership from the AD directory (LDAP_MATCHING_RULE_IN_CHAIN), with one reconnect
/// when the connection has dropped.
pub struct LdapGroups {
    source: LdapSource,
    conn: Mutex<Option<Conn>>,
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per group directory; ldap3's blocking connection embeds a tokio runtime"
)]
enum Conn {
    Directory(Directory),
    Sealed {
        ldap: ldap3::LdapConn,
        base_dn: String,
    },
}

impl fmt::Debug for LdapGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdapGroups")
            .field("source", &self.source)
            .finish()
    }
}

fn ldap_err(what: &str, e: impl fmt::Display) -> AuthzError {
    AuthzError::Ldap(format!("{what}: {e}"))
}

impl LdapGroups {
    /// Connects lazily on the first lookup, through the directory client.
    pub fn new(config: DirectoryConfig) -> LdapGroups {
        LdapGroups::with_source(LdapSource::Directory(config))
    }

    /// Connects lazily on the first lookup.
    pub fn with_source(source: LdapSource) -> LdapGroups {
        LdapGroups {
            source,
            conn: Mutex::new(None),
        }
    }

    fn connect(&self) -> Result<Conn, AuthzError> {
        match &self.source {
            LdapSource::Directory(cfg) => Directory::connect(cfg)
                .map(Conn::Directory)
                .map_err(|e| AuthzError::Directory(Box::new(e))),
            LdapSource::SealedGssapi {
                url,
                spn_host,
                timeout,
            } => {
                if !url.starts_with("ldap://") {
                    return Err(AuthzError::Ldap(format!(
                        "{url}: a sealed GSSAPI bind needs an ldap:// URL"
                    )));
                }
                let settings = ldap3::LdapConnSettings::new().set_conn_timeout(*timeout);
                let mut ldap =
                    ldap3::LdapConn::with_settings(settings, url).map_err(|e| ldap_err(url, e))?;
                let res = ldap
                    .with_timeout(*timeout)
                    .sasl_gssapi_bind(spn_host)
                    .map_err(|e| {
                        ldap_err(&format!("GSSAPI bind to {url} as ldap/{spn_host}"), e)
                    })?;
                if res.rc != 0 {
                    return Err(AuthzError::Ldap(format!(
                        "GSSAPI bind to {url} as ldap/{spn_host}: {} (LDAP result {})",
                        res.text, res.rc
                    )));
                }
                let (entries, _) = ldap
                    .with_timeout(*timeout)
                    .search(
                        "",
                        ldap3::Scope::Base,
                        "(objectClass=*)",
                        vec!["defaultNamingContext"],
                    )
                    .and_then(|r| r.success())
                    .map_err(|e| ldap_err("reading the rootDSE", e))?;
                let base_dn = entries
                    .into_iter()
                    .next()
                    .map(ldap3::SearchEntry::construct)
                    .and_then(|e| {
                        e.attrs
                            .get("defaultNamingContext")
                            .and_then(|v| v.first().cloned())
                    })
                    .ok_or_else(|| {
                        AuthzError::Ldap("the rootDSE has no defaultNamingContext".into())
                    })?;
                Ok(Conn::Sealed { ldap, base_dn })
            }
        }
    }

    fn lookup(
        conn: &mut Conn,
        user: &Principal,
        group: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, AuthzError> {
        match conn {
            Conn::Directory(dir) => {
                let g = dir
                    .find_group(group)
                    .map_err(|e| AuthzError::Directory(Box::new(e)))?
                    .ok_or_else(|| AuthzError::NoSuchGroup(group.to_owned()))?;
                let account = dir
                    .find_account_by_name(user.name(), AccountKind::Any)
                    .map_err(|e| match e {
                        DirectoryError::AccountNotFound { .. } => {
                            AuthzError::NoSuchUser(user.to_string())
                        }
                        other => AuthzError::Directory(Box::new(other)),
                    })?;
                dir.is_member_of(&account.dn, &g.dn)
                    .map_err(|e| AuthzError::Directory(Box::new(e)))
            }
            Conn::Sealed { ldap, base_dn } => {
                let mut one = |base: &str,
                               scope: ldap3::Scope,
                               filter: &str|
                 -> Result<Option<String>, AuthzError> {
                    let (entries, _) = ldap
                        .with_timeout(timeout)
                        .search(base, scope, filter, vec!["1.1"])
                        .and_then(|r| r.success())
                        .map_err(|e| ldap_err("search", e))?;
                    Ok(entries
                        .into_iter()
                        .map(ldap3::SearchEntry::construct)
                        .map(|e| e.dn)
                        .find(|dn| !dn.is_empty()))
                };
                let gf = format!(
                    "(&(objectClass=group)(|{}{}))",
                    crate::directory::filter::eq("sAMAccountName", group),
                    crate::directory::filter::eq("cn", group)
                );
                let group_dn = one(base_dn, ldap3::Scope::Subtree, &gf)?
                    .ok_or_else(|| AuthzError::NoSuchGroup(group.to_owned()))?;
                let uf = format!(
                    "(&(|(objectClass=user)(objectClass=computer))(|{}{}))",
                    crate::directory::filter::eq("sAMAccountName", user.name()),
                    crate::directory::filter::eq("userPrincipalName", user.as_str())
                );
                let Some(user_dn) = one(base_dn, ldap3::Scope::Subtree, &uf)? else {
                    return Err(AuthzError::NoSuchUser(user.to_string()));
                };
                let mf = format!(
                    "(memberOf:{}:={})",
                    crate::directory::MATCHING_RULE_IN_CHAIN,
                    crate::directory::filter::escape_value(&group_dn)
                );
                Ok(one(&user_dn, ldap3::Scope::Base, &mf)?.is_some())
            }
        }
    }

    fn timeout(&self) -> std::time::Duration {
        match &self.source {
            LdapSource::Directory(c) => c.timeout,
            LdapSource::SealedGssapi { timeout, .. } => *timeout,
        }
    }
}

/// The delegation-relevant attributes of an account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountFacts {
    /// The DN.
    pub dn: String,
    /// `userAccountControl`.
    pub user_account_control: u32,
    /// `msDS-AllowedToDelegateTo` as stored.
    pub allowed_to_delegate_to: Vec<String>,
}

impl LdapGroups {
    /// Reads an account by `sAMAccountName` (`hv1$`, `bob`), for explaining a refused
    /// delegation. `None` when it does not exist.
    pub fn account(&self, sam: &str) -> Result<Option<AccountFacts>, AuthzError> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let timeout = self.timeout();
        match guard.as_mut() {
            Some(Conn::Directory(dir)) => match dir.find_account_by_name(sam, AccountKind::Any) {
                Ok(a) => Ok(Some(AccountFacts {
                    dn: a.dn,
                    user_account_control: a.user_account_control,
                    allowed_to_delegate_to: a.allowed_to_delegate_to,
                })),
                Err(DirectoryError::AccountNotFound { .. }) => Ok(None),
                Err(e) => Err(AuthzError::Directory(Box::new(e))),
            },
            Some(Conn::Sealed { ldap, base_dn }) => {
                let f = crate::directory::filter::eq("sAMAccountName", sam);
                let (entries, _) = ldap
                    .with_timeout(timeout)
                    .search(
                        base_dn.as_str(),
                        ldap3::Scope::Subtree,
                        &f,
                        vec!["userAccountControl", "msDS-AllowedToDelegateTo"],
                    )
                    .and_then(|r| r.success())
                    .map_err(|e| ldap_err("search", e))?;
                Ok(entries
                    .into_iter()
                    .map(ldap3::SearchEntry::construct)
                    .find(|e| !e.dn.is_empty())
                    .map(|e| {
                        let uac = e
                            .attrs
                            .get("userAccountControl")
                            .and_then(|v| v.first())
                            .and_then(|v| v.parse::<i64>().ok())
                            .and_then(|v| u32::try_from(v & 0xffff_ffff).ok())
                            .unwrap_or(0);
                        AccountFacts {
                            allowed_to_delegate_to: e
                                .attrs
                                .get("msDS-AllowedToDelegateTo")
                                .cloned()
                                .unwrap_or_default(),
                            user_account_control: uac,
                            dn: e.dn,
                        }
                    }))
            }
            None => Err(AuthzError::Ldap("not connected".into())),
        }
    }
}

impl GroupDirectory for LdapGroups {
    fn is_member(&self, user: &Principal, group: &str) -> Result<bool, AuthzError> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let timeout = self.timeout();
        let mut last = None;
        for _attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect()?);
            }
            let Some(conn) = guard.as_mut() else {
                continue;
            };
            match LdapGroups::lookup(conn, user, group, timeout) {
                Err(e @ (AuthzError::Directory(_) | AuthzError::Ldap(_))) => {
                    // The connection may have dropped: reconnect once.
                    *guard = None;
                    last = Some(e);
                }
                Err(AuthzError::NoSuchUser(_)) => return Ok(false),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| AuthzError::NoSuchGroup(group.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake(Vec<(&'static str, &'static str)>, bool);

    impl GroupDirectory for Fake {
        fn is_member(&self, user: &Principal, group: &str) -> Result<bool, AuthzError> {
            if self.1 {
                return Err(AuthzError::NoSuchGroup(group.to_owned()));
            }
            Ok(self.0.iter().any(|(u, g)| *u == user.name() && *g == group))
        }
    }

    fn p(s: &str) -> Principal {
        Principal::parse(s, Some("LAB.EXAMPLE.TEST")).unwrap()
    }

    #[test]
    fn local_list_and_groups() {
        let dir = Arc::new(Fake(vec![("alice", DEFAULT_GROUP)], false));
        let a = Authorizer::new("hv2")
            .allow_principal(p("dave"))
            .allow_group(DEFAULT_GROUP, dir);
        assert!(a.authorize_principal(&p("alice")).is_ok());
        assert!(a.authorize_principal(&p("DAVE@lab.example.test")).is_ok());
        let d = a.authorize_principal(&p("carol")).unwrap_err();
        assert_eq!(d.code, WinCode::AccessDenied);
        assert!(
            d.cause
                .contains("carol is not a member of \"Hyper-V Administrators\""),
            "{d}"
        );
        assert!(
            d.fix
                .unwrap()
                .starts_with("samba-tool group addmembers \"Hyper-V Administrators\" carol")
        );
    }

    #[test]
    fn lookup_failures_deny_and_say_so() {
        let a = Authorizer::new("hv2").allow_group("Missing", Arc::new(Fake(vec![], true)));
        let d = a.authorize_principal(&p("alice")).unwrap_err();
        assert_eq!(d.code, WinCode::AccessDenied);
        assert!(d.cause.contains("does not exist"), "{d}");
        let nobody = Authorizer::new("hv2");
        assert!(nobody.authorize_principal(&p("alice")).is_err());
    }
}
