//! Storage-only moves of a running VM through vmgated and the CLI (Hyper-V's Move-VMStorage,
//! virsh blockcopy): `vmgate move-storage VM --storage-path P | --disk SRC=DST`, on the host's
//! socket and through its gateway (`--remote`). What is checked is what an administrator
//! checks: the VM keeps running, its own checks pass on the new files (memory patterns and
//! the guest's disk write sequence), `qemu-img check` passes on them once the VM is off,
//! `vm show` names them, the old files are gone (or kept with `--keep-source`), a destination
//! outside the storage roots is refused with id 1009 and changes nothing, a cancelled move
//! leaves the VM on its old files with nothing at the destination, and a move beyond
//! `max_storage_moves` waits its turn (events 20404, 20405).
//!
//! Run through tests/run, or after `eval "$(tests/domain/up)"` and a build of vmgated and
//! vmgate. The tests change nothing in the directory; each has its own lab (folder, ports).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_control::events::{Event, EventRecord, MoveKind, MovePhase};
use vmgate_testkit::lab::{self as lab_hosts, Lab, disk_vm};

/// A raw image of `mib` MiB: zeroes for the guest's region (the first MiB), then data, so
/// that every MiB is copied.
fn raw_image(path: &Path, mib: usize) {
    let mut data = vec![0u8; mib << 20];
    for (i, b) in data.iter_mut().enumerate().skip(1 << 20) {
        *b = u8::try_from((i / 4096) % 251).unwrap() ^ 0x5A;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Files (recursively) under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The path as the daemon writes it (the storage roots are canonical).
fn canonical(p: &Path) -> PathBuf {
    let folder = std::fs::canonicalize(p.parent().unwrap()).unwrap();
    folder.join(p.file_name().unwrap())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vm show`'s disks.
fn shown_disks(lab: &Lab, vm: &str) -> Vec<String> {
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "show", vm]);
    assert_eq!(code, 0, "{v}");
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect()
}

/// `vm list`'s state of the VM.
fn state(lab: &Lab, vm: &str) -> String {
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "list"]);
    assert_eq!(code, 0, "{v}");
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == vm)
        .map(|x| x["state"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("{vm} is not listed: {v}"))
}

/// The VM runs and its self-checks pass (its memory page by page, its disk sequence on the
/// file it uses now).
fn runs_and_checks(lab: &Lab, vm: &str) {
    assert_eq!(state(lab, vm), "running");
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "check", vm]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["passed"], Value::Bool(true), "{v}");
    let details = v["details"].to_string();
    assert!(details.contains("disk"), "no disk check ran: {v}");
}

/// After a cold boot the guest starts its disk sequence again over the blocks the previous
/// run wrote: its disk check holds once it has written its whole region (256 blocks, well
/// under a second); its memory check at once.
fn boots_and_checks(lab: &Lab, vm: &str) {
    assert_eq!(state(lab, vm), "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, v) = lab.run_json("alice", &["--host", "hv1", "vm", "check", vm]);
        if code == 0 && v["passed"] == Value::Bool(true) {
            return;
        }
        assert!(Instant::now() < deadline, "{vm} fails its checks: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// hv1's events of one job.
fn job_events(lab: &Lab, job: &str) -> Vec<EventRecord> {
    lab.host("hv1")
        .events()
        .into_iter()
        .filter(|r| serde_json::to_value(&r.event).unwrap()["job"] == job)
        .collect()
}

/// Polls `jobs list` until `pick` finds a job; returns it.
fn wait_job(lab: &Lab, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "list"]);
        if let Some(j) = v["jobs"].as_array().into_iter().flatten().find(|j| pick(j)) {
            return j.clone();
        }
        assert!(Instant::now() < deadline, "never saw {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_vm_moves_its_storage_keeps_running_and_its_old_files_are_gone() {
    let lab = Lab::start(&["hv1"], &|_| String::new());
    let vms = lab.host("hv1").dir.join("vms");
    // Disk 0: qcow2, written by the guest all along; disk 1: raw data the guest leaves alone.
    let old = vms.join("old/st.qcow2");
    let old_data = vms.join("old/st-data.raw");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", s(&old), "16M"]);
    assert!(ok, "{out}");
    raw_image(&old_data, 3);
    let data = std::fs::read(&old_data).unwrap();
    let config = format!(
        "{}[[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
        disk_vm("st", &old, "qcow2"),
        s(&old_data)
    );
    lab.create_vm("hv1", &config);
    runs_and_checks(&lab, "st");

    let new_dir = vms.join("new");
    let (code, out, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "st",
            "--storage-path",
            s(&new_dir),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    // A progress line per phase at least, then the summary.
    let phases: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["progress"]["phase"].as_str().map(str::to_owned))
        .collect();
    for p in ["plan", "bulk", "switch", "release"] {
        assert!(phases.iter().any(|x| x == p), "no {p} progress: {out}");
    }
    let v = lab_hosts::last_json(&out).unwrap();
    let new = canonical(&new_dir.join("st.qcow2"));
    let new_data = canonical(&new_dir.join("st-data.raw"));
    assert_eq!(v["result"], "storage_moved", "{v:#}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 2, "{v:#}");
    for (i, (from, to)) in [(&old, &new), (&old_data, &new_data)]
        .into_iter()
        .enumerate()
    {
        let d = &v["disks"][i];
        assert_eq!(d["disk"], i, "{v:#}");
        assert_eq!(d["source"], s(from), "{v:#}");
        assert_eq!(d["destination"], s(to), "{v:#}");
        assert_eq!(d["old_files"][0]["path"], s(from), "{v:#}");
        assert_eq!(d["old_files"][0]["deleted"], true, "{v:#}");
    }
    assert!(v["bytes_copied"].as_u64().unwrap() >= 3 << 20, "{v:#}");
    let job = v["job"].as_str().unwrap().to_owned();

    // It kept running, on the new files: its checks pass there, vm show names them, the old
    // files are gone and nothing else was left behind.
    runs_and_checks(&lab, "st");
    assert_eq!(shown_disks(&lab, "st"), [s(&new), s(&new_data)]);
    assert!(!old.exists(), "the old file is still there");
    assert!(!old_data.exists(), "the old file is still there");
    assert_eq!(files_under(&new_dir), [new_data.clone(), new.clone()]);

    // The job and its events: started (kind storage), each disk's phases, completed.
    let (code, j) = lab.run_json("alice", &["--host", "hv1", "jobs", "show", &job]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["kind"], "storage", "{j}");
    assert_eq!(j["direction"], "local", "{j}");
    assert_eq!(j["state"], "completed", "{j}");
    let events = job_events(&lab, &job);
    let ids: Vec<u32> = events.iter().map(|r| r.id).collect();
    assert_eq!(ids.first(), Some(&20400), "{events:#?}");
    assert_eq!(ids.last(), Some(&20402), "{events:#?}");
    assert!(
        !ids.contains(&20404),
        "a move under the limit does not queue"
    );
    assert!(matches!(
        &events[0].event,
        Event::MigrationStarted { kind: MoveKind::Storage, destination, .. }
            if *destination == new_dir.canonicalize().unwrap().display().to_string()
    ));
    let phases: Vec<MovePhase> = events
        .iter()
        .filter_map(|r| match r.event {
            Event::MigrationPhase { phase, .. } => Some(phase),
            _ => None,
        })
        .collect();
    let per_disk = [
        MovePhase::Setup,
        MovePhase::Storage,
        MovePhase::Switchover,
        MovePhase::Handoff,
    ];
    assert_eq!(phases, [per_disk, per_disk].concat());

    // Only the disk named moves: disk 1 again, disk 0 stays.
    let data2 = vms.join("data2/st-data.raw");
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "st",
            "--disk",
            &format!("{}={}", s(&new_data), s(&data2)),
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    let data2 = canonical(&data2);
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["disks"][0]["disk"], 1, "{v:#}");
    assert_eq!(shown_disks(&lab, "st"), [s(&new), s(&data2)]);
    assert!(!new_data.exists());
    runs_and_checks(&lab, "st");

    // Off, the files pass qemu-img check and hold the data byte for byte; started again,
    // the VM boots from them.
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "stop", "st"]);
    assert_eq!(code, 0, "{out}{err}");
    let (ok, report) = qemu_img(&["check", s(&new)]);
    assert!(ok, "{report}");
    assert!(report.contains("No errors were found"), "{report}");
    assert!(
        std::fs::read(&data2).unwrap() == data,
        "disk 1 changed in the moves"
    );
    let (code, out, err) = lab.run("alice", &["--host", "hv1", "vm", "start", "st"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(shown_disks(&lab, "st"), [s(&new), s(&data2)]);
    boots_and_checks(&lab, "st");
}

#[test]
fn keep_source_keeps_the_old_file_and_a_destination_outside_the_roots_changes_nothing() {
    let lab = Lab::start(&["hv1", "hv2"], &|_| String::new());
    let vms = lab.host("hv1").dir.join("vms");
    let old = vms.join("ks.raw");
    raw_image(&old, 4);
    lab.create_vm("hv1", &disk_vm("ks", &old, "raw"));
    let before = shown_disks(&lab, "ks");

    // Outside the storage roots, as written or through a symbolic link: refused with 1009
    // before anything is written; no job, nothing created, the VM as it was.
    let outside = lab.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, vms.join("escape")).unwrap();
    let to_outside = outside.join("ks.raw");
    let through_link = vms.join("escape/ks.raw");
    let link_arg = format!("{}={}", s(&old), s(&through_link));
    for (args, why) in [
        (
            vec!["--storage-path", s(&outside)],
            "is outside this host's storage roots",
        ),
        (vec!["--disk", link_arg.as_str()], "through a symbolic link"),
    ] {
        let mut a = vec!["--host", "hv1", "move-storage", "ks"];
        a.extend(args);
        let (code, out, err) = lab.run("alice", &a);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("[1009]"), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(
            err.contains("ks keeps running on its current files"),
            "{err}"
        );
    }
    assert!(!to_outside.exists());
    assert_eq!(files_under(&outside), Vec::<PathBuf>::new());
    assert_eq!(shown_disks(&lab, "ks"), before);
    let (_, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "list"]);
    assert_eq!(v["jobs"], Value::Array(Vec::new()), "{v}");
    runs_and_checks(&lab, "ks");

    // Asking wrongly: usage (2), a disk the VM does not have (2), a VM that is not there (3).
    let (code, _, err) = lab.run(
        "alice",
        &["--host", "hv1", "move-storage", "ks", "--disk", "nonsense"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SRC=DST"), "{err}");
    let (code, _, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "ks",
            "--disk",
            &format!("/nowhere/ks.raw={}", s(&vms.join("x.raw"))),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ks has no disk /nowhere/ks.raw"), "{err}");
    let (code, _, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "ghost",
            "--storage-path",
            s(&vms),
        ],
    );
    assert_eq!(code, 3, "{err}");

    // From a workstation, through hv1's gateway: one disk to a new name, the old file kept.
    let new = vms.join("kept/ks-new.raw");
    let (code, v) = lab.run_json(
        "alice",
        &[
            "--host",
            "hv1",
            "--remote",
            "move-storage",
            "ks",
            "--disk",
            &format!("{}={}", s(&old), s(&new)),
            "--keep-source",
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    let new = canonical(&new);
    assert_eq!(v["user"], "alice@LAB.EXAMPLE.TEST", "{v:#}");
    assert_eq!(v["disks"][0]["destination"], s(&new), "{v:#}");
    let kept = &v["disks"][0]["old_files"][0];
    assert_eq!(kept["deleted"], false, "{v:#}");
    assert_eq!(
        kept["kept_because"], "the source files were to be kept",
        "{v:#}"
    );
    assert!(old.exists(), "--keep-source deleted the old file");
    assert_eq!(
        std::fs::metadata(&new).unwrap().len(),
        std::fs::metadata(&old).unwrap().len()
    );
    assert_eq!(shown_disks(&lab, "ks"), [s(&new)]);
    runs_and_checks(&lab, "ks");
    // The summary for people names both.
    // Into the lab's shared storage (a storage root of every host), for the move below.
    let third_dir = lab.shared().join("third");
    let (code, out, err) = lab.run(
        "alice",
        &[
            "--host",
            "hv1",
            "move-storage",
            "ks",
            "--storage-path",
            s(&third_dir),
            "--keep-source",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("{out}");
    assert!(out.starts_with("Moved the storage of ks (job "), "{out}");
    assert!(
        out.contains(&format!(
            "kept {}: the source files were to be kept",
            s(&new)
        )),
        "{out}"
    );
    assert!(new.exists());
    runs_and_checks(&lab, "ks");

    // A live move without its storage (shared storage): hv2 opens the file ks runs on now,
    // not the one it was started from (still there, stale).
    let third = canonical(&third_dir.join("ks-new.raw"));
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "move", "ks", "--to", "hv2"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["stats"]["shared_disks"][0], s(&third), "{v:#}");
    assert_eq!(v["stats"]["disk_bytes_sent"], 0, "{v:#}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let (code, shown) = lab.run_json("alice", &["--host", "hv2", "vm", "show", "ks"]);
        if code == 0 {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "ks is not listed at hv2: {shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["disks"][0], s(&third), "{shown:#}");
    let (code, v) = lab.run_json("alice", &["--host", "hv2", "vm", "check", "ks"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["passed"], Value::Bool(true), "{v}");
}

#[test]
fn a_cancelled_storage_move_leaves_the_vm_on_its_old_file_and_the_queued_one_then_moves() {
    let lab = Lab::start(&["hv1"], &|_| String::new());
    let (code, v) = lab.run_json(
        "alice",
        &["--host", "hv1", "host", "set", "--max-storage-moves", "1"],
    );
    assert_eq!(code, 0, "{v}");
    let vms = lab.host("hv1").dir.join("vms");
    let slow_old = vms.join("slow.raw");
    let next_old = vms.join("next.raw");
    raw_image(&slow_old, 16);
    raw_image(&next_old, 4);
    lab.create_vm("hv1", &disk_vm("slow", &slow_old, "raw"));
    lab.create_vm("hv1", &disk_vm("next", &next_old, "raw"));

    // 16 MiB at 2 MiB/s: caught while it copies.
    let slow_dir = vms.join("slow-new");
    let slow = lab
        .cli(
            "alice",
            &[
                "--host",
                "hv1",
                "move-storage",
                "slow",
                "--storage-path",
                s(&slow_dir),
                "--bandwidth",
                "2MiB/s",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = wait_job(&lab, "slow's move copying", |j| {
        j["vm"] == "slow"
            && j["state"] == "running"
            && j["progress"]["phase"] == "bulk"
            && j["progress"]["bytes_copied"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(running["kind"], "storage", "{running}");
    let slow_id = running["id"].as_str().unwrap().to_owned();

    // A second storage move waits behind the limit of 1.
    let next_dir = vms.join("next-new");
    let mut next = lab
        .cli(
            "alice",
            &[
                "--host",
                "hv1",
                "move-storage",
                "next",
                "--storage-path",
                s(&next_dir),
                "--json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let queued = wait_job(&lab, "next's move queued", |j| {
        j["vm"] == "next" && j["state"] == "queued"
    });
    assert_eq!(queued["position"], 1, "{queued}");
    let next_id = queued["id"].as_str().unwrap().to_owned();
    // Its first line says so.
    let mut first = String::new();
    BufReader::new(next.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["progress"]["phase"], "queued", "{first}");
    assert_eq!(first["progress"]["kind"], "storage", "{first}");
    assert_eq!(first["progress"]["position"], 1, "{first}");
    assert_eq!(first["progress"]["limit"], 1, "{first}");

    // Cancel the copy by its job id.
    let (code, v) = lab.run_json("alice", &["--host", "hv1", "jobs", "cancel", &slow_id]);
    assert_eq!(code, 0, "{v}");
    let out = slow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cancelled by"), "{err}");
    assert!(err.contains("keeps running on its old disk"), "{err}");
    let (_, j) = lab.run_json("alice", &["--host", "hv1", "jobs", "show", &slow_id]);
    assert_eq!(j["state"], "cancelled", "{j}");
    // The VM runs on its old file, which is still there; nothing is left at the destination.
    assert!(slow_old.exists());
    assert_eq!(shown_disks(&lab, "slow"), [s(&slow_old)]);
    assert!(!slow_dir.exists(), "{:?}", files_under(&slow_dir));
    runs_and_checks(&lab, "slow");

    // The queued move got the slot and completed.
    let out = next.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let v = lab_hosts::last_json(&text).unwrap();
    assert_eq!(v["job"], next_id, "{v:#}");
    assert_eq!(
        shown_disks(&lab, "next"),
        [s(&canonical(&next_dir.join("next.raw")))]
    );
    assert!(!next_old.exists());
    runs_and_checks(&lab, "next");

    // The events: slow's move failed (cancelled); next's queued, dequeued, started, done.
    let ids = |job: &str| {
        job_events(&lab, job)
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&slow_id).last(),
        Some(&20403),
        "{:#?}",
        job_events(&lab, &slow_id)
    );
    let next_events = job_events(&lab, &next_id);
    let next_ids: Vec<u32> = next_events.iter().map(|r| r.id).collect();
    assert_eq!(&next_ids[..3], &[20404, 20405, 20400], "{next_events:#?}");
    assert_eq!(next_ids.last(), Some(&20402), "{next_events:#?}");
    assert!(matches!(
        next_events[0].event,
        Event::MigrationQueued {
            kind: MoveKind::Storage,
            position: 1,
            limit: 1,
            ..
        }
    ));
}
