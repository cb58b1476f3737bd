//! The `tracing` subscriber every vmgate binary installs: the one logging facade.
//!
//! * Under systemd (stderr is the journal stream `JOURNAL_STREAM` names, or the process runs as
//!   a unit — `INVOCATION_ID` — without a journal stream) records go to the journal
//!   (`tracing-journald`), with their fields as journal fields; otherwise to stderr.
//! * `RUST_LOG` (an `EnvFilter`, such as `vmgate=debug`) decides what is recorded when set.
//!   Otherwise the binary's default level, raised by each `-v` and lowered by each `-q`, applies
//!   to vmgate's own crates; other crates record warnings and errors only.
//!
//! A program's final error (the one it exits with) is not a log record: it is printed with
//! [`crate::error::print`].

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `-v` / `-q`, for binaries that take them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log more (repeat for more detail; RUST_LOG overrides).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log less (repeat to log nothing; RUST_LOG overrides).
    #[arg(short = 'q', long = "quiet", action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
}

/// The crates whose records the verbosity governs.
const OWN_CRATES: [&str; 11] = [
    "vmgated",
    "vmgate",
    "vmgate_auth",
    "vmgate_migrate",
    "vmgate_control",
    "vmgate_tools",
    "vmgate_testkit",
    "setspn",
    "vmgate_channel",
    "vmgate_host",
    "vmgate_vm",
];

const LEVELS: [LevelFilter; 6] = [
    LevelFilter::OFF,
    LevelFilter::ERROR,
    LevelFilter::WARN,
    LevelFilter::INFO,
    LevelFilter::DEBUG,
    LevelFilter::TRACE,
];

/// The level for vmgate's crates: `default`, `verbose` steps up, `quiet` steps down.
pub fn level(default: LevelFilter, args: LogArgs) -> LevelFilter {
    let at = LEVELS.iter().position(|l| *l == default).unwrap_or(3);
    let at = (at + usize::from(args.verbose)).saturating_sub(usize::from(args.quiet));
    LEVELS[at.min(LEVELS.len() - 1)]
}

/// The filter without `RUST_LOG`: vmgate's crates at `own`, the others at `own` but no more
/// than warnings.
pub fn default_filter(own: LevelFilter) -> String {
    let others = own.min(LevelFilter::WARN);
    let mut spec = others.to_string().to_lowercase();
    for c in OWN_CRATES {
        spec.push_str(&format!(",{c}={}", own.to_string().to_lowercase()));
    }
    spec
}

/// Where the records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// The systemd journal.
    Journal,
    /// Standard error.
    Stderr,
}

/// Whether this process logs to the journal: its stderr is the journal stream systemd set up
/// (`JOURNAL_STREAM` is `DEVICE:INODE` of that stream), or it runs as a unit without one.
pub fn sink() -> Sink {
    match std::env::var("JOURNAL_STREAM") {
        Ok(stream) if stderr_is(&stream) => Sink::Journal,
        Ok(_) => Sink::Stderr,
        Err(_) if std::env::var_os("INVOCATION_ID").is_some() => Sink::Journal,
        Err(_) => Sink::Stderr,
    }
}

fn stderr_is(stream: &str) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the subscriber for `program` (its journal identifier) with vmgate's crates at
/// `default` adjusted by `args`, unless `RUST_LOG` says otherwise. Returns where records go.
/// A second call (tests) changes nothing.
pub fn init(program: &str, default: LevelFilter, args: LogArgs) -> Sink {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::builder()
            .with_default_directive(LevelFilter::WARN.into())
            .parse_lossy(spec),
        _ => EnvFilter::new(default_filter(level(default, args))),
    };
    let mut sink = sink();
    if sink == Sink::Journal {
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal.with_syslog_identifier(program.to_owned());
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(journal)
                    .try_init();
                return sink;
            }
            Err(_) => sink = Sink::Stderr,
        }
    }
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .try_init();
    sink
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_steps_through_the_levels() {
        let a = |verbose, quiet| LogArgs { verbose, quiet };
        assert_eq!(level(LevelFilter::INFO, a(0, 0)), LevelFilter::INFO);
        assert_eq!(level(LevelFilter::INFO, a(1, 0)), LevelFilter::DEBUG);
        assert_eq!(level(LevelFilter::INFO, a(5, 0)), LevelFilter::TRACE);
        assert_eq!(level(LevelFilter::WARN, a(0, 1)), LevelFilter::ERROR);
        assert_eq!(level(LevelFilter::WARN, a(0, 9)), LevelFilter::OFF);
        assert_eq!(level(LevelFilter::WARN, a(1, 1)), LevelFilter::WARN);
        let f = default_filter(LevelFilter::DEBUG);
        assert!(f.starts_with("warn,"), "{f}");
        assert!(f.contains(",vmgated=debug"), "{f}");
        assert!(f.contains(",vmgate_auth=debug"), "{f}");
        assert!(default_filter(LevelFilter::ERROR).starts_with("error,"));
    }
}
