//! A small, bounded, panic-free reader (and writer) of Windows security descriptors in
//! self-relative form (MS-DTYP 2.4.6), enough to decode msDS-AllowedToActOnBehalfOfOtherIdentity
//! (resource-based constrained delegation): the DACL's ACEs and their SIDs.
//!
//! The bytes come from the directory, so they are untrusted: every offset and size is checked
//! against the buffer before it is used, counts never drive an allocation, and nothing indexes
//! the input directly.
//!
//! ```text
//! SECURITY_DESCRIPTOR (self-relative)       ACL                       ACE
//!   u8  revision (1)                          u8  revision (2 or 4)     u8  type
//!   u8  sbz1                                  u8  sbz1                  u8  flags
//!   u16 control (LE)                          u16 size (LE)             u16 size (LE, >= 8)
//!   u32 owner, group, sacl, dacl offsets      u16 ace count             u32 access mask
//!   ...                                       u16 sbz2                  [object ACE: u32 flags,
//!                                             ACEs                        GUIDs] SID ...
//! ```

use std::fmt;
use std::str::FromStr;

/// The largest security descriptor accepted (AD's own limit for an attribute value is far
/// below this; RBCD descriptors are a few hundred bytes).
pub const MAX_SD_LEN: usize = 64 * 1024;

/// The most sub-authorities a SID may have (MS-DTYP 2.4.2.2).
pub const MAX_SUB_AUTHORITIES: usize = 15;

/// Errors from decoding a security descriptor or a SID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdError {
    /// The buffer ends inside a structure.
    #[error("the security descriptor is truncated inside its {0}")]
    Truncated(&'static str),
    /// Larger than [`MAX_SD_LEN`].
    #[error("the security descriptor is {0} bytes long, more than the {MAX_SD_LEN} accepted")]
    TooLong(usize),
    /// A revision this reader does not know.
    #[error("the {what} has revision {revision}, which is not a known revision")]
    BadRevision {
        /// Which structure.
        what: &'static str,
        /// The revision found.
        revision: u8,
    },
    /// An offset or size points outside the buffer or its parent structure.
    #[error("the {0} lies outside the security descriptor")]
    OutOfBounds(&'static str),
    /// An ACE whose size is smaller than its own header and mask.
    #[error("an ACE claims a size of {0} bytes, less than the minimum of 8")]
    AceTooSmall(u16),
    /// A SID with more than [`MAX_SUB_AUTHORITIES`] sub-authorities.
    #[error("a SID claims {0} sub-authorities, more than the 15 allowed")]
    TooManySubAuthorities(u8),
    /// A SID string that is not `S-1-<authority>-<sub>...`.
    #[error("\"{0}\" is not a SID (expected S-1-<authority>-<sub-authority>...)")]
    BadSidString(String),
}

/// A bounded little reader over a byte slice (no indexing, no panics).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SdError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(SdError::Truncated(self.what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(SdError::Truncated(self.what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SdError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| SdError::Truncated(self.what))
    }

    fn u8(&mut self) -> Result<u8, SdError> {
        Ok(u8::from_le_bytes(self.array::<1>()?))
    }

    fn u16(&mut self) -> Result<u16, SdError> {
        Ok(u16::from_le_bytes(self.array::<2>()?))
    }

    fn u32(&mut self) -> Result<u32, SdError> {
        Ok(u32::from_le_bytes(self.array::<4>()?))
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }
}

/// A security identifier (MS-DTYP 2.4.2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sid {
    revision: u8,
    authority: u64,
    sub_authorities: Vec<u32>,
}

impl Sid {
    /// A revision-1 SID; `None` with more than 15 sub-authorities or an authority wider than
    /// 48 bits.
    pub fn new(authority: u64, sub_authorities: &[u32]) -> Option<Sid> {
        (sub_authorities.len() <= MAX_SUB_AUTHORITIES && authority < (1 << 48)).then(|| Sid {
            revision: 1,
            authority,
            sub_authorities: sub_authorities.to_vec(),
        })
    }

    /// Decodes a binary SID from the start of `bytes`; returns it and the bytes it used.
    pub fn decode(bytes: &[u8]) -> Result<(Sid, usize), SdError> {
        let mut r = Reader::new(bytes, "SID");
        let revision = r.u8()?;
        if revision != 1 {
            return Err(SdError::BadRevision {
                what: "SID",
                revision,
            });
        }
        let count = r.u8()?;
        if usize::from(count) > MAX_SUB_AUTHORITIES {
            return Err(SdError::TooManySubAuthorities(count));
        }
        let auth = r.array::<6>()?;
        let authority = auth.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let mut sub_authorities = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            sub_authorities.push(r.u32()?);
        }
        Ok((
            Sid {
                revision,
                authority,
                sub_authorities,
            },
            r.pos,
        ))
    }

    /// Decodes a buffer that holds exactly one SID (an `objectSid` value).
    pub fn from_bytes(bytes: &[u8]) -> Result<Sid, SdError> {
        let (sid, used) = Sid::decode(bytes)?;
        if used == bytes.len() {
            Ok(sid)
        } else {
            Err(SdError::OutOfBounds("SID"))
        }
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * self.sub_authorities.len());
        out.push(self.revision);
        // At most 15 sub-authorities, checked where a Sid is made.
        out.push(u8::try_from(self.sub_authorities.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.authority.to_be_bytes().get(2..).unwrap_or_default());
        for s in &self.sub_authorities {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// The last sub-authority (the RID of an account SID).
    pub fn rid(&self) -> Option<u32> {
        self.sub_authorities.last().copied()
    }

    /// The SID without its last sub-authority (an account's domain SID).
    pub fn parent(&self) -> Option<Sid> {
        let (_, head) = self.sub_authorities.split_last()?;
        Some(Sid {
            revision: self.revision,
            authority: self.authority,
            sub_authorities: head.to_vec(),
        })
    }

    /// This SID with `rid` appended (a well-known domain RID such as 525, Protected Users).
    pub fn with_rid(&self, rid: u32) -> Option<Sid> {
        let mut subs = self.sub_authorities.clone();
        subs.push(rid);
        Sid::new(self.authority, &subs)
    }

    /// The value for an LDAP filter matching this SID in a binary attribute (`objectSid`):
    /// every byte as `\xx`.
    pub fn ldap_filter_value(&self) -> String {
        self.to_bytes()
            .iter()
            .map(|b| format!("\\{b:02x}"))
            .collect()
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S-{}-", self.revision)?;
        if self.authority < (1 << 32) {
            write!(f, "{}", self.authority)?;
        } else {
            write!(f, "0x{:012X}", self.authority)?;
        }
        for s in &self.sub_authorities {
            write!(f, "-{s}")?;
        }
        Ok(())
    }
}

impl FromStr for Sid {
    type Err = SdError;

    fn from_str(text: &str) -> Result<Sid, SdError> {
        let bad = || SdError::BadSidString(text.chars().take(200).collect());
        let rest = text
            .strip_prefix("S-1-")
            .or_else(|| text.strip_prefix("s-1-"))
            .ok_or_else(bad)?;
        let mut parts = rest.split('-');
        let auth = parts.next().ok_or_else(bad)?;
        let authority = match auth.strip_prefix("0x").or_else(|| auth.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| bad())?,
            None => auth.parse::<u64>().map_err(|_| bad())?,
        };
        let mut subs = Vec::new();
        for p in parts {
            if subs.len() == MAX_SUB_AUTHORITIES {
                return Err(bad());
            }
            subs.push(p.parse::<u32>().map_err(|_| bad())?);
        }
        Sid::new(authority, &subs).ok_or_else(bad)
    }
}

/// ACE types this reader distinguishes (MS-DTYP 2.4.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AceKind {
    /// ACCESS_ALLOWED_ACE (0x00) and its object (0x05) and callback (0x09, 0x0B) forms.
    Allow,
    /// ACCESS_DENIED_ACE (0x01) and its object (0x06) and callback (0x0A, 0x0C) forms.
    Deny,
    /// Anything else (audit, alarm, mandatory label ...), kept by type only.
    Other(u8),
}

/// One ACE of a DACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ace {
    /// Allow, deny or other.
    pub kind: AceKind,
    /// The raw ACE type.
    pub ace_type: u8,
    /// The ACE flags (inheritance).
    pub flags: u8,
    /// The access mask (0 for ACE types whose layout this reader does not know).
    pub mask: u32,
    /// The trustee, for the ACE types whose layout this reader knows.
    pub sid: Option<Sid>,
}

/// A decoded security descriptor: owner, group, and the DACL (the SACL is not needed).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SecurityDescriptor {
    /// The control flags (SE_DACL_PRESENT = 0x0004, SE_SELF_RELATIVE = 0x8000, ...).
    pub control: u16,
    /// The owner SID, if present.
    pub owner: Option<Sid>,
    /// The group SID, if present.
    pub group: Option<Sid>,
    /// The DACL's ACEs, or `None` when there is no DACL.
    pub dacl: Option<Vec<Ace>>,
}

/// SE_DACL_PRESENT.
pub const SE_DACL_PRESENT: u16 = 0x0004;
/// SE_SELF_RELATIVE.
pub const SE_SELF_RELATIVE: u16 = 0x8000;

/// The full-control mask AD tools write into RBCD descriptors (GENERIC_ALL's expansion on
/// directory objects: 0x000F01FF).
pub const RBCD_ACCESS_MASK: u32 = 0x000F_01FF;

const SD_HEADER_LEN: usize = 20;
const ACL_HEADER_LEN: usize = 8;

fn sub_slice<'a>(buf: &'a [u8], offset: u32, what: &'static str) -> Result<&'a [u8], SdError> {
    let offset = usize::try_from(offset).map_err(|_| SdError::OutOfBounds(what))?;
    if offset < SD_HEADER_LEN {
        return Err(SdError::OutOfBounds(what));
    }
    buf.get(offset..).ok_or(SdError::OutOfBounds(what))
}

impl SecurityDescriptor {
    /// Decodes a self-relative security descriptor.
    pub fn decode(bytes: &[u8]) -> Result<SecurityDescriptor, SdError> {
        if bytes.len() > MAX_SD_LEN {
            return Err(SdError::TooLong(bytes.len()));
        }
        let mut r = Reader::new(bytes, "header");
        let revision = r.u8()?;
        if revision != 1 {
            return Err(SdError::BadRevision {
                what: "security descriptor",
                revision,
            });
        }
        let _sbz1 = r.u8()?;
        let control = r.u16()?;
        let owner_off = r.u32()?;
        let group_off = r.u32()?;
        let _sacl_off = r.u32()?;
        let dacl_off = r.u32()?;
        let sid_at = |off: u32, what: &'static str| -> Result<Option<Sid>, SdError> {
            if off == 0 {
                return Ok(None);
            }
            Ok(Some(Sid::decode(sub_slice(bytes, off, what)?)?.0))
        };
        let owner = sid_at(owner_off, "owner SID")?;
        let group = sid_at(group_off, "group SID")?;
        let dacl = if control & SE_DACL_PRESENT != 0 && dacl_off != 0 {
            Some(decode_acl(sub_slice(bytes, dacl_off, "DACL")?)?)
        } else {
            None
        };
        Ok(SecurityDescriptor {
            control,
            owner,
            group,
            dacl,
        })
    }

    /// The SIDs the DACL allows (the accounts an RBCD descriptor lets delegate), in order,
    /// each once.
    pub fn allowed_sids(&self) -> Vec<&Sid> {
        self.sids_of(AceKind::Allow)
    }

    /// The SIDs the DACL denies, in order, each once.
    pub fn denied_sids(&self) -> Vec<&Sid> {
        self.sids_of(AceKind::Deny)
    }

    fn sids_of(&self, kind: AceKind) -> Vec<&Sid> {
        let mut out: Vec<&Sid> = Vec::new();
        for ace in self.dacl.iter().flatten() {
            if ace.kind == kind {
                if let Some(sid) = &ace.sid {
                    if !out.contains(&sid) {
                        out.push(sid);
                    }
                }
            }
        }
        out
    }

    /// The descriptor AD tools write for resource-based delegation: owner BUILTIN\Administrators,
    /// a DACL that allows each of `sids` ([`RBCD_ACCESS_MASK`]).
    pub fn rbcd(sids: &[Sid]) -> SecurityDescriptor {
        SecurityDescriptor {
            control: SE_DACL_PRESENT | SE_SELF_RELATIVE,
            owner: Sid::new(5, &[32, 544]),
            group: None,
            dacl: Some(
                sids.iter()
                    .map(|sid| Ace {
                        kind: AceKind::Allow,
                        ace_type: 0,
                        flags: 0,
                        mask: RBCD_ACCESS_MASK,
                        sid: Some(sid.clone()),
                    })
                    .collect(),
            ),
        }
    }

    /// The self-relative binary form. ACEs of kinds this module cannot lay out (`Other`, or
    /// without a SID) are left out; object ACEs are written as plain ones.
    pub fn encode(&self) -> Vec<u8> {
        let owner = self.owner.as_ref().map(Sid::to_bytes);
        let group = self.group.as_ref().map(Sid::to_bytes);
        let dacl = self.dacl.as_ref().map(|aces| encode_acl(aces));
        let mut out = vec![0u8; SD_HEADER_LEN];
        let mut offsets = [0u32; 4];
        for (slot, part) in [(0usize, &owner), (1, &group), (3, &dacl)] {
            if let Some(bytes) = part {
                if let Some(o) = offsets.get_mut(slot) {
                    *o = u32::try_from(out.len()).unwrap_or(u32::MAX);
                }
                out.extend_from_slice(bytes);
            }
        }
        let mut control = self.control | SE_SELF_RELATIVE;
        if dacl.is_some() {
            control |= SE_DACL_PRESENT;
        }
        let mut header = Vec::with_capacity(SD_HEADER_LEN);
        header.push(1);
        header.push(0);
        header.extend_from_slice(&control.to_le_bytes());
        for o in offsets {
            header.extend_from_slice(&o.to_le_bytes());
        }
        for (dst, src) in out.iter_mut().zip(header) {
            *dst = src;
        }
        out
    }
}

fn decode_acl(buf: &[u8]) -> Result<Vec<Ace>, SdError> {
    let mut r = Reader::new(buf, "ACL header");
    let revision = r.u8()?;
    if revision != 2 && revision != 4 {
        return Err(SdError::BadRevision {
            what: "ACL",
            revision,
        });
    }
    let _sbz1 = r.u8()?;
    let size = usize::from(r.u16()?);
    let count = r.u16()?;
    let _sbz2 = r.u16()?;
    if size < ACL_HEADER_LEN {
        return Err(SdError::OutOfBounds("ACL"));
    }
    let body = buf
        .get(ACL_HEADER_LEN..size)
        .ok_or(SdError::OutOfBounds("ACL"))?;
    let mut aces = Vec::new();
    let mut rest = body;
    for _ in 0..count {
        let mut h = Reader::new(rest, "ACE header");
        let ace_type = h.u8()?;
        let flags = h.u8()?;
        let ace_size = h.u16()?;
        if ace_size < 8 {
            return Err(SdError::AceTooSmall(ace_size));
        }
        let (ace, tail) = rest
            .split_at_checked(usize::from(ace_size))
            .ok_or(SdError::OutOfBounds("ACE"))?;
        aces.push(decode_ace(
            ace_type,
            flags,
            ace.get(4..).unwrap_or_default(),
        )?);
        rest = tail;
    }
    Ok(aces)
}

fn decode_ace(ace_type: u8, flags: u8, body: &[u8]) -> Result<Ace, SdError> {
    let kind = match ace_type {
        0x00 | 0x05 | 0x09 | 0x0B => AceKind::Allow,
        0x01 | 0x06 | 0x0A | 0x0C => AceKind::Deny,
        other => AceKind::Other(other),
    };
    let mut r = Reader::new(body, "ACE");
    let (mask, sid) = match ace_type {
        // Plain and callback ACEs: mask, SID (callback application data follows the SID).
        0x00 | 0x01 | 0x02 | 0x09 | 0x0A => {
            let mask = r.u32()?;
            (mask, Some(Sid::decode(r.rest())?.0))
        }
        // Object ACEs: mask, flags, optional object type and inherited object type GUIDs, SID.
        0x05 | 0x06 | 0x07 | 0x0B | 0x0C => {
            let mask = r.u32()?;
            let object_flags = r.u32()?;
            if object_flags & 1 != 0 {
                r.take(16)?;
            }
            if object_flags & 2 != 0 {
                r.take(16)?;
            }
            (mask, Some(Sid::decode(r.rest())?.0))
        }
        _ => (r.u32().unwrap_or(0), None),
    };
    Ok(Ace {
        kind,
        ace_type,
        flags,
        mask,
        sid,
    })
}

fn encode_acl(aces: &[Ace]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut count: u16 = 0;
    for ace in aces {
        let (Some(sid), Some(ace_type)) = (
            &ace.sid,
            match ace.kind {
                AceKind::Allow => Some(0u8),
                AceKind::Deny => Some(1u8),
                AceKind::Other(_) => None,
            },
        ) else {
            continue;
        };
        let sid = sid.to_bytes();
        let size = u16::try_from(8 + sid.len()).unwrap_or(u16::MAX);
        body.push(ace_type);
        body.push(ace.flags);
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&ace.mask.to_le_bytes());
        body.extend_from_slice(&sid);
        count = count.saturating_add(1);
    }
    let size = u16::try_from(ACL_HEADER_LEN + body.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(ACL_HEADER_LEN + body.len());
    out.push(2);
    out.push(0);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "S-1-5-21-1004336348-1177238915-682003330-1105";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An RBCD descriptor as Windows writes it (O:BAD:(A;;CCDCLCSWRPWPDTLOCRSDRCWDWO;;;SID)),
    /// written out byte by byte from MS-DTYP rather than by our encoder.
    fn windows_rbcd() -> Vec<u8> {
        hex("01 00 04 80 14000000 00000000 00000000 24000000
             01 02 000000000005 20000000 20020000
             02 00 2c00 0100 0000
             00 00 2400 ff010f00
             01 05 000000000005 15000000 dcf4dc3b 833d2b46 828ba628 51040000")
    }

    #[test]
    fn sid_round_trips_text_and_binary() {
        let sid: Sid = ALICE.parse().unwrap();
        assert_eq!(sid.to_string(), ALICE);
        assert_eq!(sid.rid(), Some(1105));
        let bytes = sid.to_bytes();
        assert_eq!(bytes.len(), 8 + 4 * 5);
        assert_eq!(Sid::from_bytes(&bytes).unwrap(), sid);
        assert_eq!(
            sid.parent().unwrap().with_rid(525).unwrap().to_string(),
            "S-1-5-21-1004336348-1177238915-682003330-525"
        );
        assert_eq!(
            Sid::new(5, &[32, 544]).unwrap().ldap_filter_value(),
            "\\01\\02\\00\\00\\00\\00\\00\\05\\20\\00\\00\\00\\20\\02\\00\\00"
        );
        let big = Sid::new(0x0102_0304_0506, &[1]).unwrap();
        assert_eq!(big.to_string(), "S-1-0x010203040506-1");
        assert_eq!(big.to_string().parse::<Sid>().unwrap(), big);
        for bad in ["", "S-1", "S-2-5-1", "S-1-x", "S-1-5-99999999999", "alice"] {
            assert!(bad.parse::<Sid>().is_err(), "{bad}");
        }
        let sixteen = format!("S-1-5{}", "-1".repeat(16));
        assert!(sixteen.parse::<Sid>().is_err());
    }

    #[test]
    fn decodes_a_windows_rbcd_descriptor() {
        let sd = SecurityDescriptor::decode(&windows_rbcd()).unwrap();
        assert_eq!(sd.owner.as_ref().unwrap().to_string(), "S-1-5-32-544");
        assert_eq!(sd.group, None);
        let aces = sd.dacl.as_ref().unwrap();
        assert_eq!(aces.len(), 1);
        assert_eq!(aces[0].kind, AceKind::Allow);
        assert_eq!(aces[0].mask, RBCD_ACCESS_MASK);
        let allowed: Vec<String> = sd.allowed_sids().iter().map(|s| s.to_string()).collect();
        assert_eq!(allowed, vec![ALICE]);
        assert!(sd.denied_sids().is_empty());
    }

    #[test]
    fn encoder_matches_the_windows_bytes() {
        let sd = SecurityDescriptor::rbcd(&[ALICE.parse().unwrap()]);
        assert_eq!(sd.encode(), windows_rbcd());
        let two = SecurityDescriptor::rbcd(&[
            ALICE.parse().unwrap(),
            "S-1-5-21-1-2-3-1106".parse().unwrap(),
        ]);
        assert_eq!(SecurityDescriptor::decode(&two.encode()).unwrap(), two);
    }

    #[test]
    fn decodes_object_and_deny_aces() {
        let sid: Sid = ALICE.parse().unwrap();
        let sid_bytes = sid.to_bytes();
        // ACCESS_DENIED_OBJECT_ACE with both GUIDs, then ACCESS_ALLOWED_OBJECT_ACE with none,
        // then a SYSTEM_MANDATORY_LABEL-like type 0x11 the reader only skips.
        let mut aces = Vec::new();
        let denied_size = 4 + 4 + 4 + 32 + sid_bytes.len();
        aces.extend_from_slice(&[0x06, 0x00]);
        aces.extend_from_slice(&u16::try_from(denied_size).unwrap().to_le_bytes());
        aces.extend_from_slice(&0x100u32.to_le_bytes());
        aces.extend_from_slice(&3u32.to_le_bytes());
        aces.extend_from_slice(&[0xAA; 32]);
        aces.extend_from_slice(&sid_bytes);
        let allowed_size = 4 + 4 + 4 + sid_bytes.len();
        aces.extend_from_slice(&[0x05, 0x02]);
        aces.extend_from_slice(&u16::try_from(allowed_size).unwrap().to_le_bytes());
        aces.extend_from_slice(&0x10u32.to_le_bytes());
        aces.extend_from_slice(&0u32.to_le_bytes());
        aces.extend_from_slice(&sid_bytes);
        aces.extend_from_slice(&[0x11, 0x00, 0x08, 0x00, 1, 0, 0, 0]);
        let mut acl = vec![2, 0];
        acl.extend_from_slice(&u16::try_from(8 + aces.len()).unwrap().to_le_bytes());
        acl.extend_from_slice(&3u16.to_le_bytes());
        acl.extend_from_slice(&[0, 0]);
        acl.extend_from_slice(&aces);
        let mut sd = vec![
            1, 0, 0x04, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0,
        ];
        sd.extend_from_slice(&acl);
        let got = SecurityDescriptor::decode(&sd).unwrap();
        let dacl = got.dacl.as_ref().unwrap();
        assert_eq!(dacl.len(), 3);
        assert_eq!(dacl[0].kind, AceKind::Deny);
        assert_eq!(dacl[1].kind, AceKind::Allow);
        assert_eq!(dacl[1].flags, 2);
        assert_eq!(dacl[2].kind, AceKind::Other(0x11));
        assert_eq!(dacl[2].sid, None);
        assert_eq!(got.allowed_sids(), vec![&sid]);
        assert_eq!(got.denied_sids(), vec![&sid]);
    }

    #[test]
    fn no_dacl_and_empty_dacl() {
        let sd = SecurityDescriptor::decode(&[
            1, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ])
        .unwrap();
        assert_eq!(sd.dacl, None);
        assert!(sd.allowed_sids().is_empty());
        let empty = SecurityDescriptor::rbcd(&[]);
        let back = SecurityDescriptor::decode(&empty.encode()).unwrap();
        assert_eq!(back.dacl, Some(Vec::new()));
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        let good = windows_rbcd();
        // Every truncation is an error, never a panic.
        for n in 0..good.len() {
            assert!(
                SecurityDescriptor::decode(&good[..n]).is_err(),
                "prefix {n}"
            );
        }
        // Offsets into the header or past the end.
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::OutOfBounds("DACL"))
        );
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::OutOfBounds("owner SID"))
        );
        // An ACE of size 0 (would loop forever in a naive reader).
        let mut bad = good.clone();
        bad[46..48].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::AceTooSmall(0))
        );
        // An ACE count far beyond the ACL.
        let mut bad = good.clone();
        bad[40..42].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(SecurityDescriptor::decode(&bad).is_err());
        // An ACL size beyond the buffer.
        let mut bad = good.clone();
        bad[38..40].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::OutOfBounds("ACL"))
        );
        // A SID claiming 200 sub-authorities.
        let mut bad = good.clone();
        bad[53] = 200;
        assert_eq!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::TooManySubAuthorities(200))
        );
        // Revisions.
        let mut bad = good.clone();
        bad[0] = 2;
        assert!(matches!(
            SecurityDescriptor::decode(&bad),
            Err(SdError::BadRevision { .. })
        ));
        // Too long.
        assert_eq!(
            SecurityDescriptor::decode(&vec![0; MAX_SD_LEN + 1]),
            Err(SdError::TooLong(MAX_SD_LEN + 1))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = windows_rbcd();
        for _ in 0..20_000 {
            let mut buf = base.clone();
            let flips = next() % 6;
            for _ in 0..flips {
                let i = usize::try_from(next() % u64::try_from(buf.len()).unwrap()).unwrap();
                buf[i] = u8::try_from(next() & 0xff).unwrap();
            }
            let cut = usize::try_from(next() % 70).unwrap().min(buf.len());
            let _ = SecurityDescriptor::decode(&buf[..cut]);
            let _ = SecurityDescriptor::decode(&buf);
            let _ = Sid::from_bytes(&buf[..cut]);
        }
    }
}
