//! Changing the image behind a running VM's block device (the last step of a storage move),
//! and handing a paused VM's images to another host on shared storage.
//!
//! The exchange happens only while the VM is paused: every vCPU is out of `KVM_RUN` and no
//! block request is in flight, so the guest's last write before the pause is on the old image
//! (and was copied by the mirror's final pass) and its first write after the resume lands on
//! the new one. The block device's registers and counters are untouched: the guest does not
//! notice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Vm;
use super::devices::DevicesError;
use crate::disk::{Disk, DiskError, DiskSpec};

/// Errors of [`Vm::swap_disk`].
#[derive(Debug, thiserror::Error)]
pub enum DiskSwapError {
    /// The VM runs: a request could be in flight.
    #[error("the disk behind a block device can only be replaced while the VM is paused")]
    Running,
    /// The device refused the replacement.
    #[error("the disk behind block device {index} cannot be replaced")]
    Replace {
        /// Disk index.
        index: usize,
        /// The device's reason.
        #[source]
        source: DevicesError,
    },
    /// Handing a disk over failed (flushing it, or giving up its locks).
    #[error("disk {index} cannot be handed over")]
    Release {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Taking a handed-over disk back failed: while another host has the image open for
    /// writing (the VM may run there), this one must not write it.
    #[error("disk {index} cannot be taken back")]
    Reacquire {
        /// Disk index.
        index: usize,
        /// The cause.
        #[source]
        source: DiskError,
    },
}

impl Vm {
    /// Puts `disk` behind block device `index` and returns the disk it replaces. The VM must
    /// be paused; the new disk must be writable and of the same size.
    pub fn swap_disk(&self, index: usize, disk: Arc<Disk>) -> Result<Arc<Disk>, DiskSwapError> {
        if self.is_running() {
            return Err(DiskSwapError::Running);
        }
        self.devices
            .replace_disk(index, disk)
            .map_err(|source| DiskSwapError::Replace { index, source })
    }

    /// Where each disk is now, by index. Unlike [`Vm::config`]`().disks`, which records the
    /// paths the VM was created with, this follows storage moves.
    pub fn disk_specs(&self) -> Vec<DiskSpec> {
        (0..self.devices.disk_count())
            .filter_map(|i| self.devices.disk(i).map(|d| d.spec().clone()))
            .collect()
    }

    /// Shared storage, at the switchover: hands every disk over to the destination, which
    /// opens the same files. Each disk is flushed and gives up its locks (see
    /// [`Disk::release`]); from then on the destination's open for writing succeeds and this
    /// VM must not run until [`Vm::reacquire_disks`]. The VM must be paused.
    pub fn release_disks(&self) -> Result<(), DiskSwapError> {
        if self.is_running() {
            return Err(DiskSwapError::Running);
        }
        for index in 0..self.devices.disk_count() {
            if let Some(disk) = self.devices.disk(index) {
                disk.release()
                    .map_err(|source| DiskSwapError::Release { index, source })?;
            }
        }
        Ok(())
    }

    /// Whether the disks were handed over ([`Vm::release_disks`]) and not taken back.
    pub fn disks_released(&self) -> bool {
        (0..self.devices.disk_count())
            .filter_map(|i| self.devices.disk(i))
            .any(|d| d.is_released())
    }

    /// After a handoff that did not complete: opens every handed-over disk again (fresh
    /// metadata, fresh locks) and puts it behind its block device, so the VM can resume here.
    /// While another process still has an image open for writing — the destination tearing
    /// down its copy of the VM — the open is retried until `wait` has passed; then the VM
    /// must stay paused, since the image may be in use by a running VM elsewhere.
    pub fn reacquire_disks(&self, wait: Duration) -> Result<(), DiskSwapError> {
        if self.is_running() {
            return Err(DiskSwapError::Running);
        }
        let deadline = Instant::now() + wait;
        for index in 0..self.devices.disk_count() {
            let Some(old) = self.devices.disk(index) else {
                continue;
            };
            if !old.is_released() {
                continue;
            }
            let reopened = loop {
                // Beneath the same storage roots as before, if any.
                match old.reopen(true) {
                    Err(DiskError::InUse { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => break other,
                }
            };
            let disk = reopened.map_err(|source| DiskSwapError::Reacquire { index, source })?;
            self.swap_disk(index, Arc::new(disk))?;
        }
        Ok(())
    }
}
