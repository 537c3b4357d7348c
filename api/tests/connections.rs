//! The registry's connection bounds over raw sockets: a request that never
//! finishes its headers and an idle kept-alive connection are closed after
//! the header read timeout; connections beyond the per-IP or the total bound
//! are refused at once with 503, while other addresses are served.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_api::{ConnectionLimits, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait here is bounded by this, well above the test timeouts below.
const WAIT: Duration = Duration::from_secs(20);
/// The header read timeout of these tests' registries.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(500);

async fn registry(max_connections: usize, max_connections_per_ip: usize) -> Registry {
    Registry::start_with(Limits {
        connections: ConnectionLimits {
            max_connections,
            max_connections_per_ip,
            header_read_timeout: HEADER_READ_TIMEOUT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    })
    .await
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    // A reset after the answer is a close too.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection in time");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A connection that has sent part of a request's headers and nothing more.
async fn dangling(registry: &Registry, from: [u8; 4]) -> TcpStream {
    let mut stream = registry.connect_from(from).await;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    stream
}

async fn healthz_from(registry: &Registry, from: [u8; 4]) -> String {
    let mut stream = registry.connect_from(from).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_until_closed(&mut stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_finishes_its_headers_and_an_idle_connection_are_closed() {
    let registry = registry(100, 100).await;
    let mut partial = dangling(&registry, [127, 0, 0, 1]).await;
    assert_eq!(read_until_closed(&mut partial).await, "", "closed without an answer");

    // A kept-alive connection that goes quiet after its answer.
    let mut idle = registry.connect_from([127, 0, 0, 1]).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = read_until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Dribbling a byte at a time does not extend the deadline.
    let mut dribble = registry.connect_from([127, 0, 0, 1]).await;
    dribble.set_nodelay(true).unwrap();
    let dribbling = async {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" {
            if dribble.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    // The header takes 3 s to dribble: the registry closes the connection
    // long before, and a write after the close fails.
    let cut = tokio::time::timeout(WAIT, dribbling).await.unwrap();
    assert!(cut, "the dribbling connection was closed before its header was complete");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_an_addresss_bound_are_refused_and_others_are_served() {
    const PER_IP: usize = 8;
    let registry = Registry::start_with(Limits {
        connections: ConnectionLimits {
            max_connections: 100,
            max_connections_per_ip: PER_IP,
            // Long enough that the held connections stay for the test.
            header_read_timeout: WAIT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..PER_IP {
        held.push(dangling(&registry, [127, 0, 0, 2]).await);
    }
    // The registry counts a connection once it has accepted it: the next
    // one from that address is refused at once, with a JSON 503.
    let refusal = tokio::time::timeout(WAIT, async {
        loop {
            let answer = healthz_from(&registry, [127, 0, 0, 2]).await;
            if !answer.starts_with("HTTP/1.1 200") {
                return answer;
            }
        }
    })
    .await
    .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("\"code\":\"too_many_connections\""), "{refusal}");
    assert!(refusal.contains("content-type: application/json"), "{refusal}");
    // Another address is served meanwhile.
    assert!(healthz_from(&registry, [127, 0, 0, 3]).await.starts_with("HTTP/1.1 200"));
    // Closing them frees the address's places.
    drop(held);
    let served = tokio::time::timeout(WAIT, async {
        loop {
            if healthz_from(&registry, [127, 0, 0, 2]).await.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(served.is_ok(), "the address is served again once its connections closed");
    let metrics = healthz_or_metrics(&registry).await;
    assert!(metrics.contains("ferry_connections_refused_total{scope=\"per_ip\"}"), "{metrics}");
    registry.stop().await;
}

async fn healthz_or_metrics(registry: &Registry) -> String {
    reqwest::get(format!("{}/metrics", registry.base)).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_total_bound_are_refused() {
    const TOTAL: usize = 6;
    let registry = Registry::start_with(Limits {
        connections: ConnectionLimits {
            max_connections: TOTAL,
            max_connections_per_ip: TOTAL,
            header_read_timeout: WAIT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    })
    .await;
    let mut held = Vec::new();
    for from in 0..TOTAL as u8 {
        held.push(dangling(&registry, [127, 0, 1, from + 1]).await);
    }
    let refusal = tokio::time::timeout(WAIT, async {
        loop {
            let answer = healthz_from(&registry, [127, 0, 2, 1]).await;
            if !answer.starts_with("HTTP/1.1 200") {
                return answer;
            }
        }
    })
    .await
    .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("the server holds as many connections"), "{refusal}");
    drop(held);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_after_the_shutdown_grace_are_cut_off() {
    use axum::routing::get;
    // A handler that says it started, then never answers.
    let entered = std::sync::Arc::new(tokio::sync::Notify::new());
    let started = std::sync::Arc::clone(&entered);
    let app = axum::Router::new().route(
        "/stuck",
        get(move || async move {
            started.notify_one();
            std::future::pending::<&'static str>().await
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = ConnectionLimits {
        shutdown_grace: Duration::from_millis(200),
        ..ConnectionLimits::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ferry_proto::http::serve(
        listener,
        app,
        limits,
        ferry_proto::http::Transport::default(),
        std::sync::Arc::new(()),
        async {
            let _ = stopped.await;
        },
    ));
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::timeout(WAIT, entered.notified()).await.expect("the handler runs");
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, server)
        .await
        .expect("serve returns after the grace")
        .unwrap()
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
}
