//! The authenticated channel: network filter, TLS 1.3, Kerberos with RFC 9266 channel binding.
//!
//! Every connection between a CLI and a daemon, or between two daemons, goes through the same
//! steps. Each step is a type, and each transition consumes the previous state:
//!
//! ```text
//!  server (D)                                           client (U, or S acting for U)
//!  Incoming ── filter(CIDR list | any) ──► Admitted      (refused: closed before any TLS byte)
//!  Admitted ── TLS 1.3 (ephemeral cert) ─► ServerTls  ◄── TLS 1.3 ── ClientTls
//!                                                        cb = tls-exporter("EXPORTER-Channel-Binding", 32)
//!            ◄─────────── GssToken (AP-REQ, bound to cb, mutual) ────────────
//!            ──────────── GssToken (AP-REP) ─────────────────────────────────►  (or Refused)
//!  ServerTls ── kerberos ─► ServerAuthenticated ───► PeerAuthenticated proof
//!            ◄─────────── Request {version, purpose, route, via} ────────────
//!  ServerAuthenticated ── authorize ─► ServerChannel  ──► Authorized proof
//!            ──────────── Accepted {principal} | Refused {diagnosis} ───────►
//!  both: traffic keys move to the bulk record layer → AuthenticatedStream (Read + Write,
//!        split into independent halves)
//! ```
//!
//! * Handshake messages are framed ([`wire`]) with a 64 KiB cap checked before allocation.
//! * The whole handshake phase has one deadline ([`ServerSettings::handshake_timeout`]): a
//!   peer that sends nothing, or drips bytes, is cut off when it expires.
//! * A server runs at most [`ServerSettings::max_handshakes`] handshakes at once; when all slots
//!   are taken, the oldest pending handshake is dropped to make room, so idle connections
//!   cannot starve a legitimate client (they are the oldest).
//! * A man in the middle that terminates TLS on both sides and relays the Kerberos tokens is
//!   refused by the acceptor: the two TLS sessions have different exporter values, and GSSAPI
//!   answers GSS_S_BAD_BINDINGS (reported as SEC_E_BAD_BINDINGS). An authentication that carries
//!   no bindings at all (which MIT accepts) is refused with the same code: the binding must be
//!   *verified* (`GSS_C_CHANNEL_BOUND_FLAG`), not merely not contradicted.
//! * The acceptor takes tickets only for the host's migration SPNs
//!   ([`ServerSettings::services`]): an AP-REQ for `HOST/` or `cifs/` of the same account,
//!   relayed from another protocol, is refused with SEC_E_WRONG_PRINCIPAL.
//! * Authorization decides per purpose ([`Authorizer::authorize`]): users of the admin group may
//!   open control and migration channels; host principals only migration channels, and only
//!   when listed as peer hosts; principals of other realms than the host's (and the trusted
//!   ones) nothing. Every refusal is logged (`tracing`, target `vmgate_auth::channel`) and sent
//!   to the peer with its diagnosis.
//! * Failures carry a [`Diagnosis`] (Windows code, cause, fix). A server that refuses sends its
//!   diagnosis to the client, which reports it as [`ChannelError::Refused`].
//!
//! Acting for the user towards a third host: [`act_for_user`].
//!
//! "How obtained" ([`Route`]): the server learns from Kerberos who the client is, and whether it
//! forwarded a TGT; how a host acting for a user got its ticket (S4U2Proxy, S4U2Self) is the
//! client's declaration in the request, made inside the authenticated, bound channel.

#![forbid(unsafe_code)]

pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::authz::{Authorized, Authorizer};
use crate::delegation::AuthType;
use crate::krb::{
    AcceptPending, AcceptStep, AcceptedServices, Act, AuthFacts, CredKind, Credential,
    HostCredentials, InitOptions, InitPending, InitStep, KrbError, OpCcache, Principal, diagnose,
};
use crate::netfilter::NetworkFilter;
use crate::spn::Spn;
use crate::tls::{RecordReader, RecordWriter, TlsContext, TlsError, TlsSession};
use crate::winerr::{Diagnosis, WinCode};

pub use wire::{MAX_FRAME, Message, Purpose, Route, WireError};

/// vmgate's port.
pub const DEFAULT_PORT: u16 = 6600;
/// Default time for the whole handshake phase.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of handshakes a server runs at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Stack of a handshake thread (GSSAPI and the krb5 library need far less).
const HANDSHAKE_STACK: usize = 1024 * 1024;

/// Errors of the channel. Each says who is at fault: the peer (protocol, refused), the
/// network, or authentication/authorization (with a [`Diagnosis`]).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer's address is not in the allowed networks.
    #[error(
        "{peer} is outside the allowed networks ({allowed}); the connection was closed before TLS"
    )]
    Filtered {
        /// The peer.
        peer: IpAddr,
        /// The allowed networks.
        allowed: String,
    },
    /// The TCP connection could not be made.
    #[error("could not connect to {addr}")]
    Connect {
        /// Where to.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("the TLS handshake with {peer} failed")]
    Tls {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: TlsError,
    },
    /// The peer did not finish the handshake phase in time.
    #[error("{peer} did not complete the handshake within {} ms (stage: {stage})", timeout.as_millis())]
    TimedOut {
        /// The peer.
        peer: String,
        /// Where it stalled.
        stage: &'static str,
        /// The budget.
        timeout: Duration,
    },
    /// The peer broke the handshake protocol (bad frame, oversized token).
    #[error("{peer} broke the handshake protocol")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The peer sent a valid message at the wrong time.
    #[error("{peer} sent {got} where {expected} was expected")]
    Unexpected {
        /// The peer.
        peer: String,
        /// What came.
        got: &'static str,
        /// What should have come.
        expected: &'static str,
    },
    /// Authentication failed on this side (Kerberos, credentials, delegation).
    #[error("{diagnosis}")]
    Auth {
        /// Code, cause and fix.
        diagnosis: Diagnosis,
        /// The Kerberos error behind it, when there is one (its text is in the cause).
        kerberos: Option<KrbError>,
    },
    /// The peer refused us and said why.
    #[error("{peer} refused the connection:\n{diagnosis}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its diagnosis.
        diagnosis: Diagnosis,
    },
    /// We authenticated the peer but it is not allowed here.
    #[error("{diagnosis}")]
    Denied {
        /// The peer.
        peer: String,
        /// E_ACCESSDENIED with the groups and the fix.
        diagnosis: Diagnosis,
    },
    /// The handshake was dropped to make room for a newer one.
    #[error("the handshake with {peer} was dropped: too many handshakes in progress")]
    Evicted {
        /// The peer.
        peer: String,
    },
    /// The connection failed (reset, closed) during the handshake.
    #[error("the connection with {peer} failed during the handshake ({stage})")]
    Io {
        /// The peer.
        peer: String,
        /// Where.
        stage: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ChannelError {
    /// The Windows-style diagnosis of this failure, when there is one.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match self {
            ChannelError::Auth { diagnosis, .. }
            | ChannelError::Refused { diagnosis, .. }
            | ChannelError::Denied { diagnosis, .. } => Some(diagnosis.clone()),
            ChannelError::TimedOut { peer, stage, .. } => Some(Diagnosis::new(
                WinCode::TimedOut,
                format!("{peer} did not answer in time (during the {stage})"),
            )),
            ChannelError::Connect { addr, source }
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                Some(
                    Diagnosis::new(
                        WinCode::ConnectionRefused,
                        format!("nothing listens at {addr}"),
                    )
                    .with_fix("start vmgated on that host (or check its listen address and port)"),
                )
            }
            _ => None,
        }
    }

    /// The Windows code, when there is one.
    pub fn code(&self) -> Option<WinCode> {
        self.diagnosis().map(|d| d.code)
    }
}

/// How the server learned who the peer is, and how the peer got its credential.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Obtained {
    /// Declared by the client: own ticket, or a host acting for the user.
    pub route: Route,
    /// The host acting for the user (empty when the user connected directly).
    pub via: String,
    /// Kerberos says the client forwarded its TGT to us on this connection.
    pub tgt_forwarded: bool,
}

/// Proof that Kerberos authenticated the peer on this channel. Only the handshake creates it.
#[derive(Debug)]
pub struct PeerAuthenticated {
    principal: Principal,
    obtained: Obtained,
    addr: SocketAddr,
    _private: (),
}

impl PeerAuthenticated {
    /// The client principal (`alice@LAB.EXAMPLE.TEST`).
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// How it was obtained.
    pub fn obtained(&self) -> &Obtained {
        &self.obtained
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The encrypted, authenticated byte stream after the handshake (TLS 1.3 records).
#[derive(Debug)]
pub struct AuthenticatedStream {
    reader: RecordReader,
    writer: RecordWriter,
    peer: SocketAddr,
}

impl AuthenticatedStream {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Independent halves for parallel sending and receiving (no lock between them).
    pub fn split(self) -> (RecordReader, RecordWriter) {
        (self.reader, self.writer)
    }

    /// Sends close_notify; the peer reads end of stream.
    pub fn close(&mut self) -> io::Result<()> {
        self.writer.close()
    }

    /// Read timeout for the bulk phase.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.reader.set_read_timeout(t)
    }

    /// A handle on the underlying socket, to shut the connection down from another thread
    /// (it unblocks reads and writes on both halves). Nothing can be read or written
    /// through it: the TLS records stay with the halves.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        self.reader.try_clone_socket().map(ShutdownHandle)
    }
}

/// Shuts an [`AuthenticatedStream`]'s connection down (both directions).
#[derive(Debug)]
pub struct ShutdownHandle(TcpStream);

impl ShutdownHandle {
    /// Shuts the connection down; the peer sees the end of the stream, blocked reads and
    /// writes here return.
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl Read for AuthenticatedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for AuthenticatedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// A server-side channel: the stream, who the peer is, and the proof it is allowed.
#[derive(Debug)]
pub struct ServerChannel {
    /// The encrypted stream.
    pub stream: AuthenticatedStream,
    peer: PeerAuthenticated,
    authorized: Authorized,
    purpose: Purpose,
    delegated: Option<Credential>,
    /// The cache of the acceptor credential; the delegated (evidence) credential needs it
    /// until the channel is gone.
    _cache: Arc<OpCcache>,
}

impl ServerChannel {
    /// Who the peer is.
    pub fn peer(&self) -> &PeerAuthenticated {
        &self.peer
    }

    /// The proof of authorization.
    pub fn authorized(&self) -> &Authorized {
        &self.authorized
    }

    /// What the channel is for.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The credential to act for the peer with: its forwarded TGT or the evidence of its
    /// service ticket (S4U2Proxy). `None`: the peer's ticket was not forwardable.
    pub fn delegated(&self) -> Option<&Credential> {
        self.delegated.as_ref()
    }

    /// The parts: stream and proofs (for the daemon's dispatch).
    pub fn into_parts(self) -> (AuthenticatedStream, PeerAuthenticated, Authorized, Purpose) {
        (self.stream, self.peer, self.authorized, self.purpose)
    }

    /// What acting for the peer needs ([`act_for_user`]), apart from the stream: the peer's
    /// principal and its delegated credential, with the cache that credential lives in. It
    /// outlives the channel, so a daemon can hand the stream to a request loop and still act
    /// for the user while it answers.
    pub fn acting(&self) -> ActingFor {
        ActingFor {
            user: self.peer.principal().clone(),
            delegated: self.delegated.clone(),
            _cache: Arc::clone(&self._cache),
        }
    }
}

/// The user a host may act for, as an accepted channel proved it: the principal, and the
/// forwarded TGT or the S4U2Proxy evidence of the user's service ticket. Made only from a
/// [`ServerChannel`].
#[derive(Debug, Clone)]
pub struct ActingFor {
    user: Principal,
    delegated: Option<Credential>,
    _cache: Arc<OpCcache>,
}

impl ActingFor {
    /// The user.
    pub fn user(&self) -> &Principal {
        &self.user
    }

    /// The forwarded TGT or the evidence ticket; `None`: the user's ticket was not
    /// forwardable.
    pub fn delegated(&self) -> Option<&Credential> {
        self.delegated.as_ref()
    }

    /// Whether the user forwarded a TGT (CredSSP-style credential forwarding).
    pub fn forwarded_tgt(&self) -> bool {
        self.delegated
            .as_ref()
            .is_some_and(|c| c.kind() == CredKind::ForwardedTgt)
    }
}

/// A client-side channel.
#[derive(Debug)]
pub struct ClientChannel {
    /// The encrypted stream.
    pub stream: AuthenticatedStream,
    /// The server's principal as the server reported it to us.
    pub accepted_as: String,
    /// The SPN we authenticated to (the server proved it holds its key: mutual auth).
    pub server_spn: Spn,
    /// Whether our TGT was forwarded.
    pub tgt_forwarded: bool,
    /// Time from TCP connect to the end of the handshake.
    pub elapsed: Duration,
}

/// Settings of an accepting host.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// This host's short name (`hv2`), for messages.
    pub host_name: String,
    /// The realm.
    pub realm: String,
    /// TLS (ephemeral certificate).
    pub tls: TlsContext,
    /// The host's keytab and private caches.
    pub credentials: HostCredentials,
    /// Which peers may connect (checked before TLS: others are closed at once).
    pub filter: NetworkFilter,
    /// Which peers may open migration channels (checked after Kerberos, when the purpose is
    /// known): a peer outside gets a refusal naming its address and the allowed networks, so
    /// that control connections (management) can come from anywhere `filter` allows while
    /// moves come only over the migration networks. Shared, so that a daemon can change it
    /// while it serves. `None`: no further restriction.
    pub migration_filter: Option<Arc<std::sync::RwLock<NetworkFilter>>>,
    /// Who may use the host.
    pub authorizer: Authorizer,
    /// The whole handshake phase must finish within this.
    pub handshake_timeout: Duration,
    /// Handshakes at once.
    pub max_handshakes: usize,
    /// The services this host accepts tickets for: its migration SPNs (FQDN first, then the
    /// short form), in its realm. A ticket for any other service of the host's account
    /// (`HOST/`, `cifs/`, ...) is refused; an empty list refuses every ticket.
    pub services: AcceptedServices,
}

/// Settings of a connecting side.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// TLS.
    pub tls: TlsContext,
    /// The realm of the targets' SPNs.
    pub realm: String,
    /// The whole handshake phase must finish within this.
    pub handshake_timeout: Duration,
    /// This host's short name (`hv1`, or a workstation), for messages.
    pub local_host: Option<String>,
    /// The local address to connect from (a host's migration address, so that the peer's
    /// network filter sees it); `None`: the system's choice.
    pub source: Option<std::net::IpAddr>,
}

/// Where to connect.
#[derive(Clone, Debug)]
pub struct Target {
    /// Address and port.
    pub addr: SocketAddr,
    /// The target's migration SPN.
    pub spn: Spn,
}

impl Target {
    /// The target host's short name, from the SPN.
    pub fn host(&self) -> &str {
        self.spn.host().split('.').next().unwrap_or(self.spn.host())
    }
}

/// What a client asks for.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Where.
    pub target: Target,
    /// What for.
    pub purpose: Purpose,
    /// Forward our TGT (credential forwarding).
    pub forward_tgt: bool,
    /// How we obtained the credential (declared to the server).
    pub route: Route,
    /// The host we act from when acting for a user (`hv1`).
    pub via: String,
    /// Facts for diagnosing a failure (hosts, accounts, user).
    pub facts: AuthFacts,
}

// ---------------------------------------------------------------------------------------------
// Framed messages over the TLS session.

fn stage_err(peer: &str, stage: &'static str, timeout: Duration, e: TlsError) -> ChannelError {
    if e.is_timeout() {
        return ChannelError::TimedOut {
            peer: peer.to_owned(),
            stage,
            timeout,
        };
    }
    match e {
        TlsError::Io(source) => ChannelError::Io {
            peer: peer.to_owned(),
            stage,
            source,
        },
        TlsError::Closed => ChannelError::Io {
            peer: peer.to_owned(),
            stage,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ),
        },
        other => ChannelError::Tls {
            peer: peer.to_owned(),
            source: other,
        },
    }
}

struct Framed {
    session: TlsSession,
    peer: String,
    timeout: Duration,
}

impl Framed {
    fn send(&mut self, msg: &Message, stage: &'static str) -> Result<(), ChannelError> {
        self.session
            .send(&wire::encode(msg))
            .map_err(|e| stage_err(&self.peer, stage, self.timeout, e))
    }

    fn recv(&mut self, stage: &'static str) -> Result<Message, ChannelError> {
        let mut prefix = [0u8; 4];
        self.session
            .recv_exact(&mut prefix)
            .map_err(|e| stage_err(&self.peer, stage, self.timeout, e))?;
        let len = wire::frame_len(prefix).map_err(|source| ChannelError::Protocol {
            peer: self.peer.clone(),
            source,
        })?;
        let mut body = vec![0u8; len];
        self.session
            .recv_exact(&mut body)
            .map_err(|e| stage_err(&self.peer, stage, self.timeout, e))?;
        wire::decode(&body).map_err(|source| ChannelError::Protocol {
            peer: self.peer.clone(),
            source,
        })
    }

    fn into_stream(self, addr: SocketAddr) -> Result<AuthenticatedStream, ChannelError> {
        let peer = self.peer;
        let timeout = self.timeout;
        let (reader, writer) = self
            .session
            .into_record_layer()
            .map_err(|e| stage_err(&peer, "hand-over to the record layer", timeout, e))?;
        Ok(AuthenticatedStream {
            reader,
            writer,
            peer: addr,
        })
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::GssToken(_) => "a Kerberos token",
        Message::Request { .. } => "a request",
        Message::Accepted { .. } => "an acceptance",
        Message::Refused(_) => "a refusal",
    }
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// A TCP connection that has just been accepted.
#[derive(Debug)]
pub struct Incoming {
    sock: TcpStream,
    addr: SocketAddr,
}

impl Incoming {
    /// Wraps an accepted socket.
    pub fn new(sock: TcpStream, addr: SocketAddr) -> Incoming {
        Incoming { sock, addr }
    }

    /// The network filter: a peer outside the allowed networks is closed at once.
    pub fn filter(self, filter: &NetworkFilter) -> Result<Admitted, ChannelError> {
        if filter.allows(self.addr.ip()) {
            Ok(Admitted {
                sock: self.sock,
                addr: self.addr,
            })
        } else {
            let _ = self.sock.shutdown(Shutdown::Both);
            Err(ChannelError::Filtered {
                peer: self.addr.ip(),
                allowed: filter.to_string(),
            })
        }
    }
}

/// A connection from an allowed network.
#[derive(Debug)]
pub struct Admitted {
    sock: TcpStream,
    addr: SocketAddr,
}

impl Admitted {
    /// The TLS handshake (server side), within the handshake deadline.
    pub fn tls(
        self,
        settings: &ServerSettings,
        deadline: Instant,
    ) -> Result<ServerTls, ChannelError> {
        let peer = self.addr.to_string();
        let _ = self.sock.set_nodelay(true);
        let session = TlsSession::accept(&settings.tls, self.sock, Some(deadline))
            .map_err(|e| stage_err(&peer, "TLS handshake", settings.handshake_timeout, e))?;
        Ok(ServerTls {
            framed: Framed {
                session,
                peer,
                timeout: settings.handshake_timeout,
            },
            addr: self.addr,
        })
    }
}

/// TLS is up; Kerberos comes next.
pub struct ServerTls {
    framed: Framed,
    addr: SocketAddr,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("peer", &self.addr)
            .finish()
    }
}

impl ServerTls {
    fn facts(&self, settings: &ServerSettings) -> AuthFacts {
        AuthFacts {
            act: Act::Accept,
            local_host: Some(settings.host_name.clone()),
            local_account: Some(format!(
                "{}$",
                settings
                    .credentials
                    .account()
                    .name()
                    .trim_end_matches('$')
                    .to_uppercase()
            )),
            peer_host: Some(self.addr.ip().to_string()),
            target_spn: settings.services.spns().first().cloned(),
            realm: Some(settings.realm.clone()),
            keytab: Some(settings.credentials.keytab().display().to_string()),
            ..AuthFacts::default()
        }
    }

    /// Kerberos: accept the client's tokens (bound to this TLS session), then read its request.
    pub fn kerberos(self, settings: &ServerSettings) -> Result<ServerAuthenticated, ChannelError> {
        let facts = self.facts(settings);
        let mut framed = self.framed;
        let cb = framed
            .session
            .channel_binding()
            .map_err(|e| stage_err(&framed.peer, "channel binding", framed.timeout, e))?;
        let mut state: Option<(AcceptPending, Arc<OpCcache>)> = None;
        let (mut accepted, cache) = loop {
            let token = match framed.recv("Kerberos authentication")? {
                Message::GssToken(t) => t,
                other => {
                    return Err(ChannelError::Unexpected {
                        peer: framed.peer,
                        got: message_name(&other),
                        expected: "a Kerberos token",
                    });
                }
            };
            // The host's credential is read once the client has sent its first token, so a
            // failure reaches the client as a refusal rather than a reset connection.
            let (pending, cache) = match state.take() {
                Some(s) => s,
                None => match settings.credentials.shared_acceptor() {
                    Ok((cred, cache)) => (
                        AcceptPending::new(&cred, cb.gss_application_data(), &settings.services),
                        cache,
                    ),
                    Err(e) => {
                        let mut f = facts.clone();
                        f.act = Act::HostCredentials;
                        let diagnosis = diagnose(&e, &f);
                        let _ = framed.send(&Message::Refused(diagnosis.clone()), "refusal");
                        return Err(ChannelError::Auth {
                            diagnosis,
                            kerberos: Some(e),
                        });
                    }
                },
            };
            match pending.step(&token) {
                Ok(AcceptStep::Continue(p, out)) => {
                    framed.send(&Message::GssToken(out), "Kerberos authentication")?;
                    state = Some((p, cache));
                }
                Ok(AcceptStep::Established(acc, out)) => {
                    if let Some(t) = out {
                        framed.send(&Message::GssToken(t), "Kerberos authentication")?;
                    }
                    break (acc, cache);
                }
                Err(e) => {
                    let diagnosis = diagnose(&e, &facts);
                    tracing::warn!(
                        peer = %self.addr,
                        code = %diagnosis.code.hex(),
                        cause = %diagnosis.cause,
                        "refused: Kerberos authentication failed"
                    );
                    // Tell the client why (best effort; it may be a man in the middle).
                    let _ = framed.send(&Message::Refused(diagnosis.clone()), "refusal");
                    return Err(ChannelError::Auth {
                        diagnosis,
                        kerberos: Some(e),
                    });
                }
            }
        };
        let (version, purpose, route, via) = match framed.recv("request")? {
            Message::Request {
                version,
                purpose,
                route,
                via,
            } => (version, purpose, route, via),
            other => {
                return Err(ChannelError::Unexpected {
                    peer: framed.peer,
                    got: message_name(&other),
                    expected: "a request",
                });
            }
        };
        // A newer host accepts an older one; an older host refuses a newer one.
        if version == 0 || version > wire::VERSION {
            let d = Diagnosis::new(
                WinCode::InvalidToken,
                format!(
                    "{} speaks handshake version {version}; {} speaks version {} and only \
                     accepts that or older ones",
                    framed.peer,
                    settings.host_name,
                    wire::VERSION
                ),
            )
            .with_fix(format!(
                "upgrade vmgate on {} (a newer host accepts an older one)",
                settings.host_name
            ));
            tracing::warn!(peer = %self.addr, version, "refused: newer handshake version");
            let _ = framed.send(&Message::Refused(d.clone()), "refusal");
            return Err(ChannelError::Refused {
                peer: framed.peer,
                diagnosis: d,
            });
        }
        let refused_networks = match &settings.migration_filter {
            Some(f) if purpose == Purpose::Migration => {
                let f = f.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                (!f.allows(self.addr.ip())).then(|| f.to_string())
            }
            _ => None,
        };
        if let Some(f) = refused_networks {
            let d = Diagnosis::new(
                WinCode::AccessDenied,
                format!(
                    "{} does not accept moves from {}: that address is not on its migration \
                     networks ({f})",
                    settings.host_name,
                    self.addr.ip()
                ),
            )
            .with_fix(format!(
                "on {h}: vmgate host set --network <the source's subnet>[:priority] (or \
                 --any-network true); or move over an address of {h}'s migration networks",
                h = settings.host_name
            ));
            tracing::warn!(peer = %self.addr, "refused: a move from outside the migration networks");
            let _ = framed.send(&Message::Refused(d.clone()), "refusal");
            return Err(ChannelError::Refused {
                peer: framed.peer,
                diagnosis: d,
            });
        }
        let delegated = accepted.take_delegated();
        let peer = PeerAuthenticated {
            principal: accepted.client().clone(),
            obtained: Obtained {
                route,
                via,
                tgt_forwarded: accepted.tgt_forwarded(),
            },
            addr: self.addr,
            _private: (),
        };
        Ok(ServerAuthenticated {
            framed,
            addr: self.addr,
            peer,
            purpose,
            delegated,
            cache,
        })
    }
}

/// Kerberos authenticated the peer; authorization comes next.
pub struct ServerAuthenticated {
    framed: Framed,
    addr: SocketAddr,
    peer: PeerAuthenticated,
    purpose: Purpose,
    delegated: Option<Credential>,
    cache: Arc<OpCcache>,
}

impl fmt::Debug for ServerAuthenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerAuthenticated")
            .field("peer", &self.peer)
            .finish()
    }
}

impl ServerAuthenticated {
    /// Who the peer is.
    pub fn peer(&self) -> &PeerAuthenticated {
        &self.peer
    }

    /// Authorization for the purpose the peer asked for; the answer goes to the client, then
    /// the stream is handed over.
    pub fn authorize(self, authorizer: &Authorizer) -> Result<ServerChannel, ChannelError> {
        let mut framed = self.framed;
        match authorizer.authorize(&self.peer, self.purpose) {
            Ok(authorized) => {
                framed.send(
                    &Message::Accepted {
                        principal: self.peer.principal.to_string(),
                    },
                    "acceptance",
                )?;
                let stream = framed.into_stream(self.addr)?;
                Ok(ServerChannel {
                    stream,
                    peer: self.peer,
                    authorized,
                    purpose: self.purpose,
                    delegated: self.delegated,
                    _cache: self.cache,
                })
            }
            Err(diagnosis) => {
                tracing::warn!(
                    peer = %self.addr,
                    principal = %self.peer.principal,
                    purpose = ?self.purpose,
                    code = %diagnosis.code.hex(),
                    cause = %diagnosis.cause,
                    "refused: not authorized"
                );
                let _ = framed.send(&Message::Refused(diagnosis.clone()), "refusal");
                Err(ChannelError::Denied {
                    peer: self.peer.principal.to_string(),
                    diagnosis,
                })
            }
        }
    }
}

/// Runs the whole server side on this thread (filter, TLS, Kerberos, authorization).
pub fn accept(
    settings: &ServerSettings,
    sock: TcpStream,
    addr: SocketAddr,
) -> Result<ServerChannel, ChannelError> {
    let deadline = Instant::now() + settings.handshake_timeout;
    Incoming::new(sock, addr)
        .filter(&settings.filter)?
        .tls(settings, deadline)?
        .kerberos(settings)?
        .authorize(&settings.authorizer)
}

#[derive(Debug, Default)]
struct PendingTable {
    next: u64,
    entries: HashMap<u64, (Instant, TcpStream, SocketAddr)>,
    evicted: Vec<u64>,
}

/// A listening host: accepts connections, runs each handshake on its own thread, and hands
/// every outcome to a callback.
#[derive(Debug, Clone)]
pub struct Gateway {
    settings: Arc<ServerSettings>,
    pending: Arc<Mutex<PendingTable>>,
    handshakes: Arc<AtomicU64>,
}

impl Gateway {
    /// A gateway with these settings.
    pub fn new(settings: ServerSettings) -> Gateway {
        Gateway {
            settings: Arc::new(settings),
            pending: Arc::new(Mutex::new(PendingTable::default())),
            handshakes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ServerSettings {
        &self.settings
    }

    /// Handshakes in progress now.
    pub fn pending(&self) -> usize {
        self.pending
            .lock()
            .map(|t| t.entries.len())
            .unwrap_or_default()
    }

    /// Registers a handshake, evicting the oldest when the table is full.
    fn register(&self, sock: &TcpStream, addr: SocketAddr) -> Option<u64> {
        let clone = sock.try_clone().ok()?;
        let mut t = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while t.entries.len() >= self.settings.max_handshakes.max(1) {
            let oldest = t
                .entries
                .iter()
                .min_by_key(|(_, (started, _, _))| *started)
                .map(|(id, _)| *id)?;
            if let Some((_, s, a)) = t.entries.remove(&oldest) {
                tracing::warn!(peer = %a, "dropping the oldest pending handshake: too many at once");
                let _ = s.shutdown(Shutdown::Both);
                t.evicted.push(oldest);
            }
        }
        let id = t.next;
        t.next += 1;
        t.entries.insert(id, (Instant::now(), clone, addr));
        Some(id)
    }

    /// Removes a finished handshake; true if it had been evicted.
    fn unregister(&self, id: u64) -> bool {
        let mut t = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.entries.remove(&id);
        if let Some(pos) = t.evicted.iter().position(|e| *e == id) {
            t.evicted.swap_remove(pos);
            true
        } else {
            false
        }
    }

    /// Accepts connections forever. Peers outside the allowed networks are closed on this
    /// thread before any TLS; every other connection gets a thread that runs the handshake and
    /// then calls `on_result` with the channel or the failure.
    pub fn serve<F>(&self, listener: &TcpListener, on_result: F) -> io::Result<()>
    where
        F: Fn(Result<ServerChannel, ChannelError>) + Send + Sync + 'static,
    {
        let on_result = Arc::new(on_result);
        loop {
            let (sock, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_transient_accept_error(&e) => {
                    // Out of descriptors or the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let admitted = match Incoming::new(sock, addr).filter(&self.settings.filter) {
                Ok(a) => a,
                Err(e) => {
                    tracing::info!(peer = %addr, "refused: outside the allowed networks");
                    on_result(Err(e));
                    continue;
                }
            };
            let Some(id) = self.register(&admitted.sock, addr) else {
                continue;
            };
            let gw = self.clone();
            let cb = on_result.clone();
            let deadline = Instant::now() + self.settings.handshake_timeout;
            let spawned = thread::Builder::new()
                .name("vmgate-handshake".into())
                .stack_size(HANDSHAKE_STACK)
                .spawn(move || {
                    gw.handshakes.fetch_add(1, Ordering::Relaxed);
                    let s = &gw.settings;
                    let result = admitted
                        .tls(s, deadline)
                        .and_then(|t| t.kerberos(s))
                        .and_then(|k| k.authorize(&s.authorizer));
                    let evicted = gw.unregister(id);
                    let result = match result {
                        Err(_) if evicted => Err(ChannelError::Evicted {
                            peer: addr.to_string(),
                        }),
                        other => other,
                    };
                    cb(result);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a handshake thread");
                self.unregister(id);
            }
        }
    }

    /// Number of handshakes started so far.
    pub fn handshakes_started(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// A TCP connection to `addr` within `timeout`, from `source` when given.
fn tcp_connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.bind(&SocketAddr::new(ip, 0).into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect from {ip} (this host's migration address): {e}"),
        )
    })?;
    sock.connect_timeout(&addr.into(), timeout)?;
    Ok(sock.into())
}

/// Connects, runs TLS and Kerberos with `cred`, and waits for the server's answer.
pub fn connect(
    settings: &ClientSettings,
    req: &ConnectRequest,
    cred: &Credential,
) -> Result<ClientChannel, ChannelError> {
    let started = Instant::now();
    let deadline = started + settings.handshake_timeout;
    let addr = req.target.addr;
    let peer = format!("{} ({addr})", req.target.host());
    let sock =
        tcp_connect(addr, settings.source, settings.handshake_timeout).map_err(|source| {
            ChannelError::Connect {
                addr: addr.to_string(),
                source,
            }
        })?;
    let _ = sock.set_nodelay(true);
    let session = TlsSession::connect(&settings.tls, sock, req.target.spn.host(), Some(deadline))
        .map_err(|e| stage_err(&peer, "TLS handshake", settings.handshake_timeout, e))?;
    let mut framed = Framed {
        session,
        peer: peer.clone(),
        timeout: settings.handshake_timeout,
    };
    let cb = framed
        .session
        .channel_binding()
        .map_err(|e| stage_err(&peer, "channel binding", settings.handshake_timeout, e))?;
    let auth_err = |e: KrbError| {
        let mut facts = req.facts.clone();
        if facts.target_spn.is_none() {
            facts.target_spn = Some(req.target.spn.clone());
        }
        if facts.peer_host.is_none() {
            facts.peer_host = Some(req.target.host().to_owned());
        }
        if facts.local_host.is_none() {
            facts.local_host.clone_from(&settings.local_host);
        }
        if facts.realm.is_none() {
            facts.realm = Some(settings.realm.clone());
        }
        if facts.user.is_none() {
            facts.user = cred.user().cloned();
        }
        ChannelError::Auth {
            diagnosis: diagnose(&e, &facts),
            kerberos: Some(e),
        }
    };
    let mut pending = InitPending::new(
        cred,
        &req.target.spn,
        &settings.realm,
        cb.gss_application_data(),
        InitOptions {
            forward_tgt: req.forward_tgt,
        },
    )
    .map_err(&auth_err)?;
    let mut input: Option<Vec<u8>> = None;
    let established = loop {
        match pending.step(input.as_deref()) {
            Ok(InitStep::Continue(p, token)) => {
                framed.send(&Message::GssToken(token), "Kerberos authentication")?;
                pending = p;
                input = Some(match framed.recv("Kerberos authentication")? {
                    Message::GssToken(t) => t,
                    Message::Refused(diagnosis) => {
                        return Err(ChannelError::Refused { peer, diagnosis });
                    }
                    other => {
                        return Err(ChannelError::Unexpected {
                            peer,
                            got: message_name(&other),
                            expected: "a Kerberos token",
                        });
                    }
                });
            }
            Ok(InitStep::Established(est, token)) => {
                if let Some(t) = token {
                    framed.send(&Message::GssToken(t), "Kerberos authentication")?;
                }
                break est;
            }
            Err(e) => return Err(auth_err(e)),
        }
    };
    framed.send(
        &Message::Request {
            version: wire::VERSION,
            purpose: req.purpose,
            route: req.route,
            via: req.via.clone(),
        },
        "request",
    )?;
    let accepted_as = match framed.recv("authorization")? {
        Message::Accepted { principal } => principal,
        Message::Refused(diagnosis) => return Err(ChannelError::Refused { peer, diagnosis }),
        other => {
            return Err(ChannelError::Unexpected {
                peer,
                got: message_name(&other),
                expected: "an acceptance",
            });
        }
    };
    let stream = framed.into_stream(addr)?;
    Ok(ClientChannel {
        stream,
        accepted_as,
        server_spn: req.target.spn.clone(),
        tgt_forwarded: established.delegated(),
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------
// Acting for the user towards a third host.

/// Which way a host acts for a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActingMethod {
    /// The user's forwarded TGT.
    ForwardedTgt,
    /// Constrained delegation (S4U2Proxy) with the user's service ticket as evidence.
    ConstrainedDelegation,
    /// S4U2Self, then S4U2Proxy ("use any authentication protocol").
    ProtocolTransition,
}

/// Connects to `target` as the user of `session` (S → D as U). Which way follows the host's
/// auth type (DESIGN.md §3):
///
/// * `credssp`: only the user's forwarded TGT will do; without it, 0x8009030E saying CredSSP
///   needs the user's credentials on this host.
/// * `kerberos`: the forwarded TGT if the user sent one ("logged on to the source"), otherwise
///   constrained delegation with the user's service ticket as evidence, otherwise (the ticket
///   was not forwardable) protocol transition.
///
/// `enrich` may add directory facts (msDS-AllowedToDelegateTo, NOT_DELEGATED, ...) or the
/// delegation analysis' verdict to the diagnosis of a refusal; it runs only on failure.
pub fn act_for_user(
    settings: &ClientSettings,
    host: &HostCredentials,
    session: &ActingFor,
    auth_type: AuthType,
    target: &Target,
    purpose: Purpose,
    enrich: Option<&dyn Fn(&mut AuthFacts)>,
) -> Result<(ClientChannel, ActingMethod), ChannelError> {
    let user = session.user().clone();
    let local = settings
        .local_host
        .clone()
        .unwrap_or_else(|| host.account().name().trim_end_matches('$').to_lowercase());
    let mut facts = AuthFacts {
        local_host: Some(local.clone()),
        local_account: Some(format!(
            "{}$",
            host.account().name().trim_end_matches('$').to_uppercase()
        )),
        peer_host: Some(target.host().to_owned()),
        target_spn: Some(target.spn.clone()),
        user: Some(user.clone()),
        realm: Some(settings.realm.clone()),
        auth_type: Some(auth_type),
        ..AuthFacts::default()
    };
    let delegated = session.delegated().cloned();
    let forwarded = delegated
        .as_ref()
        .filter(|c| c.kind() == CredKind::ForwardedTgt)
        .cloned();
    let (method, cred, _cache): (ActingMethod, Credential, Option<OpCcache>) = match auth_type {
        AuthType::Credssp => match forwarded {
            Some(c) => (ActingMethod::ForwardedTgt, c, None),
            None => {
                let name = user.name();
                let d = Diagnosis::new(
                    WinCode::NoCredentials,
                    format!(
                        "{local} uses CredSSP, which needs {name}'s credentials on {local}: \
                         {name} did not forward them (and is not logged on to {local}), so \
                         {local} cannot authenticate to {} as {name}",
                        target.host()
                    ),
                )
                .with_fix(format!(
                    "forward your credentials: vmgate move ... --forward-credentials\nor start \
                     the move on {local} itself\nor use Kerberos constrained delegation: vmgate \
                     host enable --auth kerberos; vmgate delegation add-service {local} {}",
                    crate::krb::diagnose::quote(target.spn.as_str())
                ));
                return Err(ChannelError::Auth {
                    diagnosis: d,
                    kerberos: None,
                });
            }
        },
        AuthType::Kerberos => match (forwarded, delegated) {
            (Some(c), _) => (ActingMethod::ForwardedTgt, c, None),
            (None, Some(evidence)) => {
                // A non-forwardable ticket is evidence only for a host trusted for "any
                // protocol", and never for a sensitive user: if the directory says the user
                // is sensitive, say so without asking the KDC; otherwise let the KDC decide.
                if evidence.ticket_forwardable(host).ok().flatten() == Some(false) {
                    facts.act = Act::ConstrainedDelegation;
                    facts.ticket_forwardable = Some(false);
                    if let Some(f) = enrich {
                        f(&mut facts);
                    }
                    if facts.user_not_delegable == Some(true) {
                        return Err(ChannelError::Auth {
                            diagnosis: crate::krb::diagnose::delegation_refused(&facts),
                            kerberos: None,
                        });
                    }
                }
                (ActingMethod::ConstrainedDelegation, evidence, None)
            }
            (None, None) => {
                // No ticket of the user's to use as evidence: only S4U2Self is left.
                match host.impersonate(&user) {
                    Ok((c, cc)) => (ActingMethod::ProtocolTransition, c, Some(cc)),
                    Err(e) => {
                        facts.act = Act::ProtocolTransition;
                        if let Some(f) = enrich {
                            f(&mut facts);
                        }
                        return Err(ChannelError::Auth {
                            diagnosis: diagnose(&e, &facts),
                            kerberos: Some(e),
                        });
                    }
                }
            }
        },
    };
    facts.act = match method {
        ActingMethod::ForwardedTgt => Act::ForwardedTgt,
        ActingMethod::ConstrainedDelegation => Act::ConstrainedDelegation,
        ActingMethod::ProtocolTransition => Act::ProtocolTransition,
    };
    let req = ConnectRequest {
        target: target.clone(),
        purpose,
        forward_tgt: false,
        route: match method {
            ActingMethod::ForwardedTgt => Route::ForwardedTgt,
            ActingMethod::ConstrainedDelegation => Route::ConstrainedDelegation,
            ActingMethod::ProtocolTransition => Route::ProtocolTransition,
        },
        via: local,
        facts: facts.clone(),
    };
    match connect(settings, &req, &cred) {
        Ok(ch) => Ok((ch, method)),
        Err(ChannelError::Auth {
            kerberos: Some(e), ..
        }) => {
            if facts.ticket_forwardable.is_none() {
                if let Some(f) = enrich {
                    f(&mut facts);
                }
            }
            Err(ChannelError::Auth {
                diagnosis: diagnose(&e, &facts),
                kerberos: Some(e),
            })
        }
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_their_diagnosis_in_full() {
        let e = ChannelError::Refused {
            peer: "hv2 (127.0.0.12:6600)".into(),
            diagnosis: Diagnosis::new(WinCode::AccessDenied, "carol is not a member")
                .with_fix("samba-tool group addmembers X carol"),
        };
        let s = e.to_string();
        assert!(s.starts_with("hv2 (127.0.0.12:6600) refused the connection:\nerror 0x80070005 (E_ACCESSDENIED): Access is denied."), "{s}");
        assert!(s.contains("fix:   samba-tool"));
        assert_eq!(e.code(), Some(WinCode::AccessDenied));
        let t = ChannelError::TimedOut {
            peer: "x".into(),
            stage: "TLS handshake",
            timeout: Duration::from_secs(1),
        };
        assert_eq!(t.code(), Some(WinCode::TimedOut));
    }
}
