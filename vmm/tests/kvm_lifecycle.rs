//! The lifecycle of a husk-vmm process around a tiny guest: the control socket (start, state,
//! shutdown), SIGTERM, and teardown (exit status, no socket files left behind).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, husk_vmm, require_kvm, ChildGuard};

/// Prints 'A', then sleeps in KVM's in-kernel `hlt` forever (interrupts off).
const SLEEPER: &str = ".code64\nmov $0x3f8, %dx\nmov $'A', %al\nout %al, %dx\n1: hlt\njmp 1b\n";

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("husk-vmm did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn request(sock: &Path, line: &str) -> String {
    // The socket file appears at bind(2), a moment before listen(2): retry a refusal briefly.
    let mut tries = 0;
    let mut s = loop {
        match UnixStream::connect(sock) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.unwrap(),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

fn console_has(log: &Path, text: &str) -> bool {
    std::fs::read_to_string(log)
        .map(|s| s.contains(text))
        .unwrap_or(false)
}

#[test]
fn api_start_state_shutdown_and_no_leftover_sockets() {
    if !require_kvm("api_start_state_shutdown_and_no_leftover_sockets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "sleeper", SLEEPER);
    let (api, uds, log) = (
        dir.path().join("api.sock"),
        dir.path().join("vsock.sock"),
        dir.path().join("console.log"),
    );
    let child = husk_vmm()
        .arg("--raw-image")
        .arg(&bin)
        .args(["--memory-mib", "16", "--wait-for-start"])
        .arg("--api-socket")
        .arg(&api)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--console-log")
        .arg(&log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let child = &mut guard.0;
    wait_for("the API socket", Duration::from_secs(10), || api.exists());
    assert!(
        uds.exists(),
        "the vsock socket exists before the guest runs"
    );
    assert_eq!(
        request(&api, "state"),
        "{\"ok\":true,\"state\":\"created\"}\n"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(!console_has(&log, "A"), "vCPUs must not run before start");
    assert!(request(&api, "start").contains("\"ok\":true"));
    wait_for("guest output", Duration::from_secs(10), || {
        console_has(&log, "A")
    });
    assert_eq!(
        request(&api, "state"),
        "{\"ok\":true,\"state\":\"running\"}\n"
    );
    assert!(request(&api, "reboot").contains("\"ok\":false"));
    assert!(request(&api, r#"{"action":"shutdown"}"#).contains("stopping"));
    let status = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(!api.exists(), "API socket removed");
    assert!(!uds.exists(), "vsock socket removed");
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    if !require_kvm("sigterm_stops_a_running_guest_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "sleeper", SLEEPER);
    let (uds, log) = (
        dir.path().join("vsock.sock"),
        dir.path().join("console.log"),
    );
    let child = husk_vmm()
        .arg("--raw-image")
        .arg(&bin)
        .args(["--memory-mib", "16", "--vcpus", "2"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--console-log")
        .arg(&log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let child = &mut guard.0;
    wait_for("guest output", Duration::from_secs(10), || {
        console_has(&log, "A")
    });
    // A host client connected to the hybrid vsock socket does not keep the VMM alive.
    let client = UnixStream::connect(&uds).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(!uds.exists(), "vsock socket removed");
    drop(client);
}

#[test]
fn a_live_socket_in_the_way_is_refused_and_left_alone() {
    if !require_kvm("a_live_socket_in_the_way_is_refused_and_left_alone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = assemble(dir.path(), "sleeper", SLEEPER);
    let uds = dir.path().join("vsock.sock");
    let _live = std::os::unix::net::UnixListener::bind(&uds).unwrap();
    let run = common::run_vmm(
        &[
            "--raw-image",
            bin.to_str().unwrap(),
            "--memory-mib",
            "16",
            "--vsock-uds",
            uds.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("in use"), "{}", run.stderr);
    assert!(uds.exists(), "someone else's socket must stay");
}
