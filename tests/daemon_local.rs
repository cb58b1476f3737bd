//! The local control socket as a user meets it: root is admitted, a user outside the configured
//! group is refused with a one-line JSON error that says why, a member of the group (as a
//! supplementary or as the primary group) is admitted; framing limits hold.
//!
//! Needs root (it creates a Unix group and users with groupadd/useradd, removed afterwards) and
//! /usr/bin/python3 as the non-root client (each client runs in a child process with the other
//! user's uid and gid, so the kernel reports that uid as the peer).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vmgate::control::host::version;
use vmgate::control::serve::BasicHandler;
use vmgate::control::socket::LocalServer;
use vmgate::events::{EventLog, read as read_events};
use vmgate_control::api::host::HostInfo;
use vmgate_control::api::{ErrorCode, Request, Response};
use vmgate_control::client::LocalClient;
use vmgate_control::config::Config;
use vmgate_control::framing::MAX_REQUEST;

const PYTHON: &str = "/usr/bin/python3";

/// Connects to the socket, sends `request` (when given), prints the first line received.
const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if len(sys.argv) > 2:
    try:
        s.sendall(sys.argv[2].encode() + b"\n")
    except BrokenPipeError:
        pass
f = s.makefile("rb")
sys.stdout.write(f.readline().decode())
# Done: the daemon closes its end when ours is closed for writing.
try:
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass
try:
    rest = f.read()
except ConnectionResetError:
    # The daemon closed without reading what we sent: the same as an end of file here.
    rest = b""
sys.stdout.write("EOF\n" if rest == b"" else "MORE\n")
"#;

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id_of(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").args([flag, name]).output().unwrap();
    assert!(out.status.success(), "id {flag} {name}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A Unix group and users created for one test; removed on drop.
struct LocalAccounts {
    group: String,
    users: Vec<String>,
}

impl LocalAccounts {
    fn new() -> LocalAccounts {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "this test creates a group and users: run it as root"
        );
        let group = unique("vmgg");
        run("groupadd", &[&group]);
        LocalAccounts {
            group,
            users: Vec::new(),
        }
    }

    /// A system user without a home; `primary` makes the group its primary group, otherwise it
    /// is a supplementary member.
    fn member(&mut self, primary: bool) -> String {
        let user = unique("vmgu");
        let membership = if primary { "-g" } else { "-G" };
        run(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                membership,
                &self.group,
                &user,
            ],
        );
        self.users.push(user.clone());
        user
    }
}

impl Drop for LocalAccounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// Runs the Python client as `uid`/`gid`; returns its output lines.
fn client_as(uid: u32, gid: u32, socket: &Path, request: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-c").arg(CLIENT).arg(socket);
    if let Some(r) = request {
        cmd.arg(r);
    }
    let out = cmd
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e}"));
    assert!(
        out.status.success(),
        "client as uid {uid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn config_text(socket: &Path, state: &Path, group: Option<&str>) -> String {
    let group = group
        .map(|g| format!("local_group = \"{g}\"\n"))
        .unwrap_or_default();
    format!(
        r#"host_name = "hv9"
fqdn = "hv9.lab.example.test"
realm = "LAB.EXAMPLE.TEST"
listen = ["127.0.0.19"]
control_socket = "{}"
state_dir = "{}"
{group}
[directory]
url = "ldap://127.0.0.20"
"#,
        socket.display(),
        state.display()
    )
}

/// A folder every user can traverse (the socket must be reachable for the refusal to be seen).
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().to_owned();
    (dir, path)
}

/// Binds and serves a control socket on a thread; returns its config and event log.
fn serve(dir: &Path, group: Option<&str>) -> (Config, EventLog) {
    let socket = dir.join("ctl.sock");
    let state = dir.join("state");
    let config =
        Config::parse(&config_text(&socket, &state, group), Path::new("test.toml")).unwrap();
    std::fs::create_dir(&state).unwrap();
    let events = EventLog::quiet(&config.event_log_path(), &config.host_name).unwrap();
    let server = LocalServer::bind(
        &config.control_socket,
        config.local_group.clone(),
        Some(events.clone()),
    )
    .unwrap();
    let host = HostInfo {
        migration_addresses: Vec::new(),
        version: version(),
        config: config.clone(),
        spns: Vec::new(),
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = runtime.block_on(server.serve(Arc::new(BasicHandler::new(host))));
    });
    (config, events)
}

fn parse(line: &str) -> Response {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a response: {line:?}: {e}"))
}

#[test]
fn root_and_group_members_are_admitted_others_refused() {
    let mut accounts = LocalAccounts::new();
    let supplementary = accounts.member(false);
    let primary = accounts.member(true);
    let (_keep, dir) = open_dir();
    let (config, events) = serve(&dir, Some(&accounts.group));
    let socket = config.control_socket.clone();
    // The file mode lets everyone connect; the peer credentials decide.
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o666
    );

    // root
    let mut root = LocalClient::connect(&socket).unwrap();
    match root.call(&Request::Version).unwrap() {
        Response::Version(v) => {
            assert_eq!(v.daemon, env!("CARGO_PKG_VERSION"));
            assert_eq!(v, version());
        }
        other => panic!("root: {other:?}"),
    }
    match root.call(&Request::HostShow).unwrap() {
        Response::Host(h) => {
            assert_eq!(h.config.fqdn, "hv9.lab.example.test");
            assert_eq!(
                h.config.local_group.as_deref(),
                Some(accounts.group.as_str())
            );
        }
        other => panic!("root: {other:?}"),
    }

    // nobody: refused with one JSON line, then the connection is closed.
    let nobody = id_of("-u", "nobody");
    let nogroup = id_of("-g", "nobody");
    let lines = client_as(nobody, nogroup, &socket, Some(r#"{"request":"version"}"#));
    assert_eq!(lines.len(), 2, "{lines:?}");
    match parse(&lines[0]) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::AccessDenied);
            assert_eq!(
                e.message,
                format!(
                    "access denied: nobody (uid {nobody}) is not root and not a member of the \
                     local group \"{g}\" (fix: usermod -aG {g} nobody, then log in again)",
                    g = accounts.group
                )
            );
        }
        other => panic!("nobody was not refused: {other:?}"),
    }
    assert_eq!(lines[1], "EOF");
    let (logged, _) = read_events(events.path(), 100).unwrap();
    assert!(
        logged.iter().any(|r| r.id == 10010
            && r.message.contains(&format!("uid {nobody}"))
            && r.message.contains("not a member")),
        "no 10010 event for nobody: {logged:?}"
    );

    // A supplementary member and a user whose primary group it is.
    for user in [&supplementary, &primary] {
        let uid = id_of("-u", user);
        let gid = id_of("-g", user);
        let lines = client_as(uid, gid, &socket, Some(r#"{"request":"version"}"#));
        match parse(&lines[0]) {
            Response::Version(v) => assert_eq!(v, version()),
            other => panic!("{user} (uid {uid}) was not admitted: {other:?}"),
        }
        // The daemon keeps the connection open for more requests; the client closed it.
        assert_eq!(lines[1], "EOF");
    }
}

#[test]
fn without_a_local_group_only_root_is_admitted() {
    let (_keep, dir) = open_dir();
    let (config, _events) = serve(&dir, None);
    let nobody = id_of("-u", "nobody");
    let lines = client_as(nobody, id_of("-g", "nobody"), &config.control_socket, None);
    match parse(&lines[0]) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::AccessDenied);
            assert!(
                e.message.ends_with(
                    "is not root, and no local_group is configured: only root may use this socket"
                ),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    let mut root = LocalClient::connect(&config.control_socket).unwrap();
    assert!(matches!(
        root.call(&Request::Version).unwrap(),
        Response::Version(_)
    ));
}

fn read_line(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn requests_are_bounded_and_malformed_ones_answered() {
    let (_keep, dir) = open_dir();
    let (config, _events) = serve(&dir, None);
    let stream = UnixStream::connect(&config.control_socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);

    // Not JSON: an error, the connection stays usable.
    writer.write_all(b"hello\n").unwrap();
    match parse(&read_line(&mut reader)) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(
                e.message.starts_with("not a valid request: "),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    // An unknown request.
    writer.write_all(b"{\"request\":\"reboot\"}\n").unwrap();
    match parse(&read_line(&mut reader)) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(
                e.message.contains("unknown variant `reboot`"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    // A move handing over a credential, to a handler that does not serve moves: refused as
    // unsupported, and the credential's bytes are not echoed.
    writer
        .write_all(b"{\"request\":\"move\",\"vm\":\"web\",\"to\":[\"127.0.0.12:1\"],\"destination\":\"hv2.lab.example.test\",\"ccache\":\"BQRzZWNyZXQ=\"}\n")
        .unwrap();
    let line = read_line(&mut reader);
    assert!(!line.contains("BQRzZWNyZXQ"), "{line}");
    match parse(&line) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unsupported);
            assert!(e.message.contains("\"move\""), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // Exactly MAX_REQUEST bytes (a valid request padded with spaces) is accepted.
    let mut exact = br#"{"request":"version"}"#.to_vec();
    exact.resize(MAX_REQUEST, b' ');
    exact.push(b'\n');
    writer.write_all(&exact).unwrap();
    assert!(matches!(
        parse(&read_line(&mut reader)),
        Response::Version(_)
    ));
    // One byte more: refused, and the connection is closed.
    let mut long = br#"{"request":"version"}"#.to_vec();
    long.resize(MAX_REQUEST + 1, b' ');
    long.push(b'\n');
    // The daemon may close before reading everything: a write error is fine.
    let _ = writer.write_all(&long);
    match parse(&read_line(&mut reader)) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::RequestTooLarge);
            assert_eq!(
                e.message,
                "a request is at most 1048576 bytes; closing the connection"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "the daemon answered after the oversized request"
    );
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let (_keep, dir) = open_dir();
    let path = dir.join("ctl.sock");
    // A stale socket file (nobody listening).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = LocalServer::bind(&path, None, None).unwrap();
    // A second daemon on the same path is refused while the first listens.
    let err = LocalServer::bind(&path, None, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("another vmgated already listens on {}", path.display())
    );
    drop(first);
    assert!(!path.exists(), "the socket file outlived its server");
    // Something that is not a socket is never deleted.
    std::fs::write(&path, b"data").unwrap();
    let err = LocalServer::bind(&path, None, None).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}
