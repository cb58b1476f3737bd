//! The checks that ask the daemons: D's daemon answers on its migration addresses, D accepts
//! moves, S's address is on D's migration networks, the protocol versions fit, and (with
//! `--vm`) D can take the VM — the same reasons, ids and messages a move would get.
//!
//! D's and S's settings come from their daemons' `host show` (the local socket when the host's
//! configuration is on this machine, otherwise its gateway with the user's ticket).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use vmgate_auth::Diagnosis;
use vmgate_auth::netfilter::NetworkFilter;
use vmgate_auth::winerr::WinCode;
use vmgate_control::api::host::{HostInfo, VersionInfo};
use vmgate_control::api::moves::MoveSpec;
use vmgate_control::api::{CcacheBlob, ErrorReply, Request, Response};
use vmgate_control::error::chain;
use vmgate_control::gateway::GatewayError;

use super::{Check, CheckResult, Context, Status};
use crate::control::{self, ControlError, HostTarget, Session, Transport};

/// Why a daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// It could not be reached (or refused the caller).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// It answered with an error.
    #[error(transparent)]
    Refused(Box<ErrorReply>),
    /// It answered something else than what was asked.
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

/// A shared [`AskError`] (the doctor keeps D's answer for several checks).
pub type Asked<T> = Result<T, Arc<AskError>>;

/// The daemon checks, in order (appended after the standard ones).
pub fn checks() -> Vec<Check> {
    vec![
        Check {
            id: "daemon-reachable",
            title: "D's daemon answers on its migration addresses",
            run: reachable,
        },
        Check {
            id: "migration-enabled",
            title: "D accepts live moves",
            run: enabled,
        },
        Check {
            id: "source-allowed",
            title: "S's address is on D's migration networks",
            run: source_allowed,
        },
        Check {
            id: "protocol-version",
            title: "S's protocol version is one D accepts",
            run: versions,
        },
        Check {
            id: "vm-compatible",
            title: "D can take the VM (--vm)",
            run: vm_compatible,
        },
    ]
}

fn session(ctx: &Context, host: &str) -> Result<Session, ControlError> {
    let target = control::resolve(Some(host), None)?;
    control::open(
        &target,
        Transport::Auto,
        ctx.settings().user_ccache.as_deref(),
        false,
    )
}

fn host_info(ctx: &Context, host: &str) -> Result<HostInfo, AskError> {
    match session(ctx, host)?.call(&Request::HostShow)? {
        Response::Host(h) => Ok(*h),
        Response::Error(e) => Err(AskError::Refused(Box::new(e))),
        other => Err(AskError::Unexpected(format!("{other:?}"))),
    }
}

/// D's settings, asked once.
fn destination(ctx: &mut Context) -> Asked<HostInfo> {
    if let Some(asked) = &ctx.daemon_d {
        return asked.clone();
    }
    let to = ctx.settings().to.clone();
    let asked = host_info(ctx, &to).map_err(Arc::new);
    ctx.daemon_d = Some(asked.clone());
    asked
}

/// D as the move reaches it: its addresses as `resolve-destination` found them, its DNS name
/// (its configuration's `fqdn`, else the resolved name) and so its migration SPN, the realm.
fn gateway_target(ctx: &mut Context) -> HostTarget {
    let to = ctx.settings().to.clone();
    let realm = ctx.realm();
    let fqdn = ctx
        .settings()
        .to_config
        .as_ref()
        .and_then(|c| c.fqdn.clone())
        .unwrap_or_else(|| super::hosts::dns_name(&to, realm.as_deref()));
    HostTarget {
        name: to.split('.').next().unwrap_or(&to).to_ascii_lowercase(),
        fqdn,
        realm,
        socket: None,
        addresses: ctx.target_addresses().to_vec(),
    }
}

/// Authenticates to D's gateway as the user, the way the move does: TLS, then Kerberos with the
/// user's ticket for D's migration SPN (which D decrypts with the key in its keytab), bound to
/// the TLS session, then D's authorization; then asks for D's settings over that channel.
fn through_gateway(ctx: &mut Context) -> Result<(HostInfo, HostTarget), AskError> {
    let target = gateway_target(ctx);
    let mut s = control::open(
        &target,
        Transport::Remote,
        ctx.settings().user_ccache.as_deref(),
        false,
    )?;
    match s.call(&Request::HostShow)? {
        Response::Host(h) => Ok((*h, target)),
        Response::Error(e) => Err(AskError::Refused(Box::new(e))),
        other => Err(AskError::Unexpected(format!("{other:?}"))),
    }
}

/// The principal in the user's credential cache, if it can be read.
fn ticket_owner(ctx: &Context) -> Option<String> {
    let cc = control::caller_ccache(ctx.settings().user_ccache.as_deref());
    vmgate_auth::krb::UserCredential::from_ccache(&cc)
        .ok()
        .and_then(|c| c.user().map(ToString::to_string))
}

fn reachable(ctx: &mut Context) -> CheckResult {
    let to = ctx.settings().to.clone();
    let addrs: Vec<SocketAddr> = ctx.target_addresses().to_vec();
    if addrs.is_empty() {
        return CheckResult::skip("D's addresses are unknown (resolve-destination failed)");
    }
    let answering: Vec<&SocketAddr> = addrs
        .iter()
        .filter(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok())
        .collect();
    if answering.is_empty() {
        let list = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return CheckResult::unreachable(
            format!("nothing answers on {list}"),
            Diagnosis::new(
                WinCode::ConnectionRefused,
                format!("vmgated is not running on {to}: nothing listens on {list}"),
            )
            .with_fix(format!(
                "on {to}: systemctl start vmgated\n(journalctl -u vmgated says why it stopped; in the lab: tests/lab/up)"
            )),
        );
    }
    let answering = answering
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let owner = ticket_owner(ctx);
    let Some(user) = owner else {
        // No ticket to prove anything with: say so, and read D's settings as before.
        return match destination(ctx) {
            Ok(h) => CheckResult::warn(format!(
                "{} answers on {answering} (vmgate {}), but no Kerberos ticket to authenticate \
                 to it with: kinit the user (or --user-ccache) to check its gateway accepts them",
                h.config.host_name, h.version.daemon
            )),
            Err(e) => CheckResult::warn(format!(
                "{to}'s gateway answers, but there is no Kerberos ticket to authenticate to it \
                 with, and its settings could not be read: {}",
                chain(&*e)
            )),
        };
    };
    match through_gateway(ctx) {
        Ok((h, target)) => {
            let spn = target
                .spn()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| target.fqdn.clone());
            let line = format!(
                "{} answers on {answering} (vmgate {}, protocol {}) and accepted {user} through \
                 its gateway (Kerberos to \"{spn}\", bound to TLS, then authorization)",
                h.config.host_name, h.version.daemon, h.version.protocol
            );
            ctx.daemon_d = Some(Ok(h));
            CheckResult::pass(line)
        }
        Err(AskError::Control(ControlError::Gateway(GatewayError::Denied(d)))) => {
            CheckResult::fail(
                format!(
                    "{to}'s gateway refused {user}: {} ({})",
                    d.code.hex(),
                    d.code.name()
                ),
                d,
            )
        }
        Err(e) => {
            let why = crate::output::error_chain(&e);
            match destination(ctx) {
                Ok(h) => CheckResult::warn(format!(
                    "{} answers on {answering} (vmgate {}), but authenticating to its gateway \
                     failed: {why}",
                    h.config.host_name, h.version.daemon
                )),
                Err(_) => CheckResult::warn(format!(
                    "{to}'s gateway answers on {answering}, but authenticating to it failed: {why}"
                )),
            }
        }
    }
}

fn need_destination(ctx: &mut Context) -> Result<HostInfo, CheckResult> {
    if ctx.status_of("daemon-reachable") != Some(Status::Pass) {
        return Err(CheckResult::skip("D's daemon did not answer"));
    }
    destination(ctx)
        .map_err(|e| CheckResult::skip(format!("D's settings are unknown: {}", chain(&*e))))
}

fn enabled(ctx: &mut Context) -> CheckResult {
    let d = match need_destination(ctx) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let h = &d.config.host_name;
    if d.config.migration.enabled {
        CheckResult::pass(format!(
            "live migration is enabled on {h} (auth {}, {} at once)",
            d.config.migration.auth.as_str(),
            d.config.migration.max_live_moves
        ))
    } else {
        CheckResult::fail(
            format!("live migration is disabled on {h}"),
            Diagnosis::new(
                WinCode::ConnectionRefused,
                format!(
                    "{h} does not accept live moves: migration is disabled in its settings (Hyper-V: the destination host has not been configured to accept live migrations)"
                ),
            )
            .with_fix(format!("vmgate --host {h} host enable")),
        )
    }
}

fn source_allowed(ctx: &mut Context) -> CheckResult {
    let d = match need_destination(ctx) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let sources: Vec<SocketAddr> = ctx.source_addresses().to_vec();
    let Some(s) = sources.first() else {
        return CheckResult::skip("S's address is unknown (resolve-source failed)");
    };
    let filter: NetworkFilter = d.config.migration.network_filter();
    let h = &d.config.host_name;
    if filter.allows(s.ip()) {
        CheckResult::pass(format!("{} is allowed by {h} ({filter})", s.ip()))
    } else {
        CheckResult::fail(
            format!("{} is not on {h}'s migration networks ({filter})", s.ip()),
            Diagnosis::new(
                WinCode::AccessDenied,
                format!(
                    "{h} does not accept moves from {}: that address is not on its migration networks ({filter}); the fix keeps them and adds {}",
                    s.ip(),
                    s.ip()
                ),
            )
            .with_fix(add_network_fix(h, &d.config.migration.networks, s.ip())),
        )
    }
}

/// The command that adds `ip` to `host`'s migration networks: `host set --network` replaces the
/// list, so the fix names every network `host` has now (with its priority) and then the new
/// one, after the others.
fn add_network_fix(
    host: &str,
    networks: &[vmgate_control::config::MigrationNetwork],
    ip: std::net::IpAddr,
) -> String {
    let network = |subnet: String, priority: u32| {
        if subnet.contains(':') {
            format!(" --network [{subnet}]:{priority}")
        } else {
            format!(" --network {subnet}:{priority}")
        }
    };
    let mut args: String = networks
        .iter()
        .map(|n| network(n.subnet.to_string(), n.priority))
        .collect();
    let next = networks
        .iter()
        .map(|n| n.priority.saturating_add(1))
        .max()
        .unwrap_or(0);
    let single = if ip.is_ipv4() { 32 } else { 128 };
    args.push_str(&network(format!("{ip}/{single}"), next));
    format!(
        "vmgate --host {host} host set{args}\nor allow the whole subnet S moves over, or any \
         network: vmgate --host {host} host set --any-network true"
    )
}

fn versions(ctx: &mut Context) -> CheckResult {
    let d = match need_destination(ctx) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let from = ctx.settings().from.clone();
    let (s, whose) = match host_info(ctx, &from) {
        Ok(h) => (h.version, format!("{from}'s daemon")),
        Err(_) => (
            VersionInfo {
                daemon: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: vmgate_control::api::host::PROTOCOL_VERSION,
                min_protocol: vmgate_control::api::host::MIN_PROTOCOL_VERSION,
            },
            "this build".to_owned(),
        ),
    };
    let dv = &d.version;
    let h = &d.config.host_name;
    if s.protocol > dv.protocol {
        CheckResult::fail(
            format!(
                "{whose} speaks protocol {}; {h} accepts {} to {}",
                s.protocol, dv.min_protocol, dv.protocol
            ),
            Diagnosis::new(
                WinCode::NotSupported,
                format!(
                    "{h} runs vmgate {} (protocol versions {} to {}) and {from} runs vmgate {} (protocol version {}): an older destination refuses a newer source",
                    dv.daemon, dv.min_protocol, dv.protocol, s.daemon, s.protocol
                ),
            )
            .with_fix(format!("update vmgate on {h} first")),
        )
    } else if s.protocol < dv.min_protocol {
        CheckResult::fail(
            format!(
                "{whose} speaks protocol {}; {h} accepts {} to {}",
                s.protocol, dv.min_protocol, dv.protocol
            ),
            Diagnosis::new(
                WinCode::NotSupported,
                format!(
                    "{h} no longer accepts protocol version {} (it accepts {} to {})",
                    s.protocol, dv.min_protocol, dv.protocol
                ),
            )
            .with_fix(format!("update vmgate on {from}")),
        )
    } else {
        CheckResult::pass(format!(
            "{whose} speaks protocol {}; {h} accepts {} to {}",
            s.protocol, dv.min_protocol, dv.protocol
        ))
    }
}

fn vm_compatible(ctx: &mut Context) -> CheckResult {
    let Some(vm) = ctx.settings().vm.clone() else {
        return CheckResult::skip("no --vm given");
    };
    let d = match need_destination(ctx) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let from = ctx.settings().from.clone();
    let mut s = match session(ctx, &from) {
        Ok(s) => s,
        Err(e) => {
            return CheckResult::skip(format!("{from}'s daemon cannot be asked: {}", chain(&e)));
        }
    };
    let ccache = if s.is_local() {
        let cc = control::caller_ccache(ctx.settings().user_ccache.as_deref());
        match control::ccache_bytes(&cc) {
            Ok(b) => Some(CcacheBlob::new(b)),
            Err(e) => return CheckResult::skip(chain(&e)),
        }
    } else {
        None
    };
    let spec = MoveSpec {
        vm: vm.clone(),
        to: d
            .migration_addresses
            .iter()
            .map(ToString::to_string)
            .collect(),
        destination: d.config.fqdn.clone(),
        ccache,
        switch_map: ctx.settings().switch_map.clone(),
        storage_path: None,
        disks: Vec::new(),
        keep_source: false,
    };
    let h = d.config.host_name.clone();
    match s.call(&Request::Compare(spec)) {
        Ok(Response::Compared { report, .. }) if report.is_empty() => {
            CheckResult::pass(format!("{vm} can move to {h}: no incompatibilities"))
        }
        Ok(Response::Compared { report, .. }) => {
            let lines: Vec<String> = report
                .iter()
                .map(|i| format!("[{}] {}", i.id, i.message))
                .collect();
            let mut r = CheckResult::fail(
                format!("{vm} cannot move to {h}: {} incompatibilities", report.len()),
                Diagnosis::new(
                    WinCode::NotSupported,
                    format!("{h} cannot take {vm}: {}", lines.join("; ")),
                )
                .with_fix(
                    "each reason above says its fix (processor compatibility mode, --switch-map, another host)",
                ),
            );
            for l in lines {
                r = r.detail(l);
            }
            r
        }
        Ok(Response::Error(e)) => CheckResult::fail(
            format!("the compare failed: {}", e.message),
            Diagnosis::new(
                WinCode::NotSupported,
                format!("{from} could not compare {vm} with {h}: {}", e.message),
            ),
        ),
        Ok(other) => CheckResult::warn(format!("unexpected answer {other:?}")),
        Err(e) => CheckResult::skip(format!("{from}'s daemon cannot be asked: {}", chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmgate_control::config::MigrationNetwork;

    #[test]
    fn the_network_fix_adds_to_the_list_instead_of_replacing_it() {
        let nets = vec![
            MigrationNetwork::parse("10.99.0.0/16:0").unwrap(),
            MigrationNetwork::parse("[fd00:20::/64]:3").unwrap(),
        ];
        let fix = add_network_fix("hv2", &nets, "127.0.0.11".parse().unwrap());
        assert!(
            fix.starts_with(
                "vmgate --host hv2 host set --network 10.99.0.0/16:0 --network [fd00:20::/64]:3 \
                 --network 127.0.0.11/32:4\n"
            ),
            "{fix}"
        );
        // Every network written parses back as the daemon parses --network.
        let words: Vec<&str> = fix.lines().next().unwrap().split_whitespace().collect();
        for w in words.windows(2).filter(|w| w[0] == "--network") {
            MigrationNetwork::parse(w[1]).unwrap();
        }
        assert!(
            add_network_fix("hv2", &[], "::1".parse().unwrap()).contains("--network [::1/128]:0")
        );
    }
}
