//! Leases on background work that the replicas of one instance share: one
//! holder at a time, for a limited time, with a token that grows with every
//! change of holder (see `crate::replicas::lease` for the rules). The
//! database decides, in one statement, so two replicas asking at once never
//! both get it.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;

use super::schema::replica_leases;
use super::{Store, StoreError};

/// Takes `name` for `holder` until `now_ms + ttl_ms`, or renews it: granted
/// when nobody holds it, when `holder` does, or when the holder's time ran
/// out (then with the next token). One text for both backends: SQLite reads
/// `$1`..`$4` as named parameters numbered in order of first appearance,
/// which is their order here.
const TAKE: &str = "\
INSERT INTO replica_leases (name, holder, token, expires_at_ms)
VALUES ($1, $2, 1, $3)
ON CONFLICT (name) DO UPDATE SET
    holder = excluded.holder,
    token = CASE WHEN replica_leases.holder = excluded.holder
        THEN replica_leases.token ELSE replica_leases.token + 1 END,
    expires_at_ms = excluded.expires_at_ms
WHERE replica_leases.holder = excluded.holder OR replica_leases.expires_at_ms <= $4
RETURNING token";

#[derive(QueryableByName)]
struct Token {
    #[diesel(sql_type = BigInt)]
    token: i64,
}

impl Store {
    /// Takes or renews the lease `name` for `holder` for `ttl_ms` from
    /// `now_ms`: its fencing token if granted, `None` while another holds it.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        let granted: Option<Token> = with_connection!(self, |conn| {
            diesel::sql_query(TAKE)
                .bind::<Text, _>(name)
                .bind::<Text, _>(holder)
                .bind::<BigInt, _>(expires_at_ms)
                .bind::<BigInt, _>(now_ms)
                .get_result::<Token>(conn)
                .await
                .optional()?
        });
        Ok(granted.map(|granted| u64::try_from(granted.token).unwrap_or(0)))
    }

    /// Lets go of `name` if `holder` holds it, so another may take it at
    /// once. The row stays, expired, so the next holder's token still grows.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::update(
                replica_leases::table
                    .filter(replica_leases::name.eq(name))
                    .filter(replica_leases::holder.eq(holder)),
            )
            .set(replica_leases::expires_at_ms.eq(i64::MIN))
            .execute(conn)
            .await?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_on_both_backends;

    async fn one_holder_at_a_time_and_the_next_token_after_expiry(store: Store) {
        // (lease, holder, now, what it gets), in order; each asks for 500 ms.
        let asked: [(&str, &str, i64, Option<u64>); 7] = [
            ("pings", "a", 1_000, Some(1)),
            ("pings", "b", 1_200, None),
            // The holder renews, same token.
            ("pings", "a", 1_400, Some(1)),
            ("pings", "b", 1_800, None),
            // Past the renewed expiry (1 900) another takes it, next token.
            ("pings", "b", 1_900, Some(2)),
            ("pings", "a", 2_000, None),
            // Other names are other leases.
            ("outbox:c1", "a", 2_000, Some(1)),
        ];
        for (name, holder, now_ms, expected) in asked {
            let granted = store
                .take_lease(name, holder, now_ms, 500)
                .await
                .expect("take a lease");
            assert_eq!(granted, expected, "{holder} asking for {name} at {now_ms}");
        }
        // A release lets the next take it at once; another's release is a
        // no-op.
        store.release_lease("pings", "a").await.expect("release");
        assert_eq!(
            store
                .take_lease("pings", "a", 2_100, 500)
                .await
                .expect("take"),
            None
        );
        store.release_lease("pings", "b").await.expect("release");
        assert_eq!(
            store
                .take_lease("pings", "a", 2_100, 500)
                .await
                .expect("take"),
            Some(3)
        );
    }

    test_on_both_backends!(one_holder_at_a_time_and_the_next_token_after_expiry);
}
