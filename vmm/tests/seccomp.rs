//! The seccomp filters of `husk-vmm` and `husk-vsock` are really on: every thread of a running
//! process reports `Seccomp: 2` (filter mode) in `/proc/<pid>/task/<tid>/status`, a forbidden
//! system call (the hidden `--debug-forbidden-syscall` hook makes one) ends the process with
//! status 5 and a message naming the call, and `--seccomp=off` turns all of it off.
//!
//! The husk-vmm tests need /dev/kvm (they fail, not skip, when it exists and something breaks);
//! the husk-vsock tests need nothing.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, husk_vmm, require_kvm, run_guest, run_vmm, ChildGuard};

/// Prints 'A', then sleeps in KVM's in-kernel `hlt` forever (interrupts off).
const SLEEPER: &str = ".code64\nmov $0x3f8, %dx\nmov $'A', %al\nout %al, %dx\n1: hlt\njmp 1b\n";

/// Prints "ok" and resets through the i8042.
const HELLO: &str =
    ".code64\nmov $0x3f8, %dx\nmov $'o', %al\nout %al, %dx\nmov $'k', %al\nout %al, %dx\nmov $0xfe, %al\nout %al, $0x64\n1: hlt\njmp 1b\n";

const EXIT_SECCOMP_VIOLATION: i32 = 5;

/// `(tid, Seccomp mode, thread name)` of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let tid: u32 = e.file_name().to_string_lossy().parse().unwrap();
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((tid, field("Seccomp:").parse().unwrap(), field("Name:")));
    }
    out.sort();
    out
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run the sleeper guest with 2 vCPUs, vsock and the API socket; return the threads' modes
/// once the guest printed.
fn vmm_threads(extra: &[&str]) -> Vec<(u32, u32, String)> {
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "sleeper", SLEEPER);
    let log = dir.path().join("console.log");
    let child = husk_vmm()
        .arg("--raw-image")
        .arg(&bin)
        .args(["--memory-mib", "16", "--vcpus", "2"])
        .arg("--console-log")
        .arg(&log)
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock.sock"))
        .arg("--api-socket")
        .arg(dir.path().join("api.sock"))
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    wait_for("guest output", Duration::from_secs(10), || {
        std::fs::read(&log).is_ok_and(|c| c.contains(&b'A'))
    });
    let threads = thread_seccomp(guard.0.id());
    assert_eq!(stop(&mut guard.0).code(), Some(0));
    threads
}

#[test]
fn every_husk_vmm_thread_runs_filtered_and_off_means_off() {
    if !require_kvm("every_husk_vmm_thread_runs_filtered_and_off_means_off") {
        return;
    }
    let on = vmm_threads(&[]);
    eprintln!("husk-vmm threads (tid, Seccomp, name): {on:?}");
    // The main thread, two vCPU threads, and on newer kernels KVM's own worker
    // (kvm-nx-lpage-recovery), which takes the process's filter too.
    assert!(on.iter().any(|t| t.2 == "husk-vmm"), "{on:?}");
    assert_eq!(
        on.iter().filter(|t| t.2.starts_with("vcpu")).count(),
        2,
        "{on:?}"
    );
    assert!(
        on.iter().all(|t| t.1 == 2),
        "every thread in filter mode: {on:?}"
    );
    let off = vmm_threads(&["--seccomp=off"]);
    assert!(off.iter().all(|t| t.1 == 0), "--seccomp=off: {off:?}");
}

#[test]
fn a_forbidden_syscall_in_husk_vmm_exits_5_and_names_it() {
    if !require_kvm("a_forbidden_syscall_in_husk_vmm_exits_5_and_names_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "hello", HELLO);
    let (run, console) = run_guest(dir.path(), &bin, &["--debug-forbidden-syscall"]);
    assert_eq!(run.code(), EXIT_SECCOMP_VIOLATION, "{}", run.stderr);
    assert!(
        run.stderr.contains("husk-vmm: seccomp: thread ")
            && run
                .stderr
                .contains("made the forbidden system call socket (41); exiting with status 5"),
        "{}",
        run.stderr
    );
    assert!(console.is_empty(), "the guest never ran: {console:?}");
    eprintln!("spawn to seccomp exit: {:?}", run.elapsed);
    // The same call is harmless without the filter: the guest runs to its reset.
    let (run, console) = run_guest(
        dir.path(),
        &bin,
        &["--debug-forbidden-syscall", "--seccomp=off"],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(console, b"ok");
    // A bad level is a usage error.
    let run = run_vmm(&["--seccomp=strict"], Duration::from_secs(10));
    assert_eq!(run.code(), 2, "{}", run.stderr);
}

fn husk_vsock(dir: &Path, extra: &[&str]) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_husk-vsock"))
        .arg("--socket")
        .arg(dir.join("vhost-vsock.sock"))
        .arg("--uds")
        .arg(dir.join("vsock.sock"))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

#[test]
fn every_husk_vsock_thread_runs_filtered_and_off_means_off() {
    for (extra, mode) in [(&[][..], 2), (&["--seccomp=off"][..], 0)] {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = husk_vsock(dir.path(), extra);
        let pid = guard.0.id();
        wait_for("the sockets", Duration::from_secs(10), || {
            dir.path().join("vhost-vsock.sock").exists()
        });
        // The filter follows the sockets: wait until the process waits for its frontend with
        // its main, signal and vring threads, all filtered or none.
        let mut threads = Vec::new();
        wait_for("the filter", Duration::from_secs(10), || {
            threads = thread_seccomp(pid);
            threads.len() == 3 && threads.iter().all(|t| t.1 == mode)
        });
        eprintln!("husk-vsock {extra:?} threads: {threads:?}");
        assert_eq!(stop(&mut guard.0).code(), Some(0));
    }
}

#[test]
fn a_forbidden_syscall_in_husk_vsock_exits_5_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut guard = husk_vsock(dir.path(), &["--debug-forbidden-syscall"]);
    let status = guard.0.wait().unwrap();
    let elapsed = start.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_SECCOMP_VIOLATION), "{stderr}");
    assert!(
        stderr.contains("husk-vsock: seccomp: thread ")
            && stderr.contains("made the forbidden system call socket (41)"),
        "{stderr}"
    );
    eprintln!("husk-vsock spawn to seccomp exit: {elapsed:?}");
    // Without the filter the call is harmless and the backend waits for its frontend.
    let dir = tempfile::tempdir().unwrap();
    let mut guard = husk_vsock(dir.path(), &["--debug-forbidden-syscall", "--seccomp=off"]);
    wait_for("the sockets", Duration::from_secs(10), || {
        dir.path().join("vhost-vsock.sock").exists()
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(guard.0.try_wait().unwrap().is_none(), "still serving");
    assert_eq!(stop(&mut guard.0).code(), Some(0));
}
