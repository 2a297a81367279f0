//! A sandbox: one VM, its state directory, and a connected agent client.
//!
//! Start creates `<run_root>/<id>/`, starts the VM through the configured
//! [`Hypervisor`](crate::hypervisor::Hypervisor), and dials the agent until
//! it answers or the boot deadline passes; any failure tears down what was
//! started and removes the directory. Stop asks the agent to power off,
//! waits briefly, then kills. Dropping a sandbox kills it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use husk_protocols::agent::VersionResponse;

use crate::agent_client::{wait_for_agent, AgentClient, RPC_TIMEOUT};
use crate::config::RuntimeConfig;
use crate::container::ContainerState;
use crate::error::{Error, Result};
use crate::host::HostProbe;
use crate::hypervisor::{BackendKind, Vm, VmExit, VmSpec, SHARED_FS_TAG};
use crate::kernel_cmdline::KernelCmdline;
use crate::network::PodNetwork;
use crate::shared_fs::SharedDir;

/// Guest vsock CID of every sandbox (each VM has its own vsock backend, so
/// CIDs never meet).
pub const GUEST_CID: u32 = 3;

/// How long a guest gets to power off after the Shutdown RPC.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Checks a sandbox id: 1–64 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid sandbox id {id:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The part of a guest console worth quoting in an error: around the
/// kernel panic line when there is one (the backtrace after it says little
/// to a user), else the last lines.
pub fn console_excerpt(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    match lines.iter().position(|l| l.contains("Kernel panic")) {
        Some(i) => lines[i.saturating_sub(6)..=i].join("\n"),
        None => lines[lines.len().saturating_sub(15)..].join("\n"),
    }
}

/// A running sandbox VM with a ready agent.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    vm: Option<Box<dyn Vm>>,
    agent: AgentClient,
    uds: PathBuf,
    backend: BackendKind,
    ready_after: Duration,
    shared: Option<SharedDir>,
    containers: Mutex<HashMap<String, ContainerState>>,
}

impl Sandbox {
    /// Starts a sandbox and waits for its agent.
    pub fn start(cfg: &RuntimeConfig, host: &HostProbe, id: &str) -> Result<Sandbox> {
        let t0 = Instant::now();
        validate_id(id)?;
        // The pod's network namespace: a tap per interface, before the VM needs them. One with
        // loopback only (podman's `--network none`) needs no NIC, and then any backend does.
        let network = match &cfg.network_namespace {
            Some(ns) => PodNetwork::attach(ns)?,
            None => PodNetwork::default(),
        };
        let hv = cfg.hypervisor(host, !network.interfaces.is_empty())?;
        std::fs::create_dir_all(&cfg.run_root)
            .map_err(|e| Error::io(format!("creating run root {:?}", cfg.run_root), e))?;
        let dir = cfg.run_root.join(id);
        std::fs::create_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Config(format!("sandbox {id:?} already exists ({dir:?})"))
            } else {
                Error::io(format!("creating sandbox dir {dir:?}"), e)
            }
        })?;
        let guard = DirGuard(Some(dir.clone()));
        let mut shared = if cfg.shared_fs {
            Some(SharedDir::create(&dir.join("shared"))?)
        } else {
            None
        };

        let mut cmdline = KernelCmdline::husk_default();
        cmdline.extend_raw(&cfg.kernel_params)?;
        let console_log = dir.join("console.log");
        let spec = VmSpec {
            id: id.to_string(),
            kernel: cfg.kernel.clone(),
            initramfs: cfg.initramfs.clone(),
            cmdline,
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            guest_cid: GUEST_CID,
            run_dir: dir.clone(),
            console_log: console_log.clone(),
            shared_dir: shared.as_ref().map(|s| s.path().to_path_buf()),
            nics: network.nics(),
        };
        let mut vm = hv.start(&spec)?;
        // QEMU holds the taps now; the pod's interfaces go to the agent.
        let (interfaces, routes) = network.to_agent();
        drop(network);
        let deadline = t0 + cfg.boot_timeout;
        let uds = vm.vsock_uds();
        let res = wait_for_agent(
            &uds,
            husk_protocols::AGENT_VSOCK_PORT,
            deadline,
            || match vm.try_exit()? {
                None => Ok(()),
                Some(exit) => Err(Error::ProcessExited {
                    what: "VM",
                    status: exit.reason,
                    console_tail: String::new(),
                }),
            },
        );
        let res = res.and_then(|agent| {
            let tag = if shared.is_some() { SHARED_FS_TAG } else { "" };
            agent
                .create_sandbox(
                    cfg.hostname.as_deref().unwrap_or(id),
                    tag,
                    interfaces,
                    routes,
                )
                .map(|()| agent)
        });
        let agent = match res {
            Ok(a) => a,
            Err(e) => {
                if let Some(s) = shared.as_mut() {
                    s.teardown();
                }
                let _ = vm.kill();
                let tail = console_excerpt(&console_log);
                return Err(match e {
                    Error::AgentTimeout { .. } => Error::AgentTimeout {
                        after: cfg.boot_timeout,
                        console_tail: tail,
                    },
                    Error::ProcessExited { what, status, .. } => Error::ProcessExited {
                        what,
                        status,
                        console_tail: tail,
                    },
                    other => other,
                });
            }
        };
        let mut guard = guard;
        guard.0 = None;
        Ok(Sandbox {
            id: id.to_string(),
            dir,
            vm: Some(vm),
            agent,
            uds,
            backend: hv.kind(),
            ready_after: t0.elapsed(),
            shared,
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The backend running it.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Time from `start` being called to the agent's first answer.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The connected agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The hybrid-vsock socket of the VM.
    pub fn vsock_uds(&self) -> PathBuf {
        self.uds.clone()
    }

    /// A new, separate connection to the agent (for calls that block).
    pub fn dial_agent(&self) -> Result<AgentClient> {
        AgentClient::dial(&self.uds)
    }

    /// The host side of the shared directory, if the sandbox has one.
    pub fn shared_dir(&self) -> Option<&Path> {
        self.shared.as_ref().map(SharedDir::path)
    }

    pub(crate) fn containers(&self) -> MutexGuard<'_, HashMap<String, ContainerState>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Host pids of the VM's processes.
    pub fn pids(&self) -> Vec<u32> {
        self.vm.as_ref().map(|v| v.pids()).unwrap_or_default()
    }

    /// The agent's Version answer.
    pub fn version(&self) -> Result<VersionResponse> {
        self.agent.version(RPC_TIMEOUT)
    }

    /// Whether the VM has ended by itself (e.g. guest panic).
    pub fn try_exit(&mut self) -> Result<Option<VmExit>> {
        match self.vm.as_mut() {
            Some(vm) => vm.try_exit(),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the VM to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<VmExit>> {
        match self.vm.as_mut() {
            Some(vm) => vm.wait_exit(timeout),
            None => Ok(None),
        }
    }

    /// Powers the guest off through the agent, kills the VM if it has not
    /// ended within a grace period, and removes the state directory.
    pub fn stop(mut self) -> Result<VmExit> {
        let mut vm = self.vm.take().expect("vm present until stop or drop");
        if vm.try_exit()?.is_none() {
            if let Err(e) = self.agent.shutdown(Duration::from_secs(2)) {
                // The agent may be gone already; the VM is killed below.
                tracing::debug!("Shutdown RPC: {e}");
            }
        }
        let ended = vm.wait_exit(SHUTDOWN_GRACE)?;
        let killed = vm.kill()?;
        self.release_host_state();
        Ok(ended.unwrap_or(killed))
    }
}

impl Sandbox {
    /// Unmounts container rootfs and volumes and the share, and removes the
    /// state directory. Called once the VM is gone.
    fn release_host_state(&mut self) {
        self.containers().clear();
        if let Some(mut s) = self.shared.take() {
            s.teardown();
        }
        remove_dir(&self.dir);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.kill();
            self.release_host_state();
        }
    }
}

/// Removes a sandbox directory, logging (not failing) on error.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {dir:?}: {e}");
        }
    }
}

/// Removes the sandbox directory on early return.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            remove_dir(&d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "pod-1", "x_y.z", &"a".repeat(64)] {
            validate_id(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", &"a".repeat(65), "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn excerpt_centres_on_the_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut text: String = (0..20).map(|i| format!("line{i}\n")).collect();
        text.push_str("Kernel panic - not syncing: Attempted to kill init!\n");
        text.push_str(&"trace\n".repeat(30));
        std::fs::write(&p, &text).unwrap();
        let e = console_excerpt(&p);
        assert!(
            e.starts_with("line14\n") && e.ends_with("Attempted to kill init!"),
            "{e}"
        );
        std::fs::write(&p, "a\nb\n").unwrap();
        assert_eq!(console_excerpt(&p), "a\nb");
    }

    #[test]
    fn failed_start_leaves_no_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = RuntimeConfig::from_env().unwrap();
        cfg.run_root = d.path().join("run");
        cfg.kernel = d.path().join("missing-vmlinux");
        cfg.qemu_binary = Some("/bin/true".into());
        cfg.vsock_backend = Some("/bin/true".into());
        let e = Sandbox::start(&cfg, &HostProbe::detect(), "s1").unwrap_err();
        assert!(e.to_string().contains("guest kernel"), "{e}");
        assert_eq!(std::fs::read_dir(&cfg.run_root).unwrap().count(), 0);
    }
}
