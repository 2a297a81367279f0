//! The agent API served by the real `husk-agent` binary on the host (not as
//! PID 1: it then only serves), reached through husk-runtime's client.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::agent_client::AgentClient;

/// The agent process, killed and reaped if a failed assertion leaves it
/// running (a leaked agent also holds the test's output pipes open).
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn agent_serves_health_version_and_shutdown_over_ttrpc() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix://{}", sock.display());
    let mut agent = AgentProcess(
        Command::new(husk_tests::bin("husk-agent"))
            .args(["--listen", &addr, "--log", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "agent did not listen on {sock:?}"
        );
        assert!(agent.0.try_wait().unwrap().is_none(), "agent exited early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = AgentClient::connect_addr(&addr).unwrap();
    assert!(c.check(Duration::from_secs(5)).unwrap());
    let v = c.version(Duration::from_secs(5)).unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, husk_protocols::API_VERSION);
    let names: Vec<&str> = v.boot_stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["agent-start", "agent-listening"]);
    c.shutdown(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn agent_rejects_unknown_arguments() {
    let out = Command::new(husk_tests::bin("husk-agent"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown argument"), "{err}");
}
