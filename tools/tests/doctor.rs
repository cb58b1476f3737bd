//! `vmgate doctor` against the real Samba test domain (tests/domain/up, run by tests/run).
//!
//! Each test builds its own healthy lab from uniquely named accounts — a source host S and a
//! destination host D (computer accounts with keys), D's migration SPNs with Samba's escaped
//! twins, S allowed to delegate to them ("Kerberos only"), and a user U in "Hyper-V
//! Administrators" — so the tests run in parallel without touching the shared HV accounts. Each
//! then breaks one thing, checks that the doctor fails on the right check with the right
//! Windows code and a fix, applies the printed fix as printed (`setspn` and `vmgate` lines as
//! they are — this machine is every host of the lab, so "on hv1: CMD" runs CMD here; a line
//! marked "on a domain controller: samba-tool ..." runs on this machine's test DC, with its
//! `-s smb.conf`, which a real DC finds by itself), and checks that the next run passes. The accounts are deleted when the test ends. These hosts run
//! no daemon (`--skip-daemon`); the daemon checks are tested with real vmgated hosts in
//! tests/moves.rs.

use vmgate_testkit::domain as common;

use std::path::{Path, PathBuf};

use common::{Domain, Outcome, TestAccount, unique_name};
use serde_json::Value;

const MIG: &str = "Microsoft Virtual System Migration Service";
const GROUP: &str = "Hyper-V Administrators";
const SPN_ATTR: &str = "servicePrincipalName";
const A2D2: &str = "msDS-AllowedToDelegateTo";

/// The escaped twin Samba's KDC looks SPNs with spaces up by.
fn twin(spn: &str) -> String {
    spn.replace(' ', "\\ ")
}

fn with_twin(spn: &str) -> [String; 2] {
    [spn.to_owned(), twin(spn)]
}

/// One test's own lab: S, D, U, healthy.
struct Lab {
    domain: Domain,
    s: TestAccount,
    d: TestAccount,
    u: TestAccount,
    tmp: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let domain = Domain::from_env();
        let s = domain.computer("ds");
        let d = domain.computer("dd");
        let u = domain.user("du");
        let lab = Lab {
            tmp: tempfile::tempdir().unwrap(),
            domain,
            s,
            d,
            u,
        };
        let host = |a: &TestAccount| {
            vec![
                format!("HOST/{}", a.name.to_lowercase()),
                format!("HOST/{}", a.fqdn),
            ]
        };
        let mut d_spns = host(&lab.d);
        for spn in lab.mig() {
            d_spns.extend(with_twin(&spn));
        }
        lab.d
            .dir
            .replace_values(&lab.d.dn, SPN_ATTR, &d_spns)
            .unwrap();
        lab.s
            .dir
            .replace_values(&lab.s.dn, SPN_ATTR, &host(&lab.s))
            .unwrap();
        let a2d2: Vec<String> = lab.mig().iter().flat_map(|s| with_twin(s)).collect();
        lab.s.dir.replace_values(&lab.s.dn, A2D2, &a2d2).unwrap();
        lab.u
            .dir
            .add_values(&lab.group_dn(), "member", std::slice::from_ref(&lab.u.dn))
            .unwrap();
        lab
    }

    fn group_dn(&self) -> String {
        format!("CN={GROUP},CN=Users,{}", self.domain.base_dn)
    }

    /// D's migration SPNs: FQDN form, short form.
    fn mig(&self) -> [String; 2] {
        [
            format!("{MIG}/{}", self.d.fqdn),
            format!("{MIG}/{}", self.d.name.to_lowercase()),
        ]
    }

    /// S's keytab, exported from the directory now.
    fn source_keytab(&self) -> PathBuf {
        let kt = self.tmp.path().join(format!("{}.keytab", self.s.name));
        let out = self
            .domain
            .export_keytab(&format!("{}$", self.s.name.to_lowercase()), &kt);
        assert_eq!(out.code, 0, "exportkeytab: {out}");
        kt
    }

    /// `vmgate doctor --from S --to D --user U` with addresses given, plus `extra`; `env` on
    /// top of the domain's; `wrap` runs it under another program (faketime).
    fn run(&self, extra: &[&str], env: &[(&str, &str)], wrap: &[&str]) -> Outcome {
        let vmgate = env!("CARGO_BIN_EXE_vmgate");
        let mut args: Vec<String> = wrap.iter().skip(1).map(|s| (*s).to_owned()).collect();
        if !wrap.is_empty() {
            args.push(vmgate.to_owned());
        }
        args.extend(
            [
                "doctor",
                "--from",
                &self.s.name,
                "--to",
                &self.d.name,
                "--user",
                &self.u.name,
                "--from-address",
                "127.0.0.21",
                "--to-address",
                "127.0.0.22",
                "--skip-daemon",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let program = wrap.first().copied().unwrap_or(vmgate);
        self.domain.run_with(program, &args, env, None)
    }

    /// The same with `--json`, parsed.
    fn json(&self, extra: &[&str], env: &[(&str, &str)], wrap: &[&str]) -> (Outcome, Value) {
        let mut e = extra.to_vec();
        e.push("--json");
        let out = self.run(&e, env, wrap);
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {out}"));
        (out, v)
    }

    /// Runs every command line of a printed fix (`setspn`, `vmgate`, and `samba-tool` marked
    /// "on a domain controller:"), in order, as printed; "on HOST: " in front of a command is
    /// this machine (every lab host is). Other lines (alternatives, notes) are not commands. A
    /// `samba-tool` line that is not marked as running on the DC fails the test: it would not
    /// work on the member host where it is printed.
    fn apply(&self, fix: &str) {
        let mut ran = 0;
        for line in fix.lines() {
            let (on_dc, line) = match line.strip_prefix("on a domain controller: ") {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let line = match line.strip_prefix("on ").and_then(|r| r.split_once(": ")) {
                Some((host, rest)) if !on_dc && !host.contains(' ') => rest,
                _ => line,
            };
            let words = shell_words(line);
            let Some((cmd, rest)) = words.split_first() else {
                continue;
            };
            let mut rest: Vec<String> = rest.to_vec();
            let program = match cmd.as_str() {
                "setspn" => env!("CARGO_BIN_EXE_setspn").to_owned(),
                "vmgate" => env!("CARGO_BIN_EXE_vmgate").to_owned(),
                "samba-tool" => {
                    assert!(on_dc, "a samba-tool fix not marked as a DC step: {line}");
                    rest.push("-s".into());
                    rest.push(self.domain.smb_conf().display().to_string());
                    "samba-tool".to_owned()
                }
                _ => continue,
            };
            let out = self.domain.run(&program, &rest);
            assert_eq!(out.code, 0, "the fix line `{line}` failed: {out}");
            ran += 1;
        }
        assert!(ran > 0, "no command in the fix:\n{fix}");
    }
}

/// POSIX shell words of one line: double quotes with backslash escapes, single quotes, and
/// backslash escapes outside quotes; stops at an unquoted `#` or a run of 2+ spaces followed
/// by `(` (the explanations the fixes put after a command).
fn shell_words(line: &str) -> Vec<String> {
    let line = match line.find("   (") {
        Some(i) => &line[..i],
        None => line,
    };
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                if !matches!(n, '"' | '\\' | '$' | '`') {
                                    cur.push('\\');
                                }
                                cur.push(n);
                            }
                        }
                        c => cur.push(c),
                    }
                }
            }
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn check<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no check {id} in {v:#}"))
}

fn status<'a>(v: &'a Value, id: &str) -> &'a str {
    check(v, id)["status"].as_str().unwrap_or_default()
}

fn fix_of(v: &Value, id: &str) -> String {
    check(v, id)["diagnosis"]["fix"]
        .as_str()
        .unwrap_or_else(|| panic!("check {id} has no fix: {v:#}"))
        .to_owned()
}

/// Every check passed or was skipped for a stated reason, exit 0.
fn assert_green(out: &Outcome, v: &Value) {
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(v["verdict"]["ok"], true, "{out}");
    assert_eq!(v["verdict"]["failed"], 0, "{out}");
    for c in v["checks"].as_array().unwrap() {
        assert_ne!(c["status"], "fail", "{out}");
    }
}

/// The one failing check is `id`, with `code`; returns its fix.
fn assert_fails_on(out: &Outcome, v: &Value, id: &str, code: &str, exit: i32) -> String {
    assert_eq!(out.code, exit, "{out}");
    assert_eq!(status(v, id), "fail", "{out}");
    assert_eq!(check(v, id)["diagnosis"]["code"], code, "{out}");
    assert_eq!(
        v["verdict"]["error"]["code"], code,
        "the first failure: {out}"
    );
    fix_of(v, id)
}

#[test]
fn a_healthy_lab_passes_every_check() {
    let lab = Lab::new();
    let kt = lab.source_keytab();
    let kt = kt.display().to_string();
    let (out, v) = lab.json(&["--keytab", &kt], &[], &[]);
    assert_green(&out, &v);
    for id in [
        "clock-skew",
        "resolve-source",
        "resolve-destination",
        "kdc",
        "ldap",
        "spn-fqdn",
        "spn-short",
        "keytab",
        "delegation",
        "user-account",
        "user-authorized",
    ] {
        assert_eq!(status(&v, id), "pass", "{id}: {out}");
    }
    assert!(
        check(&v, "resolve-destination")["summary"]
            .as_str()
            .unwrap()
            .contains("127.0.0.22:6600 (--to-address)"),
        "{out}"
    );
    // The text form: one line per check, then the verdict.
    let text = lab.run(&["--keytab", &kt], &[], &[]);
    assert_eq!(text.code, 0, "{text}");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].starts_with("vmgate doctor: live move"), "{text}");
    assert!(lines[1].starts_with("[pass] clock-skew"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[pass] user-authorized")),
        "{text}"
    );
    assert!(lines.last().unwrap().starts_with("Verdict: PASS"), "{text}");
}

#[test]
fn a_missing_migration_spn_on_d_is_0x80090303_and_setspn_fixes_it() {
    let lab = Lab::new();
    let [fqdn, _] = lab.mig();
    lab.d
        .dir
        .delete_values(&lab.d.dn, SPN_ATTR, &with_twin(&fqdn))
        .unwrap();
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "spn-fqdn", "0x80090303", 1);
    assert_eq!(status(&v, "spn-short"), "pass", "{out}");
    assert_eq!(fix, format!("setspn -S \"{fqdn}\" {}", lab.d.name), "{out}");
    // The text form prints the code, the cause and the fix under the failing line.
    let text = lab.run(&[], &[], &[]);
    assert_eq!(text.code, 1, "{text}");
    assert!(text.stdout.contains("[FAIL] spn-fqdn"), "{text}");
    assert!(
        text.stdout
            .contains("error 0x80090303 (SEC_E_TARGET_UNKNOWN): The specified target is unknown"),
        "{text}"
    );
    assert!(text.stdout.contains(&format!("fix:   {fix}")), "{text}");
    assert!(
        text.stdout
            .contains("would fail with 0x80090303 (SEC_E_TARGET_UNKNOWN)"),
        "{text}"
    );
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn an_spn_stored_without_its_samba_twin_is_0x80090303_explained() {
    let lab = Lab::new();
    let [_, short] = lab.mig();
    lab.d
        .dir
        .delete_values(&lab.d.dn, SPN_ATTR, &[twin(&short)])
        .unwrap();
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "spn-short", "0x80090303", 1);
    let cause = check(&v, "spn-short")["diagnosis"]["cause"]
        .as_str()
        .unwrap();
    assert!(
        cause.contains("without its escaped twin") && cause.contains("Samba's KDC"),
        "{out}"
    );
    assert!(cause.contains(&twin(&short)), "{out}");
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
    assert!(
        lab.d.stored_spns().contains(&twin(&short)),
        "the twin is back"
    );
}

#[test]
fn an_spn_duplicated_on_another_account_is_0x80090322() {
    let lab = Lab::new();
    let other = lab.domain.computer("dx");
    let [fqdn, _] = lab.mig();
    // The DC refuses duplicates over LDAP: plant them in its database directly.
    for value in with_twin(&fqdn) {
        let plant = lab.domain.ldb(
            "ldbmodify",
            &lab.domain.domain_partition(),
            &format!(
                "dn: {}\nchangetype: modify\nadd: {SPN_ATTR}\n{SPN_ATTR}: {value}\n",
                other.dn
            ),
        );
        assert_eq!(plant.code, 0, "{plant}");
    }
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "spn-fqdn", "0x80090322", 1);
    let cause = check(&v, "spn-fqdn")["diagnosis"]["cause"]
        .as_str()
        .unwrap();
    assert!(cause.contains(&format!("{}$", other.name)), "{out}");
    assert_eq!(fix, format!("setspn -D \"{fqdn}\" {}", other.name), "{out}");
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn missing_delegation_is_0x8009030e_and_add_service_fixes_it() {
    let lab = Lab::new();
    lab.s.dir.replace_values(&lab.s.dn, A2D2, &[]).unwrap();
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "delegation", "0x8009030E", 1);
    assert!(
        fix.starts_with(&format!(
            "vmgate delegation add-service {}",
            lab.s.name.to_lowercase()
        )),
        "{out}"
    );
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn kerberos_only_where_protocol_transition_is_needed_is_0x8009030e_confirmed_by_the_kdc() {
    let lab = Lab::new();
    let kt = lab.source_keytab();
    let kt = kt.display().to_string();
    let args = ["--start", "no-user-ticket", "--keytab", &kt];
    let (out, v) = lab.json(&args, &[], &[]);
    let fix = assert_fails_on(&out, &v, "delegation", "0x8009030E", 1);
    assert!(
        fix.starts_with(&format!(
            "vmgate delegation for-any-protocol {} on",
            lab.s.name.to_lowercase()
        )),
        "{out}"
    );
    // The live S4U exchange with S's keytab: the KDC refuses as predicted.
    let details = check(&v, "delegation")["details"].to_string();
    assert!(details.contains("S4U2Self, then S4U2Proxy"), "{out}");
    assert!(details.contains("KDC_ERR_BADOPTION"), "{out}");
    lab.apply(&fix);
    let (out, v) = lab.json(&args, &[], &[]);
    assert_green(&out, &v);
    let summary = check(&v, "delegation")["summary"].as_str().unwrap();
    assert!(summary.ends_with("(confirmed by the KDC)"), "{out}");
}

#[test]
fn a_sensitive_user_is_0x8009030e_and_the_fix_clears_the_flag() {
    let lab = Lab::new();
    lab.u
        .dir
        .replace_values(
            &lab.u.dn,
            "userAccountControl",
            &[(0x200 | 0x10_0000).to_string()],
        )
        .unwrap();
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "user-account", "0x8009030E", 1);
    assert!(
        check(&v, "user-account")["diagnosis"]["cause"]
            .as_str()
            .unwrap()
            .contains("sensitive and cannot be delegated"),
        "{out}"
    );
    assert!(
        fix.starts_with(&format!("vmgate delegation sensitive {} off", lab.u.name)),
        "{out}"
    );
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn a_user_outside_the_admin_group_is_access_denied() {
    let lab = Lab::new();
    lab.u
        .dir
        .delete_values(&lab.group_dn(), "member", std::slice::from_ref(&lab.u.dn))
        .unwrap();
    let (out, v) = lab.json(&[], &[], &[]);
    let fix = assert_fails_on(&out, &v, "user-authorized", "0x80070005", 1);
    assert_eq!(
        check(&v, "user-authorized")["diagnosis"]["name"],
        "E_ACCESSDENIED"
    );
    assert!(
        fix.starts_with(&format!(
            "on a domain controller: samba-tool group addmembers \"{GROUP}\" {}",
            lab.u.name
        )),
        "{out}"
    );
    lab.apply(&fix);
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn a_stale_keytab_after_a_password_change_is_explained_and_refreshed() {
    let lab = Lab::new();
    let kt = lab.source_keytab();
    let kt_s = kt.display().to_string();
    let (out, v) = lab.json(&["--keytab", &kt_s], &[], &[]);
    assert_green(&out, &v);
    lab.s
        .dir
        .set_password(
            &lab.s.dn,
            &vmgate_auth::Secret::new(format!("Vt-{}-Pw2!", unique_name("p"))),
        )
        .unwrap();
    let (out, v) = lab.json(&["--keytab", &kt_s], &[], &[]);
    let fix = assert_fails_on(&out, &v, "keytab", "0x80090322", 1);
    let cause = check(&v, "keytab")["diagnosis"]["cause"].as_str().unwrap();
    assert!(
        cause.contains("password changed after the keytab was exported"),
        "{out}"
    );
    // The fix runs on S (a member host): vmgate's own refresh, which resets the password over
    // LDAP because the keytab's key no longer works.
    assert!(
        fix.starts_with(&format!(
            "on {}: vmgate host keytab refresh --keytab {kt_s} --account {}$ --reset",
            lab.s.name, lab.s.name
        )),
        "{out}"
    );
    lab.apply(&fix);
    let (out, v) = lab.json(&["--keytab", &kt_s], &[], &[]);
    assert_green(&out, &v);
    // The refreshed keytab works: kinit -k, and a ticket for S's SPN decrypts with it.
    let principal = format!("{}$@{}", lab.s.name, lab.domain.realm);
    let cc = format!("FILE:{}", lab.tmp.path().join("s.cc").display());
    let out = lab.domain.run_with(
        "kinit",
        ["-k", "-t", &kt_s, &principal],
        &[("KRB5CCNAME", &cc)],
        None,
    );
    assert_eq!(out.code, 0, "kinit -k with the refreshed keytab: {out}");
    let admin = lab.domain.kinit_admin(lab.tmp.path());
    let out = lab
        .domain
        .kvno(&admin, &format!("HOST/{}", lab.s.fqdn), Some(&kt));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("keytab entry valid"), "{out}");
}

#[test]
fn keytab_refresh_changes_the_password_with_kpasswd_and_keeps_the_old_keys() {
    let lab = Lab::new();
    let kt = lab.source_keytab();
    let kt_s = kt.display().to_string();
    let kvno = |lab: &Lab| -> u32 {
        lab.s
            .dir
            .read(&lab.s.dn, &["msDS-KeyVersionNumber"])
            .unwrap()
            .unwrap()
            .first("msDS-KeyVersionNumber")
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = kvno(&lab);
    let account = format!("{}$", lab.s.name);
    let out = lab.domain.run(
        env!("CARGO_BIN_EXE_vmgate"),
        [
            "host",
            "keytab",
            "refresh",
            "--keytab",
            &kt_s,
            "--account",
            &account,
            "--json",
        ],
    );
    assert_eq!(out.code, 0, "{out}");
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    // kpasswd with the keytab's own key, as adcli update: no administrator rights used.
    assert_eq!(report["method"], "kpasswd", "{out}");
    assert_eq!(report["previous_kvno"], before, "{out}");
    // The key version is checked against the directory: the keytab holds what the DC has.
    let after = kvno(&lab);
    assert_eq!(after, before + 1);
    assert_eq!(report["kvno"], after, "{out}");
    let listing = lab.domain.run("klist", ["-ke", kt_s.as_str()]);
    for p in [
        format!("{account}@{}", lab.domain.realm),
        format!("HOST/{}@{}", lab.s.fqdn, lab.domain.realm),
    ] {
        for enctype in ["aes256-cts-hmac-sha1-96", "aes128-cts-hmac-sha1-96"] {
            let line = format!("{after} {p} ({enctype})");
            assert!(listing.stdout.contains(&line), "{line} missing: {listing}");
        }
    }
    // The old version stays for tickets issued before the change.
    assert!(
        listing
            .stdout
            .contains(&format!("{before} {}@", account.to_lowercase())),
        "{listing}"
    );
    let principal = format!("{account}@{}", lab.domain.realm);
    let cc = format!("FILE:{}", lab.tmp.path().join("s.cc").display());
    let out = lab.domain.run_with(
        "kinit",
        ["-k", "-t", &kt_s, &principal],
        &[("KRB5CCNAME", &cc)],
        None,
    );
    assert_eq!(out.code, 0, "kinit -k with the refreshed keytab: {out}");
    let admin = lab.domain.kinit_admin(lab.tmp.path());
    let out = lab
        .domain
        .kvno(&admin, &format!("HOST/{}", lab.s.fqdn), Some(&kt));
    assert_eq!(out.code, 0, "{out}");
    // And the doctor's keytab check agrees.
    let (out, v) = lab.json(&["--keytab", &kt_s], &[], &[]);
    assert_green(&out, &v);
    assert_eq!(status(&v, "keytab"), "pass", "{out}");
}

#[test]
fn clock_skew_beyond_five_minutes_is_0x80090324() {
    let lab = Lab::new();
    let (out, v) = lab.json(&[], &[], &["faketime", "-f", "+10m"]);
    let fix = assert_fails_on(&out, &v, "clock-skew", "0x80090324", 1);
    assert!(fix.contains("chronyc makestep"), "{out}");
    let summary = check(&v, "clock-skew")["summary"].as_str().unwrap();
    assert!(summary.contains("ahead of the KDC's"), "{out}");
    // Only the clock is wrong: everything else passes.
    assert_eq!(v["verdict"]["failed"], 1, "{out}");
    // The fix is a synchronised clock: the same run without the shifted clock passes.
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

/// A copy of the domain's krb5.conf with `from` replaced by `to`.
fn krb5_conf_with(lab: &Lab, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(&lab.domain.krb5_config).unwrap();
    assert!(text.contains(from), "{text}");
    let p = lab.tmp.path().join(name);
    std::fs::write(&p, text.replace(from, to)).unwrap();
    p
}

#[test]
fn no_kdc_answering_is_0x80090311_and_exit_4() {
    let lab = Lab::new();
    let dc = std::env::var("VMGATE_DC_IP").unwrap_or_else(|_| "127.0.0.10".into());
    // Nothing listens on 127.0.0.99: the client sees what it sees when the KDC is stopped.
    let dead = krb5_conf_with(
        &lab,
        "krb5-dead.conf",
        &format!("kdc = {dc}"),
        "kdc = 127.0.0.99",
    );
    let dead = dead.display().to_string();
    let (out, v) = lab.json(&[], &[("KRB5_CONFIG", &dead)], &[]);
    let fix = assert_fails_on(&out, &v, "kdc", "0x80090311", 4);
    assert_eq!(status(&v, "clock-skew"), "skip", "{out}");
    let cause = check(&v, "kdc")["diagnosis"]["cause"].as_str().unwrap();
    assert!(cause.contains("127.0.0.99:88"), "{out}");
    assert!(cause.contains("connection refused"), "{out}");
    assert!(fix.contains("kdc ="), "{out}");
    assert!(fix.contains(&dead), "names the krb5.conf read: {out}");
    // Fixed: the real KDC in krb5.conf.
    let (out, v) = lab.json(&[], &[], &[]);
    assert_green(&out, &v);
}

#[test]
fn an_unresolvable_host_fails_and_its_config_resolves_it() {
    let lab = Lab::new();
    let vmgate = env!("CARGO_BIN_EXE_vmgate");
    let base = [
        "doctor",
        "--from",
        &lab.s.name,
        "--to",
        &lab.d.name,
        "--from-address",
        "127.0.0.21",
        "--skip-daemon",
        "--json",
    ];
    // D's name is in no hosts file and no DNS this machine uses. The run is in a network
    // namespace of its own, so the resolver's DNS query cannot leave the machine (and the DC is
    // out of reach too: exit 4).
    let mut isolated = vec!["-n", vmgate];
    isolated.extend(base);
    let out = lab.domain.run("unshare", &isolated);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let fix = assert_fails_on(&out, &v, "resolve-destination", "0x80090303", 4);
    assert_eq!(status(&v, "resolve-source"), "pass", "{out}");
    let cause = check(&v, "resolve-destination")["diagnosis"]["cause"]
        .as_str()
        .unwrap();
    assert!(
        cause.contains(&format!("{} does not resolve", lab.d.fqdn)),
        "{out}"
    );
    assert!(fix.contains("--to-config FILE"), "{out}");
    // D's vmgated configuration names its address.
    let cfg = lab.tmp.path().join("d.toml");
    std::fs::write(
        &cfg,
        format!(
            "host_name = \"{}\"\nfqdn = \"{}\"\nrealm = \"{}\"\nlisten = [\"127.0.0.22:6601\"]\n\
             admin_group = \"{GROUP}\"\n[directory]\nurl = \"{}\"\n\
             [migration]\nauth = \"kerberos\"\n",
            lab.d.name.to_lowercase(),
            lab.d.fqdn,
            lab.domain.realm,
            lab.domain.ldap_url
        ),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let mut args = base.to_vec();
    args.extend(["--to-config", &cfg_s]);
    let out = lab.domain.run(vmgate, &args);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_green(&out, &v);
    assert_eq!(status(&v, "user-account"), "skip", "no --user: {out}");
    assert!(
        check(&v, "resolve-destination")["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.22:6601 (listen of {cfg_s})")),
        "{out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let domain = Domain::from_env();
    let vmgate = env!("CARGO_BIN_EXE_vmgate");
    let out = domain.run(
        vmgate,
        [
            "doctor",
            "--from",
            "hv1",
            "--to",
            "hv2",
            "--to-address",
            "not-an-ip",
        ],
    );
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("\"not-an-ip\" is not an address"),
        "{out}"
    );
    let missing = Path::new("/nonexistent/vmgated.toml");
    let out = domain.run(
        vmgate,
        [
            "doctor",
            "--from",
            "hv1",
            "--to",
            "hv2",
            "--to-config",
            missing.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("cannot read the vmgated configuration"),
        "{out}"
    );
}

#[test]
fn credssp_started_remotely_without_forwarding_is_0x8009030e() {
    let lab = Lab::new();
    let (out, v) = lab.json(&["--auth", "credssp", "--start", "remote"], &[], &[]);
    let fix = assert_fails_on(&out, &v, "delegation", "0x8009030E", 1);
    let cause = check(&v, "delegation")["diagnosis"]["cause"]
        .as_str()
        .unwrap();
    assert!(cause.contains("uses CredSSP"), "{out}");
    assert!(fix.contains("--forward-credentials"), "{out}");
    // The fix is how the move is started: with the user's credentials forwarded.
    let (out, v) = lab.json(
        &["--auth", "credssp", "--start", "forward-credentials"],
        &[],
        &[],
    );
    assert_green(&out, &v);
}
