//! vmgated: the vmgate host daemon.
//!
//! ```text
//! vmgated --config /etc/vmgate/vmgated.toml           # run
//! vmgated --config /etc/vmgate/vmgated.toml --check   # check the configuration and exit
//! ```
//!
//! Start-up: load and check the configuration; point the process's Kerberos environment at the
//! host keytab; install the log subscriber (the journal under systemd, stderr otherwise); start
//! the async runtime; check the keytab's and state folder's permissions; open the event log;
//! run the SPN self-check (event 14050 with the fix when an SPN is missing, never fatal); bind
//! the control socket; start the gateway (control and migration channels); tell systemd it is
//! ready (event 10000); serve until SIGTERM/SIGINT (event 10001).
//!
//! Exit codes: 0 success (or a clean stop), 1 the daemon could not start (permissions, socket,
//! event log, gateway), 2 a bad configuration (`--check` included) or bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::level_filters::LevelFilter;
use vmgate::control::Dispatcher;
use vmgate::control::serve::Handler;
use vmgate::daemon::{Daemon, notify_ready};
use vmgate::events::Event;
use vmgate::gateway::{self, Gateway};
use vmgate::inventory::Inventory;
use vmgate::jobs::Jobs;
use vmgate::moves::Moves;
use vmgate::moves::incoming::Incoming;
use vmgate::settings::HostSettings;
use vmgate_control::config::Config;
use vmgate_control::error;
use vmgate_control::logging::{self, LogArgs};

/// Exit code: the daemon could not start.
const EXIT_START: u8 = 1;
/// Exit code: bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

/// The vmgate host daemon: runs KVM micro-VMs and moves them to other hosts over a
/// Kerberos-authenticated, encrypted channel. Logs go to the journal under systemd, to stderr
/// otherwise (RUST_LOG, -v and -q choose how much).
#[derive(Debug, Parser)]
#[command(name = "vmgated", version, about)]
struct Args {
    /// The configuration file.
    #[arg(long, value_name = "PATH", default_value = "/etc/vmgate/vmgated.toml")]
    config: PathBuf,
    /// Check the configuration file and exit (0: valid, 2: invalid).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    log: LogArgs,
}

/// Points the process's Kerberos library at the host's identity: the keytab as the client
/// keytab (MIT gets the host's TGT from it on demand) and a private in-memory credential cache,
/// so that the directory binds of the SPN self-check and of the gateway's group lookups run as
/// `HV1$` and no ticket touches a shared cache. Also `KRB5_CONFIG` when the configuration names
/// a private krb5.conf.
fn set_kerberos_environment(config: &Config) {
    let cache = format!("MEMORY:vmgated-{}", std::process::id());
    // SAFETY: set_var is unsound only when another thread reads or writes the environment at the
    // same time. This runs in main before any thread is started: the runtime, the Kerberos
    // library, ldap3's runtime and the socket tasks all start later, and nothing else runs
    // concurrently in this process at this point.
    unsafe {
        std::env::set_var("KRB5_CLIENT_KTNAME", &config.keytab);
        std::env::set_var("KRB5CCNAME", &cache);
        if let Some(k) = &config.krb5_config {
            std::env::set_var("KRB5_CONFIG", k);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            error::print("vmgated", &e);
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
    logging::init("vmgated", LevelFilter::INFO, args.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmgated")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error::print("vmgated", &e);
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(run(config))
}

/// Why the daemon stops.
enum Stop {
    Signal(&'static str),
    SocketFailed,
}

async fn run(config: Config) -> ExitCode {
    // Handlers first: from here on SIGTERM/SIGINT stop the daemon cleanly.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error::print("vmgated", &e);
            return ExitCode::from(EXIT_START);
        }
    };
    let daemon = match tokio::task::spawn_blocking(move || Daemon::start(config)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            error::print("vmgated", &e);
            return ExitCode::from(EXIT_START);
        }
        Err(e) => {
            error::print("vmgated", &e);
            return ExitCode::from(EXIT_START);
        }
    };
    // The admin group is resolved in the directory: off the runtime.
    let config = daemon.config.clone();
    let runtime = tokio::runtime::Handle::current();
    let mut gateway_settings =
        match tokio::task::spawn_blocking(move || gateway::settings(&config, runtime)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                error::print("vmgated", &e);
                return ExitCode::from(EXIT_START);
            }
            Err(e) => {
                error::print("vmgated", &e);
                return ExitCode::from(EXIT_START);
            }
        };
    let settings = match HostSettings::load(daemon.config.clone()) {
        Ok(s) => s,
        Err(e) => {
            error::print("vmgated", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    gateway_settings.migration_filter = Some(settings.migration_filter());
    let events = daemon.events.clone();
    let inventory = Inventory::new(
        daemon.config.state_dir.join("consoles"),
        daemon.config.storage_roots.clone(),
    );
    let jobs = Jobs::default();
    let moves = Moves::new(
        settings.clone(),
        inventory.clone(),
        Some(gateway_settings.credentials.clone()),
    );
    let dispatcher = Dispatcher {
        settings: settings.clone(),
        spns: Arc::new(daemon.spn_states()),
        inventory: inventory.clone(),
        jobs: jobs.clone(),
        events: events.clone(),
        moves,
    };
    let handler: Arc<dyn Handler> = Arc::new(dispatcher);
    let incoming = Incoming::new(settings, inventory, jobs, events.clone());
    let listeners = match Gateway::bind(&daemon.config.listen).await {
        Ok(l) => l,
        Err(e) => {
            error::print("vmgated: cannot start the gateway", &e);
            return ExitCode::from(EXIT_START);
        }
    };
    let gateway = Gateway::new(
        gateway_settings,
        events.clone(),
        Arc::clone(&handler),
        incoming,
    );
    for listener in listeners {
        let gw = gateway.clone();
        tokio::spawn(async move {
            if let Err(e) = gw.serve(listener).await {
                tracing::error!(error = %error::chain(&e), "the gateway stopped");
            }
        });
    }
    let version = vmgate::control::host::version();
    events.emit(Event::DaemonStarted {
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
    let server = Arc::new(daemon.server);
    let serving = {
        let server = Arc::clone(&server);
        tokio::spawn(async move { server.serve(handler).await })
    };
    tokio::pin!(serving);
    notify_ready(&format!(
        "serving {}",
        daemon.config.control_socket.display()
    ));

    let stop = tokio::select! {
        _ = term.recv() => Stop::Signal("SIGTERM"),
        _ = int.recv() => Stop::Signal("SIGINT"),
        served = &mut serving => {
            match served {
                Ok(Err(e)) => tracing::error!(error = %error::chain(&e), "the control socket failed"),
                Ok(Ok(())) => tracing::error!("the control socket stopped"),
                Err(e) => tracing::error!(error = %e, "the control socket failed"),
            }
            Stop::SocketFailed
        }
    };
    let reason = match stop {
        Stop::Signal(sig) => format!("received {sig}"),
        Stop::SocketFailed => "the control socket failed".to_owned(),
    };
    events.emit(Event::DaemonStopping { reason });
    server.remove_socket();
    match stop {
        Stop::Signal(_) => ExitCode::SUCCESS,
        Stop::SocketFailed => ExitCode::from(EXIT_START),
    }
}
