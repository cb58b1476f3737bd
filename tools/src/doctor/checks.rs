//! The standard checks (see the module doc of [`super`] for the list and the codes).

use std::path::Path;

use vmgate_auth::delegation::analysis::shell_word;
use vmgate_auth::delegation::gather::{self, CheckRequest};
use vmgate_auth::delegation::live::{self, LiveRequest};
use vmgate_auth::delegation::{
    AuthType, DelegationError, DirectoryKind, MoveStart, Requirement, RequirementId, analyze,
};
use vmgate_auth::directory::{Account, Directory};
use vmgate_auth::krb::diagnose::quote;
use vmgate_auth::spn::Spn;
use vmgate_auth::{Diagnosis, WinCode};

use super::hosts::{self, AddressSource};
use super::kdc::{KdcError, KdcTime};
use super::keytab;
use super::{Check, CheckResult, Context, Gathered, Settings, Status};
use crate::exit;
use crate::output::error_chain;

/// The most skew Kerberos accepts (MIT's and Windows' default `clockskew`).
pub const MAX_SKEW_SECS: f64 = 300.0;
/// Skew worth a warning.
pub const WARN_SKEW_SECS: f64 = 60.0;

/// The constructed attribute with the account's current key version.
const KVNO_ATTR: &str = "msDS-KeyVersionNumber";

pub(super) fn standard() -> Vec<Check> {
    vec![
        Check {
            id: "clock-skew",
            title: "this host's clock against the KDC's",
            run: clock_skew,
        },
        Check {
            id: "resolve-source",
            title: "S's name resolves",
            run: resolve_source,
        },
        Check {
            id: "resolve-destination",
            title: "D's name resolves",
            run: resolve_destination,
        },
        Check {
            id: "kdc",
            title: "a KDC of the realm answers",
            run: kdc_reachable,
        },
        Check {
            id: "ldap",
            title: "the directory answers and binds",
            run: ldap_reachable,
        },
        Check {
            id: "spn-fqdn",
            title: "D's migration SPN (FQDN) is registered once, on D",
            run: spn_fqdn,
        },
        Check {
            id: "spn-short",
            title: "D's migration SPN (short name) is registered once, on D",
            run: spn_short,
        },
        Check {
            id: "keytab",
            title: "the hosts' keytabs hold their accounts' current keys",
            run: keytabs,
        },
        Check {
            id: "delegation",
            title: "S may act for U towards D",
            run: delegation,
        },
        Check {
            id: "user-account",
            title: "U's account is usable and may be delegated",
            run: user_account,
        },
        Check {
            id: "user-authorized",
            title: "U is allowed on D",
            run: user_authorized,
        },
    ]
}

// --- clock and KDC ---------------------------------------------------------------------------

fn kdc_fix(ctx: &mut Context) -> String {
    let realm = ctx.realm().unwrap_or_else(|| "REALM".into());
    let files = vmgate_auth::discover::config_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    format!(
        "start the domain controller; check that this host's DNS (/etc/resolv.conf) answers \
         _kerberos._tcp.{realm} SRV, or name the KDC in {files} ([realms] {realm} kdc = DC) or \
         with --kdc\ncheck with: kinit -V {}@{realm}",
        ctx.settings.user.as_deref().unwrap_or("USER")
    )
}

fn kdc_cause(err: &KdcError, realm: &str) -> String {
    match err {
        KdcError::Unreachable { addresses, source } => {
            let why = match source.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused: nothing listens on the Kerberos port there".to_owned()
                }
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    "no answer in time".to_owned()
                }
                _ => source.to_string(),
            };
            format!(
                "no KDC (domain controller) of {realm} answered at {} ({why}): no host can get a \
                 Kerberos ticket, so S cannot authenticate to D",
                addresses.join(", ")
            )
        }
        other => format!("the KDC of {realm} cannot be asked: {}", error_chain(other)),
    }
}

fn clock_skew(ctx: &mut Context) -> CheckResult {
    let t: KdcTime = match ctx.kdc() {
        Ok(t) => t.clone(),
        Err(e) => {
            return CheckResult::skip(format!("not measured: {} (see kdc)", error_chain(e)));
        }
    };
    let Some(skew) = t.skew_secs else {
        return CheckResult::warn(format!(
            "not measured: the KDC at {} answered without its time (the probe's account needs no \
             pre-authentication)",
            t.address
        ));
    };
    let side = if skew > 0.0 { "behind" } else { "ahead of" };
    let text = format!(
        "this host's clock is {:.1} s {side} the KDC's at {}; Kerberos allows {MAX_SKEW_SECS:.0} s",
        skew.abs(),
        t.address
    );
    if skew.abs() > MAX_SKEW_SECS {
        let d = Diagnosis::new(
            WinCode::TimeSkew,
            format!(
                "{text}: the KDC refuses this host's requests and every host refuses tickets \
                 whose time is that far from its own (KRB_AP_ERR_SKEW)"
            ),
        )
        .with_fix(
            "synchronise this host's clock with the domain controller: chronyc makestep (or \
             timedatectl set-ntp true), and keep chrony/ntpd pointed at the DC",
        );
        CheckResult::fail(text, d)
    } else if skew.abs() > WARN_SKEW_SECS {
        CheckResult::warn(format!(
            "{text}: within the limit, but drifting; check chrony/ntpd"
        ))
    } else {
        CheckResult::pass(text)
    }
}

fn kdc_reachable(ctx: &mut Context) -> CheckResult {
    let realm = ctx.realm().unwrap_or_else(|| "the realm".into());
    match ctx.kdc() {
        Ok(t) => {
            let t = t.clone();
            let found = ctx
                .kdc_list()
                .map(|l| format!("; KDCs: {}", l.describe()))
                .unwrap_or_default();
            CheckResult::pass(format!(
                "the KDC of {realm} at {} answers ({} ms){found}",
                t.address,
                t.round_trip.as_millis()
            ))
        }
        Err(e) => {
            let cause = kdc_cause(e, &realm);
            let unreachable = matches!(
                e,
                KdcError::Unreachable { .. } | KdcError::Resolve { .. } | KdcError::Locate(_)
            );
            let summary = error_chain(e);
            let d =
                Diagnosis::new(WinCode::NoAuthenticatingAuthority, cause).with_fix(kdc_fix(ctx));
            if unreachable {
                CheckResult::unreachable(summary, d)
            } else {
                CheckResult::fail(summary, d)
            }
        }
    }
}

// --- name resolution -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

fn resolve_source(ctx: &mut Context) -> CheckResult {
    resolve_host(ctx, Side::Source)
}

fn resolve_destination(ctx: &mut Context) -> CheckResult {
    resolve_host(ctx, Side::Target)
}

fn resolve_host(ctx: &mut Context, side: Side) -> CheckResult {
    let s = &ctx.settings;
    let (name, flag, config, flag_name, config_name) = match side {
        Side::Source => (
            s.from.clone(),
            s.from_address,
            s.from_config.clone(),
            "--from-address",
            "--from-config",
        ),
        Side::Target => (
            s.to.clone(),
            s.to_address,
            s.to_config.clone(),
            "--to-address",
            "--to-config",
        ),
    };
    let found = if let Some(a) = flag {
        Ok((vec![a], AddressSource::Flag, name.clone()))
    } else if let Some(cfg) = config.filter(|c| !c.listen.is_empty()) {
        let shown = cfg.fqdn.clone().unwrap_or_else(|| name.clone());
        Ok((
            cfg.listen.clone(),
            AddressSource::Config(cfg.path.clone()),
            shown,
        ))
    } else {
        let realm = ctx.realm();
        let dns = hosts::dns_name(&name, realm.as_deref());
        hosts::resolve(&dns, hosts::DEFAULT_PORT)
            .map(|a| (a, AddressSource::Resolver(dns.clone()), dns.clone()))
            .map_err(|e| (dns, e))
    };
    match found {
        Ok((addrs, source, shown)) => {
            let from = match &source {
                AddressSource::Flag => flag_name.to_owned(),
                AddressSource::Config(p) => format!("listen of {}", p.display()),
                AddressSource::Resolver(_) => "this machine's resolver".to_owned(),
            };
            let list = addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            match side {
                Side::Source => ctx.source_addresses = addrs,
                Side::Target => ctx.target_addresses = addrs,
            }
            CheckResult::pass(format!("{shown} -> {list} ({from})"))
        }
        Err((dns, e)) => {
            let short = name.split('.').next().unwrap_or(&name).to_owned();
            let role = if side == Side::Source { "S" } else { "D" };
            let d = Diagnosis::new(
                WinCode::TargetUnknown,
                format!(
                    "{dns} does not resolve on this machine ({e}): vmgate reaches {short} ({role}) \
                     by this name, so a move fails before any authentication"
                ),
            )
            .with_fix(format!(
                "add {short} to this host's /etc/hosts (a line: IP {dns} {short}), or give its \
                 address: {flag_name} IP, or its vmgated configuration: {config_name} FILE\n{}",
                vmgate_auth::krb::diagnose::on_domain_controller(&format!(
                    "samba-tool dns add $(hostname -f) {} {short} A IP --use-kerberos=required",
                    dns.split_once('.').map_or("ZONE", |(_, z)| z)
                ))
            ));
            CheckResult::fail(format!("{dns} does not resolve"), d)
        }
    }
}

// --- directory -------------------------------------------------------------------------------

fn ldap_reachable(ctx: &mut Context) -> CheckResult {
    let url = ctx
        .settings
        .conn
        .ldap_url
        .clone()
        .unwrap_or_else(|| "the domain controller DNS names".into());
    match ctx.directory() {
        Ok(dir) => {
            let url = dir.url().to_owned();
            let root = dir.root_dse();
            let kind = if dir.is_samba() {
                format!(
                    "Samba {}",
                    root.vendor_version
                        .as_deref()
                        .unwrap_or("(version unknown)")
                )
            } else {
                "Windows AD".to_owned()
            };
            CheckResult::pass(format!(
                "{url}: {kind}, domain {}, bound as {}",
                dir.dns_domain(),
                dir.bound_as()
            ))
        }
        Err(e) => {
            let d = e.diagnosis().unwrap_or_else(|| {
                Diagnosis::new(
                    WinCode::NoAuthenticatingAuthority,
                    format!("the directory at {url} cannot be used: {}", error_chain(e)),
                )
                .with_fix(
                    "check --ldap-url / VMGATE_LDAP_URL, --ldap-ca, the bind user and password \
                     file, and that the domain controller runs",
                )
            });
            let summary = error_chain(e);
            if e.exit_code() == exit::UNREACHABLE {
                CheckResult::unreachable(summary, d)
            } else {
                CheckResult::fail(summary, d)
            }
        }
    }
}

/// Reads the facts every directory check uses.
pub(super) fn gather(dir: &Directory, s: &Settings) -> Result<Gathered, DelegationError> {
    Spn::new(&s.service_class, "host")?;
    let request = CheckRequest {
        from: s.from.clone(),
        to: s.to.clone(),
        user: None,
        auth: s.auth,
        start: s.start,
        service_class: s.service_class.clone(),
    };
    let mut facts = gather::gather_facts(dir, &request)?;
    let source = gather::find_host(dir, &s.from)?;
    let target = gather::find_host(dir, &s.to)?;
    let user = s.user.as_ref().map(|name| {
        gather::user_facts(dir, name).map(|(account, uf)| {
            facts.user = Some(uf);
            account
        })
    });
    let verdict = analyze(&facts);
    Ok(Gathered {
        facts,
        verdict,
        source,
        target,
        user,
    })
}

/// The gathered facts, or the result a check reports without them.
fn need_facts(ctx: &mut Context) -> Result<&Gathered, CheckResult> {
    match ctx.gathered() {
        None => Err(CheckResult::skip(
            "not checked: the directory cannot be used (see ldap)",
        )),
        Some(Ok(g)) => Ok(g),
        Some(Err(e)) => Err(gather_failure(e)),
    }
}

fn gather_failure(e: &DelegationError) -> CheckResult {
    let d = match e {
        DelegationError::UnknownHost { name } => Diagnosis::new(
            WinCode::TargetUnknown,
            format!(
                "there is no computer account for {name} in the domain: it has no SPNs and no \
                 keys, so no ticket can be issued for it"
            ),
        )
        .with_fix(format!(
            "on {name}: realm join DOMAIN (or adcli join DOMAIN, or net ads join -k)\nor check \
             the name: setspn -Q HOST/{name}"
        )),
        other => Diagnosis::new(
            WinCode::NoAuthenticatingAuthority,
            format!("the directory could not be read: {}", error_chain(other)),
        ),
    };
    CheckResult::fail(error_chain(e), d)
}

/// The result for a group of requirements: passed when all are met, else failed with the first
/// unmet one's code, every unmet one's cause, and all their fixes (commands first, then the
/// alternatives, each once) — so that applying the fix once makes the whole check pass.
fn requirements_result(reqs: &[&Requirement], pass: impl FnOnce() -> String) -> CheckResult {
    let unmet: Vec<&&Requirement> = reqs.iter().filter(|r| !r.met).collect();
    let Some(first) = unmet.first() else {
        return CheckResult::pass(pass());
    };
    if unmet.len() == 1 {
        return requirement_result(first);
    }
    let code = first
        .diagnosis
        .as_ref()
        .map_or(WinCode::NoCredentials, |d| d.code);
    let cause = unmet
        .iter()
        .map(|r| {
            r.diagnosis
                .as_ref()
                .map_or_else(|| r.description.clone(), |d| d.cause.clone())
        })
        .collect::<Vec<_>>()
        .join("\nand ");
    let mut commands: Vec<&str> = Vec::new();
    let mut alternatives: Vec<&str> = Vec::new();
    for line in unmet
        .iter()
        .filter_map(|r| r.diagnosis.as_ref()?.fix.as_deref())
        .flat_map(str::lines)
    {
        let list = if line.starts_with("or ") {
            &mut alternatives
        } else {
            &mut commands
        };
        if !list.contains(&line) {
            list.push(line);
        }
    }
    commands.extend(alternatives);
    let mut d = Diagnosis::new(code, cause);
    if !commands.is_empty() {
        d = d.with_fix(commands.join("\n"));
    }
    CheckResult::fail(
        format!(
            "{} requirements not met: {}",
            unmet.len(),
            first.description
        ),
        d,
    )
}

fn requirement_result(r: &Requirement) -> CheckResult {
    match (&r.diagnosis, r.met) {
        (_, true) => CheckResult::pass(r.description.clone()),
        (Some(d), false) => CheckResult::fail(r.description.clone(), d.clone()),
        (None, false) => CheckResult::fail(
            r.description.clone(),
            Diagnosis::new(WinCode::NoCredentials, r.description.clone()),
        ),
    }
}

fn spn_check(ctx: &mut Context, id: RequirementId) -> CheckResult {
    let g = match need_facts(ctx) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let samba = g.facts.directory == DirectoryKind::Samba;
    match g.verdict.requirements().iter().find(|r| r.id == id) {
        Some(r) => {
            let mut result = requirement_result(r);
            if r.met && samba {
                result = result.detail("stored with its escaped twin, as Samba's KDC needs");
            }
            result
        }
        None => CheckResult::skip("not part of this verdict"),
    }
}

fn spn_fqdn(ctx: &mut Context) -> CheckResult {
    spn_check(ctx, RequirementId::TargetSpnFqdn)
}

fn spn_short(ctx: &mut Context) -> CheckResult {
    spn_check(ctx, RequirementId::TargetSpnShort)
}

// --- keytabs ---------------------------------------------------------------------------------

/// What one keytab check found.
enum KeytabFinding {
    Current(String),
    Note(String),
    Problem(String, Diagnosis),
}

/// `vmgate host keytab refresh` for `host`'s keytab, run on that host: a new password set
/// the way `adcli update` sets it and the keytab rewritten for the account and all its SPNs;
/// `--reset` lets it set the password over LDAP when the keytab's key no longer works.
fn keytab_fix(host: &str, path: &Path, account: &str) -> String {
    let keytab = if path == Path::new("/etc/krb5.keytab") {
        String::new()
    } else {
        format!(" --keytab {}", quote(&path.display().to_string()))
    };
    format!(
        "on {host}: vmgate host keytab refresh{keytab} --account {} --reset   (as root, with a \
         domain administrator's ticket: kinit Administrator)\nthen restart vmgated on {host} so \
         it reads the new keys",
        quote(account)
    )
}

fn check_keytab(
    dir: &Directory,
    account: &Account,
    host: &str,
    path: &Path,
    explicit: bool,
) -> KeytabFinding {
    let sam = &account.sam_account_name;
    let entries = match keytab::read(path) {
        Ok(e) => e,
        Err(e)
            if !explicit
                && matches!(&e, keytab::KeytabError::Read { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied) =>
        {
            return KeytabFinding::Note(format!(
                "{host}'s keytab {} is not readable by this user (run as root to check it)",
                path.display()
            ));
        }
        Err(e) => {
            return KeytabFinding::Problem(
                format!("{host}'s keytab: {}", error_chain(&e)),
                Diagnosis::new(
                    WinCode::UnknownCredentials,
                    format!(
                        "{host} cannot use its keytab: {}; without its keys {host} can neither \
                         accept nor request tickets",
                        error_chain(&e)
                    ),
                )
                .with_fix(keytab_fix(host, path, sam)),
            );
        }
    };
    let newest = keytab::newest_kvnos(&entries);
    let spns = account.spns();
    let ours: Vec<(String, u32)> = newest
        .iter()
        .filter(|(n, _)| {
            n.eq_ignore_ascii_case(sam) || spns.iter().any(|s| s.eq_ignore_ascii_case(n))
        })
        .cloned()
        .collect();
    if ours.is_empty() {
        let found = newest
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return KeytabFinding::Problem(
            format!("{host}'s keytab {} holds no key of {sam}", path.display()),
            Diagnosis::new(
                WinCode::UnknownCredentials,
                format!(
                    "the keytab {} holds no key for {sam} or its SPNs (it holds: {}): it is not \
                     {host}'s keytab, or was exported before {host} joined",
                    path.display(),
                    if found.is_empty() { "nothing" } else { &found }
                ),
            )
            .with_fix(keytab_fix(host, path, sam)),
        );
    }
    let directory_kvno = match dir.read(&account.dn, &[KVNO_ATTR]) {
        Ok(Some(e)) => e
            .first(KVNO_ATTR)
            .and_then(|v| v.trim().parse::<u32>().ok()),
        _ => None,
    };
    let Some(current) = directory_kvno else {
        return KeytabFinding::Note(format!(
            "{host}: the directory does not show {sam}'s {KVNO_ATTR} to this bind user; key \
             versions not compared"
        ));
    };
    let listing = ours
        .iter()
        .map(|(n, k)| format!("{n} kvno {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let stale: Vec<&(String, u32)> = ours.iter().filter(|(_, k)| *k != current).collect();
    if stale.is_empty() {
        return KeytabFinding::Current(format!(
            "{host}: {} holds key version {current} of {sam} ({})",
            path.display(),
            ours.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let older = stale.iter().all(|(_, k)| *k < current);
    let cause = if older {
        format!(
            "the keytab {} holds older keys of {sam} than the directory ({listing}; {sam}'s \
             {KVNO_ATTR} is {current}): {sam}'s password changed after the keytab was exported. \
             Tickets for {host}'s SPNs are now encrypted with the new key, which {host} cannot \
             decrypt: MIT Kerberos says \"Wrong principal in request\" while decrypting \
             (KRB_AP_WRONG_PRINC), which Windows reports as 0x80090322; and {host} cannot get \
             tickets of its own with the old key: \"Preauthentication failed\" \
             (KDC_ERR_PREAUTH_FAILED)",
            path.display()
        )
    } else {
        format!(
            "the keytab {} holds key versions the directory does not have ({listing}; {sam}'s \
             {KVNO_ATTR} is {current}): the account was re-created or reset after the keytab was \
             exported, so tickets for {host} are encrypted with a key {host} does not hold",
            path.display()
        )
    };
    KeytabFinding::Problem(
        format!(
            "{host}'s keytab {} is stale: {listing}, the directory is at {current}",
            path.display()
        ),
        Diagnosis::new(WinCode::WrongPrincipal, cause).with_fix(keytab_fix(host, path, sam)),
    )
}

fn keytabs(ctx: &mut Context) -> CheckResult {
    let source_kt = ctx.settings.source_keytab.clone();
    let target_kt = ctx.settings.target_keytab.clone();
    if source_kt.is_none() && target_kt.is_none() {
        return CheckResult::skip(
            "no keytab given (--keytab for S's, --to-keytab for D's, or their vmgated configs)",
        );
    }
    let dir = match ctx.directory() {
        Ok(d) => d.clone(),
        Err(_) => return CheckResult::skip("not checked: the directory cannot be used (see ldap)"),
    };
    let g = match need_facts(ctx) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let mut findings = Vec::new();
    if let Some((path, explicit)) = &source_kt {
        findings.push(check_keytab(
            &dir,
            &g.source,
            &g.facts.source.host,
            path,
            *explicit,
        ));
    }
    if let Some((path, explicit)) = &target_kt {
        findings.push(check_keytab(
            &dir,
            &g.target,
            &g.facts.target.short,
            path,
            *explicit,
        ));
    }
    let mut current = Vec::new();
    let mut notes = Vec::new();
    let mut problem = None;
    for f in findings {
        match f {
            KeytabFinding::Current(t) => current.push(t),
            KeytabFinding::Note(t) => notes.push(t),
            KeytabFinding::Problem(summary, d) => {
                if problem.is_none() {
                    problem = Some((summary, d));
                } else {
                    notes.push(summary);
                }
            }
        }
    }
    let mut lines = current.iter().chain(notes.iter()).cloned();
    let mut result = match (problem, current.is_empty()) {
        (Some((summary, d)), _) => CheckResult::fail(summary, d),
        (None, true) => CheckResult::warn(lines.next().unwrap_or_default()),
        (None, false) => CheckResult::pass(lines.next().unwrap_or_default()),
    };
    for line in lines {
        result = result.detail(line);
    }
    result
}

// --- delegation and the user ---------------------------------------------------------------

fn is_delegation_requirement(id: RequirementId) -> bool {
    matches!(
        id,
        RequirementId::SourceMayDelegate
            | RequirementId::ProtocolTransition
            | RequirementId::CredsspCredentials
    )
}

fn is_user_requirement(id: RequirementId) -> bool {
    matches!(
        id,
        RequirementId::UserEnabled
            | RequirementId::UserNotSensitive
            | RequirementId::UserNotProtected
    )
}

fn requirement_lines(reqs: &[&Requirement]) -> Vec<String> {
    reqs.iter()
        .map(|r| {
            format!(
                "{} {}",
                if r.met { "[ok]" } else { "[unmet]" },
                r.description
            )
        })
        .collect()
}

fn delegation(ctx: &mut Context) -> CheckResult {
    let kdc_ok = ctx.status_of("kdc") == Some(Status::Pass);
    let keytab = ctx.settings.source_keytab.clone().map(|(p, _)| p);
    let target_keytab = ctx.settings.target_keytab.clone().map(|(p, _)| p);
    let user_ccache = ctx.settings.user_ccache.clone();
    let realm_from_dir = ctx.directory().ok().map(Directory::realm);
    let dir = ctx.directory().ok().cloned();
    let g = match need_facts(ctx) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let reqs: Vec<&Requirement> = g
        .verdict
        .requirements()
        .iter()
        .filter(|r| is_delegation_requirement(r.id))
        .collect();
    let spns_ok = g
        .verdict
        .requirements()
        .iter()
        .filter(|r| {
            matches!(
                r.id,
                RequirementId::TargetSpnFqdn | RequirementId::TargetSpnShort
            )
        })
        .all(|r| r.met);
    let user_ok = g
        .verdict
        .requirements()
        .iter()
        .filter(|r| is_user_requirement(r.id))
        .all(|r| r.met);
    let mut result = requirements_result(&reqs, || {
        let s = &g.facts.source;
        match (g.facts.auth, g.facts.start) {
            (_, MoveStart::OnSource) => format!(
                "no delegation needed: the move starts on {} with the user's own credentials",
                s.host
            ),
            (AuthType::Kerberos, MoveStart::RemoteForwardingCredentials)
            | (AuthType::Credssp, _) => format!(
                "{} receives the user's forwarded credentials; nothing to delegate",
                s.host
            ),
            (AuthType::Kerberos, MoveStart::RemoteWithoutTicket) => format!(
                "{} may delegate to {}'s migration SPNs with protocol transition",
                s.account, g.facts.target.short
            ),
            (AuthType::Kerberos, MoveStart::RemoteWithTicket) => format!(
                "{} may delegate to {}'s migration SPNs (\"Kerberos only\" is enough)",
                s.account, g.facts.target.short
            ),
        }
    });
    for line in requirement_lines(&reqs) {
        result = result.detail(line);
    }
    // The live check: ask the KDC for what S would ask for, with S's keytab.
    let Some(keytab) = keytab else {
        return result.detail("live check not run: no keytab of S (--keytab)");
    };
    if !kdc_ok {
        return result.detail("live check not run: the KDC does not answer (see kdc)");
    }
    if !spns_ok {
        return result.detail(
            "live check not run: D's migration SPNs are not in order (see spn-fqdn, spn-short)",
        );
    }
    let (Some(dir), Some(realm)) = (dir, realm_from_dir) else {
        return result;
    };
    let source_spn = match Spn::new("HOST", &gather::host_fqdn(&dir, &g.source)) {
        Ok(s) => s,
        Err(e) => return result.detail(format!("live check not run: {e}")),
    };
    let spns: Vec<Spn> = g
        .facts
        .migration_spns()
        .iter()
        .filter_map(|s| Spn::parse(s).ok())
        .collect();
    let ccache_dir = vmgate_auth::delegation::live::scratch_ccache_dir("vmgate-doctor");
    let request = LiveRequest {
        realm,
        keytab,
        source_account: g.facts.source.account.clone(),
        source_spn,
        target_keytab,
        target_account: g.facts.target.account.clone(),
        spns,
        user: g.facts.user.as_ref().map(|u| u.name.clone()),
        user_ccache,
        start: g.facts.start,
        auth: g.facts.auth,
        ccache_dir: ccache_dir.clone(),
    };
    let live = live::run(&request, &g.verdict);
    let _ = std::fs::remove_dir_all(&ccache_dir);
    let report = match live {
        Ok(r) => r,
        Err(live::LiveError::NeedsUserCcache { user }) => {
            return result.detail(format!(
                "live check not run: this move starts with {user}'s own ticket; kinit {user} and \
                 pass the cache with --user-ccache (or KRB5CCNAME)"
            ));
        }
        Err(e) => return result.detail(format!("live check not run: {}", error_chain(&e))),
    };
    let mut lines = vec![format!(
        "live check with S's keytab ({}):",
        report.path.describe()
    )];
    for o in &report.outcomes {
        lines.push(format!(
            "  {}: the KDC says {}{}",
            o.spn,
            o.actual,
            if o.agrees {
                ""
            } else {
                " (not what the directory predicts)"
            }
        ));
    }
    for l in lines {
        result = result.detail(l);
    }
    let refused = report
        .outcomes
        .iter()
        .find(|o| o.actual.win_code().is_some());
    match refused {
        Some(o) if result.status != Status::Fail && user_ok => {
            let code = o.actual.win_code().unwrap_or(WinCode::NoCredentials);
            let d = Diagnosis::new(
                code,
                format!(
                    "the directory says {} may act for the user towards {}, but the KDC refused \
                     {} ({}{}): a setting the directory does not show (a KDC policy, a stale \
                     ticket cache, another DC not yet replicated)",
                    g.facts.source.host,
                    g.facts.target.short,
                    o.spn,
                    o.actual,
                    o.detail
                        .as_ref()
                        .map(|d| format!("; {d}"))
                        .unwrap_or_default()
                ),
            );
            let details = std::mem::take(&mut result.details);
            let mut r = CheckResult::fail(
                format!("the KDC refused what the directory allows: {}", o.actual),
                d,
            );
            r.details = details;
            r
        }
        None if result.status == Status::Pass => {
            result.summary.push_str(" (confirmed by the KDC)");
            result
        }
        _ => result,
    }
}

fn user_account(ctx: &mut Context) -> CheckResult {
    if ctx.settings.user.is_none() {
        return CheckResult::skip("no user given (--user U)");
    }
    let name = ctx.settings.user.clone().unwrap_or_default();
    let g = match need_facts(ctx) {
        Ok(g) => g,
        Err(r) => return r,
    };
    if let Some(Err(e)) = &g.user {
        let d = Diagnosis::new(
            WinCode::LogonDenied,
            format!(
                "there is no account {name} in the domain: {}",
                error_chain(e)
            ),
        )
        .with_fix(format!(
            "check the name: vmgate delegation show {}",
            shell_word(&name)
        ));
        return CheckResult::fail(error_chain(e), d);
    }
    let reqs: Vec<&Requirement> = g
        .verdict
        .requirements()
        .iter()
        .filter(|r| is_user_requirement(r.id))
        .collect();
    let mut result = requirements_result(&reqs, || {
        let name = g
            .facts
            .user
            .as_ref()
            .map_or("the user", |u| u.name.as_str());
        if reqs.iter().any(|r| r.id == RequirementId::UserNotSensitive) {
            format!("{name} is enabled, may be delegated, and is not in Protected Users")
        } else {
            format!("{name} is enabled (nothing is delegated for this move)")
        }
    });
    for line in requirement_lines(&reqs) {
        result = result.detail(line);
    }
    result
}

fn user_authorized(ctx: &mut Context) -> CheckResult {
    let Some(name) = ctx.settings.user.clone() else {
        return CheckResult::skip("no user given (--user U)");
    };
    let group = ctx.settings.admin_group.clone();
    let dir = match ctx.directory() {
        Ok(d) => d.clone(),
        Err(_) => return CheckResult::skip("not checked: the directory cannot be used (see ldap)"),
    };
    let g = match need_facts(ctx) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let d_host = g.facts.target.short.clone();
    let Some(Ok(user)) = &g.user else {
        return CheckResult::skip(format!(
            "not checked: {name}'s account cannot be read (see user-account)"
        ));
    };
    let samba = dir.is_samba();
    let add_fix = |user: &str| {
        format!(
            "{}\nthen {user} gets a new ticket: kdestroy; kinit {user}",
            vmgate_auth::delegation::analysis::admin_fix(
                samba,
                &format!(
                    "samba-tool group addmembers {} {}",
                    shell_word(&group),
                    shell_word(user)
                ),
                &format!(
                    "Add-ADGroupMember -Identity {} -Members {}",
                    shell_word(&group),
                    shell_word(user)
                ),
            )
        )
    };
    let entry = match dir.find_group(&group) {
        Ok(e) => e,
        Err(e) => {
            let d = Diagnosis::new(
                WinCode::NoAuthenticatingAuthority,
                format!(
                    "the group \"{group}\" could not be looked up: {}",
                    error_chain(&e)
                ),
            );
            return CheckResult::fail(error_chain(&e), d);
        }
    };
    let Some(entry) = entry else {
        let d = Diagnosis::new(
            WinCode::AccessDenied,
            format!(
                "{d_host} admits members of \"{group}\" (its admin_group), but that group does not \
                 exist in the directory: {d_host} refuses every user with E_ACCESSDENIED"
            ),
        )
        .with_fix(format!(
            "{}\n{}",
            vmgate_auth::delegation::analysis::admin_fix(
                samba,
                &format!("samba-tool group add {}", shell_word(&group)),
                &format!(
                    "New-ADGroup -Name {} -GroupScope Global",
                    shell_word(&group)
                ),
            ),
            add_fix(&user.sam_account_name)
        ));
        return CheckResult::fail(format!("the group \"{group}\" does not exist"), d);
    };
    match dir.is_member_of(&user.dn, &entry.dn) {
        Ok(true) => CheckResult::pass(format!(
            "{} is a member of \"{group}\", which {d_host} admits",
            user.sam_account_name
        )),
        Ok(false) => {
            let u = &user.sam_account_name;
            let d = Diagnosis::new(
                WinCode::AccessDenied,
                format!(
                    "{u} would authenticate to {d_host}, but {d_host} admits only members of \
                     \"{group}\" (its admin_group) and {u} is not one, directly or through nested \
                     groups: {d_host} refuses the move"
                ),
            )
            .with_fix(add_fix(u));
            CheckResult::fail(format!("{u} is not a member of \"{group}\""), d)
        }
        Err(e) => {
            let d = Diagnosis::new(
                WinCode::NoAuthenticatingAuthority,
                format!(
                    "membership of \"{group}\" could not be read: {}",
                    error_chain(&e)
                ),
            );
            CheckResult::fail(error_chain(&e), d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmet(id: RequirementId, code: WinCode, cause: &str, fix: &str) -> Requirement {
        Requirement {
            id,
            description: format!("{id} holds"),
            met: false,
            diagnosis: Some(Diagnosis::new(code, cause).with_fix(fix)),
        }
    }

    #[test]
    fn several_unmet_requirements_give_one_fix_that_covers_them_all() {
        let a = unmet(
            RequirementId::SourceMayDelegate,
            WinCode::NoCredentials,
            "not listed",
            "vmgate delegation add-service hv1 X\nor start the move on hv1 itself",
        );
        let b = unmet(
            RequirementId::ProtocolTransition,
            WinCode::NoCredentials,
            "kerberos only",
            "vmgate delegation for-any-protocol hv1 on\nor start the move on hv1 itself",
        );
        let met = Requirement {
            id: RequirementId::UserEnabled,
            description: "fine".into(),
            met: true,
            diagnosis: None,
        };
        let r = requirements_result(&[&met, &a, &b], String::new);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.summary,
            "2 requirements not met: source-may-delegate holds"
        );
        let d = r.diagnosis.unwrap();
        assert_eq!(d.code, WinCode::NoCredentials);
        assert_eq!(d.cause, "not listed\nand kerberos only");
        assert_eq!(
            d.fix.as_deref(),
            Some(
                "vmgate delegation add-service hv1 X\nvmgate delegation for-any-protocol hv1 \
                 on\nor start the move on hv1 itself"
            )
        );
        let one = requirements_result(&[&met, &a], String::new);
        assert_eq!(one.summary, "source-may-delegate holds");
        let ok = requirements_result(&[&met], || "all good".into());
        assert_eq!((ok.status, ok.summary.as_str()), (Status::Pass, "all good"));
    }
}
