//! End to end through a real containerd 1.6: a private daemon (own root,
//! state and socket under a temporary directory) with the runtime
//! `io.containerd.husk.v2` pointing at the built shim, the offline busybox
//! image imported, and `ctr run --rm` checked for output and exit codes.
//! Skips only when containerd/ctr or QEMU are not installed.

use std::time::{Duration, Instant};

use husk_tests::containerd::{skip_reason, Containerd};
use husk_tests::{busybox_layout, e2e_config, processes_mentioning, target_dir};

const RUNTIME: &str = "io.containerd.husk.v2";

/// A private containerd whose shims find this build's
/// `containerd-shim-husk-v2` first in PATH and inherit the guest artifacts
/// and a private run root (`<dir>/run`).
fn start_containerd() -> Containerd {
    let b = Containerd::builder();
    let run = b.dir().join("run");
    let cfg = e2e_config(&run);
    b.shim(target_dir().join("containerd-shim-husk-v2"))
        .env("HUSK_RUN_DIR", run)
        .env("HUSK_KERNEL", cfg.kernel)
        .env("HUSK_INITRAMFS", cfg.initramfs)
        .runtime(&["--runtime", RUNTIME])
        .start()
}

#[test]
fn ctr_run_rm_output_and_exit_codes() {
    if let Some(why) = skip_reason(&["qemu-system-x86_64"]) {
        eprintln!("SKIP ctr_run_rm_output_and_exit_codes: {why}");
        return;
    }
    let layout = busybox_layout();
    let cd = start_containerd();
    cd.import_busybox(&layout);

    // stdin closed at once: the container's exit must not wait on it.
    let (code, out, err) = cd.run("c1", &["echo", "hello"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\n"),
        "stderr: {err}\ncontainerd log:\n{}",
        cd.log()
    );

    let (code, _, err) = cd.run("c2", &["sh", "-c", "exit 3"], b"\n");
    assert_eq!(code, 3, "stderr: {err}\ncontainerd log:\n{}", cd.log());

    // stdin reaches the container.
    let (code, out, _) = cd.run("c3", &["cat"], b"line one\nline two\n");
    assert_eq!((code, out.as_str()), (0, "line one\nline two\n"));

    // A detached container: exec, pause/resume, metrics, kill, delete.
    let out = cd.run_detached("d1", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let exec = |id: &str, args: &[&str]| cd.exec("d1", id, args, b"\n");
    let (code, out, err) = exec("e1", &["echo", "hi"]);
    assert_eq!((code, out.as_str()), (0, "hi\n"), "exec: {err}");
    assert_eq!(exec("e2", &["sh", "-c", "exit 5"]).0, 5);
    assert!(cd.ctr(&["task", "pause", "d1"]).status.success());
    assert_eq!(cd.task_status("d1"), "PAUSED");
    assert!(cd.ctr(&["task", "resume", "d1"]).status.success());
    assert_eq!(cd.task_status("d1"), "RUNNING");
    let m = cd.ctr(&["task", "metrics", "d1"]);
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(
        m.contains("pids.current") && m.contains("memory.usage"),
        "{m}"
    );
    assert!(cd.ctr(&["task", "kill", "-s", "9", "d1"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while cd.task_status("d1") != "STOPPED" {
        assert!(Instant::now() < deadline, "d1 did not stop after SIGKILL");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cd.ctr(&["task", "rm", "d1"]).status.success());
    assert!(cd.ctr(&["containers", "rm", "d1"]).status.success());

    // Crash safety: SIGKILL the shim of a running container; the VM dies
    // with it (PDEATHSIG) and containerd's `delete` cleans up the rest.
    let out = cd.run_detached("k1", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let shims: Vec<_> = processes_mentioning(&cd.dir().display().to_string())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2") && cmd.contains("-id k1 "))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let shim = nix::unistd::Pid::from_raw(shims[0].0 as i32);
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cd.task_status("k1") == "RUNNING" {
        assert!(
            Instant::now() < deadline,
            "k1 still running after its shim died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cd.ctr(&["task", "rm", "k1"]);
    assert!(cd.ctr(&["containers", "rm", "k1"]).status.success());

    let left = cd.wait_for_no_processes();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let run = cd.dir().join("run");
    let entries: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "left in {run:?}: {entries:?}");
    cd.stop_and_check();
}
