//! The `vmgated` binary as an administrator runs it, without a domain: `--check` and its exit
//! codes, the refusal to start with an exposed keytab or state folder, and a whole start/stop
//! with the directory unreachable (the SPN check reports 14053 and the daemon serves anyway).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmgate_control::api::{Request, Response};
use vmgate_control::client::LocalClient;
use vmgate_control::events;

const VMGATED: &str = env!("CARGO_BIN_EXE_vmgated");

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    keytab: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

/// A config whose directory is unreachable (nothing listens on 127.0.0.1:9).
fn setup(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let keytab = dir.join("hv9.keytab");
    std::fs::write(&keytab, b"\x05\x02").unwrap();
    chmod(&keytab, 0o600);
    let state = dir.join("state");
    let socket = dir.join("run/vmgated.sock");
    let config = dir.join("vmgated.toml");
    std::fs::write(
        &config,
        format!(
            r#"host_name = "hv9"
fqdn = "hv9.lab.example.test"
realm = "LAB.EXAMPLE.TEST"
keytab = "{}"
listen = ["127.0.0.19:{port}"]
state_dir = "{}"
control_socket = "{}"
{extra}
[directory]
url = "ldap://127.0.0.1:9"
"#,
            keytab.display(),
            state.display(),
            socket.display(),
            port = std::net::TcpListener::bind("127.0.0.19:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        ),
    )
    .unwrap();
    Setup {
        _dir: tmp,
        dir,
        config,
        keytab,
        state,
        socket,
    }
}

fn vmgated(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(VMGATED).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_reports_valid_and_invalid_configs_with_exit_codes() {
    let s = setup("");
    let out = vmgated(&[
        "--config".as_ref(),
        s.config.as_os_str(),
        "--check".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}: valid configuration for hv9 (hv9.lab.example.test, account HV9$); migration disabled\n",
            s.config.display()
        )
    );
    // --check does not touch the state folder.
    assert!(!s.state.exists());

    let bad = setup("[migration]\nmax_live_moves = 0\n");
    let out = vmgated(&[
        "--config".as_ref(),
        bad.config.as_os_str(),
        "--check".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vmgated: {}: `migration.max_live_moves`: 0 is not allowed; it must be from 1 to 64\n",
            bad.config.display()
        )
    );

    let typo = setup("[migration]\nenable = true\n");
    let out = vmgated(&[
        "--config".as_ref(),
        typo.config.as_os_str(),
        "--check".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("TOML parse error at line 9, column 1"),
        "{err}"
    );
    assert!(err.contains("unknown field `enable`"), "{err}");

    let missing = s.dir.join("none.toml");
    let out = vmgated(&["--config".as_ref(), missing.as_os_str(), "--check".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vmgated: cannot read the configuration file {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}

#[test]
fn refuses_to_start_with_an_exposed_keytab_or_state_folder() {
    let s = setup("");
    chmod(&s.keytab, 0o644);
    let out = vmgated(&["--config".as_ref(), s.config.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vmgated: the keytab {k} is readable by group/others (mode 0644); fix: chmod 600 {k}\n",
            k = s.keytab.display()
        )
    );
    assert!(!s.socket.exists());

    chmod(&s.keytab, 0o600);
    std::fs::create_dir(&s.state).unwrap();
    chmod(&s.state, 0o755);
    let out = vmgated(&["--config".as_ref(), s.config.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vmgated: the state folder {p} is accessible by group/others (mode 0755); fix: chmod 700 {p}\n",
            p = s.state.display()
        )
    );
    assert!(!s.socket.exists());
}

/// Waits until the daemon answers `version` on its socket.
fn wait_ready(child: &mut Child, socket: &Path) -> LocalClient {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("vmgated exited early: {status}");
        }
        if let Ok(mut c) = LocalClient::connect(socket)
            && let Ok(Response::Version(_)) = c.call(&Request::Version)
        {
            return c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vmgated did not serve {} within 60 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) -> Output {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("vmgated did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn starts_without_the_directory_serves_and_stops_cleanly() {
    let s = setup("");
    let mut child = Command::new(VMGATED)
        .arg("--config")
        .arg(&s.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = wait_ready(&mut child, &s.socket);
    // The state folder was created private.
    assert_eq!(
        std::fs::metadata(&s.state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    match client.call(&Request::HostShow).unwrap() {
        Response::Host(h) => {
            assert_eq!(h.config.account, "HV9$");
            let states: Vec<(&str, &str)> = h
                .spns
                .iter()
                .map(|s| (s.spn.as_str(), s.state.as_str()))
                .collect();
            assert_eq!(
                states,
                [
                    ("Microsoft Virtual System Migration Service/hv9", "unknown"),
                    (
                        "Microsoft Virtual System Migration Service/hv9.lab.example.test",
                        "unknown"
                    )
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    let out = stop(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!s.socket.exists(), "the socket outlived the daemon");
    let (events, skipped) = events::read(&s.state.join("events.jsonl"), 100).unwrap();
    assert_eq!(skipped, 0);
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [14053, 10000, 10001], "{events:?}");
    assert!(
        events[0].message.starts_with(
            "could not check the service principal names of HV9$: cannot connect to the directory as the host: cannot reach the directory at ldap://127.0.0.1:9"
        ),
        "{}",
        events[0].message
    );
    assert_eq!(events[2].message, "vmgated is stopping: received SIGTERM");
    // The same events as text lines on stderr.
    let stderr = text(&out.stderr);
    for e in &events {
        assert!(
            stderr.contains(&e.text()),
            "missing on stderr: {}\n{stderr}",
            e.text()
        );
    }
}
