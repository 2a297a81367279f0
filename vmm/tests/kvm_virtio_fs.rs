//! virtio-fs end to end inside a real husk-vmm process, without Linux: a tiny hand-written KVM
//! guest drives husk-vmm's virtio-fs device (`--fs-socket`, `--fs-tag`) over virtio-mmio, puts a
//! FUSE_INIT request in its request queue and waits for the interrupt status bit; a real
//! virtiofsd answers straight into guest memory. The guest dumps what it saw to the serial port.
//!
//! Runs on any /dev/kvm (PVM included: MMIO exits and memory accesses work there). Skips with a
//! printed reason only when /dev/kvm or virtiofsd is absent; fails when both exist and it breaks.

mod common;

use std::time::Duration;

use common::{assemble, require_kvm, run_guest};
use husk_vmm::devices::virtio::fs::test_utils::{find_virtiofsd, Virtiofsd};

/// Serial output and the i8042 reset.
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

/// The device is the only virtio-mmio device (`--no-rng`): window 0xd0000000. Queues of 8:
/// hiprio rings at 0x40000/0x41000/0x42000, request rings at 0x44000/0x45000/0x46000; the
/// FUSE_INIT request at 0x48000 (104 bytes), its reply buffer at 0x49000 (256 bytes).
const FS_GUEST: &str = r#"
    mov $0x3f8, %dx
    mov $0xd0000000, %rbx
    mov $'F', %al
    out %al, %dx
    mov 0x8(%rbx), %eax        # device id
    call out4
    mov 0x100(%rbx), %eax      # config: first 4 bytes of the tag
    call out4
    mov 0x124(%rbx), %eax      # config: num_request_queues
    call out4
    movl $1, 0x70(%rbx)        # ACKNOWLEDGE
    movl $3, 0x70(%rbx)        # DRIVER
    movl $1, 0x24(%rbx)        # driver features, high half: VERSION_1
    movl $1, 0x20(%rbx)
    movl $0, 0x24(%rbx)
    movl $0, 0x20(%rbx)
    movl $0xb, 0x70(%rbx)      # FEATURES_OK
    movl $0, 0x30(%rbx)        # queue 0: hiprio
    movl $8, 0x38(%rbx)
    movl $0x40000, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $0x41000, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $0x42000, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    movl $1, 0x30(%rbx)        # queue 1: requests
    movl $8, 0x38(%rbx)
    movl $0x44000, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $0x45000, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $0x46000, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    movl $0xf, 0x70(%rbx)      # DRIVER_OK: the VMM hands the queues to virtiofsd
    mov 0x70(%rbx), %eax
    out %al, %dx
    movl $104, 0x48000         # fuse_in_header: len
    movl $26, 0x48004          #   opcode FUSE_INIT
    movq $0x1234, 0x48008      #   unique
    movl $1, 0x48020           #   pid
    movl $7, 0x48028           # fuse_init_in: major
    movl $38, 0x4802c          #   minor
    movl $0x20000, 0x48030     #   max_readahead
    movq $0x48000, 0x44000     # desc 0: the request, device-readable, NEXT -> 1
    movl $104, 0x44008
    movw $1, 0x4400c
    movw $1, 0x4400e
    movq $0x49000, 0x44010     # desc 1: the reply buffer, device-writable
    movl $256, 0x44018
    movw $2, 0x4401c
    movw $0, 0x4401e
    movw $0, 0x45004           # avail ring[0] = 0, then idx = 1
    movw $1, 0x45002
    movl $1, 0x50(%rbx)        # QueueNotify 1
    mov $300000, %ecx
1:  mov 0x60(%rbx), %eax       # InterruptStatus: wait for the used-ring bit
    test $1, %al
    jnz 2f
    dec %ecx
    jnz 1b
    mov $'T', %al
    out %al, %dx
    reset
2:  out %al, %dx
    movl $1, 0x64(%rbx)        # InterruptACK
    movzwl 0x46002, %eax       # used idx
    call out4
    mov 0x46004, %eax          # used[0].id
    call out4
    mov 0x46008, %eax          # used[0].len
    call out4
    mov $0x49000, %rsi         # fuse_out_header + major + minor
    mov $24, %ecx
3:  mov (%rsi), %al
    out %al, %dx
    inc %rsi
    dec %ecx
    jnz 3b
    movl $0, 0x70(%rbx)        # driver reset: the VMM stops the rings and resets virtiofsd
    mov 0x70(%rbx), %eax
    out %al, %dx
    mov $10, %al
    out %al, %dx
    reset
out4:
    mov $4, %ecx
4:  out %al, %dx
    shr $8, %eax
    dec %ecx
    jnz 4b
    ret
"#;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

#[test]
fn tiny_guest_gets_a_fuse_init_reply_from_virtiofsd_through_husk_vmm() {
    let test = "tiny_guest_gets_a_fuse_init_reply_from_virtiofsd_through_husk_vmm";
    if !require_kvm(test) {
        return;
    }
    let Some(bin) = find_virtiofsd() else {
        eprintln!("SKIP {test}: virtiofsd is not installed (cargo install virtiofsd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = dir.path().join("virtiofs.sock");
    let mut fsd = Virtiofsd::start(&bin, &shared, &sock);
    let guest = assemble(dir.path(), "fs", &format!("{PRELUDE}\n{FS_GUEST}\n"));
    let (run, c) = run_guest(
        dir.path(),
        &guest,
        &[
            "--no-rng",
            "--fs-socket",
            sock.to_str().unwrap(),
            "--fs-tag",
            "husk",
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(
        c.len(),
        1 + 12 + 1 + 1 + 12 + 24 + 1 + 1,
        "console: {c:02x?}"
    );
    assert_eq!(&c[..5], b"F\x1a\0\0\0", "device id 26");
    assert_eq!(&c[5..9], b"husk", "tag in the config space");
    assert_eq!(le32(&c[9..]), 1, "one request queue");
    assert_eq!(c[13], 0x0f, "DRIVER_OK accepted: virtiofsd took the queues");
    assert_eq!(
        c[14], 0x01,
        "used-ring interrupt raised from virtiofsd's call eventfd"
    );
    assert_eq!(le32(&c[15..]), 1, "used idx");
    assert_eq!(le32(&c[19..]), 0, "used id: the chain's head");
    let used_len = le32(&c[23..]);
    let reply = &c[27..51];
    assert_eq!(le32(reply), used_len, "fuse_out_header.len = used length");
    assert!(used_len >= 16 + 24, "fuse_init_out: {used_len} bytes");
    assert_eq!(le32(&reply[4..]), 0, "fuse_out_header.error");
    assert_eq!(&reply[8..16], &0x1234u64.to_le_bytes(), "unique");
    assert_eq!(le32(&reply[16..]), 7, "FUSE major");
    assert!(
        le32(&reply[20..]) >= 27,
        "FUSE minor {}",
        le32(&reply[20..])
    );
    assert_eq!(c[51], 0, "status after the driver reset");
    assert_eq!(c[52], b'\n');
    // husk-vmm exited: virtiofsd saw the hang-up and exits cleanly on its own.
    let st = fsd.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "virtiofsd: {st}");
    eprintln!("tiny virtio-fs guest start to exit: {:?}", run.elapsed);
}

#[test]
fn missing_fs_backend_fails_the_build_with_status_1() {
    let test = "missing_fs_backend_fails_the_build_with_status_1";
    if !require_kvm(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = assemble(dir.path(), "r", &format!("{PRELUDE}\nreset\n"));
    let sock = dir.path().join("nobody.sock");
    let (run, _) = run_guest(
        dir.path(),
        &guest,
        &["--fs-socket", sock.to_str().unwrap(), "--fs-tag", "husk"],
    );
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("nobody.sock"), "{}", run.stderr);
    let (run, _) = run_guest(dir.path(), &guest, &["--fs-socket", "/x", "--fs-tag", ""]);
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("tag"), "{}", run.stderr);
    let (run, _) = run_guest(dir.path(), &guest, &["--fs-socket", "/x"]);
    assert_eq!(run.code(), 2, "--fs-socket needs --fs-tag: {}", run.stderr);
}
