//! The instance identity: id, profile, the current ECDSA P-256 key and the previous
//! keys still in their grace period, and the TLS certificate made for the key.
//!
//! This module (with its children) is the only place that holds private key
//! material. Everything else sees [`PublicKey`]s, signatures and certificates.
//!
//! In CA mode ([`IdentityManager::enable_ca_mode`]) the certificate presented is
//! the operator's chain for the same key, and the key cannot be rotated: the
//! chain would no longer certify it.

pub mod certificate;
pub mod fingerprint;
pub mod keys;
pub mod sealing;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use zeroize::Zeroizing;

pub use self::certificate::InstanceCertificate;
pub use self::keys::{InstanceKey, KeyError, PublicKey};
pub use self::sealing::{MasterKey, MasterKeySource, SealingError};
use crate::clock::now_ms;
use crate::store::{InstanceKeyRecord, InstanceRecord, Store, StoreError};
use crate::tls::ca::{CaTrust, TlsSettings};

/// Associated-data prefix binding a sealed private key to its key id.
const SEALING_CONTEXT: &[u8] = b"mosaic-instance-key-v1:";

/// What the operator configures about the instance (everything but keys and id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProfile {
    /// Human-readable name.
    pub name: String,
    /// The URL peers dial, e.g. `https://mesh.example.org:7443`.
    pub public_url: String,
    /// Capabilities this instance offers (`agent.spawn`, ...).
    pub capabilities: Vec<String>,
    /// Free-form metadata shown to peers.
    pub metadata: BTreeMap<String, String>,
}

impl InstanceProfile {
    /// The host of the public URL, without an IPv6 literal's brackets; `None`
    /// when the URL has none.
    pub fn public_host(&self) -> Option<String> {
        let uri = self.public_url.parse::<http::Uri>().ok()?;
        uri.host()
            .map(|host| host.trim_matches(['[', ']']).to_owned())
    }
}

/// A key that is no longer current but still verifies until `valid_until_ms`.
#[derive(Debug, Clone)]
pub struct PreviousKey {
    /// The public key.
    pub public_key: PublicKey,
    /// When it was created.
    pub created_at_ms: i64,
    /// When it stops being accepted.
    pub valid_until_ms: i64,
}

/// Why the identity could not be loaded, created or rotated. To a caller:
/// the store's code for `Store`, FAILED_PRECONDITION for `RotationInCaMode`,
/// INTERNAL (logged) for the rest (`crate::error`).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Master key trouble (missing, malformed, wrong).
    #[error(transparent)]
    Sealing(#[from] SealingError),
    /// The stored key does not parse or match.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The certificate could not be made.
    #[error(transparent)]
    Certificate(#[from] certificate::CertificateError),
    /// Stored rows contradict each other.
    #[error("the stored identity is inconsistent: {0}")]
    Corrupt(String),
    /// The TLS stack refused the key.
    #[error("the TLS library refused the instance key")]
    Tls,
    /// Rotation was asked for in CA mode.
    #[error(
        "key rotation is refused in CA mode: the operator's certificate (tls.cert_chain) certifies the current key; to rotate, stop the daemon, rotate in pinned mode, and have the CA sign the new key's request (`mosaicd identity csr`)"
    )]
    RotationInCaMode,
    /// The operator's chain does not certify the current key.
    #[error("tls.cert_chain does not certify the instance key")]
    ChainKeyMismatch,
}

/// A snapshot of the identity. Cheap to share; replaced whole on rotation.
pub struct Identity {
    /// The instance id (a UUID).
    pub instance_id: String,
    /// The configured profile.
    pub profile: InstanceProfile,
    /// When the identity was created.
    pub created_at_ms: i64,
    /// When the current key was created.
    pub current_key_created_at_ms: i64,
    current_key: InstanceKey,
    previous_keys: Vec<PreviousKey>,
    /// The private halves of `previous_keys` that this process holds, so that a
    /// KEY_ROTATED notice can be signed with the key the peers still trust.
    previous_signing_keys: Vec<InstanceKey>,
    certificate: InstanceCertificate,
    certified_key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Identity")
            .field("instance_id", &self.instance_id)
            .field("profile", &self.profile)
            .field("current_key", &self.current_key)
            .field("previous_keys", &self.previous_keys)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity of `instance` with its opened `keys`, serving
    /// `certificate` (made for the current key).
    fn new(
        instance: &InstanceRecord,
        keys: OpenedKeys,
        certificate: InstanceCertificate,
    ) -> Result<Self, IdentityError> {
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(keys.current.pkcs8_der().to_vec()),
        ))
        .map_err(|_| IdentityError::Tls)?;
        let certified_key = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(certificate.der.clone())],
            signing_key,
        ));
        Ok(Self {
            instance_id: instance.instance_id.clone(),
            profile: profile_of(instance),
            created_at_ms: instance.created_at_ms,
            current_key_created_at_ms: keys.current_created_at_ms,
            current_key: keys.current,
            previous_keys: keys.previous,
            previous_signing_keys: keys.previous_signing,
            certificate,
            certified_key,
        })
    }

    /// This identity's instance row, as of `updated_at_ms`.
    fn record(&self, updated_at_ms: i64) -> InstanceRecord {
        InstanceRecord {
            instance_id: self.instance_id.clone(),
            name: self.profile.name.clone(),
            public_url: self.profile.public_url.clone(),
            capabilities: self.profile.capabilities.clone(),
            metadata: self.profile.metadata.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms,
        }
    }

    /// The current public key.
    pub fn public_key(&self) -> &PublicKey {
        self.current_key.public_key()
    }

    /// Previous keys still inside their grace period at `now_ms`.
    pub fn previous_keys(&self, now_ms: i64) -> impl Iterator<Item = &PreviousKey> {
        self.previous_keys
            .iter()
            .filter(move |key| key.valid_until_ms > now_ms)
    }

    /// The current certificate (public).
    pub fn certificate(&self) -> &InstanceCertificate {
        &self.certificate
    }

    /// The certificate and signing key for rustls.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified_key)
    }

    /// A PKCS#10 certificate signing request for the current key, signed by it,
    /// naming `names` (DNS names or IP addresses): what an operator's CA signs
    /// for CA mode.
    pub fn certificate_request(&self, names: &[String]) -> Result<String, IdentityError> {
        Ok(certificate::signing_request(
            &self.current_key,
            &self.profile.name,
            names,
        )?)
    }

    /// Signs `message` with the current key.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.current_key.sign(message)
    }

    /// The signing key with `key_id` if it is a previous key still in its grace
    /// period at `now_ms` (used to sign KEY_ROTATED notices with the key that
    /// peers already trust).
    pub fn previous_signing_key(&self, key_id: &str, now_ms: i64) -> Option<&InstanceKey> {
        let in_grace = self
            .previous_keys(now_ms)
            .any(|previous| previous.public_key.key_id() == key_id);
        if !in_grace {
            return None;
        }
        self.previous_signing_keys
            .iter()
            .find(|key| key.public_key().key_id() == key_id)
    }
}

/// The host part of a URL, for the certificate's subject alternative names.
fn host_of_url(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    uri.host().map(str::to_owned)
}

/// The profile part of a stored instance.
fn profile_of(instance: &InstanceRecord) -> InstanceProfile {
    InstanceProfile {
        name: instance.name.clone(),
        public_url: instance.public_url.clone(),
        capabilities: instance.capabilities.clone(),
        metadata: instance.metadata.clone(),
    }
}

/// A new self-signed certificate for `key`, naming the instance and the host
/// of its public URL.
fn make_certificate(
    key: &InstanceKey,
    profile: &InstanceProfile,
) -> Result<InstanceCertificate, IdentityError> {
    let host: Vec<String> = host_of_url(&profile.public_url).into_iter().collect();
    Ok(certificate::self_signed(key, &profile.name, &host)?)
}

/// The certificate to serve for `key` under `profile`: the `stored` one
/// while it still names that key and profile (so every replica and restart
/// serves the same bytes), else a new one, with `true`: it must be stored.
fn certificate_for(
    key: &InstanceKey,
    profile: &InstanceProfile,
    stored: Option<&[u8]>,
) -> Result<(InstanceCertificate, bool), IdentityError> {
    let fresh = make_certificate(key, profile)?;
    match stored {
        Some(der) if certificate::same_key_and_names(der, &fresh.der) => {
            Ok((InstanceCertificate::from_der(der.to_vec()), false))
        }
        _ => Ok((fresh, true)),
    }
}

/// Owns the identity for a running daemon: loads or creates it, and rotates it.
pub struct IdentityManager {
    store: Store,
    master_key: MasterKey,
    current: RwLock<Arc<Identity>>,
    /// CA mode: the operator's chain and CA bundle (`None` in pinned mode).
    ca: Option<Arc<CaTrust>>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IdentityManager")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl IdentityManager {
    /// Loads the stored identity (updating its profile if the configuration
    /// changed), or creates one if the database has none.
    ///
    /// A wrong master key fails before anything is written.
    pub async fn load_or_create(
        store: Store,
        master_key_source: &MasterKeySource,
        profile: &InstanceProfile,
    ) -> Result<Self, IdentityError> {
        let now = now_ms();
        let Some((mut instance, key_records)) = store.load_instance().await? else {
            let master_key = master_key_source.load_or_create()?;
            let key = InstanceKey::generate()?;
            let certificate = make_certificate(&key, profile)?;
            let instance = InstanceRecord {
                instance_id: uuid::Uuid::new_v4().to_string(),
                name: profile.name.clone(),
                public_url: profile.public_url.clone(),
                capabilities: profile.capabilities.clone(),
                metadata: profile.metadata.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            };
            let record = seal_key(&master_key, &key, now, &certificate)?;
            store.create_instance(&instance, &record).await?;
            tracing::info!(
                instance.id = %instance.instance_id,
                key.id = %key.public_key().key_id(),
                "created a new instance identity"
            );
            let keys = OpenedKeys {
                current: key,
                current_created_at_ms: now,
                previous: Vec::new(),
                previous_signing: Vec::new(),
            };
            let identity = Identity::new(&instance, keys, certificate)?;
            return Ok(Self {
                store,
                master_key,
                current: RwLock::new(Arc::new(identity)),
                ca: None,
            });
        };

        let master_key = master_key_source
            .load()?
            .ok_or_else(|| master_key_source.missing_error())?;
        // Opened before the profile is updated: a wrong master key writes nothing.
        let (keys, stored_certificate) = open_keys(&master_key, &key_records, now)?;

        if profile_of(&instance) != *profile {
            store
                .update_instance_profile(
                    &profile.name,
                    &profile.public_url,
                    &profile.capabilities,
                    &profile.metadata,
                    now,
                )
                .await?;
            instance.name.clone_from(&profile.name);
            instance.public_url.clone_from(&profile.public_url);
            instance.capabilities.clone_from(&profile.capabilities);
            instance.metadata.clone_from(&profile.metadata);
        }
        // Made once per key (or when the name or public URL changes) and
        // stored, so that every replica and restart serves the same bytes.
        let (certificate, is_new) =
            certificate_for(&keys.current, profile, stored_certificate.as_deref())?;
        if is_new {
            store
                .set_key_certificate(&keys.current.public_key().key_id(), &certificate.der)
                .await?;
        }
        let identity = Identity::new(&instance, keys, certificate)?;
        Ok(Self {
            store,
            master_key,
            current: RwLock::new(Arc::new(identity)),
            ca: None,
        })
    }

    /// Loads the stored identity as it is (the profile is not updated), or
    /// `None` if the database has none. For offline commands that sign.
    pub async fn load_existing(
        store: Store,
        master_key_source: &MasterKeySource,
    ) -> Result<Option<Self>, IdentityError> {
        let now = now_ms();
        let Some((instance, key_records)) = store.load_instance().await? else {
            return Ok(None);
        };
        let master_key = master_key_source
            .load()?
            .ok_or_else(|| master_key_source.missing_error())?;
        let (keys, stored_certificate) = open_keys(&master_key, &key_records, now)?;
        // Offline: a certificate that no longer fits is made, not stored.
        let (certificate, _) = certificate_for(
            &keys.current,
            &profile_of(&instance),
            stored_certificate.as_deref(),
        )?;
        let identity = Identity::new(&instance, keys, certificate)?;
        Ok(Some(Self {
            store,
            master_key,
            current: RwLock::new(Arc::new(identity)),
            ca: None,
        }))
    }

    /// Loads, checks and enables CA mode when `tls` asks for it.
    /// A chain that cannot serve stops the start with an error naming its key; a
    /// chain that does not name the host of `instance`'s public URL only warns
    /// (clients that verify names will refuse it, peers dialing another name may
    /// not).
    pub fn enable_ca_mode_if_configured(
        &mut self,
        tls: &TlsSettings,
        instance: &InstanceProfile,
    ) -> anyhow::Result<()> {
        let TlsSettings::Ca {
            cert_chain,
            ca_bundle,
        } = tls
        else {
            return Ok(());
        };
        let trust = CaTrust::load(cert_chain, ca_bundle)?;
        trust.check(self.current().public_key(), UnixTime::now())?;
        let host = instance.public_host();
        if let Some(host) = host
            && !trust.names_host(&host)
        {
            tracing::warn!(
                public_url = %instance.public_url,
                "the certificate in tls.cert_chain does not name the public URL's host; peers and clients that dial it will refuse it"
            );
        }
        self.enable_ca_mode(Arc::new(trust))?;
        Ok(())
    }

    /// Switches to CA mode: the identity presents `trust`'s chain (whose first
    /// certificate must certify the current key; [`CaTrust::check`] says why not
    /// in operator terms) and TLS configurations require the CA of peers. Called
    /// once, before the manager is shared.
    pub fn enable_ca_mode(&mut self, trust: Arc<CaTrust>) -> Result<(), IdentityError> {
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        let identity = Arc::get_mut(current).ok_or_else(|| {
            IdentityError::Corrupt("CA mode must be enabled before the identity is shared".into())
        })?;
        let certified_key = CertifiedKey::new(
            trust.chain().to_vec(),
            Arc::clone(&identity.certified_key.key),
        );
        let leaf = trust
            .chain()
            .first()
            .ok_or(IdentityError::ChainKeyMismatch)?;
        let leaf_key = certificate::spki_of_certificate(leaf);
        if leaf_key.as_deref() != Some(identity.public_key().spki_der())
            || certified_key.keys_match().is_err()
        {
            return Err(IdentityError::ChainKeyMismatch);
        }
        identity.certificate = InstanceCertificate {
            der: leaf.to_vec(),
            pem: trust.chain_pem().to_owned(),
        };
        identity.certified_key = Arc::new(certified_key);
        self.ca = Some(trust);
        Ok(())
    }

    /// The CA-mode material, if CA mode is on.
    pub fn ca_trust(&self) -> Option<&CaTrust> {
        self.ca.as_deref()
    }

    /// The current identity snapshot.
    pub fn current(&self) -> Arc<Identity> {
        // A poisoned lock only means a writer panicked between two whole-Arc
        // assignments; the value inside is still a complete snapshot.
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    /// Makes a new key current. The previous key stays valid for verification for
    /// `grace_period`; the certificate follows the new key.
    ///
    /// Refused in CA mode, before anything is written.
    pub async fn rotate(&self, grace_period: Duration) -> Result<Arc<Identity>, IdentityError> {
        if self.ca.is_some() {
            return Err(IdentityError::RotationInCaMode);
        }
        let now = now_ms();
        let old = self.current();
        let new_key = InstanceKey::generate()?;
        let certificate = make_certificate(&new_key, &old.profile)?;
        let record = seal_key(&self.master_key, &new_key, now, &certificate)?;
        let grace_ms = i64::try_from(grace_period.as_millis()).unwrap_or(i64::MAX);
        let valid_until_ms = now.saturating_add(grace_ms);
        self.store
            .rotate_instance_key(&record, valid_until_ms)
            .await?;

        let mut previous_keys: Vec<PreviousKey> = old.previous_keys(now).cloned().collect();
        previous_keys.insert(
            0,
            PreviousKey {
                public_key: old.public_key().clone(),
                created_at_ms: old.current_key_created_at_ms,
                valid_until_ms,
            },
        );
        let instance = old.record(now);
        let mut previous_signing_keys: Vec<InstanceKey> = Vec::new();
        for key in std::iter::once(&old.current_key).chain(&old.previous_signing_keys) {
            let still_valid = previous_keys
                .iter()
                .any(|previous| previous.public_key == *key.public_key());
            if still_valid {
                previous_signing_keys.push(InstanceKey::from_pkcs8(Zeroizing::new(
                    key.pkcs8_der().to_vec(),
                ))?);
            }
        }
        let keys = OpenedKeys {
            current: new_key,
            current_created_at_ms: now,
            previous: previous_keys,
            previous_signing: previous_signing_keys,
        };
        let identity = self.install(Identity::new(&instance, keys, certificate)?);
        tracing::info!(
            key.id = %identity.public_key().key_id(),
            previous_key.id = %old.public_key().key_id(),
            grace_ms,
            "rotated the instance key"
        );
        Ok(identity)
    }

    /// Takes up a key change made through another replica of this instance
    /// (a rotation): when the database's current key, or the certificate
    /// stored for it, is not the one in use, the stored keys are opened and
    /// become the current identity, the previous ones still verifying for
    /// their grace period. Returns whether anything changed. Nothing changes
    /// in CA mode, where keys do not rotate.
    pub async fn refresh(&self) -> Result<bool, IdentityError> {
        if self.ca.is_some() {
            return Ok(false);
        }
        let Some((_, key_records)) = self.store.load_instance().await? else {
            return Ok(false);
        };
        let old = self.current();
        let now = now_ms();
        let (current_record, _) = split_key_records(&key_records, now)?;
        let same_certificate = current_record
            .certificate_der
            .as_ref()
            .is_none_or(|der| *der == old.certificate.der);
        if current_record.key_id == old.public_key().key_id() && same_certificate {
            return Ok(false);
        }
        let (keys, stored_certificate) = open_keys(&self.master_key, &key_records, now)?;
        let (certificate, _) =
            certificate_for(&keys.current, &old.profile, stored_certificate.as_deref())?;
        // This replica's own profile (its configuration), as at start.
        let instance = old.record(now);
        let identity = self.install(Identity::new(&instance, keys, certificate)?);
        tracing::info!(
            key.id = %identity.public_key().key_id(),
            previous_key.id = %old.public_key().key_id(),
            "took up the instance key now current in the database"
        );
        Ok(true)
    }

    /// Makes `identity` the current one, whole, for every reader after this.
    fn install(&self, identity: Identity) -> Arc<Identity> {
        let identity = Arc::new(identity);
        // A poisoned lock only means a writer panicked between two whole-Arc
        // assignments; the value inside is still a complete snapshot.
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::clone(&identity);
        identity
    }
}

/// Reads the public identity without the master key: enough for `identity show`.
pub async fn load_public(
    store: &Store,
) -> Result<Option<(InstanceRecord, PublicKey, Vec<PreviousKey>)>, IdentityError> {
    let Some((instance, key_records)) = store.load_instance().await? else {
        return Ok(None);
    };
    let (current_record, previous_keys) = split_key_records(&key_records, now_ms())?;
    let public_key = PublicKey::from_spki_der(&current_record.public_key)?;
    Ok(Some((instance, public_key, previous_keys)))
}

/// The instance's keys, opened with the master key.
struct OpenedKeys {
    /// The current key.
    current: InstanceKey,
    /// When the current key was made.
    current_created_at_ms: i64,
    /// The previous keys still in their grace period.
    previous: Vec<PreviousKey>,
    /// Their private halves.
    previous_signing: Vec<InstanceKey>,
}

/// The keys in `key_records` opened with `master_key`, and the certificate
/// stored beside the current key, if any.
fn open_keys(
    master_key: &MasterKey,
    key_records: &[InstanceKeyRecord],
    now: i64,
) -> Result<(OpenedKeys, Option<Vec<u8>>), IdentityError> {
    let (current_record, previous) = split_key_records(key_records, now)?;
    let current = open_key(master_key, current_record)?;
    let previous_signing = key_records
        .iter()
        .filter(|record| {
            !record.is_current && record.valid_until_ms.is_some_and(|until| until > now)
        })
        .map(|record| open_key(master_key, record))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = OpenedKeys {
        current,
        current_created_at_ms: current_record.created_at_ms,
        previous,
        previous_signing,
    };
    Ok((keys, current_record.certificate_der.clone()))
}

fn split_key_records(
    key_records: &[InstanceKeyRecord],
    now: i64,
) -> Result<(&InstanceKeyRecord, Vec<PreviousKey>), IdentityError> {
    let mut current = None;
    let mut previous = Vec::new();
    for record in key_records {
        if record.is_current {
            if current.replace(record).is_some() {
                return Err(IdentityError::Corrupt("more than one current key".into()));
            }
        } else if let Some(valid_until_ms) = record.valid_until_ms.filter(|until| *until > now) {
            previous.push(PreviousKey {
                public_key: PublicKey::from_spki_der(&record.public_key)?,
                created_at_ms: record.created_at_ms,
                valid_until_ms,
            });
        }
    }
    let current = current.ok_or_else(|| IdentityError::Corrupt("no current key".into()))?;
    Ok((current, previous))
}

fn sealing_context(key_id: &str) -> Vec<u8> {
    [SEALING_CONTEXT, key_id.as_bytes()].concat()
}

/// `key` sealed under `master_key`, as a new current key with its
/// `certificate`.
fn seal_key(
    master_key: &MasterKey,
    key: &InstanceKey,
    now: i64,
    certificate: &InstanceCertificate,
) -> Result<InstanceKeyRecord, IdentityError> {
    let key_id = key.public_key().key_id();
    let sealed_private_key = master_key.seal(key.pkcs8_der(), &sealing_context(&key_id))?;
    Ok(InstanceKeyRecord {
        key_id,
        public_key: key.public_key().spki_der().to_vec(),
        sealed_private_key,
        created_at_ms: now,
        valid_until_ms: None,
        is_current: true,
        certificate_der: Some(certificate.der.clone()),
    })
}

fn open_key(
    master_key: &MasterKey,
    record: &InstanceKeyRecord,
) -> Result<InstanceKey, IdentityError> {
    let pkcs8: Zeroizing<Vec<u8>> =
        master_key.open(&record.sealed_private_key, &sealing_context(&record.key_id))?;
    let key = InstanceKey::from_pkcs8(pkcs8)?;
    if key.public_key().spki_der() != record.public_key.as_slice() {
        return Err(IdentityError::Corrupt(
            "the stored private key does not match the stored public key".into(),
        ));
    }
    Ok(key)
}
