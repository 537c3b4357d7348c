//! `ferry demo`: the whole marketplace on a private, throwaway Postgres,
//! narrated. A registry, four relay processes at different prices and
//! regions, and three clients: one listens, two dial it by key, choose
//! relays, pay as they go, fail over when the relay carrying them crashes,
//! and close their channels for refunds. It ends with every statement and
//! the ledger's invariant check.

mod relays;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_client::select::{self, SelectionPolicy};
use ferry_client::wallet::Budget;
use ferry_client::{Endpoint, EndpointConfig, RegistryClient};
use ferry_ledger::embedded::EmbeddedOptions;
use ferry_ledger::{AccountRef, CheckReport, Ledger, LedgerConfig};
use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, SecretKey};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::db::Database;
use relays::{RelayPlan, RelayProcess};

/// The registry's fee in the demo: 2.5%.
const DEMO_FEE_BASIS_POINTS: u16 = 250;
/// Short, so the demo can show a dispute window passing.
const DEMO_DISPUTE_WINDOW: Duration = Duration::from_secs(2);
/// The registry probes every relay this often.
const DEMO_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes alice sends bob; the relay carrying them crashes after a third.
const TRANSFER_BYTES: usize = 24 << 20;
/// Bytes bob reads before the crash.
const BYTES_BEFORE_CRASH: usize = 8 << 20;
/// Bytes carol sends bob.
const MESSAGE_BYTES: usize = 1 << 20;
/// Every wait of the demo is bounded by this.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave the registry and its web page running at the end (until Ctrl-C).
    #[arg(long)]
    pub keep: bool,
    /// The registry's address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// Runs the demo from start to end.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!("ferry demo: a marketplace of paid relays, end to end\n");
    let started = Instant::now();
    let options = EmbeddedOptions::ephemeral("ferry-demo-pg", true)?;
    println!("▸ starting a private PostgreSQL cluster in {}", options.dir.display());
    let db = Database::embedded(options).await?;
    println!("  ready after {:.1} s (Unix socket only, fsync on)", started.elapsed().as_secs_f64());
    let config = LedgerConfig {
        fee_basis_points: DEMO_FEE_BASIS_POINTS,
        dispute_window: DEMO_DISPUTE_WINDOW,
        ..LedgerConfig::default()
    };
    let ledger = Ledger::connect(db.options().clone(), config).await?;
    let scratch = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    let outcome = market(&ledger, &args, &scratch, started).await;
    let _ = std::fs::remove_dir_all(&scratch);
    ledger.close().await;
    let closed = db.close().await;
    outcome?;
    closed?;
    println!("\n▸ stopped the cluster and removed its directory");
    Ok(())
}

/// Everyone in the demo, by key, for the narration.
struct Names(HashMap<PublicKey, String>);

impl Names {
    fn of(&self, key: &PublicKey) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| format!("{}…", &key.to_string()[..8]))
    }
}

async fn market(
    ledger: &Ledger,
    args: &DemoArgs,
    scratch: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    let operator = SecretKey::generate().context("generating the operator's key")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = ferry_api::AppState::new(
        ledger.clone(),
        ferry_api::RegistryConfig {
            operator: operator.public(),
            limits: ferry_api::Limits::default(),
            probe_interval: Some(DEMO_PROBE_INTERVAL),
            transport: ferry_api::Transport::default(),
        },
    );
    let (stop_registry, registry_stopped) = tokio::sync::oneshot::channel::<()>();
    let registry_task = tokio::spawn(ferry_api::serve(listener, state, async {
        let _ = registry_stopped.await;
    }));
    println!(
        "▸ the registry serves {base}/ (fee {}%, dispute window {} s, probes every {} s)",
        f64::from(DEMO_FEE_BASIS_POINTS) / 100.0,
        DEMO_DISPUTE_WINDOW.as_secs(),
        DEMO_PROBE_INTERVAL.as_secs()
    );
    let http = RegistryClient::http()?;
    let client_of = |key: &SecretKey| RegistryClient::new(&base, key.clone(), http.clone());

    let plans = [
        RelayPlan { name: "relay-a", region: "eu-west", price: price("0.000000001")? },
        RelayPlan { name: "relay-b", region: "eu-central", price: price("0.0000000015")? },
        RelayPlan { name: "relay-c", region: "us-east", price: price("0.0000000012")? },
        RelayPlan { name: "relay-d", region: "ap-south", price: price("0.000000004")? },
    ];
    println!("\n▸ four operators start relays (separate `ferry relay` processes)");
    let mut relays = Vec::new();
    for plan in plans {
        let dir = scratch.join(plan.name);
        let relay = RelayProcess::start(plan, dir, &base).await?;
        println!(
            "  {}  {:<10}  {:>6} per GiB  {}…  {}",
            relay.plan.name,
            relay.plan.region,
            relay.plan.price.per_gib().to_string(),
            &relay.key.to_string()[..16],
            relay.address
        );
        relays.push(relay);
    }
    let (alice, bob, carol) = (key()?, key()?, key()?);
    let mut names: HashMap<PublicKey, String> =
        relays.iter().map(|relay| (relay.key, relay.plan.name.to_owned())).collect();
    names.extend([
        (alice.public(), "alice".to_owned()),
        (bob.public(), "bob".to_owned()),
        (carol.public(), "carol".to_owned()),
    ]);
    let names = Names(names);
    // Every relay is a minute old: a floor newcomers clear, which still
    // keeps out a relay that is seen failing its probes.
    let policy = SelectionPolicy { min_reputation: 0.2, ..SelectionPolicy::default() };
    let keys: Vec<PublicKey> = relays.iter().map(|relay| relay.key).collect();
    let waited = Instant::now();
    wait_listed(&client_of(&bob), &policy, &keys).await?;
    println!(
        "  the registry lists all four as live after {:.1} s (their first heartbeats)",
        waited.elapsed().as_secs_f64()
    );
    for relay in &relays {
        wait_for_view(&client_of(&bob), &relay.key, "the first successful probe", |view| {
            !view["reputation"]["probe_rtt_ms"].is_null()
        })
        .await?;
    }
    let before = reputations(&client_of(&bob), &keys).await?;
    println!(
        "  the registry has probed each one: a connect and a handshake in which it proves its key"
    );
    for (relay, view) in relays.iter().zip(&before) {
        println!(
            "  {}  probe round trip {:.2} ms, reachability {:.3}, reputation {:.3}",
            relay.plan.name,
            reputation_of(view, "probe_rtt_ms"),
            reputation_of(view, "reachability_24h"),
            reputation_of(view, "score")
        );
    }

    println!("\n▸ the operator deposits money for the paying clients (bob only receives)");
    let bank = client_of(&operator);
    for (who, amount) in [(&alice, "1"), (&carol, "1")] {
        let receipt = bank
            .deposit(
                &who.public(),
                amount.parse()?,
                &format!("deposit-{}", names.of(&who.public())),
            )
            .await?;
        println!(
            "  {:<6} +{amount}  balance {}",
            names.of(&who.public()),
            receipt["balance"].as_str().unwrap_or("?")
        );
    }

    println!("\n▸ bob listens: he ranks relays by cost = price × (1 + round trip / 100 ms)");
    println!(
        "  among those with reputation ≥ {} and keeps the best two as home relays",
        policy.min_reputation
    );
    let ranked = select::discover(&client_of(&bob), &bob, &policy).await?;
    println!(
        "  {:<8} {:>10} {:>10} {:>10} {:>12}",
        "relay", "per GiB", "rtt", "reputation", "cost"
    );
    for choice in &ranked {
        println!(
            "  {:<8} {:>10} {:>8.2}ms {:>10.3} {:>12.0}",
            names.of(&choice.offer.key()),
            choice.offer.price().per_gib().to_string(),
            choice.rtt.as_secs_f64() * 1000.0,
            choice.offer.reputation,
            choice.cost
        );
    }
    let unranked: Vec<String> = relays
        .iter()
        .filter(|relay| !ranked.iter().any(|r| r.offer.key() == relay.key))
        .map(|relay| relay.plan.name.to_owned())
        .collect();
    if !unranked.is_empty() {
        println!(
            "  not measured: {} (dearer than the {} cheapest)",
            unranked.join(", "),
            policy.measured
        );
    }
    let bob_endpoint = Endpoint::new(
        client_of(&bob),
        EndpointConfig { policy: policy.clone(), ..EndpointConfig::default() },
    );
    let home = bob_endpoint.listen().await?;
    let home_names: Vec<String> = home.home.relays.iter().map(|key| names.of(key)).collect();
    println!(
        "  → bob listens on {} and publishes that list, signed, in the registry",
        home_names.join(" and ")
    );

    // Small channels, so that the transfer shows automatic top-ups.
    let budget =
        Budget { open: amount("0.02")?, top_up: amount("0.02")?, low_water: amount("0.01")? };
    let paying = |me: &SecretKey| {
        Endpoint::new(
            client_of(me),
            EndpointConfig {
                policy: policy.clone(),
                budget: Some(budget),
                ..EndpointConfig::default()
            },
        )
    };
    let alice_endpoint = paying(&alice);
    println!(
        "\n▸ alice dials bob by his key; she checks his signed list and ranks his relays herself"
    );
    println!(
        "  she pays as she goes: channels of {} topped up by {} below {}",
        budget.open, budget.top_up, budget.low_water
    );
    let data = payload(TRANSFER_BYTES);
    let expected = blake3::hash(&data);
    let mut outgoing = within("alice dials bob", alice_endpoint.dial(bob.public())).await??;
    let writing = tokio::spawn(async move {
        outgoing.write_all(&data).await?;
        outgoing.shutdown().await?;
        let mut answer = Vec::new();
        outgoing.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    });
    let mut incoming =
        within("bob accepts", bob_endpoint.accept()).await?.context("bob's endpoint closed")?;
    let mut received = vec![0; BYTES_BEFORE_CRASH];
    within("the first third", incoming.read_exact(&mut received)).await??;
    let carrying = alice_endpoint.money().await?;
    let carrying = &carrying.first().context("alice pays the relay carrying her stream")?.channel;
    let carrier = carrying.relay;
    println!(
        "  → through {} ({} for {} MiB so far)",
        names.of(&carrier),
        paid_on(&alice_endpoint, &carrying.id),
        BYTES_BEFORE_CRASH >> 20
    );

    let crashed =
        relays.iter().position(|relay| relay.key == carrier).context("the carrier is ours")?;
    println!(
        "\n▸ {} crashes (SIGKILL) with {} of {} MiB delivered",
        relays[crashed].plan.name,
        BYTES_BEFORE_CRASH >> 20,
        TRANSFER_BYTES >> 20
    );
    relays[crashed].crash().await?;
    let mut longest_gap = Duration::ZERO;
    let reading = async {
        let mut buffer = vec![0; 64 << 10];
        let mut last_read = Instant::now();
        loop {
            let read = incoming.read(&mut buffer).await?;
            longest_gap = longest_gap.max(last_read.elapsed());
            last_read = Instant::now();
            if read == 0 {
                return anyhow::Ok(());
            }
            received.extend_from_slice(&buffer[..read]);
        }
    };
    within("the rest of the transfer", reading).await??;
    let intact = blake3::hash(&received) == expected;
    incoming.write_all(if intact { b"intact" } else { b"damaged" }).await?;
    incoming.shutdown().await?;
    let answer = within("alice hears back", writing).await???;
    anyhow::ensure!(intact && answer == b"intact", "the transfer arrived damaged");
    println!(
        "  the stream moved to the next relay on its own: it stalled for {:.2} s at most",
        longest_gap.as_secs_f64()
    );
    println!(
        "  bob has all {} MiB; blake3 {}… matches what alice sent",
        received.len() >> 20,
        &expected.to_hex()[..16]
    );
    for money in alice_endpoint.money().await? {
        let top_ups =
            (money.channel.deposited.attos() - budget.open.attos()) / budget.top_up.attos();
        println!(
            "  alice paid {:<8} {} (its channel was opened with {} and topped up {top_ups} times)",
            names.of(&money.channel.relay),
            paid_on(&alice_endpoint, &money.channel.id),
            budget.open
        );
    }

    println!(
        "\n▸ carol sends bob {} MiB; she probes his relays before she picks",
        MESSAGE_BYTES >> 20
    );
    let carol_endpoint = paying(&carol);
    let mut outgoing = within("carol dials bob", carol_endpoint.dial(bob.public())).await??;
    let message = payload(MESSAGE_BYTES);
    let sending = tokio::spawn(async move {
        outgoing.write_all(&message).await?;
        outgoing.shutdown().await?;
        let mut rest = Vec::new();
        outgoing.read_to_end(&mut rest).await?;
        anyhow::Ok(())
    });
    let mut incoming = within("bob accepts carol", bob_endpoint.accept())
        .await?
        .context("bob's endpoint closed")?;
    let mut got = Vec::new();
    within("carol's message", incoming.read_to_end(&mut got)).await??;
    incoming.shutdown().await?;
    within("carol's stream ends", sending).await???;
    anyhow::ensure!(got.len() == MESSAGE_BYTES, "carol's message arrived short");
    for money in carol_endpoint.money().await? {
        let why = if money.channel.relay == carrier {
            String::new()
        } else {
            format!("{} does not answer her probe, so ", relays[crashed].plan.name)
        };
        println!(
            "  → {why}she goes through {} and pays it {}",
            names.of(&money.channel.relay),
            paid_on(&carol_endpoint, &money.channel.id)
        );
    }

    let reader = client_of(&bob);
    let reachable_before = reputation_of(&before[crashed], "reachability_24h");
    let seen_down = wait_for_view(&reader, &carrier, "a failed probe", |view| {
        reputation_of(view, "reachability_24h") < reachable_before
    })
    .await?;
    println!(
        "\n▸ the registry's probes find {} down: reachability {:.3} → {:.3}, reputation {:.3} → {:.3}",
        relays[crashed].plan.name,
        reachable_before,
        reputation_of(&seen_down, "reachability_24h"),
        reputation_of(&before[crashed], "score"),
        reputation_of(&seen_down, "score")
    );

    println!(
        "\n▸ {}'s operator restarts it from its data directory, with the vouchers it stored before the crash",
        relays[crashed].plan.name
    );
    relays[crashed].restart().await?;
    println!("  back at {}; it settles them in its next round", relays[crashed].address);
    let mut paid_relays = Vec::new();
    for endpoint in [&alice_endpoint, &carol_endpoint] {
        paid_relays.extend(endpoint.money().await?.iter().map(|money| money.channel.relay));
    }
    let mut after = Vec::new();
    for (relay, old) in relays.iter().zip(&before) {
        let view = if paid_relays.contains(&relay.key) {
            wait_for_view(&reader, &relay.key, "the settlement counts", |view| {
                paid_volume(view) > paid_volume(old)
            })
            .await?
        } else {
            relay_view(&reader, &relay.key).await?
        };
        after.push(view);
    }
    println!("\n▸ reputation, as the registry computes it (before → after)");
    println!(
        "  {:<8} {:>15} {:>17} {:>17} {:>7}",
        "relay", "score", "reachability", "paid 30 d", "payers"
    );
    for (relay, (old, new)) in relays.iter().zip(before.iter().zip(&after)) {
        println!(
            "  {:<8} {:>6.3} → {:<6.3} {:>6.3} → {:<8.3} {:>17} {:>7}",
            relay.plan.name,
            reputation_of(old, "score"),
            reputation_of(new, "score"),
            reputation_of(old, "reachability_24h"),
            reputation_of(new, "reachability_24h"),
            paid_volume(new).to_string(),
            new["reputation"]["paying_clients_30d"]
        );
    }
    println!(
        "  paid volume and paying clients count only money settled on the ledger (docs/REPUTATION.md)"
    );

    println!(
        "\n▸ the operators stop their relays; each settles what it still holds before it exits"
    );
    for endpoint in [&alice_endpoint, &bob_endpoint, &carol_endpoint] {
        endpoint.close().await;
    }
    for relay in &mut relays {
        relay.stop().await?;
    }
    for endpoint in [&alice_endpoint, &carol_endpoint] {
        for money in endpoint.money().await? {
            let paid = paid_on(endpoint, &money.channel.id);
            println!(
                "  {:<8} settled {} of the {} {} paid it{}",
                names.of(&money.channel.relay),
                money.channel.settled,
                paid,
                names.of(&money.channel.client),
                if money.channel.settled < paid {
                    " (the rest was in flight at the crash and is refunded)"
                } else {
                    ""
                }
            );
        }
    }

    println!(
        "\n▸ alice and carol close their channels: the relay may still settle during the dispute window"
    );
    let mut refunds = Vec::new();
    for endpoint in [&alice_endpoint, &carol_endpoint] {
        let wallet = endpoint.wallet().context("a paying endpoint has a wallet")?;
        for money in endpoint.money().await? {
            let closing = wallet.close(&money.channel.id).await?;
            refunds.push((endpoint, closing));
        }
    }
    println!("  {} channels closing; waiting {} s…", refunds.len(), DEMO_DISPUTE_WINDOW.as_secs());
    // The window runs on the database's clock: a little slack covers the
    // difference between the clocks of one machine.
    tokio::time::sleep(DEMO_DISPUTE_WINDOW + Duration::from_millis(100)).await;
    for (endpoint, closing) in refunds {
        let wallet = endpoint.wallet().context("a paying endpoint has a wallet")?;
        let closed = wallet.finalize(&closing.id).await?;
        println!(
            "  {} → {:<8} {}: deposited {}, settled {}, refunded {}",
            names.of(&closed.client),
            names.of(&closed.relay),
            closed.state,
            closed.deposited,
            closed.settled,
            closed.refunded
        );
    }

    let earner = &relays[crashed];
    let earned = ledger.balance(&earner.key).await?.earned.to_amount()?;
    let receipt = client_of(&earner.secret()?).withdraw(earned, "withdraw-earnings").await?;
    println!(
        "\n▸ {} withdraws its earnings, {}; balance now {}",
        earner.plan.name,
        earned,
        receipt["balance"].as_str().unwrap_or("?")
    );

    print_statements(ledger, &names, &relays, [&alice, &bob, &carol]).await?;

    println!("\n▸ ledger invariant check");
    let report = ledger.check().await?;
    print_check(&report);
    anyhow::ensure!(report.is_ok(), "the ledger check failed");
    println!("\n▸ the market ran in {:.1} s", started.elapsed().as_secs_f64());

    if args.keep {
        println!("\n▸ the registry and its web page stay up: open {base}/  (Ctrl-C stops them)");
        crate::shutdown_signal().await;
    }
    let _ = stop_registry.send(());
    within("the registry stops", registry_task).await???;
    Ok(())
}

/// The ledger's statements of every party, oldest entry first.
async fn print_statements(
    ledger: &Ledger,
    names: &Names,
    relays: &[RelayProcess],
    clients: [&SecretKey; 3],
) -> anyhow::Result<()> {
    println!("\n▸ statements (oldest first)");
    let mut accounts: Vec<(String, AccountRef)> = clients
        .iter()
        .map(|client| (names.of(&client.public()), AccountRef::Holder { key: client.public() }))
        .collect();
    accounts.extend(
        relays
            .iter()
            .map(|relay| (relay.plan.name.to_owned(), AccountRef::Holder { key: relay.key })),
    );
    accounts.push(("treasury".to_owned(), AccountRef::Treasury));
    for (name, account) in accounts {
        let statement = ledger.statement(account, None, ferry_ledger::MAX_STATEMENT_PAGE).await?;
        println!("  {name} (balance {})", statement.balance);
        for entry in statement.entries.iter().rev() {
            let counterparty = match entry.counterparty {
                AccountRef::Holder { key } => names.of(&key),
                AccountRef::Escrow { channel } => {
                    format!("channel {}…", &channel.to_string()[..12])
                }
                other => other.to_string(),
            };
            println!(
                "    #{:<3} {:<10} {:>24} → {:>22}   {}",
                entry.transfer_id,
                entry.kind.as_str(),
                entry.change,
                entry.balance_after,
                counterparty
            );
        }
    }
    Ok(())
}

/// Prints an invariant check report for people.
pub fn print_check(report: &CheckReport) {
    for invariant in &report.checked {
        match report.violations.iter().find(|v| v.invariant == *invariant) {
            None => println!("  ✓ {invariant}"),
            Some(violation) => {
                println!("  ✗ {invariant}");
                for row in &violation.rows {
                    println!("      {row}");
                }
            }
        }
    }
    println!(
        "  {} accounts, {} transfers, {} channels: {}",
        report.accounts,
        report.transfers,
        report.channels,
        if report.is_ok() { "all invariants hold" } else { "INVARIANTS VIOLATED" }
    );
}

/// Waits until the registry lists every relay in `keys` as live and
/// eligible under `policy`.
async fn wait_listed(
    registry: &RegistryClient,
    policy: &SelectionPolicy,
    keys: &[PublicKey],
) -> anyhow::Result<()> {
    let listed = async {
        loop {
            let offers = registry.offers(policy).await?;
            if keys.iter().all(|key| offers.iter().any(|offer| offer.key() == *key)) {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within("the relays are listed", listed).await?
}

/// Waits until the registry's view of `relay` satisfies `done`, and returns it.
async fn wait_for_view(
    registry: &RegistryClient,
    relay: &PublicKey,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let seen = async {
        loop {
            let view = relay_view(registry, relay).await?;
            if done(&view) {
                return anyhow::Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within(what, seen).await?
}

fn reputation_of(view: &Value, component: &str) -> f64 {
    view["reputation"][component].as_f64().unwrap_or(0.0)
}

fn paid_volume(view: &Value) -> Amount {
    view["reputation"]["paid_volume_30d"]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_default()
}

/// Each relay's view in the registry, in the order of `keys`.
async fn reputations(registry: &RegistryClient, keys: &[PublicKey]) -> anyhow::Result<Vec<Value>> {
    let mut views = Vec::new();
    for key in keys {
        views.push(relay_view(registry, key).await?);
    }
    Ok(views)
}

/// The newest amount `endpoint` paid on `channel`.
fn paid_on(endpoint: &Endpoint, channel: &ChannelId) -> Amount {
    endpoint.paid().get(channel).copied().unwrap_or_default()
}

/// The registry's view of one relay.
async fn relay_view(registry: &RegistryClient, relay: &PublicKey) -> anyhow::Result<Value> {
    Ok(registry.get(&format!("/v1/relays/{relay}")).await?)
}

/// `step`, or an error naming it if it takes longer than [`STEP_TIMEOUT`].
async fn within<T>(step: &str, future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .with_context(|| format!("{step}: no progress in {} s", STEP_TIMEOUT.as_secs()))
}

/// Bytes that do not compress and are the same in every run.
fn payload(length: usize) -> Vec<u8> {
    let mut bytes = vec![0; length];
    blake3::Hasher::new().update(b"ferry demo").finalize_xof().fill(&mut bytes);
    bytes
}

fn key() -> anyhow::Result<SecretKey> {
    SecretKey::generate().context("generating a key")
}

fn price(text: &str) -> anyhow::Result<PricePerByte> {
    Ok(text.parse()?)
}

fn amount(text: &str) -> anyhow::Result<Amount> {
    Ok(text.parse()?)
}
