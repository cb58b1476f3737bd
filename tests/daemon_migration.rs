//! `vmgated` as a migration destination against the real Samba test domain: a VM moves into
//! the daemon (TLS + Kerberos + channel binding, alice authorized through "Hyper-V
//! Administrators"), runs there and is listed by `vm_list`; the lifecycle is in the event log
//! with its stable ids; a user outside the admin group is refused with E_ACCESSDENIED and the VM
//! stays at its source. Run through tests/run, or after `eval "$(tests/domain/up)"`.

#[path = "../auth/tests/channel/common.rs"]
mod chan;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate::daemon::events::{Event, EventLog};
use vmgate::daemon::local::{LocalClient, Request, Response};

const VMGATED: &str = env!("CARGO_BIN_EXE_vmgated");
const HOST_BIN: &str = env!("CARGO_BIN_EXE_vmgate-host");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free port on `ip`.
fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port on hv2's address.
fn free_port() -> u16 {
    free_port_on("127.0.0.12")
}

/// Starts vmgated as hv2 with migrations enabled; waits until its control socket answers.
fn start_hv2(dir: &Path, port: u16) -> Daemon {
    start_host(dir, "hv2", "127.0.0.12", port)
}

/// Starts vmgated as `host` on `ip:port` with migrations enabled (state and socket in `dir`).
fn start_host(dir: &Path, host: &str, ip: &str, port: u16) -> Daemon {
    let e = chan::env();
    let hosts = chan::hosts();
    let account = format!("{}$", host.to_uppercase());
    let state = dir.join("state");
    let socket = dir.join("vmgated.sock");
    let config = dir.join("vmgated.toml");
    std::fs::write(
        &config,
        format!(
            r#"host_name = "{host}"
fqdn = "{host}.lab.example.test"
realm = "{realm}"
keytab = "{keytab}"
account = "{account}"
listen = ["{ip}:{port}"]
krb5_config = "{krb5}"
state_dir = "{state}"
control_socket = "{socket}"
admin_group = "Hyper-V Administrators"

[directory]
url = "ldap://{dc}"

[migration]
enabled = true
any_network = true
"#,
            realm = e.realm,
            keytab = hosts.keytab[host].display(),
            account = account,
            krb5 = e.krb5_config.display(),
            state = state.display(),
            socket = socket.display(),
            dc = e.dc_ip,
        ),
    )
    .unwrap();
    let mut child = Command::new(VMGATED)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        assert!(child.try_wait().unwrap().is_none(), "vmgated exited early");
        if let Ok(mut c) = LocalClient::connect(&socket)
            && let Ok(Response::Host(_)) = c.call(&Request::HostShow)
        {
            return Daemon(child);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vmgated did not serve within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

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
    let mut child = Command::new(HOST_BIN)
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
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let daemon = start_hv2(dir.path(), port);

    let moved = send(dir.path(), "alice", "into-daemon", port);
    assert_eq!(moved["event"], "moved", "{moved}");
    // The source reports the move once the VM resumed here; the daemon lists it once the
    // source released it, a round trip later.
    let mut c = LocalClient::connect(&dir.path().join("vmgated.sock")).unwrap();
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
    assert_eq!(v.state, "running");
    assert!(v.origin.contains("alice@"), "{v:?}");

    // carol is not in "Hyper-V Administrators": refused before the engine, the VM stays.
    let refused = send(dir.path(), "carol", "carol-vm", port);
    assert_eq!(refused["event"], "failed", "{refused}");
    assert_eq!(refused["diagnosis"]["code"], "0x80070005", "{refused}");
    assert_eq!(refused["vm_runs_here"], true, "{refused}");

    let records = EventLog::read(&dir.path().join("state/events.jsonl"), 10_000)
        .unwrap()
        .0;
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
    drop(daemon);
}

fn vm_names(socket: &Path) -> Vec<String> {
    let mut c = LocalClient::connect(socket).unwrap();
    match c.call(&Request::VmList).unwrap() {
        Response::Vms { vms } => vms.into_iter().map(|v| v.name).collect(),
        other => panic!("vm_list answered {other:?}"),
    }
}

#[test]
fn alice_on_hv1_moves_a_vm_to_hv2_with_her_own_ticket_without_delegation() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let port2 = free_port_on("127.0.0.12");
    let _hv1 = start_host(d1.path(), "hv1", "127.0.0.11", free_port_on("127.0.0.11"));
    let _hv2 = start_host(d2.path(), "hv2", "127.0.0.12", port2);
    let s1 = d1.path().join("vmgated.sock");
    let s2 = d2.path().join("vmgated.sock");
    // No constrained delegation for hv1 at all: the move runs on alice's own ticket.
    chan::set_delegation("hv1", &[]);

    let mut c = LocalClient::connect(&s1).unwrap();
    let created = c
        .call(&Request::VmCreate {
            config: "name = \"own-ticket\"\nmemory_mib = 128\nvcpus = 1\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 8\nsize_mib = 16\n".into(),
        })
        .unwrap();
    assert!(matches!(created, Response::Done { .. }), "{created:?}");
    assert_eq!(vm_names(&s1), ["own-ticket"]);

    // The CLI hands the daemon alice's own ticket over the local socket ("logged on to the
    // source"): no delegation is involved.
    let cc = chan::user_ccache("alice", "daemon-own-ticket");
    let mut progress = 0;
    let mut c = LocalClient::connect(&s1).unwrap();
    let done = c
        .call_with(
            &Request::Move {
                vm: "own-ticket".into(),
                to: format!("127.0.0.12:{port2}"),
                destination: "hv2.lab.example.test".into(),
                ccache: vmgate::daemon::local::CcacheBlob::new(std::fs::read(&cc).unwrap()),
            },
            |_| progress += 1,
        )
        .unwrap();
    match &done {
        Response::Done { message } => assert!(message.contains("as alice@"), "{message}"),
        other => panic!("the move failed: {other:?}"),
    }
    assert!(progress >= 3, "only {progress} progress lines");
    assert!(vm_names(&s1).is_empty(), "hv1 still lists the VM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm_names(&s2) != ["own-ticket"] {
        assert!(Instant::now() < deadline, "hv2 never listed the VM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let records = EventLog::read(&d1.path().join("state/events.jsonl"), 10_000)
        .unwrap()
        .0;
    assert!(
        records.iter().any(|r| r.id == 20402),
        "no migration.completed on hv1: {records:#?}"
    );
}
