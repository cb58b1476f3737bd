//! The guest's disk write latency while its disk moves, next to the same guest idle.
//!
//! ```text
//! cargo run --release -p vmgate-migrate --example write_latency_bench -- [SIZE_MIB] [IDLE_S] [DIR]
//! ```
//!
//! Makes a SIZE_MIB (default 512) raw image of incompressible data in DIR (default: a new
//! temporary directory under /var/tmp, removed at the end; the first 4 MiB, where the guest
//! writes, start out zero) and runs a VM (64 MiB, one vCPU) whose vCPU runs diskstress: 4 KiB
//! writes, one after the other, over the first 1 MiB of the image. Then, one after the other:
//!
//! 1. **idle**: IDLE_S seconds (default 3) of writes with nothing else going on;
//! 2. **shared-nothing move** through the engine (`send_vm` with `MoveOptions::storage`, one
//!    channel, loopback TCP, destination in the same process), split by the engine's progress
//!    reports into: setup; round 1 (memory, the disk announced); round 2 (bulk copy of the
//!    image, while the guest's writes are tracked as dirty blocks); rounds 3 and later (dirty
//!    blocks and pages, until the switchover); "before switchover" is all of these together;
//! 3. on the destination's VM: **idle** again (on the moved file), then a **storage-only
//!    move** on one host (`storage::local::move_storage`) split by its phases (bulk copy;
//!    dirty rounds), then **idle** on the new file.
//!
//! ## What is measured
//! Per phase, from the block device's request statistics ([`Vm::take_block_stats`], see
//! `vm::block_stats`): for each guest write, the time on the host from the vCPU thread's
//! handling of the doorbell's MMIO exit to the status written back into the request (lock
//! wait, reading the guest's 4 KiB, the disk write with its dirty tracking, the status),
//! as p50/p90/p99/max and mean; the host-side writes per second; and `busy`, the share of
//! the phase the vCPU spent in those requests. It does not include the VM exit and re-entry
//! (slow under this machine's kvm_pvm). The guest's own view is the last column: the phase's
//! wall time divided by the writes the guest completed in it (its mailbox sequence number),
//! that is the guest's whole cycle per write: exit, host request, re-entry, and the guest
//! filling the next block. Needs /dev/kvm. Prints a table; removes its files.
//!
//! QEMU is not measured: its benchmark guests (bench/guest) have no disk driver, so a QEMU
//! guest that writes to a disk would need an OS or a new virtio/IDE driver, and QEMU's
//! latency accounting (query-blockstats) starts at its block layer, not at the guest's
//! doorbell, so the figures would not compare as they are.

mod bench_common;

use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use vmgate_migrate::engine::{
    CancelToken, Link, MoveOptions, Phase, Progress, Received, StorageOptions, StorageTarget,
    send_vm,
};
use vmgate_migrate::storage::local::{LocalMoveOptions, MovePhase, MoveProgress, move_storage};
use vmgate_migrate::storage::paths::StorageRoots;
use vmgate_migrate::vm::Vm;
use vmgate_migrate::vm::block_stats::BlockStats;

use bench_common::{TcpDialer, Workspace, destination, disk_writer};

/// One phase's figures.
struct Row {
    label: String,
    stats: BlockStats,
    /// Writes the guest completed in the phase (mailbox sequence numbers).
    guest_writes: u64,
}

/// Cuts a VM's time into labelled phases: each `cut` takes the device's statistics and the
/// guest's counter since the previous cut.
struct Phases<'a> {
    vm: &'a Vm,
    label: Option<String>,
    counter: u64,
    rows: Vec<Row>,
}

impl<'a> Phases<'a> {
    fn new(vm: &'a Vm) -> Phases<'a> {
        let counter = vm.mailbox(0).map(|m| m.counter).unwrap_or(0);
        let _ = vm.take_block_stats(0);
        Phases {
            vm,
            label: None,
            counter,
            rows: Vec::new(),
        }
    }

    /// From now on the time counts for `label`; the time since the previous cut goes to the
    /// previous label (if any). Nothing happens if the label does not change.
    fn enter(&mut self, label: &str) {
        if self.label.as_deref() == Some(label) {
            return;
        }
        self.cut();
        self.label = Some(label.to_string());
    }

    fn cut(&mut self) {
        let stats = self.vm.take_block_stats(0).expect("disk 0");
        let counter = self.vm.mailbox(0).map(|m| m.counter).unwrap_or(0);
        if let Some(label) = self.label.take() {
            self.rows.push(Row {
                label,
                stats,
                guest_writes: counter.saturating_sub(self.counter),
            });
        }
        self.counter = counter;
    }

    fn finish(mut self) -> Vec<Row> {
        self.cut();
        self.rows
    }
}

/// The rows `from` merged into one, labelled `label`.
fn merged(label: &str, from: &[&Row]) -> Row {
    let mut stats = BlockStats::default();
    let mut guest_writes = 0;
    for r in from {
        stats.writes += r.stats.writes;
        stats.bytes_written += r.stats.bytes_written;
        stats.write_hist.merge(&r.stats.write_hist);
        stats.window += r.stats.window;
        guest_writes += r.guest_writes;
    }
    Row {
        label: label.to_string(),
        stats,
        guest_writes,
    }
}

fn us(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e6))
}

fn print_header() {
    println!(
        "{:<38} {:>6} {:>7} {:>8} {:>7} {:>7} {:>8} {:>9} {:>7} {:>5} {:>9}",
        "phase (host: doorbell exit to status)",
        "s",
        "writes",
        "writes/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "mean µs",
        "busy",
        "guest µs/w"
    );
}

fn print_row(r: &Row) {
    let s = &r.stats;
    // Too few writes (a phase spent paused) say nothing about the guest's cycle.
    let guest = if r.guest_writes >= 100 {
        format!(
            "{:.1}",
            s.window.as_secs_f64() * 1e6 / r.guest_writes as f64
        )
    } else {
        "-".into()
    };
    println!(
        "{:<38} {:>6.2} {:>7} {:>8.0} {:>7} {:>7} {:>8} {:>9} {:>7} {:>4.0}% {:>9}",
        r.label,
        s.window.as_secs_f64(),
        s.writes,
        s.writes_per_sec(),
        us(s.percentile(50.0)),
        us(s.percentile(90.0)),
        us(s.percentile(99.0)),
        us(s.write_hist.max()),
        us(s.mean()),
        s.write_busy() * 100.0,
        guest
    );
}

/// Runs the guest for `secs` and returns that phase's figures.
fn idle(vm: &Vm, label: &str, secs: f64) -> Row {
    let mut ph = Phases::new(vm);
    ph.enter(label);
    std::thread::sleep(Duration::from_secs_f64(secs));
    ph.finish().pop().expect("one phase")
}

fn engine_label(p: &Progress) -> &'static str {
    match p.phase {
        Phase::Setup => "move: setup",
        Phase::PreCopy if p.round == 0 => "move: round 1 (memory, disk announced)",
        Phase::PreCopy if p.round == 1 => "move: round 2 (disk bulk copy)",
        Phase::PreCopy => "move: rounds 3+ (dirty blocks)",
        _ => "move: switchover (paused)",
    }
}

fn local_label(p: &MoveProgress) -> &'static str {
    match p.phase {
        MovePhase::Plan | MovePhase::Parents => "local move: plan",
        MovePhase::Bulk => "local move: bulk copy",
        MovePhase::Dirty => "local move: dirty rounds",
        MovePhase::Switch | MovePhase::Release => "local move: switch + release",
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let idle_s: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let ws = Workspace::new(args.next(), "vmgate-latency-bench", mib);
    let (root, image) = (ws.root.clone(), ws.image.clone());

    let vm = disk_writer("latency", &image);
    std::thread::sleep(Duration::from_millis(300));

    let mut rows = vec![idle(&vm, "idle (source)", idle_s)];

    // ── shared-nothing move over loopback ──
    let (addr, results) = destination(root.clone());
    let opts = MoveOptions {
        channels: 1,
        storage: Some(StorageOptions {
            target: StorageTarget::Folder(root.join("moved")),
            keep_source: false,
            users: None,
        }),
        ..MoveOptions::default()
    };
    let control = Link::tcp(TcpStream::connect(addr).expect("connect")).expect("link");
    let mut ph = Phases::new(&vm);
    ph.enter("move: setup");
    let t = Instant::now();
    let stats = send_vm(
        &vm,
        control,
        &mut TcpDialer(addr),
        &opts,
        &CancelToken::new(),
        &mut |pr| ph.enter(engine_label(pr)),
    )
    .expect("move");
    let took = t.elapsed();
    let move_rows = ph.finish();
    drop(vm);
    let before: Vec<&Row> = move_rows
        .iter()
        .filter(|r| !r.label.contains("switchover"))
        .collect();
    rows.push(merged("move: before switchover (all)", &before));
    rows.extend(move_rows);
    let moved = match results.recv_timeout(Duration::from_secs(60)) {
        Ok(Received::Vm(got)) => got.vm,
        other => panic!("the destination did not get the VM: {other:?}"),
    };
    let shared_nothing = format!(
        "shared-nothing move: {:.2} s, {} rounds, {:.1} ms down, {} MiB of disk sent",
        took.as_secs_f64(),
        stats.rounds,
        stats.downtime_ms,
        stats.disk_bytes_sent >> 20
    );

    // ── on the destination: idle, then a storage-only move there ──
    std::thread::sleep(Duration::from_millis(300));
    rows.push(idle(&moved, "idle (destination)", idle_s));
    let roots = StorageRoots::new([&root]).expect("roots");
    let local_dest = root.join("local").join("disk.raw");
    std::fs::create_dir_all(root.join("local")).expect("local folder");
    let mut ph = Phases::new(&moved);
    let cancel = AtomicBool::new(false);
    let report = move_storage(
        &moved,
        0,
        &local_dest,
        &roots,
        &LocalMoveOptions::default(),
        &cancel,
        &mut |pr| ph.enter(local_label(pr)),
    )
    .expect("local move");
    let local_rows = ph.finish();
    let before: Vec<&Row> = local_rows
        .iter()
        .filter(|r| r.label.contains("bulk") || r.label.contains("dirty"))
        .collect();
    rows.push(merged("local move: bulk + dirty (all)", &before));
    rows.extend(local_rows);
    std::thread::sleep(Duration::from_millis(300));
    rows.push(idle(&moved, "idle (after the local move)", idle_s));
    let local = format!(
        "storage-only move: {:.2} s, {} dirty rounds, {:.1} ms paused, {} MiB copied",
        report.total.as_secs_f64(),
        report.rounds,
        report.paused.as_secs_f64() * 1e3,
        report.bytes_copied >> 20
    );
    let errors = moved.block_errors();
    moved.pause().expect("pause");
    drop(moved);

    println!(
        "image: {mib} MiB raw, incompressible; guest: diskstress, 4 KiB writes over 1 MiB; \
         1 vCPU, 64 MiB"
    );
    println!("{shared_nothing}");
    println!("{local}");
    println!(
        "latency: host side, from the vCPU thread handling the doorbell exit to the status \
         written back (no VM exit/entry); guest µs/w: the guest's whole cycle per write"
    );
    print_header();
    for r in &rows {
        print_row(r);
    }
    assert!(errors.is_empty(), "the guest met I/O errors: {errors:?}");
}
