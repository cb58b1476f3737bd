//! The daemon's configuration file (`vmgated.toml`): who the host is, where it listens, and its
//! migration settings as Hyper-V's `Set-VMHost`, `Enable-VMMigration` and
//! `*-VMMigrationNetwork` know them. The daemon, the CLI (`--host` resolution) and the doctor all
//! read it with this one parser.
//!
//! [`Config::load`] reads a file, [`Config::parse`] a text. Unknown keys are errors (a typo must
//! not silently fall back to a default). Syntax errors and values of the wrong type or form are
//! reported by the TOML parser with the line, the column and the offending line; the checks that
//! span several keys (limits, a network list that is empty, a switch named twice, ...) name the
//! key and say what is wrong and what is allowed:
//!
//! ```text
//! /etc/vmgate/vmgated.toml: `migration.max_live_moves`: 0 is not allowed; it must be from 1 to 64
//! ```
//!
//! `etc/vmgated.toml` in the repository shows every option with its default; the unit test
//! `the_shipped_example_parses` keeps it valid. The fields below name the Hyper-V (and libvirt)
//! setting each one corresponds to.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vmgate_auth::netfilter::{Cidr, NetworkFilter};

use crate::api::host::HostChanges;
pub use crate::{DEFAULT_PORT, MIGRATION_SERVICE_CLASS};

/// The largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;
/// The largest value of `max_live_moves` / `max_storage_moves`.
pub const MAX_SIMULTANEOUS_MOVES: u32 = 64;
/// The most parallel channels of `performance = "multichannel"` (the wire protocol's limit).
pub const MAX_CHANNELS: u16 = 16;
/// The largest downtime target, in milliseconds.
pub const MAX_DOWNTIME_TARGET_MS: u32 = 60_000;
/// The longest path a Unix socket address can hold (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors of loading the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any configuration.
    #[error("the configuration file {} is larger than {MAX_CONFIG_FILE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type or form. The
    /// message is the parser's: it gives the line and the column.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, the line itself, what is wrong).
        message: String,
    },
    /// A value is well-formed but not allowed (alone or with others).
    #[error("{}: `{key}`: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, with its table (`migration.max_live_moves`).
        key: String,
        /// What is wrong, and what is allowed.
        problem: String,
    },
}

/// A configuration file as read: the configuration, and the keys the file sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// The configuration (defaults filled in).
    pub config: Config,
    /// The keys the file sets, dotted (`keytab`, `migration.auth`).
    pub keys: std::collections::BTreeSet<String>,
}

impl ConfigFile {
    /// Whether the file sets `key` (dotted: `migration.auth`).
    pub fn sets(&self, key: &str) -> bool {
        self.keys.contains(key)
    }
}

fn collect_keys(table: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if let toml::Value::Table(t) = v {
            collect_keys(t, &key, out);
        }
        out.insert(key);
    }
}

/// A value of a configuration changed at run time (`host set`) that is not allowed: the key and
/// what is wrong, as the file's checks say it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigProblem {
    /// The key, with its table (`migration.max_live_moves`).
    pub key: &'static str,
    /// What is wrong, and what is allowed.
    pub problem: String,
}

/// Why a `host set` change cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// Not one of the authentication types.
    #[error("\"{0}\" is not an authentication type: kerberos, credssp or host")]
    Auth(String),
    /// Not one of the performance options.
    #[error("\"{0}\" is not a performance option: tcpip, compression or multichannel")]
    Performance(String),
    /// Not a bandwidth.
    #[error(transparent)]
    Bandwidth(#[from] BandwidthError),
    /// Not a migration network.
    #[error(transparent)]
    Network(#[from] NetworkParseError),
    /// The settings together are not allowed.
    #[error(transparent)]
    Invalid(#[from] ConfigProblem),
}

/// The daemon's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The host's short name (`hv1`): the NetBIOS name of its computer account, the host part of
    /// its short SPN. Hyper-V: the computer name. Required.
    pub host_name: String,
    /// The host's DNS name (`hv1.lab.example.test`): `dNSHostName` of the computer account and
    /// the host part of its FQDN SPN. Required.
    pub fqdn: String,
    /// The Kerberos realm (`LAB.EXAMPLE.TEST`, the AD domain in capitals). Required.
    pub realm: String,
    /// Other realms whose principals the gateway accepts (realms this domain trusts). Default:
    /// none — only principals of `realm`; `alice@OTHER.REALM` is never taken for `alice`.
    #[serde(default)]
    pub trusted_realms: Vec<String>,
    /// The keytab holding the computer account's keys (and its SPNs'). Must be readable by root
    /// only. Hyper-V: the machine account's secret in LSA. Default `/etc/krb5.keytab` (where
    /// `realm join`/`net ads join` write it).
    #[serde(default = "default_keytab")]
    pub keytab: PathBuf,
    /// The computer account (`HV1$`). Default: `host_name` in capitals followed by `$`.
    #[serde(default)]
    pub account: String,
    /// Where the gateway listens (TCP, control and migration on one port): `"ADDR"` or
    /// `"ADDR:PORT"` (`"[v6]:PORT"`); the port defaults to 6600. Hyper-V: VMMS on TCP 6600 on
    /// every address. libvirt: `listen_addr` / `tcp_port`. Required (no "every address" default:
    /// choose the management network).
    #[serde(deserialize_with = "de_listen")]
    pub listen: Vec<SocketAddr>,
    /// A private `krb5.conf` for the daemon (sets `KRB5_CONFIG`); default: the system's.
    #[serde(default)]
    pub krb5_config: Option<PathBuf>,
    /// The directory (AD domain controller) the daemon reads accounts and groups from.
    pub directory: DirectorySettings,
    /// The service class of the migration SPNs. Hyper-V's is fixed to "Microsoft Virtual System
    /// Migration Service"; change it only to run vmgate next to Hyper-V on one account.
    #[serde(default = "default_spn_class")]
    pub spn_class: String,
    /// Register missing SPNs at start when the computer account may (Hyper-V's VMMS does).
    /// With `false` the daemon only checks them and logs event 14050 with the fix.
    #[serde(default = "yes")]
    pub register_spns: bool,
    /// Live migration settings (`Set-VMHost`, `Enable-VMMigration`, `*-VMMigrationNetwork`).
    #[serde(default)]
    pub migration: MigrationSettings,
    /// Folders under which VM files may be created or received (a move's storage paths must lie
    /// inside one). Hyper-V: `VirtualHardDiskPath`/`VirtualMachinePath`. libvirt: storage pools.
    /// Default `["/var/lib/vmgate/vms"]`.
    #[serde(default = "default_storage_roots")]
    pub storage_roots: Vec<PathBuf>,
    /// The virtual switches of this host, each bound to a Linux interface (a bridge). A VM's NIC
    /// names a switch; a move to a host without that switch is refused unless mapped. Hyper-V:
    /// `Get-VMSwitch`. libvirt: `<network>` / `<interface type='bridge'>`.
    #[serde(default, rename = "switch")]
    pub switches: Vec<SwitchSettings>,
    /// The AD group whose members may manage VMs and start moves on this host (looked up in the
    /// directory, nested membership counts): its DN, its SID, or a name that only one group in
    /// the domain has (an ambiguous name stops the daemon at start). Resolved once, at start.
    /// Its members are root-equivalent on this host. Hyper-V: the "Hyper-V Administrators"
    /// group.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// The Unix group whose members may use the local control socket (root always may). Default:
    /// none (root only). libvirt: `unix_sock_group`.
    #[serde(default)]
    pub local_group: Option<String>,
    /// The daemon's own folder (event log, jobs, VM definitions): must be owned by root with mode
    /// 0700 or stricter. Hyper-V: `%ProgramData%\Microsoft\Windows\Hyper-V`. Default
    /// `/var/lib/vmgate`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The local control socket (the `vmgate` CLI on this host). libvirt: `unix_sock_dir`.
    /// Default `/run/vmgate/vmgated.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Settings for labs and tests that make this host behave like another one. Never needed
    /// in production.
    #[serde(default, skip_serializing_if = "TestingSettings::is_default")]
    pub testing: TestingSettings,
}

/// `[testing]`: make this host play an older or different one (labs and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingSettings {
    /// Pretend this host's processor lacks these CPU features (`avx512f`): arriving VMs that
    /// use them are refused as on an older processor.
    #[serde(default)]
    pub hidden_cpu_features: Vec<String>,
    /// Announce this migration protocol version as a source (a newer build than this one).
    #[serde(default)]
    pub protocol_version: Option<u16>,
}

impl TestingSettings {
    fn is_default(&self) -> bool {
        *self == TestingSettings::default()
    }
}

/// Where the directory is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySettings {
    /// `ldap://dc1.lab.example.test` (Kerberos bind with the host keytab, sealed by Kerberos, as
    /// Samba requires) or `ldaps://...`. Required.
    pub url: String,
    /// PEM file of the CAs to trust for `ldaps://` / StartTLS; default: the system's CAs.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How the source proves it acts for the user. Hyper-V: `VirtualMachineMigrationAuthenticationType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthType {
    /// Kerberos: the user's own forwarded ticket, or constrained delegation (S4U2Proxy).
    /// Hyper-V: `Kerberos`.
    #[default]
    Kerberos,
    /// The user's full credentials must be on the source (logged on there, or forwarded
    /// explicitly). Hyper-V: `CredSSP`.
    Credssp,
    /// The destination trusts the source host's own identity (as a cluster does); the user is
    /// authorized on the source only. No Hyper-V equivalent outside failover clusters.
    Host,
}

impl AuthType {
    /// The name used in the configuration (`kerberos`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Kerberos => "kerberos",
            AuthType::Credssp => "credssp",
            AuthType::Host => "host",
        }
    }
}

/// How memory travels. Hyper-V: `VirtualMachineMigrationPerformanceOption`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Performance {
    /// One TCP stream, no compression. Hyper-V: `TCPIP`.
    Tcpip,
    /// One stream, pages compressed (zero pages are flags in every mode). Hyper-V: `Compression`
    /// (its default). QEMU: `multifd-compression`.
    #[default]
    Compression,
    /// Several parallel streams (`channels`). Hyper-V: `SMB` (SMB Direct/Multichannel). QEMU:
    /// `multifd` with `multifd-channels`.
    Multichannel,
}

impl Performance {
    /// The name used in the configuration (`compression`).
    pub fn as_str(self) -> &'static str {
        match self {
            Performance::Tcpip => "tcpip",
            Performance::Compression => "compression",
            Performance::Multichannel => "multichannel",
        }
    }
}

/// One incoming migration network. Hyper-V: `Add-VMMigrationNetwork -Subnet -Priority`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationNetwork {
    /// The network in CIDR notation (`10.0.20.0/24`, `fd00:20::/64`).
    #[serde(deserialize_with = "de_cidr", serialize_with = "ser_display")]
    pub subnet: Cidr,
    /// Lower numbers are offered first (Hyper-V: `Priority`, 0 is the highest). Default 0.
    #[serde(default)]
    pub priority: u32,
}

impl MigrationNetwork {
    /// `CIDR` or `CIDR:PRIORITY` (`10.0.20.0/24:1`; IPv6 as `[fd00::/64]:1` or without a
    /// priority).
    pub fn parse(text: &str) -> Result<MigrationNetwork, NetworkParseError> {
        let t = text.trim();
        let (net, prio) = if let Some(rest) = t.strip_prefix('[') {
            match rest.split_once(']') {
                Some((n, p)) => (n, p.strip_prefix(':')),
                None => return Err(NetworkParseError::MissingBracket(text.to_owned())),
            }
        } else if t.matches(':').count() == 1 {
            let (n, p) = t.split_once(':').unwrap_or((t, ""));
            (n, Some(p))
        } else {
            (t, None)
        };
        let subnet = net
            .parse::<Cidr>()
            .map_err(|e| NetworkParseError::Network {
                text: text.to_owned(),
                why: e.to_string(),
            })?;
        let priority = match prio {
            Some(p) => p
                .parse::<u32>()
                .map_err(|_| NetworkParseError::Priority(text.to_owned()))?,
            None => 0,
        };
        Ok(MigrationNetwork { subnet, priority })
    }
}

/// Why a `CIDR[:PRIORITY]` text is not a migration network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkParseError {
    /// `[v6` without its `]`.
    #[error("\"{0}\": a missing ]")]
    MissingBracket(String),
    /// The network part is not CIDR.
    #[error("\"{text}\" is not a network (CIDR[:PRIORITY]): {why}")]
    Network {
        /// The text given.
        text: String,
        /// What the CIDR parser said.
        why: String,
    },
    /// The priority is not a number.
    #[error("\"{0}\": the priority must be a number")]
    Priority(String),
}

/// A bandwidth limit in bytes per second, written in human units (`"500MiB/s"`, `"1 Gbit/s"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bandwidth {
    bytes_per_second: u64,
}

/// Errors of parsing a bandwidth.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthError {
    /// Not `NUMBER UNIT/s`.
    #[error(
        "\"{0}\" is not a bandwidth: write a number and a unit per second, such as \"500MiB/s\", \
         \"1.5GB/s\" or \"800Mbit/s\" (units: B KB MB GB TB KiB MiB GiB TiB kbit Mbit Gbit)"
    )]
    Syntax(String),
    /// Zero.
    #[error("\"{0}\" is zero; leave bandwidth_limit out for no limit")]
    Zero(String),
    /// More than fits in 64 bits.
    #[error("\"{0}\" is larger than any link")]
    TooLarge(String),
}

impl Bandwidth {
    /// A limit of `bytes_per_second` (must not be zero).
    pub fn from_bytes_per_second(bytes_per_second: u64) -> Option<Bandwidth> {
        (bytes_per_second > 0).then_some(Bandwidth { bytes_per_second })
    }

    /// The limit in bytes per second.
    pub fn bytes_per_second(self) -> u64 {
        self.bytes_per_second
    }
}

/// The unit's size in bytes (bits count as 1/8 byte: the caller divides by 8).
fn bandwidth_unit(unit: &str) -> Option<(u128, bool)> {
    let bytes = match unit {
        "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => {
            let bits = match unit.to_ascii_lowercase().as_str() {
                "bit" => 1,
                "kbit" => 1_000,
                "mbit" => 1_000_000,
                "gbit" => 1_000_000_000,
                _ => return None,
            };
            return Some((bits, true));
        }
    };
    Some((bytes, false))
}

impl FromStr for Bandwidth {
    type Err = BandwidthError;

    fn from_str(text: &str) -> Result<Bandwidth, BandwidthError> {
        let syntax = || BandwidthError::Syntax(text.to_owned());
        if text.len() > 64 {
            return Err(syntax());
        }
        let rest = text.trim().strip_suffix("/s").ok_or_else(syntax)?;
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(syntax)?;
        let (number, unit) = rest.split_at_checked(number_end).ok_or_else(syntax)?;
        let unit = unit.trim_start();
        let (int, frac) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if int.is_empty() || frac.contains('.') || (number.contains('.') && frac.is_empty()) {
            return Err(syntax());
        }
        let (unit_bytes, bits) = bandwidth_unit(unit).ok_or_else(syntax)?;
        if frac.len() > 9 || int.len() > 20 {
            return Err(BandwidthError::TooLarge(text.to_owned()));
        }
        let int: u128 = int.parse().map_err(|_| syntax())?;
        let frac_value: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| syntax())?
        };
        let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| syntax())?);
        let mut value = int * unit_bytes + frac_value * unit_bytes / scale;
        if bits {
            value /= 8;
        }
        if value == 0 {
            return Err(BandwidthError::Zero(text.to_owned()));
        }
        let bytes_per_second =
            u64::try_from(value).map_err(|_| BandwidthError::TooLarge(text.to_owned()))?;
        Ok(Bandwidth { bytes_per_second })
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes_per_second;
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if b >= size && b % size == 0 {
                return write!(f, "{}{unit}/s", b / size);
            }
        }
        write!(f, "{b}B/s")
    }
}

impl Serialize for Bandwidth {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Bandwidth, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Live migration settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    /// Whether this host sends and receives moves. Hyper-V: `Enable-VMMigration` /
    /// `VirtualMachineMigrationEnabled` (off by default, as here).
    #[serde(default)]
    pub enabled: bool,
    /// Hyper-V: `VirtualMachineMigrationAuthenticationType`. Default `kerberos`.
    #[serde(default)]
    pub auth: AuthType,
    /// Hosts (short names, `hv1`) whose computer accounts may send moves here with their own
    /// identity (their `auth = "host"`). Host principals are authorized by this list only (the
    /// admin group does not count for them) and never get the control API. Read at start.
    /// Default: none.
    #[serde(default)]
    pub peer_hosts: Vec<String>,
    /// Live moves at once (sending and receiving counted together); more queue. Hyper-V:
    /// `MaximumVirtualMachineMigrations` (default 2).
    #[serde(default = "two")]
    pub max_live_moves: u32,
    /// Storage moves at once, counted apart from live moves. Hyper-V:
    /// `MaximumStorageMigrations` (default 2).
    #[serde(default = "two")]
    pub max_storage_moves: u32,
    /// Accept incoming moves from any address. Hyper-V: `UseAnyNetworkForMigration`.
    #[serde(default)]
    pub any_network: bool,
    /// Incoming migration networks, offered to sources by priority. Hyper-V:
    /// `Get-VMMigrationNetwork`. Required (non-empty) unless `any_network = true`.
    #[serde(default)]
    pub networks: Vec<MigrationNetwork>,
    /// Hyper-V: `VirtualMachineMigrationPerformanceOption`. Default `compression`.
    #[serde(default)]
    pub performance: Performance,
    /// Parallel streams for `performance = "multichannel"` (2 to 16, default 4). QEMU:
    /// `multifd-channels`.
    #[serde(default)]
    pub channels: Option<u16>,
    /// Cap on a move's network use; absent means unlimited. Hyper-V: SMB bandwidth limit
    /// (`Set-SmbBandwidthLimit -Category LiveMigration`). QEMU: `max-bandwidth`.
    #[serde(default)]
    pub bandwidth_limit: Option<Bandwidth>,
    /// How long the VM may be paused at switchover: pre-copy stops when the rest fits in it.
    /// QEMU: `downtime-limit`. Default 50 ms.
    #[serde(default = "default_downtime_target_ms")]
    pub downtime_target_ms: u32,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            enabled: false,
            auth: AuthType::default(),
            peer_hosts: Vec::new(),
            max_live_moves: 2,
            max_storage_moves: 2,
            any_network: false,
            networks: Vec::new(),
            performance: Performance::default(),
            channels: None,
            bandwidth_limit: None,
            downtime_target_ms: default_downtime_target_ms(),
        }
    }
}

/// The default number of channels for `multichannel`.
pub const DEFAULT_CHANNELS: u16 = 4;

impl MigrationSettings {
    /// The incoming-network filter (applied before TLS on every accepted connection).
    pub fn network_filter(&self) -> NetworkFilter {
        if self.any_network || self.networks.is_empty() {
            // Validation refuses an empty list without any_network while migration is enabled;
            // a disabled host refuses every move anyway.
            NetworkFilter::Any
        } else {
            NetworkFilter::Networks(self.networks.iter().map(|n| n.subnet).collect())
        }
    }

    /// The networks in the order they are offered (priority, then as written).
    pub fn networks_by_priority(&self) -> Vec<MigrationNetwork> {
        let mut list = self.networks.clone();
        list.sort_by_key(|n| n.priority);
        list
    }

    /// The number of parallel streams a move uses (1 unless `multichannel`).
    pub fn effective_channels(&self) -> u16 {
        match self.performance {
            Performance::Multichannel => self.channels.unwrap_or(DEFAULT_CHANNELS),
            Performance::Tcpip | Performance::Compression => 1,
        }
    }
}

impl MigrationSettings {
    /// Applies `host set` changes (absent ones keep their value). The caller checks the whole
    /// configuration afterwards ([`Config::check`]).
    pub fn apply(&mut self, c: &HostChanges) -> Result<(), ChangeError> {
        if let Some(v) = c.enabled {
            self.enabled = v;
        }
        if let Some(a) = &c.auth {
            self.auth = match a.to_ascii_lowercase().as_str() {
                "kerberos" => AuthType::Kerberos,
                "credssp" => AuthType::Credssp,
                "host" => AuthType::Host,
                other => return Err(ChangeError::Auth(other.to_owned())),
            };
        }
        if let Some(v) = c.max_live_moves {
            self.max_live_moves = v;
        }
        if let Some(v) = c.max_storage_moves {
            self.max_storage_moves = v;
        }
        if let Some(p) = &c.performance {
            self.performance = match p.to_ascii_lowercase().as_str() {
                "tcpip" => Performance::Tcpip,
                "compression" => Performance::Compression,
                "multichannel" => Performance::Multichannel,
                other => return Err(ChangeError::Performance(other.to_owned())),
            };
        }
        if let Some(b) = &c.bandwidth_limit {
            self.bandwidth_limit =
                if b.eq_ignore_ascii_case("off") || b.eq_ignore_ascii_case("none") {
                    None
                } else {
                    Some(b.parse::<Bandwidth>()?)
                };
        }
        if let Some(v) = c.downtime_target_ms {
            self.downtime_target_ms = v;
        }
        if let Some(v) = c.any_network {
            self.any_network = v;
        }
        if let Some(list) = &c.networks {
            self.networks = list
                .iter()
                .map(|n| MigrationNetwork::parse(n))
                .collect::<Result<_, _>>()?;
        }
        Ok(())
    }
}

/// One virtual switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSettings {
    /// The switch's name as VMs' NICs name it (`External`, `Lab`). Compared without case, as
    /// Hyper-V does.
    pub name: String,
    /// The Linux interface (a bridge such as `br0`) the switch is bound to; gratuitous ARP after
    /// a move goes out here.
    pub interface: String,
}

fn default_keytab() -> PathBuf {
    PathBuf::from("/etc/krb5.keytab")
}
fn default_spn_class() -> String {
    MIGRATION_SERVICE_CLASS.to_owned()
}
fn yes() -> bool {
    true
}
fn two() -> u32 {
    2
}
fn default_downtime_target_ms() -> u32 {
    50
}
fn default_storage_roots() -> Vec<PathBuf> {
    vec![PathBuf::from("/var/lib/vmgate/vms")]
}
fn default_admin_group() -> String {
    "Hyper-V Administrators".to_owned()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/vmgate")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/vmgate/vmgated.sock")
}

/// Why a text is not a listen (or migration) address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// Port 0.
    #[error("\"{0}\": the port must be from 1 to 65535")]
    PortZero(String),
    /// Not an IP address with an optional port.
    #[error(
        "\"{0}\" is not a listen address: write an IP address with an optional port, such as \
         \"10.0.0.11\", \"10.0.0.11:6600\" or \"[fd00::11]:6600\""
    )]
    NotAnAddress(String),
}

/// Parses a listen address: `ADDR` (port 6600) or `ADDR:PORT` / `[V6]:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, ListenError> {
    let t = text.trim();
    if let Ok(sa) = t.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(ListenError::PortZero(text.to_owned()));
        }
        return Ok(sa);
    }
    let bare = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(t);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| ListenError::NotAnAddress(text.to_owned()))
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|s| parse_listen(s).map_err(serde::de::Error::custom))
        .collect()
}

fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<Cidr>().map_err(serde::de::Error::custom)
}

fn ser_display<S: Serializer, T: fmt::Display>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn is_absolute_clean(p: &Path) -> bool {
    p.is_absolute() && !p.components().any(|c| matches!(c, Component::ParentDir))
}

fn valid_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn valid_unix_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
}

impl Config {
    /// Reads and checks a configuration file (at most [`MAX_CONFIG_FILE`] bytes).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: format!(
                "the file is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        })?;
        Config::parse(&text, path)
    }

    /// Reads and checks a configuration file, and says which keys it sets (the others have
    /// their defaults): a tool reading another host's file may care which values are that
    /// host's own.
    pub fn load_file(path: &Path) -> Result<ConfigFile, ConfigError> {
        let config = Config::load(path)?;
        // The file parsed above, so it reads again; a race that changed it gives no keys.
        let keys = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            .map(|t| {
                let mut keys = std::collections::BTreeSet::new();
                collect_keys(&t, "", &mut keys);
                keys
            })
            .unwrap_or_default();
        Ok(ConfigFile { config, keys })
    }

    /// Parses and checks a configuration text; `path` only names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        if config.account.is_empty() {
            config.account = format!("{}$", config.host_name.to_ascii_uppercase());
        }
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                key: key.to_owned(),
                problem,
            })?;
        Ok(config)
    }

    /// Checks a configuration changed at run time (`host set`): the first problem.
    pub fn check(&self) -> Result<(), ConfigProblem> {
        self.validate()
            .map_err(|(key, problem)| ConfigProblem { key, problem })
    }

    /// The addresses this host offers sources for moves, in the order to try them: its listen
    /// addresses on its migration networks by priority (then the others), or all of them in
    /// order with "any network" (Hyper-V: the migration networks' priorities).
    pub fn offered_addresses(&self) -> Vec<SocketAddr> {
        let m = &self.migration;
        if m.any_network || m.networks.is_empty() {
            return self.listen.clone();
        }
        let networks = m.networks_by_priority();
        let mut ranked: Vec<(u32, usize, SocketAddr)> = self
            .listen
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let prio = networks
                    .iter()
                    .find(|n| n.subnet.contains(a.ip()))
                    .map_or(u32::MAX, |n| n.priority);
                (prio, i, *a)
            })
            .collect();
        ranked.sort_by_key(|(p, i, _)| (*p, *i));
        ranked.into_iter().map(|(_, _, a)| a).collect()
    }

    /// The checks across keys; the first problem found, as (key, what is wrong).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let h = &self.host_name;
        if h.is_empty() || h.len() > 15 || !valid_dns_label(h) {
            return Err((
                "host_name",
                format!(
                    "\"{h}\" is not a short host name: use 1 to 15 letters, digits and hyphens \
                     (the computer account's name without $; the full name goes in fqdn)"
                ),
            ));
        }
        let f = &self.fqdn;
        if f.len() > 253 || !f.contains('.') || !f.split('.').all(valid_dns_label) {
            return Err((
                "fqdn",
                format!("\"{f}\" is not a fully qualified DNS name (such as hv1.lab.example.test)"),
            ));
        }
        let first = f.split('.').next().unwrap_or_default();
        if !first.eq_ignore_ascii_case(h) {
            return Err((
                "fqdn",
                format!(
                    "\"{f}\" does not start with host_name \"{h}\" (expected \"{h}.<domain>\")"
                ),
            ));
        }
        let r = &self.realm;
        if r.is_empty() || !r.split('.').all(valid_dns_label) {
            return Err((
                "realm",
                format!(
                    "\"{r}\" is not a Kerberos realm (the AD domain in capitals, such as LAB.EXAMPLE.TEST)"
                ),
            ));
        }
        if *r != r.to_ascii_uppercase() {
            return Err((
                "realm",
                format!(
                    "\"{r}\" has lower-case letters; an AD domain's realm is its DNS name in \
                     capitals: \"{}\"",
                    r.to_ascii_uppercase()
                ),
            ));
        }
        if !is_absolute_clean(&self.keytab) {
            return Err((
                "keytab",
                format!(
                    "\"{}\" must be an absolute path without \"..\"",
                    self.keytab.display()
                ),
            ));
        }
        let a = &self.account;
        let name = a.strip_suffix('$').unwrap_or(a);
        if !a.ends_with('$') || name.is_empty() || name.len() > 19 || !valid_dns_label(name) {
            return Err((
                "account",
                format!(
                    "\"{a}\" is not a computer account name: the sAMAccountName of the host's \
                     computer account ends with $ (such as \"{}$\")",
                    h.to_ascii_uppercase()
                ),
            ));
        }
        if self.listen.is_empty() {
            return Err((
                "listen",
                "is empty; give at least one address, such as [\"10.0.0.11\"] (port 6600 by default)"
                    .to_owned(),
            ));
        }
        let mut seen = HashSet::new();
        for addr in &self.listen {
            if !seen.insert(addr) {
                return Err(("listen", format!("{addr} is listed twice")));
            }
        }
        if let Some(k) = &self.krb5_config
            && !is_absolute_clean(k)
        {
            return Err((
                "krb5_config",
                format!(
                    "\"{}\" must be an absolute path without \"..\"",
                    k.display()
                ),
            ));
        }
        let url = self.directory.url.to_ascii_lowercase();
        let host = url
            .strip_prefix("ldap://")
            .or_else(|| url.strip_prefix("ldaps://"))
            .unwrap_or_default();
        if host.trim_end_matches('/').is_empty() || host.trim_end_matches('/').contains('/') {
            return Err((
                "directory.url",
                format!(
                    "\"{}\" is not a directory URL: write ldap://HOST[:PORT] or ldaps://HOST[:PORT]",
                    self.directory.url
                ),
            ));
        }
        if let Some(ca) = &self.directory.ca_file
            && !is_absolute_clean(ca)
        {
            return Err((
                "directory.ca_file",
                format!(
                    "\"{}\" must be an absolute path without \"..\"",
                    ca.display()
                ),
            ));
        }
        if self.spn_class.trim().is_empty()
            || self.spn_class.contains(['/', '\\', '@'])
            || self.spn_class.chars().any(char::is_control)
            || self.spn_class.trim() != self.spn_class
        {
            return Err((
                "spn_class",
                format!(
                    "\"{}\" is not a service class (no \"/\", \"\\\", \"@\", control characters \
                     or outer spaces)",
                    self.spn_class
                ),
            ));
        }
        self.validate_migration()?;
        if self.storage_roots.is_empty() {
            return Err((
                "storage_roots",
                "is empty; give at least one folder for VM files".to_owned(),
            ));
        }
        let mut roots = HashSet::new();
        for root in &self.storage_roots {
            if !is_absolute_clean(root) {
                return Err((
                    "storage_roots",
                    format!(
                        "\"{}\" must be an absolute path without \"..\"",
                        root.display()
                    ),
                ));
            }
            if !roots.insert(root) {
                return Err((
                    "storage_roots",
                    format!("\"{}\" is listed twice", root.display()),
                ));
            }
        }
        let mut switches = HashSet::new();
        for s in &self.switches {
            if s.name.trim().is_empty()
                || s.name.len() > 255
                || s.name.chars().any(char::is_control)
            {
                return Err((
                    "switch.name",
                    format!(
                        "\"{}\" is not a switch name (1 to 255 printable characters)",
                        s.name
                    ),
                ));
            }
            if !switches.insert(s.name.to_lowercase()) {
                return Err((
                    "switch.name",
                    format!(
                        "the switch \"{}\" is defined twice (names are compared without case)",
                        s.name
                    ),
                ));
            }
            if !valid_interface_name(&s.interface) {
                return Err((
                    "switch.interface",
                    format!(
                        "\"{}\" (switch \"{}\") is not a Linux interface name (1 to 15 characters, \
                         no \"/\", \":\" or spaces)",
                        s.interface, s.name
                    ),
                ));
            }
        }
        for r in &self.trusted_realms {
            if r.is_empty()
                || r.len() > 253
                || !r.split('.').all(valid_dns_label)
                || r.eq_ignore_ascii_case(&self.realm)
            {
                return Err((
                    "trusted_realms",
                    format!(
                        "\"{r}\" is not another realm: write a realm's name (such as \
                         \"CORP.EXAMPLE.TEST\"), other than this host's own realm"
                    ),
                ));
            }
        }
        if self.admin_group.trim().is_empty() || self.admin_group.chars().any(char::is_control) {
            return Err((
                "admin_group",
                "is empty; name the AD group allowed to manage and move VMs (such as \"Hyper-V Administrators\")"
                    .to_owned(),
            ));
        }
        if let Some(g) = &self.local_group
            && !valid_unix_group(g)
        {
            return Err(("local_group", format!("\"{g}\" is not a Unix group name")));
        }
        if !is_absolute_clean(&self.state_dir) || self.state_dir == Path::new("/") {
            return Err((
                "state_dir",
                format!(
                    "\"{}\" must be an absolute path without \"..\", other than /",
                    self.state_dir.display()
                ),
            ));
        }
        let sock = &self.control_socket;
        if !is_absolute_clean(sock) || sock.file_name().is_none() {
            return Err((
                "control_socket",
                format!(
                    "\"{}\" must be an absolute file path without \"..\"",
                    sock.display()
                ),
            ));
        }
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err((
                "control_socket",
                format!(
                    "\"{}\" is longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket path",
                    sock.display()
                ),
            ));
        }
        Ok(())
    }

    fn validate_migration(&self) -> Result<(), (&'static str, String)> {
        let m = &self.migration;
        for h in &m.peer_hosts {
            let short = h.strip_suffix('$').unwrap_or(h);
            if short.is_empty() || short.len() > 15 || !valid_dns_label(short) {
                return Err((
                    "migration.peer_hosts",
                    format!(
                        "\"{h}\" is not a short host name: list peers as their computer \
                         accounts' names without $ (such as \"hv1\")"
                    ),
                ));
            }
        }
        let range =
            |v: u32| format!("{v} is not allowed; it must be from 1 to {MAX_SIMULTANEOUS_MOVES}");
        if !(1..=MAX_SIMULTANEOUS_MOVES).contains(&m.max_live_moves) {
            return Err(("migration.max_live_moves", range(m.max_live_moves)));
        }
        if !(1..=MAX_SIMULTANEOUS_MOVES).contains(&m.max_storage_moves) {
            return Err(("migration.max_storage_moves", range(m.max_storage_moves)));
        }
        if m.any_network && !m.networks.is_empty() {
            return Err((
                "migration.networks",
                "is set together with any_network = true, which accepts every address; remove \
                 the networks or set any_network = false"
                    .to_owned(),
            ));
        }
        if m.enabled && !m.any_network && m.networks.is_empty() {
            return Err((
                "migration.networks",
                "is empty while migration is enabled: add [[migration.networks]] entries (subnet \
                 and priority) or set any_network = true"
                    .to_owned(),
            ));
        }
        let mut subnets = HashSet::new();
        for n in &m.networks {
            if !subnets.insert(n.subnet) {
                return Err((
                    "migration.networks",
                    format!("the subnet {} is listed twice", n.subnet),
                ));
            }
        }
        match (m.performance, m.channels) {
            (Performance::Multichannel, Some(c)) if !(2..=MAX_CHANNELS).contains(&c) => {
                return Err((
                    "migration.channels",
                    format!("{c} is not allowed; it must be from 2 to {MAX_CHANNELS}"),
                ));
            }
            (Performance::Tcpip | Performance::Compression, Some(_)) => {
                return Err((
                    "migration.channels",
                    format!(
                        "applies only to performance = \"multichannel\" (performance is \"{}\")",
                        m.performance.as_str()
                    ),
                ));
            }
            _ => {}
        }
        if !(1..=MAX_DOWNTIME_TARGET_MS).contains(&m.downtime_target_ms) {
            return Err((
                "migration.downtime_target_ms",
                format!(
                    "{} is not allowed; it must be from 1 to {MAX_DOWNTIME_TARGET_MS} (milliseconds)",
                    m.downtime_target_ms
                ),
            ));
        }
        Ok(())
    }

    /// The host's migration SPNs: `<class>/<short>` and `<class>/<fqdn>`.
    pub fn migration_spns(&self) -> Result<[vmgate_auth::spn::Spn; 2], vmgate_auth::spn::SpnError> {
        Ok([
            vmgate_auth::spn::Spn::new(&self.spn_class, &self.host_name)?,
            vmgate_auth::spn::Spn::new(&self.spn_class, &self.fqdn)?,
        ])
    }

    /// The event log file: `<state_dir>/events.jsonl`.
    pub fn event_log_path(&self) -> PathBuf {
        self.state_dir.join("events.jsonl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
host_name = "hv1"
fqdn = "hv1.lab.example.test"
realm = "LAB.EXAMPLE.TEST"
listen = ["127.0.0.11"]

[directory]
url = "ldap://dc1.lab.example.test"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/vmgate/vmgated.toml"))
    }

    /// The minimal config with `extra` appended (tables at the end) or a key replaced.
    fn with(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL}\n{extra}"))
    }

    fn invalid(result: Result<Config, ConfigError>) -> (String, String, String) {
        match result {
            Err(e @ ConfigError::Invalid { .. }) => {
                let text = e.to_string();
                let ConfigError::Invalid { key, problem, .. } = e else {
                    unreachable!()
                };
                (key, problem, text)
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    fn parse_error(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(e @ ConfigError::Parse { .. }) => e.to_string(),
            other => panic!("expected a Parse error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.account, "HV1$");
        assert_eq!(c.keytab, Path::new("/etc/krb5.keytab"));
        assert_eq!(
            c.listen,
            vec!["127.0.0.11:6600".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.spn_class, MIGRATION_SERVICE_CLASS);
        assert!(c.register_spns);
        assert!(!c.migration.enabled);
        assert_eq!(c.migration.auth, AuthType::Kerberos);
        assert_eq!(
            (c.migration.max_live_moves, c.migration.max_storage_moves),
            (2, 2)
        );
        assert_eq!(c.migration.performance, Performance::Compression);
        assert_eq!(c.migration.effective_channels(), 1);
        assert_eq!(c.migration.bandwidth_limit, None);
        assert_eq!(c.migration.downtime_target_ms, 50);
        assert_eq!(c.storage_roots, vec![PathBuf::from("/var/lib/vmgate/vms")]);
        assert!(c.switches.is_empty());
        assert_eq!(c.admin_group, "Hyper-V Administrators");
        assert_eq!(c.local_group, None);
        assert_eq!(c.state_dir, Path::new("/var/lib/vmgate"));
        assert_eq!(c.control_socket, Path::new("/run/vmgate/vmgated.sock"));
        assert_eq!(
            c.event_log_path(),
            Path::new("/var/lib/vmgate/events.jsonl")
        );
        let [short, fqdn] = c.migration_spns().unwrap();
        assert_eq!(
            short.as_str(),
            "Microsoft Virtual System Migration Service/hv1"
        );
        assert_eq!(
            fqdn.as_str(),
            "Microsoft Virtual System Migration Service/hv1.lab.example.test"
        );
    }

    #[test]
    fn full_migration_settings() {
        let c = with(
            r#"
[migration]
enabled = true
auth = "credssp"
max_live_moves = 4
max_storage_moves = 1
performance = "multichannel"
channels = 8
bandwidth_limit = "500MiB/s"
downtime_target_ms = 300
networks = [
  { subnet = "10.0.30.0/24", priority = 2 },
  { subnet = "10.0.20.0/24", priority = 1 },
  { subnet = "fd00:20::/64" },
]

[[switch]]
name = "External"
interface = "br0"

[[switch]]
name = "Lab"
interface = "br-lab"
"#,
        )
        .unwrap();
        let m = &c.migration;
        assert!(m.enabled);
        assert_eq!(m.auth, AuthType::Credssp);
        assert_eq!((m.max_live_moves, m.max_storage_moves), (4, 1));
        assert_eq!(m.effective_channels(), 8);
        assert_eq!(m.bandwidth_limit.unwrap().bytes_per_second(), 500 << 20);
        assert_eq!(m.downtime_target_ms, 300);
        let order: Vec<String> = m
            .networks_by_priority()
            .iter()
            .map(|n| n.subnet.to_string())
            .collect();
        assert_eq!(order, ["fd00:20::/64", "10.0.20.0/24", "10.0.30.0/24"]);
        let filter = m.network_filter();
        assert!(filter.allows("10.0.20.7".parse().unwrap()));
        assert!(!filter.allows("10.0.40.7".parse().unwrap()));
        assert_eq!(c.switches.len(), 2);
        assert_eq!(c.switches[1].interface, "br-lab");
        // Multichannel without a count uses the default.
        let c = with("[migration]\nperformance = \"multichannel\"\n").unwrap();
        assert_eq!(c.migration.effective_channels(), DEFAULT_CHANNELS);
        let c = with("[migration]\nenabled = true\nany_network = true\n").unwrap();
        assert_eq!(c.migration.network_filter(), NetworkFilter::Any);
    }

    #[test]
    fn listen_addresses_take_the_default_port() {
        let c = parse(&MINIMAL.replace(
            r#"listen = ["127.0.0.11"]"#,
            r#"listen = ["127.0.0.11", "127.0.0.12:7000", "[::1]", "[::1]:7001"]"#,
        ))
        .unwrap();
        let got: Vec<String> = c.listen.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "127.0.0.11:6600",
                "127.0.0.12:7000",
                "[::1]:6600",
                "[::1]:7001"
            ]
        );
    }

    #[test]
    fn bandwidths_in_human_units() {
        let bps = |s: &str| s.parse::<Bandwidth>().map(Bandwidth::bytes_per_second);
        assert_eq!(bps("500MiB/s"), Ok(500 * 1024 * 1024));
        assert_eq!(bps("1 GB/s"), Ok(1_000_000_000));
        assert_eq!(bps("1.5GiB/s"), Ok(3 << 29));
        assert_eq!(bps("800Mbit/s"), Ok(100_000_000));
        assert_eq!(bps("10 Gbit/s"), Ok(1_250_000_000));
        assert_eq!(bps("4096B/s"), Ok(4096));
        assert_eq!(bps("2KiB/s"), Ok(2048));
        for bad in [
            "500MiB",
            "500 mb/s",
            "MiB/s",
            "1..5GB/s",
            "1.GB/s",
            "-1MB/s",
            "5 furlongs/s",
            "",
        ] {
            assert!(
                matches!(bps(bad), Err(BandwidthError::Syntax(_))),
                "{bad:?} gave {:?}",
                bps(bad)
            );
        }
        assert!(matches!(bps("0MiB/s"), Err(BandwidthError::Zero(_))));
        assert!(matches!(bps("0.1bit/s"), Err(BandwidthError::Zero(_))));
        assert!(matches!(
            bps("99999999999TiB/s"),
            Err(BandwidthError::TooLarge(_))
        ));
        assert_eq!(
            Bandwidth::from_bytes_per_second(500 << 20)
                .unwrap()
                .to_string(),
            "500MiB/s"
        );
        assert_eq!(
            Bandwidth::from_bytes_per_second(1000).unwrap().to_string(),
            "1000B/s"
        );
        assert_eq!(Bandwidth::from_bytes_per_second(0), None);
    }

    #[test]
    fn syntax_and_type_errors_give_line_and_column() {
        let e = parse_error(parse("host_name = \"hv1\"\nfqdn = \n"));
        assert!(
            e.starts_with("/etc/vmgate/vmgated.toml: TOML parse error at line 2, column"),
            "{e}"
        );

        let e = parse_error(with("[migration]\nmax_live_moves = \"two\"\n"));
        assert!(e.contains("line 11"), "{e}");
        assert!(e.contains("max_live_moves = \"two\""), "{e}");

        // A typo is an error, not a silent default.
        let e = parse_error(with("[migration]\nmax_live_move = 3\n"));
        assert!(e.contains("unknown field `max_live_move`"), "{e}");
        assert!(e.contains("line 11"), "{e}");

        let e = parse_error(with("[migration]\nbandwidth_limit = \"fast\"\n"));
        assert!(e.contains("\"fast\" is not a bandwidth"), "{e}");
        assert!(e.contains("line 11"), "{e}");

        let e = parse_error(with("[migration]\nauth = \"ntlm\"\n"));
        assert!(e.contains("unknown variant `ntlm`"), "{e}");
        assert!(e.contains("`kerberos`, `credssp`, `host`"), "{e}");

        let e = parse_error(with(
            "[migration]\nnetworks = [{ subnet = \"10.0.0.1/24\" }]\n",
        ));
        assert!(e.contains("did you mean 10.0.0.0/24?"), "{e}");

        let e = parse_error(parse(&MINIMAL.replace("127.0.0.11", "hv1.example")));
        assert!(e.contains("\"hv1.example\" is not a listen address"), "{e}");
        assert!(e.contains("line 5"), "{e}");

        let e = parse_error(parse(
            &MINIMAL.replace("realm = \"LAB.EXAMPLE.TEST\"\n", ""),
        ));
        assert!(e.contains("missing field `realm`"), "{e}");
    }

    #[test]
    fn each_kind_of_bad_value_names_its_key() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                MINIMAL.replace("\"hv1\"", "\"hv1.lab\""),
                "host_name",
                "is not a short host name",
            ),
            (
                MINIMAL.replace("\"hv1\"", "\"averyveryverylonghostname\""),
                "host_name",
                "1 to 15",
            ),
            (
                MINIMAL.replace("\"hv1.lab.example.test\"", "\"hv1\""),
                "fqdn",
                "fully qualified",
            ),
            (
                MINIMAL.replace("\"hv1.lab.example.test\"", "\"hv2.lab.example.test\""),
                "fqdn",
                "does not start with host_name \"hv1\"",
            ),
            (
                MINIMAL.replace("\"LAB.EXAMPLE.TEST\"", "\"lab.example.test\""),
                "realm",
                "capitals: \"LAB.EXAMPLE.TEST\"",
            ),
            (
                format!("keytab = \"etc/krb5.keytab\"\n{MINIMAL}"),
                "keytab",
                "absolute path",
            ),
            (
                format!("account = \"HV1\"\n{MINIMAL}"),
                "account",
                "ends with $",
            ),
            (
                MINIMAL.replace("[\"127.0.0.11\"]", "[]"),
                "listen",
                "is empty",
            ),
            (
                MINIMAL.replace("[\"127.0.0.11\"]", "[\"127.0.0.11\", \"127.0.0.11:6600\"]"),
                "listen",
                "127.0.0.11:6600 is listed twice",
            ),
            (
                MINIMAL.replace("ldap://dc1.lab.example.test", "http://dc1"),
                "directory.url",
                "not a directory URL",
            ),
            (
                format!("{MINIMAL}ca_file = \"ca.pem\"\n"),
                "directory.ca_file",
                "absolute path",
            ),
            (
                format!("spn_class = \"a/b\"\n{MINIMAL}"),
                "spn_class",
                "not a service class",
            ),
            (
                format!("{MINIMAL}[migration]\nmax_live_moves = 0\n"),
                "migration.max_live_moves",
                "0 is not allowed; it must be from 1 to 64",
            ),
            (
                format!("{MINIMAL}[migration]\nmax_storage_moves = 65\n"),
                "migration.max_storage_moves",
                "65 is not allowed",
            ),
            (
                format!("{MINIMAL}[migration]\nenabled = true\n"),
                "migration.networks",
                "is empty while migration is enabled",
            ),
            (
                format!(
                    "{MINIMAL}[migration]\nany_network = true\nnetworks = [{{ subnet = \"10.0.0.0/8\" }}]\n"
                ),
                "migration.networks",
                "together with any_network",
            ),
            (
                format!(
                    "{MINIMAL}[migration]\nnetworks = [{{ subnet = \"10.0.0.0/8\" }}, {{ subnet = \"10.0.0.0/8\", priority = 3 }}]\n"
                ),
                "migration.networks",
                "listed twice",
            ),
            (
                format!("{MINIMAL}[migration]\nchannels = 4\n"),
                "migration.channels",
                "only to performance = \"multichannel\"",
            ),
            (
                format!("{MINIMAL}[migration]\nperformance = \"multichannel\"\nchannels = 1\n"),
                "migration.channels",
                "from 2 to 16",
            ),
            (
                format!("{MINIMAL}[migration]\ndowntime_target_ms = 0\n"),
                "migration.downtime_target_ms",
                "from 1 to 60000",
            ),
            (
                format!("storage_roots = []\n{MINIMAL}"),
                "storage_roots",
                "is empty",
            ),
            (
                format!("storage_roots = [\"/srv/../etc\"]\n{MINIMAL}"),
                "storage_roots",
                "without \"..\"",
            ),
            (
                format!(
                    "{MINIMAL}[[switch]]\nname = \"Lab\"\ninterface = \"br0\"\n[[switch]]\nname = \"lab\"\ninterface = \"br1\"\n"
                ),
                "switch.name",
                "defined twice",
            ),
            (
                format!(
                    "{MINIMAL}[[switch]]\nname = \"Lab\"\ninterface = \"a-very-long-bridge0\"\n"
                ),
                "switch.interface",
                "not a Linux interface name",
            ),
            (
                format!("admin_group = \" \"\n{MINIMAL}"),
                "admin_group",
                "is empty",
            ),
            (
                format!("local_group = \"bad group\"\n{MINIMAL}"),
                "local_group",
                "not a Unix group name",
            ),
            (
                format!("state_dir = \"/\"\n{MINIMAL}"),
                "state_dir",
                "other than /",
            ),
            (
                format!(
                    "control_socket = \"/run/{}/s.sock\"\n{MINIMAL}",
                    "x".repeat(110)
                ),
                "control_socket",
                "longer than 107 bytes",
            ),
        ];
        for (text, key, fragment) in cases {
            let (k, problem, display) = invalid(parse(&text));
            assert_eq!(k, key, "{display}");
            assert!(problem.contains(fragment), "{key}: {problem}");
            assert!(
                display.starts_with(&format!("/etc/vmgate/vmgated.toml: `{key}`: ")),
                "{display}"
            );
        }
    }

    #[test]
    fn files_are_bounded_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        let e = Config::load(&missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot read the configuration file {}", missing.display())
        );
        let big = dir.path().join("big.toml");
        std::fs::write(
            &big,
            vec![b'#'; usize::try_from(MAX_CONFIG_FILE).unwrap() + 1],
        )
        .unwrap();
        assert!(matches!(
            Config::load(&big),
            Err(ConfigError::TooLarge { .. })
        ));
        let bin = dir.path().join("bin.toml");
        std::fs::write(&bin, b"host_name = \"\xff\"\n").unwrap();
        let e = Config::load(&bin).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/vmgated.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.host_name, "hv1");
        assert_eq!(c.fqdn, "hv1.lab.example.test");
        assert_eq!(c.account, "HV1$");
        assert!(c.migration.enabled);
        assert_eq!(c.migration.networks_by_priority().len(), 2);
        assert_eq!(c.switches.len(), 2);
        assert_eq!(c.local_group.as_deref(), Some("vmgate"));
        // Every option appears in the example (commented or not): a new field must be
        // documented there too.
        let text = std::fs::read_to_string(&path).unwrap();
        let value = toml::Value::try_from(&c).unwrap();
        let mut keys = Vec::new();
        collect_keys(&value, "", &mut keys);
        for key in [
            "bandwidth_limit",
            "channels",
            "krb5_config",
            "ca_file",
            "local_group",
        ] {
            keys.push(key.to_owned());
        }
        for key in keys {
            let leaf = key.rsplit('.').next().unwrap_or(&key);
            assert!(
                text.contains(&format!("{leaf} ="))
                    || text.contains(&format!("{leaf}="))
                    || text.contains(&format!("[[{leaf}]]")),
                "etc/vmgated.toml does not mention {key}"
            );
        }
    }

    fn collect_keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(_) => collect_keys(v, &key, out),
                    _ => out.push(key),
                }
            }
        }
    }

    #[test]
    fn serializes_for_host_show() {
        let c = with(
            "[migration]\nbandwidth_limit = \"1GiB/s\"\nnetworks = [{ subnet = \"10.0.0.0/8\" }]\n",
        )
        .unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["migration"]["bandwidth_limit"], "1GiB/s");
        assert_eq!(json["migration"]["networks"][0]["subnet"], "10.0.0.0/8");
        assert_eq!(json["migration"]["auth"], "kerberos");
        assert_eq!(json["listen"][0], "127.0.0.11:6600");
    }

    #[test]
    fn host_set_changes_are_parsed_and_bad_ones_named() {
        let mut m = MigrationSettings::default();
        m.apply(&HostChanges {
            enabled: Some(true),
            auth: Some("CredSSP".into()),
            max_live_moves: Some(3),
            performance: Some("multichannel".into()),
            bandwidth_limit: Some("100MiB/s".into()),
            networks: Some(vec!["10.0.20.0/24:1".into(), "10.0.10.0/24".into()]),
            ..HostChanges::default()
        })
        .unwrap();
        assert!(m.enabled);
        assert_eq!(m.auth, AuthType::Credssp);
        assert_eq!(m.max_live_moves, 3);
        assert_eq!(m.performance, Performance::Multichannel);
        assert_eq!(m.bandwidth_limit.unwrap().bytes_per_second(), 100 << 20);
        assert_eq!(m.networks.len(), 2);
        assert_eq!(m.networks[0].priority, 1);
        assert_eq!(m.networks[1].priority, 0);
        m.apply(&HostChanges {
            bandwidth_limit: Some("off".into()),
            ..HostChanges::default()
        })
        .unwrap();
        assert_eq!(m.bandwidth_limit, None);
        let bad = |c: HostChanges| {
            MigrationSettings::default()
                .apply(&c)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(HostChanges {
                auth: Some("ntlm".into()),
                ..HostChanges::default()
            })
            .contains("kerberos, credssp or host")
        );
        assert!(
            bad(HostChanges {
                networks: Some(vec!["10.0.0.0/33".into()]),
                ..HostChanges::default()
            })
            .contains("is not a network")
        );
        assert!(
            bad(HostChanges {
                networks: Some(vec!["10.0.0.0/8:high".into()]),
                ..HostChanges::default()
            })
            .contains("priority must be a number")
        );
    }

    #[test]
    fn addresses_are_offered_by_network_priority() {
        let text = r#"host_name = "hv2"
fqdn = "hv2.lab.example.test"
realm = "LAB.EXAMPLE.TEST"
listen = ["127.0.0.12:6600", "10.0.10.12:6600", "10.0.20.12:6600"]
[directory]
url = "ldap://dc1"
[migration]
enabled = true
networks = [{ subnet = "10.0.10.0/24", priority = 1 }, { subnet = "10.0.20.0/24", priority = 0 }]
"#;
        let c = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let order: Vec<String> = c
            .offered_addresses()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            order,
            ["10.0.20.12:6600", "10.0.10.12:6600", "127.0.0.12:6600"]
        );
    }
}
