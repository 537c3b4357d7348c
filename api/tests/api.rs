//! The registry API over a real listener and a real Postgres: every endpoint's
//! success, and each bad input refused with the right status while nothing
//! changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ferry_proto::{ChannelId, Voucher};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn deposit(
    registry: &Registry,
    to: &ferry_proto::SecretKey,
    amount: &str,
    idem: &str,
) -> (StatusCode, Value) {
    Call::new(
        "POST",
        &format!("/v1/accounts/{}/deposits", to.public()),
        Some(json!({ "amount": amount })),
    )
    .idempotent(idem)
    .send(&registry.base, &operator())
    .await
}

/// The public `GET /v1/market`.
async fn market_totals(registry: &Registry) -> Value {
    let answer = reqwest::get(format!("{}/v1/market", registry.base)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    answer.json().await.unwrap()
}

async fn available(registry: &Registry, who: &ferry_proto::SecretKey) -> String {
    let (status, body) = Call::new("GET", &format!("/v1/accounts/{}", who.public()), None)
        .send(&registry.base, who)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["available"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let registry = Registry::start().await;
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let response = client.get(format!("{}{path}", registry.base)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let missing = client.get(format!("{}/v1/nothing", registry.base)).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_the_registry_serves() {
    let registry = Registry::start().await;
    let client = reqwest::Client::new();
    let doc: Value = client
        .get(format!("{}/openapi.json", registry.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path} documents no success"
            );
            if path.starts_with("/v1/") {
                assert!(
                    responses.contains_key("400") && responses.contains_key("429"),
                    "{method} {path}"
                );
            }
            // Every documented route is served: with placeholder parameters
            // it may be refused, but never as an unknown path.
            let concrete = path
                .replace("{key}", &key(1).public().to_string())
                .replace("{id}", &"ab".repeat(32));
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = client
                .request(method.clone(), format!("{}{concrete}", registry.base))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert!(
                !body.contains("\"not_found\""),
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
    assert_eq!(operations, 22, "every endpoint is documented");
    for schema in
        ["SignedAdvert", "SignedHomeRelays", "ChannelInfo", "SettlementOutcome", "ErrorBody"]
    {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema} has no schema");
    }
    assert_eq!(doc["components"]["schemas"]["PublicKey"]["pattern"], "^[0-9a-f]{64}$");
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.push(target);
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    for target in found {
        let name = target.trim_start_matches("#/components/schemas/");
        assert!(doc["components"]["schemas"][name].is_object(), "{target} does not resolve");
    }
    let list = &doc["paths"]["/v1/relays"]["get"]["parameters"];
    assert!(list.as_array().unwrap().iter().all(|p| p["in"] == "query"), "{list}");
    let ui = client.get(format!("{}/docs/", registry.base)).send().await.unwrap();
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await.unwrap().contains("swagger"), "the browsable UI is served");
    // The relay explorer and its assets, with a policy that allows only its own.
    for (path, content_type) in
        [("/", "text/html"), ("/assets/app.js", "text/javascript"), ("/assets/app.css", "text/css")]
    {
        let page = client.get(format!("{}{path}", registry.base)).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::OK, "{path}");
        let headers = page.headers();
        assert!(headers["content-type"].to_str().unwrap().starts_with(content_type), "{path}");
        assert!(headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_lives_through_the_api() {
    let registry = Registry::start().await;
    let (client, relay) = (key(1), key(2));
    register_relay(&registry, &relay).await;
    let (status, receipt) = deposit(&registry, &client, "100", "d1").await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["balance"], "100");

    let (status, channel) = Call::new(
        "POST",
        "/v1/channels",
        Some(json!({ "relay": relay.public().to_string(), "nonce": 7, "amount": "40" })),
    )
    .idempotent("open")
    .send(&registry.base, &client)
    .await;
    assert_eq!(status, StatusCode::CREATED, "{channel}");
    let id: ChannelId = channel["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id, ChannelId::derive(&client.public(), &relay.public(), 7));

    let (status, topped) =
        Call::new("POST", &format!("/v1/channels/{id}/top-ups"), Some(json!({ "amount": "10" })))
            .idempotent("top")
            .send(&registry.base, &client)
            .await;
    assert_eq!(status, StatusCode::OK, "{topped}");
    assert_eq!(topped["deposited"], "50");

    let vouchers: Vec<_> = [(1, "10"), (2, "25")]
        .iter()
        .map(|(sequence, cumulative)| {
            Voucher { channel: id, sequence: *sequence, cumulative: cumulative.parse().unwrap() }
                .sign(&client)
        })
        .collect();
    let (status, settled) =
        Call::new("POST", "/v1/settlements", Some(json!({ "vouchers": vouchers })))
            .idempotent("settle")
            .send(&registry.base, &relay)
            .await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["outcomes"][1]["outcome"], "settled");
    assert_eq!(settled["outcomes"][1]["paid"], "14.85");
    let totals = market_totals(&registry).await;
    assert_eq!(
        (&totals["open_channels"], &totals["in_escrow"], &totals["settled"], &totals["fees"]),
        (&json!(1), &json!("25"), &json!("25"), &json!("0.25")),
        "{totals}"
    );
    assert_eq!(totals["deposited"], "100");

    for reader in [&client, &relay] {
        let (status, read) = Call::new("GET", &format!("/v1/channels/{id}"), None)
            .send(&registry.base, reader)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read["settled"], "25");
    }
    let (status, _) =
        Call::new("GET", &format!("/v1/channels/{id}"), None).send(&registry.base, &key(9)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let last =
        Voucher { channel: id, sequence: 3, cumulative: "30".parse().unwrap() }.sign(&client);
    let (status, closed) = Call::new(
        "POST",
        &format!("/v1/channels/{id}/relay-close"),
        Some(json!({ "final_voucher": last })),
    )
    .idempotent("close")
    .send(&registry.base, &relay)
    .await;
    assert_eq!(status, StatusCode::OK, "{closed}");
    assert_eq!(
        (closed["state"].as_str(), closed["refunded"].as_str()),
        (Some("closed"), Some("20"))
    );
    assert_eq!(available(&registry, &client).await, "70");
    assert_eq!(available(&registry, &relay).await, "29.7");

    let (status, statement) =
        Call::new("GET", &format!("/v1/accounts/{}/statement?limit=2", relay.public()), None)
            .send(&registry.base, &relay)
            .await;
    assert_eq!(status, StatusCode::OK, "{statement}");
    assert_eq!(statement["entries"].as_array().unwrap().len(), 2);
    assert!(statement["next_before"].is_number());

    for owner in [&client, &relay] {
        let path = format!("/v1/accounts/{}/channels", owner.public());
        let (status, listed) = Call::new("GET", &path, None).send(&registry.base, owner).await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let channels = listed["channels"].as_array().unwrap();
        assert_eq!(channels.len(), 1);
        assert_eq!(
            (channels[0]["id"].as_str(), channels[0]["state"].as_str()),
            (Some(id.to_string().as_str()), Some("closed"))
        );
    }
    let path = format!("/v1/accounts/{}/channels", client.public());
    let (status, _) = Call::new("GET", &path, None).send(&registry.base, &key(9)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "another key's channels are private");

    let (status, withdrawn) = Call::new(
        "POST",
        &format!("/v1/accounts/{}/withdrawals", relay.public()),
        Some(json!({ "amount": "29.7" })),
    )
    .idempotent("w")
    .send(&registry.base, &relay)
    .await;
    assert_eq!(status, StatusCode::OK, "{withdrawn}");
    assert_eq!(withdrawn["balance"], "0");
    let totals = market_totals(&registry).await;
    assert_eq!(
        (&totals["open_channels"], &totals["in_escrow"], &totals["settled"], &totals["deposited"]),
        (&json!(0), &json!("0"), &json!("30"), &json!("70.3")),
        "{totals}"
    );
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_who_uses_the_gateways_idempotency_key_first_does_not_block_its_deposit() {
    let registry = Registry::start().await;
    let (holder, other) = (key(1), key(2));
    let (status, receipt) = deposit(&registry, &holder, "10", "gateway-1").await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    // The holder guesses the key the gateway will use for its next deposit
    // and spends it on a withdrawal of its own.
    let (status, withdrawn) = Call::new(
        "POST",
        &format!("/v1/accounts/{}/withdrawals", holder.public()),
        Some(json!({ "amount": "1" })),
    )
    .idempotent("gateway-2")
    .send(&registry.base, &holder)
    .await;
    assert_eq!(status, StatusCode::OK, "{withdrawn}");
    // The key lives in the signer's namespace: the gateway's deposit goes in.
    let (status, receipt) = deposit(&registry, &holder, "5", "gateway-2").await;
    assert_eq!((status, &receipt["balance"]), (StatusCode::OK, &json!("14")), "{receipt}");
    // A retry replays the first answer and moves nothing; the same key for
    // another holder is another request of the same signer: a conflict.
    assert_eq!(deposit(&registry, &holder, "5", "gateway-2").await, (StatusCode::OK, receipt));
    let (status, refused) = deposit(&registry, &other, "5", "gateway-2").await;
    assert_eq!((status, &refused["code"]), (StatusCode::CONFLICT, &json!("idempotency_conflict")));
    assert_eq!(available(&registry, &holder).await, "14");
    assert_eq!(available(&registry, &other).await, "0");
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_settlement_is_counted_once_by_the_metrics() {
    let registry = Registry::start().await;
    let (client, relay) = (key(1), key(2));
    register_relay(&registry, &relay).await;
    assert_eq!(deposit(&registry, &client, "10", "d1").await.0, StatusCode::OK);
    let (status, channel) = Call::new(
        "POST",
        "/v1/channels",
        Some(json!({ "relay": relay.public().to_string(), "nonce": 1, "amount": "10" })),
    )
    .idempotent("open")
    .send(&registry.base, &client)
    .await;
    assert_eq!(status, StatusCode::CREATED, "{channel}");
    let id: ChannelId = channel["id"].as_str().unwrap().parse().unwrap();
    let settlement = |sequence: u64, cumulative: &str, idem: &str| {
        let voucher = Voucher { channel: id, sequence, cumulative: cumulative.parse().unwrap() }
            .sign(&client);
        Call::new("POST", "/v1/settlements", Some(json!({ "vouchers": [voucher] })))
            .idempotent(idem)
    };
    // Two real settlements, each retried (as a relay does after a lost
    // answer), and a voucher settled before under a new key.
    for (sequence, cumulative, idem) in [(1, "1", "s1"), (2, "3", "s2")] {
        for _ in 0..3 {
            let (status, answer) =
                settlement(sequence, cumulative, idem).send(&registry.base, &relay).await;
            assert_eq!(
                (status, &answer["outcomes"][0]["outcome"]),
                (StatusCode::OK, &json!("settled"))
            );
        }
    }
    let (status, answer) = settlement(2, "3", "s3").send(&registry.base, &relay).await;
    assert_eq!(
        (status, &answer["outcomes"][0]["outcome"]),
        (StatusCode::OK, &json!("already_settled"))
    );
    let text =
        reqwest::get(format!("{}/metrics", registry.base)).await.unwrap().text().await.unwrap();
    let count = |outcome: &str| {
        let series = format!("ferry_settlement_vouchers_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |value| value.trim().parse::<u64>().unwrap())
    };
    // The ledger settled two vouchers; the metric says two.
    let settled_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE kind = 'settlement' AND channel_id = $1",
    )
    .bind(id.as_bytes().as_slice())
    .fetch_one(registry.ledger.pool())
    .await
    .unwrap();
    assert_eq!(count("settled"), settled_rows as u64, "{text}");
    assert_eq!((count("settled"), count("replayed"), count("already_settled")), (2, 4, 1));
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_finalized_by_anyone_after_the_window() {
    let registry = Registry::start().await;
    let (client, relay, stranger) = (key(1), key(2), key(3));
    register_relay(&registry, &relay).await;
    deposit(&registry, &client, "10", "d").await;
    let (_, channel) = Call::new(
        "POST",
        "/v1/channels",
        Some(json!({ "relay": relay.public().to_string(), "nonce": 1, "amount": "10" })),
    )
    .idempotent("open")
    .send(&registry.base, &client)
    .await;
    let id = channel["id"].as_str().unwrap().to_owned();
    let (status, closing) = Call::new("POST", &format!("/v1/channels/{id}/close-request"), None)
        .idempotent("c")
        .send(&registry.base, &client)
        .await;
    assert_eq!((status, closing["state"].as_str()), (StatusCode::OK, Some("closing")));
    let (status, closed) = Call::new("POST", &format!("/v1/channels/{id}/finalize"), None)
        .idempotent("f")
        .send(&registry.base, &stranger)
        .await;
    assert_eq!((status, closed["state"].as_str()), (StatusCode::OK, Some("closed")), "{closed}");
    assert_eq!(available(&registry, &client).await, "10");
    registry.assert_invariants().await;
    registry.stop().await;
}

/// Runs `call` signed by `signer` and asserts it is refused with `status` and
/// `code`, and that nobody's money moved.
async fn refused(
    registry: &Registry,
    call: Call,
    signer: &ferry_proto::SecretKey,
    status: StatusCode,
    code: &str,
) {
    let watched = [key(1), key(2)];
    let mut before = Vec::new();
    for who in &watched {
        before.push(registry.ledger.balance(&who.public()).await.unwrap());
    }
    let transfers = registry.ledger.check().await.unwrap().transfers;
    let (got, body) = call.send(&registry.base, signer).await;
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    for (who, was) in watched.iter().zip(before) {
        assert_eq!(registry.ledger.balance(&who.public()).await.unwrap(), was);
    }
    let report = registry.ledger.check().await.unwrap();
    assert_eq!(report.transfers, transfers, "a refused request moved money");
    assert!(report.is_ok(), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_precisely_and_change_nothing() {
    let registry = Registry::start().await;
    let (client, relay) = (key(1), key(2));
    deposit(&registry, &client, "10", "d").await;
    let withdraw = |amount: Value| {
        Call::new(
            "POST",
            &format!("/v1/accounts/{}/withdrawals", client.public()),
            Some(json!({ "amount": amount })),
        )
        .idempotent("w")
    };
    use StatusCode as S;
    // Amounts: negative, too precise, too large, not a string, too much.
    refused(&registry, withdraw(json!("-1")), &client, S::BAD_REQUEST, "invalid_body").await;
    refused(
        &registry,
        withdraw(json!("0.0000000000000000001")),
        &client,
        S::BAD_REQUEST,
        "invalid_body",
    )
    .await;
    refused(&registry, withdraw(json!("10000000001")), &client, S::BAD_REQUEST, "invalid_body")
        .await;
    refused(&registry, withdraw(json!(1.5)), &client, S::BAD_REQUEST, "invalid_body").await;
    refused(&registry, withdraw(json!("0")), &client, S::UNPROCESSABLE_ENTITY, "zero_amount").await;
    refused(
        &registry,
        withdraw(json!("11")),
        &client,
        S::UNPROCESSABLE_ENTITY,
        "insufficient_balance",
    )
    .await;
    // Keys: malformed in the path; someone else's account.
    refused(
        &registry,
        Call::new("POST", "/v1/accounts/XYZ/withdrawals", Some(json!({ "amount": "1" })))
            .idempotent("w"),
        &client,
        S::BAD_REQUEST,
        "invalid_key",
    )
    .await;
    refused(&registry, withdraw(json!("1")), &relay, S::FORBIDDEN, "forbidden").await;
    // Only the operator deposits.
    refused(
        &registry,
        Call::new(
            "POST",
            &format!("/v1/accounts/{}/deposits", client.public()),
            Some(json!({ "amount": "5" })),
        )
        .idempotent("d2"),
        &client,
        S::FORBIDDEN,
        "forbidden",
    )
    .await;
    // A missing idempotency key; an unknown field; an unknown channel.
    refused(
        &registry,
        Call::new(
            "POST",
            &format!("/v1/accounts/{}/withdrawals", client.public()),
            Some(json!({ "amount": "1" })),
        ),
        &client,
        S::BAD_REQUEST,
        "missing_idempotency_key",
    )
    .await;
    refused(
        &registry,
        withdraw(json!({ "amount": "1", "extra": true })),
        &client,
        S::BAD_REQUEST,
        "invalid_body",
    )
    .await;
    // A channel to a key no relay registered: its escrow would be locked
    // for the dispute window for nothing. It is refused before the ledger
    // is touched, and the same open succeeds once the relay registers.
    let open = || {
        Call::new(
            "POST",
            "/v1/channels",
            Some(json!({ "relay": relay.public().to_string(), "nonce": 3, "amount": "1" })),
        )
        .idempotent("open-unregistered")
    };
    refused(&registry, open(), &client, S::UNPROCESSABLE_ENTITY, "not_a_relay").await;
    register_relay(&registry, &relay).await;
    let (status, body) = open().send(&registry.base, &client).await;
    assert_eq!(status, S::CREATED, "{body}");
    let unknown = ChannelId::from_bytes([5; 32]);
    refused(
        &registry,
        Call::new(
            "POST",
            &format!("/v1/channels/{unknown}/top-ups"),
            Some(json!({ "amount": "1" })),
        )
        .idempotent("t"),
        &client,
        S::NOT_FOUND,
        "unknown_channel",
    )
    .await;
    refused(
        &registry,
        Call::new("GET", "/v1/channels/nothex", None),
        &client,
        S::BAD_REQUEST,
        "invalid_channel",
    )
    .await;
    // Page size too large.
    refused(
        &registry,
        Call::new("GET", &format!("/v1/accounts/{}/statement?limit=1001", client.public()), None),
        &client,
        S::BAD_REQUEST,
        "page_size",
    )
    .await;
    // The same idempotency key for a different request.
    let (status, _) = withdraw(json!("1")).send(&registry.base, &client).await;
    assert_eq!(status, S::OK);
    refused(&registry, withdraw(json!("2")), &client, S::CONFLICT, "idempotency_conflict").await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_replayed_signatures_are_refused() {
    let registry = Registry::start().await;
    let (client, mallory) = (key(1), key(2));
    deposit(&registry, &client, "10", "d").await;
    let path = format!("/v1/accounts/{}/withdrawals", client.public());
    let call = || Call::new("POST", &path, Some(json!({ "amount": "1" }))).idempotent("w");
    let balance_before = available(&registry, &client).await;

    // Mallory signs, claiming to be the client.
    let forged = call();
    let (status, body) = forged.send_with(&registry.base, &forged.headers(&mallory, &client)).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));

    // A valid signature over another body.
    let signed = call();
    let mut altered = Call::new("POST", &path, Some(json!({ "amount": "5" }))).idempotent("w");
    altered.nonce = signed.nonce;
    let (status, body) = altered.send_with(&registry.base, &signed.headers(&client, &client)).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));

    // Too old and too far ahead.
    for timestamp in [now() - 301, now() + 301] {
        let mut stale = call();
        stale.timestamp = timestamp;
        let (status, body) = stale.send(&registry.base, &client).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("stale_timestamp"))
        );
    }

    // Unsigned, and with malformed headers.
    let (status, body) = call().send_with(&registry.base, &[]).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unsigned")));
    let bad = call();
    let mut headers = bad.headers(&client, &client);
    headers[0].1 = "not-a-key".into();
    let (status, body) = bad.send_with(&registry.base, &headers).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_key")));
    assert_eq!(available(&registry, &client).await, balance_before);

    // The first send works; the very same request again is a replay.
    let once = call();
    let headers = once.headers(&client, &client);
    let (status, _) = once.send_with(&registry.base, &headers).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = once.send_with(&registry.base, &headers).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_nonce")));
    assert_eq!(available(&registry, &client).await, "9");

    // A retry with a new nonce and the same idempotency key replays the answer.
    let (status, body) = call().send(&registry.base, &client).await;
    assert_eq!((status, body["balance"].as_str()), (StatusCode::OK, Some("9")));
    assert_eq!(available(&registry, &client).await, "9");
    registry.assert_invariants().await;
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused() {
    let registry = Registry::start().await;
    let client = key(1);
    let mut call = Call::new("POST", "/v1/settlements", None).idempotent("big");
    call.body = vec![b' '; ferry_api::Limits::default().max_body_bytes + 1];
    let (status, body) = call.send(&registry.base, &client).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_on_one_database_pay_each_voucher_once() {
    let first = Registry::start().await;
    let options = first.ledger.pool().connect_options().as_ref().clone();
    let second = Registry::start_on(options).await;
    let (client, relay) = (key(1), key(2));
    register_relay(&first, &relay).await;
    deposit(&first, &client, "100", "d").await;
    let mut ids = Vec::new();
    for nonce in 0..20u64 {
        let (_, channel) = Call::new(
            "POST",
            "/v1/channels",
            Some(json!({ "relay": relay.public().to_string(), "nonce": nonce, "amount": "5" })),
        )
        .idempotent(&format!("open-{nonce}"))
        .send(&first.base, &client)
        .await;
        ids.push(channel["id"].as_str().unwrap().parse::<ChannelId>().unwrap());
    }
    let vouchers: Vec<_> = ids
        .iter()
        .map(|id| {
            Voucher { channel: *id, sequence: 1, cumulative: "2".parse().unwrap() }.sign(&client)
        })
        .collect();
    let body = json!({ "vouchers": vouchers });
    let a = Call::new("POST", "/v1/settlements", Some(body.clone())).idempotent("a");
    let b = Call::new("POST", "/v1/settlements", Some(body)).idempotent("b");
    let ((status_a, outcomes_a), (status_b, outcomes_b)) =
        tokio::join!(a.send(&first.base, &relay), b.send(&second.base, &relay));
    assert_eq!((status_a, status_b), (StatusCode::OK, StatusCode::OK));
    let settled = |outcomes: &Value| {
        outcomes["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["outcome"] == "settled")
            .count()
    };
    assert_eq!(settled(&outcomes_a) + settled(&outcomes_b), 20, "{outcomes_a} {outcomes_b}");
    // 20 vouchers of 2, each paid once, minus the 1% default fee.
    assert_eq!(available(&first, &relay).await, "39.6");
    first.assert_invariants().await;
    second.stop().await;
    first.stop().await;
}
