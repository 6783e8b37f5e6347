//! The command log as federation uses it: what a log entry says about
//! a command's outcome, the per-direction counters behind the
//! `mosaic_commands_total` metric, the digest that ties a retried message id
//! to the operator's request, and ListCommandLog's paging.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prost::Message as _;

use super::Federation;
use super::FederationError;
use super::paging::{decode_cursor, encode_cursor};
use crate::clock::timestamp_from_ms;
use crate::error::code_name;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogFilter, CommandLogRecord};

/// Longest detail text kept in a log entry.
const MAX_DETAIL_CHARS: usize = 512;
/// Default and largest ListCommandLog page.
const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;

/// Commands counted by (direction, outcome) since the daemon started.
#[derive(Debug, Default)]
pub struct CommandCounters(Mutex<BTreeMap<(&'static str, String), u64>>);

impl CommandCounters {
    /// Counts one finished command.
    pub fn count(&self, direction: CommandDirection, outcome: &str) {
        if let Ok(mut counts) = self.0.lock() {
            *counts
                .entry((direction.as_str(), outcome.to_owned()))
                .or_insert(0) += 1;
        }
    }

    /// `(direction, outcome, count)` rows, sorted.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |counts| {
                counts
                    .iter()
                    .map(|((direction, outcome), count)| {
                        ((*direction).to_owned(), outcome.clone(), *count)
                    })
                    .collect()
            },
        )
    }
}

/// The outcome name and detail a log entry shows for a command's result.
pub fn describe_outcome(outcome: Option<&pb::command_result_payload::Outcome>) -> (String, String) {
    use pb::command_result_payload::Outcome;
    match outcome {
        Some(Outcome::Agent(agent)) => (
            "ok".to_owned(),
            format!("agent {} {}", agent.agent_id, agent_state_name(agent.state)),
        ),
        Some(Outcome::AgentList(list)) => {
            ("ok".to_owned(), format!("{} agents", list.agents.len()))
        }
        Some(Outcome::Output(output)) => (
            "ok".to_owned(),
            format!("{} bytes from offset {}", output.data.len(), output.offset),
        ),
        Some(Outcome::Error(error)) => (
            code_name(tonic::Code::from(error.code)).to_owned(),
            clip(&error.message),
        ),
        None => (
            "INTERNAL".to_owned(),
            "the result carries no outcome".to_owned(),
        ),
    }
}

/// The outcome name and detail a log entry shows for a refusal or failure.
pub fn describe_error(error: &FederationError) -> (String, String) {
    let detail = match error {
        // Internal causes are logged, not shown.
        FederationError::Store(_) | FederationError::Internal(_) => "internal error".to_owned(),
        other => clip(&other.to_string()),
    };
    (code_name(error.code()).to_owned(), detail)
}

fn agent_state_name(state: i32) -> &'static str {
    crate::proto::agent::AgentState::try_from(state)
        .map_or("AGENT_STATE_UNSPECIFIED", |state| state.as_str_name())
        .trim_start_matches("AGENT_STATE_")
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_DETAIL_CHARS).collect()
}

/// Checks a message id chosen by an operator: 1 to 64 characters from
/// `A-Z a-z 0-9 . _ : -` (a UUID fits).
/// It is the identifier rule a peer applies to a header's message id, so an
/// id accepted here is never refused there.
pub fn check_message_id(message_id: &str) -> Result<(), FederationError> {
    crate::text::identifier::check("message_id", message_id).map_err(FederationError::Invalid)
}

/// SHA-256 over the peer, the workspace and the command, in a canonical form
/// (labels sorted), so that a retry of the same request has the same digest
/// whatever order a client sent its labels in.
pub fn request_digest(
    peer_instance_id: &str,
    workspace: &str,
    command: &pb::command_payload::Command,
) -> Vec<u8> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        context.update(&(bytes.len() as u64).to_be_bytes());
        context.update(bytes);
    };
    field(b"mosaic.command-request.v1");
    field(peer_instance_id.as_bytes());
    field(workspace.as_bytes());
    let mut canonical = command.clone();
    let mut labels = Vec::new();
    if let pb::command_payload::Command::AgentSpawn(spawn) = &mut canonical
        && let Some(request) = spawn.spawn.as_mut()
    {
        labels = std::mem::take(&mut request.labels).into_iter().collect();
        labels.sort();
    }
    field(
        &pb::CommandPayload {
            header: None,
            command: Some(canonical),
        }
        .encode_to_vec(),
    );
    for (key, value) in &labels {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    context.finish().as_ref().to_vec()
}

/// A log entry as the API shows it. The signed bytes and digests stay inside.
pub fn entry_message(record: &CommandLogRecord) -> pb::CommandLogEntry {
    pb::CommandLogEntry {
        message_id: record.message_id.clone(),
        direction: match record.direction {
            CommandDirection::Inbound => pb::CommandDirection::Inbound,
            CommandDirection::Outbound => pb::CommandDirection::Outbound,
        } as i32,
        sender_instance_id: record.sender_instance_id.clone(),
        recipient_instance_id: record.recipient_instance_id.clone(),
        workspace: record.workspace.clone(),
        command_type: record.command_type.clone(),
        outcome: record.outcome.clone(),
        detail: record.detail.clone(),
        issued_at: Some(timestamp_from_ms(record.issued_at_ms)),
        recorded_at: Some(timestamp_from_ms(record.recorded_at_ms)),
    }
}

impl Federation {
    /// ListCommandLog: a page of entries, newest first, and the next token.
    pub async fn list_command_log(
        &self,
        request: &pb::ListCommandLogRequest,
    ) -> Result<(Vec<pb::CommandLogEntry>, String), FederationError> {
        let direction = match pb::CommandDirection::try_from(request.direction) {
            Ok(pb::CommandDirection::Unspecified) => None,
            Ok(pb::CommandDirection::Inbound) => Some(CommandDirection::Inbound),
            Ok(pb::CommandDirection::Outbound) => Some(CommandDirection::Outbound),
            Err(_) => {
                return Err(FederationError::Invalid(
                    "direction is not a known CommandDirection".into(),
                ));
            }
        };
        let filter_key = format!(
            "{}\u{1f}{}\u{1f}{}",
            request.peer_instance_id,
            request.workspace,
            direction.map_or("", CommandDirection::as_str)
        );
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_cursor(token, &filter_key)?),
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let filter = CommandLogFilter {
            peer_instance_id: Some(request.peer_instance_id.clone())
                .filter(|peer| !peer.is_empty()),
            workspace: Some(request.workspace.clone()).filter(|workspace| !workspace.is_empty()),
            direction,
            after,
            limit: i64::from(page_size) + 1,
        };
        // Sent reads are written behind their answers; the listing shows
        // every one answered before it.
        self.flush_command_log().await;
        let mut records = self.store.list_command_log(&filter).await?;
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records
                .last()
                .map(|last| encode_cursor(last.recorded_at_ms, &last.id, &filter_key))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((records.iter().map(entry_message).collect(), next_page_token))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn spawn(labels: &[(&str, &str)], prompt: &str) -> pb::command_payload::Command {
        pb::command_payload::Command::AgentSpawn(pb::AgentSpawnCommand {
            spawn: Some(crate::proto::agent::SpawnRequest {
                agent_type: "sh".into(),
                prompt: prompt.into(),
                labels: labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn the_request_digest_ignores_label_order_but_not_content_or_routing() {
        let many: Vec<(String, String)> = (0..32)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let forward: Vec<(&str, &str)> =
            many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut backward = forward.clone();
        backward.reverse();
        let one = request_digest("b", "w", &spawn(&forward, "echo"));
        assert_eq!(one, request_digest("b", "w", &spawn(&backward, "echo")));
        assert_ne!(one, request_digest("b", "w", &spawn(&forward, "echo 2")));
        assert_ne!(one, request_digest("c", "w", &spawn(&forward, "echo")));
        assert_ne!(one, request_digest("b", "w2", &spawn(&forward, "echo")));
        assert_ne!(one, request_digest("b", "w", &spawn(&forward[1..], "echo")));
    }

    #[test]
    fn operator_message_ids_are_bounded_and_plain() {
        assert!(check_message_id("6f1c1a52-3c43-4c4b-9d8e-0f5e7c0b1a2d").is_ok());
        assert!(check_message_id("retry:job-7.spawn_1").is_ok());
        assert!(check_message_id(&"x".repeat(64)).is_ok());
        for bad in ["", "has space", "naïve", "a/b", &"x".repeat(65)] {
            assert!(check_message_id(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
