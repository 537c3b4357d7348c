//! The API's contract at its boundary, tried as a fuzzer would: every error
//! is `{code, message}` JSON with its documented status, metrics labels take
//! a bounded set of values whatever methods and paths arrive, a declared
//! body above the limit is refused before it is sent, every body refuses
//! unknown fields, and every value has exactly one text form. Nothing a
//! refused request carries changes the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_api::Limits;
use ferry_proto::{ChannelId, HomeRelays, RelayAdvert, Voucher};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// One raw HTTP/1.1 request (`Connection: close`); the status line's code,
/// the headers (lowercase names) and the body.
async fn raw(registry: &Registry, head: &str) -> (u16, Vec<(String, String)>, String) {
    let address = registry.base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the registry answers and closes in time");
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|line| line.split(' ').nth(1)).unwrap_or("0");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status.parse().unwrap_or(0), headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
}

/// Asserts that an error answer is JSON `{code, message}` with `status` and
/// `code`; returns the message.
fn assert_error(
    what: &str,
    (status, headers, body): &(u16, Vec<(String, String)>, String),
    expected: (u16, &str),
) -> String {
    assert_eq!(
        header(headers, "content-type"),
        Some("application/json"),
        "{what}: not JSON: {status} {body}"
    );
    let value: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {body}"));
    assert_eq!((*status, value["code"].as_str()), (expected.0, Some(expected.1)), "{what}: {body}");
    let message = value["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no message: {body}");
    message.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_its_documented_status() {
    let registry = Registry::start().await;
    let someone = key(1).public();
    let cases: Vec<(String, u16, &str)> = vec![
        ("GET /nowhere HTTP/1.1".into(), 404, "not_found"),
        ("GET /v1/relays/%FF%FE HTTP/1.1".into(), 400, "invalid_key"),
        ("GET /v1/relays/ABC HTTP/1.1".into(), 400, "invalid_key"),
        ("GET /v1/channels/%C3%28 HTTP/1.1".into(), 400, "invalid_channel"),
        ("GET /v1/clients/%80/home-relays HTTP/1.1".into(), 400, "invalid_key"),
        ("DELETE /v1/relays HTTP/1.1".into(), 405, "method_not_allowed"),
        ("PUT /healthz HTTP/1.1".into(), 405, "method_not_allowed"),
        ("POST /v1/market HTTP/1.1\r\nContent-Length: 0".into(), 405, "method_not_allowed"),
        ("GET /v1/relays?limit=0 HTTP/1.1".into(), 400, "page_size"),
        ("GET /v1/relays?limit=501 HTTP/1.1".into(), 400, "page_size"),
        ("GET /v1/relays?unknown=1 HTTP/1.1".into(), 400, "invalid_query"),
        ("GET /v1/relays?min_reputation=NaN HTTP/1.1".into(), 400, "invalid_query"),
        (format!("GET /v1/accounts/{someone} HTTP/1.1"), 401, "unsigned"),
    ];
    for (head, status, code) in &cases {
        let answer = raw(&registry, head).await;
        assert_error(head, &answer, (*status, code));
        if *status == 405 {
            assert!(header(&answer.1, "allow").is_some(), "{head}: 405 names what is allowed");
        }
    }
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_has_one_text_form_and_errors_name_the_broken_bound() {
    let registry = Registry::start().await;
    let client = key(1);
    // Integers in queries: no sign, no leading zero, within their range.
    let statement = format!("/v1/accounts/{}/statement", client.public());
    let queries = [
        "/v1/relays?limit=+5".to_owned(),
        "/v1/relays?limit=05".to_owned(),
        "/v1/relays?limit=-1".to_owned(),
        "/v1/relays?limit=99999999999".to_owned(),
        "/v1/relays?region=%00".to_owned(),
        "/v1/relays?region=EU".to_owned(),
        "/v1/relays?region=".to_owned(),
        format!("/v1/relays?region={}", "a".repeat(33)),
        format!("{statement}?before=-1"),
        format!("{statement}?before=0"),
        format!("{statement}?before=+1"),
        format!("{statement}?before=9223372036854775808"),
    ];
    for path in &queries {
        let answer = raw(&registry, &format!("GET {path} HTTP/1.1")).await;
        assert_error(path, &answer, (400, "invalid_query"));
    }
    // The region's error says the region rule; the price's names the
    // price's maximum, not the amount's.
    let region = raw(&registry, "GET /v1/relays?region=%00 HTTP/1.1").await;
    let message = assert_error("region", &region, (400, "invalid_query"));
    assert!(message.contains("region must be 1 to 32"), "{message}");
    let price = raw(&registry, "GET /v1/relays?max_price=1.5 HTTP/1.1").await;
    let message = assert_error("price", &price, (400, "invalid_query"));
    assert!(message.contains("maximum of 1 per byte"), "{message}");
    let huge =
        raw(&registry, &format!("GET /v1/relays?max_price={} HTTP/1.1", "9".repeat(30))).await;
    let message = assert_error("huge price", &huge, (400, "invalid_query"));
    assert!(message.contains("maximum of 1 per byte"), "{message}");
    // The canonical forms are served.
    for path in ["/v1/relays?limit=5&region=eu-west".to_owned(), format!("{statement}?before=1")] {
        let call = Call::new("GET", &path, None);
        let (status, body) = call.send(&registry.base, &client).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // The signed timestamp: whole seconds, no sign, no leading zero.
    let balance = format!("/v1/accounts/{}", client.public());
    for form in ["+{now}", "0{now}", "{now}.0", "{now}s"] {
        let call = Call::new("GET", &balance, None);
        let mut headers = call.headers(&client, &client);
        let timestamp = headers.iter_mut().find(|(name, _)| *name == "ferry-timestamp").unwrap();
        timestamp.1 = form.replace("{now}", &call.timestamp.to_string());
        let (status, body) = call.send_with(&registry.base, &headers).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("bad_timestamp")),
            "{form}: {body}"
        );
    }
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_above_the_limit_is_refused_at_once() {
    // A request timeout far beyond the wait below: the refusal must not
    // come from it.
    let registry = Registry::start_with(Limits {
        max_body_bytes: 1024,
        request_timeout: Duration::from_secs(600),
        ..Limits::default()
    })
    .await;
    let address = registry.base.strip_prefix("http://").unwrap();
    for path in ["/v1/channels", "/v1/settlements", "/v1/market"] {
        let mut stream = TcpStream::connect(address).await.unwrap();
        // The headers only: the body never comes.
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("413 comes at once, not after the request timeout")
            .unwrap();
        let answer = parse_answer(&answer[..read]);
        let message = assert_error(path, &answer, (413, "body_too_large"));
        assert!(message.contains("maximum of 1024 bytes"), "{message}");
    }
    // At the limit the body is read (and judged on its merits).
    let (status, body) = Call::new("POST", "/v1/channels", Some(json!({ "x": "y".repeat(900) })))
        .idempotent("o")
        .send(&registry.base, &key(1))
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")));
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    let registry = Registry::start().await;
    let client = reqwest::Client::new();
    for i in 0..300u32 {
        let method = reqwest::Method::from_bytes(format!("M{i:04}X").as_bytes()).unwrap();
        let url = format!("{}/v1/relays", registry.base);
        let _ = tokio::time::timeout(WAIT, client.request(method, url).send()).await.unwrap();
        let url = format!("{}/random/{i}/path-{}", registry.base, i * 7919);
        let _ = tokio::time::timeout(WAIT, client.get(url).send()).await.unwrap();
    }
    let metrics =
        tokio::time::timeout(WAIT, client.get(format!("{}/metrics", registry.base)).send())
            .await
            .unwrap()
            .unwrap()
            .text()
            .await
            .unwrap();
    let series: Vec<&str> =
        metrics.lines().filter(|line| line.starts_with("ferry_http_requests_total{")).collect();
    assert!(series.len() <= 4, "{} request series:\n{}", series.len(), series.join("\n"));
    assert!(
        series.iter().any(|line| line.contains(r#"method="other""#) && line.ends_with(" 300")),
        "made-up methods fold into one value:\n{}",
        series.join("\n")
    );
    assert!(
        series.iter().any(|line| line.contains(r#"route="unmatched""#) && line.ends_with(" 300")),
        "unmatched paths fold into one value:\n{}",
        series.join("\n")
    );
    let durations = metrics
        .lines()
        .filter(|line| line.starts_with("ferry_http_request_duration_seconds_count"));
    assert!(durations.count() <= 3, "route labels stay bounded");
    assert!(metrics.len() < 64 * 1024, "/metrics is {} bytes", metrics.len());
    registry.stop().await;
}

/// Every body type the API reads, each with a field `extra` added at one
/// object (named by a JSON pointer): the envelope and what it wraps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_refuses_unknown_fields_and_changes_nothing() {
    let registry = Registry::start().await;
    let (client, relay) = (key(1), key(2));
    register_relay(&registry, &relay).await;
    let (_, registered) = Call::new("GET", &format!("/v1/relays/{}", relay.public()), None)
        .send(&registry.base, &relay)
        .await;
    let (status, _) = Call::new(
        "POST",
        &format!("/v1/accounts/{}/deposits", client.public()),
        Some(json!({ "amount": "10" })),
    )
    .idempotent("d")
    .send(&registry.base, &operator())
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = Call::new(
        "POST",
        "/v1/channels",
        Some(json!({ "relay": relay.public().to_string(), "nonce": 1, "amount": "5" })),
    )
    .idempotent("open")
    .send(&registry.base, &client)
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let channel = ChannelId::derive(&client.public(), &relay.public(), 1);
    let voucher =
        json!(Voucher { channel, sequence: 1, cumulative: "1".parse().unwrap() }.sign(&client));
    let now_ms = now() * 1000;
    let advert = json!(
        RelayAdvert {
            relay: relay.public(),
            address: "127.0.0.1:7000".into(),
            price_per_byte: "0.000000001".parse().unwrap(),
            credit_window_bytes: 1 << 20,
            capacity_bytes_per_sec: 10 << 20,
            region: "eu-west".into(),
            protocol_version: 1,
            issued_at_ms: now_ms,
        }
        .sign(&relay)
    );
    let home = json!(
        HomeRelays {
            client: client.public(),
            relays: vec![relay.public()],
            direct_address: None,
            issued_at_ms: now_ms,
        }
        .sign(&client)
    );
    let gateway = operator();
    let deposit = format!("/v1/accounts/{}/deposits", client.public());
    let withdraw = format!("/v1/accounts/{}/withdrawals", client.public());
    let cases: Vec<(&str, String, &ferry_proto::SecretKey, Value, &str)> = vec![
        ("POST", deposit, &gateway, json!({ "amount": "1" }), ""),
        ("POST", withdraw, &client, json!({ "amount": "1" }), ""),
        (
            "POST",
            "/v1/channels".into(),
            &client,
            json!({ "relay": relay.public().to_string(), "nonce": 2, "amount": "1" }),
            "",
        ),
        ("POST", format!("/v1/channels/{channel}/top-ups"), &client, json!({ "amount": "1" }), ""),
        ("POST", "/v1/settlements".into(), &relay, json!({ "vouchers": [voucher] }), "/vouchers/0"),
        (
            "POST",
            format!("/v1/channels/{channel}/relay-close"),
            &relay,
            json!({ "final_voucher": voucher }),
            "",
        ),
        (
            "POST",
            format!("/v1/channels/{channel}/relay-close"),
            &relay,
            json!({ "final_voucher": voucher }),
            "/final_voucher",
        ),
        ("PUT", format!("/v1/relays/{}/advert", relay.public()), &relay, advert.clone(), ""),
        ("PUT", format!("/v1/relays/{}/advert", relay.public()), &relay, advert, "/advert"),
        (
            "POST",
            format!("/v1/relays/{}/heartbeats", relay.public()),
            &relay,
            json!({ "load_bytes_per_sec": 1, "sessions": 1 }),
            "",
        ),
        ("PUT", format!("/v1/clients/{}/home-relays", client.public()), &client, home.clone(), ""),
        ("PUT", format!("/v1/clients/{}/home-relays", client.public()), &client, home, "/home"),
    ];
    let transfers = registry.ledger.check().await.unwrap().transfers;
    let balances = (
        registry.ledger.balance(&client.public()).await.unwrap(),
        registry.ledger.balance(&relay.public()).await.unwrap(),
    );
    for (i, (method, path, signer, mut body, at)) in cases.into_iter().enumerate() {
        body.pointer_mut(at).unwrap().as_object_mut().unwrap().insert("extra".into(), json!(1));
        let (status, answer) = Call::new(method, &path, Some(body))
            .idempotent(&format!("unknown-{i}"))
            .send(&registry.base, signer)
            .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_body")),
            "{method} {path} with an unknown field at {at:?}: {answer}"
        );
        assert!(answer["message"].as_str().unwrap().contains("unknown field"), "{answer}");
    }
    let report = registry.ledger.check().await.unwrap();
    assert_eq!(report.transfers, transfers, "a refused body moved money");
    assert!(report.is_ok(), "{:#?}", report.violations);
    assert_eq!(
        (
            registry.ledger.balance(&client.public()).await.unwrap(),
            registry.ledger.balance(&relay.public()).await.unwrap(),
        ),
        balances
    );
    let (status, page) = Call::new("GET", &format!("/v1/relays/{}", relay.public()), None)
        .send(&registry.base, &relay)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["advert"], registered["advert"], "the registered advert was replaced");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_states_the_exact_form_of_every_parameter() {
    let registry = Registry::start().await;
    let url = format!("{}/openapi.json", registry.base);
    let doc: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
            for parameter in parameters {
                let name = parameter["name"].as_str().unwrap();
                let schema = &parameter["schema"];
                let what = format!("{method} {path} {name}: {schema}");
                let pattern = schema["pattern"].as_str();
                match name {
                    "key" | "id" => assert_eq!(pattern, Some("^[0-9a-f]{64}$"), "{what}"),
                    "Idempotency-Key" => {
                        assert_eq!(pattern, Some("^[A-Za-z0-9._:-]{1,64}$"), "{what}")
                    }
                    "region" => assert_eq!(pattern, Some("^[a-z0-9-]{1,32}$"), "{what}"),
                    "limit" => {
                        let maximum = if path.ends_with("/statement") { 1000 } else { 500 };
                        assert_eq!(
                            (schema["minimum"].as_u64(), schema["maximum"].as_u64()),
                            (Some(1), Some(maximum)),
                            "{what}"
                        );
                    }
                    "before" => {
                        assert_eq!(
                            (schema["minimum"].as_u64(), schema["maximum"].as_u64()),
                            (Some(1), Some(i64::MAX as u64)),
                            "{what}"
                        );
                    }
                    _ => continue,
                }
                checked += 1;
            }
        }
    }
    // 15 keys or ids, 8 idempotency keys, 2 limits, a region and a before.
    assert_eq!(checked, 27, "every such parameter was found and checked");
    let schemas = &doc["components"]["schemas"];
    let version = &schemas["RelayAdvert"]["properties"]["protocol_version"];
    assert_eq!(version["maximum"].as_u64(), Some(u64::from(u16::MAX)), "{version}");
    let sequence = &schemas["Voucher"]["properties"]["sequence"];
    assert_eq!(
        (sequence["minimum"].as_u64(), sequence["maximum"].as_u64()),
        (Some(1), Some(i64::MAX as u64)),
        "{sequence}"
    );
    registry.stop().await;
}
