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
use ferry_relay::{DataDir, Relay, RelayConfig};
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
                transport: ferry_api::Transport::default(),
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

    /// Sets relays' stored reputation, as their history would have, once their
    /// first heartbeat (which recomputes it) is in, and waits until the
    /// registry's listing shows it.
    pub async fn set_reputations(&self, scores: &[(&SecretKey, f64)]) {
        let client = self.client(&key(99));
        let listed = |listing: &serde_json::Value, relay: &SecretKey| {
            listing["relays"]
                .as_array()
                .unwrap()
                .iter()
                .find(|view| view["advert"]["advert"]["relay"] == relay.public().to_string())
                .cloned()
        };
        let heard = async {
            loop {
                let listing = client.get("/v1/relays?live=false&limit=10").await.unwrap();
                if scores.iter().all(|(relay, _)| {
                    listed(&listing, relay).is_some_and(|view| !view["last_heartbeat"].is_null())
                }) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(WAIT, heard).await.expect("every relay's first heartbeat is in");
        let shown = async {
            loop {
                for (relay, score) in scores {
                    sqlx::query("UPDATE relays SET reputation = $1 WHERE key_bytes = $2")
                        .bind(score)
                        .bind(relay.public().as_bytes().as_slice())
                        .execute(self.ledger.pool())
                        .await
                        .unwrap();
                }
                let listing = client.get("/v1/relays?live=false&limit=10").await.unwrap();
                let agrees = scores.iter().all(|(relay, score)| {
                    listed(&listing, relay)
                        .is_some_and(|view| view["reputation"]["score"].as_f64() == Some(*score))
                });
                if agrees {
                    return;
                }
                // The listing is a snapshot at most a second old.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(WAIT, shown).await.expect("the listing shows the reputations");
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
        let data = DataDir::open(&store_dir).unwrap();
        let relay = Relay::new(config, key.clone(), registry.client(key), data);
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
