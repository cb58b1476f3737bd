//! Moving a QEMU VM between two hosts, and its disks within one host (Hyper-V's Move-VM,
//! Move-VM -IncludeStorage, Move-VMStorage and Compare-VM for real guests).
//!
//! QEMU never listens on or connects to the network: its migration stream (the main
//! connection and one per multifd channel) and the NBD connections of its block mirrors go to
//! UNIX sockets in the VM's runtime folder, and vmgate carries each connection on its own
//! [`Link`] (in the daemon: an authenticated, channel-bound, authorized vmgate channel). The
//! links speak the small protocol of [`wire`]: a control link per move, then one link per
//! stream, named by the move's id (32 random bytes the destination chose).
//!
//! # Source ([`move_vm`])
//!
//! ```text
//!  setup     Hello(move) ─ Welcome(id) ─ Offer(definition, QEMU version, CPU gaps, storage,
//!            stream settings) ─ Accepted | Incompatible(report) ─ Prepare ─ Prepared
//!  disks     (shared-nothing) per disk: an nbd node on a local socket whose connections are
//!            carried to the destination's NBD export; blockdev-mirror (sync full,
//!            write-blocking) until the job is ready
//!  memory    migration capabilities and parameters set on both QEMUs; `migrate` to a local
//!            socket whose 1 + N connections are each carried on a stream link; progress from
//!            query-migrate until `completed` (the source QEMU is then paused, postmigrate)
//!  handover  the mirrors finish without pivoting (the destination is in sync) and their
//!            nodes are removed; Complete. From here the destination decides: it runs the
//!            guest (Resumed) or discards it (Failed, then the source resumes it).
//!  release   Released; the source QEMU is quit; shared-nothing: the source's active layers
//!            are deleted unless kept.
//! ```
//!
//! Before Complete, every failure (cancel, the destination's refusal or failure, a link lost
//! or silent for [`QemuMoveOptions::link_timeout`]) ends with the guest running here on its
//! own disks: `migrate_cancel`, the mirrors cancelled and their nodes removed, `cont` when
//! QEMU had already stopped the guest, Cancel sent. After Complete, a lost control link is
//! answered by asking the destination on a new link (Query); without an answer the guest
//! stays paused here ([`MoveError::InDoubt`]) so that it never runs twice.
//!
//! # Destination ([`QemuDestination`])
//!
//! [`QemuDestination::handle`] takes every incoming link of a QEMU move (see
//! [`link_kind`] to tell them from the micro-VM engine's). The Offer is checked as a whole
//! ([`compatibility`]): the definition against this host (paths beneath the storage roots,
//! bounds, switches, CPU model, machine type), the QEMU version (never to an older QEMU), the
//! CPU model's features this host cannot provide, free memory, a VM of that name already
//! running, and the daemon's own checks. Then the disks (shared-nothing) are created empty,
//! QEMU is started with `-S -incoming defer`, `migrate-incoming` listens on a socket in its
//! runtime folder, and (shared-nothing) an NBD server on another one exports each disk
//! writable. On Complete it waits for the stream to be in, removes the exports, `cont`, and
//! reports QEMU's RESUME. Until then, on any failure or cancel, its QEMU is quit and every
//! file and folder it created is removed.
//!
//! # Storage-only moves ([`move_storage`])
//!
//! Each disk's active layer is mirrored into a new file (on the same parents) while the guest
//! runs, then `job-complete` switches the guest to it; the old files are removed unless kept.

mod destination;
pub mod link;
mod source;
mod storage;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::qmp;

pub use destination::{Arrived, HostCheck, QemuDestination, QemuDestinationOptions, QemuReceived};
pub use link::{LinkKind, link_kind};
pub use source::{MoveStorage, QemuMoveOptions, compare_vm, move_vm};
pub use storage::{StorageMoved, move_storage};
pub use wire::{MoveId, Problem, WireCompression};

pub use crate::engine::{CancelToken, Dialer, Link, MoveError, MoveStats, Phase, Progress};

use super::qmp::{Qmp, QmpError};
use crate::disk::DiskFormat;

/// The ids of an incompatibility report: the micro-VM engine's ids, and those only QEMU
/// moves have.
pub mod compatibility {
    pub use crate::engine::incompatibility::*;
    /// The destination's QEMU is older than the source's.
    pub const QEMU_VERSION: u32 = 1011;
    /// The destination's QEMU has no such machine type.
    pub const MACHINE: u32 = 1012;
}

/// The socket a source's QEMU migrates to (in its runtime folder).
const SOURCE_MIGRATION_SOCKET: &str = "mout.sock";
/// The socket a destination's QEMU receives on.
const DEST_MIGRATION_SOCKET: &str = "min.sock";
/// The destination's NBD server.
const DEST_NBD_SOCKET: &str = "nbd.sock";

/// A source's NBD socket for a disk.
fn source_nbd_socket(disk: usize) -> String {
    format!("nbd{disk}.sock")
}

/// The nbd node of a disk's mirror target (source).
fn mirror_target(disk: usize) -> String {
    format!("vmgate-nbd{disk}")
}

/// The mirror job of a disk.
fn mirror_job(disk: usize) -> String {
    format!("vmgate-mirror{disk}")
}

/// The export of a disk (destination).
fn export_id(disk: usize) -> String {
    format!("vmgate-export{disk}")
}

/// The NBD export name of a disk.
fn export_name(disk: usize) -> String {
    format!("disk{disk}")
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    link::chain(e)
}

fn unix_addr(path: &Path) -> qmp::UnixSocketAddress {
    qmp::UnixSocketAddress {
        abstract_: None,
        tight: None,
        path: path.to_string_lossy().into_owned(),
    }
}

/// The node the guest's disk `disk` reads and writes now (its device's root: `disk<N>` after
/// a start, another after a storage-only move switched it).
async fn active_node(qmp: &Qmp, disk: usize) -> Result<String, QmpError> {
    let device = super::cmdline::disk_device(disk);
    let blocks = qmp.execute(qmp::query_block {}).await?;
    let found = blocks.into_iter().find_map(|b| {
        let qdev = b.qdev.unwrap_or_default();
        let mine = qdev == device || qdev.contains(&format!("/{device}/"));
        if mine {
            b.inserted.and_then(|i| i.node_name)
        } else {
            None
        }
    });
    Ok(found.unwrap_or_else(|| super::cmdline::disk_node(disk)))
}

/// qemu-img beside the host's QEMU binary, else the one on PATH.
fn qemu_img(host: &super::QemuHost) -> PathBuf {
    let beside = host.qemu_binary().with_file_name("qemu-img");
    if beside.exists() {
        beside
    } else {
        PathBuf::from("qemu-img")
    }
}

/// Creates an empty image (an error if the file exists): `virtual_size` bytes, optionally on
/// a backing file (absolute, resolved beneath the roots).
async fn create_image(
    host: &super::QemuHost,
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
    backing: Option<(&Path, DiskFormat)>,
) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!("{} already exists", path.display()));
    }
    let fmt = |f: DiskFormat| match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let mut cmd = tokio::process::Command::new(qemu_img(host));
    cmd.arg("create").arg("-q").arg("-f").arg(fmt(format));
    if let Some((b, bf)) = backing {
        cmd.arg("-b").arg(b).arg("-F").arg(fmt(bf));
    }
    cmd.arg(path).arg(virtual_size.to_string());
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(format!(
            "qemu-img could not create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Sets the migration capabilities and parameters both ends must share, and the source's own.
async fn set_migration(
    qmp: &Qmp,
    streams: wire::StreamSettings,
    source: Option<&QemuMoveOptions>,
) -> Result<(), QmpError> {
    let cap = |capability, state| qmp::MigrationCapabilityStatus { capability, state };
    let mut caps = vec![
        cap(qmp::MigrationCapability::events, true),
        cap(
            qmp::MigrationCapability::multifd,
            streams.multifd_channels > 0,
        ),
    ];
    if let Some(o) = source {
        caps.push(cap(
            qmp::MigrationCapability::auto_converge,
            o.auto_converge,
        ));
    }
    qmp.execute(qmp::migrate_set_capabilities { capabilities: caps })
        .await?;
    let mut params = qmp::MigrateSetParameters::default();
    if streams.multifd_channels > 0 {
        params.multifd_channels = Some(streams.multifd_channels);
        params.multifd_compression = Some(match streams.compression {
            WireCompression::None => qmp::MultiFDCompression::none,
            WireCompression::Zstd => qmp::MultiFDCompression::zstd,
        });
    }
    if let Some(o) = source {
        params.downtime_limit =
            Some(u64::try_from(o.downtime_target.as_millis()).unwrap_or(u64::MAX));
        // 0: QEMU's "unlimited" is a large default; give it ours.
        params.max_bandwidth = Some(o.bandwidth_limit.unwrap_or(u64::MAX >> 8));
    }
    qmp.execute(qmp::migrate_set_parameters(params)).await?;
    Ok(())
}

/// Waits until none of `jobs` is listed any more.
async fn wait_jobs_gone(qmp: &Qmp, jobs: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let listed = qmp
            .execute(qmp::query_jobs {})
            .await
            .map_err(|e| chain(&e))?;
        let left: Vec<_> = listed.iter().filter(|j| jobs.contains(&j.id)).collect();
        if left.is_empty() {
            return Ok(());
        }
        // Concluded jobs that are not dismissed automatically.
        for j in &left {
            if j.status == qmp::JobStatus::concluded {
                let _ = qmp.execute(qmp::job_dismiss { id: j.id.clone() }).await;
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "block jobs did not end: {}",
                left.iter()
                    .map(|j| format!("{} ({:?})", j.id, j.status))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
