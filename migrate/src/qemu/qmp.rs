//! A QMP session on a VM's UNIX socket, on tokio.
//!
//! Commands, their replies and events are the types of the `qapi` crate, generated from
//! QEMU's own schema: a command is a value of `qapi::qmp::*` (`query_status`, `migrate`,
//! `blockdev_mirror`, ...), serialized as qapi's `Execute` and answered with that command's
//! typed reply. The session loop itself is ours, not qapi's tokio client, because that client
//! ends the whole session on the first message its schema cannot decode (an event or an enum
//! value newer than the crate's schema, which lags QEMU's by a release or two) and reads
//! lines of any length; here an unknown event is passed on untyped, a reply that does not
//! decode fails only its own command, and a line longer than [`MAX_MESSAGE`] ends the session.
//!
//! One task reads the socket: replies go to the command that waits for them (matched by id),
//! events to every subscriber ([`Qmp::events`]). Commands may be sent from several tasks at
//! once. When QEMU closes the socket (it exits), waiting commands fail with
//! [`QmpError::Disconnected`] and [`Qmp::closed`] completes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qapi::qmp::{QapiCapabilities, QmpCommand};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};

use super::host::QemuVersion;

/// The longest message accepted from QEMU (`query-qmp-schema` is about 200 KiB).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Events kept for a subscriber that falls behind.
const EVENT_BACKLOG: usize = 1024;

/// Errors of a QMP session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to QEMU's QMP socket {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No greeting in time, or not one QMP sends.
    #[error("QEMU's QMP socket {} did not greet as QMP does", .path.display())]
    Greeting {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: io::Error,
    },
    /// The session ended (QEMU exited or closed the socket).
    #[error("the QMP session ended (QEMU closed its socket)")]
    Disconnected,
    /// Writing a command failed.
    #[error("cannot send {command} to QEMU")]
    Write {
        /// The command.
        command: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: &'static str,
        /// QMP's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU's reply does not have the type the schema gives.
    #[error("QEMU's reply to {command} does not match the QMP schema")]
    Decode {
        /// The command.
        command: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// No reply in time.
    #[error("QEMU did not answer {command} within {} s", .timeout.as_secs_f32())]
    Timeout {
        /// The command.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
}

/// An event from QEMU.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// Its name (`SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`, ...).
    pub name: String,
    /// The event, typed, when the schema of the `qapi` crate knows it.
    pub typed: Option<qapi::qmp::Event>,
    /// Its `data` member as sent.
    pub data: Value,
}

type Reply = Result<Value, (String, String)>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn close(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.closed = true;
        // Dropping the senders fails every waiting command with Disconnected.
        p.waiting.clear();
        drop(p);
        self.closed.send_replace(true);
    }
}

struct Inner {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QMP session (cheap to clone; the session ends when the last clone is dropped).
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .finish()
    }
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Connect {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::TimedOut, "no answer"),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting_error = |source: io::Error| QmpError::Greeting {
            path: path.to_path_buf(),
            source,
        };
        let mut line = Vec::new();
        let got = tokio::time::timeout(timeout, read_line(&mut reader, &mut line, MAX_MESSAGE))
            .await
            .map_err(|_| greeting_error(io::Error::new(io::ErrorKind::TimedOut, "no greeting")))?
            .map_err(greeting_error)?;
        if !got {
            return Err(greeting_error(io::ErrorKind::UnexpectedEof.into()));
        }
        let greeting: QapiCapabilities =
            serde_json::from_slice(&line).map_err(|e| greeting_error(e.into()))?;
        let v = &greeting.QMP.version;
        let version = QemuVersion {
            major: u32::try_from(v.qemu.major).unwrap_or(0),
            minor: u32::try_from(v.qemu.minor).unwrap_or(0),
            micro: u32::try_from(v.qemu.micro).unwrap_or(0),
            package: v.package.trim().to_string(),
        };

        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            events,
            closed,
        });
        let reader = tokio::spawn(read_loop(reader, Arc::clone(&shared)));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: tokio::sync::Mutex::new(write),
                shared,
                next_id: AtomicU64::new(1),
                version,
                reader,
            }),
        };
        qmp.execute_timeout(qapi::qmp::qmp_capabilities { enable: None }, timeout)
            .await?;
        Ok(qmp)
    }

    /// QEMU's version, from its greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Runs a command and returns its typed reply.
    pub async fn execute<C: QmpCommand>(&self, command: C) -> Result<C::Ok, QmpError> {
        let name = C::NAME;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self
                .inner
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if p.closed {
                return Err(QmpError::Disconnected);
            }
            p.waiting.insert(id, tx);
        }
        let mut text = serde_json::to_vec(&qapi::Execute::new(command, Some(id))).map_err(|e| {
            QmpError::Write {
                command: name,
                source: e.into(),
            }
        })?;
        text.push(b'\n');
        {
            let mut w = self.inner.writer.lock().await;
            if let Err(source) = w.write_all(&text).await {
                self.forget(id);
                return Err(if source.kind() == io::ErrorKind::BrokenPipe {
                    QmpError::Disconnected
                } else {
                    QmpError::Write {
                        command: name,
                        source,
                    }
                });
            }
        }
        match rx.await {
            Err(_) => Err(QmpError::Disconnected),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: name,
                class,
                desc,
            }),
            Ok(Ok(value)) => serde_json::from_value(value).map_err(|source| QmpError::Decode {
                command: name,
                source,
            }),
        }
    }

    /// [`Qmp::execute`] with a time limit (the command is not withdrawn from QEMU).
    pub async fn execute_timeout<C: QmpCommand>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        tokio::time::timeout(timeout, self.execute(command))
            .await
            .map_err(|_| QmpError::Timeout {
                command: C::NAME,
                timeout,
            })?
    }

    fn forget(&self, id: u64) {
        self.inner
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .remove(&id);
    }

    /// The events QEMU sends from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.shared.events.subscribe()
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed.borrow()
    }

    /// Completes when the session ends.
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // An error means the sender is gone: the session is over too.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Reads one line (without its newline) into `line`; false at a clean end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<bool> {
    line.clear();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            return Ok(true);
        }
    }
}

async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, MAX_MESSAGE).await {
            Ok(true) => dispatch(&shared, &line),
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP session ended by a read error");
                break;
            }
        }
    }
    shared.close();
}

fn dispatch(shared: &Shared, line: &[u8]) {
    let Ok(Value::Object(mut msg)) = serde_json::from_slice::<Value>(line) else {
        tracing::warn!(
            len = line.len(),
            "QEMU sent a QMP line that is not a JSON object"
        );
        return;
    };
    if let Some(Value::String(name)) = msg.get("event") {
        let name = name.clone();
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let typed = serde_json::from_value(Value::Object(msg)).ok();
        // No subscriber is fine.
        let _ = shared.events.send(QmpEvent { name, typed, data });
        return;
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        tracing::warn!("QEMU sent a QMP reply without an id");
        return;
    };
    let reply = if let Some(value) = msg.remove("return") {
        Ok(value)
    } else if let Some(Value::Object(err)) = msg.remove("error") {
        let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Err((text("class"), text("desc")))
    } else {
        tracing::warn!(
            id,
            "QEMU sent a QMP message that is neither a reply nor an event"
        );
        return;
    };
    let waiter = shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .waiting
        .remove(&id);
    if let Some(tx) = waiter {
        // The command may have been given up (timeout): then nobody listens.
        let _ = tx.send(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, then answers each command from a script of lines.
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2\"}, \"capabilities\": [\"oob\"]}}\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut ids = Vec::new();
        for reply in replies {
            // Read one command, take its id.
            let n = s.read(&mut buf).await.unwrap();
            let cmd: Value = serde_json::from_slice(&buf[..n]).unwrap();
            ids.push(cmd["id"].as_u64().unwrap());
            let text = reply.replace("ID", &cmd["id"].to_string());
            s.write_all(text.as_bytes()).await.unwrap();
        }
        // Stay until the client goes.
        let _ = s.read(&mut buf).await;
    }

    #[tokio::test]
    async fn commands_get_typed_replies_and_events_pass_even_when_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}, \"id\": ID}\n",
                concat!(
                    "{\"event\": \"SOMETHING_NEW\", \"data\": {\"x\": 1}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
                    "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
                    "{\"return\": {\"status\": \"paused\", \"running\": false}, \"id\": ID}\n"
                ),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": ID}\n",
                "{\"return\": {\"status\": \"a-state-from-the-future\", \"running\": true}, \"id\": ID}\n",
            ],
        ));
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.version().to_string(), "10.0.2 (Debian 1:10.0.2)");
        let mut events = qmp.events();
        let status = qmp.execute(qapi::qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, qapi::qmp::RunState::paused);
        let e = events.recv().await.unwrap();
        assert_eq!(e.name, "SOMETHING_NEW");
        assert!(e.typed.is_none());
        assert_eq!(e.data["x"], 1);
        let e = events.recv().await.unwrap();
        assert_eq!(e.name, "STOP");
        assert!(matches!(e.typed, Some(qapi::qmp::Event::STOP { .. })));
        let err = qmp.execute(qapi::qmp::stop {}).await.unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { command: "stop", desc, .. } if desc == "nope"),
            "{err}"
        );
        // A reply the schema cannot decode fails that command only.
        let err = qmp.execute(qapi::qmp::query_status {}).await.unwrap_err();
        assert!(matches!(err, QmpError::Decode { .. }), "{err}");
        assert!(!qmp.is_closed());
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_socket_fails_waiting_commands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n").await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let cmd: Value = serde_json::from_slice(&buf[..n]).unwrap();
            s.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", cmd["id"]).as_bytes())
                .await
                .unwrap();
            // Read the next command and hang up without answering.
            let _ = s.read(&mut buf).await;
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let err = qmp.execute(qapi::qmp::query_status {}).await.unwrap_err();
        assert!(matches!(err, QmpError::Disconnected), "{err}");
        qmp.closed().await;
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute(qapi::qmp::cont {}).await.unwrap_err(),
            QmpError::Disconnected
        ));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn overlong_lines_end_the_session() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let _ = server.write_all(&[b'x'; 100]).await;
            let _ = server.write_all(b"\n").await;
        });
        let mut r = BufReader::new(client);
        let mut line = Vec::new();
        let e = read_line(&mut r, &mut line, 50).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        writer.await.unwrap();
    }
}
