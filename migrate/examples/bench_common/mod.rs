//! What the storage benchmarks share: an image of incompressible data, a destination over
//! loopback TCP, and a VM whose one vCPU writes its disk.

#![allow(dead_code, reason = "each benchmark uses part of it")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmgate_migrate::engine::{Destination, DestinationOptions, Dialer, Link, Received};
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

/// Dials the destination at an address.
pub struct TcpDialer(pub SocketAddr);

impl Dialer for TcpDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Link::tcp(TcpStream::connect(self.0)?)?)
    }
}

/// A path as text (the benchmarks' paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// MiB per second.
pub fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// A raw image of `mib` MiB: a zero first 4 MiB (where the guest writes), then incompressible
/// data; durable before it returns, so that the kernel's writeback of it does not show in
/// what is measured next.
pub fn make_raw(path: &Path, mib: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create image"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for m in 0..mib {
        if m < 4 {
            buf.fill(0);
        } else {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&buf).expect("write image");
    }
    f.into_inner()
        .expect("flush image")
        .sync_all()
        .expect("sync image");
}

/// A destination in this process with `root` as its storage root, serving every connection
/// on its own thread; what each move ended with goes to the returned channel.
pub fn destination(root: PathBuf) -> (SocketAddr, std::sync::mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let dest = Arc::new(Destination::new(DestinationOptions {
        storage_roots: vec![root],
        ..DestinationOptions::default()
    }));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for st in listener.incoming() {
            let Ok(st) = st else { return };
            let d = Arc::clone(&dest);
            let tx = tx.clone();
            std::thread::spawn(move || {
                if let Ok(link) = Link::tcp(st) {
                    let r = d.handle(link);
                    if !matches!(r, Received::Joined | Received::Answered) {
                        let _ = tx.send(r);
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A running VM (64 MiB, one vCPU) whose vCPU writes 4 KiB blocks, one after the other, over
/// the first MiB of the raw image at `image`.
pub fn disk_writer(name: &str, image: &Path) -> Vm {
    let config = VmConfig::from_toml(
        &format!(
            r#"
name = "{name}"
memory_mib = 64
vcpus = 1
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 256
marker_every = 1000
[[disk]]
path = "{}"
format = "raw"
"#,
            p(image)
        ),
        None,
    )
    .expect("config");
    let vm = Vm::create(config, &VmOptions::default()).expect("VM");
    vm.resume().expect("resume");
    vm
}

/// Where a benchmark works: `src/disk.raw` (a fresh [`make_raw`] image of `mib` MiB, read
/// once to warm the page cache) and `root/` (a destination's storage root), in `dir` or a
/// new temporary folder under /var/tmp that goes away with this value.
pub struct Workspace {
    _tmp: Option<tempfile::TempDir>,
    /// The storage root (canonical).
    pub root: PathBuf,
    /// The source image.
    pub image: PathBuf,
}

impl Workspace {
    /// Makes the folders and the image.
    pub fn new(dir: Option<String>, prefix: &str, mib: u64) -> Workspace {
        let (tmp, dir) = match dir {
            Some(d) => (None, PathBuf::from(d)),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir_in("/var/tmp")
                    .expect("temporary directory");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let src = dir.join("src");
        let root = dir.join("root");
        std::fs::create_dir_all(&src).expect("source folder");
        std::fs::create_dir_all(&root).expect("root folder");
        let root = std::fs::canonicalize(root).expect("root");
        let image = src.join("disk.raw");
        make_raw(&image, mib);
        let _ = std::fs::read(&image); // warm the page cache
        Workspace {
            _tmp: tmp,
            root,
            image,
        }
    }
}
