//! The job resource: every move (sent, received, or of a VM's storage) is a job with an id, a
//! state and its latest progress (`jobs list`, `jobs show`, `jobs cancel`).

use serde::{Deserialize, Serialize};

use super::moves::LiveProgress;
use super::storage::{StorageKind, StorageProgress};

/// What a job moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A live move of a VM (memory, vCPUs, devices).
    Live,
    /// A storage move.
    Storage,
}

/// Which end of the move this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The VM leaves this host.
    Outgoing,
    /// The VM arrives here.
    Incoming,
    /// The VM stays here; its storage moves (a storage-only move).
    Local,
}

impl Direction {
    /// The name as on the wire (`outgoing`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outgoing => "outgoing",
            Direction::Incoming => "incoming",
            Direction::Local => "local",
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a slot.
    Queued,
    /// Moving.
    Running,
    /// The VM runs on the destination (on its new files, for a storage-only move).
    Completed,
    /// Failed; the VM runs on the source (on its old files).
    Failed,
    /// Cancelled; the VM runs on the source (on its old files).
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn ended(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// The name as on the wire (`running`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// The phase of a queued job (`"phase": "queued"` on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuedPhase {
    /// Waiting for a slot.
    #[default]
    Queued,
}

/// A job waiting for a slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedProgress {
    /// The job.
    pub job: String,
    /// `storage` for a storage-only move; absent for a live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<StorageKind>,
    /// Always `queued`.
    pub phase: QueuedPhase,
    /// Its place in the queue (1 = next).
    pub position: usize,
    /// Moves of its kind at once.
    pub limit: u32,
}

/// A job's latest progress report: queued, a live move's, or a storage move's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobProgress {
    /// Waiting for a slot.
    Queued(QueuedProgress),
    /// A storage-only move.
    Storage(StorageProgress),
    /// A live move.
    Live(LiveProgress),
}

/// A job as `jobs list` and `jobs show` report it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// `j7`.
    pub id: String,
    /// Live or storage.
    pub kind: JobKind,
    /// Outgoing, incoming, or local.
    pub direction: Direction,
    /// The VM (empty until an incoming move names it).
    pub vm: String,
    /// The other host (for a storage-only move, where the storage goes).
    pub peer: String,
    /// Who asked for it.
    pub user: String,
    /// Where it is.
    pub state: JobState,
    /// The place in the queue (1 = next), while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// The latest progress report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// When it was submitted (seconds since the Unix epoch).
    pub submitted: u64,
    /// How long it waited in the queue, ms.
    pub waited_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    /// How it ended, for people. (Not `result`: that is the control protocol's tag.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}
