//! Listen addresses as operators write them: `IP:PORT`, `[IPv6]:PORT`, or
//! `localhost:PORT`, for `listen` and `metrics_listen` in the file, their flags
//! and their `MOSAIC_*` variables alike.
//!
//! `localhost` is the one host name accepted, and it means 127.0.0.1 (IPv4
//! loopback, the default's family). Other names are refused rather than
//! resolved: what a name resolves to can change between `config check` and
//! `serve`, may be several addresses of which only one could be bound, and would
//! let the loopback-only check of `--plaintext` be passed by a name that later
//! points elsewhere.

use std::net::{Ipv4Addr, SocketAddr};

/// The one host name a listen address may use.
const LOCALHOST: &str = "localhost";

/// Parses a listen address; the error says what to write instead.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    let trimmed = text.trim();
    if let Ok(address) = trimmed.parse::<SocketAddr>() {
        return Ok(address);
    }
    let Some((host, port)) = trimmed.rsplit_once(':') else {
        return Err(format!(
            "{text:?} has no port; write IP:PORT, e.g. 127.0.0.1:7443 (or localhost:7443)"
        ));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} in {text:?} is not a port (0 to 65535)"))?;
    if host.eq_ignore_ascii_case(LOCALHOST) {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{text:?}: put an IPv6 address in brackets, e.g. [::1]:{port}"
        ));
    }
    Err(format!(
        "{host:?} in {text:?} is not an IP address; host names are not resolved (except localhost, meaning 127.0.0.1): use e.g. 127.0.0.1:{port} for this host only or 0.0.0.0:{port} for every interface"
    ))
}

/// serde's side of [`parse_listen_address`], for the file's `Option` fields
/// (used with `#[serde(default)]`).
pub(super) fn deserialize_optional<'de, D>(deserializer: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text: Option<String> = serde::Deserialize::deserialize(deserializer)?;
    text.map(|text| parse_listen_address(&text).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_localhost_parse() {
        assert_eq!(
            parse_listen_address("127.0.0.1:7443"),
            Ok("127.0.0.1:7443".parse().expect("address"))
        );
        assert_eq!(
            parse_listen_address("[::1]:7443"),
            Ok("[::1]:7443".parse().expect("address"))
        );
        for text in ["localhost:7451", "LocalHost:7451", " localhost:7451 "] {
            assert_eq!(
                parse_listen_address(text),
                Ok("127.0.0.1:7451".parse().expect("address")),
                "{text}"
            );
        }
    }

    #[test]
    fn everything_else_is_refused_with_what_to_write() {
        for (text, hint) in [
            ("bogus", "no port"),
            ("localhost", "no port"),
            ("localhost:http", "not a port"),
            ("localhost:70000", "not a port"),
            ("example.org:7443", "not resolved"),
            ("::1:7443", "brackets"),
        ] {
            let error = parse_listen_address(text).expect_err(text);
            assert!(error.contains(hint), "{text}: {error}");
        }
    }
}
