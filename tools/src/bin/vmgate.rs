//! `vmgate`: the vmgate admin CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmgate_control::logging::{self, LogArgs};
use vmgate_tools::manage::{self, Connection};
use vmgate_tools::{delegation, doctor, spn};

/// Administer vmgate hosts: VMs, live and storage moves, host settings, SPNs, delegation.
///
/// `--host H` picks the daemon: $VMGATE_LAB_DIR/H/vmgated.toml (the lab), or
/// /etc/vmgate/vmgated.toml when it is H's, or H as a DNS name (port 6600). On H's own machine
/// the CLI uses its control socket and hands over your Kerberos ticket for moves ("logged on
/// to the source"); --remote goes through H's gateway with your ticket instead ("from a
/// workstation"). Exit codes: 0 done, 1 refused or failed, 2 usage, 3 not found,
/// 4 unreachable, 5 denied (Kerberos or authorization: the Windows code, cause and fix are
/// printed). Diagnostic logging goes to stderr (warnings by default; -v for more, -q for less,
/// or RUST_LOG).
#[derive(Debug, Parser)]
#[command(name = "vmgate", version, about)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Virtual machines: create, start, stop, list, show, console, check.
    #[command(subcommand)]
    Vm(manage::VmCommand),
    /// The host's migration settings: show, set, enable, disable.
    #[command(subcommand)]
    Host(manage::HostCommand),
    /// Move a running VM live to another host (Move-VM).
    Move(manage::MoveArgs),
    /// Move a running VM's disks to new files on this host; it keeps running
    /// (Move-VMStorage; virsh blockcopy).
    MoveStorage(manage::MoveStorageArgs),
    /// Check whether a VM can move to a host, listing every incompatibility (Compare-VM).
    Compare(manage::CompareArgs),
    /// Moves in progress, queued and ended: list, show, cancel.
    #[command(subcommand)]
    Jobs(manage::JobsCommand),
    /// Service principal names (the operations of Windows setspn).
    Spn(spn::SpnArgs),
    /// Kerberos delegation between hosts: show, configure, check.
    Delegation(delegation::DelegationArgs),
    /// Every prerequisite of a live move S->D, checked; each failure with its code and fix.
    Doctor(doctor::DoctorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("vmgate", tracing::level_filters::LevelFilter::WARN, cli.log);
    match cli.command {
        Command::Vm(c) => manage::run_vm(&cli.conn, c),
        Command::Host(c) => manage::run_host(&cli.conn, c),
        Command::Move(a) => manage::run_move(&cli.conn, &a),
        Command::MoveStorage(a) => manage::run_move_storage(&cli.conn, &a),
        Command::Compare(a) => manage::run_compare(&cli.conn, &a),
        Command::Jobs(c) => manage::run_jobs(&cli.conn, c),
        Command::Spn(args) => spn::run(args),
        Command::Delegation(args) => delegation::run(args),
        Command::Doctor(mut args) => {
            args.json |= cli.conn.json;
            doctor::run(args)
        }
    }
}
