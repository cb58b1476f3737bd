//! VM storage kept inside the hosts' storage roots and never deleted while a VM needs it,
//! through vmgated and the CLI: `vm create` refuses a disk whose file or backing chain leads
//! outside the storage roots (a crafted `../../etc/passwd` or absolute backing reference, a
//! symbolic link in a root pointing out) and names the disk without showing what the files
//! hold; a golden base image shared by two VMs stays when one of them moves away (with its
//! storage, or its storage only) while the other is off, and that VM still starts.
//!
//! Run through tests/run, or after `eval "$(tests/domain/up)"` and a build of vmgated and
//! vmgate. The tests change nothing in the directory; each has its own lab (folder, ports).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_testkit::lab::{self as lab_hosts, Lab, disk_vm};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT PATH 16M` (the reference written as given).
fn qcow2_on(path: &Path, backing: &str, format: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        format,
        s(path),
        "16M",
    ]);
}

/// The names `vm list` shows on `host`.
fn listed(lab: &Lab, host: &str) -> Vec<(String, String)> {
    let (code, v) = lab.run_json("alice", &["--host", host, "vm", "list"]);
    assert_eq!(code, 0, "{v}");
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_owned(),
                x["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The VM's own checks pass on `host` (retried: after a cold boot the disk check holds once
/// the guest has written its region again).
fn passes_checks(lab: &Lab, host: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = lab.run_json("alice", &["--host", host, "vm", "check", vm]);
        if code == 0 && v["passed"] == Value::Bool(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} fails its checks on {host}: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_listed(lab: &Lab, host: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listed(lab, host).iter().any(|(n, _)| n == vm) {
        assert!(Instant::now() < deadline, "{vm} is not listed on {host}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a VM's configuration and runs `vm create` on hv1; returns exit code and stderr.
fn try_create(lab: &Lab, config: &str, name: &str) -> (i32, String) {
    let path = lab.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = lab.run(
        "alice",
        &["--host", "hv1", "vm", "create", "--config", s(&path)],
    );
    (code, format!("{out}{err}"))
}

#[test]
fn vm_create_refuses_disks_whose_file_or_chain_leads_outside_the_storage_roots() {
    let lab = Lab::start(&["hv1"], &|_| String::new());
    let vms = lab.host("hv1").dir.join("vms");
    let outside = lab.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.raw"), vec![0x53u8; 1 << 20]).unwrap();
    qcow2_on(&outside.join("top.qcow2"), "secret.raw", "raw");
    std::os::unix::fs::symlink(&outside, vms.join("link")).unwrap();

    let cases: Vec<(&str, PathBuf, Option<String>)> = vec![
        (
            "a relative reference climbing out",
            vms.join("a/dotdot.qcow2"),
            Some("../../../../../../../../../../etc/passwd".into()),
        ),
        (
            "an absolute reference",
            vms.join("abs.qcow2"),
            Some("/etc/passwd".into()),
        ),
        (
            "a reference through a link in the root",
            vms.join("vialink.qcow2"),
            Some("link/secret.raw".into()),
        ),
        (
            "the disk itself through a link in the root",
            vms.join("link/top.qcow2"),
            None,
        ),
        ("a disk outside the roots", outside.join("top.qcow2"), None),
    ];
    for (i, (why, disk, reference)) in cases.iter().enumerate() {
        if let Some(r) = reference {
            qcow2_on(disk, r, "raw");
        }
        let name = format!("bad{i}");
        let (code, text) = try_create(&lab, &disk_vm(&name, disk, "qcow2"), &name);
        eprintln!("{why}: {text}");
        assert_eq!(code, 1, "{why}: {text}");
        assert!(
            text.contains(&format!("disk 0 of {name} ({})", s(disk))),
            "{why}: the disk is not named: {text}"
        );
        assert!(
            text.contains("outside this host's storage roots"),
            "{why}: {text}"
        );
        // Nothing of what the files hold: not the reference, not the file it names.
        for secret in ["passwd", "secret"] {
            assert!(!text.contains(secret), "{why}: {text}");
        }
        assert!(
            !listed(&lab, "hv1").iter().any(|(n, _)| *n == name),
            "{why}: the VM was created"
        );
    }

    // The same chain inside the roots, with a link and a ".." that stay inside: created.
    std::fs::create_dir_all(vms.join("gold")).unwrap();
    std::fs::write(vms.join("gold/base.raw"), vec![0u8; 16 << 20]).unwrap();
    std::os::unix::fs::symlink("gold", vms.join("golden")).unwrap();
    let good = vms.join("vm/good.qcow2");
    qcow2_on(&good, "../golden/base.raw", "raw");
    let (code, text) = try_create(&lab, &disk_vm("good", &good, "qcow2"), "good");
    assert_eq!(code, 0, "{text}");
    passes_checks(&lab, "hv1", "good");
}

/// base.raw in hv1's `gold` folder, and two VMs on it: `NAME.qcow2` in `vms/NAME`.
fn two_vms_on_one_base(lab: &Lab) -> (PathBuf, PathBuf, PathBuf) {
    let vms = lab.host("hv1").dir.join("vms");
    let base = vms.join("gold/base.raw");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    std::fs::write(&base, vec![0u8; 16 << 20]).unwrap();
    let web1 = vms.join("web1/web1.qcow2");
    let web2 = vms.join("web2/web2.qcow2");
    qcow2_on(&web1, s(&base), "raw");
    qcow2_on(&web2, s(&base), "raw");
    lab.create_vm("hv1", &disk_vm("web1", &web1, "qcow2"));
    lab.create_vm("hv1", &disk_vm("web2", &web2, "qcow2"));
    passes_checks(lab, "hv1", "web2");
    // web2 is off: nothing holds the base open for it.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "stop", "web2"]);
    assert_eq!(code, 0, "{out}{err}");
    (base, web1, web2)
}

#[test]
fn a_stopped_vm_sharing_the_base_of_a_vm_moved_away_with_its_storage_still_starts() {
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    lab_hosts::chan::set_delegation("hv1", &[]);
    let (base, web1, _) = two_vms_on_one_base(&lab);
    let dest = lab.host("hv2").dir.join("vms/web1");
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "move",
            "web1",
            "--to",
            "hv2",
            "--include-storage",
            "--storage-path",
            s(&dest),
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    wait_listed(&lab, "hv2", "web1");
    passes_checks(&lab, "hv2", "web1");
    // web1's own layer went; the base web2 needs stayed, though nothing has it open.
    assert!(!web1.exists(), "the moved VM's own layer is still there");
    assert!(base.exists(), "the base of the stopped VM web2 was deleted");
    // web2 starts on its chain and its checks pass.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "start", "web2"]);
    assert_eq!(code, 0, "{out}{err}");
    passes_checks(&lab, "hv1", "web2");
}

#[test]
fn a_storage_only_move_of_one_of_two_vms_on_a_base_keeps_the_base() {
    let lab = Lab::start(&["hv1"], &|_| String::new());
    let (base, web1, _) = two_vms_on_one_base(&lab);
    let new_dir = lab.host("hv1").dir.join("vms/web1-new");
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "web1",
            "--storage-path",
            s(&new_dir),
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    let old = &v["disks"][0]["old_files"];
    let by_path = |p: &Path| {
        old.as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == s(p))
            .unwrap_or_else(|| panic!("{} is not reported: {v:#}", p.display()))
            .clone()
    };
    assert_eq!(by_path(&web1)["deleted"], true, "{v:#}");
    let kept = by_path(&base);
    assert_eq!(kept["deleted"], false, "{v:#}");
    assert_eq!(
        kept["kept_because"],
        "VM web2 still needs it (it is in the backing chain of one of its disks)",
        "{v:#}"
    );
    assert!(base.exists());
    assert!(!web1.exists());
    passes_checks(&lab, "hv1", "web1");
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "start", "web2"]);
    assert_eq!(code, 0, "{out}{err}");
    passes_checks(&lab, "hv1", "web2");
}
