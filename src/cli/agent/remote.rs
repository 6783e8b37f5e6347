//! `mosaicd agent spawn | status | kill | list | watch | logs --peer INSTANCE`:
//! agents on a peer, through the running daemon's Federation admin RPCs (API
//! key with the `admin` scope). The daemon signs the command, sends it over the ACTIVE
//! connection and verifies the peer's signed reply; this module picks the
//! connection, so that a wrong peer or workspace is a clear error before
//! anything is sent, and prints the agent the way local commands do.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{AgentCommand, OutputPrinter, agent_json, agent_text, print_event, print_list};
use crate::cli::client::Connection;
use crate::cli::exit::{CliError, Output};
use crate::federation::state::ConnectionState;
use crate::proto::agent as agent_pb;
use crate::proto::federation as pb;

/// `--peer` and `--workspace` of the agent commands.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Act on this peer instead of the local daemon: its instance id, or its
    /// name when no other peer has it (`mosaicd peer list` shows both).
    #[arg(long, value_name = "INSTANCE")]
    pub peer: Option<String>,
    /// With --peer: the workspace of the connection to use; needed only when
    /// the peer is connected in several workspaces.
    #[arg(long, value_name = "WORKSPACE", requires = "peer")]
    pub workspace: Option<String>,
}

/// The connection a command to a peer goes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    /// The peer's instance id.
    pub instance_id: String,
    /// The peer's name, as it introduced itself.
    pub name: String,
    /// The workspace of the ACTIVE connection.
    pub workspace: String,
}

impl PeerTarget {
    /// `name (instance id)` for messages.
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.instance_id)
    }
}

/// Runs an agent command that names a peer.
pub async fn run(
    command: AgentCommand,
    connection: &Connection,
    output: Output,
) -> Result<(), CliError> {
    let mut client = pb::federation_client::FederationClient::new(connection.channel.clone());
    let (peer, workspace) = match &command {
        AgentCommand::Spawn { remote, .. }
        | AgentCommand::Status { remote, .. }
        | AgentCommand::Kill { remote, .. }
        | AgentCommand::List { remote, .. }
        | AgentCommand::Logs { remote, .. }
        | AgentCommand::Watch { remote, .. } => (remote.peer.clone(), remote.workspace.clone()),
    };
    let Some(peer) = peer else {
        return Err(CliError::usage("--peer is required here"));
    };
    let connections = crate::cli::peer::list_all(
        &mut client,
        connection,
        None,
        pb::ConnectionState::Unspecified,
    )
    .await?;
    let target = choose_connection(&connections, &peer, workspace.as_deref())?;
    let call_error = |status: tonic::Status| {
        connection.remote_error(&status, &target.label(), &target.instance_id)
    };
    match command {
        AgentCommand::Spawn {
            agent_type,
            prompt,
            task_id,
            labels,
            timeout,
            message_id,
            ..
        } => {
            // Always our own message id, so that a spawn whose answer was
            // lost can be retried under it without starting a second agent.
            let message_id = message_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let spawn_error = |status: tonic::Status| {
                let mut error = call_error(status);
                if error.code == CliError::code_of(tonic::Code::Unavailable) {
                    error.message.push_str(&format!(
                        "; the agent may or may not have started: run the same spawn again with --message-id {message_id} (within the signed command's lifetime, 5 minutes by default) and the peer will not start a second one"
                    ));
                }
                error
            };
            let response = client
                .spawn_remote_agent(connection.request(pb::SpawnRemoteAgentRequest {
                    peer_instance_id: target.instance_id.clone(),
                    workspace: target.workspace.clone(),
                    message_id: message_id.clone(),
                    spawn: Some(agent_pb::SpawnRequest {
                        agent_type,
                        prompt,
                        task_id,
                        labels: labels.into_iter().collect(),
                        timeout_seconds: timeout,
                    }),
                })?)
                .await
                .map_err(spawn_error)?
                .into_inner();
            print_remote_agent(
                &response.agent.unwrap_or_default(),
                &target,
                Some(&response.message_id),
                output,
            );
        }
        AgentCommand::Status { id, .. } => {
            let agent = client
                .get_remote_agent(connection.request(pb::GetRemoteAgentRequest {
                    peer_instance_id: target.instance_id.clone(),
                    workspace: target.workspace.clone(),
                    agent_id: id,
                })?)
                .await
                .map_err(call_error)?
                .into_inner()
                .agent
                .unwrap_or_default();
            print_remote_agent(&agent, &target, None, output);
        }
        AgentCommand::Kill { id, reason, .. } => {
            let agent = client
                .kill_remote_agent(connection.request(pb::KillRemoteAgentRequest {
                    peer_instance_id: target.instance_id.clone(),
                    workspace: target.workspace.clone(),
                    agent_id: id,
                    reason,
                })?)
                .await
                .map_err(call_error)?
                .into_inner()
                .agent
                .unwrap_or_default();
            print_remote_agent(&agent, &target, None, output);
        }
        AgentCommand::List {
            limit, page_token, ..
        } => {
            let response = client
                .list_remote_agents(connection.request(pb::ListRemoteAgentsRequest {
                    peer_instance_id: target.instance_id.clone(),
                    workspace: target.workspace.clone(),
                    page_size: limit,
                    page_token,
                })?)
                .await
                .map_err(call_error)?
                .into_inner();
            print_list(
                &agent_pb::ListAgentsResponse {
                    agents: response.agents,
                    next_page_token: response.next_page_token,
                },
                output,
            );
        }
        AgentCommand::Watch { id, from, .. } => {
            let request = connection.request(watch_request(&target, id, from))?;
            watch(&mut client, request, output)
                .await
                .map_err(call_error)?;
        }
        AgentCommand::Logs {
            id, follow, from, ..
        } if follow || from.is_some() => {
            let from = Some(from.unwrap_or(1));
            let request = connection.request(watch_request(&target, id, from))?;
            watch(&mut client, request, output)
                .await
                .map_err(call_error)?;
        }
        AgentCommand::Logs { id, .. } => {
            let mut printer = OutputPrinter::new(output);
            let mut offset = 0;
            loop {
                let request = pb::ReadRemoteAgentOutputRequest {
                    peer_instance_id: target.instance_id.clone(),
                    workspace: target.workspace.clone(),
                    agent_id: id.clone(),
                    offset,
                    max_bytes: 0,
                };
                let part = client
                    .read_remote_agent_output(connection.request(request)?)
                    .await
                    .map_err(call_error)?
                    .into_inner()
                    .output
                    .unwrap_or_default();
                if !printer.print(&part) {
                    break;
                }
                offset = part.next_offset;
            }
        }
    }
    Ok(())
}

/// A watch of `agent_id` on the peer, with every output line.
fn watch_request(
    target: &PeerTarget,
    agent_id: String,
    from_sequence: Option<u64>,
) -> pb::WatchRemoteAgentRequest {
    pb::WatchRemoteAgentRequest {
        peer_instance_id: target.instance_id.clone(),
        workspace: target.workspace.clone(),
        agent_id,
        include_output: true,
        from_sequence,
    }
}

/// Follows an agent on the peer through the daemon (WatchRemoteAgent) and
/// prints its events as `agent watch` does.
async fn watch(
    client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    request: tonic::Request<pb::WatchRemoteAgentRequest>,
    output: Output,
) -> Result<(), tonic::Status> {
    let mut stream = client.watch_remote_agent(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        for event in &message.events {
            print_event(event, output);
        }
    }
    Ok(())
}

/// The agent as local commands print it, plus the peer it runs on (text) and,
/// for a spawn, the signed command's message id (text and JSON).
fn print_remote_agent(
    agent: &agent_pb::Agent,
    target: &PeerTarget,
    message_id: Option<&str>,
    output: Output,
) {
    let mut value = agent_json(agent);
    if let (Some(message_id), Some(object)) = (message_id, value.as_object_mut()) {
        object.insert(
            "message_id".to_owned(),
            Value::String(message_id.to_owned()),
        );
    }
    output.print(&value, || {
        let mut text = agent_text(agent);
        text.push_str(&format!(
            "\npeer:    {} in workspace {}",
            target.label(),
            target.workspace
        ));
        if let Some(message_id) = message_id {
            text.push_str(&format!(
                "\nmessage: {message_id} (retry a spawn with --message-id)"
            ));
        }
        text
    });
}

/// Finds the ACTIVE connection to `peer` (an instance id, or a name that only
/// one peer has), in `workspace` when given. Every way this can fail says what
/// to do: an unknown peer is NOT_FOUND (3); a name of several peers and
/// several workspaces without --workspace are usage errors (2); a connection
/// that is not ACTIVE is refused (4) with the step that makes it ACTIVE.
/// The daemon checks again when it sends; this only makes the errors clear.
pub fn choose_connection(
    connections: &[pb::Connection],
    peer: &str,
    workspace: Option<&str>,
) -> Result<PeerTarget, CliError> {
    let by_id: Vec<&pb::Connection> = connections
        .iter()
        .filter(|connection| connection.remote_instance_id == peer)
        .collect();
    let known = if by_id.is_empty() {
        connections
            .iter()
            .filter(|connection| connection.remote_name == peer)
            .collect()
    } else {
        by_id
    };
    if known.is_empty() {
        return Err(CliError::not_found(format!(
            "no peer {peer:?}: this instance has no connection with an instance of that id or name — `mosaicd peer list` shows the peers; `mosaicd peer connect URL --workspace W` connects one"
        )));
    }
    let instance_ids: BTreeSet<&str> = known
        .iter()
        .map(|connection| connection.remote_instance_id.as_str())
        .collect();
    if instance_ids.len() > 1 {
        return Err(CliError::usage(format!(
            "several peers are named {peer:?} ({}); pass --peer with the instance id",
            instance_ids.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let workspaces = |connections: &[&pb::Connection]| {
        connections
            .iter()
            .map(|connection| connection.workspace.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let in_workspace: Vec<&pb::Connection> = known
        .iter()
        .copied()
        .filter(|connection| workspace.is_none_or(|named| connection.workspace == named))
        .collect();
    if in_workspace.is_empty() {
        return Err(CliError::not_found(format!(
            "peer {peer} has no connection in workspace {:?}; its workspaces: {}",
            workspace.unwrap_or_default(),
            workspaces(&known)
        )));
    }
    let active: Vec<&pb::Connection> = in_workspace
        .iter()
        .copied()
        .filter(|connection| connection.state() == pb::ConnectionState::Active)
        .collect();
    match active.as_slice() {
        [connection] => Ok(PeerTarget {
            instance_id: connection.remote_instance_id.clone(),
            name: connection.remote_name.clone(),
            workspace: connection.workspace.clone(),
        }),
        [] => Err(not_active(in_workspace[0])),
        _ => Err(CliError::usage(format!(
            "peer {peer} is connected in several workspaces ({}); pass --workspace",
            workspaces(&active)
        ))),
    }
}

/// Why the newest connection in the workspace cannot carry a command, and what
/// makes it ACTIVE.
fn not_active(connection: &pb::Connection) -> CliError {
    let state = ConnectionState::from_proto(connection.state());
    let what_to_do = match state {
        Some(ConnectionState::Pending) => format!(
            "wait until the peer's operator accepts it (`mosaicd peer show {}` shows its state)",
            connection.connection_id
        ),
        Some(ConnectionState::Suspended) => format!(
            "the side that suspended it resumes it (`mosaicd peer resume {}` if it was this one)",
            connection.connection_id
        ),
        _ => "connect again with `mosaicd peer connect URL --workspace W`".to_owned(),
    };
    CliError::refused(format!(
        "the connection with peer {} ({}) in workspace {} is {}, not active: {what_to_do}",
        connection.remote_name,
        connection.remote_instance_id,
        connection.workspace,
        state.map_or("unspecified", ConnectionState::as_str),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(id: &str, name: &str, workspace: &str, state: ConnectionState) -> pb::Connection {
        pb::Connection {
            connection_id: format!("{id}-{workspace}"),
            remote_instance_id: id.to_owned(),
            remote_name: name.to_owned(),
            workspace: workspace.to_owned(),
            state: state.to_proto().into(),
            ..pb::Connection::default()
        }
    }

    #[test]
    fn a_peer_is_found_by_id_or_by_a_unique_name() {
        let connections = [
            connection("id-b", "bravo", "ws", ConnectionState::Active),
            connection("id-c", "charlie", "ws", ConnectionState::Active),
        ];
        for peer in ["id-b", "bravo"] {
            let target = choose_connection(&connections, peer, None).expect("found");
            assert_eq!(target.instance_id, "id-b");
            assert_eq!(target.workspace, "ws");
        }
    }

    #[test]
    fn an_unknown_peer_is_not_found_and_says_how_to_list_peers() {
        let connections = [connection("id-b", "bravo", "ws", ConnectionState::Active)];
        let error = choose_connection(&connections, "delta", None).expect_err("unknown");
        assert_eq!(error.code, 3);
        assert!(
            error.message.contains("mosaicd peer list"),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_name_of_two_peers_asks_for_the_instance_id() {
        let connections = [
            connection("id-b", "twin", "ws", ConnectionState::Active),
            connection("id-c", "twin", "ws", ConnectionState::Active),
        ];
        let error = choose_connection(&connections, "twin", None).expect_err("ambiguous");
        assert_eq!(error.code, 2);
        assert!(error.message.contains("id-b") && error.message.contains("id-c"));
    }

    #[test]
    fn several_active_workspaces_need_one_named() {
        let connections = [
            connection("id-b", "bravo", "one", ConnectionState::Active),
            connection("id-b", "bravo", "two", ConnectionState::Active),
        ];
        let error = choose_connection(&connections, "bravo", None).expect_err("ambiguous");
        assert_eq!(error.code, 2);
        assert!(error.message.contains("--workspace"), "{}", error.message);
        assert!(error.message.contains("one, two"), "{}", error.message);
        let target = choose_connection(&connections, "bravo", Some("two")).expect("named");
        assert_eq!(target.workspace, "two");
        let error = choose_connection(&connections, "bravo", Some("three")).expect_err("none");
        assert_eq!(error.code, 3);
        assert!(error.message.contains("one, two"), "{}", error.message);
    }

    #[test]
    fn one_active_workspace_is_chosen_over_inactive_ones() {
        let connections = [
            connection("id-b", "bravo", "old", ConnectionState::Disconnected),
            connection("id-b", "bravo", "ws", ConnectionState::Active),
        ];
        let target = choose_connection(&connections, "id-b", None).expect("active");
        assert_eq!(target.workspace, "ws");
    }

    #[test]
    fn a_connection_that_is_not_active_says_what_makes_it_active() {
        for (state, hint) in [
            (ConnectionState::Pending, "accepts"),
            (ConnectionState::Suspended, "peer resume"),
            (ConnectionState::Disconnected, "peer connect"),
        ] {
            let connections = [connection("id-b", "bravo", "ws", state)];
            let error = choose_connection(&connections, "bravo", None).expect_err("inactive");
            assert_eq!(error.code, 4);
            assert!(error.message.contains(hint), "{}", error.message);
        }
    }
}
