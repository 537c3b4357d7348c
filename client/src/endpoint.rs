//! A peer of the market: reachable by its key through home relays, able to
//! dial any other peer's key, paying its relays from its wallet
//! (docs/CLIENT.md, "Endpoints").
//!
//! An [`Endpoint`] keeps one session per relay it uses. Sessions on home
//! relays listen; sessions on relays it dials through pay, and their
//! vouchers drive the wallet's top-ups. Every connection is a resumable,
//! encrypted [`Stream`]: when the relay carrying it dies, the dialling side
//! reconnects through the peer's next relay and the stream goes on.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_proto::wire::ListenPolicy;
use ferry_proto::{Amount, ChannelId, HomeRelays, PublicKey, SecretKey, SignedHomeRelays};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::registry::{RegistryClient, RegistryError};
use crate::relay::{self, Event, Payer, RelayAddress, RelayError, Session};
use crate::secure::{self, SecureError, Transport};
use crate::select::{self, Offer, SelectionPolicy};
use crate::stream::{self, ConnectionId, Finishing, Link, Offered, Record, Redial, Stream};
use crate::wallet::{Budget, ChannelMoney, Wallet};

/// Connections one endpoint holds at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// New incoming connections waiting for [`Endpoint::accept`].
pub const ACCEPT_QUEUE: usize = 16;
/// Incoming links being set up at once (handshake and hello).
pub const MAX_PENDING_LINKS: usize = 32;
/// How long a direct connection attempt may take before the relays are
/// tried.
pub const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a dial or a redial keeps trying the peer's routes.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Endpoint::close`] waits for streams whose both ends were
/// sent to exchange their last acknowledgements.
pub const CLOSE_FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two rounds over every route.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Why an endpoint could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A relay refused or failed.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The encrypted handshake failed.
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The peer's published home relays do not verify.
    #[error("the peer's home relay list does not verify: {0}")]
    InvalidHome(String),
    /// No relay meets the policy, or none answered.
    #[error(
        "no relay to listen on meets the policy: `ferry relays --all` shows every relay with its score; widen the policy with --min-reputation, --max-price or --region"
    )]
    NoRelays,
    /// Every route to the peer failed.
    #[error("could not reach {peer} through any of its {routes} routes: {last}")]
    Unreachable {
        /// The peer.
        peer: PublicKey,
        /// How many routes were tried.
        routes: usize,
        /// The last route's failure.
        last: String,
    },
    /// Dialling through a relay needs a wallet to pay it.
    #[error("this endpoint has no budget, so it cannot pay a relay to dial through")]
    NoWallet,
    /// The endpoint holds [`MAX_CONNECTIONS`] connections.
    #[error("this endpoint holds {MAX_CONNECTIONS} connections already")]
    TooManyConnections,
    /// Binding the direct listener failed.
    #[error("direct listener: {0}")]
    Io(#[from] std::io::Error),
}

/// How an endpoint behaves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Which relays to listen on and dial through.
    pub policy: SelectionPolicy,
    /// How many relays to listen on (at least 2 for failover).
    pub home_relays: usize,
    /// Funds channels to the relays it dials through; none: it can only
    /// be reached, or dial direct addresses.
    pub budget: Option<Budget>,
    /// Where to accept direct connections, published with the home
    /// relays (none: relays only).
    pub direct: Option<SocketAddr>,
    /// Who may reach this endpoint.
    pub listen: ListenPolicy,
}

impl Default for EndpointConfig {
    fn default() -> EndpointConfig {
        EndpointConfig {
            policy: SelectionPolicy::default(),
            home_relays: 2,
            budget: None,
            direct: None,
            listen: ListenPolicy::Open,
        }
    }
}

/// One way to the peer.
#[derive(Debug, Clone)]
enum Route {
    Direct(String),
    Relay(RelayAddress),
}

impl Route {
    fn name(&self) -> String {
        match self {
            Route::Direct(address) => format!("direct {address}"),
            Route::Relay(relay) => format!("relay {}", relay.key),
        }
    }
}

/// A connection that more links can join.
struct Resumable {
    peer: PublicKey,
    links: mpsc::Sender<Offered>,
}

struct Shared {
    me: SecretKey,
    registry: RegistryClient,
    wallet: Option<Wallet>,
    config: EndpointConfig,
    /// One session per relay, by relay key.
    sessions: tokio::sync::Mutex<HashMap<PublicKey, Arc<Session>>>,
    /// The newest voucher amount per channel this endpoint paid.
    paid: Mutex<HashMap<ChannelId, Amount>>,
    /// Relays caught overcharging: never used again by this endpoint.
    refused: Mutex<HashSet<PublicKey>>,
    connections: Mutex<HashMap<ConnectionId, Resumable>>,
    accepted: mpsc::Sender<Stream>,
    pending_links: Semaphore,
    /// This endpoint's connections that are finishing.
    finishing: Finishing,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A peer of the market (see the module's documentation).
pub struct Endpoint {
    shared: Arc<Shared>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Stream>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("key", &self.shared.me.public()).finish()
    }
}

impl Endpoint {
    /// An endpoint acting as `registry`'s key. It does nothing on the
    /// network until it listens or dials.
    pub fn new(registry: RegistryClient, config: EndpointConfig) -> Endpoint {
        let wallet = config.budget.map(|budget| Wallet::new(registry.clone(), budget));
        let (accepted_tx, accepted) = mpsc::channel(ACCEPT_QUEUE);
        let shared = Arc::new(Shared {
            me: registry.key().clone(),
            registry,
            wallet,
            config,
            sessions: tokio::sync::Mutex::default(),
            paid: Mutex::default(),
            refused: Mutex::default(),
            connections: Mutex::default(),
            accepted: accepted_tx,
            pending_links: Semaphore::new(MAX_PENDING_LINKS),
            finishing: Finishing::default(),
        });
        Endpoint { shared, accepted: tokio::sync::Mutex::new(accepted) }
    }

    /// This endpoint's key.
    pub fn key(&self) -> PublicKey {
        self.shared.me.public()
    }

    /// The wallet paying this endpoint's relays, if it has a budget.
    pub fn wallet(&self) -> Option<&Wallet> {
        self.shared.wallet.as_ref()
    }

    /// Starts listening: picks the best relays under the policy, listens on
    /// them (and on the direct address, if configured), and publishes them
    /// as this endpoint's home relays. Returns the published list. A relay
    /// is published only once it confirmed the listen, so a peer that
    /// reads the list can dial at once.
    pub async fn listen(&self) -> Result<SignedHomeRelays, EndpointError> {
        let shared = &self.shared;
        let ranked = select::discover(&shared.registry, &shared.me, &shared.config.policy).await?;
        let mut home = Vec::new();
        for candidate in ranked {
            if home.len() >= shared.config.home_relays.max(1) {
                break;
            }
            let address = candidate.offer.address();
            match Shared::session(shared, &address, false).await {
                Ok(session) => {
                    session.listen(shared.config.listen.clone()).await?;
                    home.push(address.key);
                }
                Err(error) => tracing::warn!(relay = %address.key, %error, "cannot listen here"),
            }
        }
        if home.is_empty() {
            return Err(EndpointError::NoRelays);
        }
        let direct_address = match shared.config.direct {
            Some(address) => {
                let listener = TcpListener::bind(address).await?;
                let bound = listener.local_addr()?.to_string();
                tokio::spawn(accept_direct(Arc::downgrade(shared), listener));
                Some(bound)
            }
            None => None,
        };
        let issued_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        let list =
            HomeRelays { client: shared.me.public(), relays: home, direct_address, issued_at_ms }
                .sign(&shared.me);
        shared.registry.publish_home_relays(&list).await?;
        Ok(list)
    }

    /// The next connection a peer opened to this endpoint; none once the
    /// endpoint is gone.
    pub async fn accept(&self) -> Option<Stream> {
        self.accepted.lock().await.recv().await
    }

    /// Opens an encrypted stream to `peer`: its direct address if it
    /// published one and it answers, else its home relays, best first
    /// under this endpoint's policy. If the relay in use dies, the stream
    /// moves to the next route on its own.
    pub async fn dial(&self, peer: PublicKey) -> Result<Stream, EndpointError> {
        let shared = &self.shared;
        let routes = Arc::new(shared.routes(&peer).await?);
        let mut id: ConnectionId = [0; stream::CONNECTION_ID_BYTES];
        getrandom::fill(&mut id).map_err(|error| {
            EndpointError::Io(std::io::Error::other(format!("no randomness: {error}")))
        })?;
        let (link, used) = shared.link_over(&peer, &routes, 0).await?;
        let current = Arc::new(Mutex::new(used));
        let redial: Redial = {
            let (weak, routes) = (Arc::downgrade(shared), Arc::clone(&routes));
            Arc::new(move || {
                let (weak, routes, current) = (weak.clone(), Arc::clone(&routes), current.clone());
                Box::pin(async move {
                    let shared = weak.upgrade()?;
                    let next = *lock(&current) + 1;
                    match shared.link_over(&peer, &routes, next).await {
                        Ok((link, used)) => {
                            *lock(&current) = used;
                            Some(link)
                        }
                        Err(error) => {
                            tracing::warn!(%peer, %error, "no new route to the peer");
                            None
                        }
                    }
                })
            })
        };
        shared
            .start_connection(id, peer, (link, None, None), Some(redial))
            .ok_or(EndpointError::TooManyConnections)
    }

    /// Every channel this endpoint pays through, with what is pending.
    pub async fn money(&self) -> Result<Vec<ChannelMoney>, EndpointError> {
        let wallet = self.shared.wallet.as_ref().ok_or(EndpointError::NoWallet)?;
        let paid = lock(&self.shared.paid).clone();
        Ok(wallet.money(|channel| paid.get(channel).copied()).await?)
    }

    /// The newest amount this endpoint paid on each channel.
    pub fn paid(&self) -> HashMap<ChannelId, Amount> {
        lock(&self.shared.paid).clone()
    }

    /// Ends every relay session, all at once. Streams whose both ends
    /// were sent first exchange their last acknowledgements (at most
    /// [`CLOSE_FINISH_TIMEOUT`]). Each paying session then pays for every
    /// byte its tunnels counted (see [`Session::close`]), and the relay
    /// ends the tunnels it paid for. Streams through listening sessions'
    /// relays carry on until they end.
    pub async fn close(&self) {
        self.shared.finishing.wait(CLOSE_FINISH_TIMEOUT).await;
        let sessions: Vec<_> = self.shared.sessions.lock().await.drain().collect();
        let mut closing = tokio::task::JoinSet::new();
        for (relay, session) in sessions {
            let shared = Arc::clone(&self.shared);
            closing.spawn(async move {
                if let Err(error) = session.close().await {
                    tracing::warn!(%relay, %error, "closing a relay session");
                }
                // What was paid includes the last voucher as soon as this
                // returns, not once the top-up task sees it.
                if let Some(channel) = session.channel() {
                    lock(&shared.paid).insert(channel, *session.paid().borrow());
                }
            });
        }
        // Each close is bounded by its own timeouts.
        while closing.join_next().await.is_some() {}
    }
}

impl Shared {
    /// The session on `relay`, opened (paying, when `pay`) if there is
    /// none. A listening session that must now pay is replaced by a paying
    /// one that keeps its listen policy.
    async fn session(
        self: &Arc<Self>,
        relay: &RelayAddress,
        pay: bool,
    ) -> Result<Arc<Session>, EndpointError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(session) = sessions.get(&relay.key)
            && (!pay || session.is_paying())
        {
            return Ok(Arc::clone(session));
        }
        let listening = sessions.contains_key(&relay.key);
        let opened = if pay {
            let wallet = self.wallet.as_ref().ok_or(EndpointError::NoWallet)?;
            let channel = wallet.channel_to(&relay.key).await?;
            let payer = Payer::new(channel.id, self.me.clone());
            let session = Session::open(relay, &self.me, Some(channel.id), Some(payer)).await?;
            let window_cost = session.terms.window_cost();
            let paid = session.paid();
            tokio::spawn(top_up(Arc::downgrade(self), wallet.clone(), channel, window_cost, paid));
            session
        } else {
            Session::open(relay, &self.me, None, None).await?
        };
        let session = Arc::new(opened);
        if listening {
            session.listen(self.config.listen.clone()).await?;
        }
        sessions.insert(relay.key, Arc::clone(&session));
        tokio::spawn(session_events(Arc::downgrade(self), Arc::clone(&session)));
        Ok(session)
    }

    /// The peer's routes, best first: its direct address, then its home
    /// relays that answer, ranked by this endpoint's policy.
    async fn routes(self: &Arc<Self>, peer: &PublicKey) -> Result<Vec<Route>, EndpointError> {
        let view = self.registry.get(&format!("/v1/clients/{peer}/home-relays")).await?;
        let home: SignedHomeRelays = serde_json::from_value(view["home"].clone())
            .map_err(|error| EndpointError::InvalidHome(error.to_string()))?;
        home.verify().map_err(|error| EndpointError::InvalidHome(error.to_string()))?;
        if home.home.client != *peer {
            return Err(EndpointError::InvalidHome("it names another client".into()));
        }
        let refused = lock(&self.refused).clone();
        let offers: Vec<Offer> = view["relays"]
            .as_array()
            .map(|views| views.iter().filter_map(|view| Offer::from_view(view).ok()).collect())
            .unwrap_or_default();
        // Only relays the peer signed, and not refused by this endpoint.
        let offers: Vec<Offer> = offers
            .into_iter()
            .filter(|offer| home.home.relays.contains(&offer.key()))
            .filter(|offer| !refused.contains(&offer.key()))
            .collect();
        // The peer chose its relays: rank them by cost, without this
        // endpoint's reputation or region floor.
        let policy =
            SelectionPolicy { min_reputation: 0.0, region: None, ..self.config.policy.clone() };
        let ranked = select::measure_and_rank(&self.me, &policy, offers.clone()).await;
        let mut routes: Vec<Route> =
            home.home.direct_address.into_iter().map(Route::Direct).collect();
        let ranked: Vec<RelayAddress> =
            ranked.into_iter().map(|ranked| ranked.offer.address()).collect();
        // Relays that did not answer the probe (a busy moment) or were not
        // ranked stay as last resorts, in the peer's order: failover may
        // need them.
        let rest = offers.iter().map(Offer::address).filter(|relay| !ranked.contains(relay));
        let relays: Vec<RelayAddress> = ranked.iter().cloned().chain(rest).collect();
        routes.extend(relays.into_iter().map(Route::Relay));
        Ok(routes)
    }

    /// A link to `peer` over the first route that works, trying `routes`
    /// from `start` round and round until [`FAILOVER_TIMEOUT`]; returns the
    /// link and the index of the route it used.
    async fn link_over(
        self: &Arc<Self>,
        peer: &PublicKey,
        routes: &[Route],
        start: usize,
    ) -> Result<(Link, usize), EndpointError> {
        let unreachable =
            |last: String| EndpointError::Unreachable { peer: *peer, routes: routes.len(), last };
        if routes.is_empty() {
            return Err(unreachable("it published no route that answers".into()));
        }
        let deadline = tokio::time::Instant::now() + FAILOVER_TIMEOUT;
        let mut last = String::new();
        // Bounded by the deadline: each attempt has its own timeouts.
        for attempt in 0.. {
            let index = (start + attempt) % routes.len();
            let route = &routes[index];
            match tokio::time::timeout_at(deadline, self.link_via(peer, route)).await {
                Ok(Ok(link)) => return Ok((link, index)),
                Ok(Err(error)) => {
                    tracing::info!(route = %route.name(), %error, "route to the peer failed");
                    last = format!("{}: {error}", route.name());
                }
                Err(_) => {
                    // Name the route that used up the time, not only the
                    // one that failed before it.
                    let earlier = if last.is_empty() { String::new() } else { format!("; {last}") };
                    return Err(unreachable(format!(
                        "{}: no link yet when it gave up after {FAILOVER_TIMEOUT:?}{earlier}",
                        route.name()
                    )));
                }
            }
            if (attempt + 1) % routes.len() == 0 {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(unreachable(last))
    }

    async fn link_via(
        self: &Arc<Self>,
        peer: &PublicKey,
        route: &Route,
    ) -> Result<Link, EndpointError> {
        let transport: Box<dyn Transport> = match route {
            Route::Direct(address) => {
                let connecting = TcpStream::connect(address.as_str());
                let stream = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| RelayError::Timeout)??;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Route::Relay(relay) => {
                let session = self.session(relay, true).await?;
                Box::new(session.dial(*peer).await?)
            }
        };
        let (reader, writer) = secure::initiate(transport, &self.me, peer).await?;
        Ok(Link::new(*peer, route.name(), reader, writer))
    }

    /// Registers connection `id` and starts it; none when the endpoint
    /// holds [`MAX_CONNECTIONS`] or already knows the id. The entry is
    /// registered before the task starts and removed only by its own task.
    fn start_connection(
        self: &Arc<Self>,
        id: ConnectionId,
        peer: PublicKey,
        first: Offered,
        redial: Option<Redial>,
    ) -> Option<Stream> {
        let (links, queued) = stream::link_queue();
        {
            let mut connections = lock(&self.connections);
            if connections.len() >= MAX_CONNECTIONS || connections.contains_key(&id) {
                return None;
            }
            connections.insert(id, Resumable { peer, links: links.clone() });
        }
        let (weak, own) = (Arc::downgrade(self), links.clone());
        let forget = move || {
            if let Some(shared) = weak.upgrade() {
                let mut connections = lock(&shared.connections);
                if connections.get(&id).is_some_and(|known| known.links.same_channel(&own)) {
                    connections.remove(&id);
                }
            }
        };
        let finishing = self.finishing.clone();
        Some(stream::start(id, peer, first, (links, queued), redial, finishing, forget))
    }

    /// An incoming link, from a relay tunnel or a direct connection:
    /// prove this endpoint's key, learn the caller's, read its hello, and
    /// hand the link to its connection (a new one for a new id).
    async fn incoming(self: Arc<Self>, transport: Box<dyn Transport>, route: String) {
        let Ok(permit) = self.pending_links.try_acquire() else {
            tracing::warn!(%route, "too many links being set up; dropping one");
            return;
        };
        let setup = async {
            let (peer, reader, writer) =
                secure::respond(transport, &self.me).await.map_err(|error| error.to_string())?;
            if let ListenPolicy::Allow(allowed) = &self.config.listen
                && !allowed.contains(&peer)
            {
                return Err(format!("{peer} is not allowed to connect"));
            }
            let mut link = Link::new(peer, route.clone(), reader, writer);
            match link.receive().await.map_err(|error| error.to_string())? {
                Record::Hello { connection, received } => Ok((link, connection, received)),
                other => Err(format!("expected a hello, got {other:?}")),
            }
        };
        let (link, id, received) =
            match tokio::time::timeout(secure::HANDSHAKE_TIMEOUT, setup).await {
                Ok(Ok(set_up)) => set_up,
                Ok(Err(error)) => return tracing::warn!(%route, %error, "incoming link refused"),
                Err(_) => return tracing::warn!(%route, "incoming link timed out"),
            };
        // Set up: the rest only hands the link over and must not wait.
        drop(permit);
        let peer = link.peer;
        let existing = {
            let connections = lock(&self.connections);
            connections.get(&id).map(|known| (known.peer, known.links.clone()))
        };
        match existing {
            Some((known, links)) if known == peer => {
                if links.try_send((link, Some(id), Some(received))).is_err() {
                    tracing::warn!(%peer, "the connection has links waiting; dropping one");
                }
            }
            Some(_) => tracing::warn!(%peer, "a link for another peer's connection"),
            None if received != 0 => {
                tracing::warn!(%peer, "a resumed link for an unknown connection")
            }
            None => match self.start_connection(id, peer, (link, Some(id), Some(received)), None) {
                Some(stream) => {
                    if self.accepted.try_send(stream).is_err() {
                        tracing::warn!(%peer, "the application is not accepting; dropping a stream");
                    }
                }
                None => tracing::warn!(%peer, "too many connections; refusing a new one"),
            },
        }
    }
}

/// Hears a session's events: accepts incoming tunnels, and forgets the
/// session when it ends (and its relay when it overcharged).
async fn session_events(shared: Weak<Shared>, session: Arc<Session>) {
    while let Some(event) = session.next_event().await {
        let Some(shared) = shared.upgrade() else { return };
        match event {
            Event::Incoming { tunnel, caller } => {
                let (relay, me) = (session.relay().clone(), shared.me.clone());
                tokio::spawn(async move {
                    match relay::accept(&relay, &me, tunnel).await {
                        Ok(stream) => {
                            let route = format!("relay {}", relay.key);
                            shared.incoming(Box::new(stream), route).await;
                        }
                        Err(error) => tracing::warn!(%caller, %error, "cannot accept a tunnel"),
                    }
                });
            }
            Event::Overcharged { claimed_bytes, counted_bytes } => {
                let relay = session.relay().key;
                tracing::error!(%relay, claimed_bytes, counted_bytes, "refusing an overcharging relay");
                lock(&shared.refused).insert(relay);
            }
            Event::Closed { reason, message } => {
                tracing::info!(relay = %session.relay().key, ?reason, %message, "relay session ended");
                break;
            }
            Event::Invoice { .. } | Event::VoucherResult { .. } | Event::TunnelClosed { .. } => {}
        }
    }
    if let Some(shared) = shared.upgrade() {
        let mut sessions = shared.sessions.lock().await;
        let key = session.relay().key;
        if sessions.get(&key).is_some_and(|current| Arc::ptr_eq(current, &session)) {
            sessions.remove(&key);
        }
    }
}

/// Tops the channel up whenever its vouchers near the escrow, and records
/// what was paid.
async fn top_up(
    shared: Weak<Shared>,
    wallet: Wallet,
    mut channel: crate::ChannelView,
    window_cost: Amount,
    mut paid: tokio::sync::watch::Receiver<Amount>,
) {
    loop {
        let amount = *paid.borrow_and_update();
        let Some(alive) = shared.upgrade() else { return };
        lock(&alive.paid).insert(channel.id, amount);
        drop(alive);
        match wallet.top_up_if_low(&channel, amount, window_cost).await {
            Ok(now) => channel = now,
            Err(error) => tracing::warn!(channel = %channel.id, %error, "top-up failed"),
        }
        if paid.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts direct connections until the endpoint is gone.
async fn accept_direct(shared: Weak<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            // Out of descriptors, say: let some close before trying again.
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let Some(shared) = shared.upgrade() else { return };
        let _ = stream.set_nodelay(true);
        tokio::spawn(shared.incoming(Box::new(stream), format!("direct {from}")));
    }
}
