//! Moves as jobs: each move (sent, received, or of a VM's storage on this host) is a job with
//! an id, a state and its latest progress, listed by `vmgate jobs list`; moves started here
//! wait in a queue when the host's concurrency limit is reached (Hyper-V:
//! `MaximumVirtualMachineMigrations`, `MaximumStorageMigrations`), live moves (with or without
//! their storage) and storage-only moves each with their own limit and queue.
//!
//! A queued move sees its position (1 = next); it starts when it is first in its queue and
//! fewer moves of its kind run than the limit *at that moment* (a limit raised by `host set`
//! takes effect at once). Cancelling a queued job takes it out of the queue; cancelling a
//! running one goes to the engine through its [`CancelToken`]. Incoming moves are recorded as
//! running jobs and count towards the live limit (a destination refuses a move beyond it).
//!
//! The last [`KEEP_ENDED`] ended jobs are kept for `jobs list` / `jobs show`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmgate_migrate::engine::CancelToken;

/// How many ended jobs are kept.
pub const KEEP_ENDED: usize = 100;

/// What a job moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A live move of a VM (memory, vCPUs, devices).
    Live,
    /// A storage move.
    Storage,
}

/// Which end of the move this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The VM leaves this host.
    Outgoing,
    /// The VM arrives here.
    Incoming,
    /// The VM stays here; its storage moves (a storage-only move).
    Local,
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a slot.
    Queued,
    /// Moving.
    Running,
    /// The VM runs on the destination (on its new files, for a storage-only move).
    Completed,
    /// Failed; the VM runs on the source (on its old files).
    Failed,
    /// Cancelled; the VM runs on the source (on its old files).
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn ended(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job as `jobs list` and `jobs show` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// `j7`.
    pub id: String,
    /// Live or storage.
    pub kind: JobKind,
    /// Outgoing, incoming, or local.
    pub direction: Direction,
    /// The VM (empty for an incoming move before its configuration arrived).
    pub vm: String,
    /// The other host (the destination of an outgoing move, the source of an incoming one;
    /// for a storage-only move, where the storage goes).
    pub peer: String,
    /// Who asked for it.
    pub user: String,
    /// Where it is.
    pub state: JobState,
    /// The place in the queue (1 = next), while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// The latest progress report of the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// When it was submitted (seconds since the Unix epoch).
    pub submitted: u64,
    /// How long it waited in the queue, ms.
    pub waited_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    /// How it ended, for people. (Not `result`: that is the control protocol's tag.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

#[derive(Debug)]
struct Entry {
    info: JobInfo,
    cancel: CancelToken,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    jobs: Vec<Entry>,
    queue_live: VecDeque<String>,
    queue_storage: VecDeque<String>,
    running_live: u32,
    running_storage: u32,
}

impl Inner {
    fn entry(&mut self, id: &str) -> Option<&mut Entry> {
        self.jobs.iter_mut().find(|e| e.info.id == id)
    }

    fn queue(&mut self, kind: JobKind) -> &mut VecDeque<String> {
        match kind {
            JobKind::Live => &mut self.queue_live,
            JobKind::Storage => &mut self.queue_storage,
        }
    }

    fn running(&mut self, kind: JobKind) -> &mut u32 {
        match kind {
            JobKind::Live => &mut self.running_live,
            JobKind::Storage => &mut self.running_storage,
        }
    }

    fn forget_old(&mut self) {
        let ended = self.jobs.iter().filter(|e| e.info.state.ended()).count();
        let mut excess = ended.saturating_sub(KEEP_ENDED);
        self.jobs.retain(|e| {
            if excess > 0 && e.info.state.ended() {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The jobs of this host.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a job did not get its slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cancelled while queued: {0}")]
pub struct QueueCancelled(pub String);

impl Jobs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new job (queued, for an outgoing or local move; running, for an incoming
    /// one).
    pub fn submit(
        &self,
        kind: JobKind,
        direction: Direction,
        vm: &str,
        peer: &str,
        user: &str,
    ) -> Job {
        let mut inner = self.lock();
        inner.next += 1;
        let id = format!("j{}", inner.next);
        let cancel = CancelToken::new();
        let state = match direction {
            Direction::Outgoing | Direction::Local => JobState::Queued,
            Direction::Incoming => {
                *inner.running(kind) += 1;
                JobState::Running
            }
        };
        inner.jobs.push(Entry {
            info: JobInfo {
                id: id.clone(),
                kind,
                direction,
                vm: vm.to_owned(),
                peer: peer.to_owned(),
                user: user.to_owned(),
                state,
                position: None,
                progress: None,
                submitted: now(),
                waited_ms: 0,
                ended: None,
                outcome: None,
            },
            cancel: cancel.clone(),
        });
        if direction != Direction::Incoming {
            inner.queue(kind).push_back(id.clone());
        }
        Job {
            jobs: self.clone(),
            id,
            kind,
            cancel,
            holds_slot: direction == Direction::Incoming,
        }
    }

    /// Jobs, newest first.
    pub fn list(&self) -> Vec<JobInfo> {
        let inner = self.lock();
        inner.jobs.iter().rev().map(|e| e.info.clone()).collect()
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<JobInfo> {
        self.lock().entry(id).map(|e| e.info.clone())
    }

    /// Moves of `kind` running now (sending and receiving).
    pub fn running(&self, kind: JobKind) -> u32 {
        *self.lock().running(kind)
    }

    /// Asks a job to stop. Ended jobs cannot be cancelled.
    pub fn cancel(&self, id: &str, reason: &str) -> Result<JobInfo, String> {
        let inner = self.lock();
        let e = inner
            .jobs
            .iter()
            .find(|e| e.info.id == id)
            .ok_or_else(|| format!("no job \"{id}\" on this host (vmgate jobs list)"))?;
        if e.info.state.ended() {
            return Err(format!(
                "job {id} has already ended ({})",
                serde_json::to_value(e.info.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ));
        }
        if e.info.direction == Direction::Incoming {
            return Err(format!(
                "job {id} is an incoming move: cancel it on its source ({})",
                e.info.peer
            ));
        }
        e.cancel.cancel(reason);
        let info = e.info.clone();
        drop(inner);
        self.inner.1.notify_all();
        Ok(info)
    }
}

/// One job, held by the code that runs it. Dropping it without [`Job::finish`] records a
/// failure (the code that ran it ended early).
#[derive(Debug)]
pub struct Job {
    jobs: Jobs,
    id: String,
    kind: JobKind,
    cancel: CancelToken,
    holds_slot: bool,
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The token that cancels it.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Waits for a slot: until the job is first in its queue and fewer than `limit()` moves of
    /// its kind run. `on_queued(position, limit)` is called when the job has to wait and
    /// whenever its position changes. Returns the time waited, or an error when cancelled
    /// while queued (the job is then ended as cancelled).
    pub fn wait_for_slot(
        &mut self,
        limit: &dyn Fn() -> u32,
        on_queued: &mut dyn FnMut(usize, u32),
    ) -> Result<Duration, QueueCancelled> {
        let started = std::time::Instant::now();
        let mut last_position = 0;
        let mut inner = self.jobs.lock();
        loop {
            if self.cancel.is_cancelled() {
                let reason = self.cancel.reason();
                inner.queue(self.kind).retain(|j| *j != self.id);
                if let Some(e) = inner.entry(&self.id) {
                    e.info.state = JobState::Cancelled;
                    e.info.position = None;
                    e.info.ended = Some(now());
                    e.info.outcome = Some(format!("cancelled while queued: {reason}"));
                }
                self.holds_slot = false;
                drop(inner);
                self.jobs.inner.1.notify_all();
                return Err(QueueCancelled(reason));
            }
            let max = limit().max(1);
            let position = inner
                .queue(self.kind)
                .iter()
                .position(|j| *j == self.id)
                .map_or(1, |p| p + 1);
            if position == 1 && *inner.running(self.kind) < max {
                inner.queue(self.kind).pop_front();
                *inner.running(self.kind) += 1;
                let waited = started.elapsed();
                if let Some(e) = inner.entry(&self.id) {
                    e.info.state = JobState::Running;
                    e.info.position = None;
                    e.info.waited_ms = ms(waited);
                }
                self.holds_slot = true;
                return Ok(waited);
            }
            if position != last_position {
                last_position = position;
                if let Some(e) = inner.entry(&self.id) {
                    e.info.position = Some(position);
                }
                drop(inner);
                on_queued(position, max);
                inner = self.jobs.lock();
                continue;
            }
            // Wake on any change, and at least twice a second (a limit raised by host set).
            inner = self
                .jobs
                .inner
                .1
                .wait_timeout(inner, Duration::from_millis(500))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Names the VM (an incoming move learns it from the configuration).
    pub fn set_vm(&self, vm: &str) {
        if let Some(e) = self.jobs.lock().entry(&self.id) {
            e.info.vm = vm.to_owned();
        }
    }

    /// Records the engine's latest progress.
    pub fn progress(&self, progress: serde_json::Value) {
        if let Some(e) = self.jobs.lock().entry(&self.id) {
            e.info.progress = Some(progress);
        }
    }

    /// Ends the job.
    pub fn finish(mut self, state: JobState, result: String) {
        self.end(state, result);
    }

    fn end(&mut self, state: JobState, result: String) {
        let mut inner = self.jobs.lock();
        if self.holds_slot {
            let r = inner.running(self.kind);
            *r = r.saturating_sub(1);
            self.holds_slot = false;
        }
        inner.queue(self.kind).retain(|j| *j != self.id);
        if let Some(e) = inner.entry(&self.id)
            && !e.info.state.ended()
        {
            e.info.state = state;
            e.info.position = None;
            e.info.ended = Some(now());
            e.info.outcome = Some(result);
        }
        inner.forget_old();
        drop(inner);
        self.jobs.inner.1.notify_all();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.end(
            JobState::Failed,
            "the job ended without a result (the daemon's handler stopped)".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_third_move_queues_until_a_slot_frees() {
        let jobs = Jobs::default();
        let limit = || 2;
        let mut a = jobs.submit(JobKind::Live, Direction::Outgoing, "a", "hv2", "alice");
        let mut b = jobs.submit(JobKind::Live, Direction::Outgoing, "b", "hv2", "alice");
        let mut c = jobs.submit(JobKind::Live, Direction::Outgoing, "c", "hv2", "alice");
        let mut never = |_, _| panic!("a and b must not wait");
        a.wait_for_slot(&limit, &mut never).unwrap();
        b.wait_for_slot(&limit, &mut never).unwrap();
        assert_eq!(jobs.running(JobKind::Live), 2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let waiter = std::thread::spawn(move || {
            c.wait_for_slot(&limit, &mut |pos, max| {
                seen2.lock().unwrap().push((pos, max))
            })
            .unwrap();
            c
        });
        std::thread::sleep(Duration::from_millis(200));
        let info = jobs.list();
        let queued = info.iter().find(|j| j.vm == "c").unwrap();
        assert_eq!(queued.state, JobState::Queued);
        assert_eq!(queued.position, Some(1));
        a.finish(JobState::Completed, "done".into());
        let c = waiter.join().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(1, 2)]);
        assert_eq!(jobs.get(c.id()).unwrap().state, JobState::Running);
        assert_eq!(jobs.running(JobKind::Live), 2);
        // Storage moves have their own limit and queue.
        let mut s = jobs.submit(JobKind::Storage, Direction::Local, "d", "/vms/b", "alice");
        s.wait_for_slot(&|| 1, &mut never).unwrap();
        assert_eq!(jobs.running(JobKind::Storage), 1);
        let mut t = jobs.submit(JobKind::Storage, Direction::Local, "e", "/vms/b", "alice");
        let t_id = t.id().to_owned();
        let j2 = jobs.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            j2.cancel(&t_id, "not now").unwrap();
        });
        let mut queued_at = Vec::new();
        let r = t.wait_for_slot(&|| 1, &mut |pos, max| queued_at.push((pos, max)));
        canceller.join().unwrap();
        assert_eq!(r, Err(QueueCancelled("not now".into())));
        assert_eq!(queued_at, vec![(1, 1)]);
        drop(t);
        drop(b);
        drop(c);
        drop(s);
        assert_eq!(jobs.running(JobKind::Live), 0);
        assert_eq!(jobs.running(JobKind::Storage), 0);
    }

    #[test]
    fn a_queued_job_can_be_cancelled_and_ended_ones_cannot() {
        let jobs = Jobs::default();
        let mut a = jobs.submit(JobKind::Live, Direction::Outgoing, "a", "hv2", "alice");
        a.wait_for_slot(&|| 1, &mut |_, _| {}).unwrap();
        let mut b = jobs.submit(JobKind::Live, Direction::Outgoing, "b", "hv2", "alice");
        let id = b.id().to_owned();
        let j2 = jobs.clone();
        let id2 = id.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            j2.cancel(&id2, "changed my mind").unwrap();
        });
        let r = b.wait_for_slot(&|| 1, &mut |_, _| {});
        canceller.join().unwrap();
        assert_eq!(r, Err(QueueCancelled("changed my mind".into())));
        let info = jobs.get(&id).unwrap();
        assert_eq!(info.state, JobState::Cancelled);
        assert!(
            jobs.cancel(&id, "again")
                .unwrap_err()
                .contains("already ended")
        );
        assert!(
            jobs.cancel("j99", "x")
                .unwrap_err()
                .contains("no job \"j99\"")
        );
        drop(b);
        assert_eq!(jobs.get(&id).unwrap().state, JobState::Cancelled);
        a.finish(JobState::Completed, "ok".into());
        assert_eq!(jobs.running(JobKind::Live), 0);
    }

    #[test]
    fn incoming_moves_count_towards_the_limit_and_cannot_be_cancelled_here() {
        let jobs = Jobs::default();
        let inc = jobs.submit(JobKind::Live, Direction::Incoming, "", "hv1", "alice");
        assert_eq!(jobs.running(JobKind::Live), 1);
        assert!(
            jobs.cancel(inc.id(), "x")
                .unwrap_err()
                .contains("cancel it on its source")
        );
        inc.set_vm("web");
        assert_eq!(jobs.list()[0].vm, "web");
        inc.finish(JobState::Completed, "arrived".into());
        assert_eq!(jobs.running(JobKind::Live), 0);
    }
}
