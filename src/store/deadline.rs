//! The end of a store call that ran out of time: UNAVAILABLE for the caller,
//! and the connection closed rather than pooled again, since it may still
//! owe the answer to a query nobody waits for (or sit in a transaction that
//! was never finished).

use std::time::Duration;

use diesel_async::{AsyncConnection, TransactionManager};

use super::StoreError;

/// The value of a call that finished in time; else marks `connection`
/// broken (the pool then drops it) and gives UNAVAILABLE.
pub(super) fn settle<T, C>(
    outcome: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
    connection: &mut C,
    call_timeout: Duration,
) -> Result<T, StoreError>
where
    C: AsyncConnection,
{
    match outcome {
        Ok(result) => result,
        Err(_elapsed) => {
            // A connection whose transaction manager is in error is one the
            // pool's manager reports broken, and bb8 closes it on return.
            C::TransactionManager::transaction_manager_status_mut(connection).set_in_error();
            Err(StoreError::Unavailable(format!(
                "the database did not answer within {} ms",
                call_timeout.as_millis()
            )))
        }
    }
}
