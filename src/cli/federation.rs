//! `mosaicd federation log`: the audit log of signed commands sent to and
//! received from peers (Federation.ListCommandLog, API key with the `admin`
//! scope), as a table for people or JSON.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::client::ClientArgs;
use super::exit::{CliError, Output, list_json};
use super::serve::load_config;
use super::times::time_text;
use crate::clock::ms_from_timestamp;
use crate::config::ConfigArgs;
use crate::proto::federation as pb;
use crate::text::escape_field as field;

/// `mosaicd federation ...`
#[derive(Debug, clap::Subcommand)]
pub enum FederationCommand {
    /// List signed commands sent to and received from peers, newest first,
    /// with their outcomes.
    Log {
        /// Only commands exchanged with this peer: its instance id, or its name
        /// when no other peer has it (exit code 3 when no peer and no logged
        /// command has that id or name).
        #[arg(long, value_name = "INSTANCE")]
        peer: Option<String>,
        /// Only commands in this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// Only commands received (in) or sent (out).
        #[arg(long, value_enum)]
        direction: Option<Direction>,
        /// At most this many [default: the server's page size].
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Continue from a previous page (`next_page_token` in --json output).
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

/// Which commands `federation log --direction` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Received from peers.
    In,
    /// Sent to peers.
    Out,
}

/// Runs a `federation` subcommand.
pub async fn run(
    command: FederationCommand,
    config_args: &ConfigArgs,
    client_args: &ClientArgs,
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(config_args)?;
    let connection = super::client::connect(&config, client_args).await?;
    let mut client = pb::federation_client::FederationClient::new(connection.channel.clone());
    let FederationCommand::Log {
        peer,
        workspace,
        direction,
        limit,
        page_token,
    } = command;
    // The peers' names, for the table and to accept --peer NAME.
    let connections = super::peer::list_all(
        &mut client,
        &connection,
        None,
        pb::ConnectionState::Unspecified,
    )
    .await?;
    let names: HashMap<String, String> = connections
        .iter()
        .map(|known| (known.remote_instance_id.clone(), known.remote_name.clone()))
        .collect();
    let peer_instance_id = match &peer {
        Some(peer) => instance_id_of(&names, peer)?,
        None => String::new(),
    };
    let first_page = page_token.is_empty();
    let known_peer = names.contains_key(&peer_instance_id);
    let response = client
        .list_command_log(
            connection.request(pb::ListCommandLogRequest {
                peer_instance_id,
                workspace: workspace.unwrap_or_default(),
                direction: match direction {
                    None => pb::CommandDirection::Unspecified,
                    Some(Direction::In) => pb::CommandDirection::Inbound,
                    Some(Direction::Out) => pb::CommandDirection::Outbound,
                }
                .into(),
                page_size: limit,
                page_token,
            })?,
        )
        .await
        .map_err(|status| connection.error(&status))?
        .into_inner();
    // An instance that is no peer may still be in the log (a connection since
    // deleted, a refused sender); one that is in neither is a typo.
    if let Some(peer) = peer
        && first_page
        && response.entries.is_empty()
        && !known_peer
    {
        return Err(CliError::not_found(format!(
            "no peer {peer:?}: this instance has no connection with an instance of that id or name, and logged no command exchanged with one — `mosaicd peer list` shows the peers"
        )));
    }
    let value = list_json(
        "entries",
        response.entries.iter().map(entry_json).collect(),
        &response.next_page_token,
    );
    output.print(&value, || log_table(&response, &names));
    Ok(())
}

/// `peer` as an instance id: itself when it is a known instance id or no
/// peer's name (commands from instances without a connection are logged too),
/// else the one instance with that name.
fn instance_id_of(names: &HashMap<String, String>, peer: &str) -> Result<String, CliError> {
    if names.contains_key(peer) {
        return Ok(peer.to_owned());
    }
    let mut named: Vec<&String> = names
        .iter()
        .filter(|(_, name)| name.as_str() == peer)
        .map(|(instance_id, _)| instance_id)
        .collect();
    named.sort();
    match named.as_slice() {
        [] => Ok(peer.to_owned()),
        [instance_id] => Ok((*instance_id).clone()),
        several => Err(CliError::usage(format!(
            "several peers are named {peer:?} ({}); pass --peer with the instance id",
            several
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn direction_name(direction: pb::CommandDirection) -> &'static str {
    match direction {
        pb::CommandDirection::Inbound => "in",
        pb::CommandDirection::Outbound => "out",
        pb::CommandDirection::Unspecified => "unspecified",
    }
}

/// The other instance of an entry: the sender of what came in, the recipient
/// of what went out.
fn peer_of(entry: &pb::CommandLogEntry) -> &str {
    match entry.direction() {
        pb::CommandDirection::Inbound => &entry.sender_instance_id,
        _ => &entry.recipient_instance_id,
    }
}

fn entry_json(entry: &pb::CommandLogEntry) -> Value {
    json!({
        "message_id": entry.message_id,
        "direction": direction_name(entry.direction()),
        "peer_instance_id": peer_of(entry),
        "sender_instance_id": entry.sender_instance_id,
        "recipient_instance_id": entry.recipient_instance_id,
        "workspace": entry.workspace,
        "command_type": entry.command_type,
        "outcome": entry.outcome,
        "detail": entry.detail,
        "issued_at_ms": entry.issued_at.as_ref().map(ms_from_timestamp),
        "recorded_at_ms": entry.recorded_at.as_ref().map(ms_from_timestamp),
    })
}

fn log_table(response: &pb::ListCommandLogResponse, names: &HashMap<String, String>) -> String {
    if response.entries.is_empty() {
        return "no commands recorded".to_owned();
    }
    let mut text = format!(
        "{:<20}  {:<3}  {:<24}  {:<16}  {:<12}  {:<18}  {}",
        "TIME", "DIR", "PEER", "WORKSPACE", "TYPE", "OUTCOME", "DETAIL"
    );
    for entry in &response.entries {
        let peer = peer_of(entry);
        let peer = names
            .get(peer)
            .filter(|name| !name.is_empty())
            .map_or(peer, String::as_str);
        text.push_str(&format!(
            "\n{:<20}  {:<3}  {:<24}  {:<16}  {:<12}  {:<18}  {}",
            time_text(entry.recorded_at.as_ref()),
            direction_name(entry.direction()),
            field(peer),
            field(&entry.workspace),
            if entry.command_type.is_empty() {
                "-".into()
            } else {
                field(&entry.command_type)
            },
            if entry.outcome.is_empty() {
                "(awaiting reply)".into()
            } else {
                field(&entry.outcome)
            },
            field(&entry.detail)
        ));
    }
    if !response.next_page_token.is_empty() {
        text.push_str(&format!(
            "\n(more: --page-token {})",
            response.next_page_token
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_filter_takes_an_id_a_unique_name_or_an_unknown_id() {
        let names: HashMap<String, String> = [
            ("id-b".to_owned(), "bravo".to_owned()),
            ("id-c".to_owned(), "twin".to_owned()),
            ("id-d".to_owned(), "twin".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(instance_id_of(&names, "id-b").expect("id"), "id-b");
        assert_eq!(instance_id_of(&names, "bravo").expect("name"), "id-b");
        assert_eq!(instance_id_of(&names, "gone").expect("unknown"), "gone");
        let error = instance_id_of(&names, "twin").expect_err("ambiguous");
        assert_eq!(error.code, 2);
        assert!(error.message.contains("id-c, id-d"), "{}", error.message);
    }

    #[test]
    fn the_table_names_the_other_instance_and_a_pending_outcome() {
        let entry = pb::CommandLogEntry {
            message_id: "m1".to_owned(),
            direction: pb::CommandDirection::Outbound.into(),
            sender_instance_id: "id-a".to_owned(),
            recipient_instance_id: "id-b".to_owned(),
            workspace: "ws".to_owned(),
            command_type: "agent.spawn".to_owned(),
            recorded_at: Some(crate::clock::timestamp_from_ms(0)),
            ..pb::CommandLogEntry::default()
        };
        let names: HashMap<String, String> = [("id-b".to_owned(), "bravo".to_owned())]
            .into_iter()
            .collect();
        let table = log_table(
            &pb::ListCommandLogResponse {
                entries: vec![entry],
                next_page_token: String::new(),
            },
            &names,
        );
        let row = table.lines().nth(1).expect("a row");
        assert!(row.starts_with("1970-01-01T00:00:00Z  out  bravo"), "{row}");
        assert!(
            row.contains("agent.spawn") && row.contains("(awaiting reply)"),
            "{row}"
        );
    }

    #[test]
    fn a_peers_detail_stays_on_its_row() {
        let entry = pb::CommandLogEntry {
            message_id: "m1".to_owned(),
            direction: pb::CommandDirection::Inbound.into(),
            sender_instance_id: "id-b".to_owned(),
            recipient_instance_id: "id-a".to_owned(),
            workspace: "ws".to_owned(),
            command_type: "agent.spawn".to_owned(),
            outcome: "INVALID_ARGUMENT".to_owned(),
            detail: "no\n1970-01-01T00:00:00Z  in   bravo  ws  agent.kill  ok\t\u{1b}[2J"
                .to_owned(),
            recorded_at: Some(crate::clock::timestamp_from_ms(0)),
            ..pb::CommandLogEntry::default()
        };
        let table = log_table(
            &pb::ListCommandLogResponse {
                entries: vec![entry],
                next_page_token: String::new(),
            },
            &HashMap::new(),
        );
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(
            table.ends_with(
                "no\\n1970-01-01T00:00:00Z  in   bravo  ws  agent.kill  ok\\t\\u{1b}[2J"
            ),
            "{table}"
        );
    }
}
