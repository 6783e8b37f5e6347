//! A database or Redis URL as it may be shown: in errors, logs and
//! `config check`, without the password it may carry.

/// `url` without user name, password and query (which may carry a password):
/// `postgres://db.example:5432/mosaic`.
pub fn url_without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, _)) => (before, true),
        None => (rest, false),
    };
    let (location, credentials) = match before_query.rsplit_once('@') {
        Some((_, location)) => (location, true),
        None => (before_query, false),
    };
    let hidden = match (credentials, query) {
        (true, true) => " (credentials and options not shown)",
        (true, false) => " (credentials not shown)",
        (false, true) => " (options not shown)",
        (false, false) => "",
    };
    format!("{scheme}://{location}{hidden}")
}
