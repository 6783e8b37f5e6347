//! The protocol's test vectors (`tests/vectors/`, explained in
//! `docs/PROTOCOL.md`): the crate recomputes every payload, signed byte string,
//! key id and fingerprint in them, verifies every signature with its own
//! verifier and refuses every altered envelope; the Python client checks the
//! same with another crypto library (`cryptography`, on OpenSSL), and its
//! signatures must verify here.
//!
//! The payloads are defined here, so that the bytes in the vectors are the
//! crate's encoding of known messages. To regenerate the computed parts of
//! `tests/vectors/envelopes.json` after changing a payload below (fresh
//! signatures; the hand-written `fields` and descriptions are kept), run this
//! one test with the update switch:
//!
//! ```text
//! MOSAIC_TEST_UPDATE_VECTORS=1 cargo nextest run --test it vectors::every_envelope_vector
//! ```
//!
//! It also makes the test-only private key if the file is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use mosaic_mesh::federation::envelope::{self, EnvelopeError, Payload, PayloadKind};
use mosaic_mesh::identity::{InstanceKey, PublicKey, fingerprint};
use mosaic_mesh::proto::agent as pb_agent;
use mosaic_mesh::proto::federation as pb;
use serde::{Deserialize, Serialize};

use crate::support::python;

/// Set to `1` to rewrite the computed parts of the vectors (see the module doc).
const UPDATE_VARIABLE: &str = "MOSAIC_TEST_UPDATE_VECTORS";
/// The vectors, from the crate root.
const VECTORS_FILE: &str = "tests/vectors/envelopes.json";
/// The test-only private key, from the crate root.
const PRIVATE_KEY_FILE: &str = "tests/vectors/test-only-private-key.pem";
/// What the key file says above the PEM block.
const PRIVATE_KEY_WARNING: &str = "\
TEST ONLY. This ECDSA P-256 private key is published on purpose, with the
protocol test vectors (tests/vectors/envelopes.json, docs/PROTOCOL.md), so
that anyone can check a signer against them. It is not the key of any
instance and must never become one: anything it signs proves nothing.
PKCS#8 v1 DER as ring writes it (the public key inside), PEM-armoured.
";

/// The order of the P-256 group, big-endian: `s` and `n - s` are both valid.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
/// The SubjectPublicKeyInfo prefix of a compressed P-256 point (refused).
const P256_COMPRESSED_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
];

/// The instance that sends the commands and pings in the vectors.
const ALPHA: &str = "0b1e5f0a-6c2d-4e8b-9a37-2f6d1c4b8e01";
/// The instance that runs them and answers.
const BRAVO: &str = "7c9d2e41-3b5a-4f60-8d12-a4e6b9c0f302";
const WORKSPACE: &str = "research";
/// 2026-01-01T00:00:00Z.
const ISSUED_AT_SECONDS: i64 = 1_767_225_600;
/// The default message lifetime, 300 s.
const LIFETIME_SECONDS: i64 = 300;
const SPAWN_MESSAGE_ID: &str = "9b2c6a1e-4f3d-4c8a-b5e7-1d0f2a3b4c5d";
const RESULT_MESSAGE_ID: &str = "c4e8a2f1-7b3d-4e6a-9c1f-3a5b7d9e0f12";
const PING_MESSAGE_ID: &str = "2f7a9c4e-1b6d-4a8f-8e3c-5d7b9a1c3e50";
const WATCH_MESSAGE_ID: &str = "6a1d3f5b-8c2e-4b7a-a9d4-0e2f4a6c8b71";
const EVENTS_MESSAGE_ID: &str = "e1f3a5c7-9b2d-4f6e-8a0c-2b4d6f8a0c93";
const AGENT_ID: &str = "5d41c7e2-8a9b-4c3d-9e0f-1a2b3c4d5e6f";

/// `tests/vectors/envelopes.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Vectors {
    description: Vec<String>,
    domain_prefix: String,
    key: KeyVector,
    key_encodings: Vec<KeyEncoding>,
    fingerprint_spellings: Vec<FingerprintSpelling>,
    envelopes: Vec<EnvelopeVector>,
    altered_envelopes: Vec<AlteredEnvelope>,
}

/// The signing key and what is derived from it.
#[derive(Debug, Serialize, Deserialize)]
struct KeyVector {
    private_key_file: String,
    spki_der_hex: String,
    spki_der_base64: String,
    spki_sha256_hex: String,
    key_id: String,
    fingerprint: String,
}

/// A public key encoding and whether a key field accepts it.
#[derive(Debug, Serialize, Deserialize)]
struct KeyEncoding {
    name: String,
    description: String,
    bytes_hex: String,
    accepted: bool,
}

/// How an operator may type the fingerprint, and whether it matches.
#[derive(Debug, Serialize, Deserialize)]
struct FingerprintSpelling {
    typed: String,
    matches: bool,
}

/// One signed payload as it travels.
#[derive(Debug, Serialize, Deserialize)]
struct EnvelopeVector {
    name: String,
    description: String,
    rpc: String,
    message: String,
    kind: String,
    fields: serde_json::Value,
    payload_hex: String,
    signed_bytes_hex: String,
    key_id: String,
    signature_hex: String,
    valid: bool,
}

/// A vector changed after signing, and what verification must say.
#[derive(Debug, Serialize, Deserialize)]
struct AlteredEnvelope {
    name: String,
    description: String,
    based_on: String,
    message: String,
    kind: String,
    payload_hex: String,
    signature_hex: String,
    valid: bool,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex length: {text}");
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).expect("hex"))
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn read_vectors() -> Vectors {
    let text = std::fs::read_to_string(root().join(VECTORS_FILE)).expect("read the vectors");
    serde_json::from_str(&text).expect("the vectors parse")
}

/// The test-only key from its PEM file (text above the block is ignored).
fn test_key() -> InstanceKey {
    use rustls_pki_types::pem::PemObject as _;
    let pem = std::fs::read(root().join(PRIVATE_KEY_FILE)).expect("read the test-only key");
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("a PKCS#8 PEM");
    InstanceKey::from_pkcs8(zeroize::Zeroizing::new(der.secret_pkcs8_der().to_vec()))
        .expect("a P-256 key ring loads")
}

/// Writes a fresh test-only key; only in update mode, when there is none.
fn write_new_test_key() {
    let rng = ring::rand::SystemRandom::new();
    let document = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .expect("generate a key");
    let mut pem = String::from(PRIVATE_KEY_WARNING);
    pem.push_str("-----BEGIN PRIVATE KEY-----\n");
    for line in base64(document.as_ref()).as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    std::fs::write(root().join(PRIVATE_KEY_FILE), pem).expect("write the test-only key");
}

fn timestamp(seconds_after_issue: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ISSUED_AT_SECONDS + seconds_after_issue,
        nanos: 0,
    }
}

/// A header issued `offset` seconds after 2026-01-01T00:00:00Z, valid 300 s.
fn header(
    message_id: &str,
    sender: &str,
    recipient: &str,
    offset: i64,
    key_id: &str,
) -> pb::EnvelopeHeader {
    pb::EnvelopeHeader {
        message_id: message_id.to_owned(),
        sender_instance_id: sender.to_owned(),
        recipient_instance_id: recipient.to_owned(),
        workspace: WORKSPACE.to_owned(),
        issued_at: Some(timestamp(offset)),
        expires_at: Some(timestamp(offset + LIFETIME_SECONDS)),
        key_id: key_id.to_owned(),
    }
}

/// The agent the spawn started, as bravo reports it to alpha.
fn agent(state: pb_agent::AgentState) -> pb_agent::Agent {
    let ended = state == pb_agent::AgentState::Completed;
    pb_agent::Agent {
        agent_id: AGENT_ID.to_owned(),
        agent_type: "echo".to_owned(),
        state: state.into(),
        prompt: "hello from alpha".to_owned(),
        task_id: "task-42".to_owned(),
        labels: [("team".to_owned(), "blue".to_owned())].into(),
        origin: Some(pb_agent::AgentOrigin {
            kind: pb_agent::AgentOriginKind::Peer.into(),
            instance_id: ALPHA.to_owned(),
            workspace: WORKSPACE.to_owned(),
        }),
        pid: Some(4242),
        exit_code: ended.then_some(0),
        timeout_seconds: 60,
        output_bytes: if ended { 17 } else { 0 },
        created_at: Some(timestamp(0)),
        started_at: Some(timestamp(0)),
        ended_at: ended.then(|| timestamp(2)),
        updated_at: Some(timestamp(if ended { 2 } else { 0 })),
        ..Default::default()
    }
}

/// A vector's name, payload message, kind and encoded payload.
struct Defined {
    name: &'static str,
    message: &'static str,
    kind: PayloadKind,
    payload: Vec<u8>,
}

fn defined<P: Payload>(name: &'static str, message: &'static str, payload: &P) -> Defined {
    Defined {
        name,
        message,
        kind: P::KIND,
        payload: payload.encode_to_vec(),
    }
}

/// The payloads of the vectors, signed by `key_id`. Every map holds one entry,
/// so that the encoding is fixed (prost writes a map in hash order).
fn defined_payloads(key_id: &str) -> Vec<Defined> {
    let spawn = pb::CommandPayload {
        header: Some(header(SPAWN_MESSAGE_ID, ALPHA, BRAVO, 0, key_id)),
        command: Some(pb::command_payload::Command::AgentSpawn(
            pb::AgentSpawnCommand {
                spawn: Some(pb_agent::SpawnRequest {
                    agent_type: "echo".to_owned(),
                    prompt: "hello from alpha".to_owned(),
                    task_id: "task-42".to_owned(),
                    labels: [("team".to_owned(), "blue".to_owned())].into(),
                    timeout_seconds: Some(60),
                }),
            },
        )),
    };
    let result = pb::CommandResultPayload {
        header: Some(header(RESULT_MESSAGE_ID, BRAVO, ALPHA, 1, key_id)),
        command_message_id: SPAWN_MESSAGE_ID.to_owned(),
        outcome: Some(pb::command_result_payload::Outcome::Agent(agent(
            pb_agent::AgentState::Running,
        ))),
    };
    let ping = pb::PingPayload {
        header: Some(header(PING_MESSAGE_ID, ALPHA, BRAVO, 0, key_id)),
    };
    let events = pb::AgentEventsPayload {
        header: Some(header(EVENTS_MESSAGE_ID, BRAVO, ALPHA, 2, key_id)),
        command_message_id: WATCH_MESSAGE_ID.to_owned(),
        first_sequence: 5,
        last_sequence: 7,
        events: vec![
            pb_agent::WatchAgentResponse {
                sequence: 5,
                event: Some(pb_agent::watch_agent_response::Event::OutputLine(
                    pb_agent::AgentOutputLine {
                        stream: pb_agent::AgentOutputStream::Stdout.into(),
                        line: "hello from alpha".to_owned(),
                        at: Some(timestamp(1)),
                    },
                )),
            },
            pb_agent::WatchAgentResponse {
                sequence: 7,
                event: Some(pb_agent::watch_agent_response::Event::StateChange(
                    pb_agent::AgentStateChange {
                        from_state: pb_agent::AgentState::Running.into(),
                        to_state: pb_agent::AgentState::Completed.into(),
                        reason: "exited with code 0".to_owned(),
                        at: Some(timestamp(2)),
                        agent: Some(agent(pb_agent::AgentState::Completed)),
                    },
                )),
            },
        ],
    };
    vec![
        defined(
            "command-agent-spawn",
            "mosaic.federation.v1.CommandPayload",
            &spawn,
        ),
        defined(
            "command-result-agent",
            "mosaic.federation.v1.CommandResultPayload",
            &result,
        ),
        defined("ping", "mosaic.federation.v1.PingPayload", &ping),
        defined(
            "agent-events-batch",
            "mosaic.federation.v1.AgentEventsPayload",
            &events,
        ),
    ]
}

/// Every payload kind, by the ASCII string that is signed.
fn kind_named(name: &str) -> PayloadKind {
    const KINDS: [PayloadKind; 8] = [
        PayloadKind::ConnectionRequest,
        PayloadKind::ConnectionReply,
        PayloadKind::ConnectionNotice,
        PayloadKind::NoticeAck,
        PayloadKind::Command,
        PayloadKind::CommandResult,
        PayloadKind::AgentEvents,
        PayloadKind::Ping,
    ];
    KINDS
        .into_iter()
        .find(|kind| kind.as_str() == name)
        .unwrap_or_else(|| panic!("{name:?} is not a payload kind"))
}

/// Parses `sealed` as `P` and verifies it with `key`, the way a receiver
/// does (the signature's length first, then the header, then the signature
/// over the received bytes); returns the verified header.
fn open_as<P: Payload>(
    kind: &str,
    sealed: &pb::SignedEnvelope,
    key: &PublicKey,
) -> Result<pb::EnvelopeHeader, EnvelopeError> {
    assert_eq!(
        P::KIND.as_str(),
        kind,
        "the vector's kind is the one its message is signed under"
    );
    let parsed = envelope::parse::<P>(Some(sealed))?;
    Ok(parsed.verify_signature(key)?.header)
}

/// [`open_as`] for the payload message named `message`.
fn open(
    message: &str,
    kind: &str,
    sealed: &pb::SignedEnvelope,
    key: &PublicKey,
) -> Result<pb::EnvelopeHeader, EnvelopeError> {
    match message {
        "mosaic.federation.v1.CommandPayload" => open_as::<pb::CommandPayload>(kind, sealed, key),
        "mosaic.federation.v1.CommandResultPayload" => {
            open_as::<pb::CommandResultPayload>(kind, sealed, key)
        }
        "mosaic.federation.v1.PingPayload" => open_as::<pb::PingPayload>(kind, sealed, key),
        "mosaic.federation.v1.NoticeAckPayload" => {
            open_as::<pb::NoticeAckPayload>(kind, sealed, key)
        }
        "mosaic.federation.v1.AgentEventsPayload" => {
            open_as::<pb::AgentEventsPayload>(kind, sealed, key)
        }
        other => panic!("no vector uses {other}"),
    }
}

/// `n - s` of a fixed-length signature: the other valid signature of the
/// same bytes.
fn with_negated_s(signature: &[u8]) -> Vec<u8> {
    let (r, s) = signature.split_at(32);
    let mut negated = [0u8; 32];
    let mut borrow = 0i16;
    for index in (0..32).rev() {
        let mut digit = i16::from(P256_ORDER[index]) - i16::from(s[index]) - borrow;
        borrow = i16::from(digit < 0);
        if digit < 0 {
            digit += 256;
        }
        negated[index] = u8::try_from(digit).expect("a byte");
    }
    assert_eq!(borrow, 0, "s is below the order");
    [r, &negated[..]].concat()
}

/// The same `r` and `s` as an ASN.1 DER `ECDSA-Sig-Value` (which is refused).
fn as_der(signature: &[u8]) -> Vec<u8> {
    fn integer(value: &[u8]) -> Vec<u8> {
        let start = value.iter().position(|&byte| byte != 0).unwrap_or(31);
        let mut digits = value[start..].to_vec();
        if digits[0] & 0x80 != 0 {
            digits.insert(0, 0);
        }
        let mut encoded = vec![0x02, u8::try_from(digits.len()).expect("short")];
        encoded.extend(digits);
        encoded
    }
    let body = [integer(&signature[..32]), integer(&signature[32..])].concat();
    let mut encoded = vec![0x30, u8::try_from(body.len()).expect("short")];
    encoded.extend(body);
    encoded
}

/// The public key as a compressed point in a SubjectPublicKeyInfo.
fn compressed_spki(spki: &[u8]) -> Vec<u8> {
    let point = &spki[spki.len() - 65..];
    let parity = if point[64] & 1 == 1 { 0x03 } else { 0x02 };
    [&P256_COMPRESSED_SPKI_PREFIX[..], &[parity], &point[1..33]].concat()
}

/// Rewrites the computed parts of the vectors from the payloads defined here,
/// with fresh signatures, keeping the descriptions and `fields`.
fn update_vectors() {
    if !root().join(PRIVATE_KEY_FILE).exists() {
        write_new_test_key();
    }
    let key = test_key();
    let public_key = key.public_key();
    let spki = public_key.spki_der();
    let mut vectors = read_vectors();
    vectors.domain_prefix = String::from_utf8(envelope::DOMAIN_PREFIX.to_vec()).expect("ascii");
    vectors.key = KeyVector {
        private_key_file: "test-only-private-key.pem".to_owned(),
        spki_der_hex: hex(spki),
        spki_der_base64: base64(spki),
        spki_sha256_hex: hex(&envelope::digest(spki)),
        key_id: public_key.key_id(),
        fingerprint: public_key.fingerprint(),
    };
    for encoding in &mut vectors.key_encodings {
        encoding.bytes_hex = match encoding.name.as_str() {
            "spki-uncompressed" => hex(spki),
            "spki-compressed" => hex(&compressed_spki(spki)),
            "raw-uncompressed-point" => hex(&spki[spki.len() - 65..]),
            other => panic!("unknown key encoding {other}"),
        };
    }
    let printed = public_key.fingerprint();
    vectors.fingerprint_spellings = vec![
        FingerprintSpelling {
            typed: printed.clone(),
            matches: true,
        },
        FingerprintSpelling {
            typed: printed.to_lowercase(),
            matches: true,
        },
        FingerprintSpelling {
            typed: printed.replace('-', ""),
            matches: true,
        },
        FingerprintSpelling {
            typed: printed.replace('-', " "),
            matches: true,
        },
        FingerprintSpelling {
            typed: printed.replace('-', ":"),
            matches: true,
        },
        FingerprintSpelling {
            typed: printed[..printed.len() - 5].to_owned(),
            matches: false,
        },
        FingerprintSpelling {
            // Another first character: another key.
            typed: format!(
                "{}{}",
                if printed.starts_with('A') { 'B' } else { 'A' },
                &printed[1..]
            ),
            matches: false,
        },
    ];
    for defined in defined_payloads(&public_key.key_id()) {
        let signed = envelope::signed_bytes(defined.kind, &defined.payload);
        let signature = key.sign(&signed).expect("sign");
        let vector = vectors
            .envelopes
            .iter_mut()
            .find(|vector| vector.name == defined.name)
            .unwrap_or_else(|| panic!("the vectors have no entry {} to update", defined.name));
        vector.message = defined.message.to_owned();
        vector.kind = defined.kind.as_str().to_owned();
        vector.payload_hex = hex(&defined.payload);
        vector.signed_bytes_hex = hex(&signed);
        vector.key_id = public_key.key_id();
        vector.signature_hex = hex(&signature);
        vector.valid = true;
    }
    let base = |name: &str| {
        vectors
            .envelopes
            .iter()
            .find(|vector| vector.name == name)
            .map(|vector| (unhex(&vector.payload_hex), unhex(&vector.signature_hex)))
            .unwrap_or_else(|| panic!("no envelope vector {name}"))
    };
    let altered: Vec<(String, Vec<u8>, Vec<u8>, bool)> = vectors
        .altered_envelopes
        .iter()
        .map(|altered| {
            let (mut payload, mut signature) = base(&altered.based_on);
            let valid = match altered.name.as_str() {
                "payload-bit-flipped" => {
                    // The first byte of the workspace: it still decodes and is
                    // still printable, so only the signature can refuse it.
                    let at = payload
                        .windows(WORKSPACE.len())
                        .position(|window| window == WORKSPACE.as_bytes())
                        .expect("the workspace is in the payload");
                    payload[at] ^= 0x01;
                    false
                }
                "signature-bit-flipped" => {
                    signature[40] ^= 0x01;
                    false
                }
                "signed-as-another-kind" => false,
                "signature-in-der" => {
                    signature = as_der(&signature);
                    false
                }
                "signature-with-high-s" => {
                    signature = with_negated_s(&signature);
                    true
                }
                other => panic!("unknown altered envelope {other}"),
            };
            (altered.name.clone(), payload, signature, valid)
        })
        .collect();
    for (name, payload, signature, valid) in altered {
        let entry = vectors
            .altered_envelopes
            .iter_mut()
            .find(|altered| altered.name == name)
            .expect("still there");
        entry.payload_hex = hex(&payload);
        entry.signature_hex = hex(&signature);
        entry.valid = valid;
    }
    let mut text = serde_json::to_string_pretty(&vectors).expect("serialise the vectors");
    text.push('\n');
    let path = root().join(VECTORS_FILE);
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text).expect("write the vectors");
    std::fs::rename(&temporary, &path).expect("replace the vectors");
}

#[test]
fn the_test_key_gives_the_key_id_and_fingerprint_in_the_vectors() {
    let vectors = read_vectors();
    let key = test_key();
    let public_key = key.public_key();
    assert_eq!(hex(public_key.spki_der()), vectors.key.spki_der_hex);
    assert_eq!(base64(public_key.spki_der()), vectors.key.spki_der_base64);
    assert_eq!(
        hex(&envelope::digest(public_key.spki_der())),
        vectors.key.spki_sha256_hex
    );
    // The key id is the first 16 bytes of that digest, in lowercase hex.
    assert_eq!(public_key.key_id(), vectors.key.key_id);
    assert_eq!(
        vectors.key.key_id,
        vectors.key.spki_sha256_hex[..32],
        "the key id is the digest's first half"
    );
    assert_eq!(public_key.fingerprint(), vectors.key.fingerprint);
    assert_eq!(
        fingerprint::fingerprint(&unhex(&vectors.key.spki_der_hex)),
        vectors.key.fingerprint
    );
    // The key read back from its SubjectPublicKeyInfo is the same key.
    let parsed = PublicKey::from_spki_der(&unhex(&vectors.key.spki_der_hex)).expect("the SPKI");
    assert_eq!(&parsed, public_key);
    assert_eq!(
        vectors.domain_prefix.as_bytes(),
        envelope::DOMAIN_PREFIX,
        "the vectors name the crate's domain prefix"
    );
}

#[test]
fn every_envelope_vector_has_the_signed_bytes_and_a_signature_the_crate_verifies() {
    if std::env::var(UPDATE_VARIABLE).is_ok_and(|value| value == "1") {
        update_vectors();
    }
    let vectors = read_vectors();
    let key = test_key();
    let public_key = key.public_key();
    let defined = defined_payloads(&public_key.key_id());
    assert_eq!(
        vectors.envelopes.len(),
        defined.len(),
        "one vector per payload defined here"
    );
    for (vector, defined) in vectors.envelopes.iter().zip(&defined) {
        let name = &vector.name;
        assert_eq!(name, defined.name);
        assert_eq!(vector.message, defined.message, "{name}");
        assert_eq!(vector.kind, defined.kind.as_str(), "{name}");
        // The stored payload is the crate's encoding of the message defined
        // here (the signature covers these bytes, never a re-encoding).
        let payload = unhex(&vector.payload_hex);
        assert_eq!(payload, defined.payload, "{name}: payload bytes");
        // The signed bytes, rebuilt by hand from the documented layout and by
        // the crate.
        let by_hand = [
            envelope::DOMAIN_PREFIX,
            b"\0",
            vector.kind.as_bytes(),
            b"\0",
            &payload,
        ]
        .concat();
        let signed = envelope::signed_bytes(kind_named(&vector.kind), &payload);
        assert_eq!(by_hand, signed, "{name}");
        assert_eq!(
            hex(&signed),
            vector.signed_bytes_hex,
            "{name}: signed bytes"
        );
        let signature = unhex(&vector.signature_hex);
        assert_eq!(signature.len(), 64, "{name}: r || s");
        assert!(vector.valid, "{name}: an envelope vector verifies");
        public_key
            .verify(&signed, &signature)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        // Through the receiver's own path: parsed as the RPC's payload type,
        // verified over the received bytes.
        let sealed = pb::SignedEnvelope {
            payload,
            signature,
            key_id: vector.key_id.clone(),
        };
        let header = open(&vector.message, &vector.kind, &sealed, public_key)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(header.key_id, vectors.key.key_id, "{name}");
        assert_eq!(vector.key_id, vectors.key.key_id, "{name}");
        assert_eq!(header.workspace, WORKSPACE, "{name}");
        assert_eq!(
            vector.fields["header"]["message_id"], header.message_id,
            "{name}: the fields describe this payload"
        );
        assert_eq!(vector.fields["header"]["key_id"], header.key_id, "{name}");
        // And the crate's own signature of the same bytes verifies too (ECDSA
        // is randomised: it is another signature, equally valid).
        let fresh = key.sign(&signed).expect("sign");
        public_key
            .verify(&signed, &fresh)
            .expect("a fresh signature");
    }
}

#[test]
fn altered_envelopes_are_refused_as_the_vectors_say() {
    let vectors = read_vectors();
    let public_key = test_key().public_key().clone();
    assert!(
        vectors
            .altered_envelopes
            .iter()
            .filter(|altered| !altered.valid)
            .count()
            >= 4,
        "the vectors hold refusals"
    );
    for altered in &vectors.altered_envelopes {
        let name = &altered.name;
        let base = vectors
            .envelopes
            .iter()
            .find(|vector| vector.name == altered.based_on)
            .unwrap_or_else(|| panic!("{name}: no vector {}", altered.based_on));
        assert!(
            altered.payload_hex != base.payload_hex
                || altered.signature_hex != base.signature_hex
                || altered.kind != base.kind,
            "{name}: altered in some way"
        );
        let payload = unhex(&altered.payload_hex);
        let signature = unhex(&altered.signature_hex);
        let signed = envelope::signed_bytes(kind_named(&altered.kind), &payload);
        let by_key = public_key.verify(&signed, &signature);
        let sealed = pb::SignedEnvelope {
            payload,
            signature,
            key_id: public_key.key_id(),
        };
        let by_receiver = open(&altered.message, &altered.kind, &sealed, &public_key);
        assert_eq!(by_key.is_ok(), altered.valid, "{name}: {by_key:?}");
        assert_eq!(
            by_receiver.is_ok(),
            altered.valid,
            "{name}: {by_receiver:?}"
        );
        if name == "signature-in-der" {
            // Refused as malformed (INVALID_ARGUMENT) before any verification.
            assert!(
                matches!(by_receiver, Err(EnvelopeError::Malformed(_))),
                "{name}: {by_receiver:?}"
            );
        } else if !altered.valid {
            assert_eq!(
                by_receiver.map(|_| ()),
                Err(EnvelopeError::BadSignature),
                "{name}"
            );
        }
    }
}

#[test]
fn only_an_uncompressed_p256_subject_public_key_info_is_a_key() {
    let vectors = read_vectors();
    let key = test_key();
    let spki = key.public_key().spki_der();
    assert!(
        vectors
            .key_encodings
            .iter()
            .any(|encoding| encoding.accepted)
    );
    assert!(
        vectors
            .key_encodings
            .iter()
            .any(|encoding| !encoding.accepted)
    );
    for encoding in &vectors.key_encodings {
        let bytes = unhex(&encoding.bytes_hex);
        let expected = match encoding.name.as_str() {
            "spki-uncompressed" => spki.to_vec(),
            "spki-compressed" => compressed_spki(spki),
            "raw-uncompressed-point" => spki[spki.len() - 65..].to_vec(),
            other => panic!("unknown key encoding {other}"),
        };
        assert_eq!(bytes, expected, "{}: the test key's bytes", encoding.name);
        assert_eq!(
            PublicKey::from_spki_der(&bytes).is_ok(),
            encoding.accepted,
            "{}",
            encoding.name
        );
    }
}

#[test]
fn fingerprint_spellings_match_as_the_vectors_say() {
    let vectors = read_vectors();
    let spki = unhex(&vectors.key.spki_der_hex);
    assert!(vectors.fingerprint_spellings.len() >= 5);
    for spelling in &vectors.fingerprint_spellings {
        assert_eq!(
            fingerprint::matches(&spelling.typed, &spki),
            spelling.matches,
            "{:?}",
            spelling.typed
        );
    }
}

#[test]
fn the_protocol_document_names_every_payload_kind_and_the_domain_prefix() {
    let document =
        std::fs::read_to_string(root().join("docs/PROTOCOL.md")).expect("read docs/PROTOCOL.md");
    for kind in [
        PayloadKind::ConnectionRequest,
        PayloadKind::ConnectionReply,
        PayloadKind::ConnectionNotice,
        PayloadKind::NoticeAck,
        PayloadKind::Command,
        PayloadKind::CommandResult,
        PayloadKind::AgentEvents,
        PayloadKind::Ping,
    ] {
        assert!(
            document.contains(&format!("`{}`", kind.as_str())),
            "docs/PROTOCOL.md does not name the payload kind {}",
            kind.as_str()
        );
    }
    let prefix = std::str::from_utf8(envelope::DOMAIN_PREFIX).expect("ascii");
    assert!(document.contains(prefix));
    assert!(document.contains(VECTORS_FILE));
}

/// The interpreter of [`python::python_with_grpcio`] with `cryptography`
/// too. `MOSAIC_TEST_PYTHON` must already have it (`.ci/run` installs it);
/// the virtualenv the tests make for themselves gets it here, once, under the
/// same lock file.
fn python_with_cryptography() -> PathBuf {
    let python = python::python_with_grpcio();
    let has_it = |python: &Path| {
        Command::new(python)
            .args(["-c", "import cryptography"])
            .status()
            .is_ok_and(|status| status.success())
    };
    if has_it(&python) {
        return python;
    }
    assert!(
        std::env::var_os(python::PYTHON_VARIABLE).is_none_or(|value| value.is_empty()),
        "{} ({}) cannot import cryptography; install it there (`.ci/run` does)",
        python::PYTHON_VARIABLE,
        python.display()
    );
    let lock = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-grpcio.lock");
    python::take_lock(&lock);
    if !has_it(&python) {
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "cryptography",
            ])
            .status();
        let _ = std::fs::remove_file(&lock);
        assert!(
            installed.is_ok_and(|status| status.success()),
            "pip install cryptography failed"
        );
    } else {
        let _ = std::fs::remove_file(&lock);
    }
    python
}

/// The Python client's report (`examples/python/check_vectors.py`).
#[derive(Debug, Deserialize)]
struct PythonReport {
    key_id: String,
    fingerprint: String,
    envelopes_verified: Vec<String>,
    altered_refused: Vec<String>,
    altered_accepted: Vec<String>,
    key_encodings_checked: usize,
    fingerprint_spellings_checked: usize,
    signatures: Vec<PythonSignature>,
}

/// A signature the Python client made with the test-only key.
#[derive(Debug, Deserialize)]
struct PythonSignature {
    name: String,
    signature_hex: String,
}

#[test]
fn the_python_client_checks_the_vectors_with_openssl_and_its_signatures_verify_here() {
    let python = python_with_cryptography();
    let script = root().join("examples/python/check_vectors.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(root().join("tests/vectors"))
        .output()
        .expect("run the python check");
    assert!(
        output.status.success(),
        "the python check failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: PythonReport = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the python check printed no report ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let vectors = read_vectors();
    assert_eq!(report.key_id, vectors.key.key_id);
    assert_eq!(report.fingerprint, vectors.key.fingerprint);
    let names = |valid: bool| -> Vec<String> {
        vectors
            .altered_envelopes
            .iter()
            .filter(|altered| altered.valid == valid)
            .map(|altered| altered.name.clone())
            .collect()
    };
    let all: Vec<String> = vectors
        .envelopes
        .iter()
        .map(|vector| vector.name.clone())
        .collect();
    assert_eq!(report.envelopes_verified, all);
    assert_eq!(report.altered_refused, names(false));
    assert_eq!(report.altered_accepted, names(true));
    assert_eq!(report.key_encodings_checked, vectors.key_encodings.len());
    assert_eq!(
        report.fingerprint_spellings_checked,
        vectors.fingerprint_spellings.len()
    );
    // What OpenSSL signed, ring verifies.
    let public_key = test_key().public_key().clone();
    assert_eq!(report.signatures.len(), vectors.envelopes.len());
    for signed in &report.signatures {
        let vector = vectors
            .envelopes
            .iter()
            .find(|vector| vector.name == signed.name)
            .unwrap_or_else(|| panic!("python signed an unknown vector {}", signed.name));
        let signature = unhex(&signed.signature_hex);
        assert_ne!(signature, unhex(&vector.signature_hex), "a fresh signature");
        let sealed = pb::SignedEnvelope {
            payload: unhex(&vector.payload_hex),
            signature,
            key_id: vector.key_id.clone(),
        };
        open(&vector.message, &vector.kind, &sealed, &public_key).unwrap_or_else(|error| {
            panic!(
                "{}: python's signature does not verify: {error}",
                vector.name
            )
        });
    }
}
