/* memcheck's entry and interrupt stubs (32-bit protected mode, paging off).
 *
 * A multiboot loader enters _start with EAX = the multiboot magic and EBX = the info
 * structure; the loader's GDT may be anywhere, so we load our own flat one first. The
 * stubs save what the C side may clobber: the timer's counts ticks, every other vector
 * either acknowledges the PIC (IRQs) or reports the fault and stops (exceptions). */

    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003          /* page-aligned modules, memory information */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    mov %eax, %esi
    mov %ebx, %edi
    lgdt gdt_descriptor
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    push %edi
    push %esi
    call memcheck_main
2:  cli
    hlt
    jmp 2b

/* Return from an interrupt without IRET. KVM's instruction emulator handles IRET in real
 * mode only, and a nested KVM without hardware support (kvm_pvm) emulates every privileged
 * instruction of a guest like this one: IRET there is an "emulation failure". At CPL 0 with
 * no stack switch, "popf; ret" does the same: the frame [eip, cs, eflags] is rearranged into
 * [eflags, eip] in place. An interrupt that comes between popf and ret only nests once. */
.macro RETURN_FROM_INTERRUPT
    push %eax
    mov 4(%esp), %eax                  /* eip */
    xchg %eax, 12(%esp)                /* eflags slot <- eip, eax <- eflags */
    mov %eax, 8(%esp)                  /* cs slot <- eflags */
    pop %eax
    add $4, %esp
    popf
    ret
.endm

/* IRQ0 (PIT): count, acknowledge, return; everything else stays untouched */
    .globl timer_stub
timer_stub:
    push %eax
    incl memcheck_ticks
    mov $0x20, %al
    outb %al, $0x20
    pop %eax
    RETURN_FROM_INTERRUPT

/* IRQ1..15: acknowledge (slave too for 8..15) and ignore */
    .globl irq_master_stub
irq_master_stub:
    push %eax
    mov $0x20, %al
    outb %al, $0x20
    pop %eax
    RETURN_FROM_INTERRUPT
    .globl irq_slave_stub
irq_slave_stub:
    push %eax
    mov $0x20, %al
    outb %al, $0xA0
    outb %al, $0x20
    pop %eax
    RETURN_FROM_INTERRUPT

/* exceptions: push a dummy error code where the CPU pushes none, then the vector */
.macro FAULT vector, has_error
    .globl fault_stub_\vector
fault_stub_\vector:
    .if \has_error == 0
    push $0
    .endif
    push $\vector
    jmp fault_common
.endm
FAULT 0,0
FAULT 1,0
FAULT 2,0
FAULT 3,0
FAULT 4,0
FAULT 5,0
FAULT 6,0
FAULT 7,0
FAULT 8,1
FAULT 9,0
FAULT 10,1
FAULT 11,1
FAULT 12,1
FAULT 13,1
FAULT 14,1
FAULT 15,0
FAULT 16,0
FAULT 17,1
FAULT 18,0
FAULT 19,0
FAULT 20,0
FAULT 21,1
FAULT 22,0
FAULT 23,0
FAULT 24,0
FAULT 25,0
FAULT 26,0
FAULT 27,0
FAULT 28,0
FAULT 29,1
FAULT 30,1
FAULT 31,0

fault_common:
    /* stack: vector, error code, eip, cs, eflags */
    mov %esp, %eax
    push %eax
    call memcheck_fault                /* never returns */
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .globl fault_stubs
    .align 4
fault_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long fault_stub_\n
    .endr

    .align 8
gdt:
    .quad 0x0000000000000000
    .quad 0x00CF9A000000FFFF            /* 0x08: code, flat 4 GiB, 32-bit */
    .quad 0x00CF92000000FFFF            /* 0x10: data, flat 4 GiB */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt

    .section .bss
    .align 16
    .space 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
