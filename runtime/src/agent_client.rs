//! Talking to husk-agent: the hybrid-vsock handshake over the VM's host
//! socket, then ttrpc.
//!
//! Hybrid vsock (the Firecracker convention, served by `husk-vsock` and by
//! husk-vmm): connect to the Unix socket, write `CONNECT <port>\n`, read
//! `OK <host port>\n`; from then on the stream is the guest connection. A
//! CONNECT before the guest listens is closed at once, so callers retry
//! until a deadline.

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_protocols::agent::{
    ContainerRequest, CreateContainerRequest, CreateSandboxRequest, Empty, ExecProcessRequest,
    NetInterface, NetRoute, ProcessRequest, ShutdownRequest, SignalProcessRequest,
    StatsContainerResponse, StdioSpec, TtyWinResizeRequest, UpdateContainerRequest, VersionRequest,
    VersionResponse,
};
use husk_protocols::agent_ttrpc::AgentClient as AgentRpc;
use husk_protocols::health::CheckRequest;
use husk_protocols::health_ttrpc::HealthClient;

use crate::error::{Error, Result};

/// Longest `OK <port>\n` answer accepted.
const MAX_REPLY: usize = 32;

/// Per-RPC timeout of routine calls.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Timeout of calls that build or tear down processes in the guest
/// (create, start, exec, remove): forks, mounts and cgroup work, which on an
/// emulated (TCG) and loaded host can take seconds.
pub const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses the backend's `OK <port>\n` reply line (without the newline).
pub fn parse_ok_reply(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("OK ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Opens one hybrid-vsock connection to guest `port` through `uds`.
///
/// Returns `Ok(None)` when the guest is not (yet) listening: the backend
/// refused or closed the stream. `timeout` bounds the handshake itself.
pub fn hybrid_connect(uds: &Path, port: u32, timeout: Duration) -> Result<Option<UnixStream>> {
    let mut s = match UnixStream::connect(uds) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io(format!("connecting to {uds:?}"), e)),
    };
    let io = |e| Error::io(format!("hybrid vsock handshake on {uds:?}"), e);
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return reset_or(e, uds);
    }
    // Byte by byte: nothing past the newline may be consumed here.
    let mut line = Vec::with_capacity(MAX_REPLY);
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_REPLY => {
                return Err(Error::Handshake {
                    path: uds.to_path_buf(),
                    reason: format!("reply longer than {MAX_REPLY} bytes without a newline"),
                })
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return reset_or(e, uds),
        }
    }
    if parse_ok_reply(&line).is_none() {
        return Err(Error::Handshake {
            path: uds.to_path_buf(),
            reason: format!(
                "expected `OK <port>`, got {:?}",
                String::from_utf8_lossy(&line)
            ),
        });
    }
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    Ok(Some(s))
}

/// A reset or broken pipe means "not listening yet"; anything else is an error.
fn reset_or(e: std::io::Error, uds: &Path) -> Result<Option<UnixStream>> {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof => Ok(None),
        WouldBlock | TimedOut => Err(Error::Handshake {
            path: uds.to_path_buf(),
            reason: "no answer to CONNECT in time (is the vsock backend wedged?)".into(),
        }),
        _ => Err(Error::io(format!("hybrid vsock handshake on {uds:?}"), e)),
    }
}

/// A connected client of the agent API.
#[derive(Clone)]
pub struct AgentClient {
    health: HealthClient,
    agent: AgentRpc,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentClient")
    }
}

impl AgentClient {
    /// Wraps an established stream to the agent.
    pub fn from_stream(stream: UnixStream) -> Result<AgentClient> {
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|source| Error::Agent {
            request: "connect",
            source,
        })?;
        Ok(AgentClient {
            health: HealthClient::new(client.clone()),
            agent: AgentRpc::new(client),
        })
    }

    /// A new connection to the agent of the VM whose hybrid-vsock socket
    /// is `uds` (for processes other than the sandbox's owner, too).
    pub fn dial(uds: &Path) -> Result<AgentClient> {
        let s = hybrid_connect(uds, husk_protocols::AGENT_VSOCK_PORT, RPC_TIMEOUT)?.ok_or_else(
            || Error::Handshake {
                path: uds.to_path_buf(),
                reason: "the agent refused a new connection".into(),
            },
        )?;
        AgentClient::from_stream(s)
    }

    /// Connects to a ttrpc address directly (`unix://...`), as used for an
    /// agent running on the host in tests.
    pub fn connect_addr(addr: &str) -> Result<AgentClient> {
        let client = ttrpc::Client::connect(addr).map_err(|source| Error::Agent {
            request: "connect",
            source,
        })?;
        Ok(AgentClient {
            health: HealthClient::new(client.clone()),
            agent: AgentRpc::new(client),
        })
    }

    /// Health check: true when the agent reports SERVING.
    pub fn check(&self, timeout: Duration) -> Result<bool> {
        let r = self
            .health
            .check(ctx(timeout), &CheckRequest::new())
            .map_err(|source| Error::Agent {
                request: "Health.Check",
                source,
            })?;
        Ok(r.status.value() == 1)
    }

    /// The agent's Version answer.
    pub fn version(&self, timeout: Duration) -> Result<VersionResponse> {
        self.agent
            .version(ctx(timeout), &VersionRequest::new())
            .map_err(|source| Error::Agent {
                request: "Version",
                source,
            })
    }

    /// Sets the hostname, mounts the shared filesystem and sets up the pod's network
    /// interfaces and routes in the guest.
    pub fn create_sandbox(
        &self,
        hostname: &str,
        shared_fs_tag: &str,
        interfaces: Vec<NetInterface>,
        routes: Vec<NetRoute>,
    ) -> Result<()> {
        let mut r = CreateSandboxRequest::new();
        r.hostname = hostname.to_string();
        r.shared_fs_tag = shared_fs_tag.to_string();
        r.interfaces = interfaces;
        r.routes = routes;
        let res = self.agent.create_sandbox(ctx(RPC_TIMEOUT), &r);
        res.map(drop).map_err(|source| Error::Agent {
            request: "CreateSandbox",
            source,
        })
    }

    /// Creates a container from a guest-side spec; returns its guest pid.
    pub fn create_container(&self, id: &str, spec: Vec<u8>, stdio: StdioSpec) -> Result<i32> {
        let mut r = CreateContainerRequest::new();
        r.container_id = id.to_string();
        r.oci_spec = spec;
        r.stdio = Some(stdio).into();
        let res = self.agent.create_container(ctx(LIFECYCLE_TIMEOUT), &r);
        res.map(|x| x.pid).map_err(|source| Error::Agent {
            request: "CreateContainer",
            source,
        })
    }

    /// Starts a created container.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let res = self
            .agent
            .start_container(ctx(LIFECYCLE_TIMEOUT), &container_req(id));
        res.map(drop).map_err(|source| Error::Agent {
            request: "StartContainer",
            source,
        })
    }

    /// Runs `process` (OCI Process JSON) in a container; returns its pid.
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: StdioSpec,
    ) -> Result<i32> {
        let mut r = ExecProcessRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.process = process;
        r.stdio = Some(stdio).into();
        let res = self.agent.exec_process(ctx(LIFECYCLE_TIMEOUT), &r);
        res.map(|x| x.pid).map_err(|source| Error::Agent {
            request: "ExecProcess",
            source,
        })
    }

    /// Signals a process (or all of a container's with `all`).
    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut r = SignalProcessRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.signal = signal;
        r.all = all;
        let res = self.agent.signal_process(ctx(RPC_TIMEOUT), &r);
        res.map(drop).map_err(|source| Error::Agent {
            request: "SignalProcess",
            source,
        })
    }

    /// Blocks (without timeout) until a process exits; returns its status.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<i32> {
        let res = self.agent.wait_process(
            ttrpc::context::Context::default(),
            &process_req(id, exec_id),
        );
        res.map(|x| x.status).map_err(|source| Error::Agent {
            request: "WaitProcess",
            source,
        })
    }

    /// Removes a stopped container.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let res = self
            .agent
            .remove_container(ctx(LIFECYCLE_TIMEOUT), &container_req(id));
        res.map(drop).map_err(|source| Error::Agent {
            request: "RemoveContainer",
            source,
        })
    }

    /// Forgets an exited exec'd process (its id may be reused).
    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let res = self
            .agent
            .remove_process(ctx(RPC_TIMEOUT), &process_req(id, exec_id));
        res.map(drop).map_err(|source| Error::Agent {
            request: "RemoveProcess",
            source,
        })
    }

    /// Guest pids of a container's processes.
    pub fn list_processes(&self, id: &str) -> Result<Vec<i32>> {
        let res = self
            .agent
            .list_processes(ctx(RPC_TIMEOUT), &container_req(id));
        res.map(|x| x.pids).map_err(|source| Error::Agent {
            request: "ListProcesses",
            source,
        })
    }

    /// A container's processes with `ps -ef`'s details.
    pub fn process_details(&self, id: &str) -> Result<Vec<husk_protocols::agent::ProcessInfo>> {
        let res = self
            .agent
            .list_processes(ctx(RPC_TIMEOUT), &container_req(id));
        res.map(|x| x.processes).map_err(|source| Error::Agent {
            request: "ListProcesses",
            source,
        })
    }

    /// Applies OCI LinuxResources (JSON).
    pub fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        let mut r = UpdateContainerRequest::new();
        r.container_id = id.to_string();
        r.resources = resources;
        let res = self.agent.update_container(ctx(RPC_TIMEOUT), &r);
        res.map(drop).map_err(|source| Error::Agent {
            request: "UpdateContainer",
            source,
        })
    }

    /// cgroup statistics of a container.
    pub fn stats_container(&self, id: &str) -> Result<StatsContainerResponse> {
        let res = self
            .agent
            .stats_container(ctx(RPC_TIMEOUT), &container_req(id));
        res.map_err(|source| Error::Agent {
            request: "StatsContainer",
            source,
        })
    }

    /// Blocks until a container is OOM-killed; returns its id.
    pub fn next_oom_event(&self, timeout: Duration) -> Result<String> {
        let res = self.agent.get_oom_event(ctx(timeout), &Empty::new());
        res.map(|e| e.container_id).map_err(|source| Error::Agent {
            request: "GetOomEvent",
            source,
        })
    }

    /// Resizes a process's terminal.
    pub fn tty_resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let mut r = TtyWinResizeRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.rows = rows;
        r.cols = cols;
        let res = self.agent.tty_win_resize(ctx(RPC_TIMEOUT), &r);
        res.map(drop).map_err(|source| Error::Agent {
            request: "TtyWinResize",
            source,
        })
    }

    /// Pauses (freezes) or resumes a container.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let req = container_req(id);
        let (request, res) = if paused {
            (
                "PauseContainer",
                self.agent.pause_container(ctx(RPC_TIMEOUT), &req),
            )
        } else {
            (
                "ResumeContainer",
                self.agent.resume_container(ctx(RPC_TIMEOUT), &req),
            )
        };
        res.map(drop)
            .map_err(|source| Error::Agent { request, source })
    }

    /// Asks the agent to power the VM off.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.agent
            .shutdown(ctx(timeout), &ShutdownRequest::new())
            .map(drop)
            .map_err(|source| Error::Agent {
                request: "Shutdown",
                source,
            })
    }
}

fn container_req(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.to_string();
    r
}

fn process_req(id: &str, exec_id: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.to_string();
    r.exec_id = exec_id.to_string();
    r
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// Dials the agent through `uds` until it answers a health check, the
/// deadline passes, or `alive` reports that the VM is gone.
pub fn wait_for_agent(
    uds: &Path,
    port: u32,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<AgentClient> {
    let mut backoff = Duration::from_millis(2);
    loop {
        alive()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::AgentTimeout {
                after: Duration::ZERO,
                console_tail: String::new(),
            });
        }
        match hybrid_connect(uds, port, left.min(Duration::from_secs(2))) {
            Ok(Some(stream)) => {
                let client = AgentClient::from_stream(stream)?;
                match client.check(left.min(RPC_TIMEOUT)) {
                    Ok(true) => return Ok(client),
                    Ok(false) => {}
                    Err(e) => tracing::debug!("agent not ready yet: {e}"),
                }
            }
            Ok(None) => {}
            // A booting guest on a loaded host can take longer than one
            // try to answer CONNECT: try again until the deadline.
            Err(e @ Error::Handshake { .. }) => tracing::debug!("agent not ready yet: {e}"),
            Err(e) => return Err(e),
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn ok_reply_parsing() {
        assert_eq!(parse_ok_reply(b"OK 1073741824"), Some(1 << 30));
        assert_eq!(parse_ok_reply(b"OK 0"), Some(0));
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 5",
            b"OK -1",
            b"OK 5 6",
            b"OK 99999999999",
            b"\xffOK 1",
        ] {
            assert_eq!(parse_ok_reply(bad), None, "{bad:?}");
        }
    }

    fn fake_backend(
        reply: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = [0u8; 64];
            let n = s.read(&mut got).unwrap();
            s.write_all(reply).unwrap();
            got[..n].to_vec()
        });
        (dir, path, t)
    }

    #[test]
    fn handshake_ok_and_refusals() {
        let (_d, p, t) = fake_backend(b"OK 1073741825\n");
        let s = hybrid_connect(&p, 1024, Duration::from_secs(5)).unwrap();
        assert!(s.is_some());
        assert_eq!(t.join().unwrap(), b"CONNECT 1024\n");

        // The backend closes without answering: guest not listening yet.
        let (_d, p, t) = fake_backend(b"");
        assert!(hybrid_connect(&p, 1024, Duration::from_secs(5))
            .unwrap()
            .is_none());
        t.join().unwrap();

        let (_d, p, t) = fake_backend(b"NOPE\n");
        let e = hybrid_connect(&p, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("expected `OK <port>`"), "{e}");
        t.join().unwrap();

        // No socket at all: not up yet.
        assert!(
            hybrid_connect(Path::new("/nonexistent/x.sock"), 1, Duration::from_secs(1))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn wait_gives_up_at_the_deadline_and_when_the_vm_dies() {
        let t0 = Instant::now();
        let e = wait_for_agent(
            Path::new("/nonexistent/x.sock"),
            1024,
            t0 + Duration::from_millis(100),
            || Ok(()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::AgentTimeout { .. }));
        assert!(t0.elapsed() < Duration::from_secs(2));
        let e = wait_for_agent(
            Path::new("/nonexistent/x.sock"),
            1024,
            t0 + Duration::from_secs(60),
            || Err(Error::Config("gone".into())),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Config(_)));
    }
}
