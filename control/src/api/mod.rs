//! The control API: what the CLI asks the daemon (over the local socket or a gateway control
//! channel) and what it answers.
//!
//! One action enum, [`Request`], tagged `request` on the wire; one answer enum, [`Response`],
//! tagged `result`. The types of each resource live in their module: [`host`], [`vm`],
//! [`moves`], [`storage`], [`jobs`]. An answer is zero or more [`Response::Progress`] lines and
//! one final line.
//!
//! ```text
//! → {"request":"version"}
//! ← {"result":"version","daemon":"0.1.0","protocol":1,"min_protocol":1}
//! → {"request":"move","vm":"web","to":["127.0.0.12:6600"],"destination":"hv2.lab.example.test"}
//! ← {"result":"progress","progress":{"job":"j1","phase":"setup",...}}
//! ← {"result":"moved","job":"j1","vm":"web",...}
//! ```
//!
//! A failure ([`ErrorReply`]) says why for scripts ([`ErrorCode`]), for people (`message`), and
//! as types: the Windows diagnosis of an authentication failure ([`WireDiagnosis`]) and, for a
//! move, what kind of failure it was ([`moves::MoveFailureKind`]), from which the CLI derives
//! its advice.

pub mod credential;
pub mod host;
pub mod jobs;
pub mod moves;
pub mod storage;
pub mod vm;

use serde::{Deserialize, Serialize};
use vmgate_auth::winerr::{Diagnosis, WinCode};

pub use credential::CcacheBlob;
use host::{HostChanges, HostInfo, VersionInfo};
use jobs::{JobInfo, JobProgress};
use moves::{Incompatibility, MoveFailureKind, MoveSpec, MoveSummary};
use storage::{StorageMoveSpec, StorageMoveSummary};
use vm::{VmCheckReport, VmDetail, VmSummary};

/// The most console bytes one `vm_console` answer carries.
pub const MAX_CONSOLE_CHUNK: usize = 256 * 1024;

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
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer may not use the socket.
    AccessDenied,
    /// The request line is longer than [`crate::framing::MAX_REQUEST`].
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
    /// Authentication or authorization failed (the diagnosis has the Windows code, cause and
    /// fix).
    Denied,
    /// A host could not be reached.
    Unreachable,
    /// The destination cannot take the VM (or refuses moves): the message lists why.
    Refused,
    /// The move was cancelled; the VM runs here.
    Cancelled,
}

/// A Windows diagnosis on the wire: the code (`0x8009030E`), its name and text, the cause in
/// this deployment's terms and the fix. The same fields as [`Diagnosis`] serialises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDiagnosis {
    /// The code in hex (`0x8009030E`).
    pub code: String,
    /// Its symbolic name (`SEC_E_NO_CREDENTIALS`).
    pub name: String,
    /// Windows' text for it.
    pub text: String,
    /// What happened here.
    pub cause: String,
    /// The command (or commands, one a line) that fixes it.
    #[serde(default)]
    pub fix: Option<String>,
}

impl From<&Diagnosis> for WireDiagnosis {
    fn from(d: &Diagnosis) -> WireDiagnosis {
        WireDiagnosis {
            code: d.code.hex(),
            name: d.code.name().to_owned(),
            text: d.code.text().to_owned(),
            cause: d.cause.clone(),
            fix: d.fix.clone(),
        }
    }
}

impl WireDiagnosis {
    /// The diagnosis, when its code is one this build knows.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        let hex = self.code.strip_prefix("0x").unwrap_or(&self.code);
        let code = u32::from_str_radix(hex, 16)
            .ok()
            .and_then(WinCode::from_hresult)?;
        Some(Diagnosis {
            code,
            cause: self.cause.clone(),
            fix: self.fix.clone(),
        })
    }
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
    /// The whole diagnosis behind `win_code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<WireDiagnosis>,
    /// For a failed move: what kind of failure (the CLI's advice follows from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_failure: Option<MoveFailureKind>,
}

impl ErrorReply {
    /// An error without a diagnosis.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
            win_code: None,
            diagnosis: None,
            move_failure: None,
        }
    }

    /// An authentication or authorization failure: the diagnosis' text, code and fields.
    pub fn denied(diagnosis: &Diagnosis) -> ErrorReply {
        ErrorReply {
            code: ErrorCode::Denied,
            message: diagnosis.to_string(),
            win_code: Some(diagnosis.code.hex()),
            diagnosis: Some(WireDiagnosis::from(diagnosis)),
            move_failure: None,
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `version`.
    Version(VersionInfo),
    /// Answer to `host_show` and `host_set`.
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
        jobs: Vec<JobInfo>,
    },
    /// Answer to `job_show` and `job_cancel`.
    Job(Box<JobInfo>),
    /// The request was carried out (no data to return).
    Done {
        /// What was done, for people.
        message: String,
    },
    /// An intermediate line (a move's progress); more lines follow.
    Progress {
        /// Where the job is.
        progress: JobProgress,
    },
    /// The request failed.
    Error(ErrorReply),
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(code, message))
    }

    /// An authentication or authorization failure with its Windows code.
    pub fn denied(diagnosis: &Diagnosis) -> Response {
        Response::Error(ErrorReply::denied(diagnosis))
    }

    /// Whether this is the last line of an answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, Response::Progress { .. })
    }

    /// The JSON line (without the line break).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"result\":\"error\",\"code\":\"failed\",\"message\":\"cannot encode the answer: {}\"}}",
                e.to_string().replace(['"', '\\'], "'")
            )
        })
    }
}

#[cfg(test)]
mod tests;
