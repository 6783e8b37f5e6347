//! Shared pieces of the fuzz targets: the fixed signing key, the routing the
//! receiver expects, and a helper that signs a payload the way a peer would, so a
//! target can reach the code behind the signature check as well as the checks.
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use mosaic_mesh::federation::envelope::{self, PayloadKind, TrustedKey};
use mosaic_mesh::identity::InstanceKey;
use mosaic_mesh::proto::federation as pb;

/// The receiver's instance id in every target.
pub const ME: &str = "receiver";
/// The sender's instance id a signed reply is opened for.
pub const PEER: &str = "sender";
/// The workspace a reply is opened for.
pub const WORKSPACE: &str = "w";
/// "Now" in every target (epoch ms), so a run is reproducible.
pub const NOW_MS: i64 = 1_800_000_000_000;
/// The receiver's clock window (the daemon's default, 5 minutes).
pub const WINDOW_MS: i64 = 300_000;

/// A fixed P-256 key (PKCS#8 v1 DER, made with `openssl genpkey` for the fuzz
/// targets only; it signs nothing outside them).
const FIXED_PKCS8_HEX: &str = "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420d89b18289cdf27ebcc549c78516886466a798ae8bdcee09c7de2c726201673dca14403420004df3b4e7f9e452083059dbe1dbd99adee85e80aa6ec9984ee2044d3c0f7327d7605523515f16e33aa7e63d3ac4a5d88551119a8f23309204e5acb4b9ee8647ff9";

/// The fixed key, loaded once.
pub fn fixed_key() -> &'static InstanceKey {
    static KEY: OnceLock<InstanceKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let der: Vec<u8> = (0..FIXED_PKCS8_HEX.len())
            .step_by(2)
            .map(|index| {
                u8::from_str_radix(&FIXED_PKCS8_HEX[index..index + 2], 16).expect("hex constant")
            })
            .collect();
        InstanceKey::from_pkcs8(zeroize::Zeroizing::new(der)).expect("the fixed key loads")
    })
}

/// The fixed key as the sender's one trusted (current) key.
pub fn trusted() -> Vec<TrustedKey> {
    vec![TrustedKey {
        key: fixed_key().public_key().clone(),
        valid_until_ms: None,
    }]
}

/// An envelope carrying `payload` as it arrived. With `sign`, the signature and
/// key id are the fixed key's over the bytes under `kind` (what an honest peer
/// sends); otherwise they are the fuzzer's.
pub fn envelope_for(
    kind: PayloadKind,
    payload: Vec<u8>,
    sign: bool,
    signature: Vec<u8>,
    key_id: String,
) -> pb::SignedEnvelope {
    if sign {
        let key = fixed_key();
        let signature = key
            .sign(&envelope::signed_bytes(kind, &payload))
            .expect("signing with the fixed key");
        pb::SignedEnvelope {
            payload,
            signature,
            key_id: key.public_key().key_id(),
        }
    } else {
        pb::SignedEnvelope {
            payload,
            signature,
            key_id,
        }
    }
}
