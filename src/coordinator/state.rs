//! The job state machine: which changes are legal from which state, and what a
//! legal change does to a job. Pure logic: no I/O, no tonic, no clock.
//!
//! ```text
//! PENDING ──► RUNNING ──► COMPLETED
//!    │           ├──────► FAILED
//!    │           └──────► CANCELLED
//!    ├──────────────────► FAILED
//!    └──────────────────► CANCELLED
//! ```
//!
//! The three terminal states never change. Progress (0 to 100) is accepted only
//! while RUNNING and never goes back; completing sets it to 100.

use std::fmt;

use crate::store::{JobHistoryRecord, JobRecord};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Created, not started.
    Pending,
    /// Being worked on.
    Running,
    /// Terminal: finished with a result.
    Completed,
    /// Terminal: finished with an error.
    Failed,
    /// Terminal: cancelled before it finished.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] = [
        JobState::Pending,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The state's name as stored and shown: `PENDING`, `RUNNING`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    /// The state named `text` (case-insensitive), if any.
    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(text.trim()))
    }

    /// Whether the job has ended: nothing about it changes any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether the machine allows moving from `self` to `to`.
    pub fn can_move_to(self, to: JobState) -> bool {
        matches!(
            (self, to),
            (
                JobState::Pending,
                JobState::Running | JobState::Failed | JobState::Cancelled
            ) | (
                JobState::Running,
                JobState::Completed | JobState::Failed | JobState::Cancelled
            )
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A progress value, 0 to 100 inclusive: out-of-range values cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Percent(u8);

impl Percent {
    /// Done.
    pub const COMPLETE: Percent = Percent(100);

    /// `value` as a percentage, or `None` above 100.
    pub fn new(value: u32) -> Option<Percent> {
        u8::try_from(value)
            .ok()
            .filter(|value| *value <= 100)
            .map(Percent)
    }

    /// The value, 0 to 100.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// A change someone asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobChange {
    /// PENDING to RUNNING.
    Start {
        /// Recorded in the history entry.
        message: String,
    },
    /// PENDING to RUNNING because an agent was started for the job
    /// (`DispatchJob`): the job records the agent.
    AttachAgent {
        /// The agent's id.
        agent_id: String,
        /// The peer running it; empty for a local agent.
        peer_instance_id: String,
    },
    /// New progress while RUNNING.
    Progress {
        /// Not lower than the current progress.
        percent: Percent,
        /// Becomes the job's progress message.
        message: String,
    },
    /// RUNNING to COMPLETED; progress becomes 100.
    Complete {
        /// The result as a JSON document, already validated; may be empty.
        result_json: String,
    },
    /// PENDING or RUNNING to FAILED.
    Fail {
        /// What went wrong; becomes the job's error.
        error: String,
    },
    /// PENDING or RUNNING to CANCELLED.
    Cancel {
        /// Why; recorded in the history entry.
        reason: String,
    },
}

impl JobChange {
    /// The state this change moves to, or `None` for a progress update.
    pub fn target(&self) -> Option<JobState> {
        match self {
            JobChange::Start { .. } | JobChange::AttachAgent { .. } => Some(JobState::Running),
            JobChange::Progress { .. } => None,
            JobChange::Complete { .. } => Some(JobState::Completed),
            JobChange::Fail { .. } => Some(JobState::Failed),
            JobChange::Cancel { .. } => Some(JobState::Cancelled),
        }
    }

    /// The change `UpdateJobStatus` means when it names `state`, with its
    /// message; `None` for PENDING, which no change leads back to.
    pub fn to_state(state: JobState, message: String) -> Option<JobChange> {
        match state {
            JobState::Pending => None,
            JobState::Running => Some(JobChange::Start { message }),
            JobState::Completed => Some(JobChange::Complete {
                result_json: String::new(),
            }),
            JobState::Failed => Some(JobChange::Fail { error: message }),
            JobState::Cancelled => Some(JobChange::Cancel { reason: message }),
        }
    }
}

/// Why the machine refused a change. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The state change is not an edge of the machine.
    #[error("a {from} job cannot become {to}")]
    Illegal {
        /// The job's state.
        from: JobState,
        /// The state asked for.
        to: JobState,
    },
    /// Progress was reported for a job that is not RUNNING.
    #[error("progress is accepted only while a job is RUNNING; this job is {state}")]
    ProgressNotRunning {
        /// The job's state.
        state: JobState,
    },
    /// Progress lower than what was already reported.
    #[error("progress never goes back: the job is at {current}%, not {requested}%")]
    ProgressBackwards {
        /// The job's progress.
        current: u8,
        /// The progress asked for.
        requested: u8,
    },
}

/// What a legal change writes into a job, whatever else the job holds. The
/// store applies it to the stored row (and adds one to the version); `apply`
/// applies it to a job in memory. Both therefore write the same fields.
///
/// `None` leaves a field as it is: no change ever clears one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobWrite {
    /// The state after the change (RUNNING for progress, which keeps it).
    pub to_state: JobState,
    pub progress: Option<Percent>,
    pub progress_message: Option<String>,
    pub result_json: Option<String>,
    pub error: Option<String>,
    pub agent_id: Option<String>,
    pub peer_instance_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// The job's new `updated_at_ms` and the history entry's time.
    pub at_ms: i64,
    /// The history entry's message.
    pub message: String,
    /// The history entry's actor.
    pub actor: String,
}

impl JobWrite {
    /// The history entry that records this write: `job_after` is the job
    /// with it applied (its version is the entry's sequence), `from` the
    /// state the job was in.
    pub fn entry(&self, job_after: &JobRecord, from: JobState) -> JobHistoryRecord {
        JobHistoryRecord {
            job_id: job_after.id.clone(),
            sequence: job_after.version,
            from_state: Some(from),
            to_state: job_after.state,
            progress: job_after.progress,
            message: self.message.clone(),
            actor: self.actor.clone(),
            at_ms: self.at_ms,
        }
    }

    /// `job` with this write applied and its version one higher.
    fn applied_to(&self, job: &JobRecord) -> JobRecord {
        let mut next = job.clone();
        next.state = self.to_state;
        let set = |field: &mut String, value: &Option<String>| {
            if let Some(value) = value {
                field.clone_from(value);
            }
        };
        if let Some(progress) = self.progress {
            next.progress = progress;
        }
        set(&mut next.progress_message, &self.progress_message);
        set(&mut next.result_json, &self.result_json);
        set(&mut next.error, &self.error);
        set(&mut next.agent_id, &self.agent_id);
        set(&mut next.peer_instance_id, &self.peer_instance_id);
        next.started_at_ms = self.started_at_ms.or(job.started_at_ms);
        next.ended_at_ms = self.ended_at_ms.or(job.ended_at_ms);
        next.version = job.version + 1;
        next.updated_at_ms = self.at_ms;
        next
    }
}

/// What `change` writes when it is legal, at `now_ms` by `actor`. Pure: it
/// does not say whether the change is legal; `check` does.
pub fn write_of(change: &JobChange, actor: &str, now_ms: i64) -> JobWrite {
    let to_state = change.target().unwrap_or(JobState::Running);
    let mut write = JobWrite {
        to_state,
        progress: None,
        progress_message: None,
        result_json: None,
        error: None,
        agent_id: None,
        peer_instance_id: None,
        started_at_ms: None,
        ended_at_ms: to_state.is_terminal().then_some(now_ms),
        at_ms: now_ms,
        message: String::new(),
        actor: actor.to_owned(),
    };
    match change {
        JobChange::Progress { percent, message } => {
            write.progress = Some(*percent);
            write.progress_message = Some(message.clone());
            write.message.clone_from(message);
        }
        JobChange::Start { message } => {
            write.started_at_ms = Some(now_ms);
            write.message.clone_from(message);
        }
        JobChange::AttachAgent {
            agent_id,
            peer_instance_id,
        } => {
            write.started_at_ms = Some(now_ms);
            write.agent_id = Some(agent_id.clone());
            write.peer_instance_id = Some(peer_instance_id.clone());
            write.message = if peer_instance_id.is_empty() {
                format!("agent {agent_id} started")
            } else {
                format!("agent {agent_id} started on peer {peer_instance_id}")
            };
        }
        JobChange::Complete { result_json } => {
            write.progress = Some(Percent::COMPLETE);
            write.result_json = Some(result_json.clone());
        }
        JobChange::Fail { error } => {
            write.error = Some(error.clone());
            write.message.clone_from(error);
        }
        JobChange::Cancel { reason } => {
            write.message.clone_from(reason);
        }
    }
    write
}

/// Whether `change` is legal for `job` as it is; nothing is changed.
pub fn check(job: &JobRecord, change: &JobChange) -> Result<(), TransitionError> {
    let from = job.state;
    if let JobChange::Progress { percent, .. } = change {
        if from != JobState::Running {
            return Err(TransitionError::ProgressNotRunning { state: from });
        }
        if *percent < job.progress {
            return Err(TransitionError::ProgressBackwards {
                current: job.progress.get(),
                requested: percent.get(),
            });
        }
        return Ok(());
    }
    match change.target() {
        Some(to) if !from.can_move_to(to) => Err(TransitionError::Illegal { from, to }),
        _ => Ok(()),
    }
}

/// The one state `change` is legal from whatever else the job holds, if
/// there is exactly one: such a change can be written guarded by the stored
/// state alone, without reading the job first (start and attach from
/// PENDING, complete from RUNNING). `None` for progress, which also depends
/// on the current progress, and for fail and cancel, legal from two states.
pub fn sole_source(change: &JobChange) -> Option<JobState> {
    let to = change.target()?;
    let mut sources = JobState::ALL
        .into_iter()
        .filter(|from| from.can_move_to(to));
    match (sources.next(), sources.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// Applies `change` to `job`: the job as it is after the change and the
/// history entry that records it, or why the change is refused.
///
/// The entry's sequence is the job's version plus one, and the returned job
/// carries that new version: the store writes both only if the stored version
/// is still `job.version`.
pub fn apply(
    job: &JobRecord,
    change: &JobChange,
    actor: &str,
    now_ms: i64,
) -> Result<(JobRecord, JobHistoryRecord), TransitionError> {
    check(job, change)?;
    let write = write_of(change, actor, now_ms);
    let next = write.applied_to(job);
    let entry = write.entry(&next, job.state);
    Ok((next, entry))
}

/// The history entry that records the creation of `job` (sequence 1).
pub fn creation_entry(job: &JobRecord, actor: &str) -> JobHistoryRecord {
    JobHistoryRecord {
        job_id: job.id.clone(),
        sequence: 1,
        from_state: None,
        to_state: job.state,
        progress: job.progress,
        message: String::new(),
        actor: actor.to_owned(),
        at_ms: job.created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_in(state: JobState, progress: u8) -> JobRecord {
        JobRecord {
            state,
            progress: Percent(progress),
            version: 3,
            ..JobRecord::new_pending("job-1".to_owned(), "review".to_owned(), 1_000)
        }
    }

    fn every_change() -> Vec<JobChange> {
        vec![
            JobChange::Start {
                message: "go".to_owned(),
            },
            JobChange::Complete {
                result_json: "{\"ok\":true}".to_owned(),
            },
            JobChange::Fail {
                error: "boom".to_owned(),
            },
            JobChange::Cancel {
                reason: "no longer needed".to_owned(),
            },
            JobChange::AttachAgent {
                agent_id: "agent-1".to_owned(),
                peer_instance_id: String::new(),
            },
        ]
    }

    #[test]
    fn exactly_the_documented_edges_are_legal() {
        let legal = [
            (JobState::Pending, JobState::Running),
            (JobState::Pending, JobState::Failed),
            (JobState::Pending, JobState::Cancelled),
            (JobState::Running, JobState::Completed),
            (JobState::Running, JobState::Failed),
            (JobState::Running, JobState::Cancelled),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_move_to(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn every_state_change_from_every_state_is_applied_or_refused_unchanged() {
        for from in JobState::ALL {
            for change in every_change() {
                let to = change.target().expect("a state change");
                let job = job_in(from, 40);
                match apply(&job, &change, "tester", 5_000) {
                    Ok((next, entry)) => {
                        assert!(from.can_move_to(to), "{from} -> {to} was applied");
                        assert_eq!(next.state, to);
                        assert_eq!(next.version, 4);
                        assert_eq!(next.updated_at_ms, 5_000);
                        assert_eq!(entry.sequence, 4);
                        assert_eq!(entry.from_state, Some(from));
                        assert_eq!(entry.to_state, to);
                        assert_eq!(entry.actor, "tester");
                        assert_eq!(next.ended_at_ms.is_some(), to.is_terminal());
                    }
                    Err(error) => {
                        assert!(!from.can_move_to(to), "{from} -> {to} was refused");
                        assert_eq!(error, TransitionError::Illegal { from, to });
                    }
                }
            }
        }
    }

    #[test]
    fn each_legal_change_sets_its_fields() {
        let (started, _) = apply(
            &job_in(JobState::Pending, 0),
            &JobChange::Start {
                message: "picked up".to_owned(),
            },
            "worker",
            2_000,
        )
        .expect("start");
        assert_eq!(started.started_at_ms, Some(2_000));
        assert_eq!(started.ended_at_ms, None);

        let (completed, entry) = apply(
            &job_in(JobState::Running, 40),
            &JobChange::Complete {
                result_json: "[1]".to_owned(),
            },
            "worker",
            3_000,
        )
        .expect("complete");
        assert_eq!(completed.progress, Percent::COMPLETE);
        assert_eq!(completed.result_json, "[1]");
        assert_eq!(entry.progress, Percent::COMPLETE);

        let (failed, entry) = apply(
            &job_in(JobState::Pending, 0),
            &JobChange::Fail {
                error: "no worker".to_owned(),
            },
            "worker",
            3_000,
        )
        .expect("fail");
        assert_eq!(failed.error, "no worker");
        assert_eq!(entry.message, "no worker");
        assert_eq!(failed.started_at_ms, None);

        let (cancelled, entry) = apply(
            &job_in(JobState::Running, 10),
            &JobChange::Cancel {
                reason: "stop".to_owned(),
            },
            "operator",
            3_000,
        )
        .expect("cancel");
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert_eq!(cancelled.progress, Percent(10));
        assert_eq!(entry.message, "stop");
    }

    #[test]
    fn attaching_an_agent_starts_a_pending_job_and_records_the_agent() {
        let (running, entry) = apply(
            &job_in(JobState::Pending, 0),
            &JobChange::AttachAgent {
                agent_id: "agent-1".to_owned(),
                peer_instance_id: String::new(),
            },
            "system",
            2_000,
        )
        .expect("attach");
        assert_eq!(running.state, JobState::Running);
        assert_eq!(running.agent_id, "agent-1");
        assert_eq!(running.started_at_ms, Some(2_000));
        assert_eq!(entry.message, "agent agent-1 started");
        let refused = apply(
            &job_in(JobState::Running, 0),
            &JobChange::AttachAgent {
                agent_id: "agent-2".to_owned(),
                peer_instance_id: String::new(),
            },
            "system",
            2_000,
        );
        assert_eq!(
            refused,
            Err(TransitionError::Illegal {
                from: JobState::Running,
                to: JobState::Running
            })
        );
    }

    #[test]
    fn progress_moves_forward_or_stays_while_running() {
        let job = job_in(JobState::Running, 40);
        for value in [40, 41, 100] {
            let (next, entry) = apply(
                &job,
                &JobChange::Progress {
                    percent: Percent(value),
                    message: format!("at {value}"),
                },
                "worker",
                2_000,
            )
            .expect("accepted");
            assert_eq!(next.state, JobState::Running);
            assert_eq!(next.progress, Percent(value));
            assert_eq!(next.progress_message, format!("at {value}"));
            assert_eq!(entry.from_state, Some(JobState::Running));
            assert_eq!(entry.to_state, JobState::Running);
            assert_eq!(entry.progress, Percent(value));
        }
    }

    #[test]
    fn progress_never_goes_back() {
        let refused = apply(
            &job_in(JobState::Running, 40),
            &JobChange::Progress {
                percent: Percent(39),
                message: String::new(),
            },
            "worker",
            2_000,
        );
        assert_eq!(
            refused,
            Err(TransitionError::ProgressBackwards {
                current: 40,
                requested: 39
            })
        );
    }

    #[test]
    fn progress_is_refused_unless_running() {
        for state in JobState::ALL
            .into_iter()
            .filter(|state| *state != JobState::Running)
        {
            let refused = apply(
                &job_in(state, 0),
                &JobChange::Progress {
                    percent: Percent(50),
                    message: String::new(),
                },
                "worker",
                2_000,
            );
            assert_eq!(refused, Err(TransitionError::ProgressNotRunning { state }));
        }
    }

    #[test]
    fn percent_admits_zero_to_one_hundred_only() {
        assert_eq!(Percent::new(0).map(Percent::get), Some(0));
        assert_eq!(Percent::new(100).map(Percent::get), Some(100));
        assert_eq!(Percent::new(101), None);
        assert_eq!(Percent::new(u32::MAX), None);
    }

    #[test]
    fn update_status_maps_states_to_changes_and_refuses_pending() {
        assert_eq!(JobChange::to_state(JobState::Pending, String::new()), None);
        for state in [
            JobState::Running,
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            let change = JobChange::to_state(state, "why".to_owned()).expect("a change");
            assert_eq!(change.target(), Some(state));
        }
    }

    #[test]
    fn state_names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            assert_eq!(JobState::parse(&state.as_str().to_lowercase()), Some(state));
        }
        assert_eq!(JobState::parse("DONE"), None);
    }

    #[test]
    fn a_change_with_a_sole_source_is_legal_exactly_from_it() {
        assert_eq!(
            sole_source(&JobChange::Start {
                message: String::new()
            }),
            Some(JobState::Pending)
        );
        assert_eq!(
            sole_source(&JobChange::Complete {
                result_json: String::new()
            }),
            Some(JobState::Running)
        );
        assert_eq!(
            sole_source(&JobChange::Fail {
                error: String::new()
            }),
            None
        );
        assert_eq!(
            sole_source(&JobChange::Progress {
                percent: Percent(1),
                message: String::new()
            }),
            None
        );
        // The store writes such a change guarded by the state alone, so the
        // state alone must decide, whatever the progress.
        for change in every_change() {
            let Some(source) = sole_source(&change) else {
                continue;
            };
            for from in JobState::ALL {
                for progress in [0, 40, 100] {
                    let legal = check(&job_in(from, progress), &change).is_ok();
                    assert_eq!(legal, from == source, "{change:?} from {from}");
                }
            }
        }
    }

    #[test]
    fn creation_entry_is_sequence_one_without_a_from_state() {
        let job = JobRecord::new_pending("job-1".to_owned(), "review".to_owned(), 1_000);
        let entry = creation_entry(&job, "creator");
        assert_eq!(entry.sequence, 1);
        assert_eq!(entry.from_state, None);
        assert_eq!(entry.to_state, JobState::Pending);
        assert_eq!(entry.at_ms, 1_000);
        assert_eq!(job.version, 1);
    }
}
