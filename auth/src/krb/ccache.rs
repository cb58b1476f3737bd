//! A bounded reader of MIT credential-cache files (format version 4), for one question GSSAPI
//! does not answer: the flags of a ticket we hold (is the user's ticket to us forwardable?).
//!
//! Layout (all big-endian): `05 04`, header length + header, default principal, then
//! credentials until the end: client, server, keyblock (`u16` enctype + counted key), four
//! `u32` times, `u8` is_skey, `u32` ticket flags, addresses, authdata, ticket, second ticket.
//! A principal is `u32` name type, `u32` component count, counted realm, counted components.
//! Every count and length is checked against what is left before anything is allocated;
//! the reader never panics.

#![forbid(unsafe_code)]

/// TKT_FLG_FORWARDABLE.
pub const FORWARDABLE: u32 = 0x4000_0000;
/// Largest file read.
pub const MAX_FILE: usize = 1 << 20;
const MAX_COMPONENTS: u32 = 32;
const MAX_COUNT: u32 = 1024;

/// What is wrong with a cache file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CcacheError {
    /// Not a version-4 cache.
    #[error("not a version 4 credential cache")]
    Version,
    /// The file ended early or a length points past its end.
    #[error("the credential cache is truncated")]
    Truncated,
    /// A count beyond any sane value.
    #[error("the credential cache holds an impossible count")]
    Count,
    /// Too large to be a credential cache.
    #[error("the credential cache is larger than {MAX_FILE} bytes")]
    TooLarge,
}

/// A principal as stored: `name@REALM` with `/` between components.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CcPrincipal {
    /// The realm.
    pub realm: String,
    /// The components.
    pub components: Vec<String>,
}

impl CcPrincipal {
    /// `a/b@REALM`.
    pub fn unparsed(&self) -> String {
        format!("{}@{}", self.components.join("/"), self.realm)
    }
}

/// One credential (ticket) of the cache, without its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CcCredential {
    /// The client.
    pub client: CcPrincipal,
    /// The service.
    pub server: CcPrincipal,
    /// Ticket flags (TKT_FLG_*).
    pub flags: u32,
}

impl CcCredential {
    /// A configuration entry, not a ticket.
    pub fn is_config(&self) -> bool {
        self.server.realm == "X-CACHECONF:"
    }

    /// A ticket-granting ticket.
    pub fn is_tgt(&self) -> bool {
        self.server
            .components
            .first()
            .is_some_and(|c| c == "krbtgt")
    }
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CcacheError> {
        let (a, b) = self.0.split_at_checked(n).ok_or(CcacheError::Truncated)?;
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, CcacheError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn u16(&mut self) -> Result<u16, CcacheError> {
        let b: [u8; 2] = self
            .take(2)?
            .try_into()
            .map_err(|_| CcacheError::Truncated)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, CcacheError> {
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| CcacheError::Truncated)?;
        Ok(u32::from_be_bytes(b))
    }

    fn counted(&mut self) -> Result<&'a [u8], CcacheError> {
        let n = usize::try_from(self.u32()?).map_err(|_| CcacheError::Truncated)?;
        self.take(n)
    }

    fn principal(&mut self) -> Result<CcPrincipal, CcacheError> {
        let _name_type = self.u32()?;
        let count = self.u32()?;
        if count > MAX_COMPONENTS {
            return Err(CcacheError::Count);
        }
        let realm = String::from_utf8_lossy(self.counted()?).into_owned();
        let mut components = Vec::new();
        for _ in 0..count {
            components.push(String::from_utf8_lossy(self.counted()?).into_owned());
        }
        Ok(CcPrincipal { realm, components })
    }

    fn skip_list(&mut self) -> Result<(), CcacheError> {
        let count = self.u32()?;
        if count > MAX_COUNT {
            return Err(CcacheError::Count);
        }
        for _ in 0..count {
            self.u16()?;
            self.counted()?;
        }
        Ok(())
    }
}

/// Parses a version-4 cache: the default principal and every credential.
pub fn parse(data: &[u8]) -> Result<(CcPrincipal, Vec<CcCredential>), CcacheError> {
    if data.len() > MAX_FILE {
        return Err(CcacheError::TooLarge);
    }
    let mut r = Rd(data);
    if r.u16()? != 0x0504 {
        return Err(CcacheError::Version);
    }
    let header_len = usize::from(r.u16()?);
    r.take(header_len)?;
    let default = r.principal()?;
    let mut creds = Vec::new();
    while !r.0.is_empty() {
        let client = r.principal()?;
        let server = r.principal()?;
        r.u16()?; // enctype
        r.counted()?; // key
        r.take(16)?; // authtime, starttime, endtime, renew_till
        r.u8()?; // is_skey
        let flags = r.u32()?;
        r.skip_list()?; // addresses
        r.skip_list()?; // authdata
        r.counted()?; // ticket
        r.counted()?; // second ticket
        creds.push(CcCredential {
            client,
            server,
            flags,
        });
    }
    Ok((default, creds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    }

    fn principal(out: &mut Vec<u8>, realm: &str, comps: &[&str]) {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&u32::try_from(comps.len()).unwrap().to_be_bytes());
        counted(out, realm.as_bytes());
        for c in comps {
            counted(out, c.as_bytes());
        }
    }

    fn cred(out: &mut Vec<u8>, server: &[&str], realm: &str, flags: u32) {
        principal(out, "LAB.EXAMPLE.TEST", &["alice"]);
        principal(out, realm, server);
        out.extend_from_slice(&18u16.to_be_bytes());
        counted(out, &[7; 32]);
        out.extend_from_slice(&[0; 16]);
        out.push(0);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        counted(out, b"ticket");
        counted(out, b"");
    }

    fn sample() -> Vec<u8> {
        let mut v = vec![0x05, 0x04, 0, 12];
        v.extend_from_slice(&[0, 1, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        principal(&mut v, "LAB.EXAMPLE.TEST", &["alice"]);
        cred(
            &mut v,
            &["krbtgt", "LAB.EXAMPLE.TEST"],
            "LAB.EXAMPLE.TEST",
            0x40e1_0000,
        );
        cred(&mut v, &["HOST", "hv1"], "LAB.EXAMPLE.TEST", 0x00a1_0000);
        cred(
            &mut v,
            &["krb5_ccache_conf_data", "proxy_impersonator"],
            "X-CACHECONF:",
            0,
        );
        v
    }

    #[test]
    fn reads_flags_of_each_ticket() {
        let (def, creds) = parse(&sample()).unwrap();
        assert_eq!(def.unparsed(), "alice@LAB.EXAMPLE.TEST");
        assert_eq!(creds.len(), 3);
        assert!(creds[0].is_tgt() && creds[0].flags & FORWARDABLE != 0);
        assert_eq!(creds[1].server.unparsed(), "HOST/hv1@LAB.EXAMPLE.TEST");
        assert_eq!(creds[1].flags & FORWARDABLE, 0);
        assert!(creds[2].is_config());
    }

    #[test]
    fn truncations_and_garbage_are_errors_not_panics() {
        let s = sample();
        for i in 0..s.len() {
            // A prefix never yields all three credentials.
            if let Ok((_, c)) = parse(&s[..i]) {
                assert!(c.len() < 3, "prefix of {i} bytes");
            }
        }
        assert_eq!(parse(&[0x05, 0x03]), Err(CcacheError::Version));
        let mut huge = vec![0x05, 0x04, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(parse(&huge), Err(CcacheError::Count));
        huge[11] = 1;
        huge.splice(8..12, [0, 0, 0, 1]);
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xf0]);
        assert_eq!(parse(&huge), Err(CcacheError::Truncated));
        let mut seed = 7u32;
        for _ in 0..5000 {
            let mut v = s.clone();
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let at = usize::try_from(seed >> 8).unwrap() % v.len();
            v[at] = v[at].wrapping_add(u8::try_from(seed & 0x7f).unwrap());
            let _ = parse(&v);
        }
    }
}
