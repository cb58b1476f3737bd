//! `setspn` against the real Samba AD test domain (run through tests/run, or after
//! `eval "$(tests/domain/up)"`).
//!
//! Every test works on its own uniquely named accounts and SPNs, except the one that registers
//! the migration SPN on HV2, which holds [`HV2_LOCK`] and restores HV2 afterwards.

use vmgate_testkit::domain as common;

use std::sync::Mutex;
use std::time::Instant;

use common::{Domain, Outcome, TestAccount, unique_name};
use vmgate_auth::spn::{Spn, samba_twin};

const SETSPN: &str = env!("CARGO_BIN_EXE_setspn");
const VMGATE: &str = env!("CARGO_BIN_EXE_vmgate");
const MIGRATION: &str = "Microsoft Virtual System Migration Service";

/// Serialises the tests that change HV2$ (shared with other test binaries' expectations).
static HV2_LOCK: Mutex<()> = Mutex::new(());

fn setspn(domain: &Domain, args: &[&str]) -> Outcome {
    domain.run(SETSPN, args)
}

fn setspn_env(domain: &Domain, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    domain.run_with(SETSPN, args, env, None)
}

fn checking(domain: &Domain) -> String {
    format!("Checking domain {}\n", domain.base_dn)
}

/// Removes an SPN from an account at the end of a test, even when the test failed half-way.
struct RemoveSpnOnDrop<'a> {
    account: &'a TestAccount,
    spn: Spn,
}

impl Drop for RemoveSpnOnDrop<'_> {
    fn drop(&mut self) {
        let a = self.account.read();
        let _ = self.account.dir.unregister_spn(&a, &self.spn);
    }
}

#[test]
fn s_registers_the_migration_spn_on_hv2_the_kdc_issues_it_and_d_removes_it() {
    let _guard = HV2_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let domain = Domain::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = domain.directory();
    let spn_text = format!("{MIGRATION}/hv2.{}", domain.dns_domain());
    let spn = Spn::parse(&spn_text).unwrap();
    let principal = spn.principal(&domain.realm);
    let hv2_dn = format!("CN=HV2,CN=Computers,{}", domain.base_dn);

    // Start from an HV2 without the SPN (another test binary may have left it); remember it.
    let hv2 = dir.find_account_by_name("HV2", Default::default()).unwrap();
    let had_it = hv2.has_spn(&spn);
    if had_it {
        dir.unregister_spn(&hv2, &spn).unwrap();
    }
    struct Restore<'a> {
        dir: &'a vmgate_auth::directory::Directory,
        spn: &'a Spn,
        had_it: bool,
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            if let Ok(a) = self.dir.find_account_by_name("HV2", Default::default()) {
                match (self.had_it, a.has_spn(self.spn)) {
                    (true, false) => drop(self.dir.register_spn(&a, self.spn)),
                    (false, true) => drop(self.dir.unregister_spn(&a, self.spn)),
                    _ => {}
                }
            }
        }
    }
    let _restore = Restore {
        dir: &dir,
        spn: &spn,
        had_it,
    };

    // Before: the KDC does not know the SPN.
    let cc = domain.kinit_admin(tmp.path());
    let before = domain.kvno(&cc, &principal, None);
    assert_ne!(before.code, 0, "{before}");
    assert!(
        before
            .stderr
            .contains("Server not found in Kerberos database"),
        "{before}"
    );

    // setspn -S registers it, with Windows setspn's text.
    let out = setspn(&domain, &["-S", &spn_text, "HV2"]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "{}\nRegistering ServicePrincipalNames for {hv2_dn}\n\t{spn_text}\nUpdated object\n",
            checking(&domain)
        )
    );
    // On Samba the escaped twin is stored too; -L shows the SPN once.
    let stored = dir
        .find_account_by_name("HV2", Default::default())
        .unwrap()
        .service_principal_names;
    let twin = samba_twin(&spn).unwrap();
    assert!(
        stored.contains(&spn_text) && stored.contains(&twin),
        "{stored:?}"
    );
    let out = setspn(&domain, &["-L", "hv2"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stdout
            .starts_with(&format!("Registered ServicePrincipalNames for {hv2_dn}:\n")),
        "{out}"
    );
    assert_eq!(
        out.stdout.matches(&format!("\t{spn_text}\n")).count(),
        1,
        "{out}"
    );
    assert!(!out.stdout.contains('\\'), "the twin is not listed: {out}");

    // A real Kerberos client gets a service ticket for exactly that SPN (fresh cache)...
    let cc = domain.kinit_admin(tmp.path());
    let ticket = domain.kvno(&cc, &principal, None);
    assert_eq!(ticket.code, 0, "{ticket}");
    assert!(
        ticket.stdout.contains(&format!("{principal}: kvno = ")),
        "{ticket}"
    );
    // ...and HV2's keys, exported again after the change, decrypt it.
    let keytab = tmp.path().join("hv2-migration.keytab");
    let export = domain.export_keytab(&spn_text, &keytab);
    assert_eq!(export.code, 0, "{export}");
    let decrypt = domain.kvno(&cc, &principal, Some(&keytab));
    assert_eq!(decrypt.code, 0, "{decrypt}");
    assert_eq!(
        decrypt.stdout,
        format!("{principal}: kvno = 1, keytab entry valid\n"),
        "{decrypt}"
    );

    // setspn -D removes the SPN and its twin; the KDC no longer knows it.
    let out = setspn(&domain, &["-D", &spn_text, "hv2$"]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        format!("Unregistering ServicePrincipalNames for {hv2_dn}\n\t{spn_text}\nUpdated object\n")
    );
    let stored = dir
        .find_account_by_name("HV2", Default::default())
        .unwrap()
        .service_principal_names;
    assert!(
        !stored.iter().any(|v| spn.matches_value(v)),
        "plain and twin are gone: {stored:?}"
    );
    let cc = domain.kinit_admin(tmp.path());
    let after = domain.kvno(&cc, &principal, None);
    assert_ne!(after.code, 0, "{after}");
    assert!(
        after
            .stderr
            .contains("Server not found in Kerberos database"),
        "{after}"
    );
}

#[test]
fn s_refuses_an_spn_another_account_holds_lists_the_holder_and_changes_nothing() {
    let domain = Domain::from_env();
    let holder = domain.computer("vs");
    let other = domain.computer("vs");
    let spn_text = format!("{MIGRATION}/{}", holder.fqdn);
    let _cleanup = RemoveSpnOnDrop {
        account: &holder,
        spn: Spn::parse(&spn_text).unwrap(),
    };

    let out = setspn(&domain, &["-S", &spn_text, &holder.name]);
    assert_eq!(out.code, 0, "{out}");
    let before = other.stored_spns();

    let out = setspn(&domain, &["-S", &spn_text, &format!("{}$", other.name)]);
    assert_eq!(out.code, 1, "{out}");
    // The holder is listed once (its twin is not a second holder), then Windows' verdict.
    assert_eq!(
        out.stdout,
        format!(
            "{}{}\n\t{spn_text}\n\nDuplicate SPN found, aborting operation!\n",
            checking(&domain),
            holder.dn
        )
    );
    assert_eq!(
        other.stored_spns(),
        before,
        "nothing changed on {}",
        other.dn
    );

    // Registering it again on the holder itself is refused the same way.
    let out = setspn(&domain, &["-S", &spn_text, &holder.dn]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stdout
            .ends_with("Duplicate SPN found, aborting operation!\n"),
        "{out}"
    );
}

#[test]
fn a_adds_without_the_domain_check_and_the_dc_still_refuses_a_duplicate() {
    let domain = Domain::from_env();
    let first = domain.computer("va");
    let second = domain.user("va");
    let spn_text = format!("vmgtest-{}/{}", unique_name(""), first.fqdn);

    let out = setspn(&domain, &["-A", &spn_text, &first.name]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "Registering ServicePrincipalNames for {}\n\t{spn_text}\nUpdated object\n",
            first.dn
        )
    );
    assert_eq!(first.stored_spns(), vec![spn_text.clone()]);

    let before = second.stored_spns();
    let out = setspn(&domain, &["-U", "-A", &spn_text, &second.name]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr
            .contains("is already registered on another account"),
        "{out}"
    );
    assert_eq!(second.stored_spns(), before);
}

#[test]
fn x_finds_a_planted_duplicate_and_does_not_count_twins() {
    let domain = Domain::from_env();
    let a = domain.computer("vx");
    let b = domain.computer("vx");
    let dup = format!("vmgdup-{}/{}", unique_name(""), a.fqdn);
    let spaced = format!("{MIGRATION}/{}", a.fqdn);

    // A holds `dup` and a spaced SPN (stored with its twin).
    for spn in [&dup, &spaced] {
        let out = setspn(&domain, &["-S", spn, &a.name]);
        assert_eq!(out.code, 0, "{out}");
    }
    // The DC refuses a duplicate over LDAP, so plant it as replication or an older DC would
    // leave it: straight into the domain partition.
    let plant = domain.ldb(
        "ldbmodify",
        &domain.domain_partition(),
        &format!(
            "dn: {}\nchangetype: modify\nadd: servicePrincipalName\nservicePrincipalName: {dup}\n",
            b.dn
        ),
    );
    assert_eq!(plant.code, 0, "{plant}");
    assert!(b.stored_spns().contains(&dup), "planted");

    let out = setspn(&domain, &["-X"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stdout.starts_with(&checking(&domain)), "{out}");
    let mut holders = [a.dn.clone(), b.dn.clone()];
    holders.sort();
    assert!(
        out.stdout.contains(&format!(
            "{dup} is registered on these accounts:\n\t{}\n\t{}\n\n",
            holders[0], holders[1]
        )),
        "{out}"
    );
    assert!(
        !out.stdout.contains(&spaced),
        "a twin is not a duplicate: {out}"
    );
    let last = out.stdout.lines().last().unwrap_or_default();
    let n: usize = last
        .strip_prefix("found ")
        .and_then(|r| r.strip_suffix(" group of duplicate SPNs."))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last line {last:?}"));
    assert!(n >= 1, "{out}");
    assert_eq!(
        out.stdout
            .matches(" is registered on these accounts:")
            .count(),
        n
    );
}

#[test]
fn q_finds_by_wildcard_and_l_lists_each_spn_once() {
    let domain = Domain::from_env();
    let a = domain.computer("vq");
    let tag = unique_name("vmgq");
    let spns = [
        format!("{tag}/{}", a.fqdn),
        format!("{tag}/{}:8443", a.fqdn),
        format!("{tag} Spaced Service/{}", a.fqdn),
    ];
    for spn in &spns {
        let out = setspn(&domain, &["-s", spn, &a.name]);
        assert_eq!(out.code, 0, "{out}");
    }

    let out = setspn(&domain, &["/Q", &format!("{tag}*/*")]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.starts_with(&checking(&domain)), "{out}");
    assert!(out.stdout.contains(&format!("{}\n", a.dn)), "{out}");
    for spn in &spns {
        assert_eq!(
            out.stdout.matches(&format!("\t{spn}\n")).count(),
            1,
            "{out}"
        );
    }
    assert!(out.stdout.ends_with("\nExisting SPN found!\n"), "{out}");

    let out = setspn(&domain, &["-Q", &format!("{tag}-nothing/*")]);
    assert_eq!(out.code, 3, "{out}");
    assert_eq!(
        out.stdout,
        format!("{}\nNo such SPN found.\n", checking(&domain))
    );

    // -L: every SPN once, the twin of the spaced one hidden.
    let out = setspn(&domain, &["-L", &a.dn]);
    assert_eq!(out.code, 0, "{out}");
    let mut listed: Vec<&str> = out
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.strip_prefix('\t'))
        .collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = spns.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(listed, want, "{out}");
    assert_eq!(
        a.stored_spns().len(),
        4,
        "plain values and one twin are stored"
    );
    // A bare account name means -L.
    let bare = setspn(&domain, &[&a.name]);
    assert_eq!(bare.stdout, out.stdout);
}

#[test]
fn r_resets_the_host_spns_of_a_computer_only() {
    let domain = Domain::from_env();
    let a = domain.computer("vr");
    assert!(a.stored_spns().is_empty());
    let out = setspn(&domain, &["-R", &a.name]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "Registering ServicePrincipalNames for {}\n\tHOST/{}\n\tHOST/{}\nUpdated object\n",
            a.dn, a.fqdn, a.name
        )
    );
    let mut want = vec![format!("HOST/{}", a.fqdn), format!("HOST/{}", a.name)];
    want.sort();
    assert_eq!(a.stored_spns(), want);
    // Again: nothing new to write, same report.
    let again = setspn(&domain, &["-r", &a.name]);
    assert_eq!(again.code, 0, "{again}");
    assert_eq!(a.stored_spns(), want);

    let u = domain.user("vr");
    let out = setspn(&domain, &["-U", "-R", &u.name]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("is not a computer account"), "{out}");
}

/// The directory API the authorization code uses: group membership through nested groups
/// (LDAP_MATCHING_RULE_IN_CHAIN), which Samba implements.
#[test]
fn directory_membership_follows_nested_groups() {
    let domain = Domain::from_env();
    let user = domain.user("vg");
    let inner = domain.group("vgi");
    let outer = domain.group("vgo");
    let other = domain.group("vgx");
    let dir = domain.directory();
    dir.add_values(&inner.dn, "member", std::slice::from_ref(&user.dn))
        .unwrap();
    dir.add_values(&outer.dn, "member", std::slice::from_ref(&inner.dn))
        .unwrap();
    assert!(dir.is_member_of(&user.dn, &inner.dn).unwrap());
    assert!(dir.is_member_of(&user.dn, &outer.dn).unwrap(), "nested");
    assert!(!dir.is_member_of(&user.dn, &other.dn).unwrap());
    let found = dir.find_group(&outer.name).unwrap().expect("group by name");
    assert_eq!(found.dn, outer.dn);
    assert!(
        dir.find_group(&user.dn).unwrap().is_none(),
        "a user is not a group"
    );
    let by_upn = dir
        .find_account_by_name(
            &format!("{}@{}", user.name, domain.realm),
            Default::default(),
        )
        .unwrap();
    assert_eq!(by_upn.dn, user.dn);
    assert_eq!(by_upn.member_of, vec![inner.dn.clone()]);
    assert!(
        by_upn
            .object_sid
            .as_deref()
            .is_some_and(|s| s.starts_with("S-1-5-21-"))
    );
}

#[test]
fn an_unknown_account_is_named_and_nothing_changes() {
    let domain = Domain::from_env();
    let name = unique_name("nosuch");
    let out = setspn(&domain, &["-S", "vmgtest/x.lab.example.test", &name]);
    assert_eq!(out.code, 3, "{out}");
    assert_eq!(
        out.stderr.lines().next(),
        Some(format!("setspn: Could not find account {name}").as_str())
    );
    let q = setspn(&domain, &["-Q", "vmgtest/x.lab.example.test"]);
    assert_eq!(q.code, 3, "{q}");
}

#[test]
fn a_malformed_spn_is_refused_before_anything_is_sent() {
    let domain = Domain::from_env();
    let a = domain.computer("vm");
    let before = a.stored_spns();
    for (bad, why) in [
        ("hv2.lab.example.test", "expected class/host[:port][/name]"),
        ("HOST/", "the host after \"/\" is empty"),
        ("HOST/h:99999", "the port after \":\" must be a number"),
        ("a/b/c/d", "too many \"/\""),
    ] {
        let out = setspn(&domain, &["-S", bad, &a.name]);
        assert_eq!(out.code, 2, "{out}");
        assert!(
            out.stderr
                .starts_with(&format!("setspn: \"{bad}\" is not an SPN: {why}")),
            "{out}"
        );
        assert!(out.stdout.is_empty(), "{out}");
    }
    assert_eq!(a.stored_spns(), before);
}

#[test]
fn a_wrong_password_is_refused_as_logon_denied_and_nothing_changes() {
    let domain = Domain::from_env();
    let a = domain.computer("vp");
    let before = a.stored_spns();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("wrong.password");
    std::fs::write(&bad, "not-the-password\n").unwrap();
    let bad = bad.display().to_string();
    let out = setspn_env(
        &domain,
        &["-S", &format!("vmgtest/{}", a.fqdn), &a.name],
        &[("VMGATE_LDAP_PASSWORD_FILE", &bad)],
    );
    assert_eq!(out.code, 5, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(
        out.stderr.starts_with(&format!(
            "setspn: the directory at {} refused the credentials of Administrator@{}: wrong \
             password or unknown user (data 52e)\n",
            domain.ldap_url,
            domain.dns_domain()
        )),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("error 0x8009030C (SEC_E_LOGON_DENIED): The logon attempt failed."),
        "{out}"
    );
    assert!(out.stderr.contains("fix:"), "{out}");
    assert!(
        !out.stderr.contains("not-the-password"),
        "no secret in the output: {out}"
    );
    assert_eq!(a.stored_spns(), before);
}

#[test]
fn a_stopped_server_is_named_by_its_url() {
    let domain = Domain::from_env();
    let url = "ldaps://127.0.0.99:6360";
    let out = setspn_env(&domain, &["-L", "hv2"], &[("VMGATE_LDAP_URL", url)]);
    assert_eq!(out.code, 4, "{out}");
    assert!(
        out.stderr
            .starts_with(&format!("setspn: cannot reach the directory at {url}: ")),
        "{out}"
    );
    assert!(out.stderr.contains("0x8007274D (WSAECONNREFUSED)"), "{out}");
    // The same through the flag, which wins over the variable.
    let out = setspn(&domain, &["--ldap-url", url, "-Q", "*/hv2"]);
    assert_eq!(out.code, 4, "{out}");
    assert!(out.stderr.contains(url), "{out}");
}

#[test]
fn a_certificate_that_does_not_verify_is_refused_and_names_the_ca_file() {
    let domain = Domain::from_env();
    let a = domain.computer("vc");
    let before = a.stored_spns();
    let tmp = tempfile::tempdir().unwrap();
    let ca_key = tmp.path().join("other-ca.key");
    let ca = tmp.path().join("other-ca.pem");
    let made = domain.run(
        "openssl",
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=Unrelated Test CA",
            "-keyout",
            &ca_key.display().to_string(),
            "-out",
            &ca.display().to_string(),
        ],
    );
    assert_eq!(made.code, 0, "{made}");
    let ca_text = ca.display().to_string();
    let out = setspn_env(
        &domain,
        &["-S", &format!("vmgtest/{}", a.fqdn), &a.name],
        &[("VMGATE_LDAP_CA", &ca_text)],
    );
    assert_eq!(out.code, 4, "{out}");
    assert!(
        out.stderr.starts_with(&format!(
            "setspn: the certificate of the directory at {} does not verify against the CA file \
             {ca_text}: ",
            domain.ldap_url
        )),
        "{out}"
    );
    assert!(out.stderr.contains("UnknownIssuer"), "{out}");
    assert_eq!(a.stored_spns(), before);
}

#[test]
fn gssapi_bind_uses_the_callers_kerberos_ticket_with_kerberos_sealing() {
    let domain = Domain::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let cc = domain.kinit_admin(tmp.path());
    let host = domain
        .ldap_url
        .split_once("://")
        .map(|(_, h)| h.split(':').next().unwrap_or(h).trim_end_matches('/'))
        .unwrap_or_default()
        .to_owned();
    let plain = format!("ldap://{host}");
    // No password anywhere: the bind can only be Kerberos.
    let env = [
        ("KRB5CCNAME", cc.as_str()),
        ("VMGATE_LDAP_PASSWORD_FILE", "/nonexistent"),
    ];
    let out = setspn_env(
        &domain,
        &["--gssapi", "--ldap-url", &plain, "-L", "HV1$"],
        &env,
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stdout
            .contains(&format!("\tHOST/hv1.{}\n", domain.dns_domain())),
        "{out}"
    );
    // Samba refuses GSSAPI inside TLS without sign/seal: the message says what to use instead.
    let out = setspn_env(&domain, &["--gssapi", "-L", "HV1$"], &env);
    assert_eq!(out.code, 5, "{out}");
    assert!(
        out.stderr.contains(&format!(
            "needs ldap://{host}:389 instead of ldaps:// for a GSSAPI bind"
        )),
        "{out}"
    );
    // Without a ticket the bind fails with the Windows code for "no credentials".
    let empty = format!("FILE:{}", tmp.path().join("empty-cc").display());
    let out = setspn_env(
        &domain,
        &["--gssapi", "--ldap-url", &plain, "-L", "HV1$"],
        &[("KRB5CCNAME", &empty)],
    );
    assert_eq!(out.code, 5, "{out}");
    assert!(
        out.stderr.contains("0x8009030E (SEC_E_NO_CREDENTIALS)"),
        "{out}"
    );
}

#[test]
fn vmgate_spn_does_the_same_with_json() {
    let domain = Domain::from_env();
    let a = domain.computer("vj");
    let spn = format!("{MIGRATION}/{}", a.fqdn);
    let run = |args: &[&str]| -> (Outcome, serde_json::Value) {
        let mut all = vec!["spn"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = domain.run(VMGATE, &all);
        let json =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        (out, json)
    };
    let (out, json) = run(&["add", &spn, &a.name]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(json["result"], "registered");
    assert_eq!(json["account"], a.dn.as_str());
    assert_eq!(
        json["values_written"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );

    let (_, json) = run(&["list", &a.name]);
    assert_eq!(json["result"], "listed");
    assert_eq!(json["account"]["spns"], serde_json::json!([spn]));

    let (out, json) = run(&["query", &format!("*/{}", a.fqdn)]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(json["accounts"][0]["dn"], a.dn.as_str());

    let (out, json) = run(&["add", &spn, "--computer", &a.name]);
    assert_eq!(out.code, 1, "{out}");
    assert_eq!(json["result"], "duplicate_found");

    let (out, json) = run(&["delete", &spn, &a.name]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        json["values_removed"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );

    let (out, json) = run(&["delete", &spn, &a.name]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        json["error"]
            .as_str()
            .unwrap_or_default()
            .contains("is not registered"),
        "{json}"
    );
}

/// The seeded accounts: `vmgseedNNNN` users with `vmgseedsvc/vmgseedNNNN.<domain>` SPNs. They
/// are kept in the domain (deleting 2,000 accounts costs as much as adding them) and added only
/// when missing, so a second run against the same domain reuses them.
const SEED_PREFIX: &str = "vmgseed";
const SEED_COUNT: usize = 2000;

/// Serialises the seeding (tests in one binary run in parallel).
static SEED_LOCK: Mutex<()> = Mutex::new(());

fn seed_accounts(domain: &Domain) {
    let _guard = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = domain.directory();
    let present: std::collections::HashSet<String> = dir
        .search_domain(
            &format!("(&(objectClass=user)(sAMAccountName={SEED_PREFIX}*))"),
            &["sAMAccountName"],
        )
        .unwrap()
        .iter()
        .filter_map(|e| e.first("sAMAccountName").map(str::to_ascii_lowercase))
        .collect();
    let missing: Vec<usize> = (0..SEED_COUNT)
        .filter(|i| !present.contains(&format!("{SEED_PREFIX}{i:04}")))
        .collect();
    // In chunks, so that the DC's database is never held long by one transaction.
    for chunk in missing.chunks(250) {
        let mut ldif = String::with_capacity(chunk.len() * 200);
        for i in chunk {
            ldif.push_str(&format!(
                "dn: CN={SEED_PREFIX}{i:04},CN=Users,{base}\nobjectClass: user\nsAMAccountName: \
                 {SEED_PREFIX}{i:04}\nservicePrincipalName: {SEED_PREFIX}svc/{SEED_PREFIX}{i:04}.{dns}\n\n",
                base = domain.base_dn,
                dns = domain.dns_domain(),
            ));
        }
        let seeded = domain.ldb("ldbadd", &domain.sam_ldb(), &ldif);
        assert_eq!(seeded.code, 0, "{seeded}");
    }
}

#[test]
fn x_and_q_page_through_2000_seeded_accounts() {
    let domain = Domain::from_env();
    let t = Instant::now();
    seed_accounts(&domain);
    let seed_time = t.elapsed();
    let dns = domain.dns_domain();
    let seed_dn = |i: usize| format!("CN={SEED_PREFIX}{i:04},CN=Users,{}", domain.base_dn);

    // Plant one exact duplicate among them (straight into the partition: the DC refuses it
    // over LDAP), and take it away again at the end.
    let tag = unique_name("d");
    let dup = format!("{SEED_PREFIX}dup/{tag}.{dns}");
    let holders = [seed_dn(7), seed_dn(SEED_COUNT - 1)];
    for dn in &holders {
        let plant = domain.ldb(
            "ldbmodify",
            &domain.domain_partition(),
            &format!(
                "dn: {dn}\nchangetype: modify\nadd: servicePrincipalName\nservicePrincipalName: {dup}\n"
            ),
        );
        assert_eq!(plant.code, 0, "{plant}");
    }
    struct Unplant<'a>(&'a Domain, [String; 2], String);
    impl Drop for Unplant<'_> {
        fn drop(&mut self) {
            for dn in &self.1 {
                let _ = self.0.ldb(
                    "ldbmodify",
                    &self.0.domain_partition(),
                    &format!(
                        "dn: {dn}\nchangetype: modify\ndelete: servicePrincipalName\n\
                         servicePrincipalName: {}\n",
                        self.2
                    ),
                );
            }
        }
    }
    let _unplant = Unplant(&domain, holders.clone(), dup.clone());

    let t = Instant::now();
    let q = setspn(&domain, &["-Q", &format!("{SEED_PREFIX}svc/*")]);
    let q_time = t.elapsed();
    assert_eq!(q.code, 0, "{}", q.stderr);
    let listed = q
        .stdout
        .lines()
        .filter(|l| l.starts_with(&format!("CN={SEED_PREFIX}")))
        .count();
    assert_eq!(
        listed, SEED_COUNT,
        "every seeded account is listed (paged search)"
    );
    assert!(q.stdout.ends_with("\nExisting SPN found!\n"));

    let t = Instant::now();
    let x = setspn(&domain, &["-X"]);
    let x_time = t.elapsed();
    assert_eq!(x.code, 1, "{}", x.stderr);
    assert!(
        x.stdout.contains(&format!(
            "{dup} is registered on these accounts:\n\t{}\n\t{}\n\n",
            holders[0], holders[1]
        )),
        "{}",
        x.stdout
    );
    assert!(
        !x.stdout.contains(&format!("{SEED_PREFIX}svc/")),
        "no seeded SPN is a duplicate"
    );
    eprintln!(
        "{SEED_COUNT} seeded accounts ready in {seed_time:.2?}; setspn -Q over them took \
         {q_time:.2?}, setspn -X {x_time:.2?}"
    );
}

#[test]
fn usage_errors_exit_2_with_the_usage() {
    let domain = Domain::from_env();
    let out = setspn(&domain, &["-Z"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr
            .starts_with("setspn: unknown switch -Z\nUsage: setspn"),
        "{out}"
    );
    let out = setspn(&domain, &["-?"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.starts_with("Usage: setspn"), "{out}");
    let out = setspn(&domain, &["-T", "other.example.org", "-X"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("-T named another: other.example.org"),
        "{out}"
    );
}
