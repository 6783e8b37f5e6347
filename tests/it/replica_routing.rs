//! Any replica acts on any agent (DESIGN.md section 11): a kill, the kill a
//! cancelled job causes, a peer's signed kill and a watch that land on a
//! replica that does not supervise the agent are carried to the one that
//! does, and answer as it would; so is a peer's signed watch. An owner that
//! holds its lease but does not answer makes the call UNAVAILABLE, naming it.

use std::time::Duration;

use futures::StreamExt as _;
use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::replica::replica_client::ReplicaClient;
use mosaic_mesh::store::Store;
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept_at};
use crate::support::agents::{Agents, process_is_alive, wait_until_dead};
use crate::support::binary::channel_to;
use crate::support::daemon::{TestEnvironment, with_key};
use crate::support::peer::TestPeer;
use crate::support::replicas::Replicas;

/// `count` replicas with the test agent types (32 at once), a lease of 5 s,
/// a store on their database and an API key with `scopes`.
async fn start(count: usize, scopes: &[Scope]) -> (Replicas, Store, String) {
    Replicas::with_agents(count, 5, "max_concurrent = 32\n", scopes).await
}

/// A new connection through the balancer, as each CLI run makes.
async fn through_balancer(replicas: &Replicas) -> tonic::transport::Channel {
    channel_to(&replicas.balancer.address.to_string(), replicas.data_dir(0)).await
}

/// A peer daemon connected to the replicas through the balancer in `ws`.
struct PeerOfReplicas {
    /// The peer's operator (admin client and key).
    admin: Admin,
    /// The replicas' instance id.
    instance_id: String,
    _daemon: crate::support::daemon::TestDaemon,
    _environment: TestEnvironment,
}

impl PeerOfReplicas {
    /// A new peer, connected and granted `grants` by the replicas.
    async fn connect(replicas: &Replicas, grants: &[&str]) -> PeerOfReplicas {
        let environment = TestEnvironment::new(Backend::Sqlite).await;
        let daemon = environment.start_peer(0, |_| {}).await;
        let admin = Admin::of(&daemon).await;
        connect_and_accept_at(
            &admin,
            &replicas.admin(0).await,
            &replicas.balancer.url(),
            "ws",
            grants,
        )
        .await;
        PeerOfReplicas {
            admin,
            instance_id: replicas.admin(0).await.instance().await.instance_id,
            _daemon: daemon,
            _environment: environment,
        }
    }

    /// Pins the balancer to replica `index` and cuts the peer's connection;
    /// returns once a call from the peer is answered again (its channel
    /// finds the cut on its next call and connects to that replica).
    async fn via(&self, replicas: &Replicas, index: usize) {
        replicas.balancer.pin(Some(index));
        replicas.balancer.cut();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listed = self
                .admin
                .client
                .clone()
                .list_remote_agents(with_key(
                    pb::ListRemoteAgentsRequest {
                        peer_instance_id: self.instance_id.clone(),
                        ..pb::ListRemoteAgentsRequest::default()
                    },
                    &self.admin.key,
                ))
                .await;
            if listed.is_ok() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{listed:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A signed spawn of `sh -c prompt` on the replicas.
    async fn spawn(&self, prompt: &str) -> agent_pb::Agent {
        self.admin
            .client
            .clone()
            .spawn_remote_agent(with_key(
                pb::SpawnRemoteAgentRequest {
                    peer_instance_id: self.instance_id.clone(),
                    spawn: Some(agent_pb::SpawnRequest {
                        agent_type: "sh".to_owned(),
                        prompt: prompt.to_owned(),
                        ..agent_pb::SpawnRequest::default()
                    }),
                    ..pb::SpawnRemoteAgentRequest::default()
                },
                &self.admin.key,
            ))
            .await
            .expect("remote spawn")
            .into_inner()
            .agent
            .expect("agent")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kills_through_the_balancer_all_stop_their_agents_wherever_they_run() {
    let (replicas, _store, key) = start(3, &[Scope::Agents]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    let mut spawned = Vec::new();
    for _ in 0..20 {
        spawned.push(on_0.spawn("sh", "sleep 600").await.expect("spawn"));
    }
    // Each kill on a connection of its own, so the balancer hands them to
    // the three replicas in turn: two thirds land on one that does not
    // supervise the agent.
    let handed_before = replicas.balancer.handed();
    for agent in &spawned {
        let mut through = Agents::new(through_balancer(&replicas).await, key.clone());
        let killed = through
            .kill(&agent.agent_id, "the test is over")
            .await
            .unwrap_or_else(|status| panic!("kill of {} refused: {status:?}", agent.agent_id));
        assert_eq!(killed.agent_id, agent.agent_id);
    }
    let handed_after = replicas.balancer.handed();
    for index in 1..3 {
        assert!(
            handed_after[index] - handed_before[index] >= 6,
            "the kills did not reach replica {index}: {handed_before:?} -> {handed_after:?}"
        );
    }
    for agent in &spawned {
        let ended = on_0
            .wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
            .await;
        assert_eq!(ended.state_reason, "the test is over");
        assert_eq!(ended.runner_id, spawned[0].runner_id, "{ended:?}");
        let pid = agent.pid.expect("a pid");
        wait_until_dead(pid).await;
    }
    assert!(
        !spawned[0].runner_id.is_empty(),
        "the agent names its runner"
    );
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_on_another_replica_gets_every_output_line_in_order() {
    let (replicas, _store, key) = start(2, &[Scope::Agents]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    // The watch starts before the first line: output is streamed from the
    // time of the call.
    let agent = on_0
        .spawn(
            "sh",
            "sleep 1; i=1; while [ $i -le 300 ]; do echo line-$i; i=$((i+1)); done",
        )
        .await
        .expect("spawn");
    let mut watcher =
        agent_pb::agent_control_client::AgentControlClient::new(replicas.channel(1).await);
    let mut stream = watcher
        .watch_agent(with_key(
            agent_pb::WatchAgentRequest {
                agent_id: agent.agent_id.clone(),
                include_output: true,
                from_sequence: None,
            },
            &key,
        ))
        .await
        .expect("WatchAgent on the other replica")
        .into_inner();
    let mut lines = Vec::new();
    let mut last_state = None;
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = stream.next().await {
            match message.expect("a watch message").event {
                Some(agent_pb::watch_agent_response::Event::OutputLine(line)) => {
                    lines.push(line.line);
                }
                Some(agent_pb::watch_agent_response::Event::StateChange(change)) => {
                    last_state = Some(change.to_state);
                }
                None => panic!("a message without an event"),
            }
        }
    })
    .await;
    assert!(watched.is_ok(), "the watch did not end with the agent");
    let expected: Vec<String> = (1..=300).map(|line| format!("line-{line}")).collect();
    assert_eq!(lines, expected);
    assert_eq!(last_state, Some(agent_pb::AgentState::Completed as i32));
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cancelled_through_another_replica_stops_its_agent() {
    let (replicas, store, key) =
        start(2, &[Scope::Webhook, Scope::Coordinator, Scope::Agents]).await;
    let mut bot =
        coordinator_pb::coordinator_client::CoordinatorClient::new(replicas.channel(0).await);
    let dispatched = bot
        .dispatch_job(with_key(
            coordinator_pb::DispatchJobRequest {
                job_type: "agent-work".to_owned(),
                workspace: "w1".to_owned(),
                agent_type: "sh".to_owned(),
                prompt: "sleep 600".to_owned(),
                idempotency_key: "cancel-elsewhere".to_owned(),
                ..coordinator_pb::DispatchJobRequest::default()
            },
            &key,
        ))
        .await
        .expect("DispatchJob")
        .into_inner();
    let job_id = dispatched.job.expect("a job").job_id;
    let mut on_1 = Agents::new(replicas.channel(1).await, key.clone());
    let agent = on_1
        .wait_for_state(&dispatched.agent_id, agent_pb::AgentState::Running)
        .await;

    coordinator_pb::coordinator_client::CoordinatorClient::new(replicas.channel(1).await)
        .cancel_job(with_key(
            coordinator_pb::CancelJobRequest {
                job_id: job_id.clone(),
                reason: "not needed".to_owned(),
            },
            &key,
        ))
        .await
        .expect("CancelJob on the replica that does not supervise the agent");
    let killed = on_1
        .wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
        .await;
    assert_eq!(killed.state_reason, "its job was cancelled");
    wait_until_dead(agent.pid.expect("a pid")).await;
    drop(store);
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peers_signed_kill_works_through_either_replica() {
    let (replicas, _store, key) = start(2, &[Scope::Agents]).await;
    let peer =
        PeerOfReplicas::connect(&replicas, &["agent.spawn", "agent.status", "agent.kill"]).await;
    let mut peer_client = peer.admin.client.clone();
    peer.via(&replicas, 0).await;
    let mut spawned = Vec::new();
    for _ in 0..2 {
        let agent = peer.spawn("sleep 600").await;
        assert!(agent.runner_id.is_empty(), "a peer learns no runner id");
        spawned.push(agent);
    }
    let mut agents = Agents::new(replicas.channel(0).await, key);
    let owner = agents
        .get(&spawned[0].agent_id)
        .await
        .expect("get")
        .runner_id;
    // The first kill lands on the replica that does not run the agent, the
    // second on the one that does.
    for (agent, index) in spawned.iter().zip([1, 0]) {
        peer.via(&replicas, index).await;
        let killed = peer_client
            .kill_remote_agent(with_key(
                pb::KillRemoteAgentRequest {
                    peer_instance_id: peer.instance_id.clone(),
                    agent_id: agent.agent_id.clone(),
                    reason: "done".to_owned(),
                    ..pb::KillRemoteAgentRequest::default()
                },
                &peer.admin.key,
            ))
            .await
            .unwrap_or_else(|status| panic!("remote kill through replica {index}: {status:?}"));
        assert!(killed.into_inner().agent.is_some());
        let ended = agents
            .wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
            .await;
        assert_eq!(ended.runner_id, owner);
        wait_until_dead(agent.pid.expect("a pid")).await;
    }
    replicas.balancer.pin(None);
    replicas.cleanup().await;
}

/// A peer follows its agent with a signed `agent.watch` that lands on the
/// replica that does not run it: every line arrives once, in order, and the
/// watch ends with the agent.
#[tokio::test(flavor = "multi_thread")]
async fn a_peers_watch_through_the_other_replica_gets_every_line_in_order() {
    let (replicas, _store, key) = start(2, &[Scope::Agents]).await;
    let peer = PeerOfReplicas::connect(&replicas, &["agent.spawn", "agent.status"]).await;
    let mut peer_client = peer.admin.client.clone();
    peer.via(&replicas, 0).await;
    let agent = peer.spawn("sleep 1; seq 1 2000; sleep 1").await;
    let mut agents = Agents::new(replicas.channel(0).await, key);
    let owner = agents.get(&agent.agent_id).await.expect("get").runner_id;
    let mut agents_1 = Agents::new(replicas.channel(1).await, agents.key.clone());
    peer.via(&replicas, 1).await;
    let mut events = peer_client
        .watch_remote_agent(with_key(
            pb::WatchRemoteAgentRequest {
                peer_instance_id: peer.instance_id.clone(),
                agent_id: agent.agent_id.clone(),
                include_output: true,
                from_sequence: Some(1),
                ..pb::WatchRemoteAgentRequest::default()
            },
            &peer.admin.key,
        ))
        .await
        .expect("a watch through replica 1")
        .into_inner();
    let (mut lines, mut last_state) = (Vec::new(), None);
    while let Some(message) = events.message().await.expect("every batch verifies") {
        for event in message.events {
            match event.event {
                Some(agent_pb::watch_agent_response::Event::OutputLine(line)) => {
                    lines.push(line.line);
                }
                Some(agent_pb::watch_agent_response::Event::StateChange(change)) => {
                    last_state = Some(change.to_state());
                }
                None => {}
            }
        }
    }
    let expected: Vec<String> = (1..=2000).map(|number| number.to_string()).collect();
    assert_eq!(lines, expected);
    assert_eq!(last_state, Some(agent_pb::AgentState::Completed));
    // Replica 1 does not run it: the events came from replica 0.
    let seen_on_1 = agents_1.get(&agent.agent_id).await.expect("get on 1");
    assert_eq!(seen_on_1.runner_id, owner);
    let runs_on_1 = agents_1.spawn("true", "").await.expect("an agent on 1");
    assert_ne!(runs_on_1.runner_id, owner, "replica 1 is not the owner");
    replicas.balancer.pin(None);
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_that_holds_its_lease_but_does_not_answer_makes_the_kill_unavailable() {
    let (replicas, _store, key) = start(2, &[Scope::Agents]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    let agent = on_0.spawn("sh", "sleep 600").await.expect("spawn");
    let mut on_1 = Agents::new(replicas.channel(1).await, key.clone());
    let status = on_1
        .kill(&agent.agent_id, "bad\u{1b}[2J")
        .await
        .expect_err("a reason with control characters");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Paused: its lease (5 s) still runs, but it answers nothing.
    replicas.signal(0, rustix::process::Signal::STOP);
    let status = on_1
        .kill(&agent.agent_id, "now")
        .await
        .expect_err("the owner cannot answer");
    replicas.signal(0, rustix::process::Signal::CONT);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&agent.runner_id)
            && status.message().contains(replicas.address(0)),
        "the error names the replica: {status:?}"
    );
    assert!(
        process_is_alive(agent.pid.expect("a pid")),
        "nothing was killed"
    );

    // Once it answers again, the same kill goes through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match on_1.kill(&agent.agent_id, "now").await {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("kill refused: {status:?}"),
        }
    }
    on_1.wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
        .await;
    // Bad input is refused the same way on either replica, and changes
    // nothing.
    for agents in [&mut on_0, &mut on_1] {
        let status = agents
            .kill("no-such-agent", "")
            .await
            .expect_err("unknown agent");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_instances_own_key_may_call_a_replica() {
    let (replicas, _store, key) = start(1, &[Scope::Agents]).await;
    let mut agents = Agents::new(replicas.channel(0).await, key);
    let agent = agents.spawn("sh", "sleep 600").await.expect("spawn");
    let kill = || mosaic_mesh::proto::replica::KillAgentRequest {
        agent_id: agent.agent_id.clone(),
        reason: "a stranger says so".to_owned(),
    };
    let url = format!("https://{}", replicas.address(0));

    // Without a client certificate.
    let status = ReplicaClient::new(replicas.channel(0).await)
        .kill_agent(kill())
        .await
        .expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // With the certificate of another key (a peer's, or a stranger's).
    let stranger = TestPeer::new("stranger").await;
    let channel = stranger
        .channel_to_url(&url, &replicas.certificate_pem(0))
        .await;
    let status = ReplicaClient::new(channel.clone())
        .kill_agent(kill())
        .await
        .expect_err("another key");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = ReplicaClient::new(channel)
        .watch_agent(mosaic_mesh::proto::replica::WatchAgentRequest {
            agent_id: agent.agent_id.clone(),
            include_output: true,
            from_sequence: None,
        })
        .await
        .expect_err("another key");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let still = agents.get(&agent.agent_id).await.expect("get");
    assert_eq!(still.state, agent_pb::AgentState::Running as i32);
    assert!(process_is_alive(agent.pid.expect("a pid")));
    agents.kill(&agent.agent_id, "done").await.expect("kill");
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_watch_on_one_replica_sees_changes_made_through_another_at_once() {
    use coordinator_pb::coordinator_client::CoordinatorClient;
    let (replicas, _store, key) = start(2, &[Scope::Coordinator]).await;
    let mut writer = CoordinatorClient::new(replicas.channel(0).await);
    let job = writer
        .create_job(with_key(
            coordinator_pb::CreateJobRequest {
                job_type: "watched".to_owned(),
                ..coordinator_pb::CreateJobRequest::default()
            },
            &key,
        ))
        .await
        .expect("CreateJob")
        .into_inner()
        .job
        .expect("a job");
    let mut stream = CoordinatorClient::new(replicas.channel(1).await)
        .watch_job(with_key(
            coordinator_pb::WatchJobRequest {
                job_id: job.job_id.clone(),
            },
            &key,
        ))
        .await
        .expect("WatchJob on the other replica")
        .into_inner();
    stream.next().await.expect("the first message").expect("ok");
    writer
        .update_job_status(with_key(
            coordinator_pb::UpdateJobStatusRequest {
                job_id: job.job_id.clone(),
                state: coordinator_pb::JobState::Running as i32,
                message: String::new(),
            },
            &key,
        ))
        .await
        .expect("start the job");
    stream.next().await.expect("RUNNING").expect("ok");

    // Each change made through replica 0 is seen on replica 1: without a
    // word between them, only when its watch reads again (every 2 s).
    let mut delays = Vec::new();
    for progress in 1..=10 {
        writer
            .update_job_progress(with_key(
                coordinator_pb::UpdateJobProgressRequest {
                    job_id: job.job_id.clone(),
                    progress: progress * 10,
                    message: String::new(),
                },
                &key,
            ))
            .await
            .expect("UpdateJobProgress");
        let written = std::time::Instant::now();
        let seen = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the change is seen")
            .expect("a message")
            .expect("ok");
        delays.push(written.elapsed());
        assert_eq!(seen.job.expect("job").progress, progress * 10);
    }
    delays.sort();
    assert!(
        delays[delays.len() / 2] < Duration::from_millis(500),
        "changes reached the other replica's watch late: {delays:?}"
    );
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_events_and_output_are_read_through_any_replica_while_its_own_serves() {
    let (mut replicas, _store, key) = start(2, &[Scope::Agents]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    let mut on_1 = Agents::new(replicas.channel(1).await, key.clone());
    let agent = on_0
        .spawn(
            "sh",
            "i=1; while [ $i -le 50 ]; do echo line-$i; sleep 0.01; i=$((i+1)); done",
        )
        .await
        .expect("spawn");
    let expected: Vec<String> = (1..=50).map(|line| format!("line-{line}")).collect();
    let watch_from_start = |client: &mut Agents, from_sequence| {
        let request = with_key(
            agent_pb::WatchAgentRequest {
                agent_id: agent.agent_id.clone(),
                include_output: true,
                from_sequence,
            },
            &client.key,
        );
        let mut client = client.client.clone();
        async move { client.watch_agent(request).await }
    };
    let read_all = |client: &mut Agents| {
        let request = with_key(
            agent_pb::ReadAgentOutputRequest {
                agent_id: agent.agent_id.clone(),
                offset: 0,
                max_bytes: 0,
            },
            &client.key,
        );
        let mut client = client.client.clone();
        async move { client.read_agent_output(request).await }
    };
    // While it runs, through the other replica: from the start, then live.
    let stream = watch_from_start(&mut on_1, Some(1))
        .await
        .expect("watch from 1 on the other replica")
        .into_inner();
    let messages: Vec<agent_pb::WatchAgentResponse> = tokio::time::timeout(
        Duration::from_secs(30),
        stream
            .map(|message| message.expect("a watch message"))
            .collect(),
    )
    .await
    .expect("the watch ends with the agent");
    let sequences: Vec<u64> = messages.iter().map(|message| message.sequence).collect();
    assert_eq!(sequences, (1..=53).collect::<Vec<u64>>());
    let lines: Vec<String> = messages
        .iter()
        .filter_map(|message| match &message.event {
            Some(agent_pb::watch_agent_response::Event::OutputLine(line)) => {
                Some(line.line.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(lines, expected);
    // Ended: its output, through the other replica, from the owner's disk.
    let output = read_all(&mut on_1)
        .await
        .expect("ReadAgentOutput on the other replica")
        .into_inner();
    assert!(output.end);
    let text = String::from_utf8(output.data).expect("text");
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);

    // The replica that ran it stops for good: its files are out of reach.
    replicas.terminate(0).await;
    let gone = read_all(&mut on_1).await.expect_err("output out of reach");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("no longer serves"), "{gone:?}");
    let gone = watch_from_start(&mut on_1, Some(1))
        .await
        .expect_err("events out of reach");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // The record still answers, and a watch from now gives it, numbered 0.
    let record = on_1.get(&agent.agent_id).await.expect("GetAgent");
    assert_eq!(record.state, agent_pb::AgentState::Completed as i32);
    let now: Vec<agent_pb::WatchAgentResponse> = watch_from_start(&mut on_1, None)
        .await
        .expect("watch now")
        .into_inner()
        .map(|message| message.expect("a watch message"))
        .collect()
        .await;
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].sequence, 0);
    replicas.cleanup().await;
}
