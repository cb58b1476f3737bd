//! Exit codes shared by every vmgate command (documented in the README).

use std::process::ExitCode;

/// Success.
pub const OK: u8 = 0;
/// The operation was refused or a check failed (duplicate SPN, unmet requirement, ...).
pub const REFUSED: u8 = 1;
/// Bad usage or malformed input (unknown flag, malformed SPN).
pub const USAGE: u8 = 2;
/// The named object does not exist (account, SPN, host).
pub const NOT_FOUND: u8 = 3;
/// The directory or a daemon could not be reached, or TLS verification failed.
pub const UNREACHABLE: u8 = 4;
/// Authentication or authorization failed (bad password, insufficient rights).
pub const DENIED: u8 = 5;

/// Converts one of the codes above into an [`ExitCode`].
pub fn code(value: u8) -> ExitCode {
    ExitCode::from(value)
}
