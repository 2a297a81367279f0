//! KVM mechanism tests: husk-vmm runs tiny hand-written guests (GNU `as` source below, loaded at
//! 0x10000 and entered in long mode set up by the VMM, or in real mode) and we check what reaches
//! the console log and how the VMM ends.
//!
//! These run on any /dev/kvm, PVM included (port I/O, MMIO, exceptions, the in-kernel
//! irqchip/PIT and LAPIC timer all work there). They fail, not skip, when /dev/kvm exists and
//! something breaks; they skip with a printed reason only when /dev/kvm is absent.

mod common;

use std::time::Duration;

use common::{assemble, kvm_host, require_kvm, run_guest};

/// Serial output and the i8042 reset, shared by the guests below.
const PRELUDE: &str = r#"
.code64
.macro putc c
    mov $\c, %al
    mov $0x3f8, %dx
    out %al, %dx
.endm
.macro reset
    mov $0xfe, %al
    out %al, $0x64
9:  hlt
    jmp 9b
.endm
"#;

fn guest(name: &str, body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), name, &format!("{PRELUDE}\n{body}\n"));
    (dir, bin)
}

#[test]
fn serial_output_reaches_the_log_and_i8042_reset_exits_0() {
    if !require_kvm("serial_output_reaches_the_log_and_i8042_reset_exits_0") {
        return;
    }
    let (dir, bin) = guest("hello", "putc 'H'\nputc 'i'\nputc 10\nreset");
    let (run, console) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(console, b"Hi\n");
    assert!(run.stderr.contains("i8042"), "{}", run.stderr);
    eprintln!("tiny guest start to exit: {:?}", run.elapsed);
}

#[test]
fn real_mode_guest_and_halt_without_irqchip_exits_0() {
    if !require_kvm("real_mode_guest_and_halt_without_irqchip_exits_0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src =
        ".code16\nmov $0x3f8, %dx\nmov $'R', %al\nout %al, %dx\nmov $10, %al\nout %al, %dx\nhlt\n";
    let bin = assemble(dir.path(), "real", src);
    let (run, console) = run_guest(
        dir.path(),
        &bin,
        &[
            "--raw-mode",
            "real",
            "--raw-load-addr",
            "0x7c00",
            "--no-irqchip",
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(console, b"R\n");
    assert!(run.stderr.contains("guest halted"), "{}", run.stderr);
}

#[test]
fn triple_fault_is_a_guest_shutdown() {
    if !require_kvm("triple_fault_is_a_guest_shutdown") {
        return;
    }
    // The boot IDT is empty: #UD cannot be delivered, #DF neither: triple fault, as Linux's
    // `reboot=t` does.
    let (dir, bin) = guest("triple", "putc 'X'\nud2");
    let (run, console) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(console, b"X");
    assert!(run.stderr.contains("triple fault"), "{}", run.stderr);
}

#[test]
fn instruction_fetch_from_mmio_is_an_internal_error_with_exit_3() {
    if !require_kvm("instruction_fetch_from_mmio_is_an_internal_error_with_exit_3") {
        return;
    }
    let (dir, bin) = guest("mmiofetch", "mov $0xd0100000, %rax\njmp *%rax");
    let (run, _) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 3, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure)"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("RIP 0xd0100000"), "{}", run.stderr);
}

/// `int3` in guest ring 0 reaches the guest's #BP handler with the address after it pushed,
/// and `iretq` resumes there. On hardware KVM the CPU does it; on PVM, KVM's instruction
/// emulator refuses `int3` and husk-vmm completes it (RIP + 1, #BP injected), which is what lets
/// Linux boot there.
#[test]
fn int3_in_ring0_reaches_the_guest_breakpoint_handler() {
    if !require_kvm("int3_in_ring0_reaches_the_guest_breakpoint_handler") {
        return;
    }
    let body = format!(
        r#"
{idt}
    putc 'B'
    int3
after_int3:
    putc 'A'
    putc 10
    reset
bp_handler:
    putc 'T'
    mov (%rsp), %rax           # the pushed RIP: the instruction after int3
    lea after_int3(%rip), %rbx
    cmp %rax, %rbx
    jne 1f
    putc '='
1:  iretq
.align 8
idtr:
    .word 0xfff
    .quad 0x30000
"#,
        idt = idt_setup(3, "bp_handler"),
    );
    let (dir, bin) = guest("int3", &body);
    let (run, console) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(
        String::from_utf8_lossy(&console),
        "BT=A\n",
        "on a {:?} host: {}",
        kvm_host(),
        run.stderr
    );
}

/// The guest drives virtio-rng at 0xd0000000 through the whole virtio-mmio sequence and dumps
/// what it saw to the serial port as raw bytes. After the QueueNotify write it polls the
/// interrupt status (bounded), as a driver waits for the interrupt: with the ioeventfd fast path
/// the write returns before the device has run.
const RNG_GUEST: &str = r#"
    mov $0x3f8, %dx
    mov $0xd0000000, %rbx
    mov $'M', %al
    out %al, %dx
    mov 0x0(%rbx), %eax        # magic
    call out4
    mov 0x4(%rbx), %eax        # version
    call out4
    mov 0x8(%rbx), %eax        # device id
    call out4
    movl $1, 0x70(%rbx)        # ACKNOWLEDGE
    movl $3, 0x70(%rbx)        # DRIVER
    movl $1, 0x24(%rbx)        # driver features, high half
    movl $1, 0x20(%rbx)        #   VERSION_1
    movl $0, 0x24(%rbx)
    movl $0, 0x20(%rbx)
    movl $0xb, 0x70(%rbx)      # FEATURES_OK
    mov 0x70(%rbx), %eax
    out %al, %dx
    movl $0, 0x30(%rbx)        # queue 0
    movl $4, 0x38(%rbx)        # size 4
    movl $0x40000, 0x80(%rbx)  # descriptors
    movl $0, 0x84(%rbx)
    movl $0x41000, 0x90(%rbx)  # avail
    movl $0, 0x94(%rbx)
    movl $0x42000, 0xa0(%rbx)  # used
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)        # ready
    movl $0xf, 0x70(%rbx)      # DRIVER_OK
    mov 0x70(%rbx), %eax
    out %al, %dx
    movq $0x43000, 0x40000     # desc 0: 16 device-writable bytes at 0x43000
    movl $16, 0x40008
    movw $2, 0x4000c
    movw $0, 0x4000e
    movw $0, 0x41000           # avail: flags 0, ring[0] = 0, idx = 1
    movw $0, 0x41004
    movw $1, 0x41002
    movl $0, 0x50(%rbx)        # notify queue 0
    mov $1000000, %ecx         # with an ioeventfd the device runs on the VMM's event loop
3:  mov 0x60(%rbx), %eax       # after the write returned: wait for its interrupt status bit
    test %eax, %eax
    jnz 4f
    dec %ecx
    jnz 3b
4:  movzwl 0x42002, %eax       # used idx
    call out4
    mov 0x42008, %eax          # used len
    call out4
    mov $0x43000, %rsi
    mov $16, %ecx
1:  mov (%rsi), %al
    out %al, %dx
    inc %rsi
    dec %ecx
    jnz 1b
    mov 0x60(%rbx), %eax       # interrupt status
    out %al, %dx
    movl $1, 0x64(%rbx)        # ack
    mov 0x60(%rbx), %eax
    out %al, %dx
    mov $10, %al
    out %al, %dx
    reset
out4:
    mov $4, %ecx
2:  out %al, %dx
    shr $8, %eax
    dec %ecx
    jnz 2b
    ret
"#;

#[test]
fn guest_drives_virtio_rng_over_mmio_and_gets_random_bytes() {
    if !require_kvm("guest_drives_virtio_rng_over_mmio_and_gets_random_bytes") {
        return;
    }
    let (dir, bin) = guest("rng", RNG_GUEST);
    let (run, c) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(c.len(), 1 + 12 + 2 + 8 + 16 + 2 + 1, "console: {c:02x?}");
    assert_eq!(
        &c[..13],
        b"Mvirt\x02\0\0\0\x04\0\0\0",
        "magic, version 2, device id 4"
    );
    assert_eq!(c[13], 0x0b, "FEATURES_OK kept");
    assert_eq!(c[14], 0x0f, "DRIVER_OK accepted");
    assert_eq!(
        &c[15..23],
        &[1, 0, 0, 0, 16, 0, 0, 0],
        "used idx 1, 16 bytes written"
    );
    let random = &c[23..39];
    assert!(
        random.iter().any(|b| *b != 0),
        "random bytes: {random:02x?}"
    );
    assert_eq!(&c[39..], &[1, 0, b'\n'], "used-ring interrupt, then acked");
}

/// IDT entry `vector` -> `handler`, IDT at 0x30000; then `lidt`.
fn idt_setup(vector: u32, handler: &str) -> String {
    format!(
        r#"
    lea {handler}(%rip), %rax
    mov $(0x30000 + {vector} * 16), %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idtr(%rip)
"#
    )
}

const WAIT_3_TICKS: &str = r#"
    xor %r8d, %r8d
    sti
1:  hlt
    cmp $3, %r8d
    jb 1b
    cli
    putc 'D'
    putc 10
    reset
.align 8
idtr:
    .word 0xfff
    .quad 0x30000
"#;

#[test]
fn pit_interrupts_arrive_through_the_in_kernel_pic() {
    if !require_kvm("pit_interrupts_arrive_through_the_in_kernel_pic") {
        return;
    }
    let body = format!(
        r#"
{idt}
    mov $0x11, %al             # PIC master: ICW1..4, vectors 0x20.., only IRQ0 unmasked
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xfe, %al
    out %al, $0x21
    mov $0xff, %al             # slave: all masked
    out %al, $0xa1
    mov $0x34, %al             # PIT channel 0, mode 2, divisor 11932 (100 Hz)
    out %al, $0x43
    mov $0x9c, %al
    out %al, $0x40
    mov $0x2e, %al
    out %al, $0x40
{wait}
tick:
    push %rax
    push %rdx
    inc %r8d
    putc 'T'
    mov $0x20, %al             # EOI
    out %al, $0x20
    pop %rdx
    pop %rax
    iretq
"#,
        idt = idt_setup(0x20, "tick"),
        wait = WAIT_3_TICKS
    );
    let (dir, bin) = guest("pit", &body);
    let (run, console) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let s = String::from_utf8_lossy(&console);
    assert!(s.starts_with("TTT") && s.ends_with("D\n"), "console: {s:?}");
}

#[test]
fn lapic_timer_interrupts_arrive() {
    if !require_kvm("lapic_timer_interrupts_arrive") {
        return;
    }
    let body = format!(
        r#"
{idt}
    mov $0xff, %al             # mask the PICs: only the LAPIC timer
    out %al, $0x21
    out %al, $0xa1
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)    # SVR: APIC on, spurious vector 0xff
    movl $0xb, 0x3e0(%rbx)     # divide by 1
    movl $0x20040, 0x320(%rbx) # LVT timer: periodic, vector 0x40
    movl $1000000, 0x380(%rbx) # initial count
{wait}
apic_tick:
    push %rax
    push %rdx
    inc %r8d
    putc 'L'
    movl $0, 0xb0(%rbx)        # EOI
    pop %rdx
    pop %rax
    iretq
"#,
        idt = idt_setup(0x40, "apic_tick"),
        wait = WAIT_3_TICKS
    );
    let (dir, bin) = guest("lapic", &body);
    let (run, console) = run_guest(dir.path(), &bin, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let s = String::from_utf8_lossy(&console);
    assert!(s.starts_with("LLL") && s.ends_with("D\n"), "console: {s:?}");
}

#[test]
fn missing_raw_image_is_a_setup_error_with_exit_1() {
    // A bad path is a clean set-up error (exit 1) naming the file; no KVM needed to get there.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.bin");
    let run = common::run_vmm(
        &[
            "--raw-image",
            missing.to_str().unwrap(),
            "--memory-mib",
            "16",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("nope.bin"), "{}", run.stderr);
}
