//! The signed envelope every federation wire message travels in: what is signed
//! (a domain-separation prefix, the payload kind and the exact payload bytes),
//! sealing, and the receiver's checks in their fixed order.
//!
//! Pure: no I/O, no tonic, and time comes in as an argument. The checks are split
//! so that the caller can run its store lookups (connection state, capability)
//! between them, cheapest first, as the Federation service documents. A payload is
//! reachable only through [`Verified`], which only [`Parsed::verify_signature`]
//! makes: nothing in a payload can be acted on before its signature has passed.

use prost::Message;

use crate::clock::{ms_from_timestamp, timestamp_from_ms};
use crate::identity::{Identity, InstanceKey, KeyError, PublicKey};
use crate::proto::federation as pb;

/// The first bytes of everything signed, so a federation signature can never be
/// replayed as a signature for some other protocol that uses the same key.
pub const DOMAIN_PREFIX: &[u8] = b"mosaic-federation-v1";
/// Length of an ECDSA P-256 signature in the fixed `r || s` form.
const SIGNATURE_BYTES: usize = 64;

/// What a payload is; part of the signed bytes, so a signature made for one kind
/// is never accepted for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// `ConnectionRequestPayload`.
    ConnectionRequest,
    /// `ConnectionReplyPayload`.
    ConnectionReply,
    /// `ConnectionNoticePayload`.
    ConnectionNotice,
    /// `NoticeAckPayload`.
    NoticeAck,
    /// `CommandPayload`.
    Command,
    /// `CommandResultPayload`.
    CommandResult,
    /// `AgentEventsPayload`.
    AgentEvents,
    /// `PingPayload`.
    Ping,
}

impl PayloadKind {
    /// The ASCII kind that goes into the signed bytes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionRequest => "connection-request",
            Self::ConnectionReply => "connection-reply",
            Self::ConnectionNotice => "connection-notice",
            Self::NoticeAck => "notice-ack",
            Self::Command => "command",
            Self::CommandResult => "command-result",
            Self::AgentEvents => "agent-events",
            Self::Ping => "ping",
        }
    }
}

/// A payload message: it has a kind and starts with an [`pb::EnvelopeHeader`].
pub trait Payload: Message + Default {
    /// The kind signed with it.
    const KIND: PayloadKind;
    /// Its header, if set.
    fn header(&self) -> Option<&pb::EnvelopeHeader>;
    /// The public keys it carries that the receiver will use, by field name
    /// (checked for their encoding in step 3).
    fn carried_keys(&self) -> Vec<(&'static str, &[u8])> {
        Vec::new()
    }
}

macro_rules! payload {
    ($type:ty, $kind:expr) => {
        payload!($type, $kind, |_payload| Vec::new());
    };
    ($type:ty, $kind:expr, |$payload:ident| $keys:expr) => {
        impl Payload for $type {
            const KIND: PayloadKind = $kind;
            fn header(&self) -> Option<&pb::EnvelopeHeader> {
                self.header.as_ref()
            }
            fn carried_keys(&self) -> Vec<(&'static str, &[u8])> {
                let $payload = self;
                $keys
            }
        }
    };
}

// A request carries the key it is signed with; a KEY_ROTATED notice, the
// sender's new key (a new_key on any other notice is not read).
payload!(
    pb::ConnectionRequestPayload,
    PayloadKind::ConnectionRequest,
    |request| request
        .sender
        .iter()
        .map(|sender| ("sender.public_key", sender.public_key.as_slice()))
        .collect()
);
payload!(pb::ConnectionReplyPayload, PayloadKind::ConnectionReply);
payload!(
    pb::ConnectionNoticePayload,
    PayloadKind::ConnectionNotice,
    |notice| match notice.kind() {
        pb::NoticeKind::KeyRotated => notice
            .new_key
            .iter()
            .map(|new_key| ("new_key.public_key", new_key.public_key.as_slice()))
            .collect(),
        _ => Vec::new(),
    }
);
payload!(pb::NoticeAckPayload, PayloadKind::NoticeAck);
payload!(pb::CommandPayload, PayloadKind::Command);
payload!(pb::CommandResultPayload, PayloadKind::CommandResult);
payload!(pb::AgentEventsPayload, PayloadKind::AgentEvents);
payload!(pb::PingPayload, PayloadKind::Ping);

/// The exact bytes a signature covers:
/// `DOMAIN_PREFIX || 0x00 || kind || 0x00 || payload`.
pub fn signed_bytes(kind: PayloadKind, payload: &[u8]) -> Vec<u8> {
    let kind = kind.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(DOMAIN_PREFIX.len() + kind.len() + payload.len() + 2);
    bytes.extend_from_slice(DOMAIN_PREFIX);
    bytes.push(0);
    bytes.extend_from_slice(kind);
    bytes.push(0);
    bytes.extend_from_slice(payload);
    bytes
}

/// Something that signs envelopes: the running identity, or a bare key (tests, and
/// a previous key still in its grace period).
pub trait Signer {
    /// The key id of the signing key.
    fn key_id(&self) -> String;
    /// Signs `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;
}

impl Signer for Identity {
    fn key_id(&self) -> String {
        self.public_key().key_id()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        Identity::sign(self, message)
    }
}

impl Signer for InstanceKey {
    fn key_id(&self) -> String {
        self.public_key().key_id()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        InstanceKey::sign(self, message)
    }
}

/// Routing and freshness for a new message.
#[derive(Clone, Debug)]
pub struct Routing<'a> {
    /// This instance's id.
    pub sender_instance_id: &'a str,
    /// The receiver's id.
    pub recipient_instance_id: &'a str,
    /// The workspace.
    pub workspace: &'a str,
    /// Now, epoch ms.
    pub now_ms: i64,
    /// How long the message stays valid, ms.
    pub lifetime_ms: i64,
}

/// A fresh header with a new message id, signed by `key_id`.
pub fn new_header(routing: &Routing<'_>, key_id: String) -> pb::EnvelopeHeader {
    pb::EnvelopeHeader {
        message_id: uuid::Uuid::new_v4().to_string(),
        sender_instance_id: routing.sender_instance_id.to_owned(),
        recipient_instance_id: routing.recipient_instance_id.to_owned(),
        workspace: routing.workspace.to_owned(),
        issued_at: Some(timestamp_from_ms(routing.now_ms)),
        expires_at: Some(timestamp_from_ms(
            routing.now_ms.saturating_add(routing.lifetime_ms),
        )),
        key_id,
    }
}

/// Serialises `payload` and signs the bytes under its kind.
pub fn seal<P: Payload>(
    payload: &P,
    signer: &(impl Signer + ?Sized),
) -> Result<pb::SignedEnvelope, KeyError> {
    let bytes = payload.encode_to_vec();
    let signature = signer.sign(&signed_bytes(P::KIND, &bytes))?;
    Ok(pb::SignedEnvelope {
        payload: bytes,
        signature,
        key_id: signer.key_id(),
    })
}

/// Why an envelope was refused. Messages name the check, never a key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The envelope or its payload is malformed (INVALID_ARGUMENT).
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The message is for another instance (PERMISSION_DENIED).
    #[error("the message is addressed to another instance")]
    WrongRecipient,
    /// The signing key is not one this instance knows for the sender, or its grace
    /// period has ended (UNAUTHENTICATED).
    #[error("the signing key is not a known key of the sender (or its grace period has ended)")]
    UnknownKey,
    /// The signing key is not the key of the TLS client certificate (UNAUTHENTICATED).
    #[error("the signing key is not the key of the TLS client certificate")]
    KeyIsNotTlsKey,
    /// issued_at is outside the clock window (DEADLINE_EXCEEDED).
    #[error("issued_at is outside the clock window of {window_s} s")]
    OutsideClockWindow {
        /// The window either side, seconds.
        window_s: i64,
    },
    /// expires_at has passed (DEADLINE_EXCEEDED).
    #[error("the message has expired")]
    Expired,
    /// The signature does not verify (UNAUTHENTICATED).
    #[error("the signature does not verify")]
    BadSignature,
    /// The caller is not identified: there is no connection with the sender
    /// the header names in its workspace, or the TLS key is not one that
    /// connection trusts (UNAUTHENTICATED). One code and one message whatever
    /// the reason, so that a caller learns nothing about connections it has
    /// no part in.
    #[error("{STRANGER_MESSAGE}")]
    Stranger,
}

/// The message of [`EnvelopeError::Stranger`], the same for every stranger.
/// It names the grace period because a real peer still using a rotated-out
/// key is the likeliest reader.
pub const STRANGER_MESSAGE: &str = "the TLS key is not the key of a connection this instance has \
     with the sender the header names, in that workspace (or that key's grace period has ended)";

/// A key a sender may sign with: its current key (no end) or a previous key in
/// its grace period.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    /// The key.
    pub key: PublicKey,
    /// End of its grace period (epoch ms); `None` for the current key.
    pub valid_until_ms: Option<i64>,
}

/// An envelope whose payload decoded and whose header is well formed. Only the
/// header is readable: the payload waits for the signature.
#[derive(Debug)]
pub struct Parsed<P> {
    payload: P,
    header: pb::EnvelopeHeader,
    kind: PayloadKind,
    bytes: Vec<u8>,
    signature: Vec<u8>,
    issued_at_ms: i64,
    expires_at_ms: i64,
}

/// A payload whose signature verified.
#[derive(Debug)]
pub struct Verified<P> {
    /// The payload.
    pub payload: P,
    /// Its header.
    pub header: pb::EnvelopeHeader,
    /// SHA-256 of the payload bytes, to tell an identical retry from a reuse.
    pub digest: Vec<u8>,
    /// The key that signed it.
    pub signing_key: PublicKey,
}

fn malformed(message: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed(message.into())
}

/// Every id in a header, the workspace included, follows the one identifier
/// rule (`crate::text::identifier`).
fn check_id(name: &str, value: &str) -> Result<(), EnvelopeError> {
    crate::text::identifier::check(&format!("header.{name}"), value).map_err(malformed)
}

/// Step 3 of the receiver's checks: decodes the payload (as `P`, the kind fixed
/// by the RPC) and checks that the header is well formed and names the same key as
/// the envelope.
pub fn parse<P: Payload>(
    envelope: Option<&pb::SignedEnvelope>,
) -> Result<Parsed<P>, EnvelopeError> {
    let envelope = envelope.ok_or_else(|| malformed("the envelope is missing"))?;
    if envelope.payload.is_empty() {
        return Err(malformed("the payload is empty"));
    }
    // Checked before anything else is read: a signature of another length
    // can never verify, so nothing more is spent on the message.
    if envelope.signature.len() != SIGNATURE_BYTES {
        return Err(malformed(format!(
            "the signature must be {SIGNATURE_BYTES} bytes (ECDSA P-256, r || s), not {}",
            envelope.signature.len()
        )));
    }
    let payload = P::decode(envelope.payload.as_slice())
        .map_err(|_| malformed(format!("the payload is not a {}", P::KIND.as_str())))?;
    let header = payload
        .header()
        .cloned()
        .ok_or_else(|| malformed("the payload has no header"))?;
    check_id("message_id", &header.message_id)?;
    check_id("sender_instance_id", &header.sender_instance_id)?;
    check_id("recipient_instance_id", &header.recipient_instance_id)?;
    check_id("key_id", &header.key_id)?;
    check_id("workspace", &header.workspace)?;
    for (field, key) in payload.carried_keys() {
        PublicKey::from_spki_der(key).map_err(|error| malformed(format!("{field}: {error}")))?;
    }
    let issued_at_ms = header
        .issued_at
        .as_ref()
        .map(ms_from_timestamp)
        .ok_or_else(|| malformed("header.issued_at is not set"))?;
    let expires_at_ms = header
        .expires_at
        .as_ref()
        .map(ms_from_timestamp)
        .ok_or_else(|| malformed("header.expires_at is not set"))?;
    if expires_at_ms < issued_at_ms {
        return Err(malformed("header.expires_at is before issued_at"));
    }
    if envelope.key_id != header.key_id {
        return Err(malformed("envelope key_id differs from header.key_id"));
    }
    Ok(Parsed {
        payload,
        header,
        kind: P::KIND,
        bytes: envelope.payload.clone(),
        signature: envelope.signature.clone(),
        issued_at_ms,
        expires_at_ms,
    })
}

impl<P: Payload> Parsed<P> {
    /// The header's issued_at in epoch milliseconds, not yet verified.
    pub fn issued_at_ms(&self) -> i64 {
        self.issued_at_ms
    }

    /// The header (routing data only; the payload waits for the signature).
    pub fn header(&self) -> &pb::EnvelopeHeader {
        &self.header
    }

    /// The payload before its signature is checked, for the well-formedness checks
    /// of step 3 and for a RequestConnection, whose signing key travels inside
    /// the payload. Nothing read here may be acted on before
    /// [`Parsed::verify_signature`] succeeds.
    pub fn unverified_payload(&self) -> &P {
        &self.payload
    }

    /// Step 4: the message is addressed to `me`.
    pub fn check_recipient(&self, me: &str) -> Result<(), EnvelopeError> {
        if self.header.recipient_instance_id != me {
            return Err(EnvelopeError::WrongRecipient);
        }
        Ok(())
    }

    /// Step 7, first half: the key named by the header among `trusted` (current, or
    /// still in its grace period at `now_ms`).
    pub fn signing_key(
        &self,
        trusted: &[TrustedKey],
        now_ms: i64,
    ) -> Result<PublicKey, EnvelopeError> {
        trusted
            .iter()
            .find(|candidate| {
                candidate.key.key_id() == self.header.key_id
                    && candidate.valid_until_ms.is_none_or(|until| until > now_ms)
            })
            .map(|candidate| candidate.key.clone())
            .ok_or(EnvelopeError::UnknownKey)
    }

    /// Whether a KEY_ROTATED notice identifies its caller although the TLS
    /// key is not yet trusted: the TLS key is the notice's `new_key`, and the
    /// notice is signed by a key the connection trusts (`trusted`), which
    /// only the sender holds. Checks the signature without handing out the
    /// payload; [`Parsed::verify_signature`] still runs in its turn.
    pub fn proves_rotation_to(
        &self,
        new_key: &[u8],
        trusted: &[TrustedKey],
        tls_key: &PublicKey,
        now_ms: i64,
    ) -> bool {
        new_key == tls_key.spki_der()
            && self
                .signing_key(trusted, now_ms)
                .is_ok_and(|key| self.signature_verifies(&key))
    }

    fn signature_verifies(&self, key: &PublicKey) -> bool {
        key.verify(&signed_bytes(self.kind, &self.bytes), &self.signature)
            .is_ok()
    }

    /// Step 7: the signing key is known and is the key of the TLS client
    /// certificate.
    pub fn check_key(
        &self,
        trusted: &[TrustedKey],
        tls_key: &PublicKey,
        now_ms: i64,
    ) -> Result<PublicKey, EnvelopeError> {
        let key = self.signing_key(trusted, now_ms)?;
        if &key != tls_key {
            return Err(EnvelopeError::KeyIsNotTlsKey);
        }
        Ok(key)
    }

    /// Step 8: issued_at is within `window_ms` of `now_ms`, and the message has not
    /// expired.
    pub fn check_time(&self, now_ms: i64, window_ms: i64) -> Result<(), EnvelopeError> {
        if self.issued_at_ms.abs_diff(now_ms) > window_ms.unsigned_abs() {
            return Err(EnvelopeError::OutsideClockWindow {
                window_s: window_ms / 1000,
            });
        }
        if self.expires_at_ms <= now_ms {
            return Err(EnvelopeError::Expired);
        }
        Ok(())
    }

    /// Step 9: the signature verifies with `key` over the received bytes (never a
    /// re-encoding). Only now is the payload handed out.
    pub fn verify_signature(self, key: &PublicKey) -> Result<Verified<P>, EnvelopeError> {
        if !self.signature_verifies(key) {
            return Err(EnvelopeError::BadSignature);
        }
        Ok(Verified {
            digest: digest(&self.bytes),
            payload: self.payload,
            header: self.header,
            signing_key: key.clone(),
        })
    }
}

/// Step 5: the caller is identified when its TLS key is one of the keys
/// (`trusted`, current or in grace at `now_ms`) of the connection its header
/// names; none when there is no such connection. Anyone else is a stranger,
/// whatever the state of that connection, or its absence.
pub fn identify_caller(
    trusted: &[TrustedKey],
    tls_key: &PublicKey,
    now_ms: i64,
) -> Result<(), EnvelopeError> {
    let known = trusted.iter().any(|candidate| {
        &candidate.key == tls_key && candidate.valid_until_ms.is_none_or(|until| until > now_ms)
    });
    if known {
        Ok(())
    } else {
        Err(EnvelopeError::Stranger)
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Checks a reply from a peer we called: well formed, addressed to `me`, sent by
/// `peer_instance_id`, in `workspace`, signed by one of the peer's trusted keys.
/// The TLS key was pinned when the channel was made, so it is not checked again;
/// nor is the clock window, since the reply is bound to our fresh request by id
/// (which the caller checks).
pub fn open_reply<P: Payload>(
    envelope: Option<&pb::SignedEnvelope>,
    me: &str,
    peer_instance_id: &str,
    workspace: &str,
    trusted: &[TrustedKey],
    now_ms: i64,
) -> Result<Verified<P>, EnvelopeError> {
    let parsed = parse::<P>(envelope)?;
    parsed.check_recipient(me)?;
    if parsed.header.sender_instance_id != peer_instance_id {
        return Err(malformed("the reply is not from the peer that was called"));
    }
    if parsed.header.workspace != workspace {
        return Err(malformed("the reply names another workspace"));
    }
    let key = parsed.signing_key(trusted, now_ms)?;
    parsed.verify_signature(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const WINDOW: i64 = 300_000;

    fn routing() -> Routing<'static> {
        Routing {
            sender_instance_id: "sender",
            recipient_instance_id: "receiver",
            workspace: "w",
            now_ms: NOW,
            lifetime_ms: 60_000,
        }
    }

    fn ping(key: &InstanceKey, routing: &Routing<'_>) -> pb::SignedEnvelope {
        let payload = pb::PingPayload {
            header: Some(new_header(routing, key.public_key().key_id())),
        };
        seal(&payload, key).expect("seal")
    }

    fn current(key: &InstanceKey) -> Vec<TrustedKey> {
        vec![TrustedKey {
            key: key.public_key().clone(),
            valid_until_ms: None,
        }]
    }

    #[test]
    fn a_sealed_envelope_passes_every_check() {
        let key = InstanceKey::generate().expect("key");
        let envelope = ping(&key, &routing());
        let parsed = parse::<pb::PingPayload>(Some(&envelope)).expect("parse");
        parsed.check_recipient("receiver").expect("recipient");
        let signing = parsed
            .check_key(&current(&key), key.public_key(), NOW)
            .expect("key");
        parsed.check_time(NOW, WINDOW).expect("time");
        let verified = parsed.verify_signature(&signing).expect("signature");
        assert_eq!(verified.header.sender_instance_id, "sender");
        assert_eq!(verified.digest, digest(&envelope.payload));
    }

    #[test]
    fn signed_bytes_separate_domain_and_kind() {
        assert_eq!(
            signed_bytes(PayloadKind::Ping, b"xy"),
            b"mosaic-federation-v1\0ping\0xy".to_vec()
        );
        // A valid ping signature is refused when presented as another kind.
        let key = InstanceKey::generate().expect("key");
        let envelope = ping(&key, &routing());
        let parsed = parse::<pb::NoticeAckPayload>(Some(&envelope)).expect("decodes as well");
        assert_eq!(
            parsed.verify_signature(key.public_key()).map(|_| ()),
            Err(EnvelopeError::BadSignature)
        );
    }

    #[test]
    fn tampered_payloads_and_signatures_are_refused() {
        let key = InstanceKey::generate().expect("key");
        let mut envelope = ping(&key, &routing());
        envelope.signature[5] ^= 1;
        let parsed = parse::<pb::PingPayload>(Some(&envelope)).expect("parse");
        assert_eq!(
            parsed.verify_signature(key.public_key()).map(|_| ()),
            Err(EnvelopeError::BadSignature)
        );
        let other = InstanceKey::generate().expect("other key");
        let envelope = ping(&key, &routing());
        let parsed = parse::<pb::PingPayload>(Some(&envelope)).expect("parse");
        assert_eq!(
            parsed.verify_signature(other.public_key()).map(|_| ()),
            Err(EnvelopeError::BadSignature)
        );
    }

    #[test]
    fn malformed_envelopes_are_invalid() {
        let key = InstanceKey::generate().expect("key");
        assert!(matches!(
            parse::<pb::PingPayload>(None),
            Err(EnvelopeError::Malformed(_))
        ));
        let garbage = pb::SignedEnvelope {
            payload: vec![0xff, 0xff, 0xff],
            signature: vec![0; 64],
            key_id: "k".into(),
        };
        assert!(matches!(
            parse::<pb::PingPayload>(Some(&garbage)),
            Err(EnvelopeError::Malformed(_))
        ));
        let mut mismatched = ping(&key, &routing());
        mismatched.key_id = "another".into();
        assert!(matches!(
            parse::<pb::PingPayload>(Some(&mismatched)),
            Err(EnvelopeError::Malformed(_))
        ));
        let no_header = seal(&pb::PingPayload { header: None }, &key);
        // An empty message encodes to no bytes at all.
        assert!(matches!(
            parse::<pb::PingPayload>(Some(&no_header.expect("seal"))),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn recipient_key_and_time_are_checked() {
        let key = InstanceKey::generate().expect("key");
        let envelope = ping(&key, &routing());
        let parsed = parse::<pb::PingPayload>(Some(&envelope)).expect("parse");
        assert_eq!(
            parsed.check_recipient("someone-else"),
            Err(EnvelopeError::WrongRecipient)
        );
        let stranger = InstanceKey::generate().expect("stranger");
        assert_eq!(
            parsed
                .check_key(&current(&stranger), key.public_key(), NOW)
                .map(|_| ()),
            Err(EnvelopeError::UnknownKey)
        );
        assert_eq!(
            parsed
                .check_key(&current(&key), stranger.public_key(), NOW)
                .map(|_| ()),
            Err(EnvelopeError::KeyIsNotTlsKey)
        );
        let in_grace = vec![TrustedKey {
            key: key.public_key().clone(),
            valid_until_ms: Some(NOW + 1),
        }];
        assert!(parsed.check_key(&in_grace, key.public_key(), NOW).is_ok());
        assert_eq!(
            parsed
                .check_key(&in_grace, key.public_key(), NOW + 1)
                .map(|_| ()),
            Err(EnvelopeError::UnknownKey)
        );
        assert!(parsed.check_time(NOW + WINDOW - 1, WINDOW).is_err());
        assert!(parsed.check_time(NOW + 59_999, WINDOW).is_ok());
        assert_eq!(
            parsed.check_time(NOW + 60_000, WINDOW),
            Err(EnvelopeError::Expired)
        );
        assert_eq!(
            parsed.check_time(NOW - WINDOW - 1, WINDOW),
            Err(EnvelopeError::OutsideClockWindow { window_s: 300 })
        );
    }

    #[test]
    fn replies_must_come_from_the_called_peer_to_me() {
        let key = InstanceKey::generate().expect("key");
        let envelope = ping(&key, &routing());
        let trusted = current(&key);
        assert!(
            open_reply::<pb::PingPayload>(
                Some(&envelope),
                "receiver",
                "sender",
                "w",
                &trusted,
                NOW
            )
            .is_ok()
        );
        assert!(
            open_reply::<pb::PingPayload>(Some(&envelope), "receiver", "other", "w", &trusted, NOW)
                .is_err()
        );
        assert_eq!(
            open_reply::<pb::PingPayload>(Some(&envelope), "me", "sender", "w", &trusted, NOW)
                .map(|_| ()),
            Err(EnvelopeError::WrongRecipient)
        );
    }

    #[test]
    fn only_a_key_of_the_connection_identifies_the_caller() {
        let key = InstanceKey::generate().expect("key");
        let stranger = InstanceKey::generate().expect("stranger");
        assert_eq!(
            identify_caller(&current(&key), key.public_key(), NOW),
            Ok(())
        );
        let in_grace = [TrustedKey {
            key: key.public_key().clone(),
            valid_until_ms: Some(NOW + 1),
        }];
        assert_eq!(identify_caller(&in_grace, key.public_key(), NOW), Ok(()));
        // No connection, another key, a key past its grace: one refusal.
        for (trusted, tls_key, now) in [
            (&[][..], key.public_key(), NOW),
            (&current(&key)[..], stranger.public_key(), NOW),
            (&in_grace[..], key.public_key(), NOW + 1),
        ] {
            let refused = identify_caller(trusted, tls_key, now).expect_err("a stranger");
            assert_eq!(refused, EnvelopeError::Stranger);
            assert_eq!(refused.to_string(), STRANGER_MESSAGE);
        }
    }

    #[test]
    fn a_key_rotation_is_proved_by_the_new_tls_key_and_an_old_signature() {
        let old = InstanceKey::generate().expect("old key");
        let new = InstanceKey::generate().expect("new key");
        let stranger = InstanceKey::generate().expect("stranger");
        let notice = |signer: &InstanceKey, signer_key_id: String| {
            let payload = pb::ConnectionNoticePayload {
                header: Some(new_header(&routing(), signer_key_id)),
                kind: pb::NoticeKind::KeyRotated.into(),
                new_key: Some(pb::PublicKeyInfo {
                    public_key: new.public_key().spki_der().to_vec(),
                    ..pb::PublicKeyInfo::default()
                }),
                ..pb::ConnectionNoticePayload::default()
            };
            seal(&payload, signer).expect("seal")
        };
        let trusted = current(&old);
        let new_spki = new.public_key().spki_der();
        let genuine = notice(&old, old.public_key().key_id());
        let parsed = parse::<pb::ConnectionNoticePayload>(Some(&genuine)).expect("parse");
        assert!(parsed.proves_rotation_to(new_spki, &trusted, new.public_key(), NOW));
        // Replayed by someone else over their own TLS key.
        assert!(!parsed.proves_rotation_to(new_spki, &trusted, stranger.public_key(), NOW));
        // Naming the old key id but signed by someone else.
        let mut forged = notice(&stranger, old.public_key().key_id());
        forged.key_id = old.public_key().key_id();
        let parsed = parse::<pb::ConnectionNoticePayload>(Some(&forged)).expect("parse");
        assert!(!parsed.proves_rotation_to(new_spki, &trusted, new.public_key(), NOW));
    }

    #[test]
    fn a_compressed_key_in_a_request_is_refused_with_its_reason() {
        let key = InstanceKey::generate().expect("key");
        let spki = key.public_key().spki_der();
        let point = &spki[spki.len() - 65..];
        let mut compressed = vec![
            0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
        ];
        compressed.push(0x02 | (point[64] & 1));
        compressed.extend_from_slice(&point[1..33]);
        let request = pb::ConnectionRequestPayload {
            header: Some(new_header(&routing(), key.public_key().key_id())),
            sender: Some(pb::Instance {
                public_key: compressed,
                ..pb::Instance::default()
            }),
            ..pb::ConnectionRequestPayload::default()
        };
        let sealed = seal(&request, &key).expect("seal");
        let refused = parse::<pb::ConnectionRequestPayload>(Some(&sealed)).expect_err("refused");
        assert!(
            matches!(refused, EnvelopeError::Malformed(_)),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("sender.public_key")
                && refused
                    .to_string()
                    .contains("send the uncompressed form (04 || X || Y)"),
            "{refused}"
        );
    }
}
