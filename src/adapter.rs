//! The adapter between the authenticated channel (`vmgate_auth::channel`) and the migration
//! engine's transport (`vmgate_migrate::engine::Link`): a link is made only from a channel that
//! went through the whole handshake — a server channel with its [`Authorized`] proof, or a
//! client channel that authenticated the destination — so the engine never sees a stream that
//! skipped a check.
//!
//! [`ChannelDialer`] opens the parallel channels of one move, each with its own TLS and
//! Kerberos handshake; [`ActingDialer`] does the same acting for a remote user (forwarded TGT,
//! constrained delegation or protocol transition, as the host's auth type allows).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use vmgate_auth::authz::Authorized;
use vmgate_auth::channel::{
    self, ActingFor, ActingMethod, AuthenticatedStream, ChannelError, ClientChannel,
    ClientSettings, ConnectRequest, PeerAuthenticated, Purpose, Route, ServerChannel,
    ShutdownHandle, Target,
};
use vmgate_auth::delegation::AuthType;
use vmgate_auth::krb::{AuthFacts, Credential, HostCredentials};
use vmgate_auth::spn::Spn;
use vmgate_migrate::engine::{Dialer, Link, LinkCloser};

struct Shutdown(ShutdownHandle);

impl LinkCloser for Shutdown {
    fn close(&self) {
        self.0.shutdown();
    }
}

fn link(stream: AuthenticatedStream, peer: String) -> std::io::Result<Link> {
    let handle = stream.shutdown_handle()?;
    let (reader, writer) = stream.split();
    Ok(Link {
        reader: Box::new(reader),
        writer: Box::new(writer),
        closer: Arc::new(Shutdown(handle)),
        peer,
    })
}

/// An incoming migration channel as the engine takes it: the link, who the peer is, and the
/// proof that it is allowed here.
#[derive(Debug)]
pub struct IncomingLink {
    /// The link (TLS records both ways, closed by shutting the socket).
    pub link: Link,
    /// Who the peer is.
    pub peer: PeerAuthenticated,
    /// The authorization's proof.
    pub authorized: Authorized,
}

/// The link of an accepted, authorized channel.
pub fn incoming(channel: ServerChannel) -> std::io::Result<IncomingLink> {
    let (stream, peer, authorized, _purpose) = channel.into_parts();
    let who = format!("{} from {}", peer.principal(), peer.addr());
    Ok(IncomingLink {
        link: link(stream, who)?,
        peer,
        authorized,
    })
}

/// The link of a channel to a destination that proved its identity (mutual authentication).
pub fn outgoing(channel: ClientChannel, addr: SocketAddr) -> Result<Link, ChannelError> {
    let peer = format!("{addr} ({})", channel.server_spn);
    link(channel.stream, peer).map_err(|source| ChannelError::Io {
        peer: addr.to_string(),
        stage: "hand-over to the migration engine",
        source,
    })
}

/// Opens authenticated links to one destination with one credential (a user's, or the
/// source host's): each channel of a move runs its own TLS and Kerberos handshake.
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
        outgoing(ch, self.request.target.addr)
    }
}

impl Dialer for ChannelDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.connect()?)
    }
}

/// Opens authenticated links to one destination acting for a remote user, as the host's auth
/// type allows ([`channel::act_for_user`]).
#[derive(Debug)]
pub struct ActingDialer {
    /// The client settings.
    pub settings: ClientSettings,
    /// This host's keytab credentials.
    pub host: HostCredentials,
    /// What the user's channel proved.
    pub acting: ActingFor,
    /// `kerberos` or `credssp`.
    pub auth: AuthType,
    /// Where to.
    pub target: Target,
}

impl ActingDialer {
    /// One link, and how this host acted for the user.
    pub fn connect(&self) -> Result<(Link, ActingMethod), ChannelError> {
        let (ch, method) = channel::act_for_user(
            &self.settings,
            &self.host,
            &self.acting,
            self.auth,
            &self.target,
            Purpose::Migration,
            None,
        )?;
        Ok((outgoing(ch, self.target.addr)?, method))
    }
}

impl Dialer for ActingDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.connect()?.0)
    }
}
