//! The live migration engine: the source's sender and the destination's receiver, driving
//! the protocol's state machines ([`crate::protocol::source`], [`crate::protocol::receiver`])
//! over byte streams.
//!
//! The engine does not know about Kerberos or TLS: a [`Link`] is a reader, a writer and a way
//! to close both, and a [`Dialer`] opens more links to the same destination (parallel
//! channels, the outcome query). The daemon implements them on the authenticated channel, so
//! every link is authenticated, bound and authorized before the engine sees a byte.
//!
//! # Source ([`send_vm`])
//!
//! ```text
//!  setup      Hello ─ HelloAck ─ VmConfig ─ Compatible ─ join channels 1..n
//!  pre-copy   round 1: every page the guest ever touched (untouched pages are zero at the
//!             destination too and are not sent); round r > 1: the pages dirtied during
//!             round r-1 (KVM dirty log + the VMM's own writes). Each channel's sender thread
//!             sends its stripes (runs of 512 pages), zero pages as flags, compressed if asked,
//!             within the bandwidth cap, then RoundEnd. After each round the engine measures
//!             the link's rate and the guest's dirty rate and predicts the downtime:
//!             dirty bytes ÷ rate. Within the target → switchover. Otherwise, with
//!             auto-converge, it throttles the vCPUs (20 %, then +10 % per round, up to 99 %)
//!             while the guest dirties more than half of what the link carries; without, it
//!             reports that the move cannot converge and cancels at the convergence timeout.
//!  switchover pause the vCPUs; SwitchoverBegin; the last dirty pages; vCPU and device state;
//!             once the destination acknowledged the final round: Complete.
//!  handoff    wait for Resumed, then Released, and the VM is the destination's.
//! ```
//!
//! Before Complete, every failure (cancel, peer gone, network cut, protocol error, timeout)
//! ends with the VM running here: the vCPUs resume if they were paused, the destination is
//! told if the link still works, and it discards what it built. After Complete the
//! destination decides; if the link breaks before its answer, the source neither resumes nor
//! releases: it asks on a new link (QueryOutcome) and follows the answer. When no answer can
//! be had, the VM stays paused here and the error says so ([`MoveError::InDoubt`]).
//!
//! Liveness: the source pings on channel 0 every second; each end declares the link lost when
//! it heard nothing for [`MoveOptions::link_timeout`], closes every channel, and follows the
//! rules above.
//!
//! The configuration sent is the VM's own with [`MoveOptions::switch_map`] applied (each
//! NIC's switch renamed, MAC unchanged), so the destination checks and builds the VM with the
//! switches it has.
//!
//! # Disks ([`MoveOptions::storage`], shared-nothing)
//!
//! With [`StorageOptions`], the configuration sent names the destination's paths (one
//! folder, or a file per disk) and says the disks come along; the destination checks them
//! against its [`DestinationOptions::storage_roots`] (outside, `..`, symbolic-link escapes,
//! existing files: [`incompatibility::STORAGE`]). The disk blocks travel in the pre-copy
//! rounds, striped over the channels like pages: round 1 the read-only parents the
//! destination does not already hold (identical by SHA-256: reused), round 2 — once the
//! destination acknowledged round 1, completed the parents and created the active layers on
//! them — the bulk copy of each active layer while the guest runs, rounds 3.. the blocks it
//! wrote meanwhile, and the final round, with the VM paused, the last ones. The destination
//! makes the bulk durable as it acknowledges round 2, and the source pauses only once every
//! round was acknowledged, so the pause does not wait for the destination's disk. The
//! destination writes each layer under a `.vmgate-partial` name and renames the active
//! layers into place before its VM opens them; until the VM resumes there, every file and
//! folder it created is removed when the move ends any other way. After the handoff the
//! source deletes the active layers (unless [`StorageOptions::keep_source`]) and reports
//! the parents ([`MoveStats::source_parents`]) for
//! [`crate::storage::local::release_files`] once the VM is shut down. See `storage.rs`.
//!
//! # Compare ([`compare_vm`])
//!
//! Hyper-V's Compare-VM: the setup above on one channel (Hello, VmConfig, the destination's
//! verdict), then, when the VM is compatible, a Cancel: the destination discards what it
//! prepared, the VM keeps running here untouched. The result is the destination's whole
//! report (the ids of [`incompatibility`]); empty means it could take the VM.
//!
//! # Destination ([`Destination`])
//!
//! [`Destination::handle`] takes each incoming link. A Hello of purpose Move starts a
//! session on that thread (the control channel); Join hands the link to its session; a
//! QueryOutcome is answered from the table of finished sessions. Each channel has its own
//! reader thread that checks every frame with the receiver state machine and writes pages
//! straight into the prepared VM's memory. On Complete the VM is built from the received
//! state, resumed, and acknowledged; [`Destination::handle`] returns it to the caller.

mod link;
mod rate;
mod receiver;
mod sender;
mod storage;
mod wire;

pub use link::{Dialer, Link, LinkCloser};
pub use rate::RateLimiter;
pub use receiver::{
    Destination, DestinationOptions, FaultAction, FaultHook, FaultPoint, HostCheck, Received,
    ReceivedEvent, ReceivedVm, incompatibility,
};
pub use sender::{compare_vm, map_switches, send_vm};
pub use storage::{StorageOptions, StorageTarget};
pub use wire::MoveDocument;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::protocol::{Compression, Incompatibility, ProtocolError, ProtocolVersion};
use crate::vm::VmError;

/// How a move runs (the source's side).
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// Parallel channels (1 to 16), each its own authenticated connection.
    pub channels: u16,
    /// Page compression.
    pub compression: Compression,
    /// Bandwidth cap in bytes per second over all channels; `None`: unlimited.
    pub bandwidth_limit: Option<u64>,
    /// The longest acceptable pause of the guest (QEMU's downtime-limit; default 300 ms).
    pub downtime_target: Duration,
    /// Throttle the vCPUs when the guest dirties faster than the link carries.
    pub auto_converge: bool,
    /// Give up (cancel, VM stays here) when pre-copy has not converged after this long.
    pub converge_timeout: Duration,
    /// Declare the link lost after this long without hearing from the peer.
    pub link_timeout: Duration,
    /// The longest the source waits for the destination to resume the VM after Complete.
    pub handoff_timeout: Duration,
    /// Our software version, for the Hello ("vmgate 0.1.0").
    pub software: String,
    /// Virtual switch renames, `(from, to)`, names compared without case (Hyper-V's
    /// `Compare-VM` / `Move-VM` with a fixed-up report): each NIC connected to `from` is sent
    /// to the destination connected to `to` (its MAC unchanged), so the destination checks
    /// and builds the VM with the mapped names. Switches without an entry are sent as they are.
    pub switch_map: Vec<(String, String)>,
    /// The protocol version announced in the Hello (default [`ProtocolVersion::CURRENT`]); a
    /// test can play a newer source. This build speaks only `CURRENT`: a destination that
    /// accepts another version makes the move fail at its acknowledgement, one that is older
    /// refuses it ([`MoveError::VersionRefused`]).
    pub version: ProtocolVersion,
    /// Shared-nothing: copy the VM's disks to the destination while the guest runs (`None`:
    /// the destination opens the same paths, e.g. shared storage).
    pub storage: Option<StorageOptions>,
}

impl Default for MoveOptions {
    fn default() -> MoveOptions {
        MoveOptions {
            channels: 1,
            compression: Compression::None,
            bandwidth_limit: None,
            downtime_target: Duration::from_millis(300),
            auto_converge: true,
            converge_timeout: Duration::from_secs(600),
            link_timeout: Duration::from_secs(15),
            handoff_timeout: Duration::from_secs(60),
            software: concat!("vmgate ", env!("CARGO_PKG_VERSION")).into(),
            switch_map: Vec::new(),
            version: ProtocolVersion::CURRENT,
            storage: None,
        }
    }
}

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Versions, configuration, channels.
    Setup,
    /// Pre-copy rounds while the guest runs.
    PreCopy,
    /// The guest is paused: the last pages and the state.
    Switchover,
    /// Complete sent; waiting for the destination to resume the VM.
    Handoff,
    /// The VM runs on the destination.
    Completed,
    /// Ended with the VM running on the source.
    Cancelled,
    /// Ended with the VM running on the source after a failure.
    Failed,
}

/// A progress report (after setup, after every round, at each phase change).
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// The round just finished (0 before the first).
    pub round: u32,
    /// Bytes written to the links so far.
    pub bytes_sent: u64,
    /// Bytes of guest memory still to send (the dirty set).
    pub bytes_remaining: u64,
    /// The link's measured rate, bytes per second.
    pub rate_bytes_s: f64,
    /// The guest's measured dirty rate, bytes per second.
    pub dirty_rate_bytes_s: f64,
    /// The downtime a switchover now would cost, in milliseconds.
    pub expected_downtime_ms: f64,
    /// Percent of time the vCPUs are held back (auto-converge).
    pub throttle_percent: u32,
    /// False once the engine sees that the dirty set does not shrink to the target.
    pub converging: bool,
}

/// The figures of a finished move.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MoveStats {
    /// From the first byte to Released, in milliseconds.
    pub total_ms: f64,
    /// Setup (versions, configuration, channels), in milliseconds.
    pub setup_ms: f64,
    /// From pausing the vCPUs here to the destination's Resumed, in milliseconds.
    pub downtime_ms: f64,
    /// Bytes written to the links (frames, all channels).
    pub bytes_on_wire: u64,
    /// Pre-copy rounds including the final one.
    pub rounds: u32,
    /// Pages sent, including zero pages sent as flags.
    pub pages_sent: u64,
    /// Pages sent as zero flags.
    pub zero_pages: u64,
    /// Pages never touched by the guest, not sent at all.
    pub untouched_pages: u64,
    /// Page bytes before compression ÷ page bytes on the wire (1.0 without compression).
    pub compression_ratio: f64,
    /// Channels used.
    pub channels: u16,
    /// The highest throttle auto-converge applied, in percent.
    pub max_throttle_percent: u32,
    /// Mean rate over the move, bytes per second.
    pub throughput_bytes_s: f64,
    /// Shared-nothing moves: disk bytes sent (data blocks before compression).
    pub disk_bytes_sent: u64,
    /// Shared-nothing moves: of `disk_bytes_sent`, the read-only parents' data.
    pub disk_parent_bytes_sent: u64,
    /// Shared-nothing moves: bytes of read-only parents the destination reused (not sent;
    /// their file lengths).
    pub disk_bytes_reused: u64,
    /// Shared-nothing moves: the source's active layers deleted after the handoff (empty
    /// with `keep_source`).
    pub source_files_deleted: Vec<std::path::PathBuf>,
    /// Shared-nothing moves: the source's read-only parents. They stay: this VM holds them
    /// open until it is shut down, and other VMs may share them; delete them with
    /// [`crate::storage::local::release_files`] after shutting the VM down.
    pub source_parents: Vec<std::path::PathBuf>,
    /// Shared storage (a move without its storage): the images handed over at the
    /// switchover. The destination opened the same files; no disk data crossed.
    pub shared_disks: Vec<std::path::PathBuf>,
}

/// Why a move ended without the VM moving. Every variant but [`MoveError::InDoubt`] and
/// [`MoveError::DisksHeld`] means the VM runs on the source.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The destination's protocol version is older than ours.
    #[error(
        "the destination refused the move: it runs {destination_software} (protocol versions {destination_min} to {destination}) and this host runs {source_software} (protocol version {source_version}); update the destination first. The VM keeps running here."
    )]
    VersionRefused {
        /// Our software.
        source_software: String,
        /// Our protocol version.
        source_version: u16,
        /// Theirs.
        destination_software: String,
        /// Their oldest accepted version.
        destination_min: u16,
        /// Their version.
        destination: u16,
    },
    /// The destination cannot take the VM.
    #[error("the destination cannot take the VM: {}. The VM keeps running here.", list(.report))]
    Incompatible {
        /// Every reason, with its id.
        report: Vec<(u32, String)>,
    },
    /// Cancelled (by the user, or by the destination).
    #[error("the move was cancelled: {reason}. The VM keeps running here.")]
    Cancelled {
        /// Why.
        reason: String,
    },
    /// Pre-copy did not converge within the timeout.
    #[error(
        "the move cannot converge: the guest dirties {dirty_mib_s:.0} MiB/s while the link carries {rate_mib_s:.0} MiB/s, so a switchover would pause it for {expected_ms:.0} ms, more than the {target_ms} ms target; gave up after {seconds:.0} s. The VM keeps running here. Enable auto-converge, raise the downtime target or the bandwidth, or move when the guest is quieter."
    )]
    NotConverging {
        /// Guest dirty rate.
        dirty_mib_s: f64,
        /// Link rate.
        rate_mib_s: f64,
        /// Predicted downtime.
        expected_ms: f64,
        /// The target.
        target_ms: u128,
        /// How long pre-copy ran.
        seconds: f64,
    },
    /// The move failed before the handoff.
    #[error("the move failed while {phase}: {cause}. The VM keeps running here.")]
    Failed {
        /// What the engine was doing.
        phase: &'static str,
        /// What went wrong.
        cause: String,
    },
    /// The link broke after Complete and the destination could not be asked.
    #[error(
        "the link to the destination broke during the handoff and the destination could not be asked how the move ended ({cause}). The VM stays PAUSED here so that it never runs twice: check the destination (vmgate jobs show), then resume it here (vmgate vm resume) only if the destination does not run it."
    )]
    InDoubt {
        /// Why the destination could not be asked.
        cause: String,
    },
    /// Shared storage: the move failed after the VM's disks were handed over, and another
    /// process still has an image open for writing.
    #[error(
        "the move failed ({cause}) after this host had handed the VM's disks over, and they cannot be taken back ({held}). Another host may run the VM on them, so it stays PAUSED here so that two hosts never write one image: check the destination (vmgate jobs show, vmgate vm list) and stop its copy, then resume the VM here (vmgate vm resume)."
    )]
    DisksHeld {
        /// Why the move failed.
        cause: String,
        /// Why the disks could not be taken back.
        held: String,
    },
}

fn list(report: &[(u32, String)]) -> String {
    report
        .iter()
        .map(|(id, m)| format!("[{id}] {m}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl MoveError {
    /// Whether the VM runs on the source after this error.
    pub fn vm_runs_here(&self) -> bool {
        !matches!(
            self,
            MoveError::InDoubt { .. } | MoveError::DisksHeld { .. }
        )
    }

    fn incompatible(report: &[Incompatibility<'_>]) -> MoveError {
        MoveError::Incompatible {
            report: report
                .iter()
                .map(|i| (i.id, i.message.to_string()))
                .collect(),
        }
    }
}

/// Errors of the engine's own operations (wrapped into [`MoveError`] at the end).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The protocol failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A link failed.
    #[error("the link failed")]
    Io(#[from] std::io::Error),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// A cancel request shared between the caller and a running move.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    reason: Arc<std::sync::Mutex<String>>,
}

impl CancelToken {
    /// A token not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Asks the move to stop (honoured until the handoff).
    pub fn cancel(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            reason.clone_into(&mut r);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    /// The flag a cancel raises, for loops that poll one (e.g. a storage-only move's).
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Whether a cancel was asked.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The reason given.
    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }
}
