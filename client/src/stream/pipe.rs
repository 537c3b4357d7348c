//! The buffers between the application's [`Stream`](super::Stream) and
//! its connection task, shared under one lock.
//!
//! The application's writes are copied once, straight into encoded data
//! records (a type byte, then the data) that the connection task sends and
//! keeps for resending as they are; received records are kept as the
//! slices of the decrypted buffers they arrived in until the application's
//! reads copy them out. So each side copies a byte once between the
//! application and the cipher.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;

use super::{DATA, DATA_CHUNK_BYTES};

/// Data bytes the application may have written and its connection task
/// not yet taken.
pub const APP_BUFFER_BYTES: usize = 256 << 10;
/// Bytes received and not yet read by the application; while it is full
/// the connection stops reading the link (TCP backpressure reaches the
/// peer), but keeps sending acknowledgements and keepalives.
pub const RECEIVE_BUFFER_BYTES: usize = 1 << 20;

/// How the application's reading ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReadEnd {
    /// The peer ended the stream: reads end after the buffered bytes.
    Finished,
    /// The connection failed, for this reason.
    Failed(String),
}

#[derive(Debug, Default)]
struct Shared {
    /// Encoded data records the application wrote, oldest first; only
    /// the last may still grow. Their data is at most [`APP_BUFFER_BYTES`].
    outgoing: VecDeque<BytesMut>,
    outgoing_bytes: usize,
    /// The application shut its writing down.
    write_ended: bool,
    /// The application dropped its stream.
    app_gone: bool,
    /// The application's write waiting for room.
    writer: Option<Waker>,
    /// Received data, oldest first: at most about
    /// [`RECEIVE_BUFFER_BYTES`], as the task stops reading while it is
    /// full.
    incoming: VecDeque<Bytes>,
    incoming_bytes: usize,
    read_end: Option<ReadEnd>,
    /// The connection task ended: writes fail.
    task_ended: bool,
    /// The application's read waiting for data.
    reader: Option<Waker>,
}

/// What a connection task takes from the application at once.
#[derive(Debug, Default)]
pub(super) struct Taken {
    /// Encoded data records, in order.
    pub records: Vec<Bytes>,
    /// The application ended its writing, or dropped its stream, and
    /// these are its last records.
    pub ended: bool,
}

/// One stream's shared buffers and the connection task's wake-up.
#[derive(Debug, Default)]
pub(super) struct Pipe {
    shared: Mutex<Shared>,
    /// Woken when the application wrote, read from a full buffer, ended
    /// its writing or left.
    task: Notify,
}

impl Pipe {
    pub(super) fn new() -> Arc<Pipe> {
        Arc::new(Pipe::default())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic under this lock leaves counts that are still consistent
        // (each update is a few lines without calls out), so a poisoned
        // lock is taken as it is.
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the application did something the task must see.
    pub(super) async fn changed(&self) {
        self.task.notified().await;
    }

    /// Takes the application's records, oldest first, while `room` data
    /// bytes allow (at least one record when there is any room).
    pub(super) fn take(&self, mut room: u64) -> Taken {
        let mut shared = self.lock();
        let mut taken = Taken::default();
        while room > 0 {
            let Some(record) = shared.outgoing.pop_front() else { break };
            let data_bytes = record.len() - 1;
            shared.outgoing_bytes -= data_bytes;
            room = room.saturating_sub(data_bytes as u64);
            taken.records.push(record.freeze());
        }
        taken.ended = (shared.write_ended || shared.app_gone) && shared.outgoing.is_empty();
        let writer = if taken.records.is_empty() { None } else { shared.writer.take() };
        drop(shared);
        if let Some(writer) = writer {
            writer.wake();
        }
        taken
    }

    /// Whether received data is below [`RECEIVE_BUFFER_BYTES`].
    pub(super) fn has_receive_room(&self) -> bool {
        self.lock().incoming_bytes < RECEIVE_BUFFER_BYTES
    }

    /// Hands received data to the application; false if it left.
    pub(super) fn deliver(&self, data: Bytes) -> bool {
        let mut shared = self.lock();
        if shared.app_gone {
            return false;
        }
        shared.incoming_bytes += data.len();
        shared.incoming.push_back(data);
        let reader = shared.reader.take();
        drop(shared);
        if let Some(reader) = reader {
            reader.wake();
        }
        true
    }

    /// Ends the application's reads (after what is buffered), the first
    /// time only; with `task_ended`, its writes too.
    pub(super) fn end(&self, end: ReadEnd, task_ended: bool) {
        let mut shared = self.lock();
        shared.read_end.get_or_insert(end);
        shared.task_ended |= task_ended;
        let wakers = [shared.reader.take(), shared.writer.take()];
        drop(shared);
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    /// Copies what the application wrote into records.
    pub(super) fn poll_write(
        &self,
        cx: &mut Context<'_>,
        mut data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut shared = self.lock();
        if shared.task_ended || shared.write_ended {
            return Poll::Ready(Err(ended(&shared)));
        }
        let room = APP_BUFFER_BYTES - shared.outgoing_bytes;
        if room == 0 {
            shared.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        data = &data[..data.len().min(room)];
        let written = data.len();
        while !data.is_empty() {
            if shared.outgoing.back().is_none_or(|last| last.len() > DATA_CHUNK_BYTES) {
                // Sized for this write: a small write makes a small
                // record, and a record kept for resending holds no more
                // memory than its bytes.
                let mut record = BytesMut::with_capacity(1 + data.len().min(DATA_CHUNK_BYTES));
                record.put_u8(DATA);
                shared.outgoing.push_back(record);
            }
            let Some(record) = shared.outgoing.back_mut() else { break };
            let part = data.len().min(1 + DATA_CHUNK_BYTES - record.len());
            if record.capacity() - record.len() < part {
                // A record that keeps growing is bulk: room for a whole one.
                record.reserve(1 + DATA_CHUNK_BYTES - record.len());
            }
            record.extend_from_slice(&data[..part]);
            shared.outgoing_bytes += part;
            data = &data[part..];
        }
        drop(shared);
        self.task.notify_one();
        Poll::Ready(Ok(written))
    }

    /// The application ends its writing.
    pub(super) fn shut_down(&self) -> std::io::Result<()> {
        let mut shared = self.lock();
        if shared.task_ended && !shared.write_ended {
            return Err(ended(&shared));
        }
        shared.write_ended = true;
        drop(shared);
        self.task.notify_one();
        Ok(())
    }

    /// Copies received data into `buf`.
    pub(super) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut shared = self.lock();
        if shared.incoming.is_empty() {
            return match &shared.read_end {
                None => {
                    shared.reader = Some(cx.waker().clone());
                    Poll::Pending
                }
                Some(ReadEnd::Finished) => Poll::Ready(Ok(())),
                Some(ReadEnd::Failed(reason)) => Poll::Ready(Err(aborted(reason))),
            };
        }
        let was_full = shared.incoming_bytes >= RECEIVE_BUFFER_BYTES;
        while buf.remaining() > 0 {
            let Some(front) = shared.incoming.front_mut() else { break };
            let part = front.len().min(buf.remaining());
            buf.put_slice(&front[..part]);
            if part == front.len() {
                shared.incoming.pop_front();
            } else {
                let _ = front.split_to(part);
            }
            shared.incoming_bytes -= part;
        }
        let room_again = was_full && shared.incoming_bytes < RECEIVE_BUFFER_BYTES;
        drop(shared);
        if room_again {
            self.task.notify_one();
        }
        Poll::Ready(Ok(()))
    }

    /// The application dropped its stream.
    pub(super) fn leave(&self) {
        let mut shared = self.lock();
        shared.app_gone = true;
        shared.incoming.clear();
        shared.incoming_bytes = 0;
        drop(shared);
        self.task.notify_one();
    }
}

/// The error of a read or write on a connection that failed for `reason`.
fn aborted(reason: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, reason.to_owned())
}

/// The error of a write after the stream ended.
fn ended(shared: &Shared) -> std::io::Error {
    match &shared.read_end {
        Some(ReadEnd::Failed(reason)) => aborted(reason),
        _ => std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the stream's writing ended"),
    }
}
