//! Text output of `vmgate delegation` (JSON is serde's).

use std::fmt::Write as _;

use vmgate_auth::delegation::configure::AccountChange;
use vmgate_auth::delegation::gather::{AccountDelegation, FindRow};
use vmgate_auth::delegation::{AuthType, DelegationFacts, MoveStart, Uac};

use super::{CheckReport, Outcome};

/// The text for an outcome.
pub fn outcome(o: &Outcome) -> String {
    match o {
        Outcome::Show(a) => show(a),
        Outcome::Find(rows) => find(rows),
        Outcome::Changed(changes) => changes.iter().map(changed).collect(),
        Outcome::Check(r) => check(r),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Every set bit of userAccountControl that matters here, by name.
fn uac_names(uac: Uac) -> String {
    let mut names = Vec::new();
    for (bit, name) in [
        (Uac::ACCOUNTDISABLE, "ACCOUNTDISABLE"),
        (Uac::NORMAL_ACCOUNT, "NORMAL_ACCOUNT"),
        (Uac::WORKSTATION_TRUST_ACCOUNT, "WORKSTATION_TRUST_ACCOUNT"),
        (Uac::SERVER_TRUST_ACCOUNT, "SERVER_TRUST_ACCOUNT"),
    ] {
        if uac.has(bit) {
            names.push(name);
        }
    }
    names.extend(uac.delegation_flag_names());
    format!("{uac} ({})", names.join(", "))
}

/// `show`.
pub fn show(a: &AccountDelegation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} ({}, {})", a.account, a.kind, a.dn);
    let _ = writeln!(
        out,
        "  userAccountControl: {}",
        uac_names(a.user_account_control)
    );
    let _ = writeln!(
        out,
        "  unconstrained delegation (TRUSTED_FOR_DELEGATION): {}",
        yes_no(a.unconstrained)
    );
    let _ = writeln!(
        out,
        "  protocol transition, \"use any authentication protocol\" \
         (TRUSTED_TO_AUTH_FOR_DELEGATION): {}",
        yes_no(a.protocol_transition)
    );
    let _ = writeln!(
        out,
        "  sensitive, cannot be delegated (NOT_DELEGATED): {}",
        yes_no(a.sensitive)
    );
    if a.allowed_to_delegate_to.is_empty() {
        out.push_str("  msDS-AllowedToDelegateTo: none (no constrained delegation)\n");
    } else {
        out.push_str("  msDS-AllowedToDelegateTo (constrained delegation):\n");
        for t in &a.allowed_to_delegate_to {
            let _ = write!(out, "    {}", t.spn);
            if let Some(why) = &t.malformed {
                let _ = write!(out, "  [malformed: {why}]");
            } else if t.holders.is_empty() {
                out.push_str("  [SPN does not exist in the domain]");
            } else {
                let _ = write!(out, "  [exists on {}", t.holders.join(", "));
                if let Some(alias) = &t.via_alias {
                    let _ = write!(out, " through {alias}");
                }
                out.push(']');
            }
            if !t.effective {
                out.push_str("  [stored without its escaped twin: Samba's KDC ignores it]");
            }
            out.push('\n');
        }
    }
    if let Some(err) = &a.resource_based_error {
        let _ = writeln!(
            out,
            "  msDS-AllowedToActOnBehalfOfOtherIdentity: cannot be decoded: {err}"
        );
    } else if a.resource_based.is_empty() {
        out.push_str(
            "  msDS-AllowedToActOnBehalfOfOtherIdentity: none (no resource-based delegation)\n",
        );
    } else {
        out.push_str(
            "  msDS-AllowedToActOnBehalfOfOtherIdentity (resource-based: these may delegate to it):\n",
        );
        for p in &a.resource_based {
            let _ = write!(
                out,
                "    {}  ({})",
                p.account.as_deref().unwrap_or("(unknown SID)"),
                p.sid
            );
            if p.denied {
                out.push_str("  [denied]");
            }
            out.push('\n');
        }
    }
    out
}

/// `find`: a table like Impacket's findDelegation.
pub fn find(rows: &[FindRow]) -> String {
    let header = [
        "AccountName",
        "AccountType",
        "DelegationType",
        "DelegationRightsTo",
        "SPN Exists",
    ];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.account.clone(),
                r.account_type.to_owned(),
                r.delegation_type.label().to_owned(),
                r.rights_to.clone().unwrap_or_else(|| "N/A".to_owned()),
                match r.spn_exists {
                    Some(true) => "Yes".to_owned(),
                    Some(false) => "No".to_owned(),
                    None => "-".to_owned(),
                },
            ]
        })
        .collect();
    if cells.is_empty() {
        return "No entries found!\n".to_owned();
    }
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cols: &[&str]| {
        let mut text = String::new();
        for (i, (c, w)) in cols.iter().zip(widths.iter()).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{c:<w$}");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &header);
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(
        &mut out,
        &dashes.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for row in &cells {
        line(
            &mut out,
            &row.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    out
}

/// A configuration command's change.
pub fn changed(c: &AccountChange) -> String {
    let mut out = String::new();
    if !c.changed() {
        let _ = writeln!(out, "{}: nothing to change (already as asked)", c.account);
    }
    if !c.added.is_empty() {
        let _ = writeln!(out, "{}: added to msDS-AllowedToDelegateTo:", c.account);
        for v in &c.added {
            let _ = writeln!(out, "\t{v}");
        }
    }
    if !c.removed.is_empty() {
        let _ = writeln!(out, "{}: removed from msDS-AllowedToDelegateTo:", c.account);
        for v in &c.removed {
            let _ = writeln!(out, "\t{v}");
        }
    }
    if c.uac_before != c.uac_after {
        let _ = writeln!(
            out,
            "{}: userAccountControl {} -> {}",
            c.account,
            uac_names(c.uac_before),
            uac_names(c.uac_after)
        );
    }
    if c.changed() {
        if c.allowed_to_delegate_to.is_empty() {
            let _ = writeln!(out, "{} may now delegate to no service.", c.account);
        } else {
            let _ = writeln!(out, "{} may now delegate to:", c.account);
            for t in &c.allowed_to_delegate_to {
                let _ = writeln!(out, "\t{}", t.spn);
            }
        }
    }
    for spn in &c.not_registered {
        let _ = writeln!(
            out,
            "warning: {spn} is not registered on any account yet; delegation to it works once \
             it is (setspn -S)"
        );
    }
    out
}

fn scenario(f: &DelegationFacts) -> String {
    let user = f.user.as_ref().map_or("the user", |u| u.name.as_str());
    let start = match f.start {
        MoveStart::OnSource => format!("started on {} with {user}'s own ticket", f.source.host),
        MoveStart::RemoteWithTicket => {
            format!(
                "started remotely, {user} authenticating to {} with Kerberos",
                f.source.host
            )
        }
        MoveStart::RemoteWithoutTicket => format!(
            "started without a ticket from {user} ({} must use protocol transition)",
            f.source.host
        ),
        MoveStart::RemoteForwardingCredentials => {
            format!(
                "started remotely, {user} forwarding credentials to {}",
                f.source.host
            )
        }
    };
    let auth = match f.auth {
        AuthType::Kerberos => "kerberos",
        AuthType::Credssp => "credssp",
    };
    format!(
        "Live move {} -> {} as {user} (auth {auth}, {start})",
        f.source.host, f.target.short
    )
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| format!("{by}{l}\n"))
        .collect::<String>()
}

/// `check`.
pub fn check(r: &CheckReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", scenario(&r.facts));
    if r.facts.start == MoveStart::OnSource {
        let _ = writeln!(
            out,
            "  (a move started on {} itself; --remote or --no-user-ticket checks one started \
             elsewhere, which needs constrained delegation)",
            r.facts.source.host
        );
    }
    for req in r.verdict.requirements() {
        let mark = if req.met { "[ok]  " } else { "[FAIL]" };
        let _ = writeln!(out, "  {mark} {}: {}", req.id, req.description);
        if let Some(d) = &req.diagnosis {
            out.push_str(&indent(&d.to_string(), "         "));
        }
    }
    if let Some(live) = &r.live {
        let _ = writeln!(
            out,
            "Live check with {}'s keytab ({}):",
            r.facts.source.host,
            live.path.describe()
        );
        for o in &live.outcomes {
            let _ = writeln!(
                out,
                "  {}: KDC says {}; predicted {} -> {}",
                o.spn,
                o.actual,
                o.predicted.name(),
                if o.agrees { "agrees" } else { "DISAGREES" }
            );
            if let Some(detail) = &o.detail {
                let _ = writeln!(out, "      ({detail})");
            }
        }
    }
    let unmet = r.verdict.unmet().count();
    match r.verdict.diagnosis() {
        None => out.push_str("Result: every requirement is met.\n"),
        Some(d) => {
            let _ = writeln!(
                out,
                "Result: {unmet} requirement{} not met; the move would fail with {} ({}).",
                if unmet == 1 { "" } else { "s" },
                d.code.hex(),
                d.code.name()
            );
        }
    }
    if let Some(live) = &r.live {
        if !live.agrees {
            out.push_str("The KDC's answer differs from the prediction: see above.\n");
        } else if r.verdict.ok() && !live.ok {
            out.push_str("The KDC refused although every requirement is met.\n");
        }
    }
    out
}
