//! TLS to PostgreSQL as libpq's URL parameters ask for it: `sslmode` and
//! `sslrootcert` (a PEM file of the CAs to trust). tokio-postgres reads only
//! the modes `disable`, `prefer` and `require` and no root file, so they are
//! split off the URL here, and tokio-postgres gets a rustls connector
//! (`tokio-postgres-rustls`, ring only) that checks what the mode says:
//!
//! - no `sslmode`: no TLS, as before. (libpq would try TLS first; a daemon
//!   that started doing so would change under operators who never asked.)
//! - `disable`: no TLS.
//! - `prefer`: TLS when the server offers it, its certificate unchecked.
//! - `require`: TLS, its certificate unchecked, unless `sslrootcert` is
//!   given (then as `verify-ca`), as libpq does.
//! - `verify-ca`: TLS, the server's chain checked against `sslrootcert`.
//! - `verify-full`: that, and the certificate names the host dialled.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// What `sslmode` asks for (`None` in [`Tls`]: no TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A URL tokio-postgres can parse, and the TLS its connection needs.
#[derive(Clone)]
pub(super) struct Tls {
    /// The URL without `sslrootcert`, `verify-*` modes written as `require`.
    pub(super) url: String,
    /// The rustls configuration; `None`: connect without TLS.
    pub(super) config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Tls")
            .field("tls", &self.config.is_some())
            .finish()
    }
}

/// Reads the TLS parameters of a `postgres://` URL and loads `sslrootcert`.
/// The error names the parameter, never the URL (it may hold a password).
pub(super) fn prepare(url: &str) -> Result<Tls, String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => {
            return Ok(Tls {
                url: url.to_owned(),
                config: None,
            });
        }
    };
    let mut mode = None;
    let mut root_file = None;
    let mut kept = Vec::new();
    for parameter in query.split('&').filter(|parameter| !parameter.is_empty()) {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        match name {
            "sslmode" => {
                mode = match value {
                    "disable" => None,
                    "prefer" => Some(Mode::Prefer),
                    "require" => Some(Mode::Require),
                    "verify-ca" => Some(Mode::VerifyCa),
                    "verify-full" => Some(Mode::VerifyFull),
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                };
                let written = match mode {
                    None => "disable",
                    Some(Mode::Prefer) => "prefer",
                    Some(_) => "require",
                };
                kept.push(format!("sslmode={written}"));
            }
            "sslrootcert" => root_file = Some(percent_decode(value)?),
            _ => kept.push(parameter.to_owned()),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let Some(mode) = mode else {
        return Ok(Tls { url, config: None });
    };
    let mode = match (mode, &root_file) {
        (Mode::Require, Some(_)) => Mode::VerifyCa,
        (Mode::VerifyCa | Mode::VerifyFull, None) => {
            return Err(
                "sslmode=verify-ca and verify-full need sslrootcert=PATH, a PEM file of the CA certificates to trust (your provider publishes it)"
                    .to_owned(),
            );
        }
        (mode, _) => mode,
    };
    let provider = crate::tls::crypto_provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, root_file) {
        (Mode::VerifyCa | Mode::VerifyFull, Some(path)) => {
            let roots = Arc::new(roots_from(&path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|error| format!("sslrootcert={path}: {error}"))?;
            if mode == Mode::VerifyCa {
                Arc::new(AnyName { inner: webpki })
            } else {
                webpki
            }
        }
        _ => Arc::new(Unchecked {
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Tls {
        url,
        config: Some(Arc::new(config)),
    })
}

/// The CA certificates in the PEM file at `path`.
fn roots_from(path: &str) -> Result<RootCertStore, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("sslrootcert={path}: {error}"))?;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&bytes) {
        let certificate =
            certificate.map_err(|_| format!("sslrootcert={path} is not valid PEM"))?;
        roots
            .add(certificate)
            .map_err(|error| format!("sslrootcert={path}: {error}"))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert={path} holds no PEM certificate"));
    }
    Ok(roots)
}

/// `%XX` sequences of a URL query value decoded.
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = value
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| "sslrootcert holds a malformed %-escape".to_owned())?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "sslrootcert is not UTF-8".to_owned())
}

/// `verify-ca`: the chain must verify; the name need not match.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError;
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root file: encrypted, the server's
/// certificate taken as it is (the handshake's signatures still checked).
#[derive(Debug)]
struct Unchecked {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_sslmode_the_url_is_unchanged_and_plain() {
        for url in [
            "postgres://u:p@h/db",
            "postgres://u:p@h/db?application_name=x",
            "postgres://h/db?sslmode=disable",
        ] {
            let tls = prepare(url).expect("prepare");
            assert!(tls.config.is_none(), "{url}");
        }
        assert_eq!(
            prepare("postgres://h/db?application_name=x")
                .expect("prepare")
                .url,
            "postgres://h/db?application_name=x"
        );
    }

    #[test]
    fn verify_modes_become_require_for_the_driver_and_need_a_root_file() {
        let tls = prepare("postgres://h/db?sslmode=require&application_name=x").expect("prepare");
        assert!(tls.config.is_some());
        assert_eq!(
            tls.url,
            "postgres://h/db?sslmode=require&application_name=x"
        );
        for mode in ["verify-ca", "verify-full"] {
            let error = prepare(&format!("postgres://u:secret@h/db?sslmode={mode}"))
                .expect_err("no root file");
            assert!(error.contains("sslrootcert"), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
        let error = prepare("postgres://h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem")
            .expect_err("no such file");
        assert!(error.contains("/no/such.pem"), "{error}");
        let error = prepare("postgres://h/db?sslmode=always").expect_err("bad mode");
        assert!(error.contains("sslmode=always"), "{error}");
    }
}

#[cfg(test)]
mod database_tests {
    use diesel::QueryableByName;
    use diesel::sql_types::Bool;
    use diesel_async::RunQueryDsl as _;

    use crate::store::testing::TestDatabase;

    /// The certificate the machine's PostgreSQL serves (Debian's snake-oil
    /// certificate for `localhost`, self-signed).
    const SERVER_CERTIFICATE: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

    #[derive(QueryableByName)]
    struct Encrypted {
        #[diesel(sql_type = Bool)]
        ssl: bool,
    }

    /// Whether a connection opened with `url` is encrypted, or why it
    /// could not be opened.
    async fn encrypted(url: &str) -> Result<bool, String> {
        let mut connection =
            crate::store::pools::open_postgres(url, std::time::Duration::from_secs(5))
                .await
                .map_err(|error| error.to_string())?;
        let row: Encrypted =
            diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .get_result(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
        Ok(row.ssl)
    }

    fn with(url: &str, host: &str, parameters: &str) -> String {
        let url = url.replacen("127.0.0.1", host, 1);
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{parameters}")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn each_sslmode_encrypts_and_checks_as_libpq_does() {
        assert!(
            std::path::Path::new(SERVER_CERTIFICATE).exists(),
            "{SERVER_CERTIFICATE}: the test PostgreSQL's certificate"
        );
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let url = database.url.clone();
        assert!(url.contains("127.0.0.1"), "{url}");
        assert_eq!(encrypted(&url).await, Ok(false), "no sslmode: plain");
        for (host, parameters) in [
            ("127.0.0.1", "sslmode=prefer".to_owned()),
            ("127.0.0.1", "sslmode=require".to_owned()),
            (
                "127.0.0.1",
                format!("sslmode=verify-ca&sslrootcert={SERVER_CERTIFICATE}"),
            ),
            (
                "localhost",
                format!("sslmode=verify-full&sslrootcert={SERVER_CERTIFICATE}"),
            ),
        ] {
            assert_eq!(
                encrypted(&with(&url, host, &parameters)).await,
                Ok(true),
                "{host} {parameters}"
            );
        }
        // The certificate names localhost, not the address.
        let error = encrypted(&with(
            &url,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={SERVER_CERTIFICATE}"),
        ))
        .await
        .expect_err("the name does not match");
        assert!(error.contains("not valid for name"), "{error}");
        // A CA that did not sign the server's certificate.
        let dir = tempfile::tempdir().expect("temporary directory");
        let other_ca = dir.path().join("other-ca.pem");
        let mut params = rcgen::CertificateParams::new(vec!["other".to_owned()]).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = params.self_signed(&key).expect("certificate");
        std::fs::write(&other_ca, certificate.pem()).expect("write the CA");
        for mode in ["verify-ca", "verify-full", "require"] {
            let error = encrypted(&with(
                &url,
                "localhost",
                &format!("sslmode={mode}&sslrootcert={}", other_ca.display()),
            ))
            .await
            .expect_err("an unknown issuer");
            assert!(error.contains("UnknownIssuer"), "{mode}: {error}");
        }
        database.cleanup().await.expect("drop the test database");
    }
}
