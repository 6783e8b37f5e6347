//! `mosaicd replicas`, offline on the database: the replicas of this
//! instance, their state (upper case, like every state the CLI prints) and
//! how many agents each supervises.

use serde_json::json;

use super::exit::{CliError, Output, list_json};
use super::serve::{load_config, open_existing_store};
use crate::config::ConfigArgs;

/// `replicas`.
pub async fn list(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    let store = open_existing_store(&config).await?;
    let replicas = store
        .list_replicas()
        .await
        .map_err(|error| CliError::from(anyhow::Error::new(error)))?;
    let now_ms = crate::clock::now_ms();
    let value = list_json(
        "replicas",
        replicas
            .iter()
            .map(|(replica, agents)| {
                json!({
                    "runner_id": replica.runner_id,
                    "address": replica.address,
                    "state": replica.state_at(now_ms).to_ascii_uppercase(),
                    "epoch": replica.epoch,
                    "version": replica.version,
                    "agents": agents,
                    "started_at_ms": replica.started_at_ms,
                    "heartbeat_at_ms": replica.heartbeat_at_ms,
                    "expires_at_ms": replica.expires_at_ms,
                })
            })
            .collect(),
        "",
    );
    output.print(&value, || {
        let mut text = format!(
            "{:<36}  {:<8}  {:>6}  {:>14}  {}",
            "RUNNER", "STATE", "AGENTS", "LAST HEARTBEAT", "ADDRESS"
        );
        for (replica, agents) in &replicas {
            let age = now_ms.saturating_sub(replica.heartbeat_at_ms).max(0) / 1000;
            text.push_str(&format!(
                "\n{:<36}  {:<8}  {:>6}  {:>14}  {}",
                replica.runner_id,
                replica.state_at(now_ms).to_ascii_uppercase(),
                agents,
                format!("{age} s ago"),
                replica.address
            ));
        }
        text
    });
    Ok(())
}
