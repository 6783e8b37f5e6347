//! Conversions between the agent runtime's domain types and
//! `mosaic.agent.v1` messages, for the AgentControl handlers and for the
//! federation's signed commands alike (logic may import this; it imports no
//! handler).

use std::time::Duration;

use tonic::Status;

use super::model::{
    AgentEvent, AgentFilter, AgentRecord, AgentState, Origin, OriginKind, OutputChunk,
    OutputStream, SpawnSpec, WatchFrom,
};
use crate::clock::{ms_from_timestamp, timestamp_from_ms};
use crate::proto::agent as pb;

/// The domain spawn spec of a `SpawnRequest`, for `origin` (a local call or a
/// peer's `agent.spawn` command).
pub fn spawn_spec(request: pb::SpawnRequest, origin: Origin) -> SpawnSpec {
    SpawnSpec {
        agent_type: request.agent_type,
        prompt: request.prompt,
        task_id: request.task_id,
        labels: request.labels.into_iter().collect(),
        timeout: request
            .timeout_seconds
            .map(|seconds| Duration::from_secs(u64::from(seconds))),
        origin,
    }
}

/// The domain filter of a `ListAgentsRequest`; an unknown enum value is
/// INVALID_ARGUMENT.
pub fn filter_from_proto(request: &pb::ListAgentsRequest) -> Result<AgentFilter, Status> {
    let state = match pb::AgentState::try_from(request.state) {
        Ok(pb::AgentState::Unspecified) => None,
        Ok(state) => Some(state_from_proto(state)),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown state {}",
                request.state
            )));
        }
    };
    let origin_kind = match pb::AgentOriginKind::try_from(request.origin_kind) {
        Ok(pb::AgentOriginKind::Unspecified) => None,
        Ok(pb::AgentOriginKind::Local) => Some(OriginKind::Local),
        Ok(pb::AgentOriginKind::Peer) => Some(OriginKind::Peer),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown origin_kind {}",
                request.origin_kind
            )));
        }
    };
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    Ok(AgentFilter {
        state,
        agent_type: non_empty(&request.agent_type),
        origin_kind,
        origin_instance_id: non_empty(&request.origin_instance_id),
        origin_workspace: None,
        labels: request
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    })
}

/// The domain state of a protobuf state (`UNSPECIFIED` reads as SPAWNING).
pub fn state_from_proto(state: pb::AgentState) -> AgentState {
    match state {
        pb::AgentState::Spawning | pb::AgentState::Unspecified => AgentState::Spawning,
        pb::AgentState::Running => AgentState::Running,
        pb::AgentState::Completed => AgentState::Completed,
        pb::AgentState::Failed => AgentState::Failed,
        pb::AgentState::Killed => AgentState::Killed,
        pb::AgentState::TimedOut => AgentState::TimedOut,
    }
}

/// The protobuf enum of a state.
pub fn state_to_proto(state: AgentState) -> pb::AgentState {
    match state {
        AgentState::Spawning => pb::AgentState::Spawning,
        AgentState::Running => pb::AgentState::Running,
        AgentState::Completed => pb::AgentState::Completed,
        AgentState::Failed => pb::AgentState::Failed,
        AgentState::Killed => pb::AgentState::Killed,
        AgentState::TimedOut => pb::AgentState::TimedOut,
    }
}

/// The protobuf message of an agent record.
pub fn agent_to_proto(agent: &AgentRecord) -> pb::Agent {
    let origin = match &agent.origin {
        Origin::Local => pb::AgentOrigin {
            kind: pb::AgentOriginKind::Local.into(),
            instance_id: String::new(),
            workspace: String::new(),
        },
        Origin::Peer {
            instance_id,
            workspace,
        } => pb::AgentOrigin {
            kind: pb::AgentOriginKind::Peer.into(),
            instance_id: instance_id.clone(),
            workspace: workspace.clone(),
        },
    };
    pb::Agent {
        agent_id: agent.id.clone(),
        agent_type: agent.agent_type.clone(),
        state: state_to_proto(agent.state).into(),
        state_reason: agent.state_reason.clone(),
        prompt: agent.prompt.clone(),
        task_id: agent.task_id.clone(),
        labels: agent
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        origin: Some(origin),
        pid: agent.pid,
        exit_code: agent.exit_code,
        signal: agent.signal,
        output_tail: agent.output_tail.clone(),
        output_bytes: agent.output_bytes,
        output_truncated: agent.output_truncated,
        timeout_seconds: agent.timeout_secs,
        created_at: Some(timestamp_from_ms(agent.created_at_ms)),
        started_at: agent.started_at_ms.map(timestamp_from_ms),
        ended_at: agent.ended_at_ms.map(timestamp_from_ms),
        updated_at: Some(timestamp_from_ms(agent.updated_at_ms)),
        runner_id: agent.runner_id.clone(),
    }
}

/// The record of a protobuf agent, as another replica of this instance sent
/// it (the inverse of [`agent_to_proto`]).
pub fn agent_from_proto(agent: pb::Agent) -> AgentRecord {
    let state = state_from_proto(agent.state());
    let origin = match agent.origin {
        Some(origin) if origin.kind() == pb::AgentOriginKind::Peer => Origin::Peer {
            instance_id: origin.instance_id,
            workspace: origin.workspace,
        },
        _ => Origin::Local,
    };
    let ms = |timestamp: Option<prost_types::Timestamp>| timestamp.as_ref().map(ms_from_timestamp);
    AgentRecord {
        state,
        id: agent.agent_id,
        agent_type: agent.agent_type,
        state_reason: agent.state_reason,
        prompt: agent.prompt,
        task_id: agent.task_id,
        labels: agent.labels.into_iter().collect(),
        origin,
        runner_id: agent.runner_id,
        pid: agent.pid,
        exit_code: agent.exit_code,
        signal: agent.signal,
        output_tail: agent.output_tail,
        output_bytes: agent.output_bytes,
        output_truncated: agent.output_truncated,
        timeout_secs: agent.timeout_seconds,
        created_at_ms: ms(agent.created_at).unwrap_or_default(),
        started_at_ms: ms(agent.started_at),
        ended_at_ms: ms(agent.ended_at),
        updated_at_ms: ms(agent.updated_at).unwrap_or_default(),
    }
}

/// The protobuf event of a watch.
pub fn event_to_proto(event: AgentEvent) -> pb::watch_agent_response::Event {
    match event {
        AgentEvent::StateChanged { from, agent } => {
            pb::watch_agent_response::Event::StateChange(pb::AgentStateChange {
                from_state: from
                    .map_or(pb::AgentState::Unspecified, state_to_proto)
                    .into(),
                to_state: state_to_proto(agent.state).into(),
                reason: agent.state_reason.clone(),
                at: Some(timestamp_from_ms(agent.updated_at_ms)),
                agent: Some(agent_to_proto(&agent)),
            })
        }
        AgentEvent::Output {
            stream,
            line,
            at_ms,
        } => pb::watch_agent_response::Event::OutputLine(pb::AgentOutputLine {
            stream: match stream {
                OutputStream::Stdout => pb::AgentOutputStream::Stdout,
                OutputStream::Stderr => pb::AgentOutputStream::Stderr,
            }
            .into(),
            line,
            at: Some(timestamp_from_ms(at_ms)),
        }),
    }
}

/// The WatchAgent stream of a watch's `events`, each with its sequence; an
/// error ends the stream with its status.
pub fn watch_responses(
    events: super::elsewhere::EventStream,
) -> futures::stream::BoxStream<'static, Result<pb::WatchAgentResponse, Status>> {
    use futures::StreamExt as _;
    events
        .map(|event| {
            let event = event.map_err(Status::from)?;
            Ok(pb::WatchAgentResponse {
                sequence: event.sequence,
                event: Some(event_to_proto(event.event)),
            })
        })
        .boxed()
}

/// Where a WatchAgent request starts.
pub fn watch_from(from_sequence: Option<u64>) -> WatchFrom {
    from_sequence.map_or(WatchFrom::Now, WatchFrom::Sequence)
}

/// A part of an agent's output as ReadAgentOutput answers it.
pub fn output_chunk_to_proto(chunk: OutputChunk) -> pb::ReadAgentOutputResponse {
    pb::ReadAgentOutputResponse {
        data: chunk.data,
        offset: chunk.offset,
        next_offset: chunk.next_offset,
        kept_bytes: chunk.kept_bytes,
        end: chunk.end,
    }
}

/// The inverse of [`output_chunk_to_proto`], for an answer another replica
/// gave.
pub fn output_chunk_from_proto(chunk: pb::ReadAgentOutputResponse) -> OutputChunk {
    OutputChunk {
        data: chunk.data,
        offset: chunk.offset,
        next_offset: chunk.next_offset,
        kept_bytes: chunk.kept_bytes,
        end: chunk.end,
    }
}

/// The event of a protobuf watch message, as another replica of this
/// instance sent it (the inverse of [`event_to_proto`]); `None` for a
/// message that carries no event.
pub fn event_from_proto(event: Option<pb::watch_agent_response::Event>) -> Option<AgentEvent> {
    match event? {
        pb::watch_agent_response::Event::StateChange(change) => {
            let from = match change.from_state() {
                pb::AgentState::Unspecified => None,
                state => Some(state_from_proto(state)),
            };
            Some(AgentEvent::StateChanged {
                from,
                agent: Box::new(agent_from_proto(change.agent?)),
            })
        }
        pb::watch_agent_response::Event::OutputLine(line) => Some(AgentEvent::Output {
            stream: match line.stream() {
                pb::AgentOutputStream::Stderr => OutputStream::Stderr,
                _ => OutputStream::Stdout,
            },
            at_ms: line.at.as_ref().map(ms_from_timestamp).unwrap_or_default(),
            line: line.line,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AgentRecord {
        AgentRecord {
            id: "agent-1".to_owned(),
            agent_type: "sh".to_owned(),
            state: AgentState::Running,
            state_reason: "started".to_owned(),
            prompt: "echo hi".to_owned(),
            task_id: "job-1".to_owned(),
            labels: [("team".to_owned(), "core".to_owned())].into(),
            origin: Origin::Peer {
                instance_id: "peer".to_owned(),
                workspace: "ws".to_owned(),
            },
            runner_id: "runner-a".to_owned(),
            pid: Some(42),
            exit_code: None,
            signal: Some(15),
            output_tail: vec!["hi".to_owned()],
            output_bytes: 3,
            output_truncated: true,
            timeout_secs: 60,
            created_at_ms: 1_700_000_000_123,
            started_at_ms: Some(1_700_000_000_456),
            ended_at_ms: None,
            updated_at_ms: 1_700_000_000_789,
        }
    }

    #[test]
    fn a_record_sent_to_another_replica_reads_back_the_same() {
        let agent = record();
        assert_eq!(agent_from_proto(agent_to_proto(&agent)), agent);
        let local = AgentRecord {
            origin: Origin::Local,
            ..record()
        };
        assert_eq!(agent_from_proto(agent_to_proto(&local)), local);
    }

    #[test]
    fn watch_events_read_back_the_same() {
        for event in [
            AgentEvent::StateChanged {
                from: None,
                agent: Box::new(record()),
            },
            AgentEvent::StateChanged {
                from: Some(AgentState::Spawning),
                agent: Box::new(record()),
            },
            AgentEvent::Output {
                stream: OutputStream::Stderr,
                line: "oops".to_owned(),
                at_ms: 1_700_000_001_000,
            },
        ] {
            let sent = Some(event_to_proto(event.clone()));
            assert_eq!(event_from_proto(sent), Some(event));
        }
        assert_eq!(event_from_proto(None), None);
    }
}
