//! The AD directory client (ldap3): LDAPS/StartTLS, GSSAPI or simple bind, paged searches.
//!
//! [`Directory::connect`] opens one connection and binds:
//!
//! * **Transport**: `ldaps://host[:port]` (TLS from the first byte) or `ldap://host[:port]`,
//!   which is upgraded with StartTLS before a simple bind. A GSSAPI bind on `ldap://` instead
//!   negotiates Kerberos sealing (the SASL privacy layer: the DC is authenticated by Kerberos and
//!   every later message is encrypted), which is what Samba requires: it refuses GSSAPI without
//!   sign/seal even inside TLS ("Sign or Seal are required"), so against Samba use `ldap://`
//!   for GSSAPI. Either way vmgate never sends a password or reads directory data in clear
//!   (only the public rootDSE is read before the bind). The server certificate is verified against the CA file named in
//!   [`DirectoryConfig::ca_file`] (a PEM bundle; only those CAs are trusted) or, without one,
//!   against the system's trusted CAs. Verification is on unless
//!   [`TlsVerification::InsecureSkipVerify`] is chosen explicitly.
//! * **Bind**: [`Bind::Gssapi`] uses the process's Kerberos credentials (the ccache named by
//!   `KRB5CCNAME`, or a keytab named by `KRB5_CLIENT_KTNAME`), asking for `ldap/<host>`: the
//!   URL's host name, or for a URL with an IP address the DC's `dnsHostName` and then the address
//!   (see [`DirectoryConfig::gssapi_host`]);
//!   [`Bind::Simple`] sends a user and password (over TLS only). A bare user name (`alice`,
//!   `Administrator`) is sent as a UPN in the domain's DNS name (`alice@lab.example.test`);
//!   a UPN, a `DOMAIN\user` name or a DN is sent as given.
//! * **Base DN** comes from the rootDSE (`defaultNamingContext`), read before the bind.
//! * **Searches** are paged (500 entries a page, [`PAGE_SIZE`]): AD caps unpaged result sets.
//!   Continuation references (referrals to the Configuration and DNS partitions) are skipped.
//!
//! Every value put into a filter is escaped ([`filter`]).
//!
//! # Samba detection
//!
//! A Samba AD DC publishes `vendorName: Samba Team (https://www.samba.org)` in its rootDSE; a
//! Windows DC publishes no `vendorName` at all. [`ServerKind`] is decided from that attribute
//! alone, read anonymously before the bind. It decides whether SPNs with spaces get their escaped
//! twin (see [`crate::spn`]).
//!
//! # Handle
//!
//! [`Directory`] is a cheap, cloneable, `Send + Sync` handle over one connection; operations
//! from several threads are serialised on it. Open another `Directory` for parallel work.

pub mod account;
pub mod filter;
pub mod spns;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConn, LdapConnSettings, LdapError, Mod, Scope, SearchEntry};

use crate::secret::Secret;
use crate::winerr::{Diagnosis, WinCode};

pub use account::{Account, AccountKind, AccountName};

/// Entries per page of a paged search.
pub const PAGE_SIZE: i32 = 500;

/// The largest CA file read (a bundle of a few hundred certificates fits).
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// LDAP_MATCHING_RULE_IN_CHAIN: transitive membership.
pub const MATCHING_RULE_IN_CHAIN: &str = "1.2.840.113556.1.4.1941";

/// How to check the server's certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVerification {
    /// Verify the chain and the host name (the default).
    #[default]
    Verify,
    /// Accept any certificate. Only for a lab where the certificate cannot be fixed; the name
    /// says what it costs.
    InsecureSkipVerify,
}

/// How to authenticate to the directory.
#[derive(Clone, Debug)]
pub enum Bind {
    /// SASL GSSAPI with the process's Kerberos credentials (`KRB5CCNAME` / `KRB5_CLIENT_KTNAME`).
    Gssapi,
    /// A simple bind over TLS.
    Simple {
        /// `alice`, `alice@lab.example.test`, `LAB\alice` or a DN.
        user: String,
        /// The password.
        password: Secret,
    },
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    /// `ldaps://host[:port]` or `ldap://host[:port]` (StartTLS).
    pub url: String,
    /// PEM file with the CA certificates to trust; `None` trusts the system's CAs.
    pub ca_file: Option<PathBuf>,
    /// Certificate verification (on by default).
    pub tls: TlsVerification,
    /// The bind.
    pub bind: Bind,
    /// The host name for the GSSAPI SPN `ldap/<host>`; by default the URL's host, or, when the
    /// URL names an IP address, the DC's `dnsHostName` and, if the KDC does not know that SPN,
    /// the address itself.
    pub gssapi_host: Option<String>,
    /// Limit for connecting and for each operation.
    pub timeout: Duration,
}

impl DirectoryConfig {
    /// A configuration with verification on and a 30 s timeout.
    pub fn new(url: impl Into<String>, ca_file: Option<PathBuf>, bind: Bind) -> Self {
        DirectoryConfig {
            url: url.into(),
            ca_file,
            tls: TlsVerification::Verify,
            bind,
            gssapi_host: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Which kind of directory server answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ServerKind {
    /// A Samba AD DC (rootDSE `vendorName` names Samba): SPNs with spaces need escaped twins.
    Samba,
    /// Any other AD DC (Windows publishes no `vendorName`).
    ActiveDirectory,
}

/// Facts from the rootDSE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDse {
    /// `defaultNamingContext`, e.g. `DC=lab,DC=example,DC=test`.
    pub default_naming_context: String,
    /// `configurationNamingContext`.
    pub configuration_naming_context: Option<String>,
    /// `dnsHostName` of the DC, e.g. `dc1.lab.example.test`.
    pub dns_host_name: Option<String>,
    /// `vendorName`, if published.
    pub vendor_name: Option<String>,
    /// `vendorVersion`, if published.
    pub vendor_version: Option<String>,
    /// `domainFunctionality`.
    pub domain_functionality: Option<u32>,
}

impl RootDse {
    fn from_entry(entry: &Entry) -> Option<RootDse> {
        Some(RootDse {
            default_naming_context: entry.first("defaultNamingContext")?.to_owned(),
            configuration_naming_context: entry
                .first("configurationNamingContext")
                .map(str::to_owned),
            dns_host_name: entry.first("dnsHostName").map(str::to_owned),
            vendor_name: entry.first("vendorName").map(str::to_owned),
            vendor_version: entry.first("vendorVersion").map(str::to_owned),
            domain_functionality: entry
                .first("domainFunctionality")
                .and_then(|v| v.parse().ok()),
        })
    }

    /// Samba or Windows AD, from `vendorName` (see the module doc).
    pub fn server_kind(&self) -> ServerKind {
        match &self.vendor_name {
            Some(v) if v.to_ascii_lowercase().contains("samba") => ServerKind::Samba,
            _ => ServerKind::ActiveDirectory,
        }
    }
}

/// The DNS name of a domain from its DN: `DC=lab,DC=example,DC=test` → `lab.example.test`.
pub fn dns_domain_of(dn: &str) -> String {
    dn.split(',')
        .filter_map(|rdn| {
            let (k, v) = rdn.trim().split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("DC")
                .then(|| v.trim().to_owned())
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// What kind of failure an error is, for exit codes and summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The directory could not be reached, or TLS failed.
    Unreachable,
    /// Authentication failed or the operation was not allowed.
    Denied,
    /// The named object does not exist.
    NotFound,
    /// The directory refused the change (constraint, value exists, ...).
    Refused,
    /// The input was malformed (URL, file).
    Usage,
}

/// Errors of the directory client.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The URL is not `ldap://` or `ldaps://` with a host.
    #[error("\"{url}\" is not a directory URL: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The CA file cannot be read.
    #[error("cannot read the CA file {}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The CA file has no usable certificate.
    #[error("the CA file {} holds no usable PEM certificate", path.display())]
    EmptyCa {
        /// The file.
        path: PathBuf,
    },
    /// TCP connection failed.
    #[error("cannot reach the directory at {url}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connecting or an operation took too long.
    #[error("the directory at {url} did not answer within {} s", timeout.as_secs())]
    TimedOut {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The server's certificate did not verify.
    #[error("the certificate of the directory at {url} does not verify against {trust}")]
    Certificate {
        /// The URL.
        url: String,
        /// "the CA file X" or "the system's trusted CAs".
        trust: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// TLS failed for another reason.
    #[error("TLS with the directory at {url} failed")]
    Tls {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server refused StartTLS.
    #[error("the directory at {url} refused StartTLS: {text}")]
    StartTls {
        /// The URL.
        url: String,
        /// The server's text.
        text: String,
    },
    /// An empty password would make a simple bind anonymous; it is refused before sending.
    #[error("the password for {user} is empty (an empty simple bind would be anonymous)")]
    EmptyPassword {
        /// The user.
        user: String,
    },
    /// The server refused the user name or password.
    #[error("the directory at {url} refused the credentials of {user}: {reason}")]
    InvalidCredentials {
        /// The URL.
        url: String,
        /// The bind name.
        user: String,
        /// What AD's `data` code says (wrong password, disabled, ...).
        reason: String,
        /// The server's text (`... AcceptSecurityContext error, data 52e, v1db1`).
        server_text: String,
    },
    /// GSSAPI could not authenticate.
    #[error("the Kerberos (GSSAPI) bind to the directory at {url} as ldap/{host} failed: {detail}")]
    Gssapi {
        /// The URL.
        url: String,
        /// The host in the SPN asked for.
        host: String,
        /// GSSAPI's message.
        detail: String,
    },
    /// The server refused the bind for another reason.
    #[error("the directory at {url} refused the bind: {text} (LDAP result {code})")]
    BindRefused {
        /// The URL.
        url: String,
        /// LDAP result code.
        code: u32,
        /// The server's text.
        text: String,
    },
    /// No usable rootDSE.
    #[error("the directory at {url} has no defaultNamingContext in its rootDSE")]
    RootDse {
        /// The URL.
        url: String,
    },
    /// An operation was not allowed (insufficient access rights).
    #[error("{op} on {dn} was denied by the directory: {text}")]
    AccessDenied {
        /// The operation.
        op: String,
        /// The object.
        dn: String,
        /// The server's text.
        text: String,
    },
    /// The object does not exist.
    #[error("{op}: {dn} does not exist")]
    NoSuchObject {
        /// The operation.
        op: String,
        /// The object.
        dn: String,
    },
    /// The server refused an operation.
    #[error("{op} on {dn} failed: {text} (LDAP result {code})")]
    Refused {
        /// The operation.
        op: String,
        /// The object.
        dn: String,
        /// LDAP result code.
        code: u32,
        /// The server's text.
        text: String,
    },
    /// The connection broke during an operation.
    #[error("the connection to {url} failed during {op}")]
    Connection {
        /// The URL.
        url: String,
        /// The operation.
        op: String,
        /// ldap3's error (boxed: it is large).
        #[source]
        source: Box<LdapError>,
    },
    /// No account has that name.
    #[error("Could not find account {name}")]
    AccountNotFound {
        /// The name given.
        name: String,
    },
    /// The SPN to remove is not among the attribute's values.
    #[error("{spn} is not registered in {attr} of {dn}")]
    SpnNotRegistered {
        /// The SPN.
        spn: String,
        /// The attribute (`servicePrincipalName`, `msDS-AllowedToDelegateTo`).
        attr: String,
        /// The object.
        dn: String,
    },
    /// The DC refused the SPN because another account holds it (AD and Samba enforce SPN
    /// uniqueness on writes).
    #[error("{spn} is already registered on another account; the directory refused it: {text}")]
    SpnNotUnique {
        /// The SPN.
        spn: String,
        /// The object it was to be added to.
        dn: String,
        /// The server's text.
        text: String,
    },
    /// The name matches more than one account.
    #[error("{name} matches more than one account: {}", dns.join("; "))]
    AmbiguousAccount {
        /// The name given.
        name: String,
        /// The matching DNs.
        dns: Vec<String>,
    },
}

impl DirectoryError {
    /// The kind of failure (for exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            DirectoryError::BadUrl { .. }
            | DirectoryError::ReadCa { .. }
            | DirectoryError::EmptyCa { .. }
            | DirectoryError::EmptyPassword { .. } => ErrorKind::Usage,
            DirectoryError::Unreachable { .. }
            | DirectoryError::TimedOut { .. }
            | DirectoryError::Certificate { .. }
            | DirectoryError::Tls { .. }
            | DirectoryError::StartTls { .. }
            | DirectoryError::RootDse { .. }
            | DirectoryError::Connection { .. } => ErrorKind::Unreachable,
            DirectoryError::InvalidCredentials { .. }
            | DirectoryError::Gssapi { .. }
            | DirectoryError::BindRefused { .. }
            | DirectoryError::AccessDenied { .. } => ErrorKind::Denied,
            DirectoryError::NoSuchObject { .. }
            | DirectoryError::AccountNotFound { .. }
            | DirectoryError::SpnNotRegistered { .. } => ErrorKind::NotFound,
            DirectoryError::Refused { .. }
            | DirectoryError::SpnNotUnique { .. }
            | DirectoryError::AmbiguousAccount { .. } => ErrorKind::Refused,
        }
    }

    /// The Windows code and a fix, for failures an administrator knows by their code.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match self {
            DirectoryError::InvalidCredentials { user, reason, .. } => Some(
                Diagnosis::new(
                    WinCode::LogonDenied,
                    format!("the directory refused {user}: {reason}"),
                )
                .with_fix(
                    "check the bind user and the password file (--bind-user, --password-file), \
                     or bind with Kerberos (--gssapi after kinit)",
                ),
            ),
            DirectoryError::Gssapi { detail, .. } if detail.contains("Sign or Seal") => None,
            DirectoryError::Gssapi { host, detail, .. }
                if detail.contains("Server not found in Kerberos database") =>
            {
                Some(
                    Diagnosis::new(
                        WinCode::TargetUnknown,
                        format!("the KDC does not know the directory's SPN ldap/{host}"),
                    )
                    .with_fix(
                        "connect by the DC's name (--ldap-url ldap://<dnsHostName>), or register \
                         the SPN on the DC's account: setspn -S ldap/<name> <DC>",
                    ),
                )
            }
            DirectoryError::Gssapi { detail, .. } => Some(
                Diagnosis::new(
                    WinCode::NoCredentials,
                    format!("no usable Kerberos credentials for the directory: {detail}"),
                )
                .with_fix("kinit a user first (or set KRB5CCNAME), or use --bind-user"),
            ),
            DirectoryError::Unreachable { url, source }
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                Some(
                    Diagnosis::new(
                        WinCode::ConnectionRefused,
                        format!("nothing listens at {url}"),
                    )
                    .with_fix("check --ldap-url / VMGATE_LDAP_URL and that the DC is running"),
                )
            }
            DirectoryError::TimedOut { url, .. } => Some(Diagnosis::new(
                WinCode::TimedOut,
                format!("the directory at {url} did not answer"),
            )),
            DirectoryError::AccessDenied { op, dn, .. } => Some(Diagnosis::new(
                WinCode::AccessDenied,
                format!("the bind user may not {op} on {dn}"),
            )),
            _ => None,
        }
    }
}

/// AD's reason for a failed bind, from the `data XXX` code in the server's text.
pub fn bind_failure_reason(server_text: &str) -> String {
    let code = server_text
        .split_once("data ")
        .map(|(_, rest)| {
            rest.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    let reason = match code.as_str() {
        "52e" => "wrong password or unknown user",
        "525" => "no such user",
        "530" => "logon not permitted at this time",
        "531" => "logon not permitted from this workstation",
        "532" => "the password has expired",
        "533" => "the account is disabled",
        "701" => "the account has expired",
        "773" => "the password must be changed",
        "775" => "the account is locked out",
        _ => "invalid credentials",
    };
    if code.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason} (data {code})")
    }
}

/// A parsed `ldap://` / `ldaps://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdapUrl {
    /// TLS from the start (`ldaps`) rather than StartTLS (`ldap`).
    pub ldaps: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (636 / 389 by default).
    pub port: u16,
}

impl LdapUrl {
    /// Parses `ldap[s]://host[:port][/]`.
    pub fn parse(url: &str) -> Result<LdapUrl, DirectoryError> {
        let bad = |reason| DirectoryError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let (ldaps, rest) = if let Some(rest) = strip_prefix_ci(url, "ldaps://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ci(url, "ldap://") {
            (false, rest)
        } else {
            return Err(bad("it must start with ldaps:// or ldap://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '@', ' ']) {
            return Err(bad("only ldap[s]://host[:port] is accepted"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("unexpected text after ']'")),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
            None if ldaps => 636,
            None => 389,
        };
        Ok(LdapUrl {
            ldaps,
            host: host.to_owned(),
            port,
        })
    }

    /// The host is an IP address (so GSSAPI needs the DC's name from the rootDSE).
    pub fn host_is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// One directory entry: its DN and attributes (names compared ignoring case).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The entry's DN.
    pub dn: String,
    attrs: HashMap<String, Vec<String>>,
    bin_attrs: HashMap<String, Vec<Vec<u8>>>,
}

impl Entry {
    fn from_search(e: SearchEntry) -> Entry {
        Entry {
            dn: e.dn,
            attrs: e
                .attrs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            bin_attrs: e
                .bin_attrs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        }
    }

    /// Builds an entry (for tests and callers that assemble facts themselves).
    pub fn new(dn: impl Into<String>, attrs: &[(&str, &[&str])]) -> Entry {
        Entry {
            dn: dn.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_ascii_lowercase(),
                        v.iter().map(|s| (*s).to_owned()).collect(),
                    )
                })
                .collect(),
            bin_attrs: HashMap::new(),
        }
    }

    /// All text values of `attr` (empty when absent).
    pub fn values(&self, attr: &str) -> &[String] {
        self.attrs
            .get(&attr.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The first text value of `attr`.
    pub fn first(&self, attr: &str) -> Option<&str> {
        self.values(attr).first().map(String::as_str)
    }

    /// Binary values of `attr` (those that are not UTF-8, e.g. `objectSid`).
    pub fn binary(&self, attr: &str) -> &[Vec<u8>] {
        self.bin_attrs
            .get(&attr.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// Search scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchScope {
    /// The base object only.
    Base,
    /// The base's children.
    OneLevel,
    /// The base and everything below it.
    Subtree,
}

impl From<SearchScope> for Scope {
    fn from(s: SearchScope) -> Scope {
        match s {
            SearchScope::Base => Scope::Base,
            SearchScope::OneLevel => Scope::OneLevel,
            SearchScope::Subtree => Scope::Subtree,
        }
    }
}

/// A change to one attribute, for [`Directory::modify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add these values (the attribute must not already hold any of them).
    Add(String, Vec<String>),
    /// Delete these values (each must be present); an empty list deletes the attribute.
    Delete(String, Vec<String>),
    /// Replace all values with these (empty: remove the attribute).
    Replace(String, Vec<String>),
}

impl Change {
    fn into_mod(self) -> Mod<String> {
        let set = |v: Vec<String>| v.into_iter().collect::<HashSet<_>>();
        match self {
            Change::Add(a, v) => Mod::Add(a, set(v)),
            Change::Delete(a, v) => Mod::Delete(a, set(v)),
            Change::Replace(a, v) => Mod::Replace(a, set(v)),
        }
    }
}

struct Inner {
    conn: Mutex<LdapConn>,
    url: String,
    root: RootDse,
    bound_as: String,
    timeout: Duration,
}

/// A connected, bound directory. Cheap to clone; see the module doc.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("url", &self.inner.url)
            .field("base_dn", &self.inner.root.default_naming_context)
            .field("bound_as", &self.inner.bound_as)
            .finish_non_exhaustive()
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, DirectoryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::io::Read;

    let read_err = |source| DirectoryError::ReadCa {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE + 1)
        .read_to_end(&mut pem)
        .map_err(read_err)?;
    if u64::try_from(pem.len()).unwrap_or(u64::MAX) > MAX_CA_FILE {
        return Err(read_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_CA_FILE} bytes"),
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        // A certificate rustls cannot use as a trust anchor is skipped; none at all is an error.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(DirectoryError::EmptyCa {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

fn tls_settings(config: &DirectoryConfig) -> Result<LdapConnSettings, DirectoryError> {
    let mut settings = LdapConnSettings::new().set_conn_timeout(config.timeout);
    match config.tls {
        TlsVerification::InsecureSkipVerify => {
            settings = settings.set_no_tls_verify(true);
        }
        TlsVerification::Verify => {
            if let Some(path) = &config.ca_file {
                let roots = load_roots(path)?;
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|source| DirectoryError::Certificate {
                        url: config.url.clone(),
                        trust: format!("the CA file {}", path.display()),
                        source,
                    })?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                settings = settings.set_config(Arc::new(tls));
            }
        }
    }
    Ok(settings)
}

/// The host names to try for the GSSAPI SPN `ldap/<host>`, best first: the configured one
/// alone; otherwise, for a URL naming an IP address, the DC's `dnsHostName` (what AD registers)
/// and then the address itself (what a lab may register, `ldap/127.0.0.10`); otherwise the
/// URL's host.
fn gssapi_hosts(config: &DirectoryConfig, url: &LdapUrl, root: &RootDse) -> Vec<String> {
    match (&config.gssapi_host, url.host_is_ip(), &root.dns_host_name) {
        (Some(h), _, _) => vec![h.clone()],
        (None, true, Some(name)) => vec![name.clone(), url.host.clone()],
        _ => vec![url.host.clone()],
    }
}

fn rustls_error_in(err: &io::Error) -> Option<rustls::Error> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
}

fn connect_error(config: &DirectoryConfig, err: LdapError) -> DirectoryError {
    let url = config.url.clone();
    let trust = match &config.ca_file {
        Some(p) => format!("the CA file {}", p.display()),
        None => "the system's trusted CAs".to_owned(),
    };
    match err {
        LdapError::Io { source } => match rustls_error_in(&source) {
            Some(source @ rustls::Error::InvalidCertificate(_)) => {
                DirectoryError::Certificate { url, trust, source }
            }
            Some(_) => DirectoryError::Tls { url, source },
            None if matches!(
                source.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ) =>
            {
                DirectoryError::Tls { url, source }
            }
            None => DirectoryError::Unreachable { url, source },
        },
        LdapError::Timeout { .. } => DirectoryError::TimedOut {
            url,
            timeout: config.timeout,
        },
        LdapError::LdapResult { result } => DirectoryError::StartTls {
            url,
            text: format!("{} (LDAP result {})", result.text, result.rc),
        },
        LdapError::DNSName { .. } => DirectoryError::BadUrl {
            url,
            reason: "the host is not a valid DNS name or IP address for TLS",
        },
        other => DirectoryError::Connection {
            url,
            op: "connect".to_owned(),
            source: Box::new(other),
        },
    }
}

const ROOT_DSE_ATTRS: [&str; 6] = [
    "defaultNamingContext",
    "configurationNamingContext",
    "dnsHostName",
    "vendorName",
    "vendorVersion",
    "domainFunctionality",
];

impl Directory {
    /// Connects, reads the rootDSE and binds (see the module doc).
    pub fn connect(config: &DirectoryConfig) -> Result<Directory, DirectoryError> {
        let url = LdapUrl::parse(&config.url)?;
        if let Bind::Simple { user, password } = &config.bind {
            if password.expose().is_empty() {
                return Err(DirectoryError::EmptyPassword { user: user.clone() });
            }
        }
        // ldap:// is upgraded with StartTLS, except for a GSSAPI bind, which seals the session
        // with Kerberos instead (Samba refuses GSSAPI without sign/seal even inside TLS).
        let gssapi = matches!(config.bind, Bind::Gssapi);
        let settings = tls_settings(config)?.set_starttls(!url.ldaps && !gssapi);
        let mut conn =
            LdapConn::with_settings(settings, &config.url).map_err(|e| connect_error(config, e))?;

        // The rootDSE, anonymously (AD allows it), before the bind: it gives the domain's
        // DNS name for the UPN and the DC's name for GSSAPI.
        let entries = conn
            .with_timeout(config.timeout)
            .search("", Scope::Base, "(objectClass=*)", ROOT_DSE_ATTRS.to_vec())
            .and_then(|r| r.success())
            .map_err(|e| op_error(&config.url, config.timeout, "read rootDSE", "", e))?;
        let root = entries
            .0
            .into_iter()
            .next()
            .map(|e| Entry::from_search(SearchEntry::construct(e)))
            .and_then(|e| RootDse::from_entry(&e))
            .ok_or_else(|| DirectoryError::RootDse {
                url: config.url.clone(),
            })?;

        let bound_as = match &config.bind {
            Bind::Simple { user, password } => {
                let name = bind_name(user, &dns_domain_of(&root.default_naming_context));
                let res = conn
                    .with_timeout(config.timeout)
                    .simple_bind(&name, password.expose())
                    .map_err(|e| connect_error(config, e))?;
                match res.rc {
                    0 => name,
                    49 => {
                        return Err(DirectoryError::InvalidCredentials {
                            url: config.url.clone(),
                            user: name,
                            reason: bind_failure_reason(&res.text),
                            server_text: res.text,
                        });
                    }
                    code => {
                        return Err(DirectoryError::BindRefused {
                            url: config.url.clone(),
                            code,
                            text: res.text,
                        });
                    }
                }
            }
            Bind::Gssapi => {
                let mut failure = None;
                for host in gssapi_hosts(config, &url, &root) {
                    let res = conn.with_timeout(config.timeout).sasl_gssapi_bind(&host);
                    let detail = match res {
                        Ok(r) if r.rc == 0 => {
                            failure = None;
                            break;
                        }
                        Ok(r) => format!("{} (LDAP result {})", r.text, r.rc),
                        Err(LdapError::GssapiOperationError(detail)) => detail.replace('\n', " "),
                        Err(e) => return Err(connect_error(config, e)),
                    };
                    let detail = if detail.contains("Sign or Seal are required") {
                        format!(
                            "{detail}; this DC wants Kerberos sealing, which needs \
                             ldap://{}:389 instead of ldaps:// for a GSSAPI bind",
                            if url.host.contains(':') {
                                format!("[{}]", url.host)
                            } else {
                                url.host.clone()
                            }
                        )
                    } else {
                        detail
                    };
                    // Only an unknown SPN is worth another name: nothing was sent yet.
                    let retry = detail.contains("Server not found in Kerberos database");
                    failure = Some(DirectoryError::Gssapi {
                        url: config.url.clone(),
                        host,
                        detail,
                    });
                    if !retry {
                        break;
                    }
                }
                if let Some(err) = failure {
                    return Err(err);
                }
                "(Kerberos credentials)".to_owned()
            }
        };
        Ok(Directory {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                url: config.url.clone(),
                root,
                bound_as,
                timeout: config.timeout,
            }),
        })
    }

    fn conn(&self) -> MutexGuard<'_, LdapConn> {
        // A panic while holding the lock leaves the connection usable: each operation is a
        // whole request/response exchange.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The URL connected to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The rootDSE facts.
    pub fn root_dse(&self) -> &RootDse {
        &self.inner.root
    }

    /// The domain's DN (`defaultNamingContext`), e.g. `DC=lab,DC=example,DC=test`.
    pub fn base_dn(&self) -> &str {
        &self.inner.root.default_naming_context
    }

    /// The domain's DNS name, e.g. `lab.example.test`.
    pub fn dns_domain(&self) -> String {
        dns_domain_of(self.base_dn())
    }

    /// The Kerberos realm (the DNS name in capitals).
    pub fn realm(&self) -> String {
        self.dns_domain().to_ascii_uppercase()
    }

    /// Samba or Windows AD.
    pub fn server_kind(&self) -> ServerKind {
        self.inner.root.server_kind()
    }

    /// True on a Samba DC (SPNs with spaces get escaped twins).
    pub fn is_samba(&self) -> bool {
        self.server_kind() == ServerKind::Samba
    }

    /// The name the connection is bound as (the simple-bind name, or a note for GSSAPI).
    pub fn bound_as(&self) -> &str {
        &self.inner.bound_as
    }

    /// A paged search; continuation references are skipped. `filter` must already have its
    /// values escaped (see [`filter`]).
    pub fn search(
        &self,
        base: &str,
        scope: SearchScope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<Entry>, DirectoryError> {
        let op = "search";
        let fail = |e| op_error(&self.inner.url, self.inner.timeout, op, base, e);
        let mut conn = self.conn();
        let adapters: Vec<Box<dyn Adapter<'static, String, Vec<String>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(PAGE_SIZE)),
        ];
        let attrs: Vec<String> = attrs.iter().map(|a| (*a).to_owned()).collect();
        let mut stream = conn
            .with_timeout(self.inner.timeout)
            .streaming_search_with(adapters, base, scope.into(), filter, attrs)
            .map_err(fail)?;
        let mut out = Vec::new();
        while let Some(entry) = stream.next().map_err(fail)? {
            out.push(Entry::from_search(SearchEntry::construct(entry)));
        }
        let result = stream.result();
        match result.rc {
            0 => Ok(out),
            // noSuchObject on the base: nothing there.
            32 if scope != SearchScope::Base => Err(DirectoryError::NoSuchObject {
                op: op.to_owned(),
                dn: base.to_owned(),
            }),
            32 => Ok(Vec::new()),
            _ => Err(fail(LdapError::from(result))),
        }
    }

    /// A subtree search of the whole domain.
    pub fn search_domain(
        &self,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<Entry>, DirectoryError> {
        self.search(self.base_dn(), SearchScope::Subtree, filter, attrs)
    }

    /// Reads one entry; `None` when it does not exist.
    pub fn read(&self, dn: &str, attrs: &[&str]) -> Result<Option<Entry>, DirectoryError> {
        Ok(self
            .search(dn, SearchScope::Base, "(objectClass=*)", attrs)?
            .into_iter()
            .next())
    }

    /// Applies changes to one entry in one modify operation (atomic on the server).
    pub fn modify(&self, dn: &str, changes: Vec<Change>) -> Result<(), DirectoryError> {
        let mods: Vec<Mod<String>> = changes.into_iter().map(Change::into_mod).collect();
        let res = self
            .conn()
            .with_timeout(self.inner.timeout)
            .modify(dn, mods)
            .and_then(|r| r.success());
        res.map(|_| ())
            .map_err(|e| op_error(&self.inner.url, self.inner.timeout, "modify", dn, e))
    }

    /// Adds values to an attribute of `dn`.
    pub fn add_values(
        &self,
        dn: &str,
        attr: &str,
        values: &[String],
    ) -> Result<(), DirectoryError> {
        self.modify(dn, vec![Change::Add(attr.to_owned(), values.to_vec())])
    }

    /// Deletes values from an attribute of `dn` (each must be present).
    pub fn delete_values(
        &self,
        dn: &str,
        attr: &str,
        values: &[String],
    ) -> Result<(), DirectoryError> {
        self.modify(dn, vec![Change::Delete(attr.to_owned(), values.to_vec())])
    }

    /// Replaces all values of an attribute of `dn`.
    pub fn replace_values(
        &self,
        dn: &str,
        attr: &str,
        values: &[String],
    ) -> Result<(), DirectoryError> {
        self.modify(dn, vec![Change::Replace(attr.to_owned(), values.to_vec())])
    }

    /// Creates an entry. Values are bytes so that binary attributes (`unicodePwd`) fit.
    pub fn add_entry(
        &self,
        dn: &str,
        attrs: Vec<(String, Vec<Vec<u8>>)>,
    ) -> Result<(), DirectoryError> {
        let attrs: Vec<(Vec<u8>, HashSet<Vec<u8>>)> = attrs
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_iter().collect()))
            .collect();
        let res = self
            .conn()
            .with_timeout(self.inner.timeout)
            .add(dn, attrs)
            .and_then(|r| r.success());
        res.map(|_| ())
            .map_err(|e| op_error(&self.inner.url, self.inner.timeout, "add", dn, e))
    }

    /// Deletes an entry (a leaf).
    pub fn delete_entry(&self, dn: &str) -> Result<(), DirectoryError> {
        let res = self
            .conn()
            .with_timeout(self.inner.timeout)
            .delete(dn)
            .and_then(|r| r.success());
        res.map(|_| ())
            .map_err(|e| op_error(&self.inner.url, self.inner.timeout, "delete", dn, e))
    }

    /// Sets an account's password (`unicodePwd`; needs TLS, which every connection has).
    pub fn set_password(&self, dn: &str, password: &Secret) -> Result<(), DirectoryError> {
        let value = unicode_pwd(password);
        let res = self
            .conn()
            .with_timeout(self.inner.timeout)
            .modify(
                dn,
                vec![Mod::Replace(
                    b"unicodePwd".to_vec(),
                    std::iter::once(value).collect(),
                )],
            )
            .and_then(|r| r.success());
        res.map(|_| ())
            .map_err(|e| op_error(&self.inner.url, self.inner.timeout, "set password", dn, e))
    }

    /// Whether `member_dn` is a member of `group_dn`, directly or through nested groups
    /// (LDAP_MATCHING_RULE_IN_CHAIN, [`MATCHING_RULE_IN_CHAIN`]). The primary group
    /// (`primaryGroupID`, usually Domain Users) is not a `member` link and is not counted.
    pub fn is_member_of(&self, member_dn: &str, group_dn: &str) -> Result<bool, DirectoryError> {
        let filter = format!(
            "(memberOf:{MATCHING_RULE_IN_CHAIN}:={})",
            filter::escape_value(group_dn)
        );
        Ok(!self
            .search(member_dn, SearchScope::Base, &filter, &["1.1"])?
            .is_empty())
    }

    /// Finds a group by `sAMAccountName`, `cn` or DN.
    pub fn find_group(&self, name: &str) -> Result<Option<Entry>, DirectoryError> {
        let attrs = ["sAMAccountName", "cn", "objectClass", "objectSid", "member"];
        if name.contains('=') {
            return Ok(self.read(name, &attrs)?.filter(|e| {
                e.values("objectClass")
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case("group"))
            }));
        }
        let f = format!(
            "(&(objectClass=group)(|{}{}))",
            filter::eq("sAMAccountName", name),
            filter::eq("cn", name)
        );
        Ok(self.search_domain(&f, &attrs)?.into_iter().next())
    }
}

/// The name sent in a simple bind: a bare user name becomes a UPN in `dns_domain`.
pub fn bind_name(user: &str, dns_domain: &str) -> String {
    if user.contains(['@', '=', '\\']) || dns_domain.is_empty() {
        user.to_owned()
    } else {
        format!("{user}@{dns_domain}")
    }
}

/// AD's `unicodePwd` value: the password in double quotes, UTF-16LE.
fn unicode_pwd(password: &Secret) -> Vec<u8> {
    format!("\"{}\"", password.expose())
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect()
}

fn op_error(url: &str, timeout: Duration, op: &str, dn: &str, err: LdapError) -> DirectoryError {
    match err {
        LdapError::LdapResult { result } => match result.rc {
            32 => DirectoryError::NoSuchObject {
                op: op.to_owned(),
                dn: dn.to_owned(),
            },
            50 => DirectoryError::AccessDenied {
                op: op.to_owned(),
                dn: dn.to_owned(),
                text: result.text,
            },
            code => DirectoryError::Refused {
                op: op.to_owned(),
                dn: dn.to_owned(),
                code,
                text: result.text,
            },
        },
        LdapError::Timeout { .. } => DirectoryError::TimedOut {
            url: url.to_owned(),
            timeout,
        },
        other => DirectoryError::Connection {
            url: url.to_owned(),
            op: op.to_owned(),
            source: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_small() {
        // Other modules' errors wrap this one; clippy's result_large_err limit is 128 bytes.
        assert!(std::mem::size_of::<DirectoryError>() <= 112);
    }

    #[test]
    fn parses_ldap_urls() {
        assert_eq!(
            LdapUrl::parse("ldaps://127.0.0.10").unwrap(),
            LdapUrl {
                ldaps: true,
                host: "127.0.0.10".into(),
                port: 636
            }
        );
        let u = LdapUrl::parse("LDAP://dc1.lab.example.test:3890/").unwrap();
        assert_eq!(
            (u.ldaps, u.host.as_str(), u.port),
            (false, "dc1.lab.example.test", 3890)
        );
        assert!(!u.host_is_ip());
        let u = LdapUrl::parse("ldaps://[::1]:6360").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 6360));
        assert!(u.host_is_ip());
        for bad in [
            "http://x",
            "ldaps://",
            "ldaps://h:0",
            "ldaps://h:x",
            "ldaps://h/dc=x",
            "ldaps://[::1",
            "ldaps://u@h",
        ] {
            assert!(
                matches!(LdapUrl::parse(bad), Err(DirectoryError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn dns_domain_and_bind_names() {
        assert_eq!(
            dns_domain_of("DC=lab,DC=example,DC=test"),
            "lab.example.test"
        );
        assert_eq!(dns_domain_of("CN=x,dc=a, DC=b"), "a.b");
        assert_eq!(
            bind_name("alice", "lab.example.test"),
            "alice@lab.example.test"
        );
        assert_eq!(
            bind_name("alice@LAB.EXAMPLE.TEST", "x"),
            "alice@LAB.EXAMPLE.TEST"
        );
        assert_eq!(bind_name("LAB\\alice", "x"), "LAB\\alice");
        assert_eq!(
            bind_name("CN=Administrator,CN=Users,DC=lab", "x"),
            "CN=Administrator,CN=Users,DC=lab"
        );
    }

    #[test]
    fn explains_ad_bind_failures() {
        let text = "80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, \
                    data 52e, v1db1";
        assert_eq!(
            bind_failure_reason(text),
            "wrong password or unknown user (data 52e)"
        );
        assert_eq!(
            bind_failure_reason("... data 533, v893"),
            "the account is disabled (data 533)"
        );
        assert_eq!(bind_failure_reason("nothing"), "invalid credentials");
    }

    #[test]
    fn detects_samba_from_vendor_name() {
        let mut root = RootDse {
            default_naming_context: "DC=lab,DC=example,DC=test".into(),
            configuration_naming_context: None,
            dns_host_name: None,
            vendor_name: Some("Samba Team (https://www.samba.org)".into()),
            vendor_version: None,
            domain_functionality: None,
        };
        assert_eq!(root.server_kind(), ServerKind::Samba);
        root.vendor_name = None;
        assert_eq!(root.server_kind(), ServerKind::ActiveDirectory);
    }

    #[test]
    fn unicode_pwd_is_quoted_utf16le() {
        assert_eq!(
            unicode_pwd(&Secret::new("a")),
            vec![b'"', 0, b'a', 0, b'"', 0]
        );
    }

    #[test]
    fn entries_compare_attribute_names_ignoring_case() {
        let e = Entry::new("CN=x", &[("servicePrincipalName", &["HOST/x"])]);
        assert_eq!(e.values("SERVICEPRINCIPALNAME"), ["HOST/x".to_owned()]);
        assert_eq!(e.first("missing"), None);
        assert!(e.binary("objectSid").is_empty());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = load_roots(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read the CA file /nonexistent/ca.pem"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        assert!(matches!(
            load_roots(&p),
            Err(DirectoryError::EmptyCa { .. })
        ));
    }
}
