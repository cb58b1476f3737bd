//! `version`, `host_show`, `host_set` (Hyper-V: `Get-VMHost`, `Set-VMHost`,
//! `Enable-VMMigration`).

#![forbid(unsafe_code)]

use vmgate_control::api::host::{HostChanges, HostInfo, VersionInfo};
use vmgate_control::api::{ErrorCode, Response};
use vmgate_migrate::protocol::ProtocolVersion;

use super::Dispatcher;

/// This build's versions.
pub fn version() -> VersionInfo {
    VersionInfo {
        daemon: env!("CARGO_PKG_VERSION").to_owned(),
        protocol: ProtocolVersion::CURRENT.get(),
        min_protocol: ProtocolVersion::MIN_SUPPORTED.get(),
    }
}

/// The host's settings in force, versions and SPNs.
pub fn info(d: &Dispatcher) -> HostInfo {
    let config = d.settings.config();
    HostInfo {
        migration_addresses: config.offered_addresses(),
        version: version(),
        config,
        spns: d.spns.as_ref().clone(),
    }
}

/// `host_show`.
pub fn show(d: &Dispatcher) -> Response {
    Response::Host(Box::new(info(d)))
}

/// `host_set`: the changes are checked, saved and in force; the answer is the host as now.
pub fn set(d: &Dispatcher, changes: &HostChanges) -> Response {
    match d.settings.set(changes) {
        Ok(()) => {
            tracing::info!(?changes, "migration settings changed");
            show(d)
        }
        Err(e) => {
            let code = if e.is_bad_request() {
                ErrorCode::BadRequest
            } else {
                ErrorCode::Failed
            };
            Response::error(code, vmgate_control::error::chain(&e))
        }
    }
}
