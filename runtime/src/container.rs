//! Containers in a sandbox, from the host: bundle in, exit status out.
//!
//! `create` plans the bundle (`bundle`), bind-mounts rootfs and volumes
//! into the share, asks the agent to create the container, and attaches
//! its stdio; `start`, `exec`, `kill`, `wait`, `delete` follow runc's
//! meanings. Every failure undoes what it did.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use husk_protocols::agent::StatsContainerResponse;
use oci_spec::runtime::Process;

use crate::agent_client::AgentClient;
use crate::bundle;
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::shared_fs::BindMount;
use crate::stdio::{Stdio, StdioCopies};

/// How long `wait` gives output streams to drain after the exit.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

/// Host-side state of one container.
#[derive(Debug)]
pub struct ContainerState {
    mounts: Vec<BindMount>,
    copies: HashMap<String, StdioCopies>,
    /// Guest pid of the container's init.
    pub pid: i32,
}

impl Drop for ContainerState {
    fn drop(&mut self) {
        for m in self.mounts.iter_mut().rev() {
            m.unmount();
        }
    }
}

impl Sandbox {
    fn shared_root(&self) -> Result<&Path> {
        self.shared_dir().ok_or_else(|| {
            Error::Config("this sandbox has no shared filesystem (shared_fs is off)".into())
        })
    }

    /// Creates container `id` from the OCI bundle at `bundle_dir`; its
    /// process waits for [`Sandbox::start_container`]. Returns the guest pid.
    pub fn create_container(&self, id: &str, bundle_dir: &Path, stdio: Stdio) -> Result<i32> {
        crate::sandbox::validate_id(id)?;
        if self.containers().contains_key(id) {
            return Err(Error::Config(format!("container {id:?} already exists")));
        }
        let spec = bundle::load_spec(bundle_dir)?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal != stdio.terminal {
            return Err(Error::Config(format!(
                "config.json says terminal={terminal} but the caller's stdio says terminal={}",
                stdio.terminal
            )));
        }
        let plan = bundle::plan(spec, bundle_dir, id)?;
        let share = self.shared_root()?.to_path_buf();
        let container_share = share.join(id);
        let cleanup_dir = || {
            let _ = std::fs::remove_dir_all(&container_share);
        };
        let mounts = bundle::expose(&share, &plan.exposures).inspect_err(|_| cleanup_dir())?;
        let json = serde_json::to_vec(&plan.spec)
            .map_err(|e| Error::Config(format!("serializing the spec: {e}")))?;
        let agent = self.agent();
        let pid = match agent.create_container(id, json, stdio.spec()) {
            Ok(pid) => pid,
            Err(e) => {
                drop(mounts);
                cleanup_dir();
                return Err(e);
            }
        };
        let mut state = ContainerState {
            mounts,
            copies: HashMap::new(),
            pid,
        };
        match StdioCopies::start(&self.vsock_uds(), id, "", stdio) {
            Ok(c) => {
                state.copies.insert(String::new(), c);
            }
            Err(e) => {
                let _ = agent.signal_process(id, "", 9, true);
                let _ = agent.remove_container(id);
                drop(state);
                cleanup_dir();
                return Err(e);
            }
        }
        self.containers().insert(id.to_string(), state);
        Ok(pid)
    }

    /// Starts a created container's process.
    pub fn start_container(&self, id: &str) -> Result<()> {
        self.known(id)?;
        self.agent().start_container(id)
    }

    /// Runs `process` in a running container as `exec_id`; returns its
    /// guest pid.
    pub fn exec(&self, id: &str, exec_id: &str, process: &Process, stdio: Stdio) -> Result<i32> {
        self.known(id)?;
        if process.terminal().unwrap_or(false) != stdio.terminal {
            return Err(Error::Config(
                "process.terminal and the caller's stdio disagree".into(),
            ));
        }
        let json = serde_json::to_vec(process)
            .map_err(|e| Error::Config(format!("serializing the process: {e}")))?;
        let pid = self.agent().exec_process(id, exec_id, json, stdio.spec())?;
        let copies = StdioCopies::start(&self.vsock_uds(), id, exec_id, stdio)?;
        if let Some(c) = self.containers().get_mut(id) {
            c.copies.insert(exec_id.to_string(), copies);
        }
        Ok(pid)
    }

    /// Sends `signal` to a process (the init for an empty `exec_id`), or
    /// with `all` to every process of the container.
    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        self.known(id)?;
        self.agent().signal_process(id, exec_id, signal, all)
    }

    /// Waits for a process to exit and for its output to reach the caller;
    /// returns the shell-style status (code, or 128 + signal).
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        self.known(id)?;
        // A dedicated connection: this call blocks for as long as the
        // process runs.
        let client: AgentClient = self.dial_agent()?;
        let status = client.wait_process(id, exec_id)?;
        let copies = self
            .containers()
            .get_mut(id)
            .and_then(|c| c.copies.remove(exec_id));
        if let Some(mut c) = copies {
            if !c.wait_outputs(OUTPUT_DRAIN) {
                tracing::warn!("output of {id}/{exec_id} still open {OUTPUT_DRAIN:?} after exit");
            }
        }
        Ok(status)
    }

    /// Forgets an exec'd process that has exited, so its id can be used
    /// again and the agent keeps nothing of it.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        self.known(id)?;
        self.agent().remove_process(id, exec_id)?;
        if let Some(c) = self.containers().get_mut(id) {
            c.copies.remove(exec_id);
        }
        Ok(())
    }

    /// Closes a process's stdin (EOF).
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.known(id)?;
        if let Some(c) = self
            .containers()
            .get_mut(id)
            .and_then(|c| c.copies.get_mut(exec_id))
        {
            c.close_stdin();
        }
        Ok(())
    }

    /// Deletes a container whose init has exited, unmounting its rootfs
    /// and volumes from the share.
    pub fn delete_container(&self, id: &str) -> Result<()> {
        self.known(id)?;
        self.agent().remove_container(id)?;
        if let Some(state) = self.containers().remove(id) {
            drop(state);
        }
        if let Some(share) = self.shared_dir() {
            let _ = std::fs::remove_dir_all(share.join(id));
        }
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub fn container_pids(&self, id: &str) -> Result<Vec<i32>> {
        self.known(id)?;
        self.agent().list_processes(id)
    }

    /// cgroup statistics of the container.
    pub fn container_stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.known(id)?;
        self.agent().stats_container(id)
    }

    /// Applies new OCI LinuxResources.
    pub fn update_container(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        self.known(id)?;
        let json = serde_json::to_vec(resources).map_err(|e| Error::Config(e.to_string()))?;
        self.agent().update_container(id, json)
    }

    /// Freezes or thaws the container.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.known(id)?;
        self.agent().set_paused(id, paused)
    }

    /// Resizes a process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        self.known(id)?;
        self.agent().tty_resize(id, exec_id, rows, cols)
    }

    /// Ids of the containers in this sandbox.
    pub fn container_ids(&self) -> Vec<String> {
        self.containers().keys().cloned().collect()
    }

    fn known(&self, id: &str) -> Result<()> {
        if self.containers().contains_key(id) {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "no container {id:?} in sandbox {:?}",
                self.id()
            )))
        }
    }
}
