//! What the live moves of QEMU guests (the next issues) will rely on, checked against the
//! installed QEMU through this backend's QMP layer: a destination started with
//! `-incoming defer` (and `-S`), memory moved with multifd over UNIX sockets only (through a
//! relay of ours, which sees the main stream and one connection per channel), the disk
//! copied by a block mirror into the destination's NBD export on a UNIX socket, the mirror
//! finished without pivoting, the destination resumed, and its MAC announced. The guest keeps
//! its boot id and uptime, and its own checks (memory pattern, and the disk sequence read back
//! from the destination's copy) pass there, and a TCP connection opened before the move still
//! answers after it.

mod qemu_common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};

use qapi::qmp;
use qemu_common::*;
use vmgate_guest::agent::READY_MARKER;
use vmgate_migrate::qemu::{ExitKind, QemuVm, StartMode, VmState};

fn unix(path: &std::path::Path) -> qmp::UnixSocketAddress {
    qmp::UnixSocketAddress {
        abstract_: None,
        tight: None,
        path: path.to_string_lossy().into_owned(),
    }
}

async fn set_multifd(vm: &QemuVm, channels: u8) {
    vm.qmp()
        .execute(qmp::migrate_set_capabilities {
            capabilities: vec![
                qmp::MigrationCapabilityStatus {
                    capability: qmp::MigrationCapability::multifd,
                    state: true,
                },
                qmp::MigrationCapabilityStatus {
                    capability: qmp::MigrationCapability::events,
                    state: true,
                },
            ],
        })
        .await
        .expect("migrate-set-capabilities");
    vm.qmp()
        .execute(qmp::migrate_set_parameters(qmp::MigrateSetParameters {
            multifd_channels: Some(channels),
            ..Default::default()
        }))
        .await
        .expect("migrate-set-parameters");
}

/// Carries every connection made to `listener` to `target` (what vmgated will do over its
/// authenticated channels), counting them.
async fn relay(listener: UnixListener, target: PathBuf, count: Arc<AtomicUsize>) {
    while let Ok((mut a, _)) = listener.accept().await {
        count.fetch_add(1, Ordering::SeqCst);
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut b) = UnixStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
        });
    }
}

/// Waits for the block job to be ready (its first full pass done).
async fn wait_job_ready(vm: &QemuVm, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = vm
            .qmp()
            .execute(qmp::query_block_jobs {})
            .await
            .expect("query-block-jobs");
        let j = jobs
            .iter()
            .find_map(|j| match j {
                qmp::BlockJobInfo::mirror { base, .. } if base.device == job => Some(base),
                _ => None,
            })
            .expect("the mirror job exists");
        if j.ready {
            return;
        }
        assert!(Instant::now() < deadline, "mirror not ready: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `status` in the MIGRATION events or query-migrate.
async fn wait_migration(vm: &QemuVm, want: qmp::MigrationStatus) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let info = vm
            .qmp()
            .execute(qmp::query_migrate {})
            .await
            .expect("query-migrate");
        let status = info.status;
        if status == Some(want) {
            return;
        }
        assert!(
            !matches!(
                status,
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled)
            ),
            "migration ended: {status:?} {:?}",
            info.error_desc
        );
        assert!(Instant::now() < deadline, "migration still {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_over_unix_sockets_with_a_block_mirror_to_nbd_moves_the_guest() {
    let switch = Switch::new();
    let t = TestHost::new(vec![switch.config("Lab")]).await;
    t.qcow2("linux/src.qcow2", "64M");
    t.qcow2("linux/dst.qcow2", "64M");
    let src_vm = t.validate(&linux_toml("mig-src", Some("linux/src.qcow2"), true, ""));
    let dst_vm = t.validate(&linux_toml("mig-dst", Some("linux/dst.qcow2"), true, ""));
    let src = t.start(&src_vm, StartMode::Run).await;
    wait_for_text(&t.console("mig-src"), READY_MARKER, 1, BOOT_TIMEOUT).await;
    let before = src.guest_status().await.unwrap();
    // A connection to the guest opened before the move.
    let mut conn = switch
        .connect_echo(Duration::from_secs(60))
        .expect("echo connection");
    assert_eq!(
        echo_on(&mut conn, "before the move").unwrap(),
        "before the move"
    );

    let dst = t.start(&dst_vm, StartMode::Incoming).await;
    assert_eq!(dst.state().await, VmState::Incoming);
    let sockets = t.tmp.path().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    let nbd = sockets.join("nbd.sock");
    let mig = sockets.join("mig.sock");
    // The source migrates to a socket of ours, relayed to the destination's.
    let relayed = sockets.join("relay.sock");
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(relay(
        UnixListener::bind(&relayed).unwrap(),
        mig.clone(),
        Arc::clone(&connections),
    ));

    // Destination: an NBD server on a UNIX socket, exporting its (empty) disk writable.
    dst.qmp()
        .execute(qmp::nbd_server_start {
            max_connections: None,
            tls_authz: None,
            tls_creds: None,
            addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
                data: unix(&nbd),
            }),
        })
        .await
        .expect("nbd-server-start on a unix socket");
    dst.qmp()
        .execute(qmp::block_export_add(qmp::BlockExportOptions::nbd {
            base: qmp::BlockExportOptionsBase {
                fixed_iothread: None,
                iothread: None,
                writable: Some(true),
                writethrough: None,
                id: "export0".into(),
                node_name: "disk0".into(),
            },
            nbd: qmp::BlockExportOptionsNbd {
                base: qmp::BlockExportOptionsNbdBase {
                    description: None,
                    name: Some("disk0".into()),
                },
                allocation_depth: None,
                bitmaps: None,
            },
        }))
        .await
        .expect("block-export-add nbd");

    // Source: an nbd node on that socket, and a mirror of disk0 into it.
    src.qmp()
        .execute(qmp::blockdev_add(qmp::BlockdevOptions::nbd {
            base: qmp::BlockdevOptionsBase {
                auto_read_only: None,
                cache: None,
                detect_zeroes: None,
                discard: None,
                force_share: None,
                node_name: Some("mirror-target".into()),
                read_only: None,
            },
            nbd: qmp::BlockdevOptionsNbd {
                export: Some("disk0".into()),
                open_timeout: None,
                reconnect_delay: None,
                tls_creds: None,
                tls_hostname: None,
                x_dirty_bitmap: None,
                server: qmp::SocketAddress::unix(unix(&nbd)),
            },
        }))
        .await
        .expect("blockdev-add nbd client on a unix socket");
    src.qmp()
        .execute(qmp::blockdev_mirror {
            auto_dismiss: None,
            auto_finalize: None,
            buf_size: None,
            copy_mode: Some(qmp::MirrorCopyMode::write_blocking),
            filter_node_name: None,
            granularity: None,
            job_id: Some("mirror0".into()),
            on_source_error: None,
            on_target_error: None,
            replaces: None,
            speed: None,
            device: "disk0".into(),
            sync: qmp::MirrorSyncMode::full,
            target: "mirror-target".into(),
        })
        .await
        .expect("blockdev-mirror");
    wait_job_ready(&src, "mirror0").await;

    // Memory: multifd with 2 channels, over one UNIX socket path.
    set_multifd(&src, 2).await;
    set_multifd(&dst, 2).await;
    let mut dst_events = dst.events();
    dst.qmp()
        .execute(qmp::migrate_incoming {
            channels: None,
            exit_on_error: None,
            uri: Some(format!("unix:{}", mig.display())),
        })
        .await
        .expect("migrate-incoming unix:");
    let started = Instant::now();
    src.qmp()
        .execute(qmp::migrate {
            channels: None,
            detach: None,
            resume: None,
            uri: Some(format!("unix:{}", relayed.display())),
        })
        .await
        .expect("migrate unix:");
    wait_migration(&src, qmp::MigrationStatus::completed).await;
    eprintln!(
        "migration completed in {:.2} s",
        started.elapsed().as_secs_f32()
    );
    assert_eq!(src.state().await, VmState::Migrated);
    // The main stream and one connection per multifd channel, all to the same socket.
    assert_eq!(connections.load(Ordering::SeqCst), 1 + 2);

    // The source is paused: finish the mirror without pivoting (the target is in sync), then
    // the destination drops its export and runs the guest.
    src.qmp()
        .execute(qmp::block_job_cancel {
            force: None,
            device: "mirror0".into(),
        })
        .await
        .expect("block-job-cancel of the ready mirror");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !src
        .qmp()
        .execute(qmp::query_block_jobs {})
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the mirror did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The source lets go of the NBD connection (asynchronously: the destination may still
    // count it, so the export is removed in hard mode).
    src.qmp()
        .execute(qmp::blockdev_del {
            node_name: "mirror-target".into(),
        })
        .await
        .expect("blockdev-del of the nbd client node");
    dst.qmp()
        .execute(qmp::block_export_del {
            mode: Some(qmp::BlockExportRemoveMode::hard),
            id: "export0".into(),
        })
        .await
        .expect("block-export-del");
    dst.qmp()
        .execute(qmp::nbd_server_stop {})
        .await
        .expect("nbd-server-stop");
    assert_eq!(
        dst.state().await,
        VmState::Paused,
        "-S keeps the destination paused"
    );
    dst.resume().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), dst_events.recv()).await {
            Ok(Ok(e)) if e.name == "RESUME" => break,
            _ => assert!(
                Instant::now() < deadline,
                "no RESUME event from the destination"
            ),
        }
    }
    dst.qmp()
        .execute(qmp::announce_self(qmp::AnnounceParameters {
            id: None,
            interfaces: None,
            initial: 50,
            max: 550,
            rounds: 3,
            step: 50,
        }))
        .await
        .expect("announce-self");

    // The guest runs on the destination: same boot, uptime went on, checks pass (the disk
    // check reads the destination's copy with O_DIRECT).
    let after = dst
        .guest_status()
        .await
        .expect("the guest answers on the destination");
    assert_eq!(after.boot_id, before.boot_id);
    assert!(after.uptime_ms > before.uptime_ms);
    assert!(after.memory.passes > before.memory.passes);
    let report = dst.guest_check().await.unwrap();
    assert!(report.passed(), "checks on the destination: {report:?}");
    // The connection opened before the move still answers (the MAC was announced on the
    // switch), and new ones too.
    let reply = tokio::task::spawn_blocking(move || echo_on(&mut conn, "after the move"))
        .await
        .unwrap()
        .expect("the old connection answers");
    assert_eq!(reply, "after the move");
    let reply = switch
        .echo("a new connection", Duration::from_secs(30))
        .unwrap();
    assert_eq!(reply, "a new connection");

    assert_eq!(src.power_off().await.unwrap().kind, ExitKind::PoweredOff);
    assert_eq!(dst.power_off().await.unwrap().kind, ExitKind::PoweredOff);
    // The destination's image is a valid qcow2 with the guest's data.
    let check = tool(
        "qemu-img",
        &["check", t.root.join("linux/dst.qcow2").to_str().unwrap()],
    );
    assert!(check.contains("No errors were found"), "{check}");
}

/// Shared storage: the destination QEMU opens the very image the source writes (inactive until
/// the move completes), a third QEMU is refused as a second writer before and after the move,
/// and the guest's disk check passes on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_storage_is_handed_over_by_qemus_image_locking() {
    let t = TestHost::new(vec![]).await;
    t.qcow2("linux/shared.qcow2", "64M");
    let src_vm = t.validate(&linux_toml("sh-src", Some("linux/shared.qcow2"), false, ""));
    let dst_vm = t.validate(&linux_toml("sh-dst", Some("linux/shared.qcow2"), false, ""));
    let intruder = t.validate(&linux_toml("sh-3rd", Some("linux/shared.qcow2"), false, ""));
    let src = t.start(&src_vm, StartMode::Run).await;
    wait_for_text(&t.console("sh-src"), READY_MARKER, 1, BOOT_TIMEOUT).await;
    let before = src.guest_status().await.unwrap();

    let dst = t.start(&dst_vm, StartMode::Incoming).await;
    let second_writer = |when: &str, e: vmgate_migrate::qemu::QemuError| {
        let text = chain(&e);
        assert!(text.contains("lock"), "{when}: {text}");
    };
    second_writer(
        "before the move",
        QemuVm::start(&t.host, &intruder, StartMode::Paused)
            .await
            .unwrap_err(),
    );

    let mig = t.tmp.path().join("shared-mig.sock");
    dst.qmp()
        .execute(qmp::migrate_incoming {
            channels: None,
            exit_on_error: None,
            uri: Some(format!("unix:{}", mig.display())),
        })
        .await
        .unwrap();
    src.qmp()
        .execute(qmp::migrate {
            channels: None,
            detach: None,
            resume: None,
            uri: Some(format!("unix:{}", mig.display())),
        })
        .await
        .unwrap();
    wait_migration(&src, qmp::MigrationStatus::completed).await;
    dst.resume().await.unwrap();
    second_writer(
        "after the move",
        QemuVm::start(&t.host, &intruder, StartMode::Paused)
            .await
            .unwrap_err(),
    );

    let after = dst.guest_status().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    let disk = after.disk.unwrap();
    assert!(disk.durable_seq >= before.disk.unwrap().durable_seq);
    let report = dst.guest_check().await.unwrap();
    assert!(report.passed(), "{report:?}");
    assert_eq!(src.power_off().await.unwrap().kind, ExitKind::PoweredOff);
    assert_eq!(dst.power_off().await.unwrap().kind, ExitKind::PoweredOff);
}
