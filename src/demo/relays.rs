//! The demo's relays: real `ferry relay` processes, so that one can crash
//! (SIGKILL) and restart from its data directory as an operator's would.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_proto::{PricePerByte, PublicKey, SecretKey};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a relay may take to start or to stop (it settles as it stops).
const RELAY_START_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What an operator chose for one relay.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    /// A name for people.
    pub name: &'static str,
    /// The advertised region.
    pub region: &'static str,
    /// The advertised price.
    pub price: PricePerByte,
}

/// A running `ferry relay` process.
pub struct RelayProcess {
    /// Its operator's choices.
    pub plan: RelayPlan,
    /// Its key (kept in its directory across restarts).
    pub key: PublicKey,
    /// Where it listens.
    pub address: String,
    dir: PathBuf,
    registry: String,
    child: Option<Child>,
}

impl RelayProcess {
    /// Starts a relay in `dir` (its key and voucher store live there).
    pub async fn start(plan: RelayPlan, dir: PathBuf, registry: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the relay directory {}", dir.display()))?;
        let (child, key, address) = spawn(&plan, &dir, registry).await?;
        Ok(RelayProcess {
            plan,
            key,
            address,
            dir,
            registry: registry.to_owned(),
            child: Some(child),
        })
    }

    /// The relay's secret key, from its key file (to withdraw its earnings).
    pub fn secret(&self) -> anyhow::Result<SecretKey> {
        Ok(SecretKey::read_file(&self.dir.join("relay.key"))?)
    }

    /// Kills the relay at once, as a crash would: no goodbye, no settlement.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing the relay")?;
        }
        Ok(())
    }

    /// Starts the relay again from its directory: the same key, and the
    /// vouchers it stored before it went down.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is still running", self.plan.name);
        let (child, key, address) = spawn(&self.plan, &self.dir, &self.registry).await?;
        anyhow::ensure!(key == self.key, "{} came back with another key", self.plan.name);
        self.address = address;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the relay with SIGTERM and waits while it settles and exits.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id().context("the relay's process id")?;
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(sent.success(), "cannot signal {}", self.plan.name);
        let status = tokio::time::timeout(RELAY_START_STOP_TIMEOUT, child.wait())
            .await
            .with_context(|| format!("{} did not stop in time", self.plan.name))??;
        anyhow::ensure!(status.success(), "{} exited with {status}", self.plan.name);
        Ok(())
    }
}

/// Starts `ferry relay` in `dir` and returns it with the key and address
/// from its first line.
async fn spawn(
    plan: &RelayPlan,
    dir: &Path,
    registry: &str,
) -> anyhow::Result<(Child, PublicKey, String)> {
    let exe = std::env::current_exe().context("finding the ferry executable")?;
    let mut child = Command::new(exe)
        .args(["relay", "--listen", "127.0.0.1:0", "--registry", registry])
        .arg("--key")
        .arg(dir.join("relay.key"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--region", plan.region])
        .args(["--price-per-byte", &plan.price.to_string()])
        // Quick rounds, so the demo shows settlement and heartbeats within seconds.
        .args(["--settle-interval-secs", "1", "--heartbeat-interval-secs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting `ferry relay`")?;
    let stdout = child.stdout.take().context("the relay's standard output")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(RELAY_START_STOP_TIMEOUT, lines.next_line())
        .await
        .context("the relay did not start in time")??
        .context("the relay exited before it started")?;
    // `relay KEY listening on ADDRESS (...)`
    let words: Vec<&str> = first.split_whitespace().collect();
    let (Some(&"relay"), Some(key), Some(&"listening"), Some(&"on"), Some(address)) =
        (words.first(), words.get(1), words.get(2), words.get(3), words.get(4))
    else {
        bail!("unexpected first line from the relay: {first}");
    };
    let key = key.parse().context("the relay's key")?;
    let address = (*address).to_owned();
    // Later lines (its settlement report) are read so it never blocks on them.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, key, address))
}
