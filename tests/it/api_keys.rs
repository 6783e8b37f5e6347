//! API keys as a caller meets them: accepted in either header, scoped, revocable.

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, with_key};

fn rotate_request() -> pb::RotateKeysRequest {
    pb::RotateKeysRequest {
        grace_period_seconds: Some(60),
    }
}

async fn api_keys_are_checked_for_presence_validity_scope_and_revocation(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let admin = daemon.api_key(&[Scope::Admin]).await;
    let agents_only = daemon.api_key(&[Scope::Agents]).await;
    let mut federation = pb::federation_client::FederationClient::new(daemon.channel().await);
    let key_before = federation
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("public")
        .into_inner()
        .instance
        .expect("instance")
        .key_id;

    // No key at all.
    let status = federation
        .rotate_keys(rotate_request())
        .await
        .expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("admin"), "{}", status.message());

    // A key that does not exist.
    let status = federation
        .rotate_keys(with_key(rotate_request(), "mosaic_not-a-real-key"))
        .await
        .expect_err("unknown key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A malformed header.
    let mut request = tonic::Request::new(rotate_request());
    request.metadata_mut().insert(
        "authorization",
        "Basic dXNlcjpwYXNz".parse().expect("value"),
    );
    let status = federation
        .rotate_keys(request)
        .await
        .expect_err("malformed");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{}", status.message());

    // A valid key without the scope.
    let status = federation
        .rotate_keys(with_key(rotate_request(), &agents_only))
        .await
        .expect_err("wrong scope");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // None of the refused calls rotated anything.
    let key_unchanged = federation
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("public")
        .into_inner()
        .instance
        .expect("instance")
        .key_id;
    assert_eq!(key_unchanged, key_before);

    // The same key in x-api-key works, and its scope is enough for AgentControl
    // (which answers NOT_FOUND for the unknown agent, past authentication).
    let mut request = tonic::Request::new(agent_pb::GetAgentRequest {
        agent_id: "x".to_owned(),
    });
    request
        .metadata_mut()
        .insert("x-api-key", agents_only.parse().expect("value"));
    let status = agent_pb::agent_control_client::AgentControlClient::new(daemon.channel().await)
        .get_agent(request)
        .await
        .expect_err("past auth");
    assert_ne!(status.code(), tonic::Code::Unauthenticated);
    assert_ne!(status.code(), tonic::Code::PermissionDenied);

    // The admin key works, then is revoked and stops working.
    federation
        .rotate_keys(with_key(rotate_request(), &admin))
        .await
        .expect("admin may rotate");
    let store = environment.store().await;
    let keys = store.list_api_keys().await.expect("list");
    let admin_record = keys
        .iter()
        .find(|key| key.scopes == ["admin"])
        .expect("admin key listed");
    assert!(admin.starts_with(&admin_record.prefix));
    assert_ne!(
        admin_record.key_hash,
        admin.as_bytes(),
        "stored as a hash only"
    );
    // Revoked by another process (as `mosaicd apikey revoke` does): the daemon
    // believes a key it read for `server.auth_cache_ms` (1 s by default), so the
    // key stops working within that, and stays refused.
    store
        .revoke_api_key(&admin_record.id, mosaic_mesh::clock::now_ms())
        .await
        .expect("revoke");
    let revoked_at = std::time::Instant::now();
    let code = loop {
        let result = federation
            .list_connections(with_key(pb::ListConnectionsRequest::default(), &admin))
            .await;
        match result {
            Err(status) => break status.code(),
            Ok(_) if revoked_at.elapsed() < std::time::Duration::from_secs(3) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Ok(_) => panic!("a revoked key still worked 3 s after it was revoked"),
        }
    };
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(
        revoked_at.elapsed() < std::time::Duration::from_millis(2500),
        "revocation took {:?}",
        revoked_at.elapsed()
    );
    let status = federation
        .rotate_keys(with_key(rotate_request(), &admin))
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    daemon.stop().await;
    environment.cleanup().await;
}

/// With `server.auth_cache_ms = 0` every call reads the store: a key revoked
/// by another process is refused on the very next call.
async fn without_the_cache_a_revoked_key_is_refused_at_once(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let mut config = environment.config();
    config.auth_cache = std::time::Duration::ZERO;
    let daemon = environment.start_with(config).await.expect("daemon starts");
    let admin = daemon.api_key(&[Scope::Admin]).await;
    let mut federation = pb::federation_client::FederationClient::new(daemon.channel().await);
    for _ in 0..3 {
        federation
            .list_connections(with_key(pb::ListConnectionsRequest::default(), &admin))
            .await
            .expect("a valid key works");
    }
    let store = environment.store().await;
    let record = store
        .list_api_keys()
        .await
        .expect("list")
        .into_iter()
        .find(|key| admin.starts_with(&key.prefix))
        .expect("admin key listed");
    store
        .revoke_api_key(&record.id, mosaic_mesh::clock::now_ms())
        .await
        .expect("revoke");
    let status = federation
        .list_connections(with_key(pb::ListConnectionsRequest::default(), &admin))
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    daemon.stop().await;
    environment.cleanup().await;
}

on_both_backends!(without_the_cache_a_revoked_key_is_refused_at_once);

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_checked_for_presence_validity_scope_and_revocation_on_sqlite() {
    api_keys_are_checked_for_presence_validity_scope_and_revocation(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_checked_for_presence_validity_scope_and_revocation_on_postgres() {
    api_keys_are_checked_for_presence_validity_scope_and_revocation(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wire_methods_refuse_callers_without_a_client_certificate() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let status = pb::federation_client::FederationClient::new(daemon.channel().await)
        .ping(pb::PingRequest::default())
        .await
        .expect_err("no client certificate");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    daemon.stop().await;
}
