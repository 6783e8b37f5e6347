//! The registry of replicas (DESIGN.md section 11): every replica registers
//! itself with a lease it renews by a heartbeat; `mosaicd replicas` lists
//! them with their state and the agents each supervises; a clean stop ends
//! the lease at once, a killed replica's lease runs out.

use std::time::{Duration, Instant};

use mosaic_mesh::auth::Scope;
use mosaic_mesh::store::Store;

use crate::support::agents::{AGENT_TYPES_TOML, Agents};
use crate::support::replicas::Replicas;

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
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("a JSON array")
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
    let mut replicas = Replicas::start(
        3,
        &format!("[replicas]\nlease_secs = 3\n{AGENT_TYPES_TOML}"),
    )
    .await;
    let store = Store::connect(&replicas.database.url)
        .await
        .expect("connect");
    let key = mosaic_mesh::auth::create_api_key(&store, "agents", &[Scope::Agents])
        .await
        .expect("create an API key")
        .secret
        .to_string();
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
        assert_eq!(replica["state"], "serving", "{replica}");
        let expected_agents = if index == 0 { 2 } else { 0 };
        assert_eq!(replica["agents"], expected_agents, "{replica}");
    }

    // A clean stop ends the lease at once; a killed replica's lease runs out
    // after its last heartbeat (3 s), and the others keep beating.
    replicas.terminate(1).await;
    replicas.kill(2).await;
    let all = listed(&replicas, 0);
    assert_eq!(entry(&all, &addresses[1])["state"], "stopped");
    assert_eq!(entry(&all, &addresses[2])["state"], "serving");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = listed(&replicas, 0);
        if entry(&all, &addresses[2])["state"] == "expired" {
            assert_eq!(entry(&all, &addresses[0])["state"], "serving", "{all:?}");
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
