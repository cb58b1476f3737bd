//! Storage move throughput next to plain copies of the same image, and the guest's write rate
//! during mirroring versus idle.
//!
//! ```text
//! cargo run --release -p vmgate-migrate --example storage_bench -- [SIZE_MIB] [DIR]
//! ```
//!
//! Makes a SIZE_MIB (default 1024) image of incompressible data in DIR (default: a new
//! temporary directory under /var/tmp; the diskstress region, its first 4 MiB, starts out
//! zero), raw and qcow2. For each format, with a warm page cache and every copy made durable
//! before the clock stops: `cp` + `sync`, `qemu-img convert`, and a storage move of a running
//! VM whose vCPU runs diskstress on the image (bulk copy, dirty rounds, pause, switch,
//! deletion of the old file; `STORAGE_BENCH_CHUNK_BLOCKS` sets the mirror's read size in
//! 64 KiB blocks, default 16). The guest's write rate (diskstress requests per second, each a
//! 4 KiB write the VMM performs synchronously) is sampled for one second with the VM idle
//! (no move) and over the whole move. Needs /dev/kvm. Prints a table; removes its files.

mod bench_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use vmgate_migrate::storage::local::{LocalMoveOptions, move_storage};
use vmgate_migrate::storage::paths::StorageRoots;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

use bench_common::{make_raw, mib_s, p};

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn vm_on(dir: &Path, disk: &Path, format: &str, writer: bool) -> Vm {
    let program = if writer {
        "program = \"diskstress\"\ndisk = 0\nblock_size = 4096\nblocks = 1024\nmarker_every = 100000"
    } else {
        "program = \"idle\""
    };
    let text = format!(
        "name = \"bench\"\nmemory_mib = 32\nvcpus = 1\n[[vcpu]]\n{program}\n[[disk]]\npath = \"{}\"\nformat = \"{format}\"\n",
        p(disk)
    );
    let config = VmConfig::from_toml(&text, Some(dir)).expect("config");
    Vm::create(config, &VmOptions::default()).expect("VM")
}

fn counter(vm: &Vm) -> u64 {
    vm.mailbox(0).map(|m| m.counter).unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let tmp;
    let dir: PathBuf = match args.next() {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("storage-bench")
                .tempdir_in("/var/tmp")
                .expect("temp dir");
            tmp.path().to_path_buf()
        }
    };
    let src_dir = dir.join("src");
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&src_dir).expect("mkdir");
    std::fs::create_dir_all(&dst_dir).expect("mkdir");
    let roots = StorageRoots::new([&dst_dir]).expect("roots");
    let dst_dir = roots.roots()[0].clone();
    let bytes = mib << 20;
    // STORAGE_BENCH_CHUNK_BLOCKS: the mirror's read size in 64 KiB blocks (default 16).
    let mut options = LocalMoveOptions::default();
    if let Some(n) = std::env::var("STORAGE_BENCH_CHUNK_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.mirror.chunk_blocks = n;
    }

    println!(
        "image: {mib} MiB incompressible (first 4 MiB zero), page cache warm, copies made durable"
    );
    println!(
        "{:<7} {:>8} {:>8} {:>11} {:>8} {:>11} {:>8} {:>6} {:>9} {:>9} {:>9}",
        "format",
        "cp MiB/s",
        "convert",
        "move(halt)",
        "vs cp",
        "move(write)",
        "vs cp",
        "rounds",
        "paused ms",
        "idle w/s",
        "moving w/s"
    );
    for format in ["raw", "qcow2"] {
        let master = src_dir.join("master.raw");
        if !master.exists() {
            make_raw(&master, mib);
        }
        let src = src_dir.join(format!("disk.{format}"));
        if format == "raw" {
            run("cp", &[p(&master), p(&src)]);
        } else {
            run(
                "qemu-img",
                &[
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    p(&master),
                    p(&src),
                ],
            );
        }
        // Warm the cache.
        let _ = std::fs::read(&src);

        let cp_dst = dst_dir.join("cp.img");
        let cp = timed(|| {
            run("cp", &[p(&src), p(&cp_dst)]);
            run("sync", &["-f", p(&cp_dst)]);
        });
        std::fs::remove_file(&cp_dst).ok();
        let conv_dst = dst_dir.join("convert.img");
        let convert = timed(|| {
            run(
                "qemu-img",
                &[
                    "convert",
                    "-q",
                    "-f",
                    format,
                    "-O",
                    format,
                    p(&src),
                    p(&conv_dst),
                ],
            );
            run("sync", &["-f", p(&conv_dst)]);
        });
        std::fs::remove_file(&conv_dst).ok();

        // The copier alone: the same move with the guest halted.
        let vm = vm_on(&dir, &src, format, false);
        vm.resume().expect("resume");
        let dest = dst_dir.join(format!("moved.{format}"));
        let quiet = move_storage(
            &vm,
            0,
            &dest,
            &roots,
            &LocalMoveOptions {
                keep_source: true,
                ..options.clone()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("move");
        vm.pause().expect("pause");
        drop(vm);
        std::fs::remove_file(&dest).ok();

        let vm = vm_on(&dir, &src, format, true);
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(300));
        let c0 = counter(&vm);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let idle_rate = (counter(&vm) - c0) as f64 / t0.elapsed().as_secs_f64();

        let c1 = counter(&vm);
        let t1 = Instant::now();
        let report = move_storage(
            &vm,
            0,
            &dest,
            &roots,
            &options,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("move");
        let moving_rate = (counter(&vm) - c1) as f64 / t1.elapsed().as_secs_f64();
        vm.pause().expect("pause");
        drop(vm);
        std::fs::remove_file(&dest).ok();

        println!(
            "{:<7} {:>8.0} {:>8.0} {:>11.0} {:>7.0}% {:>11.0} {:>7.0}% {:>6} {:>9.1} {:>9.0} {:>9.0}",
            format,
            mib_s(bytes, cp),
            mib_s(bytes, convert),
            mib_s(bytes, quiet.total),
            100.0 * cp.as_secs_f64() / quiet.total.as_secs_f64(),
            mib_s(bytes, report.total),
            100.0 * cp.as_secs_f64() / report.total.as_secs_f64(),
            report.rounds,
            report.paused.as_secs_f64() * 1000.0,
            idle_rate,
            moving_rate,
        );
    }
    std::fs::remove_file(src_dir.join("master.raw")).ok();
}
