//! Storage-only move on one host (Hyper-V's Move-VMStorage): a running VM's disk moves to a
//! new file and the VM keeps running.
//!
//! ```text
//!  plan        describe the chain (parent checksums), check every destination path against
//!              the storage roots, decide reuse, check free space          -- nothing written
//!  parents     copy each read-only parent not reused (base first) into <file>.vmgate-partial,
//!              rewrite its backing reference if needed, rename it into place
//!  bulk        create the active layer on them; copy its allocated blocks (guest running)
//!  dirty       rounds of blocks written meanwhile, until few are left; flush; rename the
//!              active layer into place (still open, still written)
//!  switch      pause; last dirty blocks; reopen the copy under its final name; swap it
//!              behind the block device; resume                            -- the short pause
//!  release     flush the new file; drop the old disk; delete its files unless keep_source
//!              (a file another VM of the host has in a chain — running or off, as the
//!              caller's inventory says ([`LocalMoveOptions::users`]) — a file another move
//!              uses, and a file another process still has open are kept and reported)
//! ```
//!
//! Until the swap, the VM runs on its old files, untouched; a cancel or any failure
//! (including a full destination) removes everything the move created and resumes the VM if
//! the move paused it. The destination files are created owner-only beneath the storage
//! roots, and their names are reserved for the move from before the first is created
//! ([`super::reserve`]): another move to the same files is refused, and never damages them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::mirror::{
    DiskSink, FileSink, Mirror, MirrorError, MirrorOptions, MirrorPhase, copy_file, io_is_no_space,
};
use super::paths::{StorageDestination, StoragePathError, StorageRoots};
use super::plan::{
    ChainFolder, Cleanup, DestLayer, LayerAction, PlanError, begin_file, check_space, commit_file,
    create_active, describe_chain, finish_parent, open_layer, plan_destination,
};
use super::users::{DiskUsers, NeededFiles, OldFile, delete_old_files};
use crate::disk::{Disk, DiskChain, DiskError, FileId};
use crate::vm::disk_swap::DiskSwapError;
use crate::vm::{Vm, VmError};

/// Errors of a local storage move. The VM still runs on its old disk and the destination
/// holds nothing the move created, in every case but a failed resume (`RunControl` with op
/// "resume"), which leaves the VM paused (on its new disk if the switch had happened).
#[derive(Debug, thiserror::Error)]
pub enum LocalMoveError {
    /// The VM has no such disk.
    #[error("the VM has no disk {index}")]
    NoDisk {
        /// The index asked for.
        index: usize,
    },
    /// Planning or preparing the destination failed.
    #[error("cannot move disk {index}")]
    Plan {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: PlanError,
    },
    /// The destination file system is full.
    #[error(
        "cannot move disk {index}: the destination {} ran out of space; the VM keeps running on its old disk",
        .path.display()
    )]
    NoSpace {
        /// Disk index.
        index: usize,
        /// The destination folder.
        path: PathBuf,
        /// The failed write's error (ENOSPC or EDQUOT).
        #[source]
        source: std::io::Error,
    },
    /// Copying failed.
    #[error("cannot move disk {index}: copying to {} failed", .path.display())]
    Copy {
        /// Disk index.
        index: usize,
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<MirrorError>,
    },
    /// The caller cancelled.
    #[error("the move of disk {index} was cancelled; the VM keeps running on its old disk")]
    Cancelled {
        /// Disk index.
        index: usize,
    },
    /// Pausing or resuming the VM failed.
    #[error("cannot {op} the VM during the move of disk {index}")]
    RunControl {
        /// "pause" or "resume".
        op: &'static str,
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: VmError,
    },
    /// Moving several disks stopped at one; those before it were moved.
    #[error(
        "disks {moved:?} were moved to their new files before the move of the VM's storage stopped; the others stay where they were"
    )]
    Partial {
        /// The disks that run on their new files.
        moved: Vec<usize>,
        /// Why the next one failed.
        #[source]
        source: Box<LocalMoveError>,
    },
    /// A destination of Move-VM's storage options was refused (before anything was written).
    #[error("the destination of the VM's storage is not allowed")]
    Destination(#[source] StoragePathError),
    /// The block device refused the new disk.
    #[error("cannot switch disk {index} to its new file")]
    Swap {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskSwapError,
    },
}

pub use super::users::SourceFile;

/// Options of a local move.
#[derive(Clone, Debug, Default)]
pub struct LocalMoveOptions {
    /// Keep the old files (Move-VM's keep-source-copies).
    pub keep_source: bool,
    /// Mirror tuning.
    pub mirror: MirrorOptions,
    /// Which files the host's VMs still need (its inventory, running and off VMs): an old
    /// file another VM has in a chain is not deleted. `None`: no inventory, only other
    /// processes' locks keep a file (a caller with VMs that can be off must pass it).
    pub users: Option<Arc<dyn DiskUsers>>,
}

/// The move's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MovePhase {
    /// Checksums, paths, reuse, space.
    Plan,
    /// Copying read-only parents.
    Parents,
    /// Bulk copy of the active layer.
    Bulk,
    /// Dirty rounds.
    Dirty,
    /// VM paused: last blocks and the switch.
    Switch,
    /// Old files released.
    Release,
}

/// Progress of a local move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MoveProgress {
    /// The phase.
    pub phase: MovePhase,
    /// The layer being copied (0 = base).
    pub layer: u32,
    /// Bytes written to the destination so far (all layers).
    pub bytes_copied: u64,
    /// Dirty rounds so far.
    pub round: u32,
    /// Blocks the guest wrote that are not copied yet.
    pub dirty_blocks: u64,
}

/// The result of a local move.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalMoveReport {
    /// Disk index.
    pub disk: usize,
    /// The new active layer.
    pub destination: PathBuf,
    /// Each destination layer (base first) and what was done with it.
    pub layers: Vec<(PathBuf, LayerAction)>,
    /// Bytes written to the destination.
    pub bytes_copied: u64,
    /// Bytes of the active layer's bulk copy.
    pub bulk_bytes: u64,
    /// Dirty rounds before the pause.
    pub rounds: u32,
    /// Blocks copied while the VM was paused.
    pub final_blocks: u64,
    /// How long the VM was paused.
    pub paused: Duration,
    /// The whole move.
    pub total: Duration,
    /// The old files (top first).
    pub source_files: Vec<SourceFile>,
}

/// Moves disk `index` of `vm` so that its active layer becomes `destination` (a file path
/// inside `roots`; the parents of a chain go next to it). See the module documentation.
/// `cancel` may be raised from another thread (or from `progress`) at any time before the
/// switch; `progress` is called often and must be quick.
pub fn move_storage(
    vm: &Vm,
    index: usize,
    destination: &Path,
    roots: &StorageRoots,
    options: &LocalMoveOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&MoveProgress),
) -> Result<LocalMoveReport, LocalMoveError> {
    let started = Instant::now();
    let source = vm.disk(index).ok_or(LocalMoveError::NoDisk { index })?;
    let plan_err = |source| match source {
        PlanError::Cancelled => LocalMoveError::Cancelled { index },
        source => LocalMoveError::Plan { index, source },
    };
    let mut state = MoveProgress {
        phase: MovePhase::Plan,
        layer: 0,
        bytes_copied: 0,
        round: 0,
        dirty_blocks: 0,
    };
    progress(&state);

    // Plan: nothing is written until every check passed.
    let chain = DiskChain {
        layers: source.layers().to_vec(),
    };
    let src_plan = describe_chain(&chain, cancel).map_err(plan_err)?;
    let active_bytes = source
        .allocated()
        .map_err(|e| {
            plan_err(PlanError::Image {
                path: source.path().to_path_buf(),
                source: e,
            })
        })?
        .iter()
        .filter(|e| !e.zero)
        .map(|e| e.len)
        .sum::<u64>();
    let plan = plan_destination(&src_plan, destination, roots, active_bytes).map_err(plan_err)?;
    let (Some(active), Some(folder)) = (plan.active().cloned(), plan.folder()) else {
        return Err(plan_err(PlanError::EmptyChain));
    };
    let folder = folder.to_path_buf();
    check_space(&folder, plan.bytes_needed).map_err(plan_err)?;
    // One mirror per disk: a second move of the same disk is refused before writing.
    let mut mirror =
        Mirror::new(Arc::clone(&source), options.mirror).map_err(|e| LocalMoveError::Copy {
            index,
            path: active.path.clone(),
            source: Box::new(e),
        })?;

    // The folder, created owner-only, and every destination name reserved for this move
    // before anything is written (the cleanup holds the reservation until it has run).
    let mut cleanup = Cleanup::new();
    let dir = ChainFolder::prepare(roots, &plan, &mut cleanup).map_err(plan_err)?;
    let copy_err = |path: &Path, e: MirrorError| match e {
        MirrorError::Cancelled => LocalMoveError::Cancelled { index },
        MirrorError::Write { source, .. } | MirrorError::Flush(source)
            if io_is_no_space(&source) =>
        {
            LocalMoveError::NoSpace {
                index,
                path: folder.clone(),
                source,
            }
        }
        e => LocalMoveError::Copy {
            index,
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    };
    let prepare_err = |e: PlanError| match e {
        PlanError::Io { source, .. }
        | PlanError::Image {
            source: DiskError::Create { source, .. },
            ..
        } if io_is_no_space(&source) => LocalMoveError::NoSpace {
            index,
            path: folder.clone(),
            source,
        },
        e => plan_err(e),
    };

    // Parents, base first.
    state.phase = MovePhase::Parents;
    for (layer, src) in plan.layers.iter().zip(&src_plan.layers) {
        if layer.action != LayerAction::Copy {
            continue;
        }
        state.layer = layer.layer;
        let base_bytes = state.bytes_copied;
        progress(&state);
        let file = begin_file(&dir, layer, &mut cleanup).map_err(prepare_err)?;
        let mut sink = FileSink::new(file);
        copy_file(&src.path, &mut sink, cancel, &mut |n| {
            state.bytes_copied = base_bytes + n;
            progress(&state);
        })
        .map_err(|e| copy_err(&layer.partial, e))?;
        let file = sink.into_file();
        finish_parent(&dir, layer, &file, &mut cleanup).map_err(prepare_err)?;
        drop(file);
    }

    // The active layer: bulk and dirty rounds while the guest runs.
    state.layer = active.layer;
    let dest = Arc::new(create_active(&dir, &plan, &mut cleanup).map_err(prepare_err)?);
    let mut sink = DiskSink::new(Arc::clone(&dest));
    let base_bytes = state.bytes_copied;
    let mut on_mirror = |p: &super::mirror::MirrorProgress| {
        state.phase = match p.phase {
            MirrorPhase::Idle | MirrorPhase::Bulk => MovePhase::Bulk,
            MirrorPhase::Dirty => MovePhase::Dirty,
            MirrorPhase::Final | MirrorPhase::Done => MovePhase::Switch,
        };
        state.bytes_copied = base_bytes + p.bytes_copied;
        state.round = p.round;
        state.dirty_blocks = p.dirty_blocks;
        progress(&state);
    };
    mirror
        .bulk(&mut sink, cancel, &mut on_mirror)
        .map_err(|e| copy_err(&active.partial, e))?;
    let convergence = mirror
        .converge(&mut sink, cancel, &mut on_mirror)
        .map_err(|e| copy_err(&active.partial, e))?;

    // The final name, while the guest still runs (the open file keeps being written).
    commit_file(&dir, &active.partial, &active.path, &mut cleanup).map_err(prepare_err)?;
    if cancel.load(Ordering::Relaxed) {
        return Err(LocalMoveError::Cancelled { index });
    }
    // The switch, with the VM paused (if it runs).
    let was_running = vm.running();
    let pause_started = Instant::now();
    if was_running {
        vm.pause().map_err(|source| LocalMoveError::RunControl {
            op: "pause",
            index,
            source,
        })?;
    }
    let before_final = mirror.progress().blocks_copied;
    let switched = switch(
        vm,
        index,
        &mut mirror,
        sink,
        dest,
        (roots, &active),
        cancel,
        &mut on_mirror,
    );
    let final_blocks = mirror.progress().blocks_copied - before_final;
    let resumed = if was_running { vm.resume() } else { Ok(()) };
    let paused = pause_started.elapsed();
    let old = match switched {
        Ok(old) => old,
        Err(e) => {
            cleanup.run();
            resumed.map_err(|source| LocalMoveError::RunControl {
                op: "resume",
                index,
                source,
            })?;
            return Err(match e {
                SwitchError::Copy(e) => copy_err(&active.partial, e),
                SwitchError::Plan(e) => prepare_err(e),
                SwitchError::Swap(source) => LocalMoveError::Swap { index, source },
            });
        }
    };
    // The VM runs on the new files now: they stay whatever happens next.
    cleanup.disarm();
    resumed.map_err(|source| LocalMoveError::RunControl {
        op: "resume",
        index,
        source,
    })?;

    let bulk_bytes = mirror.progress().bulk_bytes;
    // Release the old files.
    state.phase = MovePhase::Release;
    progress(&state);
    let old_layers: Vec<(PathBuf, FileId)> = old
        .layers()
        .iter()
        .map(|l| (l.path.clone(), l.id))
        .collect();
    drop(old);
    drop(mirror);
    drop(source);
    let new_files: Vec<FileId> = vm
        .disk(index)
        .map(|d| d.layers().iter().map(|l| l.id).collect())
        .unwrap_or_default();
    // The final pass' blocks are durable before the old files go.
    let flushed = vm.disk(index).map_or(Ok(()), |d| d.flush());
    let source_files = match flushed {
        Ok(()) => {
            let needed = options
                .users
                .as_ref()
                .map_or_else(NeededFiles::new, |u| u.needed_files());
            let old: Vec<OldFile<'_>> = old_layers
                .iter()
                .map(|(path, id)| OldFile {
                    path,
                    id: Some(*id),
                    open_by_moved_vm: false,
                })
                .collect();
            delete_old_files(
                &old,
                options.keep_source,
                &vm.config().name,
                &needed,
                &new_files,
            )
        }
        Err(e) => old_layers
            .into_iter()
            .map(|(path, _)| SourceFile {
                path,
                deleted: false,
                kept_because: Some(format!("the new file could not be flushed: {e}")),
            })
            .collect(),
    };
    let report = LocalMoveReport {
        disk: index,
        destination: active.path.clone(),
        layers: plan
            .layers
            .iter()
            .map(|l| (l.path.clone(), l.action))
            .collect(),
        bytes_copied: state.bytes_copied,
        bulk_bytes,
        rounds: convergence.rounds,
        final_blocks,
        paused,
        total: started.elapsed(),
        source_files,
    };
    Ok(report)
}

/// Moves every disk of `vm` as Move-VM's storage options say (one folder, or a file per
/// disk). Every destination is checked before anything is written; then the disks move one
/// after the other, each with its own short pause. If one fails, the disks before it stay on
/// their (complete) new files and the error lists them ([`LocalMoveError::Partial`]); that
/// disk and the later ones stay on their old files.
pub fn move_vm_storage(
    vm: &Vm,
    destination: &StorageDestination,
    roots: &StorageRoots,
    options: &LocalMoveOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, &MoveProgress),
) -> Result<Vec<LocalMoveReport>, LocalMoveError> {
    let sources: Vec<PathBuf> = vm.disk_specs().into_iter().map(|d| d.path).collect();
    let targets = roots
        .resolve(destination, &sources)
        .map_err(LocalMoveError::Destination)?;
    let mut reports = Vec::new();
    for (index, target) in targets.iter().enumerate() {
        match move_storage(vm, index, &target.path, roots, options, cancel, &mut |p| {
            progress(index, p)
        }) {
            Ok(r) => reports.push(r),
            Err(e) if reports.is_empty() => return Err(e),
            Err(e) => {
                return Err(LocalMoveError::Partial {
                    moved: reports.iter().map(|r| r.disk).collect(),
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(reports)
}

/// What went wrong during the switch.
enum SwitchError {
    Copy(MirrorError),
    Plan(PlanError),
    Swap(DiskSwapError),
}

/// With the VM paused: the final pass, the reopen under the final name (beneath the roots)
/// and the swap. Returns the old disk.
#[allow(clippy::too_many_arguments)]
fn switch(
    vm: &Vm,
    index: usize,
    mirror: &mut Mirror,
    mut sink: DiskSink,
    dest: Arc<Disk>,
    (roots, active): (&StorageRoots, &DestLayer),
    cancel: &AtomicBool,
    report: &mut dyn FnMut(&super::mirror::MirrorProgress),
) -> Result<Arc<Disk>, SwitchError> {
    mirror
        .final_pass(&mut sink, cancel, report)
        .map_err(SwitchError::Copy)?;
    // Close the copy (opened under its partial name), so the disk reopened under its final
    // name is the only open handle and holds the only locks.
    drop(sink);
    drop(dest);
    let new = Arc::new(reopen(roots, &active.path, active.format).map_err(SwitchError::Plan)?);
    if cancel.load(Ordering::Relaxed) {
        return Err(SwitchError::Copy(MirrorError::Cancelled));
    }
    vm.swap_disk(index, new).map_err(SwitchError::Swap)
}

/// Opens the new active layer under its final name. The copy's own handles were just closed,
/// but a `fork` elsewhere in the process (any `Command` spawned by another thread) shares
/// every open file description — and so its lock — until the child's `exec` closes it: for
/// that instant the file looks in use. Such a lock goes away within milliseconds; one that
/// stays (another process really has the file) is reported after 2 s.
fn reopen(
    roots: &StorageRoots,
    path: &Path,
    format: crate::disk::DiskFormat,
) -> Result<Disk, PlanError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match open_layer(roots, path, format) {
            Err(PlanError::Image {
                source: DiskError::InUse { .. },
                ..
            }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// After a shared-nothing move, once the source VM is shut down: deletes each of `paths`
/// (the read-only parents of the moved disks) unless `keep`, or a VM other than `moved` in
/// `users` (the host's inventory, running and off VMs) has it in a chain, or a move in
/// progress uses it, or another process (a VM or QEMU) still has it open.
pub fn release_files(
    paths: &[PathBuf],
    keep: bool,
    moved: &str,
    users: &dyn DiskUsers,
) -> Vec<SourceFile> {
    let needed = users.needed_files();
    let old: Vec<OldFile<'_>> = paths
        .iter()
        .map(|path| OldFile {
            path,
            id: None,
            open_by_moved_vm: false,
        })
        .collect();
    delete_old_files(&old, keep, moved, &needed, &[])
}
