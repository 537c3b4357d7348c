//! Serving an axum router with every connection bounded: in number (in total
//! and per client IP address) and in time (the wait for a request's headers).
//! The registry's API and a relay's metrics port both serve through here, so
//! neither can be starved by connections that never finish a request.
//!
//! HTTP/1.1 only: hyper's header read timeout covers both a request that is
//! never finished and a kept-alive connection that sends nothing more, since
//! its timer starts whenever the connection waits for the next request's head.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::admission::{ACCEPT_ERROR_PAUSE, Admission};
pub use crate::admission::{ConnectionObserver, Refusal};

/// Refusals being written at once; beyond it a refused connection is closed
/// without an answer.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long writing one refusal may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The bounds on a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; more are refused with 503.
    pub max_connections: usize,
    /// Connections one client IP address may hold open at once; more are
    /// refused with 503.
    pub max_connections_per_ip: usize,
    /// How long a connection may take to send a request's headers, counted
    /// from when it opened or its previous response was sent: a connection
    /// idle for this long, or one dribbling a header, is closed.
    pub header_read_timeout: Duration,
    /// How long requests in flight may finish once shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 10_000,
            max_connections_per_ip: 256,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes,
/// then lets the requests in flight finish (at most `shutdown_grace`).
/// Handlers see the client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    observer: Arc<dyn ConnectionObserver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip, observer);
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, why).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            app.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A connection's errors (a client that went away, a header
            // timeout) are the client's; they end only that connection.
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended");
            }
            drop(admitted);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after the shutdown grace were cut off");
    }
    Ok(())
}

/// Answers a refused connection with 503 and closes it, within
/// [`REFUSAL_WRITE_TIMEOUT`].
async fn refuse(mut stream: TcpStream, why: Refusal) {
    let scope = match why {
        Refusal::Total => "the server",
        Refusal::PerIp => "this address",
    };
    let body = format!(
        "{{\"code\":\"too_many_connections\",\"message\":\"{scope} holds as many connections as allowed; close some or retry later\"}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
