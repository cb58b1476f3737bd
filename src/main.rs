//! vmgated: the vmgate host daemon.
//!
//! ```text
//! vmgated --config /etc/vmgate/vmgated.toml           # run
//! vmgated --config /etc/vmgate/vmgated.toml --check   # check the configuration and exit
//! ```
//!
//! Start-up: load and check the configuration; point the process's Kerberos environment at the
//! host keytab; block SIGTERM/SIGINT (a signal thread handles them); check the keytab's and state
//! folder's permissions; open the event log; run the SPN self-check (event 14050 with the fix
//! when an SPN is missing, never fatal); bind the control socket; start the migration listener;
//! tell systemd it is ready (event 10000); serve until SIGTERM/SIGINT (event 10001).
//!
//! Exit codes: 0 success (or a clean stop), 1 the daemon could not start (permissions, socket,
//! event log), 2 a bad configuration (`--check` included) or bad usage.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use vmgate::daemon::config::Config;
use vmgate::daemon::config::Performance;
use vmgate::daemon::events::{Event, EventLog, MoveKind, MovePhase};
use vmgate::daemon::local::{
    BasicHandler, ControlHandler, ErrorCode, LocalPeer, Replies, Request, Response,
};
use vmgate::daemon::{Daemon, notify_ready};
use vmgate::host::server::{Admission, HostIdentity, server_settings};
use vmgate::host::stream_link;
use vmgate::host::vms::{MoveRequest, Vms, move_vm};
use vmgate_auth::channel::Gateway;
use vmgate_migrate::engine::{
    CancelToken, Destination, DestinationOptions, MoveOptions, Received, ReceivedEvent,
};
use vmgate_migrate::protocol::Compression;

/// Exit code: the daemon could not start.
const EXIT_START: u8 = 1;
/// Exit code: bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

/// The vmgate host daemon: runs KVM micro-VMs and moves them to other hosts over a
/// Kerberos-authenticated, encrypted channel.
#[derive(Debug, Parser)]
#[command(name = "vmgated", version, about)]
struct Args {
    /// The configuration file.
    #[arg(long, value_name = "PATH", default_value = "/etc/vmgate/vmgated.toml")]
    config: PathBuf,
    /// Check the configuration file and exit (0: valid, 2: invalid).
    #[arg(long)]
    check: bool,
}

/// Points the process's Kerberos library at the host's identity: the keytab as the client
/// keytab (MIT gets the host's TGT from it on demand) and a private in-memory credential cache,
/// so that the directory bind of the SPN self-check runs as `HV1$` and no ticket touches a
/// shared cache. Also `KRB5_CONFIG` when the configuration names a private krb5.conf.
fn set_kerberos_environment(config: &Config) {
    let cache = format!("MEMORY:vmgated-{}", std::process::id());
    // SAFETY: set_var is unsound only when another thread reads or writes the environment at the
    // same time. This runs first thing in main, before any thread is started: the Kerberos
    // library, ldap3's runtime and the socket threads all start later, and nothing else runs
    // concurrently in this process at this point.
    unsafe {
        std::env::set_var("KRB5_CLIENT_KTNAME", &config.keytab);
        std::env::set_var("KRB5CCNAME", &cache);
        if let Some(k) = &config.krb5_config {
            std::env::set_var("KRB5_CONFIG", k);
        }
    }
}

/// The migration gateway: TCP listeners on `config.listen`, the incoming-network filter from
/// `config.migration`, TLS + Kerberos + channel binding, authorization of the *user* by the
/// admin group (recursively, through the directory), then the migration engine's destination.
/// It runs on its own threads and returns once listening. With migrations disabled nothing
/// listens for moves.
fn start_migration_listener(
    daemon: &Daemon,
    vms: &Vms,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cfg = &daemon.config;
    if !cfg.migration.enabled {
        return Ok(());
    }
    let [_, spn] = cfg.migration_spns()?;
    let id = HostIdentity {
        keytab: cfg.keytab.clone(),
        account: cfg.account.clone(),
        realm: cfg.realm.clone(),
        spn,
        ccache_dir: cfg.state_dir.join("ccache"),
    };
    let admit = Admission {
        principals: Vec::new(),
        groups: vec![cfg.admin_group.clone()],
        ldap_url: Some(cfg.directory.url.clone()),
        ldap_ca: cfg.directory.ca_file.clone(),
        networks: vec!["any".into()],
    };
    let (mut settings, _groups) = server_settings(
        &id,
        &admit,
        Duration::from_secs(10),
        vmgate_auth::channel::DEFAULT_MAX_HANDSHAKES,
    )?;
    settings.filter = cfg.migration.network_filter();
    let events = daemon.events.clone();
    let host = cfg.fqdn.clone();
    let peers: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let dest = Arc::new(Destination::new(DestinationOptions {
        on_event: Box::new(move |e| migration_event(&events, &host, &peers, e)),
        ..DestinationOptions::default()
    }));
    for addr in &cfg.listen {
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let gw = Gateway::new(settings.clone());
        let dest = Arc::clone(&dest);
        let vms = vms.clone();
        std::thread::Builder::new()
            .name("vmgated-gateway".into())
            .spawn(move || {
                let served = gw.serve(&listener, move |r| {
                    let Ok(ch) = r else {
                        // Refused before the engine (network, Kerberos, authorization): the
                        // peer got the diagnosis; the gateway logged it.
                        return;
                    };
                    let (stream, peer, _authorized, _purpose) = ch.into_parts();
                    let who = format!("{} from {}", peer.principal(), peer.addr());
                    let Ok(link) = stream_link(stream, who.clone()) else {
                        return;
                    };
                    if let Received::Vm(v) = dest.handle(link) {
                        let name = v.vm.config().name.clone();
                        if let Err(e) = vms.add(v.vm, format!("moved here by {who}")) {
                            eprintln!("vmgated: {name} arrived but cannot be listed: {e}");
                        }
                    }
                });
                if let Err(e) = served {
                    eprintln!("vmgated: the migration listener stopped: {e}");
                }
            })?;
    }
    Ok(())
}

/// The destination's lifecycle events, as the event log's stable ids.
fn migration_event(
    events: &EventLog,
    host: &str,
    peers: &Mutex<HashMap<String, String>>,
    e: ReceivedEvent,
) {
    let mut peers = peers.lock().unwrap_or_else(PoisonError::into_inner);
    match e {
        ReceivedEvent::Started { session, peer } => {
            peers.insert(session.to_string(), peer);
        }
        ReceivedEvent::Checked {
            session,
            vm,
            refused,
        } => {
            let job = session.to_string();
            let peer = peers.get(&job).cloned().unwrap_or_default();
            let (user, source) = peer.split_once(" from ").unwrap_or(("", &peer));
            if refused.is_empty() {
                events.emit(Event::MigrationStarted {
                    job,
                    vm,
                    kind: MoveKind::Live,
                    source: source.to_owned(),
                    destination: host.to_owned(),
                    user: user.to_owned(),
                });
            } else {
                events.emit(generic_failure(job, vm, refused.join("; ")));
            }
        }
        ReceivedEvent::Resumed { session, vm } => {
            peers.remove(&session.to_string());
            events.emit(Event::MigrationPhase {
                job: session.to_string(),
                vm,
                phase: MovePhase::Handoff,
            });
        }
        ReceivedEvent::Discarded { session, reason } => {
            peers.remove(&session.to_string());
            events.emit(generic_failure(session.to_string(), String::new(), reason));
        }
    }
}

/// A move that failed for a reason without its own Windows code (E_FAIL, as Hyper-V's
/// generic migration failure), with the engine's cause.
fn generic_failure(job: String, vm: String, cause: String) -> Event {
    Event::MigrationFailed {
        job,
        vm,
        code: "0x80004005".into(),
        code_name: "E_FAIL".into(),
        cause,
        fix: None,
    }
}

/// The control-socket dispatcher: `vm_list`, `vm_create` and `move` from this host's VMs;
/// `version` and `host_show` from the basic handler.
fn control_handler(daemon: &Daemon, vms: Vms) -> Arc<dyn ControlHandler> {
    let basic = BasicHandler::new(daemon.host_info());
    let events = daemon.events.clone();
    let cfg = daemon.config.clone();
    Arc::new(
        move |peer: &LocalPeer, request: Request, replies: &mut Replies<'_>| match request {
            Request::VmList => Response::Vms { vms: vms.list() },
            Request::VmCreate { config } => {
                match vms.create(&config, &cfg.state_dir.join("consoles")) {
                    Ok(name) => Response::Done {
                        message: format!("created and started {name}"),
                    },
                    Err(e) => Response::error(ErrorCode::BadRequest, e),
                }
            }
            Request::Move {
                vm,
                to,
                destination,
                ccache,
            } => start_move(
                &cfg,
                &events,
                &vms,
                &vm,
                &to,
                &destination,
                &ccache,
                replies,
            ),
            other => basic.handle(peer, other, replies),
        },
    )
}

/// A move requested on the control socket, as the caller (their forwarded ticket).
#[allow(clippy::too_many_arguments)]
fn start_move(
    cfg: &Config,
    events: &EventLog,
    vms: &Vms,
    vm: &str,
    to: &str,
    destination: &str,
    ccache: &vmgate::daemon::local::CcacheBlob,
    replies: &mut Replies<'_>,
) -> Response {
    let to: std::net::SocketAddr = match to.parse() {
        Ok(a) => a,
        Err(e) => {
            return Response::error(
                ErrorCode::BadRequest,
                format!("\"{to}\" is not an address and port: {e}"),
            );
        }
    };
    let spn = match vmgate_auth::spn::Spn::new(&cfg.spn_class, destination) {
        Ok(s) => s,
        Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
    };
    let m = &cfg.migration;
    let options = MoveOptions {
        channels: m.effective_channels(),
        compression: match m.performance {
            Performance::Compression => Compression::Lz4,
            Performance::Tcpip | Performance::Multichannel => Compression::None,
        },
        bandwidth_limit: m.bandwidth_limit.map(|b| b.bytes_per_second()),
        downtime_target: Duration::from_millis(u64::from(m.downtime_target_ms)),
        ..MoveOptions::default()
    };
    let req = MoveRequest {
        vm,
        to,
        spn,
        ccache: ccache.expose(),
        ccache_dir: cfg.state_dir.join("ccache"),
        realm: cfg.realm.clone(),
        options,
    };
    let job = format!("{vm}-{}", std::process::id());
    let mut started = false;
    let outcome = move_vm(vms, &req, &CancelToken::new(), &mut |p| {
        if !started {
            started = true;
            events.emit(Event::MigrationPhase {
                job: job.clone(),
                vm: vm.to_owned(),
                phase: MovePhase::Setup,
            });
        }
        let _ = replies.send(&Response::Progress {
            progress: serde_json::to_value(p).unwrap_or_default(),
        });
    });
    match outcome.result {
        Ok(stats) => {
            events.emit(Event::MigrationCompleted {
                job,
                vm: vm.to_owned(),
                total_ms: ms(stats.total_ms),
                downtime_ms: ms(stats.downtime_ms),
                bytes: stats.bytes_on_wire,
            });
            Response::Done {
                message: format!(
                    "moved {vm} to {destination} as {}: total {:.0} ms, downtime {:.1} ms, {} bytes",
                    outcome.user, stats.total_ms, stats.downtime_ms, stats.bytes_on_wire
                ),
            }
        }
        Err(e) => {
            events.emit(generic_failure(job, vm.to_owned(), e.clone()));
            Response::error(ErrorCode::Failed, e)
        }
    }
}

/// Milliseconds as a whole number for the event log.
fn ms(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Whole milliseconds of a move: far below u64::MAX.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, positive, and rounded"
        )]
        let r = v.round() as u64;
        r
    } else {
        0
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmgated: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        println!(
            "{}: valid configuration for {} ({}, account {}); migration {}",
            args.config.display(),
            config.host_name,
            config.fqdn,
            config.account,
            if config.migration.enabled {
                "enabled"
            } else {
                "disabled"
            }
        );
        return ExitCode::SUCCESS;
    }
    set_kerberos_environment(&config);

    // Block the stop signals in this thread before any other exists: every later thread
    // inherits the mask, and only the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("vmgated: cannot block SIGTERM/SIGINT: {e}");
        return ExitCode::from(EXIT_START);
    }

    let daemon = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vmgated: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let vms = Vms::default();
    if let Err(e) = start_migration_listener(&daemon, &vms) {
        eprintln!("vmgated: cannot start the migration listener: {e}");
        return ExitCode::from(EXIT_START);
    }
    let handler = control_handler(&daemon, vms);
    let version = vmgate::daemon::local::VersionInfo::current();
    daemon.events.emit(Event::DaemonStarted {
        version: version.daemon.clone(),
        protocol: version.protocol,
        listen: daemon
            .config
            .listen
            .iter()
            .map(ToString::to_string)
            .collect(),
        control_socket: daemon.config.control_socket.display().to_string(),
    });

    let daemon = Arc::new(daemon);
    let serving = Arc::clone(&daemon);
    let events = daemon.events.clone();
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed_flag = Arc::clone(&failed);
    let server = std::thread::Builder::new()
        .name("vmgated-control".into())
        .spawn(move || {
            if let Err(e) = serving.server.serve(handler) {
                eprintln!("vmgated: the control socket failed: {e}");
                failed_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                // Wake the signal wait in main (a process-directed signal reaches it).
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
            }
        });
    if let Err(e) = server {
        eprintln!("vmgated: cannot start the control thread: {e}");
        return ExitCode::from(EXIT_START);
    }
    notify_ready(&format!(
        "serving {}",
        daemon.config.control_socket.display()
    ));

    let reason = match signals.wait() {
        Ok(_) if failed.load(std::sync::atomic::Ordering::SeqCst) => {
            "the control socket failed".to_owned()
        }
        Ok(sig) => format!("received {}", sig.as_str()),
        Err(e) => format!("waiting for signals failed: {e}"),
    };
    events.emit(Event::DaemonStopping { reason });
    daemon.server.remove_socket();
    if failed.load(std::sync::atomic::Ordering::SeqCst) {
        ExitCode::from(EXIT_START)
    } else {
        ExitCode::SUCCESS
    }
}
