//! Choosing a relay: the registry's listing filtered by the client's
//! policy, the cheapest few measured for their round trip, ranked by price
//! weighed with that round trip, and a current relay kept unless another
//! is clearly better (docs/CLIENT.md, "Choosing a relay").

use std::time::Duration;

use ferry_proto::{PricePerByte, PublicKey, SecretKey, SignedAdvert};
use serde_json::Value;

use crate::registry::{RegistryClient, RegistryError};
use crate::relay::{self, RelayAddress};

/// The most offers one listing asks for (the registry's page bound is 500).
pub const MAX_OFFERS: u32 = 200;
/// The most relays measured at once.
pub const MAX_MEASURED: usize = 16;
/// How long measuring one relay's round trip may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a client wants of its relays.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionPolicy {
    /// Only relays at most this dear per byte.
    pub max_price: Option<PricePerByte>,
    /// Only relays with at least this reputation score (0 to 1).
    pub min_reputation: f64,
    /// Only relays in this region.
    pub region: Option<String>,
    /// How many of the cheapest eligible relays get their round trip
    /// measured; only those are ranked.
    pub measured: usize,
    /// The round trip that doubles a relay's effective price: the cost of a
    /// relay is `price × (1 + rtt / rtt_doubling)`.
    pub rtt_doubling: Duration,
    /// How much cheaper (as a fraction of its cost) another relay must be
    /// before a client leaves the relay it uses.
    pub switch_margin: f64,
}

impl Default for SelectionPolicy {
    fn default() -> SelectionPolicy {
        SelectionPolicy {
            max_price: None,
            min_reputation: 0.5,
            region: None,
            measured: 3,
            rtt_doubling: Duration::from_millis(100),
            switch_margin: 0.2,
        }
    }
}

/// A relay on offer: its verified advertisement and what the registry
/// knows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// The relay's signed offer, checked by this client.
    pub advert: SignedAdvert,
    /// The registry's reputation score, 0 to 1.
    pub reputation: f64,
    /// Whether the relay sent a heartbeat recently.
    pub live: bool,
    /// Its last reported load.
    pub load_bytes_per_sec: u64,
    /// Its last reported number of sessions.
    pub sessions: u64,
}

impl Offer {
    /// Where to reach the relay, and the key it must prove.
    pub fn address(&self) -> RelayAddress {
        RelayAddress { address: self.advert.advert.address.clone(), key: self.advert.advert.relay }
    }

    /// The relay's key.
    pub fn key(&self) -> PublicKey {
        self.advert.advert.relay
    }

    /// The relay's price per byte.
    pub fn price(&self) -> PricePerByte {
        self.advert.advert.price_per_byte
    }

    /// The offer in a registry relay view, if its advert verifies.
    pub(crate) fn from_view(view: &Value) -> Result<Offer, String> {
        let advert: SignedAdvert =
            serde_json::from_value(view["advert"].clone()).map_err(|error| error.to_string())?;
        advert.verify().map_err(|error| format!("advert of {}: {error}", advert.advert.relay))?;
        let number = |value: &Value| value.as_u64().unwrap_or(0);
        Ok(Offer {
            reputation: view["reputation"]["score"].as_f64().unwrap_or(0.0),
            live: view["live"].as_bool().unwrap_or(false),
            load_bytes_per_sec: number(&view["load_bytes_per_sec"]),
            sessions: number(&view["sessions"]),
            advert,
        })
    }
}

/// An offer with its measured round trip and its cost under a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The offer.
    pub offer: Offer,
    /// The round trip this client measured.
    pub rtt: Duration,
    /// `price × (1 + rtt / rtt_doubling)`, in attos per byte.
    pub cost: f64,
}

fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

impl RegistryClient {
    /// The live relays the registry lists that meet `policy`'s price,
    /// reputation and region, cheapest first (at most [`MAX_OFFERS`]).
    /// Offers whose advertisement does not verify are left out.
    pub async fn offers(&self, policy: &SelectionPolicy) -> Result<Vec<Offer>, RegistryError> {
        self.listed_offers(policy, true).await
    }

    /// As [`RegistryClient::offers`], with relays that sent no recent
    /// heartbeat too: for people looking at the market, not for choosing.
    pub async fn offers_live_or_not(
        &self,
        policy: &SelectionPolicy,
    ) -> Result<Vec<Offer>, RegistryError> {
        self.listed_offers(policy, false).await
    }

    async fn listed_offers(
        &self,
        policy: &SelectionPolicy,
        live_only: bool,
    ) -> Result<Vec<Offer>, RegistryError> {
        let mut query = format!("/v1/relays?sort=price&limit={MAX_OFFERS}&live={live_only}");
        if let Some(price) = policy.max_price {
            query.push_str(&format!("&max_price={}", percent_encode(&price.to_string())));
        }
        if policy.min_reputation > 0.0 {
            query.push_str(&format!("&min_reputation={}", policy.min_reputation));
        }
        if let Some(region) = &policy.region {
            query.push_str(&format!("&region={}", percent_encode(region)));
        }
        let page = self.get(&query).await?;
        let views = page["relays"]
            .as_array()
            .ok_or_else(|| RegistryError::Unexpected("a listing without relays".into()))?;
        Ok(views
            .iter()
            .filter_map(|view| match Offer::from_view(view) {
                Ok(offer) => Some(offer),
                Err(error) => {
                    tracing::warn!(%error, "leaving out a relay whose offer does not verify");
                    None
                }
            })
            .collect())
    }
}

/// Ranks measured offers under `policy`, best first: offers that break the
/// policy or did not answer (no round trip) are left out; ties in cost go
/// to the shorter round trip, then the better reputation.
pub fn rank(policy: &SelectionPolicy, measured: Vec<(Offer, Option<Duration>)>) -> Vec<Ranked> {
    let doubling = policy.rtt_doubling.as_secs_f64().max(f64::EPSILON);
    let mut ranked: Vec<Ranked> = measured
        .into_iter()
        .filter(|(offer, _)| eligible(policy, offer))
        .filter_map(|(offer, rtt)| {
            let rtt = rtt?;
            // Attos per byte are far below 2^53 for any sane price; the cost
            // only orders relays.
            let price = offer.price().attos() as f64;
            let cost = price * (1.0 + rtt.as_secs_f64() / doubling);
            Some(Ranked { offer, rtt, cost })
        })
        .collect();
    ranked.sort_by(|a, b| {
        a.cost
            .total_cmp(&b.cost)
            .then(a.rtt.cmp(&b.rtt))
            .then(b.offer.reputation.total_cmp(&a.offer.reputation))
    });
    ranked
}

fn eligible(policy: &SelectionPolicy, offer: &Offer) -> bool {
    offer.live
        && offer.reputation >= policy.min_reputation
        && policy.max_price.is_none_or(|max| offer.price() <= max)
        && policy.region.as_ref().is_none_or(|region| *region == offer.advert.advert.region)
}

/// The relay to use, given the one in use: it stays unless it is no longer
/// ranked or the best is cheaper by more than the policy's switch margin.
pub fn keep_or_switch<'a>(
    policy: &SelectionPolicy,
    current: Option<&PublicKey>,
    ranked: &'a [Ranked],
) -> Option<&'a Ranked> {
    let best = ranked.first()?;
    let Some(current) = current.and_then(|key| ranked.iter().find(|r| r.offer.key() == *key))
    else {
        return Some(best);
    };
    if best.cost < current.cost * (1.0 - policy.switch_margin) { Some(best) } else { Some(current) }
}

/// Discovers relays meeting `policy`, measures the round trip to the
/// cheapest [`SelectionPolicy::measured`] of them at once, and ranks them.
pub async fn discover(
    registry: &RegistryClient,
    me: &SecretKey,
    policy: &SelectionPolicy,
) -> Result<Vec<Ranked>, RegistryError> {
    let offers = registry.offers(policy).await?;
    Ok(measure_and_rank(me, policy, offers).await)
}

/// Measures the round trip to the cheapest [`SelectionPolicy::measured`]
/// of the `offers` that meet `policy`, at once, and ranks them.
pub async fn measure_and_rank(
    me: &SecretKey,
    policy: &SelectionPolicy,
    mut offers: Vec<Offer>,
) -> Vec<Ranked> {
    offers.retain(|offer| eligible(policy, offer));
    offers.sort_by(|a, b| a.price().cmp(&b.price()).then(b.reputation.total_cmp(&a.reputation)));
    offers.truncate(policy.measured.clamp(1, MAX_MEASURED));
    let mut probes = tokio::task::JoinSet::new();
    for (index, offer) in offers.iter().enumerate() {
        let (address, me) = (offer.address(), me.clone());
        probes.spawn(async move { (index, relay::probe(&address, &me, PROBE_TIMEOUT).await.ok()) });
    }
    let mut rtts = vec![None; offers.len()];
    while let Some(probed) = probes.join_next().await {
        if let Ok((index, rtt)) = probed {
            rtts[index] = rtt;
        }
    }
    rank(policy, offers.into_iter().zip(rtts).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::RelayAdvert;
    use proptest::prelude::*;

    fn offer(seed: u8, price_attos: u128, reputation: f64) -> Offer {
        let key = SecretKey::from_seed(&[seed; 32]);
        let advert = RelayAdvert {
            relay: key.public(),
            address: format!("127.0.0.1:{}", 1000 + u16::from(seed)),
            price_per_byte: PricePerByte::from_attos(price_attos).unwrap(),
            credit_window_bytes: 1 << 20,
            capacity_bytes_per_sec: 1 << 30,
            region: "eu".into(),
            protocol_version: 1,
            issued_at_ms: 1,
        }
        .sign(&key);
        Offer { advert, reputation, live: true, load_bytes_per_sec: 0, sessions: 0 }
    }

    fn ms(millis: u64) -> Option<Duration> {
        Some(Duration::from_millis(millis))
    }

    #[test]
    fn the_policy_filters_and_the_cheapest_reachable_relay_ranks_first() {
        let policy = SelectionPolicy {
            max_price: Some(PricePerByte::from_attos(500).unwrap()),
            ..SelectionPolicy::default()
        };
        let mut dead = offer(5, 10, 0.9);
        dead.live = false;
        let mut elsewhere = offer(6, 10, 0.9);
        elsewhere.advert.advert.region = "us".into();
        let regional = SelectionPolicy { region: Some("eu".into()), ..policy.clone() };
        let ranked = rank(
            &regional,
            vec![
                (offer(1, 300, 0.9), ms(10)),
                (offer(2, 100, 0.2), ms(10)), // below the reputation floor
                (offer(3, 900, 0.9), ms(10)), // over the price limit
                (offer(4, 200, 0.9), ms(10)),
                (offer(7, 50, 0.9), None), // did not answer
                (dead, ms(1)),
                (elsewhere, ms(1)),
            ],
        );
        let seeds: Vec<PublicKey> = ranked.iter().map(|r| r.offer.key()).collect();
        assert_eq!(seeds, [offer(4, 200, 0.9).key(), offer(1, 300, 0.9).key()]);
    }

    #[test]
    fn a_long_round_trip_weighs_like_a_higher_price() {
        let policy = SelectionPolicy::default();
        // 100 ms doubles the price: 100 at 100 ms costs 200, more than 150.
        let ranked =
            rank(&policy, vec![(offer(1, 100, 0.9), ms(100)), (offer(2, 150, 0.9), ms(0))]);
        assert_eq!(ranked[0].offer.key(), offer(2, 150, 0.9).key());
        // At the same cost the shorter round trip wins, then reputation.
        let ranked = rank(
            &policy,
            vec![
                (offer(1, 0, 0.6), ms(30)),
                (offer(2, 0, 0.9), ms(20)),
                (offer(3, 0, 0.95), ms(20)),
            ],
        );
        let order: Vec<PublicKey> = ranked.iter().map(|r| r.offer.key()).collect();
        assert_eq!(order, [offer(3, 0, 0.9).key(), offer(2, 0, 0.9).key(), offer(1, 0, 0.9).key()]);
    }

    #[test]
    fn the_current_relay_stays_unless_another_is_clearly_cheaper() {
        let policy = SelectionPolicy::default();
        let ranked = rank(&policy, vec![(offer(1, 90, 0.9), ms(0)), (offer(2, 100, 0.9), ms(0))]);
        let current = offer(2, 100, 0.9).key();
        assert_eq!(keep_or_switch(&policy, Some(&current), &ranked).unwrap().offer.key(), current);
        let ranked = rank(&policy, vec![(offer(1, 70, 0.9), ms(0)), (offer(2, 100, 0.9), ms(0))]);
        assert_eq!(
            keep_or_switch(&policy, Some(&current), &ranked).unwrap().offer.key(),
            offer(1, 70, 0.9).key(),
            "30 % cheaper is past the 20 % margin"
        );
        let gone = offer(9, 1, 0.9).key();
        assert_eq!(keep_or_switch(&policy, Some(&gone), &ranked).unwrap().cost, ranked[0].cost);
        assert!(keep_or_switch(&policy, None, &[]).is_none());
    }

    proptest! {
        /// Whatever the offers, a choice is stable: asked again with the
        /// chosen relay as the current one, the client keeps it.
        #[test]
        fn a_choice_does_not_flap(
            prices in proptest::collection::vec(0u128..10_000, 1..8),
            rtts in proptest::collection::vec(0u64..500, 8),
            current in 0usize..8,
        ) {
            let policy = SelectionPolicy::default();
            let measured: Vec<_> = prices
                .iter()
                .enumerate()
                .map(|(i, price)| (offer(i as u8 + 1, *price, 0.9), ms(rtts[i])))
                .collect();
            let ranked = rank(&policy, measured);
            let current = ranked.get(current % ranked.len()).map(|r| r.offer.key());
            let chosen = keep_or_switch(&policy, current.as_ref(), &ranked).unwrap();
            let again = keep_or_switch(&policy, Some(&chosen.offer.key()), &ranked).unwrap();
            prop_assert_eq!(chosen.offer.key(), again.offer.key());
            prop_assert!(chosen.cost <= ranked[0].cost / (1.0 - policy.switch_margin) + 1e-9);
        }
    }
}
