//! A delaying TCP proxy for the distance benchmark: every chunk read from
//! one side is written to the other `one_way` later, in both directions, so
//! a path through it has the round trip of a real distance while its
//! bandwidth stays the machine's. Bounded: at most
//! [`MAX_CONNECTIONS`] connections, and [`MAX_IN_FLIGHT_BYTES`] held per
//! direction of each (a sender beyond it waits, as on a full link).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Connections one proxy carries at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes held in one direction of one connection: 64 MiB carries 1.3 GB/s
/// at 50 ms one way.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// The most read at once.
const CHUNK_BYTES: usize = 64 << 10;

/// A running proxy; it stops when dropped.
pub struct DelayProxy {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// A proxy on 127.0.0.1 to `target`, holding each chunk `one_way`.
    pub async fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&connections).acquire_owned().await else { return };
                let Ok((inbound, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        carry(inbound, outbound, one_way).await;
                    }
                    drop(permit);
                });
            }
        });
        Ok(DelayProxy { address, task })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn carry(inbound: TcpStream, outbound: TcpStream, one_way: Duration) {
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(direction(in_read, out_write, one_way), direction(out_read, in_write, one_way));
}

/// One direction: a reader that stamps chunks, a writer that holds each
/// until its time; the bytes between them are bounded by a semaphore.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, one_way: Duration) {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    // The semaphore bounds the bytes; the queue holds at most one entry per
    // byte of budget, so its own bound never binds first.
    let (chunks, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = {
        let budget = Arc::clone(&budget);
        async move {
            loop {
                let Ok(mut permit) =
                    Arc::clone(&budget).acquire_many_owned(CHUNK_BYTES as u32).await
                else {
                    return;
                };
                let mut chunk = vec![0u8; CHUNK_BYTES];
                let read = match from.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => read,
                };
                chunk.truncate(read);
                // Give back what this read did not use; the rest is given
                // back by the writer once written.
                drop(permit.split(CHUNK_BYTES - read));
                permit.forget();
                if chunks.send((Instant::now() + one_way, chunk)).is_err() {
                    return;
                }
            }
        }
    };
    let writing = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            budget.add_permits(chunk.len());
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_whole_and_late_by_the_delay_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await.unwrap();
        });
        let one_way = Duration::from_millis(30);
        let proxy = DelayProxy::start(target, one_way).await.unwrap();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let started = std::time::Instant::now();
        stream.write_all(&payload).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert!(echoed == payload, "the bytes come back whole and in order");
        assert!(started.elapsed() >= 2 * one_way, "one round trip through the proxy at least");
    }
}
