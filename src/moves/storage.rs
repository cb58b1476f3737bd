//! Storage-only moves (Hyper-V: `Move-VMStorage`): a running VM's disks move to new files on
//! this host, disk after disk, through `vmgate_migrate::storage::local::move_storage`.
//!
//! ```text
//!  check       the VM runs here and is not being moved; the disks named exist; every
//!              destination is inside storage_roots (else refused, [1009]) -- nothing written
//!  move        disk after disk: phases plan, parents, bulk, dirty, switch, release; a cancel
//!              stops it before the switch (the VM stays on its old files, nothing is left at
//!              the destination)
//!  end         the inventory takes the files the disks are on now (vm show, a cold boot)
//! ```
//!
//! The job, its queue and its events are the control layer's ([`crate::control`]); this module
//! is the part that talks to the engine.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmgate_control::api::storage::{
    LayerAction, MovedDisk, OldFile, StorageKind, StorageMoveSpec, StoragePhase, StorageProgress,
};
use vmgate_migrate::engine::RateLimiter;
use vmgate_migrate::storage::local::{
    LocalMoveError, LocalMoveOptions, LocalMoveReport, MovePhase, MoveProgress, move_storage,
};
use vmgate_migrate::storage::paths::{StoragePathError, StorageRoots};
use vmgate_migrate::storage::plan::{LayerAction as EngineLayerAction, PlanError};
use vmgate_migrate::vm::Vm;

use crate::caller::Caller;
use crate::events::MovePhase as EventPhase;

/// Disks by index, each with its destination file.
pub type StorageTargets = Vec<(usize, PathBuf)>;

/// Why the disks a storage move names cannot be moved (the request's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The VM has no disks.
    #[error("{0} has no disks to move")]
    NoDisks(String),
    /// Both a folder and disk mappings.
    #[error("give either a storage path or --disk SRC=DST per disk, not both")]
    FolderAndDisks,
    /// Neither.
    #[error(
        "say where the storage goes: a storage path for every disk, or --disk SRC=DST per disk"
    )]
    Nowhere,
    /// A disk's file has no name.
    #[error("disk {index} of {vm} ({}) has no file name", path.display())]
    NoFileName {
        /// The VM.
        vm: String,
        /// The disk.
        index: usize,
        /// Its file.
        path: PathBuf,
    },
    /// A mapping is not `SRC=DST`.
    #[error("\"{0}={1}\" is not a disk mapping: use SRC=DST (the disk's file now, its new file)")]
    Mapping(String, String),
    /// No disk of the VM is on that file.
    #[error("{vm} has no disk {disk}; its disks are {disks}")]
    NoSuchDisk {
        /// The VM.
        vm: String,
        /// The file named.
        disk: String,
        /// Its disks' files.
        disks: String,
    },
    /// A disk named twice.
    #[error("disk {0} is named twice")]
    Twice(String),
}

/// Which disks a storage-only move moves, and to which file: every disk into the folder, or
/// the disks named by their current file (as written, or the same file by another path).
pub fn storage_targets(
    vm: &str,
    current: &[PathBuf],
    spec: &StorageMoveSpec,
) -> Result<StorageTargets, TargetError> {
    if current.is_empty() {
        return Err(TargetError::NoDisks(vm.to_owned()));
    }
    match (&spec.storage_path, spec.disks.is_empty()) {
        (Some(_), false) => Err(TargetError::FolderAndDisks),
        (None, true) => Err(TargetError::Nowhere),
        (Some(folder), true) => current
            .iter()
            .enumerate()
            .map(|(i, p)| match p.file_name() {
                Some(n) => Ok((i, Path::new(folder).join(n))),
                None => Err(TargetError::NoFileName {
                    vm: vm.to_owned(),
                    index: i,
                    path: p.clone(),
                }),
            })
            .collect(),
        (None, false) => {
            let same = |a: &Path, b: &Path| {
                a == b
                    || matches!(
                        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                        (Ok(x), Ok(y)) if x == y
                    )
            };
            let mut out: Vec<(usize, PathBuf)> = Vec::new();
            for (src, dst) in &spec.disks {
                if src.is_empty() || dst.is_empty() {
                    return Err(TargetError::Mapping(src.clone(), dst.clone()));
                }
                let Some(index) = current.iter().position(|c| same(c, Path::new(src))) else {
                    return Err(TargetError::NoSuchDisk {
                        vm: vm.to_owned(),
                        disk: src.clone(),
                        disks: current
                            .iter()
                            .map(|c| c.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                };
                if out.iter().any(|(i, _)| *i == index) {
                    return Err(TargetError::Twice(src.clone()));
                }
                out.push((index, PathBuf::from(dst)));
            }
            out.sort_by_key(|(i, _)| *i);
            Ok(out)
        }
    }
}

/// One reason a destination is refused, with the disk it is for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetProblem {
    /// The host accepts no storage.
    #[error(
        "this host has no storage roots configured, so it accepts no VM storage; configure storage_roots"
    )]
    NoRoots,
    /// The roots themselves are unusable.
    #[error("{}", vmgate_control::error::chain(.0))]
    Roots(StoragePathError),
    /// Outside the roots, an existing file, a link escaping, ...
    #[error("disk {disk}: {}", vmgate_control::error::chain(.error))]
    Path {
        /// The disk.
        disk: usize,
        /// Why.
        error: StoragePathError,
    },
    /// Two disks into one file.
    #[error("disk {disk}: {} is also the destination of disk {other}", path.display())]
    Shared {
        /// The disk.
        disk: usize,
        /// Its destination.
        path: PathBuf,
        /// The disk that goes there too.
        other: usize,
    },
}

/// Checks each destination against the host's storage roots before anything is written:
/// inside a root, no `..`, no symbolic-link escape, not an existing file, not two disks in
/// one file. Returns the roots and the destinations as they will be written, or every
/// problem.
pub fn check_storage_targets(
    configured: &[PathBuf],
    targets: &[(usize, PathBuf)],
) -> Result<(StorageRoots, StorageTargets), Vec<TargetProblem>> {
    if configured.is_empty() {
        return Err(vec![TargetProblem::NoRoots]);
    }
    let roots = StorageRoots::new(configured).map_err(|e| vec![TargetProblem::Roots(e)])?;
    let mut problems = Vec::new();
    let mut out: StorageTargets = Vec::new();
    for (i, path) in targets {
        match roots.check_file(path, false) {
            Ok(c) => {
                if let Some((other, _)) = out.iter().find(|(_, p)| *p == c.path) {
                    problems.push(TargetProblem::Shared {
                        disk: *i,
                        path: path.clone(),
                        other: *other,
                    });
                }
                out.push((*i, c.path));
            }
            Err(error) => problems.push(TargetProblem::Path { disk: *i, error }),
        }
    }
    if problems.is_empty() {
        Ok((roots, out))
    } else {
        Err(problems)
    }
}

/// How a storage move stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Cancelled (`jobs cancel`).
    Cancelled,
    /// Refused for its destination (the storage roots' policy).
    Refused,
    /// Failed.
    Failed,
}

/// How a storage move stopped, by the error's variant.
pub fn stop_kind(e: &LocalMoveError) -> StopKind {
    match e {
        LocalMoveError::Cancelled { .. }
        | LocalMoveError::Plan {
            source: PlanError::Cancelled,
            ..
        } => StopKind::Cancelled,
        LocalMoveError::Destination(_)
        | LocalMoveError::Plan {
            source: PlanError::Path(_),
            ..
        } => StopKind::Refused,
        LocalMoveError::Partial { source, .. } => stop_kind(source),
        _ => StopKind::Failed,
    }
}

/// The event log's phase for a storage move's phase.
pub fn event_phase(p: StoragePhase) -> EventPhase {
    match p {
        StoragePhase::Plan => EventPhase::Setup,
        StoragePhase::Parents | StoragePhase::Bulk | StoragePhase::Dirty => EventPhase::Storage,
        StoragePhase::Switch => EventPhase::Switchover,
        _ => EventPhase::Handoff,
    }
}

fn phase(p: MovePhase) -> StoragePhase {
    match p {
        MovePhase::Plan => StoragePhase::Plan,
        MovePhase::Parents => StoragePhase::Parents,
        MovePhase::Bulk => StoragePhase::Bulk,
        MovePhase::Dirty => StoragePhase::Dirty,
        MovePhase::Switch => StoragePhase::Switch,
        MovePhase::Release => StoragePhase::Release,
    }
}

/// Microseconds of a duration.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The distinct folders of some files, for the job record and the events.
pub fn folders<'a>(files: impl Iterator<Item = &'a Path>) -> String {
    let mut out: Vec<String> = Vec::new();
    for f in files {
        let folder = f.parent().unwrap_or(f).display().to_string();
        if !out.contains(&folder) {
            out.push(folder);
        }
    }
    out.join(", ")
}

/// One disk's summary from the engine's report.
pub fn moved_disk(r: &LocalMoveReport, source: Option<&PathBuf>) -> MovedDisk {
    MovedDisk {
        disk: r.disk,
        source: source.map(|p| p.display().to_string()).unwrap_or_default(),
        destination: r.destination.display().to_string(),
        layers: r
            .layers
            .iter()
            .map(|(p, a)| {
                let action = match a {
                    EngineLayerAction::Copy => LayerAction::Copy,
                    EngineLayerAction::Reuse => LayerAction::Reuse,
                    EngineLayerAction::Mirror => LayerAction::Mirror,
                };
                (p.display().to_string(), action)
            })
            .collect(),
        bytes_copied: r.bytes_copied,
        rounds: r.rounds,
        paused_us: micros(r.paused),
        old_files: r
            .source_files
            .iter()
            .map(|f| OldFile {
                path: f.path.display().to_string(),
                deleted: f.deleted,
                kept_because: f.kept_because.clone(),
            })
            .collect(),
    }
}

/// The bytes a move of disk `index` writes, about: its read-only parents' files and the
/// active layer's allocated data (for a progress bar; reused parents make it less, dirty
/// rounds more).
fn bytes_to_copy(vm: &Vm, index: usize) -> u64 {
    let Some(d) = vm.disk(index) else {
        return 0;
    };
    let parents: u64 = d
        .layers()
        .iter()
        .filter(|l| l.path != d.path())
        .map(|l| l.file_size)
        .sum();
    let active: u64 = d
        .allocated()
        .map(|ex| ex.iter().filter(|e| !e.zero).map(|e| e.len).sum())
        .unwrap_or(0);
    parents + active
}

/// How often a progress report goes out (phase changes always go at once).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// One storage-only move once it has its slot.
#[derive(Debug)]
pub struct StorageRun<'a> {
    /// The job.
    pub job: &'a str,
    /// The VM.
    pub vm: &'a Vm,
    /// Where each disk goes.
    pub targets: &'a [(usize, PathBuf)],
    /// The host's storage roots.
    pub roots: &'a StorageRoots,
    /// Keep the old files, ...
    pub options: LocalMoveOptions,
    /// The cap while the guest runs.
    pub limiter: Option<&'a RateLimiter>,
}

impl StorageRun<'_> {
    /// Moves the disks one after the other for `caller`; stops at the first failure (the disks
    /// before it stay on their new files). `cancel` is the job's flag (`jobs cancel` raises
    /// it); `on_phase` sees each new phase, `on_progress` a report at most every 100 ms.
    pub fn run(
        &self,
        _caller: &Caller,
        cancel: &AtomicBool,
        on_phase: &mut dyn FnMut(StoragePhase),
        on_progress: &mut dyn FnMut(StorageProgress),
    ) -> (Vec<LocalMoveReport>, Option<LocalMoveError>) {
        let total: u64 = self
            .targets
            .iter()
            .map(|(i, _)| bytes_to_copy(self.vm, *i))
            .sum();
        let started = Instant::now();
        let mut reports: Vec<LocalMoveReport> = Vec::new();
        let mut last_phase = None;
        let mut last_sent: Option<Instant> = None;
        for (n, (index, destination)) in self.targets.iter().enumerate() {
            let before: u64 = reports.iter().map(|r| r.bytes_copied).sum();
            let mut seen = 0;
            let mut progress = |p: &MoveProgress| {
                let ph = phase(p.phase);
                // The cap holds while the guest runs; the pause is never stretched.
                if let Some(l) = self.limiter
                    && ph.guest_runs()
                    && p.bytes_copied > seen
                    && !cancel.load(Ordering::Relaxed)
                {
                    l.acquire(p.bytes_copied - seen);
                }
                seen = seen.max(p.bytes_copied);
                let new_phase = last_phase != Some(ph);
                if new_phase {
                    on_phase(ph);
                }
                last_phase = Some(ph);
                if !new_phase && last_sent.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                    return;
                }
                last_sent = Some(Instant::now());
                let copied = before + p.bytes_copied;
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                on_progress(StorageProgress {
                    job: self.job.to_owned(),
                    kind: StorageKind::Storage,
                    phase: ph,
                    disk: *index,
                    disk_number: n + 1,
                    disks: self.targets.len(),
                    layer: p.layer,
                    bytes_copied: copied,
                    bytes_total: total.max(copied),
                    round: p.round,
                    dirty_blocks: p.dirty_blocks,
                    rate_bytes_s: copied.saturating_mul(1000) / elapsed_ms.max(1),
                });
            };
            match move_storage(
                self.vm,
                *index,
                destination,
                self.roots,
                &self.options,
                cancel,
                &mut progress,
            ) {
                Ok(r) => reports.push(r),
                Err(e) if reports.is_empty() => return (reports, Some(e)),
                Err(e) => {
                    let moved = reports.iter().map(|r| r.disk).collect();
                    return (
                        reports,
                        Some(LocalMoveError::Partial {
                            moved,
                            source: Box::new(e),
                        }),
                    );
                }
            }
        }
        (reports, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage_spec(path: Option<&str>, disks: &[(&str, &str)]) -> StorageMoveSpec {
        StorageMoveSpec {
            vm: "web".into(),
            storage_path: path.map(str::to_owned),
            disks: disks
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            keep_source: false,
            bandwidth: None,
        }
    }

    #[test]
    fn storage_moves_name_a_folder_or_some_disks_by_their_current_file() {
        let current = [
            PathBuf::from("/vms/a/web.qcow2"),
            PathBuf::from("/vms/a/data.raw"),
        ];
        assert_eq!(
            storage_targets("web", &current, &storage_spec(Some("/vms/b"), &[])).unwrap(),
            [
                (0, PathBuf::from("/vms/b/web.qcow2")),
                (1, PathBuf::from("/vms/b/data.raw"))
            ]
        );
        // Only the disks named move, in disk order.
        assert_eq!(
            storage_targets(
                "web",
                &current,
                &storage_spec(None, &[("/vms/a/data.raw", "/vms/c/d.raw")])
            )
            .unwrap(),
            [(1, PathBuf::from("/vms/c/d.raw"))]
        );
        let bad = |spec: StorageMoveSpec| {
            storage_targets("web", &current, &spec)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(storage_spec(None, &[])).contains("say where the storage goes"));
        assert!(
            bad(storage_spec(Some("/vms/b"), &[("/vms/a/web.qcow2", "/x")])).contains("not both")
        );
        assert_eq!(
            bad(storage_spec(None, &[("/vms/a/other.raw", "/x")])),
            "web has no disk /vms/a/other.raw; its disks are /vms/a/web.qcow2, /vms/a/data.raw"
        );
        assert!(
            bad(storage_spec(
                None,
                &[("/vms/a/web.qcow2", "/x"), ("/vms/a/web.qcow2", "/y")]
            ))
            .contains("named twice")
        );
        assert!(
            storage_targets("web", &[], &storage_spec(Some("/vms/b"), &[]))
                .unwrap_err()
                .to_string()
                .contains("no disks")
        );
    }

    #[test]
    fn storage_destinations_outside_the_roots_are_refused_with_every_reason() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("taken.raw"), b"x").unwrap();
        let roots = [root.clone()];
        let (_, ok) = check_storage_targets(&roots, &[(0, root.join("new/web.raw"))]).unwrap();
        assert_eq!(ok, [(0, root.canonicalize().unwrap().join("new/web.raw"))]);
        let problems: Vec<String> = check_storage_targets(
            &roots,
            &[
                (0, dir.path().join("elsewhere/web.raw")),
                (1, root.join("taken.raw")),
                (2, root.join("a.raw")),
                (3, root.join("a.raw")),
            ],
        )
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("disk 0: destination "),
            "{problems:?}"
        );
        assert!(
            problems[0].contains("is outside this host's storage roots"),
            "{problems:?}"
        );
        assert!(problems[1].contains("already exists"), "{problems:?}");
        assert!(
            problems[2].contains("is also the destination of disk 2"),
            "{problems:?}"
        );
        assert!(
            check_storage_targets(&[], &[(0, root.join("x.raw"))]).unwrap_err()[0]
                .to_string()
                .contains("no storage roots")
        );
    }
}
