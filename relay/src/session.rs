//! Control sessions: a client's long-lived connection over which it listens
//! for peers, hears of incoming tunnels, and is invoiced and pays.

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_client::ChannelView;
use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{CloseReason, Frame, ListenPolicy, VoucherVerdict};
use ferry_proto::{Amount, ChannelId, PublicKey, SignedVoucher};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::lookups::{Class, LookupError};
use crate::meter::{Binding, Meter};
use crate::metrics::Held;
use crate::server::{Refusal, Shared, lock};
use crate::store::Stored;

/// Frames waiting to be written to one session; a sender waits when full.
pub const SESSION_OUTBOX: usize = 64;
/// Counted vouchers of one session waiting for their sync; the session
/// stops reading frames while this many wait (a disk that falls behind).
pub const VOUCHERS_IN_FLIGHT: usize = 64;

/// One client's control session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) key: PublicKey,
    pub(crate) outbox: mpsc::Sender<Frame>,
    listen: Mutex<ListenPolicy>,
    /// The paying channel's meter; none for a session that only listens.
    pub(crate) meter: Option<Arc<Meter>>,
    /// Tunnels this client has open as the caller.
    pub(crate) tunnels: AtomicUsize,
    /// Asks the writer to send an invoice now.
    pub(crate) invoice_wanted: Notify,
    /// Asks the channel watcher to look the channel up now (a tunnel is
    /// held back by what the escrow can pay).
    pub(crate) check_channel: Notify,
    /// Set when the session ends, with why; its tunnels watch it.
    pub(crate) closed: watch::Sender<Option<CloseReason>>,
}

impl Session {
    /// Whether the client's listen policy lets `caller` reach it.
    pub(crate) fn allows(&self, caller: &PublicKey) -> bool {
        match &*lock(&self.listen) {
            ListenPolicy::Closed => false,
            ListenPolicy::Open => true,
            ListenPolicy::Allow(keys) => keys.contains(caller),
        }
    }

    /// Ends the session (and its tunnels) for `reason`.
    pub(crate) fn close(&self, reason: CloseReason) {
        self.closed.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(reason);
            }
            first
        });
    }
}

/// Runs a control session on `stream` for the authenticated `client`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: PublicKey,
    channel: Option<ChannelId>,
    ip: IpAddr,
) {
    let (mut reader, mut writer) = stream.into_split();
    let meter = match channel {
        None => None,
        Some(channel) => match open_meter(&shared, client, channel, ip).await {
            Ok(meter) => Some(meter),
            Err((label, refusal)) => {
                shared.metrics.refused(label);
                refuse(&shared, &mut writer, refusal).await;
                return;
            }
        },
    };
    let (outbox, outbox_rx) = mpsc::channel(SESSION_OUTBOX);
    let (closed, _) = watch::channel(None);
    let session = Arc::new(Session {
        key: client,
        outbox,
        listen: Mutex::new(ListenPolicy::Closed),
        meter,
        tunnels: AtomicUsize::new(0),
        invoice_wanted: Notify::new(),
        check_channel: Notify::new(),
        closed,
    });
    let admitted = {
        let mut sessions = lock(&shared.sessions);
        let full = sessions.len() >= shared.config.limits.max_sessions;
        if full && !sessions.contains_key(&client) {
            false
        } else {
            if let Some(replaced) = sessions.insert(client, Arc::clone(&session)) {
                replaced.close(CloseReason::Replaced);
            }
            true
        }
    };
    if !admitted {
        shared.metrics.refused("max_sessions");
        refuse(&shared, &mut writer, Refusal::new(CloseReason::Limit, "the relay is full")).await;
        return;
    }
    let _held = Held::new(&shared.metrics.sessions);
    let (paid, sequence) = session.meter.as_ref().map_or((Amount::ZERO, 0), |meter| meter.paid());
    let ready = Frame::SessionReady {
        price_per_byte: session
            .meter
            .as_ref()
            .map_or(shared.price(), |meter| meter.binding().price),
        credit_window_bytes: shared.config.credit_window_bytes,
        paid,
        sequence,
    };
    let (end_writer, ended) = oneshot::channel();
    let writer_task = if write_bounded(&shared, &mut writer, &ready).await {
        Some(tokio::spawn(write_loop(
            Arc::clone(&shared),
            writer,
            outbox_rx,
            Arc::clone(&session),
            ended,
        )))
    } else {
        None
    };
    let reason = if writer_task.is_some() {
        // Only a paying session takes vouchers; a listen-only one (most
        // sessions) has no queue nor task for them.
        let syncs = session.meter.as_ref().map(|meter| {
            let (syncs, to_follow) = mpsc::channel(VOUCHERS_IN_FLIGHT);
            tokio::spawn(follow_syncs(Arc::clone(&session), Arc::clone(meter), to_follow));
            tokio::spawn(watch_channel(
                Arc::clone(&shared),
                Arc::clone(&session),
                Arc::clone(meter),
            ));
            syncs
        });
        read_loop(&shared, &mut reader, &session, syncs.as_ref()).await
    } else {
        CloseReason::Protocol
    };
    session.close(reason);
    {
        let mut sessions = lock(&shared.sessions);
        if sessions.get(&client).is_some_and(|current| Arc::ptr_eq(current, &session)) {
            sessions.remove(&client);
        }
    }
    if let Some(task) = writer_task {
        let _ = end_writer.send(reason);
        let _ = tokio::time::timeout(shared.config.limits.keepalive_interval, task).await;
    }
}

/// Checks the channel with the registry and binds the client key's meter
/// to it, resuming from the newest voucher the relay holds or the ledger
/// settled. A refusal comes with its metric label.
async fn open_meter(
    shared: &Shared,
    client: PublicKey,
    channel: ChannelId,
    ip: IpAddr,
) -> Result<Arc<Meter>, (&'static str, Refusal)> {
    // A channel the relay was paid through is looked up on the relay's own
    // ration; any other is a stranger's, rationed per address.
    let stored = shared.store.latest(&channel);
    let class = if stored.is_some() { Class::Known } else { Class::Stranger(ip) };
    // The session resumes from a synced voucher (this one, submitted before
    // the sync), so that the meter's bound on unsynced payment starts true.
    if stored.is_some()
        && let Err(error) = shared.store.sync().await
    {
        tracing::error!(%error, "cannot sync the voucher log");
        let refusal = Refusal::new(CloseReason::Unavailable, "the relay cannot store vouchers");
        return Err(("voucher_log", refusal));
    }
    let view = match shared.lookups.channel(&shared.registry, &channel, class, false).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            let refusal = Refusal::new(CloseReason::BadChannel, "the registry has no such channel");
            return Err(("unknown_channel", refusal));
        }
        Err(error @ LookupError::Busy(_)) => {
            return Err((
                "lookups_busy",
                Refusal::new(CloseReason::Unavailable, error.to_string()),
            ));
        }
        Err(LookupError::Registry(error)) => {
            tracing::warn!(%error, %channel, "cannot check a channel with the registry");
            let refusal =
                Refusal::new(CloseReason::Unavailable, "the relay cannot check the channel now");
            return Err(("registry_unavailable", refusal));
        }
    };
    if view.client != client || view.relay != shared.key.public() {
        let refusal =
            Refusal::new(CloseReason::BadChannel, "the channel is not yours to this relay");
        return Err(("channel", refusal));
    }
    if view.state != "open" {
        let refusal =
            Refusal::new(CloseReason::BadChannel, format!("the channel is {}", view.state));
        return Err(("channel", refusal));
    }
    let (mut paid, mut sequence) = (view.settled, view.last_sequence);
    if let Some(stored) = stored
        && stored.voucher.sequence > sequence
    {
        (paid, sequence) = (stored.voucher.cumulative, stored.voucher.sequence);
    }
    let binding =
        Binding { channel, price: shared.price(), paid, sequence, deposited: view.deposited };
    let limits = &shared.config.limits;
    shared
        .debts
        .meter(client, shared.config.credit_window_bytes, binding, limits.max_debtors)
        .map_err(|_| {
            ("max_debtors", Refusal::new(CloseReason::Limit, "the relay serves too many clients"))
        })
}

async fn refuse(shared: &Shared, writer: &mut OwnedWriteHalf, refusal: Refusal) {
    let close = Frame::Close { reason: refusal.reason, message: refusal.message };
    write_bounded(shared, writer, &close).await;
}

/// Writes one frame within the keepalive interval; false if it failed.
async fn write_bounded(shared: &Shared, writer: &mut OwnedWriteHalf, frame: &Frame) -> bool {
    let limit = shared.config.limits.keepalive_interval;
    matches!(tokio::time::timeout(limit, write_frame(writer, frame)).await, Ok(Ok(())))
}

/// A counted voucher on its way to the disk.
type Syncing = (SignedVoucher, Stored);

/// Reads the client's frames until the session ends; returns why.
async fn read_loop(
    shared: &Shared,
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    session: &Session,
    syncs: Option<&mpsc::Sender<Syncing>>,
) -> CloseReason {
    let silence_limit = shared.config.limits.keepalive_interval * 3;
    let limit = shared.config.limits.keepalive_interval;
    // The newest voucher that passed the checks, stored or still storing:
    // replays are judged against it, not against what is already durable.
    let mut newest = session.meter.as_ref().map_or((Amount::ZERO, 0), |meter| meter.paid());
    let mut closed = session.closed.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    if *shutdown.borrow() {
        return CloseReason::Shutdown;
    }
    if let Some(reason) = *closed.borrow() {
        return reason;
    }
    loop {
        let frame = tokio::select! {
            read = tokio::time::timeout(silence_limit, read_frame(reader)) => match read {
                Err(_) => return CloseReason::Idle,
                Ok(Err(_)) => return CloseReason::Protocol,
                Ok(Ok(frame)) => frame,
            },
            _ = closed.changed() => return closed.borrow().unwrap_or(CloseReason::Normal),
            _ = shutdown.changed() => return CloseReason::Shutdown,
        };
        let answer = match frame {
            Frame::Listen { policy } => {
                *lock(&session.listen) = policy;
                // Applied: the client may now tell its peers to dial.
                Some(Frame::Listening)
            }
            Frame::Reject { tunnel } => {
                crate::tunnel::reject(shared, &session.key, tunnel);
                None
            }
            Frame::Voucher(voucher) => {
                // judge refuses a session without a meter, which has no syncs.
                let judged = match syncs {
                    Some(syncs) => judge(shared, session, &voucher, newest).await.map(|()| syncs),
                    None => Err(VoucherVerdict::WrongChannel),
                };
                match judged {
                    Ok(syncs) => {
                        let stored = if voucher.voucher.cumulative == newest.0 {
                            Stored::nothing_new()
                        } else {
                            match shared.store.submit(voucher).await {
                                Ok(stored) => stored,
                                Err(error) => {
                                    tracing::error!(%error, "cannot store a voucher; ending the session");
                                    return CloseReason::Unavailable;
                                }
                            }
                        };
                        newest = (voucher.voucher.cumulative, voucher.voucher.sequence);
                        // Counted once verified; its sync follows.
                        let v = voucher.voucher;
                        if let Some(meter) = &session.meter
                            && let Some(round_trip) =
                                meter.accept(&v.channel, v.cumulative, v.sequence)
                        {
                            shared.metrics.paid_after(round_trip);
                        }
                        let sent = tokio::time::timeout(limit, syncs.send((voucher, stored))).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            return CloseReason::Protocol;
                        }
                        let verdict = VoucherVerdict::Accepted;
                        shared.metrics.voucher(verdict.label());
                        Some(Frame::VoucherResult { sequence: v.sequence, verdict })
                    }
                    Err(verdict) => {
                        shared.metrics.voucher(verdict.label());
                        Some(Frame::VoucherResult { sequence: voucher.voucher.sequence, verdict })
                    }
                }
            }
            Frame::Ping(value) => Some(Frame::Pong(value)),
            Frame::Pong(_) => None,
            Frame::Close { .. } => return CloseReason::Normal,
            _ => return CloseReason::Protocol,
        };
        if let Some(answer) = answer
            && !matches!(tokio::time::timeout(limit, session.outbox.send(answer)).await, Ok(Ok(())))
        {
            return CloseReason::Protocol;
        }
    }
}

/// Checks a voucher locally (no registry call unless it exceeds the cached
/// escrow) against the session's channel and the `newest` voucher that
/// passed. A voucher that passes counts at once (its sync follows). It passes
/// only if the ledger would settle it: its fields are in the ledger's range
/// (the one rule in `ferry_proto`), it is within the escrow and the
/// channel is open.
async fn judge(
    shared: &Shared,
    session: &Session,
    voucher: &SignedVoucher,
    (newest_paid, newest_sequence): (Amount, u64),
) -> Result<(), VoucherVerdict> {
    let Some(meter) = &session.meter else {
        return Err(VoucherVerdict::WrongChannel);
    };
    let v = &voucher.voucher;
    let channel = meter.binding().channel;
    if v.channel != channel {
        return Err(VoucherVerdict::WrongChannel);
    }
    if voucher.verify(&meter.client).is_err() {
        return Err(VoucherVerdict::Forged);
    }
    if v.check_fields().is_err() {
        return Err(VoucherVerdict::OutOfRange);
    }
    if v.sequence <= newest_sequence {
        return Err(VoucherVerdict::Replayed);
    }
    let look_up = |fresh: bool| async move {
        match shared.lookups.channel(&shared.registry, &channel, Class::Known, fresh).await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, "cannot check a voucher's escrow with the registry");
                None
            }
        }
    };
    let covers = |view: &Option<ChannelView>| {
        view.as_ref().is_some_and(|view| view.state == "open" && v.cumulative <= view.deposited)
    };
    // A lower amount than the newest hands prepayment back: it may not
    // leave the relay more unpaid than its window, nor go below what the
    // ledger settled (looked up afresh; unknown, it is refused).
    let lowering = v.cumulative < newest_paid;
    let mut view = look_up(lowering).await;
    if lowering {
        let settled = view.as_ref().map_or(Amount::MAX, |view| view.settled);
        if v.cumulative < meter.floor().max(settled) {
            return Err(VoucherVerdict::Stale);
        }
    }
    if !covers(&view) {
        view = look_up(true).await;
    }
    if let Some(view) = &view {
        meter.observe_channel(&channel, view.deposited, view.state == "open");
        if view.state != "open" {
            return Err(VoucherVerdict::ChannelClosing);
        }
    }
    if !covers(&view) {
        return Err(VoucherVerdict::OverEscrow);
    }
    Ok(())
}

/// Follows the paying channel's life while the session lasts: every
/// `channel_check_interval` (sooner when a tunnel is held back by the
/// escrow, but at most once a second) it looks the channel up, so a top-up
/// raises the window and a close request ends the session within that
/// interval, after asking for the channel's vouchers to be settled at once:
/// during the dispute window they still pay.
async fn watch_channel(shared: Arc<Shared>, session: Arc<Session>, meter: Arc<Meter>) {
    const MIN_GAP: Duration = Duration::from_secs(1);
    let channel = meter.binding().channel;
    let interval = shared.config.limits.channel_check_interval;
    let mut closed = session.closed.subscribe();
    let mut last_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(last_check + interval) => {}
            () = session.check_channel.notified() => {
                tokio::select! {
                    () = tokio::time::sleep_until(last_check + MIN_GAP) => {}
                    _ = closed.changed() => return,
                }
            }
            _ = closed.changed() => return,
        }
        if closed.borrow().is_some() {
            return;
        }
        last_check = tokio::time::Instant::now();
        let looked_up =
            shared.lookups.channel(&shared.registry, &channel, Class::Known, true).await;
        match looked_up {
            Ok(Some(view)) if view.state == "open" => {
                meter.observe_channel(&channel, view.deposited, true);
            }
            Ok(Some(view)) => {
                meter.observe_channel(&channel, view.deposited, false);
                tracing::info!(%channel, state = view.state, "the channel is closing: settling now");
                shared.settle_now.notify_one();
                session.close(CloseReason::BadChannel);
                return;
            }
            Ok(None) => {
                session.close(CloseReason::BadChannel);
                return;
            }
            Err(error) => tracing::warn!(%error, %channel, "cannot follow a channel's state"),
        }
    }
}

/// Follows each counted voucher, in order, to the disk, and tells the meter
/// what is synced: it carries at most [`crate::meter::MAX_UNSYNCED_BYTES`]
/// beyond that. Ends when the session's reader drops its sender.
async fn follow_syncs(
    session: Arc<Session>,
    meter: Arc<Meter>,
    mut counted: mpsc::Receiver<Syncing>,
) {
    while let Some((voucher, stored)) = counted.recv().await {
        if let Err(error) = stored.durable().await {
            tracing::error!(%error, "cannot store a voucher; ending the session");
            session.close(CloseReason::Unavailable);
            return;
        }
        let v = voucher.voucher;
        meter.synced(&v.channel, v.sequence, v.cumulative);
    }
}

/// Writes the session's frames: queued answers and notices, invoices when a
/// tunnel asks or the invoice timer ticks, and keepalive pings.
async fn write_loop(
    shared: Arc<Shared>,
    mut writer: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<Frame>,
    session: Arc<Session>,
    mut ended: oneshot::Receiver<CloseReason>,
) {
    let limits = &shared.config.limits;
    let mut pings = tokio::time::interval(limits.keepalive_interval);
    let mut invoices =
        tokio::time::interval(limits.invoice_interval.max(Duration::from_millis(10)));
    let mut ping_number = 0u64;
    loop {
        let frame = tokio::select! {
            biased;
            reason = &mut ended => {
                let reason = reason.unwrap_or(CloseReason::Normal);
                let close = Frame::Close { reason, message: String::new() };
                write_bounded(&shared, &mut writer, &close).await;
                return;
            }
            Some(frame) = outbox.recv() => frame,
            () = session.invoice_wanted.notified() => match invoice(&session) {
                Some(frame) => frame,
                None => continue,
            },
            _ = invoices.tick() => match invoice(&session) {
                Some(frame) => frame,
                None => continue,
            },
            _ = pings.tick() => {
                ping_number += 1;
                Frame::Ping(ping_number)
            }
        };
        if !write_bounded(&shared, &mut writer, &frame).await {
            // A client that does not read its session is gone.
            session.close(CloseReason::Protocol);
            return;
        }
    }
}

fn invoice(session: &Session) -> Option<Frame> {
    let due = session.meter.as_ref()?.invoice()?;
    Some(Frame::Invoice { channel: due.channel, carried_bytes: due.carried_bytes, due: due.amount })
}
