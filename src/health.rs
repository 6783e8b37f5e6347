//! The standard health service (`grpc.health.v1`): the empty service name
//! (the whole server) and each Mosaic service report SERVING while the
//! database answers and NOT_SERVING while it does not, so a balancer stops
//! sending traffic to a replica that cannot work and sends it again once the
//! database is back.

use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Store;

/// How often the database is asked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long it may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Sets every service SERVING, then keeps them in step with the database
/// for as long as the returned task runs.
pub async fn follow_database(
    store: Store,
    reporter: HealthReporter,
) -> tokio::task::JoinHandle<()> {
    set_all(&reporter, ServingStatus::Serving).await;
    tokio::spawn(follow(store, reporter))
}

async fn follow(store: Store, reporter: HealthReporter) {
    let mut interval = tokio::time::interval(CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        interval.tick().await;
        let answered = matches!(
            tokio::time::timeout(ANSWER_WITHIN, store.ping()).await,
            Ok(Ok(()))
        );
        if answered != serving {
            serving = answered;
            if serving {
                tracing::info!("the database answers again: serving");
                set_all(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!(
                    "the database does not answer: health reports NOT_SERVING until it does"
                );
                set_all(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}

/// Sets the server's status (the empty name) and each service's.
async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in crate::proto::SERVICE_NAMES {
        reporter.set_service_status(service, status).await;
    }
}
