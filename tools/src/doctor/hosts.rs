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
//! The configuration reader takes the few keys the doctor needs (`host_name`, `fqdn`, `realm`,
//! `keytab`, `account`, `listen`, `spn_class`, `admin_group`, `[migration] auth`) from a TOML
//! file of the shape `etc/vmgated.toml` shows: one `key = value` a line, strings and one-line
//! (or multi-line) arrays of strings. It does not validate the file — `vmgated --config FILE
//! --check` does — and ignores every other key.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The gateway's default port (Hyper-V's 6600).
pub const DEFAULT_PORT: u16 = 6600;
/// The largest configuration file read.
const MAX_CONFIG: u64 = 1024 * 1024;

/// Errors of reading a host's configuration or address.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file cannot be read.
    #[error("cannot read the vmgated configuration {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line cannot be read as `key = value`.
    #[error("{}:{line}: {problem}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line number.
        line: usize,
        /// What is wrong.
        problem: String,
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

/// A TOML string value (`"..."` with the usual escapes, or `'...'`); `None` if not one.
fn toml_string(v: &str) -> Option<(String, &str)> {
    if let Some(rest) = v.strip_prefix('\'') {
        let end = rest.find('\'')?;
        return Some((rest.get(..end)?.to_owned(), rest.get(end + 1..)?));
    }
    let rest = v.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, rest.get(i + 1..)?)),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            },
            c => out.push(c),
        }
    }
    None
}

/// The part of a line before a `#` that is outside strings.
fn strip_comment(line: &str) -> &str {
    let mut in_basic = false;
    let mut in_literal = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_basic => escaped = true,
            '"' if !in_literal => in_basic = !in_basic,
            '\'' if !in_basic => in_literal = !in_literal,
            '#' if !in_basic && !in_literal => return line.get(..i).unwrap_or(line),
            _ => {}
        }
    }
    line
}

fn string_array(mut v: &str) -> Option<Vec<String>> {
    v = v.trim().strip_prefix('[')?.trim_start();
    let mut out = Vec::new();
    loop {
        if let Some(rest) = v.strip_prefix(']') {
            return rest.trim().is_empty().then_some(out);
        }
        let (s, rest) = toml_string(v)?;
        out.push(s);
        v = rest.trim_start();
        v = v.strip_prefix(',').unwrap_or(v).trim_start();
    }
}

impl HostConfig {
    /// Reads `path` (bounded).
    pub fn load(path: &Path) -> Result<HostConfig, HostsError> {
        let err = |source| HostsError::Read {
            path: path.to_owned(),
            source,
        };
        let f = std::fs::File::open(path).map_err(err)?;
        let mut text = String::new();
        f.take(MAX_CONFIG).read_to_string(&mut text).map_err(err)?;
        HostConfig::parse(path, &text)
    }

    /// Reads the keys the doctor needs from `text`.
    pub fn parse(path: &Path, text: &str) -> Result<HostConfig, HostsError> {
        let mut out = HostConfig {
            path: path.to_owned(),
            ..HostConfig::default()
        };
        let mut table = String::new();
        let mut pending: Option<(String, String, usize)> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if let Some((key, mut value, start)) = pending.take() {
                value.push(' ');
                value.push_str(line);
                if line.ends_with(']') {
                    out.set(path, &table, &key, &value, start)?;
                } else {
                    pending = Some((key, value, start));
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                table = line.trim_matches(['[', ']']).trim().to_owned();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(HostsError::Syntax {
                    path: path.to_owned(),
                    line: n + 1,
                    problem: "expected `key = value`".into(),
                });
            };
            let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
            if value.starts_with('[') && !value.ends_with(']') {
                pending = Some((key, value, n + 1));
                continue;
            }
            out.set(path, &table, &key, &value, n + 1)?;
        }
        if let Some((_, _, start)) = pending {
            return Err(HostsError::Syntax {
                path: path.to_owned(),
                line: start,
                problem: "an array that is never closed".into(),
            });
        }
        Ok(out)
    }

    fn set(
        &mut self,
        path: &Path,
        table: &str,
        key: &str,
        value: &str,
        line: usize,
    ) -> Result<(), HostsError> {
        let syntax = |problem: String| HostsError::Syntax {
            path: path.to_owned(),
            line,
            problem,
        };
        let string = || {
            toml_string(value)
                .filter(|(_, rest)| rest.trim().is_empty())
                .map(|(s, _)| s)
                .ok_or_else(|| syntax(format!("`{key}` must be a string")))
        };
        match (table, key) {
            ("", "host_name") => self.host_name = Some(string()?),
            ("", "fqdn") => self.fqdn = Some(string()?),
            ("", "realm") => self.realm = Some(string()?),
            ("", "keytab") => self.keytab = Some(PathBuf::from(string()?)),
            ("", "account") => self.account = Some(string()?),
            ("", "spn_class") => self.spn_class = Some(string()?),
            ("", "admin_group") => self.admin_group = Some(string()?),
            ("migration", "auth") => self.auth = Some(string()?),
            ("", "listen") => {
                let items = string_array(value)
                    .ok_or_else(|| syntax("`listen` must be an array of strings".into()))?;
                self.listen = items
                    .iter()
                    .map(|a| parse_address(a))
                    .collect::<Result<_, _>>()
                    .map_err(|e| syntax(format!("`listen`: {e}")))?;
            }
            _ => {}
        }
        Ok(())
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
    fn reads_the_keys_it_needs_and_ignores_the_rest() {
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
"#;
        let c = HostConfig::parse(Path::new("c.toml"), text).unwrap();
        assert_eq!(c.host_name.as_deref(), Some("hv2"));
        assert_eq!(c.realm.as_deref(), Some("LAB.EXAMPLE.TEST"));
        assert_eq!(c.keytab, Some(PathBuf::from("/etc/vmgate/hv2.keytab")));
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
        assert!(matches!(
            HostConfig::parse(Path::new("c"), "host_name = 3\n"),
            Err(HostsError::Syntax { line: 1, .. })
        ));
        assert!(HostConfig::parse(Path::new("c"), "listen = [\"1.2.3.4\"\n").is_err());
        assert!(HostConfig::parse(Path::new("c"), "listen = [\"nope\"]\n").is_err());
        assert!(HostConfig::parse(Path::new("c"), "just words\n").is_err());
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
