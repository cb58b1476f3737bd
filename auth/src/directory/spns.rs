//! SPN operations on the directory, with the Samba twin rules of [`crate::spn`] applied.
//!
//! * Adding writes the plain value and, on Samba, its escaped twin, in one modify.
//! * Deleting removes every stored value naming the SPN (plain in any case, and the twin).
//! * Holders, queries and duplicate scans compare by [`spn::canonical_key`], so an account that
//!   stores an SPN and its twin counts once.
//!
//! The value helpers ([`Directory::add_spn_value`], [`Directory::remove_spn_value`]) take the
//! attribute name, so `msDS-AllowedToDelegateTo` (delegation targets) follows the same rules.

use std::collections::BTreeMap;

use super::account::{ACCOUNT_ATTRS, Account};
use super::{Directory, DirectoryError, filter};
use crate::spn::{self, Spn, SpnPattern};

/// The SPN attribute.
pub const SPN_ATTR: &str = "servicePrincipalName";
/// The constrained-delegation targets attribute.
pub const DELEGATE_TO_ATTR: &str = "msDS-AllowedToDelegateTo";

/// One SPN registered on more than one account.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DuplicateSpn {
    /// The SPN (plain form, as first found).
    pub spn: String,
    /// DNs of the accounts holding it, sorted.
    pub accounts: Vec<String>,
}

fn not_registered(spn: &Spn, dn: &str, attr: &str) -> DirectoryError {
    DirectoryError::SpnNotRegistered {
        spn: spn.to_string(),
        attr: attr.to_owned(),
        dn: dn.to_owned(),
    }
}

/// Whether a constraint violation is the DC's SPN uniqueness check: Samba says "would cause a
/// conflict", Windows reports ERROR_DS_SPN_VALUE_NOT_UNIQUE_IN_FOREST (0x21C7).
fn is_uniqueness_refusal(text: &str) -> bool {
    text.contains("would cause a conflict") || text.to_ascii_uppercase().contains("21C7")
}

/// Groups `(dn, stored values)` pairs into duplicates: SPNs held by more than one account, twins
/// not counted (pure, so that it is tested without a directory).
pub fn duplicate_groups<'a>(
    accounts: impl IntoIterator<Item = (&'a str, &'a [String])>,
) -> Vec<DuplicateSpn> {
    let mut by_key: BTreeMap<String, DuplicateSpn> = BTreeMap::new();
    for (dn, values) in accounts {
        for value in spn::collapse_twins(values) {
            let group = by_key
                .entry(spn::canonical_key(&value))
                .or_insert_with(|| DuplicateSpn {
                    spn: spn::unescape_twin(&value).unwrap_or_else(|| value.clone()),
                    accounts: Vec::new(),
                });
            if !group.accounts.iter().any(|d| d.eq_ignore_ascii_case(dn)) {
                group.accounts.push(dn.to_owned());
            }
        }
    }
    by_key
        .into_values()
        .filter(|g| g.accounts.len() > 1)
        .map(|mut g| {
            g.accounts.sort();
            g
        })
        .collect()
}

impl Directory {
    /// Every account (user or computer, anywhere in the domain) that holds `spn`, plain or as a
    /// twin. Empty when the SPN is free.
    pub fn spn_holders(&self, spn: &Spn) -> Result<Vec<Account>, DirectoryError> {
        let mut alternatives = filter::eq(SPN_ATTR, spn.as_str());
        if let Some(twin) = spn::samba_twin(spn) {
            alternatives.push_str(&filter::eq(SPN_ATTR, &twin));
        }
        let f = format!("(|{alternatives})");
        Ok(self
            .search_domain(&f, &ACCOUNT_ATTRS)?
            .iter()
            .map(Account::from_entry)
            .filter(|a| a.has_spn(spn))
            .collect())
    }

    /// Accounts with an SPN matching `pattern` (`*` wildcards; setspn `-Q`).
    pub fn query_spns(&self, pattern: &SpnPattern) -> Result<Vec<Account>, DirectoryError> {
        let mut alternatives = format!("({SPN_ATTR}={})", filter::escape_pattern(pattern.as_str()));
        if let Some(twin) = pattern.samba_twin() {
            alternatives.push_str(&format!("({SPN_ATTR}={})", filter::escape_pattern(&twin)));
        }
        let f = format!("(|{alternatives})");
        let mut found: Vec<Account> = self
            .search_domain(&f, &ACCOUNT_ATTRS)?
            .iter()
            .map(Account::from_entry)
            .filter(|a| a.service_principal_names.iter().any(|v| pattern.matches(v)))
            .collect();
        found.sort_by(|a, b| a.dn.cmp(&b.dn));
        Ok(found)
    }

    /// SPNs registered on more than one account (setspn `-X`), twins not counted.
    pub fn find_duplicate_spns(&self) -> Result<Vec<DuplicateSpn>, DirectoryError> {
        let entries = self.search_domain(&format!("({SPN_ATTR}=*)"), &[SPN_ATTR])?;
        Ok(duplicate_groups(
            entries.iter().map(|e| (e.dn.as_str(), e.values(SPN_ATTR))),
        ))
    }

    /// Adds `spn` to `attr` of `dn`, whose current values are `current`: the plain value and,
    /// on Samba, its twin; values already present are not written again. Returns the values
    /// written (empty when everything was already there).
    pub fn add_spn_value(
        &self,
        dn: &str,
        attr: &str,
        spn: &Spn,
        current: &[String],
    ) -> Result<Vec<String>, DirectoryError> {
        let missing: Vec<String> = spn::stored_values(spn, self.is_samba())
            .into_iter()
            .filter(|v| !current.iter().any(|c| c.eq_ignore_ascii_case(v)))
            .collect();
        if !missing.is_empty() {
            self.add_values(dn, attr, &missing).map_err(|e| match e {
                DirectoryError::Refused { code: 19, text, .. } if is_uniqueness_refusal(&text) => {
                    DirectoryError::SpnNotUnique {
                        spn: spn.to_string(),
                        dn: dn.to_owned(),
                        text,
                    }
                }
                other => other,
            })?;
        }
        Ok(missing)
    }

    /// Removes every value of `attr` on `dn` that names `spn` (plain in any case, and its
    /// twin), given the current values. Errors when none does. Returns the values removed.
    pub fn remove_spn_value(
        &self,
        dn: &str,
        attr: &str,
        spn: &Spn,
        current: &[String],
    ) -> Result<Vec<String>, DirectoryError> {
        let values = spn::values_naming(spn, current);
        if values.is_empty() {
            return Err(not_registered(spn, dn, attr));
        }
        if attr == SPN_ATTR && self.is_samba() {
            // Samba's samldb runs its SPN uniqueness check on the values of a *delete*
            // modification too, so removing a duplicated SPN from either holder is refused
            // (constraint violation). Writing the remaining values with a replace is accepted.
            let remaining: Vec<String> = current
                .iter()
                .filter(|v| !values.iter().any(|r| r == *v))
                .cloned()
                .collect();
            self.replace_values(dn, attr, &remaining)?;
        } else {
            self.delete_values(dn, attr, &values)?;
        }
        Ok(values)
    }

    /// Registers `spn` on `account` (no duplicate check: see [`Directory::spn_holders`]).
    pub fn register_spn(
        &self,
        account: &Account,
        spn: &Spn,
    ) -> Result<Vec<String>, DirectoryError> {
        self.add_spn_value(&account.dn, SPN_ATTR, spn, &account.service_principal_names)
    }

    /// Unregisters `spn` from `account` (plain and twin).
    pub fn unregister_spn(
        &self,
        account: &Account,
        spn: &Spn,
    ) -> Result<Vec<String>, DirectoryError> {
        self.remove_spn_value(&account.dn, SPN_ATTR, spn, &account.service_principal_names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_ignore_twins_and_case() {
        let plain = "Microsoft Virtual System Migration Service/hv9".to_owned();
        let twin = "Microsoft\\ Virtual\\ System\\ Migration\\ Service/hv9".to_owned();
        let a = vec![plain.clone(), twin.clone(), "HOST/a".to_owned()];
        let b = vec!["HOST/b".to_owned(), "host/A".to_owned()];
        let c = vec![twin.clone()];
        let groups = duplicate_groups([("CN=A", a.as_slice()), ("CN=B", b.as_slice())]);
        assert_eq!(
            groups,
            vec![DuplicateSpn {
                spn: "HOST/a".into(),
                accounts: vec!["CN=A".into(), "CN=B".into()]
            }]
        );
        // The twin alone on another account is a duplicate of the plain SPN on A.
        let groups = duplicate_groups([("CN=A", a.as_slice()), ("CN=C", c.as_slice())]);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].spn, plain);
        // One account with plain + twin is not a duplicate of itself.
        assert!(duplicate_groups([("CN=A", a.as_slice())]).is_empty());
    }
}
