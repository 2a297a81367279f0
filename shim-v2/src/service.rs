//! The Task service containerd talks to: one sandbox VM per shim, every
//! container of the pod in it.
//!
//! Lock discipline: `sandbox` and `tasks` are never held together; slow
//! sandbox calls run without the task table locked. A started process gets
//! a waiter thread that blocks on the agent's WaitProcess over its own
//! connection (the sandbox stays unlocked meanwhile), then drains its
//! output, files the exit, wakes `Wait` callers and publishes TaskExit.
//! A sandbox gets one OOM watcher thread that blocks on the agent's
//! GetOomEvent (also on its own connection) and publishes TaskOOM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api::{self, Status};
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal};
use husk_runtime::host_cgroup::HostCgroup;
use husk_runtime::{Sandbox, Stdio};

use crate::error::{Result, ShimError};
use crate::owner::SandboxOwner;

mod task;

/// One process (a container's init, or an exec) as containerd sees it.
#[derive(Debug)]
struct Proc {
    pid: u32,
    status: Status,
    exit: Option<(u32, Timestamp)>,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// Opened stdio waiting for Start (execs: husk runs them on Start).
    pending_stdio: Option<Stdio>,
    /// The OCI process of an exec, until Start.
    pending_spec: Option<oci_spec::runtime::Process>,
}

/// One container.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    rootfs_mounted: bool,
    procs: HashMap<String, Proc>,
    /// OOM kills published as TaskOOM so far (the cgroup's count then).
    ooms: u64,
}

/// State shared by the service and its waiter threads.
struct Inner {
    namespace: String,
    sandbox_id: String,
    publisher: RemotePublisher,
    owner: SandboxOwner,
    sandbox: Mutex<Option<Sandbox>>,
    /// The host cgroup this shim and its VM joined (the sandbox
    /// container's `linux.cgroupsPath`), left when the sandbox stops.
    host_cgroup: Mutex<Option<HostCgroup>>,
    /// The config file to read when the sandbox starts, and whether it
    /// must exist.
    config: Mutex<(PathBuf, bool)>,
    /// The guest console goes to the log when the VM stops.
    debug_console: std::sync::atomic::AtomicBool,
    tasks: Mutex<HashMap<String, Container>>,
    exited: Condvar,
    exit: Arc<ExitSignal>,
    /// This shim's listening socket (`unix://...`), removed on shutdown.
    socket: String,
}

/// containerd's Task API for one husk sandbox.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(id: &str, exec_id: &str) -> ShimError {
    if exec_id.is_empty() {
        ShimError::NotFound(format!("container {id:?}"))
    } else {
        ShimError::NotFound(format!("process {exec_id:?} of container {id:?}"))
    }
}

impl TaskService {
    /// A service for sandbox `sandbox_id` in containerd namespace
    /// `namespace`, publishing events through `publisher`, listening on
    /// `socket`; `exit` is signalled by Shutdown.
    pub fn new(
        namespace: &str,
        sandbox_id: &str,
        socket: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Result<TaskService> {
        Ok(TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                sandbox_id: sandbox_id.to_string(),
                publisher,
                owner: SandboxOwner::spawn()?,
                sandbox: Mutex::new(None),
                host_cgroup: Mutex::new(None),
                config: Mutex::new(crate::config::config_path(
                    None,
                    std::env::var(crate::config::CONFIG_ENV).ok(),
                )),
                debug_console: Default::default(),
                tasks: Mutex::new(HashMap::new()),
                exited: Condvar::new(),
                exit,
                socket: socket.to_string(),
            }),
        })
    }
}

impl Inner {
    fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) =
            self.publisher
                .publish(Context::default(), &topic, &self.namespace, Box::new(event))
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// Runs `f` on the sandbox (which must be running).
    fn with_sb<T>(&self, f: impl FnOnce(&Sandbox) -> husk_runtime::Result<T>) -> Result<T> {
        let g = lock(&self.sandbox);
        let sb = g
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition("the sandbox VM is not running".into()))?;
        Ok(f(sb)?)
    }

    /// Whether the sandbox VM has ended by itself (killed, crashed).
    fn vm_gone(&self) -> bool {
        lock(&self.sandbox)
            .as_mut()
            .is_some_and(|sb| matches!(sb.try_exit(), Ok(Some(_)) | Err(_)))
    }

    /// Moves this shim back to its own cgroup and removes the sandbox's
    /// (the VM's processes are gone by then).
    fn leave_host_cgroup(&self) {
        drop(lock(&self.host_cgroup).take());
    }

    /// Whether the sandbox VM has ended, or ends within `grace`.
    fn vm_gone_within(&self, grace: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + grace;
        loop {
            if self.vm_gone() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The interesting end of the guest console log.
    fn console_tail(&self) -> String {
        lock(&self.sandbox)
            .as_ref()
            .map(|sb| husk_runtime::sandbox::console_excerpt(&sb.dir().join("console.log")))
            .unwrap_or_default()
    }

    /// Runs `f` on a process's record.
    fn with_proc<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut Proc) -> T) -> Result<T> {
        let mut tasks = lock(&self.tasks);
        let p = tasks
            .get_mut(id)
            .and_then(|c| c.procs.get_mut(exec_id))
            .ok_or_else(|| not_found(id, exec_id))?;
        Ok(f(p))
    }

    /// OOM watcher thread body: publishes TaskOOM for every OOM kill the
    /// agent reports, until the sandbox is stopped or its VM is gone.
    fn watch_oom(&self, mut client: husk_runtime::agent_client::AgentClient) {
        loop {
            // No timeout: a request given up on would still take the next
            // event in the agent, and it would be lost.
            match client.next_oom_event(std::time::Duration::ZERO) {
                Ok(id) => self.publish_ooms(&id, true),
                Err(e) => {
                    // The connection broke: the VM stopped or died. Dial
                    // again only while the sandbox is still in use.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    match self.with_sb(|sb| sb.dial_agent()) {
                        Ok(c) => {
                            log::warn!("OOM events: {e}; dialled the agent again");
                            client = c;
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Publishes TaskOOM for container `id` if its cgroup counts more OOM
    /// kills than were published. Both the OOM watcher (`reported`: the
    /// agent saw one) and the exit of a SIGKILLed process call this, so an
    /// OOM kill is published once, before its TaskExit, even when the
    /// container is deleted before the agent's watcher looks.
    fn publish_ooms(&self, id: &str, reported: bool) {
        let count = self
            .with_sb(|sb| sb.container_stats(id))
            .map(|s| s.oom_kills);
        {
            let mut tasks = lock(&self.tasks);
            let Some(c) = tasks.get_mut(id) else {
                return;
            };
            let n = match count {
                Ok(n) => n,
                Err(_) if reported => c.ooms + 1,
                Err(_) => return,
            };
            if n <= c.ooms {
                return;
            }
            c.ooms = n;
        }
        log::info!("container {id} was OOM-killed");
        self.publish(TaskOOM {
            container_id: id.to_string(),
            ..Default::default()
        });
    }

    /// Starts the sandbox VM for the first container (sized by its
    /// bundle, see [`crate::config`]), with its OOM watcher.
    fn ensure_sandbox(self: &Arc<Self>, bundle: &Path) -> Result<()> {
        use std::sync::atomic::Ordering;
        let mut sb = lock(&self.sandbox);
        if sb.is_some() {
            return Ok(());
        }
        let (path, required) = lock(&self.config).clone();
        let (cfg, debug) = crate::config::sandbox_config(&path, required, bundle)?;
        self.debug_console.store(debug, Ordering::Relaxed);
        log::info!(
            "starting sandbox {} ({} vCPU, {} MiB, config {:?}) under {:?}",
            self.sandbox_id,
            cfg.vcpus,
            cfg.memory_mib,
            path,
            cfg.run_root
        );
        // The VM's host processes go where runc would put the sandbox
        // container's: the kubelet's pod cgroup covers the whole VM.
        let cgroups_path = crate::config::cgroups_path(bundle)?;
        if let Some(path) = &cgroups_path {
            let cg = HostCgroup::join(path)?;
            log::info!("joined host cgroup {:?}", cg.leaves());
            *lock(&self.host_cgroup) = Some(cg);
        }
        let started = self.owner.start(cfg, &self.sandbox_id).inspect_err(|_| {
            self.leave_host_cgroup();
        })?;
        log::info!(
            "sandbox {} ready in {} ms on {:?}",
            self.sandbox_id,
            started.ready_after().as_millis(),
            started.backend()
        );
        let client = started.dial_agent()?;
        *sb = Some(started);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || me.watch_oom(client))
            .map_err(|e| ShimError::io("starting the OOM watcher thread", e))?;
        Ok(())
    }

    fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.as_str();
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unsupported("checkpoint/restore"));
        }
        if lock(&self.tasks).contains_key(id) {
            return Err(ShimError::AlreadyExists(format!("container {id:?}")));
        }
        let bundle = PathBuf::from(&req.bundle);
        if let Some(o) = req.options.as_ref() {
            if let Some(p) = crate::config::options_config_path(&o.type_url, &o.value) {
                *lock(&self.config) = (PathBuf::from(p), true);
            }
        }
        self.ensure_sandbox(&bundle)?;
        let rootfs_mounted = crate::rootfs::mount_all(&bundle, &req.rootfs)?;
        let undo = || {
            if rootfs_mounted {
                crate::rootfs::unmount(&bundle);
            }
        };
        let stdio = crate::io::open_stdio(
            &req.stdin,
            &req.stdout,
            &req.stderr,
            req.terminal,
            (id, &self.namespace),
        )
        .inspect_err(|_| undo())?;
        let pid = self
            .with_sb(|sb| sb.create_container(id, &bundle, stdio))
            .inspect_err(|_| undo())?;
        let pid = u32::try_from(pid).unwrap_or(0);
        let init = Proc {
            pid,
            status: Status::CREATED,
            exit: None,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            pending_stdio: None,
            pending_spec: None,
        };
        lock(&self.tasks).insert(
            id.to_string(),
            Container {
                bundle: bundle.clone(),
                rootfs_mounted,
                procs: HashMap::from([(String::new(), init)]),
                ooms: 0,
            },
        );
        self.publish(TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        Ok(pid)
    }

    fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let (status, stdio, spec) = self.with_proc(id, exec_id, |p| {
            (p.status, p.pending_stdio.take(), p.pending_spec.take())
        })?;
        if status != Status::CREATED {
            return Err(ShimError::FailedPrecondition(format!(
                "{id}/{exec_id} is {status:?}, not created"
            )));
        }
        let started = if exec_id.is_empty() {
            self.with_sb(|sb| sb.start_container(id))
                .and_then(|()| self.with_proc(id, exec_id, |p| p.pid))
        } else {
            let spec = spec.ok_or_else(|| not_found(id, exec_id))?;
            let stdio = stdio.unwrap_or_default();
            self.with_sb(|sb| sb.exec(id, exec_id, &spec, stdio))
                .map(|pid| u32::try_from(pid).unwrap_or(0))
        };
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                // It will never run: release the Wait callers (ctr waits
                // before it starts), with the status of a failed start.
                let _ = self.with_proc(id, exec_id, |p| {
                    p.status = Status::STOPPED;
                    p.exit = Some((255, now()));
                });
                self.exited.notify_all();
                return Err(e);
            }
        };
        self.with_proc(id, exec_id, |p| {
            p.pid = pid;
            p.status = Status::RUNNING;
        })?;
        let me = Arc::clone(self);
        let (cid, eid) = (id.to_string(), exec_id.to_string());
        std::thread::Builder::new()
            .name(format!("wait-{id}"))
            .spawn(move || me.wait_exit(&cid, &eid, pid))
            .map_err(|e| ShimError::io("starting a waiter thread", e))?;
        if exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            });
        } else {
            self.publish(TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            });
        }
        Ok(pid)
    }

    /// Waiter thread body: blocks until the process exits, then files it.
    fn wait_exit(&self, id: &str, exec_id: &str, pid: u32) {
        let client = self.with_sb(|sb| sb.dial_agent());
        let status = match client.and_then(|c| Ok(c.wait_process(id, exec_id)?)) {
            // Exited: now drain its output to containerd (returns at once).
            Ok(_) => self.with_sb(|sb| sb.wait(id, exec_id)),
            Err(e) => Err(e),
        };
        // A process whose VM ended was killed with it: 128 + SIGKILL, what
        // the runc shim reports for a SIGKILLed process (and the `husk` CLI
        // for the same case). An agent that fails while the VM runs leaves
        // the status unknown: 255, containerd's UnknownExitStatus.
        let (status, vm_gone) = match status {
            Ok(s) => (u32::try_from(s).unwrap_or(255), false),
            // A killed VMM closes its sockets (breaking this wait) a moment
            // before it can be reaped: give it that moment.
            Err(e) if self.vm_gone_within(std::time::Duration::from_secs(2)) => {
                log::error!(
                    "{id}/{exec_id}: the sandbox VM has ended: {e}; its console:\n{}",
                    self.console_tail()
                );
                (128 + 9, true)
            }
            Err(e) => {
                log::error!("waiting for {id}/{exec_id}: {e}");
                (255, false)
            }
        };
        if status == 128 + 9 && !vm_gone {
            self.publish_ooms(id, false);
        }
        let at = now();
        let _ = self.with_proc(id, exec_id, |p| {
            p.status = Status::STOPPED;
            p.exit = Some((status, at.clone()));
        });
        self.exited.notify_all();
        self.publish(TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        });
    }

    fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, Timestamp)> {
        let mut tasks = lock(&self.tasks);
        loop {
            let p = tasks
                .get(id)
                .and_then(|c| c.procs.get(exec_id))
                .ok_or_else(|| not_found(id, exec_id))?;
            if let Some(e) = &p.exit {
                return Ok(e.clone());
            }
            tasks = self.exited.wait(tasks).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let (status, pid, exit) =
            self.with_proc(id, exec_id, |p| (p.status, p.pid, p.exit.clone()))?;
        if status == Status::RUNNING || status == Status::PAUSED {
            return Err(ShimError::FailedPrecondition(format!(
                "{id}/{exec_id} is still running: kill it first"
            )));
        }
        let (code, at) = exit.unwrap_or_else(|| (0, now()));
        if exec_id.is_empty() {
            if status == Status::CREATED {
                // Never started: kill the waiting init so the agent lets
                // the container go.
                let _ = self.with_sb(|sb| sb.kill(id, "", 9, false));
                let _ = self.with_sb(|sb| sb.wait(id, ""));
            }
            if let Err(e) = self.with_sb(|sb| sb.delete_container(id)) {
                // A dead VM holds nothing to delete: the container's host
                // state goes when the sandbox is stopped.
                if !self.vm_gone() {
                    return Err(e);
                }
                log::warn!("deleting {id} of a dead VM: {e}");
            }
            let c = lock(&self.tasks).remove(id);
            if let Some(c) = c.filter(|c| c.rootfs_mounted) {
                crate::rootfs::unmount(&c.bundle);
            }
            self.publish(TaskDelete {
                container_id: id.to_string(),
                pid,
                exit_status: code,
                exited_at: MessageField::some(at.clone()),
                id: id.to_string(),
                ..Default::default()
            });
        } else {
            // The agent forgets it too (a dead VM has nothing to forget).
            if let Err(e) = self.with_sb(|sb| sb.remove_exec(id, exec_id)) {
                log::warn!("forgetting exec {id}/{exec_id}: {e}");
            }
            if let Some(c) = lock(&self.tasks).get_mut(id) {
                c.procs.remove(exec_id);
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let bundle = lock(&self.tasks)
            .get(id)
            .map(|c| c.bundle.display().to_string())
            .unwrap_or_default();
        self.with_proc(id, exec_id, |p| {
            let (code, at) = p.exit.clone().unzip();
            api::StateResponse {
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                bundle,
                pid: p.pid,
                status: EnumOrUnknown::new(p.status),
                stdin: p.stdin.clone(),
                stdout: p.stdout.clone(),
                stderr: p.stderr.clone(),
                terminal: p.terminal,
                exit_status: code.unwrap_or(0),
                exited_at: at.into(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            }
        })
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        husk_runtime::sandbox::validate_id(exec_id)?;
        let spec: oci_spec::runtime::Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
        {
            let tasks = lock(&self.tasks);
            let c = tasks.get(id).ok_or_else(|| not_found(id, ""))?;
            if c.procs.contains_key(exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {exec_id:?} in {id:?}"
                )));
            }
        }
        let stdio = crate::io::open_stdio(
            &req.stdin,
            &req.stdout,
            &req.stderr,
            req.terminal,
            (id, &self.namespace),
        )?;
        let mut tasks = lock(&self.tasks);
        let c = tasks.get_mut(id).ok_or_else(|| not_found(id, ""))?;
        c.procs.insert(
            exec_id.to_string(),
            Proc {
                pid: 0,
                status: Status::CREATED,
                exit: None,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                pending_stdio: Some(stdio),
                pending_spec: Some(spec),
            },
        );
        drop(tasks);
        self.publish(TaskExecAdded {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        });
        Ok(())
    }

    fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.with_proc(id, "", |_| ())?;
        self.with_sb(|sb| sb.set_paused(id, paused))?;
        self.with_proc(id, "", |p| {
            if p.status == Status::RUNNING || p.status == Status::PAUSED {
                p.status = if paused {
                    Status::PAUSED
                } else {
                    Status::RUNNING
                };
            }
        })?;
        if paused {
            self.publish(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            });
        } else {
            self.publish(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
        Ok(())
    }

    fn stats(&self, id: &str) -> Result<Any> {
        use containerd_shim::protos::cgroups_v2::metrics::{
            CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
        };
        use containerd_shim::protos::protobuf::Message;
        let s = self.with_sb(|sb| sb.container_stats(id))?;
        let m = Metrics {
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_usage_bytes,
                usage_limit: s.memory_limit_bytes,
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = m
            .write_to_bytes()
            .map_err(|e| ShimError::InvalidArgument(format!("encoding metrics: {e}")))?;
        Ok(Any {
            // containerd's typeurl registry name for cgroup v2 metrics.
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value,
            ..Default::default()
        })
    }

    fn shutdown(&self) {
        if !lock(&self.tasks).is_empty() {
            return;
        }
        let sb = lock(&self.sandbox).take();
        if let Some(sb) = sb {
            if self
                .debug_console
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                let console = std::fs::read(sb.dir().join("console.log")).unwrap_or_default();
                log::info!(
                    "guest console of sandbox {}:\n{}",
                    self.sandbox_id,
                    String::from_utf8_lossy(&console)
                );
            }
            let t0 = std::time::Instant::now();
            match sb.stop() {
                Ok(_) => log::info!(
                    "sandbox {} stopped in {} ms",
                    self.sandbox_id,
                    t0.elapsed().as_millis()
                ),
                Err(e) => log::warn!("stopping sandbox {}: {e}", self.sandbox_id),
            }
        }
        self.leave_host_cgroup();
        // The crate removes the socket only if the first container's
        // bundle still has its `address` file; containerd may have removed
        // that bundle already. Connections open now keep working.
        crate::cleanup::remove_socket(Path::new(self.socket.trim_start_matches("unix://")));
        self.exit.signal();
    }
}
