//! A rate limiter per client (an IP address, a key): the registry limits
//! its callers with it, and a relay rations the registry calls that
//! strangers can make it spend.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most clients (IPs or keys) one limiter tracks. When it is full, a
/// new client is refused until a tracked one has been idle long enough to be
/// forgotten; this bounds the limiter's memory under a flood of addresses.
pub const MAX_TRACKED_CLIENTS: usize = 100_000;

/// The address a client is limited as, by every per-IP bound (rates and
/// connections): an IPv4 address itself, also when it arrives over IPv6 as
/// `::ffff:a.b.c.d`; an IPv6 address by its /64, the network one host or
/// one customer is usually given, so that a host cannot pass a per-address
/// bound by rotating through its addresses (or fill a limiter's table).
pub fn ip_bucket(ip: IpAddr) -> IpAddr {
    match unmapped(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// An IPv4 address reached over IPv6 (`::ffff:10.0.0.1`) is that IPv4
/// address, so one client has one address whichever socket it came through.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A sustained rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained; 0 turns the limit off.
    pub per_sec: u32,
    /// Requests that may come at once after a quiet spell.
    pub burst: u32,
}

/// A generic cell rate limiter (GCRA) per client: each client has a
/// theoretical arrival time that every admitted request pushes one interval
/// later; a request is refused when that time runs more than the burst ahead.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    clients: Mutex<Clients<K>>,
}

#[derive(Debug)]
struct Clients<K> {
    arrival: HashMap<K, Instant>,
    last_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// A limiter admitting each client at `rate`.
    pub fn new(rate: Rate) -> RateLimiter<K> {
        RateLimiter {
            rate,
            clients: Mutex::new(Clients { arrival: HashMap::new(), last_sweep: None }),
        }
    }

    /// Admits one request from `client` at `now`, or says how long to wait.
    pub fn check(&self, client: K, now: Instant) -> Result<(), Duration> {
        if self.rate.per_sec == 0 {
            return Ok(());
        }
        let interval = Duration::from_secs(1) / self.rate.per_sec;
        let burst = interval * self.rate.burst.max(1);
        // A poisoned lock only means another request panicked mid-update;
        // the map is still a valid (if slightly stale) set of times.
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if clients.arrival.len() >= MAX_TRACKED_CLIENTS && !clients.arrival.contains_key(&client) {
            // Forget clients whose arrival time has passed: they are owed a
            // full burst, exactly as if never seen. Sweep at most once per
            // second so a full table does not cost a scan per request.
            if clients.last_sweep.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                clients.arrival.retain(|_, arrival| *arrival > now);
                clients.last_sweep = Some(now);
            }
            if clients.arrival.len() >= MAX_TRACKED_CLIENTS {
                return Err(Duration::from_secs(1));
            }
        }
        let arrival = clients.arrival.get(&client).copied().unwrap_or(now).max(now);
        let next = arrival + interval;
        if next.duration_since(now) > burst {
            return Err(next.duration_since(now) - burst);
        }
        clients.arrival.insert(client, next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_ipv6_host_is_one_bucket_per_64_and_ipv4_is_itself() {
        use super::ip_bucket;
        let bucket = |text: &str| ip_bucket(text.parse().unwrap());
        assert_eq!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(
            bucket("2001:db8:1:2::1"),
            "2001:db8:1:2::".parse::<std::net::IpAddr>().unwrap()
        );
        assert_ne!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:3::1"));
        assert_eq!(bucket("198.51.100.7"), bucket("::ffff:198.51.100.7"));
        assert_ne!(bucket("198.51.100.7"), bucket("198.51.100.8"));
    }

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(Rate { per_sec: 10, burst: 3 });
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(1, start), Ok(()));
        }
        let wait = limiter.check(1, start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(limiter.check(2, start), Ok(()), "another client has its own budget");
        assert_eq!(limiter.check(1, start + Duration::from_millis(100)), Ok(()));
        assert!(limiter.check(1, start + Duration::from_millis(100)).is_err());
        // After a quiet spell the whole burst is back.
        let later = start + Duration::from_secs(5);
        for _ in 0..3 {
            assert_eq!(limiter.check(1, later), Ok(()));
        }
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter = RateLimiter::new(Rate { per_sec: 0, burst: 0 });
        let now = Instant::now();
        assert!((0..10_000).all(|_| limiter.check(1, now).is_ok()));
    }

    #[test]
    fn the_table_is_bounded_and_idle_clients_are_forgotten() {
        let limiter = RateLimiter::new(Rate { per_sec: 1000, burst: 1 });
        let start = Instant::now();
        for client in 0..MAX_TRACKED_CLIENTS {
            assert_eq!(limiter.check(client, start), Ok(()));
        }
        assert!(limiter.check(MAX_TRACKED_CLIENTS, start).is_err(), "full: a newcomer waits");
        let later = start + Duration::from_secs(2);
        assert_eq!(limiter.check(MAX_TRACKED_CLIENTS, later), Ok(()), "idle ones were forgotten");
        assert_eq!(limiter.clients.lock().unwrap().arrival.len(), 1);
    }
}
