//! The built-in guest programs, generated as x86-64 machine code with iced-x86's assembler.
//!
//! Each vCPU runs one program, started by the VMM directly in ring 3 (`idle`: ring 0) with
//! its parameters in registers. Every program reports progress in its vCPU's *mailbox slot*
//! (64 bytes at [`MAILBOX_GPA`] + 64 × vCPU), which the checkers read:
//!
//! | offset | written by | meaning |
//! |---|---|---|
//! | +0  | VMM   | program tag ([`ProgramTag`]) |
//! | +8  | guest | memstress: passes completed; diskstress: last sequence number completed |
//! | +16 | guest | diskstress: block device status of a failed request (0: none) |
//! | +24 | VMM   | `marker_every` (reloaded by the guest after each marker) |
//! | +32 | VMM   | memstress: pass limit (0: none); at the limit the program writes 0 to the control register, which stops its vCPU (`StopReason::GuestDone`) |
//!
//! Serial markers (one byte each, written to the serial port's MMIO THR): memstress on vCPU
//! `i` writes `'A' + i % 26` every `marker_every` passes; diskstress writes `'a' + i % 26`
//! every `marker_every` blocks.
//!
//! ## memstress (byte variant), QEMU migration-test style
//! `rdi` range start, `rsi` range end, `rcx` marker countdown, `r13` marker byte, `r14` serial
//! THR address, `r15` mailbox slot. Each pass increments byte 0 of every page in
//! `[rdi, rsi)`, in address order, then increments the pass counter. After a stop at any
//! instruction, byte 0 of the pages is `P+1` for a prefix and `P` for the rest (mod 256), where
//! `P` is the pass counter (the prefix may be the whole range if the stop came between the
//! last page and the counter update).
//!
//! ## memstress (full-content variant)
//! As above, plus `r12` pass number, `rbp` = [`FILL_MIX`], `r8` = [`FILL_GAMMA`]. Pass `n`
//! (from 1) writes word `w` of page frame `p` as [`fill_word`]`(`[`fill_seed`]`(p, n), w)`;
//! before pass 1 the range is zero. The stop point may split one page at a word boundary.
//!
//! ## diskstress
//! `r12` last seq, `rbx` next block index, `rsi` block count, `rdi` first block, `rbp` block
//! size, `r8` request struct, `r9` data buffer, `r10` block device doorbell, `rcx` marker
//! countdown, `r13`/`r14`/`r15` as above. Iteration `s` (from 1) writes block
//! `k = (s - 1) mod blocks` of the region with [`disk_block_word`], rings the doorbell (the
//! VMM performs the write synchronously and stores the status in the request), checks the
//! status, then stores `s` in the mailbox. A failed request stores the status in the mailbox
//! and writes it to the control register, which stops the vCPU.
//!
//! ## idle
//! Ring 0: `hlt` with interrupts off; KVM's in-kernel LAPIC keeps the vCPU halted.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use kvm_bindings::kvm_regs;

use super::boot::Ring;
use super::config::{DiskstressConfig, GuestProgram};
use super::layout::{
    BLOCK_BUF_BYTES, BLOCK_BUF_GPA, BLOCK_MMIO, BLOCK_MMIO_STRIDE, BLOCK_REQ_BYTES, BLOCK_REQ_GPA,
    CODE_GPA, CONTROL_MMIO, MAILBOX_GPA, MAILBOX_SLOT_BYTES, PAGE_SIZE, SERIAL_MMIO,
};

/// Step added per word in the full-content fill.
pub const FILL_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Multiplier of the page frame number in a page's seed.
pub const FILL_PAGE_MUL: u64 = 0xD1B5_4A32_D192_ED03;
/// Multiplier of the pass number in a page's seed (odd: distinct passes give distinct seeds).
pub const FILL_PASS_MUL: u64 = 0x8CB9_2BA7_2F3D_8DD7;
/// Multiplier of the output mix.
pub const FILL_MIX: u64 = 0xBF58_476D_1CE4_E5B9;
/// First word of every diskstress block.
pub const DISK_MAGIC: u64 = 0x5344_4554_4147_4D56; // "VMGATEDS" little-endian

/// Mailbox offset of the progress counter.
pub const MAILBOX_COUNTER: u64 = 8;
/// Mailbox offset of the error status.
pub const MAILBOX_ERROR: u64 = 16;
/// Mailbox offset of `marker_every`.
pub const MAILBOX_MARKER_EVERY: u64 = 24;
/// Mailbox offset of memstress's pass limit.
pub const MAILBOX_PASS_LIMIT: u64 = 32;

/// Block device request opcodes (request struct +0).
pub const BLOCK_OP_READ: u32 = 1;
/// Write.
pub const BLOCK_OP_WRITE: u32 = 2;
/// Flush.
pub const BLOCK_OP_FLUSH: u32 = 3;

/// What the VMM writes at mailbox +0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ProgramTag {
    /// memstress, byte variant.
    Memstress = 1,
    /// memstress, full-content variant.
    MemstressFull = 2,
    /// diskstress.
    Diskstress = 3,
    /// idle.
    Idle = 4,
}

/// Seed of page frame `pfn` in pass `pass`.
pub fn fill_seed(pfn: u64, pass: u64) -> u64 {
    pfn.wrapping_mul(FILL_PAGE_MUL)
        .wrapping_add(pass.wrapping_mul(FILL_PASS_MUL))
}

/// Word `word` (0..512) of a page whose seed is `seed`.
pub fn fill_word(seed: u64, word: u64) -> u64 {
    let z = seed.wrapping_add(word.wrapping_mul(FILL_GAMMA));
    let y = (z ^ (z >> 31)).wrapping_mul(FILL_MIX);
    y ^ (y >> 29)
}

/// Word at byte offset `offset` of the diskstress block written by iteration `seq` to block
/// index `index` of a region with `block_size`-byte blocks.
pub fn disk_block_word(seq: u64, index: u64, block_size: u64, offset: u64) -> u64 {
    match offset {
        0 => DISK_MAGIC,
        8 => seq,
        16 => index,
        24 => block_size,
        _ => seq ^ (offset << 40),
    }
}

/// Mailbox slot address of vCPU `index`.
pub fn mailbox_gpa(index: u32) -> u64 {
    MAILBOX_GPA + u64::from(index) * MAILBOX_SLOT_BYTES
}

/// Marker byte of a program on vCPU `index`.
pub fn marker_byte(program: &GuestProgram, index: u32) -> Option<u8> {
    let off = u8::try_from(index % 26).unwrap_or(0);
    match program {
        GuestProgram::Memstress(_) => Some(b'A' + off),
        GuestProgram::Diskstress(_) => Some(b'a' + off),
        GuestProgram::Idle => None,
    }
}

/// The code of every program, each at its fixed address.
#[derive(Debug)]
pub struct ProgramImages {
    /// (guest-physical address, machine code).
    pub images: Vec<(u64, Vec<u8>)>,
}

const MEMSTRESS_GPA: u64 = CODE_GPA;
const MEMSTRESS_FULL_GPA: u64 = CODE_GPA + 0x1000;
const DISKSTRESS_GPA: u64 = CODE_GPA + 0x2000;
const IDLE_GPA: u64 = CODE_GPA + 0x3000;

/// Assembles all programs.
pub fn assemble_all() -> Result<ProgramImages, IcedError> {
    Ok(ProgramImages {
        images: vec![
            (MEMSTRESS_GPA, memstress_code(MEMSTRESS_GPA)?),
            (MEMSTRESS_FULL_GPA, memstress_full_code(MEMSTRESS_FULL_GPA)?),
            (DISKSTRESS_GPA, diskstress_code(DISKSTRESS_GPA)?),
            (IDLE_GPA, idle_code(IDLE_GPA)?),
        ],
    })
}

fn memstress_code(ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    a.set_label(&mut outer)?;
    a.mov(rax, rdi)?;
    a.set_label(&mut inner)?;
    a.inc(byte_ptr(rax))?;
    a.add(rax, 4096)?;
    a.cmp(rax, rsi)?;
    a.jb(inner)?;
    a.inc(qword_ptr(r15 + MAILBOX_COUNTER))?;
    a.mov(rdx, qword_ptr(r15 + MAILBOX_COUNTER))?;
    pass_limit(&mut a, rdx)?;
    a.dec(rcx)?;
    a.jnz(outer)?;
    a.mov(rcx, qword_ptr(r15 + MAILBOX_MARKER_EVERY))?;
    a.mov(byte_ptr(r14), r13b)?;
    a.jmp(outer)?;
    a.assemble(ip)
}

/// Stops the vCPU for good once `passes` reached the mailbox's pass limit (if one is set):
/// writes 0 to the control register, and again if ever resumed. Clobbers r11.
fn pass_limit(a: &mut CodeAssembler, passes: AsmRegister64) -> Result<(), IcedError> {
    let mut go_on = a.create_label();
    let mut stop = a.create_label();
    a.mov(r11, qword_ptr(r15 + MAILBOX_PASS_LIMIT))?;
    a.test(r11, r11)?;
    a.jz(go_on)?;
    a.cmp(passes, r11)?;
    a.jb(go_on)?;
    a.mov(r11, CONTROL_MMIO)?;
    a.set_label(&mut stop)?;
    a.mov(dword_ptr(r11), 0)?;
    a.jmp(stop)?;
    a.set_label(&mut go_on)?;
    a.nop()?;
    Ok(())
}

fn memstress_full_code(ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut outer = a.create_label();
    let mut page = a.create_label();
    let mut word = a.create_label();
    a.set_label(&mut outer)?;
    a.inc(r12)?;
    a.mov(r9, FILL_PASS_MUL)?;
    a.imul_2(r9, r12)?;
    a.mov(rax, rdi)?;
    a.set_label(&mut page)?;
    a.mov(rbx, rax)?;
    a.shr(rbx, 12)?;
    a.mov(r10, FILL_PAGE_MUL)?;
    a.imul_2(rbx, r10)?;
    a.add(rbx, r9)?;
    a.xor(r11d, r11d)?;
    a.set_label(&mut word)?;
    a.mov(r10, rbx)?;
    a.shr(r10, 31)?;
    a.xor(r10, rbx)?;
    a.imul_2(r10, rbp)?;
    a.mov(rdx, r10)?;
    a.shr(rdx, 29)?;
    a.xor(r10, rdx)?;
    a.mov(qword_ptr(rax + r11), r10)?;
    a.add(rbx, r8)?;
    a.add(r11, 8)?;
    a.cmp(r11, 4096)?;
    a.jb(word)?;
    a.add(rax, 4096)?;
    a.cmp(rax, rsi)?;
    a.jb(page)?;
    a.mov(qword_ptr(r15 + MAILBOX_COUNTER), r12)?;
    pass_limit(&mut a, r12)?;
    a.dec(rcx)?;
    a.jnz(outer)?;
    a.mov(rcx, qword_ptr(r15 + MAILBOX_MARKER_EVERY))?;
    a.mov(byte_ptr(r14), r13b)?;
    a.jmp(outer)?;
    a.assemble(ip)
}

fn diskstress_code(ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    let mut fill = a.create_label();
    let mut nowrap = a.create_label();
    let mut fail = a.create_label();
    a.set_label(&mut top)?;
    a.lea(rax, qword_ptr(r12 + 1))?;
    a.mov(rdx, DISK_MAGIC)?;
    a.mov(qword_ptr(r9), rdx)?;
    a.mov(qword_ptr(r9 + 8), rax)?;
    a.mov(qword_ptr(r9 + 16), rbx)?;
    a.mov(qword_ptr(r9 + 24), rbp)?;
    a.mov(r11d, 32u32)?;
    a.set_label(&mut fill)?;
    a.mov(rdx, r11)?;
    a.shl(rdx, 40)?;
    a.xor(rdx, rax)?;
    a.mov(qword_ptr(r9 + r11), rdx)?;
    a.add(r11, 8)?;
    a.cmp(r11, rbp)?;
    a.jb(fill)?;
    a.mov(dword_ptr(r8), BLOCK_OP_WRITE)?;
    a.mov(dword_ptr(r8 + 4), u32::MAX)?;
    a.mov(rdx, rdi)?;
    a.add(rdx, rbx)?;
    a.imul_2(rdx, rbp)?;
    a.shr(rdx, 9)?;
    a.mov(qword_ptr(r8 + 8), rdx)?;
    a.mov(rdx, rbp)?;
    a.shr(rdx, 9)?;
    a.mov(dword_ptr(r8 + 16), edx)?;
    a.mov(dword_ptr(r8 + 20), 0u32)?;
    a.mov(qword_ptr(r8 + 24), r9)?;
    a.mov(dword_ptr(r10), r8d)?;
    a.mov(edx, dword_ptr(r8 + 4))?;
    a.test(edx, edx)?;
    a.jnz(fail)?;
    a.mov(qword_ptr(r15 + MAILBOX_COUNTER), rax)?;
    a.mov(r12, rax)?;
    a.inc(rbx)?;
    a.cmp(rbx, rsi)?;
    a.jb(nowrap)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut nowrap)?;
    a.dec(rcx)?;
    a.jnz(top)?;
    a.mov(rcx, qword_ptr(r15 + MAILBOX_MARKER_EVERY))?;
    a.mov(byte_ptr(r14), r13b)?;
    a.jmp(top)?;
    a.set_label(&mut fail)?;
    a.mov(qword_ptr(r15 + MAILBOX_ERROR), rdx)?;
    a.mov(r11, CONTROL_MMIO)?;
    a.mov(dword_ptr(r11), edx)?;
    a.jmp(fail)?;
    a.assemble(ip)
}

fn idle_code(ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.hlt()?;
    a.jmp(top)?;
    a.assemble(ip)
}

/// Where and how a vCPU starts its program.
#[derive(Clone, Copy, Debug)]
pub struct ProgramStart {
    /// Entry point.
    pub rip: u64,
    /// Privilege level.
    pub ring: Ring,
    /// Registers with the program's arguments (rip/rsp/rflags are set by `boot`).
    pub regs: kvm_regs,
    /// Mailbox +0.
    pub tag: ProgramTag,
    /// Mailbox +24.
    pub marker_every: u64,
    /// Mailbox +32 (memstress pass limit, 0: none).
    pub pass_limit: u64,
}

/// The resolved region of a diskstress program (block count known once the disk is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRegion {
    /// First block.
    pub start_block: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Block size (bytes).
    pub block_size: u64,
}

/// Start parameters of `program` on vCPU `index`; `region` is needed for diskstress.
pub fn program_start(
    program: &GuestProgram,
    index: u32,
    region: Option<DiskRegion>,
) -> ProgramStart {
    let mut regs = kvm_regs {
        r13: u64::from(marker_byte(program, index).unwrap_or(0)),
        r14: SERIAL_MMIO,
        r15: mailbox_gpa(index),
        ..Default::default()
    };
    match program {
        GuestProgram::Memstress(m) => {
            regs.rdi = m.start_gpa();
            regs.rsi = m.end_gpa();
            regs.rcx = m.marker_every;
            let (rip, tag) = if m.full_content {
                regs.rbp = FILL_MIX;
                regs.r8 = FILL_GAMMA;
                regs.r12 = 0;
                (MEMSTRESS_FULL_GPA, ProgramTag::MemstressFull)
            } else {
                (MEMSTRESS_GPA, ProgramTag::Memstress)
            };
            ProgramStart {
                rip,
                ring: Ring::Three,
                regs,
                tag,
                marker_every: m.marker_every,
                pass_limit: m.passes.unwrap_or(0),
            }
        }
        GuestProgram::Diskstress(DiskstressConfig {
            disk, marker_every, ..
        }) => {
            let r = region.unwrap_or(DiskRegion {
                start_block: 0,
                blocks: 1,
                block_size: 512,
            });
            regs.r12 = 0;
            regs.rbx = 0;
            regs.rsi = r.blocks;
            regs.rdi = r.start_block;
            regs.rbp = r.block_size;
            regs.r8 = BLOCK_REQ_GPA + u64::from(index) * BLOCK_REQ_BYTES;
            regs.r9 = BLOCK_BUF_GPA + u64::from(index) * BLOCK_BUF_BYTES;
            regs.r10 = BLOCK_MMIO + (*disk as u64) * BLOCK_MMIO_STRIDE;
            regs.rcx = *marker_every;
            ProgramStart {
                rip: DISKSTRESS_GPA,
                ring: Ring::Three,
                regs,
                tag: ProgramTag::Diskstress,
                marker_every: *marker_every,
                pass_limit: 0,
            }
        }
        GuestProgram::Idle => ProgramStart {
            rip: IDLE_GPA,
            ring: Ring::Zero,
            regs,
            tag: ProgramTag::Idle,
            marker_every: 0,
            pass_limit: 0,
        },
    }
}

// Buffers of all vCPUs must fit in the system area.
const _: () = assert!(
    BLOCK_BUF_GPA + 32 * BLOCK_BUF_BYTES <= super::layout::SYSTEM_AREA_END && PAGE_SIZE == 4096
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_programs_assemble_within_a_page() {
        let images = assemble_all().unwrap();
        assert_eq!(images.images.len(), 4);
        for (gpa, code) in &images.images {
            assert!(!code.is_empty() && code.len() < 4096, "{gpa:#x}");
        }
    }

    #[test]
    fn fill_is_distinct_across_pages_and_passes() {
        let a = fill_word(fill_seed(1024, 5), 0);
        assert_ne!(a, fill_word(fill_seed(1024, 6), 0));
        assert_ne!(a, fill_word(fill_seed(1025, 5), 0));
        assert_ne!(a, fill_word(fill_seed(1024, 5), 1));
        // Not compressible to a pattern: neighbouring words differ in many bits.
        let d = (fill_word(fill_seed(7, 1), 0) ^ fill_word(fill_seed(7, 1), 1)).count_ones();
        assert!(d > 10, "{d}");
    }

    #[test]
    fn disk_words() {
        assert_eq!(disk_block_word(9, 3, 4096, 0), DISK_MAGIC);
        assert_eq!(disk_block_word(9, 3, 4096, 8), 9);
        assert_eq!(disk_block_word(9, 3, 4096, 16), 3);
        assert_eq!(disk_block_word(9, 3, 4096, 40), 9 ^ (40 << 40));
    }
}
