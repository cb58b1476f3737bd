//! The migration engine in one process over loopback TCP (no authentication: the engine
//! alone). Real KVM on both ends: a memstress VM moves, its memory checks pass on the
//! destination; cancel keeps it at the source; hostile frames are refused. The same
//! scenarios over the Kerberos channel between separate processes are in the root crate's
//! tests/live_migration.rs.

mod vm_common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use vm_common::require_kvm;
use vmgate_migrate::engine::{
    CancelToken, Destination, DestinationOptions, Dialer, Link, MoveError, MoveOptions, Phase,
    Progress, Received, ReceivedEvent, compare_vm, incompatibility, send_vm,
};
use vmgate_migrate::protocol::{Compression, Incompatibility, ProtocolVersion};
use vmgate_migrate::vm::check::check_vm;
use vmgate_migrate::vm::cpuid::used_features;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

struct TcpDialer(SocketAddr);

impl Dialer for TcpDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Link::tcp(TcpStream::connect(self.0)?)?)
    }
}

/// A destination serving every connection on its own thread; completed moves' VMs are
/// sent to the returned channel.
fn destination(
    opts: DestinationOptions,
) -> (
    SocketAddr,
    std::sync::mpsc::Receiver<Received>,
    Arc<Destination>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = Arc::new(Destination::new(opts));
    let (tx, rx) = std::sync::mpsc::channel();
    let d = Arc::clone(&dest);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let d = Arc::clone(&d);
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = d.handle(Link::tcp(s).unwrap());
                if !matches!(r, Received::Joined | Received::Answered) {
                    let _ = tx.send(r);
                }
            });
        }
    });
    (addr, rx, dest)
}

fn memstress(memory_mib: u64, size_mib: u64, full: bool) -> VmConfig {
    VmConfig::from_toml(
        &format!(
            r#"
name = "mover"
memory_mib = {memory_mib}
vcpus = 2
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = {size_mib}
marker_every = 4
full_content = {full}
"#
        ),
        None,
    )
    .unwrap()
}

fn wait_passes(vm: &Vm, n: u64) {
    let t = std::time::Instant::now();
    while vm.mailbox(0).unwrap().counter < n {
        assert!(t.elapsed() < Duration::from_secs(60), "no guest progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn move_vm(
    vm: &Vm,
    addr: SocketAddr,
    opts: &MoveOptions,
    cancel: &CancelToken,
) -> (
    Result<vmgate_migrate::engine::MoveStats, MoveError>,
    Vec<Progress>,
) {
    let mut events = Vec::new();
    let control = Link::tcp(TcpStream::connect(addr).unwrap()).unwrap();
    let r = send_vm(vm, control, &mut TcpDialer(addr), opts, cancel, &mut |p| {
        events.push(p.clone());
    });
    (r, events)
}

#[test]
fn memstress_moves_and_checks_pass_on_the_destination() {
    require_kvm();
    let (addr, results, _d) = destination(DestinationOptions::default());
    for (channels, compression, full) in
        [(1, Compression::None, false), (3, Compression::Lz4, true)]
    {
        let vm = Vm::create(memstress(256, 64, full), &VmOptions::default()).unwrap();
        vm.resume().unwrap();
        wait_passes(&vm, 2);
        let opts = MoveOptions {
            channels,
            compression,
            ..MoveOptions::default()
        };
        let (r, events) = move_vm(&vm, addr, &opts, &CancelToken::new());
        let stats = r.unwrap_or_else(|e| panic!("move failed: {e}"));
        assert!(stats.rounds >= 2, "{stats:?}");
        assert!(events.iter().any(|p| p.phase == Phase::Completed));
        // The source's copy stays paused and is dropped; the destination runs it.
        assert!(!vm.running());
        let passes_at_switch = vm.mailbox(0).unwrap().counter;
        drop(vm);
        let Received::Vm(got) = results.recv_timeout(Duration::from_secs(30)).unwrap() else {
            panic!("the destination did not get the VM");
        };
        assert!(got.released, "the source did not confirm: {:?}", got.note);
        let dvm = &got.vm;
        assert!(dvm.running());
        wait_passes(dvm, passes_at_switch + 2);
        dvm.pause().unwrap();
        let reports = check_vm(dvm).unwrap();
        assert!(!reports.is_empty());
        for r in &reports {
            assert!(r.ok, "{r:?}");
        }
        eprintln!("moved with {channels} channels: {stats:?}");
    }
}

#[test]
fn cancel_during_precopy_keeps_the_vm_running_here() {
    require_kvm();
    let (addr, results, dest) = destination(DestinationOptions::default());
    let vm = Vm::create(memstress(256, 128, false), &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    wait_passes(&vm, 1);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let opts = MoveOptions {
        bandwidth_limit: Some(32 << 20),
        ..MoveOptions::default()
    };
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        c2.cancel("the administrator cancelled the move");
    });
    let (r, _) = move_vm(&vm, addr, &opts, &cancel);
    t.join().unwrap();
    match r {
        Err(MoveError::Cancelled { reason }) => {
            assert_eq!(reason, "the administrator cancelled the move")
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    assert!(vm.running());
    let before = vm.mailbox(0).unwrap().counter;
    wait_passes(&vm, before + 1);
    vm.pause().unwrap();
    for r in check_vm(&vm).unwrap() {
        assert!(r.ok, "{r:?}");
    }
    match results.recv_timeout(Duration::from_secs(10)).unwrap() {
        Received::Discarded(why) => assert!(why.contains("cancelled"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(dest.active(), 0);
}

#[test]
fn hostile_frames_are_refused_without_harm() {
    let (addr, results, dest) = destination(DestinationOptions::default());
    // An oversized batch header: refused from the header, nothing allocated.
    let mut s = TcpStream::connect(addr).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(b"VG");
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes()); // Hello
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&header).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        reply.starts_with(b"VG"),
        "the destination answers with an Error frame"
    );
    match results.recv_timeout(Duration::from_secs(5)).unwrap() {
        Received::Discarded(why) => assert!(why.contains("invalid first frame"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Garbage.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0x55; 64]).unwrap();
    let _ = s.read_to_end(&mut reply);
    assert!(matches!(
        results.recv_timeout(Duration::from_secs(5)).unwrap(),
        Received::Discarded(_)
    ));
    assert_eq!(dest.active(), 0);
}

#[test]
fn a_guest_that_finished_its_work_moves_and_stays_finished() {
    require_kvm();
    let (addr, results, _d) = destination(DestinationOptions::default());
    let config = VmConfig::from_toml(
        r#"
name = "filled"
memory_mib = 128
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 64
full_content = true
passes = 2
"#,
        None,
    )
    .unwrap();
    let vm = Vm::create(config, &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    wait_passes(&vm, 2);
    let (r, _) = move_vm(&vm, addr, &MoveOptions::default(), &CancelToken::new());
    let stats = r.unwrap_or_else(|e| panic!("move failed: {e}"));
    // 64 MiB of pseudo-random content: nothing compresses, nothing is zero.
    assert!(stats.pages_sent >= 16384, "{stats:?}");
    drop(vm);
    let Received::Vm(got) = results.recv_timeout(Duration::from_secs(30)).unwrap() else {
        panic!("the destination did not get the VM");
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        got.vm.mailbox(0).unwrap().counter,
        2,
        "the guest ran past its last pass"
    );
    got.vm.pause().unwrap();
    for r in check_vm(&got.vm).unwrap() {
        assert!(r.ok, "{r:?}");
    }
}

/// A small memstress VM with NICs `(mac, switch)`.
fn with_nics(name: &str, cpu_compat: bool, nics: &[(&str, &str)]) -> VmConfig {
    let mut toml = format!(
        r#"
name = "{name}"
memory_mib = 128
vcpus = 1
cpu_compat = {cpu_compat}
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 16
marker_every = 4
"#
    );
    for (mac, switch) in nics {
        toml.push_str(&format!(
            "[[nic]]\nmac = \"{mac}\"\nswitch = \"{switch}\"\n"
        ));
    }
    VmConfig::from_toml(&toml, None).unwrap()
}

/// A host check like the daemon's: this host has only the switch "Lab" (any case).
/// The NICs (MAC, switch) of each configuration a host check saw.
type SeenNics = Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

fn only_lab(seen: SeenNics) -> DestinationOptions {
    DestinationOptions {
        host_check: Some(Box::new(move |config: &VmConfig| {
            seen.lock().unwrap().push(
                config
                    .nics
                    .iter()
                    .map(|n| (n.mac.clone(), n.switch.clone()))
                    .collect(),
            );
            config
                .nics
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.switch.eq_ignore_ascii_case("lab"))
                .map(|(i, n)| Incompatibility {
                    id: incompatibility::SWITCH,
                    message: format!("NIC {i}: this host has no switch {}", n.switch).into(),
                })
                .collect()
        })),
        ..DestinationOptions::default()
    }
}

/// A feature that `full` (a VM's CPUID without compatibility mode) uses and `compat` (in
/// compatibility mode) does not: how a host's configuration would name it (its short name
/// in lower case, or its place when it has no short name), and its full name in reports.
/// The vector extensions are preferred; under kvm_pvm the guest is not offered them, and
/// another feature the baseline masks is taken.
fn feature_only_in(full: &Vm, compat: &Vm) -> (String, String) {
    let used = used_features(full.guest_cpuid());
    let baseline = used_features(compat.guest_cpuid());
    let candidates: Vec<&String> = used.iter().filter(|f| !baseline.contains(f)).collect();
    let preferred = ["AVX512F", "AVX2", "AVX", "BMI2", "BMI1"]
        .iter()
        .find_map(|short| {
            candidates
                .iter()
                .find(|f| f.starts_with(&format!("{short} (")))
        });
    let Some(full_name) = preferred.or(candidates.first()) else {
        panic!("the baseline masks no feature this host offers guests: {used:?}");
    };
    let hidden = full_name
        .split_once(" (")
        .map_or(full_name.as_str(), |(short, _)| short)
        .to_lowercase();
    (hidden, (*full_name).clone())
}

fn connect(addr: SocketAddr) -> Link {
    Link::tcp(TcpStream::connect(addr).unwrap()).unwrap()
}

fn cpu_message(features: &str) -> String {
    format!(
        "this host's processor lacks features the VM uses: {features}; move it to a compatible host, or run it in processor compatibility mode"
    )
}

#[test]
fn an_older_destination_refuses_a_newer_source_and_the_vm_stays() {
    require_kvm();
    let (addr, results, dest) = destination(DestinationOptions {
        version: ProtocolVersion::V1,
        ..DestinationOptions::default()
    });
    let vm = Vm::create(with_nics("newer", false, &[]), &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    wait_passes(&vm, 1);
    let opts = MoveOptions {
        version: ProtocolVersion::new(2).unwrap(),
        ..MoveOptions::default()
    };
    let (r, events) = move_vm(&vm, addr, &opts, &CancelToken::new());
    let e = r.expect_err("an older destination took a newer source's move");
    let MoveError::VersionRefused {
        source_version,
        destination_min,
        destination: destination_version,
        ..
    } = &e
    else {
        panic!("expected a version refusal, got {e:?}");
    };
    assert_eq!(
        (*source_version, *destination_min, *destination_version),
        (2, 1, 1)
    );
    let text = e.to_string();
    assert!(
        text.contains("(protocol versions 1 to 1)") && text.contains("(protocol version 2)"),
        "{text}"
    );
    assert!(
        text.contains("update the destination first. The VM keeps running here."),
        "{text}"
    );
    assert_eq!(events.last().map(|p| p.phase), Some(Phase::Failed));
    match results.recv_timeout(Duration::from_secs(10)).unwrap() {
        Received::Discarded(why) => {
            assert!(
                why.contains("(protocol 2), this host accepts 1 to 1"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A comparison is refused the same way.
    match compare_vm(&vm, connect(addr), &opts) {
        Err(MoveError::VersionRefused {
            source_version: 2,
            destination: 1,
            ..
        }) => {}
        other => panic!("expected a version refusal, got {other:?}"),
    }
    assert!(matches!(
        results.recv_timeout(Duration::from_secs(10)).unwrap(),
        Received::Discarded(_)
    ));
    assert_eq!(dest.active(), 0, "the destination holds nothing");
    // A destination that accepts version 2 is told this source does not speak it.
    let (addr2, results2, dest2) = destination(DestinationOptions {
        version: ProtocolVersion::new(2).unwrap(),
        ..DestinationOptions::default()
    });
    let (r, _) = move_vm(&vm, addr2, &opts, &CancelToken::new());
    match r {
        Err(MoveError::Failed { cause, .. }) => assert!(
            cause.contains("accepted protocol version 2, which this source announced but does not speak (it speaks version 1)"),
            "{cause}"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    // (This build cannot decode version-2 frames either: the reason it gives varies.)
    assert!(matches!(
        results2.recv_timeout(Duration::from_secs(10)).unwrap(),
        Received::Discarded(_)
    ));
    assert_eq!(dest2.active(), 0);
    // The VM never stopped here.
    assert!(vm.running());
    let before = vm.mailbox(0).unwrap().counter;
    wait_passes(&vm, before + 1);
    vm.pause().unwrap();
    for r in check_vm(&vm).unwrap() {
        assert!(r.ok, "{r:?}");
    }
}

#[test]
fn compare_reports_every_reason_and_the_destination_keeps_nothing() {
    require_kvm();
    let full = Vm::create(
        with_nics("full", false, &[("52:54:00:aa:00:01", "External")]),
        &VmOptions::default(),
    )
    .unwrap();
    let compat = Vm::create(
        with_nics("compat", true, &[("52:54:00:aa:00:02", "External")]),
        &VmOptions::default(),
    )
    .unwrap();
    full.resume().unwrap();
    compat.resume().unwrap();
    let (hidden, hidden_full) = feature_only_in(&full, &compat);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let checked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c2 = Arc::clone(&checked);
    let (addr, results, dest) = destination(DestinationOptions {
        hidden_cpu_features: vec![hidden.to_lowercase()],
        on_event: Box::new(move |e| {
            if let ReceivedEvent::Checked { vm, refused, .. } = e {
                c2.lock().unwrap().push((vm, refused));
            }
        }),
        ..only_lab(Arc::clone(&seen))
    });
    wait_passes(&full, 1);
    wait_passes(&compat, 1);

    // Every reason at once: the processor (a feature this host pretends to lack) and the switch.
    let report = compare_vm(&full, connect(addr), &MoveOptions::default()).unwrap();
    assert_eq!(
        report,
        vec![
            (incompatibility::CPU, cpu_message(&hidden_full)),
            (
                incompatibility::SWITCH,
                "NIC 0: this host has no switch External".to_string()
            ),
        ]
    );
    match results.recv_timeout(Duration::from_secs(10)).unwrap() {
        Received::Discarded(why) => assert!(why.contains("the VM cannot come here"), "{why}"),
        other => panic!("{other:?}"),
    }

    // Mapped, only the processor remains.
    let mapped = MoveOptions {
        switch_map: vec![("external".into(), "Lab".into())],
        ..MoveOptions::default()
    };
    let report = compare_vm(&full, connect(addr), &mapped).unwrap();
    assert_eq!(
        report,
        vec![(incompatibility::CPU, cpu_message(&hidden_full))]
    );
    assert!(matches!(
        results.recv_timeout(Duration::from_secs(10)).unwrap(),
        Received::Discarded(_)
    ));

    // In compatibility mode the VM does not use the hidden feature: compatible. The
    // destination prepared it, then discarded it when the comparison ended.
    let report = compare_vm(&compat, connect(addr), &mapped).unwrap();
    assert_eq!(report, Vec::<(u32, String)>::new());
    match results.recv_timeout(Duration::from_secs(10)).unwrap() {
        Received::Discarded(why) => assert!(why.contains("compare only"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(dest.active(), 0, "the destination holds nothing");

    // The destination saw the mapped switch and the same MAC; the VMs keep their own.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            vec![("52:54:00:aa:00:01".to_string(), "External".to_string())],
            vec![("52:54:00:aa:00:01".to_string(), "Lab".to_string())],
            vec![("52:54:00:aa:00:02".to_string(), "Lab".to_string())],
        ]
    );
    assert_eq!(compat.config().nics[0].switch, "External");
    let checked = checked.lock().unwrap().clone();
    assert_eq!(checked.len(), 3);
    assert_eq!(checked[2], ("compat".to_string(), Vec::new()));

    // Both VMs ran on untouched.
    for vm in [&full, &compat] {
        assert!(vm.running());
        let before = vm.mailbox(0).unwrap().counter;
        wait_passes(vm, before + 1);
        vm.pause().unwrap();
        for r in check_vm(vm).unwrap() {
            assert!(r.ok, "{r:?}");
        }
    }
}

#[test]
fn a_mapped_vm_moves_onto_the_destinations_switch() {
    require_kvm();
    let vm = Vm::create(
        with_nics(
            "mapped",
            true,
            &[
                ("52:54:00:bb:00:01", "External"),
                ("52:54:00:bb:00:02", "lab"),
            ],
        ),
        &VmOptions::default(),
    )
    .unwrap();
    vm.resume().unwrap();
    // Which features the baseline hides does not depend on the VM: a compatible VM moves to
    // a host that pretends to lack all of them.
    let probe = Vm::create(with_nics("probe", false, &[]), &VmOptions::default()).unwrap();
    let (hidden, _) = feature_only_in(&probe, &vm);
    drop(probe);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (addr, results, _d) = destination(DestinationOptions {
        hidden_cpu_features: vec![hidden],
        ..only_lab(Arc::clone(&seen))
    });
    wait_passes(&vm, 1);
    let opts = MoveOptions {
        switch_map: vec![("EXTERNAL".into(), "Lab".into())],
        ..MoveOptions::default()
    };
    let (r, _) = move_vm(&vm, addr, &opts, &CancelToken::new());
    r.unwrap_or_else(|e| panic!("move failed: {e}"));
    let passes_at_switch = vm.mailbox(0).unwrap().counter;
    drop(vm);
    let Received::Vm(got) = results.recv_timeout(Duration::from_secs(30)).unwrap() else {
        panic!("the destination did not get the VM");
    };
    let nics: Vec<(String, String)> = got
        .vm
        .config()
        .nics
        .iter()
        .map(|n| (n.mac.clone(), n.switch.clone()))
        .collect();
    assert_eq!(
        nics,
        vec![
            ("52:54:00:bb:00:01".to_string(), "Lab".to_string()),
            ("52:54:00:bb:00:02".to_string(), "lab".to_string()),
        ]
    );
    wait_passes(&got.vm, passes_at_switch + 1);
    got.vm.pause().unwrap();
    for r in check_vm(&got.vm).unwrap() {
        assert!(r.ok, "{r:?}");
    }
}
