//! A client of the control API: over the local socket (the CLI on the daemon's host, tests) or
//! over an authenticated gateway channel (the CLI on a workstation; [`crate::gateway`] opens
//! one).

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::api::{Request, Response};
use crate::framing::{Line, MAX_RESPONSE, read_line, write_line};

/// Errors of a control client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting to the local socket failed.
    #[error("cannot connect to the control socket {} (is vmgated running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("the control connection failed")]
    Io(#[source] std::io::Error),
    /// The daemon closed the connection without a final answer.
    #[error("the daemon closed the connection without answering")]
    Closed,
    /// A line that is not a valid response.
    #[error("the daemon sent a line that is not a valid response")]
    BadResponse(#[source] serde_json::Error),
    /// A response line longer than [`MAX_RESPONSE`].
    #[error("the daemon sent a response longer than {MAX_RESPONSE} bytes")]
    ResponseTooLarge,
    /// The request could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// A conversation with a daemon over an established stream.
#[derive(Debug)]
pub struct ControlClient<S: Read + Write> {
    reader: BufReader<S>,
}

/// A client of the local control socket.
pub type LocalClient = ControlClient<UnixStream>;

impl ControlClient<UnixStream> {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<LocalClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(ControlClient::over(stream))
    }
}

impl<S: Read + Write> ControlClient<S> {
    /// A client over an established stream.
    pub fn over(stream: S) -> ControlClient<S> {
        ControlClient {
            reader: BufReader::new(stream),
        }
    }

    /// Sends a request and returns the final answer; `on_progress` sees each progress line.
    pub fn call_with(
        &mut self,
        request: &Request,
        mut on_progress: impl FnMut(&Response),
    ) -> Result<Response, ClientError> {
        let line = Zeroizing::new(serde_json::to_string(request).map_err(ClientError::Encode)?);
        if let Err(e) = write_line(self.reader.get_mut(), &line) {
            // A refused peer may find the connection closed before its request is written:
            // the daemon's one-line refusal is still there to read.
            return match self.read_response() {
                Ok(response @ Response::Error(_)) => Ok(response),
                _ => Err(ClientError::Io(e)),
            };
        }
        loop {
            let response = self.read_response()?;
            if response.is_final() {
                return Ok(response);
            }
            on_progress(&response);
        }
    }

    /// Sends a request and returns the final answer (progress lines are skipped).
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.call_with(request, |_| {})
    }

    /// Reads one response line (for a refused connection: the error the daemon sends first).
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        match read_line(&mut self.reader, MAX_RESPONSE).map_err(ClientError::Io)? {
            Line::Text(t) => serde_json::from_slice(&t).map_err(ClientError::BadResponse),
            Line::Eof => Err(ClientError::Closed),
            Line::TooLong => Err(ClientError::ResponseTooLarge),
        }
    }
}
