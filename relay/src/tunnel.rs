//! Tunnels: a caller's connection paired with its peer's acceptance, then
//! raw bytes copied both ways, every byte metered against the caller's
//! channel. The caller pays for both directions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::PublicKey;
use ferry_proto::wire::io::write_frame;
use ferry_proto::wire::{CloseReason, DialFailure, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::meter::Meter;
use crate::metrics::Held;
use crate::server::{Shared, lock};
use crate::session::Session;

/// The most bytes one read of a tunnel takes (and reserves from the
/// caller's allowance) at a time.
pub const COPY_BUFFER: usize = 64 * 1024;

/// A dial waiting for its peer to accept.
#[derive(Debug)]
pub(crate) struct Pending {
    callee: PublicKey,
    deliver: oneshot::Sender<Result<TcpStream, DialFailure>>,
}

/// Counts a tunnel against its caller and the relay until dropped.
struct TunnelSlot<'a> {
    shared: &'a Shared,
    session: &'a Session,
}

impl<'a> TunnelSlot<'a> {
    fn take(shared: &'a Shared, session: &'a Session) -> Option<TunnelSlot<'a>> {
        let limits = &shared.config.limits;
        if session.tunnels.fetch_add(1, Ordering::AcqRel) >= limits.tunnels_per_client {
            session.tunnels.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if shared.tunnels.fetch_add(1, Ordering::AcqRel) >= limits.max_tunnels {
            shared.tunnels.fetch_sub(1, Ordering::AcqRel);
            session.tunnels.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TunnelSlot { shared, session })
    }
}

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        self.session.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.shared.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn fail(shared: &Shared, stream: &mut TcpStream, reason: DialFailure) {
    shared.metrics.refused(reason.label());
    let limit = shared.config.limits.handshake_timeout;
    let _ = tokio::time::timeout(limit, write_frame(stream, &Frame::DialFailed { reason })).await;
}

/// The caller's side: find the peer, ask it, wait for its acceptance, then
/// carry bytes until either side ends.
pub(crate) async fn dial(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    caller: PublicKey,
    peer: PublicKey,
) {
    let Some(session) = shared.session(&caller) else {
        return fail(&shared, &mut stream, DialFailure::NotPaid).await;
    };
    let Some(meter) = session.meter.clone() else {
        return fail(&shared, &mut stream, DialFailure::NotPaid).await;
    };
    let Some(_slot) = TunnelSlot::take(&shared, &session) else {
        return fail(&shared, &mut stream, DialFailure::OverCapacity).await;
    };
    let Some(callee) = shared.session(&peer) else {
        return fail(&shared, &mut stream, DialFailure::UnknownPeer).await;
    };
    if !callee.allows(&caller) {
        return fail(&shared, &mut stream, DialFailure::Rejected).await;
    }
    let tunnel = shared.next_tunnel.fetch_add(1, Ordering::Relaxed);
    let (deliver, delivered) = oneshot::channel();
    lock(&shared.pending).insert(tunnel, Pending { callee: peer, deliver });
    if callee.outbox.try_send(Frame::Incoming { tunnel, caller }).is_err() {
        lock(&shared.pending).remove(&tunnel);
        return fail(&shared, &mut stream, DialFailure::OverCapacity).await;
    }
    let mut far = match tokio::time::timeout(shared.config.limits.pairing_timeout, delivered).await
    {
        Ok(Ok(Ok(far))) => far,
        Ok(Ok(Err(reason))) => return fail(&shared, &mut stream, reason).await,
        Ok(Err(_)) | Err(_) => {
            lock(&shared.pending).remove(&tunnel);
            return fail(&shared, &mut stream, DialFailure::Timeout).await;
        }
    };
    let limit = shared.config.limits.handshake_timeout;
    for (end, other) in [(&mut stream, peer), (&mut far, caller)] {
        let connected = Frame::Connected { tunnel, peer: other };
        if !matches!(tokio::time::timeout(limit, write_frame(end, &connected)).await, Ok(Ok(()))) {
            return;
        }
    }
    let _held = Held::new(&shared.metrics.tunnels);
    let reason = carry(&shared, &session, &meter, stream, far).await;
    if reason != CloseReason::Normal {
        let _ = session.outbox.try_send(Frame::TunnelClosed { tunnel, reason });
    }
}

/// The peer's side: hand this connection to the waiting dial.
pub(crate) async fn accept(
    shared: &Shared,
    mut stream: TcpStream,
    acceptor: PublicKey,
    tunnel: u64,
) {
    let pending = {
        let mut pending = lock(&shared.pending);
        match pending.get(&tunnel) {
            Some(waiting) if waiting.callee == acceptor => pending.remove(&tunnel),
            _ => None,
        }
    };
    match pending {
        Some(pending) => {
            // If the dial gave up meanwhile, the connection is dropped.
            let _ = pending.deliver.send(Ok(stream));
        }
        None => {
            shared.metrics.refused("unknown_tunnel");
            let close = Frame::Close {
                reason: CloseReason::Protocol,
                message: "no tunnel with this id waits for you".into(),
            };
            let limit = shared.config.limits.handshake_timeout;
            let _ = tokio::time::timeout(limit, write_frame(&mut stream, &close)).await;
        }
    }
}

/// The peer refused `tunnel` on its control session.
pub(crate) fn reject(shared: &Shared, callee: &PublicKey, tunnel: u64) {
    let mut pending = lock(&shared.pending);
    if pending.get(&tunnel).is_some_and(|waiting| waiting.callee == *callee)
        && let Some(waiting) = pending.remove(&tunnel)
    {
        let _ = waiting.deliver.send(Err(DialFailure::Rejected));
    }
}

/// Copies both ways until both sides finish, a side fails, the caller's
/// session ends, payment stops, or the tunnel idles out; returns why.
async fn carry(
    shared: &Shared,
    session: &Session,
    meter: &Meter,
    caller: TcpStream,
    callee: TcpStream,
) -> CloseReason {
    let started = Instant::now();
    let last_activity_ms = AtomicU64::new(0);
    let (caller_read, caller_write) = caller.into_split();
    let (callee_read, callee_write) = callee.into_split();
    let pump = |from, to, direction| Pump {
        shared,
        session,
        meter,
        started,
        last_activity_ms: &last_activity_ms,
        direction,
        from,
        to,
    };
    let up = pump(caller_read, callee_write, "caller_to_callee").run();
    let down = pump(callee_read, caller_write, "callee_to_caller").run();
    let mut closed = session.closed.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    if closed.borrow().is_some() {
        return CloseReason::Normal;
    }
    let both = async {
        tokio::pin!(up, down);
        // A direction that finishes normally half-closes and the other goes
        // on; one that fails (unpaid, idle, broken) ends the tunnel.
        let (first, up_first) = tokio::select! {
            reason = &mut up => (reason, true),
            reason = &mut down => (reason, false),
        };
        if first != CloseReason::Normal {
            return first;
        }
        if up_first { down.await } else { up.await }
    };
    tokio::select! {
        reason = both => reason,
        _ = closed.changed() => CloseReason::Normal,
        _ = shutdown.changed() => CloseReason::Shutdown,
    }
}

/// One direction of a tunnel.
struct Pump<'a> {
    shared: &'a Shared,
    session: &'a Session,
    meter: &'a Meter,
    started: Instant,
    last_activity_ms: &'a AtomicU64,
    direction: &'static str,
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
}

impl Pump<'_> {
    async fn run(mut self) -> CloseReason {
        let mut buffer = vec![0u8; COPY_BUFFER];
        let idle = self.shared.config.limits.tunnel_idle_timeout;
        let grace = self.shared.config.limits.payment_grace;
        loop {
            // Bytes are reserved only once there is something to read, so
            // a quiet direction holds none of the caller's window.
            match tokio::time::timeout(idle, self.from.readable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return CloseReason::Protocol,
                // Quiet this way: idle only if the other way is too.
                Err(_) if self.idle_for() >= idle => return CloseReason::Idle,
                Err(_) => continue,
            }
            let granted = self.meter.reserve(COPY_BUFFER as u64);
            if granted == 0 {
                // The credit window is used: stop reading (backpressure),
                // bill what was carried, and wait for a voucher.
                self.shared.metrics.throttled.inc();
                self.session.invoice_wanted.notify_one();
                if self.meter.escrow_bound() {
                    self.session.check_channel.notify_one();
                }
                if !self.meter.wait_for_allowance(grace).await {
                    return CloseReason::NotPaid;
                }
                continue;
            }
            // COPY_BUFFER fits usize; granted ≤ COPY_BUFFER.
            let count = match self.from.try_read(&mut buffer[..granted as usize]) {
                Ok(count) => count,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    self.meter.commit(granted, 0);
                    continue;
                }
                Err(_) => {
                    self.meter.commit(granted, 0);
                    return CloseReason::Protocol;
                }
            };
            if self.meter.commit(granted, count as u64) {
                self.session.invoice_wanted.notify_one();
            }
            if count == 0 {
                // The sender finished: pass the half-close on.
                let _ = self.to.shutdown().await;
                return CloseReason::Normal;
            }
            self.touch();
            // A receiver that stops reading holds the tunnel at most the
            // idle time.
            match tokio::time::timeout(idle, self.to.write_all(&buffer[..count])).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return CloseReason::Protocol,
                Err(_) => return CloseReason::Idle,
            }
            self.shared.metrics.carried(self.direction, count as u64);
            // Tasks this one woke (the session writer that sends invoices,
            // the tasks that take vouchers) run on this thread only when
            // it yields; a busy tunnel would otherwise carry on until its
            // window is used up before the invoice even leaves.
            tokio::task::yield_now().await;
        }
    }

    fn touch(&self) {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}
