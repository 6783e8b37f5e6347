//! The background side of peering: delivering queued notices (in order per
//! connection, retried with exponential backoff and jitter until the peer takes
//! them), liveness pings to ACTIVE peers, expiring connection requests no
//! operator answered, and pruning of old message ids.
//!
//! Replicas of one instance share the outbox and the connections, so each of
//! these happens once per instance: a connection's notices are delivered
//! under its lease (`outbox:<connection id>`), taken for the delivery and
//! released after, and pings and pruning by the holder of the lease
//! `federation.background`, renewed at each round; when a holder stops,
//! another replica takes the work over once its lease has run out.

use std::sync::Arc;
use std::time::Duration;

use super::Federation;
use super::FederationError;
use super::envelope::{self, TrustedKey};
use super::peering::{peer_error, peer_status};
use super::state::{ConnectionState, NoticeKind};
use crate::clock::timestamp_from_ms;
use crate::identity::PublicKey;
use crate::proto::federation as pb;
use crate::store::{ConnectionFilter, ConnectionRecord, NoticeRecord};

/// Longest sleep of the background loop between checks for due notices.
const OUTBOX_TICK: Duration = Duration::from_millis(500);
/// How often old message ids and expired peer keys are pruned.
const PRUNE_INTERVAL_MS: i64 = 60_000;
/// The lease on pings and pruning.
const BACKGROUND_LEASE: &str = "federation.background";
/// How long a connection's notice delivery may hold its lease: longer than
/// any delivery (each attempt is bounded by the peer call's timeouts); a
/// replica that dies while delivering leaves it for this long.
const OUTBOX_LEASE_MS: i64 = 60_000;

/// The delay before retry number `attempts` (1 for the first retry): doubling
/// from `initial`, capped at `max`, then scaled by `jitter` in `[0.5, 1.0]` so
/// that peers coming back do not get every retry at once.
pub fn retry_delay(attempts: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(32);
    let base = initial
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(max);
    base.mul_f64(jitter.clamp(0.5, 1.0))
}

/// A jitter factor in `[0.5, 1.0]`.
fn random_jitter() -> f64 {
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    0.5 + (random as f64 / u64::MAX as f64) / 2.0
}

/// How a delivery attempt ended.
enum Delivery {
    /// The peer acknowledged the notice.
    Delivered,
    /// Try again later.
    Retry(String),
    /// The peer refused it for good (e.g. it no longer applies); drop it.
    Abandon(String),
}

/// Status codes after which a notice is worth sending again.
fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

/// Stops the background task when dropped.
pub struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Federation {
    /// Starts the background loop (outbox, liveness, pruning); it stops when the
    /// returned guard is dropped.
    pub fn start_background(self: &Arc<Self>) -> BackgroundTask {
        let federation = Arc::clone(self);
        BackgroundTask(tokio::spawn(
            async move { federation.background_loop().await },
        ))
    }

    async fn background_loop(self: Arc<Self>) {
        let tick = OUTBOX_TICK.min(self.config.ping_interval);
        let ping_interval_ms =
            i64::try_from(self.config.ping_interval.as_millis()).unwrap_or(i64::MAX);
        let mut last_ping_ms = self.now();
        let mut last_prune_ms = i64::MIN;
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.wake_outbox.notified() => {}
            }
            if let Err(error) = self.deliver_due_notices().await {
                tracing::warn!(%error, "could not deliver queued notices");
            }
            let now = self.now();
            if now.saturating_sub(last_ping_ms) >= ping_interval_ms {
                last_ping_ms = now;
                // Held while renewed at each ping round; another replica
                // takes over three rounds after this one stops.
                if self
                    .holds(BACKGROUND_LEASE, ping_interval_ms.saturating_mul(3))
                    .await
                {
                    if let Err(error) = self.ping_active_peers().await {
                        tracing::warn!(%error, "could not ping peers");
                    }
                    if let Err(error) = self.expire_pending_requests().await {
                        tracing::warn!(%error, "could not expire unanswered connection requests");
                    }
                    if now.saturating_sub(last_prune_ms) >= PRUNE_INTERVAL_MS {
                        last_prune_ms = now;
                        if let Err(error) = self.prune().await {
                            tracing::warn!(%error, "could not prune old message ids and log entries");
                        }
                    }
                }
            }
        }
    }

    /// Forgets what is no longer needed: message ids seen more than twice the
    /// clock window ago (the clock check alone refuses them now), peer keys
    /// whose grace ended, and command log entries past their retention.
    /// Returns how many message ids were forgotten.
    pub async fn prune(&self) -> Result<u64, FederationError> {
        let now = self.now();
        let seen_before = now.saturating_sub(self.window_ms().saturating_mul(2));
        let forgotten = self.store.prune_federation(seen_before, now).await?;
        let retention_ms =
            i64::try_from(self.config.command_log_retention.as_millis()).unwrap_or(i64::MAX);
        self.store
            .prune_command_log(now.saturating_sub(retention_ms))
            .await?;
        Ok(forgotten)
    }

    async fn deliver_due_notices(&self) -> Result<(), FederationError> {
        let due = self.store.connections_with_due_notices(self.now()).await?;
        for connection_id in due {
            self.deliver_notices(&connection_id, false).await;
        }
        Ok(())
    }

    /// Delivers a connection's queued notices in order, stopping at the first
    /// that must wait. `now_or_later`: try even those whose retry time has not
    /// come (an operator just acted).
    pub(super) async fn deliver_notices(&self, connection_id: &str, now_or_later: bool) {
        let lock = self.delivery_lock(connection_id);
        let _serialised = lock.lock().await;
        // Across replicas: the one that takes the connection's lease
        // delivers; another finds it taken and leaves the notices to it.
        let lease = format!("outbox:{connection_id}");
        if !self.holds(&lease, OUTBOX_LEASE_MS).await {
            return;
        }
        if let Err(error) = self
            .deliver_notices_locked(connection_id, now_or_later)
            .await
        {
            tracing::warn!(connection.id = %connection_id, %error, "notice delivery failed");
        }
        if let Err(error) = self.store.release_lease(&lease, &self.lease_holder).await {
            tracing::debug!(%error, "could not release a notice lease; it runs out by itself");
        }
    }

    /// Takes or renews the lease `name` for this process for `ttl_ms`;
    /// `false` while another replica holds it or the database fails.
    async fn holds(&self, name: &str, ttl_ms: i64) -> bool {
        match self
            .store
            .take_lease(name, &self.lease_holder, self.now(), ttl_ms)
            .await
        {
            Ok(granted) => granted.is_some(),
            Err(error) => {
                tracing::warn!(lease = name, %error, "could not take a lease on background work");
                false
            }
        }
    }

    async fn deliver_notices_locked(
        &self,
        connection_id: &str,
        now_or_later: bool,
    ) -> Result<(), FederationError> {
        let Some(connection) = self.store.find_connection(connection_id).await? else {
            return Ok(());
        };
        let mut notices = self.store.notices_of(connection_id).await?;
        // A key-rotation notice goes first: every other notice is signed with the
        // current key, which the peer learns from it. It changes no state, so
        // moving it ahead of older notices reorders nothing the peer sees.
        notices.sort_by_key(|notice| notice.kind != NoticeKind::KeyRotated);
        for notice in notices {
            if !now_or_later && notice.next_attempt_at_ms > self.now() {
                break;
            }
            match self.send_notice(&connection, &notice).await {
                Delivery::Delivered => {
                    self.store.delete_notice(&notice.id).await?;
                    self.store
                        .record_contact(connection_id, true, Some(self.now()))
                        .await?;
                    tracing::info!(
                        connection.id = %connection_id,
                        peer.id = %connection.remote_instance_id,
                        notice = notice.kind.as_str(),
                        "delivered a notice"
                    );
                }
                Delivery::Abandon(reason) => {
                    self.store.delete_notice(&notice.id).await?;
                    tracing::warn!(
                        connection.id = %connection_id,
                        peer.id = %connection.remote_instance_id,
                        notice = notice.kind.as_str(),
                        reason = %reason,
                        "the peer refused a notice; it is dropped"
                    );
                }
                Delivery::Retry(reason) => {
                    let attempts = notice.attempts.saturating_add(1);
                    let delay = retry_delay(
                        u32::try_from(attempts).unwrap_or(u32::MAX),
                        self.config.notice_retry_initial,
                        self.config.notice_retry_max,
                        random_jitter(),
                    );
                    let next = self
                        .now()
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                    self.store
                        .reschedule_notice(&notice.id, attempts, next, &reason)
                        .await?;
                    self.store
                        .record_contact(connection_id, false, None)
                        .await?;
                    tracing::debug!(
                        connection.id = %connection_id,
                        notice = notice.kind.as_str(),
                        attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        reason = %reason,
                        "notice not delivered; will retry"
                    );
                    // Later notices wait: the peer must see them in order.
                    break;
                }
            }
        }
        Ok(())
    }

    /// The keys the peer's server certificate may carry.
    async fn pins(&self, connection: &ConnectionRecord) -> Result<Vec<PublicKey>, FederationError> {
        Ok(self
            .trusted_keys(connection)
            .await?
            .into_iter()
            .map(|trusted| trusted.key)
            .collect())
    }

    async fn send_notice(&self, connection: &ConnectionRecord, notice: &NoticeRecord) -> Delivery {
        match self.try_send_notice(connection, notice).await {
            Ok(delivery) => delivery,
            Err(error) => Delivery::Retry(error.to_string()),
        }
    }

    async fn try_send_notice(
        &self,
        connection: &ConnectionRecord,
        notice: &NoticeRecord,
    ) -> Result<Delivery, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        let mut payload = pb::ConnectionNoticePayload {
            header: None,
            kind: notice.kind.to_proto().into(),
            granted_capabilities: notice.granted_capabilities.clone(),
            reason: notice.reason.clone(),
            new_key: None,
            previous_key_valid_until: None,
        };
        let routing = self.routing(
            &identity,
            &connection.remote_instance_id,
            &connection.workspace,
        );
        let sealed = if notice.kind == NoticeKind::KeyRotated {
            let Some(signing_key_id) = notice.signing_key_id.as_deref() else {
                return Ok(Delivery::Abandon("no signing key recorded".into()));
            };
            let Some(previous) = identity
                .previous_keys(now)
                .find(|previous| previous.public_key.key_id() == signing_key_id)
                .cloned()
            else {
                return Ok(Delivery::Abandon(
                    "the key the peer trusts has left its grace period; connect again".into(),
                ));
            };
            let Some(signer) = identity.previous_signing_key(signing_key_id, now) else {
                return Ok(Delivery::Abandon(
                    "the previous private key is not held by this process".into(),
                ));
            };
            payload.header = Some(envelope::new_header(&routing, signing_key_id.to_owned()));
            payload.new_key = Some(super::convert::current_key_message(&identity));
            payload.previous_key_valid_until = Some(timestamp_from_ms(previous.valid_until_ms));
            envelope::seal(&payload, signer)?
        } else {
            payload.header = Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            ));
            envelope::seal(&payload, identity.as_ref())?
        };
        let message_id = payload
            .header
            .as_ref()
            .map(|header| header.message_id.clone())
            .unwrap_or_default();
        let pins = self.pins(connection).await?;
        let mut client = self
            .clients
            .pinned(&connection.remote_url, &pins)
            .await
            .map_err(peer_error)?;
        let response = match client
            .notify_connection(self.clients.request(pb::NotifyConnectionRequest {
                envelope: Some(sealed),
            }))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if is_transient(status.code()) => {
                return Ok(Delivery::Retry(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Err(status) => {
                return Ok(Delivery::Abandon(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
        };
        let trusted = self.trusted_keys(connection).await?;
        match envelope::open_reply::<pb::NoticeAckPayload>(
            response.envelope.as_ref(),
            &identity.instance_id,
            &connection.remote_instance_id,
            &connection.workspace,
            &trusted,
            self.now(),
        ) {
            Ok(ack) if ack.payload.notice_message_id == message_id => Ok(Delivery::Delivered),
            Ok(_) => Ok(Delivery::Abandon("the ack names another notice".into())),
            Err(error) => Ok(Delivery::Abandon(format!(
                "the ack failed verification: {error}"
            ))),
        }
    }

    /// Pings every ACTIVE peer once and records whether it answered.
    pub async fn ping_active_peers(&self) -> Result<(), FederationError> {
        let active = self
            .store
            .list_connections(&ConnectionFilter {
                state: Some(ConnectionState::Active),
                limit: i64::MAX,
                ..ConnectionFilter::default()
            })
            .await?;
        let pings = active.iter().map(|connection| async move {
            let outcome = self.ping(connection).await;
            let recorded = match &outcome {
                Ok(()) => {
                    self.store
                        .record_contact(&connection.id, true, Some(self.now()))
                        .await
                }
                Err(_) => self.store.record_contact(&connection.id, false, None).await,
            };
            if let Err(error) = outcome {
                tracing::debug!(connection.id = %connection.id, %error, "peer did not answer a ping");
            }
            if let Err(error) = recorded {
                tracing::warn!(connection.id = %connection.id, %error, "could not record a ping");
            }
        });
        futures::future::join_all(pings).await;
        Ok(())
    }

    /// One signed ping, with its signed reply checked.
    pub async fn ping(&self, connection: &ConnectionRecord) -> Result<(), FederationError> {
        let identity = self.identity.current();
        let routing = self.routing(
            &identity,
            &connection.remote_instance_id,
            &connection.workspace,
        );
        let header = envelope::new_header(&routing, identity.public_key().key_id());
        let payload = pb::PingPayload {
            header: Some(header),
        };
        let sealed = envelope::seal(&payload, identity.as_ref())?;
        let trusted: Vec<TrustedKey> = self.trusted_keys(connection).await?;
        let pins: Vec<PublicKey> = trusted.iter().map(|trusted| trusted.key.clone()).collect();
        let mut client = self
            .clients
            .pinned(&connection.remote_url, &pins)
            .await
            .map_err(peer_error)?;
        let response = client
            .ping(self.clients.request(pb::PingRequest {
                envelope: Some(sealed),
            }))
            .await
            .map_err(peer_status)?
            .into_inner();
        envelope::open_reply::<pb::PingPayload>(
            response.envelope.as_ref(),
            &identity.instance_id,
            &connection.remote_instance_id,
            &connection.workspace,
            &trusted,
            self.now(),
        )
        .map_err(|error| FederationError::BadReply(error.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        assert_eq!(retry_delay(1, initial, max, 1.0), initial);
        assert_eq!(
            retry_delay(2, initial, max, 1.0),
            Duration::from_millis(200)
        );
        assert_eq!(
            retry_delay(4, initial, max, 1.0),
            Duration::from_millis(800)
        );
        assert_eq!(retry_delay(5, initial, max, 1.0), max);
        assert_eq!(retry_delay(500, initial, max, 1.0), max);
        assert_eq!(
            retry_delay(2, initial, max, 0.5),
            Duration::from_millis(100)
        );
        // Jitter outside its range is clamped.
        assert_eq!(retry_delay(1, initial, max, 0.0), Duration::from_millis(50));
        for _ in 0..100 {
            let jitter = random_jitter();
            assert!((0.5..=1.0).contains(&jitter), "{jitter}");
        }
    }
}
