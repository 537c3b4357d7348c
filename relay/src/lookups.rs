//! The relay's channel lookups at the registry. Each lookup is a request
//! signed by the relay's key, so it spends the relay's own rate limit at the
//! registry, which its heartbeats and settlements need too. A stranger who
//! names channel ids at random must not be able to spend it: lookups are
//! cached (unknown channels too) and rationed in two classes.
//!
//! - **Known** channels (one the relay holds a voucher for, or a session
//!   pays through) share [`Limits::known_lookups`]; a lookup over the ration
//!   waits its turn, up to [`KNOWN_LOOKUP_WAIT`].
//! - **Strangers'** channels (a session opening on a channel the relay has
//!   never been paid through) share [`Limits::stranger_lookups`] in total and
//!   [`Limits::stranger_lookups_per_ip`] per client address, and are refused
//!   at once beyond them.
//!
//! Both rations together stay below the registry's default per-key rate, so
//! heartbeats and settlements always find room.
//!
//! An open channel's view is used for at most the channel check interval:
//! every view the relay acts on (to open a session, to count a voucher) is
//! that recent, so as long as the interval is shorter than the registry's
//! dispute window, a close request is seen while the channel's vouchers can
//! still be settled. Unknown channels are remembered for the cache time.
//!
//! [`Limits::known_lookups`]: crate::Limits::known_lookups
//! [`Limits::stranger_lookups`]: crate::Limits::stranger_lookups
//! [`Limits::stranger_lookups_per_ip`]: crate::Limits::stranger_lookups_per_ip

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_client::{ChannelView, RegistryClient, RegistryError};
use ferry_proto::ChannelId;
use ferry_proto::rate::RateLimiter;

use crate::config::Limits;
use crate::server::lock;

/// The longest a lookup of a known channel waits for its ration.
pub const KNOWN_LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Who a lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A channel the relay has been paid through.
    Known,
    /// A channel named by a client at this address, new to the relay.
    Stranger(IpAddr),
}

/// Why a lookup has no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    /// The class's ration is spent.
    #[error("the relay is checking too many channels; retry in {} ms", .0.as_millis())]
    Busy(Duration),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The relay's cached, rationed channel lookups.
#[derive(Debug)]
pub(crate) struct Lookups {
    /// Each channel's view (none: the registry knows no such channel of
    /// this relay's) and when it was fetched.
    cache: Mutex<HashMap<ChannelId, (Option<ChannelView>, Instant)>>,
    known: RateLimiter<()>,
    strangers: RateLimiter<()>,
    strangers_per_ip: RateLimiter<IpAddr>,
    /// How long an unknown channel is remembered.
    unknown_ttl: Duration,
    /// How long a known channel's view is used.
    known_ttl: Duration,
    max_cached: usize,
}

impl Lookups {
    pub(crate) fn new(limits: &Limits) -> Lookups {
        Lookups {
            cache: Mutex::default(),
            known: RateLimiter::new(limits.known_lookups),
            strangers: RateLimiter::new(limits.stranger_lookups),
            strangers_per_ip: RateLimiter::new(limits.stranger_lookups_per_ip),
            unknown_ttl: limits.channel_cache_ttl,
            known_ttl: limits.channel_check_interval,
            max_cached: limits.max_sessions,
        }
    }

    /// The channel as the registry shows it (none: no such channel), from
    /// the cache unless `fresh`.
    pub(crate) async fn channel(
        &self,
        registry: &RegistryClient,
        id: &ChannelId,
        class: Class,
        fresh: bool,
    ) -> Result<Option<ChannelView>, LookupError> {
        if !fresh
            && let Some((view, at)) = lock(&self.cache).get(id)
            && at.elapsed() < self.ttl(view)
        {
            return Ok(view.clone());
        }
        self.ration(class).await?;
        let view = match registry.channel(id).await {
            Ok(view) => Some(view),
            // Not found, or not this relay's to read: no such channel here.
            Err(RegistryError::Refused { status, .. }) if status == 404 || status == 403 => None,
            Err(error) => return Err(error.into()),
        };
        let mut cache = lock(&self.cache);
        // Bounded: stale entries go first, and when the cache is still full
        // the answer is simply not kept.
        if cache.len() >= self.max_cached {
            cache.retain(|_, (view, at)| at.elapsed() < self.ttl(view));
        }
        if cache.len() < self.max_cached || cache.contains_key(id) {
            cache.insert(*id, (view.clone(), Instant::now()));
        }
        Ok(view)
    }

    fn ttl(&self, view: &Option<ChannelView>) -> Duration {
        if view.is_some() { self.known_ttl } else { self.unknown_ttl }
    }

    /// Takes one lookup from `class`'s ration.
    async fn ration(&self, class: Class) -> Result<(), LookupError> {
        match class {
            Class::Known => {
                let deadline = Instant::now() + KNOWN_LOOKUP_WAIT;
                loop {
                    let now = Instant::now();
                    match self.known.check((), now) {
                        Ok(()) => return Ok(()),
                        Err(wait) if now + wait <= deadline => tokio::time::sleep(wait).await,
                        Err(wait) => return Err(LookupError::Busy(wait)),
                    }
                }
            }
            Class::Stranger(ip) => {
                let now = Instant::now();
                let bucket = ferry_proto::rate::ip_bucket(ip);
                self.strangers_per_ip.check(bucket, now).map_err(LookupError::Busy)?;
                self.strangers.check((), now).map_err(LookupError::Busy)
            }
        }
    }
}
