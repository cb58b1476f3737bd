//! vmgate-host: one migration host in one process, for the live migration tests and the
//! benchmark — the engine over the authenticated channel without the daemon around it.
//!
//! ```text
//! vmgate-host receive --listen 127.0.0.12:0 --keytab hv2.keytab --account 'HV2$' \
//!                     --spn "Microsoft Virtual System Migration Service/hv2.lab.example.test" \
//!                     [--allow alice@REALM]... [--allow-group "Hyper-V Administrators" --ldap-url ldap://DC]
//! vmgate-host send    --vm vm.toml --to 127.0.0.12:PORT --spn SPN --ccache alice.ccache \
//!                     [--channels N] [--compression none|lz4|zstd] [--bandwidth-mib N] \
//!                     [--downtime-ms N] [--no-auto-converge] [--converge-timeout-s N]
//! ```
//!
//! Every event is one JSON line on stdout. Commands arrive as lines on stdin:
//! `check` (pause the VMs here, run their memory/disk checks, resume, report), `status`
//! (VMs here, moves in progress, resident memory), `cancel` (send: cancel the move),
//! `quit`. `send` exits when stdin ends after the move: 0 moved, 1 the VM stayed here,
//! 3 in doubt (the VM is paused here), 2 bad arguments or setup.

use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use vmgate::adapter::ChannelDialer;
use vmgate_auth::channel::{ClientSettings, Gateway};
use vmgate_auth::host::server_settings;
use vmgate_auth::krb::AuthFacts;
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::TlsContext;
use vmgate_migrate::engine::{
    CancelToken, Destination, DestinationOptions, FaultAction, FaultPoint, MoveError, MoveOptions,
    Phase, Received, ReceivedEvent, ReceivedVm, send_vm,
};
use vmgate_migrate::protocol::{Compression, ProtocolVersion};
use vmgate_migrate::vm::check::check_vm;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};
use vmgate_testkit::args::use_host_keytab_for_ldap;
use vmgate_testkit::args::{CredentialArgs, HostArgs};

#[derive(Parser, Debug)]
#[command(
    name = "vmgate-host",
    about = "One vmgate migration host in a process (tests, benchmark)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressionArg {
    None,
    Lz4,
    Zstd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "the names say where the fault strikes"
)]
enum FaultArg {
    /// Break every link after Complete, before resuming.
    CutBeforeResume,
    /// Break every link right after resuming, before acknowledging.
    CutAfterResume,
    /// Exit the process right after resuming, before acknowledging.
    ExitAfterResume,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PhaseArg {
    Setup,
    PreCopy,
    Switchover,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Accept moves as a destination host; VMs that arrive keep running here.
    Receive {
        #[command(flatten)]
        host: HostArgs,
        /// Declare a link lost after this many seconds of silence.
        #[arg(long, default_value_t = 15)]
        link_timeout_s: u64,
        /// Serial console of arriving VMs goes to DIR/<name>.console.
        #[arg(long)]
        console_dir: Option<PathBuf>,
        /// The protocol version this destination speaks (to test version refusals).
        #[arg(long, hide = true)]
        protocol_version: Option<u16>,
        /// Fault injection for the handoff tests.
        #[arg(long, hide = true, value_enum)]
        test_fault: Option<FaultArg>,
    },
    /// Create a VM here, run it, and move it live to a destination.
    Send {
        /// The VM's configuration (TOML).
        #[arg(long)]
        vm: PathBuf,
        /// The destination's migration address.
        #[arg(long)]
        to: SocketAddr,
        /// The destination's migration SPN.
        #[arg(long)]
        spn: Spn,
        #[command(flatten)]
        credential: CredentialArgs,
        /// Parallel channels.
        #[arg(long, default_value_t = 1)]
        channels: u16,
        /// Page compression.
        #[arg(long, value_enum, default_value = "none")]
        compression: CompressionArg,
        /// Bandwidth cap in MiB/s.
        #[arg(long)]
        bandwidth_mib: Option<u64>,
        /// Downtime target in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Do not throttle the guest when it dirties faster than the link.
        #[arg(long)]
        no_auto_converge: bool,
        /// Give up pre-copy after this many seconds.
        #[arg(long, default_value_t = 600)]
        converge_timeout_s: u64,
        /// Declare the link lost after this many seconds of silence.
        #[arg(long, default_value_t = 15)]
        link_timeout_s: u64,
        /// Wait this long for the destination to resume the VM.
        #[arg(long, default_value_t = 60)]
        handoff_timeout_s: u64,
        /// Before moving, wait until vCPU 0's guest program completed this many passes.
        #[arg(long, default_value_t = 1)]
        warmup_passes: u64,
        /// Before moving, also wait this long.
        #[arg(long, default_value_t = 0)]
        warmup_ms: u64,
        /// Wait for a `move` line on stdin before moving.
        #[arg(long)]
        wait_for_go: bool,
        /// Cancel the move when it reaches this phase (tests).
        #[arg(long, hide = true, value_enum)]
        cancel_at: Option<PhaseArg>,
        /// Serial console log of the VM.
        #[arg(long)]
        console: Option<PathBuf>,
    },
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    emit(json!({"event": "error", "error": msg.to_string()}));
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmgate_control::logging::init(
        "vmgate-host",
        tracing::level_filters::LevelFilter::WARN,
        vmgate_control::logging::LogArgs::default(),
    );
    match cli.cmd {
        c @ Cmd::Receive { .. } => receive(c),
        c @ Cmd::Send { .. } => send(c),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn check_json(vm: &Vm) -> Value {
    let was_running = vm.running();
    if was_running {
        if let Err(e) = vm.pause() {
            return json!({"ok": false, "error": e.to_string()});
        }
    }
    // Progress of every vCPU's program (passes or blocks), summed: it grows while the
    // guest runs.
    let passes: u64 = (0..vm.config().vcpus)
        .map(|i| vm.mailbox(i).map(|m| m.counter).unwrap_or(0))
        .sum();
    let result = match check_vm(vm) {
        Ok(reports) => {
            let ok = !reports.is_empty() && reports.iter().all(|r| r.ok);
            json!({"ok": ok, "passes": passes, "reports": serde_json::to_value(&reports).unwrap_or(Value::Null)})
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    if was_running {
        let _ = vm.resume();
    }
    result
}

fn session_hex(s: vmgate_migrate::protocol::SessionId) -> String {
    s.to_string()
}

// ─────────────────────────────────────────── receive ───────────────────────────────────────────

#[allow(clippy::too_many_lines)]
fn receive(cmd: Cmd) -> ExitCode {
    let Cmd::Receive {
        host,
        link_timeout_s,
        console_dir,
        protocol_version,
        test_fault,
    } = cmd
    else {
        return fail("internal: not receive");
    };
    let listen = host.listen;
    let (id, admit) = host.into_parts("vmgate-host");
    if admit.ldap_url.is_some() {
        // SAFETY: no other thread has started yet.
        unsafe { use_host_keytab_for_ldap(&id.keytab, &id.ccache_dir.join("ldap.ccache")) };
    }
    let (settings, _dir) = match server_settings(
        &id,
        &admit,
        Duration::from_secs(10),
        vmgate_auth::channel::DEFAULT_MAX_HANDSHAKES,
    ) {
        Ok(x) => x,
        Err(e) => return fail(vmgate_control::error::chain(&e)),
    };
    let version = match protocol_version.map(ProtocolVersion::new) {
        None => ProtocolVersion::CURRENT,
        Some(Some(v)) => v,
        Some(None) => return fail("--protocol-version must be at least 1"),
    };
    let vms: Arc<Mutex<Vec<ReceivedVm>>> = Arc::new(Mutex::new(Vec::new()));
    let opts = DestinationOptions {
        version,
        link_timeout: Duration::from_secs(link_timeout_s),
        vm_options: Box::new(move |c: &VmConfig| VmOptions {
            console_log: console_dir
                .as_ref()
                .map(|d| d.join(format!("{}.console", c.name))),
            ..VmOptions::default()
        }),
        on_event: Box::new(|e| emit(event_json(&e))),
        fault: test_fault.map(|f| {
            Box::new(move |at: FaultPoint| match (f, at) {
                (FaultArg::CutBeforeResume, FaultPoint::BeforeResume)
                | (FaultArg::CutAfterResume, FaultPoint::AfterResume) => FaultAction::CutLinks,
                (FaultArg::ExitAfterResume, FaultPoint::AfterResume) => {
                    emit(json!({"event": "test-exit"}));
                    #[allow(clippy::exit, reason = "the fault simulates the host dying here")]
                    std::process::exit(9);
                }
                _ => FaultAction::Continue,
            }) as Box<vmgate_migrate::engine::FaultHook>
        }),
        ..DestinationOptions::default()
    };
    let dest = Arc::new(Destination::new(opts));
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    emit(json!({"event": "listening", "addr": bound, "pid": std::process::id()}));
    let gw = Gateway::new(settings);
    {
        let dest = Arc::clone(&dest);
        let vms = Arc::clone(&vms);
        std::thread::spawn(move || {
            let r = gw.serve(&listener, move |r| match r {
                Ok(ch) => {
                    let incoming = match vmgate::adapter::incoming(ch) {
                        Ok(l) => l,
                        Err(e) => {
                            emit(json!({"event": "stream-error", "error": e.to_string()}));
                            return;
                        }
                    };
                    let peer = &incoming.peer;
                    emit(json!({"event": "accepted", "principal": peer.principal().to_string(), "peer": peer.addr().to_string()}));
                    match dest.handle(incoming.link) {
                        Received::Vm(v) => {
                            // Listed first, then announced: a `check` after the event finds it.
                            let event = json!({
                                "event": "running",
                                "vm": v.vm.config().name,
                                "session": session_hex(v.session),
                                "released": v.released,
                                "note": v.note,
                            });
                            vms.lock().unwrap_or_else(PoisonError::into_inner).push(*v);
                            emit(event);
                        }
                        Received::Discarded(why) => {
                            emit(json!({"event": "ended", "outcome": "discarded", "reason": why}));
                        }
                        Received::Joined | Received::Answered => {}
                    }
                }
                Err(e) => emit(json!({
                    "event": "refused",
                    "error": e.to_string(),
                    "diagnosis": e.diagnosis().map(|d| serde_json::to_value(&d).unwrap_or(Value::Null)),
                })),
            });
            if let Err(e) = r {
                emit(json!({"event": "error", "error": format!("accept failed: {e}")}));
            }
        });
    }
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "check" => {
                let list = vms.lock().unwrap_or_else(PoisonError::into_inner);
                let checks: Vec<Value> = list
                    .iter()
                    .map(|v| {
                        let mut c = check_json(&v.vm);
                        c["vm"] = json!(v.vm.config().name);
                        c
                    })
                    .collect();
                emit(json!({"event": "check", "vms": checks}));
            }
            "status" => {
                let list = vms.lock().unwrap_or_else(PoisonError::into_inner);
                let names: Vec<&str> = list.iter().map(|v| v.vm.config().name.as_str()).collect();
                emit(json!({
                    "event": "status",
                    "vms": names,
                    "running": list.iter().filter(|v| v.vm.running()).count(),
                    "active_moves": dest.active(),
                    "rss_kib": rss_kib(),
                }));
            }
            "quit" => break,
            "" => {}
            other => emit(json!({"event": "error", "error": format!("unknown command {other:?}")})),
        }
    }
    ExitCode::SUCCESS
}

fn event_json(e: &ReceivedEvent) -> Value {
    match e {
        ReceivedEvent::Started { session, peer } => {
            json!({"event": "move-started", "session": session_hex(*session), "peer": peer})
        }
        ReceivedEvent::Checked {
            session,
            vm,
            refused,
        } => {
            json!({"event": "checked", "session": session_hex(*session), "vm": vm, "refused": refused})
        }
        ReceivedEvent::Resumed { session, vm } => {
            json!({"event": "resumed", "session": session_hex(*session), "vm": vm})
        }
        ReceivedEvent::Discarded { session, reason } => {
            json!({"event": "discarded", "session": session_hex(*session), "reason": reason})
        }
    }
}

// ──────────────────────────────────────────── send ─────────────────────────────────────────────

#[allow(clippy::too_many_lines)]
fn send(cmd: Cmd) -> ExitCode {
    let Cmd::Send {
        vm: vm_path,
        to,
        spn,
        credential,
        channels,
        compression,
        bandwidth_mib,
        downtime_ms,
        no_auto_converge,
        converge_timeout_s,
        link_timeout_s,
        handoff_timeout_s,
        warmup_passes,
        warmup_ms,
        wait_for_go,
        cancel_at,
        console,
    } = cmd
    else {
        return fail("internal: not send");
    };
    let text = match std::fs::read_to_string(&vm_path) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read {}: {e}", vm_path.display())),
    };
    let config = match VmConfig::from_toml(&text, vm_path.parent()) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {e}", vm_path.display())),
    };
    let realm = credential.realm.clone();
    let (credential, _host_cache) = match credential.acquire("vmgate-host-s") {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let tls = match TlsContext::ephemeral() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let settings = ClientSettings {
        source: None,
        tls,
        realm: realm.clone(),
        handshake_timeout: Duration::from_secs(10),
        local_host: None,
    };
    let facts = AuthFacts {
        realm: Some(realm),
        target_spn: Some(spn.clone()),
        ..AuthFacts::default()
    };
    let mut dialer = ChannelDialer::new(settings, to, spn, credential, facts);

    let vm = match Vm::create(
        config,
        &VmOptions {
            console_log: console,
            ..VmOptions::default()
        },
    ) {
        Ok(vm) => vm,
        Err(e) => return fail(format!("cannot create the VM: {e}")),
    };
    if let Err(e) = vm.resume() {
        return fail(format!("cannot start the VM: {e}"));
    }
    let t = Instant::now();
    while vm.mailbox(0).map(|m| m.counter).unwrap_or(0) < warmup_passes {
        if t.elapsed() > Duration::from_secs(120) {
            return fail("the guest made no progress in 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(warmup_ms));
    emit(
        json!({"event": "vm-running", "pid": std::process::id(), "passes": vm.mailbox(0).map(|m| m.counter).unwrap_or(0)}),
    );

    // stdin: commands during and after the move.
    let cancel = CancelToken::new();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "cancel" {
                    cancel.cancel("cancelled by the administrator");
                }
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    if wait_for_go {
        loop {
            match lines_rx.recv() {
                Ok(l) if l.trim() == "move" => break,
                Ok(_) => {}
                Err(_) => return fail("stdin ended before `move`"),
            }
        }
    }
    let opts = MoveOptions {
        channels,
        compression: match compression {
            CompressionArg::None => Compression::None,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd(1),
        },
        bandwidth_limit: bandwidth_mib.map(|m| m << 20),
        downtime_target: Duration::from_millis(downtime_ms),
        auto_converge: !no_auto_converge,
        converge_timeout: Duration::from_secs(converge_timeout_s),
        link_timeout: Duration::from_secs(link_timeout_s),
        handoff_timeout: Duration::from_secs(handoff_timeout_s),
        ..MoveOptions::default()
    };
    let control = match dialer.connect() {
        Ok(l) => l,
        Err(e) => {
            emit(json!({
                "event": "failed",
                "error": e.to_string(),
                "diagnosis": e.diagnosis().map(|d| serde_json::to_value(&d).unwrap_or(Value::Null)),
                "vm_runs_here": vm.running(),
            }));
            return hold(&vm, &lines_rx, 1);
        }
    };
    let c2 = cancel.clone();
    let result = send_vm(&vm, control, &mut dialer, &opts, &cancel, &mut |p| {
        emit(json!({"event": "progress", "progress": p}));
        let hit = matches!(
            (cancel_at, p.phase),
            (Some(PhaseArg::Setup), Phase::Setup)
                | (Some(PhaseArg::PreCopy), Phase::PreCopy)
                | (Some(PhaseArg::Switchover), Phase::Switchover)
        );
        if hit {
            c2.cancel("cancelled by the test at this phase");
        }
    });
    match result {
        Ok(stats) => {
            emit(json!({"event": "moved", "stats": stats, "vm_runs_here": vm.running()}));
            vm.shutdown();
            for line in lines_rx.iter() {
                if line.trim() == "quit" {
                    break;
                }
                if line.trim() == "status" {
                    emit(json!({"event": "status", "vms": [], "rss_kib": rss_kib()}));
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                MoveError::InDoubt { .. } | MoveError::DisksHeld { .. } => 3,
                _ => 1,
            };
            emit(json!({
                "event": "failed",
                "error": e.to_string(),
                "kind": error_kind(&e),
                "vm_runs_here": vm.running(),
            }));
            hold(&vm, &lines_rx, code)
        }
    }
}

fn error_kind(e: &MoveError) -> &'static str {
    match e {
        MoveError::VersionRefused { .. } => "version-refused",
        MoveError::Incompatible { .. } => "incompatible",
        MoveError::Cancelled { .. } => "cancelled",
        MoveError::NotConverging { .. } => "not-converging",
        MoveError::Failed { .. } => "failed",
        MoveError::InDoubt { .. } => "in-doubt",
        MoveError::DisksHeld { .. } => "disks-held",
    }
}

/// After a move that left the VM here: answer `check`/`status` until `quit` or stdin ends.
fn hold(vm: &Vm, lines: &std::sync::mpsc::Receiver<String>, code: u8) -> ExitCode {
    for line in lines.iter() {
        match line.trim() {
            "check" => {
                let mut c = check_json(vm);
                c["event"] = json!("check");
                c["running"] = json!(vm.running());
                emit(c);
            }
            "status" => {
                emit(json!({"event": "status", "running": vm.running(), "rss_kib": rss_kib()}))
            }
            "quit" => break,
            _ => {}
        }
    }
    ExitCode::from(code)
}
