//! Ledger scenarios on a real Postgres: each ends by checking every invariant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_ledger::{
    AccountRef, ChannelState, LedgerError, MAX_SETTLEMENT_BATCH, MAX_STATEMENT_PAGE, Rejection,
    SettlementOutcome, TransferKind,
};
use ferry_proto::{Amount, Balance, ChannelId, Voucher};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn deposits_and_withdrawals_balance_and_show_in_the_statement() {
    let ledger = ledger(config(HOUR)).await;
    let alice = key(1).public();
    let receipt = ledger.deposit(&idem("d1"), &gateway(), &alice, amount("100.5")).await.unwrap();
    assert_eq!(receipt.balance.to_string(), "100.5");
    let receipt =
        ledger.withdraw(&idem("w1"), &alice, amount("0.000000000000000001")).await.unwrap();
    assert_eq!(receipt.balance.to_string(), "100.499999999999999999");

    let statement = ledger.statement(AccountRef::Holder { key: alice }, None, 10).await.unwrap();
    assert_eq!(statement.balance.to_string(), "100.499999999999999999");
    let kinds: Vec<_> = statement.entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [TransferKind::Withdrawal, TransferKind::Deposit]);
    assert_eq!(statement.entries[0].change.to_string(), "-0.000000000000000001");
    assert_eq!(statement.entries[1].balance_after.to_string(), "100.5");
    assert_eq!(statement.entries[1].counterparty, AccountRef::World);
    assert_eq!(statement.next_before, None);

    let world = ledger.statement(AccountRef::World, None, 10).await.unwrap();
    assert_eq!(world.balance.to_string(), "-100.499999999999999999");
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn statements_page_with_a_cursor() {
    let ledger = ledger(config(HOUR)).await;
    let alice = key(1).public();
    for i in 0..5 {
        ledger.deposit(&idem(&format!("d{i}")), &gateway(), &alice, amount("1")).await.unwrap();
    }
    let first = ledger.statement(AccountRef::Holder { key: alice }, None, 2).await.unwrap();
    assert_eq!(first.entries.len(), 2);
    assert_eq!(first.entries[0].balance_after.to_string(), "5");
    let second =
        ledger.statement(AccountRef::Holder { key: alice }, first.next_before, 2).await.unwrap();
    assert_eq!(second.entries[0].balance_after.to_string(), "3");
    let third =
        ledger.statement(AccountRef::Holder { key: alice }, second.next_before, 2).await.unwrap();
    assert_eq!(third.entries.len(), 1);
    assert_eq!(third.next_before, None);
    let nobody =
        ledger.statement(AccountRef::Holder { key: key(9).public() }, None, 2).await.unwrap();
    assert!(nobody.entries.is_empty());
    assert!(matches!(
        ledger.statement(AccountRef::World, None, MAX_STATEMENT_PAGE + 1).await,
        Err(LedgerError::PageSize { .. })
    ));
    assert!(matches!(
        ledger.statement(AccountRef::World, None, 0).await,
        Err(LedgerError::PageSize { .. })
    ));
}

#[tokio::test]
async fn a_channel_lives_settles_and_is_closed_by_its_relay() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let channel = funded_channel(&ledger, &client, &relay, 7, "100", "40").await;
    assert_eq!(channel, ChannelId::derive(&client.public(), &relay.public(), 7));

    let info = ledger.top_up(&idem("top"), &client.public(), &channel, amount("10")).await.unwrap();
    assert_eq!(info.deposited, amount("50"));
    assert_eq!(ledger.balance(&client.public()).await.unwrap().available, money("50"));

    let batch = [voucher(&client, channel, 1, "10"), voucher(&client, channel, 2, "25")];
    let outcomes = ledger.settle(&idem("s1"), &relay.public(), &batch).await.unwrap().outcomes;
    assert_eq!(
        outcomes,
        [
            SettlementOutcome::Settled {
                channel,
                sequence: 1,
                paid: amount("9.75"),
                fee: amount("0.25")
            },
            SettlementOutcome::Settled {
                channel,
                sequence: 2,
                paid: amount("14.625"),
                fee: amount("0.375")
            },
        ]
    );
    let info = ledger
        .close_by_relay(
            &idem("c1"),
            &relay.public(),
            &channel,
            Some(&voucher(&client, channel, 3, "30")),
        )
        .await
        .unwrap();
    assert_eq!(info.state, ChannelState::Closed);
    assert_eq!(
        (info.settled, info.refunded, info.escrow),
        (amount("30"), amount("20"), Amount::ZERO)
    );

    let relay_money = ledger.balance(&relay.public()).await.unwrap();
    assert_eq!(relay_money.available, money("29.25"));
    assert_eq!(relay_money.earned, money("29.25"));
    let client_money = ledger.balance(&client.public()).await.unwrap();
    assert_eq!((client_money.available, client_money.in_escrow), (money("70"), Balance::ZERO));
    let treasury = ledger.statement(AccountRef::Treasury, None, 10).await.unwrap();
    assert_eq!(treasury.balance.to_string(), "0.75");

    let escrow = ledger.statement(AccountRef::Escrow { channel }, None, 100).await.unwrap();
    let kinds: Vec<_> = escrow.entries.iter().rev().map(|e| e.kind).collect();
    use TransferKind::*;
    assert_eq!(
        kinds,
        [Funding, Funding, Settlement, Fee, Settlement, Fee, Settlement, Fee, Refund]
    );
    assert_eq!(escrow.entries[0].counterparty, AccountRef::Holder { key: client.public() });

    // Resubmitting the last voucher after the close pays nothing and says so.
    let again = ledger
        .settle(&idem("s2"), &relay.public(), &[voucher(&client, channel, 3, "30")])
        .await
        .unwrap()
        .outcomes;
    assert_eq!(again, [SettlementOutcome::AlreadySettled { channel, sequence: 3 }]);
    let later = ledger
        .settle(&idem("s3"), &relay.public(), &[voucher(&client, channel, 4, "31")])
        .await
        .unwrap()
        .outcomes;
    assert!(matches!(
        &later[0],
        SettlementOutcome::Rejected { reason: Rejection::ChannelClosed, .. }
    ));
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn a_client_close_leaves_the_relay_its_dispute_window() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "10").await;
    let info = ledger.request_close(&idem("close"), &client.public(), &channel).await.unwrap();
    assert_eq!(info.state, ChannelState::Closing);
    let deadline = info.dispute_deadline.unwrap();
    assert_eq!(deadline - info.close_requested_at.unwrap(), chrono::Duration::hours(1));

    // Inside the window the relay still settles, and nobody can finalize.
    let outcomes = ledger
        .settle(&idem("s"), &relay.public(), &[voucher(&client, channel, 1, "4")])
        .await
        .unwrap()
        .outcomes;
    assert!(matches!(outcomes[0], SettlementOutcome::Settled { .. }));
    assert!(matches!(
        ledger.finalize(&idem("f"), &client.public(), &channel).await,
        Err(LedgerError::DisputeWindowOpen { deadline: d }) if d == deadline
    ));
    assert!(matches!(
        ledger.top_up(&idem("t"), &client.public(), &channel, amount("1")).await,
        Err(LedgerError::WrongState { state: ChannelState::Closing, .. })
    ));
    assert!(matches!(
        ledger.request_close(&idem("close2"), &client.public(), &channel).await,
        Err(LedgerError::WrongState { .. })
    ));
    // The relay may close at once, which refunds the rest.
    let info = ledger.close_by_relay(&idem("rc"), &relay.public(), &channel, None).await.unwrap();
    assert_eq!((info.state, info.refunded), (ChannelState::Closed, amount("6")));
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn after_the_dispute_window_settlement_is_refused_and_finalize_refunds() {
    let ledger = ledger(config(Duration::ZERO)).await;
    let (client, relay) = (key(1), key(2));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "8").await;
    ledger
        .settle(&idem("s1"), &relay.public(), &[voucher(&client, channel, 1, "3")])
        .await
        .unwrap();
    ledger.request_close(&idem("close"), &client.public(), &channel).await.unwrap();

    let late = ledger
        .settle(&idem("s2"), &relay.public(), &[voucher(&client, channel, 2, "8")])
        .await
        .unwrap()
        .outcomes;
    assert!(matches!(
        &late[0],
        SettlementOutcome::Rejected { reason: Rejection::DisputeWindowOver, .. }
    ));
    assert!(matches!(
        ledger
            .close_by_relay(
                &idem("rc"),
                &relay.public(),
                &channel,
                Some(&voucher(&client, channel, 2, "8"))
            )
            .await,
        Err(LedgerError::VoucherRejected(Rejection::DisputeWindowOver))
    ));

    let info = ledger.finalize(&idem("fin"), &client.public(), &channel).await.unwrap();
    assert_eq!(
        (info.state, info.settled, info.refunded),
        (ChannelState::Closed, amount("3"), amount("5"))
    );
    assert_eq!(ledger.balance(&client.public()).await.unwrap().available, money("7"));
    // Finalizing again under the same key replays; under a new key it is refused.
    assert_eq!(ledger.finalize(&idem("fin"), &client.public(), &channel).await.unwrap(), info);
    assert!(matches!(
        ledger.finalize(&idem("fin2"), &client.public(), &channel).await,
        Err(LedgerError::WrongState { state: ChannelState::Closed, .. })
    ));
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn each_bad_voucher_is_rejected_on_its_own() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay, other_relay, mallory) = (key(1), key(2), key(3), key(4));
    let channel = funded_channel(&ledger, &client, &relay, 1, "100", "50").await;
    let foreign = funded_channel(&ledger, &client, &other_relay, 2, "100", "50").await;
    ledger
        .settle(&idem("first"), &relay.public(), &[voucher(&client, channel, 5, "10")])
        .await
        .unwrap();

    let unknown = ChannelId::from_bytes([7; 32]);
    let mut bad_signature = voucher(&client, channel, 6, "11");
    bad_signature.voucher.cumulative = amount("12"); // altered after signing
    let batch = [
        voucher(&mallory, channel, 6, "11"), // forged: signed by another key
        bad_signature,                       // tampered
        voucher(&client, foreign, 6, "11"),  // another relay's channel
        voucher(&client, unknown, 6, "11"),  // no such channel
        voucher(&client, channel, 5, "10"),  // the same voucher again
        voucher(&client, channel, 4, "12"),  // stale sequence
        voucher(&client, channel, 5, "12"),  // reused sequence, new amount
        voucher(&client, channel, 6, "9"),   // amount decreased
        voucher(&client, channel, 6, "50.000000000000000001"), // more than deposited
        voucher(&client, channel, u64::MAX, "11"), // beyond the stored range
        voucher(&client, channel, 6, "20"),  // the one good voucher
    ];
    let outcomes = ledger.settle(&idem("bad"), &relay.public(), &batch).await.unwrap().outcomes;
    let reasons: Vec<Option<Rejection>> = outcomes
        .iter()
        .map(|o| match o {
            SettlementOutcome::Rejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            Some(Rejection::BadSignature),
            Some(Rejection::BadSignature),
            Some(Rejection::WrongRelay),
            Some(Rejection::UnknownChannel),
            None,
            Some(Rejection::StaleSequence { sequence: 4, last: 5 }),
            Some(Rejection::StaleSequence { sequence: 5, last: 5 }),
            Some(Rejection::AmountDecreased { cumulative: amount("9"), settled: amount("10") }),
            Some(Rejection::ExceedsEscrow {
                cumulative: amount("50.000000000000000001"),
                deposited: amount("50")
            }),
            Some(Rejection::SequenceOutOfRange),
            None,
        ]
    );
    assert_eq!(outcomes[4], SettlementOutcome::AlreadySettled { channel, sequence: 5 });
    assert_eq!(
        outcomes[10],
        SettlementOutcome::Settled {
            channel,
            sequence: 6,
            paid: amount("9.75"),
            fee: amount("0.25")
        }
    );
    let info = ledger.channel(&channel).await.unwrap();
    assert_eq!((info.settled, info.last_sequence), (amount("20"), 6));
    assert_eq!(ledger.balance(&relay.public()).await.unwrap().available, money("19.5"));
    assert_eq!(ledger.channel(&foreign).await.unwrap().settled, Amount::ZERO);
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn repeating_an_operation_replays_it_and_moves_no_money() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let alice = client.public();
    let first = ledger.deposit(&idem("same"), &gateway(), &alice, amount("5")).await.unwrap();
    assert_eq!(
        ledger.deposit(&idem("same"), &gateway(), &alice, amount("5")).await.unwrap(),
        first
    );
    assert_eq!(ledger.balance(&alice).await.unwrap().available, money("5"));
    assert!(matches!(
        ledger.deposit(&idem("same"), &gateway(), &alice, amount("6")).await,
        Err(LedgerError::IdempotencyConflict(_))
    ));
    // The signer's key names one request: a deposit under it to another
    // holder is a conflict too.
    assert!(matches!(
        ledger.deposit(&idem("same"), &gateway(), &relay.public(), amount("5")).await,
        Err(LedgerError::IdempotencyConflict(_))
    ));
    // Keys are the signer's: the holder's own withdrawal under the gateway's
    // key is another request, and a holder who used a key first does not
    // block the gateway's deposit under it.
    ledger.withdraw(&idem("same"), &alice, amount("1")).await.unwrap();
    ledger.withdraw(&idem("next"), &alice, amount("1")).await.unwrap();
    ledger.deposit(&idem("next"), &gateway(), &alice, amount("2")).await.unwrap();
    assert_eq!(ledger.balance(&alice).await.unwrap().available, money("5"));
    ledger.deposit(&idem("same"), &relay.public(), &relay.public(), amount("1")).await.unwrap();

    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "10").await;
    let batch = [voucher(&client, channel, 1, "4")];
    let first = ledger.settle(&idem("settle"), &relay.public(), &batch).await.unwrap();
    assert!(!first.replayed);
    // A retried batch gets the first answer ("settled"), not "already
    // settled", and says it is a replay, so nothing counts it twice.
    let retried = ledger.settle(&idem("settle"), &relay.public(), &batch).await.unwrap();
    assert_eq!((retried.outcomes, retried.replayed), (first.outcomes, true));
    assert_eq!(ledger.channel(&channel).await.unwrap().settled, amount("4"));
    assert!(matches!(
        ledger.settle(&idem("settle"), &relay.public(), &[voucher(&client, channel, 2, "5")]).await,
        Err(LedgerError::IdempotencyConflict(_))
    ));
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay, stranger) = (key(1), key(2), key(3));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "5").await;
    let before = ledger.check().await.unwrap();
    let client_before = ledger.balance(&client.public()).await.unwrap();

    let c = client.public();
    let r = relay.public();
    assert!(matches!(
        ledger.deposit(&idem("z"), &gateway(), &c, Amount::ZERO).await,
        Err(LedgerError::ZeroAmount)
    ));
    assert!(matches!(
        ledger.withdraw(&idem("z"), &c, Amount::ZERO).await,
        Err(LedgerError::ZeroAmount)
    ));
    assert!(matches!(
        ledger.withdraw(&idem("big"), &c, amount("5.000000000000000001")).await,
        Err(LedgerError::InsufficientBalance { needed, .. }) if needed == amount("5.000000000000000001")
    ));
    assert!(matches!(
        ledger.open_channel(&idem("o1"), &c, &r, 2, amount("6")).await,
        Err(LedgerError::InsufficientBalance { .. })
    ));
    assert!(matches!(
        ledger.channel(&ChannelId::derive(&c, &r, 2)).await,
        Err(LedgerError::UnknownChannel(_))
    ));
    assert!(matches!(
        ledger.open_channel(&idem("o2"), &c, &c, 2, amount("1")).await,
        Err(LedgerError::SameKey)
    ));
    assert!(matches!(
        ledger.open_channel(&idem("o3"), &c, &r, 1, amount("1")).await,
        Err(LedgerError::ChannelExists(id)) if id == channel
    ));
    assert!(matches!(
        ledger.open_channel(&idem("o4"), &c, &r, 2, Amount::ZERO).await,
        Err(LedgerError::ZeroAmount)
    ));
    assert!(matches!(
        ledger.top_up(&idem("t1"), &stranger.public(), &channel, amount("1")).await,
        Err(LedgerError::NotParticipant { role: "client" })
    ));
    assert!(matches!(
        ledger.top_up(&idem("t2"), &c, &channel, amount("5.1")).await,
        Err(LedgerError::InsufficientBalance { .. })
    ));
    assert!(matches!(
        ledger.top_up(&idem("t3"), &c, &ChannelId::from_bytes([1; 32]), amount("1")).await,
        Err(LedgerError::UnknownChannel(_))
    ));
    assert!(matches!(
        ledger.request_close(&idem("rc"), &r, &channel).await,
        Err(LedgerError::NotParticipant { role: "client" })
    ));
    assert!(matches!(
        ledger.close_by_relay(&idem("cr"), &stranger.public(), &channel, None).await,
        Err(LedgerError::NotParticipant { role: "relay" })
    ));
    assert!(matches!(
        ledger
            .close_by_relay(&idem("cr2"), &r, &channel, Some(&voucher(&client, channel, 1, "6")))
            .await,
        Err(LedgerError::VoucherRejected(Rejection::ExceedsEscrow { .. }))
    ));
    assert!(matches!(
        ledger
            .close_by_relay(&idem("cr3"), &r, &channel, Some(&voucher(&stranger, channel, 1, "1")))
            .await,
        Err(LedgerError::VoucherRejected(Rejection::BadSignature))
    ));
    assert!(matches!(
        ledger.finalize(&idem("f"), &client.public(), &channel).await,
        Err(LedgerError::WrongState { .. })
    ));
    let too_many = vec![voucher(&client, channel, 1, "1"); MAX_SETTLEMENT_BATCH + 1];
    assert!(matches!(
        ledger.settle(&idem("many"), &r, &too_many).await,
        Err(LedgerError::BatchTooLarge { .. })
    ));
    let after = ledger.check().await.unwrap();
    assert!(after.is_ok(), "{:#?}", after.violations);
    assert_eq!(after.channels, before.channels);
    assert_eq!(after.transfers, before.transfers);
    assert_eq!(after.accounts, before.accounts);
    assert_eq!(ledger.balance(&client.public()).await.unwrap(), client_before);
    let info = ledger.channel(&channel).await.unwrap();
    assert_eq!(
        (info.state, info.settled, info.deposited),
        (ChannelState::Open, Amount::ZERO, amount("5"))
    );
}

#[tokio::test]
async fn the_check_detects_a_tampered_database() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "5").await;
    assert_invariants(&ledger).await;
    // Money created out of nothing: a balance no transfer explains.
    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE holder_key = $1")
        .bind(client.public().as_bytes().as_slice())
        .execute(ledger.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE channels SET settled = 1 WHERE id = $1")
        .bind(channel.as_bytes().as_slice())
        .execute(ledger.pool())
        .await
        .unwrap();
    // A transfer from an account that does not exist.
    sqlx::query(
        "INSERT INTO transfers (operation_id, kind, debit_account, credit_account, amount, \
                                debit_balance_after, credit_balance_after) \
         VALUES (1, 'deposit', 999999, 1, 1, 0, 0)",
    )
    .execute(ledger.pool())
    .await
    .unwrap();
    let report = ledger.check().await.unwrap();
    let broken: Vec<&str> = report.violations.iter().map(|v| v.invariant).collect();
    assert!(
        broken.contains(&"every transfer references an existing operation, accounts and channel")
    );
    assert!(
        broken.contains(&"each account's balance equals its credits minus its debits"),
        "{broken:?}"
    );
    assert!(broken.contains(&"the sum of all balances is zero"), "{broken:?}");
    assert!(
        broken.contains(&"each channel's escrow equals deposited minus settled minus refunded")
    );
    assert!(broken.contains(&"each channel's totals equal its transfers"));
    // History cannot be rewritten.
    let rewrite = sqlx::query("UPDATE transfers SET amount = 1").execute(ledger.pool()).await;
    assert!(rewrite.is_err());
    for table in ["transfers", "accounts", "channels", "operations"] {
        let erase = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
            .execute(ledger.pool())
            .await;
        assert!(erase.is_err(), "{table} rows could be deleted");
    }
}

#[tokio::test]
async fn vouchers_signed_for_one_channel_do_not_pay_on_another() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let a = funded_channel(&ledger, &client, &relay, 1, "10", "5").await;
    ledger
        .open_channel(&idem("open-b"), &client.public(), &relay.public(), 2, amount("5"))
        .await
        .unwrap();
    let b = ChannelId::derive(&client.public(), &relay.public(), 2);
    let mut moved = voucher(&client, a, 1, "3");
    moved.voucher = Voucher { channel: b, ..moved.voucher };
    let outcomes = ledger.settle(&idem("s"), &relay.public(), &[moved]).await.unwrap().outcomes;
    assert!(matches!(
        &outcomes[0],
        SettlementOutcome::Rejected { reason: Rejection::BadSignature, .. }
    ));
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn a_holder_may_hold_more_than_one_maximum_amount() {
    let ledger = ledger(config(HOUR)).await;
    let whale = key(1).public();
    ledger.deposit(&idem("d1"), &gateway(), &whale, Amount::MAX).await.unwrap();
    ledger.deposit(&idem("d2"), &gateway(), &whale, Amount::MAX).await.unwrap();
    let summary = ledger.balance(&whale).await.unwrap();
    assert_eq!(summary.available, money("20000000000"));
    // Withdrawals are amounts, so a large balance leaves in parts.
    ledger.withdraw(&idem("w1"), &whale, Amount::MAX).await.unwrap();
    ledger.withdraw(&idem("w2"), &whale, Amount::MAX).await.unwrap();
    assert_eq!(ledger.balance(&whale).await.unwrap().available, Balance::ZERO);
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn sequence_zero_is_out_of_range_not_already_settled() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay) = (key(1), key(2));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "10").await;
    let outcomes = ledger
        .settle(&idem("s"), &relay.public(), &[voucher(&client, channel, 0, "0")])
        .await
        .unwrap()
        .outcomes;
    assert!(matches!(
        &outcomes[0],
        SettlementOutcome::Rejected { reason: Rejection::SequenceOutOfRange, .. }
    ));
}

#[tokio::test]
async fn naming_another_relays_channels_takes_none_of_their_locks() {
    let ledger = ledger(config(HOUR)).await;
    let (client, relay, attacker) = (key(1), key(2), key(3));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "10").await;
    // Hold the victim channel's row lock in another transaction.
    let mut holder = ledger.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM channels WHERE id = $1 FOR UPDATE")
        .bind(channel.as_bytes().as_slice())
        .execute(&mut *holder)
        .await
        .unwrap();
    // The attacker's batch does not wait for that lock; it is refused.
    let (key, attacker_key, batch) =
        (idem("a"), attacker.public(), [voucher(&client, channel, 1, "10")]);
    let attack = ledger.settle(&key, &attacker_key, &batch);
    let outcomes = tokio::time::timeout(Duration::from_secs(10), attack)
        .await
        .expect("a foreign channel's lock was awaited")
        .unwrap()
        .outcomes;
    assert!(matches!(
        &outcomes[0],
        SettlementOutcome::Rejected { reason: Rejection::WrongRelay, .. }
    ));
    holder.rollback().await.unwrap();
    assert_eq!(ledger.channel(&channel).await.unwrap().settled, Amount::ZERO);
}

#[tokio::test]
async fn finalizing_anothers_channel_does_not_use_up_their_idempotency_keys() {
    let ledger = ledger(config(Duration::ZERO)).await;
    let (client, relay, stranger) = (key(1), key(2), key(3));
    let channel = funded_channel(&ledger, &client, &relay, 1, "10", "4").await;
    ledger.request_close(&idem("close"), &client.public(), &channel).await.unwrap();
    // A stranger finalizes, choosing a key the client will use later.
    let info = ledger.finalize(&idem("withdraw-1"), &stranger.public(), &channel).await.unwrap();
    assert_eq!(info.refunded, amount("4"));
    let receipt =
        ledger.withdraw(&idem("withdraw-1"), &client.public(), amount("10")).await.unwrap();
    assert_eq!(receipt.balance, Balance::ZERO);
    assert_invariants(&ledger).await;
}

#[tokio::test]
async fn failed_requests_create_no_accounts() {
    let ledger = ledger(config(HOUR)).await;
    let (nobody, relay) = (key(1).public(), key(2).public());
    let before = ledger.check().await.unwrap().accounts;
    assert!(matches!(
        ledger.withdraw(&idem("w"), &nobody, amount("1")).await,
        Err(LedgerError::InsufficientBalance { available, .. }) if available == Balance::ZERO
    ));
    assert!(matches!(
        ledger.open_channel(&idem("o"), &nobody, &relay, 1, amount("1")).await,
        Err(LedgerError::InsufficientBalance { .. })
    ));
    assert_eq!(ledger.check().await.unwrap().accounts, before);
}

#[tokio::test]
async fn out_of_range_configuration_is_refused() {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let fee = ferry_ledger::LedgerConfig { fee_basis_points: 10_001, ..config(HOUR) };
    assert!(matches!(
        ferry_ledger::Ledger::connect(options.clone(), fee).await,
        Err(LedgerError::InvalidConfig(_))
    ));
    let window = config(ferry_ledger::MAX_DISPUTE_WINDOW + Duration::from_secs(1));
    assert!(matches!(
        ferry_ledger::Ledger::connect(options, window).await,
        Err(LedgerError::InvalidConfig(_))
    ));
}
