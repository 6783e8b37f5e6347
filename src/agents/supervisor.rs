//! One task per running agent: captures its output, enforces its timeout,
//! carries out a stop (SIGTERM to the group, SIGKILL after the grace period),
//! makes sure no process of its group outlives it, and records how it ended.

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::journal::Journal;
use super::model::{AgentEvent, AgentState, OutputStream};
use super::output::{LineSplitter, OutputBudget, Tail};
use super::process::{self, GroupGuard, GroupSignal};
use super::registry::{Registry, StopRequest, Tracked};
use crate::clock::now_ms;
use crate::config::AgentsConfig;
use crate::store::{Store, StoreError};

/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 8 * 1024;
/// How often the output tail is saved to the database while an agent runs.
const SAVE_OUTPUT_EVERY: Duration = Duration::from_secs(1);
/// How often the group is checked while waiting for its last processes.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// After SIGKILL, how long to wait for the group to disappear before giving up
/// (a process stuck in uninterruptible I/O dies later on its own).
const AFTER_KILL_WAIT: Duration = Duration::from_secs(5);
/// After the group is gone, how long to wait for the pipes to close: a process
/// that left the group (setsid) may hold them open.
const PIPE_DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Delay between attempts to record the end when the database fails.
const RECORD_RETRY: Duration = Duration::from_secs(1);

/// Everything a supervisor owns.
pub(super) struct Supervision {
    pub store: Store,
    pub settings: Arc<AgentsConfig>,
    pub registry: Arc<Registry>,
    pub tracked: Arc<Tracked>,
    pub child: Child,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub output_file: tokio::fs::File,
    /// The agent's event journal, its first events written by the spawn.
    pub journal: Journal,
    pub guard: GroupGuard,
    pub permit: OwnedSemaphorePermit,
    pub timeout: Duration,
}

/// A chunk of output from one of the pipes.
struct Chunk {
    stream: OutputStream,
    bytes: Vec<u8>,
}

/// Why the supervisor is stopping the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopCause {
    Requested(StopRequest),
    TimedOut,
    /// The main process ended and left others in its group.
    Stragglers,
}

/// A stop under way: SIGTERM sent, SIGKILL due at `kill_at`.
struct Stopping {
    cause: StopCause,
    kill_at: Instant,
    killed: bool,
}

/// The captured output of one agent.
struct Capture {
    file: tokio::fs::File,
    file_failed: bool,
    budget: OutputBudget,
    stdout_lines: LineSplitter,
    stderr_lines: LineSplitter,
    tail: Tail,
    changed: bool,
    journal: Journal,
}

impl Capture {
    async fn take(&mut self, chunk: Chunk, tracked: &Tracked) {
        let kept = self.budget.admit(chunk.bytes.len());
        if kept > 0
            && !self.file_failed
            && let Err(error) = self.file.write_all(&chunk.bytes[..kept]).await
        {
            // The record still gets the tail and the counts.
            tracing::warn!(%error, "cannot write agent output to its file");
            self.file_failed = true;
        }
        let splitter = match chunk.stream {
            OutputStream::Stdout => &mut self.stdout_lines,
            OutputStream::Stderr => &mut self.stderr_lines,
        };
        let lines = splitter.push(&chunk.bytes);
        self.publish(chunk.stream, lines, tracked).await;
        self.changed = true;
    }

    async fn finish(&mut self, tracked: &Tracked) {
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let splitter = match stream {
                OutputStream::Stdout => &mut self.stdout_lines,
                OutputStream::Stderr => &mut self.stderr_lines,
            };
            if let Some(line) = splitter.finish() {
                self.publish(stream, vec![line], tracked).await;
                self.changed = true;
            }
        }
    }

    /// Journals the lines, then tells watchers.
    async fn publish(&mut self, stream: OutputStream, lines: Vec<String>, tracked: &Tracked) {
        if lines.is_empty() {
            return;
        }
        let at_ms = now_ms();
        let events = lines
            .into_iter()
            .map(|line| {
                self.tail.push(line.clone());
                AgentEvent::Output {
                    stream,
                    line,
                    at_ms,
                }
            })
            .collect();
        tracked.publish(self.journal.append(events).await);
    }

    /// Copies the figures into the tracked record; true if they changed.
    fn sync(&mut self, tracked: &Tracked) -> bool {
        if !self.changed {
            return false;
        }
        self.changed = false;
        tracked.update_output(
            self.tail.to_vec(),
            self.budget.total_bytes,
            self.budget.truncated(),
        );
        true
    }
}

/// Supervises one agent until its end is recorded.
pub(super) async fn supervise(supervision: Supervision) {
    let Supervision {
        store,
        settings,
        registry,
        tracked,
        mut child,
        stdout,
        stderr,
        output_file,
        journal,
        mut guard,
        permit,
        timeout,
    } = supervision;
    let agent_id = tracked.snapshot().id;
    let Some(pgid) = child.id() else {
        // Unreachable in practice: start() checked the pid.
        return;
    };

    let (chunks_sender, mut chunks) = mpsc::channel::<Chunk>(64);
    let mut readers = Vec::new();
    if let Some(stdout) = stdout {
        readers.push(tokio::spawn(read_pipe(
            stdout,
            OutputStream::Stdout,
            chunks_sender.clone(),
        )));
    }
    if let Some(stderr) = stderr {
        readers.push(tokio::spawn(read_pipe(
            stderr,
            OutputStream::Stderr,
            chunks_sender.clone(),
        )));
    }
    drop(chunks_sender);

    let mut capture = Capture {
        file: output_file,
        file_failed: false,
        budget: OutputBudget::new(settings.output_cap_bytes),
        stdout_lines: LineSplitter::default(),
        stderr_lines: LineSplitter::default(),
        tail: Tail::new(settings.tail_lines),
        changed: false,
        journal,
    };
    let mut stop_requests = tracked.stop_requests();
    let deadline = Instant::now() + timeout;
    // A kill that came while the process was being started is already in the
    // channel, and a fresh receiver counts it as seen: act on it now.
    let early_request = stop_requests.borrow_and_update().clone();
    let mut stopping: Option<Stopping> = early_request
        .map(|request| begin_stop(pgid, StopCause::Requested(request), settings.kill_grace));
    let mut exit: Option<std::io::Result<ExitStatus>> = None;
    let mut pipes_open = true;
    let mut group_gone_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let mut save_tick = tokio::time::interval(SAVE_OUTPUT_EVERY);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if exit.is_some() && group_gone_at.is_some() && !pipes_open {
            break;
        }
        let kill_at = stopping
            .as_ref()
            .filter(|stopping| !stopping.killed)
            .map(|stopping| stopping.kill_at);
        let waiting_for_group = exit.is_some() && group_gone_at.is_none();
        tokio::select! {
            chunk = chunks.recv(), if pipes_open => match chunk {
                Some(chunk) => capture.take(chunk, &tracked).await,
                None => pipes_open = false,
            },
            status = child.wait(), if exit.is_none() => {
                exit = Some(status);
                if !process::group_is_alive(pgid) {
                    group_gone_at = Some(Instant::now());
                } else if stopping.is_none() {
                    tracing::debug!(agent.id = %agent_id, "the main process ended; stopping the rest of its group");
                    stopping = Some(begin_stop(pgid, StopCause::Stragglers, settings.kill_grace));
                }
            },
            () = tokio::time::sleep(GROUP_POLL), if waiting_for_group => {
                if give_up_at.is_none() && stopping.as_ref().is_some_and(|stopping| stopping.killed) {
                    give_up_at = Some(Instant::now() + AFTER_KILL_WAIT);
                }
                if !process::group_is_alive(pgid) {
                    group_gone_at = Some(Instant::now());
                } else if give_up_at.is_some_and(|at| Instant::now() >= at) {
                    tracing::warn!(agent.id = %agent_id, pgid, "processes of the agent's group survive SIGKILL; giving up on them");
                    group_gone_at = Some(Instant::now());
                }
            },
            () = tokio::time::sleep_until(group_gone_at.map_or(deadline, |at| at + PIPE_DRAIN_WAIT)), if group_gone_at.is_some() && pipes_open => {
                tracing::warn!(agent.id = %agent_id, "the agent's output pipes stay open after its group ended; closing them");
                pipes_open = false;
            },
            () = tokio::time::sleep_until(deadline), if stopping.is_none() && exit.is_none() => {
                tracing::info!(agent.id = %agent_id, timeout_secs = timeout.as_secs(), "agent timed out");
                stopping = Some(begin_stop(pgid, StopCause::TimedOut, settings.kill_grace));
            },
            changed = stop_requests.changed(), if stopping.is_none() => {
                match changed {
                    Ok(()) => {
                        let request = stop_requests.borrow_and_update().clone();
                        if let Some(request) = request {
                            stopping = Some(begin_stop(pgid, StopCause::Requested(request), settings.kill_grace));
                        }
                    }
                    // The runtime is gone; the guard kills the group on drop.
                    Err(_) => stopping = Some(begin_stop(pgid, StopCause::Requested(StopRequest::Shutdown), Duration::ZERO)),
                }
            },
            () = tokio::time::sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                if let Some(stopping) = stopping.as_mut() {
                    send(pgid, GroupSignal::Kill);
                    stopping.killed = true;
                    give_up_at = Some(Instant::now() + AFTER_KILL_WAIT);
                }
            },
            _ = save_tick.tick() => {
                if capture.sync(&tracked)
                    && let Err(error) = store.save_agent_output(&tracked.snapshot()).await
                {
                    tracing::debug!(agent.id = %agent_id, %error, "cannot save agent output yet");
                }
            },
        }
    }
    guard.disarm();
    for reader in readers {
        reader.abort();
    }
    capture.finish(&tracked).await;
    if let Err(error) = capture.file.flush().await {
        tracing::warn!(agent.id = %agent_id, %error, "cannot flush agent output");
    }
    capture.changed = true;
    capture.sync(&tracked);

    let mut ended = tracked.snapshot();
    let from = ended.state;
    let (state, reason) = outcome(
        exit,
        stopping.map(|stopping| stopping.cause),
        timeout,
        &mut ended,
    );
    let now = now_ms();
    ended.state = state;
    ended.state_reason = reason;
    ended.ended_at_ms = Some(now);
    ended.updated_at_ms = now;
    record_end(&store, from, &ended).await;
    tracing::info!(
        agent.id = %agent_id,
        state = %ended.state,
        exit_code = ended.exit_code,
        signal = ended.signal,
        "agent ended"
    );
    drop(permit);
    let event = AgentEvent::StateChanged {
        from: Some(from),
        agent: Box::new(ended),
    };
    tracked.publish(capture.journal.append(vec![event]).await);
    registry.remove(&agent_id);
}

/// Sends SIGTERM (or SIGKILL right away when there is no grace period).
fn begin_stop(pgid: u32, cause: StopCause, grace: Duration) -> Stopping {
    let now = Instant::now();
    if grace.is_zero() {
        send(pgid, GroupSignal::Kill);
    } else {
        send(pgid, GroupSignal::Terminate);
    }
    Stopping {
        cause,
        kill_at: now + grace,
        killed: grace.is_zero(),
    }
}

fn send(pgid: u32, signal: GroupSignal) {
    if let Err(error) = process::signal_group(pgid, signal) {
        tracing::warn!(pgid, ?signal, %error, "cannot signal an agent's process group");
    }
}

/// The terminal state and reason, from how the main process ended and why
/// the supervisor was stopping it; fills in the exit code and signal.
fn outcome(
    exit: Option<std::io::Result<ExitStatus>>,
    cause: Option<StopCause>,
    timeout: Duration,
    ended: &mut super::model::AgentRecord,
) -> (AgentState, String) {
    if let Some(Ok(status)) = &exit {
        ended.exit_code = status.code();
        ended.signal = status.signal();
    }
    match (cause, exit) {
        (Some(StopCause::Requested(StopRequest::Kill(reason))), _) => (AgentState::Killed, reason),
        (Some(StopCause::Requested(StopRequest::Shutdown)), _) => (
            AgentState::Failed,
            "the daemon shut down while the agent ran; it was stopped".to_owned(),
        ),
        (Some(StopCause::TimedOut), _) => (
            AgentState::TimedOut,
            format!(
                "ran past its timeout of {} s and was stopped",
                timeout.as_secs()
            ),
        ),
        (_, Some(Err(error))) => (
            AgentState::Failed,
            format!("lost track of the process: {error}"),
        ),
        (_, None) => (AgentState::Failed, "lost track of the process".to_owned()),
        (_, Some(Ok(status))) => match (status.code(), status.signal()) {
            (Some(0), _) => (AgentState::Completed, "exited with code 0".to_owned()),
            (Some(code), _) => (AgentState::Failed, format!("exited with code {code}")),
            (None, Some(signal)) => (AgentState::Failed, format!("ended by signal {signal}")),
            (None, None) => (AgentState::Failed, "ended without an exit code".to_owned()),
        },
    }
}

/// Records the end, retrying while the database is unavailable. A conflict
/// means someone else already settled the agent: nothing more to do.
async fn record_end(store: &Store, from: AgentState, ended: &super::model::AgentRecord) {
    loop {
        match store.record_agent_transition(from, ended).await {
            Ok(()) => return,
            Err(StoreError::Conflict(conflict)) => {
                tracing::warn!(agent.id = %ended.id, %conflict, "agent end already recorded elsewhere");
                return;
            }
            Err(error) => {
                tracing::warn!(agent.id = %ended.id, %error, "cannot record the agent's end yet; retrying");
                tokio::time::sleep(RECORD_RETRY).await;
            }
        }
    }
}

/// Forwards a pipe's bytes as chunks until end of file.
async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    stream: OutputStream,
    sender: mpsc::Sender<Chunk>,
) {
    let mut buffer = vec![0_u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                let chunk = Chunk {
                    stream,
                    bytes: buffer[..read].to_vec(),
                };
                if sender.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::{AgentRecord, Origin};

    fn record() -> AgentRecord {
        AgentRecord {
            id: "a".to_owned(),
            agent_type: "sh".to_owned(),
            state: AgentState::Running,
            state_reason: String::new(),
            prompt: String::new(),
            task_id: String::new(),
            labels: Default::default(),
            origin: Origin::Local,
            runner_id: "r".to_owned(),
            pid: Some(1),
            exit_code: None,
            signal: None,
            output_tail: Vec::new(),
            output_bytes: 0,
            output_truncated: false,
            timeout_secs: 5,
            created_at_ms: 0,
            started_at_ms: Some(0),
            ended_at_ms: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn the_outcome_follows_the_exit_unless_the_supervisor_stopped_it() {
        let timeout = Duration::from_secs(5);
        let exited = |code: i32| Some(Ok(ExitStatus::from_raw(code << 8)));
        let signalled = |signal: i32| Some(Ok(ExitStatus::from_raw(signal)));
        let mut agent = record();
        assert_eq!(
            outcome(exited(0), None, timeout, &mut agent).0,
            AgentState::Completed
        );
        assert_eq!(agent.exit_code, Some(0));
        let (state, reason) = outcome(exited(3), None, timeout, &mut agent);
        assert_eq!(
            (state, reason.as_str()),
            (AgentState::Failed, "exited with code 3")
        );
        let mut agent = record();
        let (state, _) = outcome(signalled(9), None, timeout, &mut agent);
        assert_eq!(
            (state, agent.signal, agent.exit_code),
            (AgentState::Failed, Some(9), None)
        );
        let kill = Some(StopCause::Requested(StopRequest::Kill("enough".to_owned())));
        assert_eq!(
            outcome(signalled(15), kill, timeout, &mut record()),
            (AgentState::Killed, "enough".to_owned())
        );
        assert_eq!(
            outcome(
                signalled(15),
                Some(StopCause::TimedOut),
                timeout,
                &mut record()
            )
            .0,
            AgentState::TimedOut
        );
        // Stragglers killed after a clean exit do not change the verdict.
        assert_eq!(
            outcome(
                exited(0),
                Some(StopCause::Stragglers),
                timeout,
                &mut record()
            )
            .0,
            AgentState::Completed
        );
        assert_eq!(
            outcome(
                signalled(15),
                Some(StopCause::Requested(StopRequest::Shutdown)),
                timeout,
                &mut record()
            )
            .0,
            AgentState::Failed
        );
    }
}
