//! Helpers shared by the VM integration tests (real /dev/kvm, real disk images).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a tool and returns its stdout; panics with its stderr if it fails.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Fails with a clear message if /dev/kvm is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (real KVM); it does not exist on this machine"
    );
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test file");
    p
}

/// Number of `byte` in the file (0 if missing).
pub fn count_byte(path: &Path, byte: u8) -> usize {
    std::fs::read(path)
        .unwrap_or_default()
        .iter()
        .filter(|b| **b == byte)
        .count()
}

/// The `vmgate-vm` probe (vmgate-testkit's binary): next to this test's executable, built by
/// `cargo test --workspace` (tests/run) or `cargo build -p vmgate-testkit`.
pub fn vmgate_vm() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join("vmgate-vm");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p vmgate-testkit, or run the tests through \
         tests/run)",
        path.display()
    );
    path
}

/// Output of one `vmgate-vm` run.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Parsed JSON report (Null if stdout was not JSON).
    pub json: serde_json::Value,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr.
    pub stderr: String,
}

/// Runs `vmgate-vm ARGS`.
pub fn run_cli(args: &[&str]) -> Run {
    let out = Command::new(vmgate_vm())
        .args(args)
        .output()
        .expect("run vmgate-vm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Run {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The mailbox counter of vCPU `i` in a report's `key` ("mailbox" or "mailbox_before").
pub fn counter(json: &serde_json::Value, key: &str, i: usize) -> u64 {
    json[key][i]["counter"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key}[{i}] in {json}"))
}

/// The checks of a report, as (check name, ok, summary).
pub fn checks(json: &serde_json::Value) -> Vec<(String, bool, String)> {
    json["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks in {json}"))
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap_or("").to_string(),
                c["ok"].as_bool().unwrap_or(false),
                c["summary"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `qemu-img create -f qcow2 PATH` on `backing` (as written into the image) of `backing_format`.
pub fn qcow2_on(path: &Path, backing: &str, backing_format: &str) {
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            backing_format,
            s(path),
        ],
    );
}

/// A chain `top` → mid.qcow2 → base.raw that a storage move rebuilt in `folder`: `qemu-img
/// check` passes, `--backing-chain` names the three files there, the absolute reference to
/// mid.qcow2 was rewritten and the relative one to base.raw kept.
pub fn assert_moved_chain(folder: &Path, t: &Path) {
    tool("qemu-img", &["check", "-q", s(t)]);
    let info = tool(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", s(t)],
    );
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    let files: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["filename"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            s(t),
            s(&folder.join("mid.qcow2")),
            s(&folder.join("base.raw"))
        ],
        "{info}"
    );
    assert_eq!(
        chain[0]["full-backing-filename"].as_str(),
        Some(s(&folder.join("mid.qcow2")))
    );
    assert_eq!(chain[1]["backing-filename"].as_str(), Some("base.raw"));
}

/// Files (recursively) under `dir`; none when it does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A raw image of `mib` MiB: zeroes for the diskstress region (first MiB), then data.
pub fn raw_image(path: &Path, mib: usize) {
    let mut data = vec![0u8; mib << 20];
    for (i, b) in data.iter_mut().enumerate().skip(1 << 20) {
        *b = u8::try_from((i / 4096) % 251).unwrap() ^ 0x5A;
    }
    std::fs::write(path, data).unwrap();
}

/// `dir/name`, created, as a canonical path (storage roots are compared canonically).
pub fn canonical_dir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    std::fs::canonicalize(p).unwrap()
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "8M") at `at`.
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        tool(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(at)],
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Waits until vCPU `vcpu`'s mailbox counter (diskstress: blocks written) has advanced by
/// `n` from now; returns the counter.
pub fn wait_counter(vm: &vmgate_migrate::vm::Vm, vcpu: u32, n: u64) -> u64 {
    let from = vm.mailbox(vcpu).unwrap().counter;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let c = vm.mailbox(vcpu).unwrap().counter;
        if c >= from + n {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vCPU {vcpu} did not advance by {n} within 60 s (counter {c}, errors {:?})",
            vm.block_errors()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Pauses, runs every checker (on the disks the VM uses now), asserts there are some and all
/// pass, resumes; returns the reports.
pub fn checks_pass(vm: &vmgate_migrate::vm::Vm) -> Vec<vmgate_migrate::vm::check::CheckReport> {
    vm.pause().unwrap();
    assert!(vm.block_errors().is_empty(), "{:?}", vm.block_errors());
    let checks = vmgate_migrate::vm::check::check_vm(vm).unwrap();
    assert!(!checks.is_empty());
    assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
    vm.resume().unwrap();
    checks
}
