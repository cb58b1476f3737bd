//! `vmgate spn ...`: add, delete, list, query and find duplicate SPNs (also behind `setspn`).

use std::process::ExitCode;

/// `vmgate spn` arguments.
#[derive(Debug, clap::Args)]
pub struct SpnArgs {}

/// Runs `vmgate spn`.
pub fn run(_args: SpnArgs) -> ExitCode {
    crate::exit::code(crate::exit::USAGE)
}
