//! Checkers for the guest programs' work, usable on a paused VM or on a snapshot image and
//! its disks.
//!
//! - **staircase** (memstress): with `P` the pass counter in the mailbox, byte 0 of the
//!   range's pages must read `P+1` (mod 256) for a prefix and `P` for the rest: all equal
//!   except one step of exactly one where the writer stopped. Anything else, e.g. a page that
//!   kept an older value because a dirty page was lost, is reported with its address.
//! - **full-content** (memstress, `full_content = true`): every 8-byte word of every page
//!   must be the pass-`P+1` value for a prefix of pages, the pass-`P` value for the rest,
//!   with at most one page split at a word boundary (before pass 1 the range is zero).
//! - **disk sequence** (diskstress): with `L` the last sequence number in the mailbox, block
//!   `k` of the region must hold the latest write `s <= L` with `(s-1) mod blocks = k` (or
//!   nothing if none), except that the next block may already hold `L+1` (written, not yet
//!   counted); every word of each block must match the pattern of its sequence number.

use std::sync::Arc;

use serde::Serialize;

use super::config::{GuestProgram, MemstressConfig, VmConfig};
use super::layout::{MemoryLayout, PAGE_BYTES, PAGE_SIZE};
use super::programs::{
    DISK_MAGIC, DiskRegion, MAILBOX_COUNTER, MAILBOX_ERROR, disk_block_word, fill_seed, fill_word,
    mailbox_gpa,
};
use super::{Vm, VmError};
use crate::disk::{Disk, DiskError};

/// How many bad pages or blocks a report lists.
pub const MAX_REPORTED: usize = 8;

/// Errors of the checkers (not findings: those are in the report).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {gpa:#x}: {reason}")]
    Memory {
        /// Address.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// A disk could not be read.
    #[error("cannot read disk {index}")]
    Disk {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// A program's disk is not available.
    #[error("vCPU {vcpu}'s diskstress disk {disk} is not available to the checker")]
    NoDisk {
        /// vCPU.
        vcpu: u32,
        /// Disk index.
        disk: usize,
    },
}

/// Read access to a guest's RAM: a paused VM or a snapshot image.
pub trait GuestPages {
    /// The RAM layout.
    fn layout(&self) -> &MemoryLayout;
    /// Copies guest memory at `gpa` into `buf`.
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CheckError>;
}

impl GuestPages for Vm {
    fn layout(&self) -> &MemoryLayout {
        Vm::layout(self)
    }

    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CheckError> {
        Vm::read_gpa(self, gpa, buf).map_err(|e: VmError| CheckError::Memory {
            gpa,
            reason: e.to_string(),
        })
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadItem {
    /// Guest-physical address (memory checks).
    pub gpa: Option<u64>,
    /// Byte offset in the disk (disk check).
    pub disk_offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// vCPU whose program was checked.
    pub vcpu: u32,
    /// `staircase`, `full-content` or `disk-sequence`.
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// The program's counter from the mailbox (passes or last sequence number).
    pub counter: u64,
    /// One line for humans.
    pub summary: String,
    /// Number of bad pages or blocks.
    pub bad_count: u64,
    /// The first bad pages or blocks.
    pub bad: Vec<BadItem>,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {} {}: {} — {}",
            self.vcpu,
            self.check,
            if self.ok { "ok" } else { "FAILED" },
            self.summary
        )?;
        for b in &self.bad {
            match (b.gpa, b.disk_offset) {
                (Some(g), _) => write!(f, "\n    page {g:#x}: {}", b.detail)?,
                (None, Some(o)) => write!(f, "\n    disk offset {o:#x}: {}", b.detail)?,
                _ => write!(f, "\n    {}", b.detail)?,
            }
        }
        Ok(())
    }
}

fn read_u64(mem: &impl GuestPages, gpa: u64) -> Result<u64, CheckError> {
    let mut b = [0u8; 8];
    mem.read_gpa(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

struct Findings {
    count: u64,
    items: Vec<BadItem>,
}

impl Findings {
    fn new() -> Findings {
        Findings {
            count: 0,
            items: Vec::new(),
        }
    }

    fn page(&mut self, gpa: u64, detail: impl FnOnce() -> String) {
        self.count += 1;
        if self.items.len() < MAX_REPORTED {
            self.items.push(BadItem {
                gpa: Some(gpa),
                disk_offset: None,
                detail: detail(),
            });
        }
    }

    fn block(&mut self, offset: u64, detail: impl FnOnce() -> String) {
        self.count += 1;
        if self.items.len() < MAX_REPORTED {
            self.items.push(BadItem {
                gpa: None,
                disk_offset: Some(offset),
                detail: detail(),
            });
        }
    }
}

/// The staircase check of byte-variant memstress on vCPU `vcpu`.
pub fn check_staircase(
    mem: &impl GuestPages,
    vcpu: u32,
    m: &MemstressConfig,
) -> Result<CheckReport, CheckError> {
    let passes = read_u64(mem, mailbox_gpa(vcpu) + MAILBOX_COUNTER)?;
    let lo = passes.to_le_bytes()[0];
    let hi = lo.wrapping_add(1);
    let mut f = Findings::new();
    let mut step: Option<u64> = None;
    let pages = (m.end_gpa() - m.start_gpa()) / PAGE_SIZE;
    for p in 0..pages {
        let gpa = m.start_gpa() + p * PAGE_SIZE;
        let mut b = [0u8; 1];
        mem.read_gpa(gpa, &mut b)?;
        let v = b[0];
        match step {
            None if v == hi => {}
            None if v == lo => step = Some(gpa),
            None => f.page(gpa, || {
                format!(
                    "byte 0 is {v}; expected {hi} (pass {} written) or {lo} (not yet)",
                    passes + 1
                )
            }),
            Some(_) if v == lo => {}
            Some(s) => f.page(gpa, || {
                format!("byte 0 is {v}; expected {lo} like every page after the step at {s:#x}")
            }),
        }
    }
    let ok = f.count == 0;
    let where_ = match step {
        Some(s) if s == m.start_gpa() => "no page of pass P+1 yet".to_string(),
        Some(s) => format!("step at {s:#x}"),
        None => "every page already at P+1".to_string(),
    };
    let summary = if ok {
        format!("{pages} pages, {passes} passes, {where_}")
    } else {
        format!(
            "{} of {pages} pages off the staircase (passes {passes})",
            f.count
        )
    };
    Ok(CheckReport {
        vcpu,
        check: "staircase".into(),
        ok,
        counter: passes,
        summary,
        bad_count: f.count,
        bad: f.items,
    })
}

enum PageClass {
    New,
    Old,
    Split(usize),
    Bad { word: usize, found: u64 },
}

fn classify(page: &[u8], pfn: u64, new: u64, old: u64) -> PageClass {
    let words = page
        .chunks_exact(8)
        .map(|c| c.try_into().map(u64::from_le_bytes).unwrap_or(0));
    let new_seed = fill_seed(pfn, new);
    let old_seed = fill_seed(pfn, old);
    let old_value = |w: u64| if old == 0 { 0 } else { fill_word(old_seed, w) };
    let mut split: Option<usize> = None;
    for (w, found) in words.enumerate() {
        let wi = w as u64;
        match split {
            None if found == fill_word(new_seed, wi) => {}
            None if found == old_value(wi) => split = Some(w),
            None => return PageClass::Bad { word: w, found },
            Some(_) if found == old_value(wi) => {}
            Some(_) => return PageClass::Bad { word: w, found },
        }
    }
    match split {
        None => PageClass::New,
        Some(0) => PageClass::Old,
        Some(w) => PageClass::Split(w),
    }
}

/// The full-content check of memstress with `full_content = true` on vCPU `vcpu`.
pub fn check_full_content(
    mem: &impl GuestPages,
    vcpu: u32,
    m: &MemstressConfig,
) -> Result<CheckReport, CheckError> {
    let passes = read_u64(mem, mailbox_gpa(vcpu) + MAILBOX_COUNTER)?;
    let (new, old) = (passes.wrapping_add(1), passes);
    let mut f = Findings::new();
    // 0: pages of pass P+1; 1: after the step.
    let mut after_step: Option<u64> = None;
    let mut split_page: Option<(u64, usize)> = None;
    let mut buf = vec![0u8; PAGE_BYTES];
    let pages = (m.end_gpa() - m.start_gpa()) / PAGE_SIZE;
    for p in 0..pages {
        let gpa = m.start_gpa() + p * PAGE_SIZE;
        mem.read_gpa(gpa, &mut buf)?;
        match (classify(&buf, gpa / PAGE_SIZE, new, old), after_step) {
            (PageClass::New, None) => {}
            (PageClass::Old, None) => after_step = Some(gpa),
            (PageClass::Split(w), None) => {
                after_step = Some(gpa);
                split_page = Some((gpa, w));
            }
            (PageClass::Old, Some(_)) => {}
            (PageClass::New | PageClass::Split(_), Some(s)) => f.page(gpa, || {
                format!("holds pass {new} data after the step at {s:#x}, where pass {old} was expected")
            }),
            (PageClass::Bad { word, found }, _) => f.page(gpa, || {
                let want_new = fill_word(fill_seed(gpa / PAGE_SIZE, new), word as u64);
                let want_old = if old == 0 {
                    0
                } else {
                    fill_word(fill_seed(gpa / PAGE_SIZE, old), word as u64)
                };
                format!(
                    "word {word} is {found:#018x}; pass {new} writes {want_new:#018x}, pass {old} wrote {want_old:#018x}"
                )
            }),
        }
    }
    let ok = f.count == 0;
    let where_ = match (after_step, split_page) {
        (_, Some((g, w))) => format!("step inside page {g:#x} at word {w}"),
        (Some(s), None) if s == m.start_gpa() => "no page of pass P+1 yet".to_string(),
        (Some(s), None) => format!("step at {s:#x}"),
        (None, None) => "every page already at P+1".to_string(),
    };
    let summary = if ok {
        format!("{pages} pages, every word checked, {passes} passes, {where_}")
    } else {
        format!(
            "{} of {pages} pages hold wrong data (passes {passes})",
            f.count
        )
    };
    Ok(CheckReport {
        vcpu,
        check: "full-content".into(),
        ok,
        counter: passes,
        summary,
        bad_count: f.count,
        bad: f.items,
    })
}

/// The disk sequence check of diskstress on vCPU `vcpu`, whose last completed sequence
/// number is `last` (from its mailbox), on `disk`.
pub fn check_disk_sequence(
    disk: &Disk,
    disk_index: usize,
    vcpu: u32,
    region: DiskRegion,
    last: u64,
) -> Result<CheckReport, CheckError> {
    let nb = region.blocks.max(1);
    let bs = region.block_size;
    let next_k = last % nb;
    let mut buf = vec![0u8; usize::try_from(bs).unwrap_or(PAGE_BYTES)];
    let mut f = Findings::new();
    let mut in_flight = false;
    for k in 0..nb {
        let offset = (region.start_block + k) * bs;
        disk.read_at(&mut buf, offset)
            .map_err(|source| CheckError::Disk {
                index: disk_index,
                source,
            })?;
        let word = |o: u64| {
            usize::try_from(o)
                .ok()
                .and_then(|o| buf.get(o..o + 8))
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let expected = (last > k).then(|| k + 1 + ((last - (k + 1)) / nb) * nb);
        let found = if buf.iter().all(|b| *b == 0) {
            None
        } else if word(0) == DISK_MAGIC {
            let seq = word(8);
            let bad_word = (8..bs)
                .step_by(8)
                .find(|&o| word(o) != disk_block_word(seq, k, bs, o));
            if let Some(o) = bad_word {
                f.block(offset, || {
                    format!(
                        "block {k} claims seq {seq} but its word at +{o} is {:#x}, expected {:#x}",
                        word(o),
                        disk_block_word(seq, k, bs, o)
                    )
                });
                continue;
            }
            Some(seq)
        } else {
            f.block(offset, || {
                format!("block {k} does not hold diskstress data")
            });
            continue;
        };
        if found == expected {
            continue;
        }
        if k == next_k && found == Some(last + 1) {
            in_flight = true;
            continue;
        }
        let show = |s: Option<u64>| s.map_or_else(|| "nothing".to_string(), |s| format!("seq {s}"));
        f.block(offset, || {
            format!(
                "block {k} holds {}, expected {}",
                show(found),
                show(expected)
            )
        });
    }
    let ok = f.count == 0;
    let summary = if ok {
        format!(
            "{nb} blocks of {bs} bytes consistent with last seq {last}{}",
            if in_flight {
                format!(" (seq {} written, not yet counted)", last + 1)
            } else {
                String::new()
            }
        )
    } else {
        format!(
            "{} of {nb} blocks inconsistent with last seq {last}",
            f.count
        )
    };
    Ok(CheckReport {
        vcpu,
        check: "disk-sequence".into(),
        ok,
        counter: last,
        summary,
        bad_count: f.count,
        bad: f.items,
    })
}

/// Runs every check the configuration's programs call for.
pub fn check_all(
    config: &VmConfig,
    mem: &impl GuestPages,
    disks: &[Arc<Disk>],
    regions: &[Option<DiskRegion>],
) -> Result<Vec<CheckReport>, CheckError> {
    let mut out = Vec::new();
    for i in 0..config.vcpus {
        match config.program(i) {
            GuestProgram::Memstress(m) if m.full_content => {
                out.push(check_full_content(mem, i, m)?);
            }
            GuestProgram::Memstress(m) => out.push(check_staircase(mem, i, m)?),
            GuestProgram::Diskstress(d) => {
                let disk = disks.get(d.disk).ok_or(CheckError::NoDisk {
                    vcpu: i,
                    disk: d.disk,
                })?;
                let region = usize::try_from(i)
                    .ok()
                    .and_then(|x| regions.get(x))
                    .copied()
                    .flatten()
                    .ok_or(CheckError::NoDisk {
                        vcpu: i,
                        disk: d.disk,
                    })?;
                let mb = mailbox_gpa(i);
                let last = read_u64(mem, mb + MAILBOX_COUNTER)?;
                let error = read_u64(mem, mb + MAILBOX_ERROR)?;
                let mut r = check_disk_sequence(disk, d.disk, i, region, last)?;
                if error != 0 {
                    r.ok = false;
                    r.summary = format!("the guest saw block device status {error}; {}", r.summary);
                }
                out.push(r);
            }
            GuestProgram::Idle => {}
        }
    }
    Ok(out)
}

/// Runs every check on a paused VM, with its own open disks.
pub fn check_vm(vm: &Vm) -> Result<Vec<CheckReport>, CheckError> {
    let disks: Vec<Arc<Disk>> = (0..vm.config().disks.len())
        .filter_map(|i| vm.disk(i))
        .collect();
    let regions: Vec<Option<DiskRegion>> =
        (0..vm.config().vcpus).map(|i| vm.disk_region(i)).collect();
    check_all(vm.config(), vm, &disks, &regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A RAM image in a Vec, for checking the checkers without KVM.
    struct FakeRam {
        layout: MemoryLayout,
        bytes: RefCell<Vec<u8>>,
    }

    impl FakeRam {
        fn new(mib: u64) -> FakeRam {
            FakeRam {
                layout: MemoryLayout::new(mib),
                bytes: RefCell::new(vec![0; usize::try_from(mib << 20).unwrap()]),
            }
        }
        fn poke(&self, gpa: u64, data: &[u8]) {
            let g = usize::try_from(gpa).unwrap();
            self.bytes.borrow_mut()[g..g + data.len()].copy_from_slice(data);
        }
    }

    impl GuestPages for FakeRam {
        fn layout(&self) -> &MemoryLayout {
            &self.layout
        }
        fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CheckError> {
            let g = usize::try_from(gpa).unwrap();
            buf.copy_from_slice(&self.bytes.borrow()[g..g + buf.len()]);
            Ok(())
        }
    }

    fn ms(full: bool) -> MemstressConfig {
        MemstressConfig {
            start_mib: 4,
            size_mib: 1,
            marker_every: 1,
            full_content: full,
            passes: None,
        }
    }

    fn set_passes(ram: &FakeRam, vcpu: u32, p: u64) {
        ram.poke(mailbox_gpa(vcpu) + MAILBOX_COUNTER, &p.to_le_bytes());
    }

    #[test]
    fn staircase_accepts_one_step_and_reports_others() {
        let ram = FakeRam::new(8);
        let m = ms(false);
        set_passes(&ram, 0, 255);
        // pages 0..100 at 0 (=256 mod 256), rest at 255.
        for p in 0..256u64 {
            let v: u8 = if p < 100 { 0 } else { 255 };
            ram.poke(m.start_gpa() + p * PAGE_SIZE, &[v]);
        }
        let r = check_staircase(&ram, 0, &m).unwrap();
        assert!(r.ok, "{r}");
        assert!(r.summary.contains("step at 0x464000"), "{r}");
        // A lost page in the prefix keeps an old value: caught with its address.
        ram.poke(m.start_gpa() + 50 * PAGE_SIZE, &[200]);
        let r = check_staircase(&ram, 0, &m).unwrap();
        assert!(!r.ok);
        assert_eq!(r.bad[0].gpa, Some(m.start_gpa() + 50 * PAGE_SIZE));
        // A second step is caught too.
        ram.poke(m.start_gpa() + 50 * PAGE_SIZE, &[0]);
        ram.poke(m.start_gpa() + 150 * PAGE_SIZE, &[0]);
        let r = check_staircase(&ram, 0, &m).unwrap();
        assert_eq!(r.bad_count, 1);
        assert_eq!(r.bad[0].gpa, Some(m.start_gpa() + 150 * PAGE_SIZE));
    }

    fn fill_page(ram: &FakeRam, gpa: u64, pass: u64, from_word: usize) {
        let seed = fill_seed(gpa / PAGE_SIZE, pass);
        let mut page = vec![0u8; PAGE_BYTES];
        ram.read_gpa(gpa, &mut page).unwrap();
        for (w, c) in page.chunks_exact_mut(8).enumerate().skip(from_word) {
            c.copy_from_slice(&fill_word(seed, w as u64).to_le_bytes());
        }
        ram.poke(gpa, &page);
    }

    #[test]
    fn full_content_accepts_split_page_and_catches_stale_page() {
        let ram = FakeRam::new(8);
        let m = ms(true);
        set_passes(&ram, 1, 3);
        for p in 0..256u64 {
            let gpa = m.start_gpa() + p * PAGE_SIZE;
            fill_page(&ram, gpa, if p < 10 { 4 } else { 3 }, 0);
        }
        // Page 10 half written by pass 4.
        let g10 = m.start_gpa() + 10 * PAGE_SIZE;
        let seed = fill_seed(g10 / PAGE_SIZE, 4);
        for w in 0..100u64 {
            ram.poke(g10 + w * 8, &fill_word(seed, w).to_le_bytes());
        }
        let r = check_full_content(&ram, 1, &m).unwrap();
        assert!(r.ok, "{r}");
        assert!(r.summary.contains("word 100"), "{r}");
        // A page left at pass 2 (a lost dirty page) is caught.
        let g = m.start_gpa() + 200 * PAGE_SIZE;
        fill_page(&ram, g, 2, 0);
        let r = check_full_content(&ram, 1, &m).unwrap();
        assert!(!r.ok);
        assert_eq!(r.bad_count, 1);
        assert_eq!(r.bad[0].gpa, Some(g));
        assert!(
            r.bad[0].detail.starts_with("word 0 is"),
            "{}",
            r.bad[0].detail
        );
        // One flipped bit anywhere in a page is caught too.
        fill_page(&ram, g, 3, 0);
        ram.poke(g + 4000, &[0xAA]);
        let r = check_full_content(&ram, 1, &m).unwrap();
        assert_eq!(r.bad_count, 1);
        assert!(
            r.bad[0].detail.starts_with("word 500 is"),
            "{}",
            r.bad[0].detail
        );
    }

    fn write_block(disk: &Disk, region: DiskRegion, seq: u64) {
        let k = (seq - 1) % region.blocks;
        let bs = region.block_size;
        let mut block = vec![0u8; usize::try_from(bs).unwrap()];
        for (i, c) in block.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&disk_block_word(seq, k, bs, i as u64 * 8).to_le_bytes());
        }
        disk.write_at(&block, (region.start_block + k) * bs)
            .unwrap();
    }

    #[test]
    fn disk_sequence_accepts_in_flight_block_and_catches_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        crate::disk::create_raw(&path, 1 << 20).unwrap();
        let spec = crate::disk::DiskSpec {
            path,
            format: crate::disk::DiskFormat::Raw,
        };
        let disk = Disk::open(&spec, true).unwrap();
        let region = DiskRegion {
            start_block: 4,
            blocks: 10,
            block_size: 4096,
        };
        for seq in 1..=23 {
            write_block(&disk, region, seq);
        }
        let r = check_disk_sequence(&disk, 0, 1, region, 23).unwrap();
        assert!(r.ok, "{r}");
        // Seq 24 written, mailbox not yet updated: still consistent.
        write_block(&disk, region, 24);
        let r = check_disk_sequence(&disk, 0, 1, region, 23).unwrap();
        assert!(
            r.ok && r.summary.contains("seq 24 written, not yet counted"),
            "{r}"
        );
        // The mailbox says 26 but seq 25 never reached the disk: a gap.
        write_block(&disk, region, 26);
        let r = check_disk_sequence(&disk, 0, 1, region, 26).unwrap();
        assert!(!r.ok);
        assert_eq!(r.bad_count, 1);
        assert_eq!(r.bad[0].disk_offset, Some((4 + 4) * 4096));
        assert_eq!(r.bad[0].detail, "block 4 holds seq 15, expected seq 25");
        // A block of an older lap (a lost write) with the last seq 23 recorded.
        let r = check_disk_sequence(&disk, 0, 1, region, 30).unwrap();
        assert!(!r.ok);
        // Damage inside a block is caught word by word.
        write_block(&disk, region, 25);
        disk.write_at(&[0xEE], (4 + 2) * 4096 + 1000).unwrap();
        let r = check_disk_sequence(&disk, 0, 1, region, 26).unwrap();
        assert_eq!(r.bad_count, 1, "{r}");
        assert!(
            r.bad[0]
                .detail
                .contains("claims seq 23 but its word at +1000"),
            "{r}"
        );
        // Fresh blocks beyond the last seq of the first lap must be empty.
        let fresh = DiskRegion {
            start_block: 100,
            blocks: 10,
            block_size: 4096,
        };
        write_block(&disk, fresh, 1);
        assert!(check_disk_sequence(&disk, 0, 1, fresh, 1).unwrap().ok);
        assert!(
            check_disk_sequence(&disk, 0, 1, fresh, 0).unwrap().ok,
            "seq 1 in flight"
        );
        write_block(&disk, fresh, 5);
        let r = check_disk_sequence(&disk, 0, 1, fresh, 1).unwrap();
        assert_eq!(r.bad[0].detail, "block 4 holds seq 5, expected nothing");
    }

    #[test]
    fn full_content_before_first_pass_is_zero() {
        let ram = FakeRam::new(8);
        let r = check_full_content(&ram, 0, &ms(true)).unwrap();
        assert!(r.ok, "{r}");
    }
}
