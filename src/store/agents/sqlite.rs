//! An agent's two writes on SQLite, its record once its process has started
//! and each later state change, run inside the one blocking call of
//! `in_transaction!` on the connection's thread: the statements of each and
//! its commit, without a hop to tokio's blocking pool per statement.
//!
//! Synchronous diesel: the functions here take `diesel::SqliteConnection`.

use diesel::prelude::*;

use super::{NewAgentRows, StatusRow, transition_event};
use crate::agents::model::{AgentRecord, AgentState};
use crate::store::StoreError;
use crate::store::schema::{agent_events, agent_labels, agent_status, agents};

/// Writes `agent` with its status, labels and events, inside the caller's
/// transaction.
pub(super) fn insert_agent(
    conn: &mut diesel::SqliteConnection,
    agent: &AgentRecord,
) -> Result<(), StoreError> {
    let rows = NewAgentRows::of(agent)?;
    diesel::insert_into(agents::table)
        .values(&rows.agent)
        .execute(conn)?;
    diesel::insert_into(agent_status::table)
        .values(&rows.status)
        .execute(conn)?;
    for label in &rows.labels {
        diesel::insert_into(agent_labels::table)
            .values(label)
            .execute(conn)?;
    }
    for event in &rows.events {
        diesel::insert_into(agent_events::table)
            .values(event)
            .execute(conn)?;
    }
    Ok(())
}

/// Writes `agent`'s status and the event of its change from `from`, inside
/// the caller's transaction: `false` when the stored state is no longer
/// `from`, and nothing was written.
pub(super) fn record_transition(
    conn: &mut diesel::SqliteConnection,
    from: AgentState,
    agent: &AgentRecord,
) -> Result<bool, StoreError> {
    let updated = diesel::update(
        agent_status::table
            .filter(agent_status::agent_id.eq(&agent.id))
            .filter(agent_status::state.eq(from.as_str())),
    )
    .set(&StatusRow::from_record(agent)?)
    .execute(conn)?;
    if updated == 0 {
        return Ok(false);
    }
    diesel::insert_into(agent_events::table)
        .values(&transition_event(from, agent))
        .execute(conn)?;
    Ok(true)
}
