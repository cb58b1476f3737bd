//! Disk mirroring: copy a disk's active layer while the guest writes to it, then the blocks it
//! wrote meanwhile, round after round, and the last ones with the VM paused.
//!
//! ```text
//!   Mirror::bulk        take_dirty() (start tracking), copy Disk::allocated() of the top layer
//!   Mirror::converge    rounds of: take_dirty(), copy those blocks   (at least one round,
//!                       until at most `converge_blocks` are dirty or `max_rounds` passed)
//!   -- the caller pauses the VM --
//!   Mirror::finish      take_dirty(), copy those blocks, flush the sink
//! ```
//!
//! Blocks are [`BLOCK_SIZE`] (64 KiB, the unit of [`Disk::take_dirty`] and of the protocol's
//! DiskBlocks), numbered from offset 0 of the virtual disk; the last block of a disk whose
//! size is not a multiple of 64 KiB is shorter. Where the blocks go is a [`BlockSink`]: a file
//! for a local storage move ([`DiskSink`]), the wire for the engine.
//!
//! A disk has one write-tracking bitmap, and `take_dirty` empties it: run one mirror per disk
//! at a time, and nothing else that takes the disk's dirty blocks meanwhile.
//!
//! Read-only parents of a chain never change; they are copied as files, byte for byte
//! ([`copy_file`], through the same sink trait, block `n` being bytes `n * 64 KiB..` of the
//! file), so the copy has the same SHA-256 as the original.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::disk::{DIRTY_BLOCK_SIZE, Disk, DiskError};

/// The mirror's block size (64 KiB).
pub const BLOCK_SIZE: u64 = DIRTY_BLOCK_SIZE;

/// Where mirrored blocks go.
///
/// `first` / `index` are block numbers (offset / [`BLOCK_SIZE`]); data is whole blocks except
/// at the end of the disk or file. A sink reports failures as `io::Error`, keeping the OS
/// error where there is one (so a full destination shows as `ENOSPC`).
pub trait BlockSink {
    /// Writes one block.
    fn write_block(&mut self, index: u64, data: &[u8]) -> io::Result<()>;

    /// Writes consecutive blocks from `first`. The default writes them one by one.
    fn write_blocks(&mut self, first: u64, data: &[u8]) -> io::Result<()> {
        for (i, chunk) in data.chunks(block_len()).enumerate() {
            self.write_block(first + u64::try_from(i).unwrap_or(u64::MAX), chunk)?;
        }
        Ok(())
    }

    /// Makes `len` bytes from block `first` read as zeroes. The default writes zero blocks.
    fn write_zeroes(&mut self, first: u64, len: u64) -> io::Result<()> {
        let zero = vec![0u8; block_len()];
        let mut index = first;
        let mut left = len;
        while left > 0 {
            let n = left.min(BLOCK_SIZE);
            self.write_block(index, zero.get(..usize_of(n)).unwrap_or(&zero))?;
            left -= n;
            index += 1;
        }
        Ok(())
    }

    /// Makes everything written so far durable (or, for the wire, sent).
    fn flush(&mut self) -> io::Result<()>;
}

fn block_len() -> usize {
    usize_of(BLOCK_SIZE)
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Errors of the mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// Another mirror of the same disk exists (both would take its dirty blocks).
    #[error(
        "disk {} is already being mirrored; wait until that move ends or cancel it",
        .path.display()
    )]
    Busy {
        /// The disk's top layer.
        path: PathBuf,
    },
    /// The caller's cancel flag was raised.
    #[error("the copy was cancelled")]
    Cancelled,
    /// Mapping the source layer failed.
    #[error("cannot find the allocated parts of {}", .path.display())]
    Map {
        /// The source.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Reading the source failed.
    #[error("cannot read block {block} of {}", .path.display())]
    Read {
        /// The source.
        path: PathBuf,
        /// The first block of the read.
        block: u64,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Reading a source file (a parent layer) failed.
    #[error("cannot read {}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The sink refused a block.
    #[error("cannot write block {block} to the destination")]
    Write {
        /// The first block of the write.
        block: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The sink could not flush.
    #[error("cannot make the destination durable")]
    Flush(#[source] io::Error),
}

impl MirrorError {
    /// Whether the destination ran out of space (`ENOSPC`, `EDQUOT`).
    pub fn is_no_space(&self) -> bool {
        match self {
            MirrorError::Write { source, .. } | MirrorError::Flush(source) => {
                io_is_no_space(source)
            }
            _ => false,
        }
    }
}

/// Whether `e` (or an error it wraps) says the file system is full.
pub fn io_is_no_space(e: &io::Error) -> bool {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
    {
        return true;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(inner) = s.downcast_ref::<io::Error>() {
            if matches!(inner.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// The mirror's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorPhase {
    /// Not started.
    Idle,
    /// Copying the allocated parts of the layer.
    Bulk,
    /// Re-copying blocks written meanwhile.
    Dirty,
    /// The last pass, with the VM paused.
    Final,
    /// Done: the destination holds the disk as it was at the final pass.
    Done,
}

/// How far the mirror is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MirrorProgress {
    /// The phase.
    pub phase: MirrorPhase,
    /// Dirty rounds started (0 during the bulk copy).
    pub round: u32,
    /// Bytes handed to the sink so far (data and zeroed ranges).
    pub bytes_copied: u64,
    /// Blocks handed to the sink so far.
    pub blocks_copied: u64,
    /// Bytes the bulk copy covers (the layer's allocated parts, whole blocks).
    pub bulk_bytes: u64,
    /// Blocks written by the guest and not copied yet (as of the last look).
    pub dirty_blocks: u64,
}

/// Tuning of the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorOptions {
    /// Converged when at most this many blocks are dirty after a round (they are copied with
    /// the VM paused). Default 64 blocks = 4 MiB.
    pub converge_blocks: u64,
    /// Most dirty rounds before giving up on converging (the final pass then copies whatever
    /// is left, with the VM paused). Default 30.
    pub max_rounds: u32,
    /// Largest single read from the source, in blocks. Default 16 (1 MiB).
    pub chunk_blocks: u64,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            converge_blocks: 64,
            max_rounds: 30,
            chunk_blocks: 16,
        }
    }
}

/// What [`Mirror::converge`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Convergence {
    /// Rounds run.
    pub rounds: u32,
    /// Dirty blocks left for the final pass.
    pub remaining: u64,
    /// Whether the remaining set fell to `converge_blocks` (false: stopped at `max_rounds`).
    pub converged: bool,
}

/// A mirror of one disk's active layer into a [`BlockSink`].
#[derive(Debug)]
pub struct Mirror {
    disk: Arc<Disk>,
    options: MirrorOptions,
    progress: MirrorProgress,
    buf: Vec<u8>,
}

/// The disks (by the address of their shared [`Disk`]) that have a [`Mirror`] now.
static MIRRORED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

fn mirrored() -> std::sync::MutexGuard<'static, Vec<usize>> {
    // The list stays consistent if a holder panicked: every change is a single push/retain.
    MIRRORED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let key = Arc::as_ptr(&self.disk).addr();
        mirrored().retain(|&k| k != key);
    }
}

impl Mirror {
    /// A mirror of `disk` (nothing happens until [`Mirror::bulk`]). One mirror per disk at a
    /// time: a second one is refused with [`MirrorError::Busy`] until the first is dropped.
    pub fn new(disk: Arc<Disk>, options: MirrorOptions) -> Result<Mirror, MirrorError> {
        let key = Arc::as_ptr(&disk).addr();
        {
            let mut list = mirrored();
            if list.contains(&key) {
                return Err(MirrorError::Busy {
                    path: disk.path().to_path_buf(),
                });
            }
            list.push(key);
        }
        let options = MirrorOptions {
            chunk_blocks: options.chunk_blocks.clamp(1, 1024),
            ..options
        };
        Ok(Mirror {
            disk,
            options,
            progress: MirrorProgress {
                phase: MirrorPhase::Idle,
                round: 0,
                bytes_copied: 0,
                blocks_copied: 0,
                bulk_bytes: 0,
                dirty_blocks: 0,
            },
            buf: Vec::new(),
        })
    }

    /// The disk mirrored.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Progress so far.
    pub fn progress(&self) -> MirrorProgress {
        self.progress
    }

    /// Starts write tracking, then copies every part of the top layer that holds data of its
    /// own (see [`Disk::allocated`]): data as blocks, explicit zero clusters as zeroed ranges.
    /// Parts that come from a parent or read as zeroes are not sent.
    pub fn bulk(
        &mut self,
        sink: &mut dyn BlockSink,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<(), MirrorError> {
        // Writes from here on are tracked; earlier marks are covered by the bulk copy.
        let _ = self.disk.take_dirty();
        self.progress.phase = MirrorPhase::Bulk;
        let extents = self.disk.allocated().map_err(|source| MirrorError::Map {
            path: self.disk.path().to_path_buf(),
            source,
        })?;
        // Whole blocks: data extents rounded outwards, zero extents inwards (their partial
        // edge blocks are copied as data, since they may share a block with data).
        // Extents are sorted and disjoint, so rounded runs can only share an edge block
        // between two data runs; `done` skips it the second time.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut done = 0u64;
        let mut push = |first: u64, end: u64, zero: bool| {
            let first = first.max(done);
            if end <= first {
                return;
            }
            done = end;
            match runs.last_mut() {
                Some(last) if last.1 == first && last.2 == zero => last.1 = end,
                _ => runs.push((first, end, zero)),
            }
        };
        for e in &extents {
            let end = e.offset + e.len;
            if e.zero {
                let inner_first = e.offset.div_ceil(BLOCK_SIZE);
                let inner_end = end / BLOCK_SIZE;
                if inner_first >= inner_end {
                    push(e.offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE), false);
                    continue;
                }
                push(e.offset / BLOCK_SIZE, inner_first, false);
                push(inner_first, inner_end, true);
                push(inner_end, end.div_ceil(BLOCK_SIZE), false);
            } else {
                push(e.offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE), false);
            }
        }
        self.progress.bulk_bytes = runs.iter().map(|r| self.run_bytes(r.0, r.1 - r.0)).sum();
        report(&self.progress);
        for (first, end, zero) in runs {
            if zero {
                check_cancel(cancel)?;
                let len = self.run_bytes(first, end - first);
                sink.write_zeroes(first, len)
                    .map_err(|source| MirrorError::Write {
                        block: first,
                        source,
                    })?;
                self.progress.bytes_copied += len;
                self.progress.blocks_copied += end - first;
                report(&self.progress);
            } else {
                self.copy_run(sink, first, end - first, cancel, report)?;
            }
        }
        self.progress.dirty_blocks = self.disk.dirty_count();
        report(&self.progress);
        Ok(())
    }

    /// One round: copies the blocks written since the previous round (or since the bulk copy
    /// started). Returns how many blocks it copied.
    pub fn dirty_round(
        &mut self,
        sink: &mut dyn BlockSink,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<u64, MirrorError> {
        check_cancel(cancel)?;
        if self.progress.phase != MirrorPhase::Final {
            self.progress.phase = MirrorPhase::Dirty;
            self.progress.round += 1;
        }
        let dirty = self.disk.take_dirty();
        let count = dirty.count();
        self.progress.dirty_blocks = count;
        report(&self.progress);
        // Consecutive dirty blocks go as one run.
        let mut run: Option<(u64, u64)> = None;
        for b in dirty.blocks() {
            match &mut run {
                Some((first, n)) if *first + *n == b && *n < self.options.chunk_blocks => *n += 1,
                _ => {
                    if let Some((first, n)) = run.take() {
                        self.copy_run(sink, first, n, cancel, report)?;
                    }
                    run = Some((b, 1));
                }
            }
        }
        if let Some((first, n)) = run {
            self.copy_run(sink, first, n, cancel, report)?;
        }
        self.progress.dirty_blocks = self.disk.dirty_count();
        report(&self.progress);
        Ok(count)
    }

    /// Dirty rounds until at most `converge_blocks` blocks are dirty (at least one round), or
    /// `max_rounds` rounds have run; then flushes the sink.
    pub fn converge(
        &mut self,
        sink: &mut dyn BlockSink,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<Convergence, MirrorError> {
        let mut rounds = 0;
        loop {
            self.dirty_round(sink, cancel, report)?;
            rounds += 1;
            let remaining = self.disk.dirty_count();
            let converged = remaining <= self.options.converge_blocks;
            if converged || rounds >= self.options.max_rounds {
                // Make the bulk of the copy durable now, so the final pass' flush (with the
                // VM paused) has little left to write.
                sink.flush().map_err(MirrorError::Flush)?;
                return Ok(Convergence {
                    rounds,
                    remaining,
                    converged,
                });
            }
        }
    }

    /// The final pass, to be called with the VM paused (no guest write in flight): copies the
    /// last dirty blocks and flushes the sink. Afterwards the sink holds the disk exactly.
    pub fn finish(
        &mut self,
        sink: &mut dyn BlockSink,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<(), MirrorError> {
        self.final_pass(sink, cancel, report)?;
        sink.flush().map_err(MirrorError::Flush)
    }

    /// [`Mirror::finish`] without the flush, for a caller that flushes the destination after
    /// resuming the VM (the local move: the flush then costs no pause, and it happens before
    /// the old files are deleted).
    pub fn final_pass(
        &mut self,
        sink: &mut dyn BlockSink,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<(), MirrorError> {
        self.progress.phase = MirrorPhase::Final;
        self.dirty_round(sink, cancel, report)?;
        self.progress.phase = MirrorPhase::Done;
        self.progress.dirty_blocks = 0;
        report(&self.progress);
        Ok(())
    }

    /// Bytes in `n` blocks from `first`, clipped to the disk's end.
    fn run_bytes(&self, first: u64, n: u64) -> u64 {
        let start = first.saturating_mul(BLOCK_SIZE).min(self.disk.size());
        let end = (first.saturating_add(n))
            .saturating_mul(BLOCK_SIZE)
            .min(self.disk.size());
        end - start
    }

    /// Copies blocks `first..first + n` in reads of at most `chunk_blocks`.
    fn copy_run(
        &mut self,
        sink: &mut dyn BlockSink,
        first: u64,
        n: u64,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&MirrorProgress),
    ) -> Result<(), MirrorError> {
        let mut at = first;
        let end = first + n;
        while at < end {
            check_cancel(cancel)?;
            let k = (end - at).min(self.options.chunk_blocks);
            let len = self.run_bytes(at, k);
            if len == 0 {
                break;
            }
            self.buf.resize(usize_of(len), 0);
            self.disk
                .read_at(&mut self.buf, at * BLOCK_SIZE)
                .map_err(|source| MirrorError::Read {
                    path: self.disk.path().to_path_buf(),
                    block: at,
                    source,
                })?;
            sink.write_blocks(at, &self.buf)
                .map_err(|source| MirrorError::Write { block: at, source })?;
            self.progress.bytes_copied += len;
            self.progress.blocks_copied += k;
            report(&self.progress);
            at += k;
        }
        Ok(())
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), MirrorError> {
    if cancel.load(Ordering::Relaxed) {
        Err(MirrorError::Cancelled)
    } else {
        Ok(())
    }
}

/// The `io::Error` inside a disk error, keeping the OS error code (for `ENOSPC`).
pub fn disk_io_error(e: DiskError) -> io::Error {
    match e {
        DiskError::Io { source, .. }
        | DiskError::Flush { source, .. }
        | DiskError::Create { source, .. } => source,
        other => io::Error::other(other),
    }
}

/// A sink that writes into an open, writable [`Disk`] (the local storage move's destination).
#[derive(Debug)]
pub struct DiskSink {
    disk: Arc<Disk>,
}

impl DiskSink {
    /// A sink into `disk`.
    pub fn new(disk: Arc<Disk>) -> DiskSink {
        DiskSink { disk }
    }

    /// The destination disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

impl BlockSink for DiskSink {
    fn write_block(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
        self.write_blocks(index, data)
    }

    fn write_blocks(&mut self, first: u64, data: &[u8]) -> io::Result<()> {
        self.disk
            .write_at(data, first * BLOCK_SIZE)
            .map_err(disk_io_error)
    }

    fn write_zeroes(&mut self, first: u64, len: u64) -> io::Result<()> {
        self.disk
            .write_zeroes(first * BLOCK_SIZE, len)
            .map_err(disk_io_error)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush().map_err(disk_io_error)
    }
}

/// A sink that writes bytes into a plain file at `block * 64 KiB` (a parent layer's copy).
#[derive(Debug)]
pub struct FileSink {
    file: File,
}

impl FileSink {
    /// A sink into `file` (open for writing).
    pub fn new(file: File) -> FileSink {
        FileSink { file }
    }

    /// Gives the file back.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl BlockSink for FileSink {
    fn write_block(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, index * BLOCK_SIZE)
    }

    fn write_blocks(&mut self, first: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, first * BLOCK_SIZE)
    }

    fn write_zeroes(&mut self, _first: u64, _len: u64) -> io::Result<()> {
        // The copy is a new sparse file: unwritten ranges already read as zeroes.
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// Copies the file at `path` byte for byte into `sink`, block `n` being bytes
/// `n * 64 KiB..` of the file; holes of a sparse file are skipped (the destination file is
/// created sparse, with the source's length). Returns the bytes copied. Used for read-only
/// parents, which do not change while they are copied.
pub fn copy_file(
    path: &Path,
    sink: &mut dyn BlockSink,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(u64),
) -> Result<u64, MirrorError> {
    let read_err = |source| MirrorError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let extents = file_data_extents(&file, size).map_err(read_err)?;
    let chunk = 16 * BLOCK_SIZE;
    let mut buf = vec![0u8; usize_of(chunk)];
    let mut copied = 0;
    let mut done_until = 0u64;
    for (offset, len) in extents {
        // Whole blocks, never the same block twice.
        let mut at = (offset / BLOCK_SIZE * BLOCK_SIZE).max(done_until);
        let end = (offset + len)
            .div_ceil(BLOCK_SIZE)
            .saturating_mul(BLOCK_SIZE)
            .min(size);
        while at < end {
            check_cancel(cancel)?;
            let n = (end - at).min(chunk);
            let part = buf.get_mut(..usize_of(n)).unwrap_or_default();
            file.read_exact_at(part, at).map_err(read_err)?;
            sink.write_blocks(at / BLOCK_SIZE, part)
                .map_err(|source| MirrorError::Write {
                    block: at / BLOCK_SIZE,
                    source,
                })?;
            copied += n;
            at += n;
            report(copied);
        }
        done_until = done_until.max(end);
    }
    sink.flush().map_err(MirrorError::Flush)?;
    Ok(copied)
}

/// The data extents of a file (SEEK_DATA/SEEK_HOLE); where the file system cannot say, the
/// whole file.
pub(crate) fn file_data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos = 0u64;
    let off = |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    while pos < size {
        let data = match lseek(file, off(pos)?, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(size),
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => {
                out.push((pos, size - pos));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = u64::try_from(lseek(file, off(data)?, Whence::SeekHole)?)
            .unwrap_or(size)
            .min(size);
        if hole <= data {
            out.push((data, size - data));
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskFormat, DiskSpec, create_qcow2, create_raw};

    /// A sink that records what it got, and can fail after some blocks.
    #[derive(Default)]
    struct Recorder {
        blocks: std::collections::BTreeMap<u64, Vec<u8>>,
        zeroed: Vec<(u64, u64)>,
        fail_after: Option<usize>,
        flushed: bool,
    }

    impl BlockSink for Recorder {
        fn write_block(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
            if self.fail_after.is_some_and(|n| self.blocks.len() >= n) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.blocks.insert(index, data.to_vec());
            Ok(())
        }
        fn write_zeroes(&mut self, first: u64, len: u64) -> io::Result<()> {
            self.zeroed.push((first, len));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushed = true;
            Ok(())
        }
    }

    fn open(path: &Path, format: DiskFormat) -> Arc<Disk> {
        Arc::new(
            Disk::open(
                &DiskSpec {
                    path: path.to_path_buf(),
                    format,
                },
                true,
            )
            .unwrap(),
        )
    }

    #[test]
    fn bulk_copies_allocated_blocks_and_rounds_copy_what_was_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        // 1 MiB + 4 KiB: the last block is short.
        let size = (1 << 20) + 4096;
        create_qcow2(&p, Some(size), None).unwrap();
        let disk = open(&p, DiskFormat::Qcow2);
        disk.write_at(&[1u8; 4096], 3 * BLOCK_SIZE + 100).unwrap();
        disk.write_at(&[2u8; 4096], 1 << 20).unwrap();
        disk.write_zeroes(8 * BLOCK_SIZE, 2 * BLOCK_SIZE).unwrap();

        let cancel = AtomicBool::new(false);
        let mut m = Mirror::new(Arc::clone(&disk), MirrorOptions::default()).unwrap();
        // One mirror per disk.
        let e = Mirror::new(Arc::clone(&disk), MirrorOptions::default()).unwrap_err();
        assert!(matches!(e, MirrorError::Busy { .. }), "{e}");
        let mut sink = Recorder::default();
        let mut seen = Vec::new();
        m.bulk(&mut sink, &cancel, &mut |p| seen.push(*p)).unwrap();
        assert_eq!(sink.blocks.keys().copied().collect::<Vec<_>>(), vec![3, 16]);
        assert_eq!(sink.blocks[&16].len(), 4096, "the short last block");
        assert_eq!(sink.blocks[&3][100], 1);
        assert_eq!(sink.zeroed, vec![(8, 2 * BLOCK_SIZE)]);
        assert_eq!(
            seen.first().unwrap().bulk_bytes,
            BLOCK_SIZE + 4096 + 2 * BLOCK_SIZE
        );

        // Guest writes during the copy are picked up by the rounds.
        disk.write_at(&[5u8; 512], 5 * BLOCK_SIZE).unwrap();
        let c = m.converge(&mut sink, &cancel, &mut |_| {}).unwrap();
        assert_eq!((c.rounds, c.remaining, c.converged), (1, 0, true));
        assert_eq!(sink.blocks[&5][0], 5);
        disk.write_at(&[6u8; 512], 7 * BLOCK_SIZE).unwrap();
        m.finish(&mut sink, &cancel, &mut |_| {}).unwrap();
        assert_eq!(sink.blocks[&7][0], 6);
        assert!(sink.flushed);
        assert_eq!(m.progress().phase, MirrorPhase::Done);
        assert_eq!(m.progress().round, 1);
    }

    #[test]
    fn cancel_and_sink_failures_stop_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        create_raw(&p, 4 << 20).unwrap();
        let disk = open(&p, DiskFormat::Raw);
        disk.write_at(&vec![9u8; 4 << 20], 0).unwrap();

        let cancel = AtomicBool::new(false);
        let mut m = Mirror::new(
            Arc::clone(&disk),
            MirrorOptions {
                chunk_blocks: 1,
                ..MirrorOptions::default()
            },
        )
        .unwrap();
        let mut sink = Recorder::default();
        let e = m
            .bulk(&mut sink, &cancel, &mut |p| {
                if p.blocks_copied >= 3 {
                    cancel.store(true, Ordering::Relaxed);
                }
            })
            .unwrap_err();
        assert!(matches!(e, MirrorError::Cancelled), "{e}");
        assert_eq!(sink.blocks.len(), 3);

        let cancel = AtomicBool::new(false);
        drop(m);
        let mut m = Mirror::new(disk, MirrorOptions::default()).unwrap();
        let mut sink = Recorder {
            fail_after: Some(20),
            ..Recorder::default()
        };
        let e = m.bulk(&mut sink, &cancel, &mut |_| {}).unwrap_err();
        assert!(e.is_no_space(), "{e}");
        assert!(matches!(e, MirrorError::Write { block: 16, .. }), "{e:?}");
    }

    #[test]
    fn copy_file_is_byte_for_byte_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(3 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 70_000], (2 << 20) + 5).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        let out = File::create(&dst).unwrap();
        out.set_len(3 << 20).unwrap();
        let mut sink = FileSink::new(out);
        let copied = copy_file(&src, &mut sink, &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert!(copied < 1 << 20, "holes are skipped: {copied}");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }
}
