//! The migration engine over the authenticated channel: links made of authenticated
//! streams, a dialer that authenticates every parallel channel on its own, and the pieces a
//! host needs to build the server and client settings.

use std::net::SocketAddr;
use std::sync::Arc;

use vmgate_auth::channel::{
    self, AuthenticatedStream, ChannelError, ClientSettings, ConnectRequest, Purpose, Route,
    ShutdownHandle, Target,
};
use vmgate_auth::krb::{AuthFacts, Credential};
use vmgate_auth::spn::Spn;
use vmgate_migrate::engine::{Dialer, Link, LinkCloser};

struct Shutdown(ShutdownHandle);

impl LinkCloser for Shutdown {
    fn close(&self) {
        self.0.shutdown();
    }
}

/// A link over an authenticated stream: TLS records both ways, closed by shutting the socket.
pub fn stream_link(stream: AuthenticatedStream, peer: String) -> std::io::Result<Link> {
    let handle = stream.shutdown_handle()?;
    let (reader, writer) = stream.split();
    Ok(Link {
        reader: Box::new(reader),
        writer: Box::new(writer),
        closer: Arc::new(Shutdown(handle)),
        peer,
    })
}

/// Opens authenticated links to one destination with one credential (a user's, or the
/// source host's acting for a user): each channel of a move runs its own TLS and Kerberos
/// handshake.
pub struct ChannelDialer {
    settings: ClientSettings,
    request: ConnectRequest,
    credential: Credential,
}

impl std::fmt::Debug for ChannelDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDialer")
            .field("to", &self.request.target.addr)
            .field("spn", &self.request.target.spn.to_string())
            .finish_non_exhaustive()
    }
}

impl ChannelDialer {
    /// A dialer to `addr`, whose migration SPN is `spn`.
    pub fn new(
        settings: ClientSettings,
        addr: SocketAddr,
        spn: Spn,
        credential: Credential,
        facts: AuthFacts,
    ) -> ChannelDialer {
        ChannelDialer {
            settings,
            request: ConnectRequest {
                target: Target { addr, spn },
                purpose: Purpose::Migration,
                forward_tgt: false,
                route: Route::OwnTicket,
                via: String::new(),
                facts,
            },
            credential,
        }
    }

    /// Connects once (the control channel), keeping the channel's error with its diagnosis.
    pub fn connect(&self) -> Result<Link, ChannelError> {
        let ch = channel::connect(&self.settings, &self.request, &self.credential)?;
        let peer = format!("{} ({})", self.request.target.addr, ch.server_spn);
        stream_link(ch.stream, peer).map_err(|source| ChannelError::Io {
            peer: self.request.target.addr.to_string(),
            stage: "hand-over to the migration engine",
            source,
        })
    }
}

impl Dialer for ChannelDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.connect()?)
    }
}

pub mod arp;
pub mod compat;
pub mod jobs;
pub mod server;
pub mod service;
pub mod vms;
