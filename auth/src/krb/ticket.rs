//! Which service a client's first Kerberos token is for, read before GSSAPI sees the token.
//!
//! MIT's acceptor, given a credential without a name (so that one credential serves the host's
//! keytab for accepting and initiating), decrypts a ticket with **any** key in the keytab that
//! fits: a ticket for `HOST/hv2`, `cifs/hv2` or `hv2$` — all encrypted with the computer
//! account's one key — is accepted like one for the migration SPN, and the context then names
//! the keytab entry that decrypted it, not the ticket's service. So the acceptor reads the
//! ticket's service name (`sname` and realm, which travel in clear in the AP-REQ) here and
//! refuses every service but its own migration SPNs before the token reaches GSSAPI.
//!
//! The token is the GSS-API initial context token of the krb5 mechanism (RFC 2743 §3.1,
//! RFC 4121 §4.1): `[APPLICATION 0] { OID 1.2.840.113554.1.2.2, TOK_ID 01 00, AP-REQ }`.
//! Anything else (another mechanism, SPNEGO, user-to-user, a bare AP-REQ) is refused. The
//! AP-REQ itself is decoded by `kerberos-parser`.
//!
//! The service name is not integrity-protected by Kerberos (it is outside the ticket's encrypted
//! part): this check stops a ticket for another service from being *presented* here, and
//! channel binding (checked after GSSAPI accepted) stops an authentication relayed from another
//! connection; together they refuse a relayed AP-REQ of another protocol.

use std::fmt;

use der_parser::asn1_rs::FromDer;
use kerberos_parser::krb5::ApReq;

use crate::spn::Spn;

/// The krb5 mechanism OID, 1.2.840.113554.1.2.2, as DER content bytes.
const KRB5_OID: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// TOK_ID of an initial context token carrying an AP-REQ (RFC 4121 §4.1).
const TOK_ID_AP_REQ: [u8; 2] = [0x01, 0x00];

/// Why a token is not a Kerberos AP-REQ this acceptor reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// Not a GSS-API initial context token (`[APPLICATION 0]` with a valid length).
    #[error("the first token is not a GSS-API initial context token")]
    NotInitialToken,
    /// A token of another mechanism than Kerberos 5 (SPNEGO, NTLM, ...).
    #[error("the first token is not for the Kerberos 5 mechanism")]
    OtherMechanism,
    /// A Kerberos token that is not an AP-REQ (user-to-user, an error, ...).
    #[error("the first Kerberos token is not an AP-REQ")]
    NotApReq,
    /// The AP-REQ does not decode.
    #[error("the AP-REQ in the first token does not decode")]
    BadApReq,
}

/// The service a ticket was issued for: its name components and realm as the ticket names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketService {
    components: Vec<String>,
    realm: String,
}

impl TicketService {
    /// The service name without the realm (`HOST/hv2.lab.example.test`).
    pub fn name(&self) -> String {
        self.components.join("/")
    }

    /// The realm the ticket names.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Whether this is `spn` in `realm`: exactly two name components, the SPN's class and host
    /// (names and realms compared without case, as AD does; Samba's escaped twin of an SPN with
    /// spaces counts as the SPN).
    pub fn is(&self, spn: &Spn, realm: &str) -> bool {
        match self.components.as_slice() {
            [class, host] if !class.contains('/') && !host.contains('/') => {
                self.realm.eq_ignore_ascii_case(realm) && spn.matches_value(&self.name())
            }
            _ => false,
        }
    }
}

impl fmt::Display for TicketService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name(), self.realm)
    }
}

/// A DER length (definite form, at most 4 length bytes) and the bytes after it.
fn der_length(input: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first < 0x80 {
        return Some((usize::from(first), rest));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let (bytes, rest) = rest.split_at_checked(n)?;
    let len = bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((len, rest))
}

/// The service of the ticket in a client's first token (see the module doc).
pub fn ticket_service(token: &[u8]) -> Result<TicketService, TicketError> {
    let (&tag, rest) = token.split_first().ok_or(TicketError::NotInitialToken)?;
    if tag != 0x60 {
        return Err(TicketError::NotInitialToken);
    }
    let (len, rest) = der_length(rest).ok_or(TicketError::NotInitialToken)?;
    if len != rest.len() {
        return Err(TicketError::NotInitialToken);
    }
    let (&oid_tag, rest) = rest.split_first().ok_or(TicketError::NotInitialToken)?;
    if oid_tag != 0x06 {
        return Err(TicketError::NotInitialToken);
    }
    let (oid_len, rest) = der_length(rest).ok_or(TicketError::NotInitialToken)?;
    let (oid, rest) = rest
        .split_at_checked(oid_len)
        .ok_or(TicketError::NotInitialToken)?;
    if oid != KRB5_OID {
        return Err(TicketError::OtherMechanism);
    }
    let (tok_id, ap_req) = rest.split_at_checked(2).ok_or(TicketError::NotApReq)?;
    if tok_id != TOK_ID_AP_REQ {
        return Err(TicketError::NotApReq);
    }
    let (_, req) = ApReq::from_der(ap_req).map_err(|_| TicketError::BadApReq)?;
    Ok(TicketService {
        components: req.ticket.sname.name_string,
        realm: req.ticket.realm.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER TLV.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = content.len();
        if n < 0x80 {
            out.push(u8::try_from(n).unwrap());
        } else {
            let bytes = u32::try_from(n).unwrap().to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | u8::try_from(4 - skip).unwrap());
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    fn int(v: u8) -> Vec<u8> {
        tlv(0x02, &[v])
    }

    fn gstr(s: &str) -> Vec<u8> {
        tlv(0x1b, s.as_bytes())
    }

    fn ctx(n: u8, content: &[u8]) -> Vec<u8> {
        tlv(0xa0 | n, content)
    }

    /// An AP-REQ for `sname` in `realm` (ticket and authenticator ciphertexts are filler).
    fn ap_req(sname: &[&str], realm: &str) -> Vec<u8> {
        let names: Vec<u8> = sname.iter().flat_map(|s| gstr(s)).collect();
        let principal = tlv(
            0x30,
            &[ctx(0, &int(2)), ctx(1, &tlv(0x30, &names))].concat(),
        );
        let enc = tlv(
            0x30,
            &[ctx(0, &int(18)), ctx(2, &tlv(0x04, &[0xab; 200]))].concat(),
        );
        let ticket = tlv(
            0x61,
            &tlv(
                0x30,
                &[
                    ctx(0, &int(5)),
                    ctx(1, &gstr(realm)),
                    ctx(2, &principal),
                    ctx(3, &enc),
                ]
                .concat(),
            ),
        );
        let options = tlv(0x03, &[0, 0x20, 0, 0, 0]);
        tlv(
            0x6e,
            &tlv(
                0x30,
                &[
                    ctx(0, &int(5)),
                    ctx(1, &int(14)),
                    ctx(2, &options),
                    ctx(3, &ticket),
                    ctx(4, &enc),
                ]
                .concat(),
            ),
        )
    }

    fn framed(oid: &[u8], tok_id: [u8; 2], inner: &[u8]) -> Vec<u8> {
        tlv(
            0x60,
            &[tlv(0x06, oid), tok_id.to_vec(), inner.to_vec()].concat(),
        )
    }

    const CLASS: &str = "Microsoft Virtual System Migration Service";

    #[test]
    fn reads_the_service_of_an_initial_token() {
        let t = framed(
            &KRB5_OID,
            TOK_ID_AP_REQ,
            &ap_req(&[CLASS, "hv2.lab.example.test"], "LAB.EXAMPLE.TEST"),
        );
        let s = ticket_service(&t).unwrap();
        assert_eq!(s.name(), format!("{CLASS}/hv2.lab.example.test"));
        assert_eq!(s.realm(), "LAB.EXAMPLE.TEST");
        let spn = Spn::new(CLASS, "HV2.lab.example.test").unwrap();
        assert!(s.is(&spn, "lab.example.test"));
        assert!(!s.is(&spn, "OTHER.REALM"));
        assert!(!s.is(&Spn::new(CLASS, "hv2").unwrap(), "LAB.EXAMPLE.TEST"));
        let host = ticket_service(&framed(
            &KRB5_OID,
            TOK_ID_AP_REQ,
            &ap_req(&["HOST", "hv2.lab.example.test"], "LAB.EXAMPLE.TEST"),
        ))
        .unwrap();
        assert_eq!(
            host.to_string(),
            "HOST/hv2.lab.example.test@LAB.EXAMPLE.TEST"
        );
        assert!(!host.is(&spn, "LAB.EXAMPLE.TEST"));
        // One component holding the whole SPN, or three components, is not the SPN.
        let one = ticket_service(&framed(
            &KRB5_OID,
            TOK_ID_AP_REQ,
            &ap_req(
                &[&format!("{CLASS}/hv2.lab.example.test")],
                "LAB.EXAMPLE.TEST",
            ),
        ))
        .unwrap();
        assert!(!one.is(&spn, "LAB.EXAMPLE.TEST"));
        let three = ticket_service(&framed(
            &KRB5_OID,
            TOK_ID_AP_REQ,
            &ap_req(&[CLASS, "hv2.lab.example.test", "x"], "LAB.EXAMPLE.TEST"),
        ))
        .unwrap();
        assert!(!three.is(&spn, "LAB.EXAMPLE.TEST"));
    }

    #[test]
    fn refuses_what_is_not_a_krb5_ap_req() {
        let req = ap_req(&["HOST", "hv2"], "LAB.EXAMPLE.TEST");
        // A bare AP-REQ, SPNEGO's OID, user-to-user's TOK_ID, a wrong outer length.
        assert_eq!(ticket_service(&req), Err(TicketError::NotInitialToken));
        let spnego = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
        assert_eq!(
            ticket_service(&framed(&spnego, TOK_ID_AP_REQ, &req)),
            Err(TicketError::OtherMechanism)
        );
        assert_eq!(
            ticket_service(&framed(&KRB5_OID, [0x04, 0x04], &req)),
            Err(TicketError::NotApReq)
        );
        let mut long = framed(&KRB5_OID, TOK_ID_AP_REQ, &req);
        long.push(0);
        assert_eq!(ticket_service(&long), Err(TicketError::NotInitialToken));
        assert_eq!(
            ticket_service(&framed(&KRB5_OID, TOK_ID_AP_REQ, &[0x6e, 0x03, 1, 2, 3])),
            Err(TicketError::BadApReq)
        );
    }

    #[test]
    fn never_panics_on_truncated_or_garbled_tokens() {
        let good = framed(
            &KRB5_OID,
            TOK_ID_AP_REQ,
            &ap_req(&[CLASS, "hv2"], "LAB.EXAMPLE.TEST"),
        );
        for cut in 0..good.len() {
            assert!(ticket_service(&good[..cut]).is_err());
        }
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut t = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = usize::try_from(x).unwrap() % t.len();
                t[i] = t[i].wrapping_add(u8::try_from(x >> 24).unwrap() | 1);
            }
            let _ = ticket_service(&t);
        }
        assert!(ticket_service(&[]).is_err());
        assert!(ticket_service(&[0x60, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
