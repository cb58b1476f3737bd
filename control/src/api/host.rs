//! The host resource: versions, settings (`host show`, `host set`), SPN state.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The migration protocol version this build speaks as a source (the engine's
/// `ProtocolVersion::CURRENT`; the daemon's tests check that they agree).
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest source protocol version this build accepts as a destination (the engine's
/// `ProtocolVersion::MIN_SUPPORTED`).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The daemon's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The daemon's package version.
    pub daemon: String,
    /// The migration protocol version it speaks as a source.
    pub protocol: u16,
    /// The oldest source protocol version it accepts as a destination.
    pub min_protocol: u16,
}

/// What the SPN self-check found for one migration SPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SpnStatus {
    /// Registered on the host's account.
    Registered,
    /// Registered by the daemon at start.
    RegisteredNow,
    /// Missing (event 14050 says how to fix it).
    Missing,
    /// The self-check could not run (event 14053 says why).
    Unknown,
}

impl SpnStatus {
    /// The name as on the wire (`registered_now`).
    pub fn as_str(self) -> &'static str {
        match self {
            SpnStatus::Registered => "registered",
            SpnStatus::RegisteredNow => "registered_now",
            SpnStatus::Missing => "missing",
            SpnStatus::Unknown => "unknown",
        }
    }
}

/// The state of one migration SPN, as found at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpnState {
    /// The SPN.
    pub spn: String,
    /// What the self-check found.
    pub state: SpnStatus,
}

/// What `host_show` answers (Hyper-V: `Get-VMHost`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Versions.
    pub version: VersionInfo,
    /// The configuration in force.
    pub config: Config,
    /// The migration SPNs as found at start.
    pub spns: Vec<SpnState>,
    /// The addresses this host offers sources for moves, in the order to try them
    /// (migration networks by priority).
    #[serde(default)]
    pub migration_addresses: Vec<SocketAddr>,
}

/// Migration settings a `host_set` changes (absent: unchanged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostChanges {
    /// Send and receive moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `kerberos`, `credssp` or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Live moves at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live_moves: Option<u32>,
    /// Storage moves at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_storage_moves: Option<u32>,
    /// `tcpip`, `compression` or `multichannel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<String>,
    /// A cap such as `100M`, or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<String>,
    /// The downtime target, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_target_ms: Option<u32>,
    /// Accept moves from any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_network: Option<bool>,
    /// The migration networks, `CIDR[:PRIORITY]` (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
}
