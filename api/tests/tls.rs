//! The registry serving TLS itself, with certificates made by a throwaway CA:
//! a client that pins the CA is served (signed requests included); a client
//! that trusts the system's roots, another CA, or a certificate for another
//! name refuses it; a handshake that never finishes is cut at the header read
//! timeout; plain HTTP gets no answer; and a refusal beyond the per-IP bound
//! is still a readable JSON 503.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_api::{ConnectionLimits, Limits, Transport};
use ferry_proto::tls::RenewableCertificate;
use ferry_proto::tls::testing::TestCa;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(20);
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// A registry serving TLS with a certificate for `names`, signed by `ca`.
async fn tls_registry(
    ca: &TestCa,
    names: &[&str],
    limits: Limits,
) -> (Registry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let files = ca.server(names, dir.path(), "registry");
    let tls = ferry_proto::tls::server_config(&files.certificate, &files.key).unwrap();
    let registry =
        Registry::start_serving(limits, Transport { tls: Some(tls), ..Transport::default() }).await;
    (registry, dir)
}

fn limits() -> Limits {
    Limits {
        connections: ConnectionLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    }
}

/// An HTTP client trusting only `ca`, or the system's roots.
fn client(ca: Option<&TestCa>) -> reqwest::Client {
    let pinned = ca.map(|ca| {
        let dir = tempfile::tempdir().unwrap();
        let path = ca.write_certificate(&dir.path().join("ca.pem"));
        ferry_proto::tls::read_certificates(&path).unwrap()
    });
    reqwest::Client::builder()
        .timeout(WAIT)
        .tls_backend_preconfigured(ferry_proto::tls::client_config(pinned).unwrap())
        .build()
        .unwrap()
}

/// The error chain of a request that failed, as one string.
async fn refusal(client: &reqwest::Client, url: &str) -> String {
    let error = client.get(url).send().await.expect_err("the request is refused");
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

fn port(registry: &Registry) -> u16 {
    registry.base.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinning_the_registrys_ca_is_served_signed_requests_included() {
    let ca = TestCa::new();
    let (registry, _dir) = tls_registry(&ca, &["localhost"], limits()).await;
    let http = client(Some(&ca));
    let listing = http.get(format!("{}/v1/relays", registry.base)).send().await.unwrap();
    assert_eq!(listing.status(), 200);
    assert!(listing.json::<Value>().await.unwrap()["relays"].is_array());

    // A signed request over TLS: the signature covers the same bytes.
    let me = key(7);
    let call = Call::new("GET", &format!("/v1/accounts/{}", me.public()), None);
    let mut request = http.get(format!("{}{}", registry.base, call.path));
    for (name, value) in call.headers(&me, &me) {
        request = request.header(name, value);
    }
    let answer = request.send().await.unwrap();
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_certificate_it_does_not_trust() {
    let ca = TestCa::new();
    let (registry, _dir) = tls_registry(&ca, &["localhost"], limits()).await;
    let url = format!("{}/healthz", registry.base);

    // The system's roots do not include a test CA.
    let text = refusal(&client(None), &url).await;
    assert!(text.contains("certificate"), "{text}");
    // Another CA, even one with the same name as the registry's.
    let text = refusal(&client(Some(&TestCa::new())), &url).await;
    assert!(text.contains("invalid peer certificate: BadSignature"), "{text}");
    // The right CA, the wrong name: the certificate names localhost, the
    // client asked for 127.0.0.1.
    let by_address = format!("https://127.0.0.1:{}/healthz", port(&registry));
    let text = refusal(&client(Some(&ca)), &by_address).await;
    assert!(text.contains("certificate not valid for name \"127.0.0.1\""), "{text}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_cut_and_plain_http_gets_no_answer() {
    let ca = TestCa::new();
    let (registry, _dir) = tls_registry(&ca, &["localhost"], limits()).await;
    let address = format!("127.0.0.1:{}", port(&registry));

    // Connected, then silent: closed once the header read timeout passes.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&address).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, silent.read_to_end(&mut answer))
        .await
        .expect("a silent connection is closed in time");
    assert!(answer.is_empty());
    assert!(started.elapsed() >= HEADER_READ_TIMEOUT, "closed after the timeout, not before");

    // The first bytes of a ClientHello, then nothing.
    let mut partial = TcpStream::connect(&address).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let _ = tokio::time::timeout(WAIT, partial.read_to_end(&mut answer))
        .await
        .expect("a half-sent handshake is closed in time");

    // Plain HTTP to the TLS port: no HTTP answer (at most a TLS alert).
    let mut plain = TcpStream::connect(&address).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("a plain HTTP request is closed in time");
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));

    // Served all the while.
    let healthz = client(Some(&ca)).get(format!("{}/healthz", registry.base)).send().await;
    assert_eq!(healthz.unwrap().status(), 200);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_per_ip_bound_a_tls_client_reads_a_json_503() {
    let ca = TestCa::new();
    let limits = Limits {
        connections: ConnectionLimits {
            max_connections_per_ip: 1,
            // The first client's kept-alive connection stays for the test.
            header_read_timeout: WAIT,
            ..ConnectionLimits::default()
        },
        ..Limits::default()
    };
    let (registry, _dir) = tls_registry(&ca, &["localhost"], limits).await;
    let url = format!("{}/healthz", registry.base);
    // The first client keeps its connection open in its pool.
    let first = client(Some(&ca));
    assert_eq!(first.get(&url).send().await.unwrap().status(), 200);
    let answer = client(Some(&ca)).get(&url).send().await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["code"], "too_many_connections", "{body}");
    drop(first);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let files = old_ca.server(&["localhost"], dir.path(), "registry");
    // Checked at every handshake, so the test need not wait for a timer.
    let certificate =
        RenewableCertificate::load(&files.certificate, &files.key, Duration::ZERO).unwrap();
    let tls = ferry_proto::tls::server_config_for(certificate).unwrap();
    let registry =
        Registry::start_serving(limits(), Transport { tls: Some(tls), ..Transport::default() })
            .await;
    let url = format!("{}/healthz", registry.base);
    let status = |ca: &TestCa| {
        let request = client(Some(ca)).get(&url).send();
        async move { request.await.map(|answer| answer.status().as_u16()).map_err(|_| ()) }
    };
    assert_eq!(status(&old_ca).await, Ok(200));

    // Renewed the way certbot does: new files moved over the old ones.
    let renewed = new_ca.server(&["localhost"], dir.path(), "renewed");
    std::fs::rename(&renewed.certificate, &files.certificate).unwrap();
    std::fs::rename(&renewed.key, &files.key).unwrap();
    assert_eq!(status(&new_ca).await, Ok(200));
    assert_eq!(status(&old_ca).await, Err(()), "the old certificate is no longer served");

    // A broken renewal (a key that is not the certificate's) leaves the
    // current certificate in use.
    let stray = old_ca.server(&["localhost"], dir.path(), "stray");
    std::fs::rename(&stray.key, &files.key).unwrap();
    assert_eq!(status(&new_ca).await, Ok(200));
    registry.stop().await;
}

#[test]
fn unusable_certificate_files_are_refused_with_the_reason() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let one = ca.server(&["localhost"], dir.path(), "one");
    let other = ca.server(&["localhost"], dir.path(), "other");
    // A key that is not the certificate's.
    let error = ferry_proto::tls::server_config(&one.certificate, &other.key).unwrap_err();
    assert!(error.to_string().contains("key"), "{error}");
    // A missing file, a file with no certificate.
    let missing = dir.path().join("missing.pem");
    let error = ferry_proto::tls::server_config(&missing, &one.key).unwrap_err();
    assert!(error.to_string().contains("missing.pem"), "{error}");
    let error = ferry_proto::tls::read_certificates(&one.key).unwrap_err();
    assert!(error.to_string().contains("holds no PEM certificate"), "{error}");
    // A key file where the certificate should be, and the other way round.
    assert!(ferry_proto::tls::server_config(&one.key, &one.certificate).is_err());
}
