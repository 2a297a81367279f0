//! Bad input ends in a clear error within a deadline and leaves nothing
//! behind: missing or corrupt kernel, wrong initramfs, an agent that never
//! listens, a guest that panics, a vsock backend that dies.

use std::time::{Duration, Instant};

use husk_runtime::host::HostProbe;
use husk_runtime::{Error, Sandbox};
use husk_tests::{alive, assert_nothing_left, e2e_config, qemu_or_skip, script_initramfs};

/// Starts a sandbox that must fail; returns the error and how long it took.
fn failing_start(cfg: &husk_runtime::RuntimeConfig, id: &str) -> (Error, Duration) {
    let t0 = Instant::now();
    let e = Sandbox::start(cfg, &HostProbe::detect(), id).expect_err("start must fail");
    let took = t0.elapsed();
    assert_nothing_left(&cfg.run_root);
    (e, took)
}

#[test]
fn missing_kernel() {
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.kernel = run.path().join("no-such-vmlinux");
    let (e, took) = failing_start(&cfg, "nokernel");
    let msg = e.to_string();
    assert!(
        msg.contains("guest kernel") && msg.contains("guest-kernel/build.sh"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn corrupt_kernel() {
    if qemu_or_skip("corrupt_kernel").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    let bad = run.path().join("garbage-vmlinux");
    std::fs::write(&bad, vec![0x5au8; 1 << 20]).unwrap();
    cfg.kernel = bad.clone();
    let run_root = run.path().join("run");
    cfg.run_root = run_root;
    let (e, took) = failing_start(&cfg, "badkernel");
    let msg = e.to_string();
    assert!(matches!(e, Error::ProcessExited { .. }), "{msg}");
    assert!(msg.contains("QEMU exited"), "{msg}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn wrong_initramfs_panics_the_guest_and_says_so() {
    if qemu_or_skip("wrong_initramfs_panics_the_guest_and_says_so").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    let bad = run.path().join("garbage.cpio");
    std::fs::write(&bad, b"this is not a cpio archive".repeat(1000)).unwrap();
    cfg.initramfs = bad;
    cfg.run_root = run.path().join("run");
    let (e, took) = failing_start(&cfg, "badinitrd");
    let msg = e.to_string();
    assert!(matches!(e, Error::ProcessExited { .. }), "{msg}");
    assert!(msg.contains("Kernel panic"), "{msg}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn guest_that_panics() {
    if qemu_or_skip("guest_that_panics").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.initramfs = script_initramfs(run.path(), "exits", "echo init giving up; exit 3");
    cfg.run_root = run.path().join("run");
    let (e, took) = failing_start(&cfg, "panics");
    let msg = e.to_string();
    assert!(matches!(e, Error::ProcessExited { .. }), "{msg}");
    assert!(msg.contains("Attempted to kill init"), "{msg}");
    assert!(msg.contains("init giving up"), "{msg}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn agent_that_never_listens_times_out() {
    if qemu_or_skip("agent_that_never_listens_times_out").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.initramfs = script_initramfs(run.path(), "mute", "echo mute agent; exec sleep 3600");
    cfg.run_root = run.path().join("run");
    cfg.boot_timeout = Duration::from_secs(6);
    let (e, took) = failing_start(&cfg, "mute");
    let msg = e.to_string();
    assert!(matches!(e, Error::AgentTimeout { .. }), "{msg}");
    assert!(msg.contains("mute agent"), "console tail missing: {msg}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

#[test]
fn vsock_backend_that_fails_to_start() {
    if qemu_or_skip("vsock_backend_that_fails_to_start").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.vsock_backend = Some("/bin/false".into());
    let (e, took) = failing_start(&cfg, "nobackend");
    let msg = e.to_string();
    assert!(
        msg.contains("vsock backend exited unexpectedly (exit code 1)"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn vsock_backend_that_dies_under_a_running_sandbox() {
    if qemu_or_skip("vsock_backend_that_dies_under_a_running_sandbox").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let cfg = e2e_config(run.path());
    let mut sb = Sandbox::start(&cfg, &HostProbe::detect(), "backenddies").unwrap();
    let pids = sb.pids();
    let backend = pids[1];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    // The agent connection is gone: the call errors out, it does not hang.
    assert!(sb.version().is_err());
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
    let exit = sb
        .wait_exit(Duration::from_secs(5))
        .unwrap()
        .expect("the sandbox notices the backend is gone");
    assert!(exit.reason.contains("vsock backend exited"), "{exit:?}");
    drop(sb);
    for p in pids {
        assert!(!alive(p), "pid {p} survived");
    }
    assert_nothing_left(run.path());
}
