//! `vmgate host keytab refresh`: a new random password for the host's computer account, set
//! the way `adcli update` sets it, and the keytab rewritten with the new keys.
//!
//! 1. The account is read from the directory: its DN, `servicePrincipalName`,
//!    `msDS-SupportedEncryptionTypes` and the current key version `msDS-KeyVersionNumber` (K).
//! 2. The KDC says how the account's keys are salted (ETYPE-INFO2; AD salts a computer's keys
//!    with `REALMhost<name>.<domain>`), a random 120-character password is made, and its keys
//!    are derived for each encryption type the account supports (AES-256, AES-128, RC4 from
//!    bits 0x10, 0x08, 0x04; all three when the attribute is unset), for the account name and
//!    for every SPN of the account (Samba's escaped twins excepted: tickets carry the plain
//!    name), with key version K+1.
//! 3. The new keytab — the kept entries (other principals untouched; ours from version K on,
//!    older ones dropped) plus the new ones — is written to a side file *before* anything
//!    changes.
//! 4. The password is changed: kpasswd (RFC 3244) with an initial ticket for `kadmin/changepw`
//!    obtained with the keytab's current key, as `adcli update` does; when that key no longer
//!    works (a stale keytab) and the caller allows it, the password is instead set over LDAP
//!    (`unicodePwd`), which needs the right to reset the account's password.
//! 5. The directory's key version is read again; the side file is corrected if the DC did not
//!    count to K+1, and renamed over the keytab (one atomic rename: readers see the old keytab
//!    or the new one). The old version-K entries stay, so tickets issued before the change
//!    still decrypt.
//! 6. The new key is proven: initial tickets with the keytab (`kinit -k`) must succeed.
//!
//! Nothing is changed when steps 1–3 fail; when step 4 fails the side file is removed and the
//! keytab is as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::directory::{Directory, DirectoryError, filter};
use crate::secret::Secret;
use crate::winerr::{Diagnosis, WinCode};

use super::keytab::{self, KeytabError, NewEntry, RawEntry};
use super::libkrb5::{self, ChangePasswordError, Krb5Error};

/// The constructed attribute with the account's current key version.
pub const KVNO_ATTR: &str = "msDS-KeyVersionNumber";
/// The attribute with the account's encryption types.
pub const ENCTYPES_ATTR: &str = "msDS-SupportedEncryptionTypes";
/// The length of the new password (what Windows and adcli use for machine accounts).
pub const PASSWORD_LENGTH: usize = 120;

/// aes256-cts-hmac-sha1-96.
pub const AES256: i32 = 18;
/// aes128-cts-hmac-sha1-96.
pub const AES128: i32 = 17;
/// arcfour-hmac (RC4).
pub const RC4: i32 = 23;

/// What to refresh.
#[derive(Clone, Debug)]
pub struct RefreshRequest {
    /// The keytab to rewrite (`/etc/krb5.keytab`).
    pub keytab: PathBuf,
    /// The computer account (`HV1$`, or `hv1`); `None`: the computer account in the keytab
    /// that matches this host's name ([`crate::discover::identity_from_keytab`]).
    pub account: Option<String>,
    /// The realm; `None`: the keytab entry's, else krb5.conf's default.
    pub realm: Option<String>,
    /// When the keytab's key no longer works, set the password over LDAP instead (the
    /// directory connection needs the right to reset the account's password).
    pub allow_reset: bool,
}

/// How the password was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeMethod {
    /// kpasswd, authenticated with the keytab's current key (what `adcli update` does).
    Kpasswd,
    /// An LDAP password reset (`unicodePwd`) by the directory connection's user.
    LdapReset,
}

/// What a refresh did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RefreshReport {
    /// The keytab.
    pub keytab: PathBuf,
    /// `sAMAccountName` (`HV1$`).
    pub account: String,
    /// The account's DN.
    pub dn: String,
    /// The key version before.
    pub previous_kvno: u32,
    /// The key version now (the directory's `msDS-KeyVersionNumber`, which the keytab holds).
    pub kvno: u32,
    /// The principals written (without the realm).
    pub principals: Vec<String>,
    /// The encryption types written.
    pub enctypes: Vec<i32>,
    /// How the password was changed.
    pub method: ChangeMethod,
    /// Entries of older key versions dropped from the keytab.
    pub dropped: usize,
}

/// Errors of a refresh; each says what was left as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// The account could not be read.
    #[error("cannot read the account {account} from the directory")]
    Directory {
        /// The account.
        account: String,
        /// Why.
        #[source]
        source: Box<DirectoryError>,
    },
    /// No such account.
    #[error("there is no account {account} in the directory")]
    NoAccount {
        /// The name looked for.
        account: String,
    },
    /// The key version is not readable.
    #[error("the directory does not show {KVNO_ATTR} of {account} to this connection")]
    NoKvno {
        /// The account.
        account: String,
    },
    /// The keytab cannot be read, or has no computer account to refresh.
    #[error(transparent)]
    Keytab(#[from] KeytabError),
    /// No account was named and none was found in the keytab.
    #[error("no account given, and {}", .0)]
    NoAccountInKeytab(#[source] crate::discover::DiscoverError),
    /// The salt or the keys could not be made (nothing was changed).
    #[error("cannot make the new keys of {account} (nothing was changed)")]
    Keys {
        /// The account.
        account: String,
        /// Why.
        #[source]
        source: Krb5Error,
    },
    /// The new keytab could not be written (nothing was changed).
    #[error("cannot write {} (nothing was changed)", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The password could not be changed (the keytab is as it was).
    #[error("cannot change the password of {account} (the keytab is as it was){}", reset.as_ref().map(|e| format!("; the LDAP reset failed too: {e}")).unwrap_or_default())]
    Change {
        /// The account.
        account: String,
        /// kpasswd's failure.
        #[source]
        source: ChangePasswordError,
        /// The LDAP reset's failure, when it was tried.
        reset: Option<Box<DirectoryError>>,
    },
    /// The password changed, but the new keytab could not be put in place.
    #[error("the password of {account} changed, but {} could not be replaced: the new keys are in {}", path.display(), side.display())]
    Install {
        /// The account.
        account: String,
        /// The keytab.
        path: PathBuf,
        /// The side file with the new keys.
        side: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The keytab was rewritten, but the KDC does not accept its new key.
    #[error("{} now holds key version {kvno} of {account}, but the KDC does not accept it", path.display())]
    NotVerified {
        /// The account.
        account: String,
        /// The keytab.
        path: PathBuf,
        /// The version written.
        kvno: u32,
        /// The KDC's answer.
        #[source]
        source: Krb5Error,
    },
}

impl RefreshError {
    /// The Windows code, cause and fix.
    pub fn diagnosis(&self, host: &str) -> Diagnosis {
        match self {
            RefreshError::Change {
                account,
                source,
                reset,
            } => {
                let stale = matches!(source, ChangePasswordError::Krb5(e) if e.op == libkrb5::Krb5Op::InitialTickets);
                let d = Diagnosis::new(
                    if stale {
                        WinCode::LogonDenied
                    } else {
                        WinCode::AccessDenied
                    },
                    format!(
                        "{host} could not change {account}'s password: {}{}",
                        source,
                        reset
                            .as_ref()
                            .map(|e| format!("; resetting it over LDAP failed too: {e}"))
                            .unwrap_or_default()
                    ),
                );
                if stale {
                    d.with_fix(format!(
                        "the keytab's key no longer works: reset the password with a domain \
                         administrator's ticket: kinit Administrator; vmgate host keytab refresh \
                         --reset\nor re-join {host}: adcli join (or net ads join -k)"
                    ))
                } else {
                    d
                }
            }
            RefreshError::NoAccount { account } => Diagnosis::new(
                WinCode::TargetUnknown,
                format!("there is no computer account {account} in the domain"),
            )
            .with_fix(format!(
                "join {host} to the domain: realm join (or adcli join)"
            )),
            other => Diagnosis::new(WinCode::UnknownCredentials, other.to_string()),
        }
    }
}

/// Encryption types from `msDS-SupportedEncryptionTypes` (AES-256, AES-128, RC4), strongest
/// first; all three when the attribute is unset or names none of them.
pub fn enctypes_of(supported: Option<u32>) -> Vec<i32> {
    let bits = supported.unwrap_or(0);
    let mut out = Vec::new();
    if bits & 0x10 != 0 {
        out.push(AES256);
    }
    if bits & 0x08 != 0 {
        out.push(AES128);
    }
    if bits & 0x04 != 0 {
        out.push(RC4);
    }
    if out.is_empty() {
        out = vec![AES256, AES128, RC4];
    }
    out
}

/// A random password of [`PASSWORD_LENGTH`] characters with upper and lower case letters,
/// digits and punctuation (any complexity rule is met).
pub fn random_password() -> Result<Secret, ring::error::Unspecified> {
    const CHARS: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#%+,-.:=?@^_~";
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut bytes = Zeroizing::new(vec![0u8; PASSWORD_LENGTH]);
        rng.fill(&mut bytes)?;
        // 256 is not a multiple of the alphabet's size: draws past the last full multiple are
        // skipped, so every character is equally likely.
        let limit = 256 - 256 % CHARS.len();
        let text: Zeroizing<String> = Zeroizing::new(
            bytes
                .iter()
                .filter(|b| usize::from(**b) < limit)
                .filter_map(|b| {
                    CHARS
                        .get(usize::from(*b) % CHARS.len())
                        .map(|c| char::from(*c))
                })
                .collect(),
        );
        if text.len() < PASSWORD_LENGTH * 3 / 4 {
            continue;
        }
        let has = |f: fn(&char) -> bool| text.chars().any(|c| f(&c));
        if has(char::is_ascii_uppercase)
            && has(char::is_ascii_lowercase)
            && has(char::is_ascii_digit)
            && has(char::is_ascii_punctuation)
        {
            return Ok(Secret::new(text.as_str()));
        }
    }
}

/// The principals to write for an account: its name and each SPN (escaped twins skipped), as
/// the directory stores them, plus any other spelling of them the keytab already uses (a
/// keytab exported as `hv1$` keeps working for programs that ask for `hv1$`).
pub fn principals_for(sam: &str, spns: &[String], existing: &[RawEntry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |name: &str| {
        if !out.iter().any(|o| o == name) {
            out.push(name.to_owned());
        }
    };
    let wanted: Vec<&str> = std::iter::once(sam)
        .chain(
            spns.iter()
                .map(String::as_str)
                .filter(|s| !s.contains("\\ ") && s.contains('/')),
        )
        .collect();
    for w in &wanted {
        push(w);
    }
    for e in existing {
        if wanted.iter().any(|w| w.eq_ignore_ascii_case(&e.entry.name)) {
            push(&e.entry.name);
        }
    }
    out
}

fn is_ours(name: &str, principals: &[String]) -> bool {
    principals.iter().any(|p| p.eq_ignore_ascii_case(name))
}

struct AccountFacts {
    dn: String,
    sam: String,
    spns: Vec<String>,
    supported: Option<u32>,
    kvno: Option<u32>,
}

fn read_account(dir: &Directory, name: &str) -> Result<AccountFacts, RefreshError> {
    let sam = if name.ends_with('$') {
        name.to_owned()
    } else {
        format!("{name}$")
    };
    let f = format!(
        "(&(objectClass=computer){})",
        filter::eq("sAMAccountName", &sam)
    );
    let entries = dir
        .search_domain(
            &f,
            &[
                "sAMAccountName",
                "servicePrincipalName",
                ENCTYPES_ATTR,
                KVNO_ATTR,
            ],
        )
        .map_err(|source| RefreshError::Directory {
            account: sam.clone(),
            source: Box::new(source),
        })?;
    let e = entries
        .into_iter()
        .next()
        .ok_or_else(|| RefreshError::NoAccount {
            account: sam.clone(),
        })?;
    Ok(AccountFacts {
        dn: e.dn.clone(),
        sam: e.first("sAMAccountName").unwrap_or(&sam).to_owned(),
        spns: e.values("servicePrincipalName").to_vec(),
        supported: e.first(ENCTYPES_ATTR).and_then(|v| v.trim().parse().ok()),
        kvno: e.first(KVNO_ATTR).and_then(|v| v.trim().parse().ok()),
    })
}

fn now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

struct SideFile(PathBuf, bool);

impl Drop for SideFile {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn side_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".vmgate-new");
    path.with_file_name(name)
}

/// Refreshes the keytab (see the module doc). `dir` reads the account (any user who may read
/// it: the host itself, an administrator) and, with `allow_reset`, resets its password.
pub fn refresh(dir: &Directory, req: &RefreshRequest) -> Result<RefreshReport, RefreshError> {
    let existing = keytab::read_raw(&req.keytab)?;
    let (account_name, keytab_realm) = match &req.account {
        Some(a) => (a.clone(), None),
        None => {
            let id = crate::discover::identity_from_keytab(
                &req.keytab,
                crate::discover::system_host_name().as_deref(),
            )
            .map_err(RefreshError::NoAccountInKeytab)?;
            (id.account, Some(id.realm))
        }
    };
    let realm = req
        .realm
        .clone()
        .or(keytab_realm)
        .unwrap_or_else(|| dir.realm());
    let acct = read_account(dir, &account_name)?;
    let sam = acct.sam.clone();
    let current = acct.kvno.ok_or_else(|| RefreshError::NoKvno {
        account: sam.clone(),
    })?;
    let principals = principals_for(&sam, &acct.spns, &existing);
    let enctypes = enctypes_of(acct.supported);

    // The new keys, before anything changes.
    let keys_err = |source| RefreshError::Keys {
        account: sam.clone(),
        source,
    };
    let account_principal = format!("{sam}@{realm}");
    let aes: Vec<i32> = enctypes.iter().copied().filter(|e| *e != RC4).collect();
    let (salt, params) = if aes.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let (_, salt, params) = libkrb5::etype_info(&account_principal, &aes).map_err(keys_err)?;
        (salt, params)
    };
    let password = random_password().map_err(|_| {
        keys_err(Krb5Error {
            op: libkrb5::Krb5Op::StringToKey,
            target: None,
            code: 0,
            message: "the system's random number generator failed".into(),
        })
    })?;
    let mut keys: Vec<(i32, Zeroizing<Vec<u8>>)> = Vec::new();
    for e in &enctypes {
        let p = if *e == RC4 { &[][..] } else { &params[..] };
        keys.push((
            *e,
            libkrb5::string_to_key(*e, &password, &salt, p).map_err(keys_err)?,
        ));
    }
    let realm_ref = realm.as_str();
    let build = |kvno: u32| -> Zeroizing<Vec<u8>> {
        let kept: Vec<&RawEntry> = existing
            .iter()
            .filter(|e| {
                !is_ours(&e.entry.name, &principals)
                    || (e.entry.kvno >= current && e.entry.kvno != kvno)
            })
            .collect();
        let stamp = now();
        let new: Vec<NewEntry> = principals
            .iter()
            .flat_map(|p| {
                keys.iter().map(move |(e, k)| NewEntry {
                    components: p.split('/').map(str::to_owned).collect(),
                    realm: realm_ref.to_owned(),
                    kvno,
                    enctype: u16::try_from(*e).unwrap_or(0),
                    key: k.clone(),
                    timestamp: stamp,
                })
            })
            .collect();
        keytab::encode(&kept, &new)
    };
    let dropped = existing
        .iter()
        .filter(|e| is_ours(&e.entry.name, &principals) && e.entry.kvno < current)
        .count();
    let side = side_path(&req.keytab);
    let write_err = |source| RefreshError::Write {
        path: side.clone(),
        source,
    };
    keytab::write_atomic(&side, &build(current + 1)).map_err(write_err)?;
    let mut guard = SideFile(side.clone(), true);

    // The change.
    let client = existing
        .iter()
        .filter(|e| e.entry.name.eq_ignore_ascii_case(&sam) && e.entry.kvno == current)
        .map(|e| format!("{}@{}", e.entry.name, e.entry.realm))
        .next()
        .unwrap_or_else(|| account_principal.clone());
    let kt_name = format!("FILE:{}", req.keytab.display());
    let method = match libkrb5::change_password_with_keytab(&client, &kt_name, &password) {
        Ok(()) => ChangeMethod::Kpasswd,
        Err(ChangePasswordError::Krb5(e))
            if req.allow_reset && e.op != libkrb5::Krb5Op::ChangePassword =>
        {
            match dir.set_password(&acct.dn, &password) {
                Ok(()) => ChangeMethod::LdapReset,
                Err(reset) => {
                    return Err(RefreshError::Change {
                        account: sam,
                        source: ChangePasswordError::Krb5(e),
                        reset: Some(Box::new(reset)),
                    });
                }
            }
        }
        Err(source) => {
            return Err(RefreshError::Change {
                account: sam,
                source,
                reset: None,
            });
        }
    };
    tracing::info!(account = %sam, ?method, "changed the computer account's password");

    // The version the directory counted to.
    let kvno = read_account(dir, &sam)
        .ok()
        .and_then(|a| a.kvno)
        .unwrap_or(current + 1);
    if kvno != current + 1 {
        keytab::write_atomic(&side, &build(kvno)).map_err(|source| RefreshError::Install {
            account: sam.clone(),
            path: req.keytab.clone(),
            side: side.clone(),
            source,
        })?;
    }
    std::fs::rename(&side, &req.keytab)
        .and_then(|()| {
            let dir = req
                .keytab
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        })
        .map_err(|source| {
            guard.1 = false;
            RefreshError::Install {
                account: sam.clone(),
                path: req.keytab.clone(),
                side: side.clone(),
                source,
            }
        })?;
    guard.1 = false;

    // Proof: the KDC accepts the new key (a DC that has not seen the change yet may need a
    // moment).
    let mut last = None;
    for attempt in 0..5u64 {
        match libkrb5::init_creds_keytab(&account_principal, &kt_name, None) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
            }
        }
    }
    if let Some(source) = last {
        return Err(RefreshError::NotVerified {
            account: sam,
            path: req.keytab.clone(),
            kvno,
            source,
        });
    }
    Ok(RefreshReport {
        keytab: req.keytab.clone(),
        account: sam,
        dn: acct.dn,
        previous_kvno: current,
        kvno,
        principals,
        enctypes,
        method,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enctypes_follow_the_account() {
        assert_eq!(enctypes_of(Some(28)), [AES256, AES128, RC4]);
        assert_eq!(enctypes_of(Some(0x18)), [AES256, AES128]);
        assert_eq!(enctypes_of(Some(4)), [RC4]);
        assert_eq!(enctypes_of(None), [AES256, AES128, RC4]);
        assert_eq!(enctypes_of(Some(3)), [AES256, AES128, RC4]);
    }

    #[test]
    fn passwords_are_long_random_and_complex() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert!(a.expose().len() >= PASSWORD_LENGTH * 3 / 4);
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().chars().any(|c| c.is_ascii_punctuation()));
    }

    #[test]
    fn principals_are_the_account_and_its_spns_in_every_spelling() {
        let raw = keytab::parse_raw(&keytab::encode(
            &[],
            &[NewEntry {
                components: vec!["hv1$".into()],
                realm: "R".into(),
                kvno: 2,
                enctype: 18,
                key: Zeroizing::new(vec![1; 32]),
                timestamp: 0,
            }],
        ))
        .unwrap();
        let spns = vec![
            "HOST/hv1".to_owned(),
            "Microsoft Virtual System Migration Service/hv1.lab".to_owned(),
            "Microsoft\\ Virtual\\ System\\ Migration\\ Service/hv1.lab".to_owned(),
        ];
        assert_eq!(
            principals_for("HV1$", &spns, &raw),
            [
                "HV1$",
                "HOST/hv1",
                "Microsoft Virtual System Migration Service/hv1.lab",
                "hv1$"
            ]
        );
    }
}
