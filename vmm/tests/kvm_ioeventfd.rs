//! Queue notifications over ioeventfd: a tiny guest kicks virtio-rng's queue several times,
//! waiting for each used-ring interrupt, then sleeps; the API's `stats` says how the kicks
//! arrived. With ioeventfds (the default) every kick is counted on the fast path and none as an
//! MMIO exit; with `--no-ioeventfd` (the fallback, also taken when KVM refuses the
//! registration) every kick is an exit, and the device works the same.
//!
//! Runs on any /dev/kvm (PVM supports KVM_IOEVENTFD on MMIO addresses); fails, not skips, when
//! /dev/kvm exists and something breaks.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assemble, husk_vmm, require_kvm, ChildGuard};

const KICKS: u32 = 5;

/// virtio-rng at 0xd0000000: set up a 4-entry queue with one 16-byte buffer, then KICKS times:
/// offer the buffer, write QueueNotify, wait (bounded) for the interrupt status, acknowledge.
/// Finally print the used index and 'D', and sleep (interrupts off).
fn guest() -> String {
    format!(
        r#"
.code64
    mov $0xd0000000, %rbx
    movl $1, 0x70(%rbx)        # ACKNOWLEDGE
    movl $3, 0x70(%rbx)        # DRIVER
    movl $1, 0x24(%rbx)        # VERSION_1
    movl $1, 0x20(%rbx)
    movl $0, 0x24(%rbx)
    movl $0, 0x20(%rbx)
    movl $0xb, 0x70(%rbx)      # FEATURES_OK
    movl $0, 0x30(%rbx)        # queue 0, size 4
    movl $4, 0x38(%rbx)
    movl $0x40000, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $0x41000, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $0x42000, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)        # ready
    movl $0xf, 0x70(%rbx)      # DRIVER_OK
    movq $0x43000, 0x40000     # desc 0: 16 device-writable bytes
    movl $16, 0x40008
    movw $2, 0x4000c
    movw $0, 0x4000e
    movw $0, 0x41000           # avail flags
    xor %r8d, %r8d             # kicks done
1:  mov %r8d, %eax
    and $3, %eax
    movw $0, 0x41004(,%rax,2)  # avail ring[i % 4] = desc 0
    lea 1(%r8), %eax
    movw %ax, 0x41002          # avail idx = i + 1
    movl $0, 0x50(%rbx)        # QueueNotify(0)
    mov $1000000, %ecx
2:  mov 0x60(%rbx), %eax       # wait for the used-ring interrupt
    test %eax, %eax
    jnz 3f
    dec %ecx
    jnz 2b
3:  movl $1, 0x64(%rbx)        # acknowledge
    inc %r8d
    cmp ${KICKS}, %r8d
    jb 1b
    movzwl 0x42002, %eax       # used idx
    mov $0x3f8, %dx
    out %al, %dx
    mov $'D', %al
    out %al, %dx
4:  hlt
    jmp 4b
"#
    )
}

fn request(sock: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// Run the guest with `extra` flags; returns the rng device's entry of `stats`.
fn kicks(extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "kicks", &guest());
    let (log, api) = (dir.path().join("console.log"), dir.path().join("api.sock"));
    let child = husk_vmm()
        .arg("--raw-image")
        .arg(&bin)
        .args(["--memory-mib", "16"])
        .arg("--console-log")
        .arg(&log)
        .arg("--api-socket")
        .arg(&api)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let console = loop {
        let c = std::fs::read(&log).unwrap_or_default();
        if c.ends_with(b"D") {
            break c;
        }
        if let Some(st) = guard.0.try_wait().unwrap() {
            panic!("husk-vmm exited early ({st}), console {c:?}");
        }
        assert!(Instant::now() < deadline, "guest did not finish: {c:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(console, [KICKS as u8, b'D'], "used idx after {KICKS} kicks");
    let stats = request(&api, "stats");
    assert_eq!(stats["ok"], true, "{stats}");
    assert_eq!(stats["state"], "running", "{stats}");
    let rng = stats["virtio"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device_id"] == 4))
        .unwrap_or_else(|| panic!("no rng device in {stats}"))
        .clone();
    assert_eq!(rng["base"], "0xd0000000", "{stats}");
    assert_eq!(rng["queues"], 1, "{stats}");
    assert!(request(&api, "shutdown")["ok"] == true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after shutdown");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0));
    eprintln!("{extra:?}: {rng}");
    rng
}

#[test]
fn queue_notifications_take_the_ioeventfd_and_never_exit() {
    if !require_kvm("queue_notifications_take_the_ioeventfd_and_never_exit") {
        return;
    }
    let rng = kicks(&[]);
    assert_eq!(
        rng["ioeventfd_queues"], 1,
        "KVM_IOEVENTFD registered: {rng}"
    );
    assert_eq!(rng["notify_ioeventfd"], KICKS, "{rng}");
    assert_eq!(rng["notify_exit"], 0, "no QueueNotify exit: {rng}");
}

#[test]
fn without_ioeventfd_every_notification_exits_and_the_device_still_works() {
    if !require_kvm("without_ioeventfd_every_notification_exits_and_the_device_still_works") {
        return;
    }
    let rng = kicks(&["--no-ioeventfd"]);
    assert_eq!(rng["ioeventfd_queues"], 0, "{rng}");
    assert_eq!(rng["notify_ioeventfd"], 0, "{rng}");
    assert_eq!(rng["notify_exit"], KICKS, "{rng}");
}
