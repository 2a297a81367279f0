//! Containers inside the guest, made with youki's libcontainer.
//!
//! The host sends an OCI spec whose paths are already guest paths (rootfs
//! and volumes under the virtio-fs share). The agent writes it as a bundle
//! under [`BUNDLES`], builds the container with libcontainer (state under
//! [`STATE_ROOT`], cgroup v2 at `/sys/fs/cgroup/husk/<id>`), and keeps, per
//! process, its guest pid and stdio ends. Exit statuses come from the
//! reaper (`crate::reaper`).

pub mod cgroup;
pub mod executor;
mod forked;
pub mod procs;
pub mod stdio;
pub mod sysctl;

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocols::agent::StdioSpec;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::reaper::exits;
use stdio::{ChildStdio, ProcessIo};

/// libcontainer's state directory.
pub const STATE_ROOT: &str = "/run/husk-agent/containers";
/// Where the agent writes each container's bundle (config.json, exec specs).
pub const BUNDLES: &str = "/run/husk-agent/bundles";

/// Where console sockets for libcontainer are bound (briefly).
const CONSOLE_SOCKETS: &str = "/run/husk-agent/tty";
/// How long a terminal process may take to hand over its pty.
const PTY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of container operations, each mapped to a ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The container is in the wrong state for this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation failed in the guest.
    #[error("{0}")]
    Internal(String),
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        use ttrpc::Code;
        let code = match &e {
            ContainerError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ContainerError::NotFound(_) => Code::NOT_FOUND,
            ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ContainerError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ContainerError::Internal(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

type Result<T> = std::result::Result<T, ContainerError>;

fn internal(what: &str) -> impl FnOnce(String) -> ContainerError + '_ {
    move |e| ContainerError::Internal(format!("{what}: {e}"))
}

/// Checks a container or exec id (it names files in the guest).
pub fn validate_id(id: &str, what: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!(
            "invalid {what} {id:?}: use letters, digits, '-', '_', '.', '+'"
        )))
    }
}

/// One process of a container.
#[derive(Debug)]
pub struct ProcessEntry {
    /// Guest pid.
    pub pid: i32,
    /// Its stdio ends.
    pub io: ProcessIo,
}

/// One container.
#[derive(Debug)]
struct ContainerEntry {
    init: Arc<ProcessEntry>,
    execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
    cgroup: PathBuf,
    bundle: PathBuf,
}

/// All containers of the sandbox.
#[derive(Debug, Default)]
pub struct Manager {
    containers: Mutex<HashMap<String, Arc<ContainerEntry>>>,
}

/// Stdio wiring prepared before libcontainer runs the process.
enum Wiring {
    Pipes(ProcessIo, ChildStdio),
    Terminal(UnixListener, PathBuf),
}

/// A fresh console socket path, short whatever the ids (sun_path holds
/// 108 bytes; container and exec ids may be 64 characters each).
fn console_socket_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Path::new(CONSOLE_SOCKETS).join(format!("{n}.sock"))
}

fn prepare_stdio(spec: &StdioSpec) -> Result<Wiring> {
    if spec.terminal {
        let console_path = &console_socket_path();
        std::fs::create_dir_all(CONSOLE_SOCKETS)
            .map_err(|e| internal("creating the console socket directory")(e.to_string()))?;
        let _ = std::fs::remove_file(console_path);
        let l = UnixListener::bind(console_path)
            .map_err(|e| internal("binding the console socket")(e.to_string()))?;
        Ok(Wiring::Terminal(l, console_path.to_path_buf()))
    } else {
        let (io, child) = ProcessIo::pipes(spec.stdin)
            .map_err(|e| internal("creating stdio pipes")(e.to_string()))?;
        Ok(Wiring::Pipes(io, child))
    }
}

/// Runs `build` with the stdio wiring and returns the pid and the agent's
/// ends of the process's stdio.
fn with_stdio(
    wiring: Wiring,
    builder: ContainerBuilder,
    build: impl FnOnce(ContainerBuilder) -> std::result::Result<i32, String>,
) -> Result<(i32, ProcessIo)> {
    match wiring {
        Wiring::Pipes(io, child) => {
            let b = builder
                .with_stdin(child.stdin)
                .with_stdout(child.stdout)
                .with_stderr(child.stderr);
            let pid = forked::run_in_forked_child(|| build(b)).map_err(ContainerError::Internal)?;
            Ok((pid, io))
        }
        Wiring::Terminal(listener, path) => {
            let b = builder.with_console_socket(Some(&path));
            let (tx, rx) = std::sync::mpsc::channel();
            let l = listener;
            let t = std::thread::spawn(move || {
                let _ = tx.send(stdio::receive_pty_master(&l, PTY_TIMEOUT));
            });
            let res = forked::run_in_forked_child(|| build(b));
            let master = rx
                .recv()
                .map_err(|e| ContainerError::Internal(e.to_string()))?;
            let _ = t.join();
            let _ = std::fs::remove_file(&path);
            let pid = res.map_err(ContainerError::Internal)?;
            let master = master.map_err(|e| internal("receiving the pty master")(e.to_string()))?;
            Ok((pid, ProcessIo::terminal(master)))
        }
    }
}

fn builder(id: &str) -> Result<ContainerBuilder> {
    ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_executor(executor::AgentExecutor)
        .with_root_path(STATE_ROOT)
        .map_err(|e| internal("libcontainer state root")(e.to_string()))
}

fn load(id: &str) -> Result<Container> {
    Container::load(Path::new(STATE_ROOT).join(id))
        .map_err(|e| ContainerError::NotFound(format!("container {id:?}: {e}")))
}

/// Renders a libcontainer error with its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl Manager {
    fn get(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("no container {id:?} in this sandbox")))
    }

    /// A process of a container: its init for an empty `exec_id`.
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<ProcessEntry>> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
        execs.get(exec_id).cloned().ok_or_else(|| {
            ContainerError::NotFound(format!("no exec {exec_id:?} in container {id:?}"))
        })
    }

    /// Creates a container (its init waits for [`Manager::start`]).
    pub fn create(&self, id: &str, spec_json: &[u8], stdio_spec: &StdioSpec) -> Result<i32> {
        validate_id(id, "container id")?;
        if self.get(id).is_ok() {
            return Err(ContainerError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        let mut spec: Spec = serde_json::from_slice(spec_json)
            .map_err(|e| ContainerError::InvalidArgument(format!("invalid OCI spec: {e}")))?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| ContainerError::InvalidArgument("OCI spec has no root".into()))?;
        if !root.is_dir() {
            return Err(ContainerError::InvalidArgument(format!(
                "container rootfs {root:?} does not exist in the guest"
            )));
        }
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal != stdio_spec.terminal {
            return Err(ContainerError::InvalidArgument(format!(
                "process.terminal is {terminal} in the spec but the stdio request says {}",
                stdio_spec.terminal
            )));
        }
        let net_sysctls = sysctl::take_shared_net_sysctls(&mut spec)?;
        sysctl::apply(&net_sysctls)?;
        let cgroups_path = PathBuf::from(format!("/husk/{id}"));
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(Some(cgroups_path.clone()));
        }
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| internal("creating the bundle")(e.to_string()))?;
        let cleanup = |e: ContainerError| {
            let _ = std::fs::remove_dir_all(&bundle);
            e
        };
        spec.save(bundle.join("config.json"))
            .map_err(|e| cleanup(internal("writing config.json")(e.to_string())))?;
        let wiring = prepare_stdio(stdio_spec).map_err(cleanup)?;
        let b = builder(id).map_err(cleanup)?;
        let bundle2 = bundle.clone();
        let (pid, io) = with_stdio(wiring, b, move |b| {
            let c = b
                .as_init(&bundle2)
                // The guest's root is the initramfs (rootfs), which
                // pivot_root(2) cannot move: enter the container rootfs with
                // MS_MOVE + chroot instead, as `runc --no-pivot` does.
                .with_no_pivot(true)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating container: {}", chain(&e)))?;
            c.pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "container has no pid".to_string())
        })
        .map_err(|e| {
            // libcontainer may have left state behind on failure.
            if let Ok(mut c) = load(id) {
                let _ = c.delete(true);
            }
            cleanup(e)
        })?;
        crate::reaper::watch(pid);
        let entry = ContainerEntry {
            init: Arc::new(ProcessEntry { pid, io }),
            execs: Mutex::new(HashMap::new()),
            cgroup: cgroup::cgroup_dir(&cgroups_path),
            bundle,
        };
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Arc::new(entry));
        Ok(pid)
    }

    /// Runs the container's process.
    pub fn start(&self, id: &str) -> Result<()> {
        self.get(id)?;
        load(id)?.start().map_err(|e| {
            ContainerError::FailedPrecondition(format!("starting {id:?}: {}", chain(&e)))
        })
    }

    /// Runs another process in a container.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio_spec: &StdioSpec,
    ) -> Result<i32> {
        validate_id(exec_id, "exec id")?;
        let c = self.get(id)?;
        if c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(exec_id)
        {
            return Err(ContainerError::AlreadyExists(format!(
                "exec {exec_id:?} already exists in {id:?}"
            )));
        }
        if exits().get(c.init.pid).is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        let process: Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::InvalidArgument(format!("invalid OCI process: {e}")))?;
        if process.terminal().unwrap_or(false) != stdio_spec.terminal {
            return Err(ContainerError::InvalidArgument(
                "process.terminal and the stdio request disagree".into(),
            ));
        }
        let path = c.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process_json)
            .map_err(|e| internal("writing the exec spec")(e.to_string()))?;
        let wiring = prepare_stdio(stdio_spec)?;
        let b = builder(id)?;
        let res = with_stdio(wiring, b, |b| {
            b.as_tenant()
                .with_detach(true)
                .with_process(Some(&path))
                .build()
                .map(|p| p.as_raw())
                .map_err(|e| format!("exec in {id:?}: {}", chain(&e)))
        });
        let _ = std::fs::remove_file(&path);
        let (pid, io) = res?;
        crate::reaper::watch(pid);
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(exec_id.to_string(), Arc::new(ProcessEntry { pid, io }));
        Ok(pid)
    }

    /// Sends `signal` to a process, or with `all` to every process of the
    /// container.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("invalid signal {signal}")))?;
        let c = self.get(id)?;
        let targets = if all {
            cgroup::pids(&c.cgroup).map_err(|e| internal("reading cgroup.procs")(e.to_string()))?
        } else {
            let p = self.process(id, exec_id)?;
            if exits().get(p.pid).is_some() {
                return Err(ContainerError::NotFound(format!(
                    "process {} has already exited",
                    p.pid
                )));
            }
            vec![p.pid]
        };
        for pid in targets {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(internal("kill")(e.to_string())),
            }
        }
        Ok(())
    }

    /// Blocks until a process exits; returns its shell-style status.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        let p = self.process(id, exec_id)?;
        Ok(exits().wait(p.pid))
    }

    /// Forgets an exec'd process that has exited (its id may be reused).
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "RemoveProcess takes an exec id; remove the container to forget its init".into(),
            ));
        }
        let c = self.get(id)?;
        let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
        let p = execs.get(exec_id).cloned().ok_or_else(|| {
            ContainerError::NotFound(format!("no exec {exec_id:?} in container {id:?}"))
        })?;
        if exits().get(p.pid).is_none() {
            return Err(ContainerError::FailedPrecondition(format!(
                "exec {exec_id:?} of {id:?} is still running: kill it first"
            )));
        }
        execs.remove(exec_id);
        exits().forget(p.pid);
        Ok(())
    }

    /// Removes a container whose init has exited.
    pub fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        if exits().get(c.init.pid).is_none() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is still running: kill it first"
            )));
        }
        if let Ok(mut lc) = load(id) {
            lc.delete(true)
                .map_err(|e| internal("deleting the container")(chain(&e)))?;
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        exits().forget(c.init.pid);
        for e in c.execs.lock().unwrap_or_else(|p| p.into_inner()).values() {
            exits().forget(e.pid);
        }
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// Pids of the container's processes.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>> {
        let c = self.get(id)?;
        cgroup::pids(&c.cgroup).map_err(|e| internal("reading cgroup.procs")(e.to_string()))
    }

    /// Applies new resource limits.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let res: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::InvalidArgument(format!("invalid OCI resources: {e}")))?;
        let c = self.get(id)?;
        cgroup::update(&c.cgroup, &res).map_err(|e| internal("updating cgroup")(e.to_string()))
    }

    /// The container's cgroup directory.
    pub fn cgroup(&self, id: &str) -> Result<PathBuf> {
        Ok(self.get(id)?.cgroup.clone())
    }

    /// Ids and cgroup directories of all containers (for the OOM watcher).
    pub fn cgroups(&self) -> Vec<(String, PathBuf)> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, c)| (id.clone(), c.cgroup.clone()))
            .collect()
    }

    /// Freezes or thaws the container.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.get(id)?;
        let mut c = load(id)?;
        let r = if paused { c.pause() } else { c.resume() };
        r.map_err(|e| ContainerError::FailedPrecondition(chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_files_safely() {
        validate_id("c1", "id").unwrap();
        validate_id("a.b-c_d+e", "id").unwrap();
        for bad in ["", ".", "..", "a/b", "a b", "\0", &"x".repeat(129)] {
            assert!(validate_id(bad, "id").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_map_to_ttrpc_codes() {
        let e: ttrpc::Error = ContainerError::NotFound("no c".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "no c");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_containers_are_not_found() {
        let m = Manager::default();
        assert!(matches!(m.start("nope"), Err(ContainerError::NotFound(_))));
        assert!(matches!(
            m.wait("nope", ""),
            Err(ContainerError::NotFound(_))
        ));
        assert!(matches!(
            m.create("bad/id", b"{}", &StdioSpec::new()),
            Err(ContainerError::InvalidArgument(_))
        ));
        assert!(matches!(
            m.create("c1", b"not json", &StdioSpec::new()),
            Err(ContainerError::InvalidArgument(_))
        ));
    }
}
