//! The instance's self-signed X.509 certificate, made once for each instance key
//! and stored beside it, so every replica and every restart serves the same bytes.
//! Peers pin the key inside it, not a CA; ordinary clients (`grpcurl -cacert`,
//! grpcio `root_certificates`) can pin the certificate file.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::keys::InstanceKey;

/// How long a generated certificate is valid. Trust comes from the pinned key, so
/// the dates are hygiene only; the certificate is made again when the key
/// rotates or the instance's name or public URL changes.
const CERTIFICATE_LIFETIME: time::Duration = time::Duration::days(3650);
/// Back-dating that absorbs small clock differences between peers.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::hours(1);

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("could not create the instance certificate: {0}")]
pub struct CertificateError(String);

/// A certificate for the instance key, as DER and PEM.
#[derive(Clone, Debug)]
pub struct InstanceCertificate {
    /// The certificate DER.
    pub der: Vec<u8>,
    /// The same certificate as PEM text.
    pub pem: String,
}

impl InstanceCertificate {
    /// A certificate read back from its DER (as stored beside its key).
    pub fn from_der(der: Vec<u8>) -> InstanceCertificate {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(&der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        InstanceCertificate { der, pem }
    }
}

/// Whether `stored` certifies the same key under the same subject and
/// alternative names as `fresh`, so that it may still be served: two
/// certificates `self_signed` made for one key and profile differ only in
/// their dates, serial and signature. `false` when either does not parse.
pub fn same_key_and_names(stored: &[u8], fresh: &[u8]) -> bool {
    fn key_and_names(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
        let tbs = &certificate.tbs_certificate;
        let alternative_names = tbs
            .extensions()
            .iter()
            .find(|extension| {
                extension.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME
            })
            .map(|extension| extension.value.to_vec())
            .unwrap_or_default();
        Some((
            tbs.subject_pki.raw.to_vec(),
            tbs.subject.as_raw().to_vec(),
            alternative_names,
        ))
    }
    match (key_and_names(stored), key_and_names(fresh)) {
        (Some(stored), Some(fresh)) => stored == fresh,
        _ => false,
    }
}

/// Makes a self-signed certificate for `key`, naming `common_name` and carrying
/// `subject_alt_names` (host names or IP addresses), plus `localhost` and the
/// loopback addresses.
pub fn self_signed(
    key: &InstanceKey,
    common_name: &str,
    subject_alt_names: &[String],
) -> Result<InstanceCertificate, CertificateError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(key.pkcs8_der());
    let key_pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ECDSA_P256_SHA256)
        .map_err(|error| CertificateError(error.to_string()))?;

    let mut names: Vec<String> = subject_alt_names
        .iter()
        .map(|name| {
            name.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
        .filter(|name| !name.is_empty())
        .collect();
    for default_name in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|name| name == default_name) {
            names.push(default_name.to_owned());
        }
    }
    let mut params =
        CertificateParams::new(names).map_err(|error| CertificateError(error.to_string()))?;
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, common_name);
    distinguished_name.push(DnType::OrganizationName, "mosaic-mesh instance");
    params.distinguished_name = distinguished_name;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + CERTIFICATE_LIFETIME;

    let certificate = params
        .self_signed(&key_pair)
        .map_err(|error| CertificateError(error.to_string()))?;
    Ok(InstanceCertificate {
        der: certificate.der().to_vec(),
        pem: certificate.pem(),
    })
}

/// A PKCS#10 certificate signing request (PEM) for `key`, signed by it, with
/// `common_name` as subject and `names` (DNS names or IP addresses, at least
/// one) as subject alternative names. Names are the operator's: nothing is
/// added, since the CA decides what it certifies.
pub fn signing_request(
    key: &InstanceKey,
    common_name: &str,
    names: &[String],
) -> Result<String, CertificateError> {
    if names.is_empty() {
        return Err(CertificateError(
            "a certificate request needs at least one DNS name or IP address".into(),
        ));
    }
    let pkcs8 = PrivatePkcs8KeyDer::from(key.pkcs8_der());
    let key_pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ECDSA_P256_SHA256)
        .map_err(|error| CertificateError(error.to_string()))?;
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|error| CertificateError(format!("invalid name: {error}")))?;
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name = distinguished_name;
    let request = params
        .serialize_request(&key_pair)
        .map_err(|error| CertificateError(error.to_string()))?;
    request
        .pem()
        .map_err(|error| CertificateError(error.to_string()))
}

/// The SubjectPublicKeyInfo DER inside a certificate, or `None` if it does not parse.
pub fn spki_of_certificate(certificate_der: &[u8]) -> Option<Vec<u8>> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate_der).ok()?;
    Some(certificate.tbs_certificate.subject_pki.raw.to_vec())
}

/// Writes `pem` to `path` (its directory made if missing) through a
/// temporary file renamed over it, so a reader never sees half a
/// certificate: where local clients find the daemon's current certificate.
pub fn write_pem_file(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("pem.tmp");
    std::fs::write(&temporary, pem)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_instance_key_and_names() {
        let key = InstanceKey::generate().expect("generate");
        let certificate =
            self_signed(&key, "node-a", &["mesh.example.org".to_owned()]).expect("certificate");
        assert_eq!(
            spki_of_certificate(&certificate.der).expect("spki"),
            key.public_key().spki_der()
        );
        assert!(certificate.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&certificate.der).expect("parse");
        let names = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|name| format!("{name}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(names.contains("mesh.example.org"), "{names}");
        assert!(names.contains("localhost"), "{names}");
        assert!(names.contains("IPAddress(7f:00:00:01)"), "{names}");
    }

    #[test]
    fn a_stored_certificate_fits_while_key_and_names_stay() {
        let key = InstanceKey::generate().expect("generate");
        let names = ["mesh.example.org".to_owned()];
        let stored = self_signed(&key, "node-a", &names).expect("certificate");
        let again = self_signed(&key, "node-a", &names).expect("certificate");
        assert_ne!(stored.der, again.der, "dates, serial and signature differ");
        assert!(same_key_and_names(&stored.der, &again.der));
        let renamed = self_signed(&key, "node-b", &names).expect("certificate");
        assert!(!same_key_and_names(&stored.der, &renamed.der));
        let moved =
            self_signed(&key, "node-a", &["other.example.org".to_owned()]).expect("certificate");
        assert!(!same_key_and_names(&stored.der, &moved.der));
        let other_key = InstanceKey::generate().expect("generate");
        let rekeyed = self_signed(&other_key, "node-a", &names).expect("certificate");
        assert!(!same_key_and_names(&stored.der, &rekeyed.der));
        assert!(!same_key_and_names(b"not a certificate", &again.der));

        let read_back = InstanceCertificate::from_der(stored.der.clone());
        let parsed: Vec<u8> =
            rustls_pki_types::pem::PemObject::from_pem_slice(read_back.pem.as_bytes())
                .map(|der: rustls_pki_types::CertificateDer<'_>| der.as_ref().to_vec())
                .expect("pem");
        assert_eq!(parsed, stored.der);
        assert_eq!(
            read_back.pem.replace('\n', ""),
            stored.pem.replace(['\n', '\r'], "")
        );
    }

    #[test]
    fn a_signing_request_carries_the_key_and_names_and_verifies() {
        use x509_parser::prelude::FromDer;
        let key = InstanceKey::generate().expect("generate");
        let pem = signing_request(
            &key,
            "node-a",
            &["mesh.example.org".to_owned(), "10.0.0.7".to_owned()],
        )
        .expect("request");
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|der: rustls_pki_types::CertificateSigningRequestDer<'_>| der.as_ref().to_vec())
            .expect("pem");
        let (_, request) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                .expect("pkcs#10");
        let info = &request.certification_request_info;
        assert_eq!(info.subject_pki.raw, key.public_key().spki_der());
        // Signed by the instance key (ECDSA with SHA-256, DER signature).
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &key.public_key().spki_der()[26..],
        )
        .verify(info.raw, &request.signature_value.data)
        .expect("the request is signed by the instance key");
        let printed = format!(
            "{:?}",
            request
                .requested_extensions()
                .map(|e| e.collect::<Vec<_>>())
        );
        assert!(printed.contains("mesh.example.org"), "{printed}");

        assert!(signing_request(&key, "node-a", &[]).is_err());
        assert!(signing_request(&key, "node-a", &["bad name ü".to_owned()]).is_err());
    }
}
