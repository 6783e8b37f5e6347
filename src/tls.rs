//! rustls configuration for both ends of a connection.
//!
//! - The server presents the current instance certificate (re-read at every
//!   handshake, so a key rotation takes effect without a restart), asks every
//!   client for a certificate and accepts connections without one: API-key clients
//!   need none, and the Federation wire methods refuse calls that lack one.
//! - Clients pin the server's public key (or its fingerprint) instead of trusting a
//!   CA: the mesh has no CA, a peer *is* its key.
//! - In CA mode ([`ca`]) both ends also verify the other's chain against the
//!   operator's CA bundle, before and in addition to the pinned-key checks.
//!
//! A certificate's validity dates are checked here because custom verifiers skip
//! webpki's path validation, which is where dates are normally checked.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use crate::identity::{IdentityManager, PublicKey, fingerprint};

pub mod ca;
mod provider;

pub use provider::{crypto_provider, install_default_provider};

/// The ALPN protocol gRPC needs; without it clients fail with "HTTP/2 was not
/// negotiated".
const ALPN_HTTP2: &[u8] = b"h2";

/// Why a TLS configuration could not be built or a connection made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The URL is not something we can dial.
    #[error("invalid server url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The channel could not be created.
    #[error("could not connect to {url}: {source}")]
    Connect {
        /// The URL dialed.
        url: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The server-side rustls configuration for the identity held by `identity`.
/// In CA mode a client certificate must also chain to the CA bundle.
pub fn server_config(identity: Arc<IdentityManager>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(OptionalClientCertificate {
        ca: identity.ca_trust().map(|trust| trust.client_verifier()),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentInstanceCertificate { identity }));
    config.alpn_protocols = vec![ALPN_HTTP2.to_vec()];
    Ok(config)
}

/// Serves whatever certificate the identity currently has.
struct CurrentInstanceCertificate {
    identity: Arc<IdentityManager>,
}

impl std::fmt::Debug for CurrentInstanceCertificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("CurrentInstanceCertificate")
    }
}

impl ResolvesServerCert for CurrentInstanceCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current().certified_key())
    }
}

/// Asks for a client certificate, accepts its absence, and when one is presented
/// checks that it parses, carries a P-256 key and is within its validity dates
/// (and, in CA mode, that it chains to the CA bundle). Whether that key belongs
/// to a known peer is decided per call, not here.
#[derive(Debug)]
struct OptionalClientCertificate {
    ca: Option<Arc<dyn ClientCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OptionalClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.as_ref().map_or(&[], |ca| ca.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(ca) = &self.ca {
            ca.verify_client_cert(end_entity, intermediates, now)?;
        }
        public_key_of_valid_certificate(end_entity, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Parses a certificate, checks its dates, and returns its P-256 public key.
pub fn public_key_of_valid_certificate(
    certificate: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<PublicKey, rustls::Error> {
    use rustls::CertificateError;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now_seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = parsed.validity();
    if now_seconds < validity.not_before.timestamp() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now_seconds > validity.not_after.timestamp() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    PublicKey::from_spki_der(parsed.tbs_certificate.subject_pki.raw).map_err(|_| {
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    })
}

/// The public key of the first certificate of a TLS peer (as tonic reports them),
/// if it parses.
pub fn peer_public_key(certificates: &[CertificateDer<'_>]) -> Option<PublicKey> {
    let leaf = certificates.first()?;
    public_key_of_valid_certificate(leaf, UnixTime::now()).ok()
}

/// What a client trusts about the server it dials.
#[derive(Clone, Debug)]
pub enum ServerPin {
    /// Exactly this public key.
    PublicKey(PublicKey),
    /// Any key with this fingerprint (as typed by an operator).
    Fingerprint(String),
    /// Any of these keys (a peer's current key and its previous keys still in
    /// their grace period).
    AnyOf(Vec<PublicKey>),
}

impl ServerPin {
    fn accepts(&self, key: &PublicKey) -> bool {
        match self {
            Self::PublicKey(expected) => expected == key,
            Self::Fingerprint(typed) => fingerprint::matches(typed, key.spki_der()),
            Self::AnyOf(keys) => keys.contains(key),
        }
    }
}

/// Accepts the server only if its certificate carries the pinned key (and, in
/// CA mode, if its chain and name verify against the CA bundle first).
#[derive(Debug)]
struct PinnedServerKey {
    pin: ServerPin,
    ca: Option<Arc<dyn ServerCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(ca) = &self.ca {
            ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        let key = public_key_of_valid_certificate(end_entity, now)?;
        if !self.pin.accepts(&key) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that pins the server and presents no certificate.
pub fn pinned_client_config(pin: ServerPin) -> Result<rustls::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedServerKey {
        pin,
        ca: None,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP2.to_vec()];
    Ok(config)
}

/// A client configuration that pins the server and presents the instance's
/// current certificate (mutual TLS between peers). The certificate is read from
/// `identity` at every handshake, so a rotation applies to new connections. In
/// CA mode the server's chain and name must also verify against the CA bundle.
pub fn mutual_client_config(
    pin: ServerPin,
    identity: Arc<IdentityManager>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedServerKey {
        pin,
        ca: identity.ca_trust().map(|trust| trust.server_verifier()),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentClientCertificate { identity }));
    config.alpn_protocols = vec![ALPN_HTTP2.to_vec()];
    Ok(config)
}

/// Presents whatever certificate the identity currently has.
struct CurrentClientCertificate {
    identity: Arc<IdentityManager>,
}

impl std::fmt::Debug for CurrentClientCertificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("CurrentClientCertificate")
    }
}

impl rustls::client::ResolvesClientCert for CurrentClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The key a server presented, recorded by [`capturing_client_config`].
pub type CapturedServerKey = Arc<std::sync::Mutex<Option<PublicKey>>>;

/// A client configuration for a first contact (trust on first use): it accepts
/// any server certificate that is within its dates and carries a P-256 key, and
/// records that key so the caller can compare it with the key the server claims
/// (`GetInstance`) before trusting anything. Presents no certificate. With `ca`
/// (CA mode) the server's chain and name must verify against the CA bundle
/// before its key is even recorded.
pub fn capturing_client_config(
    ca: Option<&ca::CaTrust>,
) -> Result<(rustls::ClientConfig, CapturedServerKey), TlsError> {
    let provider = crypto_provider();
    let captured: CapturedServerKey = Arc::default();
    let verifier = Arc::new(CapturingServerKey {
        captured: Arc::clone(&captured),
        ca: ca.map(ca::CaTrust::server_verifier),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP2.to_vec()];
    Ok((config, captured))
}

/// See [`capturing_client_config`].
#[derive(Debug)]
struct CapturingServerKey {
    captured: CapturedServerKey,
    ca: Option<Arc<dyn ServerCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CapturingServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(ca) = &self.ca {
            ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        let key = public_key_of_valid_certificate(end_entity, now)?;
        *self
            .captured
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(key);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Timeouts for an outbound channel.
#[derive(Clone, Copy, Debug)]
pub struct ChannelTimeouts {
    /// TCP connect plus TLS handshake.
    pub connect: Duration,
    /// Every call's deadline, unless the call sets a shorter one.
    pub request: Duration,
}

impl Default for ChannelTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

/// Opens a gRPC channel to `url`. `https://` URLs go through `tls` (pinning the
/// server); `http://` URLs are plaintext and only for local development.
pub async fn connect_channel(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeouts: ChannelTimeouts,
) -> Result<tonic::transport::Channel, TlsError> {
    let invalid = |reason| TlsError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("missing host and port"))?
        .clone();
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(invalid(
                "the scheme must be https:// (or http:// with --plaintext)",
            ));
        }
    };
    // tonic would try its own TLS for an https URI; ours happens in the connector,
    // so the endpoint itself is addressed as http.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| invalid("not a URL"))?
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        .tcp_nodelay(true);
    let connect_error = |source| TlsError::Connect {
        url: url.to_owned(),
        source,
    };
    if !secure {
        return endpoint.connect().await.map_err(connect_error);
    }
    let tls = tls.ok_or_else(|| invalid("https needs a pinned server key"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(443);
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = Arc::clone(&tls);
        let host = host.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let server_name = ServerName::try_from(host)
                .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(connect_error)
}
