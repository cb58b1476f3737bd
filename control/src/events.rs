//! Structured events with stable ids: what the daemon did and what went wrong, readable as text
//! (one line each, in the daemon's log: the journal or stderr) and as JSON (one object a line,
//! in `<state_dir>/events.jsonl`). The daemon writes them (`vmgate::events::EventLog`); tests and
//! tools read them back with [`read`].
//!
//! # Events
//!
//! The ids never change meaning; new events get new ids. 14050 is Hyper-V's own id for the same
//! condition (Hyper-V-VMMS, "failed to register service principal name"), so an administrator's
//! existing alerts keep working; the other ids are vmgate's.
//!
//! | id | name | level | when | fields |
//! |---|---|---|---|---|
//! | 10000 | `daemon.started` | info | the daemon serves its control socket | version, protocol, listen, control_socket |
//! | 10001 | `daemon.stopping` | info | the daemon stops | reason |
//! | 10010 | `control.refused` | warning | a local peer was refused on the control socket | uid, pid, reason |
//! | 10011 | `gateway.refused` | warning | the gateway refused a logon: a peer outside the allowed networks, a failed Kerberos logon (a ticket for another service, no or a wrong channel binding), or a principal not authorized for what it asked | peer, principal, code, code_name, cause |
//! | 14050 | `spn.not_registered` | error | a migration SPN is missing and the host could not register it | account, spn, reason, fix |
//! | 14051 | `spn.registered` | info | the host registered a missing migration SPN on its own account | account, spn |
//! | 14052 | `spn.ok` | info | both migration SPNs are registered on the host's account | account, spns |
//! | 14053 | `spn.unchecked` | warning | the SPNs could not be checked (directory unreachable, bind refused) | account, reason |
//! | 20400 | `migration.started` | info | a move starts (on either end) | job, vm, kind, source, destination, user |
//! | 20401 | `migration.phase` | info | a move enters a phase | job, vm, phase |
//! | 20402 | `migration.completed` | info | the destination runs the VM, the source released it | job, vm, total_ms, downtime_ms, bytes |
//! | 20403 | `migration.failed` | error | a move failed (the VM keeps running on the source) | job, vm, code, code_name, cause, fix |
//! | 20404 | `migration.queued` | warning | the concurrency limit is reached: the move waits | job, vm, kind, position, limit |
//! | 20405 | `migration.dequeued` | info | a queued move got its slot | job, vm, kind, waited_ms |
//! | 20406 | `migration.long_downtime` | warning | the switchover took longer than the downtime target | job, vm, downtime_ms, target_ms |
//!
//! # Formats
//!
//! Text: `2026-11-22T08:40:00.123Z hv2 error 14050 spn.not_registered: <message>` — one line,
//! control characters in values replaced by spaces.
//!
//! JSON: `{"time":"...","host":"hv2","id":14050,"level":"error","message":"...",
//! "event":"spn.not_registered","account":"HV2$","spn":"...","reason":"...","fix":"..."}`: the
//! common fields, then the event's own fields next to its name.
//!
//! Fields are typed (names, numbers, codes); no event carries credential material, and nothing
//! here accepts a [`vmgate_auth::Secret`].

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmgate_auth::Diagnosis;

/// The longest event line read back; longer lines are skipped.
pub const MAX_EVENT_LINE: usize = 64 * 1024;

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventsError {
    /// The log file cannot be opened.
    #[error("cannot open the event log {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log file cannot be read.
    #[error("cannot read the event log {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How serious an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Normal operation.
    Info,
    /// Something an administrator should look at; service continues.
    Warning,
    /// An operation failed.
    Error,
}

impl Level {
    /// `info`, `warning`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// Which limit a move counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveKind {
    /// A live move (memory and state; with or without its storage): `max_live_moves`.
    Live,
    /// A storage-only move: `max_storage_moves`.
    Storage,
}

impl MoveKind {
    /// `live`, `storage`.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Live => "live",
            MoveKind::Storage => "storage",
        }
    }
}

/// The phases of a move (DESIGN.md §4), in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Connect, authenticate, negotiate, compatibility check.
    Setup,
    /// Disk copy (shared-nothing moves).
    Storage,
    /// Memory pre-copy rounds.
    MemoryPrecopy,
    /// vCPUs paused; last pages and device state.
    Switchover,
    /// The destination resumes; the source releases.
    Handoff,
    /// Gratuitous ARP on the mapped switch.
    NetworkCleanup,
}

impl MovePhase {
    /// The phase's name as in JSON (`memory_precopy`).
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Setup => "setup",
            MovePhase::Storage => "storage",
            MovePhase::MemoryPrecopy => "memory_precopy",
            MovePhase::Switchover => "switchover",
            MovePhase::Handoff => "handoff",
            MovePhase::NetworkCleanup => "network_cleanup",
        }
    }
}

/// One event (see the module doc for ids and meanings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum Event {
    /// 10000: the daemon serves its control socket.
    #[serde(rename = "daemon.started")]
    DaemonStarted {
        /// The daemon's version.
        version: String,
        /// The migration protocol version it speaks.
        protocol: u16,
        /// The gateway's listen addresses.
        listen: Vec<String>,
        /// The control socket path.
        control_socket: String,
    },
    /// 10001: the daemon stops.
    #[serde(rename = "daemon.stopping")]
    DaemonStopping {
        /// Why (a signal, a fatal error).
        reason: String,
    },
    /// 10010: a local peer was refused on the control socket.
    #[serde(rename = "control.refused")]
    ControlRefused {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// 10011: the gateway refused a logon: a peer outside the allowed networks, Kerberos failed
    /// (a ticket for another service, no or wrong channel binding, ...), or the principal is
    /// not authorized for what it asked (a host asking for a control channel, a host not among
    /// the peer hosts, a foreign realm, a user outside the admin group, a move from outside the
    /// migration networks).
    #[serde(rename = "gateway.refused")]
    GatewayRefused {
        /// The peer's address (`127.0.0.21:40112`).
        peer: String,
        /// Who the peer is, when Kerberos authenticated it.
        principal: Option<String>,
        /// The Windows code (`0x80070005`).
        code: String,
        /// Its name (`E_ACCESSDENIED`).
        code_name: String,
        /// The cause, as sent to the peer.
        cause: String,
    },
    /// 14050: a migration SPN is missing and the host could not register it.
    #[serde(rename = "spn.not_registered")]
    SpnNotRegistered {
        /// The computer account (`HV2$`).
        account: String,
        /// The missing SPN.
        spn: String,
        /// Why it could not be registered.
        reason: String,
        /// The command that fixes it.
        fix: String,
    },
    /// 14051: the host registered a missing SPN itself.
    #[serde(rename = "spn.registered")]
    SpnRegistered {
        /// The computer account.
        account: String,
        /// The SPN registered.
        spn: String,
    },
    /// 14052: both migration SPNs are in place.
    #[serde(rename = "spn.ok")]
    SpnOk {
        /// The computer account.
        account: String,
        /// The SPNs checked.
        spns: Vec<String>,
    },
    /// 14053: the SPNs could not be checked.
    #[serde(rename = "spn.unchecked")]
    SpnUnchecked {
        /// The computer account.
        account: String,
        /// Why.
        reason: String,
    },
    /// 20400: a move starts.
    #[serde(rename = "migration.started")]
    MigrationStarted {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// Live or storage.
        kind: MoveKind,
        /// The source host.
        source: String,
        /// The destination host.
        destination: String,
        /// The user the move runs as (`alice@LAB.EXAMPLE.TEST`).
        user: String,
    },
    /// 20401: a move enters a phase.
    #[serde(rename = "migration.phase")]
    MigrationPhase {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// The phase entered.
        phase: MovePhase,
    },
    /// 20402: a move completed.
    #[serde(rename = "migration.completed")]
    MigrationCompleted {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// Total time, ms.
        total_ms: u64,
        /// Downtime (source paused → destination resumed), ms.
        downtime_ms: u64,
        /// Bytes sent.
        bytes: u64,
    },
    /// 20403: a move failed.
    #[serde(rename = "migration.failed")]
    MigrationFailed {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// The Windows code (`0x8009030E`).
        code: String,
        /// Its name (`SEC_E_NO_CREDENTIALS`).
        code_name: String,
        /// The cause in this deployment's terms.
        cause: String,
        /// The fix, when there is one.
        fix: Option<String>,
    },
    /// 20404: the concurrency limit is reached; the move waits.
    #[serde(rename = "migration.queued")]
    MigrationQueued {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// Which limit.
        kind: MoveKind,
        /// Position in the queue (1 = next).
        position: u32,
        /// The limit.
        limit: u32,
    },
    /// 20405: a queued move got its slot.
    #[serde(rename = "migration.dequeued")]
    MigrationDequeued {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// Which limit.
        kind: MoveKind,
        /// Time spent waiting, ms.
        waited_ms: u64,
    },
    /// 20406: the switchover took longer than the target.
    #[serde(rename = "migration.long_downtime")]
    LongDowntime {
        /// The job id.
        job: String,
        /// The VM's name.
        vm: String,
        /// The downtime, ms.
        downtime_ms: u64,
        /// The target, ms.
        target_ms: u64,
    },
}

impl Event {
    /// The stable id.
    pub fn id(&self) -> u32 {
        match self {
            Event::DaemonStarted { .. } => 10000,
            Event::DaemonStopping { .. } => 10001,
            Event::ControlRefused { .. } => 10010,
            Event::GatewayRefused { .. } => 10011,
            Event::SpnNotRegistered { .. } => 14050,
            Event::SpnRegistered { .. } => 14051,
            Event::SpnOk { .. } => 14052,
            Event::SpnUnchecked { .. } => 14053,
            Event::MigrationStarted { .. } => 20400,
            Event::MigrationPhase { .. } => 20401,
            Event::MigrationCompleted { .. } => 20402,
            Event::MigrationFailed { .. } => 20403,
            Event::MigrationQueued { .. } => 20404,
            Event::MigrationDequeued { .. } => 20405,
            Event::LongDowntime { .. } => 20406,
        }
    }

    /// The stable name (`spn.not_registered`).
    pub fn name(&self) -> &'static str {
        match self {
            Event::DaemonStarted { .. } => "daemon.started",
            Event::DaemonStopping { .. } => "daemon.stopping",
            Event::ControlRefused { .. } => "control.refused",
            Event::GatewayRefused { .. } => "gateway.refused",
            Event::SpnNotRegistered { .. } => "spn.not_registered",
            Event::SpnRegistered { .. } => "spn.registered",
            Event::SpnOk { .. } => "spn.ok",
            Event::SpnUnchecked { .. } => "spn.unchecked",
            Event::MigrationStarted { .. } => "migration.started",
            Event::MigrationPhase { .. } => "migration.phase",
            Event::MigrationCompleted { .. } => "migration.completed",
            Event::MigrationFailed { .. } => "migration.failed",
            Event::MigrationQueued { .. } => "migration.queued",
            Event::MigrationDequeued { .. } => "migration.dequeued",
            Event::LongDowntime { .. } => "migration.long_downtime",
        }
    }

    /// The level.
    pub fn level(&self) -> Level {
        match self {
            Event::SpnNotRegistered { .. } | Event::MigrationFailed { .. } => Level::Error,
            Event::ControlRefused { .. }
            | Event::GatewayRefused { .. }
            | Event::SpnUnchecked { .. }
            | Event::MigrationQueued { .. }
            | Event::LongDowntime { .. } => Level::Warning,
            Event::DaemonStarted { .. }
            | Event::DaemonStopping { .. }
            | Event::SpnRegistered { .. }
            | Event::SpnOk { .. }
            | Event::MigrationStarted { .. }
            | Event::MigrationPhase { .. }
            | Event::MigrationCompleted { .. }
            | Event::MigrationDequeued { .. } => Level::Info,
        }
    }

    /// A failed move from its diagnosis.
    pub fn migration_failed(job: &str, vm: &str, diagnosis: &Diagnosis) -> Event {
        Event::MigrationFailed {
            job: job.to_owned(),
            vm: vm.to_owned(),
            code: diagnosis.code.hex(),
            code_name: diagnosis.code.name().to_owned(),
            cause: diagnosis.cause.clone(),
            fix: diagnosis.fix.clone(),
        }
    }

    /// The human sentence (may contain line breaks in values; [`EventRecord::text`] flattens).
    pub fn message(&self) -> String {
        match self {
            Event::DaemonStarted {
                version,
                protocol,
                listen,
                control_socket,
            } => format!(
                "vmgated {version} started (protocol {protocol}); control socket {control_socket}; \
                 gateway configured on {}",
                listen.join(", ")
            ),
            Event::DaemonStopping { reason } => format!("vmgated is stopping: {reason}"),
            Event::ControlRefused { uid, pid, reason } => {
                format!("refused a local client (uid {uid}, pid {pid}): {reason}")
            }
            Event::GatewayRefused {
                peer,
                principal,
                code,
                code_name,
                cause,
            } => {
                let who = principal
                    .as_ref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default();
                format!("refused a logon from {peer}{who} with {code} ({code_name}): {cause}")
            }
            Event::SpnNotRegistered {
                account,
                spn,
                reason,
                fix,
            } => format!(
                "failed to register service principal name \"{spn}\" on {account}: {reason}; \
                 moves to this host fail with 0x80090303 until it is registered; fix: {fix}"
            ),
            Event::SpnRegistered { account, spn } => {
                format!("registered service principal name \"{spn}\" on {account}")
            }
            Event::SpnOk { account, spns } => format!(
                "service principal names registered on {account}: {}",
                spns.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Event::SpnUnchecked { account, reason } => format!(
                "could not check the service principal names of {account}: {reason}; \
                 the check runs again at the next start"
            ),
            Event::MigrationStarted {
                job,
                vm,
                kind,
                source,
                destination,
                user,
            } => format!(
                "{} move of {vm} from {source} to {destination} started as {user} (job {job})",
                kind.as_str()
            ),
            Event::MigrationPhase { job, vm, phase } => {
                format!("move of {vm} entered phase {} (job {job})", phase.as_str())
            }
            Event::MigrationCompleted {
                job,
                vm,
                total_ms,
                downtime_ms,
                bytes,
            } => format!(
                "move of {vm} completed in {total_ms} ms, downtime {downtime_ms} ms, \
                 {bytes} bytes sent (job {job})"
            ),
            Event::MigrationFailed {
                job,
                vm,
                code,
                code_name,
                cause,
                fix,
            } => {
                let mut m = format!("move of {vm} failed with {code} ({code_name}): {cause}");
                if let Some(fix) = fix {
                    m.push_str("; fix: ");
                    m.push_str(fix);
                }
                m.push_str(&format!(" (job {job})"));
                m
            }
            Event::MigrationQueued {
                job,
                vm,
                kind,
                position,
                limit,
            } => format!(
                "{} move of {vm} queued at position {position}: the limit of {limit} \
                 simultaneous {} moves is reached (job {job})",
                kind.as_str(),
                kind.as_str()
            ),
            Event::MigrationDequeued {
                job,
                vm,
                kind,
                waited_ms,
            } => format!(
                "{} move of {vm} leaves the queue after {waited_ms} ms (job {job})",
                kind.as_str()
            ),
            Event::LongDowntime {
                job,
                vm,
                downtime_ms,
                target_ms,
            } => format!(
                "move of {vm} paused the VM for {downtime_ms} ms, more than the target of \
                 {target_ms} ms (job {job})"
            ),
        }
    }
}

/// An event as logged: when, where, and the event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// UTC time, RFC 3339 with milliseconds (`2026-11-22T08:40:00.123Z`).
    pub time: String,
    /// The host's short name.
    pub host: String,
    /// The stable id.
    pub id: u32,
    /// The level.
    pub level: Level,
    /// The human sentence.
    pub message: String,
    /// The event and its fields.
    #[serde(flatten)]
    pub event: Event,
}

/// Control characters (line breaks included) become spaces: one event, one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl EventRecord {
    /// A record of `event` at `time` on `host`.
    pub fn new(time: SystemTime, host: &str, event: Event) -> EventRecord {
        EventRecord {
            time: rfc3339(time),
            host: host.to_owned(),
            id: event.id(),
            level: event.level(),
            message: event.message(),
            event,
        }
    }

    /// The text line (no line break at the end).
    pub fn text(&self) -> String {
        one_line(&format!(
            "{} {} {} {} {}: {}",
            self.time,
            self.host,
            self.level.as_str(),
            self.id,
            self.event.name(),
            self.message
        ))
    }

    /// The JSON object on one line (no line break at the end).
    pub fn json(&self) -> String {
        // Serialising these plain types cannot fail; a failure would be our bug, and an event
        // must never take the daemon down.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"id\":{},\"serialize_error\":\"{e}\"}}", self.id))
    }
}

impl fmt::Display for EventRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to a calendar starting on 0000-03-01, so that leap days end each 4-year cycle.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// `2026-11-22T08:40:00.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Reads the last `limit` records of a log file. Lines that are too long or do not parse
/// (a torn write after a crash, a newer daemon's unknown event) are skipped and counted.
pub fn read(path: &Path, limit: usize) -> Result<(Vec<EventRecord>, usize), EventsError> {
    let err = |source| EventsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let mut reader = BufReader::new(file);
    let mut out: VecDeque<EventRecord> = VecDeque::new();
    let mut skipped = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        let max = u64::try_from(MAX_EVENT_LINE + 1).unwrap_or(u64::MAX);
        let n = (&mut reader)
            .take(max)
            .read_until(b'\n', &mut line)
            .map_err(err)?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_EVENT_LINE && line.last() != Some(&b'\n') {
            // Skip the rest of the long line.
            skipped += 1;
            loop {
                line.clear();
                let n = (&mut reader)
                    .take(max)
                    .read_until(b'\n', &mut line)
                    .map_err(err)?;
                if n == 0 || line.last() == Some(&b'\n') {
                    break;
                }
            }
            continue;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<EventRecord>(text) {
            Ok(r) => {
                if limit > 0 && out.len() == limit {
                    out.pop_front();
                }
                if limit > 0 {
                    out.push_back(r);
                }
            }
            Err(_) => skipped += 1,
        }
    }
    Ok((out.into(), skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmgate_auth::WinCode;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    fn spn_event() -> Event {
        Event::SpnNotRegistered {
            account: "HV2$".into(),
            spn: "Microsoft Virtual System Migration Service/hv2.lab.example.test".into(),
            reason: "the directory refused the change: insufficient access rights".into(),
            fix:
                "setspn -S \"Microsoft Virtual System Migration Service/hv2.lab.example.test\" HV2$"
                    .into(),
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century year divisible by 400).
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_795_336_800, 123)), "2026-11-22T08:40:00.123Z");
        assert_eq!(rfc3339(at(4_107_542_399, 999)), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn event_14050_renders_as_text_and_json() {
        let r = EventRecord::new(at(1_795_336_800, 123), "hv2", spn_event());
        assert_eq!(
            r.text(),
            "2026-11-22T08:40:00.123Z hv2 error 14050 spn.not_registered: failed to register \
             service principal name \"Microsoft Virtual System Migration Service/hv2.lab.example.test\" \
             on HV2$: the directory refused the change: insufficient access rights; moves to this \
             host fail with 0x80090303 until it is registered; fix: setspn -S \"Microsoft Virtual \
             System Migration Service/hv2.lab.example.test\" HV2$"
        );
        let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(json["id"], 14050);
        assert_eq!(json["event"], "spn.not_registered");
        assert_eq!(json["level"], "error");
        assert_eq!(json["host"], "hv2");
        assert_eq!(json["time"], "2026-11-22T08:40:00.123Z");
        assert_eq!(json["account"], "HV2$");
        assert_eq!(
            json["fix"],
            "setspn -S \"Microsoft Virtual System Migration Service/hv2.lab.example.test\" HV2$"
        );
        assert!(!r.json().contains('\n'));
    }

    #[test]
    fn every_event_has_a_distinct_stable_id_and_one_line() {
        let events = vec![
            Event::DaemonStarted {
                version: "0.1.0".into(),
                protocol: 1,
                listen: vec!["127.0.0.11:6600".into()],
                control_socket: "/run/vmgate/vmgated.sock".into(),
            },
            Event::DaemonStopping {
                reason: "SIGTERM".into(),
            },
            Event::ControlRefused {
                uid: 65534,
                pid: 42,
                reason: "not root and not in group vmgate".into(),
            },
            Event::GatewayRefused {
                peer: "127.0.0.21:40112".into(),
                principal: Some("carol@LAB.EXAMPLE.TEST".into()),
                code: "0x80070005".into(),
                code_name: "E_ACCESSDENIED".into(),
                cause: "carol is not a member of \"Hyper-V Administrators\"".into(),
            },
            spn_event(),
            Event::SpnRegistered {
                account: "HV1$".into(),
                spn: "x/hv1".into(),
            },
            Event::SpnOk {
                account: "HV1$".into(),
                spns: vec!["x/hv1".into(), "x/hv1.lab".into()],
            },
            Event::SpnUnchecked {
                account: "HV1$".into(),
                reason: "line one\nline two".into(),
            },
            Event::MigrationStarted {
                job: "j1".into(),
                vm: "vm1".into(),
                kind: MoveKind::Live,
                source: "hv1".into(),
                destination: "hv2".into(),
                user: "alice@LAB.EXAMPLE.TEST".into(),
            },
            Event::MigrationPhase {
                job: "j1".into(),
                vm: "vm1".into(),
                phase: MovePhase::MemoryPrecopy,
            },
            Event::MigrationCompleted {
                job: "j1".into(),
                vm: "vm1".into(),
                total_ms: 1200,
                downtime_ms: 31,
                bytes: 1 << 30,
            },
            Event::migration_failed(
                "j2",
                "vm2",
                &Diagnosis::new(WinCode::NoCredentials, "hv3 may not delegate alice")
                    .with_fix("vmgate delegation add-service hv3 \"x/hv2\""),
            ),
            Event::MigrationQueued {
                job: "j3".into(),
                vm: "vm3".into(),
                kind: MoveKind::Live,
                position: 1,
                limit: 2,
            },
            Event::MigrationDequeued {
                job: "j3".into(),
                vm: "vm3".into(),
                kind: MoveKind::Live,
                waited_ms: 800,
            },
            Event::LongDowntime {
                job: "j1".into(),
                vm: "vm1".into(),
                downtime_ms: 400,
                target_ms: 50,
            },
        ];
        let ids: std::collections::BTreeSet<u32> = events.iter().map(Event::id).collect();
        assert_eq!(ids.len(), events.len());
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            [
                10000, 10001, 10010, 10011, 14050, 14051, 14052, 14053, 20400, 20401, 20402, 20403,
                20404, 20405, 20406
            ]
        );
        for e in events {
            let r = EventRecord::new(at(1, 0), "hv1", e.clone());
            assert!(!r.text().contains('\n'), "{}", r.text());
            let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
            assert_eq!(json["event"], e.name());
            assert_eq!(json["id"], e.id());
            let back: EventRecord = serde_json::from_str(&r.json()).unwrap();
            assert_eq!(back, r);
        }
        let failed = EventRecord::new(
            at(1, 0),
            "hv3",
            Event::migration_failed(
                "j2",
                "vm2",
                &Diagnosis::new(WinCode::NoCredentials, "hv3 may not delegate alice"),
            ),
        );
        assert!(
            failed
                .text()
                .ends_with("error 20403 migration.failed: move of vm2 failed with 0x8009030E (SEC_E_NO_CREDENTIALS): hv3 may not delegate alice (job j2)"),
            "{}",
            failed.text()
        );
    }
}
