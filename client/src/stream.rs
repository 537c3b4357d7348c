//! A byte stream between two peers that outlives the link carrying it
//! (docs/PROTOCOL.md, "Peer streams").
//!
//! The application sees one [`Stream`]. Underneath, a connection task
//! sends the application's bytes as records over an encrypted link and
//! keeps every byte until the peer acknowledges it. When the link dies
//! (its relay was killed, say), the dialling side makes a new link through
//! another route, both sides say how much they have received, and each
//! resends what the other lacks: nothing is lost or duplicated.
//!
//! Stream positions count data bytes, plus one for the end of the stream
//! (as in TCP), so that acknowledging the end is acknowledging a position.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::PublicKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::secure::{MAX_PLAINTEXT_BYTES, SecureError, SecureReader, SecureWriter};

mod pipe;
mod window;

pub use pipe::{APP_BUFFER_BYTES, RECEIVE_BUFFER_BYTES};
use pipe::{Pipe, ReadEnd};
use window::SendWindow;
pub use window::{MAX_SEND_WINDOW_BYTES, MIN_SEND_WINDOW_BYTES};

/// Bytes of a connection id.
pub const CONNECTION_ID_BYTES: usize = 16;
/// A receiver acknowledges at least every this many bytes.
pub const ACK_EVERY_BYTES: u64 = 256 << 10;
/// An idle link sends an acknowledgement this often, as a keepalive.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// A link that hears nothing for this long is taken for dead.
pub const LINK_SILENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a connection without a link waits for a new one before it
/// fails.
pub const RELINK_TIMEOUT: Duration = Duration::from_secs(20);
/// The most data one record carries: all that fits beside its type byte.
const DATA_CHUNK_BYTES: usize = MAX_PLAINTEXT_BYTES - 1;
/// Records read ahead from a link.
const LINK_RECORDS: usize = 16;
/// The pause between two redials that both found no route.
const REDIAL_PAUSE: Duration = Duration::from_millis(250);
/// Links offered to one connection and not yet taken.
pub(crate) const LINKS_QUEUED: usize = 4;

/// A connection's id, chosen by the dialling side.
pub type ConnectionId = [u8; CONNECTION_ID_BYTES];

/// Counts a group's connections that are finishing: both sides sent
/// their end, and only acknowledgements (and the link's own end) remain.
/// An endpoint waits for them before it closes its relay sessions, which
/// would cut those last bytes off, and leave them unpaid.
#[derive(Debug, Clone)]
pub(crate) struct Finishing(Arc<watch::Sender<usize>>);

impl Default for Finishing {
    fn default() -> Finishing {
        Finishing(Arc::new(watch::Sender::new(0)))
    }
}

impl Finishing {
    fn enter(&self) -> Finishing {
        self.0.send_modify(|count| *count += 1);
        Finishing(Arc::clone(&self.0))
    }

    /// Waits, at most `limit`, until no connection is finishing.
    pub(crate) async fn wait(&self, limit: Duration) {
        let mut count = self.0.subscribe();
        let _ = tokio::time::timeout(limit, count.wait_for(|count| *count == 0)).await;
    }
}

/// One connection's place in the count, given up when dropped.
struct FinishingGuard(Finishing);

impl Drop for FinishingGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// One plaintext record of a peer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The first record each side sends on every link.
    Hello {
        /// The connection the link belongs to.
        connection: ConnectionId,
        /// Stream positions the sender has received.
        received: u64,
    },
    /// The next bytes of the stream (1 to `MAX_PLAINTEXT_BYTES - 1`).
    Data(Bytes),
    /// Stream positions the sender has received.
    Ack {
        /// The count.
        received: u64,
    },
    /// The sender will send no more data.
    Fin,
}

const HELLO: u8 = 1;
const DATA: u8 = 2;
const ACK: u8 = 3;
const FIN: u8 = 4;

/// Why a record did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed peer record: {0}")]
pub struct RecordError(&'static str);

impl Record {
    /// The record's bytes: a type byte and its fields, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Hello { connection, received } => {
                let mut bytes = vec![HELLO];
                bytes.extend_from_slice(connection);
                bytes.extend_from_slice(&received.to_be_bytes());
                bytes
            }
            Record::Data(data) => {
                let mut bytes = Vec::with_capacity(1 + data.len());
                bytes.push(DATA);
                bytes.extend_from_slice(data);
                bytes
            }
            Record::Ack { received } => {
                let mut bytes = vec![ACK];
                bytes.extend_from_slice(&received.to_be_bytes());
                bytes
            }
            Record::Fin => vec![FIN],
        }
    }

    /// Decodes one record, refusing trailing or missing bytes. A data
    /// record's bytes are taken, not copied.
    pub fn decode(bytes: Bytes) -> Result<Record, RecordError> {
        let u64_at = |field: &[u8]| {
            <[u8; 8]>::try_from(field).map(u64::from_be_bytes).map_err(|_| RecordError("length"))
        };
        match bytes.split_first() {
            Some((&HELLO, rest)) if rest.len() == CONNECTION_ID_BYTES + 8 => {
                let (connection, received) = rest.split_at(CONNECTION_ID_BYTES);
                let connection =
                    ConnectionId::try_from(connection).map_err(|_| RecordError("length"))?;
                Ok(Record::Hello { connection, received: u64_at(received)? })
            }
            Some((&DATA, rest)) if !rest.is_empty() => Ok(Record::Data(bytes.slice(1..))),
            Some((&ACK, rest)) => Ok(Record::Ack { received: u64_at(rest)? }),
            Some((&FIN, [])) => Ok(Record::Fin),
            Some((&(HELLO | DATA | FIN), _)) => Err(RecordError("length")),
            Some(_) => Err(RecordError("unknown type")),
            None => Err(RecordError("empty")),
        }
    }
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The encrypted link failed.
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The peer sent a malformed record.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// An encrypted link to the peer, over one route.
#[derive(Debug)]
pub struct Link {
    /// The peer's proven identity.
    pub peer: PublicKey,
    /// Where the link runs, for logs: a relay's key or a direct address.
    pub route: String,
    reader: SecureReader,
    writer: SecureWriter,
}

impl Link {
    /// A link over an encrypted reader and writer to `peer`.
    pub fn new(peer: PublicKey, route: String, reader: SecureReader, writer: SecureWriter) -> Link {
        Link { peer, route, reader, writer }
    }

    /// Reads one record.
    pub async fn receive(&mut self) -> Result<Record, LinkError> {
        Ok(Record::decode(self.reader.read().await?)?)
    }
}

/// A link handed to a connection, with the peer's hello when the
/// accepting side already read it to find the connection.
pub(crate) type Offered = (Link, Option<ConnectionId>, Option<u64>);

/// Makes a new link for a dialling connection whose link died.
pub type Redial = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<Link>> + Send>> + Send + Sync>;

/// The application's end of a peer stream: one ordered, reliable,
/// encrypted byte stream, whatever links carry it.
#[derive(Debug)]
pub struct Stream {
    pipe: Arc<Pipe>,
    peer: PublicKey,
}

impl Stream {
    /// The peer's proven key.
    pub fn peer(&self) -> PublicKey {
        self.peer
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.pipe.leave();
    }
}

/// Reads end cleanly only if the peer ended the stream; a failed
/// connection's reason comes after the bytes that did arrive.
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.pipe.poll_read(cx, buf)
    }
}

/// Writes need no flush: the connection task sends what it is handed.
impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.pipe.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.pipe.shut_down())
    }
}

/// The link a connection currently uses. Its reader and writer run as
/// tasks of their own, so that the connection never waits on the network:
/// a peer that stops reading cannot stall this side's reading, acks or
/// keepalives.
struct Active {
    /// Encoded Hello, Data and Fin records, in order. Unbounded as a queue,
    /// but bounded by the send window: data is queued once per link and
    /// only while `sent - acked` is below the send window (at most
    /// [`MAX_SEND_WINDOW_BYTES`]). A data record is the same buffer that
    /// [`Unacked`] keeps, shared, not copied.
    outbox: mpsc::UnboundedSender<Bytes>,
    /// The newest count to acknowledge; the writer sends the latest only.
    acks: watch::Sender<u64>,
    records: mpsc::Receiver<Result<Record, LinkError>>,
    /// None once [`Active::finish`] took it.
    reading: Option<tokio::task::JoinHandle<()>>,
    /// None once [`Active::finish`] let it drain.
    writing: Option<tokio::task::JoinHandle<()>>,
    route: String,
    /// Whether the peer's hello arrived and everything it lacked was resent.
    ready: bool,
    heard_at: Instant,
}

impl Active {
    /// Ends a link at the end of the stream: its writer sends what is
    /// queued and the last acknowledgement, then closes the link, and its
    /// reader reads on to the peer's end, within [`LINK_SILENCE_TIMEOUT`];
    /// the returned future completes then. Reading to the end means every
    /// byte a relay carried here was read, and so counted for paying it.
    fn finish(mut self) -> impl Future<Output = ()> + Send + 'static {
        let writing = self.writing.take();
        let reading = self.reading.take();
        let mut records = std::mem::replace(&mut self.records, mpsc::channel(1).1);
        async move {
            let deadline = Instant::now() + LINK_SILENCE_TIMEOUT;
            if let Some(mut writing) = writing
                && tokio::time::timeout_at(deadline, &mut writing).await.is_err()
            {
                writing.abort();
            }
            // Only acknowledgements come after both ends; they change
            // nothing now. The reader stops at the peer's end.
            let to_the_end = async { while let Some(Ok(_)) = records.recv().await {} };
            let _ = tokio::time::timeout_at(deadline, to_the_end).await;
            if let Some(reading) = reading {
                reading.abort();
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // A lost or replaced link: its writer may be stuck on a dead
        // connection, so it goes too.
        if let Some(reading) = &self.reading {
            reading.abort();
        }
        if let Some(writing) = &self.writing {
            writing.abort();
        }
    }
}

/// Bytes sent and kept until acknowledged, as the encoded data records
/// they were sent in (a type byte, then the data).
#[derive(Default)]
struct Unacked {
    records: VecDeque<Bytes>,
    /// Data bytes of the first record already acknowledged.
    front_skip: usize,
}

impl Unacked {
    /// Forgets the first `count` data bytes.
    fn drop_front(&mut self, mut count: u64) {
        while count > 0 {
            let Some(front) = self.records.front() else { return };
            let left = (front.len() - 1 - self.front_skip) as u64;
            if count >= left {
                self.records.pop_front();
                self.front_skip = 0;
                count -= left;
            } else {
                // `count < left`, which fits in usize.
                self.front_skip += count as usize;
                count = 0;
            }
        }
    }
}

/// One connection's state, owned by its task.
struct Connection {
    id: ConnectionId,
    peer: PublicKey,
    pipe: Arc<Pipe>,
    links: mpsc::Receiver<Offered>,
    redial: Option<(Redial, mpsc::Sender<Offered>)>,
    link: Option<Active>,
    unacked: Unacked,
    /// How much may be sent and not acknowledged: the application's writes
    /// wait while `sent - acked` is at it.
    window: SendWindow,
    /// Stream positions the peer acknowledged.
    acked: u64,
    /// Data bytes taken from the application.
    sent: u64,
    /// The application ended its writing.
    app_ended: bool,
    /// Stream positions received from the peer (the end counts one).
    received: u64,
    peer_ended: bool,
    acknowledged_received: u64,
    /// When the connection last had a link the peer answered on.
    unlinked_since: Option<Instant>,
    finishing: Finishing,
    /// Held while this connection is finishing.
    finishing_now: Option<FinishingGuard>,
}

/// The queues that hand a connection new links.
pub(crate) fn link_queue() -> (mpsc::Sender<Offered>, mpsc::Receiver<Offered>) {
    mpsc::channel(LINKS_QUEUED)
}

/// Starts a connection task for `id` with `peer` on its `first` link, and
/// returns the application's stream. `links` hands the task new links. A
/// dialling connection gets `redial`, which it calls when its link dies.
pub(crate) fn start(
    id: ConnectionId,
    peer: PublicKey,
    first: Offered,
    (links_tx, links): (mpsc::Sender<Offered>, mpsc::Receiver<Offered>),
    redial: Option<Redial>,
    finishing: Finishing,
    on_end: impl FnOnce() + Send + 'static,
) -> Stream {
    let pipe = Pipe::new();
    let connection = Connection {
        id,
        peer,
        pipe: Arc::clone(&pipe),
        links,
        redial: redial.map(|redial| (redial, links_tx)),
        link: None,
        unacked: Unacked::default(),
        window: SendWindow::default(),
        acked: 0,
        sent: 0,
        app_ended: false,
        received: 0,
        peer_ended: false,
        acknowledged_received: 0,
        unlinked_since: Some(Instant::now()),
        finishing,
        finishing_now: None,
    };
    tokio::spawn(async move {
        connection.run(first).await;
        on_end();
    });
    Stream { pipe, peer }
}

/// Why a connection gives up.
#[derive(Debug)]
enum Fatal {
    /// The application dropped its stream before the end.
    AppGone,
    /// The peer broke the stream's rules, or no new link came in time.
    Failed(String),
}

/// However the task ends, a panic included, the application's reads and
/// writes end too instead of waiting forever. (An end already given, the
/// peer's, stays.)
impl Drop for Connection {
    fn drop(&mut self) {
        self.pipe.end(ReadEnd::Failed("the connection ended".into()), true);
    }
}

impl Connection {
    async fn run(mut self, first: Offered) {
        let result = self.serve(first).await;
        // Done (its link drained) or failed: no longer finishing.
        self.finishing_now = None;
        match result {
            Ok(()) => {
                // The application's reads already end with the peer's Fin,
                // and its writes with its own end.
                tracing::debug!(peer = %self.peer, "peer stream ended");
                self.linger().await;
            }
            Err(Fatal::AppGone) => tracing::debug!(peer = %self.peer, "the application left"),
            Err(Fatal::Failed(reason)) => {
                tracing::warn!(peer = %self.peer, %reason, "peer stream failed");
                self.pipe.end(ReadEnd::Failed(reason), true);
            }
        }
    }

    /// After the end, the peer may not have heard the last
    /// acknowledgement: an accepting side answers a resuming dialler for a
    /// while, so that the dialler's stream ends cleanly too.
    async fn linger(&mut self) {
        if self.redial.is_some() {
            return;
        }
        let deadline = Instant::now() + RELINK_TIMEOUT;
        while let Ok(Some(offered)) = tokio::time::timeout_at(deadline, self.links.recv()).await {
            if self.install(offered).is_err() {
                return;
            }
            // The answer to the peer's hello is all it needs.
            if let Some(link) = self.link.take() {
                tokio::spawn(link.finish());
            }
        }
    }

    fn done(&self) -> bool {
        self.app_ended && self.acked == self.sent + 1 && self.peer_ended
    }

    async fn serve(&mut self, first: Offered) -> Result<(), Fatal> {
        self.install(first)?;
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pipe = Arc::clone(&self.pipe);
        while !self.done() {
            self.take_app_bytes();
            let inbox_room = pipe.has_receive_room();
            let relink_deadline =
                self.unlinked_since.map_or_else(Instant::now, |since| since + RELINK_TIMEOUT);
            tokio::select! {
                () = pipe.changed() => {}
                record = next_record(&mut self.link), if inbox_room => match record {
                    Some(Ok(record)) => self.on_record(record)?,
                    Some(Err(error)) => self.lose_link(&error.to_string()),
                    None => self.lose_link("the link ended"),
                },
                offered = self.links.recv(), if !self.links.is_closed() || !self.links.is_empty() => {
                    if let Some(offered) = offered {
                        self.install(offered)?;
                    }
                }
                _ = keepalive.tick() => self.keep_alive(inbox_room),
                () = tokio::time::sleep_until(relink_deadline), if self.unlinked_since.is_some() => {
                    return Err(Fatal::Failed(format!(
                        "no route to the peer for {} s",
                        RELINK_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        // Awaited, so that the connection counts as finishing until the
        // link's last bytes (the final acknowledgement) are out.
        if let Some(link) = self.link.take() {
            link.finish().await;
        }
        Ok(())
    }

    /// Counts the connection as finishing once both ends were sent, before
    /// the application can learn of the peer's end (and close its
    /// endpoint, which waits for finishing connections).
    fn note_finishing(&mut self) {
        if self.app_ended && self.peer_ended && self.finishing_now.is_none() {
            self.finishing_now = Some(FinishingGuard(self.finishing.enter()));
        }
    }

    /// Queues an encoded record on the link; a link whose writer ended is
    /// lost.
    fn send(&mut self, record: Bytes) {
        let Some(link) = self.link.as_ref() else { return };
        if link.outbox.send(record).is_err() {
            self.lose_link("the link's writer ended");
        }
    }

    /// Takes what the application wrote, while the send window has room,
    /// and its end. An application that dropped its stream ended its
    /// writing, as TCP's close does: what it wrote is still delivered.
    fn take_app_bytes(&mut self) {
        if self.app_ended {
            return;
        }
        let room = self.window.bytes().saturating_sub(self.sent - self.acked.min(self.sent));
        let taken = self.pipe.take(room);
        let ready = self.link.as_ref().is_some_and(|link| link.ready);
        for record in taken.records {
            self.sent += record.len() as u64 - 1;
            self.unacked.records.push_back(record.clone());
            if ready {
                self.window.sent(self.sent, Instant::now());
                self.send(record);
            }
        }
        if taken.ended {
            self.app_ended = true;
            self.note_finishing();
            if ready {
                self.send(Bytes::from(Record::Fin.encode()));
            }
        }
    }

    fn on_record(&mut self, record: Record) -> Result<(), Fatal> {
        if let Some(link) = self.link.as_mut() {
            link.heard_at = Instant::now();
        }
        let ready = self.link.as_ref().is_some_and(|link| link.ready);
        match record {
            Record::Hello { connection, received } if !ready => self.hello(connection, received),
            Record::Hello { .. } => Err(Fatal::Failed("a second hello on one link".into())),
            _ if !ready => Err(Fatal::Failed("a record before the peer's hello".into())),
            Record::Data(data) => {
                if self.peer_ended {
                    return Err(Fatal::Failed("data after the end of the stream".into()));
                }
                self.received += data.len() as u64;
                if !self.pipe.deliver(data) {
                    return Err(Fatal::AppGone);
                }
                if self.received - self.acknowledged_received >= ACK_EVERY_BYTES {
                    self.acknowledge();
                }
                Ok(())
            }
            Record::Fin => {
                if !self.peer_ended {
                    self.peer_ended = true;
                    self.received += 1;
                    self.note_finishing();
                    self.pipe.end(ReadEnd::Finished, false);
                }
                self.acknowledge();
                Ok(())
            }
            Record::Ack { received } => self.peer_received(received),
        }
    }

    /// The peer has `received` positions: forget what it no longer needs.
    fn peer_received(&mut self, received: u64) -> Result<(), Fatal> {
        let end = self.sent + u64::from(self.app_ended);
        if received > end {
            return Err(Fatal::Failed(format!(
                "the peer acknowledged {received} bytes of the {end} sent"
            )));
        }
        if received > self.acked {
            self.unacked.drop_front(received.min(self.sent) - self.acked.min(self.sent));
            self.acked = received;
            self.window.acked(received, Instant::now());
        }
        Ok(())
    }

    fn acknowledge(&mut self) {
        self.acknowledged_received = self.received;
        if let Some(link) = self.link.as_ref() {
            link.acks.send_replace(self.received);
        }
    }

    /// The peer's hello on a new link: resend everything it lacks.
    fn hello(&mut self, connection: ConnectionId, received: u64) -> Result<(), Fatal> {
        if connection != self.id {
            return Err(Fatal::Failed("a hello for another connection".into()));
        }
        if received < self.acked {
            return Err(Fatal::Failed("the peer forgot acknowledged bytes".into()));
        }
        self.peer_received(received)?;
        if let Some(link) = self.link.as_mut() {
            link.ready = true;
        }
        // The peer answered: this link counts as a route again.
        self.unlinked_since = None;
        // Whole records go again as they are; an acknowledged part of the
        // first is cut off.
        let skip = self.unacked.front_skip;
        let resend: Vec<Bytes> = self
            .unacked
            .records
            .iter()
            .enumerate()
            .map(|(index, record)| match index {
                0 if skip > 0 => Bytes::from(Record::Data(record.slice(1 + skip..)).encode()),
                _ => record.clone(),
            })
            .collect();
        self.window.resent();
        for record in resend {
            self.send(record);
        }
        if self.app_ended && self.acked <= self.sent {
            self.send(Bytes::from(Record::Fin.encode()));
        }
        Ok(())
    }

    /// Takes a new link: says hello on it and, when the peer's hello came
    /// with it, answers that.
    fn install(&mut self, (link, connection, received): Offered) -> Result<(), Fatal> {
        if link.peer != self.peer {
            tracing::warn!(route = %link.route, "dropping a link to another peer");
            return Ok(());
        }
        let Link { reader, writer, route, .. } = link;
        let (records_tx, records) = mpsc::channel(LINK_RECORDS);
        let reading = tokio::spawn(read_records(reader, records_tx));
        let (outbox, queued) = mpsc::unbounded_channel();
        let (acks, acks_rx) = watch::channel(self.received);
        let hello = Record::Hello { connection: self.id, received: self.received }.encode();
        let writing = tokio::spawn(write_records(writer, hello, queued, acks_rx));
        tracing::debug!(%route, peer = %self.peer, "peer stream on a new link");
        self.link = Some(Active {
            outbox,
            acks,
            records,
            reading: Some(reading),
            writing: Some(writing),
            route,
            ready: false,
            heard_at: Instant::now(),
        });
        self.unlinked_since.get_or_insert_with(Instant::now);
        match (connection, received) {
            (Some(connection), Some(received)) => self.hello(connection, received),
            _ => Ok(()),
        }
    }

    fn lose_link(&mut self, why: &str) {
        let Some(lost) = self.link.take() else { return };
        tracing::info!(route = %lost.route, peer = %self.peer, why, "lost the link to the peer");
        let since = *self.unlinked_since.get_or_insert_with(Instant::now);
        if let Some((redial, links)) = &self.redial {
            let (redial, links) = (Arc::clone(redial), links.clone());
            // Tries again until a link comes or the stream gives up.
            let deadline = since + RELINK_TIMEOUT;
            tokio::spawn(async move {
                while Instant::now() < deadline && !links.is_closed() {
                    if let Some(link) = redial().await {
                        let _ = links.send((link, None, None)).await;
                        return;
                    }
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
            });
        }
    }

    fn keep_alive(&mut self, taking_records: bool) {
        let Some(link) = self.link.as_mut() else { return };
        if !taking_records {
            // The application is slow, not the link: do not judge silence.
            link.heard_at = Instant::now();
        }
        if link.heard_at.elapsed() > LINK_SILENCE_TIMEOUT {
            self.lose_link("the link fell silent");
        } else if link.ready {
            self.acknowledge();
        }
    }
}

/// The next record of the current link; pending forever without a link.
async fn next_record(link: &mut Option<Active>) -> Option<Result<Record, LinkError>> {
    match link {
        Some(link) => link.records.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_records(mut reader: SecureReader, records: mpsc::Sender<Result<Record, LinkError>>) {
    loop {
        let record = match reader.read().await {
            Ok(bytes) => Record::decode(bytes).map_err(LinkError::from),
            Err(error) => Err(LinkError::from(error)),
        };
        let last = record.is_err();
        if records.send(record).await.is_err() || last {
            return;
        }
    }
}

/// Writes one encoded record; false if it failed. A write may wait as
/// long as the peer does not read: a slow application is not a dead link,
/// which the reading side detects by its silence.
async fn write_record(writer: &mut SecureWriter, record: &[u8]) -> bool {
    writer.write(record).await.is_ok()
}

/// Writes `hello`, then queued records and the newest acknowledgement,
/// until the queue closes (then it ends the link) or a write fails.
async fn write_records(
    mut writer: SecureWriter,
    hello: Vec<u8>,
    mut queued: mpsc::UnboundedReceiver<Bytes>,
    mut acks: watch::Receiver<u64>,
) {
    if !write_record(&mut writer, &hello).await {
        return;
    }
    acks.mark_unchanged();
    loop {
        let record = tokio::select! {
            biased;
            record = queued.recv() => match record {
                Some(record) => record,
                None => break,
            },
            changed = acks.changed() => match changed {
                Ok(()) => Bytes::from(Record::Ack { received: *acks.borrow_and_update() }.encode()),
                Err(_) => break,
            },
        };
        if !write_record(&mut writer, &record).await {
            return;
        }
    }
    // The connection ended or moved on: send the last acknowledgement.
    // (`Receiver::has_changed` says nothing once the sender is gone, as
    // it is at the end; the borrowed value still knows.)
    let last = {
        let last = acks.borrow_and_update();
        last.has_changed().then_some(*last)
    };
    if let Some(received) = last {
        write_record(&mut writer, &Record::Ack { received }.encode()).await;
    }
    let _ = writer.shutdown().await;
}

/// The largest data record fits in one encrypted record.
const _: () = assert!(DATA_CHUNK_BYTES < MAX_PLAINTEXT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (any::<[u8; 16]>(), any::<u64>())
                .prop_map(|(connection, received)| Record::Hello { connection, received }),
            proptest::collection::vec(any::<u8>(), 1..512)
                .prop_map(|data| Record::Data(Bytes::from(data))),
            any::<u64>().prop_map(|received| Record::Ack { received }),
            Just(Record::Fin),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(record in record()) {
            prop_assert_eq!(Record::decode(Bytes::from(record.encode())), Ok(record));
        }

        #[test]
        fn a_record_with_a_byte_more_or_less_is_refused(record in record()) {
            let bytes = record.encode();
            let mut longer = bytes.clone();
            longer.push(0);
            if !matches!(record, Record::Data(_)) {
                prop_assert!(Record::decode(Bytes::from(longer)).is_err());
            }
            if bytes.len() > 1 && !matches!(record, Record::Data(_)) {
                prop_assert!(Record::decode(Bytes::copy_from_slice(&bytes[..bytes.len() - 1])).is_err());
            }
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Record::decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn the_documented_record_vectors_hold() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        for record in [
            Record::Hello { connection: [7; 16], received: 5 },
            Record::Data(Bytes::from_static(b"hi")),
            Record::Ack { received: 1 << 20 },
            Record::Fin,
        ] {
            let bytes = hex::encode(record.encode());
            assert!(
                doc.contains(&format!("`{bytes}`")),
                "docs/PROTOCOL.md lacks {record:?}: {bytes}"
            );
        }
    }

    #[test]
    fn unknown_empty_and_short_records_are_refused() {
        assert_eq!(Record::decode(Bytes::new()), Err(RecordError("empty")));
        assert_eq!(Record::decode(Bytes::from_static(&[9])), Err(RecordError("unknown type")));
        assert_eq!(Record::decode(Bytes::from_static(&[DATA])), Err(RecordError("length")));
        assert_eq!(Record::decode(Bytes::from_static(&[ACK, 0])), Err(RecordError("length")));
    }

    #[test]
    fn acknowledged_bytes_leave_the_buffer_across_chunks() {
        let mut unacked = Unacked::default();
        let record = |byte| Bytes::from(Record::Data(Bytes::from(vec![byte; 10])).encode());
        unacked.records.extend([record(1), record(2), record(3)]);
        unacked.drop_front(15);
        assert_eq!(unacked.records.len(), 2);
        assert_eq!(unacked.front_skip, 5);
        unacked.drop_front(100);
        assert!(unacked.records.is_empty());
        assert_eq!(unacked.front_skip, 0);
    }

    /// Two encrypted links, one per side, through a forwarding task that
    /// stands in for a relay: aborting it kills the link.
    async fn link_pair(
        dialer: &SecretKey,
        acceptor: &SecretKey,
    ) -> (Link, Link, tokio::task::JoinHandle<()>) {
        let (near, mut near_relay) = tokio::io::duplex(1 << 16);
        let (mut far_relay, far) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut near_relay, &mut far_relay).await;
        });
        let me = acceptor.clone();
        let responding =
            tokio::spawn(async move { crate::secure::respond(Box::new(far), &me).await });
        let (reader, writer) =
            crate::secure::initiate(Box::new(near), dialer, &acceptor.public()).await.unwrap();
        let (caller, far_reader, far_writer) = responding.await.unwrap().unwrap();
        (
            Link::new(acceptor.public(), "test".into(), reader, writer),
            Link::new(caller, "test".into(), far_reader, far_writer),
            relay,
        )
    }

    /// The accepting side's part of a new link: read the dialler's hello,
    /// as an endpoint does, and offer the link with it.
    async fn offer_to_acceptor(mut far: Link, relink: mpsc::Sender<Offered>) {
        let Ok(Record::Hello { connection, received }) = far.receive().await else {
            panic!("expected a hello")
        };
        relink.send((far, Some(connection), Some(received))).await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_survives_the_death_of_its_link_without_loss_or_duplication() {
        let (dialer, acceptor) = (SecretKey::from_seed(&[1; 32]), SecretKey::from_seed(&[2; 32]));
        let relink: Arc<OnceLock<mpsc::Sender<Offered>>> = Arc::default();
        let redials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let redial: Redial = {
            let (dialer, acceptor, relink, redials) =
                (dialer.clone(), acceptor.clone(), Arc::clone(&relink), Arc::clone(&redials));
            Arc::new(move || {
                let (dialer, acceptor, relink) = (dialer.clone(), acceptor.clone(), relink.clone());
                redials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Box::pin(async move {
                    let (near, far, _relay) = link_pair(&dialer, &acceptor).await;
                    tokio::spawn(offer_to_acceptor(far, relink.get().unwrap().clone()));
                    Some(near)
                })
            })
        };
        let (near, mut far, first_relay) = link_pair(&dialer, &acceptor).await;
        let first = (near, None, None);
        let mut dialing = start(
            [7; 16],
            acceptor.public(),
            first,
            link_queue(),
            Some(redial),
            Finishing::default(),
            || {},
        );
        let Ok(Record::Hello { connection, received }) = far.receive().await else {
            panic!("expected a hello")
        };
        let (links, queued) = link_queue();
        relink.set(links.clone()).unwrap();
        let first = (far, Some(connection), Some(received));
        let mut accepting = start(
            connection,
            dialer.public(),
            first,
            (links, queued),
            None,
            Finishing::default(),
            || {},
        );

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            dialing.write_all(&sent).await.unwrap();
            dialing.shutdown().await.unwrap();
            let mut answer = Vec::new();
            dialing.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = vec![0; 1_000_000];
        accepting.read_exact(&mut got).await.unwrap();
        first_relay.abort();
        let mut rest = Vec::new();
        accepting.read_to_end(&mut rest).await.unwrap();
        got.extend(rest);
        assert!(got == payload, "the bytes differ after the link died");
        accepting.write_all(b"thanks").await.unwrap();
        accepting.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
        assert_eq!(redials.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// A dialling and an accepting stream over one link pair.
    async fn stream_pair() -> (Stream, Stream, tokio::task::JoinHandle<()>) {
        let (dialer, acceptor) = (SecretKey::from_seed(&[1; 32]), SecretKey::from_seed(&[2; 32]));
        let (near, mut far, relay) = link_pair(&dialer, &acceptor).await;
        let dialing = start(
            [7; 16],
            acceptor.public(),
            (near, None, None),
            link_queue(),
            None,
            Finishing::default(),
            || {},
        );
        let Ok(Record::Hello { connection, received }) = far.receive().await else {
            panic!("expected a hello")
        };
        let first = (far, Some(connection), Some(received));
        let accepting = start(
            connection,
            dialer.public(),
            first,
            link_queue(),
            None,
            Finishing::default(),
            || {},
        );
        (dialing, accepting, relay)
    }

    #[tokio::test]
    async fn both_sides_sending_more_than_every_buffer_at_once_do_not_deadlock() {
        let (dialing, accepting, _relay) = stream_pair().await;
        let length = 3 * MIN_SEND_WINDOW_BYTES as usize;
        let exchange = |mut stream: Stream, seed: u8| async move {
            let sent: Vec<u8> = (0..length).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let (mut reader, mut writer) = tokio::io::split(&mut stream);
            let writing = async {
                writer.write_all(&sent).await.unwrap();
                writer.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let reading = reader.read_to_end(&mut got);
            let ((), read) = tokio::join!(writing, reading);
            read.unwrap();
            got
        };
        let both = async { tokio::join!(exchange(dialing, 3), exchange(accepting, 5)) };
        let (from_acceptor, from_dialer) =
            tokio::time::timeout(Duration::from_secs(60), both).await.expect("no deadlock");
        assert_eq!(from_dialer.len(), length);
        assert!(from_dialer.iter().enumerate().all(|(i, b)| *b == (i as u8).wrapping_mul(3)));
        assert!(from_acceptor.iter().enumerate().all(|(i, b)| *b == (i as u8).wrapping_mul(5)));
    }

    #[tokio::test]
    async fn a_slow_reader_keeps_its_link_alive() {
        tokio::time::pause();
        let (mut dialing, mut accepting, _relay) = stream_pair().await;
        let writing = tokio::spawn(async move {
            dialing.write_all(&vec![1u8; 8 << 20]).await.unwrap();
            dialing.shutdown().await.unwrap();
            dialing
        });
        let mut first = vec![0; 1 << 20];
        accepting.read_exact(&mut first).await.unwrap();
        // Every buffer fills while the application looks away for longer
        // than a link's silence timeout.
        tokio::time::sleep(LINK_SILENCE_TIMEOUT * 3).await;
        let mut rest = Vec::new();
        accepting.read_to_end(&mut rest).await.unwrap();
        assert_eq!(first.len() + rest.len(), 8 << 20);
        writing.await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_whose_link_never_returns_fails_with_a_reason() {
        tokio::time::pause();
        let (dialer, acceptor) = (SecretKey::from_seed(&[1; 32]), SecretKey::from_seed(&[2; 32]));
        let (near, far, relay) = link_pair(&dialer, &acceptor).await;
        let mut dialing = start(
            [7; 16],
            acceptor.public(),
            (near, None, None),
            link_queue(),
            None,
            Finishing::default(),
            || {},
        );
        drop(far);
        relay.abort();
        let mut buffer = [0u8; 16];
        let error = dialing.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionAborted);
        assert!(error.to_string().contains("no route to the peer"), "{error}");
    }
}
