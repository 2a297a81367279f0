//! create, start, run, state, kill, delete, list: runc's lifecycle over a
//! monitor process per container (see `monitor`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use husk_runtime::agent_client::AgentClient;
use nix::sys::signal::Signal;

use super::state::{self, Record, Root, Status};
use super::{relay, Global};

/// `create` and `run` flags.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Path to the bundle (the directory holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Unix socket that receives the pty master (SCM_RIGHTS) when the
    /// process has a terminal.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the container's host pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest never pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds to pass (beyond stdio); host fds cannot enter the VM, so
    /// only 0 is supported.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Container id.
    pub id: String,
}

/// `run` flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Detach: return once the container runs.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the container's state after it exits (foreground only).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub create: CreateArgs,
}

/// Writes `pid` to `path` atomically, without a newline (as runc does).
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension(format!("husk-tmp-{}", std::process::id()));
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing the pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the pid file {}", path.display()))
}

fn user_name() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn sandbox_id(root: &Path, id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (root, id, std::process::id(), state::now_rfc3339()).hash(&mut h);
    format!("oci-{:016x}", h.finish())
}

/// Spawns the monitor for a new container and waits until it reports the
/// container created. Returns the monitor's pid.
fn spawn_monitor(
    g: &Global,
    a: &CreateArgs,
    run_foreground: bool,
) -> Result<(Record, std::process::Child)> {
    if a.preserve_fds > 0 {
        bail!("--preserve-fds: host file descriptors cannot be passed into a husk VM; use 0");
    }
    let root = Root::open(&g.root)?;
    let bundle = std::fs::canonicalize(&a.bundle)
        .with_context(|| format!("bundle {} does not exist", a.bundle.display()))?;
    state::validate_id(&a.id)?;
    let spec = husk_runtime::bundle::load_spec(&bundle)?;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && a.console_socket.is_none() && !run_foreground {
        bail!("cannot allocate tty if husk will detach without setting console socket");
    }
    if !terminal && a.console_socket.is_some() {
        bail!("cannot use console socket if husk will not detach or allocate tty");
    }
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| bundle.join(r.path()))
        .ok_or_else(|| anyhow!("config.json has no root.path"))?;
    let annotations: BTreeMap<String, String> = spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let sandbox_id = sandbox_id(&g.root, &a.id);
    let run_dir = husk_runtime::RuntimeConfig::from_env()?.run_root;
    root.reserve(&a.id)?;
    let record = Record {
        id: a.id.clone(),
        bundle: bundle.clone(),
        rootfs,
        created: state::now_rfc3339(),
        owner: user_name(),
        annotations,
        pid: 0,
        pid_start: 0,
        status: Status::Creating,
        exit_status: None,
        sandbox_dir: run_dir.join(&sandbox_id),
        vsock_uds: PathBuf::new(),
    };
    let undo = |root: &Root, r: &Record| {
        husk_runtime::remains::remove_sandbox_remains(&r.sandbox_dir);
        let _ = root.remove(&r.id);
    };
    if let Err(e) = root.save(&record) {
        undo(&root, &record);
        return Err(e);
    }

    let mut args: Vec<std::ffi::OsString> = vec![
        "__monitor".into(),
        "--id".into(),
        a.id.clone().into(),
        "--bundle".into(),
        bundle.clone().into(),
        "--sandbox-id".into(),
        sandbox_id.into(),
    ];
    if let Some(c) = &a.console_socket {
        args.extend(["--console-socket".into(), c.clone().into()]);
    }
    let mut monitor = match g.spawn_reporting(args) {
        Ok(m) => m,
        Err(e) => {
            undo(&root, &record);
            return Err(e);
        }
    };
    if let Err(e) = monitor.outcome("monitor") {
        let _ = monitor.child.kill();
        let _ = monitor.child.wait();
        undo(&root, &record);
        return Err(e);
    }
    let child = monitor.child;
    let record = root.load(&a.id)?;
    if let Some(p) = &a.pid_file {
        if let Err(e) = write_pid_file(p, record.pid) {
            let _ = delete(g, &a.id, true);
            return Err(e);
        }
    }
    Ok((record, child))
}

/// `husk create`.
pub fn create(g: &Global, a: CreateArgs) -> Result<i32> {
    spawn_monitor(g, &a, false)?;
    Ok(0)
}

/// `husk start`.
pub fn start(g: &Global, id: &str) -> Result<i32> {
    let root = Root::open(&g.root)?;
    let r = root.load(id)?;
    match r.current_status() {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Creating => bail!("cannot start a container that is still being created"),
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
    }
    let _lock = root.lock(id)?;
    AgentClient::dial(&r.vsock_uds)?.start_container(id)?;
    let mut r = root.load(id)?;
    if r.status == Status::Created {
        r.status = Status::Running;
        root.save(&r)?;
    }
    Ok(0)
}

/// `husk run`: create, start, and unless detached wait and delete.
pub fn run(g: &Global, a: RunArgs) -> Result<i32> {
    let (record, mut child) = spawn_monitor(g, &a.create, !a.detach)?;
    if let Err(e) = start(g, &record.id) {
        let _ = delete(g, &record.id, true);
        return Err(e);
    }
    if a.detach {
        return Ok(0);
    }
    let terminal = husk_runtime::bundle::load_spec(&record.bundle)
        .ok()
        .and_then(|s| s.process().as_ref().and_then(|p| p.terminal()))
        .unwrap_or(false);
    // The container uses our terminal: raw, so only the guest's line
    // discipline acts.
    let _raw = (terminal && a.create.console_socket.is_none())
        .then(relay::RawTerminal::on_stdin)
        .flatten();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    relay::forward_signals(move |s| {
        let _ = nix::sys::signal::kill(pid, s);
    })?;
    let status = child.wait().context("waiting for the container")?;
    let code = status
        .code()
        .or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s))
        .unwrap_or(255);
    if !a.keep {
        delete(g, &record.id, true)?;
    }
    Ok(code)
}

/// `husk state`.
pub fn state(g: &Global, id: &str) -> Result<i32> {
    let r = Root::open(&g.root)?.load(id)?;
    println!("{}", serde_json::to_string_pretty(&r.oci_state())?);
    Ok(0)
}

/// Parses a signal as runc does: a number, or a name with or without SIG.
pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| anyhow!("unknown signal {s:?}"));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>()
        .map_err(|_| anyhow!("unknown signal {s:?}"))
}

/// `husk kill`.
pub fn kill(g: &Global, id: &str, signal: &str, all: bool) -> Result<i32> {
    let sig = parse_signal(signal)?;
    let r = Root::open(&g.root)?.load(id)?;
    match r.current_status() {
        Status::Stopped => bail!("container not running"),
        Status::Creating => bail!("container is still being created"),
        _ => {}
    }
    AgentClient::dial(&r.vsock_uds)?.signal_process(id, "", sig as u32, all)?;
    Ok(0)
}

/// `husk delete`.
pub fn delete(g: &Global, id: &str, force: bool) -> Result<i32> {
    let root = Root::open(&g.root)?;
    let r = match root.load(id) {
        Ok(r) => r,
        Err(e) => {
            // A create that died before writing its record leaves a bare
            // directory: -f removes it, as runc does.
            if force && state::validate_id(id).is_ok() {
                let _ = root.remove(id);
                return Ok(0);
            }
            return Err(e);
        }
    };
    let status = r.current_status();
    if matches!(status, Status::Running | Status::Paused) && !force {
        bail!(
            "cannot delete container {id} that is not stopped: {}",
            status.as_str()
        );
    }
    if r.monitor_alive() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.monitor_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    husk_runtime::remains::remove_sandbox_remains(&r.sandbox_dir);
    // A monitor that was killed left its (now empty) host cgroup.
    if let Some(path) = husk_runtime::bundle::load_spec(&r.bundle)
        .ok()
        .and_then(|s| husk_runtime::host_cgroup::cgroups_path_of(&s))
    {
        husk_runtime::host_cgroup::HostCgroup::remove(&path);
    }
    root.remove(id)?;
    Ok(0)
}

/// `husk list`.
pub fn list(g: &Global, format: &str, quiet: bool) -> Result<i32> {
    let root = Root::open(&g.root)?;
    let records: Vec<Record> = root
        .ids()?
        .iter()
        .filter_map(|id| root.load(id).ok())
        .collect();
    if quiet {
        for r in &records {
            println!("{}", r.id);
        }
        return Ok(0);
    }
    match format {
        "json" => {
            let states: Vec<_> = records.iter().map(Record::oci_state).collect();
            if states.is_empty() {
                println!("null");
            } else {
                println!("{}", serde_json::to_string(&states)?);
            }
        }
        "table" => {
            let mut rows = vec![[
                "ID".to_string(),
                "PID".into(),
                "STATUS".into(),
                "BUNDLE".into(),
                "CREATED".into(),
                "OWNER".into(),
            ]];
            for r in &records {
                let s = r.oci_state();
                let v = serde_json::to_value(&s)?;
                rows.push([
                    r.id.clone(),
                    v["pid"].to_string(),
                    v["status"].as_str().unwrap_or_default().to_string(),
                    r.bundle.display().to_string(),
                    r.created.clone(),
                    r.owner.clone(),
                ]);
            }
            print!("{}", tabulate(&rows));
        }
        f => bail!("invalid format option {f:?}: use table or json"),
    }
    Ok(0)
}

/// Columns padded like Go's tabwriter with minwidth 12, padding 1 (runc's
/// list and ps tables).
pub fn tabulate<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count() + 1).max(12);
        }
    }
    let mut out = String::new();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            if i + 1 == N {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}", w = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_like_runc() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn tables_pad_to_twelve() {
        let t = tabulate(&[["ID".to_string(), "PID".into()], ["abc".into(), "1".into()]]);
        assert_eq!(t, "ID          PID\nabc         1\n");
    }
}
