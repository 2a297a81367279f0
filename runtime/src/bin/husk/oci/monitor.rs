//! The monitor: the host process whose pid `husk create` hands out. It
//! boots the sandbox VM, creates the container in it, relays the
//! container's stdio (the caller's fds, or a pty given to the console
//! socket) and signals, and exits with the container's exit status once
//! the VM is gone. It owns the VM: the VMM and helpers die with it
//! (PDEATHSIG), so its pid lives exactly as long as the container.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result};
use husk_runtime::agent_client::AgentClient;
use husk_runtime::host::HostProbe;
use husk_runtime::{RuntimeConfig, Sandbox};
use nix::sys::signal::Signal;

use super::relay::{self, HostPty};
use super::state::{self, Root, Status};
use super::Global;

/// Arguments `create` passes to the monitor it spawns.
#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
    /// Absolute bundle path.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Sandbox id (names the VM's directory under the husk run dir).
    #[arg(long)]
    pub sandbox_id: String,
    /// Where to send the pty master when the process has a terminal.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Inherited fd on which to report "ok" or the error of creation.
    #[arg(long)]
    pub sync_fd: i32,
}

/// Runs the monitor; returns the exit status to exit with.
pub fn run(g: &Global, a: MonitorArgs) -> i32 {
    let mut sync = Some(relay::take_sync_fd(a.sync_fd));
    match monitor(g, &a, &mut sync) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            super::log_error_to_file(g, &msg);
            if let Some(mut s) = sync.take() {
                let _ = writeln!(s, "{}", msg.replace('\n', " "));
            }
            1
        }
    }
}

fn monitor(g: &Global, a: &MonitorArgs, sync: &mut Option<std::fs::File>) -> Result<i32> {
    let root = Root::open(&g.root)?;
    // Recorded first, so a `delete -f` finds this process even if the
    // `create` that spawned it was killed before it could record it.
    let me = std::process::id() as i32;
    let me_start = state::process_start_time(me).unwrap_or_default();
    root.update(&a.id, |r| {
        r.pid = me;
        r.pid_start = me_start;
    })?;
    let spec = husk_runtime::bundle::load_spec(&a.bundle)?;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let pty = match (&a.console_socket, terminal) {
        (Some(sock), true) => Some(HostPty::to_console_socket(sock)?),
        _ => None,
    };
    match &pty {
        Some(p) => p.become_controlling_terminal()?,
        None => {
            // Out of the caller's session: its terminal's job control and
            // hangups are not ours.
            let _ = nix::unistd::setsid();
        }
    }
    let stdio = match &pty {
        Some(p) => p.stdio()?,
        None => relay::inherited_stdio(terminal)?,
    };
    let size_fd = relay::terminal_fd(pty.as_ref(), terminal)?;

    let mut cfg = RuntimeConfig::from_env()?;
    // A network namespace podman (or CNI) prepared: the VM takes over its interfaces.
    cfg.network_namespace = serde_json::to_value(&spec)
        .ok()
        .and_then(|v| husk_runtime::network::netns_of_spec(&v));
    // The VM's host processes go into the container's cgroup, as runc's
    // processes would: the caller's limits and stats (podman's) cover the
    // VM. Left (and removed) when this function returns, after the VM.
    let _cgroup = husk_runtime::host_cgroup::cgroups_path_of(&spec)
        .map(|p| husk_runtime::host_cgroup::HostCgroup::join(&p))
        .transpose()?;
    let host = HostProbe::detect();
    let sb = Sandbox::start(&cfg, &host, &a.sandbox_id)?;
    sb.create_container(&a.id, &a.bundle, stdio)?;
    if let Some((rows, cols)) = size_fd.as_ref().and_then(|f| relay::window_size(f.as_fd())) {
        let _ = sb.resize(&a.id, "", rows, cols);
    }
    root.update(&a.id, |r| {
        r.status = Status::Created;
        r.sandbox_dir = sb.dir().to_path_buf();
        r.vsock_uds = sb.vsock_uds();
    })?;
    relay::detach_std_fds()?;
    if let Some(mut s) = sync.take() {
        s.write_all(b"ok\n").context("reporting to husk create")?;
    }

    let signals = AgentClient::dial(&sb.vsock_uds())?;
    let id = a.id.clone();
    relay::forward_signals(move |s| {
        let res = if s == Signal::SIGWINCH {
            let size = size_fd.as_ref().and_then(|f| relay::window_size(f.as_fd()));
            match size {
                Some((rows, cols)) => signals.tty_resize(&id, "", rows, cols),
                None => Ok(()),
            }
        } else {
            signals.signal_process(&id, "", s as u32, false)
        };
        if let Err(e) = res {
            tracing::debug!("forwarding {s}: {e}");
        }
    })?;

    let status = match sb.wait(&a.id, "") {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("waiting for container {}: {e}", a.id);
            128 + libc::SIGKILL
        }
    };
    let _ = sb.delete_container(&a.id);
    if let Err(e) = sb.stop() {
        tracing::warn!("stopping the sandbox of {}: {e}", a.id);
    }
    // `delete -f` may have removed the record meanwhile: then there is
    // nothing to update.
    let _ = root.update(&a.id, |r| {
        r.status = Status::Stopped;
        r.exit_status = Some(status);
    });
    Ok(status)
}
