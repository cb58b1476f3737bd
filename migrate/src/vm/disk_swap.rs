//! Changing the image behind a running VM's block device (the last step of a storage move).
//!
//! The exchange happens only while the VM is paused: every vCPU is out of `KVM_RUN` and no
//! block request is in flight, so the guest's last write before the pause is on the old image
//! (and was copied by the mirror's final pass) and its first write after the resume lands on
//! the new one. The block device's registers and counters are untouched: the guest does not
//! notice.

use std::sync::Arc;

use super::Vm;
use super::devices::DevicesError;
use crate::disk::{Disk, DiskSpec};

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
}
