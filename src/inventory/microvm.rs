//! The micro-VM backend's lifecycle: vmgated's own KVM micro-VM (`vmgate_migrate::vm`).

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use vmgate_control::api::vm::{DiskStats, VmCheckReport};
use vmgate_migrate::vm::check::check_vm;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

use super::VmError;

fn failed<'a>(
    name: &'a str,
    what: &'static str,
) -> impl FnOnce(vmgate_migrate::vm::VmError) -> VmError + 'a {
    move |e| VmError::Backend {
        name: name.to_owned(),
        what,
        source: Box::new(e),
    }
}

/// Creates the VM and runs it.
pub fn boot(config: VmConfig, options: &VmOptions) -> Result<Arc<Vm>, VmError> {
    let name = config.name.clone();
    let vm = Vm::create(config, options).map_err(failed(&name, "starting"))?;
    vm.resume().map_err(failed(&name, "starting"))?;
    Ok(Arc::new(vm))
}

/// Pauses a running VM.
pub fn pause(name: &str, vm: &Vm) -> Result<(), VmError> {
    if !vm.running() {
        return Err(VmError::AlreadyPaused(name.to_owned()));
    }
    vm.pause().map(|_| ()).map_err(failed(name, "pausing"))
}

/// Resumes a paused VM, taking back the images a move handed over first.
pub fn resume(name: &str, vm: &Vm) -> Result<(), VmError> {
    if vm.running() {
        return Err(VmError::AlreadyRunning(name.to_owned()));
    }
    if vm.disks_released() {
        vm.reacquire_disks(Duration::from_secs(2))
            .map_err(|reason| VmError::DisksHeld {
                name: name.to_owned(),
                reason: Box::new(reason),
            })?;
    }
    vm.resume().map_err(failed(name, "resuming"))
}

/// Turns the VM off: its threads end when the last reference goes (a move may still hold
/// one for a moment).
pub fn stop(vm: Arc<Vm>) {
    if let Ok(vm) = Arc::try_unwrap(vm) {
        vm.shutdown();
    }
}

/// Runs the VM's self-checks, pausing it for the moment they take.
pub fn check(name: &str, vm: &Vm) -> Result<VmCheckReport, VmError> {
    let was_running = vm.running();
    if was_running {
        vm.pause().map_err(failed(name, "checking"))?;
    }
    let result = check_vm(vm);
    if was_running {
        vm.resume().map_err(failed(name, "checking"))?;
    }
    let reports = result.map_err(|e| VmError::Backend {
        name: name.to_owned(),
        what: "checking",
        source: Box::new(e),
    })?;
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

/// The processor features the guest is shown, as a destination checks them.
pub fn cpu_features(vm: &Vm) -> Vec<String> {
    vmgate_migrate::vm::cpuid::used_features(vm.guest_cpuid())
}

/// Each disk's counters and write latency since the VM started (or arrived) here.
pub fn disk_stats(vm: &Vm) -> Vec<DiskStats> {
    let ns = |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
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
