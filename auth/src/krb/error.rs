//! GSSAPI / Kerberos status codes, the error type of the krb module, and their names.

use std::fmt;

/// A GSSAPI status as the library returned it, with its text captured at once (MIT keeps the
/// detailed Kerberos message per thread, so it must be read on the failing thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GssStatus {
    /// The major status (calling error, routine error and supplementary bits).
    pub major: u32,
    /// The minor status: for the Kerberos mechanism a krb5 error code (com_err).
    pub minor: u32,
    /// `gss_display_status` of both codes.
    pub message: String,
}

/// GSS routine errors: `(major >> 16) & 0xff`.
pub mod routine {
    /// GSS_S_BAD_MECH
    pub const BAD_MECH: u32 = 1;
    /// GSS_S_BAD_NAME
    pub const BAD_NAME: u32 = 2;
    /// GSS_S_BAD_NAMETYPE
    pub const BAD_NAMETYPE: u32 = 3;
    /// GSS_S_BAD_BINDINGS: the channel bindings differ (a relayed authentication).
    pub const BAD_BINDINGS: u32 = 4;
    /// GSS_S_BAD_STATUS
    pub const BAD_STATUS: u32 = 5;
    /// GSS_S_BAD_SIG / GSS_S_BAD_MIC
    pub const BAD_MIC: u32 = 6;
    /// GSS_S_NO_CRED
    pub const NO_CRED: u32 = 7;
    /// GSS_S_NO_CONTEXT
    pub const NO_CONTEXT: u32 = 8;
    /// GSS_S_DEFECTIVE_TOKEN
    pub const DEFECTIVE_TOKEN: u32 = 9;
    /// GSS_S_DEFECTIVE_CREDENTIAL
    pub const DEFECTIVE_CREDENTIAL: u32 = 10;
    /// GSS_S_CREDENTIALS_EXPIRED
    pub const CREDENTIALS_EXPIRED: u32 = 11;
    /// GSS_S_CONTEXT_EXPIRED
    pub const CONTEXT_EXPIRED: u32 = 12;
    /// GSS_S_FAILURE: see the minor code.
    pub const FAILURE: u32 = 13;
    /// GSS_S_UNAVAILABLE
    pub const UNAVAILABLE: u32 = 16;
}

/// Kerberos (MIT com_err) codes as they arrive in the minor status.
pub mod code {
    #![allow(missing_docs)]
    pub const KDC_ERR_C_PRINCIPAL_UNKNOWN: i32 = -1_765_328_378;
    pub const KDC_ERR_S_PRINCIPAL_UNKNOWN: i32 = -1_765_328_377;
    pub const KDC_ERR_PRINCIPAL_NOT_UNIQUE: i32 = -1_765_328_376;
    pub const KDC_ERR_POLICY: i32 = -1_765_328_372;
    pub const KDC_ERR_BADOPTION: i32 = -1_765_328_371;
    pub const KDC_ERR_ETYPE_NOSUPP: i32 = -1_765_328_370;
    pub const KDC_ERR_CLIENT_REVOKED: i32 = -1_765_328_366;
    pub const KDC_ERR_SERVICE_REVOKED: i32 = -1_765_328_365;
    pub const KDC_ERR_TGT_REVOKED: i32 = -1_765_328_364;
    pub const KDC_ERR_KEY_EXP: i32 = -1_765_328_361;
    pub const KDC_ERR_PREAUTH_FAILED: i32 = -1_765_328_360;
    pub const KRB_AP_ERR_BAD_INTEGRITY: i32 = -1_765_328_353;
    pub const KRB_AP_ERR_TKT_EXPIRED: i32 = -1_765_328_352;
    pub const KRB_AP_ERR_TKT_NYV: i32 = -1_765_328_351;
    pub const KRB_AP_ERR_REPEAT: i32 = -1_765_328_350;
    pub const KRB_AP_ERR_NOT_US: i32 = -1_765_328_349;
    pub const KRB_AP_ERR_BADMATCH: i32 = -1_765_328_348;
    pub const KRB_AP_ERR_SKEW: i32 = -1_765_328_347;
    pub const KRB_AP_ERR_MODIFIED: i32 = -1_765_328_343;
    pub const KRB_AP_ERR_BADKEYVER: i32 = -1_765_328_340;
    pub const KRB_AP_ERR_NOKEY: i32 = -1_765_328_339;
    pub const KRB_AP_WRONG_PRINC: i32 = -1_765_328_240;
    pub const CC_NOTFOUND: i32 = -1_765_328_243;
    pub const CC_END: i32 = -1_765_328_242;
    pub const NO_TKT_SUPPLIED: i32 = -1_765_328_241;
    pub const KDCREP_SKEW: i32 = -1_765_328_236;
    pub const REALM_UNKNOWN: i32 = -1_765_328_230;
    pub const KDC_UNREACH: i32 = -1_765_328_228;
    pub const KT_NOTFOUND: i32 = -1_765_328_203;
    pub const FCC_NOFILE: i32 = -1_765_328_189;
    pub const NOCREDS_SUPPLIED: i32 = -1_765_328_181;
    pub const PREAUTH_FAILED: i32 = -1_765_328_174;
    pub const REALM_CANT_RESOLVE: i32 = -1_765_328_164;
    pub const KT_KVNONOTFOUND: i32 = -1_765_328_154;
    pub const CONFIG_NODEFREALM: i32 = -1_765_328_160;
}

impl GssStatus {
    /// Captures a libgssapi error (and its text, on this thread).
    pub fn from_gss(e: &libgssapi::error::Error) -> GssStatus {
        GssStatus {
            major: e.major.bits(),
            minor: e.minor,
            message: e.to_string().trim().to_owned(),
        }
    }

    /// The routine error (`(major >> 16) & 0xff`), 0 if none.
    pub fn routine(&self) -> u32 {
        (self.major >> 16) & 0xff
    }

    /// The minor status as a signed krb5 error code.
    pub fn krb5_code(&self) -> i32 {
        i32::from_ne_bytes(self.minor.to_ne_bytes())
    }

    /// The symbolic name of the minor code when it is one vmgate knows.
    pub fn krb5_name(&self) -> Option<&'static str> {
        krb5_code_name(self.krb5_code())
    }
}

/// The symbolic name of a krb5 error code.
pub fn krb5_code_name(c: i32) -> Option<&'static str> {
    use code::*;
    Some(match c {
        KDC_ERR_C_PRINCIPAL_UNKNOWN => "KDC_ERR_C_PRINCIPAL_UNKNOWN",
        KDC_ERR_S_PRINCIPAL_UNKNOWN => "KDC_ERR_S_PRINCIPAL_UNKNOWN",
        KDC_ERR_PRINCIPAL_NOT_UNIQUE => "KDC_ERR_PRINCIPAL_NOT_UNIQUE",
        KDC_ERR_POLICY => "KDC_ERR_POLICY",
        KDC_ERR_BADOPTION => "KDC_ERR_BADOPTION",
        KDC_ERR_ETYPE_NOSUPP => "KDC_ERR_ETYPE_NOSUPP",
        KDC_ERR_CLIENT_REVOKED => "KDC_ERR_CLIENT_REVOKED",
        KDC_ERR_SERVICE_REVOKED => "KDC_ERR_SERVICE_REVOKED",
        KDC_ERR_TGT_REVOKED => "KDC_ERR_TGT_REVOKED",
        KDC_ERR_KEY_EXP => "KDC_ERR_KEY_EXPIRED",
        KDC_ERR_PREAUTH_FAILED => "KDC_ERR_PREAUTH_FAILED",
        KRB_AP_ERR_BAD_INTEGRITY => "KRB_AP_ERR_BAD_INTEGRITY",
        KRB_AP_ERR_TKT_EXPIRED => "KRB_AP_ERR_TKT_EXPIRED",
        KRB_AP_ERR_TKT_NYV => "KRB_AP_ERR_TKT_NYV",
        KRB_AP_ERR_REPEAT => "KRB_AP_ERR_REPEAT",
        KRB_AP_ERR_NOT_US => "KRB_AP_ERR_NOT_US",
        KRB_AP_ERR_BADMATCH => "KRB_AP_ERR_BADMATCH",
        KRB_AP_ERR_SKEW => "KRB_AP_ERR_SKEW",
        KRB_AP_ERR_MODIFIED => "KRB_AP_ERR_MODIFIED",
        KRB_AP_ERR_BADKEYVER => "KRB_AP_ERR_BADKEYVER",
        KRB_AP_ERR_NOKEY => "KRB_AP_ERR_NOKEY",
        KRB_AP_WRONG_PRINC => "KRB5KRB_AP_WRONG_PRINC",
        CC_NOTFOUND => "KRB5_CC_NOTFOUND",
        CC_END => "KRB5_CC_END",
        NO_TKT_SUPPLIED => "KRB5_NO_TKT_SUPPLIED",
        KDCREP_SKEW => "KRB5_KDCREP_SKEW",
        REALM_UNKNOWN => "KRB5_REALM_UNKNOWN",
        KDC_UNREACH => "KRB5_KDC_UNREACH",
        KT_NOTFOUND => "KRB5_KT_NOTFOUND",
        FCC_NOFILE => "KRB5_FCC_NOFILE",
        NOCREDS_SUPPLIED => "KRB5_NOCREDS_SUPPLIED",
        PREAUTH_FAILED => "KRB5_PREAUTH_FAILED",
        REALM_CANT_RESOLVE => "KRB5_REALM_CANT_RESOLVE",
        KT_KVNONOTFOUND => "KRB5_KT_KVNONOTFOUND",
        CONFIG_NODEFREALM => "KRB5_CONFIG_NODEFREALM",
        _ => return None,
    })
}

impl fmt::Display for GssStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [major 0x{:08x}, minor {}",
            self.message,
            self.major,
            self.krb5_code()
        )?;
        if let Some(name) = self.krb5_name() {
            write!(f, " {name}")?;
        }
        f.write_str("]")
    }
}

/// What the krb module was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KrbOp {
    /// Reading credentials from a keytab or credential cache.
    AcquireCredentials,
    /// S4U2Self: a ticket for a user to ourselves.
    Impersonate,
    /// Initiating a context (getting a service ticket, S4U2Proxy, AP-REQ).
    Initiate,
    /// Accepting a context (decrypting the ticket, checking bindings).
    Accept,
    /// Reading names or flags of a context.
    Inquire,
    /// Wrapping or unwrapping a message.
    Message,
}

impl fmt::Display for KrbOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KrbOp::AcquireCredentials => "acquiring Kerberos credentials",
            KrbOp::Impersonate => "getting a ticket for the user to ourselves (S4U2Self)",
            KrbOp::Initiate => "starting Kerberos authentication",
            KrbOp::Accept => "accepting Kerberos authentication",
            KrbOp::Inquire => "reading the Kerberos context",
            KrbOp::Message => "protecting a message with the Kerberos context",
        })
    }
}

/// Errors of the krb module.
#[derive(Debug, thiserror::Error)]
pub enum KrbError {
    /// A GSSAPI call failed.
    #[error("Kerberos failed while {op}{}: {status}", target.as_ref().map(|t| format!(" (target \"{t}\")")).unwrap_or_default())]
    Gss {
        /// What we were doing.
        op: KrbOp,
        /// The target SPN or principal, when there is one.
        target: Option<String>,
        /// The status GSSAPI returned.
        status: GssStatus,
    },
    /// A path or name contains a NUL byte or is not UTF-8.
    #[error("\"{0}\" cannot be passed to Kerberos (NUL byte or not UTF-8)")]
    BadString(String),
    /// A principal name does not parse.
    #[error("\"{0}\" is not a Kerberos principal name (user@REALM)")]
    BadPrincipal(String),
    /// The context was established without mutual authentication.
    #[error("the peer did not prove its identity (mutual authentication was not performed)")]
    NotMutual,
    /// The client's authentication is not bound to the TLS session it arrived on: it carried
    /// no channel bindings (MIT 1.19 and later accept that and only leave
    /// `GSS_C_CHANNEL_BOUND_FLAG` unset), so it may have been relayed from another connection.
    #[error("the client's Kerberos authentication carried no channel binding to this TLS session")]
    Unbound,
    /// The client presented a ticket for another service than this host's migration SPNs.
    #[error("the client presented a ticket for \"{requested}\", ; this host accepts tickets only for {}", accepted.join(" and "))]
    WrongService {
        /// The service the ticket names (`HOST/hv2.lab.example.test@LAB.EXAMPLE.TEST`).
        requested: String,
        /// The principals accepted here.
        accepted: Vec<String>,
    },
    /// The client's first token is not a Kerberos AP-REQ.
    #[error("the client's first token is not a Kerberos authentication")]
    BadToken(#[source] super::ticket::TicketError),
    /// The peer's token loop did not end.
    #[error("the Kerberos exchange did not finish after {0} round trips")]
    TooManySteps(usize),
    /// A libkrb5 call failed (configuration, initial tickets, kpasswd, key derivation).
    #[error(transparent)]
    Krb5(#[from] super::libkrb5::Krb5Error),
    /// A private credential cache could not be made.
    #[error("could not create a private credential cache in {dir}")]
    CcacheDir {
        /// The folder.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl KrbError {
    /// The GSS status, if the error came from GSSAPI.
    pub fn status(&self) -> Option<&GssStatus> {
        match self {
            KrbError::Gss { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The krb5 (com_err) code behind the error, from GSSAPI's minor status or from libkrb5.
    pub fn krb5_code(&self) -> Option<i32> {
        match self {
            KrbError::Gss { status, .. } => Some(status.krb5_code()),
            KrbError::Krb5(e) => Some(e.code),
            _ => None,
        }
    }

    /// The operation, if the error came from GSSAPI.
    pub fn op(&self) -> Option<KrbOp> {
        match self {
            KrbError::Gss { op, .. } => Some(*op),
            _ => None,
        }
    }

    pub(crate) fn gss(op: KrbOp, target: Option<&str>, e: &libgssapi::error::Error) -> KrbError {
        KrbError::Gss {
            op,
            target: target.map(str::to_owned),
            status: GssStatus::from_gss(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_and_minor_codes_decode() {
        // KDC_ERR_BADOPTION as MIT reports it in the minor status.
        let s = GssStatus {
            major: 13 << 16,
            minor: 2_529_638_925,
            message: "Unspecified GSS failure".into(),
        };
        assert_eq!(s.routine(), routine::FAILURE);
        assert_eq!(s.krb5_code(), code::KDC_ERR_BADOPTION);
        assert_eq!(s.krb5_name(), Some("KDC_ERR_BADOPTION"));
        assert!(s.to_string().contains("KDC_ERR_BADOPTION"));
        // A supplementary bit does not change the routine error.
        let b = GssStatus {
            major: (4 << 16) | 1,
            minor: 0,
            message: String::new(),
        };
        assert_eq!(b.routine(), routine::BAD_BINDINGS);
    }
}
