//! The client's side of the market, end to end on 127.0.0.1:0 with a real
//! registry, ledger and relays: a client discovers three relays at
//! different prices, skips the cheapest because of its poor reputation,
//! opens a channel to its choice through its wallet, moves bytes intact
//! through a tunnel it pays for, and closes the channel for the refund of
//! exactly what it did not spend. The ledger's invariants hold at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../relay/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{Registry, RunningRelay, WAIT, key, operator, store_dir};
use ferry_client::relay::{Event, Payer, Session};
use ferry_client::select::{SelectionPolicy, discover, keep_or_switch};
use ferry_client::wallet::{Budget, Wallet};
use ferry_proto::wire::{ListenPolicy, VoucherVerdict};
use ferry_proto::{Amount, PricePerByte};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn nano(units: u128) -> PricePerByte {
    PricePerByte::from_attos(units * 1_000_000_000).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_picks_the_cheapest_reputable_relay_pays_for_what_it_carried_and_gets_the_rest_back()
 {
    let registry = Registry::start().await;
    let (cheap, middle, dear) = (key(11), key(12), key(13));
    let mut relays = Vec::new();
    for (relay_key, price) in [(&cheap, 1), (&middle, 2), (&dear, 3)] {
        let dir = store_dir(&format!("market-{price}"));
        let price = nano(price);
        relays.push(
            RunningRelay::start(
                &registry,
                relay_key,
                |config| {
                    config.price_per_byte = price;
                    // One heartbeat at the start, then none during the
                    // test: each recomputes the relay's reputation.
                    config.heartbeat_interval = Duration::from_secs(3600);
                },
                dir,
            )
            .await,
        );
    }
    registry.set_reputations(&[(&cheap, 0.1), (&middle, 0.8), (&dear, 0.9)]).await;

    let (caller, callee) = (key(21), key(22));
    let budget: Amount = "5".parse().unwrap();
    registry.client(&operator()).deposit(&caller.public(), budget, "deposit-caller").await.unwrap();

    // Discovery and choice: the cheapest relay is below the floor.
    let policy = SelectionPolicy { min_reputation: 0.5, ..SelectionPolicy::default() };
    let ranked = discover(&registry.client(&caller), &caller, &policy).await.unwrap();
    let keys: Vec<_> = ranked.iter().map(|r| r.offer.key()).collect();
    assert_eq!(keys, [middle.public(), dear.public()], "ranked by price above the floor");
    let chosen = keep_or_switch(&policy, None, &ranked).unwrap().offer.clone();
    assert_eq!(chosen.key(), middle.public());

    // The wallet opens a channel on first need, and reuses it after.
    let wallet = Wallet::new(
        registry.client(&caller),
        Budget { open: budget, top_up: "1".parse().unwrap(), low_water: "0.5".parse().unwrap() },
    );
    let channel = wallet.channel_to(&chosen.key()).await.unwrap();
    assert_eq!((channel.state.as_str(), channel.deposited), ("open", budget));
    assert_eq!(wallet.channel_to(&chosen.key()).await.unwrap().id, channel.id);

    // A paid tunnel through the chosen relay.
    let at = chosen.address();
    let listener = Session::open(&at, &callee, None, None).await.unwrap();
    listener.listen(ListenPolicy::Open).await.unwrap();
    let payer = Payer::new(channel.id, caller.clone());
    let session = Session::open(&at, &caller, Some(channel.id), Some(payer)).await.unwrap();
    let bytes: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let sent = bytes.clone();
    let accepting = {
        let (at, callee) = (at.clone(), callee.clone());
        tokio::spawn(async move {
            loop {
                if let Event::Incoming { tunnel, .. } = listener.next_event().await.unwrap() {
                    return ferry_client::relay::accept(&at, &callee, tunnel).await.unwrap();
                }
            }
        })
    };
    let mut near = session.dial(callee.public()).await.unwrap();
    let mut far = tokio::time::timeout(WAIT, accepting).await.unwrap().unwrap();
    let sending = tokio::spawn(async move {
        near.write_all(&sent).await.unwrap();
        near.shutdown().await.unwrap();
        near
    });
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, far.read_to_end(&mut received)).await.unwrap().unwrap();
    assert_eq!(blake3::hash(&received), blake3::hash(&bytes), "the bytes arrive intact");
    drop(tokio::time::timeout(WAIT, sending).await.unwrap().unwrap());

    // Paid in full for exactly the bytes carried, no more: the session
    // paid as it counted, and closing pays the tail and waits for the
    // relay's verdict.
    let carried = bytes.len() as u64;
    tokio::time::timeout(WAIT, session.close()).await.unwrap().unwrap();
    let paid = *session.paid().borrow();
    // The relay never billed beyond what it carried, and accepted every voucher.
    while let Some(event) = tokio::time::timeout(WAIT, session.next_event()).await.unwrap() {
        match event {
            Event::Invoice { carried_bytes, .. } => {
                assert!(carried_bytes <= carried, "billed {carried_bytes} of {carried} bytes");
            }
            Event::VoucherResult { verdict, .. } => assert_eq!(verdict, VoucherVerdict::Accepted),
            _ => {}
        }
    }
    let cost = ferry_proto::cost(carried, nano(2)).unwrap();
    assert_eq!(paid, cost, "the vouchers pay for the bytes carried");

    // The relays settle as they stop; the client closes and is refunded.
    for relay in relays {
        let report = relay.shutdown().await;
        assert!(!report.incomplete, "{report:?}");
    }
    wallet.close(&channel.id).await.unwrap();
    let closed = wallet.finalize(&channel.id).await.unwrap();
    assert_eq!(closed.state, "closed");
    assert_eq!(closed.settled, cost);
    assert_eq!(closed.refunded, budget.checked_sub(cost).unwrap(), "the unspent escrow returns");
    let money = wallet.money(|_| Some(cost)).await.unwrap();
    assert_eq!(money.len(), 1);
    assert_eq!(money[0].pending, Amount::ZERO, "nothing paid is left unsettled");
    registry.assert_invariants().await;
}

/// Makes `relays` established: first seen a month ago, with a heartbeat in
/// every minute and a successful probe every minute of the last day, as a
/// relay that has been up all along would have.
async fn establish(registry: &Registry, relays: &[&ferry_proto::SecretKey]) {
    let keys: Vec<Vec<u8>> =
        relays.iter().map(|relay| relay.public().as_bytes().to_vec()).collect();
    let pool = registry.ledger.pool();
    for statement in [
        "UPDATE relays SET first_seen = now() - interval '30 days' WHERE key_bytes = ANY($1)",
        "INSERT INTO relay_uptime (key_bytes, minute) \
         SELECT k, date_trunc('minute', now()) - m * interval '1 minute' \
         FROM unnest($1::bytea[]) k, generate_series(0, 1439) m ON CONFLICT DO NOTHING",
        "INSERT INTO relay_probes (key_bytes, at, ok, rtt_ms) \
         SELECT k, now() - m * interval '1 minute', true, 1 \
         FROM unnest($1::bytea[]) k, generate_series(1, 1439) m",
    ] {
        sqlx::query(statement).bind(&keys).execute(pool).await.unwrap();
    }
}

/// The cold start (docs/REPUTATION.md, "A new relay"): in a market of
/// established relays, a brand-new, reachable, cheaper relay gets a default
/// client's paid traffic within a few probe rounds, while a new relay that
/// fails the registry's probes never reaches the default bar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_reachable_relay_gets_a_paying_default_client_and_an_unreachable_one_does_not() {
    let registry = Registry::start_probing(Some(Duration::from_millis(200))).await;
    let (old, older, newcomer, unreachable) = (key(31), key(32), key(33), key(34));
    // Where the unreachable relay says it is: a port where nothing listens.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut relays = Vec::new();
    for (relay_key, price) in [(&old, 3), (&older, 4), (&newcomer, 2), (&unreachable, 1)] {
        let advertised = (relay_key.public() == unreachable.public()).then(|| nowhere.to_string());
        relays.push(
            RunningRelay::start(
                &registry,
                relay_key,
                |config| {
                    config.price_per_byte = nano(price);
                    if let Some(advertised) = advertised {
                        config.public_address = advertised;
                    }
                },
                store_dir(&format!("cold-start-{price}")),
            )
            .await,
        );
    }
    establish(&registry, &[&old, &older]).await;

    // A default client's view, within a few probe rounds: the newcomer is
    // on its floor and ranks first by value; the unreachable one is not
    // listed for it at all.
    let policy = SelectionPolicy::default();
    let (caller, callee) = (key(35), key(36));
    let ranked_by_default = async {
        loop {
            let ranked = discover(&registry.client(&caller), &caller, &policy).await.unwrap();
            let keys: Vec<_> = ranked.iter().map(|r| r.offer.key()).collect();
            if keys.first() == Some(&newcomer.public()) && keys.contains(&old.public()) {
                return keys;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let keys = tokio::time::timeout(WAIT, ranked_by_default).await.expect("the newcomer is chosen");
    assert!(!keys.contains(&unreachable.public()), "a relay failing probes is chosen: {keys:?}");
    let view = |relay: &ferry_proto::SecretKey| {
        let url = format!("{}/v1/relays/{}", registry.base, relay.public());
        async move { reqwest::get(url).await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let (fresh, dead, established) =
        (view(&newcomer).await, view(&unreachable).await, view(&old).await);
    assert_eq!(fresh["reputation"]["newcomer"], true, "{fresh}");
    assert_eq!(fresh["reputation"]["score"], 0.55, "{fresh}");
    assert_eq!(dead["reputation"]["newcomer"], false, "{dead}");
    assert!(dead["reputation"]["score"].as_f64().unwrap() < policy.min_reputation, "{dead}");
    assert_eq!(established["reputation"]["newcomer"], false, "{established}");
    assert!(established["reputation"]["score"].as_f64().unwrap() >= policy.min_reputation);

    // Default endpoints carry a paid stream through it.
    let budget: Amount = "1".parse().unwrap();
    registry.client(&operator()).deposit(&caller.public(), budget, "cold-start").await.unwrap();
    let receiver = ferry_client::Endpoint::new(
        registry.client(&callee),
        ferry_client::EndpointConfig { home_relays: 1, ..Default::default() },
    );
    receiver.listen().await.unwrap();
    let sender = ferry_client::Endpoint::new(
        registry.client(&caller),
        ferry_client::EndpointConfig {
            budget: Some(Budget { open: budget, top_up: budget, low_water: Amount::ZERO }),
            ..Default::default()
        },
    );
    let mut outgoing =
        tokio::time::timeout(WAIT, sender.dial(callee.public())).await.unwrap().unwrap();
    let mut incoming = tokio::time::timeout(WAIT, receiver.accept()).await.unwrap().unwrap();
    let bytes = vec![7u8; 1 << 20];
    let (written, received) = tokio::join!(
        async {
            outgoing.write_all(&bytes).await.unwrap();
            outgoing.shutdown().await.unwrap();
        },
        async {
            let mut received = Vec::new();
            incoming.read_to_end(&mut received).await.unwrap();
            received
        }
    );
    let () = written;
    assert_eq!(received, bytes);
    drop((outgoing, incoming));
    sender.close().await;
    receiver.close().await;
    for relay in relays {
        assert!(!relay.shutdown().await.incomplete);
    }
    let paid = registry.ledger.balance(&newcomer.public()).await.unwrap();
    assert!(paid.earned > ferry_proto::Balance::ZERO, "the newcomer was paid: {paid:?}");
    for relay in [&old, &older, &unreachable] {
        let balance = registry.ledger.balance(&relay.public()).await.unwrap();
        assert_eq!(balance.earned, ferry_proto::Balance::ZERO, "{}", relay.public());
    }
    registry.assert_invariants().await;
}
