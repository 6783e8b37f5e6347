//! Peering: the handshake (ConnectPeer on one side, RequestConnection on the
//! other), operator changes (accept, reject, suspend, resume, disconnect), the
//! notices that tell the peer, pings, and what a key rotation sets off.
//!
//! Every inbound message goes through the envelope checks in the order the
//! Federation service documents, and is acted on only after its signature and
//! replay checks; every change is one store transaction with its history event,
//! its notice and its message id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::FederationError;
use super::envelope::{self, Payload, Routing, TrustedKey, Verified};
use super::peer_client::{FirstContactError, PeerClientSettings, PeerClients, PeerError};
use super::state::{
    self, Actor, ConnectionState, Direction, NoticeKind, OperatorAction, Situation,
};
use crate::cache::TtlCache;
use crate::config::FederationConfig;
use crate::identity::{Identity, IdentityManager, PublicKey, fingerprint};
use crate::proto::federation as pb;
use crate::store::{
    ConnectionCapabilities, ConnectionChange, ConnectionEventRecord, ConnectionFilter,
    ConnectionRecord, NoticeRecord, PeerKeyRecord, SeenMessage, Store, StoredReply, WriteOutcome,
};

/// The clock federation reads: epoch milliseconds. Injected so tests can move it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Longest grace a peer may claim for its rotated-out key (30 days).
const MAX_PEER_KEY_GRACE_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Most capabilities in one list, and longest capability name.
const MAX_CAPABILITIES: usize = 32;
const MAX_CAPABILITY_CHARS: usize = 64;
/// Longest reason text kept.
const MAX_REASON_CHARS: usize = 1024;
/// Longest instance name accepted from a peer.
const MAX_NAME_CHARS: usize = 128;

/// A connection as shown to operators: the stored row and its undelivered
/// notices.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    /// The stored connection.
    pub record: ConnectionRecord,
    /// Notices to the peer not yet delivered.
    pub pending_notices: u32,
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

/// Federation state shared by the handlers and the background task.
pub struct Federation {
    pub(super) store: Store,
    pub(super) identity: Arc<IdentityManager>,
    pub(super) config: FederationConfig,
    pub(super) clients: PeerClients,
    pub(super) clock: Clock,
    delivery_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) wake_outbox: tokio::sync::Notify,
    pub(super) command_counters: super::audit::CommandCounters,
    /// Open connections with their keys by (workspace, peer instance id), read
    /// on every command; cleared by every connection change made here.
    peers: TtlCache<(String, String), Arc<PeerEntry>>,
    /// The only ACTIVE connection with a peer instance, for commands that name
    /// no workspace; cleared with `peers`.
    sole_peers: TtlCache<String, Arc<PeerEntry>>,
    /// The group commit of received commands, started on first use (on the
    /// runtime that serves them).
    journal: std::sync::OnceLock<super::journal::Journal>,
    /// The writer of sent reads' log entries (behind their answers),
    /// started on first use.
    sent_log: std::sync::OnceLock<super::journal::SentLog>,
}

/// An open connection with a peer in one workspace and the keys it was known
/// by, as read together from the store.
#[derive(Debug)]
pub(super) struct PeerEntry {
    /// The stored connection.
    pub connection: ConnectionRecord,
    /// The peer's keys on it.
    keys: PeerKeys,
}

impl PeerEntry {
    /// The keys the peer may sign with at `now_ms` (see [`PeerKeys::trusted`]).
    pub fn trusted_keys(&self, now_ms: i64) -> Vec<TrustedKey> {
        self.keys.trusted(now_ms)
    }
}

/// A peer's keys on one connection, as read from the store.
#[derive(Debug)]
struct PeerKeys {
    /// The peer's current key.
    current: PublicKey,
    /// Its previous keys with the end of their grace (expired ones included).
    previous: Vec<(PublicKey, i64)>,
}

impl PeerKeys {
    /// The keys the peer may sign with at `now_ms`: its current key and previous
    /// keys still in their grace period.
    fn trusted(&self, now_ms: i64) -> Vec<TrustedKey> {
        std::iter::once(TrustedKey {
            key: self.current.clone(),
            valid_until_ms: None,
        })
        .chain(
            self.previous
                .iter()
                .filter(|(_, valid_until_ms)| *valid_until_ms > now_ms)
                .map(|(key, valid_until_ms)| TrustedKey {
                    key: key.clone(),
                    valid_until_ms: Some(*valid_until_ms),
                }),
        )
        .collect()
    }
}

impl Federation {
    /// Federation over `store` and `identity`, reading the wall clock.
    pub fn new(
        store: Store,
        identity: Arc<IdentityManager>,
        config: FederationConfig,
        max_message_bytes: usize,
    ) -> Self {
        Self::with_clock(
            store,
            identity,
            config,
            max_message_bytes,
            Arc::new(crate::clock::now_ms),
        )
    }

    /// The same with an injected clock.
    pub fn with_clock(
        store: Store,
        identity: Arc<IdentityManager>,
        config: FederationConfig,
        max_message_bytes: usize,
        clock: Clock,
    ) -> Self {
        let clients = PeerClients::new(
            Arc::clone(&identity),
            PeerClientSettings {
                policy: config.dial_policy.clone(),
                connect_timeout: config.connect_timeout,
                call_timeout: config.call_timeout,
                max_message_bytes,
            },
        );
        Self {
            store,
            identity,
            config,
            clients,
            clock,
            delivery_locks: Mutex::new(HashMap::new()),
            wake_outbox: tokio::sync::Notify::new(),
            command_counters: super::audit::CommandCounters::default(),
            peers: TtlCache::new(std::time::Duration::ZERO),
            sole_peers: TtlCache::new(std::time::Duration::ZERO),
            journal: std::sync::OnceLock::new(),
            sent_log: std::sync::OnceLock::new(),
        }
    }

    /// Believes a peer's connection and keys read from the store for `lifetime`
    /// (`server.auth_cache_ms`) instead of reading them for every command.
    /// Changes made through this `Federation` apply at once; another process's
    /// (a replica's) when the entry expires. Without this, every command reads.
    #[must_use]
    pub fn with_peer_cache(mut self, lifetime: std::time::Duration) -> Self {
        self.peers = TtlCache::new(lifetime);
        self.sole_peers = TtlCache::new(lifetime);
        self
    }

    /// The writer that commits received commands in groups.
    pub(super) fn journal(&self) -> &super::journal::Journal {
        self.journal
            .get_or_init(|| super::journal::Journal::start(self.store.clone()))
    }

    /// The writer that commits sent reads' log entries behind their answers.
    pub(super) fn sent_log(&self) -> &super::journal::SentLog {
        self.sent_log
            .get_or_init(|| super::journal::SentLog::start(self.store.clone()))
    }

    /// Returns once every sent read answered so far is in the command log:
    /// before the log is listed, and at shutdown.
    pub async fn flush_command_log(&self) {
        if let Some(sent_log) = self.sent_log.get() {
            sent_log.flush().await;
        }
    }

    /// Forgets every cached connection.
    fn forget_peers(&self) {
        self.peers.clear();
        self.sole_peers.clear();
    }

    /// Stores a new connection, then forgets the cached ones.
    async fn insert_connection(
        &self,
        record: &ConnectionRecord,
        events: &[ConnectionEventRecord],
        seen: Option<&SeenMessage>,
    ) -> Result<WriteOutcome<()>, crate::store::StoreError> {
        let written = self.store.insert_connection(record, events, seen).await;
        self.forget_peers();
        written
    }

    /// Changes a stored connection (state, capabilities, the peer's key), then
    /// forgets the cached ones, so the next command sees the change.
    async fn change_connection(
        &self,
        change: &ConnectionChange,
    ) -> Result<WriteOutcome<ConnectionRecord>, crate::store::StoreError> {
        let written = self.store.change_connection(change).await;
        self.forget_peers();
        written
    }

    /// The cached ACTIVE connection with `peer_instance_id` when it is the only
    /// one (a command that names no workspace), or a ticket to remember it.
    pub(super) fn sole_peer(
        &self,
        peer_instance_id: &str,
    ) -> Result<Arc<PeerEntry>, crate::cache::Ticket> {
        self.sole_peers.get(&peer_instance_id.to_owned())
    }

    /// Remembers `peer` as the only ACTIVE connection with `peer_instance_id`.
    pub(super) fn remember_sole_peer(
        &self,
        ticket: crate::cache::Ticket,
        peer_instance_id: &str,
        peer: &Arc<PeerEntry>,
    ) {
        self.sole_peers
            .insert(ticket, peer_instance_id.to_owned(), Arc::clone(peer));
    }

    /// The open (not DISCONNECTED) connection with `peer_instance_id` in
    /// `workspace` and its keys, from the cache while it is fresh.
    pub(super) async fn open_peer(
        &self,
        workspace: &str,
        peer_instance_id: &str,
    ) -> Result<Option<Arc<PeerEntry>>, FederationError> {
        let key = (workspace.to_owned(), peer_instance_id.to_owned());
        let ticket = match self.peers.get(&key) {
            Ok(entry) => return Ok(Some(entry)),
            Err(ticket) => ticket,
        };
        let Some(connection) = self
            .store
            .find_open_connection(workspace, peer_instance_id)
            .await?
        else {
            return Ok(None);
        };
        let entry = Arc::new(self.peer_entry(connection).await?);
        self.peers.insert(ticket, key, Arc::clone(&entry));
        Ok(Some(entry))
    }

    /// Commands received and sent since start, by direction and outcome.
    pub fn command_counts(&self) -> Vec<(String, String, u64)> {
        self.command_counters.snapshot()
    }

    pub(super) fn now(&self) -> i64 {
        (self.clock)()
    }

    pub(super) fn window_ms(&self) -> i64 {
        i64::try_from(self.config.clock_window.as_millis()).unwrap_or(i64::MAX)
    }

    pub(super) fn routing<'a>(
        &self,
        identity: &'a Identity,
        recipient: &'a str,
        workspace: &'a str,
    ) -> Routing<'a> {
        Routing {
            sender_instance_id: &identity.instance_id,
            recipient_instance_id: recipient,
            workspace,
            now_ms: self.now(),
            lifetime_ms: i64::try_from(self.config.message_lifetime.as_millis())
                .unwrap_or(i64::MAX),
        }
    }

    /// The keys a peer may sign with on this connection: its current key and
    /// previous keys still in their grace period.
    pub(super) async fn trusted_keys(
        &self,
        connection: &ConnectionRecord,
    ) -> Result<Vec<TrustedKey>, FederationError> {
        Ok(self.peer_keys(connection).await?.trusted(self.now()))
    }

    /// `connection` with the peer's keys read from the store.
    pub(super) async fn peer_entry(
        &self,
        connection: ConnectionRecord,
    ) -> Result<PeerEntry, FederationError> {
        let keys = self.peer_keys(&connection).await?;
        Ok(PeerEntry { connection, keys })
    }

    /// The peer's current key on `connection` and its previous keys from the
    /// store.
    async fn peer_keys(&self, connection: &ConnectionRecord) -> Result<PeerKeys, FederationError> {
        let current = PublicKey::from_spki_der(&connection.remote_public_key)
            .map_err(|error| FederationError::Internal(format!("stored peer key: {error}")))?;
        let previous = self
            .store
            .peer_keys(&connection.id)
            .await?
            .into_iter()
            .filter_map(|previous| {
                PublicKey::from_spki_der(&previous.public_key)
                    .ok()
                    .map(|key| (key, previous.valid_until_ms))
            })
            .collect();
        Ok(PeerKeys { current, previous })
    }

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

    // ----- operator side -------------------------------------------------------

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
                FederationError::InvalidArgument(format!(
                    "expected_fingerprint {typed:?} is not a fingerprint (eight groups of four like ABCD-EFGH-...)"
                ))
            })?),
        };
        super::peer_client::parse_peer_url(&request.url)
            .map_err(|error| FederationError::InvalidArgument(error.to_string()))?;

        let (instance, tls_key) = self
            .clients
            .first_contact(&request.url)
            .await
            .map_err(first_contact_error)?;
        let claimed = PublicKey::from_spki_der(&instance.public_key).map_err(|_| {
            FederationError::FailedPrecondition(
                "the peer claims a key that is not an ECDSA P-256 key; nothing was stored".into(),
            )
        })?;
        if claimed != tls_key {
            return Err(FederationError::FailedPrecondition(
                "the peer's TLS key is not the key it claims in GetInstance; nothing was stored"
                    .into(),
            ));
        }
        if let Some(expected) = &expected_fingerprint
            && !fingerprint::matches(expected, claimed.spki_der())
        {
            return Err(FederationError::FailedPrecondition(format!(
                "the peer's fingerprint is {}, not the expected one; nothing was stored",
                claimed.fingerprint()
            )));
        }
        if instance.instance_id.is_empty() || instance.instance_id.len() > 64 {
            return Err(FederationError::FailedPrecondition(
                "the peer's identity has no usable instance id".into(),
            ));
        }
        if instance.instance_id == identity.instance_id {
            return Err(FederationError::InvalidArgument(
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
            sender: Some(super::service::instance_message(&identity)),
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
            return Err(FederationError::InvalidArgument(
                "connection_id is required".into(),
            ));
        }
        self.store
            .find_connection(connection_id)
            .await?
            .ok_or_else(|| FederationError::NotFound(format!("no connection {connection_id:?}")))
    }

    /// Accept, reject, suspend, resume or disconnect, as an operator of this
    /// instance; the peer is told by a signed notice (queued, then tried at once).
    pub async fn operator_action(
        &self,
        connection_id: &str,
        action: OperatorAction,
        granted_capabilities: &[String],
        reason: &str,
    ) -> Result<ConnectionView, FederationError> {
        let record = self.find(connection_id).await?;
        if action == OperatorAction::Accept {
            check_capability_list("granted_capabilities", granted_capabilities)?;
            check_offered(&self.identity.current(), granted_capabilities)?;
        }
        let reason = truncate(reason, MAX_REASON_CHARS);
        let outcome = state::after_operator_action(action, situation(&record))
            .map_err(FederationError::FailedPrecondition)?;
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
                Actor::Local,
                &reason,
                now,
            )),
            notice: Some(notice),
            seen: None,
            at_ms: now,
        };
        let changed = match self.change_connection(&change).await? {
            WriteOutcome::Done(changed) => changed,
            _ => {
                return Err(FederationError::FailedPrecondition(
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

    // ----- wire side -----------------------------------------------------------

    /// RequestConnection from a peer.
    pub async fn receive_request(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
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
            .ok_or_else(|| FederationError::InvalidArgument("sender is missing".into()))?;
        if sender.instance_id != header.sender_instance_id {
            return Err(FederationError::InvalidArgument(
                "sender.instance_id is not the header's sender".into(),
            ));
        }
        let sender_key = PublicKey::from_spki_der(&sender.public_key).map_err(|_| {
            FederationError::InvalidArgument("sender.public_key is not an ECDSA P-256 key".into())
        })?;
        if sender_key.key_id() != header.key_id {
            return Err(FederationError::InvalidArgument(
                "header.key_id is not the key id of sender.public_key".into(),
            ));
        }
        // 4: addressed to us.
        parsed.check_recipient(&identity.instance_id)?;
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
            .ok_or_else(|| FederationError::InvalidArgument("sender is missing".into()))?;
        let (host, _) = super::peer_client::parse_peer_url(&sender.url)
            .map_err(|error| FederationError::InvalidArgument(format!("sender.url: {error}")))?;
        if let Ok(address) = host.parse::<std::net::IpAddr>()
            && !self.clients.policy().permits(address)
        {
            return Err(FederationError::PermissionDenied(
                "sender.url is an address this instance's dial policy denies".into(),
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

        let auto_accept = fingerprint::normalize(&sender_key.fingerprint())
            .is_some_and(|printed| self.config.auto_accept_fingerprints.contains(&printed));
        // Anyone holding a key can ask, so the requests an operator has not
        // answered yet are bounded.
        if !auto_accept
            && self
                .store
                .count_connections(Direction::Inbound, ConnectionState::Pending)
                .await?
                >= i64::from(self.config.max_pending_inbound)
        {
            return Err(FederationError::ResourceExhausted(
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
            state_reason: String::new(),
            suspended_by: None,
            reachable: true,
            last_contact_at_ms: Some(now),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let mut events = vec![event(
            &record.id,
            None,
            ConnectionState::Pending,
            Actor::Peer,
            "",
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
        Ok(reply)
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
            FederationError::InvalidArgument("the notice kind is not set or not known".into())
        })?;
        let rotated_to = if kind == NoticeKind::KeyRotated {
            let new_key = claimed.new_key.as_ref().ok_or_else(|| {
                FederationError::InvalidArgument("KEY_ROTATED needs new_key".into())
            })?;
            let key = PublicKey::from_spki_der(&new_key.public_key).map_err(|_| {
                FederationError::InvalidArgument("new_key is not an ECDSA P-256 key".into())
            })?;
            let valid_until = claimed
                .previous_key_valid_until
                .as_ref()
                .map(crate::clock::ms_from_timestamp)
                .ok_or_else(|| {
                    FederationError::InvalidArgument(
                        "KEY_ROTATED needs previous_key_valid_until".into(),
                    )
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
            .map_err(FederationError::FailedPrecondition)?;
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
                return Err(FederationError::FailedPrecondition(
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
            return Err(FederationError::AlreadyExists(
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
            .ok_or_else(|| {
                FederationError::AlreadyExists("this message id was already used".into())
            })?;
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

fn stored_reply(seen: SeenMessage, digest: &[u8]) -> Result<pb::SignedEnvelope, FederationError> {
    match seen.reply {
        Some(reply) if seen.payload_digest == digest => Ok(pb::SignedEnvelope {
            payload: reply.payload,
            signature: reply.signature,
            key_id: reply.key_id,
        }),
        _ => Err(FederationError::AlreadyExists(
            "this message id was already used for another message".into(),
        )),
    }
}

pub(super) fn seen_message(
    header: &pb::EnvelopeHeader,
    digest: Vec<u8>,
    reply: Option<&pb::SignedEnvelope>,
    now: i64,
) -> SeenMessage {
    SeenMessage {
        sender_instance_id: header.sender_instance_id.clone(),
        message_id: header.message_id.clone(),
        payload_digest: digest,
        reply: reply.map(|reply| StoredReply {
            payload: reply.payload.clone(),
            signature: reply.signature.clone(),
            key_id: reply.key_id.clone(),
        }),
        seen_at_ms: now,
    }
}

pub(super) fn situation(record: &ConnectionRecord) -> Situation {
    Situation {
        state: record.state,
        direction: record.direction,
        suspended_by: record.suspended_by,
    }
}

fn event(
    connection_id: &str,
    from_state: Option<ConnectionState>,
    to_state: ConnectionState,
    actor: Actor,
    reason: &str,
    at_ms: i64,
) -> ConnectionEventRecord {
    ConnectionEventRecord {
        connection_id: connection_id.to_owned(),
        from_state,
        to_state,
        actor,
        reason: reason.to_owned(),
        at_ms,
    }
}

pub(super) fn no_connection() -> FederationError {
    FederationError::PermissionDenied("no open connection with the sender in that workspace".into())
}

fn already_open(workspace: &str) -> FederationError {
    FederationError::AlreadyExists(format!(
        "a pending, active or suspended connection with this peer in workspace {workspace:?} already exists"
    ))
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// A workspace name: 1 to 128 printable characters.
pub fn check_workspace(workspace: &str) -> Result<(), FederationError> {
    let length = workspace.chars().count();
    if length == 0
        || length > envelope::MAX_WORKSPACE_CHARS
        || workspace.chars().any(char::is_control)
    {
        return Err(FederationError::InvalidArgument(format!(
            "workspace must be 1 to {} printable characters",
            envelope::MAX_WORKSPACE_CHARS
        )));
    }
    Ok(())
}

fn check_capability_list(field: &str, capabilities: &[String]) -> Result<(), FederationError> {
    if capabilities.len() > MAX_CAPABILITIES
        || capabilities.iter().any(|capability| {
            capability.is_empty()
                || capability.chars().count() > MAX_CAPABILITY_CHARS
                || capability.chars().any(char::is_control)
        })
    {
        return Err(FederationError::InvalidArgument(format!(
            "{field}: at most {MAX_CAPABILITIES} capabilities of 1 to {MAX_CAPABILITY_CHARS} characters"
        )));
    }
    Ok(())
}

fn check_offered(identity: &Identity, granted: &[String]) -> Result<(), FederationError> {
    if let Some(unknown) = granted
        .iter()
        .find(|grant| !identity.profile.capabilities.contains(grant))
    {
        return Err(FederationError::InvalidArgument(format!(
            "{unknown:?} is not a capability this instance offers ({})",
            identity.profile.capabilities.join(", ")
        )));
    }
    Ok(())
}

pub(super) fn peer_error(error: PeerError) -> FederationError {
    match error {
        PeerError::InvalidUrl { .. } => FederationError::InvalidArgument(error.to_string()),
        PeerError::Denied(message) => FederationError::PermissionDenied(message),
        PeerError::Unreachable(message) => FederationError::Unavailable(message),
    }
}

/// A failed call to a peer: transport failures and timeouts become UNAVAILABLE
/// and DEADLINE_EXCEEDED; a refusal by the peer keeps the peer's code.
pub(super) fn peer_status(status: tonic::Status) -> FederationError {
    match status.code() {
        tonic::Code::DeadlineExceeded => FederationError::DeadlineExceeded(format!(
            "the peer did not answer in time: {}",
            status.message()
        )),
        // tonic reports a broken connection (including a TLS refusal on the
        // first call, STACK-NOTES trap 6) as UNKNOWN or CANCELLED.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            FederationError::Unavailable(format!(
                "the peer cannot be reached: {}",
                status.message()
            ))
        }
        _ => FederationError::Peer(status),
    }
}

fn first_contact_error(error: FirstContactError) -> FederationError {
    match error {
        FirstContactError::Peer(error) => peer_error(error),
        FirstContactError::Status(status) => peer_status(status),
        FirstContactError::NoInstance => {
            FederationError::FailedPrecondition("the peer returned no identity".into())
        }
    }
}
