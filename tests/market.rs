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
