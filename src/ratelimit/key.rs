//! Who a limit is counted against: the client IP (IPv6 grouped by /64), a
//! validated API key's id, or a federated instance named by its verified TLS key.
//!
//! Pure: the client address comes from the connection, and `X-Forwarded-For` /
//! `Forwarded` are believed only when the connection comes from a configured
//! trusted proxy, taking the rightmost hop that is not itself a trusted proxy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::auth::Caller;

/// One bucket owner. Cheap to clone (the strings are shared).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// A client address: IPv4 as is, IPv6 truncated to its /64 network (one
    /// subscriber usually holds a whole /64, so per-address limits mean nothing).
    Ip(IpAddr),
    /// A validated API key, by its id (never the key itself).
    ApiKey(Arc<str>),
    /// A federated instance, by the key id of its verified TLS certificate.
    Instance(Arc<str>),
    /// The shared bucket of new keys that arrive while the in-memory store is at
    /// its key cap: they are limited together instead of growing memory.
    Overflow,
}

impl LimitKey {
    /// The client-IP key of `address` (IPv6 grouped by /64, IPv4-mapped IPv6
    /// treated as the IPv4 address it is).
    pub fn for_ip(address: IpAddr) -> LimitKey {
        LimitKey::Ip(group_address(address))
    }

    /// The subject shown to clients in `QuotaFailure` and used in Redis keys:
    /// `ip:203.0.113.7`, `ip:2001:db8:1:2::/64`, `api_key:<id>`, `instance:<key id>`.
    pub fn subject(&self) -> String {
        match self {
            LimitKey::Ip(IpAddr::V4(address)) => format!("ip:{address}"),
            LimitKey::Ip(IpAddr::V6(network)) => format!("ip:{network}/64"),
            LimitKey::ApiKey(id) => format!("api_key:{id}"),
            LimitKey::Instance(key_id) => format!("instance:{key_id}"),
            LimitKey::Overflow => "overflow:new-clients".to_owned(),
        }
    }
}

impl LimitKey {
    /// The key of an authenticated caller: the API key's id, or the key id of the
    /// verified TLS certificate (until peering maps it to an instance id). None
    /// for anonymous callers, who are limited by IP alone.
    pub fn for_caller(caller: &Caller) -> Option<LimitKey> {
        match caller {
            Caller::Anonymous => None,
            Caller::ApiKey { id, .. } => Some(LimitKey::ApiKey(Arc::clone(id))),
            Caller::PeerCertificate(public_key) => {
                Some(LimitKey::Instance(Arc::from(public_key.key_id())))
            }
        }
    }
}

fn group_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

/// An address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix_length: u8,
}

impl IpRange {
    /// Whether `address` lies in the range (IPv4-mapped IPv6 matches IPv4 ranges).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            IpAddr::V4(_) => address,
        };
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR range"))?;
        let maximum = if network.is_ipv4() { 32 } else { 128 };
        let prefix_length = match prefix {
            None => maximum,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|length| *length <= maximum)
                .ok_or_else(|| format!("{text:?} has a prefix length outside 0..={maximum}"))?,
        };
        Ok(IpRange {
            network,
            prefix_length,
        })
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: Vec<IpRange>,
}

impl TrustedProxies {
    /// Trusts exactly these ranges (none: every forwarding header is ignored).
    pub fn new(ranges: Vec<IpRange>) -> Self {
        Self { ranges }
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(address))
    }

    /// The client address of a call that arrived from `peer`: `peer` itself,
    /// unless `peer` is a trusted proxy, in which case the forwarding chain is
    /// walked from the right, skipping trusted proxies, to the first hop that is
    /// not one. `Forwarded` (RFC 7239) is preferred over `X-Forwarded-For`. A hop
    /// that does not parse ends the walk at the last address we could believe, so
    /// a malformed header cannot move a client into someone else's bucket.
    pub fn client_address(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_hops(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(address) = hop else {
                return client;
            };
            client = *address;
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

/// Every hop named by the forwarding headers, left to right; `None` marks a hop
/// that does not parse (including `unknown` and obfuscated identifiers).
fn forwarded_hops(headers: &http::HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all(http::header::FORWARDED)
        .iter()
        .map(|value| value.to_str().unwrap_or("\u{0}"))
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|value| value.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, node)| parse_node(node.trim().trim_matches('"')))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("\u{0}").split(','))
        .map(|hop| parse_node(hop.trim()))
        .collect()
}

/// Parses `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]`, `[2001:db8::1]:80` or `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(address) = node.parse::<IpAddr>() {
        return Some(address);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        return inside.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("header"));
        }
        map
    }

    fn proxies(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            ranges
                .iter()
                .map(|range| range.parse().expect("range"))
                .collect(),
        )
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            LimitKey::for_ip(address("2001:db8:1:2:aaaa::1")),
            LimitKey::for_ip(address("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            LimitKey::for_ip(address("2001:db8:1:2::1")),
            LimitKey::for_ip(address("2001:db8:1:3::1"))
        );
        assert_eq!(
            LimitKey::for_ip(address("2001:db8:1:2:aaaa::1")).subject(),
            "ip:2001:db8:1:2::/64"
        );
        assert_eq!(
            LimitKey::for_ip(address("::ffff:203.0.113.9")).subject(),
            "ip:203.0.113.9"
        );
    }

    #[test]
    fn ranges_parse_and_match() {
        let range: IpRange = "10.0.0.0/8".parse().expect("range");
        assert!(range.contains(address("10.200.1.1")));
        assert!(range.contains(address("::ffff:10.1.1.1")));
        assert!(!range.contains(address("11.0.0.1")));
        let single: IpRange = "192.0.2.1".parse().expect("range");
        assert!(single.contains(address("192.0.2.1")));
        assert!(!single.contains(address("192.0.2.2")));
        let everything: IpRange = "::/0".parse().expect("range");
        assert!(everything.contains(address("2001:db8::1")));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129", ""] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarding_headers_from_untrusted_peers_are_ignored() {
        let peer = address("198.51.100.7");
        let spoofed = headers(&[("x-forwarded-for", "203.0.113.1")]);
        assert_eq!(proxies(&[]).client_address(peer, &spoofed), peer);
        assert_eq!(
            proxies(&["10.0.0.0/8"]).client_address(peer, &spoofed),
            peer
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = address("10.0.0.1");
        // The client prepended a lie; the first proxy appended the real address.
        let chain = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.5, 10.0.0.2")]);
        assert_eq!(trusted.client_address(peer, &chain), address("203.0.113.5"));
        // Several header lines form one list.
        let split = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ]);
        assert_eq!(trusted.client_address(peer, &split), address("203.0.113.5"));
        // Only proxies in the chain: the leftmost is as far as we can see.
        let all_proxies = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.2")]);
        assert_eq!(
            trusted.client_address(peer, &all_proxies),
            address("10.9.9.9")
        );
        // No header: the proxy itself.
        assert_eq!(trusted.client_address(peer, &headers(&[])), peer);
    }

    #[test]
    fn forwarded_is_preferred_and_parsed_with_ports_and_brackets() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = address("10.0.0.1");
        let both = headers(&[
            (
                "forwarded",
                "for=192.0.2.60;proto=https, for=\"[2001:db8::7]:4711\"",
            ),
            ("x-forwarded-for", "203.0.113.99"),
        ]);
        assert_eq!(trusted.client_address(peer, &both), address("2001:db8::7"));
        let with_port = headers(&[("forwarded", "for=192.0.2.60:8080")]);
        assert_eq!(
            trusted.client_address(peer, &with_port),
            address("192.0.2.60")
        );
    }

    #[test]
    fn an_unparseable_hop_stops_at_the_last_believable_address() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = address("10.0.0.1");
        let garbage = headers(&[("x-forwarded-for", "203.0.113.5, not-an-ip")]);
        assert_eq!(trusted.client_address(peer, &garbage), peer);
        let unknown = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(trusted.client_address(peer, &unknown), peer);
    }
}
