//! Frames: the fixed header, decoding from a byte slice, and a reader over `std::io::Read`.
//!
//! ```text
//! offset size field
//!  0     2    magic   "VG"
//!  2     2    version protocol version of the payload layout (never 0)
//!  4     2    type    MessageType (never 0; unknown types rejected)
//!  6     2    flags   none defined: must be 0
//!  8     4    length  payload bytes, at most the type's limit (checked before reading it)
//! 12     ...  payload
//! ```
//!
//! All integers are little-endian. The header is the same in every version, and so are the
//! handshake payloads (Hello, HelloAck, VersionRefused), so two builds of any versions can
//! always tell each other which versions they speak. Other frames must carry a version this
//! build decodes; that it is the session's version is the state machines' check.

use super::error::ProtocolError;
use super::message::Message;
use super::types::{MessageType, ProtocolVersion};
use std::io::{Read, Write};

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// The frame magic.
pub const MAGIC: [u8; 2] = *b"VG";

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The payload's protocol version.
    pub version: ProtocolVersion,
    /// The message type.
    pub kind: MessageType,
    /// The payload length, within the type's limit.
    pub len: usize,
}

impl FrameHeader {
    /// Checks a header: magic, type, version, flags and length limit, in that order. Nothing
    /// about the payload is read or allocated.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, ProtocolError> {
        let [m0, m1, v0, v1, t0, t1, f0, f1, l0, l1, l2, l3] = *bytes;
        if [m0, m1] != MAGIC {
            return Err(ProtocolError::BadMagic {
                found: u16::from_le_bytes([m0, m1]),
            });
        }
        let kind = match u16::from_le_bytes([t0, t1]) {
            0 => return Err(ProtocolError::ZeroType),
            raw => MessageType::try_from(raw).map_err(ProtocolError::UnknownType)?,
        };
        let version =
            ProtocolVersion::new(u16::from_le_bytes([v0, v1])).ok_or(ProtocolError::ZeroVersion)?;
        if !kind.is_handshake() && !version.is_supported() {
            return Err(ProtocolError::UnsupportedVersion {
                kind,
                version,
                min: ProtocolVersion::MIN_SUPPORTED,
                max: ProtocolVersion::CURRENT,
            });
        }
        let flags = u16::from_le_bytes([f0, f1]);
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags(flags));
        }
        let raw_len = u32::from_le_bytes([l0, l1, l2, l3]);
        let len = usize::try_from(raw_len).unwrap_or(usize::MAX);
        if len > kind.max_payload() {
            return Err(ProtocolError::FrameTooLong {
                kind,
                len: raw_len,
                max: kind.max_payload(),
            });
        }
        Ok(FrameHeader { version, kind, len })
    }
}

/// A decoded frame: its version and message (which may borrow the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header's version.
    pub version: ProtocolVersion,
    /// The message.
    pub message: Message<'a>,
}

/// The result of [`decode_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// One frame, and how many input bytes it took.
    Frame {
        /// The frame.
        frame: Frame<'a>,
        /// Bytes consumed from the input.
        consumed: usize,
    },
    /// The input ends inside a frame; at least this many more bytes are needed. Only reported
    /// once whatever header bytes are present were found valid, so a caller that buffers can
    /// trust the amount (it is within the type's limit).
    NeedMore {
        /// Bytes missing.
        needed: usize,
    },
}

/// Decodes the frame at the start of `buf`. Never panics, never allocates by a length from
/// the input (only an Incompatible report's entries, bounded by count and payload size).
pub fn decode_frame(buf: &[u8]) -> Result<Decoded<'_>, ProtocolError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        // Check the magic early, so garbage is refused before a full header arrives.
        match buf.first_chunk::<2>() {
            Some(&[m0, m1]) if [m0, m1] != MAGIC => {
                return Err(ProtocolError::BadMagic {
                    found: u16::from_le_bytes([m0, m1]),
                });
            }
            _ => {}
        }
        return Ok(Decoded::NeedMore {
            needed: FRAME_HEADER_LEN.saturating_sub(buf.len()),
        });
    };
    let header = FrameHeader::decode(header)?;
    let Some((payload, _)) = rest.split_at_checked(header.len) else {
        return Ok(Decoded::NeedMore {
            needed: header.len.saturating_sub(rest.len()),
        });
    };
    let message = Message::decode(header.kind, header.version, payload)?;
    Ok(Decoded::Frame {
        frame: Frame {
            version: header.version,
            message,
        },
        consumed: FRAME_HEADER_LEN.saturating_add(header.len),
    })
}

pub(crate) fn write_header_placeholder(
    out: &mut Vec<u8>,
    version: ProtocolVersion,
    kind: MessageType,
) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.get().to_le_bytes());
    out.extend_from_slice(&kind.to_wire().to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Sets the length field of the frame that starts at `start` to the bytes after its header.
pub(crate) fn patch_length(
    out: &mut [u8],
    start: usize,
    kind: MessageType,
) -> Result<(), ProtocolError> {
    let payload = out
        .len()
        .checked_sub(start.saturating_add(FRAME_HEADER_LEN))
        .ok_or_else(|| ProtocolError::InternalBug("a frame lost its header".into()))?;
    if payload > kind.max_payload() {
        return Err(ProtocolError::encode(
            kind,
            format!(
                "its payload is {payload} bytes, the limit is {}",
                kind.max_payload()
            ),
        ));
    }
    let len = u32::try_from(payload)
        .map_err(|_| ProtocolError::encode(kind, "its payload does not fit a u32 length"))?;
    let at = start.saturating_add(8);
    out.get_mut(at..at.saturating_add(4))
        .ok_or_else(|| ProtocolError::InternalBug("a frame lost its header".into()))?
        .copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Encodes `message` into `scratch` (cleared first) and writes it to `w`.
pub fn write_frame<W: Write>(
    w: &mut W,
    version: ProtocolVersion,
    message: &Message<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    scratch.clear();
    message.encode(version, scratch)?;
    w.write_all(scratch)?;
    Ok(())
}

/// Payload buffers larger than this (a DeviceState) are given back after use; batches reuse
/// theirs.
const KEEP_BUFFER: usize = MessageType::MemoryBatch.max_payload();

/// Reads frames from a byte stream: the header first, checked, then exactly the payload into
/// a buffer reused from frame to frame (grown only up to the type's limit).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next frame; `None` if the stream ended cleanly between frames. The frame borrows
    /// the reader's buffer until the next call.
    pub fn read_frame(&mut self) -> Result<Option<Frame<'_>>, ProtocolError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            return Ok(None);
        }
        if got < FRAME_HEADER_LEN {
            return Err(ProtocolError::ClosedMidFrame {
                part: "header",
                got,
                expected: FRAME_HEADER_LEN,
            });
        }
        let header = FrameHeader::decode(&header)?;
        if self.buf.len() > KEEP_BUFFER && header.len <= KEEP_BUFFER {
            self.buf.truncate(KEEP_BUFFER);
            self.buf.shrink_to(KEEP_BUFFER);
        }
        if self.buf.len() < header.len {
            // Bounded: header.len is within the type's limit.
            self.buf.resize(header.len, 0);
        }
        let payload = self
            .buf
            .get_mut(..header.len)
            .ok_or_else(|| ProtocolError::InternalBug("the frame buffer is too short".into()))?;
        let got = read_full(&mut self.inner, payload)?;
        if got < header.len {
            return Err(ProtocolError::ClosedMidFrame {
                part: "payload",
                got,
                expected: header.len,
            });
        }
        let payload = self
            .buf
            .get(..header.len)
            .ok_or_else(|| ProtocolError::InternalBug("the frame buffer is too short".into()))?;
        let message = Message::decode(header.kind, header.version, payload)?;
        Ok(Some(Frame {
            version: header.version,
            message,
        }))
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably (e.g. to write replies on a duplex stream).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes currently held for payloads (for memory accounting).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n.min(rest.len())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::tests::{sample_frames, samples};
    use crate::protocol::{Fault, UnitDecoder};

    fn header(version: u16, kind: u16, flags: u16, len: u32) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    }

    #[test]
    fn type_zero_and_unknown_types_are_rejected() {
        let e = decode_frame(&header(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, ProtocolError::ZeroType));
        assert_eq!(e.fault(), Fault::MalformedBytes);
        let e = decode_frame(&header(1, 24, 0, 0)).unwrap_err();
        assert!(matches!(e, ProtocolError::UnknownType(24)), "{e}");
        assert_eq!(
            e.to_string(),
            "The peer sent a frame of unknown message type 24."
        );
        assert!(matches!(
            decode_frame(&header(1, u16::MAX, 0, 0)).unwrap_err(),
            ProtocolError::UnknownType(u16::MAX)
        ));
    }

    #[test]
    fn bad_magic_version_zero_and_flags_are_rejected() {
        let mut h = header(1, MessageType::Ping.to_wire(), 0, 8);
        h[0] = b'X';
        assert!(matches!(
            decode_frame(&h).unwrap_err(),
            ProtocolError::BadMagic { .. }
        ));
        // even before the header is complete
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1").unwrap_err(),
            ProtocolError::BadMagic { .. }
        ));
        assert!(matches!(
            decode_frame(b"XY").unwrap_err(),
            ProtocolError::BadMagic { .. }
        ));
        assert_eq!(
            decode_frame(b"VG").unwrap(),
            Decoded::NeedMore { needed: 10 }
        );
        assert!(matches!(
            decode_frame(&header(0, MessageType::Ping.to_wire(), 0, 8)).unwrap_err(),
            ProtocolError::ZeroVersion
        ));
        assert!(matches!(
            decode_frame(&header(1, MessageType::Ping.to_wire(), 0x8000, 8)).unwrap_err(),
            ProtocolError::UnknownFlags(0x8000)
        ));
    }

    #[test]
    fn a_newer_version_is_an_incompatible_peer_except_in_the_handshake() {
        let mut f = header(2, MessageType::Ping.to_wire(), 0, 8);
        f.extend_from_slice(&[0; 8]);
        let e = decode_frame(&f).unwrap_err();
        assert_eq!(e.fault(), Fault::IncompatiblePeer);
        assert_eq!(
            e.to_string(),
            "The peer sent a Ping frame of protocol version 2; this build decodes versions 1 to 1."
        );
        // a version-2 Hello still decodes, so the destination can refuse it by name
        let hello = Message::Hello(crate::protocol::Hello {
            version: ProtocolVersion::new(2).unwrap(),
            software: "vmgate 0.2.0".into(),
            session: crate::protocol::SessionId([7; 16]),
            purpose: crate::protocol::Purpose::Move,
            channel: 0,
            channels: 1,
        });
        let mut bytes = Vec::new();
        hello
            .encode(ProtocolVersion::new(2).unwrap(), &mut bytes)
            .unwrap();
        let Decoded::Frame { frame, .. } = decode_frame(&bytes).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(frame.message, hello);
        // a Hello whose payload version disagrees with its header is malformed
        bytes[2] = 1;
        assert!(matches!(
            decode_frame(&bytes).unwrap_err(),
            ProtocolError::InvalidField {
                field: "version",
                ..
            }
        ));
    }

    #[test]
    fn a_header_claiming_4_gib_is_refused_at_once() {
        for kind in MessageType::ALL {
            let h = header(1, kind.to_wire(), 0, u32::MAX);
            match decode_frame(&h).unwrap_err() {
                ProtocolError::FrameTooLong { kind: k, len, max } => {
                    assert_eq!(k, *kind);
                    assert_eq!(len, u32::MAX);
                    assert_eq!(max, kind.max_payload());
                }
                other => panic!("{kind}: {other}"),
            }
            // one byte over the limit is refused too, the limit itself is "need more"
            let max = u32::try_from(kind.max_payload()).unwrap();
            assert!(matches!(
                decode_frame(&header(1, kind.to_wire(), 0, max + 1)).unwrap_err(),
                ProtocolError::FrameTooLong { .. }
            ));
            assert_eq!(
                decode_frame(&header(1, kind.to_wire(), 0, max)).unwrap(),
                Decoded::NeedMore {
                    needed: kind.max_payload()
                }
            );
        }
    }

    /// A stream that serves a header claiming 4 GiB and then endless bytes, counting what is
    /// read from it.
    struct Endless {
        header: Vec<u8>,
        served: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(4096);
            for (i, b) in buf.iter_mut().take(n).enumerate() {
                *b = self.header.get(self.served + i).copied().unwrap_or(0xAA);
            }
            self.served += n;
            Ok(n)
        }
    }

    #[test]
    fn the_reader_refuses_a_4_gib_frame_without_reading_or_allocating_it() {
        let mut reader = FrameReader::new(Endless {
            header: header(1, MessageType::MemoryBatch.to_wire(), 0, u32::MAX),
            served: 0,
        });
        let e = reader.read_frame().unwrap_err();
        assert!(
            matches!(e, ProtocolError::FrameTooLong { len: u32::MAX, .. }),
            "{e}"
        );
        assert_eq!(
            reader.get_ref().served,
            FRAME_HEADER_LEN,
            "only the header was read"
        );
        assert_eq!(reader.buffer_capacity(), 0, "nothing was allocated");
    }

    #[test]
    fn the_reader_reads_a_stream_of_frames_and_reports_truncation() {
        let frames = sample_frames();
        let stream: Vec<u8> = frames.concat();
        let mut reader = FrameReader::new(stream.as_slice());
        for expected in &frames {
            let frame = reader.read_frame().unwrap().expect("a frame");
            let mut again = Vec::new();
            frame.message.encode(frame.version, &mut again).unwrap();
            assert_eq!(&again, expected);
        }
        assert!(
            reader.read_frame().unwrap().is_none(),
            "clean end of stream"
        );

        let first = &frames[0];
        for cut in 1..first.len() {
            let mut reader = FrameReader::new(&first[..cut]);
            let e = reader.read_frame().unwrap_err();
            assert!(
                matches!(e, ProtocolError::ClosedMidFrame { .. }),
                "cut {cut}: {e}"
            );
            assert_eq!(e.fault(), Fault::Transport);
        }
    }

    #[test]
    fn the_reader_gives_back_a_large_state_buffer() {
        let big = Message::DeviceState(crate::protocol::DeviceState {
            state: vec![5u8; 10 << 20].into(),
        });
        let mut stream = Vec::new();
        big.encode(ProtocolVersion::CURRENT, &mut stream).unwrap();
        Message::Ping(1)
            .encode(ProtocolVersion::CURRENT, &mut stream)
            .unwrap();
        let mut reader = FrameReader::new(stream.as_slice());
        assert!(reader.read_frame().unwrap().is_some());
        assert!(reader.buffer_capacity() >= 10 << 20);
        assert_eq!(
            reader.read_frame().unwrap().unwrap().message,
            Message::Ping(1)
        );
        assert!(reader.buffer_capacity() <= KEEP_BUFFER);
    }

    #[test]
    fn truncated_frames_need_more_at_every_cut_and_never_decode() {
        for frame in sample_frames() {
            for cut in 0..frame.len() {
                match decode_frame(&frame[..cut]).unwrap() {
                    Decoded::NeedMore { needed } => {
                        let expected = if cut < FRAME_HEADER_LEN {
                            FRAME_HEADER_LEN - cut
                        } else {
                            frame.len() - cut
                        };
                        assert_eq!(needed, expected, "cut {cut}");
                    }
                    Decoded::Frame { .. } => panic!("a cut frame decoded"),
                }
            }
        }
    }

    #[test]
    fn shortened_payloads_with_a_matching_length_are_rejected() {
        // Cut the payload and fix the length field: the message decoder sees a short payload.
        for frame in sample_frames() {
            let kind = MessageType::try_from(u16::from_le_bytes([frame[4], frame[5]])).unwrap();
            let full = frame.len() - FRAME_HEADER_LEN;
            for keep in 0..full {
                let mut f = frame[..FRAME_HEADER_LEN + keep].to_vec();
                f[8..12].copy_from_slice(&u32::try_from(keep).unwrap().to_le_bytes());
                match decode_frame(&f) {
                    Err(e) => {
                        assert_eq!(e.fault(), Fault::MalformedBytes, "{kind} keep {keep}: {e}")
                    }
                    Ok(d) => panic!("{kind} with {keep} of {full} payload bytes decoded: {d:?}"),
                }
            }
            // one extra byte is rejected too
            let mut f = frame.clone();
            f.push(0);
            f[8..12].copy_from_slice(&u32::try_from(full + 1).unwrap().to_le_bytes());
            assert!(decode_frame(&f).is_err(), "{kind} with a trailing byte");
        }
    }

    fn batch_frame(count: u32, data_len: u32, data: &[u8], table: &[(u64, u8, u32)]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(&data_len.to_le_bytes());
        payload.extend_from_slice(data);
        for (i, k, l) in table {
            payload.extend_from_slice(&i.to_le_bytes());
            payload.push(*k);
            payload.extend_from_slice(&l.to_le_bytes());
        }
        let mut f = header(
            1,
            MessageType::MemoryBatch.to_wire(),
            0,
            u32::try_from(payload.len()).unwrap(),
        );
        f.extend_from_slice(&payload);
        f
    }

    #[test]
    fn batch_counts_inconsistent_with_the_length_are_rejected() {
        let page = vec![3u8; 4096];
        let ok = batch_frame(1, 4096, &page, &[(5, 2, 4096)]);
        assert!(decode_frame(&ok).is_ok());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "count larger than the table",
                batch_frame(2, 4096, &page, &[(5, 2, 4096)]),
            ),
            (
                "count smaller than the table",
                batch_frame(1, 0, &[], &[(5, 1, 0), (6, 1, 0)]),
            ),
            ("zero count", batch_frame(0, 0, &[], &[])),
            (
                "count beyond the limit",
                batch_frame(100_000, 0, &[], &[(5, 1, 0)]),
            ),
            ("huge count", batch_frame(u32::MAX, 0, &[], &[(5, 1, 0)])),
            (
                "data length beyond the payload",
                batch_frame(1, 8192, &page, &[(5, 2, 4096)]),
            ),
            (
                "data length beyond the limit",
                batch_frame(1, u32::MAX, &page, &[(5, 2, 4096)]),
            ),
            (
                "entries that do not add up",
                batch_frame(2, 4096, &page, &[(5, 2, 4096), (6, 3, 10)]),
            ),
            (
                "raw of the wrong size",
                batch_frame(1, 4096, &page, &[(5, 2, 4095)]),
            ),
            (
                "zero with data",
                batch_frame(1, 4096, &page, &[(5, 1, 4096)]),
            ),
            (
                "compressed as large as a page",
                batch_frame(1, 4096, &page, &[(5, 3, 4096)]),
            ),
            ("compressed empty", batch_frame(1, 0, &[], &[(5, 4, 0)])),
            ("unknown kind", batch_frame(1, 0, &[], &[(5, 9, 0)])),
            ("kind zero", batch_frame(1, 0, &[], &[(5, 0, 0)])),
            (
                "repeated page",
                batch_frame(2, 0, &[], &[(5, 1, 0), (5, 1, 0)]),
            ),
            (
                "decreasing pages",
                batch_frame(2, 0, &[], &[(6, 1, 0), (5, 1, 0)]),
            ),
            (
                "page beyond the protocol",
                batch_frame(1, 0, &[], &[(u64::MAX, 1, 0)]),
            ),
            (
                "length overflow",
                batch_frame(2, 0, &[], &[(1, 3, u32::MAX), (2, 3, 1)]),
            ),
        ];
        for (what, f) in cases {
            let e = decode_frame(&f).unwrap_err();
            assert_eq!(e.fault(), Fault::MalformedBytes, "{what}: {e}");
        }
    }

    #[test]
    fn an_incompatible_report_count_is_checked_before_allocating() {
        let mut payload = u32::MAX.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        let mut f = header(
            1,
            MessageType::Incompatible.to_wire(),
            0,
            u32::try_from(payload.len()).unwrap(),
        );
        f.extend_from_slice(&payload);
        assert!(matches!(
            decode_frame(&f).unwrap_err(),
            ProtocolError::InvalidField {
                field: "entry count",
                ..
            }
        ));
        // 10 entries claimed in room for 1
        let mut payload = 10u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        let mut f = header(
            1,
            MessageType::Incompatible.to_wire(),
            0,
            u32::try_from(payload.len()).unwrap(),
        );
        f.extend_from_slice(&payload);
        assert!(decode_frame(&f).is_err());
    }

    #[test]
    fn texts_must_be_printable_utf8_within_their_limit() {
        let cancel = |text: &[u8]| {
            let mut payload = u16::try_from(text.len()).unwrap().to_le_bytes().to_vec();
            payload.extend_from_slice(text);
            let mut f = header(
                1,
                MessageType::Cancel.to_wire(),
                0,
                u32::try_from(payload.len()).unwrap(),
            );
            f.extend_from_slice(&payload);
            decode_frame(&f).map(|_| ())
        };
        assert!(cancel("déplacé par alice".as_bytes()).is_ok());
        assert!(cancel(b"\xff\xfe").is_err());
        assert!(cancel(b"ok\x1b[2Jcleared").is_err());
        assert!(cancel(&[b'a'; MAX_TEXT]).is_ok());
        assert!(cancel(&[b'a'; MAX_TEXT + 1]).is_err());
    }
    const MAX_TEXT: usize = crate::protocol::types::MAX_TEXT_LEN;

    #[test]
    fn booleans_and_enumerations_reject_unknown_values() {
        let mut answer = Vec::new();
        Message::DiskLayerAnswer(crate::protocol::DiskLayerAnswer {
            disk: 0,
            layer: 0,
            reuse: true,
        })
        .encode(ProtocolVersion::CURRENT, &mut answer)
        .unwrap();
        *answer.last_mut().unwrap() = 2;
        assert!(decode_frame(&answer).is_err());

        let mut outcome = Vec::new();
        Message::Outcome(crate::protocol::Outcome {
            session: crate::protocol::SessionId([0; 16]),
            outcome: crate::protocol::MoveOutcome::Resumed,
        })
        .encode(ProtocolVersion::CURRENT, &mut outcome)
        .unwrap();
        for bad in [0u8, 4, 255] {
            *outcome.last_mut().unwrap() = bad;
            assert!(decode_frame(&outcome).is_err(), "outcome {bad}");
        }
    }

    /// xorshift64*: a deterministic generator, so CI runs the same inputs every time.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
        }
    }

    /// What the fuzz target checks, for one input: decoding never panics; a frame that decodes
    /// re-encodes to exactly the bytes it was decoded from (the encoding is canonical); its
    /// units decode or fail cleanly.
    fn check_input(input: &[u8]) -> bool {
        match decode_frame(input) {
            Ok(Decoded::Frame { frame, consumed }) => {
                let mut again = Vec::new();
                frame.message.encode(frame.version, &mut again).unwrap();
                assert_eq!(again.as_slice(), &input[..consumed]);
                let mut dec = UnitDecoder::new();
                let units = match &frame.message {
                    Message::MemoryBatch(b) => Some(*b.pages()),
                    Message::DiskBlocks(b) => Some(*b.blocks()),
                    _ => None,
                };
                if let Some(units) = units {
                    for unit in units.iter() {
                        let mut out = vec![0u8; unit.unit_size()];
                        let _ = dec.decode(&unit, &mut out);
                    }
                }
                true
            }
            Ok(Decoded::NeedMore { .. }) | Err(_) => false,
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut decoded = 0;
        for i in 0..100_000 {
            // Half the inputs are pure noise. The other half get a valid magic, version 1, a
            // type from 0 to 24 and a consistent length, with payload sizes that the fixed
            // layouts use, so the payload decoders are reached rather than stopping at the
            // magic.
            let framed = i % 2 == 0;
            let len = if framed {
                let sizes = [0, 4, 8, 9, 17, 24, 28, rng.below(80)];
                FRAME_HEADER_LEN + sizes[rng.below(sizes.len())]
            } else {
                rng.below(64)
            };
            let mut input: Vec<u8> = (0..len).map(|_| rng.next().to_le_bytes()[0]).collect();
            if framed {
                input[..2].copy_from_slice(&MAGIC);
                input[2..4].copy_from_slice(&1u16.to_le_bytes());
                let t = u16::try_from(rng.below(25)).unwrap();
                input[4..6].copy_from_slice(&t.to_le_bytes());
                input[6..8].copy_from_slice(&[0, 0]);
                let len = u32::try_from(input.len() - FRAME_HEADER_LEN).unwrap();
                input[8..12].copy_from_slice(&len.to_le_bytes());
            }
            if check_input(&input) {
                decoded += 1;
            }
        }
        eprintln!("{decoded} of 100000 random inputs decoded to a frame");
        // Random payloads of the fixed layouts (Ping, Complete, RoundEnd, ...) must decode;
        // if few did, the inputs never reached the payload decoders and this test tests little.
        assert!(decoded > 1_000, "only {decoded} random frames decoded");
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let frames = sample_frames();
        let mut still_valid = 0;
        let mut rejected = 0;
        for round in 0..40_000 {
            let mut f = frames[round % frames.len()].clone();
            let mutations = 1 + rng.below(4);
            for _ in 0..mutations {
                match rng.below(5) {
                    0 | 1 => {
                        let at = rng.below(f.len());
                        f[at] ^= 1 << rng.below(8);
                    }
                    2 => {
                        let at = rng.below(f.len());
                        f[at] = rng.next().to_le_bytes()[0];
                    }
                    3 => {
                        let at = rng.below(f.len() + 1);
                        f.truncate(at);
                    }
                    _ => {
                        let at = rng.below(f.len() + 1);
                        f.insert(at, rng.next().to_le_bytes()[0]);
                    }
                }
                if f.is_empty() {
                    break;
                }
            }
            // Keep the length field consistent half the time, so the payload decoders see
            // mutated payloads rather than "need more".
            if round % 2 == 0 && f.len() >= FRAME_HEADER_LEN {
                let len = u32::try_from(f.len() - FRAME_HEADER_LEN).unwrap();
                f[8..12].copy_from_slice(&len.to_le_bytes());
            }
            if check_input(&f) {
                still_valid += 1;
            } else {
                rejected += 1;
            }
        }
        eprintln!("mutated frames: {still_valid} still decode, {rejected} rejected");
        assert!(
            still_valid > 100 && rejected > 10_000,
            "{still_valid} valid, {rejected} rejected"
        );
    }

    #[test]
    fn every_sample_is_accepted_by_the_fuzz_check() {
        for frame in sample_frames() {
            assert!(check_input(&frame));
        }
        assert_eq!(samples().len() + 2, sample_frames().len());
    }
}
