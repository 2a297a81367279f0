//! Leak checks over many cycles: sandboxes started and stopped, containers
//! created and deleted. They count this process's open fds, so they live in
//! a test binary of their own and run one at a time.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use husk_runtime::host::HostProbe;
use husk_runtime::{Sandbox, Stdio};
use husk_tests::{alive, assert_nothing_left, e2e_config, open_fds, qemu_or_skip, Pod};

/// Serializes the tests of this binary (fd counts are process-wide).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn twenty_start_stop_cycles_leave_nothing_behind() {
    let _serial = serial();
    if qemu_or_skip("twenty_start_stop_cycles_leave_nothing_behind").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let cfg = e2e_config(run.path());
    let host = HostProbe::detect();
    // Warm up once so lazily opened process-wide fds are counted in the base.
    Sandbox::start(&cfg, &host, "warm").unwrap().stop().unwrap();
    let fds_before = open_fds();
    let t0 = Instant::now();
    for i in 0..20 {
        let sb = Sandbox::start(&cfg, &host, &format!("cycle{i}")).unwrap();
        let pids = sb.pids();
        sb.version().unwrap();
        sb.stop().unwrap();
        for p in pids {
            assert!(!alive(p), "cycle {i}: pid {p} survived stop");
        }
        assert_nothing_left(run.path());
    }
    eprintln!("20 cycles in {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(
        open_fds(),
        fds_before,
        "file descriptors leaked in the runtime"
    );
}

/// Cycles of the leak test (`HUSK_CYCLES`, default 100).
fn cycles() -> usize {
    std::env::var("HUSK_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

#[test]
fn create_start_kill_delete_cycles_leave_nothing() {
    let _serial = serial();
    let Some(pod) = Pod::new("create_start_kill_delete_cycles_leave_nothing") else {
        return;
    };
    let sb = pod.sb();
    let b = pod.bundle("cyc", &["sleep", "1000"], |_| {});
    let cycle = |id: &str| {
        sb.create_container(id, &b, Stdio::default()).unwrap();
        sb.start_container(id).unwrap();
        sb.kill(id, "", 9, false).unwrap();
        assert_eq!(sb.wait(id, "").unwrap(), 137, "{id}");
        sb.delete_container(id).unwrap();
    };
    // One warm-up cycle so lazily opened process-wide fds are in the base.
    cycle("warmup");
    let fds = husk_tests::open_fds();
    let t0 = std::time::Instant::now();
    let n = cycles();
    for i in 0..n {
        cycle(&format!("cyc{i}"));
    }
    eprintln!(
        "{n} container cycles in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    pod.assert_no_containers_left();
    // ttrpc closes a dropped client's socket on its own thread: give the
    // last ones a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while husk_tests::open_fds() != fds && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(husk_tests::open_fds(), fds, "runtime leaked fds");
    pod.stop();
}
