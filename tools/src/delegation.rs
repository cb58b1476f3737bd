//! `vmgate delegation ...`: show, configure and check Kerberos delegation between hosts.

use std::process::ExitCode;

/// `vmgate delegation` arguments.
#[derive(Debug, clap::Args)]
pub struct DelegationArgs {}

/// Runs `vmgate delegation`.
pub fn run(_args: DelegationArgs) -> ExitCode {
    crate::exit::code(crate::exit::USAGE)
}
