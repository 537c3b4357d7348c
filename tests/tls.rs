//! The market over TLS, as processes: `ferry registry --tls-cert --tls-key`
//! with a certificate from a throwaway CA, a `ferry relay` and the client
//! commands reaching it at `https://localhost` with `--registry-ca`. A file
//! crosses the market and is paid for, so every registry call of a paying
//! session (channel checks, settlement) went over TLS. Commands that do not
//! trust the certificate refuse it and say what to do; unusable certificate
//! files stop the registry before it listens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod process;

use std::path::{Path, PathBuf};

use ferry_proto::tls::testing::TestCa;
use process::{WAIT, output_text as text, relay_args, run as ferry, run_json as ferry_json, spawn};
use sqlx::ConnectOptions;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

/// The arguments of `ferry registry` serving TLS from `files`.
async fn registry_args(dir: &Path, certificate: &Path, key: &Path) -> Vec<String> {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    [
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        options.to_url_lossy().as_ref(),
        "--operator-key",
        &path(&dir.join("operator.key")),
        "--tls-cert",
        &path(certificate),
        "--tls-key",
        &path(key),
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_market_runs_over_tls_and_refuses_a_certificate_it_does_not_trust() {
    let dir = scratch("market");
    let ca = TestCa::new();
    let ca_file = ca.write_certificate(&dir.join("ca.pem"));
    let server = ca.server(&["localhost"], &dir, "registry");
    let (_registry, line) =
        spawn(registry_args(&dir, &server.certificate, &server.key).await).await;
    let address = line.strip_prefix("listening on https://").expect(&line);
    let port = address.split_whitespace().next().unwrap().rsplit(':').next().unwrap();
    let base = format!("https://localhost:{port}");
    let trust = ["--registry", &base, "--registry-ca", ca_file.to_str().unwrap()];

    // A relay registers, heartbeats and settles over TLS.
    let mut relay = relay_args(&base, &dir, None);
    relay.extend(["--registry-ca".into(), path(&ca_file)]);
    relay.extend(["--data-dir".into(), path(&dir.join("relay-data"))]);
    relay.extend(["--settle-interval-secs".into(), "1".into()]);
    let (relay, relay_line) = spawn(relay).await;
    let relay_key = process::relay_address(&relay_line).key.to_string();

    // The client commands list it, deposit, and move a file through it.
    let listed = async {
        loop {
            let table =
                ferry_json(&[&["relays", "--min-reputation", "0"], &trust[..]].concat()).await;
            if table["relays"].as_array().unwrap().len() == 1 {
                return table;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let table = tokio::time::timeout(WAIT, listed).await.unwrap();
    assert_eq!(table["relays"][0]["relay"], relay_key);
    let sender_key = path(&dir.join("sender.key"));
    let receiver_key = path(&dir.join("receiver.key"));
    for key in [&sender_key, &receiver_key] {
        ferry_proto::SecretKey::create_file(std::path::Path::new(key)).unwrap();
    }
    let as_sender = [&trust[..], &["--key", &sender_key]].concat();
    let as_receiver = [&trust[..], &["--key", &receiver_key]].concat();
    let operator = path(&dir.join("operator.key"));
    ferry_json(&[&["deposit", "1", "--operator-key", &operator], &as_sender[..]].concat()).await;
    let file = dir.join("payload.bin");
    let contents: Vec<u8> =
        (0..500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&file, &contents).unwrap();
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let receive: Vec<String> =
        [&["receive", "--min-reputation", "0", "--out", &path(&inbox)][..], &as_receiver[..]]
            .concat()
            .iter()
            .map(|word| word.to_string())
            .collect();
    let (receiving, _) = spawn(receive).await;
    let receiver_public = ferry(&["key", "show", &receiver_key]).await;
    let receiver_public = String::from_utf8_lossy(&receiver_public.stdout).trim().to_owned();
    let sent = ferry_json(
        &[
            &["send", file.to_str().unwrap(), "--to", &receiver_public][..],
            &["--min-reputation", "0", "--budget", "0.5"],
            &as_sender[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(sent["blake3"], blake3::hash(&contents).to_string());
    assert!(receiving.wait().await.success());
    assert!(std::fs::read(inbox.join("payload.bin")).unwrap() == contents, "the file differs");
    // The relay settles what it carried, over TLS: the sender's channel
    // shows a settled amount above zero.
    let settled = async {
        loop {
            let channels = ferry_json(&[&["channels", "list"], &as_sender[..]].concat()).await;
            let settled = channels["channels"][0]["settled"].as_str().unwrap_or("0").to_owned();
            if settled != "0" {
                return settled;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(WAIT, settled).await.expect("the relay settles over TLS");

    // Without the CA, or with another, the certificate is refused, and the
    // error says what to do.
    let untrusting = ferry(&["relays", "--registry", &base]).await;
    assert!(!untrusting.status.success());
    assert!(text(&untrusting).contains("--registry-ca"), "{}", text(&untrusting));
    let other_ca = TestCa::new().write_certificate(&dir.join("other-ca.pem"));
    let wrong =
        ferry(&["relays", "--registry", &base, "--registry-ca", other_ca.to_str().unwrap()]).await;
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("certificate"), "{}", text(&wrong));
    // A relay that does not trust it does not start.
    let mut stranger = relay_args(&base, &dir.join("stranger"), None);
    std::fs::create_dir_all(dir.join("stranger")).unwrap();
    stranger.extend(["--registry-ca".into(), path(&other_ca)]);
    stranger.extend(["--data-dir".into(), path(&dir.join("stranger-data"))]);
    let stranger = ferry(&stranger.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(!stranger.status.success());
    assert!(text(&stranger).contains("certificate"), "{}", text(&stranger));

    assert!(process::signal_and_wait(relay, "-TERM").await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_and_registry_urls_are_refused_with_the_next_step() {
    let dir = scratch("refused");
    let ca = TestCa::new();
    let one = ca.server(&["localhost"], &dir, "one");
    let other = ca.server(&["localhost"], &dir, "other");
    // A key that is not the certificate's: the registry stops before it
    // listens.
    let args = registry_args(&dir, &one.certificate, &other.key).await;
    let mismatched = ferry(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(!mismatched.status.success());
    assert!(text(&mismatched).contains("--tls-cert and --tls-key"), "{}", text(&mismatched));
    assert!(!text(&mismatched).contains("listening on"), "{}", text(&mismatched));
    // A certificate without its key.
    let alone = ferry(&["registry", "--tls-cert", one.certificate.to_str().unwrap()]).await;
    assert!(!alone.status.success());
    assert!(text(&alone).contains("--tls-key"), "{}", text(&alone));
    // Registry URLs that are not http(s).
    for url in ["ftp://localhost:7070", "localhost:7070", "https://"] {
        let refused = ferry(&["relays", "--registry", url]).await;
        assert!(!refused.status.success(), "{url}");
        assert!(text(&refused).contains("registry URL"), "{url}: {}", text(&refused));
    }
    // Plain HTTP to another machine is allowed, with a warning.
    let warned = ferry(&["relays", "--registry", "http://0.0.0.0:9"]).await;
    assert!(
        text(&warned)
            .contains("warning: the registry at http://0.0.0.0:9 is reached over plain HTTP"),
        "{}",
        text(&warned)
    );
}
