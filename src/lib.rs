//! vmgated, the vmgate host daemon, by role (DESIGN.md §2):
//!
//! | module | role |
//! |---|---|
//! | [`gateway`] | the TCP listener: network filter, TLS + Kerberos + authorization under one deadline, a limit of pending handshakes per address; control channels to the dispatch, migration channels to the engine |
//! | [`control`] | the control API's dispatch, per request family (host, vm, moves, storage, jobs), and the local socket |
//! | [`admission`], [`caller`] | who is asking, with the proof that they were let in |
//! | [`jobs`] | moves as jobs, their queues and limits |
//! | [`inventory`] | the VMs of this host, per backend |
//! | [`moves`] | the engine's entry points: live moves, arrivals, storage-only moves |
//! | [`adapter`] | links made of authenticated channels, for the engine |
//! | [`events`] | the event log (events.jsonl and the log) |
//! | [`settings`] | the settings in force (`host set` kept across restarts) |
//! | [`daemon`], [`perms`], [`spn_check`] | start-up: permissions, SPN self-check, readiness |
//! | [`compat`], [`arp`] | virtual switches: the destination's check, the gratuitous ARP |
//!
//! Import direction, without cycles: `gateway` → `control` → `moves` → `adapter`,
//! `inventory`, `jobs` → `settings`, `events`, `caller` → `admission`.

pub mod adapter;
pub mod admission;
pub mod arp;
pub mod caller;
pub mod compat;
pub mod control;
pub mod daemon;
pub mod events;
pub mod gateway;
pub mod inventory;
pub mod jobs;
pub mod moves;
pub mod perms;
pub mod settings;
pub mod spn_check;
