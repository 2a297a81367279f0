//! `husk exec`: a new process in a running container. The pid callers get
//! is a host relay process (this one, or with `-d` a child re-executed as
//! `__exec`) that forwards stdio and signals and exits with the guest
//! process's status.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use husk_runtime::agent_client::AgentClient;
use husk_runtime::stdio::StdioCopies;
use nix::sys::signal::Signal;
use oci_spec::runtime::Process;

use super::lifecycle::write_pid_file;
use super::relay::{self, HostPty, RawTerminal};
use super::state::{Root, Status};
use super::Global;

/// `exec` flags.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// OCI process JSON to run (instead of the arguments).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Detach: return once the process runs.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the process's host pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Extra environment variables (KEY=value).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// User as uid[:gid].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long)]
    pub additional_gids: Vec<u32>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Host fds cannot enter the VM: only 0 is supported.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Container id, then the command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Arguments of the detached relay (`__exec`).
#[derive(Debug, clap::Args)]
pub struct ExecRelayArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
    /// Process JSON file written by the parent.
    #[arg(long)]
    pub process_file: PathBuf,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Inherited fd to report "ok" or the error on.
    #[arg(long)]
    pub sync_fd: i32,
}

fn build_process(g: &Global, id: &str, a: &ExecArgs, cmd: &[String]) -> Result<Process> {
    if let Some(p) = &a.process {
        let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        return serde_json::from_slice(&text)
            .with_context(|| format!("{} is not an OCI process", p.display()));
    }
    if cmd.is_empty() {
        bail!("exec: no command given (use -p process.json or give arguments)");
    }
    let r = Root::open(&g.root)?.load(id)?;
    let spec = husk_runtime::bundle::load_spec(&r.bundle)?;
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(cmd.to_vec()));
    p.set_terminal(Some(a.tty));
    if let Some(c) = &a.cwd {
        p.set_cwd(c.into());
    }
    let mut env = p.env().clone().unwrap_or_default();
    env.extend(a.env.iter().cloned());
    p.set_env(Some(env));
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u.as_str(), None),
        };
        let mut user = p.user().clone();
        user.set_uid(
            uid.parse()
                .map_err(|_| anyhow!("--user: {u:?} is not uid[:gid]"))?,
        );
        if let Some(g) = gid {
            user.set_gid(
                g.parse()
                    .map_err(|_| anyhow!("--user: {u:?} is not uid[:gid]"))?,
            );
        }
        if !a.additional_gids.is_empty() {
            user.set_additional_gids(Some(a.additional_gids.clone()));
        }
        p.set_user(user);
    }
    Ok(p)
}

/// `husk exec`.
pub fn exec(g: &Global, a: ExecArgs) -> Result<i32> {
    if a.preserve_fds > 0 {
        bail!("--preserve-fds: host file descriptors cannot be passed into a husk VM; use 0");
    }
    let (id, cmd) = a.args.split_first().expect("clap requires the id");
    let root = Root::open(&g.root)?;
    let r = root.load(id)?;
    match r.current_status() {
        Status::Created | Status::Running => {}
        Status::Paused => bail!("cannot exec in a paused container"),
        _ => bail!("cannot exec in a stopped container"),
    }
    let process = build_process(g, id, &a, cmd)?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && a.detach && a.console_socket.is_none() {
        bail!("cannot allocate tty if husk will detach without setting console socket");
    }
    if !a.detach {
        if let Some(p) = &a.pid_file {
            write_pid_file(p, std::process::id() as i32)?;
        }
        return relay_exec(
            &r.vsock_uds,
            id,
            &process,
            a.console_socket.as_deref(),
            None,
        );
    }
    // Detached: a re-executed child relays; we report its pid.
    let dir = root.container_dir(id);
    let pfile = dir.join(format!("exec-{}.json", std::process::id()));
    std::fs::write(&pfile, serde_json::to_vec(&process)?)?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "__exec".into(),
        "--id".into(),
        id.into(),
        "--process-file".into(),
        pfile.clone().into(),
    ];
    if let Some(s) = &a.console_socket {
        args.extend(["--console-socket".into(), s.clone().into()]);
    }
    let relay = g
        .spawn_reporting(args)
        .and_then(|mut r| match r.outcome("exec relay") {
            Ok(()) => Ok(r),
            Err(e) => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                Err(e)
            }
        });
    let _ = std::fs::remove_file(&pfile);
    let child = relay?.child;
    if let Some(p) = &a.pid_file {
        write_pid_file(p, child.id() as i32)?;
    }
    Ok(0)
}

/// `__exec`: the detached relay.
pub fn relay(g: &Global, a: ExecRelayArgs) -> i32 {
    let sync = relay::take_sync_fd(a.sync_fd);
    let res = (|| {
        let r = Root::open(&g.root)?.load(&a.id)?;
        let text = std::fs::read(&a.process_file)?;
        let process: Process = serde_json::from_slice(&text)?;
        let _ = nix::unistd::setsid();
        relay_exec(
            &r.vsock_uds,
            &a.id,
            &process,
            a.console_socket.as_deref(),
            Some(sync),
        )
    })();
    match res {
        Ok(code) => code,
        Err(e) => {
            super::log_error_to_file(g, &format!("{e:#}"));
            1
        }
    }
}

/// Runs `process` in container `id` and relays it until it exits; reports
/// "ok" (or the error) on `sync` once it runs. Returns its exit status.
fn relay_exec(
    uds: &std::path::Path,
    id: &str,
    process: &Process,
    console_socket: Option<&std::path::Path>,
    mut sync: Option<std::fs::File>,
) -> Result<i32> {
    let result = (|| {
        let terminal = process.terminal().unwrap_or(false);
        let pty = match (console_socket, terminal) {
            (Some(s), true) => Some(HostPty::to_console_socket(s)?),
            _ => None,
        };
        if let Some(p) = &pty {
            if sync.is_some() {
                p.become_controlling_terminal()?;
            }
        }
        let stdio = match &pty {
            Some(p) => p.stdio()?,
            None => relay::inherited_stdio(terminal)?,
        };
        let exec_id = format!(
            "exec-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let agent = AgentClient::dial(uds)?;
        let spec = stdio.spec();
        agent.exec_process(id, &exec_id, serde_json::to_vec(process)?, spec)?;
        let copies = StdioCopies::start(uds, id, &exec_id, stdio);
        let copies = match copies {
            Ok(c) => c,
            Err(e) => {
                let _ = agent.signal_process(id, &exec_id, libc::SIGKILL as u32, false);
                return Err(e.into());
            }
        };
        let size_fd = relay::terminal_fd(pty.as_ref(), terminal)?;
        if let Some((rows, cols)) = size_fd.as_ref().and_then(|f| relay::window_size(f.as_fd())) {
            let _ = agent.tty_resize(id, &exec_id, rows, cols);
        }
        Ok((agent, exec_id, copies, size_fd))
    })();
    let (agent, exec_id, mut copies, size_fd) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(mut s) = sync.take() {
                let _ = writeln!(s, "{}", format!("{e:#}").replace('\n', " "));
            }
            return Err(e);
        }
    };
    let detached = sync.is_some();
    if let Some(mut s) = sync.take() {
        relay::detach_std_fds()?;
        s.write_all(b"ok\n")?;
    }
    let signals = AgentClient::dial(uds)?;
    let (sid, seid) = (id.to_string(), exec_id.clone());
    // Foreground with the caller's own terminal: raw, so only the guest's
    // line discipline acts.
    let _raw = (!detached && console_socket.is_none() && size_fd.is_some())
        .then(RawTerminal::on_stdin)
        .flatten();
    relay::forward_signals(move |s| {
        let res = match (&size_fd, s) {
            (Some(fd), Signal::SIGWINCH) => match relay::window_size(fd.as_fd()) {
                Some((rows, cols)) => signals.tty_resize(&sid, &seid, rows, cols),
                None => Ok(()),
            },
            (None, Signal::SIGWINCH) => Ok(()),
            _ => signals.signal_process(&sid, &seid, s as u32, false),
        };
        if let Err(e) = res {
            tracing::debug!("forwarding {s}: {e}");
        }
    })?;
    let waiter = AgentClient::dial(uds)?;
    let status = waiter
        .wait_process(id, &exec_id)
        .map_err(|e| anyhow!("waiting for the exec process: {e}"))?;
    copies.wait_outputs(std::time::Duration::from_secs(10));
    // The agent keeps nothing of a finished exec.
    if let Err(e) = agent.remove_process(id, &exec_id) {
        tracing::debug!("forgetting exec {exec_id}: {e}");
    }
    Ok(status)
}
