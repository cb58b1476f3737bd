use super::credential::MAX_CCACHE;
use super::host::SpnStatus;
use super::jobs::{Direction, JobKind, JobState, QueuedPhase, QueuedProgress};
use super::moves::{LivePhase, LiveProgress, MoveFigures, MoveMethod};
use super::storage::{LayerAction, MovedDisk, OldFile, StorageKind, StoragePhase, StorageProgress};
use super::vm::{Backend, DiskStats, NicInfo, VmState};
use super::*;

#[test]
fn requests_on_the_wire() {
    assert_eq!(
        serde_json::to_string(&Request::Version).unwrap(),
        r#"{"request":"version"}"#
    );
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"request":"host_show"}"#).unwrap(),
        Request::HostShow
    );
    let blob = Request::Move(MoveSpec {
        vm: "web".into(),
        to: vec!["127.0.0.12:6600".into()],
        destination: "hv2.lab.example.test".into(),
        ccache: Some(CcacheBlob::new(b"\x05\x04secret-ticket".to_vec())),
        switch_map: Vec::new(),
        storage_path: None,
        disks: Vec::new(),
        keep_source: false,
    });
    let line = serde_json::to_string(&blob).unwrap();
    assert_eq!(
        line,
        r#"{"request":"move","vm":"web","to":["127.0.0.12:6600"],"destination":"hv2.lab.example.test","ccache":"BQRzZWNyZXQtdGlja2V0"}"#
    );
    assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), blob);
    // Never printed.
    let dbg = format!("{blob:?}");
    assert!(dbg.contains("ccache: Some((secret, 15 bytes))"), "{dbg}");
    assert!(!dbg.contains("secret-ticket"), "{dbg}");
    // Bad base64 is refused without echoing the text.
    let e = serde_json::from_str::<Request>(
        r#"{"request":"move","vm":"a","to":[],"destination":"b","ccache":"c2VjcmV0!!!"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not valid base64"), "{e}");
    assert!(!e.contains("c2VjcmV0"), "{e}");
    // Too large before decoding.
    let big = format!(
        r#"{{"request":"move","vm":"a","to":[],"destination":"b","ccache":"{}"}}"#,
        "A".repeat(MAX_CCACHE / 3 * 4 + 8)
    );
    let e = serde_json::from_str::<Request>(&big)
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");
    // Unknown requests and fields are errors.
    assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    // A storage-only move: a folder, or (current file, new file) pairs.
    let storage = Request::MoveStorage(StorageMoveSpec {
        vm: "web".into(),
        storage_path: None,
        disks: vec![("/vms/a/web.qcow2".into(), "/vms/b/web.qcow2".into())],
        keep_source: true,
        bandwidth: None,
    });
    let line = serde_json::to_string(&storage).unwrap();
    assert_eq!(
        line,
        r#"{"request":"move_storage","vm":"web","disks":[["/vms/a/web.qcow2","/vms/b/web.qcow2"]],"keep_source":true}"#
    );
    assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), storage);
    assert!(
        serde_json::from_str::<Request>(
            r#"{"request":"move_storage","vm":"web","storage_path":"/vms/b","to":["x"]}"#
        )
        .is_err()
    );
}

fn live(job: &str, phase: LivePhase) -> LiveProgress {
    LiveProgress {
        job: job.into(),
        phase,
        round: 2,
        bytes_sent: 1 << 20,
        bytes_remaining: 4096,
        rate_bytes_s: 1e9,
        dirty_rate_bytes_s: 2e6,
        expected_downtime_ms: 1.5,
        throttle_percent: 0,
        converging: true,
    }
}

#[test]
fn every_answer_with_data_reads_back_as_sent() {
    let job = JobInfo {
        id: "j1".into(),
        kind: JobKind::Live,
        direction: Direction::Outgoing,
        vm: "web".into(),
        peer: "hv2".into(),
        user: "alice@LAB.EXAMPLE.TEST".into(),
        state: JobState::Completed,
        position: None,
        progress: Some(JobProgress::Live(live("j1", LivePhase::Handoff))),
        submitted: 1,
        waited_ms: 0,
        ended: Some(2),
        outcome: Some("web runs on hv2".into()),
    };
    let answers = [
        Response::Job(Box::new(job.clone())),
        Response::Jobs { jobs: vec![job] },
        Response::Checked(VmCheckReport {
            vm: "web".into(),
            passed: true,
            details: vec!["ok".into()],
        }),
        Response::Console {
            text: "hello".into(),
            next_offset: 5,
        },
        Response::Compared {
            vm: "web".into(),
            destination: "hv2".into(),
            report: vec![Incompatibility {
                id: 1005,
                message: "no switch".into(),
            }],
        },
        Response::StorageMoved(Box::new(StorageMoveSummary {
            job: "j2".into(),
            vm: "web".into(),
            user: "root (uid 0) on this host".into(),
            total_ms: 120,
            paused_us: 850,
            bytes_copied: 4 << 20,
            disks: vec![MovedDisk {
                disk: 0,
                source: "/vms/a/web.qcow2".into(),
                destination: "/vms/b/web.qcow2".into(),
                layers: vec![("/vms/b/web.qcow2".into(), LayerAction::Mirror)],
                bytes_copied: 4 << 20,
                rounds: 1,
                paused_us: 850,
                old_files: vec![OldFile {
                    path: "/vms/a/web.qcow2".into(),
                    deleted: false,
                    kept_because: Some("the source files were to be kept".into()),
                }],
            }],
        })),
        Response::Moved(Box::new(MoveSummary {
            job: "j1".into(),
            vm: "web".into(),
            destination: "hv2".into(),
            address: "127.0.0.12:6600".into(),
            user: "alice@LAB.EXAMPLE.TEST".into(),
            method: MoveMethod::OwnTicket,
            stats: MoveFigures {
                total_ms: 12.5,
                shared_disks: vec!["/vms/web.raw".into()],
                ..MoveFigures::default()
            },
        })),
        Response::Vm(Box::new(VmDetail {
            summary: VmSummary {
                name: "web".into(),
                state: VmState::Running,
                memory_mib: 128,
                vcpus: 1,
                origin: "created here".into(),
                backend: Backend::Microvm,
            },
            cpu_compat: false,
            cpu_features: vec!["avx2 (CPUID 0x7 ebx bit 5)".into()],
            nics: vec![NicInfo {
                mac: "52:54:00:00:00:01".into(),
                switch: "Lab".into(),
            }],
            disks: vec!["/vms/web.raw".into()],
            disk_stats: vec![DiskStats {
                reads: 1,
                writes: 2,
                flushes: 0,
                errors: 0,
                bytes_read: 4096,
                bytes_written: 8192,
                write_p50_ns: 3000,
                write_p99_ns: 9000,
                write_max_ns: 12000,
                window_ms: 1500,
            }],
            console: None,
        })),
        Response::Progress {
            progress: JobProgress::Queued(QueuedProgress {
                job: "j3".into(),
                kind: Some(StorageKind::Storage),
                phase: QueuedPhase::Queued,
                position: 2,
                limit: 1,
            }),
        },
        Response::Progress {
            progress: JobProgress::Storage(StorageProgress {
                job: "j3".into(),
                kind: StorageKind::Storage,
                phase: StoragePhase::Bulk,
                disk: 1,
                disk_number: 1,
                disks: 1,
                layer: 0,
                bytes_copied: 10,
                bytes_total: 20,
                round: 0,
                dirty_blocks: 0,
                rate_bytes_s: 5,
            }),
        },
        Response::Progress {
            progress: JobProgress::Live(live("j4", LivePhase::PreCopy)),
        },
    ];
    for a in answers {
        let line = a.to_line();
        let back: Response = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(back, a, "{line}");
    }
}

#[test]
fn responses_on_the_wire() {
    let v = Response::Version(VersionInfo {
        daemon: "0.1.0".into(),
        protocol: 1,
        min_protocol: 1,
    });
    assert_eq!(
        v.to_line(),
        r#"{"result":"version","daemon":"0.1.0","protocol":1,"min_protocol":1}"#
    );
    let e = Response::error(ErrorCode::AccessDenied, "no");
    assert_eq!(
        e.to_line(),
        r#"{"result":"error","code":"access_denied","message":"no"}"#
    );
    assert_eq!(serde_json::from_str::<Response>(&e.to_line()).unwrap(), e);
    // Progress lines keep the engine's names: a live move's phase in kebab case, a storage
    // move's marked with its kind, a queued one with its place.
    let p = Response::Progress {
        progress: JobProgress::Live(live("j1", LivePhase::PreCopy)),
    };
    assert!(!p.is_final());
    let json: serde_json::Value = serde_json::from_str(&p.to_line()).unwrap();
    assert_eq!(json["progress"]["phase"], "pre-copy");
    assert_eq!(json["progress"]["job"], "j1");
    let q = Response::Progress {
        progress: JobProgress::Queued(QueuedProgress {
            job: "j2".into(),
            kind: None,
            phase: QueuedPhase::Queued,
            position: 1,
            limit: 2,
        }),
    };
    assert_eq!(
        q.to_line(),
        r#"{"result":"progress","progress":{"job":"j2","phase":"queued","position":1,"limit":2}}"#
    );
    // An SPN's state, and a denial's diagnosis as a type.
    let s = host::SpnState {
        spn: "X/hv1".into(),
        state: SpnStatus::RegisteredNow,
    };
    assert_eq!(
        serde_json::to_string(&s).unwrap(),
        r#"{"spn":"X/hv1","state":"registered_now"}"#
    );
    let d = vmgate_auth::Diagnosis::new(WinCode::AccessDenied, "carol is not a member")
        .with_fix("samba-tool group addmembers X carol");
    let denied = Response::denied(&d);
    let back: Response = serde_json::from_str(&denied.to_line()).unwrap();
    let Response::Error(e) = back else {
        panic!("{back:?}")
    };
    assert_eq!(e.code, ErrorCode::Denied);
    assert_eq!(e.win_code.as_deref(), Some("0x80070005"));
    assert_eq!(e.diagnosis.and_then(|w| w.diagnosis()), Some(d));
}
