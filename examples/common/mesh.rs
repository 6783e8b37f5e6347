//! Two `mosaicd` processes, A and B, peered in workspace `bench`: B accepts A
//! at once (A's fingerprint is in B's `auto_accept_fingerprints`) and grants
//! it `agent.spawn`, `agent.status` and `agent.kill`; A dials B through its
//! admin RPC ConnectPeer, checking B's fingerprint, as an operator would.

use std::time::Duration;

use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::transport::Channel;

use mosaic_mesh::store::testing::TestDatabase;

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
    /// A's and B's PostgreSQL databases, dropped by `cleanup`; none on SQLite.
    databases: Vec<TestDatabase>,
}

/// How A and B are configured beyond the benchmark base.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// Each daemon on a PostgreSQL database of its own (created on the server
    /// named by `MOSAIC_TEST_DATABASE_URL`) instead of SQLite in its data dir.
    pub postgres: bool,
    /// TOML sections added to both daemons' configuration (not `[federation]`).
    pub extra_toml: String,
}

impl Mesh {
    /// Starts A and B on SQLite and connects them (at most 30 s).
    pub async fn start() -> anyhow::Result<Mesh> {
        Mesh::start_with(MeshOptions::default()).await
    }

    /// Starts A and B as `options` says and connects them (at most 30 s).
    pub async fn start_with(options: MeshOptions) -> anyhow::Result<Mesh> {
        let mut databases = Vec::new();
        let (a_database, b_database) = if options.postgres {
            let (a, b) = (
                TestDatabase::postgres().await?,
                TestDatabase::postgres().await?,
            );
            let urls = (Some(a.url.clone()), Some(b.url.clone()));
            databases = vec![a, b];
            urls
        } else {
            (None, None)
        };
        let a = PreparedDaemon::on("bench-a", a_database)?;
        let b = PreparedDaemon::on("bench-b", b_database)?;
        let b_extra = format!(
            "[federation]\nauto_accept_fingerprints = [\"{}\"]\nauto_accept_grants = [\"agent.spawn\", \"agent.status\", \"agent.kill\"]\n{}",
            a.fingerprint, options.extra_toml
        );
        let a = a.serve(&options.extra_toml).await?;
        let b = b.serve(&b_extra).await?;
        let client = ClientIdentity::new().await?;
        let mesh = Mesh {
            a,
            b,
            client,
            databases,
        };
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

    /// Stops both daemons and drops their PostgreSQL databases, if any.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.a.stop().await;
        self.b.stop().await;
        for database in self.databases {
            database.cleanup().await?;
        }
        Ok(())
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
