//! `vmgate vm|host|move|move-storage|compare|jobs`: the daemon's control API as commands
//! (Hyper-V's `Get-VM`, `Start-VM`, `Set-VMHost`, `Enable-VMMigration`, `Move-VM`,
//! `Move-VMStorage`, `Compare-VM`, and virsh's `list`, `dominfo`, `console`, `blockcopy`,
//! `domjobinfo`, `domjobabort`).
//!
//! Every command prints for people by default and one JSON document with `--json` (`move`
//! and `move-storage` add one JSON line per progress report before it). Exit codes are those of
//! [`crate::exit`]: 0 done, 1 refused or failed (a failed move, an incompatible destination,
//! a failed check), 2 bad usage, 3 not found, 4 unreachable, 5 denied (the Windows code,
//! cause and fix are printed).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use vmgate_control::api::host::{HostChanges, HostInfo};
use vmgate_control::api::jobs::{JobInfo, JobProgress, JobState, QueuedProgress};
use vmgate_control::api::moves::{LivePhase, LiveProgress, MoveFailureKind, MoveSpec, MoveSummary};
use vmgate_control::api::storage::{
    LayerAction, StorageMoveSpec, StorageMoveSummary, StoragePhase, StorageProgress,
};
use vmgate_control::api::vm::{VmDetail, VmSummary};
use vmgate_control::api::{CcacheBlob, ErrorCode, ErrorReply, Request, Response};

use crate::control::{self, ControlError, HostTarget, Session, Transport};
use crate::exit;

/// Options every daemon command takes.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The host whose daemon to talk to (see "vmgate help"; default: this machine).
    #[arg(long, global = true, env = "VMGATE_HOST")]
    pub host: Option<String>,
    /// Use the host's local control socket ("logged on to the host"; root or its local group).
    #[arg(long, global = true, conflicts_with = "remote")]
    pub local: bool,
    /// Go through the host's gateway with your Kerberos ticket ("from a workstation").
    #[arg(long, global = true)]
    pub remote: bool,
    /// The control socket (instead of the host's configured one).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Your credential cache (default: KRB5CCNAME).
    #[arg(long, global = true, value_name = "CCACHE")]
    pub ccache: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    fn transport(&self) -> Transport {
        if self.local {
            Transport::Local
        } else if self.remote {
            Transport::Remote
        } else {
            Transport::Auto
        }
    }
}

/// `vmgate vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from its TOML configuration and start it (New-VM; Start-VM).
    Create {
        /// The VM's configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start a VM that is off.
    Start {
        /// The VM.
        name: String,
    },
    /// Turn a VM off (its definition stays).
    Stop {
        /// The VM.
        name: String,
    },
    /// Pause a running VM (Suspend-VM; virsh suspend).
    Pause {
        /// The VM.
        name: String,
    },
    /// Resume a paused VM (Resume-VM; virsh resume), also one a move left paused in doubt:
    /// refused while another host still has its disks open.
    Resume {
        /// The VM.
        name: String,
    },
    /// The host's VMs (Get-VM; virsh list).
    List,
    /// One VM in detail (virsh dominfo).
    Show {
        /// The VM.
        name: String,
    },
    /// Print the VM's serial console output (virsh console, read-only).
    Console {
        /// The VM.
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Run the VM's self-checks (memory patterns, guest progress, disk sequence).
    Check {
        /// The VM.
        name: String,
    },
}

/// `vmgate host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// The host's settings, versions and SPNs (Get-VMHost).
    Show,
    /// Change migration settings (Set-VMHost; kept across restarts).
    Set(SetArgs),
    /// Allow live moves to and from this host (Enable-VMMigration).
    Enable {
        /// The authentication type.
        #[arg(long, value_parser = ["kerberos", "credssp", "host"])]
        auth: Option<String>,
    },
    /// Refuse live moves (Disable-VMMigration).
    Disable,
    /// This host's keytab: refresh (a new machine password and keys, as `adcli update`).
    #[command(subcommand)]
    Keytab(crate::keytab::KeytabCommand),
}

/// `vmgate host set`
#[derive(Debug, Args)]
pub struct SetArgs {
    /// VirtualMachineMigrationAuthenticationType.
    #[arg(long, value_parser = ["kerberos", "credssp", "host"])]
    auth: Option<String>,
    /// MaximumVirtualMachineMigrations.
    #[arg(long, value_name = "N")]
    max_live_moves: Option<u32>,
    /// MaximumStorageMigrations.
    #[arg(long, value_name = "N")]
    max_storage_moves: Option<u32>,
    /// VirtualMachineMigrationPerformanceOption.
    #[arg(long, value_parser = ["tcpip", "compression", "multichannel"])]
    performance: Option<String>,
    /// A bandwidth cap (`500MiB/s`, `1Gbit/s`) or `off`.
    #[arg(long)]
    bandwidth: Option<String>,
    /// The downtime target, ms.
    #[arg(long, value_name = "MS")]
    downtime_target: Option<u32>,
    /// UseAnyNetworkForMigration.
    #[arg(long, value_name = "BOOL")]
    any_network: Option<bool>,
    /// Migration networks, `CIDR[:PRIORITY]` (replaces the list; repeat for several).
    #[arg(long = "network", value_name = "CIDR[:PRIO]")]
    networks: Vec<String>,
}

/// `vmgate move`
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The VM.
    pub vm: String,
    /// The destination host.
    #[arg(long)]
    pub to: String,
    /// The source host (the same as --host).
    #[arg(long)]
    pub from: Option<String>,
    /// Forward your Kerberos TGT to the source (what CredSSP needs from a remote start).
    #[arg(long)]
    pub forward_credentials: bool,
    /// Connect the VM's NICs on switch A to switch B at the destination (repeatable).
    #[arg(long = "switch-map", value_name = "A=B")]
    pub switch_map: Vec<String>,
    /// Keep the source's disk files after a storage move.
    #[arg(long)]
    pub keep_source: bool,
    /// Move the VM's storage too (shared-nothing).
    #[arg(long, requires = "storage_path")]
    pub include_storage: bool,
    /// Where the destination puts the VM's files.
    #[arg(long, value_name = "P")]
    pub storage_path: Option<PathBuf>,
    /// Move one disk: SRC=DST (repeatable).
    #[arg(
        long = "disk",
        value_name = "SRC=DST",
        conflicts_with = "include_storage"
    )]
    pub disks: Vec<String>,
}

/// `vmgate move-storage`
#[derive(Debug, Args)]
pub struct MoveStorageArgs {
    /// The VM.
    pub vm: String,
    /// Move every disk into this folder, keeping the file names (-DestinationStoragePath).
    #[arg(
        long,
        value_name = "P",
        required_unless_present = "disks",
        conflicts_with = "disks"
    )]
    pub storage_path: Option<PathBuf>,
    /// Move one disk from its current file to a new one: SRC=DST (repeatable; -VHDs).
    #[arg(long = "disk", value_name = "SRC=DST")]
    pub disks: Vec<String>,
    /// Keep the old files.
    #[arg(long)]
    pub keep_source: bool,
    /// Cap the copy while the guest runs (`200MiB/s`; virsh blockcopy --bandwidth).
    #[arg(long, value_name = "RATE")]
    pub bandwidth: Option<String>,
}

/// `vmgate compare`
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The VM.
    pub vm: String,
    /// The destination host.
    #[arg(long)]
    pub to: String,
    /// The source host (the same as --host).
    #[arg(long)]
    pub from: Option<String>,
    /// Switch renames to check with (A=B, repeatable).
    #[arg(long = "switch-map", value_name = "A=B")]
    pub switch_map: Vec<String>,
}

/// `vmgate jobs ...`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Moves running, queued and recently ended (virsh domjobinfo).
    List,
    /// One job.
    Show {
        /// The job id (`j3`).
        id: String,
    },
    /// Cancel a job; the VM keeps running on the source (virsh domjobabort).
    Cancel {
        /// The job id.
        id: String,
    },
}

/// Why a command failed: its exit code, the text for people and the JSON for scripts.
struct Failure {
    code: u8,
    message: String,
    json: serde_json::Value,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    let message = message.into();
    Failure {
        code,
        json: json!({"error": message, "exit_code": code}),
        message,
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Failure {
        let code = e.exit_code();
        let mut f = fail(code, vmgate_control::error::chain(&e));
        if let Some(d) = e.diagnosis() {
            f.json = json!({
                "error": d.to_string(),
                "win_code": d.code.hex(),
                "cause": d.cause,
                "fix": d.fix,
                "exit_code": code,
            });
        }
        f
    }
}

/// The exit code of an error answer.
fn error_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::AccessDenied | ErrorCode::Denied => exit::DENIED,
        ErrorCode::NotFound => exit::NOT_FOUND,
        ErrorCode::Unreachable => exit::UNREACHABLE,
        ErrorCode::BadRequest | ErrorCode::RequestTooLarge => exit::USAGE,
        _ => exit::REFUSED,
    }
}

impl From<ErrorReply> for Failure {
    fn from(e: ErrorReply) -> Failure {
        let code = error_code(e.code);
        let mut json = serde_json::to_value(&e).unwrap_or_default();
        if let Some(o) = json.as_object_mut() {
            o.insert("exit_code".into(), code.into());
        }
        Failure {
            code,
            message: e.message,
            json,
        }
    }
}

/// An answer the request does not call for (a daemon of another version, or a bug).
fn unexpected(r: &Response) -> Failure {
    let tag = serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("result").cloned())
        .unwrap_or_default();
    fail(
        exit::REFUSED,
        format!("the daemon gave an unexpected answer ({tag})"),
    )
}

/// Prints a command's outcome: the answer as JSON with `--json`, else `text(answer)`; a
/// failure as JSON or as `vmgate: message` on stderr. `text` turns an answer it does not expect
/// into a failure.
fn finish(
    conn: &Connection,
    result: Result<Response, Failure>,
    text: impl FnOnce(&Response) -> Result<String, Failure>,
) -> ExitCode {
    let result = result.and_then(|r| text(&r).map(|t| (r, t)));
    match result {
        Ok((r, t)) => {
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else if !t.is_empty() {
                println!("{}", t.trim_end());
            }
            exit::code(exit::OK)
        }
        Err(f) => {
            if conn.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&f.json).unwrap_or_default()
                );
            } else {
                eprintln!("vmgate: {}", f.message);
            }
            exit::code(f.code)
        }
    }
}

/// An answer, or the failure it reports.
fn answer(r: Response) -> Result<Response, Failure> {
    match r {
        Response::Error(e) => Err(Failure::from(e)),
        other => Ok(other),
    }
}

fn session(
    conn: &Connection,
    host: Option<&str>,
    forward: bool,
) -> Result<(HostTarget, Session), Failure> {
    let target = control::resolve(host.or(conn.host.as_deref()), conn.socket.as_deref())?;
    let s = control::open(&target, conn.transport(), conn.ccache.as_deref(), forward)?;
    Ok((target, s))
}

fn call(conn: &Connection, request: &Request) -> Result<Response, Failure> {
    let (_, mut s) = session(conn, None, false)?;
    answer(s.call(request)?)
}

/// The message of a `done` answer.
fn done(r: &Response) -> Result<String, Failure> {
    match r {
        Response::Done { message } => Ok(message.clone()),
        other => Err(unexpected(other)),
    }
}

/// `vmgate vm ...`
pub fn run_vm(conn: &Connection, cmd: VmCommand) -> ExitCode {
    match cmd {
        VmCommand::Create { config } => {
            let text = match std::fs::read_to_string(&config) {
                Ok(t) => t,
                Err(e) => {
                    return finish(
                        conn,
                        Err(fail(
                            exit::USAGE,
                            format!("cannot read {}: {e}", config.display()),
                        )),
                        |_| Ok(String::new()),
                    );
                }
            };
            finish(conn, call(conn, &Request::VmCreate { config: text }), done)
        }
        VmCommand::Start { name } => finish(conn, call(conn, &Request::VmStart { name }), done),
        VmCommand::Stop { name } => finish(conn, call(conn, &Request::VmStop { name }), done),
        VmCommand::Pause { name } => finish(conn, call(conn, &Request::VmPause { name }), done),
        VmCommand::Resume { name } => finish(conn, call(conn, &Request::VmResume { name }), done),
        VmCommand::List => finish(conn, call(conn, &Request::VmList), |r| match r {
            Response::Vms { vms } => Ok(vm_table(vms)),
            other => Err(unexpected(other)),
        }),
        VmCommand::Show { name } => {
            finish(conn, call(conn, &Request::VmShow { name }), |r| match r {
                Response::Vm(v) => Ok(vm_text(v)),
                other => Err(unexpected(other)),
            })
        }
        VmCommand::Check { name } => {
            let r = call(conn, &Request::VmCheck { name }).and_then(|r| match r {
                Response::Checked(c) if !c.passed => {
                    let message =
                        format!("{} failed its checks:\n  {}", c.vm, c.details.join("\n  "));
                    Err(Failure {
                        code: exit::REFUSED,
                        json: serde_json::to_value(Response::Checked(c)).unwrap_or_default(),
                        message,
                    })
                }
                other => Ok(other),
            });
            finish(conn, r, |r| match r {
                Response::Checked(c) => Ok(format!(
                    "{}\n{}: all checks passed",
                    c.details.join("\n"),
                    c.vm
                )),
                other => Err(unexpected(other)),
            })
        }
        VmCommand::Console { name, follow } => console(conn, &name, follow),
    }
}

fn vm_table(vms: &[VmSummary]) -> String {
    let mut out = format!(
        "{:<20} {:<9} {:>8} {:>5}  {}\n",
        "NAME", "STATE", "MEMORY", "VCPUS", "ORIGIN"
    );
    for vm in vms {
        out.push_str(&format!(
            "{:<20} {:<9} {:>5} MiB {:>5}  {}\n",
            vm.name,
            vm.state.as_str(),
            vm.memory_mib,
            vm.vcpus,
            vm.origin
        ));
    }
    out
}

fn vm_text(v: &VmDetail) -> String {
    let s = &v.summary;
    let mut out = format!(
        "Name:      {}\nState:     {}\nMemory:    {} MiB\nvCPUs:     {}\nCPU compat: {}\nOrigin:    {}\n",
        s.name,
        s.state.as_str(),
        s.memory_mib,
        s.vcpus,
        v.cpu_compat,
        s.origin
    );
    for (i, n) in v.nics.iter().enumerate() {
        out.push_str(&format!("NIC {i}:     {} on switch {}\n", n.mac, n.switch));
    }
    let mib = |b: u64| ratio(b, 1 << 20);
    let us = |ns: u64| ratio(ns, 1000);
    for (i, d) in v.disks.iter().enumerate() {
        out.push_str(&format!("Disk {i}:    {d}\n"));
        if let Some(st) = v.disk_stats.get(i) {
            out.push_str(&format!(
                "           {} reads ({:.1} MiB), {} writes ({:.1} MiB), {} flushes, {} errors in {:.0} s; write latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs\n",
                st.reads,
                mib(st.bytes_read),
                st.writes,
                mib(st.bytes_written),
                st.flushes,
                st.errors,
                ratio(st.window_ms, 1000),
                us(st.write_p50_ns),
                us(st.write_p99_ns),
                us(st.write_max_ns),
            ));
        }
    }
    out
}

/// `value / unit` as a float, for figures printed with one decimal.
fn ratio(value: u64, unit: u64) -> f64 {
    // Figures printed for people: the precision of an f64 is plenty.
    #[allow(clippy::cast_precision_loss, reason = "printed with one decimal")]
    let (v, u) = (value as f64, unit as f64);
    v / u
}

fn console(conn: &Connection, name: &str, follow: bool) -> ExitCode {
    let mut sess = match session(conn, None, false) {
        Ok((_, s)) => s,
        Err(f) => return finish(conn, Err(f), |_| Ok(String::new())),
    };
    let mut offset = 0;
    let mut all = String::new();
    loop {
        let r = sess
            .call(&Request::VmConsole {
                name: name.to_owned(),
                offset,
            })
            .map_err(Failure::from)
            .and_then(answer);
        let (text, next) = match r {
            Ok(Response::Console { text, next_offset }) => (text, next_offset),
            Ok(other) => return finish(conn, Err(unexpected(&other)), |_| Ok(String::new())),
            Err(f) => return finish(conn, Err(f), |_| Ok(String::new())),
        };
        if conn.json {
            all.push_str(&text);
        } else {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        if next == offset && !follow {
            break;
        }
        if next == offset {
            std::thread::sleep(Duration::from_millis(500));
        }
        offset = next;
    }
    if conn.json {
        println!(
            "{}",
            json!({"vm": name, "text": all, "next_offset": offset})
        );
    }
    exit::code(exit::OK)
}

fn host_text(h: &HostInfo) -> String {
    let c = &h.config;
    let m = &c.migration;
    let v = &h.version;
    let mut out = format!(
        "Host:              {} ({})\nRealm:             {}\nVersion:           vmgate {} (protocol {}, accepts {} to {})\nListen:            {}\nMigration:         {}\nAuthentication:    {}\nLive moves:        {} at once\nStorage moves:     {} at once\nPerformance:       {}\nBandwidth limit:   {}\nDowntime target:   {} ms\nNetworks:          {}\nSwitches:          {}\nAdmin group:       {}\n",
        c.host_name,
        c.fqdn,
        c.realm,
        v.daemon,
        v.protocol,
        v.min_protocol,
        v.protocol,
        c.listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        if m.enabled { "enabled" } else { "disabled" },
        m.auth.as_str(),
        m.max_live_moves,
        m.max_storage_moves,
        m.performance.as_str(),
        m.bandwidth_limit
            .map_or_else(|| "none".to_owned(), |b| b.to_string()),
        m.downtime_target_ms,
        if m.any_network {
            "any".to_owned()
        } else {
            m.networks
                .iter()
                .map(|n| format!("{} (priority {})", n.subnet, n.priority))
                .collect::<Vec<_>>()
                .join(", ")
        },
        c.switches
            .iter()
            .map(|w| format!("{} on {}", w.name, w.interface))
            .collect::<Vec<_>>()
            .join(", "),
        c.admin_group,
    );
    for spn in &h.spns {
        out.push_str(&format!(
            "SPN:               {} ({})\n",
            spn.spn,
            spn.state.as_str()
        ));
    }
    out
}

/// `vmgate host ...`
pub fn run_host(conn: &Connection, cmd: HostCommand) -> ExitCode {
    let request = match cmd {
        // Not a daemon request: the keytab and the directory, on this machine.
        HostCommand::Keytab(k) => return crate::keytab::run(k, conn.json),
        HostCommand::Show => Request::HostShow,
        HostCommand::Set(a) => Request::HostSet {
            changes: HostChanges {
                auth: a.auth,
                max_live_moves: a.max_live_moves,
                max_storage_moves: a.max_storage_moves,
                performance: a.performance,
                bandwidth_limit: a.bandwidth,
                downtime_target_ms: a.downtime_target,
                any_network: a.any_network,
                networks: (!a.networks.is_empty()).then_some(a.networks),
                ..HostChanges::default()
            },
        },
        HostCommand::Enable { auth } => Request::HostSet {
            changes: HostChanges {
                enabled: Some(true),
                auth,
                ..HostChanges::default()
            },
        },
        HostCommand::Disable => Request::HostSet {
            changes: HostChanges {
                enabled: Some(false),
                ..HostChanges::default()
            },
        },
    };
    finish(conn, call(conn, &request), |r| match r {
        Response::Host(h) => Ok(host_text(h)),
        other => Err(unexpected(other)),
    })
}

/// What a shared-nothing move asks for: a folder, or `SRC=DST` per disk, and keep-source.
type StorageAsk<'a> = (Option<&'a std::path::Path>, &'a [String], bool);

/// The `move`/`compare` request: the destination's offered addresses and name, the caller's
/// ticket on a local session, and what to do with the storage.
fn move_spec(
    conn: &Connection,
    sess: &Session,
    vm: &str,
    to: &str,
    switch_map: &[String],
    storage: Option<StorageAsk<'_>>,
) -> Result<MoveSpec, Failure> {
    let mut dest = control::resolve(Some(to), None)?;
    if dest.socket.is_none() {
        // Not a host of this machine or lab: ask the destination which addresses it offers.
        if let Ok(mut d) = control::open(&dest, Transport::Remote, conn.ccache.as_deref(), false)
            && let Ok(Response::Host(h)) = d.call(&Request::HostShow)
            && !h.migration_addresses.is_empty()
        {
            dest.addresses = h.migration_addresses;
        }
    }
    if dest.addresses.is_empty() {
        return Err(fail(
            exit::NOT_FOUND,
            format!("{to} has no migration address"),
        ));
    }
    let ccache = if sess.is_local() {
        let cc = control::caller_ccache(conn.ccache.as_deref());
        Some(CcacheBlob::new(control::ccache_bytes(&cc)?))
    } else {
        None
    };
    Ok(MoveSpec {
        vm: vm.to_owned(),
        to: dest.addresses.iter().map(ToString::to_string).collect(),
        destination: dest.fqdn.clone(),
        ccache,
        switch_map: switch_map.to_vec(),
        storage_path: storage.and_then(|(p, _, _)| p.map(|p| p.display().to_string())),
        disks: storage.map(|(_, d, _)| d.to_vec()).unwrap_or_default(),
        keep_source: storage.is_some_and(|(_, _, k)| k),
    })
}

/// `vmgate compare`
pub fn run_compare(conn: &Connection, a: &CompareArgs) -> ExitCode {
    let r = (|| {
        let (_, mut sess) = session(conn, a.from.as_deref(), false)?;
        let spec = move_spec(conn, &sess, &a.vm, &a.to, &a.switch_map, None)?;
        match answer(sess.call(&Request::Compare(spec))?)? {
            Response::Compared {
                vm,
                destination,
                report,
            } if !report.is_empty() => {
                let lines = report
                    .iter()
                    .map(|i| format!("[{}] {}", i.id, i.message))
                    .collect::<Vec<_>>()
                    .join("\n  ");
                let message = format!("{vm} cannot move to {destination}:\n  {lines}");
                Err(Failure {
                    code: exit::REFUSED,
                    message,
                    json: serde_json::to_value(Response::Compared {
                        vm,
                        destination,
                        report,
                    })
                    .unwrap_or_default(),
                })
            }
            other => Ok(other),
        }
    })();
    finish(conn, r, |r| match r {
        Response::Compared {
            vm, destination, ..
        } => Ok(format!(
            "{vm} can move to {destination}: no incompatibilities"
        )),
        other => Err(unexpected(other)),
    })
}

/// What to do after a move failed the way `kind` says: the CLI's advice, naming its own
/// commands (the daemon and the engine report what happened, not which command to run).
fn move_advice(kind: MoveFailureKind, vm: &str, source: &str, destination: &str) -> Option<String> {
    match kind {
        MoveFailureKind::InDoubt => Some(format!(
            "hint: {vm} stays paused on {source} until you know where it runs: check {destination} \
             (vmgate --host {destination} vm list; vmgate --host {source} jobs list), then resume \
             it on {source} (vmgate --host {source} vm resume {vm}) only if {destination} does not \
             run it"
        )),
        MoveFailureKind::DisksHeld => Some(format!(
            "hint: {vm} stays paused on {source} while another host holds its disks: stop the \
             copy on {destination} (vmgate --host {destination} vm list; vmgate --host \
             {destination} vm stop {vm}), then resume it on {source} (vmgate --host {source} vm \
             resume {vm})"
        )),
        MoveFailureKind::NotFound => Some(format!(
            "hint: the VMs of {source}: vmgate --host {source} vm list"
        )),
        _ => None,
    }
}

/// `vmgate move`
pub fn run_move(conn: &Connection, a: &MoveArgs) -> ExitCode {
    if a.keep_source && !a.include_storage && a.disks.is_empty() {
        return finish(
            conn,
            Err(fail(
                exit::USAGE,
                "--keep-source applies to moves with their storage (--include-storage or --disk)",
            )),
            |_| Ok(String::new()),
        );
    }
    let storage = (a.include_storage || !a.disks.is_empty()).then_some((
        a.storage_path.as_deref(),
        a.disks.as_slice(),
        a.keep_source,
    ));
    let r = (|| {
        let (source, mut sess) = session(conn, a.from.as_deref(), a.forward_credentials)?;
        let spec = move_spec(conn, &sess, &a.vm, &a.to, &a.switch_map, storage)?;
        let mut bar = Bar::new(conn.json);
        let resp = sess.call_with(&Request::Move(spec), |p| {
            if let Response::Progress { progress } = p {
                bar.update(progress);
            }
        })?;
        bar.done();
        match resp {
            Response::Error(e) => {
                let advice = e
                    .move_failure
                    .and_then(|k| move_advice(k, &a.vm, &source.name, &a.to));
                let mut f = Failure::from(e);
                if let Some(advice) = advice {
                    f.message = format!("{}\n{advice}", f.message);
                }
                Err(f)
            }
            other => Ok(other),
        }
    })();
    finish(conn, r, |r| match r {
        Response::Moved(m) => Ok(moved_text(m)),
        other => Err(unexpected(other)),
    })
}

/// The summary of a live move, for people.
fn moved_text(m: &MoveSummary) -> String {
    let st = &m.stats;
    let mib = |b: u64| ratio(b, 1 << 20);
    let shared = st.shared_disks.len();
    let storage = if shared > 0 {
        format!(
            "\n  storage: shared, {shared} image(s) handed over in place (no disk data crossed)"
        )
    } else if st.disk_bytes_sent > 0 {
        format!(
            "\n  storage: {:.1} MiB of disk data copied ({:.1} MiB of parents reused at the destination)",
            mib(st.disk_bytes_sent),
            mib(st.disk_bytes_reused),
        )
    } else {
        String::new()
    };
    format!(
        "Moved {} to {} as {} ({}), job {}\n  total time {:.0} ms, downtime {:.1} ms, {:.1} MiB on the wire, {} rounds, {:.0} MiB/s{storage}",
        m.vm,
        m.destination,
        m.user,
        m.method.as_str(),
        m.job,
        st.total_ms,
        st.downtime_ms,
        mib(st.bytes_on_wire),
        st.rounds,
        st.throughput_bytes_s / 1_048_576.0,
    )
}

/// `vmgate move-storage`
pub fn run_move_storage(conn: &Connection, a: &MoveStorageArgs) -> ExitCode {
    let r = (|| {
        let disks = a
            .disks
            .iter()
            .map(|d| match d.split_once('=') {
                Some((src, dst)) if !src.is_empty() && !dst.is_empty() => {
                    Ok((src.to_owned(), dst.to_owned()))
                }
                _ => Err(fail(
                    exit::USAGE,
                    format!(
                        "\"{d}\" is not a disk mapping: use --disk SRC=DST (the disk's file now, its new file)"
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = StorageMoveSpec {
            vm: a.vm.clone(),
            storage_path: a.storage_path.as_ref().map(|p| p.display().to_string()),
            disks,
            keep_source: a.keep_source,
            bandwidth: a.bandwidth.clone(),
        };
        let (_, mut sess) = session(conn, None, false)?;
        let mut bar = Bar::new(conn.json);
        let resp = sess.call_with(&Request::MoveStorage(spec), |p| {
            if let Response::Progress { progress } = p {
                bar.update(progress);
            }
        })?;
        bar.done();
        answer(resp)
    })();
    finish(conn, r, |r| match r {
        Response::StorageMoved(s) => Ok(storage_moved_text(s)),
        other => Err(unexpected(other)),
    })
}

/// The summary of a storage-only move, for people.
fn storage_moved_text(v: &StorageMoveSummary) -> String {
    let mib = |b: u64| ratio(b, 1 << 20);
    let ms = |us: u64| ratio(us, 1000);
    let mut out = format!(
        "Moved the storage of {} (job {}): {:.1} MiB copied in {} ms, paused {:.1} ms\n",
        v.vm,
        v.job,
        mib(v.bytes_copied),
        v.total_ms,
        ms(v.paused_us),
    );
    for d in &v.disks {
        out.push_str(&format!(
            "  disk {}: {} -> {} ({:.1} MiB, {} dirty round{}, paused {:.1} ms)\n",
            d.disk,
            d.source,
            d.destination,
            mib(d.bytes_copied),
            d.rounds,
            if d.rounds == 1 { "" } else { "s" },
            ms(d.paused_us),
        ));
        for (path, action) in &d.layers {
            if *action == LayerAction::Reuse {
                out.push_str(&format!("    reused {path} (identical, already there)\n"));
            }
        }
        for f in &d.old_files {
            if f.deleted {
                out.push_str(&format!("    deleted {}\n", f.path));
            } else {
                out.push_str(&format!(
                    "    kept {}: {}\n",
                    f.path,
                    f.kept_because.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    out
}

/// The move's progress: a bar on a terminal, a line per report otherwise, JSON lines with
/// `--json`.
struct Bar {
    json: bool,
    tty: bool,
    drawn: bool,
}

impl Bar {
    fn new(json: bool) -> Bar {
        Bar {
            json,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn update(&mut self, p: &JobProgress) {
        if self.json {
            println!("{}", json!({ "progress": p }));
            return;
        }
        let line = match p {
            JobProgress::Queued(q) => queued_line(q),
            JobProgress::Storage(s) => storage_line(s),
            JobProgress::Live(l) => live_line(l),
        };
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

fn queued_line(q: &QueuedProgress) -> String {
    format!(
        "queued: position {} (limit {} {} moves at once), job {}",
        q.position,
        q.limit,
        if q.kind.is_some() { "storage" } else { "live" },
        q.job
    )
}

/// One progress line of a live move: phase, bar over the memory, rate, ETA, round.
fn live_line(p: &LiveProgress) -> String {
    let sent = ratio(p.bytes_sent, 1);
    let left = ratio(p.bytes_remaining, 1);
    // The rest of the memory shrinks round by round; once the source paused the guest, only
    // the handoff is left.
    let pct = match p.phase {
        LivePhase::Switchover | LivePhase::Handoff | LivePhase::Completed => 100.0,
        _ if sent + left > 0.0 => 100.0 * sent / (sent + left),
        _ => 0.0,
    };
    let rate = p.rate_bytes_s;
    let eta = if rate > 0.0 { left / rate } else { 0.0 };
    let throttle = if p.throttle_percent > 0 {
        format!("  throttle {}%", p.throttle_percent)
    } else {
        String::new()
    };
    bar_line(
        p.phase.as_str(),
        pct,
        rate,
        eta,
        &format!("round {}{throttle}", p.round),
    )
}

/// One progress line of a storage-only move: phase, bar over the bytes to copy, rate, ETA,
/// disk, round.
fn storage_line(p: &StorageProgress) -> String {
    let copied = ratio(p.bytes_copied, 1);
    let total = ratio(p.bytes_total, 1);
    // Dirty rounds copy beyond the estimate: full only once the VM switched.
    let pct = match p.phase {
        StoragePhase::Switch | StoragePhase::Release => 100.0,
        _ if total > 0.0 => (100.0 * copied / total).min(99.9),
        _ => 0.0,
    };
    let rate = ratio(p.rate_bytes_s, 1);
    let eta = if rate > 0.0 {
        (total - copied).max(0.0) / rate
    } else {
        0.0
    };
    bar_line(
        p.phase.as_str(),
        pct,
        rate,
        eta,
        &format!("disk {}/{}  round {}", p.disk_number, p.disks, p.round),
    )
}

/// A progress line: phase, a 30-character bar at `pct`, rate, ETA, then `tail`.
fn bar_line(phase: &str, pct: f64, rate: f64, eta: f64, tail: &str) -> String {
    let filled = (pct / 100.0 * 30.0).round().clamp(0.0, 30.0);
    // filled is in 0..=30.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0..=30"
    )]
    let n = filled as usize;
    format!(
        "{:<10} [{}{}] {:>5.1}%  {:>7.1} MiB/s  ETA {:>4.1} s  {tail}",
        phase,
        "#".repeat(n),
        "-".repeat(30 - n),
        pct,
        rate / 1048576.0,
        eta,
    )
}

/// One line of `jobs list`.
fn job_line(j: &JobInfo) -> String {
    let detail = match (&j.progress, j.state) {
        (_, JobState::Queued) => format!(
            "position {}",
            j.position.map(|p| p.to_string()).unwrap_or_default()
        ),
        (Some(p), JobState::Running) => match p {
            JobProgress::Live(l) => format!("{} round {}", l.phase.as_str(), l.round),
            JobProgress::Storage(s) => format!("{} round {}", s.phase.as_str(), s.round),
            JobProgress::Queued(q) => format!("queued round {}", q.position),
        },
        _ => j.outcome.clone().unwrap_or_default(),
    };
    format!(
        "{:<5} {:<8} {:<9} {:<16} {:<10} {:<26} {}",
        j.id,
        j.direction.as_str(),
        j.state.as_str(),
        j.vm,
        j.peer,
        j.user,
        detail
    )
}

/// `vmgate jobs ...`
pub fn run_jobs(conn: &Connection, cmd: JobsCommand) -> ExitCode {
    match cmd {
        JobsCommand::List => finish(conn, call(conn, &Request::JobsList), |r| match r {
            Response::Jobs { jobs } => {
                let mut out = format!(
                    "{:<5} {:<8} {:<9} {:<16} {:<10} {:<26} {}\n",
                    "ID", "DIR", "STATE", "VM", "PEER", "USER", "DETAIL"
                );
                for j in jobs {
                    out.push_str(&job_line(j));
                    out.push('\n');
                }
                Ok(out)
            }
            other => Err(unexpected(other)),
        }),
        JobsCommand::Show { id } => {
            finish(conn, call(conn, &Request::JobShow { id }), |r| match r {
                Response::Job(j) => Ok(serde_json::to_string_pretty(j).unwrap_or_default()),
                other => Err(unexpected(other)),
            })
        }
        JobsCommand::Cancel { id } => {
            finish(conn, call(conn, &Request::JobCancel { id }), |r| match r {
                Response::Job(j) => Ok(format!("cancel requested for job {} ({})", j.id, j.vm)),
                other => Err(unexpected(other)),
            })
        }
    }
}
