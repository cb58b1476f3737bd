//! The VMs a host runs, and moves started from it: creating, starting, stopping and checking
//! VMs, and moving one live to another host as the user who asked — with the user's own
//! ticket handed over on the local socket ("logged on to the source": no delegation needed),
//! or, for a remote caller, with its forwarded TGT, constrained delegation or protocol
//! transition as the host's auth type allows, or as the host itself (auth type `host`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmgate_auth::channel::{
    self, ActingFor, ActingMethod, ChannelError, ClientSettings, Purpose, Target,
};
use vmgate_auth::delegation::AuthType;
use vmgate_auth::krb::{AuthFacts, Credential, HostCredentials, UserCredential};
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::TlsContext;
use vmgate_migrate::engine::{
    CancelToken, Dialer, Link, MoveError, MoveOptions, MoveStats, Progress, compare_vm, send_vm,
};
use vmgate_migrate::storage::local::release_files;
use vmgate_migrate::storage::paths::StorageRoots;
use vmgate_migrate::storage::users::{DiskUsers, NeededFiles};
use vmgate_migrate::vm::check::check_vm;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

use super::{ChannelDialer, stream_link};
use crate::daemon::local::{
    DiskStats, MAX_CONSOLE_CHUNK, NicInfo, VmCheckReport, VmDetail, VmSummary,
};

/// A VM this host knows: its definition, and the running VM unless it is off.
#[derive(Debug)]
pub struct HostedVm {
    /// The definition (what `vm start` boots).
    pub config: VmConfig,
    /// The running VM (shared with a move in progress); `None`: turned off.
    pub vm: Option<Arc<Vm>>,
    /// How it came here, for `vm_list`.
    pub origin: String,
    /// A move of it is in progress (it cannot be stopped or moved again meanwhile).
    pub moving: bool,
}

/// The VMs of this host, by unique name, where their console logs go, and the storage roots
/// their disks must be in.
#[derive(Debug, Clone)]
pub struct Vms {
    list: Arc<Mutex<Vec<HostedVm>>>,
    console_dir: PathBuf,
    storage_roots: Vec<PathBuf>,
}

/// Why a VM operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOpError {
    /// No such VM.
    NotFound(String),
    /// The request cannot be carried out (with why).
    Refused(String),
    /// It was tried and failed.
    Failed(String),
}

impl std::fmt::Display for VmOpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOpError::NotFound(m) | VmOpError::Refused(m) | VmOpError::Failed(m) => f.write_str(m),
        }
    }
}

fn not_found(name: &str) -> VmOpError {
    VmOpError::NotFound(format!(
        "no VM named \"{name}\" on this host (vmgate vm list)"
    ))
}

impl Vms {
    /// No VMs yet; console logs go to `console_dir`; disks are opened beneath
    /// `storage_roots`.
    pub fn new(console_dir: PathBuf, storage_roots: Vec<PathBuf>) -> Vms {
        Vms {
            list: Arc::default(),
            console_dir,
            storage_roots,
        }
    }

    /// The storage roots, open (a VM's disks are opened beneath them).
    fn roots(&self) -> Result<StorageRoots, VmOpError> {
        StorageRoots::new(&self.storage_roots).map_err(|e| {
            VmOpError::Refused(format!(
                "this host cannot open VM disks: {}",
                crate::daemon::spn_check::chain(&e)
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HostedVm>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The console log of the VM named `name`.
    pub fn console_path(&self, name: &str) -> PathBuf {
        self.console_dir.join(format!("{name}.console"))
    }

    /// The options of a VM built here (its console log; the folder is made when missing).
    pub fn options_for(&self, name: &str) -> VmOptions {
        // A failure shows when the VM opens its log, with the path.
        let _ = std::fs::create_dir_all(&self.console_dir);
        VmOptions {
            console_log: Some(self.console_path(name)),
            ..VmOptions::default()
        }
    }

    /// Adds a running VM; its name must be new here.
    pub fn add(&self, vm: Vm, origin: String) -> Result<(), String> {
        let mut list = self.lock();
        let name = vm.config().name.clone();
        if list.iter().any(|h| h.config.name == name) {
            return Err(format!("a VM named \"{name}\" already exists on this host"));
        }
        list.push(HostedVm {
            config: vm.config().clone(),
            vm: Some(Arc::new(vm)),
            origin,
            moving: false,
        });
        Ok(())
    }

    /// The running VM named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Vm>> {
        self.lock()
            .iter()
            .find(|h| h.config.name == name)
            .and_then(|h| h.vm.clone())
    }

    /// Whether a VM of that name is defined here (running or off).
    pub fn contains(&self, name: &str) -> bool {
        self.lock().iter().any(|h| h.config.name == name)
    }

    /// Marks the VM as moving (refused when it is off, already moving, or unknown) and
    /// returns it.
    pub fn begin_move(&self, name: &str) -> Result<Arc<Vm>, VmOpError> {
        self.begin(name, "a live move")
    }

    /// Marks the VM as moving for a storage-only move (refused as [`Vms::begin_move`]: a
    /// VM whose storage moves is neither stopped nor moved live meanwhile) and returns it.
    pub fn begin_storage_move(&self, name: &str) -> Result<Arc<Vm>, VmOpError> {
        self.begin(name, "a storage move")
    }

    fn begin(&self, name: &str, what: &str) -> Result<Arc<Vm>, VmOpError> {
        let mut list = self.lock();
        let h = find_mut(&mut list, name)?;
        if h.moving {
            return Err(VmOpError::Refused(format!(
                "{name} is already being moved (vmgate jobs list)"
            )));
        }
        let vm = h.vm.clone().ok_or_else(|| {
            VmOpError::Refused(format!(
                "{name} is off: {what} needs a running VM (vmgate vm start {name})"
            ))
        })?;
        h.moving = true;
        Ok(vm)
    }

    /// Ends a storage-only move, however it ended: the definition takes the files the VM's
    /// disks are on now (so `vm show` and a later cold boot use them), and the VM may be
    /// stopped or moved again.
    pub fn end_storage_move(&self, name: &str, vm: &Vm) {
        let now = vm.disk_specs();
        let mut list = self.lock();
        if let Some(h) = list.iter_mut().find(|h| h.config.name == name) {
            for (spec, current) in h.config.disks.iter_mut().zip(now) {
                *spec = current;
            }
            h.moving = false;
        }
    }

    /// Ends a move: on success the VM no longer belongs to this host.
    pub fn end_move(&self, name: &str, moved_away: bool) {
        let mut list = self.lock();
        if moved_away {
            list.retain(|h| h.config.name != name);
        } else if let Some(h) = list.iter_mut().find(|h| h.config.name == name) {
            h.moving = false;
        }
    }

    /// What `vm_list` shows.
    pub fn list(&self) -> Vec<VmSummary> {
        self.lock().iter().map(summary).collect()
    }

    /// What `vm_show` shows.
    pub fn show(&self, name: &str) -> Result<VmDetail, VmOpError> {
        let list = self.lock();
        let h = find(&list, name)?;
        Ok(VmDetail {
            summary: summary(h),
            cpu_compat: h.config.cpu_compat,
            cpu_features: h
                .vm
                .as_ref()
                .map(|vm| vmgate_migrate::vm::cpuid::used_features(vm.guest_cpuid()))
                .unwrap_or_default(),
            nics: h
                .config
                .nics
                .iter()
                .map(|n| NicInfo {
                    mac: n.mac.clone(),
                    switch: n.switch.clone(),
                })
                .collect(),
            disks: h
                .config
                .disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect(),
            disk_stats: h.vm.as_ref().map(|vm| disk_stats(vm)).unwrap_or_default(),
            console: Some(self.console_path(name).display().to_string()),
        })
    }

    /// Creates a VM from its configuration (TOML) and starts it.
    pub fn create(&self, config_toml: &str) -> Result<String, VmOpError> {
        let config = VmConfig::from_toml(config_toml, None)
            .map_err(|e| VmOpError::Refused(format!("the VM configuration is invalid: {e}")))?;
        let name = config.name.clone();
        if self.contains(&name) {
            return Err(VmOpError::Refused(format!(
                "a VM named \"{name}\" already exists on this host"
            )));
        }
        // Every disk and backing file inside the storage roots (checked here for a clear
        // refusal; the VM then opens them beneath the roots).
        let roots = self.roots()?;
        for (i, spec) in config.disks.iter().enumerate() {
            if let Err(e) = vmgate_migrate::disk::chain_in(spec, &roots) {
                return Err(VmOpError::Refused(format!(
                    "disk {i} of {name} ({}) cannot be used: {}",
                    spec.path.display(),
                    crate::daemon::spn_check::chain(&e)
                )));
            }
        }
        let vm = self.boot(config)?;
        self.add(vm, "created here".into())
            .map_err(VmOpError::Refused)?;
        Ok(name)
    }

    fn boot(&self, config: VmConfig) -> Result<Vm, VmOpError> {
        std::fs::create_dir_all(&self.console_dir).map_err(|e| {
            VmOpError::Failed(format!("cannot create {}: {e}", self.console_dir.display()))
        })?;
        let mut options = self.options_for(&config.name);
        options.storage_roots = Some(self.roots()?);
        let vm = Vm::create(config, &options)
            .map_err(|e| VmOpError::Failed(crate::daemon::spn_check::chain(&e)))?;
        vm.resume().map_err(|e| VmOpError::Failed(e.to_string()))?;
        Ok(vm)
    }

    /// Starts a VM that is off (a cold boot of its definition).
    pub fn start(&self, name: &str) -> Result<(), VmOpError> {
        let config = {
            let list = self.lock();
            let h = find(&list, name)?;
            if h.vm.is_some() {
                return Err(VmOpError::Refused(format!("{name} is already running")));
            }
            h.config.clone()
        };
        let vm = self.boot(config)?;
        let mut list = self.lock();
        match list.iter_mut().find(|h| h.config.name == name) {
            Some(h) if h.vm.is_none() => {
                h.vm = Some(Arc::new(vm));
                Ok(())
            }
            _ => Err(VmOpError::Refused(format!(
                "{name} changed while it was starting; try again"
            ))),
        }
    }

    /// Pauses a running VM (its vCPUs stop; memory, devices and disks stay as they are).
    pub fn pause(&self, name: &str) -> Result<(), VmOpError> {
        let vm = self.idle_vm(name)?;
        if !vm.running() {
            return Err(VmOpError::Refused(format!("{name} is already paused")));
        }
        vm.pause()
            .map(|_| ())
            .map_err(|e| VmOpError::Failed(format!("pausing {name} failed: {e}")))
    }

    /// Resumes a paused VM. A VM that a move left paused after handing its images over
    /// (shared storage) takes them back first; while another host still has one open for
    /// writing it must not run here, and the refusal names the holder.
    pub fn resume(&self, name: &str) -> Result<(), VmOpError> {
        let vm = self.idle_vm(name)?;
        if vm.running() {
            return Err(VmOpError::Refused(format!("{name} is already running")));
        }
        if vm.disks_released() {
            vm.reacquire_disks(Duration::from_secs(2)).map_err(|e| {
                VmOpError::Refused(format!(
                    "{name} stays paused: its disks were handed over to another host and cannot be taken back ({}); stop the VM where it runs now (vmgate vm list on the destination), then resume it here",
                    crate::daemon::spn_check::chain(&e)
                ))
            })?;
        }
        vm.resume()
            .map_err(|e| VmOpError::Failed(format!("resuming {name} failed: {e}")))
    }

    /// The running VM `name`, unless a move has it.
    fn idle_vm(&self, name: &str) -> Result<Arc<Vm>, VmOpError> {
        let list = self.lock();
        let h = find(&list, name)?;
        if h.moving {
            return Err(VmOpError::Refused(format!(
                "{name} is being moved: cancel the move first (vmgate jobs cancel)"
            )));
        }
        h.vm.clone()
            .ok_or_else(|| VmOpError::Refused(format!("{name} is off: vmgate vm start {name}")))
    }

    /// Turns a VM off; its definition stays.
    pub fn stop(&self, name: &str) -> Result<(), VmOpError> {
        let vm = {
            let mut list = self.lock();
            let h = find_mut(&mut list, name)?;
            if h.moving {
                return Err(VmOpError::Refused(format!(
                    "{name} is being moved: cancel the move first (vmgate jobs cancel)"
                )));
            }
            h.vm.take()
                .ok_or_else(|| VmOpError::Refused(format!("{name} is already off")))?
        };
        // The VM's threads end when the last reference goes.
        if let Ok(vm) = Arc::try_unwrap(vm) {
            vm.shutdown();
        }
        Ok(())
    }

    /// Runs the VM's self-checks (pausing it for the moment they take).
    pub fn check(&self, name: &str) -> Result<VmCheckReport, VmOpError> {
        let vm = {
            let list = self.lock();
            let h = find(&list, name)?;
            h.vm.clone()
                .ok_or_else(|| VmOpError::Refused(format!("{name} is off")))?
        };
        let was_running = vm.running();
        if was_running {
            vm.pause().map_err(|e| VmOpError::Failed(e.to_string()))?;
        }
        let result = check_vm(&vm);
        if was_running {
            vm.resume().map_err(|e| VmOpError::Failed(e.to_string()))?;
        }
        let reports = result.map_err(|e| VmOpError::Failed(e.to_string()))?;
        Ok(VmCheckReport {
            vm: name.to_owned(),
            passed: !reports.is_empty() && reports.iter().all(|r| r.ok),
            details: if reports.is_empty() {
                vec!["the VM runs no program with a self-check".into()]
            } else {
                reports.iter().map(ToString::to_string).collect()
            },
        })
    }

    /// The console output of `name` from `offset`.
    pub fn console(&self, name: &str, offset: u64) -> Result<(String, u64), VmOpError> {
        use std::io::{Read, Seek, SeekFrom};
        if !self.contains(name) {
            return Err(not_found(name));
        }
        let path = self.console_path(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => {
                return Err(VmOpError::Failed(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = offset.min(len);
        f.seek(SeekFrom::Start(from))
            .map_err(|e| VmOpError::Failed(e.to_string()))?;
        let mut buf = Vec::new();
        let max = u64::try_from(MAX_CONSOLE_CHUNK).unwrap_or(u64::MAX);
        f.take(max)
            .read_to_end(&mut buf)
            .map_err(|e| VmOpError::Failed(e.to_string()))?;
        let next = from + u64::try_from(buf.len()).unwrap_or(0);
        Ok((String::from_utf8_lossy(&buf).into_owned(), next))
    }
}

/// The inventory's disks, for moves that delete old files: every file in the chain of every
/// disk of every VM here, running (its open disks) or off (its definition).
impl DiskUsers for Vms {
    fn needed_files(&self) -> NeededFiles {
        let vms: Vec<(VmConfig, Option<Arc<Vm>>)> = self
            .lock()
            .iter()
            .map(|h| (h.config.clone(), h.vm.clone()))
            .collect();
        let mut out = NeededFiles::new();
        for (config, vm) in vms {
            match vm {
                Some(vm) => {
                    for i in 0..vm.disk_specs().len() {
                        if let Some(d) = vm.disk(i) {
                            out.add_layers(&config.name, d.layers());
                        }
                    }
                }
                None => {
                    for spec in &config.disks {
                        out.add_chain(&config.name, spec);
                    }
                }
            }
        }
        out
    }
}

/// The VM named `name`, or the not-found error.
fn find<'a>(list: &'a [HostedVm], name: &str) -> Result<&'a HostedVm, VmOpError> {
    list.iter()
        .find(|h| h.config.name == name)
        .ok_or_else(|| not_found(name))
}

/// The same, to change it.
fn find_mut<'a>(list: &'a mut [HostedVm], name: &str) -> Result<&'a mut HostedVm, VmOpError> {
    list.iter_mut()
        .find(|h| h.config.name == name)
        .ok_or_else(|| not_found(name))
}

fn summary(h: &HostedVm) -> VmSummary {
    let c = &h.config;
    VmSummary {
        name: c.name.clone(),
        state: match &h.vm {
            None => "off",
            Some(_) if h.moving => "moving",
            Some(vm) if vm.running() => "running",
            Some(_) => "paused",
        }
        .into(),
        memory_mib: c.memory_mib,
        vcpus: c.vcpus,
        origin: h.origin.clone(),
    }
}

/// How this host authenticates to the destination for a move.
#[derive(Debug)]
pub enum MoveCredential<'a> {
    /// The caller's own forwardable TGT, handed over on the local socket ("logged on to the
    /// source"): no delegation needed, whatever the auth type.
    OwnTicket {
        /// The ccache file's bytes.
        ccache: &'a [u8],
        /// Where the private copy goes (mode 0600, removed after the move).
        dir: PathBuf,
    },
    /// Acting for a remote caller: its forwarded TGT, or constrained delegation (S4U2Proxy),
    /// or protocol transition, as the host's auth type allows.
    ActFor {
        /// What the caller's channel proved.
        acting: &'a ActingFor,
        /// This host's keytab credentials.
        host: HostCredentials,
        /// `kerberos` or `credssp`.
        auth: AuthType,
    },
    /// This host's own identity (auth type `host`: the destination trusts the source host).
    Host {
        /// This host's keytab credentials.
        host: HostCredentials,
    },
}

/// A move (or a compare) started on this host.
#[derive(Debug)]
pub struct MoveRequest<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The destination's migration addresses, by its priority: tried in order, the next one
    /// when a connection fails.
    pub to: Vec<SocketAddr>,
    /// The destination's migration SPN.
    pub spn: Spn,
    /// How to authenticate.
    pub credential: MoveCredential<'a>,
    /// The realm.
    pub realm: String,
    /// This host's short name (for diagnoses).
    pub local_host: String,
    /// This host's migration addresses: a move connects from the one of the destination
    /// address's family (so that the destination's network filter sees it); none: the
    /// system's choice.
    pub sources: Vec<IpAddr>,
    /// Channels, compression, cap, downtime target, switch map.
    pub options: MoveOptions,
}

/// Why a move could not be carried out.
#[derive(Debug, Clone)]
pub struct MoveFailure {
    /// The kind, for the control protocol's error code.
    pub kind: FailureKind,
    /// For people: what happened and what to do.
    pub message: String,
    /// The Windows code of an authentication failure.
    pub win_code: Option<String>,
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Kerberos or authorization refused.
    Denied,
    /// The destination could not be reached on any address.
    Unreachable,
    /// The destination refused (incompatible, disabled, version).
    Refused,
    /// Cancelled.
    Cancelled,
    /// No such VM here.
    NotFound,
    /// Anything else.
    Failed,
}

impl MoveFailure {
    fn new(kind: FailureKind, message: impl Into<String>) -> MoveFailure {
        MoveFailure {
            kind,
            message: message.into(),
            win_code: None,
        }
    }

    fn channel(e: &ChannelError) -> MoveFailure {
        let kind = match e {
            ChannelError::Auth { .. }
            | ChannelError::Refused { .. }
            | ChannelError::Denied { .. } => FailureKind::Denied,
            ChannelError::Connect { .. }
            | ChannelError::TimedOut { .. }
            | ChannelError::Filtered { .. } => FailureKind::Unreachable,
            _ => FailureKind::Failed,
        };
        match e.diagnosis() {
            Some(d) => MoveFailure {
                kind,
                message: d.to_string(),
                win_code: Some(d.code.hex()),
            },
            None => MoveFailure::new(kind, e.to_string()),
        }
    }

    fn engine(e: &MoveError) -> MoveFailure {
        let kind = match e {
            MoveError::VersionRefused { .. } | MoveError::Incompatible { .. } => {
                FailureKind::Refused
            }
            MoveError::Cancelled { .. } => FailureKind::Cancelled,
            _ => FailureKind::Failed,
        };
        MoveFailure::new(kind, e.to_string())
    }
}

/// How a move ended, with the user it ran as.
#[derive(Debug)]
pub struct MoveOutcome {
    /// The principal of the user (or host) it ran as.
    pub user: String,
    /// How: `own-ticket`, `forwarded-tgt`, `constrained-delegation`, `protocol-transition`,
    /// `host`.
    pub method: String,
    /// The address that was used.
    pub address: String,
    /// The result.
    pub result: Result<MoveStats, MoveFailure>,
}

/// Opens the links of one move to one address with one way of authenticating.
#[allow(
    clippy::large_enum_variant,
    reason = "one per move attempt, on the stack briefly"
)]
enum MoveDialer<'a> {
    Own(ChannelDialer),
    Acting {
        settings: ClientSettings,
        host: HostCredentials,
        acting: &'a ActingFor,
        auth: AuthType,
        target: Target,
    },
}

impl MoveDialer<'_> {
    /// One link; the method it authenticated with.
    fn connect(&self) -> Result<(Link, ActingMethod), ChannelError> {
        match self {
            MoveDialer::Own(d) => d.connect().map(|l| (l, ActingMethod::ForwardedTgt)),
            MoveDialer::Acting {
                settings,
                host,
                acting,
                auth,
                target,
            } => {
                let (ch, method) = channel::act_for_user(
                    settings,
                    host,
                    acting,
                    *auth,
                    target,
                    Purpose::Migration,
                    None,
                )?;
                let peer = format!("{} ({})", target.addr, ch.server_spn);
                let link = stream_link(ch.stream, peer).map_err(|source| ChannelError::Io {
                    peer: target.addr.to_string(),
                    stage: "hand-over to the migration engine",
                    source,
                })?;
                Ok((link, method))
            }
        }
    }
}

impl Dialer for MoveDialer<'_> {
    fn dial(&mut self) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.connect()?.0)
    }
}

fn method_name(m: ActingMethod) -> &'static str {
    match m {
        ActingMethod::ForwardedTgt => "forwarded-tgt",
        ActingMethod::ConstrainedDelegation => "constrained-delegation",
        ActingMethod::ProtocolTransition => "protocol-transition",
    }
}

/// What to do once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveMode {
    /// Move the VM.
    Move,
    /// Only ask the destination for its compatibility report.
    Compare,
}

/// What a compare found.
pub type CompareReport = Vec<(u32, String)>;

/// Moves (or compares) a VM of this host. On a successful move the VM no longer runs here;
/// on any failure it runs here as before.
pub fn move_vm(
    vms: &Vms,
    req: &MoveRequest<'_>,
    mode: MoveMode,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> (MoveOutcome, Option<CompareReport>) {
    let mut outcome = MoveOutcome {
        user: String::new(),
        method: String::new(),
        address: String::new(),
        result: Err(MoveFailure::new(
            FailureKind::Failed,
            "the move did not start",
        )),
    };
    let vm = match mode {
        MoveMode::Move => vms.begin_move(req.vm),
        MoveMode::Compare => vms.get(req.vm).ok_or_else(|| not_found(req.vm)),
    };
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            let kind = match e {
                VmOpError::NotFound(_) => FailureKind::NotFound,
                _ => FailureKind::Refused,
            };
            outcome.result = Err(MoveFailure::new(kind, e.to_string()));
            return (outcome, None);
        }
    };
    let mut report = None;
    let result = run_move(&vm, req, mode, cancel, progress, &mut outcome, &mut report);
    if mode == MoveMode::Move {
        vms.end_move(req.vm, result.is_ok());
    }
    if let (Ok(stats), Some(storage)) = (&result, &req.options.storage) {
        // The engine deleted the active layers; the read-only parents stay open until this
        // VM is gone, and may be shared with other VMs (those are kept).
        if let Ok(vm) = Arc::try_unwrap(vm) {
            vm.shutdown();
        }
        release_files(&stats.source_parents, storage.keep_source, req.vm, vms);
    }
    outcome.result = result;
    (outcome, report)
}

fn run_move(
    vm: &Vm,
    req: &MoveRequest<'_>,
    mode: MoveMode,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    outcome: &mut MoveOutcome,
    report: &mut Option<CompareReport>,
) -> Result<MoveStats, MoveFailure> {
    let failed = |m: String| MoveFailure::new(FailureKind::Failed, m);
    let settings = ClientSettings {
        source: None,
        tls: TlsContext::ephemeral().map_err(|e| failed(e.to_string()))?,
        realm: req.realm.clone(),
        handshake_timeout: Duration::from_secs(10),
        local_host: Some(req.local_host.clone()),
    };
    // Kept alive for the whole move: the credentials live in these caches.
    let mut _own_cc: Option<PrivateCcache> = None;
    let mut _host_cc = None;
    let own: Option<(Credential, &'static str)> = match &req.credential {
        MoveCredential::OwnTicket { ccache, dir } => {
            let cc = PrivateCcache::write(dir, ccache).map_err(failed)?;
            let credential = UserCredential::from_ccache(&cc.0.display().to_string())
                .map_err(|e| failed(format!("the handed-over credential cannot be used: {e}")))?;
            _own_cc = Some(cc);
            Some((credential, "own-ticket"))
        }
        MoveCredential::Host { host } => {
            let (c, cc) = host
                .initiator()
                .map_err(|e| failed(format!("this host's own credential: {e}")))?;
            _host_cc = Some(cc);
            Some((c, "host"))
        }
        MoveCredential::ActFor { acting, .. } => {
            outcome.user = acting.user().to_string();
            None
        }
    };
    if let Some((c, _)) = &own
        && let Ok(p) = c.principal()
    {
        outcome.user = p.to_string();
    }
    let mut tried = Vec::new();
    for addr in &req.to {
        let mut settings = settings.clone();
        settings.source = req
            .sources
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == addr.is_ipv4() && !ip.is_unspecified());
        let target = Target {
            addr: *addr,
            spn: req.spn.clone(),
        };
        let mut dialer = match (&own, &req.credential) {
            (Some((c, _)), _) => MoveDialer::Own(ChannelDialer::new(
                settings.clone(),
                *addr,
                req.spn.clone(),
                c.clone(),
                AuthFacts {
                    realm: Some(req.realm.clone()),
                    target_spn: Some(req.spn.clone()),
                    local_host: Some(req.local_host.clone()),
                    ..AuthFacts::default()
                },
            )),
            (
                None,
                MoveCredential::ActFor {
                    acting, host, auth, ..
                },
            ) => MoveDialer::Acting {
                settings: settings.clone(),
                host: host.clone(),
                acting,
                auth: *auth,
                target,
            },
            (None, _) => return Err(failed("no credential for the move".into())),
        };
        let (control, method) = match dialer.connect() {
            Ok(x) => x,
            Err(e @ (ChannelError::Connect { .. } | ChannelError::TimedOut { .. })) => {
                tried.push(format!("{addr}: {}", MoveFailure::channel(&e).message));
                continue;
            }
            Err(e) => return Err(MoveFailure::channel(&e)),
        };
        outcome.address = addr.to_string();
        outcome.method = match &own {
            Some((_, name)) => (*name).to_owned(),
            None => method_name(method).to_owned(),
        };
        return match mode {
            MoveMode::Move => send_vm(vm, control, &mut dialer, &req.options, cancel, progress)
                .map_err(|e| MoveFailure::engine(&e)),
            MoveMode::Compare => {
                let r =
                    compare_vm(vm, control, &req.options).map_err(|e| MoveFailure::engine(&e))?;
                *report = Some(r);
                Ok(MoveStats::default())
            }
        };
    }
    Err(MoveFailure::new(
        FailureKind::Unreachable,
        format!(
            "the destination could not be reached on any of its migration addresses:\n  {}",
            tried.join("\n  ")
        ),
    ))
}

/// The user's credential cache as a private file, removed when dropped.
struct PrivateCcache(PathBuf);

impl PrivateCcache {
    fn write(dir: &Path, bytes: &[u8]) -> Result<PrivateCcache, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut id = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id));
        let name = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let path = dir.join(format!("move-{name}.ccache"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.write_all(bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(PrivateCcache(path))
    }
}

impl Drop for PrivateCcache {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Each disk's counters and write latency since the VM started (or arrived) here.
fn disk_stats(vm: &Vm) -> Vec<DiskStats> {
    let ns = |d: Option<std::time::Duration>| {
        d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    (0..vm.disk_specs().len())
        .filter_map(|i| vm.block_stats(i))
        .map(|b| DiskStats {
            reads: b.reads,
            writes: b.writes,
            flushes: b.flushes,
            errors: b.failed + b.rejected,
            bytes_read: b.bytes_read,
            bytes_written: b.bytes_written,
            write_p50_ns: ns(b.percentile(50.0)),
            write_p99_ns: ns(b.percentile(99.0)),
            write_max_ns: ns(b.write_hist.max()),
            window_ms: ns(Some(b.window)) / 1_000_000,
        })
        .collect()
}
