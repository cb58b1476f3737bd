//! Snapshots on real /dev/kvm across processes: a running memstress + diskstress VM is
//! snapshotted live by one `vmgate-vm` process and continues in another; a dirty page
//! dropped on purpose is caught by the checker; damaged or foreign snapshot files are
//! refused with clear errors.

mod vm_common;

use std::path::{Path, PathBuf};

use vm_common::{checks, count_byte, counter, require_kvm, run_cli, s, tool, write};
use vmgate_migrate::vm::snapshot::{SnapshotError, SnapshotImage};
use vmgate_migrate::vm::state::StateError;

const MEM_AND_DISK: &str = r#"
name = "snapme"
memory_mib = 128
vcpus = 2
[[vcpu]]
program = "memstress"
start_mib = 4
size_mib = 16
marker_every = 8
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 512
marker_every = 64
[[disk]]
path = "disk0.raw"
format = "raw"
"#;

#[test]
fn live_snapshot_continues_in_a_new_process_with_all_checks_passing() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&d.join("disk0.raw")), "8M"],
    );
    let cfg = write(d, "vm.toml", MEM_AND_DISK);
    let snap = d.join("vm.snap");
    let (c1, c2) = (d.join("c1.log"), d.join("c2.log"));

    let run = run_cli(&[
        "run",
        s(&cfg),
        "--console",
        s(&c1),
        "--run-for",
        "1.5",
        "--snapshot",
        s(&snap),
        "--live",
        "--rounds",
        "2",
        "--check",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let j = &run.json;
    for (name, ok, summary) in checks(j) {
        assert!(ok, "source {name}: {summary}");
    }
    let snap_stats = &j["snapshot"];
    assert_eq!(snap_stats["pages"], 32768);
    assert_eq!(
        snap_stats["rounds"].as_array().unwrap().len(),
        4,
        "full copy, 2 rounds, final"
    );
    assert!(snap_stats["dropped_page"].is_null());
    let (passes, seq) = (counter(j, "mailbox", 0), counter(j, "mailbox", 1));
    assert!(
        passes > 0 && seq > 0,
        "the guest ran before the snapshot: {j}"
    );
    let serial_at_snapshot = j["serial_bytes"].as_u64().unwrap();
    assert_eq!(serial_at_snapshot, std::fs::read(&c1).unwrap().len() as u64);

    let restored = run_cli(&[
        "restore",
        s(&snap),
        "--console",
        s(&c2),
        "--run-for",
        "1.5",
        "--check",
        "--json",
    ]);
    assert_eq!(restored.code, 0, "{}\n{}", restored.stdout, restored.stderr);
    let r = &restored.json;
    // The guest resumes exactly where it was paused...
    assert_eq!(counter(r, "mailbox_before", 0), passes);
    assert_eq!(counter(r, "mailbox_before", 1), seq);
    // ...and continues: more passes, the disk sequence goes on, new markers on the console.
    assert!(counter(r, "mailbox", 0) > passes, "{r}");
    assert!(counter(r, "mailbox", 1) > seq + 64, "{r}");
    assert!(count_byte(&c2, b'A') > 0, "memstress markers after restore");
    assert!(
        count_byte(&c2, b'b') > 0,
        "diskstress markers after restore"
    );
    // The serial port's state moved with the VM: its byte count carries on.
    let serial_after = r["serial_bytes"].as_u64().unwrap();
    assert_eq!(
        serial_after,
        serial_at_snapshot + std::fs::read(&c2).unwrap().len() as u64
    );
    let found = checks(r);
    assert_eq!(found.len(), 2);
    for (name, ok, summary) in &found {
        assert!(ok, "restored {name}: {summary}");
    }
    assert_eq!(found[1].0, "disk-sequence");
    assert!(r["block_errors"].as_array().unwrap().is_empty());
}

#[test]
fn a_dropped_dirty_page_is_caught_by_the_checker() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write(
        d,
        "vm.toml",
        r#"
name = "dropme"
memory_mib = 64
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 4
full_content = true
"#,
    );
    // A page in the middle of the range, which every pass rewrites.
    let victim: u64 = (8 << 20) + 500 * 4096;
    let victim_hex = format!("{victim:#x}");
    let snap = d.join("dropped.snap");
    let run = run_cli(&[
        "run",
        s(&cfg),
        "--run-for",
        "1.0",
        "--snapshot",
        s(&snap),
        "--live",
        "--rounds",
        "1",
        "--round-interval-ms",
        "500",
        "--check",
        "--json",
        "--test-drop-dirty-page",
        &victim_hex,
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    // The source VM itself is intact; only the copy lost the page.
    assert!(checks(&run.json).iter().all(|c| c.1), "{}", run.stdout);
    assert_eq!(
        run.json["snapshot"]["dropped_page"], victim,
        "{}",
        run.stdout
    );

    let check = run_cli(&["check", s(&snap), "--json"]);
    assert_eq!(check.code, 1, "{}\n{}", check.stdout, check.stderr);
    let c = &check.json["checks"][0];
    assert_eq!(c["check"], "full-content");
    assert_eq!(c["ok"], false);
    assert_eq!(c["bad_count"], 1, "{c}");
    assert_eq!(c["bad"][0]["gpa"], victim, "{c}");
    // Human-readable output names the page too.
    let human = run_cli(&["check", s(&snap)]);
    assert_eq!(human.code, 1);
    assert!(
        human
            .stdout
            .contains(&format!("page {victim_hex}: word 0 is")),
        "{}",
        human.stdout
    );

    // Control: the same snapshot without the fault passes.
    let good = d.join("good.snap");
    let run = run_cli(&[
        "run",
        s(&cfg),
        "--run-for",
        "0.5",
        "--snapshot",
        s(&good),
        "--live",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let check = run_cli(&["check", s(&good), "--json"]);
    assert_eq!(check.code, 0, "{}\n{}", check.stdout, check.stderr);
    assert_eq!(check.json["checks"][0]["ok"], true);
}

/// A small paused snapshot to damage.
fn small_snapshot(d: &Path) -> (PathBuf, Vec<u8>) {
    let cfg = write(
        d,
        "small.toml",
        r#"
name = "small"
memory_mib = 16
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 4
size_mib = 4
"#,
    );
    let snap = d.join("small.snap");
    let run = run_cli(&[
        "run",
        s(&cfg),
        "--run-for",
        "0.3",
        "--snapshot",
        s(&snap),
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let bytes = std::fs::read(&snap).unwrap();
    (snap, bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn fix_header_crc(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
}

fn open_err(d: &Path, name: &str, bytes: &[u8]) -> (SnapshotError, PathBuf) {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = SnapshotImage::open(&p).expect_err(name);
    (e, p)
}

#[test]
fn damaged_truncated_oversized_foreign_and_newer_files_are_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (snap, good) = small_snapshot(d);
    SnapshotImage::open(&snap).expect("the undamaged snapshot opens");
    let state_offset = usize::try_from(le64(&good, 40)).unwrap();

    // Corrupt: one bit of the VM state flipped.
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0x01;
    let (e, p) = open_err(d, "corrupt-state.snap", &b);
    assert!(
        matches!(&e, SnapshotError::State(StateError::Checksum { .. })),
        "{e:?}"
    );
    let cli = run_cli(&["restore", s(&p), "--run-for", "0"]);
    assert_eq!(cli.code, 2);
    assert!(
        cli.stderr.contains(
            "the snapshot's VM state is unusable: the VM state is corrupt: the payload's CRC-32 is"
        ),
        "{}",
        cli.stderr
    );

    // Corrupt: one byte of a stored guest page changed (the first page the table lists as
    // stored at or above 4 MiB, where memstress writes).
    let table_offset = usize::try_from(le64(&good, 32)).unwrap();
    let stored = |i: usize| good[table_offset + i / 8] & (1 << (i % 8)) != 0;
    let page = (1024..4096)
        .find(|&i| stored(i))
        .expect("memstress wrote a page");
    let mut b = good.clone();
    b[4096 + page * 4096 + 100] ^= 0xFF;
    let p = d.join("corrupt-page.snap");
    std::fs::write(&p, &b).unwrap();
    let cli = run_cli(&["restore", s(&p), "--run-for", "0"]);
    assert_eq!(cli.code, 2, "{}", cli.stdout);
    let expected = format!(
        "guest page {:#x} in the snapshot is corrupt: its checksum does not match",
        page * 4096
    );
    assert!(cli.stderr.contains(&expected), "{}", cli.stderr);

    // Corrupt header.
    let mut b = good.clone();
    b[20] ^= 0x01;
    let (e, _) = open_err(d, "corrupt-header.snap", &b);
    assert_eq!(
        e.to_string(),
        "the snapshot's header is corrupt: its checksum does not match"
    );

    // Truncated.
    let b = &good[..good.len() - 100];
    let (e, p) = open_err(d, "truncated.snap", b);
    assert_eq!(
        e.to_string(),
        format!(
            "the snapshot file is truncated: it has {} bytes but its header describes {}",
            good.len() - 100,
            good.len()
        )
    );
    let cli = run_cli(&["check", s(&p)]);
    assert_eq!(cli.code, 2);
    assert!(cli.stderr.contains("is truncated"), "{}", cli.stderr);
    let (e, _) = open_err(d, "stub.snap", &good[..30]);
    assert!(matches!(e, SnapshotError::Truncated { len: 30, .. }), "{e}");

    // Oversized: the header announces a 1 TiB state; refused before anything is allocated.
    let mut b = good.clone();
    b[48..56].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fix_header_crc(&mut b);
    let (e, _) = open_err(d, "oversized.snap", &b);
    assert_eq!(
        e.to_string(),
        "the snapshot announces a VM state of 1099511627776 bytes, more than the limit of 67108864 bytes; refusing to read it"
    );
    // Oversized the other way: bytes appended after the end.
    let mut b = good.clone();
    b.extend_from_slice(&[0u8; 4096]);
    let (e, _) = open_err(d, "trailing.snap", &b);
    assert_eq!(
        e.to_string(),
        "the snapshot file has 4096 bytes after its end; it is not a complete vmgate snapshot"
    );
    // The state container inside claims more than its cap.
    let mut b = good.clone();
    b[state_offset + 16..state_offset + 24].copy_from_slice(&(100u64 << 20).to_le_bytes());
    let crc = crc32fast::hash(&b[state_offset..state_offset + 28]);
    b[state_offset + 28..state_offset + 32].copy_from_slice(&crc.to_le_bytes());
    let (e, _) = open_err(d, "state-oversized.snap", &b);
    assert!(
        matches!(&e, SnapshotError::State(StateError::TooLarge { len, .. }) if *len == 100 << 20),
        "{e:?}"
    );

    // Wrong version, of the file and of the state inside.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    fix_header_crc(&mut b);
    let (e, p) = open_err(d, "v2.snap", &b);
    assert_eq!(
        e.to_string(),
        "the snapshot has format version 2; this vmgate reads version 1 only"
    );
    let cli = run_cli(&["restore", s(&p)]);
    assert_eq!(cli.code, 2);
    assert!(cli.stderr.contains("format version 2"), "{}", cli.stderr);
    let mut b = good.clone();
    b[state_offset + 8..state_offset + 12].copy_from_slice(&7u32.to_le_bytes());
    let crc = crc32fast::hash(&b[state_offset..state_offset + 28]);
    b[state_offset + 28..state_offset + 32].copy_from_slice(&crc.to_le_bytes());
    let (e, _) = open_err(d, "state-v7.snap", &b);
    assert!(
        matches!(
            &e,
            SnapshotError::State(StateError::UnsupportedVersion {
                found: 7,
                supported: 1
            })
        ),
        "{e:?}"
    );

    // Foreign files.
    let qcow = d.join("foreign.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&qcow), "1M"]);
    let e = SnapshotImage::open(&qcow).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is not a vmgate snapshot: it does not start with \"VMGSNAP\"",
            qcow.display()
        )
    );
    let cli = run_cli(&["check", s(&qcow)]);
    assert_eq!(cli.code, 2);
    assert!(
        cli.stderr.contains("is not a vmgate snapshot"),
        "{}",
        cli.stderr
    );
    let (e, _) = open_err(d, "empty.snap", &[]);
    assert!(matches!(e, SnapshotError::NotASnapshot { .. }), "{e}");
}
