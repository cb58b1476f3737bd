//! The local control socket: the `vmgate` CLI on this host talks to the daemon here.
//!
//! # Admission
//!
//! Every connection is checked by the peer's credentials as the kernel reports them
//! (`SO_PEERCRED`: the uid, gid and pid of the process that connected), before a byte is read:
//!
//! * uid 0 is admitted;
//! * otherwise the peer's user must belong to the configured `local_group`, as its primary group
//!   or a supplementary one (`getgrouplist` of the uid's user entry, read at each connection, so
//!   that `usermod -aG` takes effect without a restart);
//! * anyone else gets one JSON line `{"result":"error","code":"access_denied","message":...}`
//!   saying why and how to get access, and the connection is closed (event 10010).
//!
//! The socket file itself is mode 0666 so that a refused user reaches the daemon and is told
//! why, instead of a bare "permission denied" from the file system: the file mode is not the
//! access check, the peer credentials are. (A stricter folder around the socket still works.)
//!
//! # Framing
//!
//! JSON lines in both directions. A request is one line of at most [`MAX_REQUEST`] bytes (1 MiB,
//! counted before anything bigger is allocated); a longer line gets a `request_too_large` error
//! and the connection is closed. A line that is not a valid request gets `bad_request` and the
//! connection stays usable. The server answers each request with zero or more `progress` lines
//! followed by exactly one final line (any other `result`).
//!
//! ```text
//! → {"request":"version"}
//! ← {"result":"version","daemon":"0.1.0","protocol":1,"min_protocol":1}
//! → {"request":"host_show"}
//! ← {"result":"host","version":{...},"config":{...},"spns":[...]}
//! → {"request":"forward_credential","ccache":"<base64 of a ccache file>"}
//! ```
//!
//! # Extending
//!
//! New requests (VMs, moves, jobs) are new [`Request`] variants; the daemon's dispatcher is a
//! [`ControlHandler`] (a trait, also implemented for closures). [`BasicHandler`] serves what
//! this module knows (`version`, `host_show`) and answers `unsupported` for the rest: a richer
//! handler matches its own requests and passes the others to a `BasicHandler`.
//!
//! The forwarded credential ([`CcacheBlob`]) is a secret: zeroed on drop, printed as
//! `(secret, N bytes)`, never logged, and not echoed in error messages.

use std::ffi::CString;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use super::config::Config;
use super::events::{Event, EventLog};

/// The longest request line, in bytes (the line break not counted).
pub const MAX_REQUEST: usize = 1024 * 1024;
/// The longest response line a client reads.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// The largest forwarded credential cache accepted.
pub const MAX_CCACHE: usize = 512 * 1024;
/// The most console bytes one `vm_console` answer carries.
pub const MAX_CONSOLE_CHUNK: usize = 256 * 1024;
/// Connections served at once; more are told the daemon is busy.
pub const MAX_CONNECTIONS: usize = 64;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The socket's folder cannot be created.
    #[error("cannot create the folder of the control socket {}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket; remove it or choose another control_socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another daemon answers on the socket.
    #[error("another vmgated already listens on {}", path.display())]
    AlreadyRunning {
        /// The path.
        path: PathBuf,
    },
    /// Binding failed.
    #[error("cannot listen on the control socket {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting (client side) failed.
    #[error("cannot connect to the control socket {} (is vmgated running?)", path.display())]
    Connect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("the control connection failed")]
    Io(#[source] std::io::Error),
    /// The daemon closed the connection without a final answer.
    #[error("the daemon closed the connection without answering")]
    Closed,
    /// A line that is not a valid message.
    #[error("the daemon sent a line that is not a valid response")]
    BadResponse(#[source] serde_json::Error),
    /// A response line longer than [`MAX_RESPONSE`].
    #[error("the daemon sent a response longer than {MAX_RESPONSE} bytes")]
    ResponseTooLarge,
    /// The request could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// A forwarded credential: the content of a Kerberos ccache file. Zeroed on drop; `Debug`
/// prints `(secret, N bytes)`. On the wire it is base64 text.
#[derive(Clone, PartialEq, Eq)]
pub struct CcacheBlob(Zeroizing<Vec<u8>>);

impl CcacheBlob {
    /// Wraps the bytes of a ccache file.
    pub fn new(bytes: Vec<u8>) -> CcacheBlob {
        CcacheBlob(Zeroizing::new(bytes))
    }

    /// The bytes, for the one place that writes them into a private ccache.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CcacheBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(secret, {} bytes)", self.0.len())
    }
}

impl Serialize for CcacheBlob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*self.0));
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for CcacheBlob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CcacheBlob, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        // The decoded size is 3/4 of the text: check before decoding.
        if text.len() / 4 * 3 > MAX_CCACHE {
            return Err(serde::de::Error::custom(format!(
                "the credential cache is larger than {MAX_CCACHE} bytes"
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("the credential cache is not valid base64"))?;
        Ok(CcacheBlob::new(bytes))
    }
}

/// A request on the control socket (and on the gateway's control channels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's version and protocol versions.
    Version,
    /// The host's settings and SPN state (Hyper-V: `Get-VMHost`).
    HostShow,
    /// Changes migration settings at run time, kept across restarts in the state folder
    /// (Hyper-V: `Set-VMHost`, `Enable-VMMigration`, `Add-VMMigrationNetwork`).
    HostSet {
        /// What changes.
        changes: HostChanges,
    },
    /// The VMs this host runs (Hyper-V: `Get-VM`).
    VmList,
    /// Creates a VM from its configuration (TOML text) and starts it (Hyper-V: `New-VM`,
    /// `Start-VM`).
    VmCreate {
        /// The configuration document.
        config: String,
    },
    /// Starts a stopped VM (a cold boot from its definition).
    VmStart {
        /// The VM.
        name: String,
    },
    /// Turns a VM off (its definition stays; Hyper-V: `Stop-VM -TurnOff`).
    VmStop {
        /// The VM.
        name: String,
    },
    /// Pauses a running VM (Hyper-V: `Suspend-VM`; virsh `suspend`).
    VmPause {
        /// The VM.
        name: String,
    },
    /// Resumes a paused VM (Hyper-V: `Resume-VM`; virsh `resume`), also one a move left
    /// paused in doubt: its images are taken back first, refused while another host holds
    /// them.
    VmResume {
        /// The VM.
        name: String,
    },
    /// One VM in detail.
    VmShow {
        /// The VM.
        name: String,
    },
    /// Runs the VM's self-checks (memory patterns, guest progress, disk sequence).
    VmCheck {
        /// The VM.
        name: String,
    },
    /// The VM's serial console output from `offset` (at most [`MAX_CONSOLE_CHUNK`] bytes).
    VmConsole {
        /// The VM.
        name: String,
        /// Where to start reading; past the end gives nothing.
        #[serde(default)]
        offset: u64,
    },
    /// Moves a VM of this host live to another host as the caller (Hyper-V: `Move-VM`).
    /// Progress lines follow; the final line is `moved` or an error.
    Move(MoveSpec),
    /// Checks whether a VM of this host could move to another host, without moving it
    /// (Hyper-V: `Compare-VM`).
    Compare(MoveSpec),
    /// Moves a VM's disks to new files on this host while it runs (Hyper-V:
    /// `Move-VMStorage`; virsh `blockcopy`). A job like a move, counted against
    /// `max_storage_moves`; progress lines follow; the final line is `storage_moved` or an
    /// error.
    MoveStorage(StorageMoveSpec),
    /// Moves in progress, queued and recently ended.
    JobsList,
    /// One job.
    JobShow {
        /// Its id.
        id: String,
    },
    /// Cancels a job: a queued one leaves the queue, a running one stops and the VM keeps
    /// running here.
    JobCancel {
        /// Its id.
        id: String,
    },
}

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

/// What a `move_storage` names: where every disk goes (one folder, or a file per disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageMoveSpec {
    /// The VM.
    pub vm: String,
    /// Every disk (and its parents) into this folder, keeping the file names
    /// (`-DestinationStoragePath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_path: Option<String>,
    /// Some disks, each to its own file: (the disk's current file, its new file) (`-VHDs`).
    /// Disks not named stay where they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<(String, String)>,
    /// Keep the old files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_source: bool,
    /// A cap on the copy rate while the guest runs, such as `100MiB/s` (virsh blockcopy
    /// `--bandwidth`); the last blocks, with the VM paused, are never held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
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

impl Request {
    /// The request's name as on the wire (`host_show`), for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Version => "version",
            Request::HostShow => "host_show",
            Request::HostSet { .. } => "host_set",
            Request::VmList => "vm_list",
            Request::VmCreate { .. } => "vm_create",
            Request::VmStart { .. } => "vm_start",
            Request::VmStop { .. } => "vm_stop",
            Request::VmPause { .. } => "vm_pause",
            Request::VmResume { .. } => "vm_resume",
            Request::VmShow { .. } => "vm_show",
            Request::VmCheck { .. } => "vm_check",
            Request::VmConsole { .. } => "vm_console",
            Request::Move(_) => "move",
            Request::Compare(_) => "compare",
            Request::MoveStorage(_) => "move_storage",
            Request::JobsList => "jobs_list",
            Request::JobShow { .. } => "job_show",
            Request::JobCancel { .. } => "job_cancel",
        }
    }
}

/// Why a request failed (stable names for scripts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer may not use the socket.
    AccessDenied,
    /// The request line is longer than [`MAX_REQUEST`].
    RequestTooLarge,
    /// The line is not a valid request.
    BadRequest,
    /// This daemon does not serve that request.
    Unsupported,
    /// Too many connections.
    Busy,
    /// The request was valid but failed.
    Failed,
    /// The VM, job or host named does not exist.
    NotFound,
    /// Authentication or authorization failed (the message has the Windows code, cause and
    /// fix).
    Denied,
    /// A host could not be reached.
    Unreachable,
    /// The destination cannot take the VM (or refuses moves): the message lists why.
    Refused,
    /// The move was cancelled; the VM runs here.
    Cancelled,
}

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

impl VersionInfo {
    /// This build's versions.
    pub fn current() -> VersionInfo {
        use vmgate_migrate::protocol::ProtocolVersion;
        VersionInfo {
            daemon: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: ProtocolVersion::CURRENT.get(),
            min_protocol: ProtocolVersion::MIN_SUPPORTED.get(),
        }
    }
}

/// The state of one migration SPN, as found at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpnState {
    /// The SPN.
    pub spn: String,
    /// `registered`, `registered_now` (by the daemon at start), `missing`, `unknown`.
    pub state: String,
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
    pub migration_addresses: Vec<String>,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why, for scripts.
    pub code: ErrorCode,
    /// Why, for people (with the fix when there is one).
    pub message: String,
    /// The Windows code of an authentication failure (`0x8009030E`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_code: Option<String>,
}

/// One VM in a `vm_list` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// The VM's name.
    pub name: String,
    /// `running`, or `paused`.
    pub state: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// How it came here (`moved from <host> by <user>`).
    pub origin: String,
}

/// One VM in detail (`vm_show`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDetail {
    /// The summary line.
    #[serde(flatten)]
    pub summary: VmSummary,
    /// Processor compatibility mode.
    pub cpu_compat: bool,
    /// The processor features the guest is shown (while it runs), as a destination checks
    /// them: `avx2 (CPUID 0x7 ebx bit 5)`.
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The NICs: MAC and virtual switch.
    pub nics: Vec<NicInfo>,
    /// The disks' image files.
    pub disks: Vec<String>,
    /// Each disk's I/O since the VM started here (while it runs; `virsh domblkstat`).
    #[serde(default)]
    pub disk_stats: Vec<DiskStats>,
    /// The serial console log.
    pub console: Option<String>,
}

/// One disk's I/O counters and write latency, as the block device served them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flush requests completed.
    pub flushes: u64,
    /// Requests that failed or were rejected.
    pub errors: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Write latency on the host (doorbell to completion), ns: median, 99th percentile, max.
    pub write_p50_ns: u64,
    /// See `write_p50_ns`.
    pub write_p99_ns: u64,
    /// See `write_p50_ns`.
    pub write_max_ns: u64,
    /// Over how long, ms.
    pub window_ms: u64,
}

/// A NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// The MAC address.
    pub mac: String,
    /// The virtual switch.
    pub switch: String,
}

/// What `vm_check` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCheckReport {
    /// The VM.
    pub vm: String,
    /// Whether every check passed.
    pub passed: bool,
    /// One line per check.
    pub details: Vec<String>,
}

/// One incompatibility (Compare-VM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incompatibility {
    /// Its stable id (1001 configuration, 1002 memory, 1003 processor, 1004 build, 1005
    /// switch, 1006 migration disabled, 1007 busy, 1008 network, 1009 storage path).
    pub id: u32,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// How a move went (`moved`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// How this host authenticated as the user: `own-ticket`, `forwarded-tgt`,
    /// `constrained-delegation`, `protocol-transition`.
    pub method: String,
    /// The engine's statistics (`total_ms`, `setup_ms`, `downtime_ms`, `bytes_on_wire`,
    /// `rounds`, `throughput_bytes_s`, ...).
    pub stats: serde_json::Value,
}

/// How a storage-only move went (`storage_moved`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageMoveSummary {
    /// The job.
    pub job: String,
    /// The VM.
    pub vm: String,
    /// Who asked for it.
    pub user: String,
    /// From the slot to the end, ms.
    pub total_ms: u64,
    /// How long the VM was paused, all disks together, µs.
    pub paused_us: u64,
    /// Bytes written to the new files.
    pub bytes_copied: u64,
    /// Each disk moved.
    pub disks: Vec<MovedDisk>,
}

/// One disk of a storage-only move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedDisk {
    /// Its index.
    pub disk: usize,
    /// Its file before the move.
    pub source: String,
    /// Its file now.
    pub destination: String,
    /// Each layer at the destination (base first): `copy`, `reuse` (an identical parent was
    /// there already) or `mirror` (the active layer).
    pub layers: Vec<(String, String)>,
    /// Bytes written.
    pub bytes_copied: u64,
    /// Dirty rounds before the pause.
    pub rounds: u32,
    /// How long the VM was paused for this disk, µs.
    pub paused_us: u64,
    /// What happened to each old file.
    pub old_files: Vec<OldFile>,
}

/// An old file after a storage-only move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldFile {
    /// The file.
    pub path: String,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Why it was kept, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_because: Option<String>,
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `version`.
    Version(VersionInfo),
    /// Answer to `host_show`.
    Host(Box<HostInfo>),
    /// Answer to `vm_list`.
    Vms {
        /// The VMs, by name.
        vms: Vec<VmSummary>,
    },
    /// Answer to `vm_show`.
    Vm(Box<VmDetail>),
    /// Answer to `vm_check`.
    Checked(VmCheckReport),
    /// Answer to `vm_console`.
    Console {
        /// The text read (lossy UTF-8).
        text: String,
        /// Where the next read starts.
        next_offset: u64,
    },
    /// Answer to `move`: the VM runs on the destination.
    Moved(Box<MoveSummary>),
    /// Answer to `move_storage`: the VM runs on its new files.
    StorageMoved(Box<StorageMoveSummary>),
    /// Answer to `compare`: every incompatibility (none: the move can go).
    Compared {
        /// The VM.
        vm: String,
        /// The destination.
        destination: String,
        /// What stands in the way, each with its stable id.
        report: Vec<Incompatibility>,
    },
    /// Answer to `jobs_list`.
    Jobs {
        /// Newest first.
        jobs: Vec<crate::host::jobs::JobInfo>,
    },
    /// Answer to `job_show` and `job_cancel`.
    Job(Box<crate::host::jobs::JobInfo>),
    /// The request was carried out (no data to return).
    Done {
        /// What was done, for people.
        message: String,
    },
    /// An intermediate line (a move's progress); more lines follow.
    Progress {
        /// The progress data (defined by the request that produces it).
        progress: serde_json::Value,
    },
    /// The request failed.
    Error(ErrorReply),
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply {
            code,
            message: message.into(),
            win_code: None,
        })
    }

    /// An authentication or authorization failure with its Windows code.
    pub fn denied(diagnosis: &vmgate_auth::winerr::Diagnosis) -> Response {
        Response::Error(ErrorReply {
            code: ErrorCode::Denied,
            message: diagnosis.to_string(),
            win_code: Some(diagnosis.code.hex()),
        })
    }

    /// Whether this is the last line of an answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, Response::Progress { .. })
    }

    /// The JSON line (without the line break).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"result\":\"error\",\"code\":\"failed\",\"message\":\"cannot encode the answer: {e}\"}}")
        })
    }
}

/// How a peer was admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Admission {
    /// uid 0.
    Root,
    /// A member of the configured local group.
    GroupMember {
        /// The group.
        group: String,
    },
}

/// The process at the other end of a connection, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalPeer {
    /// Its uid.
    pub uid: u32,
    /// Its gid (at connect time).
    pub gid: u32,
    /// Its pid (at connect time).
    pub pid: i32,
    /// The uid's user name, when it has one.
    pub user: Option<String>,
    /// Why it was admitted.
    pub admission: Admission,
}

/// A caller that came through the gateway: Kerberos authenticated it, the admin group
/// authorized it.
#[derive(Debug)]
pub struct RemotePeer {
    /// `alice@LAB.EXAMPLE.TEST`.
    pub principal: String,
    /// Where it connected from.
    pub addr: std::net::SocketAddr,
    /// What this host may use to act for the caller towards another host.
    pub acting: vmgate_auth::channel::ActingFor,
}

/// Who sent a request.
#[derive(Debug)]
pub enum Caller {
    /// A process on this host, by its peer credentials ("logged on to the host").
    Local(LocalPeer),
    /// A user over the network.
    Remote(RemotePeer),
}

impl Caller {
    /// Who, for logs and job records (`uid 0 (root)`, `alice@LAB.EXAMPLE.TEST from 127.0.0.1`).
    pub fn describe(&self) -> String {
        match self {
            Caller::Local(p) => match &p.user {
                Some(u) => format!("{u} (uid {}) on this host", p.uid),
                None => format!("uid {} on this host", p.uid),
            },
            Caller::Remote(r) => format!("{} from {}", r.principal, r.addr.ip()),
        }
    }
}

/// Writes intermediate lines (progress) before the final answer.
pub struct Replies<'a> {
    out: &'a mut dyn Write,
}

impl fmt::Debug for Replies<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Replies")
    }
}

impl<'a> Replies<'a> {
    /// Replies written to `out`.
    pub fn new(out: &'a mut dyn Write) -> Replies<'a> {
        Replies { out }
    }

    /// Sends one intermediate line now. An error means the client went away: stop the work
    /// that feeds it, or carry on without it.
    pub fn send(&mut self, response: &Response) -> std::io::Result<()> {
        write_line(&mut *self.out, &response.to_line())
    }
}

/// Serves requests on the control socket: the extension point for the daemon's dispatcher.
pub trait ControlHandler: Send + Sync {
    /// Answers `request` from `caller`; may send progress lines through `replies` first.
    fn handle(&self, caller: &Caller, request: Request, replies: &mut Replies<'_>) -> Response;
}

impl<F> ControlHandler for F
where
    F: Fn(&Caller, Request, &mut Replies<'_>) -> Response + Send + Sync,
{
    fn handle(&self, caller: &Caller, request: Request, replies: &mut Replies<'_>) -> Response {
        self(caller, request, replies)
    }
}

/// Serves `version` and `host_show`; everything else is `unsupported`.
#[derive(Clone, Debug)]
pub struct BasicHandler {
    host: Arc<HostInfo>,
}

impl BasicHandler {
    /// A handler answering with `host`.
    pub fn new(host: HostInfo) -> BasicHandler {
        BasicHandler {
            host: Arc::new(host),
        }
    }
}

impl ControlHandler for BasicHandler {
    fn handle(&self, _caller: &Caller, request: Request, _replies: &mut Replies<'_>) -> Response {
        match request {
            Request::Version => Response::Version(self.host.version.clone()),
            Request::HostShow => Response::Host(Box::new((*self.host).clone())),
            other => Response::error(
                ErrorCode::Unsupported,
                format!(
                    "this daemon does not serve \"{}\" requests yet",
                    other.name()
                ),
            ),
        }
    }
}

/// Decides whether a uid may use the socket (root, or a member of `local_group`).
pub fn admit(uid: u32, gid: u32, pid: i32, local_group: Option<&str>) -> Result<LocalPeer, String> {
    use nix::unistd::{Group, Uid, User, getgrouplist};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user.as_ref().map(|u| u.name.clone());
    let peer = |admission| LocalPeer {
        uid,
        gid,
        pid,
        user: name.clone(),
        admission,
    };
    if uid == 0 {
        return Ok(peer(Admission::Root));
    }
    let who = match &name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    let Some(group_name) = local_group else {
        return Err(format!(
            "{who} is not root, and no local_group is configured: only root may use this socket"
        ));
    };
    let group = match Group::from_name(group_name) {
        Ok(Some(g)) => g,
        Ok(None) => {
            return Err(format!(
                "{who} is not root, and the configured local_group \"{group_name}\" does not exist \
                 on this host (fix: groupadd {group_name})"
            ));
        }
        Err(e) => return Err(format!("cannot look up the group \"{group_name}\": {e}")),
    };
    let Some(user) = user else {
        return Err(format!(
            "{who} has no user entry, so its membership of \"{group_name}\" cannot be checked"
        ));
    };
    // The primary group (from the user entry) and the supplementary ones (from the group
    // database); getgrouplist lists both.
    let member = user.gid == group.gid
        || CString::new(user.name.clone())
            .ok()
            .and_then(|cname| getgrouplist(&cname, user.gid).ok())
            .is_some_and(|groups| groups.contains(&group.gid));
    if member {
        Ok(peer(Admission::GroupMember {
            group: group_name.to_owned(),
        }))
    } else {
        Err(format!(
            "{who} is not root and not a member of the local group \"{group_name}\" (fix: usermod \
             -aG {group_name} {}, then log in again)",
            user.name
        ))
    }
}

fn write_line(mut stream: impl Write, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    stream.write_all(&buf)?;
    stream.flush()
}

/// What reading one bounded line gave.
enum Line {
    /// A complete line (without its break).
    Text(Vec<u8>),
    /// The peer closed the connection (a partial last line without a break counts as a line).
    Eof,
    /// More than the limit without a line break.
    TooLong,
}

fn read_line(reader: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = reader.take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text(buf));
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(buf))
}

/// The control socket's listener.
#[derive(Debug)]
pub struct LocalServer {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
    local_group: Option<String>,
    events: Option<EventLog>,
}

impl LocalServer {
    /// Binds the socket at `path` (creating its folder with mode 0755 when missing; replacing a
    /// stale socket that nobody answers on; refusing when another daemon answers).
    pub fn bind(
        path: &Path,
        local_group: Option<String>,
        events: Option<EventLog>,
    ) -> Result<LocalServer, LocalError> {
        if let Some(parent) = path.parent()
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|source| LocalError::CreateDir {
                    path: parent.to_owned(),
                    source,
                })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(LocalError::AlreadyRunning {
                        path: path.to_owned(),
                    });
                }
                Err(_) => {
                    std::fs::remove_file(path).map_err(|source| LocalError::Bind {
                        path: path.to_owned(),
                        source,
                    })?;
                }
            },
            Ok(_) => {
                return Err(LocalError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Err(_) => {}
        }
        let bind_err = |source| LocalError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(LocalServer {
            listener,
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            local_group,
            events,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until the listener fails, each on its own thread (at most
    /// [`MAX_CONNECTIONS`] at once).
    pub fn serve(&self, handler: Arc<dyn ControlHandler>) -> Result<(), LocalError> {
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LocalError::Io(e)),
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                let _ = write_line(
                    &stream,
                    &Response::error(
                        ErrorCode::Busy,
                        format!("the daemon serves {MAX_CONNECTIONS} local connections already; try again"),
                    )
                    .to_line(),
                );
                continue;
            }
            let handler = Arc::clone(&handler);
            let active = Arc::clone(&active);
            let group = self.local_group.clone();
            let events = self.events.clone();
            let spawned = std::thread::Builder::new()
                .name("vmgated-local".into())
                .spawn(move || {
                    serve_connection(&stream, group.as_deref(), events.as_ref(), &*handler);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                // The closure (and its stream) is dropped: the client sees the connection close.
                eprintln!("vmgated: cannot start a thread for a local connection");
            }
        }
    }
}

impl LocalServer {
    /// Removes the socket file if it is still this server's (not a successor's). Connections
    /// already open are not affected.
    pub fn remove_socket(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// Ends a refused connection gently: no more output, then what the client already sent (its
/// first request, typically) is read and dropped for up to a second, so that its write does not
/// fail with "broken pipe" before it reads the refusal. Bounded in bytes and time.
fn linger(stream: &UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let mut sink = [0u8; 8192];
    let mut total = 0usize;
    let mut reader = stream;
    while total <= MAX_REQUEST {
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

fn serve_connection(
    stream: &UnixStream,
    local_group: Option<&str>,
    events: Option<&EventLog>,
    handler: &dyn ControlHandler,
) {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let creds = match getsockopt(stream, PeerCredentials) {
        Ok(c) => c,
        Err(e) => {
            let _ = write_line(
                stream,
                &Response::error(
                    ErrorCode::AccessDenied,
                    format!("cannot read the peer's credentials: {e}"),
                )
                .to_line(),
            );
            return;
        }
    };
    let peer = match admit(creds.uid(), creds.gid(), creds.pid(), local_group) {
        Ok(p) => p,
        Err(reason) => {
            if let Some(log) = events {
                log.emit(Event::ControlRefused {
                    uid: creds.uid(),
                    pid: creds.pid(),
                    reason: reason.clone(),
                });
            }
            let _ = write_line(
                stream,
                &Response::error(ErrorCode::AccessDenied, format!("access denied: {reason}"))
                    .to_line(),
            );
            linger(stream);
            return;
        }
    };
    serve_requests(stream, &Caller::Local(peer), handler);
}

/// Answers requests on one connection until the peer closes it: JSON lines in, zero or more
/// progress lines and one final line out per request. Every line is bounded
/// ([`MAX_REQUEST`]) before it is allocated. The local socket and the gateway's control
/// channels both serve through this.
pub fn serve_requests<S: Read + Write>(stream: S, caller: &Caller, handler: &dyn ControlHandler) {
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader, MAX_REQUEST) {
            Ok(Line::Text(t)) => Zeroizing::new(t),
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::TooLong) => {
                let _ = write_line(
                    reader.get_mut(),
                    &Response::error(
                        ErrorCode::RequestTooLarge,
                        format!("a request is at most {MAX_REQUEST} bytes; closing the connection"),
                    )
                    .to_line(),
                );
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let mut replies = Replies::new(reader.get_mut());
                handler.handle(caller, request, &mut replies)
            }
            Err(e) => Response::error(ErrorCode::BadRequest, format!("not a valid request: {e}")),
        };
        if write_line(reader.get_mut(), &response.to_line()).is_err() {
            return;
        }
    }
}

/// A client of the control protocol: over the local socket (the CLI on this host, tests) or
/// over an authenticated gateway channel (the CLI on a workstation).
#[derive(Debug)]
pub struct ControlClient<S: Read + Write> {
    reader: BufReader<S>,
}

/// A client of the local control socket.
pub type LocalClient = ControlClient<UnixStream>;

impl ControlClient<UnixStream> {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<LocalClient, LocalError> {
        let stream = UnixStream::connect(path).map_err(|source| LocalError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(ControlClient::over(stream))
    }
}

impl<S: Read + Write> ControlClient<S> {
    /// A client over an established stream.
    pub fn over(stream: S) -> ControlClient<S> {
        ControlClient {
            reader: BufReader::new(stream),
        }
    }

    /// Sends a request and returns the final answer; `on_progress` sees each progress line.
    pub fn call_with(
        &mut self,
        request: &Request,
        mut on_progress: impl FnMut(&Response),
    ) -> Result<Response, LocalError> {
        let line = Zeroizing::new(serde_json::to_string(request).map_err(LocalError::Encode)?);
        if let Err(e) = write_line(self.reader.get_mut(), &line) {
            // A refused peer may find the connection closed before its request is written:
            // the daemon's one-line refusal is still there to read.
            return match self.read_response() {
                Ok(response @ Response::Error(_)) => Ok(response),
                _ => Err(LocalError::Io(e)),
            };
        }
        loop {
            let response = self.read_response()?;
            if response.is_final() {
                return Ok(response);
            }
            on_progress(&response);
        }
    }

    /// Sends a request and returns the final answer (progress lines are skipped).
    pub fn call(&mut self, request: &Request) -> Result<Response, LocalError> {
        self.call_with(request, |_| {})
    }

    /// Reads one response line (for a refused connection: the error the daemon sends first).
    pub fn read_response(&mut self) -> Result<Response, LocalError> {
        match read_line(&mut self.reader, MAX_RESPONSE).map_err(LocalError::Io)? {
            Line::Text(t) => serde_json::from_slice(&t).map_err(LocalError::BadResponse),
            Line::Eof => Err(LocalError::Closed),
            Line::TooLong => Err(LocalError::ResponseTooLarge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Request::Version).unwrap(),
            r#"{"request":"version"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"host_show"}"#).unwrap(),
            Request::HostShow
        );
        let blob = Request::Move(MoveSpec {
            vm: "web".into(),
            to: vec!["127.0.0.12:6600".into()],
            destination: "hv2.lab.example.test".into(),
            ccache: Some(CcacheBlob::new(b"\x05\x04secret-ticket".to_vec())),
            switch_map: Vec::new(),
            storage_path: None,
            disks: Vec::new(),
            keep_source: false,
        });
        let line = serde_json::to_string(&blob).unwrap();
        assert_eq!(
            line,
            r#"{"request":"move","vm":"web","to":["127.0.0.12:6600"],"destination":"hv2.lab.example.test","ccache":"BQRzZWNyZXQtdGlja2V0"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), blob);
        // Never printed.
        let dbg = format!("{blob:?}");
        assert!(dbg.contains("ccache: Some((secret, 15 bytes))"), "{dbg}");
        assert!(!dbg.contains("secret-ticket"), "{dbg}");
        // Bad base64 is refused without echoing the text.
        let e = serde_json::from_str::<Request>(
            r#"{"request":"move","vm":"a","to":[],"destination":"b","ccache":"c2VjcmV0!!!"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not valid base64"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
        // Too large before decoding.
        let big = format!(
            r#"{{"request":"move","vm":"a","to":[],"destination":"b","ccache":"{}"}}"#,
            "A".repeat(MAX_CCACHE / 3 * 4 + 8)
        );
        let e = serde_json::from_str::<Request>(&big)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
        // Unknown requests and fields are errors.
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        // A storage-only move: a folder, or (current file, new file) pairs.
        let storage = Request::MoveStorage(StorageMoveSpec {
            vm: "web".into(),
            storage_path: None,
            disks: vec![("/vms/a/web.qcow2".into(), "/vms/b/web.qcow2".into())],
            keep_source: true,
            bandwidth: None,
        });
        let line = serde_json::to_string(&storage).unwrap();
        assert_eq!(
            line,
            r#"{"request":"move_storage","vm":"web","disks":[["/vms/a/web.qcow2","/vms/b/web.qcow2"]],"keep_source":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), storage);
        assert!(
            serde_json::from_str::<Request>(
                r#"{"request":"move_storage","vm":"web","storage_path":"/vms/b","to":["x"]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn every_answer_with_data_reads_back_as_sent() {
        use crate::host::jobs::{Direction, JobInfo, JobKind, JobState};
        let job = JobInfo {
            id: "j1".into(),
            kind: JobKind::Live,
            direction: Direction::Outgoing,
            vm: "web".into(),
            peer: "hv2".into(),
            user: "alice@LAB.EXAMPLE.TEST".into(),
            state: JobState::Completed,
            position: None,
            progress: Some(serde_json::json!({"phase": "handoff"})),
            submitted: 1,
            waited_ms: 0,
            ended: Some(2),
            outcome: Some("web runs on hv2".into()),
        };
        let answers = [
            Response::Job(Box::new(job.clone())),
            Response::Jobs { jobs: vec![job] },
            Response::Checked(VmCheckReport {
                vm: "web".into(),
                passed: true,
                details: vec!["ok".into()],
            }),
            Response::Console {
                text: "hello".into(),
                next_offset: 5,
            },
            Response::Compared {
                vm: "web".into(),
                destination: "hv2".into(),
                report: vec![Incompatibility {
                    id: 1005,
                    message: "no switch".into(),
                }],
            },
            Response::StorageMoved(Box::new(StorageMoveSummary {
                job: "j2".into(),
                vm: "web".into(),
                user: "root (uid 0) on this host".into(),
                total_ms: 120,
                paused_us: 850,
                bytes_copied: 4 << 20,
                disks: vec![MovedDisk {
                    disk: 0,
                    source: "/vms/a/web.qcow2".into(),
                    destination: "/vms/b/web.qcow2".into(),
                    layers: vec![("/vms/b/web.qcow2".into(), "mirror".into())],
                    bytes_copied: 4 << 20,
                    rounds: 1,
                    paused_us: 850,
                    old_files: vec![OldFile {
                        path: "/vms/a/web.qcow2".into(),
                        deleted: false,
                        kept_because: Some("the source files were to be kept".into()),
                    }],
                }],
            })),
            Response::Moved(Box::new(MoveSummary {
                job: "j1".into(),
                vm: "web".into(),
                destination: "hv2".into(),
                address: "127.0.0.12:6600".into(),
                user: "alice@LAB.EXAMPLE.TEST".into(),
                method: "own-ticket".into(),
                stats: serde_json::json!({"total_ms": 12.5}),
            })),
            Response::Vm(Box::new(VmDetail {
                summary: VmSummary {
                    name: "web".into(),
                    state: "running".into(),
                    memory_mib: 128,
                    vcpus: 1,
                    origin: "created here".into(),
                },
                cpu_compat: false,
                cpu_features: vec!["avx2 (CPUID 0x7 ebx bit 5)".into()],
                nics: vec![NicInfo {
                    mac: "52:54:00:00:00:01".into(),
                    switch: "Lab".into(),
                }],
                disks: vec!["/vms/web.raw".into()],
                disk_stats: vec![DiskStats {
                    reads: 1,
                    writes: 2,
                    flushes: 0,
                    errors: 0,
                    bytes_read: 4096,
                    bytes_written: 8192,
                    write_p50_ns: 3000,
                    write_p99_ns: 9000,
                    write_max_ns: 12000,
                    window_ms: 1500,
                }],
                console: None,
            })),
        ];
        for a in answers {
            let line = a.to_line();
            let back: Response =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, a, "{line}");
        }
    }

    #[test]
    fn responses_on_the_wire() {
        let v = Response::Version(VersionInfo {
            daemon: "0.1.0".into(),
            protocol: 1,
            min_protocol: 1,
        });
        assert_eq!(
            v.to_line(),
            r#"{"result":"version","daemon":"0.1.0","protocol":1,"min_protocol":1}"#
        );
        let e = Response::error(ErrorCode::AccessDenied, "no");
        assert_eq!(
            e.to_line(),
            r#"{"result":"error","code":"access_denied","message":"no"}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&e.to_line()).unwrap(), e);
        let p = Response::Progress {
            progress: serde_json::json!({"phase": "setup"}),
        };
        assert!(!p.is_final());
        assert_eq!(serde_json::from_str::<Response>(&p.to_line()).unwrap(), p);
    }

    #[test]
    fn lines_are_bounded() {
        let mut r = std::io::Cursor::new(b"abc\ndef".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(t) if t == b"abc"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(t) if t == b"def"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Eof));
        // Exactly the limit is fine; one more byte is not.
        let mut r = std::io::Cursor::new(b"0123456789\n".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(t) if t.len() == 10));
        let mut r = std::io::Cursor::new(b"0123456789A\n".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::TooLong));
    }

    #[test]
    fn root_is_admitted_and_unknown_uids_are_not() {
        let p = admit(0, 0, 1, None).unwrap();
        assert_eq!(p.admission, Admission::Root);
        let e = admit(4_000_000_000, 4_000_000_000, 1, None).unwrap_err();
        assert_eq!(
            e,
            "uid 4000000000 is not root, and no local_group is configured: only root may use this socket"
        );
        let e = admit(4_000_000_000, 4_000_000_000, 1, Some("root")).unwrap_err();
        assert_eq!(
            e,
            "uid 4000000000 has no user entry, so its membership of \"root\" cannot be checked"
        );
        let e = admit(65534, 65534, 1, Some("no-such-group-vmgate")).unwrap_err();
        assert!(e.contains("\"no-such-group-vmgate\" does not exist"), "{e}");
    }
}
