//! Service principal names: parsing, formatting, comparison, and the Samba escaped-twin quirk.
//!
//! An SPN is `class/host[:port][/name]`, e.g.
//! `Microsoft Virtual System Migration Service/hv2.lab.example.test` or
//! `MSSQLSvc/db1.lab.example.test:1433`. Spaces are allowed (Hyper-V's service classes have
//! them). Comparison is case-insensitive, as Active Directory compares `servicePrincipalName`
//! values.
//!
//! # The Samba escaped twin
//!
//! Samba 4.17's KDC (Heimdal) looks a service up by the *unparsed* Kerberos name, in which a
//! space inside a component is escaped with a backslash:
//! `Microsoft\ Virtual\ System\ Migration\ Service/hv2.lab.example.test`. With only the plain
//! value stored, the KDC answers "Server not found in Kerberos database". vmgate therefore stores,
//! on a Samba DC, the escaped **twin** next to the plain value, in `servicePrincipalName` and in
//! `msDS-AllowedToDelegateTo`. The functions here keep the rules in one place:
//!
//! * [`samba_twin`] gives the twin of an SPN (only SPNs whose text changes when escaped have one);
//! * [`stored_values`] gives the values to write for an SPN (plain, plus the twin on Samba);
//! * [`collapse_twins`] hides twins when listing (a twin whose plain form is present is shown
//!   once, as the plain form);
//! * [`canonical_key`] maps a stored value and its twin to the same key, so duplicate checks do not
//!   count a twin as a second registration.
//!
//! A Windows DC does not need the twin; vmgate does not write one there, but still recognises and
//! removes twins it finds.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Errors from parsing an SPN or an SPN pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpnError {
    /// Nothing was given.
    #[error("the SPN is empty")]
    Empty,
    /// There is no `/` between the service class and the host.
    #[error("\"{0}\" is not an SPN: expected class/host[:port][/name]")]
    MissingSlash(String),
    /// More than `class/host/name`.
    #[error("\"{0}\" is not an SPN: too many \"/\" (expected class/host[:port][/name])")]
    TooManyParts(String),
    /// The service class is empty.
    #[error("\"{0}\" is not an SPN: the service class before \"/\" is empty")]
    EmptyClass(String),
    /// The host is empty.
    #[error("\"{0}\" is not an SPN: the host after \"/\" is empty")]
    EmptyHost(String),
    /// The service name after the second `/` is empty.
    #[error("\"{0}\" is not an SPN: the service name after the second \"/\" is empty")]
    EmptyName(String),
    /// The port after `:` is not a number from 1 to 65535.
    #[error("\"{0}\" is not an SPN: the port after \":\" must be a number from 1 to 65535")]
    BadPort(String),
    /// A control character (newline, tab, NUL, ...) inside the SPN.
    #[error("\"{0}\" is not an SPN: it contains a control character")]
    ControlCharacter(String),
    /// A backslash: the escaped (Samba) form is managed by vmgate, not typed by users.
    #[error(
        "\"{0}\" is not an SPN: it contains a backslash (give the plain form with spaces; \
         vmgate writes Samba's escaped form itself)"
    )]
    Backslash(String),
    /// Spaces at the start or the end (almost always a quoting mistake).
    #[error("\"{0}\" is not an SPN: it starts or ends with a space")]
    OuterSpace(String),
    /// The SPN is longer than AD allows for a `servicePrincipalName` value.
    #[error("the SPN is longer than {MAX_SPN_LEN} characters")]
    TooLong,
}

/// The longest SPN accepted (AD's `servicePrincipalName` has `rangeUpper` 2048).
pub const MAX_SPN_LEN: usize = 2048;

/// A parsed service principal name: `class/host[:port][/name]`.
///
/// Equality and hashing ignore case; [`Display`](fmt::Display) gives the text as it was written.
#[derive(Clone, Debug)]
pub struct Spn {
    text: String,
    class_end: usize,
    host: (usize, usize),
    port: Option<u16>,
    name_start: Option<usize>,
}

impl Spn {
    /// Parses `class/host[:port][/name]`.
    pub fn parse(text: &str) -> Result<Spn, SpnError> {
        if text.is_empty() {
            return Err(SpnError::Empty);
        }
        if text.chars().count() > MAX_SPN_LEN {
            return Err(SpnError::TooLong);
        }
        let owned = || text.to_owned();
        if text.chars().any(char::is_control) {
            return Err(SpnError::ControlCharacter(owned()));
        }
        if text.contains('\\') {
            return Err(SpnError::Backslash(owned()));
        }
        if text.starts_with(char::is_whitespace) || text.ends_with(char::is_whitespace) {
            return Err(SpnError::OuterSpace(owned()));
        }
        let Some((class, rest)) = text.split_once('/') else {
            return Err(SpnError::MissingSlash(owned()));
        };
        if class.trim().is_empty() {
            return Err(SpnError::EmptyClass(owned()));
        }
        let (host_port, name) = match rest.split_once('/') {
            Some((hp, name)) => {
                if name.contains('/') {
                    return Err(SpnError::TooManyParts(owned()));
                }
                if name.trim().is_empty() {
                    return Err(SpnError::EmptyName(owned()));
                }
                (hp, Some(name))
            }
            None => (rest, None),
        };
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| SpnError::BadPort(owned()))?;
                (host, Some(port))
            }
            None => (host_port, None),
        };
        if host.trim().is_empty() {
            return Err(SpnError::EmptyHost(owned()));
        }
        let class_end = class.len();
        let host_start = class_end + 1;
        Ok(Spn {
            text: text.to_owned(),
            class_end,
            host: (host_start, host_start + host.len()),
            port,
            name_start: name.map(|n| text.len() - n.len()),
        })
    }

    /// Builds `class/host` (e.g. the migration SPN of a host).
    pub fn new(class: &str, host: &str) -> Result<Spn, SpnError> {
        Spn::parse(&format!("{class}/{host}"))
    }

    /// The service class, e.g. `Microsoft Virtual System Migration Service` or `HOST`.
    pub fn class(&self) -> &str {
        self.text.get(..self.class_end).unwrap_or_default()
    }

    /// The host (without port), e.g. `hv2.lab.example.test`.
    pub fn host(&self) -> &str {
        self.text.get(self.host.0..self.host.1).unwrap_or_default()
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The service name after the second `/`, if one was given.
    pub fn name(&self) -> Option<&str> {
        self.name_start.and_then(|s| self.text.get(s..))
    }

    /// The SPN as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the stored value `value` (plain or a Samba twin) names this SPN.
    pub fn matches_value(&self, value: &str) -> bool {
        canonical_key(value) == canonical_key(&self.text)
    }

    /// The Kerberos principal name for this SPN in `realm` (`class/host@REALM`), as GSSAPI and
    /// `kvno` take it (with spaces, unescaped).
    pub fn principal(&self, realm: &str) -> String {
        format!("{}@{}", self.text, realm)
    }
}

impl PartialEq for Spn {
    fn eq(&self, other: &Spn) -> bool {
        self.text.to_lowercase() == other.text.to_lowercase()
    }
}

impl Eq for Spn {}

impl Hash for Spn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.to_lowercase().hash(state);
    }
}

impl fmt::Display for Spn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Spn {
    type Err = SpnError;
    fn from_str(s: &str) -> Result<Spn, SpnError> {
        Spn::parse(s)
    }
}

impl serde::Serialize for Spn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// An SPN query pattern as `setspn -Q` takes it: an SPN in which `*` matches any run of
/// characters (`*/hv2*`, `Microsoft Virtual System Migration Service/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpnPattern(String);

impl SpnPattern {
    /// Checks a pattern: not empty, no control characters, no backslash, bounded length.
    pub fn parse(text: &str) -> Result<SpnPattern, SpnError> {
        if text.is_empty() {
            return Err(SpnError::Empty);
        }
        if text.chars().count() > MAX_SPN_LEN {
            return Err(SpnError::TooLong);
        }
        if text.chars().any(char::is_control) {
            return Err(SpnError::ControlCharacter(text.to_owned()));
        }
        if text.contains('\\') {
            return Err(SpnError::Backslash(text.to_owned()));
        }
        Ok(SpnPattern(text.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the pattern has a `*`.
    pub fn has_wildcard(&self) -> bool {
        self.0.contains('*')
    }

    /// Whether `value` (a plain SPN or a Samba twin) matches, ignoring case, `*` matching any run.
    pub fn matches(&self, value: &str) -> bool {
        let value = canonical_key(value);
        let pattern = self.0.to_lowercase();
        wildcard_match(&pattern, &value)
    }

    /// The pattern Samba's twins of matching SPNs have (spaces escaped), for a directory filter.
    pub fn samba_twin(&self) -> Option<String> {
        let escaped = escape_components(&self.0);
        (escaped != self.0).then_some(escaped)
    }
}

impl fmt::Display for SpnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Glob matching with `*` only, without recursion blow-up (greedy with backtracking to the last
/// star, linear in practice).
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|c| *c == '*'))
}

/// Characters Heimdal's unparse escapes with a backslash inside a principal component.
const ESCAPED: [char; 3] = [' ', '\\', '@'];

fn escape_components(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if ESCAPED.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The escaped twin Samba's KDC needs for `spn`, or `None` when the escaped text is the same as
/// the plain one (no space in it).
///
/// `Microsoft Virtual System Migration Service/hv2` → `Microsoft\ Virtual\ System\ Migration\ Service/hv2`.
pub fn samba_twin(spn: &Spn) -> Option<String> {
    let escaped = escape_components(spn.as_str());
    (escaped != spn.as_str()).then_some(escaped)
}

/// The values to write into `servicePrincipalName` (or `msDS-AllowedToDelegateTo`) for `spn`:
/// the plain form, and on a Samba DC also its twin.
pub fn stored_values(spn: &Spn, samba: bool) -> Vec<String> {
    let mut values = vec![spn.as_str().to_owned()];
    if samba {
        values.extend(samba_twin(spn));
    }
    values
}

/// The plain form of an escaped twin (`a\ b/h` → `a b/h`), or `None` when `value` has no escape.
pub fn unescape_twin(value: &str) -> Option<String> {
    if !value.contains('\\') {
        return None;
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next) => out.push(next),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// True when `value` is the escaped twin of a value in `values` (compared ignoring case).
pub fn is_twin_of_any(value: &str, values: &[String]) -> bool {
    match unescape_twin(value) {
        Some(plain) => {
            let plain = plain.to_lowercase();
            values.iter().any(|v| v.to_lowercase() == plain)
        }
        None => false,
    }
}

/// The key under which a stored value is compared: unescaped and lower-cased, so an SPN, its
/// twin and a differently-cased copy all have the same key.
pub fn canonical_key(value: &str) -> String {
    unescape_twin(value)
        .unwrap_or_else(|| value.to_owned())
        .to_lowercase()
}

/// The values as a user should see them: each SPN once, twins whose plain form is present left
/// out (order kept). A twin stored without its plain form is shown as stored, since that is
/// what the directory holds.
pub fn collapse_twins(values: &[String]) -> Vec<String> {
    values
        .iter()
        .filter(|v| !is_twin_of_any(v, values))
        .cloned()
        .collect()
}

/// The stored values that name `spn` (its plain form in any case, and its twin): what to delete
/// so that no trace of the SPN is left.
pub fn values_naming(spn: &Spn, values: &[String]) -> Vec<String> {
    values
        .iter()
        .filter(|v| spn.matches_value(v))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIG: &str = "Microsoft Virtual System Migration Service/hv2.lab.example.test";

    #[test]
    fn parses_the_forms_setspn_takes() {
        let s = Spn::parse(MIG).unwrap();
        assert_eq!(s.class(), "Microsoft Virtual System Migration Service");
        assert_eq!(s.host(), "hv2.lab.example.test");
        assert_eq!(s.port(), None);
        assert_eq!(s.name(), None);
        assert_eq!(s.to_string(), MIG);

        let s = Spn::parse("MSSQLSvc/db1.lab.example.test:1433").unwrap();
        assert_eq!(
            (s.class(), s.host(), s.port()),
            ("MSSQLSvc", "db1.lab.example.test", Some(1433))
        );

        let s = Spn::parse("ldap/dc1.lab.example.test:389/lab.example.test").unwrap();
        assert_eq!(s.host(), "dc1.lab.example.test");
        assert_eq!(s.port(), Some(389));
        assert_eq!(s.name(), Some("lab.example.test"));

        let s = Spn::parse("ldap/dc1/LAB").unwrap();
        assert_eq!((s.host(), s.port(), s.name()), ("dc1", None, Some("LAB")));
        assert_eq!(Spn::new("HOST", "hv1").unwrap().as_str(), "HOST/hv1");
    }

    #[test]
    fn rejects_malformed_spns_with_a_reason() {
        assert_eq!(Spn::parse(""), Err(SpnError::Empty));
        assert!(matches!(
            Spn::parse("hv2.lab.example.test"),
            Err(SpnError::MissingSlash(_))
        ));
        assert!(matches!(Spn::parse("/hv2"), Err(SpnError::EmptyClass(_))));
        assert!(matches!(Spn::parse("HOST/"), Err(SpnError::EmptyHost(_))));
        assert!(matches!(
            Spn::parse("HOST/:80"),
            Err(SpnError::EmptyHost(_))
        ));
        assert!(matches!(Spn::parse("HOST/h/"), Err(SpnError::EmptyName(_))));
        assert!(matches!(
            Spn::parse("a/b/c/d"),
            Err(SpnError::TooManyParts(_))
        ));
        for bad in [
            "HOST/h:0",
            "HOST/h:65536",
            "HOST/h:x",
            "HOST/h:",
            "HOST/h:+1",
        ] {
            assert!(
                matches!(Spn::parse(bad), Err(SpnError::BadPort(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Spn::parse("HOST/h\nx"),
            Err(SpnError::ControlCharacter(_))
        ));
        assert!(matches!(Spn::parse("a\\ b/h"), Err(SpnError::Backslash(_))));
        assert!(matches!(
            Spn::parse(" HOST/h"),
            Err(SpnError::OuterSpace(_))
        ));
        assert_eq!(
            Spn::parse(&format!("HOST/{}", "h".repeat(MAX_SPN_LEN))),
            Err(SpnError::TooLong)
        );
        assert_eq!(
            Spn::parse("nope").unwrap_err().to_string(),
            "\"nope\" is not an SPN: expected class/host[:port][/name]"
        );
    }

    #[test]
    fn compares_ignoring_case() {
        let a = Spn::parse("HOST/HV2.lab.example.test").unwrap();
        let b = Spn::parse("host/hv2.LAB.example.test").unwrap();
        assert_eq!(a, b);
        let set: std::collections::HashSet<_> = [a, b].into_iter().collect();
        assert_eq!(set.len(), 1);
        assert_ne!(
            Spn::parse("HOST/hv2").unwrap(),
            Spn::parse("HOST/hv3").unwrap()
        );
    }

    #[test]
    fn twin_escapes_spaces_and_only_exists_when_needed() {
        let s = Spn::parse(MIG).unwrap();
        assert_eq!(
            samba_twin(&s).as_deref(),
            Some("Microsoft\\ Virtual\\ System\\ Migration\\ Service/hv2.lab.example.test")
        );
        assert_eq!(samba_twin(&Spn::parse("HOST/hv2").unwrap()), None);
        assert_eq!(stored_values(&s, false), vec![MIG.to_owned()]);
        assert_eq!(stored_values(&s, true).len(), 2);
        assert_eq!(
            stored_values(&Spn::parse("HOST/hv2").unwrap(), true),
            vec!["HOST/hv2".to_owned()]
        );
        let twin = samba_twin(&s).unwrap();
        assert_eq!(unescape_twin(&twin).as_deref(), Some(MIG));
        assert_eq!(unescape_twin("HOST/hv2"), None);
        assert_eq!(unescape_twin("a\\"), Some("a\\".to_owned()));
        assert!(s.matches_value(&twin));
        assert!(s.matches_value(&MIG.to_uppercase()));
        assert_eq!(canonical_key(&twin), canonical_key(MIG));
    }

    #[test]
    fn listing_collapses_twins_and_deleting_names_both() {
        let s = Spn::parse(MIG).unwrap();
        let twin = samba_twin(&s).unwrap();
        let values = vec![
            "HOST/hv2".to_owned(),
            MIG.to_owned(),
            twin.clone(),
            "HOST/hv2.lab.example.test".to_owned(),
        ];
        assert_eq!(
            collapse_twins(&values),
            vec![
                "HOST/hv2".to_owned(),
                MIG.to_owned(),
                "HOST/hv2.lab.example.test".to_owned()
            ]
        );
        assert_eq!(
            values_naming(&s, &values),
            vec![MIG.to_owned(), twin.clone()]
        );
        // A lone twin (plain form missing) is shown as stored.
        assert_eq!(collapse_twins(std::slice::from_ref(&twin)), vec![twin]);
    }

    #[test]
    fn patterns_match_with_stars_ignoring_case_and_twins() {
        let p = SpnPattern::parse("microsoft virtual*/HV2*").unwrap();
        assert!(p.has_wildcard());
        assert!(p.matches(MIG));
        assert!(p.matches(&samba_twin(&Spn::parse(MIG).unwrap()).unwrap()));
        assert!(!p.matches("HOST/hv2"));
        assert!(SpnPattern::parse("*/*").unwrap().matches("HOST/x"));
        assert!(SpnPattern::parse("*").unwrap().matches(""));
        assert!(!SpnPattern::parse("a*b").unwrap().matches("acbx"));
        assert!(SpnPattern::parse("a*b*c").unwrap().matches("aXbYbZc"));
        assert!(SpnPattern::parse("HOST/hv2").unwrap().matches("host/HV2"));
        assert!(!SpnPattern::parse("HOST/hv2").unwrap().matches("host/hv22"));
        assert_eq!(
            SpnPattern::parse("a b/*").unwrap().samba_twin().as_deref(),
            Some("a\\ b/*")
        );
        assert!(SpnPattern::parse("").is_err());
        assert!(SpnPattern::parse("a\\b").is_err());
    }

    #[test]
    fn principal_keeps_spaces() {
        let s = Spn::parse(MIG).unwrap();
        assert_eq!(
            s.principal("LAB.EXAMPLE.TEST"),
            format!("{MIG}@LAB.EXAMPLE.TEST")
        );
    }
}
