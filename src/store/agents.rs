//! Queries for agents: recording one, persisting each state change with its
//! event in one transaction, saving output, looking up, listing with filters
//! and keyset paging, and finding a runner's unfinished agents.
//!
//! The two writes on the runtime's hot path, recording an agent and changing
//! its state, are written once per backend, as the jobs' are: `sqlite.rs` (the
//! statements inside one blocking call) and `postgres.rs` (one statement).

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

mod postgres;
mod sqlite;

use super::schema::{agent_events, agent_labels, agent_status, agents};
use super::{Conflict, Store, StoreError};
use crate::agents::model::{AgentFilter, AgentRecord, AgentState, AgentTransition, Origin};

/// Where a page of [`Store::list_agents`] starts: strictly after (older than)
/// this agent in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCursor {
    /// `created_at_ms` of the last agent of the previous page.
    pub created_at_ms: i64,
    /// Its id (ties on the time are broken by id).
    pub id: String,
}

impl Store {
    /// Records a new agent with its status, labels and history, in one
    /// transaction.
    ///
    /// The history is the way into the agent's state: `Spawning` at
    /// `created_at_ms`, then, for an agent in any other state, the change
    /// from `Spawning` into it at `updated_at_ms` with the state's reason.
    /// The runtime records an agent once its process has started (RUNNING,
    /// with its pid) or could not start (FAILED): one commit instead of one
    /// before the start and one after.
    pub async fn insert_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        // The SQLite body runs on a blocking thread: it gets its own copy.
        let owned = agent.clone();
        in_transaction!(
            self,
            |conn| sqlite::insert_agent(conn, &owned),
            // PostgreSQL: one statement.
            statement = |conn| Ok(postgres::insert_agent(conn, &NewAgentRows::of(agent)?).await?),
        )
    }

    /// Persists `agent`'s status (its state and every field that changes)
    /// as the result of a change from `from`, with the change's event, in one
    /// transaction.
    ///
    /// The update only applies while the stored state is still `from`, so two
    /// writers can never both move an agent on: the loser gets
    /// `StoreError::Conflict` and nothing changes.
    pub async fn record_agent_transition(
        &self,
        from: AgentState,
        agent: &AgentRecord,
    ) -> Result<(), StoreError> {
        let conflict = move |id: &str| {
            StoreError::Conflict(Conflict::StateChanged(format!(
                "agent {id} is no longer {from}"
            )))
        };
        // The SQLite body runs on a blocking thread: it gets its own copy.
        let owned = agent.clone();
        in_transaction!(
            self,
            |conn| {
                if sqlite::record_transition(conn, from, &owned)? {
                    Ok(())
                } else {
                    Err(conflict(&owned.id))
                }
            },
            // PostgreSQL: one statement.
            statement = |conn| {
                let status = StatusRow::from_record(agent)?;
                if postgres::record_transition(conn, &status, &transition_event(from, agent))
                    .await?
                {
                    Ok(())
                } else {
                    Err(conflict(&agent.id))
                }
            }
        )
    }

    /// Saves the output figures of an agent that is still running (a no-op
    /// once it has ended, so a late save never overwrites the final tail).
    pub async fn save_agent_output(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        let status = StatusRow::from_record(agent)?;
        with_connection!(self, |conn| {
            diesel::update(
                agent_status::table
                    .filter(agent_status::agent_id.eq(&agent.id))
                    .filter(agent_status::state.eq_any(UNFINISHED)),
            )
            .set((
                agent_status::output_tail_json.eq(&status.output_tail_json),
                agent_status::output_bytes.eq(status.output_bytes),
                agent_status::output_truncated.eq(status.output_truncated),
                agent_status::updated_at_ms.eq(status.updated_at_ms),
            ))
            .execute(conn)
            .await?
        });
        Ok(())
    }

    /// The agent with this id, if any.
    pub async fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row = with_connection!(self, |conn| {
            agents::table
                .inner_join(agent_status::table)
                .filter(agents::id.eq(id))
                .select((AgentRow::as_select(), StatusRow::as_select()))
                .first(conn)
                .await
                .optional()?
        });
        row.map(into_record).transpose()
    }

    /// Up to `limit` agents matching `filter`, newest first, starting after
    /// `after`.
    pub async fn list_agents(
        &self,
        filter: &AgentFilter,
        after: Option<&AgentCursor>,
        limit: i64,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            let mut query = agents::table
                .inner_join(agent_status::table)
                .select((AgentRow::as_select(), StatusRow::as_select()))
                .into_boxed();
            if let Some(state) = filter.state {
                query = query.filter(agent_status::state.eq(state.as_str()));
            }
            if let Some(agent_type) = &filter.agent_type {
                query = query.filter(agents::agent_type.eq(agent_type.clone()));
            }
            if let Some(kind) = filter.origin_kind {
                query = query.filter(agents::origin_kind.eq(kind.as_str()));
            }
            if let Some(instance_id) = &filter.origin_instance_id {
                query = query.filter(agents::origin_instance_id.eq(instance_id.clone()));
            }
            if let Some(workspace) = &filter.origin_workspace {
                query = query.filter(agents::origin_workspace.eq(workspace.clone()));
            }
            for (key, value) in &filter.labels {
                query = query.filter(
                    agents::id.eq_any(
                        agent_labels::table
                            .filter(agent_labels::label_key.eq(key.clone()))
                            .filter(agent_labels::label_value.eq(value.clone()))
                            .select(agent_labels::agent_id),
                    ),
                );
            }
            if let Some(cursor) = after {
                query = query.filter(
                    agents::created_at_ms
                        .lt(cursor.created_at_ms)
                        .or(agents::created_at_ms
                            .eq(cursor.created_at_ms)
                            .and(agents::id.lt(cursor.id.clone()))),
                );
            }
            query
                .order((agents::created_at_ms.desc(), agents::id.desc()))
                .limit(limit)
                .load(conn)
                .await?
        });
        rows.into_iter().map(into_record).collect()
    }

    /// The agents of `runner_id` still recorded as spawning or running.
    pub async fn list_unfinished_agents(
        &self,
        runner_id: &str,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            agents::table
                .inner_join(agent_status::table)
                .filter(agents::runner_id.eq(runner_id))
                .filter(agent_status::state.eq_any(UNFINISHED))
                .select((AgentRow::as_select(), StatusRow::as_select()))
                .order((agents::created_at_ms.asc(), agents::id.asc()))
                .load(conn)
                .await?
        });
        rows.into_iter().map(into_record).collect()
    }

    /// The state changes of an agent, in the order they happened.
    pub async fn list_agent_transitions(
        &self,
        agent_id: &str,
    ) -> Result<Vec<AgentTransition>, StoreError> {
        let rows: Vec<EventRow> = with_connection!(self, |conn| {
            agent_events::table
                .filter(agent_events::agent_id.eq(agent_id))
                .select(EventRow::as_select())
                .load(conn)
                .await?
        });
        let mut transitions = rows
            .into_iter()
            .map(EventRow::into_transition)
            .collect::<Result<Vec<_>, _>>()?;
        // Each state is entered once and in lifecycle order, which also
        // orders events that share a millisecond.
        transitions.sort_by_key(|transition| (transition.at_ms, transition.to));
        Ok(transitions)
    }
}

/// The states of an agent whose process may still run.
const UNFINISHED: [&str; 2] = ["SPAWNING", "RUNNING"];

fn parse_state(name: &str) -> Result<AgentState, StoreError> {
    AgentState::parse(name)
        .ok_or_else(|| StoreError::undecodable(format!("unknown agent state {name:?}")))
}

/// The history entry of `agent`'s change from `from` into its state.
fn transition_event(from: AgentState, agent: &AgentRecord) -> NewEventRow<'_> {
    NewEventRow {
        agent_id: &agent.id,
        to_state: agent.state.as_str(),
        from_state: from.as_str(),
        reason: &agent.state_reason,
        at_ms: agent.updated_at_ms,
    }
}

/// The rows that record a new agent: its own, its status, its labels, and the
/// history of the way into its state (`Spawning` at `created_at_ms`, then, for
/// an agent in any other state, the change from `Spawning` into it at
/// `updated_at_ms` with the state's reason).
struct NewAgentRows<'a> {
    agent: AgentRow,
    status: StatusRow,
    labels: Vec<NewLabelRow<'a>>,
    events: Vec<NewEventRow<'a>>,
}

impl<'a> NewAgentRows<'a> {
    fn of(agent: &'a AgentRecord) -> Result<Self, StoreError> {
        let labels = agent
            .labels
            .iter()
            .map(|(key, value)| NewLabelRow {
                agent_id: &agent.id,
                label_key: key,
                label_value: value,
            })
            .collect();
        let spawning = AgentState::Spawning;
        let mut events = vec![NewEventRow {
            agent_id: &agent.id,
            to_state: spawning.as_str(),
            from_state: "",
            reason: if agent.state == spawning {
                &agent.state_reason
            } else {
                ""
            },
            at_ms: agent.created_at_ms,
        }];
        if agent.state != spawning {
            events.push(NewEventRow {
                agent_id: &agent.id,
                to_state: agent.state.as_str(),
                from_state: spawning.as_str(),
                reason: &agent.state_reason,
                at_ms: agent.updated_at_ms,
            });
        }
        Ok(Self {
            agent: AgentRow::from_record(agent)?,
            status: StatusRow::from_record(agent)?,
            labels,
            events,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = agents, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct AgentRow {
    id: String,
    agent_type: String,
    prompt: String,
    task_id: String,
    labels_json: String,
    origin_kind: String,
    origin_instance_id: String,
    origin_workspace: String,
    runner_id: String,
    timeout_secs: i64,
    created_at_ms: i64,
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = agent_status, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
// NULLs are written as NULL: a status update sets every field.
#[diesel(treat_none_as_null = true)]
struct StatusRow {
    agent_id: String,
    state: String,
    state_reason: String,
    pid: Option<i64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    output_tail_json: String,
    output_bytes: i64,
    output_truncated: bool,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
    updated_at_ms: i64,
}

impl AgentRow {
    fn from_record(agent: &AgentRecord) -> Result<AgentRow, StoreError> {
        let (origin_instance_id, origin_workspace) = match &agent.origin {
            Origin::Local => (String::new(), String::new()),
            Origin::Peer {
                instance_id,
                workspace,
            } => (instance_id.clone(), workspace.clone()),
        };
        Ok(AgentRow {
            id: agent.id.clone(),
            agent_type: agent.agent_type.clone(),
            prompt: agent.prompt.clone(),
            task_id: agent.task_id.clone(),
            labels_json: serde_json::to_string(&agent.labels).map_err(StoreError::unencodable)?,
            origin_kind: agent.origin.kind().as_str().to_owned(),
            origin_instance_id,
            origin_workspace,
            runner_id: agent.runner_id.clone(),
            timeout_secs: i64::from(agent.timeout_secs),
            created_at_ms: agent.created_at_ms,
        })
    }
}

impl StatusRow {
    fn from_record(agent: &AgentRecord) -> Result<StatusRow, StoreError> {
        Ok(StatusRow {
            agent_id: agent.id.clone(),
            state: agent.state.as_str().to_owned(),
            state_reason: agent.state_reason.clone(),
            pid: agent.pid.map(i64::from),
            exit_code: agent.exit_code,
            signal: agent.signal,
            output_tail_json: serde_json::to_string(&agent.output_tail)
                .map_err(StoreError::unencodable)?,
            output_bytes: i64::try_from(agent.output_bytes).unwrap_or(i64::MAX),
            output_truncated: agent.output_truncated,
            started_at_ms: agent.started_at_ms,
            ended_at_ms: agent.ended_at_ms,
            updated_at_ms: agent.updated_at_ms,
        })
    }
}

fn into_record((row, status): (AgentRow, StatusRow)) -> Result<AgentRecord, StoreError> {
    let origin = match row.origin_kind.as_str() {
        "LOCAL" => Origin::Local,
        "PEER" => Origin::Peer {
            instance_id: row.origin_instance_id,
            workspace: row.origin_workspace,
        },
        other => {
            return Err(StoreError::undecodable(format!(
                "unknown agent origin {other:?}"
            )));
        }
    };
    let labels: BTreeMap<String, String> =
        serde_json::from_str(&row.labels_json).map_err(StoreError::undecodable)?;
    let output_tail: Vec<String> =
        serde_json::from_str(&status.output_tail_json).map_err(StoreError::undecodable)?;
    Ok(AgentRecord {
        id: row.id,
        agent_type: row.agent_type,
        state: parse_state(&status.state)?,
        state_reason: status.state_reason,
        prompt: row.prompt,
        task_id: row.task_id,
        labels,
        origin,
        runner_id: row.runner_id,
        pid: status.pid.and_then(|pid| u32::try_from(pid).ok()),
        exit_code: status.exit_code,
        signal: status.signal,
        output_tail,
        output_bytes: u64::try_from(status.output_bytes).unwrap_or(0),
        output_truncated: status.output_truncated,
        timeout_secs: u32::try_from(row.timeout_secs).unwrap_or(u32::MAX),
        created_at_ms: row.created_at_ms,
        started_at_ms: status.started_at_ms,
        ended_at_ms: status.ended_at_ms,
        updated_at_ms: status.updated_at_ms,
    })
}

#[derive(Insertable)]
#[diesel(table_name = agent_labels)]
struct NewLabelRow<'a> {
    agent_id: &'a str,
    label_key: &'a str,
    label_value: &'a str,
}

#[derive(Insertable)]
#[diesel(table_name = agent_events)]
struct NewEventRow<'a> {
    agent_id: &'a str,
    to_state: &'a str,
    from_state: &'a str,
    reason: &'a str,
    at_ms: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = agent_events, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct EventRow {
    agent_id: String,
    to_state: String,
    from_state: String,
    reason: String,
    at_ms: i64,
}

impl EventRow {
    fn into_transition(self) -> Result<AgentTransition, StoreError> {
        let from = match self.from_state.as_str() {
            "" => None,
            name => Some(parse_state(name)?),
        };
        Ok(AgentTransition {
            agent_id: self.agent_id,
            from,
            to: parse_state(&self.to_state)?,
            reason: self.reason,
            at_ms: self.at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::OriginKind;
    use crate::store::testing::test_on_both_backends;

    fn agent(id: &str, created_at_ms: i64) -> AgentRecord {
        AgentRecord {
            id: id.to_owned(),
            agent_type: "sh".to_owned(),
            state: AgentState::Spawning,
            state_reason: String::new(),
            prompt: "echo hi".to_owned(),
            task_id: String::new(),
            labels: BTreeMap::new(),
            origin: Origin::Local,
            runner_id: "runner-a".to_owned(),
            pid: None,
            exit_code: None,
            signal: None,
            output_tail: Vec::new(),
            output_bytes: 0,
            output_truncated: false,
            timeout_secs: 60,
            created_at_ms,
            started_at_ms: None,
            ended_at_ms: None,
            updated_at_ms: created_at_ms,
        }
    }

    async fn an_agent_round_trips_through_its_transitions(store: Store) {
        let mut record = AgentRecord {
            labels: BTreeMap::from([("team".to_owned(), "blue".to_owned())]),
            origin: Origin::Peer {
                instance_id: "peer-1".to_owned(),
                workspace: "ws".to_owned(),
            },
            task_id: "job-7".to_owned(),
            ..agent("a1", 1_000)
        };
        store.insert_agent(&record).await.expect("insert");
        assert_eq!(
            store.get_agent("a1").await.expect("get"),
            Some(record.clone())
        );

        record.state = AgentState::Running;
        record.pid = Some(4242);
        record.started_at_ms = Some(1_001);
        record.updated_at_ms = 1_001;
        store
            .record_agent_transition(AgentState::Spawning, &record)
            .await
            .expect("running");

        record.output_tail = vec!["one".to_owned(), "two".to_owned()];
        record.output_bytes = 8;
        record.updated_at_ms = 1_002;
        store.save_agent_output(&record).await.expect("output");

        record.state = AgentState::Completed;
        record.state_reason = "exited with code 0".to_owned();
        record.exit_code = Some(0);
        record.ended_at_ms = Some(1_003);
        record.updated_at_ms = 1_003;
        store
            .record_agent_transition(AgentState::Running, &record)
            .await
            .expect("completed");
        assert_eq!(
            store.get_agent("a1").await.expect("get"),
            Some(record.clone())
        );

        // A second writer that still believes the agent runs changes nothing.
        let mut stale = record.clone();
        stale.state = AgentState::Killed;
        let outcome = store
            .record_agent_transition(AgentState::Running, &stale)
            .await;
        assert!(
            matches!(outcome, Err(StoreError::Conflict(_))),
            "{outcome:?}"
        );
        // Nor does a late output save.
        let mut late = record.clone();
        late.output_tail = vec!["late".to_owned()];
        store.save_agent_output(&late).await.expect("no-op save");
        assert_eq!(store.get_agent("a1").await.expect("get"), Some(record));

        let transitions = store.list_agent_transitions("a1").await.expect("events");
        let steps: Vec<_> = transitions
            .iter()
            .map(|transition| (transition.from, transition.to, transition.at_ms))
            .collect();
        assert_eq!(
            steps,
            [
                (None, AgentState::Spawning, 1_000),
                (Some(AgentState::Spawning), AgentState::Running, 1_001),
                (Some(AgentState::Running), AgentState::Completed, 1_003),
            ]
        );
        assert_eq!(transitions[2].reason, "exited with code 0");
        assert_eq!(store.get_agent("missing").await.expect("get"), None);
    }

    async fn listing_filters_and_pages_newest_first(store: Store) {
        for index in 0..5_i64 {
            let mut record = agent(&format!("agent-{index}"), 1_000 + index);
            if index % 2 == 0 {
                record.labels.insert("parity".to_owned(), "even".to_owned());
            }
            if index == 4 {
                record.origin = Origin::Peer {
                    instance_id: "peer-1".to_owned(),
                    workspace: "ws".to_owned(),
                };
                record.agent_type = "claude".to_owned();
            }
            store.insert_agent(&record).await.expect("insert");
        }
        let ids = |records: Vec<AgentRecord>| -> Vec<String> {
            records.into_iter().map(|record| record.id).collect()
        };
        let all = AgentFilter::default();
        let first = store.list_agents(&all, None, 2).await.expect("page 1");
        assert_eq!(ids(first.clone()), ["agent-4", "agent-3"]);
        let cursor = AgentCursor {
            created_at_ms: first[1].created_at_ms,
            id: first[1].id.clone(),
        };
        let second = store
            .list_agents(&all, Some(&cursor), 10)
            .await
            .expect("page 2");
        assert_eq!(ids(second), ["agent-2", "agent-1", "agent-0"]);

        let even = AgentFilter {
            labels: BTreeMap::from([("parity".to_owned(), "even".to_owned())]),
            ..AgentFilter::default()
        };
        let listed = store.list_agents(&even, None, 10).await.expect("labels");
        assert_eq!(ids(listed), ["agent-4", "agent-2", "agent-0"]);

        let peer = AgentFilter {
            origin_kind: Some(OriginKind::Peer),
            origin_instance_id: Some("peer-1".to_owned()),
            ..even.clone()
        };
        let listed = store.list_agents(&peer, None, 10).await.expect("origin");
        assert_eq!(ids(listed), ["agent-4"]);
        let local_claude = AgentFilter {
            origin_kind: Some(OriginKind::Local),
            agent_type: Some("claude".to_owned()),
            ..AgentFilter::default()
        };
        let listed = store
            .list_agents(&local_claude, None, 10)
            .await
            .expect("none");
        assert!(listed.is_empty());
        let running = AgentFilter {
            state: Some(AgentState::Running),
            ..AgentFilter::default()
        };
        assert!(
            store
                .list_agents(&running, None, 10)
                .await
                .expect("state")
                .is_empty()
        );
    }

    async fn unfinished_agents_are_per_runner(store: Store) {
        store.insert_agent(&agent("mine", 1)).await.expect("insert");
        let other = AgentRecord {
            runner_id: "runner-b".to_owned(),
            ..agent("theirs", 2)
        };
        store.insert_agent(&other).await.expect("insert");
        let mut ended = agent("ended", 3);
        store.insert_agent(&ended).await.expect("insert");
        ended.state = AgentState::Failed;
        ended.updated_at_ms = 4;
        store
            .record_agent_transition(AgentState::Spawning, &ended)
            .await
            .expect("fail");
        let unfinished = store
            .list_unfinished_agents("runner-a")
            .await
            .expect("unfinished");
        let ids: Vec<_> = unfinished.iter().map(|record| record.id.as_str()).collect();
        assert_eq!(ids, ["mine"]);
    }

    async fn a_started_agent_is_recorded_with_the_way_into_its_state(store: Store) {
        let running = AgentRecord {
            state: AgentState::Running,
            pid: Some(4242),
            started_at_ms: Some(1_005),
            updated_at_ms: 1_005,
            labels: BTreeMap::from([("team".to_owned(), "blue".to_owned())]),
            ..agent("started", 1_000)
        };
        store.insert_agent(&running).await.expect("insert");
        assert_eq!(
            store.get_agent("started").await.expect("get"),
            Some(running.clone())
        );
        let unfinished = store
            .list_unfinished_agents("runner-a")
            .await
            .expect("unfinished");
        assert_eq!(unfinished, [running]);
        let failed = AgentRecord {
            state: AgentState::Failed,
            state_reason: "cannot start".to_owned(),
            ended_at_ms: Some(2_001),
            updated_at_ms: 2_001,
            ..agent("failed", 2_000)
        };
        store.insert_agent(&failed).await.expect("insert");
        // The same id twice is a conflict, and changes nothing.
        let again = store.insert_agent(&failed).await;
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
        for (id, created, state, at, reason) in [
            ("started", 1_000, AgentState::Running, 1_005, ""),
            ("failed", 2_000, AgentState::Failed, 2_001, "cannot start"),
        ] {
            let transitions = store.list_agent_transitions(id).await.expect("events");
            let steps: Vec<_> = transitions
                .iter()
                .map(|transition| {
                    (
                        transition.from,
                        transition.to,
                        transition.at_ms,
                        transition.reason.as_str(),
                    )
                })
                .collect();
            assert_eq!(
                steps,
                [
                    (None, AgentState::Spawning, created, ""),
                    (Some(AgentState::Spawning), state, at, reason),
                ]
            );
        }
    }

    test_on_both_backends!(
        a_started_agent_is_recorded_with_the_way_into_its_state,
        an_agent_round_trips_through_its_transitions,
        listing_filters_and_pages_newest_first,
        unfinished_agents_are_per_runner,
    );
}
