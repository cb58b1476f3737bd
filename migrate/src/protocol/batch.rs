//! Batches of pages (MemoryBatch) and disk blocks (DiskBlocks): zero-copy views for the
//! receiver, a reusable encoder for the sender, and unit decompression.
//!
//! Payload layout (little-endian), built for throughput: the sender appends each unit's data
//! straight into the frame buffer as it goes and writes the small table at the end, so page
//! data is copied exactly once (guest memory → frame); the receiver validates the table in one
//! pass and hands out slices into the frame buffer.
//!
//! ```text
//! MemoryBatch: u32 round | u32 count | u32 data_len | data[data_len] | table[count]
//! DiskBlocks:  u32 disk | u32 layer | u32 round | u32 count | u32 data_len | data | table
//! table entry (13 bytes): u64 index | u8 kind (UnitKind) | u32 len
//! ```
//!
//! Rules checked on decode: `1 <= count <= MAX_BATCH_ENTRIES`, `data_len <= MAX_BATCH_DATA`,
//! the table is exactly `count * 13` bytes and ends the payload, indices strictly increase
//! (no duplicates in a batch), each index is below the protocol's maximum, `Zero` has len 0,
//! `Raw` has len = the unit size, compressed kinds have `0 < len < unit size`, and the lengths
//! add up to `data_len`. Whether an index lies inside *this* VM or disk is the receiver state
//! machine's check.

use super::error::ProtocolError;
use super::frame::{FRAME_HEADER_LEN, write_header_placeholder};
use super::types::{
    BATCH_ENTRY_SIZE, DISK_BLOCK_SIZE, MAX_BATCH_DATA, MAX_BATCH_ENTRIES, MAX_DISK_BYTES,
    MAX_MEMORY_BYTES, MessageType, PAGE_SIZE, ProtocolVersion, UnitKind,
};
use super::wire::WireReader;
use std::fmt;

/// Bytes before the data in a MemoryBatch payload.
pub const MEMORY_BATCH_HEADER: usize = 12;
/// Bytes before the data in a DiskBlocks payload.
pub const DISK_BATCH_HEADER: usize = 20;

/// Page indices must be below this (the protocol's largest memory).
pub const MAX_PAGE_INDEX: u64 = MAX_MEMORY_BYTES / PAGE_SIZE as u64;
/// Disk block indices must be below this (the protocol's largest disk).
pub const MAX_BLOCK_INDEX: u64 = MAX_DISK_BYTES / DISK_BLOCK_SIZE as u64;

#[derive(Debug, Clone, Copy)]
struct Shape {
    kind: MessageType,
    unit: usize,
    max_index: u64,
}

const MEMORY: Shape = Shape {
    kind: MessageType::MemoryBatch,
    unit: PAGE_SIZE,
    max_index: MAX_PAGE_INDEX,
};
const DISK: Shape = Shape {
    kind: MessageType::DiskBlocks,
    unit: DISK_BLOCK_SIZE,
    max_index: MAX_BLOCK_INDEX,
};

/// The validated units of a batch: the data area and the table, both borrowed from the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Units<'a> {
    unit: usize,
    count: u32,
    data: &'a [u8],
    table: &'a [u8],
    first: u64,
    last: u64,
}

impl fmt::Debug for Units<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Units")
            .field("count", &self.count)
            .field("data_len", &self.data.len())
            .field("first", &self.first)
            .field("last", &self.last)
            .finish()
    }
}

impl<'a> Units<'a> {
    fn parse(r: &mut WireReader<'a>, shape: Shape) -> Result<Units<'a>, ProtocolError> {
        let kind = shape.kind;
        let count = r.u32("entry count")?;
        let data_len = r.u32("data length")?;
        let entries = usize::try_from(count).unwrap_or(usize::MAX);
        if entries == 0 || entries > MAX_BATCH_ENTRIES {
            return Err(ProtocolError::invalid(
                kind,
                "entry count",
                format!("{count} is not between 1 and {MAX_BATCH_ENTRIES}"),
            ));
        }
        let data_len = usize::try_from(data_len).unwrap_or(usize::MAX);
        if data_len > MAX_BATCH_DATA {
            return Err(ProtocolError::invalid(
                kind,
                "data length",
                format!("{data_len} exceeds the limit of {MAX_BATCH_DATA} bytes"),
            ));
        }
        let data = r.bytes(data_len, "data")?;
        // entries <= MAX_BATCH_ENTRIES, so this cannot overflow; checked anyway.
        let table_len = entries
            .checked_mul(BATCH_ENTRY_SIZE)
            .ok_or_else(|| ProtocolError::invalid(kind, "entry count", "it overflows"))?;
        if r.remaining() != table_len {
            return Err(ProtocolError::invalid(
                kind,
                "entry table",
                format!(
                    "{count} entries need {table_len} bytes after the data, {} are there",
                    r.remaining()
                ),
            ));
        }
        let table = r.bytes(table_len, "entry table")?;

        let mut sum: usize = 0;
        let mut prev: Option<u64> = None;
        let mut first = 0;
        for entry in table.chunks_exact(BATCH_ENTRY_SIZE) {
            let (index, unit_kind, len) = parse_entry(entry).ok_or(ProtocolError::Truncated {
                kind,
                field: "entry table",
            })?;
            if index >= shape.max_index {
                return Err(ProtocolError::invalid(
                    kind,
                    "entry index",
                    format!(
                        "{index} is beyond the largest the protocol allows ({})",
                        shape.max_index - 1
                    ),
                ));
            }
            match prev {
                Some(p) if index <= p => {
                    return Err(ProtocolError::invalid(
                        kind,
                        "entry index",
                        format!("{index} follows {p}; indices must strictly increase"),
                    ));
                }
                Some(_) => {}
                None => first = index,
            }
            prev = Some(index);
            let unit_kind = UnitKind::try_from(unit_kind).map_err(|raw| {
                ProtocolError::invalid(
                    kind,
                    "entry kind",
                    format!("{raw} is not a known unit kind"),
                )
            })?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let ok = match unit_kind {
                UnitKind::Zero => len == 0,
                UnitKind::Raw => len == shape.unit,
                UnitKind::Lz4 | UnitKind::Zstd => len > 0 && len < shape.unit,
            };
            if !ok {
                return Err(ProtocolError::invalid(
                    kind,
                    "entry length",
                    format!(
                        "{len} is not a valid length for a {unit_kind} unit of {} bytes",
                        shape.unit
                    ),
                ));
            }
            sum = sum
                .checked_add(len)
                .ok_or_else(|| ProtocolError::invalid(kind, "entry length", "the sum overflows"))?;
        }
        if sum != data_len {
            return Err(ProtocolError::invalid(
                kind,
                "data length",
                format!("the entries add up to {sum} bytes, the batch has {data_len}"),
            ));
        }
        Ok(Units {
            unit: shape.unit,
            count,
            data,
            table,
            first,
            last: prev.unwrap_or(first),
        })
    }

    /// Number of units.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The lowest index in the batch.
    pub fn first_index(&self) -> u64 {
        self.first
    }

    /// The highest index in the batch (indices strictly increase).
    pub fn last_index(&self) -> u64 {
        self.last
    }

    /// Bytes of unit data (after compression).
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The units, in index order.
    pub fn iter(&self) -> UnitIter<'a> {
        UnitIter {
            table: self.table.chunks_exact(BATCH_ENTRY_SIZE),
            data: self.data,
            unit: self.unit,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_le_bytes());
        // data.len() <= MAX_BATCH_DATA, checked when the view was made.
        let data_len = u32::try_from(self.data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&data_len.to_le_bytes());
        out.extend_from_slice(self.data);
        out.extend_from_slice(self.table);
    }
}

fn parse_entry(entry: &[u8]) -> Option<(u64, u8, u32)> {
    let (index, rest) = entry.split_first_chunk::<8>()?;
    let (kind, rest) = rest.split_first()?;
    let (len, _) = rest.split_first_chunk::<4>()?;
    Some((u64::from_le_bytes(*index), *kind, u32::from_le_bytes(*len)))
}

/// Iterator over a validated batch's units.
#[derive(Debug, Clone)]
pub struct UnitIter<'a> {
    table: std::slice::ChunksExact<'a, u8>,
    data: &'a [u8],
    unit: usize,
}

impl<'a> Iterator for UnitIter<'a> {
    type Item = Unit<'a>;

    fn next(&mut self) -> Option<Unit<'a>> {
        // The table was validated when the batch was decoded; a failure here would mean the
        // view was built around that check, and ends the iteration rather than panicking.
        let (index, kind, len) = parse_entry(self.table.next()?)?;
        let len = usize::try_from(len).ok()?;
        let (bytes, rest) = self.data.split_at_checked(len)?;
        self.data = rest;
        let data = match UnitKind::try_from(kind).ok()? {
            UnitKind::Zero => UnitData::Zero,
            UnitKind::Raw => UnitData::Raw(bytes),
            UnitKind::Lz4 => UnitData::Lz4(bytes),
            UnitKind::Zstd => UnitData::Zstd(bytes),
        };
        Some(Unit {
            index,
            data,
            unit: self.unit,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.table.size_hint()
    }
}

/// One page or disk block of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit<'a> {
    /// Page index (guest physical address / 4096) or disk block index (offset / 64 KiB).
    pub index: u64,
    /// The encoded bytes.
    pub data: UnitData<'a>,
    unit: usize,
}

impl Unit<'_> {
    /// The decoded size of this unit (4096 for pages, 65536 for disk blocks).
    pub fn unit_size(&self) -> usize {
        self.unit
    }
}

/// How one unit's bytes travel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UnitData<'a> {
    /// All zero.
    Zero,
    /// The unit itself.
    Raw(&'a [u8]),
    /// LZ4 block.
    Lz4(&'a [u8]),
    /// zstd frame.
    Zstd(&'a [u8]),
}

impl fmt::Debug for UnitData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitData::Zero => f.write_str("Zero"),
            UnitData::Raw(b) => write!(f, "Raw({} bytes)", b.len()),
            UnitData::Lz4(b) => write!(f, "Lz4({} bytes)", b.len()),
            UnitData::Zstd(b) => write!(f, "Zstd({} bytes)", b.len()),
        }
    }
}

impl UnitData<'_> {
    /// The wire kind.
    pub fn kind(&self) -> UnitKind {
        match self {
            UnitData::Zero => UnitKind::Zero,
            UnitData::Raw(_) => UnitKind::Raw,
            UnitData::Lz4(_) => UnitKind::Lz4,
            UnitData::Zstd(_) => UnitKind::Zstd,
        }
    }
}

/// A MemoryBatch: guest pages of one round, validated, borrowing the frame buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBatch<'a> {
    /// The round these pages belong to (the channel's current round).
    pub round: u32,
    units: Units<'a>,
}

impl<'a> MemoryBatch<'a> {
    pub(crate) fn decode(payload: &'a [u8]) -> Result<MemoryBatch<'a>, ProtocolError> {
        let mut r = WireReader::new(MessageType::MemoryBatch, payload);
        let round = r.u32("round")?;
        let units = Units::parse(&mut r, MEMORY)?;
        r.finish()?;
        Ok(MemoryBatch { round, units })
    }

    pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        self.units.encode_into(out);
    }

    /// The pages.
    pub fn pages(&self) -> &Units<'a> {
        &self.units
    }
}

/// A DiskBlocks message: blocks of one layer of one disk, validated, borrowing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBlocks<'a> {
    /// The disk's index in the VM configuration.
    pub disk: u32,
    /// The layer's index in the disk's chain (0 = the base).
    pub layer: u32,
    /// The channel's current round.
    pub round: u32,
    units: Units<'a>,
}

impl<'a> DiskBlocks<'a> {
    pub(crate) fn decode(payload: &'a [u8]) -> Result<DiskBlocks<'a>, ProtocolError> {
        let mut r = WireReader::new(MessageType::DiskBlocks, payload);
        let disk = r.u32("disk")?;
        let layer = r.u32("layer")?;
        let round = r.u32("round")?;
        let units = Units::parse(&mut r, DISK)?;
        r.finish()?;
        Ok(DiskBlocks {
            disk,
            layer,
            round,
            units,
        })
    }

    pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.round.to_le_bytes());
        self.units.encode_into(out);
    }

    /// The blocks.
    pub fn blocks(&self) -> &Units<'a> {
        &self.units
    }
}

/// Decodes units into memory. Holds the zstd context so it is created once per channel.
#[derive(Default)]
pub struct UnitDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for UnitDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitDecoder").finish_non_exhaustive()
    }
}

impl UnitDecoder {
    /// A decoder; the zstd context is created on first use.
    pub fn new() -> UnitDecoder {
        UnitDecoder::default()
    }

    /// Writes the unit's decoded bytes to `out`, which must be exactly one unit long.
    pub fn decode(&mut self, unit: &Unit<'_>, out: &mut [u8]) -> Result<(), ProtocolError> {
        if out.len() != unit.unit {
            return Err(ProtocolError::InternalBug(format!(
                "a {}-byte unit was to be decoded into a {}-byte buffer",
                unit.unit,
                out.len()
            )));
        }
        let bad = || ProtocolError::BadCompressedUnit {
            index: unit.index,
            unit: unit.unit,
        };
        match unit.data {
            UnitData::Zero => out.fill(0),
            UnitData::Raw(bytes) => {
                if bytes.len() != out.len() {
                    return Err(bad());
                }
                out.copy_from_slice(bytes);
            }
            UnitData::Lz4(bytes) => {
                let n = lz4_flex::block::decompress_into(bytes, out).map_err(|_| bad())?;
                if n != out.len() {
                    return Err(bad());
                }
            }
            UnitData::Zstd(bytes) => {
                let ctx = match &mut self.zstd {
                    Some(ctx) => ctx,
                    None => self.zstd.insert(zstd::bulk::Decompressor::new()?),
                };
                let n = ctx.decompress_to_buffer(bytes, out).map_err(|_| bad())?;
                if n != out.len() {
                    return Err(bad());
                }
            }
        }
        Ok(())
    }
}

/// How the sender encodes non-zero units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw.
    None,
    /// LZ4 (fast; about 1 GiB/s per core here), raw when it does not shrink the unit.
    Lz4,
    /// zstd at this level (denser, slower), raw when it does not shrink the unit.
    Zstd(i32),
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Memory,
    Disk,
}

/// Builds MemoryBatch and DiskBlocks frames into a reusable buffer: one copy of each unit's
/// bytes, zero units detected and sent as flags, compression as configured.
pub struct BatchEncoder {
    frame: Vec<u8>,
    table: Vec<u8>,
    target: Option<(Target, Shape)>,
    count: u32,
    data_len: usize,
    last: Option<u64>,
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    version: ProtocolVersion,
}

impl fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("target", &self.target.map(|t| t.0))
            .field("count", &self.count)
            .field("data_len", &self.data_len)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl BatchEncoder {
    /// An encoder for frames of the negotiated `version`.
    pub fn new(
        version: ProtocolVersion,
        compression: Compression,
    ) -> Result<BatchEncoder, ProtocolError> {
        let zstd = match compression {
            Compression::Zstd(level) => Some(zstd::bulk::Compressor::new(level)?),
            Compression::None | Compression::Lz4 => None,
        };
        Ok(BatchEncoder {
            frame: Vec::with_capacity(MessageType::MemoryBatch.max_payload() + FRAME_HEADER_LEN),
            table: Vec::with_capacity(MAX_BATCH_ENTRIES * BATCH_ENTRY_SIZE),
            target: None,
            count: 0,
            data_len: 0,
            last: None,
            compression,
            zstd,
            version,
        })
    }

    fn reset(&mut self, shape: Shape, target: Target) {
        self.frame.clear();
        self.table.clear();
        self.count = 0;
        self.data_len = 0;
        self.last = None;
        self.target = Some((target, shape));
        write_header_placeholder(&mut self.frame, self.version, shape.kind);
    }

    /// Starts a MemoryBatch for `round` (discarding any batch in progress).
    pub fn begin_memory(&mut self, round: u32) {
        self.reset(MEMORY, Target::Memory);
        self.frame.extend_from_slice(&round.to_le_bytes());
        self.frame.extend_from_slice(&[0; 8]); // count, data_len: patched by finish
    }

    /// Starts a DiskBlocks message for a layer of a disk (discarding any batch in progress).
    pub fn begin_disk(&mut self, disk: u32, layer: u32, round: u32) {
        self.reset(DISK, Target::Disk);
        self.frame.extend_from_slice(&disk.to_le_bytes());
        self.frame.extend_from_slice(&layer.to_le_bytes());
        self.frame.extend_from_slice(&round.to_le_bytes());
        self.frame.extend_from_slice(&[0; 8]);
    }

    /// Units in the batch so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the batch has no unit yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether one more unit of any kind fits.
    pub fn has_room(&self) -> bool {
        match self.target {
            Some((_, shape)) => {
                usize::try_from(self.count).unwrap_or(usize::MAX) < MAX_BATCH_ENTRIES
                    && self.data_len.saturating_add(shape.unit) <= MAX_BATCH_DATA
            }
            None => false,
        }
    }

    /// Appends a unit with this index (greater than the previous one) and these bytes (exactly
    /// one unit). Returns how it was encoded. Fails, as our bug, if no batch was begun, the
    /// batch is full (check [`BatchEncoder::has_room`]), or the index does not increase.
    pub fn push(&mut self, index: u64, bytes: &[u8]) -> Result<UnitKind, ProtocolError> {
        let Some((_, shape)) = self.target else {
            return Err(ProtocolError::InternalBug(
                "a unit was pushed before a batch was begun".into(),
            ));
        };
        let kind = shape.kind;
        if bytes.len() != shape.unit {
            return Err(ProtocolError::encode(
                kind,
                format!(
                    "a unit of {} bytes was pushed, units are {} bytes",
                    bytes.len(),
                    shape.unit
                ),
            ));
        }
        if !self.has_room() {
            return Err(ProtocolError::encode(
                kind,
                "a unit was pushed into a full batch",
            ));
        }
        if index >= shape.max_index || self.last.is_some_and(|last| index <= last) {
            return Err(ProtocolError::encode(
                kind,
                format!("unit {index} was pushed out of order or out of range"),
            ));
        }
        let start = self.frame.len();
        let unit_kind = if is_zero(bytes) {
            UnitKind::Zero
        } else {
            match self.compression {
                Compression::None => {
                    self.frame.extend_from_slice(bytes);
                    UnitKind::Raw
                }
                Compression::Lz4 => {
                    let bound = lz4_flex::block::get_maximum_output_size(bytes.len());
                    self.frame.resize(start.saturating_add(bound), 0);
                    let n = self
                        .frame
                        .get_mut(start..)
                        .and_then(|out| lz4_flex::block::compress_into(bytes, out).ok());
                    finish_compressed(&mut self.frame, start, n, bytes, UnitKind::Lz4)
                }
                Compression::Zstd(_) => {
                    self.frame.resize(start.saturating_add(shape.unit - 1), 0);
                    let n = match (&mut self.zstd, self.frame.get_mut(start..)) {
                        (Some(ctx), Some(out)) => ctx.compress_to_buffer(bytes, out).ok(),
                        _ => None,
                    };
                    finish_compressed(&mut self.frame, start, n, bytes, UnitKind::Zstd)
                }
            }
        };
        let len = self.frame.len().saturating_sub(start);
        self.data_len = self.data_len.saturating_add(len);
        self.table.extend_from_slice(&index.to_le_bytes());
        self.table.push(unit_kind.to_wire());
        // len <= unit size (64 KiB), so it fits.
        self.table
            .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        self.count = self.count.saturating_add(1);
        self.last = Some(index);
        Ok(unit_kind)
    }

    /// Appends a zero unit without looking at its bytes (the sender knows it is untouched).
    pub fn push_zero(&mut self, index: u64) -> Result<(), ProtocolError> {
        let Some((_, shape)) = self.target else {
            return Err(ProtocolError::InternalBug(
                "a unit was pushed before a batch was begun".into(),
            ));
        };
        if usize::try_from(self.count).unwrap_or(usize::MAX) >= MAX_BATCH_ENTRIES {
            return Err(ProtocolError::encode(
                shape.kind,
                "a unit was pushed into a full batch",
            ));
        }
        if index >= shape.max_index || self.last.is_some_and(|last| index <= last) {
            return Err(ProtocolError::encode(
                shape.kind,
                format!("unit {index} was pushed out of order or out of range"),
            ));
        }
        self.table.extend_from_slice(&index.to_le_bytes());
        self.table.push(UnitKind::Zero.to_wire());
        self.table.extend_from_slice(&0u32.to_le_bytes());
        self.count = self.count.saturating_add(1);
        self.last = Some(index);
        Ok(())
    }

    /// Completes the frame (header, counts, table) and returns its bytes, ready to write. The
    /// batch must have at least one unit. The encoder can then begin the next batch.
    pub fn finish(&mut self) -> Result<&[u8], ProtocolError> {
        let Some((target, shape)) = self.target.take() else {
            return Err(ProtocolError::InternalBug(
                "a batch was finished before it was begun".into(),
            ));
        };
        if self.count == 0 {
            return Err(ProtocolError::encode(shape.kind, "the batch is empty"));
        }
        self.frame.extend_from_slice(&self.table);
        let counts_at = FRAME_HEADER_LEN
            + match target {
                Target::Memory => MEMORY_BATCH_HEADER - 8,
                Target::Disk => DISK_BATCH_HEADER - 8,
            };
        let data_len = u32::try_from(self.data_len)
            .map_err(|_| ProtocolError::encode(shape.kind, "the data does not fit a u32"))?;
        let mut counts = [0u8; 8];
        counts[..4].copy_from_slice(&self.count.to_le_bytes());
        counts[4..].copy_from_slice(&data_len.to_le_bytes());
        self.frame
            .get_mut(counts_at..counts_at + 8)
            .ok_or_else(|| ProtocolError::InternalBug("the batch header is missing".into()))?
            .copy_from_slice(&counts);
        super::frame::patch_length(&mut self.frame, 0, shape.kind)?;
        Ok(&self.frame)
    }
}

fn finish_compressed(
    frame: &mut Vec<u8>,
    start: usize,
    n: Option<usize>,
    raw: &[u8],
    kind: UnitKind,
) -> UnitKind {
    match n {
        Some(n) if n > 0 && n < raw.len() => {
            frame.truncate(start.saturating_add(n));
            kind
        }
        _ => {
            frame.truncate(start);
            frame.extend_from_slice(raw);
            UnitKind::Raw
        }
    }
}

/// Whether every byte is zero. Checks 64-byte chunks so a non-zero page is usually rejected
/// after its first chunk, while a zero page is scanned at memory speed.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{Decoded, decode_frame};
    use crate::protocol::message::Message;

    fn page(seed: u8, compressible: bool) -> Vec<u8> {
        let mut v = vec![0u8; PAGE_SIZE];
        let mut x = u32::from(seed) | 1;
        for (i, b) in v.iter_mut().enumerate() {
            if compressible {
                *b = seed.wrapping_add(u8::try_from(i / 512).unwrap());
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x.to_le_bytes()[0];
            }
        }
        v
    }

    fn decode_memory(frame: &[u8]) -> MemoryBatch<'_> {
        match decode_frame(frame).unwrap() {
            Decoded::Frame { frame: f, consumed } => {
                assert_eq!(consumed, frame.len());
                match f.message {
                    Message::MemoryBatch(b) => b,
                    other => panic!("decoded {other:?}"),
                }
            }
            Decoded::NeedMore { .. } => panic!("incomplete"),
        }
    }

    #[test]
    fn every_compression_round_trips_page_by_page() {
        let pages: Vec<(u64, Vec<u8>)> = vec![
            (3, vec![0; PAGE_SIZE]),
            (7, page(1, true)),
            (8, page(2, false)),
            (100, page(3, true)),
            (1 << 20, page(4, false)),
        ];
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd(1)] {
            let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, compression).unwrap();
            enc.begin_memory(5);
            let mut kinds = Vec::new();
            for (index, bytes) in &pages {
                kinds.push(enc.push(*index, bytes).unwrap());
            }
            let frame = enc.finish().unwrap().to_vec();
            let batch = decode_memory(&frame);
            assert_eq!(batch.round, 5);
            assert_eq!(batch.pages().count(), 5);
            assert_eq!(batch.pages().first_index(), 3);
            assert_eq!(batch.pages().last_index(), 1 << 20);
            let mut dec = UnitDecoder::new();
            let mut out = vec![0xEEu8; PAGE_SIZE];
            let got: Vec<_> = batch.pages().iter().collect();
            assert_eq!(got.len(), pages.len());
            for ((unit, (index, bytes)), kind) in got.iter().zip(&pages).zip(&kinds) {
                assert_eq!(unit.index, *index);
                assert_eq!(unit.data.kind(), *kind);
                dec.decode(unit, &mut out).unwrap();
                assert_eq!(&out, bytes, "page {index} with {compression:?}");
            }
            // zero pages travel as flags, incompressible pages raw
            assert_eq!(kinds[0], UnitKind::Zero);
            assert_eq!(kinds[2], UnitKind::Raw);
            match compression {
                Compression::None => assert_eq!(kinds[1], UnitKind::Raw),
                Compression::Lz4 => assert_eq!(kinds[1], UnitKind::Lz4),
                Compression::Zstd(_) => assert_eq!(kinds[1], UnitKind::Zstd),
            }
            // re-encoding the decoded view gives the same bytes
            let mut again = Vec::new();
            Message::MemoryBatch(batch)
                .encode(ProtocolVersion::CURRENT, &mut again)
                .unwrap();
            assert_eq!(again, frame);
        }
    }

    #[test]
    fn disk_blocks_round_trip() {
        let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, Compression::Lz4).unwrap();
        enc.begin_disk(2, 1, 4);
        let mut block = vec![0u8; DISK_BLOCK_SIZE];
        block[1000] = 9;
        enc.push(10, &block).unwrap();
        enc.push_zero(11).unwrap();
        let frame = enc.finish().unwrap().to_vec();
        let Decoded::Frame { frame: f, .. } = decode_frame(&frame).unwrap() else {
            panic!("incomplete")
        };
        let Message::DiskBlocks(b) = f.message else {
            panic!("not disk blocks")
        };
        assert_eq!((b.disk, b.layer, b.round), (2, 1, 4));
        let units: Vec<_> = b.blocks().iter().collect();
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].unit_size(), DISK_BLOCK_SIZE);
        let mut out = vec![1u8; DISK_BLOCK_SIZE];
        UnitDecoder::new().decode(&units[0], &mut out).unwrap();
        assert_eq!(out, block);
        assert_eq!(units[1].data, UnitData::Zero);
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would_reject() {
        let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, Compression::None).unwrap();
        assert!(matches!(
            enc.push(1, &page(1, false)),
            Err(ProtocolError::InternalBug(_))
        ));
        enc.begin_memory(1);
        assert!(matches!(
            enc.finish(),
            Err(ProtocolError::EncodeInvalid { .. })
        ));
        enc.begin_memory(1);
        enc.push(5, &page(1, false)).unwrap();
        let e = enc.push(5, &page(1, false)).unwrap_err();
        assert_eq!(e.fault(), crate::protocol::Fault::OwnBug);
        assert!(enc.push(4, &page(1, false)).is_err());
        assert!(enc.push(MAX_PAGE_INDEX, &page(1, false)).is_err());
        assert!(enc.push(6, &[0u8; 100]).is_err());
        // fill the data area: 1024 raw pages, then no room
        enc.begin_memory(1);
        let p = page(9, false);
        for i in 0..1024 {
            assert!(enc.has_room());
            enc.push(i, &p).unwrap();
        }
        assert!(!enc.has_room());
        assert!(enc.push(2000, &p).is_err());
        let frame = enc.finish().unwrap().to_vec();
        assert_eq!(decode_memory(&frame).pages().count(), 1024);
    }

    #[test]
    fn corrupt_compressed_pages_are_rejected_when_decoded() {
        let mut dec = UnitDecoder::new();
        let mut out = vec![0u8; PAGE_SIZE];
        for data in [
            UnitData::Lz4(&[0xff, 1, 2, 3]),
            UnitData::Zstd(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0]),
            UnitData::Raw(&[1, 2, 3]),
        ] {
            let unit = Unit {
                index: 77,
                data,
                unit: PAGE_SIZE,
            };
            let e = dec.decode(&unit, &mut out).unwrap_err();
            assert!(
                matches!(e, ProtocolError::BadCompressedUnit { index: 77, .. }),
                "{e}"
            );
        }
        // lz4 of a short page (decompresses to fewer bytes than a page)
        let short = lz4_flex::block::compress(&[7u8; 100]);
        let unit = Unit {
            index: 1,
            data: UnitData::Lz4(&short),
            unit: PAGE_SIZE,
        };
        assert!(dec.decode(&unit, &mut out).is_err());
        // zstd of more than a page
        let long = zstd::bulk::compress(&[7u8; 2 * PAGE_SIZE], 1).unwrap();
        let unit = Unit {
            index: 1,
            data: UnitData::Zstd(&long),
            unit: PAGE_SIZE,
        };
        assert!(dec.decode(&unit, &mut out).is_err());
    }

    #[test]
    fn units_made_by_other_encoders_decode() {
        // An LZ4 block written by hand from the format description: one literal "a", a match
        // at offset 1 of 4090 bytes, five final literals.
        let mut lz4 = vec![0x1F, b'a', 1, 0];
        lz4.extend_from_slice(&[255; 15]);
        lz4.push(246);
        lz4.push(0x50);
        lz4.extend_from_slice(b"aaaaa");
        // A zstd frame: single segment, 2-byte content size (4096 - 256), one RLE block.
        let zstd = [
            0x28, 0xB5, 0x2F, 0xFD, 0x60, 0x00, 0x0F, 0x03, 0x80, 0x00, b'a',
        ];
        let mut dec = UnitDecoder::new();
        for data in [UnitData::Lz4(&lz4), UnitData::Zstd(&zstd)] {
            let mut out = vec![0u8; PAGE_SIZE];
            let unit = Unit {
                index: 0,
                data,
                unit: PAGE_SIZE,
            };
            dec.decode(&unit, &mut out).unwrap();
            assert!(out.iter().all(|b| *b == b'a'), "{data:?}");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; PAGE_SIZE]));
        for at in [0, 63, 64, 4095] {
            let mut p = vec![0u8; PAGE_SIZE];
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
        }
        assert!(!is_zero(&[0, 0, 0, 1]));
        assert!(is_zero(&[]));
    }
}
