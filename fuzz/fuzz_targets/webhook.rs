//! Fuzz target: a webhook delivery (body, signature, event type, delivery id,
//! headers) against a source's configuration, through `coordinator::jobs::
//! webhook_job` — the size and text checks, the HMAC-SHA256 signature check and
//! the event mapping that `HandleWebhook` runs before its one write. Half the
//! inputs carry the right signature, so the mapping and payload code runs too.
#![no_main]
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mosaic_mesh::config::{Secret, WebhookSource, DEFAULT_MAX_PAYLOAD_BYTES};
use mosaic_mesh::coordinator::jobs::{webhook_job, Delivery};
use mosaic_mesh::coordinator::webhook;
use mosaic_mesh_fuzz::NOW_MS;

#[derive(Arbitrary, Debug)]
struct Input {
    source: String,
    secret: Option<String>,
    job_type: Option<String>,
    workspace: String,
    events: Vec<(String, String)>,
    event_type: String,
    delivery_id: String,
    body: Vec<u8>,
    /// Sign the body with the source's secret instead of using `signature`.
    sign: bool,
    signature: String,
    headers: Vec<(String, String)>,
}

fuzz_target!(|input: Input| {
    // The config refuses an empty secret, so a source has a non-empty one or none.
    let secret = input.secret.filter(|secret| !secret.is_empty());
    let source = WebhookSource {
        secret: secret
            .clone()
            .map(|secret| Secret(zeroize::Zeroizing::new(secret))),
        job_type: input.job_type,
        workspace: input.workspace,
        events: input.events.into_iter().collect(),
    };
    let signature = match (&secret, input.sign) {
        (Some(secret), true) => webhook::sign(secret.as_bytes(), &input.body),
        _ => input.signature,
    };
    let delivery = Delivery {
        source: input.source,
        event_type: input.event_type,
        delivery_id: input.delivery_id,
        body: input.body,
        signature,
        headers: input.headers.into_iter().collect::<BTreeMap<_, _>>(),
    };
    if let Some(secret) = &secret {
        let verdict =
            webhook::verify_signature(secret.as_bytes(), &delivery.body, &delivery.signature);
        if input.sign {
            assert_eq!(verdict, Ok(()), "a signature made with the secret verifies");
        }
    }
    let Ok(made) = webhook_job(&delivery, &source, DEFAULT_MAX_PAYLOAD_BYTES, NOW_MS) else {
        return;
    };
    let Some((job, creation)) = made else {
        // Only an event the source maps to an empty job type is ignored.
        assert_eq!(
            source.events.get(&delivery.event_type).map(String::as_str),
            Some("")
        );
        return;
    };
    assert_eq!(creation.job_id, job.id);
    assert_eq!(job.workspace, source.workspace);
    let payload: serde_json::Value =
        serde_json::from_str(&job.payload_json).expect("the job payload is JSON");
    let headers = payload["headers"]
        .as_object()
        .expect("headers is an object");
    for dropped in [
        "authorization",
        "cookie",
        "proxy-authorization",
        "x-api-key",
    ] {
        assert!(
            !headers.contains_key(dropped),
            "credential header {dropped} kept"
        );
    }
    assert_eq!(payload["delivery_id"], delivery.delivery_id.as_str());
});
