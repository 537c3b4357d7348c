//! The client side of the relay protocol (docs/PROTOCOL.md, "Relay
//! protocol"): the handshake that proves both keys, a control session that
//! listens, hears of tunnels and pays, and tunnels that dial or accept.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{
    CloseReason, DialFailure, Frame, ListenPolicy, VoucherVerdict, WIRE_VERSION, transcript,
};
use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, SecretKey, SignedVoucher, Voucher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

/// How long connecting and the handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dial waits for the relay to pair it (the relay's own pairing
/// time is shorter; this bounds a relay that never answers).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Session events waiting for the application. While it is full the session
/// stops reading from the relay, except that invoices are still paid and
/// their events (and voucher results) dropped.
pub const SESSION_EVENTS: usize = 256;
/// Frames waiting to be written to the relay.
const SESSION_OUTBOX: usize = 64;
/// How long [`Session::listen`] waits for the relay to confirm that the
/// policy applies.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Session::close`] waits for the relay's verdict on the last
/// voucher before it closes anyway.
pub const CLOSE_PAYMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Vouchers whose verdict has not come yet that a session remembers; the
/// relay answers each in turn, so only a relay that stopped answering
/// makes more, and the oldest are then forgotten.
const VOUCHERS_AWAITING_VERDICT: usize = 64;

/// Why talking to a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The connection failed.
    #[error("relay connection: {0}")]
    Io(#[from] std::io::Error),
    /// The relay sent something the protocol does not allow here.
    #[error("the relay broke the protocol: {0}")]
    Protocol(String),
    /// The relay did not prove the advertised key.
    #[error("the relay at this address is not the advertised one")]
    Impostor,
    /// The relay ended the connection.
    #[error("the relay closed the connection ({reason:?}): {message}")]
    Closed {
        /// Why.
        reason: CloseReason,
        /// The relay's explanation.
        message: String,
    },
    /// The relay could not make the tunnel.
    #[error("no tunnel: {0:?}")]
    DialFailed(DialFailure),
    /// The relay did not answer in time.
    #[error("the relay did not answer in time")]
    Timeout,
    /// The relay refused this session's last voucher.
    #[error("the relay refused the last voucher: {0:?}")]
    VoucherRefused(VoucherVerdict),
}

/// Where a relay is and which key it must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddress {
    /// `host:port`.
    pub address: String,
    /// The relay's advertised key.
    pub key: PublicKey,
}

fn unexpected(frame: Frame) -> RelayError {
    match frame {
        Frame::Close { reason, message } => RelayError::Closed { reason, message },
        Frame::DialFailed { reason } => RelayError::DialFailed(reason),
        other => RelayError::Protocol(format!("unexpected {}", other.name())),
    }
}

async fn read(stream: &mut TcpStream) -> Result<Frame, RelayError> {
    read_frame(stream).await.map_err(|error| RelayError::Protocol(error.to_string()))
}

/// Connects and runs the relay's half of the handshake: the relay must
/// prove `relay.key`. Returns the stream, the version and both nonces.
async fn hello(
    relay: &RelayAddress,
    me: &SecretKey,
) -> Result<(TcpStream, u16, [u8; 32], [u8; 32]), RelayError> {
    let mut stream = TcpStream::connect(&relay.address).await?;
    stream.set_nodelay(true)?;
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce)
        .map_err(|error| RelayError::Protocol(format!("no randomness: {error}")))?;
    let client = me.public();
    write_frame(&mut stream, &Frame::ClientHello { version: WIRE_VERSION, client, nonce }).await?;
    match read(&mut stream).await? {
        Frame::RelayHello { version, relay: key, nonce: relay_nonce, signature } => {
            let signed = transcript(b'R', version, &client, &nonce, &key, &relay_nonce);
            if key != relay.key || key.verify(&signed, &signature).is_err() {
                return Err(RelayError::Impostor);
            }
            Ok((stream, version, nonce, relay_nonce))
        }
        other => Err(unexpected(other)),
    }
}

/// Connects, runs the handshake as `me`, and sends `first`.
async fn connect(
    relay: &RelayAddress,
    me: &SecretKey,
    first: Frame,
) -> Result<TcpStream, RelayError> {
    let handshake = async {
        let (mut stream, version, nonce, relay_nonce) = hello(relay, me).await?;
        let signed = transcript(b'C', version, &me.public(), &nonce, &relay.key, &relay_nonce);
        write_frame(&mut stream, &Frame::ClientAuth { signature: me.sign(&signed) }).await?;
        write_frame(&mut stream, &first).await?;
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| RelayError::Timeout)?
}

/// Measures the round trip to a relay: the time to connect and for the
/// relay to prove its key (two round trips), within `limit`. The
/// connection is then dropped.
pub async fn probe(
    relay: &RelayAddress,
    me: &SecretKey,
    limit: Duration,
) -> Result<Duration, RelayError> {
    let started = std::time::Instant::now();
    tokio::time::timeout(limit, hello(relay, me)).await.map_err(|_| RelayError::Timeout)??;
    Ok(started.elapsed())
}

/// Opens a tunnel to `peer` through `relay`: once the peer accepts, the
/// stream carries raw bytes to and from it. The caller pays for both ways.
pub async fn dial(
    relay: &RelayAddress,
    me: &SecretKey,
    peer: PublicKey,
) -> Result<TcpStream, RelayError> {
    let stream = connect(relay, me, Frame::Dial { peer }).await?;
    connected(stream, DIAL_TIMEOUT).await
}

/// Waits (at most `limit`) for the relay to pair the tunnel.
async fn connected(mut stream: TcpStream, limit: Duration) -> Result<TcpStream, RelayError> {
    match tokio::time::timeout(limit, read(&mut stream)).await {
        Ok(Ok(Frame::Connected { .. })) => Ok(stream),
        Ok(Ok(other)) => Err(unexpected(other)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(RelayError::Timeout),
    }
}

/// Accepts `tunnel` (announced by an [`Event::Incoming`]): the stream
/// carries raw bytes to and from the caller.
pub async fn accept(
    relay: &RelayAddress,
    me: &SecretKey,
    tunnel: u64,
) -> Result<TcpStream, RelayError> {
    let stream = connect(relay, me, Frame::Accept { tunnel }).await?;
    connected(stream, CONNECT_TIMEOUT).await
}

/// The terms a session opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTerms {
    /// The price of a byte in this session.
    pub price_per_byte: PricePerByte,
    /// Bytes the relay carries ahead of payment.
    pub credit_window_bytes: u64,
    /// The channel's amount the relay already holds a voucher for.
    pub paid: Amount,
    /// That voucher's sequence.
    pub sequence: u64,
}

impl SessionTerms {
    /// What a full credit window costs: the escrow above the newest voucher
    /// below which the relay shrinks the window to what the escrow can pay.
    pub fn window_cost(&self) -> Amount {
        ferry_proto::cost(self.credit_window_bytes, self.price_per_byte).unwrap_or(Amount::MAX)
    }
}

/// Something the relay told the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer wants a tunnel: [`accept`] it or [`Session::reject`] it.
    Incoming {
        /// The tunnel.
        tunnel: u64,
        /// The caller.
        caller: PublicKey,
    },
    /// The relay billed the channel (and, with a payer, was paid).
    Invoice {
        /// Bytes carried in this session.
        carried_bytes: u64,
        /// The cumulative amount due.
        due: Amount,
        /// The voucher the payer answered with, if it paid: none when this
        /// client has not yet counted the bytes billed.
        voucher: Option<Voucher>,
    },
    /// What the relay did with a voucher.
    VoucherResult {
        /// The voucher's sequence.
        sequence: u64,
        /// The verdict.
        verdict: VoucherVerdict,
    },
    /// The relay billed more bytes than this client's tunnels carried plus
    /// the credit window, which an honest relay cannot do. The session was
    /// closed and nothing was paid for the claim.
    Overcharged {
        /// The bytes the relay claimed to have carried.
        claimed_bytes: u64,
        /// The bytes this client's tunnels counted.
        counted_bytes: u64,
    },
    /// A tunnel of this client ended early.
    TunnelClosed {
        /// The tunnel.
        tunnel: u64,
        /// Why.
        reason: CloseReason,
    },
    /// The session ended.
    Closed {
        /// Why.
        reason: CloseReason,
        /// The relay's explanation.
        message: String,
    },
}

/// Pays invoices automatically with vouchers from `key` on `channel`, for
/// at most the bytes this client's own tunnels counted plus what it pays
/// ahead, at most `max_prepay_bytes`.
#[derive(Debug, Clone)]
pub struct Payer {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's client key.
    pub key: SecretKey,
    /// The most this client pays ahead of its count: what a relay that
    /// takes the payment and stops carrying can cost it (docs/CLIENT.md,
    /// "Paying as it counts").
    pub max_prepay_bytes: u64,
}

/// The prepayment bound a [`Payer`] gets from [`Payer::new`]: at the
/// default price, 1 per GiB, 0.0625 of the currency.
pub const DEFAULT_MAX_PREPAY_BYTES: u64 = 64 << 20;

impl Payer {
    /// A payer on `channel` with `key`, paying ahead at most
    /// [`DEFAULT_MAX_PREPAY_BYTES`].
    pub fn new(channel: ChannelId, key: SecretKey) -> Payer {
        Payer { channel, key, max_prepay_bytes: DEFAULT_MAX_PREPAY_BYTES }
    }
}

/// Bytes carried by a session's tunnels, both ways, as this client counts
/// them, and a wake-up for the task that pays as they grow.
#[derive(Debug, Default)]
struct Tally {
    bytes: AtomicU64,
    grown: tokio::sync::Notify,
}

impl Tally {
    fn count(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        if bytes > 0 {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.grown.notify_one();
        }
    }
}

/// The write half of a session's connection, shared by its writer task,
/// its reader (which answers invoices without queueing) and [`Session`].
type SessionWriter = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// A control session with a relay.
#[derive(Debug)]
pub struct Session {
    /// The terms the relay opened the session on.
    pub terms: SessionTerms,
    relay: RelayAddress,
    me: SecretKey,
    billing: Arc<Billing>,
    writer: SessionWriter,
    outbox: mpsc::Sender<Frame>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    /// Listen frames sent; held while one waits for its confirmation.
    listens: tokio::sync::Mutex<u64>,
    /// Listen frames the relay confirmed (they are applied in order).
    listened: watch::Receiver<u64>,
    /// The relay's verdicts on this session's vouchers.
    verdicts: watch::Receiver<Verdicts>,
}

impl Session {
    /// Opens a control session as `me`, paying through `channel` (none: the
    /// session may listen but not dial). With a `payer`, every invoice is
    /// answered with a voucher for the amount due, up to what this
    /// session's tunnels counted (see [`Session::dial`]).
    pub async fn open(
        relay: &RelayAddress,
        me: &SecretKey,
        channel: Option<ChannelId>,
        payer: Option<Payer>,
    ) -> Result<Session, RelayError> {
        let mut stream = connect(relay, me, Frame::OpenSession { channel }).await?;
        let terms = match tokio::time::timeout(CONNECT_TIMEOUT, read(&mut stream)).await {
            Ok(Ok(Frame::SessionReady { price_per_byte, credit_window_bytes, paid, sequence })) => {
                SessionTerms { price_per_byte, credit_window_bytes, paid, sequence }
            }
            Ok(Ok(other)) => return Err(unexpected(other)),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(RelayError::Timeout),
        };
        let (reader, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let (outbox, mut outbox_rx) = mpsc::channel::<Frame>(SESSION_OUTBOX);
        let (events_tx, events) = mpsc::channel(SESSION_EVENTS);
        let writing = Arc::clone(&writer);
        tokio::spawn(async move {
            while let Some(frame) = outbox_rx.recv().await {
                let last = matches!(frame, Frame::Close { .. });
                if write_frame(&mut *writing.lock().await, &frame).await.is_err() || last {
                    return;
                }
            }
        });
        let billing = Arc::new(Billing::new(payer, terms));
        let (listened_tx, listened) = watch::channel(0);
        let opened = Verdicts { accepted: terms.sequence, refused: None };
        let (verdicts_tx, verdicts) = watch::channel(opened);
        let reading = Reading {
            writer: Arc::clone(&writer),
            outbox: outbox.clone(),
            events: events_tx,
            billing: Arc::clone(&billing),
            listened: listened_tx,
            verdicts: verdicts_tx,
        };
        tokio::spawn(read_loop(reader, reading));
        if billing.payer.is_some() && terms.price_per_byte.attos() > 0 {
            tokio::spawn(pay_as_counted(Arc::clone(&billing), Arc::clone(&writer)));
        }
        Ok(Session {
            terms,
            relay: relay.clone(),
            me: me.clone(),
            billing,
            writer,
            outbox,
            events: tokio::sync::Mutex::new(events),
            listens: tokio::sync::Mutex::new(0),
            listened,
            verdicts,
        })
    }

    /// The relay this session is with.
    pub fn relay(&self) -> &RelayAddress {
        &self.relay
    }

    /// Whether this session pays its invoices itself.
    pub fn is_paying(&self) -> bool {
        self.billing.payer.is_some()
    }

    /// The channel this session pays through, if it pays.
    pub fn channel(&self) -> Option<ChannelId> {
        self.billing.payer.as_ref().map(|payer| payer.channel)
    }

    /// The cumulative amount of the newest voucher this session paid with
    /// (the opening terms' until it pays; back to the newest accepted one
    /// when the relay refuses a voucher).
    pub fn paid(&self) -> watch::Receiver<Amount> {
        self.billing.paid.subscribe()
    }

    /// Opens a tunnel to `peer`, paid by this session: the stream counts
    /// the bytes it carries both ways, and the session's payer pays for no
    /// more than that count.
    pub async fn dial(&self, peer: PublicKey) -> Result<Tunnel, RelayError> {
        let stream = dial(&self.relay, &self.me, peer).await?;
        Ok(Tunnel { stream, tally: Arc::clone(&self.billing.tally) })
    }

    async fn send(&self, frame: Frame) -> Result<(), RelayError> {
        self.outbox.send(frame).await.map_err(|_| RelayError::Protocol("the session ended".into()))
    }

    /// Sets who may reach this client through the relay, and returns once
    /// the relay confirmed that the policy applies (within
    /// [`LISTEN_TIMEOUT`]): a peer dialling after that is let through.
    pub async fn listen(&self, policy: ListenPolicy) -> Result<(), RelayError> {
        // Held until confirmed: the relay confirms Listen frames in order,
        // so the n-th confirmation is the n-th frame's.
        let mut sent = self.listens.lock().await;
        self.send(Frame::Listen { policy }).await?;
        *sent += 1;
        let target = *sent;
        let mut listened = self.listened.clone();
        match tokio::time::timeout(LISTEN_TIMEOUT, listened.wait_for(|done| *done >= target)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(RelayError::Protocol("the session ended before listening".into())),
            Err(_) => Err(RelayError::Timeout),
        }
    }

    /// Refuses an incoming tunnel.
    pub async fn reject(&self, tunnel: u64) -> Result<(), RelayError> {
        self.send(Frame::Reject { tunnel }).await
    }

    /// Sends a voucher (a payer sends them itself).
    pub async fn pay(&self, voucher: SignedVoucher) -> Result<(), RelayError> {
        self.send(Frame::Voucher(voucher)).await
    }

    /// Ends the session. A paying session first pays for exactly the bytes
    /// its tunnels counted and waits (at most [`CLOSE_PAYMENT_TIMEOUT`])
    /// for the relay's verdict: invoices only come while the session lasts,
    /// so without this the bytes since the last one would go unpaid, and
    /// what it paid ahead and was not carried is handed back by a voucher
    /// for less. It closes even when that fails, and then returns why.
    pub async fn close(&self) -> Result<(), RelayError> {
        let paid = self.pay_counted().await;
        let closed =
            self.send(Frame::Close { reason: CloseReason::Normal, message: String::new() }).await;
        paid.and(closed)
    }

    /// Pays exactly for everything counted (handing back what was paid
    /// ahead and not carried) and waits for the verdict on the newest
    /// voucher (this one, or one still on its way).
    async fn pay_counted(&self) -> Result<(), RelayError> {
        if self.billing.payer.is_none() {
            return Ok(());
        }
        let mut verdicts = self.verdicts.clone();
        self.billing.pay(&self.writer, Claim::Close).await?;
        let sequence = self.billing.newest_sequence();
        let heard = verdicts.wait_for(|verdicts| verdicts.on(sequence).is_some());
        let verdict = match tokio::time::timeout(CLOSE_PAYMENT_TIMEOUT, heard).await {
            Ok(Ok(verdicts)) => verdicts.on(sequence),
            Ok(Err(_)) => {
                return Err(RelayError::Protocol(
                    "the session ended before the relay answered the last voucher".into(),
                ));
            }
            Err(_) => return Err(RelayError::Timeout),
        };
        match verdict {
            Some(VoucherVerdict::Accepted) | None => Ok(()),
            Some(refused) => Err(RelayError::VoucherRefused(refused)),
        }
    }

    /// The next event; none once the session ended and every event was
    /// read. One reader at a time: concurrent callers take turns.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }
}

/// What a session pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// An invoice: the relay's count and the cumulative amount due.
    Invoice {
        /// Bytes the relay says it carried in this session.
        carried_bytes: u64,
        /// The cumulative amount it asks for.
        due: Amount,
    },
    /// Everything this client counted and `ahead_bytes` more, unasked,
    /// if that is more than paid: paying as it counts (and ahead, to keep
    /// the relay's window open over the payment's round trip).
    Counted {
        /// Bytes paid for before they are counted.
        ahead_bytes: u64,
    },
    /// Exactly what this client counted, more or less than paid: the
    /// session is closing, no invoice will come for the last bytes, and
    /// what was paid ahead and not carried is handed back.
    Close,
}

/// The vouchers a paying session sent and what the relay did with them.
#[derive(Debug)]
struct Vouchers {
    /// The newest voucher sent: nothing up to it is paid again.
    sent: Amount,
    /// The newest voucher's sequence; the next one is above it.
    sequence: u64,
    /// The newest voucher the relay accepted.
    accepted: Amount,
    /// Vouchers sent whose verdict has not come, oldest first, and when
    /// they were sent.
    awaiting: VecDeque<(u64, Amount, Instant)>,
    /// The payment's smoothed round trip, voucher to acceptance.
    round_trip: Option<Duration>,
    /// The relay refused a voucher as beyond the escrow: this session pays
    /// nothing ahead any more.
    no_prepay: bool,
}

/// The relay's verdicts on a session's vouchers, for [`Session::close`].
#[derive(Debug, Clone, Copy)]
struct Verdicts {
    /// The highest sequence accepted (accepted results come in order).
    accepted: u64,
    /// The newest refusal.
    refused: Option<(u64, VoucherVerdict)>,
}

impl Verdicts {
    /// The verdict on the voucher with `sequence`, once known: accepted
    /// when it or a later voucher was (a later one pays more).
    fn on(&self, sequence: u64) -> Option<VoucherVerdict> {
        if self.accepted >= sequence {
            return Some(VoucherVerdict::Accepted);
        }
        self.refused.filter(|(refused, _)| *refused == sequence).map(|(_, verdict)| verdict)
    }
}

/// What a session needs to check and pay invoices: the one place that
/// decides the next voucher, shared by the session's reader (invoices)
/// and [`Session::close`] (the bytes since the last invoice).
#[derive(Debug)]
struct Billing {
    payer: Option<Payer>,
    terms: SessionTerms,
    tally: Arc<Tally>,
    vouchers: Mutex<Vouchers>,
    /// Where the newest paid amount is published.
    paid: watch::Sender<Amount>,
    /// Set once the session's reader ended: the payer stops.
    ended: watch::Sender<bool>,
}

/// What to do with a claim.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Pay this cumulative amount.
    Pay(Amount),
    /// Nothing more to pay yet: the bytes billed beyond the last voucher
    /// are not (yet) counted here.
    Wait,
    /// The claim exceeds what an honest relay could have carried, given
    /// the bytes this client counted.
    Refuse {
        /// The count the claim was checked against.
        counted_bytes: u64,
    },
}

impl Billing {
    fn new(payer: Option<Payer>, terms: SessionTerms) -> Billing {
        let vouchers = Vouchers {
            sent: terms.paid,
            sequence: terms.sequence,
            accepted: terms.paid,
            awaiting: VecDeque::new(),
            round_trip: None,
            no_prepay: false,
        };
        Billing {
            payer,
            terms,
            tally: Arc::new(Tally::default()),
            vouchers: Mutex::new(vouchers),
            paid: watch::channel(terms.paid).0,
            ended: watch::channel(false).0,
        }
    }

    fn vouchers(&self) -> std::sync::MutexGuard<'_, Vouchers> {
        // Every update is a few assignments with no panic between.
        self.vouchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks a claim against this client's count, with `paid` the newest
    /// voucher's amount. The relay carries at most `paid bytes + credit
    /// window`, and this client pays for no more than it counted and what
    /// it paid ahead, so an honest invoice never claims more than the
    /// larger of the count and the paid bytes, plus the credit window.
    /// Within that, the client pays the due amount but never more than its
    /// own count is worth; unasked, it pays its count's worth and what it
    /// pays ahead.
    fn answer(&self, claim: Claim, paid: Amount) -> Answer {
        let counted = self.tally.count();
        let terms = &self.terms;
        let paid_bytes = match terms.price_per_byte.attos() {
            0 => 0,
            price => {
                let paid_attos = paid.attos().saturating_sub(terms.paid.attos());
                u64::try_from(paid_attos / price).unwrap_or(u64::MAX)
            }
        };
        let honest_limit = counted.max(paid_bytes).saturating_add(terms.credit_window_bytes);
        let (billable, due) = match claim {
            Claim::Invoice { carried_bytes, .. } if carried_bytes > honest_limit => {
                return Answer::Refuse { counted_bytes: counted };
            }
            Claim::Invoice { carried_bytes, due } => (counted.min(carried_bytes), Some(due)),
            Claim::Counted { ahead_bytes } => (counted.saturating_add(ahead_bytes), None),
            Claim::Close => (counted, None),
        };
        let owed = ferry_proto::cost(billable, terms.price_per_byte)
            .and_then(|cost| terms.paid.checked_add(cost));
        let Ok(owed) = owed else { return Answer::Refuse { counted_bytes: counted } };
        let amount = due.map_or(owed, |due| due.min(owed));
        let pays = amount > paid || (claim == Claim::Close && amount < paid);
        if pays { Answer::Pay(amount) } else { Answer::Wait }
    }

    /// Answers `claim`: writes the next voucher if one is owed and returns
    /// it. The writer is locked before deciding, so vouchers leave in the
    /// order of their sequences. Without a payer nothing is paid.
    async fn pay(
        &self,
        writer: &tokio::sync::Mutex<OwnedWriteHalf>,
        claim: Claim,
    ) -> Result<Option<Voucher>, Refused> {
        let Some(payer) = &self.payer else { return Ok(None) };
        let mut writer = writer.lock().await;
        let (voucher, frame) = {
            let mut vouchers = self.vouchers();
            let amount = match self.answer(claim, vouchers.sent) {
                Answer::Pay(amount) => amount,
                Answer::Wait => return Ok(None),
                Answer::Refuse { counted_bytes } => {
                    return Err(Refused::Overcharged(counted_bytes));
                }
            };
            let sequence = vouchers.sequence + 1;
            vouchers.sequence = sequence;
            vouchers.sent = amount;
            if vouchers.awaiting.len() >= VOUCHERS_AWAITING_VERDICT {
                vouchers.awaiting.pop_front();
            }
            vouchers.awaiting.push_back((sequence, amount, Instant::now()));
            let voucher = Voucher { channel: payer.channel, sequence, cumulative: amount };
            (voucher, Frame::Voucher(voucher.sign(&payer.key)))
        };
        self.paid.send_replace(voucher.cumulative);
        write_frame(&mut *writer, &frame).await.map_err(Refused::Io)?;
        Ok(Some(voucher))
    }

    /// The newest voucher's sequence.
    fn newest_sequence(&self) -> u64 {
        self.vouchers().sequence
    }

    /// Takes the relay's verdict on voucher `sequence`. A refused voucher
    /// pays nothing: the amount paid goes back to the newest accepted one,
    /// so that the relay's next invoice (it repeats them every second while
    /// unpaid) is answered again, by which time a top-up may have landed.
    fn heard(&self, sequence: u64, verdict: VoucherVerdict) {
        let published = {
            let mut vouchers = self.vouchers();
            while vouchers.awaiting.front().is_some_and(|(awaiting, ..)| *awaiting < sequence) {
                vouchers.awaiting.pop_front();
            }
            let sent = match vouchers.awaiting.front() {
                Some(&(awaiting, amount, sent_at)) if awaiting == sequence => {
                    vouchers.awaiting.pop_front();
                    Some((amount, sent_at))
                }
                _ => None,
            };
            if verdict == VoucherVerdict::OverEscrow {
                vouchers.no_prepay = true;
            }
            match (verdict, sent) {
                (VoucherVerdict::Accepted, Some((amount, sent_at))) => {
                    // Verdicts come in order: the newest accepted counts,
                    // lower (prepayment handed back) or higher.
                    vouchers.accepted = amount;
                    let sample = sent_at.elapsed();
                    vouchers.round_trip = Some(match vouchers.round_trip {
                        Some(smoothed) => (smoothed * 7 + sample) / 8,
                        None => sample,
                    });
                    None
                }
                (VoucherVerdict::Accepted, None) => None,
                (_, _) => {
                    vouchers.sent = vouchers.accepted;
                    Some(vouchers.accepted)
                }
            }
        };
        if let Some(paid) = published {
            self.paid.send_replace(paid);
        }
    }
}

/// The fewest counted bytes between two vouchers sent unasked.
const MIN_PAY_EVERY_BYTES: u64 = 16 << 10;
/// At a steady rate the payer sends about one voucher per this interval
/// once it pays ahead; it is also the shortest interval a rate is measured
/// over.
const PAY_INTERVAL: Duration = Duration::from_millis(10);

/// The payer's view of the session's rate, to size what it pays ahead.
#[derive(Debug, Default)]
struct Pace {
    /// The count and time the current measurement started at.
    mark: Option<(u64, Instant)>,
    /// The fastest recent rate: it rises at once and halves per quiet
    /// interval, as a congestion window does.
    bytes_per_sec: u64,
}

impl Pace {
    /// Takes the count `counted` at `now`.
    fn observe(&mut self, counted: u64, now: Instant) {
        let Some((from, since)) = self.mark else {
            self.mark = Some((counted, now));
            return;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < PAY_INTERVAL {
            return;
        }
        let bytes = u128::from(counted.saturating_sub(from));
        let sample =
            u64::try_from(bytes * 1_000_000_000 / elapsed.as_nanos().max(1)).unwrap_or(u64::MAX);
        self.bytes_per_sec = sample.max(self.bytes_per_sec / 2);
        self.mark = Some((counted, now));
    }

    /// What to pay ahead: twice the rate over the payment's round trip (at
    /// least [`PAY_INTERVAL`]), so that vouchers paying half of it each
    /// keep the relay's window open while they travel, at most about one
    /// per interval, and never more than `max_bytes`. Nothing before a
    /// round trip was measured.
    fn prepay_bytes(&self, round_trip: Option<Duration>, max_bytes: u64) -> u64 {
        let Some(round_trip) = round_trip else { return 0 };
        let over = round_trip.max(PAY_INTERVAL).as_nanos();
        let bytes = u128::from(self.bytes_per_sec) * over * 2 / 1_000_000_000;
        u64::try_from(bytes).unwrap_or(u64::MAX).min(max_bytes)
    }
}

/// Pays for this session's counted bytes as they grow, without waiting for
/// the relay's invoice: the voucher for a byte leaves when the byte is
/// counted here, so it reaches the relay about when the byte does. At
/// speed it also pays ahead ([`Pace::prepay_bytes`], at most the payer's
/// bound), so that the relay's window never waits a payment round trip and
/// vouchers stay few: one per half the prepayment, or per half window when
/// nothing is paid ahead. Ends with the session's reader (the relay ended
/// the session, or this client closed it or refused the relay).
async fn pay_as_counted(billing: Arc<Billing>, writer: SessionWriter) {
    let window = billing.terms.credit_window_bytes;
    let max_prepay = billing.payer.as_ref().map_or(0, |payer| payer.max_prepay_bytes);
    let mut ended = billing.ended.subscribe();
    let mut pace = Pace::default();
    // Counted bytes plus prepayment that the newest voucher paid for; the
    // tally starts at zero with the session.
    let mut paid_through = 0u64;
    loop {
        tokio::select! {
            () = billing.tally.grown.notified() => {}
            _ = ended.wait_for(|ended| *ended) => return,
        }
        let counted = billing.tally.count();
        pace.observe(counted, Instant::now());
        let (round_trip, no_prepay) = {
            let vouchers = billing.vouchers();
            (vouchers.round_trip, vouchers.no_prepay)
        };
        let ahead = if no_prepay { 0 } else { pace.prepay_bytes(round_trip, max_prepay) };
        // A relay stating a tiny window cannot make this client sign a
        // voucher per read; its invoices still ask for the rest.
        let step = (window / 2).max(ahead / 2).max(MIN_PAY_EVERY_BYTES);
        if counted.saturating_add(ahead) < paid_through.saturating_add(step) {
            continue;
        }
        paid_through = counted.saturating_add(ahead);
        if billing.pay(&writer, Claim::Counted { ahead_bytes: ahead }).await.is_err() {
            return;
        }
    }
}

/// Why an invoice was not paid.
#[derive(Debug)]
enum Refused {
    /// It claims more than an honest relay could have carried; the
    /// count it was checked against.
    Overcharged(u64),
    /// Writing the voucher failed.
    Io(std::io::Error),
}

impl From<Refused> for RelayError {
    fn from(refused: Refused) -> RelayError {
        match refused {
            Refused::Overcharged(counted) => RelayError::Protocol(format!(
                "the relay claims more than the {counted} bytes counted here"
            )),
            Refused::Io(error) => RelayError::Io(error),
        }
    }
}

/// What a session's reader needs besides the connection.
struct Reading {
    writer: SessionWriter,
    outbox: mpsc::Sender<Frame>,
    events: mpsc::Sender<Event>,
    billing: Arc<Billing>,
    /// Counts the relay's Listening confirmations.
    listened: watch::Sender<u64>,
    /// The relay's verdicts on vouchers.
    verdicts: watch::Sender<Verdicts>,
}

/// Reads the relay's frames until the session ends, then tells the
/// session's payer to stop.
async fn read_loop(reader: OwnedReadHalf, reading: Reading) {
    let billing = Arc::clone(&reading.billing);
    read_frames(reader, reading).await;
    billing.ended.send_replace(true);
}

async fn read_frames(mut reader: OwnedReadHalf, reading: Reading) {
    let Reading { writer, outbox, events, billing, listened, verdicts } = reading;
    loop {
        let event = match read_frame(&mut reader).await {
            Err(error) => {
                Event::Closed { reason: CloseReason::Protocol, message: error.to_string() }
            }
            Ok(Frame::Ping(value)) => {
                let _ = outbox.send(Frame::Pong(value)).await;
                continue;
            }
            Ok(Frame::Pong(_)) => continue,
            Ok(Frame::Listening) => {
                listened.send_modify(|count| *count += 1);
                continue;
            }
            Ok(Frame::Incoming { tunnel, caller }) => Event::Incoming { tunnel, caller },
            Ok(Frame::Invoice { channel, carried_bytes, due }) => {
                let ours = billing.payer.as_ref().is_some_and(|payer| payer.channel == channel);
                let claim = Claim::Invoice { carried_bytes, due };
                // Written at once rather than queued: the relay's tunnels
                // may be waiting for it.
                let answered = if ours { billing.pay(&writer, claim).await } else { Ok(None) };
                match answered {
                    Err(Refused::Overcharged(counted_bytes)) => {
                        tracing::warn!(carried_bytes, counted_bytes, "the relay overcharged");
                        let close = Frame::Close {
                            reason: CloseReason::Protocol,
                            message: "the invoice claims more than was carried".into(),
                        };
                        let _ = write_frame(&mut *writer.lock().await, &close).await;
                        let _ = events
                            .send(Event::Overcharged {
                                claimed_bytes: carried_bytes,
                                counted_bytes,
                            })
                            .await;
                        let _ = events
                            .send(Event::Closed {
                                reason: CloseReason::Protocol,
                                message: "this client refused an overcharging relay".into(),
                            })
                            .await;
                        return;
                    }
                    // The reader sees the connection's end next.
                    Err(Refused::Io(_)) => Event::Invoice { carried_bytes, due, voucher: None },
                    Ok(voucher) => Event::Invoice { carried_bytes, due, voucher },
                }
            }
            Ok(Frame::VoucherResult { sequence, verdict }) => {
                billing.heard(sequence, verdict);
                verdicts.send_modify(|verdicts| match verdict {
                    VoucherVerdict::Accepted => {
                        verdicts.accepted = verdicts.accepted.max(sequence);
                    }
                    refused => verdicts.refused = Some((sequence, refused)),
                });
                Event::VoucherResult { sequence, verdict }
            }
            Ok(Frame::TunnelClosed { tunnel, reason }) => Event::TunnelClosed { tunnel, reason },
            Ok(Frame::Close { reason, message }) => Event::Closed { reason, message },
            Ok(other) => Event::Closed {
                reason: CloseReason::Protocol,
                message: format!("unexpected {} from the relay", other.name()),
            },
        };
        // Payment must never wait for the application: billing events are
        // dropped when the application does not keep up with them.
        if matches!(event, Event::Invoice { .. } | Event::VoucherResult { .. }) {
            if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(event) {
                return;
            }
            continue;
        }
        let last = matches!(event, Event::Closed { .. });
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// A tunnel dialled through a paying session: raw bytes to and from the
/// peer, counted for checking the relay's invoices.
#[derive(Debug)]
pub struct Tunnel {
    stream: TcpStream,
    tally: Arc<Tally>,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.tally.add((buf.filled().len() - before) as u64);
        polled
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.tally.add(written as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn billing(counted: u64) -> Billing {
        let terms = SessionTerms {
            price_per_byte: PricePerByte::from_attos(10).unwrap(),
            credit_window_bytes: 1000,
            paid: Amount::from_attos(5_000).unwrap(),
            sequence: 3,
        };
        let billing = Billing::new(None, terms);
        billing.tally.bytes.store(counted, Ordering::Relaxed);
        billing
    }

    fn attos(value: u128) -> Amount {
        Amount::from_attos(value).unwrap()
    }

    fn invoice(carried_bytes: u64, due: u128) -> Claim {
        Claim::Invoice { carried_bytes, due: attos(due) }
    }

    #[test]
    fn an_honest_invoice_is_paid_but_never_beyond_the_clients_count() {
        let base = 5_000;
        // Counted as much as billed: pay the due amount.
        assert_eq!(
            billing(400).answer(invoice(400, base + 4_000), attos(base)),
            Answer::Pay(attos(base + 4_000))
        );
        // Bytes still on their way here: pay for what was counted.
        assert_eq!(
            billing(300).answer(invoice(400, base + 4_000), attos(base)),
            Answer::Pay(attos(base + 3_000))
        );
        // Already paid for everything counted: wait for the count to grow.
        assert_eq!(
            billing(300).answer(invoice(400, base + 4_000), attos(base + 3_000)),
            Answer::Wait
        );
        // A due below the count's worth is paid as billed.
        assert_eq!(
            billing(900).answer(invoice(400, base + 4_000), attos(base)),
            Answer::Pay(attos(base + 4_000))
        );
    }

    #[test]
    fn a_payer_pays_ahead_as_asked_and_honest_invoices_may_claim_what_it_paid_ahead() {
        let billing = billing(300);
        let base = 5_000;
        let ahead = Claim::Counted { ahead_bytes: 200 };
        assert_eq!(billing.answer(ahead, attos(base)), Answer::Pay(attos(base + 5_000)));
        // With 500 bytes paid, the relay may have carried them and the window.
        let paid = attos(base + 5_000);
        let claim = invoice(1_500, base + 15_000);
        assert_eq!(billing.answer(claim, paid), Answer::Wait, "the count is paid already");
        let claim = invoice(1_501, base + 15_010);
        assert_eq!(billing.answer(claim, paid), Answer::Refuse { counted_bytes: 300 });
    }

    #[test]
    fn the_prepayment_follows_rate_times_round_trip_within_its_bound() {
        let start = Instant::now();
        let mut pace = Pace::default();
        pace.observe(0, start);
        let round_trip = Some(Duration::from_millis(40));
        assert_eq!(pace.prepay_bytes(round_trip, u64::MAX), 0, "no rate yet");
        // 1,000,000 bytes in 100 ms: 10 MB/s.
        pace.observe(1_000_000, start + Duration::from_millis(100));
        assert_eq!(pace.prepay_bytes(None, u64::MAX), 0, "no round trip yet");
        assert_eq!(pace.prepay_bytes(round_trip, u64::MAX), 800_000);
        assert_eq!(pace.prepay_bytes(Some(Duration::from_micros(50)), u64::MAX), 200_000);
        assert_eq!(pace.prepay_bytes(round_trip, 300_000), 300_000, "the payer's bound");
        // Samples closer than the interval are not taken; a slower one halves.
        pace.observe(1_000_001, start + Duration::from_millis(101));
        pace.observe(1_000_001, start + Duration::from_millis(200));
        assert_eq!(pace.prepay_bytes(round_trip, u64::MAX), 400_000);
        // A faster one is taken at once.
        pace.observe(4_000_001, start + Duration::from_millis(300));
        assert_eq!(pace.prepay_bytes(round_trip, u64::MAX), 2_400_000);
    }

    #[test]
    fn a_claim_beyond_the_count_and_the_credit_window_is_refused() {
        let base = 5_000;
        assert_eq!(
            billing(300).answer(invoice(1_300, base + 13_000), attos(base)),
            Answer::Pay(attos(base + 3_000))
        );
        assert_eq!(
            billing(300).answer(invoice(1_301, base + 13_010), attos(base)),
            Answer::Refuse { counted_bytes: 300 }
        );
        assert_eq!(
            billing(0)
                .answer(Claim::Invoice { carried_bytes: u64::MAX, due: Amount::ZERO }, attos(base)),
            Answer::Refuse { counted_bytes: 0 }
        );
    }

    #[test]
    fn closing_pays_exactly_the_count_and_nothing_twice() {
        let base = 5_000;
        // The bytes since the last invoice: exactly their worth, no due
        // needed.
        assert_eq!(
            billing(700).answer(Claim::Close, attos(base + 4_000)),
            Answer::Pay(attos(base + 7_000))
        );
        assert_eq!(billing(700).answer(Claim::Close, attos(base + 7_000)), Answer::Wait);
        assert_eq!(billing(0).answer(Claim::Close, attos(base)), Answer::Wait);
        // Paid ahead: the close hands back what was not counted; paying as
        // counted never lowers.
        assert_eq!(
            billing(700).answer(Claim::Close, attos(base + 9_000)),
            Answer::Pay(attos(base + 7_000))
        );
        let ahead = Claim::Counted { ahead_bytes: 100 };
        assert_eq!(billing(700).answer(ahead, attos(base + 9_000)), Answer::Wait);
    }

    #[test]
    fn a_refused_voucher_pays_nothing_so_the_next_invoice_is_answered_again() {
        let billing = billing(400);
        let mut vouchers = billing.vouchers();
        vouchers.sequence = 5;
        vouchers.sent = attos(8_000);
        let now = Instant::now();
        vouchers.awaiting.extend([(4, attos(7_000), now), (5, attos(8_000), now)]);
        drop(vouchers);
        billing.heard(4, VoucherVerdict::Accepted);
        assert_eq!(billing.vouchers().accepted, attos(7_000));
        assert!(billing.vouchers().round_trip.is_some(), "the payment's round trip is measured");
        // Over the escrow (a top-up still on its way): not paid.
        billing.heard(5, VoucherVerdict::OverEscrow);
        assert_eq!(billing.vouchers().sent, attos(7_000));
        assert_eq!(*billing.paid.borrow(), attos(7_000));
        assert!(billing.vouchers().awaiting.is_empty());
        assert!(billing.vouchers().no_prepay, "nothing is paid ahead beyond the escrow");
        // So the relay's reminder is paid again, with a higher sequence.
        assert_eq!(
            billing.answer(invoice(400, 9_000), billing.vouchers().sent),
            Answer::Pay(attos(9_000))
        );
    }

    #[test]
    fn the_newest_verdict_settles_a_close() {
        let verdicts = Verdicts { accepted: 4, refused: Some((6, VoucherVerdict::OverEscrow)) };
        assert_eq!(verdicts.on(3), Some(VoucherVerdict::Accepted));
        assert_eq!(verdicts.on(5), None, "still waiting");
        assert_eq!(verdicts.on(6), Some(VoucherVerdict::OverEscrow));
    }

    /// A session's write half over a real socket, and the relay's end.
    async fn socket_pair() -> (SessionWriter, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (relay, _) = listener.accept().await.unwrap();
        let (_read, write) = client.into_split();
        // The read half is dropped: the relay's end only reads here.
        (Arc::new(tokio::sync::Mutex::new(write)), relay)
    }

    #[tokio::test]
    async fn a_session_pays_as_it_counts_every_half_window_without_an_invoice() {
        let key = SecretKey::from_seed(&[9; 32]);
        let channel = ChannelId::from_bytes([7; 32]);
        let terms = SessionTerms {
            price_per_byte: PricePerByte::from_attos(10).unwrap(),
            credit_window_bytes: 2 * MIN_PAY_EVERY_BYTES,
            paid: Amount::from_attos(5_000).unwrap(),
            sequence: 3,
        };
        let half = MIN_PAY_EVERY_BYTES;
        let billing = Arc::new(Billing::new(Some(Payer::new(channel, key.clone())), terms));
        let (writer, mut relay) = socket_pair().await;
        let paying = tokio::spawn(pay_as_counted(Arc::clone(&billing), writer));
        // Below half a window: nothing is paid yet.
        billing.tally.add(half - 1);
        // At half a window: a voucher for everything counted, unasked.
        billing.tally.add(1);
        let wait = Duration::from_secs(10);
        let frame = tokio::time::timeout(wait, read_frame(&mut relay)).await.unwrap().unwrap();
        let Frame::Voucher(signed) = frame else { panic!("expected a voucher, got {frame:?}") };
        assert_eq!(signed.voucher.sequence, 4);
        let worth = |bytes: u64| Amount::from_attos(5_000 + u128::from(bytes) * 10).unwrap();
        assert_eq!(signed.voucher.cumulative, worth(half));
        signed.verify(&key.public()).unwrap();
        // The next half window, counted in small steps, pays once more.
        for _ in 0..half / 16 {
            billing.tally.add(16);
        }
        let frame = tokio::time::timeout(wait, read_frame(&mut relay)).await.unwrap().unwrap();
        let Frame::Voucher(signed) = frame else { panic!("expected a voucher, got {frame:?}") };
        assert_eq!(signed.voucher.sequence, 5);
        assert_eq!(signed.voucher.cumulative, worth(2 * half));
        // The task ends with the session's reader.
        billing.ended.send_replace(true);
        tokio::time::timeout(wait, paying).await.expect("the payer ends with the session").unwrap();
    }
}
