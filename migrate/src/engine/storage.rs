//! Disks in a shared-nothing move: the source's side ([`SourceStorage`]: announcements, the
//! wire [`BlockSink`], the per-round disk work) and the destination's ([`DestStorage`]: the
//! plan of each chain under the storage roots, the files being written, their cleanup).
//!
//! Rounds (the protocol's pre-copy rounds carry the disk blocks too):
//!
//! ```text
//!  round 1   DiskLayer for every layer of every disk (base first, active last), the
//!            destination plans each chain when its active layer is announced and answers
//!            (reuse or copy) every layer; the parents not reused are copied byte for byte.
//!  round 2   once the destination acknowledged round 1 (its parents are complete and its
//!            active layers created on them): the bulk copy of each active layer.
//!  round 3.. the blocks the guest wrote meanwhile (alongside the memory's dirty pages).
//!  final     with the VM paused: the last dirty blocks, before the vCPU and device state.
//! ```
//!
//! Blocks of round r go on the channel of their stripe before that channel's own RoundEnd(r)
//! is written (the control thread writes them once every channel has ended round r - 1), so
//! the destination counts them in the round they belong to.
//!
//! The destination opens and creates every file beneath its storage roots (see
//! [`crate::storage::paths::StorageRoots`]), reserves each destination name before writing it
//! (so that two moves never touch each other's files), checks each copied parent against
//! what the source announced, and checks that the chain it built is exactly the planned
//! files ([`crate::storage::plan::verify_chain`]): a source cannot point the destination's
//! disks at any other file. A move without its storage (shared storage) is checked the same
//! way: every image and its whole chain must lie inside the roots ([`check_shared`]).
//!
//! After the handoff the source deletes its active layers unless they are kept, or another VM
//! of the host still needs them ([`StorageOptions::users`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::link::SharedWriter;
use super::rate::RateLimiter;
use super::receiver::incompatibility;
use crate::disk::{Disk, DiskChain, DiskError, DiskFormat, DiskSpec, Sha256Digest};
use crate::protocol::{
    BatchEncoder, Compression, DiskLayer, Message, ProtocolError, ProtocolVersion, UnitKind,
    stripe_channel,
};
use crate::storage::mirror::{
    BLOCK_SIZE, BlockSink, DiskSink, FileSink, Mirror, MirrorError, MirrorOptions,
};
use crate::storage::paths::{StoragePathError, StorageRoots};
use crate::storage::plan::{
    ChainFolder, Cleanup, DestinationPlan, LayerAction, PlanError, SourceLayer, SourcePlan,
    begin_file, check_space, commit_file, create_active, describe_chain, finish_parent, open_layer,
    plan_destination,
};
use crate::storage::users::{DiskUsers, NeededFiles, OldFile, delete_old_files};
use crate::vm::{Vm, VmConfig};

/// Errors of the disks' part of a move. Each names the disk (and layer) concerned; none shows
/// what a file holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A disk's file has no name to keep at the destination.
    #[error("disk {index} ({}) has no file name", .path.display())]
    NoFileName {
        /// Disk index.
        index: usize,
        /// Its file.
        path: PathBuf,
    },
    /// The per-disk table has no entry for a disk.
    #[error(
        "disk {index} ({}) has no destination; give one per disk (--disk SRC=DST)",
        .path.display()
    )]
    NoDestination {
        /// Disk index.
        index: usize,
        /// Its file.
        path: PathBuf,
    },
    /// The VM has no open disk at an index of its configuration.
    #[error("disk {index} is not open in the VM")]
    NotOpen {
        /// Disk index.
        index: usize,
    },
    /// More disks than the protocol numbers.
    #[error("the VM has more disks than a move can carry")]
    TooManyDisks,
    /// Describing a disk's chain (checksums of its parents) failed.
    #[error("describing disk {index} failed")]
    Describe {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: Box<PlanError>,
    },
    /// A layer's file name cannot be sent.
    #[error("{} has no UTF-8 file name", .path.display())]
    NameNotUtf8 {
        /// The layer.
        path: PathBuf,
    },
    /// A layer's backing reference cannot be sent.
    #[error("the backing reference of {} is not UTF-8", .path.display())]
    BackingNotUtf8 {
        /// The layer.
        path: PathBuf,
    },
    /// The block encoder could not be set up.
    #[error("the disk blocks' encoder cannot be set up")]
    Encoder(#[source] ProtocolError),
    /// Sending a layer's blocks failed.
    #[error("sending disk {disk} layer {layer} failed")]
    Send {
        /// Disk index.
        disk: u32,
        /// Layer.
        layer: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Copying a layer (a parent file, or the active layer's mirror) failed.
    #[error("copying disk {disk} layer {layer} failed")]
    Copy {
        /// Disk index.
        disk: u32,
        /// Layer.
        layer: u32,
        /// The cause.
        #[source]
        source: Box<MirrorError>,
    },
    /// A disk the configuration does not have.
    #[error("disk {disk} is not in the configuration")]
    UnknownDisk {
        /// Disk index.
        disk: u32,
    },
    /// A layer announced after the disk's active layer.
    #[error("disk {disk} was announced after its active layer")]
    AfterActive {
        /// Disk index.
        disk: u32,
    },
    /// Layers announced out of order.
    #[error("disk {disk} layer {layer} was announced out of order (expected layer {expected})")]
    OutOfOrder {
        /// Disk index.
        disk: u32,
        /// The layer announced.
        layer: u32,
        /// The one expected.
        expected: usize,
    },
    /// A base layer with a backing file.
    #[error("disk {disk} layer 0 names a backing file")]
    BaseWithBacking {
        /// Disk index.
        disk: u32,
    },
    /// The active layer's format is not the configuration's.
    #[error("disk {disk}'s active layer is {found:?} but the configuration says {configured:?}")]
    FormatMismatch {
        /// Disk index.
        disk: u32,
        /// Announced.
        found: DiskFormat,
        /// Configured.
        configured: DiskFormat,
    },
    /// Placing or preparing a disk's files failed.
    #[error("disk {disk} ({}) cannot be placed here", .path.display())]
    Place {
        /// Disk index.
        disk: u32,
        /// Its destination (active layer).
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<PlanError>,
    },
    /// A layer that was not announced.
    #[error("disk {disk} layer {layer} was not announced")]
    NotAnnounced {
        /// Disk index.
        disk: u32,
        /// Layer.
        layer: u32,
    },
    /// Blocks for a layer that has no open file now.
    #[error(
        "disk {disk} layer {layer} has no file to write to (its blocks came too early or too late)"
    )]
    NoSink {
        /// Disk index.
        disk: u32,
        /// Layer.
        layer: u32,
    },
    /// The destination's file system is full.
    #[error("the destination's disk is full writing disk {disk}")]
    Full {
        /// Disk index.
        disk: u32,
        /// The failed write.
        #[source]
        source: io::Error,
    },
    /// Writing a block failed.
    #[error("writing block {index} of disk {disk} layer {layer} failed")]
    Write {
        /// Disk index.
        disk: u32,
        /// Layer.
        layer: u32,
        /// Block number.
        index: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Making a disk's data durable failed.
    #[error("flushing disk {disk} ({}) failed", .path.display())]
    Flush {
        /// Disk index.
        disk: u32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A disk whose layers were never announced.
    #[error("disk {disk}'s layers were never announced")]
    NeverAnnounced {
        /// Disk index.
        disk: u32,
    },
    /// The active layers were not created before the end.
    #[error("the disks' active layers were never created")]
    NoActives,
}

/// Where a shared-nothing move puts the disks at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageTarget {
    /// Every disk (and its read-only parents) into this folder of the destination, keeping
    /// the file names.
    Folder(PathBuf),
    /// A destination file per disk, keyed by the disk's current (top layer) path at the
    /// source; each disk's parents go next to its file. Every disk needs an entry.
    PerDisk(Vec<(PathBuf, PathBuf)>),
}

/// The storage part of a move ([`super::MoveOptions::storage`]): the VM's disks are copied
/// to the destination while the guest runs (a shared-nothing move).
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Where the files go at the destination (checked there against its storage roots).
    pub target: StorageTarget,
    /// Keep the source's files after a successful move (default: the active layers are
    /// deleted; see [`super::MoveStats::source_parents`] for the read-only parents).
    pub keep_source: bool,
    /// Which files the host's other VMs still need (its inventory, running and off VMs): an
    /// active layer one of them has in a chain is not deleted. `None`: no inventory, only
    /// other processes' locks keep a file.
    pub users: Option<Arc<dyn DiskUsers>>,
}

/// The destination path of each disk, in configuration order.
pub(crate) fn destination_paths(
    config: &VmConfig,
    target: &StorageTarget,
) -> Result<Vec<PathBuf>, StorageError> {
    config
        .disks
        .iter()
        .enumerate()
        .map(|(index, d)| match target {
            StorageTarget::Folder(folder) => {
                d.path
                    .file_name()
                    .map(|n| folder.join(n))
                    .ok_or_else(|| StorageError::NoFileName {
                        index,
                        path: d.path.clone(),
                    })
            }
            StorageTarget::PerDisk(table) => {
                let canon = std::fs::canonicalize(&d.path).ok();
                table
                    .iter()
                    .find(|(src, _)| {
                        *src == d.path
                            || canon.as_ref().is_some_and(|c| {
                                Some(c) == std::fs::canonicalize(src).ok().as_ref()
                            })
                    })
                    .map(|(_, dst)| dst.clone())
                    .ok_or_else(|| StorageError::NoDestination {
                        index,
                        path: d.path.clone(),
                    })
            }
        })
        .collect()
}

fn to_wire(f: DiskFormat) -> crate::protocol::DiskFormat {
    match f {
        DiskFormat::Raw => crate::protocol::DiskFormat::Raw,
        DiskFormat::Qcow2 => crate::protocol::DiskFormat::Qcow2,
    }
}

fn from_wire(f: crate::protocol::DiskFormat) -> DiskFormat {
    match f {
        crate::protocol::DiskFormat::Raw => DiskFormat::Raw,
        crate::protocol::DiskFormat::Qcow2 => DiskFormat::Qcow2,
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

const BLOCK: usize = 64 * 1024;

// ───────────────────────────── source ─────────────────────────────

struct SourceDisk {
    index: u32,
    disk: Arc<Disk>,
    plan: SourcePlan,
    mirror: Option<Mirror>,
}

/// The source's disks in a move.
pub(crate) struct SourceStorage {
    disks: Vec<SourceDisk>,
    answers: HashMap<(u32, u32), bool>,
    pub(crate) keep_source: bool,
    users: Option<Arc<dyn DiskUsers>>,
    vm_name: String,
    /// Bytes of disk data sent (blocks before compression).
    pub(crate) bytes: u64,
    /// Bytes of read-only parents skipped because the destination reused them.
    pub(crate) reused_bytes: u64,
    /// Bytes of read-only parents sent (data blocks).
    pub(crate) parent_bytes: u64,
}

impl SourceStorage {
    /// Describes every disk's chain (checksums of the parents).
    pub(crate) fn new(
        vm: &Vm,
        opts: &StorageOptions,
        cancel: &AtomicBool,
    ) -> Result<SourceStorage, StorageError> {
        let mut disks = Vec::new();
        for index in 0..vm.config().disks.len() {
            let disk = vm.disk(index).ok_or(StorageError::NotOpen { index })?;
            let chain = DiskChain {
                layers: disk.layers().to_vec(),
            };
            let plan = describe_chain(&chain, cancel).map_err(|source| StorageError::Describe {
                index,
                source: Box::new(source),
            })?;
            disks.push(SourceDisk {
                index: u32::try_from(index).map_err(|_| StorageError::TooManyDisks)?,
                disk,
                plan,
                mirror: None,
            });
        }
        Ok(SourceStorage {
            disks,
            answers: HashMap::new(),
            keep_source: opts.keep_source,
            users: opts.users.clone(),
            vm_name: vm.config().name.clone(),
            bytes: 0,
            reused_bytes: 0,
            parent_bytes: 0,
        })
    }

    /// The DiskLayer announcements, base first per disk.
    pub(crate) fn announcements(&self) -> Result<Vec<Message<'static>>, StorageError> {
        let mut out = Vec::new();
        for d in &self.disks {
            let n = d.plan.layers.len();
            for (k, l) in d.plan.layers.iter().enumerate() {
                let active = k + 1 == n;
                let name = l.path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    StorageError::NameNotUtf8 {
                        path: l.path.clone(),
                    }
                })?;
                let backing = match &l.backing_name {
                    Some(b) => b
                        .to_str()
                        .ok_or_else(|| StorageError::BackingNotUtf8 {
                            path: l.path.clone(),
                        })?
                        .to_string(),
                    None => String::new(),
                };
                out.push(Message::DiskLayer(DiskLayer {
                    disk: d.index,
                    layer: l.layer,
                    format: to_wire(l.format),
                    size: if active { l.virtual_size } else { l.file_size },
                    checksum: l.checksum.map_or([0; 32], |c| c.0),
                    backing: backing.into(),
                    name: name.to_string().into(),
                    active,
                }));
            }
        }
        Ok(out)
    }

    pub(crate) fn answered(&mut self, disk: u32, layer: u32, reuse: bool) {
        self.answers.insert((disk, layer), reuse);
    }

    pub(crate) fn all_answered(&self) -> bool {
        self.disks.iter().all(|d| {
            d.plan
                .layers
                .iter()
                .all(|l| self.answers.contains_key(&(d.index, l.layer)))
        })
    }

    /// Round 1: the parents the destination does not reuse.
    pub(crate) fn copy_parents(
        &mut self,
        sink: &mut WireSink<'_>,
        round: u32,
    ) -> Result<(), StorageError> {
        for d in &self.disks {
            for l in d.plan.parents() {
                if self
                    .answers
                    .get(&(d.index, l.layer))
                    .copied()
                    .unwrap_or(false)
                {
                    self.reused_bytes += l.file_size;
                    continue;
                }
                sink.begin(d.index, l.layer, round)?;
                let cancel = sink.cancel_flag();
                crate::storage::mirror::copy_file(&l.path, sink, &cancel, &mut |_| {}).map_err(
                    |source| StorageError::Copy {
                        disk: d.index,
                        layer: l.layer,
                        source: Box::new(source),
                    },
                )?;
                sink.end()?;
            }
        }
        self.parent_bytes = sink.data_bytes.saturating_sub(self.bytes);
        self.bytes = sink.data_bytes;
        Ok(())
    }

    /// Round 2: the bulk copy of the active layers (write tracking starts here).
    pub(crate) fn bulk(&mut self, sink: &mut WireSink<'_>, round: u32) -> Result<(), StorageError> {
        for d in &mut self.disks {
            let top = d.plan.layers.len().saturating_sub(1);
            let layer = u32::try_from(top).unwrap_or(0);
            let copy_err = |source| StorageError::Copy {
                disk: d.index,
                layer,
                source: Box::new(source),
            };
            let mut m =
                Mirror::new(Arc::clone(&d.disk), MirrorOptions::default()).map_err(copy_err)?;
            sink.begin(d.index, layer, round)?;
            let cancel = sink.cancel_flag();
            m.bulk(sink, &cancel, &mut |_| {}).map_err(copy_err)?;
            sink.end()?;
            d.mirror = Some(m);
        }
        self.bytes = sink.data_bytes;
        Ok(())
    }

    /// A later round (the final one with the VM paused): the blocks written meanwhile.
    pub(crate) fn dirty(
        &mut self,
        sink: &mut WireSink<'_>,
        round: u32,
        last: bool,
    ) -> Result<(), StorageError> {
        for d in &mut self.disks {
            let layer = u32::try_from(d.plan.layers.len().saturating_sub(1)).unwrap_or(0);
            let Some(m) = d.mirror.as_mut() else {
                continue;
            };
            sink.begin(d.index, layer, round)?;
            let cancel = sink.cancel_flag();
            let r = if last {
                m.final_pass(sink, &cancel, &mut |_| {})
            } else {
                m.dirty_round(sink, &cancel, &mut |_| {}).map(|_| ())
            };
            r.map_err(|source| StorageError::Copy {
                disk: d.index,
                layer,
                source: Box::new(source),
            })?;
            sink.end()?;
        }
        self.bytes = sink.data_bytes;
        Ok(())
    }

    /// Blocks written by the guest and not sent yet, in bytes.
    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.disks
            .iter()
            .filter(|d| d.mirror.is_some())
            .map(|d| d.disk.dirty_count().saturating_mul(BLOCK_SIZE))
            .sum()
    }

    /// After the handoff: deletes the active layers unless kept or another VM of the host
    /// needs them; returns the read-only parents (still open by this VM until it is shut
    /// down) and the files deleted.
    pub(crate) fn release(&mut self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        for d in &mut self.disks {
            d.mirror = None;
        }
        let mut parents = Vec::new();
        let mut actives = Vec::new();
        for d in &self.disks {
            for l in d.plan.parents() {
                if !parents.contains(&l.path) {
                    parents.push(l.path.clone());
                }
            }
            if let Some(a) = d.plan.active() {
                actives.push(OldFile {
                    path: &a.path,
                    id: a.id,
                    // This VM still has it open (it is shut down after the handoff): its own
                    // locks are no other user.
                    open_by_moved_vm: true,
                });
            }
        }
        let needed = self
            .users
            .as_ref()
            .map_or_else(NeededFiles::new, |u| u.needed_files());
        let deleted = delete_old_files(&actives, self.keep_source, &self.vm_name, &needed, &[])
            .into_iter()
            .filter(|f| f.deleted)
            .map(|f| f.path)
            .collect();
        (parents, deleted)
    }
}

/// A [`BlockSink`] that sends DiskBlocks frames, each block on its stripe's channel; counts
/// per channel what it sent in the round; pings the destination every second.
pub(crate) struct WireSink<'a> {
    writers: Vec<SharedWriter>,
    encoders: Vec<BatchEncoder>,
    open: Vec<bool>,
    last: Vec<Option<u64>>,
    /// Per channel: (batches, blocks) sent in the round.
    pub(crate) counts: Vec<(u64, u64)>,
    target: Option<(u32, u32, u32)>,
    pad: Vec<u8>,
    cancel: &'a super::CancelToken,
    abort: Arc<AtomicBool>,
    limiter: Option<Arc<RateLimiter>>,
    last_ping: Instant,
    ping: u64,
    pub(crate) data_bytes: u64,
}

impl<'a> WireSink<'a> {
    pub(crate) fn new(
        writers: Vec<SharedWriter>,
        version: ProtocolVersion,
        compression: Compression,
        cancel: &'a super::CancelToken,
        abort: Arc<AtomicBool>,
        limiter: Option<Arc<RateLimiter>>,
        data_bytes: u64,
    ) -> Result<WireSink<'a>, StorageError> {
        let n = writers.len();
        let encoders = (0..n)
            .map(|_| BatchEncoder::new(version, compression).map_err(StorageError::Encoder))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WireSink {
            writers,
            encoders,
            open: vec![false; n],
            last: vec![None; n],
            counts: vec![(0, 0); n],
            target: None,
            pad: vec![0; BLOCK],
            cancel,
            abort,
            limiter,
            last_ping: Instant::now(),
            ping: 1 << 48,
            data_bytes,
        })
    }

    fn cancel_flag(&self) -> AtomicBool {
        AtomicBool::new(self.cancel.is_cancelled() || self.abort.load(Ordering::SeqCst))
    }

    fn begin(&mut self, disk: u32, layer: u32, round: u32) -> Result<(), StorageError> {
        self.end()?;
        self.target = Some((disk, layer, round));
        Ok(())
    }

    /// Sends what is buffered for the current layer.
    pub(crate) fn end(&mut self) -> Result<(), StorageError> {
        for ch in 0..self.encoders.len() {
            self.flush_channel(ch).map_err(|source| {
                let (disk, layer, _) = self.target.unwrap_or_default();
                StorageError::Send {
                    disk,
                    layer,
                    source,
                }
            })?;
        }
        Ok(())
    }

    fn flush_channel(&mut self, ch: usize) -> io::Result<()> {
        let (Some(enc), Some(open)) = (self.encoders.get_mut(ch), self.open.get_mut(ch)) else {
            return Ok(());
        };
        if !*open {
            return Ok(());
        }
        *open = false;
        if let Some(l) = self.last.get_mut(ch) {
            *l = None;
        }
        if enc.is_empty() {
            return Ok(());
        }
        let count = u64::from(enc.len());
        let frame = enc.finish().map_err(io::Error::other)?;
        if let Some(l) = &self.limiter {
            l.acquire(frame.len() as u64);
        }
        let w = self
            .writers
            .get(ch)
            .ok_or_else(|| io::Error::other("no such channel"))?;
        w.send_raw(frame).map_err(io::Error::other)?;
        if let Some(c) = self.counts.get_mut(ch) {
            c.0 += 1;
            c.1 += count;
        }
        Ok(())
    }

    fn keepalive(&mut self) -> io::Result<()> {
        if self.cancel.is_cancelled() || self.abort.load(Ordering::SeqCst) {
            return Err(io::Error::other("the move was cancelled"));
        }
        if self.last_ping.elapsed() >= Duration::from_secs(1) {
            self.last_ping = Instant::now();
            self.ping = self.ping.wrapping_add(1);
            if let Some(w) = self.writers.first() {
                w.try_send(&Message::Ping(self.ping))
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }
}

impl BlockSink for WireSink<'_> {
    fn write_block(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
        self.keepalive()?;
        let Some((disk, layer, round)) = self.target else {
            return Err(io::Error::other(
                "a block was written before a layer was begun",
            ));
        };
        let n = u16::try_from(self.writers.len()).unwrap_or(u16::MAX);
        let ch = usize::from(stripe_channel(index, n));
        let needs_flush = {
            let enc = self
                .encoders
                .get(ch)
                .ok_or_else(|| io::Error::other("no such channel"))?;
            self.open.get(ch).copied().unwrap_or(false)
                && (!enc.has_room()
                    || self
                        .last
                        .get(ch)
                        .copied()
                        .flatten()
                        .is_some_and(|l| index <= l))
        };
        if needs_flush {
            self.flush_channel(ch)?;
        }
        let open = self.open.get(ch).copied().unwrap_or(false);
        let block: &[u8] = if data.len() == BLOCK {
            data
        } else {
            let len = data.len().min(BLOCK);
            self.pad.fill(0);
            if let (Some(dst), Some(src)) = (self.pad.get_mut(..len), data.get(..len)) {
                dst.copy_from_slice(src);
            }
            &self.pad
        };
        let enc = self
            .encoders
            .get_mut(ch)
            .ok_or_else(|| io::Error::other("no such channel"))?;
        if !open {
            enc.begin_disk(disk, layer, round);
        }
        let kind = enc.push(index, block).map_err(io::Error::other)?;
        if kind != UnitKind::Zero {
            self.data_bytes += BLOCK as u64;
        }
        if let Some(o) = self.open.get_mut(ch) {
            *o = true;
        }
        if let Some(l) = self.last.get_mut(ch) {
            *l = Some(index);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        for ch in 0..self.encoders.len() {
            self.flush_channel(ch)?;
        }
        Ok(())
    }
}

// ─────────────────────────── destination ───────────────────────────

enum LayerSink {
    File(FileSink),
    Active(DiskSink),
}

struct DestDisk {
    target: PathBuf,
    format: DiskFormat,
    announced: Vec<SourceLayer>,
    sizes: Vec<u64>,
    plan: Option<DestinationPlan>,
    folder: Option<ChainFolder>,
    sinks: HashMap<u32, LayerSink>,
}

/// The destination's disks of one move: planned under the storage roots, written as blocks
/// arrive, removed unless the move completes.
pub(crate) struct DestStorage {
    roots: StorageRoots,
    disks: Vec<DestDisk>,
    actives_created: bool,
    /// Removes what was created unless the move completed, and holds the names reserved
    /// until then (see the Drop impl: files are closed first).
    cleanup: Cleanup,
}

impl Drop for DestStorage {
    fn drop(&mut self) {
        // Close every file first, then remove what this move created (while its names are
        // still reserved: the cleanup releases them last).
        for d in &mut self.disks {
            d.sinks.clear();
        }
        self.cleanup.run();
    }
}

impl DestStorage {
    pub(crate) fn new(roots: StorageRoots, config: &VmConfig) -> DestStorage {
        DestStorage {
            roots,
            disks: config
                .disks
                .iter()
                .map(|d| DestDisk {
                    target: d.path.clone(),
                    format: d.format,
                    announced: Vec::new(),
                    sizes: Vec::new(),
                    plan: None,
                    folder: None,
                    sinks: HashMap::new(),
                })
                .collect(),
            actives_created: false,
            cleanup: Cleanup::new(),
        }
    }

    /// A layer was announced. When it is a disk's active layer, the chain is planned (paths,
    /// reuse by checksum, free space), its folder created and its names reserved, the copied
    /// parents' files are created, and the answers for every layer of the disk are returned.
    pub(crate) fn announce(
        &mut self,
        l: &DiskLayer<'_>,
    ) -> Result<Vec<(u32, u32, bool)>, StorageError> {
        let d = self
            .disks
            .get_mut(usize_of(u64::from(l.disk)))
            .ok_or(StorageError::UnknownDisk { disk: l.disk })?;
        if d.plan.is_some() {
            return Err(StorageError::AfterActive { disk: l.disk });
        }
        if usize_of(u64::from(l.layer)) != d.announced.len() {
            return Err(StorageError::OutOfOrder {
                disk: l.disk,
                layer: l.layer,
                expected: d.announced.len(),
            });
        }
        let format = from_wire(l.format);
        let backing_name = if l.backing.is_empty() {
            None
        } else {
            Some(PathBuf::from(l.backing.as_ref()))
        };
        if l.layer == 0 && backing_name.is_some() {
            return Err(StorageError::BaseWithBacking { disk: l.disk });
        }
        if l.active && format != d.format {
            return Err(StorageError::FormatMismatch {
                disk: l.disk,
                found: format,
                configured: d.format,
            });
        }
        d.announced.push(SourceLayer {
            layer: l.layer,
            path: PathBuf::from(l.name.as_ref()),
            format,
            virtual_size: l.size,
            file_size: if l.active { 0 } else { l.size },
            allocated_bytes: if l.active { 0 } else { l.size },
            checksum: (!l.active).then_some(Sha256Digest(l.checksum)),
            backing_name,
            id: None,
        });
        d.sizes.push(l.size);
        if !l.active {
            return Ok(Vec::new());
        }
        let place = |source| StorageError::Place {
            disk: l.disk,
            path: d.target.clone(),
            source: Box::new(source),
        };
        let source = SourcePlan {
            layers: d.announced.clone(),
        };
        let plan = plan_destination(&source, &d.target, &self.roots, 0).map_err(place)?;
        if let Some(folder) = plan.folder() {
            check_space(folder, plan.bytes_needed).map_err(place)?;
        }
        let folder = ChainFolder::prepare(&self.roots, &plan, &mut self.cleanup).map_err(place)?;
        let mut answers = Vec::new();
        for dl in &plan.layers {
            match dl.action {
                LayerAction::Copy => {
                    let file = begin_file(&folder, dl, &mut self.cleanup).map_err(place)?;
                    d.sinks
                        .insert(dl.layer, LayerSink::File(FileSink::new(file)));
                    answers.push((l.disk, dl.layer, false));
                }
                LayerAction::Reuse => answers.push((l.disk, dl.layer, true)),
                LayerAction::Mirror => answers.push((l.disk, dl.layer, false)),
            }
        }
        d.plan = Some(plan);
        d.folder = Some(folder);
        Ok(answers)
    }

    /// Round 1 is complete: the copied parents are checked against the announcement and
    /// finished (backing references rewritten, durable, renamed into place), and the active
    /// layers created on them, their chains checked to be exactly the planned files.
    pub(crate) fn parents_complete(&mut self) -> Result<(), StorageError> {
        if self.actives_created {
            return Ok(());
        }
        self.actives_created = true;
        for (index, d) in self.disks.iter_mut().enumerate() {
            let disk = u32::try_from(index).map_err(|_| StorageError::TooManyDisks)?;
            let (Some(plan), Some(folder)) = (&d.plan, &d.folder) else {
                return Err(StorageError::NeverAnnounced { disk });
            };
            let place = |source| StorageError::Place {
                disk,
                path: d.target.clone(),
                source: Box::new(source),
            };
            for dl in &plan.layers {
                match dl.action {
                    LayerAction::Copy => {
                        let Some(LayerSink::File(mut f)) = d.sinks.remove(&dl.layer) else {
                            return Err(StorageError::NoSink {
                                disk,
                                layer: dl.layer,
                            });
                        };
                        f.flush().map_err(|source| StorageError::Flush {
                            disk,
                            path: dl.partial.clone(),
                            source,
                        })?;
                        let file = f.into_file();
                        finish_parent(folder, dl, &file, &mut self.cleanup).map_err(place)?;
                    }
                    LayerAction::Reuse => {}
                    LayerAction::Mirror => {
                        let disk_file =
                            create_active(folder, plan, &mut self.cleanup).map_err(place)?;
                        d.sinks.insert(
                            dl.layer,
                            LayerSink::Active(DiskSink::new(Arc::new(disk_file))),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the active layers' data so far durable (during pre-copy, so that the flush with
    /// the VM paused has only the last blocks to write).
    pub(crate) fn sync_actives(&mut self) -> Result<(), StorageError> {
        for (index, d) in self.disks.iter_mut().enumerate() {
            for sink in d.sinks.values_mut() {
                if let LayerSink::Active(s) = sink {
                    s.flush().map_err(|source| StorageError::Flush {
                        disk: u32::try_from(index).unwrap_or(u32::MAX),
                        path: d.target.clone(),
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Writes one block (`data` is a whole block; clipped to the layer's size) or zeroes.
    pub(crate) fn store(
        &mut self,
        disk: u32,
        layer: u32,
        index: u64,
        zero: bool,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let d = self
            .disks
            .get_mut(usize_of(u64::from(disk)))
            .ok_or(StorageError::UnknownDisk { disk })?;
        let size = d
            .sizes
            .get(usize_of(u64::from(layer)))
            .copied()
            .ok_or(StorageError::NotAnnounced { disk, layer })?;
        let start = index.saturating_mul(BLOCK_SIZE);
        let len = size.saturating_sub(start).min(BLOCK_SIZE);
        let sink: &mut dyn BlockSink = match d.sinks.get_mut(&layer) {
            Some(LayerSink::File(f)) => f,
            Some(LayerSink::Active(a)) => a,
            None => return Err(StorageError::NoSink { disk, layer }),
        };
        let r = if zero {
            sink.write_zeroes(index, len)
        } else {
            sink.write_block(index, data.get(..usize_of(len)).unwrap_or(data))
        };
        r.map_err(|source| {
            if crate::storage::mirror::io_is_no_space(&source) {
                StorageError::Full { disk, source }
            } else {
                StorageError::Write {
                    disk,
                    layer,
                    index,
                    source,
                }
            }
        })
    }

    /// Everything arrived (the VM is paused at the source): the active layers are made
    /// durable, closed, and renamed to their final names, where the VM opens them.
    pub(crate) fn finish(&mut self) -> Result<(), StorageError> {
        if !self.actives_created {
            return Err(StorageError::NoActives);
        }
        for (index, d) in self.disks.iter_mut().enumerate() {
            let disk = u32::try_from(index).map_err(|_| StorageError::TooManyDisks)?;
            let (Some(plan), Some(folder)) = (&d.plan, &d.folder) else {
                return Err(StorageError::NeverAnnounced { disk });
            };
            let Some(active) = plan.active() else {
                return Err(StorageError::NeverAnnounced { disk });
            };
            if let Some(LayerSink::Active(mut s)) = d.sinks.remove(&active.layer) {
                s.flush().map_err(|source| StorageError::Flush {
                    disk,
                    path: active.partial.clone(),
                    source,
                })?;
            }
            let place = |source| StorageError::Place {
                disk,
                path: d.target.clone(),
                source: Box::new(source),
            };
            commit_file(folder, &active.partial, &active.path, &mut self.cleanup).map_err(place)?;
            wait_unlocked(&self.roots, &active.path, active.format).map_err(place)?;
        }
        Ok(())
    }

    /// The VM runs here on these files: keep them.
    pub(crate) fn keep(&mut self) {
        self.cleanup.disarm();
    }
}

/// Waits until the active layer just closed can be opened for writing. A `fork` elsewhere in
/// the process (any command another thread spawns) shares the open file, and so its lock,
/// until the child's `exec`: for that instant the file looks in use. A lock that stays
/// (another process has the file) is reported after 2 s.
fn wait_unlocked(roots: &StorageRoots, path: &Path, format: DiskFormat) -> Result<(), PlanError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match open_layer(roots, path, format) {
            Ok(_) => return Ok(()),
            Err(PlanError::Image {
                source: DiskError::InUse { .. },
                ..
            }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e),
        }
    }
}

/// Opens the configured roots of a host for an arriving VM; none configured is a refusal.
fn open_roots(roots: &[PathBuf], what: &str) -> Result<StorageRoots, Vec<(u32, String)>> {
    if roots.is_empty() {
        return Err(vec![(
            incompatibility::STORAGE,
            format!(
                "this host takes no VM storage in a move: it has no storage roots configured; configure one{what}"
            ),
        )]);
    }
    StorageRoots::new(roots).map_err(|e| vec![(incompatibility::STORAGE, super::wire::chain(&e))])
}

/// Checks the disk paths of an arriving configuration that brings its disks against
/// `roots`: inside a root, no `..`, no symbolic-link escape, not an existing file. Every
/// problem, one line each, with its incompatibility id.
pub(crate) fn check_paths(
    roots: &[PathBuf],
    config: &VmConfig,
) -> Result<StorageRoots, Vec<(u32, String)>> {
    let roots = open_roots(roots, ", or move the VM's storage elsewhere first")?;
    let mut problems = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for (i, d) in config.disks.iter().enumerate() {
        match roots.check_file(&d.path, false) {
            Ok(c) => {
                if seen.contains(&c.path) {
                    problems.push((
                        incompatibility::STORAGE,
                        format!(
                            "disk {i}: {} is the destination of two disks",
                            d.path.display()
                        ),
                    ));
                }
                seen.push(c.path);
            }
            Err(e) => problems.push((
                incompatibility::STORAGE,
                format!("disk {i}: {}", super::wire::chain(&e)),
            )),
        }
    }
    if problems.is_empty() {
        Ok(roots)
    } else {
        Err(problems)
    }
}

/// A move without its storage (shared storage): each of the VM's images must be the very file
/// the source's VM has open, seen here at the same path, inside this host's storage roots
/// with its whole backing chain. The source holds QEMU-style locks on its images until the
/// switchover, so a file here that nobody has open is a different file (a local copy, or
/// storage that is not shared): [`incompatibility::SHARED_STORAGE`]. A path or a backing
/// reference that leads outside the roots: [`incompatibility::STORAGE`]. The messages name the
/// disk, never what a file holds. A VM without disks needs no roots (`None`).
pub(crate) fn check_shared(
    roots: &[PathBuf],
    config: &VmConfig,
) -> Result<Option<StorageRoots>, Vec<(u32, String)>> {
    let fix = "move the VM with its storage (--include-storage), or make the storage shared";
    if config.disks.is_empty() {
        return Ok(None);
    }
    let roots = open_roots(roots, " that holds the shared storage")?;
    let mut out = Vec::new();
    for (index, d) in config.disks.iter().enumerate() {
        let path = d.path.display();
        let file = match roots.open_beneath(&d.path, false) {
            Ok(f) => f,
            Err(e) if e.is_outside() => {
                let e = DiskError::OutsideRoots {
                    disk: d.path.clone(),
                    layer: 0,
                    roots: roots.list(),
                };
                out.push((
                    incompatibility::STORAGE,
                    format!("disk {index} ({path}): {e}"),
                ));
                continue;
            }
            Err(StoragePathError::NotAFile { .. }) => {
                out.push((
                    incompatibility::SHARED_STORAGE,
                    format!("disk {index} ({path}): this is not a regular file here; {fix}"),
                ));
                continue;
            }
            Err(e) => {
                out.push((
                    incompatibility::SHARED_STORAGE,
                    format!(
                        "disk {index} ({path}): this host does not see the VM's image ({}); {fix}",
                        super::wire::chain(&e)
                    ),
                ));
                continue;
            }
        };
        match crate::disk::lock_holder_of(&file, &d.path) {
            Ok(Some(_)) => {}
            Ok(None) => {
                out.push((
                    incompatibility::SHARED_STORAGE,
                    format!(
                        "disk {index} ({path}): the file this host sees is not the image the VM has open at the source (nobody holds a lock on it here), so the storage is not shared with this host; {fix}"
                    ),
                ));
                continue;
            }
            Err(e) => {
                out.push((
                    incompatibility::SHARED_STORAGE,
                    format!(
                        "disk {index} ({path}): its locks cannot be read here: {}",
                        super::wire::chain(&e)
                    ),
                ));
                continue;
            }
        }
        // The whole chain, headers only, every file beneath the roots.
        match crate::disk::chain_in(
            &DiskSpec {
                path: d.path.clone(),
                format: d.format,
            },
            &roots,
        ) {
            Ok(_) => {}
            Err(e @ DiskError::OutsideRoots { .. }) => out.push((
                incompatibility::STORAGE,
                format!("disk {index} ({path}): {e}"),
            )),
            Err(_) => out.push((
                incompatibility::SHARED_STORAGE,
                format!("disk {index} ({path}): its backing chain cannot be opened here; {fix}"),
            )),
        }
    }
    if out.is_empty() {
        Ok(Some(roots))
    } else {
        Err(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn config(disks: &[(&str, &str)]) -> VmConfig {
        let mut text = String::from("name = \"vm\"\nmemory_mib = 16\nvcpus = 1\n");
        for (d, format) in disks {
            text.push_str(&format!(
                "[[disk]]\npath = \"{d}\"\nformat = \"{format}\"\n"
            ));
        }
        VmConfig::from_toml(&text, None).unwrap()
    }

    fn raw_config(disks: &[&str]) -> VmConfig {
        config(&disks.iter().map(|d| (*d, "raw")).collect::<Vec<_>>())
    }

    #[test]
    fn destinations_by_folder_and_by_source_path() {
        let c = raw_config(&["/src/a.raw", "/src/sub/b.raw"]);
        assert_eq!(
            destination_paths(&c, &StorageTarget::Folder("/dst/vm".into())).unwrap(),
            vec![
                PathBuf::from("/dst/vm/a.raw"),
                PathBuf::from("/dst/vm/b.raw")
            ]
        );
        let table = vec![
            (PathBuf::from("/src/sub/b.raw"), PathBuf::from("/d2/b.raw")),
            (PathBuf::from("/src/a.raw"), PathBuf::from("/d1/a.raw")),
        ];
        assert_eq!(
            destination_paths(&c, &StorageTarget::PerDisk(table.clone())).unwrap(),
            vec![PathBuf::from("/d1/a.raw"), PathBuf::from("/d2/b.raw")]
        );
        let e = destination_paths(&c, &StorageTarget::PerDisk(table[..1].to_vec())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "disk 0 (/src/a.raw) has no destination; give one per disk (--disk SRC=DST)"
        );
    }

    #[test]
    fn arriving_paths_are_checked_against_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let inside = root.join("vm/a.raw");
        let c = raw_config(&[inside.to_str().unwrap()]);
        assert!(check_paths(std::slice::from_ref(&root), &c).is_ok());
        let none = check_paths(&[], &c).unwrap_err();
        assert!(none[0].1.contains("no storage roots"), "{none:?}");
        let two = raw_config(&[inside.to_str().unwrap(), inside.to_str().unwrap()]);
        let e = check_paths(std::slice::from_ref(&root), &two).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].1.starts_with("disk 1: ") && e[0].1.contains("two disks"),
            "{e:?}"
        );
        let out = raw_config(&["/etc/a.raw"]);
        let e = check_paths(std::slice::from_ref(&root), &out).unwrap_err();
        assert!(e[0].1.starts_with("disk 0: "), "{e:?}");
        assert_eq!(e[0].0, incompatibility::STORAGE);
    }

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(e.path());
            if e.path().is_dir() && !e.path().is_symlink() {
                out.extend(files_under(&e.path()));
            }
        }
        out.sort();
        out
    }

    /// Announces `layers` (name, format, backing as announced, the file's bytes; the last is
    /// the active layer, its size the virtual size) and sends the parents' bytes.
    fn receive(st: &mut DestStorage, layers: &[(&str, &str, &str, Vec<u8>)], size: u64) {
        let n = layers.len();
        for (i, (name, format, backing, bytes)) in layers.iter().enumerate() {
            let active = i + 1 == n;
            let answers = st
                .announce(&DiskLayer {
                    disk: 0,
                    layer: u32::try_from(i).unwrap(),
                    format: if *format == "raw" {
                        crate::protocol::DiskFormat::Raw
                    } else {
                        crate::protocol::DiskFormat::Qcow2
                    },
                    size: if active { size } else { bytes.len() as u64 },
                    checksum: [7; 32],
                    backing: (*backing).to_string().into(),
                    name: (*name).to_string().into(),
                    active,
                })
                .unwrap();
            assert_eq!(answers.len(), if active { n } else { 0 });
        }
        for (i, (_, _, _, bytes)) in layers.iter().enumerate().take(n - 1) {
            for (b, chunk) in bytes.chunks(BLOCK).enumerate() {
                let mut block = vec![0u8; BLOCK];
                block[..chunk.len()].copy_from_slice(chunk);
                st.store(0, u32::try_from(i).unwrap(), b as u64, false, &block)
                    .unwrap();
            }
        }
    }

    #[test]
    fn a_copied_parent_naming_another_backing_file_than_announced_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap().join("root");
        std::fs::create_dir(&root).unwrap();
        let craft = dir.path().join("craft");
        std::fs::create_dir(&craft).unwrap();
        let base = vec![0x11u8; 1 << 20];
        let top = root.join("vm/top.qcow2");
        for (reference, format) in [
            ("../../etc/passwd", "raw"),
            ("/etc/passwd", "raw"),
            ("other-vm.qcow2", "qcow2"),
        ] {
            // The source announces mid.qcow2 on base.raw; its bytes name something else.
            let mid = craft.join("mid.qcow2");
            let _ = std::fs::remove_file(&mid);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                reference,
                "-F",
                format,
                mid.to_str().unwrap(),
                "1M",
            ]);
            let mut st = DestStorage::new(
                StorageRoots::new([&root]).unwrap(),
                &config(&[(top.to_str().unwrap(), "qcow2")]),
            );
            receive(
                &mut st,
                &[
                    ("base.raw", "raw", "", base.clone()),
                    (
                        "mid.qcow2",
                        "qcow2",
                        "base.raw",
                        std::fs::read(&mid).unwrap(),
                    ),
                    ("top.qcow2", "qcow2", "mid.qcow2", Vec::new()),
                ],
                1 << 20,
            );
            let e = st.parents_complete().unwrap_err();
            let text = super::super::wire::chain(&e);
            assert!(text.starts_with("disk 0 ("), "{text}");
            assert!(text.contains(top.to_str().unwrap()), "{text}");
            assert!(
                text.contains("layer 1 of the disk")
                    && text.contains("not what the source announced"),
                "{text}"
            );
            for secret in ["passwd", "etc", "other-vm"] {
                assert!(!text.contains(secret), "{reference}: {text}");
            }
            drop(st);
            // Nothing is left, not even the folder.
            assert_eq!(files_under(&root), Vec::<PathBuf>::new(), "{reference}");
        }

        // A raw parent that holds a qcow2 header (the layer above would probe it as qcow2):
        // refused too.
        let fake = craft.join("fake.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            fake.to_str().unwrap(),
            "1M",
        ]);
        let mut st = DestStorage::new(
            StorageRoots::new([&root]).unwrap(),
            &config(&[(top.to_str().unwrap(), "qcow2")]),
        );
        receive(
            &mut st,
            &[
                ("base.raw", "raw", "", std::fs::read(&fake).unwrap()),
                ("top.qcow2", "qcow2", "base.raw", Vec::new()),
            ],
            1 << 20,
        );
        let text = super::super::wire::chain(&st.parents_complete().unwrap_err());
        assert!(
            text.contains("announced as a raw image but holds a qcow2 header"),
            "{text}"
        );
        drop(st);
        assert_eq!(files_under(&root), Vec::<PathBuf>::new());

        // The honest chain is accepted, its files owner-only, the chain valid.
        let mid = craft.join("mid.qcow2");
        let _ = std::fs::remove_file(&mid);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "1M",
        ]);
        let mut st = DestStorage::new(
            StorageRoots::new([&root]).unwrap(),
            &config(&[(top.to_str().unwrap(), "qcow2")]),
        );
        receive(
            &mut st,
            &[
                ("base.raw", "raw", "", base),
                (
                    "mid.qcow2",
                    "qcow2",
                    "base.raw",
                    std::fs::read(&mid).unwrap(),
                ),
                ("top.qcow2", "qcow2", "mid.qcow2", Vec::new()),
            ],
            1 << 20,
        );
        st.parents_complete().unwrap();
        st.finish().unwrap();
        st.keep();
        drop(st);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("vm")), 0o700);
        for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
            assert_eq!(mode(&root.join("vm").join(f)), 0o600, "{f}");
        }
        qemu_img(&["check", "-q", top.to_str().unwrap()]);
    }

    #[test]
    fn a_move_writing_a_destination_file_keeps_a_second_move_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let top = root.join("vm/d.raw");
        let cfg = raw_config(&[top.to_str().unwrap()]);
        let mut first = DestStorage::new(StorageRoots::new([&root]).unwrap(), &cfg);
        receive(&mut first, &[("d.raw", "raw", "", Vec::new())], 1 << 20);
        first.parents_complete().unwrap();
        first.store(0, 0, 0, false, &vec![0xAB; BLOCK]).unwrap();
        // A second move to the same file, while the first writes it: refused, and the
        // first's partial file is untouched.
        let mut second = DestStorage::new(StorageRoots::new([&root]).unwrap(), &cfg);
        let e = second
            .announce(&DiskLayer {
                disk: 0,
                layer: 0,
                format: crate::protocol::DiskFormat::Raw,
                size: 1 << 20,
                checksum: [0; 32],
                backing: "".into(),
                name: "d.raw".into(),
                active: true,
            })
            .unwrap_err();
        let text = super::super::wire::chain(&e);
        assert!(text.contains("being written by another move"), "{text}");
        drop(second);
        let partial = root.join("vm/d.raw.vmgate-partial");
        assert!(partial.exists());
        first.finish().unwrap();
        first.keep();
        drop(first);
        assert_eq!(std::fs::read(&top).unwrap()[..BLOCK], vec![0xAB; BLOCK][..]);
    }
}
