//! The server as a client sees it: TLS with the identity key, health, reflection,
//! other-language clients, limits and shutdown.

use futures::StreamExt;
use mosaic_mesh::auth::Scope;
use mosaic_mesh::identity::{InstanceKey, PublicKey};
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::tls::ServerPin;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::daemon::{TestEnvironment, instance_of, spki_of_pem, with_key};
use crate::support::{Backend, python};

async fn tls_certificate_key_is_the_identity_key(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let instance = instance_of(daemon.channel().await).await;

    // The certificate the daemon serves carries exactly the published key...
    assert_eq!(spki_of_pem(&daemon.certificate_pem()), instance.public_key);
    let published = PublicKey::from_spki_der(&instance.public_key).expect("p-256 spki");
    assert_eq!(instance.fingerprint, published.fingerprint());
    assert_eq!(instance.key_id, published.key_id());
    assert!(uuid::Uuid::parse_str(&instance.instance_id).is_ok());
    assert_eq!(instance.name, "test-instance");
    assert_eq!(
        instance.capabilities,
        ["agent.spawn", "agent.status", "agent.kill"]
    );

    // ...so a client pinning the published key connects, and one pinning another
    // key is refused during the handshake.
    let pinned = daemon
        .channel_pinned(ServerPin::PublicKey(published))
        .await
        .expect("pinned to the published key");
    assert_eq!(instance_of(pinned).await.instance_id, instance.instance_id);
    let stranger = InstanceKey::generate().expect("key").public_key().clone();
    let refused = match daemon.channel_pinned(ServerPin::PublicKey(stranger)).await {
        Err(_) => true,
        Ok(channel) => pb::federation_client::FederationClient::new(channel)
            .get_instance(pb::GetInstanceRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a client pinned to another key must not get through"
    );

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_certificate_key_is_the_identity_key_on_sqlite() {
    tls_certificate_key_is_the_identity_key(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_certificate_key_is_the_identity_key_on_postgres() {
    tls_certificate_key_is_the_identity_key(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_every_service_serving() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let mut health = HealthClient::new(daemon.channel().await);
    for service in mosaic_mesh::proto::SERVICE_NAMES.into_iter().chain([""]) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1_and_v1alpha_list_the_three_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let channel = daemon.channel().await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        panic!("no reflection v1 response");
    };
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection v1 response");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for service in mosaic_mesh::proto::SERVICE_NAMES {
        assert!(
            names.iter().any(|name| name == service),
            "{service} in {names:?}"
        );
    }
    assert!(
        names.iter().any(|name| name == "grpc.health.v1.Health"),
        "{names:?}"
    );

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "mosaic.federation.v1.Federation".to_owned(),
            ),
        ),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        panic!("no reflection v1alpha response");
    };
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!("v1alpha did not describe the Federation service");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    daemon.stop().await;
}

/// The files reflection (v1) answers `asked` with, or the error it answers.
async fn files_describing(
    channel: tonic::transport::Channel,
    asked: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Result<Vec<prost_types::FileDescriptorProto>, String> {
    use prost::Message as _;
    use tonic_reflection::pb::v1;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(asked),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        panic!("no reflection response");
    };
    match response.message_response {
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) => {
            Ok(files
                .file_descriptor_proto
                .iter()
                .map(|bytes| {
                    prost_types::FileDescriptorProto::decode(bytes.as_slice())
                        .expect("a file descriptor")
                })
                .collect())
        }
        Some(v1::server_reflection_response::MessageResponse::ErrorResponse(error)) => {
            Err(error.error_message)
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_describes_the_error_details_our_statuses_carry() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    // What grpcurl asks to decode a RESOURCE_EXHAUSTED's details: the file
    // that holds each type, then each file it imports, by name.
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    for symbol in [
        "google.rpc.RetryInfo",
        "google.rpc.QuotaFailure",
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
    ] {
        let files = files_describing(
            daemon.channel().await,
            MessageRequest::FileContainingSymbol(symbol.to_owned()),
        )
        .await
        .unwrap_or_else(|error| panic!("{symbol}: {error}"));
        let file = files
            .iter()
            .find(|file| file.name().ends_with("error_details.proto"))
            .unwrap_or_else(|| panic!("{symbol}: no error_details.proto in the answer"));
        for import in &file.dependency {
            let imported = files_describing(
                daemon.channel().await,
                MessageRequest::FileByFilename(import.clone()),
            )
            .await
            .unwrap_or_else(|error| panic!("{symbol} imports {import}: {error}"));
            assert!(
                imported.iter().any(|file| file.name() == import),
                "{symbol} imports {import}"
            );
        }
    }
    // Ours are still there.
    let files = files_describing(
        daemon.channel().await,
        MessageRequest::FileContainingSymbol("mosaic.agent.v1.AgentControl".to_owned()),
    )
    .await
    .expect("AgentControl is described");
    assert!(!files.is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_pinned_to_the_certificate_gets_identity_and_health() {
    let python = python::python_with_grpcio();
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let instance = instance_of(daemon.channel().await).await;

    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/check_identity.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(daemon.address.to_string())
        .arg(daemon.certificate_path())
        .output()
        .await
        .expect("run the python client");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    assert_eq!(report["instance_id"], instance.instance_id.as_str());
    assert_eq!(report["fingerprint"], instance.fingerprint.as_str());
    let public_key_hex: String = instance
        .public_key
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(report["public_key_hex"], public_key_hex.as_str());
    for service in mosaic_mesh::proto::SERVICE_NAMES {
        assert_eq!(report["health"][service], "SERVING", "{report}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_requests_are_refused_before_any_handler_runs() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let mut config = environment.config();
    config.max_message_bytes = 64 * 1024;
    let daemon = environment.start_with(config).await.expect("start");
    let key = daemon.api_key(&[Scope::Coordinator]).await;
    let mut client =
        coordinator_pb::coordinator_client::CoordinatorClient::new(daemon.channel().await);
    let status = client
        .create_job(with_key(
            coordinator_pb::CreateJobRequest {
                job_type: "big".to_owned(),
                payload_json: format!("\"{}\"", "x".repeat(128 * 1024)),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect_err("oversized");
    // gRPC's status-code guide: a message over the limit is RESOURCE_EXHAUSTED.
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // The daemon is still there for the next caller.
    instance_of(daemon.channel().await).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_only_python_client_discovers_and_calls_the_daemon() {
    let python = python::python_with_grpcio();
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let instance = instance_of(daemon.channel().await).await;

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/python/reflection_client.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(daemon.address.to_string())
        .arg(daemon.certificate_path())
        .output()
        .await
        .expect("run the reflection client");
    assert!(
        output.status.success(),
        "reflection client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    for service in mosaic_mesh::proto::SERVICE_NAMES {
        assert!(
            report["services"]
                .as_array()
                .expect("services")
                .iter()
                .any(|name| name == service),
            "{service} discovered: {report}"
        );
    }
    assert_eq!(
        report["instance"]["instanceId"],
        instance.instance_id.as_str()
    );
    assert_eq!(
        report["instance"]["fingerprint"],
        instance.fingerprint.as_str()
    );
    assert_eq!(report["health"]["status"], "SERVING");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_one_sqlite_file_is_refused_naming_the_file() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let output = crate::support::binary::mosaicd(environment.data_dir.path())
        .env("MOSAIC_DATABASE_URL", &environment.database.url)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run a second mosaicd serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the second daemon must not serve: {stderr}"
    );
    let file = environment.database.url.trim_start_matches("sqlite://");
    assert!(
        stderr.contains(&format!(
            "another mosaicd is serving the SQLite database {file}"
        )),
        "{stderr}"
    );
    // The first still serves.
    instance_of(daemon.channel().await).await;
    daemon.stop().await;
}
