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

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::link::SharedWriter;
use super::rate::RateLimiter;
use crate::disk::{Disk, DiskChain, DiskFormat, Sha256Digest};
use crate::protocol::{
    BatchEncoder, Compression, DiskLayer, Message, ProtocolVersion, UnitKind, stripe_channel,
};
use crate::storage::mirror::{BLOCK_SIZE, BlockSink, DiskSink, FileSink, Mirror, MirrorOptions};
use crate::storage::paths::StorageRoots;
use crate::storage::plan::{
    Cleanup, DestinationPlan, LayerAction, SourceLayer, SourcePlan, begin_file, check_space,
    create_active, describe_chain, finish_parent, plan_destination,
};
use crate::vm::{Vm, VmConfig};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOptions {
    /// Where the files go at the destination (checked there against its storage roots).
    pub target: StorageTarget,
    /// Keep the source's files after a successful move (default: the active layers are
    /// deleted; see [`super::MoveStats::source_parents`] for the read-only parents).
    pub keep_source: bool,
}

/// The destination path of each disk, in configuration order.
pub(crate) fn destination_paths(
    config: &VmConfig,
    target: &StorageTarget,
) -> Result<Vec<PathBuf>, String> {
    config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| match target {
            StorageTarget::Folder(folder) => d
                .path
                .file_name()
                .map(|n| folder.join(n))
                .ok_or_else(|| format!("disk {i} ({}) has no file name", d.path.display())),
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
                    .ok_or_else(|| {
                        format!(
                            "disk {i} ({}) has no destination; give one per disk (--disk SRC=DST)",
                            d.path.display()
                        )
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
    ) -> Result<SourceStorage, String> {
        let mut disks = Vec::new();
        for i in 0..vm.config().disks.len() {
            let disk = vm
                .disk(i)
                .ok_or_else(|| format!("disk {i} is not open in the VM"))?;
            let chain = DiskChain {
                layers: disk.layers().to_vec(),
            };
            let plan = describe_chain(&chain, cancel)
                .map_err(|e| format!("describing disk {i}: {}", super::wire::chain(&e)))?;
            disks.push(SourceDisk {
                index: u32::try_from(i).map_err(|_| "too many disks".to_string())?,
                disk,
                plan,
                mirror: None,
            });
        }
        Ok(SourceStorage {
            disks,
            answers: HashMap::new(),
            keep_source: opts.keep_source,
            bytes: 0,
            reused_bytes: 0,
            parent_bytes: 0,
        })
    }

    /// The DiskLayer announcements, base first per disk.
    pub(crate) fn announcements(&self) -> Result<Vec<Message<'static>>, String> {
        let mut out = Vec::new();
        for d in &self.disks {
            let n = d.plan.layers.len();
            for (k, l) in d.plan.layers.iter().enumerate() {
                let active = k + 1 == n;
                let name = l
                    .path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| format!("{} has no UTF-8 file name", l.path.display()))?;
                let backing = match &l.backing_name {
                    Some(b) => b
                        .to_str()
                        .ok_or_else(|| {
                            format!("the backing reference of {} is not UTF-8", l.path.display())
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
    ) -> Result<(), String> {
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
                crate::storage::mirror::copy_file(&l.path, sink, &cancel, &mut |_| {})
                    .map_err(|e| sink.why(&e))?;
                sink.end()?;
            }
        }
        self.parent_bytes = sink.data_bytes.saturating_sub(self.bytes);
        self.bytes = sink.data_bytes;
        Ok(())
    }

    /// Round 2: the bulk copy of the active layers (write tracking starts here).
    pub(crate) fn bulk(&mut self, sink: &mut WireSink<'_>, round: u32) -> Result<(), String> {
        for d in &mut self.disks {
            let top = d.plan.layers.len().saturating_sub(1);
            let layer = u32::try_from(top).unwrap_or(0);
            let mut m = Mirror::new(Arc::clone(&d.disk), MirrorOptions::default())
                .map_err(|e| super::wire::chain(&e))?;
            sink.begin(d.index, layer, round)?;
            let cancel = sink.cancel_flag();
            m.bulk(sink, &cancel, &mut |_| {})
                .map_err(|e| sink.why(&e))?;
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
    ) -> Result<(), String> {
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
            r.map_err(|e| sink.why(&e))?;
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

    /// After the handoff: deletes the active layers unless kept; returns the read-only
    /// parents (still open by this VM until it is shut down) and the files deleted.
    pub(crate) fn release(&mut self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        for d in &mut self.disks {
            d.mirror = None;
        }
        let mut parents = Vec::new();
        let mut deleted = Vec::new();
        for d in &self.disks {
            for l in d.plan.parents() {
                if !parents.contains(&l.path) {
                    parents.push(l.path.clone());
                }
            }
            if let Some(a) = d.plan.active() {
                if !self.keep_source && std::fs::remove_file(&a.path).is_ok() {
                    deleted.push(a.path.clone());
                }
            }
        }
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
    cancelled: bool,
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
    ) -> Result<WireSink<'a>, String> {
        let n = writers.len();
        let encoders = (0..n)
            .map(|_| BatchEncoder::new(version, compression).map_err(|e| e.to_string()))
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
            cancelled: false,
        })
    }

    fn cancel_flag(&self) -> AtomicBool {
        AtomicBool::new(self.cancel.is_cancelled() || self.abort.load(Ordering::SeqCst))
    }

    /// Whether a cancel (or the end of the move) stopped the copy.
    pub(crate) fn was_cancelled(&self) -> bool {
        self.cancelled
    }

    fn why(&self, e: &dyn std::error::Error) -> String {
        super::wire::chain(e)
    }

    fn begin(&mut self, disk: u32, layer: u32, round: u32) -> Result<(), String> {
        self.end()?;
        self.target = Some((disk, layer, round));
        Ok(())
    }

    /// Sends what is buffered for the current layer.
    pub(crate) fn end(&mut self) -> Result<(), String> {
        for ch in 0..self.encoders.len() {
            self.flush_channel(ch).map_err(|e| e.to_string())?;
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
            self.cancelled = true;
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
    sinks: HashMap<u32, LayerSink>,
}

/// The destination's disks of one move: planned under the storage roots, written as blocks
/// arrive, removed unless the move completes.
pub(crate) struct DestStorage {
    roots: StorageRoots,
    disks: Vec<DestDisk>,
    actives_created: bool,
    /// Last: everything above is dropped (files closed) before it removes the files.
    cleanup: Cleanup,
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
                    sinks: HashMap::new(),
                })
                .collect(),
            actives_created: false,
            cleanup: Cleanup::new(),
        }
    }

    /// A layer was announced. When it is a disk's active layer, the chain is planned (paths,
    /// reuse by checksum, free space), the copied parents' files are created, and the
    /// answers for every layer of the disk are returned.
    pub(crate) fn announce(&mut self, l: &DiskLayer<'_>) -> Result<Vec<(u32, u32, bool)>, String> {
        let d = self
            .disks
            .get_mut(usize_of(u64::from(l.disk)))
            .ok_or_else(|| format!("disk {} is not in the configuration", l.disk))?;
        if d.plan.is_some() {
            return Err(format!(
                "disk {} was announced after its active layer",
                l.disk
            ));
        }
        if usize_of(u64::from(l.layer)) != d.announced.len() {
            return Err(format!(
                "disk {} layer {} was announced out of order (expected layer {})",
                l.disk,
                l.layer,
                d.announced.len()
            ));
        }
        let format = from_wire(l.format);
        let backing_name = if l.backing.is_empty() {
            None
        } else {
            Some(PathBuf::from(l.backing.as_ref()))
        };
        if l.layer == 0 && backing_name.is_some() {
            return Err(format!("disk {} layer 0 names a backing file", l.disk));
        }
        if l.active && format != d.format {
            return Err(format!(
                "disk {}'s active layer is {format:?} but the configuration says {:?}",
                l.disk, d.format
            ));
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
        });
        d.sizes.push(l.size);
        if !l.active {
            return Ok(Vec::new());
        }
        let source = SourcePlan {
            layers: d.announced.clone(),
        };
        let plan = plan_destination(&source, &d.target, &self.roots, 0)
            .map_err(|e| super::wire::chain(&e))?;
        if let Some(folder) = plan.folder() {
            check_space(folder, plan.bytes_needed).map_err(|e| super::wire::chain(&e))?;
        }
        self.cleanup
            .create_folders(&plan.folders)
            .map_err(|e| super::wire::chain(&e))?;
        let mut answers = Vec::new();
        for dl in &plan.layers {
            match dl.action {
                LayerAction::Copy => {
                    let file =
                        begin_file(dl, &mut self.cleanup).map_err(|e| super::wire::chain(&e))?;
                    d.sinks
                        .insert(dl.layer, LayerSink::File(FileSink::new(file)));
                    answers.push((l.disk, dl.layer, false));
                }
                LayerAction::Reuse => answers.push((l.disk, dl.layer, true)),
                LayerAction::Mirror => answers.push((l.disk, dl.layer, false)),
            }
        }
        d.plan = Some(plan);
        Ok(answers)
    }

    /// Round 1 is complete: the copied parents are finished (backing references rewritten,
    /// durable, renamed into place) and the active layers created on them.
    pub(crate) fn parents_complete(&mut self) -> Result<(), String> {
        if self.actives_created {
            return Ok(());
        }
        self.actives_created = true;
        for d in &mut self.disks {
            let Some(plan) = &d.plan else {
                return Err("a disk's layers were never announced".into());
            };
            for dl in &plan.layers {
                match dl.action {
                    LayerAction::Copy => {
                        if let Some(LayerSink::File(mut f)) = d.sinks.remove(&dl.layer) {
                            f.flush()
                                .map_err(|e| format!("flushing {}: {e}", dl.partial.display()))?;
                        }
                        finish_parent(dl, &mut self.cleanup).map_err(|e| super::wire::chain(&e))?;
                    }
                    LayerAction::Reuse => {}
                    LayerAction::Mirror => {
                        let disk = create_active(dl, &mut self.cleanup)
                            .map_err(|e| super::wire::chain(&e))?;
                        d.sinks
                            .insert(dl.layer, LayerSink::Active(DiskSink::new(Arc::new(disk))));
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the active layers' data so far durable (during pre-copy, so that the flush with
    /// the VM paused has only the last blocks to write).
    pub(crate) fn sync_actives(&mut self) -> Result<(), String> {
        for d in &mut self.disks {
            for sink in d.sinks.values_mut() {
                if let LayerSink::Active(s) = sink {
                    s.flush()
                        .map_err(|e| format!("flushing disk {}: {e}", d.target.display()))?;
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
    ) -> Result<(), String> {
        let d = self
            .disks
            .get_mut(usize_of(u64::from(disk)))
            .ok_or_else(|| format!("disk {disk} is not in the configuration"))?;
        let size = d
            .sizes
            .get(usize_of(u64::from(layer)))
            .copied()
            .ok_or_else(|| format!("disk {disk} layer {layer} was not announced"))?;
        let start = index.saturating_mul(BLOCK_SIZE);
        let len = size.saturating_sub(start).min(BLOCK_SIZE);
        let sink: &mut dyn BlockSink = match d.sinks.get_mut(&layer) {
            Some(LayerSink::File(f)) => f,
            Some(LayerSink::Active(a)) => a,
            None => {
                return Err(format!(
                    "disk {disk} layer {layer} has no file to write to (its blocks came too early or too late)"
                ));
            }
        };
        let r = if zero {
            sink.write_zeroes(index, len)
        } else {
            sink.write_block(index, data.get(..usize_of(len)).unwrap_or(data))
        };
        r.map_err(|e| {
            if crate::storage::mirror::io_is_no_space(&e) {
                format!("the destination's disk is full writing disk {disk} ({e})")
            } else {
                format!("writing block {index} of disk {disk} layer {layer} failed: {e}")
            }
        })
    }

    /// Everything arrived (the VM is paused at the source): the active layers are made
    /// durable, closed, and renamed to their final names, where the VM opens them.
    pub(crate) fn finish(&mut self) -> Result<(), String> {
        if !self.actives_created {
            return Err("the disks' active layers were never created".into());
        }
        for d in &mut self.disks {
            let Some(plan) = &d.plan else {
                return Err("a disk's layers were never announced".into());
            };
            let Some(active) = plan.active() else {
                return Err("a disk has no active layer".into());
            };
            if let Some(LayerSink::Active(mut s)) = d.sinks.remove(&active.layer) {
                s.flush()
                    .map_err(|e| format!("flushing {}: {e}", active.partial.display()))?;
            }
            crate::storage::plan::commit_file(&active.partial, &active.path, &mut self.cleanup)
                .map_err(|e| super::wire::chain(&e))?;
            wait_unlocked(&active.path, active.format)?;
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
fn wait_unlocked(path: &std::path::Path, format: DiskFormat) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match crate::storage::plan::open_layer(path, format) {
            Ok(_) => return Ok(()),
            Err(crate::storage::plan::PlanError::Image {
                source: crate::disk::DiskError::InUse { .. },
                ..
            }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(super::wire::chain(&e)),
        }
    }
}

/// Checks the disk paths of an arriving configuration against `roots`: inside a root, no
/// `..`, no symbolic-link escape, not an existing file. Every problem, one line each.
pub(crate) fn check_paths(
    roots: &[PathBuf],
    config: &VmConfig,
) -> Result<StorageRoots, Vec<String>> {
    if roots.is_empty() {
        return Err(vec![
            "this host takes no VM storage in a move: it has no storage roots configured; configure one, or move the VM's storage elsewhere first".into(),
        ]);
    }
    let roots = StorageRoots::new(roots).map_err(|e| vec![super::wire::chain(&e)])?;
    let mut problems = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for (i, d) in config.disks.iter().enumerate() {
        match roots.check_file(&d.path, false) {
            Ok(c) => {
                if seen.contains(&c.path) {
                    problems.push(format!(
                        "disk {i}: {} is the destination of two disks",
                        d.path.display()
                    ));
                }
                seen.push(c.path);
            }
            Err(e) => problems.push(format!("disk {i}: {}", super::wire::chain(&e))),
        }
    }
    if problems.is_empty() {
        Ok(roots)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(disks: &[&str]) -> VmConfig {
        let mut text = String::from("name = \"vm\"\nmemory_mib = 16\nvcpus = 1\n");
        for d in disks {
            text.push_str(&format!("[[disk]]\npath = \"{d}\"\nformat = \"raw\"\n"));
        }
        VmConfig::from_toml(&text, None).unwrap()
    }

    #[test]
    fn destinations_by_folder_and_by_source_path() {
        let c = config(&["/src/a.raw", "/src/sub/b.raw"]);
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
            e,
            "disk 0 (/src/a.raw) has no destination; give one per disk (--disk SRC=DST)"
        );
    }

    #[test]
    fn arriving_paths_are_checked_against_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let inside = root.join("vm/a.raw");
        let c = config(&[inside.to_str().unwrap()]);
        assert!(check_paths(std::slice::from_ref(&root), &c).is_ok());
        let none = check_paths(&[], &c).unwrap_err();
        assert!(none[0].contains("no storage roots"), "{none:?}");
        let two = config(&[inside.to_str().unwrap(), inside.to_str().unwrap()]);
        let e = check_paths(std::slice::from_ref(&root), &two).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("disk 1: ") && e[0].contains("two disks"),
            "{e:?}"
        );
        let out = config(&["/etc/a.raw"]);
        let e = check_paths(std::slice::from_ref(&root), &out).unwrap_err();
        assert!(e[0].starts_with("disk 0: "), "{e:?}");
    }
}
