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

    /// `alice@REALM` (or a placeholder).
    fn user_principal(&self) -> String {
        self.user
            .as_ref()
            .map_or_else(|| "USER@REALM".to_owned(), |u| u.to_string())
    }

    /// Whether the failing principal is a host's account (its own keytab), not a user.
    fn is_host(&self) -> bool {
        self.act == Act::HostCredentials
            || self.user.as_ref().is_some_and(|u| u.name().ends_with('$'))
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
    let (c, routine_error, said) = match err {
        KrbError::Gss { status, .. } => (status.krb5_code(), status.routine(), status.to_string()),
        KrbError::Krb5(e) => (
            e.code,
            0,
            format!(
                "{} [krb5 error {}{}]",
                e.message,
                e.code,
                super::error::krb5_code_name(e.code)
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default()
            ),
        ),
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
    let kerberos_said = format!("(Kerberos: {said})");
    let with_detail = |d: Diagnosis| -> Diagnosis {
        let cause = format!("{}\n{kerberos_said}", d.cause);
        Diagnosis { cause, ..d }
    };

    if routine_error == routine::BAD_BINDINGS {
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
        code::KDC_ERR_PRINCIPAL_NOT_UNIQUE => {
            let spn = facts.spn();
            Diagnosis::new(
                WinCode::WrongPrincipal,
                format!(
                    "the SPN \"{spn}\" is registered on more than one account in {}: the KDC \
                     cannot tell which account's key to use (KDC_ERR_PRINCIPAL_NOT_UNIQUE)",
                    facts.realm()
                ),
            )
            .with_fix(format!(
                "setspn -Q {q}   (lists every account that holds it)\nsetspn -D {q} OTHER   (for \
                 each account that is not {owner})",
                q = quote(&spn),
                owner = facts.spn_owner()
            ))
        }
        code::KDC_UNREACH | code::REALM_CANT_RESOLVE | code::REALM_UNKNOWN => Diagnosis::new(
            WinCode::NoAuthenticatingAuthority,
            format!(
                "{} could not reach any KDC (domain controller) of {}: {}",
                facts.local(),
                facts.realm(),
                match c {
                    code::KDC_UNREACH => {
                        "none answered on port 88 at the addresses krb5.conf's \"kdc =\" lines \
                         or DNS (_kerberos._tcp SRV records) give for the realm"
                    }
                    code::REALM_CANT_RESOLVE => {
                        "the KDCs' names do not resolve (DNS, /etc/hosts)"
                    }
                    _ => {
                        "krb5.conf names no KDC for the realm and DNS has no _kerberos SRV \
                         record for it (or dns_lookup_kdc is off)"
                    }
                }
            ),
        )
        .with_fix(format!(
            "start the domain controller; on this host check that /etc/resolv.conf points at the \
             domain's DNS (it must answer _kerberos._tcp.{realm} SRV), or name the KDC in \
             krb5.conf ([realms] {realm} kdc = DC); check with: kinit -V {}",
            facts
                .user
                .as_ref()
                .map_or_else(|| "USER".to_owned(), |u| u.to_string()),
            realm = facts.realm()
        )),
        code::KRB_AP_ERR_SKEW | code::KDCREP_SKEW | code::KRB_AP_ERR_TKT_NYV => Diagnosis::new(
            WinCode::TimeSkew,
            format!(
                "the clock of {} differs from the clock of {} by more than the 5 minutes \
                 Kerberos allows{}",
                facts.local(),
                match c {
                    code::KDCREP_SKEW => "the domain controller".to_owned(),
                    _ if op == KrbOp::Accept => facts.peer(),
                    _ => "the domain controller".to_owned(),
                },
                if c == code::KRB_AP_ERR_TKT_NYV {
                    " (the ticket is not yet valid: KRB_AP_ERR_TKT_NYV)"
                } else {
                    ""
                }
            ),
        )
        .with_fix(format!(
            "synchronise the clocks with the domain controller: on {} run \
             `chronyc makestep` (or `timedatectl set-ntp true`)",
            facts.local()
        )),
        code::KDC_ERR_BADOPTION
            if matches!(
                facts.act,
                Act::ConstrainedDelegation | Act::ProtocolTransition
            ) =>
        {
            delegation_refused(facts)
        }
        code::KDC_ERR_POLICY => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused {}'s request for a policy reason (KDC_ERR_POLICY): an account \
                 restriction such as logon hours, the workstations the account may use, an \
                 authentication policy or silo, or a KDC rule; this is not a delegation \
                 setting, and changing delegation does not help",
                match facts.act {
                    Act::Connect => facts.user(),
                    _ => facts.local().to_owned(),
                }
            ),
        )
        .with_fix(on_domain_controller(
            "the KDC's log names the policy (Samba: log level kerberos:3, \
             \"reason=\"; Windows: Security event 4768/4769 with failure code 0xC); lift the \
             restriction on the account it names",
        )),
        code::KDC_ERR_BADOPTION => Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "the KDC refused an option {} asked for (KDC_ERR_BADOPTION): usually a \
                 forwardable or delegated ticket for {} whose account is \"sensitive and \
                 cannot be delegated\"",
                facts.local(),
                facts.user()
            ),
        )
        .with_fix(format!(
            "vmgate delegation show {}   (shows whether the account may be delegated)",
            quote(&facts.user())
        )),
        code::KDC_ERR_ETYPE_NOSUPP => Diagnosis::new(
            WinCode::UnknownCredentials,
            format!(
                "the KDC and {} have no encryption type in common for {} \
                 (KDC_ERR_ETYPE_NOSUPP): the account's msDS-SupportedEncryptionTypes, or the \
                 keys in its keytab, name none that krb5.conf's permitted_enctypes allow",
                facts.local(),
                facts
                    .target_spn
                    .as_ref()
                    .map_or_else(|| facts.user(), ToString::to_string)
            ),
        )
        .with_fix(format!(
            "on {}: vmgate host keytab refresh   (writes keys of the account's encryption \
             types); allow AES in krb5.conf (permitted_enctypes) if it was removed",
            facts.local()
        )),
        code::KDC_ERR_SERVICE_REVOKED => Diagnosis::new(
            WinCode::WrongPrincipal,
            format!(
                "the KDC will not issue tickets for {}: the account that holds the SPN ({}$) \
                 is disabled (KDC_ERR_SERVICE_REVOKED)",
                facts.spn(),
                facts.spn_owner()
            ),
        )
        .with_fix(format!(
            "{}\nor on Windows: Enable-ADAccount -Identity {}$",
            on_domain_controller(&format!(
                "samba-tool computer enable {}$",
                facts.spn_owner()
            )),
            facts.spn_owner()
        )),
        code::KDC_ERR_TGT_REVOKED => Diagnosis::new(
            WinCode::NoCredentials,
            format!(
                "the KDC no longer accepts {}'s ticket-granting ticket (KDC_ERR_TGT_REVOKED): \
                 the account was disabled, locked or had its password changed after the ticket \
                 was issued",
                facts.user()
            ),
        )
        .with_fix(format!("kdestroy; kinit {}", facts.user_principal())),
        code::KDC_ERR_PREAUTH_FAILED | code::PREAUTH_FAILED if facts.is_host() => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused the logon of {}: its keytab{} holds an old key (the \
                     account's password changed after the keytab was written)",
                facts.local_account(),
                facts
                    .keytab
                    .as_ref()
                    .map(|k| format!(" {k}"))
                    .unwrap_or_default()
            ),
        )
        .with_fix(refresh_fix(facts, true)),
        code::KDC_ERR_PREAUTH_FAILED | code::PREAUTH_FAILED => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused the logon of {}: wrong password (KDC_ERR_PREAUTH_FAILED)",
                facts.user()
            ),
        )
        .with_fix(format!(
            "kinit {}   (with the right password)",
            facts.user_principal()
        )),
        code::KDC_ERR_CLIENT_REVOKED => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused the logon of {}: the account is disabled or locked out \
                 (KDC_ERR_CLIENT_REVOKED)",
                facts.user()
            ),
        )
        .with_fix(format!(
            "{}\nor on Windows: Enable-ADAccount -Identity {u}; Unlock-ADAccount -Identity {u}",
            on_domain_controller(&format!(
                "samba-tool user enable {u}; samba-tool user unlock {u}",
                u = quote(&facts.user())
            )),
            u = quote(&facts.user())
        )),
        code::KDC_ERR_KEY_EXP => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC refused the logon of {}: the password has expired (KDC_ERR_KEY_EXPIRED)",
                facts.user()
            ),
        )
        .with_fix(format!("kpasswd {}", facts.user_principal())),
        code::KDC_ERR_C_PRINCIPAL_UNKNOWN => Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "the KDC does not know {} in {} (KDC_ERR_C_PRINCIPAL_UNKNOWN): the account does \
                 not exist",
                facts.user(),
                facts.realm()
            ),
        )
        .with_fix(format!(
            "check the name: vmgate delegation show {}",
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
                     keytab is not {}'s own, or was written before the SPN was registered on {}",
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
                "setspn -Q {q}   (must show {acct})\n{refresh}",
                q = quote(&spn),
                acct = facts.local_account(),
                refresh = refresh_fix(facts, false),
            ))
        }
        code::KRB_AP_ERR_BADKEYVER | code::KT_KVNONOTFOUND => {
            let spn = facts.spn();
            let holder = if op == KrbOp::Accept {
                facts.local().to_owned()
            } else {
                facts.peer()
            };
            Diagnosis::new(
                WinCode::WrongPrincipal,
                format!(
                    "the ticket for \"{spn}\" was encrypted with a key version {holder}'s keytab \
                     does not hold (KRB_AP_ERR_BADKEYVER): the account's password changed after \
                     the keytab was written"
                ),
            )
            .with_fix(format!(
                "on {holder}: vmgate host keytab refresh   (sets a new password and rewrites the \
                 keytab; add --reset with a domain administrator's ticket if the keytab's key no \
                 longer works)"
            ))
        }
        code::KRB_AP_ERR_BAD_INTEGRITY
        | code::KRB_AP_ERR_MODIFIED
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
                     changed after its keytab was written)"
                ),
            )
            .with_fix(format!(
                "setspn -Q {q}   (shows the account that holds it; remove it there with \
                 setspn -D {q} OTHER)\nsetspn -S {q} {owner}\nthen on {holder}: vmgate host \
                 keytab refresh",
                q = quote(&spn),
                owner = fix.trim_end_matches('$'),
            ))
        }
        code::KRB_AP_ERR_TKT_EXPIRED => Diagnosis::new(
            WinCode::NoCredentials,
            format!("{}'s Kerberos ticket has expired", facts.user()),
        )
        .with_fix(format!("kinit {}", facts.user_principal())),
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
                facts.user_principal()
            ))
        }
        _ if routine_error == routine::NO_CRED
            || routine_error == routine::CREDENTIALS_EXPIRED
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
                .with_fix(format!("kinit {}", facts.user_principal()))
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

/// A step that only works on a domain controller itself, marked as such.
pub fn on_domain_controller(step: &str) -> String {
    format!("on a domain controller: {step}")
}

/// `vmgate host keytab refresh` for the failing host, run there (with `--keytab` when the
/// keytab is not the system's).
fn refresh_fix(facts: &AuthFacts, stale: bool) -> String {
    let kt = facts
        .keytab
        .as_deref()
        .filter(|k| *k != "/etc/krb5.keytab" && *k != "FILE:/etc/krb5.keytab")
        .map(|k| format!(" --keytab {}", quote(k.strip_prefix("FILE:").unwrap_or(k))))
        .unwrap_or_default();
    let account = facts
        .local_account
        .as_deref()
        .map(|a| format!(" --account {}", quote(a)))
        .unwrap_or_default();
    if stale {
        format!(
            "on {}: vmgate host keytab refresh{kt}{account} --reset   (with a domain \
             administrator's ticket: the keytab's key no longer works)",
            facts.local()
        )
    } else {
        format!(
            "on {}: vmgate host keytab refresh{kt}{account}",
            facts.local()
        )
    }
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
        "{}\nor re-join {}: adcli join (or net ads join -k)",
        refresh_fix(facts, true),
        facts.local()
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
    fn every_kdc_error_keeps_its_own_cause() {
        // A policy refusal during delegation is not explained as a delegation option.
        let mut f = facts(Act::ConstrainedDelegation, "hv1");
        f.allowed_to_delegate_to = Some(vec![]);
        let d = diagnose(&err(KrbOp::Initiate, 13 << 16, code::KDC_ERR_POLICY), &f);
        assert_eq!(d.code, WinCode::LogonDenied);
        assert!(d.cause.contains("KDC_ERR_POLICY"), "{d}");
        assert!(!d.cause.contains("msDS-AllowedToDelegateTo"), "{d}");
        assert!(
            !d.fix.as_deref().unwrap().contains("delegation add-service"),
            "{d}"
        );
        assert!(d.fix.unwrap().starts_with("on a domain controller: "));
        // Each logon refusal says its own reason and its own fix.
        let f = facts(Act::Connect, "ws1");
        let text = |c: i32| diagnose(&err(KrbOp::Initiate, 13 << 16, c), &f).to_string();
        assert!(text(code::KDC_ERR_PREAUTH_FAILED).contains("wrong password"));
        assert!(text(code::KDC_ERR_CLIENT_REVOKED).contains("disabled or locked out"));
        assert!(text(code::KDC_ERR_KEY_EXP).contains("kpasswd alice@LAB.EXAMPLE.TEST"));
        assert!(text(code::KDC_ERR_C_PRINCIPAL_UNKNOWN).contains("does not exist"));
        assert!(text(code::KDC_ERR_TGT_REVOKED).contains("KDC_ERR_TGT_REVOKED"));
        assert!(text(code::KDC_ERR_ETYPE_NOSUPP).contains("KDC_ERR_ETYPE_NOSUPP"));
        assert!(text(code::KDC_ERR_PRINCIPAL_NOT_UNIQUE).contains("setspn -Q"));
        assert_ne!(
            text(code::KRB_AP_ERR_BADKEYVER),
            text(code::KRB_AP_ERR_BAD_INTEGRITY)
        );
        // No printed fix opens a DC's local database unless it says it runs on the DC.
        for c in [
            code::KDC_ERR_PREAUTH_FAILED,
            code::KDC_ERR_CLIENT_REVOKED,
            code::KDC_ERR_SERVICE_REVOKED,
            code::KRB_AP_ERR_BAD_INTEGRITY,
            code::KT_NOTFOUND,
        ] {
            for act in [Act::Connect, Act::Accept, Act::HostCredentials] {
                let d = diagnose(&err(KrbOp::Accept, 13 << 16, c), &facts(act, "hv2"));
                for line in d.fix.as_deref().unwrap_or_default().lines() {
                    assert!(
                        !line.contains("samba-tool") || line.contains("on a domain controller: "),
                        "{line}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_host_with_an_old_key_is_told_to_refresh_its_keytab() {
        let mut f = facts(Act::HostCredentials, "hv2");
        f.keytab = Some("/var/lib/vmgate/hv2.keytab".into());
        f.local_account = Some("HV2$".into());
        let d = diagnose(
            &err(
                KrbOp::AcquireCredentials,
                13 << 16,
                code::KDC_ERR_PREAUTH_FAILED,
            ),
            &f,
        );
        assert_eq!(d.code, WinCode::LogonDenied);
        assert_eq!(
            d.fix.as_deref().unwrap().lines().next(),
            Some(
                "on hv2: vmgate host keytab refresh --keytab /var/lib/vmgate/hv2.keytab \
                 --account HV2$ --reset   (with a domain administrator's ticket: the keytab's \
                 key no longer works)"
            )
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("hv3"), "hv3");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
