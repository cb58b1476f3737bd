//! The VM resource: list, show, check, console.

use serde::{Deserialize, Serialize};

/// Where a VM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmState {
    /// Its vCPUs run.
    Running,
    /// Paused (by `vm pause`, or left paused by a move in doubt).
    Paused,
    /// Turned off; its definition stays.
    Off,
    /// A move (live or of its storage) has it.
    Moving,
}

impl VmState {
    /// The name as on the wire (`running`).
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Off => "off",
            VmState::Moving => "moving",
        }
    }
}

/// Which engine runs a VM (each backend has its own lifecycle and its own move).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Backend {
    /// vmgated's own KVM micro-VM.
    #[default]
    Microvm,
    /// A QEMU process per VM.
    Qemu,
}

impl Backend {
    /// The name as on the wire (`microvm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Microvm => "microvm",
            Backend::Qemu => "qemu",
        }
    }
}

/// One VM in a `vm_list` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// The VM's name.
    pub name: String,
    /// Running, paused, off or moving.
    pub state: VmState,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// How it came here (`moved here by <user> from <host>`).
    pub origin: String,
    /// The engine that runs it.
    #[serde(default)]
    pub backend: Backend,
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
    /// Write latency on the host (doorbell to completion), ns: median.
    pub write_p50_ns: u64,
    /// Write latency, 99th percentile, ns.
    pub write_p99_ns: u64,
    /// Write latency, the longest, ns.
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
