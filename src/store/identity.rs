//! Queries for this instance's identity: its profile row and the history of
//! its signing keys.

use std::collections::BTreeMap;
use std::fmt;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::{instance, instance_keys};
use super::{Conflict, Store, StoreError};

/// This instance's profile: who it is and what it offers.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub name: String,
    pub public_url: String,
    pub capabilities: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One of the instance's signing keys.
///
/// `Debug` prints `<sealed>` for the private key: it is encrypted, but it
/// still has no business in a log line.
#[derive(Clone, PartialEq)]
pub struct InstanceKeyRecord {
    pub key_id: String,
    /// SPKI DER.
    pub public_key: Vec<u8>,
    /// Nonce followed by ciphertext, as the identity module sealed it.
    pub sealed_private_key: Vec<u8>,
    pub created_at_ms: i64,
    /// Until when signatures by a retired key are still accepted; `None` for
    /// the current key.
    pub valid_until_ms: Option<i64>,
    pub is_current: bool,
    /// The self-signed certificate made for this key (DER), served by every
    /// replica; `None` for a key stored before certificates were kept.
    pub certificate_der: Option<Vec<u8>>,
}

impl fmt::Debug for InstanceKeyRecord {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("InstanceKeyRecord")
            .field("key_id", &self.key_id)
            .field("public_key", &self.public_key)
            .field("sealed_private_key", &format_args!("<sealed>"))
            .field("created_at_ms", &self.created_at_ms)
            .field("valid_until_ms", &self.valid_until_ms)
            .field("is_current", &self.is_current)
            .field(
                "certificate_der",
                &self.certificate_der.as_ref().map(Vec::len),
            )
            .finish()
    }
}

impl Store {
    /// The instance and all its keys, newest first; `None` before the
    /// instance has been created.
    pub async fn load_instance(
        &self,
    ) -> Result<Option<(InstanceRecord, Vec<InstanceKeyRecord>)>, StoreError> {
        let loaded = with_connection!(self, |conn| {
            let instance_row = instance::table
                .select(InstanceRow::as_select())
                .first(conn)
                .await
                .optional()?;
            match instance_row {
                None => None,
                Some(instance_row) => {
                    let key_rows: Vec<InstanceKeyRow> = instance_keys::table
                        .select(InstanceKeyRow::as_select())
                        .order((
                            instance_keys::created_at_ms.desc(),
                            instance_keys::key_id.desc(),
                        ))
                        .load(conn)
                        .await?;
                    Some((instance_row, key_rows))
                }
            }
        });
        let Some((instance_row, key_rows)) = loaded else {
            return Ok(None);
        };
        let keys = key_rows.into_iter().map(InstanceKeyRecord::from).collect();
        Ok(Some((instance_row.into_record()?, keys)))
    }

    /// Stores the instance and its first key, which becomes the current key
    /// whatever `key.is_current` and `key.valid_until_ms` say. Both rows are
    /// written in one transaction; `StoreError::Conflict` if an instance
    /// already exists, which is then left as it was.
    pub async fn create_instance(
        &self,
        instance: &InstanceRecord,
        key: &InstanceKeyRecord,
    ) -> Result<(), StoreError> {
        let capabilities_json = encode_capabilities(&instance.capabilities)?;
        let metadata_json = encode_metadata(&instance.metadata)?;
        let instance_row = NewInstanceRow {
            id: &instance.instance_id,
            name: &instance.name,
            public_url: &instance.public_url,
            capabilities_json: &capabilities_json,
            metadata_json: &metadata_json,
            created_at_ms: instance.created_at_ms,
            updated_at_ms: instance.updated_at_ms,
        };
        let key_row = NewInstanceKeyRow::current(key);
        with_connection!(self, |conn| {
            conn.transaction::<_, StoreError, _>(async |conn| {
                diesel::insert_into(instance::table)
                    .values(&instance_row)
                    .execute(conn)
                    .await
                    .map_err(instance_already_exists)?;
                diesel::insert_into(instance_keys::table)
                    .values(&key_row)
                    .execute(conn)
                    .await?;
                Ok(())
            })
            .await
        })
    }

    /// Replaces the instance's profile. `StoreError::NotFound` if there is no
    /// instance.
    pub async fn update_instance_profile(
        &self,
        name: &str,
        public_url: &str,
        capabilities: &[String],
        metadata: &BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let capabilities_json = encode_capabilities(capabilities)?;
        let metadata_json = encode_metadata(metadata)?;
        let updated_rows = with_connection!(self, |conn| {
            diesel::update(instance::table)
                .set((
                    instance::name.eq(name),
                    instance::public_url.eq(public_url),
                    instance::capabilities_json.eq(&capabilities_json),
                    instance::metadata_json.eq(&metadata_json),
                    instance::updated_at_ms.eq(now_ms),
                ))
                .execute(conn)
                .await?
        });
        if updated_rows == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Makes `new_key` the current key, in one transaction: the key that was
    /// current stays valid until `previous_valid_until_ms` and is marked
    /// retired at `new_key.created_at_ms`.
    ///
    /// `StoreError::NotFound` if there is no current key (no instance yet, or
    /// a concurrent rotation got there first); nothing is changed then.
    ///
    /// The other replicas are then told to take the new key up (on
    /// PostgreSQL; they also check on a timer, so a notification that fails
    /// is logged, not returned: the rotation has happened).
    pub async fn rotate_instance_key(
        &self,
        new_key: &InstanceKeyRecord,
        previous_valid_until_ms: i64,
    ) -> Result<(), StoreError> {
        self.write_rotation(new_key, previous_valid_until_ms)
            .await?;
        if let Err(error) = self.notify(super::Topic::Identity).await {
            tracing::warn!(%error, "could not tell the other replicas of the rotation; they will see it at their next check");
        }
        Ok(())
    }

    async fn write_rotation(
        &self,
        new_key: &InstanceKeyRecord,
        previous_valid_until_ms: i64,
    ) -> Result<(), StoreError> {
        let key_row = NewInstanceKeyRow::current(new_key);
        with_connection!(self, |conn| {
            conn.transaction::<_, StoreError, _>(async |conn| {
                // The write comes first: a SQLite transaction that read
                // before writing could fail at once on a concurrent writer
                // instead of waiting for it.
                let retired_rows =
                    diesel::update(instance_keys::table.filter(instance_keys::is_current.eq(true)))
                        .set((
                            instance_keys::is_current.eq(false),
                            instance_keys::valid_until_ms.eq(Some(previous_valid_until_ms)),
                            instance_keys::retired_at_ms.eq(Some(new_key.created_at_ms)),
                        ))
                        .execute(conn)
                        .await?;
                if retired_rows == 0 {
                    return Err(StoreError::NotFound);
                }
                diesel::insert_into(instance_keys::table)
                    .values(&key_row)
                    .execute(conn)
                    .await?;
                Ok(())
            })
            .await
        })
    }

    /// Stores `certificate_der` as the certificate of key `key_id`.
    /// `StoreError::NotFound` if there is no such key.
    pub async fn set_key_certificate(
        &self,
        key_id: &str,
        certificate_der: &[u8],
    ) -> Result<(), StoreError> {
        let updated_rows = with_connection!(self, |conn| {
            diesel::update(instance_keys::table.filter(instance_keys::key_id.eq(key_id)))
                .set(instance_keys::certificate_der.eq(Some(certificate_der)))
                .execute(conn)
                .await?
        });
        if updated_rows == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Deletes retired keys whose `valid_until_ms` is before `now_ms` and
    /// returns how many there were. The current key is never deleted.
    pub async fn prune_expired_keys(&self, now_ms: i64) -> Result<u64, StoreError> {
        let deleted_rows = with_connection!(self, |conn| {
            diesel::delete(
                instance_keys::table
                    .filter(instance_keys::is_current.eq(false))
                    .filter(instance_keys::valid_until_ms.lt(now_ms)),
            )
            .execute(conn)
            .await?
        });
        Ok(u64::try_from(deleted_rows).unwrap_or(u64::MAX))
    }
}

/// Turns the unique violation of the single-row index into a message a user
/// can act on.
fn instance_already_exists(error: diesel::result::Error) -> StoreError {
    Conflict::InstanceExists.mark(error)
}

fn encode_capabilities(capabilities: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(capabilities).map_err(StoreError::unencodable)
}

fn encode_metadata(metadata: &BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(metadata).map_err(StoreError::unencodable)
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = instance, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct InstanceRow {
    id: String,
    name: String,
    public_url: String,
    capabilities_json: String,
    metadata_json: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl InstanceRow {
    fn into_record(self) -> Result<InstanceRecord, StoreError> {
        Ok(InstanceRecord {
            instance_id: self.id,
            name: self.name,
            public_url: self.public_url,
            capabilities: serde_json::from_str(&self.capabilities_json)
                .map_err(StoreError::undecodable)?,
            metadata: serde_json::from_str(&self.metadata_json).map_err(StoreError::undecodable)?,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = instance)]
struct NewInstanceRow<'a> {
    id: &'a str,
    name: &'a str,
    public_url: &'a str,
    capabilities_json: &'a str,
    metadata_json: &'a str,
    created_at_ms: i64,
    updated_at_ms: i64,
}

/// A stored key. No `Debug`: it holds the sealed private key.
#[derive(Queryable, Selectable)]
#[diesel(table_name = instance_keys, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct InstanceKeyRow {
    key_id: String,
    public_key: Vec<u8>,
    sealed_private_key: Vec<u8>,
    created_at_ms: i64,
    valid_until_ms: Option<i64>,
    is_current: bool,
    certificate_der: Option<Vec<u8>>,
}

impl From<InstanceKeyRow> for InstanceKeyRecord {
    fn from(row: InstanceKeyRow) -> InstanceKeyRecord {
        InstanceKeyRecord {
            key_id: row.key_id,
            public_key: row.public_key,
            sealed_private_key: row.sealed_private_key,
            created_at_ms: row.created_at_ms,
            valid_until_ms: row.valid_until_ms,
            is_current: row.is_current,
            certificate_der: row.certificate_der,
        }
    }
}

/// A key to insert as the current one. No `Debug`: it holds the sealed
/// private key.
#[derive(Insertable)]
#[diesel(table_name = instance_keys)]
struct NewInstanceKeyRow<'a> {
    key_id: &'a str,
    public_key: &'a [u8],
    sealed_private_key: &'a [u8],
    created_at_ms: i64,
    valid_until_ms: Option<i64>,
    is_current: bool,
    retired_at_ms: Option<i64>,
    certificate_der: Option<&'a [u8]>,
}

impl<'a> NewInstanceKeyRow<'a> {
    /// `key` as the current key: valid until further notice, not retired.
    fn current(key: &'a InstanceKeyRecord) -> NewInstanceKeyRow<'a> {
        NewInstanceKeyRow {
            key_id: &key.key_id,
            public_key: &key.public_key,
            sealed_private_key: &key.sealed_private_key,
            created_at_ms: key.created_at_ms,
            valid_until_ms: None,
            is_current: true,
            retired_at_ms: None,
            certificate_der: key.certificate_der.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_on_both_backends;

    fn instance_record(instance_id: &str, name: &str) -> InstanceRecord {
        InstanceRecord {
            instance_id: instance_id.to_owned(),
            name: name.to_owned(),
            public_url: format!("https://{name}.example:7443"),
            capabilities: vec!["agents".to_owned(), "jobs".to_owned()],
            metadata: BTreeMap::from([("region".to_owned(), "eu-west".to_owned())]),
            created_at_ms: 1_000,
            updated_at_ms: 1_000,
        }
    }

    fn key_record(key_id: &str, created_at_ms: i64) -> InstanceKeyRecord {
        InstanceKeyRecord {
            key_id: key_id.to_owned(),
            public_key: format!("public {key_id}").into_bytes(),
            sealed_private_key: format!("sealed {key_id}").into_bytes(),
            created_at_ms,
            valid_until_ms: None,
            is_current: true,
            certificate_der: Some(format!("certificate {key_id}").into_bytes()),
        }
    }

    fn retired(mut key: InstanceKeyRecord, valid_until_ms: i64) -> InstanceKeyRecord {
        key.is_current = false;
        key.valid_until_ms = Some(valid_until_ms);
        key
    }

    async fn load(store: &Store) -> (InstanceRecord, Vec<InstanceKeyRecord>) {
        store
            .load_instance()
            .await
            .expect("load the instance")
            .expect("an instance exists")
    }

    async fn instance_round_trip(store: Store) {
        assert_eq!(store.load_instance().await.expect("load"), None);
        let instance = instance_record("0193f4a0-0000-7000-8000-000000000001", "alpha");
        let key = key_record("key-1", 1_000);
        store
            .create_instance(&instance, &key)
            .await
            .expect("create");
        assert_eq!(load(&store).await, (instance.clone(), vec![key.clone()]));

        let capabilities = vec!["federation".to_owned()];
        let metadata = BTreeMap::from([
            ("region".to_owned(), "us-east".to_owned()),
            ("owner".to_owned(), "ops team".to_owned()),
        ]);
        store
            .update_instance_profile(
                "beta",
                "https://beta.example",
                &capabilities,
                &metadata,
                9_000,
            )
            .await
            .expect("update");
        let expected = InstanceRecord {
            name: "beta".to_owned(),
            public_url: "https://beta.example".to_owned(),
            capabilities,
            metadata,
            updated_at_ms: 9_000,
            ..instance
        };
        assert_eq!(load(&store).await, (expected, vec![key]));
    }

    async fn creating_twice_conflicts_and_keeps_the_first(store: Store) {
        let first = instance_record("0193f4a0-0000-7000-8000-00000000000a", "first");
        let first_key = key_record("key-a", 1_000);
        store
            .create_instance(&first, &first_key)
            .await
            .expect("create");

        let second = instance_record("0193f4a0-0000-7000-8000-00000000000b", "second");
        let outcome = store
            .create_instance(&second, &key_record("key-b", 2_000))
            .await;
        assert!(
            matches!(
                &outcome,
                Err(StoreError::Conflict(Conflict::InstanceExists))
            ),
            "{outcome:?}"
        );
        assert_eq!(load(&store).await, (first, vec![first_key]));
    }

    async fn concurrent_creates_leave_one_instance(store: Store) {
        let first = instance_record("0193f4a0-0000-7000-8000-0000000000c1", "first");
        let second = instance_record("0193f4a0-0000-7000-8000-0000000000c2", "second");
        let (first_key, second_key) = (key_record("key-c1", 1_000), key_record("key-c2", 1_000));
        let (first_outcome, second_outcome) = tokio::join!(
            store.create_instance(&first, &first_key),
            store.create_instance(&second, &second_key),
        );
        let (winner, winner_key) = match (first_outcome, second_outcome) {
            (Ok(()), Err(StoreError::Conflict(_))) => (first, first_key),
            (Err(StoreError::Conflict(_)), Ok(())) => (second, second_key),
            outcomes => panic!("expected one success and one conflict, got {outcomes:?}"),
        };
        assert_eq!(load(&store).await, (winner, vec![winner_key]));
    }

    async fn rotation_keeps_the_previous_key_until_it_expires(store: Store) {
        let instance = instance_record("0193f4a0-0000-7000-8000-000000000002", "alpha");
        let first_key = key_record("key-1", 1_000);
        store
            .create_instance(&instance, &first_key)
            .await
            .expect("create");

        let second_key = key_record("key-2", 2_000);
        store
            .rotate_instance_key(&second_key, 5_000)
            .await
            .expect("rotate");
        let (_, keys) = load(&store).await;
        assert_eq!(keys, vec![second_key, retired(first_key, 5_000)]);
    }

    async fn failed_rotation_changes_nothing(store: Store) {
        let instance = instance_record("0193f4a0-0000-7000-8000-000000000003", "alpha");
        let key = key_record("key-1", 1_000);
        store
            .create_instance(&instance, &key)
            .await
            .expect("create");

        // Reusing the current key's id fails on insert, after the current key
        // has been retired inside the transaction.
        let outcome = store
            .rotate_instance_key(&key_record("key-1", 2_000), 5_000)
            .await;
        assert!(
            matches!(outcome, Err(StoreError::Conflict(_))),
            "{outcome:?}"
        );
        assert_eq!(load(&store).await, (instance, vec![key]));
    }

    async fn changing_a_missing_instance_is_not_found(store: Store) {
        let rotated = store
            .rotate_instance_key(&key_record("key-1", 1_000), 5_000)
            .await;
        assert!(matches!(rotated, Err(StoreError::NotFound)), "{rotated:?}");
        let updated = store
            .update_instance_profile("a", "https://a.example", &[], &BTreeMap::new(), 1_000)
            .await;
        assert!(matches!(updated, Err(StoreError::NotFound)), "{updated:?}");
        assert_eq!(store.load_instance().await.expect("load"), None);
    }

    async fn pruning_removes_only_expired_retired_keys(store: Store) {
        let instance = instance_record("0193f4a0-0000-7000-8000-000000000004", "alpha");
        let (key_1, key_2, key_3) = (
            key_record("key-1", 1_000),
            key_record("key-2", 2_000),
            key_record("key-3", 4_000),
        );
        store
            .create_instance(&instance, &key_1)
            .await
            .expect("create");
        store
            .rotate_instance_key(&key_2, 3_000)
            .await
            .expect("rotate to 2");
        store
            .rotate_instance_key(&key_3, 10_000)
            .await
            .expect("rotate to 3");

        // A key valid until exactly now is still valid.
        assert_eq!(store.prune_expired_keys(3_000).await.expect("prune"), 0);
        assert_eq!(store.prune_expired_keys(5_000).await.expect("prune"), 1);
        let (_, keys) = load(&store).await;
        assert_eq!(keys, vec![key_3.clone(), retired(key_2, 10_000)]);

        assert_eq!(store.prune_expired_keys(i64::MAX).await.expect("prune"), 1);
        let (_, keys) = load(&store).await;
        assert_eq!(keys, vec![key_3]);
    }

    test_on_both_backends!(
        instance_round_trip,
        creating_twice_conflicts_and_keeps_the_first,
        concurrent_creates_leave_one_instance,
        rotation_keeps_the_previous_key_until_it_expires,
        failed_rotation_changes_nothing,
        changing_a_missing_instance_is_not_found,
        pruning_removes_only_expired_retired_keys,
        a_key_keeps_the_certificate_stored_for_it,
    );

    async fn a_key_keeps_the_certificate_stored_for_it(store: Store) {
        let first = InstanceKeyRecord {
            certificate_der: None,
            ..key_record("key-1", 1_000)
        };
        store
            .create_instance(&instance_record("instance-1", "node-a"), &first)
            .await
            .expect("create");
        store
            .set_key_certificate("key-1", b"made at the first start")
            .await
            .expect("store the certificate");
        let second = key_record("key-2", 2_000);
        store
            .rotate_instance_key(&second, 10_000)
            .await
            .expect("rotate");
        let (_, keys) = store
            .load_instance()
            .await
            .expect("load")
            .expect("instance");
        let certificates: Vec<(&str, Option<&[u8]>)> = keys
            .iter()
            .map(|key| (key.key_id.as_str(), key.certificate_der.as_deref()))
            .collect();
        assert_eq!(
            certificates,
            vec![
                ("key-2", Some(b"certificate key-2".as_slice())),
                ("key-1", Some(b"made at the first start".as_slice())),
            ]
        );
        let missing = store.set_key_certificate("key-9", b"x").await;
        assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    }

    #[test]
    fn debug_output_hides_the_sealed_private_key() {
        let key = InstanceKeyRecord {
            sealed_private_key: b"do-not-print".to_vec(),
            ..key_record("key-1", 1_000)
        };
        let printed = format!("{key:?}");
        assert!(printed.contains("<sealed>"), "{printed}");
        assert!(
            !printed.contains(&format!("{:?}", b"do-not-print".to_vec())),
            "{printed}"
        );
    }
}
