//! Links: the byte streams the engine runs over, and the writer each channel shares between
//! its sender thread and the control messages.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::{Message, ProtocolError, ProtocolVersion, write_frame};

/// Closes a link in both directions, so that blocked reads and writes on it return.
pub trait LinkCloser: Send + Sync {
    /// Shuts the link down (idempotent).
    fn close(&self);
}

impl LinkCloser for TcpStream {
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// One connection: its reading half, its writing half, and a closer.
pub struct Link {
    /// Frames from the peer.
    pub reader: Box<dyn Read + Send>,
    /// Frames to the peer.
    pub writer: Box<dyn Write + Send>,
    /// Closes both halves.
    pub closer: Arc<dyn LinkCloser>,
    /// The peer, for messages ("127.0.0.12:6600", "alice@LAB.EXAMPLE.TEST from 127.0.0.11").
    pub peer: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("peer", &self.peer).finish()
    }
}

impl Link {
    /// A link over a plain TCP stream (tests, benchmarks of the engine alone).
    pub fn tcp(stream: TcpStream) -> std::io::Result<Link> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "an unknown peer".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Link {
            reader: Box::new(reader),
            writer: Box::new(stream),
            closer: Arc::new(closer),
            peer,
        })
    }
}

/// Opens new links to the destination of a move (the parallel channels, the outcome query).
pub trait Dialer: Send {
    /// A new, authenticated link to the same destination.
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>>;
}

/// The writing half of a channel, shared by the threads that send on it: each frame is
/// written whole under the lock.
pub(crate) struct ChannelWriter {
    inner: Mutex<WriterInner>,
    bytes: AtomicU64,
    version: ProtocolVersion,
}

struct WriterInner {
    w: Box<dyn Write + Send>,
    scratch: Vec<u8>,
}

impl ChannelWriter {
    pub(crate) fn new(w: Box<dyn Write + Send>, version: ProtocolVersion) -> ChannelWriter {
        ChannelWriter {
            inner: Mutex::new(WriterInner {
                w,
                scratch: Vec::new(),
            }),
            bytes: AtomicU64::new(0),
            version,
        }
    }

    /// Encodes and writes one message.
    pub(crate) fn send(&self, message: &Message<'_>) -> Result<(), ProtocolError> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let WriterInner { w, scratch } = &mut *g;
        write_frame(w, self.version, message, scratch)?;
        w.flush()?;
        self.bytes
            .fetch_add(scratch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Encodes and writes one message unless another thread is writing (then `Ok(false)`):
    /// for pings, which must never wait behind a stalled link.
    pub(crate) fn try_send(&self, message: &Message<'_>) -> Result<bool, ProtocolError> {
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let WriterInner { w, scratch } = &mut *g;
        write_frame(w, self.version, message, scratch)?;
        w.flush()?;
        self.bytes
            .fetch_add(scratch.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes one encoded frame.
    pub(crate) fn send_raw(&self, frame: &[u8]) -> Result<(), ProtocolError> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.w.write_all(frame)?;
        g.w.flush()?;
        self.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Shared handle.
pub(crate) type SharedWriter = Arc<ChannelWriter>;
