//! Admission of connections: a bound on how many are open in total and per
//! client IP address, each place freed when its [`Admitted`] is dropped,
//! however the connection's task ends. The relay's listener and the HTTP
//! servers (`crate::http`) admit through it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long accepting pauses after an error such as running out of file
/// descriptors, so the connections that hold them can finish and the accept
/// loop does not spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds its most connections in total.
    Total,
    /// The client's address holds its most connections.
    PerIp,
}

impl Refusal {
    /// The name used in metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerIp => "per_ip",
        }
    }
}

/// What a server reports about its connections, for its metrics.
pub trait ConnectionObserver: Send + Sync + 'static {
    /// A connection was admitted; `open` are open now.
    fn opened(&self, open: usize);
    /// A connection ended; `open` are open now.
    fn closed(&self, open: usize);
    /// A connection was refused.
    fn refused(&self, why: Refusal);
}

/// Reports nothing: for a server whose connections have no metrics.
impl ConnectionObserver for () {
    fn opened(&self, _open: usize) {}
    fn closed(&self, _open: usize) {}
    fn refused(&self, _why: Refusal) {}
}

/// Counts open connections, in total and per address.
pub struct Admission {
    max_connections: usize,
    max_connections_per_ip: usize,
    observer: Arc<dyn ConnectionObserver>,
    open: Mutex<Open>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    // Holds only addresses with open connections, so at most
    // `max_connections` entries.
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    /// Admits at most `max_connections` at once, `max_connections_per_ip`
    /// of them from one address, and tells `observer`.
    pub fn new(
        max_connections: usize,
        max_connections_per_ip: usize,
        observer: Arc<dyn ConnectionObserver>,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            max_connections,
            max_connections_per_ip,
            observer,
            open: Mutex::default(),
        })
    }

    /// A place for one more connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        self.admit_within(ip, self.max_connections_per_ip)
    }

    /// A place for one more connection from the trusted proxy at `ip`,
    /// bounded only by the total: its connections carry many clients'.
    pub fn admit_proxy(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        self.admit_within(ip, usize::MAX)
    }

    fn admit_within(
        self: &Arc<Self>,
        ip: IpAddr,
        max_connections_of_ip: usize,
    ) -> Result<Admitted, Refusal> {
        let ip = crate::rate::ip_bucket(ip);
        let mut open = self.lock();
        let refused = if open.total >= self.max_connections {
            Some(Refusal::Total)
        } else if open.per_ip.get(&ip).is_some_and(|of_ip| *of_ip >= max_connections_of_ip) {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(why) = refused {
            drop(open);
            self.observer.refused(why);
            return Err(why);
        }
        *open.per_ip.entry(ip).or_insert(0) += 1;
        open.total += 1;
        self.observer.opened(open.total);
        Ok(Admitted { admission: Arc::clone(self), ip })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Every update is a few integer steps that cannot panic halfway.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total -= 1;
        if let Some(of_ip) = open.per_ip.get_mut(&self.ip) {
            *of_ip -= 1;
            if *of_ip == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
        self.admission.observer.closed(open.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_in_total_and_per_address_and_freed_on_drop() {
        let admission = Admission::new(3, 2, Arc::new(()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::PerIp);
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Refusal::Total);
        drop(first);
        let _again = admission.admit(a).unwrap();
        assert_eq!(admission.lock().per_ip.len(), 2);
    }

    #[test]
    fn the_addresses_of_one_ipv6_64_share_one_bound() {
        let admission = Admission::new(10, 2, Arc::new(()));
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let _first = admission.admit(ip("2001:db8::1")).unwrap();
        let _second = admission.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(admission.admit(ip("2001:db8::3")).unwrap_err(), Refusal::PerIp);
        let _other = admission.admit(ip("2001:db8:0:1::1")).unwrap();
    }

    #[test]
    fn a_trusted_proxy_is_bounded_only_by_the_total() {
        let admission = Admission::new(3, 1, Arc::new(()));
        let proxy: IpAddr = "10.0.0.9".parse().unwrap();
        let held: Vec<Admitted> = (0..3).map(|_| admission.admit_proxy(proxy).unwrap()).collect();
        assert_eq!(admission.admit_proxy(proxy).unwrap_err(), Refusal::Total);
        drop(held);
        assert_eq!(admission.lock().total, 0);
    }
}
