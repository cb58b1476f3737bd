//! `vmgate delegation` against the real Samba test domain (tests/domain/up, run by tests/run).
//!
//! For each case of constrained delegation between the test hosts, `check` predicts the outcome
//! from the directory and `check --live` asks the KDC for real with the source host's keytab
//! (S4U2Self + S4U2Proxy, or the user's own ticket as evidence); the two must agree, and the
//! fix `check` prints, applied as printed, must make the next `check --live` pass.
//!
//! The tests change HV1$, HV2$, HV3$ and bob: they hold a process-wide lock, start from a known
//! baseline, and restore what they changed when they end (also when they fail).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde_json::Value;
use vmgate_auth::Secret;
use vmgate_auth::directory::{Bind, Change, Directory, DirectoryConfig};

const MIG: &str = "Microsoft Virtual System Migration Service";
const SPN_ATTR: &str = "servicePrincipalName";
const A2D2: &str = "msDS-AllowedToDelegateTo";
const UAC: &str = "userAccountControl";
const WORKSTATION: &str = "4096";
const WORKSTATION_ANY_PROTOCOL: &str = "16781312";

/// The test domain, from the variables tests/domain/up prints.
struct Domain {
    test_dir: PathBuf,
    domain_dir: PathBuf,
    realm: String,
    base_dn: String,
    dns_domain: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the Samba test domain; run them through \
             tests/run (or eval \"$(tests/domain/up)\" first)"
        )
    })
}

fn domain() -> &'static Domain {
    static D: OnceLock<Domain> = OnceLock::new();
    D.get_or_init(|| {
        for v in [
            "VMGATE_LDAP_URL",
            "VMGATE_LDAP_CA",
            "VMGATE_LDAP_BIND_USER",
            "VMGATE_LDAP_PASSWORD_FILE",
            "KRB5_CONFIG",
        ] {
            var(v);
        }
        let realm = var("VMGATE_REALM");
        Domain {
            test_dir: PathBuf::from(var("VMGATE_TEST_DIR")),
            domain_dir: PathBuf::from(var("VMGATE_DOMAIN_DIR")),
            dns_domain: realm.to_ascii_lowercase(),
            realm,
            base_dn: var("VMGATE_BASE_DN"),
        }
    })
}

fn keytab(host: &str) -> String {
    domain()
        .test_dir
        .join("keytabs")
        .join(format!("{host}.keytab"))
        .display()
        .to_string()
}

fn password_of(user: &str) -> String {
    let text = std::fs::read_to_string(domain().test_dir.join("passwords")).unwrap();
    let prefix = format!("{user}@");
    text.lines()
        .find_map(|l| {
            let (p, pw) = l.split_once(' ')?;
            p.to_ascii_lowercase()
                .starts_with(&prefix)
                .then(|| pw.to_owned())
        })
        .unwrap_or_else(|| panic!("no password for {user} in the passwords file"))
}

fn admin() -> Directory {
    let password = std::fs::read_to_string(var("VMGATE_LDAP_PASSWORD_FILE")).unwrap();
    let config = DirectoryConfig::new(
        var("VMGATE_LDAP_URL"),
        Some(PathBuf::from(var("VMGATE_LDAP_CA"))),
        Bind::Simple {
            user: var("VMGATE_LDAP_BIND_USER"),
            password: Secret::new(password.trim_end()),
        },
    );
    Directory::connect(&config).expect("bind as the test domain's administrator")
}

fn dn_of(cn: &str) -> String {
    let container = if cn.starts_with("HV") {
        "Computers"
    } else {
        "Users"
    };
    format!("CN={cn},CN={container},{}", domain().base_dn)
}

/// The migration SPNs of host `h` (FQDN form, short form).
fn mig(h: &str) -> [String; 2] {
    [
        format!("{MIG}/{h}.{}", domain().dns_domain),
        format!("{MIG}/{h}"),
    ]
}

/// An SPN and its Samba twin.
fn with_twin(spn: &str) -> Vec<String> {
    let mut v = vec![spn.to_owned()];
    if spn.contains(' ') {
        v.push(spn.replace(' ', "\\ "));
    }
    v
}

static LOCK: Mutex<()> = Mutex::new(());

/// The attributes the tests change, per account, as they were before.
type Snapshot = Vec<(String, Vec<(&'static str, Vec<String>)>)>;

/// Exclusive use of the test hosts, from a known baseline, restored on drop.
struct Lab {
    dir: Directory,
    snapshot: Snapshot,
    tmp: tempfile::TempDir,
    /// Whether the test let HV1$ delegate to HV3$ by resource-based delegation.
    rbcd: std::cell::Cell<bool>,
    /// Whether the test made "Hyper-V Administrators" a member of Protected Users.
    protected: std::cell::Cell<bool>,
    _lock: MutexGuard<'static, ()>,
}

/// `samba-tool delegation OP hv3$ hv1$` on the DC's database: Samba 4.17 lets only the system
/// write msDS-AllowedToActOnBehalfOfOtherIdentity, which samba-tool does locally.
fn rbcd_principal(op: &str) -> Output {
    Command::new("samba-tool")
        .args(["delegation", op, "hv3$", "hv1$", "-H"])
        .arg(domain().domain_dir.join("private/sam.ldb"))
        .output()
        .expect("run samba-tool")
}

impl Lab {
    /// Baseline: HV2$ holds its migration SPNs (with twins); HV1$ may delegate to both with
    /// "Kerberos only"; HV3$ has no delegation and no migration SPNs; bob stays sensitive.
    fn new() -> Lab {
        let lock = LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = admin();
        let mut snapshot = Vec::new();
        for cn in ["HV3", "HV2", "HV1", "bob"] {
            let dn = dn_of(cn);
            let entry = dir
                .read(&dn, &[SPN_ATTR, A2D2, UAC])
                .unwrap()
                .unwrap_or_else(|| panic!("{dn} is missing from the test domain"));
            snapshot.push((
                dn,
                [SPN_ATTR, A2D2, UAC]
                    .into_iter()
                    .map(|a| (a, entry.values(a).to_vec()))
                    .collect(),
            ));
        }
        let lab = Lab {
            dir,
            snapshot,
            tmp: tempfile::tempdir().unwrap(),
            rbcd: std::cell::Cell::new(false),
            protected: std::cell::Cell::new(false),
            _lock: lock,
        };
        let d = domain();
        let host_spns = |h: &str| vec![format!("HOST/{h}"), format!("HOST/{h}.{}", d.dns_domain)];
        lab.set("HV3", SPN_ATTR, host_spns("hv3"));
        lab.set("HV3", A2D2, vec![]);
        lab.set("HV3", UAC, vec![WORKSTATION.into()]);
        let mut hv2 = host_spns("hv2");
        hv2.extend(mig("hv2").iter().flat_map(|s| with_twin(s)));
        lab.set("HV2", SPN_ATTR, hv2);
        lab.set("HV2", A2D2, vec![]);
        lab.set("HV2", UAC, vec![WORKSTATION.into()]);
        lab.set(
            "HV1",
            A2D2,
            mig("hv2").iter().flat_map(|s| with_twin(s)).collect(),
        );
        lab.set("HV1", UAC, vec![WORKSTATION.into()]);
        lab
    }

    fn set(&self, cn: &str, attr: &str, values: Vec<String>) {
        self.dir
            .modify(&dn_of(cn), vec![Change::Replace(attr.to_owned(), values)])
            .unwrap_or_else(|e| panic!("set {attr} of {cn}: {e}"));
    }

    fn values(&self, cn: &str, attr: &str) -> Vec<String> {
        let mut v = self
            .dir
            .read(&dn_of(cn), &[attr])
            .unwrap()
            .map(|e| e.values(attr).to_vec())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A fresh credential cache with `user`'s TGT, from kinit.
    fn kinit(&self, user: &str) -> String {
        let cc = self.tmp.path().join(format!("{user}.ccache"));
        let mut child = Command::new("kinit")
            .arg(format!("{user}@{}", domain().realm))
            .env("KRB5CCNAME", format!("FILE:{}", cc.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run kinit");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password_of(user).as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "kinit {user} failed");
        cc.display().to_string()
    }

    /// A file with `user`'s password, for binding as them.
    fn password_file(&self, user: &str) -> String {
        let p = self.tmp.path().join(format!("{user}.password"));
        std::fs::write(&p, password_of(user)).unwrap();
        p.display().to_string()
    }

    /// Puts the plain SPN and its twin on an account behind samldb's uniqueness check (Samba
    /// refuses duplicate SPNs over LDAP, Windows domains still have them): an LDIF written
    /// straight into the domain partition with ldbmodify.
    fn force_spn(&self, cn: &str, spn: &str) {
        let d = domain();
        let ldif = self.tmp.path().join("dup.ldif");
        let mut text = format!("dn: {}\nchangetype: modify\nadd: {SPN_ATTR}\n", dn_of(cn));
        for v in with_twin(spn) {
            text.push_str(&format!("{SPN_ATTR}: {v}\n"));
        }
        text.push_str("-\n\n");
        std::fs::write(&ldif, text).unwrap();
        let partition = d
            .domain_dir
            .join("private/sam.ldb.d")
            .join(format!("{}.ldb", d.base_dn.to_ascii_uppercase()));
        let out = Command::new("ldbmodify")
            .arg("-H")
            .arg(format!("tdb://{}", partition.display()))
            .arg(&ldif)
            .output()
            .expect("run ldbmodify");
        assert!(out.status.success(), "ldbmodify: {}", text_of(&out));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The one resource-based delegation a test writes (tests/domain/up writes none).
        if self.rbcd.get() {
            let out = rbcd_principal("del-principal");
            if !out.status.success() {
                eprintln!("could not remove the RBCD entry: {}", text_of(&out));
            }
        }
        if self.protected.get() {
            if let Err(e) = self.dir.modify(
                &protected_users_dn(),
                vec![Change::Delete("member".into(), vec![hyperv_admins_dn()])],
            ) {
                eprintln!("could not restore Protected Users: {e}");
            }
        }
        for (dn, attrs) in &self.snapshot {
            for (attr, values) in attrs {
                if let Err(e) = self.dir.modify(
                    dn,
                    vec![Change::Replace((*attr).to_owned(), values.clone())],
                ) {
                    eprintln!("could not restore {attr} of {dn}: {e}");
                }
            }
        }
    }
}

fn protected_users_dn() -> String {
    format!("CN=Protected Users,CN=Users,{}", domain().base_dn)
}

fn hyperv_admins_dn() -> String {
    format!("CN=Hyper-V Administrators,CN=Users,{}", domain().base_dn)
}

fn text_of(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .expect("run the binary")
}

fn vmgate(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_vmgate"), args)
}

/// `vmgate delegation ARGS --json`: the exit code and the parsed output.
fn delegation_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["delegation", "--json"];
    all.extend_from_slice(args);
    let out = vmgate(&all);
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text_of(&out)));
    (out.status.code().unwrap_or(-1), json)
}

/// The arguments of `check --from S --to D --user U` plus `extra`, with `--live` and S's
/// keytab (and D's, so the test also sees that D can decrypt the ticket).
fn check_live(from: &str, to: &str, user: &str, extra: &[&str]) -> (i32, Value) {
    let kt = keytab(from);
    let target_kt = keytab(to);
    let mut args = vec![
        "check",
        "--from",
        from,
        "--to",
        to,
        "--user",
        user,
        "--live",
        "--keytab",
        &kt,
        "--target-keytab",
        &target_kt,
    ];
    args.extend_from_slice(extra);
    delegation_json(&args)
}

fn unmet(report: &Value) -> Vec<String> {
    report["verdict"]["requirements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["met"] == false)
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The KDC's answers of the live check, one per SPN.
fn kdc_answers(report: &Value) -> Vec<String> {
    report["live"]["outcomes"]
        .as_array()
        .unwrap_or_else(|| panic!("no live outcomes in {report:#}"))
        .iter()
        .map(|o| o["actual"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts a failed check: the Windows code of the move's error, the unmet requirements, the
/// KDC's answer to every SPN, and that prediction and KDC agree.
fn assert_refused(code: i32, report: &Value, win: &str, ids: &[&str], kdc: &str) {
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["verdict"]["error"]["code"], win, "{report:#}");
    assert_eq!(unmet(report), ids, "{report:#}");
    assert_eq!(kdc_answers(report), vec![kdc, kdc], "{report:#}");
    assert_eq!(
        report["live"]["agrees"], true,
        "prediction and KDC differ: {report:#}"
    );
}

fn assert_passes(code: i32, report: &Value) {
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert!(unmet(report).is_empty(), "{report:#}");
    assert_eq!(kdc_answers(report), vec!["ok", "ok"], "{report:#}");
    assert_eq!(report["live"]["agrees"], true, "{report:#}");
}

/// Splits a command line as a POSIX shell would for the words the fixes use (double quotes,
/// backslash escapes inside them).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Runs every fix the report prints, exactly as printed (alternatives starting with "or " are
/// skipped); returns the commands run.
fn apply_fixes(report: &Value) -> Vec<String> {
    let mut ran = Vec::new();
    for fix in report["verdict"]["fixes"].as_array().unwrap() {
        for line in fix.as_str().unwrap().lines() {
            if line.starts_with("or ") {
                continue;
            }
            let words = shell_words(line);
            let (bin, args) = match words.split_first() {
                Some((b, a)) if b == "vmgate" => (env!("CARGO_BIN_EXE_vmgate"), a),
                Some((b, a)) if b == "setspn" => (env!("CARGO_BIN_EXE_setspn"), a),
                _ => panic!("a fix that is not a vmgate or setspn command: {line}"),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(bin, &args);
            assert!(
                out.status.success(),
                "fix `{line}` failed:\n{}",
                text_of(&out)
            );
            ran.push(line.to_owned());
        }
    }
    ran
}

#[test]
fn protocol_transition_is_needed_without_a_user_ticket_and_the_fix_works() {
    let lab = Lab::new();
    // "Kerberos only", and hv1 holds no ticket from alice: S4U2Self, then S4U2Proxy.
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_refused(
        code,
        &report,
        "0x8009030E",
        &["protocol-transition"],
        "KDC_ERR_BADOPTION",
    );
    let cause = report["verdict"]["error"]["cause"].as_str().unwrap();
    assert!(
        cause.contains("hv1 holds no Kerberos ticket from alice")
            && cause.contains("HV1$ may delegate with \"Kerberos only\"")
            && cause.contains("protocol transition"),
        "{cause}"
    );
    assert_eq!(report["live"]["path"], "protocol-transition");
    assert_eq!(
        apply_fixes(&report),
        vec!["vmgate delegation for-any-protocol hv1 on"]
    );
    assert_eq!(lab.values("HV1", UAC), vec![WORKSTATION_ANY_PROTOCOL]);
    // Allowed with any protocol: the same check passes, and hv2 decrypts a ticket for alice.
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_passes(code, &report);
    // Text output names the exchange and the result.
    let kt = keytab("hv1");
    let out = vmgate(&[
        "delegation",
        "check",
        "--from",
        "hv1",
        "--to",
        "hv2",
        "--user",
        "alice",
        "--no-user-ticket",
        "--live",
        "--keytab",
        &kt,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text_of(&out));
    assert!(text.contains("S4U2Self, then S4U2Proxy"), "{text}");
    assert!(text.contains("Result: every requirement is met."), "{text}");
}

#[test]
fn kerberos_only_is_enough_with_the_users_forwardable_ticket() {
    let lab = Lab::new();
    let cc = lab.kinit("alice");
    let (code, report) = check_live("hv1", "hv2", "alice", &["--remote", "--user-ccache", &cc]);
    assert_passes(code, &report);
    assert_eq!(report["live"]["path"], "evidence");
    let pt = report["verdict"]["requirements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "protocol-transition")
        .unwrap();
    assert!(
        pt["description"]
            .as_str()
            .unwrap()
            .contains("\"Kerberos only\" is enough"),
        "{pt}"
    );
}

#[test]
fn target_not_listed_is_refused_until_added() {
    let lab = Lab::new();
    lab.set("HV1", A2D2, vec!["cifs/hv3".into()]);
    let cc = lab.kinit("alice");
    let (code, report) = check_live("hv1", "hv2", "alice", &["--remote", "--user-ccache", &cc]);
    assert_refused(
        code,
        &report,
        "0x8009030E",
        &["source-may-delegate"],
        "KDC_ERR_BADOPTION",
    );
    let [fqdn, short] = mig("hv2");
    assert_eq!(
        report["verdict"]["error"]["cause"],
        format!(
            "hv1 may not delegate alice's credentials to \"{fqdn}\" and \"{short}\" \
             (msDS-AllowedToDelegateTo on HV1$ does not list it)"
        )
    );
    assert_eq!(
        apply_fixes(&report),
        vec![format!(
            "vmgate delegation add-service hv1 \"{fqdn}\" \"{short}\""
        )]
    );
    // Plain forms and Samba twins were written.
    let mut expected: Vec<String> = vec!["cifs/hv3".into()];
    expected.extend(mig("hv2").iter().flat_map(|s| with_twin(s)));
    expected.sort();
    assert_eq!(lab.values("HV1", A2D2), expected);
    let cc = lab.kinit("alice");
    let (code, report) = check_live("hv1", "hv2", "alice", &["--remote", "--user-ccache", &cc]);
    assert_passes(code, &report);
}

#[test]
fn a_sensitive_user_is_refused_naming_the_flag() {
    let lab = Lab::new();
    lab.set("HV1", UAC, vec![WORKSTATION_ANY_PROTOCOL.into()]);
    // Protocol transition for bob.
    let (code, report) = check_live("hv1", "hv2", "bob", &["--no-user-ticket"]);
    assert_refused(
        code,
        &report,
        "0x8009030E",
        &["user-not-sensitive"],
        "KDC_ERR_BADOPTION",
    );
    let cause = report["verdict"]["error"]["cause"].as_str().unwrap();
    assert!(
        cause.contains("bob's account is marked \"Account is sensitive and cannot be delegated\"")
            && cause.contains("NOT_DELEGATED"),
        "{cause}"
    );
    // bob's own (non-forwardable) ticket as evidence: refused too, as predicted.
    let cc = lab.kinit("bob");
    let (code, report) = check_live("hv1", "hv2", "bob", &["--remote", "--user-ccache", &cc]);
    assert_eq!(code, 1);
    assert_eq!(report["live"]["agrees"], true, "{report:#}");
    assert_eq!(report["live"]["ok"], false, "{report:#}");
    // The fix, then the check passes (bob is made sensitive again when the lab is dropped).
    let (_, report) = check_live("hv1", "hv2", "bob", &["--no-user-ticket"]);
    assert_eq!(
        apply_fixes(&report),
        vec!["vmgate delegation sensitive bob off"]
    );
    let (code, report) = check_live("hv1", "hv2", "bob", &["--no-user-ticket"]);
    assert_passes(code, &report);
    drop(lab);
    assert_eq!(
        admin()
            .read(&dn_of("bob"), &[UAC])
            .unwrap()
            .unwrap()
            .first(UAC)
            .and_then(|v| v.parse::<u32>().ok())
            .map(|v| v & 0x10_0000),
        Some(0x10_0000),
        "bob is sensitive again"
    );
}

#[test]
fn no_delegation_then_allow_migration_then_del_service() {
    let lab = Lab::new();
    let cc = lab.kinit("alice");
    let remote = ["--remote", "--user-ccache", cc.as_str()];
    let (code, report) = check_live("hv3", "hv2", "alice", &remote);
    assert_refused(
        code,
        &report,
        "0x8009030E",
        &["source-may-delegate"],
        "KDC_ERR_BADOPTION",
    );
    assert!(
        report["verdict"]["error"]["cause"]
            .as_str()
            .unwrap()
            .contains("HV3$ has no msDS-AllowedToDelegateTo"),
        "{report:#}"
    );

    let (code, changes) = delegation_json(&["allow-migration", "--from", "hv3", "--to", "hv2"]);
    assert_eq!(code, 0, "{changes:#}");
    let fqdn = format!("hv2.{}", domain().dns_domain);
    let wanted = [
        format!("{MIG}/{fqdn}"),
        format!("{MIG}/hv2"),
        format!("cifs/{fqdn}"),
        "cifs/hv2".to_owned(),
    ];
    let listed: Vec<&str> = changes[0]["allowed_to_delegate_to"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spn"].as_str().unwrap())
        .collect();
    let mut sorted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    sorted.sort_by_key(|s| s.to_lowercase());
    assert_eq!(listed, sorted, "sorted, twins collapsed");
    let mut stored: Vec<String> = wanted.iter().flat_map(|s| with_twin(s)).collect();
    stored.sort();
    assert_eq!(lab.values("HV3", A2D2), stored);
    assert_eq!(lab.values("HV3", UAC), vec![WORKSTATION], "Kerberos only");

    let cc = lab.kinit("alice");
    let remote = ["--remote", "--user-ccache", cc.as_str()];
    let (code, report) = check_live("hv3", "hv2", "alice", &remote);
    assert_passes(code, &report);

    // show lists the four entries, twins collapsed, with where each SPN exists.
    let (code, show) = delegation_json(&["show", "hv3"]);
    assert_eq!(code, 0);
    let entries = show["allowed_to_delegate_to"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{show:#}");
    for e in entries {
        assert_eq!(e["holders"], serde_json::json!(["HV2$"]), "{e}");
        assert_eq!(e["effective"], true);
        let via = e["via_alias"].as_str();
        match e["spn"].as_str().unwrap() {
            "cifs/hv2" => assert_eq!(via, Some("host/hv2"), "cifs/ exists through HOST/"),
            s if s.starts_with("cifs/") => assert_eq!(via, Some(&*format!("host/{fqdn}"))),
            _ => assert_eq!(via, None, "{e}"),
        }
    }

    // del-service undoes it: nothing left, and the check fails as before.
    let args: Vec<&str> = ["del-service", "hv3"]
        .into_iter()
        .chain(wanted.iter().map(String::as_str))
        .collect();
    let (code, changes) = delegation_json(&args);
    assert_eq!(code, 0, "{changes:#}");
    assert_eq!(
        changes[0]["removed"].as_array().unwrap().len(),
        6,
        "{changes:#}"
    );
    assert!(lab.values("HV3", A2D2).is_empty());
    let (code, report) = check_live("hv3", "hv2", "alice", &remote);
    assert_refused(
        code,
        &report,
        "0x8009030E",
        &["source-may-delegate"],
        "KDC_ERR_BADOPTION",
    );

    // With --any-protocol the S4U2Self path passes too.
    let (code, _) = delegation_json(&[
        "allow-migration",
        "--from",
        "hv3",
        "--to",
        "hv2",
        "--any-protocol",
    ]);
    assert_eq!(code, 0);
    assert_eq!(lab.values("HV3", UAC), vec![WORKSTATION_ANY_PROTOCOL]);
    let (code, report) = check_live("hv3", "hv2", "alice", &["--no-user-ticket"]);
    assert_passes(code, &report);
}

#[test]
fn a_missing_target_spn_is_target_unknown() {
    let lab = Lab::new();
    lab.set("HV1", UAC, vec![WORKSTATION_ANY_PROTOCOL.into()]);
    let d = domain();
    lab.set(
        "HV2",
        SPN_ATTR,
        vec!["HOST/hv2".into(), format!("HOST/hv2.{}", d.dns_domain)],
    );
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_refused(
        code,
        &report,
        "0x80090303",
        &["target-spn-fqdn", "target-spn-short"],
        "KDC_ERR_S_PRINCIPAL_UNKNOWN",
    );
    let [fqdn, short] = mig("hv2");
    assert_eq!(
        apply_fixes(&report),
        vec![
            format!("setspn -S \"{fqdn}\" HV2"),
            format!("setspn -S \"{short}\" HV2")
        ]
    );
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_passes(code, &report);
}

#[test]
fn a_duplicated_target_spn_is_wrong_principal() {
    let lab = Lab::new();
    lab.set("HV1", UAC, vec![WORKSTATION_ANY_PROTOCOL.into()]);
    let [fqdn, _] = mig("hv2");
    lab.force_spn("HV3", &fqdn);
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        report["verdict"]["error"]["code"], "0x80090322",
        "{report:#}"
    );
    assert_eq!(unmet(&report), vec!["target-spn-fqdn"]);
    assert!(
        report["verdict"]["error"]["cause"]
            .as_str()
            .unwrap()
            .contains("is registered on 2 accounts (HV2$, HV3$)"),
        "{report:#}"
    );
    // Samba's KDC refuses to choose between the two accounts; the short form still works.
    assert_eq!(
        kdc_answers(&report),
        vec!["KDC_ERR_S_PRINCIPAL_UNKNOWN", "ok"],
        "{report:#}"
    );
    assert_eq!(report["live"]["agrees"], true, "{report:#}");
    assert_eq!(
        apply_fixes(&report),
        vec![format!("setspn -D \"{fqdn}\" HV3")]
    );
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_passes(code, &report);
}

#[test]
fn protected_users_membership_is_found_through_nested_groups() {
    let lab = Lab::new();
    lab.set("HV1", UAC, vec![WORKSTATION_ANY_PROTOCOL.into()]);
    // alice is in "Hyper-V Administrators"; that group becomes a member of Protected Users.
    lab.protected.set(true);
    lab.dir
        .modify(
            &protected_users_dn(),
            vec![Change::Add("member".into(), vec![hyperv_admins_dn()])],
        )
        .unwrap();
    let (code, report) = check_live("hv1", "hv2", "alice", &["--no-user-ticket"]);
    assert_eq!(
        report["facts"]["user"]["protected_users"], true,
        "{report:#}"
    );
    // Prediction and KDC agree whichever way this DC treats the group.
    assert_eq!(report["live"]["agrees"], true, "{report:#}");
    let req = report["verdict"]["requirements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "user-not-protected")
        .unwrap()
        .clone();
    if report["facts"]["protected_users_enforced"] == true {
        assert_refused(
            code,
            &report,
            "0x8009030E",
            &["user-not-protected"],
            "KDC_ERR_BADOPTION",
        );
        assert!(
            req["diagnosis"]["cause"]
                .as_str()
                .unwrap()
                .contains("alice is a member of Protected Users"),
            "{req}"
        );
    } else {
        // Samba before 4.19 delegates members of Protected Users anyway; check says so.
        assert_passes(code, &report);
        assert!(
            req["description"]
                .as_str()
                .unwrap()
                .contains("does not enforce the group"),
            "{req}"
        );
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let lab = Lab::new();
    let before = (lab.values("HV1", A2D2), lab.values("HV1", UAC));

    let out = vmgate(&["delegation", "show", "hv9"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("there is no account named hv9 in the domain"),
        "{}",
        text_of(&out)
    );

    let out = vmgate(&["delegation", "check", "--from", "hv9", "--to", "hv2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("there is no computer account for host hv9 in the domain"),
        "{}",
        text_of(&out)
    );
    let (code, json) =
        delegation_json(&["check", "--from", "hv1", "--to", "hv2", "--user", "nobody"]);
    assert_eq!(code, 3, "{json:#}");
    assert_eq!(
        json["error"],
        "there is no account named nobody in the domain"
    );

    let out = vmgate(&["delegation", "add-service", "hv1", "cifs/hv2", "not an spn"]);
    assert_eq!(out.status.code(), Some(2), "{}", text_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"not an spn\" is not an SPN"),
        "{}",
        text_of(&out)
    );
    let out = vmgate(&["delegation", "del-service", "hv1", "cifs/never-listed"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    let out = vmgate(&[
        "delegation",
        "allow-migration",
        "--from",
        "hv1",
        "--to",
        "hv1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text_of(&out));
    let out = vmgate(&[
        "delegation",
        "allow-migration",
        "--from",
        "hv1",
        "--to",
        "hv9",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));

    // carol may bind but not change delegation.
    let pw = lab.password_file("carol");
    for args in [
        vec!["add-service", "hv1", "cifs/hv3"],
        vec!["for-any-protocol", "hv1", "on"],
        vec![
            "allow-migration",
            "--from",
            "hv1",
            "--to",
            "hv3",
            "--any-protocol",
        ],
    ] {
        let mut all = vec![
            "delegation",
            "--bind-user",
            "carol",
            "--password-file",
            pw.as_str(),
        ];
        all.extend(args);
        let out = vmgate(&all);
        assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("was denied by the directory"), "{err}");
        assert!(err.contains("0x80070005"), "{err}");
    }
    assert_eq!((lab.values("HV1", A2D2), lab.values("HV1", UAC)), before);
    assert!(lab.values("HV3", A2D2).is_empty());
}

#[test]
fn show_and_find_report_every_kind_of_delegation() {
    let lab = Lab::new();
    lab.set("HV1", UAC, vec![WORKSTATION_ANY_PROTOCOL.into()]);
    let mut a2d2: Vec<String> = mig("hv2").iter().flat_map(|s| with_twin(s)).collect();
    a2d2.push("cifs/hv2".into());
    a2d2.push("HTTP/nowhere.example.test".into());
    lab.set("HV1", A2D2, a2d2);
    // Resource-based delegation: HV1$ may delegate to HV3$ (written by samba-tool).
    lab.rbcd.set(true);
    let out = rbcd_principal("add-principal");
    assert!(out.status.success(), "samba-tool: {}", text_of(&out));

    let (code, show) = delegation_json(&["show", "HV1$"]);
    assert_eq!(code, 0, "{show:#}");
    assert_eq!(show["protocol_transition"], true);
    assert_eq!(show["unconstrained"], false);
    assert_eq!(show["sensitive"], false);
    let entries = show["allowed_to_delegate_to"].as_array().unwrap();
    let summary: Vec<(String, Value)> = entries
        .iter()
        .map(|e| (e["spn"].as_str().unwrap().to_owned(), e["holders"].clone()))
        .collect();
    let [fqdn, short] = mig("hv2");
    assert_eq!(
        summary,
        vec![
            ("cifs/hv2".to_owned(), serde_json::json!(["HV2$"])),
            (
                "HTTP/nowhere.example.test".to_owned(),
                serde_json::json!([])
            ),
            (short, serde_json::json!(["HV2$"])),
            (fqdn.clone(), serde_json::json!(["HV2$"])),
        ],
        "sorted, twins collapsed, with where each SPN exists"
    );

    let (code, show) = delegation_json(&["show", "hv3"]);
    assert_eq!(code, 0);
    assert_eq!(show["resource_based"][0]["account"], "HV1$", "{show:#}");
    assert!(
        show["resource_based"][0]["sid"]
            .as_str()
            .unwrap()
            .starts_with("S-1-5-21-")
    );

    let (code, bob) = delegation_json(&["show", "bob"]);
    assert_eq!(code, 0);
    assert_eq!(
        (bob["kind"].as_str(), bob["sensitive"].as_bool()),
        (Some("user"), Some(true))
    );

    let (code, rows) = delegation_json(&["find"]);
    assert_eq!(code, 0, "{rows:#}");
    let rows: Vec<(String, String, String, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["account"].as_str().unwrap().to_owned(),
                r["delegation_type"].as_str().unwrap().to_owned(),
                r["rights_to"].as_str().unwrap_or("N/A").to_owned(),
                r["spn_exists"].to_string(),
            )
        })
        .collect();
    let has = |a: &str, t: &str, to: &str, exists: &str| {
        rows.contains(&(a.to_owned(), t.to_owned(), to.to_owned(), exists.to_owned()))
    };
    assert!(has("DC1$", "unconstrained", "N/A", "null"), "{rows:#?}");
    assert!(
        has(
            "HV1$",
            "constrained-with-protocol-transition",
            &fqdn,
            "true"
        ),
        "{rows:#?}"
    );
    assert!(
        has(
            "HV1$",
            "constrained-with-protocol-transition",
            "HTTP/nowhere.example.test",
            "false"
        ),
        "{rows:#?}"
    );
    assert!(has("HV1$", "resource-based", "HV3$", "null"), "{rows:#?}");
    // Twins are collapsed: each SPN appears once.
    assert_eq!(
        rows.iter().filter(|r| r.0 == "HV1$" && r.2 == fqdn).count(),
        1,
        "{rows:#?}"
    );

    // The text table has Impacket's columns.
    let out = vmgate(&["delegation", "find"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("AccountName  AccountType  DelegationType"),
        "{text}"
    );
    assert!(
        text.contains("Constrained w/ Protocol Transition"),
        "{text}"
    );
    assert!(text.contains("Resource-Based Constrained"), "{text}");
}

#[test]
fn shell_words_split_like_a_shell() {
    assert_eq!(
        shell_words(r#"setspn -S "Microsoft Virtual System Migration Service/hv2" HV2"#),
        vec![
            "setspn",
            "-S",
            "Microsoft Virtual System Migration Service/hv2",
            "HV2"
        ]
    );
    assert_eq!(shell_words(r#"a "b\"c" """#), vec!["a", "b\"c", ""]);
}

/// Keeps the keytab paths honest: the tests need the ones tests/domain/up exports.
#[test]
fn the_domain_has_the_keytabs() {
    for h in ["hv1", "hv2", "hv3"] {
        let kt = keytab(h);
        assert!(
            Path::new(&kt).is_file(),
            "{kt} is missing: run tests/domain/up"
        );
    }
}
