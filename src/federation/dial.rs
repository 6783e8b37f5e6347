//! Which addresses this instance may dial: allow and deny lists of CIDR ranges,
//! checked against every address a peer URL resolves to, at connect time (so a
//! DNS answer that changes between check and connect cannot slip through).
//!
//! Pure: parsing and matching only. Written here rather than pulled from a crate
//! because it is forty lines over `std::net`.

use std::net::IpAddr;

/// Ranges denied unless the operator configures otherwise: "this network",
/// link-local (which holds the cloud metadata address 169.254.169.254), cloud
/// metadata addresses outside it, multicast and broadcast. Loopback and private
/// ranges stay allowed: meshes often live there.
pub const DEFAULT_DENY: [&str; 8] = [
    "0.0.0.0/8",
    "169.254.0.0/16",
    "100.100.100.200/32",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "fe80::/10",
    "fd00:ec2::254/128",
    "ff00::/8",
];

/// An address range such as `10.0.0.0/8` or `fe80::/10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Parses `ADDRESS/PREFIX` (or a bare address, meaning that one address).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max_len: u8 = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max_len,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|length| *length <= max_len)
                .ok_or_else(|| format!("{text:?} has a prefix length outside 0..={max_len}"))?,
        };
        Ok(Self {
            network,
            prefix_len,
        })
    }

    /// True when `address` is inside the range. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) are compared as the IPv4 address they carry.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => prefix_equal(
                u128::from(u32::from(network)) << 96,
                u128::from(u32::from(address)) << 96,
                self.prefix_len,
            ),
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                prefix_equal(u128::from(network), u128::from(address), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_equal(network: u128, address: u128, prefix_len: u8) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(prefix_len));
    network & mask == address & mask
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.network, self.prefix_len)
    }
}

/// The allow and deny lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialPolicy {
    /// When not empty, only these ranges may be dialed.
    pub allow: Vec<Cidr>,
    /// These ranges are never dialed; deny wins over allow.
    pub deny: Vec<Cidr>,
}

impl Default for DialPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: DEFAULT_DENY
                .iter()
                .filter_map(|range| Cidr::parse(range).ok())
                .collect(),
        }
    }
}

impl DialPolicy {
    /// True when `address` may be dialed.
    pub fn permits(&self, address: IpAddr) -> bool {
        if self.deny.iter().any(|range| range.contains(address)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|range| range.contains(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn the_default_denies_link_local_and_metadata_but_allows_loopback_and_private() {
        let policy = DialPolicy::default();
        for denied in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(!policy.permits(ip(denied)), "{denied}");
        }
        for allowed in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "fd12::1",
            "8.8.8.8",
        ] {
            assert!(policy.permits(ip(allowed)), "{allowed}");
        }
    }

    #[test]
    fn an_allow_list_limits_and_deny_wins() {
        let policy = DialPolicy {
            allow: vec![Cidr::parse("10.0.0.0/8").expect("cidr")],
            deny: vec![Cidr::parse("10.9.0.0/16").expect("cidr")],
        };
        assert!(policy.permits(ip("10.1.1.1")));
        assert!(!policy.permits(ip("10.9.1.1")));
        assert!(!policy.permits(ip("192.168.1.1")));
    }

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            Cidr::parse("10.0.0.0/8").expect("cidr").to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(Cidr::parse("::1").expect("cidr").to_string(), "::1/128");
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains(ip("1.2.3.4"))
        );
        for bad in ["10.0.0.0/33", "fe80::/129", "nonsense", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(!Cidr::parse("10.0.0.0/8").expect("cidr").contains(ip("::1")));
    }
}
