//! The storage-move resource: a running VM's disks moved to new files on its host
//! (`move_storage`; Hyper-V's `Move-VMStorage`).

use serde::{Deserialize, Serialize};

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

/// What the move did with one layer of a disk at its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LayerAction {
    /// A read-only parent copied byte for byte.
    Copy,
    /// An identical read-only parent was there already.
    Reuse,
    /// The active layer, filled by the mirror.
    Mirror,
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
    /// Each layer at the destination (base first), with what was done with it.
    pub layers: Vec<(String, LayerAction)>,
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

/// Where a storage-only move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StoragePhase {
    /// Checksums, paths, reuse, space.
    Plan,
    /// Copying read-only parents.
    Parents,
    /// Bulk copy of the active layer.
    Bulk,
    /// Dirty rounds.
    Dirty,
    /// VM paused: last blocks and the switch.
    Switch,
    /// Old files released.
    Release,
}

impl StoragePhase {
    /// The name as on the wire (`bulk`).
    pub fn as_str(self) -> &'static str {
        match self {
            StoragePhase::Plan => "plan",
            StoragePhase::Parents => "parents",
            StoragePhase::Bulk => "bulk",
            StoragePhase::Dirty => "dirty",
            StoragePhase::Switch => "switch",
            StoragePhase::Release => "release",
        }
    }

    /// Whether the guest runs meanwhile (a bandwidth cap holds).
    pub fn guest_runs(self) -> bool {
        matches!(
            self,
            StoragePhase::Parents | StoragePhase::Bulk | StoragePhase::Dirty
        )
    }
}

/// Marks a progress report as a storage move's (`"kind": "storage"` on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// A storage-only move.
    #[default]
    Storage,
}

/// A storage-only move's progress report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageProgress {
    /// The job.
    pub job: String,
    /// Always `storage`.
    pub kind: StorageKind,
    /// The phase.
    pub phase: StoragePhase,
    /// The disk being moved (its index in the VM).
    pub disk: usize,
    /// Its place among the disks moved (1-based).
    pub disk_number: usize,
    /// How many disks move.
    pub disks: usize,
    /// The layer being copied (0 = base).
    pub layer: u32,
    /// Bytes written so far, all disks.
    pub bytes_copied: u64,
    /// Bytes expected, all disks (grows with dirty rounds).
    pub bytes_total: u64,
    /// Dirty rounds so far on this disk.
    pub round: u32,
    /// Blocks the guest wrote that are not copied yet.
    pub dirty_blocks: u64,
    /// Bytes per second since the move got its slot.
    pub rate_bytes_s: u64,
}
