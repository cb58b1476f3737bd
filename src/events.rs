//! The daemon's event log: every event (catalogue and ids in [`vmgate_control::events`]) goes
//! through one path, [`EventLog::emit`], which appends its JSON record to
//! `<state_dir>/events.jsonl` and logs its text line through `tracing` at the event's level (the
//! journal under systemd, stderr otherwise). The file is capped: past [`MAX_LOG_BYTES`] it is
//! renamed to `events.jsonl.1` (replacing the previous one) and a new file is started.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

pub use vmgate_control::events::*;

/// The size past which the log file is rotated.
pub const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    host: String,
    file: Mutex<(File, u64)>,
    max_bytes: u64,
    log: bool,
}

/// The event log. Cheap to clone; safe to share between threads.
#[derive(Clone, Debug)]
pub struct EventLog {
    inner: Arc<Inner>,
}

fn open_file(path: &Path) -> Result<(File, u64), EventsError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| EventsError::Open {
            path: path.to_owned(),
            source,
        })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, len))
}

impl EventLog {
    /// Opens (creating, mode 0600) the log file in append mode; `host` is written into every
    /// record. Each event is also logged through `tracing`.
    pub fn open(path: &Path, host: &str) -> Result<EventLog, EventsError> {
        EventLog::open_with(path, host, MAX_LOG_BYTES, true)
    }

    /// The same log without the `tracing` record (tests, tools).
    pub fn quiet(path: &Path, host: &str) -> Result<EventLog, EventsError> {
        EventLog::open_with(path, host, MAX_LOG_BYTES, false)
    }

    fn open_with(
        path: &Path,
        host: &str,
        max_bytes: u64,
        log: bool,
    ) -> Result<EventLog, EventsError> {
        Ok(EventLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                host: host.to_owned(),
                file: Mutex::new(open_file(path)?),
                max_bytes,
                log,
            }),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The file the log rotates into.
    pub fn rotated_path(&self) -> PathBuf {
        let mut p = self.inner.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Records an event now; returns the record. Failing to write the file is logged and does
    /// not stop the caller (an event must never take the daemon down).
    pub fn emit(&self, event: Event) -> EventRecord {
        let record = EventRecord::new(SystemTime::now(), &self.inner.host, event);
        let mut line = record.json();
        line.push('\n');
        if let Err(e) = self.append(line.as_bytes()) {
            tracing::error!(
                log = %self.inner.path.display(),
                error = %vmgate_control::error::chain(&e),
                "cannot write to the event log"
            );
        }
        if self.inner.log {
            log_record(&record);
        }
        record
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut guard = self
            .inner
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if guard.1 > 0 && guard.1.saturating_add(len) > self.inner.max_bytes {
            std::fs::rename(&self.inner.path, self.rotated_path())?;
            *guard = open_file(&self.inner.path).map_err(|e| match e {
                EventsError::Open { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            })?;
        }
        // One write of the whole line on an O_APPEND file: lines from several threads never
        // interleave.
        guard.0.write_all(line)?;
        guard.1 = guard.1.saturating_add(len);
        Ok(())
    }
}

/// The record's text line, at the event's level, with its id and name as fields.
fn log_record(r: &EventRecord) {
    let text = r.text();
    match r.level {
        Level::Error => {
            tracing::error!(target: "vmgate::events", id = r.id, event = r.event.name(), "{text}");
        }
        Level::Warning => {
            tracing::warn!(target: "vmgate::events", id = r.id, event = r.event.name(), "{text}");
        }
        Level::Info => {
            tracing::info!(target: "vmgate::events", id = r.id, event = r.event.name(), "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn the_log_is_capped_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open_with(&path, "hv2", 4096, false).unwrap();
        for _ in 0..40 {
            log.emit(spn_event());
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= 4096, "{size}");
        let rotated = std::fs::metadata(log.rotated_path()).unwrap().len();
        assert!(rotated > 0 && rotated <= 4096, "{rotated}");
        // Both files hold whole records.
        let (now, skipped) = read(&path, 1000).unwrap();
        let (before, skipped_before) = read(&log.rotated_path(), 1000).unwrap();
        assert_eq!((skipped, skipped_before), (0, 0));
        assert!(!now.is_empty() && !before.is_empty());
        assert!(now.len() + before.len() <= 40);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn the_log_appends_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::quiet(&path, "hv2").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let first = log.emit(spn_event());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        log.emit(Event::MigrationPhase {
                            job: format!("j{t}-{i}"),
                            vm: "vm".into(),
                            phase: MovePhase::Setup,
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A torn line, an over-long line and a blank line are skipped, not fatal.
        {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"{\"time\":\"2026-\n").unwrap();
            f.write_all(&vec![b'x'; MAX_EVENT_LINE + 10]).unwrap();
            f.write_all(b"\n\n").unwrap();
        }
        log.emit(Event::DaemonStopping {
            reason: "test".into(),
        });
        let (all, skipped) = read(&path, 1000).unwrap();
        assert_eq!(all.len(), 102);
        assert_eq!(skipped, 2);
        assert_eq!(all[0], first);
        assert_eq!(all[0].id, 14050);
        assert_eq!(all[101].event.name(), "daemon.stopping");
        let (last, _) = read(&path, 3).unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(last[2], all[101]);
        assert_eq!(last[0], all[99]);
        // Reopening appends.
        drop(log);
        let log = EventLog::quiet(&path, "hv2").unwrap();
        log.emit(spn_event());
        assert_eq!(read(&path, 1000).unwrap().0.len(), 103);
    }
}
