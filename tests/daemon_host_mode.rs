//! Host-identity mode through vmgated (`[migration] auth = "host"`): the destination accepts a
//! source host's own identity only when the source is one of its `peer_hosts`, a host
//! principal never gets the control API, and refused logons are in the event log (10011).
//! Run through tests/run, or after `eval "$(tests/domain/up)"`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_control::events::Event;
use vmgate_testkit::lab::{Lab, chan, memstress_vm};

/// The channel probe.
fn probe() -> PathBuf {
    vmgate_testkit::bin("vmgate-channel")
}

fn wait_listed(lab: &Lab, host: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.host(host).vm_names().iter().any(|n| n == vm) {
        assert!(Instant::now() < deadline, "{host} never listed {vm}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `host` connects to hv2's gateway with its own keytab for `purpose`; returns the probe's
/// last JSON line.
fn as_host(lab: &Lab, host: &str, purpose: &str) -> Value {
    let e = chan::env();
    let hv2 = lab.host("hv2");
    let out = Command::new(probe())
        .args(["connect", "--to"])
        .arg(format!("{}:{}", hv2.ip, hv2.port))
        .arg("--spn")
        .arg(chan::spn("hv2"))
        .arg("--keytab")
        .arg(&chan::hosts().keytab[host])
        .arg("--account")
        .arg(format!("{host}$"))
        .args(["--purpose", purpose])
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("VMGATE_REALM", &e.realm)
        .env_remove("KRB5CCNAME")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap()
}

#[test]
fn host_mode_moves_come_only_from_peer_hosts_and_hosts_never_get_the_control_api() {
    let lab = Lab::start(&["hv1", "hv2", "hv3"], &|h| match h {
        "hv2" => "peer_hosts = [\"hv1\"]\n".into(),
        _ => "auth = \"host\"\n".into(),
    });
    lab.create_vm("hv1", &memstress_vm("hm1", 128, 16, ""));
    lab.create_vm("hv3", &memstress_vm("hm3", 128, 16, ""));

    // hv1 is a peer of hv2: its move, authenticated as HV1$, goes through.
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv1", "--remote", "move", "hm1", "--to", "hv2"],
    );
    assert_eq!(code, 0, "{v}");
    wait_listed(&lab, "hv2", "hm1");
    assert!(lab.host("hv1").vm_names().is_empty());

    // hv3 is not: refused with E_ACCESSDENIED naming the peer list; the VM stays on hv3.
    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv3", "--remote", "move", "hm3", "--to", "hv2"],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("0x80070005"), "{err}");
    assert!(err.contains("peer_hosts: hv1"), "{err}");
    assert_eq!(lab.host("hv3").vm_names(), ["hm3"]);
    // hv2 logs the refusal once its handshake thread is done, just after the peer got it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused: Vec<_> = lab
            .host("hv2")
            .events()
            .into_iter()
            .filter(|r| r.id == 10011)
            .collect();
        let logged = refused.iter().any(|r| {
            matches!(
                &r.event,
                Event::GatewayRefused { principal: Some(principal), code, cause, .. }
                    if code == "0x80070005"
                        && principal.starts_with("hv3$@")
                        && cause.contains("peer_hosts: hv1")
            )
        });
        if logged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hv2 logged no refusal of hv3: {refused:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A host principal gets no control channel, peer or not.
    for host in ["hv1", "hv3"] {
        let v = as_host(&lab, host, "control");
        assert_eq!(v["diagnosis"]["code"], "0x80070005", "{host}: {v}");
        assert!(
            v["diagnosis"]["cause"]
                .as_str()
                .unwrap_or("")
                .contains("never control channels"),
            "{v}"
        );
    }

    // Users keep the control API (and moves as themselves).
    let (code, v) = lab.run_json("alice", &["--host", "hv2", "--remote", "vm", "list"]);
    assert_eq!(code, 0, "{v}");
    assert!(v.to_string().contains("hm1"), "{v}");
}
