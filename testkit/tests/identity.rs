//! Who a host accepts, against the real Samba AD DC (issue 19, "Identity"): channel binding
//! verified, tickets only for the migration SPNs, principals mapped to accounts exactly, the
//! admin group resolved once, and host-identity mode's peer list. Hosts run as
//! `vmgate-channel serve` processes, as in `channel.rs`.
//!
//! Needs the test domain: run through `tests/run` (or `eval "$(tests/domain/up)"` first).
//! The tests that start a host naming the admin group by its name hold [`SHARED`] for reading;
//! the one that creates a second group of that name holds it for writing, since every host that
//! starts meanwhile rightly refuses the ambiguous name.

use vmgate_testkit::channel as common;

use std::sync::RwLock;
use std::time::Duration;

use common::*;
use serde_json::Value;
use vmgate_auth::authz::{GroupDirectory, GroupSpec, LdapGroups};
use vmgate_auth::directory::{Bind, DirectoryConfig};
use vmgate_auth::krb::Principal;

static SHARED: RwLock<()> = RwLock::new(());

fn code(v: &Value) -> &str {
    v["diagnosis"]["code"].as_str().unwrap_or("")
}

fn cause(v: &Value) -> &str {
    v["diagnosis"]["cause"].as_str().unwrap_or("")
}

fn fix(v: &Value) -> &str {
    v["diagnosis"]["fix"].as_str().unwrap_or("")
}

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    SHARED
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `vmgate-channel connect` as the user of `cc` to `spn_text` (any service) at `to`.
fn connect_spn(to: std::net::SocketAddr, spn_text: &str, cc: &std::path::Path) -> (Value, bool) {
    run_probe(
        &[
            "connect".into(),
            "--to".into(),
            to.to_string(),
            "--spn".into(),
            spn_text.into(),
            "--ccache".into(),
            cc.display().to_string(),
            "--send".into(),
            "hello".into(),
        ],
        &[],
    )
}

/// Waits for the host's refusal event with `code`.
fn refused_with(p: &Proc, code_hex: &str) -> Value {
    p.events.wait_for(
        &format!("refusal {code_hex}"),
        Duration::from_secs(5),
        |v| v["event"] == "refused" && v["diagnosis"]["code"] == code_hex,
    )
}

#[test]
fn i01_an_authentication_without_channel_bindings_is_refused() {
    let _s = shared();
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let cc = user_ccache("alice", "i01");
    for purpose in ["control", "migration"] {
        let (out, ok) = run_probe(
            &[
                "unbound".into(),
                "--to".into(),
                hv2.addr.to_string(),
                "--spn".into(),
                spn("hv2"),
                "--purpose".into(),
                purpose.into(),
            ],
            &[("KRB5CCNAME", format!("FILE:{}", cc.display()))],
        );
        assert!(!ok, "an unbound authentication must be refused: {out}");
        assert_eq!(out["kind"], "refused", "{out}");
        assert_eq!(code(&out), "0x80090346", "{out}");
        assert_eq!(out["diagnosis"]["name"], "SEC_E_BAD_BINDINGS");
        assert!(cause(&out).contains("carried no channel binding"), "{out}");
        assert!(fix(&out).contains("RFC 9266"), "{out}");
    }
    let ev = refused_with(&hv2, "0x80090346");
    assert_eq!(ev["kind"], "auth", "{ev}");
    assert_eq!(hv2.events.count(|v| v["event"] == "accepted"), 0);
    // The same user with vmgate's own (bound) client is accepted.
    let (out, ok) = connect(hv2.addr, "hv2", &cc, &["--send", "bound"], &[], &[]);
    assert!(ok, "{out}");
    assert_eq!(out["echo"], "bound");
}

#[test]
fn i02_tickets_for_other_services_of_the_host_account_are_refused() {
    let _s = shared();
    let h = hosts();
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let cc = user_ccache("alice", "i02");
    // Tickets for HOST/ and cifs/ (sPNMappings) of HV2$ are encrypted with the very key in
    // hv2's keytab; they are bound to this TLS session, so only the service name refuses them.
    for other in [
        "HOST/hv2.lab.example.test",
        "HOST/hv2",
        "cifs/hv2.lab.example.test",
    ] {
        let (out, ok) = connect_spn(hv2.addr, other, &cc);
        assert!(!ok, "a ticket for {other} must be refused: {out}");
        assert_eq!(out["kind"], "refused", "{out}");
        assert_eq!(code(&out), "0x80090322", "{out}");
        assert_eq!(out["diagnosis"]["name"], "SEC_E_WRONG_PRINCIPAL");
        assert!(
            cause(&out).contains(&format!("ticket for \"{other}@{}\"", env().realm)),
            "{out}"
        );
        assert!(cause(&out).contains(&spn("hv2")), "{out}");
    }
    refused_with(&hv2, "0x80090322");
    assert_eq!(hv2.events.count(|v| v["event"] == "accepted"), 0);
    // Both migration SPNs, FQDN and short, are accepted.
    for own in [spn("hv2"), short_spn("hv2")] {
        let (out, ok) = connect_spn(hv2.addr, &own, &cc);
        assert!(ok, "{own}: {out}");
        assert_eq!(out["echo"], "hello");
    }
}

/// A second group named like the admin group in its own OU, removed when dropped.
struct RogueGroup {
    ou: String,
    dn: String,
    sam: String,
    members: Vec<String>,
}

impl RogueGroup {
    fn new(members: &[String]) -> RogueGroup {
        let ou = format!("OU=vmgate-rogue-{},{}", std::process::id(), env().base_dn);
        ldapdelete_if_exists(&format!("CN={GROUP},{ou}"));
        ldapdelete_if_exists(&ou);
        ldapmodify(&format!(
            "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\n"
        ));
        let g = RogueGroup {
            dn: format!("CN={GROUP},{ou}"),
            ou,
            sam: format!("rogue-hva-{}", std::process::id()),
            members: members.to_vec(),
        };
        g.recreate();
        g
    }

    /// Deletes and adds the group again: a new objectGUID, so a new place in Samba's result
    /// order (it sorts by GUID).
    fn recreate(&self) {
        create_group(&self.dn, &self.sam, &self.members);
    }
}

impl Drop for RogueGroup {
    fn drop(&mut self) {
        ldapdelete_if_exists(&self.dn);
        ldapdelete_if_exists(&self.ou);
    }
}

fn group_sid(name: &str) -> String {
    let e = env();
    let out = std::process::Command::new("samba-tool")
        .args(["group", "show", name, "--attributes=objectSid", "-s"])
        .arg(e.domain_dir.join("etc/smb.conf"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("objectSid: "))
        .unwrap_or_else(|| panic!("no objectSid for {name}: {text}"))
        .trim()
        .to_owned()
}

#[test]
fn i03_a_second_group_named_like_the_admin_group_grants_nothing() {
    let _w = SHARED
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let h = hosts();
    // hv2 resolves "Hyper-V Administrators" at start, while only the real one exists.
    let hv2 = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]).start();
    let carol = user_ccache("carol", "i03");
    let alice = user_ccache("alice", "i03");
    let carol_dn = format!("CN=carol,CN=Users,{}", env().base_dn);
    let rogue = RogueGroup::new(&[carol_dn]);
    // Samba returns the two groups in GUID order, a coin toss per group: a fresh group each
    // round, so a first-match lookup would let carol in with probability 1 - 2^-6.
    for round in 0..6 {
        if round > 0 {
            rogue.recreate();
        }
        let (out, ok) = connect(hv2.addr, "hv2", &carol, &[], &[], &[]);
        assert!(
            !ok,
            "round {round}: carol is only in the rogue group: {out}"
        );
        assert_eq!(code(&out), "0x80070005", "{out}");
    }
    let (out, ok) = connect(hv2.addr, "hv2", &alice, &["--send", "x"], &[], &[]);
    assert!(ok, "{out}");

    // A host starting now finds the name ambiguous and stops, naming both groups.
    let err = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"])
        .try_start()
        .expect_err("an ambiguous admin group name must stop the host at start");
    let text = err["error"].as_str().unwrap_or_default();
    assert!(text.contains("is ambiguous"), "{err}");
    assert!(
        text.contains(&format!("CN={GROUP},CN=Users,{}", env().base_dn)),
        "{err}"
    );
    assert!(text.contains(&rogue.dn), "{err}");
    assert!(text.contains("DN or SID"), "{err}");

    // Named by DN or by SID, the real group is exact: carol out, alice in.
    let real_dn = format!("CN={GROUP},CN=Users,{}", env().base_dn);
    for group in [real_dn, group_sid(GROUP)] {
        let mut s = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]);
        s.group = group.clone();
        let p = s.start();
        let (out, ok) = connect(p.addr, "hv2", &carol, &[], &[], &[]);
        assert!(!ok, "{group}: {out}");
        assert_eq!(code(&out), "0x80070005", "{out}");
        let (out, ok) = connect(p.addr, "hv2", &alice, &["--send", "x"], &[], &[]);
        assert!(ok, "{group}: {out}");
    }
    drop(rogue);
}

/// The group `vmgate-test-hosts` (HV1$, HV3$ and alice) and the user `hv1`, made once.
fn hosts_group_and_user_hv1() -> (&'static str, &'static std::path::Path) {
    static MADE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let cc = MADE.get_or_init(|| {
        let e = env();
        let dn = format!("CN=vmgate-test-hosts,CN=Users,{}", e.base_dn);
        create_group(
            &dn,
            "vmgate-test-hosts",
            &[
                computer_dn("hv1"),
                computer_dn("hv3"),
                format!("CN=alice,CN=Users,{}", e.base_dn),
            ],
        );
        let pw = format!("Hv1-user-{}", std::process::id());
        create_user("hv1", &pw);
        kinit(&format!("hv1@{}", e.realm), &pw, "user-hv1")
    });
    ("vmgate-test-hosts", cc.as_path())
}

#[test]
fn i04_a_user_hv1_does_not_inherit_the_computer_hv1s_rights() {
    let _s = shared();
    let h = hosts();
    let (group, hv1_user) = hosts_group_and_user_hv1();
    let mut s = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]);
    s.group = group.into();
    let hv2 = s.start();
    // HV1$ is in the group; the user hv1 is not, and is not HV1$.
    for purpose in ["control", "migration"] {
        let (out, ok) = connect(hv2.addr, "hv2", hv1_user, &["--purpose", purpose], &[], &[]);
        assert!(
            !ok,
            "user hv1 must not get HV1$'s rights ({purpose}): {out}"
        );
        assert_eq!(code(&out), "0x80070005", "{out}");
        assert!(
            cause(&out).contains(&format!("hv1@{} authenticated", env().realm)),
            "{out}"
        );
        assert!(
            cause(&out).contains("hv1 is not a member of \"vmgate-test-hosts\""),
            "{out}"
        );
    }
    // The group does grant rights: alice, a user member, gets in.
    let alice = user_ccache("alice", "i04");
    let (out, ok) = connect(hv2.addr, "hv2", &alice, &["--send", "x"], &[], &[]);
    assert!(ok, "{out}");
}

#[test]
fn i05_the_directory_maps_principals_to_accounts_exactly() {
    let _s = shared();
    let e = env();
    let (group, _) = hosts_group_and_user_hv1();
    let password = std::fs::read_to_string(&e.admin_password_file).unwrap();
    let dir = LdapGroups::new(DirectoryConfig::new(
        e.ldap_url.clone(),
        Some(e.ldap_ca.clone()),
        Bind::Simple {
            user: "Administrator".into(),
            password: vmgate_auth::Secret::new(password.trim().to_owned()),
        },
    ));
    let admins = dir
        .resolve_group(&GroupSpec::parse(GROUP))
        .expect("the admin group");
    assert_eq!(admins.dn, format!("CN={GROUP},CN=Users,{}", e.base_dn));
    let hosts = dir.resolve_group(&GroupSpec::parse(group)).unwrap();
    let p = |s: &str| Principal::parse(s, None).unwrap();
    let realm = &e.realm;
    assert!(
        dir.is_member(&p(&format!("alice@{realm}")), &admins)
            .unwrap()
    );
    // The realm is part of the name: alice of another realm is not alice.
    assert!(!dir.is_member(&p("alice@OTHER.REALM"), &admins).unwrap());
    // `$` decides: the computer HV1$ is a member, the user hv1 is not.
    assert!(dir.is_member(&p(&format!("HV1$@{realm}")), &hosts).unwrap());
    assert!(!dir.is_member(&p(&format!("hv1@{realm}")), &hosts).unwrap());
    // Nothing is parsed out of the name: a DN or a domain prefix names no account.
    let alice_dn = format!("CN=alice,CN=Users,{}", e.base_dn);
    assert!(
        !dir.is_member(&p(&format!("{alice_dn}@{realm}")), &admins)
            .unwrap()
    );
    assert!(
        !dir.is_member(&p(&format!("LAB\\alice@{realm}")), &admins)
            .unwrap()
    );
    // A SID or a DN resolves to the same group.
    let by_sid = dir
        .resolve_group(&GroupSpec::parse(&group_sid(GROUP)))
        .unwrap();
    assert_eq!(by_sid.dn, admins.dn);
    let by_dn = dir.resolve_group(&GroupSpec::parse(&admins.dn)).unwrap();
    assert_eq!(by_dn.sid, admins.sid);
    assert!(
        dir.resolve_group(&GroupSpec::parse("no such group"))
            .is_err()
    );
}

#[test]
fn i06_host_mode_peer_hosts_migrate_and_nothing_else() {
    let _s = shared();
    let h = hosts();
    // HV1$ and HV3$ are both in vmgate-test-hosts, an admin group here: that does not count
    // for hosts. Only hv1 is a peer.
    let (group, _) = hosts_group_and_user_hv1();
    let mut s = Serve::new("hv2", "127.0.0.12", &h.keytab["hv2"]);
    s.group = group.into();
    s.peer_hosts = vec!["hv1".into()];
    let hv2 = s.start();

    // A listed peer's migration channel is accepted, as the host itself.
    let (out, ok) = connect_as_host(hv2.addr, "hv2", "hv1", &h.keytab["hv1"], "migration");
    assert!(ok, "{out}");
    assert_eq!(out["echo"], "from hv1", "{out}");
    let acc = hv2
        .events
        .wait_for("hv1 accepted", Duration::from_secs(5), |v| {
            v["event"] == "accepted"
        });
    assert_eq!(acc["principal"], format!("hv1$@{}", env().realm), "{acc}");
    assert_eq!(acc["purpose"], "migration");

    // An unlisted host is refused, and the refusal is logged.
    let (out, ok) = connect_as_host(hv2.addr, "hv2", "hv3", &h.keytab["hv3"], "migration");
    assert!(!ok, "{out}");
    assert_eq!(out["kind"], "refused", "{out}");
    assert_eq!(code(&out), "0x80070005", "{out}");
    assert!(cause(&out).contains("peer_hosts: hv1"), "{out}");
    assert!(fix(&out).contains("add \"hv3\" to peer_hosts"), "{out}");
    let ev = hv2
        .events
        .wait_for("hv3 refused", Duration::from_secs(5), |v| {
            v["event"] == "refused" && v["kind"] == "denied"
        });
    assert_eq!(code(&ev), "0x80070005");
    assert!(ev["error"].as_str().unwrap().contains("hv3$@"), "{ev}");

    // A host never gets a control channel, listed or not.
    for host in ["hv1", "hv3"] {
        let (out, ok) = connect_as_host(hv2.addr, "hv2", host, &h.keytab[host], "control");
        assert!(!ok, "{host}: {out}");
        assert_eq!(code(&out), "0x80070005", "{out}");
        assert!(cause(&out).contains("never control channels"), "{out}");
    }

    // Users keep working as before, for both purposes.
    let alice = user_ccache("alice", "i06");
    for purpose in ["control", "migration"] {
        let (out, ok) = connect(
            hv2.addr,
            "hv2",
            &alice,
            &["--purpose", purpose, "--send", purpose],
            &[],
            &[],
        );
        assert!(ok, "{purpose}: {out}");
        assert_eq!(out["echo"], purpose);
    }
    let accepted = hv2.events.count(|v| v["event"] == "accepted");
    assert_eq!(accepted, 3, "{:#?}", hv2.events.all());
}
