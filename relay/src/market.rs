//! The relay in the market: its signed advertisement, heartbeats with its
//! load, and the optional load-aware price.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_client::RegistryError;
use ferry_proto::{PROTOCOL_VERSION, PricePerByte, RelayAdvert};

use crate::config::PricingPolicy;
use crate::server::{Shared, lock};

/// Signs and publishes the relay's advertisement at `price`; new sessions
/// get that price from now on.
pub(crate) async fn publish(shared: &Shared, price: PricePerByte) -> Result<(), RegistryError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // The registry keeps only a strictly newer advertisement.
    let issued_at_ms = shared
        .last_advert_ms
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(now_ms.max(last + 1)))
        .map_or(now_ms, |last| now_ms.max(last + 1));
    let config = &shared.config;
    let advert = RelayAdvert {
        relay: shared.key.public(),
        address: config.public_address.clone(),
        price_per_byte: price,
        credit_window_bytes: config.credit_window_bytes,
        capacity_bytes_per_sec: config.capacity_bytes_per_sec,
        region: config.region.clone(),
        protocol_version: PROTOCOL_VERSION,
        issued_at_ms,
    }
    .sign(&shared.key);
    shared.registry.publish_advert(&advert).await?;
    shared.set_price(price);
    Ok(())
}

/// Sends a heartbeat every interval with the load carried since the last
/// one, and re-prices under a pricing policy, until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut timer = tokio::time::interval(shared.config.heartbeat_interval);
    let mut shutdown = shared.shutdown.subscribe();
    let (mut last_bytes, mut last_at) = (shared.metrics.carried_total(), Instant::now());
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (bytes, at) = (shared.metrics.carried_total(), Instant::now());
        let seconds = at.duration_since(last_at).as_secs_f64().max(0.001);
        let load = ((bytes - last_bytes) as f64 / seconds) as u64;
        (last_bytes, last_at) = (bytes, at);
        let sessions = lock(&shared.sessions).len() as u64;
        if let Err(error) = shared.registry.heartbeat(load, sessions).await {
            tracing::warn!(%error, "heartbeat failed");
        }
        if let Some(policy) = shared.config.pricing {
            let price = policy.price_at(load, shared.config.capacity_bytes_per_sec);
            if PricingPolicy::moved(shared.price(), price)
                && let Err(error) = publish(&shared, price).await
            {
                tracing::warn!(%error, "re-advertising the price failed");
            }
        }
    }
}
