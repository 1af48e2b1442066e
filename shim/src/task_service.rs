//! containerd's Task service (API v2): one short fn per RPC. Each enters a
//! span, converts the request (`convert`), calls the [`Sandbox`], and
//! converts the result; errors become ttrpc statuses in
//! `From<ShimError> for ttrpc::Error`.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::{api::*, Task, TtrpcContext, TtrpcResult};
use containerd_shim_protos::protobuf::MessageField;
use tracing::instrument;

use crate::convert;
use crate::error::ShimError;
use crate::sandbox::Sandbox;

pub struct TaskService {
    sandbox: Arc<Sandbox>,
}

impl TaskService {
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        Self { sandbox }
    }

    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }
}

#[async_trait]
impl Task for TaskService {
    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.sandbox.create(convert::create_request(req)?).await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.sandbox.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.sandbox.exec(convert::exec_request(req)?).await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        (self.sandbox)
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.sandbox
            .close_io(&req.id, &req.exec_id, req.stdin)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all))]
    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        (self.sandbox)
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let deleted = self.sandbox.delete(&req.id, &req.exec_id).await?;
        Ok(convert::delete_response(deleted))
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exit = self.sandbox.wait(&req.id, &req.exec_id).await?;
        Ok(convert::wait_response(exit))
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let processes = self.sandbox.pids(&req.id).await?;
        Ok(convert::pids_response(processes)?)
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.sandbox.pause(&req.id).await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.sandbox.resume(&req.id).await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = convert::update_resources(&req)?;
        self.sandbox.update(&req.id, resources).await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let stats = self.sandbox.stats(&req.id).await?;
        let any = convert::stats_any(&stats)?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(container_id = %req.id, exec_id = %req.exec_id))]
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let status = self.sandbox.state(&req.id, &req.exec_id)?;
        Ok(convert::state_response(status))
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let (shim_pid, task_pid) = self.sandbox.connect(&req.id)?;
        let version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(ConnectResponse {
            shim_pid,
            task_pid,
            version,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(sandbox_id = %req.id, now = req.now))]
    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.sandbox.shutdown(req.now).await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(container_id = %req.id))]
    async fn checkpoint(&self, _: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented(format!(
            "checkpoint of {:?} is not supported: the container runs inside a micro-VM, and \
             checkpointing it would need CRIU in the guest or VM snapshots, which BoxLite does not offer yet",
            req.id
        ))
        .into())
    }
}

#[cfg(test)]
#[path = "task_service_tests.rs"]
mod tests;
