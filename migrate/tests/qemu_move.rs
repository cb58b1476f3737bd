//! Moves of real QEMU guests (TCG) through vmgate's QEMU move library: QEMU's migration
//! stream and its block mirrors' NBD connections go only to UNIX sockets, and every
//! connection is carried on its own link (here a socket pair per link; in the daemon an
//! authenticated channel). Two hosts on this machine: each its own runtime folder, and its
//! own storage root unless the storage is shared.
//!
//! What a user would check: the guest keeps its boot id and its uptime goes on; its own checks
//! (memory pattern, and the disk sequence read back with O_DIRECT) pass at the destination,
//! and again after a fresh boot there; the source QEMU is gone; a cancelled move leaves the
//! guest running on the source with its checks passing and nothing at the destination; a
//! storage-only move switches the running guest to new files on the same parents.

mod qemu_common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qemu_common::*;
use vmgate_guest::agent::READY_MARKER;
use vmgate_migrate::engine::LinkCloser;
use vmgate_migrate::qemu::moves::{
    self, CancelToken, Dialer, Link, MoveError, MoveStorage, Phase, Problem, QemuDestination,
    QemuDestinationOptions, QemuMoveOptions, QemuReceived, compatibility,
};
use vmgate_migrate::qemu::{
    ExitKind, QemuHost, QemuHostConfig, QemuVm, ScopeMode, StartMode, ValidatedVm, VmState,
};

struct Closer(UnixStream);

impl LinkCloser for Closer {
    fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn link(s: UnixStream, peer: &str) -> Link {
    Link {
        reader: Box::new(s.try_clone().unwrap()),
        writer: Box::new(s.try_clone().unwrap()),
        closer: Arc::new(Closer(s)),
        peer: peer.into(),
    }
}

/// A link to `dest`: its far end is served by `dest.handle` on the runtime.
fn connect(
    dest: &QemuDestination,
    rt: &tokio::runtime::Handle,
) -> (Link, tokio::task::JoinHandle<QemuReceived>) {
    let (a, b) = UnixStream::pair().unwrap();
    let d = dest.clone();
    let served = rt.spawn(async move { d.handle(link(b, "the source")).await });
    (link(a, "the destination"), served)
}

struct TestDialer {
    dest: QemuDestination,
    rt: tokio::runtime::Handle,
}

impl Dialer for TestDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(connect(&self.dest, &self.rt).0)
    }
}

/// A second host on this machine: its own runtime folder, and `root` as its storage root.
async fn host_at(t: &TestHost, root: &Path, run: &str) -> QemuHost {
    let base = t.root.parent().unwrap().to_path_buf();
    let mut config = QemuHostConfig::new(vec![root.to_path_buf()], vec![]);
    config.run_dir = base.join(run);
    config.scope = ScopeMode::Session;
    QemuHost::new(config).await.expect("the destination host")
}

/// Kills the QEMU of a VM of `host` at the end of the test, however it ends.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pidfile in &self.0 {
            if let Some(pid) = holder(pidfile) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The test guest with 128 MiB, a qcow2 disk it writes continuously.
fn guest(t: &TestHost, name: &str, disk: &str) -> ValidatedVm {
    t.validate(
        &linux_toml(name, Some(disk), false, "").replace("memory_mib = 256", "memory_mib = 128"),
    )
}

async fn boot(t: &TestHost, vm: &ValidatedVm) -> QemuVm {
    let h = t.start(vm, StartMode::Run).await;
    wait_for_text(&t.console(vm.name()), READY_MARKER, 1, BOOT_TIMEOUT).await;
    h
}

fn no_progress() -> impl FnMut(&moves::Progress) + Send {
    |_| {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_on_shared_storage_keeps_the_guest_running() {
    let t = TestHost::new(vec![]).await;
    t.qcow2("linux/shared.qcow2", "64M");
    let vm = guest(&t, "mv-shared", "linux/shared.qcow2");
    let src = boot(&t, &vm).await;
    let before = src.guest_status().await.unwrap();

    // The destination sees the same storage root.
    let dest_host = host_at(&t, &t.root, "run-dst").await;
    let _reaper = Reaper(vec![dest_host.vm_run_dir("mv-shared").join("qemu.pid")]);
    let dest = QemuDestination::new(dest_host.clone(), QemuDestinationOptions::default());
    let rt = tokio::runtime::Handle::current();

    // Compare first (Compare-VM): compatible, and nothing is started anywhere.
    let (control, served) = connect(&dest, &rt);
    let opts = QemuMoveOptions {
        multifd_channels: 2,
        ..QemuMoveOptions::default()
    };
    let report = moves::compare_vm(&t.host, &src, &vm, control, &opts)
        .await
        .unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert!(matches!(served.await.unwrap(), QemuReceived::Refused(r) if r.is_empty()));
    assert!(!dest_host.vm_run_dir("mv-shared").exists());

    let (control, served) = connect(&dest, &rt);
    let dialer = TestDialer {
        dest: dest.clone(),
        rt: rt.clone(),
    };
    let mut phases = Vec::new();
    let stats = moves::move_vm(
        &t.host,
        &src,
        &vm,
        control,
        Box::new(dialer),
        &opts,
        &CancelToken::new(),
        &mut |p: &moves::Progress| phases.push(p.phase),
    )
    .await
    .unwrap_or_else(|e| panic!("the move failed: {}", chain(&e)));
    eprintln!(
        "moved in {:.0} ms, downtime {:.0} ms, {} bytes on the links",
        stats.total_ms, stats.downtime_ms, stats.bytes_on_wire
    );
    assert!(phases.contains(&Phase::PreCopy) && phases.last() == Some(&Phase::Completed));
    assert!(
        stats.bytes_on_wire > 1 << 20,
        "the memory crossed the links"
    );
    assert_eq!(stats.shared_disks, vec![t.root.join("linux/shared.qcow2")]);
    let QemuReceived::Vm(arrived) = served.await.unwrap() else {
        panic!("the guest did not arrive");
    };
    // The source QEMU was quit after the destination ran the guest.
    assert!(matches!(src.state().await, VmState::Off(_)));

    let after = arrived.vm.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id, "no reboot");
    assert!(after.uptime_ms > before.uptime_ms, "the uptime went on");
    assert!(after.memory.passes > before.memory.passes);
    assert!(after.disk.unwrap().durable_seq > before.disk.unwrap().durable_seq);
    let report = arrived.vm.guest_check().await.unwrap();
    assert!(report.passed(), "{report:?}");
    assert_eq!(
        arrived.vm.power_off().await.unwrap().kind,
        ExitKind::PoweredOff
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_nothing_move_brings_the_disk_written_before_and_during_it() {
    let t = TestHost::new(vec![]).await;
    let d = TestHost::new(vec![]).await;
    t.qcow2("linux/src.qcow2", "64M");
    let vm = guest(&t, "mv-copy", "linux/src.qcow2");
    let src = boot(&t, &vm).await;
    let before = src.guest_status().await.unwrap();
    let seq_before = before.disk.as_ref().unwrap().durable_seq;
    assert!(seq_before > 0, "the guest writes its disk");

    let dest = QemuDestination::new(d.host.clone(), QemuDestinationOptions::default());
    let _reaper = Reaper(vec![d.host.vm_run_dir("mv-copy").join("qemu.pid")]);
    let rt = tokio::runtime::Handle::current();
    let (control, served) = connect(&dest, &rt);
    let opts = QemuMoveOptions {
        storage: MoveStorage::Copy {
            disks: vec!["linux/moved.qcow2".into()],
            keep_source: false,
        },
        ..QemuMoveOptions::default()
    };
    let mut progress = no_progress();
    let stats = moves::move_vm(
        &t.host,
        &src,
        &vm,
        control,
        Box::new(TestDialer {
            dest: dest.clone(),
            rt: rt.clone(),
        }),
        &opts,
        &CancelToken::new(),
        &mut progress,
    )
    .await
    .unwrap_or_else(|e| panic!("the move failed: {}", chain(&e)));
    eprintln!(
        "moved with its disk in {:.0} ms, downtime {:.0} ms, {} bytes on the links",
        stats.total_ms, stats.downtime_ms, stats.bytes_on_wire
    );
    let QemuReceived::Vm(arrived) = served.await.unwrap() else {
        panic!("the guest did not arrive");
    };
    assert!(arrived.disks_copied);
    assert!(matches!(src.state().await, VmState::Off(_)));
    assert_eq!(
        stats.source_files_deleted,
        vec![t.root.join("linux/src.qcow2")]
    );
    assert!(!t.root.join("linux/src.qcow2").exists());
    assert_eq!(
        arrived.validated.definition().disks[0].path,
        "linux/moved.qcow2"
    );

    let after = arrived.vm.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id, "no reboot");
    assert!(after.uptime_ms > before.uptime_ms);
    // It kept writing during the move; what it wrote before and during reads back intact.
    let disk = after.disk.unwrap();
    assert!(disk.durable_seq > seq_before);
    assert_eq!(disk.errors, 0);
    let report = arrived.vm.guest_check().await.unwrap();
    assert!(report.passed(), "{report:?}");

    // Durable: a fresh boot on the destination checks the whole region again.
    let last = arrived
        .vm
        .guest_status()
        .await
        .unwrap()
        .disk
        .unwrap()
        .durable_seq;
    arrived.vm.shutdown(Duration::from_secs(60)).await.unwrap();
    let moved = d.root.join("linux/moved.qcow2");
    let check = tool("qemu-img", &["check", moved.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    let again = QemuVm::start(&d.host, &arrived.validated, StartMode::Run)
        .await
        .unwrap();
    let console = d.console("mv-copy");
    // The guest booted on the source: this is the first marker on this host's console.
    wait_for_text(&console, READY_MARKER, 1, BOOT_TIMEOUT).await;
    let rebooted = again.guest_status().await.unwrap();
    assert_ne!(rebooted.boot_id, before.boot_id);
    let disk = rebooted.disk.unwrap();
    assert!(disk.boot_seq >= last, "{} < {last}", disk.boot_seq);
    assert_eq!(disk.errors, 0);
    assert!(again.guest_check().await.unwrap().passed());
    again.power_off().await.unwrap();
}

/// Cancels the move of `src` once `when` is seen in its progress; checks the guest runs on
/// and nothing is left at the destination.
async fn cancel_at(
    t: &TestHost,
    d: &TestHost,
    src: &QemuVm,
    vm: &ValidatedVm,
    dest: &QemuDestination,
    when: impl Fn(&moves::Progress) -> bool + Send,
) {
    let rt = tokio::runtime::Handle::current();
    let before = src.guest_status().await.unwrap();
    let (control, served) = connect(dest, &rt);
    let opts = QemuMoveOptions {
        storage: MoveStorage::Copy {
            disks: vec!["linux/moved.qcow2".into()],
            keep_source: false,
        },
        // Slow enough to be caught in the middle.
        bandwidth_limit: Some(4 << 20),
        ..QemuMoveOptions::default()
    };
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let mut progress = move |p: &moves::Progress| {
        if when(p) {
            c.cancel("the user pressed Ctrl-C");
        }
    };
    let err = moves::move_vm(
        &t.host,
        src,
        vm,
        control,
        Box::new(TestDialer {
            dest: dest.clone(),
            rt: rt.clone(),
        }),
        &opts,
        &cancel,
        &mut progress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, MoveError::Cancelled { reason } if reason.contains("Ctrl-C")),
        "{err}"
    );
    assert!(err.vm_runs_here());
    assert!(matches!(served.await.unwrap(), QemuReceived::Discarded(_)));
    assert_eq!(dest.active(), 0);
    // The guest runs on the source, uninterrupted, on its own disk.
    assert_eq!(src.state().await, VmState::Running);
    let after = src.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    assert!(after.uptime_ms > before.uptime_ms);
    let report = src.guest_check().await.unwrap();
    assert!(report.passed(), "{report:?}");
    assert!(t.root.join("linux/src.qcow2").exists());
    // Nothing at the destination: no file, no runtime folder, no QEMU.
    assert!(!d.root.join("linux/moved.qcow2").exists());
    assert!(!d.host.vm_run_dir(vm.name()).exists());
    // The source's sockets of the move are gone too.
    let leftovers: Vec<_> = std::fs::read_dir(t.host.vm_run_dir(vm.name()))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nbd") || n == "mout.sock")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_refused_move_leaves_the_guest_running_on_the_source() {
    let t = TestHost::new(vec![]).await;
    let d = TestHost::new(vec![]).await;
    t.qcow2("linux/src.qcow2", "64M");
    // Something for the mirror to copy.
    let vm = guest(&t, "mv-cancel", "linux/src.qcow2");
    let src = boot(&t, &vm).await;
    let _reaper = Reaper(vec![d.host.vm_run_dir("mv-cancel").join("qemu.pid")]);

    // Refused by the destination's own checks: the report names the reason; nothing starts.
    let refusing = QemuDestination::new(
        d.host.clone(),
        QemuDestinationOptions {
            host_check: Some(Box::new(|_| {
                vec![Problem {
                    id: compatibility::DISABLED,
                    message: "live migration is disabled on hv2".into(),
                }]
            })),
            ..QemuDestinationOptions::default()
        },
    );
    let rt = tokio::runtime::Handle::current();
    let (control, served) = connect(&refusing, &rt);
    let err = moves::move_vm(
        &t.host,
        &src,
        &vm,
        control,
        Box::new(TestDialer {
            dest: refusing.clone(),
            rt: rt.clone(),
        }),
        &QemuMoveOptions {
            storage: MoveStorage::Copy {
                disks: vec!["../outside.qcow2".into()],
                keep_source: false,
            },
            ..QemuMoveOptions::default()
        },
        &CancelToken::new(),
        &mut no_progress(),
    )
    .await
    .unwrap_err();
    let MoveError::Incompatible { report } = &err else {
        panic!("{err}");
    };
    assert!(
        report
            .iter()
            .any(|(id, m)| *id == compatibility::DISABLED && m.contains("disabled")),
        "{report:?}"
    );
    assert!(
        report
            .iter()
            .any(|(id, m)| *id == compatibility::STORAGE && m.contains("disk[0].path")),
        "a path outside the storage roots is named: {report:?}"
    );
    assert!(matches!(served.await.unwrap(), QemuReceived::Refused(_)));
    assert!(!d.host.vm_run_dir("mv-cancel").exists());
    assert_eq!(src.state().await, VmState::Running);

    let dest = QemuDestination::new(d.host.clone(), QemuDestinationOptions::default());
    // During the bulk copy of the disk.
    cancel_at(&t, &d, &src, &vm, &dest, |p| {
        p.phase == Phase::PreCopy && p.round == 0 && p.bytes_sent > 0
    })
    .await;
    // During the memory's pre-copy (the disk in sync, QEMU migrating).
    cancel_at(&t, &d, &src, &vm, &dest, |p| {
        p.phase == Phase::PreCopy && p.round > 0
    })
    .await;
    assert_eq!(src.power_off().await.unwrap().kind, ExitKind::PoweredOff);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_only_move_switches_the_running_guest_to_new_files_on_its_chain() {
    let t = TestHost::new(vec![]).await;
    let base = t.qcow2("linux/base.qcow2", "64M");
    let top = t.root.join("linux/top.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    let vm = guest(&t, "mv-storage", "linux/top.qcow2");
    let src = boot(&t, &vm).await;
    let before = src.guest_status().await.unwrap();
    std::fs::create_dir_all(t.root.join("moved")).unwrap();

    // Outside the storage roots: refused, nothing changes.
    let err = moves::move_storage(
        &t.host,
        &src,
        &vm,
        &["/tmp/elsewhere.qcow2".into()],
        false,
        &CancelToken::new(),
        &mut no_progress(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("disk[0]"), "{err}");
    assert!(top.exists());

    let moved = moves::move_storage(
        &t.host,
        &src,
        &vm,
        &["moved/top.qcow2".into()],
        false,
        &CancelToken::new(),
        &mut no_progress(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(moved.deleted, vec![top.clone()]);
    assert!(!top.exists());
    assert!(base.exists(), "the parent stays");
    assert_eq!(moved.definition.disks[0].path, "moved/top.qcow2");
    let new_top = t.root.join("moved/top.qcow2");
    assert_eq!(moved.validated.disks()[0].layers[0].path, new_top);
    assert_eq!(moved.validated.disks()[0].layers[1].path, base);

    // QEMU writes the new file now; the guest never stopped and its checks pass.
    let blocks = src.qmp().execute(qapi::qmp::query_block {}).await.unwrap();
    let file = blocks
        .iter()
        .find_map(|b| b.inserted.as_ref().map(|i| i.file.clone()))
        .unwrap();
    assert_eq!(file, new_top.to_string_lossy());
    let after = src.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    assert!(after.disk.unwrap().durable_seq > before.disk.unwrap().durable_seq);
    assert!(src.guest_check().await.unwrap().passed());
    src.shutdown(Duration::from_secs(60)).await.unwrap();
    let info = tool(
        "qemu-img",
        &["info", "--backing-chain", new_top.to_str().unwrap()],
    );
    assert!(info.contains(base.to_str().unwrap()), "{info}");
    let check = tool("qemu-img", &["check", new_top.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 PATH` (the reference as written: relative
/// references name a file beside the image).
fn child(path: &Path, backing: &str) {
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            path.to_str().unwrap(),
        ],
    );
}

/// Moves `vm` with its storage to `d`, the active layer to the same relative path.
async fn move_with_storage(
    t: &TestHost,
    src: &QemuVm,
    vm: &ValidatedVm,
    dest: &QemuDestination,
    top: &str,
) -> (moves::MoveStats, QemuVm) {
    let rt = tokio::runtime::Handle::current();
    let (control, served) = connect(dest, &rt);
    let stats = moves::move_vm(
        &t.host,
        src,
        vm,
        control,
        Box::new(TestDialer {
            dest: dest.clone(),
            rt: rt.clone(),
        }),
        &QemuMoveOptions {
            storage: MoveStorage::Copy {
                disks: vec![top.into()],
                keep_source: false,
            },
            ..QemuMoveOptions::default()
        },
        &CancelToken::new(),
        &mut no_progress(),
    )
    .await
    .unwrap_or_else(|e| panic!("the move failed: {}", chain(&e)));
    let QemuReceived::Vm(arrived) = served.await.unwrap() else {
        panic!("the guest did not arrive");
    };
    (stats, arrived.vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_on_a_three_layer_chain_moves_with_its_parents_and_a_second_reuses_them() {
    let t = TestHost::new(vec![]).await;
    let d = TestHost::new(vec![]).await;
    let base = t.qcow2("linux/base.qcow2", "64M");
    // Data only the base holds, far from the region the guest writes.
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 32M 1M",
            base.to_str().unwrap(),
        ],
    );
    let mid = t.root.join("linux/mid.qcow2");
    child(&mid, "base.qcow2");
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xa5 40M 1M",
            mid.to_str().unwrap(),
        ],
    );
    child(&t.root.join("linux/top1.qcow2"), "mid.qcow2");
    child(&t.root.join("linux/top2.qcow2"), "mid.qcow2");
    let vm1 = guest(&t, "mv-chain1", "linux/top1.qcow2");
    let vm2 = guest(&t, "mv-chain2", "linux/top2.qcow2");
    let dest = QemuDestination::new(d.host.clone(), QemuDestinationOptions::default());
    let _reaper = Reaper(vec![
        d.host.vm_run_dir("mv-chain1").join("qemu.pid"),
        d.host.vm_run_dir("mv-chain2").join("qemu.pid"),
    ]);

    let src1 = boot(&t, &vm1).await;
    let before = src1.guest_status().await.unwrap();
    let (stats, moved1) = move_with_storage(&t, &src1, &vm1, &dest, "linux/top1.qcow2").await;
    let parents_len =
        std::fs::metadata(&base).unwrap().len() + std::fs::metadata(&mid).unwrap().len();
    assert_eq!(
        stats.disk_parent_bytes_sent, parents_len,
        "both parents crossed once"
    );
    assert_eq!(stats.disk_bytes_reused, 0);
    assert_eq!(stats.source_parents, vec![mid.clone(), base.clone()]);
    assert!(base.exists() && mid.exists(), "the source's parents stay");
    let after = moved1.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    assert!(moved1.guest_check().await.unwrap().passed());

    // A second VM on the same parents: nothing of them crosses again.
    let src2 = boot(&t, &vm2).await;
    let (stats2, moved2) = move_with_storage(&t, &src2, &vm2, &dest, "linux/top2.qcow2").await;
    assert_eq!(stats2.disk_parent_bytes_sent, 0, "the parents were reused");
    assert_eq!(stats2.disk_bytes_reused, parents_len);
    assert!(moved2.guest_check().await.unwrap().passed());

    moved1.shutdown(Duration::from_secs(60)).await.unwrap();
    moved2.shutdown(Duration::from_secs(60)).await.unwrap();
    // The chains are valid at the destination, inside its root, with the parents' data.
    for top in ["linux/top1.qcow2", "linux/top2.qcow2"] {
        let top = d.root.join(top);
        let info = tool(
            "qemu-img",
            &["info", "--backing-chain", top.to_str().unwrap()],
        );
        for layer in ["linux/mid.qcow2", "linux/base.qcow2"] {
            assert!(
                info.contains(d.root.join(layer).to_str().unwrap()),
                "{layer} in the chain: {info}"
            );
        }
        assert!(!info.contains(t.root.to_str().unwrap()), "{info}");
        let check = tool("qemu-img", &["check", top.to_str().unwrap()]);
        assert!(check.contains("No errors were found"), "{check}");
        for (pattern, at) in [("0x5a", "32M"), ("0xa5", "40M")] {
            let out = tool(
                "qemu-io",
                &[
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("read -P {pattern} {at} 1M"),
                    top.to_str().unwrap(),
                ],
            );
            assert!(!out.contains("Pattern verification failed"), "{out}");
        }
    }
}

/// A dialer whose stream links can all be cut at once (a network failure).
struct CuttingDialer {
    inner: TestDialer,
    closers: Arc<std::sync::Mutex<Vec<Arc<dyn LinkCloser>>>>,
}

impl Dialer for CuttingDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        let l = self.inner.dial()?;
        self.closers.lock().unwrap().push(Arc::clone(&l.closer));
        Ok(l)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_cut_in_the_middle_leave_the_guest_running_on_the_source_only() {
    let t = TestHost::new(vec![]).await;
    t.qcow2("linux/shared.qcow2", "64M");
    let vm = guest(&t, "mv-cut", "linux/shared.qcow2");
    let src = boot(&t, &vm).await;
    let before = src.guest_status().await.unwrap();
    let dest_host = host_at(&t, &t.root, "run-dst").await;
    let _reaper = Reaper(vec![dest_host.vm_run_dir("mv-cut").join("qemu.pid")]);
    let dest = QemuDestination::new(dest_host.clone(), QemuDestinationOptions::default());
    let rt = tokio::runtime::Handle::current();
    let (control, served) = connect(&dest, &rt);
    let closers: Arc<std::sync::Mutex<Vec<Arc<dyn LinkCloser>>>> = Arc::default();
    let cut = Arc::clone(&closers);
    let mut progress = move |p: &moves::Progress| {
        if p.phase == Phase::PreCopy && p.bytes_sent > 0 {
            for c in cut.lock().unwrap().iter() {
                c.close();
            }
        }
    };
    let err = moves::move_vm(
        &t.host,
        &src,
        &vm,
        control,
        Box::new(CuttingDialer {
            inner: TestDialer {
                dest: dest.clone(),
                rt: rt.clone(),
            },
            closers: Arc::clone(&closers),
        }),
        &QemuMoveOptions {
            multifd_channels: 2,
            bandwidth_limit: Some(8 << 20),
            ..QemuMoveOptions::default()
        },
        &CancelToken::new(),
        &mut progress,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MoveError::Failed { .. }), "{err}");
    assert!(err.vm_runs_here(), "{err}");
    assert!(!closers.lock().unwrap().is_empty(), "streams were cut");
    assert!(matches!(served.await.unwrap(), QemuReceived::Discarded(_)));
    // Exactly one guest: the source's, running on, writing its disk, checks passing.
    assert_eq!(src.state().await, VmState::Running);
    let after = src.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    assert!(after.disk.unwrap().durable_seq > before.disk.unwrap().durable_seq);
    assert!(src.guest_check().await.unwrap().passed());
    assert_eq!(dest.active(), 0);
    assert!(!dest_host.vm_run_dir("mv-cut").exists());
    assert_eq!(src.power_off().await.unwrap().kind, ExitKind::PoweredOff);
}
