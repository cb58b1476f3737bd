//! The delegation verdict: a pure function from [`DelegationFacts`] to the list of requirements
//! a live move S→D started as U depends on, each met or not, and for each unmet one the Windows
//! code the move would fail with, its cause in this deployment's terms, and the exact fix.
//!
//! Requirements are listed in the order in which the KDC (or the move) would trip over them, so
//! the first unmet requirement is the error the move reports:
//!
//! 1. the user's account is usable (enabled, not locked out) — 0x8009030C;
//! 2. each of D's migration SPNs (FQDN, then short form) is registered exactly once, on D's
//!    account — missing: 0x80090303, elsewhere or duplicated: 0x80090322;
//! 3. how S gets to act as U (depends on the auth type and on how the move is started):
//!    * Kerberos, started on S: U's own ticket is there, nothing to delegate;
//!    * Kerberos, started remotely: S may delegate to D's SPNs (msDS-AllowedToDelegateTo),
//!      protocol transition where S holds no ticket from U (see [`needs_protocol_transition`]),
//!      and U's tickets may be delegated at all (not NOT_DELEGATED, not in Protected Users);
//!    * CredSSP: U is logged on to S or forwards their credentials (and those may be
//!      forwarded) — all of these fail with 0x8009030E.
//!
//! Besides the Windows codes, the verdict predicts what the KDC itself answers to the S4U2Self +
//! S4U2Proxy exchange ([`KdcAnswer`]), so `check --live` can compare prediction and reality.

use std::fmt;

use serde::{Serialize, Serializer};

use super::facts::{
    AuthType, DelegationFacts, DirectoryKind, MoveStart, SpnHolders, UserFacts, twin_of,
};
use crate::winerr::{Diagnosis, WinCode};

/// What a requirement is about (stable identifiers for scripts reading `--json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequirementId {
    /// The user's account is enabled and not locked out.
    UserEnabled,
    /// D's migration SPN in FQDN form is registered exactly once, on D's account.
    TargetSpnFqdn,
    /// D's migration SPN in short form is registered exactly once, on D's account.
    TargetSpnShort,
    /// S may act as the user towards D (constrained delegation, the user's own ticket, or
    /// CredSSP credentials).
    SourceMayDelegate,
    /// Protocol transition (TRUSTED_TO_AUTH_FOR_DELEGATION) where S holds no ticket from U.
    ProtocolTransition,
    /// The user's account is not marked sensitive (NOT_DELEGATED).
    UserNotSensitive,
    /// The user is not a member of Protected Users.
    UserNotProtected,
    /// CredSSP: the user's credentials are on S.
    CredsspCredentials,
}

impl RequirementId {
    /// The identifier as printed and serialized (`target-spn-fqdn`).
    pub const fn as_str(self) -> &'static str {
        match self {
            RequirementId::UserEnabled => "user-enabled",
            RequirementId::TargetSpnFqdn => "target-spn-fqdn",
            RequirementId::TargetSpnShort => "target-spn-short",
            RequirementId::SourceMayDelegate => "source-may-delegate",
            RequirementId::ProtocolTransition => "protocol-transition",
            RequirementId::UserNotSensitive => "user-not-sensitive",
            RequirementId::UserNotProtected => "user-not-protected",
            RequirementId::CredsspCredentials => "credssp-credentials",
        }
    }
}

impl fmt::Display for RequirementId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One requirement of a live move, met or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Requirement {
    /// What it is about.
    pub id: RequirementId,
    /// What must hold, naming the accounts and SPNs (and, when met, why it holds).
    pub description: String,
    /// Whether it holds.
    pub met: bool,
    /// For an unmet requirement: the Windows code, the cause and the fix.
    pub diagnosis: Option<Diagnosis>,
}

impl Requirement {
    fn met(id: RequirementId, description: String) -> Requirement {
        Requirement {
            id,
            description,
            met: true,
            diagnosis: None,
        }
    }

    fn unmet(id: RequirementId, description: String, diagnosis: Diagnosis) -> Requirement {
        Requirement {
            id,
            description,
            met: false,
            diagnosis: Some(diagnosis),
        }
    }
}

/// What the KDC answers when S asks for a ticket to D's migration SPN as U (S4U2Self where S
/// holds no ticket from U, then S4U2Proxy; or a plain TGS request with U's own ticket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KdcAnswer {
    /// A ticket is issued.
    Ticket,
    /// A ticket is issued, but D's key cannot decrypt it (the SPN belongs to another account).
    /// Only observable with D's keytab.
    WrongPrincipal,
    /// KDC_ERR_S_PRINCIPAL_UNKNOWN: the SPN is not registered, or (Samba) registered on more
    /// than one account.
    PrincipalUnknown,
    /// KDC_ERR_PRINCIPAL_NOT_UNIQUE: the SPN is registered on more than one account (what a
    /// KDC may answer instead of [`KdcAnswer::PrincipalUnknown`]).
    NotUnique,
    /// KDC_ERR_BADOPTION: delegation refused (not allowed, evidence not forwardable).
    BadOption,
    /// The user's ticket to S is not forwardable, so there is no evidence to present at all
    /// (the GSSAPI layer does not even ask the KDC); same meaning as [`KdcAnswer::BadOption`].
    NotForwardable,
    /// KDC_ERR_CLIENT_REVOKED: the user's account is disabled or locked out.
    ClientRevoked,
    /// Anything else, as reported.
    Other(String),
}

impl KdcAnswer {
    /// Whether `self` and `other` mean the same outcome (a refused delegation is the same
    /// whether the KDC or GSSAPI refused it).
    pub fn agrees_with(&self, other: &KdcAnswer) -> bool {
        use KdcAnswer::{BadOption, NotForwardable, NotUnique, PrincipalUnknown};
        matches!(
            (self, other),
            (BadOption | NotForwardable, BadOption | NotForwardable)
                | (PrincipalUnknown | NotUnique, PrincipalUnknown | NotUnique)
        ) || self == other
    }

    /// The Windows code a client reports for this answer, `None` for a ticket.
    pub fn win_code(&self) -> Option<WinCode> {
        match self {
            KdcAnswer::Ticket => None,
            KdcAnswer::WrongPrincipal => Some(WinCode::WrongPrincipal),
            KdcAnswer::PrincipalUnknown => Some(WinCode::TargetUnknown),
            KdcAnswer::NotUnique => Some(WinCode::WrongPrincipal),
            KdcAnswer::BadOption | KdcAnswer::NotForwardable => Some(WinCode::NoCredentials),
            KdcAnswer::ClientRevoked => Some(WinCode::LogonDenied),
            KdcAnswer::Other(_) => Some(WinCode::NoCredentials),
        }
    }

    /// A short name: `ok`, `KDC_ERR_BADOPTION`, ...
    pub fn name(&self) -> &str {
        match self {
            KdcAnswer::Ticket => "ok",
            KdcAnswer::WrongPrincipal => "wrong-principal",
            KdcAnswer::PrincipalUnknown => "KDC_ERR_S_PRINCIPAL_UNKNOWN",
            KdcAnswer::NotUnique => "KDC_ERR_PRINCIPAL_NOT_UNIQUE",
            KdcAnswer::BadOption => "KDC_ERR_BADOPTION",
            KdcAnswer::NotForwardable => "not-forwardable",
            KdcAnswer::ClientRevoked => "KDC_ERR_CLIENT_REVOKED",
            KdcAnswer::Other(s) => s,
        }
    }
}

impl fmt::Display for KdcAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            KdcAnswer::Ticket => "ticket issued",
            KdcAnswer::WrongPrincipal => "ticket issued, but the destination cannot decrypt it",
            KdcAnswer::PrincipalUnknown => {
                "KDC_ERR_S_PRINCIPAL_UNKNOWN (server not found in Kerberos database)"
            }
            KdcAnswer::NotUnique => "KDC_ERR_PRINCIPAL_NOT_UNIQUE (principal not unique)",
            KdcAnswer::BadOption => "KDC_ERR_BADOPTION (KDC can't fulfill requested option)",
            KdcAnswer::NotForwardable => {
                "the user's ticket is not forwardable: no evidence for S4U2Proxy"
            }
            KdcAnswer::ClientRevoked => "KDC_ERR_CLIENT_REVOKED (client's credentials revoked)",
            KdcAnswer::Other(s) => s,
        };
        f.write_str(text)
    }
}

impl Serialize for KdcAnswer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// Proof that a delegation analysis passed: every requirement of the move is met. Only
/// [`Verdict::allowed`] creates it; code that delegates takes it as an argument.
#[derive(Clone, Copy, Debug)]
pub struct DelegationAllowed {
    _private: (),
}

/// The result of [`analyze`]: every requirement, met or not. Only `analyze` creates one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    requirements: Vec<Requirement>,
    expected: Vec<(String, KdcAnswer)>,
}

impl Verdict {
    /// Every requirement, in the order the move meets them.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether every requirement is met.
    pub fn ok(&self) -> bool {
        self.requirements.iter().all(|r| r.met)
    }

    /// The unmet requirements.
    pub fn unmet(&self) -> impl Iterator<Item = &Requirement> {
        self.requirements.iter().filter(|r| !r.met)
    }

    /// The error the move would report: the first unmet requirement's diagnosis.
    pub fn diagnosis(&self) -> Option<&Diagnosis> {
        self.unmet().find_map(|r| r.diagnosis.as_ref())
    }

    /// Every distinct fix of the unmet requirements, in order (applying all of them makes the
    /// check pass, as far as the directory is concerned).
    pub fn fixes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for fix in self
            .unmet()
            .filter_map(|r| r.diagnosis.as_ref()?.fix.as_deref())
        {
            if !out.contains(&fix) {
                out.push(fix);
            }
        }
        out
    }

    /// What the KDC is expected to answer for each of D's migration SPNs (FQDN form first),
    /// when S asks for a ticket as U the way this move would.
    pub fn expected_kdc(&self) -> &[(String, KdcAnswer)] {
        &self.expected
    }

    /// The proof that delegation may proceed, or the error the move would report.
    pub fn allowed(&self) -> Result<DelegationAllowed, Diagnosis> {
        match self.unmet().next() {
            None => Ok(DelegationAllowed { _private: () }),
            Some(r) => Err(r
                .diagnosis
                .clone()
                .unwrap_or_else(|| Diagnosis::new(WinCode::NoCredentials, r.description.clone()))),
        }
    }
}

impl Serialize for Verdict {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct Expected<'a> {
            spn: &'a str,
            kdc: &'a KdcAnswer,
        }
        let expected: Vec<Expected<'_>> = self
            .expected
            .iter()
            .map(|(spn, kdc)| Expected { spn, kdc })
            .collect();
        let mut s = serializer.serialize_struct("Verdict", 5)?;
        s.serialize_field("ok", &self.ok())?;
        s.serialize_field("error", &self.diagnosis())?;
        s.serialize_field("requirements", &self.requirements)?;
        s.serialize_field("fixes", &self.fixes())?;
        s.serialize_field("expected_kdc", &expected)?;
        s.end()
    }
}

/// Whether S must obtain U's ticket itself (S4U2Self) and therefore needs protocol transition
/// (TRUSTED_TO_AUTH_FOR_DELEGATION, "use any authentication protocol").
///
/// A move started remotely by a user who authenticated to S with Kerberos gives S the user's
/// forwardable service ticket as evidence, and "Kerberos only" is enough. Without a ticket from
/// the user (the daemon acting on a queued job, a logon without Kerberos) S has only what
/// S4U2Self gives it, and the KDC lets S pass that on only with protocol transition. A move
/// started on S itself, and CredSSP, use the user's own credentials and need no delegation.
pub fn needs_protocol_transition(auth: AuthType, start: MoveStart) -> bool {
    auth == AuthType::Kerberos && start == MoveStart::RemoteWithoutTicket
}

/// Whether S needs constrained delegation (S4U2Proxy) at all.
pub fn needs_constrained_delegation(auth: AuthType, start: MoveStart) -> bool {
    auth == AuthType::Kerberos
        && matches!(
            start,
            MoveStart::RemoteWithTicket | MoveStart::RemoteWithoutTicket
        )
}

/// `"text"` when it needs quoting on a command line (spaces, quotes, `$`), else `text`.
pub fn shell_word(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@=,+".contains(c))
    {
        text.to_owned()
    } else {
        let escaped: String = text
            .chars()
            .flat_map(|c| {
                let esc = matches!(c, '"' | '\\' | '$' | '`').then_some('\\');
                esc.into_iter().chain(std::iter::once(c))
            })
            .collect();
        format!("\"{escaped}\"")
    }
}

/// The argument that names an account in `setspn` and vmgate commands: the account name
/// without the computer `$` (`HV3$` → `HV3`).
fn account_arg(account: &str) -> String {
    shell_word(account.strip_suffix('$').unwrap_or(account))
}

fn q(text: &str) -> String {
    format!("\"{text}\"")
}

/// How the verdict names the user in sentences.
fn user_name(facts: &DelegationFacts) -> &str {
    facts.user.as_ref().map_or("the user", |u| u.name.as_str())
}

/// Computes the verdict for a move described by `facts`.
pub fn analyze(facts: &DelegationFacts) -> Verdict {
    let mut requirements = Vec::new();
    if let Some(user) = &facts.user {
        requirements.push(user_enabled(facts, user));
    }
    let [fqdn_spn, short_spn] = facts.migration_spns();
    requirements.push(spn_registered(
        facts,
        RequirementId::TargetSpnFqdn,
        &fqdn_spn,
    ));
    requirements.push(spn_registered(
        facts,
        RequirementId::TargetSpnShort,
        &short_spn,
    ));
    match facts.auth {
        AuthType::Kerberos => kerberos_requirements(facts, &mut requirements),
        AuthType::Credssp => credssp_requirements(facts, &mut requirements),
    }
    let expected = [fqdn_spn, short_spn]
        .into_iter()
        .map(|spn| {
            let answer = expected_answer(facts, &spn, &requirements);
            (spn, answer)
        })
        .collect();
    Verdict {
        requirements,
        expected,
    }
}

/// A change of a user or group that only the domain's own tools make: `samba-tool` without
/// `-H` opens the local database, which exists only on a DC (Samba), so the step is marked as
/// such; PowerShell's AD module runs on any Windows host with RSAT (Windows AD). The other is
/// given as the alternative.
pub fn admin_fix(samba: bool, samba_tool: &str, powershell: &str) -> String {
    let dc = crate::krb::diagnose::on_domain_controller(samba_tool);
    if samba {
        format!("{dc}\nor on Windows (RSAT): {powershell}")
    } else {
        format!("on Windows (RSAT): {powershell}\nor {dc}")
    }
}

fn on_source_alternative(facts: &DelegationFacts) -> String {
    format!(
        "or start the move on {} itself, where {}'s own ticket is present",
        facts.source.host,
        user_name(facts)
    )
}

fn user_enabled(facts: &DelegationFacts, user: &UserFacts) -> Requirement {
    let description = format!("{}'s account is enabled and not locked out", user.name);
    let samba = facts.directory == DirectoryKind::Samba;
    let name = shell_word(&user.name);
    if user.uac.disabled() {
        let fix = admin_fix(
            samba,
            &format!("samba-tool user enable {name}"),
            &format!("Enable-ADAccount -Identity {name}"),
        );
        let d = Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "{}'s account is disabled (userAccountControl ACCOUNTDISABLE): the KDC issues \
                 no ticket for it",
                user.name
            ),
        )
        .with_fix(fix);
        Requirement::unmet(RequirementId::UserEnabled, description, d)
    } else if user.locked {
        let fix = admin_fix(
            samba,
            &format!("samba-tool user unlock {name}"),
            &format!("Unlock-ADAccount -Identity {name}"),
        );
        let d = Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "{}'s account is locked out (too many bad passwords): the KDC issues no ticket \
                 for it",
                user.name
            ),
        )
        .with_fix(fix);
        Requirement::unmet(RequirementId::UserEnabled, description, d)
    } else {
        Requirement::met(RequirementId::UserEnabled, description)
    }
}

/// Who holds an SPN, as the registration requirement sees it.
enum Registration<'a> {
    Missing,
    /// Stored on D in its plain form only; Samba's KDC needs the twin.
    TwinMissing(String),
    OnlyElsewhere(&'a str),
    Duplicated(Vec<&'a str>),
    Ok,
}

fn registration<'a>(facts: &DelegationFacts, holders: Option<&'a SpnHolders>) -> Registration<'a> {
    let Some(h) = holders else {
        return Registration::Missing;
    };
    let all = h.accounts();
    let target = &facts.target.account;
    match all.as_slice() {
        [] => Registration::Missing,
        [one] if !one.eq_ignore_ascii_case(target) => Registration::OnlyElsewhere(one),
        [_] => {
            if facts.directory.needs_twin(&h.spn)
                && !h.escaped.iter().any(|a| a.eq_ignore_ascii_case(target))
            {
                Registration::TwinMissing(twin_of(&h.spn).unwrap_or_default())
            } else {
                Registration::Ok
            }
        }
        _ => Registration::Duplicated(all),
    }
}

fn spn_registered(facts: &DelegationFacts, id: RequirementId, spn: &str) -> Requirement {
    let target = &facts.target.account;
    let d_arg = account_arg(target);
    let description = format!("{} is registered exactly once, on {target}", q(spn));
    let spn_word = shell_word(spn);
    let diagnosis = match registration(facts, facts.holders(spn)) {
        Registration::Ok => return Requirement::met(id, description),
        Registration::Missing => Diagnosis::new(
            WinCode::TargetUnknown,
            format!(
                "{} is not registered on any account, so the KDC cannot issue a ticket for \
                 {} (KDC_ERR_S_PRINCIPAL_UNKNOWN)",
                q(spn),
                facts.target.short
            ),
        )
        .with_fix(format!("setspn -S {spn_word} {d_arg}")),
        Registration::TwinMissing(twin) => Diagnosis::new(
            WinCode::TargetUnknown,
            format!(
                "{} is stored on {target} without its escaped twin {}, which Samba's KDC looks \
                 SPNs up by (KDC_ERR_S_PRINCIPAL_UNKNOWN)",
                q(spn),
                q(&twin)
            ),
        )
        .with_fix(format!(
            "setspn -D {spn_word} {d_arg}\nsetspn -S {spn_word} {d_arg}"
        )),
        Registration::OnlyElsewhere(other) => Diagnosis::new(
            WinCode::WrongPrincipal,
            format!(
                "{} is registered on {other}, not on {target}: its tickets are encrypted with \
                 {other}'s key, which {} cannot decrypt",
                q(spn),
                facts.target.short
            ),
        )
        .with_fix(format!(
            "setspn -D {spn_word} {}\nsetspn -S {spn_word} {d_arg}",
            account_arg(other)
        )),
        Registration::Duplicated(mut all) => {
            // The directory returns holders in no particular order: name them sorted so the
            // message and the fix are the same on every run.
            all.sort_by_key(|a| a.to_ascii_uppercase());
            let mut fix: Vec<String> = all
                .iter()
                .filter(|a| !a.eq_ignore_ascii_case(target))
                .map(|a| format!("setspn -D {spn_word} {}", account_arg(a)))
                .collect();
            if !all.iter().any(|a| a.eq_ignore_ascii_case(target)) {
                fix.push(format!("setspn -S {spn_word} {d_arg}"));
            }
            Diagnosis::new(
                WinCode::WrongPrincipal,
                format!(
                    "{} is registered on {} accounts ({}); an SPN must belong to exactly one \
                     account, {target}",
                    q(spn),
                    all.len(),
                    all.join(", ")
                ),
            )
            .with_fix(fix.join("\n"))
        }
    };
    Requirement::unmet(id, description, diagnosis)
}

fn kerberos_requirements(facts: &DelegationFacts, out: &mut Vec<Requirement>) {
    let s = &facts.source;
    let user = user_name(facts);
    if facts.start == MoveStart::OnSource {
        out.push(Requirement::met(
            RequirementId::SourceMayDelegate,
            format!(
                "no delegation needed: the move starts on {} with {user}'s own ticket",
                s.host
            ),
        ));
        return;
    }
    if facts.start == MoveStart::RemoteForwardingCredentials {
        out.push(Requirement::met(
            RequirementId::SourceMayDelegate,
            format!(
                "no constrained delegation needed: {user} forwards a TGT to {}",
                s.host
            ),
        ));
        push_user_delegable(facts, out);
        return;
    }
    out.push(source_may_delegate(facts));
    out.push(protocol_transition(facts));
    push_user_delegable(facts, out);
}

fn source_may_delegate(facts: &DelegationFacts) -> Requirement {
    let s = &facts.source;
    let spns = facts.migration_spns();
    let description = format!(
        "{} may delegate to {} (msDS-AllowedToDelegateTo)",
        s.account,
        spns.iter().map(|x| q(x)).collect::<Vec<_>>().join(" and ")
    );
    let mut missing: Vec<&str> = Vec::new();
    let mut twin_only: Vec<&str> = Vec::new();
    for spn in &spns {
        match s.delegate_entry(spn) {
            Some(e) if e.effective(facts.directory) => {}
            Some(_) => {
                missing.push(spn);
                twin_only.push(spn);
            }
            None => missing.push(spn),
        }
    }
    if missing.is_empty() {
        return Requirement::met(RequirementId::SourceMayDelegate, description);
    }
    let user = user_name(facts);
    let listed = missing
        .iter()
        .map(|x| q(x))
        .collect::<Vec<_>>()
        .join(" and ");
    let mut cause = format!(
        "{} may not delegate {user}'s credentials to {listed} ",
        s.host
    );
    if s.allowed_to.is_empty() {
        cause.push_str(&format!(
            "({} has no msDS-AllowedToDelegateTo: it may not delegate to any service)",
            s.account
        ));
    } else if twin_only.len() == missing.len() {
        cause.push_str(&format!(
            "(msDS-AllowedToDelegateTo on {} lists it only in plain form; Samba's KDC compares \
             the escaped twin)",
            s.account
        ));
    } else {
        cause.push_str(&format!(
            "(msDS-AllowedToDelegateTo on {} does not list it)",
            s.account
        ));
    }
    if s.uac.unconstrained() {
        cause.push_str(&format!(
            "; {} is trusted for unconstrained delegation, which does not allow S4U2Proxy",
            s.account
        ));
    }
    let fix = format!(
        "vmgate delegation add-service {} {}\n{}",
        shell_word(&s.host),
        missing
            .iter()
            .map(|x| shell_word(x))
            .collect::<Vec<_>>()
            .join(" "),
        on_source_alternative(facts)
    );
    Requirement::unmet(
        RequirementId::SourceMayDelegate,
        description,
        Diagnosis::new(WinCode::NoCredentials, cause).with_fix(fix),
    )
}

fn protocol_transition(facts: &DelegationFacts) -> Requirement {
    let s = &facts.source;
    let user = user_name(facts);
    if !needs_protocol_transition(facts.auth, facts.start) {
        return Requirement::met(
            RequirementId::ProtocolTransition,
            format!(
                "protocol transition is not needed: {user}'s forwardable Kerberos ticket to {} is \
                 the evidence, so \"Kerberos only\" is enough",
                s.host
            ),
        );
    }
    let description = format!(
        "{} may use any authentication protocol (TRUSTED_TO_AUTH_FOR_DELEGATION): {} holds no \
         ticket from {user} and must obtain one with S4U2Self",
        s.account, s.host
    );
    if s.uac.protocol_transition() {
        return Requirement::met(RequirementId::ProtocolTransition, description);
    }
    let cause = format!(
        "{} holds no Kerberos ticket from {user} and must obtain one itself (S4U2Self), but {} \
         may delegate with \"Kerberos only\" (TRUSTED_TO_AUTH_FOR_DELEGATION is not set), so \
         the KDC will not accept that ticket as evidence: protocol transition (\"use any \
         authentication protocol\") is needed",
        s.host, s.account
    );
    let fix = format!(
        "vmgate delegation for-any-protocol {} on\n{}",
        shell_word(&s.host),
        on_source_alternative(facts)
    );
    Requirement::unmet(
        RequirementId::ProtocolTransition,
        description,
        Diagnosis::new(WinCode::NoCredentials, cause).with_fix(fix),
    )
}

/// NOT_DELEGATED and Protected Users: the user's tickets are never forwardable.
fn push_user_delegable(facts: &DelegationFacts, out: &mut Vec<Requirement>) {
    let Some(user) = &facts.user else {
        return;
    };
    let s = &facts.source;
    let d = &facts.target;
    let samba = facts.directory == DirectoryKind::Samba;
    let name = shell_word(&user.name);
    let alternative = on_source_alternative(facts);
    let description = format!(
        "{}'s account may be delegated (not \"sensitive and cannot be delegated\")",
        user.name
    );
    if user.uac.not_delegated() {
        let fix = if samba {
            format!("vmgate delegation sensitive {name} off\n{alternative}")
        } else {
            format!(
                "Set-ADAccountControl -Identity {name} -AccountNotDelegated $false\n{alternative}"
            )
        };
        let cause = format!(
            "{}'s account is marked \"Account is sensitive and cannot be delegated\" \
             (userAccountControl NOT_DELEGATED, 0x00100000): the KDC never issues {} a \
             forwardable ticket, so {} cannot act for {} towards {}",
            user.name, user.name, s.host, user.name, d.short
        );
        out.push(Requirement::unmet(
            RequirementId::UserNotSensitive,
            description,
            Diagnosis::new(WinCode::NoCredentials, cause).with_fix(fix),
        ));
    } else {
        out.push(Requirement::met(
            RequirementId::UserNotSensitive,
            description,
        ));
    }
    let description = format!("{} is not a member of Protected Users", user.name);
    if user.protected_users && !facts.protected_users_enforced {
        out.push(Requirement::met(
            RequirementId::UserNotProtected,
            format!(
                "{} is a member of Protected Users, but this DC does not enforce the group for \
                 delegation (Samba before 4.19); a Windows DC or a newer Samba refuses to \
                 delegate {}",
                user.name, user.name
            ),
        ));
    } else if user.protected_users {
        let fix = format!(
            "{}\n{alternative}",
            admin_fix(
                samba,
                &format!("samba-tool group removemembers \"Protected Users\" {name}"),
                &format!("Remove-ADGroupMember -Identity \"Protected Users\" -Members {name}"),
            )
        );
        let cause = format!(
            "{} is a member of Protected Users, whose credentials are never delegated, so {} \
             cannot act for {} towards {}",
            user.name, s.host, user.name, d.short
        );
        out.push(Requirement::unmet(
            RequirementId::UserNotProtected,
            description,
            Diagnosis::new(WinCode::NoCredentials, cause).with_fix(fix),
        ));
    } else {
        out.push(Requirement::met(
            RequirementId::UserNotProtected,
            description,
        ));
    }
}

fn credssp_requirements(facts: &DelegationFacts, out: &mut Vec<Requirement>) {
    let s = &facts.source;
    let user = user_name(facts);
    let description = format!("with CredSSP, {user}'s own credentials are on {}", s.host);
    match facts.start {
        MoveStart::OnSource => out.push(Requirement::met(
            RequirementId::CredsspCredentials,
            format!("{description}: {user} is logged on to {}", s.host),
        )),
        MoveStart::RemoteForwardingCredentials => {
            out.push(Requirement::met(
                RequirementId::CredsspCredentials,
                format!("{description}: {user} forwards them (--forward-credentials)"),
            ));
            push_user_delegable(facts, out);
        }
        MoveStart::RemoteWithTicket | MoveStart::RemoteWithoutTicket => {
            let cause = format!(
                "{} uses CredSSP, which needs {user}'s own credentials on {}, but {user} is not \
                 logged on to {} and does not forward them (constrained delegation does not \
                 apply to CredSSP)",
                s.host, s.host, s.host
            );
            let fix = format!(
                "start the move on {} itself, logged on as {user}\nor forward {user}'s \
                 credentials: add --forward-credentials to the move",
                s.host
            );
            out.push(Requirement::unmet(
                RequirementId::CredsspCredentials,
                description,
                Diagnosis::new(WinCode::NoCredentials, cause).with_fix(fix),
            ));
        }
    }
}

/// What the KDC answers when S asks for a ticket to `spn` as the user, the way this move would.
fn expected_answer(facts: &DelegationFacts, spn: &str, reqs: &[Requirement]) -> KdcAnswer {
    let unmet = |id: RequirementId| reqs.iter().any(|r| r.id == id && !r.met);
    if unmet(RequirementId::UserEnabled) {
        return KdcAnswer::ClientRevoked;
    }
    // The KDC looks the SPN up by the text it unparses (escaped on Samba) and needs exactly one
    // account holding it.
    match facts.holders(spn) {
        None => return KdcAnswer::PrincipalUnknown,
        Some(h) => {
            let kdc_view: Vec<&String> = if facts.directory.needs_twin(&h.spn) {
                h.escaped.iter().collect()
            } else {
                h.plain.iter().chain(h.escaped.iter()).collect()
            };
            let mut distinct: Vec<&str> = Vec::new();
            for a in kdc_view {
                if !distinct.iter().any(|d| d.eq_ignore_ascii_case(a)) {
                    distinct.push(a);
                }
            }
            match distinct.as_slice() {
                [one] if !one.eq_ignore_ascii_case(&facts.target.account) => {
                    // Ticket issued, for the wrong account. Whether S may delegate to it is still
                    // checked below, by name.
                }
                [_] => {}
                _ => return KdcAnswer::PrincipalUnknown,
            }
        }
    }
    let delegating = match facts.auth {
        AuthType::Kerberos => !matches!(facts.start, MoveStart::OnSource),
        AuthType::Credssp => facts.start == MoveStart::RemoteForwardingCredentials,
    };
    if delegating {
        let user_refused =
            unmet(RequirementId::UserNotSensitive) || unmet(RequirementId::UserNotProtected);
        // A non-forwardable ticket to S (sensitive user) still reaches the KDC as evidence with
        // MIT's GSSAPI, which refuses it; without evidence at all the meaning is the same.
        if needs_constrained_delegation(facts.auth, facts.start) {
            let listed = facts
                .source
                .delegate_entry(spn)
                .is_some_and(|e| e.effective(facts.directory));
            if !listed || unmet(RequirementId::ProtocolTransition) || user_refused {
                return KdcAnswer::BadOption;
            }
        } else if user_refused {
            return KdcAnswer::BadOption;
        }
    }
    let on_target = facts.holders(spn).is_some_and(|h| {
        h.accounts()
            .iter()
            .all(|a| a.eq_ignore_ascii_case(&facts.target.account))
    });
    if on_target {
        KdcAnswer::Ticket
    } else {
        KdcAnswer::WrongPrincipal
    }
}

#[cfg(test)]
mod tests;
