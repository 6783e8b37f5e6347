//! Replicas of one instance (DESIGN.md section 11): several `mosaicd`
//! processes on one PostgreSQL, behind a TCP pass-through balancer, look and
//! act like one instance.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::store::Store;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept, connect_and_accept_at};
use crate::support::agents::with_agent_types;
use crate::support::daemon::{TestEnvironment, instance_of, with_key};
use crate::support::peer::TestPeer;
use crate::support::python;
use crate::support::replicas::Replicas;
use crate::support::tls::served_certificate;

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_started_together_on_an_empty_database_all_come_up_with_one_identity() {
    for round in 0..10 {
        // `start` panics unless all three serve.
        let replicas = Replicas::start(3, "").await;
        let mut identities = BTreeSet::new();
        for index in 0..replicas.len() {
            let instance = instance_of(replicas.channel(index).await).await;
            identities.insert((instance.instance_id, instance.public_key));
        }
        assert_eq!(identities.len(), 1, "round {round}: {identities:?}");
        let store = Store::connect(&replicas.database.url)
            .await
            .expect("connect");
        let (_, keys) = store
            .load_instance()
            .await
            .expect("load")
            .expect("an identity");
        assert_eq!(keys.len(), 1, "round {round}: one key was made");
        drop(store);
        replicas.cleanup().await;
    }
}

/// Runs `examples/python/check_identity.py` (grpcio, gRPC's C-core TLS)
/// against `address`, pinned to the certificate file `certificate`; returns
/// the instance id it read.
async fn grpcio_instance_id(address: &str, certificate: &std::path::Path) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/check_identity.py");
    let output = tokio::process::Command::new(python::python_with_grpcio())
        .arg(&script)
        .arg(address)
        .arg(certificate)
        .output()
        .await
        .expect("run the python client");
    assert!(
        output.status.success(),
        "grpcio pinned to {} could not reach {address}: {}",
        certificate.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json report");
    report["instance_id"]
        .as_str()
        .expect("an instance id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_and_every_restart_serves_the_same_certificate() {
    let mut replicas = Replicas::start(2, "").await;
    let first = served_certificate(replicas.address(0)).await;
    assert!(
        served_certificate(replicas.address(1)).await == first,
        "replica 1 serves other bytes than replica 0"
    );
    replicas.restart(0).await;
    replicas.restart(1).await;
    for index in 0..replicas.len() {
        assert!(
            served_certificate(replicas.address(index)).await == first,
            "replica {index} serves other bytes after a restart"
        );
        // What it wrote for local clients is what it serves.
        let written: Vec<u8> = rustls_pki_types::pem::PemObject::from_pem_slice(
            replicas.certificate_pem(index).as_bytes(),
        )
        .map(|der: rustls_pki_types::CertificateDer<'_>| der.as_ref().to_vec())
        .expect("pem");
        assert!(
            written == first,
            "replica {index}'s certificate file differs"
        );
    }

    // A stock grpcio client pinned to replica 0's file reaches both replicas,
    // directly and through the balancer (round robin: two calls, one each).
    let pinned = mosaic_mesh::config::certificate_path(replicas.data_dir(0));
    let instance_id = instance_of(replicas.channel(0).await).await.instance_id;
    let balanced = replicas.balancer.address.to_string();
    let handed_before = replicas.balancer.handed();
    for address in [
        replicas.address(0),
        replicas.address(1),
        &balanced,
        &balanced,
    ] {
        assert_eq!(grpcio_instance_id(address, &pinned).await, instance_id);
    }
    let handed_after = replicas.balancer.handed();
    assert!(
        handed_after
            .iter()
            .zip(&handed_before)
            .all(|(after, before)| after > before),
        "the balancer sent a grpcio connection to each replica: {handed_before:?} -> {handed_after:?}"
    );
    replicas.cleanup().await;
}

/// The SubjectPublicKeyInfo of a certificate (DER).
fn key_of(certificate: &[u8]) -> Vec<u8> {
    mosaic_mesh::identity::certificate::spki_of_certificate(certificate).expect("a certificate")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_through_one_replica_reaches_the_others_without_a_restart() {
    let mut replicas = Replicas::start(2, "").await;
    let peer_environment = TestEnvironment::new(Backend::Sqlite).await;
    let peer = peer_environment.start_peer(0, |_| {}).await;
    let admin_peer = Admin::of(&peer).await;
    let admin_0 = replicas.admin(0).await;
    let (on_peer, on_instance) =
        connect_and_accept_at(&admin_peer, &admin_0, &replicas.balancer.url(), "ws", &[]).await;

    // Rotate through replica 0, with a short grace for the old key.
    let grace = Duration::from_secs(3);
    let rotated = admin_0
        .client
        .clone()
        .rotate_keys(with_key(
            pb::RotateKeysRequest {
                grace_period_seconds: Some(3),
            },
            &admin_0.key,
        ))
        .await
        .expect("rotate")
        .into_inner();
    let rotated_at = Instant::now();
    let new_key = rotated.current_key.expect("the new key");

    // Replica 1 serves the new key within 5 s, with no restart, and the
    // same certificate bytes as replica 0.
    loop {
        let served = served_certificate(replicas.address(1)).await;
        if key_of(&served) == new_key.public_key {
            assert!(
                served == served_certificate(replicas.address(0)).await,
                "the replicas serve different certificates for the new key"
            );
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(5),
            "replica 1 still serves the old key after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It rewrote its certificate file too: a client pinning that file now
    // reaches it, and it shows the new key.
    let admin_1 = replicas.admin(1).await;
    assert_eq!(admin_1.instance().await.public_key, new_key.public_key);

    // The peer learns the new key from replica 0's notice. Once the old key's
    // grace is over, replica 0 stops and every connection goes to replica 1:
    // the peer still gets through (TLS shows the new key) and replica 1
    // still reaches the peer (it signs and presents the new key).
    admin_peer
        .wait_for(&on_peer, "the peer to pin the new key", |connection| {
            connection.remote_fingerprint == new_key.fingerprint
        })
        .await;
    tokio::time::sleep(grace.saturating_sub(rotated_at.elapsed()) + Duration::from_millis(500))
        .await;
    replicas.balancer.pin(Some(1));
    replicas.kill(0).await;
    admin_peer.suspend(&on_peer).await.expect("suspend");
    admin_1
        .wait_for_state(&on_instance, pb::ConnectionState::Suspended)
        .await;
    admin_peer.resume(&on_peer).await.expect("resume");
    admin_1
        .wait_for_state(&on_instance, pb::ConnectionState::Active)
        .await;
    admin_1
        .suspend(&on_instance)
        .await
        .expect("suspend from replica 1");
    admin_peer
        .wait_for_state(&on_peer, pb::ConnectionState::Suspended)
        .await;

    peer.stop().await;
    peer_environment.cleanup().await;
    replicas.cleanup().await;
}

/// An agent type that ends at once, for the replicas' configuration.
const TRUE_AGENT: &str = "[agents.types.true]\ncommand = [\"true\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn one_spawn_delivered_to_two_replicas_at_once_starts_one_agent() {
    use mosaic_mesh::federation::envelope;
    use prost::Message as _;

    let replicas = Replicas::start(2, TRUE_AGENT).await;
    let admin = replicas.admin(0).await;
    let instance = admin.instance().await;
    // A hand-made peer, connected and granted agent.spawn.
    let peer = TestPeer::new("sender").await;
    let certificate = replicas.certificate_pem(0);
    let mut clients = Vec::new();
    for index in 0..replicas.len() {
        let url = format!("https://{}", replicas.address(index));
        clients.push(pb::federation_client::FederationClient::new(
            peer.channel_to_url(&url, &certificate).await,
        ));
    }
    let request = peer.connection_request(&instance.instance_id, "ws");
    clients[0]
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(envelope::seal(&request, peer.current().as_ref()).expect("seal")),
        })
        .await
        .expect("connection request");
    let inbound = admin.open_in("ws").await;
    admin
        .accept(&inbound.connection_id, &["agent.spawn"])
        .await
        .expect("accept");
    let store = Store::connect(&replicas.database.url)
        .await
        .expect("connect");

    for round in 0..20 {
        let key_id = peer.current().public_key().key_id();
        let payload = pb::CommandPayload {
            header: Some(peer.header(&instance.instance_id, "ws", key_id)),
            command: Some(pb::command_payload::Command::AgentSpawn(
                pb::AgentSpawnCommand {
                    spawn: Some(mosaic_mesh::proto::agent::SpawnRequest {
                        agent_type: "true".to_owned(),
                        prompt: format!("round {round}"),
                        ..Default::default()
                    }),
                },
            )),
        };
        let sealed = envelope::seal(&payload, peer.current().as_ref()).expect("seal");
        // The same signed bytes to both replicas at the same moment.
        let deliveries = clients.iter().map(|client| {
            let mut client = client.clone();
            let sealed = sealed.clone();
            async move {
                client
                    .execute_command(pb::ExecuteCommandRequest {
                        envelope: Some(sealed),
                    })
                    .await
                    .expect("the command is answered")
                    .into_inner()
                    .envelope
                    .expect("a signed reply")
            }
        });
        let replies = futures::future::join_all(deliveries).await;
        assert!(
            replies.iter().all(|reply| reply == &replies[0]),
            "round {round}: the replicas gave different replies"
        );
        let result =
            pb::CommandResultPayload::decode(replies[0].payload.as_slice()).expect("a result");
        assert!(
            matches!(
                result.outcome,
                Some(pb::command_result_payload::Outcome::Agent(_))
            ),
            "round {round}: {result:?}"
        );
        let agents = store
            .list_agents(&Default::default(), None, 100)
            .await
            .expect("list agents");
        assert_eq!(
            agents.len(),
            round + 1,
            "round {round}: one agent per spawn"
        );
    }
    drop(store);
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_create_job_sent_to_two_replicas_at_once_makes_one_job() {
    let replicas = Replicas::start(2, "").await;
    let store = Store::connect(&replicas.database.url)
        .await
        .expect("connect");
    let key = mosaic_mesh::auth::create_api_key(&store, "bot", &[Scope::Coordinator])
        .await
        .expect("create an API key")
        .secret
        .to_string();
    let mut clients = Vec::new();
    for index in 0..replicas.len() {
        clients.push(coordinator_pb::coordinator_client::CoordinatorClient::new(
            replicas.channel(index).await,
        ));
    }
    for round in 0..20 {
        let request = coordinator_pb::CreateJobRequest {
            job_type: "review".to_owned(),
            payload_json: format!("{{\"round\":{round}}}"),
            idempotency_key: format!("retry-{round}"),
            ..Default::default()
        };
        let creations = clients.iter().map(|client| {
            let mut client = client.clone();
            let request = with_key(request.clone(), &key);
            async move {
                client
                    .create_job(request)
                    .await
                    .expect("CreateJob")
                    .into_inner()
                    .job
                    .expect("a job")
            }
        });
        let jobs = futures::future::join_all(creations).await;
        assert_eq!(
            jobs[0].job_id, jobs[1].job_id,
            "round {round}: both got the same job"
        );
        let listed = store
            .list_jobs(&Default::default(), None, 100)
            .await
            .expect("list jobs");
        assert_eq!(listed.len(), round + 1, "round {round}: one job per key");
    }
    drop(store);
    replicas.cleanup().await;
}

/// Calls of `method` a daemon has served, whatever their outcome.
fn calls_served(daemon: &crate::support::daemon::TestDaemon, method: &str) -> u64 {
    let text = daemon.metrics.render(
        &daemon.rate_limiter.metrics().snapshot(),
        &mosaic_mesh::metrics::StoreGauges::default(),
    );
    text.lines()
        .filter(|line| {
            line.starts_with("mosaic_grpc_calls_total")
                && line.contains(&format!("method=\"{method}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Federation timings short enough for a test: pings every 300 ms, notice
/// retries from 100 ms up to 300 ms.
const SHORT_FEDERATION: &str = "[federation]
ping_interval_ms = 300
notice_retry_initial_ms = 100
notice_retry_max_ms = 300
";

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_deliver_each_notice_once_and_ping_as_one() {
    let replicas = Replicas::start(3, SHORT_FEDERATION).await;
    let peer_environment = TestEnvironment::new(Backend::Sqlite).await;
    let peer = peer_environment.start_peer(0, |_| {}).await;
    let port = peer.address.port();
    let admin_peer = Admin::of(&peer).await;
    let admin_0 = replicas.admin(0).await;
    let (on_peer, on_instance) =
        connect_and_accept_at(&admin_peer, &admin_0, &replicas.balancer.url(), "ws", &[]).await;

    // Pings: over 3 s at one every 300 ms, about 10 from the instance, not
    // 10 from each replica.
    let pings_before = calls_served(&peer, "Ping");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pings = calls_served(&peer, "Ping") - pings_before;
    assert!(
        (3..=15).contains(&pings),
        "the peer got {pings} pings in 3 s from three replicas pinging every 300 ms"
    );

    // A notice queued while the peer is down, then retried by whichever
    // replica holds the connection's lease: delivered once when it is back.
    peer.stop().await;
    let admin_1 = replicas.admin(1).await;
    admin_1.suspend(&on_instance).await.expect("suspend");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peer = peer_environment.start_peer(port, |_| {}).await;
    let admin_peer = Admin::of(&peer).await;
    admin_peer
        .wait_for_state(&on_peer, pb::ConnectionState::Suspended)
        .await;
    // Time for any second delivery to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_served(&peer, "NotifyConnection"),
        1,
        "the SUSPENDED notice was delivered more than once"
    );

    peer.stop().await;
    peer_environment.cleanup().await;
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_holder_of_the_background_lease_stops_another_replica_takes_over() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    let replicas = Replicas::start(2, SHORT_FEDERATION).await;
    let peer_environment = TestEnvironment::new(Backend::Sqlite).await;
    let peer = peer_environment.start_peer(0, |_| {}).await;
    let admin_peer = Admin::of(&peer).await;
    let admin_0 = replicas.admin(0).await;
    connect_and_accept_at(&admin_peer, &admin_0, &replicas.balancer.url(), "ws", &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A holder that stopped: the lease names a process that is gone, for
    // 2 s more. Nobody pings until it runs out; then a replica takes it
    // over with the next fencing token and the pings resume.
    let mut database = AsyncPgConnection::establish(&replicas.database.url)
        .await
        .expect("connect");
    let gone_until = mosaic_mesh::clock::now_ms() + 2_000;
    diesel::sql_query(format!(
        "UPDATE replica_leases SET holder = 'a-replica-that-stopped', token = token + 1, \
         expires_at_ms = {gone_until} WHERE name = 'federation.background'"
    ))
    .execute(&mut database)
    .await
    .expect("hand the lease to a stopped holder");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = calls_served(&peer, "Ping");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        calls_served(&peer, "Ping"),
        before,
        "nobody pings while the stopped holder's lease runs"
    );
    // Run out at 2 s, taken over within three ping rounds (900 ms) after.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let resumed = calls_served(&peer, "Ping");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        calls_served(&peer, "Ping") > resumed,
        "no replica took the background work over"
    );

    drop(database);
    peer.stop().await;
    peer_environment.cleanup().await;
    replicas.cleanup().await;
}

/// A peer with the test agent types, connected with the replicas' instance
/// in workspace `ws` and granting it the agent commands, and a bot's API
/// key on the instance for `DispatchJob`.
struct PeerWithAgents {
    environment: TestEnvironment,
    daemon: crate::support::daemon::TestDaemon,
    instance_id: String,
    store: Store,
    dispatch_key: String,
}

impl PeerWithAgents {
    /// `agent.watch` streams the peer serves now: its inbound entries not
    /// finished yet.
    async fn open_watches(&self) -> usize {
        let mut client = pb::federation_client::FederationClient::new(self.daemon.channel().await);
        let request = pb::ListCommandLogRequest {
            direction: pb::CommandDirection::Inbound as i32,
            page_size: 1000,
            ..pb::ListCommandLogRequest::default()
        };
        let key = self.daemon.api_key(&[Scope::Admin]).await;
        client
            .list_command_log(with_key(request, &key))
            .await
            .expect("the peer's command log")
            .into_inner()
            .entries
            .iter()
            .filter(|entry| entry.command_type == "agent.watch" && entry.outcome == "streaming")
            .count()
    }

    /// Waits until the peer serves `count` watch streams.
    async fn wait_for_open_watches(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let open = self.open_watches().await;
            if open == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open} watch streams, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect(replicas: &Replicas) -> PeerWithAgents {
        let environment = TestEnvironment::new(Backend::Sqlite).await;
        let daemon = environment
            .start_peer(0, |config| *config = with_agent_types(config.clone()))
            .await;
        let admin_peer = Admin::of(&daemon).await;
        connect_and_accept(
            &replicas.admin(0).await,
            &admin_peer,
            &daemon,
            "ws",
            &["agent.spawn", "agent.status", "agent.kill"],
        )
        .await;
        let store = Store::connect(&replicas.database.url)
            .await
            .expect("connect");
        let dispatch_key = mosaic_mesh::auth::create_api_key(&store, "bot", &[Scope::Webhook])
            .await
            .expect("create an API key")
            .secret
            .to_string();
        PeerWithAgents {
            instance_id: admin_peer.instance().await.instance_id,
            environment,
            daemon,
            store,
            dispatch_key,
        }
    }

    /// `DispatchJob` of `sh -c prompt` to the peer through replica `index`.
    async fn dispatch(
        &self,
        replicas: &Replicas,
        index: usize,
        prompt: &str,
        idempotency_key: &str,
    ) -> coordinator_pb::DispatchJobResponse {
        coordinator_pb::coordinator_client::CoordinatorClient::new(replicas.channel(index).await)
            .dispatch_job(with_key(
                coordinator_pb::DispatchJobRequest {
                    job_type: "remote-work".to_owned(),
                    agent_type: "sh".to_owned(),
                    prompt: prompt.to_owned(),
                    peer_instance_id: self.instance_id.clone(),
                    idempotency_key: idempotency_key.to_owned(),
                    ..Default::default()
                },
                &self.dispatch_key,
            ))
            .await
            .expect("DispatchJob")
            .into_inner()
    }

    async fn agents(&self) -> crate::support::agents::Agents {
        crate::support::agents::Agents::new(
            self.daemon.channel().await,
            self.daemon.api_key(&[Scope::Agents]).await,
        )
    }

    async fn stop(self) {
        drop(self.store);
        self.daemon.stop().await;
        self.environment.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_remote_dispatch_sent_to_two_replicas_at_once_starts_one_agent() {
    let replicas = Replicas::start(2, "").await;
    let peer = PeerWithAgents::connect(&replicas).await;
    let mut agents = peer.agents().await;
    for round in 0..10 {
        let key = format!("retry-{round}");
        let (first, second) = tokio::join!(
            peer.dispatch(&replicas, 0, "sleep 600", &key),
            peer.dispatch(&replicas, 1, "sleep 600", &key),
        );
        let job = |response: &coordinator_pb::DispatchJobResponse| {
            response.job.as_ref().expect("a job").job_id.clone()
        };
        assert_eq!(job(&first), job(&second), "round {round}: two jobs");
        // A caller that came second while the spawn was in flight may get
        // the job before its agent; an agent it names is the same.
        let named: BTreeSet<&str> = [first.agent_id.as_str(), second.agent_id.as_str()]
            .into_iter()
            .filter(|agent| !agent.is_empty())
            .collect();
        assert_eq!(named.len(), 1, "round {round}: agents {named:?}");
        let started = agents
            .list(Default::default())
            .await
            .expect("ListAgents")
            .agents;
        assert_eq!(started.len(), round + 1, "round {round}: {started:?}");
    }
    for agent in agents
        .list(Default::default())
        .await
        .expect("ListAgents")
        .agents
    {
        agents
            .kill(&agent.agent_id, "the test is over")
            .await
            .expect("kill");
    }
    peer.stop().await;
    replicas.cleanup().await;
}

/// A job dispatched through one replica to a peer, then followed while every
/// replica has been restarted: the peer serves one follower's watch stream,
/// not one per replica, and no status polls; when the follower is killed
/// another takes over and the job still ends with its agent.
#[tokio::test(flavor = "multi_thread")]
async fn remote_dispatch_follows_are_not_multiplied_by_the_replica_count() {
    // Polls (the fallback) every 200 ms: a follower lease of 600 ms.
    let mut replicas = Replicas::start(3, "[coordinator]\nremote_agent_poll_ms = 200\n").await;
    let peer = PeerWithAgents::connect(&replicas).await;
    let dispatched = peer.dispatch(&replicas, 0, "sleep 600", "").await;
    let job_id = dispatched.job.expect("a job").job_id;
    // Every replica restarted: each resumes what it follows at start.
    for index in 0..replicas.len() {
        replicas.restart(index).await;
    }
    peer.wait_for_open_watches(1).await;
    let polls_before = calls_served(&peer.daemon, "ExecuteCommand");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peer.open_watches().await, 1, "one follower's stream");
    let polls = calls_served(&peer.daemon, "ExecuteCommand") - polls_before;
    assert_eq!(polls, 0, "the follower holds its stream and does not poll");

    // The follower killed, whichever it is: the others take over, again with
    // one stream.
    replicas.kill(0).await;
    replicas.kill(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    peer.wait_for_open_watches(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(peer.open_watches().await, 1, "the replica left follows");
    // And the job still ends with its agent.
    let mut agents = peer.agents().await;
    agents
        .kill(&dispatched.agent_id, "the test is over")
        .await
        .expect("KillAgent");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = peer
            .store
            .find_job(&job_id)
            .await
            .expect("find")
            .expect("the job");
        if job.state.is_terminal() {
            assert_eq!(job.state.as_str(), "FAILED", "{job:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the job never ended: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    peer.stop().await;
    replicas.cleanup().await;
}
