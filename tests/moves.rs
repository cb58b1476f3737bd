//! End to end, as an administrator works: the Samba DC, three vmgated processes (hv1–hv3 on
//! 127.0.0.11–13) and the `vmgate` CLI (`--host hvN`, local socket or `--remote` through the
//! gateway). Who may act for whom is decided by the real KDC: the user's own ticket on the
//! source, constrained delegation (S4U2Proxy) for a remote start, CredSSP-style forwarding;
//! refusals carry the Windows code, the cause and the fix. Run through tests/run, or after
//! `eval "$(tests/domain/up)"` and a workspace build.
//!
//! The tests change the hosts' delegation in the shared directory: they run one at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_testkit::lab::{Lab, chan, disk_vm, memstress_vm};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// hv1's, hv2's... migration SPNs (short and FQDN), as msDS-AllowedToDelegateTo holds them.
fn spns(host: &str) -> Vec<String> {
    vec![chan::short_spn(host), chan::spn(host)]
}

fn wait_listed(lab: &Lab, host: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.host(host).vm_names().iter().any(|n| n == vm) {
        assert!(Instant::now() < deadline, "{host} never listed {vm}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VM runs at `host` and its self-checks pass there.
fn runs_and_checks(lab: &Lab, host: &str, vm: &str) {
    wait_listed(lab, host, vm);
    let (code, v) = lab.run_json("alice", &["--host", host, "vm", "check", vm]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["passed"], Value::Bool(true), "{v}");
}

#[test]
fn alice_on_hv1_moves_with_her_own_ticket_and_no_delegation() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    lab.create_vm("hv1", &memstress_vm("own", 128, 16, ""));
    // On hv1's own socket: the CLI hands alice's ticket to the daemon.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "move", "own", "--to", "hv2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Moved own to hv2 as alice@LAB.EXAMPLE.TEST (own-ticket)"),
        "{out}"
    );
    assert!(out.contains("downtime"), "{out}");
    // Progress went to stderr, phase by phase.
    assert!(err.contains("pre-copy") && err.contains("handoff"), "{err}");
    assert!(lab.host("hv1").vm_names().is_empty());
    runs_and_checks(&lab, "hv2", "own");
    let ids: Vec<u32> = lab.host("hv1").events().iter().map(|r| r.id).collect();
    assert!(ids.contains(&20400) && ids.contains(&20402), "{ids:?}");
}

#[test]
fn remote_moves_need_constrained_delegation_of_the_source() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2", "hv3"], &|_| String::new());
    chan::set_delegation("hv1", &spns("hv2"));
    chan::set_delegation("hv2", &[]);
    chan::set_delegation("hv3", &[]);
    lab.create_vm("hv1", &memstress_vm("deleg", 128, 16, ""));

    // From a workstation through hv1's gateway: hv1 acts for alice by S4U2Proxy.
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv1", "--remote", "move", "deleg", "--to", "hv2"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["method"], "constrained-delegation", "{v}");
    assert_eq!(v["user"], "alice@LAB.EXAMPLE.TEST", "{v}");
    assert!(v["stats"]["downtime_ms"].as_f64().unwrap() > 0.0, "{v}");
    runs_and_checks(&lab, "hv2", "deleg");

    // Moving it back needs hv2's own delegation to hv1, and the error says so.
    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv2", "--remote", "move", "deleg", "--to", "hv1"],
    );
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("0x8009030E"), "{err}");
    assert!(err.contains("HV2$") || err.contains("hv2"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    runs_and_checks(&lab, "hv2", "deleg");

    // From hv3, which may not delegate at all: 0x8009030E with cause and fix.
    lab.create_vm("hv3", &memstress_vm("from3", 128, 16, ""));
    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv3", "--remote", "move", "from3", "--to", "hv1"],
    );
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("0x8009030E"), "{err}");
    assert!(err.contains("HV3$"), "{err}");
    let fix = err.split("fix:").nth(1).unwrap_or_default();
    assert!(fix.contains("hv1"), "{err}");
    // The failed move left the VM running on hv3, and nothing on hv1.
    assert_eq!(lab.host("hv3").vm_names(), ["from3"]);
    assert!(!lab.host("hv1").vm_names().iter().any(|n| n == "from3"));
    let failed = lab
        .host("hv3")
        .events()
        .into_iter()
        .find(|r| r.id == 20403)
        .expect("hv3 logged no migration.failed");
    assert!(failed.message.contains("0x8009030E"), "{}", failed.message);

    // Applying the fix (delegation HV3$ → hv1) makes the same move succeed.
    chan::set_delegation("hv3", &spns("hv1"));
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv3", "--remote", "move", "from3", "--to", "hv1"],
    );
    chan::set_delegation("hv3", &[]);
    chan::set_delegation("hv1", &[]);
    assert_eq!(code, 0, "{v}");
    runs_and_checks(&lab, "hv1", "from3");
}

#[test]
fn credssp_needs_forwarded_credentials_for_a_remote_start() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    // Even with constrained delegation configured: CredSSP does not use it.
    chan::set_delegation("hv1", &spns("hv2"));
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv1", "host", "set", "--auth", "credssp"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["config"]["migration"]["auth"], "credssp");
    lab.create_vm("hv1", &memstress_vm("cred", 128, 16, ""));

    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv1", "--remote", "move", "cred", "--to", "hv2"],
    );
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("0x8009030E"), "{err}");
    assert!(err.contains("CredSSP"), "{err}");
    assert!(err.contains("--forward-credentials"), "{err}");
    assert_eq!(lab.host("hv1").vm_names(), ["cred"]);

    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "--remote",
            "move",
            "cred",
            "--to",
            "hv2",
            "--forward-credentials",
        ],
    );
    chan::set_delegation("hv1", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["method"], "forwarded-tgt", "{v}");
    runs_and_checks(&lab, "hv2", "cred");
}

#[test]
fn a_third_move_queues_behind_the_limit_then_completes() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    // A cap makes each move last long enough to overlap.
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "host",
            "set",
            "--bandwidth",
            "24MiB/s",
            "--performance",
            "tcpip",
            "--max-live-moves",
            "2",
        ],
    );
    assert_eq!(code, 0, "{v}");
    for name in ["q1", "q2", "q3"] {
        // One pass over 48 MiB, then the guest idles: each move sends ~48 MiB at the cap.
        lab.create_vm(
            "hv1",
            &format!("{}passes = 1\n", memstress_vm(name, 128, 48, "")),
        );
    }
    let mut children = Vec::new();
    for name in ["q1", "q2", "q3"] {
        let child = lab
            .cli("alice", &["--host", "hv1", "move", name, "--to", "hv2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
        std::thread::sleep(Duration::from_millis(300));
    }
    // While they run, jobs list shows two running and one queued at position 1.
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "list"]);
    assert_eq!(code, 0, "{v}");
    let jobs = v["jobs"].as_array().unwrap();
    let queued: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "queued").collect();
    assert_eq!(queued.len(), 1, "{v}");
    assert_eq!(queued[0]["vm"], "q3", "{v}");
    assert_eq!(queued[0]["position"], 1, "{v}");
    let mut outputs = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        outputs.push((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    for (code, out, err) in &outputs {
        assert_eq!(*code, Some(0), "{out}{err}");
    }
    assert!(
        outputs[2].2.contains("queued: position 1"),
        "{}",
        outputs[2].2
    );
    for name in ["q1", "q2", "q3"] {
        wait_listed(&lab, "hv2", name);
    }
    let events = lab.host("hv1").events();
    assert!(events.iter().any(|r| r.id == 20404), "no migration.queued");
    assert!(
        events.iter().any(|r| r.id == 20405),
        "no migration.dequeued"
    );
}

#[test]
fn disabled_destination_foreign_network_and_older_destination_are_refused() {
    let _s = serial();
    // hv3 plays a newer build (protocol 2) towards an older hv2.
    let lab = Lab::start(&["hv1", "hv2", "hv3"], &|h| {
        if h == "hv3" {
            "[testing]\nprotocol_version = 2\n".into()
        } else {
            String::new()
        }
    });
    chan::set_delegation("hv1", &[]);
    lab.create_vm("hv1", &memstress_vm("ref", 128, 16, ""));

    // Migration disabled on hv2.
    let (code, v) = lab.run_json("alice", &["--host", "hv2", "host", "disable"]);
    assert_eq!(code, 0, "{v}");
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "move", "ref", "--to", "hv2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("[1006]") && err.contains("disabled on hv2"),
        "{err}"
    );
    assert!(err.contains("host enable"), "{err}");
    assert_eq!(lab.host("hv1").vm_names(), ["ref"]);
    assert!(lab.host("hv2").vm_names().is_empty());
    let (code, _) = lab.run_json("alice", &["--host", "hv2", "host", "enable"]);
    assert_eq!(code, 0);

    // hv1's address is not on hv2's migration networks.
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
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "move", "ref", "--to", "hv2"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("0x80070005"), "{err}");
    assert!(
        err.contains(
            "from 127.0.0.11: that address is not on its migration networks (10.99.0.0/16)"
        ),
        "{err}"
    );
    assert!(err.contains("host set --network"), "{err}");
    assert_eq!(lab.host("hv1").vm_names(), ["ref"]);
    let (code, _) = lab.run_json(
        "alice",
        &["--host", "hv2", "host", "set", "--network", "127.0.0.0/8:0"],
    );
    assert_eq!(code, 0);

    // The newer hv3 towards the older hv2: refused, naming both versions.
    lab.create_vm("hv3", &memstress_vm("newer", 128, 16, ""));
    let (code, out, err) = lab.run("alice", &["--host", "hv3", "move", "newer", "--to", "hv2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("protocol version 2"), "{err}");
    assert!(err.contains("protocol versions 1 to 1"), "{err}");
    assert_eq!(lab.host("hv3").vm_names(), ["newer"]);

    // With hv2's networks right again, the move goes.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "move", "ref", "--to", "hv2"]);
    assert_eq!(code, 0, "{out}{err}");
    runs_and_checks(&lab, "hv2", "ref");
}

#[test]
fn compare_lists_processor_and_switch_and_a_switch_map_moves_with_the_mac_kept() {
    let _s = serial();
    let mut lab = Lab::start(&["hv1"], &|_| {
        "[[switch]]\nname = \"Lab\"\ninterface = \"lo\"\n".into()
    });
    chan::set_delegation("hv1", &[]);
    let nic = "[[nic]]\nmac = \"52:54:00:ab:cd:01\"\nswitch = \"Lab\"\n";
    lab.create_vm(
        "hv1",
        &format!("{}{nic}", memstress_vm("native", 128, 16, "")),
    );
    lab.create_vm(
        "hv1",
        &format!(
            "{}[[nic]]\nmac = \"52:54:00:ab:cd:02\"\nswitch = \"Lab\"\n",
            memstress_vm("compat", 128, 16, "cpu_compat = true")
        ),
    );
    // vm show lists the processor features each VM uses; the native one uses some the
    // compatibility baseline hides.
    let features = |vm: &str| -> Vec<String> {
        let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "show", vm]);
        assert_eq!(code, 0, "{v}");
        v["cpu_features"]
            .as_array()
            .unwrap()
            .iter()
            // "avx2 (CPUID 0x7 ebx bit 5)": the short name, or the place when unnamed.
            .map(|f| {
                let f = f.as_str().unwrap();
                match f.split_once(" (") {
                    Some((short, _)) => short.to_owned(),
                    None => f.to_owned(),
                }
            })
            .collect()
    };
    let compat_features = features("compat");
    let beyond: Vec<String> = features("native")
        .into_iter()
        .filter(|f| !compat_features.contains(f))
        .collect();
    assert!(!beyond.is_empty(), "the baseline hides nothing here");
    // hv2 plays an older processor (without those features) and has the switch "Lab2" (on
    // lo), not "Lab".
    lab.add_host(
        "hv2",
        &format!(
            "[[switch]]\nname = \"Lab2\"\ninterface = \"lo\"\n\n[testing]\nhidden_cpu_features = {beyond:?}\n"
        ),
    );

    // Compare-VM: every incompatibility at once, each with its id.
    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv1", "compare", "native", "--to", "hv2"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("[1003]") && err.contains("processor lacks features"),
        "{err}"
    );
    assert!(err.contains("[1005]") && err.contains("Lab"), "{err}");
    assert!(err.contains("--switch-map"), "{err}");
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv1", "compare", "native", "--to", "hv2"],
    );
    assert_eq!(code, 1);
    let ids: Vec<u64> = v["report"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1003, 1005], "{v}");
    // Comparing changed nothing anywhere.
    assert_eq!(lab.host("hv1").vm_names(), ["native", "compat"]);
    assert!(lab.host("hv2").vm_names().is_empty());

    // The move without a map is refused the same way; the VM keeps running.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "move", "compat", "--to", "hv2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("[1005]") && !err.contains("[1003]"), "{err}");

    // With the switch mapped, the compatibility-mode VM moves; hv2 announces its MAC on the
    // mapped switch's interface.
    let mut tcpdump = std::process::Command::new("tcpdump")
        .args([
            "-i",
            "lo",
            "-n",
            "-e",
            "-l",
            "-c",
            "1",
            "arp and ether src 52:54:00:ab:cd:02",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump (installed by tests/run)");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move",
            "compat",
            "--to",
            "hv2",
            "--switch-map",
            "Lab=Lab2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    runs_and_checks(&lab, "hv2", "compat");
    let (code, v) = lab.run_json("alice", &["--host", "hv2", "vm", "show", "compat"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["nics"][0]["mac"], "52:54:00:ab:cd:02", "{v}");
    assert_eq!(v["nics"][0]["switch"], "Lab2", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcpdump.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = tcpdump.kill();
            panic!("no gratuitous ARP from 52:54:00:ab:cd:02 on lo");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = tcpdump.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&seen.stdout);
    assert!(
        text.contains("52:54:00:ab:cd:02") && text.contains("ARP"),
        "{text}"
    );
}

#[test]
fn the_source_falls_back_to_the_next_offered_address() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    lab.create_vm("hv1", &memstress_vm("fallback", 128, 16, ""));
    // hv2's first address does not answer; the second does.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.12:0").unwrap();
        l.local_addr().unwrap()
    };
    let real = format!("{}:{}", lab.host("hv2").ip, lab.host("hv2").port);
    let cc = chan::user_ccache("alice", "fallback");
    let mut c = vmgate_control::client::LocalClient::connect(&lab.host("hv1").socket()).unwrap();
    let r = c
        .call(&vmgate_control::api::Request::Move(
            vmgate_control::api::moves::MoveSpec {
                vm: "fallback".into(),
                to: vec![closed.to_string(), real.clone()],
                destination: "hv2.lab.example.test".into(),
                ccache: Some(vmgate_control::api::CcacheBlob::new(
                    std::fs::read(&cc).unwrap(),
                )),
                switch_map: Vec::new(),
                storage_path: None,
                disks: Vec::new(),
                keep_source: false,
            },
        ))
        .unwrap();
    match r {
        vmgate_control::api::Response::Moved(m) => assert_eq!(m.address, real),
        other => panic!("{other:?}"),
    }
    runs_and_checks(&lab, "hv2", "fallback");
}

#[test]
fn a_running_move_is_cancelled_from_jobs_and_the_vm_keeps_running() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    // Slow enough to be caught running: 96 MiB rewritten continuously at 8 MiB/s.
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "host",
            "set",
            "--bandwidth",
            "8MiB/s",
            "--performance",
            "tcpip",
        ],
    );
    assert_eq!(code, 0, "{v}");
    lab.create_vm("hv1", &memstress_vm("slow", 160, 96, ""));
    let mover = lab
        .cli("alice", &["--host", "hv1", "move", "slow", "--to", "hv2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the job runs, then cancel it by its id.
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (_, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "list"]);
        if let Some(j) = v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "running" && j["progress"]["phase"] == "pre-copy")
        {
            break j["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the move never ran: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "cancel", &id]);
    assert_eq!(code, 0, "{v}");
    let out = mover.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cancelled by"), "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "show", &id]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["state"], "cancelled", "{v}");
    // The VM runs on hv1 with its memory intact; hv2 holds nothing.
    runs_and_checks(&lab, "hv1", "slow");
    assert!(lab.host("hv2").vm_names().is_empty());
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "jobs", "cancel", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already ended"), "{err}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "jobs", "show", "j99"]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn vms_are_listed_stopped_started_and_their_console_read() {
    let _s = serial();
    let lab = Lab::start(&["hv1"], &|_| String::new());
    lab.create_vm("hv1", &memstress_vm("life", 64, 8, ""));
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "list"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["vms"][0]["name"], "life");
    assert_eq!(v["vms"][0]["state"], "running");
    // The guest writes its progress markers on the serial console.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "console", "life"]);
        assert_eq!(code, 0, "{v}");
        if !v["text"].as_str().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no console output");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Suspend-VM / Resume-VM.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "pause", "life"]);
    assert_eq!((code, out.trim()), (0, "paused life"), "{err}");
    let (_, v) = lab.run_json("alice", &["--host", "hv1", "vm", "show", "life"]);
    assert_eq!(v["state"], "paused", "{v}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "vm", "pause", "life"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already paused"), "{err}");
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "resume", "life"]);
    assert_eq!((code, out.trim()), (0, "resumed life"), "{err}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "vm", "resume", "life"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already running"), "{err}");
    runs_and_checks(&lab, "hv1", "life");
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "stop", "life"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, v) = lab.run_json("alice", &["--host", "hv1", "vm", "show", "life"]);
    assert_eq!(v["state"], "off", "{v}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "vm", "resume", "life"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is off"), "{err}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "vm", "stop", "life"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already off"), "{err}");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "move", "life", "--to", "hv2"]);
    assert_ne!(code, 0, "{err}");
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "start", "life"]);
    assert_eq!(code, 0, "{out}{err}");
    runs_and_checks(&lab, "hv1", "life");
    let (code, _, err) = lab.run("alice", &["--host", "hv1", "vm", "show", "nothing"]);
    assert_eq!(code, 3, "{err}");
    // A user on the network outside the admin group is refused by the gateway.
    let (code, _, err) = lab.run("carol", &["--host", "hv1", "--remote", "vm", "list"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("0x80070005"), "{err}");
}

/// `vmgate doctor --json` as alice; the exit code and the report.
fn doctor(lab: &Lab, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["doctor", "--from", "hv1", "--to", "hv2", "--user", "alice"];
    args.extend_from_slice(extra);
    lab.run_json("alice", &args)
}

fn check<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {v:#}"))
}

/// The one failing check is `id` with `code`; returns the first line of its fix.
fn fails_on(code: i32, v: &Value, id: &str, win: &str, exit: i32) -> String {
    assert_eq!(code, exit, "{v:#}");
    assert_eq!(v["verdict"]["failed"], 1, "{v:#}");
    assert_eq!(check(v, id)["status"], "fail", "{v:#}");
    assert_eq!(check(v, id)["diagnosis"]["code"], win, "{v:#}");
    let fix = check(v, id)["diagnosis"]["fix"]
        .as_str()
        .unwrap()
        .to_owned();
    fix.lines().next().unwrap().to_owned()
}

/// Runs a printed `vmgate ...` fix line as alice.
fn apply(lab: &Lab, fix: &str) {
    let words: Vec<&str> = fix.split_whitespace().collect();
    assert_eq!(words[0], "vmgate", "not a vmgate command: {fix}");
    let (code, out, err) = lab.run("alice", &words[1..]);
    assert_eq!(code, 0, "{fix}: {out}{err}");
}

#[test]
fn doctor_checks_the_daemons_and_each_printed_fix_turns_it_green() {
    let _s = serial();
    let mut lab = Lab::start(&["hv1", "hv2"], &|h| {
        let switch = if h == "hv1" { "Lab" } else { "Lab2" };
        format!("[[switch]]\nname = \"{switch}\"\ninterface = \"lo\"\n")
    });
    chan::set_delegation("hv1", &spns("hv2"));
    lab.create_vm(
        "hv1",
        &format!(
            "{}[[nic]]\nmac = \"52:54:00:ab:cd:11\"\nswitch = \"Lab\"\n",
            memstress_vm("doc", 64, 8, "cpu_compat = true")
        ),
    );
    let (code, v) = doctor(&lab, &[]);
    assert_eq!(code, 0, "{v:#}");
    for id in [
        "daemon-reachable",
        "migration-enabled",
        "source-allowed",
        "protocol-version",
    ] {
        assert_eq!(check(&v, id)["status"], "pass", "{id}: {v:#}");
    }

    // Migrations disabled on D.
    apply(&lab, "vmgate --host hv2 host disable");
    let (code, v) = doctor(&lab, &[]);
    let fix = fails_on(code, &v, "migration-enabled", "0x8007274D", 1);
    assert_eq!(fix, "vmgate --host hv2 host enable");
    apply(&lab, &fix);
    assert_eq!(doctor(&lab, &[]).0, 0);

    // S's address not on D's migration networks.
    apply(
        &lab,
        "vmgate --host hv2 host set --any-network false --network 10.99.0.0/16",
    );
    let (code, v) = doctor(&lab, &[]);
    let fix = fails_on(code, &v, "source-allowed", "0x80070005", 1);
    assert!(fix.contains("127.0.0.11/32"), "{fix}");
    apply(&lab, &fix);
    assert_eq!(doctor(&lab, &[]).0, 0);

    // The VM's switch is missing on D; the switch map the fix names makes it fit.
    let (code, v) = doctor(&lab, &["--vm", "doc"]);
    assert_eq!(code, 1, "{v:#}");
    let c = check(&v, "vm-compatible");
    assert_eq!(c["status"], "fail", "{v:#}");
    assert_eq!(c["diagnosis"]["code"], "0x80070032", "{v:#}");
    let cause = c["diagnosis"]["cause"].as_str().unwrap();
    assert!(
        cause.contains("[1005]") && cause.contains("--switch-map Lab=Lab2"),
        "{cause}"
    );
    let (code, v) = doctor(&lab, &["--vm", "doc", "--switch-map", "Lab=Lab2"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(check(&v, "vm-compatible")["status"], "pass", "{v:#}");

    // D's daemon not running: unreachable (exit 4); started again, green.
    lab.host_mut("hv2").stop();
    let (code, v) = doctor(&lab, &[]);
    let fix = fails_on(code, &v, "daemon-reachable", "0x8007274D", 4);
    assert!(fix.contains("systemctl start vmgated"), "{fix}");
    assert_eq!(check(&v, "migration-enabled")["status"], "skip", "{v:#}");
    lab.restart("hv2");
    let (code, v) = doctor(&lab, &[]);
    chan::set_delegation("hv1", &[]);
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn a_vm_moves_with_its_disk_shared_nothing_and_a_path_outside_the_roots_is_refused() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    let src_dir = lab.host("hv1").dir.join("vms");
    let disk = src_dir.join("sn.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    lab.create_vm("hv1", &disk_vm("sn", &disk, "raw"));
    let dest_dir = lab.host("hv2").dir.join("vms");

    // A destination folder outside hv2's storage roots: refused with id 1009, nothing moves.
    let (code, out, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move",
            "sn",
            "--to",
            "hv2",
            "--include-storage",
            "--storage-path",
            "/var/tmp/vmgate-not-a-root",
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("[1009]"), "{err}");
    assert!(disk.exists());
    assert_eq!(std::fs::read_dir(&dest_dir).unwrap().count(), 0);
    runs_and_checks(&lab, "hv1", "sn");

    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "move",
            "sn",
            "--to",
            "hv2",
            "--include-storage",
            "--storage-path",
            dest_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    // The disk crossed (its all-zero blocks need not).
    assert!(v["stats"]["disk_bytes_sent"].as_u64().unwrap() > 0, "{v:#}");
    // The guest's disk sequence and memory pass their checks at hv2, on hv2's copy.
    runs_and_checks(&lab, "hv2", "sn");
    let (_, shown) = lab.run_json("alice", &["--host", "hv2", "vm", "show", "sn"]);
    assert_eq!(
        shown["disks"][0],
        dest_dir.join("sn.raw").display().to_string(),
        "{shown:#}"
    );
    assert!(!disk.exists(), "the source's file is still there");
}

#[test]
fn a_vm_on_shared_storage_moves_with_only_its_memory() {
    let _s = serial();
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    chan::set_delegation("hv1", &[]);
    // A folder both hosts see at the same path, one of the storage roots of each.
    let shared = lab.shared();
    let disk = shared.join("ss.raw");
    std::fs::write(&disk, vec![0x5Au8; 8 << 20]).unwrap();
    lab.create_vm("hv1", &disk_vm("ss", &disk, "raw"));
    let writer_refused = || {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "flush", disk.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() || err.contains("\"write\" lock"),
            "{err}"
        );
        !out.status.success()
    };
    assert!(writer_refused(), "hv1's VM holds its image");

    let (code, v) = lab.run_json("alice", &["--host", "hv1", "move", "ss", "--to", "hv2"]);
    assert_eq!(code, 0, "{v:#}");
    // Only memory crossed; the image was handed over in place.
    assert_eq!(v["stats"]["disk_bytes_sent"], 0, "{v:#}");
    assert_eq!(
        v["stats"]["shared_disks"][0],
        disk.display().to_string(),
        "{v:#}"
    );
    assert!(
        v["stats"]["bytes_on_wire"].as_u64().unwrap() < 64 << 20,
        "{v:#}"
    );
    runs_and_checks(&lab, "hv2", "ss");
    let (_, shown) = lab.run_json("alice", &["--host", "hv2", "vm", "show", "ss"]);
    assert_eq!(shown["disks"][0], disk.display().to_string(), "{shown:#}");
    // Its I/O since it arrived (virsh domblkstat): the guest keeps writing 4 KiB blocks.
    let st = &shown["disk_stats"][0];
    let n = |k: &str| {
        st[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {shown:#}"))
    };
    assert!(
        n("writes") > 0 && n("bytes_written") == n("writes") * 4096,
        "{shown:#}"
    );
    assert_eq!(n("errors"), 0, "{shown:#}");
    assert!(
        0 < n("write_p50_ns") && n("write_p50_ns") <= n("write_p99_ns"),
        "{shown:#}"
    );
    assert!(n("write_p99_ns") <= n("write_max_ns"), "{shown:#}");
    let (code, text, err) = lab.run("alice", &["--host", "hv2", "vm", "show", "ss"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(" writes (") && text.contains("write latency p50 "),
        "{text}"
    );
    assert!(disk.exists());
    // hv2's VM holds the image now: a second writer is still refused.
    assert!(writer_refused(), "hv2's VM holds the image");
    // And back, as people read it.
    let (code, out, err) = lab.run("alice", &["--host", "hv2", "move", "ss", "--to", "hv1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("storage: shared, 1 image(s) handed over in place (no disk data crossed)"),
        "{out}"
    );
    runs_and_checks(&lab, "hv1", "ss");
    assert!(writer_refused(), "hv1's VM holds the image again");
}
