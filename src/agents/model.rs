//! The agent domain: states and their legal transitions, origins, the agent
//! record, spawn specifications, list filters and watch events. Pure: no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

/// Where an agent is in its lifecycle: `Spawning`, then `Running`, then one
/// terminal state. Each state is entered at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AgentState {
    /// Recorded; the process is being started.
    Spawning,
    /// The process runs.
    Running,
    /// Terminal: the process exited with code 0.
    Completed,
    /// Terminal: non-zero exit, a signal not sent by a kill, a failed start,
    /// or a process lost to a daemon restart or shutdown.
    Failed,
    /// Terminal: stopped by a kill request.
    Killed,
    /// Terminal: stopped because it ran past its timeout.
    TimedOut,
}

impl AgentState {
    /// Every state, in lifecycle order.
    pub const ALL: [AgentState; 6] = [
        AgentState::Spawning,
        AgentState::Running,
        AgentState::Completed,
        AgentState::Failed,
        AgentState::Killed,
        AgentState::TimedOut,
    ];

    /// The stored (and printed) name, e.g. `RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Spawning => "SPAWNING",
            AgentState::Running => "RUNNING",
            AgentState::Completed => "COMPLETED",
            AgentState::Failed => "FAILED",
            AgentState::Killed => "KILLED",
            AgentState::TimedOut => "TIMED_OUT",
        }
    }

    /// The state named `name` (as written by [`AgentState::as_str`]).
    pub fn parse(name: &str) -> Option<AgentState> {
        AgentState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }

    /// True for `Completed`, `Failed`, `Killed` and `TimedOut`.
    pub fn is_terminal(self) -> bool {
        !matches!(self, AgentState::Spawning | AgentState::Running)
    }

    /// Whether an agent in `self` may move to `next`.
    ///
    /// A process that never started can fail or be killed while spawning,
    /// but cannot complete or time out; terminal states never change.
    pub fn can_become(self, next: AgentState) -> bool {
        match self {
            AgentState::Spawning => matches!(
                next,
                AgentState::Running | AgentState::Failed | AgentState::Killed
            ),
            AgentState::Running => next.is_terminal(),
            _ => false,
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Who asked for an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A caller of this instance (AgentControl, the coordinator, the CLI).
    Local,
    /// A federated peer, through a signed command.
    Peer {
        /// The peer's instance id.
        instance_id: String,
        /// The federation workspace through which it asked.
        workspace: String,
    },
}

/// The kind of an [`Origin`], for filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OriginKind {
    /// [`Origin::Local`].
    Local,
    /// [`Origin::Peer`].
    Peer,
}

impl OriginKind {
    /// The stored name: `LOCAL` or `PEER`.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginKind::Local => "LOCAL",
            OriginKind::Peer => "PEER",
        }
    }
}

impl Origin {
    /// Local or peer.
    pub fn kind(&self) -> OriginKind {
        match self {
            Origin::Local => OriginKind::Local,
            Origin::Peer { .. } => OriginKind::Peer,
        }
    }
}

/// An agent as recorded: what was asked, where it is, what it printed.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// Unique id (a UUID v7, so ids sort by creation).
    pub id: String,
    /// The configured agent type.
    pub agent_type: String,
    /// Current state.
    pub state: AgentState,
    /// Why it is in that state; may be empty.
    pub state_reason: String,
    /// The prompt given.
    pub prompt: String,
    /// The caller's task id; may be empty.
    pub task_id: String,
    /// Labels from the spawn request.
    pub labels: BTreeMap<String, String>,
    /// Who asked for it.
    pub origin: Origin,
    /// The daemon that supervises its process (see `runtime::runner_id`).
    pub runner_id: String,
    /// Process (and process group) id, once started.
    pub pid: Option<u32>,
    /// Exit code, when the process exited on its own.
    pub exit_code: Option<i32>,
    /// The signal that ended the process, when one did.
    pub signal: Option<i32>,
    /// The last lines of output.
    pub output_tail: Vec<String>,
    /// Bytes of output written so far (captured or not).
    pub output_bytes: u64,
    /// True when output went past the capture cap.
    pub output_truncated: bool,
    /// The wall-clock limit in seconds.
    pub timeout_secs: u32,
    /// When recorded (epoch ms).
    pub created_at_ms: i64,
    /// When the process started.
    pub started_at_ms: Option<i64>,
    /// When it reached a terminal state.
    pub ended_at_ms: Option<i64>,
    /// When the record last changed.
    pub updated_at_ms: i64,
}

/// A persisted state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTransition {
    /// The agent.
    pub agent_id: String,
    /// The state before; `None` for the first (`Spawning`).
    pub from: Option<AgentState>,
    /// The state entered.
    pub to: AgentState,
    /// Why.
    pub reason: String,
    /// When (epoch ms).
    pub at_ms: i64,
}

/// What to start: the in-process entry point shared by AgentControl and the
/// federation's `agent.spawn` command.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnSpec {
    /// A configured agent type.
    pub agent_type: String,
    /// Substituted for `{prompt}`.
    pub prompt: String,
    /// The caller's task id, substituted for `{task_id}`; may be empty.
    pub task_id: String,
    /// Labels to store.
    pub labels: BTreeMap<String, String>,
    /// Wall-clock limit; `None` for the type's.
    pub timeout: Option<Duration>,
    /// Who asks.
    pub origin: Origin,
}

/// Filters of [`crate::agents::AgentRuntime::list`]; `None` and empty match
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Only this state.
    pub state: Option<AgentState>,
    /// Only this type.
    pub agent_type: Option<String>,
    /// Only this origin kind.
    pub origin_kind: Option<OriginKind>,
    /// Only agents spawned by this peer instance.
    pub origin_instance_id: Option<String>,
    /// Only agents spawned through this workspace.
    pub origin_workspace: Option<String>,
    /// Only agents carrying all of these labels.
    pub labels: BTreeMap<String, String>,
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One thing a watcher sees.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The agent changed state (or, first in a watch, its current state with
    /// `from: None`).
    StateChanged {
        /// State before; `None` in the first event of a watch.
        from: Option<AgentState>,
        /// The agent after the change.
        agent: Box<AgentRecord>,
    },
    /// The agent wrote a line.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The line without its newline; invalid UTF-8 replaced.
        line: String,
        /// When captured (epoch ms).
        at_ms: i64,
    },
}

impl AgentEvent {
    /// True for a change into a terminal state: the last event of a watch.
    pub fn is_final(&self) -> bool {
        matches!(self, AgentEvent::StateChanged { agent, .. } if agent.state.is_terminal())
    }
}

/// An [`AgentEvent`] with its place in the agent's history: sequences start
/// at 1 (the agent recorded, SPAWNING) and grow by one per event, so a
/// watcher resumes after the last one it saw. `0` numbers nothing: the
/// current state of an agent whose events are no longer kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencedEvent {
    /// The event's sequence.
    pub sequence: u64,
    /// What happened.
    pub event: AgentEvent,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// The agent's current state first, then what happens next.
    Now,
    /// Every event with this sequence or a later one (1: from the start).
    Sequence(u64),
}

/// A part of an agent's captured output, as `ReadAgentOutput` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The bytes, as the agent wrote them (stdout and stderr interleaved).
    pub data: Vec<u8>,
    /// Where they start in the output.
    pub offset: u64,
    /// Where the next read starts.
    pub next_offset: u64,
    /// Bytes of output kept now.
    pub kept_bytes: u64,
    /// The agent has ended and this read reached the end of its output.
    pub end: bool,
}

/// The runtime's load, for the coordinator's Health RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeStatus {
    /// Agents this daemon supervises now (spawning or running).
    pub running: usize,
    /// The configured cap on concurrent agents.
    pub capacity: usize,
}

impl RuntimeStatus {
    /// True when a spawn would be refused for lack of room.
    pub fn is_full(&self) -> bool {
        self.running >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in AgentState::ALL {
            assert_eq!(AgentState::parse(state.as_str()), Some(state));
        }
        assert_eq!(AgentState::parse("running"), None);
        assert_eq!(AgentState::parse(""), None);
    }

    #[test]
    fn only_the_documented_transitions_are_legal() {
        use AgentState::*;
        let legal = [
            (Spawning, Running),
            (Spawning, Failed),
            (Spawning, Killed),
            (Running, Completed),
            (Running, Failed),
            (Running, Killed),
            (Running, TimedOut),
        ];
        for from in AgentState::ALL {
            for to in AgentState::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn terminal_states_are_the_four_ends() {
        let terminal: Vec<_> = AgentState::ALL
            .into_iter()
            .filter(|state| state.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                AgentState::Completed,
                AgentState::Failed,
                AgentState::Killed,
                AgentState::TimedOut
            ]
        );
    }
}
