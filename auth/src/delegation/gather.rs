//! Reading delegation facts from the directory: the facts behind `check`, the per-account
//! report behind `show`, and the domain-wide report behind `find`.
//!
//! All I/O goes through [`crate::directory::Directory`]; what is computed from the entries
//! (twin collapsing, report rows) is pure and tested without a network.

use serde::Serialize;

use super::DelegationError;
use super::facts::{
    AuthType, DelegateTo, DelegationFacts, DirectoryKind, MoveStart, PROTECTED_USERS_RID,
    SourceAccount, SpnHolders, TargetHost, Uac, UserFacts, collapse_twins,
    protected_users_enforced, twin_of,
};
use super::sd::{SdError, SecurityDescriptor, Sid};
use crate::directory::{Account, AccountKind, Directory, DirectoryError};
use crate::spn::Spn;

/// The attribute holding resource-based delegation (who may delegate *to* this account).
pub const RBCD_ATTR: &str = "msDS-AllowedToActOnBehalfOfOtherIdentity";
/// The constructed attribute whose LOCKOUT bit says an account is locked out.
pub const UAC_COMPUTED_ATTR: &str = "msDS-User-Account-Control-Computed";

/// What a `check` is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    /// The source host (`hv1`, `HV1$`, a DN, `hv1.lab.example.test`).
    pub from: String,
    /// The destination host.
    pub to: String,
    /// The user the move is started as (`None`: host-level requirements only).
    pub user: Option<String>,
    /// The source host's auth type.
    pub auth: AuthType,
    /// How the move is started.
    pub start: MoveStart,
    /// The migration service class.
    pub service_class: String,
}

impl DirectoryKind {
    /// The kind of the connected directory.
    pub fn of(dir: &Directory) -> DirectoryKind {
        if dir.is_samba() {
            DirectoryKind::Samba
        } else {
            DirectoryKind::Windows
        }
    }
}

/// Resolves a host name to its computer account; an unknown host is
/// [`DelegationError::UnknownHost`].
pub fn find_host(dir: &Directory, name: &str) -> Result<Account, DelegationError> {
    dir.find_account_by_name(name, AccountKind::Computer)
        .map_err(|e| match e {
            DirectoryError::AccountNotFound { .. } => DelegationError::UnknownHost {
                name: name.to_owned(),
            },
            other => DelegationError::from(other),
        })
}

/// Resolves any account (computer first, then user, like setspn); unknown is
/// [`DelegationError::UnknownAccount`].
pub fn find_any(
    dir: &Directory,
    name: &str,
    kind: AccountKind,
) -> Result<Account, DelegationError> {
    dir.find_account_by_name(name, kind).map_err(|e| match e {
        DirectoryError::AccountNotFound { .. } => DelegationError::UnknownAccount {
            name: name.to_owned(),
        },
        other => DelegationError::from(other),
    })
}

/// The host's short name as commands print it (`HV1$` → `hv1`).
pub fn host_name(account: &Account) -> String {
    account.short_name().to_ascii_lowercase()
}

/// The host's FQDN: `dNSHostName`, or the short name in the domain.
pub fn host_fqdn(dir: &Directory, account: &Account) -> String {
    account
        .dns_host_name
        .as_deref()
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| format!("{}.{}", host_name(account), dir.dns_domain()))
}

/// The source-side facts of an account.
pub fn source_account(account: &Account) -> SourceAccount {
    SourceAccount {
        host: host_name(account),
        account: account.sam_account_name.clone(),
        uac: Uac(account.user_account_control),
        allowed_to: collapse_twins(&account.allowed_to_delegate_to),
    }
}

/// Which accounts hold `spn`, in plain form and as the escaped twin.
pub fn spn_holders(dir: &Directory, spn: &Spn) -> Result<SpnHolders, DelegationError> {
    let twin = twin_of(spn.as_str());
    let mut holders = SpnHolders {
        spn: spn.as_str().to_owned(),
        plain: Vec::new(),
        escaped: Vec::new(),
    };
    for account in dir.spn_holders(spn)? {
        let values = &account.service_principal_names;
        let has = |v: &str| values.iter().any(|s| s.eq_ignore_ascii_case(v));
        let plain = has(spn.as_str());
        let escaped = match &twin {
            Some(t) => has(t),
            None => plain,
        };
        if plain {
            holders.plain.push(account.sam_account_name.clone());
        }
        if escaped {
            holders.escaped.push(account.sam_account_name.clone());
        }
    }
    Ok(holders)
}

/// The user-side facts: flags, lock-out, and membership of Protected Users (RID 525 of the
/// user's domain, through nested groups).
pub fn user_facts(dir: &Directory, name: &str) -> Result<(Account, UserFacts), DelegationError> {
    let account = find_any(dir, name, AccountKind::User)?;
    let locked = dir
        .read(&account.dn, &[UAC_COMPUTED_ATTR])?
        .and_then(|e| {
            e.first(UAC_COMPUTED_ATTR)
                .and_then(|v| v.parse::<i64>().ok())
        })
        .is_some_and(|v| v & i64::from(Uac::LOCKOUT) != 0);
    let protected_users = match protected_users_dn(dir, &account)? {
        Some(group) => dir.is_member_of(&account.dn, &group)?,
        None => false,
    };
    let facts = UserFacts {
        name: account.sam_account_name.clone(),
        uac: Uac(account.user_account_control),
        locked,
        protected_users,
    };
    Ok((account, facts))
}

/// The DN of the Protected Users group of `account`'s domain (found by its SID), if it exists.
fn protected_users_dn(
    dir: &Directory,
    account: &Account,
) -> Result<Option<String>, DelegationError> {
    let Some(sid) = account
        .object_sid
        .as_deref()
        .and_then(|s| s.parse::<Sid>().ok())
    else {
        return Ok(None);
    };
    let Some(group_sid) = sid.parent().and_then(|d| d.with_rid(PROTECTED_USERS_RID)) else {
        return Ok(None);
    };
    let f = format!("(objectSid={})", group_sid.ldap_filter_value());
    Ok(dir
        .search_domain(&f, &["1.1"])?
        .into_iter()
        .next()
        .map(|e| e.dn))
}

/// Gathers everything [`super::analyze`] needs for `req`.
pub fn gather_facts(
    dir: &Directory,
    req: &CheckRequest,
) -> Result<DelegationFacts, DelegationError> {
    let source = find_host(dir, &req.from)?;
    let target = find_host(dir, &req.to)?;
    let user = match &req.user {
        Some(name) => Some(user_facts(dir, name)?.1),
        None => None,
    };
    let short = host_name(&target);
    let fqdn = host_fqdn(dir, &target);
    let mut target_spns = Vec::new();
    for host in [&fqdn, &short] {
        let spn = Spn::new(&req.service_class, host)?;
        target_spns.push(spn_holders(dir, &spn)?);
    }
    Ok(DelegationFacts {
        directory: DirectoryKind::of(dir),
        service_class: req.service_class.clone(),
        source: source_account(&source),
        target: TargetHost {
            short,
            fqdn,
            account: target.sam_account_name.clone(),
        },
        target_spns,
        user,
        auth: req.auth,
        start: req.start,
        protected_users_enforced: protected_users_enforced(
            DirectoryKind::of(dir),
            dir.root_dse().vendor_version.as_deref(),
        ),
    })
}

/// One msDS-AllowedToDelegateTo entry in `show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetEntry {
    /// The SPN (plain form).
    pub spn: String,
    /// Which forms are stored.
    pub stored: DelegateTo,
    /// Whether the KDC of this directory honours the entry (on Samba: the escaped twin is
    /// stored for SPNs with spaces).
    pub effective: bool,
    /// The accounts that hold the SPN; empty when it exists nowhere.
    pub holders: Vec<String>,
    /// Set when the SPN is not registered itself but resolves through the domain's
    /// sPNMappings alias (`cifs/hv2` → `HOST/hv2`).
    pub via_alias: Option<String>,
    /// Set when the value is not a well-formed SPN.
    pub malformed: Option<String>,
}

impl TargetEntry {
    /// Whether the SPN exists in the domain (directly or through an alias).
    pub fn exists(&self) -> bool {
        !self.holders.is_empty()
    }
}

/// One principal allowed by resource-based delegation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RbcdPrincipal {
    /// The SID from the descriptor.
    pub sid: String,
    /// The account it resolves to, if any.
    pub account: Option<String>,
    /// Whether the ACE denies rather than allows.
    pub denied: bool,
}

/// What `show` prints for one account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccountDelegation {
    /// sAMAccountName.
    pub account: String,
    /// The DN.
    pub dn: String,
    /// `computer` or `user`.
    pub kind: &'static str,
    /// userAccountControl.
    pub user_account_control: Uac,
    /// TRUSTED_FOR_DELEGATION: unconstrained delegation.
    pub unconstrained: bool,
    /// TRUSTED_TO_AUTH_FOR_DELEGATION: protocol transition ("use any authentication protocol").
    pub protocol_transition: bool,
    /// NOT_DELEGATED: sensitive, cannot be delegated.
    pub sensitive: bool,
    /// msDS-AllowedToDelegateTo, twins collapsed, sorted, each with where the SPN exists.
    pub allowed_to_delegate_to: Vec<TargetEntry>,
    /// msDS-AllowedToActOnBehalfOfOtherIdentity decoded: who may delegate to this account.
    pub resource_based: Vec<RbcdPrincipal>,
    /// Set when the resource-based descriptor could not be decoded.
    pub resource_based_error: Option<String>,
}

/// The `sPNMappings` aliases of the forest (`host=alerter,...,cifs,...,http,...`): service
/// class → the class it maps to. Empty when the attribute cannot be read.
pub fn spn_mappings(dir: &Directory) -> Result<Vec<(String, String)>, DelegationError> {
    let Some(config) = dir.root_dse().configuration_naming_context.clone() else {
        return Ok(Vec::new());
    };
    let dn = format!("CN=Directory Service,CN=Windows NT,CN=Services,{config}");
    let Some(entry) = dir.read(&dn, &["sPNMappings"])? else {
        return Ok(Vec::new());
    };
    Ok(parse_spn_mappings(entry.values("sPNMappings")))
}

/// Parses `sPNMappings` values (`host=alerter,cifs,http`) into (alias class, target class).
pub fn parse_spn_mappings(values: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for value in values {
        let Some((target, aliases)) = value.split_once('=') else {
            continue;
        };
        for alias in aliases.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            out.push((alias.to_ascii_lowercase(), target.trim().to_owned()));
        }
    }
    out
}

/// The alias of `spn` through sPNMappings (`cifs/hv2` → `host/hv2`), if its class is mapped.
pub fn alias_of(spn: &Spn, mappings: &[(String, String)]) -> Option<Spn> {
    let class = spn.class().to_ascii_lowercase();
    let (_, target) = mappings.iter().find(|(alias, _)| *alias == class)?;
    let rest = spn.as_str().get(spn.class().len()..)?;
    Spn::parse(&format!("{target}{rest}")).ok()
}

/// Where an SPN exists: the accounts holding it directly, or through its sPNMappings alias.
pub fn where_spn_exists(
    dir: &Directory,
    spn: &Spn,
    mappings: &[(String, String)],
) -> Result<(Vec<String>, Option<String>), DelegationError> {
    let direct: Vec<String> = dir
        .spn_holders(spn)?
        .into_iter()
        .map(|a| a.sam_account_name)
        .collect();
    if !direct.is_empty() {
        return Ok((direct, None));
    }
    if let Some(alias) = alias_of(spn, mappings) {
        let via: Vec<String> = dir
            .spn_holders(&alias)?
            .into_iter()
            .map(|a| a.sam_account_name)
            .collect();
        if !via.is_empty() {
            return Ok((via, Some(alias.to_string())));
        }
    }
    Ok((Vec::new(), None))
}

/// Decodes an RBCD descriptor and resolves its SIDs to account names.
pub fn resolve_rbcd(dir: &Directory, bytes: &[u8]) -> Result<Vec<RbcdPrincipal>, DelegationError> {
    let sd = SecurityDescriptor::decode(bytes)
        .map_err(|source| DelegationError::BadDescriptor { source })?;
    let mut out = Vec::new();
    for (sids, denied) in [(sd.allowed_sids(), false), (sd.denied_sids(), true)] {
        for sid in sids {
            out.push(RbcdPrincipal {
                sid: sid.to_string(),
                account: account_of_sid(dir, sid)?,
                denied,
            });
        }
    }
    Ok(out)
}

/// The sAMAccountName of the object with `sid`, if there is one.
pub fn account_of_sid(dir: &Directory, sid: &Sid) -> Result<Option<String>, DelegationError> {
    let f = format!("(objectSid={})", sid.ldap_filter_value());
    Ok(dir
        .search_domain(&f, &["sAMAccountName"])?
        .into_iter()
        .find_map(|e| e.first("sAMAccountName").map(str::to_owned)))
}

/// The bytes of a binary attribute however the LDAP layer returned them.
fn binary_value(entry: &crate::directory::Entry, attr: &str) -> Option<Vec<u8>> {
    entry
        .binary(attr)
        .first()
        .cloned()
        .or_else(|| entry.first(attr).map(|s| s.as_bytes().to_vec()))
}

/// Builds the `show` report for an account.
pub fn show(dir: &Directory, name: &str) -> Result<AccountDelegation, DelegationError> {
    let account = find_any(dir, name, AccountKind::Any)?;
    let kind = DirectoryKind::of(dir);
    let mappings = spn_mappings(dir)?;
    let mut targets = Vec::new();
    let mut entries = collapse_twins(&account.allowed_to_delegate_to);
    // The directory returns values in no particular order; show them sorted.
    entries.sort_by_key(|e| e.spn.to_lowercase());
    for stored in entries {
        let effective = stored.effective(kind);
        let (holders, via_alias, malformed) = match Spn::parse(&stored.spn) {
            Ok(spn) => {
                let (holders, via) = where_spn_exists(dir, &spn, &mappings)?;
                (holders, via, None)
            }
            Err(e) => (Vec::new(), None, Some(e.to_string())),
        };
        targets.push(TargetEntry {
            spn: stored.spn.clone(),
            stored,
            effective,
            holders,
            via_alias,
            malformed,
        });
    }
    let (resource_based, resource_based_error) = match dir
        .read(&account.dn, &[RBCD_ATTR])?
        .and_then(|e| binary_value(&e, RBCD_ATTR))
    {
        None => (Vec::new(), None),
        Some(bytes) => match resolve_rbcd(dir, &bytes) {
            Ok(p) => (p, None),
            Err(DelegationError::BadDescriptor { source }) => {
                (Vec::new(), Some(source.to_string()))
            }
            Err(e) => return Err(e),
        },
    };
    let uac = Uac(account.user_account_control);
    Ok(AccountDelegation {
        account: account.sam_account_name.clone(),
        dn: account.dn.clone(),
        kind: if account.is_computer() {
            "computer"
        } else {
            "user"
        },
        user_account_control: uac,
        unconstrained: uac.unconstrained(),
        protocol_transition: uac.protocol_transition(),
        sensitive: uac.not_delegated(),
        allowed_to_delegate_to: targets,
        resource_based,
        resource_based_error,
    })
}

/// The kind of delegation a `find` row reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DelegationType {
    /// TRUSTED_FOR_DELEGATION.
    Unconstrained,
    /// msDS-AllowedToDelegateTo, "Kerberos only".
    Constrained,
    /// msDS-AllowedToDelegateTo with TRUSTED_TO_AUTH_FOR_DELEGATION.
    ConstrainedWithProtocolTransition,
    /// msDS-AllowedToActOnBehalfOfOtherIdentity on the target.
    ResourceBased,
}

impl DelegationType {
    /// The text printed in the table.
    pub const fn label(self) -> &'static str {
        match self {
            DelegationType::Unconstrained => "Unconstrained",
            DelegationType::Constrained => "Constrained",
            DelegationType::ConstrainedWithProtocolTransition => {
                "Constrained w/ Protocol Transition"
            }
            DelegationType::ResourceBased => "Resource-Based Constrained",
        }
    }
}

/// One row of `find` (in the spirit of Impacket's findDelegation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FindRow {
    /// The account that may delegate.
    pub account: String,
    /// `Computer` or `Person`.
    pub account_type: &'static str,
    /// The kind of delegation.
    pub delegation_type: DelegationType,
    /// The SPN (constrained) or account (resource-based) it may delegate to; `None` for
    /// unconstrained (any service).
    pub rights_to: Option<String>,
    /// For constrained delegation: whether the SPN exists in the domain.
    pub spn_exists: Option<bool>,
}

/// An account as `find` sees it (pure input of [`find_rows`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindAccount {
    /// sAMAccountName.
    pub account: String,
    /// A computer (else a user).
    pub computer: bool,
    /// userAccountControl.
    pub uac: Uac,
    /// msDS-AllowedToDelegateTo as stored.
    pub allowed_to: Vec<String>,
    /// The principals its RBCD descriptor allows: (name or SID, is a computer).
    pub rbcd_from: Vec<(String, bool)>,
}

/// The `find` rows for `accounts`; `spn_exists` answers for each delegation target.
pub fn find_rows(accounts: &[FindAccount], spn_exists: &dyn Fn(&str) -> bool) -> Vec<FindRow> {
    let type_of = |computer: bool| if computer { "Computer" } else { "Person" };
    let mut rows = Vec::new();
    for a in accounts {
        if a.uac.unconstrained() {
            rows.push(FindRow {
                account: a.account.clone(),
                account_type: type_of(a.computer),
                delegation_type: DelegationType::Unconstrained,
                rights_to: None,
                spn_exists: None,
            });
        }
        let kind = if a.uac.protocol_transition() {
            DelegationType::ConstrainedWithProtocolTransition
        } else {
            DelegationType::Constrained
        };
        for target in collapse_twins(&a.allowed_to) {
            rows.push(FindRow {
                account: a.account.clone(),
                account_type: type_of(a.computer),
                delegation_type: kind,
                spn_exists: Some(spn_exists(&target.spn)),
                rights_to: Some(target.spn),
            });
        }
        for (from, computer) in &a.rbcd_from {
            rows.push(FindRow {
                account: from.clone(),
                account_type: type_of(*computer),
                delegation_type: DelegationType::ResourceBased,
                rights_to: Some(a.account.clone()),
                spn_exists: None,
            });
        }
    }
    rows
}

/// The LDAP filter for accounts with any kind of delegation configured, enabled ones only.
pub const FIND_FILTER: &str = "(&(|(userAccountControl:1.2.840.113556.1.4.803:=524288)\
     (userAccountControl:1.2.840.113556.1.4.803:=16777216)(msDS-AllowedToDelegateTo=*)\
     (msDS-AllowedToActOnBehalfOfOtherIdentity=*))\
     (!(userAccountControl:1.2.840.113556.1.4.803:=2)))";

/// The domain-wide delegation report.
pub fn find(dir: &Directory) -> Result<Vec<FindRow>, DelegationError> {
    let attrs = [
        "sAMAccountName",
        "objectClass",
        "userAccountControl",
        "msDS-AllowedToDelegateTo",
        RBCD_ATTR,
    ];
    let entries = dir.search_domain(FIND_FILTER, &attrs)?;
    let mut accounts = Vec::new();
    for e in &entries {
        let computer = e
            .values("objectClass")
            .iter()
            .any(|c| c.eq_ignore_ascii_case("computer"));
        let uac = e
            .first("userAccountControl")
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|v| u32::try_from(v & 0xffff_ffff).ok())
            .unwrap_or(0);
        let mut rbcd_from = Vec::new();
        if let Some(bytes) = binary_value(e, RBCD_ATTR) {
            // A descriptor that does not decode is reported as such rather than failing the
            // whole report.
            match SecurityDescriptor::decode(&bytes) {
                Ok(sd) => {
                    for sid in sd.allowed_sids() {
                        let (name, computer) = describe_sid(dir, sid)?;
                        rbcd_from.push((name, computer));
                    }
                }
                Err(err) => rbcd_from.push((format!("(undecodable descriptor: {err})"), false)),
            }
        }
        accounts.push(FindAccount {
            account: e.first("sAMAccountName").unwrap_or(&e.dn).to_owned(),
            computer,
            uac: Uac(uac),
            allowed_to: e.values("msDS-AllowedToDelegateTo").to_vec(),
            rbcd_from,
        });
    }
    let mappings = spn_mappings(dir)?;
    // Existence of each distinct target, looked up once.
    let mut known: Vec<(String, bool)> = Vec::new();
    for a in &accounts {
        for t in collapse_twins(&a.allowed_to) {
            if known.iter().any(|(s, _)| s.eq_ignore_ascii_case(&t.spn)) {
                continue;
            }
            let exists = match Spn::parse(&t.spn) {
                Ok(spn) => !where_spn_exists(dir, &spn, &mappings)?.0.is_empty(),
                Err(_) => false,
            };
            known.push((t.spn, exists));
        }
    }
    let lookup = |spn: &str| {
        known
            .iter()
            .find(|(s, _)| s.eq_ignore_ascii_case(spn))
            .is_some_and(|(_, e)| *e)
    };
    Ok(find_rows(&accounts, &lookup))
}

fn describe_sid(dir: &Directory, sid: &Sid) -> Result<(String, bool), DelegationError> {
    let f = format!("(objectSid={})", sid.ldap_filter_value());
    let found = dir.search_domain(&f, &["sAMAccountName", "objectClass"])?;
    Ok(match found.first() {
        Some(e) => (
            e.first("sAMAccountName").unwrap_or(&e.dn).to_owned(),
            e.values("objectClass")
                .iter()
                .any(|c| c.eq_ignore_ascii_case("computer")),
        ),
        None => (sid.to_string(), false),
    })
}

impl From<SdError> for DelegationError {
    fn from(source: SdError) -> Self {
        DelegationError::BadDescriptor { source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spn_mappings_parse_and_alias() {
        let m = parse_spn_mappings(&[
            "host=alerter,cifs, HTTP ,,www".to_owned(),
            "junk".to_owned(),
        ]);
        assert_eq!(m.len(), 4);
        let cifs = Spn::parse("cifs/hv2.lab.example.test").unwrap();
        assert_eq!(
            alias_of(&cifs, &m).unwrap().as_str(),
            "host/hv2.lab.example.test"
        );
        let http = Spn::parse("HTTP/web:8080").unwrap();
        assert_eq!(alias_of(&http, &m).unwrap().as_str(), "host/web:8080");
        let mig = Spn::parse("Microsoft Virtual System Migration Service/hv2").unwrap();
        assert_eq!(alias_of(&mig, &m), None);
    }

    #[test]
    fn find_rows_cover_every_kind() {
        let mig = "Microsoft Virtual System Migration Service/hv2.lab.example.test";
        let mig_twin = r"Microsoft\ Virtual\ System\ Migration\ Service/hv2.lab.example.test";
        let accounts = vec![
            FindAccount {
                account: "DC1$".into(),
                computer: true,
                uac: Uac(Uac::SERVER_TRUST_ACCOUNT | Uac::TRUSTED_FOR_DELEGATION),
                allowed_to: vec![],
                rbcd_from: vec![],
            },
            FindAccount {
                account: "HV1$".into(),
                computer: true,
                uac: Uac(Uac::WORKSTATION_TRUST_ACCOUNT | Uac::TRUSTED_TO_AUTH_FOR_DELEGATION),
                allowed_to: vec![mig.into(), mig_twin.into(), "cifs/nowhere".into()],
                rbcd_from: vec![],
            },
            FindAccount {
                account: "svc".into(),
                computer: false,
                uac: Uac(Uac::NORMAL_ACCOUNT),
                allowed_to: vec!["cifs/hv3".into()],
                rbcd_from: vec![],
            },
            FindAccount {
                account: "HV3$".into(),
                computer: true,
                uac: Uac(Uac::WORKSTATION_TRUST_ACCOUNT),
                allowed_to: vec![],
                rbcd_from: vec![("HV2$".into(), true)],
            },
        ];
        let exists = |spn: &str| !spn.contains("nowhere");
        let rows = find_rows(&accounts, &exists);
        type Row<'a> = (
            &'a str,
            &'a str,
            DelegationType,
            Option<&'a str>,
            Option<bool>,
        );
        let table: Vec<Row<'_>> = rows
            .iter()
            .map(|r| {
                (
                    r.account.as_str(),
                    r.account_type,
                    r.delegation_type,
                    r.rights_to.as_deref(),
                    r.spn_exists,
                )
            })
            .collect();
        use DelegationType::*;
        assert_eq!(
            table,
            vec![
                ("DC1$", "Computer", Unconstrained, None, None),
                (
                    "HV1$",
                    "Computer",
                    ConstrainedWithProtocolTransition,
                    Some(mig),
                    Some(true)
                ),
                (
                    "HV1$",
                    "Computer",
                    ConstrainedWithProtocolTransition,
                    Some("cifs/nowhere"),
                    Some(false)
                ),
                ("svc", "Person", Constrained, Some("cifs/hv3"), Some(true)),
                ("HV2$", "Computer", ResourceBased, Some("HV3$"), None),
            ]
        );
    }

    #[test]
    fn find_filter_is_balanced() {
        let open = FIND_FILTER.matches('(').count();
        let close = FIND_FILTER.matches(')').count();
        assert_eq!(open, close);
        assert!(!FIND_FILTER.contains(' '));
    }
}
