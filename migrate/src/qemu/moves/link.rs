//! The move's links at work: the control link (a reader and a writer thread around the
//! blocking [`Link`], messages handed to the async side), the byte relays that carry one
//! QEMU connection each over its own link, and which engine a link is for.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::wire::{self, END_OF_STREAM, MAX_CHUNK, Message, WireError};
use crate::engine::{Link, LinkCloser};

/// Which engine a migration link is for, told by its first two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A QEMU move (this module's frames start "VQ").
    Qemu,
    /// The micro-VM engine (its frames start "VG"), or anything else: the micro-VM engine
    /// refuses what it does not understand.
    MicroVm,
}

/// Reads the first two bytes of an incoming migration link (waiting at most `timeout`, then
/// the link is closed) and says which engine it is for; the link is returned with those bytes
/// put back, to be handed to [`super::QemuDestination::handle`] or the micro-VM engine's
/// `Destination::handle`. Blocking: run it on a blocking thread.
pub fn link_kind(link: Link, timeout: Duration) -> io::Result<(LinkKind, Link)> {
    let Link {
        mut reader,
        writer,
        closer,
        peer,
    } = link;
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = Arc::clone(&done);
        let closer = Arc::clone(&closer);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > timeout {
                    closer.close();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut prefix = [0u8; 2];
    let got = reader.read_exact(&mut prefix);
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    if let Err(e) = got {
        closer.close();
        return Err(e);
    }
    let kind = if prefix == wire::MAGIC {
        LinkKind::Qemu
    } else {
        LinkKind::MicroVm
    };
    let reader: Box<dyn Read + Send> = Box::new(io::Cursor::new(prefix).chain(reader));
    Ok((
        kind,
        Link {
            reader,
            writer,
            closer,
            peer,
        },
    ))
}

/// Reads the first message of an incoming link (waiting at most `timeout`, then the link is
/// closed); the link is returned untouched after it. Blocking: run it on a blocking thread.
pub(crate) fn first_message(link: Link, timeout: Duration) -> Result<(Message, Link), WireError> {
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = Arc::clone(&done);
        let closer = Arc::clone(&link.closer);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > timeout {
                    closer.close();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut link = link;
    let got = wire::read_message(&mut *link.reader);
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    match got {
        Ok(m) => Ok((m, link)),
        Err(e) => {
            link.closer.close();
            Err(e)
        }
    }
}

/// What the control link's reader saw.
#[derive(Debug)]
pub(crate) enum ControlEvent {
    /// A message.
    Message(Message),
    /// The link ended, or the peer sent something that is not a message.
    Closed(String),
}

/// One side of a control link: messages in (async), messages out (queued for a writer
/// thread, never blocking the caller), how long the peer has been silent.
pub(crate) struct Control {
    out: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    events: mpsc::UnboundedReceiver<ControlEvent>,
    closer: Arc<dyn LinkCloser>,
    heard: Heard,
    /// The peer, for messages.
    pub(crate) peer: String,
}

/// When the peer was last heard from.
#[derive(Clone)]
pub(crate) struct Heard {
    started: Instant,
    ms: Arc<AtomicU64>,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            started: Instant::now(),
            ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.ms.load(Ordering::Relaxed)))
    }
}

impl Control {
    /// Starts the reader and writer threads of `link`. `first`: a message already read.
    pub(crate) fn new(link: Link) -> Control {
        let Link {
            mut reader,
            mut writer,
            closer,
            peer,
        } = link;
        let heard = Heard::new();
        let (tx, events) = mpsc::unbounded_channel();
        let h = heard.clone();
        let _ = std::thread::Builder::new()
            .name("vmgate-qmove-rx".into())
            .spawn(move || {
                loop {
                    match wire::read_message(&mut *reader) {
                        Ok(m) => {
                            h.touch();
                            if tx.send(ControlEvent::Message(m)).is_err() {
                                return;
                            }
                        }
                        Err(WireError::Closed) => {
                            let _ =
                                tx.send(ControlEvent::Closed("the peer closed the link".into()));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(ControlEvent::Closed(chain(&e)));
                            return;
                        }
                    }
                }
            });
        let (out, frames) = std::sync::mpsc::channel::<Vec<u8>>();
        let c = Arc::clone(&closer);
        let _ = std::thread::Builder::new()
            .name("vmgate-qmove-tx".into())
            .spawn(move || {
                for frame in frames {
                    if writer
                        .write_all(&frame)
                        .and_then(|()| writer.flush())
                        .is_err()
                    {
                        c.close();
                        return;
                    }
                }
                // Everything queued was written: the link is done.
                c.close();
            });
        Control {
            out: Some(out),
            events,
            closer,
            heard,
            peer,
        }
    }

    /// Queues a message (never blocks). False when the link is gone.
    pub(crate) fn send(&self, m: &Message) -> bool {
        let Ok(frame) = wire::encode(m) else {
            return false;
        };
        self.out.as_ref().is_some_and(|o| o.send(frame).is_ok())
    }

    /// The next event; `Closed` once the link ended.
    pub(crate) async fn recv(&mut self) -> ControlEvent {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| ControlEvent::Closed("the link ended".into()))
    }

    /// A sender that can be moved elsewhere (the heartbeat).
    pub(crate) fn sender(&self) -> Option<std::sync::mpsc::Sender<Vec<u8>>> {
        self.out.clone()
    }

    /// How long the peer has been silent.
    pub(crate) fn silence(&self) -> Duration {
        self.heard.silence()
    }

    /// Closes the link now (queued messages may be lost).
    pub(crate) fn abort(&self) {
        self.closer.close();
    }

    /// Closes the link once the queued messages are written (or after `grace`).
    pub(crate) fn finish(mut self, grace: Duration) {
        self.out = None;
        let closer = Arc::clone(&self.closer);
        let _ = std::thread::Builder::new()
            .name("vmgate-qmove-close".into())
            .spawn(move || {
                std::thread::sleep(grace);
                closer.close();
            });
    }
}

/// The text of an error and its sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        msg.push_str(": ");
        msg.push_str(&x.to_string());
        src = x.source();
    }
    msg
}

/// How a relay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RelayEnd {
    /// Both directions ended with their end markers.
    Clean,
    /// A side failed or was cut.
    Failed(String),
}

/// A relay between a local UNIX socket (QEMU's connection) and a link.
pub(crate) struct Relay {
    /// Bytes from the socket to the link.
    pub(crate) up: Arc<AtomicU64>,
    /// Bytes from the link to the socket.
    #[cfg_attr(not(test), allow(dead_code, reason = "the relay tests read it"))]
    pub(crate) down: Arc<AtomicU64>,
    end: watch::Receiver<Option<RelayEnd>>,
    closer: Arc<dyn LinkCloser>,
    sock: Option<UnixStream>,
}

impl Relay {
    /// Stops it: both ends are shut down.
    pub(crate) fn abort(&self) {
        self.closer.close();
        if let Some(s) = &self.sock {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// How it ended, once it has.
    pub(crate) fn ended(&self) -> Option<RelayEnd> {
        self.end.borrow().clone()
    }

    /// A receiver of its end.
    #[cfg(test)]
    pub(crate) fn end_watch(&self) -> watch::Receiver<Option<RelayEnd>> {
        self.end.clone()
    }
}

/// Carries `sock` over `link` in both directions until both ended (chunks with end markers on
/// the link, half closes on the socket). Runs on two threads.
pub(crate) fn relay(sock: UnixStream, link: Link, label: &str) -> io::Result<Relay> {
    let Link {
        mut reader,
        mut writer,
        closer,
        peer: _,
    } = link;
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let (end_tx, end) = watch::channel(None);
    let end_tx = Arc::new(end_tx);
    let state = Arc::new(Mutex::new((false, false, None::<String>)));
    let finish = {
        let closer = Arc::clone(&closer);
        let sock = sock.try_clone()?;
        let state = Arc::clone(&state);
        let end_tx = Arc::clone(&end_tx);
        move |dir_up: bool, failure: Option<String>| {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            if dir_up {
                s.0 = true;
            } else {
                s.1 = true;
            }
            if let Some(f) = failure {
                if s.2.is_none() {
                    s.2 = Some(f);
                }
                // One side failed: the other must not wait.
                closer.close();
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            if s.0 && s.1 {
                closer.close();
                let _ = sock.shutdown(std::net::Shutdown::Both);
                let outcome = match s.2.take() {
                    None => RelayEnd::Clean,
                    Some(f) => RelayEnd::Failed(f),
                };
                end_tx.send_replace(Some(outcome));
            }
        }
    };
    let finish = Arc::new(finish);

    let mut from_sock = sock.try_clone()?;
    let counter = Arc::clone(&up);
    let f = Arc::clone(&finish);
    std::thread::Builder::new()
        .name(format!("vmgate-relay-up-{label}"))
        .spawn(move || {
            let mut buf = vec![0u8; 4 + (256 << 10)];
            let failure = loop {
                let n = match from_sock.read(buf.get_mut(4..).unwrap_or_default()) {
                    Ok(0) => {
                        break writer
                            .write_all(&END_OF_STREAM)
                            .and_then(|()| writer.flush())
                            .err()
                            .map(|e| format!("ending the stream on the link failed: {e}"));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Some(format!("reading QEMU's socket failed: {e}")),
                };
                let len = u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
                if let Some(head) = buf.get_mut(..4) {
                    head.copy_from_slice(&len);
                }
                let frame = buf.get(..4 + n).unwrap_or_default();
                if let Err(e) = writer.write_all(frame).and_then(|()| writer.flush()) {
                    break Some(format!("writing to the link failed: {e}"));
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            };
            f(true, failure);
        })?;

    let mut to_sock = sock.try_clone()?;
    let counter = Arc::clone(&down);
    let f = Arc::clone(&finish);
    std::thread::Builder::new()
        .name(format!("vmgate-relay-down-{label}"))
        .spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let failure = loop {
                let len = match wire::read_chunk_len(&mut *reader) {
                    Ok(Some(n)) => n,
                    Ok(None) => {
                        break to_sock
                            .shutdown(std::net::Shutdown::Write)
                            .err()
                            .map(|e| format!("ending the stream to QEMU failed: {e}"));
                    }
                    Err(WireError::Closed) => {
                        break Some("the link ended in the middle of the stream".into());
                    }
                    Err(e) => break Some(chain(&e)),
                };
                if buf.len() < len {
                    buf.resize(len.min(MAX_CHUNK), 0);
                }
                let part = buf.get_mut(..len).unwrap_or_default();
                if let Err(e) = reader.read_exact(part) {
                    break Some(format!("reading the link failed: {e}"));
                }
                if let Err(e) = to_sock.write_all(part) {
                    break Some(format!("writing to QEMU's socket failed: {e}"));
                }
                counter.fetch_add(len as u64, Ordering::Relaxed);
            };
            f(false, failure);
        })?;

    Ok(Relay {
        up,
        down,
        end,
        closer,
        sock: Some(sock),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Closes a UNIX stream.
    pub(crate) struct UnixCloser(pub UnixStream);

    impl LinkCloser for UnixCloser {
        fn close(&self) {
            let _ = self.0.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A link over one end of a UNIX socket pair.
    pub(crate) fn unix_link(s: UnixStream) -> Link {
        Link {
            reader: Box::new(s.try_clone().unwrap()),
            writer: Box::new(s.try_clone().unwrap()),
            closer: Arc::new(UnixCloser(s)),
            peer: "a test peer".into(),
        }
    }

    #[test]
    fn a_relay_pair_carries_both_directions_and_half_closes() {
        // QEMU A <-> relay <-> link <-> relay <-> QEMU B
        let (qa, ra) = UnixStream::pair().unwrap();
        let (qb, rb) = UnixStream::pair().unwrap();
        let (la, lb) = UnixStream::pair().unwrap();
        let r1 = relay(ra, unix_link(la), "a").unwrap();
        let r2 = relay(rb, unix_link(lb), "b").unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let sent = data.clone();
        let mut qa_w = qa.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            qa_w.write_all(&sent).unwrap();
            qa_w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        let mut qb_r = qb.try_clone().unwrap();
        qb_r.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, data, "A's bytes arrive at B, then B sees A's end");
        // B answers after A's half close, then closes too.
        let mut qb_w = qb;
        qb_w.write_all(b"reply").unwrap();
        qb_w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        let mut qa_r = qa;
        qa_r.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"reply");
        for r in [&r1, &r2] {
            let mut w = r.end_watch();
            while w.borrow().is_none() {
                std::thread::sleep(Duration::from_millis(5));
                w = r.end_watch();
            }
            assert_eq!(r.ended(), Some(RelayEnd::Clean));
        }
        assert_eq!(r1.up.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(r2.down.load(Ordering::Relaxed), 3_000_000);
    }

    #[test]
    fn a_cut_link_fails_both_ends() {
        let (qa, ra) = UnixStream::pair().unwrap();
        let (la, lb) = UnixStream::pair().unwrap();
        let r1 = relay(ra, unix_link(la), "a").unwrap();
        let mut qa_w = qa.try_clone().unwrap();
        qa_w.write_all(b"some bytes").unwrap();
        // The peer's side of the link goes away without an end marker.
        drop(lb);
        let mut rest = Vec::new();
        let mut qa_r = qa;
        let _ = qa_r.read_to_end(&mut rest);
        let deadline = Instant::now() + Duration::from_secs(5);
        while r1.ended().is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(r1.ended(), Some(RelayEnd::Failed(_))));
    }

    #[test]
    fn the_first_bytes_tell_the_engine_and_are_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = a.try_clone().unwrap();
        let frame = wire::encode(&Message::Ping(1)).unwrap();
        w.write_all(&frame).unwrap();
        let (kind, mut link) = link_kind(unix_link(b), Duration::from_secs(5)).unwrap();
        assert_eq!(kind, LinkKind::Qemu);
        assert_eq!(
            wire::read_message(&mut *link.reader).unwrap(),
            Message::Ping(1)
        );
        let (c, d) = UnixStream::pair().unwrap();
        let mut w = c.try_clone().unwrap();
        w.write_all(b"VGxx").unwrap();
        let (kind, mut link) = link_kind(unix_link(d), Duration::from_secs(5)).unwrap();
        assert_eq!(kind, LinkKind::MicroVm);
        let mut four = [0u8; 4];
        link.reader.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"VGxx");
        // A silent peer is cut off.
        let (_e, f) = UnixStream::pair().unwrap();
        let started = Instant::now();
        assert!(link_kind(unix_link(f), Duration::from_millis(200)).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(c);
        drop(a);
    }
}
