//! Micro-VM benchmark: VM start time, snapshot and restore time per GiB of guest memory,
//! dirty-log harvesting, and the guest's dirtying rate.
//!
//! Run: `cargo run --release -p vmgate-migrate --example vm_bench [-- --gib N] [--dir DIR]`
//!
//! Snapshots go to a temporary folder (default: under /tmp) without fsync, i.e. into the
//! page cache; the VMM-side figures (copying, checksums, file I/O) carry over to hardware,
//! guest-speed figures do not: see the note printed at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmgate_migrate::vm::programs::{fill_seed, fill_word};
use vmgate_migrate::vm::snapshot::{SnapshotImage, SnapshotOptions, snapshot};
use vmgate_migrate::vm::{PAGE_BYTES, Vm, VmConfig, VmOptions};

fn cfg(text: &str) -> VmConfig {
    VmConfig::from_toml(text, None).expect("bench config")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row(String, String);

fn row(rows: &mut Vec<Row>, what: &str, value: String) {
    eprintln!("  {what}: {value}");
    rows.push(Row(what.to_string(), value));
}

fn wait_counter(vm: &Vm, vcpu: u32, at_least: u64) {
    let t = Instant::now();
    while vm.mailbox(vcpu).expect("mailbox").counter < at_least {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let mut gib: u64 = 1;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gib" => gib = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--dir" => dir = args.next().map(PathBuf::from),
            _ => {}
        }
    }
    let tmp = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let mib = gib * 1024;
    let gib_f = gib as f64;
    let mut rows = Vec::new();
    eprintln!(
        "vmgate micro-VM benchmark ({gib} GiB guests, files in {})",
        tmp.path().display()
    );

    // 1. VM start.
    let idle = cfg(&format!("name = \"idle\"\nmemory_mib = {mib}\nvcpus = 2\n"));
    let mut starts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let vm = Vm::create(idle.clone(), &VmOptions::default()).expect("create");
        vm.resume().expect("resume");
        starts.push(ms(t.elapsed()));
        vm.pause().expect("pause");
    }
    starts.sort_by(f64::total_cmp);
    row(
        &mut rows,
        &format!("VM start, {gib} GiB, 2 vCPUs (create + resume, median of 5)"),
        format!("{:.1} ms", starts[2]),
    );
    let console = tmp.path().join("first.log");
    let first = cfg(
        "name = \"first\"\nmemory_mib = 64\nvcpus = 1\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 4\nsize_mib = 1\nmarker_every = 1\n",
    );
    let t = Instant::now();
    let vm = Vm::create(
        first,
        &VmOptions {
            console_log: Some(console.clone()),
            ..VmOptions::default()
        },
    )
    .expect("create");
    vm.resume().expect("resume");
    while vm.serial_bytes() == 0 {
        std::thread::yield_now();
    }
    row(
        &mut rows,
        "VM start to first serial marker (64 MiB, memstress over 1 MiB)",
        format!("{:.1} ms", ms(t.elapsed())),
    );
    drop(vm);

    // 2. Snapshot and restore of an untouched guest.
    let vm = Vm::create(idle.clone(), &VmOptions::default()).expect("create");
    let empty_snap = tmp.path().join("empty.snap");
    let s = snapshot(&vm, &empty_snap, &SnapshotOptions::default()).expect("snapshot");
    row(
        &mut rows,
        "paused snapshot, untouched memory",
        format!(
            "{:.1} ms/GiB ({} pages stored)",
            s.total_millis / gib_f,
            s.present
        ),
    );
    drop(vm);
    let img = SnapshotImage::open(&empty_snap).expect("open");
    let (vm, r) = img.restore(&VmOptions::default()).expect("restore");
    row(
        &mut rows,
        "restore, untouched memory",
        format!(
            "{:.1} ms/GiB (VM build {:.1} ms)",
            r.total_millis / gib_f,
            r.create_millis
        ),
    );
    drop(vm);

    // 3. Snapshot and restore of a guest whose every page holds incompressible data (filled
    //    by the VMM: a guest would need minutes to touch 1 GiB under kvm_pvm).
    let vm = Vm::create(idle.clone(), &VmOptions::default()).expect("create");
    let mut page = vec![0u8; PAGE_BYTES];
    let t = Instant::now();
    for i in 0..vm.layout().total_pages() {
        let seed = fill_seed(i, 1);
        for (w, c) in page.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&fill_word(seed, w as u64).to_le_bytes());
        }
        vm.write_page(i, &page).expect("fill");
    }
    eprintln!("  (filled {gib} GiB in {:.0} ms)", ms(t.elapsed()));
    let t = Instant::now();
    let dirty = vm.harvest_dirty().expect("harvest");
    row(
        &mut rows,
        "dirty-bitmap harvest, every page written by the VMM (own-write bitmap)",
        format!(
            "{:.2} ms/GiB ({} pages)",
            ms(t.elapsed()) / gib_f,
            dirty.count()
        ),
    );
    let t = Instant::now();
    let clean = vm.harvest_dirty().expect("harvest");
    row(
        &mut rows,
        "dirty-bitmap harvest, nothing dirty",
        format!(
            "{:.1} µs/GiB ({} pages)",
            ms(t.elapsed()) * 1000.0 / gib_f,
            clean.count()
        ),
    );
    let full_snap = tmp.path().join("full.snap");
    let s = snapshot(&vm, &full_snap, &SnapshotOptions::default()).expect("snapshot");
    row(
        &mut rows,
        "paused snapshot, full incompressible memory",
        format!(
            "{:.1} ms/GiB ({:.2} GiB/s)",
            s.total_millis / gib_f,
            gib_f / (s.total_millis / 1000.0)
        ),
    );
    let t = Instant::now();
    let s2 = snapshot(
        &vm,
        &full_snap,
        &SnapshotOptions {
            sync: true,
            ..Default::default()
        },
    )
    .expect("snapshot");
    row(
        &mut rows,
        "paused snapshot, full memory, with fsync",
        format!("{:.1} ms/GiB", s2.total_millis.max(ms(t.elapsed())) / gib_f),
    );
    drop(vm);
    let img = SnapshotImage::open(&full_snap).expect("open");
    let (vm, r) = img.restore(&VmOptions::default()).expect("restore");
    row(
        &mut rows,
        "restore, full memory (page checksums verified)",
        format!(
            "{:.1} ms/GiB (memory {:.1} ms/GiB, VM build {:.1} ms)",
            r.total_millis / gib_f,
            r.memory_millis / gib_f,
            r.create_millis
        ),
    );
    drop(vm);
    drop(img);

    // 4. The guest's dirtying rate.
    let range = 256u64.min(mib / 2);
    for (label, full) in [
        ("memstress (1 byte per page)", false),
        ("memstress full-content (every byte)", true),
    ] {
        let c = cfg(&format!(
            "name = \"d\"\nmemory_mib = {}\nvcpus = 1\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 4\nsize_mib = {range}\nmarker_every = 1000000\nfull_content = {full}\n",
            range + 8
        ));
        let vm = Vm::create(c, &VmOptions::default()).expect("create");
        let pages_per_pass = range * 256;
        let t = Instant::now();
        vm.resume().expect("resume");
        wait_counter(&vm, 0, 1);
        let first = t.elapsed();
        row(
            &mut rows,
            &format!("{label}: first pass over {range} MiB (fresh memory)"),
            format!("{:.1} µs/page", ms(first) * 1000.0 / pages_per_pass as f64),
        );
        // Untracked: nobody harvests, so after one write fault per page the guest runs freely.
        let a = vm.mailbox(0).expect("mb").counter;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let passes = vm.mailbox(0).expect("mb").counter - a;
        let secs = t.elapsed().as_secs_f64();
        let pps = passes as f64 * pages_per_pass as f64 / secs;
        let bytes_per_page = if full { 4096.0 } else { 1.0 };
        row(
            &mut rows,
            &format!("{label}: dirtying rate, no harvesting"),
            format!(
                "{:.0} pages/s ({:.0} MiB/s of pages dirtied, {:.0} MiB/s written)",
                pps,
                pps * 4096.0 / 1048576.0,
                pps * bytes_per_page / 1048576.0
            ),
        );
        // Tracked: harvest every 100 ms, as a migration round would; every first write to a
        // page after a harvest faults.
        vm.harvest_dirty().expect("harvest");
        let a = vm.mailbox(0).expect("mb").counter;
        let t = Instant::now();
        let mut dirtied = 0u64;
        let mut harvest = Duration::ZERO;
        let mut harvests = 0u32;
        while t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(100));
            let h = Instant::now();
            dirtied += vm.harvest_dirty().expect("harvest").count();
            harvest += h.elapsed();
            harvests += 1;
        }
        let passes = vm.mailbox(0).expect("mb").counter - a;
        let secs = t.elapsed().as_secs_f64();
        row(
            &mut rows,
            &format!("{label}: dirtying rate, harvest every 100 ms"),
            format!(
                "{:.0} pages/s written ({:.0} distinct dirty pages/s, {:.0} MiB/s)",
                passes as f64 * pages_per_pass as f64 / secs,
                dirtied as f64 / secs,
                dirtied as f64 * 4096.0 / secs / 1048576.0
            ),
        );
        row(
            &mut rows,
            &format!(
                "{label}: KVM dirty-log harvest of a {} MiB guest",
                range + 8
            ),
            format!(
                "{:.2} ms per harvest ({:.0} dirty pages each)",
                ms(harvest) / f64::from(harvests),
                dirtied as f64 / f64::from(harvests)
            ),
        );
        if full {
            // Live snapshot of a guest that dirties its whole range.
            let live = tmp.path().join("live.snap");
            let s = snapshot(
                &vm,
                &live,
                &SnapshotOptions {
                    live: true,
                    rounds: 2,
                    ..Default::default()
                },
            )
            .expect("live snapshot");
            let rounds: Vec<String> = s
                .rounds
                .iter()
                .map(|r| format!("{}p/{:.0}ms", r.pages, r.millis))
                .collect();
            row(
                &mut rows,
                &format!(
                    "live snapshot, {} MiB guest dirtying {range} MiB",
                    range + 8
                ),
                format!(
                    "total {:.0} ms, paused {:.0} ms, rounds {}",
                    s.total_millis,
                    s.paused_millis,
                    rounds.join(" ")
                ),
            );
        } else {
            vm.pause().expect("pause");
        }
        let t = Instant::now();
        vm.resume().expect("resume");
        vm.pause().expect("pause");
        row(
            &mut rows,
            &format!("{label}: resume + pause round trip"),
            format!("{:.2} ms", ms(t.elapsed())),
        );
    }

    println!();
    println!("| measurement | result |");
    println!("|---|---|");
    for Row(a, b) in &rows {
        println!("| {a} | {b} |");
    }
    println!();
    println!(
        "Note: /dev/kvm on this machine is kvm_pvm, a page-table-based software virtualizer, not \
         hardware virtualization. Guest code in ring 3 runs natively, but every guest page fault \
         (first touch of a page, and every first write after a dirty-log harvest) goes through \
         the software MMU and costs tens of microseconds, so the guest's dirtying rate and first- \
         pass figures do not carry over to hardware. VMM-side figures (snapshot/restore copying, \
         checksums, harvesting) do. Snapshots were written to the page cache of {}.",
        tmp.path().display()
    );
}
