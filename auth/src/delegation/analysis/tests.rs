//! Unit tests of the delegation verdict: the cases the integration tests reproduce against the
//! Samba DC, and the corners around them, all from hand-written facts.

use super::*;
use crate::delegation::facts::{
    DelegateTo, MIGRATION_SERVICE_CLASS, SourceAccount, SpnHolders, TargetHost, Uac, UserFacts,
    collapse_twins, twin_of,
};

const FQDN_SPN: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";
const SHORT_SPN: &str = "Microsoft Virtual System Migration Service/hv2";

fn both_forms(spn: &str) -> Vec<String> {
    let mut v = vec![spn.to_owned()];
    v.extend(twin_of(spn));
    v
}

/// hv1 → hv2 as alice, remote start with alice's ticket, everything configured (any protocol
/// on, both SPNs listed with their twins, both SPNs on HV2$ with their twins), Samba.
fn good() -> DelegationFacts {
    let a2d2: Vec<String> = [FQDN_SPN, SHORT_SPN]
        .iter()
        .flat_map(|s| both_forms(s))
        .collect();
    DelegationFacts {
        directory: DirectoryKind::Samba,
        service_class: MIGRATION_SERVICE_CLASS.to_owned(),
        source: SourceAccount {
            host: "hv1".into(),
            account: "HV1$".into(),
            uac: Uac(Uac::WORKSTATION_TRUST_ACCOUNT | Uac::TRUSTED_TO_AUTH_FOR_DELEGATION),
            allowed_to: collapse_twins(&a2d2),
        },
        target: TargetHost {
            short: "hv2".into(),
            fqdn: "hv2.lab.example.test".into(),
            account: "HV2$".into(),
        },
        target_spns: [FQDN_SPN, SHORT_SPN]
            .iter()
            .map(|s| SpnHolders {
                spn: (*s).to_owned(),
                plain: vec!["HV2$".into()],
                escaped: vec!["HV2$".into()],
            })
            .collect(),
        user: Some(UserFacts {
            name: "alice".into(),
            uac: Uac(Uac::NORMAL_ACCOUNT),
            locked: false,
            protected_users: false,
        }),
        auth: AuthType::Kerberos,
        start: MoveStart::RemoteWithTicket,
        protected_users_enforced: true,
    }
}

fn with_start(start: MoveStart) -> DelegationFacts {
    DelegationFacts { start, ..good() }
}

fn kerberos_only(mut f: DelegationFacts) -> DelegationFacts {
    f.source.uac = f
        .source
        .uac
        .with(Uac::TRUSTED_TO_AUTH_FOR_DELEGATION, false);
    f
}

fn unmet_ids(v: &Verdict) -> Vec<RequirementId> {
    v.unmet().map(|r| r.id).collect()
}

fn kdc(v: &Verdict) -> Vec<&KdcAnswer> {
    v.expected_kdc().iter().map(|(_, k)| k).collect()
}

#[test]
fn any_protocol_without_user_ticket_passes() {
    let v = analyze(&with_start(MoveStart::RemoteWithoutTicket));
    assert!(v.ok(), "{:#?}", v.requirements());
    assert!(v.diagnosis().is_none());
    assert!(v.allowed().is_ok());
    assert_eq!(kdc(&v), vec![&KdcAnswer::Ticket, &KdcAnswer::Ticket]);
    assert_eq!(v.expected_kdc()[0].0, FQDN_SPN, "the FQDN form comes first");
    let pt = &v.requirements()[4];
    assert_eq!(pt.id, RequirementId::ProtocolTransition);
    assert!(pt.met && pt.description.contains("TRUSTED_TO_AUTH_FOR_DELEGATION"));
}

#[test]
fn kerberos_only_with_forwardable_evidence_passes() {
    let v = analyze(&kerberos_only(with_start(MoveStart::RemoteWithTicket)));
    assert!(v.ok(), "{:#?}", v.requirements());
    let pt = v
        .requirements()
        .iter()
        .find(|r| r.id == RequirementId::ProtocolTransition)
        .unwrap();
    assert!(pt.met);
    assert!(
        pt.description.contains("\"Kerberos only\" is enough"),
        "{}",
        pt.description
    );
}

#[test]
fn kerberos_only_with_s4u2self_ticket_needs_protocol_transition() {
    let v = analyze(&kerberos_only(with_start(MoveStart::RemoteWithoutTicket)));
    assert_eq!(unmet_ids(&v), vec![RequirementId::ProtocolTransition]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert!(d.cause.contains("S4U2Self"), "{}", d.cause);
    assert!(d.cause.contains("protocol transition"), "{}", d.cause);
    assert!(
        d.cause.contains("HV1$") && d.cause.contains("alice"),
        "{}",
        d.cause
    );
    assert_eq!(
        d.fix.as_deref(),
        Some(
            "vmgate delegation for-any-protocol hv1 on\nor start the move on hv1 itself, where \
             alice's own ticket is present"
        )
    );
    assert_eq!(kdc(&v), vec![&KdcAnswer::BadOption, &KdcAnswer::BadOption]);
    let err = v.allowed().unwrap_err();
    assert_eq!(&err, d);
}

#[test]
fn target_not_listed() {
    let mut f = good();
    f.source.allowed_to = collapse_twins(&both_forms("cifs/hv3"));
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::SourceMayDelegate]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert_eq!(
        d.cause,
        format!(
            "hv1 may not delegate alice's credentials to \"{FQDN_SPN}\" and \"{SHORT_SPN}\" \
             (msDS-AllowedToDelegateTo on HV1$ does not list it)"
        )
    );
    assert_eq!(
        d.fix.as_deref().unwrap(),
        format!(
            "vmgate delegation add-service hv1 \"{FQDN_SPN}\" \"{SHORT_SPN}\"\nor start the move \
             on hv1 itself, where alice's own ticket is present"
        )
    );
    assert_eq!(kdc(&v), vec![&KdcAnswer::BadOption, &KdcAnswer::BadOption]);
}

#[test]
fn only_one_form_missing_names_only_that_form() {
    let mut f = good();
    f.source.allowed_to = collapse_twins(&both_forms(FQDN_SPN));
    let v = analyze(&f);
    let d = v.diagnosis().unwrap();
    assert!(
        d.cause.contains(SHORT_SPN) && !d.cause.contains(FQDN_SPN),
        "{}",
        d.cause
    );
    assert_eq!(kdc(&v), vec![&KdcAnswer::Ticket, &KdcAnswer::BadOption]);
}

#[test]
fn no_delegation_at_all() {
    let mut f = good();
    f.source = SourceAccount {
        host: "hv3".into(),
        account: "HV3$".into(),
        uac: Uac(Uac::WORKSTATION_TRUST_ACCOUNT),
        allowed_to: Vec::new(),
    };
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::SourceMayDelegate]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert!(
        d.cause.contains("HV3$ has no msDS-AllowedToDelegateTo"),
        "{}",
        d.cause
    );
    assert!(
        d.fix
            .as_deref()
            .unwrap()
            .starts_with("vmgate delegation add-service hv3 ")
    );
    // The S4U2Self path also lacks protocol transition: both are listed, delegation first.
    let v = analyze(&DelegationFacts {
        start: MoveStart::RemoteWithoutTicket,
        ..f
    });
    assert_eq!(
        unmet_ids(&v),
        vec![
            RequirementId::SourceMayDelegate,
            RequirementId::ProtocolTransition
        ]
    );
    assert_eq!(v.fixes().len(), 2);
}

#[test]
fn unconstrained_delegation_is_named() {
    let mut f = good();
    f.source.allowed_to.clear();
    f.source.uac = Uac(Uac::WORKSTATION_TRUST_ACCOUNT | Uac::TRUSTED_FOR_DELEGATION);
    let d = analyze(&f).diagnosis().cloned().unwrap();
    assert!(d.cause.contains("unconstrained delegation"), "{}", d.cause);
}

#[test]
fn sensitive_user_is_refused_naming_the_flag() {
    let mut f = good();
    let bob = f.user.as_mut().unwrap();
    bob.name = "bob".into();
    bob.uac = Uac(Uac::NORMAL_ACCOUNT | Uac::NOT_DELEGATED);
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::UserNotSensitive]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert!(d.cause.contains("NOT_DELEGATED"), "{}", d.cause);
    assert!(
        d.cause.contains("sensitive and cannot be delegated"),
        "{}",
        d.cause
    );
    assert!(d.cause.starts_with("bob's account"), "{}", d.cause);
    assert_eq!(
        d.fix.as_deref(),
        Some(
            "vmgate delegation sensitive bob off\nor start the move on hv1 itself, where bob's \
             own ticket is present"
        )
    );
    // Whether bob's own ticket to hv1 is the evidence or S4U2Self made one, the KDC refuses.
    assert_eq!(kdc(&v), vec![&KdcAnswer::BadOption, &KdcAnswer::BadOption]);
    let v = analyze(&DelegationFacts {
        start: MoveStart::RemoteWithoutTicket,
        ..f.clone()
    });
    assert_eq!(kdc(&v), vec![&KdcAnswer::BadOption, &KdcAnswer::BadOption]);
    // Started on hv1 itself, bob's own ticket needs no delegation.
    assert!(
        analyze(&DelegationFacts {
            start: MoveStart::OnSource,
            ..f.clone()
        })
        .ok()
    );
    // Windows gets the PowerShell equivalent.
    let d = analyze(&DelegationFacts {
        directory: DirectoryKind::Windows,
        ..f
    })
    .diagnosis()
    .cloned()
    .unwrap();
    assert!(
        d.fix
            .unwrap()
            .starts_with("Set-ADAccountControl -Identity bob -AccountNotDelegated $false")
    );
}

#[test]
fn protected_users_member_is_refused() {
    let mut f = good();
    f.user.as_mut().unwrap().protected_users = true;
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::UserNotProtected]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert!(d.cause.contains("Protected Users"));
    assert!(d.fix.as_deref().unwrap().starts_with(
        "on a domain controller: samba-tool group removemembers \"Protected Users\" \
                 alice\nor on Windows (RSAT): Remove-ADGroupMember -Identity \"Protected \
                 Users\" -Members alice\n"
    ));
}

#[test]
fn missing_target_spn_is_target_unknown_and_comes_first() {
    let mut f = good();
    f.target_spns.clear();
    f.source.allowed_to.clear();
    let v = analyze(&f);
    assert_eq!(
        unmet_ids(&v),
        vec![
            RequirementId::TargetSpnFqdn,
            RequirementId::TargetSpnShort,
            RequirementId::SourceMayDelegate
        ]
    );
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::TargetUnknown);
    assert!(
        d.cause.contains("is not registered on any account"),
        "{}",
        d.cause
    );
    assert_eq!(
        d.fix.as_deref(),
        Some(format!("setspn -S \"{FQDN_SPN}\" HV2").as_str())
    );
    assert_eq!(
        kdc(&v),
        vec![&KdcAnswer::PrincipalUnknown, &KdcAnswer::PrincipalUnknown]
    );
    assert_eq!(v.fixes().len(), 3);
}

#[test]
fn duplicated_target_spn_is_wrong_principal() {
    let mut f = good();
    f.target_spns[0].plain.push("HV3$".into());
    f.target_spns[0].escaped.push("HV3$".into());
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::TargetSpnFqdn]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::WrongPrincipal);
    assert!(
        d.cause.contains("registered on 2 accounts (HV2$, HV3$)"),
        "{}",
        d.cause
    );
    assert_eq!(
        d.fix.as_deref(),
        Some(format!("setspn -D \"{FQDN_SPN}\" HV3").as_str())
    );
    // Samba's KDC refuses to choose between two accounts.
    assert_eq!(
        kdc(&v),
        vec![&KdcAnswer::PrincipalUnknown, &KdcAnswer::Ticket]
    );
}

#[test]
fn target_spn_on_another_account_only() {
    let mut f = good();
    f.target_spns[1].plain = vec!["HV3$".into()];
    f.target_spns[1].escaped = vec!["HV3$".into()];
    let v = analyze(&f);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::WrongPrincipal);
    assert!(
        d.cause.contains("registered on HV3$, not on HV2$"),
        "{}",
        d.cause
    );
    assert_eq!(
        d.fix.as_deref(),
        Some(format!("setspn -D \"{SHORT_SPN}\" HV3\nsetspn -S \"{SHORT_SPN}\" HV2").as_str())
    );
    assert_eq!(
        kdc(&v),
        vec![&KdcAnswer::Ticket, &KdcAnswer::WrongPrincipal]
    );
}

#[test]
fn samba_twins_matter_only_on_samba() {
    // The SPN on HV2$ without its escaped twin.
    let mut f = good();
    f.target_spns[0].escaped.clear();
    let v = analyze(&f);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::TargetUnknown);
    assert!(d.cause.contains("without its escaped twin"), "{}", d.cause);
    assert_eq!(kdc(&v)[0], &KdcAnswer::PrincipalUnknown);
    let windows = DelegationFacts {
        directory: DirectoryKind::Windows,
        ..f
    };
    assert!(analyze(&windows).ok());

    // msDS-AllowedToDelegateTo with the plain forms only.
    let mut f = good();
    f.source.allowed_to = collapse_twins(&[FQDN_SPN, SHORT_SPN]);
    let v = analyze(&f);
    let d = v.diagnosis().unwrap();
    assert!(d.cause.contains("only in plain form"), "{}", d.cause);
    assert_eq!(kdc(&v), vec![&KdcAnswer::BadOption, &KdcAnswer::BadOption]);
    f.directory = DirectoryKind::Windows;
    assert!(analyze(&f).ok());
}

#[test]
fn on_source_needs_no_delegation() {
    let mut f = with_start(MoveStart::OnSource);
    f.source.allowed_to.clear();
    f.source.uac = Uac(Uac::WORKSTATION_TRUST_ACCOUNT);
    let v = analyze(&f);
    assert!(v.ok(), "{:#?}", v.requirements());
    assert!(
        v.requirements()[3]
            .description
            .starts_with("no delegation needed")
    );
    assert!(!needs_constrained_delegation(
        AuthType::Kerberos,
        MoveStart::OnSource
    ));
}

#[test]
fn disabled_user_fails_first_with_logon_denied() {
    let mut f = good();
    f.user.as_mut().unwrap().uac = Uac(Uac::NORMAL_ACCOUNT | Uac::ACCOUNTDISABLE);
    f.target_spns.clear();
    let v = analyze(&f);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::LogonDenied);
    assert_eq!(
        d.fix.as_deref(),
        Some(
            "on a domain controller: samba-tool user enable alice\nor on Windows (RSAT): \
             Enable-ADAccount -Identity alice"
        )
    );
    assert_eq!(
        kdc(&v),
        vec![&KdcAnswer::ClientRevoked, &KdcAnswer::ClientRevoked]
    );
    f.user.as_mut().unwrap().uac = Uac(Uac::NORMAL_ACCOUNT);
    f.user.as_mut().unwrap().locked = true;
    let d = analyze(&f).diagnosis().cloned().unwrap();
    assert!(d.cause.contains("locked out"));
}

#[test]
fn credssp_needs_the_users_credentials() {
    let mut f = good();
    f.auth = AuthType::Credssp;
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::CredsspCredentials]);
    let d = v.diagnosis().unwrap();
    assert_eq!(d.code, WinCode::NoCredentials);
    assert!(d.cause.contains("hv1 uses CredSSP"), "{}", d.cause);
    assert!(d.fix.as_deref().unwrap().contains("--forward-credentials"));

    // Constrained delegation settings do not matter for CredSSP.
    f.source.allowed_to.clear();
    f.start = MoveStart::OnSource;
    assert!(analyze(&f).ok());
    f.start = MoveStart::RemoteForwardingCredentials;
    assert!(analyze(&f).ok());
    f.user.as_mut().unwrap().uac = Uac(Uac::NORMAL_ACCOUNT | Uac::NOT_DELEGATED);
    assert_eq!(
        unmet_ids(&analyze(&f)),
        vec![RequirementId::UserNotSensitive]
    );
}

#[test]
fn without_a_user_only_host_requirements_are_checked() {
    let mut f = kerberos_only(with_start(MoveStart::RemoteWithoutTicket));
    f.user = None;
    let v = analyze(&f);
    assert_eq!(unmet_ids(&v), vec![RequirementId::ProtocolTransition]);
    assert!(v.diagnosis().unwrap().cause.contains("from the user"));
    assert!(
        !v.requirements()
            .iter()
            .any(|r| r.id == RequirementId::UserEnabled)
    );
}

#[test]
fn protocol_transition_table() {
    use MoveStart::*;
    for (auth, start, needed) in [
        (AuthType::Kerberos, OnSource, false),
        (AuthType::Kerberos, RemoteWithTicket, false),
        (AuthType::Kerberos, RemoteWithoutTicket, true),
        (AuthType::Kerberos, RemoteForwardingCredentials, false),
        (AuthType::Credssp, RemoteWithoutTicket, false),
        (AuthType::Credssp, OnSource, false),
    ] {
        assert_eq!(
            needs_protocol_transition(auth, start),
            needed,
            "{auth} {start:?}"
        );
    }
}

#[test]
fn kdc_answers_agree_by_meaning() {
    assert!(KdcAnswer::BadOption.agrees_with(&KdcAnswer::NotForwardable));
    assert!(KdcAnswer::Ticket.agrees_with(&KdcAnswer::Ticket));
    assert!(!KdcAnswer::Ticket.agrees_with(&KdcAnswer::BadOption));
    assert!(!KdcAnswer::PrincipalUnknown.agrees_with(&KdcAnswer::BadOption));
    assert_eq!(
        KdcAnswer::PrincipalUnknown.win_code(),
        Some(WinCode::TargetUnknown)
    );
}

#[test]
fn verdict_serializes_for_scripts() {
    let v = analyze(&kerberos_only(with_start(MoveStart::RemoteWithoutTicket)));
    let json = serde_json_value(&v);
    assert!(json.contains("\"ok\":false"), "{json}");
    assert!(json.contains("\"id\":\"protocol-transition\""), "{json}");
    assert!(json.contains("\"code\":\"0x8009030E\""), "{json}");
    assert!(json.contains("\"kdc\":\"KDC_ERR_BADOPTION\""), "{json}");
}

fn serde_json_value<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn shell_words() {
    assert_eq!(shell_word("hv1"), "hv1");
    assert_eq!(
        shell_word("cifs/hv2.lab.example.test"),
        "cifs/hv2.lab.example.test"
    );
    assert_eq!(shell_word(FQDN_SPN), format!("\"{FQDN_SPN}\""));
    assert_eq!(shell_word("a\"b$"), "\"a\\\"b\\$\"");
    assert_eq!(shell_word(""), "\"\"");
}

#[test]
fn delegate_entry_is_case_insensitive() {
    let f = good();
    let e: &DelegateTo = f.source.delegate_entry(&FQDN_SPN.to_uppercase()).unwrap();
    assert!(e.plain && e.escaped);
}
