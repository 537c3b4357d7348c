//! A client of the registry's web API that signs its requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_proto::tls::rustls::pki_types::CertificateDer;
use ferry_proto::{
    Amount, ChannelId, KEY_HEADER, NONCE_HEADER, PublicKey, SIGNATURE_HEADER, SecretKey,
    SignedAdvert, SignedHomeRelays, SignedRequest, SignedVoucher, TIMESTAMP_HEADER,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// How long one registry request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The header that names an operation for idempotent retries.
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an error.
    #[error("the registry refused: {status} {code}: {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The registry's error code, such as `insufficient_balance`.
        code: String,
        /// The registry's explanation.
        message: String,
    },
    /// The registry could not be reached or its answer not read.
    #[error("cannot reach the registry: {0}")]
    Transport(#[from] reqwest::Error),
    /// The registry's answer is not what this client expects.
    #[error("unexpected answer from the registry: {0}")]
    Unexpected(String),
    /// The TLS configuration could not be built (an unusable CA file).
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] ferry_proto::tls::TlsError),
    /// The request could not be prepared (no randomness for a nonce, or a
    /// body that does not serialise).
    #[error("cannot prepare the request: {0}")]
    Prepare(String),
}

impl RegistryError {
    /// The registry's error code, when it refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            RegistryError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A payment channel as the registry shows it to its client and its relay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelView {
    /// The channel id.
    pub id: ChannelId,
    /// The paying client.
    pub client: PublicKey,
    /// The paid relay.
    pub relay: PublicKey,
    /// `open`, `closing` or `closed`.
    pub state: String,
    /// Everything the client put in.
    pub deposited: Amount,
    /// Everything paid out for vouchers (to the relay and as fees): the
    /// cumulative amount of the newest settled voucher.
    pub settled: Amount,
    /// What went back to the client at the close.
    pub refunded: Amount,
    /// What is still in escrow: deposited less settled and refunded.
    pub escrow: Amount,
    /// The client's nonce, which tells its channels to one relay apart.
    pub nonce: u64,
    /// The newest settled voucher's sequence.
    pub last_sequence: u64,
    /// While closing: until when (RFC 3339) the relay may still settle;
    /// after it anyone may finalize the channel.
    #[serde(default)]
    pub dispute_deadline: Option<String>,
}

/// The registry's API, signed by one key.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    key: SecretKey,
}

impl RegistryClient {
    /// A client of the registry at `base` (such as `http://127.0.0.1:7070`)
    /// acting for `key`, over `http` (share one to share its connections).
    pub fn new(base: &str, key: SecretKey, http: reqwest::Client) -> RegistryClient {
        RegistryClient { base: base.trim_end_matches('/').to_owned(), http, key }
    }

    /// This registry, reached over the same connections and trust, acting
    /// for `key`.
    pub fn acting_for(&self, key: SecretKey) -> RegistryClient {
        RegistryClient { base: self.base.clone(), http: self.http.clone(), key }
    }

    /// An HTTP client with the registry request timeout, for `http://`
    /// and `https://` registries; over TLS it trusts the system's roots.
    pub fn http() -> Result<reqwest::Client, RegistryError> {
        RegistryClient::http_trusting(None)
    }

    /// An HTTP client with the registry request timeout that, over TLS,
    /// trusts only `pinned_roots` when they are given (a private registry's
    /// own CA), the system's roots otherwise.
    pub fn http_trusting(
        pinned_roots: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<reqwest::Client, RegistryError> {
        let tls = ferry_proto::tls::client_config(pinned_roots)?;
        Ok(reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tls_backend_preconfigured(tls)
            .build()?)
    }

    /// Sends a request signed by this client's key and returns the JSON
    /// answer. `idempotency_key` names the operation for safe retries.
    pub async fn signed(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, RegistryError> {
        let body = match body {
            Some(body) => {
                serde_json::to_vec(body).map_err(|e| RegistryError::Prepare(e.to_string()))?
            }
            None => Vec::new(),
        };
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| RegistryError::Prepare(e.to_string()))?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = SignedRequest {
            method: method.as_str(),
            path_and_query,
            timestamp,
            nonce,
            body: &body,
        }
        .sign(&self.key);
        let mut request = self
            .http
            .request(method, format!("{}{path_and_query}", self.base))
            .header(KEY_HEADER, self.key.public().to_string())
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(NONCE_HEADER, hex::encode(nonce))
            .header(SIGNATURE_HEADER, signature.to_string());
        if !body.is_empty() {
            request = request.header("content-type", "application/json").body(body);
        }
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_HEADER, key);
        }
        answer(request.send().await?).await
    }

    /// Sends an unsigned GET and returns the JSON answer.
    pub async fn get(&self, path_and_query: &str) -> Result<Value, RegistryError> {
        answer(self.http.get(format!("{}{path_and_query}", self.base)).send().await?).await
    }

    /// Publishes this relay's signed advertisement.
    pub async fn publish_advert(&self, advert: &SignedAdvert) -> Result<Value, RegistryError> {
        let path = format!("/v1/relays/{}/advert", self.key.public());
        self.signed(Method::PUT, &path, Some(&json!(advert)), None).await
    }

    /// Reports this relay's load.
    pub async fn heartbeat(
        &self,
        load_bytes_per_sec: u64,
        sessions: u64,
    ) -> Result<Value, RegistryError> {
        let path = format!("/v1/relays/{}/heartbeats", self.key.public());
        let body = json!({ "load_bytes_per_sec": load_bytes_per_sec, "sessions": sessions });
        self.signed(Method::POST, &path, Some(&body), None).await
    }

    /// Settles a batch of vouchers paid to this relay; the answer holds one
    /// outcome per voucher. Retrying with the same `idempotency_key` and
    /// vouchers pays nothing twice.
    pub async fn settle(
        &self,
        vouchers: &[SignedVoucher],
        idempotency_key: &str,
    ) -> Result<Value, RegistryError> {
        let body = json!({ "vouchers": vouchers });
        self.signed(Method::POST, "/v1/settlements", Some(&body), Some(idempotency_key)).await
    }
}

impl RegistryClient {
    /// A channel this client is the client or the relay of.
    pub async fn channel(&self, id: &ChannelId) -> Result<ChannelView, RegistryError> {
        let value = self.signed(Method::GET, &format!("/v1/channels/{id}"), None, None).await?;
        parse(value)
    }

    /// This key's newest channels, as client or relay, newest first.
    pub async fn channels(&self) -> Result<Vec<ChannelView>, RegistryError> {
        let path = format!("/v1/accounts/{}/channels", self.key.public());
        let mut value = self.signed(Method::GET, &path, None, None).await?;
        parse(value["channels"].take())
    }

    /// Opens a channel to `relay` with `amount` in escrow. `nonce` tells
    /// this client's channels to one relay apart; retrying with the same
    /// one opens nothing twice.
    pub async fn open_channel(
        &self,
        relay: &PublicKey,
        nonce: u64,
        amount: Amount,
    ) -> Result<ChannelView, RegistryError> {
        let body = json!({ "relay": relay, "nonce": nonce, "amount": amount });
        // Idempotency keys are per client, and nonces per relay: the key
        // names both. 32 hex digits of the relay's key leave room for a u64.
        let relay_prefix: String = relay.to_string().chars().take(32).collect();
        let idempotency = format!("open-{relay_prefix}-{nonce}");
        parse(self.signed(Method::POST, "/v1/channels", Some(&body), Some(&idempotency)).await?)
    }

    /// Adds `amount` to a channel's escrow; `idempotency_key` names this
    /// top-up for retries.
    pub async fn top_up(
        &self,
        id: &ChannelId,
        amount: Amount,
        idempotency_key: &str,
    ) -> Result<ChannelView, RegistryError> {
        let path = format!("/v1/channels/{id}/top-ups");
        let body = json!({ "amount": amount });
        parse(self.signed(Method::POST, &path, Some(&body), Some(idempotency_key)).await?)
    }

    /// Asks to close a channel: the relay settles its newest voucher and the
    /// rest comes back at the close (at once if the relay closes it, else
    /// after the dispute window, by [`RegistryClient::finalize`]).
    pub async fn request_close(&self, id: &ChannelId) -> Result<ChannelView, RegistryError> {
        let path = format!("/v1/channels/{id}/close-request");
        parse(self.signed(Method::POST, &path, None, Some(&operation("close", id))).await?)
    }

    /// Closes a channel whose dispute window has passed and refunds the rest.
    pub async fn finalize(&self, id: &ChannelId) -> Result<ChannelView, RegistryError> {
        let path = format!("/v1/channels/{id}/finalize");
        parse(self.signed(Method::POST, &path, None, Some(&operation("finalize", id))).await?)
    }

    /// This key's money at a glance: available, in escrow, earned.
    pub async fn balance(&self) -> Result<Value, RegistryError> {
        let path = format!("/v1/accounts/{}", self.key.public());
        self.signed(Method::GET, &path, None, None).await
    }

    /// A page of this key's transfers, newest first.
    pub async fn statement(&self, limit: u32) -> Result<Value, RegistryError> {
        let path = format!("/v1/accounts/{}/statement?limit={limit}", self.key.public());
        self.signed(Method::GET, &path, None, None).await
    }

    /// Credits `amount` to `holder`: only the registry's operator may.
    pub async fn deposit(
        &self,
        holder: &PublicKey,
        amount: Amount,
        idempotency_key: &str,
    ) -> Result<Value, RegistryError> {
        let path = format!("/v1/accounts/{holder}/deposits");
        let body = json!({ "amount": amount });
        self.signed(Method::POST, &path, Some(&body), Some(idempotency_key)).await
    }

    /// Withdraws `amount` of this key's available balance out of the
    /// ledger; the answer holds the balance left.
    pub async fn withdraw(
        &self,
        amount: Amount,
        idempotency_key: &str,
    ) -> Result<Value, RegistryError> {
        let path = format!("/v1/accounts/{}/withdrawals", self.key.public());
        let body = json!({ "amount": amount });
        self.signed(Method::POST, &path, Some(&body), Some(idempotency_key)).await
    }

    /// Publishes the relays this client listens on.
    pub async fn publish_home_relays(
        &self,
        home: &SignedHomeRelays,
    ) -> Result<Value, RegistryError> {
        let path = format!("/v1/clients/{}/home-relays", self.key.public());
        self.signed(Method::PUT, &path, Some(&json!(home)), None).await
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The key this client signs with.
    pub fn key(&self) -> &SecretKey {
        &self.key
    }
}

/// The nonce for `client`'s next channel to `relay`: one above the highest
/// in `channels` (the client's listing), or 1 for its first.
pub fn next_nonce(channels: &[ChannelView], client: &PublicKey, relay: &PublicKey) -> u64 {
    channels
        .iter()
        .filter(|channel| channel.client == *client && channel.relay == *relay)
        .map(|channel| channel.nonce)
        .max()
        .map_or(1, |nonce| nonce + 1)
}

/// The first `digits` hex digits of a channel id, to name an operation on
/// the channel within the 64 characters an idempotency key may have.
pub(crate) fn id_prefix(channel: &ChannelId, digits: usize) -> String {
    channel.to_string().chars().take(digits).collect()
}

/// An idempotency key for a one-time operation on a channel: 128 bits of
/// the channel id are plenty.
fn operation(name: &str, channel: &ChannelId) -> String {
    format!("{name}-{}", id_prefix(channel, 32))
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, RegistryError> {
    serde_json::from_value(value).map_err(|error| RegistryError::Unexpected(error.to_string()))
}

async fn answer(response: reqwest::Response) -> Result<Value, RegistryError> {
    let status = response.status();
    let bytes = response.bytes().await?;
    let value: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    if status.is_success() {
        return Ok(value);
    }
    let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
    Err(RegistryError::Refused { status, code: text("code"), message: text("message") })
}
