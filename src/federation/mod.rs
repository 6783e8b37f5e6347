//! Federation: the public instance identity, key rotation, peering (mutual TLS,
//! workspace-scoped connections, signed notices and pings) and signed commands
//! between instances.
//!
//! - [`envelope`]: the signed envelope and the receiver's checks (pure).
//! - [`state`]: the connection state machine (pure).
//! - `Federation` (here): the state the handlers and the background task share.
//! - [`commands`]: signed commands: the receiver's side and the sender's.
//! - [`command_log`]: the command log as federation writes and lists it;
//!   `log_writers`: its group commits (received commands' message ids and log
//!   entries, `ReceivedLog`; sent reads' log entries, `SentLog`).
//! - [`dial`]: the allow/deny CIDR lists for dialing peers (pure).
//! - [`peer_client`]: cached mutual-TLS channels to peers.
//! - `peers`: the peer cache (open connections with their keys).
//! - `operator`: what an operator does to connections (ConnectPeer, accept,
//!   suspend, ...), and what a key rotation sets off.
//! - `callers`: who a wire call comes from; a caller that is not a key of
//!   the connection its header names gets one refusal, whatever that
//!   connection's state.
//! - `inbound`: what a peer sends: connection requests, notices, pings.
//! - [`peering`]: the rules both sides share (limits, checks, history events).
//! - [`outbox`]: notice delivery with retries, liveness pings, pruning.
//! - [`convert`]: the identity as `mosaic.federation.v1` shows it.
//! - [`service`]: the gRPC handlers.
//! - [`settings`]: `[federation]`, as written and resolved.

mod callers;
pub mod command_log;
pub mod commands;
pub mod convert;
pub mod dial;
pub mod envelope;
mod error;
mod inbound;
mod log_writers;
mod operator;
pub mod outbox;
pub mod paging;
pub mod peer_client;
pub mod peering;
mod peers;
pub mod service;
pub mod settings;
pub mod state;

pub use self::error::FederationError;

/// `ErrorInfo.reason` of a remote watch that gave up after the peer could not
/// be reached; its metadata `resume_from_sequence` says where to resume.
pub const REASON_WATCH_INTERRUPTED: &str = "WATCH_INTERRUPTED";
pub use self::operator::{ConnectRequest, ConnectionView};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use self::envelope::Routing;
use self::peer_client::{PeerClientSettings, PeerClients};
use self::peers::PeerEntry;
use crate::cache::TtlCache;
use crate::config::FederationConfig;
use crate::identity::{Identity, IdentityManager};
use crate::store::Store;

/// The clock federation reads: epoch milliseconds. Injected so tests can move it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Federation state shared by the handlers and the background task.
pub struct Federation {
    store: Store,
    identity: Arc<IdentityManager>,
    config: FederationConfig,
    clients: PeerClients,
    clock: Clock,
    delivery_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    wake_outbox: tokio::sync::Notify,
    /// This process as the holder of leases on background work shared with
    /// the other replicas of the instance (a UUID per process).
    lease_holder: String,
    command_counters: self::command_log::CommandCounters,
    /// Open connections with their keys by (workspace, peer instance id), read
    /// on every command; cleared by every connection change made here.
    peers: TtlCache<(String, String), Arc<PeerEntry>>,
    /// The only ACTIVE connection with a peer instance, for commands that name
    /// no workspace; cleared with `peers`.
    sole_peers: TtlCache<String, Arc<PeerEntry>>,
    /// The group commit of received commands, started on first use (on the
    /// runtime that serves them).
    received_log: std::sync::OnceLock<self::log_writers::ReceivedLog>,
    /// The writer of sent reads' log entries (behind their answers),
    /// started on first use.
    sent_log: std::sync::OnceLock<self::log_writers::SentLog>,
}

impl Federation {
    /// The instance's identity as it is now (its current and previous keys).
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.current()
    }

    /// This process's name as the holder of leases on background work
    /// shared with the other replicas (a UUID made at start).
    pub fn lease_holder(&self) -> &str {
        &self.lease_holder
    }

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
            lease_holder: uuid::Uuid::new_v4().to_string(),
            command_counters: self::command_log::CommandCounters::default(),
            peers: TtlCache::new(std::time::Duration::ZERO),
            sole_peers: TtlCache::new(std::time::Duration::ZERO),
            received_log: std::sync::OnceLock::new(),
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
    fn received_log(&self) -> &self::log_writers::ReceivedLog {
        self.received_log
            .get_or_init(|| self::log_writers::ReceivedLog::start(self.store.clone()))
    }

    /// The writer that commits sent reads' log entries behind their answers.
    fn sent_log(&self) -> &self::log_writers::SentLog {
        self.sent_log
            .get_or_init(|| self::log_writers::SentLog::start(self.store.clone()))
    }

    /// Returns once every sent read answered so far is in the command log:
    /// before the log is listed, and at shutdown.
    pub async fn flush_command_log(&self) {
        if let Some(sent_log) = self.sent_log.get() {
            sent_log.flush().await;
        }
    }

    /// Commands received and sent since start, by direction and outcome.
    pub fn command_counts(&self) -> Vec<(String, String, u64)> {
        self.command_counters.snapshot()
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.config.clock_window.as_millis()).unwrap_or(i64::MAX)
    }

    fn routing<'a>(
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
}
