//! The client side of the relay protocol (docs/PROTOCOL.md, "Relay
//! protocol"): the handshake that proves both keys, a control session that
//! listens, hears of tunnels and pays, and tunnels that dial or accept.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{
    CloseReason, DialFailure, Frame, ListenPolicy, VoucherVerdict, WIRE_VERSION, transcript,
};
use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, SecretKey, SignedVoucher, Voucher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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
/// at most the bytes this client's own tunnels counted.
#[derive(Debug, Clone)]
pub struct Payer {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's client key.
    pub key: SecretKey,
}

/// Bytes carried by a session's tunnels, both ways, as this client counts
/// them.
#[derive(Debug, Default)]
struct Tally(AtomicU64);

/// A control session with a relay.
#[derive(Debug)]
pub struct Session {
    /// The terms the relay opened the session on.
    pub terms: SessionTerms,
    relay: RelayAddress,
    me: SecretKey,
    tally: Arc<Tally>,
    outbox: mpsc::Sender<Frame>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    paying: bool,
    paid: watch::Receiver<Amount>,
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
        let tally = Arc::new(Tally::default());
        let (paid_tx, paid) = watch::channel(terms.paid);
        let paying = payer.is_some();
        let billing = Billing { payer, terms, tally: Arc::clone(&tally), paid: paid_tx };
        tokio::spawn(read_loop(reader, writer, outbox.clone(), events_tx, billing));
        Ok(Session {
            terms,
            relay: relay.clone(),
            me: me.clone(),
            tally,
            outbox,
            events: tokio::sync::Mutex::new(events),
            paying,
            paid,
        })
    }

    /// The relay this session is with.
    pub fn relay(&self) -> &RelayAddress {
        &self.relay
    }

    /// Whether this session pays its invoices itself.
    pub fn is_paying(&self) -> bool {
        self.paying
    }

    /// The cumulative amount of the newest voucher this session paid with
    /// (the opening terms' until it pays).
    pub fn paid(&self) -> watch::Receiver<Amount> {
        self.paid.clone()
    }

    /// Opens a tunnel to `peer`, paid by this session: the stream counts
    /// the bytes it carries both ways, and the session's payer pays for no
    /// more than that count.
    pub async fn dial(&self, peer: PublicKey) -> Result<Tunnel, RelayError> {
        let stream = dial(&self.relay, &self.me, peer).await?;
        Ok(Tunnel { stream, tally: Arc::clone(&self.tally) })
    }

    async fn send(&self, frame: Frame) -> Result<(), RelayError> {
        self.outbox.send(frame).await.map_err(|_| RelayError::Protocol("the session ended".into()))
    }

    /// Sets who may reach this client through the relay.
    pub async fn listen(&self, policy: ListenPolicy) -> Result<(), RelayError> {
        self.send(Frame::Listen { policy }).await
    }

    /// Refuses an incoming tunnel.
    pub async fn reject(&self, tunnel: u64) -> Result<(), RelayError> {
        self.send(Frame::Reject { tunnel }).await
    }

    /// Sends a voucher (a payer sends them itself).
    pub async fn pay(&self, voucher: SignedVoucher) -> Result<(), RelayError> {
        self.send(Frame::Voucher(voucher)).await
    }

    /// Ends the session.
    pub async fn close(&self) -> Result<(), RelayError> {
        self.send(Frame::Close { reason: CloseReason::Normal, message: String::new() }).await
    }

    /// The next event; none once the session ended and every event was
    /// read. One reader at a time: concurrent callers take turns.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }
}

/// What a session needs to check and pay invoices.
struct Billing {
    payer: Option<Payer>,
    terms: SessionTerms,
    tally: Arc<Tally>,
    /// Where the newest paid amount is published.
    paid: watch::Sender<Amount>,
}

/// What to do with an invoice.
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
    /// Checks an invoice for `carried_bytes` due `due` against this
    /// client's count, with `paid` the newest voucher's amount. The relay
    /// carries at most `paid bytes + credit window`, and this client pays
    /// for no more than it counted, so an honest claim never exceeds
    /// `counted + credit window`. Within that, the client pays the due
    /// amount but never more than its own count is worth.
    fn answer(&self, carried_bytes: u64, due: Amount, paid: Amount) -> Answer {
        let counted = self.tally.0.load(Ordering::Relaxed);
        let terms = &self.terms;
        if carried_bytes > counted.saturating_add(terms.credit_window_bytes) {
            return Answer::Refuse { counted_bytes: counted };
        }
        let owed = ferry_proto::cost(counted.min(carried_bytes), terms.price_per_byte)
            .and_then(|cost| terms.paid.checked_add(cost));
        let Ok(owed) = owed else { return Answer::Refuse { counted_bytes: counted } };
        let amount = due.min(owed);
        if amount > paid { Answer::Pay(amount) } else { Answer::Wait }
    }
}

async fn read_loop(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    outbox: mpsc::Sender<Frame>,
    events: mpsc::Sender<Event>,
    billing: Billing,
) {
    let (mut paid, mut sequence) = (billing.terms.paid, billing.terms.sequence);
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
            Ok(Frame::Incoming { tunnel, caller }) => Event::Incoming { tunnel, caller },
            Ok(Frame::Invoice { channel, carried_bytes, due }) => {
                let payer = billing.payer.as_ref().filter(|payer| payer.channel == channel);
                let mut answered = None;
                match payer.map(|payer| (payer, billing.answer(carried_bytes, due, paid))) {
                    Some((_, Answer::Refuse { counted_bytes })) => {
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
                    Some((payer, Answer::Pay(amount))) => {
                        sequence += 1;
                        paid = amount;
                        let voucher = Voucher { channel, sequence, cumulative: amount };
                        // Written here rather than queued: the relay's
                        // tunnels may be waiting for it.
                        let frame = Frame::Voucher(voucher.sign(&payer.key));
                        let _ = write_frame(&mut *writer.lock().await, &frame).await;
                        billing.paid.send_replace(amount);
                        answered = Some(voucher);
                    }
                    Some((_, Answer::Wait)) | None => {}
                }
                Event::Invoice { carried_bytes, due, voucher: answered }
            }
            Ok(Frame::VoucherResult { sequence, verdict }) => {
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
        let read = (buf.filled().len() - before) as u64;
        self.tally.0.fetch_add(read, Ordering::Relaxed);
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
            self.tally.0.fetch_add(written as u64, Ordering::Relaxed);
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
        let tally = Arc::new(Tally::default());
        tally.0.store(counted, Ordering::Relaxed);
        let terms = SessionTerms {
            price_per_byte: PricePerByte::from_attos(10).unwrap(),
            credit_window_bytes: 1000,
            paid: Amount::from_attos(5_000).unwrap(),
            sequence: 3,
        };
        Billing { payer: None, terms, tally, paid: watch::channel(Amount::ZERO).0 }
    }

    fn attos(value: u128) -> Amount {
        Amount::from_attos(value).unwrap()
    }

    #[test]
    fn an_honest_invoice_is_paid_but_never_beyond_the_clients_count() {
        let base = 5_000;
        // Counted as much as billed: pay the due amount.
        assert_eq!(
            billing(400).answer(400, attos(base + 4_000), attos(base)),
            Answer::Pay(attos(base + 4_000))
        );
        // Bytes still on their way here: pay for what was counted.
        assert_eq!(
            billing(300).answer(400, attos(base + 4_000), attos(base)),
            Answer::Pay(attos(base + 3_000))
        );
        // Already paid for everything counted: wait for the count to grow.
        assert_eq!(
            billing(300).answer(400, attos(base + 4_000), attos(base + 3_000)),
            Answer::Wait
        );
        // A due below the count's worth is paid as billed.
        assert_eq!(
            billing(900).answer(400, attos(base + 4_000), attos(base)),
            Answer::Pay(attos(base + 4_000))
        );
    }

    #[test]
    fn a_claim_beyond_the_count_and_the_credit_window_is_refused() {
        let base = 5_000;
        assert_eq!(
            billing(300).answer(1_300, attos(base + 13_000), attos(base)),
            Answer::Pay(attos(base + 3_000))
        );
        assert_eq!(
            billing(300).answer(1_301, attos(base + 13_010), attos(base)),
            Answer::Refuse { counted_bytes: 300 }
        );
        assert_eq!(
            billing(0).answer(u64::MAX, Amount::ZERO, attos(base)),
            Answer::Refuse { counted_bytes: 0 }
        );
    }
}
