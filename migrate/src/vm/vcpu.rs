//! vCPU threads: an explicit state machine driven by messages.
//!
//! ```text
//!            Resume                     guest fault / failure report
//!   Paused ─────────▶ Running ─────────────────────────────▶ Stopped(reason)
//!     ▲  ◀───────────  │                                        │
//!     │     Pause      │ (kick: signal + immediate_exit)        │ RestoreState
//!     └────────────────┴────────────────────────────────────────┘
//! ```
//!
//! | request | Paused | Running | Stopped |
//! |---|---|---|---|
//! | Query | its state | its state | its state |
//! | Pause | not allowed | → Paused | answered `Paused(reason)`, stays Stopped |
//! | Resume | → Running | not allowed | not allowed |
//! | SaveState | state | not allowed | state |
//! | RestoreState | → Paused | not allowed | → Paused |
//! | Exit | thread ends | thread ends | thread ends |
//!
//! Every request gets exactly one answer; one that the state does not allow gets
//! [`VcpuResponse::NotAllowed`], never a panic. A request reaches a vCPU that is inside
//! `KVM_RUN` through a signal ([`kick_signal`]) whose handler sets `kvm_run.immediate_exit`,
//! as Firecracker does: the signal makes `KVM_RUN` return `EINTR`, and a signal that lands
//! just before `KVM_RUN` makes it return at once. Before a vCPU answers `Paused` it completes
//! a pending MMIO/PIO exit (one `KVM_RUN` with `immediate_exit` set), so its saved registers
//! are after the instruction.
//!
//! The throttle (for auto-converge) is a fraction of time the vCPU sleeps: every 10 ms of
//! running it sleeps `10 ms × t / (1 − t)`; a ticker thread kicks throttled vCPUs every 10 ms
//! so a guest that never exits is throttled too.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::devices::{BusOutcome, Devices};
use super::state::{VcpuState, Xsave};

/// Offset from `SIGRTMIN` of the signal that kicks a vCPU out of `KVM_RUN`.
pub const KICK_SIGNAL_OFFSET: i32 = 4;
/// Period of throttling and of the throttle ticker.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// Highest throttle (fraction of time asleep).
pub const MAX_THROTTLE: f64 = 0.99;

/// The signal used to kick vCPU threads (`SIGRTMIN + 4`).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// A message to a vCPU thread.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Stop running guest code.
    Pause,
    /// Run guest code.
    Resume,
    /// Capture the vCPU's state (paused or stopped only).
    SaveState,
    /// Load a saved state (paused or stopped only).
    RestoreState(Box<VcpuState>),
    /// Report the state.
    Query,
    /// End the thread.
    Exit,
}

impl VcpuRequest {
    /// The request's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            VcpuRequest::Pause => "pause",
            VcpuRequest::Resume => "resume",
            VcpuRequest::SaveState => "save state",
            VcpuRequest::RestoreState(_) => "restore state",
            VcpuRequest::Query => "query",
            VcpuRequest::Exit => "exit",
        }
    }
}

/// Why a vCPU stopped running guest code on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A guest exception with no handler (triple fault).
    TripleFault,
    /// The guest program wrote this status to the control register.
    GuestFailed(u32),
    /// The guest program finished (it wrote 0 to the control register), like a halted guest.
    GuestDone,
    /// KVM could not enter the guest.
    FailEntry(u64),
    /// KVM reported an internal error (e.g. an instruction it cannot emulate).
    InternalError,
    /// The guest halted with interrupts off without an in-kernel LAPIC.
    Halted,
    /// `KVM_RUN` failed with this errno.
    RunFailed(i32),
    /// An exit this VMM does not handle.
    UnexpectedExit(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::TripleFault => f.write_str("the guest triple-faulted"),
            StopReason::GuestDone => f.write_str("the guest program finished"),
            StopReason::GuestFailed(s) => {
                write!(
                    f,
                    "the guest program reported failure (block device status {s})"
                )
            }
            StopReason::FailEntry(r) => write!(f, "KVM could not enter the guest (reason {r:#x})"),
            StopReason::InternalError => f.write_str("KVM reported an internal error"),
            StopReason::Halted => f.write_str("the guest halted"),
            StopReason::RunFailed(e) => write!(
                f,
                "KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            StopReason::UnexpectedExit(x) => write!(f, "unexpected exit {x}"),
        }
    }
}

/// Where a vCPU's state machine is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Not running guest code, on request.
    Paused,
    /// Running guest code.
    Running,
    /// Not running guest code because the guest or KVM stopped it.
    Stopped(StopReason),
}

impl std::fmt::Display for VcpuRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuRunState::Paused => f.write_str("paused"),
            VcpuRunState::Running => f.write_str("running"),
            VcpuRunState::Stopped(r) => write!(f, "stopped ({r})"),
        }
    }
}

/// A vCPU thread's answer.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Now paused; with the reason if the guest had stopped on its own before (a stopped vCPU
    /// is paused for every purpose but resuming).
    Paused(Option<StopReason>),
    /// The state, answering `Query`.
    Status(VcpuRunState),
    /// Now running.
    Resumed,
    /// The saved state.
    Saved(Box<VcpuState>),
    /// The state was loaded.
    Restored,
    /// The thread is ending.
    Exited,
    /// The request is not allowed in the current state.
    NotAllowed {
        /// The request.
        request: &'static str,
        /// The state it met.
        state: VcpuRunState,
    },
    /// A KVM call failed while serving the request.
    Failed(String),
}

thread_local! {
    // The running vCPU's `kvm_run.immediate_exit`, for the kick signal handler. Const
    // initialized and without destructor, so reading it in a signal handler is plain TLS
    // access (no lazy initialization).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` points into the kvm_run mapping of the vCPU that this thread owns;
            // the vCPU thread sets it after the mapping exists and clears it before the VcpuFd
            // (and with it the mapping) is dropped, and signals are delivered to this thread
            // only. A volatile byte store is async-signal-safe, and KVM reads the field only
            // when this thread enters KVM_RUN.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the kick signal handler (once per process). Returns false if it failed.
pub fn install_kick_handler() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: `sigaction` is plain data; zeroed is a valid initial value for every field.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handle_kick as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: installs a handler that only performs a volatile byte store through a
        // thread-local pointer (see `handle_kick`); `act` is fully initialised and the old
        // action is not requested.
        let rc = unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) };
        INSTALLED.store(rc == 0, Ordering::SeqCst);
    });
    INSTALLED.load(Ordering::SeqCst)
}

/// Shared throttle setting (permille of time asleep).
#[derive(Debug, Default)]
pub struct Throttle {
    permille: AtomicU32,
}

impl Throttle {
    /// Sets the fraction of time vCPUs sleep, clamped to `0..=MAX_THROTTLE`.
    pub fn set(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, MAX_THROTTLE)
        } else {
            0.0
        };
        #[allow(
            clippy::cast_possible_truncation,
            reason = "f is clamped to 0..=0.99, so the product is in 0..=990"
        )]
        let permille = (f * 1000.0).round() as u32;
        self.permille.store(permille, Ordering::SeqCst);
    }

    /// The fraction of time vCPUs sleep.
    pub fn get(&self) -> f64 {
        f64::from(self.permille.load(Ordering::SeqCst)) / 1000.0
    }

    fn sleep_for(&self) -> Option<Duration> {
        let p = self.permille.load(Ordering::Relaxed);
        if p == 0 {
            return None;
        }
        let p = f64::from(p.min(990)) / 1000.0;
        Some(THROTTLE_SLICE.mul_f64(p / (1.0 - p)))
    }
}

/// What a vCPU thread needs.
pub struct VcpuThreadArgs {
    /// vCPU index.
    pub index: u32,
    /// The vCPU.
    pub fd: VcpuFd,
    /// The devices.
    pub devices: Arc<Devices>,
    /// MSRs to save.
    pub msr_list: Arc<Vec<u32>>,
    /// Throttle.
    pub throttle: Arc<Throttle>,
    /// Requests in.
    pub requests: Receiver<VcpuRequest>,
    /// Answers out.
    pub responses: Sender<VcpuResponse>,
}

impl std::fmt::Debug for VcpuThreadArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuThreadArgs")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    devices: Arc<Devices>,
    msr_list: Arc<Vec<u32>>,
    throttle: Arc<Throttle>,
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
    state: VcpuRunState,
    pending_completion: bool,
    ran_since_sleep: Instant,
}

enum Flow {
    Continue,
    Exit,
}

/// Spawns a vCPU thread in the Paused state.
pub fn spawn(args: VcpuThreadArgs) -> std::io::Result<JoinHandle<()>> {
    let name = format!("vcpu{}", args.index);
    std::thread::Builder::new().name(name).spawn(move || {
        let mut t = VcpuThread {
            index: args.index,
            fd: args.fd,
            devices: args.devices,
            msr_list: args.msr_list,
            throttle: args.throttle,
            requests: args.requests,
            responses: args.responses,
            state: VcpuRunState::Paused,
            pending_completion: false,
            ran_since_sleep: Instant::now(),
        };
        let run = t.fd.get_kvm_run();
        let ptr: *mut u8 = &raw mut run.immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        t.main_loop();
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    })
}

impl VcpuThread {
    fn main_loop(&mut self) {
        loop {
            if self.state == VcpuRunState::Running {
                self.fd.set_kvm_immediate_exit(0);
                while let Ok(req) = self.requests.try_recv() {
                    if let Flow::Exit = self.handle(req) {
                        return;
                    }
                }
                if self.state != VcpuRunState::Running {
                    continue;
                }
                if let Some(req) = self.maybe_sleep() {
                    if let Flow::Exit = self.handle(req) {
                        return;
                    }
                    continue;
                }
                self.run_once();
            } else {
                match self.requests.recv() {
                    Ok(req) => {
                        if let Flow::Exit = self.handle(req) {
                            return;
                        }
                    }
                    // The VM is gone.
                    Err(_) => return,
                }
            }
        }
    }

    fn answer(&self, r: VcpuResponse) {
        // The VM side may have given up waiting; nothing else to do then.
        let _ = self.responses.send(r);
    }

    fn not_allowed(&self, req: &VcpuRequest) {
        self.answer(VcpuResponse::NotAllowed {
            request: req.name(),
            state: self.state.clone(),
        });
    }

    fn handle(&mut self, req: VcpuRequest) -> Flow {
        match (&req, &self.state) {
            (VcpuRequest::Exit, _) => {
                self.complete_pending();
                self.answer(VcpuResponse::Exited);
                return Flow::Exit;
            }
            (VcpuRequest::Query, state) => {
                self.answer(VcpuResponse::Status(state.clone()));
            }
            (VcpuRequest::Pause, VcpuRunState::Running) => {
                self.complete_pending();
                self.state = VcpuRunState::Paused;
                self.answer(VcpuResponse::Paused(None));
            }
            (VcpuRequest::Pause, VcpuRunState::Stopped(reason)) => {
                let reason = reason.clone();
                self.complete_pending();
                self.answer(VcpuResponse::Paused(Some(reason)));
            }
            (VcpuRequest::Resume, VcpuRunState::Paused) => {
                self.state = VcpuRunState::Running;
                self.ran_since_sleep = Instant::now();
                self.answer(VcpuResponse::Resumed);
            }
            (VcpuRequest::SaveState, VcpuRunState::Paused | VcpuRunState::Stopped(_)) => {
                self.complete_pending();
                let r = match save_vcpu(&self.fd, self.index, &self.msr_list) {
                    Ok(s) => VcpuResponse::Saved(Box::new(s)),
                    Err(e) => VcpuResponse::Failed(e),
                };
                self.answer(r);
            }
            (VcpuRequest::RestoreState(s), VcpuRunState::Paused | VcpuRunState::Stopped(_)) => {
                self.complete_pending();
                let r = match restore_vcpu(&self.fd, s) {
                    Ok(()) => {
                        self.state = VcpuRunState::Paused;
                        VcpuResponse::Restored
                    }
                    Err(e) => VcpuResponse::Failed(e),
                };
                self.answer(r);
            }
            _ => self.not_allowed(&req),
        }
        Flow::Continue
    }

    /// Finishes an MMIO/PIO exit so that the registers are after the instruction.
    fn complete_pending(&mut self) {
        if !self.pending_completion {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        // KVM completes the pending I/O, then sees immediate_exit and returns EINTR.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        self.pending_completion = false;
    }

    /// Sleeps the throttle's share of time; a request (pause, exit) ends the sleep at once
    /// and is returned, so a throttled guest (up to 990 ms asleep per slice) pauses promptly.
    fn maybe_sleep(&mut self) -> Option<VcpuRequest> {
        if let Some(d) = self.throttle.sleep_for() {
            if self.ran_since_sleep.elapsed() >= THROTTLE_SLICE {
                let req = self.requests.recv_timeout(d).ok();
                self.ran_since_sleep = Instant::now();
                return req;
            }
        }
        None
    }

    fn run_once(&mut self) {
        let devices = &self.devices;
        let mut stop: Option<StopReason> = None;
        let mut pending = false;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::MmioWrite(addr, data) => {
                    pending = true;
                    if let BusOutcome::GuestFailed(status) = devices.mmio_write(addr, data) {
                        stop = Some(if status == 0 {
                            StopReason::GuestDone
                        } else {
                            StopReason::GuestFailed(status)
                        });
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    devices.mmio_read(addr, data);
                    pending = true;
                }
                VcpuExit::IoOut(port, data) => {
                    devices.pio_write(port, data);
                    pending = true;
                }
                VcpuExit::IoIn(port, data) => {
                    devices.pio_read(port, data);
                    pending = true;
                }
                VcpuExit::Intr => {}
                VcpuExit::Hlt => stop = Some(StopReason::Halted),
                VcpuExit::Shutdown => stop = Some(StopReason::TripleFault),
                VcpuExit::FailEntry(reason, _) => stop = Some(StopReason::FailEntry(reason)),
                VcpuExit::InternalError => stop = Some(StopReason::InternalError),
                other => stop = Some(StopReason::UnexpectedExit(format!("{other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => stop = Some(StopReason::RunFailed(e.errno())),
        }
        self.pending_completion = pending;
        if let Some(reason) = stop {
            self.state = VcpuRunState::Stopped(reason);
        }
    }
}

/// Captures a vCPU's state, in Firecracker's order (mp_state first, events last).
pub fn save_vcpu(fd: &VcpuFd, index: u32, msr_list: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &str| {
        let what = what.to_owned();
        move |err: kvm_ioctls::Error| format!("reading the {what} of vCPU {index} failed: {err}")
    };
    let mp_state = fd.get_mp_state().map_err(e("mp state"))?;
    let regs = fd.get_regs().map_err(e("registers"))?;
    let sregs = fd.get_sregs().map_err(e("segment registers"))?;
    let xsave = Xsave(fd.get_xsave().map_err(e("xsave area"))?);
    let xcrs = fd.get_xcrs().map_err(e("xcrs"))?;
    let debug_regs = fd.get_debug_regs().map_err(e("debug registers"))?;
    let lapic = fd.get_lapic().map_err(e("local APIC"))?;
    let msrs = read_msrs(fd, msr_list).map_err(|m| format!("vCPU {index}: {m}"))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("CPUID"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    let vcpu_events = fd.get_vcpu_events().map_err(e("pending events"))?;
    Ok(VcpuState {
        index,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        msrs,
        vcpu_events,
        debug_regs,
        cpuid,
        tsc_khz,
    })
}

/// Reads the MSRs of `list`.
pub fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("too many MSRs: {e:?}"))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| format!("reading MSRs failed: {e}"))?;
    if n != entries.len() {
        let failed = list.get(n).copied().unwrap_or(0);
        return Err(format!("KVM could not read MSR {failed:#x}"));
    }
    Ok(msrs.as_slice().to_vec())
}

/// The MSRs of the host's index list that this vCPU can read (probed once per VM).
pub fn probe_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = candidates.to_vec();
    // Each round drops the first MSR KVM refused; bounded by the list length.
    for _ in 0..candidates.len() {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            return Vec::new();
        };
        match fd.get_msrs(&mut msrs) {
            Ok(n) if n == list.len() => return list,
            Ok(n) if n < list.len() => {
                list.remove(n);
            }
            _ => return Vec::new(),
        }
    }
    list
}

/// Loads a vCPU's state, in Firecracker's order (regs before events, lapic after sregs and
/// before msrs).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let index = s.index;
    let e = |what: &str| {
        let what = what.to_owned();
        move |err: kvm_ioctls::Error| format!("loading the {what} of vCPU {index} failed: {err}")
    };
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|err| format!("the saved CPUID of vCPU {index} is invalid: {err:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
    fd.set_mp_state(s.mp_state).map_err(e("mp state"))?;
    fd.set_regs(&s.regs).map_err(e("registers"))?;
    fd.set_sregs(&s.sregs).map_err(e("segment registers"))?;
    // SAFETY: the VM checked at creation that KVM_CAP_XSAVE2 asks for at most
    // size_of::<kvm_xsave>() (4096) bytes, and this process never enables dynamic XSTATE
    // features, so the kernel reads only within `s.xsave`.
    unsafe { fd.set_xsave(&s.xsave.0) }.map_err(e("xsave area"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("xcrs"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(e("debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(e("local APIC"))?;
    let msrs = Msrs::from_entries(&s.msrs)
        .map_err(|err| format!("the saved MSRs of vCPU {index} are invalid: {err:?}"))?;
    let n = fd.set_msrs(&msrs).map_err(e("MSRs"))?;
    if n != s.msrs.len() {
        let failed = s.msrs.get(n).map_or(0, |m| m.index);
        return Err(format!(
            "KVM refused MSR {failed:#x} of vCPU {index}; this host cannot restore it"
        ));
    }
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(e("pending events"))?;
    if let Some(khz) = s.tsc_khz.filter(|k| fd.get_tsc_khz().ok() != Some(*k)) {
        fd.set_tsc_khz(khz).map_err(e("TSC frequency"))?;
    }
    Ok(())
}

/// The VM's side of one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    requests: Sender<VcpuRequest>,
    // In a mutex so that the handle (and the Vm holding it) is Sync; one requester at a time.
    responses: Mutex<Receiver<VcpuResponse>>,
    thread: Option<JoinHandle<()>>,
}

/// Errors talking to a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread is gone.
    #[error("vCPU {0}'s thread has ended")]
    Gone(u32),
    /// No answer in time.
    #[error("vCPU {index} did not answer a {request} request within {secs} s")]
    Timeout {
        /// vCPU.
        index: u32,
        /// Request.
        request: &'static str,
        /// Seconds waited.
        secs: u64,
    },
}

impl VcpuHandle {
    /// A handle for a spawned thread.
    pub fn new(
        index: u32,
        requests: Sender<VcpuRequest>,
        responses: Receiver<VcpuResponse>,
        thread: JoinHandle<()>,
    ) -> VcpuHandle {
        VcpuHandle {
            index,
            requests,
            responses: Mutex::new(responses),
            thread: Some(thread),
        }
    }

    /// vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sends a signal that makes the thread leave `KVM_RUN`.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            let pt = t.as_pthread_t();
            // SAFETY: `pt` is the pthread of a thread that has not been joined (the handle is
            // still held), so it is a valid thread id; the kick signal has a handler installed
            // that only sets a flag (see `handle_kick`).
            unsafe { libc::pthread_kill(pt, kick_signal()) };
        }
    }

    /// Sends `req`, kicks the thread, and waits for the answer.
    pub fn request(&self, req: VcpuRequest, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        let name = req.name();
        self.post(req)?;
        self.wait(name, timeout)
    }

    /// Sends `req` and kicks the thread; collect the answer with [`VcpuHandle::wait`].
    pub fn post(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        // Drop answers to earlier requests whose wait timed out.
        while self.lock_responses().try_recv().is_ok() {}
        self.requests
            .send(req)
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.kick();
        Ok(())
    }

    /// Waits for the answer to a posted request named `name`.
    pub fn wait(&self, name: &'static str, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        match self.lock_responses().recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                index: self.index,
                request: name,
                secs: timeout.as_secs(),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    fn lock_responses(&self) -> std::sync::MutexGuard<'_, Receiver<VcpuResponse>> {
        self.responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the thread and joins it.
    pub fn exit(&mut self, timeout: Duration) {
        let _ = self.request(VcpuRequest::Exit, timeout);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.exit(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_clamps_and_computes_sleep() {
        let t = Throttle::default();
        assert_eq!(t.sleep_for(), None);
        t.set(0.5);
        assert_eq!(t.get(), 0.5);
        assert_eq!(t.sleep_for(), Some(THROTTLE_SLICE));
        t.set(7.0);
        assert_eq!(t.get(), 0.99);
        t.set(f64::NAN);
        assert_eq!(t.get(), 0.0);
        t.set(-1.0);
        assert_eq!(t.get(), 0.0);
    }
}
