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
