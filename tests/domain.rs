//! Checks the test domain that `tests/domain/up` brings up: what every other integration test
//! relies on (the exported variables, passwords, keytabs, the TLS CA, the accounts and their
//! flags). Run through `tests/run`, or after `eval "$(tests/domain/up)"`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The variables `tests/domain/up` exports.
const VARIABLES: [&str; 10] = [
    "KRB5_CONFIG",
    "VMGATE_LDAP_URL",
    "VMGATE_LDAP_CA",
    "VMGATE_REALM",
    "VMGATE_TEST_DIR",
    "VMGATE_DC_IP",
    "VMGATE_DOMAIN_DIR",
    "VMGATE_BASE_DN",
    "VMGATE_LDAP_BIND_USER",
    "VMGATE_LDAP_PASSWORD_FILE",
];

/// userAccountControl NOT_DELEGATED: "account is sensitive and cannot be delegated".
const NOT_DELEGATED: u32 = 0x0010_0000;

/// The test domain as seen through the environment.
#[derive(Debug)]
struct Domain {
    vars: BTreeMap<&'static str, String>,
}

impl Domain {
    /// Reads every exported variable; panics with the list of missing ones.
    fn from_env() -> Self {
        let mut vars = BTreeMap::new();
        let mut missing = Vec::new();
        for name in VARIABLES {
            match std::env::var(name) {
                Ok(value) if !value.is_empty() => {
                    vars.insert(name, value);
                }
                _ => missing.push(name),
            }
        }
        assert!(
            missing.is_empty(),
            "the test domain's variables {missing:?} are not set: run through tests/run \
             (or `eval \"$(tests/domain/up)\"` first)"
        );
        Self { vars }
    }

    fn var(&self, name: &str) -> &str {
        self.vars
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name} is not one of the exported variables"))
    }

    fn realm(&self) -> &str {
        self.var("VMGATE_REALM")
    }

    fn test_dir(&self) -> PathBuf {
        PathBuf::from(self.var("VMGATE_TEST_DIR"))
    }

    fn keytab(&self, host: &str) -> PathBuf {
        self.test_dir()
            .join("keytabs")
            .join(format!("{host}.keytab"))
    }

    /// Where the KDC writes its reasons (shown in failures).
    fn log(&self) -> PathBuf {
        Path::new(self.var("VMGATE_DOMAIN_DIR")).join("samba.log")
    }

    /// The password of `user@REALM` from the `passwords` file.
    fn password(&self, user: &str) -> String {
        let path = self.test_dir().join("passwords");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let principal = format!("{user}@{}", self.realm());
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .find(|(p, _)| *p == principal)
            .map(|(_, password)| password.to_owned())
            .unwrap_or_else(|| panic!("{} has no line for {principal}", path.display()))
    }

    /// Runs a tool with this domain's Kerberos configuration and the given credential cache;
    /// panics with its output and the KDC log's path unless it succeeds.
    fn run(&self, ccache: &Path, program: &str, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.try_run(ccache, program, args, stdin);
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}):\n{}{}\n(the KDC's reasons are in {})",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log().display()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn try_run(&self, ccache: &Path, program: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("KRB5_CONFIG", self.var("KRB5_CONFIG"))
            .env("KRB5CCNAME", format!("FILE:{}", ccache.display()))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin was piped");
            pipe.write_all(format!("{input}\n").as_bytes())
                .unwrap_or_else(|e| panic!("cannot write to {program}: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{program} did not finish: {e}"))
    }

    /// `kinit user@REALM` with the password from the passwords file, into `ccache`.
    fn kinit(&self, ccache: &Path, user: &str) {
        let principal = format!("{user}@{}", self.realm());
        let password = self.password(user);
        self.run(ccache, "kinit", &[&principal], Some(&password));
    }

    /// An LDAPS search bound as the exported bind user, verified against `ca`.
    fn ldapsearch(&self, ca: &str, filter: &str, attributes: &[&str]) -> Output {
        let bind = format!("{}@{}", self.var("VMGATE_LDAP_BIND_USER"), self.realm());
        let mut command = Command::new("ldapsearch");
        command
            .env("LDAPTLS_CACERT", ca)
            .env("LDAPTLS_REQCERT", "demand")
            .args(["-LLL", "-o", "ldif-wrap=no", "-x", "-H"])
            .arg(self.var("VMGATE_LDAP_URL"))
            .args(["-D", &bind, "-y", self.var("VMGATE_LDAP_PASSWORD_FILE")])
            .args(["-b", self.var("VMGATE_BASE_DN"), filter])
            .args(attributes)
            .stdin(Stdio::null());
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot start ldapsearch: {e}"))
    }

    /// The values of `attribute` of the one entry `filter` finds (over verified LDAPS).
    fn attribute(&self, filter: &str, attribute: &str) -> Vec<String> {
        let output = self.ldapsearch(self.var("VMGATE_LDAP_CA"), filter, &[attribute]);
        assert!(
            output.status.success(),
            "ldapsearch {filter} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let entries = text.lines().filter(|l| l.starts_with("dn: ")).count();
        assert_eq!(
            entries, 1,
            "{filter} should find exactly one entry:\n{text}"
        );
        let prefix = format!("{attribute}: ");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect()
    }
}

/// The flags of the TGT in a `klist -f` listing (`F` forwardable, `R` renewable, ...): MIT
/// prints them after the ticket's line, at the end of "renew until ..., Flags: FRIA".
fn tgt_flags(listing: &str) -> String {
    listing
        .lines()
        .skip_while(|l| !l.contains(" krbtgt/"))
        .skip(1)
        .take_while(|l| l.starts_with(char::is_whitespace))
        .find_map(|l| {
            l.split_once("Flags: ")
                .map(|(_, flags)| flags.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no TGT flags in:\n{listing}"))
}

fn ccache_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder for the credential cache")
}

#[test]
fn every_variable_is_exported_and_names_what_exists() {
    let domain = Domain::from_env();
    for file in ["KRB5_CONFIG", "VMGATE_LDAP_CA", "VMGATE_LDAP_PASSWORD_FILE"] {
        let path = Path::new(domain.var(file));
        assert!(path.is_file(), "{file}={} is not a file", path.display());
    }
    assert!(domain.test_dir().join("passwords").is_file());
    assert!(
        domain.log().is_file(),
        "no KDC log at {}",
        domain.log().display()
    );
    assert_eq!(domain.realm(), "LAB.EXAMPLE.TEST");
    assert_eq!(domain.var("VMGATE_BASE_DN"), "DC=lab,DC=example,DC=test");
    assert_eq!(
        domain.var("VMGATE_LDAP_URL"),
        format!("ldaps://{}", domain.var("VMGATE_DC_IP"))
    );
    let ip: std::net::Ipv4Addr = domain.var("VMGATE_DC_IP").parse().expect("an IPv4 address");
    assert!(ip.is_loopback(), "the DC must listen on loopback, not {ip}");

    // The LDAP password file holds exactly the Administrator password (no newline).
    let ldap_password = std::fs::read_to_string(domain.var("VMGATE_LDAP_PASSWORD_FILE"))
        .expect("the LDAP password file");
    assert_eq!(ldap_password, domain.password("Administrator"));

    // Secrets are readable by their owner only.
    use std::os::unix::fs::PermissionsExt;
    for secret in [
        domain.test_dir().join("passwords"),
        PathBuf::from(domain.var("VMGATE_LDAP_PASSWORD_FILE")),
        domain.keytab("hv1"),
        domain.keytab("hv2"),
        domain.keytab("hv3"),
    ] {
        let mode = std::fs::metadata(&secret)
            .unwrap_or_else(|e| panic!("{}: {e}", secret.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", secret.display());
    }
}

#[test]
fn alice_gets_a_ticket_that_hv2s_keytab_decrypts() {
    let domain = Domain::from_env();
    let dir = ccache_dir();
    let ccache = dir.path().join("alice");
    domain.kinit(&ccache, "alice");

    let keytab = domain.keytab("hv2");
    let keytab = keytab.to_str().expect("a UTF-8 path");
    // Fetches HOST/hv2.lab.example.test for alice and decrypts it with hv2's keytab.
    let out = domain.run(
        &ccache,
        "kvno",
        &["-k", keytab, "HOST/hv2.lab.example.test"],
        None,
    );
    assert!(out.contains("keytab entry valid"), "kvno -k said: {out}");

    // hv1's keytab must not decrypt a ticket for hv2.
    let wrong = domain.keytab("hv1");
    let wrong = wrong.to_str().expect("a UTF-8 path");
    let output = domain.try_run(
        &ccache,
        "kvno",
        &["-k", wrong, "HOST/hv2.lab.example.test"],
        None,
    );
    assert!(
        !output.status.success(),
        "hv1's keytab decrypted a ticket for hv2"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Wrong principal in request"),
        "unexpected kvno failure: {stderr}"
    );

    // alice's tickets are forwardable (the private krb5.conf asks for it; delegation needs it).
    let tgt = tgt_flags(&domain.run(&ccache, "klist", &["-f"], None));
    assert!(
        tgt.contains('F'),
        "alice's TGT is not forwardable (flags {tgt})"
    );
}

#[test]
fn bob_is_sensitive_and_his_tickets_are_not_forwardable() {
    let domain = Domain::from_env();
    let uac = domain.attribute("(sAMAccountName=bob)", "userAccountControl");
    let uac: u32 = uac
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bob's userAccountControl is {uac:?}"));
    assert_ne!(uac & NOT_DELEGATED, 0, "bob is not NOT_DELEGATED: {uac:#x}");

    let dir = ccache_dir();
    let ccache = dir.path().join("bob");
    domain.kinit(&ccache, "bob");
    let tgt = tgt_flags(&domain.run(&ccache, "klist", &["-f"], None));
    assert!(!tgt.contains('F'), "bob's TGT is forwardable (flags {tgt})");
}

#[test]
fn host_keytabs_hold_aes_keys_for_the_account_and_both_spns() {
    let domain = Domain::from_env();
    let realm = domain.realm().to_owned();
    let dir = ccache_dir();
    for n in 1..=3 {
        let keytab = domain.keytab(&format!("hv{n}"));
        let keytab = keytab.to_str().expect("a UTF-8 path");
        let listing = domain.run(&dir.path().join("unused"), "klist", &["-ke", keytab], None);
        for principal in [
            format!("hv{n}$@{realm}"),
            format!("HOST/hv{n}@{realm}"),
            format!("HOST/hv{n}.lab.example.test@{realm}"),
        ] {
            for enctype in ["aes256-cts-hmac-sha1-96", "aes128-cts-hmac-sha1-96"] {
                let entry = format!(" {principal} ({enctype})");
                assert!(
                    listing.contains(&entry),
                    "{keytab} lacks{entry}:\n{listing}"
                );
            }
        }
        // Nothing of another host.
        for other in (1..=3).filter(|m| *m != n) {
            assert!(
                !listing.contains(&format!("hv{other}")),
                "{keytab}:\n{listing}"
            );
        }
    }
}

#[test]
fn hyper_v_administrators_holds_alice_and_bob_but_not_carol() {
    let domain = Domain::from_env();
    let base = domain.var("VMGATE_BASE_DN");
    let members = domain.attribute(
        "(&(objectClass=group)(cn=Hyper-V Administrators))",
        "member",
    );
    let mut members: Vec<String> = members.iter().map(|m| m.to_ascii_lowercase()).collect();
    members.sort();
    let expected: Vec<String> = ["alice", "bob"]
        .iter()
        .map(|u| format!("cn={u},cn=users,{base}").to_ascii_lowercase())
        .collect();
    assert_eq!(members, expected);

    let carol = domain.attribute("(sAMAccountName=carol)", "memberOf");
    assert!(carol.is_empty(), "carol is in {carol:?}");
    // carol can still log on (she exists and has a password).
    let dir = ccache_dir();
    domain.kinit(&dir.path().join("carol"), "carol");
}

#[test]
fn ldaps_is_verified_against_the_exported_ca_only() {
    let domain = Domain::from_env();
    let filter = "(sAMAccountName=hv2$)";
    let good = domain.ldapsearch(domain.var("VMGATE_LDAP_CA"), filter, &["dNSHostName"]);
    assert!(
        good.status.success(),
        "LDAPS with the exported CA failed: {}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("dNSHostName: hv2.lab.example.test"));

    // A CA the DC's certificate does not chain to must make the search fail.
    let dir = tempfile::tempdir().expect("a temporary folder");
    let other = dir.path().join("other-ca.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=some other CA",
            "-keyout",
        ])
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let bad = domain.ldapsearch(
        other.to_str().expect("a UTF-8 path"),
        filter,
        &["dNSHostName"],
    );
    assert!(
        !bad.status.success(),
        "LDAPS verified against an unrelated CA"
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("Can't contact LDAP server"),
        "unexpected failure: {stderr}"
    );
}
