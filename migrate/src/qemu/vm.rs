//! A running QEMU VM: the handle the daemon keeps ([`QemuVm`]), how it is started and found
//! again, and its lifecycle (pause, resume, ACPI shutdown with a fallback, power off), its
//! state, its events and its guest's agent.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use qapi::qmp::RunState;
use tokio::sync::{broadcast, watch};
use vmgate_guest::agent::{CheckReport, GuestStatus};

use super::agent::{AgentClient, AgentError};
use super::cmdline::{StartMode, command_line};
use super::definition::ValidatedVm;
use super::host::{QemuHost, QemuVersion};
use super::net::{self, NetError};
use super::process::{
    self, ExitFacts, ExitReason, PidFd, RuntimePaths, Waiter, classify, is_vm_process, log_excerpt,
    pidfile_holder,
};
use super::qmp::{Qmp, QmpError, QmpEvent};

/// How long QEMU may take to open its QMP socket after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a QMP command of the lifecycle may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to exit after `quit` before it is killed.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QEMU backend's lifecycle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// The VM's QEMU already runs.
    #[error("VM {name} is already running (QEMU pid {pid})")]
    AlreadyRunning {
        /// The VM.
        name: String,
        /// Its QEMU.
        pid: u32,
    },
    /// Another start of the VM is in progress.
    #[error("VM {name} is being started by another request")]
    StartInProgress {
        /// The VM.
        name: String,
    },
    /// The runtime folder or its files cannot be used.
    #[error("cannot use the VM's runtime file {}", .path.display())]
    Runtime {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A NIC's tap cannot be made.
    #[error("cannot connect the VM's NIC to its virtual switch")]
    Nic(#[from] NetError),
    /// QEMU cannot be started.
    #[error("cannot start QEMU ({})", .binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU could not be put into its own systemd scope (it was stopped again).
    #[error(
        "cannot move QEMU into a systemd scope in {slice} (busctl: {message}); it was stopped, because without its own scope it would die with vmgated"
    )]
    Scope {
        /// The slice.
        slice: String,
        /// busctl's message.
        message: String,
    },
    /// QEMU ended while it was being started.
    #[error("QEMU did not start ({}): {log}", .reason.summary())]
    StartFailed {
        /// Why it ended.
        reason: ExitReason,
        /// The last lines of its log.
        log: String,
    },
    /// QEMU ran but its QMP socket never answered (it was stopped again).
    #[error("QEMU started but its QMP socket did not answer within {} s; it was stopped (its log: {log})", START_TIMEOUT.as_secs())]
    NoQmp {
        /// The last lines of its log.
        log: String,
    },
    /// The pidfile is held by a process that is not this VM's QEMU.
    #[error("the pidfile {} is held by process {pid}, which is not VM {name}'s QEMU; not touching it", .pidfile.display())]
    ForeignProcess {
        /// The VM.
        name: String,
        /// The pidfile.
        pidfile: PathBuf,
        /// The process.
        pid: u32,
    },
    /// The VM is not running.
    #[error("VM {name} is off: {reason}")]
    NotRunning {
        /// The VM.
        name: String,
        /// Why.
        reason: ExitReason,
    },
    /// A QMP command failed.
    #[error("QEMU failed the request")]
    Qmp(#[from] QmpError),
    /// Stopping QEMU failed.
    #[error("cannot stop QEMU (pid {pid})")]
    Kill {
        /// QEMU.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What a VM is doing, as QEMU reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmState {
    /// The guest runs.
    Running,
    /// Paused (by request, or not started yet with [`StartMode::Paused`]).
    Paused,
    /// Waiting for an incoming migration.
    Incoming,
    /// Its state was migrated away; the guest runs elsewhere.
    Migrated,
    /// Stopped by an error (I/O error, internal error, guest panic): QEMU's run state.
    Stopped(String),
    /// Another transitional run state of QEMU (shutting down, finishing a migration...).
    Other(String),
    /// QEMU is not running.
    Off(ExitReason),
}

/// How [`QemuVm::shutdown`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest shut down within the time given.
    ShutDown(ExitReason),
    /// The guest did not, and QEMU was powered off.
    PoweredOff(ExitReason),
}

/// What [`QemuVm::attach`] found.
#[derive(Debug)]
pub enum Attached {
    /// QEMU runs; here is its handle.
    Running(QemuVm),
    /// QEMU is not running: why it ended, if it ever ran here.
    Off(Option<ExitReason>),
}

struct Inner {
    name: String,
    paths: RuntimePaths,
    pid: u32,
    qmp: Qmp,
    agent: Option<AgentClient>,
    exit: watch::Receiver<Option<ExitReason>>,
    monitor: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // QEMU keeps running: only our watching stops.
        self.monitor.abort();
    }
}

/// A handle on a running QEMU VM (cheap to clone). Dropping every clone leaves QEMU running;
/// [`QemuVm::attach`] finds it again.
#[derive(Clone)]
pub struct QemuVm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("name", &self.inner.name)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

fn runtime(path: &Path) -> impl FnOnce(io::Error) -> QemuError + '_ {
    move |source| QemuError::Runtime {
        path: path.to_path_buf(),
        source,
    }
}

fn remove_if_there(path: &Path) -> Result<(), QemuError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(runtime(path)(e)),
    }
}

/// Where a VM's serial console is written.
pub fn console_log(host: &QemuHost, vm: &ValidatedVm) -> PathBuf {
    vm.serial_log()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| RuntimePaths::new(host.vm_run_dir(vm.name())).console_log)
}

impl QemuVm {
    /// Starts a VM: creates its taps, starts QEMU in its own session (and scope), connects to
    /// QMP, and (with [`StartMode::Run`]) lets the guest run. On any failure nothing of this
    /// start keeps running.
    pub async fn start(
        host: &QemuHost,
        vm: &ValidatedVm,
        mode: StartMode,
    ) -> Result<QemuVm, QemuError> {
        let name = vm.name().to_string();
        let paths = RuntimePaths::new(host.vm_run_dir(&name));
        paths.create().map_err(runtime(&paths.dir))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&paths.start_lock)
            .map_err(runtime(&paths.start_lock))?;
        let _starting =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    QemuError::StartInProgress { name: name.clone() }
                } else {
                    runtime(&paths.start_lock)(errno.into())
                }
            })?;
        if let Some(pid) = pidfile_holder(&paths.pidfile).map_err(runtime(&paths.pidfile))? {
            return Err(QemuError::AlreadyRunning { name, pid });
        }
        for stale in [&paths.qmp, &paths.agent, &paths.exit_record, &paths.pidfile] {
            remove_if_there(stale)?;
        }

        let switches: Vec<_> = vm.nics().iter().map(|n| n.switch.clone()).collect();
        let taps = tokio::task::spawn_blocking(move || {
            switches
                .iter()
                .map(net::open_tap)
                .collect::<Result<Vec<_>, NetError>>()
        })
        .await
        .map_err(|e| {
            runtime(&paths.dir)(io::Error::other(format!("creating the taps failed: {e}")))
        })??;
        let fds: Vec<RawFd> = taps.iter().map(|t| t.fd.as_raw_fd()).collect();
        let args = command_line(vm, &paths, &fds, mode);
        let log = process::fresh_log(&paths).map_err(runtime(&paths.qemu_log))?;
        let child = process::spawn(host.qemu_binary(), &args, &fds, log).map_err(|source| {
            QemuError::Spawn {
                binary: host.qemu_binary().to_path_buf(),
                source,
            }
        })?;
        // QEMU has its own copies of the taps now.
        drop(taps);
        let mut child = child;
        let pid = child.id().unwrap_or(0);
        let pidfd = match PidFd::open(pid) {
            Ok(p) => p,
            Err(source) => {
                // Without a way to watch it, it must not run.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(QemuError::Spawn {
                    binary: host.qemu_binary().to_path_buf(),
                    source,
                });
            }
        };
        let mut waiter = Waiter::Child(child);
        tracing::info!(vm = %name, pid, ?mode, "QEMU started");

        if let Some(slice) = process::scope_slice(host) {
            if let Err(message) = process::move_to_scope(&name, pid, slice).await {
                let _ = pidfd.kill();
                waiter.wait(&pidfd).await;
                return Err(QemuError::Scope {
                    slice: slice.to_string(),
                    message,
                });
            }
        }

        let qmp = tokio::select! {
            status = waiter.wait(&pidfd) => {
                let facts = ExitFacts { shutdown_event: None, status };
                return Err(QemuError::StartFailed {
                    reason: classify(pid, &facts, &paths.qemu_log),
                    log: log_excerpt(&paths.qemu_log, 4),
                });
            }
            qmp = connect_when_ready(&paths.qmp) => qmp,
        };
        let Some(qmp) = qmp else {
            let _ = pidfd.kill();
            waiter.wait(&pidfd).await;
            return Err(QemuError::NoQmp {
                log: log_excerpt(&paths.qemu_log, 4),
            });
        };
        let handle = QemuVm::watch(name, paths, pid, qmp, pidfd, waiter, vm.definition().agent);
        if mode == StartMode::Run {
            if let Err(e) = handle.resume().await {
                let _ = handle.power_off().await;
                return Err(e);
            }
        }
        Ok(handle)
    }

    /// Finds a VM's QEMU again (after the daemon restarted, or a handle was dropped) through
    /// its pidfile and QMP socket.
    pub async fn attach(host: &QemuHost, name: &str) -> Result<Attached, QemuError> {
        let paths = RuntimePaths::new(host.vm_run_dir(name));
        let Some(pid) = pidfile_holder(&paths.pidfile).map_err(runtime(&paths.pidfile))? else {
            return Ok(Attached::Off(off_reason(&paths)));
        };
        if !is_vm_process(pid, &paths.qmp) {
            return Err(QemuError::ForeignProcess {
                name: name.to_string(),
                pidfile: paths.pidfile,
                pid,
            });
        }
        let pidfd = match PidFd::open(pid) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Ok(Attached::Off(off_reason(&paths)));
            }
            Err(e) => return Err(runtime(&paths.pidfile)(e)),
        };
        // The pidfd is for whoever had that PID when it was opened: check it is still QEMU.
        if pidfile_holder(&paths.pidfile).map_err(runtime(&paths.pidfile))? != Some(pid) {
            return Ok(Attached::Off(off_reason(&paths)));
        }
        let qmp = match Qmp::connect(&paths.qmp, COMMAND_TIMEOUT).await {
            Ok(q) => q,
            Err(e) => {
                // It may have ended meanwhile.
                if pidfile_holder(&paths.pidfile).ok().flatten().is_none() {
                    return Ok(Attached::Off(off_reason(&paths)));
                }
                return Err(e.into());
            }
        };
        let agent = paths.agent.exists();
        tracing::info!(vm = %name, pid, "attached to running QEMU");
        Ok(Attached::Running(QemuVm::watch(
            name.to_string(),
            paths,
            pid,
            qmp,
            pidfd,
            Waiter::Attached,
            agent,
        )))
    }

    fn watch(
        name: String,
        paths: RuntimePaths,
        pid: u32,
        qmp: Qmp,
        pidfd: PidFd,
        waiter: Waiter,
        agent: bool,
    ) -> QemuVm {
        let (exit_tx, exit) = watch::channel(None);
        let monitor = tokio::spawn(monitor(
            name.clone(),
            paths.clone(),
            pid,
            qmp.clone(),
            pidfd,
            waiter,
            exit_tx,
        ));
        let agent = agent.then(|| AgentClient::new(&paths.agent));
        QemuVm {
            inner: Arc::new(Inner {
                name,
                paths,
                pid,
                qmp,
                agent,
                exit,
                monitor,
            }),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The version of the QEMU running this VM.
    pub fn qemu_version(&self) -> &QemuVersion {
        self.inner.qmp.version()
    }

    /// The VM's runtime files.
    pub fn runtime_paths(&self) -> &RuntimePaths {
        &self.inner.paths
    }

    /// The QMP session, for the commands of live moves and block jobs.
    pub fn qmp(&self) -> &Qmp {
        &self.inner.qmp
    }

    /// QEMU's events from now on (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.qmp.events()
    }

    /// Why QEMU ended, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.inner.exit.borrow().clone()
    }

    /// Waits until QEMU has ended.
    pub async fn wait_exit(&self) -> ExitReason {
        let mut rx = self.inner.exit.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The monitor is gone (the handle is being dropped): nothing more to learn.
                return off_reason(&self.inner.paths).unwrap_or(ExitReason {
                    kind: process::ExitKind::Unknown,
                    pid: self.inner.pid,
                    detail: None,
                });
            }
        }
    }

    fn not_running(&self) -> Result<(), QemuError> {
        match self.exit_reason() {
            Some(reason) => Err(QemuError::NotRunning {
                name: self.inner.name.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The VM's state.
    pub async fn state(&self) -> VmState {
        if let Some(r) = self.exit_reason() {
            return VmState::Off(r);
        }
        match self
            .inner
            .qmp
            .execute_timeout(qapi::qmp::query_status {}, COMMAND_TIMEOUT)
            .await
        {
            Ok(status) => match status.status {
                RunState::running => VmState::Running,
                RunState::paused | RunState::prelaunch | RunState::suspended => VmState::Paused,
                RunState::inmigrate => VmState::Incoming,
                RunState::postmigrate => VmState::Migrated,
                s @ (RunState::io_error | RunState::internal_error | RunState::guest_panicked) => {
                    VmState::Stopped(run_state_name(s))
                }
                s => VmState::Other(run_state_name(s)),
            },
            Err(_) => {
                // QMP failed: QEMU is probably ending; give the monitor a moment to see it.
                match tokio::time::timeout(Duration::from_secs(2), self.wait_exit()).await {
                    Ok(r) => VmState::Off(r),
                    Err(_) => VmState::Other("not answering".to_string()),
                }
            }
        }
    }

    /// Pauses the guest's vCPUs.
    pub async fn pause(&self) -> Result<(), QemuError> {
        self.not_running()?;
        self.inner
            .qmp
            .execute_timeout(qapi::qmp::stop {}, COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Lets the guest run (again).
    pub async fn resume(&self) -> Result<(), QemuError> {
        self.not_running()?;
        self.inner
            .qmp
            .execute_timeout(qapi::qmp::cont {}, COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Asks the guest to shut down (ACPI power button); if it has not within `timeout`,
    /// powers QEMU off.
    pub async fn shutdown(&self, timeout: Duration) -> Result<StopOutcome, QemuError> {
        if let Some(r) = self.exit_reason() {
            return Ok(StopOutcome::ShutDown(r));
        }
        match self
            .inner
            .qmp
            .execute_timeout(qapi::qmp::system_powerdown {}, COMMAND_TIMEOUT)
            .await
        {
            Ok(_) | Err(QmpError::Disconnected) => {}
            Err(e) => return Err(e.into()),
        }
        match tokio::time::timeout(timeout, self.wait_exit()).await {
            Ok(reason) => Ok(StopOutcome::ShutDown(reason)),
            Err(_) => {
                tracing::info!(vm = %self.inner.name, "the guest did not shut down in time: powering off");
                Ok(StopOutcome::PoweredOff(self.power_off().await?))
            }
        }
    }

    /// Powers QEMU off (QMP `quit`; SIGKILL if it does not exit in time).
    pub async fn power_off(&self) -> Result<ExitReason, QemuError> {
        if let Some(r) = self.exit_reason() {
            return Ok(r);
        }
        match self
            .inner
            .qmp
            .execute_timeout(qapi::qmp::quit {}, COMMAND_TIMEOUT)
            .await
        {
            Ok(_) | Err(QmpError::Disconnected) | Err(QmpError::Timeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Ok(r) = tokio::time::timeout(QUIT_TIMEOUT, self.wait_exit()).await {
            return Ok(r);
        }
        tracing::warn!(vm = %self.inner.name, pid = self.inner.pid, "QEMU did not quit: killing it");
        let pidfd = PidFd::open(self.inner.pid).map_err(|source| QemuError::Kill {
            pid: self.inner.pid,
            source,
        })?;
        pidfd.kill().map_err(|source| QemuError::Kill {
            pid: self.inner.pid,
            source,
        })?;
        Ok(self.wait_exit().await)
    }

    fn agent(&self) -> Result<&AgentClient, AgentError> {
        self.inner.agent.as_ref().ok_or(AgentError::NotConfigured)
    }

    /// The guest's boot id, uptime and progress, from its agent.
    pub async fn guest_status(&self) -> Result<GuestStatus, AgentError> {
        self.agent()?.status().await
    }

    /// Runs the guest's own checks through its agent.
    pub async fn guest_check(&self) -> Result<CheckReport, AgentError> {
        self.agent()?.check().await
    }
}

fn run_state_name(s: RunState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// Connects to QMP once QEMU has created its socket; `None` after [`START_TIMEOUT`].
async fn connect_when_ready(path: &Path) -> Option<Qmp> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if path.exists() {
            if let Ok(q) = Qmp::connect(path, COMMAND_TIMEOUT).await {
                return Some(q);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why a VM whose QEMU is not running ended: its exit record, else its log.
fn off_reason(paths: &RuntimePaths) -> Option<ExitReason> {
    if let Some(r) = process::read_exit_record(paths) {
        return Some(r);
    }
    // Never started here, or its files are gone.
    let pid: u32 = fs::read_to_string(&paths.pidfile)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let reason = classify(pid, &ExitFacts::default(), &paths.qemu_log);
    process::write_exit_record(paths, &reason);
    Some(reason)
}

/// Watches QEMU until it ends; then records and publishes why.
async fn monitor(
    name: String,
    paths: RuntimePaths,
    pid: u32,
    qmp: Qmp,
    pidfd: PidFd,
    mut waiter: Waiter,
    exit: watch::Sender<Option<ExitReason>>,
) {
    let mut events = qmp.events();
    let mut facts = ExitFacts::default();
    let mut events_open = true;
    let status = loop {
        tokio::select! {
            status = waiter.wait(&pidfd) => break status,
            ev = events.recv(), if events_open => match ev {
                Ok(e) => note_event(&mut facts, &e),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
        }
    };
    facts.status = status;
    // A SHUTDOWN event sent just before the exit may still be on its way.
    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.closed()).await;
    while let Ok(e) = events.try_recv() {
        note_event(&mut facts, &e);
    }
    let reason = classify(pid, &facts, &paths.qemu_log);
    tracing::info!(vm = %name, pid, reason = %reason, "QEMU ended");
    process::write_exit_record(&paths, &reason);
    // The sockets QEMU leaves behind are of no use any more.
    for p in [&paths.qmp, &paths.agent] {
        let _ = fs::remove_file(p);
    }
    exit.send_replace(Some(reason));
}

fn note_event(facts: &mut ExitFacts, e: &QmpEvent) {
    if e.name == "SHUTDOWN" {
        facts.shutdown_event = e
            .data
            .get("reason")
            .and_then(|r| r.as_str())
            .map(str::to_string);
    }
}
