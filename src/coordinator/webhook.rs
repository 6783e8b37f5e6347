//! Webhook deliveries: checking a delivery's HMAC-SHA256 signature, choosing
//! the job type for its event, and wrapping it into a job payload. Pure logic:
//! no I/O.

use std::collections::BTreeMap;

use crate::config::WebhookSource;

/// The prefix of a signature in the format GitHub and others send
/// (`X-Hub-Signature-256: sha256=HEX`).
const SIGNATURE_PREFIX: &str = "sha256=";

/// Headers never stored with a job: they carry credentials of the hop that
/// forwarded the delivery, not data for the agent.
const DROPPED_HEADERS: [&str; 4] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
];

/// Why a signature was refused. The messages say what is wrong without
/// revealing anything about the secret or the expected value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The source has a secret and the delivery carries no signature.
    #[error("the delivery has no signature; this source requires `sha256=HEX` over the body")]
    Missing,
    /// Not `sha256=` followed by 64 hexadecimal digits.
    #[error("the signature is not in the form `sha256=HEX`")]
    Malformed,
    /// Well formed, but not the body's HMAC under the source's secret.
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Checks `signature` (`sha256=HEX`) against the HMAC-SHA256 of `body` under
/// `secret`, in constant time (`ring::hmac::verify`).
pub fn verify_signature(secret: &[u8], body: &[u8], signature: &str) -> Result<(), SignatureError> {
    let signature = signature.trim();
    if signature.is_empty() {
        return Err(SignatureError::Missing);
    }
    let hex = signature
        .strip_prefix(SIGNATURE_PREFIX)
        .ok_or(SignatureError::Malformed)?;
    let tag = decode_hex(hex).ok_or(SignatureError::Malformed)?;
    if tag.len() != ring::digest::SHA256_OUTPUT_LEN {
        return Err(SignatureError::Malformed);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

/// `sha256=HEX` for `body` under `secret`: what a sender puts in the
/// signature (used by tests and tools that forward deliveries).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{SIGNATURE_PREFIX}{hex}")
}

/// The job type a delivery of `event_type` from `source_name` becomes, or
/// `None` when the source's configuration ignores the event.
///
/// An event listed in the source's `events` table uses its job type there (an
/// empty job type ignores it); any other event uses the source's `job_type`,
/// or else `SOURCE.EVENT`.
pub fn job_type_for(source_name: &str, source: &WebhookSource, event_type: &str) -> Option<String> {
    match source.events.get(event_type) {
        Some(job_type) if job_type.is_empty() => None,
        Some(job_type) => Some(job_type.clone()),
        None => Some(source.job_type.clone().unwrap_or_else(|| {
            if event_type.is_empty() {
                source_name.to_owned()
            } else {
                format!("{source_name}.{event_type}")
            }
        })),
    }
}

/// The payload of a webhook job: the delivery's metadata and its body as a
/// JSON value. `None` if the body is not a JSON document (an empty body
/// becomes `null`).
pub fn job_payload(
    source_name: &str,
    event_type: &str,
    delivery_id: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> Option<String> {
    let body: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).ok()?
    };
    let headers: BTreeMap<String, &String> = headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .filter(|(name, _)| !DROPPED_HEADERS.contains(&name.as_str()))
        .collect();
    let payload = serde_json::json!({
        "source": source_name,
        "event_type": event_type,
        "delivery_id": delivery_id,
        "headers": headers,
        "body": body,
    });
    Some(payload.to_string())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            u8::try_from(high * 16 + low).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_made_with_the_secret_verifies() {
        let signature = sign(b"s3cret", b"{\"a\":1}");
        assert!(signature.starts_with("sha256="));
        assert_eq!(
            verify_signature(b"s3cret", b"{\"a\":1}", &signature),
            Ok(())
        );
        assert_eq!(
            verify_signature(
                b"s3cret",
                b"{\"a\":1}",
                &signature.to_uppercase().replace("SHA256=", "sha256=")
            ),
            Ok(())
        );
    }

    #[test]
    fn github_documented_example_verifies() {
        // From GitHub's "Validating webhook deliveries" documentation.
        assert_eq!(
            verify_signature(
                b"It's a Secret to Everybody",
                b"Hello, World!",
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
            ),
            Ok(())
        );
    }

    #[test]
    fn wrong_missing_and_malformed_signatures_are_refused() {
        let signature = sign(b"s3cret", b"body");
        assert_eq!(
            verify_signature(b"other", b"body", &signature),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"s3cret", b"body!", &signature),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"s3cret", b"body", ""),
            Err(SignatureError::Missing)
        );
        for malformed in [
            "sha1=abcd",
            "sha256=",
            "sha256=zz",
            "sha256=abc",
            &signature[..signature.len() - 2],
            &signature["sha256=".len()..],
        ] {
            assert_eq!(
                verify_signature(b"s3cret", b"body", malformed),
                Err(SignatureError::Malformed),
                "{malformed}"
            );
        }
    }

    fn source(job_type: Option<&str>, events: &[(&str, &str)]) -> WebhookSource {
        WebhookSource {
            secret: None,
            job_type: job_type.map(str::to_owned),
            workspace: String::new(),
            events: events
                .iter()
                .map(|(event, job_type)| ((*event).to_owned(), (*job_type).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn events_map_to_job_types_by_rule_then_default() {
        let configured = source(Some("triage"), &[("pull_request", "review"), ("ping", "")]);
        assert_eq!(
            job_type_for("github", &configured, "pull_request").as_deref(),
            Some("review")
        );
        assert_eq!(job_type_for("github", &configured, "ping"), None);
        assert_eq!(
            job_type_for("github", &configured, "issues").as_deref(),
            Some("triage")
        );
        let bare = source(None, &[]);
        assert_eq!(
            job_type_for("github", &bare, "push").as_deref(),
            Some("github.push")
        );
        assert_eq!(job_type_for("github", &bare, "").as_deref(), Some("github"));
    }

    #[test]
    fn the_payload_wraps_the_body_and_drops_credential_headers() {
        let headers: BTreeMap<String, String> = [
            ("X-GitHub-Event".to_owned(), "push".to_owned()),
            ("Authorization".to_owned(), "Bearer hunter2".to_owned()),
        ]
        .into();
        let payload = job_payload("github", "push", "d-1", &headers, b"{\"ref\":\"main\"}")
            .expect("json body");
        let value: serde_json::Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(value["body"]["ref"], "main");
        assert_eq!(value["headers"]["x-github-event"], "push");
        assert_eq!(value["delivery_id"], "d-1");
        assert!(!payload.contains("hunter2"));
        assert_eq!(
            job_payload("github", "push", "", &BTreeMap::new(), b"  ").map(|payload| {
                serde_json::from_str::<serde_json::Value>(&payload).expect("json")["body"].clone()
            }),
            Some(serde_json::Value::Null)
        );
        assert_eq!(
            job_payload("github", "push", "", &BTreeMap::new(), b"not json"),
            None
        );
    }
}
