//! Shared by the relay's tests and the end-to-end tests in the workspace's
//! tests/: a registry over a fresh database, relays on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use ferry_api::{AppState, Limits as ApiLimits, RegistryConfig};
use ferry_client::RegistryClient;
use ferry_client::relay::RelayAddress;
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::{ChannelId, PricePerByte, PublicKey, SecretKey};
use ferry_relay::{Relay, RelayConfig, VoucherStore};
use reqwest::Method;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

pub fn operator() -> SecretKey {
    key(0xee)
}

/// A registry over a fresh database.
pub struct Registry {
    pub base: String,
    pub ledger: Ledger,
    pub http: reqwest::Client,
}

impl Registry {
    pub async fn start() -> Registry {
        Registry::start_probing(None).await
    }

    pub async fn start_probing(probe_interval: Option<Duration>) -> Registry {
        let options = ferry_ledger::testing::fresh_database().await.unwrap();
        let config = LedgerConfig { dispute_window: Duration::ZERO, ..LedgerConfig::default() };
        let ledger = Ledger::connect(options, config).await.unwrap();
        let state = AppState::new(
            ledger.clone(),
            RegistryConfig {
                operator: operator().public(),
                limits: ApiLimits::default(),
                probe_interval,
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(ferry_api::serve(listener, state, std::future::pending()));
        Registry { base, ledger, http: RegistryClient::http().unwrap() }
    }

    pub fn client(&self, key: &SecretKey) -> RegistryClient {
        RegistryClient::new(&self.base, key.clone(), self.http.clone())
    }

    /// Deposits `amount` for `client` and opens a channel of it to `relay`.
    pub async fn fund(&self, client: &SecretKey, relay: &PublicKey, amount: &str) -> ChannelId {
        let deposit = json!({ "amount": amount });
        let path = format!("/v1/accounts/{}/deposits", client.public());
        let idempotency = format!("deposit-{}", &client.public().to_string()[..16]);
        self.client(&operator())
            .signed(Method::POST, &path, Some(&deposit), Some(&idempotency))
            .await
            .unwrap();
        let open = json!({ "relay": relay.to_string(), "nonce": 1, "amount": amount });
        let idempotency = format!("open-{}", &client.public().to_string()[..16]);
        let channel = self
            .client(client)
            .signed(Method::POST, "/v1/channels", Some(&open), Some(&idempotency))
            .await
            .unwrap();
        channel["id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn assert_invariants(&self) {
        let report = self.ledger.check().await.unwrap();
        assert!(report.is_ok(), "{:#?}", report.violations);
    }
}

/// A relay on 127.0.0.1:0 registered with `registry`.
pub struct RunningRelay {
    pub relay: Relay,
    pub address: RelayAddress,
    pub stop: Option<oneshot::Sender<()>>,
    pub store_dir: PathBuf,
}

impl RunningRelay {
    pub async fn start(
        registry: &Registry,
        key: &SecretKey,
        tune: impl FnOnce(&mut RelayConfig),
        store_dir: PathBuf,
    ) -> RunningRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let price = PricePerByte::from_attos(1_000_000_000).unwrap(); // 1e-9 per byte
        let mut config = RelayConfig::new(&address, "test", price);
        config.credit_window_bytes = 256 * 1024;
        tune(&mut config);
        std::fs::create_dir_all(&store_dir).unwrap();
        let store = VoucherStore::open(&store_dir.join("vouchers.log")).unwrap();
        let relay = Relay::new(config, key.clone(), registry.client(key), store);
        relay.register().await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = relay.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        RunningRelay {
            relay,
            address: RelayAddress { address, key: key.public() },
            stop: Some(stop),
            store_dir,
        }
    }

    /// Stops accepting and shuts down, settling every stored voucher.
    pub async fn shutdown(mut self) -> ferry_relay::SettleReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.relay.shutdown(WAIT).await
    }
}

pub fn store_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-relay-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
