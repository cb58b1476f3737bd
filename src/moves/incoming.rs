//! The destination's side of a live move: the host's checks of an arriving VM (migrations
//! enabled, the live-move limit, the name, virtual switches; the engine adds memory and
//! processor), each incoming move as a job with its events, and the arrival (the VM is listed,
//! its MACs announced on the mapped switches).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use vmgate_control::api::jobs::{Direction, JobKind, JobState};
use vmgate_migrate::engine::{
    Destination, DestinationOptions, Received, ReceivedEvent, ReceivedVm, incompatibility,
};
use vmgate_migrate::protocol::Incompatibility as EngineIncompatibility;
use vmgate_migrate::vm::VmConfig;

use crate::adapter::IncomingLink;
use crate::events::{Event, EventLog, MoveKind, MovePhase};
use crate::inventory::{Instance, Inventory};
use crate::jobs::{Job, Jobs};
use crate::settings::HostSettings;

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

/// The destination side of this host. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Incoming {
    settings: HostSettings,
    inventory: Inventory,
    jobs: Jobs,
    events: EventLog,
    running: Arc<Mutex<HashMap<String, Job>>>,
    /// Who is behind each link the engine serves now (its `peer` text, as the engine reports
    /// it back in [`ReceivedEvent::Started`]): the principal and the address.
    peers: Arc<Mutex<HashMap<String, (String, String)>>>,
}

impl Incoming {
    /// The destination side of a host.
    pub fn new(
        settings: HostSettings,
        inventory: Inventory,
        jobs: Jobs,
        events: EventLog,
    ) -> Incoming {
        Incoming {
            settings,
            inventory,
            jobs,
            events,
            running: Arc::default(),
            peers: Arc::default(),
        }
    }

    /// The engine's destination with this host's checks and lifecycle events.
    pub fn destination(&self) -> Destination {
        let me = self.clone();
        let check = self.clone();
        let inventory = self.inventory.clone();
        let config = self.settings.file();
        Destination::new(DestinationOptions {
            host_check: Some(Box::new(move |vm: &VmConfig| check.arrival_check(vm))),
            on_event: Box::new(move |e| me.received_event(e)),
            vm_options: Box::new(move |c: &VmConfig| inventory.options_for(&c.name)),
            hidden_cpu_features: config.testing.hidden_cpu_features.clone(),
            storage_roots: config.storage_roots.clone(),
            ..DestinationOptions::default()
        })
    }

    /// Serves one authorized migration channel: a move's control link (then the VM arrives
    /// here, or nothing is left), or one of its parallel channels. Blocks until the engine is
    /// done with the link.
    pub fn receive(&self, destination: &Destination, link: IncomingLink) {
        let who = link.link.peer.clone();
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                who.clone(),
                (
                    link.peer.principal().to_string(),
                    link.peer.addr().to_string(),
                ),
            );
        let received = destination.handle(link.link);
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&who);
        if let Received::Vm(v) = received {
            self.arrived(*v, &who);
        }
    }

    fn arrival_check(&self, vm: &VmConfig) -> Vec<EngineIncompatibility<'static>> {
        let m = self.settings.migration();
        let host = &self.settings.file().host_name;
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
        if self.inventory.contains(&vm.name) {
            report.push(EngineIncompatibility {
                id: incompatibility::CONFIG,
                message: format!("a VM named \"{}\" already exists on {host}", vm.name).into(),
            });
        }
        report.extend(crate::compat::switch_check(
            &self.settings.file().switches,
            host,
            vm,
        ));
        report
    }

    /// Each incoming move is a job (who and from where, recorded at its start), with its
    /// events.
    fn received_event(&self, e: ReceivedEvent) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match e {
            ReceivedEvent::Started { session, peer } => {
                let (user, source) = self
                    .peers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&peer)
                    .cloned()
                    .unwrap_or_default();
                let job = self
                    .jobs
                    .submit(JobKind::Live, Direction::Incoming, "", &source, &user);
                tracing::info!(job = job.id(), peer = %peer, "an incoming move started");
                running.insert(session.to_string(), job);
            }
            ReceivedEvent::Checked {
                session,
                vm,
                refused,
            } => {
                let key = session.to_string();
                let (job_id, user, source) = match running.get(&key) {
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
                        destination: self.settings.file().host_name.clone(),
                        user,
                    });
                } else {
                    let cause = refused.join("; ");
                    self.events.emit(generic_failure(job_id, vm, cause.clone()));
                    if let Some(j) = running.remove(&key) {
                        j.finish(JobState::Failed, format!("refused: {cause}"));
                    }
                }
            }
            ReceivedEvent::Resumed { session, vm } => {
                let key = session.to_string();
                let job = running.remove(&key);
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
                let job = running.remove(&key);
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
    fn arrived(&self, v: ReceivedVm, who: &str) {
        let config = v.vm.config().clone();
        let name = config.name.clone();
        if let Err(e) = self.inventory.add(
            Instance::Microvm(Arc::new(v.vm)),
            format!("moved here by {who}"),
        ) {
            tracing::error!(vm = %name, error = %vmgate_control::error::chain(&e), "a VM arrived but cannot be listed");
            return;
        }
        for (i, nic) in config.nics.iter().enumerate() {
            let Some(interface) =
                crate::compat::interface_for(&self.settings.file().switches, &nic.switch)
            else {
                continue;
            };
            let Ok(mac) = vmgate_migrate::vm::config::parse_mac(&nic.mac) else {
                continue;
            };
            if let Err(e) = crate::arp::announce(interface, mac) {
                tracing::warn!(
                    vm = %name,
                    nic = i,
                    mac = %nic.mac,
                    interface,
                    error = %vmgate_control::error::chain(&e),
                    "the gratuitous ARP after the move failed"
                );
            }
        }
    }
}
