//! Sequential throughput of the disk layer against plain tools on the same image.
//!
//! ```text
//! cargo run --release -p vmgate-migrate --example disk_bench -- [SIZE_MIB] [DIR]
//! ```
//!
//! Makes a SIZE_MIB (default 1024) raw image of incompressible data in DIR (default: a new
//! temporary directory under /var/tmp), converts it to qcow2 with `qemu-img convert`, then
//! times, with a warm page cache and every write made durable (fsync) before the clock stops:
//! reads and writes through [`Disk`] for raw and qcow2, whole-image copies through [`Disk`]
//! (what a storage move does per layer), and `cp` / `qemu-img convert` of the same images.
//! Prints a table; removes its files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmgate_migrate::disk::{self, Disk, DiskFormat, DiskSpec};

/// I/O request size (what a guest doing large sequential I/O or a bulk copier uses).
const CHUNK: usize = 1 << 20;

fn spec(path: &Path, format: DiskFormat) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        format,
    }
}

/// Runs a command, failing loudly.
fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// Fills `path` (a raw image of `size` bytes) with xorshift data through std::fs.
fn make_source(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the source image");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        f.write_all(&buf[..n]).expect("write the source image");
        left -= n as u64;
    }
    f.sync_all().expect("sync the source image");
}

fn read_all(d: &Disk) {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < d.size() {
        let n = usize::try_from((d.size() - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        d.read_at(&mut buf[..n], off).expect("read");
        off += n as u64;
    }
}

fn write_all(d: &Disk) {
    let buf = vec![0x5au8; CHUNK];
    let mut off = 0;
    while off < d.size() {
        let n = usize::try_from((d.size() - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        d.write_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
    d.flush().expect("flush");
}

fn copy(src: &Disk, dst: &Disk) {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < src.size() {
        let n = usize::try_from((src.size() - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        src.read_at(&mut buf[..n], off).expect("read");
        dst.write_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
    dst.flush().expect("flush");
}

/// Like [`copy`], with reading and writing in two threads (as a storage move does: the source
/// reads while the destination writes), four buffers in flight.
fn copy_pipelined(src: &Disk, dst: &Disk) {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    for _ in 0..4 {
        empty_tx.send(vec![0u8; CHUNK]).expect("queue");
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut off = 0;
            while off < src.size() {
                let n = usize::try_from((src.size() - off).min(CHUNK as u64)).unwrap_or(CHUNK);
                let mut buf = empty_rx.recv().expect("buffer");
                buf.resize(n, 0);
                src.read_at(&mut buf, off).expect("read");
                full_tx.send((off, buf)).expect("send");
                off += n as u64;
            }
        });
        for (off, buf) in full_rx {
            dst.write_at(&buf, off).expect("write");
            let _ = empty_tx.send(buf);
        }
    });
    dst.flush().expect("flush");
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

struct Row {
    what: String,
    secs: f64,
    reference: Option<(String, f64)>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let size = size_mib << 20;
    let tmp;
    let dir: PathBuf = match args.next() {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("disk-bench")
                .tempdir_in("/var/tmp")
                .expect("tempdir");
            tmp.path().to_path_buf()
        }
    };
    let f = |name: &str| dir.join(name);
    let rm = |name: &str| {
        let _ = std::fs::remove_file(dir.join(name));
    };
    let mut rows: Vec<Row> = Vec::new();

    eprintln!(
        "preparing {size_mib} MiB of incompressible data in {}",
        dir.display()
    );
    make_source(&f("src.raw"), size);
    let t_convert = time(|| {
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                p(&f("src.raw")),
                p(&f("src.qcow2")),
            ],
        );
        run("sync", &[p(&f("src.qcow2"))]);
    });

    // Warm the page cache for both sources.
    read_all(&Disk::open(&spec(&f("src.raw"), DiskFormat::Raw), false).expect("open"));
    read_all(&Disk::open(&spec(&f("src.qcow2"), DiskFormat::Qcow2), false).expect("open"));

    // Reads.
    let cat = time(|| {
        run(
            "sh",
            &["-c", &format!("cat {} > /dev/null", p(&f("src.raw")))],
        )
    })
    .as_secs_f64();
    let d = Disk::open(&spec(&f("src.raw"), DiskFormat::Raw), false).expect("open");
    rows.push(Row {
        what: "read raw (Disk)".into(),
        secs: time(|| read_all(&d)).as_secs_f64(),
        reference: Some(("cat > /dev/null".into(), cat)),
    });
    drop(d);
    let d = Disk::open(&spec(&f("src.qcow2"), DiskFormat::Qcow2), false).expect("open");
    rows.push(Row {
        what: "read qcow2 (Disk)".into(),
        secs: time(|| read_all(&d)).as_secs_f64(),
        reference: Some(("cat > /dev/null".into(), cat)),
    });
    drop(d);

    // Writes into new images, made durable.
    let dd = time(|| {
        run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", p(&f("dd.raw"))),
                "bs=1M",
                &format!("count={size_mib}"),
                "conv=fsync",
                "status=none",
            ],
        );
    })
    .as_secs_f64();
    rm("dd.raw");
    disk::create_raw(&f("w.raw"), size).expect("create");
    let d = Disk::open(&spec(&f("w.raw"), DiskFormat::Raw), true).expect("open");
    rows.push(Row {
        what: "write new raw (Disk)".into(),
        secs: time(|| write_all(&d)).as_secs_f64(),
        reference: Some(("dd bs=1M conv=fsync".into(), dd)),
    });
    drop(d);
    rm("w.raw");
    disk::create_qcow2(&f("w.qcow2"), Some(size), None).expect("create");
    let d = Disk::open(&spec(&f("w.qcow2"), DiskFormat::Qcow2), true).expect("open");
    rows.push(Row {
        what: "write new qcow2 (Disk)".into(),
        secs: time(|| write_all(&d)).as_secs_f64(),
        reference: Some(("dd bs=1M conv=fsync".into(), dd)),
    });
    drop(d);
    rm("w.qcow2");
    // Overwriting allocated clusters (the steady state of a guest's disk).
    disk::create_qcow2(&f("o.qcow2"), Some(size), None).expect("create");
    let d = Disk::open(&spec(&f("o.qcow2"), DiskFormat::Qcow2), true).expect("open");
    write_all(&d);
    rows.push(Row {
        what: "overwrite qcow2 (Disk)".into(),
        secs: time(|| write_all(&d)).as_secs_f64(),
        reference: Some(("dd bs=1M conv=fsync".into(), dd)),
    });
    drop(d);
    rm("o.qcow2");

    // Whole-image copies.
    let cp = time(|| {
        run("cp", &["--sparse=never", p(&f("src.raw")), p(&f("cp.raw"))]);
        run("sync", &[p(&f("cp.raw"))]);
    })
    .as_secs_f64();
    rm("cp.raw");
    let src = Disk::open(&spec(&f("src.raw"), DiskFormat::Raw), false).expect("open");
    disk::create_raw(&f("c.raw"), size).expect("create");
    let dst = Disk::open(&spec(&f("c.raw"), DiskFormat::Raw), true).expect("open");
    rows.push(Row {
        what: "copy raw -> raw (Disk)".into(),
        secs: time(|| copy(&src, &dst)).as_secs_f64(),
        reference: Some(("cp + sync".into(), cp)),
    });
    drop((src, dst));
    rm("c.raw");

    let conv = time(|| {
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                p(&f("src.qcow2")),
                p(&f("conv.qcow2")),
            ],
        );
        run("sync", &[p(&f("conv.qcow2"))]);
    })
    .as_secs_f64();
    rm("conv.qcow2");
    let src = Disk::open(&spec(&f("src.qcow2"), DiskFormat::Qcow2), false).expect("open");
    disk::create_qcow2(&f("c.qcow2"), Some(size), None).expect("create");
    let dst = Disk::open(&spec(&f("c.qcow2"), DiskFormat::Qcow2), true).expect("open");
    rows.push(Row {
        what: "copy qcow2 -> qcow2 (Disk)".into(),
        secs: time(|| copy(&src, &dst)).as_secs_f64(),
        reference: Some(("qemu-img convert + sync".into(), conv)),
    });
    drop(dst);
    rm("c.qcow2");
    disk::create_qcow2(&f("c.qcow2"), Some(size), None).expect("create");
    let dst = Disk::open(&spec(&f("c.qcow2"), DiskFormat::Qcow2), true).expect("open");
    rows.push(Row {
        what: "copy qcow2 -> qcow2 (2 threads)".into(),
        secs: time(|| copy_pipelined(&src, &dst)).as_secs_f64(),
        reference: Some(("qemu-img convert + sync".into(), conv)),
    });
    drop((src, dst));
    rm("c.qcow2");
    rows.push(Row {
        what: "qemu-img convert raw -> qcow2".into(),
        secs: t_convert.as_secs_f64(),
        reference: None,
    });

    // Identifying a layer, and mapping one.
    let sha = time(|| {
        disk::file_checksum(&f("src.raw")).expect("checksum");
    })
    .as_secs_f64();
    let sha_ref = time(|| {
        run(
            "sh",
            &["-c", &format!("sha256sum {} > /dev/null", p(&f("src.raw")))],
        )
    })
    .as_secs_f64();
    rows.push(Row {
        what: "file_checksum (SHA-256)".into(),
        secs: sha,
        reference: Some(("sha256sum".into(), sha_ref)),
    });
    let d = Disk::open(&spec(&f("src.qcow2"), DiskFormat::Qcow2), false).expect("open");
    let mut extents = 0;
    let map = time(|| extents = d.allocated().expect("map").len()).as_secs_f64();
    let map_ref = time(|| {
        run(
            "sh",
            &[
                "-c",
                &format!(
                    "qemu-img map -U --output=json {} > /dev/null",
                    p(&f("src.qcow2"))
                ),
            ],
        )
    })
    .as_secs_f64();
    rows.push(Row {
        what: format!("allocated() qcow2 ({extents} extents)"),
        secs: map,
        reference: Some(("qemu-img map".into(), map_ref)),
    });
    drop(d);
    rm("src.raw");
    rm("src.qcow2");

    let mib = size as f64 / (1024.0 * 1024.0);
    println!(
        "{size_mib} MiB image, {} KiB requests, warm page cache, writes fsynced",
        CHUNK / 1024
    );
    println!(
        "{:<34} {:>9} {:>10}   {:<26} {:>9} {:>10} {:>7}",
        "operation", "seconds", "MiB/s", "reference", "seconds", "MiB/s", "ratio"
    );
    for r in rows {
        let rate = mib / r.secs;
        match r.reference {
            Some((name, secs)) => println!(
                "{:<34} {:>9.3} {:>10.0}   {:<26} {:>9.3} {:>10.0} {:>6.0}%",
                r.what,
                r.secs,
                rate,
                name,
                secs,
                mib / secs,
                100.0 * secs / r.secs
            ),
            None => println!("{:<34} {:>9.3} {:>10.0}", r.what, r.secs, rate),
        }
    }
}
