//! vmgate-control: what the daemon and its clients share.
//!
//! * [`api`]: the control API's requests and responses, one type per resource (host, VM, move,
//!   storage move, job) and one action enum ([`api::Request`]), typed both ways; a failure
//!   carries its Windows diagnosis and its kind as types, never as text to be parsed back.
//! * [`framing`]: JSON lines, each bounded before it is allocated.
//! * [`client`]: a client of the control API over the local socket or an authenticated gateway
//!   channel ([`gateway`] opens one).
//! * [`config`]: the `vmgated.toml` schema and its one parser (the daemon, the CLI and the
//!   doctor read it the same way).
//! * [`events`]: the event catalogue (stable ids) and the `events.jsonl` records.
//! * [`error`]: the one error-chain printer every binary uses.
//! * [`logging`]: the `tracing` subscriber every binary installs (the journal under systemd,
//!   stderr otherwise; `RUST_LOG`, `-v`, `-q`).
//!
//! Dependency direction (DESIGN.md §2): the CLI depends on this crate and `vmgate-auth`, never
//! on the daemon or the migration engine.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod framing;
pub mod gateway;
pub mod logging;

/// The gateway's TCP port when an address names none (Hyper-V's 6600).
pub const DEFAULT_PORT: u16 = 6600;
/// The service class of the hosts' migration SPNs (Hyper-V's).
pub const MIGRATION_SERVICE_CLASS: &str = "Microsoft Virtual System Migration Service";
/// The configuration file of this machine's daemon.
pub const SYSTEM_CONFIG: &str = "/etc/vmgate/vmgated.toml";
/// The default local control socket.
pub const DEFAULT_SOCKET: &str = "/run/vmgate/vmgated.sock";

pub use config::AuthType;
