//! Live migration between separate processes over the real Kerberos channel (Samba AD DC,
//! TLS 1.3, channel binding, AD group authorization) with real KVM on both ends.
//!
//! Each test runs `vmgate-host receive` as the destination (hv2, 127.0.0.12) and
//! `vmgate-host send` as the source (the VM's host) with alice's ticket, reads both
//! processes' JSON events, and checks what an administrator would: where the VM runs, that
//! its memory checks pass there and its markers continue, and that nothing is left behind.
//! Run through tests/run (it brings the domain up).

use vmgate_testkit::channel as chan;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `vmgate-host` probe.
fn host_bin() -> PathBuf {
    vmgate_testkit::bin("vmgate-host")
}

/// A vmgate-host process; killed when dropped.
struct HostProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<(Mutex<Vec<Value>>, Condvar)>,
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostProc {
    fn spawn(name: &str, args: &[String]) -> HostProc {
        let e = chan::env();
        let mut child = Command::new(host_bin())
            .args(args)
            .env("KRB5_CONFIG", &e.krb5_config)
            .env("VMGATE_REALM", &e.realm)
            .env_remove("KRB5CCNAME")
            .env_remove("KRB5_CLIENT_KTNAME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vmgate-host");
        let events: Arc<(Mutex<Vec<Value>>, Condvar)> = Arc::default();
        let ev = Arc::clone(&events);
        let stdout = child.stdout.take().unwrap();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("VMGATE_TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "raw", "line": line}));
                ev.0.lock().unwrap().push(v);
                ev.1.notify_all();
            }
        });
        let stdin = child.stdin.take();
        HostProc {
            name: name.to_owned(),
            child,
            stdin,
            events,
        }
    }

    /// Waits for the first event (after `skip` earlier ones) that matches.
    fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.events;
        let mut g = lock.lock().unwrap();
        loop {
            if let Some(v) = g.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: no {what} within {timeout:?}; events: {:#?}",
                self.name,
                *g
            );
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn event(&self, name: &str, timeout: Duration) -> Value {
        self.wait(name, timeout, |v| v["event"] == name)
    }

    fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|v| pred(v))
            .count()
    }

    fn all(&self) -> Vec<Value> {
        self.events.0.lock().unwrap().clone()
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a command and waits for the answer with that event name (the n-th one).
    fn ask(&mut self, command: &str, answer: &str) -> Value {
        let before = self.count(|v| v["event"] == answer);
        self.say(command);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all: Vec<Value> = self
                .all()
                .into_iter()
                .filter(|v| v["event"] == answer)
                .collect();
            if all.len() > before {
                return all[before].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no answer to {command}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exit_code(&mut self, timeout: Duration) -> i32 {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

fn work_dir(tag: &str) -> PathBuf {
    let d = chan::env()
        .work
        .join(format!("live-{tag}-{}", chan::unique()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// hv2 as a destination: alice (in "Hyper-V Administrators") may move VMs here.
fn destination(tag: &str, extra: &[&str]) -> (HostProc, SocketAddr, PathBuf) {
    let hosts = chan::hosts();
    let dir = work_dir(tag);
    let mut args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        "127.0.0.12:0".into(),
        "--keytab".into(),
        hosts.keytab["hv2"].display().to_string(),
        "--account".into(),
        "HV2$".into(),
        "--spn".into(),
        chan::spn("hv2"),
        "--ccache-dir".into(),
        dir.join("cc").display().to_string(),
        "--allow-group".into(),
        chan::GROUP.into(),
        "--ldap-url".into(),
        chan::ldap_url(),
        "--networks".into(),
        "127.0.0.0/8".into(),
        "--console-dir".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let p = HostProc::spawn(&format!("dest-{tag}"), &args);
    let l = p.event("listening", Duration::from_secs(15));
    let addr = l["addr"].as_str().unwrap().parse().unwrap();
    (p, addr, dir)
}

/// A VM file: `memory_mib`, vCPU 0 memstress over `size_mib` from 8 MiB (full-content if
/// asked), vCPU 1 memstress (byte staircase) over 16 MiB above it.
fn vm_file(dir: &Path, name: &str, memory_mib: u64, size_mib: u64, full: bool) -> PathBuf {
    let second = 8 + size_mib;
    let text = format!(
        r#"
name = "{name}"
memory_mib = {memory_mib}
vcpus = 2
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = {size_mib}
marker_every = 2
full_content = {full}
[[vcpu]]
program = "memstress"
start_mib = {second}
size_mib = 16
marker_every = 16
"#
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The source: creates the VM from `vm` and moves it to `to` as alice.
fn source(tag: &str, vm: &Path, to: SocketAddr, extra: &[&str]) -> HostProc {
    let cc = chan::user_ccache("alice", &format!("live-{tag}-{}", chan::unique()));
    let mut args: Vec<String> = vec![
        "send".into(),
        "--vm".into(),
        vm.display().to_string(),
        "--to".into(),
        to.to_string(),
        "--spn".into(),
        chan::spn("hv2"),
        "--ccache".into(),
        cc.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    HostProc::spawn(&format!("src-{tag}"), &args)
}

const MOVE_TIMEOUT: Duration = Duration::from_secs(120);

fn passes(check: &Value) -> u64 {
    check["passes"].as_u64().unwrap_or(0)
}

/// Asserts the VM's memory checks pass at the source (which still runs it) and that the
/// guest keeps making progress there.
fn assert_runs_at_source(src: &mut HostProc) {
    let failed = src.event("failed", MOVE_TIMEOUT);
    assert_eq!(failed["vm_runs_here"], true, "{failed}");
    let c1 = src.ask("check", "check");
    assert_eq!(c1["ok"], true, "memory checks at the source: {c1}");
    assert_eq!(c1["running"], true, "{c1}");
    let c2 = progressed(src, "check", |c| c.clone(), passes(&c1));
    assert_eq!(c2["ok"], true, "{c2}");
}

/// Asks `command` until the guest's progress (from `select`) passed `from`: the guest runs.
/// On a loaded machine a vCPU may get little CPU for a while, so this waits up to 30 s.
fn progressed(
    p: &mut HostProc,
    command: &str,
    select: impl Fn(&Value) -> Value,
    from: u64,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let c = select(&p.ask(command, "check"));
        if passes(&c) > from {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the guest makes no progress: {c}",
            p.name
        );
    }
}

/// Asserts the destination holds nothing of a failed move: no move in progress, and no VM
/// but those that moved there before (`kept`).
fn assert_nothing_at(dest: &mut HostProc, kept: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = dest.ask("status", "status");
        let vms: Vec<&str> = st["vms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if vms == kept && st["active_moves"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the destination kept something: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts the VM runs at the destination: its checks pass and its guest keeps going.
fn assert_runs_at_destination(dest: &mut HostProc, name: &str, dir: &Path) {
    let running = dest.wait("running", MOVE_TIMEOUT, |v| {
        v["event"] == "running" && v["vm"] == name
    });
    assert_eq!(running["released"], true, "{running}");
    let console = dir.join(format!("{name}.console"));
    let c1 = dest.ask("check", "check");
    let v1 = c1["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == name)
        .unwrap()
        .clone();
    assert_eq!(v1["ok"], true, "memory checks at the destination: {v1}");
    let markers1 = std::fs::read(&console).map(|b| b.len()).unwrap_or(0);
    let pick = |c: &Value| {
        c["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap()
            .clone()
    };
    let v2 = progressed(dest, "check", pick, passes(&v1));
    assert_eq!(v2["ok"], true, "{v2}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read(&console).map(|b| b.len()).unwrap_or(0) <= markers1 {
        assert!(
            Instant::now() < deadline,
            "no new serial markers at the destination"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_1gib_and_memstress_vms_move_and_their_checks_pass_at_the_destination() {
    let (mut dest, addr, dir) = destination("basic", &[]);
    // A 1 GiB VM that is idle but for a 1 MiB staircase (its markers).
    let idle = vm_file(&dir, "idle-1g", 1024, 1, false);
    let mut src = source("idle", &idle, addr, &[]);
    let moved = src.event("moved", MOVE_TIMEOUT);
    assert_eq!(moved["vm_runs_here"], false, "{moved}");
    let stats = &moved["stats"];
    assert!(
        stats["untouched_pages"].as_u64().unwrap() > 200_000,
        "idle pages are not sent: {stats}"
    );
    assert_runs_at_destination(&mut dest, "idle-1g", &dir);
    src.say("quit");
    assert_eq!(src.exit_code(Duration::from_secs(10)), 0);

    // 256 MiB dirtied continuously (full-content pattern) plus a 16 MiB staircase, over
    // three channels with lz4.
    let busy = vm_file(&dir, "memstress", 512, 256, true);
    let mut src = source(
        "busy",
        &busy,
        addr,
        &[
            "--channels",
            "3",
            "--compression",
            "lz4",
            "--warmup-passes",
            "2",
        ],
    );
    let moved = src.event("moved", MOVE_TIMEOUT);
    let stats = &moved["stats"];
    assert_eq!(stats["channels"], 3, "{stats}");
    assert!(stats["rounds"].as_u64().unwrap() >= 2, "{stats}");
    assert_runs_at_destination(&mut dest, "memstress", &dir);
    let progress: Vec<Value> = src
        .all()
        .into_iter()
        .filter(|v| v["event"] == "progress")
        .collect();
    for phase in ["setup", "pre-copy", "switchover", "handoff", "completed"] {
        assert!(
            progress.iter().any(|p| p["progress"]["phase"] == phase),
            "no {phase} progress event"
        );
    }
    let p = progress
        .iter()
        .find(|p| p["progress"]["phase"] == "pre-copy")
        .unwrap();
    for field in [
        "round",
        "bytes_sent",
        "bytes_remaining",
        "rate_bytes_s",
        "dirty_rate_bytes_s",
        "expected_downtime_ms",
    ] {
        assert!(
            p["progress"][field].is_number(),
            "progress without {field}: {p}"
        );
    }
    for field in [
        "total_ms",
        "downtime_ms",
        "bytes_on_wire",
        "rounds",
        "zero_pages",
        "compression_ratio",
    ] {
        assert!(
            stats[field].is_number(),
            "statistics without {field}: {stats}"
        );
    }
    eprintln!("memstress move: {stats}");
    src.say("quit");
    assert_eq!(src.exit_code(Duration::from_secs(10)), 0);
}

#[test]
fn auto_converge_meets_the_downtime_target_and_without_it_the_move_gives_up_cleanly() {
    let (mut dest, addr, dir) = destination("converge", &[]);
    // 96 MiB dirtied continuously through a 32 MiB/s cap: 3 s per round, far above 300 ms.
    let vm = vm_file(&dir, "hot", 256, 96, false);
    let mut src = source(
        "autoconv",
        &vm,
        addr,
        &["--bandwidth-mib", "32", "--downtime-ms", "300"],
    );
    let moved = src.event("moved", Duration::from_secs(180));
    let stats = &moved["stats"];
    assert!(
        stats["max_throttle_percent"].as_u64().unwrap() > 0,
        "auto-converge never throttled: {stats}"
    );
    let last = src
        .all()
        .into_iter()
        .rev()
        .find(|v| v["event"] == "progress" && v["progress"]["phase"] == "pre-copy")
        .unwrap();
    assert!(
        last["progress"]["expected_downtime_ms"].as_f64().unwrap() <= 300.0,
        "switched over above the target: {last}"
    );
    eprintln!("auto-converge: {stats}");
    assert_runs_at_destination(&mut dest, "hot", &dir);
    src.say("quit");
    let _ = src.exit_code(Duration::from_secs(10));

    let vm = vm_file(&dir, "hot2", 256, 96, false);
    let mut src = source(
        "noconv",
        &vm,
        addr,
        &[
            "--bandwidth-mib",
            "32",
            "--no-auto-converge",
            "--converge-timeout-s",
            "8",
        ],
    );
    let failed = src.event("failed", Duration::from_secs(120));
    assert_eq!(failed["kind"], "not-converging", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("cannot converge"),
        "{failed}"
    );
    assert!(
        src.count(|v| v["event"] == "progress" && v["progress"]["converging"] == false) > 0,
        "the move never reported that it does not converge"
    );
    assert_runs_at_source(&mut src);
    dest.wait("discarded", Duration::from_secs(30), |v| {
        v["event"] == "discarded"
    });
    assert_nothing_at(&mut dest, &["hot"]);
}

#[test]
fn cancel_in_setup_precopy_and_switchover_keeps_the_vm_running_at_the_source() {
    let (mut dest, addr, dir) = destination("cancel", &[]);
    for (i, how) in ["setup", "pre-copy", "switchover", "stdin"]
        .iter()
        .enumerate()
    {
        let vm = vm_file(&dir, &format!("c{i}"), 256, 64, true);
        let mut args = vec!["--bandwidth-mib", "64"];
        if *how != "stdin" {
            args.extend(["--cancel-at", how]);
        }
        let mut src = source(&format!("cancel-{how}"), &vm, addr, &args);
        if *how == "stdin" {
            src.wait("a pre-copy round", MOVE_TIMEOUT, |v| {
                v["event"] == "progress"
                    && v["progress"]["phase"] == "pre-copy"
                    && v["progress"]["round"] == 1
            });
            src.say("cancel");
        }
        let failed = src.event("failed", MOVE_TIMEOUT);
        assert_eq!(failed["kind"], "cancelled", "{how}: {failed}");
        assert_runs_at_source(&mut src);
        assert_nothing_at(&mut dest, &[]);
        src.say("quit");
        assert_eq!(src.exit_code(Duration::from_secs(10)), 1);
    }
    assert_eq!(dest.count(|v| v["event"] == "running"), 0);
}

#[test]
fn a_killed_destination_or_source_leaves_exactly_one_vm() {
    // The destination dies mid pre-copy: the VM keeps running at the source.
    let (mut dest, addr, dir) = destination("kill-dest", &[]);
    let vm = vm_file(&dir, "k1", 256, 128, true);
    let mut src = source(
        "kill-dest",
        &vm,
        addr,
        &["--bandwidth-mib", "32", "--link-timeout-s", "5"],
    );
    src.wait("a pre-copy round", MOVE_TIMEOUT, |v| {
        v["event"] == "progress" && v["progress"]["phase"] == "pre-copy"
    });
    std::thread::sleep(Duration::from_millis(500));
    dest.kill9();
    assert_runs_at_source(&mut src);

    // The source dies mid pre-copy: the destination discards everything.
    let (mut dest, addr, dir) = destination("kill-src", &["--link-timeout-s", "5"]);
    let vm = vm_file(&dir, "k2", 256, 128, true);
    let mut src = source("kill-src", &vm, addr, &["--bandwidth-mib", "32"]);
    dest.event("checked", MOVE_TIMEOUT);
    src.wait("a pre-copy round", MOVE_TIMEOUT, |v| {
        v["event"] == "progress" && v["progress"]["phase"] == "pre-copy"
    });
    let before = dest.ask("status", "status");
    assert_eq!(before["active_moves"], 1, "{before}");
    src.kill9();
    let d = dest.event("discarded", Duration::from_secs(30));
    assert!(
        d["reason"].as_str().unwrap().contains("channel 0"),
        "the lost link is named: {d}"
    );
    assert_nothing_at(&mut dest, &[]);
    assert!(dest.alive());
}

/// A TCP relay between source and destination that can black-hole the traffic (the network
/// cut: nothing arrives, nothing is closed).
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

fn relay(to: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cut);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(a) = s else { return };
            let Ok(b) = TcpStream::connect(to) else {
                continue;
            };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => {
                                if !c.load(Ordering::SeqCst) {
                                    let _ = into.shutdown(std::net::Shutdown::Write);
                                }
                                return;
                            }
                            Ok(n) => n,
                        };
                        while c.load(Ordering::SeqCst) {
                            // Black hole: hold everything, forever.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Relay { addr, cut }
}

#[test]
fn a_network_cut_mid_move_leaves_the_vm_at_the_source_and_nothing_at_the_destination() {
    let (mut dest, addr, dir) = destination("cut", &["--link-timeout-s", "4"]);
    let r = relay(addr);
    let vm = vm_file(&dir, "cut", 256, 128, true);
    let mut src = source(
        "cut",
        &vm,
        r.addr,
        &["--bandwidth-mib", "32", "--link-timeout-s", "4"],
    );
    src.wait("a pre-copy round", MOVE_TIMEOUT, |v| {
        v["event"] == "progress" && v["progress"]["phase"] == "pre-copy"
    });
    std::thread::sleep(Duration::from_millis(500));
    r.cut.store(true, Ordering::SeqCst);
    assert_runs_at_source(&mut src);
    let d = dest.event("discarded", Duration::from_secs(30));
    assert!(
        d["reason"].as_str().unwrap().contains("not been heard"),
        "{d}"
    );
    assert_nothing_at(&mut dest, &[]);
}

#[test]
fn links_lost_during_the_handoff_never_leave_two_vms() {
    // Every link breaks after Complete, before the destination resumed: it discards; the
    // source asks on a new link, learns it, and resumes the VM.
    let (mut dest, addr, dir) = destination("h1", &["--test-fault", "cut-before-resume"]);
    let vm = vm_file(&dir, "h1", 256, 32, true);
    let mut src = source("h1", &vm, addr, &[]);
    assert_runs_at_source(&mut src);
    assert!(
        src.event("failed", Duration::from_secs(1))["error"]
            .as_str()
            .unwrap()
            .contains("did not resume"),
        "the source did not learn the outcome by asking"
    );
    assert_nothing_at(&mut dest, &[]);

    // Every link breaks right after the destination resumed: the source asks, learns that the
    // VM runs there, and lets go.
    let (mut dest, addr, dir) = destination("h2", &["--test-fault", "cut-after-resume"]);
    let vm = vm_file(&dir, "h2", 256, 32, true);
    let src = source("h2", &vm, addr, &[]);
    let moved = src.event("moved", MOVE_TIMEOUT);
    assert_eq!(moved["vm_runs_here"], false);
    let running = dest.event("running", MOVE_TIMEOUT);
    assert_eq!(running["released"], false, "{running}");
    let c = dest.ask("check", "check");
    assert_eq!(c["vms"][0]["ok"], true, "{c}");

    // The destination dies right after it resumed: nobody can say how the move ended, so the
    // source keeps the VM paused and says so.
    let (_dest, addr, dir) = destination("h3", &["--test-fault", "exit-after-resume"]);
    let vm = vm_file(&dir, "h3", 256, 32, true);
    let mut src = source("h3", &vm, addr, &["--link-timeout-s", "3"]);
    let failed = src.event("failed", MOVE_TIMEOUT);
    assert_eq!(failed["kind"], "in-doubt", "{failed}");
    assert_eq!(failed["vm_runs_here"], false, "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("PAUSED"),
        "{failed}"
    );
    let st = src.ask("status", "status");
    assert_eq!(st["running"], false, "{st}");
    src.say("quit");
    assert_eq!(src.exit_code(Duration::from_secs(10)), 3);
}

/// A raw authenticated link to the destination as alice: what a hostile but authenticated
/// peer could send.
fn raw_link(to: SocketAddr) -> vmgate_migrate::engine::Link {
    use vmgate_auth::channel::ClientSettings;
    use vmgate_auth::krb::{AuthFacts, UserCredential};
    use vmgate_auth::tls::TlsContext;
    let e = chan::env();
    let cc = chan::user_ccache("alice", &format!("hostile-{}", chan::unique()));
    let cred = UserCredential::from_ccache(cc.to_str().unwrap()).unwrap();
    let settings = ClientSettings {
        source: None,
        tls: TlsContext::ephemeral().unwrap(),
        realm: e.realm.clone(),
        handshake_timeout: Duration::from_secs(10),
        local_host: None,
    };
    let d = vmgate::adapter::ChannelDialer::new(
        settings,
        to,
        chan::spn("hv2").parse().unwrap(),
        cred,
        AuthFacts::default(),
    );
    d.connect().expect("alice connects")
}

fn frame(m: &vmgate_migrate::protocol::Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(vmgate_migrate::protocol::ProtocolVersion::CURRENT, &mut out)
        .unwrap();
    out
}

fn hello(session: u8) -> Vec<u8> {
    use vmgate_migrate::protocol::{Hello, Message, ProtocolVersion, Purpose, SessionId};
    frame(&Message::Hello(Hello {
        version: ProtocolVersion::CURRENT,
        software: "hostile 1.0".into(),
        session: SessionId([session; 16]),
        purpose: Purpose::Move,
        channel: 0,
        channels: 1,
    }))
}

/// Sends `bytes` (optionally closing after), then reads until the destination closes;
/// returns what came back.
fn hostile(to: SocketAddr, bytes: &[u8], close_after: bool) -> Vec<u8> {
    let mut link = raw_link(to);
    let _ = link.writer.write_all(bytes);
    let _ = link.writer.flush();
    if close_after {
        drop(link.writer);
        link.closer.close();
        return Vec::new();
    }
    let mut back = Vec::new();
    let _ = link.reader.take(1 << 20).read_to_end(&mut back);
    back
}

/// The texts of the Error frames in `back`.
fn error_texts(back: &[u8]) -> Vec<String> {
    use vmgate_migrate::protocol::{Decoded, Message, decode_frame};
    let mut rest = back;
    let mut texts = Vec::new();
    while let Ok(Decoded::Frame { frame, consumed }) = decode_frame(rest) {
        if let Message::Error(e) = frame.message {
            texts.push(e.message.to_string());
        }
        rest = rest.get(consumed..).unwrap_or_default();
    }
    texts
}

#[test]
fn hostile_frames_from_an_authenticated_peer_are_refused_without_harm() {
    use vmgate_migrate::protocol::{Decoded, Message, decode_frame};
    let (mut dest, addr, _dir) = destination("hostile", &[]);
    let base = dest.ask("status", "status")["rss_kib"].as_u64().unwrap();
    let error_back = |back: &[u8], what: &str| match decode_frame(back) {
        Ok(Decoded::Frame { frame, .. }) => match frame.message {
            Message::Error(e) => e.message.to_string(),
            other => panic!("{what}: the destination answered {other:?}"),
        },
        other => panic!(
            "{what}: no Error frame back ({} bytes): {other:?}",
            back.len()
        ),
    };

    // Garbage instead of a frame.
    let back = hostile(addr, &[0x55; 64], false);
    let m = error_back(&back, "garbage");
    assert!(m.contains("magic"), "{m}");

    // A header announcing 4 GiB: refused from the header, nothing allocated.
    let mut huge = hello(1);
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let back = hostile(addr, &huge[..12], false);
    let m = error_back(&back, "oversized");
    assert!(m.contains("at most"), "{m}");

    // An unknown message type.
    let mut unknown = hello(2);
    unknown[4..6].copy_from_slice(&0xfff0u16.to_le_bytes());
    let back = hostile(addr, &unknown, false);
    let m = error_back(&back, "unknown type");
    assert!(m.contains("type"), "{m}");

    // A truncated frame, then the connection ends.
    let h = hello(3);
    hostile(addr, &h[..h.len() - 5], true);

    // A replayed Hello inside a move.
    let mut two = hello(4);
    two.extend_from_slice(&hello(4));
    let texts = error_texts(&hostile(addr, &two, false));
    assert!(
        texts.iter().any(|t| t.contains("Hello")),
        "replayed Hello: {texts:?}"
    );

    // A page beyond the VM's memory after a valid configuration.
    let cfg = vmgate_migrate::vm::VmConfig::from_toml(
        "name = \"victim\"\nmemory_mib = 64\nvcpus = 1\n",
        None,
    )
    .unwrap();
    let cpuid = vmgate_migrate::vm::Vm::create(cfg.clone(), &Default::default())
        .unwrap()
        .guest_cpuid()
        .to_vec();
    let mut seq = hello(5);
    seq.extend_from_slice(&frame(
        &vmgate_migrate::engine::MoveDocument::message(&cfg, &cpuid).unwrap(),
    ));
    let mut enc = vmgate_migrate::protocol::BatchEncoder::new(
        vmgate_migrate::protocol::ProtocolVersion::CURRENT,
        vmgate_migrate::protocol::Compression::None,
    )
    .unwrap();
    enc.begin_memory(1);
    enc.push(1 << 20, &[7u8; 4096]).unwrap();
    seq.extend_from_slice(enc.finish().unwrap());
    let texts = error_texts(&hostile(addr, &seq, false));
    assert!(
        texts.iter().any(|t| t.contains("page")),
        "out-of-range page: {texts:?}"
    );

    // The destination is still there, holds nothing, and did not grow.
    assert!(dest.alive());
    assert_nothing_at(&mut dest, &[]);
    let after = dest.ask("status", "status")["rss_kib"].as_u64().unwrap();
    assert!(
        after < base + 64 * 1024,
        "the destination grew from {base} KiB to {after} KiB"
    );
    assert!(
        dest.count(|v| v["event"] == "ended" || v["event"] == "discarded") >= 5,
        "every hostile connection ended: {:#?}",
        dest.all()
    );
}
