//! Accepting connections: the per-IP bound, the mutual handshake, and the
//! first frame that says what the connection is for.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_client::{RegistryClient, RegistryError};
use ferry_proto::admission::{ACCEPT_ERROR_PAUSE, Admission};
use ferry_proto::wire::io::{ReadError, read_frame, write_frame};
use ferry_proto::wire::{CloseReason, Frame, WIRE_VERSION, transcript};
use ferry_proto::{PricePerByte, PublicKey, SecretKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use crate::config::RelayConfig;
use crate::data::DataDir;
use crate::debts::DebtBook;
use crate::lookups::Lookups;
use crate::metrics::Metrics;
use crate::session::Session;
use crate::store::VoucherStore;
use crate::tunnel::Pending;
use crate::{SettleReport, debts, market, session, settle, tunnel};

/// A running relay.
#[derive(Debug, Clone)]
pub struct Relay {
    pub(crate) shared: Arc<Shared>,
}

/// What every connection of the relay shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) key: SecretKey,
    pub(crate) registry: RegistryClient,
    pub(crate) store: VoucherStore,
    /// What each client key owes, across its sessions and restarts.
    pub(crate) debts: Arc<DebtBook>,
    /// The data directory's lock, held while the relay runs.
    _data_lock: std::fs::File,
    pub(crate) lookups: Lookups,
    pub(crate) metrics: Metrics,
    pub(crate) sessions: Mutex<HashMap<PublicKey, Arc<Session>>>,
    pub(crate) pending: Mutex<HashMap<u64, Pending>>,
    pub(crate) next_tunnel: AtomicU64,
    pub(crate) tunnels: AtomicUsize,
    /// Connections open per client address, at most
    /// `limits.connections_per_ip` each.
    admission: Arc<Admission>,
    price: Mutex<PricePerByte>,
    /// When the last advertisement was issued, in ms since the Unix epoch.
    pub(crate) last_advert_ms: AtomicU64,
    pub(crate) settled: settle::Settled,
    /// Asks the settlement worker for a round now (a channel is closing).
    pub(crate) settle_now: Notify,
    /// Set once when the relay shuts down; sessions and tunnels watch it.
    pub(crate) shutdown: watch::Sender<bool>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked:
/// every critical section here is a single insert, remove or assignment.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Relay {
    /// A relay with this key and configuration, reporting to `registry`
    /// (whose key must be `key`) and keeping its vouchers and debts in
    /// `data`.
    pub fn new(
        config: RelayConfig,
        key: SecretKey,
        registry: RegistryClient,
        data: DataDir,
    ) -> Relay {
        let price = config.price_per_byte;
        let (shutdown, _) = watch::channel(false);
        let lookups = Lookups::new(&config.limits);
        // The relay bounds connections per address here; sessions and
        // tunnels have their own bounds in total.
        let admission = Admission::new(usize::MAX, config.limits.connections_per_ip, Arc::new(()));
        Relay {
            shared: Arc::new(Shared {
                config,
                key,
                registry,
                store: data.store,
                debts: Arc::new(data.debts),
                _data_lock: data.lock,
                lookups,
                metrics: Metrics::default(),
                sessions: Mutex::default(),
                pending: Mutex::default(),
                next_tunnel: AtomicU64::new(1),
                tunnels: AtomicUsize::new(0),
                admission,
                price: Mutex::new(price),
                last_advert_ms: AtomicU64::new(0),
                settled: settle::Settled::default(),
                settle_now: Notify::new(),
                shutdown,
            }),
        }
    }

    /// The relay's key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public()
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// The price new sessions get.
    pub fn price(&self) -> PricePerByte {
        self.shared.price()
    }

    /// Publishes the relay's advertisement, then keeps the registry
    /// informed: heartbeats, price changes, and settlement of stored
    /// vouchers, until [`Relay::shutdown`]. Call once.
    pub async fn register(&self) -> Result<(), RegistryError> {
        market::publish(&self.shared, self.shared.price()).await?;
        tokio::spawn(market::run(Arc::clone(&self.shared)));
        tokio::spawn(settle::run(Arc::clone(&self.shared)));
        Ok(())
    }

    /// Accepts connections on `listener` until `shutdown` completes, and
    /// keeps the debt book on disk meanwhile.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::spawn(debts::run(Arc::clone(&self.shared.debts), self.shared.shutdown.subscribe()));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = self.shared.admission.admit(peer.ip()) else {
                self.shared.metrics.refused("connections_per_ip");
                continue;
            };
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                handle(shared, stream, peer.ip()).await;
                drop(slot);
            });
        }
    }

    /// Ends every session and tunnel, then submits every stored voucher for
    /// settlement (retrying within `settle_deadline`) and writes what each
    /// client key still owes.
    pub async fn shutdown(&self, settle_deadline: Duration) -> SettleReport {
        self.shared.shutdown.send_replace(true);
        let report = settle::final_round(&self.shared, settle_deadline).await;
        let book = Arc::clone(&self.shared.debts);
        match tokio::task::spawn_blocking(move || book.snapshot()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot write the debt book at shutdown"),
            Err(error) => tracing::error!(%error, "the debt book writer failed at shutdown"),
        }
        report
    }

    /// Bytes `client` was carried and has not paid for, over all its
    /// sessions: never more than the credit window.
    pub fn unpaid_bytes(&self, client: &PublicKey) -> u64 {
        self.shared.debts.owed(client)
    }
}

impl Shared {
    pub(crate) fn set_price(&self, price: PricePerByte) {
        *lock(&self.price) = price;
    }

    pub(crate) fn price(&self) -> PricePerByte {
        *lock(&self.price)
    }

    pub(crate) fn session(&self, key: &PublicKey) -> Option<Arc<Session>> {
        lock(&self.sessions).get(key).cloned()
    }
}

/// Why a connection ended early, for the `Close` frame and the metrics.
pub(crate) struct Refusal {
    pub(crate) reason: CloseReason,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(reason: CloseReason, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into() }
    }
}

impl From<ReadError> for Refusal {
    fn from(error: ReadError) -> Refusal {
        Refusal::new(CloseReason::Protocol, error.to_string())
    }
}

async fn handle(shared: Arc<Shared>, mut stream: TcpStream, ip: IpAddr) {
    let _ = stream.set_nodelay(true);
    let limit = shared.config.limits.handshake_timeout;
    let opened = match tokio::time::timeout(limit, handshake(&shared, &mut stream)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(Handshake::Probed)) => {
            shared.metrics.probed.inc();
            return;
        }
        Ok(Err(Handshake::Refused(refusal))) => {
            shared.metrics.refused("handshake");
            let close = Frame::Close { reason: refusal.reason, message: refusal.message };
            let _ = tokio::time::timeout(limit, write_frame(&mut stream, &close)).await;
            return;
        }
        Err(_) => {
            shared.metrics.refused("handshake_timeout");
            return;
        }
    };
    let (client, first) = opened;
    match first {
        Frame::OpenSession { channel } => {
            session::run(shared, stream, client, channel, ip).await;
        }
        Frame::Dial { peer } => tunnel::dial(shared, stream, client, peer).await,
        Frame::Accept { tunnel } => tunnel::accept(&shared, stream, client, tunnel).await,
        other => {
            let close = Frame::Close {
                reason: CloseReason::Protocol,
                message: format!("{} cannot open a connection", other.name()),
            };
            let _ = tokio::time::timeout(limit, write_frame(&mut stream, &close)).await;
        }
    }
}

/// How a handshake ended short of a purpose frame.
enum Handshake {
    /// The peer hung up cleanly once the relay proved its key: a probe
    /// (the registry's, or a client measuring the round trip).
    Probed,
    /// The peer broke the protocol or failed to authenticate.
    Refused(Refusal),
}

impl From<Refusal> for Handshake {
    fn from(refusal: Refusal) -> Handshake {
        Handshake::Refused(refusal)
    }
}

impl From<ReadError> for Handshake {
    fn from(error: ReadError) -> Handshake {
        Handshake::Refused(error.into())
    }
}

/// The relay's side of the handshake: returns the authenticated client key
/// and the connection's first frame after it.
async fn handshake(
    shared: &Shared,
    stream: &mut TcpStream,
) -> Result<(PublicKey, Frame), Handshake> {
    let Frame::ClientHello { version, client, nonce: client_nonce } = read_frame(stream).await?
    else {
        return Err(Refusal::new(CloseReason::Protocol, "expected ClientHello").into());
    };
    if version != WIRE_VERSION {
        return Err(Refusal::new(
            CloseReason::Protocol,
            format!(
                "protocol version {version} is not supported; this relay speaks {WIRE_VERSION}"
            ),
        )
        .into());
    }
    let mut relay_nonce = [0u8; 32];
    getrandom::fill(&mut relay_nonce)
        .map_err(|_| Refusal::new(CloseReason::Unavailable, "no randomness"))?;
    let relay = shared.key.public();
    let signature =
        shared.key.sign(&transcript(b'R', version, &client, &client_nonce, &relay, &relay_nonce));
    let hello = Frame::RelayHello { version, relay, nonce: relay_nonce, signature };
    write_frame(stream, &hello)
        .await
        .map_err(|e| Refusal::new(CloseReason::Protocol, e.to_string()))?;
    let signature = match read_frame(stream).await {
        Ok(Frame::ClientAuth { signature }) => signature,
        Err(ReadError::Io(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Handshake::Probed);
        }
        Ok(_) => return Err(Refusal::new(CloseReason::Protocol, "expected ClientAuth").into()),
        Err(error) => return Err(error.into()),
    };
    let signed = transcript(b'C', version, &client, &client_nonce, &relay, &relay_nonce);
    client.verify(&signed, &signature).map_err(|_| {
        Refusal::new(CloseReason::Unauthenticated, "the client's signature is not valid")
    })?;
    Ok((client, read_frame(stream).await?))
}
