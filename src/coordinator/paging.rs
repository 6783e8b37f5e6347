//! `ListJobs` page tokens: an opaque, URL-safe encoding of where the next page
//! starts and of the filters it was made for, so a token given with other
//! filters is refused instead of silently skipping or repeating jobs.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::{JobCursor, JobFilter};

/// Jobs per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The most jobs one page returns, whatever the request says.
pub const MAX_PAGE_SIZE: u32 = 500;

/// The page size to use for a requested `page_size` (0: the default).
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        requested => requested.min(MAX_PAGE_SIZE),
    }
}

#[derive(Serialize, Deserialize)]
struct Token {
    /// created_at_ms of the last job of the previous page.
    c: i64,
    /// Its id.
    i: String,
    /// Digest of the filters.
    f: String,
}

/// The token for the page after the job `cursor`, under `filter`.
pub fn encode(filter: &JobFilter, cursor: &JobCursor) -> String {
    let token = Token {
        c: cursor.created_at_ms,
        i: cursor.id.clone(),
        f: filter_digest(filter),
    };
    // Serialising a struct of plain fields cannot fail; an empty token would
    // only end the listing early.
    let json = serde_json::to_vec(&token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// The cursor in `token`, if it is a token this module made for `filter`.
pub fn decode(filter: &JobFilter, token: &str) -> Option<JobCursor> {
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let token: Token = serde_json::from_slice(&json).ok()?;
    (token.f == filter_digest(filter)).then_some(JobCursor {
        created_at_ms: token.c,
        id: token.i,
    })
}

fn filter_digest(filter: &JobFilter) -> String {
    let canonical = serde_json::json!([
        filter.state.map(|state| state.as_str()),
        filter.job_type,
        filter.workspace,
        filter.labels,
    ]);
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.to_string().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::state::JobState;

    fn cursor() -> JobCursor {
        JobCursor {
            created_at_ms: 1_700_000_000_000,
            id: "0192-abc".to_owned(),
        }
    }

    #[test]
    fn a_token_round_trips_under_the_same_filters() {
        let filter = JobFilter {
            state: Some(JobState::Running),
            labels: [("team".to_owned(), "red".to_owned())].into(),
            ..JobFilter::default()
        };
        let token = encode(&filter, &cursor());
        assert_eq!(decode(&filter, &token), Some(cursor()));
    }

    #[test]
    fn a_token_is_refused_under_other_filters_or_when_mangled() {
        let filter = JobFilter::default();
        let token = encode(&filter, &cursor());
        let other = JobFilter {
            job_type: Some("deploy".to_owned()),
            ..JobFilter::default()
        };
        assert_eq!(decode(&other, &token), None);
        assert_eq!(decode(&filter, "not a token"), None);
        assert_eq!(decode(&filter, &token[1..]), None);
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(100_000), MAX_PAGE_SIZE);
    }
}
