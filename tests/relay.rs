//! `ferry relay` and `ferry registry` as processes: a relay killed with
//! SIGKILL right after acknowledging a voucher settles it when restarted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_client::RegistryClient;
use ferry_client::relay::{Event, RelayAddress, Session};
use ferry_proto::wire::VoucherVerdict;
use ferry_proto::{ChannelId, PublicKey, SecretKey, Voucher};
use reqwest::Method;
use serde_json::json;
use sqlx::ConnectOptions;

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// Starts `ferry` with `args` and returns it with its first output line.
async fn spawn(args: Vec<String>) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Bounded by the child, which prints the line or exits.
    let line = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            // Later lines are read (and dropped) so the child never blocks.
            std::thread::spawn(move || {
                let mut rest = String::new();
                while reader.read_line(&mut rest).is_ok_and(|read| read > 0) {
                    rest.clear();
                }
            });
            line
        }),
    )
    .await
    .expect("ferry starts in time")
    .unwrap();
    assert!(!line.is_empty(), "ferry {args:?} exited before printing its address");
    (child, line)
}

async fn signal_and_wait(mut child: Child, signal: &str) -> std::process::ExitStatus {
    let sent = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait().unwrap()))
        .await
        .expect("ferry stops in time")
        .unwrap()
}

fn relay_args(registry: &str, dir: &Path, config: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "relay".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--registry".into(),
        registry.into(),
        "--key".into(),
        dir.join("relay.key").display().to_string(),
    ];
    if let Some(config) = config {
        args.extend(["--config".into(), config.display().to_string()]);
    }
    args
}

/// The relay's key and address from its first line:
/// `relay KEY listening on ADDR (...)`.
fn relay_address(line: &str) -> RelayAddress {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((words[0], words[2], words[3]), ("relay", "listening", "on"), "{line}");
    RelayAddress { key: words[1].parse().unwrap(), address: words[4].to_owned() }
}

async fn settled(registry: &RegistryClient, channel: &ChannelId) -> String {
    registry.channel(channel).await.unwrap().settled.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_settles_its_acknowledged_voucher_after_a_restart() {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let url = options.to_url_lossy().to_string();
    let dir = std::env::temp_dir().join(format!("ferry-relay-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let operator_path = dir.join("operator.key");
    let (registry_process, line) = spawn(vec![
        "registry".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        url,
        "--operator-key".into(),
        operator_path.display().to_string(),
    ])
    .await;
    let base = line.strip_prefix("listening on ").unwrap().split_whitespace().next().unwrap();
    let operator = SecretKey::read_file(&operator_path).unwrap();
    let http = RegistryClient::http().unwrap();

    // Settings from a config file: vouchers wait an hour for the timer, so
    // only the restart's shutdown can settle them.
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nsettle_interval_secs = 3600\nregion = \"test\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let (relay_process, line) = spawn(relay_args(base, &dir, Some(&config))).await;
    let relay = relay_address(&line);

    let client = SecretKey::from_seed(&[2; 32]);
    let amount = json!({ "amount": "10" });
    RegistryClient::new(base, operator, http.clone())
        .signed(
            Method::POST,
            &format!("/v1/accounts/{}/deposits", client.public()),
            Some(&amount),
            Some("d1"),
        )
        .await
        .unwrap();
    let open = json!({ "relay": relay.key.to_string(), "nonce": 1, "amount": "10" });
    let as_client = RegistryClient::new(base, client.clone(), http.clone());
    let channel: ChannelId = as_client
        .signed(Method::POST, "/v1/channels", Some(&open), Some("o1"))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let mut session = Session::open(&relay, &client, Some(channel), None).await.unwrap();
    let voucher = Voucher { channel, sequence: 1, cumulative: "3".parse().unwrap() }.sign(&client);
    session.pay(voucher).await.unwrap();
    let answer = tokio::time::timeout(WAIT, session.next_event()).await.unwrap().unwrap();
    assert_eq!(answer, Event::VoucherResult { sequence: 1, verdict: VoucherVerdict::Accepted });

    let killed = signal_and_wait(relay_process, "-KILL").await;
    assert!(!killed.success(), "killed, not exited");
    assert_eq!(settled(&as_client, &channel).await, "0", "nothing settled before the kill");

    let (restarted, line) = spawn(relay_args(base, &dir, Some(&config))).await;
    let again: PublicKey = relay_address(&line).key;
    assert_eq!(again, relay.key, "the key file is reused");
    let stopped = signal_and_wait(restarted, "-TERM").await;
    assert!(stopped.success(), "{stopped}");
    assert_eq!(settled(&as_client, &channel).await, "3", "the acknowledged voucher was paid");

    assert!(signal_and_wait(registry_process, "-TERM").await.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
