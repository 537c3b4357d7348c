//! Serving an axum router with every connection bounded: in number (in total
//! and per client IP address) and in time (the wait for a request's headers,
//! and for a TLS handshake). The registry's API and a relay's metrics port
//! both serve through here, so neither can be starved by connections that
//! never finish a request.
//!
//! HTTP/1.1 only: hyper's header read timeout covers both a request that is
//! never finished and a kept-alive connection that sends nothing more, since
//! its timer starts whenever the connection waits for the next request's head.

mod forwarded;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::admission::{ACCEPT_ERROR_PAUSE, Admission};
pub use crate::admission::{ConnectionObserver, Refusal};
pub use forwarded::{
    ClientIp, ForwardedHeader, MAX_FORWARDED_HOPS, MAX_TRUSTED_PROXIES, TrustedProxies,
    TrustedProxiesError,
};

/// Refusals being written at once; beyond it a refused connection is closed
/// without an answer.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long writing one refusal may take, a TLS handshake included.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// idle for this long, or one dribbling a header, is closed. Over TLS
    /// the handshake has this long too, and the headers this long again.
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

/// How clients reach a server.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// When set, the server speaks only TLS, with this configuration
    /// (`crate::tls::server_config`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Proxies whose forwarding header names the client. They are exempt
    /// from the per-IP connection bound (their clients' connections all
    /// come from them) but not from the total.
    pub trusted_proxies: TrustedProxies,
}

/// Serves `app` on `listener` within `limits`, as `transport` says, until
/// `shutdown` completes, then lets the requests in flight finish (at most
/// `shutdown_grace`). Handlers see the TCP peer as
/// `ConnectInfo<SocketAddr>` and the client's address as [`ClientIp`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    transport: Transport,
    observer: Arc<dyn ConnectionObserver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip, observer);
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let tls = transport.tls.map(TlsAcceptor::from);
    let proxies = transport.trusted_proxies;
    // Every connection's task, so that those still running after the
    // shutdown grace can be cut off. Finished ones are reaped as the loop
    // goes, so the set holds at most the open connections.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
        let admitted = if proxies.contains(peer.ip()) {
            admission.admit_proxy(peer.ip())
        } else {
            admission.admit(peer.ip())
        };
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(why) => {
                if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                            match tls {
                                None => refuse(stream, why).await,
                                Some(tls) => {
                                    if let Ok(stream) = tls.accept(stream).await {
                                        refuse(stream, why).await;
                                    }
                                }
                            }
                        })
                        .await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let proxies = proxies.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let client = proxies.client_ip(peer, request.headers());
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.extensions_mut().insert(client);
            app.clone().oneshot(request)
        });
        let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        connections.spawn(async move {
            // A connection's errors (a client that went away, a header
            // timeout, a failed handshake) are the client's; they end only
            // that connection.
            let ended = match tls {
                None => serve_connection(stream, &http, watcher, service).await,
                Some(tls) => {
                    match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, &http, watcher, service).await,
                        Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                        Err(_) => Err("TLS handshake timed out".to_owned()),
                    }
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, %peer, "connection ended");
            }
            drop(admitted);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after the shutdown grace were cut off");
    }
    connections.abort_all();
    Ok(())
}

/// Serves HTTP/1.1 on one connection until it ends or shutdown ends it.
async fn serve_connection<I, S>(
    io: I,
    http: &hyper::server::conn::http1::Builder,
    watcher: Watcher,
    service: S,
) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    watcher.watch(http.serve_connection(TokioIo::new(io), service)).await.map_err(|e| e.to_string())
}

/// The most of a refused connection's request head that is read before its
/// 503 is written.
const MAX_REFUSED_HEAD_BYTES: usize = 8 << 10;

/// Answers a refused connection with 503 and closes it; the caller bounds
/// the time. The request's head is read first (up to
/// [`MAX_REFUSED_HEAD_BYTES`]): an HTTP client that receives an answer
/// before it has sent its request takes it for a broken connection, not a
/// refusal.
async fn refuse(mut stream: impl AsyncRead + AsyncWrite + Unpin, why: Refusal) {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while head.len() < MAX_REFUSED_HEAD_BYTES && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
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
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}
