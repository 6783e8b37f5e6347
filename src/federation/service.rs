//! The `mosaic.federation.v1.Federation` gRPC handlers. Thin: proto in, domain
//! call, proto out. Authentication already happened in [`crate::auth`].

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::clock::{now_ms, timestamp_from_ms};
use crate::error::not_yet;
use crate::identity::Identity;
use crate::proto::federation as pb;
use crate::server::Shared;

/// Longest grace period an operator may ask for on rotation (30 days).
const MAX_ROTATION_GRACE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Handlers for the Federation service.
pub struct FederationService {
    shared: Shared,
}

impl FederationService {
    /// Handlers over the daemon's shared state.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

/// The public view of the identity, as `GetInstance` returns it.
pub fn instance_message(identity: &Identity) -> pb::Instance {
    let now = now_ms();
    let public_key = identity.public_key();
    pb::Instance {
        instance_id: identity.instance_id.clone(),
        name: identity.profile.name.clone(),
        url: identity.profile.public_url.clone(),
        public_key: public_key.spki_der().to_vec(),
        fingerprint: public_key.fingerprint(),
        key_id: public_key.key_id(),
        capabilities: identity.profile.capabilities.clone(),
        metadata: identity.profile.metadata.clone().into_iter().collect(),
        previous_keys: identity
            .previous_keys(now)
            .map(|previous| pb::PublicKeyInfo {
                key_id: previous.public_key.key_id(),
                public_key: previous.public_key.spki_der().to_vec(),
                fingerprint: previous.public_key.fingerprint(),
                created_at: Some(timestamp_from_ms(previous.created_at_ms)),
                valid_until: Some(timestamp_from_ms(previous.valid_until_ms)),
            })
            .collect(),
        created_at: Some(timestamp_from_ms(identity.created_at_ms)),
    }
}

fn current_key_message(identity: &Identity) -> pb::PublicKeyInfo {
    let public_key = identity.public_key();
    pb::PublicKeyInfo {
        key_id: public_key.key_id(),
        public_key: public_key.spki_der().to_vec(),
        fingerprint: public_key.fingerprint(),
        created_at: Some(timestamp_from_ms(identity.current_key_created_at_ms)),
        valid_until: None,
    }
}

const PEERING: &str = "peering (connections between instances)";
const REMOTE_AGENTS: &str = "signed commands to remote agents";

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn get_instance(
        &self,
        _request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::GetInstanceResponse>, Status> {
        let identity = self.shared.identity.current();
        Ok(Response::new(pb::GetInstanceResponse {
            instance: Some(instance_message(&identity)),
        }))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let grace = match request.get_ref().grace_period_seconds {
            Some(seconds) => Duration::from_secs(u64::from(seconds)),
            None => self.shared.config.rotation_grace,
        };
        if grace > MAX_ROTATION_GRACE {
            return Err(Status::invalid_argument(
                "grace_period_seconds must be at most 2592000 (30 days)",
            ));
        }
        let identity = self.shared.identity.rotate(grace).await?;
        crate::server::write_certificate(&self.shared)
            .map_err(|error| crate::error::internal("writing the certificate", error.as_ref()))?;
        let now = now_ms();
        let previous_key = identity
            .previous_keys(now)
            .next()
            .map(|previous| pb::PublicKeyInfo {
                key_id: previous.public_key.key_id(),
                public_key: previous.public_key.spki_der().to_vec(),
                fingerprint: previous.public_key.fingerprint(),
                created_at: Some(timestamp_from_ms(previous.created_at_ms)),
                valid_until: Some(timestamp_from_ms(previous.valid_until_ms)),
            });
        Ok(Response::new(pb::RotateKeysResponse {
            current_key: Some(current_key_message(&identity)),
            previous_key,
        }))
    }

    async fn connect_peer(
        &self,
        _request: Request<pb::ConnectPeerRequest>,
    ) -> Result<Response<pb::ConnectPeerResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn list_connections(
        &self,
        _request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn get_connection(
        &self,
        _request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::GetConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn accept_connection(
        &self,
        _request: Request<pb::AcceptConnectionRequest>,
    ) -> Result<Response<pb::AcceptConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn reject_connection(
        &self,
        _request: Request<pb::RejectConnectionRequest>,
    ) -> Result<Response<pb::RejectConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn suspend_connection(
        &self,
        _request: Request<pb::SuspendConnectionRequest>,
    ) -> Result<Response<pb::SuspendConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn resume_connection(
        &self,
        _request: Request<pb::ResumeConnectionRequest>,
    ) -> Result<Response<pb::ResumeConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn disconnect_connection(
        &self,
        _request: Request<pb::DisconnectConnectionRequest>,
    ) -> Result<Response<pb::DisconnectConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn spawn_remote_agent(
        &self,
        _request: Request<pb::SpawnRemoteAgentRequest>,
    ) -> Result<Response<pb::SpawnRemoteAgentResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn get_remote_agent(
        &self,
        _request: Request<pb::GetRemoteAgentRequest>,
    ) -> Result<Response<pb::GetRemoteAgentResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn kill_remote_agent(
        &self,
        _request: Request<pb::KillRemoteAgentRequest>,
    ) -> Result<Response<pb::KillRemoteAgentResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn list_remote_agents(
        &self,
        _request: Request<pb::ListRemoteAgentsRequest>,
    ) -> Result<Response<pb::ListRemoteAgentsResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn list_command_log(
        &self,
        _request: Request<pb::ListCommandLogRequest>,
    ) -> Result<Response<pb::ListCommandLogResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn request_connection(
        &self,
        _request: Request<pb::RequestConnectionRequest>,
    ) -> Result<Response<pb::RequestConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn notify_connection(
        &self,
        _request: Request<pb::NotifyConnectionRequest>,
    ) -> Result<Response<pb::NotifyConnectionResponse>, Status> {
        Err(not_yet(PEERING))
    }

    async fn execute_command(
        &self,
        _request: Request<pb::ExecuteCommandRequest>,
    ) -> Result<Response<pb::ExecuteCommandResponse>, Status> {
        Err(not_yet(REMOTE_AGENTS))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Err(not_yet(PEERING))
    }
}
