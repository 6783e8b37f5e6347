//! Two `mosaicd` processes, A and B, peered in workspace `bench`: B accepts A
//! at once (A's fingerprint is in B's `auto_accept_fingerprints`) and grants
//! it `agent.spawn`, `agent.status` and `agent.kill`; A dials B through its
//! admin RPC ConnectPeer, checking B's fingerprint, as an operator would.

use std::time::Duration;

use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::transport::Channel;

use super::daemon::{ClientIdentity, Daemon, PreparedDaemon, with_key};

/// The workspace of the connection.
pub const WORKSPACE: &str = "bench";

/// A and B, ACTIVE in [`WORKSPACE`], and a client identity for load generators.
pub struct Mesh {
    /// The daemon the operator talks to.
    pub a: Daemon,
    /// The peer that runs the agents.
    pub b: Daemon,
    /// The load generator's mutual-TLS identity.
    pub client: ClientIdentity,
}

impl Mesh {
    /// Starts A and B and connects them (at most 30 s).
    pub async fn start() -> anyhow::Result<Mesh> {
        let a = PreparedDaemon::new("bench-a")?;
        let b = PreparedDaemon::new("bench-b")?;
        let b_extra = format!(
            "[federation]\nauto_accept_fingerprints = [\"{}\"]\nauto_accept_grants = [\"agent.spawn\", \"agent.status\", \"agent.kill\"]\n",
            a.fingerprint
        );
        let a = a.serve("").await?;
        let b = b.serve(&b_extra).await?;
        let client = ClientIdentity::new().await?;
        let mesh = Mesh { a, b, client };
        let mut admin = mesh.federation_a().await?;
        let connection = admin
            .connect_peer(with_key(
                pb::ConnectPeerRequest {
                    url: mesh.b.url(),
                    workspace: WORKSPACE.to_owned(),
                    expected_fingerprint: mesh.b.prepared.fingerprint.clone(),
                    granted_capabilities: Vec::new(),
                    requested_capabilities: vec![
                        "agent.spawn".to_owned(),
                        "agent.status".to_owned(),
                        "agent.kill".to_owned(),
                    ],
                },
                mesh.a.api_key(),
            ))
            .await?
            .into_inner()
            .connection
            .ok_or_else(|| anyhow::anyhow!("ConnectPeer returned no connection"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = admin
                .get_connection(with_key(
                    pb::GetConnectionRequest {
                        connection_id: connection.connection_id.clone(),
                    },
                    mesh.a.api_key(),
                ))
                .await?
                .into_inner()
                .connection
                .ok_or_else(|| anyhow::anyhow!("GetConnection returned no connection"))?;
            if seen.state() == pb::ConnectionState::Active {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the connection A → B is not ACTIVE after 30 s: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(mesh)
    }

    /// B's instance id.
    pub fn b_id(&self) -> &str {
        &self.b.prepared.instance_id
    }

    /// A Federation client on A (mutual TLS, the client identity).
    pub async fn federation_a(&self) -> anyhow::Result<FederationClient<Channel>> {
        Ok(FederationClient::new(self.a.channel(&self.client).await?))
    }
}
