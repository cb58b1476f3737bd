//! The source's side of a move: [`send_vm`]. See the module doc of [`super`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use super::link::{ChannelWriter, Dialer, Link, LinkCloser, SharedWriter};
use super::rate::RateLimiter;
use super::storage::{SourceStorage, WireSink, destination_paths};
use super::wire::{MoveDocument, chain, encode_devices, encode_vcpu};
use super::{CancelToken, EngineError, MoveError, MoveOptions, MoveStats, Phase, Progress};
use crate::protocol::{
    BatchEncoder, Complete, DeviceState, Frame, FrameReader, Message, ProtocolVersion, RoundEnd,
    SessionId, SourceAction, SourceState, SourceStep, VcpuState, stripe_channel,
};
use crate::vm::{DirtyBitmap, PAGE_BYTES, Vm, VmConfig};

/// How often the source pings the destination on channel 0.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long the engine's loops wait for an event before checking cancel and timeouts.
const TICK: Duration = Duration::from_millis(20);
/// Pages per stripe (the protocol's striping unit).
const STRIPE_PAGES: u64 = 512;
/// What a switchover costs besides the pages (vCPU and device state, the handoff round
/// trips, restoring on the destination), for the downtime prediction.
const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(15);
/// Auto-converge's first throttle and its step (QEMU's cpu-throttle-initial/-increment).
const THROTTLE_INITIAL: f64 = 0.20;
const THROTTLE_STEP: f64 = 0.10;
const THROTTLE_MAX: f64 = 0.99;

/// What the engine's threads tell the control loop.
enum Event {
    /// A control frame from the destination.
    Frame(u16, ProtocolVersion, Message<'static>),
    /// A channel's link ended.
    Closed(u16, String),
    /// A sender finished its part of a round.
    Sent(RoundSent),
    /// A sender failed.
    SendFailed(u16, String),
}

/// How long a failed shared-storage handoff waits for the destination to close the images.
const DISK_RETURN_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default)]
struct RoundSent {
    round: u32,
    batches: u64,
    pages: u64,
    zero: u64,
    untouched: u64,
    raw_bytes: u64,
    data_bytes: u64,
    blocks: u64,
}

/// A round for the sender threads.
struct Job {
    round: u32,
    pages: Arc<DirtyBitmap>,
    /// Round 1: only these pages have ever been touched; the others are zero on both sides.
    populated: Option<Arc<DirtyBitmap>>,
    /// Disk blocks the control thread already sent on this channel in this round:
    /// (batches, blocks), counted in its RoundEnd.
    disk: (u64, u64),
}

/// Ends of the control loop other than going on.
enum Stop {
    /// The move ended before the handoff (or was discarded): the VM runs here.
    Here(MoveError),
    /// The link broke after Complete: ask.
    InDoubt(String),
    /// The destination runs the VM.
    Released,
    /// A comparison ended after the destination found the VM compatible: the destination
    /// was told to discard the session, the VM runs here untouched.
    Checked,
}

impl From<EngineError> for Stop {
    fn from(e: EngineError) -> Stop {
        Stop::Here(MoveError::Failed {
            phase: "moving",
            cause: chain(&e),
        })
    }
}

struct Channel {
    writer: SharedWriter,
    closer: Arc<dyn LinkCloser>,
    jobs: Option<Sender<Job>>,
}

struct Run<'vm, 'p> {
    vm: &'vm Vm,
    opts: &'p MoveOptions,
    cancel: &'p CancelToken,
    progress: &'p mut dyn FnMut(&Progress),
    state: Option<SourceState>,
    version: ProtocolVersion,
    channels: Vec<Channel>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    abort: Arc<AtomicBool>,
    limiter: Option<Arc<RateLimiter>>,
    started: Instant,
    heard: Heard,
    closers: Arc<std::sync::Mutex<Vec<Arc<dyn LinkCloser>>>>,
    timed_out: Arc<AtomicBool>,
    last_ping: Instant,
    ping: u64,
    paused_at: Option<Instant>,
    acked: u32,
    sent: Vec<RoundSent>,
    stats: MoveStats,
    phase: Phase,
    throttle: f64,
    last_progress: Option<Progress>,
    cancel_refused: bool,
    final_dirty: Option<DirtyBitmap>,
    /// Compare only: end after the destination's verdict.
    check_only: bool,
    /// Shared-nothing moves: the disks.
    storage: Option<SourceStorage>,
    /// Per channel: the last round whose RoundEnd its sender wrote.
    ended: Arc<Vec<AtomicU32>>,
}

/// Moves `vm` to the destination at the other end of `control`, opening more links with
/// `dialer` for parallel channels and for the outcome query. `progress` is called after
/// setup, after each round and at each phase change.
///
/// On success the VM runs on the destination: the caller must shut it down here (its vCPUs
/// are paused). On error the VM runs here (resumed if the engine had paused it), except
/// [`MoveError::InDoubt`] and [`MoveError::DisksHeld`], where it stays paused.
pub fn send_vm(
    vm: &Vm,
    control: Link,
    dialer: &mut dyn Dialer,
    opts: &MoveOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MoveStats, MoveError> {
    run(vm, control, dialer, opts, cancel, progress, false)
}

/// What the source tells the destination when a comparison ends.
const COMPARE_ONLY: &str = "compare only: the VM was checked, not moved";

/// Asks the destination at the other end of `control` whether it could take `vm` (Hyper-V's
/// Compare-VM): the setup of a move (Hello, the configuration with
/// [`MoveOptions::switch_map`] applied, the destination's checks) on one channel, then the
/// session ends and the destination discards what it prepared. Returns the destination's
/// whole report, `(id, message)` (ids in [`super::incompatibility`]); empty: compatible.
///
/// The VM keeps running here, untouched (no dirty tracking, no pause). `opts.channels` is
/// ignored (a comparison uses only `control`); a refused version is an error
/// ([`MoveError::VersionRefused`]), as are a broken link and a timeout.
pub fn compare_vm(
    vm: &Vm,
    control: Link,
    opts: &MoveOptions,
) -> Result<Vec<(u32, String)>, MoveError> {
    let opts = MoveOptions {
        channels: 1,
        ..opts.clone()
    };
    match run(
        vm,
        control,
        &mut NoDialer,
        &opts,
        &CancelToken::new(),
        &mut |_: &Progress| {},
        true,
    ) {
        Ok(_) => Ok(Vec::new()),
        Err(MoveError::Incompatible { report }) => Ok(report),
        Err(e) => Err(e),
    }
}

/// The dialer of a comparison, which opens no other link.
struct NoDialer;

impl Dialer for NoDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Err("a comparison opens no other link".into())
    }
}

/// `config` as the destination is to see it: each NIC's switch renamed by `switch_map`
/// (`(from, to)`, names compared without case; the first matching entry wins), MACs
/// unchanged; switches without an entry stay as they are.
pub fn map_switches(config: &VmConfig, switch_map: &[(String, String)]) -> VmConfig {
    let mut mapped = config.clone();
    for nic in &mut mapped.nics {
        if let Some((_, to)) = switch_map
            .iter()
            .find(|(from, _)| from.trim().eq_ignore_ascii_case(nic.switch.trim()))
        {
            nic.switch.clone_from(to);
        }
    }
    mapped
}

fn run(
    vm: &Vm,
    control: Link,
    dialer: &mut dyn Dialer,
    opts: &MoveOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    check_only: bool,
) -> Result<MoveStats, MoveError> {
    let session = SessionId(random_id());
    let (events_tx, events) = mpsc::channel();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let mut run = Run {
            vm,
            opts,
            cancel,
            progress,
            state: None,
            version: opts.version,
            channels: Vec::new(),
            events,
            events_tx,
            abort: Arc::new(AtomicBool::new(false)),
            limiter: opts.bandwidth_limit.map(|b| Arc::new(RateLimiter::new(b))),
            started,
            heard: Heard {
                started,
                ms: Arc::new(AtomicU64::new(0)),
            },
            closers: Arc::default(),
            timed_out: Arc::new(AtomicBool::new(false)),
            last_ping: Instant::now(),
            ping: 0,
            paused_at: None,
            acked: 0,
            sent: Vec::new(),
            stats: MoveStats {
                channels: opts.channels,
                ..MoveStats::default()
            },
            phase: Phase::Setup,
            throttle: 0.0,
            last_progress: None,
            cancel_refused: false,
            final_dirty: None,
            check_only,
            storage: None,
            ended: Arc::new(Vec::new()),
        };
        spawn_watchdog(
            scope,
            run.heard.clone(),
            Arc::clone(&run.closers),
            Arc::clone(&run.abort),
            Arc::clone(&run.timed_out),
            opts.link_timeout,
        );
        let stop = run.drive(scope, session, control, dialer);
        run.finish(scope, stop, dialer)
    })
}

/// Closes every link when the destination has been silent for `timeout`, so that no thread
/// stays blocked on a link that black-holes traffic; ends when the move ends (`abort`).
fn spawn_watchdog<'scope>(
    scope: &'scope Scope<'scope, '_>,
    heard: Heard,
    closers: Arc<std::sync::Mutex<Vec<Arc<dyn LinkCloser>>>>,
    abort: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    timeout: Duration,
) {
    scope.spawn(move || {
        while !abort.load(Ordering::SeqCst) {
            if heard.silence() > timeout {
                timed_out.store(true, Ordering::SeqCst);
                for c in closers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                {
                    c.close();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

fn random_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id));
    if filled.is_err() {
        // Unique enough without the kernel's randomness: time and process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    id
}

/// When the peer was last heard from: milliseconds since the move started.
#[derive(Clone)]
struct Heard {
    started: Instant,
    ms: Arc<AtomicU64>,
}

impl Heard {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.ms.load(Ordering::Relaxed)))
    }
}

fn spawn_reader<'scope>(
    scope: &'scope Scope<'scope, '_>,
    channel: u16,
    reader: Box<dyn std::io::Read + Send>,
    tx: Sender<Event>,
    heard: Heard,
) -> ScopedJoinHandle<'scope, ()> {
    scope.spawn(move || {
        let mut frames = FrameReader::new(reader);
        loop {
            let frame = frames.read_frame();
            if matches!(frame, Ok(Some(_))) {
                heard.touch();
            }
            let ev = match frame {
                Ok(Some(f)) => match f.message.to_static() {
                    Some(m) => Event::Frame(channel, f.version, m),
                    None => Event::Closed(
                        channel,
                        format!(
                            "the destination sent a {} to the source",
                            f.message.message_type()
                        ),
                    ),
                },
                Ok(None) => Event::Closed(channel, "the destination closed the connection".into()),
                Err(e) => Event::Closed(channel, e.to_string()),
            };
            let last = matches!(ev, Event::Closed(..));
            if tx.send(ev).is_err() || last {
                return;
            }
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn spawn_sender<'scope>(
    scope: &'scope Scope<'scope, '_>,
    vm: &'scope Vm,
    channel: u16,
    channels: u16,
    writer: SharedWriter,
    encoder: BatchEncoder,
    jobs: Receiver<Job>,
    tx: Sender<Event>,
    abort: Arc<AtomicBool>,
    limiter: Option<Arc<RateLimiter>>,
    ended: Arc<Vec<AtomicU32>>,
) {
    scope.spawn(move || {
        let mut s = PageSender {
            vm,
            channel,
            channels,
            writer,
            encoder,
            abort,
            limiter,
            buf: vec![0u8; PAGE_BYTES],
        };
        while let Ok(job) = jobs.recv() {
            match s.send_round(&job) {
                Ok(Some(sent)) => {
                    // Tell the control loop before RoundEnd goes out: the destination's
                    // acknowledgement of the round can then never overtake it.
                    if tx.send(Event::Sent(sent)).is_err() {
                        return;
                    }
                    if let Err(e) = s.end_round(&sent) {
                        let _ = tx.send(Event::SendFailed(channel, chain(&e)));
                        return;
                    }
                    if let Some(e) = ended.get(usize::from(channel)) {
                        e.store(sent.round, Ordering::SeqCst);
                    }
                }
                Ok(None) => return, // aborted
                Err(e) => {
                    let _ = tx.send(Event::SendFailed(channel, chain(&e)));
                    return;
                }
            }
        }
    });
}

struct PageSender<'vm> {
    vm: &'vm Vm,
    channel: u16,
    channels: u16,
    writer: SharedWriter,
    encoder: BatchEncoder,
    abort: Arc<AtomicBool>,
    limiter: Option<Arc<RateLimiter>>,
    buf: Vec<u8>,
}

impl PageSender<'_> {
    /// Sends this channel's stripes of the round's pages, then RoundEnd. `None`: aborted.
    fn send_round(&mut self, job: &Job) -> Result<Option<RoundSent>, EngineError> {
        let mut sent = RoundSent {
            round: job.round,
            batches: job.disk.0,
            blocks: job.disk.1,
            ..RoundSent::default()
        };
        let total = job.pages.pages();
        let n = u64::from(self.channels.max(1));
        let mut stripe = u64::from(self.channel);
        self.encoder.begin_memory(job.round);
        while stripe * STRIPE_PAGES < total {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let first = stripe * STRIPE_PAGES;
            let last = (first + STRIPE_PAGES).min(total);
            // The stripe's 8 words of the bitmap.
            let w0 = usize::try_from(first / 64).unwrap_or(usize::MAX);
            let w1 = usize::try_from(last.div_ceil(64)).unwrap_or(usize::MAX);
            let words = job.pages.words().get(w0..w1).unwrap_or(&[]);
            for (k, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let page = (w0 as u64 + k as u64) * 64 + b;
                    if page >= last {
                        break;
                    }
                    debug_assert_eq!(stripe_channel(page, self.channels), self.channel);
                    if let Some(pop) = &job.populated {
                        if !pop.is_set(page) {
                            sent.untouched += 1;
                            continue;
                        }
                    }
                    if !self.encoder.has_room() {
                        self.flush(&mut sent)?;
                        self.encoder.begin_memory(job.round);
                    }
                    self.vm.read_page(page, &mut self.buf)?;
                    let kind = self.encoder.push(page, &self.buf)?;
                    sent.pages += 1;
                    if kind == crate::protocol::UnitKind::Zero {
                        sent.zero += 1;
                    } else {
                        sent.raw_bytes += PAGE_BYTES as u64;
                    }
                }
            }
            stripe += n;
        }
        if !self.encoder.is_empty() {
            self.flush(&mut sent)?;
        }
        if self.abort.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Ok(Some(sent))
    }

    /// Ends this channel's part of a round.
    fn end_round(&self, sent: &RoundSent) -> Result<(), EngineError> {
        self.writer.send(&Message::RoundEnd(RoundEnd {
            round: sent.round,
            batches: sent.batches,
            pages: sent.pages,
            blocks: sent.blocks,
        }))?;
        Ok(())
    }

    fn flush(&mut self, sent: &mut RoundSent) -> Result<(), EngineError> {
        let frame = self.encoder.finish()?;
        if let Some(l) = &self.limiter {
            l.acquire(frame.len() as u64);
        }
        self.writer.send_raw(frame)?;
        sent.batches += 1;
        sent.data_bytes += frame.len() as u64;
        Ok(())
    }
}

/// A condition [`Run::wait_until`] waits for: sees each action the loop produced (or `None`
/// after a turn without one) and says whether the wait is over.
type WaitCheck<'f, 'vm, 'p> =
    dyn FnMut(&mut Run<'vm, 'p>, Option<SourceAction>) -> Result<bool, Stop> + 'f;

/// What one turn of the control loop produced.
enum Pumped {
    /// Nothing for the caller.
    Nothing,
    /// A sender finished its part of a round.
    Sent(RoundSent),
    /// The state machine asks for this (SendConfig, OpenChannels, StartCopy, ...).
    Action(SourceAction),
}

impl<'vm, 'p> Run<'vm, 'p> {
    fn report(&mut self, p: Progress) {
        (self.progress)(&p);
        self.last_progress = Some(p);
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        let mut p = self.last_progress.clone().unwrap_or(Progress {
            phase,
            round: 0,
            bytes_sent: 0,
            bytes_remaining: 0,
            rate_bytes_s: 0.0,
            dirty_rate_bytes_s: 0.0,
            expected_downtime_ms: 0.0,
            throttle_percent: 0,
            converging: true,
        });
        p.phase = phase;
        p.bytes_sent = self.bytes_sent();
        p.throttle_percent = percent(self.throttle);
        self.report(p);
    }

    fn bytes_sent(&self) -> u64 {
        self.channels.iter().map(|c| c.writer.bytes()).sum()
    }

    fn failed(&self, cause: impl Into<String>) -> Stop {
        Stop::Here(MoveError::Failed {
            phase: phase_name(self.phase),
            cause: cause.into(),
        })
    }

    fn take_state(&mut self) -> SourceState {
        self.state.take().unwrap_or(SourceState::RunningHere)
    }

    /// Sends on the control channel; a failed write is a lost link.
    fn send(&mut self, m: &Message<'_>) -> Result<(), Stop> {
        let sent = match self.channels.first() {
            Some(c) => c.writer.send(m).map_err(|e| e.to_string()),
            None => Err("the control channel is gone".into()),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(e) => self.link_lost(&format!("writing to the destination failed: {e}")),
        }
    }

    /// Best effort (the move is ending anyway).
    fn notify(&self, m: &Message<'_>) {
        if let Some(c) = self.channels.first() {
            let _ = c.writer.send(m);
        }
    }

    /// The link is gone: before the handoff the VM stays here; during it, ask.
    fn link_lost(&mut self, why: &str) -> Result<(), Stop> {
        let step = self.take_state().on_link_lost();
        let in_doubt = matches!(step.action, SourceAction::QueryOutcome);
        self.state = Some(step.state);
        if in_doubt {
            Err(Stop::InDoubt(why.to_string()))
        } else {
            Err(self.failed(why))
        }
    }

    /// A failure on this side: before the handoff the destination is told and the VM stays.
    fn local_failure(&mut self, why: &str) -> Stop {
        let step = self.take_state().on_local_failure(why);
        self.state = Some(step.state);
        match step.action {
            SourceAction::KeepHere { notify } => {
                self.abort.store(true, Ordering::SeqCst);
                if let Some(m) = notify {
                    self.notify(&m);
                }
                self.failed(why)
            }
            // During the handoff the destination decides: wait for it (or ask).
            _ => Stop::InDoubt(why.to_string()),
        }
    }

    /// Applies a transition; messages to send are sent, endings become `Stop`s, and what the
    /// loop must do itself is returned.
    fn apply(&mut self, step: SourceStep, cause: Option<String>) -> Result<SourceAction, Stop> {
        self.state = Some(step.state);
        match step.action {
            SourceAction::Send(m) => {
                self.send(&m)?;
                Ok(SourceAction::None)
            }
            SourceAction::KeepHere { notify } => {
                self.abort.store(true, Ordering::SeqCst);
                if let Some(m) = notify {
                    self.notify(&m);
                }
                let cause = cause.unwrap_or_else(|| "the destination ended the move".into());
                Err(self.failed(cause))
            }
            SourceAction::ReportRefused(r) => Err(Stop::Here(MoveError::VersionRefused {
                source_software: self.opts.software.clone(),
                source_version: r.source.get(),
                destination_software: r.destination_software.to_string(),
                destination_min: r.destination_min.get(),
                destination: r.destination.get(),
            })),
            SourceAction::ReportIncompatible(report) => {
                Err(Stop::Here(MoveError::incompatible(&report)))
            }
            SourceAction::Release => Err(Stop::Released),
            SourceAction::QueryOutcome => Err(Stop::InDoubt(
                cause.unwrap_or_else(|| "the link broke".into()),
            )),
            SourceAction::RoundAcked(r) => {
                self.acked = self.acked.max(r);
                Ok(SourceAction::None)
            }
            other => Ok(other),
        }
    }

    /// Feeds a frame from the destination to the state machine.
    fn on_frame(
        &mut self,
        channel: u16,
        version: ProtocolVersion,
        message: Message<'static>,
    ) -> Result<SourceAction, Stop> {
        let cause = match &message {
            Message::Cancel(c) => Some(format!("the destination cancelled it ({})", c.reason)),
            Message::Error(e) => Some(format!(
                "the destination reported {}: {}",
                e.code.name(),
                e.message
            )),
            _ => None,
        };
        // A test announced a version this build does not speak, and the destination took it.
        if let Message::HelloAck(a) = &message {
            if a.version != ProtocolVersion::CURRENT && a.version == self.opts.version {
                return Err(self.local_failure(&format!(
                    "the destination accepted protocol version {}, which this source announced but does not speak (it speaks version {})",
                    a.version,
                    ProtocolVersion::CURRENT
                )));
            }
        }
        let frame = Frame { version, message };
        match self.take_state().on_message(channel, &frame) {
            Ok(step) => self.apply(step, cause),
            Err(rejected) => {
                let cause = format!("the destination broke the protocol: {}", rejected.error);
                self.apply(rejected.then, Some(cause.clone()))?;
                Err(self.failed(cause))
            }
        }
    }

    /// One turn: pings, cancel, link timeout, then the next event or a tick.
    fn pump(&mut self) -> Result<Pumped, Stop> {
        if self.cancel.is_cancelled() && !self.cancel_refused {
            self.on_cancel()?;
        }
        if self.last_ping.elapsed() >= PING_EVERY {
            self.last_ping = Instant::now();
            self.ping = self.ping.wrapping_add(1);
            // Never wait behind a sender: data on the way keeps the link alive too.
            let ping = Message::Ping(self.ping);
            let failed = self
                .channels
                .first()
                .is_some_and(|c| c.writer.try_send(&ping).is_err());
            if failed {
                self.link_lost("writing to the destination failed")?;
            }
        }
        if self.heard.silence() > self.opts.link_timeout || self.timed_out.load(Ordering::SeqCst) {
            let why = format!(
                "the destination has not answered for {} s",
                self.opts.link_timeout.as_secs()
            );
            self.link_lost(&why)?;
        }
        match self.events.recv_timeout(TICK) {
            Ok(Event::Frame(ch, v, m)) => Ok(match self.on_frame(ch, v, m)? {
                SourceAction::None => Pumped::Nothing,
                other => Pumped::Action(other),
            }),
            Ok(Event::Closed(ch, why)) => {
                // A destination that fails says why on channel 0, then closes every link: its
                // reason may still be on its way through another channel's reader.
                if let Some((c, v, m)) = self.reason_after_close() {
                    return Ok(match self.on_frame(c, v, m)? {
                        SourceAction::None => Pumped::Nothing,
                        other => Pumped::Action(other),
                    });
                }
                let why = if self.timed_out.load(Ordering::SeqCst) {
                    format!(
                        "the destination has not answered for {} s",
                        self.opts.link_timeout.as_secs()
                    )
                } else {
                    format!("channel {ch}: {why}")
                };
                self.link_lost(&why)?;
                Ok(Pumped::Nothing)
            }
            Ok(Event::SendFailed(ch, why)) => {
                if why.contains("guest memory") || why.contains("encod") {
                    Err(self.local_failure(&format!("reading the VM's memory failed: {why}")))
                } else {
                    self.link_lost(&format!("sending on channel {ch} failed: {why}"))?;
                    Ok(Pumped::Nothing)
                }
            }
            Ok(Event::Sent(s)) => Ok(Pumped::Sent(s)),
            Err(RecvTimeoutError::Timeout) => Ok(Pumped::Nothing),
            Err(RecvTimeoutError::Disconnected) => Err(self.failed("the engine's threads ended")),
        }
    }

    /// After a channel closed: an Error or Cancel from the destination arriving within a
    /// moment (other events are queued again, in their order, after it).
    fn reason_after_close(&mut self) -> Option<(u16, ProtocolVersion, Message<'static>)> {
        if self.phase == Phase::Handoff {
            return None;
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut others = Vec::new();
        let mut found = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Event::Frame(c, v, m @ (Message::Error(_) | Message::Cancel(_)))) => {
                    found = Some((c, v, m));
                    break;
                }
                Ok(other) => others.push(other),
                Err(_) => break,
            }
        }
        for e in others {
            let _ = self.events_tx.send(e);
        }
        found
    }

    fn on_cancel(&mut self) -> Result<(), Stop> {
        let reason = self.cancel.reason();
        let reason = if reason.is_empty() {
            "cancelled by the user".to_string()
        } else {
            reason
        };
        let step = self.take_state().cancel(&reason);
        self.state = Some(step.state);
        match step.action {
            SourceAction::CancelRefused => {
                // Too late: the destination has everything and decides.
                self.cancel_refused = true;
                Ok(())
            }
            SourceAction::KeepHere { notify } => {
                self.abort.store(true, Ordering::SeqCst);
                if let Some(m) = notify {
                    self.notify(&m);
                }
                Err(Stop::Here(MoveError::Cancelled { reason }))
            }
            _ => Err(Stop::Here(MoveError::Cancelled { reason })),
        }
    }

    /// Pumps until the state machine asks for one of `wanted`.
    fn wait_action(
        &mut self,
        what: &str,
        wanted: &[fn(&SourceAction) -> bool],
    ) -> Result<SourceAction, Stop> {
        let start = Instant::now();
        loop {
            match self.pump()? {
                Pumped::Action(a) if wanted.iter().any(|w| w(&a)) => return Ok(a),
                Pumped::Action(a) => {
                    return Err(self.local_failure(&format!(
                        "the engine did not expect {a:?} while waiting for {what}"
                    )));
                }
                Pumped::Sent(s) => self.sent.push(s),
                Pumped::Nothing => {}
            }
            if start.elapsed() > self.opts.link_timeout {
                let why = format!(
                    "the destination did not answer within {} s while the engine waited for {what}",
                    self.opts.link_timeout.as_secs()
                );
                self.link_lost(&why)?;
            }
        }
    }

    fn add_channel<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, '_>,
        link: Link,
        channel: u16,
    ) -> Result<(), Stop> {
        let writer = Arc::new(ChannelWriter::new(link.writer, self.version));
        spawn_reader(
            scope,
            channel,
            link.reader,
            self.events_tx.clone(),
            self.heard.clone(),
        );
        self.closers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&link.closer));
        self.channels.push(Channel {
            writer,
            closer: link.closer,
            jobs: None,
        });
        Ok(())
    }

    fn close_links(&self) {
        for c in &self.channels {
            c.closer.close();
        }
    }

    fn drive<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, '_>,
        session: SessionId,
        control: Link,
        dialer: &mut dyn Dialer,
    ) -> Stop
    where
        'vm: 'scope,
    {
        match self.drive_inner(scope, session, control, dialer) {
            Ok(()) => self.failed("the engine stopped without an outcome"),
            Err(stop) => stop,
        }
    }

    fn drive_inner<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, '_>,
        session: SessionId,
        control: Link,
        dialer: &mut dyn Dialer,
    ) -> Result<(), Stop>
    where
        'vm: 'scope,
    {
        // ── setup ──
        // The parents' checksums first: reading them may take long, and the destination
        // expects a steady conversation once the Hello is sent.
        if let (Some(so), false) = (&self.opts.storage, self.check_only) {
            match SourceStorage::new(self.vm, so, self.cancel.flag()) {
                Ok(st) => self.storage = Some(st),
                Err(_) if self.cancel.is_cancelled() => {
                    return Err(Stop::Here(MoveError::Cancelled {
                        reason: self.cancel.reason(),
                    }));
                }
                Err(e) => {
                    return Err(Stop::Here(MoveError::Failed {
                        phase: "setting up",
                        cause: format!("reading the VM's disks failed: {}", chain(&e)),
                    }));
                }
            }
        }
        let (state, mut hello) =
            SourceState::start(session, self.opts.channels, self.opts.software.clone())
                .map_err(|e| self.failed(e.to_string()))?;
        // The announced version (a test may play a newer source).
        if let Message::Hello(h) = &mut hello {
            h.version = self.opts.version;
        }
        self.state = Some(state);
        self.add_channel(scope, control, 0)?;
        self.set_phase(Phase::Setup);
        self.send(&hello)?;
        self.wait_action(
            "the destination's Hello",
            &[|a| matches!(a, SourceAction::SendConfig)],
        )?;
        let mut mapped = map_switches(self.vm.config(), &self.opts.switch_map);
        // The disks where they are now: a storage-only move may have changed them since the
        // VM was created.
        for (d, now) in mapped.disks.iter_mut().zip(self.vm.disk_specs()) {
            *d = now;
        }
        if let Some(so) = &self.opts.storage {
            let paths = destination_paths(&mapped, &so.target)
                .map_err(|e| self.local_failure(&format!("placing the disks: {e}")))?;
            for (d, p) in mapped.disks.iter_mut().zip(paths) {
                d.path = p;
            }
        }
        let config = MoveDocument::message_with_storage(
            &mapped,
            self.vm.guest_cpuid(),
            self.opts.storage.is_some(),
        )
        .map_err(|e| self.local_failure(&chain(&e)))?;
        self.send(&config)?;
        let step = self
            .take_state()
            .config_sent()
            .map_err(|r| self.failed(r.error.to_string()))?;
        self.apply(step, None)?;
        let next = self.wait_action(
            "the destination's compatibility check",
            &[
                |a| matches!(a, SourceAction::OpenChannels),
                |a| matches!(a, SourceAction::StartCopy),
            ],
        )?;
        if self.check_only {
            // Compatible: end the session; the destination discards what it prepared.
            let step = self.take_state().cancel(COMPARE_ONLY);
            self.state = Some(step.state);
            if let SourceAction::KeepHere { notify: Some(m) } = step.action {
                self.notify(&m);
            }
            return Err(Stop::Checked);
        }
        if matches!(next, SourceAction::OpenChannels) {
            for ch in 1..self.opts.channels {
                let link = match dialer.dial() {
                    Ok(l) => l,
                    Err(e) => {
                        return Err(self.local_failure(&format!(
                            "opening channel {ch} to the destination failed: {}",
                            chain(&*e)
                        )));
                    }
                };
                self.add_channel(scope, link, ch)?;
                let join = self
                    .state
                    .as_ref()
                    .map(|s| s.join_hello(ch))
                    .transpose()
                    .map_err(|e| self.failed(e.to_string()))?
                    .ok_or_else(|| self.failed("the move ended while channels were opening"))?;
                let writer = self.channels.last().map(|c| Arc::clone(&c.writer));
                if let Some(w) = writer {
                    if let Err(e) = w.send(&join) {
                        self.link_lost(&format!("joining channel {ch} failed: {e}"))?;
                    }
                }
            }
            self.wait_action(
                "the parallel channels to join",
                &[|a| matches!(a, SourceAction::StartCopy)],
            )?;
        }
        self.stats.setup_ms = ms(self.started.elapsed());
        self.start_senders(scope)?;

        // ── pre-copy ──
        let round = self.precopy()?;

        // ── switchover ──
        self.switchover(round)?;

        // ── handoff ──
        self.set_phase(Phase::Handoff);
        let deadline = Instant::now() + self.opts.handoff_timeout;
        loop {
            match self.pump()? {
                Pumped::Action(a) => {
                    return Err(self.local_failure(&format!(
                        "the engine did not expect {a:?} during the handoff"
                    )));
                }
                Pumped::Sent(s) => self.sent.push(s),
                Pumped::Nothing => {}
            }
            if Instant::now() > deadline {
                let why = format!(
                    "the destination did not resume the VM within {} s",
                    self.opts.handoff_timeout.as_secs()
                );
                self.link_lost(&why)?;
            }
        }
    }

    fn start_senders<'scope>(&mut self, scope: &'scope Scope<'scope, '_>) -> Result<(), Stop>
    where
        'vm: 'scope,
    {
        let n = u16::try_from(self.channels.len()).unwrap_or(u16::MAX);
        let vm: &'scope Vm = self.vm;
        self.ended = Arc::new(
            (0..self.channels.len())
                .map(|_| AtomicU32::new(0))
                .collect(),
        );
        for (i, c) in self.channels.iter_mut().enumerate() {
            let encoder = BatchEncoder::new(self.version, self.opts.compression).map_err(|e| {
                Stop::Here(MoveError::Failed {
                    phase: "setting up",
                    cause: e.to_string(),
                })
            })?;
            let (tx, rx) = mpsc::channel();
            c.jobs = Some(tx);
            spawn_sender(
                scope,
                vm,
                u16::try_from(i).unwrap_or(u16::MAX),
                n,
                Arc::clone(&c.writer),
                encoder,
                rx,
                self.events_tx.clone(),
                Arc::clone(&self.abort),
                self.limiter.clone(),
                Arc::clone(&self.ended),
            );
        }
        Ok(())
    }

    /// Pumps until `done` holds (answers, acknowledgements, senders' round ends arrive).
    fn wait_until(&mut self, what: &str, done: &mut WaitCheck<'_, 'vm, 'p>) -> Result<(), Stop> {
        let start = Instant::now();
        if done(self, None)? {
            return Ok(());
        }
        loop {
            match self.pump()? {
                Pumped::Sent(s) => self.sent.push(s),
                Pumped::Action(a) => {
                    if done(self, Some(a))? {
                        return Ok(());
                    }
                    continue;
                }
                Pumped::Nothing => {}
            }
            if done(self, None)? {
                return Ok(());
            }
            if start.elapsed() > self.opts.link_timeout {
                let why = format!(
                    "the destination did not answer within {} s while the engine waited for {what}",
                    self.opts.link_timeout.as_secs()
                );
                self.link_lost(&why)?;
            }
        }
    }

    /// The disks' part of a round (see [`super::storage`]), sent before the round's pages.
    /// Returns per channel the (batches, blocks) sent.
    fn disk_round(&mut self, round: u32, last: bool) -> Result<Vec<(u64, u64)>, Stop> {
        let n = self.channels.len();
        if self.storage.is_none() {
            return Ok(vec![(0, 0); n]);
        }
        // Every channel's RoundEnd of the previous round is out: this round's blocks follow.
        let prev = round.saturating_sub(1);
        self.wait_until("the previous round to end", &mut |r, a| {
            if let Some(a) = a {
                return Err(
                    r.local_failure(&format!("the engine did not expect {a:?} between rounds"))
                );
            }
            Ok(r.ended.iter().all(|e| e.load(Ordering::SeqCst) >= prev))
        })?;
        if round == 1 {
            let announcements = match self.storage.as_ref().map(SourceStorage::announcements) {
                Some(Ok(a)) => a,
                Some(Err(e)) => return Err(self.local_failure(&chain(&e))),
                None => Vec::new(),
            };
            for m in &announcements {
                self.send(m)?;
            }
            self.wait_until(
                "the destination's answers about the disk layers",
                &mut |r, a| {
                    match a {
                        Some(SourceAction::LayerAnswer { disk, layer, reuse }) => {
                            if let Some(st) = r.storage.as_mut() {
                                st.answered(disk, layer, reuse);
                            }
                        }
                        Some(other) => {
                            return Err(r.local_failure(&format!(
                                "the engine did not expect {other:?} while the disks were announced"
                            )));
                        }
                        None => {}
                    }
                    Ok(r.storage.as_ref().is_none_or(SourceStorage::all_answered))
                },
            )?;
        }
        if round == 2 {
            // The destination completes the parents and creates the active layers when it
            // acknowledges round 1.
            self.wait_until("the destination to acknowledge round 1", &mut |r, a| {
                if let Some(a) = a {
                    return Err(
                        r.local_failure(&format!("the engine did not expect {a:?} after round 1"))
                    );
                }
                Ok(r.acked >= 1)
            })?;
        }
        let Some(mut st) = self.storage.take() else {
            return Ok(vec![(0, 0); n]);
        };
        let writers: Vec<SharedWriter> = self
            .channels
            .iter()
            .map(|c| Arc::clone(&c.writer))
            .collect();
        let result = WireSink::new(
            writers,
            self.version,
            self.opts.compression,
            self.cancel,
            Arc::clone(&self.abort),
            self.limiter.clone(),
            st.bytes,
        )
        .and_then(|mut sink| {
            let r = match round {
                1 => st.copy_parents(&mut sink, round),
                2 => st.bulk(&mut sink, round),
                _ => st.dirty(&mut sink, round, last),
            };
            r.and_then(|()| sink.end()).map(|()| sink.counts.clone())
        });
        self.storage = Some(st);
        match result {
            Ok(counts) => Ok(counts),
            Err(_) if self.cancel.is_cancelled() => {
                self.on_cancel()?;
                Err(self.failed("the move was cancelled while the disks were copied"))
            }
            Err(e) => Err(self.local_failure(&format!("copying the disks failed: {}", chain(&e)))),
        }
    }

    /// Sends one round on every channel and waits until every channel finished it.
    fn run_round(
        &mut self,
        round: u32,
        pages: Arc<DirtyBitmap>,
        populated: Option<Arc<DirtyBitmap>>,
        last: bool,
    ) -> Result<RoundSent, Stop> {
        let disk = self.disk_round(round, last)?;
        let mut dispatched = true;
        for (i, c) in self.channels.iter().enumerate() {
            let job = Job {
                round,
                pages: Arc::clone(&pages),
                populated: populated.clone(),
                disk: disk.get(i).copied().unwrap_or((0, 0)),
            };
            dispatched &= c.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        }
        if !dispatched {
            return Err(self.local_failure("a sender thread ended"));
        }
        let n = self.channels.len();
        let mut done = 0;
        let mut total = RoundSent {
            round,
            ..RoundSent::default()
        };
        while done < n {
            match self.pump()? {
                Pumped::Sent(s) if s.round == round => {
                    done += 1;
                    total.batches += s.batches;
                    total.pages += s.pages;
                    total.zero += s.zero;
                    total.untouched += s.untouched;
                    total.raw_bytes += s.raw_bytes;
                    total.data_bytes += s.data_bytes;
                    total.blocks += s.blocks;
                    self.sent.push(s);
                }
                Pumped::Sent(s) => self.sent.push(s),
                Pumped::Action(a) => {
                    return Err(self.local_failure(&format!(
                        "the engine did not expect {a:?} during round {round}"
                    )));
                }
                Pumped::Nothing => {}
            }
        }
        let step = self
            .take_state()
            .round_ended(round)
            .map_err(|r| self.failed(r.error.to_string()))?;
        self.apply(step, None)?;
        Ok(total)
    }

    /// Pre-copy rounds until the predicted downtime is within the target. Returns the last
    /// round sent.
    fn precopy(&mut self) -> Result<u32, Stop> {
        self.set_phase(Phase::PreCopy);
        let vm = self.vm;
        let total_pages = vm.layout().total_pages();
        // From here on, every write is tracked; round 1 sends everything ever touched.
        vm.harvest_dirty()
            .map_err(|e| self.local_failure(&chain(&e)))?;
        let mut last_harvest = Instant::now();
        let populated = Arc::new(vm.populated_pages());
        let mut pages = Arc::new(DirtyBitmap::all(total_pages));
        let mut populated = Some(populated);
        let copy_start = Instant::now();
        let mut rate_est: Option<f64> = None;
        let mut wire_per_page = PAGE_BYTES as f64;
        let mut prev_dirty: Option<u64> = None;
        let mut round = 0u32;
        loop {
            round += 1;
            let t0 = Instant::now();
            let b0 = self.bytes_sent();
            let sent = self.run_round(round, pages, populated.take(), false)?;
            let dt = t0.elapsed();
            let bytes = self.bytes_sent().saturating_sub(b0);
            let harvested = Instant::now();
            let dirty = vm
                .harvest_dirty()
                .map_err(|e| self.local_failure(&chain(&e)))?;
            let dirty_time = harvested
                .duration_since(last_harvest)
                .as_secs_f64()
                .max(1e-6);
            last_harvest = harvested;
            let d = dirty.count();
            if bytes >= 8 << 20 || dt >= Duration::from_millis(50) {
                let r = bytes as f64 / dt.as_secs_f64().max(1e-6);
                rate_est = Some(rate_est.map_or(r, |p| 0.5 * p + 0.5 * r));
            }
            let sent_nonzero = sent.pages.saturating_sub(sent.zero);
            if sent_nonzero >= 256 {
                wire_per_page = (sent.data_bytes as f64 / sent.pages.max(1) as f64).max(16.0);
            }
            let mut rate = rate_est.unwrap_or(1e9);
            if let Some(l) = &self.limiter {
                rate = rate.min(l.bytes_per_s() as f64);
            }
            let disk_remaining = self.storage.as_ref().map_or(0, SourceStorage::dirty_bytes);
            let remaining = d * PAGE_BYTES as u64 + disk_remaining;
            let expected = d as f64 * wire_per_page / rate
                + disk_remaining as f64 / rate
                + SWITCHOVER_OVERHEAD.as_secs_f64();
            let dirty_rate = remaining as f64 / dirty_time;
            let target = self.opts.downtime_target.as_secs_f64();
            // With disks: round 1 copies the parents, round 2 the active layers in bulk,
            // round 3 what the guest wrote meanwhile; the switchover comes after that.
            let fits = expected <= target && (self.storage.is_none() || round >= 3);
            let shrinking = prev_dirty.is_none_or(|p| (d as f64) < 0.9 * p as f64);
            prev_dirty = Some(d);
            self.report(Progress {
                phase: Phase::PreCopy,
                round,
                bytes_sent: self.bytes_sent(),
                bytes_remaining: remaining,
                rate_bytes_s: rate,
                dirty_rate_bytes_s: dirty_rate,
                expected_downtime_ms: expected * 1000.0,
                throttle_percent: percent(self.throttle),
                converging: fits || shrinking,
            });
            if fits {
                self.stats.rounds = round;
                // The last dirty set goes in the final round, with the VM paused.
                self.final_dirty = Some(dirty);
                return Ok(round);
            }
            if self.opts.auto_converge && round >= 2 && dirty_rate > 0.5 * rate {
                self.throttle = if self.throttle <= 0.0 {
                    THROTTLE_INITIAL
                } else {
                    (self.throttle + THROTTLE_STEP).min(THROTTLE_MAX)
                };
                vm.set_throttle(self.throttle);
                self.stats.max_throttle_percent =
                    self.stats.max_throttle_percent.max(percent(self.throttle));
            }
            if copy_start.elapsed() > self.opts.converge_timeout {
                return Err(self.give_up(NotConverging {
                    dirty_mib_s: dirty_rate / MIB,
                    rate_mib_s: rate / MIB,
                    expected_ms: expected * 1000.0,
                    target_ms: self.opts.downtime_target.as_millis(),
                    seconds: copy_start.elapsed().as_secs_f64(),
                }));
            }
            pages = Arc::new(dirty);
        }
    }

    /// Ends pre-copy that does not converge: the destination is told, the VM stays here.
    fn give_up(&mut self, n: NotConverging) -> Stop {
        let text = MoveError::NotConverging {
            dirty_mib_s: n.dirty_mib_s,
            rate_mib_s: n.rate_mib_s,
            expected_ms: n.expected_ms,
            target_ms: n.target_ms,
            seconds: n.seconds,
        };
        let step = self.take_state().cancel(&text.to_string());
        self.state = Some(step.state);
        self.abort.store(true, Ordering::SeqCst);
        if let SourceAction::KeepHere { notify: Some(m) } = step.action {
            self.notify(&m);
        }
        Stop::Here(text)
    }

    /// Pauses the VM, sends the last pages and the state, and Complete.
    fn switchover(&mut self, last_round: u32) -> Result<(), Stop> {
        let vm = self.vm;
        if self.storage.is_some() {
            // The destination makes the disk copy durable as it acknowledges the bulk round:
            // pause only once it caught up, so that the pause does not wait for its disk.
            self.wait_until(
                "the destination to acknowledge the pre-copy",
                &mut |r, a| {
                    if let Some(a) = a {
                        return Err(r.local_failure(&format!(
                            "the engine did not expect {a:?} before the switchover"
                        )));
                    }
                    Ok(r.acked >= last_round)
                },
            )?;
        }
        if self.storage.is_none() {
            // Shared storage: the handoff flushes the images with the VM paused; flushing
            // once while it still runs leaves that flush only the last writes.
            vm.flush_disks()
                .map_err(|e| self.local_failure(&chain(&e)))?;
        }
        self.set_phase(Phase::Switchover);
        self.paused_at = Some(Instant::now());
        vm.pause().map_err(|e| self.local_failure(&chain(&e)))?;
        let step = self
            .take_state()
            .switchover()
            .map_err(|r| self.failed(r.error.to_string()))?;
        self.apply(step, None)?;
        let mut dirty = vm
            .harvest_dirty()
            .map_err(|e| self.local_failure(&chain(&e)))?;
        if let Some(before) = self.final_dirty.take() {
            dirty.union_with(&before);
        }
        let final_round = last_round + 1;
        self.run_round(final_round, Arc::new(dirty), None, true)?;
        self.stats.rounds = final_round;
        if self.storage.is_none() {
            // Shared storage: the destination opens the same images as it builds the VM from
            // the state below. Flush them and give up their locks first; until then its open
            // for writing is refused, so two hosts never write one image.
            vm.release_disks()
                .map_err(|e| self.local_failure(&chain(&e)))?;
            self.stats.shared_disks = vm.disk_specs().into_iter().map(|d| d.path).collect();
        }
        let state = vm
            .save_state()
            .map_err(|e| self.local_failure(&chain(&e)))?;
        for v in &state.vcpus {
            let bytes = encode_vcpu(v).map_err(|e| self.local_failure(&chain(&e)))?;
            self.send(&Message::VcpuState(VcpuState {
                index: v.index,
                state: bytes.into(),
            }))?;
        }
        let devices = encode_devices(&state.vm, &state.devices)
            .map_err(|e| self.local_failure(&chain(&e)))?;
        self.send(&Message::DeviceState(DeviceState {
            state: devices.into(),
        }))?;
        // Complete only once the destination has every page of the final round.
        let start = Instant::now();
        while self.acked < final_round {
            match self.pump()? {
                Pumped::Sent(s) => self.sent.push(s),
                Pumped::Action(a) => {
                    return Err(self.local_failure(&format!(
                        "the engine did not expect {a:?} during the switchover"
                    )));
                }
                Pumped::Nothing => {}
            }
            if start.elapsed() > self.opts.link_timeout {
                self.link_lost("the destination did not acknowledge the final round")?;
            }
        }
        let totals = Complete {
            batches: self.sent.iter().map(|s| s.batches).sum(),
            pages: self.sent.iter().map(|s| s.pages).sum(),
            blocks: self.sent.iter().map(|s| s.blocks).sum(),
        };
        let step = self
            .take_state()
            .complete(totals)
            .map_err(|r| self.failed(r.error.to_string()))?;
        self.apply(step, None)?;
        Ok(())
    }

    /// Ends the move: releases the VM, keeps it here, or asks the destination.
    fn finish<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, '_>,
        stop: Stop,
        dialer: &mut dyn Dialer,
    ) -> Result<MoveStats, MoveError> {
        self.abort.store(true, Ordering::SeqCst);
        let stop = match stop {
            Stop::InDoubt(why) => self.ask_outcome(scope, dialer, why),
            other => other,
        };
        match stop {
            Stop::Released => {
                let resumed_at = Instant::now();
                if let Some(st) = self.storage.as_mut() {
                    let (parents, deleted) = st.release();
                    self.stats.source_parents = parents;
                    self.stats.source_files_deleted = deleted;
                    self.stats.disk_bytes_sent = st.bytes;
                    self.stats.disk_bytes_reused = st.reused_bytes;
                    self.stats.disk_parent_bytes_sent = st.parent_bytes;
                }
                self.notify(&Message::Released);
                self.close_links();
                self.fill_stats(resumed_at);
                self.set_phase(Phase::Completed);
                Ok(self.stats.clone())
            }
            Stop::Here(e) => {
                self.close_links();
                self.vm.set_throttle(0.0);
                let mut e = e;
                if self.vm.disks_released() {
                    // The handoff had begun: take the images back before the VM may run. The
                    // destination closes them as it discards its copy; while it (or anyone)
                    // still writes one, the VM must stay paused.
                    if let Err(r) = self.vm.reacquire_disks(DISK_RETURN_WAIT) {
                        self.set_phase(Phase::Failed);
                        let cause = e.to_string();
                        let cause = cause.trim_end_matches(" The VM keeps running here.");
                        return Err(MoveError::DisksHeld {
                            cause: cause.trim_end_matches('.').to_owned(),
                            held: chain(&r),
                        });
                    }
                }
                if self.paused_at.is_some() {
                    if let Err(r) = self.vm.resume() {
                        e = MoveError::Failed {
                            phase: phase_name(self.phase),
                            cause: format!(
                                "{e}; resuming the VM here afterwards failed too: {}",
                                chain(&r)
                            ),
                        };
                    }
                }
                let phase = if matches!(
                    e,
                    MoveError::Cancelled { .. } | MoveError::NotConverging { .. }
                ) {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                self.set_phase(phase);
                Err(e)
            }
            Stop::InDoubt(cause) => {
                self.close_links();
                self.set_phase(Phase::Failed);
                Err(MoveError::InDoubt { cause })
            }
            Stop::Checked => {
                self.close_links();
                self.stats.setup_ms = ms(self.started.elapsed());
                self.stats.total_ms = self.stats.setup_ms;
                self.set_phase(Phase::Cancelled);
                Ok(self.stats.clone())
            }
        }
    }

    /// After the link broke during the handoff: asks the destination on a new link, a few
    /// times, how the move ended.
    fn ask_outcome<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, '_>,
        dialer: &mut dyn Dialer,
        why: String,
    ) -> Stop {
        self.close_links();
        let deadline = Instant::now() + self.opts.link_timeout;
        let mut last = why;
        while Instant::now() < deadline {
            let query = match self.state.as_ref().map(SourceState::outcome_query) {
                Some(Ok(q)) => q,
                _ => return Stop::InDoubt(last),
            };
            match dialer.dial() {
                Ok(link) => {
                    let closer = Arc::clone(&link.closer);
                    let writer = ChannelWriter::new(link.writer, self.version);
                    let (tx, rx) = mpsc::channel();
                    spawn_reader(scope, 0, link.reader, tx, self.heard.clone());
                    if let Err(e) = writer.send(&query) {
                        last = format!("asking failed: {e}");
                        closer.close();
                        continue;
                    }
                    let answer = rx.recv_timeout(self.opts.link_timeout);
                    closer.close();
                    match answer {
                        Ok(Event::Frame(ch, v, m)) => {
                            let frame = Frame {
                                version: v,
                                message: m,
                            };
                            match self.take_state().on_message(ch, &frame) {
                                Ok(step) => {
                                    let action = step.action;
                                    self.state = Some(step.state);
                                    return match action {
                                        SourceAction::Release => Stop::Released,
                                        SourceAction::KeepHere { .. } => self.failed(format!(
                                            "{last}; the destination says it did not resume the VM"
                                        )),
                                        _ => Stop::InDoubt(last),
                                    };
                                }
                                Err(r) => {
                                    self.state = Some(r.then.state);
                                    last = format!(
                                        "the destination's answer was invalid: {}",
                                        r.error
                                    );
                                }
                            }
                        }
                        Ok(Event::Closed(_, w)) => last = format!("asking failed: {w}"),
                        _ => last = "the destination did not answer the outcome query".into(),
                    }
                }
                Err(e) => {
                    last = format!("connecting to ask failed: {}", chain(&*e));
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Stop::InDoubt(last)
    }

    fn fill_stats(&mut self, resumed_at: Instant) {
        let s = &mut self.stats;
        s.total_ms = ms(self.started.elapsed());
        s.downtime_ms = self
            .paused_at
            .map_or(0.0, |p| ms(resumed_at.duration_since(p)));
        s.bytes_on_wire = self.channels.iter().map(|c| c.writer.bytes()).sum();
        s.pages_sent = self.sent.iter().map(|x| x.pages).sum();
        s.zero_pages = self.sent.iter().map(|x| x.zero).sum();
        s.untouched_pages = self.sent.iter().map(|x| x.untouched).sum();
        let raw: u64 = self.sent.iter().map(|x| x.raw_bytes).sum();
        let data: u64 = self.sent.iter().map(|x| x.data_bytes).sum();
        s.compression_ratio = if data == 0 {
            1.0
        } else {
            raw as f64 / data as f64
        };
        s.throughput_bytes_s = s.bytes_on_wire as f64 / (s.total_ms / 1000.0).max(1e-6);
    }
}

struct NotConverging {
    dirty_mib_s: f64,
    rate_mib_s: f64,
    expected_ms: f64,
    target_ms: u128,
    seconds: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percent(f: f64) -> u32 {
    let p = (f * 100.0).round();
    if p <= 0.0 {
        0
    } else if p >= 100.0 {
        100
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 < p < 100 here"
        )]
        let p = p as u32;
        p
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Setup => "setting up",
        Phase::PreCopy => "copying memory",
        Phase::Switchover => "switching over",
        Phase::Handoff => "handing off",
        Phase::Completed => "completed",
        Phase::Cancelled => "cancelled",
        Phase::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_mapped_without_case_and_macs_kept() {
        let config = VmConfig::from_toml(
            r#"
name = "web1"
memory_mib = 64
vcpus = 1
[[nic]]
mac = "52:54:00:00:00:01"
switch = "External"
[[nic]]
mac = "52:54:00:00:00:02"
switch = "Private"
[[nic]]
mac = "52:54:00:00:00:03"
switch = "lab"
"#,
            None,
        )
        .unwrap();
        let map = vec![
            ("EXTERNAL".to_string(), "Lab".to_string()),
            ("external".to_string(), "Other".to_string()),
            ("Lab".to_string(), "External".to_string()),
        ];
        let mapped = map_switches(&config, &map);
        let nics: Vec<(&str, &str)> = mapped
            .nics
            .iter()
            .map(|n| (n.mac.as_str(), n.switch.as_str()))
            .collect();
        assert_eq!(
            nics,
            vec![
                ("52:54:00:00:00:01", "Lab"),
                ("52:54:00:00:00:02", "Private"),
                ("52:54:00:00:00:03", "External"),
            ]
        );
        // Everything else is the VM's own.
        assert_eq!(mapped.name, config.name);
        assert_eq!(mapped.memory_mib, config.memory_mib);
        assert_eq!(map_switches(&config, &[]), config);
    }
}
