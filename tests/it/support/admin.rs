//! An operator of a test daemon: its Federation client with an admin API key
//! (connect, accept, suspend, ..., and waiting for a connection's state), and
//! two daemons connected and accepted in one call.

use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::transport::Channel;

use super::daemon::{TestDaemon, with_key};

/// How long a condition that crosses daemons may take to become true.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// An operator's view of one daemon: an admin API key and a client.
pub(crate) struct Admin {
    /// The Federation client over mutual TLS.
    pub(crate) client: FederationClient<Channel>,
    /// An API key with the admin scope.
    pub(crate) key: String,
}

impl Admin {
    pub(crate) async fn of(daemon: &TestDaemon) -> Admin {
        Admin {
            client: FederationClient::new(daemon.channel().await),
            key: daemon.api_key(&[Scope::Admin]).await,
        }
    }

    pub(crate) async fn instance(&self) -> pb::Instance {
        self.client
            .clone()
            .get_instance(pb::GetInstanceRequest {})
            .await
            .expect("GetInstance")
            .into_inner()
            .instance
            .expect("instance")
    }

    pub(crate) async fn connect(
        &self,
        url: &str,
        workspace: &str,
        fingerprint: &str,
        grants: &[&str],
    ) -> Result<pb::Connection, tonic::Status> {
        let request = pb::ConnectPeerRequest {
            url: url.to_owned(),
            workspace: workspace.to_owned(),
            expected_fingerprint: fingerprint.to_owned(),
            granted_capabilities: grants.iter().map(|grant| (*grant).to_owned()).collect(),
            requested_capabilities: Vec::new(),
        };
        self.client
            .clone()
            .connect_peer(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    pub(crate) async fn list(&self) -> Vec<pb::Connection> {
        self.client
            .clone()
            .list_connections(with_key(pb::ListConnectionsRequest::default(), &self.key))
            .await
            .expect("ListConnections")
            .into_inner()
            .connections
    }

    pub(crate) async fn get(&self, connection_id: &str) -> pb::GetConnectionResponse {
        self.client
            .clone()
            .get_connection(with_key(
                pb::GetConnectionRequest {
                    connection_id: connection_id.to_owned(),
                },
                &self.key,
            ))
            .await
            .expect("GetConnection")
            .into_inner()
    }

    pub(crate) async fn accept(
        &self,
        id: &str,
        grants: &[&str],
    ) -> Result<pb::Connection, tonic::Status> {
        let request = pb::AcceptConnectionRequest {
            connection_id: id.to_owned(),
            granted_capabilities: grants.iter().map(|grant| (*grant).to_owned()).collect(),
            accept_new_key_for_known_instance: false,
        };
        self.client
            .clone()
            .accept_connection(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    pub(crate) async fn reject(&self, id: &str) -> Result<pb::Connection, tonic::Status> {
        let request = pb::RejectConnectionRequest {
            connection_id: id.to_owned(),
            reason: "not today".to_owned(),
        };
        self.client
            .clone()
            .reject_connection(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    pub(crate) async fn suspend(&self, id: &str) -> Result<pb::Connection, tonic::Status> {
        let request = pb::SuspendConnectionRequest {
            connection_id: id.to_owned(),
            reason: "maintenance".to_owned(),
        };
        self.client
            .clone()
            .suspend_connection(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    pub(crate) async fn resume(&self, id: &str) -> Result<pb::Connection, tonic::Status> {
        let request = pb::ResumeConnectionRequest {
            connection_id: id.to_owned(),
        };
        self.client
            .clone()
            .resume_connection(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    pub(crate) async fn disconnect(&self, id: &str) -> Result<pb::Connection, tonic::Status> {
        let request = pb::DisconnectConnectionRequest {
            connection_id: id.to_owned(),
            reason: "done".to_owned(),
        };
        self.client
            .clone()
            .disconnect_connection(with_key(request, &self.key))
            .await
            .map(|response| response.into_inner().connection.expect("connection"))
    }

    /// Polls the connection until `ready` holds, failing after [`PATIENCE`].
    pub(crate) async fn wait_for(
        &self,
        connection_id: &str,
        what: &str,
        ready: impl Fn(&pb::Connection) -> bool,
    ) -> pb::Connection {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let connection = self
                .get(connection_id)
                .await
                .connection
                .expect("connection");
            if ready(&connection) {
                return connection;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; connection is {connection:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn wait_for_state(
        &self,
        connection_id: &str,
        state: pb::ConnectionState,
    ) -> pb::Connection {
        self.wait_for(connection_id, state.as_str_name(), |connection| {
            connection.state() == state
        })
        .await
    }

    /// The one connection in `workspace` that is not terminal.
    pub(crate) async fn open_in(&self, workspace: &str) -> pb::Connection {
        let open: Vec<pb::Connection> = self
            .list()
            .await
            .into_iter()
            .filter(|connection| {
                connection.workspace == workspace
                    && !matches!(
                        connection.state(),
                        pb::ConnectionState::Disconnected | pb::ConnectionState::Rejected
                    )
            })
            .collect();
        assert_eq!(open.len(), 1, "{open:?}");
        open.into_iter().next().expect("one")
    }
}

/// A connects to B in `workspace`, B accepts with `grants`; returns the
/// connection ids on A and on B once both are ACTIVE.
pub(crate) async fn connect_and_accept(
    admin_a: &Admin,
    admin_b: &Admin,
    b: &TestDaemon,
    workspace: &str,
    grants: &[&str],
) -> (String, String) {
    connect_and_accept_at(admin_a, admin_b, &b.url(), workspace, grants).await
}

/// `connect_and_accept` with B reached at `b_url` (replicas behind a
/// balancer).
pub(crate) async fn connect_and_accept_at(
    admin_a: &Admin,
    admin_b: &Admin,
    b_url: &str,
    workspace: &str,
    grants: &[&str],
) -> (String, String) {
    let outbound = admin_a
        .connect(b_url, workspace, "", &[])
        .await
        .expect("connect");
    let inbound = admin_b.open_in(workspace).await;
    admin_b
        .accept(&inbound.connection_id, grants)
        .await
        .expect("accept");
    admin_a
        .wait_for_state(&outbound.connection_id, pb::ConnectionState::Active)
        .await;
    (outbound.connection_id, inbound.connection_id)
}
