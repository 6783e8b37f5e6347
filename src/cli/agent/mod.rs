//! `mosaicd agent spawn | status | kill | list | watch | logs`: client commands for the
//! daemon's AgentControl service (API key with the `agents` scope). With
//! `--peer`, spawn, status, kill and list act on a peer instead (see `remote.rs`).

pub mod remote;

use std::collections::HashMap;

use clap::Subcommand;
use serde_json::json;

use self::remote::RemoteArgs;
use super::client::{ClientArgs, Connection};
use super::exit::{CliError, Output, list_json, print_line};
use super::serve::load_config;
use crate::clock::ms_from_timestamp;
use crate::config::ConfigArgs;
use crate::proto::agent as pb;
use crate::text::escape_field as field;

/// `mosaicd agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Start an agent of a configured type; prints it (with its id).
    Spawn {
        /// The agent type (a `[agents.types.NAME]` of the daemon's config).
        #[arg(long = "type", value_name = "TYPE")]
        agent_type: String,
        /// The task given to the agent (its `{prompt}`).
        #[arg(long)]
        prompt: String,
        /// Your task id, stored with the agent (its `{task_id}`).
        #[arg(long, value_name = "ID", default_value = "")]
        task_id: String,
        /// A label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Wall-clock limit in seconds [default: the agent type's].
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u32>,
        /// Start the agent on this peer instead (see --peer).
        #[command(flatten)]
        remote: RemoteArgs,
        /// With --peer: the signed command's message id (1 to 64 of A-Z a-z
        /// 0-9 . _ : -) [default: a new UUID]. Running the same spawn again
        /// with the id of an attempt whose answer was lost never starts a
        /// second agent.
        #[arg(long, value_name = "ID", requires = "peer")]
        message_id: Option<String>,
    },
    /// Show one agent, with the last lines of its output.
    Status {
        /// The agent id.
        id: String,
        /// Ask this peer about an agent this instance started there.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Stop an agent (SIGTERM to its process group, SIGKILL after the grace
    /// period). An agent that has already ended is shown unchanged.
    Kill {
        /// The agent id.
        id: String,
        /// Why; recorded as the agent's state reason.
        #[arg(long, default_value = "")]
        reason: String,
        /// Stop an agent this instance started on this peer.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List agents, newest first.
    List {
        /// Only agents in this state (e.g. RUNNING).
        #[arg(long, value_parser = parse_state, conflicts_with = "peer")]
        state: Option<pb::AgentState>,
        /// Only agents of this type.
        #[arg(
            long = "type",
            value_name = "TYPE",
            default_value = "",
            conflicts_with = "peer"
        )]
        agent_type: String,
        /// Only agents carrying this label KEY=VALUE; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, conflicts_with = "peer")]
        labels: Vec<(String, String)>,
        /// At most this many [default: the server's page size].
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Continue from a previous page (`next_page_token` in --json output).
        #[arg(long, default_value = "")]
        page_token: String,
        /// List the agents this instance started on this peer (no filters).
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Follow an agent until it ends: its output lines as they come (stdout
    /// and stderr to yours) and its state changes (on stderr). With --json,
    /// one JSON object per event on stdout.
    Watch {
        /// The agent id.
        id: String,
        /// Start with the event of this sequence (1: from the agent's start)
        /// instead of its current state; to resume a watch that was cut, the
        /// last sequence it printed + 1.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Follow an agent this instance started on this peer (a signed
        /// `agent.watch` command; needs `agent.status`). The daemon resumes
        /// by itself when the connection to the peer is cut.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print an agent's captured output (stdout and stderr as written, up to
    /// the capture cap). With --follow (or --from), print its output lines
    /// from the start (or from event SEQ) and follow it until it ends, as
    /// `agent watch` does.
    Logs {
        /// The agent id.
        id: String,
        /// Follow the agent until it ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Follow from the event of this sequence on (implies --follow).
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Read the output of an agent this instance started on this peer
        /// (a signed `agent.output` command, or `agent.watch` to follow; both
        /// need `agent.status`).
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

impl AgentCommand {
    /// The peer named by --peer, if the command is for one.
    pub fn peer(&self) -> Option<&str> {
        match self {
            AgentCommand::Spawn { remote, .. }
            | AgentCommand::Status { remote, .. }
            | AgentCommand::Kill { remote, .. }
            | AgentCommand::List { remote, .. }
            | AgentCommand::Logs { remote, .. }
            | AgentCommand::Watch { remote, .. } => remote.peer.as_deref(),
        }
    }
}

/// Runs an `agent` subcommand against the daemon.
pub async fn run(
    command: AgentCommand,
    config_args: &ConfigArgs,
    client_args: &ClientArgs,
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(config_args)?;
    let connection = super::client::connect(&config, client_args).await?;
    if command.peer().is_some() {
        return remote::run(command, &connection, output).await;
    }
    let mut client = pb::agent_control_client::AgentControlClient::new(connection.channel.clone());
    match command {
        AgentCommand::Spawn {
            agent_type,
            prompt,
            task_id,
            labels,
            timeout,
            ..
        } => {
            let request = pb::SpawnRequest {
                agent_type,
                prompt,
                task_id,
                labels: labels.into_iter().collect(),
                timeout_seconds: timeout,
            };
            let agent = client
                .spawn(connection.request(request)?)
                .await
                .map_err(|status| connection.error(&status))?
                .into_inner()
                .agent
                .unwrap_or_default();
            print_agent(&agent, output);
        }
        AgentCommand::Status { id, .. } => {
            let agent = client
                .get_agent(connection.request(pb::GetAgentRequest { agent_id: id })?)
                .await
                .map_err(|status| connection.error(&status))?
                .into_inner()
                .agent
                .unwrap_or_default();
            print_agent(&agent, output);
        }
        AgentCommand::Kill { id, reason, .. } => {
            let agent = client
                .kill_agent(connection.request(pb::KillAgentRequest {
                    agent_id: id,
                    reason,
                })?)
                .await
                .map_err(|status| connection.error(&status))?
                .into_inner()
                .agent
                .unwrap_or_default();
            print_agent(&agent, output);
        }
        AgentCommand::List {
            state,
            agent_type,
            labels,
            limit,
            page_token,
            ..
        } => {
            let request = pb::ListAgentsRequest {
                state: state.unwrap_or(pb::AgentState::Unspecified).into(),
                agent_type,
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                page_size: limit,
                page_token,
                ..pb::ListAgentsRequest::default()
            };
            let response = client
                .list_agents(connection.request(request)?)
                .await
                .map_err(|status| connection.error(&status))?
                .into_inner();
            print_list(&response, output);
        }
        AgentCommand::Watch { id, from, .. } => {
            watch(&mut client, &connection, id, from, output).await?;
        }
        AgentCommand::Logs {
            id, follow, from, ..
        } => {
            if follow || from.is_some() {
                let from = Some(from.unwrap_or(1));
                watch(&mut client, &connection, id, from, output).await?;
            } else {
                logs(&mut client, &connection, id, output).await?;
            }
        }
    }
    Ok(())
}

async fn watch(
    client: &mut pb::agent_control_client::AgentControlClient<tonic::transport::Channel>,
    connection: &Connection,
    agent_id: String,
    from_sequence: Option<u64>,
    output: Output,
) -> Result<(), CliError> {
    let mut stream = client
        .watch_agent(connection.request(pb::WatchAgentRequest {
            agent_id,
            include_output: true,
            from_sequence,
        })?)
        .await
        .map_err(|status| connection.error(&status))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| connection.error(&status))?
    {
        print_event(&message, output);
    }
    Ok(())
}

/// Prints one event of a watch: output lines to stdout or stderr as the
/// agent wrote them, state changes on stderr; with --json, one JSON object
/// per event on stdout. A reader of stdout that went away ends the command
/// quietly.
pub fn print_event(message: &pb::WatchAgentResponse, output: Output) {
    match &message.event {
        Some(pb::watch_agent_response::Event::StateChange(change)) => {
            let agent = change.agent.clone().unwrap_or_default();
            if output.json {
                print_line(
                    &json!({ "sequence": message.sequence, "state_change": {
                        "from_state": state_name(change.from_state),
                        "to_state": state_name(change.to_state),
                        "reason": change.reason,
                        "agent": agent_json(&agent),
                    }})
                    .to_string(),
                );
            } else {
                eprintln!(
                    "{}",
                    crate::text::escape_for_terminal(&format!(
                        "mosaicd: agent {} is {}{}",
                        field(&agent.agent_id),
                        state_name(change.to_state),
                        reason_suffix(&change.reason)
                    ))
                );
            }
        }
        Some(pb::watch_agent_response::Event::OutputLine(line)) => {
            let stream_name = match pb::AgentOutputStream::try_from(line.stream) {
                Ok(pb::AgentOutputStream::Stderr) => "stderr",
                _ => "stdout",
            };
            if output.json {
                print_line(
                    &json!({ "sequence": message.sequence, "output_line": {
                        "stream": stream_name,
                        "line": line.line,
                    }})
                    .to_string(),
                );
            } else if stream_name == "stderr" {
                eprintln!("{}", crate::text::escape_for_terminal(&line.line));
            } else {
                // Escaped like everything else: the agent may run on a
                // peer (`--json` gives the lines as they are).
                print_line(&crate::text::escape_for_terminal(&line.line));
            }
        }
        None => {}
    }
}

/// Prints the agent's kept output, read by offset until its end (an ended
/// agent) or until nothing more is there (a running one).
async fn logs(
    client: &mut pb::agent_control_client::AgentControlClient<tonic::transport::Channel>,
    connection: &Connection,
    agent_id: String,
    output: Output,
) -> Result<(), CliError> {
    let mut printer = OutputPrinter::new(output);
    let mut offset = 0;
    loop {
        let part = client
            .read_agent_output(connection.request(pb::ReadAgentOutputRequest {
                agent_id: agent_id.clone(),
                offset,
                max_bytes: 0,
            })?)
            .await
            .map_err(|status| connection.error(&status))?
            .into_inner();
        if !printer.print(&part) {
            return Ok(());
        }
        offset = part.next_offset;
    }
}

/// Prints the parts of an agent's output as `agent logs` reads them.
pub(super) struct OutputPrinter {
    output: Output,
    terminal: bool,
    printed: bool,
}

impl OutputPrinter {
    /// A printer to stdout, escaping for a terminal when stdout is one.
    pub(super) fn new(output: Output) -> Self {
        use std::io::IsTerminal as _;
        Self {
            output,
            terminal: std::io::stdout().is_terminal(),
            printed: false,
        }
    }

    /// Prints `part`; false when there is nothing more to read (its end, an
    /// empty part of a running agent, or a closed stdout).
    pub(super) fn print(&mut self, part: &pb::ReadAgentOutputResponse) -> bool {
        use std::io::Write as _;
        let more = !part.end && !part.data.is_empty();
        if !more && !part.end && self.printed {
            // Nothing new from a running agent: the last part said it all.
            return false;
        }
        self.printed = true;
        let mut stdout = std::io::stdout().lock();
        let written = if self.output.json {
            writeln!(
                stdout,
                "{}",
                json!({
                    "offset": part.offset,
                    "next_offset": part.next_offset,
                    "kept_bytes": part.kept_bytes,
                    "end": part.end,
                    "data": String::from_utf8_lossy(&part.data),
                })
            )
        } else if self.terminal {
            // The agent may run a peer's prompt: nothing it wrote reaches a
            // terminal unescaped (a pipe or a file gets the bytes).
            let text = String::from_utf8_lossy(&part.data);
            text.split_inclusive('\n').try_for_each(|line| {
                let escaped = crate::text::escape_for_terminal(line.trim_end_matches('\n'));
                let newline = if line.ends_with('\n') { "\n" } else { "" };
                write!(stdout, "{escaped}{newline}")
            })
        } else {
            stdout.write_all(&part.data)
        };
        let _ = stdout.flush();
        // A closed pipe (`| head`): the reader has what it wanted.
        written.is_ok() && more
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, not {text:?}"))
}

fn parse_state(text: &str) -> Result<pb::AgentState, String> {
    let upper = text.to_ascii_uppercase();
    pb::AgentState::from_str_name(&format!("AGENT_STATE_{upper}"))
        .filter(|state| *state != pb::AgentState::Unspecified)
        .ok_or_else(|| {
            format!("unknown state {text:?}; one of SPAWNING, RUNNING, COMPLETED, FAILED, KILLED, TIMED_OUT")
        })
}

fn state_name(state: i32) -> &'static str {
    pb::AgentState::try_from(state)
        .map(|state| state.as_str_name().trim_start_matches("AGENT_STATE_"))
        .unwrap_or("UNKNOWN")
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", field(reason))
    }
}

/// An agent as JSON (the shape `--json` prints, local or remote).
pub(super) fn agent_json(agent: &pb::Agent) -> serde_json::Value {
    let origin = agent.origin.clone().unwrap_or_default();
    json!({
        "agent_id": agent.agent_id,
        "agent_type": agent.agent_type,
        "state": state_name(agent.state),
        "state_reason": agent.state_reason,
        "prompt": agent.prompt,
        "task_id": agent.task_id,
        "labels": agent.labels,
        "origin": {
            "kind": pb::AgentOriginKind::try_from(origin.kind)
                .map(|kind| kind.as_str_name().trim_start_matches("AGENT_ORIGIN_KIND_"))
                .unwrap_or("UNKNOWN"),
            "instance_id": origin.instance_id,
            "workspace": origin.workspace,
        },
        "pid": agent.pid,
        "exit_code": agent.exit_code,
        "signal": agent.signal,
        "output_tail": agent.output_tail,
        "output_bytes": agent.output_bytes,
        "output_truncated": agent.output_truncated,
        "timeout_seconds": agent.timeout_seconds,
        "created_at_ms": agent.created_at.as_ref().map(ms_from_timestamp),
        "started_at_ms": agent.started_at.as_ref().map(ms_from_timestamp),
        "ended_at_ms": agent.ended_at.as_ref().map(ms_from_timestamp),
    })
}

fn print_agent(agent: &pb::Agent, output: Output) {
    output.print(&agent_json(agent), || agent_text(agent));
}

/// An agent for people: id, type, state, process and the last output lines.
pub(super) fn agent_text(agent: &pb::Agent) -> String {
    let mut text = format!(
        "agent:   {}\ntype:    {}\nstate:   {}{}",
        field(&agent.agent_id),
        field(&agent.agent_type),
        state_name(agent.state),
        reason_suffix(&agent.state_reason)
    );
    if let Some(pid) = agent.pid {
        text.push_str(&format!("\npid:     {pid}"));
    }
    if let Some(code) = agent.exit_code {
        text.push_str(&format!("\nexit:    {code}"));
    }
    if let Some(signal) = agent.signal {
        text.push_str(&format!("\nsignal:  {signal}"));
    }
    if !agent.task_id.is_empty() {
        text.push_str(&format!("\ntask:    {}", field(&agent.task_id)));
    }
    if !agent.output_tail.is_empty() {
        text.push_str(&format!(
            "\noutput ({} bytes{}), last lines:",
            agent.output_bytes,
            if agent.output_truncated {
                ", truncated"
            } else {
                ""
            }
        ));
        // One line each, whatever a peer put in them; tabs stay (they lay
        // out the agent's own output) and the rest is escaped on printing.
        for line in &agent.output_tail {
            text.push_str(&format!("\n  {}", line.replace('\n', "\\n")));
        }
    }
    text
}

/// Prints a page of agents: a table for people, or JSON.
pub(super) fn print_list(response: &pb::ListAgentsResponse, output: Output) {
    let value = list_json(
        "agents",
        response.agents.iter().map(agent_json).collect(),
        &response.next_page_token,
    );
    output.print(&value, || {
        let mut text = format!(
            "{:<36}  {:<12}  {:<10}  {:>8}  {}",
            "ID", "TYPE", "STATE", "PID", "REASON"
        );
        for agent in &response.agents {
            text.push_str(&format!(
                "\n{:<36}  {:<12}  {:<10}  {:>8}  {}",
                field(&agent.agent_id),
                field(&agent.agent_type),
                state_name(agent.state),
                agent.pid.map(|pid| pid.to_string()).unwrap_or_default(),
                field(&agent.state_reason)
            ));
        }
        if !response.next_page_token.is_empty() {
            text.push_str(&format!(
                "\n(more: --page-token {})",
                response.next_page_token
            ));
        }
        text
    });
}
