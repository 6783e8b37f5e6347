//! Fuzz target: a federation envelope as it arrives, through the receiver's
//! checks in order (decode, header, recipient, key, clock, signature) and the
//! caller's `open_reply`, for every payload kind. Half the inputs are signed with
//! the fixed key, so the signature check passes and the code behind it runs too.
#![no_main]
#![forbid(unsafe_code)]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mosaic_mesh::federation::envelope::{self, Payload};
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh_fuzz::{envelope_for, fixed_key, trusted, ME, NOW_MS, PEER, WINDOW_MS, WORKSPACE};
use prost::Message;

/// The header fields, so the fuzzer reaches past the well-formedness checks
/// without having to invent protobuf framing first.
#[derive(Arbitrary, Debug)]
struct Header {
    message_id: String,
    sender_instance_id: String,
    recipient_instance_id: String,
    workspace: String,
    issued_at: Option<(i64, i32)>,
    expires_at: Option<(i64, i32)>,
    key_id: String,
    /// Use the fixed key's id instead of `key_id`.
    fixed_key_id: bool,
}

#[derive(Arbitrary, Debug)]
enum PayloadBytes {
    /// Bytes exactly as given.
    Raw(Vec<u8>),
    /// An encoded header, then further fields as given (they decode as the
    /// kind's own fields, or as unknown fields).
    Framed { header: Header, tail: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    payload: PayloadBytes,
    sign: bool,
    signature: Vec<u8>,
    key_id: String,
    now_offset_ms: i32,
}

fn timestamp(pair: Option<(i64, i32)>) -> Option<prost_types::Timestamp> {
    pair.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
}

fn payload_bytes(payload: PayloadBytes) -> Vec<u8> {
    match payload {
        PayloadBytes::Raw(bytes) => bytes,
        PayloadBytes::Framed { header, tail } => {
            let header = pb::EnvelopeHeader {
                message_id: header.message_id,
                sender_instance_id: header.sender_instance_id,
                recipient_instance_id: header.recipient_instance_id,
                workspace: header.workspace,
                issued_at: timestamp(header.issued_at),
                expires_at: timestamp(header.expires_at),
                key_id: if header.fixed_key_id {
                    fixed_key().public_key().key_id()
                } else {
                    header.key_id
                },
            };
            let mut bytes = pb::PingPayload {
                header: Some(header),
            }
            .encode_to_vec();
            bytes.extend_from_slice(&tail);
            bytes
        }
    }
}

fn check<P: Payload>(input: Input) {
    let now = NOW_MS.saturating_add(i64::from(input.now_offset_ms));
    let sealed = envelope_for(
        P::KIND,
        payload_bytes(input.payload),
        input.sign,
        input.signature,
        input.key_id,
    );
    let trusted = trusted();
    let reply = envelope::open_reply::<P>(Some(&sealed), ME, PEER, WORKSPACE, &trusted, now);
    let Ok(parsed) = envelope::parse::<P>(Some(&sealed)) else {
        assert!(reply.is_err(), "open_reply accepted what parse refused");
        return;
    };
    let header = parsed.header().clone();
    let _ = parsed.check_recipient(ME);
    let _ = parsed.check_time(now, WINDOW_MS);
    let known = parsed.check_key(&trusted, fixed_key().public_key(), now);
    let Ok(key) = known else {
        assert!(reply.is_err(), "open_reply accepted an unknown key");
        return;
    };
    let verified = parsed.verify_signature(&key);
    if input.sign {
        // An honest signature over the bytes as sent always verifies.
        let verified = verified.expect("a payload signed with the fixed key verifies");
        assert_eq!(verified.header, header);
        assert_eq!(verified.digest, envelope::digest(&sealed.payload));
    } else {
        // Anything else would be a forgery: a signature not made with the key.
        assert!(
            verified.is_err(),
            "a signature not made with the fixed key verified"
        );
    }
}

fuzz_target!(|input: Input| {
    match input.kind % 7 {
        0 => check::<pb::ConnectionRequestPayload>(input),
        1 => check::<pb::ConnectionReplyPayload>(input),
        2 => check::<pb::ConnectionNoticePayload>(input),
        3 => check::<pb::NoticeAckPayload>(input),
        4 => check::<pb::CommandPayload>(input),
        5 => check::<pb::CommandResultPayload>(input),
        _ => check::<pb::PingPayload>(input),
    }
});
