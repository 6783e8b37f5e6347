//! The `mosaic.coordinator.v1.Coordinator` gRPC handlers. The job engine lands with
//! its own issue; until then every RPC says so with UNIMPLEMENTED.

use std::pin::Pin;

use tonic::{Request, Response, Status};

use crate::error::not_yet;
use crate::proto::coordinator as pb;
use crate::server::Shared;

const JOBS: &str = "the job coordinator";

/// Handlers for the Coordinator service.
pub struct CoordinatorService {
    _shared: Shared,
}

impl CoordinatorService {
    /// Handlers over the daemon's shared state.
    pub fn new(shared: Shared) -> Self {
        Self { _shared: shared }
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn create_job(
        &self,
        _request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn get_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn get_job_history(
        &self,
        _request: Request<pb::GetJobHistoryRequest>,
    ) -> Result<Response<pb::GetJobHistoryResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn update_job_status(
        &self,
        _request: Request<pb::UpdateJobStatusRequest>,
    ) -> Result<Response<pb::UpdateJobStatusResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn update_job_progress(
        &self,
        _request: Request<pb::UpdateJobProgressRequest>,
    ) -> Result<Response<pb::UpdateJobProgressResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn complete_job(
        &self,
        _request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::CompleteJobResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn fail_job(
        &self,
        _request: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::FailJobResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn cancel_job(
        &self,
        _request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Err(not_yet(JOBS))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        _request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_yet(JOBS))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn handle_webhook(
        &self,
        _request: Request<pb::HandleWebhookRequest>,
    ) -> Result<Response<pb::HandleWebhookResponse>, Status> {
        Err(not_yet(JOBS))
    }

    async fn dispatch_job(
        &self,
        _request: Request<pb::DispatchJobRequest>,
    ) -> Result<Response<pb::DispatchJobResponse>, Status> {
        Err(not_yet(JOBS))
    }
}
