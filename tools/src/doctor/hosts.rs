//! Where the hosts are: an address given on the command line, a vmgated configuration file, the
//! lab's configuration folder, or this machine's resolver — in that order.
//!
//! | source | S | D |
//! |---|---|---|
//! | flag | `--from-address IP[:PORT]` | `--to-address IP[:PORT]` |
//! | vmgated config | `--from-config FILE` | `--to-config FILE` |
//! | the lab | `$VMGATE_LAB_DIR/S/vmgated.toml` | `$VMGATE_LAB_DIR/D/vmgated.toml` |
//! | resolver | `S` if it has a dot, else `S.<realm>` | the same for D |
//!
//! (The same resolution as the CLI's `--host`, see the CLI spec.) The port defaults to 6600.
//!
//! A configuration file is read with the daemon's own parser ([`vmgate_control::config`]): a
//! file `vmgated --check` refuses is refused here too, with the same message.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

pub use vmgate_control::DEFAULT_PORT;
use vmgate_control::config::{Config, ConfigError};

/// Errors of reading a host's configuration or address.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file cannot be read, or is not a valid vmgated configuration.
    #[error("cannot read the vmgated configuration {}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// An address is not `IP` or `IP:PORT`.
    #[error("\"{0}\" is not an address: give IP or IP:PORT ([v6]:PORT)")]
    BadAddress(String),
}

/// What the doctor takes from a vmgated configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// The file.
    pub path: PathBuf,
    /// `host_name`.
    pub host_name: Option<String>,
    /// `fqdn`.
    pub fqdn: Option<String>,
    /// `realm`.
    pub realm: Option<String>,
    /// `keytab`.
    pub keytab: Option<PathBuf>,
    /// `account`.
    pub account: Option<String>,
    /// `listen`, parsed (port 6600 when none is given).
    pub listen: Vec<SocketAddr>,
    /// `spn_class`.
    pub spn_class: Option<String>,
    /// `admin_group`.
    pub admin_group: Option<String>,
    /// `[migration] auth`.
    pub auth: Option<String>,
}

/// `IP`, `IP:PORT` or `[v6]:PORT`, the port defaulting to 6600.
pub fn parse_address(text: &str) -> Result<SocketAddr, HostsError> {
    let t = text.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = t.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| HostsError::BadAddress(text.to_owned()))
}

impl HostConfig {
    /// Reads and checks `path` with the daemon's parser. The optional keys are the ones the
    /// file sets: another host's defaults (its keytab) are not this machine's files.
    pub fn load(path: &Path) -> Result<HostConfig, HostsError> {
        let file = Config::load_file(path).map_err(|source| HostsError::Config {
            path: path.to_owned(),
            source,
        })?;
        let c = &file.config;
        let set = |key: &str| file.sets(key);
        Ok(HostConfig {
            path: path.to_owned(),
            host_name: Some(c.host_name.clone()),
            fqdn: Some(c.fqdn.clone()),
            realm: Some(c.realm.clone()),
            keytab: set("keytab").then(|| c.keytab.clone()),
            account: set("account").then(|| c.account.clone()),
            listen: c.listen.clone(),
            spn_class: set("spn_class").then(|| c.spn_class.clone()),
            admin_group: set("admin_group").then(|| c.admin_group.clone()),
            auth: set("migration.auth").then(|| c.migration.auth.as_str().to_owned()),
        })
    }
}

/// How a host's address was found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "source", content = "from")]
pub enum AddressSource {
    /// `--from-address` / `--to-address`.
    Flag,
    /// A vmgated configuration (`--from-config`, `--to-config` or the lab folder).
    Config(PathBuf),
    /// This machine's resolver (/etc/hosts, DNS), for the name.
    Resolver(String),
}

/// The DNS name commands connect to for host `name`: itself when it has a dot, else
/// `name.<realm in lower case>` (the CLI's rule).
pub fn dns_name(name: &str, realm: Option<&str>) -> String {
    match realm {
        Some(r) if !name.contains('.') && !r.is_empty() => {
            format!("{name}.{}", r.to_ascii_lowercase())
        }
        _ => name.to_owned(),
    }
}

/// Resolves `name` with this machine's resolver (getaddrinfo: /etc/hosts, then DNS).
pub fn resolve(name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let mut v: Vec<SocketAddr> = (name, port).to_socket_addrs()?.collect();
    v.dedup();
    if v.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        ));
    }
    Ok(v)
}

/// `$VMGATE_LAB_DIR/<name>/vmgated.toml`, when it exists.
pub fn lab_config(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("VMGATE_LAB_DIR").filter(|v| !v.is_empty())?;
    let short = name.split('.').next().unwrap_or(name);
    let p = Path::new(&dir).join(short).join("vmgated.toml");
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_keys_it_needs_with_the_daemons_parser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = r#"
# comment
host_name = "hv2"   # trailing
fqdn = "hv2.lab.example.test"
realm = 'LAB.EXAMPLE.TEST'
keytab = "/etc/vmgate/hv2.keytab"
listen = ["127.0.0.12", "127.0.0.12:7000",
          "[::1]:6601"]
admin_group = "Hyper-V \"Admins\" #1"
storage_roots = ["/a"]
[directory]
url = "ldap://dc1"
[migration]
auth = "credssp"
enabled = true
any_network = true
"#;
        std::fs::write(&path, text).unwrap();
        let c = HostConfig::load(&path).unwrap();
        assert_eq!(c.host_name.as_deref(), Some("hv2"));
        assert_eq!(c.realm.as_deref(), Some("LAB.EXAMPLE.TEST"));
        assert_eq!(c.keytab, Some(PathBuf::from("/etc/vmgate/hv2.keytab")));
        // Not set in the file: the daemon's default is that host's, not the doctor's.
        assert_eq!(c.account, None);
        assert_eq!(
            c.listen,
            vec![
                "127.0.0.12:6600".parse().unwrap(),
                "127.0.0.12:7000".parse().unwrap(),
                "[::1]:6601".parse().unwrap()
            ]
        );
        assert_eq!(c.admin_group.as_deref(), Some("Hyper-V \"Admins\" #1"));
        assert_eq!(c.auth.as_deref(), Some("credssp"));
        // What vmgated refuses, the doctor refuses, with the parser's message.
        for bad in [
            "host_name = 3\n",
            "listen = [\"1.2.3.4\"\n",
            "listen = [\"nope\"]\n",
            "just words\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = HostConfig::load(&path).unwrap_err();
            assert!(matches!(e, HostsError::Config { .. }), "{bad}: {e:?}");
        }
        let e = HostConfig::load(&dir.path().join("none.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the vmgated configuration"),
            "{e}"
        );
    }

    #[test]
    fn addresses_and_names() {
        assert_eq!(
            parse_address("127.0.0.12").unwrap(),
            "127.0.0.12:6600".parse().unwrap()
        );
        assert_eq!(
            parse_address("[::1]").unwrap(),
            "[::1]:6600".parse().unwrap()
        );
        assert!(parse_address("hv2").is_err());
        assert_eq!(
            dns_name("hv2", Some("LAB.EXAMPLE.TEST")),
            "hv2.lab.example.test"
        );
        assert_eq!(dns_name("hv2.x.y", Some("LAB")), "hv2.x.y");
        assert_eq!(dns_name("hv2", None), "hv2");
    }
}
