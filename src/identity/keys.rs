//! The instance key: an ECDSA P-256 keypair from `ring`, its public form
//! (SubjectPublicKeyInfo DER), its key id, and signing and verification.
//!
//! Private key bytes (PKCS#8) live only inside [`InstanceKey`], are zeroised on drop,
//! and are never formatted: `Debug` prints the key id alone.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use zeroize::Zeroizing;

/// The DER prefix of a SubjectPublicKeyInfo for an uncompressed P-256 point:
/// `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }`.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Length of an uncompressed P-256 point (`0x04 || x || y`).
const P256_POINT_LEN: usize = 65;
/// The DER prefix of a SubjectPublicKeyInfo for a compressed P-256 point
/// (`0x02` or `0x03 || x`): recognised only to say why it is refused.
const P256_COMPRESSED_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
];
/// Length of a compressed P-256 point.
const P256_COMPRESSED_POINT_LEN: usize = 33;
/// Length of a fixed-size P-256 signature (`r || s`).
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or signature was refused. Messages never contain key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The public key is not a P-256 SubjectPublicKeyInfo.
    #[error("public key is not an ECDSA P-256 SubjectPublicKeyInfo")]
    UnsupportedPublicKey,
    /// The public key is a P-256 SubjectPublicKeyInfo with a compressed point.
    /// Refused rather than decompressed: keys are compared, and key ids and
    /// fingerprints computed, over the exact SPKI bytes, so one key must have
    /// one encoding; and the TLS certificate, which carries the same key, is
    /// verified by ring, which takes uncompressed points only.
    #[error(
        "public key is a compressed P-256 point: compressed points are not accepted; \
         send the uncompressed form (04 || X || Y)"
    )]
    CompressedPoint,
    /// The stored private key could not be parsed.
    #[error("private key is not a valid ECDSA P-256 PKCS#8 document")]
    InvalidPrivateKey,
    /// Key generation or signing failed inside ring.
    #[error("the cryptographic library refused the operation")]
    Crypto,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// A P-256 public key, kept as its SubjectPublicKeyInfo DER.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    spki_der: Vec<u8>,
}

impl PublicKey {
    /// Parses SubjectPublicKeyInfo DER; only uncompressed P-256 keys are accepted
    /// (a compressed point is refused with its own reason).
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self, KeyError> {
        let compressed = spki_der.len()
            == P256_COMPRESSED_SPKI_PREFIX.len() + P256_COMPRESSED_POINT_LEN
            && spki_der.starts_with(&P256_COMPRESSED_SPKI_PREFIX)
            && matches!(spki_der[P256_COMPRESSED_SPKI_PREFIX.len()], 0x02 | 0x03);
        if compressed {
            return Err(KeyError::CompressedPoint);
        }
        let valid = spki_der.len() == P256_SPKI_PREFIX.len() + P256_POINT_LEN
            && spki_der.starts_with(&P256_SPKI_PREFIX)
            && spki_der[P256_SPKI_PREFIX.len()] == 0x04;
        if !valid {
            return Err(KeyError::UnsupportedPublicKey);
        }
        Ok(Self {
            spki_der: spki_der.to_vec(),
        })
    }

    fn from_point(point: &[u8]) -> Self {
        let mut spki_der = Vec::with_capacity(P256_SPKI_PREFIX.len() + point.len());
        spki_der.extend_from_slice(&P256_SPKI_PREFIX);
        spki_der.extend_from_slice(point);
        Self { spki_der }
    }

    /// The SubjectPublicKeyInfo DER: the bytes sent on the wire and in certificates.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key id: lowercase hex of the first 16 bytes of SHA-256 over the SPKI DER.
    pub fn key_id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.spki_der);
        digest.as_ref()[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The human-checkable fingerprint (see [`super::fingerprint`]).
    pub fn fingerprint(&self) -> String {
        super::fingerprint::fingerprint(&self.spki_der)
    }

    /// Verifies a fixed-length (`r || s`) signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(KeyError::BadSignature);
        }
        let point = &self.spki_der[P256_SPKI_PREFIX.len()..];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(message, signature)
            .map_err(|_| KeyError::BadSignature)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "PublicKey({})", self.key_id())
    }
}

/// The instance's private signing key. Holds the PKCS#8 bytes (zeroised on drop) so
/// the same key can also serve as the TLS certificate key.
pub struct InstanceKey {
    key_pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    public_key: PublicKey,
}

impl InstanceKey {
    /// Generates a fresh P-256 keypair from the system's secure random source.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Crypto)?;
        Self::from_pkcs8(Zeroizing::new(document.as_ref().to_vec()))
    }

    /// Loads a key from its PKCS#8 DER bytes.
    pub fn from_pkcs8(pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| KeyError::InvalidPrivateKey)?;
        let public_key = PublicKey::from_point(key_pair.public_key().as_ref());
        Ok(Self {
            key_pair,
            pkcs8,
            public_key,
        })
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The PKCS#8 DER bytes; visible to the identity module only, which seals them
    /// for storage and hands them to the TLS layer.
    pub(super) fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Signs `message` and returns a fixed-length (`r || s`) signature.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        self.key_pair
            .sign(&rng, message)
            .map(|signature| signature.as_ref().to_vec())
            .map_err(|_| KeyError::Crypto)
    }
}

impl std::fmt::Debug for InstanceKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "InstanceKey({})", self.public_key.key_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let key = InstanceKey::generate().expect("generate");
        let signature = key.sign(b"payload").expect("sign");
        assert_eq!(signature.len(), SIGNATURE_LEN);
        key.public_key()
            .verify(b"payload", &signature)
            .expect("verify");
        assert_eq!(
            key.public_key().verify(b"payloae", &signature),
            Err(KeyError::BadSignature)
        );
        let mut flipped = signature.clone();
        flipped[10] ^= 0x01;
        assert_eq!(
            key.public_key().verify(b"payload", &flipped),
            Err(KeyError::BadSignature)
        );
        assert_eq!(
            key.public_key().verify(b"payload", &signature[..63]),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn spki_round_trips_and_rejects_other_keys() {
        let key = InstanceKey::generate().expect("generate");
        let spki = key.public_key().spki_der().to_vec();
        assert_eq!(
            PublicKey::from_spki_der(&spki).expect("parse"),
            *key.public_key()
        );
        assert_eq!(
            PublicKey::from_spki_der(&spki[1..]),
            Err(KeyError::UnsupportedPublicKey)
        );
        assert_eq!(
            PublicKey::from_spki_der(b""),
            Err(KeyError::UnsupportedPublicKey)
        );
    }

    #[test]
    fn a_compressed_point_is_refused_with_its_own_reason() {
        let key = InstanceKey::generate().expect("generate");
        let point = &key.public_key().spki_der()[P256_SPKI_PREFIX.len()..];
        let parity = 0x02 | (point[64] & 1);
        let compressed = [&P256_COMPRESSED_SPKI_PREFIX[..], &[parity], &point[1..33]].concat();
        let refused = PublicKey::from_spki_der(&compressed).expect_err("compressed");
        assert_eq!(refused, KeyError::CompressedPoint);
        assert!(
            refused
                .to_string()
                .contains("send the uncompressed form (04 || X || Y)"),
            "{refused}"
        );
        // Not every 59-byte SPKI is a compressed point: a bad prefix byte is
        // just not a key.
        let mut other = compressed.clone();
        other[P256_COMPRESSED_SPKI_PREFIX.len()] = 0x05;
        assert_eq!(
            PublicKey::from_spki_der(&other),
            Err(KeyError::UnsupportedPublicKey)
        );
    }

    #[test]
    fn debug_output_never_contains_the_private_key() {
        let key = InstanceKey::generate().expect("generate");
        let debug = format!("{key:?}");
        assert_eq!(debug, format!("InstanceKey({})", key.public_key().key_id()));
    }

    #[test]
    fn the_same_pkcs8_gives_the_same_public_key() {
        let key = InstanceKey::generate().expect("generate");
        let again =
            InstanceKey::from_pkcs8(Zeroizing::new(key.pkcs8_der().to_vec())).expect("load");
        assert_eq!(again.public_key(), key.public_key());
        assert_eq!(key.public_key().key_id().len(), 32);
    }
}
