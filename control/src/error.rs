//! The one error-chain printer of every vmgate binary (vmgated, vmgate, setspn, the probes):
//! an error and its `#[source]`s, one sentence after the other.

use std::error::Error;

/// An error with its whole chain of causes on one line: `a: b: c`. A cause whose text the
/// line already holds (ldap3 and io errors sometimes repeat their inner error in their own
/// text) is not repeated.
pub fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What a binary prints for an error that ends it: `PROGRAM: chain`.
pub fn report(program: &str, err: &dyn Error) -> String {
    format!("{program}: {}", chain(err))
}

/// Prints [`report`] on stderr: the last word of a program that cannot go on (not a log
/// record: logs go through `tracing`).
pub fn print(program: &str, err: &dyn Error) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{}", report(program, err));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the configuration file /x")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("the link failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn chains_are_printed_once_each() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory",
        ));
        assert_eq!(
            report("vmgated", &e),
            "vmgated: cannot read the configuration file /x: No such file or directory"
        );
        let r = Repeats(std::io::Error::other("reset"));
        assert_eq!(chain(&r), "the link failed: reset");
    }
}
