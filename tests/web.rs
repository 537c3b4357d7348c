//! The registry's web page in a real headless Chromium, driven through
//! ChromeDriver's WebDriver API: the explorer loads and shows the relays and
//! totals the JSON API returns, sorts when a column's header is clicked, and
//! opens a relay's page. Needs Debian's `chromium` and `chromium-driver`
//! (`.ci/run` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../relay/tests/common/mod.rs"]
mod common;

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use common::{Registry, RunningRelay, key, store_dir};
use ferry_proto::{Amount, PricePerByte, SecretKey};
use reqwest::Method;
use serde_json::{Value, json};

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// How long WebDriver looks for an element before it answers "no such element".
const IMPLICIT_WAIT_MS: u64 = 10_000;

/// A ChromeDriver process on a port it chose, and one browser session.
struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    /// The browser's throwaway profile, removed with the browser.
    profile: PathBuf,
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

impl Browser {
    async fn start() -> Browser {
        let driver_path = find_program(&["chromedriver"]).expect(
            "chromedriver is not installed: apt-get install -y chromium chromium-driver \
             (.ci/run does this)",
        );
        let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"])
            .expect("chromium is not installed: apt-get install -y chromium chromium-driver");
        // Port 0: ChromeDriver picks a free port and says which.
        // In a process group of its own, so the browsers it starts can be
        // stopped with it even when a test fails before it quits them.
        let mut driver = Command::new(driver_path)
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = driver.stdout.take().unwrap();
        let port = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                let mut reader = std::io::BufReader::new(stdout);
                let mut line = String::new();
                loop {
                    line.clear();
                    assert!(reader.read_line(&mut line).unwrap() > 0, "chromedriver exited");
                    if let Some(rest) = line.split("started successfully on port ").nth(1) {
                        let port: u16 = rest.trim().trim_end_matches('.').parse().unwrap();
                        // Later lines are drained so the driver never blocks on its output.
                        std::thread::spawn(move || {
                            std::io::copy(&mut reader, &mut std::io::sink())
                        });
                        return port;
                    }
                }
            }),
        )
        .await
        .expect("chromedriver starts in time")
        .unwrap();
        let profile = store_dir("chromium-profile");
        let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    // As root, Chromium runs only without its sandbox.
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,1400",
                             format!("--user-data-dir={}", profile.display())],
                },
            }},
        });
        let session: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {session}"));
        let browser = Browser { driver, base: format!("{base}/session/{id}"), http, profile };
        browser.command(Method::POST, "/timeouts", json!({ "implicit": IMPLICIT_WAIT_MS })).await;
        browser
    }

    /// Sends one WebDriver command and returns its `value`.
    async fn command(&self, method: Method, path: &str, body: Value) -> Value {
        let request = self.http.request(method.clone(), format!("{}{path}", self.base));
        let request = if body.is_null() { request } else { request.json(&body) };
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        let value = answer["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("WebDriver {method} {path}: {error}: {}", value["message"]);
        }
        value
    }

    /// Ends the session, which closes the browser.
    async fn quit(self) {
        self.command(Method::DELETE, "", json!(null)).await;
    }

    async fn open(&self, url: &str) {
        self.command(Method::POST, "/url", json!({ "url": url })).await;
    }

    /// The element `css` selects, waiting for it up to the implicit wait.
    async fn find(&self, css: &str) -> String {
        let found = self
            .command(Method::POST, "/element", json!({ "using": "css selector", "value": css }))
            .await;
        found.as_object().unwrap().values().next().unwrap().as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.command(Method::POST, &format!("/element/{element}/click"), json!({})).await;
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.command(Method::GET, &format!("/element/{element}/text"), json!(null))
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn script(&self, source: &str) -> Value {
        self.command(Method::POST, "/execute/sync", json!({ "script": source, "args": [] })).await
    }

    /// The relay keys in the table, top to bottom.
    async fn table_keys(&self) -> Vec<String> {
        let keys = self
            .script("return [...document.querySelectorAll('#relays tbody tr')].map(r => r.dataset.key);")
            .await;
        keys.as_array().unwrap().iter().map(|key| key.as_str().unwrap().to_owned()).collect()
    }

    async fn screenshot(&self, path: &std::path::Path) {
        let png = self.command(Method::GET, "/screenshot", json!(null)).await;
        let bytes = BASE64_STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Killing ChromeDriver alone would leave its browsers running.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Waits until `condition` holds, polling the page; bounded by [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polled = async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, polled).await.unwrap_or_else(|_| panic!("timed out: {what}"));
}

struct Listed {
    key: String,
    region: String,
    price: Amount,
    reputation: f64,
    load: i64,
}

fn sorted_keys(
    relays: &[Listed],
    order: impl Fn(&Listed, &Listed) -> std::cmp::Ordering,
) -> Vec<String> {
    let mut relays: Vec<&Listed> = relays.iter().collect();
    relays.sort_by(|a, b| order(a, b).then_with(|| a.key.cmp(&b.key)));
    relays.into_iter().map(|relay| relay.key.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_shows_sorts_and_opens_the_relays_the_api_lists() {
    let registry = Registry::start().await;
    // Four relays in three regions, priced from cheap to dear.
    let relays: Vec<(SecretKey, &str, u128, f64, u64)> = vec![
        (key(31), "eu-west", 20, 0.72, 3_000_000),
        (key(32), "us-east", 5, 0.41, 9_000_000),
        (key(33), "ap-south", 50, 0.93, 1_000),
        (key(34), "eu-west", 80, 0.15, 500_000),
    ];
    let mut running = Vec::new();
    for (relay_key, region, nano_per_byte, _, _) in &relays {
        let price = PricePerByte::from_attos(nano_per_byte * 1_000_000_000).unwrap();
        let dir = store_dir(&format!("web-{region}-{nano_per_byte}"));
        running.push(
            RunningRelay::start(
                &registry,
                relay_key,
                |config| {
                    config.region = (*region).to_owned();
                    config.price_per_byte = price;
                    // Only the registration's heartbeat: the loads set below stay.
                    config.heartbeat_interval = Duration::from_secs(3600);
                },
                dir,
            )
            .await,
        );
    }
    for (relay_key, _, _, _, load) in &relays {
        let path = format!("/v1/relays/{}/heartbeats", relay_key.public());
        let body = json!({ "load_bytes_per_sec": load, "sessions": load % 7 });
        registry.client(relay_key).signed(Method::POST, &path, Some(&body), None).await.unwrap();
    }
    let scores: Vec<(&SecretKey, f64)> = relays.iter().map(|r| (&r.0, r.3)).collect();
    registry.set_reputations(&scores).await;
    registry.fund(&key(40), &relays[1].0.public(), "2.5").await;

    // What the API says, to hold the page to.
    let api = registry.client(&key(99));
    let listing = api.get("/v1/relays?live=false&limit=500").await.unwrap();
    let listed: Vec<Listed> = listing["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|view| Listed {
            key: view["advert"]["advert"]["relay"].as_str().unwrap().to_owned(),
            region: view["advert"]["advert"]["region"].as_str().unwrap().to_owned(),
            price: view["price_per_gib"].as_str().unwrap().parse().unwrap(),
            reputation: view["reputation"]["score"].as_f64().unwrap(),
            load: view["load_bytes_per_sec"].as_i64().unwrap(),
        })
        .collect();
    assert_eq!(listed.len(), relays.len());
    let totals = api.get("/v1/market").await.unwrap();
    assert_eq!(totals["relays"], 4);
    assert_eq!(totals["open_channels"], 1);
    assert_eq!(totals["in_escrow"], "2.5");

    let browser = Browser::start().await;
    browser.open(&format!("{}/", registry.base)).await;
    browser.find("main[data-rendered='explorer']").await;

    // It loads, with every relay the API lists, cheapest first.
    let by_price = sorted_keys(&listed, |a, b| a.price.cmp(&b.price));
    assert_eq!(browser.table_keys().await, by_price);
    assert_eq!(browser.text("#relay-count").await, "(4)");
    let totals_text = browser.text("#totals").await;
    assert!(totals_text.contains("4 of 4"), "{totals_text}");
    assert!(totals_text.contains("1 open, 0 closing"), "{totals_text}");
    assert!(totals_text.contains("2.5"), "{totals_text}");
    let dots =
        browser.script("return document.querySelectorAll('#chart circle.dot').length;").await;
    assert_eq!(dots, 4);
    assert_eq!(browser.script("return document.getElementById('error').hidden;").await, true);

    // Headers sort: price again reverses it; others sort ascending first.
    let checks: [(&str, Vec<String>); 5] = [
        ("price", by_price.iter().rev().cloned().collect()),
        ("reputation", sorted_keys(&listed, |a, b| a.reputation.total_cmp(&b.reputation))),
        ("region", sorted_keys(&listed, |a, b| a.region.cmp(&b.region))),
        ("load", sorted_keys(&listed, |a, b| a.load.cmp(&b.load))),
        ("load", sorted_keys(&listed, |a, b| b.load.cmp(&a.load))),
    ];
    for (column, expected) in checks {
        browser.click(&format!("th[data-sort='{column}'] button")).await;
        eventually(&format!("sorted by {column}"), || async {
            browser.table_keys().await == expected
        })
        .await;
    }
    let shot_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    browser.screenshot(&shot_dir.join("explorer.png")).await;

    // A relay's page opens from its row, with its reputation components.
    let dearest = &sorted_keys(&listed, |a, b| b.price.cmp(&a.price))[0];
    browser.click(&format!("tr[data-key='{dearest}'] a")).await;
    browser.find("main[data-rendered='relay']").await;
    assert_eq!(browser.text("#relay-key").await, *dearest);
    let facts = browser.text("#relay-facts").await;
    assert!(facts.contains("eu-west") && facts.contains("live"), "{facts}");
    let reputation = browser.text("#relay-reputation").await;
    assert!(reputation.contains("0.150"), "{reputation}");
    assert!(reputation.contains("Paid volume, 30 days"), "{reputation}");
    let bars = browser.script("return document.querySelectorAll('#uptime rect').length;").await;
    assert_eq!(bars, 24);
    browser.screenshot(&shot_dir.join("relay.png")).await;

    // Back to the list.
    browser.click("#relay a[href='#/']").await;
    browser.find("main[data-rendered='explorer']").await;
    assert_eq!(browser.table_keys().await.len(), 4);

    browser.quit().await;
    for relay in running {
        relay.shutdown().await;
    }
    registry.assert_invariants().await;
}
