//! The agent protocol between the host and the guest program, on a virtio-serial port named
//! [`PORT_NAME`] (QEMU: a `virtserialport` whose chardev is a UNIX socket the host connects
//! to, as for qemu-guest-agent).
//!
//! One JSON object per line in each direction. The host sends a [`Request`] with an id; the
//! guest answers with a [`Response`] carrying the same id. A line longer than [`MAX_LINE`]
//! is an error on both sides. The port keeps what was written while nobody listened, so the
//! host starts each connection with an empty line (which ends any partial request) and skips
//! answers whose id it did not ask for.

use serde::{Deserialize, Serialize};

/// The name of the virtio-serial port (`/sys/class/virtio-ports/*/name` in the guest).
pub const PORT_NAME: &str = "org.vmgate.agent.0";

/// The longest line either side accepts, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// The marker the guest program prints on the serial console once everything runs:
/// `vmgate-guest: ready boot_id=<id>`.
pub const READY_MARKER: &str = "vmgate-guest: ready";

/// A request from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub op: Op,
}

/// What the host asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The guest's identity and progress ([`GuestStatus`]).
    Status,
    /// Run the guest's checks now ([`CheckReport`]).
    Check,
}

/// The guest's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The answer.
    pub result: Answer,
}

/// The body of an answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// For [`Op::Status`].
    Status(GuestStatus),
    /// For [`Op::Check`].
    Check(CheckReport),
    /// The request could not be read or served.
    Error(String),
}

/// What the guest reports about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): new at every boot, kept
    /// across a live move.
    pub boot_id: String,
    /// Time since the guest kernel booted (`CLOCK_BOOTTIME`), in milliseconds.
    pub uptime_ms: u64,
    /// The guest program's version.
    pub program_version: String,
    /// The memory writer.
    pub memory: MemoryStatus,
    /// The disk writer, when the guest has a disk to write.
    pub disk: Option<DiskStatus>,
    /// The echo service.
    pub echo: EchoStatus,
}

/// The memory writer's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Size of the buffer it rewrites, in MiB.
    pub size_mib: u64,
    /// Every word of every page (true) or two words per page (false).
    pub full_content: bool,
    /// Passes completed since boot.
    pub passes: u64,
    /// Pages found with an unexpected content so far.
    pub errors: u64,
}

/// The disk writer's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The block device.
    pub device: String,
    /// Blocks in the region it cycles over.
    pub blocks: u64,
    /// The last sequence number found on the disk at boot (0: none).
    pub boot_seq: u64,
    /// The last sequence number written and made durable.
    pub durable_seq: u64,
    /// Problems found by the checks so far (at boot and on request).
    pub errors: u64,
}

/// The echo service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoStatus {
    /// Its TCP port.
    pub port: u16,
    /// Connections accepted since boot.
    pub connections: u64,
}

/// The result of the guest's checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// One entry per check, in a fixed order (memory, then disk).
    pub checks: Vec<CheckResult>,
}

impl CheckReport {
    /// True when every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `memory` or `disk`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What was checked, or the first problems found.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip_as_single_lines() {
        let req = Request {
            id: 7,
            op: Op::Check,
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(line, r#"{"id":7,"op":"check"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);

        let resp = Response {
            id: 7,
            result: Answer::Check(CheckReport {
                checks: vec![CheckResult {
                    name: "memory".into(),
                    passed: true,
                    detail: "ok".into(),
                }],
            }),
        };
        let line = serde_json::to_string(&resp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), resp);
    }

    #[test]
    fn an_empty_report_has_not_passed() {
        assert!(!CheckReport { checks: vec![] }.passed());
        let failed = CheckReport {
            checks: vec![
                CheckResult {
                    name: "memory".into(),
                    passed: true,
                    detail: String::new(),
                },
                CheckResult {
                    name: "disk".into(),
                    passed: false,
                    detail: "block 3 holds sequence 2, expected 4".into(),
                },
            ],
        };
        assert!(!failed.passed());
    }

    #[test]
    fn unknown_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"op":"shell"}"#).is_err());
    }
}
