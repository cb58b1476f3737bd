//! vmgate's Linux test guest: the program that runs inside it, and what the host needs to talk
//! to it.
//!
//! `tests/guest/build` makes a bootable guest from Debian's cloud kernel, a busybox initramfs
//! and the `vmgate-guest` program of this crate, linked statically. Inside the guest the
//! program:
//!
//! - dirties memory continuously, pass after pass over a buffer, each page holding its pass
//!   number and its index (or, in full-content mode, every word derived from both), and checks
//!   every page against the previous pass before it overwrites it ([`memory`]);
//! - writes its disk continuously with sequence-numbered, checksummed blocks, each one durable
//!   (`O_DIRECT` + `fdatasync`) before the next, and checks the whole sequence when it starts
//!   (so a fresh boot verifies what the previous one wrote) and on request ([`disk`]);
//! - serves a TCP echo on its NIC (the address comes from the kernel command line);
//! - powers the guest off when the ACPI power button is pressed (after its last disk write is
//!   durable);
//! - prints markers on the serial console and answers the host's requests (status, checks)
//!   on a virtio-serial port ([`agent`]).
//!
//! The settings come from the kernel command line ([`config`]).

pub mod agent;
pub mod config;
pub mod disk;
pub mod memory;
