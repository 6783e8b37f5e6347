//! The registry of replicas (DESIGN.md section 11): every replica registers
//! itself with a lease it renews by a heartbeat; `mosaicd replicas` lists
//! them with their state and the agents each supervises; a clean stop ends
//! the lease at once, a killed replica's lease runs out.

use std::time::{Duration, Instant};

use mosaic_mesh::auth::Scope;
use mosaic_mesh::store::Store;

use crate::support::agents::Agents;
use crate::support::replicas::Replicas;

/// `count` replicas with the test agent types and a lease of 3 s, a store
/// on their database and an API key with `scopes`.
async fn start(count: usize, scopes: &[Scope]) -> (Replicas, Store, String) {
    Replicas::with_agents(count, 3, "", scopes).await
}

/// `mosaicd replicas --json` run as replica `index`'s operator.
fn listed(replicas: &Replicas, index: usize) -> Vec<serde_json::Value> {
    let output = replicas
        .command(index)
        .args(["replicas", "--json"])
        .output()
        .expect("run mosaicd replicas");
    assert!(
        output.status.success(),
        "mosaicd replicas failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(listed["next_page_token"], "", "{listed}");
    listed["replicas"]
        .as_array()
        .expect("a replicas array")
        .clone()
}

/// The entry of the replica at `address`.
fn entry<'a>(listed: &'a [serde_json::Value], address: &str) -> &'a serde_json::Value {
    listed
        .iter()
        .find(|replica| replica["address"] == format!("https://{address}"))
        .unwrap_or_else(|| panic!("no replica at {address} in {listed:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_register_and_are_listed_with_their_state_and_agents() {
    let (mut replicas, store, key) = start(3, &[Scope::Agents]).await;
    let mut agents = Agents::new(replicas.channel(0).await, key);
    for _ in 0..2 {
        agents.spawn("sh", "sleep 600").await.expect("spawn");
    }

    let all = listed(&replicas, 1);
    assert_eq!(all.len(), 3, "{all:?}");
    let addresses: Vec<String> = (0..3)
        .map(|index| replicas.address(index).to_owned())
        .collect();
    for (index, address) in addresses.iter().enumerate() {
        let replica = entry(&all, address);
        assert_eq!(replica["state"], "SERVING", "{replica}");
        let expected_agents = if index == 0 { 2 } else { 0 };
        assert_eq!(replica["agents"], expected_agents, "{replica}");
    }

    // A clean stop ends the lease at once; a killed replica's lease runs out
    // after its last heartbeat (3 s), and another replica takes it over (it
    // shows lost); the others keep beating.
    replicas.terminate(1).await;
    replicas.kill(2).await;
    let all = listed(&replicas, 0);
    assert_eq!(entry(&all, &addresses[1])["state"], "STOPPED");
    assert_eq!(entry(&all, &addresses[2])["state"], "SERVING");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = listed(&replicas, 0);
        if entry(&all, &addresses[2])["state"] == "LOST" {
            assert_eq!(entry(&all, &addresses[0])["state"], "SERVING", "{all:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed replica's lease never ran out: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for agent in agents.list(Default::default()).await.expect("list").agents {
        agents
            .kill(&agent.agent_id, "the test is over")
            .await
            .expect("kill");
    }
    drop(store);
    replicas.cleanup().await;
}

/// The agents' (state, reason, end) as replica 1 shows them.
async fn records(agents: &mut Agents, ids: &[String]) -> Vec<(i32, String, Option<i64>)> {
    let mut shown = Vec::new();
    for id in ids {
        let agent = agents.get(id).await.expect("GetAgent");
        shown.push((
            agent.state,
            agent.state_reason,
            agent
                .ended_at
                .map(|at| at.seconds * 1000 + i64::from(at.nanos / 1_000_000)),
        ));
    }
    shown
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replicas_agents_are_settled_by_another_and_its_restart_changes_nothing() {
    use mosaic_mesh::proto::agent as agent_pb;
    use mosaic_mesh::proto::coordinator as coordinator_pb;

    let (mut replicas, store, key) = start(2, &[Scope::Agents, Scope::Webhook]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    let mut on_1 = Agents::new(replicas.channel(1).await, key.clone());
    // Ten agents supervised by replica 0: eight spawned, two for jobs.
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(on_0.spawn("sh", "sleep 600").await.expect("spawn").agent_id);
    }
    let mut job_ids = Vec::new();
    let mut coordinator =
        coordinator_pb::coordinator_client::CoordinatorClient::new(replicas.channel(0).await);
    for _ in 0..2 {
        let dispatched = coordinator
            .dispatch_job(crate::support::daemon::with_key(
                coordinator_pb::DispatchJobRequest {
                    job_type: "work".to_owned(),
                    agent_type: "sh".to_owned(),
                    prompt: "sleep 600".to_owned(),
                    ..Default::default()
                },
                &key,
            ))
            .await
            .expect("DispatchJob")
            .into_inner();
        ids.push(dispatched.agent_id);
        job_ids.push(dispatched.job.expect("a job").job_id);
    }
    let mut pids = Vec::new();
    for id in &ids {
        let running = on_0.wait_for_state(id, agent_pb::AgentState::Running).await;
        pids.push(running.pid.expect("a running agent has a pid"));
    }

    // Killed: within its lease (3 s) and a heartbeat round, replica 1
    // settles all ten, and their jobs end with them.
    replicas.kill(0).await;
    let killed_at = Instant::now();
    let failed = agent_pb::AgentState::Failed as i32;
    loop {
        let shown = records(&mut on_1, &ids).await;
        if shown.iter().all(|(state, _, _)| *state == failed) {
            for (_, reason, ended_at) in &shown {
                assert!(reason.starts_with("runner lost"), "{reason}");
                assert!(ended_at.is_some());
            }
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "not settled 15 s after the kill: {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for job_id in &job_ids {
        let job = store
            .find_job(job_id)
            .await
            .expect("find")
            .expect("the job");
        assert_eq!(job.state.as_str(), "FAILED", "{job:?}");
        assert!(job.error.contains("runner lost"), "{}", job.error);
    }
    let settled = records(&mut on_1, &ids).await;

    // Restarted on its data dir: it changes none of those records, and the
    // processes it left behind are stopped.
    replicas.restart(0).await;
    for pid in pids {
        crate::support::agents::wait_until_dead(pid).await;
    }
    assert_eq!(records(&mut on_1, &ids).await, settled);
    let all = listed(&replicas, 1);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(entry(&all, replicas.address(0))["state"], "SERVING");

    drop(store);
    replicas.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_comes_back_after_it_was_taken_over_stops_and_writes_nothing() {
    use mosaic_mesh::proto::agent as agent_pb;
    use rustix::process::Signal;

    let (mut replicas, store, key) = start(2, &[Scope::Agents]).await;
    let mut on_0 = Agents::new(replicas.channel(0).await, key.clone());
    let mut on_1 = Agents::new(replicas.channel(1).await, key);
    let mut ids = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let id = on_0.spawn("sh", "sleep 600").await.expect("spawn").agent_id;
        let running = on_0
            .wait_for_state(&id, agent_pb::AgentState::Running)
            .await;
        pids.push(running.pid.expect("a pid"));
        ids.push(id);
    }

    // Paused past its lease (a stopped VM, a long GC pause): replica 1 takes
    // it over and settles its agents.
    replicas.signal(0, Signal::STOP);
    let paused_at = Instant::now();
    let failed = agent_pb::AgentState::Failed as i32;
    let settled = loop {
        let shown = records(&mut on_1, &ids).await;
        if shown.iter().all(|(state, _, _)| *state == failed) {
            break shown;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(15),
            "not settled 15 s into the pause: {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Back: its heartbeat is refused, so it stops its agents' processes,
    // writes nothing over the settlement and exits 1 to be restarted.
    replicas.signal(0, Signal::CONT);
    let status = replicas.exited(0, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(1), "{status}");
    for pid in pids {
        crate::support::agents::wait_until_dead(pid).await;
    }
    assert_eq!(records(&mut on_1, &ids).await, settled);

    drop(store);
    replicas.cleanup().await;
}
