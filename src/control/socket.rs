//! The local control socket: the `vmgate` CLI on this host talks to the daemon here.
//!
//! Every connection is admitted by the peer's credentials as the kernel reports them
//! (`SO_PEERCRED`, [`crate::admission`]) before a byte is read; a refused peer gets one JSON
//! line `{"result":"error","code":"access_denied","message":...}` saying why and how to get
//! access, the connection is closed, and event 10010 is logged.
//!
//! The socket file itself is mode 0666 so that a refused user reaches the daemon and is told
//! why, instead of a bare "permission denied" from the file system: the file mode is not the
//! access check, the peer credentials are. (A stricter folder around the socket still works.)
//!
//! Framing: JSON lines ([`vmgate_control::framing`]); a request line is at most 1 MiB (a longer
//! one gets `request_too_large` and the connection is closed), a line that is not a valid
//! request gets `bad_request` and the connection stays usable. At most [`MAX_CONNECTIONS`]
//! connections are served at once; more are told the daemon is busy.

#![forbid(unsafe_code)]

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::Instrument;
use vmgate_control::api::{ErrorCode, Response};
use vmgate_control::framing::MAX_REQUEST;

use super::serve::{Handler, read_lines, serve, write_lines};
use crate::admission::admit;
use crate::caller::Caller;
use crate::events::{Event, EventLog};

/// Connections served at once; more are told the daemon is busy.
pub const MAX_CONNECTIONS: usize = 64;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The socket's folder cannot be created.
    #[error("cannot create the folder of the control socket {}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket; remove it or choose another control_socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another daemon answers on the socket.
    #[error("another vmgated already listens on {}", path.display())]
    AlreadyRunning {
        /// The path.
        path: PathBuf,
    },
    /// Binding failed.
    #[error("cannot listen on the control socket {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("the control socket stopped accepting connections")]
    Accept(#[source] std::io::Error),
}

/// The control socket's listener.
#[derive(Debug)]
pub struct LocalServer {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    identity: (u64, u64),
    local_group: Option<String>,
    events: Option<EventLog>,
}

impl LocalServer {
    /// Binds the socket at `path` (creating its folder with mode 0755 when missing; replacing a
    /// stale socket that nobody answers on; refusing when another daemon answers).
    pub fn bind(
        path: &Path,
        local_group: Option<String>,
        events: Option<EventLog>,
    ) -> Result<LocalServer, SocketError> {
        if let Some(parent) = path.parent()
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|source| SocketError::CreateDir {
                    path: parent.to_owned(),
                    source,
                })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::AlreadyRunning {
                        path: path.to_owned(),
                    });
                }
                Err(_) => {
                    std::fs::remove_file(path).map_err(|source| SocketError::Bind {
                        path: path.to_owned(),
                        source,
                    })?;
                }
            },
            Ok(_) => {
                return Err(SocketError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Err(_) => {}
        }
        let bind_err = |source| SocketError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(LocalServer {
            listener,
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            local_group,
            events,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until the listener fails, each on its own task (at most
    /// [`MAX_CONNECTIONS`] at once). Must run on a tokio runtime.
    pub async fn serve(&self, handler: Arc<dyn Handler>) -> Result<(), SocketError> {
        let std = self.listener.try_clone().map_err(SocketError::Accept)?;
        std.set_nonblocking(true).map_err(SocketError::Accept)?;
        let listener = UnixListener::from_std(std).map_err(SocketError::Accept)?;
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            let (mut stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) => {
                    tracing::warn!(error = %e, "the control socket cannot accept now; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(SocketError::Accept(e)),
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("refused a local connection: {MAX_CONNECTIONS} are served already");
                let line = Response::error(
                    ErrorCode::Busy,
                    format!(
                        "the daemon serves {MAX_CONNECTIONS} local connections already; try again"
                    ),
                )
                .to_line();
                let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
                continue;
            }
            let handler = Arc::clone(&handler);
            let active = Arc::clone(&active);
            let group = self.local_group.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                connection(stream, group, events, handler).await;
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Removes the socket file if it is still this server's (not a successor's). Connections
    /// already open are not affected.
    pub fn remove_socket(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

async fn refuse(stream: &mut UnixStream, message: String) {
    let line = Response::error(ErrorCode::AccessDenied, message).to_line();
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
    linger(stream).await;
}

async fn connection(
    mut stream: UnixStream,
    local_group: Option<String>,
    events: Option<EventLog>,
    handler: Arc<dyn Handler>,
) {
    let creds = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            refuse(
                &mut stream,
                format!("cannot read the peer's credentials: {e}"),
            )
            .await;
            return;
        }
    };
    let (uid, gid, pid) = (creds.uid(), creds.gid(), creds.pid().unwrap_or(0));
    // The user and group databases (NSS) may block: off the runtime.
    let admitted =
        tokio::task::spawn_blocking(move || admit(uid, gid, pid, local_group.as_deref())).await;
    let (peer, proof) = match admitted {
        Ok(Ok(x)) => x,
        Ok(Err(refusal)) => {
            let reason = vmgate_control::error::chain(&refusal);
            match &events {
                Some(log) => {
                    log.emit(Event::ControlRefused {
                        uid,
                        pid,
                        reason: reason.clone(),
                    });
                }
                None => tracing::warn!(uid, pid, reason = %reason, "refused a local client"),
            }
            refuse(&mut stream, format!("access denied: {reason}")).await;
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "the admission check of a local client stopped");
            return;
        }
    };
    let span = tracing::info_span!("connection", peer = %format!("uid {uid}"), pid);
    let caller = Arc::new(Caller::local(peer, proof));
    let (reader, writer) = stream.into_split();
    let (in_tx, in_rx) = mpsc::channel(1);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let reading = tokio::spawn(read_lines(reader, in_tx));
    let writing = tokio::spawn(write_lines(writer, out_rx));
    serve(in_rx, out_tx, caller, handler).instrument(span).await;
    let _ = writing.await;
    reading.abort();
}

/// Ends a refused connection gently: no more output, then what the client already sent (its
/// first request, typically) is read and dropped for up to a second, so that its write does not
/// fail with "broken pipe" before it reads the refusal. Bounded in bytes and time.
async fn linger(stream: &mut UnixStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 8192];
        let mut total = 0usize;
        while total <= MAX_REQUEST {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
