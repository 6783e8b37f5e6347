//! What a peer sends: a connection request, notices and pings. Every message
//! goes through the envelope checks in the order the Federation service
//! documents and is acted on only after its signature and replay checks; every
//! change is one store transaction with its history event and its message id.

use std::sync::Arc;

use crate::federation::FederationError;
use crate::federation::envelope::{self, Payload, TrustedKey, Verified};
use crate::federation::state::{self, Actor, ConnectionState, Direction, NoticeKind};
use crate::identity::{PublicKey, fingerprint};
use crate::proto::federation as pb;
use crate::store::{
    ConnectionCapabilities, ConnectionChange, ConnectionRecord, InstanceKeyBinding, PeerKeyRecord,
    WriteOutcome,
};

use crate::federation::Federation;
use crate::federation::peering::*;

/// Where a connection request came from, as the rate limiter groups clients
/// (`ip:203.0.113.7`, `ip:2001:db8:1:2::/64`): the requests it has waiting
/// are counted against its own quota
/// (`federation.max_pending_inbound_per_source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSource(String);

impl RequestSource {
    /// The source of `request`: the address of its connection, or the client
    /// a trusted proxy names, grouped as `limiter` groups clients (IPv6 by
    /// /64).
    pub fn of<T>(limiter: &crate::ratelimit::RateLimiter, request: &tonic::Request<T>) -> Self {
        let address = crate::auth::remote_address(request.extensions()).map(|address| address.ip());
        let headers = request.metadata().clone().into_headers();
        Self(limiter.client_key(address, &headers).subject())
    }

    /// As stored with the request.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Federation {
    /// RequestConnection from a peer, which came from `source`.
    pub async fn receive_request(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
        source: &RequestSource,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        // 3: well formed, including the sender's identity and key.
        let parsed = envelope::parse::<pb::ConnectionRequestPayload>(sealed)?;
        let header = parsed.header().clone();
        let claimed = parsed.unverified_payload();
        let sender = claimed
            .sender
            .as_ref()
            .ok_or_else(|| FederationError::Invalid("sender is missing".into()))?;
        if sender.instance_id != header.sender_instance_id {
            return Err(FederationError::Invalid(
                "sender.instance_id is not the header's sender".into(),
            ));
        }
        let sender_key = PublicKey::from_spki_der(&sender.public_key).map_err(|_| {
            FederationError::Invalid("sender.public_key is not an ECDSA P-256 key".into())
        })?;
        if sender_key.key_id() != header.key_id {
            return Err(FederationError::Invalid(
                "header.key_id is not the key id of sender.public_key".into(),
            ));
        }
        // 4: addressed to us, and not from us: a request claiming this
        // instance's own id is someone else's key.
        parsed.check_recipient(&identity.instance_id)?;
        if header.sender_instance_id == identity.instance_id {
            return Err(FederationError::Invalid(
                "the sender claims this instance's own id".into(),
            ));
        }
        // 5 and 6 do not apply: the sender is not known yet.
        // 7: the key in the request is the TLS key.
        let trusted = [TrustedKey {
            key: sender_key.clone(),
            valid_until_ms: None,
        }];
        let key = parsed.check_key(&trusted, tls_key, now)?;
        // 8 and 9.
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&key)?;
        // 10: replay, or an identical retry.
        if let Some(stored) = self.replayed(&verified).await? {
            return Ok(stored);
        }
        let payload = verified.payload;
        let sender = payload
            .sender
            .clone()
            .ok_or_else(|| FederationError::Invalid("sender is missing".into()))?;
        let (host, _) = super::peer_client::parse_peer_url(&sender.url)
            .map_err(|error| FederationError::Invalid(format!("sender.url: {error}")))?;
        if let Ok(address) = host.parse::<std::net::IpAddr>()
            && !self.clients.policy().permits(address)
        {
            return Err(FederationError::NotPermitted(
                "sender.url is an address this instance's dial policy denies".into(),
            ));
        }
        // Shown to the operator in `peer list`: no escape sequences, line
        // breaks or invisible reordering.
        if !crate::text::is_printable_line(&sender.name) {
            return Err(FederationError::Invalid(
                "sender.name must be printable text (no control or invisible formatting characters)"
                    .into(),
            ));
        }
        check_capability_list("requested_capabilities", &payload.requested_capabilities)?;
        check_capability_list("offered_capabilities", &payload.offered_capabilities)?;
        check_capability_list("sender.capabilities", &sender.capabilities)?;
        if self
            .store
            .find_open_connection(&header.workspace, &header.sender_instance_id)
            .await?
            .is_some()
        {
            return Err(already_open(&header.workspace));
        }

        // Keys before names: an instance id already bound to another key is
        // a warning the operator reads before anything else (and accepting
        // needs an explicit flag, see `accept_connection`).
        let sender_fingerprint = sender_key.fingerprint();
        let known_instance_warning = self
            .other_key_binding(&header.sender_instance_id, &sender_fingerprint, None)
            .await?
            .map(|binding| {
                new_key_warning(&header.sender_instance_id, &binding, &sender_fingerprint)
            });
        let auto_accept = fingerprint::normalize(&sender_fingerprint)
            .is_some_and(|printed| self.config.auto_accept_fingerprints.contains(&printed));
        // Anyone holding a key can ask, so the requests an operator has not
        // answered yet are bounded: per source first, so that one address
        // or one key cannot fill the queue and a newcomer from elsewhere can
        // still ask; then in all.
        if !auto_accept {
            self.check_source_quota(source, &sender_fingerprint).await?;
        }
        if !auto_accept
            && self
                .store
                .count_connections(Direction::Inbound, ConnectionState::Pending)
                .await?
                >= i64::from(self.config.max_pending_inbound)
        {
            return Err(FederationError::LimitReached(
                "too many connection requests are waiting for this instance's operator; try again later"
                    .into(),
            ));
        }
        let state = if auto_accept {
            ConnectionState::Active
        } else {
            ConnectionState::Pending
        };
        let granted = if auto_accept {
            self.config.auto_accept_grants.clone()
        } else {
            Vec::new()
        };
        let record = ConnectionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            workspace: header.workspace.clone(),
            remote_instance_id: header.sender_instance_id.clone(),
            remote_name: truncate(&sender.name, MAX_NAME_CHARS),
            remote_url: sender.url.clone(),
            remote_public_key: sender_key.spki_der().to_vec(),
            remote_fingerprint: sender_key.fingerprint(),
            capabilities: ConnectionCapabilities {
                remote: sender.capabilities.clone(),
                granted: granted.clone(),
                granted_to_us: payload.offered_capabilities.clone(),
                requested: payload.requested_capabilities.clone(),
            },
            direction: Direction::Inbound,
            state,
            state_reason: if auto_accept {
                String::new()
            } else {
                known_instance_warning.clone().unwrap_or_default()
            },
            suspended_by: None,
            reachable: true,
            last_contact_at_ms: Some(now),
            created_at_ms: now,
            updated_at_ms: now,
            request_source: Some(source.as_str().to_owned()),
        };
        let mut events = vec![event(
            &record.id,
            None,
            ConnectionState::Pending,
            Actor::Peer,
            known_instance_warning.as_deref().unwrap_or_default(),
            now,
        )];
        if auto_accept {
            events.push(event(
                &record.id,
                Some(ConnectionState::Pending),
                ConnectionState::Active,
                Actor::System,
                "auto-accepted: the peer's fingerprint is on federation.auto_accept_fingerprints",
                now,
            ));
        }
        let routing = self.routing(&identity, &header.sender_instance_id, &header.workspace);
        let reply = pb::ConnectionReplyPayload {
            header: Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            )),
            request_message_id: header.message_id.clone(),
            state: state.to_proto().into(),
            granted_capabilities: granted,
            connection_id: record.id.clone(),
        };
        let reply = envelope::seal(&reply, identity.as_ref())?;
        let seen = seen_message(&verified.header, verified.digest.clone(), Some(&reply), now);
        match self
            .insert_connection(&record, &events, Some(&seen))
            .await?
        {
            WriteOutcome::Done(()) => {}
            WriteOutcome::OpenConnectionExists => return Err(already_open(&header.workspace)),
            WriteOutcome::DuplicateMessage | WriteOutcome::StateChanged => {
                return self.replay_after_race(&header, &verified.digest).await;
            }
        }
        tracing::info!(
            connection.id = %record.id,
            peer.id = %record.remote_instance_id,
            workspace = %record.workspace,
            state = record.state.as_str(),
            "received a federation connection request"
        );
        if known_instance_warning.is_some() {
            tracing::warn!(
                connection.id = %record.id,
                peer.id = %record.remote_instance_id,
                peer.fingerprint = %record.remote_fingerprint,
                "a connection request names an instance id already bound to another key"
            );
        }
        Ok(reply)
    }

    /// RESOURCE_EXHAUSTED when `source`, or the key of `fingerprint`, already
    /// has `federation.max_pending_inbound_per_source` requests waiting.
    async fn check_source_quota(
        &self,
        source: &RequestSource,
        fingerprint: &str,
    ) -> Result<(), FederationError> {
        let quota = self.config.max_pending_inbound_per_source;
        let waiting = self
            .store
            .count_pending_inbound_from_source(source.as_str())
            .await?;
        if waiting >= i64::from(quota) {
            return Err(FederationError::LimitReached(format!(
                "this source's quota is full: {waiting} connection requests from {} wait for this instance's operator (at most {quota}); try again once they are answered or expire",
                source.as_str()
            )));
        }
        let waiting = self.store.count_pending_inbound_of_key(fingerprint).await?;
        if waiting >= i64::from(quota) {
            return Err(FederationError::LimitReached(format!(
                "this key's quota is full: {waiting} connection requests made with it wait for this instance's operator (at most {quota}); try again once they are answered or expire"
            )));
        }
        Ok(())
    }

    /// A connection (other than `except_connection_id`) that binds
    /// `instance_id` to a key other than `fingerprint`, when none binds it to
    /// `fingerprint` itself; see [`binding_to_another_key`].
    pub(super) async fn other_key_binding(
        &self,
        instance_id: &str,
        fingerprint: &str,
        except_connection_id: Option<&str>,
    ) -> Result<Option<InstanceKeyBinding>, FederationError> {
        let bindings = self.store.key_bindings_of_instance(instance_id).await?;
        Ok(binding_to_another_key(&bindings, fingerprint, except_connection_id).cloned())
    }

    /// NotifyConnection from a peer.
    pub async fn receive_notice(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        // 3: well formed, including the notice's own fields.
        let parsed = envelope::parse::<pb::ConnectionNoticePayload>(sealed)?;
        let header = parsed.header().clone();
        let claimed = parsed.unverified_payload();
        let kind = NoticeKind::from_proto(claimed.kind()).ok_or_else(|| {
            FederationError::Invalid("the notice kind is not set or not known".into())
        })?;
        let rotated_to = if kind == NoticeKind::KeyRotated {
            let new_key = claimed
                .new_key
                .as_ref()
                .ok_or_else(|| FederationError::Invalid("KEY_ROTATED needs new_key".into()))?;
            let key = PublicKey::from_spki_der(&new_key.public_key).map_err(|_| {
                FederationError::Invalid("new_key is not an ECDSA P-256 key".into())
            })?;
            let valid_until = claimed
                .previous_key_valid_until
                .as_ref()
                .map(crate::clock::ms_from_timestamp)
                .ok_or_else(|| {
                    FederationError::Invalid("KEY_ROTATED needs previous_key_valid_until".into())
                })?;
            Some((
                key,
                valid_until.min(now.saturating_add(MAX_PEER_KEY_GRACE_MS)),
            ))
        } else {
            None
        };
        check_capability_list("granted_capabilities", &claimed.granted_capabilities)?;
        // 4.
        parsed.check_recipient(&identity.instance_id)?;
        // 5: an open connection with the sender in that workspace.
        let connection = self
            .store
            .find_open_connection(&header.workspace, &header.sender_instance_id)
            .await?
            .ok_or_else(no_connection)?;
        // 7: a key of the sender; the TLS key is checked just below.
        let trusted = self.trusted_keys(&connection).await?;
        let signing_key = parsed.signing_key(&trusted, now)?;
        // A KEY_ROTATED notice is signed with the old key and must travel over a
        // TLS connection made with the new one: the sender proves it holds both.
        let tls_matches = match &rotated_to {
            Some((new_key, _)) => new_key == tls_key,
            None => &signing_key == tls_key,
        };
        if !tls_matches {
            return Err(envelope::EnvelopeError::KeyIsNotTlsKey.into());
        }
        // 8, 9, 10.
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&signing_key)?;
        if let Some(stored) = self.replayed(&verified).await? {
            return Ok(stored);
        }

        let payload = &verified.payload;
        let outcome = state::after_notice(kind, situation(&connection))
            .map_err(FederationError::WrongState)?;
        if !crate::text::is_printable_line(&payload.reason) {
            return Err(FederationError::Invalid(
                "reason must be printable text (no control or invisible formatting characters)"
                    .into(),
            ));
        }
        let reason = truncate(&payload.reason, MAX_REASON_CHARS);
        let capabilities = (kind == NoticeKind::Accepted).then(|| ConnectionCapabilities {
            granted_to_us: payload.granted_capabilities.clone(),
            ..connection.capabilities.clone()
        });
        let (new_remote_key, retired_peer_key) = match &rotated_to {
            Some((new_key, valid_until_ms)) => (
                Some((new_key.spki_der().to_vec(), new_key.fingerprint())),
                Some(PeerKeyRecord {
                    connection_id: connection.id.clone(),
                    key_id: signing_key.key_id(),
                    public_key: signing_key.spki_der().to_vec(),
                    valid_until_ms: *valid_until_ms,
                }),
            ),
            None => (None, None),
        };
        let state_changes = outcome.state != connection.state;
        let routing = self.routing(&identity, &header.sender_instance_id, &header.workspace);
        let ack = pb::NoticeAckPayload {
            header: Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            )),
            notice_message_id: header.message_id.clone(),
            state: outcome.state.to_proto().into(),
        };
        let ack = envelope::seal(&ack, identity.as_ref())?;
        let change = ConnectionChange {
            connection_id: connection.id.clone(),
            expected_state: connection.state,
            new_state: outcome.state,
            state_reason: if state_changes {
                reason.clone()
            } else {
                connection.state_reason.clone()
            },
            suspended_by: outcome.suspended_by,
            capabilities,
            new_remote_key,
            retired_peer_key,
            event: state_changes.then(|| {
                event(
                    &connection.id,
                    Some(connection.state),
                    outcome.state,
                    Actor::Peer,
                    &reason,
                    now,
                )
            }),
            notice: None,
            seen: Some(seen_message(
                &header,
                verified.digest.clone(),
                Some(&ack),
                now,
            )),
            at_ms: now,
        };
        match self.change_connection(&change).await? {
            WriteOutcome::Done(_) => {}
            WriteOutcome::DuplicateMessage => {
                return self.replay_after_race(&header, &verified.digest).await;
            }
            _ => {
                return Err(FederationError::WrongState(
                    "the connection changed meanwhile; the notice was not applied".into(),
                ));
            }
        }
        self.store
            .record_contact(&connection.id, true, Some(now))
            .await?;
        tracing::info!(
            connection.id = %connection.id,
            peer.id = %connection.remote_instance_id,
            notice = kind.as_str(),
            to = outcome.state.as_str(),
            "applied a notice from a peer"
        );
        Ok(ack)
    }

    /// Ping from a peer.
    pub async fn receive_ping(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        let parsed = envelope::parse::<pb::PingPayload>(sealed)?;
        let header = parsed.header().clone();
        parsed.check_recipient(&identity.instance_id)?;
        let connection = self
            .store
            .find_open_connection(&header.workspace, &header.sender_instance_id)
            .await?
            .ok_or_else(no_connection)?;
        let trusted = self.trusted_keys(&connection).await?;
        let key = parsed.check_key(&trusted, tls_key, now)?;
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&key)?;
        let seen = seen_message(&verified.header, verified.digest.clone(), None, now);
        if self.store.insert_seen_message(&seen).await? != WriteOutcome::Done(()) {
            return Err(FederationError::Duplicate(
                "this ping's message id was already used".into(),
            ));
        }
        self.store
            .record_contact(&connection.id, true, Some(now))
            .await?;
        let routing = self.routing(&identity, &header.sender_instance_id, &header.workspace);
        let reply = pb::PingPayload {
            header: Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            )),
        };
        Ok(envelope::seal(&reply, identity.as_ref())?)
    }

    /// The stored reply for an identical retry; ALREADY_EXISTS for a message id
    /// reused with other bytes; `None` for a new message id.
    pub(super) async fn replayed<P: Payload>(
        &self,
        verified: &Verified<P>,
    ) -> Result<Option<pb::SignedEnvelope>, FederationError> {
        let Some(seen) = self
            .store
            .find_seen_message(
                &verified.header.sender_instance_id,
                &verified.header.message_id,
            )
            .await?
        else {
            return Ok(None);
        };
        stored_reply(seen, &verified.digest).map(Some)
    }

    /// After a concurrent write recorded the same message id first.
    pub(super) async fn replay_after_race(
        &self,
        header: &pb::EnvelopeHeader,
        digest: &[u8],
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let seen = self
            .store
            .find_seen_message(&header.sender_instance_id, &header.message_id)
            .await?
            .ok_or_else(|| FederationError::Duplicate("this message id was already used".into()))?;
        stored_reply(seen, digest)
    }

    /// The per-connection lock that keeps notice deliveries in order.
    pub(super) fn delivery_lock(&self, connection_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .delivery_locks
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if locks.len() > 1024 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(locks.entry(connection_id.to_owned()).or_default())
    }
}

/// Whether a connection binds its instance id to its key: one this instance
/// chose (OUTBOUND) or an operator accepted, now or in the past. A request
/// still waiting for the operator, or one that was rejected, binds nothing:
/// anyone can ask under any id.
fn binds_its_key(binding: &InstanceKeyBinding) -> bool {
    match binding.state {
        ConnectionState::Rejected => false,
        ConnectionState::Pending => binding.direction == Direction::Outbound,
        ConnectionState::Active | ConnectionState::Suspended | ConnectionState::Disconnected => {
            true
        }
    }
}

/// Among `bindings` (newest first), other than `except_connection_id`: the
/// newest that binds the instance id to a key other than `fingerprint`, unless
/// one binds it to `fingerprint` (a key the instance is known by, e.g. after
/// a rotation it proved on that connection).
pub(super) fn binding_to_another_key<'a>(
    bindings: &'a [InstanceKeyBinding],
    fingerprint: &str,
    except_connection_id: Option<&str>,
) -> Option<&'a InstanceKeyBinding> {
    let binding: Vec<&InstanceKeyBinding> = bindings
        .iter()
        .filter(|binding| Some(binding.connection_id.as_str()) != except_connection_id)
        .filter(|binding| binds_its_key(binding))
        .collect();
    if binding
        .iter()
        .any(|binding| binding.fingerprint == fingerprint)
    {
        return None;
    }
    binding.into_iter().next()
}

/// The state reason of a request whose instance id is bound to another key.
pub(super) fn new_key_warning(
    instance_id: &str,
    binding: &InstanceKeyBinding,
    fingerprint: &str,
) -> String {
    format!(
        "WARNING: instance id {instance_id} is already bound to a different key (fingerprint {}, on {} connection {} in workspace {}); this request's key has fingerprint {fingerprint}. Check it with the peer's operator; accepting it needs --new-key",
        binding.fingerprint,
        binding.state.as_str().to_ascii_uppercase(),
        binding.connection_id,
        binding.workspace
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(
        id: &str,
        direction: Direction,
        state: ConnectionState,
        fingerprint: &str,
    ) -> InstanceKeyBinding {
        InstanceKeyBinding {
            connection_id: id.to_owned(),
            workspace: "ws".to_owned(),
            direction,
            state,
            fingerprint: fingerprint.to_owned(),
        }
    }

    #[test]
    fn a_known_instance_with_another_key_is_found_in_any_state_that_binds() {
        use ConnectionState::*;
        use Direction::*;
        for (direction, state) in [
            (Inbound, Active),
            (Inbound, Suspended),
            (Inbound, Disconnected),
            (Outbound, Pending),
            (Outbound, Active),
            (Outbound, Disconnected),
        ] {
            let bindings = [binding("c1", direction, state, "OLD")];
            assert_eq!(
                binding_to_another_key(&bindings, "NEW", None).map(|found| &found.connection_id),
                Some(&"c1".to_owned()),
                "{direction:?} {state:?}"
            );
        }
        // Requests nobody accepted bind nothing.
        for (direction, state) in [
            (Inbound, Pending),
            (Inbound, Rejected),
            (Outbound, Rejected),
        ] {
            let bindings = [binding("c1", direction, state, "OLD")];
            assert!(binding_to_another_key(&bindings, "NEW", None).is_none());
        }
    }

    #[test]
    fn the_known_key_itself_and_the_connection_asked_about_are_no_conflict() {
        use ConnectionState::*;
        use Direction::*;
        // Rotated on the active connection: the disconnected one's old key
        // does not make the current key a stranger.
        let rotated = [
            binding("c2", Inbound, Active, "NEW"),
            binding("c1", Inbound, Disconnected, "OLD"),
        ];
        assert!(binding_to_another_key(&rotated, "NEW", None).is_none());
        // The connection being accepted does not bind its own key.
        let own = [binding("c1", Inbound, Active, "NEW")];
        assert!(binding_to_another_key(&own, "NEW", Some("c1")).is_none());
        let other = [
            binding("c3", Inbound, Pending, "NEW"),
            binding("c1", Outbound, Active, "OLD"),
        ];
        assert_eq!(
            binding_to_another_key(&other, "NEW", Some("c3"))
                .map(|found| found.fingerprint.as_str()),
            Some("OLD")
        );
    }
}
