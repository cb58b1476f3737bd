//! `vmgate-vm`: run, snapshot, restore and check a vmgate micro-VM from the command line.
//!
//! ```text
//! vmgate-vm run CONFIG.toml [--console LOG] [--run-for SECS] [--snapshot FILE [--live]] [--check] [--json]
//! vmgate-vm restore FILE [--console LOG] [--run-for SECS] [--snapshot FILE [--live]] [--check] [--json]
//! vmgate-vm check FILE [--json]
//! ```
//!
//! `run` builds the VM, lets it run, then pauses it (a `--live` snapshot copies memory while
//! it runs and pauses it for the last round) and optionally checks it. `restore` rebuilds a
//! VM from a snapshot in this process and lets it continue. `check` verifies a snapshot
//! image and its disks without running anything. After a snapshot the VM is not resumed: the
//! snapshot's disks now belong to whoever restores it.
//!
//! Exit codes: 0 success (all checks passed), 1 a check failed or a vCPU stopped, 2 an
//! error (bad configuration, KVM, files).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vmgate_migrate::vm::check::CheckReport;
use vmgate_migrate::vm::snapshot::{
    RestoreStats, SnapshotImage, SnapshotOptions, SnapshotStats, snapshot,
};
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

#[derive(Parser, Debug)]
#[command(
    name = "vmgate-vm",
    about = "Run, snapshot, restore and check vmgate micro-VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a VM from a TOML configuration and run it.
    Run {
        /// The VM configuration.
        config: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Restore a VM from a snapshot and let it continue.
    Restore {
        /// The snapshot file.
        file: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Check a snapshot image and its disks.
    Check {
        /// The snapshot file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Serial console log (appended).
    #[arg(long)]
    console: Option<PathBuf>,
    /// Seconds to run before pausing (or snapshotting).
    #[arg(long, default_value_t = 1.0)]
    run_for: f64,
    /// Write a snapshot to this file, then stop.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Take the snapshot live (dirty-tracking rounds while the guest runs).
    #[arg(long, requires = "snapshot")]
    live: bool,
    /// Dirty rounds after the first full copy (live snapshots).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Milliseconds between rounds (live snapshots).
    #[arg(long, default_value_t = 0)]
    round_interval_ms: u64,
    /// Run the checkers on the paused VM.
    #[arg(long)]
    check: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Test-only fault switch: drop the dirty page holding this guest-physical address in the
    /// snapshot's last copy.
    #[arg(long, hide = true, value_parser = parse_u64)]
    test_drop_dirty_page: Option<u64>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a number: {e}"))
}

#[derive(Serialize, Debug, Default)]
struct MailboxOut {
    vcpu: u32,
    program: String,
    counter: u64,
    error: u64,
}

#[derive(Serialize, Debug, Default)]
struct Report {
    vm: String,
    start_millis: Option<f64>,
    restore: Option<RestoreStats>,
    snapshot: Option<SnapshotStats>,
    mailbox_before: Vec<MailboxOut>,
    mailbox: Vec<MailboxOut>,
    serial_bytes: u64,
    console_bytes: u64,
    markers: std::collections::BTreeMap<String, u64>,
    stopped: Vec<String>,
    block_errors: Vec<String>,
    checks: Vec<CheckReport>,
    ok: bool,
}

use vmgate_control::error::chain;

fn mailboxes(vm: &Vm) -> Result<Vec<MailboxOut>, String> {
    (0..vm.config().vcpus)
        .map(|i| {
            let m = vm.mailbox(i).map_err(|e| chain(&e))?;
            Ok(MailboxOut {
                vcpu: i,
                program: vm.config().program(i).name().to_string(),
                counter: m.counter,
                error: m.error,
            })
        })
        .collect()
}

fn run_vm(vm: &Vm, args: &RunArgs, report: &mut Report) -> Result<(), String> {
    report.mailbox_before = mailboxes(vm)?;
    vm.resume().map_err(|e| chain(&e))?;
    std::thread::sleep(Duration::from_secs_f64(args.run_for.max(0.0)));
    if let Some(path) = &args.snapshot {
        let opts = SnapshotOptions {
            live: args.live,
            rounds: args.rounds,
            round_interval: Duration::from_millis(args.round_interval_ms),
            sync: true,
            drop_dirty_page: args.test_drop_dirty_page,
        };
        if !args.live {
            let p = vm.pause().map_err(|e| chain(&e))?;
            report.stopped = p
                .stopped
                .iter()
                .map(|(i, r)| format!("vCPU {i}: {r}"))
                .collect();
        }
        let stats = snapshot(vm, path, &opts).map_err(|e| chain(&e))?;
        report.snapshot = Some(stats);
        if args.live {
            // The live snapshot paused the VM; collect stop reasons from the vCPUs.
            let states = vm.vcpu_states().map_err(|e| chain(&e))?;
            for (i, s) in states.iter().enumerate() {
                if let vmgate_migrate::vm::VcpuRunState::Stopped(r) = s {
                    report.stopped.push(format!("vCPU {i}: {r}"));
                }
            }
        }
    } else {
        let p = vm.pause().map_err(|e| chain(&e))?;
        report.stopped = p
            .stopped
            .iter()
            .map(|(i, r)| format!("vCPU {i}: {r}"))
            .collect();
    }
    report.mailbox = mailboxes(vm)?;
    report.serial_bytes = vm.serial_bytes();
    report.block_errors = vm.block_errors();
    if args.check {
        report.checks = vmgate_migrate::vm::check_vm(vm).map_err(|e| chain(&e))?;
    }
    if let Some(console) = &args.console {
        let bytes = std::fs::read(console).unwrap_or_default();
        report.console_bytes = bytes.len() as u64;
        for b in bytes {
            if b.is_ascii_alphanumeric() {
                *report.markers.entry((b as char).to_string()).or_default() += 1;
            }
        }
    }
    Ok(())
}

fn print(report: &Report, json: bool) {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmgate-vm: cannot print the report: {e}"),
        }
        return;
    }
    println!("VM {}", report.vm);
    if let Some(ms) = report.start_millis {
        println!("  started in {ms:.1} ms");
    }
    if let Some(r) = &report.restore {
        println!(
            "  restored {} pages ({} stored) in {:.1} ms (memory {:.1} ms)",
            r.pages, r.present, r.total_millis, r.memory_millis
        );
    }
    if let Some(s) = &report.snapshot {
        println!(
            "  snapshot: {} pages ({} stored), {} rounds, paused {:.1} ms, total {:.1} ms",
            s.pages,
            s.present,
            s.rounds.len(),
            s.paused_millis,
            s.total_millis
        );
        if let Some(g) = s.dropped_page {
            println!("  TEST FAULT: dropped dirty page {g:#x}");
        }
    }
    for (b, a) in report.mailbox_before.iter().zip(&report.mailbox) {
        println!(
            "  vCPU {} {}: counter {} -> {}{}",
            a.vcpu,
            a.program,
            b.counter,
            a.counter,
            if a.error != 0 {
                format!(" (error status {})", a.error)
            } else {
                String::new()
            }
        );
    }
    if !report.markers.is_empty() {
        let m: Vec<String> = report
            .markers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  console markers: {}", m.join(" "));
    }
    for s in &report.stopped {
        println!("  stopped: {s}");
    }
    for e in &report.block_errors {
        println!("  block error: {e}");
    }
    for c in &report.checks {
        println!("  {c}");
    }
    println!("  result: {}", if report.ok { "ok" } else { "FAILED" });
}

fn finish(mut report: Report, json: bool) -> ExitCode {
    report.ok = report.checks.iter().all(|c| c.ok) && report.stopped.is_empty();
    print(&report, json);
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("vmgate-vm: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmgate_control::logging::init(
        "vmgate-vm",
        tracing::level_filters::LevelFilter::WARN,
        vmgate_control::logging::LogArgs::default(),
    );
    match cli.command {
        Command::Run { config, run } => {
            let cfg = match VmConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(&chain(&e)),
            };
            let mut report = Report {
                vm: cfg.name.clone(),
                ..Report::default()
            };
            let t = Instant::now();
            let vm = match Vm::create(
                cfg,
                &VmOptions {
                    console_log: run.console.clone(),
                    ..VmOptions::default()
                },
            ) {
                Ok(vm) => vm,
                Err(e) => return fail(&format!("cannot start the VM: {}", chain(&e))),
            };
            report.start_millis = Some(t.elapsed().as_secs_f64() * 1000.0);
            if let Err(e) = run_vm(&vm, &run, &mut report) {
                return fail(&e);
            }
            finish(report, run.json)
        }
        Command::Restore { file, run } => {
            let image = match SnapshotImage::open(&file) {
                Ok(i) => i,
                Err(e) => {
                    return fail(&format!("cannot restore {}: {}", file.display(), chain(&e)));
                }
            };
            let mut report = Report {
                vm: image.state().config.name.clone(),
                ..Report::default()
            };
            let (vm, stats) = match image.restore(&VmOptions {
                console_log: run.console.clone(),
                ..VmOptions::default()
            }) {
                Ok(x) => x,
                Err(e) => {
                    return fail(&format!("cannot restore {}: {}", file.display(), chain(&e)));
                }
            };
            drop(image);
            report.restore = Some(stats);
            if let Err(e) = run_vm(&vm, &run, &mut report) {
                return fail(&e);
            }
            finish(report, run.json)
        }
        Command::Check { file, json } => {
            let image = match SnapshotImage::open(&file) {
                Ok(i) => i,
                Err(e) => return fail(&format!("cannot check {}: {}", file.display(), chain(&e))),
            };
            let mut report = Report {
                vm: image.state().config.name.clone(),
                ..Report::default()
            };
            match image.check() {
                Ok(c) => report.checks = c,
                Err(e) => return fail(&format!("cannot check {}: {}", file.display(), chain(&e))),
            }
            finish(report, json)
        }
    }
}
