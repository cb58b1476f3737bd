//! The KVM micro-VM: memory, vCPUs, devices, guest programs, state save/restore, checkers.
//!
//! This is the VM that the migration engine moves. What the engine uses:
//!
//! - **Build**: [`Vm::create`] (fresh VM from a [`VmConfig`], paused, programs loaded) or
//!   [`Vm::create_for_restore`] + memory + [`Vm::restore_state`] (a VM built from a saved or
//!   received [`VmState`]).
//! - **Run control**: [`Vm::resume`], [`Vm::pause`] (prompt: kicks vCPUs out of `KVM_RUN`
//!   with a signal), [`Vm::set_throttle`] (fraction of time vCPUs sleep, for auto-converge).
//! - **Dirty tracking**: [`Vm::harvest_dirty`] returns the pages written since the previous
//!   harvest, as a [`DirtyBitmap`] over the dense page index: KVM's per-slot dirty log
//!   (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`) OR the VMM's own writes (vm-memory's
//!   `AtomicBitmap`, filled by every write through [`GuestMem`], e.g. block device reads).
//! - **Pages**: [`Vm::read_page`] / [`Vm::write_page`] by dense page index (4 KiB copies; no
//!   whole-memory copy), [`MemoryLayout::gpa_of`] for addresses.
//! - **State**: [`Vm::save_state`] (paused) gives a [`VmState`] without memory; its
//!   [`VmState::encode`]/[`VmState::decode`] container is versioned, size-capped and
//!   checksummed.
//! - **Snapshots**: [`snapshot`] writes header + memory (sparse) + state to a file, live
//!   (dirty-tracking rounds while the guest runs) or paused, and restores it.
//! - **Checkers**: [`check`] verifies memstress's staircase, the full-content pattern and
//!   the disk sequence on a paused VM or on a snapshot image and its disks.
//!
//! Tools: the `vmgate-vm` binary (`run`, `restore`, `check`; see `src/bin/vmgate-vm.rs`)
//! runs, snapshots, restores and checks VMs from the command line; `examples/vm_bench.rs`
//! measures start, snapshot/restore per GiB, harvesting and the guest's dirtying rate.
//!
//! Module layout: `config` (TOML), `layout` (guest-physical map), `boot` (long mode),
//! `programs` (guest code), `devices` (serial, block, Persist trait), `vcpu` (threads and
//! their state machine), `cpuid` (what the guest sees, compat baseline), `state` (VmState
//! and its container), `dirty` (bitmaps), `snapshot` (files), `check` (checkers).

pub mod block_stats;
pub mod boot;
pub mod check;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod disk_swap;
pub mod layout;
pub mod programs;
pub mod snapshot;
pub mod state;
pub mod vcpu;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY, kvm_cpuid_entry2, kvm_irqchip, kvm_mp_state, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use check::{CheckReport, check_vm};
pub use config::{ConfigError, GuestProgram, VmConfig};
pub use dirty::DirtyBitmap;
pub use layout::{MemoryLayout, PAGE_BYTES, PAGE_SIZE};
pub use state::{StateError, VcpuState, VmState, VmWideState};
pub use vcpu::{StopReason, VcpuRequest, VcpuResponse, VcpuRunState};

use crate::disk::{Disk, DiskError};
use devices::{BlockArgs, BlockDevice, Devices, DevicesError, Serial};
use programs::{DiskRegion, ProgramTag};
use vcpu::{Throttle, VcpuError, VcpuHandle, VcpuThreadArgs};

/// Guest memory: anonymous mappings with vm-memory's own-write bitmap.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Where the TSS for Intel VMX's real-mode emulation goes (in the device-window hole).
const TSS_ADDRESS: usize = 0xFFFB_D000;
/// How long to wait for a vCPU thread's answer.
const VCPU_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("the VM configuration is invalid")]
    Config(#[from] ConfigError),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: is KVM available on this host and may this user use it?")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM capability the VM needs is missing.
    #[error("this host's KVM lacks the {0} capability that vmgate VMs need")]
    MissingCapability(&'static str),
    /// The host's XSAVE area does not fit the saved-state format.
    #[error("this host's XSAVE area is {0} bytes, more than the 4096 bytes vmgate can save")]
    XsaveTooLarge(i32),
    /// A KVM call failed.
    #[error("KVM refused to {op}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A guest memory access failed.
    #[error("guest memory access at {gpa:#x} failed")]
    GuestAccess {
        /// Address.
        gpa: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A page index past the end of guest RAM.
    #[error("page index {index} is outside guest RAM ({pages} pages)")]
    PageIndex {
        /// Index.
        index: u64,
        /// Pages in RAM.
        pages: u64,
    },
    /// A page buffer of the wrong size.
    #[error("a page buffer must be 4096 bytes, not {0}")]
    PageBuffer(usize),
    /// A disk could not be opened.
    #[error("cannot open disk {index}")]
    Disk {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Flushing the disks failed.
    #[error("flushing the VM's disks failed")]
    Flush(#[source] DiskError),
    /// A diskstress region does not fit its disk.
    #[error(
        "vCPU {vcpu}: diskstress blocks {start}..{end} of {block_size} bytes do not fit disk {disk} ({disk_blocks} blocks)"
    )]
    DiskRegion {
        /// vCPU.
        vcpu: u32,
        /// Disk.
        disk: usize,
        /// First block.
        start: u64,
        /// End block.
        end: u64,
        /// Block size.
        block_size: u64,
        /// Blocks the disk has.
        disk_blocks: u64,
    },
    /// Two diskstress regions on one disk overlap.
    #[error("the diskstress regions of vCPU {a} and vCPU {b} overlap on disk {disk}")]
    DiskOverlap {
        /// First vCPU.
        a: u32,
        /// Second vCPU.
        b: u32,
        /// Disk.
        disk: usize,
    },
    /// Device state could not be restored.
    #[error("the device state cannot be restored")]
    Devices(#[from] DevicesError),
    /// The console log could not be opened.
    #[error("cannot open the console log {path}")]
    Console {
        /// Path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Assembling the guest programs failed (a bug).
    #[error("assembling the guest programs failed: {0}")]
    Assemble(String),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler (SIGRTMIN+4)")]
    SignalHandler,
    /// A thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// Talking to a vCPU thread failed.
    #[error("a vCPU does not respond")]
    Vcpu(#[from] VcpuError),
    /// A vCPU refused a request in its current state.
    #[error("vCPU {vcpu} cannot {request} while {state}")]
    NotAllowed {
        /// vCPU.
        vcpu: u32,
        /// Request.
        request: &'static str,
        /// Its state.
        state: String,
    },
    /// The VM as a whole is in the wrong state.
    #[error("the VM cannot {op} while it is {state}")]
    WrongState {
        /// Operation.
        op: &'static str,
        /// State.
        state: &'static str,
    },
    /// A vCPU's KVM state call failed.
    #[error("{0}")]
    VcpuState(String),
    /// The state does not fit the configuration.
    #[error("the saved state has {state} vCPUs but its configuration has {config}")]
    VcpuCount {
        /// In the state.
        state: usize,
        /// In the config.
        config: u32,
    },
    /// This host cannot offer the CPU the VM was using.
    #[error(
        "this host cannot offer CPU features the VM uses: {}; move it to a compatible host, or build VMs with cpu_compat = true",
        missing.join(", ")
    )]
    CpuIncompatible {
        /// What is missing.
        missing: Vec<String>,
    },
}

/// Process-side options of a VM (not part of its configuration or state).
#[derive(Clone, Debug, Default)]
pub struct VmOptions {
    /// Where serial output goes (appended); none: discarded.
    pub console_log: Option<PathBuf>,
    /// The host's storage roots: every disk and backing file of the VM is opened beneath
    /// them ([`crate::storage::paths::StorageRoots::open_beneath`]), a disk outside them is
    /// refused. `None`: disks are opened by their paths as given (tools and tests).
    pub storage_roots: Option<crate::storage::paths::StorageRoots>,
}

/// A guest program's mailbox slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// Program tag (see [`ProgramTag`]).
    pub tag: u64,
    /// memstress: passes completed; diskstress: last sequence number completed.
    pub counter: u64,
    /// diskstress: status of a failed request.
    pub error: u64,
    /// Marker period.
    pub marker_every: u64,
}

/// What [`Vm::pause`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PauseReport {
    /// vCPUs that had stopped on their own before the pause, with the reason.
    pub stopped: Vec<(u32, StopReason)>,
}

#[derive(Debug)]
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A KVM micro-VM.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPU threads end before the VM fd and memory go away.
    vcpus: Vec<VcpuHandle>,
    vcpu_threads: Vec<libc::pthread_t>,
    ticker: Mutex<Option<Ticker>>,
    throttle: Arc<Throttle>,
    running: Mutex<bool>,
    devices: Arc<Devices>,
    vm_fd: VmFd,
    _kvm: Kvm,
    msr_list: Arc<Vec<u32>>,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    guest_cpuid: Vec<kvm_cpuid_entry2>,
    disk_regions: Vec<Option<DiskRegion>>,
    layout: MemoryLayout,
    config: VmConfig,
    mem: GuestMem,
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// The resolved diskstress regions per vCPU, given the disks' sizes in bytes.
pub fn resolve_disk_regions(
    config: &VmConfig,
    disk_sizes: &[u64],
) -> Result<Vec<Option<DiskRegion>>, VmError> {
    let mut out = Vec::new();
    let mut taken: Vec<(u32, usize, u64, u64)> = Vec::new();
    for i in 0..config.vcpus {
        let GuestProgram::Diskstress(d) = config.program(i) else {
            out.push(None);
            continue;
        };
        let size = disk_sizes.get(d.disk).copied().unwrap_or(0);
        let bs = u64::from(d.block_size);
        let disk_blocks = size / bs;
        let blocks = d.blocks.unwrap_or_else(|| {
            disk_blocks
                .saturating_sub(d.start_block)
                .min(config::MAX_DISKSTRESS_BLOCKS)
        });
        let end = d.start_block.saturating_add(blocks);
        if blocks == 0 || end > disk_blocks {
            return Err(VmError::DiskRegion {
                vcpu: i,
                disk: d.disk,
                start: d.start_block,
                end,
                block_size: bs,
                disk_blocks,
            });
        }
        let (bstart, bend) = (d.start_block * bs, end * bs);
        for &(other, disk, s, e) in &taken {
            if disk == d.disk && bstart < e && s < bend {
                return Err(VmError::DiskOverlap {
                    a: other,
                    b: i,
                    disk,
                });
            }
        }
        taken.push((i, d.disk, bstart, bend));
        out.push(Some(DiskRegion {
            start_block: d.start_block,
            blocks,
            block_size: bs,
        }));
    }
    Ok(out)
}

#[derive(Debug)]
struct Skeleton {
    kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMem,
    layout: MemoryLayout,
    disks: Vec<Arc<Disk>>,
    console: Option<File>,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    msr_candidates: Vec<u32>,
    /// Where the disks are opened beneath (see [`VmOptions::storage_roots`]).
    storage_roots: Option<crate::storage::paths::StorageRoots>,
}

fn open_disks(
    config: &VmConfig,
    roots: Option<&crate::storage::paths::StorageRoots>,
) -> Result<Vec<Arc<Disk>>, VmError> {
    let mut disks = Vec::new();
    for (index, spec) in config.disks.iter().enumerate() {
        let d = match roots {
            Some(roots) => Disk::open_in(spec, true, roots),
            None => Disk::open(spec, true),
        }
        .map_err(|source| VmError::Disk { index, source })?;
        disks.push(Arc::new(d));
    }
    Ok(disks)
}

fn skeleton(config: &VmConfig, options: &VmOptions, open_disks: bool) -> Result<Skeleton, VmError> {
    config.validate()?;
    if !vcpu::install_kick_handler() {
        return Err(VmError::SignalHandler);
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::Pit2, "PIT2"),
        (Cap::AdjustClock, "ADJUST_CLOCK"),
        (Cap::VcpuEvents, "VCPU_EVENTS"),
        (Cap::Debugregs, "DEBUGREGS"),
        (Cap::MpState, "MP_STATE"),
        (Cap::Xsave, "XSAVE"),
        (Cap::Xcrs, "XCRS"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    let xsave_size = vm_fd.check_extension_int(Cap::Xsave2);
    if xsave_size > 4096 {
        return Err(VmError::XsaveTooLarge(xsave_size));
    }
    vm_fd
        .set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("create the in-kernel interrupt controller"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the in-kernel PIT"))?;

    let layout = config.layout();
    let ranges: Vec<(GuestAddress, usize)> = layout
        .slots()
        .iter()
        .map(|s| {
            (
                GuestAddress(s.gpa),
                usize::try_from(s.len).unwrap_or(usize::MAX),
            )
        })
        .collect();
    let mem = GuestMem::from_ranges(&ranges).map_err(|source| VmError::Memory {
        mib: config.memory_mib,
        source,
    })?;
    for slot in layout.slots() {
        let host = mem
            .get_host_address(GuestAddress(slot.gpa))
            .map_err(|source| VmError::GuestAccess {
                gpa: slot.gpa,
                source,
            })?;
        // Transparent huge pages for guest RAM, as QEMU does: a fault then fills 2 MiB, which
        // made filling fresh memory (restore, an incoming migration) 2.5x faster here. Advice
        // only: if THP is off, nothing changes.
        // SAFETY: `host..host + len` is the anonymous mapping vm-memory made for this slot;
        // MADV_HUGEPAGE changes no contents and no protection of it.
        let _ = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                usize::try_from(slot.len).unwrap_or(0),
                libc::MADV_HUGEPAGE,
            )
        };
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            guest_phys_addr: slot.gpa,
            memory_size: slot.len,
            userspace_addr: host as u64,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: `host..host + slot.len` is one anonymous mapping owned by `mem` (vm-memory
        // created it for exactly this range). `mem` is stored in the `Vm` next to `vm_fd`, and
        // the Vm ends every vCPU thread before either is dropped, so no KVM_RUN can touch the
        // range after it is unmapped. Slots do not overlap (layout puts them at distinct
        // guest addresses with distinct slot numbers).
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(kvm_err("register guest memory"))?;
    }

    let disks = if open_disks {
        self::open_disks(config, options.storage_roots.as_ref())?
    } else {
        Vec::new()
    };
    let console = match &options.console_log {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::Console {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report the supported CPUID"))?
        .as_slice()
        .to_vec();
    let msr_candidates = kvm
        .get_msr_index_list()
        .map_err(kvm_err("list the MSRs"))?
        .as_slice()
        .to_vec();
    Ok(Skeleton {
        kvm,
        vm_fd,
        mem,
        layout,
        disks,
        console,
        supported_cpuid,
        msr_candidates,
        storage_roots: options.storage_roots.clone(),
    })
}

impl Vm {
    /// Builds a fresh VM from `config`: memory, devices, vCPUs in long mode at their
    /// programs' entry points. The VM is paused; [`Vm::resume`] starts it.
    pub fn create(config: VmConfig, options: &VmOptions) -> Result<Vm, VmError> {
        let mut sk = skeleton(&config, options, true)?;
        let sizes: Vec<u64> = sk.disks.iter().map(|d| d.size()).collect();
        let regions = resolve_disk_regions(&config, &sizes)?;

        boot::write_system_tables(&sk.mem, &sk.layout).map_err(|source| VmError::GuestAccess {
            gpa: layout::GDT_GPA,
            source,
        })?;
        let images = programs::assemble_all().map_err(|e| VmError::Assemble(e.to_string()))?;
        for (gpa, code) in &images.images {
            sk.mem
                .write_slice(code, GuestAddress(*gpa))
                .map_err(|source| VmError::GuestAccess { gpa: *gpa, source })?;
        }

        let blocks = sk
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                BlockDevice::new(BlockArgs {
                    index,
                    disk: Arc::clone(disk),
                    mem: sk.mem.clone(),
                    layout: sk.layout.clone(),
                })
            })
            .collect();
        let devices = Devices::new(Serial::new(sk.console.take()), blocks);

        let mut fds = Vec::new();
        let mut cpuid0 = Vec::new();
        for i in 0..config.vcpus {
            let fd = sk
                .vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("create a vCPU"))?;
            let entries =
                cpuid::guest_cpuid(&sk.supported_cpuid, i, config.vcpus, config.cpu_compat);
            if i == 0 {
                cpuid0.clone_from(&entries);
            }
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|e| VmError::VcpuState(format!("building CPUID failed: {e:?}")))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set the CPUID"))?;
            let program = config.program(i);
            let region = regions
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .copied()
                .flatten();
            let start = programs::program_start(program, i, region);
            let sregs = fd.get_sregs().map_err(kvm_err("read the reset sregs"))?;
            fd.set_sregs(&boot::long_mode_sregs(&sregs, start.ring))
                .map_err(kvm_err("set long mode"))?;
            fd.set_regs(&boot::initial_regs(i, start.rip, start.regs))
                .map_err(kvm_err("set the registers"))?;
            let mut fpu = fd.get_fpu().map_err(kvm_err("read the FPU state"))?;
            fpu.fcw = 0x37F;
            fpu.mxcsr = 0x1F80;
            fd.set_fpu(&fpu).map_err(kvm_err("set the FPU state"))?;
            // Application processors would wait for INIT/SIPI under the in-kernel LAPIC.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("make the vCPU runnable"))?;
            let mb = programs::mailbox_gpa(i);
            let write = |off: u64, v: u64| {
                sk.mem
                    .write_obj(v, GuestAddress(mb + off))
                    .map_err(|source| VmError::GuestAccess {
                        gpa: mb + off,
                        source,
                    })
            };
            write(0, start.tag as u64)?;
            write(programs::MAILBOX_MARKER_EVERY, start.marker_every)?;
            write(programs::MAILBOX_PASS_LIMIT, start.pass_limit)?;
            fds.push(fd);
        }
        Vm::assemble(config, sk, devices, fds, regions, cpuid0)
    }

    /// Builds the VM that `state` describes: memory (empty), devices restored from the
    /// state, vCPUs created with the recorded CPUID. Load the memory (e.g.
    /// [`Vm::write_page`]), then call [`Vm::restore_state`] and [`Vm::resume`]. The same as
    /// [`PreparedVm::prepare`] followed by [`PreparedVm::finish`].
    pub fn create_for_restore(state: &VmState, options: &VmOptions) -> Result<Vm, VmError> {
        PreparedVm::prepare(state.config.clone(), options)?.finish(state)
    }

    fn assemble(
        config: VmConfig,
        sk: Skeleton,
        devices: Devices,
        fds: Vec<VcpuFd>,
        regions: Vec<Option<DiskRegion>>,
        cpuid0: Vec<kvm_cpuid_entry2>,
    ) -> Result<Vm, VmError> {
        let msr_list = Arc::new(
            fds.first()
                .map(|fd| vcpu::probe_msrs(fd, &sk.msr_candidates))
                .unwrap_or_default(),
        );
        let devices = Arc::new(devices);
        let throttle = Arc::new(Throttle::default());
        let mut vcpus = Vec::new();
        let mut vcpu_threads = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let (req_tx, req_rx) = mpsc::channel();
            let (resp_tx, resp_rx) = mpsc::channel();
            let thread = vcpu::spawn(VcpuThreadArgs {
                index,
                fd,
                devices: Arc::clone(&devices),
                msr_list: Arc::clone(&msr_list),
                throttle: Arc::clone(&throttle),
                requests: req_rx,
                responses: resp_tx,
            })
            .map_err(VmError::Thread)?;
            {
                use std::os::unix::thread::JoinHandleExt;
                vcpu_threads.push(thread.as_pthread_t());
            }
            vcpus.push(VcpuHandle::new(index, req_tx, resp_rx, thread));
        }
        let vm = Vm {
            vcpus,
            vcpu_threads,
            ticker: Mutex::new(None),
            throttle,
            running: Mutex::new(false),
            devices,
            vm_fd: sk.vm_fd,
            _kvm: sk.kvm,
            msr_list,
            supported_cpuid: sk.supported_cpuid,
            guest_cpuid: cpuid0,
            disk_regions: regions,
            layout: sk.layout,
            config,
            mem: sk.mem,
        };
        // What the VMM wrote while building is not guest progress: start tracking clean.
        vm.harvest_dirty()?;
        Ok(vm)
    }

    /// Loads the vCPU and VM-wide KVM state (after the memory). The VM stays paused.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.require_paused("restore state")?;
        let vw = &state.vm;
        self.vm_fd
            .set_pit2(&vw.pit)
            .map_err(kvm_err("restore the PIT"))?;
        let mut clock = vw.clock;
        // Only KVM_CLOCK_REALTIME may be passed back, and the saved realtime is stale.
        clock.flags = 0;
        self.vm_fd
            .set_clock(&clock)
            .map_err(kvm_err("restore the clock"))?;
        for chip in [&vw.pic_master, &vw.pic_slave, &vw.ioapic] {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("restore the interrupt controllers"))?;
        }
        for (h, s) in self.vcpus.iter().zip(&state.vcpus) {
            let r = h.request(VcpuRequest::RestoreState(Box::new(s.clone())), VCPU_TIMEOUT)?;
            match r {
                VcpuResponse::Restored => {}
                other => return Err(self.unexpected(h.index(), other)),
            }
        }
        self.harvest_dirty()?;
        Ok(())
    }

    fn unexpected(&self, vcpu: u32, r: VcpuResponse) -> VmError {
        match r {
            VcpuResponse::NotAllowed { request, state } => VmError::NotAllowed {
                vcpu,
                request,
                state: state.to_string(),
            },
            VcpuResponse::Failed(msg) => VmError::VcpuState(msg),
            other => VmError::VcpuState(format!("vCPU {vcpu} answered {other:?}")),
        }
    }

    fn is_running(&self) -> bool {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_running(&self, v: bool) {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }

    fn require_paused(&self, op: &'static str) -> Result<(), VmError> {
        if self.is_running() {
            Err(VmError::WrongState {
                op,
                state: "running",
            })
        } else {
            Ok(())
        }
    }

    /// Starts or continues running guest code on every vCPU. vCPUs whose guest stopped stay
    /// stopped (see [`Vm::pause`]'s report).
    pub fn resume(&self) -> Result<(), VmError> {
        if self.is_running() {
            return Err(VmError::WrongState {
                op: "resume",
                state: "running",
            });
        }
        let mut first_err = None;
        for h in &self.vcpus {
            match h.request(VcpuRequest::Resume, VCPU_TIMEOUT)? {
                VcpuResponse::Resumed => {}
                VcpuResponse::NotAllowed {
                    state: VcpuRunState::Stopped(_),
                    ..
                } => {}
                other => {
                    first_err.get_or_insert(self.unexpected(h.index(), other));
                }
            }
        }
        self.set_running(true);
        self.update_ticker();
        first_err.map_or(Ok(()), Err)
    }

    /// Stops running guest code on every vCPU; returns when all are out of `KVM_RUN` with
    /// pending I/O completed. Reports vCPUs that had stopped on their own.
    pub fn pause(&self) -> Result<PauseReport, VmError> {
        if !self.is_running() {
            return Err(VmError::WrongState {
                op: "pause",
                state: "paused",
            });
        }
        // Ask all first, then collect, so the vCPUs stop together.
        for h in &self.vcpus {
            h.post(VcpuRequest::Pause)?;
        }
        let mut report = PauseReport::default();
        let mut first_err = None;
        for h in &self.vcpus {
            match h.wait("pause", VCPU_TIMEOUT)? {
                VcpuResponse::Paused(None) => {}
                VcpuResponse::Paused(Some(reason)) => report.stopped.push((h.index(), reason)),
                other => {
                    first_err.get_or_insert(self.unexpected(h.index(), other));
                }
            }
        }
        self.set_running(false);
        self.update_ticker();
        first_err.map_or(Ok(report), Err)
    }

    /// Whether guest code is running.
    pub fn running(&self) -> bool {
        self.is_running()
    }

    /// Low level: sends one request to one vCPU and returns its answer as is (a request the
    /// vCPU's state does not allow is answered with [`VcpuResponse::NotAllowed`]). Bypasses
    /// the VM-level bookkeeping, so use it for queries and tests, not to run or pause.
    pub fn vcpu_request(&self, index: u32, req: VcpuRequest) -> Result<VcpuResponse, VmError> {
        let h = usize::try_from(index)
            .ok()
            .and_then(|i| self.vcpus.get(i))
            .ok_or(VmError::Vcpu(VcpuError::Gone(index)))?;
        Ok(h.request(req, VCPU_TIMEOUT)?)
    }

    /// The state of each vCPU.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuRunState>, VmError> {
        let mut out = Vec::new();
        for h in &self.vcpus {
            match h.request(VcpuRequest::Query, VCPU_TIMEOUT)? {
                VcpuResponse::Status(state) => out.push(state),
                other => return Err(self.unexpected(h.index(), other)),
            }
        }
        Ok(out)
    }

    /// Sets the fraction of time (0 to 0.99) every vCPU sleeps, for auto-converge.
    pub fn set_throttle(&self, fraction: f64) {
        self.throttle.set(fraction);
        self.update_ticker();
    }

    /// The current throttle.
    pub fn throttle(&self) -> f64 {
        self.throttle.get()
    }

    fn update_ticker(&self) {
        let mut t = self.ticker.lock().unwrap_or_else(PoisonError::into_inner);
        let want = self.throttle.get() > 0.0 && self.is_running();
        if want && t.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = Arc::clone(&stop);
            let threads = self.vcpu_threads.clone();
            let signal = vcpu::kick_signal();
            let spawned = std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || {
                    while !stop2.load(Ordering::SeqCst) {
                        std::thread::sleep(vcpu::THROTTLE_SLICE);
                        for &pt in &threads {
                            // SAFETY: the ticker is stopped and joined before the vCPU threads
                            // are joined (Vm::drop and every pause), so each `pt` is a live
                            // thread; the kick signal's handler only sets a flag.
                            unsafe { libc::pthread_kill(pt, signal) };
                        }
                    }
                });
            if let Ok(thread) = spawned {
                *t = Some(Ticker { stop, thread });
            }
        } else if !want {
            if let Some(tk) = t.take() {
                tk.stop.store(true, Ordering::SeqCst);
                let _ = tk.thread.join();
            }
        }
    }

    /// The pages written since the previous harvest (KVM's dirty log OR the VMM's own
    /// writes), and clears both.
    pub fn harvest_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let mut bm = DirtyBitmap::new(self.layout.total_pages());
        for (slot, region) in self.layout.slots().iter().zip(self.mem.iter()) {
            let len = usize::try_from(slot.len).unwrap_or(usize::MAX);
            let log = self
                .vm_fd
                .get_dirty_log(slot.slot, len)
                .map_err(kvm_err("report dirty pages"))?;
            bm.or_words_at(slot.first_page, &log);
            let own = std::ops::Deref::deref(region).bitmap().get_and_reset();
            bm.or_words_at(slot.first_page, &own);
        }
        Ok(bm)
    }

    /// Pages that have host memory behind them (present or swapped out), from
    /// `/proc/self/pagemap`. The others were never touched, read as zero, and a copy can skip
    /// them without reading them (reading would fault in the shared zero page, ~1 µs each).
    /// If pagemap cannot be read, every page counts as populated.
    pub fn populated_pages(&self) -> DirtyBitmap {
        let total = self.layout.total_pages();
        self.read_pagemap()
            .unwrap_or_else(|| DirtyBitmap::all(total))
    }

    fn read_pagemap(&self) -> Option<DirtyBitmap> {
        use std::os::unix::fs::FileExt;
        const PRESENT_OR_SWAPPED: u64 = 3 << 62;
        const CHUNK: u64 = 65536;
        let f = File::open("/proc/self/pagemap").ok()?;
        let mut bm = DirtyBitmap::new(self.layout.total_pages());
        let mut buf = vec![0u8; usize::try_from(CHUNK * 8).ok()?];
        for slot in self.layout.slots() {
            let host = self.mem.get_host_address(GuestAddress(slot.gpa)).ok()? as u64;
            let vpn = host / PAGE_SIZE;
            let mut done = 0;
            while done < slot.pages() {
                let n = (slot.pages() - done).min(CHUNK);
                let bytes = buf.get_mut(..usize::try_from(n * 8).ok()?)?;
                f.read_exact_at(bytes, (vpn + done) * 8).ok()?;
                for (k, e) in bytes.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().ok()?);
                    if e & PRESENT_OR_SWAPPED != 0 {
                        bm.set(slot.first_page + done + k as u64);
                    }
                }
                done += n;
            }
        }
        Some(bm)
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Guest memory (for the devices and the engine; writes through it are tracked).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    fn page_gpa(&self, index: u64) -> Result<u64, VmError> {
        self.layout.gpa_of(index).ok_or(VmError::PageIndex {
            index,
            pages: self.layout.total_pages(),
        })
    }

    /// Copies page `index` (dense index) into `buf` (4096 bytes).
    pub fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), VmError> {
        if buf.len() != PAGE_BYTES {
            return Err(VmError::PageBuffer(buf.len()));
        }
        let gpa = self.page_gpa(index)?;
        self.read_gpa(gpa, buf)
    }

    /// Writes page `index` (dense index) from `buf` (4096 bytes); tracked as a VMM write.
    pub fn write_page(&self, index: u64, buf: &[u8]) -> Result<(), VmError> {
        if buf.len() != PAGE_BYTES {
            return Err(VmError::PageBuffer(buf.len()));
        }
        let gpa = self.page_gpa(index)?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|source| VmError::GuestAccess { gpa, source })
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| VmError::GuestAccess { gpa, source })
    }

    /// The mailbox slot of vCPU `index`.
    pub fn mailbox(&self, index: u32) -> Result<Mailbox, VmError> {
        let mut raw = [0u8; 32];
        self.read_gpa(programs::mailbox_gpa(index), &mut raw)?;
        Ok(Mailbox::from_bytes(&raw))
    }

    /// Bytes the serial port has sent to the console.
    pub fn serial_bytes(&self) -> u64 {
        self.devices.serial_bytes_out()
    }

    /// The open disk `index`.
    pub fn disk(&self, index: usize) -> Option<Arc<Disk>> {
        self.devices.disk(index)
    }

    /// I/O errors the block devices met.
    pub fn block_errors(&self) -> Vec<String> {
        self.devices.block_errors()
    }

    /// Makes completed guest disk writes durable.
    pub fn flush_disks(&self) -> Result<(), VmError> {
        self.devices.flush_disks().map_err(VmError::Flush)
    }

    /// The diskstress region of vCPU `index`, if it runs diskstress.
    pub fn disk_region(&self, index: u32) -> Option<DiskRegion> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.disk_regions.get(i))
            .copied()
            .flatten()
    }

    /// The CPUID vCPU 0's guest sees (what a destination must offer).
    pub fn guest_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.guest_cpuid
    }

    /// The CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.supported_cpuid
    }

    /// The MSRs saved per vCPU.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// Captures the whole state except memory. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        self.require_paused("save state")?;
        let mut vcpus = Vec::new();
        for h in &self.vcpus {
            match h.request(VcpuRequest::SaveState, VCPU_TIMEOUT)? {
                VcpuResponse::Saved(s) => vcpus.push(*s),
                other => return Err(self.unexpected(h.index(), other)),
            }
        }
        let clock = self.vm_fd.get_clock().map_err(kvm_err("read the clock"))?;
        let mut chips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("read the interrupt controllers"))?;
            chips.push(c);
        }
        let pit = self.vm_fd.get_pit2().map_err(kvm_err("read the PIT"))?;
        let (pic_master, pic_slave, ioapic) = match chips.as_slice() {
            [a, b, c] => (*a, *b, *c),
            _ => return Err(VmError::VcpuState("irqchip count mismatch".into())),
        };
        Ok(VmState {
            config: self.config.clone(),
            vcpus,
            vm: VmWideState {
                clock,
                pic_master,
                pic_slave,
                ioapic,
                pit,
            },
            devices: self.devices.save(),
        })
    }

    /// Ends the vCPU threads and releases the VM (also done on drop).
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.throttle.set(0.0);
        self.set_running(false);
        self.update_ticker();
        for h in &mut self.vcpus {
            h.exit(VCPU_TIMEOUT);
        }
    }
}

/// The CPU features `cpuid` (a source vCPU's) uses that this host cannot offer (empty: the
/// VM can run here).
pub fn missing_cpu_features(cpuid: &[kvm_cpuid_entry2]) -> Result<Vec<String>, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let offer = cpuid::host_offer(&kvm).map_err(kvm_err("probe this host's CPUID"))?;
    Ok(cpuid::missing_features(cpuid, &offer))
}

/// A VM being received: its memory and KVM VM exist, its vCPUs and devices do not yet, and
/// its disks are not open (on shared storage the source still holds them). The migration
/// receiver writes pages into it while they arrive, then [`PreparedVm::finish`] builds the
/// rest from the received state.
#[derive(Debug)]
pub struct PreparedVm {
    config: VmConfig,
    sk: Skeleton,
}

impl PreparedVm {
    /// Allocates the memory and the KVM VM for `config` (validated); no vCPU, no disk.
    pub fn prepare(config: VmConfig, options: &VmOptions) -> Result<PreparedVm, VmError> {
        let sk = skeleton(&config, options, false)?;
        Ok(PreparedVm { config, sk })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.sk.layout
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.sk.mem
    }

    /// Writes page `index` (dense index) from `buf` (4096 bytes).
    pub fn write_page(&self, index: u64, buf: &[u8]) -> Result<(), VmError> {
        if buf.len() != PAGE_BYTES {
            return Err(VmError::PageBuffer(buf.len()));
        }
        let gpa = self.sk.layout.gpa_of(index).ok_or(VmError::PageIndex {
            index,
            pages: self.sk.layout.total_pages(),
        })?;
        self.sk
            .mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|source| VmError::GuestAccess { gpa, source })
    }

    /// Opens the disks, restores the devices from `state`, creates the vCPUs with the
    /// recorded CPUID: the VM, paused, with the memory written so far. Then call
    /// [`Vm::restore_state`] and [`Vm::resume`].
    pub fn finish(self, state: &VmState) -> Result<Vm, VmError> {
        let PreparedVm { config, mut sk } = self;
        if state.config != config {
            return Err(VmError::VcpuState(
                "the received state describes another configuration than the prepared VM".into(),
            ));
        }
        if state.vcpus.len() != usize::try_from(config.vcpus).unwrap_or(usize::MAX) {
            return Err(VmError::VcpuCount {
                state: state.vcpus.len(),
                config: config.vcpus,
            });
        }
        if let Some(v0) = state.vcpus.first() {
            let offer = cpuid::host_offer(&sk.kvm).map_err(kvm_err("probe this host's CPUID"))?;
            let missing = cpuid::missing_features(&v0.cpuid, &offer);
            if !missing.is_empty() {
                return Err(VmError::CpuIncompatible { missing });
            }
        }
        sk.disks = open_disks(&config, sk.storage_roots.as_ref())?;
        let sizes: Vec<u64> = sk.disks.iter().map(|d| d.size()).collect();
        let regions = resolve_disk_regions(&config, &sizes)?;
        let blocks = sk
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| BlockArgs {
                index,
                disk: Arc::clone(disk),
                mem: sk.mem.clone(),
                layout: sk.layout.clone(),
            })
            .collect();
        let devices = Devices::restore(sk.console.take(), blocks, &state.devices)?;
        let mut fds = Vec::new();
        for v in &state.vcpus {
            let fd = sk
                .vm_fd
                .create_vcpu(u64::from(v.index))
                .map_err(kvm_err("create a vCPU"))?;
            let cpuid = CpuId::from_entries(&v.cpuid)
                .map_err(|e| VmError::VcpuState(format!("the saved CPUID is invalid: {e:?}")))?;
            fd.set_cpuid2(&cpuid)
                .map_err(kvm_err("set the saved CPUID"))?;
            fds.push(fd);
        }
        let cpuid0 = state
            .vcpus
            .first()
            .map(|v| v.cpuid.clone())
            .unwrap_or_default();
        Vm::assemble(config, sk, devices, fds, regions, cpuid0)
    }
}

// The migration engine shares one VM between its threads (pages, control).
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vm>();
};

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl Mailbox {
    /// Parses the first 32 bytes of a mailbox slot.
    pub fn from_bytes(raw: &[u8; 32]) -> Mailbox {
        let w = |i: usize| {
            raw.get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        Mailbox {
            tag: w(0),
            counter: w(1),
            error: w(2),
            marker_every: w(3),
        }
    }

    /// The program tag, if known.
    pub fn program(&self) -> Option<ProgramTag> {
        match self.tag {
            1 => Some(ProgramTag::Memstress),
            2 => Some(ProgramTag::MemstressFull),
            3 => Some(ProgramTag::Diskstress),
            4 => Some(ProgramTag::Idle),
            _ => None,
        }
    }
}
