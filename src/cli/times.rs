//! How the CLI prints a time for a person: RFC 3339 UTC to the second, `-`
//! when there is none.

use crate::clock::ms_from_timestamp;

/// `2026-11-23T22:00:29Z`, or `-` when unset.
pub fn time_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map_or_else(|| "-".to_owned(), |at| ms_text(ms_from_timestamp(at)))
}

/// An epoch-milliseconds time as RFC 3339 UTC, to the second.
pub fn ms_text(ms: i64) -> String {
    u64::try_from(ms).map_or_else(
        |_| "-".to_owned(),
        |ms| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_seconds(at).to_string()
        },
    )
}
