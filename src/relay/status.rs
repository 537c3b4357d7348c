//! `ferry relay status`: what the market sees of one relay, read from the
//! registry with the relay's key: its earnings, its reputation with every
//! component, and whether default clients will choose it, and why not.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_client::EndpointConfig;
use ferry_client::select::SelectionPolicy;
use ferry_proto::{Amount, SecretKey};
use serde_json::{Value, json};

/// Options of `ferry relay status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The registry's URL: https://, or http:// on this machine.
    #[arg(long, env = "FERRY_REGISTRY", default_value = "http://127.0.0.1:7070")]
    registry: String,
    /// Trust only the CA certificates in this PEM file for the registry's TLS.
    #[arg(long, env = "FERRY_REGISTRY_CA")]
    registry_ca: Option<PathBuf>,
    /// The relay's key file.
    #[arg(long, env = "FERRY_RELAY_KEY", default_value = "ferry-relay.key")]
    key: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// Prints the relay's status.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let key = SecretKey::read_file(&args.key).with_context(|| {
        format!("the relay key {} (name it with --key or FERRY_RELAY_KEY)", args.key.display())
    })?;
    let me = key.public();
    let registry = crate::registry::client(&args.registry, args.registry_ca.as_deref(), key)?;
    let view = registry.get(&format!("/v1/relays/{me}")).await.with_context(|| {
        format!("relay {me} is not registered at {}: start it with `ferry relay`", args.registry)
    })?;
    let balance = registry.balance().await?;
    let channels = registry.channels().await?;
    let toward_me: Vec<_> = channels
        .iter()
        .filter(|channel| channel.relay == me && channel.state != "closed")
        .collect();
    let in_escrow = toward_me
        .iter()
        .try_fold(Amount::ZERO, |total, channel| total.checked_add(channel.escrow))
        .context("the escrow toward the relay overflows")?;
    let policy = SelectionPolicy::default();
    let listing = registry
        .get(&format!("/v1/relays?sort=price&min_reputation={}&limit=500", policy.min_reputation))
        .await?;
    let ranked: Vec<&str> = listing["relays"]
        .as_array()
        .map(|relays| {
            relays.iter().filter_map(|relay| relay["advert"]["advert"]["relay"].as_str()).collect()
        })
        .unwrap_or_default();
    let me_text = me.to_string();
    let rank = ranked.iter().position(|key| *key == me_text).map(|index| index + 1);
    let (chosen, why) = verdict(&view, &policy, rank, ranked.len());
    if args.json {
        let answer = json!({
            "relay": me, "view": view, "balance": balance,
            "open_channels": toward_me.len(), "in_escrow_toward_relay": in_escrow,
            "default_clients": { "choose": chosen, "why": why, "rank_by_price": rank },
        });
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let advert = &view["advert"]["advert"];
    let reputation = &view["reputation"];
    println!(
        "relay {me} at {}, region {}, {} per GiB",
        text(&advert["address"]),
        text(&advert["region"]),
        text(&view["price_per_gib"])
    );
    println!(
        "live: {} (last heartbeat {})",
        if view["live"].as_bool() == Some(true) { "yes" } else { "no" },
        view["last_heartbeat"].as_str().unwrap_or("never")
    );
    println!(
        "earnings: {} settled, after the registry's fee; {} available to withdraw (`ferry withdraw`); {in_escrow} in clients' escrow toward it in {} open channel(s), earned only by settling their vouchers",
        text(&balance["earned"]),
        text(&balance["available"]),
        toward_me.len()
    );
    let probe_rtt = reputation["probe_rtt_ms"]
        .as_f64()
        .map_or_else(|| "no probe yet".to_owned(), |rtt| format!("{rtt:.1} ms"));
    println!(
        "reputation: {:.3}{} (docs/REPUTATION.md): uptime {:.3}, reachability {:.3}, probe round trip {probe_rtt}, paying clients {}, paid volume {}, vouchers settled {} and rejected {} in 30 days, age {:.2} days",
        reputation["score"].as_f64().unwrap_or(0.0),
        if reputation["newcomer"].as_bool() == Some(true) { ", the newcomer floor" } else { "" },
        reputation["uptime_24h"].as_f64().unwrap_or(0.0),
        reputation["reachability_24h"].as_f64().unwrap_or(0.0),
        reputation["paying_clients_30d"],
        text(&reputation["paid_volume_30d"]),
        reputation["settled_vouchers_30d"],
        reputation["rejected_vouchers_30d"],
        reputation["age_days"].as_f64().unwrap_or(0.0),
    );
    let choice = if chosen { "consider it" } else { "will not choose it" };
    println!("default clients {choice}: {why}");
    Ok(())
}

/// Whether a default client would choose the relay, and why (not): it
/// measures the cheapest `measured` live relays at the bar and listens on
/// the best `home_relays` by price and round trip (docs/CLIENT.md).
fn verdict(
    view: &Value,
    policy: &SelectionPolicy,
    rank: Option<usize>,
    ranked: usize,
) -> (bool, String) {
    let score = view["reputation"]["score"].as_f64().unwrap_or(0.0);
    let bar = policy.min_reputation;
    let (measured, home) = (policy.measured, EndpointConfig::default().home_relays);
    if view["live"].as_bool() != Some(true) {
        let why =
            "no heartbeat in the last 90 s: the relay is not running, or cannot reach the registry";
        return (false, why.into());
    }
    if score < bar {
        return (
            false,
            format!(
                "its score {score:.3} is below the default bar {bar}; a new relay reaches it as a newcomer after 3 successful probes by the registry (90 % of probes answered with its key, a heartbeat in 90 % of its minutes)"
            ),
        );
    }
    match rank {
        Some(rank) if rank <= measured => (
            true,
            format!(
                "it is #{rank} of {ranked} live relays at the bar by price; default clients measure the cheapest {measured} and use the best {home} by price and round trip"
            ),
        ),
        Some(rank) => (
            false,
            format!(
                "it is #{rank} of {ranked} by price; default clients measure only the cheapest {measured}, so a lower price would bring it in"
            ),
        ),
        None => (
            false,
            "it is not in the registry's listing of relays at the bar yet (the listing refreshes within a second)".into(),
        ),
    }
}

/// A JSON string's text, or the value as JSON.
fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}
