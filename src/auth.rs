//! Who is calling: API keys (made, hashed, scoped, revoked) and the [`Authenticator`]
//! that decides every call before any handler runs.
//!
//! The server's front door (`front_door`, which rate-limits the client IP
//! before authentication and the caller's key after it) calls
//! [`Authenticator::authenticate_now`], and [`Authenticator::look_up`] when a
//! key must be read from the store; the method is looked up in
//! [`requirement_for`] — one table for the whole server — and either rejects the
//! call or yields the [`Caller`] the layer puts into the request's extensions for
//! the handler. A method of a known service that is missing from the
//! table is refused (fail closed).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::cache::{Ticket, TtlCache};
use crate::clock::now_ms;
use crate::identity::PublicKey;
use crate::store::{ApiKeyRecord, Store, StoreError};

/// The prefix of every API key, so leaked keys are easy to recognise and scan for.
pub const API_KEY_PREFIX: &str = "mosaic_";
/// Random bytes in a key (256 bits).
const API_KEY_RANDOM_BYTES: usize = 32;
/// Characters of the key kept in the clear to tell keys apart in listings.
const DISPLAY_PREFIX_CHARS: usize = 12;
/// `last_used_at` is written at most this often per key, so a busy key does not
/// turn every call into a database write.
const TOUCH_INTERVAL_MS: i64 = 60_000;

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Federation administration: peers, keys, remote agents.
    Admin,
    /// The local agent runtime (`AgentControl`).
    Agents,
    /// The job API (`Coordinator`).
    Coordinator,
    /// Bot entry points (`HandleWebhook`, `DispatchJob`).
    Webhook,
}

impl Scope {
    /// Every scope, in display order.
    pub const ALL: [Scope; 4] = [
        Scope::Admin,
        Scope::Agents,
        Scope::Coordinator,
        Scope::Webhook,
    ];

    /// The scope's name as typed and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Agents => "agents",
            Scope::Coordinator => "coordinator",
            Scope::Webhook => "webhook",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == text.trim())
            .ok_or_else(|| {
                format!(
                    "unknown scope {text:?}; expected one of admin, agents, coordinator, webhook"
                )
            })
    }
}

/// A newly created key: the only moment the secret exists outside the caller.
pub struct NewApiKey {
    /// The stored record (hash only).
    pub record: ApiKeyRecord,
    /// The key itself, to be shown once.
    pub secret: zeroize::Zeroizing<String>,
}

/// Why an API key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// Name or scopes are unusable (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The random source failed (INTERNAL, logged).
    #[error("the system random source failed")]
    Random,
}

/// Creates and stores a new API key.
pub async fn create_api_key(
    store: &Store,
    name: &str,
    scopes: &[Scope],
) -> Result<NewApiKey, ApiKeyError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiKeyError::Invalid(
            "an API key needs a name of 1 to 128 characters".into(),
        ));
    }
    if scopes.is_empty() {
        return Err(ApiKeyError::Invalid(
            "an API key needs at least one scope (admin, agents, coordinator, webhook)".into(),
        ));
    }
    let mut random = zeroize::Zeroizing::new([0u8; API_KEY_RANDOM_BYTES]);
    SystemRandom::new()
        .fill(random.as_mut())
        .map_err(|_| ApiKeyError::Random)?;
    let secret = zeroize::Zeroizing::new(format!(
        "{API_KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*random)
    ));
    let mut sorted_scopes = scopes.to_vec();
    sorted_scopes.sort();
    sorted_scopes.dedup();
    let record = ApiKeyRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        key_hash: hash_api_key(&secret).to_vec(),
        prefix: secret.chars().take(DISPLAY_PREFIX_CHARS).collect(),
        scopes: sorted_scopes
            .iter()
            .map(|scope| scope.as_str().to_owned())
            .collect(),
        created_at_ms: now_ms(),
        last_used_at_ms: None,
        revoked_at_ms: None,
    };
    store.insert_api_key(&record).await?;
    Ok(NewApiKey { record, secret })
}

/// SHA-256 of the key. Keys carry 256 random bits, so a fast hash is enough: there
/// is nothing to brute-force that a slow hash would protect.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    let mut hash = [0; 32];
    hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref());
    hash
}

/// What a method demands of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Anyone (health, reflection, public identity).
    Public,
    /// An API key holding this scope.
    ApiKey(Scope),
    /// A TLS client certificate; the handler checks that it belongs to a peer.
    PeerCertificate,
}

/// The one table of who may call what. `None` means the service is not ours, and
/// the router will answer UNIMPLEMENTED without running anything.
pub fn requirement_for(path: &str) -> Option<Requirement> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let requirement = match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Requirement::Public,
        "mosaic.federation.v1.Federation" => match method {
            "GetInstance" => Requirement::Public,
            "RequestConnection" | "NotifyConnection" | "ExecuteCommand" | "WatchCommand"
            | "Ping" => Requirement::PeerCertificate,
            _ => Requirement::ApiKey(Scope::Admin),
        },
        "mosaic.agent.v1.AgentControl" => Requirement::ApiKey(Scope::Agents),
        // The handlers admit only this instance's own key.
        "mosaic.replica.v1.Replica" => Requirement::PeerCertificate,
        "mosaic.coordinator.v1.Coordinator" => match method {
            "Health" => Requirement::Public,
            "HandleWebhook" | "DispatchJob" => Requirement::ApiKey(Scope::Webhook),
            _ => Requirement::ApiKey(Scope::Coordinator),
        },
        _ => return None,
    };
    Some(requirement)
}

/// Who made a call, as established by the auth layer.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No credentials (public methods only).
    Anonymous,
    /// A validated, unrevoked API key.
    ApiKey {
        /// The key's id (never the key).
        id: Arc<str>,
        /// The key's name.
        name: Arc<str>,
    },
    /// A TLS client presenting a certificate for this key.
    PeerCertificate(PublicKey),
}

impl Caller {
    /// The caller of a request that went through the auth layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// The verified TLS peer key, if the caller presented a certificate.
    pub fn peer_key(&self) -> Option<&PublicKey> {
        match self {
            Caller::PeerCertificate(key) => Some(key),
            _ => None,
        }
    }
}

/// How the caller shows in request logs (never the key itself): `anonymous`,
/// `api_key:<id>` or `peer:<key id>`.
impl std::fmt::Display for Caller {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => formatter.write_str("anonymous"),
            // In pieces, not through a format string: written on every
            // call's log line.
            Caller::ApiKey { id, .. } => {
                formatter.write_str("api_key:")?;
                formatter.write_str(id)
            }
            Caller::PeerCertificate(key) => write!(formatter, "peer:{}", key.key_id()),
        }
    }
}

/// A stored key as the [`Authenticator`] keeps it: the record, with its id
/// and name ready to be shared by every call's [`Caller`] (no copy per call),
/// and when its use was last recorded.
struct KnownKey {
    record: ApiKeyRecord,
    id: Arc<str>,
    name: Arc<str>,
    /// `last_used_at` as this process last knew it: read with the record,
    /// then set by [`Authenticator::touch`]. A call compares it with the
    /// clock, with no lock and no lookup of its own.
    last_used_at_ms: AtomicI64,
}

/// Checks credentials against the store.
pub struct Authenticator {
    store: Store,
    /// Stored keys by hash, each believed for `server.auth_cache_ms` (revoked
    /// ones too, so that they stay refused). Only keys found in the store are
    /// kept: an unknown key is looked up every time it is presented.
    keys: TtlCache<[u8; 32], Arc<KnownKey>>,
}

/// An API key [`Authenticator::authenticate_now`] did not find in its cache:
/// its hash, the scope the method needs, and when the lookup began.
#[derive(Debug)]
pub struct KeyLookup {
    hash: [u8; 32],
    scope: Scope,
    ticket: Ticket,
}

impl Authenticator {
    /// An authenticator backed by `store` that believes a key it read for
    /// `cache_lifetime` (zero: every call reads the store).
    pub fn new(store: Store, cache_lifetime: Duration) -> Self {
        Self {
            store,
            keys: TtlCache::new(cache_lifetime),
        }
    }

    /// Decides a call to a method with this `requirement` (see
    /// [`requirement_for`]). `peer_key` is the key of the TLS connection's
    /// client certificate, if any (the caller may skip parsing it for a
    /// method that does not need one).
    pub async fn authenticate(
        &self,
        requirement: Option<Requirement>,
        headers: &http::HeaderMap,
        peer_key: Option<PublicKey>,
    ) -> Result<Caller, tonic::Status> {
        match self.authenticate_now(requirement, headers, peer_key) {
            Ok(decided) => decided,
            Err(lookup) => self.look_up(lookup).await,
        }
    }

    /// [`Self::authenticate`] without waiting: decided here unless an API
    /// key must be read from the store (not cached, or its entry expired),
    /// which [`Self::look_up`] then does. The front door's hot path, which
    /// so pays for no future.
    pub fn authenticate_now(
        &self,
        requirement: Option<Requirement>,
        headers: &http::HeaderMap,
        peer_key: Option<PublicKey>,
    ) -> Result<Result<Caller, tonic::Status>, KeyLookup> {
        match requirement {
            None | Some(Requirement::Public) => Ok(Ok(Caller::Anonymous)),
            Some(Requirement::PeerCertificate) => {
                Ok(peer_key.map(Caller::PeerCertificate).ok_or_else(|| {
                    tonic::Status::unauthenticated(
                        "this federation method needs a TLS client certificate of a connected peer",
                    )
                }))
            }
            Some(Requirement::ApiKey(scope)) => {
                let presented = match presented_api_key(headers, scope) {
                    Ok(presented) => presented,
                    Err(status) => return Ok(Err(status)),
                };
                let hash = hash_api_key(presented);
                match self.keys.get(&hash) {
                    Ok(known) => Ok(self.admit_key(Some(known), scope)),
                    Err(ticket) => Err(KeyLookup {
                        hash,
                        scope,
                        ticket,
                    }),
                }
            }
        }
    }

    /// Reads the key of a call [`Self::authenticate_now`] could not decide,
    /// keeps it for `server.auth_cache_ms`, and decides the call.
    pub async fn look_up(&self, lookup: KeyLookup) -> Result<Caller, tonic::Status> {
        let KeyLookup {
            hash,
            scope,
            ticket,
        } = lookup;
        // Boxed: a miss is rare, and its future (kilobytes) would otherwise
        // be carried by every call's.
        let record = Box::pin(self.store.find_api_key_by_hash(&hash))
            .await
            .map_err(|error| match error {
                StoreError::Unavailable(_) => {
                    tonic::Status::unavailable("the database is unavailable; try again shortly")
                }
                other => {
                    tracing::error!(error = %other, "api key lookup failed");
                    tonic::Status::internal("internal error")
                }
            })?
            .map(|record| {
                Arc::new(KnownKey {
                    id: Arc::from(record.id.as_str()),
                    name: Arc::from(record.name.as_str()),
                    last_used_at_ms: AtomicI64::new(record.last_used_at_ms.unwrap_or(i64::MIN)),
                    record,
                })
            });
        if let Some(record) = &record {
            self.keys.insert(ticket, hash, Arc::clone(record));
        }
        self.admit_key(record, scope)
    }

    /// The caller of a key found (or not) in the store, for a method that
    /// needs `scope`.
    fn admit_key(
        &self,
        known: Option<Arc<KnownKey>>,
        scope: Scope,
    ) -> Result<Caller, tonic::Status> {
        let Some(known) = known.filter(|known| known.record.revoked_at_ms.is_none()) else {
            return Err(tonic::Status::unauthenticated("invalid or revoked API key"));
        };
        let record = &known.record;
        if !record
            .scopes
            .iter()
            .any(|granted| granted == scope.as_str())
        {
            return Err(tonic::Status::permission_denied(format!(
                "API key {:?} lacks the `{scope}` scope this method needs",
                record.name
            )));
        }
        self.touch(&known);
        Ok(Caller::ApiKey {
            id: Arc::clone(&known.id),
            name: Arc::clone(&known.name),
        })
    }

    /// Records use of a key in the background, at most once per interval:
    /// the stored time is read with the key, so a key read again after its
    /// cache entry expired (or read by another replica) is not written again
    /// before the interval has passed. Of calls racing at the interval's end,
    /// one writes.
    fn touch(&self, known: &KnownKey) {
        let now = now_ms();
        let previous = known.last_used_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(previous) < TOUCH_INTERVAL_MS
            || known
                .last_used_at_ms
                .compare_exchange(previous, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let store = self.store.clone();
        let key_id = known.record.id.clone();
        tokio::spawn(async move {
            if let Err(error) = store.touch_api_key(&key_id, now).await {
                tracing::warn!(api_key.id = %key_id, %error, "could not record api key use");
            }
        });
    }
}

/// The header an API key comes in (or `authorization: Bearer`); a constant,
/// so its name is not parsed on every call.
const API_KEY_HEADER: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// Extracts the key from `authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_api_key(headers: &http::HeaderMap, scope: Scope) -> Result<&str, tonic::Status> {
    let malformed = |detail: &str| {
        tonic::Status::unauthenticated(format!("malformed API key header: {detail}"))
    };
    let from_authorization = match headers.get(http::header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| malformed("authorization is not ASCII"))?;
            let (kind, key) = value
                .split_once(' ')
                .ok_or_else(|| malformed("expected `authorization: Bearer <key>`"))?;
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(malformed("expected `authorization: Bearer <key>`"));
            }
            Some(key.trim())
        }
    };
    let from_header = match headers.get(API_KEY_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| malformed("x-api-key is not ASCII"))?
                .trim(),
        ),
    };
    let key = match (from_authorization, from_header) {
        (Some(a), Some(b)) if a != b => {
            return Err(malformed(
                "authorization and x-api-key carry different keys",
            ));
        }
        (Some(key), _) | (None, Some(key)) => key,
        (None, None) => {
            return Err(tonic::Status::unauthenticated(format!(
                "this method needs an API key with the `{scope}` scope: send `authorization: Bearer <key>` or `x-api-key: <key>`"
            )));
        }
    };
    if key.is_empty() || key.len() > 256 {
        return Err(malformed("empty or oversized key"));
    }
    Ok(key)
}

/// The verified client certificate key of the connection, if any.
pub fn peer_key_of(extensions: &http::Extensions) -> Option<PublicKey> {
    let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certificates = info.peer_certs()?;
    crate::tls::peer_public_key(&certificates)
}

/// The remote address and port of the connection a call came on (TLS or
/// plaintext), as the server recorded it.
pub fn remote_address(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    if let Some(info) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return info.get_ref().remote_addr();
    }
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
}

/// What the tests of this module and of the front door set up.
#[cfg(test)]
pub(crate) mod testing {
    use super::{NewApiKey, Scope, Store, create_api_key};

    /// A SQLite store (in `dir`) holding one coordinator key, `bot`.
    pub(crate) async fn store_with_a_key(dir: &std::path::Path) -> (Store, NewApiKey) {
        let store = crate::store::testing::TestDatabase::sqlite(dir)
            .migrated_store()
            .await
            .expect("open the database");
        let key = create_api_key(&store, "bot", &[Scope::Coordinator])
            .await
            .expect("create a key");
        (store, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::store_with_a_key;

    #[test]
    fn a_caller_is_shown_by_its_key_id_never_its_key() {
        assert_eq!(Caller::Anonymous.to_string(), "anonymous");
        let caller = Caller::ApiKey {
            id: Arc::from("abc"),
            name: Arc::from("bot"),
        };
        assert_eq!(caller.to_string(), "api_key:abc");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_call_carries_a_small_future_and_shares_the_cached_key() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, key) = store_with_a_key(dir.path()).await;
        let authenticator = Authenticator::new(store, Duration::from_secs(60));
        let headers = headers(&[("x-api-key", key.secret.as_str())]);
        let path = "/mosaic.coordinator.v1.Coordinator/GetJob";
        // The store's lookup, on a miss only, is boxed: it is kilobytes.
        let call = authenticator.authenticate(requirement_for(path), &headers, None);
        let bytes = std::mem::size_of_val(&call);
        assert!(bytes <= 1024, "authenticate is a future of {bytes} bytes");
        let first = call.await.expect("the key is valid");
        let second = authenticator
            .authenticate(requirement_for(path), &headers, None)
            .await
            .expect("the key is valid");
        let (Caller::ApiKey { id: first, .. }, Caller::ApiKey { id: second, name }) =
            (first, second)
        else {
            panic!("an API key caller");
        };
        assert_eq!(&*name, "bot");
        assert!(Arc::ptr_eq(&first, &second), "one id shared, not copied");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn use_is_recorded_once_a_minute_even_when_the_key_is_read_again() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, key) = store_with_a_key(dir.path()).await;
        let hash = hash_api_key(key.secret.as_str());
        let last_used = || async {
            store
                .find_api_key_by_hash(&hash)
                .await
                .expect("read the key")
                .expect("the key exists")
                .last_used_at_ms
        };
        // No cache: every call reads the key again, as a call on another
        // replica, or after the cache entry expired, would.
        let authenticator = Authenticator::new(store.clone(), Duration::ZERO);
        let headers = headers(&[("x-api-key", key.secret.as_str())]);
        let path = "/mosaic.coordinator.v1.Coordinator/GetJob";
        let call = || authenticator.authenticate(requirement_for(path), &headers, None);
        call().await.expect("the key is valid");
        let mut first = None;
        for _ in 0..100 {
            first = last_used().await;
            if first.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = first.expect("the first call's use was recorded");
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            call().await.expect("the key is valid");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            last_used().await,
            Some(first),
            "not written again within the minute"
        );
        // A minute later, the next call records its use again.
        let long_ago = first - TOUCH_INTERVAL_MS - 1;
        let id = store
            .find_api_key_by_hash(&hash)
            .await
            .expect("read the key")
            .expect("the key exists")
            .id;
        store
            .touch_api_key(&id, long_ago)
            .await
            .expect("set the time back");
        call().await.expect("the key is valid");
        let mut again = None;
        for _ in 0..100 {
            again = last_used().await;
            if again != Some(long_ago) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            again >= Some(first),
            "written again after the minute: {again:?}"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn keys_come_from_either_header() {
        assert_eq!(
            presented_api_key(&headers(&[("authorization", "Bearer abc")]), Scope::Admin).ok(),
            Some("abc")
        );
        assert_eq!(
            presented_api_key(&headers(&[("authorization", "bearer  abc ")]), Scope::Admin).ok(),
            Some("abc")
        );
        assert_eq!(
            presented_api_key(&headers(&[("x-api-key", "abc")]), Scope::Admin).ok(),
            Some("abc")
        );
    }

    #[test]
    fn malformed_or_missing_keys_are_unauthenticated() {
        for pairs in [
            vec![("authorization", "Basic abc")],
            vec![("authorization", "Bearer")],
            vec![("authorization", "Bearer a"), ("x-api-key", "b")],
            vec![],
        ] {
            let status = presented_api_key(&headers(&pairs), Scope::Agents).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{pairs:?}");
        }
    }

    #[test]
    fn the_method_table_fails_closed_for_our_services() {
        assert_eq!(
            requirement_for("/mosaic.federation.v1.Federation/GetInstance"),
            Some(Requirement::Public)
        );
        assert_eq!(
            requirement_for("/mosaic.federation.v1.Federation/SomethingNew"),
            Some(Requirement::ApiKey(Scope::Admin))
        );
        assert_eq!(
            requirement_for("/mosaic.federation.v1.Federation/ExecuteCommand"),
            Some(Requirement::PeerCertificate)
        );
        assert_eq!(
            requirement_for("/mosaic.coordinator.v1.Coordinator/HandleWebhook"),
            Some(Requirement::ApiKey(Scope::Webhook))
        );
        assert_eq!(
            requirement_for("/mosaic.coordinator.v1.Coordinator/Health"),
            Some(Requirement::Public)
        );
        assert_eq!(
            requirement_for("/mosaic.agent.v1.AgentControl/Spawn"),
            Some(Requirement::ApiKey(Scope::Agents))
        );
        assert_eq!(
            requirement_for("/grpc.health.v1.Health/Check"),
            Some(Requirement::Public)
        );
        assert_eq!(
            requirement_for("/mosaic.replica.v1.Replica/KillAgent"),
            Some(Requirement::PeerCertificate)
        );
        assert_eq!(requirement_for("/other.Service/Method"), None);
    }

    #[test]
    fn scopes_parse_and_print() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        assert!("root".parse::<Scope>().is_err());
    }
}
