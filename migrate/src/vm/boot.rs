//! 64-bit long mode set up by the VMM: GDT, TSS, identity page tables, and the initial
//! registers that start a vCPU directly in ring 3 (or ring 0 for `idle`).
//!
//! Under `kvm_pvm` ring-0 guest code is emulated instruction by instruction while ring-3
//! code runs natively, so the guest programs run in ring 3 from their first instruction: the
//! VMM loads CS/SS with DPL-3 selectors through `KVM_SET_SREGS`. No IDT is installed and
//! RFLAGS.IF is 0: nothing raises interrupts (the PIT is never programmed), and an exception
//! is a triple fault, which the vCPU loop reports as a stopped guest.
//!
//! The page tables identity-map the whole address space the guest may touch (RAM and the
//! device window) with 2 MiB pages that have the user bit set and the accessed/dirty bits
//! pre-set, so the guest never writes to them.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMem;
use super::layout::{GDT_GPA, MemoryLayout, PD_GPA, PDPT_GPA, PML4_GPA, STACK_TOP_GPA, TSS_GPA};

/// Selector of the ring-0 64-bit code segment.
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the ring-0 data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the ring-3 data segment (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// Selector of the ring-3 64-bit code segment (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of the TSS.
pub const TSS_SEL: u16 = 0x28;

const GDT_ENTRIES: usize = 7;
const TSS_LIMIT: u64 = 0x67;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

/// RFLAGS at start: only the fixed bit 1. IF=0, IOPL=0 (PVM forces IOPL 0 anyway).
pub const INITIAL_RFLAGS: u64 = 0x2;

/// The privilege level a program starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Supervisor (only `idle`, whose single `hlt` needs it).
    Zero,
    /// User: native speed under `kvm_pvm`.
    Three,
}

/// Writes the GDT, the TSS and the identity page tables into guest memory.
pub fn write_system_tables(
    mem: &GuestMem,
    layout: &MemoryLayout,
) -> Result<(), vm_memory::GuestMemoryError> {
    let tss_low = TSS_LIMIT
        | ((TSS_GPA & 0xFF_FFFF) << 16)
        | (0x89u64 << 40) // present, type 9 (available 64-bit TSS)
        | (((TSS_GPA >> 24) & 0xFF) << 56);
    let gdt: [u64; GDT_ENTRIES] = [
        0,
        0x00AF_9B00_0000_FFFF, // ring-0 code, L=1
        0x00CF_9300_0000_FFFF, // ring-0 data
        0x00CF_F300_0000_FFFF, // ring-3 data
        0x00AF_FB00_0000_FFFF, // ring-3 code, L=1
        tss_low,
        TSS_GPA >> 32,
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_GPA + 8 * i as u64))?;
    }
    // TSS: all zero except the I/O map base, which points past the limit (no bitmap).
    mem.write_slice(&[0u8; 104], GuestAddress(TSS_GPA))?;
    mem.write_obj(104u16, GuestAddress(TSS_GPA + 102))?;

    let table = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED;
    mem.write_obj(PDPT_GPA | table, GuestAddress(PML4_GPA))?;
    let gibs = layout.mapped_end() >> 30;
    for g in 0..gibs {
        let pd = PD_GPA + g * 0x1000;
        mem.write_obj(pd | table, GuestAddress(PDPT_GPA + 8 * g))?;
        let mut entries = [0u8; 4096];
        for (j, chunk) in entries.chunks_exact_mut(8).enumerate() {
            let addr = (g << 30) | ((j as u64) << 21);
            let e = addr | table | PTE_DIRTY | PTE_HUGE;
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode sregs for a vCPU starting in `ring`, based on the vCPU's reset sregs (which
/// carry the APIC base and the LDT as KVM set them).
pub fn long_mode_sregs(base: &kvm_sregs, ring: Ring) -> kvm_sregs {
    let mut s = *base;
    let (cs, ds) = match ring {
        Ring::Zero => (segment(KERNEL_CS, true, 0), segment(KERNEL_DS, false, 0)),
        Ring::Three => (segment(USER_CS, true, 3), segment(USER_DS, false, 3)),
    };
    s.cs = cs;
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: u32::try_from(TSS_LIMIT).unwrap_or(0x67),
        selector: TSS_SEL,
        type_: 11, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = u16::try_from(GDT_ENTRIES * 8 - 1).unwrap_or(u16::MAX);
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_GPA;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// Initial general registers: entry point, a private stack, and the program's arguments.
pub fn initial_regs(vcpu: u32, rip: u64, mut regs: kvm_regs) -> kvm_regs {
    regs.rip = rip;
    regs.rsp = STACK_TOP_GPA - u64::from(vcpu) * 0x200;
    regs.rflags = INITIAL_RFLAGS;
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let layout = MemoryLayout::new(64);
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_system_tables(&mem, &layout).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_GPA)).unwrap();
        assert_eq!(pml4 & !0xFFF, PDPT_GPA);
        assert_ne!(pml4 & PTE_USER, 0);
        // 3 GiB + 2 MiB * 5 (the serial page) maps to itself.
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_GPA + 8 * 3)).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xFFF) + 8 * 5))
            .unwrap();
        assert_eq!(pde & !0x1FFFFF, (3 << 30) | (5 << 21));
        assert_eq!(pde & 0xFF, 0xE7);
        let tss_desc: u64 = mem.read_obj(GuestAddress(GDT_GPA + 40)).unwrap();
        assert_eq!((tss_desc >> 16) & 0xFF_FFFF, TSS_GPA);
    }
}
