//! `vmgate`: the vmgate admin CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmgate_tools::{delegation, spn};

/// Administer vmgate hosts: SPNs, delegation, moves, diagnostics.
#[derive(Debug, Parser)]
#[command(name = "vmgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Service principal names (the operations of Windows setspn).
    Spn(spn::SpnArgs),
    /// Kerberos delegation between hosts: show, configure, check.
    Delegation(delegation::DelegationArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Spn(args) => spn::run(args),
        Command::Delegation(args) => delegation::run(args),
    }
}
