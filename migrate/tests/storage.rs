//! Storage moves on real KVM with real images made by qemu-img: a running VM's disk moves to
//! a new folder (raw, and a 3-layer qcow2 chain) and keeps running; cancel during the bulk
//! copy and during mirroring; a full destination (a small tmpfs); destinations outside the
//! storage roots. What is checked is what an administrator would check: the guest's disk
//! sequence on the new file, `qemu-img check` / `qemu-img info --backing-chain`, which files
//! exist afterwards.

mod vm_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_common::{
    Tmpfs, assert_moved_chain, canonical_dir, checks_pass, files_under, qcow2_on, raw_image,
    require_kvm, s, tool, wait_counter,
};
use vmgate_migrate::disk::{Disk, DiskFormat, DiskSpec};
use vmgate_migrate::storage::local::{
    LocalMoveError, LocalMoveOptions, MovePhase, MoveProgress, move_storage,
};
use vmgate_migrate::storage::paths::{StoragePathError, StorageRoots};
use vmgate_migrate::storage::plan::{LayerAction, PlanError};
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

/// A VM with diskstress on vCPU 0 over `blocks` 4 KiB blocks of disk 0 (`disk`, `format`).
fn vm_with_disk(dir: &Path, disk: &Path, format: &str, blocks: u64) -> Vm {
    require_kvm();
    let text = format!(
        r#"
name = "storage"
memory_mib = 32
vcpus = 1
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = {blocks}
marker_every = 1000
[[disk]]
path = "{}"
format = "{format}"
"#,
        s(disk)
    );
    let config = VmConfig::from_toml(&text, Some(dir)).expect("valid test config");
    Vm::create(config, &VmOptions::default()).expect("VM starts")
}

fn no_progress() -> impl FnMut(&MoveProgress) {
    |_| {}
}

#[test]
fn running_vm_moves_its_raw_disk_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let disk = src.join("d0.raw");
    raw_image(&disk, 8);
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 300);

    let dest = root.join("vm1/d0.raw");
    let before = vm.mailbox(0).unwrap().counter;
    let mut phases = Vec::new();
    let report = move_storage(
        &vm,
        0,
        &dest,
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if phases.last() != Some(&p.phase) {
                phases.push(p.phase);
            }
        },
    )
    .unwrap();
    assert!(vm.running(), "the VM runs after the move");
    // At once (before the guest rewrites its region): the blocks written during the move,
    // up to the pause, are on the new file.
    let after = vm.mailbox(0).unwrap().counter;
    checks_pass(&vm);
    eprintln!(
        "guest writes: {} during the move, {} since; paused {:?}, {} rounds, {} blocks in the final pass",
        after - before,
        vm.mailbox(0).unwrap().counter - after,
        report.paused,
        report.rounds,
        report.final_blocks
    );
    assert_eq!(
        phases,
        [
            MovePhase::Plan,
            MovePhase::Bulk,
            MovePhase::Dirty,
            MovePhase::Switch,
            MovePhase::Release
        ]
    );
    assert!(
        vm.mailbox(0).unwrap().counter > before,
        "the guest kept writing during the move"
    );
    assert_eq!(vm.disk(0).unwrap().path(), dest);
    assert_eq!(vm.disk_specs()[0].path, dest);
    assert_eq!(report.destination, dest);
    assert!(report.rounds >= 1);
    assert!(report.bulk_bytes >= 8 << 20, "{report:?}");
    assert_eq!(report.source_files.len(), 1);
    assert!(report.source_files[0].deleted, "{report:?}");
    assert!(!disk.exists(), "the old file is gone");
    assert_eq!(
        files_under(&root),
        vec![dest.clone()],
        "no partial file left"
    );

    // More guest writes, on the new file; the sequence check passes there.
    wait_counter(&vm, 0, 300);
    checks_pass(&vm);
    vm.pause().unwrap();
    vm.flush_disks().unwrap();
    let last = vm.mailbox(0).unwrap().counter;
    drop(vm);
    // The data outside the guest's region came along byte for byte.
    let moved = std::fs::read(&dest).unwrap();
    assert_eq!(moved.len(), 8 << 20);
    let mut expect = vec![0u8; 8 << 20];
    for (i, b) in expect.iter_mut().enumerate().skip(1 << 20) {
        *b = u8::try_from((i / 4096) % 251).unwrap() ^ 0x5A;
    }
    assert!(moved[1 << 20..] == expect[1 << 20..]);
    // The file alone, opened afresh, holds the guest's last writes.
    let d = Disk::open(
        &DiskSpec {
            path: dest.clone(),
            format: DiskFormat::Raw,
        },
        false,
    )
    .unwrap();
    let region = vmgate_migrate::vm::programs::DiskRegion {
        start_block: 0,
        blocks: 256,
        block_size: 4096,
    };
    let r = vmgate_migrate::vm::check::check_disk_sequence(&d, 0, 0, region, last).unwrap();
    assert!(r.ok, "{r:?}");
}

#[test]
fn keep_source_keeps_the_old_qcow2_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&disk), "16M"],
    );
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &disk, "qcow2", 512);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 200);
    let dest = root.join("d0.qcow2");
    let report = move_storage(
        &vm,
        0,
        &dest,
        &roots,
        &LocalMoveOptions {
            keep_source: true,
            ..LocalMoveOptions::default()
        },
        &AtomicBool::new(false),
        &mut no_progress(),
    )
    .unwrap();
    assert!(disk.exists(), "kept as asked");
    assert!(!report.source_files[0].deleted);
    assert_eq!(
        report.source_files[0].kept_because.as_deref(),
        Some("the source files were to be kept")
    );
    assert_eq!(vm.disk(0).unwrap().path(), dest);
    // The new file is locked the way QEMU locks: qemu-io cannot write it meanwhile.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", s(&dest)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("lock"),
        "qemu-io wrote a disk in use: {stderr}"
    );
    wait_counter(&vm, 0, 200);
    checks_pass(&vm);
    vm.pause().unwrap();
    drop(vm);
    tool("qemu-img", &["check", "-q", s(&dest)]);
    // The old file was released: it can be opened for writing again.
    Disk::open(
        &DiskSpec {
            path: disk,
            format: DiskFormat::Qcow2,
        },
        true,
    )
    .unwrap();
}

/// base.raw (0x11 at 8 MiB) <- mid.qcow2 (relative reference; 0x22 at 12 MiB) <- top
/// (absolute reference to mid). Returns (mid, top).
fn three_layers(dir: &Path, top_name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    if !base.exists() {
        tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "16M"]);
        tool(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x11 8M 64k", s(&base)],
        );
        qcow2_on(&mid, "base.raw", "raw");
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x22 12M 64k", s(&mid)],
        );
    }
    let top = dir.join(top_name);
    qcow2_on(&top, s(&mid), "qcow2");
    (mid, top)
}

fn read_at(path: &Path, offset: u64) -> u8 {
    let d = Disk::open(
        &DiskSpec {
            path: path.to_path_buf(),
            format: DiskFormat::Qcow2,
        },
        false,
    )
    .unwrap();
    let mut b = [0u8; 1];
    d.read_at(&mut b, offset).unwrap();
    b[0]
}

#[test]
fn three_layer_chain_moves_and_a_second_vm_reuses_the_parents() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let (mid, top1) = three_layers(&src, "top1.qcow2");
    let (_, top2) = three_layers(&src, "top2.qcow2");
    let base = src.join("base.raw");
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let folder = root.join("vms");

    let vm1 = vm_with_disk(dir.path(), &top1, "qcow2", 200);
    let vm2 = vm_with_disk(dir.path(), &top2, "qcow2", 200);
    vm1.resume().unwrap();
    vm2.resume().unwrap();
    wait_counter(&vm1, 0, 250);
    wait_counter(&vm2, 0, 250);

    // VM 1: both parents are copied; the old ones stay, VM 2 still uses them.
    let r1 = move_storage(
        &vm1,
        0,
        &folder.join("top1.qcow2"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(
        r1.layers,
        vec![
            (folder.join("base.raw"), LayerAction::Copy),
            (folder.join("mid.qcow2"), LayerAction::Copy),
            (folder.join("top1.qcow2"), LayerAction::Mirror),
        ]
    );
    checks_pass(&vm1);
    assert!(!top1.exists());
    assert!(base.exists() && mid.exists());
    let kept: Vec<_> = r1
        .source_files
        .iter()
        .filter(|f| !f.deleted)
        .map(|f| (f.path.clone(), f.kept_because.clone().unwrap()))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept[0].1.contains("still has it open"), "{kept:?}");

    // VM 2 into the same folder: the parents there are identical, verified by checksum.
    let r2 = move_storage(
        &vm2,
        0,
        &folder.join("top2.qcow2"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut no_progress(),
    )
    .unwrap();
    checks_pass(&vm2);
    assert_eq!(r2.layers[0].1, LayerAction::Reuse);
    assert_eq!(r2.layers[1].1, LayerAction::Reuse);
    assert!(
        r2.source_files.iter().all(|f| f.deleted),
        "{:?}",
        r2.source_files
    );
    assert!(files_under(&src).is_empty(), "{:?}", files_under(&src));

    for vm in [&vm1, &vm2] {
        wait_counter(vm, 0, 250);
        checks_pass(vm);
        vm.pause().unwrap();
        vm.flush_disks().unwrap();
    }
    drop((vm1, vm2));

    for top in ["top1.qcow2", "top2.qcow2"] {
        let t = folder.join(top);
        assert_moved_chain(&folder, &t);
        // The lower layers' data reads through the new chain.
        assert_eq!(read_at(&t, 8 << 20), 0x11);
        assert_eq!(read_at(&t, 12 << 20), 0x22);
    }
    tool("qemu-img", &["check", "-q", s(&folder.join("mid.qcow2"))]);
}

/// Runs a move that raises `cancel` when the progress reaches `phase`.
fn cancelled_move(phase: MovePhase) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.raw");
    raw_image(&disk, 24);
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 300);
    let cancel = AtomicBool::new(false);
    let mut bytes_at_cancel = 0;
    let e = move_storage(
        &vm,
        0,
        &root.join("new/d0.raw"),
        &roots,
        &LocalMoveOptions::default(),
        &cancel,
        &mut |p| {
            if p.phase == phase && p.bytes_copied > 0 && !cancel.load(Ordering::Relaxed) {
                bytes_at_cancel = p.bytes_copied;
                cancel.store(true, Ordering::Relaxed);
            }
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, LocalMoveError::Cancelled { index: 0 }),
        "{phase:?}: {e}"
    );
    assert!(bytes_at_cancel > 0, "{phase:?}: cancelled after copying");
    assert_eq!(
        e.to_string(),
        "the move of disk 0 was cancelled; the VM keeps running on its old disk"
    );
    assert!(vm.running());
    assert_eq!(vm.disk(0).unwrap().path(), disk);
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
    assert!(
        !root.join("new").exists(),
        "the folder the move made is gone"
    );
    wait_counter(&vm, 0, 200);
    checks_pass(&vm);
}

#[test]
fn cancel_during_the_bulk_copy_leaves_the_source_in_use_and_nothing_behind() {
    cancelled_move(MovePhase::Bulk);
}

#[test]
fn cancel_during_mirroring_leaves_the_source_in_use_and_nothing_behind() {
    cancelled_move(MovePhase::Dirty);
}

#[test]
fn a_full_destination_gives_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "8m");
    let roots = StorageRoots::new([&small.0]).unwrap();
    let root = std::fs::canonicalize(&small.0).unwrap();

    // 1. More data than the file system holds: refused before anything is written.
    let big = dir.path().join("big.raw");
    raw_image(&big, 12);
    let vm = vm_with_disk(dir.path(), &big, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);
    let e = move_storage(
        &vm,
        0,
        &root.join("vm/big.raw"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut no_progress(),
    )
    .unwrap_err();
    match &e {
        LocalMoveError::Plan {
            source: PlanError::NoSpace {
                needed, available, ..
            },
            ..
        } => {
            assert!(*needed >= 11 << 20 && *available <= 8 << 20, "{e}");
        }
        other => panic!("expected a space error, got {other:?}"),
    }
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains("free but the move needs") && chain.contains("free some space"),
        "{chain}"
    );
    assert!(files_under(&root).is_empty());
    assert!(!root.join("vm").exists());
    assert!(vm.running());
    drop(vm);

    // 2. Space runs out in the middle of the copy (something else fills the file system
    // once the bulk copy has started): ENOSPC, cleaned up, the VM runs on.
    let disk = dir.path().join("d0.raw");
    raw_image(&disk, 6);
    let vm = vm_with_disk(dir.path(), &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);
    let filler = root.join("filler");
    let mut filled = false;
    let e = move_storage(
        &vm,
        0,
        &root.join("vm/d0.raw"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if p.phase == MovePhase::Bulk && p.bytes_copied > 0 && !filled {
                filled = true;
                let chunk = vec![1u8; 1 << 20];
                let mut f = std::fs::File::create(&filler).unwrap();
                while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
            }
        },
    )
    .unwrap_err();
    assert!(filled);
    assert!(
        matches!(e, LocalMoveError::NoSpace { index: 0, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("ran out of space; the VM keeps running on its old disk"),
        "{e}"
    );
    assert_eq!(
        files_under(&root),
        vec![filler.clone()],
        "only the filler is left"
    );
    assert!(!root.join("vm").exists());
    assert!(vm.running());
    assert_eq!(vm.disk(0).unwrap().path(), disk);
    wait_counter(&vm, 0, 200);
    checks_pass(&vm);
    drop(vm);
    // The roots hold the tmpfs open: close them before it is unmounted.
    drop(roots);
    drop(small);
}

#[test]
fn destinations_outside_the_roots_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.raw");
    raw_image(&disk, 2);
    let root = canonical_dir(dir.path(), "root");
    let outside = canonical_dir(dir.path(), "outside");
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &disk, "raw", 64);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 50);

    let cases: Vec<(PathBuf, &str)> = vec![
        (root.join("../outside/d0.raw"), "contains \"..\""),
        (
            outside.join("d0.raw"),
            "is outside this host's storage roots",
        ),
        (root.join("link/d0.raw"), "through a symbolic link"),
        (PathBuf::from("root/d0.raw"), "is a relative path"),
    ];
    for (dest, text) in cases {
        let e = move_storage(
            &vm,
            0,
            &dest,
            &roots,
            &LocalMoveOptions::default(),
            &AtomicBool::new(false),
            &mut no_progress(),
        )
        .unwrap_err();
        let LocalMoveError::Plan {
            source: PlanError::Path(p),
            ..
        } = &e
        else {
            panic!("{}: expected a path error, got {e:?}", dest.display());
        };
        assert!(p.to_string().contains(text), "{p}");
        assert!(p.to_string().contains(s(&root)), "names the root: {p}");
        if let StoragePathError::SymlinkEscape { resolved, .. } = p {
            assert_eq!(resolved, &outside);
        }
    }
    assert!(files_under(&outside).is_empty());
    assert!(files_under(&root).is_empty());
    assert!(vm.running());
    assert_eq!(vm.disk(0).unwrap().path(), disk);
    checks_pass(&vm);
}

#[test]
fn a_disk_is_swapped_only_while_paused_and_only_for_one_of_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.raw");
    raw_image(&disk, 2);
    let vm = vm_with_disk(dir.path(), &disk, "raw", 64);
    vm.resume().unwrap();
    let other = dir.path().join("other.raw");
    raw_image(&other, 2);
    let open = |p: &Path| {
        std::sync::Arc::new(
            Disk::open(
                &DiskSpec {
                    path: p.to_path_buf(),
                    format: DiskFormat::Raw,
                },
                true,
            )
            .unwrap(),
        )
    };
    let e = vm.swap_disk(0, open(&other)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the disk behind a block device can only be replaced while the VM is paused"
    );
    vm.pause().unwrap();
    let small = dir.path().join("small.raw");
    raw_image(&small, 1);
    let e = vm.swap_disk(0, open(&small)).unwrap_err();
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert_eq!(
        cause,
        format!(
            "disk {} has 2048 sectors and cannot replace disk 0, which has 4096",
            small.display()
        )
    );
    let e = vm.swap_disk(3, open(&small)).unwrap_err();
    assert_eq!(
        std::error::Error::source(&e).unwrap().to_string(),
        "the VM has no disk 3; it has 1"
    );
    assert_eq!(vm.disk(0).unwrap().path(), disk, "nothing changed");
}

#[test]
fn all_disks_move_into_one_folder_and_bad_per_disk_tables_are_refused_first() {
    use vmgate_migrate::storage::local::move_vm_storage;
    use vmgate_migrate::storage::paths::StorageDestination;
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("sys.raw");
    let d1 = dir.path().join("data.qcow2");
    raw_image(&d0, 4);
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&d1), "8M"]);
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let text = format!(
        r#"
name = "two"
memory_mib = 32
vcpus = 2
[[vcpu]]
program = "diskstress"
disk = 0
blocks = 128
[[vcpu]]
program = "diskstress"
disk = 1
blocks = 128
[[disk]]
path = "{}"
format = "raw"
[[disk]]
path = "{}"
format = "qcow2"
"#,
        s(&d0),
        s(&d1)
    );
    let vm = Vm::create(
        VmConfig::from_toml(&text, Some(dir.path())).unwrap(),
        &VmOptions::default(),
    )
    .unwrap();
    vm.resume().unwrap();
    wait_counter(&vm, 0, 200);

    // One entry outside the roots: nothing moves, nothing is written.
    let bad = StorageDestination::PerDisk(vec![
        (0, root.join("a/sys.raw")),
        (1, dir.path().join("elsewhere/data.qcow2")),
    ]);
    let e = move_vm_storage(
        &vm,
        &bad,
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            LocalMoveError::Destination(StoragePathError::OutsideRoots { .. })
        ),
        "{e:?}"
    );
    assert!(files_under(&root).is_empty());
    assert!(!dir.path().join("elsewhere").exists());

    let folder = root.join("two");
    let mut seen = std::collections::BTreeSet::new();
    let reports = move_vm_storage(
        &vm,
        &StorageDestination::Folder(folder.clone()),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |disk, _| {
            seen.insert(disk);
        },
    )
    .unwrap();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [0, 1]);
    assert_eq!(reports.len(), 2);
    assert_eq!(vm.disk(0).unwrap().path(), folder.join("sys.raw"));
    assert_eq!(vm.disk(1).unwrap().path(), folder.join("data.qcow2"));
    assert!(!d0.exists() && !d1.exists());
    wait_counter(&vm, 0, 200);
    checks_pass(&vm);
    vm.pause().unwrap();
    drop(vm);
    tool("qemu-img", &["check", "-q", s(&folder.join("data.qcow2"))]);
}

#[test]
fn a_destination_that_fills_up_while_parents_are_copied_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "8m");
    let roots = StorageRoots::new([&small.0]).unwrap();
    let root = std::fs::canonicalize(&small.0).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // base.raw: 4 MiB of data; mid.qcow2: 2 MiB of its own; top.qcow2 on them.
    let base = src.join("base.raw");
    std::fs::write(&base, vec![0x33u8; 4 << 20]).unwrap();
    let mid = src.join("mid.qcow2");
    qcow2_on(&mid, "base.raw", "raw");
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 2M 2M", s(&mid)],
    );
    let top = src.join("top.qcow2");
    qcow2_on(&top, "mid.qcow2", "qcow2");
    let vm = vm_with_disk(dir.path(), &top, "qcow2", 64);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);

    // The base is copied and renamed into place; space runs out during the mid layer.
    let filler = root.join("filler");
    let mut filled = false;
    let mut base_done = false;
    let e = move_storage(
        &vm,
        0,
        &root.join("vm/top.qcow2"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if p.phase == MovePhase::Parents && p.layer == 1 && !filled {
                base_done = root.join("vm/base.raw").exists();
                filled = true;
                let chunk = vec![1u8; 1 << 20];
                let mut f = std::fs::File::create(&filler).unwrap();
                while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
            }
        },
    )
    .unwrap_err();
    assert!(
        filled && base_done,
        "the base was in place when space ran out"
    );
    assert!(matches!(e, LocalMoveError::NoSpace { .. }), "{e:?}");
    assert_eq!(
        files_under(&root),
        vec![filler],
        "the copied base is gone too"
    );
    assert!(!root.join("vm").exists());
    assert!(vm.running());
    assert_eq!(vm.disk(0).unwrap().path(), top);
    assert!(base.exists() && mid.exists() && top.exists());
    wait_counter(&vm, 0, 100);
    checks_pass(&vm);
    drop(vm);
    // The roots hold the tmpfs open: close them before it is unmounted.
    drop(roots);
    drop(small);
}

#[test]
fn a_second_move_of_a_disk_being_moved_is_refused_and_the_first_completes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0.raw");
    raw_image(&disk, 8);
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);
    let mut second = None;
    let report = move_storage(
        &vm,
        0,
        &root.join("first/d0.raw"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if p.phase == MovePhase::Bulk && second.is_none() {
                second = Some(
                    move_storage(
                        &vm,
                        0,
                        &root.join("second/d0.raw"),
                        &roots,
                        &LocalMoveOptions::default(),
                        &AtomicBool::new(false),
                        &mut no_progress(),
                    )
                    .map(|_| ()),
                );
            }
        },
    )
    .unwrap();
    let e = second.unwrap().unwrap_err();
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(text.contains("is already being mirrored"), "{text}");
    assert!(!root.join("second").exists());
    assert_eq!(vm.disk(0).unwrap().path(), report.destination);
    checks_pass(&vm);
}

#[test]
fn a_file_another_vm_needs_is_kept_and_named_and_the_rest_goes() {
    use std::sync::Arc;
    use vmgate_migrate::storage::users::NeededFiles;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let (mid, top1) = three_layers(&src, "top1.qcow2");
    let (_, top2) = three_layers(&src, "top2.qcow2");
    let base = src.join("base.raw");
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let vm = vm_with_disk(dir.path(), &top1, "qcow2", 64);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 50);
    // A VM that is off, on top2: it needs mid and base (nobody has them open for it).
    let mut needed = NeededFiles::new();
    needed.add_chain(
        "off-vm",
        &DiskSpec {
            path: top2.clone(),
            format: DiskFormat::Qcow2,
        },
    );
    let report = move_storage(
        &vm,
        0,
        &root.join("vm/top1.qcow2"),
        &roots,
        &LocalMoveOptions {
            users: Some(Arc::new(needed)),
            ..LocalMoveOptions::default()
        },
        &AtomicBool::new(false),
        &mut no_progress(),
    )
    .unwrap();
    let files: Vec<(PathBuf, bool, Option<String>)> = report
        .source_files
        .iter()
        .map(|f| (f.path.clone(), f.deleted, f.kept_because.clone()))
        .collect();
    let why = Some(
        "VM off-vm still needs it (it is in the backing chain of one of its disks)".to_owned(),
    );
    assert_eq!(
        files,
        vec![
            (top1.clone(), true, None),
            (mid.clone(), false, why.clone()),
            (base.clone(), false, why),
        ]
    );
    assert!(!top1.exists() && mid.exists() && base.exists());
    checks_pass(&vm);
    // The VM that was off still opens its chain.
    Disk::open(
        &DiskSpec {
            path: top2,
            format: DiskFormat::Qcow2,
        },
        true,
    )
    .unwrap();
}

#[test]
fn a_second_storage_move_to_the_same_file_is_refused_and_the_first_completes() {
    let dir = tempfile::tempdir().unwrap();
    let root = canonical_dir(dir.path(), "root");
    let roots = StorageRoots::new([&root]).unwrap();
    let (a, b) = (dir.path().join("a/d0.raw"), dir.path().join("b/d0.raw"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        raw_image(d, 8);
    }
    let vm_a = vm_with_disk(dir.path(), &a, "raw", 128);
    let vm_b = vm_with_disk(dir.path(), &b, "raw", 128);
    vm_a.resume().unwrap();
    vm_b.resume().unwrap();
    wait_counter(&vm_a, 0, 50);
    wait_counter(&vm_b, 0, 50);
    let target = root.join("shared/d0.raw");
    let partial = root.join("shared/d0.raw.vmgate-partial");
    let mut second = None;
    let report = move_storage(
        &vm_a,
        0,
        &target,
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if p.phase == MovePhase::Bulk && second.is_none() {
                let before = std::fs::metadata(&partial).unwrap().len();
                second = Some(
                    move_storage(
                        &vm_b,
                        0,
                        &target,
                        &roots,
                        &LocalMoveOptions::default(),
                        &AtomicBool::new(false),
                        &mut no_progress(),
                    )
                    .map(|_| ()),
                );
                // The first move's partial file is untouched.
                assert_eq!(std::fs::metadata(&partial).unwrap().len(), before);
            }
        },
    )
    .unwrap();
    let e = second.unwrap().unwrap_err();
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    assert!(text.contains("being written by another move"), "{text}");
    // The first completed onto its file; the second VM runs on its own, untouched.
    assert_eq!(report.destination, target);
    assert_eq!(vm_a.disk(0).unwrap().path(), target);
    assert_eq!(vm_b.disk(0).unwrap().path(), b);
    assert_eq!(files_under(&root), vec![target.clone()]);
    checks_pass(&vm_a);
    checks_pass(&vm_b);
}
