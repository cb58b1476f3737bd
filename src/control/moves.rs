//! `move` and `compare` (Hyper-V: `Move-VM`, `Compare-VM`): a live move is a job — queued
//! when the host's live-move limit is reached, then run by the engine on a blocking thread
//! while its progress goes to the client, the job record and the event log.

#![forbid(unsafe_code)]

use std::sync::Arc;

use tracing::Instrument;
use vmgate_control::api::jobs::{
    Direction, JobKind, JobProgress, JobState, QueuedPhase, QueuedProgress,
};
use vmgate_control::api::moves::{
    Incompatibility, LivePhase, LiveProgress, MoveFailureKind, MoveFigures, MoveSpec, MoveSummary,
};
use vmgate_control::api::{ErrorCode, Response};
use vmgate_migrate::engine::{CancelToken, MoveStats, Phase, Progress};

use super::{Dispatcher, ProgressSink, blocking};
use crate::caller::Caller;
use crate::events::{Event, MoveKind, MovePhase};
use crate::moves::{MoveFailure, MoveMode, MoveOutcome};

/// The engine's phase as the event log names it.
fn event_phase(p: Phase) -> Option<MovePhase> {
    match p {
        Phase::Setup => Some(MovePhase::Setup),
        Phase::PreCopy => Some(MovePhase::MemoryPrecopy),
        Phase::Switchover => Some(MovePhase::Switchover),
        Phase::Handoff => Some(MovePhase::Handoff),
        Phase::Completed | Phase::Cancelled | Phase::Failed => None,
    }
}

fn live_phase(p: Phase) -> LivePhase {
    match p {
        Phase::Setup => LivePhase::Setup,
        Phase::PreCopy => LivePhase::PreCopy,
        Phase::Switchover => LivePhase::Switchover,
        Phase::Handoff => LivePhase::Handoff,
        Phase::Completed => LivePhase::Completed,
        Phase::Cancelled => LivePhase::Cancelled,
        Phase::Failed => LivePhase::Failed,
    }
}

/// The engine's progress report as the control API carries it.
pub fn live_progress(job: &str, p: &Progress) -> LiveProgress {
    LiveProgress {
        job: job.to_owned(),
        phase: live_phase(p.phase),
        round: p.round,
        bytes_sent: p.bytes_sent,
        bytes_remaining: p.bytes_remaining,
        rate_bytes_s: p.rate_bytes_s,
        dirty_rate_bytes_s: p.dirty_rate_bytes_s,
        expected_downtime_ms: p.expected_downtime_ms,
        throttle_percent: p.throttle_percent,
        converging: p.converging,
    }
}

/// The engine's figures as the control API carries them.
pub fn figures(s: &MoveStats) -> MoveFigures {
    MoveFigures {
        total_ms: s.total_ms,
        setup_ms: s.setup_ms,
        downtime_ms: s.downtime_ms,
        bytes_on_wire: s.bytes_on_wire,
        rounds: s.rounds,
        pages_sent: s.pages_sent,
        zero_pages: s.zero_pages,
        untouched_pages: s.untouched_pages,
        compression_ratio: s.compression_ratio,
        channels: s.channels,
        max_throttle_percent: s.max_throttle_percent,
        throughput_bytes_s: s.throughput_bytes_s,
        disk_bytes_sent: s.disk_bytes_sent,
        disk_parent_bytes_sent: s.disk_parent_bytes_sent,
        disk_bytes_reused: s.disk_bytes_reused,
        source_files_deleted: s.source_files_deleted.clone(),
        source_parents: s.source_parents.clone(),
        shared_disks: s.shared_disks.clone(),
    }
}

/// Milliseconds of a move, rounded.
pub fn whole_ms(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Milliseconds of a move: far below u64::MAX.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, positive, and rounded"
        )]
        let r = v.round() as u64;
        r
    } else {
        0
    }
}

/// The event of a failed move: its Windows code, cause and fix when it has a diagnosis, E_FAIL
/// with the failure's text otherwise.
pub fn failed_event(job: &str, vm: &str, f: &MoveFailure) -> Event {
    match f.diagnosis() {
        Some(d) => Event::migration_failed(job, vm, &d),
        None => crate::moves::incoming::generic_failure(
            job.to_owned(),
            vm.to_owned(),
            vmgate_control::error::chain(f),
        ),
    }
}

/// `compare`: the destination's compatibility report, without moving.
pub async fn compare(d: &Dispatcher, caller: Arc<Caller>, spec: MoveSpec) -> Response {
    let plan = match d.moves.plan(&spec) {
        Ok(p) => p,
        Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
    };
    let moves = d.moves.clone();
    let work = move || {
        let credential = match moves.credential(&caller, spec.ccache.as_ref()) {
            Ok(c) => c,
            Err(f) => return Response::Error(f.reply("")),
        };
        let (outcome, report) = moves.run(
            &caller,
            &plan,
            &credential,
            MoveMode::Compare,
            &CancelToken::new(),
            &mut |_| {},
        );
        match (outcome.result, report) {
            (Ok(_), Some(report)) => Response::Compared {
                vm: spec.vm.clone(),
                destination: plan.destination.clone(),
                report: report
                    .into_iter()
                    .map(|(id, message)| Incompatibility { id, message })
                    .collect(),
            },
            (Err(f), _) => Response::Error(f.reply("")),
            (Ok(_), None) => Response::error(ErrorCode::Failed, "the compare gave no report"),
        }
    };
    blocking(work).await.unwrap_or_else(|r| r)
}

/// `move`: queued as a job, then run; progress lines go to `progress`.
pub async fn start(
    d: &Dispatcher,
    caller: Arc<Caller>,
    spec: MoveSpec,
    progress: &ProgressSink,
) -> Response {
    let m = d.settings.migration();
    let host = d.settings.file().host_name.clone();
    if !m.enabled {
        return Response::error(
            ErrorCode::Refused,
            format!(
                "live migration is disabled on {host} (Hyper-V: Enable-VMMigration); fix: vmgate --host {host} host enable"
            ),
        );
    }
    let plan = match d.moves.plan(&spec) {
        Ok(p) => p,
        Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
    };
    if let Err(f) = d.moves.credential(&caller, spec.ccache.as_ref()) {
        return Response::Error(f.reply(""));
    }
    let user = caller.user();
    let destination = plan.destination.clone();
    let vm = plan.vm.clone();
    let mut job = d
        .jobs
        .submit(JobKind::Live, Direction::Outgoing, &vm, &destination, &user);
    let id = job.id().to_owned();
    let span = tracing::info_span!("move", job = %id, vm = %vm, peer = %destination);
    async move {
        let settings = d.settings.clone();
        let mut queued = false;
        let waited = job
            .wait_for_slot(
                || settings.migration().max_live_moves,
                |position, limit| {
                    queued = true;
                    d.events.emit(Event::MigrationQueued {
                        job: id.clone(),
                        vm: vm.clone(),
                        kind: MoveKind::Live,
                        position: u32::try_from(position).unwrap_or(u32::MAX),
                        limit,
                    });
                    progress.send(JobProgress::Queued(QueuedProgress {
                        job: id.clone(),
                        kind: None,
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
                    format!("{e}; {vm} keeps running here"),
                );
            }
        };
        if queued {
            d.events.emit(Event::MigrationDequeued {
                job: id.clone(),
                vm: vm.clone(),
                kind: MoveKind::Live,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            });
        }
        let cancel = job.cancel_token().clone();
        let moves = d.moves.clone();
        let events = d.events.clone();
        let sink = progress.clone();
        let (job_id, vm_name, dest, who) =
            (id.clone(), vm.clone(), destination.clone(), user.clone());
        let ran = blocking(move || {
            let credential = match moves.credential(&caller, spec.ccache.as_ref()) {
                Ok(c) => c,
                Err(f) => {
                    let outcome = MoveOutcome {
                        user: who,
                        method: None,
                        address: String::new(),
                        result: Err(f),
                    };
                    return (outcome, job);
                }
            };
            let mut announced = false;
            let mut last_phase = None;
            let (outcome, _) = moves.run(
                &caller,
                &plan,
                &credential,
                MoveMode::Move,
                &cancel,
                &mut |p: &Progress| {
                    if !announced {
                        announced = true;
                        events.emit(Event::MigrationStarted {
                            job: job_id.clone(),
                            vm: vm_name.clone(),
                            kind: MoveKind::Live,
                            source: host.clone(),
                            destination: dest.clone(),
                            user: who.clone(),
                        });
                    }
                    if last_phase != Some(p.phase) {
                        last_phase = Some(p.phase);
                        if let Some(phase) = event_phase(p.phase) {
                            events.emit(Event::MigrationPhase {
                                job: job_id.clone(),
                                vm: vm_name.clone(),
                                phase,
                            });
                        }
                    }
                    let lp = live_progress(&job_id, p);
                    job.progress(JobProgress::Live(lp.clone()));
                    sink.send(JobProgress::Live(lp));
                },
            );
            (outcome, job)
        })
        .await;
        let (outcome, job) = match ran {
            Ok(x) => x,
            Err(r) => return r,
        };
        match outcome.result {
            Ok(stats) => {
                let downtime_ms = whole_ms(stats.downtime_ms);
                d.events.emit(Event::MigrationCompleted {
                    job: id.clone(),
                    vm: vm.clone(),
                    total_ms: whole_ms(stats.total_ms),
                    downtime_ms,
                    bytes: stats.bytes_on_wire,
                });
                let target = u64::from(d.settings.migration().downtime_target_ms);
                if downtime_ms > target {
                    d.events.emit(Event::LongDowntime {
                        job: id.clone(),
                        vm: vm.clone(),
                        downtime_ms,
                        target_ms: target,
                    });
                }
                job.finish(
                    JobState::Completed,
                    format!(
                        "{vm} runs on {destination}: total {:.0} ms, downtime {:.1} ms, {} bytes",
                        stats.total_ms, stats.downtime_ms, stats.bytes_on_wire
                    ),
                );
                let Some(method) = outcome.method else {
                    return Response::error(
                        ErrorCode::Failed,
                        format!("job {id}: the move ended without saying how it authenticated"),
                    );
                };
                Response::Moved(Box::new(MoveSummary {
                    job: id,
                    vm,
                    destination,
                    address: outcome.address,
                    user: outcome.user,
                    method,
                    stats: figures(&stats),
                }))
            }
            Err(f) => {
                d.events.emit(failed_event(&id, &vm, &f));
                let state = if f.kind() == MoveFailureKind::Cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                job.finish(state, vmgate_control::error::chain(&f));
                Response::Error(f.reply(&format!("job {id}: ")))
            }
        }
    }
    .instrument(span)
    .await
}
