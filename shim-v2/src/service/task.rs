//! The ttrpc Task API of [`TaskService`]: each request mapped onto the
//! service's state and the sandbox, errors turned into ttrpc statuses.

use containerd_shim::api::{self, Empty, Status};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};

use super::TaskService;
use crate::error::{Result, ShimError};

fn reply<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::warn!("{e}");
        e.into()
    })
}

impl Task for TaskService {
    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        reply(self.inner.state(&req.id, &req.exec_id))
    }

    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = reply(self.inner.create(&req))?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = reply(self.inner.start(&req.id, &req.exec_id))?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        reply(self.inner.delete(&req.id, &req.exec_id))
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = reply(self.inner.with_sb(|sb| sb.container_pids(&req.id)))?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|p| containerd_shim::protos::types::task::ProcessInfo {
                    pid: u32::try_from(p).unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        reply(self.inner.set_paused(&req.id, true)).map(|()| Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        reply(self.inner.set_paused(&req.id, false)).map(|()| Empty::new())
    }

    fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        reply(Err(ShimError::Unsupported("checkpoint")))
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let status = reply(self.inner.with_proc(&req.id, &req.exec_id, |p| p.status))?;
        if status == Status::STOPPED {
            return reply(Err(ShimError::NotFound(format!(
                "process {}/{} already finished",
                req.id, req.exec_id
            ))));
        }
        reply(
            self.inner
                .with_sb(|sb| sb.kill(&req.id, &req.exec_id, req.signal, req.all)),
        )?;
        if req.signal == 9 {
            // A killed process reads no more input; and husk reports an
            // exit only once the process's stdin stream has ended.
            let _ = self
                .inner
                .with_sb(|sb| sb.close_stdin(&req.id, &req.exec_id));
        }
        Ok(Empty::new())
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        reply(self.inner.exec(&req)).map(|()| Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        reply(
            self.inner
                .with_sb(|sb| sb.resize(&req.id, &req.exec_id, req.height, req.width)),
        )
        .map(|()| Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            reply(
                self.inner
                    .with_sb(|sb| sb.close_stdin(&req.id, &req.exec_id)),
            )?;
        }
        Ok(Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources: oci_spec::runtime::LinuxResources = reply(
            serde_json::from_slice(&req.resources.value)
                .map_err(|e| ShimError::InvalidArgument(format!("update resources: {e}"))),
        )?;
        reply(
            self.inner
                .with_sb(|sb| sb.update_container(&req.id, &resources)),
        )
        .map(|()| Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (code, at) = reply(self.inner.wait(&req.id, &req.exec_id))?;
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let stats = reply(self.inner.stats(&req.id))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.inner.with_proc(&req.id, "", |p| p.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<Empty> {
        self.inner.shutdown();
        Ok(Empty::new())
    }
}
