//! The incoming-network filter (CIDR lists or any network), applied before TLS.
//!
//! Hyper-V's "incoming live migration networks" setting: a host accepts migration connections
//! only from the listed networks, or from any network. vmgate applies the filter to the peer
//! address of every accepted TCP connection before a single byte of TLS is read, so a peer
//! outside the allowed networks costs the host one `accept` and one `close`.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Errors of this module: a network that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetfilterError {
    /// The text is not `ADDRESS/PREFIX` or a plain address.
    #[error("\"{text}\" is not a network in CIDR notation (such as 10.0.0.0/24 or fd00::/64)")]
    ParseNetwork {
        /// The text that was given.
        text: String,
    },
    /// The prefix length is larger than the address.
    #[error("the prefix length in \"{text}\" is larger than {max} bits")]
    PrefixTooLong {
        /// The text that was given.
        text: String,
        /// The largest prefix for this address family.
        max: u8,
    },
    /// The address has bits set beyond the prefix (10.0.0.1/24): probably a typo.
    #[error("\"{text}\" has host bits set beyond the prefix; did you mean {network}?")]
    HostBitsSet {
        /// The text that was given.
        text: String,
        /// The network with the host bits cleared.
        network: String,
    },
    /// An empty list: use "any" to allow every network.
    #[error("the list of allowed networks is empty; write \"any\" to allow every network")]
    EmptyList,
}

/// One network in CIDR notation, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack socket reports) count as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        IpAddr::V4(_) => ip,
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// The network `address/prefix`; fails when the prefix is too long or host bits are set.
    pub fn new(address: IpAddr, prefix: u8) -> Result<Cidr, NetfilterError> {
        let text = format!("{address}/{prefix}");
        let address = canonical(address);
        let network = match address {
            IpAddr::V4(v4) => {
                if prefix > 32 {
                    return Err(NetfilterError::PrefixTooLong { text, max: 32 });
                }
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix)))
            }
            IpAddr::V6(v6) => {
                if prefix > 128 {
                    return Err(NetfilterError::PrefixTooLong { text, max: 128 });
                }
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix)))
            }
        };
        if network != address {
            return Err(NetfilterError::HostBitsSet {
                text,
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Cidr { network, prefix })
    }

    /// A single host (`/32` or `/128`).
    pub fn host(address: IpAddr) -> Cidr {
        let network = canonical(address);
        let prefix = if network.is_ipv4() { 32 } else { 128 };
        Cidr { network, prefix }
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = NetfilterError;

    fn from_str(text: &str) -> Result<Cidr, NetfilterError> {
        let parse_err = || NetfilterError::ParseNetwork {
            text: text.to_owned(),
        };
        let trimmed = text.trim();
        match trimmed.split_once('/') {
            None => trimmed
                .parse::<IpAddr>()
                .map(Cidr::host)
                .map_err(|_| parse_err()),
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| parse_err())?;
                // Digits only: "+8" or " 8" are typos, not prefixes.
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(parse_err());
                }
                let prefix: u8 = prefix.parse().map_err(|_| NetfilterError::PrefixTooLong {
                    text: text.to_owned(),
                    max: if addr.is_ipv4() { 32 } else { 128 },
                })?;
                // A mapped address keeps its IPv6 prefix meaning only if it is > 96.
                let (addr, prefix) = match addr {
                    IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && prefix >= 96 => {
                        (addr, prefix - 96)
                    }
                    IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                        return Err(parse_err());
                    }
                    _ => (addr, prefix),
                };
                Cidr::new(addr, prefix).map_err(|e| match e {
                    NetfilterError::HostBitsSet { network, .. } => NetfilterError::HostBitsSet {
                        text: text.to_owned(),
                        network,
                    },
                    NetfilterError::PrefixTooLong { max, .. } => NetfilterError::PrefixTooLong {
                        text: text.to_owned(),
                        max,
                    },
                    other => other,
                })
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Which peers may open a connection at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkFilter {
    /// Every network ("use any available network for live migration").
    Any,
    /// Only these networks (never empty).
    Networks(Vec<Cidr>),
}

impl NetworkFilter {
    /// A filter from a list of networks; an empty list is an error (say "any" instead).
    pub fn networks(list: Vec<Cidr>) -> Result<NetworkFilter, NetfilterError> {
        if list.is_empty() {
            return Err(NetfilterError::EmptyList);
        }
        Ok(NetworkFilter::Networks(list))
    }

    /// Parses `any`, or networks separated by commas and/or white space.
    pub fn parse_list<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<NetworkFilter, NetfilterError> {
        let mut list = Vec::new();
        for item in items {
            for part in item.split(|c: char| c == ',' || c.is_whitespace()) {
                if part.is_empty() {
                    continue;
                }
                if part.eq_ignore_ascii_case("any") {
                    return Ok(NetworkFilter::Any);
                }
                list.push(part.parse::<Cidr>()?);
            }
        }
        NetworkFilter::networks(list)
    }

    /// Whether a connection from `peer` may proceed to TLS.
    pub fn allows(&self, peer: IpAddr) -> bool {
        match self {
            NetworkFilter::Any => true,
            NetworkFilter::Networks(list) => list.iter().any(|n| n.contains(peer)),
        }
    }
}

impl FromStr for NetworkFilter {
    type Err = NetfilterError;

    fn from_str(s: &str) -> Result<NetworkFilter, NetfilterError> {
        NetworkFilter::parse_list([s])
    }
}

impl fmt::Display for NetworkFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkFilter::Any => f.write_str("any"),
            NetworkFilter::Networks(list) => {
                for (i, n) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{n}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_networks_contain_their_hosts_only() {
        let n: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("127.0.0.12")));
        assert!(n.contains(ip("127.255.255.255")));
        assert!(!n.contains(ip("128.0.0.1")));
        assert!(!n.contains(ip("::1")));
        let h: Cidr = "127.0.0.11".parse().unwrap();
        assert_eq!(h.to_string(), "127.0.0.11/32");
        assert!(h.contains(ip("127.0.0.11")));
        assert!(!h.contains(ip("127.0.0.12")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("10.1.2.3")));
        assert!(!all.contains(ip("fe80::1")));
    }

    #[test]
    fn v6_and_mapped_addresses() {
        let n: Cidr = "fd00:1::/32".parse().unwrap();
        assert!(n.contains(ip("fd00:1:2::3")));
        assert!(!n.contains(ip("fd00:2::1")));
        let v4: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(
            v4.contains(ip("::ffff:127.0.0.5")),
            "a dual-stack socket's mapped peer"
        );
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn bad_networks_are_refused_with_a_hint() {
        assert_eq!(
            "10.0.0.1/24".parse::<Cidr>(),
            Err(NetfilterError::HostBitsSet {
                text: "10.0.0.1/24".into(),
                network: "10.0.0.0/24".into()
            })
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(NetfilterError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            "10.0.0.0/999".parse::<Cidr>(),
            Err(NetfilterError::PrefixTooLong { .. })
        ));
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "hv1/8",
            "::ffff:1.2.3.4/8",
        ] {
            assert!(
                matches!(
                    bad.parse::<Cidr>(),
                    Err(NetfilterError::ParseNetwork { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn filter_lists_and_any() {
        let f: NetworkFilter = "127.0.0.11/32, 127.0.0.12 10.0.0.0/8".parse().unwrap();
        assert!(f.allows(ip("127.0.0.11")));
        assert!(f.allows(ip("127.0.0.12")));
        assert!(f.allows(ip("10.9.9.9")));
        assert!(!f.allows(ip("127.0.0.13")));
        assert_eq!(f.to_string(), "127.0.0.11/32,127.0.0.12/32,10.0.0.0/8");
        let any: NetworkFilter = "ANY".parse().unwrap();
        assert!(any.allows(ip("203.0.113.9")));
        assert_eq!(
            " , ".parse::<NetworkFilter>(),
            Err(NetfilterError::EmptyList)
        );
    }
}
