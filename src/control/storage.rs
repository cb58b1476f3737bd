//! `move_storage` (Hyper-V: `Move-VMStorage`; virsh `blockcopy`): a storage-only move is a job
//! counted against `max_storage_moves`.
//!
//! ```text
//!  check       the VM runs here and is not being moved; the disks named exist; every
//!              destination is inside storage_roots (else refused, [1009]) -- nothing written
//!  queue       a job (direction local, kind storage): 20404 while it waits, 20405 when it
//!              gets its slot
//!  move        disk after disk (crate::moves::storage): 20400, then 20401 per phase (setup,
//!              storage, switchover, handoff); progress lines; a cancel from `jobs cancel`
//!              stops it before the switch (the VM stays on its old files, nothing is left at
//!              the destination)
//!  end         the inventory takes the files the disks are on now (vm show, a cold boot);
//!              20402 with the bytes and the pause, or 20403
//! ```

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;
use vmgate_control::api::jobs::{
    Direction, JobKind, JobProgress, JobState, QueuedPhase, QueuedProgress,
};
use vmgate_control::api::storage::{StorageKind, StorageMoveSpec, StorageMoveSummary};
use vmgate_control::api::{ErrorCode, Response};
use vmgate_control::config::Bandwidth;
use vmgate_migrate::engine::{RateLimiter, incompatibility};
use vmgate_migrate::storage::local::LocalMoveOptions;

use super::{Dispatcher, ProgressSink, blocking};
use crate::caller::Caller;
use crate::events::{Event, MoveKind};
use crate::inventory::{Instance, Inventory};
use crate::moves::incoming::generic_failure;
use crate::moves::storage::{
    StopKind, StorageRun, check_storage_targets, event_phase, folders, micros, moved_disk,
    stop_kind, storage_targets,
};

/// Ends a storage-only move in the inventory once: explicitly, or when dropped.
struct EndStorageMove {
    inventory: Inventory,
    name: String,
    instance: Instance,
    ended: bool,
}

impl EndStorageMove {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.inventory.end_storage_move(&self.name, &self.instance);
        }
    }
}

impl Drop for EndStorageMove {
    fn drop(&mut self) {
        self.end();
    }
}

/// Microseconds as milliseconds, for people.
fn ms_of_us(us: u64) -> f64 {
    // Pauses are far below 2^52 µs: exact.
    #[allow(clippy::cast_precision_loss, reason = "far below 2^52")]
    let v = us as f64;
    v / 1000.0
}

/// `move_storage`.
#[allow(clippy::too_many_lines, reason = "one job from check to end, in order")]
pub async fn start(
    d: &Dispatcher,
    caller: Arc<Caller>,
    spec: StorageMoveSpec,
    progress: &ProgressSink,
) -> Response {
    let limiter = match &spec.bandwidth {
        None => None,
        Some(b) => match b.parse::<Bandwidth>() {
            Ok(b) => Some(RateLimiter::new(b.bytes_per_second())),
            Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
        },
    };
    let name = spec.vm.clone();
    let instance = match d.inventory.begin_move(&name, "a storage move") {
        Ok(i) => i,
        Err(e) => return Response::error(e.code(), vmgate_control::error::chain(&e)),
    };
    let Instance::Microvm(vm) = instance.clone();
    // From here on, however this ends, the inventory follows the disks and the VM is free to
    // be stopped or moved again.
    let mut registry = EndStorageMove {
        inventory: d.inventory.clone(),
        name: name.clone(),
        instance,
        ended: false,
    };
    let current: Vec<PathBuf> = vm.disk_specs().into_iter().map(|d| d.path).collect();
    let wanted = match storage_targets(&name, &current, &spec) {
        Ok(t) => t,
        Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
    };
    let config = d.settings.file();
    let (roots, targets) = match check_storage_targets(&config.storage_roots, &wanted) {
        Ok(r) => r,
        Err(problems) => {
            return Response::error(
                ErrorCode::Refused,
                format!(
                    "{} cannot take the storage of {name}: {}. {name} keeps running on its current files.",
                    config.host_name,
                    problems
                        .iter()
                        .map(|p| format!("[{}] {p}", incompatibility::STORAGE))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
        }
    };
    let user = caller.user();
    let destination = folders(targets.iter().map(|(_, p)| p.as_path()));
    let sources = folders(
        targets
            .iter()
            .filter_map(|(i, _)| current.get(*i))
            .map(PathBuf::as_path),
    );
    let mut job = d.jobs.submit(
        JobKind::Storage,
        Direction::Local,
        &name,
        &destination,
        &user,
    );
    let id = job.id().to_owned();
    let span = tracing::info_span!("storage_move", job = %id, vm = %name, peer = %destination);
    async move {
        let settings = d.settings.clone();
        let mut queued = false;
        let waited = job
            .wait_for_slot(
                || settings.migration().max_storage_moves,
                |position, limit| {
                    queued = true;
                    d.events.emit(Event::MigrationQueued {
                        job: id.clone(),
                        vm: name.clone(),
                        kind: MoveKind::Storage,
                        position: u32::try_from(position).unwrap_or(u32::MAX),
                        limit,
                    });
                    progress.send(JobProgress::Queued(QueuedProgress {
                        job: id.clone(),
                        kind: Some(StorageKind::Storage),
                        phase: QueuedPhase::Queued,
                        position,
                        limit,
                    }));
                },
            )
            .await;
        let waited = match waited {
            Ok(w) => w,
            Err(e) => {
                return Response::error(
                    ErrorCode::Cancelled,
                    format!("job {id}: {e}; {name} keeps running on its current files"),
                );
            }
        };
        if queued {
            d.events.emit(Event::MigrationDequeued {
                job: id.clone(),
                vm: name.clone(),
                kind: MoveKind::Storage,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            });
        }
        d.events.emit(Event::MigrationStarted {
            job: id.clone(),
            vm: name.clone(),
            kind: MoveKind::Storage,
            source: sources,
            destination,
            user: user.clone(),
        });
        let started = Instant::now();
        let token = job.cancel_token().clone();
        let events = d.events.clone();
        let sink = progress.clone();
        let (job_id, vm_name) = (id.clone(), name.clone());
        let keep_source = spec.keep_source;
        let inventory = d.inventory.clone();
        let ran = blocking(move || {
            let run = StorageRun {
                job: &job_id,
                vm: &vm,
                targets: &targets,
                roots: &roots,
                options: LocalMoveOptions {
                    keep_source,
                    users: Some(Arc::new(inventory)),
                    ..LocalMoveOptions::default()
                },
                limiter: limiter.as_ref(),
            };
            let mut last_event = None;
            let outcome = run.run(
                &caller,
                token.flag(),
                &mut |phase| {
                    let event = event_phase(phase);
                    if last_event != Some(event) {
                        last_event = Some(event);
                        events.emit(Event::MigrationPhase {
                            job: job_id.clone(),
                            vm: vm_name.clone(),
                            phase: event,
                        });
                    }
                },
                &mut |p| {
                    job.progress(JobProgress::Storage(p.clone()));
                    sink.send(JobProgress::Storage(p));
                },
            );
            // Before the job ends: whoever sees it ended sees the VM on the files it uses.
            registry.end();
            (outcome, job, token)
        })
        .await;
        let ((reports, failure), job, token) = match ran {
            Ok(x) => x,
            Err(r) => return r,
        };
        let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let paused_us: u64 = reports.iter().map(|r| micros(r.paused)).sum();
        let bytes: u64 = reports.iter().map(|r| r.bytes_copied).sum();
        match failure {
            None => {
                d.events.emit(Event::MigrationCompleted {
                    job: id.clone(),
                    vm: name.clone(),
                    total_ms,
                    downtime_ms: paused_us.div_ceil(1000),
                    bytes,
                });
                let target = u64::from(d.settings.migration().downtime_target_ms);
                if paused_us.div_ceil(1000) > target {
                    d.events.emit(Event::LongDowntime {
                        job: id.clone(),
                        vm: name.clone(),
                        downtime_ms: paused_us.div_ceil(1000),
                        target_ms: target,
                    });
                }
                job.finish(
                    JobState::Completed,
                    format!(
                        "{name} runs on its new files: {bytes} bytes copied in {total_ms} ms, paused {:.1} ms",
                        ms_of_us(paused_us)
                    ),
                );
                Response::StorageMoved(Box::new(StorageMoveSummary {
                    job: id,
                    vm: name,
                    user,
                    total_ms,
                    paused_us,
                    bytes_copied: bytes,
                    disks: reports
                        .iter()
                        .map(|r| moved_disk(r, current.get(r.disk)))
                        .collect(),
                }))
            }
            Some(e) => {
                let kind = stop_kind(&e);
                let mut message = vmgate_control::error::chain(&e);
                if kind == StopKind::Cancelled {
                    message = format!("{}: {message}", token.reason());
                }
                d.events
                    .emit(generic_failure(id.clone(), name.clone(), message.clone()));
                job.finish(
                    if kind == StopKind::Cancelled {
                        JobState::Cancelled
                    } else {
                        JobState::Failed
                    },
                    message.clone(),
                );
                let (code, message) = match kind {
                    StopKind::Refused => (
                        ErrorCode::Refused,
                        format!("[{}] {message}", incompatibility::STORAGE),
                    ),
                    StopKind::Cancelled => (ErrorCode::Cancelled, message),
                    StopKind::Failed => (ErrorCode::Failed, message),
                };
                Response::error(code, format!("job {id}: {message}"))
            }
        }
    }
    .instrument(span)
    .await
}
