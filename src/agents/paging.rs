//! ListAgents page tokens: an opaque string naming where the next page starts
//! and which filters it belongs to, so a token is refused with other filters.
//! Pure: no I/O.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::model::AgentFilter;
use crate::store::AgentCursor;

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 500;

const TOKEN_VERSION: &str = "v1";

/// The page size to use for a requested one (0: the default).
pub fn effective_page_size(requested: u32) -> usize {
    match usize::try_from(requested) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(size) => size.min(MAX_PAGE_SIZE),
        Err(_) => MAX_PAGE_SIZE,
    }
}

/// A token for the page after `cursor` under `filter`.
pub fn encode_token(cursor: &AgentCursor, filter: &AgentFilter) -> String {
    let text = format!(
        "{TOKEN_VERSION}|{}|{}|{}",
        filter_digest(filter),
        cursor.created_at_ms,
        cursor.id
    );
    URL_SAFE_NO_PAD.encode(text)
}

/// The cursor in `token`, if this server made it for the same `filter`.
pub fn decode_token(token: &str, filter: &AgentFilter) -> Result<AgentCursor, String> {
    let refused = || "page_token was not produced by this server for these filters".to_owned();
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| refused())?;
    let text = String::from_utf8(bytes).map_err(|_| refused())?;
    let mut parts = text.splitn(4, '|');
    let (Some(version), Some(digest), Some(created_at_ms), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused());
    };
    if version != TOKEN_VERSION || digest != filter_digest(filter) || id.is_empty() {
        return Err(refused());
    }
    let created_at_ms = created_at_ms.parse().map_err(|_| refused())?;
    Ok(AgentCursor {
        created_at_ms,
        id: id.to_owned(),
    })
}

/// A short digest of the filters, stable across runs of this version.
fn filter_digest(filter: &AgentFilter) -> String {
    let canonical = serde_json::json!([
        filter.state.map(|state| state.as_str()),
        filter.agent_type,
        filter.origin_kind.map(|kind| kind.as_str()),
        filter.origin_instance_id,
        filter.origin_workspace,
        filter.labels,
    ])
    .to_string();
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::AgentState;

    fn cursor() -> AgentCursor {
        AgentCursor {
            created_at_ms: 1_763_900_000_000,
            id: "0199-abc|with-bar".to_owned(),
        }
    }

    #[test]
    fn a_token_round_trips_under_the_same_filters() {
        let filter = AgentFilter {
            state: Some(AgentState::Running),
            ..AgentFilter::default()
        };
        let token = encode_token(&cursor(), &filter);
        assert_eq!(decode_token(&token, &filter), Ok(cursor()));
    }

    #[test]
    fn a_token_is_refused_with_other_filters_or_when_malformed() {
        let token = encode_token(&cursor(), &AgentFilter::default());
        let other = AgentFilter {
            agent_type: Some("sh".to_owned()),
            ..AgentFilter::default()
        };
        assert!(decode_token(&token, &other).is_err());
        for bad in ["", "!!", "djE", &URL_SAFE_NO_PAD.encode("v1|x|1|id")] {
            assert!(
                decode_token(bad, &AgentFilter::default()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(effective_page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(effective_page_size(7), 7);
        assert_eq!(effective_page_size(u32::MAX), MAX_PAGE_SIZE);
    }
}
