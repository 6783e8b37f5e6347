//! The `mosaic.coordinator.v1.Coordinator` gRPC handlers: proto request to
//! domain values, a call into [`Jobs`], domain result to proto response.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{entry_to_proto, job_to_proto, state_from_proto};
use super::dispatch::DispatchRequest;
use super::dispatch::remote::RemoteDispatch;
use super::health::HealthCheck;
use super::jobs::{Delivery, Jobs, NewJob, validate_job_id};
use super::state::{JobChange, Percent};
use crate::agents::runtime::AgentRuntime;
use crate::auth::Caller;
use crate::config::Config;
use crate::proto::coordinator as pb;
use crate::store::JobFilter;

/// The metadata key a client may send instead of `idempotency_key`.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Handlers for the Coordinator service.
pub struct CoordinatorService {
    jobs: Jobs,
    agents: Arc<AgentRuntime>,
    peers: RemoteDispatch,
    health: HealthCheck,
    config: Arc<Config>,
}

impl CoordinatorService {
    /// Handlers over the job operations, the local agents, dispatch to
    /// peers, the health checks and the configuration (webhook sources,
    /// dispatch's agent types).
    pub fn new(
        jobs: Jobs,
        agents: Arc<AgentRuntime>,
        peers: RemoteDispatch,
        health: HealthCheck,
        config: Arc<Config>,
    ) -> Self {
        Self {
            jobs,
            agents,
            peers,
            health,
            config,
        }
    }
}

/// Who is recorded as having made a change: the API key's name.
fn actor_of<T>(request: &Request<T>) -> String {
    match Caller::of(request) {
        Caller::ApiKey { name, .. } => name.to_string(),
        Caller::Anonymous | Caller::PeerCertificate(_) => "anonymous".to_owned(),
    }
}

/// The request field, or else the `idempotency-key` metadata.
fn idempotency_key<T>(request: &Request<T>, field: &str) -> Result<String, Status> {
    if !field.is_empty() {
        return Ok(field.to_owned());
    }
    match request.metadata().get(IDEMPOTENCY_KEY_HEADER) {
        None => Ok(String::new()),
        Some(value) => value.to_str().map(str::to_owned).map_err(|_| {
            Status::invalid_argument("the idempotency-key metadata is not printable ASCII")
        }),
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let actor = actor_of(&request);
        let key = idempotency_key(&request, &request.get_ref().idempotency_key)?;
        let message = request.into_inner();
        let new_job = NewJob {
            job_type: message.job_type,
            workspace: message.workspace,
            payload_json: message.payload_json,
            priority: message.priority,
            labels: message.labels.into_iter().collect(),
            idempotency_key: key,
        };
        let (job, created) = self.jobs.create(new_job, &actor).await?;
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(job_to_proto(job)),
            created,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let job = self.jobs.get(&request.get_ref().job_id).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    async fn get_job_history(
        &self,
        request: Request<pb::GetJobHistoryRequest>,
    ) -> Result<Response<pb::GetJobHistoryResponse>, Status> {
        let entries = self.jobs.history(&request.get_ref().job_id).await?;
        Ok(Response::new(pb::GetJobHistoryResponse {
            entries: entries.into_iter().map(entry_to_proto).collect(),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let message = request.into_inner();
        let state = match message.state {
            0 => None,
            value => Some(state_from_proto(value).ok_or_else(|| {
                Status::invalid_argument(format!("state {value} is not a JobState"))
            })?),
        };
        let filter = JobFilter {
            state,
            job_type: Some(message.job_type).filter(|value| !value.is_empty()),
            workspace: Some(message.workspace).filter(|value| !value.is_empty()),
            labels: message.labels.into_iter().collect(),
        };
        let (jobs, next_page_token) = self
            .jobs
            .list(&filter, message.page_size, &message.page_token)
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_job_status(
        &self,
        request: Request<pb::UpdateJobStatusRequest>,
    ) -> Result<Response<pb::UpdateJobStatusResponse>, Status> {
        let actor = actor_of(&request);
        let message = request.into_inner();
        let change = state_from_proto(message.state)
            .and_then(|state| JobChange::to_state(state, message.message))
            .ok_or_else(|| {
                Status::invalid_argument("state must be RUNNING, COMPLETED, FAILED or CANCELLED")
            })?;
        let job = self.jobs.change(&message.job_id, change, &actor).await?;
        Ok(Response::new(pb::UpdateJobStatusResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    async fn update_job_progress(
        &self,
        request: Request<pb::UpdateJobProgressRequest>,
    ) -> Result<Response<pb::UpdateJobProgressResponse>, Status> {
        let actor = actor_of(&request);
        let message = request.into_inner();
        let percent = Percent::new(message.progress).ok_or_else(|| {
            Status::invalid_argument(format!(
                "progress is {}; it must be 0 to 100",
                message.progress
            ))
        })?;
        let change = JobChange::Progress {
            percent,
            message: message.message,
        };
        let job = self.jobs.change(&message.job_id, change, &actor).await?;
        Ok(Response::new(pb::UpdateJobProgressResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::CompleteJobResponse>, Status> {
        let actor = actor_of(&request);
        let message = request.into_inner();
        let change = JobChange::Complete {
            result_json: message.result_json,
        };
        let job = self.jobs.change(&message.job_id, change, &actor).await?;
        Ok(Response::new(pb::CompleteJobResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    async fn fail_job(
        &self,
        request: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::FailJobResponse>, Status> {
        let actor = actor_of(&request);
        let message = request.into_inner();
        let change = JobChange::Fail {
            error: message.error,
        };
        let job = self.jobs.change(&message.job_id, change, &actor).await?;
        Ok(Response::new(pb::FailJobResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let actor = actor_of(&request);
        let message = request.into_inner();
        let job = super::dispatch::cancel(
            &self.jobs,
            &self.agents,
            &self.peers,
            &message.job_id,
            message.reason,
            &actor,
        )
        .await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job_to_proto(job)),
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = &request.get_ref().job_id;
        validate_job_id(job_id)?;
        let receiver = self.jobs.watch(job_id).await?;
        let stream = ReceiverStream::new(receiver).map(|item| {
            item.map(|(entry, job)| pb::WatchJobResponse {
                entry: Some(entry_to_proto(entry)),
                job: Some(job_to_proto(job)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(self.health.check().await))
    }

    async fn handle_webhook(
        &self,
        request: Request<pb::HandleWebhookRequest>,
    ) -> Result<Response<pb::HandleWebhookResponse>, Status> {
        let message = request.into_inner();
        if message.source.is_empty() {
            return Err(Status::invalid_argument("source is required"));
        }
        let delivery = Delivery {
            source: message.source,
            event_type: message.event_type,
            delivery_id: message.delivery_id,
            body: message.body,
            signature: message.signature,
            headers: message.headers.into_iter().collect(),
        };
        let result = self
            .jobs
            .handle_webhook(delivery, &self.config.coordinator)
            .await?;
        Ok(Response::new(pb::HandleWebhookResponse {
            job: result.job.map(job_to_proto),
            duplicate: result.duplicate,
        }))
    }

    async fn dispatch_job(
        &self,
        request: Request<pb::DispatchJobRequest>,
    ) -> Result<Response<pb::DispatchJobResponse>, Status> {
        let actor = actor_of(&request);
        let key = idempotency_key(&request, &request.get_ref().idempotency_key)?;
        let message = request.into_inner();
        let dispatch = DispatchRequest {
            job: NewJob {
                job_type: message.job_type,
                workspace: message.workspace,
                payload_json: message.payload_json,
                priority: message.priority,
                labels: message.labels.into_iter().collect(),
                idempotency_key: key,
            },
            agent_type: message.agent_type,
            prompt: message.prompt,
            peer_instance_id: message.peer_instance_id,
        };
        let dispatched = super::dispatch::dispatch(
            &self.jobs,
            &self.agents,
            &self.peers,
            &self.config,
            dispatch,
            &actor,
        )
        .await?;
        Ok(Response::new(pb::DispatchJobResponse {
            job: Some(job_to_proto(dispatched.job)),
            agent_id: dispatched.agent_id,
            created: dispatched.created,
        }))
    }
}
