//! SRV lookups through the system resolver (libc's `res_query`, which reads `/etc/resolv.conf`
//! as every other program on the host does), and a bounded reader of the answer.
//!
//! The answer is untrusted input from the network: every offset is checked, compressed names
//! may not loop (at most [`MAX_POINTERS`] jumps, [`MAX_NAME`] bytes), and the reader never
//! panics; a malformed answer is an error.

use std::ffi::{CString, c_char, c_int, c_uchar};

/// The largest DNS message read (TCP's limit).
pub const MAX_MESSAGE: usize = 65_535;
/// The most compression pointers followed in one name.
pub const MAX_POINTERS: usize = 16;
/// The longest name (RFC 1035).
pub const MAX_NAME: usize = 255;

const CLASS_IN: u16 = 1;
const TYPE_SRV: u16 = 33;
const TYPE_CNAME: u16 = 5;

#[link(name = "resolv")]
unsafe extern "C" {
    fn res_query(
        dname: *const c_char,
        class: c_int,
        qtype: c_int,
        answer: *mut c_uchar,
        anslen: c_int,
    ) -> c_int;
    fn __h_errno_location() -> *mut c_int;
}

/// One SRV record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SrvRecord {
    /// Lower is tried first.
    pub priority: u16,
    /// Share among records of one priority.
    pub weight: u16,
    /// The service's port.
    pub port: u16,
    /// The host that offers it (without the trailing dot).
    pub target: String,
}

/// Errors of a DNS lookup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN) or has no record of that type.
    #[error("DNS has no {rtype} record for {name}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The record type.
        rtype: &'static str,
    },
    /// No name server answered, or it failed (SERVFAIL, timeout).
    #[error("the name servers of /etc/resolv.conf did not answer for {name} ({why})")]
    NoAnswer {
        /// The name asked for.
        name: String,
        /// The resolver's reason.
        why: &'static str,
    },
    /// The answer could not be read.
    #[error("the DNS answer for {name} is malformed: {reason}")]
    Malformed {
        /// The name asked for.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The name cannot be asked for (a NUL byte, too long).
    #[error("\"{0}\" is not a DNS name")]
    BadName(String),
}

/// The SRV records of `name` (`_ldap._tcp.dc._msdcs.lab.example.test`), through the system
/// resolver, in the order a client should try them: by priority, then by weight (heavier
/// first). A target of `.` ("service not available here") is left out.
pub fn query_srv(name: &str) -> Result<Vec<SrvRecord>, DnsError> {
    // A fully qualified name: the search list must not be applied to it.
    let fq = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    if fq.len() > MAX_NAME + 1 {
        return Err(DnsError::BadName(name.to_owned()));
    }
    let c = CString::new(fq).map_err(|_| DnsError::BadName(name.to_owned()))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let len = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
    // SAFETY: `c` is a NUL-terminated name alive for the call; `buf` is a writable buffer of
    // `len` bytes, and res_query writes at most `len` bytes into it. res_query keeps its state
    // per thread.
    let n = unsafe {
        res_query(
            c.as_ptr(),
            c_int::from(CLASS_IN),
            c_int::from(TYPE_SRV),
            buf.as_mut_ptr(),
            len,
        )
    };
    if n < 0 {
        // SAFETY: __h_errno_location returns the calling thread's h_errno, always valid.
        let h = unsafe { *__h_errno_location() };
        return Err(match h {
            // HOST_NOT_FOUND, NO_DATA
            1 | 4 => DnsError::NotFound {
                name: name.to_owned(),
                rtype: "SRV",
            },
            // TRY_AGAIN
            2 => DnsError::NoAnswer {
                name: name.to_owned(),
                why: "no answer in time, or the server failed",
            },
            _ => DnsError::NoAnswer {
                name: name.to_owned(),
                why: "the query failed",
            },
        });
    }
    // res_query returns the answer's full length, which may exceed the buffer (truncated).
    let used = usize::try_from(n).unwrap_or(0).min(buf.len());
    let answer = buf.get(..used).unwrap_or_default();
    let mut records = parse_srv(answer).map_err(|reason| DnsError::Malformed {
        name: name.to_owned(),
        reason,
    })?;
    records.retain(|r| !r.target.is_empty() && r.target != ".");
    if records.is_empty() {
        return Err(DnsError::NotFound {
            name: name.to_owned(),
            rtype: "SRV",
        });
    }
    sort_srv(&mut records);
    Ok(records)
}

/// RFC 2782 order without the random draw: priority ascending, then weight descending, then
/// name (stable for tests and logs).
pub fn sort_srv(records: &mut [SrvRecord]) {
    records.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.weight.cmp(&a.weight))
            .then(a.target.cmp(&b.target))
            .then(a.port.cmp(&b.port))
    });
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// Reads the (possibly compressed) name at `at`: the name and the offset after it in the
/// record (not after the pointer's target).
pub fn read_name(msg: &[u8], at: usize) -> Result<(String, usize), &'static str> {
    let mut labels: Vec<String> = Vec::new();
    let mut pos = at;
    let mut end: Option<usize> = None;
    let mut jumps = 0usize;
    let mut total = 0usize;
    loop {
        let len = *msg.get(pos).ok_or("a name runs past the end")?;
        match len & 0xC0 {
            0x00 => {
                if len == 0 {
                    let after = pos + 1;
                    return Ok((labels.join("."), end.unwrap_or(after)));
                }
                let n = usize::from(len);
                let start = pos + 1;
                let label = msg
                    .get(start..start + n)
                    .ok_or("a label runs past the end")?;
                total += n + 1;
                if total > MAX_NAME {
                    return Err("a name is longer than 255 bytes");
                }
                labels.push(String::from_utf8_lossy(label).into_owned());
                pos = start + n;
            }
            0xC0 => {
                let low = *msg.get(pos + 1).ok_or("a pointer runs past the end")?;
                if end.is_none() {
                    end = Some(pos + 2);
                }
                jumps += 1;
                if jumps > MAX_POINTERS {
                    return Err("a name's compression pointers loop");
                }
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                if target >= msg.len() {
                    return Err("a compression pointer points past the end");
                }
                pos = target;
            }
            _ => return Err("a label type DNS does not use"),
        }
    }
}

/// The SRV records in a DNS answer (other records, such as a CNAME chain, are skipped).
pub fn parse_srv(msg: &[u8]) -> Result<Vec<SrvRecord>, &'static str> {
    let flags = u16_at(msg, 2).ok_or("shorter than a DNS header")?;
    if flags & 0x8000 == 0 {
        return Err("not a response");
    }
    let rcode = flags & 0x000F;
    if rcode != 0 {
        return Err("the server answered with an error");
    }
    let qd = u16_at(msg, 4).ok_or("shorter than a DNS header")?;
    let an = u16_at(msg, 6).ok_or("shorter than a DNS header")?;
    let mut pos = 12usize;
    if msg.len() < pos {
        return Err("shorter than a DNS header");
    }
    for _ in 0..qd {
        let (_, after) = read_name(msg, pos)?;
        pos = after.checked_add(4).ok_or("a question runs past the end")?;
        if pos > msg.len() {
            return Err("a question runs past the end");
        }
    }
    let mut out = Vec::new();
    for _ in 0..an {
        let (_, after) = read_name(msg, pos)?;
        let rtype = u16_at(msg, after).ok_or("a record runs past the end")?;
        let class = u16_at(msg, after + 2).ok_or("a record runs past the end")?;
        let rdlen = usize::from(u16_at(msg, after + 8).ok_or("a record runs past the end")?);
        let rdata = after + 10;
        let next = rdata + rdlen;
        if next > msg.len() {
            return Err("a record's data runs past the end");
        }
        if rtype == TYPE_SRV && class == CLASS_IN {
            if rdlen < 7 {
                return Err("an SRV record is too short");
            }
            let priority = u16_at(msg, rdata).ok_or("an SRV record is too short")?;
            let weight = u16_at(msg, rdata + 2).ok_or("an SRV record is too short")?;
            let port = u16_at(msg, rdata + 4).ok_or("an SRV record is too short")?;
            let (target, target_end) = read_name(msg, rdata + 6)?;
            if target_end > next {
                return Err("an SRV target runs past its record");
            }
            out.push(SrvRecord {
                priority,
                weight,
                port,
                target: target.to_ascii_lowercase(),
            });
        } else if rtype != TYPE_CNAME {
            // Other types in the answer section are ignored (a resolver may add them).
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(out: &mut Vec<u8>, n: &str) {
        for l in n.split('.').filter(|l| !l.is_empty()) {
            out.push(u8::try_from(l.len()).unwrap());
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
    }

    /// An answer for `_kerberos._tcp.lab.example.test` with two SRV records, the second's
    /// target compressed against the first's.
    fn answer() -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        name(&mut m, "_kerberos._tcp.lab.example.test");
        m.extend_from_slice(&[0, 33, 0, 1]);
        // Record 1: owner is a pointer to the question's name (offset 12).
        m.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0x03, 0x84]);
        let mut rd = vec![0, 10, 0, 50, 0, 88];
        let target_at = m.len() + 2 + 6;
        name(&mut rd, "dc2.lab.example.test");
        m.extend_from_slice(&u16::try_from(rd.len()).unwrap().to_be_bytes());
        m.extend_from_slice(&rd);
        // Record 2: target "dc1" + pointer to "lab.example.test" inside record 1's target.
        m.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0x03, 0x84]);
        let mut rd = vec![0, 0, 0, 100, 0, 88, 3, b'd', b'c', b'1'];
        let suffix = u16::try_from(target_at + 4).unwrap() | 0xC000;
        rd.extend_from_slice(&suffix.to_be_bytes());
        m.extend_from_slice(&u16::try_from(rd.len()).unwrap().to_be_bytes());
        m.extend_from_slice(&rd);
        m
    }

    #[test]
    fn reads_srv_records_with_compressed_names_in_order() {
        let mut r = parse_srv(&answer()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].target, "dc1.lab.example.test");
        sort_srv(&mut r);
        assert_eq!(
            r.iter()
                .map(|x| (x.priority, x.target.as_str(), x.port))
                .collect::<Vec<_>>(),
            [
                (0, "dc1.lab.example.test", 88),
                (10, "dc2.lab.example.test", 88)
            ]
        );
    }

    #[test]
    fn damaged_answers_are_errors_never_panics() {
        let a = answer();
        for cut in 0..a.len() {
            let _ = parse_srv(a.get(..cut).unwrap());
        }
        for i in 0..a.len() {
            let mut b = a.clone();
            b[i] ^= 0xFF;
            let _ = parse_srv(&b);
        }
        // A pointer to itself loops.
        let mut l = vec![0, 0, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        l.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1]);
        assert_eq!(
            parse_srv(&l).unwrap_err(),
            "a name's compression pointers loop"
        );
        // A name server error is not an empty answer.
        let mut e = answer();
        e[3] = 0x83;
        assert!(parse_srv(&e).is_err());
    }
}
