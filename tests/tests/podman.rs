//! podman end to end, driving an OCI runtime given by path: a private
//! podman (own store, run root, temporary directory and network config,
//! overlay driver, cgroupfs; no network, or a private CNI bridge network)
//! runs the offline busybox image through conmon and the runtime. Each scenario runs against runc (`podman_with_runc_*`) and
//! against this build's `husk` CLI (`podman_with_husk_*`), and ends by
//! checking that nothing is left: no container, process, mount, runtime
//! state or cgroup. Skips only when podman is not installed (or not root).

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::podman::{wait_gone, OciRuntime, Podman};
use husk_tests::{http_get, qemu_or_skip};

/// Makes the given runtime for a state directory.
type Runtime = fn(&Path) -> OciRuntime;

/// `podman run --rm`: output, exit codes, stdin, stderr.
fn run_rm_output_and_exit_codes(test: &str, runtime: Runtime) {
    let Some(pm) = Podman::new(test, runtime) else {
        return;
    };
    let (code, out, err) = pm.run_rm(&[], &["echo", "hi"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "hi\n"),
        "stderr: {err}\n{}",
        pm.context()
    );

    let (code, out, err) = pm.run_rm(&[], &["sh", "-c", "echo to-stderr >&2; exit 3"], b"");
    assert_eq!(code, 3, "stderr: {err}\n{}", pm.context());
    assert_eq!(out, "");
    assert!(err.contains("to-stderr"), "stderr: {err}");

    // stdin reaches the container with -i, and so does its EOF.
    let (code, out, err) = pm.run_rm(&["-i"], &["cat"], b"line one\nline two\n");
    assert_eq!(
        (code, out.as_str()),
        (0, "line one\nline two\n"),
        "stderr: {err}\n{}",
        pm.context()
    );
    pm.assert_clean();
}

/// `podman run -it`: the container gets a terminal; its exit code comes
/// through.
fn run_tty(test: &str, runtime: Runtime) {
    let Some(pm) = Podman::new(test, runtime) else {
        return;
    };
    let (code, out) = pm.run_tty(&["sh", "-c", "tty; echo ok; exit 4"]);
    assert_eq!(code, 4, "output: {out}\n{}", pm.context());
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
        "output: {out:?}"
    );
    assert!(lines.contains(&"ok"), "output: {out:?}");
    pm.assert_clean();
}

/// `podman run -d`, `exec` (output, exit codes, a terminal), `stop` with
/// its SIGKILL fallback and with a SIGTERM the container handles, `rm`.
fn detached_exec_stop(test: &str, runtime: Runtime) {
    let Some(pm) = Podman::new(test, runtime) else {
        return;
    };
    let id = pm.run_detached(&["sleep", "1000"]);
    assert_eq!(pm.inspect(&id, "{{.State.Status}}"), "running");
    let pids = pm.inspect(&id, "{{.State.Pid}} {{.State.ConmonPid}}");
    let pids: Vec<u32> = pids.split(' ').map(|p| p.parse().unwrap()).collect();
    assert!(pids.iter().all(|&p| p > 0), "pids: {pids:?}");

    let (code, out, err) = pm.output(&["exec", &id, "echo", "hi-exec"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "hi-exec\n"),
        "stderr: {err}\n{}",
        pm.context()
    );
    let (code, _, err) = pm.output(&["exec", &id, "sh", "-c", "exit 5"], b"");
    assert_eq!(code, 5, "stderr: {err}\n{}", pm.context());
    let (code, out) = pm.in_tty(&["exec", "-it", &id, "tty"]);
    assert_eq!(code, 0, "output: {out}\n{}", pm.context());
    assert!(out.trim().starts_with("/dev/pts/"), "output: {out:?}");

    // sleep, PID 1 of its namespace, has no handler for SIGTERM: stop
    // falls back to SIGKILL after 2 s.
    pm.ok(&["stop", "-t", "2", &id]);
    assert_eq!(
        pm.inspect(&id, "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 137"
    );
    for &pid in &pids {
        assert!(wait_gone(pid), "pid {pid} still alive after stop");
    }
    pm.ok(&["rm", &id]);

    // A container that handles SIGTERM exits with its own code.
    let id = pm.run_detached(&[
        "sh",
        "-c",
        "trap 'exit 7' TERM; echo ready; while :; do sleep 0.1; done",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pm.ok(&["logs", &id]).contains("ready") {
        assert!(
            Instant::now() < deadline,
            "no 'ready' from {id}\n{}",
            pm.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pm.ok(&["stop", "-t", "30", &id]);
    assert_eq!(
        pm.inspect(&id, "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 7"
    );
    pm.ok(&["rm", &id]);
    pm.assert_clean();
}

/// `podman run -d --network <CNI bridge network>`: podman prepares the
/// container's network namespace (bridge plugin, host-local address); with
/// husk the VM takes over its `eth0`. The container has the address podman
/// reports on `eth0`, and the host fetches a file from its `httpd` at that
/// address. The two runtimes' tests use different subnets, as they run at
/// once.
fn bridge_network(test: &str, runtime: Runtime) {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP {test}: no CNI bridge plugin (scripts/deps.sh installs containernetworking-plugins)");
        return;
    }
    let Some(pm) = Podman::new(test, runtime) else {
        return;
    };
    let prefix = if test.contains("husk") {
        "10.88.79."
    } else {
        "10.88.78."
    };
    let net = pm.bridge_network(prefix);
    let id = pm.run_detached_on(&net, &["httpd", "-f", "-p", "8080", "-h", "/etc"]);
    let ip = pm.inspect(
        &id,
        &format!("{{{{.NetworkSettings.Networks.{net}.IPAddress}}}}"),
    );
    assert!(ip.starts_with(prefix), "IP {ip:?}\n{}", pm.context());
    let (code, out, err) = pm.output(
        &["exec", &id, "ip", "-4", "-o", "addr", "show", "eth0"],
        b"",
    );
    assert_eq!(code, 0, "stderr: {err}\n{}", pm.context());
    assert!(out.contains(&format!("inet {ip}/24")), "{out}");
    let page = http_get(&ip, 8080, "/passwd");
    assert!(page.contains("root:x:0:0"), "{page}");
    pm.ok(&["stop", "-t", "2", &id]);
    pm.ok(&["rm", &id]);
    pm.assert_clean();
}

/// One test per scenario and runtime. The husk tests skip without QEMU.
macro_rules! podman_tests {
    ($scenario:ident, $runc:ident, $husk:ident) => {
        #[test]
        fn $runc() {
            $scenario(stringify!($runc), OciRuntime::runc);
        }

        #[test]
        fn $husk() {
            if qemu_or_skip(stringify!($husk)).is_some() {
                $scenario(stringify!($husk), OciRuntime::husk);
            }
        }
    };
}

podman_tests!(
    run_rm_output_and_exit_codes,
    podman_with_runc_run_rm_output_and_exit_codes,
    podman_with_husk_run_rm_output_and_exit_codes
);
podman_tests!(run_tty, podman_with_runc_run_tty, podman_with_husk_run_tty);
podman_tests!(
    detached_exec_stop,
    podman_with_runc_detached_exec_stop,
    podman_with_husk_detached_exec_stop
);
podman_tests!(
    bridge_network,
    podman_with_runc_bridge_network,
    podman_with_husk_bridge_network
);
