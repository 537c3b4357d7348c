//! End-to-end tests of the `ferry` command, run as a user would run it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use ferry_ledger::{IdempotencyKey, Ledger, LedgerConfig};
use ferry_proto::SecretKey;
use sqlx::ConnectOptions;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().expect("ferry runs")
}

/// A running demo, stopped as its user would stop it (SIGTERM, so that it
/// removes its cluster and relays) when the test ends, also by a panic.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_demo_runs_the_whole_market_and_keeps_the_registry_up_when_asked() {
    use std::io::BufRead;
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["demo", "--keep", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut shown = String::new();
    let url = loop {
        let line = received
            .recv_timeout(std::time::Duration::from_secs(180))
            .unwrap_or_else(|_| panic!("the demo went quiet or stopped early:\n{shown}"));
        shown.push_str(&line);
        shown.push('\n');
        if let Some(rest) = line.split("stay up: open ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    for expected in [
        "the registry lists all four as live",
        "bob listens on relay-a and relay-c",
        "crashes (SIGKILL) with 8 of 24 MiB delivered",
        "the stream moved to the next relay on its own",
        "matches what alice sent",
        "the registry's probes find relay-a down",
        "settles them in its next round",
        "reputation, as the registry computes it",
        // How often a channel was topped up depends on how far its
        // client paid ahead; that every channel closes does not.
        "closed: deposited 0.",
        "withdraws its earnings",
        "all invariants hold",
    ] {
        assert!(shown.contains(expected), "demo output lacks {expected:?}:\n{shown}");
    }
    // The registry and its web page are still up, with the market's totals.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let page = reqwest::get(&url).await.unwrap();
        assert!(page.status().is_success());
        assert!(page.text().await.unwrap().contains("relay explorer"));
        let totals: serde_json::Value =
            reqwest::get(format!("{url}v1/market")).await.unwrap().json().await.unwrap();
        assert_eq!(totals["relays"], 4, "{totals}");
        assert_eq!(totals["open_channels"], 0, "{totals}");
        assert_eq!(totals["in_escrow"], "0", "{totals}");
    });
    let signalled =
        Command::new("kill").args(["-TERM", &demo.0.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    let status = demo.0.wait().unwrap();
    let rest: Vec<String> = received.iter().collect();
    assert!(status.success(), "{shown}{}", rest.join("\n"));
    assert!(rest.iter().any(|line| line.contains("removed its directory")), "{rest:?}");
}

#[test]
fn without_postgres_binaries_the_error_says_what_to_install() {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("demo")
        .env("FERRY_PG_BINDIR", "/nonexistent")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(text(&output).contains("apt-get install -y postgresql"), "{}", text(&output));
}

#[test]
fn keys_are_created_privately_and_shown() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("id");
    let _ = std::fs::remove_file(&path);
    let path_text = path.to_str().unwrap();

    let created = ferry(&["key", "new", path_text]);
    assert!(created.status.success(), "{}", text(&created));
    let public = String::from_utf8(created.stdout).unwrap();
    assert_eq!(public.trim().len(), 64);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(String::from_utf8(ferry(&["key", "show", path_text]).stdout).unwrap(), public);

    let again = ferry(&["key", "new", path_text]);
    assert!(!again.status.success(), "a key file was overwritten");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let exposed = ferry(&["key", "show", path_text]);
    assert!(!exposed.status.success());
    assert!(text(&exposed).contains("chmod 600"), "{}", text(&exposed));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_check_passes_on_a_healthy_ledger_and_fails_on_a_tampered_one() {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let url = options.to_url_lossy().to_string();
    let ledger = Ledger::connect(options, LedgerConfig::default()).await.unwrap();
    let alice = SecretKey::from_seed(&[1; 32]).public();
    let key: IdempotencyKey = "deposit".parse().unwrap();
    ledger.deposit(&key, &alice, &alice, "5".parse().unwrap()).await.unwrap();

    let url_for_check = url.clone();
    let healthy = tokio::task::spawn_blocking(move || {
        ferry(&["ledger", "check", "--database-url", &url_for_check])
    })
    .await
    .unwrap();
    assert!(healthy.status.success(), "{}", text(&healthy));
    assert!(text(&healthy).contains("all invariants hold"));

    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE holder_key = $1")
        .bind(alice.as_bytes().as_slice())
        .execute(ledger.pool())
        .await
        .unwrap();
    let tampered = tokio::task::spawn_blocking(move || {
        ferry(&["ledger", "check", "--json", "--database-url", &url])
    })
    .await
    .unwrap();
    assert_eq!(tampered.status.code(), Some(1), "{}", text(&tampered));
    let report: serde_json::Value = serde_json::from_slice(&tampered.stdout).unwrap();
    let broken: Vec<&str> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["invariant"].as_str().unwrap())
        .collect();
    assert!(broken.contains(&"the sum of all balances is zero"), "{broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_serves_until_sigterm_and_then_stops_cleanly() {
    use std::io::BufRead;
    use std::process::Stdio;

    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let url = options.to_url_lossy().to_string();
    let dir = std::env::temp_dir().join(format!("ferry-cli-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("operator.key");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["registry", "--listen", "127.0.0.1:0", "--database-url", &url])
        .arg("--operator-key")
        .arg(&key_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first line names the address; reading it is bounded by the child,
    // which either prints it or exits.
    let stdout = child.stdout.take().unwrap();
    let (first_line, _stdout) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            // The pipe stays open until the test ends.
            (line, reader)
        }),
    )
    .await
    .expect("the registry starts within 60 s")
    .unwrap();
    let base = first_line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an address line")
        .to_owned();
    let health = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    assert!(key_path.exists(), "the operator key file was created");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("the registry stops within 30 s of SIGTERM")
    .unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_to_a_pipe_are_plain_text() {
    // A port that was just free: the request fails at once, and the
    // client's debug log of the attempt goes to stderr, here a pipe.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["relays", "--registry", &format!("http://{free}")])
        .env("RUST_LOG", "debug")
        .output()
        .expect("ferry runs");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("DEBUG"), "no log line to look at:\n{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a piped log:\n{log}");
}

#[test]
fn a_relay_with_a_bad_region_writes_nothing_and_an_outlandish_price_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-relay-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (key, data) = (dir.join("relay.key"), dir.join("data"));
    // Nothing listens at the registry's address: the relay fails there, if
    // it gets that far.
    let registry = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    );
    let relay = |registry: &str, extra: &[&str]| {
        let base = [
            "relay",
            "--registry",
            registry,
            "--listen",
            "127.0.0.1:0",
            "--key",
            key.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        ferry(&[&base[..], extra].concat())
    };
    let no_scheme = relay("127.0.0.1:7070", &[]);
    assert!(text(&no_scheme).contains("is not a URL (https://host:port)"), "{}", text(&no_scheme));
    assert!(!key.exists() && !data.exists(), "a relay with a bad URL wrote its key or data");
    let refused = relay(&registry, &["--region", "Europe West"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("--region") && text(&refused).contains("a-z"),
        "{}",
        text(&refused)
    );
    assert!(!key.exists() && !data.exists(), "a refused relay wrote its key or data");
    let dear = relay(&registry, &["--region", "eu-west", "--price-per-byte", "1.0"]);
    let stderr = String::from_utf8_lossy(&dear.stderr);
    assert!(stderr.contains("warning: the price is 1073741824 per GiB"), "{stderr}");
    let usual = relay(&registry, &["--region", "eu-west"]);
    assert!(!String::from_utf8_lossy(&usual.stderr).contains("warning: the price"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_registry_is_one_line_that_names_the_next_step() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = ferry(&["relays", "--registry", &format!("http://{free}")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: cannot reach the registry at http://{free} (")),
        "{stderr}"
    );
    assert!(stderr.contains("`ferry registry`") && stderr.contains("--registry URL"), "{stderr}");
    assert_eq!(stderr.matches("cannot reach").count(), 1, "{stderr}");
}

#[test]
fn with_json_a_failure_is_json_on_stdout_with_its_code() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-json-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("me.key");
    SecretKey::create_file(&key).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let registry = format!("http://{free}");
    for (key, code) in [(key.clone(), "registry_unreachable"), (dir.join("typo.key"), "error")] {
        let output =
            ferry(&["balance", "--json", "--registry", &registry, "--key", key.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1));
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("stdout is not JSON: {}", text(&output)));
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(output.stderr.is_empty(), "{}", text(&output));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
