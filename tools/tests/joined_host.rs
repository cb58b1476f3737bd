//! The tools on a host joined to the domain the usual way, with no `VMGATE_*` variable: a
//! private mount namespace (`unshare -m`) whose `/etc` is the machine's with an overlay on top
//! (the machine's own files stay untouched) holding what `realm join` leaves behind:
//! `/etc/resolv.conf` pointing at the test DC (whose DNS answers for lab.example.test),
//! `/etc/krb5.conf` with only `default_realm` and `dns_lookup_kdc = true`, and the domain's CA
//! in the system trust store (`/etc/ssl/certs/ca-certificates.crt`, as update-ca-certificates
//! writes it). Everything else — the DC for LDAP, the KDCs, host names — comes from DNS.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;
use vmgate_testkit::domain::{Domain, Outcome};

const REALM: &str = "LAB.EXAMPLE.TEST";

/// One joined-host view of the test domain.
struct Joined {
    domain: Domain,
    tmp: tempfile::TempDir,
}

impl Joined {
    fn new() -> Joined {
        let domain = Domain::from_env();
        let tmp = tempfile::tempdir().unwrap();
        let dc_ip = std::env::var("VMGATE_DC_IP").expect("VMGATE_DC_IP (tests/domain/up)");
        for (upper, with_ca) in [("etc", true), ("etc-no-ca", false)] {
            let up = tmp.path().join(upper);
            std::fs::create_dir_all(up.join("ssl/certs")).unwrap();
            std::fs::create_dir_all(tmp.path().join(format!("{upper}.work"))).unwrap();
            std::fs::write(
                up.join("resolv.conf"),
                format!("nameserver {dc_ip}\nsearch lab.example.test\n"),
            )
            .unwrap();
            std::fs::write(
                up.join("krb5.conf"),
                format!("[libdefaults]\n    default_realm = {REALM}\n    dns_lookup_kdc = true\n"),
            )
            .unwrap();
            let mut bundle =
                std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
            if with_ca {
                bundle.extend(std::fs::read(&domain.ldap_ca).unwrap());
            }
            std::fs::write(up.join("ssl/certs/ca-certificates.crt"), bundle).unwrap();
        }
        std::fs::copy(&domain.password_file, tmp.path().join("admin.pw")).unwrap();
        Joined { domain, tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn password_file(&self) -> String {
        self.path("admin.pw").display().to_string()
    }

    /// Runs `program args` in a new mount namespace with the joined host's /etc, without any
    /// `VMGATE_*` or `KRB5_CONFIG` variable, with `KRB5CCNAME` set to this test's cache.
    fn run_in(&self, upper: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Outcome {
        let up = self.path(upper);
        let work = self.path(&format!("{upper}.work"));
        let script = format!(
            "set -e; mount --make-rprivate /; mount -t overlay overlay \
             -o lowerdir=/etc,upperdir={},workdir={} /etc; exec \"$@\"",
            up.display(),
            work.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c", &script, "sh", program])
            .args(args)
            .env_remove("KRB5_CONFIG")
            .env(
                "KRB5CCNAME",
                format!("FILE:{}", self.path("admin.cc").display()),
            )
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("VMGATE_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("unshare (util-linux) runs as root");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).unwrap();
        }
        Outcome::from(child.wait_with_output().unwrap())
    }

    fn run(&self, program: &str, args: &[&str]) -> Outcome {
        self.run_in("etc", program, args, None)
    }

    /// `kinit Administrator` inside: the KDC found through DNS.
    fn kinit(&self) {
        let pw = self.domain.admin_password();
        let out = self.run_in(
            "etc",
            "kinit",
            &[&format!("Administrator@{REALM}")],
            Some(&format!("{}\n", pw.expose())),
        );
        assert_eq!(out.code, 0, "kinit through DNS-located KDCs: {out}");
    }
}

fn vmgate() -> &'static str {
    env!("CARGO_BIN_EXE_vmgate")
}

fn setspn() -> &'static str {
    env!("CARGO_BIN_EXE_setspn")
}

fn json(out: &Outcome) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn check<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no check {id} in {v:#}"))
}

#[test]
fn the_tools_find_the_domain_on_a_joined_host_with_no_configuration() {
    let j = Joined::new();
    j.kinit();

    // setspn: the DC from DNS (_ldap._tcp.dc._msdcs), a Kerberos bind with the user's ticket.
    let out = j.run(setspn(), &["-L", "hv1"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("HOST/hv1.lab.example.test"), "{out}");

    // vmgate delegation show and check.
    let out = j.run(vmgate(), &["delegation", "show", "hv1"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("HV1$"), "{out}");
    let out = j.run(
        vmgate(),
        &[
            "delegation",
            "check",
            "--from",
            "hv1",
            "--to",
            "hv2",
            "--user",
            "alice",
            "--json",
        ],
    );
    // Met or not (that depends on hv2's SPNs), the directory answered: a verdict, exit 0 or 1.
    assert!(matches!(out.code, 0 | 1), "{out}");
    let v = json(&out);
    assert!(v["verdict"]["requirements"].is_array(), "{out}");

    // vmgate doctor: the KDCs from DNS (there is no kdc line), the clock measured against them,
    // the directory from DNS, the hosts' names through the resolver.
    let out = j.run(
        vmgate(),
        &[
            "doctor",
            "--from",
            "hv1",
            "--to",
            "hv2",
            "--user",
            "alice",
            "--skip-daemon",
            "--json",
        ],
    );
    let v = json(&out);
    for id in [
        "clock-skew",
        "kdc",
        "ldap",
        "resolve-source",
        "resolve-destination",
    ] {
        assert_eq!(check(&v, id)["status"], "pass", "{id}: {out}");
    }
    let kdc = check(&v, "kdc")["summary"].as_str().unwrap();
    assert!(
        kdc.contains(&format!("(DNS _kerberos._tcp.{REALM})"))
            && kdc.contains("dc1.lab.example.test:88"),
        "{kdc}"
    );
    let ldap = check(&v, "ldap")["summary"].as_str().unwrap();
    assert!(
        ldap.starts_with("ldap://dc1.lab.example.test:389: Samba"),
        "{ldap}"
    );
    let resolved = check(&v, "resolve-source")["summary"].as_str().unwrap();
    assert!(
        resolved.starts_with("hv1.lab.example.test -> 127.0.0.11:6600"),
        "{resolved}"
    );
}

#[test]
fn the_dcs_certificate_verifies_by_its_name_against_the_system_trust_store() {
    let j = Joined::new();
    let pw = j.password_file();
    // A simple bind to the DC found in DNS: StartTLS, the certificate checked by the DC's name
    // against the system's trust store, which holds the domain's CA.
    let out = j.run(
        setspn(),
        &[
            "-L",
            "hv1",
            "--bind-user",
            "Administrator",
            "--password-file",
            &pw,
        ],
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("HOST/hv1"), "{out}");
    // LDAPS by the DC's name.
    let url = "ldaps://dc1.lab.example.test";
    let args = [
        "-L",
        "hv1",
        "--ldap-url",
        url,
        "--bind-user",
        "Administrator",
        "--password-file",
        pw.as_str(),
    ];
    let out = j.run(setspn(), &args);
    assert_eq!(out.code, 0, "{out}");
    // Without the domain's CA in the trust store the same certificate is refused.
    let out = j.run_in("etc-no-ca", setspn(), &args, None);
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr
            .contains("does not verify against the system's trusted CAs"),
        "{out}"
    );
}

#[test]
fn a_namespace_leaves_the_machines_files_alone() {
    let j = Joined::new();
    let before = std::fs::read("/etc/resolv.conf").ok();
    let out = j.run("cat", &["/etc/resolv.conf"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("search lab.example.test"), "{out}");
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), before);
}
