//! The ttrpc services husk-agent serves: `Health` and `Agent`.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use husk_protocols::agent::{
    BootStage, ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse,
};
use husk_protocols::agent_ttrpc::Agent;
use husk_protocols::health::{check_response::ServingStatus, CheckRequest, CheckResponse};
use husk_protocols::health_ttrpc::Health;
use nix::sys::utsname::uname;

use crate::boot::{boottime_ns, BootStages};

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
}

impl AgentService {
    /// Builds the service; `control` reaches the main thread.
    pub fn new(stages: Arc<BootStages>, control: Sender<Control>) -> Self {
        AgentService {
            stages,
            control: std::sync::Mutex::new(control),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_reports_agent_kernel_and_stages() {
        let stages = Arc::new(BootStages::default());
        stages.mark("init");
        let (tx, _rx) = std::sync::mpsc::channel();
        let svc = AgentService::new(stages, tx);
        let v = svc.version();
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(v.api_version, husk_protocols::API_VERSION);
        assert!(!v.kernel_release.is_empty());
        assert_eq!(v.boot_stages.len(), 1);
        assert_eq!(v.boot_stages[0].name, "init");
        assert!(v.boottime_ns >= v.boot_stages[0].boottime_ns);
    }
}
