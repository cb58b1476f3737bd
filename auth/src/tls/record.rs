//! The TLS 1.3 record layer for bulk data, one independent half per direction.
//!
//! After the handshake phase the traffic keys are taken out of rustls
//! ([`rustls::ServerConnection::dangerous_extract_secrets`], the kTLS hand-over) and each
//! direction gets its own half: [`RecordWriter`] seals, [`RecordReader`] opens, each with its
//! own clone of the socket and no shared state, so a migration can send and receive on two
//! threads at full speed. The bytes on the wire stay TLS 1.3 application-data records
//! (RFC 8446 §5.2): header `17 03 03 len`, AES-GCM over `plaintext || 0x17`, nonce = IV XOR
//! sequence number, the header as additional data.
//!
//! Bulk writes are sealed in place into one buffer of up to [`BATCH_RECORDS`] full records and
//! written with one system call; reads fill a large buffer and open records in place, so each
//! byte is copied once on either side besides the kernel's copy.
//!
//! Limits: records are at most 2^14 bytes of plaintext (the peer's larger records are refused);
//! after 2^24 records in one direction (256 GiB) the channel refuses to go on (RFC 8446 §5.5
//! allows ~2^24.5 full records per AES-GCM key; a migration opens a new channel). Handshake
//! messages (key updates, tickets) are not expected after the hand-over and are refused.
//! A close without `close_notify` is reported as a truncation, not as the end of the stream.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

use super::TlsError;

/// Largest plaintext in one record (RFC 8446).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext length in a record header (RFC 8446: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Records sealed per write system call (~256 KiB).
pub const BATCH_RECORDS: usize = 16;
/// Records one key may protect in this implementation.
pub const MAX_RECORDS: u64 = 1 << 24;
const READ_BUFFER: usize = 256 * 1024 + MAX_CIPHERTEXT + HEADER;

const CT_ALERT: u8 = 0x15;
const CT_HANDSHAKE: u8 = 0x16;
const CT_APPLICATION_DATA: u8 = 0x17;

struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Keys, TlsError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            _ => return Err(TlsError::Suite),
        };
        let unbound = UnboundKey::new(alg, key.as_ref()).map_err(|_| TlsError::Suite)?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| TlsError::Suite)?;
        Ok(Keys {
            key: LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    /// The nonce for the next record, and the sequence number moves on.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "the channel has used its key for 2^24 records; open a new channel",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n.iter_mut().skip(4).zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

fn header(len: usize) -> io::Result<[u8; HEADER]> {
    let len = u16::try_from(len).map_err(|_| io::Error::other("record too long (our bug)"))?;
    let [hi, lo] = len.to_be_bytes();
    Ok([CT_APPLICATION_DATA, 0x03, 0x03, hi, lo])
}

/// Splits an extracted session into its two halves.
pub(super) fn split(
    sock: TcpStream,
    secrets: ExtractedSecrets,
) -> Result<(RecordReader, RecordWriter), TlsError> {
    let tx = Keys::new(secrets.tx)?;
    let rx = Keys::new(secrets.rx)?;
    let sock2 = sock.try_clone().map_err(TlsError::Io)?;
    Ok((
        RecordReader {
            sock: sock2,
            keys: rx,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            plain_start: 0,
            plain_end: 0,
            state: ReadState::Open,
        },
        RecordWriter {
            sock,
            keys: tx,
            buf: Vec::with_capacity(BATCH_RECORDS * (MAX_PLAINTEXT + HEADER + 1 + TAG)),
            state: WriteState::Open,
        },
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Open,
    Closed,
    /// A write failed half-way: the peer's view of the stream is unknown.
    Broken,
}

/// The sending half: seals and writes TLS 1.3 records.
pub struct RecordWriter {
    sock: TcpStream,
    keys: Keys,
    buf: Vec<u8>,
    state: WriteState,
}

impl fmt::Debug for RecordWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordWriter")
            .field("seq", &self.keys.seq)
            .field("state", &self.state)
            .finish()
    }
}

impl RecordWriter {
    fn seal_into_buf(&mut self, content: &[u8], content_type: u8) -> io::Result<()> {
        let len = content.len() + 1 + TAG;
        let hdr = header(len)?;
        let nonce = self.keys.next_nonce()?;
        let start = self.buf.len();
        self.buf.extend_from_slice(&hdr);
        self.buf.extend_from_slice(content);
        self.buf.push(content_type);
        let body = self
            .buf
            .get_mut(start + HEADER..)
            .ok_or_else(|| io::Error::other("record buffer (our bug)"))?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), body)
            .map_err(|_| io::Error::other("AES-GCM sealing failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    fn check_open(&self) -> io::Result<()> {
        match self.state {
            WriteState::Open => Ok(()),
            WriteState::Closed => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the channel was closed for sending",
            )),
            WriteState::Broken => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on the channel failed",
            )),
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        let r = self.sock.write_all(&self.buf);
        self.buf.clear();
        if r.is_err() {
            self.state = WriteState::Broken;
        }
        r
    }

    /// Sends `close_notify` and shuts the socket down for writing; the peer reads end of stream.
    pub fn close(&mut self) -> io::Result<()> {
        self.check_open()?;
        self.buf.clear();
        // Alert level warning (1), description close_notify (0).
        self.seal_into_buf(&[1, 0], CT_ALERT)?;
        self.send_buf()?;
        self.state = WriteState::Closed;
        self.sock.shutdown(Shutdown::Write)
    }

    /// Sets the socket's write timeout (shared with the reading half's socket clone).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// Records sent so far with this key (for tests and statistics).
    pub fn records_sent(&self) -> u64 {
        self.keys.seq
    }
}

impl Write for RecordWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check_open()?;
        if data.is_empty() {
            return Ok(0);
        }
        self.buf.clear();
        let mut consumed = 0;
        for chunk in data.chunks(MAX_PLAINTEXT).take(BATCH_RECORDS) {
            self.seal_into_buf(chunk, CT_APPLICATION_DATA)?;
            consumed += chunk.len();
        }
        self.send_buf()?;
        Ok(consumed)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write goes to the socket before it returns.
        Ok(())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if self.state == WriteState::Open {
            // Best effort, bounded: a peer that does not read must not hang the drop.
            let _ = self.sock.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = self.close();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The peer sent close_notify.
    Eof,
    /// A record failed to open or the stream was truncated: nothing more is trusted.
    Broken,
}

/// The receiving half: reads and opens TLS 1.3 records.
pub struct RecordReader {
    sock: TcpStream,
    keys: Keys,
    buf: Box<[u8]>,
    /// Undecrypted bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Decrypted bytes not yet handed out are `buf[plain_start..plain_end]`.
    plain_start: usize,
    plain_end: usize,
    state: ReadState,
}

impl fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordReader")
            .field("seq", &self.keys.seq)
            .field("state", &self.state)
            .finish()
    }
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl RecordReader {
    /// Sets the socket's read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// A clone of the socket, for shutting the connection down from another thread.
    pub(crate) fn try_clone_socket(&self) -> io::Result<TcpStream> {
        self.sock.try_clone()
    }

    /// Makes sure `need` undecrypted bytes are buffered from `start`.
    fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.end - self.start < need {
            if self.start + need > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let dst = self
                .buf
                .get_mut(self.end..)
                .ok_or_else(|| io::Error::other("read buffer (our bug)"))?;
            let n = match self.sock.read(dst) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.state = ReadState::Broken;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if self.end == self.start {
                        "the peer closed the connection without close_notify (truncated stream)"
                    } else {
                        "the peer closed the connection in the middle of a record"
                    },
                ));
            }
            self.end += n;
        }
        Ok(())
    }

    /// Reads and opens the next record.
    fn next_record(&mut self) -> io::Result<()> {
        self.fill(HEADER)?;
        let hdr: [u8; HEADER] = self
            .buf
            .get(self.start..self.start + HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| io::Error::other("read buffer (our bug)"))?;
        if hdr[0] != CT_APPLICATION_DATA || hdr[1] != 0x03 || hdr[2] != 0x03 {
            return Err(bad("the peer sent something that is not a TLS 1.3 record"));
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(bad("the peer sent a TLS record of an impossible length"));
        }
        self.fill(HEADER + len)?;
        let nonce = self.keys.next_nonce()?;
        let body_start = self.start + HEADER;
        let body = self
            .buf
            .get_mut(body_start..body_start + len)
            .ok_or_else(|| io::Error::other("read buffer (our bug)"))?;
        let plain_len = match self.keys.key.open_in_place(nonce, Aad::from(hdr), body) {
            Ok(p) => p.len(),
            Err(_) => return Err(bad("a TLS record failed its integrity check")),
        };
        self.start += HEADER + len;
        // Inner plaintext: content, content type, zero padding.
        let inner = self
            .buf
            .get(body_start..body_start + plain_len)
            .ok_or_else(|| io::Error::other("read buffer (our bug)"))?;
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(bad("the peer sent a TLS record without a content type"));
        };
        let content_type = inner.get(type_at).copied().unwrap_or(0);
        match content_type {
            CT_APPLICATION_DATA => {
                if type_at > MAX_PLAINTEXT {
                    return Err(bad("the peer sent an oversized TLS record"));
                }
                self.plain_start = body_start;
                self.plain_end = body_start + type_at;
                Ok(())
            }
            CT_ALERT => {
                let alert = inner.get(..type_at).unwrap_or(&[]);
                if alert.get(1) == Some(&0) {
                    self.state = ReadState::Eof;
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "the peer sent TLS alert {}",
                            alert.get(1).copied().unwrap_or(255)
                        ),
                    ))
                }
            }
            CT_HANDSHAKE => Err(bad(
                "the peer sent a TLS handshake message after the handshake (not supported here)",
            )),
            _ => Err(bad("the peer sent a TLS record of an unknown content type")),
        }
    }
}

impl Read for RecordReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.plain_start < self.plain_end {
                let n = out.len().min(self.plain_end - self.plain_start);
                let (Some(dst), Some(src)) = (
                    out.get_mut(..n),
                    self.buf.get(self.plain_start..self.plain_start + n),
                ) else {
                    return Err(io::Error::other("read buffer (our bug)"));
                };
                dst.copy_from_slice(src);
                self.plain_start += n;
                return Ok(n);
            }
            match self.state {
                ReadState::Eof => return Ok(0),
                ReadState::Broken => {
                    return Err(bad("the channel failed earlier and cannot be read"));
                }
                ReadState::Open => {}
            }
            if let Err(e) = self.next_record() {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) {
                    self.state = ReadState::Broken;
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TlsContext, TlsSession};
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn halves() -> ((RecordReader, RecordWriter), (RecordReader, RecordWriter)) {
        let ctx = TlsContext::ephemeral().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sctx = ctx.clone();
        let t = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsSession::accept(&sctx, s, None)
                .unwrap()
                .into_record_layer()
                .unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        let client = TlsSession::connect(&ctx, c, "vmgate", None)
            .unwrap()
            .into_record_layer()
            .unwrap();
        (client, t.join().unwrap())
    }

    #[test]
    fn both_directions_at_once_with_odd_sizes() {
        let ((mut cr, mut cw), (mut sr, mut sw)) = halves();
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 253) as u8).collect();
        let d1 = data.clone();
        let d2 = data.clone();
        let a = thread::spawn(move || {
            for chunk in d1.chunks(77_777) {
                cw.write_all(chunk).unwrap();
            }
            cw.close().unwrap();
        });
        let b = thread::spawn(move || {
            sw.write_all(&d2).unwrap();
            drop(sw); // close_notify on drop
        });
        let mut got_s = Vec::new();
        sr.read_to_end(&mut got_s).unwrap();
        let mut got_c = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = cr.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            got_c.extend_from_slice(&small[..n]);
        }
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(got_s, data);
        assert_eq!(got_c, data);
    }

    #[test]
    fn the_wire_carries_no_plaintext_and_tampering_is_detected() {
        let ctx = TlsContext::ephemeral().unwrap();
        // A relay between client and server that records and flips one byte of the bulk data.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = l.local_addr().unwrap();
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let sctx = ctx.clone();
        let server = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let (mut r, _w) = TlsSession::accept(&sctx, s, None)
                .unwrap()
                .into_record_layer()
                .unwrap();
            let mut v = Vec::new();
            r.read_to_end(&mut v)
        });
        let relay_t = thread::spawn(move || {
            let (mut a, _) = relay.accept().unwrap();
            let mut b = TcpStream::connect(server_addr).unwrap();
            let mut b2 = b.try_clone().unwrap();
            let mut a2 = a.try_clone().unwrap();
            let back = thread::spawn(move || io::copy(&mut b2, &mut a2));
            let mut seen = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                let n = match a.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let before = seen.len();
                seen.extend_from_slice(&buf[..n]);
                let chunk = &mut buf[..n];
                // Flip the byte at stream offset 20000 (inside the bulk data).
                if before <= 20_000 && 20_000 < before + n {
                    chunk[20_000 - before] ^= 1;
                }
                if b.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = b.shutdown(Shutdown::Write);
            let _ = back.join();
            seen
        });
        let c = TcpStream::connect(relay_addr).unwrap();
        let (_r, mut w) = TlsSession::connect(&ctx, c, "vmgate", None)
            .unwrap()
            .into_record_layer()
            .unwrap();
        let marker = b"PLAINTEXT-MARKER-4711 ";
        let data: Vec<u8> = marker.iter().copied().cycle().take(64 * 1024).collect();
        w.write_all(&data).unwrap();
        w.close().unwrap();
        let got = server.join().unwrap();
        let err = got.expect_err("the flipped byte must be detected");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let seen = relay_t.join().unwrap();
        assert!(!seen.windows(marker.len()).any(|w| w == marker));
    }

    #[test]
    fn truncation_is_not_end_of_stream() {
        let ((_cr, cw), (mut sr, _sw)) = halves();
        // Drop the socket without close_notify: forget the writer's Drop by shutting down.
        cw.sock.shutdown(Shutdown::Both).unwrap();
        std::mem::forget(cw);
        let mut v = Vec::new();
        let e = sr.read_to_end(&mut v).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn nonces_follow_the_sequence_number() {
        let mut k = Keys {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[0u8; 16]).unwrap()),
            iv: [0xff; 12],
            seq: 0x0102,
        };
        let n = k.next_nonce().unwrap();
        let mut expect = [0xffu8; 12];
        expect[10] ^= 0x01;
        expect[11] ^= 0x02;
        assert_eq!(n.as_ref(), &expect);
        k.seq = MAX_RECORDS;
        assert!(k.next_nonce().is_err());
    }
}
