//! The gateway: the daemon's one TCP port (6600), for the CLI on a workstation and for other
//! hosts' moves.
//!
//! ```text
//!  accept (tokio) ── network filter ── pending table (per address, in all) ──┐
//!                                                                              │ one deadline
//!  TLS 1.3 ── Kerberos with channel binding ── authorization (admin group) ◄──┘ (blocking
//!                                                                                threads)
//!  ── purpose: control → the dispatch as that user; migration → the engine's destination
//! ```
//!
//! The steps are `vmgate_auth::channel`'s typestates (`Incoming` → `Admitted` → `ServerTls` →
//! `ServerAuthenticated` → `ServerChannel`), run on the runtime's blocking threads (GSSAPI and
//! the directory block) under one deadline that covers TLS, Kerberos and authorization: a peer
//! that has not been authorized when it expires is cut off. A refused logon (a peer outside
//! the allowed networks, a failed Kerberos logon, an authenticated user who is not allowed
//! here, a move from outside the migration networks) is one warning record, event 10011, with
//! the peer's address, the principal when known, the reason and the Windows code.

#![forbid(unsafe_code)]

pub mod directory;
pub mod pending;

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::Instrument;
use vmgate_auth::authz::GroupSpec;
use vmgate_auth::channel::{
    ChannelError, Incoming as Connection, Purpose, ServerChannel, ServerSettings,
};
use vmgate_auth::host::{Admission, HostIdentity, HostSettingsError, server_settings};
use vmgate_auth::winerr::{Diagnosis, WinCode};
use vmgate_control::config::Config;
use vmgate_migrate::engine::Destination;

use crate::caller::Caller;
use crate::control::serve::{Handler, serve_blocking};
use crate::events::{Event, EventLog};
use crate::moves::incoming::Incoming;
use pending::{DEFAULT_PER_PEER, Pending};

/// The time a peer has for TLS, Kerberos and authorization together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes at once.
pub const MAX_HANDSHAKES: usize = vmgate_auth::channel::DEFAULT_MAX_HANDSHAKES;

/// The time one directory operation of a group lookup may take.
pub const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway's settings for this host: its identity from its keytab; who may connect — the
/// admin group's users (looked up in the directory as the host: over `ldap://` with ldap3's
/// async client on `runtime`, [`directory::AsyncGroups`]; over `ldaps://` with the auth
/// crate's directory client), the peer hosts for moves in host-identity mode, the trusted
/// realms; and no connection-level network filter (control connections may come from
/// anywhere; moves only from the migration networks, see
/// [`ServerSettings::migration_filter`]). Blocks (the admin group is resolved in the
/// directory, once): call it from a blocking thread.
pub fn settings(
    config: &Config,
    runtime: tokio::runtime::Handle,
) -> Result<ServerSettings, GatewayError> {
    let url = &config.directory.url;
    let sealed = url.to_ascii_lowercase().starts_with("ldap://");
    let [_, spn] = config.migration_spns().map_err(GatewayError::Spn)?;
    let id = HostIdentity {
        keytab: config.keytab.clone(),
        account: config.account.clone(),
        realm: config.realm.clone(),
        spn,
        ccache_dir: config.state_dir.join("ccache"),
    };
    let admit = Admission {
        principals: Vec::new(),
        groups: if sealed {
            Vec::new()
        } else {
            vec![config.admin_group.clone()]
        },
        trusted_realms: config.trusted_realms.clone(),
        peer_hosts: config.migration.peer_hosts.clone(),
        ldap_url: (!sealed).then(|| url.clone()),
        ldap_ca: config.directory.ca_file.clone(),
        networks: vec!["any".into()],
    };
    let (mut settings, _groups) = server_settings(&id, &admit, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES)
        .map_err(GatewayError::Settings)?;
    if sealed {
        let groups = directory::AsyncGroups::new(
            url.clone(),
            vmgate_auth::host::url_host(url).unwrap_or_default(),
            DIRECTORY_TIMEOUT,
            runtime,
        );
        settings.authorizer = settings
            .authorizer
            .clone()
            .allow_group(GroupSpec::parse(&config.admin_group), Arc::new(groups));
        // Resolved once, now: a missing or ambiguous group stops the daemon; a directory
        // that cannot be asked yet leaves it to the first logon.
        match settings.authorizer.resolve_groups() {
            Ok(resolved) => {
                for g in resolved {
                    tracing::info!(group = %g.spec, dn = %g.dn, sid = ?g.sid, "admin group resolved");
                }
            }
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "the admin group could not be resolved yet; it will be at the first logon");
            }
            Err(e) => {
                return Err(GatewayError::Settings(HostSettingsError::AdminGroup(e)));
            }
        }
    }
    Ok(settings)
}

/// Errors of the gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The host's migration SPNs cannot be formed.
    #[error("the migration SPNs cannot be formed from the configuration")]
    Spn(#[source] vmgate_auth::spn::SpnError),
    /// The settings cannot be built (keytab, TLS).
    #[error("cannot set up the gateway")]
    Settings(#[source] HostSettingsError),
    /// A listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting failed for good.
    #[error("the gateway stopped accepting connections")]
    Accept(#[source] std::io::Error),
}

/// What a refused logon is logged with.
fn refusal(e: &ChannelError) -> Option<(Option<String>, Diagnosis)> {
    match e {
        ChannelError::Filtered { .. } => {
            Some((None, Diagnosis::new(WinCode::AccessDenied, e.to_string())))
        }
        ChannelError::Denied { peer, diagnosis } => Some((Some(peer.clone()), diagnosis.clone())),
        ChannelError::Auth { diagnosis, .. } | ChannelError::Refused { diagnosis, .. } => {
            Some((None, diagnosis.clone()))
        }
        _ => None,
    }
}

/// A listening gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    settings: Arc<ServerSettings>,
    pending: Arc<Mutex<Pending<TcpStream>>>,
    events: EventLog,
    control: Arc<dyn Handler>,
    incoming: Incoming,
    destination: Arc<Destination>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("host", &self.settings.host_name)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with these settings: control channels go to `control`, migration channels to
    /// `incoming`'s destination.
    pub fn new(
        settings: ServerSettings,
        events: EventLog,
        control: Arc<dyn Handler>,
        incoming: Incoming,
    ) -> Gateway {
        let pending = Pending::new(settings.max_handshakes, DEFAULT_PER_PEER);
        Gateway {
            settings: Arc::new(settings),
            pending: Arc::new(Mutex::new(pending)),
            events,
            control,
            destination: Arc::new(incoming.destination()),
            incoming,
        }
    }

    /// Binds every listen address; the listeners, to serve.
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<tokio::net::TcpListener>, GatewayError> {
        let mut out = Vec::new();
        for addr in addrs {
            out.push(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Listen {
                        addr: *addr,
                        source,
                    })?,
            );
        }
        Ok(out)
    }

    /// Accepts connections until the listener fails for good.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> Result<(), GatewayError> {
        loop {
            let (sock, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if is_transient(&e) => {
                    // Out of descriptors or the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(GatewayError::Accept(e)),
            };
            self.admit(sock, addr);
        }
    }

    /// The network filter, then the pending table, then the handshake on its own task.
    fn admit(&self, sock: tokio::net::TcpStream, addr: SocketAddr) {
        let sock = match sock
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "cannot take over an accepted connection");
                return;
            }
        };
        let guard = match sock.try_clone() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(peer = %addr, error = %e, "cannot take over an accepted connection");
                return;
            }
        };
        let admitted = match Connection::new(sock, addr).filter(&self.settings.filter) {
            Ok(a) => a,
            Err(e) => {
                self.refused(addr, &e);
                return;
            }
        };
        let registered = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(addr.ip(), guard, std::time::Instant::now());
        let id = match registered {
            Ok((id, dropped)) => {
                for (peer, sock) in dropped {
                    tracing::warn!(peer = %peer, "dropped the oldest pending handshake of the busiest address: too many at once");
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                id
            }
            Err(busy) => {
                tracing::warn!(peer = %addr, error = %busy, "refused a connection");
                return;
            }
        };
        let gw = self.clone();
        let span = tracing::info_span!(
            "connection",
            peer = %addr,
            principal = tracing::field::Empty,
            purpose = tracing::field::Empty
        );
        tokio::spawn(
            async move {
                let result = gw.handshake(admitted, addr, id).await;
                let evicted = gw
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .finish(id);
                match result {
                    Err(_) if evicted => tracing::info!(
                        "{}",
                        ChannelError::Evicted {
                            peer: addr.to_string()
                        }
                    ),
                    Err(e) => gw.refused(addr, &e),
                    Ok(ch) => gw.channel(ch).await,
                }
            }
            .instrument(span),
        );
    }

    /// TLS, Kerberos and authorization on a blocking thread, under one deadline.
    async fn handshake(
        &self,
        admitted: vmgate_auth::channel::Admitted,
        addr: SocketAddr,
        id: u64,
    ) -> Result<ServerChannel, ChannelError> {
        let timeout = self.settings.handshake_timeout;
        let deadline = std::time::Instant::now() + timeout;
        let settings = Arc::clone(&self.settings);
        let work = tokio::task::spawn_blocking(move || {
            admitted
                .tls(&settings, deadline)
                .and_then(|t| t.kerberos(&settings))
                .and_then(|k| k.authorize(&settings.authorizer))
        });
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ChannelError::Io {
                peer: addr.to_string(),
                stage: "handshake",
                source: std::io::Error::other(join),
            }),
            Err(_) => {
                // The blocking thread ends when its socket or the directory gives up; the
                // peer is cut off now.
                if let Some(sock) = self
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .guard(id)
                {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                Err(ChannelError::TimedOut {
                    peer: addr.to_string(),
                    stage: "TLS, Kerberos and authorization",
                    timeout,
                })
            }
        }
    }

    /// Logs a handshake that did not end in a channel: a refused logon as event 10011 (one
    /// warning record), anything else as a note.
    fn refused(&self, addr: SocketAddr, e: &ChannelError) {
        match refusal(e) {
            Some((principal, d)) => {
                if let Some(p) = &principal {
                    tracing::Span::current().record("principal", tracing::field::display(p));
                }
                self.events.emit(Event::GatewayRefused {
                    peer: addr.to_string(),
                    principal,
                    code: d.code.hex(),
                    code_name: d.code.name().to_owned(),
                    cause: d.cause,
                });
            }
            None => tracing::info!(
                peer = %addr,
                error = %vmgate_control::error::chain(e),
                "a handshake failed"
            ),
        }
    }

    /// An authorized channel, by its purpose.
    async fn channel(&self, ch: ServerChannel) {
        let span = tracing::Span::current();
        span.record("principal", tracing::field::display(ch.peer().principal()));
        let purpose = ch.purpose();
        match purpose {
            Purpose::Migration => {
                span.record("purpose", "migration");
                let link = match crate::adapter::incoming(ch) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot hand a migration channel to the engine");
                        return;
                    }
                };
                let incoming = self.incoming.clone();
                let destination = Arc::clone(&self.destination);
                let work = tracing::Span::current();
                let _ = tokio::task::spawn_blocking(move || {
                    work.in_scope(|| incoming.receive(&destination, link));
                })
                .await;
            }
            Purpose::Control => {
                span.record("purpose", "control");
                tracing::info!("a control channel was opened");
                let acting = ch.acting();
                let (stream, peer, authorized, _) = ch.into_parts();
                let caller = Arc::new(Caller::remote(&peer, acting, authorized));
                let shutdown = stream.shutdown_handle().ok();
                let (reader, writer) = stream.split();
                serve_blocking(
                    reader,
                    writer,
                    move |w| {
                        let _ = w.close();
                        if let Some(h) = shutdown {
                            h.shutdown();
                        }
                    },
                    caller,
                    Arc::clone(&self.control),
                )
                .await;
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_logons_name_the_principal_when_known() {
        let denied = ChannelError::Denied {
            peer: "carol@LAB.EXAMPLE.TEST".into(),
            diagnosis: Diagnosis::new(WinCode::AccessDenied, "carol is not a member"),
        };
        let (principal, d) = refusal(&denied).unwrap();
        assert_eq!(principal.as_deref(), Some("carol@LAB.EXAMPLE.TEST"));
        assert_eq!(d.code, WinCode::AccessDenied);
        let filtered = ChannelError::Filtered {
            peer: "10.1.2.3".parse().unwrap(),
            allowed: "127.0.0.0/8".into(),
        };
        let (principal, d) = refusal(&filtered).unwrap();
        assert_eq!(principal, None);
        assert!(
            d.cause.contains("10.1.2.3 is outside the allowed networks"),
            "{}",
            d.cause
        );
        let timed_out = ChannelError::TimedOut {
            peer: "x".into(),
            stage: "TLS handshake",
            timeout: Duration::from_secs(1),
        };
        assert!(refusal(&timed_out).is_none());
    }
}
