//! Moves as jobs: each move (sent, received, or of a VM's storage on this host) is a job with
//! an id, a state and its latest progress, listed by `vmgate jobs list`; moves started here
//! wait in a queue when the host's concurrency limit is reached (Hyper-V:
//! `MaximumVirtualMachineMigrations`, `MaximumStorageMigrations`), live moves (with or without
//! their storage) and storage-only moves each with their own limit and queue.
//!
//! A queued move sees its position (1 = next); it starts when it is first in its queue and
//! fewer moves of its kind run than the limit *at that moment* (a limit raised by `host set`
//! takes effect at once). Waiting is asynchronous ([`Job::wait_for_slot`] on the daemon's
//! runtime): a queued job holds no thread. Cancelling a queued job takes it out of the queue;
//! cancelling a running one goes to the engine through its [`CancelToken`]. Incoming moves are
//! recorded as running jobs and count towards the live limit (a destination refuses a move
//! beyond it).
//!
//! The last [`KEEP_ENDED`] ended jobs are kept for `jobs list` / `jobs show`.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use vmgate_control::api::jobs::{Direction, JobInfo, JobKind, JobProgress, JobState};
use vmgate_migrate::engine::CancelToken;

/// How many ended jobs are kept.
pub const KEEP_ENDED: usize = 100;

/// How often a queued job looks at its limit again without being woken (a limit raised by
/// `host set` wakes nobody).
const RECHECK: Duration = Duration::from_millis(500);

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

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

/// The jobs of this host.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    shared: Arc<Shared>,
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

/// Why a job cannot be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CancelError {
    /// No such job.
    #[error("no job \"{0}\" on this host (vmgate jobs list)")]
    NotFound(String),
    /// It has ended already.
    #[error("job {id} has already ended ({})", state.as_str())]
    Ended {
        /// The job.
        id: String,
        /// How it ended.
        state: JobState,
    },
    /// It is an incoming move: only its source can cancel it.
    #[error("job {id} is an incoming move: cancel it on its source ({peer})")]
    Incoming {
        /// The job.
        id: String,
        /// Its source.
        peer: String,
    },
}

impl Jobs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        self.shared.changed.notify_waiters();
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
    pub fn cancel(&self, id: &str, reason: &str) -> Result<JobInfo, CancelError> {
        let inner = self.lock();
        let e = inner
            .jobs
            .iter()
            .find(|e| e.info.id == id)
            .ok_or_else(|| CancelError::NotFound(id.to_owned()))?;
        if e.info.state.ended() {
            return Err(CancelError::Ended {
                id: id.to_owned(),
                state: e.info.state,
            });
        }
        if e.info.direction == Direction::Incoming {
            return Err(CancelError::Incoming {
                id: id.to_owned(),
                peer: e.info.peer.clone(),
            });
        }
        e.cancel.cancel(reason);
        let info = e.info.clone();
        drop(inner);
        self.wake();
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

/// What [`Job::wait_for_slot`] found on one look at the queue.
enum Look {
    Cancelled(String),
    Slot(Duration),
    Moved(usize, u32),
    Wait,
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

    fn look(&mut self, started: Instant, limit: u32, last_position: usize) -> Look {
        let mut inner = self.jobs.lock();
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
            return Look::Cancelled(reason);
        }
        let max = limit.max(1);
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
            return Look::Slot(waited);
        }
        if position != last_position {
            if let Some(e) = inner.entry(&self.id) {
                e.info.position = Some(position);
            }
            return Look::Moved(position, max);
        }
        Look::Wait
    }

    /// Waits for a slot: until the job is first in its queue and fewer than `limit()` moves of
    /// its kind run. `on_queued(position, limit)` is called when the job has to wait and
    /// whenever its position changes. Returns the time waited, or an error when cancelled
    /// while queued (the job is then ended as cancelled).
    pub async fn wait_for_slot(
        &mut self,
        limit: impl Fn() -> u32,
        mut on_queued: impl FnMut(usize, u32),
    ) -> Result<Duration, QueueCancelled> {
        let started = Instant::now();
        let mut last_position = 0;
        let shared = Arc::clone(&self.jobs.shared);
        loop {
            // Registered before looking, so that a change between the look and the wait is
            // not missed.
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.look(started, limit(), last_position) {
                Look::Cancelled(reason) => {
                    self.jobs.wake();
                    return Err(QueueCancelled(reason));
                }
                Look::Slot(waited) => return Ok(waited),
                Look::Moved(position, max) => {
                    last_position = position;
                    on_queued(position, max);
                }
                Look::Wait => {
                    let _ = tokio::time::timeout(RECHECK, changed).await;
                }
            }
        }
    }

    /// Names the VM (an incoming move learns it from the configuration).
    pub fn set_vm(&self, vm: &str) {
        if let Some(e) = self.jobs.lock().entry(&self.id) {
            e.info.vm = vm.to_owned();
        }
    }

    /// Records the latest progress.
    pub fn progress(&self, progress: JobProgress) {
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
        self.jobs.wake();
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

    #[tokio::test]
    async fn the_third_move_queues_until_a_slot_frees() {
        let jobs = Jobs::default();
        let limit = || 2;
        let mut a = jobs.submit(JobKind::Live, Direction::Outgoing, "a", "hv2", "alice");
        let mut b = jobs.submit(JobKind::Live, Direction::Outgoing, "b", "hv2", "alice");
        let mut c = jobs.submit(JobKind::Live, Direction::Outgoing, "c", "hv2", "alice");
        let never = |_, _| panic!("a and b must not wait");
        a.wait_for_slot(limit, never).await.unwrap();
        b.wait_for_slot(limit, never).await.unwrap();
        assert_eq!(jobs.running(JobKind::Live), 2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let waiter = tokio::spawn(async move {
            c.wait_for_slot(limit, |pos, max| seen2.lock().unwrap().push((pos, max)))
                .await
                .unwrap();
            c
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let info = jobs.list();
        let queued = info.iter().find(|j| j.vm == "c").unwrap();
        assert_eq!(queued.state, JobState::Queued);
        assert_eq!(queued.position, Some(1));
        a.finish(JobState::Completed, "done".into());
        let c = waiter.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(1, 2)]);
        assert_eq!(jobs.get(c.id()).unwrap().state, JobState::Running);
        assert_eq!(jobs.running(JobKind::Live), 2);
        // Storage moves have their own limit and queue.
        let mut s = jobs.submit(JobKind::Storage, Direction::Local, "d", "/vms/b", "alice");
        s.wait_for_slot(|| 1, never).await.unwrap();
        assert_eq!(jobs.running(JobKind::Storage), 1);
        let mut t = jobs.submit(JobKind::Storage, Direction::Local, "e", "/vms/b", "alice");
        let t_id = t.id().to_owned();
        let j2 = jobs.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            j2.cancel(&t_id, "not now").unwrap();
        });
        let mut queued_at = Vec::new();
        let r = t
            .wait_for_slot(|| 1, |pos, max| queued_at.push((pos, max)))
            .await;
        canceller.await.unwrap();
        assert_eq!(r, Err(QueueCancelled("not now".into())));
        assert_eq!(queued_at, vec![(1, 1)]);
        drop(t);
        drop(b);
        drop(c);
        drop(s);
        assert_eq!(jobs.running(JobKind::Live), 0);
        assert_eq!(jobs.running(JobKind::Storage), 0);
    }

    #[tokio::test]
    async fn a_queued_job_can_be_cancelled_and_ended_ones_cannot() {
        let jobs = Jobs::default();
        let mut a = jobs.submit(JobKind::Live, Direction::Outgoing, "a", "hv2", "alice");
        a.wait_for_slot(|| 1, |_, _| {}).await.unwrap();
        let mut b = jobs.submit(JobKind::Live, Direction::Outgoing, "b", "hv2", "alice");
        let id = b.id().to_owned();
        let j2 = jobs.clone();
        let id2 = id.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            j2.cancel(&id2, "changed my mind").unwrap();
        });
        let r = b.wait_for_slot(|| 1, |_, _| {}).await;
        canceller.await.unwrap();
        assert_eq!(r, Err(QueueCancelled("changed my mind".into())));
        let info = jobs.get(&id).unwrap();
        assert_eq!(info.state, JobState::Cancelled);
        let e = jobs.cancel(&id, "again").unwrap_err();
        assert!(matches!(e, CancelError::Ended { .. }), "{e:?}");
        assert!(e.to_string().contains("already ended"), "{e}");
        let e = jobs.cancel("j99", "x").unwrap_err();
        assert_eq!(e, CancelError::NotFound("j99".into()));
        assert!(e.to_string().contains("no job \"j99\""), "{e}");
        drop(b);
        assert_eq!(jobs.get(&id).unwrap().state, JobState::Cancelled);
        a.finish(JobState::Completed, "ok".into());
        assert_eq!(jobs.running(JobKind::Live), 0);
    }

    #[tokio::test]
    async fn a_raised_limit_lets_a_queued_job_go_without_a_wake_up() {
        let jobs = Jobs::default();
        let limit = Arc::new(std::sync::atomic::AtomicU32::new(1));
        let mut a = jobs.submit(JobKind::Live, Direction::Outgoing, "a", "hv2", "alice");
        let l = Arc::clone(&limit);
        a.wait_for_slot(
            move || l.load(std::sync::atomic::Ordering::SeqCst),
            |_, _| {},
        )
        .await
        .unwrap();
        let mut b = jobs.submit(JobKind::Live, Direction::Outgoing, "b", "hv2", "alice");
        let l = Arc::clone(&limit);
        let raiser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            l.store(2, std::sync::atomic::Ordering::SeqCst);
        });
        let l = Arc::clone(&limit);
        b.wait_for_slot(
            move || l.load(std::sync::atomic::Ordering::SeqCst),
            |_, _| {},
        )
        .await
        .unwrap();
        raiser.await.unwrap();
        assert_eq!(jobs.running(JobKind::Live), 2);
    }

    #[test]
    fn incoming_moves_count_towards_the_limit_and_cannot_be_cancelled_here() {
        let jobs = Jobs::default();
        let inc = jobs.submit(JobKind::Live, Direction::Incoming, "", "hv1", "alice");
        assert_eq!(jobs.running(JobKind::Live), 1);
        let e = jobs.cancel(inc.id(), "x").unwrap_err();
        assert!(e.to_string().contains("cancel it on its source"), "{e}");
        inc.set_vm("web");
        assert_eq!(jobs.list()[0].vm, "web");
        inc.finish(JobState::Completed, "arrived".into());
        assert_eq!(jobs.running(JobKind::Live), 0);
    }
}
