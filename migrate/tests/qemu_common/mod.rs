//! Helpers of the QEMU backend's integration tests: the Linux test guest, a host with its own
//! storage root and runtime folder, a virtual switch in a network namespace, and clean-up of
//! every QEMU a test started.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmgate_migrate::qemu::net::in_netns;
use vmgate_migrate::qemu::{
    QemuHost, QemuHostConfig, QemuVm, QemuVmDefinition, ScopeMode, ValidatedVm, VirtualSwitch,
};

/// The guest's address on the test switch, and the switch's own.
pub const GUEST_IP: &str = "10.77.0.2";
/// The bridge's address (the client side).
pub const BRIDGE_IP: &str = "10.77.0.1";
/// The guest's echo port.
pub const ECHO_PORT: u16 = 7;
/// How long a guest may take to boot here (TCG on a busy 2-core machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

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

/// The folder with the test guest's `vmlinuz` and `initrd.img`: `VMGATE_GUEST_DIR`, or what
/// `tests/guest/build` prints (instant when it is cached; tests/run builds it first).
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("VMGATE_GUEST_DIR") {
            return PathBuf::from(d);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/build");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "tests/guest/build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A network namespace with a bridge `br0` (address [`BRIDGE_IP`]/24): a host's virtual
/// switch. Removed on drop.
pub struct Switch {
    /// The namespace's name.
    pub netns: String,
}

impl Switch {
    /// Creates it (with tests/guest/switch, the lab's helper).
    pub fn new() -> Switch {
        static N: AtomicU32 = AtomicU32::new(0);
        let netns = format!(
            "vmgt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        tool(
            SWITCH_SCRIPT,
            &["up", &netns, "br0", &format!("{BRIDGE_IP}/24")],
        );
        Switch { netns }
    }

    /// The switch as the host configuration names it.
    pub fn config(&self, name: &str) -> VirtualSwitch {
        VirtualSwitch {
            name: name.to_string(),
            bridge: "br0".to_string(),
            netns: Some(self.netns.clone()),
        }
    }

    /// A connection to the guest's echo service, opened from inside the namespace (the
    /// socket stays in that namespace wherever it is used); retries until `timeout`.
    pub fn connect_echo(&self, timeout: Duration) -> Result<TcpStream, String> {
        in_netns(Some(&self.netns), move || {
            let deadline = Instant::now() + timeout;
            let addr = SocketAddrV4::new(GUEST_IP.parse::<Ipv4Addr>().unwrap(), ECHO_PORT);
            loop {
                match TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        return Ok(s);
                    }
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("cannot connect to {addr}: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(250)),
                }
            }
        })
        .map_err(|e| e.to_string())?
    }

    /// Sends `text` to the guest's echo service on a new connection and returns what came
    /// back.
    pub fn echo(&self, text: &str, timeout: Duration) -> Result<String, String> {
        let mut s = self.connect_echo(timeout)?;
        echo_on(&mut s, text)
    }
}

/// Sends `text` on an echo connection and returns what came back.
pub fn echo_on(s: &mut TcpStream, text: &str) -> Result<String, String> {
    s.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = Command::new(SWITCH_SCRIPT)
            .args(["down", &self.netns])
            .status();
    }
}

/// The lab's switch helper.
const SWITCH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/guest/switch");

/// A host for one test: a storage root and a runtime folder under a temporary folder, the
/// guest's kernel and initrd copied into the root.
pub struct TestHost {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub host: QemuHost,
    /// QEMU pids to kill when the test ends, however it ends.
    started: std::sync::Mutex<Vec<(u32, PathBuf)>>,
}

impl TestHost {
    /// A host with these switches.
    pub async fn new(switches: Vec<VirtualSwitch>) -> TestHost {
        // Short paths: UNIX sockets live under the runtime folder.
        let tmp = tempfile::Builder::new()
            .prefix("vmgq")
            .tempdir_in("/tmp")
            .unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("vms");
        std::fs::create_dir_all(root.join("linux")).unwrap();
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::copy(guest_dir().join(f), root.join("linux").join(f)).unwrap();
        }
        let mut config = QemuHostConfig::new(vec![root.clone()], switches);
        config.run_dir = base.join("run");
        config.scope = ScopeMode::Session;
        let host = QemuHost::new(config).await.expect("QEMU host");
        TestHost {
            tmp,
            root,
            host,
            started: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Creates a qcow2 image in the root.
    pub fn qcow2(&self, rel: &str, size: &str) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size],
        );
        p
    }

    /// Validates a definition given as TOML.
    pub fn validate(&self, toml: &str) -> ValidatedVm {
        let def = QemuVmDefinition::from_toml(toml).expect("definition parses");
        self.host
            .validate(&def)
            .unwrap_or_else(|e| panic!("definition refused: {e}"))
    }

    /// Starts a VM and remembers to kill it at the end of the test.
    pub async fn start(&self, vm: &ValidatedVm, mode: vmgate_migrate::qemu::StartMode) -> QemuVm {
        let h = QemuVm::start(&self.host, vm, mode)
            .await
            .unwrap_or_else(|e| panic!("start {}: {}", vm.name(), chain(&e)));
        self.started
            .lock()
            .unwrap()
            .push((h.pid(), h.runtime_paths().pidfile.clone()));
        h
    }

    /// The console log of a VM started with the default serial log.
    pub fn console(&self, name: &str) -> PathBuf {
        self.host.vm_run_dir(name).join("console.log")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for (pid, pidfile) in self.started.lock().unwrap().drain(..) {
            // Only while that pid still holds the VM's pidfile (never a reused pid).
            if holder(&pidfile) == Some(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The process holding a pidfile's lock.
pub fn holder(pidfile: &Path) -> Option<u32> {
    let f = std::fs::File::open(pidfile).ok()?;
    let short = |v: libc::c_int| libc::c_short::try_from(v).unwrap();
    let mut fl = libc::flock {
        l_type: short(libc::F_WRLCK),
        l_whence: short(libc::SEEK_SET),
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETLK(&mut fl)).ok()?;
    (fl.l_type != short(libc::F_UNLCK)).then(|| u32::try_from(fl.l_pid).unwrap())
}

/// Waits until the file contains `needle` `count` times; returns its text.
pub async fn wait_for_text(path: &Path, needle: &str, count: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} did not appear {count} time(s) in {} within {timeout:?}; it holds:\n{}",
            path.display(),
            text.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An error with its sources, for assertion messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The test guest's definition: kernel boot, a qcow2 disk, the agent, and optionally a NIC
/// on switch "Lab".
pub fn linux_toml(name: &str, disk: Option<&str>, nic: bool, extra_cmdline: &str) -> String {
    let mut t = format!(
        r#"name = "{name}"
backend = "qemu"
memory_mib = 256
vcpus = 1
cpu_model = "qemu64"
accel = "tcg"
agent = true

[boot]
kernel = "linux/vmlinuz"
initrd = "linux/initrd.img"
cmdline = "console=ttyS0 vmgate.ip={GUEST_IP}/24 {extra_cmdline}"
"#
    );
    if let Some(d) = disk {
        t.push_str(&format!("\n[[disk]]\npath = \"{d}\"\nformat = \"qcow2\"\n"));
    }
    if nic {
        t.push_str("\n[[nic]]\nmac = \"52:54:00:12:34:57\"\nswitch = \"Lab\"\n");
    }
    t
}
