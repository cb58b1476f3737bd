//! Windows-compatible error codes (MS-ERREF names and texts) and the diagnosis that goes with them.
//!
//! Hyper-V reports authentication failures of a move as bare HRESULTs; administrators recognise
//! those codes, so vmgate reports the same code — and then says, in terms of this deployment,
//! what caused it and the exact command that fixes it. Every layer that can fail a move for
//! reasons of identity or authorization ends in a [`Diagnosis`].

use std::fmt;

use serde::{Serialize, Serializer};

/// A Windows error code that vmgate reports, with its MS-ERREF name and text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WinCode {
    /// 0x8009030E: no TGT for the user on the source, delegation not allowed, sensitive user,
    /// or CredSSP without the user's credentials.
    NoCredentials,
    /// 0x8009030D: the keytab lacks the key for the SPN, or stale cached tickets.
    UnknownCredentials,
    /// 0x80090303: the target's SPN is not registered (KDC_ERR_S_PRINCIPAL_UNKNOWN).
    TargetUnknown,
    /// 0x80090322: SPN on the wrong account, duplicate SPN, a ticket the target cannot decrypt.
    WrongPrincipal,
    /// 0x80090324: clock skew beyond the allowed maximum (5 minutes).
    TimeSkew,
    /// 0x80090311: no KDC could be reached.
    NoAuthenticatingAuthority,
    /// 0x8009030C: bad password, disabled or locked account.
    LogonDenied,
    /// 0x80090308: a malformed or unexpected security token.
    InvalidToken,
    /// 0x80090346: the channel bindings did not match (a relayed authentication).
    BadBindings,
    /// 0x8009035E: the computer must be trusted for delegation and the user allowed to be delegated.
    DelegationPolicy,
    /// 0x80070005: authenticated, but not allowed.
    AccessDenied,
    /// 0x8007274D: nothing listens at the address (connection refused).
    ConnectionRefused,
    /// 0x8007274C: the peer did not answer in time.
    TimedOut,
    /// 0x80070032: the destination cannot take this VM or this source (incompatible
    /// processor, switch or memory; a protocol version it does not speak).
    NotSupported,
}

impl WinCode {
    /// Every code, for tables and tests.
    pub const ALL: [WinCode; 14] = [
        WinCode::NoCredentials,
        WinCode::UnknownCredentials,
        WinCode::TargetUnknown,
        WinCode::WrongPrincipal,
        WinCode::TimeSkew,
        WinCode::NoAuthenticatingAuthority,
        WinCode::LogonDenied,
        WinCode::InvalidToken,
        WinCode::BadBindings,
        WinCode::DelegationPolicy,
        WinCode::AccessDenied,
        WinCode::ConnectionRefused,
        WinCode::TimedOut,
        WinCode::NotSupported,
    ];

    /// The HRESULT value, e.g. `0x8009030E`.
    pub const fn hresult(self) -> u32 {
        match self {
            WinCode::NoCredentials => 0x8009_030E,
            WinCode::UnknownCredentials => 0x8009_030D,
            WinCode::TargetUnknown => 0x8009_0303,
            WinCode::WrongPrincipal => 0x8009_0322,
            WinCode::TimeSkew => 0x8009_0324,
            WinCode::NoAuthenticatingAuthority => 0x8009_0311,
            WinCode::LogonDenied => 0x8009_030C,
            WinCode::InvalidToken => 0x8009_0308,
            WinCode::BadBindings => 0x8009_0346,
            WinCode::DelegationPolicy => 0x8009_035E,
            WinCode::AccessDenied => 0x8007_0005,
            WinCode::ConnectionRefused => 0x8007_274D,
            WinCode::TimedOut => 0x8007_274C,
            WinCode::NotSupported => 0x8007_0032,
        }
    }

    /// The symbolic name from MS-ERREF, e.g. `SEC_E_NO_CREDENTIALS`.
    pub const fn name(self) -> &'static str {
        match self {
            WinCode::NoCredentials => "SEC_E_NO_CREDENTIALS",
            WinCode::UnknownCredentials => "SEC_E_UNKNOWN_CREDENTIALS",
            WinCode::TargetUnknown => "SEC_E_TARGET_UNKNOWN",
            WinCode::WrongPrincipal => "SEC_E_WRONG_PRINCIPAL",
            WinCode::TimeSkew => "SEC_E_TIME_SKEW",
            WinCode::NoAuthenticatingAuthority => "SEC_E_NO_AUTHENTICATING_AUTHORITY",
            WinCode::LogonDenied => "SEC_E_LOGON_DENIED",
            WinCode::InvalidToken => "SEC_E_INVALID_TOKEN",
            WinCode::BadBindings => "SEC_E_BAD_BINDINGS",
            WinCode::DelegationPolicy => "SEC_E_DELEGATION_POLICY",
            WinCode::AccessDenied => "E_ACCESSDENIED",
            WinCode::ConnectionRefused => "WSAECONNREFUSED",
            WinCode::TimedOut => "WSAETIMEDOUT",
            WinCode::NotSupported => "ERROR_NOT_SUPPORTED",
        }
    }

    /// The message text Windows prints for the code.
    pub const fn text(self) -> &'static str {
        match self {
            WinCode::NoCredentials => "No credentials are available in the security package.",
            WinCode::UnknownCredentials => {
                "The credentials supplied to the package were not recognized."
            }
            WinCode::TargetUnknown => "The specified target is unknown or unreachable.",
            WinCode::WrongPrincipal => "The target principal name is incorrect.",
            WinCode::TimeSkew => "The clocks on the client and server machines are skewed.",
            WinCode::NoAuthenticatingAuthority => {
                "No authority could be contacted for authentication."
            }
            WinCode::LogonDenied => "The logon attempt failed.",
            WinCode::InvalidToken => "The token supplied to the function is invalid.",
            WinCode::BadBindings => "Client's supplied SSPI channel bindings were incorrect.",
            WinCode::DelegationPolicy => {
                "The requested operation cannot be completed. The computer must be trusted for \
                 delegation and the current user account must be configured to allow delegation."
            }
            WinCode::AccessDenied => "Access is denied.",
            WinCode::ConnectionRefused => {
                "No connection could be made because the target machine actively refused it."
            }
            WinCode::TimedOut => {
                "A connection attempt failed because the connected party did not properly respond \
                 after a period of time."
            }
            WinCode::NotSupported => "The request is not supported.",
        }
    }

    /// The code for an HRESULT value, if vmgate knows it.
    pub fn from_hresult(value: u32) -> Option<WinCode> {
        WinCode::ALL.into_iter().find(|c| c.hresult() == value)
    }

    /// `0x8009030E` (upper-case hex, as Windows prints it).
    pub fn hex(self) -> String {
        format!("0x{:08X}", self.hresult())
    }
}

impl fmt::Display for WinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.hex(), self.name(), self.text())
    }
}

impl Serialize for WinCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.hex())
    }
}

/// A failure explained: the Windows code, the cause in this deployment's terms, the exact fix.
///
/// Displayed as
/// ```text
/// error 0x8009030E (SEC_E_NO_CREDENTIALS): No credentials are available in the security package.
///   cause: hv3 may not delegate alice's credentials to "..."
///   fix:   vmgate delegation add-service hv3 "..."
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// The code Windows would report.
    pub code: WinCode,
    /// One or two sentences naming the accounts, SPNs and hosts involved.
    pub cause: String,
    /// The command (or commands, one per line) that fixes it, when there is one.
    pub fix: Option<String>,
}

impl Diagnosis {
    /// A diagnosis with a cause and no fix (yet).
    pub fn new(code: WinCode, cause: impl Into<String>) -> Self {
        Diagnosis {
            code,
            cause: cause.into(),
            fix: None,
        }
    }

    /// The same diagnosis with a fix.
    #[must_use]
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

fn write_indented(f: &mut fmt::Formatter<'_>, label: &str, text: &str) -> fmt::Result {
    let mut lines = text.lines();
    if let Some(first) = lines.next() {
        write!(f, "\n  {label:<6} {first}")?;
    }
    for line in lines {
        write!(f, "\n         {line}")?;
    }
    Ok(())
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}", self.code)?;
        write_indented(f, "cause:", &self.cause)?;
        if let Some(fix) = &self.fix {
            write_indented(f, "fix:", fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnosis {}

impl Serialize for Diagnosis {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Diagnosis", 5)?;
        s.serialize_field("code", &self.code.hex())?;
        s.serialize_field("name", self.code.name())?;
        s.serialize_field("text", self.code.text())?;
        s.serialize_field("cause", &self.cause)?;
        s.serialize_field("fix", &self.fix)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_print_as_windows_does() {
        for code in WinCode::ALL {
            assert_eq!(WinCode::from_hresult(code.hresult()), Some(code));
        }
        assert_eq!(WinCode::NoCredentials.hex(), "0x8009030E");
        assert_eq!(WinCode::from_hresult(0x1234), None);
        let names: std::collections::HashSet<_> = WinCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), WinCode::ALL.len(), "names are unique");
    }

    #[test]
    fn diagnosis_prints_code_cause_and_fix() {
        let d = Diagnosis::new(
            WinCode::NoCredentials,
            "hv3 may not delegate alice's credentials\nto the target",
        )
        .with_fix("vmgate delegation add-service hv3 X");
        assert_eq!(
            d.to_string(),
            "error 0x8009030E (SEC_E_NO_CREDENTIALS): No credentials are available in the \
             security package.\n  cause: hv3 may not delegate alice's credentials\n         to \
             the target\n  fix:   vmgate delegation add-service hv3 X"
        );
    }
}
