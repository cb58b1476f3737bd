//! Little-endian field readers and writers. The reader never indexes: every read goes through
//! `split_at_checked`, so a short payload is an error, never a panic.

use super::error::ProtocolError;
use super::types::MessageType;

/// A cursor over one message's payload.
pub(crate) struct WireReader<'a> {
    rest: &'a [u8],
    kind: MessageType,
}

impl<'a> WireReader<'a> {
    pub(crate) fn new(kind: MessageType, payload: &'a [u8]) -> Self {
        WireReader {
            rest: payload,
            kind,
        }
    }

    pub(crate) fn kind(&self) -> MessageType {
        self.kind
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn bytes(
        &mut self,
        n: usize,
        field: &'static str,
    ) -> Result<&'a [u8], ProtocolError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(ProtocolError::Truncated {
                kind: self.kind,
                field,
            })?;
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ProtocolError> {
        let kind = self.kind;
        let b = self.bytes(N, field)?;
        b.try_into()
            .map_err(|_| ProtocolError::Truncated { kind, field })
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A boolean: 0 or 1, anything else is rejected.
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ProtocolError::invalid(
                self.kind,
                field,
                format!("{other} is neither 0 (false) nor 1 (true)"),
            )),
        }
    }

    /// A `u16` length-prefixed UTF-8 text of at most `max` bytes, without control characters
    /// (the text ends up in logs and on terminals).
    pub(crate) fn text(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a str, ProtocolError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(ProtocolError::invalid(
                self.kind,
                field,
                format!("it is {len} bytes long, the limit is {max}"),
            ));
        }
        let raw = self.bytes(len, field)?;
        let text = std::str::from_utf8(raw)
            .map_err(|_| ProtocolError::invalid(self.kind, field, "it is not valid UTF-8"))?;
        if text.chars().any(char::is_control) {
            return Err(ProtocolError::invalid(
                self.kind,
                field,
                "it contains control characters",
            ));
        }
        Ok(text)
    }

    /// A `u32` length-prefixed byte string of at most `max` bytes.
    pub(crate) fn blob(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], ProtocolError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > max {
            return Err(ProtocolError::invalid(
                self.kind,
                field,
                format!("it is {len} bytes long, the limit is {max}"),
            ));
        }
        self.bytes(len, field)
    }

    /// Ends the message: trailing bytes are an error.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                kind: self.kind,
                extra: self.rest.len(),
            })
        }
    }
}

/// Appends little-endian fields to a frame being built. Checks on what we send (text lengths,
/// control characters) report our own bug instead of producing a frame the peer would reject.
pub(crate) struct WireWriter<'a> {
    out: &'a mut Vec<u8>,
    kind: MessageType,
}

impl<'a> WireWriter<'a> {
    pub(crate) fn new(kind: MessageType, out: &'a mut Vec<u8>) -> Self {
        WireWriter { out, kind }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    pub(crate) fn text(
        &mut self,
        field: &'static str,
        v: &str,
        max: usize,
    ) -> Result<(), ProtocolError> {
        if v.len() > max {
            return Err(ProtocolError::encode(
                self.kind,
                format!("its {field} is {} bytes long, the limit is {max}", v.len()),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(ProtocolError::encode(
                self.kind,
                format!("its {field} contains control characters"),
            ));
        }
        let len = u16::try_from(v.len()).map_err(|_| {
            ProtocolError::encode(self.kind, format!("its {field} does not fit a u16 length"))
        })?;
        self.u16(len);
        self.bytes(v.as_bytes());
        Ok(())
    }

    pub(crate) fn blob(
        &mut self,
        field: &'static str,
        v: &[u8],
        max: usize,
    ) -> Result<(), ProtocolError> {
        if v.len() > max {
            return Err(ProtocolError::encode(
                self.kind,
                format!("its {field} is {} bytes long, the limit is {max}", v.len()),
            ));
        }
        let len = u32::try_from(v.len()).map_err(|_| {
            ProtocolError::encode(self.kind, format!("its {field} does not fit a u32 length"))
        })?;
        self.u32(len);
        self.bytes(v);
        Ok(())
    }
}
