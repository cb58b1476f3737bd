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

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use vmgate::daemon::config::Config;
use vmgate::daemon::events::Event;
use vmgate::daemon::local::{BasicHandler, ControlHandler};
use vmgate::daemon::{Daemon, notify_ready};

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

/// Where the lead's migration gateway starts: TCP listeners on `config.listen`, the network
/// filter from `config.migration`, TLS + Kerberos (`vmgate::host`), dispatch to the engine. It
/// runs on its own threads and returns once listening. Not wired yet: the control socket is the
/// only way in.
fn start_migration_listener(
    daemon: &Daemon,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = daemon;
    Ok(())
}

/// The control-socket dispatcher: today `version` and `host_show`; VM, move and job requests
/// join here.
fn control_handler(daemon: &Daemon) -> Arc<dyn ControlHandler> {
    Arc::new(BasicHandler::new(daemon.host_info()))
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
    if let Err(e) = start_migration_listener(&daemon) {
        eprintln!("vmgated: cannot start the migration listener: {e}");
        return ExitCode::from(EXIT_START);
    }
    let handler = control_handler(&daemon);
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
