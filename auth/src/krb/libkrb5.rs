//! The few MIT libkrb5 calls GSSAPI does not offer, through a small FFI: the configuration as the
//! library itself reads it (`KRB5_CONFIG`, `include`/`includedir`, defaults), the default realm
//! and keytab name, the password change protocol (kpasswd, RFC 3244) and key derivation.
//!
//! The process links libkrb5 already (GSSAPI's krb5 mechanism is built on it), so these are the
//! same code and the same configuration that `kinit` and GSSAPI use: what vmgate reads here is
//! what the rest of the process will do.
//!
//! Each call makes its own library context (`krb5_init_context` reads the configuration files
//! afresh, as a new `kinit` would) and frees it; a context is never shared between threads.
//! Every value handed to the library outlives the call; every value the library returns is
//! copied into Rust memory and released with the library's own free function.

use std::ffi::{CStr, CString, c_char, c_int, c_long, c_uint, c_void};
use std::ptr;

use zeroize::Zeroizing;

use crate::secret::Secret;

/// `krb5_error_code`.
type Krb5ErrorCode = i32;
/// `krb5_context` (opaque).
type Krb5Context = *mut c_void;
/// `krb5_principal` (opaque for us).
type Krb5Principal = *mut c_void;
/// `krb5_keytab` (opaque).
type Krb5Keytab = *mut c_void;
/// `profile_t` (opaque).
type Profile = *mut c_void;
/// `krb5_get_init_creds_opt *` (opaque; allocated by the library).
type InitCredsOpt = *mut c_void;

/// `krb5_data`.
#[repr(C)]
struct Krb5Data {
    magic: i32,
    length: c_uint,
    data: *mut c_char,
}

impl Krb5Data {
    const fn empty() -> Krb5Data {
        Krb5Data {
            magic: 0,
            length: 0,
            data: ptr::null_mut(),
        }
    }

    /// A view of `bytes` for the library to read (it must not write through it).
    fn borrowed(bytes: &[u8]) -> Option<Krb5Data> {
        Some(Krb5Data {
            magic: 0,
            length: c_uint::try_from(bytes.len()).ok()?,
            data: bytes.as_ptr().cast_mut().cast::<c_char>(),
        })
    }

    /// A copy of the bytes the library wrote.
    fn to_vec(&self) -> Vec<u8> {
        if self.data.is_null() || self.length == 0 {
            return Vec::new();
        }
        let Ok(len) = usize::try_from(self.length) else {
            return Vec::new();
        };
        // SAFETY: the library filled this krb5_data: `data` points at `length` bytes it
        // allocated, which stay valid until krb5_free_data_contents, called after this copy.
        unsafe { std::slice::from_raw_parts(self.data.cast::<u8>(), len) }.to_vec()
    }
}

/// `krb5_keyblock`.
#[repr(C)]
struct Krb5Keyblock {
    magic: i32,
    enctype: i32,
    length: c_uint,
    contents: *mut u8,
}

/// `krb5_ticket_times`.
#[repr(C)]
struct Krb5TicketTimes {
    authtime: i32,
    starttime: i32,
    endtime: i32,
    renew_till: i32,
}

/// `krb5_creds`.
#[repr(C)]
struct Krb5Creds {
    magic: i32,
    client: Krb5Principal,
    server: Krb5Principal,
    keyblock: Krb5Keyblock,
    times: Krb5TicketTimes,
    is_skey: c_uint,
    ticket_flags: i32,
    addresses: *mut *mut c_void,
    ticket: Krb5Data,
    second_ticket: Krb5Data,
    authdata: *mut *mut c_void,
}

impl Krb5Creds {
    const fn zeroed() -> Krb5Creds {
        Krb5Creds {
            magic: 0,
            client: ptr::null_mut(),
            server: ptr::null_mut(),
            keyblock: Krb5Keyblock {
                magic: 0,
                enctype: 0,
                length: 0,
                contents: ptr::null_mut(),
            },
            times: Krb5TicketTimes {
                authtime: 0,
                starttime: 0,
                endtime: 0,
                renew_till: 0,
            },
            is_skey: 0,
            ticket_flags: 0,
            addresses: ptr::null_mut(),
            ticket: Krb5Data::empty(),
            second_ticket: Krb5Data::empty(),
            authdata: ptr::null_mut(),
        }
    }
}

#[link(name = "krb5")]
unsafe extern "C" {
    fn krb5_init_context(context: *mut Krb5Context) -> Krb5ErrorCode;
    fn krb5_free_context(context: Krb5Context);
    fn krb5_get_error_message(context: Krb5Context, code: Krb5ErrorCode) -> *const c_char;
    fn krb5_free_error_message(context: Krb5Context, msg: *const c_char);
    fn krb5_get_default_realm(context: Krb5Context, realm: *mut *mut c_char) -> Krb5ErrorCode;
    fn krb5_free_default_realm(context: Krb5Context, realm: *mut c_char);
    fn krb5_get_profile(context: Krb5Context, profile: *mut Profile) -> Krb5ErrorCode;
    fn profile_get_values(
        profile: Profile,
        names: *const *const c_char,
        values: *mut *mut *mut c_char,
    ) -> c_long;
    fn profile_free_list(list: *mut *mut c_char);
    fn profile_get_boolean(
        profile: Profile,
        name: *const c_char,
        subname: *const c_char,
        subsubname: *const c_char,
        default: c_int,
        value: *mut c_int,
    ) -> c_long;
    fn profile_release(profile: Profile);
    fn krb5_kt_default_name(context: Krb5Context, name: *mut c_char, size: c_int) -> Krb5ErrorCode;
    fn krb5_parse_name(
        context: Krb5Context,
        name: *const c_char,
        principal: *mut Krb5Principal,
    ) -> Krb5ErrorCode;
    fn krb5_free_principal(context: Krb5Context, principal: Krb5Principal);
    fn krb5_kt_resolve(
        context: Krb5Context,
        name: *const c_char,
        keytab: *mut Krb5Keytab,
    ) -> Krb5ErrorCode;
    fn krb5_kt_close(context: Krb5Context, keytab: Krb5Keytab) -> Krb5ErrorCode;
    fn krb5_get_init_creds_opt_alloc(context: Krb5Context, opt: *mut InitCredsOpt)
    -> Krb5ErrorCode;
    fn krb5_get_init_creds_opt_free(context: Krb5Context, opt: InitCredsOpt);
    fn krb5_get_init_creds_opt_set_etype_list(opt: InitCredsOpt, list: *mut i32, len: c_int);
    fn krb5_get_init_creds_opt_set_forwardable(opt: InitCredsOpt, forwardable: c_int);
    fn krb5_get_init_creds_opt_set_proxiable(opt: InitCredsOpt, proxiable: c_int);
    fn krb5_get_init_creds_opt_set_renew_life(opt: InitCredsOpt, life: i32);
    fn krb5_get_init_creds_opt_set_tkt_life(opt: InitCredsOpt, life: i32);
    fn krb5_get_init_creds_keytab(
        context: Krb5Context,
        creds: *mut Krb5Creds,
        client: Krb5Principal,
        keytab: Krb5Keytab,
        start_time: i32,
        service: *const c_char,
        opt: InitCredsOpt,
    ) -> Krb5ErrorCode;
    fn krb5_free_cred_contents(context: Krb5Context, creds: *mut Krb5Creds);
    fn krb5_change_password(
        context: Krb5Context,
        creds: *mut Krb5Creds,
        newpw: *const c_char,
        result_code: *mut c_int,
        result_code_string: *mut Krb5Data,
        result_string: *mut Krb5Data,
    ) -> Krb5ErrorCode;
    fn krb5_free_data_contents(context: Krb5Context, data: *mut Krb5Data);
    fn krb5_get_etype_info(
        context: Krb5Context,
        principal: Krb5Principal,
        opt: InitCredsOpt,
        enctype: *mut i32,
        salt: *mut Krb5Data,
        s2kparams: *mut Krb5Data,
    ) -> Krb5ErrorCode;
}

#[link(name = "k5crypto")]
unsafe extern "C" {
    fn krb5_c_string_to_key_with_params(
        context: Krb5Context,
        enctype: i32,
        string: *const Krb5Data,
        salt: *const Krb5Data,
        params: *const Krb5Data,
        key: *mut Krb5Keyblock,
    ) -> Krb5ErrorCode;
    fn krb5_free_keyblock_contents(context: Krb5Context, key: *mut Krb5Keyblock);
}

/// What a libkrb5 call was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Krb5Op {
    /// Reading the Kerberos configuration (krb5.conf).
    Configuration,
    /// Looking up the default realm.
    DefaultRealm,
    /// Parsing a principal name.
    ParseName,
    /// Opening a keytab.
    OpenKeytab,
    /// Getting initial tickets with a keytab's key (`kinit -k`).
    InitialTickets,
    /// Asking the KDC for an account's key salt.
    EtypeInfo,
    /// Deriving a key from a password.
    StringToKey,
    /// Changing a password through kpasswd.
    ChangePassword,
}

impl std::fmt::Display for Krb5Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Krb5Op::Configuration => "reading the Kerberos configuration",
            Krb5Op::DefaultRealm => "looking up the default realm",
            Krb5Op::ParseName => "parsing a principal name",
            Krb5Op::OpenKeytab => "opening a keytab",
            Krb5Op::InitialTickets => "getting initial tickets with the keytab's key",
            Krb5Op::EtypeInfo => "asking the KDC for the account's key salt",
            Krb5Op::StringToKey => "deriving a key from the password",
            Krb5Op::ChangePassword => "changing the password (kpasswd)",
        })
    }
}

/// A libkrb5 failure: the operation, the com_err code and the library's message for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Kerberos failed while {op}{}: {message} [krb5 error {code}{}]",
    target.as_ref().map(|t| format!(" (\"{t}\")")).unwrap_or_default(),
    super::error::krb5_code_name(*code).map(|n| format!(" {n}")).unwrap_or_default())]
pub struct Krb5Error {
    /// What was being done.
    pub op: Krb5Op,
    /// The principal, keytab or file involved.
    pub target: Option<String>,
    /// The krb5 (com_err) error code.
    pub code: i32,
    /// The library's message for it.
    pub message: String,
}

/// The kpasswd server's refusal of a password change (RFC 3244 result codes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the password server refused to change the password of {principal}: {} (result {code}){}",
    kpasswd_result_name(*code),
    if text.is_empty() { String::new() } else { format!(": {text}") })]
pub struct KpasswdRefused {
    /// The account.
    pub principal: String,
    /// The result code (1 malformed, 2 hard error, 3 authentication error, 4 soft error: the
    /// password policy, 5 access denied, 6 bad version, 7 initial ticket needed).
    pub code: i32,
    /// The server's text (AD puts the policy's reason here).
    pub text: String,
}

/// The name of a kpasswd result code.
pub fn kpasswd_result_name(code: i32) -> &'static str {
    match code {
        0 => "success",
        1 => "KRB5_KPASSWD_MALFORMED",
        2 => "KRB5_KPASSWD_HARDERROR",
        3 => "KRB5_KPASSWD_AUTHERROR",
        4 => "KRB5_KPASSWD_SOFTERROR (the password policy refused it)",
        5 => "KRB5_KPASSWD_ACCESSDENIED",
        6 => "KRB5_KPASSWD_BAD_VERSION",
        7 => "KRB5_KPASSWD_INITIAL_FLAG_NEEDED",
        _ => "unknown result",
    }
}

/// Errors of a password change.
#[derive(Debug, thiserror::Error)]
pub enum ChangePasswordError {
    /// The library failed (no KDC, the keytab's key does not work, ...).
    #[error(transparent)]
    Krb5(#[from] Krb5Error),
    /// The kpasswd server answered with a refusal.
    #[error(transparent)]
    Refused(#[from] KpasswdRefused),
}

/// A library context (one per call, never shared).
struct Context(Krb5Context);

impl Context {
    fn new(op: Krb5Op) -> Result<Context, Krb5Error> {
        let mut ctx: Krb5Context = ptr::null_mut();
        // SAFETY: `ctx` is a valid place for the new context; krb5_init_context writes it only
        // on success (and may leave it null on failure, which we check).
        let code = unsafe { krb5_init_context(&mut ctx) };
        if code != 0 || ctx.is_null() {
            return Err(Krb5Error {
                op,
                target: None,
                code,
                message: "cannot read the Kerberos configuration (krb5.conf, KRB5_CONFIG)".into(),
            });
        }
        Ok(Context(ctx))
    }

    /// The library's message for `code`, read on this context right after the failure.
    fn error(&self, op: Krb5Op, target: Option<&str>, code: Krb5ErrorCode) -> Krb5Error {
        // SAFETY: the context is valid; krb5_get_error_message returns a string the caller
        // frees with krb5_free_error_message (or null), which we copy before freeing.
        let message = unsafe {
            let msg = krb5_get_error_message(self.0, code);
            if msg.is_null() {
                format!("error {code}")
            } else {
                let text = CStr::from_ptr(msg).to_string_lossy().into_owned();
                krb5_free_error_message(self.0, msg);
                text
            }
        };
        Krb5Error {
            op,
            target: target.map(str::to_owned),
            code,
            message,
        }
    }

    fn principal(&self, name: &str) -> Result<PrincipalHandle<'_>, Krb5Error> {
        let c = cstring(name, Krb5Op::ParseName)?;
        let mut p: Krb5Principal = ptr::null_mut();
        // SAFETY: the context is valid, `c` is a NUL-terminated string alive for the call, and
        // `p` a valid place for the parsed principal, which PrincipalHandle frees once.
        let code = unsafe { krb5_parse_name(self.0, c.as_ptr(), &mut p) };
        if code != 0 {
            return Err(self.error(Krb5Op::ParseName, Some(name), code));
        }
        Ok(PrincipalHandle { ctx: self, p })
    }

    fn keytab(&self, name: &str) -> Result<KeytabHandle<'_>, Krb5Error> {
        let c = cstring(name, Krb5Op::OpenKeytab)?;
        let mut kt: Krb5Keytab = ptr::null_mut();
        // SAFETY: as for krb5_parse_name: valid context, live C string, valid out place; the
        // handle is closed once by KeytabHandle.
        let code = unsafe { krb5_kt_resolve(self.0, c.as_ptr(), &mut kt) };
        if code != 0 {
            return Err(self.error(Krb5Op::OpenKeytab, Some(name), code));
        }
        Ok(KeytabHandle { ctx: self, kt })
    }

    fn init_creds_opt(&self, op: Krb5Op) -> Result<OptHandle<'_>, Krb5Error> {
        let mut opt: InitCredsOpt = ptr::null_mut();
        // SAFETY: valid context and out place; freed once by OptHandle.
        let code = unsafe { krb5_get_init_creds_opt_alloc(self.0, &mut opt) };
        if code != 0 {
            return Err(self.error(op, None, code));
        }
        Ok(OptHandle { ctx: self, opt })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context came from krb5_init_context and every handle borrowing it has
        // been dropped (they borrow `self`); it is freed exactly once.
        unsafe { krb5_free_context(self.0) };
    }
}

struct PrincipalHandle<'a> {
    ctx: &'a Context,
    p: Krb5Principal,
}

impl Drop for PrincipalHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: `p` came from krb5_parse_name on this context and is freed once.
        unsafe { krb5_free_principal(self.ctx.0, self.p) };
    }
}

struct KeytabHandle<'a> {
    ctx: &'a Context,
    kt: Krb5Keytab,
}

impl Drop for KeytabHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: `kt` came from krb5_kt_resolve on this context and is closed once.
        unsafe { krb5_kt_close(self.ctx.0, self.kt) };
    }
}

struct OptHandle<'a> {
    ctx: &'a Context,
    opt: InitCredsOpt,
}

impl Drop for OptHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: `opt` came from krb5_get_init_creds_opt_alloc on this context, freed once.
        unsafe { krb5_get_init_creds_opt_free(self.ctx.0, self.opt) };
    }
}

/// Initial credentials the library filled; their contents are freed on drop.
struct CredsHandle<'a> {
    ctx: &'a Context,
    creds: Krb5Creds,
}

impl Drop for CredsHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: `creds` was filled by krb5_get_init_creds_keytab on this context (or is
        // still all zero, which krb5_free_cred_contents accepts); its contents are freed once.
        unsafe { krb5_free_cred_contents(self.ctx.0, &mut self.creds) };
    }
}

fn cstring(s: &str, op: Krb5Op) -> Result<CString, Krb5Error> {
    CString::new(s).map_err(|_| Krb5Error {
        op,
        target: Some(s.replace('\0', "\\0")),
        code: 0,
        message: "the text contains a NUL byte".into(),
    })
}

/// krb5.conf's `[libdefaults] default_realm` as the library reads it (`KRB5_CONFIG`, includes,
/// and the library's own fallbacks), `None` when no realm is configured.
pub fn default_realm() -> Result<Option<String>, Krb5Error> {
    let ctx = Context::new(Krb5Op::DefaultRealm)?;
    let mut realm: *mut c_char = ptr::null_mut();
    // SAFETY: valid context and out place; a returned string is copied and then freed once
    // with krb5_free_default_realm.
    let code = unsafe { krb5_get_default_realm(ctx.0, &mut realm) };
    if code != 0 || realm.is_null() {
        // KRB5_CONFIG_NODEFREALM and friends: no realm configured.
        return match code {
            0 => Ok(None),
            c if c == super::error::code::CONFIG_NODEFREALM => Ok(None),
            c => Err(ctx.error(Krb5Op::DefaultRealm, None, c)),
        };
    }
    // SAFETY: `realm` is a NUL-terminated string the library allocated; copied, then freed.
    let text = unsafe {
        let t = CStr::from_ptr(realm).to_string_lossy().into_owned();
        krb5_free_default_realm(ctx.0, realm);
        t
    };
    Ok(Some(text).filter(|r| !r.is_empty()))
}

/// The values of a relation in the configuration, e.g. `["realms", "LAB.EXAMPLE.TEST", "kdc"]`
/// (every `kdc =` line of that realm, in order, from every file and include). Empty when the
/// relation is absent.
pub fn profile_values(path: &[&str]) -> Result<Vec<String>, Krb5Error> {
    let ctx = Context::new(Krb5Op::Configuration)?;
    let profile = profile_of(&ctx)?;
    let names: Vec<CString> = path
        .iter()
        .map(|p| cstring(p, Krb5Op::Configuration))
        .collect::<Result<_, _>>()?;
    let mut ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(ptr::null());
    let mut values: *mut *mut c_char = ptr::null_mut();
    // SAFETY: the profile is valid (released below), `ptrs` is a null-terminated array of
    // NUL-terminated strings alive for the call, and `values` a valid out place; a returned
    // list is copied and freed once with profile_free_list.
    let code = unsafe { profile_get_values(profile.0, ptrs.as_ptr(), &mut values) };
    let mut out = Vec::new();
    if code == 0 && !values.is_null() {
        // SAFETY: `values` is a null-terminated array of NUL-terminated strings owned by the
        // library until profile_free_list; each is copied before the list is freed. The walk
        // stops at the terminating null, which the library always writes.
        unsafe {
            let mut i = 0usize;
            loop {
                let v = *values.add(i);
                if v.is_null() {
                    break;
                }
                out.push(CStr::from_ptr(v).to_string_lossy().into_owned());
                i += 1;
            }
            profile_free_list(values);
        }
    }
    // PROF_NO_RELATION / PROF_NO_SECTION: nothing configured there.
    Ok(out)
}

/// A boolean relation (`["libdefaults", "dns_lookup_kdc"]`), `default` when absent.
pub fn profile_bool(section: &str, name: &str, default: bool) -> Result<bool, Krb5Error> {
    let ctx = Context::new(Krb5Op::Configuration)?;
    let profile = profile_of(&ctx)?;
    let s = cstring(section, Krb5Op::Configuration)?;
    let n = cstring(name, Krb5Op::Configuration)?;
    let mut value: c_int = c_int::from(default);
    // SAFETY: valid profile, live C strings, null subsubname (allowed), valid out place.
    let code = unsafe {
        profile_get_boolean(
            profile.0,
            s.as_ptr(),
            n.as_ptr(),
            ptr::null(),
            c_int::from(default),
            &mut value,
        )
    };
    if code != 0 {
        return Ok(default);
    }
    Ok(value != 0)
}

struct ProfileHandle(Profile);

impl Drop for ProfileHandle {
    fn drop(&mut self) {
        // SAFETY: the profile came from krb5_get_profile (a copy the caller owns) and is
        // released once.
        unsafe { profile_release(self.0) };
    }
}

fn profile_of(ctx: &Context) -> Result<ProfileHandle, Krb5Error> {
    let mut profile: Profile = ptr::null_mut();
    // SAFETY: valid context and out place; the returned profile is ours to release.
    let code = unsafe { krb5_get_profile(ctx.0, &mut profile) };
    if code != 0 || profile.is_null() {
        return Err(ctx.error(Krb5Op::Configuration, None, code));
    }
    Ok(ProfileHandle(profile))
}

/// The default keytab's name as the library resolves it (`KRB5_KTNAME`, krb5.conf's
/// `default_keytab_name`, else `FILE:/etc/krb5.keytab`).
pub fn default_keytab_name() -> Result<String, Krb5Error> {
    let ctx = Context::new(Krb5Op::OpenKeytab)?;
    let mut buf = vec![0u8; 4096];
    let size = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
    // SAFETY: `buf` is a writable buffer of `size` bytes; the library writes a NUL-terminated
    // name into it (or fails with KRB5_CONFIG_NOTENUFSPACE).
    let code = unsafe { krb5_kt_default_name(ctx.0, buf.as_mut_ptr().cast::<c_char>(), size) };
    if code != 0 {
        return Err(ctx.error(Krb5Op::OpenKeytab, None, code));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned())
}

/// `kinit -k`: initial tickets for `principal` with its key from `keytab` (a keytab name such
/// as `FILE:/etc/krb5.keytab`), for `service` (`None`: the realm's TGT), kept nowhere. Proves
/// that the keytab holds a key the KDC accepts.
pub fn init_creds_keytab(
    principal: &str,
    keytab: &str,
    service: Option<&str>,
) -> Result<(), Krb5Error> {
    let ctx = Context::new(Krb5Op::InitialTickets)?;
    let creds = get_init_creds(&ctx, principal, keytab, service)?;
    drop(creds);
    Ok(())
}

fn get_init_creds<'a>(
    ctx: &'a Context,
    principal: &str,
    keytab: &str,
    service: Option<&str>,
) -> Result<CredsHandle<'a>, Krb5Error> {
    let client = ctx.principal(principal)?;
    let kt = ctx.keytab(keytab)?;
    let opt = ctx.init_creds_opt(Krb5Op::InitialTickets)?;
    // SAFETY: `opt` is a valid option set from krb5_get_init_creds_opt_alloc.
    unsafe {
        // A short-lived, plain ticket: nothing is cached and nothing is forwarded.
        krb5_get_init_creds_opt_set_tkt_life(opt.opt, 5 * 60);
        krb5_get_init_creds_opt_set_renew_life(opt.opt, 0);
        krb5_get_init_creds_opt_set_forwardable(opt.opt, 0);
        krb5_get_init_creds_opt_set_proxiable(opt.opt, 0);
    }
    let service_c = service
        .map(|s| cstring(s, Krb5Op::InitialTickets))
        .transpose()?;
    let mut creds = CredsHandle {
        ctx,
        creds: Krb5Creds::zeroed(),
    };
    // SAFETY: every handle is valid for the call (they borrow `ctx`); `creds.creds` is a
    // zeroed krb5_creds the library fills, freed by CredsHandle; the service name is a live C
    // string or null (the TGT).
    let code = unsafe {
        krb5_get_init_creds_keytab(
            ctx.0,
            &mut creds.creds,
            client.p,
            kt.kt,
            0,
            service_c.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            opt.opt,
        )
    };
    if code != 0 {
        return Err(ctx.error(Krb5Op::InitialTickets, Some(principal), code));
    }
    Ok(creds)
}

/// Changes `principal`'s password the way `adcli update` and `kpasswd` do: an initial ticket
/// for `kadmin/changepw` with the key in `keytab`, then the RFC 3244 change-password request
/// to the realm's kpasswd server (krb5.conf's `kpasswd_server`/`admin_server`, else DNS
/// `_kpasswd._tcp`).
pub fn change_password_with_keytab(
    principal: &str,
    keytab: &str,
    new_password: &Secret,
) -> Result<(), ChangePasswordError> {
    let ctx = Context::new(Krb5Op::ChangePassword)?;
    let mut creds = get_init_creds(&ctx, principal, keytab, Some("kadmin/changepw"))?;
    if new_password.expose().contains('\0') {
        return Err(Krb5Error {
            op: Krb5Op::ChangePassword,
            target: Some(principal.to_owned()),
            code: 0,
            message: "the new password contains a NUL byte".into(),
        }
        .into());
    }
    // The password as a C string in memory that is zeroed when dropped.
    let mut pw = Zeroizing::new(new_password.expose().as_bytes().to_vec());
    pw.push(0);
    let mut result_code: c_int = 0;
    let mut code_string = Krb5Data::empty();
    let mut result_string = Krb5Data::empty();
    // SAFETY: the context and the credentials are valid (filled above); `pw` is a live
    // NUL-terminated string; the three out places are valid. The two krb5_data the library
    // fills are copied and freed once below.
    let code = unsafe {
        krb5_change_password(
            ctx.0,
            &mut creds.creds,
            pw.as_ptr().cast::<c_char>(),
            &mut result_code,
            &mut code_string,
            &mut result_string,
        )
    };
    let text = String::from_utf8_lossy(&result_string.to_vec())
        .trim()
        .to_owned();
    let code_text = String::from_utf8_lossy(&code_string.to_vec())
        .trim()
        .to_owned();
    // SAFETY: both were filled (or left empty) by krb5_change_password; freed once each.
    unsafe {
        krb5_free_data_contents(ctx.0, &mut code_string);
        krb5_free_data_contents(ctx.0, &mut result_string);
    }
    if code != 0 {
        return Err(ctx
            .error(Krb5Op::ChangePassword, Some(principal), code)
            .into());
    }
    if result_code != 0 {
        return Err(KpasswdRefused {
            principal: principal.to_owned(),
            code: result_code,
            text: if text.is_empty() { code_text } else { text },
        }
        .into());
    }
    Ok(())
}

/// The salt and string-to-key parameters the KDC announces for `principal`'s keys of
/// `enctypes` (its ETYPE-INFO2: AD salts a computer's keys with `REALMhost<name>.<domain>`,
/// not with the principal name, so only the KDC knows).
pub fn etype_info(principal: &str, enctypes: &[i32]) -> Result<(i32, Vec<u8>, Vec<u8>), Krb5Error> {
    let ctx = Context::new(Krb5Op::EtypeInfo)?;
    let client = ctx.principal(principal)?;
    let opt = ctx.init_creds_opt(Krb5Op::EtypeInfo)?;
    let mut list: Vec<i32> = enctypes.to_vec();
    if !list.is_empty() {
        let len = c_int::try_from(list.len()).unwrap_or(0);
        // SAFETY: valid option set; the library copies the list (MIT keeps the pointer until
        // the option set is freed, and `list` outlives `opt`, which is dropped first below).
        unsafe { krb5_get_init_creds_opt_set_etype_list(opt.opt, list.as_mut_ptr(), len) };
    }
    let mut enctype: i32 = 0;
    let mut salt = Krb5Data::empty();
    let mut params = Krb5Data::empty();
    // SAFETY: valid context, principal and option set; valid out places; the two krb5_data
    // are copied and freed once below.
    let code = unsafe {
        krb5_get_etype_info(
            ctx.0,
            client.p,
            opt.opt,
            &mut enctype,
            &mut salt,
            &mut params,
        )
    };
    let out = (enctype, salt.to_vec(), params.to_vec());
    // SAFETY: filled (or left empty) by krb5_get_etype_info; freed once each.
    unsafe {
        krb5_free_data_contents(ctx.0, &mut salt);
        krb5_free_data_contents(ctx.0, &mut params);
    }
    drop(opt);
    drop(list);
    if code != 0 {
        return Err(ctx.error(Krb5Op::EtypeInfo, Some(principal), code));
    }
    Ok(out)
}

/// The key of `enctype` for `password` with `salt` and `params` (empty: the enctype's
/// default), as the KDC derives it.
pub fn string_to_key(
    enctype: i32,
    password: &Secret,
    salt: &[u8],
    params: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Krb5Error> {
    let ctx = Context::new(Krb5Op::StringToKey)?;
    let err = |message: &str| Krb5Error {
        op: Krb5Op::StringToKey,
        target: None,
        code: 0,
        message: message.to_owned(),
    };
    let pw = Krb5Data::borrowed(password.expose().as_bytes()).ok_or_else(|| err("too long"))?;
    let salt_d = Krb5Data::borrowed(salt).ok_or_else(|| err("salt too long"))?;
    let params_d = Krb5Data::borrowed(params).ok_or_else(|| err("parameters too long"))?;
    let mut key = Krb5Keyblock {
        magic: 0,
        enctype: 0,
        length: 0,
        contents: ptr::null_mut(),
    };
    // SAFETY: the three krb5_data point at live Rust slices the library only reads; `key` is
    // a valid keyblock the library fills, copied and freed once below. A null params pointer
    // would mean "default"; an empty one means the same to MIT.
    let code = unsafe {
        krb5_c_string_to_key_with_params(
            ctx.0,
            enctype,
            &pw,
            &salt_d,
            if params.is_empty() {
                ptr::null()
            } else {
                &params_d
            },
            &mut key,
        )
    };
    if code != 0 {
        return Err(ctx.error(Krb5Op::StringToKey, None, code));
    }
    let bytes = if key.contents.is_null() {
        Zeroizing::new(Vec::new())
    } else {
        let len = usize::try_from(key.length).unwrap_or(0);
        // SAFETY: the library set `contents` to `length` bytes of key it allocated; copied
        // before krb5_free_keyblock_contents (which also zeroes them).
        Zeroizing::new(unsafe { std::slice::from_raw_parts(key.contents, len) }.to_vec())
    };
    // SAFETY: filled by krb5_c_string_to_key_with_params on this context; freed once.
    unsafe { krb5_free_keyblock_contents(ctx.0, &mut key) };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs test `name` of this binary again in a child process whose `KRB5_CONFIG` is a file
    /// with `text` (`@INCLUDE@` names a second file that `include` pulls in): libkrb5 reads the
    /// variable in every new context, and changing it in this multi-threaded process would race
    /// with the other tests. Returns true in the child, where the test's assertions run.
    fn in_child_with_config(name: &str, text: &str) -> bool {
        if std::env::var_os("VMGATE_LIBKRB5_TEST_CHILD").is_some() {
            return true;
        }
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("krb5.conf");
        let inc = dir.path().join("included.conf");
        std::fs::write(
            &inc,
            "[realms]\n EXAMPLE.ORG = {\n  kdc = kdc2.example.org:88\n }\n",
        )
        .unwrap();
        std::fs::write(&main, text.replace("@INCLUDE@", &inc.display().to_string())).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("KRB5_CONFIG", &main)
            .env("VMGATE_LIBKRB5_TEST_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        false
    }

    #[test]
    fn reads_the_configuration_the_way_libkrb5_does() {
        if in_child_with_config(
            "krb::libkrb5::tests::reads_the_configuration_the_way_libkrb5_does",
            "include @INCLUDE@\n[libdefaults]\n default_realm = EXAMPLE.ORG\n dns_lookup_kdc = \
             false\n[realms]\n EXAMPLE.ORG = {\n  kdc = kdc1.example.org\n }\n",
        ) {
            assert_eq!(default_realm().unwrap().as_deref(), Some("EXAMPLE.ORG"));
            let mut kdcs = profile_values(&["realms", "EXAMPLE.ORG", "kdc"]).unwrap();
            kdcs.sort();
            assert_eq!(kdcs, ["kdc1.example.org", "kdc2.example.org:88"]);
            assert!(
                profile_values(&["realms", "OTHER", "kdc"])
                    .unwrap()
                    .is_empty()
            );
            assert!(!profile_bool("libdefaults", "dns_lookup_kdc", true).unwrap());
            assert!(profile_bool("libdefaults", "no_such_thing", true).unwrap());
        }
    }

    #[test]
    fn no_default_realm_is_none() {
        if in_child_with_config(
            "krb::libkrb5::tests::no_default_realm_is_none",
            "[libdefaults]\n dns_lookup_kdc = true\n",
        ) {
            assert_eq!(default_realm().unwrap(), None);
        }
    }

    #[test]
    fn derives_keys_as_the_kdc_does() {
        // MIT refuses the RFC 3962 vectors' low iteration counts; its default (4096) given
        // explicitly is the same as none, the salt matters for AES and not for RC4. (That the
        // keys are the KDC's is proven by the keytab refresh test against the DC.)
        let pw = Secret::new("password");
        let salt = b"ATHENA.MIT.EDUraeburn";
        let default = string_to_key(17, &pw, salt, &[]).unwrap();
        assert_eq!(default.len(), 16);
        assert_eq!(
            string_to_key(17, &pw, salt, &4096u32.to_be_bytes())
                .unwrap()
                .as_slice(),
            default.as_slice()
        );
        assert_ne!(
            string_to_key(17, &pw, b"other", &[]).unwrap().as_slice(),
            default.as_slice()
        );
        assert_eq!(string_to_key(18, &pw, salt, &[]).unwrap().len(), 32);
        assert_eq!(
            string_to_key(23, &pw, b"x", &[]).unwrap().as_slice(),
            string_to_key(23, &pw, b"y", &[]).unwrap().as_slice()
        );
        // RC4's key is MD4 of the UTF-16LE password (RFC 4757): "password".
        assert_eq!(
            string_to_key(23, &pw, b"", &[]).unwrap().as_slice(),
            [
                0x88, 0x46, 0xf7, 0xea, 0xee, 0x8f, 0xb1, 0x17, 0xad, 0x06, 0xbd, 0xd8, 0x30, 0xb7,
                0x58, 0x6c
            ]
        );
        assert_eq!(
            kpasswd_result_name(4).split(' ').next(),
            Some("KRB5_KPASSWD_SOFTERROR")
        );
    }
}
