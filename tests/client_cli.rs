//! The client commands of `ferry`, run as a person would run them, against
//! a real registry and two relays on 127.0.0.1:0: the relay table, a
//! deposit, a file sent and received with its blake3 checked, money and
//! channels, a TCP port forwarded through the market, and a channel closed
//! for its refund. The ledger's invariants hold at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../relay/tests/common/mod.rs"]
mod common;
mod process;

use process::{run_json as ferry_json, run_ok as ferry};

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use common::{Registry, RunningRelay, key, operator, store_dir};
use ferry_client::select::SelectionPolicy;
use ferry_proto::{Amount, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: std::time::Duration = process::WAIT;

/// Writes `key` as a key file that `ferry` accepts.
fn key_file(dir: &Path, name: &str, key: &SecretKey) -> PathBuf {
    let path = dir.join(name);
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    writeln!(file, "{}", hex::encode(key.seed())).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sends_a_file_forwards_a_port_and_closes_a_channel_with_the_cli() {
    let registry = Registry::start().await;
    let cheap = RunningRelay::start(&registry, &key(10), |_| {}, store_dir("cli-cheap")).await;
    let dear = RunningRelay::start(
        &registry,
        &key(11),
        |config| config.price_per_byte = "0.000000002".parse().unwrap(),
        store_dir("cli-dear"),
    )
    .await;
    let dir = std::env::temp_dir().join(format!("ferry-cli-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    let (sender, receiver) = (key(1), key(2));
    let sender_file = key_file(&dir, "sender.key", &sender);
    let receiver_file = key_file(&dir, "receiver.key", &receiver);
    let operator_file = key_file(&dir, "operator.key", &operator());
    let base = registry.base.clone();
    let as_sender = ["--registry", &base, "--key", sender_file.to_str().unwrap()];
    let as_receiver = ["--registry", &base, "--key", receiver_file.to_str().unwrap()];
    let args = |who: &[&str], more: &[&str]| -> Vec<String> {
        more.iter().chain(who).map(|word| word.to_string()).collect()
    };

    // The relay table, as JSON, cheapest first once both are listed.
    let listed = async {
        loop {
            let table =
                ferry_json(&[&["relays", "--min-reputation", "0"], &as_sender[..]].concat()).await;
            if table["relays"].as_array().unwrap().len() == 2 {
                return table;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let table = tokio::time::timeout(WAIT, listed).await.unwrap();
    assert_eq!(table["relays"][0]["relay"], key(10).public().to_string());
    assert_eq!(table["relays"][0]["price_per_gib"], "1.073741824");
    // Run where no key file exists: listing creates none.
    let human =
        ferry(&["relays", "--min-reputation", "0", "--sort", "reputation", "--registry", &base])
            .await;
    assert!(!Path::new("ferry.key").exists(), "listing relays wrote a key file");
    assert!(human.contains("PRICE/GiB") && human.contains("1.073741824"), "{human}");

    // The operator credits the sender.
    let operator_path = operator_file.to_str().unwrap();
    ferry(&[&["deposit", "3", "--operator-key", operator_path], &as_sender[..]].concat()).await;
    let balance = ferry_json(&[&["balance"], &as_sender[..]].concat()).await;
    assert_eq!(balance["available"], "3");

    // A file through the market.
    let file = dir.join("report.bin");
    let contents: Vec<u8> =
        (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&file, &contents).unwrap();
    let inbox = dir.join("inbox");
    let mut receive_args = args(&as_receiver, &["receive", "--min-reputation", "0"]);
    receive_args.extend(["--out".into(), inbox.display().to_string()]);
    let (receiving, line) = process::spawn(receive_args).await;
    assert!(line.starts_with(&format!("receiving as {}", receiver.public())), "{line}");
    let receiver_key = receiver.public().to_string();
    let sent = ferry_json(
        &[
            &["send", file.to_str().unwrap(), "--to", &receiver_key][..],
            &["--min-reputation", "0", "--budget", "0.5"],
            &as_sender[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(sent["bytes"], 3_000_000);
    assert_eq!(sent["blake3"], blake3::hash(&contents).to_string());
    assert!(receiving.wait().await.success());
    assert!(std::fs::read(inbox.join("report.bin")).unwrap() == contents, "the file differs");

    // The same name again: the receiver refuses before the contents flow,
    // and keeps its file.
    let mut receive_args = args(&as_receiver, &["receive", "--min-reputation", "0", "--json"]);
    receive_args.extend(["--out".into(), inbox.display().to_string()]);
    let (receiving, line) = process::spawn(receive_args).await;
    // With --json even the announcement is JSON.
    let announced: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(announced["receiving_as"], receiver.public().to_string(), "{line}");
    let again = process::run(
        &[
            &["send", file.to_str().unwrap(), "--to", &receiver_key][..],
            &["--min-reputation", "0", "--budget", "0.5"],
            &as_sender[..],
        ]
        .concat(),
    )
    .await;
    let text = process::output_text(&again);
    assert!(!again.status.success(), "{text}");
    assert!(text.contains("refused report.bin") && text.contains("exists"), "{text}");
    assert!(!receiving.wait().await.success());
    assert!(std::fs::read(inbox.join("report.bin")).unwrap() == contents, "the file changed");

    // A channel to a key that is no registered relay (the receiver's, say)
    // is refused with the reason, and locks no escrow.
    let refused =
        process::run(&[&["channels", "open", &receiver_key, "0.1"][..], &as_sender[..]].concat())
            .await;
    let text = process::output_text(&refused);
    assert!(!refused.status.success() && text.contains("no relay with key"), "{text}");

    // The sender's channel to the cheaper relay, and its money.
    let channels = ferry_json(&[&["channels", "list"], &as_sender[..]].concat()).await;
    let channel = &channels["channels"][0];
    assert_eq!(channel["relay"], key(10).public().to_string());
    assert_eq!(channel["deposited"], "0.5");
    let balance = ferry_json(&[&["balance"], &as_sender[..]].concat()).await;
    assert_eq!(
        (balance["available"].as_str(), balance["in_escrow"].as_str()),
        (Some("2.5"), Some("0.5"))
    );

    // A TCP port forwarded to an echo server at the receiver's side.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_address = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut connection, _) = echo.accept().await.unwrap();
        let (mut reader, mut writer) = connection.split();
        tokio::io::copy(&mut reader, &mut writer).await.unwrap();
    });
    let mut serve_args = args(&as_receiver, &["tunnel", "--min-reputation", "0"]);
    serve_args.extend([
        "--serve".into(),
        echo_address,
        "--allow".into(),
        sender.public().to_string(),
    ]);
    let (serving, line) = process::spawn(serve_args).await;
    assert!(line.starts_with("serving"), "{line}");
    let mut forward_args =
        args(&as_sender, &["tunnel", "--min-reputation", "0", "--budget", "0.5"]);
    forward_args.extend([
        "--to".into(),
        receiver_key.clone(),
        "--local".into(),
        "127.0.0.1:0".into(),
    ]);
    let (forwarding, line) = process::spawn(forward_args).await;
    let local = line.split_whitespace().nth(1).unwrap().to_owned();
    let mut connection = TcpStream::connect(&local).await.unwrap();
    connection.write_all(b"ping through the market").await.unwrap();
    let mut echoed = vec![0; 23];
    tokio::time::timeout(WAIT, connection.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, b"ping through the market");
    drop(connection);
    assert!(process::signal_and_wait(forwarding, "-TERM").await.success());
    assert!(process::signal_and_wait(serving, "-TERM").await.success());

    // The relays settle as they stop; closing returns the rest.
    cheap.shutdown().await;
    dear.shutdown().await;
    // By the 12-digit prefix the tables show.
    let id = &channel["id"].as_str().unwrap()[..12];
    let closed =
        ferry_json(&[&["channels", "close", id, "--finalize"], &as_sender[..]].concat()).await;
    assert_eq!(closed["state"], "closed");
    assert_eq!(closed["id"], channel["id"]);
    let statement = ferry(&[&["statement"], &as_sender[..]].concat()).await;
    assert!(statement.contains("deposit") && statement.contains("refund"), "{statement}");
    // Spending by relay, which the ledger's entries alone do not show.
    let cheap_short = &key(10).public().to_string()[..12];
    assert!(statement.contains(&format!("on relay {cheap_short}")), "{statement}");
    let spending = ferry_json(&[&["statement"], &as_sender[..]].concat()).await;
    let spent = &spending["spending_by_relay"];
    let to_cheap = spent
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["relay"] == key(10).public().to_string())
        .unwrap();
    assert_eq!(to_cheap["spent"], closed["settled"], "{spending}");

    // The cheap relay takes its earnings out: more than it has is refused
    // with the reason, --all takes everything, and then nothing is left.
    let relay_file = key_file(&dir, "relay.key", &key(10));
    let as_relay = ["--registry", &base, "--key", relay_file.to_str().unwrap()];
    let earned = ferry_json(&[&["balance"], &as_relay[..]].concat()).await;
    // Gross from its channels, less the registry's fee, is what it earned.
    let as_relay_statement = ferry_json(&[&["statement"], &as_relay[..]].concat()).await;
    let earning = &as_relay_statement["as_relay"];
    let amount = |value: &serde_json::Value| value.as_str().unwrap().parse::<Amount>().unwrap();
    assert_eq!(earning["net"], earned["earned"], "{earning}");
    assert_eq!(
        amount(&earning["fee"]).checked_add(amount(&earning["net"])).unwrap(),
        amount(&earning["gross"])
    );
    assert!(amount(&earning["fee"]) > Amount::ZERO, "{earning}");
    let human = ferry(&[&["statement"], &as_relay[..]].concat()).await;
    assert!(human.contains("earned as a relay") && human.contains("the registry's fee"), "{human}");
    let available: Amount = earned["available"].as_str().unwrap().parse().unwrap();
    assert!(available > Amount::ZERO, "{earned}");
    let too_much = process::run(&[&["withdraw", "1000"][..], &as_relay[..]].concat()).await;
    let text = process::output_text(&too_much);
    assert!(!too_much.status.success() && text.contains("insufficient"), "{text}");
    assert!(text.contains("not enough money available: `ferry balance`"), "{text}");
    let withdrawn = ferry_json(&[&["withdraw", "--all"], &as_relay[..]].concat()).await;
    assert_eq!(withdrawn["balance"], "0", "{withdrawn}");
    let again = process::run(&[&["withdraw", "--all"][..], &as_relay[..]].concat()).await;
    let text = process::output_text(&again);
    assert!(!again.status.success() && text.contains("nothing to withdraw"), "{text}");

    // The relay's own view: its earnings, every component of its score,
    // and why default clients pass it by (this registry does not probe, so
    // it is no newcomer and stays under the bar).
    let status_args =
        ["relay", "status", "--registry", &base, "--key", relay_file.to_str().unwrap()];
    let status = ferry(&status_args).await;
    for part in [
        "earnings: ",
        "settled",
        "reputation: ",
        "reachability",
        "default clients will not choose it: its score",
    ] {
        assert!(status.contains(part), "{part:?} missing from:\n{status}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&ferry(&[&status_args[..], &["--json"]].concat()).await).unwrap();
    assert_eq!(status["default_clients"]["choose"], false, "{status}");
    assert_eq!(status["relay"], key(10).public().to_string());

    // A relay named by the prefix the relay table shows; a prefix no relay
    // has is refused with the reason.
    let cheap_key = key(10).public().to_string();
    let opened =
        ferry_json(&[&["channels", "open", &cheap_key[..12], "0.1"], &as_sender[..]].concat())
            .await;
    assert_eq!(opened["relay"], cheap_key);
    // Closing without --finalize says when finalizing becomes possible.
    let opened_id = opened["id"].as_str().unwrap();
    let closing = ferry(&[&["channels", "close", opened_id], &as_sender[..]].concat()).await;
    assert!(
        closing.contains("closing") && closing.contains("the relay may settle until"),
        "{closing}"
    );
    assert!(closing.contains(&format!("ferry channels close {opened_id} --finalize")), "{closing}");
    let unknown = if cheap_key.starts_with("ffff") { "eeee" } else { "ffff" };
    let refused =
        process::run(&[&["channels", "open", unknown, "0.1"][..], &as_sender[..]].concat()).await;
    let text = process::output_text(&refused);
    assert!(!refused.status.success() && text.contains("no relay key starts with"), "{text}");
    registry.assert_invariants().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bytes `relay` carried, both ways, read from its metrics served on
/// 127.0.0.1:0.
async fn carried_bytes(registry: &Registry, relay: &RunningRelay) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let metrics = relay.relay.metrics();
    tokio::spawn(ferry_relay::metrics::serve(listener, metrics, std::future::pending()));
    let text = registry.http.get(&url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("ferry_relay_bytes_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_send_pays_for_exactly_the_bytes_the_relay_carried() {
    let registry = Registry::start().await;
    // The production window: up to 1 MiB would go unpaid without the tail.
    let relay = RunningRelay::start(
        &registry,
        &key(12),
        |config| config.credit_window_bytes = 1 << 20,
        store_dir("cli-tail"),
    )
    .await;
    let price = relay.relay.price();
    let dir = std::env::temp_dir().join(format!("ferry-cli-tail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    let (sender, receiver) = (key(3), key(4));
    let sender_file = key_file(&dir, "sender.key", &sender);
    let receiver_file = key_file(&dir, "receiver.key", &receiver);
    let base = registry.base.clone();
    registry
        .client(&operator())
        .deposit(&sender.public(), "3".parse().unwrap(), "tail")
        .await
        .unwrap();
    let any = SelectionPolicy { min_reputation: 0.0, ..SelectionPolicy::default() };
    let listed = async {
        while registry.client(&key(99)).offers(&any).await.unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, listed).await.expect("the relay is listed in time");

    let file = dir.join("tail.bin");
    let contents: Vec<u8> =
        (0..(6u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&file, &contents).unwrap();
    let inbox = dir.join("inbox").display().to_string();
    let receive = [
        "receive",
        "--min-reputation",
        "0",
        "--out",
        &inbox,
        "--registry",
        &base,
        "--key",
        receiver_file.to_str().unwrap(),
    ];
    let (receiving, line) = process::spawn(receive.map(String::from).to_vec()).await;
    assert!(line.starts_with("receiving as"), "{line}");
    let sent = ferry_json(&[
        "send",
        file.to_str().unwrap(),
        "--to",
        &receiver.public().to_string(),
        "--min-reputation",
        "0",
        "--registry",
        &base,
        "--key",
        sender_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(sent["blake3"], blake3::hash(&contents).to_string());
    assert!(receiving.wait().await.success());

    // Every byte the relay carried is paid, and no more: once the relay
    // settles as it stops, the ledger holds exactly their cost.
    let carried = carried_bytes(&registry, &relay).await;
    assert!(carried > 6 << 20, "the relay carried the file ({carried} bytes)");
    let report = relay.shutdown().await;
    assert!(!report.incomplete, "{report:?}");
    let owed = ferry_proto::cost(carried, price).unwrap();
    let channels = registry.client(&sender).channels().await.unwrap();
    assert_eq!(channels.len(), 1, "{channels:?}");
    println!("the relay carried {carried} bytes; settled {} for {owed}", channels[0].settled);
    assert_eq!(channels[0].settled, owed, "settled for the {carried} bytes carried");
    let paid: Amount = sent["paid"].as_str().unwrap().parse().unwrap();
    assert_eq!(paid, owed, "ferry send reports what it paid");
    registry.assert_invariants().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_key_path_is_refused_and_creates_no_identity() {
    let dir = store_dir("typo-key");
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("alcie.key");
    // The command fails on the key before it would dial the registry, so
    // nothing listens at the URL.
    for command in
        [&["balance"][..], &["deposit", "1", "--operator-key", "op.key"], &["channels", "list"]]
    {
        let args =
            [command, &["--registry", "http://127.0.0.1:1", "--key", typo.to_str().unwrap()]]
                .concat();
        let output = process::run(&args).await;
        let text = process::output_text(&output);
        assert!(!output.status.success(), "{command:?} succeeded:\n{text}");
        assert!(text.contains("no key file at") && text.contains("ferry key new"), "{text}");
        assert!(!typo.exists(), "{command:?} created a key file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_checks_its_file_before_dialling() {
    let dir = store_dir("send-checks");
    std::fs::create_dir_all(dir.join("a-directory")).unwrap();
    let me = key_file(&dir, "me.key", &key(50));
    // Nothing listens at the registry's address: an error that names the
    // file, not the registry, shows nothing was dialled.
    let registry = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    );
    let to = key(51).public().to_string();
    for (file, expected) in [("a-directory", "is a directory"), ("missing.bin", "missing.bin")] {
        let path = dir.join(file);
        let args = [
            "send",
            path.to_str().unwrap(),
            "--to",
            &to,
            "--registry",
            &registry,
            "--key",
            me.to_str().unwrap(),
        ];
        let output = process::run(&args).await;
        let text = process::output_text(&output);
        assert!(!output.status.success() && text.contains(expected), "{text}");
        assert!(!text.contains("registry"), "it dialled: {text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The examples of docs/CLIENT.md, "Examples", run as their users run
/// them against a market: an echo service, and a paid download that the
/// fetching side pays for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_against_a_market() {
    // Probing, so that the new relays reach a default client's bar.
    let registry = Registry::start_probing(Some(std::time::Duration::from_millis(200))).await;
    let dir = store_dir("examples");
    std::fs::create_dir_all(&dir).unwrap();
    let mut relays = Vec::new();
    for seed in [60, 61] {
        relays.push(
            RunningRelay::start(
                &registry,
                &key(seed),
                |_| {},
                store_dir(&format!("examples-{seed}")),
            )
            .await,
        );
    }
    let (server, client) = (key(62), key(63));
    // A few probe rounds make both relays newcomers a default client takes.
    let admitted = async {
        loop {
            let policy = SelectionPolicy::default();
            let offers = registry.client(&client).offers(&policy).await.unwrap();
            if offers.len() == 2 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(WAIT, admitted).await.expect("the relays reach the default bar");
    let relay_file = key_file(&dir, "relay.key", &key(60));
    let status = ferry(&[
        "relay",
        "status",
        "--registry",
        &registry.base,
        "--key",
        relay_file.to_str().unwrap(),
    ])
    .await;
    assert!(
        status.contains("the newcomer floor") && status.contains("default clients consider it"),
        "{status}"
    );
    let server_file = key_file(&dir, "server.key", &server);
    let client_file = key_file(&dir, "client.key", &client);
    registry
        .client(&operator())
        .deposit(&client.public(), "2".parse().unwrap(), "examples")
        .await
        .unwrap();
    let path = |path: &Path| path.to_str().unwrap().to_owned();
    let run = |name: &str, args: Vec<String>| {
        let program = process::example(name);
        async move {
            let output = tokio::time::timeout(
                WAIT,
                tokio::process::Command::new(program).args(args).output(),
            )
            .await
            .expect("the example finishes in time")
            .unwrap();
            let text = process::output_text(&output);
            assert!(output.status.success(), "{text}");
            text
        }
    };
    let base = registry.base.clone();

    let (echoing, line) = process::spawn_program(
        &process::example("echo"),
        vec!["serve".into(), base.clone(), path(&server_file)],
    )
    .await;
    assert_eq!(line.trim(), format!("echoing as {}", server.public()));
    let server_key = server.public().to_string();
    let echoed = run(
        "echo",
        vec![
            "dial".into(),
            base.clone(),
            path(&client_file),
            server_key.clone(),
            "hello, market".into(),
        ],
    )
    .await;
    assert!(echoed.starts_with("hello, market\npaid 0."), "{echoed}");
    drop(echoing);

    let file = dir.join("offered.bin");
    let contents: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &contents).unwrap();
    let (serving, line) = process::spawn_program(
        &process::example("paid_download"),
        vec!["serve".into(), base.clone(), path(&server_file), path(&file)],
    )
    .await;
    assert!(line.starts_with("serving"), "{line}");
    let out = dir.join("fetched.bin");
    let fetched = run(
        "paid_download",
        vec!["fetch".into(), base.clone(), path(&client_file), server_key, path(&out)],
    )
    .await;
    assert!(fetched.contains(&format!("fetched {} bytes", contents.len())), "{fetched}");
    assert!(std::fs::read(&out).unwrap() == contents, "the download differs");
    let paid: Amount =
        fetched.lines().find_map(|line| line.strip_prefix("paid ")).unwrap().parse().unwrap();
    assert!(paid > Amount::ZERO, "{fetched}");
    drop(serving);
    for relay in relays {
        relay.shutdown().await;
    }
    registry.assert_invariants().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
