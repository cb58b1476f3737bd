//! The framed messages of the handshake phase (inside TLS).
//!
//! Each frame is a big-endian `u32` length (1 ..= [`MAX_FRAME`], checked before anything is
//! allocated) and a body whose first byte is the message type. Zero is never a valid type;
//! unknown types, trailing bytes and out-of-range values are errors. Decoding never panics.
//!
//! ```text
//! 1 GssToken   token bytes
//! 2 Request    version u8, purpose u8, obtained u8, via str16      (client, after GSS)
//! 3 Accepted   principal str16                                     (server)
//! 4 Refused    hresult u32, cause str16, fix str16 (empty = none)  (server, at any step)
//! ```

use crate::winerr::{Diagnosis, WinCode};

/// Largest frame body (a Kerberos token with a PAC is a few KiB; a forwarded TGT adds ~2 KiB).
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest string in a frame.
pub const MAX_STR: usize = 8 * 1024;
/// The handshake protocol version.
pub const VERSION: u8 = 1;

/// What the channel is for (the first message after Kerberos says it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// Requests to the daemon (CLI → daemon, daemon → daemon control).
    Control,
    /// A migration stream.
    Migration,
}

/// How the client obtained the credential it authenticated with, as it declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Its own ticket (a user after kinit, a host as itself).
    OwnTicket,
    /// A host acting with the user's forwarded TGT.
    ForwardedTgt,
    /// A host acting with constrained delegation (S4U2Proxy) from the user's service ticket.
    ConstrainedDelegation,
    /// A host acting with S4U2Self + S4U2Proxy.
    ProtocolTransition,
}

/// One handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A GSS token.
    GssToken(Vec<u8>),
    /// The client's request after Kerberos.
    Request {
        /// Protocol version.
        version: u8,
        /// What for.
        purpose: Purpose,
        /// How the client got its credential.
        route: Route,
        /// The host acting for the user (empty when the user connects directly).
        via: String,
    },
    /// The server accepts; the principal it authenticated.
    Accepted {
        /// `alice@LAB.EXAMPLE.TEST`.
        principal: String,
    },
    /// The server refuses, with its diagnosis.
    Refused(Diagnosis),
}

/// What is wrong with a frame (the peer's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix is zero or beyond the limit.
    #[error("a frame of {0} bytes (the limit is {MAX_FRAME})")]
    FrameLength(u64),
    /// An unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body ended early.
    #[error("a truncated {0} message")]
    Truncated(&'static str),
    /// Bytes after the message.
    #[error("{0} trailing bytes after a message")]
    Trailing(usize),
    /// A value out of range.
    #[error("an invalid {0}")]
    BadValue(&'static str),
    /// A string that is too long or not UTF-8.
    #[error("an invalid string in a {0} message")]
    BadString(&'static str),
}

/// Checks a frame length prefix before anything is allocated.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let n = u32::from_be_bytes(prefix);
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_FRAME).contains(&n) => Ok(n),
        _ => Err(WireError::FrameLength(u64::from(n))),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Our own strings: cut at MAX_STR on a character boundary rather than fail.
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = s.as_bytes().get(..end).unwrap_or_default();
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes a message as a frame (length prefix included).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    match msg {
        Message::GssToken(t) => {
            body.push(1);
            body.extend_from_slice(t);
        }
        Message::Request {
            version,
            purpose,
            route,
            via,
        } => {
            body.push(2);
            body.push(*version);
            body.push(match purpose {
                Purpose::Control => 1,
                Purpose::Migration => 2,
            });
            body.push(match route {
                Route::OwnTicket => 1,
                Route::ForwardedTgt => 2,
                Route::ConstrainedDelegation => 3,
                Route::ProtocolTransition => 4,
            });
            put_str(&mut body, via);
        }
        Message::Accepted { principal } => {
            body.push(3);
            put_str(&mut body, principal);
        }
        Message::Refused(d) => {
            body.push(4);
            body.extend_from_slice(&d.code.hresult().to_be_bytes());
            put_str(&mut body, &d.cause);
            put_str(&mut body, d.fix.as_deref().unwrap_or(""));
        }
    }
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

struct Cursor<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let (a, b) = self
            .rest
            .split_at_checked(n)
            .ok_or(WireError::Truncated(self.what))?;
        self.rest = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| WireError::Truncated(self.what))?;
        Ok(u32::from_be_bytes(b))
    }

    fn str16(&mut self) -> Result<String, WireError> {
        let b: [u8; 2] = self
            .take(2)?
            .try_into()
            .map_err(|_| WireError::Truncated(self.what))?;
        let n = usize::from(u16::from_be_bytes(b));
        if n > MAX_STR {
            return Err(WireError::BadString(self.what));
        }
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| WireError::BadString(self.what))?;
        if s.chars().any(|c| c.is_control() && c != '\n') {
            return Err(WireError::BadString(self.what));
        }
        Ok(s.to_owned())
    }

    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.rest.len()))
        }
    }
}

/// Decodes a frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, WireError> {
    let Some((&kind, rest)) = body.split_first() else {
        return Err(WireError::Truncated("frame"));
    };
    match kind {
        1 => {
            if rest.is_empty() {
                return Err(WireError::Truncated("GSS token"));
            }
            Ok(Message::GssToken(rest.to_vec()))
        }
        2 => {
            let mut c = Cursor {
                rest,
                what: "request",
            };
            let version = c.u8()?;
            let purpose = match c.u8()? {
                1 => Purpose::Control,
                2 => Purpose::Migration,
                _ => return Err(WireError::BadValue("purpose")),
            };
            let route = match c.u8()? {
                1 => Route::OwnTicket,
                2 => Route::ForwardedTgt,
                3 => Route::ConstrainedDelegation,
                4 => Route::ProtocolTransition,
                _ => return Err(WireError::BadValue("route")),
            };
            let via = c.str16()?;
            c.end()?;
            Ok(Message::Request {
                version,
                purpose,
                route,
                via,
            })
        }
        3 => {
            let mut c = Cursor {
                rest,
                what: "accepted",
            };
            let principal = c.str16()?;
            c.end()?;
            Ok(Message::Accepted { principal })
        }
        4 => {
            let mut c = Cursor {
                rest,
                what: "refused",
            };
            let code = WinCode::from_hresult(c.u32()?).ok_or(WireError::BadValue("error code"))?;
            let cause = c.str16()?;
            let fix = c.str16()?;
            c.end()?;
            let d = Diagnosis::new(code, cause);
            Ok(Message::Refused(if fix.is_empty() {
                d
            } else {
                d.with_fix(fix)
            }))
        }
        other => Err(WireError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let f = encode(&m);
        let len = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        assert_eq!(decode(&f[4..]).unwrap(), m);
    }

    #[test]
    fn messages_round_trip() {
        roundtrip(Message::GssToken(vec![0x60, 1, 2, 3]));
        roundtrip(Message::Request {
            version: VERSION,
            purpose: Purpose::Migration,
            route: Route::ConstrainedDelegation,
            via: "hv1".into(),
        });
        roundtrip(Message::Accepted {
            principal: "alice@LAB.EXAMPLE.TEST".into(),
        });
        roundtrip(Message::Refused(
            Diagnosis::new(WinCode::AccessDenied, "carol is not\na member").with_fix("x y"),
        ));
        roundtrip(Message::Refused(Diagnosis::new(WinCode::TimeSkew, "skew")));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(frame_len([0, 0, 0, 0]), Err(WireError::FrameLength(0)));
        assert_eq!(
            frame_len([0xff, 0xff, 0xff, 0xff]),
            Err(WireError::FrameLength(u64::from(u32::MAX)))
        );
        assert_eq!(frame_len([0, 1, 0, 1]), Err(WireError::FrameLength(65537)));
        assert_eq!(frame_len([0, 1, 0, 0]), Ok(65536));
        assert_eq!(decode(&[]), Err(WireError::Truncated("frame")));
        assert_eq!(decode(&[0]), Err(WireError::UnknownType(0)));
        assert_eq!(decode(&[9, 1]), Err(WireError::UnknownType(9)));
        assert_eq!(decode(&[1]), Err(WireError::Truncated("GSS token")));
        assert_eq!(
            decode(&[2, 1, 3, 1, 0, 0]),
            Err(WireError::BadValue("purpose"))
        );
        assert_eq!(
            decode(&[2, 1, 1, 9, 0, 0]),
            Err(WireError::BadValue("route"))
        );
        assert_eq!(
            decode(&[2, 1, 1, 1, 0, 5, b'a']),
            Err(WireError::Truncated("request"))
        );
        assert_eq!(decode(&[2, 1, 1, 1, 0, 0, 7]), Err(WireError::Trailing(1)));
        assert_eq!(
            decode(&[3, 0, 2, 0xff, 0xfe]),
            Err(WireError::BadString("accepted"))
        );
        assert_eq!(
            decode(&[3, 0, 1, 0x07]),
            Err(WireError::BadString("accepted"))
        );
        assert_eq!(
            decode(&[3, 0x40, 0x01]),
            Err(WireError::BadString("accepted"))
        );
        assert_eq!(
            decode(&[4, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]),
            Err(WireError::BadValue("error code"))
        );
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A small deterministic fuzz: every prefix of valid frames and pseudo-random bodies.
        let mut seed = 0x1234_5678_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 40).unwrap();
            let mut body: Vec<u8> = (0..len).map(|_| (next() & 0xff) as u8).collect();
            if let Some(first) = body.first_mut() {
                *first %= 6;
            }
            let _ = decode(&body);
        }
        let f = encode(&Message::Refused(
            Diagnosis::new(WinCode::NoCredentials, "c").with_fix("f"),
        ));
        for i in 4..f.len() {
            let _ = decode(&f[4..i]);
        }
    }
}
