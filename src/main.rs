//! vmgated: the vmgate host daemon. It runs KVM micro-VMs and moves them to other hosts over
//! the authenticated channel. The daemon itself arrives with the daemon issue; today it only
//! states its version.

use std::process::ExitCode;

use clap::Parser;

/// The vmgate host daemon.
#[derive(Debug, Parser)]
#[command(name = "vmgated", version, about)]
struct Args {
    /// The configuration file.
    #[arg(long, default_value = "/etc/vmgate/vmgate.toml")]
    config: std::path::PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "vmgated {}: the daemon is not built yet (config {} not read)",
        env!("CARGO_PKG_VERSION"),
        args.config.display()
    );
    ExitCode::from(2)
}
