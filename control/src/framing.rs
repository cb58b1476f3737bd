//! Framing of the control protocol: JSON lines in both directions.
//!
//! A request is one line of at most [`MAX_REQUEST`] bytes (the line break not counted), counted
//! before anything bigger is allocated; a response line at most [`MAX_RESPONSE`]. The server
//! answers each request with zero or more progress lines followed by exactly one final line.

use std::io::{BufRead, Read, Write};

/// The longest request line, in bytes (the line break not counted).
pub const MAX_REQUEST: usize = 1024 * 1024;
/// The longest response line a client reads.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// What reading one bounded line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (without its break). A last line without a break counts as one.
    Text(Vec<u8>),
    /// The peer closed the connection.
    Eof,
    /// More than the limit without a line break.
    TooLong,
}

/// Reads one line of at most `max` bytes; never allocates more than `max + 1` bytes for it.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = reader.take(limit).read_until(b'\n', &mut buf)?;
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

/// Writes `line` and its break in one write, then flushes.
pub fn write_line(mut stream: impl Write, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    stream.write_all(&buf)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut r = std::io::Cursor::new(b"abc\ndef".to_vec());
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Text(b"abc".to_vec()));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Text(b"def".to_vec()));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Eof);
        // Exactly the limit is fine; one more byte is not.
        let mut r = std::io::Cursor::new(b"0123456789\n".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(t) if t.len() == 10));
        let mut r = std::io::Cursor::new(b"0123456789A\n".to_vec());
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::TooLong);
    }
}
