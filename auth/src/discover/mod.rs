//! A joined host's own configuration, found the way its other Kerberos programs find it: no
//! `VMGATE_*` variable needed.
//!
//! | what | from |
//! |---|---|
//! | the realm | krb5.conf's `default_realm`, read by libkrb5 ([`default_realm`]; honours `KRB5_CONFIG` and includes) |
//! | the domain controllers (LDAP) | DNS SRV `_ldap._tcp.dc._msdcs.<domain>` ([`domain_controllers`]) |
//! | the KDCs | krb5.conf's `kdc =` lines of the realm, else (`dns_lookup_kdc`, on by default) DNS SRV `_kerberos._tcp.<REALM>` and `_kerberos._udp.<REALM>` ([`kdcs`]), as libkrb5 does |
//! | the directory connection | the first DC that answers, `ldap://<dc>` with Kerberos sealing (GSSAPI, the process's tickets) or StartTLS for a simple bind, its certificate checked against the system's trust store by the DC's name ([`connect_directory`]) |
//! | this host's identity | the default keytab (`/etc/krb5.keytab`, `KRB5_KTNAME`, krb5.conf's `default_keytab_name`) and the `HOST$` account in it ([`system_identity`]) |
//! | another host (`--host H`) | `H` with a dot as given, else `H.<domain>`, through the system resolver ([`resolve_host`]) |
//!
//! DNS goes through the system resolver (`/etc/resolv.conf`, libc's `res_query`), host names
//! through `getaddrinfo` (`/etc/hosts`, then DNS): what the host's other programs see. The
//! domain's DNS name is the realm in lower case (as AD requires of its domains).

pub mod dns;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::directory::{Bind, Directory, DirectoryConfig, DirectoryError};
use crate::krb::keytab;
use crate::krb::libkrb5::{self, Krb5Error};

pub use dns::{DnsError, SrvRecord};

/// The LDAP port when SRV gives none.
pub const LDAP_PORT: u16 = 389;
/// The Kerberos port.
pub const KDC_PORT: u16 = 88;

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// krb5.conf could not be read.
    #[error("cannot read the Kerberos configuration")]
    Config(#[source] Krb5Error),
    /// No realm is configured.
    #[error(
        "no Kerberos realm: krb5.conf ({}) has no default_realm in [libdefaults]; join the \
         domain (realm join / adcli join) or set default_realm",
        config_files_text()
    )]
    NoRealm,
    /// DNS does not name the domain's controllers.
    #[error("cannot find a domain controller of {domain} in DNS")]
    NoDomainController {
        /// The DNS domain.
        domain: String,
        /// The lookup's failure.
        #[source]
        source: DnsError,
    },
    /// DNS does not name the realm's KDCs.
    #[error("cannot find a KDC of {realm}: krb5.conf has no \"kdc =\" line for it{}", if *dns_lookup { " and DNS has no _kerberos SRV record" } else { " and dns_lookup_kdc is off" })]
    NoKdc {
        /// The realm.
        realm: String,
        /// Whether DNS was asked.
        dns_lookup: bool,
        /// The DNS failure, when DNS was asked.
        #[source]
        source: Option<DnsError>,
    },
    /// Every domain controller failed.
    #[error("no domain controller of {domain} could be used (tried {})", tried.join(", "))]
    DirectoryUnavailable {
        /// The DNS domain.
        domain: String,
        /// The URLs tried.
        tried: Vec<String>,
        /// The last failure.
        #[source]
        source: Box<DirectoryError>,
    },
    /// A host name does not resolve.
    #[error("cannot resolve {name}")]
    Resolve {
        /// The name asked for.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host's keytab cannot be read or holds no host account.
    #[error("{} holds no key of a computer account (NAME$)", path.display())]
    NoHostAccount {
        /// The keytab.
        path: PathBuf,
    },
    /// The keytab cannot be read.
    #[error(transparent)]
    Keytab(#[from] keytab::KeytabError),
}

impl DiscoverError {
    /// The directory error behind a failed connection, if that is what failed.
    pub fn directory_error(&self) -> Option<&DirectoryError> {
        match self {
            DiscoverError::DirectoryUnavailable { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The krb5.conf files libkrb5 reads: `KRB5_CONFIG` (colon-separated), else /etc/krb5.conf.
pub fn config_files() -> Vec<PathBuf> {
    match std::env::var_os("KRB5_CONFIG") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
        _ => vec![PathBuf::from("/etc/krb5.conf")],
    }
}

fn config_files_text() -> String {
    config_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// krb5.conf's `default_realm`, as libkrb5 reads it.
pub fn default_realm() -> Result<String, DiscoverError> {
    libkrb5::default_realm()
        .map_err(DiscoverError::Config)?
        .ok_or(DiscoverError::NoRealm)
}

/// The realm to use: `given` when set, else [`default_realm`].
pub fn realm_or_default(given: Option<&str>) -> Result<String, DiscoverError> {
    match given.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => Ok(r.to_ascii_uppercase()),
        None => default_realm(),
    }
}

/// The AD domain's DNS name for a realm (`LAB.EXAMPLE.TEST` → `lab.example.test`).
pub fn dns_domain(realm: &str) -> String {
    realm.trim_end_matches('.').to_ascii_lowercase()
}

/// The domain's controllers (`_ldap._tcp.dc._msdcs.<domain>`), in the order to try them.
pub fn domain_controllers(realm: &str) -> Result<Vec<SrvRecord>, DiscoverError> {
    let domain = dns_domain(realm);
    dns::query_srv(&format!("_ldap._tcp.dc._msdcs.{domain}"))
        .map_err(|source| DiscoverError::NoDomainController { domain, source })
}

/// Where the KDCs of a realm were found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KdcSource {
    /// The `kdc =` lines of krb5.conf.
    Config,
    /// DNS SRV records (the name asked for).
    Dns(String),
}

/// A realm's KDCs and where they came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KdcList {
    /// The realm.
    pub realm: String,
    /// The servers, `host[:port]` as configured, or from SRV.
    pub servers: Vec<(String, u16)>,
    /// Where they came from.
    pub source: KdcSource,
}

impl KdcList {
    /// The servers as socket addresses (each resolved; unresolvable ones are skipped, and the
    /// first resolution error is returned when none resolves).
    pub fn addresses(&self) -> Result<Vec<SocketAddr>, DiscoverError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for (host, port) in &self.servers {
            match (host.as_str(), *port).to_socket_addrs() {
                Ok(a) => out.extend(a),
                Err(source) => {
                    first_err.get_or_insert(DiscoverError::Resolve {
                        name: host.clone(),
                        source,
                    });
                }
            }
        }
        out.dedup();
        match (out.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }

    /// `host:port, ...` for messages.
    pub fn describe(&self) -> String {
        let list = self
            .servers
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        match &self.source {
            KdcSource::Config => format!("{list} (krb5.conf)"),
            KdcSource::Dns(name) => format!("{list} (DNS {name})"),
        }
    }
}

/// A `kdc =` value (`host`, `host:port`, `[v6]:port`, `tcp/host`) as host and port.
pub fn parse_kdc_value(value: &str) -> (String, u16) {
    let v = value
        .trim()
        .trim_start_matches("tcp/")
        .trim_start_matches("udp/")
        .trim_start_matches("kkdcp/");
    if let Some(rest) = v.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(KDC_PORT);
        return (host.to_owned(), port);
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
            Ok(port) => (h.to_owned(), port),
            Err(_) => (v.to_owned(), KDC_PORT),
        },
        _ => (v.to_owned(), KDC_PORT),
    }
}

/// The realm's KDCs as libkrb5 finds them: krb5.conf's `kdc =` lines of `[realms] REALM`;
/// without any, when `dns_lookup_kdc` is on (MIT's default), DNS SRV `_kerberos._tcp.REALM`,
/// then `_kerberos._udp.REALM`.
pub fn kdcs(realm: &str) -> Result<KdcList, DiscoverError> {
    let configured =
        libkrb5::profile_values(&["realms", realm, "kdc"]).map_err(DiscoverError::Config)?;
    if !configured.is_empty() {
        return Ok(KdcList {
            realm: realm.to_owned(),
            servers: configured.iter().map(|v| parse_kdc_value(v)).collect(),
            source: KdcSource::Config,
        });
    }
    let dns_lookup = libkrb5::profile_bool("libdefaults", "dns_lookup_kdc", true)
        .map_err(DiscoverError::Config)?;
    if !dns_lookup {
        return Err(DiscoverError::NoKdc {
            realm: realm.to_owned(),
            dns_lookup,
            source: None,
        });
    }
    let mut last = None;
    for proto in ["_tcp", "_udp"] {
        let name = format!("_kerberos.{proto}.{realm}");
        match dns::query_srv(&name) {
            Ok(records) => {
                return Ok(KdcList {
                    realm: realm.to_owned(),
                    servers: records.into_iter().map(|r| (r.target, r.port)).collect(),
                    source: KdcSource::Dns(name),
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(DiscoverError::NoKdc {
        realm: realm.to_owned(),
        dns_lookup,
        source: last,
    })
}

/// The directory URLs of the domain's controllers, best first: `ldap://<dc>:<port>` (GSSAPI
/// seals the session with Kerberos; a simple bind is upgraded with StartTLS, the certificate
/// checked by the DC's name).
pub fn directory_urls(realm: &str) -> Result<Vec<String>, DiscoverError> {
    Ok(domain_controllers(realm)?
        .into_iter()
        .map(|r| {
            let port = if r.port == 0 { LDAP_PORT } else { r.port };
            format!("ldap://{}:{port}", r.target)
        })
        .collect())
}

/// Connects to the first domain controller DNS names for `realm` that answers and binds with
/// `bind` (GSSAPI with the process's tickets by default, as Windows tools use the logged-on
/// user). The certificate of a StartTLS upgrade is checked against `ca_file`, or the system's
/// trust store when `None`. Only an unreachable DC makes it try the next: a refused bind is
/// returned as it is.
pub fn connect_directory(
    realm: &str,
    bind: Bind,
    ca_file: Option<PathBuf>,
    configure: impl Fn(&mut DirectoryConfig),
) -> Result<Directory, DiscoverError> {
    let urls = directory_urls(realm)?;
    let mut tried = Vec::new();
    let mut last = None;
    for url in urls {
        let mut config = DirectoryConfig::new(url.clone(), ca_file.clone(), bind.clone());
        configure(&mut config);
        tried.push(url);
        match Directory::connect(&config) {
            Ok(d) => return Ok(d),
            Err(e) if e.kind() == crate::directory::ErrorKind::Unreachable => last = Some(e),
            Err(e) => {
                return Err(DiscoverError::DirectoryUnavailable {
                    domain: dns_domain(realm),
                    tried,
                    source: Box::new(e),
                });
            }
        }
    }
    Err(DiscoverError::DirectoryUnavailable {
        domain: dns_domain(realm),
        tried,
        source: Box::new(last.unwrap_or(DirectoryError::RootDse {
            url: "(none)".into(),
        })),
    })
}

/// A host as `--host H` names it, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedHost {
    /// The short name (`hv2`).
    pub short: String,
    /// The DNS name (its SPNs' host): H when it has a dot, else `H.<domain>`.
    pub fqdn: String,
    /// Its addresses with `port`.
    pub addresses: Vec<SocketAddr>,
}

/// Resolves a host name given on the command line: a name with a dot as it is, a short name
/// as `<name>.<domain of realm>` (the realm: `realm`, else krb5.conf's default), each through
/// the system resolver (`/etc/hosts`, DNS).
pub fn resolve_host(
    name: &str,
    port: u16,
    realm: Option<&str>,
) -> Result<ResolvedHost, DiscoverError> {
    let name = name.trim().trim_end_matches('.');
    let short = name.split('.').next().unwrap_or(name).to_ascii_lowercase();
    let fqdn = if name.contains('.') || name.parse::<std::net::IpAddr>().is_ok() {
        name.to_ascii_lowercase()
    } else {
        let realm = realm_or_default(realm)?;
        format!("{short}.{}", dns_domain(&realm))
    };
    let mut addresses: Vec<SocketAddr> = (fqdn.as_str(), port)
        .to_socket_addrs()
        .map_err(|source| DiscoverError::Resolve {
            name: fqdn.clone(),
            source,
        })?
        .collect();
    addresses.dedup();
    if addresses.is_empty() {
        return Err(DiscoverError::Resolve {
            name: fqdn,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        });
    }
    Ok(ResolvedHost {
        short,
        fqdn,
        addresses,
    })
}

/// What a joined host is, from its own keytab: what vmgated uses when its configuration
/// names no keytab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The keytab (`/etc/krb5.keytab`).
    pub keytab: PathBuf,
    /// The computer account as the keytab spells it (`HV1$`).
    pub account: String,
    /// The realm of that entry.
    pub realm: String,
    /// The host's DNS name: from a `host/<fqdn>` entry of the keytab, else the system's host
    /// name, else `<account>.<domain>`.
    pub fqdn: String,
    /// The short name (`hv1`).
    pub short: String,
}

/// The default keytab's path (`FILE:` or `WRFILE:` names only).
pub fn default_keytab() -> Result<PathBuf, DiscoverError> {
    let name = libkrb5::default_keytab_name().map_err(DiscoverError::Config)?;
    let path = name
        .strip_prefix("FILE:")
        .or_else(|| name.strip_prefix("WRFILE:"))
        .unwrap_or(&name);
    Ok(PathBuf::from(path))
}

/// This host's identity from the default keytab ([`default_keytab`]) and its host name.
pub fn system_identity() -> Result<SystemIdentity, DiscoverError> {
    identity_from_keytab(&default_keytab()?, system_host_name().as_deref())
}

/// The system's host name (`gethostname`, as `/proc/sys/kernel/hostname` shows it).
pub fn system_host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
}

/// The identity in `path`: the computer account (`NAME$`) matching `host_name`'s first label
/// when there is one, else the only computer account in it.
pub fn identity_from_keytab(
    path: &Path,
    host_name: Option<&str>,
) -> Result<SystemIdentity, DiscoverError> {
    let entries = keytab::read(path)?;
    let short_host = host_name.map(|h| h.split('.').next().unwrap_or(h).to_ascii_lowercase());
    let accounts: Vec<&keytab::KeytabEntry> = entries
        .iter()
        .filter(|e| !e.name.contains('/') && e.name.ends_with('$'))
        .collect();
    let chosen = accounts
        .iter()
        .find(|e| {
            short_host
                .as_deref()
                .is_some_and(|h| e.name.trim_end_matches('$').eq_ignore_ascii_case(h))
        })
        .or_else(|| accounts.first())
        .ok_or_else(|| DiscoverError::NoHostAccount {
            path: path.to_owned(),
        })?;
    let short = chosen.name.trim_end_matches('$').to_ascii_lowercase();
    let fqdn = entries
        .iter()
        .filter_map(|e| {
            let (class, host) = e.name.split_once('/')?;
            (class.eq_ignore_ascii_case("host")
                && host.contains('.')
                && host
                    .split('.')
                    .next()
                    .is_some_and(|l| l.eq_ignore_ascii_case(&short)))
            .then(|| host.to_ascii_lowercase())
        })
        .next()
        .or_else(|| {
            host_name
                .filter(|h| h.contains('.') && h.split('.').next() == Some(short.as_str()))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{short}.{}", dns_domain(&chosen.realm)));
    Ok(SystemIdentity {
        keytab: path.to_owned(),
        account: chosen.name.clone(),
        realm: chosen.realm.clone(),
        fqdn,
        short,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdc_values_and_domains() {
        assert_eq!(parse_kdc_value("127.0.0.10:88"), ("127.0.0.10".into(), 88));
        assert_eq!(parse_kdc_value("tcp/dc1.lab"), ("dc1.lab".into(), 88));
        assert_eq!(parse_kdc_value("[::1]:1088"), ("::1".into(), 1088));
        assert_eq!(parse_kdc_value("fe80::1"), ("fe80::1".into(), 88));
        assert_eq!(dns_domain("LAB.EXAMPLE.TEST"), "lab.example.test");
        assert_eq!(realm_or_default(Some(" lab.x ")).unwrap(), "LAB.X");
    }

    #[test]
    fn the_host_account_comes_from_the_keytab() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("krb5.keytab");
        let mut kt = vec![5u8, 2];
        for (name, kvno) in [
            (&["HOST", "hv1.lab.example.test"][..], 3u32),
            (&["RestrictedKrbHost", "hv1"][..], 3),
            (&["OTHER$"][..], 1),
            (&["HV1$"][..], 3),
        ] {
            kt.extend_from_slice(&keytab::encode_entry(&keytab::NewEntry {
                components: name.iter().map(|s| (*s).to_owned()).collect(),
                realm: "LAB.EXAMPLE.TEST".into(),
                kvno,
                enctype: 18,
                key: zeroize::Zeroizing::new(vec![7; 32]),
                timestamp: 0,
            }));
        }
        std::fs::write(&path, &kt).unwrap();
        let id = identity_from_keytab(&path, Some("hv1")).unwrap();
        assert_eq!(
            (
                id.account.as_str(),
                id.realm.as_str(),
                id.fqdn.as_str(),
                id.short.as_str()
            ),
            ("HV1$", "LAB.EXAMPLE.TEST", "hv1.lab.example.test", "hv1")
        );
        let id = identity_from_keytab(&path, Some("other.lab.example.test")).unwrap();
        assert_eq!(
            (id.account.as_str(), id.fqdn.as_str()),
            ("OTHER$", "other.lab.example.test")
        );
        std::fs::write(&path, [5u8, 2]).unwrap();
        assert!(matches!(
            identity_from_keytab(&path, None),
            Err(DiscoverError::NoHostAccount { .. })
        ));
    }
}
