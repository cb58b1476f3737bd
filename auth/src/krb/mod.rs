//! Kerberos through GSSAPI: credentials from explicit keytabs and caches, contexts, S4U.
//!
//! Everything here takes its credentials from **explicit paths** (`gss_acquire_cred_from` with
//! a credential store), never from `KRB5_KTNAME`/`KRB5CCNAME`, so several hosts can live in one
//! process and a daemon uses exactly the keytab its configuration names. (`KRB5_CONFIG`, which
//! says where the KDC is, stays process-wide.)
//!
//! * [`UserCredential::from_ccache`]: a user's tickets (after `kinit -c FILE`), for initiating.
//! * [`HostCredentials`]: a host's keytab plus a private folder for per-operation credential
//!   caches. [`HostCredentials::acceptor`] gives a credential usable for accepting **and**
//!   initiating (so MIT hands back an S4U2Proxy "evidence" credential when a client's ticket is
//!   forwardable), [`HostCredentials::initiator`] one for acting as the host itself, and
//!   [`HostCredentials::impersonate`] runs S4U2Self ("protocol transition").
//! * Contexts are typestates: [`InitPending::new`] → [`InitPending::step`] →
//!   [`InitEstablished`]; [`AcceptPending::new`] → [`AcceptPending::step`] → [`Accepted`]. Channel
//!   bindings are a required argument of both, so no context is ever made without them, and an
//!   acceptor completes only when the client's bindings were verified
//!   ([`GSS_C_CHANNEL_BOUND_FLAG`]): an authenticator without bindings, which MIT accepts, is
//!   refused ([`KrbError::Unbound`]).
//! * An acceptor takes tickets only for the host's migration SPNs ([`AcceptedServices`]): the
//!   service named in the client's AP-REQ is checked before GSSAPI sees it ([`ticket`]), since
//!   the keytab's one account key decrypts tickets for every service of the account.
//!   Wrap/unwrap exist only on established contexts.
//! * Acting for a user towards another host: initiate with the credential that
//!   [`Accepted::take_delegated`] returned — a forwarded TGT (the client set the delegation
//!   flag) or the evidence of the user's service ticket (S4U2Proxy, constrained delegation) —
//!   or with [`HostCredentials::impersonate`]'s result (S4U2Self + S4U2Proxy).
//!
//! Each per-operation cache ([`OpCcache`]) is a fresh file in the host's private folder,
//! removed when the operation ends: a stale S4U2Self ticket left in a shared cache breaks a
//! later "Kerberos only" delegation.
//!
//! Errors are [`KrbError`]; [`diagnose`] turns them into the Windows code, the cause in this
//! deployment's terms and the fix.

pub mod ccache;
pub mod diagnose;
pub mod error;
pub mod keytab;
pub mod libkrb5;
pub mod refresh;
pub mod ticket;

use std::ffi::{CString, c_void};
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext, ServerCtx};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{GSS_MECH_KRB5, GSS_NT_KRB5_PRINCIPAL};
use libgssapi_sys as sys;

use crate::secret::Secret;
use crate::spn::Spn;

pub use diagnose::{Act, AuthFacts, diagnose};
pub use error::{GssStatus, KrbError, KrbOp};

/// The most round trips a context may take (Kerberos needs one or two).
pub const MAX_STEPS: usize = 4;

/// A Kerberos principal, `name@REALM` (`alice@LAB.EXAMPLE.TEST`, `hv1$@LAB.EXAMPLE.TEST`,
/// `Microsoft Virtual System Migration Service/hv2.lab.example.test@LAB.EXAMPLE.TEST`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    /// Parses `name@REALM`; a name without a realm gets `default_realm`.
    pub fn parse(text: &str, default_realm: Option<&str>) -> Result<Principal, KrbError> {
        let bad = || KrbError::BadPrincipal(text.to_owned());
        if text.is_empty() || text.len() > 1024 || text.chars().any(char::is_control) {
            return Err(bad());
        }
        match text.rsplit_once('@') {
            Some((name, realm)) if !name.is_empty() && !realm.is_empty() => {
                Ok(Principal(format!("{name}@{}", realm.to_uppercase())))
            }
            Some(_) => Err(bad()),
            None => match default_realm {
                Some(r) if !r.is_empty() => Ok(Principal(format!("{text}@{}", r.to_uppercase()))),
                _ => Err(bad()),
            },
        }
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the realm (`alice`, `hv1$`).
    pub fn name(&self) -> &str {
        self.0.rsplit_once('@').map_or(&self.0, |(n, _)| n)
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(_, r)| r)
    }

    /// Case-insensitive comparison of the name (AD names ignore case) and the realm.
    pub fn same_as(&self, other: &Principal) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }

    fn gss_name(&self) -> Result<Name, KrbError> {
        Name::new(self.0.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
            .map_err(|e| KrbError::gss(KrbOp::AcquireCredentials, Some(&self.0), &e))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn cstring(s: &str) -> Result<CString, KrbError> {
    CString::new(s).map_err(|_| KrbError::BadString(s.to_owned()))
}

fn path_str(p: &Path) -> Result<&str, KrbError> {
    p.to_str()
        .ok_or_else(|| KrbError::BadString(p.display().to_string()))
}

/// The krb5 mechanism OID, 1.2.840.113554.1.2.2.
const KRB5_OID: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// GSS_KRB5_NT_PRINCIPAL_NAME, 1.2.840.113554.1.2.2.1.
const KRB5_NT_PRINCIPAL_OID: [u8; 10] =
    [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02, 0x01];

/// Imports a principal name into a raw GSS name (released by the caller).
fn import_raw_name(principal: &Principal) -> Result<sys::gss_name_t, KrbError> {
    let mut minor: sys::OM_uint32 = 0;
    let mut buf = sys::gss_buffer_desc {
        length: principal.as_str().len(),
        value: principal.as_str().as_ptr().cast_mut().cast::<c_void>(),
    };
    let mut oid = sys::gss_OID_desc {
        length: 10,
        elements: KRB5_NT_PRINCIPAL_OID.as_ptr().cast_mut().cast::<c_void>(),
    };
    let mut out: sys::gss_name_t = ptr::null_mut();
    // SAFETY: `buf` points at the principal's bytes, which outlive the call, with their exact
    // length; gss_import_name only reads them. `oid` points at a static 10-byte OID that the
    // call only reads. `out` is a valid place for the new name; on success the caller owns it
    // and releases it with gss_release_name. `minor` is a valid place for the minor status.
    let major = unsafe { sys::gss_import_name(&mut minor, &mut buf, &mut oid, &mut out) };
    if major != 0 {
        return Err(KrbError::gss(
            KrbOp::AcquireCredentials,
            Some(principal.as_str()),
            &libgssapi::error::Error {
                major: libgssapi::error::MajorFlags::from_bits_retain(major),
                minor,
            },
        ));
    }
    Ok(out)
}

/// `gss_acquire_cred_from` for the krb5 mechanism with the given credential store.
fn acquire_from(
    name: Option<&Principal>,
    usage: CredUsage,
    store: &[(&'static std::ffi::CStr, String)],
    what: &str,
) -> Result<Cred, KrbError> {
    let values: Vec<CString> = store
        .iter()
        .map(|(_, v)| cstring(v))
        .collect::<Result<_, _>>()?;
    let mut elements: Vec<sys::gss_key_value_element_desc> = store
        .iter()
        .zip(&values)
        .map(|((k, _), v)| sys::gss_key_value_element_desc {
            key: k.as_ptr(),
            value: v.as_ptr(),
        })
        .collect();
    let set = sys::gss_key_value_set_desc {
        count: u32::try_from(elements.len()).map_err(|_| KrbError::BadString(what.to_owned()))?,
        elements: elements.as_mut_ptr(),
    };
    let mut raw_name: sys::gss_name_t = match name {
        Some(p) => import_raw_name(p)?,
        None => ptr::null_mut(),
    };
    let mut oid = sys::gss_OID_desc {
        length: 9,
        elements: KRB5_OID.as_ptr().cast_mut().cast::<c_void>(),
    };
    let mut mechs = sys::gss_OID_set_desc {
        count: 1,
        elements: &mut oid,
    };
    let usage_c = match usage {
        CredUsage::Both => sys::GSS_C_BOTH,
        CredUsage::Initiate => sys::GSS_C_INITIATE,
        CredUsage::Accept => sys::GSS_C_ACCEPT,
    };
    let mut minor: sys::OM_uint32 = 0;
    let mut cred: sys::gss_cred_id_t = ptr::null_mut();
    // SAFETY: every pointer handed over is valid for the duration of the call and only read
    // by it: `set` points at `elements`, whose key/value pointers point into `'static` C
    // strings and into `values` (alive until the end of this function); `raw_name` is null
    // (default name) or a name we imported above; `mechs` points at `oid`, which points at a
    // static OID. `cred` and `minor` are valid places for the outputs; actual_mechs and
    // time_rec are null (not wanted), which the API allows.
    let major = unsafe {
        sys::gss_acquire_cred_from(
            &mut minor,
            raw_name,
            sys::_GSS_C_INDEFINITE,
            &mut mechs,
            i32::try_from(usage_c).unwrap_or(0),
            &set,
            &mut cred,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    let status = (major != 0).then(|| libgssapi::error::Error {
        major: libgssapi::error::MajorFlags::from_bits_retain(major),
        minor,
    });
    // Format the message now, on this thread, before anything else touches Kerberos.
    let err = status.map(|e| KrbError::gss(KrbOp::AcquireCredentials, Some(what), &e));
    if !raw_name.is_null() {
        let mut m2: sys::OM_uint32 = 0;
        // SAFETY: `raw_name` came from gss_import_name above and is released exactly once.
        unsafe { sys::gss_release_name(&mut m2, &mut raw_name) };
    }
    if let Some(e) = err {
        if !cred.is_null() {
            let mut m3: sys::OM_uint32 = 0;
            // SAFETY: a credential returned despite the failure is ours and released once.
            unsafe { sys::gss_release_cred(&mut m3, &mut cred) };
        }
        return Err(e);
    }
    // SAFETY: gss_acquire_cred_from succeeded, so `cred` is a valid credential handle that
    // nobody else owns; ownership moves into the returned Cred, which releases it once.
    Ok(unsafe { Cred::from_c(cred) })
}

/// How a credential came to be, which decides what it can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredKind {
    /// A user's own tickets from a credential cache.
    User,
    /// The host's own identity (keytab).
    Host,
    /// A user's TGT that the user forwarded to us (delegation flag, "CredSSP-style").
    ForwardedTgt,
    /// The user's service ticket to us, kept as evidence for S4U2Proxy (constrained delegation).
    Evidence,
    /// A ticket for the user to ourselves obtained with S4U2Self (protocol transition).
    Impersonated,
}

/// A GSSAPI credential with what it is and, for credentials held on behalf of a user, whose.
#[derive(Clone)]
pub struct Credential {
    cred: Cred,
    kind: CredKind,
    user: Option<Principal>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("user", &self.user)
            .finish()
    }
}

impl Credential {
    /// What the credential is.
    pub fn kind(&self) -> CredKind {
        self.kind
    }

    /// The user this credential acts for (forwarded, evidence, impersonated, user).
    pub fn user(&self) -> Option<&Principal> {
        self.user.as_ref()
    }

    /// The credential's principal as GSSAPI reports it.
    pub fn principal(&self) -> Result<Principal, KrbError> {
        let name = self
            .cred
            .name()
            .map_err(|e| KrbError::gss(KrbOp::Inquire, None, &e))?;
        principal_of(&name)
    }
}

impl Credential {
    /// Whether the user's service ticket held in this credential (the S4U2Proxy evidence) is
    /// forwardable: the KDC refuses S4U2Proxy with a non-forwardable one ("sensitive and
    /// cannot be delegated", Protected Users, or a client that asked for a non-forwardable
    /// ticket). GSSAPI does not say; the credential is stored into a private cache file of
    /// `host`, which is read (bounded) and removed. `None` when no such ticket is in it.
    pub fn ticket_forwardable(&self, host: &HostCredentials) -> Result<Option<bool>, KrbError> {
        let cc = OpCcache::new(&host.ccache_dir);
        self.cred
            .store_into(&cc.name(), true, true, CredUsage::Initiate, None)
            .map_err(|e| KrbError::gss(KrbOp::Inquire, None, &e))?;
        let data =
            read_bounded(cc.path(), ccache::MAX_FILE).map_err(|source| KrbError::CcacheDir {
                dir: cc.path().display().to_string(),
                source,
            })?;
        drop(cc);
        let Ok((_, creds)) = ccache::parse(&data) else {
            return Ok(None);
        };
        let user = self.user.as_ref();
        Ok(creds
            .iter()
            .filter(|c| !c.is_config() && !c.is_tgt())
            .find(|c| user.is_none_or(|u| c.client.unparsed().eq_ignore_ascii_case(u.as_str())))
            .map(|c| c.flags & ccache::FORWARDABLE != 0))
    }
}

fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut data = Vec::new();
    f.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut data)?;
    Ok(data)
}

fn principal_of(name: &Name) -> Result<Principal, KrbError> {
    let text = name.to_string();
    Principal::parse(&text, None)
}

/// A user's own credentials.
#[derive(Debug)]
pub struct UserCredential;

impl UserCredential {
    /// The tickets in the credential cache at `ccache` (a path, or `TYPE:residual`), for
    /// initiating. Fails with the GSS status when the cache is missing or empty.
    pub fn from_ccache(ccache: &str) -> Result<Credential, KrbError> {
        let cc = if ccache.contains(':') {
            ccache.to_owned()
        } else {
            format!("FILE:{ccache}")
        };
        let cred = acquire_from(None, CredUsage::Initiate, &[(c"ccache", cc)], ccache)?;
        let mut c = Credential {
            cred,
            kind: CredKind::User,
            user: None,
        };
        c.user = c.principal().ok();
        Ok(c)
    }

    /// Gets a TGT for `user` with a password into the (new) cache at `ccache`, then reads it.
    /// For tools and tests; daemons never hold user passwords.
    pub fn with_password(
        user: &Principal,
        password: &Secret,
        ccache: &Path,
    ) -> Result<Credential, KrbError> {
        let name = user.gss_name()?;
        let cred = Cred::acquire_with_password(
            Some(&name),
            password.expose(),
            None,
            CredUsage::Initiate,
            None,
        )
        .map_err(|e| KrbError::gss(KrbOp::AcquireCredentials, Some(user.as_str()), &e))?;
        let cc = format!("FILE:{}", path_str(ccache)?);
        cred.store_into(&cc, true, true, CredUsage::Initiate, None)
            .map_err(|e| KrbError::gss(KrbOp::AcquireCredentials, Some(&cc), &e))?;
        UserCredential::from_ccache(&cc)
    }
}

static OP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A private credential cache for one operation, removed when dropped.
#[derive(Debug)]
pub struct OpCcache {
    path: PathBuf,
}

impl OpCcache {
    fn new(dir: &Path) -> OpCcache {
        let n = OP_COUNTER.fetch_add(1, Ordering::Relaxed);
        OpCcache {
            path: dir.join(format!("op-{}-{n}.ccache", std::process::id())),
        }
    }

    /// `FILE:<path>`.
    pub fn name(&self) -> String {
        format!("FILE:{}", self.path.display())
    }

    /// The file (it exists only once Kerberos stored a ticket in it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OpCcache {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A host's Kerberos identity: its keytab and a private folder for per-operation caches.
#[derive(Clone, Debug)]
pub struct HostCredentials {
    keytab: PathBuf,
    account: Principal,
    ccache_dir: PathBuf,
    shared: Arc<Mutex<Option<SharedAcceptor>>>,
}

/// The long-lived acceptor credential of [`HostCredentials::shared_acceptor`].
#[derive(Debug)]
struct SharedAcceptor {
    cred: Credential,
    cache: Arc<OpCcache>,
    made: Instant,
}

/// How long a shared acceptor credential is used before it is acquired again (its TGT lasts
/// hours; MIT also refreshes it from the client keytab by itself).
pub const SHARED_ACCEPTOR_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

impl HostCredentials {
    /// `keytab` holds the host account's keys (`hv1$`) and its SPNs; `account` is the account's
    /// principal (`hv1$@LAB.EXAMPLE.TEST`); `ccache_dir` is created (mode 0700) if missing.
    pub fn new(
        keytab: impl Into<PathBuf>,
        account: Principal,
        ccache_dir: impl Into<PathBuf>,
    ) -> Result<HostCredentials, KrbError> {
        let keytab = keytab.into();
        let ccache_dir = ccache_dir.into();
        path_str(&keytab)?;
        path_str(&ccache_dir)?;
        make_private_dir(&ccache_dir).map_err(|source| KrbError::CcacheDir {
            dir: ccache_dir.display().to_string(),
            source,
        })?;
        Ok(HostCredentials {
            keytab,
            account,
            ccache_dir,
            shared: Arc::new(Mutex::new(None)),
        })
    }

    /// The host account (`hv1$@REALM`).
    pub fn account(&self) -> &Principal {
        &self.account
    }

    /// The keytab.
    pub fn keytab(&self) -> &Path {
        &self.keytab
    }

    fn store(&self, cc: &OpCcache) -> Result<Vec<(&'static std::ffi::CStr, String)>, KrbError> {
        let kt = format!("FILE:{}", path_str(&self.keytab)?);
        Ok(vec![
            (c"keytab", kt.clone()),
            (c"client_keytab", kt),
            (c"ccache", cc.name()),
        ])
    }

    /// A credential for accepting any SPN in the keytab that can also initiate as the host
    /// (from the client keytab into a fresh private cache). Accepting a forwardable ticket with
    /// it yields the S4U2Proxy evidence credential. Keep the [`OpCcache`] for as long as the
    /// credential or anything derived from it is used.
    pub fn acceptor(&self) -> Result<(Credential, OpCcache), KrbError> {
        let cc = OpCcache::new(&self.ccache_dir);
        let cred = acquire_from(
            None,
            CredUsage::Both,
            &self.store(&cc)?,
            &self.keytab.display().to_string(),
        )?;
        Ok((
            Credential {
                cred,
                kind: CredKind::Host,
                user: None,
            },
            cc,
        ))
    }

    /// Like [`HostCredentials::acceptor`], but one credential (and one cache, holding only the
    /// host's own TGT) shared by all connections and renewed after
    /// [`SHARED_ACCEPTOR_LIFETIME`]. Acquiring a both-ways credential costs a KDC round trip
    /// for the host's TGT (~40 ms here); accepting with a shared one costs nothing extra.
    /// Sharing is safe: S4U2Proxy tickets land in each evidence credential's own memory cache,
    /// and S4U2Self ([`HostCredentials::impersonate`]) always uses a fresh cache.
    pub fn shared_acceptor(&self) -> Result<(Credential, Arc<OpCcache>), KrbError> {
        let mut guard = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = guard.as_ref() {
            if s.made.elapsed() < SHARED_ACCEPTOR_LIFETIME {
                return Ok((s.cred.clone(), s.cache.clone()));
            }
        }
        let (cred, cache) = self.acceptor()?;
        let cache = Arc::new(cache);
        *guard = Some(SharedAcceptor {
            cred: cred.clone(),
            cache: cache.clone(),
            made: Instant::now(),
        });
        Ok((cred, cache))
    }

    /// The host account as the keytab spells it: MIT looks client keytab entries up
    /// case-sensitively, and keytabs made by different tools write `hv1$` or `HV1$` while the
    /// configuration says `HV1$`. The configured spelling when the keytab cannot be read or has
    /// no such entry (acquiring then reports why).
    fn account_in_keytab(&self) -> Principal {
        let wanted = self.account.as_str();
        keytab::read(&self.keytab)
            .ok()
            .and_then(|entries| {
                entries
                    .into_iter()
                    .map(|e| format!("{}@{}", e.name, e.realm))
                    .find(|p| p.eq_ignore_ascii_case(wanted))
            })
            .and_then(|p| Principal::parse(&p, None).ok())
            .unwrap_or_else(|| self.account.clone())
    }

    /// A credential for initiating as the host account itself.
    pub fn initiator(&self) -> Result<(Credential, OpCcache), KrbError> {
        let cc = OpCcache::new(&self.ccache_dir);
        let account = self.account_in_keytab();
        let cred = acquire_from(
            Some(&account),
            CredUsage::Initiate,
            &self.store(&cc)?,
            account.as_str(),
        )?;
        Ok((
            Credential {
                cred,
                kind: CredKind::Host,
                user: None,
            },
            cc,
        ))
    }

    /// S4U2Self: a ticket for `user` to this host, usable as evidence for S4U2Proxy. Works
    /// towards another host only with "use any authentication protocol"
    /// (TRUSTED_TO_AUTH_FOR_DELEGATION) on the host account.
    pub fn impersonate(&self, user: &Principal) -> Result<(Credential, OpCcache), KrbError> {
        let (host, cc) = self.initiator()?;
        let name = user.gss_name()?;
        let cred = host
            .cred
            .impersonate(&name, None, CredUsage::Initiate, None)
            .map_err(|e| KrbError::gss(KrbOp::Impersonate, Some(user.as_str()), &e))?;
        Ok((
            Credential {
                cred,
                kind: CredKind::Impersonated,
                user: Some(user.clone()),
            },
            cc,
        ))
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Options of an initiator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// Forward the user's TGT to the acceptor (GSS_C_DELEG_FLAG): what CredSSP and "logged on
    /// to the source" need. Off by default: the acceptor can then act as the user anywhere.
    pub forward_tgt: bool,
}

impl InitPending {
    /// A context towards `target` (`class/host`, in `realm`) with `cred`, bound to the
    /// channel bindings `cb` (the TLS exporter), mutual authentication required.
    pub fn new(
        cred: &Credential,
        target: &Spn,
        realm: &str,
        cb: Vec<u8>,
        options: InitOptions,
    ) -> Result<InitPending, KrbError> {
        let principal = target.principal(realm);
        let name = Name::new(principal.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
            .map_err(|e| KrbError::gss(KrbOp::Initiate, Some(&principal), &e))?;
        let mut flags = CtxFlags::GSS_C_MUTUAL_FLAG
            | CtxFlags::GSS_C_SEQUENCE_FLAG
            | CtxFlags::GSS_C_REPLAY_FLAG
            | CtxFlags::GSS_C_INTEG_FLAG
            | CtxFlags::GSS_C_CONF_FLAG;
        if options.forward_tgt {
            flags |= CtxFlags::GSS_C_DELEG_FLAG;
        }
        Ok(InitPending {
            ctx: ClientCtx::new(Some(cred.cred.clone()), name, flags, Some(GSS_MECH_KRB5)),
            cb,
            target: principal,
            steps: 0,
            started: Instant::now(),
        })
    }
}

/// An initiator that has not finished.
pub struct InitPending {
    ctx: ClientCtx,
    cb: Vec<u8>,
    target: String,
    steps: usize,
    started: Instant,
}

impl fmt::Debug for InitPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitPending")
            .field("target", &self.target)
            .field("steps", &self.steps)
            .finish()
    }
}

/// The result of one initiator step.
#[derive(Debug)]
pub enum InitStep {
    /// Send the token and feed the answer to the next step.
    Continue(InitPending, Vec<u8>),
    /// Established; send the token if there is one.
    Established(InitEstablished, Option<Vec<u8>>),
}

impl InitPending {
    /// The target principal.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// One step: `input` is `None` for the first call, then the acceptor's token.
    pub fn step(mut self, input: Option<&[u8]>) -> Result<InitStep, KrbError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(KrbError::TooManySteps(MAX_STEPS));
        }
        let out = self
            .ctx
            .step(input, Some(self.cb.as_slice()))
            .map_err(|e| KrbError::gss(KrbOp::Initiate, Some(&self.target), &e))?;
        let token = out.map(|b| b.to_vec());
        if self.ctx.is_complete() {
            let flags = self
                .ctx
                .flags()
                .map_err(|e| KrbError::gss(KrbOp::Inquire, Some(&self.target), &e))?;
            if !flags.contains(CtxFlags::GSS_C_MUTUAL_FLAG) {
                return Err(KrbError::NotMutual);
            }
            Ok(InitStep::Established(
                InitEstablished {
                    ctx: self.ctx,
                    target: self.target,
                    flags,
                    elapsed: self.started.elapsed(),
                },
                token,
            ))
        } else {
            match token {
                Some(t) => Ok(InitStep::Continue(self, t)),
                None => Err(KrbError::TooManySteps(self.steps)),
            }
        }
    }
}

/// An established initiator context: the acceptor proved its identity.
pub struct InitEstablished {
    ctx: ClientCtx,
    target: String,
    flags: CtxFlags,
    elapsed: std::time::Duration,
}

impl fmt::Debug for InitEstablished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitEstablished")
            .field("target", &self.target)
            .field("delegated", &self.delegated())
            .finish()
    }
}

impl InitEstablished {
    /// The target principal.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the TGT was forwarded (the KDC allowed it and the flag was asked for).
    pub fn delegated(&self) -> bool {
        self.flags.contains(CtxFlags::GSS_C_DELEG_FLAG)
    }

    /// How long the context took to set up (ticket requests included).
    pub fn elapsed(&self) -> std::time::Duration {
        self.elapsed
    }

    /// Seals a message for the acceptor.
    pub fn wrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, KrbError> {
        self.ctx
            .wrap(true, msg)
            .map(|b| b.to_vec())
            .map_err(|e| KrbError::gss(KrbOp::Message, None, &e))
    }

    /// Opens a message from the acceptor.
    pub fn unwrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, KrbError> {
        self.ctx
            .unwrap(msg)
            .map(|b| b.to_vec())
            .map_err(|e| KrbError::gss(KrbOp::Message, None, &e))
    }
}

/// `GSS_C_CHANNEL_BOUND_FLAG` (MIT 1.19 and later): the initiator's channel bindings matched the
/// acceptor's. Without it, an accepted context carried no bindings at all.
pub const GSS_C_CHANNEL_BOUND_FLAG: u32 = 0x800;

/// The service principals an acceptor takes tickets for: the host's migration SPNs (short and
/// FQDN) in its realm. A ticket for any other service of the host's account (`HOST/`, `cifs/`,
/// the account name itself) is refused before GSSAPI sees it (see [`ticket`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedServices {
    spns: Vec<Spn>,
    realm: String,
}

impl AcceptedServices {
    /// `spns` in `realm`. An empty list accepts no ticket at all.
    pub fn new(spns: Vec<Spn>, realm: &str) -> AcceptedServices {
        AcceptedServices {
            spns,
            realm: realm.to_uppercase(),
        }
    }

    /// The SPNs.
    pub fn spns(&self) -> &[Spn] {
        &self.spns
    }

    /// The accepted principals (`class/host@REALM`), for messages.
    pub fn principals(&self) -> Vec<String> {
        self.spns.iter().map(|s| s.principal(&self.realm)).collect()
    }

    /// Checks the service of a client's first token.
    pub fn check(&self, token: &[u8]) -> Result<(), KrbError> {
        let service = ticket::ticket_service(token).map_err(KrbError::BadToken)?;
        if self.spns.iter().any(|s| service.is(s, &self.realm)) {
            Ok(())
        } else {
            Err(KrbError::WrongService {
                requested: service.to_string(),
                accepted: self.principals(),
            })
        }
    }
}

impl AcceptPending {
    /// A context accepting with `cred` (from [`HostCredentials::acceptor`]) tickets for
    /// `services` only, bound to the channel bindings `cb`. It completes only when the client
    /// bound its authentication to the same bindings ([`GSS_C_CHANNEL_BOUND_FLAG`]).
    pub fn new(cred: &Credential, cb: Vec<u8>, services: &AcceptedServices) -> AcceptPending {
        AcceptPending {
            ctx: ServerCtx::new(Some(cred.cred.clone())),
            cb,
            services: services.clone(),
            steps: 0,
        }
    }
}

/// An acceptor that has not finished.
pub struct AcceptPending {
    ctx: ServerCtx,
    cb: Vec<u8>,
    services: AcceptedServices,
    steps: usize,
}

impl fmt::Debug for AcceptPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcceptPending")
            .field("steps", &self.steps)
            .finish()
    }
}

/// The result of one acceptor step.
#[derive(Debug)]
pub enum AcceptStep {
    /// Send the token and feed the answer to the next step.
    Continue(AcceptPending, Vec<u8>),
    /// Established; send the token (the AP-REP of mutual authentication) if there is one.
    Established(Accepted, Option<Vec<u8>>),
}

impl AcceptPending {
    /// One step with the initiator's token.
    pub fn step(mut self, input: &[u8]) -> Result<AcceptStep, KrbError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(KrbError::TooManySteps(MAX_STEPS));
        }
        if self.steps == 1 {
            self.services.check(input)?;
        }
        let out = self
            .ctx
            .step(input, Some(self.cb.as_slice()))
            .map_err(|e| KrbError::gss(KrbOp::Accept, None, &e))?;
        let token = out.map(|b| b.to_vec());
        if !self.ctx.is_complete() {
            return match token {
                Some(t) => Ok(AcceptStep::Continue(self, t)),
                None => Err(KrbError::TooManySteps(self.steps)),
            };
        }
        let flags = self
            .ctx
            .flags()
            .map_err(|e| KrbError::gss(KrbOp::Inquire, None, &e))?;
        // Mismatching bindings fail in the step above (GSS_S_BAD_BINDINGS); missing ones are
        // accepted by MIT and show only as a missing flag.
        if flags.bits() & GSS_C_CHANNEL_BOUND_FLAG == 0 {
            return Err(KrbError::Unbound);
        }
        let name = self
            .ctx
            .source_name()
            .map_err(|e| KrbError::gss(KrbOp::Inquire, None, &e))?;
        let client = principal_of(&name)?;
        // MIT sets GSS_C_DELEG_FLAG for the S4U2Proxy evidence credential too; what tells the
        // two apart is the impersonator, which only the evidence credential has.
        let delegated = self.ctx.take_delegated_cred().map(|cred| {
            let kind = match cred.proxy() {
                Ok(Some(_)) => CredKind::Evidence,
                _ => CredKind::ForwardedTgt,
            };
            Credential {
                cred,
                kind,
                user: Some(client.clone()),
            }
        });
        let tgt_forwarded = delegated
            .as_ref()
            .is_some_and(|d| d.kind == CredKind::ForwardedTgt);
        Ok(AcceptStep::Established(
            Accepted {
                ctx: self.ctx,
                client,
                flags,
                tgt_forwarded,
                delegated,
            },
            token,
        ))
    }
}

/// An accepted context: the client is who the KDC said.
pub struct Accepted {
    ctx: ServerCtx,
    client: Principal,
    flags: CtxFlags,
    tgt_forwarded: bool,
    delegated: Option<Credential>,
}

impl fmt::Debug for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("client", &self.client)
            .field("flags", &self.flags)
            .field("delegated", &self.delegated)
            .finish()
    }
}

impl Accepted {
    /// The authenticated client principal.
    pub fn client(&self) -> &Principal {
        &self.client
    }

    /// Whether the client forwarded its TGT (not just left its ticket as evidence).
    pub fn tgt_forwarded(&self) -> bool {
        self.tgt_forwarded
    }

    /// The credential to act for the client with, if any: its forwarded TGT, or (accepted
    /// with a both-ways credential and a forwardable ticket) the S4U2Proxy evidence. `None`
    /// with a both-ways credential means the client's ticket was not forwardable — the account
    /// is "sensitive and cannot be delegated" (or the client asked for a non-forwardable one).
    pub fn delegated(&self) -> Option<&Credential> {
        self.delegated.as_ref()
    }

    /// Takes the delegated credential out.
    pub fn take_delegated(&mut self) -> Option<Credential> {
        self.delegated.take()
    }

    /// Seals a message for the initiator.
    pub fn wrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, KrbError> {
        self.ctx
            .wrap(true, msg)
            .map(|b| b.to_vec())
            .map_err(|e| KrbError::gss(KrbOp::Message, None, &e))
    }

    /// Opens a message from the initiator.
    pub fn unwrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, KrbError> {
        self.ctx
            .unwrap(msg)
            .map(|b| b.to_vec())
            .map_err(|e| KrbError::gss(KrbOp::Message, None, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_parse_with_and_without_realm() {
        let p = Principal::parse("alice@lab.example.test", None).unwrap();
        assert_eq!(p.as_str(), "alice@LAB.EXAMPLE.TEST");
        assert_eq!(p.name(), "alice");
        assert_eq!(p.realm(), "LAB.EXAMPLE.TEST");
        let q = Principal::parse("Alice", Some("LAB.EXAMPLE.TEST")).unwrap();
        assert!(p.same_as(&q));
        assert!(Principal::parse("alice", None).is_err());
        assert!(Principal::parse("@REALM", None).is_err());
        assert!(Principal::parse("a\nb@R", None).is_err());
        let spn = Principal::parse(
            "Microsoft Virtual System Migration Service/hv2.lab.example.test@LAB.EXAMPLE.TEST",
            None,
        )
        .unwrap();
        assert_eq!(
            spn.name(),
            "Microsoft Virtual System Migration Service/hv2.lab.example.test"
        );
    }

    #[test]
    fn a_missing_ccache_is_a_gss_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.ccache");
        let e = UserCredential::from_ccache(missing.to_str().unwrap()).unwrap_err();
        assert!(e.status().is_some(), "{e}");
        assert_eq!(e.op(), Some(KrbOp::AcquireCredentials));
    }

    #[test]
    fn op_caches_are_unique_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = OpCcache::new(dir.path());
        let b = OpCcache::new(dir.path());
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path(), b"x").unwrap();
        let p = a.path().to_owned();
        drop(a);
        assert!(!p.exists());
    }
}
