//! The per-IP limits behind a proxy: the forwarding header names the client
//! only when the connection comes from a configured trusted proxy, so a
//! client reaching the registry directly cannot choose the address it is
//! limited as, while clients behind a trusted proxy each get their own
//! budget; and a trusted proxy is not held to the per-IP connection bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_api::{ConnectionLimits, Limits, Rate, Transport};
use ferry_proto::http::{ForwardedHeader, TrustedProxies};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);
/// Requests one address may send at once; the rate refills slowly enough
/// that a test never sees a refill.
const BURST: u32 = 3;

fn limits() -> Limits {
    Limits {
        per_ip: Rate { per_sec: 1, burst: BURST },
        connections: ConnectionLimits {
            max_connections_per_ip: 2,
            header_read_timeout: WAIT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    }
}

fn trusting(entries: &[&str], header: ForwardedHeader) -> Transport {
    Transport { tls: None, trusted_proxies: TrustedProxies::new(entries, header).unwrap() }
}

/// The status line of `GET /v1/relays` from `from`, with `header`.
async fn status(registry: &Registry, from: [u8; 4], header: &str) -> String {
    let mut stream = registry.connect_from(from).await;
    let request =
        format!("GET /v1/relays HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or("").to_owned()
}

/// Spends the burst of the address the registry sees for these requests.
async fn spend_burst(registry: &Registry, from: [u8; 4], header: &str) {
    for _ in 0..BURST {
        assert_eq!(status(registry, from, header).await, "HTTP/1.1 200 OK");
    }
    assert_eq!(status(registry, from, header).await, "HTTP/1.1 429 Too Many Requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let registry = Registry::start_serving(
        limits(),
        trusting(&["127.0.0.10"], ForwardedHeader::XForwardedFor),
    )
    .await;
    let proxy = [127, 0, 0, 10];
    spend_burst(&registry, proxy, "X-Forwarded-For: 198.51.100.1\r\n").await;
    // Another client behind the proxy has a budget of its own, whatever
    // the first client wrote to the left of its own address.
    assert_eq!(
        status(&registry, proxy, "X-Forwarded-For: 198.51.100.1, 198.51.100.2\r\n").await,
        "HTTP/1.1 200 OK"
    );
    // The first client cannot escape by claiming another address: the
    // proxy appends the address it saw, and that one is limited.
    assert_eq!(
        status(&registry, proxy, "X-Forwarded-For: 203.0.113.5, 198.51.100.1\r\n").await,
        "HTTP/1.1 429 Too Many Requests"
    );
    // The proxy's own requests (health checks) are its own address's.
    assert_eq!(status(&registry, proxy, "").await, "HTTP/1.1 200 OK");
    // The other header is not read.
    assert_eq!(
        status(&registry, proxy, "Forwarded: for=198.51.100.1\r\n").await,
        "HTTP/1.1 200 OK"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_is_not_a_trusted_proxy_cannot_choose_its_address() {
    let registry =
        Registry::start_serving(limits(), trusting(&["127.0.0.10"], ForwardedHeader::Forwarded))
            .await;
    let direct = [127, 0, 0, 20];
    spend_burst(&registry, direct, "X-Forwarded-For: 198.51.100.1\r\n").await;
    for header in [
        "X-Forwarded-For: 198.51.100.2\r\n",
        "Forwarded: for=198.51.100.3\r\n",
        "X-Real-IP: 198.51.100.4\r\n",
    ] {
        assert_eq!(
            status(&registry, direct, header).await,
            "HTTP/1.1 429 Too Many Requests",
            "{header}"
        );
    }
    // Forwarded (RFC 7239) from the trusted proxy names the client.
    let proxy = [127, 0, 0, 10];
    assert_eq!(
        status(&registry, proxy, "Forwarded: for=\"[2001:db8::1]:4711\";proto=https\r\n").await,
        "HTTP/1.1 200 OK"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_not_held_to_the_per_ip_connection_bound() {
    let registry =
        Registry::start_serving(limits(), trusting(&["127.0.0.10/32"], ForwardedHeader::default()))
            .await;
    // Five idle connections from the proxy, more than the per-IP bound of 2.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(registry.connect_from([127, 0, 0, 10]).await);
    }
    let mut stream = registry.connect_from([127, 0, 0, 10]).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // Another address is held to it.
    let _one = registry.connect_from([127, 0, 0, 30]).await;
    let _two = registry.connect_from([127, 0, 0, 30]).await;
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            if status(&registry, [127, 0, 0, 30], "").await.starts_with("HTTP/1.1 503") {
                return;
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "the third connection of an ordinary address is refused");
    drop(held);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_addresses_of_one_ipv6_64_share_one_budget() {
    let registry = Registry::start_serving(
        limits(),
        trusting(&["127.0.0.10"], ForwardedHeader::XForwardedFor),
    )
    .await;
    let proxy = [127, 0, 0, 10];
    spend_burst(&registry, proxy, "X-Forwarded-For: 2001:db8:1:2::1\r\n").await;
    // Another address of the same /64 is the same client.
    assert_eq!(
        status(&registry, proxy, "X-Forwarded-For: 2001:db8:1:2:abcd::9\r\n").await,
        "HTTP/1.1 429 Too Many Requests"
    );
    // The next /64 is another.
    assert_eq!(
        status(&registry, proxy, "X-Forwarded-For: 2001:db8:1:3::1\r\n").await,
        "HTTP/1.1 200 OK"
    );
    registry.stop().await;
}
