//! CA mode: the operator's certificate chain and CA bundle, as an organisational
//! gate on top of the pinned keys.
//!
//! - The instance key stays the TLS key (it is also the signing key), so the
//!   operator supplies no private key: the leaf of `tls.cert_chain` must certify
//!   the instance key (`mosaicd identity csr` makes the request a CA signs).
//! - At start the chain is checked: within its dates, carrying the instance key,
//!   and leading to a CA of `tls.ca_bundle` for both server and client use. Any
//!   failure stops the start with an error naming the key.
//! - The server presents the chain and verifies any client certificate against
//!   the bundle; peer clients verify the server's chain and name against the
//!   bundle. Both then apply the pinned-key checks exactly as in pinned mode: the
//!   CA decides who may talk TLS with us, the pinned key still decides who a peer
//!   is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Deserialize;

use crate::config::error::ConfigError;
use crate::identity::keys::PublicKey;

/// The TLS mode.
pub const ENV_TLS_MODE: &str = "MOSAIC_TLS_MODE";
/// The operator's certificate chain (CA mode).
pub const ENV_TLS_CERT_CHAIN: &str = "MOSAIC_TLS_CERT_CHAIN";
/// The CA bundle peers must chain to (CA mode).
pub const ENV_TLS_CA_BUNDLE: &str = "MOSAIC_TLS_CA_BUNDLE";

/// How instances trust each other at TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// A self-signed certificate for the instance key; peers are trusted by
    /// their pinned key alone.
    #[default]
    Pinned,
    /// The operator's certificate chain for the instance key; peers must also
    /// present a chain to a CA of the bundle.
    Ca,
}

/// `[tls]` in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileConfig {
    /// `"pinned"` (default) or `"ca"`.
    pub mode: Option<TlsMode>,
    /// PEM file: the certificate for the instance key first, then any
    /// intermediates (CA mode; no private key: the instance key is used).
    pub cert_chain: Option<PathBuf>,
    /// PEM file: the CA certificates peers' chains must lead to (CA mode).
    pub ca_bundle: Option<PathBuf>,
}

/// The `[tls]` flags and variables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// TLS trust between instances: pinned keys only, or pinned keys plus an
    /// operator CA [default: pinned].
    #[arg(long = "tls-mode", env = ENV_TLS_MODE, global = true, value_enum, value_name = "MODE")]
    pub mode: Option<TlsMode>,
    /// CA mode: PEM certificate chain whose first certificate certifies the
    /// instance key (see `mosaicd identity csr`).
    #[arg(long = "tls-cert-chain", env = ENV_TLS_CERT_CHAIN, global = true, value_name = "FILE")]
    pub cert_chain: Option<PathBuf>,
    /// CA mode: PEM bundle of the CAs peers' certificates must chain to.
    #[arg(long = "tls-ca-bundle", env = ENV_TLS_CA_BUNDLE, global = true, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
}

/// The resolved `[tls]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsSettings {
    /// Pinned keys only (the default).
    #[default]
    Pinned,
    /// Pinned keys plus the operator's CA.
    Ca {
        /// The certificate chain file.
        cert_chain: PathBuf,
        /// The CA bundle file.
        ca_bundle: PathBuf,
    },
}

impl TlsSettings {
    /// Combines the file and the flags/environment (flags win) and checks that
    /// the mode and the files agree.
    pub fn resolve(
        file: TlsFileConfig,
        args: &TlsArgs,
        plaintext: bool,
    ) -> Result<Self, ConfigError> {
        let mode = args.mode.or(file.mode).unwrap_or_default();
        let cert_chain = args.cert_chain.clone().or(file.cert_chain);
        let ca_bundle = args.ca_bundle.clone().or(file.ca_bundle);
        match mode {
            TlsMode::Pinned => {
                if cert_chain.is_some() || ca_bundle.is_some() {
                    return Err(invalid(
                        "tls.mode",
                        "tls.cert_chain or tls.ca_bundle is set but tls.mode is \"pinned\"; set tls.mode = \"ca\" (--tls-mode ca) or remove them".into(),
                    ));
                }
                Ok(Self::Pinned)
            }
            TlsMode::Ca => {
                if plaintext {
                    return Err(invalid(
                        "tls.mode",
                        "CA mode needs TLS; remove --plaintext or set tls.mode = \"pinned\"".into(),
                    ));
                }
                let cert_chain = cert_chain.ok_or_else(|| {
                    invalid(
                        "tls.cert_chain",
                        "required when tls.mode is \"ca\" (--tls-cert-chain / MOSAIC_TLS_CERT_CHAIN)"
                            .into(),
                    )
                })?;
                let ca_bundle = ca_bundle.ok_or_else(|| {
                    invalid(
                        "tls.ca_bundle",
                        "required when tls.mode is \"ca\" (--tls-ca-bundle / MOSAIC_TLS_CA_BUNDLE)"
                            .into(),
                    )
                })?;
                Ok(Self::Ca {
                    cert_chain,
                    ca_bundle,
                })
            }
        }
    }
}

/// The loaded CA-mode material: the chain this instance presents and the
/// verifiers built over the bundle.
pub struct CaTrust {
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    roots: Arc<RootCertStore>,
    server_verifier: Arc<WebPkiServerVerifier>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for CaTrust {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CaTrust")
            .field("chain_certificates", &self.chain.len())
            .field("ca_certificates", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl CaTrust {
    /// Reads the chain and the bundle. Errors name `tls.cert_chain` or
    /// `tls.ca_bundle`; nothing from the files is echoed.
    pub fn load(cert_chain: &Path, ca_bundle: &Path) -> Result<Self, ConfigError> {
        let chain_bytes = read("tls.cert_chain", cert_chain)?;
        if PrivateKeyDer::from_pem_slice(&chain_bytes).is_ok() {
            return Err(invalid(
                "tls.cert_chain",
                format!(
                    "{} holds a private key; it must hold certificates only (the TLS key is the instance key)",
                    cert_chain.display()
                ),
            ));
        }
        let chain = certificates("tls.cert_chain", cert_chain, &chain_bytes)?;
        let chain_pem = chain
            .iter()
            .map(|certificate| pem_of(certificate.as_ref()))
            .collect::<String>();

        let bundle_bytes = read("tls.ca_bundle", ca_bundle)?;
        let mut roots = RootCertStore::empty();
        for certificate in certificates("tls.ca_bundle", ca_bundle, &bundle_bytes)? {
            roots.add(certificate).map_err(|error| {
                invalid(
                    "tls.ca_bundle",
                    format!(
                        "{} holds a certificate that cannot be a trust anchor: {error}",
                        ca_bundle.display()
                    ),
                )
            })?;
        }
        let roots = Arc::new(roots);
        let provider = super::provider::crypto_provider();
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|error| invalid("tls.ca_bundle", error.to_string()))?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|error| invalid("tls.ca_bundle", error.to_string()))?;
        Ok(Self {
            chain,
            chain_pem,
            roots,
            server_verifier,
            client_verifier,
        })
    }

    /// Checks, at `now`, that the chain's first certificate is within its dates
    /// and certifies `instance_key`, and that the chain leads to a CA of the
    /// bundle for server and for client use.
    pub fn check(&self, instance_key: &PublicKey, now: UnixTime) -> Result<(), ConfigError> {
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| invalid("tls.cert_chain", "holds no certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|_| {
            invalid(
                "tls.cert_chain",
                "the first certificate is not valid X.509".into(),
            )
        })?;
        let now_seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = parsed.validity();
        if now_seconds < validity.not_before.timestamp() {
            return Err(invalid(
                "tls.cert_chain",
                format!(
                    "the certificate is not valid before {}",
                    validity.not_before
                ),
            ));
        }
        if now_seconds > validity.not_after.timestamp() {
            return Err(invalid(
                "tls.cert_chain",
                format!("the certificate expired on {}", validity.not_after),
            ));
        }
        let certified = parsed.tbs_certificate.subject_pki.raw;
        if certified != instance_key.spki_der() {
            let which = PublicKey::from_spki_der(certified).map_or_else(
                |_| "a key that is not ECDSA P-256".to_owned(),
                |key| format!("key {}", key.fingerprint()),
            );
            return Err(invalid(
                "tls.cert_chain",
                format!(
                    "the certificate certifies {which}, not this instance's key {}; have the CA sign the request from `mosaicd identity csr`",
                    instance_key.fingerprint()
                ),
            ));
        }
        let provider = super::provider::crypto_provider();
        let parsed_leaf = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|error| invalid("tls.cert_chain", error.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed_leaf,
            &self.roots,
            intermediates,
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|error| {
            invalid(
                "tls.ca_bundle",
                format!(
                    "tls.cert_chain does not lead to a CA of the bundle for server use: {error}"
                ),
            )
        })?;
        self.client_verifier
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|error| {
                invalid(
                    "tls.cert_chain",
                    format!(
                        "the certificate cannot authenticate a client (peers dial with it; its extended key usage must include clientAuth or be absent): {error}"
                    ),
                )
            })?;
        Ok(())
    }

    /// True when the chain's first certificate names `host` (a DNS name or an
    /// IP address), as a client verifying it by name would require.
    pub fn names_host(&self, host: &str) -> bool {
        let Some(leaf) = self.chain.first() else {
            return false;
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(host.to_owned()) else {
            return false;
        };
        rustls::server::ParsedCertificate::try_from(leaf)
            .and_then(|parsed| rustls::client::verify_server_name(&parsed, &name))
            .is_ok()
    }

    /// The chain this instance presents, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The same chain as PEM.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Verifies a server's chain and name against the bundle.
    pub(crate) fn server_verifier(&self) -> Arc<dyn ServerCertVerifier> {
        Arc::clone(&self.server_verifier) as Arc<dyn ServerCertVerifier>
    }

    /// Verifies a client's chain against the bundle; clients without a
    /// certificate are let through (API-key clients need none).
    pub(crate) fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.client_verifier)
    }
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|error| invalid(key, format!("cannot read {}: {error}", path.display())))
}

fn certificates(
    key: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(key, format!("{} is not valid PEM", path.display())))?;
    if certificates.is_empty() {
        return Err(invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certificates)
}

/// PEM text of one certificate.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
