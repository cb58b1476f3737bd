//! Escaping of values put into LDAP filters (RFC 4515) and DNs (RFC 4514).
//!
//! Every value that reaches a filter goes through [`escape_value`] (or [`escape_pattern`] for
//! `setspn -Q`, where `*` stays a wildcard). Nothing a user types can change a filter's structure.

/// Escapes a value for an equality or substring assertion: `*`, `(`, `)`, `\` and NUL become
/// `\2a`, `\28`, `\29`, `\5c`, `\00` (RFC 4515 section 3). Other characters, including non-ASCII
/// UTF-8, are passed as they are.
pub fn escape_value(value: &str) -> String {
    escape(value, false)
}

/// Like [`escape_value`], but `*` stays a wildcard (for `setspn -Q` patterns).
pub fn escape_pattern(pattern: &str) -> String {
    escape(pattern, true)
}

fn escape(value: &str, keep_star: bool) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '*' if keep_star => out.push('*'),
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// `(attr=value)` with `value` escaped.
pub fn eq(attr: &str, value: &str) -> String {
    format!("({attr}={})", escape_value(value))
}

/// Escapes a value for use as an RDN value in a DN (RFC 4514 section 2.4): `, + " \ < > ; =`
/// are backslash-escaped, as are a leading `#` or space and a trailing space; NUL becomes `\00`.
pub fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_special_character_of_rfc4515() {
        assert_eq!(escape_value("a*b(c)d\\e\0f"), "a\\2ab\\28c\\29d\\5ce\\00f");
        assert_eq!(escape_value("hv2$"), "hv2$");
        assert_eq!(escape_value("Ünïcode ok"), "Ünïcode ok");
        assert_eq!(
            eq("sAMAccountName", "x)(uid=*"),
            "(sAMAccountName=x\\29\\28uid=\\2a)"
        );
    }

    #[test]
    fn pattern_keeps_stars_only() {
        assert_eq!(escape_pattern("*/hv2*"), "*/hv2*");
        assert_eq!(escape_pattern("a\\ b/(x)*"), "a\\5c b/\\28x\\29*");
    }

    #[test]
    fn escapes_dn_values() {
        assert_eq!(escape_dn_value("Smith, John"), "Smith\\, John");
        assert_eq!(escape_dn_value("#a b "), "\\#a b\\ ");
        assert_eq!(escape_dn_value(" x"), "\\ x");
        assert_eq!(
            escape_dn_value("a=b+c;d<e>\"f\\"),
            "a\\=b\\+c\\;d\\<e\\>\\\"f\\\\"
        );
        assert_eq!(escape_dn_value("HV2"), "HV2");
    }
}
