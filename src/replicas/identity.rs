//! A key rotation made through one replica reaches the others: each replica
//! listens for the rotation's notification (PostgreSQL LISTEN/NOTIFY) and
//! checks the database's current key on a timer as well, then takes the new
//! key and certificate up with no restart (`IdentityManager::refresh`).
//! SQLite has one process and nothing to follow.

use std::sync::Arc;
use std::time::Duration;

use crate::identity::IdentityManager;
use crate::store::{Listener, Store, Topic};

/// How often the current key is checked when no notification came: the
/// longest a rotation takes to reach a replica whose listening connection
/// was lost (a notification usually brings it within milliseconds).
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Follows the current key for as long as the returned task runs; calls
/// `changed` after each change taken up (to rewrite the certificate file).
/// `None` on SQLite.
pub fn follow_rotations(
    store: Store,
    identity: Arc<IdentityManager>,
    changed: impl Fn() + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if store.backend() == crate::store::Backend::Sqlite {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut listener: Option<Listener> = None;
        loop {
            if listener.is_none() {
                // Listening first, then checking, so that no rotation falls
                // between the two; a failure leaves the timer.
                listener = store.listen(Topic::Identity).await.unwrap_or_else(|error| {
                    tracing::debug!(%error, "cannot listen for key rotations; checking on a timer");
                    None
                });
            }
            match identity.refresh().await {
                Ok(true) => changed(),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot check the instance key for a rotation");
                }
            }
            wait_for_news(&mut listener).await;
        }
    }))
}

/// Waits for a notification or `CHECK_EVERY`, whichever comes first; drops a
/// listener whose connection failed.
async fn wait_for_news(listener: &mut Option<Listener>) {
    let Some(listening) = listener.as_mut() else {
        tokio::time::sleep(CHECK_EVERY).await;
        return;
    };
    tokio::select! {
        heard = listening.next() => {
            if heard.is_err() {
                *listener = None;
            }
        }
        () = tokio::time::sleep(CHECK_EVERY) => {}
    }
}
