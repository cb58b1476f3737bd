//! The move resource: live moves (`move`), their dry run (`compare`), their progress and
//! their figures.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::credential::CcacheBlob;

/// What a `move` or `compare` names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveSpec {
    /// The VM.
    pub vm: String,
    /// The destination's migration addresses, by its priority (tried in order).
    pub to: Vec<String>,
    /// The destination's DNS name (its migration SPN's host).
    pub destination: String,
    /// The caller's credential cache holding a forwardable TGT, handed over on the local
    /// socket ("logged on to the source"). Remote callers forward their TGT in Kerberos
    /// instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ccache: Option<CcacheBlob>,
    /// Virtual switch renames, `FROM=TO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switch_map: Vec<String>,
    /// Shared-nothing: copy every disk into this folder of the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_path: Option<String>,
    /// Shared-nothing: copy each disk to its own destination file, `SRC=DST`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Keep the source's disk files after a shared-nothing move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_source: bool,
}

/// One incompatibility (Compare-VM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incompatibility {
    /// Its stable id (1001 configuration, 1002 memory, 1003 processor, 1004 build, 1005
    /// switch, 1006 migration disabled, 1007 busy, 1008 network, 1009 storage path, 1010
    /// shared storage).
    pub id: u32,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// How the source host authenticated as the user towards the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MoveMethod {
    /// The user's own ticket, handed over on the source's local socket.
    OwnTicket,
    /// The user's TGT, forwarded to the source over the gateway.
    ForwardedTgt,
    /// Constrained delegation (S4U2Proxy) with the user's service ticket as evidence.
    ConstrainedDelegation,
    /// Protocol transition (S4U2Self, then S4U2Proxy).
    ProtocolTransition,
    /// The source host's own identity (auth type `host`).
    Host,
}

impl MoveMethod {
    /// The name as on the wire (`constrained-delegation`).
    pub fn as_str(self) -> &'static str {
        match self {
            MoveMethod::OwnTicket => "own-ticket",
            MoveMethod::ForwardedTgt => "forwarded-tgt",
            MoveMethod::ConstrainedDelegation => "constrained-delegation",
            MoveMethod::ProtocolTransition => "protocol-transition",
            MoveMethod::Host => "host",
        }
    }
}

/// The figures of a finished move, as the engine measured them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoveFigures {
    /// From the first byte to the release, ms.
    pub total_ms: f64,
    /// Setup (versions, configuration, channels), ms.
    pub setup_ms: f64,
    /// From pausing the vCPUs here to the destination's resume, ms.
    pub downtime_ms: f64,
    /// Bytes written to the links (frames, all channels).
    pub bytes_on_wire: u64,
    /// Pre-copy rounds including the final one.
    pub rounds: u32,
    /// Pages sent, zero pages (sent as flags) included.
    pub pages_sent: u64,
    /// Pages sent as zero flags.
    pub zero_pages: u64,
    /// Pages the guest never touched, not sent at all.
    pub untouched_pages: u64,
    /// Page bytes before compression ÷ page bytes on the wire.
    pub compression_ratio: f64,
    /// Channels used.
    pub channels: u16,
    /// The highest throttle auto-converge applied, percent.
    pub max_throttle_percent: u32,
    /// Mean rate over the move, bytes per second.
    pub throughput_bytes_s: f64,
    /// Shared-nothing moves: disk bytes sent.
    pub disk_bytes_sent: u64,
    /// Of `disk_bytes_sent`, the read-only parents' data.
    pub disk_parent_bytes_sent: u64,
    /// Bytes of read-only parents the destination already had (not sent).
    pub disk_bytes_reused: u64,
    /// The source's active layers deleted after the handoff.
    pub source_files_deleted: Vec<PathBuf>,
    /// The source's read-only parents (released with the VM).
    pub source_parents: Vec<PathBuf>,
    /// Shared storage: the images handed over at the switchover.
    pub shared_disks: Vec<PathBuf>,
}

/// How a move went (`moved`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveSummary {
    /// The job.
    pub job: String,
    /// The VM.
    pub vm: String,
    /// The destination.
    pub destination: String,
    /// The address used.
    pub address: String,
    /// The user it ran as.
    pub user: String,
    /// How this host authenticated as the user.
    pub method: MoveMethod,
    /// The engine's figures.
    pub stats: MoveFigures,
}

/// Where a live move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LivePhase {
    /// Versions, configuration, channels.
    Setup,
    /// Pre-copy rounds while the guest runs.
    PreCopy,
    /// The guest is paused: the last pages and the state.
    Switchover,
    /// Waiting for the destination to resume the VM.
    Handoff,
    /// The VM runs on the destination.
    Completed,
    /// Ended with the VM running on the source.
    Cancelled,
    /// Ended with the VM running on the source after a failure.
    Failed,
}

impl LivePhase {
    /// The name as on the wire (`pre-copy`).
    pub fn as_str(self) -> &'static str {
        match self {
            LivePhase::Setup => "setup",
            LivePhase::PreCopy => "pre-copy",
            LivePhase::Switchover => "switchover",
            LivePhase::Handoff => "handoff",
            LivePhase::Completed => "completed",
            LivePhase::Cancelled => "cancelled",
            LivePhase::Failed => "failed",
        }
    }
}

/// A live move's progress report (after setup, after every round, at each phase change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveProgress {
    /// The job.
    pub job: String,
    /// The phase.
    pub phase: LivePhase,
    /// The round just finished (0 before the first).
    pub round: u32,
    /// Bytes written to the links so far.
    pub bytes_sent: u64,
    /// Bytes of guest memory still to send.
    pub bytes_remaining: u64,
    /// The link's measured rate, bytes per second.
    pub rate_bytes_s: f64,
    /// The guest's dirty rate, bytes per second.
    pub dirty_rate_bytes_s: f64,
    /// The downtime a switchover now would cost, ms.
    pub expected_downtime_ms: f64,
    /// Percent of time the vCPUs are held back (auto-converge).
    pub throttle_percent: u32,
    /// False once the dirty set does not shrink to the target.
    pub converging: bool,
}

/// What kind of failure ended a move: what the CLI's advice is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MoveFailureKind {
    /// No such VM on the source.
    NotFound,
    /// The VM cannot be moved now (off, already moving).
    VmBusy,
    /// Authentication or authorization refused (see the diagnosis).
    Denied,
    /// The destination could not be reached on any address.
    Unreachable,
    /// The destination runs an older protocol.
    VersionRefused,
    /// The destination cannot take the VM (the incompatibility report).
    Incompatible,
    /// Cancelled; the VM runs on the source.
    Cancelled,
    /// Pre-copy did not converge; the VM runs on the source.
    NotConverging,
    /// The move failed before the handoff; the VM runs on the source.
    Failed,
    /// The link broke during the handoff: the VM is paused on the source until someone
    /// checks where it runs.
    InDoubt,
    /// Shared storage: the images were handed over and cannot be taken back; the VM is
    /// paused on the source.
    DisksHeld,
}

impl MoveFailureKind {
    /// Whether the VM was left paused on the source (it must not run twice).
    pub fn vm_left_paused(self) -> bool {
        matches!(self, MoveFailureKind::InDoubt | MoveFailureKind::DisksHeld)
    }
}
