//! Fuzz target: a COMMAND from a peer, decoded and run through the receiver's
//! pure steps in `ExecuteCommand`'s order — envelope checks, the command type and
//! its capability, the signature, then the command's own input checks (a spawn's
//! spec against a configured agent type and its rendered argv, a list's page
//! token) — and a command result decoded as the sender opens it.
#![no_main]
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mosaic_mesh::agents::command::{self, Substitutions};
use mosaic_mesh::agents::model::OriginKind;
use mosaic_mesh::agents::convert::spawn_spec;
use mosaic_mesh::agents::{paging, AgentFilter, AgentRuntime, Origin};
use mosaic_mesh::clock::timestamp_from_ms;
use mosaic_mesh::config::{AgentType, AgentsConfig};
use mosaic_mesh::federation::commands::command_capability;
use mosaic_mesh::federation::envelope::{self, PayloadKind};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh_fuzz::{envelope_for, fixed_key, trusted, ME, NOW_MS, PEER, WINDOW_MS, WORKSPACE};
use prost::Message;

#[derive(Arbitrary, Debug)]
enum Command {
    Spawn {
        agent_type: String,
        prompt: String,
        task_id: String,
        labels: Vec<(String, String)>,
        timeout_seconds: Option<u32>,
    },
    Status(String),
    Kill(String, String),
    List(u32, String),
    /// A payload without a command type.
    Nothing,
}

#[derive(Arbitrary, Debug)]
enum PayloadBytes {
    /// A well-formed header addressed to us and one command.
    Structured(Command),
    /// Bytes exactly as given.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    command: PayloadBytes,
    sign: bool,
    signature: Vec<u8>,
    key_id: String,
    /// Bytes of a CommandResultPayload, opened as the sender opens a reply.
    result: Vec<u8>,
    sign_result: bool,
}

fn header() -> pb::EnvelopeHeader {
    pb::EnvelopeHeader {
        message_id: "0193a5f0-0000-7000-8000-000000000000".to_owned(),
        sender_instance_id: PEER.to_owned(),
        recipient_instance_id: ME.to_owned(),
        workspace: WORKSPACE.to_owned(),
        issued_at: Some(timestamp_from_ms(NOW_MS)),
        expires_at: Some(timestamp_from_ms(NOW_MS + 60_000)),
        key_id: fixed_key().public_key().key_id(),
    }
}

fn payload_bytes(payload: PayloadBytes) -> Vec<u8> {
    use pb::command_payload::Command as Wire;
    let command = match payload {
        PayloadBytes::Raw(bytes) => return bytes,
        PayloadBytes::Structured(command) => command,
    };
    let command = match command {
        Command::Spawn {
            agent_type,
            prompt,
            task_id,
            labels,
            timeout_seconds,
        } => Some(Wire::AgentSpawn(pb::AgentSpawnCommand {
            spawn: Some(agent_pb::SpawnRequest {
                agent_type,
                prompt,
                task_id,
                labels: labels.into_iter().collect(),
                timeout_seconds,
            }),
        })),
        Command::Status(agent_id) => Some(Wire::AgentStatus(pb::AgentStatusCommand { agent_id })),
        Command::Kill(agent_id, reason) => {
            Some(Wire::AgentKill(pb::AgentKillCommand { agent_id, reason }))
        }
        Command::List(page_size, page_token) => Some(Wire::AgentList(pb::AgentListCommand {
            page_size,
            page_token,
        })),
        Command::Nothing => None,
    };
    pb::CommandPayload {
        header: Some(header()),
        command,
    }
    .encode_to_vec()
}

/// One configured type, as `[agents.types.echo]` would make it.
fn settings() -> AgentsConfig {
    let mut agent_type = AgentType::new(&["/bin/echo", "{prompt}", "{task_id}"]);
    agent_type.timeout = Duration::from_secs(600);
    AgentsConfig {
        types: BTreeMap::from([("echo".to_owned(), agent_type)]),
        ..AgentsConfig::default()
    }
}

/// What `run_command` does before any I/O, for each command type.
fn run_pure(verified: &envelope::Verified<pb::CommandPayload>) {
    use pb::command_payload::Command as Wire;
    let sender = &verified.header.sender_instance_id;
    let workspace = &verified.header.workspace;
    match &verified.payload.command {
        Some(Wire::AgentSpawn(spawn)) => {
            let request = spawn.spawn.clone().unwrap_or_default();
            let origin = Origin::Peer {
                instance_id: sender.clone(),
                workspace: workspace.clone(),
            };
            let settings = settings();
            let spec = spawn_spec(request, origin);
            if let Ok((agent_type, timeout_secs)) = AgentRuntime::check_spec(&settings, &spec) {
                assert!(timeout_secs >= 1);
                let argv = command::render(
                    &agent_type.command,
                    Substitutions {
                        prompt: &spec.prompt,
                        task_id: &spec.task_id,
                        agent_id: "agent",
                        workdir: "/tmp/work",
                    },
                );
                // The prompt is one whole argument, never split or spliced.
                assert_eq!(argv.len(), agent_type.command.len());
                assert_eq!(argv[1], spec.prompt);
                assert!(!spec.prompt.contains('\0'));
            }
        }
        Some(Wire::AgentList(list)) => {
            let filter = AgentFilter {
                origin_kind: Some(OriginKind::Peer),
                origin_instance_id: Some(sender.clone()),
                origin_workspace: Some(workspace.clone()),
                ..AgentFilter::default()
            };
            let size = paging::effective_page_size(list.page_size);
            assert!((1..=paging::MAX_PAGE_SIZE).contains(&size));
            if !list.page_token.is_empty() {
                let _ = paging::decode_token(&list.page_token, &filter);
            }
        }
        Some(
            Wire::AgentStatus(_) | Wire::AgentKill(_) | Wire::AgentOutput(_) | Wire::AgentWatch(_),
        )
        | None => {}
    }
}

fn receive(input: &mut Input) {
    let payload = payload_bytes(std::mem::replace(
        &mut input.command,
        PayloadBytes::Raw(Vec::new()),
    ));
    let sealed = envelope_for(
        PayloadKind::Command,
        payload,
        input.sign,
        std::mem::take(&mut input.signature),
        std::mem::take(&mut input.key_id),
    );
    let Ok(parsed) = envelope::parse::<pb::CommandPayload>(Some(&sealed)) else {
        return;
    };
    // A payload without a known command type is refused before anything else.
    let Some(capability) = parsed
        .unverified_payload()
        .command
        .as_ref()
        .map(command_capability)
    else {
        return;
    };
    assert!(capability.starts_with("agent."));
    if parsed.check_recipient(ME).is_err() {
        return;
    }
    let trusted = trusted();
    let Ok(key) = parsed.check_key(&trusted, fixed_key().public_key(), NOW_MS) else {
        return;
    };
    if parsed.check_time(NOW_MS, WINDOW_MS).is_err() {
        return;
    }
    if let Ok(verified) = parsed.verify_signature(&key) {
        run_pure(&verified);
    }
}

fn open_result(input: &mut Input) {
    let sealed = envelope_for(
        PayloadKind::CommandResult,
        std::mem::take(&mut input.result),
        input.sign_result,
        Vec::new(),
        String::new(),
    );
    // The reply is opened as if we (PEER's peer) had called ME.
    let Ok(verified) = envelope::open_reply::<pb::CommandResultPayload>(
        Some(&sealed),
        ME,
        PEER,
        WORKSPACE,
        &trusted(),
        NOW_MS,
    ) else {
        return;
    };
    if let Some(pb::command_result_payload::Outcome::Error(error)) = &verified.payload.outcome {
        let status = tonic::Status::new(tonic::Code::from(error.code), error.message.clone());
        let _ = status.code();
    }
}

fuzz_target!(|input: Input| {
    let mut input = input;
    receive(&mut input);
    open_result(&mut input);
});
