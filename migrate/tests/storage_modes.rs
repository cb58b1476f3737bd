//! Files and folders a move creates are owner-only (0600 / 0700) whatever the process's umask:
//! a storage-only move and a shared-nothing move, each under umask 022 and 000. The umask is
//! the process's, so this is a test binary of its own with a single test.

mod vm_common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use vm_common::{canonical_dir, qcow2_on, raw_image, require_kvm, s, wait_counter};
use vmgate_migrate::engine::{
    CancelToken, Destination, DestinationOptions, Dialer, Link, MoveOptions, Received,
    StorageOptions, StorageTarget, send_vm,
};
use vmgate_migrate::storage::local::{LocalMoveOptions, move_storage};
use vmgate_migrate::storage::paths::StorageRoots;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

struct TcpDialer(std::net::SocketAddr);

impl Dialer for TcpDialer {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Link::tcp(TcpStream::connect(self.0)?)?)
    }
}

fn vm_on(dir: &Path, name: &str, disk: &Path) -> Vm {
    require_kvm();
    let text = format!(
        "name = \"{name}\"\nmemory_mib = 32\nvcpus = 1\n[[vcpu]]\nprogram = \"diskstress\"\ndisk = 0\nblock_size = 4096\nblocks = 64\n[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n",
        s(disk)
    );
    let vm = Vm::create(
        VmConfig::from_toml(&text, Some(dir)).unwrap(),
        &VmOptions::default(),
    )
    .unwrap();
    vm.resume().unwrap();
    wait_counter(&vm, 0, 20);
    vm
}

/// Every file and folder under `dir`, with its permission bits.
fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push((
            p.clone(),
            e.metadata().unwrap().permissions().mode() & 0o7777,
        ));
        if p.is_dir() {
            out.extend(modes(&p));
        }
    }
    out
}

fn assert_owner_only(dir: &Path, what: &str) {
    let own = std::fs::metadata(dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(own, 0o700, "{what}: {} is {own:o}", dir.display());
    let found = modes(dir);
    assert!(found.len() >= 4, "{what}: {found:?}");
    for (p, mode) in found {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{what}: {} is {mode:o}", p.display());
    }
}

#[test]
fn created_files_and_folders_are_owner_only_under_any_umask() {
    let dir = tempfile::tempdir().unwrap();
    let src = canonical_dir(dir.path(), "src");
    let root = canonical_dir(dir.path(), "root");
    // A chain: base.raw <- top.qcow2.
    let base = src.join("base.raw");
    raw_image(&base, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::sync::Arc::new(Destination::new(DestinationOptions {
        storage_roots: vec![root.clone()],
        ..DestinationOptions::default()
    }));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (dest, tx) = (std::sync::Arc::clone(&dest), tx.clone());
            std::thread::spawn(move || {
                if let Ok(link) = Link::tcp(conn) {
                    let r = dest.handle(link);
                    if matches!(r, Received::Vm(_) | Received::Discarded(_)) {
                        let _ = tx.send(r);
                    }
                }
            });
        }
    });
    for umask in [0o022, 0o000] {
        // SAFETY: umask only sets the process's file creation mask; this binary runs this one
        // test, so nothing else creates files meanwhile with an unexpected mask.
        let old = unsafe { libc::umask(umask) };
        // A storage-only move into folders that do not exist yet.
        let top = src.join(format!("local{umask:o}.qcow2"));
        qcow2_on(&top, "base.raw", "raw");
        let vm = vm_on(dir.path(), "local", &top);
        let local = root.join(format!("local{umask:o}/a/b"));
        move_storage(
            &vm,
            0,
            &local.join("top.qcow2"),
            &StorageRoots::new([&root]).unwrap(),
            &LocalMoveOptions {
                keep_source: true,
                ..LocalMoveOptions::default()
            },
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        vm.pause().unwrap();
        drop(vm);
        assert_owner_only(&root.join(format!("local{umask:o}")), "storage-only move");

        // A shared-nothing move, likewise.
        let top = src.join(format!("moved{umask:o}.qcow2"));
        qcow2_on(&top, "base.raw", "raw");
        let vm = vm_on(dir.path(), "moved", &top);
        let folder = root.join(format!("moved{umask:o}/x/y"));
        let control = Link::tcp(TcpStream::connect(addr).unwrap()).unwrap();
        send_vm(
            &vm,
            control,
            &mut TcpDialer(addr),
            &MoveOptions {
                storage: Some(StorageOptions {
                    target: StorageTarget::Folder(folder),
                    keep_source: true,
                    users: None,
                }),
                ..MoveOptions::default()
            },
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap();
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Received::Vm(got) => {
                got.vm.pause().unwrap();
                drop(got);
            }
            other => panic!("the destination did not get the VM: {other:?}"),
        }
        drop(vm);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert_owner_only(&root.join(format!("moved{umask:o}")), "shared-nothing move");
    }
}
