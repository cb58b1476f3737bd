//! The disk pattern: sequence-numbered, checksummed blocks, and the check of a whole region.
//!
//! The writer numbers its writes from 1 and writes sequence `s` into block `(s - 1) mod n` of
//! a region of `n` blocks of [`BLOCK_SIZE`] bytes, each write durable before the next one
//! starts. A block holds:
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `VMGDSK01` |
//! | 8..16 | sequence number (little-endian) |
//! | 16..24 | block index (little-endian) |
//! | 24..4092 | bytes derived from the sequence number |
//! | 4092..4096 | CRC-32 of bytes 0..4092 |
//!
//! With `S` the last durable sequence number, block `k` must hold the latest `s <= S` with
//! `(s - 1) mod n = k`, or be all zero if there is none yet. One exception: the block the
//! next write goes to (`S mod n`) may also hold a torn or complete write `S + 1` that was
//! never acknowledged. Anything else (a stale block, a block from the future, a bad checksum,
//! a block in the wrong place) is a failure. After a reboot the writer does not know `S`: it
//! takes the highest sequence number on the disk, which still catches every hole and stale
//! block; the host compares that number with the last durable one the guest reported before.

use std::fmt;

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;

const MAGIC: [u8; 8] = *b"VMGDSK01";
const PAYLOAD: std::ops::Range<usize> = 24..BLOCK_SIZE - 4;

/// How many problems a check lists.
pub const MAX_LISTED: usize = 4;

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// All zero: never written.
    Empty,
    /// A valid block.
    Written {
        /// Its sequence number.
        seq: u64,
        /// The block index it was written for.
        index: u64,
    },
    /// Not a block of this pattern.
    Foreign,
    /// The magic is right but the checksum is not (a torn or corrupted write).
    Corrupt,
}

/// Fills `buf` with the block of sequence number `seq` at index `index`.
pub fn encode(buf: &mut [u8; BLOCK_SIZE], seq: u64, index: u64) {
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&index.to_le_bytes());
    let mut x = seq ^ 0xd1b5_4a32_d192_ed03;
    for chunk in buf[PAYLOAD].chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let crc = crc32fast::hash(&buf[..BLOCK_SIZE - 4]);
    buf[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Reads what a block holds.
pub fn decode(buf: &[u8; BLOCK_SIZE]) -> Block {
    if buf.iter().all(|&b| b == 0) {
        return Block::Empty;
    }
    if buf[0..8] != MAGIC {
        return Block::Foreign;
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[r]);
        u64::from_le_bytes(b)
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&buf[BLOCK_SIZE - 4..]);
    if crc32fast::hash(&buf[..BLOCK_SIZE - 4]) != u32::from_le_bytes(crc) {
        return Block::Corrupt;
    }
    Block::Written {
        seq: word(8..16),
        index: word(16..24),
    }
}

/// The block index of sequence number `seq` (from 1) in a region of `blocks` blocks.
pub fn index_of(seq: u64, blocks: u64) -> u64 {
    (seq - 1) % blocks
}

/// The sequence number block `index` must hold when `last` is the last durable one (0: the
/// block must be empty).
pub fn expected_seq(index: u64, last: u64, blocks: u64) -> u64 {
    if last <= index {
        return 0;
    }
    // The latest s <= last with (s - 1) mod blocks == index.
    last - ((last - 1 - index) % blocks)
}

/// One problem found in a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockProblem {
    /// The block.
    pub index: u64,
    /// What it should hold (0: nothing).
    pub expected_seq: u64,
    /// What it holds.
    pub found: Block,
}

impl fmt::Display for BlockProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: ", self.index)?;
        match self.expected_seq {
            0 => write!(f, "expected never written, ")?,
            s => write!(f, "expected sequence {s}, ")?,
        }
        match self.found {
            Block::Empty => write!(f, "found it empty"),
            Block::Written { seq, index } if index == self.index => {
                write!(f, "found sequence {seq}")
            }
            Block::Written { seq, index } => {
                write!(f, "found sequence {seq} written for block {index}")
            }
            Block::Foreign => write!(f, "found data that is not a vmgate-guest block"),
            Block::Corrupt => write!(f, "found a block with a bad checksum"),
        }
    }
}

/// The outcome of checking a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionCheck {
    /// The last sequence number the check assumed durable.
    pub last: u64,
    /// Problems, at most [`MAX_LISTED`].
    pub problems: Vec<BlockProblem>,
    /// All problems, including those not listed.
    pub problem_count: u64,
}

impl RegionCheck {
    /// True when the region is intact.
    pub fn passed(&self) -> bool {
        self.problem_count == 0
    }
}

/// Checks a region's blocks (in index order). `last` is the last durable sequence number if
/// the caller knows it; otherwise the highest valid one found is used.
pub fn check_region(blocks: &[Block], last: Option<u64>) -> RegionCheck {
    let n = blocks.len() as u64;
    let last = last.unwrap_or_else(|| {
        blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match *b {
                Block::Written { seq, index } if index == i as u64 && seq >= 1 => Some(seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    });
    let mut problems = Vec::new();
    let mut problem_count = 0;
    if n == 0 {
        return RegionCheck {
            last,
            problems,
            problem_count,
        };
    }
    let next = last % n;
    for (i, found) in blocks.iter().enumerate() {
        let index = i as u64;
        let expected = expected_seq(index, last, n);
        let ok = match *found {
            Block::Empty => expected == 0,
            Block::Written { seq, index: at } => {
                at == index && (seq == expected || (index == next && seq == last + 1))
            }
            Block::Corrupt => index == next,
            Block::Foreign => false,
        };
        if !ok {
            problem_count += 1;
            if problems.len() < MAX_LISTED {
                problems.push(BlockProblem {
                    index,
                    expected_seq: expected,
                    found: *found,
                });
            }
        }
    }
    RegionCheck {
        last,
        problems,
        problem_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The region after writes 1..=last into `n` blocks.
    fn region(n: u64, last: u64) -> Vec<Block> {
        let mut blocks = vec![Block::Empty; usize::try_from(n).unwrap()];
        for seq in 1..=last {
            let mut buf = [0u8; BLOCK_SIZE];
            let index = index_of(seq, n);
            encode(&mut buf, seq, index);
            blocks[usize::try_from(index).unwrap()] = decode(&buf);
        }
        blocks
    }

    #[test]
    fn encoded_blocks_decode_and_damage_is_seen() {
        let mut buf = [0u8; BLOCK_SIZE];
        assert_eq!(decode(&buf), Block::Empty);
        encode(&mut buf, 42, 3);
        assert_eq!(decode(&buf), Block::Written { seq: 42, index: 3 });
        buf[1000] ^= 0x40;
        assert_eq!(decode(&buf), Block::Corrupt);
        let mut other = [0u8; BLOCK_SIZE];
        other[7] = 1;
        assert_eq!(decode(&other), Block::Foreign);
    }

    #[test]
    fn expected_sequence_wraps_around_the_region() {
        assert_eq!(expected_seq(0, 0, 4), 0);
        assert_eq!(expected_seq(2, 2, 4), 0);
        assert_eq!(expected_seq(1, 2, 4), 2);
        assert_eq!(expected_seq(0, 5, 4), 5);
        assert_eq!(expected_seq(1, 5, 4), 2);
        assert_eq!(expected_seq(3, 5, 4), 4);
        assert_eq!(expected_seq(3, 8, 4), 8);
    }

    #[test]
    fn intact_regions_pass_whether_or_not_the_last_sequence_is_known() {
        for (n, last) in [(4, 0), (4, 3), (4, 4), (4, 9), (16, 100)] {
            let blocks = region(n, last);
            assert!(check_region(&blocks, Some(last)).passed(), "{n} {last}");
            let derived = check_region(&blocks, None);
            assert!(derived.passed(), "{n} {last}");
            assert_eq!(derived.last, last);
        }
    }

    #[test]
    fn a_lost_write_in_the_middle_is_found() {
        let mut blocks = region(8, 20);
        // Write 14 (block 5) never reached the disk: block 5 still holds 6.
        let mut buf = [0u8; BLOCK_SIZE];
        encode(&mut buf, 6, 5);
        blocks[5] = decode(&buf);
        let c = check_region(&blocks, None);
        assert!(!c.passed());
        assert_eq!(c.problems[0].index, 5);
        assert_eq!(c.problems[0].expected_seq, 14);
        assert!(
            c.problems[0].to_string().contains("found sequence 6"),
            "{}",
            c.problems[0]
        );
    }

    #[test]
    fn a_lost_tail_is_found_when_the_last_durable_write_is_known() {
        let blocks = region(8, 10);
        let c = check_region(&blocks, Some(12));
        assert_eq!(c.problem_count, 2);
    }

    #[test]
    fn the_next_block_may_hold_an_unacknowledged_write() {
        let mut blocks = region(4, 6);
        let mut buf = [0u8; BLOCK_SIZE];
        encode(&mut buf, 7, 2);
        blocks[2] = decode(&buf);
        assert!(check_region(&blocks, Some(6)).passed());
        blocks[2] = Block::Corrupt;
        assert!(check_region(&blocks, Some(6)).passed());
        // ...but no other block may be torn.
        blocks[1] = Block::Corrupt;
        assert_eq!(check_region(&blocks, Some(6)).problem_count, 1);
    }

    #[test]
    fn foreign_data_and_misplaced_blocks_fail() {
        let mut blocks = region(4, 2);
        blocks[3] = Block::Foreign;
        assert!(!check_region(&blocks, None).passed());
        let mut blocks = region(4, 4);
        blocks.swap(0, 1);
        let c = check_region(&blocks, None);
        assert_eq!(c.problem_count, 2);
        assert!(c.problems[0].to_string().contains("written for block 1"));
    }
}
