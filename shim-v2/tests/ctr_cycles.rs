//! Many `ctr run --rm` in a row through a private containerd 1.6 with
//! `io.containerd.husk.v2` leave nothing behind: no process (shim, QEMU,
//! husk-vsock, virtiofsd), no mount, no shim socket, no husk state
//! directory, no containerd task or container, and containerd's open fds
//! are back to what they were. `HUSK_CYCLES` sets the count: default 50
//! (about 1 min here; TESTING.md has the 200-run figure, measured by hand
//! with `HUSK_CYCLES=200`). In a test binary of its own so the timing
//! printed is not shared with other VM tests. Skips only when containerd/ctr or QEMU are not
//! installed.

use std::time::{Duration, Instant};

use husk_tests::containerd::{skip_reason, Containerd};
use husk_tests::mounts_under;

mod common;

/// Cycles to run (`HUSK_CYCLES`, default 50).
fn cycles() -> usize {
    std::env::var("HUSK_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

#[test]
fn ctr_run_rm_cycles_leave_nothing_behind() {
    if let Some(why) = skip_reason(&["qemu-system-x86_64"]) {
        eprintln!("SKIP ctr_run_rm_cycles_leave_nothing_behind: {why}");
        return;
    }
    let cd = common::containerd_with_busybox();
    let run = cd.dir().join("run");

    let cycle = |id: &str| {
        let (code, out, err) = cd.run(id, &["echo", id], b"");
        assert_eq!(
            (code, out.trim()),
            (0, id),
            "{id}: stderr: {err}\ncontainerd log tail:\n{}",
            tail(&cd.log(), 40)
        );
    };
    // A warm-up run, so what containerd opens once is in the base.
    cycle("warm");
    let fds_before = settled_fds(&cd, None);
    let n = cycles();
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("cyc{i}");
        let t = Instant::now();
        cycle(&id);
        times.push(t.elapsed());
    }
    times.sort();
    let total: Duration = times.iter().sum();
    if n > 0 {
        eprintln!(
            "{n} x `ctr run --rm`: {:.1} s; per run median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            total.as_secs_f64(),
            times[n / 2].as_secs_f64() * 1e3,
            times[n * 9 / 10].as_secs_f64() * 1e3,
            times[n - 1].as_secs_f64() * 1e3,
        );
    }

    for what in ["tasks", "containers"] {
        let out = cd.ctr(&[what, "ls", "-q"]);
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(left.is_empty(), "{what} left: {left}");
    }
    let left = cd.wait_for_no_processes();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let entries: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "left in {run:?}: {entries:?}");
    let mounts = mounts_under(cd.dir());
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let sockets: Vec<_> = std::iter::once("warm".to_string())
        .chain((0..n).map(|i| format!("cyc{i}")))
        .map(|id| common::shim_socket(&cd, &id))
        .filter(|p| p.exists())
        .collect();
    assert!(sockets.is_empty(), "shim sockets left: {sockets:?}");
    let fds_after = settled_fds(&cd, Some(fds_before));
    assert_eq!(
        fds_after, fds_before,
        "containerd's open fds grew over {n} runs"
    );
    cd.stop_and_check();
}

/// containerd's fd count once it stops changing (connections to gone
/// shims close asynchronously), or once it equals `want`; 20 s at most.
fn settled_fds(cd: &Containerd, want: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = cd.open_fds();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = cd.open_fds();
        if Some(now) == want || (want.is_none() && now == last) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
