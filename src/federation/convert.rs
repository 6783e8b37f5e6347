//! The identity as `mosaic.federation.v1` shows it: the instance and its
//! keys, for the handlers and for the messages federation sends (logic may
//! import this; it imports no handler).

use crate::clock::{now_ms, timestamp_from_ms};
use crate::identity::{Identity, PreviousKey};
use crate::proto::federation as pb;

/// The public view of the identity, as `GetInstance` returns it and a
/// connection request carries it.
pub fn instance_message(identity: &Identity) -> pb::Instance {
    let public_key = identity.public_key();
    pb::Instance {
        instance_id: identity.instance_id.clone(),
        name: identity.profile.name.clone(),
        url: identity.profile.public_url.clone(),
        public_key: public_key.spki_der().to_vec(),
        fingerprint: public_key.fingerprint(),
        key_id: public_key.key_id(),
        capabilities: identity.profile.capabilities.clone(),
        metadata: identity.profile.metadata.clone().into_iter().collect(),
        previous_keys: identity
            .previous_keys(now_ms())
            .map(previous_key_message)
            .collect(),
        created_at: Some(timestamp_from_ms(identity.created_at_ms)),
    }
}

/// The current key, with no end of validity.
pub fn current_key_message(identity: &Identity) -> pb::PublicKeyInfo {
    let public_key = identity.public_key();
    pb::PublicKeyInfo {
        key_id: public_key.key_id(),
        public_key: public_key.spki_der().to_vec(),
        fingerprint: public_key.fingerprint(),
        created_at: Some(timestamp_from_ms(identity.current_key_created_at_ms)),
        valid_until: None,
    }
}

/// A rotated-out key and the end of its grace period.
pub fn previous_key_message(previous: &PreviousKey) -> pb::PublicKeyInfo {
    pb::PublicKeyInfo {
        key_id: previous.public_key.key_id(),
        public_key: previous.public_key.spki_der().to_vec(),
        fingerprint: previous.public_key.fingerprint(),
        created_at: Some(timestamp_from_ms(previous.created_at_ms)),
        valid_until: Some(timestamp_from_ms(previous.valid_until_ms)),
    }
}
