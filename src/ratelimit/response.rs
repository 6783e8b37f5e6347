//! What a client sees: the `x-ratelimit-*` headers on every response, and for a
//! refused call RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`, `QuotaFailure` and
//! `ErrorInfo` details plus `retry-after` and `grpc-retry-pushback-ms` metadata.

use std::collections::HashMap;

use http::{HeaderName, HeaderValue};
use tonic_types::{ErrorDetails, StatusExt};

use super::decision::{QuotaState, Refusal};

/// `ErrorInfo.reason` of every rate-limit refusal.
pub const REASON_RATE_LIMITED: &str = "RATE_LIMITED";
/// `ErrorInfo.domain`.
pub const ERROR_DOMAIN: &str = "mosaicd";

/// Calls per window of the tightest quota the call counted against.
pub const HEADER_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// Calls left in that quota.
pub const HEADER_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// Whole seconds until that quota is whole again (rounded up).
pub const HEADER_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn whole_seconds_rounded_up(duration: std::time::Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Writes the `x-ratelimit-*` headers. On every admitted call: the names
/// are constants, so none is parsed per call.
///
/// The remaining calls and the reset change from one response to the next,
/// so they are sent as never-indexed literals: HTTP/2's header compression
/// would otherwise add each new value to the connection's table, searching
/// every earlier value of the header first, for a value that is never sent
/// again (about 3 % of the daemon's CPU in `bench_calls`). The limit, the same
/// on every response of a tier, stays indexed and costs a byte or two.
pub fn write_quota_headers(headers: &mut http::HeaderMap, state: &QuotaState) {
    headers.insert(HEADER_LIMIT, HeaderValue::from(state.limit));
    headers.insert(HEADER_REMAINING, never_indexed(state.remaining.into()));
    headers.insert(
        HEADER_RESET,
        never_indexed(whole_seconds_rounded_up(state.reset)),
    );
}

/// `value` as a header value HTTP/2 sends as a literal, never adding it to
/// the connection's header table.
fn never_indexed(value: u64) -> HeaderValue {
    let mut value = HeaderValue::from(value);
    value.set_sensitive(true);
    value
}

/// The status of a refused call (its metadata is added by [`refusal_response`]).
pub fn refusal_status(refusal: &Refusal) -> tonic::Status {
    let subject = refusal.key.subject();
    let window_secs = refusal.window.as_secs();
    let description = format!(
        "{} tier: {} calls per {} s",
        refusal.tier, refusal.limit, window_secs
    );
    let mut details = ErrorDetails::new();
    details
        .set_retry_info(Some(refusal.retry_after))
        .add_quota_failure_violation(subject.clone(), description)
        .set_error_info(
            REASON_RATE_LIMITED,
            ERROR_DOMAIN,
            HashMap::from([
                ("tier".to_owned(), refusal.tier.as_str().to_owned()),
                ("limit".to_owned(), refusal.limit.to_string()),
                ("window_seconds".to_owned(), window_secs.to_string()),
            ]),
        );
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "rate limit exceeded for {subject} ({} tier, {} calls per {window_secs} s); retry in {} s",
            refusal.tier,
            refusal.limit,
            refusal.retry_after_secs()
        ),
        details,
    )
}

/// The whole HTTP response of a refused call.
pub fn refusal_response(refusal: &Refusal) -> http::Response<tonic::body::Body> {
    let mut response = refusal_status(refusal).into_http();
    let headers = response.headers_mut();
    headers.insert("retry-after", HeaderValue::from(refusal.retry_after_secs()));
    let pushback_ms = u64::try_from(refusal.retry_after.as_millis()).unwrap_or(u64::MAX);
    headers.insert(
        "grpc-retry-pushback-ms",
        HeaderValue::from(pushback_ms.max(1)),
    );
    write_quota_headers(headers, &refusal.quota_state());
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ratelimit::key::LimitKey;
    use crate::ratelimit::tiers::Tier;

    #[test]
    fn refusals_carry_every_detail_and_round_numbers_up() {
        let refusal = Refusal {
            key: LimitKey::ApiKey("key-7".into()),
            tier: Tier::Webhook,
            limit: 60,
            window: Duration::from_secs(60),
            retry_after: Duration::from_millis(250),
        };
        let status = refusal_status(&refusal);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay),
            Some(Duration::from_millis(250))
        );
        let violations = status
            .get_details_quota_failure()
            .expect("quota failure")
            .violations;
        assert_eq!(violations[0].subject, "api_key:key-7");
        assert!(violations[0].description.contains("webhook"));
        assert_eq!(
            status.get_details_error_info().expect("error info").reason,
            REASON_RATE_LIMITED
        );
        let response = refusal_response(&refusal);
        let headers = response.headers();
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["grpc-retry-pushback-ms"], "250");
        assert_eq!(headers[HEADER_REMAINING], "0");
        assert_eq!(headers[HEADER_LIMIT], "60");
        assert_eq!(headers[HEADER_RESET], "1");
    }

    #[test]
    fn only_the_values_that_change_per_call_are_kept_out_of_the_header_table() {
        let mut headers = http::HeaderMap::new();
        let state = QuotaState {
            limit: 600,
            remaining: 597,
            reset: Duration::from_millis(300),
        };
        write_quota_headers(&mut headers, &state);
        assert_eq!(headers[HEADER_LIMIT], "600");
        assert_eq!(headers[HEADER_REMAINING], "597");
        assert_eq!(headers[HEADER_RESET], "1");
        assert!(!headers[HEADER_LIMIT].is_sensitive());
        assert!(headers[HEADER_REMAINING].is_sensitive());
        assert!(headers[HEADER_RESET].is_sensitive());
    }
}
