//! Benchmark of the authenticated channel (prints figures; not a test).
//!
//! ```text
//! eval "$(tests/domain/up)"
//! cargo run --release -p vmgate-auth --example channel_bench [-- --gib 4]
//! ```
//!
//! * time to an authenticated channel (TCP + TLS 1.3 + Kerberos with channel binding +
//!   authorization from a local list), with the service ticket cached and with a KDC round trip
//!   for it (fresh cache holding only the TGT);
//! * bulk throughput over loopback, one stream, sender and receiver on their own threads:
//!   plain TCP, plain rustls (`StreamOwned`), and the channel's record layer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmgate_auth::Secret;
use vmgate_auth::authz::Authorizer;
use vmgate_auth::channel::{
    self, ClientSettings, ConnectRequest, Purpose, Route, ServerSettings, Target,
};
use vmgate_auth::krb::{AcceptedServices, AuthFacts, HostCredentials, Principal, UserCredential};
use vmgate_auth::netfilter::NetworkFilter;
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::TlsContext;

const CHUNK: usize = 1 << 20;

fn var(n: &str) -> String {
    std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: eval \"$(tests/domain/up)\" first"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn pump<R: Read + Send + 'static, W: Write>(mut w: W, mut r: R, total: u64) -> Duration {
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < total {
            let n = r.read(&mut buf).expect("read");
            assert!(n > 0, "early end of stream");
            got += n as u64;
        }
        got
    });
    // Incompressible-looking data (it does not matter for AES-GCM, but be honest).
    let mut buf = vec![0u8; CHUNK];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[0];
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        w.write_all(&buf).expect("write");
        sent += CHUNK as u64;
    }
    w.flush().expect("flush");
    assert_eq!(reader.join().unwrap(), total);
    start.elapsed()
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

fn plain_rustls(total: u64) -> Duration {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["bench".to_owned()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (a, b) = tcp_pair();
    let sconn = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    let cconn =
        rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("bench").unwrap())
            .unwrap();
    let w = rustls::StreamOwned::new(cconn, a);
    let r = rustls::StreamOwned::new(sconn, b);
    pump(w, r, total)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: u64 = args
        .iter()
        .position(|a| a == "--gib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let total = gib << 30;
    let realm = var("VMGATE_REALM");
    let test_dir = PathBuf::from(var("VMGATE_TEST_DIR"));
    let work = std::env::temp_dir().join(format!("vmgate-chan-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // alice's TGT, from the test domain's passwords file.
    let alice = Principal::parse("alice", Some(&realm)).unwrap();
    let pw = std::fs::read_to_string(test_dir.join("passwords"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{alice} ")).map(str::to_owned))
        .expect("alice's password");
    let base_cc = work.join("alice.ccache");
    UserCredential::with_password(&alice, &Secret::new(pw), &base_cc).expect("kinit alice");

    // hv2 in this process, accepting its HOST SPN from the domain's keytab.
    let tls = TlsContext::ephemeral().unwrap();
    let host = HostCredentials::new(
        test_dir.join("keytabs/hv2.keytab"),
        Principal::parse("hv2$", Some(&realm)).unwrap(),
        work.join("hv2-cc"),
    )
    .unwrap();
    let spn = Spn::parse("HOST/hv2.lab.example.test").unwrap();
    let settings = ServerSettings {
        host_name: "hv2".into(),
        realm: realm.clone(),
        tls: tls.clone(),
        credentials: host,
        filter: NetworkFilter::Any,
        authorizer: Authorizer::new("hv2", &realm).allow_principal(alice.clone()),
        handshake_timeout: Duration::from_secs(10),
        max_handshakes: 64,
        migration_filter: None,
        services: AcceptedServices::new(vec![spn.clone()], &realm),
    };
    let listener = TcpListener::bind("127.0.0.12:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let gw = channel::Gateway::new(settings);
    thread::spawn(move || {
        gw.serve(&listener, |r| {
            if let Ok(mut ch) = r {
                let _ = std::io::copy(&mut ch.stream, &mut std::io::sink());
            }
        })
    });
    let client = ClientSettings {
        source: None,
        tls: tls.clone(),
        realm: realm.clone(),
        handshake_timeout: Duration::from_secs(10),
        local_host: Some("bench".into()),
    };
    let req = ConnectRequest {
        target: Target { addr, spn },
        purpose: Purpose::Control,
        forward_tgt: false,
        route: Route::OwnTicket,
        via: String::new(),
        facts: AuthFacts::default(),
    };

    // With a KDC round trip: a fresh copy of the cache (TGT only) each time.
    let mut with_kdc = Vec::new();
    for i in 0..15 {
        let cc = work.join(format!("fresh{i}.ccache"));
        std::fs::copy(&base_cc, &cc).unwrap();
        let t = Instant::now();
        let cred = UserCredential::from_ccache(cc.to_str().unwrap()).unwrap();
        let mut ch = channel::connect(&client, &req, &cred).expect("connect");
        with_kdc.push(t.elapsed().as_secs_f64() * 1e3);
        ch.stream.close().unwrap();
    }
    // Cached service ticket: one cache, warmed by the first connection.
    let cc = work.join("warm.ccache");
    std::fs::copy(&base_cc, &cc).unwrap();
    let cred = UserCredential::from_ccache(cc.to_str().unwrap()).unwrap();
    channel::connect(&client, &req, &cred).expect("warm-up");
    let mut cached = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let mut ch = channel::connect(&client, &req, &cred).expect("connect");
        cached.push(t.elapsed().as_secs_f64() * 1e3);
        ch.stream.close().unwrap();
    }
    // Where the time goes: the pieces of a handshake, in this process, without the network.
    {
        use vmgate_auth::krb::{AcceptPending, AcceptStep, InitOptions, InitPending, InitStep};
        let host2 = HostCredentials::new(
            test_dir.join("keytabs/hv2.keytab"),
            Principal::parse("hv2$", Some(&realm)).unwrap(),
            work.join("hv2-cc2"),
        )
        .unwrap();
        let mut acq = Vec::new();
        let mut init = Vec::new();
        let mut acc = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let (acred, _cc) = host2.acceptor().unwrap();
            acq.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let p = InitPending::new(
                &cred,
                &req.target.spn,
                &realm,
                vec![1; 45],
                InitOptions::default(),
            )
            .unwrap();
            let InitStep::Continue(p, tok) = p.step(None).unwrap() else {
                panic!("one step")
            };
            init.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let AcceptStep::Established(_a, Some(rep)) = AcceptPending::new(
                &acred,
                vec![1; 45],
                &AcceptedServices::new(vec![req.target.spn.clone()], &realm),
            )
            .step(&tok)
            .unwrap() else {
                panic!("one step")
            };
            acc.push(t.elapsed().as_secs_f64() * 1e3);
            let _ = p.step(Some(&rep)).unwrap();
        }
        println!(
            "pieces (median ms): fresh both-ways acceptor cred (host TGT from the keytab) {:.2}, AP-REQ with cached ticket {:.2}, \
             accept {:.2}",
            median(&mut acq),
            median(&mut init),
            median(&mut acc)
        );
    }
    println!(
        "time to an authenticated channel (TCP + TLS 1.3 + Kerberos + channel binding + authz):"
    );
    println!(
        "  cached service ticket : median {:.2} ms  (min {:.2}, n={})",
        median(&mut cached.clone()),
        cached.iter().copied().fold(f64::MAX, f64::min),
        cached.len()
    );
    println!(
        "  with a KDC round trip : median {:.2} ms  (min {:.2}, n={})",
        median(&mut with_kdc.clone()),
        with_kdc.iter().copied().fold(f64::MAX, f64::min),
        with_kdc.len()
    );

    println!(
        "bulk throughput over loopback, one stream, {gib} GiB, {} KiB writes:",
        CHUNK >> 10
    );
    let (a, b) = tcp_pair();
    let d = pump(a, b, total);
    println!("  plain TCP             : {:.2} GiB/s", gib_per_s(total, d));
    let d = plain_rustls(total);
    println!(
        "  plain rustls (StreamOwned, AES-256-GCM default) : {:.2} GiB/s",
        gib_per_s(total, d)
    );
    // The channel's record layer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a2 = l.local_addr().unwrap();
    let t2 = tls.clone();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        vmgate_auth::tls::TlsSession::accept(&t2, s, None)
            .unwrap()
            .into_record_layer()
            .unwrap()
    });
    let c = TcpStream::connect(a2).unwrap();
    let (_cr, cw) = vmgate_auth::tls::TlsSession::connect(&tls, c, "bench", None)
        .unwrap()
        .into_record_layer()
        .unwrap();
    let (sr, _sw) = srv.join().unwrap();
    let d = pump(cw, sr, total);
    println!(
        "  vmgate channel (record layer, AES-128-GCM) : {:.2} GiB/s",
        gib_per_s(total, d)
    );
    // And a fully authenticated channel end to end (the server discards what it reads).
    let ch = channel::connect(&client, &req, &cred).expect("connect");
    let (_r, mut w) = ch.stream.split();
    let buf = vec![7u8; CHUNK];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        w.write_all(&buf).unwrap();
        sent += CHUNK as u64;
    }
    w.close().unwrap();
    println!(
        "  authenticated channel, end to end      : {:.2} GiB/s",
        gib_per_s(total, t.elapsed())
    );
}
