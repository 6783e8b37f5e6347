//! `mosaicd job create | dispatch | get | history | list | status | progress |
//! complete | fail | cancel | watch`: the Coordinator's job API from the
//! command line.

use clap::Subcommand;
use serde_json::json;

use super::client::{ClientArgs, Connection};
use super::exit::{CliError, Output, list_json};
use super::serve::load_config;
use crate::clock::ms_from_timestamp;
use crate::config::ConfigArgs;
use crate::coordinator::state::JobState;
use crate::proto::coordinator as pb;
use crate::proto::coordinator::coordinator_client::CoordinatorClient;
use crate::text::escape_field as field;

/// `mosaicd job ...` (API key with the `coordinator` scope).
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a PENDING job.
    Create {
        /// Kind of work, e.g. `review`.
        #[arg(long = "type", value_name = "TYPE")]
        job_type: String,
        /// Workspace the job belongs to.
        #[arg(long, default_value = "")]
        workspace: String,
        /// Job input as a JSON document.
        #[arg(long, default_value = "", value_name = "JSON")]
        payload: String,
        /// Priority; higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// A label, `NAME=VALUE`; repeat for more.
        #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Makes retries safe: the same key returns the first job.
        #[arg(long, default_value = "", value_name = "KEY")]
        idempotency_key: String,
    },
    /// Create a job and start an agent for it in one call, here or with
    /// --peer on a connected peer (API key with the `webhook` scope). The job
    /// is RUNNING with its agent, and follows it to its end (`job watch ID`).
    Dispatch {
        /// Kind of work, e.g. `review`.
        #[arg(long = "type", value_name = "TYPE")]
        job_type: String,
        /// The agent type to start: a `[agents.types.NAME]` of the daemon's
        /// configuration (with --peer, of the peer's).
        #[arg(long, value_name = "TYPE")]
        agent_type: String,
        /// The task given to the agent (its `{prompt}`).
        #[arg(long, default_value = "")]
        prompt: String,
        /// Run the agent on this peer: its instance id (`mosaicd peer list`
        /// shows it) [default: on this instance].
        #[arg(long, value_name = "INSTANCE_ID")]
        peer: Option<String>,
        /// Workspace of the job; with --peer, the workspace of the connection
        /// (needed only when the peer is connected in several).
        #[arg(long, default_value = "")]
        workspace: String,
        /// Job input as a JSON document.
        #[arg(long, default_value = "", value_name = "JSON")]
        payload: String,
        /// Priority; higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// A label, `NAME=VALUE`, on the job and its agent; repeat for more.
        #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Makes retries safe: the same key returns the first job and agent
        /// and starts nothing [default: a new UUID, printed when the call
        /// fails in a way worth retrying].
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Show one job.
    Get {
        /// The job id.
        id: String,
    },
    /// Show every recorded change of one job, oldest first.
    History {
        /// The job id.
        id: String,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (pending, running, completed, failed, cancelled).
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only jobs of this type.
        #[arg(long = "type", default_value = "", value_name = "TYPE")]
        job_type: String,
        /// Only jobs in this workspace.
        #[arg(long, default_value = "")]
        workspace: String,
        /// Only jobs with this label, `NAME=VALUE`; repeat for more.
        #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Jobs per page [default: 50, at most 500].
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// The next_page_token printed by a previous list.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Move a job to another state (running, completed, failed, cancelled).
    Status {
        /// The job id.
        id: String,
        /// The new state.
        #[arg(value_parser = parse_state)]
        state: JobState,
        /// Why; recorded in the history (and as the error when failed).
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Record the progress (0 to 100) of a running job.
    Progress {
        /// The job id.
        id: String,
        /// Percent done; never lower than before.
        percent: u32,
        /// What is happening now.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Mark a running job completed.
    Complete {
        /// The job id.
        id: String,
        /// The result as a JSON document.
        #[arg(long, default_value = "", value_name = "JSON")]
        result: String,
    },
    /// Mark a pending or running job failed.
    Fail {
        /// The job id.
        id: String,
        /// What went wrong.
        #[arg(long)]
        error: String,
    },
    /// Cancel a pending or running job.
    Cancel {
        /// The job id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Follow a job's changes until it ends (one JSON object per line with --json).
    Watch {
        /// The job id.
        id: String,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

fn parse_state(text: &str) -> Result<JobState, String> {
    JobState::parse(text).ok_or_else(|| {
        format!("{text:?} is not a job state (pending, running, completed, failed, cancelled)")
    })
}

fn state_name(value: i32) -> &'static str {
    crate::coordinator::convert::state_from_proto(value).map_or("UNSPECIFIED", JobState::as_str)
}

fn job_json(job: &pb::Job) -> serde_json::Value {
    let ms = |timestamp: &Option<prost_types::Timestamp>| timestamp.as_ref().map(ms_from_timestamp);
    json!({
        "job_id": job.job_id,
        "job_type": job.job_type,
        "workspace": job.workspace,
        "state": state_name(job.state),
        "progress": job.progress,
        "progress_message": job.progress_message,
        "priority": job.priority,
        "labels": job.labels,
        "payload_json": job.payload_json,
        "result_json": job.result_json,
        "error": job.error,
        "created_by": job.created_by,
        "agent_id": job.agent_id,
        "peer_instance_id": job.peer_instance_id,
        "idempotency_key": job.idempotency_key,
        "created_at_ms": ms(&job.created_at),
        "updated_at_ms": ms(&job.updated_at),
        "started_at_ms": ms(&job.started_at),
        "ended_at_ms": ms(&job.ended_at),
    })
}

fn entry_json(entry: &pb::JobHistoryEntry) -> serde_json::Value {
    json!({
        "sequence": entry.sequence,
        "from_state": (entry.from_state != 0).then(|| state_name(entry.from_state)),
        "to_state": state_name(entry.to_state),
        "progress": entry.progress,
        "message": entry.message,
        "actor": entry.actor,
        "at_ms": entry.at.as_ref().map(ms_from_timestamp),
    })
}

fn job_text(job: &pb::Job) -> String {
    let mut text = format!(
        "{}  {}  {}  {}%",
        field(&job.job_id),
        field(&job.job_type),
        state_name(job.state),
        job.progress
    );
    // Messages and results come from agents and peers: each stays on its
    // line, so none can pass for another job.
    if !job.progress_message.is_empty() {
        text.push_str(&format!("  {}", field(&job.progress_message)));
    }
    if !job.error.is_empty() {
        text.push_str(&format!("\nerror: {}", field(&job.error)));
    }
    if !job.result_json.is_empty() {
        text.push_str(&format!("\nresult: {}", field(&job.result_json)));
    }
    text
}

fn entry_text(entry: &pb::JobHistoryEntry) -> String {
    let from = if entry.from_state == 0 {
        "created".to_owned()
    } else {
        state_name(entry.from_state).to_owned()
    };
    format!(
        "#{} {} -> {} {}% by {}{}",
        entry.sequence,
        from,
        state_name(entry.to_state),
        entry.progress,
        field(&entry.actor),
        if entry.message.is_empty() {
            String::new()
        } else {
            format!(": {}", field(&entry.message))
        }
    )
}

fn print_job(output: Output, job: Option<pb::Job>) -> Result<(), CliError> {
    let job = job.ok_or_else(|| CliError::failure("the daemon answered without a job"))?;
    output.print(&job_json(&job), || job_text(&job));
    Ok(())
}

/// Runs one `job` subcommand against the daemon.
pub async fn run(
    args: &ConfigArgs,
    client_args: &ClientArgs,
    command: JobCommand,
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(args)?;
    let connection = super::client::connect(&config, client_args).await?;
    let mut client = CoordinatorClient::new(connection.channel.clone());
    let failed = |status: tonic::Status| connection.error(&status);
    match command {
        JobCommand::Create {
            job_type,
            workspace,
            payload,
            priority,
            labels,
            idempotency_key,
        } => {
            let response = client
                .create_job(connection.request(pb::CreateJobRequest {
                    job_type,
                    workspace,
                    payload_json: payload,
                    priority,
                    labels: labels.into_iter().collect(),
                    idempotency_key,
                })?)
                .await
                .map_err(failed)?
                .into_inner();
            let job = response
                .job
                .ok_or_else(|| CliError::failure("the daemon answered without a job"))?;
            let mut value = job_json(&job);
            value["created"] = json!(response.created);
            output.print(&value, || {
                let note = if response.created {
                    ""
                } else {
                    "  (existing job for this idempotency key)"
                };
                format!("{}{note}", job_text(&job))
            });
            Ok(())
        }
        JobCommand::Dispatch {
            job_type,
            agent_type,
            prompt,
            peer,
            workspace,
            payload,
            priority,
            labels,
            idempotency_key,
        } => {
            let idempotency_key =
                idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let request = pb::DispatchJobRequest {
                job_type,
                workspace,
                payload_json: payload,
                priority,
                labels: labels.into_iter().collect(),
                agent_type,
                prompt,
                peer_instance_id: peer.clone().unwrap_or_default(),
                idempotency_key: idempotency_key.clone(),
            };
            let response = client
                .dispatch_job(connection.request(request)?)
                .await
                .map_err(|status| {
                    dispatch_error(&connection, &status, peer.as_deref(), &idempotency_key)
                })?
                .into_inner();
            print_dispatched(output, response)
        }
        JobCommand::Get { id } => {
            let response = client
                .get_job(connection.request(pb::GetJobRequest { job_id: id })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::History { id } => {
            let entries = client
                .get_job_history(connection.request(pb::GetJobHistoryRequest { job_id: id })?)
                .await
                .map_err(failed)?
                .into_inner()
                .entries;
            output.print(
                &list_json("entries", entries.iter().map(entry_json).collect(), ""),
                || {
                    entries
                        .iter()
                        .map(entry_text)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            Ok(())
        }
        JobCommand::List {
            state,
            job_type,
            workspace,
            labels,
            limit,
            page_token,
        } => {
            let response = client
                .list_jobs(connection.request(pb::ListJobsRequest {
                    state: state.map_or(0, |state| {
                        crate::coordinator::convert::state_to_proto(state).into()
                    }),
                    job_type,
                    workspace,
                    labels: labels.into_iter().collect(),
                    page_size: limit,
                    page_token,
                })?)
                .await
                .map_err(failed)?
                .into_inner();
            output.print(
                &list_json(
                    "jobs",
                    response.jobs.iter().map(job_json).collect(),
                    &response.next_page_token,
                ),
                || {
                    let mut lines: Vec<String> = response.jobs.iter().map(job_text).collect();
                    if lines.is_empty() {
                        lines.push("no jobs".to_owned());
                    }
                    if !response.next_page_token.is_empty() {
                        lines.push(format!("more: --page-token {}", response.next_page_token));
                    }
                    lines.join("\n")
                },
            );
            Ok(())
        }
        JobCommand::Status { id, state, message } => {
            let response = client
                .update_job_status(connection.request(pb::UpdateJobStatusRequest {
                    job_id: id,
                    state: crate::coordinator::convert::state_to_proto(state).into(),
                    message,
                })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::Progress {
            id,
            percent,
            message,
        } => {
            let response = client
                .update_job_progress(connection.request(pb::UpdateJobProgressRequest {
                    job_id: id,
                    progress: percent,
                    message,
                })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::Complete { id, result } => {
            let response = client
                .complete_job(connection.request(pb::CompleteJobRequest {
                    job_id: id,
                    result_json: result,
                })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::Fail { id, error } => {
            let response = client
                .fail_job(connection.request(pb::FailJobRequest { job_id: id, error })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::Cancel { id, reason } => {
            let response = client
                .cancel_job(connection.request(pb::CancelJobRequest { job_id: id, reason })?)
                .await
                .map_err(failed)?;
            print_job(output, response.into_inner().job)
        }
        JobCommand::Watch { id } => watch(&connection, &mut client, id, output).await,
    }
}

/// A refused or failed dispatch: the daemon's (or the peer's) answer, with
/// what to do next where it is not obvious.
fn dispatch_error(
    connection: &Connection,
    status: &tonic::Status,
    peer: Option<&str>,
    idempotency_key: &str,
) -> CliError {
    use tonic::Code;
    let retryable = matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded);
    let mut error = match peer {
        Some(peer) if retryable => connection.remote_error(status, peer, peer),
        _ => connection.error(status),
    };
    match status.code() {
        Code::PermissionDenied if status.message().contains("`webhook` scope") => {
            error.message.push_str(
                " — bots' keys have it: `mosaicd apikey create --name bot --scope webhook`",
            );
        }
        Code::NotFound if peer.is_some() => error.message.push_str(
            " — --peer takes the peer's instance id; `mosaicd peer list` shows the peers",
        ),
        _ => {}
    }
    if retryable {
        if peer.is_some() {
            error.message.push_str(
                "; if the job was created it stays PENDING and the daemon sends the spawn again",
            );
        }
        error.message.push_str(&format!(
            "; run the same dispatch with --idempotency-key {idempotency_key} to get the job without starting a second agent"
        ));
    }
    error
}

fn print_dispatched(output: Output, response: pb::DispatchJobResponse) -> Result<(), CliError> {
    let job = response
        .job
        .ok_or_else(|| CliError::failure("the daemon answered without a job"))?;
    let mut value = job_json(&job);
    value["created"] = json!(response.created);
    output.print(&value, || {
        let place = if job.peer_instance_id.is_empty() {
            String::new()
        } else {
            format!(" on peer {}", field(&job.peer_instance_id))
        };
        let note = if response.created {
            ""
        } else {
            "  (existing job for this idempotency key)"
        };
        format!(
            "{}{note}\nagent: {}{place}\nfollow it: mosaicd job watch {}",
            job_text(&job),
            field(&response.agent_id),
            field(&job.job_id)
        )
    });
    Ok(())
}

/// Prints each change as it comes, one line (or one JSON object) each.
async fn watch(
    connection: &Connection,
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    id: String,
    output: Output,
) -> Result<(), CliError> {
    let mut stream = client
        .watch_job(connection.request(pb::WatchJobRequest { job_id: id })?)
        .await
        .map_err(|status| connection.error(&status))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| connection.error(&status))?
    {
        let entry = message.entry.unwrap_or_default();
        let job = message.job.unwrap_or_default();
        if output.json {
            super::exit::print_line(
                &json!({ "entry": entry_json(&entry), "job": job_json(&job) }).to_string(),
            );
        } else {
            super::exit::print_line(&crate::text::escape_for_terminal(&entry_text(&entry)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_message_or_error_cannot_pass_for_another_job() {
        let job = pb::Job {
            job_id: "j1".to_owned(),
            job_type: "build".to_owned(),
            progress_message: "half\nj2  build  COMPLETED  100%".to_owned(),
            error: "boom\r\u{1b}[2J".to_owned(),
            ..pb::Job::default()
        };
        let text = job_text(&job);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("half\\nj2  build  COMPLETED  100%"), "{text}");
        assert!(text.ends_with("error: boom\\r\\u{1b}[2J"), "{text}");
    }

    #[test]
    fn labels_and_states_parse_with_clear_errors() {
        assert_eq!(
            parse_label("team=red=blue"),
            Ok(("team".to_owned(), "red=blue".to_owned()))
        );
        assert!(parse_label("=x").is_err());
        assert!(parse_label("novalue").is_err());
        assert_eq!(parse_state("running"), Ok(JobState::Running));
        assert!(parse_state("done").unwrap_err().contains("pending"));
    }
}
