//! `jobs_list`, `job_show`, `job_cancel` (virsh `domjobinfo`, `domjobabort`).

#![forbid(unsafe_code)]

use vmgate_control::api::{ErrorCode, Request, Response};

use super::Dispatcher;
use crate::caller::Caller;
use crate::jobs::CancelError;

/// Answers a jobs request.
pub fn handle(d: &Dispatcher, caller: &Caller, request: Request) -> Response {
    match request {
        Request::JobsList => Response::Jobs {
            jobs: d.jobs.list(),
        },
        Request::JobShow { id } => match d.jobs.get(&id) {
            Some(j) => Response::Job(Box::new(j)),
            None => Response::error(ErrorCode::NotFound, CancelError::NotFound(id).to_string()),
        },
        Request::JobCancel { id } => {
            match d
                .jobs
                .cancel(&id, &format!("cancelled by {}", caller.describe()))
            {
                Ok(j) => {
                    tracing::info!(job = %id, caller = %caller.describe(), "cancel requested");
                    Response::Job(Box::new(j))
                }
                Err(e @ CancelError::NotFound(_)) => {
                    Response::error(ErrorCode::NotFound, e.to_string())
                }
                Err(e) => Response::error(ErrorCode::Refused, e.to_string()),
            }
        }
        other => Response::error(
            ErrorCode::Unsupported,
            format!("\"{}\" is not a jobs request", other.name()),
        ),
    }
}
