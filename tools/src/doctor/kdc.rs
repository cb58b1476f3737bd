//! Asking the KDC for its clock: one unauthenticated AS-REQ over TCP, read back the KRB-ERROR.
//!
//! A KDC answers an AS-REQ without pre-authentication with a KRB-ERROR (usually
//! KDC_ERR_PREAUTH_REQUIRED) that carries its own time (`stime`, `susec`, RFC 4120 §5.9.1). That
//! is the clock Kerberos compares against, so the skew measured here is the one that makes
//! tickets fail with KRB_AP_ERR_SKEW (0x80090324). The request names the source host's account
//! and asks for no ticket anyone can use: no key is involved on either side.
//!
//! Where the KDC is comes from where libkrb5 finds it ([`vmgate_auth::discover::kdcs`]): the
//! realm's `kdc =` lines of krb5.conf (`KRB5_CONFIG`, includes), else DNS SRV records
//! (`_kerberos._tcp.REALM`) when `dns_lookup_kdc` is on, as on a joined host whose krb5.conf
//! has only `default_realm`. The DER here is the few shapes this exchange needs; the reader is
//! bounded and never panics on what the network sends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The Kerberos port.
pub const KDC_PORT: u16 = 88;
/// The largest reply read (a KRB-ERROR is a few hundred bytes; an AS-REP a few KiB).
pub const MAX_REPLY: usize = 64 * 1024;
/// Connect and read limits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the KDC probe.
#[derive(Debug, thiserror::Error)]
pub enum KdcError {
    /// The KDCs could not be found (krb5.conf, DNS), or the configuration not read.
    #[error(transparent)]
    Locate(#[from] vmgate_auth::discover::DiscoverError),
    /// No realm to ask about.
    #[error("no realm: krb5.conf has no default_realm and none was given (--realm)")]
    NoRealm,
    /// A KDC address does not resolve.
    #[error("the KDC address {address} does not resolve")]
    Resolve {
        /// The address as written.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No KDC answered.
    #[error("no KDC answered at {}", addresses.join(", "))]
    Unreachable {
        /// The addresses tried.
        addresses: Vec<String>,
        /// The last failure.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not a Kerberos message this probe understands.
    #[error("the KDC at {address} answered with something that is not a Kerberos reply: {reason}")]
    BadReply {
        /// The KDC.
        address: SocketAddr,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A `kdc =` value (`host`, `host:port`, `[v6]:port`, `tcp/host`) as socket addresses.
pub fn kdc_addresses(value: &str) -> Result<Vec<SocketAddr>, KdcError> {
    let (host, port) = vmgate_auth::discover::parse_kdc_value(value);
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    (host.as_str(), port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|source| KdcError::Resolve {
            address: value.to_owned(),
            source,
        })
}

/// What the KDC said about its clock.
#[derive(Clone, Debug, PartialEq)]
pub struct KdcTime {
    /// The KDC that answered.
    pub address: SocketAddr,
    /// The KDC's time minus this host's, in seconds (positive: the KDC is ahead). `None` when
    /// the answer carried no time (an AS-REP to an account without pre-authentication).
    pub skew_secs: Option<f64>,
    /// The Kerberos error code of the answer (25 PREAUTH_REQUIRED, 6 C_PRINCIPAL_UNKNOWN, ...),
    /// `None` for an AS-REP.
    pub error_code: Option<i64>,
    /// The round trip.
    pub round_trip: Duration,
}

/// Sends one AS-REQ for `client@realm` to each address until one answers.
pub fn probe(addresses: &[SocketAddr], realm: &str, client: &str) -> Result<KdcTime, KdcError> {
    let request = as_req(realm, client, nonce());
    let mut last = std::io::Error::other("no KDC address");
    for addr in addresses {
        match exchange(*addr, &request) {
            Ok((reply, before, after)) => {
                let mid = before + (after - before) / 2.0;
                let rt = Duration::from_secs_f64((after - before).max(0.0));
                return parse_reply(*addr, &reply, mid, rt);
            }
            Err(e) => last = e,
        }
    }
    Err(KdcError::Unreachable {
        addresses: addresses.iter().map(ToString::to_string).collect(),
        source: last,
    })
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn nonce() -> u32 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    (n ^ std::process::id().rotate_left(13)) & 0x7fff_ffff
}

fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(Vec<u8>, f64, f64)> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    let len = u32::try_from(request.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(request);
    let before = now_secs();
    s.write_all(&framed)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let after = now_secs();
    let n = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if n > MAX_REPLY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the reply is larger than any KDC reply",
        ));
    }
    let mut reply = vec![0u8; n];
    s.read_exact(&mut reply)?;
    Ok((reply, before, after))
}

// --- DER -------------------------------------------------------------------------------------

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(u8::try_from(n).unwrap_or(0));
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let len_bytes = bytes.get(skip..).unwrap_or_default();
        out.push(0x80 | u8::try_from(len_bytes.len()).unwrap_or(0));
        out.extend_from_slice(len_bytes);
    }
    out.extend_from_slice(content);
    out
}

fn ctx(n: u8, content: &[u8]) -> Vec<u8> {
    tlv(0xA0 | n, content)
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn integer(v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (Some(b), Some(next)) = (bytes.get(start), bytes.get(start + 1)) else {
            break;
        };
        let redundant = (*b == 0 && next & 0x80 == 0) || (*b == 0xff && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    tlv(0x02, bytes.get(start..).unwrap_or_default())
}

fn general_string(s: &str) -> Vec<u8> {
    tlv(0x1B, s.as_bytes())
}

fn principal_name(kind: i64, parts: &[&str]) -> Vec<u8> {
    let names: Vec<Vec<u8>> = parts.iter().map(|p| general_string(p)).collect();
    seq(&[ctx(0, &integer(kind)), ctx(1, &seq(&names))])
}

/// An AS-REQ for `client@realm` to `krbtgt/realm`, without pre-authentication.
pub fn as_req(realm: &str, client: &str, nonce: u32) -> Vec<u8> {
    let body = seq(&[
        // kdc-options: none.
        ctx(0, &tlv(0x03, &[0, 0, 0, 0, 0])),
        ctx(1, &principal_name(1, &[client])),
        ctx(2, &general_string(realm)),
        ctx(3, &principal_name(2, &["krbtgt", realm])),
        ctx(5, &tlv(0x18, b"20370913024805Z")),
        ctx(7, &integer(i64::from(nonce))),
        // aes256-cts-hmac-sha1-96, aes128-cts-hmac-sha1-96.
        ctx(8, &seq(&[integer(18), integer(17)])),
    ]);
    let req = seq(&[ctx(1, &integer(5)), ctx(2, &integer(10)), ctx(4, &body)]);
    tlv(0x6A, &req)
}

/// One DER element: (tag, content, rest). `None` for a multi-byte tag, an indefinite or
/// oversized length, or content running past the end.
fn read_tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    if tag & 0x1F == 0x1F {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

fn der_integer(content: &[u8]) -> Option<i64> {
    if content.is_empty() || content.len() > 8 {
        return None;
    }
    let negative = content.first().is_some_and(|b| b & 0x80 != 0);
    let mut v: i64 = if negative { -1 } else { 0 };
    for b in content {
        v = (v << 8) | i64::from(*b);
    }
    Some(v)
}

/// `YYYYMMDDHHMMSSZ` as seconds since the epoch.
pub fn generalized_time(text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?;
    let s = s.strip_suffix('Z')?;
    if s.len() != 14 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|p| p.parse::<i64>().ok());
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(8..10)?, num(10..12)?, num(12..14)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Reads the KDC's answer: its time and error code from a KRB-ERROR, or nothing from an AS-REP.
pub fn parse_reply(
    address: SocketAddr,
    reply: &[u8],
    local_mid: f64,
    round_trip: Duration,
) -> Result<KdcTime, KdcError> {
    let bad = |reason| KdcError::BadReply { address, reason };
    let (tag, content, _) = read_tlv(reply).ok_or_else(|| bad("malformed DER"))?;
    match tag {
        // AS-REP: the account needs no pre-authentication; no clear-text time in it.
        0x6B => Ok(KdcTime {
            address,
            skew_secs: None,
            error_code: None,
            round_trip,
        }),
        // KRB-ERROR.
        0x7E => {
            let (t, mut fields, _) = read_tlv(content).ok_or_else(|| bad("malformed KRB-ERROR"))?;
            if t != 0x30 {
                return Err(bad("KRB-ERROR is not a SEQUENCE"));
            }
            let (mut stime, mut susec, mut code) = (None, 0i64, None);
            while let Some((ft, fc, rest)) = read_tlv(fields) {
                fields = rest;
                let inner = read_tlv(fc).map(|(it, ic, _)| (it, ic));
                match (ft, inner) {
                    (0xA4, Some((0x18, ic))) => stime = generalized_time(ic),
                    (0xA5, Some((0x02, ic))) => susec = der_integer(ic).unwrap_or(0),
                    (0xA6, Some((0x02, ic))) => code = der_integer(ic),
                    _ => {}
                }
            }
            let stime = stime.ok_or_else(|| bad("KRB-ERROR without a server time"))?;
            #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit a f64 exactly
            let kdc = stime as f64 + (susec.clamp(0, 999_999) as f64) / 1e6;
            Ok(KdcTime {
                address,
                skew_secs: Some(kdc - local_mid),
                error_code: code,
                round_trip,
            })
        }
        _ => Err(bad("neither an AS-REP nor a KRB-ERROR")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdc_values_resolve_to_addresses() {
        assert_eq!(
            kdc_addresses("127.0.0.10").unwrap(),
            vec!["127.0.0.10:88".parse().unwrap()]
        );
        assert_eq!(
            kdc_addresses("tcp/127.0.0.10:1088").unwrap(),
            vec!["127.0.0.10:1088".parse().unwrap()]
        );
        assert_eq!(
            kdc_addresses("[::1]:750").unwrap(),
            vec!["[::1]:750".parse().unwrap()]
        );
    }

    #[test]
    fn der_round_trips_and_times() {
        assert_eq!(integer(5), vec![2, 1, 5]);
        assert_eq!(integer(128), vec![2, 2, 0, 128]);
        assert_eq!(integer(-1), vec![2, 1, 0xff]);
        assert_eq!(der_integer(&[0, 128]), Some(128));
        assert_eq!(der_integer(&[0xff]), Some(-1));
        let long = tlv(0x04, &[7u8; 300]);
        let (t, c, rest) = read_tlv(&long).unwrap();
        assert_eq!((t, c.len(), rest.len()), (0x04, 300, 0));
        assert_eq!(generalized_time(b"19700101000000Z"), Some(0));
        assert_eq!(generalized_time(b"20261122112406Z"), Some(1_795_346_646));
        assert_eq!(generalized_time(b"2026112211240Z"), None);
        assert_eq!(generalized_time(b"20261322112406Z"), None);
        let req = as_req("LAB.EXAMPLE.TEST", "hv1$", 42);
        let (t, _, rest) = read_tlv(&req).unwrap();
        assert_eq!((t, rest.len()), (0x6A, 0));
    }

    #[test]
    fn reads_the_kdc_time_from_a_krb_error() {
        let err = tlv(
            0x7E,
            &seq(&[
                ctx(0, &integer(5)),
                ctx(1, &integer(30)),
                ctx(4, &tlv(0x18, b"20261122112406Z")),
                ctx(5, &integer(500_000)),
                ctx(6, &integer(25)),
                ctx(9, &general_string("LAB.EXAMPLE.TEST")),
            ]),
        );
        let addr: SocketAddr = "127.0.0.10:88".parse().unwrap();
        let t = parse_reply(addr, &err, 1_795_346_640.0, Duration::ZERO).unwrap();
        assert_eq!(t.error_code, Some(25));
        assert!((t.skew_secs.unwrap() - 6.5).abs() < 1e-6);
        // Truncated, garbage and oversized lengths are errors, never panics.
        for cut in 0..err.len() {
            let _ = parse_reply(addr, err.get(..cut).unwrap(), 0.0, Duration::ZERO);
        }
        assert!(
            parse_reply(
                addr,
                &[0x7E, 0x84, 0xff, 0xff, 0xff, 0xff],
                0.0,
                Duration::ZERO
            )
            .is_err()
        );
        assert!(parse_reply(addr, &[0x30, 0], 0.0, Duration::ZERO).is_err());
        let rep = tlv(0x6B, &seq(&[]));
        assert_eq!(
            parse_reply(addr, &rep, 0.0, Duration::ZERO)
                .unwrap()
                .skew_secs,
            None
        );
    }
}
