//! Write tracking for storage mirroring: which blocks of a disk were written since the last look.
//!
//! The storage phase of a move copies the active layer in bulk while the guest keeps writing,
//! then re-sends the blocks written meanwhile, round after round, until little is left. A write
//! marks its blocks *after* its data reached the image, so a block is never cleared by
//! [`DirtyBitmap::take`] before the data that dirtied it is readable: a concurrent `take` either
//! sees the bit (and the copier reads the new data) or leaves it for the next round.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity of write tracking (QEMU's default for dirty bitmaps is also 64 KiB).
pub const DIRTY_BLOCK_SIZE: u64 = 64 * 1024;

/// A lock-free bitmap of written blocks, one bit per block.
#[derive(Debug)]
pub struct DirtyBitmap {
    /// log2 of the block size.
    shift: u32,
    /// Size of the tracked disk in bytes.
    disk_size: u64,
    /// The bits; block `n` is bit `n % 64` of word `n / 64`.
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `disk_size` bytes; `block_size` must be a power of two.
    /// Returns `None` if the bitmap would not fit in memory.
    pub fn new(disk_size: u64, block_size: u64) -> Option<Self> {
        if !block_size.is_power_of_two() {
            return None;
        }
        let shift = block_size.trailing_zeros();
        let blocks = disk_size.div_ceil(block_size);
        let words = usize::try_from(blocks.div_ceil(64)).ok()?;
        let words = (0..words).map(|_| AtomicU64::new(0)).collect();
        Some(DirtyBitmap {
            shift,
            disk_size,
            words,
        })
    }

    /// Marks every block that `[offset, offset + len)` touches. Parts beyond the disk are
    /// ignored (the caller refuses such accesses before they happen).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        let mut block = first;
        while block <= last {
            let word = block / 64;
            let bit = block % 64;
            // Set the run of bits of this word in one atomic operation.
            let run = (64 - bit).min(last - block + 1);
            let mask = if run == 64 {
                u64::MAX
            } else {
                ((1u64 << run) - 1) << bit
            };
            if let Some(w) = usize::try_from(word).ok().and_then(|w| self.words.get(w)) {
                w.fetch_or(mask, Ordering::AcqRel);
            }
            block += run;
        }
    }

    /// Marks the whole disk dirty (e.g. to make the next round copy everything).
    pub fn mark_all(&self) {
        self.mark(0, self.disk_size);
    }

    /// Returns the blocks marked since the previous `take` and clears them.
    pub fn take(&self) -> DirtyBlocks {
        let words = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        DirtyBlocks {
            shift: self.shift,
            disk_size: self.disk_size,
            words,
        }
    }

    /// The number of blocks currently marked, without clearing them.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// A snapshot of dirty blocks, as returned by [`Disk::take_dirty`](super::Disk::take_dirty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBlocks {
    /// log2 of the block size.
    shift: u32,
    /// Size of the disk in bytes (the last block may be partial).
    disk_size: u64,
    /// The bits.
    words: Vec<u64>,
}

impl DirtyBlocks {
    /// The tracking granularity in bytes.
    pub fn block_size(&self) -> u64 {
        1 << self.shift
    }

    /// The number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no block is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Whether block number `block` is dirty.
    pub fn contains(&self, block: u64) -> bool {
        let Ok(word) = usize::try_from(block / 64) else {
            return false;
        };
        self.words
            .get(word)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// The dirty block numbers, in ascending order.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = u64::try_from(i).unwrap_or(u64::MAX) * 64;
            BitIter(w).map(move |bit| base + u64::from(bit))
        })
    }

    /// The dirty byte ranges, adjacent blocks merged, clipped to the disk's size.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let bs = self.block_size();
        let size = self.disk_size;
        let mut blocks = self.blocks().peekable();
        std::iter::from_fn(move || {
            let first = blocks.next()?;
            let mut last = first;
            while blocks.peek() == Some(&(last + 1)) {
                last += 1;
                blocks.next();
            }
            let start = first * bs;
            let end = ((last + 1) * bs).min(size);
            Some(start..end)
        })
    }

    /// The number of dirty bytes (partial last block counted as its real length).
    pub fn bytes(&self) -> u64 {
        self.ranges().map(|r| r.end - r.start).sum()
    }

    /// Adds the blocks of `other` (e.g. blocks whose transfer failed and must be retried).
    /// Snapshots of different disks or granularities are not merged; returns whether it merged.
    pub fn merge(&mut self, other: &DirtyBlocks) -> bool {
        if self.shift != other.shift || self.disk_size != other.disk_size {
            return false;
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        true
    }
}

/// Iterates the set bits of a word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u64 = 64 * 1024;

    #[test]
    fn marks_exactly_the_touched_blocks() {
        let bm = DirtyBitmap::new(100 * K64 + 100, K64).unwrap();
        bm.mark(0, 1); // block 0
        bm.mark(K64 - 1, 2); // blocks 0 and 1
        bm.mark(10 * K64, K64); // block 10 only
        bm.mark(63 * K64 + 5, 2 * K64); // blocks 63, 64, 65 (crosses a word)
        bm.mark(100 * K64 + 50, 10_000); // partial last block, clipped
        bm.mark(200 * K64, 10); // beyond the disk: ignored
        bm.mark(5 * K64, 0); // empty: ignored
        assert_eq!(bm.count(), 7);
        let d = bm.take();
        assert_eq!(
            d.blocks().collect::<Vec<_>>(),
            vec![0, 1, 10, 63, 64, 65, 100]
        );
        assert_eq!(
            d.ranges().collect::<Vec<_>>(),
            vec![
                0..2 * K64,
                10 * K64..11 * K64,
                63 * K64..66 * K64,
                100 * K64..100 * K64 + 100
            ]
        );
        assert_eq!(d.bytes(), 2 * K64 + K64 + 3 * K64 + 100);
        assert!(d.contains(64) && !d.contains(62) && !d.contains(1 << 40));
        // take() cleared everything.
        assert!(bm.take().is_empty());
        assert_eq!(bm.count(), 0);
    }

    #[test]
    fn long_runs_and_whole_words() {
        let bm = DirtyBitmap::new(1000 * K64, K64).unwrap();
        bm.mark(3 * K64, 300 * K64);
        let d = bm.take();
        assert_eq!(d.count(), 300);
        assert_eq!(d.ranges().collect::<Vec<_>>(), vec![3 * K64..303 * K64]);
        bm.mark_all();
        assert_eq!(bm.take().count(), 1000);
    }

    #[test]
    fn merge_only_compatible_snapshots() {
        let a = DirtyBitmap::new(10 * K64, K64).unwrap();
        a.mark(0, 1);
        let mut s = a.take();
        a.mark(5 * K64, 1);
        assert!(s.merge(&a.take()));
        assert_eq!(s.blocks().collect::<Vec<_>>(), vec![0, 5]);
        let other = DirtyBitmap::new(11 * K64, K64).unwrap().take();
        assert!(!s.merge(&other));
        assert!(DirtyBitmap::new(10, 3).is_none());
    }

    #[test]
    fn concurrent_marks_are_not_lost() {
        let bm = std::sync::Arc::new(DirtyBitmap::new(4096 * K64, K64).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bm = bm.clone();
                std::thread::spawn(move || {
                    for b in (t..4096).step_by(4) {
                        bm.mark(b * K64, 1);
                    }
                })
            })
            .collect();
        let mut seen = bm.take();
        for t in threads {
            t.join().unwrap();
        }
        assert!(seen.merge(&bm.take()));
        assert_eq!(seen.count(), 4096);
    }
}
