//! The host's end of the guest agent channel (see `vmgate_guest::agent` for the protocol).
//!
//! QEMU serves the channel's UNIX socket in the VM's runtime folder, to one client at a time.
//! Each request opens a connection, sends the request after an empty line (which ends any
//! partial line an earlier client left in the port), reads lines until the answer with the
//! request's id (skipping answers meant for an earlier client), and closes. Requests of one
//! handle are serialized; lines are bounded by `MAX_LINE`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmgate_guest::agent::{Answer, CheckReport, GuestStatus, MAX_LINE, Op, Request, Response};

/// How long a status request may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a check may take (the guest waits for two memory passes and reads its disk).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(90);
/// Answers meant for others skipped before giving up.
const MAX_SKIPPED: usize = 64;

/// Errors of the agent channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The VM has no agent channel.
    #[error("the VM has no guest agent channel (agent = false in its definition)")]
    NotConfigured,
    /// The channel's socket cannot be reached (QEMU is gone).
    #[error("cannot connect to the guest agent channel {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The guest did not answer (not booted yet, or no agent in it).
    #[error("the guest did not answer {op:?} within {} s (is the guest agent running?)", .timeout.as_secs())]
    NoAnswer {
        /// The request.
        op: Op,
        /// How long we waited.
        timeout: Duration,
    },
    /// Reading or writing the channel failed.
    #[error("the guest agent channel failed")]
    Io(#[source] io::Error),
    /// The guest sent something that is not an answer.
    #[error("the guest's answer is not valid")]
    BadAnswer(#[source] serde_json::Error),
    /// The guest answered with an error, or with the wrong kind of answer.
    #[error("the guest could not serve {op:?}: {message}")]
    Refused {
        /// The request.
        op: Op,
        /// Its message.
        message: String,
    },
}

/// The agent channel of one VM.
#[derive(Debug)]
pub struct AgentClient {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
    next: AtomicU64,
}

impl AgentClient {
    /// The channel whose socket is `path`.
    pub fn new(path: &Path) -> AgentClient {
        // Ids differ between clients (and daemon runs), so an answer left over from an earlier
        // client is never taken for ours.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed =
            u64::try_from(seed & u128::from(u64::MAX)).unwrap_or(1) ^ u64::from(std::process::id());
        AgentClient {
            path: path.to_path_buf(),
            lock: tokio::sync::Mutex::new(()),
            next: AtomicU64::new(seed),
        }
    }

    /// The guest's status.
    pub async fn status(&self) -> Result<GuestStatus, AgentError> {
        match self.request(Op::Status, STATUS_TIMEOUT).await? {
            Answer::Status(s) => Ok(s),
            other => Err(unexpected(Op::Status, &other)),
        }
    }

    /// Runs the guest's checks.
    pub async fn check(&self) -> Result<CheckReport, AgentError> {
        match self.request(Op::Check, CHECK_TIMEOUT).await? {
            Answer::Check(c) => Ok(c),
            other => Err(unexpected(Op::Check, &other)),
        }
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, op: Op, timeout: Duration) -> Result<Answer, AgentError> {
        let _one_at_a_time = self.lock.lock().await;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(timeout, self.exchange(id, op))
            .await
            .map_err(|_| AgentError::NoAnswer { op, timeout })?
    }

    async fn exchange(&self, id: u64, op: Op) -> Result<Answer, AgentError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| AgentError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (read, mut write) = stream.into_split();
        let mut text = b"\n".to_vec();
        serde_json::to_writer(&mut text, &Request { id, op }).map_err(AgentError::BadAnswer)?;
        text.push(b'\n');
        write.write_all(&text).await.map_err(AgentError::Io)?;
        let mut reader = BufReader::new(read.take(u64::MAX));
        let mut line = Vec::new();
        for _ in 0..MAX_SKIPPED {
            line.clear();
            let limit = u64::try_from(MAX_LINE + 2).unwrap_or(u64::MAX);
            reader.get_mut().set_limit(limit);
            let n = reader
                .read_until(b'\n', &mut line)
                .await
                .map_err(AgentError::Io)?;
            if n == 0 {
                return Err(AgentError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            if line.last() != Some(&b'\n') {
                return Err(AgentError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the guest sent a line longer than {MAX_LINE} bytes"),
                )));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let resp: Response = serde_json::from_slice(&line).map_err(AgentError::BadAnswer)?;
            if resp.id == id {
                return match resp.result {
                    Answer::Error(message) => Err(AgentError::Refused { op, message }),
                    answer => Ok(answer),
                };
            }
        }
        Err(AgentError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "the guest kept sending answers to other requests",
        )))
    }
}

fn unexpected(op: Op, answer: &Answer) -> AgentError {
    let kind = match answer {
        Answer::Status(_) => "a status",
        Answer::Check(_) => "a check report",
        Answer::Error(_) => "an error",
    };
    AgentError::Refused {
        op,
        message: format!("it sent {kind} instead"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;
    use vmgate_guest::agent::{CheckResult, Response};

    #[tokio::test]
    async fn stale_answers_are_skipped_and_ours_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            // The leading empty line, then the request.
            assert_eq!(lines.next_line().await.unwrap().unwrap(), "");
            let req: Request =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req.op, Op::Check);
            let stale = Response {
                id: req.id.wrapping_sub(5),
                result: Answer::Error("for someone else".into()),
            };
            let ours = Response {
                id: req.id,
                result: Answer::Check(CheckReport {
                    checks: vec![CheckResult {
                        name: "memory".into(),
                        passed: true,
                        detail: "ok".into(),
                    }],
                }),
            };
            let mut out = serde_json::to_vec(&stale).unwrap();
            out.push(b'\n');
            serde_json::to_writer(&mut out, &ours).unwrap();
            out.push(b'\n');
            w.write_all(&out).await.unwrap();
        });
        let agent = AgentClient::new(&path);
        let report = agent.check().await.unwrap();
        assert!(report.passed());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn silence_is_reported_as_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _server = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let agent = AgentClient::new(&path);
        let e = agent
            .request(Op::Status, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::NoAnswer { .. }), "{e}");
        let e = AgentClient::new(&dir.path().join("none.sock"))
            .status()
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Connect { .. }), "{e}");
    }
}
