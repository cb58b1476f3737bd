//! The QEMU backend: real guests, one QEMU process per VM (as Hyper-V runs one worker process
//! per VM), built and controlled by vmgate, outliving the daemon.
//!
//! What the daemon does with it:
//!
//! ```text
//! QemuHost::new(QemuHostConfig)            once: roots, switches, run folder; probes QEMU
//! QemuVmDefinition::from_toml(text)        parse a VM file (backend = "qemu")
//! host.validate(&definition)               -> ValidatedVm, or DefinitionError naming the field
//! QemuVm::start(&host, &validated, mode)   -> QemuVm (QEMU runs in its own session/scope)
//! QemuVm::attach(&host, name)              -> Attached::Running(QemuVm) | Attached::Off(reason)
//! vm.state() / pause() / resume()          query-status / stop / cont
//! vm.shutdown(timeout) / power_off()       ACPI power button, then quit (then SIGKILL)
//! vm.wait_exit() / exit_reason()           why QEMU ended (guest shutdown, killed, ...)
//! vm.guest_status() / guest_check()        the guest agent: boot id, uptime, its own checks
//! vm.events() / qmp().execute(cmd)         QMP events; any typed QMP command (moves, jobs)
//! ```
//!
//! Modules: [`definition`] (the VM file and its validation), [`paths`] (files beneath the
//! storage roots), [`host`] (host configuration, QEMU's capabilities), [`cmdline`] (QEMU's
//! arguments), [`process`] (process lifetime, pidfile, exit reasons), [`net`] (taps on
//! virtual switches in network namespaces), [`qmp`] (the QMP session), [`agent`] (the guest
//! agent channel), [`vm`] (the handle).

pub mod agent;
pub mod cmdline;
pub mod definition;
pub mod host;
pub mod net;
pub mod paths;
pub mod process;
pub mod qmp;
pub mod vm;

pub use agent::{AgentClient, AgentError};
pub use cmdline::StartMode;
pub use definition::{DefinitionError, FieldProblem, QemuVmDefinition, ValidatedVm};
pub use host::{
    HostError, QemuCapabilities, QemuHost, QemuHostConfig, QemuVersion, ScopeMode, VirtualSwitch,
};
pub use net::NetError;
pub use process::{ExitKind, ExitReason, RuntimePaths};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use vm::{Attached, QemuError, QemuVm, StopOutcome, VmState, console_log};
pub use vmgate_guest::agent::{CheckReport, CheckResult, GuestStatus};
