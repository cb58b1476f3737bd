//! Fixtures for the channel and migration tests: the domain, users' credential caches, host
//! keytabs with migration SPNs, and probe processes (one per host) whose JSON events the tests
//! read.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const CLASS: &str = "Microsoft Virtual System Migration Service";
pub const DOMAIN: &str = "lab.example.test";
pub const GROUP: &str = "Hyper-V Administrators";

/// The `vmgate-channel` probe.
pub fn probe() -> PathBuf {
    crate::bin("vmgate-channel")
}

/// The test domain's variables (set by tests/run or `eval "$(tests/domain/up)"`).
#[derive(Debug)]
pub struct Env {
    pub krb5_config: PathBuf,
    pub realm: String,
    pub test_dir: PathBuf,
    pub domain_dir: PathBuf,
    pub ldap_url: String,
    pub ldap_ca: PathBuf,
    pub dc_ip: String,
    pub base_dn: String,
    pub admin_password_file: PathBuf,
    /// Our own work folder for this test binary.
    pub work: PathBuf,
    passwords: HashMap<String, String>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the channel tests through tests/run (or eval \"$(tests/domain/up)\" first)"
        )
    })
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let test_dir = PathBuf::from(var("VMGATE_TEST_DIR"));
        let passwords = std::fs::read_to_string(test_dir.join("passwords"))
            .expect("the domain's passwords file")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(p, w)| (p.to_owned(), w.to_owned()))
            .collect();
        let work = std::env::temp_dir().join(format!("vmgate-chan-tests-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        Env {
            krb5_config: PathBuf::from(var("KRB5_CONFIG")),
            realm: var("VMGATE_REALM"),
            test_dir,
            domain_dir: PathBuf::from(var("VMGATE_DOMAIN_DIR")),
            ldap_url: var("VMGATE_LDAP_URL"),
            ldap_ca: PathBuf::from(var("VMGATE_LDAP_CA")),
            dc_ip: var("VMGATE_DC_IP"),
            base_dn: var("VMGATE_BASE_DN"),
            admin_password_file: PathBuf::from(var("VMGATE_LDAP_PASSWORD_FILE")),
            work,
            passwords,
        }
    })
}

pub fn spn(host: &str) -> String {
    format!("{CLASS}/{host}.{DOMAIN}")
}

pub fn short_spn(host: &str) -> String {
    format!("{CLASS}/{host}")
}

/// Samba's escaped twin of an SPN with spaces.
pub fn twin(spn: &str) -> String {
    spn.replace(' ', "\\ ")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// LDIF through ldapmodify over LDAPS as Administrator (what tests/domain/up does).
pub fn ldapmodify(ldif: &str) {
    let e = env();
    let mut child = Command::new("ldapmodify")
        .env("LDAPTLS_CACERT", &e.ldap_ca)
        .env("LDAPTLS_REQCERT", "demand")
        .args(["-H", &e.ldap_url, "-x", "-D"])
        .arg(format!("Administrator@{}", e.realm))
        .arg("-y")
        .arg(&e.admin_password_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ldapmodify");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ldif.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ldapmodify failed: {}\n{}\nLDIF:\n{ldif}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes an entry if it exists.
pub fn ldapdelete_if_exists(dn: &str) {
    let e = env();
    let _ = Command::new("ldapdelete")
        .env("LDAPTLS_CACERT", &e.ldap_ca)
        .env("LDAPTLS_REQCERT", "demand")
        .args(["-H", &e.ldap_url, "-x", "-D"])
        .arg(format!("Administrator@{}", e.realm))
        .arg("-y")
        .arg(&e.admin_password_file)
        .arg(dn)
        .output();
}

pub fn computer_dn(host: &str) -> String {
    format!("CN={},CN=Computers,{}", host.to_uppercase(), env().base_dn)
}

/// Replaces the SPNs of a host account (plain and escaped twins).
pub fn set_spns(host: &str, spns: &[String]) {
    let mut ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: servicePrincipalName\n",
        computer_dn(host)
    );
    for s in spns {
        ldif.push_str(&format!("servicePrincipalName: {s}\n"));
        if s.contains(' ') {
            ldif.push_str(&format!("servicePrincipalName: {}\n", twin(s)));
        }
    }
    ldif.push_str("-\n");
    ldapmodify(&ldif);
}

/// The SPNs a host has in the base domain plus its migration SPNs.
pub fn host_spns(host: &str, migration: bool) -> Vec<String> {
    let mut v = vec![format!("HOST/{host}"), format!("HOST/{host}.{DOMAIN}")];
    if migration {
        v.push(short_spn(host));
        v.push(spn(host));
    }
    v
}

/// Sets msDS-AllowedToDelegateTo of a host (plain and twins); empty clears it.
pub fn set_delegation(host: &str, targets: &[String]) {
    let dn = computer_dn(host);
    let ldif = if targets.is_empty() {
        format!("dn: {dn}\nchangetype: modify\nreplace: msDS-AllowedToDelegateTo\n-\n")
    } else {
        let mut l = format!("dn: {dn}\nchangetype: modify\nreplace: msDS-AllowedToDelegateTo\n");
        for t in targets {
            l.push_str(&format!("msDS-AllowedToDelegateTo: {t}\n"));
            if t.contains(' ') {
                l.push_str(&format!("msDS-AllowedToDelegateTo: {}\n", twin(t)));
            }
        }
        l.push_str("-\n");
        l
    };
    ldapmodify(&ldif);
}

fn unicode_pwd(pw: &str) -> String {
    let quoted = format!("\"{pw}\"");
    let bytes: Vec<u8> = quoted.encode_utf16().flat_map(u16::to_le_bytes).collect();
    base64(&bytes)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Creates (or re-creates) a computer account `host` with the given SPNs and a random password.
pub fn create_computer(host: &str, spns: &[String]) {
    let dn = computer_dn(host);
    ldapdelete_if_exists(&dn);
    let pw = format!("Pw{}-{}aA1", std::process::id(), host);
    let mut ldif = format!(
        "dn: {dn}\nchangetype: add\nobjectClass: computer\nsAMAccountName: {}$\n\
         dNSHostName: {host}.{DOMAIN}\nmsDS-SupportedEncryptionTypes: 28\n\
         unicodePwd:: {}\nuserAccountControl: 4096\n",
        host.to_uppercase(),
        unicode_pwd(&pw)
    );
    for s in spns {
        ldif.push_str(&format!("servicePrincipalName: {s}\n"));
        if s.contains(' ') {
            ldif.push_str(&format!("servicePrincipalName: {}\n", twin(s)));
        }
    }
    ldapmodify(&ldif);
}

/// Exports a keytab with the account and the given principals (in parallel; ~0.4 s each).
pub fn export_keytab(host: &str, principals: &[String]) -> PathBuf {
    let e = env();
    let kt = e.work.join(format!("{host}.keytab"));
    let _ = std::fs::remove_file(&kt);
    let mut all = vec![format!("{host}$")];
    all.extend(principals.iter().cloned());
    // exportkeytab appends to an existing file; several writers at once would race, so each
    // principal goes to its own file, then they are concatenated entry-wise by MIT's format:
    // a keytab is a 2-byte version followed by entries.
    let parts: Vec<PathBuf> = all
        .iter()
        .enumerate()
        .map(|(i, _)| e.work.join(format!("{host}.keytab.part{i}")))
        .collect();
    let handles: Vec<_> = all
        .iter()
        .zip(&parts)
        .map(|(p, part)| {
            let _ = std::fs::remove_file(part);
            let conf = e.domain_dir.join("etc/smb.conf");
            let p = p.clone();
            let part = part.clone();
            thread::spawn(move || {
                run(Command::new("samba-tool")
                    .args(["domain", "exportkeytab"])
                    .arg(&part)
                    .arg(format!("--principal={p}"))
                    .arg("-s")
                    .arg(conf));
                let data = std::fs::read(&part).unwrap();
                assert!(data.len() > 2, "exportkeytab wrote no key for {p}");
                data
            })
        })
        .collect();
    let mut out = vec![0x05, 0x02];
    for h in handles {
        let data = h.join().unwrap();
        out.extend_from_slice(&data[2..]);
    }
    for part in &parts {
        let _ = std::fs::remove_file(part);
    }
    std::fs::write(&kt, out).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kt, std::fs::Permissions::from_mode(0o600)).unwrap();
    kt
}

/// A user's credential cache with a fresh TGT (kinit), copied per test so service tickets
/// cached by one test do not leak into another.
pub fn user_ccache(user: &str, tag: &str) -> PathBuf {
    static BASE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let e = env();
    let base = {
        let mut map = BASE.get_or_init(Default::default).lock().unwrap();
        map.entry(user.to_owned())
            .or_insert_with(|| {
                let cc = e.work.join(format!("{user}.base.ccache"));
                let principal = format!("{user}@{}", e.realm);
                let pw = e
                    .passwords
                    .get(&principal)
                    .unwrap_or_else(|| panic!("no password for {principal}"));
                let mut child = Command::new("kinit")
                    .env("KRB5_CONFIG", &e.krb5_config)
                    .arg("-c")
                    .arg(format!("FILE:{}", cc.display()))
                    .arg(&principal)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                writeln!(child.stdin.take().unwrap(), "{pw}").unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "kinit {principal}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                cc
            })
            .clone()
    };
    let cc = e.work.join(format!("{user}.{tag}.ccache"));
    std::fs::copy(&base, &cc).unwrap();
    cc
}

/// Events (JSON lines) of a probe process.
#[derive(Debug, Clone, Default)]
pub struct Events(Arc<(Mutex<Vec<Value>>, Condvar)>);

impl Events {
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut v = lock.lock().unwrap();
        loop {
            if let Some(x) = v.iter().find(|e| pred(e)) {
                return x.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; events so far:\n{:#?}",
                *v
            );
            v = cv.wait_timeout(v, left).unwrap().0;
        }
    }

    pub fn all(&self) -> Vec<Value> {
        self.0.0.lock().unwrap().clone()
    }

    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.0.0.lock().unwrap().iter().filter(|e| pred(e)).count()
    }
}

/// A probe process (a host serving, or a MITM); killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub events: Events,
    pub addr: SocketAddr,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

pub fn spawn(name: &str, args: &[String], extra_env: &[(&str, &Path)]) -> Proc {
    try_spawn(name, args, extra_env).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Like [`spawn`], but a probe that fails at start returns its error event.
pub fn try_spawn(name: &str, args: &[String], extra_env: &[(&str, &Path)]) -> Result<Proc, Value> {
    let e = env();
    let mut cmd = Command::new(probe());
    cmd.args(args)
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("VMGATE_REALM", &e.realm)
        .env_remove("KRB5CCNAME")
        .env_remove("KRB5_CLIENT_KTNAME")
        .env_remove("KRB5_KTNAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn vmgate-channel");
    let events = Events::default();
    let ev = events.clone();
    let stdout = child.stdout.take().unwrap();
    let tag = name.to_owned();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| serde_json::json!({"event": "raw", "line": line}));
            if std::env::var_os("VMGATE_TEST_VERBOSE").is_some() {
                eprintln!("[{tag}] {line}");
            }
            let (lock, cv) = &*ev.0;
            lock.lock().unwrap().push(v);
            cv.notify_all();
        }
    });
    let listening = events.wait_for(&format!("{name} to listen"), Duration::from_secs(10), |v| {
        v["event"] == "listening" || v["event"] == "error"
    });
    if listening["event"] != "listening" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(listening);
    }
    let addr = listening["addr"].as_str().unwrap().parse().unwrap();
    Ok(Proc {
        child,
        events,
        addr,
        name: name.to_owned(),
    })
}

/// Options of a serving host.
#[derive(Debug)]
pub struct Serve<'a> {
    pub host: &'a str,
    pub ip: &'a str,
    pub keytab: &'a Path,
    pub allow_group: bool,
    /// The group for `allow_group` (a name, a DN or a SID).
    pub group: String,
    pub allow: Vec<String>,
    /// Hosts that may open migration channels as themselves (`--peer-host`).
    pub peer_hosts: Vec<String>,
    /// Realms trusted besides the domain's (`--trusted-realm`).
    pub trusted_realms: Vec<String>,
    pub networks: &'a str,
    pub timeout_ms: u64,
    pub max_handshakes: usize,
    pub relay_to: Option<(SocketAddr, String)>,
    pub auth: &'a str,
}

impl<'a> Serve<'a> {
    pub fn new(host: &'a str, ip: &'a str, keytab: &'a Path) -> Serve<'a> {
        Serve {
            host,
            ip,
            keytab,
            allow_group: true,
            group: GROUP.to_owned(),
            allow: Vec::new(),
            peer_hosts: Vec::new(),
            trusted_realms: Vec::new(),
            networks: "127.0.0.0/8",
            timeout_ms: 5_000,
            max_handshakes: 64,
            relay_to: None,
            auth: "kerberos",
        }
    }

    pub fn start(&self) -> Proc {
        self.try_start()
            .unwrap_or_else(|e| panic!("{} did not start: {e}", self.host))
    }

    /// Starts the host; a host that refuses to start returns its error event.
    pub fn try_start(&self) -> Result<Proc, Value> {
        let e = env();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("{}:0", self.ip),
            "--keytab".into(),
            self.keytab.display().to_string(),
            "--account".into(),
            format!("{}$", self.host),
            "--spn".into(),
            spn(self.host),
            "--ccache-dir".into(),
            e.work
                .join(format!("cc-{}-{}", self.host, unique()))
                .display()
                .to_string(),
            "--networks".into(),
            self.networks.into(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
            "--max-handshakes".into(),
            self.max_handshakes.to_string(),
            "--auth".into(),
            self.auth.into(),
        ];
        if self.allow_group {
            args.extend([
                "--allow-group".into(),
                self.group.clone(),
                "--ldap-url".into(),
                ldap_url(),
            ]);
        }
        for a in &self.allow {
            args.extend(["--allow".into(), a.clone()]);
        }
        for h in &self.peer_hosts {
            args.extend(["--peer-host".into(), h.clone()]);
        }
        for r in &self.trusted_realms {
            args.extend(["--trusted-realm".into(), r.clone()]);
        }
        if let Some((to, s)) = &self.relay_to {
            args.extend([
                "--relay-to".into(),
                to.to_string(),
                "--relay-spn".into(),
                s.clone(),
            ]);
            if !self.allow_group {
                // The relay reads delegation facts from the directory to explain refusals.
                args.extend(["--ldap-url".into(), ldap_url()]);
            }
        }
        try_spawn(self.host, &args, &[])
    }
}

/// Hosts bind to LDAP with their own keytab: GSSAPI with sealing over plain LDAP (Samba
/// refuses GSSAPI without sign/seal over TLS).
pub fn ldap_url() -> String {
    format!("ldap://{}", env().dc_ip)
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Runs the probe with `args` and returns its last JSON line and exit status.
pub fn run_probe(args: &[String], envs: &[(&str, String)]) -> (Value, bool) {
    let e = env();
    let mut cmd = Command::new(probe());
    cmd.args(args)
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("VMGATE_REALM", &e.realm)
        .env_remove("KRB5CCNAME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vmgate-channel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output from {args:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    (v, out.status.success())
}

/// Connects to `to` (whose migration SPN is `target_host`'s) as the host `host` with its own
/// keytab, for `purpose` (`control` or `migration`).
pub fn connect_as_host(
    to: SocketAddr,
    target_host: &str,
    host: &str,
    keytab: &Path,
    purpose: &str,
) -> (Value, bool) {
    run_probe(
        &[
            "connect".into(),
            "--to".into(),
            to.to_string(),
            "--spn".into(),
            spn(target_host),
            "--keytab".into(),
            keytab.display().to_string(),
            "--account".into(),
            format!("{host}$"),
            "--purpose".into(),
            purpose.into(),
            "--send".into(),
            format!("from {host}"),
        ],
        &[],
    )
}

/// Creates (or re-creates) a user `CN=name,CN=Users` with `sAMAccountName` `name`.
pub fn create_user(name: &str, password: &str) -> String {
    let dn = format!("CN={name},CN=Users,{}", env().base_dn);
    ldapdelete_if_exists(&dn);
    ldapmodify(&format!(
        "dn: {dn}\nchangetype: add\nobjectClass: user\nsAMAccountName: {name}\n\
         userPrincipalName: {name}@{realm}\nunicodePwd:: {pw}\nuserAccountControl: {uac}\n",
        realm = env().realm,
        pw = unicode_pwd(password),
        uac = 0x200 | 0x10000,
    ));
    dn
}

/// Creates (or re-creates) a security group at `dn` with `sAMAccountName` `sam` and members.
pub fn create_group(dn: &str, sam: &str, members: &[String]) {
    ldapdelete_if_exists(dn);
    let mut ldif = format!(
        "dn: {dn}\nchangetype: add\nobjectClass: group\nsAMAccountName: {sam}\n\
         groupType: -2147483646\n"
    );
    for m in members {
        ldif.push_str(&format!("member: {m}\n"));
    }
    ldapmodify(&ldif);
}

/// A credential cache for `principal` (kinit with `password`) at a fresh path.
pub fn kinit(principal: &str, password: &str, tag: &str) -> PathBuf {
    let e = env();
    let cc = e.work.join(format!("{tag}.ccache"));
    let _ = std::fs::remove_file(&cc);
    let mut child = Command::new("kinit")
        .env("KRB5_CONFIG", &e.krb5_config)
        .arg("-c")
        .arg(format!("FILE:{}", cc.display()))
        .arg(principal)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kinit {principal}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cc
}

/// Runs `vmgate-channel connect` and returns its JSON line and exit status.
pub fn connect(
    to: SocketAddr,
    target_host: &str,
    ccache: &Path,
    extra: &[&str],
    envs: &[(&str, &Path)],
    prefix: &[&str],
) -> (Value, bool) {
    let e = env();
    let mut cmd = if prefix.is_empty() {
        Command::new(probe())
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(probe());
        c
    };
    cmd.args(["connect", "--to"])
        .arg(to.to_string())
        .arg("--spn")
        .arg(spn(target_host))
        .arg("--ccache")
        .arg(ccache)
        .args(extra)
        .env("KRB5_CONFIG", &e.krb5_config)
        .env("VMGATE_REALM", &e.realm)
        .env_remove("KRB5CCNAME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vmgate-channel connect");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output from connect; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    (v, out.status.success())
}

/// The migration setup shared by the tests: hv1..hv3 get their migration SPNs, keytabs with
/// them, and HV1$ may delegate to hv2. Done once per test binary.
#[derive(Debug)]
pub struct Hosts {
    pub keytab: HashMap<&'static str, PathBuf>,
}

pub fn hosts() -> &'static Hosts {
    static H: OnceLock<Hosts> = OnceLock::new();
    H.get_or_init(|| {
        for h in ["hv1", "hv2", "hv3"] {
            set_spns(h, &host_spns(h, true));
        }
        set_delegation("hv1", &[spn("hv2"), short_spn("hv2")]);
        set_delegation("hv3", &[]);
        let handles: Vec<_> = ["hv1", "hv2", "hv3"]
            .into_iter()
            .map(|h| thread::spawn(move || (h, export_keytab(h, &[short_spn(h), spn(h)]))))
            .collect();
        let keytab = handles.into_iter().map(|t| t.join().unwrap()).collect();
        Hosts { keytab }
    })
}
