//! What an operator does to connections: ConnectPeer (first contact, key
//! checks, the signed request), accept, reject, suspend, resume, disconnect
//! (each one store transaction with its history event and the notice that
//! tells the peer), listing them, and what a key rotation sets off.

use crate::federation::FederationError;
use crate::federation::envelope::{self, TrustedKey, Verified};
use crate::federation::state::{
    self, Actor, ConnectionState, Direction, NoticeKind, OperatorAction,
};
use crate::identity::{PublicKey, fingerprint};
use crate::proto::federation as pb;
use crate::store::{
    ConnectionCapabilities, ConnectionChange, ConnectionEventRecord, ConnectionFilter,
    ConnectionRecord, NoticeRecord, WriteOutcome,
};

use crate::federation::Federation;
use crate::federation::peering::*;

/// A connection as shown to operators: the stored row and its undelivered
/// notices.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    /// The stored connection.
    pub record: ConnectionRecord,
    /// Notices to the peer not yet delivered.
    pub pending_notices: u32,
}

/// Whether an accept goes ahead when the peer's instance id is already bound
/// to another key (AcceptConnectionRequest.accept_new_key_for_known_instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewKeyForKnownInstance {
    /// Refuse it (FAILED_PRECONDITION): the default.
    Refuse,
    /// The operator checked the new key's fingerprint: accept it.
    Accept,
}

impl NewKeyForKnownInstance {
    /// From the request flag.
    pub fn from_flag(accept_new_key_for_known_instance: bool) -> Self {
        if accept_new_key_for_known_instance {
            Self::Accept
        } else {
            Self::Refuse
        }
    }
}

/// What ConnectPeer needs.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The peer's URL.
    pub url: String,
    /// The workspace.
    pub workspace: String,
    /// Fingerprint to check, if any.
    pub expected_fingerprint: Option<String>,
    /// What we grant the peer.
    pub granted_capabilities: Vec<String>,
    /// What we ask the peer for (empty: all it advertises).
    pub requested_capabilities: Vec<String>,
}

impl Federation {
    /// Views of `records` with their pending notice counts.
    pub async fn views(
        &self,
        records: Vec<ConnectionRecord>,
    ) -> Result<Vec<ConnectionView>, FederationError> {
        let ids: Vec<String> = records.iter().map(|record| record.id.clone()).collect();
        let counts = self.store.pending_notice_counts(&ids).await?;
        Ok(records
            .into_iter()
            .map(|record| ConnectionView {
                pending_notices: counts.get(&record.id).copied().unwrap_or(0),
                record,
            })
            .collect())
    }

    async fn view(&self, record: ConnectionRecord) -> Result<ConnectionView, FederationError> {
        let mut views = self.views(vec![record]).await?;
        views
            .pop()
            .ok_or_else(|| FederationError::Internal("a view went missing".into()))
    }

    /// ConnectPeer: first contact, key checks, the signed request, and the
    /// OUTBOUND row in the state the peer replied.
    pub async fn connect_peer(
        &self,
        request: ConnectRequest,
    ) -> Result<ConnectionView, FederationError> {
        let identity = self.identity.current();
        check_workspace(&request.workspace)?;
        check_capability_list("granted_capabilities", &request.granted_capabilities)?;
        check_capability_list("requested_capabilities", &request.requested_capabilities)?;
        check_offered(&identity, &request.granted_capabilities)?;
        let expected_fingerprint = match request.expected_fingerprint.as_deref() {
            None | Some("") => None,
            Some(typed) => Some(fingerprint::normalize(typed).ok_or_else(|| {
                FederationError::Invalid(format!(
                    "expected_fingerprint {typed:?} is not a fingerprint (eight groups of four like ABCD-EFGH-...)"
                ))
            })?),
        };
        super::peer_client::parse_peer_url(&request.url)
            .map_err(|error| FederationError::Invalid(error.to_string()))?;

        let (instance, tls_key) = self
            .clients
            .first_contact(&request.url)
            .await
            .map_err(first_contact_error)?;
        let claimed = PublicKey::from_spki_der(&instance.public_key).map_err(|_| {
            FederationError::UnacceptablePeer(
                "the peer claims a key that is not an ECDSA P-256 key; nothing was stored".into(),
            )
        })?;
        if claimed != tls_key {
            return Err(FederationError::UnacceptablePeer(
                "the peer's TLS key is not the key it claims in GetInstance; nothing was stored"
                    .into(),
            ));
        }
        if let Some(expected) = &expected_fingerprint
            && !fingerprint::matches(expected, claimed.spki_der())
        {
            return Err(FederationError::UnacceptablePeer(format!(
                "the peer's fingerprint is {}, not the expected one; nothing was stored",
                claimed.fingerprint()
            )));
        }
        // What the peer says about itself is shown in `peer list` and named
        // in every header: the same rules as for a request from a peer.
        crate::text::identifier::check("the peer's instance id", &instance.instance_id).map_err(
            |rule| FederationError::UnacceptablePeer(format!("{rule}; nothing was stored")),
        )?;
        if !crate::text::is_printable_line(&instance.name) {
            return Err(FederationError::UnacceptablePeer(
                "the peer's name is not printable text (control or invisible formatting characters); nothing was stored"
                    .into(),
            ));
        }
        check_capability_list("the peer's capabilities", &instance.capabilities).map_err(
            |error| FederationError::UnacceptablePeer(format!("{error}; nothing was stored")),
        )?;
        if instance.instance_id == identity.instance_id {
            return Err(FederationError::Invalid(
                "the URL is this instance itself".into(),
            ));
        }
        if self
            .store
            .find_open_connection(&request.workspace, &instance.instance_id)
            .await?
            .is_some()
        {
            return Err(already_open(&request.workspace));
        }

        let requested = if request.requested_capabilities.is_empty() {
            instance.capabilities.clone()
        } else {
            request.requested_capabilities.clone()
        };
        let routing = self.routing(&identity, &instance.instance_id, &request.workspace);
        let header = envelope::new_header(&routing, identity.public_key().key_id());
        let message_id = header.message_id.clone();
        let payload = pb::ConnectionRequestPayload {
            header: Some(header),
            sender: Some(crate::federation::convert::instance_message(&identity)),
            requested_capabilities: requested.clone(),
            offered_capabilities: request.granted_capabilities.clone(),
        };
        let sealed = envelope::seal(&payload, identity.as_ref())?;
        let mut client = self
            .clients
            .pinned(&request.url, std::slice::from_ref(&claimed))
            .await
            .map_err(peer_error)?;
        let response = client
            .request_connection(self.clients.request(pb::RequestConnectionRequest {
                envelope: Some(sealed),
            }))
            .await
            .map_err(peer_status)?
            .into_inner();
        let trusted = [TrustedKey {
            key: claimed.clone(),
            valid_until_ms: None,
        }];
        let reply: Verified<pb::ConnectionReplyPayload> = envelope::open_reply(
            response.envelope.as_ref(),
            &identity.instance_id,
            &instance.instance_id,
            &request.workspace,
            &trusted,
            self.now(),
        )
        .map_err(|error| FederationError::BadReply(error.to_string()))?;
        if reply.payload.request_message_id != message_id {
            return Err(FederationError::BadReply(
                "the reply answers another request".into(),
            ));
        }
        let peer_state = ConnectionState::from_proto(reply.payload.state())
            .filter(|state| {
                matches!(
                    state,
                    ConnectionState::Pending | ConnectionState::Active | ConnectionState::Rejected
                )
            })
            .ok_or_else(|| FederationError::BadReply("the reply has no usable state".into()))?;
        check_capability_list("granted_capabilities", &reply.payload.granted_capabilities)
            .map_err(|error| FederationError::BadReply(error.to_string()))?;

        let now = self.now();
        let record = ConnectionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            workspace: request.workspace.clone(),
            remote_instance_id: instance.instance_id.clone(),
            remote_name: truncate(&instance.name, MAX_NAME_CHARS),
            remote_url: request.url.clone(),
            remote_public_key: claimed.spki_der().to_vec(),
            remote_fingerprint: claimed.fingerprint(),
            capabilities: ConnectionCapabilities {
                remote: instance.capabilities.clone(),
                granted: request.granted_capabilities.clone(),
                granted_to_us: if peer_state == ConnectionState::Active {
                    reply.payload.granted_capabilities.clone()
                } else {
                    Vec::new()
                },
                requested,
            },
            direction: Direction::Outbound,
            state: peer_state,
            state_reason: String::new(),
            suspended_by: None,
            reachable: true,
            last_contact_at_ms: Some(now),
            created_at_ms: now,
            updated_at_ms: now,
            request_source: None,
        };
        let mut events = vec![event(
            &record.id,
            None,
            ConnectionState::Pending,
            Actor::Local,
            "",
            now,
        )];
        if peer_state != ConnectionState::Pending {
            events.push(event(
                &record.id,
                Some(ConnectionState::Pending),
                peer_state,
                Actor::Peer,
                "",
                now,
            ));
        }
        match self.insert_connection(&record, &events, None).await? {
            WriteOutcome::Done(()) => {}
            WriteOutcome::OpenConnectionExists => return Err(already_open(&request.workspace)),
            other => {
                return Err(FederationError::Internal(format!(
                    "unexpected outcome storing a connection: {other:?}"
                )));
            }
        }
        tracing::info!(
            connection.id = %record.id,
            peer.id = %record.remote_instance_id,
            workspace = %record.workspace,
            state = record.state.as_str(),
            "requested a federation connection"
        );
        self.view(record).await
    }

    /// One connection and its history.
    pub async fn get_connection(
        &self,
        connection_id: &str,
    ) -> Result<(ConnectionView, Vec<ConnectionEventRecord>), FederationError> {
        let record = self.find(connection_id).await?;
        let events = self.store.connection_events(&record.id).await?;
        Ok((self.view(record).await?, events))
    }

    /// Connections matching `filter`, with pending notice counts.
    pub async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<ConnectionView>, FederationError> {
        let records = self.store.list_connections(filter).await?;
        self.views(records).await
    }

    async fn find(&self, connection_id: &str) -> Result<ConnectionRecord, FederationError> {
        if connection_id.is_empty() {
            return Err(FederationError::Invalid("connection_id is required".into()));
        }
        self.store
            .find_connection(connection_id)
            .await?
            .ok_or_else(|| {
                FederationError::NoConnection(format!("no connection {connection_id:?}"))
            })
    }

    /// Accept, reject, suspend, resume or disconnect, as an operator of this
    /// instance; the peer is told by a signed notice (queued, then tried at once).
    /// An accept is refused when the peer's instance id is bound to another
    /// key (see [`Federation::accept_connection`]).
    pub async fn operator_action(
        &self,
        connection_id: &str,
        action: OperatorAction,
        granted_capabilities: &[String],
        reason: &str,
    ) -> Result<ConnectionView, FederationError> {
        self.act(
            connection_id,
            action,
            granted_capabilities,
            reason,
            NewKeyForKnownInstance::Refuse,
        )
        .await
    }

    /// AcceptConnection. When another connection binds the peer's instance
    /// id to another key (in any workspace, now or in the past: an accepted,
    /// suspended, disconnected or outbound one), the accept is refused with
    /// FAILED_PRECONDITION unless `new_key` says the operator checked the
    /// new key's fingerprint; the history then says so.
    pub async fn accept_connection(
        &self,
        connection_id: &str,
        granted_capabilities: &[String],
        new_key: NewKeyForKnownInstance,
    ) -> Result<ConnectionView, FederationError> {
        self.act(
            connection_id,
            OperatorAction::Accept,
            granted_capabilities,
            "",
            new_key,
        )
        .await
    }

    async fn act(
        &self,
        connection_id: &str,
        action: OperatorAction,
        granted_capabilities: &[String],
        reason: &str,
        new_key: NewKeyForKnownInstance,
    ) -> Result<ConnectionView, FederationError> {
        // Sent to the peer in the notice, which refuses what is not printable.
        if !crate::text::is_printable_line(reason) {
            return Err(FederationError::Invalid(
                "reason must be printable text (no control or invisible formatting characters)"
                    .into(),
            ));
        }
        let record = self.find(connection_id).await?;
        if action == OperatorAction::Accept {
            check_capability_list("granted_capabilities", granted_capabilities)?;
            check_offered(&self.identity.current(), granted_capabilities)?;
        }
        let reason = truncate(reason, MAX_REASON_CHARS);
        let mut change =
            self.action_change(&record, action, granted_capabilities, reason, Actor::Local)?;
        if action == OperatorAction::Accept
            && let Some(binding) = self
                .other_key_binding(
                    &record.remote_instance_id,
                    &record.remote_fingerprint,
                    Some(&record.id),
                )
                .await?
        {
            if new_key == NewKeyForKnownInstance::Refuse {
                return Err(FederationError::WrongState(format!(
                    "instance id {} is already bound to a different key (fingerprint {}, on {} connection {} in workspace {}); this request's key has fingerprint {}. Check it with the peer's operator, then accept with accept_new_key_for_known_instance (mosaicd peer accept --new-key)",
                    record.remote_instance_id,
                    binding.fingerprint,
                    binding.state.as_str().to_ascii_uppercase(),
                    binding.connection_id,
                    binding.workspace,
                    record.remote_fingerprint
                )));
            }
            // Kept here: the peer's ACCEPTED notice says nothing of the
            // other connection.
            let accepted = format!(
                "accepted a new key (fingerprint {}) for instance id {}, which was bound to fingerprint {}",
                record.remote_fingerprint, record.remote_instance_id, binding.fingerprint
            );
            if let Some(event) = change.event.as_mut() {
                event.reason.clone_from(&accepted);
            }
            change.state_reason = accepted;
        }
        let changed = match self.change_connection(&change).await? {
            WriteOutcome::Done(changed) => changed,
            _ => {
                return Err(FederationError::WrongState(
                    "the connection changed meanwhile; look at it again".into(),
                ));
            }
        };
        tracing::info!(
            connection.id = %changed.id,
            peer.id = %changed.remote_instance_id,
            from = record.state.as_str(),
            to = changed.state.as_str(),
            "changed a federation connection"
        );
        // One prompt attempt, so the usual case answers with the notice delivered;
        // the background task retries whatever is left.
        self.deliver_notices(&changed.id, true).await;
        let record = self.find(&changed.id).await?;
        self.view(record).await
    }

    /// The change `action` makes to `record`, by `actor`, with its event and
    /// the notice that tells the peer.
    fn action_change(
        &self,
        record: &ConnectionRecord,
        action: OperatorAction,
        granted_capabilities: &[String],
        reason: String,
        actor: Actor,
    ) -> Result<ConnectionChange, FederationError> {
        let outcome = state::after_operator_action(action, situation(record))
            .map_err(FederationError::WrongState)?;
        let now = self.now();
        let capabilities = (action == OperatorAction::Accept).then(|| ConnectionCapabilities {
            granted: granted_capabilities.to_vec(),
            ..record.capabilities.clone()
        });
        let notice = NoticeRecord {
            id: uuid::Uuid::new_v4().to_string(),
            connection_id: record.id.clone(),
            kind: outcome.notice,
            reason: reason.clone(),
            granted_capabilities: if action == OperatorAction::Accept {
                granted_capabilities.to_vec()
            } else {
                Vec::new()
            },
            signing_key_id: None,
            attempts: 0,
            next_attempt_at_ms: now,
            last_error: String::new(),
            created_at_ms: now,
        };
        let change = ConnectionChange {
            connection_id: record.id.clone(),
            expected_state: record.state,
            new_state: outcome.state,
            state_reason: reason.clone(),
            suspended_by: outcome.suspended_by,
            capabilities,
            new_remote_key: None,
            retired_peer_key: None,
            event: Some(event(
                &record.id,
                Some(record.state),
                outcome.state,
                actor,
                &reason,
                now,
            )),
            notice: Some(notice),
            seen: None,
            at_ms: now,
        };
        Ok(change)
    }

    /// Rejects, as the daemon, the inbound requests that waited longer than
    /// `federation.pending_request_ttl` for an operator (at most 100 a
    /// round); each requester is told by a REJECTED notice, as after an
    /// operator's reject. Returns how many were rejected.
    pub async fn expire_pending_requests(&self) -> Result<usize, FederationError> {
        let ttl = self.config.pending_request_ttl;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let before = self.now().saturating_sub(ttl_ms);
        let mut expired = 0;
        for record in self.store.pending_requests_before(before, 100).await? {
            let reason = format!(
                "expired: no operator answered the request within {}",
                humantime::format_duration(ttl)
            );
            let change =
                self.action_change(&record, OperatorAction::Reject, &[], reason, Actor::System)?;
            if let WriteOutcome::Done(changed) = self.change_connection(&change).await? {
                tracing::info!(
                    connection.id = %changed.id,
                    peer.id = %changed.remote_instance_id,
                    "a connection request expired unanswered"
                );
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Makes a new key current, the old one trusted for `grace`; writes the
    /// new certificate to `certificate_path` for local clients; and tells
    /// every open connection with queued KEY_ROTATED notices, retried until
    /// delivered. A failure to queue them is logged, not returned: the new
    /// key is in use already.
    pub async fn rotate_keys(
        &self,
        grace: std::time::Duration,
        certificate_path: &std::path::Path,
    ) -> Result<std::sync::Arc<crate::identity::Identity>, FederationError> {
        let old_key_id = self.identity.current().public_key().key_id();
        let identity = self.identity.rotate(grace).await?;
        crate::identity::certificate::write_pem_file(certificate_path, &identity.certificate().pem)
            .map_err(|error| {
                FederationError::Internal(format!(
                    "cannot write the new certificate to {}: {error}",
                    certificate_path.display()
                ))
            })?;
        if let Err(error) = self.after_rotation(&old_key_id).await {
            tracing::error!(%error, "could not queue key-rotation notices for peers");
        }
        Ok(identity)
    }

    /// After a key rotation: stop reusing channels made with the old certificate,
    /// and queue a KEY_ROTATED notice signed with `old_key_id` for every open
    /// connection (at most one pending per connection: its signing key is the
    /// one the peer knows).
    pub async fn after_rotation(&self, old_key_id: &str) -> Result<(), FederationError> {
        self.clients.forget_all();
        let now = self.now();
        for open_state in [
            ConnectionState::Pending,
            ConnectionState::Active,
            ConnectionState::Suspended,
        ] {
            let connections = self
                .store
                .list_connections(&ConnectionFilter {
                    state: Some(open_state),
                    limit: i64::MAX,
                    ..ConnectionFilter::default()
                })
                .await?;
            for connection in connections {
                let pending = self.store.notices_of(&connection.id).await?;
                if pending
                    .iter()
                    .any(|notice| notice.kind == NoticeKind::KeyRotated)
                {
                    continue;
                }
                self.store
                    .insert_notice(&NoticeRecord {
                        id: uuid::Uuid::new_v4().to_string(),
                        connection_id: connection.id.clone(),
                        kind: NoticeKind::KeyRotated,
                        reason: String::new(),
                        granted_capabilities: Vec::new(),
                        signing_key_id: Some(old_key_id.to_owned()),
                        attempts: 0,
                        next_attempt_at_ms: now,
                        last_error: String::new(),
                        created_at_ms: now,
                    })
                    .await?;
            }
        }
        self.wake_outbox.notify_one();
        Ok(())
    }
}
