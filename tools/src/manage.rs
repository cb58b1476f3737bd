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
use serde_json::{Value, json};
use vmgate::daemon::local::{ErrorCode, HostChanges, MoveSpec, Request, Response, StorageMoveSpec};

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

/// What a command produced: its exit code.
struct Failure {
    code: u8,
    message: String,
    json: Value,
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
        let mut f = fail(code, e.to_string());
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

fn finish(
    conn: &Connection,
    result: Result<Value, Failure>,
    text: impl Fn(&Value) -> String,
) -> ExitCode {
    match result {
        Ok(v) => {
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let t = text(&v);
                if !t.is_empty() {
                    println!("{}", t.trim_end());
                }
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

/// Turns an answer into its JSON, or the failure it reports.
fn answer(r: Response) -> Result<Value, Failure> {
    match r {
        Response::Error(e) => {
            let code = error_code(e.code);
            let json = serde_json::to_value(&e).unwrap_or_default();
            let mut json = json;
            if let Some(o) = json.as_object_mut() {
                o.insert("exit_code".into(), code.into());
            }
            Err(Failure {
                code,
                message: e.message,
                json,
            })
        }
        other => Ok(serde_json::to_value(&other).unwrap_or_default()),
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

fn call(conn: &Connection, request: &Request) -> Result<Value, Failure> {
    let (_, mut s) = session(conn, None, false)?;
    answer(s.call(request)?)
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(t) => t.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
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
                        |_| String::new(),
                    );
                }
            };
            finish(conn, call(conn, &Request::VmCreate { config: text }), |v| {
                s(v, "message")
            })
        }
        VmCommand::Start { name } => finish(conn, call(conn, &Request::VmStart { name }), |v| {
            s(v, "message")
        }),
        VmCommand::Stop { name } => finish(conn, call(conn, &Request::VmStop { name }), |v| {
            s(v, "message")
        }),
        VmCommand::Pause { name } => finish(conn, call(conn, &Request::VmPause { name }), |v| {
            s(v, "message")
        }),
        VmCommand::Resume { name } => finish(conn, call(conn, &Request::VmResume { name }), |v| {
            s(v, "message")
        }),
        VmCommand::List => finish(conn, call(conn, &Request::VmList), |v| {
            let mut out = format!(
                "{:<20} {:<9} {:>8} {:>5}  {}\n",
                "NAME", "STATE", "MEMORY", "VCPUS", "ORIGIN"
            );
            for vm in v["vms"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<20} {:<9} {:>5} MiB {:>5}  {}\n",
                    s(vm, "name"),
                    s(vm, "state"),
                    s(vm, "memory_mib"),
                    s(vm, "vcpus"),
                    s(vm, "origin")
                ));
            }
            out
        }),
        VmCommand::Show { name } => finish(conn, call(conn, &Request::VmShow { name }), |v| {
            let mut out = format!(
                "Name:      {}\nState:     {}\nMemory:    {} MiB\nvCPUs:     {}\nCPU compat: {}\nOrigin:    {}\n",
                s(v, "name"),
                s(v, "state"),
                s(v, "memory_mib"),
                s(v, "vcpus"),
                s(v, "cpu_compat"),
                s(v, "origin")
            );
            for (i, n) in v["nics"].as_array().into_iter().flatten().enumerate() {
                out.push_str(&format!(
                    "NIC {i}:     {} on switch {}\n",
                    s(n, "mac"),
                    s(n, "switch")
                ));
            }
            let stats = v["disk_stats"].as_array().cloned().unwrap_or_default();
            for (i, d) in v["disks"].as_array().into_iter().flatten().enumerate() {
                out.push_str(&format!(
                    "Disk {i}:    {}\n",
                    d.as_str().unwrap_or_default()
                ));
                if let Some(st) = stats.get(i) {
                    let f = |k: &str| st[k].as_f64().unwrap_or(0.0);
                    out.push_str(&format!(
                        "           {} reads ({:.1} MiB), {} writes ({:.1} MiB), {} flushes, {} errors in {:.0} s; write latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs\n",
                        s(st, "reads"),
                        f("bytes_read") / 1048576.0,
                        s(st, "writes"),
                        f("bytes_written") / 1048576.0,
                        s(st, "flushes"),
                        s(st, "errors"),
                        f("window_ms") / 1000.0,
                        f("write_p50_ns") / 1000.0,
                        f("write_p99_ns") / 1000.0,
                        f("write_max_ns") / 1000.0,
                    ));
                }
            }
            out
        }),
        VmCommand::Check { name } => {
            let r = call(conn, &Request::VmCheck { name }).and_then(|v| {
                if v["passed"] == Value::Bool(true) {
                    Ok(v)
                } else {
                    let details = v["details"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n  ");
                    Err(Failure {
                        code: exit::REFUSED,
                        message: format!("{} failed its checks:\n  {details}", s(&v, "vm")),
                        json: v,
                    })
                }
            });
            finish(conn, r, |v| {
                let lines = v["details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("{lines}\n{}: all checks passed", s(v, "vm"))
            })
        }
        VmCommand::Console { name, follow } => console(conn, &name, follow),
    }
}

fn console(conn: &Connection, name: &str, follow: bool) -> ExitCode {
    let mut sess = match session(conn, None, false) {
        Ok((_, s)) => s,
        Err(f) => return finish(conn, Err(f), |_| String::new()),
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
        let v = match r {
            Ok(v) => v,
            Err(f) => return finish(conn, Err(f), |_| String::new()),
        };
        let text = v["text"].as_str().unwrap_or_default().to_owned();
        let next = v["next_offset"].as_u64().unwrap_or(offset);
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

fn host_text(v: &Value) -> String {
    let c = &v["config"];
    let m = &c["migration"];
    let mut out = format!(
        "Host:              {} ({})\nRealm:             {}\nVersion:           vmgate {} (protocol {}, accepts {} to {})\nListen:            {}\nMigration:         {}\nAuthentication:    {}\nLive moves:        {} at once\nStorage moves:     {} at once\nPerformance:       {}\nBandwidth limit:   {}\nDowntime target:   {} ms\nNetworks:          {}\nSwitches:          {}\nAdmin group:       {}\n",
        s(c, "host_name"),
        s(c, "fqdn"),
        s(c, "realm"),
        s(&v["version"], "daemon"),
        s(&v["version"], "protocol"),
        s(&v["version"], "min_protocol"),
        s(&v["version"], "protocol"),
        c["listen"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        if m["enabled"] == Value::Bool(true) {
            "enabled"
        } else {
            "disabled"
        },
        s(m, "auth"),
        s(m, "max_live_moves"),
        s(m, "max_storage_moves"),
        s(m, "performance"),
        if m["bandwidth_limit"].is_null() {
            "none".to_owned()
        } else {
            s(m, "bandwidth_limit")
        },
        s(m, "downtime_target_ms"),
        if m["any_network"] == Value::Bool(true) {
            "any".to_owned()
        } else {
            m["networks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| format!("{} (priority {})", s(n, "subnet"), s(n, "priority")))
                .collect::<Vec<_>>()
                .join(", ")
        },
        c["switch"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| format!("{} on {}", s(w, "name"), s(w, "interface")))
            .collect::<Vec<_>>()
            .join(", "),
        s(c, "admin_group"),
    );
    for spn in v["spns"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "SPN:               {} ({})\n",
            s(spn, "spn"),
            s(spn, "state")
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
    finish(conn, call(conn, &request), host_text)
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
        {
            let offered: Vec<std::net::SocketAddr> = h
                .migration_addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            if !offered.is_empty() {
                dest.addresses = offered;
            }
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
        Some(vmgate::daemon::local::CcacheBlob::new(
            control::ccache_bytes(&cc)?,
        ))
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
        let v = answer(sess.call(&Request::Compare(spec))?)?;
        let report = v["report"].as_array().cloned().unwrap_or_default();
        if report.is_empty() {
            Ok(v)
        } else {
            let lines = report
                .iter()
                .map(|i| format!("[{}] {}", s(i, "id"), s(i, "message")))
                .collect::<Vec<_>>()
                .join("\n  ");
            Err(Failure {
                code: exit::REFUSED,
                message: format!(
                    "{} cannot move to {}:\n  {lines}",
                    a.vm,
                    s(&v, "destination")
                ),
                json: v,
            })
        }
    })();
    finish(conn, r, |v| {
        format!(
            "{} can move to {}: no incompatibilities",
            s(v, "vm"),
            s(v, "destination")
        )
    })
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
            |_| String::new(),
        );
    }
    let storage = (a.include_storage || !a.disks.is_empty()).then_some((
        a.storage_path.as_deref(),
        a.disks.as_slice(),
        a.keep_source,
    ));
    let r = (|| {
        let (_, mut sess) = session(conn, a.from.as_deref(), a.forward_credentials)?;
        let spec = move_spec(conn, &sess, &a.vm, &a.to, &a.switch_map, storage)?;
        let mut bar = Bar::new(conn.json);
        let resp = sess.call_with(&Request::Move(spec), |p| {
            if let Response::Progress { progress } = p {
                bar.update(progress);
            }
        })?;
        bar.done();
        answer(resp)
    })();
    finish(conn, r, |v| {
        let st = &v["stats"];
        let mib = |k: &str| st[k].as_f64().unwrap_or(0.0) / 1048576.0;
        let shared = st["shared_disks"].as_array().map_or(0, Vec::len);
        let storage = if shared > 0 {
            format!(
                "\n  storage: shared, {shared} image(s) handed over in place (no disk data crossed)"
            )
        } else if st["disk_bytes_sent"].as_u64().unwrap_or(0) > 0 {
            format!(
                "\n  storage: {:.1} MiB of disk data copied ({:.1} MiB of parents reused at the destination)",
                mib("disk_bytes_sent"),
                mib("disk_bytes_reused"),
            )
        } else {
            String::new()
        };
        format!(
            "Moved {} to {} as {} ({}), job {}\n  total time {:.0} ms, downtime {:.1} ms, {:.1} MiB on the wire, {} rounds, {:.0} MiB/s{storage}",
            s(v, "vm"),
            s(v, "destination"),
            s(v, "user"),
            s(v, "method"),
            s(v, "job"),
            st["total_ms"].as_f64().unwrap_or(0.0),
            st["downtime_ms"].as_f64().unwrap_or(0.0),
            st["bytes_on_wire"].as_f64().unwrap_or(0.0) / 1048576.0,
            s(st, "rounds"),
            st["throughput_bytes_s"].as_f64().unwrap_or(0.0) / 1048576.0,
        )
    })
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
    finish(conn, r, storage_moved_text)
}

/// The summary of a storage-only move, for people.
fn storage_moved_text(v: &Value) -> String {
    let mib = |k: &str, o: &Value| o[k].as_f64().unwrap_or(0.0) / 1048576.0;
    let mut out = format!(
        "Moved the storage of {} (job {}): {:.1} MiB copied in {} ms, paused {:.1} ms\n",
        s(v, "vm"),
        s(v, "job"),
        mib("bytes_copied", v),
        s(v, "total_ms"),
        v["paused_us"].as_f64().unwrap_or(0.0) / 1000.0,
    );
    for d in v["disks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  disk {}: {} -> {} ({:.1} MiB, {} dirty round{}, paused {:.1} ms)\n",
            s(d, "disk"),
            s(d, "source"),
            s(d, "destination"),
            mib("bytes_copied", d),
            s(d, "rounds"),
            if d["rounds"] == 1 { "" } else { "s" },
            d["paused_us"].as_f64().unwrap_or(0.0) / 1000.0,
        ));
        for l in d["layers"].as_array().into_iter().flatten() {
            if l[1] == "reuse" {
                out.push_str(&format!(
                    "    reused {} (identical, already there)\n",
                    l[0].as_str().unwrap_or_default()
                ));
            }
        }
        for f in d["old_files"].as_array().into_iter().flatten() {
            if f["deleted"] == Value::Bool(true) {
                out.push_str(&format!("    deleted {}\n", s(f, "path")));
            } else {
                out.push_str(&format!(
                    "    kept {}: {}\n",
                    s(f, "path"),
                    s(f, "kept_because")
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

    fn update(&mut self, p: &Value) {
        if self.json {
            println!("{}", json!({"progress": p}));
            return;
        }
        let phase = s(p, "phase");
        let storage = s(p, "kind") == "storage";
        let line = if phase == "queued" {
            format!(
                "queued: position {} (limit {} {} moves at once), job {}",
                s(p, "position"),
                s(p, "limit"),
                if storage { "storage" } else { "live" },
                s(p, "job")
            )
        } else if storage {
            storage_line(p, &phase)
        } else {
            let sent = p["bytes_sent"].as_f64().unwrap_or(0.0);
            let left = p["bytes_remaining"].as_f64().unwrap_or(0.0);
            // The rest of the memory shrinks round by round; once the source paused the
            // guest, only the handoff is left.
            let pct = match phase.as_str() {
                "switchover" | "handoff" | "completed" => 100.0,
                _ if sent + left > 0.0 => 100.0 * sent / (sent + left),
                _ => 0.0,
            };
            let rate = p["rate_bytes_s"].as_f64().unwrap_or(0.0);
            let eta = if rate > 0.0 { left / rate } else { 0.0 };
            let throttle = match p["throttle_percent"].as_u64() {
                Some(t) if t > 0 => format!("  throttle {t}%"),
                _ => String::new(),
            };
            bar_line(
                &phase,
                pct,
                rate,
                eta,
                &format!("round {}{throttle}", s(p, "round")),
            )
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

/// One progress line of a storage-only move: phase, bar over the bytes to copy, rate, ETA,
/// disk, round.
fn storage_line(p: &Value, phase: &str) -> String {
    let copied = p["bytes_copied"].as_f64().unwrap_or(0.0);
    let total = p["bytes_total"].as_f64().unwrap_or(0.0);
    // Dirty rounds copy beyond the estimate: full only once the VM switched.
    let pct = match phase {
        "switch" | "release" => 100.0,
        _ if total > 0.0 => (100.0 * copied / total).min(99.9),
        _ => 0.0,
    };
    let rate = p["rate_bytes_s"].as_f64().unwrap_or(0.0);
    let eta = if rate > 0.0 {
        (total - copied).max(0.0) / rate
    } else {
        0.0
    };
    bar_line(
        phase,
        pct,
        rate,
        eta,
        &format!(
            "disk {}/{}  round {}",
            s(p, "disk_number"),
            s(p, "disks"),
            s(p, "round")
        ),
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

/// `vmgate jobs ...`
pub fn run_jobs(conn: &Connection, cmd: JobsCommand) -> ExitCode {
    let job_text = |j: &Value| {
        let progress = &j["progress"];
        let detail = if s(j, "state") == "queued" {
            format!("position {}", s(j, "position"))
        } else if !progress.is_null() && s(j, "state") == "running" {
            format!("{} round {}", s(progress, "phase"), s(progress, "round"))
        } else {
            s(j, "outcome")
        };
        format!(
            "{:<5} {:<8} {:<9} {:<16} {:<10} {:<26} {}",
            s(j, "id"),
            s(j, "direction"),
            s(j, "state"),
            s(j, "vm"),
            s(j, "peer"),
            s(j, "user"),
            detail
        )
    };
    match cmd {
        JobsCommand::List => finish(conn, call(conn, &Request::JobsList), |v| {
            let mut out = format!(
                "{:<5} {:<8} {:<9} {:<16} {:<10} {:<26} {}\n",
                "ID", "DIR", "STATE", "VM", "PEER", "USER", "DETAIL"
            );
            for j in v["jobs"].as_array().into_iter().flatten() {
                out.push_str(&job_text(j));
                out.push('\n');
            }
            out
        }),
        JobsCommand::Show { id } => finish(conn, call(conn, &Request::JobShow { id }), |v| {
            serde_json::to_string_pretty(v).unwrap_or_default()
        }),
        JobsCommand::Cancel { id } => finish(conn, call(conn, &Request::JobCancel { id }), |v| {
            format!("cancel requested for job {} ({})", s(v, "id"), s(v, "vm"))
        }),
    }
}
