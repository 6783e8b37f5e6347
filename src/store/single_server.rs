//! One server per SQLite file. SQLite is the embedded single-process
//! default: two daemons serving one file would both supervise its agents,
//! both checkpoint its WAL and both prune, none of it arranged between them.
//! A serving daemon holds an exclusive lock on `<file>.serving` for as long
//! as it serves; a second is refused, naming the file. Offline commands
//! (`apikey`, `identity show`, ...) take no lock: SQLite keeps them safe.
//! PostgreSQL is shared by replicas on purpose; there nothing is locked.

use std::fs::{File, OpenOptions, TryLockError};

use super::{Conflict, Store, StoreError};

/// Held while serving; the lock goes with the file handle when dropped (or
/// when the process dies).
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct ServingLock {
    _file: Option<File>,
}

impl Store {
    /// Takes the serving lock of this store's SQLite file (nothing on
    /// PostgreSQL). `StoreError::Conflict` naming the file when another
    /// daemon serves it; `StoreError::Unavailable` when the lock file cannot
    /// be opened.
    pub fn lock_for_serving(&self) -> Result<ServingLock, StoreError> {
        let Some(database) = &self.sqlite_path else {
            return Ok(ServingLock { _file: None });
        };
        let path = format!("{database}.serving");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| StoreError::Unavailable(format!("cannot open {path}: {error}")))?;
        match file.try_lock() {
            Ok(()) => Ok(ServingLock { _file: Some(file) }),
            Err(TryLockError::WouldBlock) => {
                Err(StoreError::Conflict(Conflict::ServedElsewhere(format!(
                    "another mosaicd is serving the SQLite database {database} (it holds {path}); \
                 SQLite is for one daemon: stop the other, or run replicas on PostgreSQL"
                ))))
            }
            Err(TryLockError::Error(error)) => Err(StoreError::Unavailable(format!(
                "cannot lock {path}: {error}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDatabase;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_server_of_one_sqlite_file_is_refused_until_the_first_stops() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let database = TestDatabase::sqlite(dir.path());
        let first = database.migrated_store().await.expect("store");
        let second = Store::connect(&database.url).await.expect("connect");
        let held = first.lock_for_serving().expect("the first serves");
        let file = database.url.trim_start_matches("sqlite://").to_owned();
        match second.lock_for_serving() {
            Err(StoreError::Conflict(Conflict::ServedElsewhere(message))) => {
                assert!(message.contains(&file), "{message}")
            }
            other => panic!("a second server must be refused: {other:?}"),
        }
        drop(held);
        let _taken = second
            .lock_for_serving()
            .expect("free once the first stops");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_is_shared_on_purpose() {
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let first = Store::connect(&database.url).await.expect("connect");
        let second = Store::connect(&database.url).await.expect("connect");
        let _one = first.lock_for_serving().expect("no lock on PostgreSQL");
        let _two = second.lock_for_serving().expect("no lock on PostgreSQL");
        drop((first, second));
        database.cleanup().await.expect("drop the test database");
    }
}
