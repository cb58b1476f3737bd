//! Output shared by the tools: Windows setspn's text, JSON, and error reports.
//!
//! The setspn texts follow Windows setspn line by line where Windows has a text
//! ("Checking domain DC=...", "Registering ServicePrincipalNames for CN=...", a tab before each
//! SPN, "Updated object", "Duplicate SPN found, aborting operation!", "Registered
//! ServicePrincipalNames for CN=...:", "Existing SPN found!", "No such SPN found.",
//! "found N group of duplicate SPNs." — Windows does not pluralise "group").

use std::error::Error;
use std::fmt::Write as _;

use vmgate_auth::Diagnosis;

/// Whether a query ran against the domain or the forest (`-F`); one domain here either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchLevel {
    /// `Checking domain DC=...`
    #[default]
    Domain,
    /// `Checking forest DC=...` (`-F`)
    Forest,
}

/// `Checking domain DC=lab,DC=example,DC=test`
pub fn checking(level: SearchLevel, base_dn: &str) -> String {
    let what = match level {
        SearchLevel::Domain => "domain",
        SearchLevel::Forest => "forest",
    };
    format!("Checking {what} {base_dn}\n")
}

fn indented(out: &mut String, values: &[String]) {
    for v in values {
        let _ = writeln!(out, "\t{v}");
    }
}

/// An object and its SPNs, as setspn prints them under a DN.
pub fn object(dn: &str, spns: &[String]) -> String {
    let mut out = format!("{dn}\n");
    indented(&mut out, spns);
    out
}

/// `-L`: `Registered ServicePrincipalNames for CN=...:` and the SPNs.
pub fn registered(dn: &str, spns: &[String]) -> String {
    let mut out = format!("Registered ServicePrincipalNames for {dn}:\n");
    indented(&mut out, spns);
    out
}

/// `-S`/`-A`/`-R` success: `Registering ServicePrincipalNames for CN=...`, the SPNs,
/// `Updated object`.
pub fn registering(dn: &str, spns: &[String]) -> String {
    let mut out = format!("Registering ServicePrincipalNames for {dn}\n");
    indented(&mut out, spns);
    out.push_str("Updated object\n");
    out
}

/// `-D` success: `Unregistering ServicePrincipalNames for CN=...`, the SPNs, `Updated object`.
pub fn unregistering(dn: &str, spns: &[String]) -> String {
    let mut out = format!("Unregistering ServicePrincipalNames for {dn}\n");
    indented(&mut out, spns);
    out.push_str("Updated object\n");
    out
}

/// `-S` refused: each holder with the SPN it holds, then `Duplicate SPN found, aborting operation!`.
pub fn duplicate_found(holders: &[(String, Vec<String>)]) -> String {
    let mut out = String::new();
    for (dn, spns) in holders {
        out.push_str(&object(dn, spns));
    }
    out.push_str("\nDuplicate SPN found, aborting operation!\n");
    out
}

/// `-Q`: each matching object with its SPNs, then `Existing SPN found!` or `No such SPN found.`
pub fn query(found: &[(String, Vec<String>)]) -> String {
    let mut out = String::new();
    for (dn, spns) in found {
        out.push_str(&object(dn, spns));
    }
    if found.is_empty() {
        out.push_str("\nNo such SPN found.\n");
    } else {
        out.push_str("\nExisting SPN found!\n");
    }
    out
}

/// `-X`: each duplicated SPN with the accounts holding it, then `found N group of duplicate SPNs.`
pub fn duplicates(groups: &[(String, Vec<String>)]) -> String {
    let mut out = String::new();
    for (spn, dns) in groups {
        let _ = writeln!(out, "{spn} is registered on these accounts:");
        indented(&mut out, dns);
        out.push('\n');
    }
    if groups.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "found {} group of duplicate SPNs.", groups.len());
    out
}

/// An error with its whole chain of causes on one line: `a: b: c` (the printer every vmgate
/// binary shares, [`vmgate_control::error::chain`]).
pub fn error_chain(err: &dyn Error) -> String {
    vmgate_control::error::chain(err)
}

/// The text printed for a failed command: `PROGRAM: error chain`, and the diagnosis below it.
pub fn error_report(program: &str, err: &dyn Error, diagnosis: Option<&Diagnosis>) -> String {
    let mut out = format!("{program}: {}\n", error_chain(err));
    if let Some(d) = diagnosis {
        let _ = writeln!(out, "{d}");
    }
    out
}

/// The JSON object printed for a failed command with `--json`.
pub fn error_json(err: &dyn Error, exit_code: u8, diagnosis: Option<&Diagnosis>) -> String {
    serde_json::json!({
        "error": error_chain(err),
        "exit_code": exit_code,
        "diagnosis": diagnosis,
    })
    .to_string()
}

/// Prints a command's result: as pretty JSON with `json`, else `text()`. A result that cannot
/// be encoded is reported on stderr as `program: ...` and gives the usage exit code (`Err`).
pub fn print_result<T: serde::Serialize>(
    program: &str,
    json: bool,
    result: &T,
    text: impl FnOnce() -> String,
) -> Result<(), u8> {
    if !json {
        print!("{}", text());
        return Ok(());
    }
    match serde_json::to_string_pretty(result) {
        Ok(encoded) => {
            println!("{encoded}");
            Ok(())
        }
        Err(e) => {
            eprintln!("{program}: cannot encode the result as JSON: {e}");
            Err(crate::exit::USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DN: &str = "CN=HV2,CN=Computers,DC=lab,DC=example,DC=test";
    const MIG: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";

    #[test]
    fn texts_match_windows_setspn() {
        assert_eq!(
            checking(SearchLevel::Domain, "DC=lab,DC=example,DC=test"),
            "Checking domain DC=lab,DC=example,DC=test\n"
        );
        assert_eq!(
            checking(SearchLevel::Forest, "DC=lab"),
            "Checking forest DC=lab\n"
        );
        assert_eq!(
            registering(DN, &[MIG.to_owned()]),
            format!("Registering ServicePrincipalNames for {DN}\n\t{MIG}\nUpdated object\n")
        );
        assert_eq!(
            unregistering(DN, &[MIG.to_owned()]),
            format!("Unregistering ServicePrincipalNames for {DN}\n\t{MIG}\nUpdated object\n")
        );
        assert_eq!(
            registered(DN, &["HOST/hv2".to_owned(), MIG.to_owned()]),
            format!("Registered ServicePrincipalNames for {DN}:\n\tHOST/hv2\n\t{MIG}\n")
        );
        assert_eq!(
            duplicate_found(&[(DN.to_owned(), vec![MIG.to_owned()])]),
            format!("{DN}\n\t{MIG}\n\nDuplicate SPN found, aborting operation!\n")
        );
        assert_eq!(query(&[]), "\nNo such SPN found.\n");
        assert_eq!(
            query(&[(DN.to_owned(), vec!["HOST/hv2".to_owned()])]),
            format!("{DN}\n\tHOST/hv2\n\nExisting SPN found!\n")
        );
        assert_eq!(duplicates(&[]), "\nfound 0 group of duplicate SPNs.\n");
        assert_eq!(
            duplicates(&[(
                "HOST/x".to_owned(),
                vec!["CN=A".to_owned(), "CN=B".to_owned()]
            )]),
            "HOST/x is registered on these accounts:\n\tCN=A\n\tCN=B\n\nfound 1 group of \
             duplicate SPNs.\n"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn errors_print_their_chain_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        let d = vmgate_auth::Diagnosis::new(vmgate_auth::WinCode::LogonDenied, "bad password");
        let text = error_report("setspn", &e, Some(&d));
        assert!(text.starts_with("setspn: outer: inner\nerror 0x8009030C (SEC_E_LOGON_DENIED)"));
        let json: serde_json::Value = serde_json::from_str(&error_json(&e, 5, Some(&d))).unwrap();
        assert_eq!(json["exit_code"], 5);
        assert_eq!(json["diagnosis"]["code"], "0x8009030C");
    }
}
