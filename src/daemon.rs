//! Start-up: the configuration is already loaded and checked; then the keytab's and the state
//! folder's permissions ([`crate::perms`]), the event log ([`crate::events`]), the SPN
//! self-check ([`crate::spn_check`], never fatal), and the control socket
//! ([`crate::control::socket`]). The binary (src/main.rs) adds the process set-up (Kerberos
//! environment, logging, signals, systemd readiness), the dispatch and the gateway.

#![forbid(unsafe_code)]

use std::path::Path;

use vmgate_control::api::host::SpnState;
use vmgate_control::config::Config;

use crate::control::socket::{LocalServer, SocketError};
use crate::events::{EventLog, EventsError};
use crate::perms::{self, PermsError};
use crate::spn_check::{self, SpnReport};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// A secret or the state is exposed to other users.
    #[error(transparent)]
    Perms(#[from] PermsError),
    /// The event log cannot be opened.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The control socket cannot be bound.
    #[error(transparent)]
    Socket(#[from] SocketError),
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
    /// socket. The process's Kerberos environment must already point at the host's keytab
    /// (see src/main.rs) for the self-check to bind as the host. Blocks (the directory).
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
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
