//! The guest-physical memory map of the micro-VM.
//!
//! ```text
//! 0x0000_0000 ┌───────────────────────────────┐
//!             │ system area (4 MiB)            │  GDT+TSS 0x1000, mailbox 0x2000,
//!             │                                │  page tables 0x3000.., program code
//!             │                                │  0x8_0000.., block requests 0xA_0000..,
//!             │                                │  block buffers 0x20_0000..0x40_0000
//! 0x0040_0000 ├───────────────────────────────┤
//!             │ RAM for guest programs         │  memstress ranges live here
//! min(mem,3G) ├───────────────────────────────┤
//! 0xC000_0000 │ device window (no RAM)         │  serial 0xC000_0000, block devices
//!             │                                │  0xC000_1000 + 0x1000*i, control 0xC00F_0000
//! 0x1_0000_0000 ├─────────────────────────────┤
//!             │ RAM above 3 GiB (if any)       │
//!             └───────────────────────────────┘
//! ```
//!
//! RAM is one or two KVM memory slots (below 3 GiB, and from 4 GiB up). Pages are also
//! addressed by a dense *page index* over all RAM (slot 0's pages first, then slot 1's), which
//! is what dirty bitmaps and the migration engine use; [`MemoryLayout::gpa_of`] maps back.
//!
//! Ring-3 guest programs reach the devices through MMIO in the device window: under this
//! machine's `kvm_pvm` the guest always runs with IOPL 0 (the PVM ABI forces it), so an `out`
//! from ring 3 raises #GP. MMIO writes exit to the VMM at any privilege level, on hardware
//! virtualization too. The serial port also answers on the classic I/O ports 0x3F8-0x3FF.

/// Guest page size (bytes).
pub const PAGE_SIZE: u64 = 4096;
/// Page size as `usize`, for buffers.
pub const PAGE_BYTES: usize = 4096;

/// The GDT (and the TSS right after it, at +0x800).
pub const GDT_GPA: u64 = 0x1000;
/// The 64-bit TSS (104 bytes, no I/O bitmap).
pub const TSS_GPA: u64 = 0x1800;
/// The mailbox page: one 64-byte slot per vCPU (see `programs`).
pub const MAILBOX_GPA: u64 = 0x2000;
/// Bytes per vCPU in the mailbox.
pub const MAILBOX_SLOT_BYTES: u64 = 64;
/// PML4 of the identity map.
pub const PML4_GPA: u64 = 0x3000;
/// The single PDPT (covers 512 GiB).
pub const PDPT_GPA: u64 = 0x4000;
/// First page directory; one per GiB of mapped address space follows.
pub const PD_GPA: u64 = 0x5000;
/// Guest program code, one 4 KiB page per program kind.
pub const CODE_GPA: u64 = 0x8_0000;
/// Per-vCPU stack tops grow down from here (programs need none; set for sanity).
pub const STACK_TOP_GPA: u64 = 0x9_F000;
/// Per-vCPU block request structs (64 bytes each).
pub const BLOCK_REQ_GPA: u64 = 0xA_0000;
/// Bytes per vCPU for the block request struct.
pub const BLOCK_REQ_BYTES: u64 = 64;
/// Per-vCPU block data buffers.
pub const BLOCK_BUF_GPA: u64 = 0x20_0000;
/// Bytes per vCPU block buffer (the largest block size).
pub const BLOCK_BUF_BYTES: u64 = 64 * 1024;
/// End of the system area: guest program ranges start at or above this.
pub const SYSTEM_AREA_END: u64 = 4 << 20;

/// End of low RAM / start of the device window.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of RAM above the device window.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// The serial port's registers in the device window (byte registers, stride 1).
pub const SERIAL_MMIO: u64 = 0xC000_0000;
/// The serial port's classic I/O port base (COM1).
pub const SERIAL_PIO: u16 = 0x3F8;
/// The first block device's registers; device `i` is at `+ i * BLOCK_MMIO_STRIDE`.
pub const BLOCK_MMIO: u64 = 0xC000_1000;
/// Distance between block devices' register pages.
pub const BLOCK_MMIO_STRIDE: u64 = 0x1000;
/// The control register a guest program writes to report a failure.
pub const CONTROL_MMIO: u64 = 0xC00F_0000;

/// Smallest guest memory (MiB): the system area plus room for a program.
pub const MIN_MEMORY_MIB: u64 = 8;
/// Largest guest memory (MiB): 64 GiB.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// Most vCPUs (the mailbox page holds 64 slots; block buffers hold 32).
pub const MAX_VCPUS: u32 = 32;
/// Most disks (block devices).
pub const MAX_DISKS: usize = 8;

/// One KVM memory slot: a contiguous run of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes (a multiple of 1 MiB).
    pub len: u64,
    /// Dense index of the slot's first page.
    pub first_page: u64,
}

impl Slot {
    /// Number of 4 KiB pages in the slot.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Whether `gpa` lies inside the slot.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }
}

/// Where the guest's RAM is: its slots and the dense page index over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    slots: Vec<Slot>,
    total_pages: u64,
}

impl MemoryLayout {
    /// The layout for `memory_mib` MiB of RAM (already validated by the config).
    pub fn new(memory_mib: u64) -> MemoryLayout {
        let bytes = memory_mib << 20;
        let low = bytes.min(LOW_RAM_END);
        let mut slots = vec![Slot {
            slot: 0,
            gpa: 0,
            len: low,
            first_page: 0,
        }];
        if bytes > low {
            slots.push(Slot {
                slot: 1,
                gpa: HIGH_RAM_START,
                len: bytes - low,
                first_page: low / PAGE_SIZE,
            });
        }
        MemoryLayout {
            slots,
            total_pages: bytes / PAGE_SIZE,
        }
    }

    /// The RAM slots, in guest-physical order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Total number of RAM pages (the length of every dirty bitmap).
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_SIZE
    }

    /// Guest-physical address of dense page `index`, or `None` past the end.
    pub fn gpa_of(&self, index: u64) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| index >= s.first_page && index - s.first_page < s.pages())
            .map(|s| s.gpa + (index - s.first_page) * PAGE_SIZE)
    }

    /// Dense page index of the page holding `gpa`, or `None` if `gpa` is not RAM.
    pub fn index_of(&self, gpa: u64) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| s.contains(gpa))
            .map(|s| s.first_page + (gpa - s.gpa) / PAGE_SIZE)
    }

    /// Whether `[gpa, gpa + len)` lies inside one RAM slot.
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        match gpa.checked_add(len) {
            Some(end) => self
                .slots
                .iter()
                .any(|s| s.contains(gpa) && end <= s.gpa + s.len),
            None => false,
        }
    }

    /// End of the guest-physical address space the page tables must map: all RAM and the
    /// device window, rounded up to 1 GiB.
    pub fn mapped_end(&self) -> u64 {
        let ram_end = self.slots.iter().map(|s| s.gpa + s.len).max().unwrap_or(0);
        let end = ram_end.max(HIGH_RAM_START);
        end.div_ceil(1 << 30) << 30
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_slot() {
        let l = MemoryLayout::new(256);
        assert_eq!(l.slots().len(), 1);
        assert_eq!(l.total_pages(), 65536);
        assert_eq!(l.gpa_of(65535), Some(65535 * 4096));
        assert_eq!(l.gpa_of(65536), None);
        assert_eq!(l.index_of(0x10_0000), Some(256));
        assert_eq!(l.index_of(256 << 20), None);
        assert_eq!(l.mapped_end(), 4 << 30);
    }

    #[test]
    fn large_guest_skips_device_window() {
        let l = MemoryLayout::new(4096);
        assert_eq!(l.slots().len(), 2);
        let low_pages = LOW_RAM_END / PAGE_SIZE;
        assert_eq!(l.gpa_of(low_pages - 1), Some(LOW_RAM_END - PAGE_SIZE));
        assert_eq!(l.gpa_of(low_pages), Some(HIGH_RAM_START));
        assert_eq!(l.index_of(HIGH_RAM_START + PAGE_SIZE), Some(low_pages + 1));
        assert_eq!(l.index_of(SERIAL_MMIO), None);
        assert!(!l.is_ram(LOW_RAM_END - PAGE_SIZE, 2 * PAGE_SIZE));
        assert_eq!(l.mapped_end(), 5 << 30);
    }
}
