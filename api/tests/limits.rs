//! The registry's bounds over a real listener: rate limits per IP and per
//! key, the request timeout against a body that never finishes, and the
//! Prometheus metrics that count them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_api::{Limits, Rate};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UNLIMITED: Rate = Rate { per_sec: 0, burst: 0 };

async fn get(registry: &Registry, path: &str) -> reqwest::Response {
    let request = reqwest::get(format!("{}{path}", registry.base));
    tokio::time::timeout(Duration::from_secs(30), request).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_rate_gets_429_with_retry_after() {
    let registry =
        Registry::start_with(Limits { per_ip: Rate { per_sec: 1, burst: 5 }, ..Limits::default() })
            .await;
    // The burst is admitted; the first refusal comes soon after (bounded, as
    // a slow machine may refill a token or two meanwhile).
    let mut admitted = 0;
    let refused = loop {
        let response = get(&registry, "/v1/market").await;
        if response.status() != StatusCode::OK {
            break response;
        }
        admitted += 1;
        assert!(admitted < 50, "no refusal after 50 requests");
    };
    assert!(admitted >= 5, "the burst of 5 is admitted: {admitted}");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Health checks and scrapes from the same address have a budget of
    // their own: the instance does not look unhealthy to a busy address.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&registry, path).await.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(get(&registry, "/v1/market").await.status(), StatusCode::TOO_MANY_REQUESTS);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_and_forgeries_do_not_spend_its_budget() {
    let registry = Registry::start_with(Limits {
        per_ip: UNLIMITED,
        per_key: Rate { per_sec: 1, burst: 3 },
        ..Limits::default()
    })
    .await;
    let (client, mallory) = (key(1), key(2));
    let balance = format!("/v1/accounts/{}", client.public());
    // Mallory claims the client's key but cannot sign for it: refused as a
    // forgery (401), and the client's budget is untouched.
    for _ in 0..10 {
        let call = Call::new("GET", &balance, None);
        let (status, _) = call.send_with(&registry.base, &call.headers(&mallory, &client)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let mut admitted = 0;
    let (status, body) = loop {
        let (status, body) = Call::new("GET", &balance, None).send(&registry.base, &client).await;
        if status != StatusCode::OK {
            break (status, body);
        }
        admitted += 1;
        assert!(admitted < 50, "no refusal after 50 requests");
    };
    assert!(admitted >= 3, "the burst of 3 is admitted: {admitted}");
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    // Another key from the same address is not affected.
    let other = key(3);
    let path = format!("/v1/accounts/{}", other.public());
    assert_eq!(Call::new("GET", &path, None).send(&registry.base, &other).await.0, StatusCode::OK);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_is_cut_off_at_the_request_timeout() {
    let registry = Registry::start_with(Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let address = registry.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    // Promise 100 bytes and send 10: the signed-request extractor waits for
    // the rest until the timeout answers for it.
    let request = format!(
        "POST /v1/settlements HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\nferry-key: {}\r\nferry-timestamp: {}\r\n\
         ferry-nonce: {}\r\nferry-signature: {}\r\nconnection: close\r\n\r\n{{\"vouchers\"",
        key(1).public(),
        now(),
        "00".repeat(16),
        "00".repeat(64),
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("the registry answers a stalled body within its timeout")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_refusals_and_the_market() {
    let registry = Registry::start_with(Limits {
        per_key: Rate { per_sec: 1, burst: 1 },
        ..Limits::default()
    })
    .await;
    let client = key(1);
    let balance = format!("/v1/accounts/{}", client.public());
    for _ in 0..3 {
        Call::new("GET", &balance, None).send(&registry.base, &client).await;
    }
    get(&registry, "/v1/relays?limit=0").await;
    let response = get(&registry, "/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for expected in [
        "ferry_http_requests_total{route=\"/v1/accounts/{key}\",method=\"GET\",status=\"200\"} 1",
        "ferry_http_requests_total{route=\"/v1/accounts/{key}\",method=\"GET\",status=\"429\"} 2",
        "ferry_http_requests_total{route=\"/v1/relays\",method=\"GET\",status=\"400\"} 1",
        "ferry_rate_limited_total{scope=\"key\"} 2",
        "ferry_relays{state=\"registered\"} 0",
        "ferry_channels{state=\"open\"} 0",
        "ferry_http_request_duration_seconds_bucket{",
    ] {
        assert!(text.contains(expected), "metrics lack {expected}:\n{text}");
    }
    registry.stop().await;
}
