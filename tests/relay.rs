//! `ferry relay` and `ferry registry` as processes: a relay killed with
//! SIGKILL right after acknowledging a voucher settles it when restarted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod process;

use ferry_client::RegistryClient;
use ferry_client::relay::{Event, Session};
use ferry_proto::wire::VoucherVerdict;
use ferry_proto::{ChannelId, PublicKey, SecretKey, Voucher};
use process::{WAIT, relay_address, relay_args, signal_and_wait, spawn};
use reqwest::Method;
use serde_json::json;
use sqlx::ConnectOptions;

async fn settled(registry: &RegistryClient, channel: &ChannelId) -> String {
    registry.channel(channel).await.unwrap().settled.to_string()
}

/// A `ferry registry` process on a fresh database, with its operator key in
/// `dir`; returns it, its URL and the operator key.
async fn start_registry(dir: &std::path::Path) -> (process::Process, String, SecretKey) {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let url = options.to_url_lossy().to_string();
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
    (registry_process, base.to_owned(), operator)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_data_directory_in_use_is_refused() {
    let dir = scratch("locked");
    let (registry_process, base, _) = start_registry(&dir).await;
    let data = dir.join("data");
    let mut args = relay_args(&base, &dir, None);
    args.extend(["--data-dir".into(), data.display().to_string()]);
    let (first, _) = spawn(args.clone()).await;
    // The second one binds its own port and key, but not the directory.
    let mut second = relay_args(&base, &dir.join("second"), None);
    second.extend(["--data-dir".into(), data.display().to_string()]);
    std::fs::create_dir_all(dir.join("second")).unwrap();
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry")).args(&second).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second relay must not run: {stderr}");
    assert!(
        stderr.contains("is in use by another relay") && stderr.contains("--data-dir"),
        "the error names the cause and the way out: {stderr}"
    );
    // The first one goes on, and once it has stopped the directory is free.
    assert!(signal_and_wait(first, "-TERM").await.success());
    let (again, _) = spawn(args).await;
    assert!(signal_and_wait(again, "-TERM").await.success());
    assert!(signal_and_wait(registry_process, "-TERM").await.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_settles_its_acknowledged_voucher_after_a_restart() {
    let dir = scratch("kill");
    let (registry_process, base, operator) = start_registry(&dir).await;
    let base = base.as_str();
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

    let session = Session::open(&relay, &client, Some(channel), None).await.unwrap();
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
