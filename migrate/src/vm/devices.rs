//! The VM's devices: a 16550-style serial port (console log), a paravirtual block device per
//! disk, and the control register guest programs use to report failure.
//!
//! ## Block device
//! Registers at [`BLOCK_MMIO`] + 0x1000 × disk (32-bit accesses):
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | write | doorbell: guest-physical address of a request (below 4 GiB) |
//! | 0x04 | read  | capacity in 512-byte sectors, low 32 bits |
//! | 0x08 | read  | capacity, high 32 bits |
//! | 0x0C | read  | status of the last request |
//! | 0x10 | read  | requests completed, low 32 bits |
//!
//! A request is 32 bytes in guest memory: `op: u32` (1 read, 2 write, 3 flush),
//! `status: u32` (written by the device), `sector: u64`, `count: u32` (sectors, at most
//! 2048), `reserved: u32`, `buffer: u64` (guest-physical). The VMM performs the I/O
//! synchronously on the vCPU thread during the doorbell exit, on the disk image, and writes
//! the status back; both the status and data read into guest memory are VMM writes, which
//! vm-memory records in the own-write bitmap (KVM's dirty log does not see them).
//!
//! Each device's requests are counted and timed (doorbell handling to status written back)
//! in a [`BlockStatsCell`] kept beside the device, outside its saved state: see
//! [`super::block_stats`].

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMem;
use super::block_stats::{BlockStatsCell, RequestKind, Served};
use super::layout::{
    BLOCK_MMIO, BLOCK_MMIO_STRIDE, CONTROL_MMIO, MemoryLayout, SERIAL_MMIO, SERIAL_PIO,
};
use super::programs::{BLOCK_OP_FLUSH, BLOCK_OP_READ, BLOCK_OP_WRITE};
use crate::disk::Disk;

/// Request completed.
pub const STATUS_OK: u32 = 0;
/// Unknown op, zero or too many sectors.
pub const STATUS_BAD_REQUEST: u32 = 1;
/// Sectors beyond the end of the disk.
pub const STATUS_OUT_OF_RANGE: u32 = 2;
/// The disk image reported an error.
pub const STATUS_IO_ERROR: u32 = 3;
/// The data buffer is not guest RAM.
pub const STATUS_BAD_BUFFER: u32 = 4;
/// Largest transfer of one request, in sectors (1 MiB).
pub const MAX_REQUEST_SECTORS: u32 = 2048;

/// Save/restore of one component, Firecracker style: `save` captures the component's state,
/// `restore` builds the component again from that state plus what the state does not carry
/// (files, guest memory). The KVM parts (vCPUs, the VM-wide irqchip/clock/PIT) are saved by
/// functions instead, because they restore *into* file descriptors that exist already.
pub trait Persist: Sized {
    /// The saved form.
    type State;
    /// What restoring needs besides the state.
    type Args;
    /// Why restoring can fail.
    type Error;
    /// Captures the state.
    fn save(&self) -> Self::State;
    /// Rebuilds the component.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors of the devices.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The saved state belongs to a disk of another size.
    #[error(
        "disk {index} has {found} sectors but the saved VM state expects {expected}; it is not the disk the VM was saved with"
    )]
    DiskSize {
        /// Disk index.
        index: usize,
        /// Sectors now.
        found: u64,
        /// Sectors in the state.
        expected: u64,
    },
    /// A disk index the VM does not have.
    #[error("the VM has no disk {index}; it has {disks}")]
    NoDisk {
        /// The index asked for.
        index: usize,
        /// Disks the VM has.
        disks: usize,
    },
    /// A replacement disk of another size than the disk it would replace.
    #[error(
        "disk {} has {found} sectors and cannot replace disk {index}, which has {expected}",
        .path.display()
    )]
    ReplacementSize {
        /// Disk index.
        index: usize,
        /// The replacement's top layer.
        path: std::path::PathBuf,
        /// Sectors of the replacement.
        found: u64,
        /// Sectors of the disk in place.
        expected: u64,
    },
    /// A replacement disk that the guest could not write.
    #[error("disk {} cannot replace disk {index}: it is open read-only", .path.display())]
    ReadOnlyDisk {
        /// Disk index.
        index: usize,
        /// The replacement's top layer.
        path: std::path::PathBuf,
    },
    /// The state has a different number of block devices than the configuration has disks.
    #[error(
        "the saved VM state has {state} block devices but the configuration has {config} disks"
    )]
    DiskCount {
        /// In the state.
        state: usize,
        /// In the config.
        config: usize,
    },
}

/// State of the serial port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Interrupt enable register.
    pub ier: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Divisor latch, low.
    pub dll: u8,
    /// Divisor latch, high.
    pub dlm: u8,
    /// FIFO control (last written).
    pub fcr: u8,
    /// Bytes transmitted since the VM was created (across save/restore).
    pub bytes_out: u64,
}

/// A 16550-compatible serial port, transmit side only; output goes to the console log.
#[derive(Debug)]
pub struct Serial {
    state: SerialState,
    console: Option<File>,
}

const LCR_DLAB: u8 = 0x80;
const LSR_THRE_TEMT: u8 = 0x60;

impl Serial {
    /// A port writing to `console` (or nowhere).
    pub fn new(console: Option<File>) -> Serial {
        Serial {
            state: SerialState {
                lcr: 0x03,
                dll: 0x0C,
                ..SerialState::default()
            },
            console,
        }
    }

    /// Bytes transmitted so far.
    pub fn bytes_out(&self) -> u64 {
        self.state.bytes_out
    }

    /// A guest write to register `offset` (0-7).
    pub fn write(&mut self, offset: u64, value: u8) {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.state.dll = value,
            0 => {
                self.state.bytes_out += 1;
                if let Some(f) = &mut self.console {
                    // A console log that cannot be written must not stop the guest.
                    let _ = f.write_all(&[value]);
                }
            }
            1 if dlab => self.state.dlm = value,
            1 => self.state.ier = value & 0x0F,
            2 => self.state.fcr = value,
            3 => self.state.lcr = value,
            4 => self.state.mcr = value & 0x1F,
            7 => self.state.scr = value,
            _ => {}
        }
    }

    /// A guest read of register `offset` (0-7).
    pub fn read(&self, offset: u64) -> u8 {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.state.dll,
            0 => 0,
            1 if dlab => self.state.dlm,
            1 => self.state.ier,
            2 => 0x01, // no interrupt pending
            3 => self.state.lcr,
            4 => self.state.mcr,
            5 => LSR_THRE_TEMT,
            6 => 0xB0, // DCD, DSR, CTS
            7 => self.state.scr,
            _ => 0xFF,
        }
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Args = Option<File>;
    type Error = DevicesError;

    fn save(&self) -> SerialState {
        self.state
    }

    fn restore(console: Option<File>, state: &SerialState) -> Result<Serial, DevicesError> {
        Ok(Serial {
            state: *state,
            console,
        })
    }
}

/// State of one block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in sectors when saved (restore refuses another disk size).
    pub capacity_sectors: u64,
    /// Status of the last request.
    pub last_status: u32,
    /// Requests completed.
    pub completed: u64,
    /// Guest-physical address of the last request.
    pub last_request: u64,
}

/// A paravirtual block device backed by a disk image.
#[derive(Debug)]
pub struct BlockDevice {
    index: usize,
    disk: Arc<Disk>,
    mem: GuestMem,
    layout: MemoryLayout,
    state: BlockState,
    scratch: Vec<u8>,
    last_error: Option<String>,
}

/// What [`BlockDevice::restore`] needs besides the state.
#[derive(Debug)]
pub struct BlockArgs {
    /// Disk index.
    pub index: usize,
    /// The open disk.
    pub disk: Arc<Disk>,
    /// Guest memory.
    pub mem: GuestMem,
    /// Its layout.
    pub layout: MemoryLayout,
}

impl BlockDevice {
    /// A fresh device.
    pub fn new(args: BlockArgs) -> BlockDevice {
        let capacity_sectors = args.disk.size() / 512;
        BlockDevice {
            index: args.index,
            disk: args.disk,
            mem: args.mem,
            layout: args.layout,
            state: BlockState {
                capacity_sectors,
                ..BlockState::default()
            },
            scratch: Vec::new(),
            last_error: None,
        }
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The last I/O error's message, if any request failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Requests completed.
    pub fn completed(&self) -> u64 {
        self.state.completed
    }

    /// A guest register read.
    pub fn read(&self, offset: u64) -> u32 {
        let cap = self.state.capacity_sectors;
        match offset {
            0x04 => low32(cap),
            0x08 => low32(cap >> 32),
            0x0C => self.state.last_status,
            0x10 => low32(self.state.completed),
            _ => 0,
        }
    }

    /// A guest register write. A doorbell (offset 0) runs the request and returns what was
    /// served, for the statistics; other offsets are ignored.
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Served> {
        if offset != 0 {
            return None;
        }
        let req = u64::from(value);
        self.state.last_request = req;
        let (kind, status, bytes) = self.process(req);
        self.state.last_status = status;
        self.state.completed += 1;
        // The status goes back into the request; if the request is not RAM there is nowhere
        // to write it and the guest can read it from register 0x0C.
        if self.layout.is_ram(req, 32) {
            let _ = self.mem.write_obj(status, GuestAddress(req + 4));
        }
        let ok = status == STATUS_OK;
        Some(Served {
            kind,
            bytes: if ok { bytes } else { 0 },
            ok,
        })
    }

    /// Runs the request at `req`: what it was, its status, and the bytes it would move.
    fn process(&mut self, req: u64) -> (RequestKind, u32, u64) {
        if !self.layout.is_ram(req, 32) {
            return (RequestKind::Invalid, STATUS_BAD_REQUEST, 0);
        }
        let mut raw = [0u8; 32];
        if self.mem.read_slice(&mut raw, GuestAddress(req)).is_err() {
            return (RequestKind::Invalid, STATUS_BAD_REQUEST, 0);
        }
        let word32 = |o: usize| {
            raw.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        let word64 = |o: usize| {
            raw.get(o..o + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
        };
        let (op, sector, count, buffer) = (word32(0), word64(8), word32(16), word64(24));
        let kind = match op {
            BLOCK_OP_READ => RequestKind::Read,
            BLOCK_OP_WRITE => RequestKind::Write,
            BLOCK_OP_FLUSH => RequestKind::Flush,
            _ => RequestKind::Invalid,
        };
        let status = self.execute(op, sector, count, buffer);
        let bytes = match kind {
            RequestKind::Read | RequestKind::Write => u64::from(count) * 512,
            RequestKind::Flush | RequestKind::Invalid => 0,
        };
        (kind, status, bytes)
    }

    fn execute(&mut self, op: u32, sector: u64, count: u32, buffer: u64) -> u32 {
        if op == BLOCK_OP_FLUSH {
            return match self.disk.flush() {
                Ok(()) => STATUS_OK,
                Err(e) => self.fail(e),
            };
        }
        if (op != BLOCK_OP_READ && op != BLOCK_OP_WRITE)
            || count == 0
            || count > MAX_REQUEST_SECTORS
        {
            return STATUS_BAD_REQUEST;
        }
        match sector.checked_add(u64::from(count)) {
            Some(end) if end <= self.state.capacity_sectors => {}
            _ => return STATUS_OUT_OF_RANGE,
        }
        let len = u64::from(count) * 512;
        if !self.layout.is_ram(buffer, len) {
            return STATUS_BAD_BUFFER;
        }
        let Ok(len) = usize::try_from(len) else {
            return STATUS_BAD_REQUEST;
        };
        self.scratch.resize(len, 0);
        let offset = sector * 512;
        if op == BLOCK_OP_WRITE {
            if self
                .mem
                .read_slice(&mut self.scratch, GuestAddress(buffer))
                .is_err()
            {
                return STATUS_BAD_BUFFER;
            }
            if let Err(e) = self.disk.write_at(&self.scratch, offset) {
                return self.fail(e);
            }
        } else {
            if let Err(e) = self.disk.read_at(&mut self.scratch, offset) {
                return self.fail(e);
            }
            if self
                .mem
                .write_slice(&self.scratch, GuestAddress(buffer))
                .is_err()
            {
                return STATUS_BAD_BUFFER;
            }
        }
        STATUS_OK
    }

    fn fail(&mut self, e: crate::disk::DiskError) -> u32 {
        let mut msg = format!("block device {}: {e}", self.index);
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        self.last_error = Some(msg);
        STATUS_IO_ERROR
    }
}

impl Persist for BlockDevice {
    type State = BlockState;
    type Args = BlockArgs;
    type Error = DevicesError;

    fn save(&self) -> BlockState {
        self.state
    }

    fn restore(args: BlockArgs, state: &BlockState) -> Result<BlockDevice, DevicesError> {
        let mut dev = BlockDevice::new(args);
        if dev.state.capacity_sectors != state.capacity_sectors {
            return Err(DevicesError::DiskSize {
                index: dev.index,
                found: dev.state.capacity_sectors,
                expected: state.capacity_sectors,
            });
        }
        dev.state = *state;
        Ok(dev)
    }
}

/// State of all devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The serial port.
    pub serial: SerialState,
    /// Block devices, by disk index.
    pub block: Vec<BlockState>,
}

/// What a guest MMIO/PIO write asked the vCPU loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusOutcome {
    /// Carry on.
    Continue,
    /// The guest program reported a failure with this status: stop the vCPU.
    GuestFailed(u32),
}

/// All devices, shared by the vCPU threads.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<Serial>,
    blocks: Vec<Mutex<BlockDevice>>,
    /// Per block device, by index; not saved (see [`super::block_stats`]).
    block_stats: Vec<BlockStatsCell>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A vCPU thread that panicked while holding a device lock left the device in a state
    // that is still consistent (every field is updated by a single assignment).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0)
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

impl Devices {
    /// Devices from their parts.
    pub fn new(serial: Serial, blocks: Vec<BlockDevice>) -> Devices {
        let block_stats = blocks.iter().map(|_| BlockStatsCell::new()).collect();
        Devices {
            serial: Mutex::new(serial),
            blocks: blocks.into_iter().map(Mutex::new).collect(),
            block_stats,
        }
    }

    /// The request statistics of block device `index`.
    pub fn block_stats(&self, index: usize) -> Option<&BlockStatsCell> {
        self.block_stats.get(index)
    }

    /// A guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> BusOutcome {
        if (SERIAL_MMIO..SERIAL_MMIO + 8).contains(&addr) {
            let mut s = lock(&self.serial);
            for (i, b) in data.iter().enumerate() {
                s.write(addr - SERIAL_MMIO + i as u64, *b);
            }
        } else if let Some((index, dev, off)) = self.block_at(addr) {
            // Timed from before the lock: a request waiting for a swap or a flush on another
            // thread waits that long in the guest too.
            let started = Instant::now();
            let served = lock(dev).write(off, le_value(data));
            if let (Some(served), Some(stats)) = (served, self.block_stats.get(index)) {
                stats.record(served, started.elapsed());
            }
        } else if addr == CONTROL_MMIO {
            return BusOutcome::GuestFailed(le_value(data));
        }
        BusOutcome::Continue
    }

    /// A guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (SERIAL_MMIO..SERIAL_MMIO + 8).contains(&addr) {
            let s = lock(&self.serial);
            for (i, b) in data.iter_mut().enumerate() {
                *b = s.read(addr - SERIAL_MMIO + i as u64);
            }
        } else if let Some((_, dev, off)) = self.block_at(addr) {
            let v = lock(dev).read(off).to_le_bytes();
            for (d, s) in data.iter_mut().zip(v.iter().chain(std::iter::repeat(&0))) {
                *d = *s;
            }
        } else {
            data.fill(0xFF);
        }
    }

    /// A guest port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if (SERIAL_PIO..SERIAL_PIO + 8).contains(&port) {
            let mut s = lock(&self.serial);
            for b in data {
                s.write(u64::from(port - SERIAL_PIO), *b);
            }
        }
    }

    /// A guest port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PIO..SERIAL_PIO + 8).contains(&port) {
            let s = lock(&self.serial);
            data.fill(s.read(u64::from(port - SERIAL_PIO)));
        } else {
            data.fill(0xFF);
        }
    }

    fn block_at(&self, addr: u64) -> Option<(usize, &Mutex<BlockDevice>, u64)> {
        let rel = addr.checked_sub(BLOCK_MMIO)?;
        let index = usize::try_from(rel / BLOCK_MMIO_STRIDE).ok()?;
        self.blocks
            .get(index)
            .map(|d| (index, d, rel % BLOCK_MMIO_STRIDE))
    }

    /// Bytes the serial port has transmitted.
    pub fn serial_bytes_out(&self) -> u64 {
        lock(&self.serial).bytes_out()
    }

    /// The disk of block device `index`.
    pub fn disk(&self, index: usize) -> Option<Arc<Disk>> {
        self.blocks.get(index).map(|d| Arc::clone(lock(d).disk()))
    }

    /// Puts `disk` behind block device `index` in place of the disk it had, and returns the
    /// old one. The block device's lock is held across the exchange, so a request runs
    /// entirely on the old disk or entirely on the new one; the caller pauses the VM first
    /// (see [`Vm::swap_disk`](super::Vm::swap_disk)) so that no request is in flight at all.
    /// The new disk must be writable and have the same size as the old one.
    pub fn replace_disk(&self, index: usize, disk: Arc<Disk>) -> Result<Arc<Disk>, DevicesError> {
        let slot = self.blocks.get(index).ok_or(DevicesError::NoDisk {
            index,
            disks: self.blocks.len(),
        })?;
        let mut dev = lock(slot);
        let found = disk.size() / 512;
        if found != dev.state.capacity_sectors {
            return Err(DevicesError::ReplacementSize {
                index,
                path: disk.path().to_path_buf(),
                found,
                expected: dev.state.capacity_sectors,
            });
        }
        if !disk.is_writable() {
            return Err(DevicesError::ReadOnlyDisk {
                index,
                path: disk.path().to_path_buf(),
            });
        }
        Ok(std::mem::replace(&mut dev.disk, disk))
    }

    /// Number of block devices.
    pub fn disk_count(&self) -> usize {
        self.blocks.len()
    }

    /// I/O errors the block devices met, one message per device that had one.
    pub fn block_errors(&self) -> Vec<String> {
        self.blocks
            .iter()
            .filter_map(|d| lock(d).last_error().map(str::to_owned))
            .collect()
    }

    /// Flushes every disk.
    pub fn flush_disks(&self) -> Result<(), crate::disk::DiskError> {
        for d in &self.blocks {
            lock(d).disk().flush()?;
        }
        Ok(())
    }

    /// Saves every device.
    pub fn save(&self) -> DeviceState {
        DeviceState {
            serial: lock(&self.serial).save(),
            block: self.blocks.iter().map(|d| lock(d).save()).collect(),
        }
    }

    /// Rebuilds the devices from `state`.
    pub fn restore(
        console: Option<File>,
        blocks: Vec<BlockArgs>,
        state: &DeviceState,
    ) -> Result<Devices, DevicesError> {
        if blocks.len() != state.block.len() {
            return Err(DevicesError::DiskCount {
                state: state.block.len(),
                config: blocks.len(),
            });
        }
        let serial = Serial::restore(console, &state.serial)?;
        let blocks = blocks
            .into_iter()
            .zip(&state.block)
            .map(|(args, st)| BlockDevice::restore(args, st))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Devices::new(serial, blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_counts_and_logs_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let f = File::create(&path).unwrap();
        let mut s = Serial::new(Some(f));
        for b in b"AB" {
            s.write(0, *b);
        }
        assert_eq!(s.read(5), 0x60);
        s.write(3, 0x83); // DLAB on
        s.write(0, 0x01); // divisor, not data
        s.write(3, 0x03);
        assert_eq!(s.bytes_out(), 2);
        let saved = s.save();
        let restored = Serial::restore(None, &saved).unwrap();
        assert_eq!(restored.save(), saved);
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), b"AB");
    }
}
