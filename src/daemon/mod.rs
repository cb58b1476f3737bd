//! vmgated's own parts: configuration, events, the local control socket, SPN self-check.
//!
//! Start-up order ([`Daemon::start`]): the configuration is already loaded and checked; then
//! the keytab's and the state folder's permissions ([`perms`]), the event log ([`events`]), the
//! SPN self-check ([`spn_check`], never fatal), and the control socket ([`local`]). The binary
//! (src/main.rs) adds the process set-up (Kerberos environment, signals, systemd readiness) and
//! the migration listener.

#![forbid(unsafe_code)]

pub mod config;
pub mod events;
pub mod local;
pub mod perms;
pub mod spn_check;

use std::path::Path;

use config::Config;
use events::EventLog;
use local::{LocalServer, SpnState};
use spn_check::SpnReport;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A secret or the state is exposed to other users.
    #[error(transparent)]
    Perms(#[from] perms::PermsError),
    /// The event log cannot be opened.
    #[error(transparent)]
    Events(#[from] events::EventsError),
    /// The control socket cannot be bound.
    #[error(transparent)]
    Local(#[from] local::LocalError),
}

/// A started daemon: checks passed, events open, control socket bound (not yet served).
#[derive(Debug)]
pub struct Daemon {
    /// The configuration in force.
    pub config: Config,
    /// The event log.
    pub events: EventLog,
    /// The SPN self-check's result (`None` when it could not run; event 14053 says why).
    pub spns: Option<SpnReport>,
    /// The control socket.
    pub server: LocalServer,
}

impl Daemon {
    /// Checks permissions, opens the event log, runs the SPN self-check and binds the control
    /// socket. The process's Kerberos environment must already point at the host's keytab (see
    /// src/main.rs) for the self-check to bind as the host.
    pub fn start(config: Config) -> Result<Daemon, DaemonError> {
        perms::check_keytab(&config.keytab)?;
        perms::check_state_dir(&config.state_dir, perms::expected_state_owner())?;
        let events = EventLog::open(&config.event_log_path(), &config.host_name)?;
        let spns = spn_check::run(&config, &events).ok();
        let server = LocalServer::bind(
            &config.control_socket,
            config.local_group.clone(),
            Some(events.clone()),
        )?;
        Ok(Daemon {
            config,
            events,
            spns,
            server,
        })
    }

    /// The migration SPNs as the self-check found them (`unknown` when it could not run).
    pub fn spn_states(&self) -> Vec<SpnState> {
        match &self.spns {
            Some(report) => report.states(),
            None => spn_check::unknown_states(&self.config),
        }
    }
}

/// Tells systemd (`Type=notify`) that the daemon is ready, when `NOTIFY_SOCKET` names a socket.
/// Does nothing otherwise.
pub fn notify_ready(status: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nSTATUS={status}\n");
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), Path::new(&target))
    };
    if let Err(e) = sent {
        eprintln!("vmgated: cannot notify systemd: {e}");
    }
}
