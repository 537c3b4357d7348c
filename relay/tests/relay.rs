//! The relay over real sockets on 127.0.0.1:0, paid through a real registry
//! and ledger on PostgreSQL: pairing and forwarding, refusals, the credit
//! window, bad vouchers, slow handshakes and settlement after a crash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ferry_client::relay::{self, Event, Payer, RelayAddress, RelayError, Session};
use ferry_proto::wire::{CloseReason, DialFailure, ListenPolicy, VoucherVerdict};
use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, SecretKey, Voucher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;

use common::{Registry, RunningRelay, WAIT, key, store_dir};

async fn next(session: &Session) -> Event {
    tokio::time::timeout(WAIT, session.next_event()).await.expect("an event in time").expect("open")
}

/// Accepts every incoming tunnel on `listener`'s session and hands back
/// the streams.
fn accept_all(
    relay: RelayAddress,
    me: SecretKey,
    session: Session,
) -> tokio::sync::mpsc::Receiver<tokio::net::TcpStream> {
    let (streams, received) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(event) = session.next_event().await {
            if let Event::Incoming { tunnel, .. } = event {
                let stream = relay::accept(&relay, &me, tunnel).await.unwrap();
                if streams.send(stream).await.is_err() {
                    return;
                }
            }
        }
    });
    received
}

fn random_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[seed]);
    let mut reader = hasher.finalize_xof();
    bytes.resize(len, 0);
    reader.fill(&mut bytes);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_tunnel_carries_bytes_intact_both_ways_and_the_relay_is_settled() {
    let registry = Registry::start().await;
    let (relay_key, caller, callee) = (key(1), key(2), key(3));
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, store_dir("paid")).await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;

    let listener = Session::open(&relay.address, &callee, None, None).await.unwrap();
    listener.listen(ListenPolicy::Open).await.unwrap();
    let mut accepted = accept_all(relay.address.clone(), callee.clone(), listener);
    let payer = Payer::new(channel, caller.clone());
    let session = Session::open(&relay.address, &caller, Some(channel), Some(payer)).await.unwrap();

    let mut near = session.dial(callee.public()).await.unwrap();
    let mut far = tokio::time::timeout(WAIT, accepted.recv()).await.unwrap().unwrap();
    let (up, down) = (random_bytes(3 << 20, 1), random_bytes(1 << 20, 2));
    let (up_sent, down_sent) = (up.clone(), down.clone());
    let sending = tokio::spawn(async move {
        near.write_all(&up_sent).await.unwrap();
        near.shutdown().await.unwrap();
        let mut back = Vec::new();
        near.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, far.read_to_end(&mut received)).await.unwrap().unwrap();
    far.write_all(&down_sent).await.unwrap();
    far.shutdown().await.unwrap();
    let back = tokio::time::timeout(WAIT, sending).await.unwrap().unwrap();
    assert_eq!(blake3::hash(&received), blake3::hash(&up), "caller → callee intact");
    assert_eq!(blake3::hash(&back), blake3::hash(&down), "callee → caller intact");

    // The caller was billed for both directions and its vouchers accepted.
    let carried = (up.len() + down.len()) as u64;
    // The caller paid as it counted; closing pays the tail and waits for
    // the relay's verdict. The relay never billed beyond what it carried.
    tokio::time::timeout(WAIT, session.close()).await.unwrap().unwrap();
    assert_eq!(
        *session.paid().borrow(),
        Amount::from_attos(u128::from(carried) * 1_000_000_000).unwrap(),
        "paid for every byte carried, no more"
    );
    while let Some(event) = tokio::time::timeout(WAIT, session.next_event()).await.unwrap() {
        match event {
            Event::Invoice { carried_bytes, .. } => {
                assert!(carried_bytes <= carried, "billed {carried_bytes} of {carried} bytes");
            }
            Event::VoucherResult { verdict, .. } => assert_eq!(verdict, VoucherVerdict::Accepted),
            Event::Closed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let metrics = relay.relay.metrics();
    let report = relay.shutdown().await;
    assert!(!report.incomplete && report.rejected == 0, "{report:?}");
    assert!(metrics.vouchers_with("accepted") >= 1);
    // Vouchers now mostly arrive before their invoices, so few round trips
    // are timed; the histogram is there all the same.
    assert!(metrics.render().contains("ferry_relay_payment_round_trip_seconds_count"));

    // The ledger paid the relay for what the last voucher covered.
    let view = registry.client(&relay_key).channel(&channel).await.unwrap();
    let due = Amount::from_attos(u128::from(carried) * 1_000_000_000).unwrap();
    assert_eq!(view.settled, due);
    // The money metric says what the ledger says.
    let settled_metric = metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("ferry_relay_revenue_units{state=\"settled\"} "))
        .map(|value| value.parse::<f64>().unwrap());
    assert_eq!(settled_metric, Some(due.to_string().parse::<f64>().unwrap()));
    registry.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_to_unknown_closed_or_refusing_peers_fail_with_the_reason() {
    let registry = Registry::start().await;
    let (relay_key, caller, callee, stranger) = (key(1), key(2), key(3), key(4));
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, store_dir("refusals")).await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;
    let payer = Payer::new(channel, caller.clone());
    let _session =
        Session::open(&relay.address, &caller, Some(channel), Some(payer)).await.unwrap();
    let dial = |peer: PublicKey| {
        let (address, caller) = (relay.address.clone(), caller.clone());
        async move { relay::dial(&address, &caller, peer).await }
    };

    let failure = |result: Result<_, RelayError>| match result {
        Err(RelayError::DialFailed(reason)) => reason,
        other => panic!("expected a dial failure, got {:?}", other.map(|_| ())),
    };
    assert_eq!(failure(dial(stranger.public()).await), DialFailure::UnknownPeer);

    let listener = Session::open(&relay.address, &callee, None, None).await.unwrap();
    assert_eq!(failure(dial(callee.public()).await), DialFailure::Rejected, "not listening");
    listener.listen(ListenPolicy::Allow(vec![stranger.public()])).await.unwrap();
    // The policy change is ordered before the next dial by a round trip.
    let _ = Session::open(&relay.address, &stranger, None, None).await.unwrap();
    assert_eq!(failure(dial(callee.public()).await), DialFailure::Rejected, "not allowed");

    listener.listen(ListenPolicy::Open).await.unwrap();
    let _ = Session::open(&relay.address, &stranger, None, None).await.unwrap();
    let dialing = tokio::spawn(dial(callee.public()));
    let Event::Incoming { tunnel, caller: who } = next(&listener).await else {
        panic!("expected an incoming tunnel");
    };
    assert_eq!(who, caller.public());
    listener.reject(tunnel).await.unwrap();
    assert_eq!(failure(dialing.await.unwrap()), DialFailure::Rejected, "refused by the callee");

    // A caller without a paid session may not dial at all.
    assert_eq!(
        failure(relay::dial(&relay.address, &stranger, callee.public()).await),
        DialFailure::NotPaid
    );
    // A relay that is not the advertised one is detected.
    let impostor = RelayAddress { key: stranger.public(), ..relay.address.clone() };
    assert!(matches!(
        relay::dial(&impostor, &caller, callee.public()).await,
        Err(RelayError::Impostor)
    ));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaying_client_gets_no_more_than_the_credit_window() {
    let registry = Registry::start().await;
    let (relay_key, caller, callee) = (key(1), key(2), key(3));
    let window = 256 * 1024u64;
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        |config| {
            config.credit_window_bytes = window;
            config.limits.payment_grace = Duration::from_millis(500);
        },
        store_dir("window"),
    )
    .await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;
    let listener = Session::open(&relay.address, &callee, None, None).await.unwrap();
    listener.listen(ListenPolicy::Open).await.unwrap();
    let mut accepted = accept_all(relay.address.clone(), callee.clone(), listener);
    // No payer: invoices go unanswered.
    let session = Session::open(&relay.address, &caller, Some(channel), None).await.unwrap();
    let mut near = relay::dial(&relay.address, &caller, callee.public()).await.unwrap();
    let mut far = tokio::time::timeout(WAIT, accepted.recv()).await.unwrap().unwrap();
    tokio::spawn(async move {
        let _ = near.write_all(&random_bytes(8 << 20, 3)).await;
        near
    });
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, far.read_to_end(&mut received)).await.unwrap().unwrap();
    assert!(received.len() as u64 <= window, "carried {} > window {window}", received.len());
    assert!(received.len() as u64 > window / 2, "the window itself is carried");
    loop {
        match next(&session).await {
            Event::TunnelClosed { reason, .. } => {
                assert_eq!(reason, CloseReason::NotPaid);
                break;
            }
            Event::Invoice { carried_bytes, .. } => assert!(carried_bytes <= window),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(relay.relay.metrics().render().contains("ferry_relay_throttled_total"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_vouchers_are_refused_and_counted() {
    let registry = Registry::start().await;
    let (relay_key, caller, mallory) = (key(1), key(2), key(5));
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, store_dir("vouchers")).await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;
    let session = Session::open(&relay.address, &caller, Some(channel), None).await.unwrap();
    let voucher = |sequence: u64, amount: &str, signer: &SecretKey, channel: ChannelId| {
        Voucher { channel, sequence, cumulative: amount.parse().unwrap() }.sign(signer)
    };
    let other_channel = ChannelId::derive(&caller.public(), &relay_key.public(), 99);
    let cases = [
        (voucher(1, "1", &caller, channel), VoucherVerdict::Accepted),
        (voucher(1, "2", &caller, channel), VoucherVerdict::Replayed),
        // Nothing carried, nothing settled: a lower amount hands the
        // prepayment back.
        (voucher(2, "0.5", &caller, channel), VoucherVerdict::Accepted),
        (voucher(3, "2", &mallory, channel), VoucherVerdict::Forged),
        (voucher(3, "2", &caller, other_channel), VoucherVerdict::WrongChannel),
        (voucher(3, "11", &caller, channel), VoucherVerdict::OverEscrow),
        (voucher(3, "2", &caller, channel), VoucherVerdict::Accepted),
    ];
    for (signed, expected) in cases {
        session.pay(signed).await.unwrap();
        match next(&session).await {
            Event::VoucherResult { sequence, verdict } => {
                assert_eq!((sequence, verdict), (signed.voucher.sequence, expected));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let metrics = relay.relay.metrics();
    for (verdict, count) in
        [("accepted", 3), ("replayed", 1), ("forged", 1), ("wrong_channel", 1), ("over_escrow", 1)]
    {
        assert_eq!(metrics.vouchers_with(verdict), count, "{verdict}");
    }
    let report = relay.shutdown().await;
    assert_eq!((report.settled, report.rejected), (1, 0));
    let view = registry.client(&relay_key).channel(&channel).await.unwrap();
    assert_eq!(view.settled.to_string(), "2", "only the newest good voucher counts");
    registry.assert_invariants().await;
}

/// How one voucher of a random run is drawn, relative to the newest one
/// both sides took: near every edge either side checks.
#[derive(Debug, Clone, Copy)]
enum Sequence {
    Next,
    Ahead(u64),
    Same,
    Behind,
    Zero,
    Largest,
    AboveLargest,
    Any(u64),
}

#[derive(Debug, Clone, Copy)]
enum Cumulative {
    Same,
    More(u128),
    Less,
    Escrow,
    AboveEscrow,
    Any(u128),
}

#[derive(Debug, Clone, Copy)]
struct Draw {
    sequence: Sequence,
    cumulative: Cumulative,
    forged: bool,
    other_channel: bool,
}

fn arb_draw() -> impl proptest::strategy::Strategy<Value = Draw> {
    use proptest::prelude::*;
    let max_attos = Amount::MAX.attos();
    let sequence = prop_oneof![
        4 => Just(Sequence::Next),
        2 => (1u64..1_000).prop_map(Sequence::Ahead),
        1 => Just(Sequence::Same),
        1 => Just(Sequence::Behind),
        1 => Just(Sequence::Zero),
        1 => Just(Sequence::Largest),
        1 => Just(Sequence::AboveLargest),
        1 => any::<u64>().prop_map(Sequence::Any),
    ];
    let cumulative = prop_oneof![
        2 => Just(Cumulative::Same),
        4 => (1u128..1_000_000_000_000_000_000).prop_map(Cumulative::More),
        1 => Just(Cumulative::Less),
        1 => Just(Cumulative::Escrow),
        1 => Just(Cumulative::AboveEscrow),
        1 => (0..=max_attos).prop_map(Cumulative::Any),
    ];
    (sequence, cumulative, proptest::bool::weighted(0.1), proptest::bool::weighted(0.05)).prop_map(
        |(sequence, cumulative, forged, other_channel)| Draw {
            sequence,
            cumulative,
            forged,
            other_channel,
        },
    )
}

/// Random vouchers get the same verdict from the relay's check and the
/// ledger's: each is sent to a real relay and then settled with the real
/// ledger, and the relay accepts exactly the ones the ledger pays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_counts_exactly_the_vouchers_the_ledger_settles() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    const ESCROW: &str = "10";
    let registry = Registry::start().await;
    let relay_key = key(1);
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        // Only this test settles, so each voucher's ledger verdict is its own.
        |config| config.settle_interval = Duration::from_secs(3600),
        store_dir("agree"),
    )
    .await;
    let handle = tokio::runtime::Handle::current();
    let cases = std::sync::atomic::AtomicU32::new(0);
    let config = Config { cases: 6, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(arb_draw(), 1..40);
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |draws| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            handle.block_on(async {
                // A fresh client and channel per case: shrinking reruns too.
                let mut seed = [0x40u8; 32];
                seed[..4].copy_from_slice(&case.to_be_bytes());
                let client = SecretKey::from_seed(&seed);
                let mallory = key(5);
                let channel = registry.fund(&client, &relay_key.public(), ESCROW).await;
                let escrow: Amount = ESCROW.parse().unwrap();
                let other = ChannelId::derive(&client.public(), &relay_key.public(), 99);
                // A new channel is a stranger to the relay, whose lookups of
                // strangers are rationed: it says when to retry.
                let session = tokio::time::timeout(WAIT, async {
                    loop {
                        match Session::open(&relay.address, &client, Some(channel), None).await {
                            Err(RelayError::Closed {
                                reason: CloseReason::Unavailable, ..
                            }) => {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            opened => break opened.unwrap(),
                        }
                    }
                })
                .await
                .expect("the relay takes the session in time");
                let (mut sequence, mut paid) = (0u64, Amount::ZERO);
                for (index, draw) in draws.iter().enumerate() {
                    let next_sequence = match draw.sequence {
                        Sequence::Next => sequence.saturating_add(1),
                        Sequence::Ahead(by) => sequence.saturating_add(by),
                        Sequence::Same => sequence,
                        Sequence::Behind => sequence.saturating_sub(1),
                        Sequence::Zero => 0,
                        Sequence::Largest => ferry_proto::MAX_SEQUENCE,
                        Sequence::AboveLargest => ferry_proto::MAX_SEQUENCE + 1,
                        Sequence::Any(any) => any,
                    };
                    let attos = match draw.cumulative {
                        Cumulative::Same => paid.attos(),
                        Cumulative::More(by) => paid.attos().saturating_add(by),
                        Cumulative::Less => paid.attos().saturating_sub(1),
                        Cumulative::Escrow => escrow.attos(),
                        Cumulative::AboveEscrow => escrow.attos() + 1,
                        Cumulative::Any(any) => any,
                    };
                    let voucher = Voucher {
                        channel: if draw.other_channel { other } else { channel },
                        sequence: next_sequence,
                        cumulative: Amount::from_attos(attos.min(Amount::MAX.attos())).unwrap(),
                    };
                    let signed = voucher.sign(if draw.forged { &mallory } else { &client });
                    session.pay(signed).await.unwrap();
                    let verdict = loop {
                        if let Event::VoucherResult { verdict, .. } = next(&session).await {
                            break verdict;
                        }
                    };
                    let idempotency: ferry_ledger::IdempotencyKey =
                        format!("agree-{case}-{index}").parse().unwrap();
                    let settlement = registry
                        .ledger
                        .settle(&idempotency, &relay_key.public(), &[signed])
                        .await
                        .unwrap();
                    let ledger_pays = matches!(
                        settlement.outcomes[0],
                        ferry_ledger::SettlementOutcome::Settled { .. }
                    );
                    proptest::prop_assert_eq!(
                        verdict == VoucherVerdict::Accepted,
                        ledger_pays,
                        "voucher {:?}: relay {:?}, ledger {:?}",
                        voucher,
                        verdict,
                        settlement.outcomes[0]
                    );
                    if ledger_pays {
                        (sequence, paid) = (voucher.sequence, voucher.cumulative);
                    }
                }
                session.close().await.unwrap();
                let view = registry.client(&relay_key).channel(&channel).await.unwrap();
                proptest::prop_assert_eq!(view.settled, paid);
                Ok::<(), TestCaseError>(())
            })
        })
    });
    result.unwrap();
    relay.shutdown().await;
    registry.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_from_its_voucher_log_settles_every_voucher_written_to_it() {
    let registry = Registry::start().await;
    let (relay_key, caller) = (key(1), key(2));
    let dir = store_dir("crash");
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, dir.clone()).await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;
    let session = Session::open(&relay.address, &caller, Some(channel), None).await.unwrap();
    let voucher = Voucher { channel, sequence: 1, cumulative: "3".parse().unwrap() }.sign(&caller);
    session.pay(voucher).await.unwrap();
    assert!(matches!(
        next(&session).await,
        Event::VoucherResult { verdict: VoucherVerdict::Accepted, .. }
    ));
    // A voucher counts once verified; it reaches the log in the next group
    // commit, a few milliseconds later.
    let written = async {
        while std::fs::read(dir.join("vouchers.log")).unwrap().iter().take(128).all(|b| *b == 0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(WAIT, written).await.expect("the voucher reaches the log");
    // The relay stops without shutting down or settling; a new relay with
    // the same key starts from its voucher log alone, copied as a crash
    // leaves it (the first relay's process lives on here and holds the
    // data directory's lock, as a process that has not died would).
    let RunningRelay { stop, store_dir, .. } = relay;
    drop(stop);
    assert_eq!(store_dir, dir);
    let copy = common::store_dir("crash-copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(dir.join("vouchers.log"), copy.join("vouchers.log")).unwrap();
    let restarted = RunningRelay::start(&registry, &relay_key, |_| {}, copy).await;
    let report = restarted.shutdown().await;
    assert_eq!(report.settled, 1, "{report:?}");
    let view = registry.client(&relay_key).channel(&channel).await.unwrap();
    assert_eq!(view.settled.to_string(), "3");
    registry.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_does_not_hold_a_slot() {
    let registry = Registry::start().await;
    let relay_key = key(1);
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        |config| {
            config.limits.handshake_timeout = Duration::from_millis(300);
            config.limits.connections_per_ip = 1;
        },
        store_dir("slow"),
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(&relay.address.address).await.unwrap();
    // While it holds the address's only slot, nobody else from it gets in.
    let refused = Session::open(&relay.address, &key(2), None, None).await;
    assert!(refused.is_err(), "the second connection from the address is refused");
    // The relay drops the silent one at its handshake timeout...
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, silent.read(&mut byte)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "the relay closed the silent connection");
    // ...and the slot is free again (the count drops when the task ends).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if Session::open(&relay.address, &key(2), None, None).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_probes_relays_and_an_impostor_or_a_dead_relay_fails() {
    let registry = Registry::start_probing(Some(Duration::from_millis(200))).await;
    let (honest_key, impostor_key, dead_key) = (key(1), key(7), key(8));
    let honest =
        RunningRelay::start(&registry, &honest_key, |_| {}, store_dir("probe-honest")).await;
    // An advertisement naming the honest relay's address under another key,
    // and one naming an address where nothing listens.
    let closed_port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    for (key, address) in
        [(&impostor_key, honest.address.address.clone()), (&dead_key, closed_port.to_string())]
    {
        let advert = ferry_proto::RelayAdvert {
            relay: key.public(),
            address,
            price_per_byte: PricePerByte::from_attos(1).unwrap(),
            credit_window_bytes: 1024,
            capacity_bytes_per_sec: 1024,
            region: "test".into(),
            protocol_version: ferry_proto::PROTOCOL_VERSION,
            issued_at_ms: 1_700_000_000_000,
        }
        .sign(key);
        registry.client(key).publish_advert(&advert).await.unwrap();
    }
    let reachability =
        |view: &serde_json::Value| view["reputation"]["reachability_24h"].as_f64().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let detail = |key: &SecretKey| {
            let url = format!("{}/v1/relays/{}", registry.base, key.public());
            async move { reqwest::get(url).await.unwrap().json::<serde_json::Value>().await.unwrap() }
        };
        let (good, fake, dead) =
            (detail(&honest_key).await, detail(&impostor_key).await, detail(&dead_key).await);
        if reachability(&good) > 0.6 && reachability(&fake) < 0.4 && reachability(&dead) < 0.4 {
            assert!(good["reputation"]["probe_rtt_ms"].as_f64().unwrap() >= 0.0);
            assert!(fake["reputation"]["probe_rtt_ms"].is_null());
            assert!(good["reputation"]["score"].as_f64() > fake["reputation"]["score"].as_f64());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "probes never told them apart: {good} {fake}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Probes hang up once the relay proved its key: counted as probes, not
    // as refused handshakes.
    let metrics = honest.relay.metrics().render();
    let probed: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("ferry_relay_probed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(probed > 0, "{metrics}");
    assert!(!metrics.contains("reason=\"handshake\""), "{metrics}");
    honest.shutdown().await;
}
