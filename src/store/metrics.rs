//! Cheap grouped counts read when `/metrics` is scraped.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{agent_status, federation_connections, jobs};
use super::{Store, StoreError};

impl Store {
    /// Agents per state, one row per state present.
    pub async fn count_agents_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = with_connection!(self, |conn| {
            agent_status::table
                .group_by(agent_status::state)
                .select((agent_status::state, diesel::dsl::count_star()))
                .order(agent_status::state)
                .load::<(String, i64)>(conn)
                .await?
        });
        Ok(rows)
    }

    /// Jobs per state, one row per state present.
    pub async fn count_jobs_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = with_connection!(self, |conn| {
            jobs::table
                .group_by(jobs::state)
                .select((jobs::state, diesel::dsl::count_star()))
                .order(jobs::state)
                .load::<(String, i64)>(conn)
                .await?
        });
        Ok(rows)
    }

    /// Federation connections per (state, reachable).
    pub async fn count_connections_by_state(&self) -> Result<Vec<(String, bool, i64)>, StoreError> {
        let rows = with_connection!(self, |conn| {
            federation_connections::table
                .group_by((
                    federation_connections::state,
                    federation_connections::reachable,
                ))
                .select((
                    federation_connections::state,
                    federation_connections::reachable,
                    diesel::dsl::count_star(),
                ))
                .order((
                    federation_connections::state,
                    federation_connections::reachable,
                ))
                .load::<(String, bool, i64)>(conn)
                .await?
        });
        Ok(rows)
    }
}
