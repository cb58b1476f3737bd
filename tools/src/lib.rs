//! vmgate-tools: the `vmgate` admin CLI and the `setspn` binary.
//!
//! Each command family is a module with a clap `Args` type and a `run` function returning the
//! process exit code; `src/bin/*.rs` only parse and dispatch.

#![forbid(unsafe_code)]

pub mod conn;
pub mod control;
pub mod delegation;
pub mod doctor;
pub mod exit;
pub mod keytab;
pub mod manage;
pub mod output;
pub mod spn;
