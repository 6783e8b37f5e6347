//! Encryption at rest of the instance private key: AES-256-GCM (`ring::aead`) under
//! a 32-byte master key from `MOSAIC_MASTER_KEY` or a 0600 key file in the data dir.
//!
//! Sealed format: `version (1) || nonce (12) || ciphertext || tag (16)`. The key id
//! is the associated data, so a sealed key cannot be swapped onto another key's row.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The environment variable holding the base64 master key.
pub const MASTER_KEY_ENV: &str = "MOSAIC_MASTER_KEY";
/// The key file's name inside the data dir.
pub const MASTER_KEY_FILE: &str = "master.key";
const SEALED_VERSION: u8 = 1;
const MASTER_KEY_LEN: usize = 32;

/// Why the master key could not be had or could not open a sealed key. The
/// messages say what to do and never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    /// `MOSAIC_MASTER_KEY` or the key file is not base64 of 32 bytes.
    #[error("{source_name} is not a base64-encoded 32-byte key")]
    MalformedMasterKey {
        /// Where the key came from (env var name or file path).
        source_name: String,
    },
    /// The key file is readable by group or others.
    #[error("{path} is readable by other users; run `chmod 600 {path}`")]
    KeyFileTooOpen {
        /// The key file.
        path: String,
    },
    /// No master key anywhere, while an encrypted identity exists.
    #[error(
        "the identity is encrypted but no master key was found: set MOSAIC_MASTER_KEY or restore {path}"
    )]
    Missing {
        /// The key file that was looked for.
        path: String,
    },
    /// The master key does not open the sealed private key (wrong key or tampering).
    #[error(
        "the master key does not decrypt the stored identity key (wrong MOSAIC_MASTER_KEY or key file?)"
    )]
    WrongKey,
    /// Reading or writing the key file failed.
    #[error("master key file {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The random source or cipher failed.
    #[error("the cryptographic library refused the operation")]
    Crypto,
}

/// The 32-byte master key, zeroised on drop and never formatted.
pub struct MasterKey {
    bytes: Zeroizing<[u8; MASTER_KEY_LEN]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("MasterKey(<redacted>)")
    }
}

/// Where a master key may come from, in order of preference.
#[derive(Clone)]
pub struct MasterKeySource {
    /// The value of `MOSAIC_MASTER_KEY`, if set.
    pub environment_value: Option<Zeroizing<String>>,
    /// The key file used when the environment variable is unset.
    pub key_file: PathBuf,
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MasterKeySource")
            .field(
                "environment_value",
                &self.environment_value.as_ref().map(|_| "<redacted>"),
            )
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl MasterKeySource {
    /// Loads an existing master key; `Ok(None)` when there is none at all.
    pub fn load(&self) -> Result<Option<MasterKey>, SealingError> {
        if let Some(value) = &self.environment_value {
            return MasterKey::from_base64(value, MASTER_KEY_ENV).map(Some);
        }
        let path = self.key_file.display().to_string();
        match std::fs::read_to_string(&self.key_file) {
            Ok(contents) => {
                check_permissions(&self.key_file)?;
                MasterKey::from_base64(&Zeroizing::new(contents), &path).map(Some)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SealingError::Io { path, source }),
        }
    }

    /// Loads the master key, or (only when none exists) creates the key file with
    /// mode 0600. Used when a new identity is being created.
    pub fn load_or_create(&self) -> Result<MasterKey, SealingError> {
        if let Some(master_key) = self.load()? {
            return Ok(master_key);
        }
        let master_key = MasterKey::generate()?;
        let path = self.key_file.display().to_string();
        let io_error = |source| SealingError::Io {
            path: path.clone(),
            source,
        };
        let mut file = create_private_file(&self.key_file).map_err(io_error)?;
        let encoded =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*master_key.bytes));
        file.write_all(encoded.as_bytes()).map_err(io_error)?;
        file.write_all(b"\n").map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        Ok(master_key)
    }

    /// The error to give when an identity exists but no master key does.
    pub fn missing_error(&self) -> SealingError {
        SealingError::Missing {
            path: self.key_file.display().to_string(),
        }
    }
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<(), SealingError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|source| SealingError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(SealingError::KeyFileTooOpen {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path) -> Result<(), SealingError> {
    Ok(())
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Result<Self, SealingError> {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| SealingError::Crypto)?;
        Ok(Self { bytes })
    }

    /// Parses base64 (standard alphabet, surrounding whitespace ignored).
    pub fn from_base64(encoded: &str, source_name: &str) -> Result<Self, SealingError> {
        let malformed = || SealingError::MalformedMasterKey {
            source_name: source_name.to_owned(),
        };
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| malformed())?,
        );
        let bytes: [u8; MASTER_KEY_LEN] = decoded.as_slice().try_into().map_err(|_| malformed())?;
        Ok(Self {
            bytes: Zeroizing::new(bytes),
        })
    }

    /// The key encoded as base64, for an operator who wants to move it into a
    /// secret store. Callers must not log it.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*self.bytes))
    }

    fn cipher(&self) -> Result<LessSafeKey, SealingError> {
        UnboundKey::new(&AES_256_GCM, self.bytes.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| SealingError::Crypto)
    }

    /// Encrypts `plaintext`, binding it to `associated_data`.
    pub fn seal(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, SealingError> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce_bytes)
            .map_err(|_| SealingError::Crypto)?;
        let mut in_out = plaintext.to_vec();
        self.cipher()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(associated_data),
                &mut in_out,
            )
            .map_err(|_| SealingError::Crypto)?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same associated data.
    pub fn open(
        &self,
        sealed: &[u8],
        associated_data: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealingError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != SEALED_VERSION {
            return Err(SealingError::WrongKey);
        }
        let nonce_bytes: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| SealingError::WrongKey)?;
        let mut in_out = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let plaintext_len = self
            .cipher()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(associated_data),
                in_out.as_mut_slice(),
            )
            .map_err(|_| SealingError::WrongKey)?
            .len();
        in_out.truncate(plaintext_len);
        Ok(in_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_only_with_the_same_key_and_data() {
        let master_key = MasterKey::generate().expect("generate");
        let sealed = master_key.seal(b"secret bytes", b"key-1").expect("seal");
        assert!(!sealed.windows(12).any(|window| window == b"secret bytes"));
        assert_eq!(
            master_key.open(&sealed, b"key-1").expect("open").as_slice(),
            b"secret bytes"
        );
        assert!(matches!(
            master_key.open(&sealed, b"key-2"),
            Err(SealingError::WrongKey)
        ));
        let other = MasterKey::generate().expect("generate");
        assert!(matches!(
            other.open(&sealed, b"key-1"),
            Err(SealingError::WrongKey)
        ));
        assert!(matches!(
            master_key.open(&sealed[..5], b"key-1"),
            Err(SealingError::WrongKey)
        ));
    }

    #[test]
    fn malformed_master_keys_name_their_source() {
        let error = MasterKey::from_base64("c2hvcnQ=", MASTER_KEY_ENV).expect_err("short key");
        assert!(error.to_string().contains(MASTER_KEY_ENV));
        assert!(MasterKey::from_base64("***", "file").is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = MasterKeySource {
            environment_value: None,
            key_file: dir.path().join(MASTER_KEY_FILE),
        };
        assert!(source.load().expect("load").is_none());
        let created = source.load_or_create().expect("create");
        let loaded = source.load().expect("load").expect("present");
        assert_eq!(*created.to_base64(), *loaded.to_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&source.key_file)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&source.key_file, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            assert!(matches!(
                source.load(),
                Err(SealingError::KeyFileTooOpen { .. })
            ));
        }
    }

    #[test]
    fn debug_never_prints_the_master_key() {
        let master_key = MasterKey::generate().expect("generate");
        assert_eq!(format!("{master_key:?}"), "MasterKey(<redacted>)");
    }
}
