//! Shared-nothing moves through the engine in one process over loopback TCP, real KVM on
//! both ends, images made by qemu-img: a VM running memstress and diskstress moves with its
//! disk (the memory and disk sequence checks pass at the destination, the source file is
//! gone), a 3-layer qcow2 chain moves (`qemu-img check` and `--backing-chain` valid at the
//! destination) and a second VM on the same base reuses the parents (fewer bytes), a cancel
//! during the bulk copy leaves nothing at the destination and the VM running here with its
//! disk intact, and a destination outside the storage roots is refused with id 1009.
//!
//! Shared storage (a move without its storage): only memory crosses, the image's lock passes
//! from the source to the destination at the switchover (a second writer is refused before,
//! during and after), a handoff that fails gives the images back to the source, and a
//! destination that does not see the same files refuses with id 1010.

mod vm_common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_common::{
    Tmpfs, assert_moved_chain, canonical_dir, checks_pass, files_under, qcow2_on, raw_image,
    require_kvm, s, tool, wait_counter,
};
use vmgate_migrate::disk::{Disk, DiskError, DiskFormat, DiskSpec};
use vmgate_migrate::engine::{
    CancelToken, Destination, DestinationOptions, Dialer, FaultAction, FaultPoint, Link, MoveError,
    MoveOptions, MoveStats, Phase, Received, StorageOptions, StorageTarget, compare_vm,
    incompatibility, send_vm,
};
use vmgate_migrate::storage::local::release_files;
use vmgate_migrate::storage::users::NeededFiles;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

/// One move at a time: they are heavy, and a `qemu-img` forked by another test would hold
/// a file's lock for an instant as the destination opens it.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct TcpDialer(SocketAddr);

impl Dialer for TcpDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Link::tcp(TcpStream::connect(self.0)?)?)
    }
}

/// A destination with `roots` as its storage roots, serving every connection on its own
/// thread; what each move ended with goes to the returned channel.
fn destination(roots: Vec<PathBuf>) -> (SocketAddr, std::sync::mpsc::Receiver<Received>) {
    destination_with(DestinationOptions {
        storage_roots: roots,
        ..DestinationOptions::default()
    })
}

fn destination_with(opts: DestinationOptions) -> (SocketAddr, std::sync::mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = Arc::new(Destination::new(opts));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for st in listener.incoming() {
            let Ok(st) = st else { return };
            let d = Arc::clone(&dest);
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = d.handle(Link::tcp(st).unwrap());
                if !matches!(r, Received::Joined | Received::Answered) {
                    let _ = tx.send(r);
                }
            });
        }
    });
    (addr, rx)
}

fn move_vm(
    vm: &Vm,
    addr: SocketAddr,
    opts: &MoveOptions,
    cancel: &CancelToken,
) -> Result<MoveStats, MoveError> {
    let control = Link::tcp(TcpStream::connect(addr).unwrap()).unwrap();
    send_vm(vm, control, &mut TcpDialer(addr), opts, cancel, &mut |_| {})
}

fn storage(target: StorageTarget, keep_source: bool) -> MoveOptions {
    MoveOptions {
        channels: 2,
        storage: Some(StorageOptions {
            target,
            keep_source,
            users: None,
        }),
        ..MoveOptions::default()
    }
}

/// vCPU 0: diskstress over `blocks` 4 KiB blocks of disk 0; vCPU 1: memstress.
fn vm_with_disk(dir: &Path, name: &str, disk: &Path, format: &str, blocks: u64) -> Vm {
    require_kvm();
    let text = format!(
        r#"
name = "{name}"
memory_mib = 64
vcpus = 2
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = {blocks}
marker_every = 1000
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 16
marker_every = 4
full_content = true
[[disk]]
path = "{}"
format = "{format}"
"#,
        s(disk)
    );
    let config = VmConfig::from_toml(&text, Some(dir)).expect("valid test config");
    Vm::create(config, &VmOptions::default()).expect("VM starts")
}

/// Pauses, runs every checker (memory and disk sequence), asserts all pass.
fn assert_checks_pass(vm: &Vm) {
    let checks = checks_pass(vm);
    assert!(
        checks.iter().any(|c| c.check == "disk-sequence"),
        "{checks:#?}"
    );
}

fn received_vm(results: &std::sync::mpsc::Receiver<Received>) -> Vm {
    match results.recv_timeout(Duration::from_secs(60)).unwrap() {
        Received::Vm(got) => {
            assert!(got.released, "the source did not confirm: {}", got.note);
            got.vm
        }
        other => panic!("the destination did not get the VM: {other:?}"),
    }
}

#[test]
fn memstress_and_diskstress_vm_moves_with_its_disk() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let (addr, results) = destination(vec![root.clone()]);

    // 40 MiB: 640 blocks of 64 KiB, so stripes of 512 blocks go over both channels.
    let disk = src.join("d0.raw");
    raw_image(&disk, 40);
    let original_tail = std::fs::read(&disk).unwrap()[1 << 20..].to_vec();
    let vm = vm_with_disk(dir.path(), "mover", &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 300);
    wait_counter(&vm, 1, 1);

    let dest = root.join("web/d0.raw");
    let opts = storage(
        StorageTarget::PerDisk(vec![(disk.clone(), dest.clone())]),
        false,
    );
    let stats = move_vm(&vm, addr, &opts, &CancelToken::new())
        .unwrap_or_else(|e| panic!("move failed: {e}"));
    assert!(!vm.running());
    let sequence_at_switch = vm.mailbox(0).unwrap().counter;
    drop(vm);
    let dvm = received_vm(&results);
    assert_eq!(dvm.config().disks[0].path, dest);
    // The guest keeps writing on the new file, and everything it wrote before is there.
    wait_counter(&dvm, 0, 300);
    assert!(dvm.mailbox(0).unwrap().counter > sequence_at_switch);
    wait_counter(&dvm, 1, 2);
    assert_checks_pass(&dvm);
    // The bulk copy sent the disk's data (40 MiB, of which 39 MiB of pattern).
    assert!(stats.disk_bytes_sent >= 39 << 20, "{stats:?}");
    assert_eq!(stats.source_files_deleted, vec![disk.clone()]);
    assert!(!disk.exists(), "the source file is still there");
    assert!(!dest.with_extension("raw.vmgate-partial").exists());
    dvm.pause().unwrap();
    dvm.flush_disks().unwrap();
    drop(dvm);
    // Outside the diskstress region the copy is the original, byte for byte.
    assert_eq!(std::fs::read(&dest).unwrap()[1 << 20..], original_tail[..]);
}

/// base.raw (0x11 at 8 MiB) <- mid.qcow2 (relative reference; 0x22 at 12 MiB) <- top
/// (absolute reference to mid). Returns (base, mid, top).
fn three_layers(dir: &Path, top_name: &str) -> (PathBuf, PathBuf, PathBuf) {
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
    (base, mid, top)
}

#[test]
fn qcow2_chain_moves_and_a_second_vm_reuses_the_parents() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let (addr, results) = destination(vec![root.clone()]);
    let (base, mid, top1) = three_layers(&src, "top1.qcow2");
    let (_, _, top2) = three_layers(&src, "top2.qcow2");
    let folder = root.join("vms");

    let vm1 = vm_with_disk(dir.path(), "chain1", &top1, "qcow2", 200);
    let vm2 = vm_with_disk(dir.path(), "chain2", &top2, "qcow2", 200);
    vm1.resume().unwrap();
    vm2.resume().unwrap();
    wait_counter(&vm1, 0, 250);
    wait_counter(&vm2, 0, 250);

    // VM 1: both parents are copied; its own layer is deleted at the source.
    let s1 = move_vm(
        &vm1,
        addr,
        &storage(StorageTarget::Folder(folder.clone()), false),
        &CancelToken::new(),
    )
    .unwrap_or_else(|e| panic!("move 1 failed: {e}"));
    drop(vm1);
    let d1 = received_vm(&results);
    assert_eq!(s1.disk_bytes_reused, 0, "{s1:?}");
    assert_eq!(s1.source_files_deleted, vec![top1.clone()]);
    assert_eq!(s1.source_parents, vec![base.clone(), mid.clone()]);
    assert!(!top1.exists());

    // VM 2 into the same folder, keeping its source files: the parents there are
    // identical (verified by checksum) and not sent again.
    let s2 = move_vm(
        &vm2,
        addr,
        &storage(StorageTarget::Folder(folder.clone()), true),
        &CancelToken::new(),
    )
    .unwrap_or_else(|e| panic!("move 2 failed: {e}"));
    drop(vm2);
    let d2 = received_vm(&results);
    let parents_len =
        std::fs::metadata(&base).unwrap().len() + std::fs::metadata(&mid).unwrap().len();
    assert_eq!(s2.disk_bytes_reused, parents_len, "{s2:?}");
    // The first move sent the parents' data (base: 64 KiB of 0x11; mid: a 64 KiB cluster of
    // 0x22 and its metadata), the second none of it.
    assert!(s1.disk_parent_bytes_sent >= 3 * 65536, "{s1:?}");
    assert_eq!(s2.disk_parent_bytes_sent, 0, "{s2:?}");
    assert!(s2.source_files_deleted.is_empty());
    assert!(top2.exists(), "keep_source deleted the source file");

    for vm in [&d1, &d2] {
        wait_counter(vm, 0, 250);
        assert_checks_pass(vm);
        vm.pause().unwrap();
        vm.flush_disks().unwrap();
    }
    drop((d1, d2));

    // Both source VMs are gone: the parents can go (kept when asked).
    let kept = release_files(&s2.source_parents, true, "chain2", &NeededFiles::new());
    assert!(kept.iter().all(|f| !f.deleted) && base.exists());
    let released = release_files(&s1.source_parents, false, "chain1", &NeededFiles::new());
    assert!(released.iter().all(|f| f.deleted), "{released:?}");

    for top in ["top1.qcow2", "top2.qcow2"] {
        let t = folder.join(top);
        assert_moved_chain(&folder, &t);
        // The lower layers' data reads through the new chain.
        let out = tool(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0x11 8M 64k",
                "-c",
                "read -P 0x22 12M 64k",
                s(&t),
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    tool("qemu-img", &["check", "-q", s(&folder.join("mid.qcow2"))]);
}

/// A move cancelled during the bulk copy (`mirroring` false: 800 ms after the active layer
/// appeared at the destination) or during mirroring (once round 2, the bulk copy, ended).
fn cancelled_move(mirroring: bool) {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let (addr, results) = destination(vec![root.clone()]);
    let disk = src.join("big.raw");
    raw_image(&disk, 96);
    let vm = vm_with_disk(dir.path(), "cancelled", &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 300);

    let folder = root.join("vm");
    let opts = MoveOptions {
        // 96 MiB at 16 MiB/s: the bulk copy takes about 6 s.
        bandwidth_limit: (!mirroring).then_some(16 << 20),
        ..storage(StorageTarget::Folder(folder.clone()), false)
    };
    let cancel = CancelToken::new();
    let reason = "the administrator cancelled it";
    let watcher = (!mirroring).then(|| {
        let cancel = cancel.clone();
        let folder = folder.clone();
        std::thread::spawn(move || {
            // The active layer appears when the bulk copy starts; cancel a little later.
            let deadline = Instant::now() + Duration::from_secs(60);
            while files_under(&folder).is_empty() {
                assert!(Instant::now() < deadline, "the copy never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(800));
            let during = files_under(&folder);
            cancel.cancel(reason);
            during
        })
    });
    let mut at_cancel = Vec::new();
    let control = Link::tcp(TcpStream::connect(addr).unwrap()).unwrap();
    let r = send_vm(
        &vm,
        control,
        &mut TcpDialer(addr),
        &opts,
        &cancel,
        &mut |p| {
            if mirroring && p.phase == Phase::PreCopy && p.round >= 2 && !cancel.is_cancelled() {
                at_cancel = files_under(&folder);
                cancel.cancel(reason);
            }
        },
    );
    if let Some(w) = watcher {
        at_cancel = w.join().unwrap();
    }
    assert_eq!(at_cancel, vec![folder.join("big.raw.vmgate-partial")]);
    match r {
        Err(MoveError::Cancelled { reason: got }) => assert_eq!(got, reason),
        other => panic!("expected a cancel, got {other:?}"),
    }
    match results.recv_timeout(Duration::from_secs(30)).unwrap() {
        // Why is what the destination saw first: the Cancel, or the links closing after it.
        Received::Discarded(why) => assert!(!why.is_empty()),
        other => panic!("the destination kept something: {other:?}"),
    }
    // Nothing is left at the destination, not even the folder it created.
    assert!(!folder.exists(), "{:?}", files_under(&root));
    assert!(files_under(&root).is_empty());
    // The VM runs here, on its own disk, and its checks pass.
    assert!(vm.running());
    assert_eq!(vm.config().disks[0].path, disk);
    wait_counter(&vm, 0, 300);
    assert_checks_pass(&vm);
}

#[test]
fn cancel_during_the_bulk_copy_leaves_nothing_at_the_destination() {
    cancelled_move(false);
}

#[test]
fn cancel_during_mirroring_leaves_nothing_at_the_destination() {
    cancelled_move(true);
}

#[test]
fn destinations_outside_the_roots_are_refused_with_1009() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let elsewhere = canonical_dir(dir.path(), "elsewhere");
    let (addr, _results) = destination(vec![root.clone()]);
    let disk = src.join("d0.raw");
    raw_image(&disk, 4);
    let vm = vm_with_disk(dir.path(), "refused", &disk, "raw", 64);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);
    std::fs::write(root.join("d0.raw"), b"someone else's").unwrap();
    let link = root.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();

    for (target, why) in [
        (elsewhere.clone(), "outside"),
        (root.join("a/../../elsewhere"), ".."),
        (link.clone(), "link"),
        (root.clone(), "exists"),
    ] {
        let opts = storage(StorageTarget::Folder(target.clone()), false);
        let report = compare_vm(
            &vm,
            Link::tcp(TcpStream::connect(addr).unwrap()).unwrap(),
            &opts,
        )
        .unwrap();
        assert_eq!(report.len(), 1, "{why}: {report:?}");
        assert_eq!(report[0].0, incompatibility::STORAGE, "{why}: {report:?}");
        match move_vm(&vm, addr, &opts, &CancelToken::new()) {
            Err(MoveError::Incompatible { report }) => {
                assert!(
                    report.iter().all(|(id, _)| *id == 1009) && !report.is_empty(),
                    "{why}: {report:?}"
                );
                eprintln!("{why}: {}", report[0].1);
            }
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing was written anywhere; the VM runs here.
    assert_eq!(files_under(&elsewhere), Vec::<PathBuf>::new());
    assert_eq!(
        files_under(&root),
        vec![root.join("d0.raw")],
        "only the file that was there"
    );
    assert_eq!(
        std::fs::read(root.join("d0.raw")).unwrap(),
        b"someone else's"
    );
    assert!(vm.running());
    assert!(disk.exists());
    assert_checks_pass(&vm);
}

#[test]
fn a_full_destination_fails_the_move_and_leaves_nothing() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "8m");
    let root = std::fs::canonicalize(&small.0).unwrap();
    let src = canonical_dir(dir.path(), "src");
    let (addr, results) = destination(vec![root.clone()]);
    // 12 MiB of data for a file system of 8 MiB.
    let disk = src.join("d0.raw");
    raw_image(&disk, 12);
    let vm = vm_with_disk(dir.path(), "full", &disk, "raw", 256);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 100);

    let opts = storage(StorageTarget::Folder(root.join("vm")), false);
    match move_vm(&vm, addr, &opts, &CancelToken::new()) {
        Err(MoveError::Failed { cause, .. }) => {
            assert!(
                cause.contains("the destination's disk is full writing disk 0"),
                "{cause}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    match results.recv_timeout(Duration::from_secs(30)).unwrap() {
        Received::Discarded(why) => assert!(why.contains("full"), "{why}"),
        other => panic!("the destination kept something: {other:?}"),
    }
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
    assert!(!root.join("vm").exists());
    assert!(vm.running());
    assert!(disk.exists());
    wait_counter(&vm, 0, 300);
    assert_checks_pass(&vm);
}

#[test]
fn links_cut_as_the_destination_is_about_to_resume_remove_its_files() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    // Every file is complete and renamed into place when the destination's links break:
    // it must still remove them all, and the source must keep the VM, asking how it ended.
    let (addr, results) = destination_with(DestinationOptions {
        storage_roots: vec![root.clone()],
        fault: Some(Box::new(|at| match at {
            FaultPoint::BeforeResume => FaultAction::CutLinks,
            FaultPoint::AfterResume => FaultAction::Continue,
        })),
        ..DestinationOptions::default()
    });
    let (base, mid, top) = three_layers(&src, "top.qcow2");
    let vm = vm_with_disk(dir.path(), "cut", &top, "qcow2", 200);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    let folder = root.join("vms");
    match move_vm(
        &vm,
        addr,
        &storage(StorageTarget::Folder(folder.clone()), false),
        &CancelToken::new(),
    ) {
        Err(e @ MoveError::Failed { .. }) => assert!(e.vm_runs_here(), "{e}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    match results.recv_timeout(Duration::from_secs(30)).unwrap() {
        // The fault, the source's outcome query or its closing links, whichever came first.
        Received::Discarded(why) => assert!(!why.is_empty()),
        other => panic!("the destination kept something: {other:?}"),
    }
    assert!(!folder.exists(), "{:?}", files_under(&root));
    assert!(files_under(&root).is_empty());
    // The VM runs here on its untouched chain.
    assert!(vm.running());
    assert!(base.exists() && mid.exists() && top.exists());
    wait_counter(&vm, 0, 250);
    assert_checks_pass(&vm);
}

#[test]
fn two_disks_move_to_their_own_destinations() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let (addr, results) = destination(vec![root.clone()]);
    // Disk 0: raw, written by the guest. Disk 1: qcow2 on a raw base holding data.
    let d0 = src.join("sys.raw");
    raw_image(&d0, 4);
    let (base, mid, d1) = three_layers(&src, "data.qcow2");
    let text = format!(
        r#"
name = "twodisks"
memory_mib = 32
vcpus = 1
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 200
marker_every = 1000
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
    wait_counter(&vm, 0, 250);
    let t0 = root.join("system/sys.raw");
    let t1 = root.join("data/d1.qcow2");
    let opts = storage(
        StorageTarget::PerDisk(vec![(d1.clone(), t1.clone()), (d0.clone(), t0.clone())]),
        false,
    );
    let stats = move_vm(&vm, addr, &opts, &CancelToken::new())
        .unwrap_or_else(|e| panic!("move failed: {e}"));
    drop(vm);
    let dvm = received_vm(&results);
    let paths: Vec<PathBuf> = dvm.config().disks.iter().map(|d| d.path.clone()).collect();
    assert_eq!(paths, vec![t0.clone(), t1.clone()]);
    wait_counter(&dvm, 0, 250);
    assert_checks_pass(&dvm);
    assert_eq!(stats.source_files_deleted, vec![d0.clone(), d1.clone()]);
    assert_eq!(stats.source_parents, vec![base, mid]);
    dvm.pause().unwrap();
    dvm.flush_disks().unwrap();
    drop(dvm);
    // Disk 1's chain sits in its own folder, renamed, with its parents next to it.
    tool("qemu-img", &["check", "-q", s(&t1)]);
    let out = tool(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 8M 64k",
            "-c",
            "read -P 0x22 12M 64k",
            s(&t1),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let mut files = files_under(&root);
    files.sort();
    assert_eq!(
        files,
        vec![
            root.join("data/base.raw"),
            root.join("data/d1.qcow2"),
            root.join("data/mid.qcow2"),
            root.join("system/sys.raw"),
        ]
    );
}

/// A move without its storage: the destination opens the same files.
fn shared(channels: u16) -> MoveOptions {
    MoveOptions {
        channels,
        ..MoveOptions::default()
    }
}

/// Whether another writer (a vmgate open, and QEMU's: `qemu-io` opening the image for
/// writing) is refused on `path`, and that the refusal names the lock.
fn second_writer_refused(path: &Path, format: DiskFormat) -> bool {
    let spec = DiskSpec {
        path: path.to_path_buf(),
        format,
    };
    let ours = match Disk::open(&spec, true) {
        Err(DiskError::InUse { holder, .. }) => {
            assert!(holder.contains("open for writing"), "{holder}");
            true
        }
        Err(e) => panic!("unexpected error opening {}: {e}", path.display()),
        Ok(_) => false,
    };
    let fmt = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let out = std::process::Command::new("qemu-io")
        .args(["-f", fmt, "-c", "flush", s(path)])
        .output()
        .unwrap();
    let qemu = !out.status.success();
    if qemu {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("\"write\" lock"), "{err}");
    }
    assert_eq!(
        ours,
        qemu,
        "vmgate and qemu-img disagree about {}",
        path.display()
    );
    ours
}

/// A qcow2 image of 96 MiB of data (on a raw base) in `dir`: more than the VM's memory, so
/// bytes on the wire show whether the disk crossed.
fn shared_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    raw_image(&base, 96);
    let top = dir.join("top.qcow2");
    qcow2_on(&top, s(&base), "raw");
    (base, top)
}

#[test]
fn shared_storage_moves_only_memory_and_hands_the_lock_over() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = canonical_dir(dir.path(), "shared");
    // The shared folder is one of the destination's storage roots.
    let (addr, results) = destination(vec![shared_dir.clone()]);
    let (base, top) = shared_chain(&shared_dir);
    let vm = vm_with_disk(dir.path(), "sh1", &top, "qcow2", 200);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    assert!(
        second_writer_refused(&top, DiskFormat::Qcow2),
        "the source VM holds the image"
    );

    let stats = move_vm(&vm, addr, &shared(2), &CancelToken::new()).unwrap();
    let moved = received_vm(&results);
    assert_eq!(stats.disk_bytes_sent, 0);
    assert_eq!(stats.shared_disks, vec![top.clone()]);
    // 64 MiB of memory of which memstress touches 16: far less than the disk's 96 MiB.
    let disk_bytes = std::fs::metadata(&base).unwrap().len();
    assert!(
        stats.bytes_on_wire < 64 << 20 && stats.bytes_on_wire < disk_bytes / 2,
        "{} bytes on the wire",
        stats.bytes_on_wire
    );
    // The destination runs the VM on the very same file and keeps writing it.
    assert_eq!(moved.disk_specs()[0].path, top);
    wait_counter(&moved, 0, 250);
    assert_checks_pass(&moved);
    // The source no longer writes it, the destination does: a second writer is still refused,
    // also once the source VM is gone.
    assert!(second_writer_refused(&top, DiskFormat::Qcow2));
    drop(vm);
    assert!(second_writer_refused(&top, DiskFormat::Qcow2));
    // Once the destination's VM is gone the image is free and consistent.
    moved.pause().unwrap();
    drop(moved);
    assert!(!second_writer_refused(&top, DiskFormat::Qcow2));
    let check = tool("qemu-img", &["check", s(&top)]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn a_failed_shared_storage_handoff_gives_the_images_back_to_the_source() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = canonical_dir(dir.path(), "shared");
    // The destination has opened the images and built the VM when its links break.
    let (addr, results) = destination_with(DestinationOptions {
        fault: Some(Box::new(|at| match at {
            FaultPoint::BeforeResume => FaultAction::CutLinks,
            FaultPoint::AfterResume => FaultAction::Continue,
        })),
        storage_roots: vec![shared_dir.clone()],
        ..DestinationOptions::default()
    });
    let (_base, top) = shared_chain(&shared_dir);
    let vm = vm_with_disk(dir.path(), "sh2", &top, "qcow2", 200);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    match move_vm(&vm, addr, &shared(1), &CancelToken::new()) {
        Err(e @ MoveError::Failed { .. }) => assert!(e.vm_runs_here(), "{e}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    match results.recv_timeout(Duration::from_secs(30)).unwrap() {
        Received::Discarded(why) => assert!(!why.is_empty()),
        other => panic!("the destination kept something: {other:?}"),
    }
    // The source took the image back: it runs, writes, and holds the lock again.
    assert!(vm.running());
    wait_counter(&vm, 0, 250);
    assert_checks_pass(&vm);
    assert!(second_writer_refused(&top, DiskFormat::Qcow2));
}

#[test]
fn a_destination_that_does_not_share_the_storage_refuses_with_1010() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = canonical_dir(dir.path(), "shared");
    let disk = shared_dir.join("d0.raw");
    raw_image(&disk, 8);
    let vm = vm_with_disk(dir.path(), "sh3", &disk, "raw", 200);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    // Two destinations that see other files at that path: nothing there, and a copy.
    let copy = std::fs::read(&disk).unwrap();
    for (why, contents, expect) in [
        ("missing", None, "does not see the VM's image"),
        (
            "a copy",
            Some(copy),
            "is not the image the VM has open at the source",
        ),
    ] {
        let addr = destination_with_own_mounts(&shared_dir, contents.map(|c| (disk.clone(), c)));
        let report = compare_vm(
            &vm,
            Link::tcp(TcpStream::connect(addr).unwrap()).unwrap(),
            &shared(1),
        )
        .unwrap();
        assert_eq!(report.len(), 1, "{why}: {report:?}");
        assert_eq!(report[0].0, incompatibility::SHARED_STORAGE, "{why}");
        assert!(report[0].1.contains(expect), "{why}: {}", report[0].1);
        assert!(
            report[0].1.contains("--include-storage"),
            "{why}: {}",
            report[0].1
        );
        match move_vm(&vm, addr, &shared(1), &CancelToken::new()) {
            Err(MoveError::Incompatible { report }) => {
                assert_eq!(report.len(), 1, "{why}: {report:?}");
                assert_eq!(report[0].0, 1010, "{why}: {report:?}");
            }
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
    }
    // The VM runs here on its disk, which it still holds.
    assert!(vm.running());
    wait_counter(&vm, 0, 250);
    assert_checks_pass(&vm);
    assert!(second_writer_refused(&disk, DiskFormat::Raw));
}

/// A destination in a mount namespace of its own where `over` is an empty tmpfs (holding
/// only `file`, if given): a host that does not share the source's storage.
fn destination_with_own_mounts(over: &Path, file: Option<(PathBuf, Vec<u8>)>) -> SocketAddr {
    let over = over.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: unshare and mount take no Rust-managed memory; the strings are valid
        // NUL-terminated C strings that outlive the calls. The new mount namespace belongs
        // to this thread and the threads it spawns (CLONE_NEWNS implies CLONE_FS, which a
        // thread may unshare on its own).
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare the mounts");
            let root = c"/";
            let none = c"none";
            assert_eq!(
                libc::mount(
                    none.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0,
                "make the mounts private"
            );
            let target = std::ffi::CString::new(s(&over)).unwrap();
            let tmpfs = c"tmpfs";
            assert_eq!(
                libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    0,
                    std::ptr::null()
                ),
                0,
                "mount a tmpfs over the shared folder"
            );
        }
        if let Some((path, contents)) = file {
            std::fs::write(path, contents).unwrap();
        }
        let (addr, results) = destination(vec![over]);
        tx.send(addr).unwrap();
        // Keep the namespace's threads alive while the test runs.
        while results.recv().is_ok() {}
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

#[test]
fn handed_over_images_are_taken_back_only_once_no_other_host_writes_them() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = canonical_dir(dir.path(), "shared");
    let (_base, top) = shared_chain(&shared_dir);
    let vm = vm_with_disk(dir.path(), "sh4", &top, "qcow2", 200);
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    // What the switchover does: pause, hand the images over.
    vm.pause().unwrap();
    vm.release_disks().unwrap();
    assert!(vm.disks_released());
    // "The destination" opens the image for writing: it can, now.
    let spec = DiskSpec {
        path: top.clone(),
        format: DiskFormat::Qcow2,
    };
    let other = Disk::open(&spec, true).expect("the released image opens for writing");
    // While it holds the image, the source cannot take it back and must not resume.
    let err = vm.reacquire_disks(Duration::from_millis(200)).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("cannot be taken back"), "{text}");
    assert!(text.contains("in use by another process"), "{text}");
    assert!(vm.disks_released());
    // Once it closed the image, the source takes it back and runs on.
    drop(other);
    vm.reacquire_disks(Duration::from_millis(200)).unwrap();
    assert!(!vm.disks_released());
    vm.resume().unwrap();
    wait_counter(&vm, 0, 250);
    assert_checks_pass(&vm);
    assert!(second_writer_refused(&top, DiskFormat::Qcow2));
}

#[test]
fn a_shared_image_or_chain_outside_the_roots_is_refused_with_1009_and_names_the_disk() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = canonical_dir(dir.path(), "shared");
    let outside = canonical_dir(dir.path(), "outside");
    // What a crafted chain points at: a file outside the destination's roots (the source,
    // which runs the VM unconfined here, can open it).
    raw_image(&outside.join("secret.raw"), 2);
    std::os::unix::fs::symlink(&outside, shared_dir.join("link")).unwrap();
    let deep = shared_dir.join("a/b");
    std::fs::create_dir_all(&deep).unwrap();
    let (addr, _results) = destination(vec![shared_dir.clone()]);

    let outside_abs = outside.join("secret.raw");
    let in_outside = outside.join("top.qcow2");
    qcow2_on(&in_outside, "secret.raw", "raw");
    for (why, top, reference) in [
        (
            "a relative reference with ..",
            deep.join("dotdot.qcow2"),
            Some("../../../outside/secret.raw"),
        ),
        (
            "an absolute reference",
            shared_dir.join("abs.qcow2"),
            Some(s(&outside_abs)),
        ),
        (
            "a reference through a link",
            shared_dir.join("vialink.qcow2"),
            Some("link/secret.raw"),
        ),
        (
            "the image itself through a link",
            shared_dir.join("link/top.qcow2"),
            None,
        ),
    ] {
        if let Some(reference) = reference {
            qcow2_on(&top, reference, "raw");
        }
        let vm = vm_with_disk(dir.path(), "shx", &top, "qcow2", 64);
        vm.resume().unwrap();
        wait_counter(&vm, 0, 50);
        let report = compare_vm(
            &vm,
            Link::tcp(TcpStream::connect(addr).unwrap()).unwrap(),
            &shared(1),
        )
        .unwrap();
        assert_eq!(report.len(), 1, "{why}: {report:?}");
        assert_eq!(report[0].0, incompatibility::STORAGE, "{why}: {report:?}");
        let text = &report[0].1;
        eprintln!("{why}: {text}");
        assert!(
            text.starts_with(&format!("disk 0 ({})", s(&top))),
            "{why}: {text}"
        );
        assert!(
            text.contains("outside this host's storage roots"),
            "{why}: {text}"
        );
        // Nothing of what the files hold: not the reference, not the file it names.
        assert!(!text.contains("secret"), "{why}: {text}");
        match move_vm(&vm, addr, &shared(1), &CancelToken::new()) {
            Err(MoveError::Incompatible { report }) => {
                assert_eq!(report.len(), 1, "{why}: {report:?}");
                assert_eq!(report[0].0, 1009, "{why}: {report:?}");
            }
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
        // The VM runs here on its image, which it still holds.
        assert!(vm.running(), "{why}");
        wait_counter(&vm, 0, 50);
        assert_checks_pass(&vm);
        vm.pause().unwrap();
        drop(vm);
    }
}

#[test]
fn a_move_and_a_storage_move_to_the_same_file_never_touch_each_others_files() {
    use std::sync::atomic::AtomicBool;
    use vmgate_migrate::storage::local::{LocalMoveOptions, MovePhase, move_storage};
    use vmgate_migrate::storage::paths::StorageRoots;
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    let (addr, results) = destination(vec![root.clone()]);
    let folder = root.join("vm");
    // VM a moves its storage into root/vm/d0.raw on this host ...
    let disk_a = src.join("a/d0.raw");
    std::fs::create_dir_all(disk_a.parent().unwrap()).unwrap();
    raw_image(&disk_a, 8);
    let vm_a = vm_with_disk(dir.path(), "conc-a", &disk_a, "raw", 128);
    vm_a.resume().unwrap();
    wait_counter(&vm_a, 0, 50);
    // ... while VM b arrives in a move whose destination is the very same file.
    let disk_b = src.join("b/d0.raw");
    std::fs::create_dir_all(disk_b.parent().unwrap()).unwrap();
    raw_image(&disk_b, 8);
    let vm_b = vm_with_disk(dir.path(), "conc-b", &disk_b, "raw", 128);
    vm_b.resume().unwrap();
    wait_counter(&vm_b, 0, 50);

    let roots = StorageRoots::new([&root]).unwrap();
    let mut second: Option<Result<vmgate_migrate::engine::MoveStats, MoveError>> = None;
    let partial = folder.join("d0.raw.vmgate-partial");
    let report = move_storage(
        &vm_a,
        0,
        &folder.join("d0.raw"),
        &roots,
        &LocalMoveOptions::default(),
        &AtomicBool::new(false),
        &mut |p| {
            if p.phase == MovePhase::Bulk && second.is_none() {
                // The first move writes its partial file now; the second move runs to its end.
                let before = std::fs::metadata(&partial).map(|m| m.len());
                second = Some(move_vm(
                    &vm_b,
                    addr,
                    &storage(StorageTarget::Folder(folder.clone()), false),
                    &CancelToken::new(),
                ));
                assert_eq!(
                    std::fs::metadata(&partial).map(|m| m.len()).ok(),
                    before.ok(),
                    "the refused move touched the first move's file"
                );
            }
        },
    )
    .unwrap();
    // The second is refused, and says why; its VM runs on at the source on its own file.
    match second.unwrap() {
        Err(e @ MoveError::Failed { .. }) => {
            let text = e.to_string();
            assert!(text.contains("being written by another move"), "{text}");
            assert!(e.vm_runs_here());
        }
        other => panic!("expected the second move to be refused, got {other:?}"),
    }
    match results.recv_timeout(Duration::from_secs(30)).unwrap() {
        Received::Discarded(_) => {}
        other => panic!("the destination kept something: {other:?}"),
    }
    assert!(vm_b.running());
    assert!(disk_b.exists());
    assert_checks_pass(&vm_b);
    // The first completed onto its file, undamaged.
    assert_eq!(report.destination, folder.join("d0.raw"));
    assert_eq!(vm_a.disk(0).unwrap().path(), folder.join("d0.raw"));
    assert_checks_pass(&vm_a);
    assert_eq!(files_under(&root), vec![folder.join("d0.raw")]);
    vm_a.pause().unwrap();
    vm_a.flush_disks().unwrap();
    let moved = std::fs::read(folder.join("d0.raw")).unwrap();
    let original_tail = {
        let mut d = vec![0u8; 8 << 20];
        for (i, b) in d.iter_mut().enumerate().skip(1 << 20) {
            *b = u8::try_from((i / 4096) % 251).unwrap() ^ 0x5A;
        }
        d
    };
    assert!(
        moved[1 << 20..] == original_tail[1 << 20..],
        "the data beyond the guest's region changed"
    );
}
