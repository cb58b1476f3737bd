//! Authorization of an authenticated peer, for what the channel is for (control or migration).
//!
//! The destination authorizes **the user**, not the source host (DESIGN.md §3): after Kerberos
//! says who the peer is ([`PeerAuthenticated`]) and the peer said what the channel is for
//! ([`Purpose`]), [`Authorizer::authorize`] decides, in this order:
//!
//! 1. **Realm.** The principal's realm must be the host's realm or one listed as trusted
//!    ([`Authorizer::trust_realm`]); `alice@OTHER.REALM` is never `alice`.
//! 2. **Hosts** (principals of computer accounts, `NAME$@REALM`, as a source in host-identity
//!    mode authenticates) never get a control channel: the control API is for users. A host may
//!    open a migration channel only when it is one of the host's peers
//!    ([`Authorizer::allow_peer_host`]); the admin group does not count for hosts.
//! 3. **Users** pass when they are on the host's local allow-list (exact principal, realm
//!    included) or (recursively) members of an admin group. The account is found exactly:
//!    `sAMAccountName` equality in the naming context of the principal's realm, a user since the
//!    name has no trailing `$` (see [`crate::directory::account::exact_account_filter`]).
//!
//! The admin group is resolved **once** ([`GroupSpec`]: a DN, a SID, or a name that must be
//! unique in the domain) and pinned by its SID: a group of the same name created later in
//! another OU grants nothing, and a name that matches several groups is an error that names
//! them ([`AuthzError::AmbiguousGroup`]) — at start ([`Authorizer::resolve_groups`]), or at the
//! first lookup when the directory could not be reached at start.
//!
//! Only a successful check creates the zero-sized [`Authorized`] proof, which records the
//! purpose it was given for; the daemon's dispatch requires it.
//!
//! Group membership comes from a [`GroupDirectory`]; [`LdapGroups`] implements it with the
//! directory client ([`crate::directory`]) using the **host's own** credentials: a GSSAPI bind
//! with the process's Kerberos credentials (a host process points `KRB5_CLIENT_KTNAME` at its
//! keytab and `KRB5CCNAME` at a private cache for itself — each host is its own process), or a
//! simple bind over TLS with an account the administrator gave it.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::channel::{PeerAuthenticated, Purpose};
use crate::directory::account::{exact_account_filter, sid_to_string};
use crate::directory::{Directory, DirectoryConfig, DirectoryError, SearchScope, dns_domain_of};
use crate::krb::Principal;
use crate::krb::diagnose::quote;
use crate::winerr::{Diagnosis, WinCode};

/// The group Hyper-V uses, and vmgate's default.
pub const DEFAULT_GROUP: &str = "Hyper-V Administrators";

/// Errors of group lookups.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// The directory could not be asked.
    #[error("could not look up group membership in the directory")]
    Directory(#[source] Box<DirectoryError>),
    /// The configured group does not exist.
    #[error("the group \"{0}\" does not exist in the directory")]
    NoSuchGroup(String),
    /// The configured group name matches several groups.
    #[error(
        "the group name \"{name}\" is ambiguous: {} groups have it ({}); name the admin group by \
         its DN or SID instead",
        candidates.len(),
        candidates.join("; ")
    )]
    AmbiguousGroup {
        /// The name as configured.
        name: String,
        /// The DNs of the groups that have it.
        candidates: Vec<String>,
    },
    /// A direct LDAP operation failed.
    #[error("the directory lookup failed: {0}")]
    Ldap(String),
}

impl AuthzError {
    /// The directory could not be reached or asked (as opposed to an answer that is wrong: a
    /// missing or ambiguous group). A host may start without its directory and resolve its
    /// group later; it must not start with a group that is missing or ambiguous.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AuthzError::Directory(_) | AuthzError::Ldap(_))
    }
}

/// How the admin group is named in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "by", content = "value", rename_all = "lowercase")]
pub enum GroupSpec {
    /// A distinguished name (`CN=Hyper-V Administrators,CN=Users,DC=lab,...`).
    Dn(String),
    /// A SID (`S-1-5-21-...-1106`).
    Sid(String),
    /// A name (`sAMAccountName` or `cn`) that must match exactly one group.
    Name(String),
}

impl GroupSpec {
    /// Reads a configured group: `S-1-...` is a SID, text with `=` a DN, anything else a name.
    pub fn parse(text: &str) -> GroupSpec {
        let t = text.trim();
        let is_sid = t
            .strip_prefix("S-1-")
            .or_else(|| t.strip_prefix("s-1-"))
            .is_some_and(|rest| {
                !rest.is_empty() && rest.split('-').all(|p| p.parse::<u64>().is_ok())
            });
        if is_sid {
            GroupSpec::Sid(t.to_uppercase())
        } else if t.contains('=') {
            GroupSpec::Dn(t.to_owned())
        } else {
            GroupSpec::Name(t.to_owned())
        }
    }

    /// The text as configured.
    pub fn as_str(&self) -> &str {
        match self {
            GroupSpec::Dn(s) | GroupSpec::Sid(s) | GroupSpec::Name(s) => s,
        }
    }
}

impl fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group as the directory resolved it: what membership is checked against.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedGroup {
    /// The group as configured.
    pub spec: GroupSpec,
    /// Its DN when it was resolved.
    pub dn: String,
    /// Its SID (what it is pinned by: it survives a rename or a move).
    pub sid: Option<String>,
    /// Its `sAMAccountName` (what `samba-tool group addmembers` takes).
    pub name: String,
}

/// Answers "is this principal (transitively) a member of that group?".
pub trait GroupDirectory: Send + Sync + fmt::Debug {
    /// Resolves a configured group: by DN, by SID, or by a name that matches exactly one group
    /// (`sAMAccountName` or `cn`); several matches are [`AuthzError::AmbiguousGroup`].
    fn resolve_group(&self, spec: &GroupSpec) -> Result<ResolvedGroup, AuthzError>;

    /// Whether the account of `user`, found exactly in the naming context of its realm, is a
    /// member of `group`, directly or through nested groups. `false` when there is no such
    /// account.
    fn is_member(&self, user: &Principal, group: &ResolvedGroup) -> Result<bool, AuthzError>;
}

/// Proof that the peer passed authorization for a purpose. Only [`Authorizer::authorize`]
/// creates it.
#[derive(Debug)]
pub struct Authorized {
    purpose: Purpose,
    _private: (),
}

impl Authorized {
    /// What the peer was authorized for.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }
}

/// A configured admin group and, once known, what it resolved to (shared by the clones of an
/// [`Authorizer`], so it is resolved once per host).
#[derive(Clone, Debug)]
struct AdminGroup {
    spec: GroupSpec,
    resolved: Arc<Mutex<Option<ResolvedGroup>>>,
    directory: Arc<dyn GroupDirectory>,
}

impl AdminGroup {
    fn resolved(&self) -> Result<ResolvedGroup, AuthzError> {
        let mut guard = self
            .resolved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = guard.as_ref() {
            return Ok(g.clone());
        }
        let g = self.directory.resolve_group(&self.spec)?;
        *guard = Some(g.clone());
        Ok(g)
    }

    /// The name for messages: the group's own name once resolved, else as configured.
    fn display(&self) -> String {
        self.resolved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map_or_else(|| self.spec.to_string(), |g| g.name.clone())
    }
}

/// Who may use this host, and for what.
#[derive(Clone, Debug)]
pub struct Authorizer {
    host: String,
    realm: String,
    trusted_realms: Vec<String>,
    principals: Vec<Principal>,
    groups: Vec<AdminGroup>,
    peer_hosts: Vec<String>,
}

/// Whether a principal is a computer account's (`HV1$@REALM`).
pub fn is_host_principal(p: &Principal) -> bool {
    p.name().ends_with('$')
}

/// A peer host's name as compared: without `$`, lower case (`HV1$` → `hv1`).
fn host_key(name: &str) -> String {
    name.trim().trim_end_matches('$').to_ascii_lowercase()
}

impl Authorizer {
    /// Nobody is allowed yet. `host` names this host in messages (`hv2`); `realm` is its realm
    /// (`LAB.EXAMPLE.TEST`), the only one accepted until others are trusted.
    pub fn new(host: impl Into<String>, realm: &str) -> Authorizer {
        Authorizer {
            host: host.into(),
            realm: realm.to_uppercase(),
            trusted_realms: Vec::new(),
            principals: Vec::new(),
            groups: Vec::new(),
            peer_hosts: Vec::new(),
        }
    }

    /// Accepts principals of another realm as well (one the host's realm trusts). Their
    /// accounts are looked up in that realm's naming context.
    #[must_use]
    pub fn trust_realm(mut self, realm: &str) -> Authorizer {
        self.trusted_realms.push(realm.to_uppercase());
        self
    }

    /// Allows one principal (local allow-list), for control and migration channels. A host
    /// principal on this list gets no control channel all the same.
    #[must_use]
    pub fn allow_principal(mut self, p: Principal) -> Authorizer {
        self.principals.push(p);
        self
    }

    /// Allows the users that are members of an AD group, looked up in `directory`. The group
    /// is resolved at the first lookup, or at once with [`Authorizer::resolve_groups`].
    #[must_use]
    pub fn allow_group(
        mut self,
        group: GroupSpec,
        directory: Arc<dyn GroupDirectory>,
    ) -> Authorizer {
        self.groups.push(AdminGroup {
            spec: group,
            resolved: Arc::new(Mutex::new(None)),
            directory,
        });
        self
    }

    /// Lets a host of this realm (`hv1` or `HV1$`) open migration channels with its own
    /// identity (a source in host-identity mode). Never a control channel.
    #[must_use]
    pub fn allow_peer_host(mut self, host: &str) -> Authorizer {
        self.peer_hosts.push(host_key(host));
        self
    }

    /// Resolves every configured group now (at start). A missing or ambiguous group is an
    /// error to stop on; [`AuthzError::is_unreachable`] tells the caller that the directory
    /// could not be asked (the groups are then resolved at the first lookup).
    pub fn resolve_groups(&self) -> Result<Vec<ResolvedGroup>, AuthzError> {
        self.groups.iter().map(AdminGroup::resolved).collect()
    }

    /// The configured groups, as configured.
    pub fn groups(&self) -> Vec<String> {
        self.groups.iter().map(|g| g.spec.to_string()).collect()
    }

    /// The peer hosts (lower case, without `$`).
    pub fn peer_hosts(&self) -> &[String] {
        &self.peer_hosts
    }

    /// Checks the authenticated peer for `purpose`. A denial is E_ACCESSDENIED saying which rule
    /// refused and the fix.
    pub fn authorize(
        &self,
        peer: &PeerAuthenticated,
        purpose: Purpose,
    ) -> Result<Authorized, Diagnosis> {
        self.authorize_principal(peer.principal(), purpose)
    }

    fn authorize_principal(
        &self,
        user: &Principal,
        purpose: Purpose,
    ) -> Result<Authorized, Diagnosis> {
        let allowed = Authorized {
            purpose,
            _private: (),
        };
        let realm = user.realm();
        let home = realm.eq_ignore_ascii_case(&self.realm);
        if !home
            && !self
                .trusted_realms
                .iter()
                .any(|r| r.eq_ignore_ascii_case(realm))
        {
            return Err(self.foreign_realm(user));
        }
        if is_host_principal(user) {
            return match purpose {
                Purpose::Control => Err(self.host_control(user)),
                Purpose::Migration if home && self.peer_hosts.contains(&host_key(user.name())) => {
                    Ok(allowed)
                }
                Purpose::Migration => Err(self.host_not_peer(user)),
            };
        }
        if self.principals.iter().any(|p| p.same_as(user)) {
            return Ok(allowed);
        }
        let mut lookup_failures = Vec::new();
        for g in &self.groups {
            let checked = g
                .resolved()
                .and_then(|resolved| g.directory.is_member(user, &resolved));
            match checked {
                Ok(true) => return Ok(allowed),
                Ok(false) => {}
                Err(e) => {
                    lookup_failures.push(format!("\"{}\": {e}{}", g.spec, source_text(&e)));
                }
            }
        }
        Err(self.denial(user, &lookup_failures))
    }

    fn foreign_realm(&self, user: &Principal) -> Diagnosis {
        let trusted = if self.trusted_realms.is_empty() {
            "none".to_owned()
        } else {
            self.trusted_realms.join(", ")
        };
        Diagnosis::new(
            WinCode::AccessDenied,
            format!(
                "{user} authenticated, but is from the realm {}: {} accepts principals of {} \
                 and of the realms it trusts only (trusted realms: {trusted}); a principal of \
                 another realm is never taken for the account of the same name here",
                user.realm(),
                self.host,
                self.realm
            ),
        )
        .with_fix(format!(
            "connect as a principal of {}; or, if {} is a realm this domain trusts, add it to \
             {}'s configuration: trusted_realms = [\"{}\"]",
            self.realm,
            user.realm(),
            self.host,
            user.realm()
        ))
    }

    fn host_control(&self, user: &Principal) -> Diagnosis {
        let group = self
            .groups
            .first()
            .map_or_else(|| DEFAULT_GROUP.to_owned(), AdminGroup::display);
        Diagnosis::new(
            WinCode::AccessDenied,
            format!(
                "{user} is a host (a computer account): hosts may open migration channels to \
                 {} (when listed as its peers), never control channels; the control API is for \
                 users of the admin group",
                self.host
            ),
        )
        .with_fix(format!(
            "run the command as a user who is a member of \"{group}\" (kinit USER; vmgate ...)"
        ))
    }

    fn host_not_peer(&self, user: &Principal) -> Diagnosis {
        let short = host_key(user.name());
        let peers = if self.peer_hosts.is_empty() {
            "none".to_owned()
        } else {
            self.peer_hosts.join(", ")
        };
        Diagnosis::new(
            WinCode::AccessDenied,
            format!(
                "{user} is a host (a computer account), and {} accepts moves from hosts with \
                 their own identity only from its peer hosts (peer_hosts: {peers}); {short} is \
                 not one of them{}",
                self.host,
                if user.realm().eq_ignore_ascii_case(&self.realm) {
                    String::new()
                } else {
                    format!(" (and peer hosts must be of {})", self.realm)
                }
            ),
        )
        .with_fix(format!(
            "on {h}: add \"{short}\" to peer_hosts in the [migration] section of vmgated.toml \
             and restart vmgated; or move as a user instead: vmgate host set --auth kerberos on \
             {short}",
            h = self.host
        ))
    }

    fn denial(&self, user: &Principal, failures: &[String]) -> Diagnosis {
        let name = user.name();
        let names: Vec<String> = self.groups.iter().map(AdminGroup::display).collect();
        let mut cause = format!(
            "{user} authenticated, but is not allowed to use {}: ",
            self.host
        );
        match (names.as_slice(), self.principals.is_empty()) {
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
        let fix = match names.first() {
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
        ldap: Box<ldap3::LdapConn>,
        base_dn: String,
    },
}

/// One entry found, with what the lookups read from it.
#[derive(Debug)]
struct Found {
    dn: String,
    sam: Option<String>,
    sid: Option<String>,
    uac: u32,
    delegate_to: Vec<String>,
}

/// The attributes [`Found`] is read from.
const FOUND_ATTRS: [&str; 4] = [
    "sAMAccountName",
    "objectSid",
    "userAccountControl",
    "msDS-AllowedToDelegateTo",
];

impl Conn {
    fn base_dn(&self) -> &str {
        match self {
            Conn::Directory(d) => d.base_dn(),
            Conn::Sealed { base_dn, .. } => base_dn,
        }
    }

    /// A search; a base this directory does not hold (noSuchObject, a referral) finds nothing.
    fn search(
        &mut self,
        base: &str,
        scope: SearchScope,
        filter: &str,
        timeout: std::time::Duration,
    ) -> Result<Vec<Found>, AuthzError> {
        match self {
            Conn::Directory(dir) => match dir.search(base, scope, filter, &FOUND_ATTRS) {
                Ok(entries) => Ok(entries
                    .into_iter()
                    .map(|e| Found {
                        sam: e.first("sAMAccountName").map(str::to_owned),
                        sid: e.binary("objectSid").first().and_then(|b| sid_to_string(b)),
                        uac: e
                            .first("userAccountControl")
                            .and_then(|v| v.parse::<i64>().ok())
                            .and_then(low_32_bits)
                            .unwrap_or(0),
                        delegate_to: e.values("msDS-AllowedToDelegateTo").to_vec(),
                        dn: e.dn,
                    })
                    .collect()),
                Err(DirectoryError::NoSuchObject { .. }) => Ok(Vec::new()),
                Err(e) => Err(AuthzError::Directory(Box::new(e))),
            },
            Conn::Sealed { ldap, .. } => {
                let res = ldap
                    .with_timeout(timeout)
                    .search(base, scope.into(), filter, FOUND_ATTRS.to_vec())
                    .map_err(|e| ldap_err("search", e))?;
                // noSuchObject (32) or a referral (10): this directory does not hold the base.
                if matches!(res.1.rc, 10 | 32) {
                    return Ok(Vec::new());
                }
                let (entries, _) = res.success().map_err(|e| ldap_err("search", e))?;
                Ok(entries
                    .into_iter()
                    .map(ldap3::SearchEntry::construct)
                    .filter(|e| !e.dn.is_empty())
                    .map(|e| {
                        let text = |a: &str| {
                            e.attrs
                                .iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case(a))
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let sid = e
                            .bin_attrs
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("objectSid"))
                            .and_then(|(_, v)| v.first())
                            .and_then(|b| sid_to_string(b));
                        Found {
                            sam: text("sAMAccountName").first().cloned(),
                            sid,
                            uac: text("userAccountControl")
                                .first()
                                .and_then(|v| v.parse::<i64>().ok())
                                .and_then(low_32_bits)
                                .unwrap_or(0),
                            delegate_to: text("msDS-AllowedToDelegateTo"),
                            dn: e.dn,
                        }
                    })
                    .collect())
            }
        }
    }
}

fn low_32_bits(v: i64) -> Option<u32> {
    u32::try_from(v & 0xffff_ffff).ok()
}

/// The naming context of a realm's domain: `LAB.EXAMPLE.TEST` → `DC=lab,DC=example,DC=test`.
fn realm_naming_context(realm: &str) -> String {
    realm
        .split('.')
        .map(|label| {
            format!(
                "DC={}",
                crate::directory::filter::escape_dn_value(&label.to_ascii_lowercase())
            )
        })
        .collect::<Vec<_>>()
        .join(",")
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
                Ok(Conn::Sealed {
                    ldap: Box::new(ldap),
                    base_dn,
                })
            }
        }
    }

    fn timeout(&self) -> std::time::Duration {
        match &self.source {
            LdapSource::Directory(c) => c.timeout,
            LdapSource::SealedGssapi { timeout, .. } => *timeout,
        }
    }

    /// Runs `op` on the connection, connecting first and reconnecting once when a directory
    /// error suggests the connection dropped.
    fn with_conn<T>(
        &self,
        op: impl Fn(&mut Conn, std::time::Duration) -> Result<T, AuthzError>,
    ) -> Result<T, AuthzError> {
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
            match op(conn, timeout) {
                Err(e) if e.is_unreachable() => {
                    *guard = None;
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| AuthzError::Ldap("not connected".into())))
    }

    fn resolve_on(
        conn: &mut Conn,
        spec: &GroupSpec,
        timeout: std::time::Duration,
    ) -> Result<ResolvedGroup, AuthzError> {
        let base = conn.base_dn().to_owned();
        let found = match spec {
            GroupSpec::Dn(dn) => {
                conn.search(dn, SearchScope::Base, "(objectClass=group)", timeout)?
            }
            GroupSpec::Sid(sid) => conn.search(
                &base,
                SearchScope::Subtree,
                &format!(
                    "(&(objectClass=group){})",
                    crate::directory::filter::eq("objectSid", sid)
                ),
                timeout,
            )?,
            GroupSpec::Name(name) => conn.search(
                &base,
                SearchScope::Subtree,
                &format!(
                    "(&(objectClass=group)(|{}{}))",
                    crate::directory::filter::eq("sAMAccountName", name),
                    crate::directory::filter::eq("cn", name)
                ),
                timeout,
            )?,
        };
        match <[Found; 1]>::try_from(found) {
            Ok([g]) => Ok(ResolvedGroup {
                spec: spec.clone(),
                name: g.sam.clone().unwrap_or_else(|| spec.to_string()),
                dn: g.dn,
                sid: g.sid,
            }),
            Err(found) if found.is_empty() => Err(AuthzError::NoSuchGroup(spec.to_string())),
            Err(found) => Err(AuthzError::AmbiguousGroup {
                name: spec.to_string(),
                candidates: found.into_iter().map(|g| g.dn).collect(),
            }),
        }
    }

    /// The naming context to look a principal's account up in: this domain's for its own
    /// realm, the realm's own otherwise (found only when this directory holds it).
    fn account_base(conn: &Conn, user: &Principal) -> String {
        let base = conn.base_dn();
        if dns_domain_of(base).eq_ignore_ascii_case(user.realm()) {
            base.to_owned()
        } else {
            realm_naming_context(user.realm())
        }
    }
}

impl GroupDirectory for LdapGroups {
    fn resolve_group(&self, spec: &GroupSpec) -> Result<ResolvedGroup, AuthzError> {
        self.with_conn(|conn, timeout| LdapGroups::resolve_on(conn, spec, timeout))
    }

    fn is_member(&self, user: &Principal, group: &ResolvedGroup) -> Result<bool, AuthzError> {
        self.with_conn(|conn, timeout| {
            // The group as pinned: found again by its SID (it may have been renamed or moved
            // since it was resolved); a group without a SID by its DN.
            let group_dn = match &group.sid {
                Some(sid) => {
                    let base = conn.base_dn().to_owned();
                    let f = format!(
                        "(&(objectClass=group){})",
                        crate::directory::filter::eq("objectSid", sid)
                    );
                    let found = conn.search(&base, SearchScope::Subtree, &f, timeout)?;
                    match found.as_slice() {
                        [g] => g.dn.clone(),
                        _ => return Err(AuthzError::NoSuchGroup(group.spec.to_string())),
                    }
                }
                None => group.dn.clone(),
            };
            let base = LdapGroups::account_base(conn, user);
            let f = format!(
                "(&{}(memberOf:{}:={}))",
                exact_account_filter(user.name()),
                crate::directory::MATCHING_RULE_IN_CHAIN,
                crate::directory::filter::escape_value(&group_dn)
            );
            Ok(!conn
                .search(&base, SearchScope::Subtree, &f, timeout)?
                .is_empty())
        })
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
    /// Reads the account of a principal's name (`hv1$`, `bob`) exactly, as authorization finds
    /// it (see [`exact_account_filter`]), for explaining a refused delegation. `None` when it
    /// does not exist.
    pub fn account(&self, sam: &str) -> Result<Option<AccountFacts>, AuthzError> {
        self.with_conn(|conn, timeout| {
            let base = conn.base_dn().to_owned();
            let found = conn.search(
                &base,
                SearchScope::Subtree,
                &exact_account_filter(sam),
                timeout,
            )?;
            Ok(<[Found; 1]>::try_from(found).ok().map(|[a]| AccountFacts {
                dn: a.dn,
                user_account_control: a.uac,
                allowed_to_delegate_to: a.delegate_to,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Members by user name, and group resolution by name (several DNs: ambiguous).
    #[derive(Debug, Default)]
    struct Fake {
        members: Vec<(&'static str, &'static str)>,
        groups: Vec<(&'static str, &'static str)>,
        broken: bool,
        resolutions: Mutex<usize>,
    }

    impl GroupDirectory for Fake {
        fn resolve_group(&self, spec: &GroupSpec) -> Result<ResolvedGroup, AuthzError> {
            *self.resolutions.lock().unwrap() += 1;
            if self.broken {
                return Err(AuthzError::Ldap("down".into()));
            }
            let dns: Vec<&str> = self
                .groups
                .iter()
                .filter(|(n, _)| *n == spec.as_str())
                .map(|(_, dn)| *dn)
                .collect();
            match dns.as_slice() {
                [] => Err(AuthzError::NoSuchGroup(spec.to_string())),
                [dn] => Ok(ResolvedGroup {
                    spec: spec.clone(),
                    dn: (*dn).to_owned(),
                    sid: None,
                    name: spec.to_string(),
                }),
                _ => Err(AuthzError::AmbiguousGroup {
                    name: spec.to_string(),
                    candidates: dns.iter().map(|d| (*d).to_owned()).collect(),
                }),
            }
        }

        fn is_member(&self, user: &Principal, group: &ResolvedGroup) -> Result<bool, AuthzError> {
            // Like a careless directory: the realm is ignored here, so the Authorizer must
            // check it itself.
            Ok(self
                .members
                .iter()
                .any(|(u, g)| u.eq_ignore_ascii_case(user.name()) && *g == group.dn))
        }
    }

    const REALM: &str = "LAB.EXAMPLE.TEST";
    const GROUP_DN: &str = "CN=Hyper-V Administrators,CN=Users,DC=lab";

    fn p(s: &str) -> Principal {
        Principal::parse(s, Some(REALM)).unwrap()
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            members: vec![("alice", GROUP_DN), ("hv1$", GROUP_DN)],
            groups: vec![(DEFAULT_GROUP, GROUP_DN)],
            ..Fake::default()
        })
    }

    fn spec() -> GroupSpec {
        GroupSpec::parse(DEFAULT_GROUP)
    }

    #[test]
    fn local_list_and_groups() {
        let a = Authorizer::new("hv2", REALM)
            .allow_principal(p("dave"))
            .allow_group(spec(), fake());
        assert!(a.authorize_principal(&p("alice"), Purpose::Control).is_ok());
        let m = a
            .authorize_principal(&p("alice"), Purpose::Migration)
            .unwrap();
        assert_eq!(m.purpose(), Purpose::Migration);
        assert!(
            a.authorize_principal(&p("DAVE@lab.example.test"), Purpose::Control)
                .is_ok()
        );
        let d = a
            .authorize_principal(&p("carol"), Purpose::Control)
            .unwrap_err();
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
    fn a_foreign_realm_is_not_the_home_realm() {
        let a = Authorizer::new("hv2", REALM)
            .allow_principal(p("dave"))
            .allow_group(spec(), fake());
        // The (careless) directory would say alice is a member; the realm decides first.
        for who in ["alice@OTHER.REALM", "dave@OTHER.REALM"] {
            let d = a
                .authorize_principal(&Principal::parse(who, None).unwrap(), Purpose::Control)
                .unwrap_err();
            assert_eq!(d.code, WinCode::AccessDenied);
            assert!(d.cause.contains("is from the realm OTHER.REALM"), "{d}");
            assert!(d.cause.contains("trusted realms: none"), "{d}");
            assert!(
                d.fix
                    .as_deref()
                    .unwrap()
                    .contains("trusted_realms = [\"OTHER.REALM\"]"),
                "{d}"
            );
        }
        // Trusted: the realm passes, then the usual rules apply (the allow-list is exact).
        let t = a.clone().trust_realm("other.realm");
        let dave_other = Principal::parse("dave@OTHER.REALM", None).unwrap();
        let d = t
            .authorize_principal(&dave_other, Purpose::Control)
            .unwrap_err();
        assert!(d.cause.contains("is not a member of"), "{d}");
        let t = t.allow_principal(dave_other.clone());
        assert!(t.authorize_principal(&dave_other, Purpose::Control).is_ok());
    }

    #[test]
    fn hosts_get_migration_channels_only_and_only_as_listed_peers() {
        let a = Authorizer::new("hv2", REALM)
            .allow_group(spec(), fake())
            .allow_peer_host("HV1$");
        // hv1 is a listed peer: migration yes, control never.
        assert!(
            a.authorize_principal(&p("hv1$"), Purpose::Migration)
                .is_ok()
        );
        let d = a
            .authorize_principal(&p("HV1$"), Purpose::Control)
            .unwrap_err();
        assert_eq!(d.code, WinCode::AccessDenied);
        assert!(d.cause.contains("is a host (a computer account)"), "{d}");
        assert!(d.cause.contains("never control channels"), "{d}");
        // hv3 is not listed; being in the admin group does not make a host a peer.
        let d = a
            .authorize_principal(&p("hv3$"), Purpose::Migration)
            .unwrap_err();
        assert!(d.cause.contains("peer_hosts: hv1"), "{d}");
        assert!(d.cause.contains("hv3 is not one of them"), "{d}");
        assert!(
            d.fix
                .as_deref()
                .unwrap()
                .contains("add \"hv3\" to peer_hosts"),
            "{d}"
        );
        let no_peers = Authorizer::new("hv2", REALM).allow_group(spec(), fake());
        assert!(
            no_peers
                .authorize_principal(&p("hv1$"), Purpose::Migration)
                .is_err()
        );
        // A host of a trusted realm is no peer, even with the same short name.
        let t = a.clone().trust_realm("OTHER.REALM");
        assert!(
            t.authorize_principal(
                &Principal::parse("hv1$@OTHER.REALM", None).unwrap(),
                Purpose::Migration
            )
            .is_err()
        );
        // Users keep both.
        assert!(a.authorize_principal(&p("alice"), Purpose::Control).is_ok());
        assert!(
            a.authorize_principal(&p("alice"), Purpose::Migration)
                .is_ok()
        );
    }

    #[test]
    fn groups_resolve_once_and_an_ambiguous_name_says_which_groups() {
        let dir = fake();
        let a = Authorizer::new("hv2", REALM).allow_group(spec(), dir.clone());
        let resolved = a.resolve_groups().unwrap();
        assert_eq!(resolved[0].dn, GROUP_DN);
        let b = a.clone();
        assert!(b.authorize_principal(&p("alice"), Purpose::Control).is_ok());
        assert!(a.authorize_principal(&p("alice"), Purpose::Control).is_ok());
        assert_eq!(
            *dir.resolutions.lock().unwrap(),
            1,
            "resolved once, shared by clones"
        );

        let two = Arc::new(Fake {
            groups: vec![
                (DEFAULT_GROUP, GROUP_DN),
                (DEFAULT_GROUP, "CN=Hyper-V Administrators,OU=Rogue,DC=lab"),
            ],
            ..Fake::default()
        });
        let a = Authorizer::new("hv2", REALM).allow_group(spec(), two);
        let e = a.resolve_groups().unwrap_err();
        assert!(!e.is_unreachable());
        let text = e.to_string();
        assert!(text.contains("is ambiguous"), "{text}");
        assert!(
            text.contains(GROUP_DN) && text.contains("OU=Rogue"),
            "{text}"
        );
        // Unresolved at start, ambiguous at the first lookup: everyone is denied, saying why.
        let d = a
            .authorize_principal(&p("alice"), Purpose::Control)
            .unwrap_err();
        assert!(d.cause.contains("is ambiguous"), "{d}");
    }

    #[test]
    fn lookup_failures_deny_and_say_so() {
        let broken = Arc::new(Fake {
            broken: true,
            ..Fake::default()
        });
        let a = Authorizer::new("hv2", REALM).allow_group(GroupSpec::parse("Missing"), broken);
        assert!(a.resolve_groups().unwrap_err().is_unreachable());
        let d = a
            .authorize_principal(&p("alice"), Purpose::Control)
            .unwrap_err();
        assert_eq!(d.code, WinCode::AccessDenied);
        assert!(d.cause.contains("could not be asked"), "{d}");
        let missing =
            Authorizer::new("hv2", REALM).allow_group(GroupSpec::parse("Missing"), fake());
        let d = missing
            .authorize_principal(&p("alice"), Purpose::Control)
            .unwrap_err();
        assert!(d.cause.contains("does not exist"), "{d}");
        let nobody = Authorizer::new("hv2", REALM);
        assert!(
            nobody
                .authorize_principal(&p("alice"), Purpose::Control)
                .is_err()
        );
    }

    #[test]
    fn group_specs() {
        assert_eq!(
            GroupSpec::parse("S-1-5-21-1-2-3-1106"),
            GroupSpec::Sid("S-1-5-21-1-2-3-1106".into())
        );
        assert_eq!(
            GroupSpec::parse("CN=Hyper-V Administrators,CN=Users,DC=lab"),
            GroupSpec::Dn("CN=Hyper-V Administrators,CN=Users,DC=lab".into())
        );
        assert_eq!(
            GroupSpec::parse("Hyper-V Administrators"),
            GroupSpec::Name("Hyper-V Administrators".into())
        );
        assert_eq!(GroupSpec::parse("S-1-x"), GroupSpec::Name("S-1-x".into()));
        assert_eq!(
            realm_naming_context("LAB.EXAMPLE.TEST"),
            "DC=lab,DC=example,DC=test"
        );
    }
}
