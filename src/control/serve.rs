//! Serving the control protocol on one connection, whatever carries it: JSON lines in (each
//! bounded by [`MAX_REQUEST`] before it is allocated), zero or more progress lines and one
//! final line out per request. The local socket feeds it from async halves; a gateway control
//! channel — whose TLS record layer is synchronous — from two blocking threads, one per half.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io::{BufReader, Read, Write};
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use vmgate_control::api::{ErrorCode, Request, Response};
use vmgate_control::framing::{self, Line, MAX_REQUEST};
use zeroize::Zeroizing;

use super::{Dispatcher, ProgressSink};
use crate::caller::Caller;

/// What answers requests on a connection: the daemon's [`Dispatcher`], or a smaller handler.
pub trait Handler: Send + Sync + 'static {
    /// Answers `request` from `caller`; progress lines go to `progress` first.
    fn handle(
        &self,
        caller: Arc<Caller>,
        request: Request,
        progress: ProgressSink,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

impl Handler for Dispatcher {
    fn handle(
        &self,
        caller: Arc<Caller>,
        request: Request,
        progress: ProgressSink,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(Dispatcher::handle(self, caller, request, progress))
    }
}

/// Serves `version` and `host_show` from a fixed answer; everything else is `unsupported`
/// (a daemon's control socket before its services are up, and tests of the socket itself).
#[derive(Debug, Clone)]
pub struct BasicHandler {
    host: Arc<vmgate_control::api::host::HostInfo>,
}

impl BasicHandler {
    /// A handler answering with `host`.
    pub fn new(host: vmgate_control::api::host::HostInfo) -> BasicHandler {
        BasicHandler {
            host: Arc::new(host),
        }
    }
}

impl Handler for BasicHandler {
    fn handle(
        &self,
        _caller: Arc<Caller>,
        request: Request,
        _progress: ProgressSink,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        let answer = match request {
            Request::Version => Response::Version(self.host.version.clone()),
            Request::HostShow => Response::Host(Box::new((*self.host).clone())),
            other => Response::error(
                ErrorCode::Unsupported,
                format!(
                    "this daemon does not serve \"{}\" requests yet",
                    other.name()
                ),
            ),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// One line from the client, or why there is none.
pub type Incoming = std::io::Result<Line>;

/// Answers the requests arriving on `input` until the client closes or a line is too long;
/// every line out goes to `output`.
pub async fn serve(
    mut input: mpsc::Receiver<Incoming>,
    output: mpsc::UnboundedSender<String>,
    caller: Arc<Caller>,
    handler: Arc<dyn Handler>,
) {
    while let Some(item) = input.recv().await {
        let line = match item {
            Ok(Line::Text(t)) => Zeroizing::new(t),
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::TooLong) => {
                let _ = output.send(
                    Response::error(
                        ErrorCode::RequestTooLarge,
                        format!("a request is at most {MAX_REQUEST} bytes; closing the connection"),
                    )
                    .to_line(),
                );
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let work = handler.handle(Arc::clone(&caller), request, ProgressSink::new(tx));
                tokio::pin!(work);
                loop {
                    tokio::select! {
                        Some(p) = rx.recv() => {
                            let _ = output.send(p.to_line());
                        }
                        r = &mut work => {
                            while let Ok(p) = rx.try_recv() {
                                let _ = output.send(p.to_line());
                            }
                            break r;
                        }
                    }
                }
            }
            Err(e) => Response::error(ErrorCode::BadRequest, format!("not a valid request: {e}")),
        };
        if output.send(response.to_line()).is_err() {
            return;
        }
    }
}

/// Reads bounded lines from an async stream into `input`, until the end, an error or a line
/// that is too long.
pub async fn read_lines<R: AsyncRead + Unpin>(reader: R, input: mpsc::Sender<Incoming>) {
    let mut reader = tokio::io::BufReader::new(reader);
    loop {
        let line = read_line(&mut reader, MAX_REQUEST).await;
        let last = !matches!(line, Ok(Line::Text(_)));
        if input.send(line).await.is_err() || last {
            return;
        }
    }
}

/// One line of at most `max` bytes from an async reader (see [`framing::read_line`]).
pub async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text(buf));
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(buf))
}

/// Writes the lines of `output` to an async stream, until the connection is done with.
pub async fn write_lines<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut output: mpsc::UnboundedReceiver<String>,
) {
    while let Some(line) = output.recv().await {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Serves a connection whose halves block (a gateway control channel): each half on a
/// blocking thread, the requests on the runtime.
pub async fn serve_blocking<R, W>(
    reader: R,
    writer: W,
    close: impl FnOnce(&mut W) + Send + 'static,
    caller: Arc<Caller>,
    handler: Arc<dyn Handler>,
) where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let (in_tx, in_rx) = mpsc::channel(1);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    let reading = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(reader);
        loop {
            let line = framing::read_line(&mut reader, MAX_REQUEST);
            let last = !matches!(line, Ok(Line::Text(_)));
            if in_tx.blocking_send(line).is_err() || last {
                return;
            }
        }
    });
    let writing = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        while let Some(line) = out_rx.blocking_recv() {
            if framing::write_line(&mut writer, &line).is_err() {
                return;
            }
        }
        close(&mut writer);
    });
    serve(in_rx, out_tx, caller, handler).await;
    let _ = writing.await;
    // The reader ends when the peer closes, or at its next line.
    drop(reading);
}
