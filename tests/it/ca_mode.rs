//! CA mode over real mutual TLS: daemons whose certificates an operator CA (made
//! here with rcgen) issued for their instance keys, from the request that
//! `mosaicd identity csr` prints. They peer and run a signed command; a peer
//! whose certificate another CA issued is refused at TLS in both directions; a
//! chain that cannot serve stops the start with an error naming its key; key
//! rotation is refused; ordinary clients verify the server with the CA bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::Config;
use mosaic_mesh::identity::PublicKey;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::tls::ca::TlsSettings;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm,
};
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept};
use crate::support::agents::with_agent_types;
use crate::support::binary::mosaicd;
use crate::support::daemon::{TestDaemon, TestEnvironment, spki_of_pem, with_key};
use crate::support::python;

on_both_backends!(two_ca_mode_daemons_peer_and_run_a_signed_command);

/// The DER prefix of a P-256 SubjectPublicKeyInfo; the point follows it.
const P256_SPKI_PREFIX_LEN: usize = 26;

/// A certificate authority made for one test.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A P-256 public key (SPKI DER) for rcgen to certify: the daemon's key, whose
/// private half never leaves the daemon.
struct CertifiedKey(Vec<u8>);

impl PublicKeyData for CertifiedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0[P256_SPKI_PREFIX_LEN..]
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// What a leaf certificate should look like.
struct Leaf<'a> {
    names: &'a [&'a str],
    usages: Vec<ExtendedKeyUsagePurpose>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
}

impl Default for Leaf<'_> {
    fn default() -> Self {
        let now = time::OffsetDateTime::now_utc();
        Leaf {
            names: &["localhost", "127.0.0.1"],
            usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(30),
        }
    }
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut distinguished_name = DistinguishedName::new();
        distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name = distinguished_name;
        let certificate = params.self_signed(&key).expect("CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            pem: certificate.pem(),
        }
    }

    /// A certificate for `spki` as `leaf` describes it, as PEM.
    fn issue(&self, spki: &[u8], leaf: &Leaf<'_>) -> String {
        let names: Vec<String> = leaf.names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = leaf.usages.clone();
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        params
            .signed_by(&CertifiedKey(spki.to_vec()), &self.issuer)
            .expect("issue")
            .pem()
    }
}

/// Writes `contents` to `name` in `dir` and returns the path.
fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

/// Creates the identity of `environment` with `mosaicd init` and returns the
/// key of the request `mosaicd identity csr` prints for it (checked against the
/// fingerprint the command reports).
fn instance_key_from_csr(environment: &TestEnvironment) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let run = |arguments: &[&str]| {
        let output = mosaicd(environment.data_dir.path())
            .arg("--database-url")
            .arg(&environment.database.url)
            .args(arguments)
            .output()
            .expect("run mosaicd");
        assert!(
            output.status.success(),
            "mosaicd {arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("json output")
    };
    let init = run(&["init", "--json"]);
    let csr = run(&[
        "identity",
        "csr",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--json",
    ]);
    assert_eq!(csr["fingerprint"], init["fingerprint"]);
    assert_eq!(csr["names"], serde_json::json!(["localhost", "127.0.0.1"]));
    let pem = csr["csr"].as_str().expect("csr pem");
    let der: rustls_pki_types::CertificateSigningRequestDer<'_> =
        rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("csr pem");
    let (_, request) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .expect("pkcs#10");
    let spki = request.certification_request_info.subject_pki.raw.to_vec();
    let key = PublicKey::from_spki_der(&spki).expect("p-256 key");
    assert_eq!(csr["fingerprint"], key.fingerprint().as_str());
    spki
}

/// Makes `config` run in CA mode with `chain_pem` and `bundle_pem`, written into
/// the environment's data dir.
fn in_ca_mode(config: &mut Config, directory: &Path, chain_pem: &str, bundle_pem: &str) {
    config.tls = TlsSettings::Ca {
        cert_chain: write(directory, "chain.pem", chain_pem),
        ca_bundle: write(directory, "ca-bundle.pem", bundle_pem),
    };
}

/// A daemon in CA mode: its identity made by `mosaicd init`, its certificate
/// issued by `ca` from its request, trusting `bundle_pem`.
async fn start_ca_daemon(
    environment: &TestEnvironment,
    ca: &TestCa,
    bundle_pem: &str,
    configure: impl FnOnce(Config) -> Config,
) -> TestDaemon {
    let spki = instance_key_from_csr(environment);
    let chain = ca.issue(&spki, &Leaf::default());
    let directory = environment.data_dir.path().to_path_buf();
    environment
        .start_peer(0, |config| {
            *config = configure(config.clone());
            in_ca_mode(config, &directory, &chain, bundle_pem);
        })
        .await
}

async fn two_ca_mode_daemons_peer_and_run_a_signed_command(backend: Backend) {
    let ca = TestCa::new("Mesh Test CA");
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = start_ca_daemon(&environment_a, &ca, &ca.pem, |config| config).await;
    let b = start_ca_daemon(&environment_b, &ca, &ca.pem, with_agent_types).await;

    // The daemon presents (and writes for local clients) the CA-issued chain.
    let presented = b.certificate_pem();
    let der: rustls_pki_types::CertificateDer<'_> =
        rustls_pki_types::pem::PemObject::from_pem_slice(presented.as_bytes()).expect("pem");
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
    assert!(
        parsed.issuer().to_string().contains("Mesh Test CA"),
        "{}",
        parsed.issuer()
    );

    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let instance_b = admin_b.instance().await;
    assert_eq!(instance_b.public_key, spki_of_pem(&presented));
    let (outbound, _) = connect_and_accept(
        &admin_a,
        &admin_b,
        &b,
        "ws",
        &["agent.spawn", "agent.status"],
    )
    .await;
    // Liveness pings cross in CA mode too.
    admin_a
        .wait_for(&outbound, "a ping answered", |connection| {
            connection.reachable && connection.last_contact_at.is_some()
        })
        .await;

    // A signed command from A runs an agent on B.
    let key_a = a.api_key(&[Scope::Admin]).await;
    let agent = FederationClient::new(a.channel().await)
        .spawn_remote_agent(with_key(
            pb::SpawnRemoteAgentRequest {
                peer_instance_id: instance_b.instance_id.clone(),
                spawn: Some(agent_pb::SpawnRequest {
                    agent_type: "printf".to_owned(),
                    prompt: "over the CA".to_owned(),
                    ..agent_pb::SpawnRequest::default()
                }),
                ..pb::SpawnRemoteAgentRequest::default()
            },
            &key_a,
        ))
        .await
        .expect("remote spawn over CA-mode mTLS")
        .into_inner()
        .agent
        .expect("agent");
    assert!(!agent.agent_id.is_empty());
    assert_eq!(agent.agent_type, "printf");

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_certified_by_another_ca_is_refused_at_tls_both_ways() {
    let ca = TestCa::new("Mesh Test CA");
    let other_ca = TestCa::new("Other CA");
    let environment_a = TestEnvironment::new(Backend::Sqlite).await;
    let environment_c = TestEnvironment::new(Backend::Sqlite).await;
    let a = start_ca_daemon(&environment_a, &ca, &ca.pem, |config| config).await;
    // C's certificate is from the other CA; C itself trusts both CAs, so what
    // refuses it is A's gate alone.
    let both = format!("{}{}", ca.pem, other_ca.pem);
    let c = start_ca_daemon(&environment_c, &other_ca, &both, |config| config).await;
    let (admin_a, admin_c) = (Admin::of(&a).await, Admin::of(&c).await);
    let instance_a = admin_a.instance().await;

    // C dials A: first contact verifies A (C trusts A's CA), but A refuses C's
    // client certificate during the handshake of the connection request.
    let status = admin_c
        .connect(&a.url(), "ws", &instance_a.fingerprint, &[])
        .await
        .expect_err("A refuses a client certificate from another CA");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // A dials C: A's first contact refuses C's server certificate.
    let status = admin_a
        .connect(&c.url(), "ws", "", &[])
        .await
        .expect_err("A refuses a server certificate from another CA");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("certificate") || status.message().contains("Issuer"),
        "{status:?}"
    );
    assert!(admin_a.list().await.is_empty(), "A stored nothing");
    assert!(
        admin_c
            .list()
            .await
            .iter()
            .all(|connection| connection.state() != pb::ConnectionState::Active),
        "C has no active connection"
    );

    // A daemon in pinned mode (self-signed certificate) is refused by A too.
    let environment_p = TestEnvironment::new(Backend::Sqlite).await;
    let p = environment_p.start_peer(0, |_| {}).await;
    let admin_p = Admin::of(&p).await;
    let status = admin_p
        .connect(&a.url(), "ws", &instance_a.fingerprint, &[])
        .await
        .expect_err("A refuses a self-signed client certificate");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(admin_a.list().await.is_empty(), "A stored nothing");

    // Between two daemons of the same CA the same calls work.
    let environment_b = TestEnvironment::new(Backend::Sqlite).await;
    let b = start_ca_daemon(&environment_b, &ca, &ca.pem, |config| config).await;
    let admin_b = Admin::of(&b).await;
    connect_and_accept(&admin_b, &admin_a, &a, "ws", &[]).await;

    for daemon in [a, b, c, p] {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_that_cannot_serve_stops_the_start_naming_its_key() {
    let ca = TestCa::new("Mesh Test CA");
    let other_ca = TestCa::new("Other CA");
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let spki = instance_key_from_csr(&environment);
    let directory = environment.data_dir.path();
    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let now = time::OffsetDateTime::now_utc();

    let cases: Vec<(&str, String, String, &[&str])> = vec![
        (
            "a certificate for another key",
            ca.issue(&stranger.subject_public_key_info(), &Leaf::default()),
            ca.pem.clone(),
            &["tls.cert_chain", "not this instance's key"],
        ),
        (
            "an expired certificate",
            ca.issue(
                &spki,
                &Leaf {
                    not_before: now - time::Duration::days(10),
                    not_after: now - time::Duration::days(1),
                    ..Leaf::default()
                },
            ),
            ca.pem.clone(),
            &["tls.cert_chain", "expired"],
        ),
        (
            "a certificate not yet valid",
            ca.issue(
                &spki,
                &Leaf {
                    not_before: now + time::Duration::days(1),
                    ..Leaf::default()
                },
            ),
            ca.pem.clone(),
            &["tls.cert_chain", "not valid before"],
        ),
        (
            "a certificate from a CA outside the bundle",
            other_ca.issue(&spki, &Leaf::default()),
            ca.pem.clone(),
            &["tls.ca_bundle", "does not lead to a CA"],
        ),
        (
            "a certificate that cannot authenticate a client",
            ca.issue(
                &spki,
                &Leaf {
                    usages: vec![ExtendedKeyUsagePurpose::ServerAuth],
                    ..Leaf::default()
                },
            ),
            ca.pem.clone(),
            &["tls.cert_chain", "clientAuth"],
        ),
        (
            "a chain file with a private key in it",
            format!(
                "{}{}",
                ca.issue(&spki, &Leaf::default()),
                stranger.serialize_pem()
            ),
            ca.pem.clone(),
            &["tls.cert_chain", "private key"],
        ),
        (
            "a chain file that is not PEM",
            "not a certificate".to_owned(),
            ca.pem.clone(),
            &["tls.cert_chain", "no PEM certificate"],
        ),
        (
            "an empty bundle",
            ca.issue(&spki, &Leaf::default()),
            String::new(),
            &["tls.ca_bundle", "no PEM certificate"],
        ),
    ];
    for (case, chain, bundle, expected) in cases {
        let mut config = environment.config();
        in_ca_mode(&mut config, directory, &chain, &bundle);
        let error = match environment.start_with(config).await {
            Ok(daemon) => {
                daemon.stop().await;
                panic!("{case}: the daemon started");
            }
            Err(error) => format!("{error:#}"),
        };
        for part in expected {
            assert!(error.contains(part), "{case}: {error:?} lacks {part:?}");
        }
        assert!(
            !error.contains("PRIVATE KEY") && !error.contains("BEGIN"),
            "{case}: no file contents in errors: {error}"
        );
    }
    let mut config = environment.config();
    config.tls = TlsSettings::Ca {
        cert_chain: directory.join("missing.pem"),
        ca_bundle: write(directory, "ca-bundle.pem", &ca.pem),
    };
    let error = format!(
        "{:#}",
        environment.start_with(config).await.err().expect("refused")
    );
    assert!(
        error.contains("tls.cert_chain") && error.contains("cannot read"),
        "{error}"
    );

    // The same through the binary: `mosaicd serve` exits 2 (configuration)
    // and says which key is wrong; nothing was served.
    let chain = write(
        directory,
        "stranger.pem",
        &ca.issue(&stranger.subject_public_key_info(), &Leaf::default()),
    );
    let bundle = write(directory, "ca-bundle.pem", &ca.pem);
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::from({
            let mut command = mosaicd(directory);
            command
                .arg("--database-url")
                .arg(&environment.database.url)
                .args(["serve", "--listen", "127.0.0.1:0"])
                .env("MOSAIC_TLS_MODE", "ca")
                .env("MOSAIC_TLS_CERT_CHAIN", &chain)
                .env("MOSAIC_TLS_CA_BUNDLE", &bundle);
            command
        })
        .output(),
    )
    .await
    .expect("mosaicd exits at once")
    .expect("run mosaicd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tls.cert_chain") && stderr.contains("not this instance's key"),
        "{stderr}"
    );
    assert!(!stderr.contains("serving"), "{stderr}");

    // The correct chain starts.
    let mut config = environment.config();
    in_ca_mode(
        &mut config,
        directory,
        &ca.issue(&spki, &Leaf::default()),
        &ca.pem,
    );
    let daemon = environment.start_with(config).await.expect("starts");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_is_refused_in_ca_mode_and_changes_nothing() {
    let ca = TestCa::new("Mesh Test CA");
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = start_ca_daemon(&environment, &ca, &ca.pem, |config| config).await;
    let admin = Admin::of(&daemon).await;
    let before = admin.instance().await;
    let key = daemon.api_key(&[Scope::Admin]).await;
    let status = FederationClient::new(daemon.channel().await)
        .rotate_keys(with_key(pb::RotateKeysRequest::default(), &key))
        .await
        .expect_err("refused in CA mode");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("CA mode"), "{status:?}");
    let after = admin.instance().await;
    assert_eq!(after.public_key, before.public_key);
    assert!(after.previous_keys.is_empty(), "no key was rotated out");
    let (_, _, previous) = mosaic_mesh::identity::load_public(&environment.store().await)
        .await
        .expect("load")
        .expect("identity");
    assert!(previous.is_empty(), "nothing written");
    assert_eq!(spki_of_pem(&daemon.certificate_pem()), before.public_key);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standard_tls_client_verifies_the_daemon_with_the_ca_bundle() {
    let ca = TestCa::new("Mesh Test CA");
    let other_ca = TestCa::new("Other CA");
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = start_ca_daemon(&environment, &ca, &ca.pem, |config| config).await;
    let url = format!("https://localhost:{}", daemon.address.port());
    let channel_trusting = |root: &str| {
        tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(root)),
            )
            .expect("tls config")
            .connect_timeout(Duration::from_secs(5))
    };
    // tonic's own rustls client, with the CA as its only root and host name
    // verification: no pin, no custom verifier.
    let channel = channel_trusting(&ca.pem)
        .connect()
        .await
        .expect("connect with the CA bundle");
    let instance = FederationClient::new(channel)
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("GetInstance")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(instance.public_key, spki_of_pem(&daemon.certificate_pem()));
    // Trusting another CA, the same client refuses the daemon.
    let refused = match channel_trusting(&other_ca.pem).connect().await {
        Err(error) => Err(error.to_string()),
        Ok(channel) => FederationClient::new(channel)
            .get_instance(pb::GetInstanceRequest {})
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
    };
    assert!(refused.is_err(), "a client trusting another CA connected");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_verifies_a_ca_mode_daemon_with_the_ca_bundle() {
    let python = python::python_with_grpcio();
    let ca = TestCa::new("Mesh Test CA");
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = start_ca_daemon(&environment, &ca, &ca.pem, |config| config).await;
    let bundle = write(environment.data_dir.path(), "client-ca.pem", &ca.pem);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/check_identity.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("localhost:{}", daemon.address.port()))
        .arg(&bundle)
        .output()
        .await
        .expect("run the python client");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    let instance = Admin::of(&daemon).await.instance().await;
    assert_eq!(report["instance_id"], instance.instance_id.as_str());
    assert_eq!(report["fingerprint"], instance.fingerprint.as_str());
    daemon.stop().await;
}

#[test]
fn identity_csr_refuses_bad_names_and_a_missing_identity() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let csr = |arguments: &[&str]| {
        mosaicd(data_dir.path())
            .args(["identity", "csr"])
            .args(arguments)
            .output()
            .expect("run mosaicd")
    };
    let output = csr(&["--dns", "localhost"]);
    assert_eq!(output.status.code(), Some(3), "no database yet");
    assert!(String::from_utf8_lossy(&output.stderr).contains("mosaicd init"));
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "nothing created"
    );

    let init = mosaicd(data_dir.path())
        .arg("init")
        .output()
        .expect("run mosaicd");
    assert!(init.status.success());
    for bad in ["bad name", "", "ünïcode.example"] {
        let output = csr(&["--dns", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("not a DNS name"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = csr(&["--ip", "not-an-ip"]);
    assert_eq!(output.status.code(), Some(2));
    // Without names, the request names the host of the public URL.
    let output = csr(&["--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(printed["names"], serde_json::json!(["127.0.0.1"]));
    // Text output is the PEM alone, ready for a CA.
    let output = csr(&["--dns", "mesh.example.org"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("-----BEGIN CERTIFICATE REQUEST-----")
            && text
                .trim_end()
                .ends_with("-----END CERTIFICATE REQUEST-----"),
        "{text}"
    );
}
