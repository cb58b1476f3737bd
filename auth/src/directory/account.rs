//! Accounts: how a name a user types (`hv2`, `HV2$`, `LAB\hv2`, `hv2.lab.example.test`,
//! `alice@lab.example.test`, a DN) is resolved to one computer or user object, and the facts
//! vmgate reads from it.
//!
//! Resolution follows Windows setspn: with neither `-C` nor `-U`, a plain name is a computer if
//! a computer `NAME$` exists, otherwise a user `NAME`. That forgiving resolution is for names an
//! administrator types (the CLI). A server mapping an authenticated Kerberos principal to its
//! account uses [`exact_account_filter`] / [`Directory::find_account_exact`] instead: equality on
//! `sAMAccountName` only, a computer if and only if the name ends with `$` (a user `hv1` is never
//! the computer `HV1$`), nothing parsed out of the name (no DN, no domain prefix, no DNS name).

use std::fmt;

use super::filter;
use super::{Directory, DirectoryError, Entry};
use crate::spn::{self, Spn};

/// Which kind of account a name must resolve to (setspn's `-C` / `-U`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum AccountKind {
    /// Computer first, then user (setspn's default).
    #[default]
    Any,
    /// A computer account (`-C`).
    Computer,
    /// A user account (`-U`).
    User,
}

/// An account name as given by a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountName {
    /// A distinguished name (`CN=HV2,CN=Computers,DC=lab,DC=example,DC=test`).
    Dn(String),
    /// A `sAMAccountName`, without a domain prefix (`hv2`, `HV2$`, `alice`).
    Sam(String),
    /// A DNS host name (`hv2.lab.example.test`): a computer's `dNSHostName`.
    DnsHost(String),
    /// A user principal name or Kerberos principal (`alice@lab.example.test`).
    Principal(String),
}

/// The longest account name accepted from a user.
const MAX_NAME: usize = 1024;

impl AccountName {
    /// Classifies a name. `LAB\hv2` loses its domain prefix (one domain here).
    pub fn parse(name: &str) -> Result<AccountName, DirectoryError> {
        let not_found = || DirectoryError::AccountNotFound {
            name: name.to_owned(),
        };
        let trimmed = name.trim();
        if trimmed.is_empty() || trimmed.len() > MAX_NAME || trimmed.chars().any(char::is_control) {
            return Err(not_found());
        }
        if looks_like_dn(trimmed) {
            return Ok(AccountName::Dn(trimmed.to_owned()));
        }
        let bare = match trimmed.split_once('\\') {
            Some((_, rest)) => rest,
            None => trimmed,
        };
        if bare.is_empty() {
            return Err(not_found());
        }
        if bare.contains('@') {
            return Ok(AccountName::Principal(bare.to_owned()));
        }
        if bare.contains('.') && !bare.ends_with('$') {
            return Ok(AccountName::DnsHost(bare.to_owned()));
        }
        Ok(AccountName::Sam(bare.to_owned()))
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountName::Dn(s)
            | AccountName::Sam(s)
            | AccountName::DnsHost(s)
            | AccountName::Principal(s) => f.write_str(s),
        }
    }
}

fn looks_like_dn(s: &str) -> bool {
    s.split_once('=').is_some_and(|(attr, _)| {
        let attr = attr.trim();
        !attr.is_empty() && attr.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    }) && s.contains(',')
}

/// The attributes read for an [`Account`].
pub const ACCOUNT_ATTRS: [&str; 11] = [
    "sAMAccountName",
    "objectClass",
    "userAccountControl",
    "servicePrincipalName",
    "msDS-AllowedToDelegateTo",
    "dNSHostName",
    "memberOf",
    "objectSid",
    "userPrincipalName",
    "primaryGroupID",
    "msDS-SupportedEncryptionTypes",
];

/// userAccountControl bits vmgate looks at.
pub mod uac {
    /// ACCOUNTDISABLE.
    pub const ACCOUNT_DISABLE: u32 = 0x2;
    /// NORMAL_ACCOUNT (a user).
    pub const NORMAL_ACCOUNT: u32 = 0x200;
    /// WORKSTATION_TRUST_ACCOUNT (a member computer).
    pub const WORKSTATION_TRUST_ACCOUNT: u32 = 0x1000;
    /// SERVER_TRUST_ACCOUNT (a DC).
    pub const SERVER_TRUST_ACCOUNT: u32 = 0x2000;
    /// TRUSTED_FOR_DELEGATION (unconstrained).
    pub const TRUSTED_FOR_DELEGATION: u32 = 0x80000;
    /// NOT_DELEGATED ("account is sensitive and cannot be delegated").
    pub const NOT_DELEGATED: u32 = 0x100000;
    /// TRUSTED_TO_AUTH_FOR_DELEGATION (constrained delegation with any protocol).
    pub const TRUSTED_TO_AUTH_FOR_DELEGATION: u32 = 0x1000000;
}

/// A computer or user account and the facts vmgate uses.
///
/// `service_principal_names` and `allowed_to_delegate_to` hold the values **as stored**,
/// Samba twins included; use [`Account::spns`] / [`Account::delegation_targets`] for what a user
/// should see, and [`Account::has_spn`] / [`Account::may_delegate_to`] to test membership.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// The DN.
    pub dn: String,
    /// `sAMAccountName` (`HV2$`, `alice`).
    pub sam_account_name: String,
    /// `objectClass` values.
    pub object_class: Vec<String>,
    /// `userAccountControl`.
    pub user_account_control: u32,
    /// `servicePrincipalName` as stored.
    pub service_principal_names: Vec<String>,
    /// `msDS-AllowedToDelegateTo` as stored.
    pub allowed_to_delegate_to: Vec<String>,
    /// `dNSHostName` (computers).
    pub dns_host_name: Option<String>,
    /// `memberOf` (direct groups only).
    pub member_of: Vec<String>,
    /// `objectSid` in string form (`S-1-5-21-...`).
    pub object_sid: Option<String>,
    /// `userPrincipalName`.
    pub user_principal_name: Option<String>,
    /// `msDS-SupportedEncryptionTypes`.
    pub supported_encryption_types: Option<u32>,
}

impl Account {
    /// Builds an account from a directory entry.
    pub fn from_entry(entry: &Entry) -> Account {
        let num = |attr: &str| entry.first(attr).and_then(|v| v.parse::<i64>().ok());
        Account {
            dn: entry.dn.clone(),
            sam_account_name: entry.first("sAMAccountName").unwrap_or_default().to_owned(),
            object_class: entry.values("objectClass").to_vec(),
            // AD sends these as signed 32-bit decimals; keep the bit pattern.
            user_account_control: num("userAccountControl").and_then(low_32_bits).unwrap_or(0),
            service_principal_names: entry.values("servicePrincipalName").to_vec(),
            allowed_to_delegate_to: entry.values("msDS-AllowedToDelegateTo").to_vec(),
            dns_host_name: entry.first("dNSHostName").map(str::to_owned),
            member_of: entry.values("memberOf").to_vec(),
            object_sid: entry
                .binary("objectSid")
                .first()
                .and_then(|b| sid_to_string(b)),
            user_principal_name: entry.first("userPrincipalName").map(str::to_owned),
            supported_encryption_types: num("msDS-SupportedEncryptionTypes").and_then(low_32_bits),
        }
    }

    /// A computer account (`objectClass: computer`).
    pub fn is_computer(&self) -> bool {
        self.object_class
            .iter()
            .any(|c| c.eq_ignore_ascii_case("computer"))
    }

    /// The host's short name: `sAMAccountName` without the trailing `$`.
    pub fn short_name(&self) -> &str {
        self.sam_account_name
            .strip_suffix('$')
            .unwrap_or(&self.sam_account_name)
    }

    /// The SPNs as a user should see them (twins collapsed).
    pub fn spns(&self) -> Vec<String> {
        spn::collapse_twins(&self.service_principal_names)
    }

    /// The delegation targets as a user should see them (twins collapsed).
    pub fn delegation_targets(&self) -> Vec<String> {
        spn::collapse_twins(&self.allowed_to_delegate_to)
    }

    /// Whether the account holds `spn` (in any case, or only as a twin).
    pub fn has_spn(&self, spn: &Spn) -> bool {
        self.service_principal_names
            .iter()
            .any(|v| spn.matches_value(v))
    }

    /// Whether `msDS-AllowedToDelegateTo` lists `spn` (plain or twin, any case).
    pub fn may_delegate_to(&self, spn: &Spn) -> bool {
        self.allowed_to_delegate_to
            .iter()
            .any(|v| spn.matches_value(v))
    }

    /// A `userAccountControl` bit (see [`uac`]).
    pub fn has_flag(&self, bit: u32) -> bool {
        self.user_account_control & bit != 0
    }
}

fn low_32_bits(v: i64) -> Option<u32> {
    u32::try_from(v & 0xffff_ffff).ok()
}

/// The string form of a binary SID (`S-1-5-21-...`); `None` for malformed input.
pub fn sid_to_string(bytes: &[u8]) -> Option<String> {
    let (&revision, rest) = bytes.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let (authority, mut rest) = rest.split_at_checked(6)?;
    let authority = authority
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if rest.len() != usize::from(count) * 4 {
        return None;
    }
    let mut out = format!("S-{revision}-{authority}");
    while let Some((sub, tail)) = rest.split_first_chunk::<4>() {
        out.push_str(&format!("-{}", u32::from_le_bytes(*sub)));
        rest = tail;
    }
    Some(out)
}

fn kind_filter(kind: AccountKind) -> &'static str {
    match kind {
        AccountKind::Computer => "(objectClass=computer)",
        AccountKind::User => "(&(objectClass=user)(!(objectClass=computer)))",
        AccountKind::Any => "(objectClass=user)",
    }
}

/// The LDAP filter for the account of a Kerberos principal's name part (`alice`, `HV1$`),
/// exactly: `sAMAccountName` equality (AD compares it without case), a computer when the name
/// ends with `$`, otherwise a user that is not a computer. The name is escaped, never parsed.
pub fn exact_account_filter(sam: &str) -> String {
    let kind = if sam.ends_with('$') {
        AccountKind::Computer
    } else {
        AccountKind::User
    };
    format!(
        "(&{}{})",
        kind_filter(kind),
        filter::eq("sAMAccountName", sam)
    )
}

impl Directory {
    /// The account named `sam` exactly (see [`exact_account_filter`]) under `base` (the naming
    /// context of the principal's realm; `None`: this domain). `None` when there is none, or
    /// when this directory does not hold `base`.
    pub fn find_account_exact(
        &self,
        sam: &str,
        base: Option<&str>,
    ) -> Result<Option<Account>, DirectoryError> {
        let base = base.unwrap_or(self.base_dn());
        let found = match self.search(
            base,
            super::SearchScope::Subtree,
            &exact_account_filter(sam),
            &ACCOUNT_ATTRS,
        ) {
            Ok(found) => found,
            Err(DirectoryError::NoSuchObject { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(Account::from_entry(one))),
            _ => Err(DirectoryError::AmbiguousAccount {
                name: sam.to_owned(),
                dns: found.into_iter().map(|e| e.dn).collect(),
            }),
        }
    }

    /// Resolves a name to exactly one account (see the module doc for the order).
    pub fn find_account(
        &self,
        name: &AccountName,
        kind: AccountKind,
    ) -> Result<Account, DirectoryError> {
        let not_found = || DirectoryError::AccountNotFound {
            name: name.to_string(),
        };
        match name {
            AccountName::Dn(dn) => {
                let entry = self
                    .search(
                        dn,
                        super::SearchScope::Base,
                        kind_filter(kind),
                        &ACCOUNT_ATTRS,
                    )
                    .map_err(|e| match e {
                        DirectoryError::NoSuchObject { .. } => not_found(),
                        DirectoryError::Refused { code: 34, .. } => not_found(),
                        other => other,
                    })?;
                entry.first().map(Account::from_entry).ok_or_else(not_found)
            }
            AccountName::Sam(sam) => {
                let computer_sam = if sam.ends_with('$') {
                    sam.clone()
                } else {
                    format!("{sam}$")
                };
                let try_computer = kind != AccountKind::User;
                let try_user = kind != AccountKind::Computer;
                if try_computer {
                    let f = format!(
                        "(&(objectClass=computer){})",
                        filter::eq("sAMAccountName", &computer_sam)
                    );
                    if let Some(a) = self.one_account(&name.to_string(), &f)? {
                        return Ok(a);
                    }
                }
                if try_user {
                    let f = format!(
                        "(&{}{})",
                        kind_filter(kind),
                        filter::eq("sAMAccountName", sam)
                    );
                    if let Some(a) = self.one_account(&name.to_string(), &f)? {
                        return Ok(a);
                    }
                }
                Err(not_found())
            }
            AccountName::DnsHost(host) => {
                if kind != AccountKind::User {
                    let f = format!(
                        "(&(objectClass=computer){})",
                        filter::eq("dNSHostName", host)
                    );
                    if let Some(a) = self.one_account(&name.to_string(), &f)? {
                        return Ok(a);
                    }
                }
                // A user whose sAMAccountName has a dot (`first.last`).
                let f = format!(
                    "(&{}{})",
                    kind_filter(kind),
                    filter::eq("sAMAccountName", host)
                );
                self.one_account(&name.to_string(), &f)?
                    .ok_or_else(not_found)
            }
            AccountName::Principal(p) => {
                let (user, realm) = p.rsplit_once('@').unwrap_or((p.as_str(), ""));
                let mut alternatives = filter::eq("userPrincipalName", p);
                if realm.eq_ignore_ascii_case(&self.dns_domain()) {
                    alternatives.push_str(&filter::eq("sAMAccountName", user));
                }
                let f = format!("(&{}(|{alternatives}))", kind_filter(kind));
                self.one_account(&name.to_string(), &f)?
                    .ok_or_else(not_found)
            }
        }
    }

    /// Resolves a name as typed (`hv2`, `HV2$`, a DN, ...), see [`AccountName::parse`].
    pub fn find_account_by_name(
        &self,
        name: &str,
        kind: AccountKind,
    ) -> Result<Account, DirectoryError> {
        self.find_account(&AccountName::parse(name)?, kind)
    }

    /// Re-reads an account by its DN.
    pub fn read_account(&self, dn: &str) -> Result<Option<Account>, DirectoryError> {
        Ok(self
            .read(dn, &ACCOUNT_ATTRS)?
            .map(|e| Account::from_entry(&e)))
    }

    fn one_account(&self, name: &str, filter: &str) -> Result<Option<Account>, DirectoryError> {
        let mut found = self.search_domain(filter, &ACCOUNT_ATTRS)?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|e| Account::from_entry(&e))),
            _ => Err(DirectoryError::AmbiguousAccount {
                name: name.to_owned(),
                dns: found.into_iter().map(|e| e.dn).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names_as_setspn_takes_them() {
        assert_eq!(
            AccountName::parse("hv2").unwrap(),
            AccountName::Sam("hv2".into())
        );
        assert_eq!(
            AccountName::parse("HV2$").unwrap(),
            AccountName::Sam("HV2$".into())
        );
        assert_eq!(
            AccountName::parse("LAB\\hv2").unwrap(),
            AccountName::Sam("hv2".into())
        );
        assert_eq!(
            AccountName::parse("CN=HV2,CN=Computers,DC=lab,DC=example,DC=test").unwrap(),
            AccountName::Dn("CN=HV2,CN=Computers,DC=lab,DC=example,DC=test".into())
        );
        assert_eq!(
            AccountName::parse("hv2.lab.example.test").unwrap(),
            AccountName::DnsHost("hv2.lab.example.test".into())
        );
        assert_eq!(
            AccountName::parse("alice@LAB.EXAMPLE.TEST").unwrap(),
            AccountName::Principal("alice@LAB.EXAMPLE.TEST".into())
        );
        assert!(AccountName::parse("").is_err());
        assert!(AccountName::parse("LAB\\").is_err());
        assert!(AccountName::parse("a\nb").is_err());
        assert!(AccountName::parse(&"x".repeat(2000)).is_err());
        // "a=b" without a comma is a name, not a DN.
        assert_eq!(
            AccountName::parse("a=b").unwrap(),
            AccountName::Sam("a=b".into())
        );
    }

    #[test]
    fn exact_filters_decide_user_or_computer_by_the_trailing_dollar() {
        assert_eq!(
            exact_account_filter("hv1"),
            "(&(&(objectClass=user)(!(objectClass=computer)))(sAMAccountName=hv1))"
        );
        assert_eq!(
            exact_account_filter("HV1$"),
            "(&(objectClass=computer)(sAMAccountName=HV1$))"
        );
        // Nothing is parsed: a DN-looking or wildcard name is one escaped value.
        assert_eq!(
            exact_account_filter("CN=x,DC=y*"),
            "(&(&(objectClass=user)(!(objectClass=computer)))(sAMAccountName=CN=x,DC=y\\2a))"
        );
    }

    #[test]
    fn reads_sids_and_rejects_malformed_ones() {
        // S-1-5-21-1-2-3-500
        let mut b = vec![1u8, 5, 0, 0, 0, 0, 0, 5];
        for sub in [21u32, 1, 2, 3, 500] {
            b.extend_from_slice(&sub.to_le_bytes());
        }
        assert_eq!(sid_to_string(&b).as_deref(), Some("S-1-5-21-1-2-3-500"));
        assert_eq!(sid_to_string(&b[..b.len() - 1]), None);
        assert_eq!(sid_to_string(&[1]), None);
        assert_eq!(sid_to_string(&[]), None);
        assert_eq!(
            sid_to_string(&[1, 0, 0, 0, 0, 0, 0, 5]).as_deref(),
            Some("S-1-5")
        );
    }

    #[test]
    fn account_facts_collapse_twins() {
        let twin = "Microsoft\\ Virtual\\ System\\ Migration\\ Service/hv2";
        let plain = "Microsoft Virtual System Migration Service/hv2";
        let e = Entry::new(
            "CN=HV1,CN=Computers,DC=lab",
            &[
                ("sAMAccountName", &["HV1$"]),
                ("objectClass", &["top", "person", "user", "computer"]),
                ("userAccountControl", &["16781312"]),
                ("servicePrincipalName", &["HOST/hv1", plain, twin]),
                ("msDS-AllowedToDelegateTo", &[plain, twin]),
            ],
        );
        let a = Account::from_entry(&e);
        assert!(a.is_computer());
        assert_eq!(a.short_name(), "HV1");
        assert_eq!(a.spns(), vec!["HOST/hv1".to_owned(), plain.to_owned()]);
        assert_eq!(a.delegation_targets(), vec![plain.to_owned()]);
        let spn = Spn::parse(&plain.to_uppercase()).unwrap();
        assert!(a.has_spn(&spn) && a.may_delegate_to(&spn));
        assert!(a.has_flag(uac::TRUSTED_TO_AUTH_FOR_DELEGATION));
        assert!(a.has_flag(uac::WORKSTATION_TRUST_ACCOUNT));
        assert!(!a.has_flag(uac::NOT_DELEGATED));
        // Negative values as AD sends them keep their bits.
        let e = Entry::new("CN=x", &[("userAccountControl", &["-2147483136"])]);
        assert_eq!(Account::from_entry(&e).user_account_control, 0x8000_0200);
    }
}
