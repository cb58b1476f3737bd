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
    Progress, Received, send_vm,
};
use vmgate_migrate::protocol::Compression;
use vmgate_migrate::vm::check::check_vm;
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
