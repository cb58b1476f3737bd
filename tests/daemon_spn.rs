//! The SPN self-check of `vmgated` against the real Samba test domain: a host that may not
//! write its own SPNs logs event 14050 with the exact `setspn -S` fix and keeps serving; once an
//! administrator applied the fix, the next start finds both SPNs (14052). A host with AD's
//! default rights registers its missing SPNs itself (14051), plain and Samba's escaped twin.
//!
//! Run through tests/run, or after `eval "$(tests/domain/up)"`.

use vmgate_testkit::domain as common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Domain, TestAccount};
use vmgate_auth::spn::{Spn, samba_twin};
use vmgate_control::api::{Request, Response};
use vmgate_control::client::LocalClient;
use vmgate_control::events::{Event, EventRecord, read as read_events};

const VMGATED: &str = env!("CARGO_BIN_EXE_vmgated");
const CLASS: &str = "Microsoft Virtual System Migration Service";
/// "Validated write to service principal name".
const VALIDATED_SPN: &str = "f3a64788-5306-11d1-a9c5-0000f80367c1";

/// One host: a computer account, its keytab, a config, a state folder.
struct Host {
    account: TestAccount,
    _dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

fn host(domain: &Domain, prefix: &str) -> Host {
    let account = domain.computer(prefix);
    let dir = tempfile::tempdir().unwrap();
    let keytab = dir.path().join("host.keytab");
    let principal = format!("{}$@{}", account.name, domain.realm);
    let out = domain.export_keytab(&principal, &keytab);
    assert_eq!(out.code, 0, "exportkeytab failed: {out}");
    std::fs::set_permissions(&keytab, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("vmgated.sock");
    let dc_ip = std::env::var("VMGATE_DC_IP").expect("VMGATE_DC_IP (run through tests/run)");
    let config = dir.path().join("vmgated.toml");
    let sam = format!("{}$", account.name.to_ascii_uppercase());
    std::fs::write(
        &config,
        format!(
            r#"host_name = "{short}"
fqdn = "{fqdn}"
realm = "{realm}"
keytab = "{keytab}"
account = "{sam}"
listen = ["127.0.0.19:{port}"]
krb5_config = "{krb5}"
state_dir = "{state}"
control_socket = "{socket}"

[directory]
url = "ldap://{dc_ip}"
"#,
            port = std::net::TcpListener::bind("127.0.0.19:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            short = account.name.to_ascii_lowercase(),
            fqdn = account.fqdn,
            realm = domain.realm,
            keytab = keytab.display(),
            krb5 = domain.krb5_config.display(),
            state = state.display(),
            socket = socket.display(),
        ),
    )
    .unwrap();
    Host {
        account,
        _dir: dir,
        config,
        state,
        socket,
    }
}

impl Host {
    fn sam(&self) -> String {
        format!("{}$", self.account.name.to_ascii_uppercase())
    }

    fn spns(&self) -> [Spn; 2] {
        [
            Spn::new(CLASS, &self.account.name.to_ascii_lowercase()).unwrap(),
            Spn::new(CLASS, &self.account.fqdn).unwrap(),
        ]
    }

    /// Starts the daemon, waits until it serves, returns it with its `host_show` SPN states.
    fn start(&self) -> (Child, Vec<(String, String)>) {
        let mut child = Command::new(VMGATED)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "vmgated exited early ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if let Ok(mut c) = LocalClient::connect(&self.socket)
                && let Ok(Response::Host(h)) = c.call(&Request::HostShow)
            {
                let states = h
                    .spns
                    .into_iter()
                    .map(|s| (s.spn, s.state.as_str().to_owned()))
                    .collect();
                return (child, states);
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "vmgated did not serve within 90 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn events(&self) -> Vec<EventRecord> {
        read_events(&self.state.join("events.jsonl"), 10_000)
            .unwrap()
            .0
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

/// Takes the right to write its own SPNs away from the computer (a deny ACE for SELF on the
/// validated SPN write), as a hardened domain does.
fn deny_self_spn_write(domain: &Domain, dn: &str) {
    let sam = format!("tdb://{}", domain.sam_ldb().display());
    let conf = domain.smb_conf();
    let out = domain.run(
        "samba-tool",
        [
            OsStr::new("dsacl"),
            OsStr::new("set"),
            OsStr::new(&format!("--objectdn={dn}")),
            OsStr::new(&format!("--sddl=(OD;;SW;{VALIDATED_SPN};;PS)")),
            OsStr::new("-H"),
            OsStr::new(&sam),
            OsStr::new("-s"),
            conf.as_os_str(),
        ],
    );
    assert_eq!(out.code, 0, "dsacl set failed: {out}");
}

/// The events of the run that began at `from` (index into the log).
fn since(events: &[EventRecord], from: usize) -> &[EventRecord] {
    events.get(from..).unwrap_or_default()
}

#[test]
fn a_host_without_the_right_logs_14050_with_the_fix_and_passes_after_the_fix() {
    let domain = Domain::from_env();
    let h = host(&domain, "dsd");
    deny_self_spn_write(&domain, &h.account.dn);
    let sam = h.sam();
    let spns = h.spns();

    // First start: both SPNs missing, neither registrable.
    let (child, states) = h.start();
    assert_eq!(
        states,
        spns.iter()
            .map(|s| (s.to_string(), "missing".to_owned()))
            .collect::<Vec<_>>()
    );
    let out = stop(child);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let events = h.events();
    let failures: Vec<&EventRecord> = events.iter().filter(|e| e.id == 14050).collect();
    assert_eq!(failures.len(), 2, "{events:#?}");
    for (record, spn) in failures.iter().zip(&spns) {
        let fix = format!("setspn -S \"{spn}\" {sam}");
        match &record.event {
            Event::SpnNotRegistered {
                account,
                spn: logged,
                reason,
                fix: logged_fix,
            } => {
                assert_eq!(account, &sam);
                assert_eq!(logged, &spn.to_string());
                assert_eq!(logged_fix, &fix);
                assert!(
                    reason.starts_with(&format!(
                        "the directory denied {sam} the right to write its own servicePrincipalName"
                    )),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            record.message.ends_with(&format!("fix: {fix}")),
            "{}",
            record.message
        );
        // The text line on stderr (the journal) carries the same fix.
        assert!(stderr.contains(&record.text()), "{stderr}");
    }
    // The daemon kept running: it served host_show above and stopped on SIGTERM.
    assert!(events.iter().any(|e| e.id == 10000));
    assert!(h.account.read().spns().is_empty());

    // The administrator applies the fix (what `setspn -S` does, as Administrator).
    let admin = domain.directory();
    for spn in &spns {
        let current = admin
            .read_account(&h.account.dn)
            .unwrap()
            .expect("the account exists");
        admin.register_spn(&current, spn).unwrap();
    }

    // Next start: the check passes.
    let before = h.events().len();
    let (child, states) = h.start();
    assert_eq!(
        states,
        spns.iter()
            .map(|s| (s.to_string(), "registered".to_owned()))
            .collect::<Vec<_>>()
    );
    stop(child);
    let events = h.events();
    let run = since(&events, before);
    let ids: Vec<u32> = run.iter().map(|e| e.id).collect();
    assert_eq!(ids, [14052, 10000, 10001], "{run:#?}");
    assert_eq!(
        run[0].message,
        format!(
            "service principal names registered on {sam}: \"{}\", \"{}\"",
            spns[0], spns[1]
        )
    );
}

#[test]
fn a_host_with_default_rights_registers_its_own_spns() {
    let domain = Domain::from_env();
    let h = host(&domain, "dsr");
    let sam = h.sam();
    let spns = h.spns();

    let (child, states) = h.start();
    assert_eq!(
        states,
        spns.iter()
            .map(|s| (s.to_string(), "registered_now".to_owned()))
            .collect::<Vec<_>>()
    );
    stop(child);
    let events = h.events();
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [14051, 14051, 14052, 10000, 10001], "{events:#?}");
    // Stored on the account: each SPN and, on Samba, its escaped twin (what the KDC looks up),
    // and nothing else besides the HOST/ SPNs the account may have had.
    let mut expected: Vec<String> = Vec::new();
    for spn in &spns {
        expected.push(spn.to_string());
        expected.push(samba_twin(spn).expect("an SPN with spaces has a twin"));
    }
    expected.sort();
    let migration: Vec<String> = h
        .account
        .stored_spns()
        .into_iter()
        .filter(|v| !v.to_ascii_uppercase().starts_with("HOST/"))
        .collect();
    assert_eq!(migration, expected);
    assert!(events[0].message.contains(&sam), "{}", events[0].message);

    // A second start finds them.
    let before = events.len();
    let (child, states) = h.start();
    assert!(states.iter().all(|(_, s)| s == "registered"), "{states:?}");
    stop(child);
    let events = h.events();
    let ids: Vec<u32> = since(&events, before).iter().map(|e| e.id).collect();
    assert_eq!(ids, [14052, 10000, 10001]);
}

#[test]
fn an_spn_held_by_another_account_is_reported_with_both_commands() {
    let domain = Domain::from_env();
    let h = host(&domain, "dsx");
    let other = domain.computer("dsy");
    let sam = h.sam();
    let spns = h.spns();
    // Someone registered this host's FQDN SPN on another computer (a classic duplicate).
    let admin = domain.directory();
    let holder = admin.read_account(&other.dn).unwrap().unwrap();
    admin.register_spn(&holder, &spns[1]).unwrap();

    let (child, states) = h.start();
    assert_eq!(
        states,
        [
            (spns[0].to_string(), "registered_now".to_owned()),
            (spns[1].to_string(), "missing".to_owned()),
        ]
    );
    stop(child);
    let events = h.events();
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [14051, 14050, 10000, 10001], "{events:#?}");
    match &events[1].event {
        Event::SpnNotRegistered { reason, fix, .. } => {
            let other_sam = holder.sam_account_name.clone();
            assert_eq!(
                reason,
                &format!(
                    "it is registered on another account ({other_sam}), so tickets for it are \
                     encrypted for that account"
                )
            );
            assert_eq!(
                fix,
                &format!(
                    "setspn -D \"{spn}\" {other_sam}; then setspn -S \"{spn}\" {sam}",
                    spn = spns[1]
                )
            );
        }
        other => panic!("{other:?}"),
    }
    // The other account keeps it: the daemon never touches another account.
    assert!(other.read().has_spn(&spns[1]));
    assert!(!h.account.read().has_spn(&spns[1]));
}
