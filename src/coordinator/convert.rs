//! Proto messages to domain types and back, for the Coordinator handlers.

use crate::clock::timestamp_from_ms;
use crate::proto::coordinator as pb;
use crate::store::{JobHistoryRecord, JobRecord};

use super::state::JobState;

/// The proto enum value of a state.
pub fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// The state of a proto enum value; `None` for UNSPECIFIED and unknown
/// numbers.
pub fn state_from_proto(value: i32) -> Option<JobState> {
    match pb::JobState::try_from(value).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Pending => Some(JobState::Pending),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Completed => Some(JobState::Completed),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

/// A job as the API shows it.
pub fn job_to_proto(job: JobRecord) -> pb::Job {
    pb::Job {
        job_id: job.id,
        job_type: job.job_type,
        workspace: job.workspace,
        payload_json: job.payload_json,
        priority: job.priority,
        labels: job.labels.into_iter().collect(),
        state: state_to_proto(job.state).into(),
        progress: u32::from(job.progress.get()),
        progress_message: job.progress_message,
        result_json: job.result_json,
        error: job.error,
        created_by: job.created_by,
        agent_id: job.agent_id,
        idempotency_key: job.idempotency_key.unwrap_or_default(),
        created_at: Some(timestamp_from_ms(job.created_at_ms)),
        updated_at: Some(timestamp_from_ms(job.updated_at_ms)),
        started_at: job.started_at_ms.map(timestamp_from_ms),
        ended_at: job.ended_at_ms.map(timestamp_from_ms),
        peer_instance_id: job.peer_instance_id,
    }
}

/// A history entry as the API shows it.
pub fn entry_to_proto(entry: JobHistoryRecord) -> pb::JobHistoryEntry {
    pb::JobHistoryEntry {
        sequence: u64::try_from(entry.sequence).unwrap_or_default(),
        from_state: entry
            .from_state
            .map_or(pb::JobState::Unspecified, state_to_proto)
            .into(),
        to_state: state_to_proto(entry.to_state).into(),
        progress: u32::from(entry.progress.get()),
        message: entry.message,
        actor: entry.actor,
        at: Some(timestamp_from_ms(entry.at_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unspecified_is_none() {
        for state in JobState::ALL {
            assert_eq!(state_from_proto(state_to_proto(state).into()), Some(state));
        }
        assert_eq!(state_from_proto(0), None);
        assert_eq!(state_from_proto(99), None);
    }
}
