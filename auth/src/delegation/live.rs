//! `check --live`: ask the KDC for real what the prediction says it will answer.
//!
//! With the source host's keytab, vmgate does what the source does in the move being checked,
//! for each of the destination's migration SPNs (FQDN form first):
//!
//! | how the move starts | what is done |
//! |---|---|
//! | remotely, without a ticket from the user | S4U2Self for the user with S's keytab, then S4U2Proxy to the SPN |
//! | remotely, with the user's Kerberos ticket | the user's ticket (from `--user-ccache`) is presented to S and accepted with S's keytab, which yields the S4U2Proxy evidence; then S4U2Proxy to the SPN |
//! | the user forwards a TGT (CredSSP) | the user's TGT is forwarded to S; S asks for the SPN with it |
//! | on S itself | the user's own ticket (or, without one, S's) is asked for the SPN: only the SPN's registration is tested |
//!
//! With `--target-keytab` the ticket obtained is then accepted with D's keytab, which shows
//! whether D can decrypt it (an SPN registered on the wrong account). The answers are put next
//! to the prediction ([`super::Verdict::expected_kdc`]) and compared.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::analysis::{KdcAnswer, Verdict};
use super::facts::{AuthType, MoveStart};
use crate::directory::ErrorKind;
use crate::krb::error::code;
use crate::krb::keytab;
use crate::krb::{
    AcceptPending, AcceptStep, AcceptedServices, Credential, HostCredentials, InitOptions,
    InitPending, InitStep, KrbError, Principal, UserCredential,
};
use crate::spn::Spn;

/// The channel bindings both ends of the check use (there is no TLS session to bind to here).
const CHECK_BINDINGS: &[u8] = b"vmgate delegation check --live";

/// Errors that keep the live check from running at all (as opposed to a refusal by the KDC,
/// which is its result).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// `--live` without the source host's keytab.
    #[error("--live needs the source host's keytab (--keytab FILE)")]
    NeedsKeytab,
    /// The check is about a user, and none was named.
    #[error("--live needs the user the move is started as (--user)")]
    NeedsUser,
    /// The path being checked starts from the user's own ticket.
    #[error(
        "the move being checked starts with {user}'s own Kerberos ticket; --live needs it: kinit \
         {user} and pass the cache with --user-ccache"
    )]
    NeedsUserCcache {
        /// The user.
        user: String,
    },
    /// The keytab cannot be read.
    #[error("cannot read the keytab {}", path.display())]
    ReadKeytab {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The keytab is not an MIT keytab (version 0x502) or is damaged.
    #[error("{} is not a usable keytab: {reason}", path.display())]
    BadKeytab {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The keytab has no key for the host account.
    #[error("the keytab {} holds no key for {account} (it has: {})", path.display(), found.join(", "))]
    NoKeyFor {
        /// The file.
        path: PathBuf,
        /// The account looked for.
        account: String,
        /// The principals it holds.
        found: Vec<String>,
    },
    /// The user's credential cache holds someone else's tickets.
    #[error("the credential cache {ccache} holds tickets for {found}, not for {expected}")]
    WrongUserCcache {
        /// The cache.
        ccache: String,
        /// The user of the check.
        expected: String,
        /// Whose tickets it holds.
        found: String,
    },
    /// A Kerberos step failed for a reason that is not an answer to the check (no KDC, bad
    /// credentials cache, ...).
    #[error("the live check could not {step}")]
    Kerberos {
        /// What it was doing.
        step: &'static str,
        /// GSSAPI's error.
        #[source]
        source: KrbError,
    },
}

impl LiveError {
    /// The kind of failure, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LiveError::NeedsKeytab
            | LiveError::NeedsUser
            | LiveError::NeedsUserCcache { .. }
            | LiveError::BadKeytab { .. }
            | LiveError::WrongUserCcache { .. } => ErrorKind::Usage,
            LiveError::ReadKeytab { .. } | LiveError::NoKeyFor { .. } => ErrorKind::NotFound,
            LiveError::Kerberos { source, .. } => match source.status().map(|s| s.krb5_code()) {
                Some(code::KDC_UNREACH | code::REALM_CANT_RESOLVE | code::REALM_UNKNOWN) => {
                    ErrorKind::Unreachable
                }
                _ => ErrorKind::Denied,
            },
        }
    }
}

/// Which exchange the live check performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LivePath {
    /// S4U2Self, then S4U2Proxy.
    ProtocolTransition,
    /// The user's service ticket to S as evidence, then S4U2Proxy.
    Evidence,
    /// The user's TGT forwarded to S.
    ForwardedTgt,
    /// The user's own ticket (a move started on S).
    OwnTicket,
    /// S's own ticket (registration only).
    HostTicket,
}

impl LivePath {
    /// A sentence naming the exchange.
    pub const fn describe(self) -> &'static str {
        match self {
            LivePath::ProtocolTransition => "S4U2Self, then S4U2Proxy",
            LivePath::Evidence => "the user's ticket to the source as evidence, then S4U2Proxy",
            LivePath::ForwardedTgt => "the user's TGT forwarded to the source",
            LivePath::OwnTicket => "the user's own ticket",
            LivePath::HostTicket => "the source's own ticket (SPN registration only)",
        }
    }
}

/// What the live check needs.
#[derive(Clone, Debug)]
pub struct LiveRequest {
    /// Kerberos realm.
    pub realm: String,
    /// S's keytab.
    pub keytab: PathBuf,
    /// S's account (`HV1$`).
    pub source_account: String,
    /// An SPN of S in its keytab, for presenting the user's ticket (`HOST/hv1.lab.example.test`).
    pub source_spn: Spn,
    /// D's keytab, to check that D can decrypt the ticket (optional).
    pub target_keytab: Option<PathBuf>,
    /// D's account (`HV2$`).
    pub target_account: String,
    /// D's migration SPNs to ask for, FQDN form first.
    pub spns: Vec<Spn>,
    /// The user (sAMAccountName), if the check is about one.
    pub user: Option<String>,
    /// The user's credential cache (kinit), for the paths that start from the user's ticket.
    pub user_ccache: Option<String>,
    /// How the move starts.
    pub start: MoveStart,
    /// The auth type.
    pub auth: AuthType,
    /// A private folder for the per-operation credential caches.
    pub ccache_dir: PathBuf,
}

/// A fresh private folder name for a live check's credential caches (`<tmp>/<tool>-<pid>-<ns>`):
/// for [`LiveRequest::ccache_dir`].
pub fn scratch_ccache_dir(tool: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "{tool}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ))
}

/// The KDC's answer for one SPN, next to the prediction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveOutcome {
    /// The SPN asked for.
    pub spn: String,
    /// What the prediction said.
    pub predicted: KdcAnswer,
    /// What happened.
    pub actual: KdcAnswer,
    /// Whether they mean the same.
    pub agrees: bool,
    /// GSSAPI's message for a refusal.
    pub detail: Option<String>,
}

/// The result of the live check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveReport {
    /// The exchange performed.
    pub path: LivePath,
    /// One outcome per SPN.
    pub outcomes: Vec<LiveOutcome>,
    /// Whether every outcome agrees with the prediction.
    pub agrees: bool,
    /// Whether the KDC gave a usable ticket for every SPN.
    pub ok: bool,
}

/// The answer a Kerberos error stands for, or `None` when the error is not an answer to the
/// check (no KDC, a keytab or cache problem).
pub fn answer_of(err: &KrbError) -> Option<(KdcAnswer, String)> {
    let status = err.status()?;
    let answer = match status.krb5_code() {
        code::KDC_ERR_BADOPTION => KdcAnswer::BadOption,
        code::KDC_ERR_S_PRINCIPAL_UNKNOWN => KdcAnswer::PrincipalUnknown,
        code::KDC_ERR_PRINCIPAL_NOT_UNIQUE => KdcAnswer::NotUnique,
        code::KDC_ERR_CLIENT_REVOKED => KdcAnswer::ClientRevoked,
        code::KDC_ERR_C_PRINCIPAL_UNKNOWN
        | code::KDC_ERR_POLICY
        | code::KDC_ERR_ETYPE_NOSUPP
        | code::KDC_ERR_SERVICE_REVOKED
        | code::KDC_ERR_TGT_REVOKED => {
            KdcAnswer::Other(status.krb5_name().unwrap_or("KDC error").to_owned())
        }
        code::KDC_UNREACH
        | code::REALM_CANT_RESOLVE
        | code::REALM_UNKNOWN
        | code::KT_NOTFOUND
        | code::KT_KVNONOTFOUND
        | code::FCC_NOFILE
        | code::CC_NOTFOUND
        | code::NOCREDS_SUPPLIED
        | code::KDCREP_SKEW
        | code::KRB_AP_ERR_SKEW => return None,
        _ => match status.krb5_name() {
            Some(name) => KdcAnswer::Other(name.to_owned()),
            None => return None,
        },
    };
    Some((answer, status.message.clone()))
}

/// The principals in an MIT keytab (format version 0x502), each once, in file order.
pub fn keytab_principals(bytes: &[u8]) -> Result<Vec<String>, String> {
    keytab::parse(bytes)
        .map(|e| unique_principals(&e))
        .map_err(str::to_owned)
}

fn unique_principals(entries: &[keytab::KeytabEntry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries {
        let name = format!("{}@{}", e.name, e.realm);
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The principal of `account` as the keytab spells it (MIT compares names case-sensitively;
/// keytabs made by different tools write `hv1$` or `HV1$`).
pub fn keytab_principal(keytab: &Path, account: &str, realm: &str) -> Result<Principal, LiveError> {
    let entries = keytab::read(keytab).map_err(|e| match e {
        keytab::KeytabError::Read { path, source } => LiveError::ReadKeytab { path, source },
        keytab::KeytabError::Bad { path, reason } => LiveError::BadKeytab {
            path,
            reason: reason.to_owned(),
        },
    })?;
    let found = unique_principals(&entries);
    let wanted = format!("{account}@{realm}");
    let exact = found.iter().find(|p| p.eq_ignore_ascii_case(&wanted));
    match exact {
        Some(p) => Principal::parse(p, None).map_err(|source| LiveError::Kerberos {
            step: "read the keytab's principal",
            source,
        }),
        None => Err(LiveError::NoKeyFor {
            path: keytab.to_owned(),
            account: wanted,
            found,
        }),
    }
}

fn krb(step: &'static str) -> impl FnOnce(KrbError) -> LiveError {
    move |source| LiveError::Kerberos { step, source }
}

/// Runs an initiator to completion against an acceptor in this process; returns the
/// acceptor's result.
fn handshake(
    init: &Credential,
    target: &Spn,
    realm: &str,
    acceptor: &Credential,
    options: InitOptions,
) -> Result<crate::krb::Accepted, KrbError> {
    let mut pending = InitPending::new(init, target, realm, CHECK_BINDINGS.to_vec(), options)?;
    let services = AcceptedServices::new(vec![target.clone()], realm);
    let mut accept = AcceptPending::new(acceptor, CHECK_BINDINGS.to_vec(), &services);
    let mut input: Option<Vec<u8>> = None;
    loop {
        let token = match pending.step(input.as_deref())? {
            InitStep::Continue(next, token) => {
                pending = next;
                token
            }
            InitStep::Established(_, _) => return Err(KrbError::TooManySteps(0)),
        };
        match accept.step(&token)? {
            AcceptStep::Continue(next, reply) => {
                accept = next;
                input = Some(reply);
            }
            AcceptStep::Established(accepted, reply) => {
                if let Some(reply) = reply {
                    // Finish the initiator so that mutual authentication is checked too.
                    match pending.step(Some(&reply))? {
                        InitStep::Established(..) => {}
                        InitStep::Continue(..) => return Err(KrbError::TooManySteps(0)),
                    }
                }
                return Ok(accepted);
            }
        }
    }
}

/// Asks for `spn` with `cred` (S4U2Proxy when `cred` is evidence or impersonated), then, with
/// a target acceptor, checks that the target can decrypt the ticket.
fn ask(
    cred: &Credential,
    spn: &Spn,
    realm: &str,
    target: Option<&Credential>,
    expected_client: Option<&str>,
) -> (KdcAnswer, Option<String>) {
    let pending = match InitPending::new(
        cred,
        spn,
        realm,
        CHECK_BINDINGS.to_vec(),
        InitOptions::default(),
    ) {
        Ok(p) => p,
        Err(e) => return refusal(&e),
    };
    let token = match pending.step(None) {
        Ok(InitStep::Continue(_, token)) | Ok(InitStep::Established(_, Some(token))) => token,
        Ok(InitStep::Established(_, None)) => return (KdcAnswer::Ticket, None),
        Err(e) => return refusal(&e),
    };
    let Some(target) = target else {
        return (KdcAnswer::Ticket, None);
    };
    let services = AcceptedServices::new(vec![spn.clone()], realm);
    match AcceptPending::new(target, CHECK_BINDINGS.to_vec(), &services).step(&token) {
        Ok(AcceptStep::Established(accepted, _)) => {
            let client = accepted.client().name().to_owned();
            match expected_client {
                Some(user) if !client.eq_ignore_ascii_case(user) => (
                    KdcAnswer::Other("wrong-client".to_owned()),
                    Some(format!("the destination saw {client}, not {user}")),
                ),
                _ => (KdcAnswer::Ticket, None),
            }
        }
        Ok(AcceptStep::Continue(..)) => (KdcAnswer::Ticket, None),
        Err(e) => (
            KdcAnswer::WrongPrincipal,
            Some(
                e.status()
                    .map_or_else(|| e.to_string(), |s| s.message.clone()),
            ),
        ),
    }
}

fn refusal(e: &KrbError) -> (KdcAnswer, Option<String>) {
    match answer_of(e) {
        Some((answer, message)) => (answer, Some(message)),
        None => (KdcAnswer::Other(e.to_string()), Some(e.to_string())),
    }
}

/// Runs the live check for `req` and compares with `verdict`'s prediction.
pub fn run(req: &LiveRequest, verdict: &Verdict) -> Result<LiveReport, LiveError> {
    let host_principal = keytab_principal(&req.keytab, &req.source_account, &req.realm)?;
    let host = HostCredentials::new(&req.keytab, host_principal, &req.ccache_dir)
        .map_err(krb("prepare the source's credentials"))?;
    let target_cred = match &req.target_keytab {
        Some(kt) => {
            let p = keytab_principal(kt, &req.target_account, &req.realm)?;
            let t = HostCredentials::new(kt, p, &req.ccache_dir)
                .map_err(krb("prepare the destination's credentials"))?;
            Some(t.acceptor().map_err(krb("read the destination's keytab"))?)
        }
        None => None,
    };
    let target = target_cred.as_ref().map(|(c, _)| c);
    let user_principal = match &req.user {
        Some(u) => Some(
            Principal::parse(u, Some(&req.realm)).map_err(krb("name the user as a principal"))?,
        ),
        None => None,
    };
    let user_name = user_principal.as_ref().map(|p| p.name().to_owned());
    let need_ccache = |user: &Option<String>| -> Result<Credential, LiveError> {
        let (Some(ccache), Some(u)) = (&req.user_ccache, user) else {
            return Err(match user {
                Some(u) => LiveError::NeedsUserCcache { user: u.clone() },
                None => LiveError::NeedsUser,
            });
        };
        let cred =
            UserCredential::from_ccache(ccache).map_err(krb("read the user's credential cache"))?;
        if let Some(found) = cred.user() {
            if !found.name().eq_ignore_ascii_case(u) {
                return Err(LiveError::WrongUserCcache {
                    ccache: ccache.clone(),
                    expected: u.clone(),
                    found: found.as_str().to_owned(),
                });
            }
        }
        Ok(cred)
    };

    // The credential S would ask with, or one answer for every SPN when getting it failed.
    let mut keep = Vec::new();
    let (path, cred): (LivePath, Result<Credential, (KdcAnswer, Option<String>)>) =
        match (req.auth, req.start) {
            (AuthType::Kerberos, MoveStart::RemoteWithoutTicket) => {
                let user = user_principal.as_ref().ok_or(LiveError::NeedsUser)?;
                let cred = match host.impersonate(user) {
                    Ok((cred, cc)) => {
                        keep.push(cc);
                        Ok(cred)
                    }
                    Err(e) => match answer_of(&e) {
                        Some((a, m)) => Err((a, Some(m))),
                        None => return Err(krb("get a ticket for the user (S4U2Self)")(e)),
                    },
                };
                (LivePath::ProtocolTransition, cred)
            }
            (AuthType::Kerberos, MoveStart::RemoteWithTicket) => {
                let user_cred = need_ccache(&req.user)?;
                let (acceptor, cc) = host.acceptor().map_err(krb("read the source's keytab"))?;
                keep.push(cc);
                let cred = match handshake(
                    &user_cred,
                    &req.source_spn,
                    &req.realm,
                    &acceptor,
                    InitOptions::default(),
                ) {
                    Ok(mut accepted) => match accepted.take_delegated() {
                        Some(evidence) => Ok(evidence),
                        None => Err((
                            KdcAnswer::NotForwardable,
                            Some(format!(
                                "{}'s ticket to {} is not forwardable",
                                user_name.as_deref().unwrap_or("the user"),
                                req.source_spn
                            )),
                        )),
                    },
                    Err(e) => match answer_of(&e) {
                        Some((a, m)) => Err((a, Some(m))),
                        None => return Err(krb("present the user's ticket to the source")(e)),
                    },
                };
                (LivePath::Evidence, cred)
            }
            (_, MoveStart::RemoteForwardingCredentials) => {
                let user_cred = need_ccache(&req.user)?;
                let (acceptor, cc) = host.acceptor().map_err(krb("read the source's keytab"))?;
                keep.push(cc);
                let cred = match handshake(
                    &user_cred,
                    &req.source_spn,
                    &req.realm,
                    &acceptor,
                    InitOptions { forward_tgt: true },
                ) {
                    Ok(mut accepted) if accepted.tgt_forwarded() => match accepted.take_delegated()
                    {
                        Some(tgt) => Ok(tgt),
                        None => Err((KdcAnswer::NotForwardable, None)),
                    },
                    Ok(_) => Err((
                        KdcAnswer::NotForwardable,
                        Some("the user's TGT is not forwardable".to_owned()),
                    )),
                    Err(e) => match answer_of(&e) {
                        Some((a, m)) => Err((a, Some(m))),
                        None => return Err(krb("forward the user's TGT to the source")(e)),
                    },
                };
                (LivePath::ForwardedTgt, cred)
            }
            _ => match (&req.user_ccache, &req.user) {
                (Some(_), Some(_)) => (LivePath::OwnTicket, Ok(need_ccache(&req.user)?)),
                _ => {
                    let (cred, cc) = host.initiator().map_err(krb("read the source's keytab"))?;
                    keep.push(cc);
                    (LivePath::HostTicket, Ok(cred))
                }
            },
        };

    let expected_client = match path {
        LivePath::HostTicket => None,
        _ => user_name.as_deref(),
    };
    let mut outcomes = Vec::new();
    for spn in &req.spns {
        let (actual, detail) = match &cred {
            Ok(c) => ask(c, spn, &req.realm, target, expected_client),
            Err((a, m)) => (a.clone(), m.clone()),
        };
        let predicted = predicted_for(verdict, spn, target.is_some());
        outcomes.push(LiveOutcome {
            spn: spn.to_string(),
            agrees: predicted.agrees_with(&actual),
            predicted,
            actual,
            detail,
        });
    }
    drop(keep);
    Ok(LiveReport {
        path,
        agrees: outcomes.iter().all(|o| o.agrees),
        ok: outcomes.iter().all(|o| o.actual == KdcAnswer::Ticket),
        outcomes,
    })
}

/// The prediction for `spn`; without D's keytab a ticket for the wrong account is just a
/// ticket (nothing decrypts it).
pub fn predicted_for(verdict: &Verdict, spn: &Spn, with_target_key: bool) -> KdcAnswer {
    let answer = verdict
        .expected_kdc()
        .iter()
        .find(|(s, _)| spn.matches_value(s))
        .map_or(KdcAnswer::PrincipalUnknown, |(_, a)| a.clone());
    if !with_target_key && answer == KdcAnswer::WrongPrincipal {
        KdcAnswer::Ticket
    } else {
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(comps: &[&str], realm: &str) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&u16::try_from(comps.len()).unwrap().to_be_bytes());
        e.extend_from_slice(&u16::try_from(realm.len()).unwrap().to_be_bytes());
        e.extend_from_slice(realm.as_bytes());
        for c in comps {
            e.extend_from_slice(&u16::try_from(c.len()).unwrap().to_be_bytes());
            e.extend_from_slice(c.as_bytes());
        }
        // name type, timestamp, vno8, keyblock (type 18, 32 bytes), vno32.
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.push(1);
        e.extend_from_slice(&18u16.to_be_bytes());
        e.extend_from_slice(&32u16.to_be_bytes());
        e.extend_from_slice(&[7; 32]);
        e.extend_from_slice(&1u32.to_be_bytes());
        let mut out = i32::try_from(e.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(&e);
        out
    }

    #[test]
    fn reads_keytab_principals() {
        let mut kt = vec![0x05, 0x02];
        kt.extend(entry(&["hv1$"], "LAB.EXAMPLE.TEST"));
        kt.extend(entry(&["hv1$"], "LAB.EXAMPLE.TEST"));
        // A hole of 6 bytes.
        kt.extend_from_slice(&(-6i32).to_be_bytes());
        kt.extend_from_slice(&[0; 6]);
        kt.extend(entry(&["HOST", "hv1.lab.example.test"], "LAB.EXAMPLE.TEST"));
        assert_eq!(
            keytab_principals(&kt).unwrap(),
            vec![
                "hv1$@LAB.EXAMPLE.TEST",
                "HOST/hv1.lab.example.test@LAB.EXAMPLE.TEST"
            ]
        );
    }

    #[test]
    fn damaged_keytabs_are_errors_not_panics() {
        let mut kt = vec![0x05, 0x02];
        kt.extend(entry(&["hv1$"], "LAB.EXAMPLE.TEST"));
        for n in 0..kt.len() {
            let _ = keytab_principals(&kt[..n]);
        }
        assert!(keytab_principals(&[]).is_err());
        assert!(keytab_principals(&[0x05, 0x01]).is_err());
        let mut bad = kt.clone();
        bad[2..6].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(keytab_principals(&bad).is_err());
        let mut bad = kt.clone();
        bad[6..8].copy_from_slice(&0u16.to_be_bytes());
        assert!(keytab_principals(&bad).is_err());
        let mut bad = kt;
        bad[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(keytab_principals(&bad).is_err());
    }
}
