//! An agent's two writes on PostgreSQL, its record once its process has
//! started and each later state change, each one SQL statement and so one
//! round trip (a transaction of one statement per row made five or more): a
//! statement run outside an explicit transaction is atomic on its own, its
//! data-modifying CTEs pass rows to each other through `RETURNING`, and the
//! foreign keys are checked at its end.

use diesel::QueryResult;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::{NewAgentRows, NewEventRow, StatusRow};
use crate::store::pools::PostgresConnection;
use crate::store::prepared::Cached;

/// The agent, its status, its labels and its events. A used id fails the
/// whole statement (the primary key), and nothing is written.
const INSERT_AGENT: &str = "\
WITH agent AS (
    INSERT INTO agents (id, agent_type, prompt, task_id, labels_json, origin_kind,
        origin_instance_id, origin_workspace, runner_id, timeout_secs, created_at_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    RETURNING id
), status AS (
    INSERT INTO agent_status (agent_id, state, state_reason, pid, exit_code, signal,
        output_tail_json, output_bytes, output_truncated, started_at_ms, ended_at_ms,
        updated_at_ms)
    SELECT id, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22 FROM agent
), labels AS (
    INSERT INTO agent_labels (agent_id, label_key, label_value)
    SELECT agent.id, label.key, label.value
    FROM agent, unnest($23::text[], $24::text[]) AS label (key, value)
)
INSERT INTO agent_events (agent_id, to_state, from_state, reason, at_ms)
SELECT agent.id, event.to_state, event.from_state, event.reason, event.at_ms
FROM agent, unnest($25::text[], $26::text[], $27::text[], $28::int8[])
    AS event (to_state, from_state, reason, at_ms)";

/// A status written while the stored state is still the change's source
/// (`$13`), and the change's event: no row when the state has moved on, and
/// then no event either.
const RECORD_TRANSITION: &str = "\
WITH moved AS (
    UPDATE agent_status SET state = $1, state_reason = $2, pid = $3, exit_code = $4,
        signal = $5, output_tail_json = $6, output_bytes = $7, output_truncated = $8,
        started_at_ms = $9, ended_at_ms = $10, updated_at_ms = $11
    WHERE agent_id = $12 AND state = $13
    RETURNING agent_id
)
INSERT INTO agent_events (agent_id, to_state, from_state, reason, at_ms)
SELECT agent_id, $14, $13, $15, $16 FROM moved";

/// Writes a new agent's rows in one statement.
pub(super) async fn insert_agent(
    conn: &mut PostgresConnection,
    rows: &NewAgentRows<'_>,
) -> QueryResult<()> {
    let (agent, status) = (&rows.agent, &rows.status);
    let (label_keys, label_values): (Vec<&str>, Vec<&str>) = rows
        .labels
        .iter()
        .map(|label| (label.label_key, label.label_value))
        .unzip();
    let (mut event_to, mut event_from) = (Vec::new(), Vec::new());
    let (mut event_reasons, mut event_times) = (Vec::new(), Vec::new());
    for event in &rows.events {
        event_to.push(event.to_state);
        event_from.push(event.from_state);
        event_reasons.push(event.reason);
        event_times.push(event.at_ms);
    }
    let statement = diesel::sql_query(INSERT_AGENT)
        .bind::<Text, _>(&agent.id)
        .bind::<Text, _>(&agent.agent_type)
        .bind::<Text, _>(&agent.prompt)
        .bind::<Text, _>(&agent.task_id)
        .bind::<Text, _>(&agent.labels_json)
        .bind::<Text, _>(&agent.origin_kind)
        .bind::<Text, _>(&agent.origin_instance_id)
        .bind::<Text, _>(&agent.origin_workspace)
        .bind::<Text, _>(&agent.runner_id)
        .bind::<BigInt, _>(agent.timeout_secs)
        .bind::<BigInt, _>(agent.created_at_ms)
        .bind::<Text, _>(&status.state)
        .bind::<Text, _>(&status.state_reason)
        .bind::<Nullable<BigInt>, _>(status.pid)
        .bind::<Nullable<Integer>, _>(status.exit_code)
        .bind::<Nullable<Integer>, _>(status.signal)
        .bind::<Text, _>(&status.output_tail_json)
        .bind::<BigInt, _>(status.output_bytes)
        .bind::<Bool, _>(status.output_truncated)
        .bind::<Nullable<BigInt>, _>(status.started_at_ms)
        .bind::<Nullable<BigInt>, _>(status.ended_at_ms)
        .bind::<BigInt, _>(status.updated_at_ms)
        .bind::<Array<Text>, _>(label_keys)
        .bind::<Array<Text>, _>(label_values)
        .bind::<Array<Text>, _>(event_to)
        .bind::<Array<Text>, _>(event_from)
        .bind::<Array<Text>, _>(event_reasons)
        .bind::<Array<BigInt>, _>(event_times);
    Cached(statement).execute(conn).await?;
    Ok(())
}

/// Writes `status` and `event` in one statement if the stored state is
/// still `event.from_state`: `false` (nothing written) when it is not.
pub(super) async fn record_transition(
    conn: &mut PostgresConnection,
    status: &StatusRow,
    event: &NewEventRow<'_>,
) -> QueryResult<bool> {
    let statement = diesel::sql_query(RECORD_TRANSITION)
        .bind::<Text, _>(&status.state)
        .bind::<Text, _>(&status.state_reason)
        .bind::<Nullable<BigInt>, _>(status.pid)
        .bind::<Nullable<Integer>, _>(status.exit_code)
        .bind::<Nullable<Integer>, _>(status.signal)
        .bind::<Text, _>(&status.output_tail_json)
        .bind::<BigInt, _>(status.output_bytes)
        .bind::<Bool, _>(status.output_truncated)
        .bind::<Nullable<BigInt>, _>(status.started_at_ms)
        .bind::<Nullable<BigInt>, _>(status.ended_at_ms)
        .bind::<BigInt, _>(status.updated_at_ms)
        .bind::<Text, _>(&status.agent_id)
        .bind::<Text, _>(event.from_state)
        .bind::<Text, _>(event.to_state)
        .bind::<Text, _>(event.reason)
        .bind::<BigInt, _>(event.at_ms);
    let events = Cached(statement).execute(conn).await?;
    Ok(events == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{TestDatabase, generic_plan};

    /// The parameters of `RECORD_TRANSITION`, in order.
    const TRANSITION_TYPES: [&str; 16] = [
        "text", "text", "bigint", "integer", "integer", "text", "bigint", "boolean", "bigint",
        "bigint", "bigint", "text", "text", "text", "text", "bigint",
    ];

    #[tokio::test(flavor = "multi_thread")]
    async fn a_transition_finds_its_agent_by_id_even_on_tables_never_analyzed() {
        // As for jobs (see `store::jobs::postgres`): a plan made on the empty
        // tables is kept, and `agent_status_state` would make every
        // transition read the index entries of every agent in its state.
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        database.migrated_store().await.expect("migrate");
        let plan = generic_plan(&database.url, RECORD_TRANSITION, &TRANSITION_TYPES)
            .await
            .expect("plan");
        assert!(plan.contains("agent_status_pkey"), "{plan}");
        assert!(!plan.contains("agent_status_state"), "{plan}");
        database.cleanup().await.expect("drop the test database");
    }
}
