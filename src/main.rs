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
//! when an SPN is missing, never fatal); bind the control socket; start the gateway (control
//! and migration channels, src/host/service.rs serves both with the local socket);
//! tell systemd it is ready (event 10000); serve until SIGTERM/SIGINT (event 10001).
//!
//! Exit codes: 0 success (or a clean stop), 1 the daemon could not start (permissions, socket,
//! event log), 2 a bad configuration (`--check` included) or bad usage.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use vmgate::daemon::config::Config;
use vmgate::daemon::events::Event;
use vmgate::daemon::local::{Caller, ControlHandler, RemotePeer, serve_requests};
use vmgate::daemon::{Daemon, notify_ready};
use vmgate::host::server::{Admission, HostIdentity, server_settings};
use vmgate::host::service::Service;
use vmgate::host::stream_link;
use vmgate_auth::channel::{ChannelError, Gateway, Purpose};
use vmgate_migrate::engine::{Destination, Received};

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

/// The gateway: TCP listeners on `config.listen`; TLS + Kerberos + channel binding;
/// authorization of the *user* by the admin group (recursively, through the directory). Then
/// by the channel's purpose: a migration channel (only from the migration networks) goes to
/// the engine's destination, a control channel to the request dispatcher as that user. It
/// runs on its own threads and returns once listening. With migration disabled it still
/// listens: moves are refused with the reason, and control requests (`host enable`) work.
fn start_gateway(
    config: &Config,
    service: &Service,
    events: &vmgate::daemon::events::EventLog,
    settings: vmgate_auth::channel::ServerSettings,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dest = Arc::new(Destination::new(service.destination_options()));
    for addr in &config.listen {
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let gw = Gateway::new(settings.clone());
        let dest = Arc::clone(&dest);
        let service = service.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name("vmgated-gateway".into())
            .spawn(move || {
                let served = gw.serve(&listener, move |r| {
                    let ch = match r {
                        Ok(ch) => ch,
                        Err(e) => {
                            // Refused before the engine; the peer got the diagnosis. Refused
                            // logons (Kerberos, binding, authorization) go to the event log.
                            log_refusal(&events, &e);
                            return;
                        }
                    };
                    let acting = ch.acting();
                    let (stream, peer, _authorized, purpose) = ch.into_parts();
                    let who = format!("{} from {}", peer.principal(), peer.addr());
                    match purpose {
                        Purpose::Migration => {
                            let Ok(link) = stream_link(stream, who.clone()) else {
                                return;
                            };
                            if let Received::Vm(v) = dest.handle(link) {
                                service.arrived(*v, &who);
                            }
                        }
                        Purpose::Control => {
                            let caller = Caller::Remote(RemotePeer {
                                principal: peer.principal().to_string(),
                                addr: peer.addr(),
                                acting,
                            });
                            serve_requests(stream, &caller, &service);
                        }
                    }
                });
                if let Err(e) = served {
                    eprintln!("vmgated: the gateway stopped: {e}");
                }
            })?;
    }
    Ok(())
}

/// Logs a refused logon (event 10011): failures of Kerberos (a ticket for another service, no
/// or a wrong channel binding, ...) and of authorization. Connections that never got as far
/// (network filter, TLS, timeouts) are not logons.
fn log_refusal(events: &vmgate::daemon::events::EventLog, e: &ChannelError) {
    let peer = match e {
        ChannelError::Denied { peer, .. } | ChannelError::Refused { peer, .. } => peer.clone(),
        // Kerberos did not authenticate it: the cause names its address where it matters.
        ChannelError::Auth { .. } => "an unauthenticated client".to_owned(),
        _ => return,
    };
    if let Some(d) = e.diagnosis() {
        events.emit(Event::GatewayRefused {
            peer,
            code: d.code.hex(),
            cause: d.cause,
        });
    }
}

/// The gateway's settings: the host's identity from its keytab, the admin group, and the
/// migration networks (shared with `host set`).
fn gateway_settings(
    cfg: &Config,
) -> Result<vmgate_auth::channel::ServerSettings, Box<dyn std::error::Error + Send + Sync>> {
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
        trusted_realms: cfg.trusted_realms.clone(),
        peer_hosts: cfg.migration.peer_hosts.clone(),
        ldap_url: Some(cfg.directory.url.clone()),
        ldap_ca: cfg.directory.ca_file.clone(),
        networks: vec!["any".into()],
    };
    let (settings, _groups) = server_settings(
        &id,
        &admit,
        Duration::from_secs(10),
        vmgate_auth::channel::DEFAULT_MAX_HANDSHAKES,
    )?;
    Ok(settings)
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
    let mut settings = match gateway_settings(&daemon.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmgated: cannot set up the gateway: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let spns = daemon.spn_states();
    let service = match Service::new(
        daemon.config.clone(),
        daemon.events.clone(),
        spns,
        Some(settings.credentials.clone()),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmgated: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    settings.migration_filter = Some(service.migration_filter());
    if let Err(e) = start_gateway(&daemon.config, &service, &daemon.events, settings) {
        eprintln!("vmgated: cannot start the gateway: {e}");
        return ExitCode::from(EXIT_START);
    }
    let handler: Arc<dyn ControlHandler> = Arc::new(service);
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
