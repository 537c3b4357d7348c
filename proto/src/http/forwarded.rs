//! Which address a request comes from when it arrives through proxies.
//!
//! The TCP peer is the client unless it is one of the operator's trusted
//! proxies. Then the client is named by the one forwarding header the
//! operator's proxies write: walking that header's addresses from the right
//! (the nearest hop first), the first one that is not itself a trusted
//! proxy. Addresses further left were written by the client and prove
//! nothing; headers from peers that are not trusted are ignored, so no
//! client can choose the address it is limited as.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::rate::unmapped;

/// The most trusted proxy networks one server takes.
pub const MAX_TRUSTED_PROXIES: usize = 64;
/// The most forwarded addresses looked at in one request: a chain of
/// proxies is a few hops; beyond this the nearest trusted hop counts as the
/// client.
pub const MAX_FORWARDED_HOPS: usize = 16;

/// The client's address for a request: the TCP peer or, behind a trusted
/// proxy, the address the proxies forwarded. Servers insert it into every
/// request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The header a deployment's proxies write the client's address into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, Caddy,
    /// most load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(text: &str) -> Result<ForwardedHeader, String> {
        match text.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err(format!("{text:?} is neither x-forwarded-for nor forwarded")),
        }
    }
}

/// The proxies whose forwarding header is believed, and which header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Arc<[IpNet]>,
    header: ForwardedHeader,
}

/// Why a list of trusted proxies was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedProxiesError {
    /// An entry is neither an address nor a network.
    #[error("{0:?} is not an IP address or network (such as 10.0.0.0/8 or 2001:db8::/32)")]
    Invalid(String),
    /// More entries than [`MAX_TRUSTED_PROXIES`].
    #[error("at most {MAX_TRUSTED_PROXIES} trusted proxy networks")]
    TooMany,
}

impl TrustedProxies {
    /// Trusts the addresses and networks in `entries` (`10.0.0.5`,
    /// `10.0.0.0/8`, `::1`), reading `header`.
    pub fn new<S: AsRef<str>>(
        entries: &[S],
        header: ForwardedHeader,
    ) -> Result<TrustedProxies, TrustedProxiesError> {
        if entries.len() > MAX_TRUSTED_PROXIES {
            return Err(TrustedProxiesError::TooMany);
        }
        let networks = entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|network| network.trunc())
                    .map_err(|_| TrustedProxiesError::Invalid(entry.to_owned()))
            })
            .collect::<Result<Arc<[IpNet]>, _>>()?;
        Ok(TrustedProxies { networks, header })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        self.networks.iter().any(|network| network.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientIp {
        let mut client = unmapped(peer.ip());
        if !self.contains(client) {
            return ClientIp(client);
        }
        let (name, parse): (&str, fn(&str) -> Option<IpAddr>) = match self.header {
            ForwardedHeader::XForwardedFor => ("x-forwarded-for", parse_x_forwarded_for),
            ForwardedHeader::Forwarded => ("forwarded", parse_forwarded_element),
        };
        // Split on the raw bytes: a proxy appends the address it saw to
        // the client's own value on one line, and a byte the client wrote
        // that is not text must spoil only the client's entries, not the
        // proxy's.
        let hops: Vec<Option<IpAddr>> = headers
            .get_all(name)
            .iter()
            .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
            .map(|entry| std::str::from_utf8(entry).ok().and_then(parse))
            .collect();
        for hop in hops.into_iter().rev().take(MAX_FORWARDED_HOPS) {
            // An entry that names no address (`unknown`, an obfuscated
            // identifier, garbage) ends the walk: the hop that forwarded
            // it is the nearest address known.
            let Some(hop) = hop.map(unmapped) else { break };
            client = hop;
            if !self.contains(hop) {
                break;
            }
        }
        ClientIp(client)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_x_forwarded_for(entry: &str) -> Option<IpAddr> {
    parse_node(entry.trim())
}

/// The `for=` address of one `Forwarded` element (`for=192.0.2.60;proto=https`,
/// `for="[2001:db8::1]:4711"`).
fn parse_forwarded_element(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        parse_node(value)
    })
}

/// An address, an address with a port, or a bracketed IPv6 address with or
/// without a port.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(address) = node.parse::<SocketAddr>() {
        return Some(address.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40_000)
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> ClientIp {
        ClientIp(text.parse().unwrap())
    }

    #[test]
    fn a_peer_that_is_not_trusted_is_the_client_whatever_it_claims() {
        let none = TrustedProxies::default();
        let spoofed = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(none.client_ip(peer("198.51.100.1"), &spoofed), ip("198.51.100.1"));
        let other = TrustedProxies::new(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor).unwrap();
        assert_eq!(other.client_ip(peer("198.51.100.1"), &spoofed), ip("198.51.100.1"));
    }

    #[test]
    fn behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() {
        let proxies =
            TrustedProxies::new(&["10.0.0.0/8", "::1"], ForwardedHeader::XForwardedFor).unwrap();
        // The client wrote 203.0.113.9 itself; the outer proxy 10.1.1.1 saw
        // 198.51.100.7 and the inner one saw the outer one.
        let chain = headers("x-forwarded-for", &["203.0.113.9, 198.51.100.7", "10.1.1.1"]);
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &chain), ip("198.51.100.7"));
        assert_eq!(proxies.client_ip(peer("::1"), &chain), ip("198.51.100.7"));
        // No header: the proxy itself.
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &HeaderMap::new()), ip("10.2.2.2"));
        // Ports and brackets.
        let ported = headers("x-forwarded-for", &["[2001:db8::1]:4711"]);
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &ported), ip("2001:db8::1"));
        // The Forwarded header is not read when the proxies write X-Forwarded-For.
        let other_header = headers("forwarded", &["for=198.51.100.7"]);
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &other_header), ip("10.2.2.2"));
    }

    #[test]
    fn forwarded_elements_name_the_client_by_their_for_parameter() {
        let proxies = TrustedProxies::new(&["10.0.0.0/8"], ForwardedHeader::Forwarded).unwrap();
        let chain = headers(
            "forwarded",
            &["for=203.0.113.9, for=\"[2001:db8::7]:4711\";proto=https", "By=x;For=10.1.1.1"],
        );
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &chain), ip("2001:db8::7"));
        // An obfuscated or unknown hop ends the walk at the proxy that wrote it.
        let hidden = headers("forwarded", &["for=198.51.100.7, for=_hidden"]);
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &hidden), ip("10.2.2.2"));
        let spoofed = headers("x-forwarded-for", &["198.51.100.7"]);
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &spoofed), ip("10.2.2.2"));
    }

    #[test]
    fn a_byte_that_is_not_text_spoils_only_the_entry_it_is_in() {
        let proxies = TrustedProxies::new(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor).unwrap();
        // nginx appends the address it saw to the client's value, on one line.
        let mut map = HeaderMap::new();
        map.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9\x80, 198.51.100.7").unwrap(),
        );
        assert_eq!(proxies.client_ip(peer("10.2.2.2"), &map), ip("198.51.100.7"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        let proxies = TrustedProxies::new(&["127.0.0.1"], ForwardedHeader::XForwardedFor).unwrap();
        let chain = headers("x-forwarded-for", &["::ffff:198.51.100.7"]);
        assert_eq!(proxies.client_ip(peer("::ffff:127.0.0.1"), &chain), ip("198.51.100.7"));
    }

    #[test]
    fn proxy_lists_are_parsed_strictly_and_bounded() {
        let header = ForwardedHeader::XForwardedFor;
        assert!(TrustedProxies::new(&["10.0.0.0/33"], header).is_err());
        assert!(TrustedProxies::new(&["proxy.example"], header).is_err());
        let many = vec!["10.0.0.1"; MAX_TRUSTED_PROXIES + 1];
        assert_eq!(TrustedProxies::new(&many, header), Err(TrustedProxiesError::TooMany));
        let host_bits = TrustedProxies::new(&["10.1.2.3/8"], header).unwrap();
        assert!(host_bits.contains("10.200.0.1".parse().unwrap()));
        assert_eq!("Forwarded".parse(), Ok(ForwardedHeader::Forwarded));
        assert!("x-real-ip".parse::<ForwardedHeader>().is_err());
    }

    proptest! {
        /// Whatever the headers say, the client is the peer or one of the
        /// addresses written in the header that is read.
        #[test]
        fn the_client_is_the_peer_or_a_forwarded_address(
            values in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::sample::select(b"0123456789abcdef:.,[] =;\"_\x80\xff".to_vec()),
                    0..60,
                ),
                0..4,
            ),
        ) {
            let proxies = TrustedProxies::new(&["127.0.0.0/8"], ForwardedHeader::XForwardedFor)
                .unwrap();
            let mut map = HeaderMap::new();
            for value in &values {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    map.append("x-forwarded-for", value);
                }
            }
            let ClientIp(client) = proxies.client_ip(peer("127.0.0.1"), &map);
            let written: Vec<IpAddr> = values
                .iter()
                .flat_map(|value| value.split(|byte| *byte == b','))
                .filter_map(|entry| std::str::from_utf8(entry).ok().and_then(parse_x_forwarded_for))
                .map(unmapped)
                .collect();
            prop_assert!(client == "127.0.0.1".parse::<IpAddr>().unwrap() || written.contains(&client));
        }
    }
}
