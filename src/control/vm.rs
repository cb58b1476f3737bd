//! `vm_list`, `vm_create`, `vm_start`, `vm_stop`, `vm_pause`, `vm_resume`, `vm_show`,
//! `vm_check`, `vm_console` (Hyper-V: `Get-VM`, `New-VM`, `Start-VM`, `Stop-VM`,
//! `Suspend-VM`, `Resume-VM`; virsh `list`, `dominfo`, `console`).

#![forbid(unsafe_code)]

use std::sync::Arc;

use vmgate_control::api::{Request, Response};

use super::{Dispatcher, blocking};
use crate::caller::Caller;
use crate::inventory::VmError;

fn error(e: &VmError) -> Response {
    Response::error(e.code(), vmgate_control::error::chain(e))
}

fn done(r: Result<String, VmError>) -> Response {
    match r {
        Ok(message) => Response::Done { message },
        Err(e) => error(&e),
    }
}

/// Answers a VM request.
pub async fn handle(d: &Dispatcher, caller: Arc<Caller>, request: Request) -> Response {
    let inv = d.inventory.clone();
    let work = move || match request {
        Request::VmList => Response::Vms { vms: inv.list() },
        Request::VmCreate { config } => done(
            inv.create(&caller, &config)
                .map(|n| format!("created and started {n}")),
        ),
        Request::VmStart { name } => done(
            inv.start(&caller, &name)
                .map(|()| format!("started {name}")),
        ),
        Request::VmStop { name } => done(
            inv.stop(&caller, &name)
                .map(|()| format!("turned {name} off")),
        ),
        Request::VmPause { name } => {
            done(inv.pause(&caller, &name).map(|()| format!("paused {name}")))
        }
        Request::VmResume { name } => done(
            inv.resume(&caller, &name)
                .map(|()| format!("resumed {name}")),
        ),
        Request::VmShow { name } => match inv.show(&name) {
            Ok(v) => Response::Vm(Box::new(v)),
            Err(e) => error(&e),
        },
        Request::VmCheck { name } => match inv.check(&name) {
            Ok(r) => Response::Checked(r),
            Err(e) => error(&e),
        },
        Request::VmConsole { name, offset } => match inv.console(&name, offset) {
            Ok((text, next_offset)) => Response::Console { text, next_offset },
            Err(e) => error(&e),
        },
        other => Response::error(
            vmgate_control::api::ErrorCode::Unsupported,
            format!("\"{}\" is not a VM request", other.name()),
        ),
    };
    blocking(work).await.unwrap_or_else(|r| r)
}
