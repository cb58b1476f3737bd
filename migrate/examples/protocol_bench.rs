//! Throughput of the migration protocol's page codec: encode and decode MemoryBatch frames of
//! 4 KiB pages, raw (incompressible), zero, and compressed (lz4, zstd) over a mixed image.
//!
//! `cargo run --release -p vmgate-migrate --example protocol_bench [MiB]`
//!
//! Encode = guest pages → frame bytes (zero detection, compression, one copy into the frame).
//! Decode = frame bytes → validated view → every page written into a destination memory
//! buffer (decompressed where needed), via `decode_frame`, and again via `FrameReader` over an
//! in-memory stream (which adds the copy from the stream into the reader's buffer).
//! Figures are GB/s of guest memory (1 GB = 1e9 bytes), best of several passes.

use std::time::{Duration, Instant};
use vmgate_migrate::protocol::{
    BatchEncoder, Compression, Decoded, FrameReader, Message, PAGE_SIZE, ProtocolVersion,
    UnitDecoder, decode_frame,
};

const PASSES: usize = 5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn incompressible(bytes: usize) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut v = Vec::with_capacity(bytes);
    while v.len() < bytes {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(bytes);
    v
}

/// Half zero pages; the rest text-like (repeated words with numbers), which compresses to
/// roughly a third.
fn mixed(bytes: usize) -> Vec<u8> {
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    let mut v = vec![0u8; bytes];
    for (i, page) in v.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let mut text = Vec::with_capacity(PAGE_SIZE);
        while text.len() < PAGE_SIZE {
            let n = rng.next();
            text.extend_from_slice(match n % 6 {
                0 => b"migration ".as_slice(),
                1 => b"vmgate ",
                2 => b"page ",
                3 => b"kernel ",
                4 => b"\x00\x00\x00\x00\x10\x00\x00\x00",
                _ => b"0x7f3a ",
            });
            text.extend_from_slice(format!("{} ", n % 1000).as_bytes());
        }
        page.copy_from_slice(&text[..PAGE_SIZE]);
    }
    v
}

fn encode_all(
    memory: &[u8],
    compression: Compression,
) -> Result<Vec<Vec<u8>>, vmgate_migrate::protocol::ProtocolError> {
    let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, compression)?;
    let mut frames = Vec::new();
    enc.begin_memory(1);
    for (i, page) in memory.chunks_exact(PAGE_SIZE).enumerate() {
        if !enc.has_room() {
            frames.push(enc.finish()?.to_vec());
            enc.begin_memory(1);
        }
        enc.push(u64::try_from(i).unwrap_or(u64::MAX), page)?;
    }
    if !enc.is_empty() {
        frames.push(enc.finish()?.to_vec());
    }
    Ok(frames)
}

/// Encode timing without keeping the frames (the sender writes each frame to the socket and
/// reuses the buffer).
fn time_encode(memory: &[u8], compression: Compression) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..PASSES {
        let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, compression).expect("encoder");
        let mut sink = 0usize;
        let start = Instant::now();
        enc.begin_memory(1);
        for (i, page) in memory.chunks_exact(PAGE_SIZE).enumerate() {
            if !enc.has_room() {
                sink += enc.finish().expect("finish").len();
                enc.begin_memory(1);
            }
            enc.push(u64::try_from(i).unwrap_or(u64::MAX), page)
                .expect("push");
        }
        sink += enc.finish().expect("finish").len();
        best = best.min(start.elapsed());
        std::hint::black_box(sink);
    }
    best
}

fn apply(msg: &Message<'_>, dest: &mut [u8], decoder: &mut UnitDecoder) -> usize {
    let Message::MemoryBatch(batch) = msg else {
        panic!("not a memory batch")
    };
    let mut n = 0;
    for unit in batch.pages().iter() {
        let at = usize::try_from(unit.index).expect("index") * PAGE_SIZE;
        let page = &mut dest[at..at + PAGE_SIZE];
        decoder.decode(&unit, page).expect("decode");
        n += 1;
    }
    n
}

fn time_decode(frames: &[Vec<u8>], dest: &mut [u8]) -> Duration {
    let mut best = Duration::MAX;
    let mut decoder = UnitDecoder::new();
    for _ in 0..PASSES {
        let start = Instant::now();
        let mut pages = 0;
        for f in frames {
            match decode_frame(f).expect("decode") {
                Decoded::Frame { frame, .. } => pages += apply(&frame.message, dest, &mut decoder),
                Decoded::NeedMore { .. } => panic!("incomplete"),
            }
        }
        best = best.min(start.elapsed());
        assert_eq!(pages * PAGE_SIZE, dest.len());
    }
    best
}

fn time_reader(stream: &[u8], dest: &mut [u8]) -> Duration {
    let mut best = Duration::MAX;
    let mut decoder = UnitDecoder::new();
    for _ in 0..PASSES {
        let start = Instant::now();
        let mut reader = FrameReader::new(stream);
        let mut pages = 0;
        while let Some(frame) = reader.read_frame().expect("read") {
            pages += apply(&frame.message, dest, &mut decoder);
        }
        best = best.min(start.elapsed());
        assert_eq!(pages * PAGE_SIZE, dest.len());
    }
    best
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let bytes = mib * 1024 * 1024;
    println!(
        "protocol_bench: {mib} MiB of guest memory per workload, best of {PASSES} passes, one thread"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>12}",
        "workload", "encode", "decode", "read+decode", "wire/memory"
    );
    // Reference: the same bytes copied page by page with memcpy, to tell the codec's cost
    // from what the machine's memory (and its other load) allows right now.
    {
        let src = incompressible(bytes);
        let mut dst = vec![0u8; bytes];
        let mut best = Duration::MAX;
        for _ in 0..PASSES {
            let start = Instant::now();
            for (d, s) in dst
                .chunks_exact_mut(PAGE_SIZE)
                .zip(src.chunks_exact(PAGE_SIZE))
            {
                d.copy_from_slice(s);
            }
            best = best.min(start.elapsed());
            std::hint::black_box(&dst);
        }
        println!("{:<28} {:>7.2} GB/s", "memcpy reference", gbps(bytes, best));
    }
    let workloads: [(&str, Vec<u8>, Compression); 5] = [
        (
            "raw, incompressible",
            incompressible(bytes),
            Compression::None,
        ),
        ("zero pages", vec![0u8; bytes], Compression::None),
        (
            "lz4, incompressible",
            incompressible(bytes),
            Compression::Lz4,
        ),
        ("lz4, mixed (half zero)", mixed(bytes), Compression::Lz4),
        (
            "zstd-1, mixed (half zero)",
            mixed(bytes),
            Compression::Zstd(1),
        ),
    ];
    for (name, memory, compression) in workloads {
        let frames = encode_all(&memory, compression).expect("encode");
        let wire: usize = frames.iter().map(Vec::len).sum();
        let stream = frames.concat();
        let mut dest = vec![0xAAu8; bytes];
        let enc = time_encode(&memory, compression);
        let dec = time_decode(&frames, &mut dest);
        assert!(dest == memory, "{name}: the decoded memory differs");
        let rd = time_reader(&stream, &mut dest);
        assert!(dest == memory, "{name}: the memory read back differs");
        println!(
            "{:<28} {:>7.2} GB/s {:>5.2} GB/s {:>7.2} GB/s {:>11.3}",
            name,
            gbps(bytes, enc),
            gbps(bytes, dec),
            gbps(bytes, rd),
            wire as f64 / bytes as f64
        );
    }
}
