//! The relay's settings and bounds. Every queue, wait and count the relay
//! keeps is bounded by a field here or a named constant.

use std::time::Duration;

use ferry_proto::PricePerByte;
use ferry_proto::rate::Rate;

/// How a relay prices and limits its service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The address clients connect to, as advertised (`host:port`).
    pub public_address: String,
    /// Where the relay is, e.g. `eu-west`.
    pub region: String,
    /// The advertised price; with a pricing policy, its starting point.
    pub price_per_byte: PricePerByte,
    /// Optional load-aware pricing between two bounds.
    pub pricing: Option<PricingPolicy>,
    /// Bytes carried ahead of payment, per client key: across all of the
    /// key's sessions, tunnels and channels, and across restarts.
    pub credit_window_bytes: u64,
    /// Advertised capacity, bytes per second; the pricing policy's 100 %.
    pub capacity_bytes_per_sec: u64,
    /// The bounds.
    pub limits: Limits,
    /// How often accepted vouchers are submitted for settlement.
    pub settle_interval: Duration,
    /// How often the relay reports its load to the registry.
    pub heartbeat_interval: Duration,
}

/// Load-aware pricing: the advertised price moves linearly from `min` at
/// zero load to `max` at full capacity, and is re-advertised when it moves
/// by at least 5 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PricingPolicy {
    /// The price when idle.
    pub min: PricePerByte,
    /// The price at capacity.
    pub max: PricePerByte,
}

/// Bounds on what clients may hold and how long anything may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The whole handshake, up to the connection's first purpose frame.
    pub handshake_timeout: Duration,
    /// How long a dial waits for the peer to accept.
    pub pairing_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// How often the relay pings a control session; one silent for three
    /// intervals is closed.
    pub keepalive_interval: Duration,
    /// How long a tunnel waits for a voucher once the credit window is used.
    pub payment_grace: Duration,
    /// How often a session is invoiced for bytes not yet invoiced.
    pub invoice_interval: Duration,
    /// Tunnels one client may have open as the caller.
    pub tunnels_per_client: usize,
    /// Tunnels open at once on the relay (its capacity).
    pub max_tunnels: usize,
    /// Control sessions at once on the relay.
    pub max_sessions: usize,
    /// Connections from one IP address at once (sessions, tunnels and
    /// handshakes in progress).
    pub connections_per_ip: usize,
    /// How long the registry's answer that a channel does not exist is
    /// remembered.
    pub channel_cache_ttl: Duration,
    /// How often a paying session's channel is looked up again, so the
    /// relay learns of a top-up or a close request within this time (while
    /// the known-channel lookups last; see `known_lookups`), and how long
    /// any channel's view is used at all. Keep it well under the registry's
    /// dispute window.
    pub channel_check_interval: Duration,
    /// Lookups of channels the relay has been paid through.
    pub known_lookups: Rate,
    /// Lookups of channels new to the relay, named by any client, in total.
    pub stranger_lookups: Rate,
    /// Lookups of channels new to the relay, per client IP address.
    pub stranger_lookups_per_ip: Rate,
    /// Client keys the debt book holds at once (keys with a session or a
    /// debt); a new key beyond it is refused a session.
    pub max_debtors: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            pairing_timeout: Duration::from_secs(10),
            tunnel_idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            payment_grace: Duration::from_secs(10),
            invoice_interval: Duration::from_secs(1),
            tunnels_per_client: 64,
            max_tunnels: 10_000,
            max_sessions: 100_000,
            connections_per_ip: 256,
            channel_cache_ttl: Duration::from_secs(30),
            channel_check_interval: Duration::from_secs(5),
            // 20 + 10 lookups a second at most: a third of the registry's
            // default per-key rate (100/s), the rest for heartbeats,
            // settlements and advertisements.
            known_lookups: Rate { per_sec: 20, burst: 40 },
            stranger_lookups: Rate { per_sec: 10, burst: 20 },
            stranger_lookups_per_ip: Rate { per_sec: 2, burst: 5 },
            max_debtors: 200_000,
        }
    }
}

impl RelayConfig {
    /// A relay at `public_address` charging `price_per_byte`, with the
    /// default window (1 MiB), capacity (100 MiB/s), intervals and limits.
    pub fn new(public_address: &str, region: &str, price_per_byte: PricePerByte) -> RelayConfig {
        RelayConfig {
            public_address: public_address.to_owned(),
            region: region.to_owned(),
            price_per_byte,
            pricing: None,
            credit_window_bytes: 1 << 20,
            capacity_bytes_per_sec: 100 << 20,
            limits: Limits::default(),
            settle_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
        }
    }
}

impl PricingPolicy {
    /// The price at `load_bytes_per_sec` out of `capacity_bytes_per_sec`.
    pub fn price_at(&self, load_bytes_per_sec: u64, capacity_bytes_per_sec: u64) -> PricePerByte {
        let (min, max) = (self.min.attos(), self.max.attos().max(self.min.attos()));
        let capacity = u128::from(capacity_bytes_per_sec.max(1));
        let load = u128::from(load_bytes_per_sec).min(capacity);
        // (max - min) ≤ 10^18 and load ≤ capacity < 2^64: no overflow.
        let attos = min + (max - min) * load / capacity;
        PricePerByte::from_attos(attos).unwrap_or(self.max)
    }

    /// Whether `new` differs from `old` by at least 5 % of `old`.
    pub fn moved(old: PricePerByte, new: PricePerByte) -> bool {
        old.attos().abs_diff(new.attos()) * 20 >= old.attos().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_follows_utilisation_between_the_bounds() {
        let policy = PricingPolicy {
            min: PricePerByte::from_attos(100).unwrap(),
            max: PricePerByte::from_attos(300).unwrap(),
        };
        assert_eq!(policy.price_at(0, 1000).attos(), 100);
        assert_eq!(policy.price_at(500, 1000).attos(), 200);
        assert_eq!(policy.price_at(1000, 1000).attos(), 300);
        assert_eq!(policy.price_at(5000, 1000).attos(), 300, "capped at capacity");
        assert!(!PricingPolicy::moved(policy.price_at(500, 1000), policy.price_at(520, 1000)));
        assert!(PricingPolicy::moved(policy.price_at(500, 1000), policy.price_at(600, 1000)));
    }
}
