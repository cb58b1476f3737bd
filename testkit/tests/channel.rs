//! The authenticated channel against a real Samba AD DC: hosts hv1/hv2/hv3 run as separate
//! processes (`vmgate-channel serve`) on 127.0.0.11–13, each with its own keytab; users connect
//! with `vmgate-channel connect` and their own credential caches.
//!
//! Needs the test domain: run through `tests/run` (or `eval "$(tests/domain/up)"` first).

use vmgate_testkit::channel as common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn code(v: &Value) -> &str {
    v["diagnosis"]["code"].as_str().unwrap_or("")
}

fn cause(v: &Value) -> &str {
    v["diagnosis"]["cause"].as_str().unwrap_or("")
}

fn fix(v: &Value) -> &str {
    v["diagnosis"]["fix"].as_str().unwrap_or("")
}

/// A TCP relay that records every byte it forwards (the "capture" of the stream).
fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
            thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap(), s2.clone());
        let t2 = pump(b, a, s2);
        let _ = t1.join();
        let _ = t2.join();
    });
    (addr, seen)
}

#[test]
fn t01_alice_to_hv2_directly_is_accepted_and_encrypted() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let (relay, seen) = recording_relay(hv2.addr);
    let cc = user_ccache("alice", "t01");
    let marker = "VMGATE-PLAINTEXT-MARKER-7f3a9c";
    let (out, ok) = connect(relay, "hv2", &cc, &["--send", marker], &[], &[]);
    assert!(ok, "{out}");
    assert_eq!(out["event"], "connected");
    assert_eq!(out["accepted_as"], format!("alice@{}", env().realm));
    assert_eq!(out["echo"], marker, "data round-trips");
    let acc = hv2
        .events
        .wait_for("hv2 accepts alice", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(acc["principal"], "alice@LAB.EXAMPLE.TEST");
    assert_eq!(acc["route"], "own-ticket");
    // hv2 accepted with a both-ways credential: alice's forwardable ticket is kept as evidence.
    assert_eq!(acc["delegated"], "evidence");
    hv2.events
        .wait_for("echo", Duration::from_secs(5), |v| v["event"] == "echoed");
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 1000,
        "the capture holds the exchange ({} bytes)",
        seen.len()
    );
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the plaintext marker must not appear on the wire"
    );
    assert!(
        !seen.windows(5).any(|w| w == b"alice"),
        "not even the user name travels in clear"
    );
}

#[test]
fn t02_carol_is_denied_naming_the_group() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let cc = user_ccache("carol", "t02");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &[], &[], &[]);
    assert!(!ok);
    assert_eq!(out["kind"], "refused", "{out}");
    assert_eq!(code(&out), "0x80070005");
    assert_eq!(out["diagnosis"]["name"], "E_ACCESSDENIED");
    assert!(
        cause(&out).contains("carol is not a member of \"Hyper-V Administrators\""),
        "{out}"
    );
    assert!(
        fix(&out).starts_with("samba-tool group addmembers \"Hyper-V Administrators\" carol"),
        "{out}"
    );
    let ev = hv2
        .events
        .wait_for("hv2 denies carol", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "denied"
        });
    assert_eq!(code(&ev), "0x80070005");
    // Display prints everything: code, name, text, cause, fix.
    let text = out["error"].as_str().unwrap();
    assert!(
        text.contains("error 0x80070005 (E_ACCESSDENIED): Access is denied."),
        "{text}"
    );
    assert!(
        text.contains("\n  cause: ") && text.contains("\n  fix:   "),
        "{text}"
    );
}

#[test]
fn t03_alice_through_hv1_to_hv2_with_constrained_delegation() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let mut s1 = Serve::new("hv1", "127.0.0.11", &h.keytab["hv1"]);
    s1.relay_to = Some((hv2.addr, spn("hv2")));
    let hv1 = s1.start();
    let cc = user_ccache("alice", "t03");
    let (out, ok) = connect(hv1.addr, "hv1", &cc, &["--send", "through hv1"], &[], &[]);
    assert!(ok, "{out}");
    assert_eq!(
        out["echo"], "through hv1",
        "bytes went alice → hv1 → hv2 and back"
    );
    let relayed = hv1
        .events
        .wait_for("hv1 relays", Duration::from_secs(10), |v| {
            v["event"] == "relayed" || v["event"] == "relay-failed"
        });
    assert_eq!(relayed["event"], "relayed", "{relayed}");
    assert_eq!(relayed["method"], "constrained-delegation");
    let acc = hv2
        .events
        .wait_for("hv2 accepts", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(
        acc["principal"], "alice@LAB.EXAMPLE.TEST",
        "hv2 sees alice, not hv1"
    );
    assert_eq!(acc["route"], "constrained-delegation");
    assert_eq!(acc["via"], "hv1");
}

#[test]
fn t04_through_hv3_without_delegation_is_refused_with_the_fix() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let mut s3 = Serve::new("hv3", "127.0.0.13", &h.keytab["hv3"]);
    s3.relay_to = Some((hv2.addr, spn("hv2")));
    let hv3 = s3.start();
    let cc = user_ccache("alice", "t04");
    let (out, _) = connect(hv3.addr, "hv3", &cc, &["--send", "x"], &[], &[]);
    assert_eq!(out["echo"], "RELAY-FAILED 0x8009030E\n", "{out}");
    let ev = hv3
        .events
        .wait_for("hv3 fails", Duration::from_secs(10), |v| {
            v["event"] == "relay-failed"
        });
    assert_eq!(code(&ev), "0x8009030E", "{ev}");
    assert_eq!(ev["diagnosis"]["name"], "SEC_E_NO_CREDENTIALS");
    let c = cause(&ev);
    assert!(c.contains("HV3$"), "{c}");
    assert!(c.contains(&spn("hv2")), "{c}");
    assert!(
        c.contains("msDS-AllowedToDelegateTo on HV3$ does not list it"),
        "{c}"
    );
    assert!(
        fix(&ev).starts_with(&format!(
            "vmgate delegation add-service hv3 \"{}\"",
            spn("hv2")
        )),
        "{ev}"
    );
    assert_eq!(hv2.events.count(|v| v["event"] == "accepted"), 0);
}

#[test]
fn t05_bob_is_sensitive_and_cannot_be_delegated() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let mut s1 = Serve::new("hv1", "127.0.0.11", &h.keytab["hv1"]);
    s1.relay_to = Some((hv2.addr, spn("hv2")));
    let hv1 = s1.start();
    let cc = user_ccache("bob", "t05");
    let (out, _) = connect(hv1.addr, "hv1", &cc, &["--send", "x"], &[], &[]);
    assert_eq!(out["echo"], "RELAY-FAILED 0x8009030E\n", "{out}");
    let acc = hv1
        .events
        .wait_for("hv1 accepts bob", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(acc["principal"], "bob@LAB.EXAMPLE.TEST");
    let ev = hv1
        .events
        .wait_for("hv1 fails", Duration::from_secs(10), |v| {
            v["event"] == "relay-failed"
        });
    assert_eq!(code(&ev), "0x8009030E", "{ev}");
    assert!(
        cause(&ev).contains("bob's account is sensitive and cannot be delegated"),
        "{ev}"
    );
    assert!(
        fix(&ev).starts_with("vmgate delegation sensitive bob off"),
        "{ev}"
    );
    // hv1 saw that bob's ticket is not forwardable and did not even try hv2.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        hv2.events.count(|v| v["event"] != "listening"),
        0,
        "{:#?}",
        hv2.events.all()
    );
}

#[test]
fn t06_credssp_needs_forwarded_credentials() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let mut s3 = Serve::new("hv3", "127.0.0.13", &h.keytab["hv3"]);
    s3.relay_to = Some((hv2.addr, spn("hv2")));
    s3.auth = "credssp";
    let hv3 = s3.start();
    // With forwarding: accepted without any delegation configured on HV3$.
    let cc = user_ccache("alice", "t06a");
    let (out, ok) = connect(
        hv3.addr,
        "hv3",
        &cc,
        &["--forward", "--send", "fwd"],
        &[],
        &[],
    );
    assert!(ok, "{out}");
    assert_eq!(out["tgt_forwarded"], true);
    assert_eq!(out["echo"], "fwd", "{out}");
    let acc3 = hv3
        .events
        .wait_for("hv3 accepts", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(acc3["tgt_forwarded"], true);
    assert_eq!(acc3["delegated"], "forwarded-tgt");
    let relayed = hv3
        .events
        .wait_for("hv3 relays", Duration::from_secs(10), |v| {
            v["event"] == "relayed" || v["event"] == "relay-failed"
        });
    assert_eq!(relayed["method"], "forwarded-tgt", "{relayed}");
    let acc2 = hv2
        .events
        .wait_for("hv2 accepts", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(acc2["principal"], "alice@LAB.EXAMPLE.TEST");
    assert_eq!(acc2["route"], "forwarded-tgt");
    // Without forwarding: 0x8009030E explaining CredSSP.
    let cc = user_ccache("alice", "t06b");
    let (out, _) = connect(hv3.addr, "hv3", &cc, &["--send", "x"], &[], &[]);
    assert_eq!(out["echo"], "RELAY-FAILED 0x8009030E\n", "{out}");
    let ev = hv3
        .events
        .wait_for("hv3 fails", Duration::from_secs(10), |v| {
            v["event"] == "relay-failed"
        });
    assert_eq!(code(&ev), "0x8009030E");
    assert!(
        cause(&ev).contains("CredSSP, which needs alice's credentials on hv3"),
        "{ev}"
    );
    assert!(fix(&ev).contains("--forward-credentials"), "{ev}");
}

#[test]
fn t07_missing_spn_is_target_unknown_with_setspn() {
    // A fresh host account (HV7$): register the SPN, export the keytab, then remove the SPN.
    create_computer("hv7", &[spn("hv7")]);
    let kt = export_keytab("hv7", &[spn("hv7")]);
    let hv7 = Serve::new("hv7", "127.0.0.17", &kt).start();
    set_spns("hv7", &[]);
    let cc = user_ccache("alice", "t07");
    let (out, ok) = connect(hv7.addr, "hv7", &cc, &[], &[], &[]);
    assert!(!ok);
    assert_eq!(out["kind"], "auth", "{out}");
    assert_eq!(code(&out), "0x80090303");
    assert_eq!(out["diagnosis"]["name"], "SEC_E_TARGET_UNKNOWN");
    assert!(
        cause(&out).contains(&format!("\"{}\"", spn("hv7"))),
        "{out}"
    );
    assert_eq!(fix(&out), format!("setspn -S \"{}\" HV7", spn("hv7")));
    drop(hv7);
    ldapdelete_if_exists(&computer_dn("hv7"));
}

#[test]
fn t08_spn_moved_to_another_account_is_wrong_principal() {
    create_computer("hv8", &[spn("hv8")]);
    create_computer("hv8b", &[]);
    let kt = export_keytab("hv8", &[spn("hv8")]);
    let hv8 = Serve::new("hv8", "127.0.0.18", &kt).start();
    // Move the SPN to HV8B$: the KDC now encrypts tickets for it with HV8B$'s key.
    set_spns("hv8", &[]);
    set_spns("hv8b", &[spn("hv8")]);
    let cc = user_ccache("alice", "t08");
    let (out, ok) = connect(hv8.addr, "hv8", &cc, &[], &[], &[]);
    assert!(!ok);
    assert_eq!(
        out["kind"], "refused",
        "hv8 refuses the ticket it cannot decrypt: {out}"
    );
    assert_eq!(code(&out), "0x80090322", "{out}");
    assert_eq!(out["diagnosis"]["name"], "SEC_E_WRONG_PRINCIPAL");
    assert!(cause(&out).contains(&spn("hv8")), "{out}");
    assert!(
        fix(&out).contains(&format!("setspn -S \"{}\" HV8", spn("hv8"))),
        "{out}"
    );
    let ev = hv8
        .events
        .wait_for("hv8 refuses", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "auth"
        });
    assert_eq!(code(&ev), "0x80090322");
    drop(hv8);
    ldapdelete_if_exists(&computer_dn("hv8"));
    ldapdelete_if_exists(&computer_dn("hv8b"));
}

fn krb5_conf_copy(name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let e = env();
    let text = std::fs::read_to_string(&e.krb5_config).unwrap();
    let p = e.work.join(name);
    std::fs::write(&p, edit(&text)).unwrap();
    p
}

#[test]
fn t09_kdc_unreachable_and_clock_skew() {
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let dc = &env().dc_ip;
    // No KDC listens at 127.0.0.59 (the shared DC keeps running).
    let dead = krb5_conf_copy("krb5-nokdc.conf", |t| {
        t.replace(&format!("{dc}:88"), "127.0.0.59:88")
            .replace(&format!("admin_server = {dc}"), "admin_server = 127.0.0.59")
    });
    let cc = user_ccache("alice", "t09a");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &[], &[("KRB5_CONFIG", &dead)], &[]);
    assert!(!ok);
    assert_eq!(code(&out), "0x80090311", "{out}");
    assert_eq!(
        out["diagnosis"]["name"],
        "SEC_E_NO_AUTHENTICATING_AUTHORITY"
    );
    // Ten minutes ahead with kdc_timesync = 0: the KDC refuses the skewed request.
    let skew = krb5_conf_copy("krb5-skew.conf", |t| {
        t.replace("[libdefaults]", "[libdefaults]\n    kdc_timesync = 0")
    });
    let cc = user_ccache("alice", "t09b");
    let (out, ok) = connect(
        hv2.addr,
        "hv2",
        &cc,
        &[],
        &[("KRB5_CONFIG", &skew)],
        &["faketime", "-f", "+10m"],
    );
    assert!(!ok);
    assert_eq!(code(&out), "0x80090324", "{out}");
    assert_eq!(out["diagnosis"]["name"], "SEC_E_TIME_SKEW");
    assert!(fix(&out).contains("chronyc makestep"), "{out}");
}

/// A TLS client that does not speak Kerberos (for the hostile-peer tests).
fn tls_client(addr: SocketAddr) -> vmgate_auth::tls::TlsSession {
    let ctx = vmgate_auth::tls::TlsContext::ephemeral().unwrap();
    let s = TcpStream::connect(addr).unwrap();
    vmgate_auth::tls::TlsSession::connect(&ctx, s, "hv2.lab.example.test", None).unwrap()
}

fn closed_within(mut s: TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("not closed within {limit:?}: {e}"),
        }
    }
}

#[test]
fn t10_hostile_peers() {
    let h = hosts();
    let mut s = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]);
    s.timeout_ms = 1000;
    s.max_handshakes = 32;
    let mut hv2 = s.start();
    let alice = user_ccache("alice", "t10");
    // Warm up (one full handshake with a group lookup) before measuring memory.
    let (out, ok) = connect(hv2.addr, "hv2", &alice, &["--send", "warm"], &[], &[]);
    assert!(ok, "{out}");
    let rss_before = hv2.rss_kib();

    // Garbage after TLS: a frame that is not a message, and a token that is not Kerberos.
    let mut t = tls_client(hv2.addr);
    t.send(&[0, 0, 0, 3, 9, 9, 9]).unwrap();
    hv2.events
        .wait_for("unknown message refused", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "protocol"
        });
    let mut t = tls_client(hv2.addr);
    let mut garbage = vec![0, 0, 0xf0, 0x01, 1];
    garbage.extend((0..0xf000u32).map(|i| (i * 31 % 251) as u8));
    t.send(&garbage).unwrap();
    hv2.events
        .wait_for("garbage token refused", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "auth"
        });
    // Oversized: a length prefix of 4 GiB and of 64 KiB + 1 — refused before allocation.
    for prefix in [[0xff, 0xff, 0xff, 0xff], [0, 1, 0, 1]] {
        let mut t = tls_client(hv2.addr);
        t.send(&prefix).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while hv2.events.count(|v| v["kind"] == "protocol") < 3 {
        assert!(Instant::now() < deadline, "{:#?}", hv2.events.all());
        thread::sleep(Duration::from_millis(20));
    }

    // A man in the middle that terminates TLS on both sides and relays the tokens.
    let mitm = spawn(
        "mitm",
        &[
            "mitm".into(),
            "--listen".into(),
            "127.0.0.19:0".into(),
            "--to".into(),
            hv2.addr.to_string(),
            "--spn".into(),
            spn("hv2"),
        ],
        &[],
    );
    let cc = user_ccache("alice", "t10m");
    let (out, ok) = connect(mitm.addr, "hv2", &cc, &[], &[], &[]);
    assert!(!ok, "the relayed authentication must fail: {out}");
    assert_eq!(out["kind"], "refused", "{out}");
    assert_eq!(code(&out), "0x80090346", "{out}");
    let ev = hv2
        .events
        .wait_for("bindings refused", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["diagnosis"]["code"] == "0x80090346"
        });
    assert!(cause(&ev).contains("different TLS session"), "{ev}");
    assert_eq!(
        hv2.events.count(|v| v["event"] == "accepted"),
        1,
        "only the warm-up"
    );

    // A client that connects and sends nothing: cut off after the 1 s handshake budget.
    let idle = TcpStream::connect(hv2.addr).unwrap();
    let took = closed_within(idle, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    hv2.events
        .wait_for("timeout reported", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "timed-out"
        });

    // 200 idle connections at once; a legitimate client still gets through.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(hv2.addr).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(100));
    let cc = user_ccache("alice", "t10b");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &["--send", "still here"], &[], &[]);
    assert!(ok, "{out}");
    assert_eq!(out["echo"], "still here");
    drop(idle);
    thread::sleep(Duration::from_millis(1500));
    assert!(hv2.alive(), "the server survived");
    let rss_after = hv2.rss_kib();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    drop(mitm);
}

#[test]
fn t10_peer_outside_allowed_networks_is_closed_before_tls() {
    let h = hosts();
    let mut s = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]);
    s.networks = "10.0.0.0/8";
    let hv2 = s.start();
    let sock = TcpStream::connect(hv2.addr).unwrap();
    let took = closed_within(sock, Duration::from_secs(2));
    assert!(took < Duration::from_millis(500), "{took:?}");
    let ev = hv2
        .events
        .wait_for("filtered", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "filtered"
        });
    assert!(ev["error"].as_str().unwrap().contains("10.0.0.0/8"), "{ev}");
    // A real client gets no further than TCP.
    let cc = user_ccache("alice", "t10f");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &[], &[], &[]);
    assert!(!ok);
    assert!(matches!(out["kind"].as_str(), Some("tls" | "io")), "{out}");
}

#[test]
fn t11_unusable_keytabs_are_unknown_credentials() {
    let h = hosts();
    // hv2 started with a keytab that does not exist: it refuses every client with 0x8009030D.
    let missing = env().work.join("no-such.keytab");
    let hv2 = Serve::new("hv2", "127.0.0.12", &missing).start();
    let cc = user_ccache("alice", "t11a");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &[], &[], &[]);
    assert!(!ok);
    assert_eq!(out["kind"], "refused", "{out}");
    assert_eq!(code(&out), "0x8009030D", "{out}");
    assert_eq!(out["diagnosis"]["name"], "SEC_E_UNKNOWN_CREDENTIALS");
    assert!(cause(&out).contains("no-such.keytab"), "{out}");
    // The fix runs on hv2 itself (a member host): vmgate's keytab refresh of that keytab.
    assert!(
        fix(&out).starts_with(&format!(
            "on hv2: vmgate host keytab refresh --keytab {} --account HV2$ --reset",
            missing.display()
        )),
        "{out}"
    );
    drop(hv2);
    // hv2 started with hv3's keytab: no key for hv2's SPN at all.
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv3"]).start();
    let cc = user_ccache("alice", "t11b");
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &[], &[], &[]);
    assert!(!ok);
    assert_eq!(out["kind"], "refused", "{out}");
    // MIT: "Request ticket server ... not found in keytab" (KRB_AP_ERR_NOT_US).
    assert_eq!(code(&out), "0x8009030D", "{out}");
    assert!(cause(&out).contains(&spn("hv2")), "{out}");
    assert!(
        fix(&out).contains("on hv2: vmgate host keytab refresh"),
        "{out}"
    );
    assert!(!fix(&out).contains("samba-tool"), "{out}");
}

#[test]
fn t12_wrong_password_is_logon_denied() {
    use vmgate_auth::krb::{Act, AuthFacts, Principal, UserCredential, diagnose};
    let e = env();
    let alice = Principal::parse("alice", Some(&e.realm)).unwrap();
    let cc = e.work.join("t12.ccache");
    // KRB5_CONFIG is process-wide and points at the test domain (set by tests/run).
    let err = UserCredential::with_password(&alice, &vmgate_auth::Secret::new("wrong"), &cc)
        .expect_err("a wrong password must fail");
    let d = diagnose(
        &err,
        &AuthFacts {
            act: Act::Connect,
            user: Some(alice),
            ..AuthFacts::default()
        },
    );
    assert_eq!(d.code.hex(), "0x8009030C", "{d}");
    assert!(d.cause.contains("wrong password"), "{d}");
    assert!(!cc.exists());
}
