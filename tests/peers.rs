//! Two peers of the market, end to end, through the client SDK's
//! [`Endpoint`]: one listens on two relays and publishes them; the other
//! dials its key, pays, and keeps its stream when the relay carrying it is
//! killed. A recording proxy in front of a relay shows that the relay
//! carries only ciphertext. The ledger's invariants hold after each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../relay/tests/common/mod.rs"]
mod common;
mod process;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Registry, RunningRelay, key, operator, store_dir};
use ferry_client::relay::RelayAddress;
use ferry_client::select::SelectionPolicy;
use ferry_client::wallet::Budget;
use ferry_client::{Endpoint, EndpointConfig};
use ferry_proto::{Amount, PublicKey, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = process::WAIT;

fn amount(text: &str) -> Amount {
    text.parse().unwrap()
}

/// A policy that takes any live relay: these relays are too new to have
/// earned a reputation.
fn any_relay() -> SelectionPolicy {
    SelectionPolicy { min_reputation: 0.0, ..SelectionPolicy::default() }
}

/// Waits until the registry lists every relay in `relays` as live.
async fn listed(registry: &Registry, relays: &[PublicKey]) {
    let client = registry.client(&key(99));
    let seen = async {
        loop {
            let offers = client.offers(&any_relay()).await.unwrap();
            if relays.iter().all(|relay| offers.iter().any(|offer| offer.key() == *relay)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, seen).await.expect("the relays are listed in time");
}

/// A paying endpoint for `me`, funded with `deposit` by the operator.
async fn payer(registry: &Registry, me: &SecretKey, deposit: &str, budget: Budget) -> Endpoint {
    let idempotency = format!("fund-{}", &me.public().to_string()[..16]);
    registry
        .client(&operator())
        .deposit(&me.public(), amount(deposit), &idempotency)
        .await
        .unwrap();
    let config =
        EndpointConfig { policy: any_relay(), budget: Some(budget), ..EndpointConfig::default() };
    Endpoint::new(registry.client(me), config)
}

fn listener_endpoint(registry: &Registry, me: &SecretKey) -> Endpoint {
    let config = EndpointConfig { policy: any_relay(), ..EndpointConfig::default() };
    Endpoint::new(registry.client(me), config)
}

/// Closes every channel of `endpoint` and checks each refund: the escrow
/// less what its relay settled.
async fn close_all(endpoint: &Endpoint) {
    let wallet = endpoint.wallet().unwrap();
    for money in endpoint.money().await.unwrap() {
        let channel = &money.channel;
        wallet.close(&channel.id).await.unwrap();
        let closed = wallet.finalize(&channel.id).await.unwrap();
        assert_eq!(closed.state, "closed");
        assert_eq!(closed.refunded, closed.deposited.checked_sub(closed.settled).unwrap());
    }
}

fn blake3_of(bytes: &[u8]) -> blake3::Hash {
    blake3::hash(bytes)
}

fn payload(length: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(length);
    let mut state = 0x9e37_79b9_u32;
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

async fn relay_process(
    registry: &Registry,
    dir: &Path,
    price: &str,
) -> (process::Process, RelayAddress) {
    std::fs::create_dir_all(dir).unwrap();
    let mut args = process::relay_args(&registry.base, dir, None);
    args.extend([
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--price-per-byte".into(),
        price.into(),
        "--region".into(),
        "test".into(),
    ]);
    let (child, line) = process::spawn(args).await;
    (child, process::relay_address(&line))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_transfer_leaves_the_stream_whole_on_another_relay() {
    // The client's log shows with a failure: which routes failed and why.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ferry_client=info")
        .with_test_writer()
        .try_init();
    let registry = Registry::start().await;
    let dir = std::env::temp_dir().join(format!("ferry-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cheap_process, cheap) = relay_process(&registry, &dir.join("cheap"), "0.000000001").await;
    let (dear_process, dear) = relay_process(&registry, &dir.join("dear"), "0.000000002").await;
    listed(&registry, &[cheap.key, dear.key]).await;

    let (sender_key, receiver_key) = (key(1), key(2));
    let receiver = listener_endpoint(&registry, &receiver_key);
    let home = receiver.listen().await.unwrap();
    assert_eq!(home.home.relays.len(), 2, "the receiver listens on both relays");
    // A small escrow, so that the transfer needs top-ups.
    let budget =
        Budget { open: amount("0.01"), top_up: amount("0.01"), low_water: amount("0.005") };
    let sender = payer(&registry, &sender_key, "1", budget).await;

    let data = payload(24 << 20);
    let expected = blake3_of(&data);
    let mut outgoing = tokio::time::timeout(WAIT, sender.dial(receiver_key.public()))
        .await
        .expect("dialled in time")
        .unwrap();
    let writing = tokio::spawn(async move {
        outgoing.write_all(&data).await.unwrap();
        outgoing.shutdown().await.unwrap();
        let mut answer = Vec::new();
        outgoing.read_to_end(&mut answer).await.unwrap();
        answer
    });
    let mut incoming =
        tokio::time::timeout(WAIT, receiver.accept()).await.expect("accepted in time").unwrap();
    assert_eq!(incoming.peer(), sender_key.public());

    // Read a third, then kill the relay carrying the stream.
    let mut received = vec![0; 8 << 20];
    tokio::time::timeout(WAIT, incoming.read_exact(&mut received)).await.unwrap().unwrap();
    let paid_before_kill = sender.paid();
    assert_eq!(paid_before_kill.len(), 1, "one relay carried the stream so far");
    let killed = process::signal_and_wait(cheap_process, "-KILL").await;
    assert!(!killed.success());
    // The failover shows as the longest wait between two reads.
    let mut rest = Vec::new();
    let mut longest_gap = Duration::ZERO;
    let reading = async {
        let mut buffer = vec![0; 64 << 10];
        let mut last_read = Instant::now();
        loop {
            let read = incoming.read(&mut buffer).await.unwrap();
            longest_gap = longest_gap.max(last_read.elapsed());
            last_read = Instant::now();
            if read == 0 {
                return;
            }
            rest.extend_from_slice(&buffer[..read]);
        }
    };
    tokio::time::timeout(WAIT, reading).await.expect("the rest arrives in time");
    received.extend(rest);
    assert_eq!(received.len(), 24 << 20);
    assert_eq!(blake3_of(&received), expected, "the bytes differ from those sent");
    incoming.write_all(b"received").await.unwrap();
    incoming.shutdown().await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, writing).await.unwrap().unwrap(), b"received");
    println!("the stream stalled for at most {longest_gap:?} while it moved to the other relay");
    assert!(longest_gap < Duration::from_secs(10), "failover took {longest_gap:?}");

    // The sender paid both relays, and topped its channels up on the way.
    let money = sender.money().await.unwrap();
    let relays: Vec<PublicKey> = money.iter().map(|money| money.channel.relay).collect();
    assert!(relays.contains(&cheap.key) && relays.contains(&dear.key), "{money:?}");
    assert!(
        money.iter().any(|money| money.channel.deposited > amount("0.01")),
        "some channel was topped up: {money:?}"
    );

    // The surviving relay settles as it stops; then the sender closes both
    // channels and gets back what no relay settled.
    assert!(process::signal_and_wait(dear_process, "-TERM").await.success());
    sender.close().await;
    receiver.close().await;
    close_all(&sender).await;
    registry.assert_invariants().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Everything that passed through a proxy, in both directions.
type Recording = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy in front of `target` that records what it carries.
async fn recording_proxy(listener: TcpListener, target: String, recording: Recording) {
    loop {
        let (inbound, _) = listener.accept().await.unwrap();
        let (target, recording) = (target.clone(), recording.clone());
        tokio::spawn(async move {
            let outbound = TcpStream::connect(&target).await.unwrap();
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::join!(
                copy_recorded(in_read, out_write, recording.clone()),
                copy_recorded(out_read, in_write, recording),
            );
        });
    }
}

async fn copy_recorded(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    recording: Recording,
) {
    let mut buffer = vec![0; 64 << 10];
    while let Ok(read) = from.read(&mut buffer).await {
        if read == 0 || to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
        recording.lock().unwrap().extend_from_slice(&buffer[..read]);
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_only_ciphertext_between_two_peers() {
    let registry = Registry::start().await;
    // The relay advertises the proxy's address, so every byte to and from
    // it passes the proxy.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_address = proxy.local_addr().unwrap().to_string();
    let relay_key = key(10);
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        |config| config.public_address = proxy_address.clone(),
        store_dir("ciphertext"),
    )
    .await;
    let recording = Recording::default();
    tokio::spawn(recording_proxy(proxy, relay.address.address.clone(), recording.clone()));
    listed(&registry, &[relay_key.public()]).await;

    let (sender_key, receiver_key) = (key(1), key(2));
    let receiver = listener_endpoint(&registry, &receiver_key);
    receiver.listen().await.unwrap();
    let budget = Budget { open: amount("1"), top_up: amount("1"), low_water: amount("0.1") };
    let sender = payer(&registry, &sender_key, "2", budget).await;

    let marker = b"ferry-plaintext-marker:0123456789abcdef;";
    let secret: Vec<u8> = marker.iter().copied().cycle().take(256 << 10).collect();
    let mut outgoing =
        tokio::time::timeout(WAIT, sender.dial(receiver_key.public())).await.unwrap().unwrap();
    let sent = secret.clone();
    let writing = tokio::spawn(async move {
        outgoing.write_all(&sent).await.unwrap();
        outgoing.shutdown().await.unwrap();
        let mut rest = Vec::new();
        outgoing.read_to_end(&mut rest).await.unwrap();
    });
    let mut incoming = tokio::time::timeout(WAIT, receiver.accept()).await.unwrap().unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, incoming.read_to_end(&mut received)).await.unwrap().unwrap();
    incoming.shutdown().await.unwrap();
    tokio::time::timeout(WAIT, writing).await.unwrap().unwrap();
    assert!(received == secret, "the receiver got other bytes");

    let seen = recording.lock().unwrap().clone();
    assert!(seen.len() > secret.len(), "the stream passed the proxy ({} bytes)", seen.len());
    let sample = &marker[..16];
    assert!(!seen.windows(sample.len()).any(|window| window == sample), "the relay saw plaintext");

    sender.close().await;
    receiver.close().await;
    relay.shutdown().await;
    close_all(&sender).await;
    registry.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_direct_address_is_dialled_first_and_costs_nothing() {
    let registry = Registry::start().await;
    let relay_key = key(12);
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, store_dir("direct")).await;
    listed(&registry, &[relay_key.public()]).await;

    let (dialler_key, listener_key) = (key(3), key(4));
    let config = EndpointConfig {
        policy: any_relay(),
        direct: Some("127.0.0.1:0".parse().unwrap()),
        ..EndpointConfig::default()
    };
    let listener = Endpoint::new(registry.client(&listener_key), config);
    let home = listener.listen().await.unwrap();
    assert!(home.home.direct_address.is_some());
    // Without a budget the dialler cannot pay a relay: only the direct
    // route can work.
    let dialler = listener_endpoint(&registry, &dialler_key);
    let mut outgoing =
        tokio::time::timeout(WAIT, dialler.dial(listener_key.public())).await.unwrap().unwrap();
    outgoing.write_all(b"direct").await.unwrap();
    outgoing.shutdown().await.unwrap();
    let mut incoming = tokio::time::timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    assert_eq!(incoming.peer(), dialler_key.public());
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, incoming.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"direct");
    assert!(dialler.paid().is_empty(), "nothing was paid");
    incoming.shutdown().await.unwrap();

    // A peer that published nothing cannot be dialled, and says so.
    let nobody = dialler.dial(key(5).public()).await.unwrap_err();
    assert!(nobody.to_string().contains("unknown_client"), "{nobody}");

    listener.close().await;
    relay.shutdown().await;
    registry.assert_invariants().await;
}

/// Serves `relay`'s Prometheus metrics on 127.0.0.1:0; returns the URL.
async fn serve_metrics(relay: &RunningRelay) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(ferry_relay::metrics::serve(
        listener,
        relay.relay.metrics(),
        std::future::pending(),
    ));
    url
}

/// The bytes the relay says it carried, both ways, from its metrics.
async fn carried_bytes(registry: &Registry, metrics_url: &str) -> u64 {
    let text = registry.http.get(metrics_url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("ferry_relay_bytes_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_an_endpoint_pays_for_exactly_the_bytes_the_relay_carried_and_hands_back_its_prepayment()
 {
    let registry = Registry::start().await;
    let relay_key = key(14);
    // The production window: up to 1 MiB would go unpaid without the tail.
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        |config| config.credit_window_bytes = 1 << 20,
        store_dir("tail"),
    )
    .await;
    let metrics = serve_metrics(&relay).await;
    listed(&registry, &[relay_key.public()]).await;
    let price = relay.relay.price();

    let (sender_key, receiver_key) = (key(6), key(7));
    let receiver = listener_endpoint(&registry, &receiver_key);
    receiver.listen().await.unwrap();
    let budget = Budget { open: amount("1"), top_up: amount("1"), low_water: amount("0.1") };
    let sender = payer(&registry, &sender_key, "2", budget).await;

    let data = payload(32 << 20);
    let mut outgoing =
        tokio::time::timeout(WAIT, sender.dial(receiver_key.public())).await.unwrap().unwrap();

    let sent = data.clone();
    let writing = tokio::spawn(async move {
        outgoing.write_all(&sent).await.unwrap();
        outgoing.shutdown().await.unwrap();
        let mut answer = Vec::new();
        outgoing.read_to_end(&mut answer).await.unwrap();
        answer
    });
    let mut incoming = tokio::time::timeout(WAIT, receiver.accept()).await.unwrap().unwrap();
    // The most the sender paid at any moment while the bytes came: at
    // speed it pays ahead of its count.
    let (mut received, mut peak_paid) = (Vec::new(), Amount::ZERO);
    let reading = async {
        let mut chunk = vec![0; 64 << 10];
        loop {
            let read = incoming.read(&mut chunk).await.unwrap();
            peak_paid = sender.paid().values().copied().fold(peak_paid, Amount::max);
            if read == 0 {
                return;
            }
            received.extend_from_slice(&chunk[..read]);
        }
    };
    tokio::time::timeout(WAIT, reading).await.unwrap();
    assert!(received == data, "the bytes differ from those sent");
    incoming.write_all(b"received").await.unwrap();
    incoming.shutdown().await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, writing).await.unwrap().unwrap(), b"received");

    // Closing right away: no invoice comes for the last bytes.
    tokio::time::timeout(WAIT, sender.close()).await.unwrap();
    receiver.close().await;
    let carried = carried_bytes(&registry, &metrics).await;
    assert!(carried > 5 << 20, "the relay carried the stream ({carried} bytes)");
    let report = relay.shutdown().await;
    assert!(!report.incomplete, "{report:?}");

    let money = sender.money().await.unwrap();
    assert_eq!(money.len(), 1, "{money:?}");
    let owed = ferry_proto::cost(carried, price).unwrap();
    let channel = &money[0].channel;
    println!(
        "the relay carried {carried} bytes; the sender paid up to {peak_paid} on the way; settled \
         {} for {owed}",
        channel.settled
    );
    assert!(
        peak_paid > owed,
        "the sender paid ahead ({peak_paid}), and handed it back at the close"
    );
    assert_eq!(channel.settled, owed, "settled for {carried} bytes carried");
    assert_eq!(sender.paid().get(&channel.id), Some(&owed), "the endpoint's own record");
    close_all(&sender).await;
    registry.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_too_small_for_the_credit_window_is_topped_up_before_the_window_shrinks() {
    let registry = Registry::start().await;
    let relay_key = key(15);
    let relay = RunningRelay::start(
        &registry,
        &relay_key,
        |config| config.credit_window_bytes = 1 << 20,
        store_dir("top-up"),
    )
    .await;
    listed(&registry, &[relay_key.public()]).await;
    let window_cost = ferry_proto::cost(1 << 20, relay.relay.price()).unwrap();

    let (sender_key, receiver_key) = (key(8), key(9));
    let receiver = listener_endpoint(&registry, &receiver_key);
    receiver.listen().await.unwrap();
    // A budget far below one window's cost (0.001048576 here): left alone,
    // the relay would grant a tenth of its window and the client would top
    // up by a tenth at a time.
    let budget =
        Budget { open: amount("0.0001"), top_up: amount("0.0001"), low_water: amount("0.00005") };
    let sender = payer(&registry, &sender_key, "1", budget).await;

    let data = payload(8 << 20);
    let mut outgoing =
        tokio::time::timeout(WAIT, sender.dial(receiver_key.public())).await.unwrap().unwrap();
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        outgoing.write_all(&sent).await.unwrap();
        outgoing.shutdown().await.unwrap();
    });
    let mut incoming = tokio::time::timeout(WAIT, receiver.accept()).await.unwrap().unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, incoming.read_to_end(&mut received)).await.unwrap().unwrap();
    assert!(received == data, "the bytes differ from those sent");
    tokio::time::timeout(WAIT, writing).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, sender.close()).await.unwrap();
    receiver.close().await;
    assert!(!relay.shutdown().await.incomplete);

    // Every top-up kept two windows' cost above the newest voucher, so at
    // the end a whole window is still paid for by the escrow.
    let money = sender.money().await.unwrap();
    assert_eq!(money.len(), 1, "{money:?}");
    let channel = &money[0].channel;
    let left = channel.deposited.checked_sub(channel.settled).unwrap();
    println!(
        "deposited {}, settled {}, window cost {window_cost}",
        channel.deposited, channel.settled
    );
    assert!(left >= window_cost, "escrow left {left} is below one window's cost {window_cost}");
    close_all(&sender).await;
    registry.assert_invariants().await;
}
