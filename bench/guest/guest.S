/*
 * A tiny multiboot (v1) guest for QEMU's `-kernel`, running the same workloads as vmgate's
 * micro-VM, so the migration benchmark moves the same memory contents with both tools.
 *
 * Built by bench/guest/build with the workload baked in through --defsym:
 *   MODE=0  idle: ring 0, interrupts off, `hlt` forever.
 *   MODE=1  memstress over [START, END): endless passes; each pass increments byte 0 of every
 *           4 KiB page of the range in address order, then the 64-bit pass counter `passes`.
 *   MODE=2  fill [START, END) with xorshift64* words (incompressible), write 'F' to the debug
 *           console, then halt forever.
 *
 * QEMU starts a multiboot kernel in 32-bit protected mode without paging. The guest switches to
 * long mode, as vmgate's micro-VM runs: identity map of the low 4 GiB with 2 MiB user pages, GDT
 * with ring-0 and ring-3 64-bit segments and a TSS (whose I/O bitmap opens the debug console
 * port to ring 3), IDT whose 32 exception vectors halt the vCPU. It then enters ring 3 through
 * `sysexit`. Under kvm_pvm, ring-0 guest code is emulated instruction by instruction (KVM's
 * emulator cannot `iret` to ring 3, but it can `sysexit`); ring-3 code runs natively, as
 * vmgate's own guest programs do. Ring 3 cannot `hlt`: it executes it anyway, and the
 * resulting #GP lands in the ring-0 halt handler.
 *
 * Debug console (port 0xe9, QEMU's -debugcon): 'S' once long mode is set up (idle halts right
 * after), 'U' when the workload starts in ring 3, 'F' when the fill is complete.
 */

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0
        .set DEBUGCON, 0xe9
        .set SEL_CODE0, 0x08            /* sysexit: CS = SYSENTER_CS + 32, SS = + 40 */
        .set SEL_DATA0, 0x10
        .set SEL_CODE3, 0x28 | 3
        .set SEL_DATA3, 0x30 | 3
        .set SEL_TSS, 0x38
        .set MSR_EFER, 0xC0000080
        .set MSR_SYSENTER_CS, 0x174
        .set PAGE, 4096
        .set IOMAP_BYTES, DEBUGCON / 8 + 2    /* ports 0..DEBUGCON, then the 0xff end byte */
        .set TSS_LIMIT, 104 + IOMAP_BYTES - 1

        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        cli
        mov     $stack0_top, %esp
        lgdt    gdt_desc
        mov     $SEL_DATA0, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs

        /* Identity map of 0..4 GiB: PML4[0] -> PDPT[0..3] -> 4 page directories of 2 MiB
           pages, all present, writable and user. */
        mov     $page_dirs, %edi
        xor     %eax, %eax
        mov     $2048, %ecx
1:      mov     %eax, %edx
        or      $0x87, %edx
        mov     %edx, (%edi)
        movl    $0, 4(%edi)
        add     $8, %edi
        add     $0x200000, %eax
        loop    1b
        mov     $pdpt, %edi
        mov     $page_dirs + 7, %eax
        mov     $4, %ecx
2:      mov     %eax, (%edi)
        movl    $0, 4(%edi)
        add     $8, %edi
        add     $PAGE, %eax
        loop    2b
        movl    $pdpt + 7, pml4
        movl    $0, pml4 + 4

        mov     %cr4, %eax
        or      $0x20, %eax               /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $0x100, %eax              /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax         /* PG */
        mov     %eax, %cr0
        ljmp    $SEL_CODE0, $long_mode

        .code64
long_mode:
        /* TSS descriptor (16 bytes): base = tss, limit = 103, type 0x89. */
        mov     $tss, %eax
        mov     %ax, gdt + SEL_TSS + 2
        shr     $16, %eax
        mov     %al, gdt + SEL_TSS + 4
        mov     %ah, gdt + SEL_TSS + 7
        movq    $stack0_top, tss + 4      /* rsp0 */
        /* I/O permission bitmap right after the TSS: ring 3 may use the debug console port
           only (with IOPL 3 instead, ring-3 port writes did not arrive under kvm_pvm). */
        movw    $104, tss + 102
        mov     $tss + 104, %edi
        mov     $IOMAP_BYTES, %ecx
        mov     $0xff, %al
        rep stosb
        andb    $~(1 << (DEBUGCON % 8)), tss + 104 + DEBUGCON / 8
        mov     $SEL_TSS, %ax
        ltr     %ax

        /* IDT: vectors 0..31 are ring-0 interrupt gates to `halt`. */
        mov     $idt, %edi
        mov     $32, %ecx
3:      mov     $halt, %eax
        mov     %ax, (%rdi)
        movw    $SEL_CODE0, 2(%rdi)
        movw    $0x8E00, 4(%rdi)
        shr     $16, %eax
        mov     %ax, 6(%rdi)
        movq    $0, 8(%rdi)
        add     $16, %rdi
        loop    3b
        lidt    idt_desc

        mov     $'S', %al
        out     %al, $DEBUGCON

.if MODE == 0
        jmp     halt
.else
        /* Ring 3 through sysexit. */
        mov     $MSR_SYSENTER_CS, %ecx
        mov     $SEL_CODE0, %eax
        xor     %edx, %edx
        wrmsr
        mov     $user, %edx
        mov     $stack3_top, %ecx
        sysexitq
.endif

/* Ring 0: halt forever with interrupts off (also the handler of every exception). */
halt:
        cli
        hlt
        jmp     halt

user:
        mov     $'U', %al
        out     %al, $DEBUGCON
.if MODE == 1
        mov     $START, %esi
        mov     $END, %edi
pass:   mov     %rsi, %rax
4:      incb    (%rax)
        add     $PAGE, %rax
        cmp     %rdi, %rax
        jb      4b
        incq    passes
        jmp     pass
.elseif MODE == 2
        /* xorshift64* (12, 25, 27; multiplier 0x2545F4914F6CDD1D), one output per word. */
        mov     $START, %edi
        mov     $END, %esi
        movabs  $0x9E3779B97F4A7C15, %rax
        movabs  $0x2545F4914F6CDD1D, %r8
5:      mov     %rax, %rdx
        shr     $12, %rdx
        xor     %rdx, %rax
        mov     %rax, %rdx
        shl     $25, %rdx
        xor     %rdx, %rax
        mov     %rax, %rdx
        shr     $27, %rdx
        xor     %rdx, %rax
        mov     %rax, %rdx
        imul    %r8, %rdx
        mov     %rdx, (%rdi)
        add     $8, %rdi
        cmp     %rsi, %rdi
        jb      5b
        mov     $'F', %al
        out     %al, $DEBUGCON
        hlt                               /* #GP in ring 3: the handler halts */
.endif
6:      pause
        jmp     6b

        .data
        .balign 8
gdt:    .quad   0
        .quad   0x00AF9A000000FFFF        /* 0x08 ring-0 code, 64-bit */
        .quad   0x00CF92000000FFFF        /* 0x10 ring-0 data */
        .quad   0                         /* 0x18, 0x20: unused (sysexit's 32-bit pair) */
        .quad   0
        .quad   0x00AFFA000000FFFF        /* 0x28 ring-3 code, 64-bit */
        .quad   0x00CFF2000000FFFF        /* 0x30 ring-3 data */
        .quad   0x0000890000000000 + TSS_LIMIT /* 0x38 TSS (16 bytes), base patched at boot */
        .quad   0
gdt_end:
        .balign 4
        .word   0
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt, 0
        .balign 4
        .word   0
idt_desc:
        .word   32 * 16 - 1
        .quad   idt
        .balign 8
        .globl  passes
passes: .quad   0

        .bss
        .balign PAGE
pml4:   .skip   PAGE
pdpt:   .skip   PAGE
page_dirs:
        .skip   4 * PAGE
idt:    .skip   32 * 16
tss:    .skip   104 + IOMAP_BYTES
        .balign 16
        .skip   PAGE
stack0_top:
        .skip   PAGE
stack3_top:
