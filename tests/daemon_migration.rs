//! `vmgated` as a migration destination against the real Samba test domain: a VM moves into
//! the daemon (TLS + Kerberos + channel binding, alice authorized through "Hyper-V
//! Administrators"), runs there and is listed by `vm_list`; the lifecycle is in the event log
//! with its stable ids; a user outside the admin group is refused with E_ACCESSDENIED and the VM
//! stays at its source. Run through tests/run, or after `eval "$(tests/domain/up)"`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_control::api::{Request, Response};
use vmgate_control::client::LocalClient;
use vmgate_control::events::Event;
use vmgate_testkit::lab::{Lab, chan};

/// Runs `vmgate-host send` as `user` to hv2's daemon; returns its final event.
fn send(dir: &Path, user: &str, name: &str, port: u16) -> Value {
    let vm = dir.join(format!("{name}.toml"));
    std::fs::write(
        &vm,
        format!(
            "name = \"{name}\"\nmemory_mib = 128\nvcpus = 1\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 8\nsize_mib = 16\n"
        ),
    )
    .unwrap();
    let cc = chan::user_ccache(user, &format!("daemon-{name}"));
    let e = chan::env();
    let mut child = Command::new(vmgate_testkit::bin("vmgate-host"))
        .args(["send", "--vm"])
        .arg(&vm)
        .args([
            "--to",
            &format!("127.0.0.12:{port}"),
            "--spn",
            &chan::spn("hv2"),
            "--ccache",
        ])
        .arg(&cc)
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("VMGATE_REALM", &e.realm)
        .env_remove("KRB5CCNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let mut last = Value::Null;
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap_or(Value::Null);
        if v["event"] == "moved" || v["event"] == "failed" || v["event"] == "error" {
            last = v;
            break;
        }
    }
    drop(stdin);
    let _ = child.wait();
    last
}

#[test]
fn a_vm_moves_into_vmgated_and_a_user_outside_the_admin_group_is_refused() {
    let lab = Lab::start(&["hv2"], &|_| String::new());
    let hv2 = lab.host("hv2");
    let dir = lab.dir.path();
    let port = hv2.port;

    let moved = send(dir, "alice", "into-daemon", port);
    assert_eq!(moved["event"], "moved", "{moved}");
    // The source reports the move once the VM resumed here; the daemon lists it once the
    // source released it, a round trip later.
    let mut c = LocalClient::connect(&hv2.socket()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        match c.call(&Request::VmList).unwrap() {
            Response::Vms { vms } => {
                if let Some(v) = vms.into_iter().find(|v| v.name == "into-daemon") {
                    break v;
                }
            }
            other => panic!("vm_list answered {other:?}"),
        }
        assert!(Instant::now() < deadline, "vm_list never listed the VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(v.state.as_str(), "running");
    assert!(v.origin.contains("alice@"), "{v:?}");

    // carol is not in "Hyper-V Administrators": refused before the engine, the VM stays.
    let refused = send(dir, "carol", "carol-vm", port);
    assert_eq!(refused["event"], "failed", "{refused}");
    assert_eq!(refused["diagnosis"]["code"], "0x80070005", "{refused}");
    assert_eq!(refused["vm_runs_here"], true, "{refused}");

    let records = hv2.events();
    let started = records
        .iter()
        .find(|r| r.id == 20400)
        .unwrap_or_else(|| panic!("no migration.started event: {records:#?}"));
    match &started.event {
        Event::MigrationStarted { vm, user, .. } => {
            assert_eq!(vm, "into-daemon");
            assert!(user.starts_with("alice@"), "{user}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        records.iter().any(|r| r.id == 20401),
        "no handoff phase event: {records:#?}"
    );
}

/// The lines of hv2's log (its stderr) that record event 10011, refused logons.
fn refusal_lines(lab: &Lab) -> Vec<String> {
    std::fs::read_to_string(lab.host("hv2").dir.join("vmgated.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("10011 gateway.refused"))
        .map(str::to_owned)
        .collect()
}

/// Waits until hv2 has logged `n` refused logons; returns those lines.
fn wait_refusals(lab: &Lab, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = refusal_lines(lab);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The refused logons hv2 recorded in its event log.
fn refusals(lab: &Lab) -> Vec<(String, Option<String>, String, String)> {
    lab.host("hv2")
        .events()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::GatewayRefused {
                peer,
                principal,
                cause,
                code,
                ..
            } => Some((peer, principal, cause, code)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_refused_logon_is_one_warning_in_the_daemons_log_with_peer_principal_reason_and_code() {
    let lab = Lab::start(&["hv2"], &|_| String::new());
    assert!(refusal_lines(&lab).is_empty());

    // carol authenticates but is not in "Hyper-V Administrators".
    let (code, out, err) = lab.run("carol", &["--host", "hv2", "--remote", "host", "show"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("0x80070005"), "{err}");
    let lines = wait_refusals(&lab, 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let recorded = refusals(&lab);
    assert_eq!(recorded.len(), 1, "{recorded:#?}");
    let (peer, principal, reason, win) = &recorded[0];
    let carol = format!("carol@{}", chan::env().realm);
    assert_eq!(principal.as_deref(), Some(carol.as_str()));
    assert_eq!(win, "0x80070005");
    assert!(reason.contains("is not a member"), "{reason}");
    let line = &lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(peer.as_str()),
        "no peer address {peer}: {line}"
    );
    assert!(line.contains(&carol), "no principal: {line}");
    assert!(
        line.contains("0x80070005 (E_ACCESSDENIED)"),
        "no code: {line}"
    );
    assert!(line.contains("is not a member"), "no reason: {line}");

    // A move from outside hv2's migration networks: refused for its address.
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv2",
            "host",
            "set",
            "--any-network",
            "false",
            "--network",
            "10.99.0.0/16:1",
        ],
    );
    assert_eq!(code, 0, "{v}");
    let refused = send(lab.dir.path(), "alice", "wrong-net", lab.host("hv2").port);
    assert_eq!(refused["event"], "failed", "{refused}");
    assert_eq!(refused["diagnosis"]["code"], "0x80070005", "{refused}");
    let lines = wait_refusals(&lab, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let recorded = refusals(&lab);
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    let (peer, _, reason, win) = &recorded[1];
    assert_eq!(win, "0x80070005");
    assert!(reason.contains("not on its migration networks"), "{reason}");
    let line = &lines[1];
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(peer.as_str()),
        "no peer address {peer}: {line}"
    );
    assert!(
        line.contains("0x80070005 (E_ACCESSDENIED)"),
        "no code: {line}"
    );
    assert!(
        line.contains("not on its migration networks"),
        "no reason: {line}"
    );
}
