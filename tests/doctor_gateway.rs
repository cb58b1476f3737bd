//! `vmgate doctor` proves D accepts the user by doing what the move does: it authenticates to
//! D's gateway as the user (TLS, Kerberos to D's migration SPN with D's key, bound to the TLS
//! session, then D's authorization). A D whose daemon runs with a keytab that cannot decrypt
//! tickets for its SPN looks healthy to every directory check and to a TCP connection; the
//! doctor must fail it, with the Kerberos code the move would get.
//!
//! The doctor runs here as from a workstation: no lab folder, so it knows D only by its name
//! and address (`--to-address`), not its configuration or keytab.

use std::process::Command;

use serde_json::Value;
use vmgate_testkit::lab::{self as lab_hosts, Lab, chan};

fn doctor(lab: &Lab) -> (i32, Value) {
    let e = chan::env();
    let hv2 = lab.host("hv2");
    let cc = chan::user_ccache("alice", &format!("doctor-{}", chan::unique()));
    let to = format!("{}:{}", hv2.ip, hv2.port);
    let out = Command::new(lab_hosts::vmgate_bin())
        .args([
            "doctor",
            "--from",
            "hv1",
            "--to",
            "hv2",
            "--user",
            "alice",
            "--from-address",
            "127.0.0.11",
            "--to-address",
            &to,
            "--json",
        ])
        .env_remove("VMGATE_LAB_DIR")
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("KRB5CCNAME", format!("FILE:{}", cc.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|err| {
        panic!(
            "not JSON ({err}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn check<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no check {id}: {v:#}"))
}

/// Points hv2's configuration at `keytab` and restarts it.
fn use_keytab(lab: &mut Lab, keytab: &std::path::Path) {
    let path = lab.host("hv2").dir.join("vmgated.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let new: String = text
        .lines()
        .map(|l| {
            if l.starts_with("keytab = ") {
                format!("keytab = \"{}\"\n", keytab.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&path, new).unwrap();
    lab.restart("hv2");
}

#[test]
fn the_doctor_authenticates_to_d_and_fails_when_d_cannot_decrypt_the_users_ticket() {
    let hosts = chan::hosts();
    let mut lab = Lab::start(&["hv2"], &|_| String::new());
    let (_, v) = doctor(&lab);
    let c = check(&v, "daemon-reachable");
    assert_eq!(c["status"], "pass", "{v:#}");
    let summary = c["summary"].as_str().unwrap();
    assert!(
        summary.contains("accepted alice@LAB.EXAMPLE.TEST through its gateway")
            && summary.contains("Microsoft Virtual System Migration Service/hv2.lab.example.test"),
        "{summary}"
    );
    assert_eq!(check(&v, "migration-enabled")["status"], "pass", "{v:#}");

    // hv2's daemon runs with a keytab that is not its own: the directory is in order, the
    // gateway answers TCP, but no ticket for hv2's SPN decrypts there.
    use_keytab(&mut lab, &hosts.keytab["hv3"]);
    let (code, v) = doctor(&lab);
    for id in ["spn-fqdn", "spn-short", "delegation", "user-authorized"] {
        assert_eq!(check(&v, id)["status"], "pass", "{id}: {v:#}");
    }
    let c = check(&v, "daemon-reachable");
    assert_eq!(c["status"], "fail", "{v:#}");
    let code_hex = c["diagnosis"]["code"].as_str().unwrap();
    assert!(
        matches!(code_hex, "0x80090322" | "0x8009030D"),
        "the Kerberos code a move gets: {v:#}"
    );
    assert_eq!(v["verdict"]["error"]["code"], code_hex, "{v:#}");
    assert_eq!(code, 1, "{v:#}");
    assert!(
        c["diagnosis"]["fix"]
            .as_str()
            .unwrap()
            .contains("vmgate host keytab refresh"),
        "{v:#}"
    );

    // Its own keytab again: green.
    use_keytab(&mut lab, &hosts.keytab["hv2"]);
    let (_, v) = doctor(&lab);
    assert_eq!(check(&v, "daemon-reachable")["status"], "pass", "{v:#}");
}
