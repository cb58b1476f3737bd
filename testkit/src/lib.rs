//! vmgate-testkit: what vmgate's integration tests and benchmarks share, kept out of the
//! libraries' public APIs.
//!
//! * The probes, one host per process, driven by tests and `bench/`: `vmgate-channel` (the
//!   authenticated channel), `vmgate-host` (the migration engine over it, with fault
//!   injection), `vmgate-vm` (one micro-VM: run, snapshot, restore, check). Their command
//!   names and flags are interfaces: scripts use them.
//! * [`args`]: the probes' shared command-line options.
//! * [`domain`]: the Samba AD test domain (`tests/domain/up`): accounts, keytabs, tools.
//! * [`channel`]: host keytabs with migration SPNs, users' tickets, probe processes and their
//!   JSON events.
//! * [`lab`]: vmgated hosts laid out as the demo lab lays them out, and the CLI against them.
//! * [`bin`]: where the workspace's binaries are.

pub mod args;
pub mod channel;
pub mod domain;
pub mod lab;

use std::path::PathBuf;

/// A binary of the workspace (`vmgated`, `vmgate`, `setspn`, `vmgate-host`, ...), next to the
/// running test's own executable (`target/<profile>/deps/..`). `cargo test --workspace` (and
/// tests/run) builds them all; a missing one is a clear failure, not a silent skip.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own executable");
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .expect("the test executable's folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace, or run the tests \
         through tests/run)",
        path.display()
    );
    path
}
