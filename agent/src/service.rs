//! The ttrpc services husk-agent serves: `Health` and `Agent`.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use husk_protocols::agent::{
    BootStage, ContainerRequest, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, CreateSandboxResponse, Empty, ExecProcessRequest, ExecProcessResponse,
    ListProcessesResponse, OomEvent, ProcessRequest, ShutdownRequest, ShutdownResponse,
    SignalProcessRequest, StatsContainerResponse, TtyWinResizeRequest, UpdateContainerRequest,
    VersionRequest, VersionResponse, WaitProcessResponse,
};
use husk_protocols::agent_ttrpc::Agent;
use husk_protocols::health::{check_response::ServingStatus, CheckRequest, CheckResponse};
use husk_protocols::health_ttrpc::Health;
use nix::sys::utsname::uname;

use crate::boot::{boottime_ns, BootStages};
use crate::container::{ContainerError, Manager};
use crate::oom::OomEvents;
use crate::sandbox;

/// What the main thread is asked to do by an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Power the VM off (or, outside a VM, exit).
    Shutdown,
}

/// Shared state behind both services.
#[derive(Debug)]
pub struct AgentService {
    stages: Arc<BootStages>,
    control: std::sync::Mutex<Sender<Control>>,
    containers: Arc<Manager>,
    oom: Arc<OomEvents>,
}

impl AgentService {
    /// Builds the service; `control` reaches the main thread.
    pub fn new(
        stages: Arc<BootStages>,
        control: Sender<Control>,
        containers: Arc<Manager>,
        oom: Arc<OomEvents>,
    ) -> Self {
        AgentService {
            stages,
            control: std::sync::Mutex::new(control),
            containers,
            oom,
        }
    }

    /// Builds the Version answer.
    pub fn version(&self) -> VersionResponse {
        let mut r = VersionResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.api_version = husk_protocols::API_VERSION;
        if let Ok(u) = uname() {
            r.kernel_release = u.release().to_string_lossy().into_owned();
            r.kernel_version = u.version().to_string_lossy().into_owned();
            r.machine = u.machine().to_string_lossy().into_owned();
        }
        r.boot_stages = self
            .stages
            .snapshot()
            .into_iter()
            .map(|(name, ns)| {
                let mut s = BootStage::new();
                s.name = name;
                s.boottime_ns = ns;
                s
            })
            .collect();
        r.boottime_ns = boottime_ns();
        r
    }
}

impl Health for AgentService {
    fn check(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _req: CheckRequest,
    ) -> ttrpc::Result<CheckResponse> {
        let mut r = CheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }
}

impl Agent for AgentService {
    fn version(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(AgentService::version(self))
    }

    fn shutdown(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        tracing::info!("shutdown requested by the host");
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Control::Shutdown)
            .map_err(|_| ttrpc::Error::Others("agent main loop is gone".into()))?;
        Ok(ShutdownResponse::new())
    }

    fn create_sandbox(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        sandbox::create(
            &req.hostname,
            &req.shared_fs_tag,
            &req.interfaces,
            &req.routes,
        )?;
        Ok(CreateSandboxResponse::new())
    }

    fn create_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec, &stdio)?;
        tracing::info!(container = %req.container_id, pid, "created");
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn start_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.start(&req.container_id)?;
        Ok(Empty::new())
    }

    fn exec_process(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process, &stdio)?;
        let mut r = ExecProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn signal_process(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::new())
    }

    fn wait_process(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let status = self.containers.wait(&req.container_id, &req.exec_id)?;
        let mut r = WaitProcessResponse::new();
        r.status = status;
        Ok(r)
    }

    fn remove_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id)?;
        Ok(Empty::new())
    }

    fn list_processes(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let mut r = ListProcessesResponse::new();
        r.pids = self.containers.pids(&req.container_id)?;
        r.processes = crate::container::procs::describe(&r.pids);
        Ok(r)
    }

    fn update_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.resources)?;
        Ok(Empty::new())
    }

    fn stats_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let dir = self.containers.cgroup(&req.container_id)?;
        Ok(crate::container::cgroup::stats(&dir))
    }

    fn get_oom_event(&self, _ctx: &ttrpc::TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let mut e = OomEvent::new();
        e.container_id = self.oom.next();
        Ok(e)
    }

    fn tty_win_resize(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let p = self.containers.process(&req.container_id, &req.exec_id)?;
        let rows = u16::try_from(req.rows).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.cols).unwrap_or(u16::MAX);
        p.io.with_tty(|tty| match tty {
            Some(t) => crate::container::stdio::resize(t, rows, cols)
                .map_err(|e| ContainerError::Internal(format!("resizing the terminal: {e}"))),
            None => Err(ContainerError::FailedPrecondition(
                "the process has no terminal".into(),
            )),
        })?;
        Ok(Empty::new())
    }

    fn remove_process(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .remove_exec(&req.container_id, &req.exec_id)?;
        Ok(Empty::new())
    }

    fn close_stdin(&self, _ctx: &ttrpc::TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .process(&req.container_id, &req.exec_id)?
            .io
            .close_stdin();
        Ok(Empty::new())
    }

    fn pause_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.set_paused(&req.container_id, true)?;
        Ok(Empty::new())
    }

    fn resume_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.set_paused(&req.container_id, false)?;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_reports_agent_kernel_and_stages() {
        let stages = Arc::new(BootStages::default());
        stages.mark("init");
        let (tx, _rx) = std::sync::mpsc::channel();
        let svc = AgentService::new(stages, tx, Arc::default(), Arc::default());
        let v = svc.version();
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(v.api_version, husk_protocols::API_VERSION);
        assert!(!v.kernel_release.is_empty());
        assert_eq!(v.boot_stages.len(), 1);
        assert_eq!(v.boot_stages[0].name, "init");
        assert!(v.boottime_ns >= v.boot_stages[0].boottime_ns);
    }
}
