//! Queries for client API keys: registering, looking up by hash, listing,
//! revoking and recording use.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::api_keys;
use super::{Store, StoreError};

/// A client API key as stored: only a hash of the key itself is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub key_hash: Vec<u8>,
    /// The first characters of the key, shown in lists so a user can tell
    /// keys apart.
    pub prefix: String,
    /// Each scope is non-empty and has no comma: they are stored comma
    /// separated.
    pub scopes: Vec<String>,
    pub created_at_ms: i64,
    pub last_used_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// Separates scopes in the `scopes` column.
const SCOPE_SEPARATOR: char = ',';

impl Store {
    /// Registers a key. `StoreError::Conflict` if its id or hash is already
    /// registered.
    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let scopes = encode_scopes(&key.scopes)?;
        let row = NewApiKeyRow {
            id: &key.id,
            name: &key.name,
            key_hash: &key.key_hash,
            prefix: &key.prefix,
            scopes: &scopes,
            created_at_ms: key.created_at_ms,
            last_used_at_ms: key.last_used_at_ms,
            revoked_at_ms: key.revoked_at_ms,
        };
        with_connection!(self, |conn| {
            diesel::insert_into(api_keys::table)
                .values(&row)
                .execute(conn)
                .await?
        });
        Ok(())
    }

    /// The key with this hash, revoked or not; the caller decides what a
    /// revoked key means.
    pub async fn find_api_key_by_hash(
        &self,
        key_hash: &[u8],
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = with_connection!(self, |conn| {
            api_keys::table
                .filter(api_keys::key_hash.eq(key_hash))
                .select(ApiKeyRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        Ok(row.map(ApiKeyRecord::from))
    }

    /// All keys, revoked ones included, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            api_keys::table
                .select(ApiKeyRow::as_select())
                .order((api_keys::created_at_ms.asc(), api_keys::id.asc()))
                .load(conn)
                .await?
        });
        Ok(rows.into_iter().map(ApiKeyRecord::from).collect())
    }

    /// Revokes the key and returns it as now stored. A key that was already
    /// revoked keeps its first `revoked_at_ms`. `StoreError::NotFound` if no
    /// key has this id.
    pub async fn revoke_api_key(&self, id: &str, now_ms: i64) -> Result<ApiKeyRecord, StoreError> {
        let row = with_connection!(self, |conn| {
            // Only an unrevoked key is updated, so the first revocation time
            // stands even when two revocations race.
            diesel::update(
                api_keys::table
                    .filter(api_keys::id.eq(id))
                    .filter(api_keys::revoked_at_ms.is_null()),
            )
            .set(api_keys::revoked_at_ms.eq(Some(now_ms)))
            .execute(conn)
            .await?;
            api_keys::table
                .filter(api_keys::id.eq(id))
                .select(ApiKeyRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(ApiKeyRecord::from).ok_or(StoreError::NotFound)
    }

    /// Records that the key was used at `now_ms`. `StoreError::NotFound` if
    /// no key has this id.
    pub async fn touch_api_key(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let updated_rows = with_connection!(self, |conn| {
            diesel::update(api_keys::table.filter(api_keys::id.eq(id)))
                .set(api_keys::last_used_at_ms.eq(Some(now_ms)))
                .execute(conn)
                .await?
        });
        if updated_rows == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}

/// Joins scopes with commas, refusing any that would not split back into
/// the same list.
fn encode_scopes(scopes: &[String]) -> Result<String, StoreError> {
    if let Some(bad) = scopes
        .iter()
        .find(|scope| scope.is_empty() || scope.contains(SCOPE_SEPARATOR))
    {
        return Err(StoreError::unencodable(format!(
            "api key scope {bad:?} is empty or contains a comma"
        )));
    }
    Ok(scopes.join(&SCOPE_SEPARATOR.to_string()))
}

fn decode_scopes(scopes: &str) -> Vec<String> {
    scopes
        .split(SCOPE_SEPARATOR)
        .filter(|scope| !scope.is_empty())
        .map(str::to_owned)
        .collect()
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct ApiKeyRow {
    id: String,
    name: String,
    key_hash: Vec<u8>,
    prefix: String,
    scopes: String,
    created_at_ms: i64,
    last_used_at_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
}

impl From<ApiKeyRow> for ApiKeyRecord {
    fn from(row: ApiKeyRow) -> ApiKeyRecord {
        ApiKeyRecord {
            id: row.id,
            name: row.name,
            key_hash: row.key_hash,
            prefix: row.prefix,
            scopes: decode_scopes(&row.scopes),
            created_at_ms: row.created_at_ms,
            last_used_at_ms: row.last_used_at_ms,
            revoked_at_ms: row.revoked_at_ms,
        }
    }
}

#[derive(Insertable)]
#[diesel(table_name = api_keys)]
struct NewApiKeyRow<'a> {
    id: &'a str,
    name: &'a str,
    key_hash: &'a [u8],
    prefix: &'a str,
    scopes: &'a str,
    created_at_ms: i64,
    last_used_at_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_on_both_backends;

    fn api_key(id: &str, hash: &[u8], created_at_ms: i64) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.to_owned(),
            name: format!("key {id}"),
            key_hash: hash.to_vec(),
            prefix: format!("mk_{id}"),
            scopes: vec!["read".to_owned(), "jobs:write".to_owned()],
            created_at_ms,
            last_used_at_ms: None,
            revoked_at_ms: None,
        }
    }

    async fn api_key_lifecycle(store: Store) {
        let older = api_key("older", &[1, 2, 3], 1_000);
        let newer = ApiKeyRecord {
            scopes: Vec::new(),
            ..api_key("newer", &[4, 5, 6], 2_000)
        };
        store.insert_api_key(&newer).await.expect("insert newer");
        store.insert_api_key(&older).await.expect("insert older");

        let found = store.find_api_key_by_hash(&[1, 2, 3]).await.expect("find");
        assert_eq!(found, Some(older.clone()));
        assert_eq!(store.find_api_key_by_hash(&[9]).await.expect("find"), None);
        assert_eq!(
            store.list_api_keys().await.expect("list"),
            vec![older.clone(), newer.clone()]
        );

        store.touch_api_key("older", 3_000).await.expect("touch");
        let revoked = store.revoke_api_key("older", 4_000).await.expect("revoke");
        let expected = ApiKeyRecord {
            last_used_at_ms: Some(3_000),
            revoked_at_ms: Some(4_000),
            ..older
        };
        assert_eq!(revoked, expected);
        let revoked_again = store
            .revoke_api_key("older", 5_000)
            .await
            .expect("revoke again");
        assert_eq!(revoked_again, expected);
        assert_eq!(
            store.find_api_key_by_hash(&[1, 2, 3]).await.expect("find"),
            Some(expected.clone())
        );
        assert_eq!(
            store.list_api_keys().await.expect("list"),
            vec![expected, newer]
        );
    }

    async fn unknown_ids_are_not_found(store: Store) {
        let revoked = store.revoke_api_key("missing", 1_000).await;
        assert!(matches!(revoked, Err(StoreError::NotFound)), "{revoked:?}");
        let touched = store.touch_api_key("missing", 1_000).await;
        assert!(matches!(touched, Err(StoreError::NotFound)), "{touched:?}");
    }

    async fn a_duplicate_key_hash_conflicts(store: Store) {
        let first = api_key("first", &[7; 32], 1_000);
        store.insert_api_key(&first).await.expect("insert");
        let outcome = store
            .insert_api_key(&api_key("second", &[7; 32], 2_000))
            .await;
        assert!(
            matches!(outcome, Err(StoreError::Conflict(_))),
            "{outcome:?}"
        );
        assert_eq!(store.list_api_keys().await.expect("list"), vec![first]);
    }

    async fn scopes_that_would_not_round_trip_are_refused(store: Store) {
        for scopes in [vec!["read,write".to_owned()], vec![String::new()]] {
            let key = ApiKeyRecord {
                scopes,
                ..api_key("bad", &[8], 1_000)
            };
            let outcome = store.insert_api_key(&key).await;
            assert!(matches!(outcome, Err(StoreError::Query(_))), "{outcome:?}");
        }
        assert_eq!(store.list_api_keys().await.expect("list"), Vec::new());
    }

    test_on_both_backends!(
        api_key_lifecycle,
        unknown_ids_are_not_found,
        a_duplicate_key_hash_conflicts,
        scopes_that_would_not_round_trip_are_refused,
    );
}
