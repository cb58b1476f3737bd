//! The daemon's request handling: one dispatcher for the local socket and the gateway's
//! control channels, the host's run-time migration settings (`host set`, `host enable`,
//! `host disable`, kept across restarts in the state folder), moves as queued jobs (live
//! moves, and storage-only moves of a running VM on this host), and the destination's checks
//! of arriving moves (migrations enabled, the live-move limit, virtual switches, the
//! processor).
//!
//! Who may do what: the local socket admits root and the local group (by peer credentials);
//! the gateway admits members of the admin group (Kerberos, checked against the directory).
//! Both may use every request. A move asked for on the local socket runs with the caller's
//! own ticket handed over by the CLI; one asked for over the network runs with what the
//! caller's channel allows this host to do for it (the host's auth type).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vmgate_auth::krb::HostCredentials;
use vmgate_auth::netfilter::NetworkFilter;
use vmgate_auth::spn::Spn;
use vmgate_migrate::engine::{
    CancelToken, DestinationOptions, MoveOptions, Phase, Progress, RateLimiter, ReceivedEvent,
    ReceivedVm, StorageOptions, StorageTarget, incompatibility,
};
use vmgate_migrate::protocol::{Compression, Incompatibility as EngineIncompatibility};
use vmgate_migrate::storage::local::{
    LocalMoveError, LocalMoveOptions, LocalMoveReport, MovePhase as StoragePhase, MoveProgress,
    move_storage,
};
use vmgate_migrate::storage::paths::StorageRoots;
use vmgate_migrate::storage::plan::PlanError;
use vmgate_migrate::vm::{Vm, VmConfig};

use super::compat;
use super::jobs::{Direction, Job, JobKind, JobState, Jobs};
use super::vms::{
    FailureKind, MoveCredential, MoveFailure, MoveMode, MoveRequest, VmOpError, Vms, move_vm,
};
use crate::daemon::config::{
    AuthType, Bandwidth, Config, MigrationNetwork, MigrationSettings, Performance,
};
use crate::daemon::events::{Event, EventLog, MoveKind, MovePhase};
use crate::daemon::local::{
    Caller, ControlHandler, ErrorCode, ErrorReply, HostChanges, HostInfo, Incompatibility,
    MoveSpec, MoveSummary, MovedDisk, OldFile, Replies, Request, Response, SpnState,
    StorageMoveSpec, StorageMoveSummary, VersionInfo,
};

/// The file in the state folder that keeps `host set` changes.
pub const SETTINGS_FILE: &str = "migration-settings.json";

/// The daemon's services.
#[derive(Debug, Clone)]
pub struct Service {
    config: Arc<Config>,
    migration: Arc<RwLock<MigrationSettings>>,
    filter: Arc<RwLock<NetworkFilter>>,
    spns: Vec<SpnState>,
    /// The VMs.
    pub vms: Vms,
    /// The moves.
    pub jobs: Jobs,
    events: EventLog,
    host: Option<HostCredentials>,
    incoming: Arc<Mutex<HashMap<String, Job>>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

impl Service {
    /// The services of a daemon with `config`: migration settings saved by `host set` (in the
    /// state folder) override the file's. `host` is the keytab credential for acting for
    /// remote callers (None when migration cannot run).
    pub fn new(
        config: Config,
        events: EventLog,
        spns: Vec<SpnState>,
        host: Option<HostCredentials>,
    ) -> Result<Service, String> {
        let mut config = config;
        let saved = config.state_dir.join(SETTINGS_FILE);
        match std::fs::read(&saved) {
            Ok(bytes) => {
                let m: MigrationSettings = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{} is not valid ({e}); remove it to go back to the configuration file's settings",
                        saved.display()
                    )
                })?;
                config.migration = m;
                config.check().map_err(|e| {
                    format!(
                        "{}: {e}; remove it to go back to the configuration file's settings",
                        saved.display()
                    )
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", saved.display())),
        }
        let filter = config.migration.network_filter();
        let vms = Vms::new(
            config.state_dir.join("consoles"),
            config.storage_roots.clone(),
        );
        Ok(Service {
            migration: Arc::new(RwLock::new(config.migration.clone())),
            filter: Arc::new(RwLock::new(filter)),
            config: Arc::new(config),
            spns,
            vms,
            jobs: Jobs::default(),
            events,
            host,
            incoming: Arc::default(),
        })
    }

    /// The configuration with the migration settings in force.
    pub fn config(&self) -> Config {
        let mut c = (*self.config).clone();
        c.migration = read(&self.migration).clone();
        c
    }

    /// The migration settings in force.
    pub fn migration(&self) -> MigrationSettings {
        read(&self.migration).clone()
    }

    /// The incoming-network filter for migration channels (changes with `host set`).
    pub fn migration_filter(&self) -> Arc<RwLock<NetworkFilter>> {
        Arc::clone(&self.filter)
    }

    fn host_info(&self) -> HostInfo {
        let config = self.config();
        HostInfo {
            migration_addresses: offered_addresses(&config)
                .iter()
                .map(ToString::to_string)
                .collect(),
            version: VersionInfo::current(),
            config,
            spns: self.spns.clone(),
        }
    }

    fn host_set(&self, changes: &HostChanges) -> Response {
        let mut c = self.config();
        if let Err(e) = apply_changes(&mut c.migration, changes) {
            return Response::error(ErrorCode::BadRequest, e);
        }
        if let Err(e) = c.check() {
            return Response::error(ErrorCode::BadRequest, e);
        }
        let path = self.config.state_dir.join(SETTINGS_FILE);
        let json = match serde_json::to_vec_pretty(&c.migration) {
            Ok(j) => j,
            Err(e) => return Response::error(ErrorCode::Failed, e.to_string()),
        };
        let tmp = path.with_extension("json.new");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path)) {
            return Response::error(
                ErrorCode::Failed,
                format!("cannot save the settings to {}: {e}", path.display()),
            );
        }
        *self.filter.write().unwrap_or_else(PoisonError::into_inner) = c.migration.network_filter();
        *self
            .migration
            .write()
            .unwrap_or_else(PoisonError::into_inner) = c.migration;
        Response::Host(Box::new(self.host_info()))
    }

    fn move_options(&self, switch_map: &[(String, String)]) -> MoveOptions {
        let m = self.migration();
        MoveOptions {
            channels: m.effective_channels(),
            compression: match m.performance {
                Performance::Compression => Compression::Lz4,
                Performance::Tcpip | Performance::Multichannel => Compression::None,
            },
            bandwidth_limit: m.bandwidth_limit.map(|b| b.bytes_per_second()),
            downtime_target: Duration::from_millis(u64::from(m.downtime_target_ms)),
            auto_converge: true,
            switch_map: switch_map.to_vec(),
            version: self.config.testing.protocol_version(),
            ..MoveOptions::default()
        }
    }

    /// `move` and `compare`.
    fn start_move(
        &self,
        caller: &Caller,
        spec: &MoveSpec,
        mode: MoveMode,
        replies: &mut Replies<'_>,
    ) -> Response {
        let m = self.migration();
        if mode == MoveMode::Move && !m.enabled {
            return Response::error(
                ErrorCode::Refused,
                format!(
                    "live migration is disabled on {} (Hyper-V: Enable-VMMigration); fix: vmgate --host {} host enable",
                    self.config.host_name, self.config.host_name
                ),
            );
        }
        let mut to = Vec::new();
        for a in &spec.to {
            match crate::daemon::config::parse_listen(a) {
                Ok(addr) => to.push(addr),
                Err(e) => return Response::error(ErrorCode::BadRequest, e),
            }
        }
        if to.is_empty() {
            return Response::error(ErrorCode::BadRequest, "no destination address given");
        }
        let spn = match Spn::new(&self.config.spn_class, &spec.destination) {
            Ok(s) => s,
            Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
        };
        let switch_map = match parse_switch_map(&spec.switch_map) {
            Ok(m) => m,
            Err(e) => return Response::error(ErrorCode::BadRequest, e),
        };
        let credential = match self.credential_for(caller, spec) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let storage = match storage_options(spec) {
            Ok(s) => s,
            Err(e) => return Response::error(ErrorCode::BadRequest, e),
        };
        let mut options = self.move_options(&switch_map);
        // The inventory keeps files other VMs need from being deleted after the move.
        options.storage = storage.map(|s| StorageOptions {
            users: Some(Arc::new(self.vms.clone())),
            ..s
        });
        let req = MoveRequest {
            vm: &spec.vm,
            to,
            spn,
            credential,
            realm: self.config.realm.clone(),
            local_host: self.config.host_name.clone(),
            sources: self.config.listen.iter().map(SocketAddr::ip).collect(),
            options,
        };
        let destination = spec
            .destination
            .split('.')
            .next()
            .unwrap_or(&spec.destination)
            .to_owned();
        match mode {
            MoveMode::Compare => {
                let (outcome, report) =
                    move_vm(&self.vms, &req, mode, &CancelToken::new(), &mut |_| {});
                match (outcome.result, report) {
                    (Ok(_), Some(report)) => Response::Compared {
                        vm: spec.vm.clone(),
                        destination,
                        report: report
                            .into_iter()
                            .map(|(id, message)| Incompatibility { id, message })
                            .collect(),
                    },
                    (Err(f), _) => failure_response(&f),
                    (Ok(_), None) => {
                        Response::error(ErrorCode::Failed, "the compare gave no report")
                    }
                }
            }
            MoveMode::Move => self.run_move_job(caller, &req, &destination, &m, replies),
        }
    }

    fn credential_for<'a>(
        &self,
        caller: &'a Caller,
        spec: &'a MoveSpec,
    ) -> Result<MoveCredential<'a>, Response> {
        match caller {
            Caller::Local(_) => match &spec.ccache {
                Some(cc) => Ok(MoveCredential::OwnTicket {
                    ccache: cc.expose(),
                    dir: self.config.state_dir.join("ccache"),
                }),
                None => match self.migration().auth {
                    AuthType::Host => self.host_credential(),
                    _ => Err(Response::error(
                        ErrorCode::Denied,
                        "a move started on this host runs with your own Kerberos ticket, and none was handed over; fix: kinit (a forwardable ticket), then run vmgate again",
                    )),
                },
            },
            Caller::Remote(r) => {
                let host = self.host.clone().ok_or_else(|| {
                    Response::error(ErrorCode::Failed, "this host has no keytab credential")
                })?;
                let auth = match self.migration().auth {
                    AuthType::Host => return Ok(MoveCredential::Host { host }),
                    AuthType::Kerberos => vmgate_auth::delegation::AuthType::Kerberos,
                    AuthType::Credssp => vmgate_auth::delegation::AuthType::Credssp,
                };
                Ok(MoveCredential::ActFor {
                    acting: &r.acting,
                    host,
                    auth,
                })
            }
        }
    }

    fn host_credential<'a>(&self) -> Result<MoveCredential<'a>, Response> {
        self.host
            .clone()
            .map(|host| MoveCredential::Host { host })
            .ok_or_else(|| Response::error(ErrorCode::Failed, "this host has no keytab credential"))
    }

    fn run_move_job(
        &self,
        caller: &Caller,
        req: &MoveRequest<'_>,
        destination: &str,
        m: &MigrationSettings,
        replies: &mut Replies<'_>,
    ) -> Response {
        let user = match caller {
            Caller::Remote(r) => r.principal.clone(),
            Caller::Local(_) => caller.describe(),
        };
        let mut job = self.jobs.submit(
            JobKind::Live,
            Direction::Outgoing,
            req.vm,
            destination,
            &user,
        );
        let id = job.id().to_owned();
        let vm = req.vm.to_owned();
        let migration = Arc::clone(&self.migration);
        let limit = move || read(&migration).max_live_moves;
        let events = self.events.clone();
        // Whether it had to wait (a job that got its slot at once is not "dequeued").
        let mut queued = false;
        let waited = job.wait_for_slot(&limit, &mut |position, limit| {
            queued = true;
            events.emit(Event::MigrationQueued {
                job: id.clone(),
                vm: vm.clone(),
                kind: MoveKind::Live,
                position: u32::try_from(position).unwrap_or(u32::MAX),
                limit,
            });
            let _ = replies.send(&Response::Progress {
                progress: serde_json::json!({
                    "job": id, "phase": "queued", "position": position, "limit": limit,
                }),
            });
        });
        let waited = match waited {
            Ok(w) => w,
            Err(e) => {
                return Response::error(
                    ErrorCode::Cancelled,
                    format!("{e}; {} keeps running here", req.vm),
                );
            }
        };
        if queued {
            self.events.emit(Event::MigrationDequeued {
                job: id.clone(),
                vm: vm.clone(),
                kind: MoveKind::Live,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            });
        }
        let cancel = job.cancel_token().clone();
        let mut announced = false;
        let mut last_phase = None;
        let (outcome, _) = move_vm(
            &self.vms,
            req,
            MoveMode::Move,
            &cancel,
            &mut |p: &Progress| {
                if !announced {
                    announced = true;
                    self.events.emit(Event::MigrationStarted {
                        job: id.clone(),
                        vm: vm.clone(),
                        kind: MoveKind::Live,
                        source: self.config.host_name.clone(),
                        destination: destination.to_owned(),
                        user: user.clone(),
                    });
                }
                if last_phase != Some(p.phase) {
                    last_phase = Some(p.phase);
                    if let Some(phase) = event_phase(p.phase) {
                        self.events.emit(Event::MigrationPhase {
                            job: id.clone(),
                            vm: vm.clone(),
                            phase,
                        });
                    }
                }
                let mut v = serde_json::to_value(p).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("job".into(), id.clone().into());
                }
                job.progress(v.clone());
                let _ = replies.send(&Response::Progress { progress: v });
            },
        );
        match outcome.result {
            Ok(stats) => {
                let downtime_ms = whole_ms(stats.downtime_ms);
                self.events.emit(Event::MigrationCompleted {
                    job: id.clone(),
                    vm: vm.clone(),
                    total_ms: whole_ms(stats.total_ms),
                    downtime_ms,
                    bytes: stats.bytes_on_wire,
                });
                let target = u64::from(m.downtime_target_ms);
                if downtime_ms > target {
                    self.events.emit(Event::LongDowntime {
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
                Response::Moved(Box::new(MoveSummary {
                    job: id,
                    vm,
                    destination: destination.to_owned(),
                    address: outcome.address,
                    user: outcome.user,
                    method: outcome.method,
                    stats: serde_json::to_value(&stats).unwrap_or_default(),
                }))
            }
            Err(f) => {
                let (code, code_name) = match &f.win_code {
                    Some(c) => (c.clone(), win_name(c)),
                    None => ("0x80004005".into(), "E_FAIL".into()),
                };
                let (cause, fix) = split_fix(&f.message);
                self.events.emit(Event::MigrationFailed {
                    job: id.clone(),
                    vm: vm.clone(),
                    code,
                    code_name,
                    cause,
                    fix,
                });
                let state = if f.kind == FailureKind::Cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                job.finish(state, f.message.clone());
                let mut r = failure_response(&f);
                if let Response::Error(e) = &mut r {
                    e.message = format!("job {id}: {}", e.message);
                }
                r
            }
        }
    }

    /// The destination's options: its checks of an arriving VM and its lifecycle events.
    pub fn destination_options(&self) -> DestinationOptions {
        let me = self.clone();
        let check = self.clone();
        DestinationOptions {
            host_check: Some(Box::new(move |vm: &VmConfig| check.arrival_check(vm))),
            on_event: Box::new(move |e| me.received_event(e)),
            vm_options: {
                let vms = self.vms.clone();
                Box::new(move |c: &VmConfig| vms.options_for(&c.name))
            },
            hidden_cpu_features: self.config.testing.hidden_cpu_features.clone(),
            storage_roots: self.config.storage_roots.clone(),
            ..DestinationOptions::default()
        }
    }

    fn arrival_check(&self, vm: &VmConfig) -> Vec<EngineIncompatibility<'static>> {
        let m = self.migration();
        let host = &self.config.host_name;
        let mut report = Vec::new();
        if !m.enabled {
            report.push(EngineIncompatibility {
                id: incompatibility::DISABLED,
                message: format!(
                    "live migration is disabled on {host} (Hyper-V: Enable-VMMigration); fix: vmgate --host {host} host enable"
                )
                .into(),
            });
        }
        // This move is already counted as running (its Started event came first).
        let running = self.jobs.running(JobKind::Live);
        if running > m.max_live_moves {
            report.push(EngineIncompatibility {
                id: incompatibility::BUSY,
                message: format!(
                    "{host} already runs {} live moves, its limit (max_live_moves = {}); retry when one ends, or raise it: vmgate --host {host} host set --max-live-moves N",
                    running - 1,
                    m.max_live_moves
                )
                .into(),
            });
        }
        if self.vms.contains(&vm.name) {
            report.push(EngineIncompatibility {
                id: incompatibility::CONFIG,
                message: format!("a VM named \"{}\" already exists on {host}", vm.name).into(),
            });
        }
        report.extend(compat::switch_check(&self.config.switches, host, vm));
        report
    }

    /// The destination's lifecycle: each incoming move is a job (who and from where, recorded
    /// at its start), with its events.
    fn received_event(&self, e: ReceivedEvent) {
        let mut incoming = self.incoming.lock().unwrap_or_else(PoisonError::into_inner);
        match e {
            ReceivedEvent::Started { session, peer } => {
                let (user, source) = peer.split_once(" from ").unwrap_or(("", &peer));
                let job = self
                    .jobs
                    .submit(JobKind::Live, Direction::Incoming, "", source, user);
                incoming.insert(session.to_string(), job);
            }
            ReceivedEvent::Checked {
                session,
                vm,
                refused,
            } => {
                let key = session.to_string();
                let (job_id, user, source) = match incoming.get(&key) {
                    Some(j) => {
                        j.set_vm(&vm);
                        let info = self.jobs.get(j.id());
                        let (user, source) = info.map(|i| (i.user, i.peer)).unwrap_or_default();
                        (j.id().to_owned(), user, source)
                    }
                    None => (key.clone(), String::new(), String::new()),
                };
                if refused.is_empty() {
                    self.events.emit(Event::MigrationStarted {
                        job: job_id,
                        vm,
                        kind: MoveKind::Live,
                        source,
                        destination: self.config.host_name.clone(),
                        user,
                    });
                } else {
                    let cause = refused.join("; ");
                    self.events.emit(generic_failure(job_id, vm, cause.clone()));
                    if let Some(j) = incoming.remove(&key) {
                        j.finish(JobState::Failed, format!("refused: {cause}"));
                    }
                }
            }
            ReceivedEvent::Resumed { session, vm } => {
                let key = session.to_string();
                let job = incoming.remove(&key);
                self.events.emit(Event::MigrationPhase {
                    job: job.as_ref().map_or(key, |j| j.id().to_owned()),
                    vm: vm.clone(),
                    phase: MovePhase::Handoff,
                });
                if let Some(j) = job {
                    j.finish(JobState::Completed, format!("{vm} runs here"));
                }
            }
            ReceivedEvent::Discarded { session, reason } => {
                let key = session.to_string();
                let job = incoming.remove(&key);
                let job_id = job.as_ref().map_or(key, |j| j.id().to_owned());
                self.events
                    .emit(generic_failure(job_id, String::new(), reason.clone()));
                if let Some(j) = job {
                    j.finish(JobState::Failed, reason);
                }
            }
        }
    }

    /// A VM arrived: list it, then announce its NICs' MACs on the mapped switches'
    /// interfaces (gratuitous ARP), so that the network finds it here.
    pub fn arrived(&self, v: ReceivedVm, who: &str) {
        let config = v.vm.config().clone();
        let name = config.name.clone();
        if let Err(e) = self.vms.add(v.vm, format!("moved here by {who}")) {
            eprintln!("vmgated: {name} arrived but cannot be listed: {e}");
            return;
        }
        for (i, nic) in config.nics.iter().enumerate() {
            let Some(interface) = compat::interface_for(&self.config.switches, &nic.switch) else {
                continue;
            };
            let Ok(mac) = vmgate_migrate::vm::config::parse_mac(&nic.mac) else {
                continue;
            };
            if let Err(e) = super::arp::announce(interface, mac) {
                eprintln!(
                    "vmgated: {name} NIC {i}: the gratuitous ARP for {} on {interface} failed: {e}",
                    nic.mac
                );
            }
        }
    }
}

/// Storage-only moves (Hyper-V: `Move-VMStorage`): a running VM's disks move to new files on
/// this host, as a job counted against `max_storage_moves`.
///
/// ```text
///  check       the VM runs here and is not being moved; the disks named exist; every
///              destination is inside storage_roots (else refused, [1009]) -- nothing written
///  queue       a job (direction local, kind storage): 20404 while it waits, 20405 when it
///              gets its slot
///  move        disk after disk (vmgate_migrate::storage::local::move_storage): 20400, then
///              20401 per phase (setup, storage, switchover, handoff); progress lines; a
///              cancel from `jobs cancel` stops it before the switch (the VM stays on its old
///              files, nothing is left at the destination)
///  end         the registry takes the files the disks are on now (vm show, a cold boot);
///              20402 with the bytes and the pause, or 20403
/// ```
impl Service {
    fn storage_move(
        &self,
        caller: &Caller,
        spec: &StorageMoveSpec,
        replies: &mut Replies<'_>,
    ) -> Response {
        let limiter = match &spec.bandwidth {
            None => None,
            Some(b) => match b.parse::<Bandwidth>() {
                Ok(b) => Some(RateLimiter::new(b.bytes_per_second())),
                Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
            },
        };
        let name = spec.vm.as_str();
        let vm = match self.vms.begin_storage_move(name) {
            Ok(vm) => vm,
            Err(e) => return vm_error(&e),
        };
        // From here on, however this ends, the registry follows the disks and the VM is free
        // to be stopped or moved again.
        let mut registry = EndStorageMove {
            vms: &self.vms,
            name,
            vm: &vm,
            ended: false,
        };
        let current: Vec<PathBuf> = vm.disk_specs().into_iter().map(|d| d.path).collect();
        let wanted = match storage_targets(name, &current, spec) {
            Ok(t) => t,
            Err(e) => return Response::error(ErrorCode::BadRequest, e),
        };
        let (roots, targets) = match check_storage_targets(&self.config.storage_roots, &wanted) {
            Ok(r) => r,
            Err(problems) => {
                return Response::error(
                    ErrorCode::Refused,
                    format!(
                        "{} cannot take the storage of {name}: {}. {name} keeps running on its current files.",
                        self.config.host_name,
                        problems
                            .iter()
                            .map(|p| format!("[{}] {p}", incompatibility::STORAGE))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
            }
        };
        let user = match caller {
            Caller::Remote(r) => r.principal.clone(),
            Caller::Local(_) => caller.describe(),
        };
        let destination = folders(targets.iter().map(|(_, p)| p.as_path()));
        let sources = folders(
            targets
                .iter()
                .filter_map(|(i, _)| current.get(*i))
                .map(PathBuf::as_path),
        );
        let mut job = self.jobs.submit(
            JobKind::Storage,
            Direction::Local,
            name,
            &destination,
            &user,
        );
        let id = job.id().to_owned();
        let migration = Arc::clone(&self.migration);
        let limit = move || read(&migration).max_storage_moves;
        let mut queued = false;
        let waited = job.wait_for_slot(&limit, &mut |position, limit| {
            queued = true;
            self.events.emit(Event::MigrationQueued {
                job: id.clone(),
                vm: name.to_owned(),
                kind: MoveKind::Storage,
                position: u32::try_from(position).unwrap_or(u32::MAX),
                limit,
            });
            let _ = replies.send(&Response::Progress {
                progress: serde_json::json!({
                    "job": id, "kind": "storage", "phase": "queued", "position": position,
                    "limit": limit,
                }),
            });
        });
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
            self.events.emit(Event::MigrationDequeued {
                job: id.clone(),
                vm: name.to_owned(),
                kind: MoveKind::Storage,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            });
        }
        self.events.emit(Event::MigrationStarted {
            job: id.clone(),
            vm: name.to_owned(),
            kind: MoveKind::Storage,
            source: sources,
            destination,
            user: user.clone(),
        });
        let started = Instant::now();
        let token = job.cancel_token().clone();
        let run = StorageRun {
            service: self,
            job: &job,
            vm: &vm,
            targets: &targets,
            roots: &roots,
            options: LocalMoveOptions {
                keep_source: spec.keep_source,
                users: Some(Arc::new(self.vms.clone())),
                ..LocalMoveOptions::default()
            },
            limiter: limiter.as_ref(),
        };
        let (reports, failure) = run.run(token.flag(), replies);
        // Before the job ends: whoever sees it ended sees the VM on the files it uses.
        registry.end();
        let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let paused_us: u64 = reports.iter().map(|r| micros(r.paused)).sum();
        let bytes: u64 = reports.iter().map(|r| r.bytes_copied).sum();
        match failure {
            None => {
                self.events.emit(Event::MigrationCompleted {
                    job: id.clone(),
                    vm: name.to_owned(),
                    total_ms,
                    downtime_ms: paused_us.div_ceil(1000),
                    bytes,
                });
                let target = u64::from(self.migration().downtime_target_ms);
                if paused_us.div_ceil(1000) > target {
                    self.events.emit(Event::LongDowntime {
                        job: id.clone(),
                        vm: name.to_owned(),
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
                    vm: name.to_owned(),
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
                let cancelled = is_cancelled(&e);
                let refused = is_refused(&e);
                let mut message = chain(&e);
                if cancelled {
                    message = format!("{}: {message}", token.reason());
                }
                self.events.emit(generic_failure(
                    id.clone(),
                    name.to_owned(),
                    message.clone(),
                ));
                job.finish(
                    if cancelled {
                        JobState::Cancelled
                    } else {
                        JobState::Failed
                    },
                    message.clone(),
                );
                let (code, message) = if refused {
                    (
                        ErrorCode::Refused,
                        format!("[{}] {message}", incompatibility::STORAGE),
                    )
                } else if cancelled {
                    (ErrorCode::Cancelled, message)
                } else {
                    (ErrorCode::Failed, message)
                };
                Response::error(code, format!("job {id}: {message}"))
            }
        }
    }
}

/// Ends a storage-only move in the registry once: explicitly, or when dropped (see
/// [`Vms::end_storage_move`]).
struct EndStorageMove<'a> {
    vms: &'a Vms,
    name: &'a str,
    vm: &'a Arc<Vm>,
    ended: bool,
}

impl EndStorageMove<'_> {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.vms.end_storage_move(self.name, self.vm);
        }
    }
}

impl Drop for EndStorageMove<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// One storage-only move once it has its slot.
struct StorageRun<'a> {
    service: &'a Service,
    job: &'a Job,
    vm: &'a Vm,
    targets: &'a [(usize, PathBuf)],
    roots: &'a StorageRoots,
    options: LocalMoveOptions,
    limiter: Option<&'a RateLimiter>,
}

/// How often a progress line goes to the client and to the job record (phase changes always
/// go at once).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl StorageRun<'_> {
    /// Moves the disks one after the other; stops at the first failure (the disks before it
    /// stay on their new files). `cancel` is the job's flag (`jobs cancel` raises it).
    fn run(
        &self,
        cancel: &AtomicBool,
        replies: &mut Replies<'_>,
    ) -> (Vec<LocalMoveReport>, Option<LocalMoveError>) {
        let total: u64 = self
            .targets
            .iter()
            .map(|(i, _)| bytes_to_copy(self.vm, *i))
            .sum();
        let id = self.job.id().to_owned();
        let name = self.vm.config().name.clone();
        let started = Instant::now();
        let mut reports: Vec<LocalMoveReport> = Vec::new();
        let mut last_event = None;
        let mut last_phase = None;
        let mut last_sent: Option<Instant> = None;
        for (n, (index, destination)) in self.targets.iter().enumerate() {
            let before: u64 = reports.iter().map(|r| r.bytes_copied).sum();
            let mut seen = 0;
            let mut on_progress = |p: &MoveProgress| {
                // The cap holds while the guest runs; the pause is never stretched.
                if let Some(l) = self.limiter
                    && matches!(
                        p.phase,
                        StoragePhase::Parents | StoragePhase::Bulk | StoragePhase::Dirty
                    )
                    && p.bytes_copied > seen
                    && !cancel.load(Ordering::Relaxed)
                {
                    l.acquire(p.bytes_copied - seen);
                }
                seen = seen.max(p.bytes_copied);
                let event = storage_event_phase(p.phase);
                if last_event != Some(event) {
                    last_event = Some(event);
                    self.service.events.emit(Event::MigrationPhase {
                        job: id.clone(),
                        vm: name.clone(),
                        phase: event,
                    });
                }
                let new_phase = last_phase != Some(p.phase);
                last_phase = Some(p.phase);
                if !new_phase && last_sent.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                    return;
                }
                last_sent = Some(Instant::now());
                let copied = before + p.bytes_copied;
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let v = serde_json::json!({
                    "job": id,
                    "kind": "storage",
                    "phase": p.phase,
                    "disk": index,
                    "disk_number": n + 1,
                    "disks": self.targets.len(),
                    "layer": p.layer,
                    "bytes_copied": copied,
                    "bytes_total": total.max(copied),
                    "round": p.round,
                    "dirty_blocks": p.dirty_blocks,
                    "rate_bytes_s": copied.saturating_mul(1000) / elapsed_ms.max(1),
                });
                self.job.progress(v.clone());
                let _ = replies.send(&Response::Progress { progress: v });
            };
            match move_storage(
                self.vm,
                *index,
                destination,
                self.roots,
                &self.options,
                cancel,
                &mut on_progress,
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

/// The event log's phase for a storage move's phase.
fn storage_event_phase(p: StoragePhase) -> MovePhase {
    match p {
        StoragePhase::Plan => MovePhase::Setup,
        StoragePhase::Parents | StoragePhase::Bulk | StoragePhase::Dirty => MovePhase::Storage,
        StoragePhase::Switch => MovePhase::Switchover,
        StoragePhase::Release => MovePhase::Handoff,
    }
}

/// Whether a storage move stopped because it was cancelled.
fn is_cancelled(e: &LocalMoveError) -> bool {
    match e {
        LocalMoveError::Cancelled { .. }
        | LocalMoveError::Plan {
            source: PlanError::Cancelled,
            ..
        } => true,
        LocalMoveError::Partial { source, .. } => is_cancelled(source),
        _ => false,
    }
}

/// Whether a storage move was refused for its destination (the storage roots' policy).
fn is_refused(e: &LocalMoveError) -> bool {
    match e {
        LocalMoveError::Destination(_)
        | LocalMoveError::Plan {
            source: PlanError::Path(_),
            ..
        } => true,
        LocalMoveError::Partial { source, .. } => is_refused(source),
        _ => false,
    }
}

/// An error and its sources, one sentence after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds as milliseconds, for people.
fn ms_of_us(us: u64) -> f64 {
    // Pauses are far below 2^52 µs: exact.
    #[allow(clippy::cast_precision_loss, reason = "far below 2^52")]
    let v = us as f64;
    v / 1000.0
}

/// The distinct folders of some files, for the job record and the events.
fn folders<'a>(files: impl Iterator<Item = &'a Path>) -> String {
    let mut out: Vec<String> = Vec::new();
    for f in files {
        let folder = f.parent().unwrap_or(f).display().to_string();
        if !out.contains(&folder) {
            out.push(folder);
        }
    }
    out.join(", ")
}

fn moved_disk(r: &LocalMoveReport, source: Option<&PathBuf>) -> MovedDisk {
    MovedDisk {
        disk: r.disk,
        source: source.map(|p| p.display().to_string()).unwrap_or_default(),
        destination: r.destination.display().to_string(),
        layers: r
            .layers
            .iter()
            .map(|(p, a)| {
                let action = serde_json::to_value(a)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
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

/// Which disks a storage-only move moves, and to which file: every disk into the folder, or
/// the disks named by their current file (as written, or the same file by another path).
pub fn storage_targets(
    vm: &str,
    current: &[PathBuf],
    spec: &StorageMoveSpec,
) -> Result<StorageTargets, String> {
    if current.is_empty() {
        return Err(format!("{vm} has no disks to move"));
    }
    match (&spec.storage_path, spec.disks.is_empty()) {
        (Some(_), false) => {
            Err("give either a storage path or --disk SRC=DST per disk, not both".into())
        }
        (None, true) => Err(
            "say where the storage goes: a storage path for every disk, or --disk SRC=DST per disk"
                .into(),
        ),
        (Some(folder), true) => current
            .iter()
            .enumerate()
            .map(|(i, p)| match p.file_name() {
                Some(n) => Ok((i, Path::new(folder).join(n))),
                None => Err(format!(
                    "disk {i} of {vm} ({}) has no file name",
                    p.display()
                )),
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
                    return Err(format!(
                        "\"{src}={dst}\" is not a disk mapping: use SRC=DST (the disk's file now, its new file)"
                    ));
                }
                let Some(index) = current.iter().position(|c| same(c, Path::new(src))) else {
                    return Err(format!(
                        "{vm} has no disk {src}; its disks are {}",
                        current
                            .iter()
                            .map(|c| c.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                };
                if out.iter().any(|(i, _)| *i == index) {
                    return Err(format!("disk {src} is named twice"));
                }
                out.push((index, PathBuf::from(dst)));
            }
            out.sort_by_key(|(i, _)| *i);
            Ok(out)
        }
    }
}

/// Disks by index, each with its destination file.
pub type StorageTargets = Vec<(usize, PathBuf)>;

/// Checks each destination against the host's storage roots before anything is written:
/// inside a root, no `..`, no symbolic-link escape, not an existing file, not two disks in
/// one file. Returns the roots and the destinations as they will be written, or every
/// problem, one line each.
pub fn check_storage_targets(
    configured: &[PathBuf],
    targets: &[(usize, PathBuf)],
) -> Result<(StorageRoots, StorageTargets), Vec<String>> {
    if configured.is_empty() {
        return Err(vec![
            "this host has no storage roots configured, so it accepts no VM storage; configure storage_roots".into(),
        ]);
    }
    let roots = StorageRoots::new(configured).map_err(|e| vec![chain(&e)])?;
    let mut problems = Vec::new();
    let mut out: StorageTargets = Vec::new();
    for (i, path) in targets {
        match roots.check_file(path, false) {
            Ok(c) => {
                if let Some((other, _)) = out.iter().find(|(_, p)| *p == c.path) {
                    problems.push(format!(
                        "disk {i}: {} is also the destination of disk {other}",
                        path.display()
                    ));
                }
                out.push((*i, c.path));
            }
            Err(e) => problems.push(format!("disk {i}: {}", chain(&e))),
        }
    }
    if problems.is_empty() {
        Ok((roots, out))
    } else {
        Err(problems)
    }
}

impl ControlHandler for Service {
    fn handle(&self, caller: &Caller, request: Request, replies: &mut Replies<'_>) -> Response {
        let vm_result = |r: Result<String, VmOpError>| match r {
            Ok(message) => Response::Done { message },
            Err(e) => vm_error(&e),
        };
        match request {
            Request::Version => Response::Version(VersionInfo::current()),
            Request::HostShow => Response::Host(Box::new(self.host_info())),
            Request::HostSet { changes } => self.host_set(&changes),
            Request::VmList => Response::Vms {
                vms: self.vms.list(),
            },
            Request::VmCreate { config } => vm_result(
                self.vms
                    .create(&config)
                    .map(|n| format!("created and started {n}")),
            ),
            Request::VmStart { name } => {
                vm_result(self.vms.start(&name).map(|()| format!("started {name}")))
            }
            Request::VmStop { name } => {
                vm_result(self.vms.stop(&name).map(|()| format!("turned {name} off")))
            }
            Request::VmPause { name } => {
                vm_result(self.vms.pause(&name).map(|()| format!("paused {name}")))
            }
            Request::VmResume { name } => {
                vm_result(self.vms.resume(&name).map(|()| format!("resumed {name}")))
            }
            Request::VmShow { name } => match self.vms.show(&name) {
                Ok(d) => Response::Vm(Box::new(d)),
                Err(e) => vm_error(&e),
            },
            Request::VmCheck { name } => match self.vms.check(&name) {
                Ok(r) => Response::Checked(r),
                Err(e) => vm_error(&e),
            },
            Request::VmConsole { name, offset } => match self.vms.console(&name, offset) {
                Ok((text, next_offset)) => Response::Console { text, next_offset },
                Err(e) => vm_error(&e),
            },
            Request::Move(spec) => self.start_move(caller, &spec, MoveMode::Move, replies),
            Request::Compare(spec) => self.start_move(caller, &spec, MoveMode::Compare, replies),
            Request::MoveStorage(spec) => self.storage_move(caller, &spec, replies),
            Request::JobsList => Response::Jobs {
                jobs: self.jobs.list(),
            },
            Request::JobShow { id } => match self.jobs.get(&id) {
                Some(j) => Response::Job(Box::new(j)),
                None => Response::error(
                    ErrorCode::NotFound,
                    format!("no job \"{id}\" on this host (vmgate jobs list)"),
                ),
            },
            Request::JobCancel { id } => {
                match self
                    .jobs
                    .cancel(&id, &format!("cancelled by {}", caller.describe()))
                {
                    Ok(j) => Response::Job(Box::new(j)),
                    Err(e) if e.starts_with("no job") => Response::error(ErrorCode::NotFound, e),
                    Err(e) => Response::error(ErrorCode::Refused, e),
                }
            }
        }
    }
}

fn vm_error(e: &VmOpError) -> Response {
    match e {
        VmOpError::NotFound(m) => Response::error(ErrorCode::NotFound, m.clone()),
        VmOpError::Refused(m) => Response::error(ErrorCode::Refused, m.clone()),
        VmOpError::Failed(m) => Response::error(ErrorCode::Failed, m.clone()),
    }
}

fn failure_response(f: &MoveFailure) -> Response {
    let code = match f.kind {
        FailureKind::Denied => ErrorCode::Denied,
        FailureKind::Unreachable => ErrorCode::Unreachable,
        FailureKind::Refused => ErrorCode::Refused,
        FailureKind::Cancelled => ErrorCode::Cancelled,
        FailureKind::NotFound => ErrorCode::NotFound,
        FailureKind::Failed => ErrorCode::Failed,
    };
    Response::Error(ErrorReply {
        code,
        message: f.message.clone(),
        win_code: f.win_code.clone(),
    })
}

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

/// A move that failed for a reason without its own Windows code (E_FAIL, as Hyper-V's
/// generic migration failure), with the engine's cause.
pub fn generic_failure(job: String, vm: String, cause: String) -> Event {
    Event::MigrationFailed {
        job,
        vm,
        code: "0x80004005".into(),
        code_name: "E_FAIL".into(),
        cause,
        fix: None,
    }
}

/// The symbolic name of a Windows code in hex (`SEC_E_NO_CREDENTIALS`).
fn win_name(hex: &str) -> String {
    vmgate_auth::winerr::WinCode::ALL
        .iter()
        .find(|c| c.hex().eq_ignore_ascii_case(hex))
        .map_or_else(|| hex.to_owned(), |c| c.name().to_owned())
}

/// A diagnosis' text split into its cause and its fix (`  fix:   ...` lines).
fn split_fix(message: &str) -> (String, Option<String>) {
    match message.split_once("\n  fix:") {
        Some((cause, fix)) => (cause.to_owned(), Some(fix.trim().to_owned())),
        None => (message.to_owned(), None),
    }
}

fn whole_ms(v: f64) -> u64 {
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

/// The storage part of a move: a folder for every disk, or `SRC=DST` per disk.
pub fn storage_options(spec: &MoveSpec) -> Result<Option<StorageOptions>, String> {
    let target = match (&spec.storage_path, spec.disks.is_empty()) {
        (Some(_), false) => {
            return Err("give either a storage path or --disk SRC=DST, not both".into());
        }
        (Some(p), true) => StorageTarget::Folder(p.into()),
        (None, false) => StorageTarget::PerDisk(
            spec.disks
                .iter()
                .map(|d| match d.split_once('=') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.into(), b.into())),
                    _ => Err(format!(
                        "\"{d}\" is not a disk mapping: use SRC=DST (the disk's file here, its file at the destination)"
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        (None, true) if spec.keep_source => {
            return Err("keep-source applies to moves with their storage".into());
        }
        (None, true) => return Ok(None),
    };
    Ok(Some(StorageOptions {
        target,
        keep_source: spec.keep_source,
        users: None,
    }))
}

/// `FROM=TO` switch renames.
pub fn parse_switch_map(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|i| match i.split_once('=') {
            Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => {
                Ok((a.trim().to_owned(), b.trim().to_owned()))
            }
            _ => Err(format!(
                "\"{i}\" is not a switch mapping: use FROM=TO (the source's switch name, then this destination's)"
            )),
        })
        .collect()
}

/// Applies `host set` changes to a copy of the settings (validated by the caller).
pub fn apply_changes(m: &mut MigrationSettings, c: &HostChanges) -> Result<(), String> {
    if let Some(v) = c.enabled {
        m.enabled = v;
    }
    if let Some(a) = &c.auth {
        m.auth = match a.to_ascii_lowercase().as_str() {
            "kerberos" => AuthType::Kerberos,
            "credssp" => AuthType::Credssp,
            "host" => AuthType::Host,
            other => {
                return Err(format!(
                    "\"{other}\" is not an authentication type: kerberos, credssp or host"
                ));
            }
        };
    }
    if let Some(v) = c.max_live_moves {
        m.max_live_moves = v;
    }
    if let Some(v) = c.max_storage_moves {
        m.max_storage_moves = v;
    }
    if let Some(p) = &c.performance {
        m.performance = match p.to_ascii_lowercase().as_str() {
            "tcpip" => Performance::Tcpip,
            "compression" => Performance::Compression,
            "multichannel" => Performance::Multichannel,
            other => {
                return Err(format!(
                    "\"{other}\" is not a performance option: tcpip, compression or multichannel"
                ));
            }
        };
    }
    if let Some(b) = &c.bandwidth_limit {
        m.bandwidth_limit = if b.eq_ignore_ascii_case("off") || b.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(b.parse::<Bandwidth>().map_err(|e| e.to_string())?)
        };
    }
    if let Some(v) = c.downtime_target_ms {
        m.downtime_target_ms = v;
    }
    if let Some(v) = c.any_network {
        m.any_network = v;
    }
    if let Some(list) = &c.networks {
        m.networks = list
            .iter()
            .map(|n| MigrationNetwork::parse(n))
            .collect::<Result<_, _>>()?;
    }
    Ok(())
}

/// A destination's migration addresses in the order it offers them: its listen addresses on
/// its migration networks by priority (then the others), or all of them in order with "any
/// network".
pub fn offered_addresses(config: &Config) -> Vec<SocketAddr> {
    let m = &config.migration;
    if m.any_network || m.networks.is_empty() {
        return config.listen.clone();
    }
    let mut ranked: Vec<(u32, usize, SocketAddr)> = config
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let prio = m
                .networks_by_priority()
                .iter()
                .find(|n| n.subnet.contains(a.ip()))
                .map_or(u32::MAX, |n| n.priority);
            (prio, i, *a)
        })
        .collect();
    ranked.sort_by_key(|(p, i, _)| (*p, *i));
    ranked.into_iter().map(|(_, _, a)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_set_changes_are_parsed_and_bad_ones_named() {
        let mut m = MigrationSettings::default();
        apply_changes(
            &mut m,
            &HostChanges {
                enabled: Some(true),
                auth: Some("CredSSP".into()),
                max_live_moves: Some(3),
                performance: Some("multichannel".into()),
                bandwidth_limit: Some("100MiB/s".into()),
                networks: Some(vec!["10.0.20.0/24:1".into(), "10.0.10.0/24".into()]),
                ..HostChanges::default()
            },
        )
        .unwrap();
        assert!(m.enabled);
        assert_eq!(m.auth, AuthType::Credssp);
        assert_eq!(m.max_live_moves, 3);
        assert_eq!(m.performance, Performance::Multichannel);
        assert_eq!(m.bandwidth_limit.unwrap().bytes_per_second(), 100 << 20);
        assert_eq!(m.networks.len(), 2);
        assert_eq!(m.networks[0].priority, 1);
        assert_eq!(m.networks[1].priority, 0);
        apply_changes(
            &mut m,
            &HostChanges {
                bandwidth_limit: Some("off".into()),
                ..HostChanges::default()
            },
        )
        .unwrap();
        assert_eq!(m.bandwidth_limit, None);
        let bad =
            |c: HostChanges| apply_changes(&mut MigrationSettings::default(), &c).unwrap_err();
        assert!(
            bad(HostChanges {
                auth: Some("ntlm".into()),
                ..HostChanges::default()
            })
            .contains("kerberos, credssp or host")
        );
        assert!(
            bad(HostChanges {
                networks: Some(vec!["10.0.0.0/33".into()]),
                ..HostChanges::default()
            })
            .contains("is not a network")
        );
        assert!(
            bad(HostChanges {
                networks: Some(vec!["10.0.0.0/8:high".into()]),
                ..HostChanges::default()
            })
            .contains("priority must be a number")
        );
    }

    #[test]
    fn switch_maps_need_both_names() {
        assert_eq!(
            parse_switch_map(&["Lab = Lab2".into()]).unwrap(),
            [("Lab".to_owned(), "Lab2".to_owned())]
        );
        assert!(
            parse_switch_map(&["Lab".into()])
                .unwrap_err()
                .contains("FROM=TO")
        );
        assert!(parse_switch_map(&["=Lab2".into()]).is_err());
    }

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
        let bad = |spec: StorageMoveSpec| storage_targets("web", &current, &spec).unwrap_err();
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
        let problems = check_storage_targets(
            &roots,
            &[
                (0, dir.path().join("elsewhere/web.raw")),
                (1, root.join("taken.raw")),
                (2, root.join("a.raw")),
                (3, root.join("a.raw")),
            ],
        )
        .unwrap_err();
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
                .contains("no storage roots")
        );
    }

    #[test]
    fn addresses_are_offered_by_network_priority() {
        let text = r#"host_name = "hv2"
fqdn = "hv2.lab.example.test"
realm = "LAB.EXAMPLE.TEST"
listen = ["127.0.0.12:6600", "10.0.10.12:6600", "10.0.20.12:6600"]
[directory]
url = "ldap://dc1"
[migration]
enabled = true
networks = [{ subnet = "10.0.10.0/24", priority = 1 }, { subnet = "10.0.20.0/24", priority = 0 }]
"#;
        let c = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let order: Vec<String> = offered_addresses(&c)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            order,
            ["10.0.20.12:6600", "10.0.10.12:6600", "127.0.0.12:6600"]
        );
    }
}
