//! Telling the other replicas that something they hold in memory changed,
//! through PostgreSQL's LISTEN/NOTIFY. A notification is a hint to look
//! again, never the change itself: whoever listens also checks on a timer,
//! so a notification lost with a connection delays the news, nothing more.
//! SQLite is one process's database: there is no one to tell.

use diesel_async::RunQueryDsl;
use futures::StreamExt as _;

use super::pools::{self, PostgresConnection};
use super::{Store, StoreError};

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// The instance's current key (a rotation through some replica).
    Identity,
    /// Jobs changed; the payload names them (see `coordinator::events`).
    Jobs,
}

impl Topic {
    /// The PostgreSQL channel name.
    fn channel(self) -> &'static str {
        match self {
            Topic::Identity => "mosaic_identity",
            Topic::Jobs => "mosaic_jobs",
        }
    }
}

/// A connection of its own that receives the notifications of one topic.
pub struct Listener {
    connection: PostgresConnection,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Listener")
    }
}

impl Listener {
    /// Waits for the next notification and returns its payload. UNAVAILABLE
    /// once the connection is gone; listen again then.
    pub async fn next(&mut self) -> Result<String, StoreError> {
        let mut notifications = std::pin::pin!(self.connection.notifications_stream());
        match notifications.next().await {
            Some(Ok(notification)) => Ok(notification.payload),
            Some(Err(error)) => Err(StoreError::from(error)),
            None => Err(StoreError::Unavailable(
                "the listening connection closed".to_owned(),
            )),
        }
    }
}

impl Store {
    /// A listener for `topic` on a connection of its own; `None` on SQLite.
    pub async fn listen(&self, topic: Topic) -> Result<Option<Listener>, StoreError> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let mut connection = pools::open_postgres(url, self.call_timeout)
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?;
        diesel::sql_query(format!("LISTEN {}", topic.channel()))
            .execute(&mut connection)
            .await?;
        Ok(Some(Listener { connection }))
    }

    /// Tells every listener of `topic` to look again; nothing on SQLite.
    pub async fn notify(&self, topic: Topic) -> Result<(), StoreError> {
        self.notify_with(topic, "").await
    }

    /// [`Store::notify`] with a payload (at most 8000 bytes, PostgreSQL's
    /// limit).
    pub async fn notify_with(&self, topic: Topic, payload: &str) -> Result<(), StoreError> {
        if self.postgres_url.is_none() {
            return Ok(());
        }
        with_connection!(self, |conn| {
            diesel::sql_query("SELECT pg_notify($1, $2)")
                .bind::<diesel::sql_types::Text, _>(topic.channel())
                .bind::<diesel::sql_types::Text, _>(payload)
                .execute(conn)
                .await?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testing::TestDatabase;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_notification_reaches_a_listener_of_another_store() {
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let sender = Store::connect(&database.url).await.expect("connect");
        let receiver = Store::connect(&database.url).await.expect("connect");
        let mut listener = receiver
            .listen(Topic::Identity)
            .await
            .expect("listen")
            .expect("a listener on PostgreSQL");
        sender.notify(Topic::Identity).await.expect("notify");
        let heard = tokio::time::timeout(Duration::from_secs(5), listener.next())
            .await
            .expect("the notification arrives")
            .expect("a notification");
        assert_eq!(heard, "");
        let mut jobs = receiver
            .listen(Topic::Jobs)
            .await
            .expect("listen")
            .expect("a listener on PostgreSQL");
        sender
            .notify_with(Topic::Jobs, "job-1:2")
            .await
            .expect("notify");
        let heard = tokio::time::timeout(Duration::from_secs(5), jobs.next())
            .await
            .expect("the notification arrives")
            .expect("a notification");
        assert_eq!(heard, "job-1:2");
        drop(jobs);
        drop((listener, sender, receiver));
        database.cleanup().await.expect("drop the test database");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_has_no_one_to_tell() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let store = TestDatabase::sqlite(dir.path())
            .migrated_store()
            .await
            .expect("store");
        assert!(
            store
                .listen(Topic::Identity)
                .await
                .expect("listen")
                .is_none()
        );
        store.notify(Topic::Identity).await.expect("notify");
    }
}
