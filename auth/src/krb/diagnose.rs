//! From a GSSAPI / Kerberos failure to a Windows code, a cause in this deployment's terms
//! (accounts, SPNs, hosts) and the command that fixes it.
//!
//! The codes alone are ambiguous — every refused delegation is `KDC_ERR_BADOPTION` — so the
//! caller passes what it knows ([`AuthFacts`]): what it was doing, the hosts and accounts, and
//! for delegation the directory facts (or a verdict from the delegation analysis, which then
//! wins). Pure function; unit-tested without a KDC.

use crate::delegation::AuthType;
use crate::spn::Spn;
use crate::winerr::{Diagnosis, WinCode};

use super::Principal;
use super::error::{KrbError, KrbOp, code, routine};

/// What the failing side was doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Act {
    /// A client authenticating with its own tickets (a user or a host).
    #[default]
    Connect,
    /// A host accepting a client.
    Accept,
    /// A host acting for a user with the user's forwarded TGT.
    ForwardedTgt,
    /// A host acting for a user with the user's service ticket as evidence (S4U2Proxy).
    ConstrainedDelegation,
    /// A host acting for a user with S4U2Self + S4U2Proxy.
    ProtocolTransition,
    /// A host reading its own keytab.
    HostCredentials,
}

/// Facts about the failing operation that the codes do not carry.
#[derive(Clone, Debug, Default)]
pub struct AuthFacts {
    /// What was being done.
    pub act: Act,
    /// The host where the failure happened (`hv1`).
    pub local_host: Option<String>,
    /// Its account (`HV1$`).
    pub local_account: Option<String>,
    /// The other host (`hv2`).
    pub peer_host: Option<String>,
    /// The SPN asked for (initiating) or served (accepting).
    pub target_spn: Option<Spn>,
    /// The user involved.
    pub user: Option<Principal>,
    /// The realm.
    pub realm: Option<String>,
    /// The credential cache used.
    pub ccache: Option<String>,
    /// The keytab used.
    pub keytab: Option<String>,
    /// The host's auth type (when acting for a user).
    pub auth_type: Option<AuthType>,
    /// The user's account is "sensitive and cannot be delegated" (NOT_DELEGATED, read from
    /// the directory).
    pub user_not_delegable: Option<bool>,
    /// The user's ticket to this host is forwardable (seen in the evidence credential).
    pub ticket_forwardable: Option<bool>,
    /// msDS-AllowedToDelegateTo of the local account, if read.
    pub allowed_to_delegate_to: Option<Vec<String>>,
    /// TRUSTED_TO_AUTH_FOR_DELEGATION on the local account, if read.
    pub trusted_to_auth: Option<bool>,
    /// A diagnosis from the delegation analysis; used for refused delegations when present.
    pub delegation_verdict: Option<Diagnosis>,
}

fn short_host(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

/// `setspn` takes the account name without `$`, upper-case as AD shows computer accounts.
fn account_for_host(host: &str) -> String {
    short_host(host).to_uppercase()
}

/// Quotes an argument for a POSIX shell when it needs it.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@:=+,$".contains(c))
    {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

impl AuthFacts {
    fn local(&self) -> &str {
        self.local_host.as_deref().unwrap_or("this host")
    }

    fn local_account(&self) -> String {
        match (&self.local_account, &self.local_host) {
            (Some(a), _) => a.clone(),
            (None, Some(h)) => format!("{}$", account_for_host(h)),
            (None, None) => "this host's account".to_owned(),
        }
    }

    fn peer(&self) -> String {
        match (&self.peer_host, &self.target_spn) {
            (Some(p), _) => p.clone(),
            (None, Some(spn)) => short_host(spn.host()).to_owned(),
            (None, None) => "the other host".to_owned(),
        }
    }

    fn spn(&self) -> String {
        self.target_spn
            .as_ref()
            .map_or_else(|| "the target's SPN".to_owned(), |s| s.to_string())
    }

    fn user(&self) -> String {
        self.user
            .as_ref()
            .map_or_else(|| "the user".to_owned(), |u| u.name().to_owned())
    }

    fn realm(&self) -> String {
        self.realm
            .clone()
            .or_else(|| self.user.as_ref().map(|u| u.realm().to_owned()))
            .unwrap_or_else(|| "the realm".to_owned())
    }

    /// The host whose account must hold the target SPN (`HV2` for `.../hv2.lab...`).
    fn spn_owner(&self) -> String {
        match (&self.target_spn, &self.peer_host) {
            (Some(spn), _) => account_for_host(spn.host()),
            (None, Some(p)) => account_for_host(p),
            (None, None) => "HOST".to_owned(),
        }
    }

    fn on_source_alternative(&self) -> String {
        format!(
            "or start the move on {} itself, where your own ticket is present",
            self.local()
        )
    }
}

/// An accepted context without a verified channel binding (the client sent none).
fn unbound(facts: &AuthFacts) -> Diagnosis {
    Diagnosis::new(
        WinCode::BadBindings,
        format!(
            "the Kerberos authentication that reached {local} from {peer} carried no channel \
             binding to the TLS session it arrived on, so nothing shows it was made for this \
             connection: it may have been captured or relayed from another protocol or \
             connection (an AP-REQ for HOST/ or cifs/, an HTTP Negotiate header); {local} \
             refuses unbound authentication",
            local = facts.local(),
            peer = facts.peer(),
        ),
    )
    .with_fix(format!(
        "connect with vmgate's own client (vmgate, vmgated), which binds its Kerberos \
         authentication to the TLS session (RFC 9266 tls-exporter), directly to {}",
        facts.local()
    ))
}

/// A ticket for another service of the host's account than its migration SPNs.
fn wrong_service(facts: &AuthFacts, requested: &str, accepted: &[String]) -> Diagnosis {
    let list = accepted
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(" or ");
    Diagnosis::new(
        WinCode::WrongPrincipal,
        format!(
            "the client presented a ticket for \"{requested}\", but {} accepts tickets only \
             for its migration service ({}): a ticket for another service of {} (HOST/, cifs/, \
             the account itself) may have been relayed from another protocol, and is refused",
            facts.local(),
            if list.is_empty() {
                "none configured".to_owned()
            } else {
                list
            },
            facts.local_account(),
        ),
    )
    .with_fix(format!(
        "connect to {}'s migration SPN ({}), as vmgate does",
        facts.local(),
        accepted.first().map_or_else(
            || facts.spn(),
            |p| quote(p.rsplit_once('@').map_or(p, |(n, _)| n))
        )
    ))
}

/// The diagnosis of a failure of the krb module.
pub fn diagnose(err: &KrbError, facts: &AuthFacts) -> Diagnosis {
    let status = match err {
        KrbError::Gss { status, .. } => status,
        KrbError::NotMutual => {
            return Diagnosis::new(
                WinCode::InvalidToken,
                format!(
                    "{} did not prove its identity (no mutual authentication): it is not the \
                     vmgate host it claims to be",
                    facts.peer()
                ),
            );
        }
        KrbError::TooManySteps(_) => {
            return Diagnosis::new(
                WinCode::InvalidToken,
                format!(
                    "the Kerberos exchange with {} did not finish: the peer is not a vmgate \
                     host or misbehaved",
                    facts.peer()
                ),
            );
        }
        KrbError::BadString(_) | KrbError::BadPrincipal(_) | KrbError::CcacheDir { .. } => {
            return Diagnosis::new(WinCode::UnknownCredentials, err.to_string());
        }
        KrbError::Unbound => return unbound(facts),
        KrbError::WrongService {
            requested,
            accepted,
        } => return wrong_service(facts, requested, accepted),
        KrbError::BadToken(why) => {
            return Diagnosis::new(
                WinCode::InvalidToken,
                format!(
                    "{why}: {} accepts only Kerberos 5 (an AP-REQ for its migration SPN) from a \
                     vmgate client",
                    facts.local()
                ),
            );
        }
    };
    let op = err.op().unwrap_or(KrbOp::Initiate);
    let kerberos_said = format!("(Kerberos: {status})");
    let c = status.krb5_code();
    let with_detail = |d: Diagnosis| -> Diagnosis {
        let cause = format!("{}\n{kerberos_said}", d.cause);
        Diagnosis { cause, ..d }
    };

    if status.routine() == routine::BAD_BINDINGS {
        return with_detail(
            Diagnosis::new(
                WinCode::BadBindings,
                format!(
                    "the Kerberos authentication that reached {} was made for a different TLS \
                     session: something between {} and {} terminated TLS and relayed the \
                     authentication (a man in the middle); the connection was refused",
                    facts.local(),
                    facts.peer(),
                    facts.local()
                ),
            )
            .with_fix(format!(
                "connect to {} directly: remove any TLS-terminating proxy or load balancer \
                 from the path",
                facts.local()
            )),
        );
    }

    let d = match c {
        code::KDC_ERR_S_PRINCIPAL_UNKNOWN => {
            let spn = facts.spn();
            Diagnosis::new(
                WinCode::TargetUnknown,
                format!(
                    "the SPN \"{spn}\" is not registered on any account in {}: the KDC does \
                     not know the service (KDC_ERR_S_PRINCIPAL_UNKNOWN), so {} cannot get a \
                     ticket for {}",
                    facts.realm(),
                    match facts.act {
                        Act::Connect => facts.user(),
                        _ => facts.local().to_owned(),
                    },
                    facts.peer()
                ),
            )
            .with_fix(format!("setspn -S {} {}", quote(&spn), facts.spn_owner()))
        }
        code::KDC_UNREACH | code::REALM_CANT_RESOLVE | code::REALM_UNKNOWN => Diagnosis::new(
            WinCode::NoAuthenticatingAuthority,
            format!(
                "{} could not reach any KDC (domain controller) of {}: none answered on port \
                 88 at the addresses krb5.conf gives for the realm",
                facts.local(),
                facts.realm()
            ),
        )
        .with_fix(format!(
            "start the domain controller or fix the \"kdc =\" line of [realms] {} in krb5.conf \
             (KRB5_CONFIG); check with: kinit -V {}",
            facts.realm(),
            facts
                .user
                .as_ref()
                .map_or_else(|| "USER".to_owned(), |u| u.to_string())
        )),
        code::KRB_AP_ERR_SKEW | code::KDCREP_SKEW => Diagnosis::new(
            WinCode::TimeSkew,
            format!(
                "the clock of {} differs from the clock of {} by more than the 5 minutes \
                 Kerberos allows",
                facts.local(),
                match c {
                    code::KDCREP_SKEW => "the domain controller".to_owned(),
                    _ if op == KrbOp::Accept => facts.peer(),
                    _ => "the domain controller".to_owned(),
                }
            ),
        )
        .with_fix(format!(
            "synchronise the clocks with the domain controller: on {} run \
             `chronyc makestep` (or `timedatectl set-ntp true`)",
            facts.local()
        )),
        code::KDC_ERR_BADOPTION | code::KDC_ERR_POLICY
            if matches!(
                facts.act,
                Act::ConstrainedDelegation | Act::ProtocolTransition
            ) =>
        {
            delegation_refused(facts)
        }
        code::KDC_ERR_BADOPTION => Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "the KDC refused an option {} asked for (KDC_ERR_BADOPTION): usually a \
                 forwardable or delegated ticket for {} whose account is \"sensitive and \
                 cannot be delegated\"",
                facts.local(),
                facts.user()
            ),
        ),
        code::KDC_ERR_PREAUTH_FAILED
        | code::PREAUTH_FAILED
        | code::KDC_ERR_CLIENT_REVOKED
        | code::KDC_ERR_KEY_EXP
        | code::KDC_ERR_C_PRINCIPAL_UNKNOWN => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused the logon of {}: {}",
                facts.user(),
                match c {
                    code::KDC_ERR_CLIENT_REVOKED => "the account is disabled or locked out",
                    code::KDC_ERR_KEY_EXP => "the password has expired",
                    code::KDC_ERR_C_PRINCIPAL_UNKNOWN => "the account does not exist",
                    _ => "wrong password (or the keytab holds an old key)",
                }
            ),
        )
        .with_fix(format!(
            "kinit {} with the right password; an administrator can enable or unlock the \
             account: samba-tool user enable {} (Windows: Unlock-ADAccount / Enable-ADAccount)",
            facts
                .user
                .as_ref()
                .map_or_else(|| "USER@REALM".to_owned(), |u| u.to_string()),
            quote(&facts.user())
        )),
        _ if facts.act == Act::HostCredentials => host_keytab_unusable(facts),
        code::KT_NOTFOUND | code::KRB_AP_ERR_NOKEY | code::KRB_AP_ERR_NOT_US
            if op == KrbOp::Accept =>
        {
            let spn = facts.spn();
            Diagnosis::new(
                WinCode::UnknownCredentials,
                format!(
                    "{}'s keytab{} has no key for the SPN the client asked for (\"{spn}\"): the \
                     keytab is not {}'s own, or was exported before the SPN was registered on {}",
                    facts.local(),
                    facts
                        .keytab
                        .as_ref()
                        .map(|k| format!(" ({k})"))
                        .unwrap_or_default(),
                    facts.local(),
                    facts.local_account()
                ),
            )
            .with_fix(format!(
                "setspn -Q {q}   (must show {acct})\nsamba-tool domain exportkeytab {kt} \
                 --principal={q}",
                q = quote(&spn),
                acct = facts.local_account(),
                kt = quote(facts.keytab.as_deref().unwrap_or("/etc/krb5.keytab")),
            ))
        }
        code::KRB_AP_ERR_BAD_INTEGRITY
        | code::KRB_AP_ERR_MODIFIED
        | code::KRB_AP_ERR_BADKEYVER
        | code::KT_KVNONOTFOUND
        | code::KRB_AP_WRONG_PRINC
        | code::KRB_AP_ERR_NOT_US
        | code::KT_NOTFOUND
        | code::KRB_AP_ERR_NOKEY => {
            let spn = facts.spn();
            let (holder, fix) = if op == KrbOp::Accept {
                (facts.local().to_owned(), facts.local_account())
            } else {
                (facts.peer(), format!("{}$", facts.spn_owner()))
            };
            Diagnosis::new(
                WinCode::WrongPrincipal,
                format!(
                    "the ticket for \"{spn}\" was encrypted with a key {holder} does not have: \
                     the SPN is registered on another account than {fix} (or {fix}'s password \
                     changed after its keytab was exported)"
                ),
            )
            .with_fix(format!(
                "setspn -Q {q}   (shows the account that holds it; remove it there with \
                 setspn -D {q} OTHER)\nsetspn -S {q} {owner}\nthen export {holder}'s keytab \
                 again: samba-tool domain exportkeytab KEYTAB --principal={q}",
                q = quote(&spn),
                owner = fix.trim_end_matches('$'),
            ))
        }
        code::KRB_AP_ERR_TKT_EXPIRED | code::KDC_ERR_TGT_REVOKED => Diagnosis::new(
            WinCode::NoCredentials,
            format!("{}'s Kerberos ticket has expired", facts.user()),
        )
        .with_fix(format!(
            "kinit {}",
            facts
                .user
                .as_ref()
                .map_or_else(|| "USER@REALM".to_owned(), |u| u.to_string())
        )),
        code::KRB_AP_ERR_REPEAT => Diagnosis::new(
            WinCode::InvalidToken,
            format!(
                "{} received a Kerberos authenticator it had already seen: a replayed \
                 authentication was refused",
                facts.local()
            ),
        ),
        code::FCC_NOFILE | code::CC_NOTFOUND | code::CC_END | code::NOCREDS_SUPPLIED
            if facts.act != Act::HostCredentials =>
        {
            Diagnosis::new(
                WinCode::NoCredentials,
                format!(
                    "there is no Kerberos ticket for {} in {}",
                    facts.user(),
                    facts.ccache.as_deref().unwrap_or("the credential cache")
                ),
            )
            .with_fix(format!(
                "kinit{} {}",
                facts
                    .ccache
                    .as_ref()
                    .map(|c| format!(" -c {}", quote(c)))
                    .unwrap_or_default(),
                facts
                    .user
                    .as_ref()
                    .map_or_else(|| "USER@REALM".to_owned(), |u| u.to_string())
            ))
        }
        _ if status.routine() == routine::NO_CRED
            || status.routine() == routine::CREDENTIALS_EXPIRED
            || facts.act == Act::HostCredentials =>
        {
            if matches!(facts.act, Act::HostCredentials | Act::Accept) {
                host_keytab_unusable(facts)
            } else {
                Diagnosis::new(
                    WinCode::NoCredentials,
                    format!(
                        "no usable Kerberos credentials for {} in {}",
                        facts.user(),
                        facts.ccache.as_deref().unwrap_or("the credential cache")
                    ),
                )
                .with_fix(format!(
                    "kinit {}",
                    facts
                        .user
                        .as_ref()
                        .map_or_else(|| "USER@REALM".to_owned(), |u| u.to_string())
                ))
            }
        }
        _ => Diagnosis::new(
            WinCode::InvalidToken,
            format!(
                "Kerberos failed while {op} between {} and {}",
                facts.local(),
                facts.peer()
            ),
        ),
    };
    with_detail(d)
}

fn host_keytab_unusable(facts: &AuthFacts) -> Diagnosis {
    Diagnosis::new(
        WinCode::UnknownCredentials,
        format!(
            "{} cannot use its keytab{}: it is missing, unreadable or holds no key for {}",
            facts.local(),
            facts
                .keytab
                .as_ref()
                .map(|k| format!(" {k}"))
                .unwrap_or_default(),
            facts.local_account()
        ),
    )
    .with_fix(format!(
        "samba-tool domain exportkeytab {} --principal={}   (Windows DC: ktpass, or re-join)",
        quote(facts.keytab.as_deref().unwrap_or("/etc/krb5.keytab")),
        quote(&facts.local_account().to_lowercase())
    ))
}

/// A refused (or hopeless) S4U2Proxy — every reason is KDC_ERR_BADOPTION to the client: say
/// which reason applies from the facts, or the likely ones when they are unknown.
pub fn delegation_refused(facts: &AuthFacts) -> Diagnosis {
    if let Some(v) = &facts.delegation_verdict {
        return v.clone();
    }
    let host = facts.local();
    let account = facts.local_account();
    let user = facts.user();
    let spn = facts.spn();
    let alt = facts.on_source_alternative();
    let head = format!("{host} may not delegate {user}'s credentials to \"{spn}\"");
    if facts.user_not_delegable == Some(true) {
        return Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "{head}: {user}'s account is sensitive and cannot be delegated (\"Account is \
                 sensitive and cannot be delegated\", userAccountControl NOT_DELEGATED): the \
                 KDC never issues {user} a forwardable ticket, so no host can act for {user}"
            ),
        )
        .with_fix(format!(
            "vmgate delegation sensitive {} off   (only if {user} may be delegated at all)\n{alt}",
            quote(&user)
        ));
    }
    if facts.ticket_forwardable == Some(false) {
        return Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "{head}: {user}'s ticket to {host} is not forwardable, and S4U2Proxy needs a \
                 forwardable ticket as evidence; {}",
                if facts.user_not_delegable == Some(false) {
                    format!(
                        "{user}'s account is not marked sensitive, so the client asked for a \
                         non-forwardable ticket (no \"forwardable = true\" in its krb5.conf) or \
                         {user} is in Protected Users"
                    )
                } else {
                    format!(
                        "{user}'s account is probably marked \"sensitive and cannot be \
                         delegated\" (or the client asked for a non-forwardable ticket)"
                    )
                }
            ),
        )
        .with_fix(format!(
            "kdestroy; kinit -f {}   (or set forwardable = true in [libdefaults] of krb5.conf)\n{alt}",
            facts
                .user
                .as_ref()
                .map_or_else(|| user.clone(), |u| u.to_string())
        ));
    }
    let listed = facts.allowed_to_delegate_to.as_ref().map(|list| {
        facts
            .target_spn
            .as_ref()
            .is_some_and(|t| list.iter().any(|v| t.matches_value(v)))
    });
    let add_fix = format!(
        "vmgate delegation add-service {} {}\n{alt}",
        quote(short_host(host)),
        quote(&spn)
    );
    if listed == Some(false) {
        return Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "{head} (msDS-AllowedToDelegateTo on {account} does not list it): the KDC \
                 refused S4U2Proxy (KDC_ERR_BADOPTION)"
            ),
        )
        .with_fix(add_fix);
    }
    if facts.act == Act::ProtocolTransition && facts.trusted_to_auth == Some(false) {
        return Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "{head}: {host} holds no Kerberos ticket from {user} and must get one itself \
                 (S4U2Self), but {account} may delegate with \"Kerberos only\" \
                 (TRUSTED_TO_AUTH_FOR_DELEGATION is not set)"
            ),
        )
        .with_fix(format!(
            "vmgate delegation for-any-protocol {} on\n{alt}",
            quote(short_host(host))
        ));
    }
    if listed.is_none() {
        return Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "{head}: the KDC refused S4U2Proxy (KDC_ERR_BADOPTION); most likely \
                 msDS-AllowedToDelegateTo on {account} does not list it (or {user}'s ticket was \
                 not forwardable)"
            ),
        )
        .with_fix(add_fix);
    }
    Diagnosis::new(
        WinCode::NoCredentials,
        format!(
            "{head}: the KDC refused S4U2Proxy (KDC_ERR_BADOPTION) although \
             msDS-AllowedToDelegateTo on {account} lists it; {user}'s ticket to {host} was not \
             forwardable (a sensitive account or Protected Users) or the SPN is listed only in a \
             form the KDC does not compare"
        ),
    )
    .with_fix(format!(
        "vmgate delegation check --from {} --to {} --user {}\n{alt}",
        quote(short_host(host)),
        quote(&facts.peer()),
        quote(&user)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::krb::error::GssStatus;

    const SPN: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";

    fn err(op: KrbOp, major: u32, minor: i32) -> KrbError {
        KrbError::Gss {
            op,
            target: None,
            status: GssStatus {
                major,
                minor: u32::from_ne_bytes(minor.to_ne_bytes()),
                message: "msg".into(),
            },
        }
    }

    fn facts(act: Act, local: &str) -> AuthFacts {
        AuthFacts {
            act,
            local_host: Some(local.into()),
            target_spn: Some(Spn::parse(SPN).unwrap()),
            user: Some(Principal::parse("alice@LAB.EXAMPLE.TEST", None).unwrap()),
            realm: Some("LAB.EXAMPLE.TEST".into()),
            ..AuthFacts::default()
        }
    }

    #[test]
    fn unbound_and_foreign_service_tickets_are_refused_with_their_codes() {
        let mut f = facts(Act::Accept, "hv2");
        f.peer_host = Some("127.0.0.1".into());
        let d = diagnose(&KrbError::Unbound, &f);
        assert_eq!(d.code.hex(), "0x80090346");
        assert_eq!(d.code.name(), "SEC_E_BAD_BINDINGS");
        assert!(d.cause.contains("carried no channel binding"), "{d}");
        assert!(d.fix.as_deref().unwrap().contains("RFC 9266"), "{d}");
        let d = diagnose(
            &KrbError::WrongService {
                requested: "HOST/hv2.lab.example.test@LAB.EXAMPLE.TEST".into(),
                accepted: vec![format!("{SPN}@LAB.EXAMPLE.TEST")],
            },
            &f,
        );
        assert_eq!(d.code, WinCode::WrongPrincipal);
        assert!(
            d.cause
                .contains("ticket for \"HOST/hv2.lab.example.test@LAB.EXAMPLE.TEST\""),
            "{d}"
        );
        assert!(d.cause.contains(SPN), "{d}");
        assert!(
            d.fix.as_deref().unwrap().contains(&format!("\"{SPN}\"")),
            "{d}"
        );
    }

    #[test]
    fn unknown_spn_gives_the_setspn_command() {
        let d = diagnose(
            &err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_S_PRINCIPAL_UNKNOWN),
            &facts(Act::Connect, "ws1"),
        );
        assert_eq!(d.code, WinCode::TargetUnknown);
        assert!(d.cause.contains(SPN));
        assert_eq!(
            d.fix.as_deref(),
            Some(format!("setspn -S \"{SPN}\" HV2").as_str())
        );
    }

    #[test]
    fn refused_delegation_names_the_account_and_spn() {
        let mut f = facts(Act::ConstrainedDelegation, "hv3");
        f.allowed_to_delegate_to = Some(vec![]);
        let d = diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_BADOPTION), &f);
        assert_eq!(d.code, WinCode::NoCredentials);
        assert!(d.cause.contains("HV3$") && d.cause.contains(SPN), "{d}");
        assert!(
            d.fix
                .as_deref()
                .unwrap()
                .starts_with(&format!("vmgate delegation add-service hv3 \"{SPN}\"")),
            "{d}"
        );
        f.user_not_delegable = Some(true);
        let d = diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_BADOPTION), &f);
        assert!(d.cause.contains("sensitive and cannot be delegated"), "{d}");
        f.user_not_delegable = None;
        f.delegation_verdict = Some(Diagnosis::new(WinCode::NoCredentials, "from analysis"));
        let d = diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_BADOPTION), &f);
        assert!(d.cause.starts_with("from analysis\n(Kerberos: "), "{d}");
    }

    #[test]
    fn protocol_transition_without_any_protocol() {
        let mut f = facts(Act::ProtocolTransition, "hv1");
        f.allowed_to_delegate_to = Some(vec![SPN.into()]);
        f.trusted_to_auth = Some(false);
        let d = diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_BADOPTION), &f);
        assert!(
            d.fix
                .unwrap()
                .starts_with("vmgate delegation for-any-protocol hv1 on")
        );
    }

    #[test]
    fn skew_unreachable_bindings_and_wrong_key() {
        let f = facts(Act::Connect, "ws1");
        assert_eq!(
            diagnose(&err(KrbOp::Initiate, 13 << 16, code::KRB_AP_ERR_SKEW), &f).code,
            WinCode::TimeSkew
        );
        assert_eq!(
            diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_UNREACH), &f).code,
            WinCode::NoAuthenticatingAuthority
        );
        assert_eq!(
            diagnose(&err(KrbOp::Accept, 4 << 16, 0), &facts(Act::Accept, "hv2")).code,
            WinCode::BadBindings
        );
        let d = diagnose(
            &err(KrbOp::Accept, 13 << 16, code::KRB_AP_ERR_BAD_INTEGRITY),
            &facts(Act::Accept, "hv2"),
        );
        assert_eq!(d.code, WinCode::WrongPrincipal);
        assert!(d.fix.unwrap().contains(&format!("setspn -S \"{SPN}\" HV2")));
        assert_eq!(
            diagnose(
                &err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_PREAUTH_FAILED),
                &f
            )
            .code,
            WinCode::LogonDenied
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("hv3"), "hv3");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
