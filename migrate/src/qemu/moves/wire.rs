//! The messages of a QEMU move between two hosts, and how they travel on a link.
//!
//! # Frames
//!
//! ```text
//! offset size field
//!  0     2    magic    "VQ" (the micro-VM engine's frames start "VG": a link says which
//!                      engine it is for with its first two bytes, see [`super::link_kind`])
//!  2     2    version  protocol version of the payload (never 0), little-endian
//!  4     4    length   payload bytes, little-endian, 1 ..= MAX_MESSAGE (checked before
//!                      anything is allocated)
//!  8     ...  payload  one [`Message`], JSON (its schema is these types: unknown message
//!                      kinds and unknown fields are errors)
//! ```
//!
//! After a stream link was accepted (`StreamAccepted`), it carries raw bytes in chunks:
//! `u32` length (little-endian, at most [`MAX_CHUNK`]) then the bytes; a length of 0 ends the
//! direction (a half close, which the links themselves cannot express). A parent-copy
//! stream carries the file from its first byte to its last, then the end marker; the
//! destination answers `StreamDone` once it checked length and SHA-256.
//!
//! Decoding never panics; every length is bounded before it is used.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::disk::DiskFormat;
use crate::qemu::definition::QemuVmDefinition;
use crate::qemu::host::QemuVersion;

/// The frame magic.
pub const MAGIC: [u8; 2] = *b"VQ";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The oldest version this build accepts from a source.
pub const MIN_VERSION: u16 = 1;
/// The largest message payload (an offer with 16 disks of 16 layers is far smaller).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The largest data chunk on a stream (a parent copy sends 1 MiB plus its offset).
pub const MAX_CHUNK: usize = 2 << 20;
/// Frame header length.
pub const HEADER_LEN: usize = 8;

/// Errors of the wire format: the peer's bytes, or the link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The link failed.
    #[error("the link failed")]
    Io(#[from] io::Error),
    /// The link ended.
    #[error("the peer closed the link")]
    Closed,
    /// Not a frame of this protocol.
    #[error("the peer sent bytes that are not a frame of vmgate's QEMU move protocol")]
    BadMagic,
    /// Version 0.
    #[error("the peer sent a frame of protocol version 0")]
    ZeroVersion,
    /// A length out of bounds.
    #[error("the peer sent a frame of {len} bytes (the limit is {max})")]
    Length {
        /// Announced.
        len: u64,
        /// Limit.
        max: usize,
    },
    /// The payload is not a message.
    #[error("the peer sent a message that does not decode")]
    Decode(#[source] serde_json::Error),
    /// Encoding our own message failed.
    #[error("a message could not be encoded")]
    Encode(#[source] serde_json::Error),
}

/// A move's id: 32 random bytes from the kernel, chosen by the destination. The streams of a
/// move name it to join; nobody can guess it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MoveId(pub [u8; 32]);

impl MoveId {
    /// A new random id.
    pub fn random() -> io::Result<MoveId> {
        let mut id = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
        Ok(MoveId(id))
    }

    /// The first bytes, for logs (the whole id is never logged).
    pub fn short(&self) -> String {
        hex(self.0.get(..4).unwrap_or_default())
    }
}

impl fmt::Debug for MoveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MoveId({}…)", self.short())
    }
}

impl fmt::Display for MoveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.short())
    }
}

impl Serialize for MoveId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for MoveId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MoveId, D::Error> {
        let text = String::deserialize(d)?;
        unhex::<32>(&text)
            .map(MoveId)
            .ok_or_else(|| serde::de::Error::custom("a move id is 64 hex digits"))
    }
}

/// A SHA-256 on the wire (64 hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Checksum(pub [u8; 32]);

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checksum, D::Error> {
        let text = String::deserialize(d)?;
        unhex::<32>(&text)
            .map(Checksum)
            .ok_or_else(|| serde::de::Error::custom("a checksum is 64 hex digits"))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// What a link is for: its first message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u16,
    /// The sender's software ("vmgate 0.1.0").
    pub software: String,
    /// What the link is for.
    pub purpose: Purpose,
}

/// What a link is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Purpose {
    /// The setup (control) link of a new move.
    Move,
    /// One stream of a move the destination knows.
    Stream {
        /// The move.
        move_id: MoveId,
        /// Which stream.
        stream: StreamKind,
    },
    /// A source that lost its control link after `Complete` asks how the move ended.
    Query {
        /// The move.
        move_id: MoveId,
    },
}

/// The streams of a move, each on its own link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum StreamKind {
    /// A connection QEMU made for its migration: 0 is the first (QEMU tells the main stream
    /// and its multifd channels apart inside the stream), up to the multifd channel count.
    Migration {
        /// Connection number.
        index: u8,
    },
    /// The NBD connection of a disk's block mirror.
    Nbd {
        /// Disk index.
        disk: u8,
    },
    /// A read-only parent of a disk's backing chain, copied byte for byte.
    Parent {
        /// Disk index.
        disk: u8,
        /// Layer (0 = base).
        layer: u8,
    },
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKind::Migration { index } => write!(f, "migration connection {index}"),
            StreamKind::Nbd { disk } => write!(f, "disk {disk}'s block mirror"),
            StreamKind::Parent { disk, layer } => write!(f, "disk {disk} layer {layer}"),
        }
    }
}

/// The destination's answer to a new move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Welcome {
    /// The version the move speaks.
    pub version: u16,
    /// The destination's software.
    pub software: String,
    /// The move's id.
    pub move_id: MoveId,
}

/// The destination is older than the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VersionRefused {
    /// The destination's software.
    pub software: String,
    /// Its oldest version.
    pub min: u16,
    /// Its newest version.
    pub max: u16,
}

/// How the VM's memory moves: QEMU's migration settings that must be equal on both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamSettings {
    /// multifd channels (0: no multifd, one migration connection).
    pub multifd_channels: u8,
    /// multifd's compression.
    pub compression: WireCompression,
}

/// Compression of the migration stream (multifd's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WireCompression {
    /// None.
    None,
    /// zstd (multifd-compression zstd).
    Zstd,
}

/// Where the VM's disks are during the move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum OfferStorage {
    /// On storage both hosts see: the definition's disk paths are the very files, and only
    /// the memory moves.
    Shared,
    /// Copied (shared-nothing): per disk its chain, base first; the definition's disk paths
    /// are where each active layer goes at the destination.
    Copy {
        /// Per disk.
        disks: Vec<DiskOffer>,
    },
}

/// A disk's chain, base first (the last layer is the active one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskOffer {
    /// The layers, base first.
    pub layers: Vec<LayerOffer>,
}

/// One layer of a disk's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LayerOffer {
    /// The file's name (no folder).
    pub name: String,
    /// Its format.
    pub format: DiskFormat,
    /// The disk size it presents.
    pub virtual_size: u64,
    /// The file's length (parents; 0 for the active layer).
    pub file_size: u64,
    /// Bytes it occupies (what the destination needs for it).
    pub allocated_bytes: u64,
    /// SHA-256 of the file (read-only parents only).
    pub checksum: Option<Checksum>,
    /// Its backing reference as written in its header (none for the base).
    pub backing: Option<PathBuf>,
}

/// The VM, as the source offers it: its definition as data (never QEMU options), and what
/// the destination must match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Offer {
    /// The definition, with the versioned machine type of the running QEMU and, for a copy,
    /// the destination's disk paths.
    pub definition: QemuVmDefinition,
    /// The source's running QEMU.
    pub qemu_version: QemuVersion,
    /// The CPU model's features the source's QEMU cannot provide either (its guest runs
    /// without them), so the destination does not hold them against the VM.
    pub cpu_unavailable: Vec<String>,
    /// Where the disks are.
    pub storage: OfferStorage,
    /// The migration stream.
    pub streams: StreamSettings,
}

/// One line of an incompatibility report (Hyper-V's Compare-VM): a stable id, and a
/// sentence that names what is wrong (a definition field, a disk, a version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Problem {
    /// The id (see [`super::incompatibility`]).
    pub id: u32,
    /// What is wrong.
    pub message: String,
}

/// The destination takes the VM: which parents it copies and which it already has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Accepted {
    /// Per disk, per parent layer (base first): true when the destination has an identical
    /// copy already (found by checksum) and nothing is sent.
    pub reuse: Vec<Vec<bool>>,
}

/// How a move ended at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The VM runs at the destination.
    Resumed,
    /// The destination discarded what it had and will never run it.
    Discarded,
    /// The destination does not know the move.
    Unknown,
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Message {
    /// The first message of every link (source → destination).
    Hello(Hello),
    /// A new move was accepted (destination).
    Welcome(Welcome),
    /// The destination is older than the source.
    VersionRefused(VersionRefused),
    /// The VM (source).
    Offer(Box<Offer>),
    /// The destination takes it (destination).
    Accepted(Accepted),
    /// The destination cannot take it: every reason (destination).
    Incompatible {
        /// The report.
        report: Vec<Problem>,
    },
    /// The source goes on: the destination creates the disks and starts its QEMU (source;
    /// a compare sends `Cancel` instead).
    Prepare,
    /// The destination's QEMU waits for the streams (destination).
    Prepared,
    /// A stream was joined to its move (destination).
    StreamAccepted,
    /// A parent copy arrived complete and checked (destination, on its stream).
    StreamDone,
    /// A link was refused (destination).
    Refused {
        /// Why.
        reason: String,
    },
    /// Liveness (source).
    Ping(u64),
    /// Liveness (destination).
    Pong(u64),
    /// The source's QEMU sent everything and stopped the guest; the destination decides now
    /// (source).
    Complete,
    /// The guest runs at the destination (destination): its QEMU's RESUME, microseconds
    /// since the epoch, as QEMU stamped it.
    Resumed {
        /// When.
        resumed_at_us: u64,
    },
    /// The source let the VM go (source).
    Released,
    /// The source gives up; the destination discards everything (source).
    Cancel {
        /// Why.
        reason: String,
    },
    /// The destination failed and discarded everything (destination).
    Failed {
        /// Why.
        reason: String,
    },
    /// The answer to a query (destination).
    Outcome {
        /// How the move ended.
        outcome: Outcome,
    },
}

impl Message {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::VersionRefused(_) => "VersionRefused",
            Message::Offer(_) => "Offer",
            Message::Accepted(_) => "Accepted",
            Message::Incompatible { .. } => "Incompatible",
            Message::Prepare => "Prepare",
            Message::Prepared => "Prepared",
            Message::StreamAccepted => "StreamAccepted",
            Message::StreamDone => "StreamDone",
            Message::Refused { .. } => "Refused",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::Complete => "Complete",
            Message::Resumed { .. } => "Resumed",
            Message::Released => "Released",
            Message::Cancel { .. } => "Cancel",
            Message::Failed { .. } => "Failed",
            Message::Outcome { .. } => "Outcome",
        }
    }
}

/// Encodes a message as one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    let payload = serde_json::to_vec(message).map_err(WireError::Encode)?;
    if payload.len() > MAX_MESSAGE {
        return Err(WireError::Length {
            len: payload.len() as u64,
            max: MAX_MESSAGE,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| WireError::Length {
        len: payload.len() as u64,
        max: MAX_MESSAGE,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks a frame header; returns the version and the payload length.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<(u16, usize), WireError> {
    let [m0, m1, v0, v1, l0, l1, l2, l3] = *header;
    if [m0, m1] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_le_bytes([v0, v1]);
    if version == 0 {
        return Err(WireError::ZeroVersion);
    }
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    match usize::try_from(len) {
        Ok(n) if (1..=MAX_MESSAGE).contains(&n) => Ok((version, n)),
        _ => Err(WireError::Length {
            len: u64::from(len),
            max: MAX_MESSAGE,
        }),
    }
}

/// Decodes one frame from a byte slice (the whole frame, nothing after it).
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    let (header, payload) = frame
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(WireError::Closed)?;
    let (_, len) = decode_header(header)?;
    if payload.len() != len {
        return Err(WireError::Length {
            len: payload.len() as u64,
            max: len,
        });
    }
    serde_json::from_slice(payload).map_err(WireError::Decode)
}

/// Reads one message; `Err(Closed)` at a clean end of the link before a frame.
pub fn read_message(r: &mut dyn Read) -> Result<Message, WireError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact_or_closed(r, &mut header)?;
    let (_, len) = decode_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    serde_json::from_slice(&payload).map_err(WireError::Decode)
}

/// Writes one message and flushes.
pub fn write_message(w: &mut dyn Write, message: &Message) -> Result<(), WireError> {
    let frame = encode(message)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// `read_exact`, with an end of the link before the first byte reported as `Closed`.
fn read_exact_or_closed(r: &mut dyn Read, buf: &mut [u8]) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or_default();
        match r.read(rest) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Reads a stream chunk's length: `None` at the end marker. A length over [`MAX_CHUNK`] is
/// an error.
pub fn read_chunk_len(r: &mut dyn Read) -> Result<Option<usize>, WireError> {
    let mut prefix = [0u8; 4];
    read_exact_or_closed(r, &mut prefix)?;
    let len = u32::from_le_bytes(prefix);
    match usize::try_from(len) {
        Ok(0) => Ok(None),
        Ok(n) if n <= MAX_CHUNK => Ok(Some(n)),
        _ => Err(WireError::Length {
            len: u64::from(len),
            max: MAX_CHUNK,
        }),
    }
}

/// The end marker of a stream direction.
pub const END_OF_STREAM: [u8; 4] = [0; 4];

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        let definition = QemuVmDefinition::from_toml(
            r#"
name = "linux"
backend = "qemu"
memory_mib = 256
vcpus = 1
cpu_model = "qemu64"
accel = "tcg"
machine = "pc-q35-10.0"
[boot]
kernel = "linux/vmlinuz"
[[disk]]
path = "/srv/vms/linux/top.qcow2"
format = "qcow2"
"#,
        )
        .unwrap();
        Offer {
            definition,
            qemu_version: QemuVersion {
                major: 10,
                minor: 0,
                micro: 2,
                package: String::new(),
            },
            cpu_unavailable: vec![],
            storage: OfferStorage::Copy {
                disks: vec![DiskOffer {
                    layers: vec![
                        LayerOffer {
                            name: "base.qcow2".into(),
                            format: DiskFormat::Qcow2,
                            virtual_size: 1 << 26,
                            file_size: 1 << 20,
                            allocated_bytes: 1 << 20,
                            checksum: Some(Checksum([7; 32])),
                            backing: None,
                        },
                        LayerOffer {
                            name: "top.qcow2".into(),
                            format: DiskFormat::Qcow2,
                            virtual_size: 1 << 26,
                            file_size: 0,
                            allocated_bytes: 4096,
                            checksum: None,
                            backing: Some("base.qcow2".into()),
                        },
                    ],
                }],
            },
            streams: StreamSettings {
                multifd_channels: 2,
                compression: WireCompression::Zstd,
            },
        }
    }

    #[test]
    fn messages_round_trip() {
        let id = MoveId([0xab; 32]);
        for m in [
            Message::Hello(Hello {
                version: VERSION,
                software: "vmgate 0.1.0".into(),
                purpose: Purpose::Stream {
                    move_id: id,
                    stream: StreamKind::Parent { disk: 1, layer: 0 },
                },
            }),
            Message::Offer(Box::new(offer())),
            Message::Welcome(Welcome {
                version: 1,
                software: "x".into(),
                move_id: id,
            }),
            Message::Incompatible {
                report: vec![Problem {
                    id: 1009,
                    message: "disk[0].path: outside".into(),
                }],
            },
            Message::Resumed { resumed_at_us: 5 },
            Message::Outcome {
                outcome: Outcome::Discarded,
            },
            Message::Ping(3),
        ] {
            let frame = encode(&m).unwrap();
            assert_eq!(decode(&frame).unwrap(), m);
            let mut r: &[u8] = &frame;
            assert_eq!(read_message(&mut r).unwrap(), m);
        }
    }

    #[test]
    fn bad_frames_are_refused_before_anything_is_allocated() {
        let good = encode(&Message::Prepared).unwrap();
        let mut bad = good.clone();
        bad[0] = b'V';
        bad[1] = b'G';
        assert!(matches!(decode(&bad), Err(WireError::BadMagic)));
        let mut zero = good.clone();
        zero[2] = 0;
        zero[3] = 0;
        assert!(matches!(decode(&zero), Err(WireError::ZeroVersion)));
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r: &[u8] = &huge;
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::Length { .. })
        ));
        let mut empty = good.clone();
        empty[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode(&empty), Err(WireError::Length { .. })));
        // Unknown kinds and unknown fields.
        for payload in [
            &br#""Reboot""#[..],
            br#"{"ping":1,"extra":2}"#,
            br#"{"hello":{"version":1,"software":"x","purpose":"move","options":"-vnc :0"}}"#,
            br#"{"hello":{"version":1,"software":"x","purpose":{"stream":{"move-id":"00","stream":{"nbd":{"disk":0}}}}}}"#,
        ] {
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC);
            f.extend_from_slice(&1u16.to_le_bytes());
            f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
            f.extend_from_slice(payload);
            assert!(
                matches!(decode(&f), Err(WireError::Decode(_))),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        let mut r: &[u8] = &[];
        assert!(matches!(read_message(&mut r), Err(WireError::Closed)));
        let mut r: &[u8] = &good[..5];
        assert!(matches!(read_message(&mut r), Err(WireError::Io(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic generator (xorshift): many shapes of garbage, and mutations
        // of a valid frame.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = encode(&Message::Offer(Box::new(offer()))).unwrap();
        for i in 0..4000 {
            let mut buf = if i % 2 == 0 {
                valid.clone()
            } else {
                let len = usize::try_from(next() % 300).unwrap();
                (0..len)
                    .map(|_| u8::try_from(next() & 0xff).unwrap())
                    .collect()
            };
            if i % 2 == 0 {
                for _ in 0..(next() % 8) {
                    let at = usize::try_from(next()).unwrap() % buf.len();
                    buf[at] = u8::try_from(next() & 0xff).unwrap();
                }
                if next() % 4 == 0 {
                    buf.truncate(usize::try_from(next()).unwrap() % buf.len());
                }
            } else if buf.len() >= 2 {
                buf[0] = b'V';
                buf[1] = b'Q';
            }
            let _ = decode(&buf);
            let mut r: &[u8] = &buf;
            let _ = read_message(&mut r);
            let mut r: &[u8] = &buf;
            let _ = read_chunk_len(&mut r);
        }
    }

    #[test]
    fn chunk_lengths_are_bounded() {
        let mut r: &[u8] = &END_OF_STREAM;
        assert_eq!(read_chunk_len(&mut r).unwrap(), None);
        let big = u32::try_from(MAX_CHUNK + 1).unwrap().to_le_bytes();
        let mut r: &[u8] = &big;
        assert!(read_chunk_len(&mut r).is_err());
        let ok = 5u32.to_le_bytes();
        let mut r: &[u8] = &ok;
        assert_eq!(read_chunk_len(&mut r).unwrap(), Some(5));
    }
}
