//! vmgate-migrate: the migration engine.
//!
//! The KVM micro-VM (guest memory, vCPUs, serial port, block device), dirty tracking, full
//! state save and restore, disk images, and the migration protocol. See DESIGN.md §4.
//! This crate does not know about Kerberos: it moves bytes over a [`Channel`]-like transport
//! that the daemon implements for the authenticated stream.

pub mod disk;
pub mod engine;
pub mod protocol;
pub mod qemu;
pub mod storage;
pub mod vm;
