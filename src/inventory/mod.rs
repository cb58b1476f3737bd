//! The VM inventory: the VMs this host knows, by unique name — each with its definition (what
//! a cold boot starts), its running instance unless it is off, how it came here, and whether a
//! move has it. A VM has a backend ([`Backend`]); every lifecycle operation goes to the
//! backend's module ([`microvm`] for vmgated's own KVM micro-VM; a QEMU backend is another
//! [`Definition`]/[`Instance`] variant and module).
//!
//! Operations that change a VM take the [`Caller`] (and its proof of admission or
//! authorization) so that nothing reaches them around the dispatch.

#![forbid(unsafe_code)]

pub mod microvm;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmgate_control::api::ErrorCode;
use vmgate_control::api::vm::{Backend, NicInfo, VmCheckReport, VmDetail, VmState, VmSummary};
use vmgate_migrate::disk::DiskError;
use vmgate_migrate::storage::paths::{StoragePathError, StorageRoots};
use vmgate_migrate::storage::users::{DiskUsers, NeededFiles};
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

use crate::caller::Caller;

/// What a VM is, as a cold boot starts it.
#[derive(Debug, Clone)]
pub enum Definition {
    /// A KVM micro-VM.
    Microvm(VmConfig),
}

impl Definition {
    /// The VM's name.
    pub fn name(&self) -> &str {
        match self {
            Definition::Microvm(c) => &c.name,
        }
    }

    /// Its backend.
    pub fn backend(&self) -> Backend {
        match self {
            Definition::Microvm(_) => Backend::Microvm,
        }
    }
}

/// A VM that runs (or is paused).
#[derive(Debug, Clone)]
pub enum Instance {
    /// A KVM micro-VM, shared with a move in progress.
    Microvm(Arc<Vm>),
}

impl Instance {
    /// Whether its vCPUs run.
    pub fn running(&self) -> bool {
        match self {
            Instance::Microvm(vm) => vm.running(),
        }
    }
}

/// A VM this host knows.
#[derive(Debug)]
pub struct HostedVm {
    /// The definition.
    pub definition: Definition,
    /// The running instance; `None`: turned off.
    pub instance: Option<Instance>,
    /// How it came here, for `vm_list`.
    pub origin: String,
    /// A move of it is in progress (it cannot be stopped or moved again meanwhile).
    pub moving: bool,
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// No such VM.
    #[error("no VM named \"{0}\" on this host (vmgate vm list)")]
    NotFound(String),
    /// The name is taken.
    #[error("a VM named \"{0}\" already exists on this host")]
    Exists(String),
    /// The configuration document is not valid.
    #[error("the VM configuration is invalid")]
    InvalidConfig(#[source] vmgate_migrate::vm::config::ConfigError),
    /// A move already has it.
    #[error("{0} is already being moved (vmgate jobs list)")]
    AlreadyMoving(String),
    /// A move has it, so it cannot be changed.
    #[error("{0} is being moved: cancel the move first (vmgate jobs cancel)")]
    Moving(String),
    /// It is off, and a move needs it running.
    #[error("{name} is off: {what} needs a running VM (vmgate vm start {name})")]
    OffForMove {
        /// The VM.
        name: String,
        /// `a live move`, `a storage move`.
        what: &'static str,
    },
    /// It is off.
    #[error("{0} is off: vmgate vm start {0}")]
    OffNeedsStart(String),
    /// It is off (a check needs it running).
    #[error("{0} is off")]
    Off(String),
    /// It is off already.
    #[error("{0} is already off")]
    AlreadyOff(String),
    /// It runs already.
    #[error("{0} is already running")]
    AlreadyRunning(String),
    /// It is paused already.
    #[error("{0} is already paused")]
    AlreadyPaused(String),
    /// It changed (started elsewhere, removed) while it was being started.
    #[error("{0} changed while it was starting; try again")]
    Changed(String),
    /// Its disks were handed over to another host, which still holds them.
    #[error(
        "{name} stays paused: its disks were handed over to another host and cannot be taken \
         back ({}); stop the VM where it runs now (vmgate vm list on the destination), then \
         resume it here",
        vmgate_control::error::chain(&**.reason)
    )]
    DisksHeld {
        /// The VM.
        name: String,
        /// Why they cannot be taken back.
        reason: Box<vmgate_migrate::vm::disk_swap::DiskSwapError>,
    },
    /// The storage roots cannot be opened, so no disk can.
    #[error("this host cannot open VM disks")]
    Roots(#[source] StoragePathError),
    /// A disk or one of its backing files is outside the storage roots (or unreadable).
    #[error("disk {index} of {name} ({}) cannot be used", path.display())]
    Disk {
        /// The VM.
        name: String,
        /// The disk.
        index: usize,
        /// Its file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<DiskError>,
    },
    /// The console folder cannot be made.
    #[error("cannot create {}", path.display())]
    ConsoleDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console log cannot be read.
    #[error("cannot read {}", path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend failed.
    #[error("{what} {name} failed")]
    Backend {
        /// The VM.
        name: String,
        /// `pausing`, `resuming`, `starting`, `checking`.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl VmError {
    /// The control protocol's code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            VmError::NotFound(_) => ErrorCode::NotFound,
            VmError::Exists(_)
            | VmError::InvalidConfig(_)
            | VmError::AlreadyMoving(_)
            | VmError::Moving(_)
            | VmError::OffForMove { .. }
            | VmError::OffNeedsStart(_)
            | VmError::Off(_)
            | VmError::AlreadyOff(_)
            | VmError::AlreadyRunning(_)
            | VmError::AlreadyPaused(_)
            | VmError::Changed(_)
            | VmError::DisksHeld { .. }
            | VmError::Roots(_)
            | VmError::Disk { .. } => ErrorCode::Refused,
            VmError::ConsoleDir { .. } | VmError::Console { .. } | VmError::Backend { .. } => {
                ErrorCode::Failed
            }
        }
    }
}

/// The VMs of this host, where their console logs go, and the storage roots their disks must
/// be in. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inventory {
    list: Arc<Mutex<Vec<HostedVm>>>,
    console_dir: PathBuf,
    storage_roots: Vec<PathBuf>,
}

fn find<'a>(list: &'a [HostedVm], name: &str) -> Result<&'a HostedVm, VmError> {
    list.iter()
        .find(|h| h.definition.name() == name)
        .ok_or_else(|| VmError::NotFound(name.to_owned()))
}

fn find_mut<'a>(list: &'a mut [HostedVm], name: &str) -> Result<&'a mut HostedVm, VmError> {
    list.iter_mut()
        .find(|h| h.definition.name() == name)
        .ok_or_else(|| VmError::NotFound(name.to_owned()))
}

impl Inventory {
    /// No VMs yet; console logs go to `console_dir`; disks are opened beneath
    /// `storage_roots`.
    pub fn new(console_dir: PathBuf, storage_roots: Vec<PathBuf>) -> Inventory {
        Inventory {
            list: Arc::default(),
            console_dir,
            storage_roots,
        }
    }

    /// The storage roots, open (a VM's disks are opened beneath them).
    fn roots(&self) -> Result<StorageRoots, VmError> {
        StorageRoots::new(&self.storage_roots).map_err(VmError::Roots)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<HostedVm>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The console log of the VM named `name`.
    pub fn console_path(&self, name: &str) -> PathBuf {
        self.console_dir.join(format!("{name}.console"))
    }

    /// The options of a micro-VM built here (its console log; the folder is made when
    /// missing).
    pub fn options_for(&self, name: &str) -> VmOptions {
        // A failure shows when the VM opens its log, with the path.
        let _ = std::fs::create_dir_all(&self.console_dir);
        VmOptions {
            console_log: Some(self.console_path(name)),
            ..VmOptions::default()
        }
    }

    /// Adds a running VM (one that arrived); its name must be new here.
    pub fn add(&self, instance: Instance, origin: String) -> Result<(), VmError> {
        let definition = match &instance {
            Instance::Microvm(vm) => Definition::Microvm(vm.config().clone()),
        };
        let mut list = self.lock();
        let name = definition.name().to_owned();
        if list.iter().any(|h| h.definition.name() == name) {
            return Err(VmError::Exists(name));
        }
        list.push(HostedVm {
            definition,
            instance: Some(instance),
            origin,
            moving: false,
        });
        Ok(())
    }

    /// The running instance of `name`.
    pub fn instance(&self, name: &str) -> Result<Instance, VmError> {
        let list = self.lock();
        let h = find(&list, name)?;
        h.instance
            .clone()
            .ok_or_else(|| VmError::Off(name.to_owned()))
    }

    /// Whether a VM of that name is defined here (running or off).
    pub fn contains(&self, name: &str) -> bool {
        self.lock().iter().any(|h| h.definition.name() == name)
    }

    /// Marks the VM as moving (refused when it is off, already moving, or unknown) and
    /// returns its instance. `what` names the move (`a live move`, `a storage move`).
    pub fn begin_move(&self, name: &str, what: &'static str) -> Result<Instance, VmError> {
        let mut list = self.lock();
        let h = find_mut(&mut list, name)?;
        if h.moving {
            return Err(VmError::AlreadyMoving(name.to_owned()));
        }
        let instance = h.instance.clone().ok_or_else(|| VmError::OffForMove {
            name: name.to_owned(),
            what,
        })?;
        h.moving = true;
        Ok(instance)
    }

    /// Ends a storage-only move, however it ended: the definition takes the files the VM's
    /// disks are on now (so `vm show` and a later cold boot use them), and the VM may be
    /// stopped or moved again.
    pub fn end_storage_move(&self, name: &str, instance: &Instance) {
        let mut list = self.lock();
        if let Some(h) = list.iter_mut().find(|h| h.definition.name() == name) {
            match (&mut h.definition, instance) {
                (Definition::Microvm(config), Instance::Microvm(vm)) => {
                    for (spec, current) in config.disks.iter_mut().zip(vm.disk_specs()) {
                        *spec = current;
                    }
                }
            }
            h.moving = false;
        }
    }

    /// Ends a move: on success the VM no longer belongs to this host.
    pub fn end_move(&self, name: &str, moved_away: bool) {
        let mut list = self.lock();
        if moved_away {
            list.retain(|h| h.definition.name() != name);
        } else if let Some(h) = list.iter_mut().find(|h| h.definition.name() == name) {
            h.moving = false;
        }
    }

    /// What `vm_list` shows.
    pub fn list(&self) -> Vec<VmSummary> {
        self.lock().iter().map(summary).collect()
    }

    /// What `vm_show` shows.
    pub fn show(&self, name: &str) -> Result<VmDetail, VmError> {
        let list = self.lock();
        let h = find(&list, name)?;
        let console = Some(self.console_path(name).display().to_string());
        Ok(match (&h.definition, &h.instance) {
            (Definition::Microvm(c), instance) => {
                let vm = instance.as_ref().map(|Instance::Microvm(vm)| vm.as_ref());
                VmDetail {
                    summary: summary(h),
                    cpu_compat: c.cpu_compat,
                    cpu_features: vm.map(microvm::cpu_features).unwrap_or_default(),
                    nics: c
                        .nics
                        .iter()
                        .map(|n| NicInfo {
                            mac: n.mac.clone(),
                            switch: n.switch.clone(),
                        })
                        .collect(),
                    disks: c
                        .disks
                        .iter()
                        .map(|d| d.path.display().to_string())
                        .collect(),
                    disk_stats: vm.map(microvm::disk_stats).unwrap_or_default(),
                    console,
                }
            }
        })
    }

    /// Creates a VM from its configuration and starts it; its name.
    pub fn create(&self, _caller: &Caller, config_toml: &str) -> Result<String, VmError> {
        let definition = Definition::Microvm(
            VmConfig::from_toml(config_toml, None).map_err(VmError::InvalidConfig)?,
        );
        let name = definition.name().to_owned();
        if self.contains(&name) {
            return Err(VmError::Exists(name));
        }
        // Every disk and backing file inside the storage roots (checked here for a clear
        // refusal; the VM then opens them beneath the roots).
        let roots = self.roots()?;
        match &definition {
            Definition::Microvm(c) => {
                for (index, spec) in c.disks.iter().enumerate() {
                    vmgate_migrate::disk::chain_in(spec, &roots).map_err(|source| {
                        VmError::Disk {
                            name: name.clone(),
                            index,
                            path: spec.path.clone(),
                            source: Box::new(source),
                        }
                    })?;
                }
            }
        }
        let instance = self.boot(&definition)?;
        self.add(instance, "created here".into())?;
        Ok(name)
    }

    fn boot(&self, definition: &Definition) -> Result<Instance, VmError> {
        std::fs::create_dir_all(&self.console_dir).map_err(|source| VmError::ConsoleDir {
            path: self.console_dir.clone(),
            source,
        })?;
        match definition {
            Definition::Microvm(c) => {
                let mut options = self.options_for(&c.name);
                options.storage_roots = Some(self.roots()?);
                microvm::boot(c.clone(), &options).map(Instance::Microvm)
            }
        }
    }

    /// Starts a VM that is off (a cold boot of its definition).
    pub fn start(&self, _caller: &Caller, name: &str) -> Result<(), VmError> {
        let definition = {
            let list = self.lock();
            let h = find(&list, name)?;
            if h.instance.is_some() {
                return Err(VmError::AlreadyRunning(name.to_owned()));
            }
            h.definition.clone()
        };
        let instance = self.boot(&definition)?;
        let mut list = self.lock();
        match list.iter_mut().find(|h| h.definition.name() == name) {
            Some(h) if h.instance.is_none() => {
                h.instance = Some(instance);
                Ok(())
            }
            _ => Err(VmError::Changed(name.to_owned())),
        }
    }

    /// The running instance of `name`, unless a move has it.
    fn idle(&self, name: &str) -> Result<Instance, VmError> {
        let list = self.lock();
        let h = find(&list, name)?;
        if h.moving {
            return Err(VmError::Moving(name.to_owned()));
        }
        h.instance
            .clone()
            .ok_or_else(|| VmError::OffNeedsStart(name.to_owned()))
    }

    /// Pauses a running VM (its vCPUs stop; memory, devices and disks stay as they are).
    pub fn pause(&self, _caller: &Caller, name: &str) -> Result<(), VmError> {
        match self.idle(name)? {
            Instance::Microvm(vm) => microvm::pause(name, &vm),
        }
    }

    /// Resumes a paused VM. A VM that a move left paused after handing its images over
    /// (shared storage) takes them back first; while another host still has one open for
    /// writing it must not run here, and the refusal names the holder.
    pub fn resume(&self, _caller: &Caller, name: &str) -> Result<(), VmError> {
        match self.idle(name)? {
            Instance::Microvm(vm) => microvm::resume(name, &vm),
        }
    }

    /// Turns a VM off; its definition stays.
    pub fn stop(&self, _caller: &Caller, name: &str) -> Result<(), VmError> {
        let instance = {
            let mut list = self.lock();
            let h = find_mut(&mut list, name)?;
            if h.moving {
                return Err(VmError::Moving(name.to_owned()));
            }
            h.instance
                .take()
                .ok_or_else(|| VmError::AlreadyOff(name.to_owned()))?
        };
        match instance {
            Instance::Microvm(vm) => microvm::stop(vm),
        }
        Ok(())
    }

    /// Runs the VM's self-checks (pausing it for the moment they take).
    pub fn check(&self, name: &str) -> Result<VmCheckReport, VmError> {
        match self.instance(name)? {
            Instance::Microvm(vm) => microvm::check(name, &vm),
        }
    }

    /// The console output of `name` from `offset`, and where the next read starts.
    pub fn console(&self, name: &str, offset: u64) -> Result<(String, u64), VmError> {
        use std::io::{Read, Seek, SeekFrom};
        if !self.contains(name) {
            return Err(VmError::NotFound(name.to_owned()));
        }
        let path = self.console_path(name);
        let read_err = |source| VmError::Console {
            path: path.clone(),
            source,
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => return Err(read_err(e)),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = offset.min(len);
        f.seek(SeekFrom::Start(from)).map_err(read_err)?;
        let mut buf = Vec::new();
        let max = u64::try_from(vmgate_control::api::MAX_CONSOLE_CHUNK).unwrap_or(u64::MAX);
        f.take(max).read_to_end(&mut buf).map_err(read_err)?;
        let next = from + u64::try_from(buf.len()).unwrap_or(0);
        Ok((String::from_utf8_lossy(&buf).into_owned(), next))
    }
}

/// The inventory's disks, for moves that delete old files: every file in the chain of every
/// disk of every VM here, running (its open disks) or off (its definition).
impl DiskUsers for Inventory {
    fn needed_files(&self) -> NeededFiles {
        let vms: Vec<(Definition, Option<Instance>)> = self
            .lock()
            .iter()
            .map(|h| (h.definition.clone(), h.instance.clone()))
            .collect();
        let mut out = NeededFiles::new();
        for (definition, instance) in vms {
            match (definition, instance) {
                (Definition::Microvm(config), Some(Instance::Microvm(vm))) => {
                    for i in 0..vm.disk_specs().len() {
                        if let Some(d) = vm.disk(i) {
                            out.add_layers(&config.name, d.layers());
                        }
                    }
                }
                (Definition::Microvm(config), None) => {
                    for spec in &config.disks {
                        out.add_chain(&config.name, spec);
                    }
                }
            }
        }
        out
    }
}

fn summary(h: &HostedVm) -> VmSummary {
    let (memory_mib, vcpus) = match &h.definition {
        Definition::Microvm(c) => (c.memory_mib, c.vcpus),
    };
    VmSummary {
        name: h.definition.name().to_owned(),
        state: match &h.instance {
            None => VmState::Off,
            Some(_) if h.moving => VmState::Moving,
            Some(i) if i.running() => VmState::Running,
            Some(_) => VmState::Paused,
        },
        memory_mib,
        vcpus,
        origin: h.origin.clone(),
        backend: h.definition.backend(),
    }
}
