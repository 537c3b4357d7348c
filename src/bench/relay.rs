//! The relay against baselines in the same run: one tunnel's throughput with
//! payment on, against a bare tokio TCP proxy and against the same relay
//! with payment off (a free relay sends no invoices); the CPU share of
//! payments, from the vouchers a run took and what one voucher costs in
//! process CPU (measured alone in the same round); the payment round trip
//! against the disk's sync latency; and the resident memory of a `ferry
//! relay` process per idle authenticated session.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_client::RegistryClient;
use ferry_client::relay::{self, Event, Payer, RelayAddress, Session};
use ferry_ledger::embedded::EmbeddedOptions;
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::wire::ListenPolicy;
use ferry_proto::{PricePerByte, SecretKey};
use ferry_relay::{COPY_BUFFER, DataDir, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::delay::DelayProxy;
use super::registry::bench_registry;
use super::{BenchArgs, Table, idempotency};
use crate::db::Database;

/// The credit window of the paid runs: the relay's default.
pub(super) const CREDIT_WINDOW_BYTES: u64 = 1 << 20;
/// A wider window, to show how much of the paid gap is the payment round
/// trip rather than the work of paying.
const WIDE_CREDIT_WINDOW_BYTES: u64 = 4 << 20;
/// Bytes per write of the sender.
const CHUNK: usize = 64 * 1024;
/// Sessions opened at once while filling the relay with idle ones.
const SESSION_CONCURRENCY: usize = 64;
/// Syncs timed to measure the disk under the voucher log.
const DISK_SYNCS: usize = 200;
/// Vouchers paid, with no traffic, to measure what one costs.
const COSTED_VOUCHERS: u64 = 2000;

/// Runs the relay benchmark.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Table> {
    anyhow::ensure!(args.tunnel_bytes > 0 && args.idle_sessions > 0, "counts must be positive");
    let db = Database::embedded(EmbeddedOptions::ephemeral("ferry-bench-relay-pg", true)?).await?;
    let result = run_on(&db, args).await;
    db.close().await?;
    result
}

async fn run_on(db: &Database, args: &BenchArgs) -> anyhow::Result<Table> {
    println!("ferry bench: one relay tunnel against a bare tokio TCP proxy (same process)");
    let ledger = Ledger::connect(db.options().clone(), LedgerConfig::default()).await?;
    let registry = bench_registry(&ledger).await?;
    let scratch = std::env::temp_dir().join(format!("ferry-bench-relay-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let bytes = args.tunnel_bytes;
    let mut rows = Vec::new();
    for round in 1..=2 {
        println!(
            "▸ round {round}: {} MiB through a bare proxy, a free relay, a paid relay (two windows)",
            bytes >> 20
        );
        let proxy = bare_proxy_run(bytes).await.context("the bare proxy run")?;
        let disk_sync = disk_sync_median(&scratch).await.context("timing the disk's sync")?;
        let voucher_cpu = voucher_cpu_seconds(&ledger, &registry.base, &scratch, round)
            .await
            .context("timing vouchers")?;
        let free = relay_run(&ledger, &registry.base, &scratch, bytes, None, round)
            .await
            .context("the free relay run")?;
        let paid =
            relay_run(&ledger, &registry.base, &scratch, bytes, Some(CREDIT_WINDOW_BYTES), round)
                .await
                .context("the paid relay run")?;
        let wide = relay_run(
            &ledger,
            &registry.base,
            &scratch,
            bytes,
            Some(WIDE_CREDIT_WINDOW_BYTES),
            round,
        )
        .await
        .context("the paid relay run with a wide window")?;
        rows.push((proxy, free, paid, wide, disk_sync, voucher_cpu));
    }

    println!("▸ {} idle authenticated sessions on a `ferry relay` process", args.idle_sessions);
    let (rss_before, rss_after) =
        idle_sessions(&registry.base, &scratch, args.idle_sessions).await?;

    let report = ledger.check().await?;
    anyhow::ensure!(report.is_ok(), "ledger invariants violated: {:?}", report.violations);
    registry.stop().await?;
    ledger.close().await;
    let _ = std::fs::remove_dir_all(&scratch);

    let mib_s = |run: &Run| bytes as f64 / run.seconds / f64::from(1 << 20);
    let mut table = Table::new("relay");
    for (round, (proxy, free, paid, wide, disk_sync, voucher_cpu)) in rows.iter().enumerate() {
        table.row(format!(
            "| round {}: one tunnel, paid (1 MiB credit window) | {:.0} MiB/s | bare tokio proxy: {:.0} MiB/s | {:.2}× |",
            round + 1,
            mib_s(paid),
            mib_s(proxy),
            mib_s(paid) / mib_s(proxy)
        ));
        table.row(format!(
            "| round {}: one tunnel, paid (4 MiB credit window) | {:.0} MiB/s | bare tokio proxy: {:.0} MiB/s | {:.2}× |",
            round + 1,
            mib_s(wide),
            mib_s(proxy),
            mib_s(wide) / mib_s(proxy)
        ));
        table.row(format!(
            "| round {}: one tunnel, free (no payment) | {:.0} MiB/s | bare tokio proxy: {:.0} MiB/s | {:.2}× |",
            round + 1,
            mib_s(free),
            mib_s(proxy),
            mib_s(free) / mib_s(proxy)
        ));
        table.row(format!(
            "| round {}: payment round trip, 1 MiB window (invoice → voucher verified and counted), mean of {} | {} µs | one voucher record's write + fdatasync on the same disk, median: {} µs | {:.1}× |",
            round + 1,
            paid.round_trips,
            paid.round_trip.as_micros(),
            disk_sync.as_micros(),
            paid.round_trip.as_secs_f64() / disk_sync.as_secs_f64()
        ));
        // Invoices go out every half window, so one tunnel carries at most
        // half a window per round trip (docs/OPERATING.md).
        let window_mib = 2.0 * mib_s(proxy) * paid.round_trip.as_secs_f64();
        table.row(format!(
            "| round {}: credit window one tunnel needs at the bare proxy's rate (2 × rate × mean round trip) | {window_mib:.2} MiB | | |",
            round + 1,
        ));
        // The difference of two runs' CPU drowns in this machine's noise
        // at a few vouchers a run; their count times what one costs does not.
        let share = paid.vouchers as f64 * voucher_cpu / paid.cpu_seconds;
        table.row(format!(
            "| round {}: CPU share of payments (vouchers × CPU per voucher / process CPU of the paid run) | {:.2} % | {} vouchers × {:.0} µs of {:.2} s CPU (free run: {:.2} s) | |",
            round + 1,
            share * 100.0,
            paid.vouchers,
            voucher_cpu * 1e6,
            paid.cpu_seconds,
            free.cpu_seconds
        ));
    }
    let per_session = (rss_after.saturating_sub(rss_before)) as f64 / args.idle_sessions as f64;
    table.row(format!(
        "| resident memory per idle authenticated session (`ferry relay` process) | {:.1} KiB | RSS {} MiB → {} MiB | |",
        per_session / 1024.0,
        rss_before >> 20,
        rss_after >> 20
    ));
    table.note(format!(
        "ledger check after the run: all invariants hold ({} transfers)",
        report.transfers
    ));
    Ok(table)
}

/// One throughput run: wall seconds, this process's CPU seconds, and the
/// relay's vouchers and mean payment round trip.
struct Run {
    seconds: f64,
    cpu_seconds: f64,
    vouchers: u64,
    round_trip: Duration,
    round_trips: u64,
}

/// This process's user + system CPU time, from /proc/self/stat.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").context("unexpected /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // Linux reports these in clock ticks of 1/100 s.
    Ok(ticks / 100.0)
}

/// How much one throughput run sends.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    /// Exactly this many bytes.
    Bytes(u64),
    /// As much as the path takes in this long.
    For(Duration),
}

/// What one throughput run moved.
pub(super) struct Pushed {
    pub(super) bytes: u64,
    pub(super) seconds: f64,
    pub(super) cpu_seconds: f64,
}

impl Pushed {
    pub(super) fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds / f64::from(1 << 20)
    }
}

/// Writes `load` into `sender`, shuts it down, and waits until `received`
/// reports every byte read.
pub(super) async fn push(
    mut sender: impl tokio::io::AsyncWrite + Unpin,
    load: Load,
    received: tokio::task::JoinHandle<std::io::Result<u64>>,
) -> anyhow::Result<Pushed> {
    let chunk = vec![0x5au8; CHUNK];
    let (cpu_start, started) = (cpu_seconds()?, Instant::now());
    let (limit, deadline) = match load {
        Load::Bytes(bytes) => (bytes, None),
        Load::For(duration) => (u64::MAX, Some(started + duration)),
    };
    let mut sent = 0u64;
    while sent < limit && deadline.is_none_or(|deadline| Instant::now() < deadline) {
        let n = (limit - sent).min(CHUNK as u64) as usize;
        sender
            .write_all(&chunk[..n])
            .await
            .with_context(|| format!("sending, {sent} bytes sent"))?;
        sent += n as u64;
    }
    sender.shutdown().await?;
    let got = received.await??;
    let seconds = started.elapsed().as_secs_f64();
    if got != sent {
        bail!("the receiver got {got} of {sent} bytes");
    }
    Ok(Pushed { bytes: sent, seconds, cpu_seconds: cpu_seconds()? - cpu_start })
}

/// Reads `stream` to its end and reports how many bytes it read.
pub(super) fn count(
    mut stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<u64>> {
    tokio::spawn(async move {
        let mut buffer = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    })
}

/// A bare tokio proxy that carries one connection to `target` with the
/// relay's buffer size; returns where to connect.
pub(super) async fn bare_proxy(
    target: std::net::SocketAddr,
) -> anyhow::Result<std::net::SocketAddr> {
    let proxy = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_address = proxy.local_addr()?;
    tokio::spawn(async move {
        let (mut inbound, _) = proxy.accept().await?;
        let mut outbound = TcpStream::connect(target).await?;
        inbound.set_nodelay(true)?;
        outbound.set_nodelay(true)?;
        // The relay's buffer size, so that the baseline copies as the
        // relay does (tokio's default is 8 KiB).
        tokio::io::copy_bidirectional_with_sizes(
            &mut inbound,
            &mut outbound,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await?;
        std::io::Result::Ok(())
    });
    Ok(proxy_address)
}

async fn bare_proxy_run(bytes: u64) -> anyhow::Result<Run> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sender = TcpStream::connect(bare_proxy(sink.local_addr()?).await?).await?;
    let (received, _) = sink.accept().await?;
    let pushed = push(sender, Load::Bytes(bytes), count(received)).await?;
    let (seconds, cpu_seconds) = (pushed.seconds, pushed.cpu_seconds);
    Ok(Run { seconds, cpu_seconds, vouchers: 0, round_trip: Duration::ZERO, round_trips: 0 })
}

/// A relay served in this process for one benchmark run, reached at
/// `at` (through a delaying proxy when one is given).
pub(super) struct BenchRelay {
    pub(super) relay: Relay,
    pub(super) at: RelayAddress,
    stop: tokio::sync::oneshot::Sender<()>,
    _proxy: Option<DelayProxy>,
}

impl BenchRelay {
    /// A relay registered at `registry` in `region`, paid (1e-9 per byte,
    /// about 1.07 per GiB) with `credit_window_bytes` or free, its data in
    /// `scratch/relay-<tag>`, behind a proxy delaying `one_way` if given.
    pub(super) async fn start(
        registry: &str,
        scratch: &std::path::Path,
        tag: &str,
        credit_window_bytes: Option<u64>,
        region: &str,
        one_way: Option<Duration>,
    ) -> anyhow::Result<BenchRelay> {
        let relay_key = SecretKey::generate()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = match one_way {
            Some(one_way) => Some(DelayProxy::start(listener.local_addr()?, one_way).await?),
            None => None,
        };
        let address =
            proxy.as_ref().map_or(listener.local_addr()?, DelayProxy::address).to_string();
        let price = match credit_window_bytes {
            Some(_) => PricePerByte::from_attos(1_000_000_000)?,
            None => PricePerByte::default(),
        };
        let mut config = RelayConfig::new(&address, region, price);
        config.credit_window_bytes = credit_window_bytes.unwrap_or(CREDIT_WINDOW_BYTES);
        let data = DataDir::open(&scratch.join(format!("relay-{tag}")))?;
        let http = RegistryClient::http()?;
        let relay = Relay::new(
            config,
            relay_key.clone(),
            RegistryClient::new(registry, relay_key.clone(), http),
            data,
        );
        relay.register().await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = relay.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        let at = RelayAddress { address, key: relay_key.public() };
        Ok(BenchRelay { relay, at, stop, _proxy: proxy })
    }

    /// Stops serving and settles.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        self.relay.shutdown(Duration::from_secs(30)).await;
    }
}

/// A funded channel from `caller` to `relay` with 100 in escrow.
pub(super) async fn funded_channel(
    ledger: &Ledger,
    caller: &SecretKey,
    relay: &ferry_proto::PublicKey,
    tag: &str,
) -> anyhow::Result<ferry_proto::ChannelId> {
    let amount: ferry_proto::Amount = "100".parse()?;
    let (to, me) = (caller.public(), caller.public());
    ledger.deposit(&idempotency(&format!("bench-deposit-{tag}"))?, &to, &me, amount).await?;
    let opened = ledger
        .open_channel(&idempotency(&format!("bench-open-{tag}"))?, &me, relay, 1, amount)
        .await?;
    Ok(opened.id)
}

/// One raw tunnel through `at`: `caller` dials `callee`, paying through
/// `paid` (its channel) if given. Returns the caller's session (closed by
/// [`close_session`]), the sending end and the receiving end.
pub(super) async fn raw_tunnel(
    at: &RelayAddress,
    caller: &SecretKey,
    callee: &SecretKey,
    paid: Option<ferry_proto::ChannelId>,
) -> anyhow::Result<(Session, relay::Tunnel, TcpStream)> {
    let listening = Session::open(at, callee, None, None).await?;
    listening.listen(ListenPolicy::Open).await?;
    let payer = paid.map(|channel| Payer::new(channel, caller.clone()));
    let paying = Session::open(at, caller, paid, payer).await?;
    let accepting = {
        let (at, callee) = (at.clone(), callee.clone());
        tokio::spawn(async move {
            loop {
                match listening.next_event().await {
                    Some(Event::Incoming { tunnel, .. }) => {
                        return relay::accept(&at, &callee, tunnel)
                            .await
                            .map_err(anyhow::Error::from);
                    }
                    Some(_) => continue,
                    None => bail!("the listening session ended"),
                }
            }
        })
    };
    let sender = paying.dial(callee.public()).await?;
    let received = accepting.await??;
    Ok((paying, sender, received))
}

/// Closes a paying session (paying its tail) and drains its events so its
/// tasks end.
pub(super) async fn close_session(session: Session) {
    drop(session.close().await);
    while tokio::time::timeout(Duration::from_millis(10), session.next_event())
        .await
        .is_ok_and(|e| e.is_some())
    {}
}

async fn relay_run(
    ledger: &Ledger,
    registry: &str,
    scratch: &std::path::Path,
    bytes: u64,
    credit_window_bytes: Option<u64>,
    round: u32,
) -> anyhow::Result<Run> {
    let tag = format!("{round}-{}", credit_window_bytes.unwrap_or(0));
    let bench =
        BenchRelay::start(registry, scratch, &tag, credit_window_bytes, "bench", None).await?;
    let (caller, callee) = (SecretKey::generate()?, SecretKey::generate()?);
    let channel = funded_channel(ledger, &caller, &bench.at.key, &tag).await?;
    let (paying, sender, received) = raw_tunnel(&bench.at, &caller, &callee, Some(channel)).await?;
    let pushed = push(sender, Load::Bytes(bytes), count(received)).await?;
    let (seconds, cpu_seconds) = (pushed.seconds, pushed.cpu_seconds);
    let vouchers = bench.relay.metrics().vouchers_with("accepted");
    let (round_trip, round_trips) = bench.relay.metrics().payment_round_trip_mean();
    bench.stop().await;
    close_session(paying).await;
    Ok(Run { seconds, cpu_seconds, vouchers, round_trip, round_trips })
}

/// The process CPU one voucher costs, client and relay together: a paying
/// session with no traffic pays [`COSTED_VOUCHERS`] of them, one at a time,
/// each waiting for its verdict (signing, framing, the relay's checks and
/// store, and the answer).
async fn voucher_cpu_seconds(
    ledger: &Ledger,
    registry: &str,
    scratch: &std::path::Path,
    round: u32,
) -> anyhow::Result<f64> {
    let tag = format!("{round}-vouchers");
    let bench =
        BenchRelay::start(registry, scratch, &tag, Some(CREDIT_WINDOW_BYTES), "bench", None)
            .await?;
    let caller = SecretKey::generate()?;
    let channel = funded_channel(ledger, &caller, &bench.at.key, &tag).await?;
    let session = Session::open(&bench.at, &caller, Some(channel), None).await?;
    let cpu_start = cpu_seconds()?;
    for sequence in 1..=COSTED_VOUCHERS {
        let cumulative = ferry_proto::Amount::from_attos(u128::from(sequence) * 1_000_000_000)?;
        let voucher = ferry_proto::Voucher { channel, sequence, cumulative };
        session.pay(voucher.sign(&caller)).await?;
        loop {
            match session.next_event().await {
                Some(Event::VoucherResult { verdict, .. }) => {
                    anyhow::ensure!(
                        verdict == ferry_proto::wire::VoucherVerdict::Accepted,
                        "voucher {sequence}: {verdict:?}"
                    );
                    break;
                }
                Some(_) => continue,
                None => bail!("the session ended"),
            }
        }
    }
    let per_voucher = (cpu_seconds()? - cpu_start) / COSTED_VOUCHERS as f64;
    close_session(session).await;
    bench.stop().await;
    Ok(per_voucher)
}

/// The median time to write one voucher-sized record into preallocated
/// space in `dir` and `fdatasync` it, as the voucher log does.
async fn disk_sync_median(dir: &std::path::Path) -> anyhow::Result<Duration> {
    use std::os::unix::fs::FileExt;
    const RECORD_BYTES: usize = 128;
    let path = dir.join("disk-sync.probe");
    let mut times = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all_at(&vec![0u8; DISK_SYNCS * RECORD_BYTES], 0)?;
        file.sync_all()?;
        let mut times = Vec::with_capacity(DISK_SYNCS);
        for index in 0..DISK_SYNCS {
            let started = Instant::now();
            file.write_all_at(&[0x5a; RECORD_BYTES], (index * RECORD_BYTES) as u64)?;
            file.sync_data()?;
            times.push(started.elapsed());
        }
        std::fs::remove_file(&path)?;
        std::io::Result::Ok(times)
    })
    .await??;
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

/// A process's resident memory in bytes, from /proc/PID/status.
pub(super) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib * 1024)
}

/// Opens `count` idle listen-only sessions to a `ferry relay` child process
/// and returns its resident memory before and after.
async fn idle_sessions(
    registry: &str,
    scratch: &std::path::Path,
    count: usize,
) -> anyhow::Result<(u64, u64)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["relay", "--listen", "127.0.0.1:0", "--registry", registry])
        .arg("--key")
        .arg(scratch.join("idle-relay.key"))
        .arg("--data-dir")
        .arg(scratch.join("idle-relay"))
        .args(["--connections-per-ip", &(count + 16).to_string()])
        .args(["--max-sessions", &(count + 16).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ferry relay")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let words: Vec<&str> = line.split_whitespace().collect();
    let (Some(key), Some(address)) = (words.get(1), words.get(4)) else {
        let _ = child.kill();
        bail!("ferry relay printed no address: {line:?}");
    };
    let at = RelayAddress { address: (*address).to_owned(), key: key.parse()? };
    let pid = child.id();
    let before = rss_bytes(pid)?;
    let mut sessions = Vec::with_capacity(count);
    let mut opening = JoinSet::new();
    for _ in 0..count {
        if opening.len() >= SESSION_CONCURRENCY
            && let Some(opened) = opening.join_next().await
        {
            sessions.push(opened??);
        }
        let at = at.clone();
        opening.spawn(async move {
            let me = SecretKey::generate()?;
            anyhow::Ok(Session::open(&at, &me, None, None).await?)
        });
    }
    while let Some(opened) = opening.join_next().await {
        sessions.push(opened??);
    }
    // Let the relay settle its allocations before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid)?;
    drop(sessions);
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    Ok((before, after))
}
