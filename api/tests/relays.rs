//! The relay market over the API: advertisements, heartbeats, listings,
//! details and reputation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ferry_proto::{HomeRelays, SecretKey, SignedHomeRelays, Voucher};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn heartbeat(registry: &Registry, relay: &SecretKey) -> (StatusCode, Value) {
    Call::new(
        "POST",
        &format!("/v1/relays/{}/heartbeats", relay.public()),
        Some(json!({ "load_bytes_per_sec": 1000, "sessions": 3 })),
    )
    .send(&registry.base, relay)
    .await
}

async fn list(registry: &Registry, query: &str) -> (StatusCode, Value) {
    let response = reqwest::get(format!("{}/v1/relays?{query}", registry.base)).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn keys(page: &Value) -> Vec<String> {
    page["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["advert"]["advert"]["relay"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_advertises_beats_and_is_listed_with_its_reputation() {
    let registry = Registry::start().await;
    let relay = key(10);
    let (status, view) = publish(
        &registry,
        &relay,
        advert(&relay, "0.00000000005", "eu-west", now() * 1000),
        &relay,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["price_per_gib"], "0.0536870912");
    assert_eq!(view["live"], false);
    let prior = view["reputation"]["score"].as_f64().unwrap();
    assert!(prior > 0.0 && prior < 0.5, "a new relay starts from a modest prior: {prior}");

    // Not live yet: hidden from the default listing, shown with live=false.
    assert!(keys(&list(&registry, "").await.1).is_empty());
    assert_eq!(keys(&list(&registry, "live=false").await.1), [relay.public().to_string()]);

    let (status, view) = heartbeat(&registry, &relay).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!((view["live"].as_bool(), view["sessions"].as_i64()), (Some(true), Some(3)));
    assert_eq!(keys(&list(&registry, "").await.1), [relay.public().to_string()]);

    let detail: Value = reqwest::get(format!("{}/v1/relays/{}", registry.base, relay.public()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for component in [
        "score",
        "uptime_24h",
        "paid_volume_30d",
        "paying_clients_30d",
        "settled_vouchers_30d",
        "rejected_vouchers_30d",
        "age_days",
    ] {
        assert!(!detail["reputation"][component].is_null(), "{component} missing: {detail}");
    }
    assert_eq!(detail["uptime_history"].as_array().unwrap().len(), 1);
    // A client can check the advertisement itself.
    let signed: ferry_proto::SignedAdvert =
        serde_json::from_value(detail["advert"].clone()).unwrap();
    assert!(signed.verify().is_ok());
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_advertisements_and_heartbeats_are_refused() {
    let registry = Registry::start().await;
    let (relay, mallory) = (key(10), key(11));
    let issued = now() * 1000;
    assert_eq!(
        publish(&registry, &relay, advert(&relay, "0.00000000005", "eu-west", issued), &relay)
            .await
            .0,
        StatusCode::OK
    );

    let expect = |(status, body): (StatusCode, Value), want: StatusCode, code: &str| {
        assert_eq!((status, body["code"].as_str()), (want, Some(code)), "{body}");
    };
    // An older advertisement after a newer one, and a different one at the same time.
    expect(
        publish(&registry, &relay, advert(&relay, "0.00000000001", "eu-west", issued - 1), &relay)
            .await,
        StatusCode::CONFLICT,
        "stale_advert",
    );
    expect(
        publish(&registry, &relay, advert(&relay, "0.00000000001", "eu-west", issued), &relay)
            .await,
        StatusCode::CONFLICT,
        "stale_advert",
    );
    // The very same advertisement again is accepted (a retry).
    assert_eq!(
        publish(&registry, &relay, advert(&relay, "0.00000000005", "eu-west", issued), &relay)
            .await
            .0,
        StatusCode::OK
    );
    // Signed by another key; naming another relay; from the future; bad forms.
    expect(
        publish(
            &registry,
            &relay,
            advert(&relay, "0.00000000005", "eu-west", issued + 1),
            &mallory,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_advert",
    );
    let (status, body) = Call::new(
        "PUT",
        &format!("/v1/relays/{}/advert", relay.public()),
        Some(json!(advert(&mallory, "0.00000000005", "eu-west", issued + 1).sign(&mallory))),
    )
    .send(&registry.base, &relay)
    .await;
    expect((status, body), StatusCode::BAD_REQUEST, "advert_key_mismatch");
    expect(
        publish(
            &registry,
            &relay,
            advert(&relay, "0.00000000005", "eu-west", (now() + 3600) * 1000),
            &relay,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "issued_in_future",
    );
    expect(
        publish(&registry, &relay, advert(&relay, "0.00000000005", "EU West", issued + 1), &relay)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_advert",
    );
    // Publishing for someone else's key.
    let signed = advert(&relay, "0.00000000005", "eu-west", issued + 2).sign(&relay);
    let (status, body) =
        Call::new("PUT", &format!("/v1/relays/{}/advert", relay.public()), Some(json!(signed)))
            .send(&registry.base, &mallory)
            .await;
    expect((status, body), StatusCode::FORBIDDEN, "forbidden");
    // The stored advertisement is still the first one.
    let (_, page) = list(&registry, "live=false").await;
    assert_eq!(page["relays"][0]["advert"]["advert"]["price_per_byte"], "0.00000000005");

    // Heartbeats: unknown relay; another key; negative load.
    expect(heartbeat(&registry, &mallory).await, StatusCode::NOT_FOUND, "unknown_relay");
    let (status, body) = Call::new(
        "POST",
        &format!("/v1/relays/{}/heartbeats", relay.public()),
        Some(json!({ "load_bytes_per_sec": 1, "sessions": 1 })),
    )
    .send(&registry.base, &mallory)
    .await;
    expect((status, body), StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = Call::new(
        "POST",
        &format!("/v1/relays/{}/heartbeats", relay.public()),
        Some(json!({ "load_bytes_per_sec": -1, "sessions": 1 })),
    )
    .send(&registry.base, &relay)
    .await;
    expect((status, body), StatusCode::BAD_REQUEST, "invalid_body");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_filter_sort_and_page() {
    let registry = Registry::start().await;
    let offers = [
        ("0.00000000009", "eu-west"),
        ("0.00000000001", "us-east"),
        ("0.00000000005", "eu-west"),
        ("0.00000000003", "ap-south"),
        ("0.00000000007", "eu-west"),
    ];
    for (i, (price, region)) in offers.iter().enumerate() {
        let relay = key(20 + i as u8);
        assert_eq!(
            publish(&registry, &relay, advert(&relay, price, region, now() * 1000), &relay).await.0,
            StatusCode::OK
        );
        assert_eq!(heartbeat(&registry, &relay).await.0, StatusCode::OK);
    }
    let prices = |page: &Value| -> Vec<String> {
        page["relays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["advert"]["advert"]["price_per_byte"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, cheap) = list(&registry, "sort=price&max_price=0.00000000005").await;
    assert_eq!(status, StatusCode::OK, "{cheap}");
    assert_eq!(prices(&cheap), ["0.00000000001", "0.00000000003", "0.00000000005"]);
    let (_, eu) = list(&registry, "sort=price&region=eu-west").await;
    assert_eq!(prices(&eu), ["0.00000000005", "0.00000000007", "0.00000000009"]);

    // Paging by two visits every relay once, in order.
    let mut seen = Vec::new();
    let mut query = "sort=price&limit=2".to_owned();
    for _ in 0..5 {
        let (status, page) = list(&registry, &query).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(prices(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("sort=price&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["0.00000000001", "0.00000000003", "0.00000000005", "0.00000000007", "0.00000000009"]
    );

    // By value: equal reputations, so the cheapest is the best value.
    let (_, value) = list(&registry, "sort=value").await;
    assert_eq!(prices(&value)[0], "0.00000000001");
    let (_, reputable) = list(&registry, "sort=reputation&min_reputation=0.99").await;
    assert!(keys(&reputable).is_empty());

    for (query, code) in [
        ("limit=501", "page_size"),
        ("limit=0", "page_size"),
        ("cursor=nonsense", "invalid_cursor"),
        ("sort=cheapest", "invalid_query"),
        ("max_price=-1", "invalid_query"),
        ("min_reputation=2", "invalid_query"),
        ("sort=price&cursor=r_0.5_00", "invalid_cursor"),
    ] {
        let (status, body) = list(&registry, query).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{query}: {body}"
        );
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_volume_from_distinct_clients_raises_reputation() {
    let registry = Registry::start().await;
    let (paid, idle) = (key(30), key(31));
    for relay in [&paid, &idle] {
        publish(&registry, relay, advert(relay, "0.00000000005", "eu-west", now() * 1000), relay)
            .await;
    }
    // Three clients each pay the first relay 2 units through the ledger.
    let mut vouchers = Vec::new();
    for c in 0..3u8 {
        let client = key(40 + c);
        Call::new(
            "POST",
            &format!("/v1/accounts/{}/deposits", client.public()),
            Some(json!({ "amount": "5" })),
        )
        .idempotent(&format!("d{c}"))
        .send(&registry.base, &operator())
        .await;
        let (_, channel) = Call::new(
            "POST",
            "/v1/channels",
            Some(json!({ "relay": paid.public().to_string(), "nonce": 1, "amount": "5" })),
        )
        .idempotent("o")
        .send(&registry.base, &client)
        .await;
        let id = channel["id"].as_str().unwrap().parse().unwrap();
        vouchers.push(
            Voucher { channel: id, sequence: 1, cumulative: "2".parse().unwrap() }.sign(&client),
        );
    }
    // And one forged voucher, which is rejected and counted.
    let mut forged = vouchers[0];
    forged.voucher.sequence = 2;
    vouchers.push(forged);
    let (status, _) = Call::new("POST", "/v1/settlements", Some(json!({ "vouchers": vouchers })))
        .idempotent("s")
        .send(&registry.base, &paid)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, paid_view) = heartbeat(&registry, &paid).await;
    let (_, idle_view) = heartbeat(&registry, &idle).await;
    let reputation = &paid_view["reputation"];
    assert_eq!(reputation["paying_clients_30d"], 3, "{paid_view}");
    assert_eq!(reputation["paid_volume_30d"], "5.94");
    assert_eq!(
        (reputation["settled_vouchers_30d"].as_i64(), reputation["rejected_vouchers_30d"].as_i64()),
        (Some(3), Some(1))
    );
    assert!(
        reputation["score"].as_f64().unwrap() > idle_view["reputation"]["score"].as_f64().unwrap(),
        "{paid_view} vs {idle_view}"
    );
    registry.assert_invariants().await;
    registry.stop().await;
}

async fn publish_home(
    registry: &Registry,
    client: &SecretKey,
    home: HomeRelays,
    signer: &SecretKey,
) -> (StatusCode, Value) {
    let signed = home.sign(signer);
    Call::new("PUT", &format!("/v1/clients/{}/home-relays", client.public()), Some(json!(signed)))
        .send(&registry.base, client)
        .await
}

async fn read_home(registry: &Registry, client: &SecretKey) -> (StatusCode, Value) {
    let url = format!("{}/v1/clients/{}/home-relays", registry.base, client.public());
    let response = reqwest::get(url).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_publishes_its_home_relays_and_a_peer_finds_them() {
    let registry = Registry::start().await;
    let (relay_a, relay_b, client, mallory) = (key(10), key(11), key(20), key(21));
    let issued = now() * 1000;
    for relay in [&relay_a, &relay_b] {
        let (status, _) =
            publish(&registry, relay, advert(relay, "0.00000000005", "eu-west", issued), relay)
                .await;
        assert_eq!(status, StatusCode::OK);
    }
    let home = |relays: Vec<&SecretKey>, issued_at_ms: u64| HomeRelays {
        client: client.public(),
        relays: relays.into_iter().map(SecretKey::public).collect(),
        direct_address: None,
        issued_at_ms,
    };
    let (status, body) = read_home(&registry, &client).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_client")));

    let (status, view) =
        publish_home(&registry, &client, home(vec![&relay_b, &relay_a], issued), &client).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let (status, found) = read_home(&registry, &client).await;
    assert_eq!(status, StatusCode::OK);
    let signed: SignedHomeRelays = serde_json::from_value(found["home"].clone()).unwrap();
    assert!(signed.verify().is_ok(), "a peer can check the list itself");
    let listed: Vec<&str> = found["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["advert"]["advert"]["relay"].as_str().unwrap())
        .collect();
    let expected = [relay_b.public().to_string(), relay_a.public().to_string()];
    assert_eq!(listed, expected, "the relays come in the client's order, with their adverts");

    // Bad lists are refused, and the published one stays.
    let unknown = key(30);
    let refusals = [
        (home(vec![&relay_a], issued + 1), &mallory, StatusCode::UNPROCESSABLE_ENTITY),
        (home(vec![&unknown], issued + 1), &client, StatusCode::UNPROCESSABLE_ENTITY),
        (home(vec![], issued + 1), &client, StatusCode::UNPROCESSABLE_ENTITY),
        (home(vec![&relay_a], issued - 1), &client, StatusCode::CONFLICT),
        (home(vec![&relay_a], issued + 3_600_000), &client, StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (list, signer, expected) in refusals {
        let (status, body) = publish_home(&registry, &client, list, signer).await;
        assert_eq!(status, expected, "{body}");
    }
    let naming_another =
        HomeRelays { client: mallory.public(), ..home(vec![&relay_a], issued + 1) };
    let (status, body) = publish_home(&registry, &client, naming_another, &mallory).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("home_key_mismatch"))
    );
    // Signed by another key than the path's: forbidden.
    let signed = home(vec![&relay_a], issued + 1).sign(&client);
    let (status, _) = Call::new(
        "PUT",
        &format!("/v1/clients/{}/home-relays", client.public()),
        Some(json!(signed)),
    )
    .send(&registry.base, &mallory)
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(read_home(&registry, &client).await.1, found, "nothing changed");

    // A newer list replaces the old one.
    let (status, _) =
        publish_home(&registry, &client, home(vec![&relay_a], issued + 1), &client).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_home(&registry, &client).await.1["relays"].as_array().unwrap().len(), 1);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_lists_a_relay_within_the_snapshot_age() {
    let first = Registry::start().await;
    let options = first.ledger.pool().connect_options().as_ref().clone();
    let second = Registry::start_on(options).await;
    // The second instance has served a listing, so it holds a snapshot.
    assert!(keys(&list(&second, "live=false").await.1).is_empty());
    let relay = key(10);
    let issued = now() * 1000;
    let (status, _) =
        publish(&first, &relay, advert(&relay, "0.00000000005", "eu-west", issued), &relay).await;
    assert_eq!(status, StatusCode::OK);
    // The writer lists it at once; the other instance once its snapshot
    // is older than the documented bound.
    assert_eq!(keys(&list(&first, "live=false").await.1), [relay.public().to_string()]);
    let deadline = std::time::Instant::now() + ferry_api::SNAPSHOT_MAX_AGE * 5;
    loop {
        if keys(&list(&second, "live=false").await.1) == [relay.public().to_string()] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the other instance never listed the relay");
        tokio::time::sleep(ferry_api::SNAPSHOT_MAX_AGE / 10).await;
    }
    first.stop().await;
    second.stop().await;
}
