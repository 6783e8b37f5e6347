//! Page tokens of the federation listings (connections, the command log): a
//! `(time, id)` cursor bound to the filters it was made for.

use base64::Engine as _;

use super::FederationError;

/// A token for the page after the entry at `(at_ms, id)` under `filter_key`.
pub fn encode_cursor(at_ms: i64, id: &str, filter_key: &str) -> String {
    let text = format!("{at_ms}\u{1e}{id}\u{1e}{filter_key}");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// The `(at_ms, id)` cursor in `token`, if this server made it for the same
/// `filter_key`; otherwise INVALID_ARGUMENT.
pub fn decode_cursor(token: &str, filter_key: &str) -> Result<(i64, String), FederationError> {
    let invalid = || {
        FederationError::Invalid(
            "page_token was not produced by this server for the same filters".into(),
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '\u{1e}');
    let at_ms = parts
        .next()
        .and_then(|part| part.parse::<i64>().ok())
        .ok_or_else(invalid)?;
    let id = parts.next().ok_or_else(invalid)?.to_owned();
    if parts.next() != Some(filter_key) {
        return Err(invalid());
    }
    Ok((at_ms, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_is_bound_to_its_filters() {
        let token = encode_cursor(2, "id-1", "f");
        assert_eq!(
            decode_cursor(&token, "f").ok(),
            Some((2, "id-1".to_owned()))
        );
        assert!(decode_cursor(&token, "g").is_err());
        assert!(decode_cursor("not base64!", "f").is_err());
    }
}
