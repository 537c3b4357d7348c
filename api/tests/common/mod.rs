//! A registry on 127.0.0.1:0 over a fresh database, and a client that signs
//! its requests as docs/PROTOCOL.md says.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_api::{AppState, Limits, RegistryConfig, Transport};
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::{
    KEY_HEADER, NONCE_HEADER, RelayAdvert, SIGNATURE_HEADER, SecretKey, SignedRequest,
    TIMESTAMP_HEADER,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// The operator's key in tests.
pub fn operator() -> SecretKey {
    SecretKey::from_seed(&[0xee; 32])
}

pub fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

/// A running registry: its address, its ledger, and a switch that stops it.
pub struct Registry {
    pub base: String,
    pub ledger: Ledger,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Registry {
    /// A registry over a fresh database.
    pub async fn start() -> Registry {
        let options = ferry_ledger::testing::fresh_database().await.unwrap();
        Registry::start_on(options).await
    }

    /// A registry over a fresh database, with these limits.
    pub async fn start_with(limits: Limits) -> Registry {
        Registry::start_serving(limits, Transport::default()).await
    }

    /// A registry over a fresh database, with these limits, reached this
    /// way; over TLS its base URL names `localhost`.
    pub async fn start_serving(limits: Limits, transport: Transport) -> Registry {
        let options = ferry_ledger::testing::fresh_database().await.unwrap();
        Registry::start_on_with(options, limits, transport).await
    }

    /// A registry over the database at `options` (a second instance shares it).
    pub async fn start_on(options: sqlx::postgres::PgConnectOptions) -> Registry {
        Registry::start_on_with(options, Limits::default(), Transport::default()).await
    }

    async fn start_on_with(
        options: sqlx::postgres::PgConnectOptions,
        limits: Limits,
        transport: Transport,
    ) -> Registry {
        let config = LedgerConfig { dispute_window: Duration::ZERO, ..LedgerConfig::default() };
        let ledger = Ledger::connect(options, config).await.unwrap();
        let state = AppState::new(
            ledger.clone(),
            RegistryConfig {
                operator: operator().public(),
                limits,
                probe_interval: None,
                transport: transport.clone(),
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let base = match transport.tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(ferry_api::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Registry { base, ledger, stop: Some(stop), server }
    }

    /// The plain-HTTP registry's socket address.
    pub fn address(&self) -> std::net::SocketAddr {
        self.base.strip_prefix("http://").expect("a plain HTTP registry").parse().unwrap()
    }

    /// A raw connection to the registry from the loopback address `from`,
    /// connected within 20 s.
    pub async fn connect_from(&self, from: [u8; 4]) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(std::net::IpAddr::from(from), 0)).unwrap();
        tokio::time::timeout(Duration::from_secs(20), socket.connect(self.address()))
            .await
            .expect("connected in time")
            .unwrap()
    }

    /// Stops the server gracefully and waits for it, bounded.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("the registry stops within 10 s")
            .unwrap()
            .unwrap();
    }

    /// Asserts every ledger invariant.
    pub async fn assert_invariants(&self) {
        let report = self.ledger.check().await.unwrap();
        assert!(report.is_ok(), "{:#?}", report.violations);
    }
}

/// One request, before it is signed and sent; tests tamper with its parts.
pub struct Call {
    pub method: &'static str,
    pub path: String,
    pub body: Vec<u8>,
    pub timestamp: u64,
    pub nonce: [u8; 16],
    pub idempotency_key: Option<String>,
}

static NONCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

impl Call {
    pub fn new(method: &'static str, path: &str, body: Option<Value>) -> Call {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(
            &NONCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes(),
        );
        nonce[8..].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
        Call {
            method,
            path: path.to_owned(),
            body: body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default(),
            timestamp: now(),
            nonce,
            idempotency_key: None,
        }
    }

    pub fn idempotent(mut self, key: &str) -> Call {
        self.idempotency_key = Some(key.to_owned());
        self
    }

    /// The four signature headers, signed by `signer` while claiming `claimed`.
    pub fn headers(&self, signer: &SecretKey, claimed: &SecretKey) -> Vec<(&'static str, String)> {
        let request = SignedRequest {
            method: self.method,
            path_and_query: &self.path,
            timestamp: self.timestamp,
            nonce: self.nonce,
            body: &self.body,
        };
        vec![
            (KEY_HEADER, claimed.public().to_string()),
            (TIMESTAMP_HEADER, self.timestamp.to_string()),
            (NONCE_HEADER, hex::encode(self.nonce)),
            (SIGNATURE_HEADER, request.sign(signer).to_string()),
        ]
    }

    /// Sends the call with exactly `headers`.
    pub async fn send_with(
        &self,
        base: &str,
        headers: &[(&'static str, String)],
    ) -> (StatusCode, Value) {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(self.method.as_bytes()).unwrap();
        let mut request =
            client.request(method, format!("{base}{}", self.path)).body(self.body.clone());
        if !self.body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(key) = &self.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = tokio::time::timeout(Duration::from_secs(30), request.send())
            .await
            .expect("the registry answers within 30 s")
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Signs the call with `signer` and sends it.
    pub async fn send(&self, base: &str, signer: &SecretKey) -> (StatusCode, Value) {
        self.send_with(base, &self.headers(signer, signer)).await
    }
}

/// A relay's advertisement at `price` per byte in `region`.
pub fn advert(relay: &SecretKey, price: &str, region: &str, issued_at_ms: u64) -> RelayAdvert {
    RelayAdvert {
        relay: relay.public(),
        address: "127.0.0.1:7000".into(),
        price_per_byte: price.parse().unwrap(),
        credit_window_bytes: 1 << 20,
        capacity_bytes_per_sec: 10 << 20,
        region: region.into(),
        protocol_version: 1,
        issued_at_ms,
    }
}

pub async fn publish(
    registry: &Registry,
    relay: &SecretKey,
    advert: RelayAdvert,
    signer: &SecretKey,
) -> (StatusCode, Value) {
    let signed = advert.sign(signer);
    Call::new("PUT", &format!("/v1/relays/{}/advert", relay.public()), Some(json!(signed)))
        .send(&registry.base, relay)
        .await
}

/// Registers `relay` (a default advertisement, signed by itself), so that
/// clients may open channels to it.
pub async fn register_relay(registry: &Registry, relay: &SecretKey) {
    let (status, body) =
        publish(registry, relay, advert(relay, "0.000000001", "eu", now() * 1000), relay).await;
    assert!(status.is_success(), "{status} {body}");
}
