//! TLS 1.3 with rustls (ring) and ephemeral certificates: secrecy, not identity.
//!
//! Every connection between vmgate processes runs over TLS 1.3. The certificates are
//! self-signed and made when the process starts: TLS here gives the channel its secrecy and
//! integrity, and the **identity** comes from Kerberos, which is bound to this very TLS session
//! through RFC 9266 `tls-exporter` channel bindings ([`TlsSession::channel_binding`]). A man in
//! the middle who terminates TLS on both sides sees two different exporter values and cannot
//! complete the Kerberos exchange.
//!
//! The handshake phase (TLS handshake, Kerberos tokens, the purpose message) runs through
//! rustls. After it, [`TlsSession::into_record_layer`] takes the traffic keys out of rustls and
//! hands them to [`record`]: one sealing half and one opening half that each own a clone of the
//! socket, so a migration can send and receive in parallel without a lock, and bulk data is
//! encrypted in place in large batches (see the module docs of [`record`]).

#![forbid(unsafe_code)]

pub mod record;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig};
use rustls::{ServerConnection, SignatureScheme};

pub use record::{RecordReader, RecordWriter};

/// The RFC 9266 exporter label.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// The prefix of the channel-binding application data (RFC 5056 / RFC 9266: `tls-exporter:`).
pub const CHANNEL_BINDING_PREFIX: &[u8] = b"tls-exporter:";

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Making the ephemeral certificate failed (our own bug or the RNG).
    #[error("could not make the ephemeral TLS certificate")]
    Certificate(#[source] rcgen::Error),
    /// rustls refused the configuration (our own bug).
    #[error("could not build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// The name given for the peer is not a DNS name or address.
    #[error("\"{0}\" is not a valid TLS server name")]
    ServerName(String),
    /// The TLS handshake failed: the peer does not speak TLS 1.3, or misbehaved.
    #[error("the TLS handshake with the peer failed (the peer is not a vmgate host or misbehaved)")]
    Handshake(#[source] io::Error),
    /// The socket failed or timed out during the handshake phase.
    #[error("the connection failed during the TLS handshake phase")]
    Io(#[source] io::Error),
    /// The peer broke the TLS protocol (bad record, bad MAC, unexpected message).
    #[error("the peer broke the TLS protocol")]
    Protocol(#[source] rustls::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection during the handshake phase")]
    Closed,
    /// The exporter (channel binding) could not be computed.
    #[error("could not export the TLS channel binding")]
    Exporter(#[source] rustls::Error),
    /// The peer sent application data before the handshake phase was over.
    #[error("the peer sent data before the handshake phase was over")]
    EarlyData,
    /// rustls would not hand over the traffic keys (our own bug).
    #[error("could not move the TLS session to the bulk record layer")]
    Extract(#[source] rustls::Error),
    /// The negotiated cipher suite is not one the record layer implements (our own bug).
    #[error("the negotiated cipher suite is not supported by the record layer")]
    Suite,
}

impl TlsError {
    /// Whether the error is a timeout of the socket (the peer sent nothing in time).
    pub fn is_timeout(&self) -> bool {
        match self {
            TlsError::Handshake(e) | TlsError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

/// The ring provider restricted to TLS 1.3 AES-GCM suites (fast with AES-NI; the record layer
/// implements exactly these).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// TLS configuration of one process: an ephemeral certificate for accepting, and a client
/// configuration that accepts any certificate whose key signed the handshake.
#[derive(Clone)]
pub struct TlsContext {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsContext { ephemeral certificate }")
    }
}

impl TlsContext {
    /// A fresh self-signed certificate (ECDSA P-256) and the configurations around it.
    pub fn ephemeral() -> Result<TlsContext, TlsError> {
        let provider = provider();
        let certified = rcgen::generate_simple_self_signed(vec!["vmgate".to_owned()])
            .map_err(TlsError::Certificate)?;
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(TlsError::Config)?;
        // No session tickets: nothing may follow the handshake that the record layer would
        // have to understand, and resumption is pointless with ephemeral certificates.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        server.max_early_data_size = 0;

        let verifier = Arc::new(AnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;
        client.enable_early_data = false;
        Ok(TlsContext {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Certificates are ephemeral and carry no identity: Kerberos with channel binding does that.
/// The handshake signature is still verified with the certificate's key, so the peer holds the
/// key of the certificate it sent.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The RFC 9266 channel binding of a TLS session: 32 bytes from the exporter.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelBinding([u8; 32]);

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not secret, but not useful in logs either.
        f.write_str("ChannelBinding(tls-exporter)")
    }
}

impl ChannelBinding {
    /// The exporter value.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The application data of the GSS channel bindings: `tls-exporter:` and the value.
    pub fn gss_application_data(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CHANNEL_BINDING_PREFIX.len() + 32);
        v.extend_from_slice(CHANNEL_BINDING_PREFIX);
        v.extend_from_slice(&self.0);
        v
    }
}

/// Reads TLS records from the socket without ever reading past the end of the current record.
///
/// rustls buffers whatever `read` returns. During the handshake phase that is what we want,
/// but at its end the traffic keys move to the record layer: bytes that rustls had already
/// read (the peer's first bulk records) would be lost. Feeding rustls one record at a time
/// makes the hand-over exact.
#[derive(Debug, Default)]
struct RecordBoundary {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

struct BoundedIo<'a> {
    sock: &'a TcpStream,
    state: &'a mut RecordBoundary,
    deadline: Option<Instant>,
}

/// Sets the socket timeouts to what is left until `deadline` (a slow peer cannot stretch the
/// handshake by dripping bytes: the budget is for the whole phase, not per read).
fn apply_deadline(sock: &TcpStream, deadline: Option<Instant>) -> io::Result<()> {
    let Some(d) = deadline else {
        return Ok(());
    };
    let left = d.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake phase took too long",
        ));
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

impl Read for BoundedIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        apply_deadline(self.sock, self.deadline)?;
        let st = &mut *self.state;
        if st.body_left > 0 {
            let want = st.body_left.min(buf.len());
            let Some(dst) = buf.get_mut(..want) else {
                return Ok(0);
            };
            let n = self.sock.read(dst)?;
            st.body_left -= n;
            return Ok(n);
        }
        let want = (5 - st.header_len).min(buf.len());
        let Some(dst) = buf.get_mut(..want) else {
            return Ok(0);
        };
        let n = self.sock.read(dst)?;
        if let (Some(src), Some(hdr)) = (
            dst.get(..n),
            st.header.get_mut(st.header_len..st.header_len + n),
        ) {
            hdr.copy_from_slice(src);
        }
        st.header_len += n;
        if st.header_len == 5 {
            st.header_len = 0;
            st.body_left = usize::from(u16::from_be_bytes([st.header[3], st.header[4]]));
        }
        Ok(n)
    }
}

impl Write for BoundedIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        apply_deadline(self.sock, self.deadline)?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// A TLS 1.3 session in its handshake phase: small framed messages go through rustls.
pub struct TlsSession {
    conn: Connection,
    sock: TcpStream,
    boundary: RecordBoundary,
    deadline: Option<Instant>,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("peer", &self.sock.peer_addr().ok())
            .field("server", &matches!(self.conn, Connection::Server(_)))
            .finish()
    }
}

impl TlsSession {
    /// Runs the server side of the TLS handshake on an accepted socket. Every read and write
    /// of the handshake phase must finish by `deadline` (`None`: the socket's own timeouts).
    pub fn accept(
        ctx: &TlsContext,
        sock: TcpStream,
        deadline: Option<Instant>,
    ) -> Result<TlsSession, TlsError> {
        let conn = ServerConnection::new(ctx.server.clone()).map_err(TlsError::Config)?;
        TlsSession::handshake(Connection::Server(conn), sock, deadline)
    }

    /// Runs the client side of the TLS handshake; `server_name` is only used for SNI.
    pub fn connect(
        ctx: &TlsContext,
        sock: TcpStream,
        server_name: &str,
        deadline: Option<Instant>,
    ) -> Result<TlsSession, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let conn = ClientConnection::new(ctx.client.clone(), name).map_err(TlsError::Config)?;
        TlsSession::handshake(Connection::Client(conn), sock, deadline)
    }

    fn handshake(
        mut conn: Connection,
        sock: TcpStream,
        deadline: Option<Instant>,
    ) -> Result<TlsSession, TlsError> {
        let mut boundary = RecordBoundary::default();
        while conn.is_handshaking() {
            let mut io = BoundedIo {
                sock: &sock,
                state: &mut boundary,
                deadline,
            };
            match conn.complete_io(&mut io) {
                Ok((0, 0)) if conn.is_handshaking() => return Err(TlsError::Closed),
                Ok(_) => {}
                Err(e) => return Err(TlsError::Handshake(e)),
            }
        }
        let mut session = TlsSession {
            conn,
            sock,
            boundary,
            deadline,
        };
        session.flush()?;
        Ok(session)
    }

    /// The socket (for its addresses and timeouts).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The RFC 9266 `tls-exporter` channel binding of this session.
    pub fn channel_binding(&self) -> Result<ChannelBinding, TlsError> {
        let out = self
            .conn
            .export_keying_material([0u8; 32], CHANNEL_BINDING_LABEL, None)
            .map_err(TlsError::Exporter)?;
        Ok(ChannelBinding(out))
    }

    fn flush(&mut self) -> Result<(), TlsError> {
        while self.conn.wants_write() {
            let mut io = BoundedIo {
                sock: &self.sock,
                state: &mut self.boundary,
                deadline: self.deadline,
            };
            self.conn.write_tls(&mut io).map_err(TlsError::Io)?;
        }
        Ok(())
    }

    /// Sends `data` (encrypted) and waits until it is on the socket.
    pub fn send(&mut self, data: &[u8]) -> Result<(), TlsError> {
        self.conn.writer().write_all(data).map_err(TlsError::Io)?;
        self.flush()
    }

    /// Fills `buf` with the next bytes from the peer.
    pub fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TlsError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(rest) = buf.get_mut(filled..) else {
                break;
            };
            match self.conn.reader().read(rest) {
                Ok(0) => return Err(TlsError::Closed),
                Ok(n) => {
                    filled += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(TlsError::Io(e)),
            }
            let mut io = BoundedIo {
                sock: &self.sock,
                state: &mut self.boundary,
                deadline: self.deadline,
            };
            match self.conn.read_tls(&mut io) {
                Ok(0) => return Err(TlsError::Closed),
                Ok(_) => {}
                Err(e) => return Err(TlsError::Io(e)),
            }
            self.conn
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
            // Alerts or key updates rustls wants to answer.
            self.flush()?;
        }
        Ok(())
    }

    /// Ends the handshake phase: the traffic keys move to the bulk record layer. Nothing may
    /// be pending in either direction (the protocol above makes sure the peer has sent nothing
    /// more; if it did, it broke the protocol).
    pub fn into_record_layer(mut self) -> Result<(RecordReader, RecordWriter), TlsError> {
        self.flush()?;
        let state = self
            .conn
            .process_new_packets()
            .map_err(TlsError::Protocol)?;
        if state.plaintext_bytes_to_read() > 0
            || self.boundary.body_left > 0
            || self.boundary.header_len > 0
        {
            return Err(TlsError::EarlyData);
        }
        // The bulk phase has no handshake deadline.
        self.sock.set_read_timeout(None).map_err(TlsError::Io)?;
        self.sock.set_write_timeout(None).map_err(TlsError::Io)?;
        let secrets = self
            .conn
            .dangerous_extract_secrets()
            .map_err(TlsError::Extract)?;
        record::split(self.sock, secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn pair(ctx: &TlsContext) -> (TlsSession, TlsSession) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sctx = ctx.clone();
        let t = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsSession::accept(&sctx, s, None).unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        let client = TlsSession::connect(ctx, c, "hv2.lab.example.test", None).unwrap();
        (client, t.join().unwrap())
    }

    #[test]
    fn exporter_matches_on_both_ends_and_differs_between_sessions() {
        let ctx = TlsContext::ephemeral().unwrap();
        let (c, s) = pair(&ctx);
        let cb_c = c.channel_binding().unwrap();
        let cb_s = s.channel_binding().unwrap();
        assert_eq!(cb_c, cb_s);
        let (c2, _s2) = pair(&ctx);
        assert_ne!(c2.channel_binding().unwrap(), cb_c);
        let app = cb_c.gss_application_data();
        assert!(app.starts_with(b"tls-exporter:"));
        assert_eq!(app.len(), 13 + 32);
    }

    #[test]
    fn handshake_messages_then_bulk_records_hand_over_exactly() {
        let ctx = TlsContext::ephemeral().unwrap();
        let (mut c, mut s) = pair(&ctx);
        // The client's last handshake-phase message is followed at once by bulk records: the
        // server must not lose them to rustls' buffer.
        let t = thread::spawn(move || {
            let mut b = [0u8; 5];
            s.recv_exact(&mut b).unwrap();
            assert_eq!(&b, b"hello");
            s.send(b"world").unwrap();
            let (mut r, _w) = s.into_record_layer().unwrap();
            let mut got = vec![0u8; 100_000];
            r.read_exact(&mut got).unwrap();
            got
        });
        c.send(b"hello").unwrap();
        let mut b = [0u8; 5];
        c.recv_exact(&mut b).unwrap();
        assert_eq!(&b, b"world");
        let (_r, mut w) = c.into_record_layer().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).unwrap();
        assert_eq!(t.join().unwrap(), data);
    }

    #[test]
    fn a_plain_tcp_peer_fails_the_handshake() {
        let ctx = TlsContext::ephemeral().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsSession::accept(&ctx, s, None)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let r = t.join().unwrap();
        assert!(matches!(r, Err(TlsError::Handshake(_))), "{r:?}");
    }
}
