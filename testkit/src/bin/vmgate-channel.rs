//! vmgate-channel: a probe for the authenticated channel (one host per process).
//!
//! ```text
//! vmgate-channel serve   --listen 127.0.0.12:6600 --keytab hv2.keytab --account 'hv2$' \
//!                        --spn "Microsoft Virtual System Migration Service/hv2.lab.example.test" \
//!                        [--allow alice@REALM]... [--allow-group "Hyper-V Administrators" \
//!                        --ldap-url ldaps://... --ldap-ca ca.pem] [--networks 127.0.0.0/8]...
//!                        [--relay-to 127.0.0.12:6600 --relay-spn SPN --auth kerberos|credssp]
//! vmgate-channel connect --to 127.0.0.12:6600 --spn SPN --ccache /tmp/alice.cc [--forward]
//!                        [--send TEXT]
//! vmgate-channel mitm    --listen 127.0.0.19:6600 --to 127.0.0.12:6600 --spn SPN
//! KRB5CCNAME=FILE:/tmp/alice.cc \
//! vmgate-channel unbound --to 127.0.0.12:6600 --spn SPN [--purpose control|migration]
//! ```
//!
//! `unbound` plays a relayed authentication: it runs TLS, then sends an AP-REQ made without
//! channel bindings (as one captured from, or relayed out of, another protocol is), straight
//! from GSSAPI; a vmgate host must refuse it.
//!
//! Every event is one JSON line on stdout (`listening`, `accepted`, `refused`, `relayed`,
//! `relay-failed`, `connected`, `error`, ...); errors carry the Windows code, its name and text,
//! the cause and the fix. `serve` echoes what an accepted client sends (or, with `--relay-to`,
//! acts for the client's user towards the next host and relays the bytes there).
//! Exit status of `connect`: 0 accepted, 2 refused or failed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use vmgate_auth::Diagnosis;
use vmgate_auth::authz::LdapGroups;
use vmgate_auth::channel::{
    self, ChannelError, ClientSettings, ConnectRequest, Gateway, Message, Purpose, Route,
    ServerChannel, Target,
};
use vmgate_auth::delegation::AuthType;
use vmgate_auth::host::server_settings;
use vmgate_auth::krb::{AuthFacts, HostCredentials};
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::{TlsContext, TlsSession};
use vmgate_testkit::args::{AcquireError, CredentialArgs, HostArgs};

#[derive(Parser, Debug)]
#[command(
    name = "vmgate-channel",
    about = "Probe for vmgate's authenticated channel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AuthArg {
    Kerberos,
    Credssp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PurposeArg {
    Control,
    Migration,
}

#[allow(
    clippy::large_enum_variant,
    reason = "the command line, parsed once at start"
)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Accept connections as a host.
    Serve {
        #[command(flatten)]
        host: HostArgs,
        /// Handshake timeout in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Handshakes at once.
        #[arg(long, default_value_t = channel::DEFAULT_MAX_HANDSHAKES)]
        max_handshakes: usize,
        /// Act for each accepted user towards this host (relay mode).
        #[arg(long, requires = "relay_spn")]
        relay_to: Option<SocketAddr>,
        /// The next host's migration SPN.
        #[arg(long)]
        relay_spn: Option<Spn>,
        /// This host's auth type when acting for a user.
        #[arg(long, value_enum, default_value = "kerberos")]
        auth: AuthArg,
    },
    /// Connect as a user (or host) and send a message.
    Connect {
        /// Where to connect.
        #[arg(long)]
        to: SocketAddr,
        /// The target's migration SPN.
        #[arg(long)]
        spn: Spn,
        #[command(flatten)]
        credential: CredentialArgs,
        /// Forward the TGT (credential forwarding).
        #[arg(long)]
        forward: bool,
        /// What for.
        #[arg(long, value_enum, default_value = "control")]
        purpose: PurposeArg,
        /// Text to send (the server echoes it back).
        #[arg(long)]
        send: Option<String>,
        /// Handshake timeout in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Name of this side in messages.
        #[arg(long)]
        local_host: Option<String>,
    },
    /// An initiator without channel bindings (the user of KRB5CCNAME): what a relayed AP-REQ
    /// looks like to the server.
    Unbound {
        /// Where to connect.
        #[arg(long)]
        to: SocketAddr,
        /// The target's SPN.
        #[arg(long)]
        spn: Spn,
        /// The realm.
        #[arg(long, env = "VMGATE_REALM")]
        realm: String,
        /// What for.
        #[arg(long, value_enum, default_value = "control")]
        purpose: PurposeArg,
    },
    /// A man in the middle: terminates TLS on both sides and relays the handshake messages.
    Mitm {
        /// Where clients connect.
        #[arg(long)]
        listen: SocketAddr,
        /// The real server.
        #[arg(long)]
        to: SocketAddr,
        /// The real server's SPN (only its host is used, for SNI).
        #[arg(long)]
        spn: Spn,
    },
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn diag_json(d: &Diagnosis) -> Value {
    serde_json::to_value(d).unwrap_or(Value::Null)
}

fn error_json(event: &str, e: &ChannelError) -> Value {
    json!({
        "event": event,
        "error": e.to_string(),
        "kind": error_kind(e),
        "diagnosis": e.diagnosis().map(|d| diag_json(&d)),
    })
}

fn error_kind(e: &ChannelError) -> &'static str {
    match e {
        ChannelError::Filtered { .. } => "filtered",
        ChannelError::Connect { .. } => "connect",
        ChannelError::Tls { .. } => "tls",
        ChannelError::TimedOut { .. } => "timed-out",
        ChannelError::Protocol { .. } => "protocol",
        ChannelError::Unexpected { .. } => "unexpected",
        ChannelError::Auth { .. } => "auth",
        ChannelError::Refused { .. } => "refused",
        ChannelError::Denied { .. } => "denied",
        ChannelError::Evicted { .. } => "evicted",
        ChannelError::Io { .. } => "io",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmgate_control::logging::init(
        "vmgate-channel",
        tracing::level_filters::LevelFilter::WARN,
        vmgate_control::logging::LogArgs::default(),
    );
    match cli.cmd {
        Cmd::Serve { .. } => serve(cli.cmd),
        Cmd::Connect { .. } => connect(cli.cmd),
        Cmd::Mitm { listen, to, spn } => mitm(listen, to, &spn),
        Cmd::Unbound {
            to,
            spn,
            realm,
            purpose,
        } => unbound(to, &spn, &realm, purpose),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    emit(json!({"event": "error", "error": msg.to_string()}));
    ExitCode::from(2)
}

struct Relay {
    to: SocketAddr,
    spn: Spn,
    auth: AuthType,
    client: ClientSettings,
    host: HostCredentials,
    directory: Option<Arc<LdapGroups>>,
}

#[allow(clippy::too_many_lines)]
fn serve(cmd: Cmd) -> ExitCode {
    let Cmd::Serve {
        host,
        timeout_ms,
        max_handshakes,
        relay_to,
        relay_spn,
        auth,
    } = cmd
    else {
        return fail("internal: not serve");
    };
    let listen = host.listen;
    let host_name = host.host_name();
    let (id, admit) = host.into_parts("vmgate-channel");
    let realm = id.realm.clone();
    // The directory client's GSSAPI bind uses this process's Kerberos credentials: point them at
    // the host's keytab and a private cache (each host is its own process). `ldap://` gets a
    // sealed GSSAPI bind as `ldap/<the URL's host>` (see `vmgate_auth::host`).
    if admit.ldap_url.is_some() {
        set_process_kerberos_env(&id.keytab, &id.ccache_dir.join("ldap.ccache"));
    }
    let timeout = Duration::from_millis(timeout_ms);
    let (settings, directory) = match server_settings(&id, &admit, timeout, max_handshakes) {
        Ok(x) => x,
        Err(e) => return fail(vmgate_control::error::chain(&e)),
    };
    let tls = settings.tls.clone();
    let creds = settings.credentials.clone();
    let relay = match (relay_to, relay_spn) {
        (Some(to), Some(spn)) => Some(Arc::new(Relay {
            to,
            spn,
            auth: match auth {
                AuthArg::Kerberos => AuthType::Kerberos,
                AuthArg::Credssp => AuthType::Credssp,
            },
            client: ClientSettings {
                source: None,
                tls,
                realm,
                handshake_timeout: timeout,
                local_host: Some(host_name),
            },
            host: creds,
            directory,
        })),
        _ => None,
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    emit(json!({"event": "listening", "addr": bound, "pid": std::process::id()}));
    let gw = Gateway::new(settings);
    let result = gw.serve(&listener, move |r| match r {
        Ok(ch) => on_channel(ch, relay.as_deref()),
        Err(e) => emit(error_json("refused", &e)),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("accept failed: {e}")),
    }
}

/// Sets KRB5_CLIENT_KTNAME and KRB5CCNAME for this process (for the LDAP GSSAPI bind).
fn set_process_kerberos_env(keytab: &std::path::Path, ccache: &std::path::Path) {
    // SAFETY: called from `serve` before the gateway, the directory client or any other thread
    // is started: this process is single-threaded here, so no other thread can read the
    // environment while it changes.
    unsafe { vmgate_testkit::args::use_host_keytab_for_ldap(keytab, ccache) }
}

fn accepted_json(ch: &ServerChannel) -> Value {
    let p = ch.peer();
    json!({
        "event": "accepted",
        "peer": p.addr().to_string(),
        "principal": p.principal().to_string(),
        "route": p.obtained().route,
        "via": p.obtained().via,
        "tgt_forwarded": p.obtained().tgt_forwarded,
        "delegated": ch.delegated().map(|c| c.kind()),
        "purpose": ch.purpose(),
    })
}

fn on_channel(mut ch: ServerChannel, relay: Option<&Relay>) {
    emit(accepted_json(&ch));
    let Some(relay) = relay else {
        // Echo: read everything, send it back, close.
        let mut data = Vec::new();
        let r = (&mut ch.stream)
            .take(16 * 1024 * 1024)
            .read_to_end(&mut data);
        if let Err(e) = r {
            emit(json!({"event": "stream-error", "error": e.to_string()}));
            return;
        }
        let _ = ch.stream.write_all(&data);
        let _ = ch.stream.close();
        emit(json!({"event": "echoed", "bytes": data.len()}));
        return;
    };
    let target = Target {
        addr: relay.to,
        spn: relay.spn.clone(),
    };
    let enrich = |f: &mut AuthFacts| enrich_from_directory(relay, f);
    let started = Instant::now();
    let res = channel::act_for_user(
        &relay.client,
        &relay.host,
        &ch.acting(),
        relay.auth,
        &target,
        Purpose::Migration,
        Some(&enrich),
    );
    match res {
        Ok((next, method)) => {
            emit(json!({
                "event": "relayed",
                "as": ch.peer().principal().to_string(),
                "method": method,
                "accepted_as": next.accepted_as,
                "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
            }));
            pipe(ch, next.stream);
        }
        Err(e) => {
            emit(error_json("relay-failed", &e));
            // Tell the client: it reads end of stream after the refusal text.
            if let Some(d) = e.diagnosis() {
                let _ = ch
                    .stream
                    .write_all(format!("RELAY-FAILED {}\n", d.code.hex()).as_bytes());
            }
            let _ = ch.stream.close();
            // Read what the client still sends, so closing does not reset the connection
            // under its feet.
            let _ = ch.stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = io::copy(&mut (&mut ch.stream).take(1 << 20), &mut io::sink());
        }
    }
}

fn pipe(ch: ServerChannel, next: channel::AuthenticatedStream) {
    let (mut from_client, mut to_client) = ch.stream.split();
    let (mut from_next, mut to_next) = next.split();
    let up = thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut to_next);
        let _ = to_next.close();
    });
    let _ = io::copy(&mut from_next, &mut to_client);
    let _ = to_client.close();
    let _ = up.join();
}

/// Reads delegation facts from the directory to explain a refused delegation.
fn enrich_from_directory(relay: &Relay, facts: &mut AuthFacts) {
    let Some(dir) = &relay.directory else {
        return;
    };
    if let Ok(Some(acct)) = dir.account(relay.host.account().name()) {
        facts.allowed_to_delegate_to = Some(acct.allowed_to_delegate_to.clone());
        facts.trusted_to_auth = Some(acct.user_account_control & 0x0100_0000 != 0);
    }
    if let Some(user) = &facts.user {
        if let Ok(Some(u)) = dir.account(user.name()) {
            facts.user_not_delegable = Some(u.user_account_control & 0x0010_0000 != 0);
        }
    }
}

#[allow(clippy::too_many_lines)]
fn connect(cmd: Cmd) -> ExitCode {
    let Cmd::Connect {
        to,
        spn,
        credential,
        forward,
        purpose,
        send,
        timeout_ms,
        local_host,
    } = cmd
    else {
        return fail("internal: not connect");
    };
    let tls = match TlsContext::ephemeral() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let realm = credential.realm.clone();
    let ccache_name = credential.ccache.clone();
    let (cred, _cache) = match credential.acquire("vmgate-channel-c") {
        Ok(c) => c,
        Err(AcquireError::Ccache(e)) => {
            let facts = AuthFacts {
                ccache: ccache_name,
                realm: Some(realm),
                ..AuthFacts::default()
            };
            let d = vmgate_auth::krb::diagnose(&e, &facts);
            emit(
                json!({"event": "error", "error": d.to_string(), "kind": "auth", "diagnosis": diag_json(&d)}),
            );
            return ExitCode::from(2);
        }
        Err(e) => return fail(e),
    };
    let settings = ClientSettings {
        source: None,
        tls,
        realm: realm.clone(),
        handshake_timeout: Duration::from_millis(timeout_ms),
        local_host: local_host.clone(),
    };
    let req = ConnectRequest {
        target: Target {
            addr: to,
            spn: spn.clone(),
        },
        purpose: match purpose {
            PurposeArg::Control => Purpose::Control,
            PurposeArg::Migration => Purpose::Migration,
        },
        forward_tgt: forward,
        route: Route::OwnTicket,
        via: String::new(),
        facts: AuthFacts {
            local_host,
            ccache: ccache_name,
            realm: Some(realm),
            ..AuthFacts::default()
        },
    };
    let mut ch = match channel::connect(&settings, &req, &cred) {
        Ok(c) => c,
        Err(e) => {
            emit(error_json("error", &e));
            return ExitCode::from(2);
        }
    };
    let mut event = json!({
        "event": "connected",
        "accepted_as": ch.accepted_as,
        "server_spn": ch.server_spn.to_string(),
        "tgt_forwarded": ch.tgt_forwarded,
        "elapsed_ms": ch.elapsed.as_secs_f64() * 1000.0,
    });
    if let Some(text) = send {
        // A server that refuses early may stop reading; what it sent back still counts.
        let sent = ch
            .stream
            .write_all(text.as_bytes())
            .and_then(|()| ch.stream.close());
        let mut back = Vec::new();
        let r = (&mut ch.stream).take(1 << 20).read_to_end(&mut back);
        if let Err(e) = sent {
            event["send_error"] = Value::String(e.to_string());
        }
        match r {
            Ok(_) => {
                event["echo"] = Value::String(String::from_utf8_lossy(&back).into_owned());
            }
            Err(e) => {
                event["stream_error"] = Value::String(e.to_string());
            }
        }
    }
    emit(event);
    ExitCode::SUCCESS
}

/// TLS, then an AP-REQ without channel bindings from the default credential cache, then the
/// request; prints `connected` or the server's refusal like `connect` does.
fn unbound(to: SocketAddr, spn: &Spn, realm: &str, purpose: PurposeArg) -> ExitCode {
    use libgssapi::context::{ClientCtx, CtxFlags};
    use libgssapi::credential::{Cred, CredUsage};
    use libgssapi::name::Name;
    use libgssapi::oid::{GSS_MECH_KRB5, GSS_NT_KRB5_PRINCIPAL, OidSet};

    let peer = to.to_string();
    let refused = |diagnosis: Diagnosis| {
        emit(error_json(
            "error",
            &ChannelError::Refused {
                peer: peer.clone(),
                diagnosis,
            },
        ));
        ExitCode::from(2)
    };
    let Ok(tls) = TlsContext::ephemeral() else {
        return fail("no TLS context");
    };
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    let session = TcpStream::connect(to)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            TlsSession::connect(&tls, s, spn.host(), deadline).map_err(|e| e.to_string())
        });
    let mut session = match session {
        Ok(s) => s,
        Err(e) => return fail(format!("TLS to {to}: {e}")),
    };
    let mut mechs = OidSet::new();
    let cred = mechs
        .add(GSS_MECH_KRB5)
        .and_then(|()| Cred::acquire(None, None, CredUsage::Initiate, Some(&mechs)));
    let cred = match cred {
        Ok(c) => c,
        Err(e) => return fail(format!("no credential in KRB5CCNAME: {e}")),
    };
    let target = spn.principal(realm);
    let name = match Name::new(target.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL)) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let mut ctx = ClientCtx::new(
        Some(cred),
        name,
        CtxFlags::GSS_C_MUTUAL_FLAG | CtxFlags::GSS_C_INTEG_FLAG | CtxFlags::GSS_C_CONF_FLAG,
        Some(GSS_MECH_KRB5),
    );
    // No channel bindings: the point of this probe.
    let token = match ctx.step(None, None) {
        Ok(Some(t)) => t.to_vec(),
        Ok(None) => return fail("GSSAPI gave no token"),
        Err(e) => return fail(format!("getting a ticket for {target}: {e}")),
    };
    let send = |s: &mut TlsSession, m: &Message| s.send(&vmgate_auth::channel::wire::encode(m));
    if send(&mut session, &Message::GssToken(token)).is_err() {
        return fail("the server closed the connection");
    }
    match read_frame(&mut session) {
        Some(Message::GssToken(reply)) => {
            if let Err(e) = ctx.step(Some(&reply), None) {
                return fail(format!("the server's reply did not verify: {e}"));
            }
        }
        Some(Message::Refused(d)) => return refused(d),
        other => return fail(format!("unexpected answer: {other:?}")),
    }
    let request = Message::Request {
        version: vmgate_auth::channel::wire::VERSION,
        purpose: match purpose {
            PurposeArg::Control => Purpose::Control,
            PurposeArg::Migration => Purpose::Migration,
        },
        route: Route::OwnTicket,
        via: String::new(),
    };
    if send(&mut session, &request).is_err() {
        return fail("the server closed the connection");
    }
    match read_frame(&mut session) {
        Some(Message::Accepted { principal }) => {
            emit(json!({"event": "connected", "accepted_as": principal, "bound": false}));
            ExitCode::SUCCESS
        }
        Some(Message::Refused(d)) => refused(d),
        other => fail(format!("unexpected answer: {other:?}")),
    }
}

/// Terminates TLS towards the client and towards the server and relays the handshake
/// messages unchanged (what an attacker with a valid certificate for the path would do).
fn mitm(listen: SocketAddr, to: SocketAddr, spn: &Spn) -> ExitCode {
    let tls = match TlsContext::ephemeral() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    emit(json!({"event": "listening", "addr": bound, "pid": std::process::id()}));
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let tls = tls.clone();
        let host = spn.host().to_owned();
        thread::spawn(move || {
            let outcome = mitm_one(&tls, client, to, &host);
            emit(json!({"event": "mitm-done", "relayed_messages": outcome.0, "last": outcome.1}));
        });
    }
    ExitCode::SUCCESS
}

fn mitm_one(tls: &TlsContext, client: TcpStream, to: SocketAddr, host: &str) -> (usize, String) {
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    let Ok(mut c) = TlsSession::accept(tls, client, deadline) else {
        return (0, "client TLS failed".into());
    };
    let Ok(sock) = TcpStream::connect(to) else {
        return (0, "server connect failed".into());
    };
    let Ok(mut s) = TlsSession::connect(tls, sock, host, deadline) else {
        return (0, "server TLS failed".into());
    };
    let mut n = 0;
    // client → server: token; server → client: answer; until someone stops.
    loop {
        let Some(m) = read_frame(&mut c) else {
            return (n, "client closed".into());
        };
        if s.send(&vmgate_auth::channel::wire::encode(&m)).is_err() {
            return (n, "server closed".into());
        }
        n += 1;
        let Some(answer) = read_frame(&mut s) else {
            return (n, "server closed".into());
        };
        let refused = matches!(answer, Message::Refused(_));
        let _ = c.send(&vmgate_auth::channel::wire::encode(&answer));
        n += 1;
        if refused {
            return (n, "server refused".into());
        }
    }
}

fn read_frame(s: &mut TlsSession) -> Option<Message> {
    let mut prefix = [0u8; 4];
    s.recv_exact(&mut prefix).ok()?;
    let len = vmgate_auth::channel::wire::frame_len(prefix).ok()?;
    let mut body = vec![0u8; len];
    s.recv_exact(&mut body).ok()?;
    vmgate_auth::channel::wire::decode(&body).ok()
}
