//! Outbound calls to peers: one mutual-TLS channel per peer (URL and pinned keys),
//! reused across calls; a connect timeout, a deadline on every call and message
//! size limits; and the dial policy applied to every address a URL resolves to,
//! at connect time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::Channel;

use super::dial::DialPolicy;
use crate::identity::{IdentityManager, PublicKey};
use crate::proto::federation as pb;
use crate::proto::federation::federation_client::FederationClient;
use crate::tls::ServerPin;

/// Channels kept at most; past this the cache is emptied (channels to peers
/// still in use are simply made again).
const MAX_CACHED_CHANNELS: usize = 256;

/// Why a peer could not be called.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The URL is not an `https://HOST:PORT` URL.
    #[error("invalid peer url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Every address the URL resolves to is refused by the dial policy.
    #[error("{0}")]
    Denied(String),
    /// The peer could not be reached (DNS, TCP, TLS or timeout).
    #[error("{0}")]
    Unreachable(String),
}

/// Host and port of a peer URL; only `https://` is accepted, since peers talk
/// mutual TLS.
pub fn parse_peer_url(url: &str) -> Result<(String, u16), PeerError> {
    let invalid = |reason| PeerError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    if url.len() > 2048 {
        return Err(invalid("longer than 2048 characters"));
    }
    let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid("peers are dialed over https:// only"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("missing host and port"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("user info is not allowed"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("a peer URL has no path or query"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    Ok((host, authority.port_u16().unwrap_or(443)))
}

/// The addresses of `host:port` that `policy` permits, or why there are none.
pub async fn resolve_permitted(
    host: &str,
    port: u16,
    policy: &DialPolicy,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, PeerError> {
    let resolved: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addresses)) => addresses.collect(),
            Ok(Err(error)) => {
                return Err(PeerError::Unreachable(format!(
                    "cannot resolve {host}: {error}"
                )));
            }
            Err(_) => {
                return Err(PeerError::Unreachable(format!(
                    "resolving {host} timed out"
                )));
            }
        };
    let permitted: Vec<SocketAddr> = resolved
        .iter()
        .copied()
        .filter(|address| policy.permits(address.ip()))
        .collect();
    if permitted.is_empty() {
        return Err(PeerError::Denied(format!(
            "{host} resolves only to addresses the dial policy denies (federation.dial_allow / dial_deny)"
        )));
    }
    Ok(permitted)
}

/// Settings for outbound calls.
#[derive(Clone, Debug)]
pub struct PeerClientSettings {
    /// Allowed and denied address ranges.
    pub policy: DialPolicy,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Deadline of every call.
    pub call_timeout: Duration,
    /// Largest message sent or received.
    pub max_message_bytes: usize,
}

/// The cache of channels to peers.
pub struct PeerClients {
    identity: Arc<IdentityManager>,
    settings: PeerClientSettings,
    channels: Mutex<HashMap<String, Channel>>,
}

impl PeerClients {
    /// Clients that present `identity`'s current certificate.
    pub fn new(identity: Arc<IdentityManager>, settings: PeerClientSettings) -> Self {
        Self {
            identity,
            settings,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The call deadline.
    pub fn call_timeout(&self) -> Duration {
        self.settings.call_timeout
    }

    /// The largest message sent or received.
    pub fn max_message_bytes(&self) -> usize {
        self.settings.max_message_bytes
    }

    /// The dial policy.
    pub fn policy(&self) -> &DialPolicy {
        &self.settings.policy
    }

    /// A request carrying the call deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.settings.call_timeout);
        request
    }

    fn client(&self, channel: Channel) -> FederationClient<Channel> {
        FederationClient::new(channel)
            .max_decoding_message_size(self.settings.max_message_bytes)
            .max_encoding_message_size(self.settings.max_message_bytes)
    }

    /// First contact with a peer whose key is not known yet: fetches its identity
    /// over TLS without presenting a certificate, and returns it with the key of
    /// the certificate the server presented, for the caller to compare.
    pub async fn first_contact(
        &self,
        url: &str,
    ) -> Result<(pb::Instance, PublicKey), FirstContactError> {
        let (config, captured) = crate::tls::capturing_client_config(self.identity.ca_trust())
            .map_err(|error| FirstContactError::Peer(PeerError::Unreachable(error.to_string())))?;
        let channel = self
            .connect(url, Arc::new(config))
            .await
            .map_err(FirstContactError::Peer)?;
        let response = self
            .client(channel)
            .get_instance(self.request(pb::GetInstanceRequest {}))
            .await
            .map_err(FirstContactError::Status)?;
        let instance = response
            .into_inner()
            .instance
            .ok_or(FirstContactError::NoInstance)?;
        let tls_key = captured
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
            .ok_or(FirstContactError::NoInstance)?;
        Ok((instance, tls_key))
    }

    /// A client for a peer whose server certificate must carry one of `pins`,
    /// presenting this instance's certificate. The channel is cached per URL and
    /// pin set, and reused.
    pub async fn pinned(
        &self,
        url: &str,
        pins: &[PublicKey],
    ) -> Result<FederationClient<Channel>, PeerError> {
        let mut key_ids: Vec<String> = pins.iter().map(PublicKey::key_id).collect();
        key_ids.sort();
        let cache_key = format!("{url}|{}", key_ids.join(","));
        let cached = self
            .channels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(&cache_key)
            .cloned();
        if let Some(channel) = cached {
            return Ok(self.client(channel));
        }
        let config = crate::tls::mutual_client_config(
            ServerPin::AnyOf(pins.to_vec()),
            Arc::clone(&self.identity),
        )
        .map_err(|error| PeerError::Unreachable(error.to_string()))?;
        let channel = self.connect(url, Arc::new(config)).await?;
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if channels.len() >= MAX_CACHED_CHANNELS {
            channels.clear();
        }
        channels.insert(cache_key, channel.clone());
        Ok(self.client(channel))
    }

    /// Drops every cached channel: after a key rotation, new connections must
    /// present the new certificate.
    pub fn forget_all(&self) {
        self.channels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clear();
    }

    async fn connect(
        &self,
        url: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Channel, PeerError> {
        let (host, port) = parse_peer_url(url)?;
        // Fail early, with a clear reason, when the policy refuses every address;
        // the connector checks again at connect time.
        resolve_permitted(
            &host,
            port,
            &self.settings.policy,
            self.settings.connect_timeout,
        )
        .await?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|_| PeerError::InvalidUrl {
                url: url.to_owned(),
                reason: "not a URL",
            })?
            .connect_timeout(self.settings.connect_timeout)
            .timeout(self.settings.call_timeout)
            // A watch streams batches of up to 512 KiB from the peer: HTTP/2's
            // fixed 64 KiB window would hold each one back for round trips of
            // window updates, so the window follows the measured
            // bandwidth-delay product instead.
            .http2_adaptive_window(true)
            .tcp_nodelay(true);
        let policy = self.settings.policy.clone();
        let connect_timeout = self.settings.connect_timeout;
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = Arc::clone(&tls);
            let host = host.clone();
            let policy = policy.clone();
            async move {
                let addresses = resolve_permitted(&host, port, &policy, connect_timeout)
                    .await
                    .map_err(|error| std::io::Error::other(error.to_string()))?;
                let mut last_error = None;
                for address in addresses {
                    match TcpStream::connect(address).await {
                        Ok(tcp) => {
                            tcp.set_nodelay(true)?;
                            let server_name =
                                ServerName::try_from(host.clone()).map_err(|error| {
                                    std::io::Error::new(std::io::ErrorKind::InvalidInput, error)
                                })?;
                            let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
                                .connect(server_name, tcp)
                                .await?;
                            return Ok::<_, std::io::Error>(TokioIo::new(stream));
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                Err(last_error.unwrap_or_else(|| std::io::Error::other("no address to dial")))
            }
        });
        let connecting = endpoint.connect_with_connector(connector);
        match tokio::time::timeout(self.settings.connect_timeout, connecting).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(error)) => Err(PeerError::Unreachable(format!(
                "cannot connect to {url}: {}",
                crate::text::error_chain(&error)
            ))),
            Err(_) => Err(PeerError::Unreachable(format!(
                "connecting to {url} timed out"
            ))),
        }
    }
}

/// Why the first contact with a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FirstContactError {
    /// It could not be dialed.
    #[error(transparent)]
    Peer(PeerError),
    /// GetInstance failed.
    #[error("the peer refused GetInstance: {0}")]
    Status(tonic::Status),
    /// The answer had no identity.
    #[error("the peer returned no identity")]
    NoInstance,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_must_be_plain_https_host_and_port() {
        assert_eq!(
            parse_peer_url("https://b.example:7443").expect("url"),
            ("b.example".to_owned(), 7443)
        );
        // No port: 443, as the protos say.
        assert_eq!(
            parse_peer_url("https://b.example").expect("url"),
            ("b.example".to_owned(), 443)
        );
        assert_eq!(
            parse_peer_url("https://[::1]:9000/").expect("url"),
            ("::1".to_owned(), 9000)
        );
        for bad in [
            "http://b:7443",
            "b:7443",
            "https://user@b:7443",
            "https://b:7443/path",
            "https://b:7443/?q=1",
            "not a url",
        ] {
            assert!(parse_peer_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn denied_addresses_are_refused_before_dialing() {
        let outcome = resolve_permitted(
            "169.254.169.254",
            80,
            &DialPolicy::default(),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(outcome, Err(PeerError::Denied(_))), "{outcome:?}");
        let allowed = resolve_permitted(
            "127.0.0.1",
            80,
            &DialPolicy::default(),
            Duration::from_secs(1),
        )
        .await
        .expect("loopback is allowed");
        assert_eq!(allowed.len(), 1);
    }
}
