//! `mosaicd peer connect | list | show | accept | reject | suspend | resume |
//! disconnect`: federation connections, through the running daemon's admin API.

use serde_json::{Value, json};

use super::client::{ClientArgs, Connection};
use super::exit::{CliError, Output, list_json};
use super::serve::load_config;
use crate::clock::ms_from_timestamp;
use crate::config::ConfigArgs;
use crate::proto::federation as pb;
use crate::text::escape_field as field;

/// The workspace for `peer connect` and `peer list`.
pub const ENV_WORKSPACE: &str = "MOSAIC_WORKSPACE";

/// `mosaicd peer ...`
#[derive(Debug, clap::Subcommand)]
pub enum PeerCommand {
    /// Ask the instance at URL to connect in a workspace (it stays PENDING until
    /// its operator accepts).
    Connect {
        /// The peer's URL, e.g. https://b.example:7443.
        url: String,
        /// The workspace to connect in.
        #[arg(long, env = ENV_WORKSPACE)]
        workspace: String,
        /// The peer's fingerprint, from its operator (`mosaicd identity show`);
        /// the connection is refused if it differs. Without it, the first key
        /// seen is trusted.
        #[arg(long, value_name = "FINGERPRINT")]
        fingerprint: Option<String>,
        /// Capabilities granted to the peer once ACTIVE, comma separated
        /// (e.g. agent.status) [default: none].
        #[arg(long = "grant", value_delimiter = ',', value_name = "CAPABILITY")]
        grants: Vec<String>,
        /// Capabilities to ask the peer for, comma separated [default: all it
        /// advertises].
        #[arg(long = "request", value_delimiter = ',', value_name = "CAPABILITY")]
        requests: Vec<String>,
    },
    /// List connections, newest first.
    List {
        /// Only this workspace.
        #[arg(long, env = ENV_WORKSPACE)]
        workspace: Option<String>,
        /// Only this state: PENDING, ACTIVE, SUSPENDED, DISCONNECTED or REJECTED
        /// (any case).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one connection and its history.
    Show {
        /// The connection id (from `peer list`).
        id: String,
    },
    /// Accept an inbound pending connection (check its fingerprint with the
    /// peer's operator first).
    Accept {
        /// The connection id.
        id: String,
        /// Capabilities granted to the peer, comma separated (e.g.
        /// agent.spawn,agent.status,agent.kill) [default: none].
        #[arg(long = "grant", value_delimiter = ',', value_name = "CAPABILITY")]
        grants: Vec<String>,
        /// Accept although the peer's instance id is already bound to a
        /// different key (`peer list` warns): only after checking the new
        /// fingerprint with the peer's operator.
        #[arg(long)]
        new_key: bool,
    },
    /// Reject an inbound pending connection.
    Reject {
        /// The connection id.
        id: String,
        /// Why; sent to the peer.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Suspend an active connection.
    Suspend {
        /// The connection id.
        id: String,
        /// Why; sent to the peer.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a connection this instance suspended.
    Resume {
        /// The connection id.
        id: String,
    },
    /// End a connection for good.
    Disconnect {
        /// The connection id.
        id: String,
        /// Why; sent to the peer.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Runs a `peer` subcommand.
pub async fn run(
    command: PeerCommand,
    args: &ConfigArgs,
    client_args: &ClientArgs,
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(args)?;
    let connection = super::client::connect(&config, client_args).await?;
    let mut client = pb::federation_client::FederationClient::new(connection.channel.clone());
    let call_error = |status: tonic::Status| connection.error(&status);
    match command {
        PeerCommand::Connect {
            url,
            workspace,
            fingerprint,
            grants,
            requests,
        } => {
            let response = client
                .connect_peer(connection.request(pb::ConnectPeerRequest {
                    url,
                    workspace,
                    expected_fingerprint: fingerprint.unwrap_or_default(),
                    granted_capabilities: grants,
                    requested_capabilities: requests,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
        PeerCommand::List { workspace, state } => {
            let state = match state.as_deref() {
                None => pb::ConnectionState::Unspecified,
                Some(text) => {
                    crate::federation::state::ConnectionState::parse(&text.to_ascii_lowercase())
                        .map(crate::federation::state::ConnectionState::to_proto)
                        .ok_or_else(|| {
                            CliError::usage(format!(
                                "--state {text:?}: expected PENDING, ACTIVE, SUSPENDED, DISCONNECTED or REJECTED"
                            ))
                        })?
                }
            };
            let connections = list_all(&mut client, &connection, workspace, state).await?;
            output.print(
                &list_json(
                    "connections",
                    connections.iter().map(connection_json).collect(),
                    "",
                ),
                || connection_table(&connections),
            );
        }
        PeerCommand::Show { id } => {
            let response = client
                .get_connection(connection.request(pb::GetConnectionRequest { connection_id: id })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &response.events);
        }
        PeerCommand::Accept {
            id,
            grants,
            new_key,
        } => {
            let response = client
                .accept_connection(connection.request(pb::AcceptConnectionRequest {
                    connection_id: id,
                    granted_capabilities: grants,
                    accept_new_key_for_known_instance: new_key,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
        PeerCommand::Reject { id, reason } => {
            let response = client
                .reject_connection(connection.request(pb::RejectConnectionRequest {
                    connection_id: id,
                    reason,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
        PeerCommand::Suspend { id, reason } => {
            let response = client
                .suspend_connection(connection.request(pb::SuspendConnectionRequest {
                    connection_id: id,
                    reason,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
        PeerCommand::Resume { id } => {
            let response = client
                .resume_connection(
                    connection.request(pb::ResumeConnectionRequest { connection_id: id })?,
                )
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
        PeerCommand::Disconnect { id, reason } => {
            let response = client
                .disconnect_connection(connection.request(pb::DisconnectConnectionRequest {
                    connection_id: id,
                    reason,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_connection(output, response.connection, &[]);
        }
    }
    Ok(())
}

/// Every page of ListConnections.
pub(super) async fn list_all(
    client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    connection: &Connection,
    workspace: Option<String>,
    state: pb::ConnectionState,
) -> Result<Vec<pb::Connection>, CliError> {
    let mut connections = Vec::new();
    let mut page_token = String::new();
    loop {
        let response = client
            .list_connections(connection.request(pb::ListConnectionsRequest {
                workspace: workspace.clone().unwrap_or_default(),
                state: state.into(),
                page_size: 0,
                page_token,
            })?)
            .await
            .map_err(|status| connection.error(&status))?
            .into_inner();
        connections.extend(response.connections);
        if response.next_page_token.is_empty() {
            return Ok(connections);
        }
        page_token = response.next_page_token;
    }
}

/// The state as the proto names it, without its prefix (`ACTIVE`): upper
/// case like the agent and job states the CLI prints, in JSON and text alike.
fn state_name(state: pb::ConnectionState) -> &'static str {
    state.as_str_name().trim_start_matches("CONNECTION_STATE_")
}

fn direction_name(direction: pb::ConnectionDirection) -> &'static str {
    match direction {
        pb::ConnectionDirection::Inbound => "inbound",
        pb::ConnectionDirection::Outbound => "outbound",
        pb::ConnectionDirection::Unspecified => "unspecified",
    }
}

fn connection_json(connection: &pb::Connection) -> Value {
    json!({
        "connection_id": connection.connection_id,
        "workspace": connection.workspace,
        "remote_instance_id": connection.remote_instance_id,
        "remote_name": connection.remote_name,
        "remote_url": connection.remote_url,
        "remote_fingerprint": connection.remote_fingerprint,
        "remote_capabilities": connection.remote_capabilities,
        "granted_capabilities": connection.granted_capabilities,
        "capabilities_granted_to_us": connection.capabilities_granted_to_us,
        "requested_capabilities": connection.requested_capabilities,
        "direction": direction_name(connection.direction()),
        "state": state_name(connection.state()),
        "state_reason": connection.state_reason,
        "reachable": connection.reachable,
        "last_contact_at_ms": connection.last_contact_at.as_ref().map(ms_from_timestamp),
        "pending_notices": connection.pending_notices,
        "created_at_ms": connection.created_at.as_ref().map(ms_from_timestamp),
        "updated_at_ms": connection.updated_at.as_ref().map(ms_from_timestamp),
    })
}

fn print_connection(
    output: Output,
    connection: Option<pb::Connection>,
    events: &[pb::ConnectionEvent],
) {
    let connection = connection.unwrap_or_default();
    let mut value = connection_json(&connection);
    let history: Vec<Value> = events
        .iter()
        .map(|event| {
            json!({
                "from_state": state_name(event.from_state()),
                "to_state": state_name(event.to_state()),
                "actor": event.actor,
                "reason": event.reason,
                "at_ms": event.at.as_ref().map(ms_from_timestamp),
            })
        })
        .collect();
    if !events.is_empty()
        && let Some(object) = value.as_object_mut()
    {
        object.insert("events".to_owned(), Value::Array(history));
    }
    output.print(&value, || {
        let mut text = format!(
            "connection:   {}\nworkspace:    {}\npeer:         {} ({})\nurl:          {}\nfingerprint:  {}\ndirection:    {}\nstate:        {}{}\nreachable:    {} (last contact {})\ngranted:      {}\ngranted to us: {}\npending notices: {}",
            field(&connection.connection_id),
            field(&connection.workspace),
            field(&connection.remote_name),
            field(&connection.remote_instance_id),
            field(&connection.remote_url),
            field(&connection.remote_fingerprint),
            direction_name(connection.direction()),
            state_name(connection.state()),
            if connection.state_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", field(&connection.state_reason))
            },
            connection.reachable,
            connection.last_contact_at.as_ref().map_or_else(
                || "never".to_owned(),
                |at| super::times::time_text(Some(at))
            ),
            field(&connection.granted_capabilities.join(", ")),
            field(&connection.capabilities_granted_to_us.join(", ")),
            connection.pending_notices,
        );
        for event in events {
            text.push_str(&format!(
                "\n  {} -> {} by {} at {}{}",
                state_name(event.from_state()),
                state_name(event.to_state()),
                field(&event.actor),
                super::times::time_text(event.at.as_ref()),
                if event.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", field(&event.reason))
                }
            ));
        }
        text
    });
}

fn connection_table(connections: &[pb::Connection]) -> String {
    if connections.is_empty() {
        return "no connections".to_owned();
    }
    let now = crate::clock::now_ms();
    // The fingerprint, not the name, tells one peer from another that
    // claims its name or id.
    let mut text = format!(
        "{:<36}  {:<16}  {:<24}  {:<8}  {:<12}  {:<9}  {:<12}  {:<7}  {}",
        "CONNECTION",
        "WORKSPACE",
        "PEER",
        "DIR",
        "STATE",
        "REACHABLE",
        "LAST CONTACT",
        "PENDING",
        "FINGERPRINT"
    );
    for connection in connections {
        let last_contact = connection.last_contact_at.as_ref().map_or_else(
            || "never".to_owned(),
            |at| format!("{}s ago", (now - ms_from_timestamp(at)).max(0) / 1000),
        );
        text.push_str(&format!(
            "\n{:<36}  {:<16}  {:<24}  {:<8}  {:<12}  {:<9}  {:<12}  {:<7}  {}",
            field(&connection.connection_id),
            field(&connection.workspace),
            field(&connection.remote_name),
            direction_name(connection.direction()),
            state_name(connection.state()),
            if connection.reachable { "yes" } else { "no" },
            last_contact,
            connection.pending_notices,
            field(&connection.remote_fingerprint)
        ));
        // A request waits with a reason only when there is something to
        // read before accepting it (an instance id bound to another key).
        if connection.state() == pb::ConnectionState::Pending
            && connection.direction() == pb::ConnectionDirection::Inbound
            && !connection.state_reason.is_empty()
        {
            text.push_str(&format!("\n  ! {}", field(&connection.state_reason)));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_a_row_stays_on_its_row_and_the_fingerprint_is_shown() {
        let connection = pb::Connection {
            connection_id: "c1".to_owned(),
            workspace: "ws".to_owned(),
            remote_name: "alpha\nc2  ws  bravo\t\u{1b}[2J".to_owned(),
            remote_fingerprint: "ABCD-EFGH".to_owned(),
            state: pb::ConnectionState::Pending.into(),
            ..pb::Connection::default()
        };
        let table = connection_table(std::slice::from_ref(&connection));
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(
            table.contains("alpha\\nc2  ws  bravo\\t\\u{1b}[2J"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .nth(1)
                .is_some_and(|row| row.ends_with("ABCD-EFGH"))
        );
    }
}
