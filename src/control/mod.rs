//! The control API's dispatch: one [`Dispatcher`] answers the requests of the local socket
//! ([`socket`]) and of the gateway's control channels alike ([`serve`]), split per request
//! family: [`host`], [`vm`], [`moves`], [`storage`], [`jobs`].
//!
//! Who may do what: the local socket admits root and the local group (by peer credentials);
//! the gateway admits members of the admin group (Kerberos, checked against the directory).
//! Both may use every request; [`Dispatcher::handle`] takes the [`Caller`] with its proof, so
//! nothing is dispatched for a caller that was not let in. A move asked for on the local
//! socket runs with the caller's own ticket handed over by the CLI; one asked for over the
//! network runs with what the caller's channel allows this host to do for it (the host's auth
//! type).
//!
//! Handlers that wait (moves in a queue) are asynchronous; work that blocks (booting a VM, the
//! engine) runs on the runtime's blocking threads.

#![forbid(unsafe_code)]

pub mod host;
pub mod jobs;
pub mod moves;
pub mod serve;
pub mod socket;
pub mod storage;
pub mod vm;

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;
use tracing::Instrument;
use vmgate_control::api::host::SpnState;
use vmgate_control::api::{ErrorCode, Request, Response};

use crate::caller::Caller;
use crate::events::EventLog;
use crate::inventory::Inventory;
use crate::jobs::Jobs;
use crate::moves::Moves;
use crate::settings::HostSettings;

/// Where a handler sends the progress lines of the request it answers (the client may be gone:
/// sending never fails the work).
#[derive(Debug, Clone)]
pub struct ProgressSink(Option<UnboundedSender<Response>>);

impl ProgressSink {
    /// Progress lines to `tx`.
    pub fn new(tx: UnboundedSender<Response>) -> ProgressSink {
        ProgressSink(Some(tx))
    }

    /// Nowhere.
    pub fn none() -> ProgressSink {
        ProgressSink(None)
    }

    /// Sends one progress line.
    pub fn send(&self, progress: vmgate_control::api::jobs::JobProgress) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Response::Progress { progress });
        }
    }
}

/// The daemon's services, as the dispatch uses them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// The settings in force.
    pub settings: HostSettings,
    /// The SPN self-check's findings.
    pub spns: Arc<Vec<SpnState>>,
    /// The VMs.
    pub inventory: Inventory,
    /// The jobs.
    pub jobs: Jobs,
    /// The event log.
    pub events: EventLog,
    /// The live moves.
    pub moves: Moves,
}

impl Dispatcher {
    /// Answers `request` from `caller`; progress lines go to `progress` first.
    pub async fn handle(
        &self,
        caller: Arc<Caller>,
        request: Request,
        progress: ProgressSink,
    ) -> Response {
        let span =
            tracing::debug_span!("request", request = request.name(), caller = %caller.describe());
        async move {
            match request {
                Request::Version => Response::Version(host::version()),
                Request::HostShow => host::show(self),
                Request::HostSet { changes } => host::set(self, &changes),
                Request::VmList
                | Request::VmCreate { .. }
                | Request::VmStart { .. }
                | Request::VmStop { .. }
                | Request::VmPause { .. }
                | Request::VmResume { .. }
                | Request::VmShow { .. }
                | Request::VmCheck { .. }
                | Request::VmConsole { .. } => vm::handle(self, caller, request).await,
                Request::Move(spec) => moves::start(self, caller, spec, &progress).await,
                Request::Compare(spec) => moves::compare(self, caller, spec).await,
                Request::MoveStorage(spec) => storage::start(self, caller, spec, &progress).await,
                Request::JobsList | Request::JobShow { .. } | Request::JobCancel { .. } => {
                    jobs::handle(self, &caller, request)
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Runs blocking work (the engine, a VM's boot) on the runtime's blocking threads; a worker
/// that died answers as a failure.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "a request's worker stopped");
            Response::error(
                ErrorCode::Failed,
                format!("the daemon's worker for this request stopped: {e}"),
            )
        })
}
