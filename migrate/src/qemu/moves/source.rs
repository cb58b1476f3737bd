//! The source's side of a QEMU move (see the module documentation).

use std::collections::VecDeque;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use qapi::qmp;
use tokio::net::UnixListener;

use super::link::{self, Control, ControlEvent, Relay};
use super::wire::{
    self, DiskOffer, Hello, LayerOffer, Message, MoveId, Offer, OfferStorage, Outcome, Purpose,
    StreamKind, StreamSettings, VERSION, WireCompression,
};
use super::{
    CancelToken, Dialer, Link, MoveError, MoveStats, Phase, Progress, active_node, chain,
    mirror_job, mirror_target, set_migration, unix_addr, wait_jobs_gone,
};
use crate::qemu::{QemuHost, QemuVm, ValidatedVm, VmState};

/// Where the VM's disks go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveStorage {
    /// They stay where they are, on storage both hosts see (the destination opens the same
    /// paths; QEMU's image locking hands them over).
    Shared,
    /// Copied to the destination while the guest runs (shared-nothing): per disk, the path of
    /// its active layer at the destination (relative: to the destination's first storage
    /// root). Read-only parents go beside it, under their own names (reused when an
    /// identical file is there already).
    Copy {
        /// Per disk, in the definition's order.
        disks: Vec<String>,
        /// Keep the source's files after the move.
        keep_source: bool,
    },
}

/// How a QEMU move runs (the source's side).
#[derive(Clone, Debug)]
pub struct QemuMoveOptions {
    /// Where the disks go.
    pub storage: MoveStorage,
    /// multifd channels (0: one migration connection; each channel is one more connection,
    /// each on its own link).
    pub multifd_channels: u8,
    /// multifd's compression (needs multifd).
    pub compression: WireCompression,
    /// QEMU's max-bandwidth (bytes/s) and the mirrors' speed; `None`: unlimited.
    pub bandwidth_limit: Option<u64>,
    /// QEMU's downtime-limit.
    pub downtime_target: Duration,
    /// QEMU's auto-converge.
    pub auto_converge: bool,
    /// Give up (the VM stays here) when the move has not completed after this long.
    pub converge_timeout: Duration,
    /// Declare the link lost after this long without hearing from the peer.
    pub link_timeout: Duration,
    /// The longest the source waits for the destination to run the guest after Complete.
    pub handoff_timeout: Duration,
    /// Our software ("vmgate 0.1.0").
    pub software: String,
    /// Virtual switch renames `(from, to)` (names compared without case); MACs unchanged.
    pub switch_map: Vec<(String, String)>,
}

impl Default for QemuMoveOptions {
    fn default() -> QemuMoveOptions {
        QemuMoveOptions {
            storage: MoveStorage::Shared,
            multifd_channels: 0,
            compression: WireCompression::None,
            bandwidth_limit: None,
            downtime_target: Duration::from_millis(300),
            auto_converge: true,
            converge_timeout: Duration::from_secs(600),
            link_timeout: Duration::from_secs(15),
            handoff_timeout: Duration::from_secs(60),
            software: concat!("vmgate ", env!("CARGO_PKG_VERSION")).into(),
            switch_map: Vec::new(),
        }
    }
}

/// Why a step stopped.
enum Stop {
    /// The user cancelled.
    Cancelled(String),
    /// The destination cancelled or failed.
    Peer(String),
    /// The link failed or went silent.
    Lost(String),
    /// Something here failed.
    Failed(&'static str, String),
}

impl Stop {
    fn into_error(self) -> MoveError {
        match self {
            Stop::Cancelled(reason) => MoveError::Cancelled { reason },
            Stop::Peer(cause) => MoveError::Failed {
                phase: "moving (the destination gave up)",
                cause,
            },
            Stop::Lost(cause) => MoveError::Failed {
                phase: "moving",
                cause,
            },
            Stop::Failed(phase, cause) => MoveError::Failed { phase, cause },
        }
    }

    fn reason(&self) -> String {
        match self {
            Stop::Cancelled(r) => format!("cancelled on the source: {r}"),
            Stop::Peer(r) | Stop::Lost(r) => r.clone(),
            Stop::Failed(p, r) => format!("the source failed while {p}: {r}"),
        }
    }
}

type SharedDialer = Arc<Mutex<Box<dyn Dialer>>>;

/// The control link and what interrupts a step.
struct Guard<'a> {
    ctl: Control,
    cancel: &'a CancelToken,
    link_timeout: Duration,
    pending: VecDeque<Message>,
    cancellable: bool,
}

impl Guard<'_> {
    /// Runs `fut` until it ends, or the move is interrupted.
    async fn run<T>(&mut self, fut: impl Future<Output = T>) -> Result<T, Stop> {
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                v = &mut fut => return Ok(v),
                ev = self.ctl.recv() => self.event(ev)?,
                _ = tick.tick() => self.check()?,
            }
        }
    }

    /// The next message that is not a heartbeat, within `timeout`.
    async fn expect(&mut self, timeout: Duration) -> Result<Message, Stop> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ev = self.ctl.recv() => {
                    self.event(ev)?;
                    if let Some(m) = self.pending.pop_front() {
                        return Ok(m);
                    }
                }
                _ = tick.tick() => {
                    self.check()?;
                    if tokio::time::Instant::now() > deadline {
                        return Err(Stop::Lost(format!(
                            "the destination did not answer within {} s",
                            timeout.as_secs()
                        )));
                    }
                }
            }
        }
    }

    fn event(&mut self, ev: ControlEvent) -> Result<(), Stop> {
        match ev {
            ControlEvent::Message(Message::Ping(_) | Message::Pong(_)) => Ok(()),
            ControlEvent::Message(Message::Failed { reason } | Message::Cancel { reason }) => {
                Err(Stop::Peer(format!("the destination gave up: {reason}")))
            }
            ControlEvent::Message(m) => {
                self.pending.push_back(m);
                Ok(())
            }
            ControlEvent::Closed(why) => Err(Stop::Lost(format!(
                "the link to the destination ({}) ended: {why}",
                self.ctl.peer
            ))),
        }
    }

    fn check(&self) -> Result<(), Stop> {
        if self.cancellable && self.cancel.is_cancelled() {
            return Err(Stop::Cancelled(self.cancel.reason()));
        }
        let silent = self.ctl.silence();
        if silent > self.link_timeout {
            return Err(Stop::Lost(format!(
                "the destination ({}) was silent for {} s",
                self.ctl.peer,
                silent.as_secs()
            )));
        }
        Ok(())
    }
}

/// Sends a Ping every second on the control link until aborted.
pub(super) fn heartbeat(
    out: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    pong: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(out) = out else { return };
        let mut n = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n += 1;
            let m = if pong {
                Message::Pong(n)
            } else {
                Message::Ping(n)
            };
            let Ok(frame) = wire::encode(&m) else { return };
            if out.send(frame).is_err() {
                return;
            }
        }
    })
}

/// Opens a stream link of a move (blocking).
fn open_stream(
    dialer: &SharedDialer,
    move_id: MoveId,
    stream: StreamKind,
    software: &str,
    timeout: Duration,
) -> Result<Link, String> {
    let mut l = dialer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .dial()
        .map_err(|e| format!("cannot open a link for {stream}: {e}"))?;
    wire::write_message(
        &mut *l.writer,
        &Message::Hello(Hello {
            version: VERSION,
            software: software.to_string(),
            purpose: Purpose::Stream { move_id, stream },
        }),
    )
    .map_err(|e| format!("{stream}: {}", chain(&e)))?;
    match link::first_message(l, timeout) {
        Ok((Message::StreamAccepted, l)) => Ok(l),
        Ok((Message::Refused { reason }, _)) => {
            Err(format!("the destination refused {stream}: {reason}"))
        }
        Ok((m, l)) => {
            l.closer.close();
            Err(format!(
                "the destination answered {stream} with {}",
                m.name()
            ))
        }
        Err(e) => Err(format!("{stream}: {}", chain(&e))),
    }
}

/// What the stream links of a move share.
#[derive(Clone)]
struct Streams {
    dialer: SharedDialer,
    move_id: MoveId,
    relays: Arc<Mutex<Vec<Relay>>>,
    /// The first failure to set up a stream.
    failure: Arc<Mutex<Option<String>>>,
    software: String,
    timeout: Duration,
}

/// Carries each connection QEMU makes to `listener` on its own stream link.
fn serve_streams(
    listener: UnixListener,
    streams: Streams,
    kind: impl Fn(u8) -> Option<StreamKind> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut index = 0u8;
        while let Ok((s, _)) = listener.accept().await {
            let Some(stream) = kind(index) else {
                // More connections than the move set up: not ours to carry.
                continue;
            };
            index = index.saturating_add(1);
            let Ok(sock) = s.into_std() else { continue };
            if sock.set_nonblocking(false).is_err() {
                continue;
            }
            let st = streams.clone();
            tokio::task::spawn_blocking(move || {
                let fail = |msg: String| {
                    st.failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(msg);
                };
                match open_stream(&st.dialer, st.move_id, stream, &st.software, st.timeout) {
                    Ok(l) => match link::relay(sock, l, &stream.to_string()) {
                        Ok(r) => st
                            .relays
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(r),
                        Err(e) => fail(format!("{stream}: {e}")),
                    },
                    Err(e) => {
                        let _ = StdUnixStream::shutdown(&sock, std::net::Shutdown::Both);
                        fail(e);
                    }
                }
            });
        }
    })
}

/// What the source set up, undone on a failure.
#[derive(Default)]
struct Undo {
    mirrors: Vec<usize>,
    migrating: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

/// The Offer for a VM.
async fn offer(
    host: &QemuHost,
    vm: &QemuVm,
    validated: &ValidatedVm,
    opts: &QemuMoveOptions,
) -> Result<Offer, MoveError> {
    let mut definition = validated.definition().clone();
    definition.machine = Some(validated.machine_type().to_string());
    for nic in &mut definition.nics {
        if let Some((_, to)) = opts
            .switch_map
            .iter()
            .find(|(from, _)| from.eq_ignore_ascii_case(&nic.switch))
        {
            nic.switch.clone_from(to);
        }
    }
    let storage = match &opts.storage {
        MoveStorage::Shared => OfferStorage::Shared,
        MoveStorage::Copy { disks, .. } => {
            if disks.len() != definition.disks.len() {
                return Err(MoveError::Failed {
                    phase: "preparing",
                    cause: format!(
                        "the VM has {} disks and the move names {} destination paths",
                        definition.disks.len(),
                        disks.len()
                    ),
                });
            }
            let mut offers = Vec::new();
            for ((d, target), resolved) in definition
                .disks
                .iter_mut()
                .zip(disks)
                .zip(validated.disks())
            {
                d.path.clone_from(target);
                let top = resolved.layers.first();
                let mut layers = Vec::new();
                for parent in resolved.layers.iter().skip(1).rev() {
                    layers.push(parent_offer(host, &parent.path, parent.format).await?);
                }
                layers.push(LayerOffer {
                    name: std::path::Path::new(target)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    format: d.format,
                    virtual_size: resolved.virtual_size,
                    file_size: 0,
                    allocated_bytes: top
                        .and_then(|l| std::fs::metadata(&l.path).ok())
                        .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512),
                    checksum: None,
                    backing: None,
                });
                offers.push(DiskOffer { layers });
            }
            OfferStorage::Copy { disks: offers }
        }
    };
    let cpu_unavailable = host
        .cpu_unavailable_features(definition.accel, &definition.cpu_model)
        .await
        .unwrap_or_default();
    Ok(Offer {
        definition,
        qemu_version: vm.qemu_version().clone(),
        cpu_unavailable,
        storage,
        streams: StreamSettings {
            multifd_channels: opts.multifd_channels,
            compression: opts.compression,
        },
    })
}

/// A read-only parent as offered: its name, size, SHA-256 and backing reference as written.
async fn parent_offer(
    host: &QemuHost,
    path: &std::path::Path,
    format: crate::disk::DiskFormat,
) -> Result<LayerOffer, MoveError> {
    let failed = |cause: String| MoveError::Failed {
        phase: "reading the disks' parents",
        cause: format!("{}: {cause}", path.display()),
    };
    let p = path.to_path_buf();
    let checksum = tokio::task::spawn_blocking(move || crate::disk::file_checksum(&p))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(chain(&e)))?;
    let file_size = std::fs::metadata(path)
        .map_err(|e| failed(e.to_string()))?
        .len();
    let info = tokio::process::Command::new(super::qemu_img(host))
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
    let virtual_size = info
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let backing = info
        .get("backing-filename")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from);
    Ok(LayerOffer {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format,
        virtual_size,
        file_size,
        allocated_bytes: file_size,
        checksum: Some(wire::Checksum(checksum.0)),
        backing,
    })
}

/// Sends a parent file on its own stream link (blocking): chunks, the end marker, then the
/// destination's StreamDone once it checked the file.
fn send_parent(
    st: &Streams,
    disk: u8,
    layer: u8,
    path: &std::path::Path,
    sent: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let stream = StreamKind::Parent { disk, layer };
    let mut l = open_stream(&st.dialer, st.move_id, stream, &st.software, st.timeout)?;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; 4 + (1 << 20)];
    loop {
        let n = f
            .read(buf.get_mut(4..).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        let len = u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        if let Some(h) = buf.get_mut(..4) {
            h.copy_from_slice(&len);
        }
        l.writer
            .write_all(buf.get(..4 + n).unwrap_or_default())
            .map_err(|e| format!("sending {stream}: {e}"))?;
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    l.writer
        .write_all(&wire::END_OF_STREAM)
        .and_then(|()| l.writer.flush())
        .map_err(|e| format!("sending {stream}: {e}"))?;
    match link::first_message(l, Duration::from_secs(600)) {
        Ok((Message::StreamDone, l)) => {
            l.closer.close();
            Ok(())
        }
        Ok((Message::Refused { reason }, _)) => Err(format!("{stream}: {reason}")),
        Ok((m, l)) => {
            l.closer.close();
            Err(format!("{stream}: the destination answered {}", m.name()))
        }
        Err(e) => Err(format!("{stream}: {}", chain(&e))),
    }
}

/// Setup: Hello, Welcome, Offer, the destination's verdict. `Ok(Err(report))`: incompatible.
async fn setup(
    g: &mut Guard<'_>,
    offer: Offer,
    software: &str,
) -> Result<Result<(MoveId, Vec<Vec<bool>>), Vec<(u32, String)>>, MoveError> {
    g.ctl.send(&Message::Hello(Hello {
        version: VERSION,
        software: software.to_string(),
        purpose: Purpose::Move,
    }));
    let timeout = Duration::from_secs(60);
    let move_id = match g.expect(timeout).await.map_err(Stop::into_error)? {
        Message::Welcome(w) => w.move_id,
        Message::VersionRefused(v) => {
            return Err(MoveError::VersionRefused {
                source_software: software.to_string(),
                source_version: VERSION,
                destination_software: v.software,
                destination_min: v.min,
                destination: v.max,
            });
        }
        Message::Refused { reason } => {
            return Err(MoveError::Failed {
                phase: "setting up",
                cause: format!("the destination refused the move: {reason}"),
            });
        }
        m => {
            return Err(MoveError::Failed {
                phase: "setting up",
                cause: format!("the destination answered Hello with {}", m.name()),
            });
        }
    };
    g.ctl.send(&Message::Offer(Box::new(offer)));
    match g.expect(timeout).await.map_err(Stop::into_error)? {
        Message::Accepted(a) => Ok(Ok((move_id, a.reuse))),
        Message::Incompatible { report } => {
            Ok(Err(report.into_iter().map(|p| (p.id, p.message)).collect()))
        }
        m => Err(MoveError::Failed {
            phase: "setting up",
            cause: format!("the destination answered the offer with {}", m.name()),
        }),
    }
}

/// Hyper-V's Compare-VM: the destination's whole report for this VM and these options
/// (empty: it could take it). Nothing is started or created anywhere; the VM keeps running.
pub async fn compare_vm(
    host: &QemuHost,
    vm: &QemuVm,
    validated: &ValidatedVm,
    control: Link,
    opts: &QemuMoveOptions,
) -> Result<Vec<(u32, String)>, MoveError> {
    let cancel = CancelToken::new();
    let mut g = Guard {
        ctl: Control::new(control),
        cancel: &cancel,
        link_timeout: opts.link_timeout,
        pending: VecDeque::new(),
        cancellable: false,
    };
    let offer = offer(host, vm, validated, opts).await?;
    let verdict = setup(&mut g, offer, &opts.software).await;
    g.ctl.send(&Message::Cancel {
        reason: "a compare only".into(),
    });
    g.ctl.finish(Duration::from_secs(2));
    match verdict? {
        Ok(_) => Ok(Vec::new()),
        Err(report) => Ok(report),
    }
}

/// Moves a running (or paused) QEMU VM to the destination behind `control` (a link of the
/// QEMU move protocol: the daemon's authenticated channel). `dialer` opens the stream links
/// to the same destination. On success the guest runs at the destination and this host's
/// QEMU has been quit; on an error (but [`MoveError::InDoubt`]) the guest runs here, on its
/// own disks, and nothing of the move is left at the destination.
#[allow(
    clippy::too_many_arguments,
    reason = "the daemon's entry point, each argument a role"
)]
pub async fn move_vm(
    host: &QemuHost,
    vm: &QemuVm,
    validated: &ValidatedVm,
    control: Link,
    dialer: Box<dyn Dialer>,
    opts: &QemuMoveOptions,
    cancel: &CancelToken,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<MoveStats, MoveError> {
    let started = Instant::now();
    let was_running = vm.state().await == VmState::Running;
    let mut stats = MoveStats {
        channels: u16::from(opts.multifd_channels.max(1)),
        ..MoveStats::default()
    };
    let report = |phase: Phase, p: &mut dyn FnMut(&Progress)| {
        p(&Progress {
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
    };
    report(Phase::Setup, progress);
    let mut g = Guard {
        ctl: Control::new(control),
        cancel,
        link_timeout: opts.link_timeout,
        pending: VecDeque::new(),
        cancellable: true,
    };
    let beat = heartbeat(g.ctl.sender(), false);
    let offer = offer(host, vm, validated, opts).await?;
    let copy = matches!(offer.storage, OfferStorage::Copy { .. });
    let reuse: Vec<Vec<bool>>;
    let move_id = match setup(&mut g, offer, &opts.software).await {
        Ok(Ok((id, r))) => {
            reuse = r;
            id
        }
        Ok(Err(report)) => {
            beat.abort();
            g.ctl.finish(Duration::from_secs(2));
            return Err(MoveError::Incompatible { report });
        }
        Err(e) => {
            beat.abort();
            g.ctl.abort();
            return Err(e);
        }
    };
    tracing::info!(vm = %vm.name(), move_id = %move_id, "the destination accepted the move");

    let dialer: SharedDialer = Arc::new(Mutex::new(dialer));
    let relays: Arc<Mutex<Vec<Relay>>> = Arc::default();
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let mut undo = Undo::default();
    let mut events = vm.events();
    let streams = Streams {
        dialer: Arc::clone(&dialer),
        move_id,
        relays: Arc::clone(&relays),
        failure: Arc::clone(&failure),
        software: opts.software.clone(),
        timeout: opts.link_timeout,
    };

    let run = async {
        g.ctl.send(&Message::Prepare);
        // Read-only parents the destination does not have, each on its own stream.
        if copy {
            let parent_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
            for (disk, d) in validated.disks().iter().enumerate() {
                let parents: Vec<_> = d.layers.iter().skip(1).rev().collect();
                for (layer, p) in parents.into_iter().enumerate() {
                    let reused = reuse
                        .get(disk)
                        .and_then(|r| r.get(layer))
                        .copied()
                        .unwrap_or(false);
                    if reused {
                        stats.disk_bytes_reused += std::fs::metadata(&p.path).map_or(0, |m| m.len());
                        continue;
                    }
                    let (st, path, counter) = (streams.clone(), p.path.clone(), Arc::clone(&parent_bytes));
                    let (dk, ly) = (
                        u8::try_from(disk).unwrap_or(u8::MAX),
                        u8::try_from(layer).unwrap_or(u8::MAX),
                    );
                    g.run(tokio::task::spawn_blocking(move || send_parent(&st, dk, ly, &path, &counter)))
                        .await?
                        .map_err(|e| Stop::Failed("copying the disks' parents", e.to_string()))?
                        .map_err(|e| Stop::Failed("copying the disks' parents", e))?;
                }
            }
            stats.disk_parent_bytes_sent = parent_bytes.load(Ordering::Relaxed);
        }
        match g.expect(opts.handoff_timeout).await? {
            Message::Prepared => {}
            m => {
                return Err(Stop::Failed(
                    "setting up",
                    format!("the destination answered Prepare with {}", m.name()),
                ));
            }
        }
        stats.setup_ms = started.elapsed().as_secs_f64() * 1e3;
        let run_dir = vm.runtime_paths().dir.clone();

        // Disks: one mirror per disk into the destination's export.
        if copy {
            for disk in 0..validated.disks().len() {
                let sock = run_dir.join(super::source_nbd_socket(disk));
                let _ = std::fs::remove_file(&sock);
                let listener = UnixListener::bind(&sock)
                    .map_err(|e| Stop::Failed("copying the disks", format!("{}: {e}", sock.display())))?;
                undo.sockets.push(sock.clone());
                let d = u8::try_from(disk).unwrap_or(u8::MAX);
                undo.tasks.push(serve_streams(listener, streams.clone(), move |i| {
                    (i < 8).then_some(StreamKind::Nbd { disk: d })
                }));
                let qmp = vm.qmp();
                let fail = |e: crate::qemu::QmpError| Stop::Failed("copying the disks", chain(&e));
                let source_node = g.run(active_node(qmp, disk)).await?.map_err(fail)?;
                g.run(qmp.execute(qmp::blockdev_add(qmp::BlockdevOptions::nbd {
                    base: qmp::BlockdevOptionsBase {
                        auto_read_only: None,
                        cache: None,
                        detect_zeroes: None,
                        discard: None,
                        force_share: None,
                        node_name: Some(mirror_target(disk)),
                        read_only: None,
                    },
                    nbd: qmp::BlockdevOptionsNbd {
                        export: Some(super::export_name(disk)),
                        open_timeout: None,
                        reconnect_delay: None,
                        tls_creds: None,
                        tls_hostname: None,
                        x_dirty_bitmap: None,
                        server: qmp::SocketAddress::unix(unix_addr(&sock)),
                    },
                })))
                .await?
                .map_err(fail)?;
                undo.mirrors.push(disk);
                g.run(qmp.execute(qmp::blockdev_mirror {
                    auto_dismiss: Some(true),
                    auto_finalize: None,
                    buf_size: None,
                    copy_mode: Some(qmp::MirrorCopyMode::write_blocking),
                    filter_node_name: None,
                    granularity: None,
                    job_id: Some(mirror_job(disk)),
                    on_source_error: None,
                    on_target_error: None,
                    replaces: None,
                    speed: opts.bandwidth_limit.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
                    device: source_node,
                    // The parents are there already: only the active layer's data.
                    sync: if validated.disks()[disk].layers.len() > 1 {
                        qmp::MirrorSyncMode::top
                    } else {
                        qmp::MirrorSyncMode::full
                    },
                    target: mirror_target(disk),
                }))
                .await?
                .map_err(fail)?;
            }
            // Until every mirror is in sync.
            let deadline = Instant::now() + opts.converge_timeout;
            loop {
                let jobs = g
                    .run(vm.qmp().execute(qmp::query_block_jobs {}))
                    .await?
                    .map_err(|e| Stop::Failed("copying the disks", chain(&e)))?;
                let mut ready = 0usize;
                let (mut done, mut total) = (0u64, 0u64);
                for disk in &undo.mirrors {
                    let job = jobs.iter().find_map(|j| match j {
                        qmp::BlockJobInfo::mirror { base, .. } if base.device == mirror_job(*disk) => {
                            Some(base)
                        }
                        _ => None,
                    });
                    let Some(job) = job else {
                        let why = failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone()
                            .unwrap_or_else(|| "the block mirror ended before it was in sync".into());
                        return Err(Stop::Failed("copying the disks", format!("disk {disk}: {why}")));
                    };
                    if let Some(e) = &job.error {
                        return Err(Stop::Failed("copying the disks", format!("disk {disk}: {e}")));
                    }
                    done += u64::try_from(job.offset).unwrap_or(0);
                    total += u64::try_from(job.len).unwrap_or(0);
                    if job.ready {
                        ready += 1;
                    }
                }
                progress(&Progress {
                    phase: Phase::PreCopy,
                    round: 0,
                    bytes_sent: done,
                    bytes_remaining: total.saturating_sub(done),
                    rate_bytes_s: done as f64 / started.elapsed().as_secs_f64().max(1e-3),
                    dirty_rate_bytes_s: 0.0,
                    expected_downtime_ms: 0.0,
                    throttle_percent: 0,
                    converging: true,
                });
                if ready == undo.mirrors.len() {
                    stats.disk_bytes_sent = done + stats.disk_parent_bytes_sent;
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Stop::Failed(
                        "copying the disks",
                        format!("the mirror was not in sync after {} s", opts.converge_timeout.as_secs()),
                    ));
                }
                g.run(tokio::time::sleep(Duration::from_millis(200))).await?;
            }
        }

        // Memory.
        let settings = StreamSettings {
            multifd_channels: opts.multifd_channels,
            compression: opts.compression,
        };
        g.run(set_migration(vm.qmp(), settings, Some(opts)))
            .await?
            .map_err(|e| Stop::Failed("setting up the migration", chain(&e)))?;
        let sock = run_dir.join(super::SOURCE_MIGRATION_SOCKET);
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| Stop::Failed("setting up the migration", format!("{}: {e}", sock.display())))?;
        undo.sockets.push(sock.clone());
        let connections = opts.multifd_channels;
        undo.tasks.push(serve_streams(listener, streams.clone(), move |i| {
            (i <= connections).then_some(StreamKind::Migration { index: i })
        }));
        undo.migrating = true;
        g.run(vm.qmp().execute(qmp::migrate {
            channels: None,
            detach: None,
            resume: None,
            uri: Some(format!("unix:{}", sock.display())),
        }))
        .await?
        .map_err(|e| Stop::Failed("starting the migration", chain(&e)))?;
        let deadline = Instant::now() + opts.converge_timeout;
        loop {
            let info = g
                .run(vm.qmp().execute(qmp::query_migrate {}))
                .await?
                .map_err(|e| Stop::Failed("migrating", chain(&e)))?;
            if let Some(ram) = &info.ram {
                let page = u64::try_from(ram.page_size).unwrap_or(4096);
                stats.rounds = u32::try_from(ram.dirty_sync_count).unwrap_or(0);
                progress(&Progress {
                    phase: Phase::PreCopy,
                    round: stats.rounds,
                    bytes_sent: u64::try_from(ram.transferred).unwrap_or(0),
                    bytes_remaining: u64::try_from(ram.remaining).unwrap_or(0),
                    rate_bytes_s: ram.mbps * 1e6 / 8.0,
                    dirty_rate_bytes_s: ram.dirty_pages_rate as f64 * page as f64,
                    expected_downtime_ms: info.expected_downtime.unwrap_or(0) as f64,
                    throttle_percent: u32::try_from(info.cpu_throttle_percentage.unwrap_or(0))
                        .unwrap_or(0),
                    converging: true,
                });
                stats.max_throttle_percent = stats
                    .max_throttle_percent
                    .max(u32::try_from(info.cpu_throttle_percentage.unwrap_or(0)).unwrap_or(0));
            }
            match info.status {
                Some(qmp::MigrationStatus::completed) => {
                    if let Some(ram) = &info.ram {
                        stats.pages_sent = u64::try_from(ram.normal).unwrap_or(0);
                        stats.zero_pages = u64::try_from(ram.duplicate).unwrap_or(0);
                    }
                    stats.downtime_ms = info.downtime.unwrap_or(0) as f64;
                    break;
                }
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    let carried = failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone()
                        .or_else(|| {
                            relays
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .iter()
                                .find_map(|r| match r.ended() {
                                    Some(link::RelayEnd::Failed(why)) => Some(why),
                                    _ => None,
                                })
                        });
                    let cause = match (info.error_desc, carried) {
                        (Some(q), Some(c)) => format!("{q} ({c})"),
                        (Some(q), None) => q,
                        (None, Some(c)) => c,
                        (None, None) => "QEMU's migration failed".into(),
                    };
                    return Err(Stop::Failed("migrating", cause));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Stop::Failed(
                    "migrating",
                    format!(
                        "the migration did not complete within {} s (the guest dirties its memory faster than the link carries it; raise the downtime target or the bandwidth, or enable auto-converge)",
                        opts.converge_timeout.as_secs()
                    ),
                ));
            }
            g.run(tokio::time::sleep(Duration::from_millis(100))).await?;
        }
        report(Phase::Switchover, progress);
        // The guest is stopped here: the mirrors finish without switching (the destination
        // is in sync), and their NBD connections close.
        if copy {
            let qmp = vm.qmp();
            for disk in &undo.mirrors {
                g.run(qmp.execute(qmp::block_job_cancel {
                    force: None,
                    device: mirror_job(*disk),
                }))
                .await?
                .map_err(|e| Stop::Failed("finishing the disks' copy", chain(&e)))?;
            }
            let jobs: Vec<String> = undo.mirrors.iter().map(|d| mirror_job(*d)).collect();
            g.run(wait_jobs_gone(qmp, &jobs, Duration::from_secs(60)))
                .await?
                .map_err(|e| Stop::Failed("finishing the disks' copy", e))?;
            for disk in std::mem::take(&mut undo.mirrors) {
                g.run(qmp.execute(qmp::blockdev_del {
                    node_name: mirror_target(disk),
                }))
                .await?
                .map_err(|e| Stop::Failed("finishing the disks' copy", chain(&e)))?;
            }
        }
        Ok(())
    }
    .await;

    let stop_us = {
        let mut at = None;
        while let Ok(e) = events.try_recv() {
            if e.name == "STOP" {
                at = e.timestamp_us;
            }
        }
        at
    };
    let on_wire = |relays: &Arc<Mutex<Vec<Relay>>>| {
        relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|r| r.up.load(Ordering::Relaxed))
            .sum::<u64>()
    };

    if let Err(stop) = run {
        tracing::warn!(vm = %vm.name(), move_id = %move_id, reason = %stop.reason(), "the move stops; the guest stays here");
        g.ctl.send(&Message::Cancel {
            reason: stop.reason(),
        });
        roll_back(vm, &mut undo, was_running).await;
        for r in relays.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            r.abort();
        }
        beat.abort();
        g.ctl.finish(Duration::from_secs(2));
        report(
            if matches!(stop, Stop::Cancelled(_)) {
                Phase::Cancelled
            } else {
                Phase::Failed
            },
            progress,
        );
        return Err(stop.into_error());
    }

    // Complete: the destination decides from here.
    g.cancellable = false;
    g.ctl.send(&Message::Complete);
    report(Phase::Handoff, progress);
    let answer = g.expect(opts.handoff_timeout).await;
    let resumed_at = match answer {
        Ok(Message::Resumed { resumed_at_us }) => Ok(resumed_at_us),
        Ok(m) => Err(Some(format!(
            "the destination answered Complete with {}",
            m.name()
        ))),
        Err(Stop::Peer(reason)) => Err(Some(reason)),
        Err(Stop::Lost(cause) | Stop::Cancelled(cause) | Stop::Failed(_, cause)) => {
            // Ask on a new link how the move ended.
            let d = Arc::clone(&dialer);
            let software = opts.software.clone();
            let timeout = opts.link_timeout;
            let asked = tokio::task::spawn_blocking(move || query(&d, move_id, &software, timeout))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match asked {
                Ok(Outcome::Resumed) => Ok(0),
                Ok(Outcome::Discarded | Outcome::Unknown) => Err(Some(format!(
                    "the link broke during the handoff ({cause}) and the destination discarded the guest"
                ))),
                Err(e) => {
                    beat.abort();
                    g.ctl.abort();
                    for r in relays.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                        r.abort();
                    }
                    for t in undo.tasks.drain(..) {
                        t.abort();
                    }
                    return Err(MoveError::InDoubt {
                        cause: format!("{cause}; asking again: {e}"),
                    });
                }
            }
        }
    };
    for t in undo.tasks.drain(..) {
        t.abort();
    }
    for s in undo.sockets.drain(..) {
        let _ = std::fs::remove_file(s);
    }
    let resumed_at = match resumed_at {
        Ok(at) => at,
        Err(cause) => {
            // The destination will never run it: the guest goes on here.
            let _ = vm.qmp().execute(qmp::cont {}).await;
            beat.abort();
            g.ctl.finish(Duration::from_secs(2));
            report(Phase::Failed, progress);
            return Err(MoveError::Failed {
                phase: "handing the guest over",
                cause: cause.unwrap_or_default(),
            });
        }
    };
    g.ctl.send(&Message::Released);
    beat.abort();
    g.ctl.finish(Duration::from_secs(2));
    if let (Some(stop), true) = (stop_us, resumed_at > 0) {
        if resumed_at > stop {
            stats.downtime_ms = (resumed_at - stop) as f64 / 1e3;
        }
    }
    // The guest runs at the destination: this QEMU goes.
    if let Err(e) = vm.power_off().await {
        tracing::warn!(vm = %vm.name(), error = %chain(&e), "the source QEMU did not quit");
    }
    if let MoveStorage::Copy { keep_source, .. } = &opts.storage {
        for disk in validated.disks() {
            if let Some(top) = disk.layers.first() {
                if *keep_source {
                    continue;
                }
                match std::fs::remove_file(&top.path) {
                    Ok(()) => stats.source_files_deleted.push(top.path.clone()),
                    Err(e) => {
                        tracing::warn!(path = %top.path.display(), error = %e, "a moved disk could not be deleted")
                    }
                }
            }
            stats
                .source_parents
                .extend(disk.layers.iter().skip(1).map(|l| l.path.clone()));
        }
    } else {
        stats.shared_disks = validated
            .disks()
            .iter()
            .filter_map(|d| d.layers.first().map(|l| l.path.clone()))
            .collect();
    }
    stats.bytes_on_wire = on_wire(&relays);
    stats.total_ms = started.elapsed().as_secs_f64() * 1e3;
    stats.throughput_bytes_s = stats.bytes_on_wire as f64 / (stats.total_ms / 1e3).max(1e-3);
    stats.compression_ratio = 1.0;
    report(Phase::Completed, progress);
    tracing::info!(vm = %vm.name(), move_id = %move_id, total_ms = stats.total_ms, downtime_ms = stats.downtime_ms, "moved");
    Ok(stats)
}

/// Asks the destination how a move ended (blocking).
fn query(
    dialer: &SharedDialer,
    move_id: MoveId,
    software: &str,
    timeout: Duration,
) -> Result<Outcome, String> {
    let mut l = dialer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .dial()
        .map_err(|e| format!("cannot reach the destination: {e}"))?;
    wire::write_message(
        &mut *l.writer,
        &Message::Hello(Hello {
            version: VERSION,
            software: software.to_string(),
            purpose: Purpose::Query { move_id },
        }),
    )
    .map_err(|e| chain(&e))?;
    match link::first_message(l, timeout + Duration::from_secs(60)) {
        Ok((Message::Outcome { outcome }, l)) => {
            l.closer.close();
            Ok(outcome)
        }
        Ok((m, l)) => {
            l.closer.close();
            Err(format!(
                "the destination answered the query with {}",
                m.name()
            ))
        }
        Err(e) => Err(chain(&e)),
    }
}

/// Undoes what the source set up: the migration cancelled, the mirrors cancelled and their
/// nodes removed, the guest running again if it ran before.
async fn roll_back(vm: &QemuVm, undo: &mut Undo, was_running: bool) {
    let qmp = vm.qmp();
    if undo.migrating {
        let _ = qmp.execute(qmp::migrate_cancel {}).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = qmp
                .execute(qmp::query_migrate {})
                .await
                .ok()
                .and_then(|i| i.status);
            let active = matches!(
                status,
                Some(
                    qmp::MigrationStatus::active
                        | qmp::MigrationStatus::setup
                        | qmp::MigrationStatus::cancelling
                        | qmp::MigrationStatus::device
                        | qmp::MigrationStatus::pre_switchover
                        | qmp::MigrationStatus::wait_unplug
                )
            );
            if !active || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if !undo.mirrors.is_empty() {
        for disk in &undo.mirrors {
            let _ = qmp
                .execute(qmp::block_job_cancel {
                    force: Some(true),
                    device: mirror_job(*disk),
                })
                .await;
        }
        let jobs: Vec<String> = undo.mirrors.iter().map(|d| mirror_job(*d)).collect();
        if let Err(e) = wait_jobs_gone(qmp, &jobs, Duration::from_secs(60)).await {
            tracing::warn!(vm = %vm.name(), error = %e, "cancelling the mirrors");
        }
        for disk in std::mem::take(&mut undo.mirrors) {
            let _ = qmp
                .execute(qmp::blockdev_del {
                    node_name: mirror_target(disk),
                })
                .await;
        }
    }
    for t in undo.tasks.drain(..) {
        t.abort();
    }
    for s in undo.sockets.drain(..) {
        let _ = std::fs::remove_file(s);
    }
    // QEMU stopped the guest if the migration had reached its end.
    if was_running && vm.state().await != VmState::Running {
        if let Err(e) = vm.resume().await {
            tracing::error!(vm = %vm.name(), error = %chain(&e), "the guest could not be resumed after the move stopped");
        }
    }
}
