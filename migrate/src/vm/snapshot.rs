//! Snapshot files: header + guest memory (sparse) + page table + VM state.
//!
//! ```text
//! offset 0          header (one 4 KiB page; 64 bytes used, little-endian)
//!                     0  magic "VMGSNAP\0"      8  version (u32) = 1
//!                    12  page size (u32)        16  RAM pages (u64)
//!                    24  memory offset (u64)    32  table offset (u64)
//!                    40  state offset (u64)     48  state length (u64)
//!                    56  CRC-32 of the table    60  CRC-32 of bytes 0..60
//! offset 4096       memory: page i at 4096 + i × 4096 (dense page index); zero pages are
//!                   not written (holes in a sparse file) and flagged absent in the table
//! table offset      presence bitmap (u64 words) + CRC-32 of every present page (u32 each)
//! state offset      the VM state container (see `state`; own magic, version, cap, CRC)
//! ```
//!
//! Memory comes first so that a live snapshot can write pages at their final place while
//! the guest runs: round 0 copies every page, later rounds copy the pages the guest (or the
//! VMM) dirtied since the previous round, then the VM is paused and the last dirty pages
//! are copied — the same dirty-tracking sequence the live migration uses. The test-only
//! fault switch [`SnapshotOptions::drop_dirty_page`] skips one page in that last copy, which
//! the checkers must then catch on the restored image.
//!
//! Reading checks the header (length, magic, checksum, version, page size, offsets, the
//! state's length against its 64 MiB cap and the file's length) before it allocates or
//! reads anything else, then the state container, then that the memory size matches the
//! state's configuration, then the table's checksum, and every page's checksum as it loads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::check::{CheckError, CheckReport, GuestPages, check_all};
use super::dirty::{DirtyBitmap, iter_words};
use super::layout::{MAX_MEMORY_MIB, MemoryLayout, PAGE_BYTES, PAGE_SIZE};
use super::state::{MAX_STATE_BYTES, StateError, VmState};
use super::{GuestMem, Vm, VmError, VmOptions, resolve_disk_regions};
use crate::disk::{Disk, DiskError};

/// Magic at the start of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"VMGSNAP\0";
/// Snapshot format version written and read.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Bytes of the header region (the memory starts after it).
pub const HEADER_REGION: u64 = 4096;
const HEADER_USED: usize = 64;
/// Most pages a snapshot may hold (the largest guest).
pub const MAX_PAGES: u64 = (MAX_MEMORY_MIB << 20) / PAGE_SIZE;
/// Pages copied per read/write run.
const RUN_PAGES: u64 = 256;

/// Errors of snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("cannot {op} the snapshot file {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a snapshot.
    #[error("{path} is not a vmgate snapshot: it does not start with \"VMGSNAP\"")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// Shorter than its header says.
    #[error(
        "the snapshot file is truncated: it has {len} bytes but its header describes {expected}"
    )]
    Truncated {
        /// Bytes present.
        len: u64,
        /// Bytes described.
        expected: u64,
    },
    /// Longer than its header says.
    #[error(
        "the snapshot file has {extra} bytes after its end; it is not a complete vmgate snapshot"
    )]
    Trailing {
        /// Extra bytes.
        extra: u64,
    },
    /// The header's checksum does not match.
    #[error("the snapshot's header is corrupt: its checksum does not match")]
    CorruptHeader,
    /// Another format version.
    #[error("the snapshot has format version {found}; this vmgate reads version {supported} only")]
    UnsupportedVersion {
        /// In the file.
        found: u32,
        /// Understood.
        supported: u32,
    },
    /// The state section is larger than the cap.
    #[error(
        "the snapshot announces a VM state of {len} bytes, more than the limit of {max} bytes; refusing to read it"
    )]
    Oversized {
        /// Announced.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Offsets or sizes in the header do not fit together.
    #[error("the snapshot's header is inconsistent: {0}")]
    BadLayout(String),
    /// The state section is unusable.
    #[error("the snapshot's VM state is unusable")]
    State(#[from] StateError),
    /// The memory size does not match the state's configuration.
    #[error("the snapshot holds {found} pages of memory but its VM configuration has {expected}")]
    MemoryMismatch {
        /// In the header.
        found: u64,
        /// From the config.
        expected: u64,
    },
    /// The page table's checksum does not match.
    #[error("the snapshot's page table is corrupt: its checksum does not match")]
    CorruptTable,
    /// A page's checksum does not match.
    #[error("guest page {gpa:#x} in the snapshot is corrupt: its checksum does not match")]
    CorruptPage {
        /// Guest-physical address.
        gpa: u64,
    },
    /// The VM side failed.
    #[error("the VM could not be saved or rebuilt")]
    Vm(#[from] VmError),
    /// A disk of the image could not be opened for checking.
    #[error("cannot open disk {index} for checking")]
    Disk {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// A checker could not read what it needs.
    #[error("checking the snapshot failed")]
    Check(#[from] CheckError),
    /// A copy thread panicked (a bug).
    #[error("a snapshot copy thread failed unexpectedly")]
    Worker,
    /// The fault switch names an address that is not guest RAM.
    #[error("the page to drop, {0:#x}, is not guest RAM")]
    DropAddress(u64),
}

/// How to take a snapshot.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    /// Copy memory while the guest runs, then pause for the last dirty pages (the VM must be
    /// running). Otherwise the VM must be paused and everything is copied at once.
    pub live: bool,
    /// Dirty rounds after the first full copy, before pausing (live only).
    pub rounds: u32,
    /// Pause between rounds (live only), letting the guest dirty pages.
    pub round_interval: Duration,
    /// fsync the file before returning.
    pub sync: bool,
    /// Test-only fault switch: in the last copy, skip the page holding this guest-physical
    /// address if it is dirty (what a lost dirty page looks like). Never set in production.
    pub drop_dirty_page: Option<u64>,
}

/// One copy round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    /// Pages copied.
    pub pages: u64,
    /// How long it took.
    pub millis: f64,
}

/// What a snapshot did.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    /// RAM pages.
    pub pages: u64,
    /// Pages stored (non-zero).
    pub present: u64,
    /// Rounds; the last one ran with the VM paused.
    pub rounds: Vec<RoundStats>,
    /// From pausing the VM to the file being complete.
    pub paused_millis: f64,
    /// Whole operation.
    pub total_millis: f64,
    /// The page the fault switch dropped, if it did.
    pub dropped_page: Option<u64>,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreStats {
    /// RAM pages.
    pub pages: u64,
    /// Pages loaded (non-zero).
    pub present: u64,
    /// Building the VM skeleton.
    pub create_millis: f64,
    /// Loading memory.
    pub memory_millis: f64,
    /// Whole operation.
    pub total_millis: f64,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { op, path, source }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn table_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8 + pages * 4
}

/// Threads that copy pages: the host's cores, at most 4.
fn copy_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

struct Writer<'a> {
    file: File,
    path: PathBuf,
    vm: &'a Vm,
    /// Presence bitmap words (bit set: page stored in the file).
    present: Vec<u64>,
    /// CRC-32 of every stored page.
    crcs: Vec<u32>,
}

/// One thread's share of a copy: the pages of `set_words`, starting at `first_page`.
struct Part<'a> {
    mem: &'a GuestMem,
    layout: &'a MemoryLayout,
    file: &'a File,
    path: &'a Path,
    set_words: &'a [u64],
    first_page: u64,
    present: &'a mut [u64],
    crcs: &'a mut [u32],
    skip: Option<u64>,
}

impl Writer<'_> {
    /// Copies the pages set in `pages` (except `skip`) into the file, in parallel.
    fn copy(&mut self, pages: &DirtyBitmap, skip: Option<u64>) -> Result<u64, SnapshotError> {
        let words = pages.words();
        let per = words.len().div_ceil(copy_threads()).max(1);
        let Writer {
            file,
            path,
            vm,
            present,
            crcs,
        } = self;
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut present_rest: &mut [u64] = present;
            let mut crcs_rest: &mut [u32] = crcs;
            for (i, chunk) in words.chunks(per).enumerate() {
                let take = chunk.len().min(present_rest.len());
                let (p, pr) = std::mem::take(&mut present_rest).split_at_mut(take);
                present_rest = pr;
                let n = (chunk.len() * 64).min(crcs_rest.len());
                let (c, cr) = std::mem::take(&mut crcs_rest).split_at_mut(n);
                crcs_rest = cr;
                let part = Part {
                    mem: vm.memory(),
                    layout: vm.layout(),
                    file,
                    path,
                    set_words: chunk,
                    first_page: (i * per) as u64 * 64,
                    present: p,
                    crcs: c,
                    skip,
                };
                handles.push(scope.spawn(move || part.run()));
            }
            let mut total = 0;
            for h in handles {
                total += h.join().map_err(|_| SnapshotError::Worker)??;
            }
            Ok(total)
        })
    }
}

impl Part<'_> {
    fn run(mut self) -> Result<u64, SnapshotError> {
        let layout = self.layout;
        let mut buf = Vec::new();
        let mut copied = 0;
        let mut run: Option<(u64, u64)> = None; // (first, count)
        let indices: Vec<u64> = iter_words(self.set_words, self.first_page).collect();
        for index in indices {
            if Some(index) == self.skip {
                continue;
            }
            run = match run {
                Some((first, n))
                    if first + n == index && n < RUN_PAGES && same_slot(layout, first, index) =>
                {
                    Some((first, n + 1))
                }
                Some((first, n)) => {
                    copied += self.copy_run(layout, &mut buf, first, n)?;
                    Some((index, 1))
                }
                None => Some((index, 1)),
            };
        }
        if let Some((first, n)) = run {
            copied += self.copy_run(layout, &mut buf, first, n)?;
        }
        Ok(copied)
    }

    fn set_present(&mut self, index: u64, crc: Option<u32>) {
        let local = index - self.first_page;
        let (w, bit) = (
            usize::try_from(local / 64).unwrap_or(usize::MAX),
            local % 64,
        );
        if let Some(word) = self.present.get_mut(w) {
            if crc.is_some() {
                *word |= 1 << bit;
            } else {
                *word &= !(1 << bit);
            }
        }
        if let Some(c) = self
            .crcs
            .get_mut(usize::try_from(local).unwrap_or(usize::MAX))
        {
            *c = crc.unwrap_or(0);
        }
    }

    fn copy_run(
        &mut self,
        layout: &MemoryLayout,
        buf: &mut Vec<u8>,
        first: u64,
        n: u64,
    ) -> Result<u64, SnapshotError> {
        let gpa = layout
            .gpa_of(first)
            .ok_or_else(|| SnapshotError::BadLayout(format!("page index {first} is not RAM")))?;
        buf.resize(usize::try_from(n * PAGE_SIZE).unwrap_or(usize::MAX), 0);
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| VmError::GuestAccess { gpa, source })?;
        // Write contiguous non-zero pages together; zero pages are only flagged absent.
        let mut pending: Option<(u64, usize)> = None; // (first index, start byte in buf)
        for (k, page) in buf.chunks_exact(PAGE_BYTES).enumerate() {
            let index = first + k as u64;
            if is_zero(page) {
                self.set_present(index, None);
                if let Some((pi, start)) = pending.take() {
                    let data = buf.get(start..k * PAGE_BYTES).unwrap_or(&[]);
                    write_pages(self.file, self.path, pi, data)?;
                }
            } else {
                self.set_present(index, Some(crc32fast::hash(page)));
                if pending.is_none() {
                    pending = Some((index, k * PAGE_BYTES));
                }
            }
        }
        if let Some((pi, start)) = pending {
            write_pages(self.file, self.path, pi, buf.get(start..).unwrap_or(&[]))?;
        }
        Ok(n)
    }
}

impl Writer<'_> {
    fn finish(self, state: &VmState, sync: bool) -> Result<u64, SnapshotError> {
        let pages = self.crcs.len() as u64;
        let table_offset = HEADER_REGION + pages * PAGE_SIZE;
        let mut table = Vec::with_capacity(usize::try_from(table_len(pages)).unwrap_or(0));
        for w in &self.present {
            table.extend_from_slice(&w.to_le_bytes());
        }
        for c in &self.crcs {
            table.extend_from_slice(&c.to_le_bytes());
        }
        let state_bytes = state.encode()?;
        let state_offset = table_offset + table.len() as u64;
        let state_len = state_bytes.len() as u64;
        self.file
            .write_all_at(&table, table_offset)
            .map_err(io_err("write", &self.path))?;
        self.file
            .write_all_at(&state_bytes, state_offset)
            .map_err(io_err("write", &self.path))?;
        let end = state_offset + state_len;
        self.file.set_len(end).map_err(io_err("size", &self.path))?;
        let header = encode_header(&Header {
            version: SNAPSHOT_VERSION,
            page_size: 4096,
            pages,
            memory_offset: HEADER_REGION,
            table_offset,
            state_offset,
            state_len,
            table_crc: crc32fast::hash(&table),
        });
        self.file
            .write_all_at(&header, 0)
            .map_err(io_err("write", &self.path))?;
        if sync {
            self.file.sync_all().map_err(io_err("sync", &self.path))?;
        }
        Ok(self.present.iter().map(|w| u64::from(w.count_ones())).sum())
    }
}

fn same_slot(layout: &MemoryLayout, a: u64, b: u64) -> bool {
    layout
        .slots()
        .iter()
        .any(|s| a >= s.first_page && b < s.first_page + s.pages())
}

fn write_pages(file: &File, path: &Path, first: u64, data: &[u8]) -> Result<(), SnapshotError> {
    if data.is_empty() {
        return Ok(());
    }
    file.write_all_at(data, HEADER_REGION + first * PAGE_SIZE)
        .map_err(io_err("write", path))
}

/// Whether a page is all zero.
pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    let body = chunks.by_ref().all(|c| {
        c.try_into()
            .is_ok_and(|a: [u8; 16]| u128::from_ne_bytes(a) == 0)
    });
    body && chunks.remainder().iter().all(|b| *b == 0)
}

/// Writes a snapshot of `vm` to `path`. The VM is paused when this returns (a live snapshot
/// pauses it for the last round); resume it or let it go.
pub fn snapshot(
    vm: &Vm,
    path: &Path,
    opts: &SnapshotOptions,
) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let pages = vm.layout().total_pages();
    let skip = match opts.drop_dirty_page {
        Some(gpa) => Some(
            vm.layout()
                .index_of(gpa)
                .ok_or(SnapshotError::DropAddress(gpa))?,
        ),
        None => None,
    };
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("create", path))?;
    file.set_len(HEADER_REGION + pages * PAGE_SIZE)
        .map_err(io_err("size", path))?;
    let mut w = Writer {
        file,
        path: path.to_path_buf(),
        vm,
        present: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
        crcs: vec![0; usize::try_from(pages).unwrap_or(0)],
    };
    let mut rounds = Vec::new();
    let paused_at;
    let mut dropped = None;
    if opts.live {
        if !vm.running() {
            return Err(VmError::WrongState {
                op: "take a live snapshot",
                state: "paused",
            }
            .into());
        }
        // Start tracking, then copy every page that has memory behind it while the guest
        // runs (untouched pages are zero; if the guest touches one later it is dirty then).
        vm.harvest_dirty()?;
        let t = Instant::now();
        let n = w.copy(&vm.populated_pages(), None)?;
        rounds.push(RoundStats {
            pages: n,
            millis: ms(t.elapsed()),
        });
        for _ in 0..opts.rounds {
            if !opts.round_interval.is_zero() {
                std::thread::sleep(opts.round_interval);
            }
            let t = Instant::now();
            let dirty = vm.harvest_dirty()?;
            let n = w.copy(&dirty, None)?;
            rounds.push(RoundStats {
                pages: n,
                millis: ms(t.elapsed()),
            });
        }
        if !opts.round_interval.is_zero() {
            std::thread::sleep(opts.round_interval);
        }
        paused_at = Instant::now();
        vm.pause()?;
        let t = Instant::now();
        let dirty = vm.harvest_dirty()?;
        if let Some(s) = skip.filter(|s| dirty.is_set(*s)) {
            dropped = vm.layout().gpa_of(s);
        }
        let n = w.copy(&dirty, skip)?;
        rounds.push(RoundStats {
            pages: n,
            millis: ms(t.elapsed()),
        });
    } else {
        if vm.running() {
            return Err(VmError::WrongState {
                op: "take a paused snapshot",
                state: "running",
            }
            .into());
        }
        paused_at = Instant::now();
        vm.harvest_dirty()?;
        let t = Instant::now();
        let n = w.copy(&vm.populated_pages(), skip)?;
        dropped = skip.and_then(|s| vm.layout().gpa_of(s));
        rounds.push(RoundStats {
            pages: n,
            millis: ms(t.elapsed()),
        });
    }
    vm.flush_disks()?;
    let state = vm.save_state()?;
    let present = w.finish(&state, opts.sync)?;
    Ok(SnapshotStats {
        pages,
        present,
        rounds,
        paused_millis: ms(paused_at.elapsed()),
        total_millis: ms(t0.elapsed()),
        dropped_page: dropped,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    page_size: u32,
    pages: u64,
    memory_offset: u64,
    table_offset: u64,
    state_offset: u64,
    state_len: u64,
    table_crc: u32,
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_USED);
    b.extend_from_slice(&SNAPSHOT_MAGIC);
    b.extend_from_slice(&h.version.to_le_bytes());
    b.extend_from_slice(&h.page_size.to_le_bytes());
    for v in [
        h.pages,
        h.memory_offset,
        h.table_offset,
        h.state_offset,
        h.state_len,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&h.table_crc.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Parses and checks the header against the file's length.
fn decode_header(path: &Path, b: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
    if b.get(0..8) != Some(&SNAPSHOT_MAGIC[..]) {
        return Err(SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
        });
    }
    if b.len() < HEADER_USED {
        return Err(SnapshotError::Truncated {
            len: file_len,
            expected: HEADER_REGION,
        });
    }
    let covered = b.get(0..60).unwrap_or(&[]);
    if crc32fast::hash(covered) != le32(b, 60) {
        return Err(SnapshotError::CorruptHeader);
    }
    let h = Header {
        version: le32(b, 8),
        page_size: le32(b, 12),
        pages: le64(b, 16),
        memory_offset: le64(b, 24),
        table_offset: le64(b, 32),
        state_offset: le64(b, 40),
        state_len: le64(b, 48),
        table_crc: le32(b, 56),
    };
    if h.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: h.version,
            supported: SNAPSHOT_VERSION,
        });
    }
    if h.page_size != 4096 {
        return Err(SnapshotError::BadLayout(format!(
            "page size {} (only 4096 is supported)",
            h.page_size
        )));
    }
    if h.pages == 0 || h.pages > MAX_PAGES {
        return Err(SnapshotError::BadLayout(format!(
            "{} pages of memory (1 to {MAX_PAGES} are possible)",
            h.pages
        )));
    }
    if h.state_len > MAX_STATE_BYTES {
        return Err(SnapshotError::Oversized {
            len: h.state_len,
            max: MAX_STATE_BYTES,
        });
    }
    let table_offset = HEADER_REGION + h.pages * PAGE_SIZE;
    let state_offset = table_offset + table_len(h.pages);
    if h.memory_offset != HEADER_REGION
        || h.table_offset != table_offset
        || h.state_offset != state_offset
    {
        return Err(SnapshotError::BadLayout(format!(
            "sections at {}/{}/{} where {HEADER_REGION}/{table_offset}/{state_offset} follow from {} pages",
            h.memory_offset, h.table_offset, h.state_offset, h.pages
        )));
    }
    let end = state_offset + h.state_len;
    if file_len < end {
        return Err(SnapshotError::Truncated {
            len: file_len,
            expected: end,
        });
    }
    if file_len > end {
        return Err(SnapshotError::Trailing {
            extra: file_len - end,
        });
    }
    Ok(h)
}

/// A snapshot file opened for reading: header, state and page table checked.
#[derive(Debug)]
pub struct SnapshotImage {
    file: File,
    path: PathBuf,
    header: Header,
    state: VmState,
    layout: MemoryLayout,
    present: DirtyBitmap,
    crcs: Vec<u32>,
}

impl SnapshotImage {
    /// Opens and validates a snapshot (pages are checked as they are read).
    pub fn open(path: &Path) -> Result<SnapshotImage, SnapshotError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let file_len = file.metadata().map_err(io_err("inspect", path))?.len();
        let mut hb = [0u8; HEADER_USED];
        let got = read_at_most(&file, &mut hb, 0).map_err(io_err("read", path))?;
        let header = decode_header(path, hb.get(..got).unwrap_or(&[]), file_len)?;
        let mut section = SectionReader {
            file: &file,
            pos: header.state_offset,
        };
        let state = VmState::read_from(&mut section, header.state_len)?;
        let layout = state.config.layout();
        if layout.total_pages() != header.pages {
            return Err(SnapshotError::MemoryMismatch {
                found: header.pages,
                expected: layout.total_pages(),
            });
        }
        // Bounded: pages <= MAX_PAGES (16 Mi), so the table is at most 66 MiB.
        let tlen = usize::try_from(table_len(header.pages)).unwrap_or(0);
        let mut table = vec![0u8; tlen];
        file.read_exact_at(&mut table, header.table_offset)
            .map_err(io_err("read", path))?;
        if crc32fast::hash(&table) != header.table_crc {
            return Err(SnapshotError::CorruptTable);
        }
        let words = usize::try_from(header.pages.div_ceil(64)).unwrap_or(0);
        let (bits, crc_bytes) = table.split_at_checked(words * 8).unwrap_or((&[], &[]));
        let mut present = DirtyBitmap::new(header.pages);
        let word_list: Vec<u64> = bits
            .chunks_exact(8)
            .map(|c| c.try_into().map_or(0, u64::from_le_bytes))
            .collect();
        present.or_words_at(0, &word_list);
        let crcs = crc_bytes
            .chunks_exact(4)
            .map(|c| c.try_into().map_or(0, u32::from_le_bytes))
            .collect();
        Ok(SnapshotImage {
            file,
            path: path.to_path_buf(),
            header,
            state,
            layout,
            present,
            crcs,
        })
    }

    /// The VM state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// Pages stored (non-zero).
    pub fn present_pages(&self) -> u64 {
        self.present.count()
    }

    /// Reads pages `first..first + count` (dense index, one slot) into `buf`, checking each
    /// stored page's CRC; absent pages read as zero.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let offset = self.header.memory_offset + first * PAGE_SIZE;
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err("read", &self.path))?;
        for (k, page) in buf.chunks_exact_mut(PAGE_BYTES).enumerate() {
            let index = first + k as u64;
            if !self.present.is_set(index) {
                page.fill(0);
                continue;
            }
            let want = self
                .crcs
                .get(usize::try_from(index).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            if crc32fast::hash(page) != want {
                return Err(SnapshotError::CorruptPage {
                    gpa: self.layout.gpa_of(index).unwrap_or(0),
                });
            }
        }
        Ok(())
    }

    /// Builds a paused VM from the snapshot: skeleton, memory, state.
    pub fn restore(&self, options: &VmOptions) -> Result<(Vm, RestoreStats), SnapshotError> {
        let t0 = Instant::now();
        let vm = Vm::create_for_restore(&self.state, options)?;
        let create = t0.elapsed();
        let t1 = Instant::now();
        self.load_memory(vm.memory())?;
        let memory = t1.elapsed();
        vm.restore_state(&self.state)?;
        Ok((
            vm,
            RestoreStats {
                pages: self.header.pages,
                present: self.present.count(),
                create_millis: ms(create),
                memory_millis: ms(memory),
                total_millis: ms(t0.elapsed()),
            },
        ))
    }

    /// Loads every stored page into `mem`, checking each page's CRC, in parallel.
    fn load_memory(&self, mem: &GuestMem) -> Result<(), SnapshotError> {
        let words = self.present.words();
        let per = words.len().div_ceil(copy_threads()).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = words
                .chunks(per)
                .enumerate()
                .map(|(i, chunk)| {
                    let first = (i * per) as u64 * 64;
                    scope.spawn(move || self.load_part(mem, chunk, first))
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| SnapshotError::Worker)??;
            }
            Ok(())
        })
    }

    fn load_part(&self, mem: &GuestMem, words: &[u64], first: u64) -> Result<(), SnapshotError> {
        let mut buf = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for index in iter_words(words, first) {
            run = match run {
                Some((f, n))
                    if f + n == index && n < RUN_PAGES && same_slot(&self.layout, f, index) =>
                {
                    Some((f, n + 1))
                }
                Some((f, n)) => {
                    self.load_run(mem, &mut buf, f, n)?;
                    Some((index, 1))
                }
                None => Some((index, 1)),
            };
        }
        if let Some((f, n)) = run {
            self.load_run(mem, &mut buf, f, n)?;
        }
        Ok(())
    }

    fn load_run(
        &self,
        mem: &GuestMem,
        buf: &mut Vec<u8>,
        first: u64,
        n: u64,
    ) -> Result<(), SnapshotError> {
        buf.resize(usize::try_from(n * PAGE_SIZE).unwrap_or(0), 0);
        self.read_pages(first, buf)?;
        let gpa = self
            .layout
            .gpa_of(first)
            .ok_or_else(|| SnapshotError::BadLayout(format!("page index {first} is not RAM")))?;
        mem.write_slice(buf, GuestAddress(gpa))
            .map_err(|source| VmError::GuestAccess { gpa, source })?;
        Ok(())
    }

    /// Runs every checker on the image, opening its disks read-only.
    pub fn check(&self) -> Result<Vec<CheckReport>, SnapshotError> {
        let mut disks = Vec::new();
        for (index, spec) in self.state.config.disks.iter().enumerate() {
            let d =
                Disk::open(spec, false).map_err(|source| SnapshotError::Disk { index, source })?;
            disks.push(Arc::new(d));
        }
        let sizes: Vec<u64> = disks.iter().map(|d| d.size()).collect();
        let regions = resolve_disk_regions(&self.state.config, &sizes)?;
        Ok(check_all(&self.state.config, self, &disks, &regions)?)
    }
}

impl GuestPages for SnapshotImage {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CheckError> {
        let mut done = 0usize;
        let mut page = vec![0u8; PAGE_BYTES];
        while done < buf.len() {
            let at = gpa + done as u64;
            let index = self.layout.index_of(at).ok_or(CheckError::Memory {
                gpa: at,
                reason: "not guest RAM".into(),
            })?;
            self.read_pages(index, &mut page)
                .map_err(|e| CheckError::Memory {
                    gpa: at,
                    reason: e.to_string(),
                })?;
            let in_page = usize::try_from(at % PAGE_SIZE).unwrap_or(0);
            let n = (PAGE_BYTES - in_page).min(buf.len() - done);
            if let (Some(dst), Some(src)) =
                (buf.get_mut(done..done + n), page.get(in_page..in_page + n))
            {
                dst.copy_from_slice(src);
            }
            done += n;
        }
        Ok(())
    }
}

struct SectionReader<'a> {
    file: &'a File,
    pos: u64,
}

impl std::io::Read for SectionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Opens a snapshot and builds a paused VM from it.
pub fn restore(path: &Path, options: &VmOptions) -> Result<(Vm, RestoreStats), SnapshotError> {
    SnapshotImage::open(path)?.restore(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_for(pages: u64, state_len: u64) -> Header {
        let table_offset = HEADER_REGION + pages * PAGE_SIZE;
        Header {
            version: 1,
            page_size: 4096,
            pages,
            memory_offset: HEADER_REGION,
            table_offset,
            state_offset: table_offset + table_len(pages),
            state_len,
            table_crc: 0,
        }
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let p = Path::new("x.snap");
        let h = header_for(2048, 1000);
        let end = h.state_offset + 1000;
        let b = encode_header(&h);
        assert_eq!(decode_header(p, &b, end).unwrap(), h);
        assert!(matches!(
            decode_header(p, &b, end - 1),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            decode_header(p, &b, end + 9),
            Err(SnapshotError::Trailing { extra: 9 })
        ));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(matches!(
            decode_header(p, &bad, end),
            Err(SnapshotError::CorruptHeader)
        ));
        assert!(matches!(
            decode_header(
                p,
                b"QFI\xfbxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                end
            ),
            Err(SnapshotError::NotASnapshot { .. })
        ));
        let v2 = encode_header(&Header { version: 2, ..h });
        assert_eq!(
            decode_header(p, &v2, end).unwrap_err().to_string(),
            "the snapshot has format version 2; this vmgate reads version 1 only"
        );
        let huge = encode_header(&header_for(2048, 1 << 40));
        assert!(matches!(
            decode_header(p, &huge, end),
            Err(SnapshotError::Oversized { len, .. }) if len == 1 << 40
        ));
        let many = encode_header(&header_for(MAX_PAGES + 1, 10));
        assert!(matches!(
            decode_header(p, &many, end),
            Err(SnapshotError::BadLayout(_))
        ));
    }

    #[test]
    fn zero_pages_are_detected() {
        let mut page = vec![0u8; PAGE_BYTES];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        assert!(!is_zero(&page[1..]));
    }
}
