//! QEMU processes that outlive the daemon: how they are started, found again and watched,
//! and how the reason they ended is known.
//!
//! **Lifetime.** QEMU is started as a child in its own session and process group (`setsid`
//! before `exec`), so no signal to the daemon's process group or terminal reaches it, and
//! nothing ties it to the daemon (no parent-death signal, no shared pipe: its output goes to
//! its log file). When the daemon exits, QEMU is re-parented to init (or the nearest
//! subreaper) and keeps running. Under systemd it is also moved, right after it started, into
//! a transient scope `vmgate-qemu-NAME-PID.scope` in `machine.slice` (systemd's
//! `StartTransientUnit`, called with `busctl`, as libvirt does through machined): the daemon's
//! service can then be stopped or restarted without systemd killing the guests, whatever its
//! `KillMode`.
//!
//! **Runtime folder** (`<run_dir>/<vm>/`, mode 0700): `qmp.sock` (the only monitor),
//! `agent.sock` (the guest agent channel), `qemu.pid` (written and locked by QEMU itself for
//! its whole life), `qemu.log` (QEMU's stderr: errors, `terminating on signal N from pid P`,
//! and a trace line with the reason of every shutdown request), `console.log` (the serial
//! console unless the definition names a file), `exit.json` (why it ended, written by the
//! backend when it saw it end).
//!
//! **Finding it again.** QEMU holds a POSIX lock on its pidfile while it runs; `F_GETLK`
//! names the holder. A pidfile without a holder means that QEMU is gone, whatever PID the
//! file contains, so a reused PID is never mistaken for it. The holder's command line must
//! also name this VM's QMP socket. The process is then watched through a pidfd.
//!
//! **Why it ended**, from the best source available: the `SHUTDOWN` event (guest power-off,
//! `quit`, a signal QEMU handled), the exit status when the backend is its parent (killed by
//! SIGKILL, a crash), else the trace line or signal message in its log. Every orderly end
//! leaves one of those, so an end without any is a SIGKILL or a crash. The reason is kept in
//! `exit.json` for the next attach.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::fcntl::{FcntlArg, fcntl};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::host::{QemuHost, ScopeMode};

/// QMP socket name.
pub const QMP_SOCKET: &str = "qmp.sock";
/// Agent socket name.
pub const AGENT_SOCKET: &str = "agent.sock";
/// Pidfile name.
pub const PIDFILE: &str = "qemu.pid";
/// QEMU's log.
pub const QEMU_LOG: &str = "qemu.log";
/// The default console log.
pub const CONSOLE_LOG: &str = "console.log";
/// The exit record.
pub const EXIT_RECORD: &str = "exit.json";
/// Held while a start is in progress.
pub const START_LOCK: &str = "start.lock";

/// How much of QEMU's log is read for a reason.
const LOG_TAIL: u64 = 16 * 1024;

/// The runtime files of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimePaths {
    /// The folder.
    pub dir: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Agent socket.
    pub agent: PathBuf,
    /// Pidfile.
    pub pidfile: PathBuf,
    /// QEMU's log.
    pub qemu_log: PathBuf,
    /// Console log (when the definition names none).
    pub console_log: PathBuf,
    /// Exit record.
    pub exit_record: PathBuf,
    /// Start lock.
    pub start_lock: PathBuf,
}

impl RuntimePaths {
    /// The files inside `dir`.
    pub fn new(dir: PathBuf) -> RuntimePaths {
        RuntimePaths {
            qmp: dir.join(QMP_SOCKET),
            agent: dir.join(AGENT_SOCKET),
            pidfile: dir.join(PIDFILE),
            qemu_log: dir.join(QEMU_LOG),
            console_log: dir.join(CONSOLE_LOG),
            exit_record: dir.join(EXIT_RECORD),
            start_lock: dir.join(START_LOCK),
            dir,
        }
    }

    /// Creates the folder (0700).
    pub(crate) fn create(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }
}

/// Why a QEMU is not running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReason {
    /// What happened.
    pub kind: ExitKind,
    /// The QEMU process.
    pub pid: u32,
    /// Supporting text (the relevant line of QEMU's log), if any.
    pub detail: Option<String>,
}

/// What ended a QEMU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitKind {
    /// The guest powered itself off (or answered an ACPI shutdown).
    GuestShutdown,
    /// The guest panicked and QEMU was told to stop on a panic.
    GuestPanic,
    /// Powered off from the host (QMP `quit`).
    PoweredOff,
    /// QEMU terminated on a signal it handles (SIGTERM, SIGINT, SIGHUP).
    Terminated,
    /// QEMU was killed by a signal (SIGKILL, or a crash such as SIGSEGV or SIGABRT).
    Killed {
        /// The signal.
        signal: i32,
    },
    /// QEMU exited by itself with this status (an error: see the detail).
    Exited {
        /// The exit status.
        code: i32,
    },
    /// It ended without any shutdown (no SHUTDOWN event, no shutdown trace or signal message
    /// in its log, which every orderly end leaves) and no exit status is known: killed with
    /// SIGKILL, or crashed, while the backend was not its parent.
    Vanished,
    /// It ended and nothing tells why (its log cannot be read).
    Unknown,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ExitKind::GuestShutdown => write!(f, "the guest shut down")?,
            ExitKind::GuestPanic => write!(f, "the guest panicked")?,
            ExitKind::PoweredOff => write!(f, "powered off by vmgate")?,
            ExitKind::Terminated => {
                write!(f, "QEMU (pid {}) was terminated by a signal", self.pid)?
            }
            ExitKind::Killed { signal } => write!(
                f,
                "QEMU (pid {}) was killed by signal {signal} ({})",
                self.pid,
                signal_name(*signal)
            )?,
            ExitKind::Exited { code } => {
                write!(f, "QEMU (pid {}) exited with status {code}", self.pid)?
            }
            ExitKind::Vanished => write!(
                f,
                "QEMU (pid {}) ended without a shutdown (it was killed with SIGKILL or crashed)",
                self.pid
            )?,
            ExitKind::Unknown => write!(
                f,
                "QEMU (pid {}) ended for an unknown reason (its log cannot be read)",
                self.pid
            )?,
        }
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl ExitReason {
    /// What happened, in a few words (no pid, no detail).
    pub fn summary(&self) -> String {
        match &self.kind {
            ExitKind::GuestShutdown => "the guest shut down".into(),
            ExitKind::GuestPanic => "the guest panicked".into(),
            ExitKind::PoweredOff => "powered off".into(),
            ExitKind::Terminated => "terminated by a signal".into(),
            ExitKind::Killed { signal } => {
                format!("killed by signal {signal} ({})", signal_name(*signal))
            }
            ExitKind::Exited { code } => format!("exited with status {code}"),
            ExitKind::Vanished => "ended without a shutdown".into(),
            ExitKind::Unknown => "ended".into(),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV: QEMU crashed",
        libc::SIGABRT => "SIGABRT: QEMU aborted",
        libc::SIGBUS => "SIGBUS: QEMU crashed",
        libc::SIGILL => "SIGILL: QEMU crashed",
        _ => "signal",
    }
}

/// What is known when a QEMU ended.
#[derive(Debug, Default)]
pub(crate) struct ExitFacts {
    /// The `reason` of the last SHUTDOWN event seen.
    pub shutdown_event: Option<String>,
    /// Its wait status, when we were its parent.
    pub status: Option<ExitStatus>,
}

/// Decides why QEMU `pid` ended, from the facts and its log.
pub(crate) fn classify(pid: u32, facts: &ExitFacts, log: &Path) -> ExitReason {
    let tail = read_tail(log);
    let log_readable = tail.is_ok();
    let tail = tail.unwrap_or_default();
    let lines: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
    let signal_line = lines
        .iter()
        .rev()
        .find(|l| l.contains("terminating on signal"))
        .map(|l| strip_log_prefix(l));
    let trace_reason = lines.iter().rev().find_map(|l| {
        l.split_once("qemu_system_shutdown_request reason=")
            .and_then(|(_, n)| n.trim().parse::<u32>().ok())
    });
    // QEMU's last own message that is not a trace line: an error it printed before exiting.
    let last_message = lines
        .iter()
        .rev()
        .find(|l| !l.contains("qemu_system_shutdown_request"))
        .map(|l| strip_log_prefix(l));
    let reason = |kind, detail: Option<String>| ExitReason { kind, pid, detail };

    // ShutdownCause, in the schema's order.
    let from_cause = |cause: &str| match cause {
        "guest-shutdown" => Some(reason(ExitKind::GuestShutdown, None)),
        "guest-panic" => Some(reason(ExitKind::GuestPanic, None)),
        "host-qmp-quit" => Some(reason(ExitKind::PoweredOff, None)),
        "host-signal" => Some(reason(ExitKind::Terminated, signal_line.clone())),
        "host-error" => Some(reason(ExitKind::Exited { code: 1 }, last_message.clone())),
        _ => None,
    };
    if let Some(r) = facts.shutdown_event.as_deref().and_then(from_cause) {
        return r;
    }
    if let Some(status) = facts.status {
        if let Some(signal) = status.signal() {
            return reason(ExitKind::Killed { signal }, None);
        }
    }
    if let Some(r) = trace_reason.and_then(cause_name).and_then(from_cause) {
        return r;
    }
    if signal_line.is_some() {
        return reason(ExitKind::Terminated, signal_line);
    }
    match facts.status.and_then(|s| s.code()) {
        Some(code) => reason(ExitKind::Exited { code }, last_message),
        None if log_readable => reason(ExitKind::Vanished, last_message),
        None => reason(ExitKind::Unknown, None),
    }
}

/// The name of a ShutdownCause by its number (the trace line prints the number).
fn cause_name(n: u32) -> Option<&'static str> {
    [
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    ]
    .get(usize::try_from(n).ok()?)
    .copied()
}

/// A log line without QEMU's `-msg timestamp=on` prefix.
fn strip_log_prefix(line: &str) -> String {
    let l = line.trim();
    // "2026-12-07T03:25:53.105794Z qemu-system-x86_64: terminating on signal 15 ..."
    let l = match l.split_once(' ') {
        Some((ts, rest)) if ts.ends_with('Z') && ts.contains('T') => rest,
        _ => l,
    };
    l.chars().take(300).collect()
}

fn read_tail(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
    let mut buf = Vec::new();
    f.take(LOG_TAIL).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last lines of QEMU's log, for error messages.
pub(crate) fn log_excerpt(path: &Path, lines: usize) -> String {
    let tail = read_tail(path).unwrap_or_default();
    let all: Vec<String> = tail
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("qemu_system_shutdown_request"))
        .map(strip_log_prefix)
        .collect();
    all[all.len().saturating_sub(lines)..].join(" / ")
}

/// Writes the exit record (atomically).
pub(crate) fn write_exit_record(paths: &RuntimePaths, reason: &ExitReason) {
    let tmp = paths.exit_record.with_extension("json.tmp");
    let text = serde_json::to_vec(reason).unwrap_or_default();
    let written = fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, &paths.exit_record));
    if let Err(e) = written {
        tracing::warn!(path = %paths.exit_record.display(), error = %e, "cannot record why QEMU ended");
    }
}

/// Reads the exit record, if any.
pub(crate) fn read_exit_record(paths: &RuntimePaths) -> Option<ExitReason> {
    let text = fs::read(&paths.exit_record).ok()?;
    if text.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&text).ok()
}

/// The PID holding the pidfile's lock: the QEMU that wrote it, while it runs.
pub(crate) fn pidfile_holder(path: &Path) -> io::Result<Option<u32>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let short = |v: libc::c_int| {
        libc::c_short::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let mut fl = libc::flock {
        l_type: short(libc::F_WRLCK)?,
        l_whence: short(libc::SEEK_SET)?,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&f, FcntlArg::F_GETLK(&mut fl)).map_err(io::Error::from)?;
    if fl.l_type == short(libc::F_UNLCK)? {
        return Ok(None);
    }
    Ok(u32::try_from(fl.l_pid).ok().filter(|p| *p > 0))
}

/// True when process `pid`'s command line names `qmp` (this VM's QMP socket).
pub(crate) fn is_vm_process(pid: u32, qmp: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = qmp.to_string_lossy().replace(',', ",,");
    cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(needle.as_str()))
}

/// Moves the previous run's log aside and opens a fresh one for QEMU's stdout and stderr.
pub(crate) fn fresh_log(paths: &RuntimePaths) -> io::Result<File> {
    match fs::rename(&paths.qemu_log, paths.qemu_log.with_extension("log.1")) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.qemu_log)
}

/// Starts QEMU in its own session with `args`; `inherit` are descriptors it gets under the
/// same numbers (its taps). Its stdout and stderr go to `log`.
pub(crate) fn spawn(
    binary: &Path,
    args: &[String],
    inherit: &[RawFd],
    log: File,
) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    let inherit = inherit.to_vec();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called. It calls setsid() and fcntl(F_SETFD), both
    // async-signal-safe, and only reads `inherit`, a Vec allocated before the fork (no
    // allocation, no lock). The descriptors are ours and open (the taps), so clearing their
    // close-on-exec flag only makes QEMU inherit them.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Moves process `pid` into a transient scope unit in `slice` (under systemd).
pub(crate) async fn move_to_scope(name: &str, pid: u32, slice: &str) -> Result<String, String> {
    let unit = format!("vmgate-qemu-{name}-{pid}.scope");
    let args = scope_args(&unit, pid, slice);
    let out = tokio::process::Command::new("busctl")
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run busctl: {e}"))?;
    if out.status.success() {
        Ok(unit)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// busctl's arguments for StartTransientUnit(name, "fail", [PIDs, Slice, Description,
/// CollectMode], []).
pub(crate) fn scope_args(unit: &str, pid: u32, slice: &str) -> Vec<String> {
    [
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "fail",
        "4",
        "PIDs",
        "au",
        "1",
        &pid.to_string(),
        "Slice",
        "s",
        slice,
        "Description",
        "s",
        "vmgate QEMU virtual machine",
        "CollectMode",
        "s",
        "inactive-or-failed",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A pidfd: readable once the process has ended.
#[derive(Debug)]
pub(crate) struct PidFd(AsyncFd<OwnedFd>);

impl PidFd {
    /// Opens a pidfd for `pid`.
    pub(crate) fn open(pid: u32) -> io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: pidfd_open takes a PID and flags, no pointers; it returns a new descriptor
        // or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is an OwnedFd, open, moved into the AsyncFd, which owns it until it is
        // dropped; OwnedFd::as_raw_fd always returns that same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(PidFd(fd))
    }

    /// Completes when the process has ended.
    pub(crate) async fn exited(&self) {
        // A pidfd becomes readable (and stays so) when the process ends; an error from the
        // reactor means we cannot watch any more: treat that as "check now".
        let _ = self.0.readable().await;
    }

    /// Sends SIGKILL (through the pidfd: never to a process that reused the PID).
    pub(crate) fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes our open pidfd, a signal number, a null siginfo and
        // zero flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Already gone.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// How the end of a QEMU is awaited.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// We started it: its exit status will be known.
    Child(tokio::process::Child),
    /// We attached to it.
    Attached,
}

impl Waiter {
    /// Waits for the end; the exit status when it was our child.
    pub(crate) async fn wait(&mut self, pidfd: &PidFd) -> Option<ExitStatus> {
        match self {
            Waiter::Child(child) => match child.wait().await {
                Ok(status) => Some(status),
                Err(_) => {
                    pidfd.exited().await;
                    None
                }
            },
            Waiter::Attached => {
                pidfd.exited().await;
                None
            }
        }
    }
}

/// Picks the systemd slice when the host puts QEMUs into scopes.
pub(crate) fn scope_slice(host: &QemuHost) -> Option<&str> {
    match host.scope() {
        ScopeMode::Systemd { slice } => Some(slice),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.log");
        fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn the_shutdown_event_decides_first() {
        let (_d, log) = log_with("");
        let facts = ExitFacts {
            shutdown_event: Some("guest-shutdown".into()),
            status: Some(ExitStatus::from_raw(0)),
        };
        let r = classify(7, &facts, &log);
        assert_eq!(r.kind, ExitKind::GuestShutdown);
        assert_eq!(r.to_string(), "the guest shut down");
        let facts = ExitFacts {
            shutdown_event: Some("host-qmp-quit".into()),
            status: None,
        };
        assert_eq!(classify(7, &facts, &log).kind, ExitKind::PoweredOff);
    }

    #[test]
    fn a_kill_is_named_with_its_signal() {
        let (_d, log) = log_with("");
        let facts = ExitFacts {
            shutdown_event: None,
            status: Some(ExitStatus::from_raw(libc::SIGKILL)),
        };
        let r = classify(42, &facts, &log);
        assert_eq!(r.kind, ExitKind::Killed { signal: 9 });
        assert_eq!(
            r.to_string(),
            "QEMU (pid 42) was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn unwatched_ends_are_read_from_the_log() {
        let (_d, log) = log_with(
            "2026-12-07T03:25:52.000000Z qemu-system-x86_64: warning: something\n21727@1796613952.079597:qemu_system_shutdown_request reason=6\n",
        );
        assert_eq!(
            classify(1, &ExitFacts::default(), &log).kind,
            ExitKind::GuestShutdown
        );
        let (_d, log) = log_with(
            "2026-12-07T03:25:53.105794Z qemu-system-x86_64: terminating on signal 15 from pid 21815 (bash)\n",
        );
        let r = classify(1, &ExitFacts::default(), &log);
        assert_eq!(r.kind, ExitKind::Terminated);
        assert_eq!(
            r.detail.as_deref(),
            Some("qemu-system-x86_64: terminating on signal 15 from pid 21815 (bash)")
        );
        let (_d, log) = log_with("");
        let r = classify(5, &ExitFacts::default(), &log);
        assert_eq!(r.kind, ExitKind::Vanished);
        assert!(
            r.to_string().contains("killed with SIGKILL or crashed"),
            "{r}"
        );
        let r = classify(5, &ExitFacts::default(), Path::new("/nonexistent/qemu.log"));
        assert_eq!(r.kind, ExitKind::Unknown);
    }

    #[test]
    fn an_error_exit_carries_qemus_last_message() {
        let (_d, log) = log_with(
            "2026-12-07T03:25:53.1Z qemu-system-x86_64: -blockdev {...}: Failed to get \"write\" lock\nIs another process using the image [/r/d.qcow2]?\n",
        );
        let facts = ExitFacts {
            shutdown_event: None,
            status: Some(ExitStatus::from_raw(1 << 8)),
        };
        let r = classify(3, &facts, &log);
        assert_eq!(r.kind, ExitKind::Exited { code: 1 });
        assert!(
            r.to_string().contains("Is another process using the image"),
            "{r}"
        );
        assert!(log_excerpt(&log, 2).contains("Failed to get \"write\" lock"));
    }

    #[test]
    fn exit_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RuntimePaths::new(dir.path().to_path_buf());
        assert!(read_exit_record(&paths).is_none());
        let r = ExitReason {
            kind: ExitKind::Killed { signal: 9 },
            pid: 12,
            detail: None,
        };
        write_exit_record(&paths, &r);
        assert_eq!(read_exit_record(&paths), Some(r));
    }

    #[test]
    fn a_pidfile_without_a_lock_has_no_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.pid");
        assert_eq!(pidfile_holder(&p).unwrap(), None);
        fs::write(&p, "1\n").unwrap();
        assert_eq!(pidfile_holder(&p).unwrap(), None);
    }

    #[test]
    fn the_scope_call_names_the_pid_and_slice() {
        let a = scope_args("vmgate-qemu-linux-77.scope", 77, "machine.slice");
        let s = a.join(" ");
        assert!(s.contains("StartTransientUnit ssa(sv)a(sa(sv)) vmgate-qemu-linux-77.scope fail 4 PIDs au 1 77 Slice s machine.slice"), "{s}");
        assert!(s.ends_with("CollectMode s inactive-or-failed 0"), "{s}");
    }
}
