//! The replica registry: one row per runner id (a data dir) with how the
//! other replicas reach it and its lease, renewed by a heartbeat and fenced
//! by an epoch (see `crate::replicas::registry` for the rules).

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;

use super::schema::{agent_status, replicas};
use super::{Store, StoreError};

/// A replica as registered.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = replicas)]
pub struct ReplicaRecord {
    /// The runner id that names it as the supervisor of its agents.
    pub runner_id: String,
    /// How another replica reaches it.
    pub address: String,
    /// Grows with every start and every takeover.
    pub epoch: i64,
    /// `serving`, `stopped` or `lost` (another replica settled its agents).
    pub state: String,
    /// The `mosaicd` version it runs.
    pub version: String,
    /// When this epoch started, epoch milliseconds.
    pub started_at_ms: i64,
    /// Its last heartbeat.
    pub heartbeat_at_ms: i64,
    /// When its lease runs out unless renewed.
    pub expires_at_ms: i64,
}

impl ReplicaRecord {
    /// Its state as an operator should see it at `now_ms`: the recorded
    /// one, or `expired` when it still says serving but its lease ran out
    /// (it stopped beating).
    pub fn state_at(&self, now_ms: i64) -> &str {
        if self.state == "serving" && self.expires_at_ms <= now_ms {
            "expired"
        } else {
            &self.state
        }
    }
}

/// A replica registering itself at start.
#[derive(Debug, Clone, Copy)]
pub struct NewReplica<'a> {
    /// Its runner id.
    pub runner_id: &'a str,
    /// How another replica reaches it.
    pub address: &'a str,
    /// The `mosaicd` version it runs.
    pub version: &'a str,
    /// Now, epoch milliseconds.
    pub now_ms: i64,
    /// When its first lease runs out.
    pub expires_at_ms: i64,
}

/// The agent states a replica still supervises a process in.
const UNFINISHED: [&str; 2] = ["SPAWNING", "RUNNING"];

/// Inserts the runner's row or starts its next epoch. One text for both
/// backends (SQLite numbers `$1`..`$5` in order of first appearance, which
/// is their order here).
const REGISTER: &str = "\
INSERT INTO replicas
    (runner_id, address, epoch, state, version, started_at_ms, heartbeat_at_ms, expires_at_ms)
VALUES ($1, $2, 1, 'serving', $3, $4, $4, $5)
ON CONFLICT (runner_id) DO UPDATE SET
    address = excluded.address,
    epoch = replicas.epoch + 1,
    state = 'serving',
    version = excluded.version,
    started_at_ms = excluded.started_at_ms,
    heartbeat_at_ms = excluded.heartbeat_at_ms,
    expires_at_ms = excluded.expires_at_ms
RETURNING epoch";

#[derive(QueryableByName)]
struct Epoch {
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

impl Store {
    /// Registers `replica` as serving, in the epoch after the runner's last
    /// one (1 for a new runner), with its lease until `expires_at_ms`.
    /// Returns that epoch.
    pub async fn register_replica(&self, replica: &NewReplica<'_>) -> Result<i64, StoreError> {
        let epoch: Epoch = with_connection!(self, |conn| {
            diesel::sql_query(REGISTER)
                .bind::<Text, _>(replica.runner_id)
                .bind::<Text, _>(replica.address)
                .bind::<Text, _>(replica.version)
                .bind::<BigInt, _>(replica.now_ms)
                .bind::<BigInt, _>(replica.expires_at_ms)
                .get_result::<Epoch>(conn)
                .await?
        });
        Ok(epoch.epoch)
    }

    /// Renews the lease of `runner_id` in `epoch` until `expires_at_ms`.
    /// False when that epoch is over (another replica took the runner's
    /// agents over, or the runner started again elsewhere): the caller no
    /// longer supervises anything.
    pub async fn heartbeat_replica(
        &self,
        runner_id: &str,
        epoch: i64,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let updated = with_connection!(self, |conn| {
            diesel::update(
                replicas::table
                    .find(runner_id)
                    .filter(replicas::epoch.eq(epoch))
                    .filter(replicas::state.eq("serving")),
            )
            .set((
                replicas::heartbeat_at_ms.eq(now_ms),
                replicas::expires_at_ms.eq(expires_at_ms),
            ))
            .execute(conn)
            .await?
        });
        Ok(updated == 1)
    }

    /// Marks `runner_id` in `epoch` stopped, its lease over at `now_ms`.
    pub async fn stop_replica(
        &self,
        runner_id: &str,
        epoch: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::update(
                replicas::table
                    .find(runner_id)
                    .filter(replicas::epoch.eq(epoch)),
            )
            .set((
                replicas::state.eq("stopped"),
                replicas::expires_at_ms.eq(now_ms),
            ))
            .execute(conn)
            .await?;
        });
        Ok(())
    }

    /// The replicas other than `except` that say serving but whose lease
    /// ran out by `now_ms`: (runner id, epoch).
    pub async fn expired_replicas(
        &self,
        except: &str,
        now_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(with_connection!(self, |conn| {
            replicas::table
                .filter(replicas::state.eq("serving"))
                .filter(replicas::expires_at_ms.le(now_ms))
                .filter(replicas::runner_id.ne(except))
                .select((replicas::runner_id, replicas::epoch))
                .load(conn)
                .await?
        }))
    }

    /// Takes an expired replica over: marks `runner_id` lost in the next
    /// epoch, if it is still serving in `epoch` with its lease run out by
    /// `now_ms`. True for the one caller that did it; its old epoch's
    /// heartbeats are refused from now on.
    pub async fn take_over_replica(
        &self,
        runner_id: &str,
        epoch: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let updated = with_connection!(self, |conn| {
            diesel::update(
                replicas::table
                    .find(runner_id)
                    .filter(replicas::epoch.eq(epoch))
                    .filter(replicas::state.eq("serving"))
                    .filter(replicas::expires_at_ms.le(now_ms)),
            )
            .set((replicas::state.eq("lost"), replicas::epoch.eq(epoch + 1)))
            .execute(conn)
            .await?
        });
        Ok(updated == 1)
    }

    /// The registered replica of `runner_id`, if any: where to reach the
    /// supervisor of that runner's agents.
    pub async fn get_replica(&self, runner_id: &str) -> Result<Option<ReplicaRecord>, StoreError> {
        Ok(with_connection!(self, |conn| {
            replicas::table
                .find(runner_id)
                .select(ReplicaRecord::as_select())
                .first(conn)
                .await
                .optional()?
        }))
    }

    /// Every registered replica, with how many agents each supervises (not
    /// yet ended), by runner id.
    pub async fn list_replicas(&self) -> Result<Vec<(ReplicaRecord, u64)>, StoreError> {
        let (rows, counts) = with_connection!(self, |conn| {
            let rows: Vec<ReplicaRecord> = replicas::table
                .select(ReplicaRecord::as_select())
                .order(replicas::started_at_ms.asc())
                .load(conn)
                .await?;
            let counts: Vec<(String, i64)> = super::schema::agents::table
                .inner_join(agent_status::table)
                .filter(agent_status::state.eq_any(UNFINISHED))
                .group_by(super::schema::agents::runner_id)
                .select((super::schema::agents::runner_id, diesel::dsl::count_star()))
                .load(conn)
                .await?;
            (rows, counts)
        });
        let counts: std::collections::HashMap<String, i64> = counts.into_iter().collect();
        Ok(rows
            .into_iter()
            .map(|row| {
                let supervised = counts.get(&row.runner_id).copied().unwrap_or(0);
                (row, u64::try_from(supervised).unwrap_or(0))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_on_both_backends;

    fn replica<'a>(runner_id: &'a str, now_ms: i64) -> NewReplica<'a> {
        NewReplica {
            runner_id,
            address: "https://127.0.0.1:7443",
            version: "0.1.0",
            now_ms,
            expires_at_ms: now_ms + 3_000,
        }
    }

    async fn each_start_is_a_new_epoch_and_an_old_epoch_cannot_beat(store: Store) {
        assert_eq!(
            store
                .register_replica(&replica("r1", 1_000))
                .await
                .expect("register"),
            1
        );
        assert_eq!(
            store
                .register_replica(&replica("r2", 1_000))
                .await
                .expect("register"),
            1
        );
        assert!(
            store
                .heartbeat_replica("r1", 1, 2_000, 5_000)
                .await
                .expect("beat"),
            "the current epoch beats"
        );
        // r1 starts again: epoch 2; the process of epoch 1 is fenced out.
        assert_eq!(
            store
                .register_replica(&replica("r1", 3_000))
                .await
                .expect("register"),
            2
        );
        assert!(
            !store
                .heartbeat_replica("r1", 1, 3_500, 6_500)
                .await
                .expect("beat")
        );
        assert!(
            store
                .heartbeat_replica("r1", 2, 3_500, 6_500)
                .await
                .expect("beat")
        );
        let found = store
            .get_replica("r1")
            .await
            .expect("get")
            .expect("registered");
        assert_eq!(
            (found.epoch, found.address.as_str(), found.expires_at_ms),
            (2, "https://127.0.0.1:7443", 6_500)
        );
        assert!(store.get_replica("nobody").await.expect("get").is_none());
        // A clean stop ends the lease; a stopped replica does not beat.
        store.stop_replica("r2", 1, 4_000).await.expect("stop");
        assert!(
            !store
                .heartbeat_replica("r2", 1, 4_100, 7_100)
                .await
                .expect("beat")
        );

        let listed = store.list_replicas().await.expect("list");
        let shown: Vec<(&str, i64, &str, u64)> = listed
            .iter()
            .map(|(replica, agents)| {
                (
                    replica.runner_id.as_str(),
                    replica.epoch,
                    replica.state_at(5_000),
                    *agents,
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![("r2", 1, "stopped", 0), ("r1", 2, "serving", 0)]
        );
        // Past its lease, a replica that says serving shows as expired.
        assert_eq!(listed[1].0.state_at(6_500), "expired");

        // Expired: another replica sees it, and one of two takes it over
        // (the next epoch, lost); its process can no longer beat.
        assert!(
            store
                .expired_replicas("r3", 6_499)
                .await
                .expect("expired")
                .is_empty()
        );
        assert_eq!(
            store.expired_replicas("r3", 6_500).await.expect("expired"),
            vec![("r1".to_owned(), 2)]
        );
        assert!(
            store
                .expired_replicas("r1", 6_500)
                .await
                .expect("expired")
                .is_empty()
        );
        assert!(
            store
                .take_over_replica("r1", 2, 6_500)
                .await
                .expect("take over")
        );
        assert!(
            !store
                .take_over_replica("r1", 2, 6_500)
                .await
                .expect("take over")
        );
        assert!(
            !store
                .heartbeat_replica("r1", 2, 6_600, 9_600)
                .await
                .expect("beat")
        );
        let listed = store.list_replicas().await.expect("list");
        assert_eq!(
            (listed[1].0.epoch, listed[1].0.state_at(7_000)),
            (3, "lost")
        );
        // It starts again: serving, in the epoch after.
        assert_eq!(
            store
                .register_replica(&replica("r1", 8_000))
                .await
                .expect("register"),
            4
        );
    }

    test_on_both_backends!(each_start_is_a_new_epoch_and_an_old_epoch_cannot_beat);
}
