//! Shared-nothing move throughput next to a plain copy of the same image.
//!
//! ```text
//! cargo run --release -p vmgate-migrate --example move_storage_bench -- [SIZE_MIB] [DIR]
//! ```
//!
//! Makes a SIZE_MIB (default 512) raw image of incompressible data in DIR (default: a new
//! temporary directory under /var/tmp; its first 4 MiB, the diskstress region, start out
//! zero), then measures with a warm page cache: `cp` + `sync` of the image, and a
//! shared-nothing move through the engine over loopback TCP (1 and 4 channels) of a running
//! VM (64 MiB of memory) whose vCPU runs diskstress on the image, from the first byte to the
//! source's release, the destination's files made durable before it resumes the VM. The
//! move's figure is image bytes / move time, so it includes the memory (small here) and the
//! setup. Last, the same VM moves without its storage (shared storage: only memory crosses,
//! the image's lock is handed over at the switchover), for its total time and downtime.
//! Needs /dev/kvm. Prints a table; removes its files.

mod bench_common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use vmgate_migrate::engine::{
    CancelToken, Link, MoveOptions, Received, StorageOptions, StorageTarget, send_vm,
};

use bench_common::{TcpDialer, Workspace, destination, disk_writer, mib_s, p};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let ws = Workspace::new(args.next(), "vmgate-move-bench", mib);
    let (root, image) = (ws.root.clone(), ws.image.clone());
    let bytes = mib << 20;

    let copy = root.join("copy.raw");
    let t = Instant::now();
    let ok = Command::new("cp").args([p(&image), p(&copy)]).status();
    let _ = Command::new("sync").arg(p(&copy)).status();
    let cp_time = t.elapsed();
    assert!(ok.is_ok_and(|s| s.success()), "cp failed");
    std::fs::remove_file(&copy).expect("remove the copy");

    println!("image: {mib} MiB raw, incompressible");
    println!("{:<36} {:>10} {:>10}", "", "seconds", "MiB/s");
    println!(
        "{:<36} {:>10.2} {:>10.0}",
        "cp + sync",
        cp_time.as_secs_f64(),
        mib_s(bytes, cp_time)
    );

    let (addr, results) = destination(root.clone());
    let mut current = image.clone();
    for (k, channels) in [1u16, 4].into_iter().enumerate() {
        let vm = disk_writer(&format!("bench{k}"), &current);
        std::thread::sleep(Duration::from_millis(200));
        let folder = root.join(format!("move{k}"));
        let opts = MoveOptions {
            channels,
            storage: Some(StorageOptions {
                target: StorageTarget::Folder(folder.clone()),
                keep_source: false,
                users: None,
            }),
            ..MoveOptions::default()
        };
        let control = Link::tcp(TcpStream::connect(addr).expect("connect")).expect("link");
        let t = Instant::now();
        let stats = send_vm(
            &vm,
            control,
            &mut TcpDialer(addr),
            &opts,
            &CancelToken::new(),
            &mut |_| {},
        )
        .expect("move");
        let took = t.elapsed();
        drop(vm);
        let moved = match results.recv_timeout(Duration::from_secs(60)) {
            Ok(Received::Vm(got)) => got.vm,
            other => panic!("the destination did not get the VM: {other:?}"),
        };
        println!(
            "{:<36} {:>10.2} {:>10.0}   ({} rounds, {:.1} ms down, {} MiB of disk sent)",
            format!("move, {channels} channel(s)"),
            took.as_secs_f64(),
            mib_s(bytes, took),
            stats.rounds,
            stats.downtime_ms,
            stats.disk_bytes_sent >> 20
        );
        // The next run moves the VM's disk from where it is now.
        current = moved.config().disks[0].path.clone();
        moved.pause().expect("pause");
        drop(moved);
    }

    // Shared storage: the same VM moved without its storage; the image stays where it is
    // and its lock is handed over at the switchover.
    let vm = disk_writer("bench-shared", &current);
    std::thread::sleep(Duration::from_millis(200));
    let control = Link::tcp(TcpStream::connect(addr).expect("connect")).expect("link");
    let t = Instant::now();
    let stats = send_vm(
        &vm,
        control,
        &mut TcpDialer(addr),
        &MoveOptions::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("move");
    let took = t.elapsed();
    drop(vm);
    match results.recv_timeout(Duration::from_secs(60)) {
        Ok(Received::Vm(got)) => {
            got.vm.pause().expect("pause");
        }
        other => panic!("the destination did not get the VM: {other:?}"),
    }
    println!(
        "{:<36} {:>10.2} {:>10}   ({} rounds, {:.1} ms down, {:.1} MiB on the wire, no disk data)",
        "move, shared storage (lock handoff)",
        took.as_secs_f64(),
        "-",
        stats.rounds,
        stats.downtime_ms,
        stats.bytes_on_wire as f64 / (1 << 20) as f64
    );
}
