//! Three vmgated hosts (hv1–hv3 on 127.0.0.11–13) against the Samba test domain, laid out as
//! the demo lab lays them out (`$VMGATE_LAB_DIR/hvN/vmgated.toml`), so that the `vmgate` CLI
//! reaches them with `--host hvN`. Each lab has its own folder and ports. Each host's storage
//! roots are its own `hvN/vms` and the lab's `shared` folder (shared storage).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmgate_control::api::{Request, Response};
use vmgate_control::client::LocalClient;
use vmgate_control::events::EventRecord;

pub use crate::channel as chan;

/// The daemon.
pub fn vmgated() -> PathBuf {
    crate::bin("vmgated")
}

/// The `vmgate` CLI.
pub fn vmgate_bin() -> PathBuf {
    crate::bin("vmgate")
}

/// One daemon.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub ip: String,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Host {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("vmgated.sock")
    }

    pub fn events(&self) -> Vec<EventRecord> {
        vmgate_control::events::read(&self.dir.join("state/events.jsonl"), 100_000)
            .map(|r| r.0)
            .unwrap_or_default()
    }

    pub fn vm_names(&self) -> Vec<String> {
        let mut c = LocalClient::connect(&self.socket()).unwrap();
        match c.call(&Request::VmList).unwrap() {
            Response::Vms { vms } => vms.into_iter().map(|v| v.name).collect(),
            other => panic!("{other:?}"),
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A lab: its folder (VMGATE_LAB_DIR) and its hosts.
#[derive(Debug)]
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<Host>,
}

fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A memstress VM's configuration.
pub fn memstress_vm(name: &str, memory_mib: u64, size_mib: u64, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\n{extra}\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 8\nsize_mib = {size_mib}\n"
    )
}

/// A VM running diskstress on disk 0 (the guest writes a checked sequence to its first MiB)
/// and memstress.
pub fn disk_vm(name: &str, disk: &Path, format: &str) -> String {
    format!(
        r#"name = "{name}"
memory_mib = 64
vcpus = 2
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 256
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 16
[[disk]]
path = "{}"
format = "{format}"
"#,
        disk.display()
    )
}

impl Lab {
    /// Starts the named hosts (of hv1, hv2, hv3); `extra(host)` is appended to each host's
    /// configuration (switches, `[testing]`), `migration(host)` replaces its `[migration]`
    /// body.
    pub fn start(names: &[&str], extra: &dyn Fn(&str) -> String) -> Lab {
        let mut lab = Lab {
            dir: tempfile::tempdir().unwrap(),
            hosts: Vec::new(),
        };
        for name in names {
            lab.spawn(name, &extra(name));
        }
        for i in 0..lab.hosts.len() {
            lab.wait_serving(i);
        }
        lab
    }

    /// Adds a host (hv1–hv3) to a running lab and waits until it serves.
    pub fn add_host(&mut self, name: &str, extra: &str) {
        self.spawn(name, extra);
        self.wait_serving(self.hosts.len() - 1);
    }

    fn spawn(&mut self, name: &str, extra: &str) {
        let e = chan::env();
        let keytabs = &chan::hosts().keytab;
        let n: u8 = name.trim_start_matches("hv").parse().unwrap();
        let ip = format!("127.0.0.{}", 10 + n);
        let port = free_port_on(&ip);
        let hdir = self.dir.path().join(name);
        std::fs::create_dir_all(&hdir).unwrap();
        let config = format!(
            r#"host_name = "{name}"
fqdn = "{name}.lab.example.test"
realm = "{realm}"
keytab = "{keytab}"
listen = ["{ip}:{port}"]
krb5_config = "{krb5}"
state_dir = "{state}"
control_socket = "{socket}"
admin_group = "Hyper-V Administrators"
storage_roots = ["{vms}", "{shared}"]

[directory]
url = "ldap://{dc}"

[migration]
enabled = true
any_network = true
{extra}
"#,
            realm = e.realm,
            keytab = keytabs[name].display(),
            krb5 = e.krb5_config.display(),
            state = hdir.join("state").display(),
            socket = hdir.join("vmgated.sock").display(),
            vms = hdir.join("vms").display(),
            shared = self.shared().display(),
            dc = e.dc_ip,
        );
        std::fs::create_dir_all(hdir.join("vms")).unwrap();
        std::fs::create_dir_all(self.shared()).unwrap();
        let path = hdir.join("vmgated.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(hdir.join("vmgated.log")).unwrap();
        let child = Command::new(vmgated())
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.hosts.push(Host {
            name: name.to_owned(),
            ip,
            port,
            dir: hdir,
            child: Some(child),
        });
    }

    fn wait_serving(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        let start = Instant::now();
        loop {
            if let Some(c) = h.child.as_mut() {
                assert!(
                    c.try_wait().unwrap().is_none(),
                    "vmgated {} exited early: {}",
                    h.name,
                    std::fs::read_to_string(h.dir.join("vmgated.log")).unwrap_or_default()
                );
            }
            if let Ok(mut c) = LocalClient::connect(&h.socket())
                && let Ok(Response::Host(_)) = c.call(&Request::HostShow)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "vmgated {} did not serve within 60 s",
                h.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a stopped host again with the same configuration and port.
    pub fn restart(&mut self, name: &str) {
        let i = self.hosts.iter().position(|h| h.name == name).unwrap();
        let h = &mut self.hosts[i];
        h.stop();
        let log = std::fs::File::create(h.dir.join("vmgated.log")).unwrap();
        h.child = Some(
            Command::new(vmgated())
                .arg("--config")
                .arg(h.dir.join("vmgated.toml"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        self.wait_serving(i);
    }

    /// The folder every host of the lab sees at the same path (shared storage): a storage
    /// root of each, next to its own `vms` folder.
    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap()
    }

    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts.iter_mut().find(|h| h.name == name).unwrap()
    }

    /// A `vmgate` command as `user` (a fresh forwardable ticket), against this lab.
    pub fn cli(&self, user: &str, args: &[&str]) -> Command {
        let e = chan::env();
        let cc = chan::user_ccache(user, &format!("lab-{}", chan::unique()));
        let mut c = Command::new(vmgate_bin());
        c.args(args)
            .env("VMGATE_LAB_DIR", self.dir.path())
            .env("KRB5_CONFIG", &e.krb5_config)
            .env("KRB5CCNAME", format!("FILE:{}", cc.display()))
            .env("VMGATE_REALM", &e.realm)
            .env_remove("VMGATE_HOST")
            .stdin(Stdio::null());
        c
    }

    /// Runs `vmgate` as `user`; returns exit code, stdout, stderr.
    pub fn run(&self, user: &str, args: &[&str]) -> (i32, String, String) {
        let out: Output = self.cli(user, args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `vmgate ... --json` as `user` and parses the last JSON document of stdout.
    pub fn run_json(&self, user: &str, args: &[&str]) -> (i32, Value) {
        let mut a = args.to_vec();
        a.push("--json");
        let (code, out, err) = self.run(user, &a);
        let doc = last_json(&out)
            .unwrap_or_else(|| panic!("no JSON from vmgate {args:?}: {out}\nstderr: {err}"));
        (code, doc)
    }

    /// Creates and starts a VM on `host` through the CLI (local socket, as root's caller).
    pub fn create_vm(&self, host: &str, config: &str) {
        let name = config
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|r| r.strip_suffix('"'))
            .unwrap();
        let path = self.dir.path().join(format!("{name}.toml"));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(config.as_bytes()).unwrap();
        let (code, out, err) = self.run(
            "alice",
            &[
                "--host",
                host,
                "vm",
                "create",
                "--config",
                path.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "vm create failed: {out}{err}");
    }
}

/// The last complete JSON document in `text` (`--json` output: progress lines, then one
/// pretty-printed document).
pub fn last_json(text: &str) -> Option<Value> {
    let start = text.rfind("\n{").map_or(0, |i| i + 1);
    serde_json::from_str(text[start..].trim()).ok()
}
