//! The destination's side of a QEMU move (see the module documentation).

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use qapi::qmp;
use tokio::sync::mpsc;

use super::compatibility as ids;
use super::link::{self, Control, ControlEvent, Relay};
use super::wire::{
    self, Accepted, Hello, MIN_VERSION, Message, MoveId, Offer, OfferStorage, Outcome, Problem,
    Purpose, StreamKind, VERSION, VersionRefused, Welcome,
};
use super::{
    DEST_MIGRATION_SOCKET, DEST_NBD_SOCKET, Link, chain, create_image, export_id, export_name,
    set_migration, unix_addr,
};
use crate::qemu::definition::{DefinitionError, QemuVmDefinition};
use crate::qemu::{Attached, QemuHost, QemuVm, StartMode, ValidatedVm, VmState};

/// The daemon's own checks of an arriving VM (migrations enabled, limits, the inventory,
/// switches): every problem, each with its id.
pub type HostCheck = Box<dyn Fn(&QemuVmDefinition) -> Vec<Problem> + Send + Sync>;

/// How the destination side runs.
pub struct QemuDestinationOptions {
    /// Our software ("vmgate 0.1.0").
    pub software: String,
    /// The daemon's checks (none: only the backend's).
    pub host_check: Option<HostCheck>,
    /// Declare the source lost after this long without hearing from it (before Complete:
    /// everything is discarded).
    pub link_timeout: Duration,
    /// How long the first message of a link may take.
    pub hello_timeout: Duration,
    /// How long the stream may take to arrive after Complete.
    pub handoff_timeout: Duration,
}

impl Default for QemuDestinationOptions {
    fn default() -> QemuDestinationOptions {
        QemuDestinationOptions {
            software: concat!("vmgate ", env!("CARGO_PKG_VERSION")).into(),
            host_check: None,
            link_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(30),
            handoff_timeout: Duration::from_secs(120),
        }
    }
}

impl std::fmt::Debug for QemuDestinationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDestinationOptions")
            .field("software", &self.software)
            .field("link_timeout", &self.link_timeout)
            .finish_non_exhaustive()
    }
}

/// A guest that arrived: it runs here now.
#[derive(Debug)]
pub struct Arrived {
    /// Its QEMU.
    pub vm: QemuVm,
    /// Its definition as this host validated it (persist `validated.definition()`).
    pub validated: ValidatedVm,
    /// The move.
    pub move_id: MoveId,
    /// Who sent it (the link's peer).
    pub peer: String,
    /// Whether its disks were copied here (shared-nothing).
    pub disks_copied: bool,
}

/// What [`QemuDestination::handle`] did with a link.
#[derive(Debug)]
#[non_exhaustive]
pub enum QemuReceived {
    /// A move ended with the guest running here.
    Vm(Box<Arrived>),
    /// A move was refused as incompatible (the report was sent), or a compare ended.
    Refused(Vec<Problem>),
    /// A move ended without the guest (cancelled or failed); nothing of it is left here.
    Discarded(String),
    /// A stream link was joined to its move (it carries QEMU's bytes now).
    Stream,
    /// A query was answered.
    Answered,
    /// The link was refused (not a QEMU move, unknown move, bad first message).
    Rejected(String),
}

struct Slot {
    streams: mpsc::UnboundedSender<(StreamKind, Link)>,
}

struct Shared {
    host: QemuHost,
    opts: QemuDestinationOptions,
    sessions: Mutex<HashMap<MoveId, Slot>>,
    outcomes: Mutex<VecDeque<(MoveId, Outcome)>>,
}

/// The destination side of QEMU moves on this host. Cheap to clone.
#[derive(Clone)]
pub struct QemuDestination {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QemuDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDestination").finish_non_exhaustive()
    }
}

/// Writes one message on a link and closes it (blocking).
fn answer_and_close(mut l: Link, m: &Message) {
    let _ = wire::write_message(&mut *l.writer, m);
    l.closer.close();
}

impl QemuDestination {
    /// The destination side of `host`.
    pub fn new(host: QemuHost, opts: QemuDestinationOptions) -> QemuDestination {
        QemuDestination {
            shared: Arc::new(Shared {
                host,
                opts,
                sessions: Mutex::new(HashMap::new()),
                outcomes: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Moves in progress here.
    pub fn active(&self) -> usize {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How a finished move ended here (the last 64 are kept).
    pub fn outcome(&self, id: MoveId) -> Option<Outcome> {
        self.shared
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, o)| *o)
    }

    fn record(&self, id: MoveId, outcome: Outcome) {
        let mut o = self
            .shared
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        o.push_back((id, outcome));
        while o.len() > 64 {
            o.pop_front();
        }
    }

    /// Serves one incoming link of a QEMU move (an authenticated, authorized channel): a
    /// move's control link (returns when the move ended: the guest runs here, or nothing of it
    /// is left), one of its streams (returns at once; the bytes flow on threads), or a query.
    pub async fn handle(&self, link: Link) -> QemuReceived {
        let timeout = self.shared.opts.hello_timeout;
        let first = tokio::task::spawn_blocking(move || link::first_message(link, timeout)).await;
        let (hello, l) = match first {
            Ok(Ok((Message::Hello(h), l))) => (h, l),
            Ok(Ok((m, l))) => {
                let why = format!("the first message was {}, not Hello", m.name());
                tokio::task::spawn_blocking(move || {
                    answer_and_close(
                        l,
                        &Message::Refused {
                            reason: "a link starts with Hello".into(),
                        },
                    );
                });
                return QemuReceived::Rejected(why);
            }
            Ok(Err(e)) => return QemuReceived::Rejected(chain(&e)),
            Err(e) => return QemuReceived::Rejected(e.to_string()),
        };
        match hello.purpose.clone() {
            Purpose::Move => self.session(hello, l).await,
            Purpose::Stream { move_id, stream } => {
                let slot = self
                    .shared
                    .sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&move_id)
                    .map(|s| s.streams.clone());
                match slot {
                    Some(tx) => match tx.send((stream, l)) {
                        Ok(()) => QemuReceived::Stream,
                        Err(mpsc::error::SendError((_, l))) => {
                            tokio::task::spawn_blocking(move || {
                                answer_and_close(
                                    l,
                                    &Message::Refused {
                                        reason: "the move has ended".into(),
                                    },
                                );
                            });
                            QemuReceived::Rejected(format!("{stream} of a move that ended"))
                        }
                    },
                    None => {
                        tokio::task::spawn_blocking(move || {
                            answer_and_close(
                                l,
                                &Message::Refused {
                                    reason: "no such move here".into(),
                                },
                            );
                        });
                        QemuReceived::Rejected(format!("{stream} of an unknown move"))
                    }
                }
            }
            Purpose::Query { move_id } => {
                let deadline = Instant::now() + self.shared.opts.handoff_timeout;
                while self
                    .shared
                    .sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains_key(&move_id)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let outcome = self.outcome(move_id).unwrap_or(Outcome::Unknown);
                let _ = tokio::task::spawn_blocking(move || {
                    answer_and_close(l, &Message::Outcome { outcome });
                })
                .await;
                QemuReceived::Answered
            }
        }
    }

    async fn session(&self, hello: Hello, l: Link) -> QemuReceived {
        let opts = &self.shared.opts;
        if hello.version < MIN_VERSION {
            let m = Message::VersionRefused(VersionRefused {
                software: opts.software.clone(),
                min: MIN_VERSION,
                max: VERSION,
            });
            tokio::task::spawn_blocking(move || answer_and_close(l, &m));
            return QemuReceived::Rejected(format!(
                "the source speaks version {} ({})",
                hello.version, hello.software
            ));
        }
        let move_id = match MoveId::random() {
            Ok(id) => id,
            Err(e) => return QemuReceived::Rejected(format!("no random move id: {e}")),
        };
        let peer = l.peer.clone();
        let ctl = Control::new(l);
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(move_id, Slot { streams: tx });
        let beat = super::source::heartbeat(ctl.sender(), true);
        ctl.send(&Message::Welcome(Welcome {
            version: hello.version.min(VERSION),
            software: opts.software.clone(),
            move_id,
        }));
        let mut s = Session {
            shared: &self.shared,
            ctl,
            streams: rx,
            relays: Arc::default(),
            created: Vec::new(),
            vm: None,
            run_dir: None,
            plan: Vec::new(),
        };
        let (received, outcome) = s.run(move_id, &peer).await;
        beat.abort();
        for r in s
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if !matches!(received, QemuReceived::Vm(_)) {
                r.abort();
            }
        }
        s.ctl.finish(Duration::from_secs(2));
        self.record(move_id, outcome);
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&move_id);
        received
    }
}

struct Session<'a> {
    shared: &'a Shared,
    ctl: Control,
    streams: mpsc::UnboundedReceiver<(StreamKind, Link)>,
    relays: Arc<Mutex<Vec<Relay>>>,
    /// Files this move created here.
    created: Vec<PathBuf>,
    vm: Option<QemuVm>,
    /// The VM's runtime folder when this move created it.
    run_dir: Option<PathBuf>,
    /// Shared-nothing: where each disk's parents go, and which are here already.
    plan: Vec<Vec<ParentPlan>>,
}

/// A parent to receive: its place, its partial name, its length and SHA-256.
type Incoming = (PathBuf, PathBuf, u64, [u8; 32]);

/// A read-only parent of an arriving disk.
struct ParentPlan {
    /// Where it goes (beside the disk's active layer).
    path: PathBuf,
    /// An identical file is there already (or arrives for another disk): nothing is sent.
    reuse: bool,
    /// As offered.
    offer: wire::LayerOffer,
}

enum Next {
    Message(Message),
    Gone(String),
}

impl Session<'_> {
    /// The next message that is not a heartbeat.
    async fn next(&mut self, timeout: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ctl.recv()).await {
                Ok(ControlEvent::Message(Message::Ping(_) | Message::Pong(_))) => {}
                Ok(ControlEvent::Message(m)) => return Next::Message(m),
                Ok(ControlEvent::Closed(why)) => return Next::Gone(why),
                Err(_) => {
                    return Next::Gone(format!(
                        "the source was silent for {} s",
                        timeout.as_secs()
                    ));
                }
            }
        }
    }

    async fn run(&mut self, move_id: MoveId, peer: &str) -> (QemuReceived, Outcome) {
        let shared: &Shared = self.shared;
        let opts = &shared.opts;
        let offer = match self.next(opts.hello_timeout).await {
            Next::Message(Message::Offer(o)) => o,
            Next::Message(Message::Cancel { reason }) => {
                return (QemuReceived::Discarded(reason), Outcome::Discarded);
            }
            Next::Message(m) => {
                return (
                    QemuReceived::Rejected(format!("expected an Offer, got {}", m.name())),
                    Outcome::Discarded,
                );
            }
            Next::Gone(why) => return (QemuReceived::Discarded(why), Outcome::Discarded),
        };
        let name = offer.definition.name.clone();
        let report = self.check(&offer).await;
        if !report.is_empty() {
            tracing::warn!(vm = %name, move_id = %move_id, peer, problems = report.len(), "an incoming QEMU move is refused");
            self.ctl.send(&Message::Incompatible {
                report: report.clone(),
            });
            return (QemuReceived::Refused(report), Outcome::Discarded);
        }
        let reuse = self
            .plan
            .iter()
            .map(|d| d.iter().map(|p| p.reuse).collect())
            .collect();
        self.ctl.send(&Message::Accepted(Accepted { reuse }));
        match self
            .next(opts.link_timeout.max(Duration::from_secs(60)))
            .await
        {
            Next::Message(Message::Prepare) => {}
            Next::Message(Message::Cancel { .. }) => {
                // A compare, or a source that changed its mind: nothing was made.
                return (QemuReceived::Refused(Vec::new()), Outcome::Discarded);
            }
            Next::Message(m) => {
                return (
                    QemuReceived::Rejected(format!("expected Prepare, got {}", m.name())),
                    Outcome::Discarded,
                );
            }
            Next::Gone(why) => return (QemuReceived::Discarded(why), Outcome::Discarded),
        }
        tracing::info!(vm = %name, move_id = %move_id, peer, "an incoming QEMU move starts");
        let validated = match self.prepare(&offer).await {
            Ok(v) => v,
            Err(reason) => return self.fail(reason).await,
        };
        self.ctl.send(&Message::Prepared);
        let Some(vm) = self.vm.clone() else {
            return self.fail("no QEMU".into()).await;
        };
        let copy = matches!(offer.storage, OfferStorage::Copy { .. });
        let disks = offer.definition.disks.len();
        let channels = offer.streams.multifd_channels;
        let run_dir = shared.host.vm_run_dir(&name);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                ev = self.ctl.recv() => match ev {
                    ControlEvent::Message(Message::Complete) => break,
                    ControlEvent::Message(Message::Ping(_) | Message::Pong(_)) => {}
                    ControlEvent::Message(Message::Cancel { reason }) => {
                        self.discard().await;
                        return (QemuReceived::Discarded(format!("the source cancelled: {reason}")), Outcome::Discarded);
                    }
                    ControlEvent::Message(m) => return self.fail(format!("unexpected {} during the move", m.name())).await,
                    ControlEvent::Closed(why) => {
                        self.discard().await;
                        return (QemuReceived::Discarded(format!("the link to the source ended: {why}")), Outcome::Discarded);
                    }
                },
                Some((kind, l)) = self.streams.recv() => {
                    let target = match kind {
                        StreamKind::Migration { index } if index <= channels => Some(run_dir.join(DEST_MIGRATION_SOCKET)),
                        StreamKind::Nbd { disk } if copy && usize::from(disk) < disks => Some(run_dir.join(DEST_NBD_SOCKET)),
                        _ => None,
                    };
                    let relays = Arc::clone(&self.relays);
                    tokio::task::spawn_blocking(move || {
                        let Some(target) = target else {
                            answer_and_close(l, &Message::Refused { reason: format!("{kind} is not part of this move") });
                            return;
                        };
                        match StdUnixStream::connect(&target) {
                            Ok(sock) => {
                                let mut l = l;
                                if wire::write_message(&mut *l.writer, &Message::StreamAccepted).is_err() {
                                    l.closer.close();
                                    return;
                                }
                                if let Ok(r) = link::relay(sock, l, &kind.to_string()) {
                                    relays.lock().unwrap_or_else(PoisonError::into_inner).push(r);
                                }
                            }
                            Err(e) => answer_and_close(l, &Message::Refused { reason: format!("QEMU does not take {kind}: {e}") }),
                        }
                    });
                }
                reason = vm.wait_exit() => {
                    return self.fail(format!("the destination's QEMU ended: {reason}")).await;
                }
                _ = tick.tick() => {
                    if self.ctl.silence() > opts.link_timeout {
                        self.discard().await;
                        return (QemuReceived::Discarded(format!("the source was silent for {} s", opts.link_timeout.as_secs())), Outcome::Discarded);
                    }
                }
            }
        }
        // Complete: the source's guest is stopped; the guest runs here, or nowhere new.
        match self.finish(&vm, copy, disks).await {
            Ok(resumed_at_us) => {
                self.ctl.send(&Message::Resumed { resumed_at_us });
                tracing::info!(vm = %name, move_id = %move_id, "the guest runs here");
                let _ = vm
                    .qmp()
                    .execute(qmp::announce_self(qmp::AnnounceParameters {
                        id: None,
                        interfaces: None,
                        initial: 50,
                        max: 550,
                        rounds: 5,
                        step: 100,
                    }))
                    .await;
                // The source's Released (not needed: the guest is ours already).
                let _ = self.next(Duration::from_secs(5)).await;
                (
                    QemuReceived::Vm(Box::new(Arrived {
                        vm,
                        validated,
                        move_id,
                        peer: peer.to_string(),
                        disks_copied: copy,
                    })),
                    Outcome::Resumed,
                )
            }
            Err(reason) => self.fail(reason).await,
        }
    }

    /// Every problem of the offer on this host; the plan of the parents.
    async fn check(&mut self, offer: &Offer) -> Vec<Problem> {
        let host = &self.shared.host;
        let def = &offer.definition;
        let mut out = Vec::new();
        let mine = &host.capabilities().version;
        let theirs = &offer.qemu_version;
        if (mine.major, mine.minor, mine.micro) < (theirs.major, theirs.minor, theirs.micro) {
            out.push(Problem {
                id: ids::QEMU_VERSION,
                message: format!(
                    "this host runs QEMU {mine}, older than the source's QEMU {theirs}: a guest cannot move to an older QEMU; update QEMU here first"
                ),
            });
        }
        let copy = match &offer.storage {
            OfferStorage::Shared => false,
            OfferStorage::Copy { disks } => {
                if disks.len() != def.disks.len() {
                    out.push(Problem {
                        id: ids::STORAGE,
                        message: format!(
                            "the offer describes {} disks for a definition with {}",
                            disks.len(),
                            def.disks.len()
                        ),
                    });
                }
                true
            }
        };
        for e in host.problems(def, copy) {
            let id = match &e {
                DefinitionError::Field { field, .. } => match field.as_str() {
                    "memory_mib" => ids::MEMORY,
                    "cpu_model" | "vcpus" | "accel" => ids::CPU,
                    "machine" => ids::MACHINE,
                    f if f.starts_with("nic") => ids::SWITCH,
                    f if f.starts_with("disk") => {
                        if copy {
                            ids::STORAGE
                        } else {
                            ids::SHARED_STORAGE
                        }
                    }
                    _ => ids::CONFIG,
                },
                _ => ids::CONFIG,
            };
            out.push(Problem {
                id,
                message: chain(&e),
            });
        }
        if usize::from(offer.streams.multifd_channels) > 16 {
            out.push(Problem {
                id: ids::CONFIG,
                message: format!(
                    "{} multifd channels asked; at most 16",
                    offer.streams.multifd_channels
                ),
            });
        }
        if let Some(free) = host.available_memory_mib() {
            if def.memory_mib > free {
                out.push(Problem {
                    id: ids::MEMORY,
                    message: format!(
                        "the VM needs {} MiB of memory and this host has {free} MiB available",
                        def.memory_mib
                    ),
                });
            }
        }
        if host.capabilities().cpu_models.contains(&def.cpu_model) {
            match host
                .cpu_unavailable_features(def.accel, &def.cpu_model)
                .await
            {
                Ok(missing) => {
                    let missing: Vec<_> = missing
                        .into_iter()
                        .filter(|f| !offer.cpu_unavailable.contains(f))
                        .collect();
                    if !missing.is_empty() {
                        out.push(Problem {
                            id: ids::CPU,
                            message: format!(
                                "CPU model {} needs features this host cannot provide with {}: {} (choose an older baseline model for the VM)",
                                def.cpu_model,
                                def.accel,
                                missing.join(", ")
                            ),
                        });
                    }
                }
                Err(e) => out.push(Problem {
                    id: ids::CPU,
                    message: format!("the CPU model could not be checked here: {}", chain(&e)),
                }),
            }
        }
        if let Ok(Attached::Running(vm)) = QemuVm::attach(host, &def.name).await {
            out.push(Problem {
                id: ids::CONFIG,
                message: format!(
                    "a VM named \"{}\" already runs on this host (QEMU pid {})",
                    def.name,
                    vm.pid()
                ),
            });
        }
        if copy {
            for (i, d) in def.disks.iter().enumerate() {
                match host.resolve_new_file(&d.path) {
                    Ok(p) if std::fs::symlink_metadata(&p).is_ok() => out.push(Problem {
                        id: ids::STORAGE,
                        message: format!(
                            "disk[{i}].path: {} already exists on this host",
                            p.display()
                        ),
                    }),
                    Ok(top) => match self.plan_parents(i, &top, offer).await {
                        Ok(plan) => self.plan.push(plan),
                        Err(message) => out.push(Problem {
                            id: ids::STORAGE,
                            message,
                        }),
                    },
                    Err(e) => out.push(Problem {
                        id: ids::STORAGE,
                        message: format!("disk[{i}].path: {}", chain(&e)),
                    }),
                }
            }
        }
        if let Some(check) = &self.shared.opts.host_check {
            out.extend(check(def));
        }
        out
    }

    /// Where disk `i`'s parents go (beside its active layer `top`, under their own names),
    /// and which are here already, identical.
    async fn plan_parents(
        &self,
        i: usize,
        top: &std::path::Path,
        offer: &Offer,
    ) -> Result<Vec<ParentPlan>, String> {
        let OfferStorage::Copy { disks } = &offer.storage else {
            return Ok(Vec::new());
        };
        let Some(d) = disks.get(i) else {
            return Ok(Vec::new());
        };
        let folder = top.parent().unwrap_or(top);
        let parents = d.layers.len().saturating_sub(1);
        let mut out: Vec<ParentPlan> = Vec::new();
        for (k, layer) in d.layers.iter().take(parents).enumerate() {
            let name = &layer.name;
            if name.is_empty()
                || name.len() > 255
                || name == "."
                || name == ".."
                || name.contains('/')
                || name.chars().any(char::is_control)
            {
                return Err(format!(
                    "disk[{i}] backing file {k}: {name:?} is not a file name"
                ));
            }
            let Some(sum) = layer.checksum else {
                return Err(format!("disk[{i}] backing file {k}: no checksum offered"));
            };
            let path = self
                .shared
                .host
                .resolve_new_file(&folder.join(name).to_string_lossy())
                .map_err(|e| format!("disk[{i}] backing file {k}: {}", chain(&e)))?;
            // The same parent for an earlier disk of this move.
            let earlier = self
                .plan
                .iter()
                .flatten()
                .chain(out.iter())
                .find(|p| p.path == path)
                .map(|p| p.offer.checksum == Some(sum));
            let reuse = match earlier {
                Some(true) => true,
                Some(false) => {
                    return Err(format!(
                        "disk[{i}] backing file {k}: two different parents would be {}",
                        path.display()
                    ));
                }
                None if std::fs::symlink_metadata(&path).is_ok() => {
                    let p = path.clone();
                    let here = tokio::task::spawn_blocking(move || crate::disk::file_checksum(&p))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
                    if here.0 != sum.0 {
                        return Err(format!(
                            "disk[{i}] backing file {k}: {} exists on this host with other contents",
                            path.display()
                        ));
                    }
                    true
                }
                None => false,
            };
            out.push(ParentPlan {
                path,
                reuse,
                offer: layer.clone(),
            });
        }
        Ok(out)
    }

    /// Receives the parents the plan copies, each on its stream, checked and made durable
    /// under a partial name, then renamed into place; backing references rewritten where the
    /// source's do not name the parent beside them.
    async fn receive_parents(&mut self) -> Result<u64, String> {
        let mut needed: HashMap<(u8, u8), Incoming> = HashMap::new();
        for (d, parents) in self.plan.iter().enumerate() {
            for (k, p) in parents.iter().enumerate() {
                if p.reuse {
                    continue;
                }
                let key = (
                    u8::try_from(d).map_err(|_| "too many disks")?,
                    u8::try_from(k).map_err(|_| "too many layers")?,
                );
                let mut partial = p.path.clone().into_os_string();
                partial.push(".vmgate-partial");
                let sum = p.offer.checksum.map(|c| c.0).unwrap_or_default();
                needed.insert(
                    key,
                    (p.path.clone(), partial.into(), p.offer.file_size, sum),
                );
            }
        }
        let mut joins = tokio::task::JoinSet::new();
        let mut bytes = 0u64;
        let mut open = needed.len();
        let link_timeout = self.shared.opts.link_timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while open > 0 {
            tokio::select! {
                Some((kind, l)) = self.streams.recv() => {
                    let job = match kind {
                        StreamKind::Parent { disk, layer } => needed.remove(&(disk, layer)),
                        _ => None,
                    };
                    match job {
                        Some((path, partial, size, sum)) => {
                            self.created.push(partial.clone());
                            joins.spawn_blocking(move || {
                                receive_parent(l, &partial, size, sum)?;
                                std::fs::rename(&partial, &path)
                                    .map_err(|e| format!("{}: {e}", path.display()))?;
                                Ok::<(PathBuf, PathBuf, u64), String>((partial, path, size))
                            });
                        }
                        None => {
                            tokio::task::spawn_blocking(move || {
                                answer_and_close(l, &Message::Refused { reason: format!("{kind} is not expected now") });
                            });
                        }
                    }
                }
                Some(done) = joins.join_next() => {
                    let (partial, path, size) = done.map_err(|e| e.to_string())??;
                    for c in &mut self.created {
                        if *c == partial {
                            c.clone_from(&path);
                        }
                    }
                    bytes += size;
                    open -= 1;
                }
                ev = self.ctl.recv() => match ev {
                    ControlEvent::Message(Message::Ping(_) | Message::Pong(_)) => {}
                    ControlEvent::Message(Message::Cancel { reason }) => return Err(format!("the source cancelled: {reason}")),
                    ControlEvent::Message(m) => return Err(format!("unexpected {} while the parents arrive", m.name())),
                    ControlEvent::Closed(why) => return Err(format!("the link to the source ended: {why}")),
                },
                _ = tick.tick() => {
                    if self.ctl.silence() > link_timeout {
                        return Err(format!("the source was silent for {} s", link_timeout.as_secs()));
                    }
                }
            }
        }
        // Each copied parent names the one beside it.
        for parents in &self.plan {
            for (k, p) in parents.iter().enumerate().skip(1) {
                let Some(below) = parents.get(k - 1) else {
                    continue;
                };
                let wanted = PathBuf::from(&below.offer.name);
                if p.reuse || p.offer.backing.as_ref() == Some(&wanted) {
                    continue;
                }
                let fmt = match below.offer.format {
                    crate::disk::DiskFormat::Raw => "raw",
                    crate::disk::DiskFormat::Qcow2 => "qcow2",
                };
                let out = tokio::process::Command::new(super::qemu_img(&self.shared.host))
                    .args(["rebase", "-u", "-b"])
                    .arg(&wanted)
                    .args(["-F", fmt])
                    .arg(&p.path)
                    .output()
                    .await
                    .map_err(|e| format!("cannot run qemu-img: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "{}: qemu-img rebase: {}",
                        p.path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        Ok(bytes)
    }

    /// Creates the disks (shared-nothing), starts QEMU waiting for the stream, opens the NBD
    /// exports.
    async fn prepare(&mut self, offer: &Offer) -> Result<ValidatedVm, String> {
        let shared: &Shared = self.shared;
        let host = &shared.host;
        let def = &offer.definition;
        if let OfferStorage::Copy { disks } = &offer.storage {
            self.receive_parents().await?;
            for (i, (d, o)) in def.disks.iter().zip(disks).enumerate() {
                let path = host
                    .resolve_new_file(&d.path)
                    .map_err(|e| format!("disk[{i}].path: {}", chain(&e)))?;
                let size = o.layers.last().map_or(0, |l| l.virtual_size);
                let parent = self
                    .plan
                    .get(i)
                    .and_then(|p| p.last())
                    .map(|p| (p.path.clone(), p.offer.format));
                create_image(
                    host,
                    &path,
                    d.format,
                    size,
                    parent.as_ref().map(|(p, f)| (p.as_path(), *f)),
                )
                .await?;
                self.created.push(path);
            }
        }
        let validated = host.validate(def).map_err(|e| chain(&e))?;
        let run_dir = host.vm_run_dir(&def.name);
        if !run_dir.exists() {
            self.run_dir = Some(run_dir.clone());
        }
        let vm = QemuVm::start(host, &validated, StartMode::Incoming)
            .await
            .map_err(|e| chain(&e))?;
        self.vm = Some(vm.clone());
        let qmp = vm.qmp();
        set_migration(qmp, offer.streams, None)
            .await
            .map_err(|e| chain(&e))?;
        qmp.execute(qmp::migrate_incoming {
            channels: None,
            exit_on_error: None,
            uri: Some(format!(
                "unix:{}",
                run_dir.join(DEST_MIGRATION_SOCKET).display()
            )),
        })
        .await
        .map_err(|e| chain(&e))?;
        if matches!(offer.storage, OfferStorage::Copy { .. }) {
            qmp.execute(qmp::nbd_server_start {
                max_connections: None,
                tls_authz: None,
                tls_creds: None,
                addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
                    data: unix_addr(&run_dir.join(DEST_NBD_SOCKET)),
                }),
            })
            .await
            .map_err(|e| chain(&e))?;
            for disk in 0..def.disks.len() {
                qmp.execute(qmp::block_export_add(qmp::BlockExportOptions::nbd {
                    base: qmp::BlockExportOptionsBase {
                        fixed_iothread: None,
                        iothread: None,
                        writable: Some(true),
                        writethrough: None,
                        id: export_id(disk),
                        node_name: crate::qemu::cmdline::disk_node(disk),
                    },
                    nbd: qmp::BlockExportOptionsNbd {
                        base: qmp::BlockExportOptionsNbdBase {
                            description: None,
                            name: Some(export_name(disk)),
                        },
                        allocation_depth: None,
                        bitmaps: None,
                    },
                }))
                .await
                .map_err(|e| chain(&e))?;
            }
        }
        Ok(validated)
    }

    /// After Complete: the stream in, the exports gone, the guest running. The RESUME time.
    async fn finish(&mut self, vm: &QemuVm, copy: bool, disks: usize) -> Result<u64, String> {
        let deadline = Instant::now() + self.shared.opts.handoff_timeout;
        loop {
            match vm.state().await {
                VmState::Paused => break,
                VmState::Incoming | VmState::Other(_) => {}
                VmState::Off(r) => return Err(format!("the destination's QEMU ended: {r}")),
                s => return Err(format!("the destination's QEMU is {s:?} after the stream")),
            }
            if Instant::now() > deadline {
                return Err("the migration stream did not complete here in time".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let qmp = vm.qmp();
        if let Ok(info) = qmp.execute(qmp::query_migrate {}).await {
            if info.status != Some(qmp::MigrationStatus::completed) {
                return Err(format!(
                    "the incoming migration ended as {:?}: {}",
                    info.status,
                    info.error_desc.unwrap_or_default()
                ));
            }
        }
        if copy {
            for disk in 0..disks {
                qmp.execute(qmp::block_export_del {
                    mode: Some(qmp::BlockExportRemoveMode::hard),
                    id: export_id(disk),
                })
                .await
                .map_err(|e| chain(&e))?;
            }
            qmp.execute(qmp::nbd_server_stop {})
                .await
                .map_err(|e| chain(&e))?;
        }
        let mut events = vm.events();
        vm.resume().await.map_err(|e| chain(&e))?;
        let wait = Instant::now() + Duration::from_secs(10);
        while Instant::now() < wait {
            match tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
                Ok(Ok(e)) if e.name == "RESUME" => return Ok(e.timestamp_us.unwrap_or(0)),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                _ => {}
            }
        }
        if vm.state().await == VmState::Running {
            Ok(0)
        } else {
            Err("the guest did not resume here".into())
        }
    }

    /// Tells the source, discards everything.
    async fn fail(&mut self, reason: String) -> (QemuReceived, Outcome) {
        tracing::warn!(reason = %reason, "an incoming QEMU move failed; discarding it");
        self.discard().await;
        self.ctl.send(&Message::Failed {
            reason: reason.clone(),
        });
        (QemuReceived::Discarded(reason), Outcome::Discarded)
    }

    /// Quits the QEMU this move started and removes every file and folder it created.
    async fn discard(&mut self) {
        for r in self
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            r.abort();
        }
        if let Some(vm) = self.vm.take() {
            if let Err(e) = vm.power_off().await {
                tracing::error!(vm = %vm.name(), error = %chain(&e), "the incoming QEMU did not quit");
            }
        }
        for f in self.created.drain(..) {
            if let Err(e) = std::fs::remove_file(&f) {
                tracing::warn!(path = %f.display(), error = %e, "a file of a discarded move could not be removed");
            }
        }
        if let Some(d) = self.run_dir.take() {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

/// Receives one parent file on its stream (blocking): chunks until the end marker, at most
/// `size` bytes, written to `partial` (created, never overwritten), made durable, checked
/// against its SHA-256; then StreamDone.
fn receive_parent(
    mut l: Link,
    partial: &std::path::Path,
    size: u64,
    sum: [u8; 32],
) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let result = (|| {
        wire::write_message(&mut *l.writer, &Message::StreamAccepted).map_err(|e| chain(&e))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = Vec::new();
        loop {
            match wire::read_chunk_len(&mut *l.reader) {
                Ok(Some(n)) => {
                    total += n as u64;
                    if total > size {
                        return Err(format!("more than the {size} bytes offered arrived"));
                    }
                    buf.resize(n, 0);
                    l.reader
                        .read_exact(&mut buf)
                        .map_err(|e| format!("the parent's stream broke: {e}"))?;
                    hasher.update(&buf);
                    f.write_all(&buf)
                        .map_err(|e| format!("{}: {e}", partial.display()))?;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("the parent's stream broke: {}", chain(&e))),
            }
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        if total != size {
            return Err(format!("{total} bytes arrived of the {size} offered"));
        }
        if hasher.finalize().as_slice() != sum.as_slice() {
            return Err("the parent arrived with another SHA-256 than offered".into());
        }
        wire::write_message(&mut *l.writer, &Message::StreamDone).map_err(|e| chain(&e))?;
        Ok(())
    })();
    if let Err(e) = &result {
        let _ = wire::write_message(&mut *l.writer, &Message::Refused { reason: e.clone() });
    }
    l.closer.close();
    result
}
