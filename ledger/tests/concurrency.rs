//! Races on real parallel connections: two ledger instances (as two registry
//! processes would be) on one database, each with its own pool.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_ledger::{ChannelState, LedgerError, SettlementOutcome};

const HOUR: Duration = Duration::from_secs(3600);
/// Rounds per race: each round is a fresh channel, so interleavings vary.
const ROUNDS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_voucher_settled_twice_at_once_pays_once() {
    let a = ledger(config(HOUR)).await;
    let b = twin(&a).await;
    let (client, relay) = (key(1), key(2));
    for round in 0..ROUNDS {
        let channel = funded_channel(&a, &client, &relay, round, "10", "10").await;
        let batch = [voucher(&client, channel, 1, "4")];
        let (key_a, key_b, relay_key) =
            (idem(&format!("a{round}")), idem(&format!("b{round}")), relay.public());
        let (first, second) = tokio::join!(
            a.settle(&key_a, &relay_key, &batch),
            b.settle(&key_b, &relay_key, &batch),
        );
        let outcomes = [first.unwrap().outcomes.remove(0), second.unwrap().outcomes.remove(0)];
        let settled =
            outcomes.iter().filter(|o| matches!(o, SettlementOutcome::Settled { .. })).count();
        let repeated = outcomes
            .iter()
            .filter(|o| matches!(o, SettlementOutcome::AlreadySettled { .. }))
            .count();
        assert_eq!((settled, repeated), (1, 1), "round {round}: {outcomes:?}");
        assert_eq!(a.channel(&channel).await.unwrap().settled, amount("4"));
    }
    // 4 per round minus the 2.5% fee, once per round.
    assert_eq!(a.balance(&relay.public()).await.unwrap().available, money("78"));
    assert_invariants(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_retried_concurrently_happens_once() {
    let a = ledger(config(HOUR)).await;
    let b = twin(&a).await;
    let (alice, gateway) = (key(1).public(), gateway());
    for round in 0..ROUNDS {
        let key = idem(&format!("deposit-{round}"));
        let (first, second) = tokio::join!(
            a.deposit(&key, &gateway, &alice, amount("1.5")),
            b.deposit(&key, &gateway, &alice, amount("1.5")),
        );
        assert_eq!(first.unwrap(), second.unwrap(), "round {round}");
    }
    assert_eq!(a.balance(&alice).await.unwrap().available, money("30"));
    assert_invariants(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_racing_the_relays_close_never_pays_twice() {
    let a = ledger(config(HOUR)).await;
    let b = twin(&a).await;
    let (client, relay) = (key(1), key(2));
    for round in 0..ROUNDS {
        let channel = funded_channel(&a, &client, &relay, round, "10", "10").await;
        let batch = [voucher(&client, channel, 1, "6")];
        let (key_s, key_c, relay_key) =
            (idem(&format!("s{round}")), idem(&format!("c{round}")), relay.public());
        let (settled, closed) = tokio::join!(
            a.settle(&key_s, &relay_key, &batch),
            b.close_by_relay(&key_c, &relay_key, &channel, None),
        );
        let closed = closed.unwrap();
        assert_eq!(closed.state, ChannelState::Closed);
        match &settled.unwrap().outcomes[0] {
            // Settled first: the close refunded only what was left.
            SettlementOutcome::Settled { .. } => assert_eq!(closed.refunded, amount("4")),
            // Closed first: the voucher came too late and everything went back.
            SettlementOutcome::Rejected { .. } => assert_eq!(closed.refunded, amount("10")),
            other => panic!("round {round}: unexpected {other:?}"),
        }
        let info = a.channel(&channel).await.unwrap();
        assert_eq!(info.settled.checked_add(info.refunded).unwrap(), info.deposited);
    }
    assert_invariants(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_racing_the_clients_close_request_both_succeed() {
    let a = ledger(config(HOUR)).await;
    let b = twin(&a).await;
    let (client, relay) = (key(1), key(2));
    for round in 0..ROUNDS {
        let channel = funded_channel(&a, &client, &relay, round, "10", "10").await;
        let batch = [voucher(&client, channel, 1, "6")];
        let (key_s, key_c) = (idem(&format!("s{round}")), idem(&format!("c{round}")));
        let (relay_key, client_key) = (relay.public(), client.public());
        let (settled, closing) = tokio::join!(
            a.settle(&key_s, &relay_key, &batch),
            b.request_close(&key_c, &client_key, &channel),
        );
        assert!(matches!(settled.unwrap().outcomes[0], SettlementOutcome::Settled { .. }));
        assert_eq!(closing.unwrap().state, ChannelState::Closing);
        assert_eq!(a.channel(&channel).await.unwrap().settled, amount("6"));
    }
    assert_invariants(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_opens_racing_for_one_balance_never_overdraw() {
    let a = ledger(config(HOUR)).await;
    let b = twin(&a).await;
    let (client, relay) = (key(1), key(2));
    a.deposit(&idem("fund"), &gateway(), &client.public(), amount("100")).await.unwrap();
    let opens = (0..10u64).map(|nonce| {
        let ledger = if nonce % 2 == 0 { a.clone() } else { b.clone() };
        let (client, relay) = (client.public(), relay.public());
        tokio::spawn(async move {
            ledger
                .open_channel(&idem(&format!("open-{nonce}")), &client, &relay, nonce, amount("30"))
                .await
        })
    });
    let mut opened = 0;
    for open in opens.collect::<Vec<_>>() {
        match open.await.unwrap() {
            Ok(_) => opened += 1,
            Err(LedgerError::InsufficientBalance { .. }) => {}
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(opened, 3);
    let summary = a.balance(&client.public()).await.unwrap();
    assert_eq!((summary.available, summary.in_escrow), (money("10"), money("90")));
    assert_invariants(&a).await;
}
