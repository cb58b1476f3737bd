//! The destination's side of a move: [`Destination`]. See the module doc of [`super`].

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::link::{ChannelWriter, Link, LinkCloser, SharedWriter};
use super::storage::{DestStorage, check_paths, check_shared};
use super::wire::{MoveDocument, chain, decode_devices, decode_vcpu};
use crate::protocol::{
    ErrorCode, ErrorMessage, Frame, FrameReader, Incompatibility, Message, MoveOutcome, Outcome,
    ProtocolError, ProtocolVersion, Purpose, ReceiverAction, ReceiverPolicy, ReceiverState,
    ReceiverStep, SessionId, UnitDecoder, Verdict,
};
use crate::vm::config::VmConfig;
use crate::vm::cpuid::hidden_features_used;
use crate::vm::devices::DeviceState;
use crate::vm::state::{VcpuState, VmState, VmWideState};
use crate::vm::{PAGE_BYTES, PreparedVm, Vm, VmOptions, missing_cpu_features};

/// Incompatibility ids this engine reports (Compare-VM style: stable numbers).
pub mod incompatibility {
    /// The configuration document is invalid here.
    pub const CONFIG: u32 = 1001;
    /// Not enough free memory.
    pub const MEMORY: u32 = 1002;
    /// The processor lacks features the VM uses.
    pub const CPU: u32 = 1003;
    /// Building the VM failed.
    pub const BUILD: u32 = 1004;
    /// A NIC is connected to a virtual switch this host does not have (map it to one it has,
    /// or create the switch here).
    pub const SWITCH: u32 = 1005;
    /// Live migration is disabled on this host (Enable-VMMigration turns it on).
    pub const DISABLED: u32 = 1006;
    /// This host already runs as many moves as it allows at once (its concurrency limit).
    pub const BUSY: u32 = 1007;
    /// The source's address is not in the networks this host accepts moves from.
    pub const NETWORK: u32 = 1008;
    /// The VM's disks cannot be placed here: a destination path outside this host's storage
    /// roots, with `..`, escaping through a symbolic link, or naming a file that exists (or
    /// this host has no storage roots).
    pub const STORAGE: u32 = 1009;
    /// A move without its storage (shared storage), but this host does not see the VM's
    /// images: a file is missing here, or the file at that path is not the one the running
    /// VM has open at the source (no lock of it is visible), i.e. the storage is not shared.
    pub const SHARED_STORAGE: u32 = 1010;
}

/// A host's own checks on an incoming VM (switches, storage roots, names), run with the
/// engine's checks; every reason is reported at once.
pub type HostCheck = dyn Fn(&VmConfig) -> Vec<Incompatibility<'static>> + Send + Sync;

/// What the destination reports as moves arrive and end.
#[derive(Debug, Clone)]
pub enum ReceivedEvent {
    /// A move started: the source's Hello was accepted.
    Started {
        /// The session.
        session: SessionId,
        /// Who connected.
        peer: String,
    },
    /// The VM configuration arrived and was checked.
    Checked {
        /// The session.
        session: SessionId,
        /// The VM.
        vm: String,
        /// Every reason it cannot come here (empty: it can).
        refused: Vec<String>,
    },
    /// The VM was resumed here.
    Resumed {
        /// The session.
        session: SessionId,
        /// The VM.
        vm: String,
    },
    /// The move ended without the VM running here; everything built was discarded.
    Discarded {
        /// The session.
        session: SessionId,
        /// Why.
        reason: String,
    },
}

/// Where a test can make the destination fail (fault injection for the handoff tests).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Everything arrived and the VM is built, not yet resumed.
    BeforeResume,
    /// The VM was resumed here; Resumed is not sent yet.
    AfterResume,
}

/// What the fault hook asks for.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Nothing.
    Continue,
    /// Behave as if every link of the move broke now.
    CutLinks,
}

/// The fault hook's type.
#[doc(hidden)]
pub type FaultHook = dyn Fn(FaultPoint) -> FaultAction + Send + Sync;

/// How a destination behaves.
pub struct DestinationOptions {
    /// Our software version ("vmgate 0.1.0").
    pub software: String,
    /// The newest protocol version we speak (tests may lower it).
    pub version: ProtocolVersion,
    /// Declare a link lost after this long without a frame (the source pings every second).
    pub link_timeout: Duration,
    /// Most channels one move may use here.
    pub max_channels: u16,
    /// Options of the VMs built here (console log...).
    pub vm_options: Box<dyn Fn(&VmConfig) -> VmOptions + Send + Sync>,
    /// The host's own checks.
    pub host_check: Option<Box<HostCheck>>,
    /// This host pretends its processor lacks these features (lab and tests: simulates an
    /// older host). Named as [`crate::vm::cpuid::hidden_features_used`] accepts them
    /// ("avx512f", "AVX2"); a VM that uses one is refused with
    /// [`incompatibility::CPU`], like a VM that uses a feature this processor really lacks. A VM
    /// in processor compatibility mode does not use them and is not affected.
    pub hidden_cpu_features: Vec<String>,
    /// Progress and outcomes.
    pub on_event: Box<dyn Fn(ReceivedEvent) + Send + Sync>,
    /// Fault injection for tests.
    #[doc(hidden)]
    pub fault: Option<Box<FaultHook>>,
    /// Folders under which a shared-nothing move may create a VM's disks (each must exist).
    /// Empty: this host refuses moves that bring their disks
    /// ([`incompatibility::STORAGE`]).
    pub storage_roots: Vec<std::path::PathBuf>,
}

impl std::fmt::Debug for DestinationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationOptions")
            .field("software", &self.software)
            .field("version", &self.version)
            .field("link_timeout", &self.link_timeout)
            .field("max_channels", &self.max_channels)
            .field("hidden_cpu_features", &self.hidden_cpu_features)
            .field("storage_roots", &self.storage_roots)
            .finish_non_exhaustive()
    }
}

impl Default for DestinationOptions {
    fn default() -> DestinationOptions {
        DestinationOptions {
            software: concat!("vmgate ", env!("CARGO_PKG_VERSION")).into(),
            version: ProtocolVersion::CURRENT,
            link_timeout: Duration::from_secs(15),
            max_channels: crate::protocol::MAX_CHANNELS,
            vm_options: Box::new(|_| VmOptions::default()),
            host_check: None,
            hidden_cpu_features: Vec::new(),
            on_event: Box::new(|_| {}),
            fault: None,
            storage_roots: Vec::new(),
        }
    }
}

/// What [`Destination::handle`] did with a link.
#[derive(Debug)]
pub enum Received {
    /// A move completed: the VM runs here now (resumed), the source released it.
    Vm(Box<ReceivedVm>),
    /// The link joined a running move as a parallel channel (its thread serves it).
    Joined,
    /// An outcome query was answered.
    Answered,
    /// The move ended without the VM coming here; nothing is left of it.
    Discarded(String),
}

/// A VM that moved here.
#[derive(Debug)]
pub struct ReceivedVm {
    /// The running VM.
    pub vm: Vm,
    /// The session.
    pub session: SessionId,
    /// Whether the source confirmed it let go (Released); false when the link broke after
    /// the VM resumed here (it still runs only here: the source learns it by asking).
    pub released: bool,
    /// Why the source did not confirm, if it did not.
    pub note: String,
}

struct JoinRequest {
    channel: u16,
    hello: Frame<'static>,
    frames: FrameReader<Box<dyn Read + Send>>,
    writer: SharedWriter,
    closer: Arc<dyn LinkCloser>,
}

/// The destination: sessions in progress and how finished ones ended.
pub struct Destination {
    opts: DestinationOptions,
    sessions: Mutex<HashMap<SessionId, Arc<Session>>>,
    outcomes: Mutex<HashMap<SessionId, MoveOutcome>>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// One move in progress, shared by its channel threads.
struct Session {
    id: SessionId,
    channels: u16,
    state: Mutex<Option<ReceiverState>>,
    prepared: Mutex<Option<Arc<PreparedVm>>>,
    vcpus: Mutex<Vec<Option<VcpuState>>>,
    devices: Mutex<Option<(VmWideState, DeviceState)>>,
    config: Mutex<Option<VmConfig>>,
    writers: Mutex<Vec<Option<SharedWriter>>>,
    closers: Mutex<Vec<Arc<dyn LinkCloser>>>,
    resumed: Mutex<Option<Vm>>,
    joins: Mutex<Option<Sender<JoinRequest>>>,
    started: Instant,
    last_heard_ms: AtomicU64,
    ended: AtomicBool,
    end_reason: Mutex<String>,
    /// Shared-nothing moves: the disks being received.
    storage: Mutex<Option<DestStorage>>,
    /// Held from a RoundEnd's transition to the write of the RoundAck it produces, so that
    /// acknowledgements leave in order although each channel's thread sends its own (and
    /// an acknowledgement may first complete the disks).
    round_ends: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Destination {
    /// A destination.
    pub fn new(opts: DestinationOptions) -> Destination {
        Destination {
            opts,
            sessions: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(HashMap::new()),
        }
    }

    /// Moves in progress.
    pub fn active(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// How a session ended, if it did here.
    pub fn outcome(&self, session: SessionId) -> Option<MoveOutcome> {
        lock(&self.outcomes).get(&session).copied()
    }

    fn policy(&self) -> ReceiverPolicy {
        let mut p = ReceiverPolicy::new(self.opts.software.clone());
        p.version = self.opts.version;
        p.max_channels = self.opts.max_channels;
        p
    }

    /// Serves one incoming (authenticated) link to its end: a move's control channel runs
    /// the whole move on this thread; a parallel channel is handed to its move; an outcome
    /// query is answered.
    pub fn handle(&self, link: Link) -> Received {
        let Link {
            reader,
            writer,
            closer,
            peer,
        } = link;
        let mut frames = FrameReader::new(reader);
        // The first frame must come soon: a watchdog closes a silent link.
        let first = {
            let done = Arc::new(AtomicBool::new(false));
            let guard = watchdog(
                Arc::clone(&done),
                Arc::clone(&closer),
                self.opts.link_timeout,
            );
            let f = frames.read_frame().map(|f| {
                f.and_then(|f| {
                    f.message.to_static().map(|m| Frame {
                        version: f.version,
                        message: m,
                    })
                })
            });
            done.store(true, Ordering::SeqCst);
            let _ = guard.join();
            f
        };
        let first = match first {
            Ok(Some(f)) => f,
            Ok(None) => {
                closer.close();
                return Received::Discarded(format!("{peer} sent no Hello"));
            }
            Err(e) => {
                let w = ChannelWriter::new(writer, self.opts.version);
                let _ = w.send(&crate::protocol::error_reply(&e));
                closer.close();
                return Received::Discarded(format!("{peer} sent an invalid first frame: {e}"));
            }
        };
        let purpose = match &first.message {
            Message::Hello(h) => Some((h.purpose, h.session, h.channel, h.version)),
            _ => None,
        };
        match purpose {
            Some((Purpose::Join, session, channel, version)) => {
                let target = lock(&self.sessions).get(&session).cloned();
                let w = Arc::new(ChannelWriter::new(writer, version));
                let joined = target.as_ref().and_then(|s| {
                    let tx = lock(&s.joins).clone()?;
                    tx.send(JoinRequest {
                        channel,
                        hello: first.clone(),
                        frames,
                        writer: Arc::clone(&w),
                        closer: Arc::clone(&closer),
                    })
                    .ok()
                });
                if joined.is_some() {
                    Received::Joined
                } else {
                    let e = ProtocolError::BadHello(format!(
                        "it joins session {session}, which this destination does not have"
                    ));
                    let _ = w.send(&crate::protocol::error_reply(&e));
                    closer.close();
                    Received::Discarded(e.to_string())
                }
            }
            Some((Purpose::QueryOutcome, session, _, version)) => {
                let w = ChannelWriter::new(writer, version);
                let outcome = self.answer_query(session);
                let _ = match ReceiverState::new(self.policy()).on_message(0, &first) {
                    Ok(ReceiverStep {
                        action: ReceiverAction::AnswerOutcome(_),
                        ..
                    }) => w.send(&Message::Outcome(Outcome { session, outcome })),
                    Ok(step) => match step.action {
                        ReceiverAction::Send(m) | ReceiverAction::SendAndClose(m) => w.send(&m),
                        _ => Ok(()),
                    },
                    Err(r) => w.send(&crate::protocol::error_reply(&r.error)),
                };
                closer.close();
                Received::Answered
            }
            _ => self.run_move(first, frames, writer, closer, peer),
        }
    }

    /// How a session ended, for a source that lost its link during the handoff. A session
    /// still in progress is ended first: before the VM resumed here it is discarded (and
    /// can then never resume), after it the VM stays here.
    fn answer_query(&self, session: SessionId) -> MoveOutcome {
        if let Some(o) = self.outcome(session) {
            return o;
        }
        let live = lock(&self.sessions).get(&session).cloned();
        let Some(s) = live else {
            return MoveOutcome::Unknown;
        };
        let outcome = s.on_link_lost(&self.opts, "the source asked how the move ended");
        lock(&self.outcomes).insert(session, outcome);
        outcome
    }

    fn run_move(
        &self,
        first: Frame<'static>,
        frames: FrameReader<Box<dyn Read + Send>>,
        writer: Box<dyn std::io::Write + Send>,
        closer: Arc<dyn LinkCloser>,
        peer: String,
    ) -> Received {
        let (session_id, channels, version) = match &first.message {
            Message::Hello(h) => (h.session, h.channels, h.version),
            _ => (SessionId([0; 16]), 1, self.opts.version),
        };
        let w = Arc::new(ChannelWriter::new(writer, version));
        // Version negotiation and the Hello's checks.
        let step = ReceiverState::new(self.policy()).on_message(0, &first);
        let step = match step {
            Ok(s) => s,
            Err(r) => {
                let _ = perform_reply(&w, &r.then.action);
                closer.close();
                return Received::Discarded(format!("{peer}: {}", r.error));
            }
        };
        if !matches!(step.state, ReceiverState::Negotiated(_)) {
            let _ = perform_reply(&w, &step.action);
            closer.close();
            let why = match &step.action {
                ReceiverAction::SendAndClose(Message::VersionRefused(r)) => format!(
                    "refused {peer}: it runs {} (protocol {}), this host accepts {} to {}",
                    r.source_software, r.source, r.destination_min, r.destination
                ),
                _ => format!("refused {peer}"),
            };
            return Received::Discarded(why);
        }
        if lock(&self.sessions).contains_key(&session_id) || self.outcome(session_id).is_some() {
            let e = ProtocolError::BadHello(format!("session {session_id} was already used"));
            let _ = w.send(&crate::protocol::error_reply(&e));
            closer.close();
            return Received::Discarded(e.to_string());
        }
        let (join_tx, join_rx) = mpsc::channel();
        let session = Arc::new(Session {
            id: session_id,
            channels,
            state: Mutex::new(Some(step.state)),
            prepared: Mutex::new(None),
            vcpus: Mutex::new(Vec::new()),
            devices: Mutex::new(None),
            config: Mutex::new(None),
            writers: Mutex::new(vec![None; usize::from(channels)]),
            closers: Mutex::new(vec![Arc::clone(&closer)]),
            resumed: Mutex::new(None),
            joins: Mutex::new(Some(join_tx)),
            started: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            end_reason: Mutex::new(String::new()),
            storage: Mutex::new(None),
            round_ends: Mutex::new(()),
        });
        if let Some(slot) = lock(&session.writers).get_mut(0) {
            *slot = Some(Arc::clone(&w));
        }
        lock(&self.sessions).insert(session_id, Arc::clone(&session));
        (self.opts.on_event)(ReceivedEvent::Started {
            session: session_id,
            peer: peer.clone(),
        });
        if perform_reply(&w, &step.action).is_err() {
            session.on_link_lost(&self.opts, "the source went away after its Hello");
        }
        let outcome = std::thread::scope(|scope| {
            let s0 = Arc::clone(&session);
            let opts = &self.opts;
            scope.spawn(move || s0.serve_channel(opts, 0, frames));
            self.supervise(&session, &join_rx, scope)
        });
        lock(&self.sessions).remove(&session_id);
        lock(&self.outcomes).insert(session_id, outcome);
        let vm = lock(&session.resumed).take();
        match (outcome, vm) {
            (MoveOutcome::Resumed, Some(vm)) => {
                let note = lock(&session.end_reason).clone();
                Received::Vm(Box::new(ReceivedVm {
                    vm,
                    session: session_id,
                    released: note.is_empty(),
                    note,
                }))
            }
            _ => {
                let reason = lock(&session.end_reason).clone();
                (self.opts.on_event)(ReceivedEvent::Discarded {
                    session: session_id,
                    reason: reason.clone(),
                });
                Received::Discarded(reason)
            }
        }
    }

    /// The session's main thread: joins, the watchdog, the end.
    fn supervise<'scope>(
        &'scope self,
        session: &'scope Arc<Session>,
        joins: &Receiver<JoinRequest>,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> MoveOutcome {
        loop {
            if session.ended.load(Ordering::SeqCst) {
                break;
            }
            let heard = Duration::from_millis(session.last_heard_ms.load(Ordering::Relaxed));
            if session.started.elapsed().saturating_sub(heard) > self.opts.link_timeout {
                let why = format!(
                    "the source has not been heard from for {} s",
                    self.opts.link_timeout.as_secs()
                );
                session.on_link_lost(&self.opts, &why);
                break;
            }
            match joins.recv_timeout(Duration::from_millis(50)) {
                Ok(j) => {
                    let ok = usize::from(j.channel) < usize::from(session.channels)
                        && lock(&session.writers)
                            .get(usize::from(j.channel))
                            .is_some_and(Option::is_none);
                    if !ok {
                        let e = ProtocolError::DuplicateChannel(j.channel);
                        let _ = j.writer.send(&crate::protocol::error_reply(&e));
                        j.closer.close();
                        continue;
                    }
                    if let Some(slot) = lock(&session.writers).get_mut(usize::from(j.channel)) {
                        *slot = Some(Arc::clone(&j.writer));
                    }
                    lock(&session.closers).push(Arc::clone(&j.closer));
                    let s = Arc::clone(session);
                    let opts = &self.opts;
                    scope.spawn(move || {
                        s.touch();
                        let channel = j.channel;
                        if s.step(opts, channel, &j.hello) {
                            s.serve_channel(opts, channel, j.frames);
                        }
                    });
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        *lock(&session.joins) = None;
        session.close_all();
        let state = lock(&session.state);
        match state.as_ref().and_then(ReceiverState::outcome) {
            Some(o) => o,
            None => MoveOutcome::Discarded,
        }
    }
}

fn perform_reply(w: &ChannelWriter, action: &ReceiverAction) -> Result<(), ProtocolError> {
    match action {
        ReceiverAction::Send(m) | ReceiverAction::SendAndClose(m) => w.send(m),
        ReceiverAction::Discard { reply: Some(m) } => w.send(m),
        _ => Ok(()),
    }
}

/// Closes `closer` unless `done` is set within `timeout`.
fn watchdog(
    done: Arc<AtomicBool>,
    closer: Arc<dyn LinkCloser>,
    timeout: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        while !done.load(Ordering::SeqCst) {
            if start.elapsed() > timeout {
                closer.close();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

impl Session {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(ms, Ordering::Relaxed);
    }

    fn owns_vm(&self) -> bool {
        lock(&self.state)
            .as_ref()
            .is_some_and(ReceiverState::owns_vm)
    }

    fn close_all(&self) {
        for c in lock(&self.closers).iter() {
            c.close();
        }
    }

    fn end(&self, reason: &str) {
        {
            let mut r = lock(&self.end_reason);
            if r.is_empty() {
                reason.clone_into(&mut r);
            }
        }
        self.ended.store(true, Ordering::SeqCst);
    }

    fn writer(&self, channel: u16) -> Option<SharedWriter> {
        lock(&self.writers)
            .get(usize::from(channel))
            .and_then(Clone::clone)
    }

    /// Reads and handles frames of one channel until the link or the move ends.
    fn serve_channel(
        &self,
        opts: &DestinationOptions,
        channel: u16,
        mut frames: FrameReader<Box<dyn Read + Send>>,
    ) {
        let mut decoder = UnitDecoder::new();
        let mut page = vec![0u8; PAGE_BYTES];
        let mut block = vec![0u8; crate::protocol::DISK_BLOCK_SIZE];
        loop {
            if self.ended.load(Ordering::SeqCst) {
                return;
            }
            let frame = match frames.read_frame() {
                Ok(Some(f)) => f,
                // Once the VM runs here, only the control channel matters: the source closes
                // its data channels as it sends Released.
                Ok(None) | Err(_) if channel != 0 && self.owns_vm() => return,
                Ok(None) => {
                    self.on_link_lost(opts, &format!("the source closed channel {channel}"));
                    return;
                }
                Err(e) => {
                    let why = format!("channel {channel}: {e}");
                    // A frame that does not decode is the peer's fault: tell it, then end.
                    if !matches!(
                        e,
                        ProtocolError::Io(_) | ProtocolError::ClosedMidFrame { .. }
                    ) {
                        if let Some(w) = self.writer(channel) {
                            let _ = w.send(&crate::protocol::error_reply(&e));
                        }
                        self.fail(opts, &why);
                    } else {
                        self.on_link_lost(opts, &why);
                    }
                    return;
                }
            };
            self.touch();
            if let Message::MemoryBatch(b) = &frame.message {
                // Checked first by the state machine, then written outside its lock.
                if !self.step(opts, channel, &frame) {
                    return;
                }
                let prepared = lock(&self.prepared).clone();
                let Some(vm) = prepared else {
                    self.fail(opts, "pages arrived before the VM was prepared");
                    return;
                };
                for unit in b.pages().iter() {
                    let stored = decoder
                        .decode(&unit, &mut page)
                        .map_err(|e| e.to_string())
                        .and_then(|()| vm.write_page(unit.index, &page).map_err(|e| chain(&e)));
                    if let Err(e) = stored {
                        self.local_failure(
                            opts,
                            &format!("storing page {} failed: {e}", unit.index),
                        );
                        return;
                    }
                }
                continue;
            }
            if let Message::DiskBlocks(b) = &frame.message {
                if !self.step(opts, channel, &frame) {
                    return;
                }
                let mut storage = lock(&self.storage);
                let Some(st) = storage.as_mut() else {
                    drop(storage);
                    self.fail(
                        opts,
                        "disk blocks arrived in a move that does not bring its disks",
                    );
                    return;
                };
                for unit in b.blocks().iter() {
                    let zero = unit.data.kind() == crate::protocol::UnitKind::Zero;
                    let stored = if zero {
                        Ok(())
                    } else {
                        decoder.decode(&unit, &mut block).map_err(|e| e.to_string())
                    }
                    .and_then(|()| {
                        st.store(b.disk, b.layer, unit.index, zero, &block)
                            .map_err(|e| chain(&e))
                    });
                    if let Err(e) = stored {
                        drop(storage);
                        self.local_failure(opts, &e);
                        return;
                    }
                }
                continue;
            }
            let _in_order =
                matches!(frame.message, Message::RoundEnd(_)).then(|| lock(&self.round_ends));
            if !self.step(opts, channel, &frame) {
                return;
            }
        }
    }

    /// Runs the state machine on a frame and performs the action (StorePages is left to the
    /// caller). False when the move ended.
    fn step(&self, opts: &DestinationOptions, channel: u16, frame: &Frame<'_>) -> bool {
        let (action, error) = {
            let mut guard = lock(&self.state);
            let Some(state) = guard.take() else {
                return false;
            };
            if matches!(state, ReceiverState::Failed | ReceiverState::Cancelled) {
                // The move already ended (the source was told why): a frame still on its way
                // gets no answer, which could overtake the one that says why.
                *guard = Some(state);
                return false;
            }
            match state.on_message(channel, frame) {
                Ok(step) => {
                    *guard = Some(step.state);
                    (step.action, None)
                }
                Err(r) => {
                    *guard = Some(r.then.state);
                    (r.then.action, Some(r.error.to_string()))
                }
            }
        };
        let cause = error.map(|e| format!("the source broke the protocol: {e}"));
        self.perform(opts, channel, action, frame, cause)
    }

    fn perform(
        &self,
        opts: &DestinationOptions,
        channel: u16,
        action: ReceiverAction,
        frame: &Frame<'_>,
        cause: Option<String>,
    ) -> bool {
        match action {
            ReceiverAction::None | ReceiverAction::StorePages | ReceiverAction::StoreBlocks => true,
            ReceiverAction::Send(Message::RoundAck(a))
                if a.round >= 1 && lock(&self.storage).is_some() =>
            {
                // Round 1 carried the parents: complete them and create the active layers
                // before the source, told by this acknowledgement, sends their blocks.
                // Round 2 carried the bulk copy: make it durable now rather than with the VM
                // paused at the source.
                let switching = matches!(
                    lock(&self.state).as_ref(),
                    Some(ReceiverState::SwitchingOver(_))
                );
                let done: Result<(), super::storage::StorageError> =
                    lock(&self.storage).as_mut().map_or(Ok(()), |st| {
                        st.parents_complete()?;
                        if a.round == 2 && !switching {
                            st.sync_actives()?;
                        }
                        Ok(())
                    });
                if let Err(e) = done {
                    return self.local_failure(
                        opts,
                        &format!("preparing the disks failed: {}", chain(&e)),
                    );
                }
                self.send_or_lost(opts, 0, &Message::RoundAck(a))
            }
            // Acknowledgements go on the control channel: one ordered stream, so the source
            // never sees round r + 1 acknowledged before round r.
            ReceiverAction::Send(m @ Message::RoundAck(_)) => self.send_or_lost(opts, 0, &m),
            ReceiverAction::Send(m) => self.send_or_lost(opts, channel, &m),
            ReceiverAction::SendAndClose(m) => {
                if let Some(w) = self.writer(channel) {
                    let _ = w.send(&m);
                }
                let why = match &m {
                    Message::Incompatible(i) => format!(
                        "the VM cannot come here: {}",
                        i.report
                            .iter()
                            .map(|x| format!("[{}] {}", x.id, x.message))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    _ => cause.unwrap_or_else(|| "the move was refused".into()),
                };
                self.discard(&why);
                false
            }
            ReceiverAction::CheckConfig => {
                let Message::VmConfig(cfg) = &frame.message else {
                    return self
                        .local_failure(opts, "a configuration check without a configuration");
                };
                let verdict = self.check_config(opts, cfg);
                let step = {
                    let mut guard = lock(&self.state);
                    let Some(state) = guard.take() else {
                        return false;
                    };
                    match state.on_verdict(verdict) {
                        Ok(s) => s,
                        Err(r) => r.then,
                    }
                };
                let action = step.action;
                *lock(&self.state) = Some(step.state);
                self.perform(opts, channel, action, frame, None)
            }
            ReceiverAction::StoreVcpuState(index) => {
                let Message::VcpuState(v) = &frame.message else {
                    return self.local_failure(opts, "a vCPU state action without a vCPU state");
                };
                match decode_vcpu(index, &v.state) {
                    Ok(state) => {
                        let mut vcpus = lock(&self.vcpus);
                        if let Some(slot) =
                            vcpus.get_mut(usize::try_from(index).unwrap_or(usize::MAX))
                        {
                            *slot = Some(state);
                            true
                        } else {
                            drop(vcpus);
                            self.local_failure(
                                opts,
                                &format!("vCPU {index} is not in the configuration"),
                            )
                        }
                    }
                    Err(e) => self.fail_with_reply(opts, channel, ErrorCode::Malformed, &e),
                }
            }
            ReceiverAction::StoreDeviceState => {
                let Message::DeviceState(d) = &frame.message else {
                    return self
                        .local_failure(opts, "a device state action without a device state");
                };
                match decode_devices(&d.state) {
                    Ok(devs) => {
                        *lock(&self.devices) = Some(devs);
                        true
                    }
                    Err(e) => self.fail_with_reply(opts, channel, ErrorCode::Malformed, &e),
                }
            }
            ReceiverAction::Resume => self.resume(opts),
            ReceiverAction::Discard { reply } => {
                if let (Some(m), Some(w)) = (reply, self.writer(channel)) {
                    let _ = w.send(&m);
                }
                let why = match &frame.message {
                    Message::Cancel(c) => format!("the source cancelled the move: {}", c.reason),
                    Message::Error(e) => {
                        format!("the source reported {}: {}", e.code.name(), e.message)
                    }
                    _ => cause.unwrap_or_else(|| "the move failed".into()),
                };
                self.discard(&why);
                false
            }
            ReceiverAction::Finish => {
                self.end("");
                self.close_all();
                false
            }
            ReceiverAction::PrepareLayer => {
                let Message::DiskLayer(l) = &frame.message else {
                    return self.local_failure(opts, "a layer action without a layer");
                };
                let answers = match lock(&self.storage).as_mut() {
                    Some(st) => st.announce(l).map_err(|e| chain(&e)),
                    None => Err(
                        "a disk layer was announced in a move that does not bring its disks".into(),
                    ),
                };
                let answers = match answers {
                    Ok(a) => a,
                    Err(e) => {
                        return self.local_failure(
                            opts,
                            &format!(
                                "the destination cannot take disk {} layer {}: {e}",
                                l.disk, l.layer
                            ),
                        );
                    }
                };
                for (disk, layer, reuse) in answers {
                    let step = {
                        let mut guard = lock(&self.state);
                        let Some(state) = guard.take() else {
                            return false;
                        };
                        match state.answer_layer(disk, layer, reuse) {
                            Ok(s) => s,
                            Err(r) => r.then,
                        }
                    };
                    let action = step.action;
                    *lock(&self.state) = Some(step.state);
                    if !self.perform(opts, channel, action, frame, None) {
                        return false;
                    }
                }
                true
            }
            ReceiverAction::AnswerOutcome(_) => {
                self.local_failure(opts, "an outcome query inside a move")
            }
        }
    }

    /// Sends on `channel`; a failed write is a lost link. False when the move ended.
    fn send_or_lost(&self, opts: &DestinationOptions, channel: u16, m: &Message<'_>) -> bool {
        match self.writer(channel).map(|w| w.send(m)) {
            Some(Ok(())) => true,
            _ => {
                self.on_link_lost(opts, &format!("writing to channel {channel} failed"));
                false
            }
        }
    }

    /// The engine's checks and the host's, all at once; builds the skeleton if they pass.
    fn check_config(
        &self,
        opts: &DestinationOptions,
        cfg: &crate::protocol::VmConfig<'_>,
    ) -> Verdict {
        let mut report: Vec<Incompatibility<'static>> = Vec::new();
        let (config, cpuid, storage) = match MoveDocument::decode_with_storage(cfg) {
            Ok(x) => x,
            Err(e) => {
                return Verdict::Incompatible(vec![Incompatibility {
                    id: incompatibility::CONFIG,
                    message: e.into(),
                }]);
            }
        };
        let need = config.memory_mib.saturating_mul(1 << 20);
        if let Some(avail) = mem_available() {
            if need > avail {
                report.push(Incompatibility {
                    id: incompatibility::MEMORY,
                    message: format!(
                        "the VM needs {} MiB of memory and this host has {} MiB available",
                        config.memory_mib,
                        avail >> 20
                    )
                    .into(),
                });
            }
        }
        let mut missing = match missing_cpu_features(&cpuid) {
            Ok(missing) => missing,
            Err(e) => {
                report.push(Incompatibility {
                    id: incompatibility::CPU,
                    message: format!("this host's processor could not be checked: {}", chain(&e))
                        .into(),
                });
                Vec::new()
            }
        };
        for hidden in hidden_features_used(&cpuid, &opts.hidden_cpu_features) {
            if !missing.contains(&hidden) {
                missing.push(hidden);
            }
        }
        if !missing.is_empty() {
            report.push(Incompatibility {
                id: incompatibility::CPU,
                message: format!(
                    "this host's processor lacks features the VM uses: {}; move it to a compatible host, or run it in processor compatibility mode",
                    missing.join(", ")
                )
                .into(),
            });
        }
        if let Some(check) = &opts.host_check {
            report.extend(check(&config));
        }
        // Every disk path, and for shared storage every backing file too, inside this host's
        // storage roots; the VM opens its disks beneath them.
        let checked = if storage {
            check_paths(&opts.storage_roots, &config).map(Some)
        } else {
            check_shared(&opts.storage_roots, &config)
        };
        let roots = match checked {
            Ok(r) => r,
            Err(problems) => {
                report.extend(problems.into_iter().map(|(id, p)| Incompatibility {
                    id,
                    message: p.into(),
                }));
                None
            }
        };
        if report.is_empty() {
            let mut vm_options = (opts.vm_options)(&config);
            if vm_options.storage_roots.is_none() {
                vm_options.storage_roots = roots.clone();
            }
            match PreparedVm::prepare(config.clone(), &vm_options) {
                Ok(p) => {
                    *lock(&self.vcpus) = vec![None; usize::try_from(config.vcpus).unwrap_or(0)];
                    *lock(&self.prepared) = Some(Arc::new(p));
                    if let (true, Some(roots)) = (storage, roots) {
                        *lock(&self.storage) = Some(DestStorage::new(roots, &config));
                    }
                }
                Err(e) => report.push(Incompatibility {
                    id: incompatibility::BUILD,
                    message: format!("the VM could not be built here: {}", chain(&e)).into(),
                }),
            }
        }
        (opts.on_event)(ReceivedEvent::Checked {
            session: self.id,
            vm: config.name.clone(),
            refused: report
                .iter()
                .map(|i| format!("[{}] {}", i.id, i.message))
                .collect(),
        });
        *lock(&self.config) = Some(config);
        if report.is_empty() {
            Verdict::Compatible
        } else {
            Verdict::Incompatible(report)
        }
    }

    /// Everything arrived: build the VM from the state, then — only if the move is still
    /// ours to finish — resume it and acknowledge.
    fn resume(&self, opts: &DestinationOptions) -> bool {
        let disks = lock(&self.storage)
            .as_mut()
            .map_or(Ok(()), DestStorage::finish);
        if let Err(e) = disks {
            return self
                .local_failure(opts, &format!("completing the disks failed: {}", chain(&e)));
        }
        let built = self.build();
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => return self.local_failure(opts, &e),
        };
        if fault(opts, FaultPoint::BeforeResume) == FaultAction::CutLinks {
            drop(vm);
            self.close_all();
            self.on_link_lost(opts, "test fault: every link broke before the VM resumed");
            return false;
        }
        // Resume and acknowledge under the state's lock, so a lost link or an outcome query
        // either comes first (and the VM never runs here) or after (and it runs only here).
        let mut guard = lock(&self.state);
        let Some(state) = guard.take() else {
            return false;
        };
        if !matches!(state, ReceiverState::Resuming(_)) {
            *guard = Some(state);
            drop(guard);
            drop(vm);
            self.discard("the move ended while the VM was being restored");
            return false;
        }
        if let Err(e) = vm.resume() {
            let step = state.on_local_failure(&chain(&e));
            *guard = Some(step.state);
            drop(guard);
            if let ReceiverAction::Discard { reply: Some(m) } = step.action {
                if let Some(w) = self.writer(0) {
                    let _ = w.send(&m);
                }
            }
            self.discard(&format!("resuming the VM failed: {}", chain(&e)));
            return false;
        }
        let step = match state.on_resumed() {
            Ok(s) => s,
            Err(r) => r.then,
        };
        *guard = Some(step.state);
        drop(guard);
        let name = lock(&self.config)
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        *lock(&self.resumed) = Some(vm);
        if let Some(st) = lock(&self.storage).as_mut() {
            st.keep();
        }
        (opts.on_event)(ReceivedEvent::Resumed {
            session: self.id,
            vm: name,
        });
        if fault(opts, FaultPoint::AfterResume) == FaultAction::CutLinks {
            self.close_all();
            self.on_link_lost(opts, "test fault: every link broke as the VM resumed");
            return false;
        }
        if let ReceiverAction::Send(m) = step.action {
            if let Some(w) = self.writer(0) {
                if w.send(&m).is_err() {
                    // The VM runs here; the source will ask.
                    self.on_link_lost(opts, "the link broke as the VM resumed here");
                    return false;
                }
            }
        }
        true
    }

    fn build(&self) -> Result<Vm, String> {
        let prepared = lock(&self.prepared)
            .take()
            .ok_or("the VM was not prepared")?;
        let prepared = Arc::try_unwrap(prepared)
            .map_err(|_| "pages were still being written when the VM was to resume".to_string())?;
        let config = lock(&self.config)
            .clone()
            .ok_or("the configuration is missing")?;
        let vcpus: Vec<VcpuState> = lock(&self.vcpus)
            .iter_mut()
            .map(Option::take)
            .collect::<Option<Vec<_>>>()
            .ok_or("a vCPU's state is missing")?;
        let (vm_state, devices) = lock(&self.devices)
            .take()
            .ok_or("the device state is missing")?;
        let state = VmState {
            config,
            vcpus,
            vm: vm_state,
            devices,
        };
        let vm = prepared
            .finish(&state)
            .map_err(|e| format!("building the VM failed: {}", chain(&e)))?;
        vm.restore_state(&state)
            .map_err(|e| format!("restoring the VM's state failed: {}", chain(&e)))?;
        Ok(vm)
    }

    /// A failure here: tell the source, discard.
    fn local_failure(&self, _opts: &DestinationOptions, what: &str) -> bool {
        // The reason first: once the source has the reply it closes the links, and a channel
        // thread seeing that must not make the link's end the reason.
        // (Once the VM runs here nothing is discarded, and end() records the reason.)
        if !self.owns_vm() {
            let mut r = lock(&self.end_reason);
            if r.is_empty() {
                what.clone_into(&mut r);
            }
        }
        let step = {
            let mut guard = lock(&self.state);
            let Some(state) = guard.take() else {
                return false;
            };
            let step = state.on_local_failure(what);
            let action = step.action;
            *guard = Some(step.state);
            action
        };
        if let ReceiverAction::Discard { reply: Some(m) } = step {
            if let Some(w) = self.writer(0) {
                let _ = w.send(&m);
            }
            self.discard(what);
        } else {
            self.end(what);
            self.close_all();
        }
        false
    }

    fn fail(&self, opts: &DestinationOptions, what: &str) {
        let _ = self.local_failure(opts, what);
    }

    fn fail_with_reply(
        &self,
        opts: &DestinationOptions,
        channel: u16,
        code: ErrorCode,
        what: &str,
    ) -> bool {
        if let Some(w) = self.writer(channel) {
            let _ = w.send(&Message::Error(ErrorMessage {
                code,
                message: what.to_string().into(),
            }));
        }
        self.local_failure(opts, what)
    }

    /// Drops everything built for the move.
    fn discard(&self, why: &str) {
        *lock(&self.prepared) = None;
        // Closes and removes every file the move created here.
        *lock(&self.storage) = None;
        lock(&self.vcpus).clear();
        *lock(&self.devices) = None;
        if let Some(vm) = lock(&self.resumed).take() {
            // Only reachable if the state machine kept a VM it then discarded: never run two.
            vm.shutdown();
        }
        self.end(why);
        self.close_all();
    }

    /// The link is gone: before the VM resumed here, discard; after, keep it.
    fn on_link_lost(&self, _opts: &DestinationOptions, why: &str) -> MoveOutcome {
        let (action, outcome) = {
            let mut guard = lock(&self.state);
            let Some(state) = guard.take() else {
                return MoveOutcome::Discarded;
            };
            let step = state.on_link_lost();
            let outcome = step.state.outcome().unwrap_or(MoveOutcome::Discarded);
            *guard = Some(step.state);
            (step.action, outcome)
        };
        match action {
            ReceiverAction::Discard { .. } => self.discard(why),
            ReceiverAction::Finish => {
                if lock(&self.resumed).is_some() {
                    // Runs here; the source did not confirm.
                    self.end(why);
                } else {
                    self.end("");
                }
                self.close_all();
            }
            _ => {
                self.end(why);
                self.close_all();
            }
        }
        outcome
    }
}

fn fault(opts: &DestinationOptions, at: FaultPoint) -> FaultAction {
    opts.fault.as_ref().map_or(FaultAction::Continue, |f| f(at))
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
