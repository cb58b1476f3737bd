//! Configuring delegation: msDS-AllowedToDelegateTo entries (with Samba's escaped twins), the
//! protocol-transition and sensitive flags, and `allow-migration`, which writes exactly what a
//! live migration between two hosts needs.
//!
//! Every command validates all of its input (SPNs, accounts) before it writes anything, and
//! writes each account in one LDAP modify, which the server applies atomically: a refused
//! change (insufficient rights, a constraint) leaves the account as it was.

use serde::Serialize;

use super::DelegationError;
use super::facts::{DelegateTo, DirectoryKind, MIGRATION_SERVICE_CLASS, Uac, collapse_twins};
use super::gather::{find_any, find_host, host_fqdn, host_name};
use crate::directory::spns::{DELEGATE_TO_ATTR, SPN_ATTR};
use crate::directory::{Account, AccountKind, Change, Directory};
use crate::spn::{self, Spn};

/// The attribute holding the flags.
pub const UAC_ATTR: &str = "userAccountControl";

/// What a configuration command changed on one account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccountChange {
    /// sAMAccountName.
    pub account: String,
    /// The DN.
    pub dn: String,
    /// Values written to msDS-AllowedToDelegateTo (plain forms and twins).
    pub added: Vec<String>,
    /// Values removed from msDS-AllowedToDelegateTo.
    pub removed: Vec<String>,
    /// userAccountControl before.
    pub uac_before: Uac,
    /// userAccountControl after.
    pub uac_after: Uac,
    /// msDS-AllowedToDelegateTo afterwards, twins collapsed, sorted.
    pub allowed_to_delegate_to: Vec<DelegateTo>,
    /// SPNs now listed that no account in the domain holds yet (a warning: delegation to them
    /// works only once they are registered).
    pub not_registered: Vec<String>,
}

impl AccountChange {
    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty() || self.uac_before != self.uac_after
    }
}

/// Parses SPNs given on the command line; the first malformed one is an error.
pub fn parse_spns<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Spn>, DelegationError> {
    if texts.is_empty() {
        return Err(DelegationError::NoSpn);
    }
    texts
        .iter()
        .map(|t| Spn::parse(t.as_ref()).map_err(DelegationError::from))
        .collect()
}

/// The values to add to `current` so that every SPN of `spns` is listed (its twin too on
/// Samba). Values already present (in any case) are not repeated.
pub fn plan_add(current: &[String], spns: &[Spn], kind: DirectoryKind) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in spns {
        for v in spn::stored_values(s, kind == DirectoryKind::Samba) {
            let present = current
                .iter()
                .chain(out.iter())
                .any(|c| c.eq_ignore_ascii_case(&v));
            if !present {
                out.push(v);
            }
        }
    }
    out
}

/// The values to delete from `current` so that no SPN of `spns` is listed (plain in any case,
/// and the twin). An SPN that is not listed at all is an error, and nothing is planned.
pub fn plan_del(
    current: &[String],
    spns: &[Spn],
    account: &str,
) -> Result<Vec<String>, DelegationError> {
    let mut out: Vec<String> = Vec::new();
    for s in spns {
        let naming = spn::values_naming(s, current);
        if naming.is_empty() {
            return Err(DelegationError::NotListed {
                spn: s.to_string(),
                account: account.to_owned(),
            });
        }
        for v in naming {
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// userAccountControl as AD stores it: a signed 32-bit decimal.
fn uac_value(uac: Uac) -> String {
    i32::from_le_bytes(uac.0.to_le_bytes()).to_string()
}

fn after(current: &[String], added: &[String], removed: &[String]) -> Vec<DelegateTo> {
    let values: Vec<String> = current
        .iter()
        .filter(|v| !removed.contains(v))
        .chain(added.iter())
        .cloned()
        .collect();
    let mut out = collapse_twins(&values);
    out.sort_by_key(|e| e.spn.to_lowercase());
    out
}

/// Writes one account's changes in one modify.
fn apply(
    dir: &Directory,
    account: &Account,
    add: Vec<String>,
    remove: Vec<String>,
    uac_after: Uac,
) -> Result<AccountChange, DelegationError> {
    let uac_before = Uac(account.user_account_control);
    let mut changes = Vec::new();
    if !remove.is_empty() {
        changes.push(Change::Delete(DELEGATE_TO_ATTR.to_owned(), remove.clone()));
    }
    if !add.is_empty() {
        changes.push(Change::Add(DELEGATE_TO_ATTR.to_owned(), add.clone()));
    }
    if uac_after != uac_before {
        changes.push(Change::Replace(
            UAC_ATTR.to_owned(),
            vec![uac_value(uac_after)],
        ));
    }
    if !changes.is_empty() {
        dir.modify(&account.dn, changes)?;
    }
    let allowed = after(&account.allowed_to_delegate_to, &add, &remove);
    let mut not_registered = Vec::new();
    for entry in &allowed {
        if let Ok(s) = Spn::parse(&entry.spn) {
            if add.iter().any(|a| s.matches_value(a)) && dir.spn_holders(&s)?.is_empty() {
                not_registered.push(entry.spn.clone());
            }
        }
    }
    Ok(AccountChange {
        account: account.sam_account_name.clone(),
        dn: account.dn.clone(),
        added: add,
        removed: remove,
        uac_before,
        uac_after,
        allowed_to_delegate_to: allowed,
        not_registered,
    })
}

/// `add-service ACCOUNT SPN...`: lets ACCOUNT delegate to each SPN.
pub fn add_service<S: AsRef<str>>(
    dir: &Directory,
    account: &str,
    spns: &[S],
) -> Result<AccountChange, DelegationError> {
    let spns = parse_spns(spns)?;
    let account = find_any(dir, account, AccountKind::Any)?;
    let add = plan_add(
        &account.allowed_to_delegate_to,
        &spns,
        DirectoryKind::of(dir),
    );
    let uac = Uac(account.user_account_control);
    apply(dir, &account, add, Vec::new(), uac)
}

/// `del-service ACCOUNT SPN...`: removes each SPN (and its twin) from ACCOUNT's list.
pub fn del_service<S: AsRef<str>>(
    dir: &Directory,
    account: &str,
    spns: &[S],
) -> Result<AccountChange, DelegationError> {
    let spns = parse_spns(spns)?;
    let account = find_any(dir, account, AccountKind::Any)?;
    let remove = plan_del(
        &account.allowed_to_delegate_to,
        &spns,
        &account.sam_account_name,
    )?;
    let uac = Uac(account.user_account_control);
    apply(dir, &account, Vec::new(), remove, uac)
}

/// Sets or clears a userAccountControl flag (`for-any-protocol`: TRUSTED_TO_AUTH_FOR_DELEGATION;
/// `sensitive`: NOT_DELEGATED).
pub fn set_flag(
    dir: &Directory,
    account: &str,
    bit: u32,
    on: bool,
) -> Result<AccountChange, DelegationError> {
    let account = find_any(dir, account, AccountKind::Any)?;
    let uac = Uac(account.user_account_control).with(bit, on);
    apply(dir, &account, Vec::new(), Vec::new(), uac)
}

/// Options of `allow-migration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Also set TRUSTED_TO_AUTH_FOR_DELEGATION ("use any authentication protocol").
    pub any_protocol: bool,
    /// Also let D delegate to S (moves back).
    pub both_ways: bool,
    /// The migration service class.
    pub service_class: String,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            any_protocol: false,
            both_ways: false,
            service_class: MIGRATION_SERVICE_CLASS.to_owned(),
        }
    }
}

/// What a migration to a host needs S to delegate to: its migration SPN in FQDN and short
/// form, and `cifs/` in both forms (as the Hyper-V documentation advises, for storage on SMB
/// shares).
pub fn migration_targets(
    service_class: &str,
    short: &str,
    fqdn: &str,
) -> Result<Vec<Spn>, DelegationError> {
    Ok(vec![
        Spn::new(service_class, fqdn)?,
        Spn::new(service_class, short)?,
        Spn::new("cifs", fqdn)?,
        Spn::new("cifs", short)?,
    ])
}

/// `allow-migration --from S --to D [--any-protocol] [--both-ways]`.
pub fn allow_migration(
    dir: &Directory,
    from: &str,
    to: &str,
    opts: &MigrationOptions,
) -> Result<Vec<AccountChange>, DelegationError> {
    // Validate everything first: both hosts, every SPN.
    let source = find_host(dir, from)?;
    let target = find_host(dir, to)?;
    if source.dn.eq_ignore_ascii_case(&target.dn) {
        return Err(DelegationError::SameHost {
            host: host_name(&source),
        });
    }
    let kind = DirectoryKind::of(dir);
    let mut plan = vec![(
        source.clone(),
        migration_targets(
            &opts.service_class,
            &host_name(&target),
            &host_fqdn(dir, &target),
        )?,
    )];
    if opts.both_ways {
        plan.push((
            target.clone(),
            migration_targets(
                &opts.service_class,
                &host_name(&source),
                &host_fqdn(dir, &source),
            )?,
        ));
    }
    let mut done: Vec<AccountChange> = Vec::new();
    for (account, spns) in &plan {
        let add = plan_add(&account.allowed_to_delegate_to, spns, kind);
        // Without --any-protocol an existing "any protocol" setting is left as it is.
        let mut uac = Uac(account.user_account_control);
        if opts.any_protocol {
            uac = uac.with(Uac::TRUSTED_TO_AUTH_FOR_DELEGATION, true);
        }
        match apply(dir, account, add, Vec::new(), uac) {
            Ok(change) => done.push(change),
            Err(e) => {
                // Undo what the first account got, so that a refused second half changes
                // nothing. The undo is best effort: its own failure is reported with the error.
                for change in done.iter().filter(|c| c.changed()) {
                    undo(dir, change)?;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

fn undo(dir: &Directory, change: &AccountChange) -> Result<(), DelegationError> {
    let mut changes = Vec::new();
    if !change.added.is_empty() {
        changes.push(Change::Delete(
            DELEGATE_TO_ATTR.to_owned(),
            change.added.clone(),
        ));
    }
    if change.uac_before != change.uac_after {
        changes.push(Change::Replace(
            UAC_ATTR.to_owned(),
            vec![uac_value(change.uac_before)],
        ));
    }
    if !changes.is_empty() {
        dir.modify(&change.dn, changes)?;
    }
    Ok(())
}

/// Registers `spn` on the host `host` (plain and, on Samba, twin) unless it is there already;
/// used by tests and fixes. Returns the values written.
pub fn register_spn(
    dir: &Directory,
    host: &str,
    spn: &Spn,
) -> Result<Vec<String>, DelegationError> {
    let account = find_host(dir, host)?;
    Ok(dir.add_spn_value(&account.dn, SPN_ATTR, spn, &account.service_principal_names)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIG: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";
    const MIG_TWIN: &str = r"Microsoft\ Virtual\ System\ Migration\ Service/hv2.lab.example.test";

    fn spns(t: &[&str]) -> Vec<Spn> {
        parse_spns(t).unwrap()
    }

    #[test]
    fn add_writes_twins_on_samba_only_and_skips_present_values() {
        let s = spns(&[MIG, "cifs/hv2"]);
        assert_eq!(
            plan_add(&[], &s, DirectoryKind::Samba),
            vec![MIG.to_owned(), MIG_TWIN.to_owned(), "cifs/hv2".to_owned()]
        );
        assert_eq!(
            plan_add(&[], &s, DirectoryKind::Windows),
            vec![MIG.to_owned(), "cifs/hv2".to_owned()]
        );
        // Plain present (other case): only the missing twin is written.
        let current = vec![MIG.to_uppercase(), "CIFS/HV2".to_owned()];
        assert_eq!(
            plan_add(&current, &s, DirectoryKind::Samba),
            vec![MIG_TWIN.to_owned()]
        );
        // Repeated SPNs are written once.
        assert_eq!(
            plan_add(&[], &spns(&["cifs/x", "CIFS/X"]), DirectoryKind::Samba).len(),
            1
        );
    }

    #[test]
    fn del_removes_plain_and_twin_or_refuses() {
        let current = vec![MIG.to_owned(), MIG_TWIN.to_owned(), "cifs/hv2".to_owned()];
        assert_eq!(
            plan_del(&current, &spns(&[MIG]), "HV1$").unwrap(),
            vec![MIG.to_owned(), MIG_TWIN.to_owned()]
        );
        let err = plan_del(&current, &spns(&["cifs/hv2", "cifs/hv9"]), "HV1$").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cifs/hv9 is not in msDS-AllowedToDelegateTo of HV1$: nothing was changed"
        );
    }

    #[test]
    fn malformed_spns_are_refused() {
        assert!(matches!(
            parse_spns(&["no-slash"]),
            Err(DelegationError::BadSpn(_))
        ));
        assert!(matches!(
            parse_spns::<&str>(&[]),
            Err(DelegationError::NoSpn)
        ));
        assert!(matches!(
            parse_spns(&["cifs/ok", "/x"]),
            Err(DelegationError::BadSpn(_))
        ));
    }

    #[test]
    fn migration_targets_are_the_four_spns() {
        let t: Vec<String> =
            migration_targets(MIGRATION_SERVICE_CLASS, "hv2", "hv2.lab.example.test")
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect();
        assert_eq!(
            t,
            vec![
                MIG,
                "Microsoft Virtual System Migration Service/hv2",
                "cifs/hv2.lab.example.test",
                "cifs/hv2"
            ]
        );
    }

    #[test]
    fn uac_is_written_as_ad_stores_it() {
        assert_eq!(uac_value(Uac(0x0100_1000)), "16781312");
        assert_eq!(uac_value(Uac(0x8000_0000)), "-2147483648");
    }
}
