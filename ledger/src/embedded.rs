//! A private PostgreSQL cluster that ferry starts itself from the system's
//! binaries, so the demo, the tests and a small registry need nothing set up by
//! hand.
//!
//! The cluster listens on a Unix socket only (`listen_addresses = ''`) in a
//! directory that only its owner can enter, so it clashes with no port and no
//! other user can reach it; that is why `trust` authentication is safe here.
//! As root, initdb and the server run as the `postgres` user, because
//! PostgreSQL refuses to run as root.
//!
//! The server is a direct child of a dedicated thread that lives exactly as
//! long as the server, with a parent-death signal of SIGINT (PostgreSQL's
//! "fast shutdown"): if ferry dies, even by SIGKILL, the server stops too.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

/// How long the server may take to accept connections after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before stopping is reported as failed.
pub const STOP_TIMEOUT_SECS: u32 = 60;
/// The database superuser that initdb creates.
const SUPERUSER: &str = "postgres";
/// Bytes of the server log quoted in an error when the server fails to start.
const LOG_TAIL_BYTES: u64 = 2048;

/// Why the embedded cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) were not found; install them \
         (on Debian: `apt-get install -y postgresql`), set FERRY_PG_BINDIR to their directory, \
         or give a DATABASE_URL of a running server"
    )]
    BinariesNotFound,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` \
         user to run it as; create one or run ferry as an ordinary user"
    )]
    NoPostgresUser,
    /// A file-system step failed.
    #[error("{what}: {source}")]
    Io {
        /// The step that failed.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// initdb, the server or pg_ctl exited with an error.
    #[error("{what} failed ({status}):\n{log}")]
    Process {
        /// The step that failed.
        what: String,
        /// How it exited.
        status: String,
        /// The end of its output or of the server log.
        log: String,
    },
    /// The server did not become ready within [`START_TIMEOUT`].
    #[error("the PostgreSQL server did not become ready within {START_TIMEOUT:?}:\n{log}")]
    StartTimeout {
        /// The end of the server log.
        log: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    move |source| EmbeddedError::Io { what: what.into(), source }
}

/// How to start an embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Where the cluster lives. It is created (with initdb) if it is missing and
    /// reused if it exists.
    pub dir: PathBuf,
    /// Remove `dir` when the cluster stops (demo and test clusters).
    pub remove_on_stop: bool,
    /// Whether the server flushes to disk. Only throwaway test clusters turn
    /// this off; the demo, the registry and the benchmarks keep it on.
    pub durable: bool,
}

impl EmbeddedOptions {
    /// A throwaway cluster in a new directory under the system's temporary
    /// directory, removed when it stops.
    pub fn ephemeral(prefix: &str, durable: bool) -> Result<EmbeddedOptions, EmbeddedError> {
        let mut random = [0u8; 6];
        getrandom_fill(&mut random)?;
        let name = format!("{prefix}-{}-{}", std::process::id(), hex_lower(&random));
        Ok(EmbeddedOptions { dir: std::env::temp_dir().join(name), remove_on_stop: true, durable })
    }
}

/// A running private PostgreSQL cluster. Dropping it stops the server.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    options: EmbeddedOptions,
    bindir: PathBuf,
    run_as: Option<(u32, u32)>,
    server: Option<thread::JoinHandle<io::Result<ExitStatus>>>,
}

impl EmbeddedPostgres {
    /// Creates (if needed) and starts the cluster, and waits until it accepts
    /// connections. This blocks; call it from `spawn_blocking` in async code.
    pub fn start(options: EmbeddedOptions) -> Result<EmbeddedPostgres, EmbeddedError> {
        let bindir = find_bindir()?;
        let run_as = if running_as_root() { Some(postgres_user()?) } else { None };
        prepare_dir(&options.dir, run_as)?;
        let data_dir = options.dir.join("data");
        if !data_dir.join("PG_VERSION").exists() {
            init_cluster(&bindir, &data_dir, run_as, &options)?;
        }
        let log_path = options.dir.join("server.log");
        let Server { supervisor, pid } = spawn_server(&bindir, &options, run_as, &log_path)?;
        let mut cluster = EmbeddedPostgres { options, bindir, run_as, server: Some(supervisor) };
        cluster.wait_until_ready(&log_path, pid)?;
        tracing::info!(dir = %cluster.options.dir.display(), "embedded PostgreSQL is ready");
        Ok(cluster)
    }

    /// Connection options for `database` on this cluster, over its socket.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new().socket(&self.options.dir).username(SUPERUSER).database(database)
    }

    /// The URL of `database` on this cluster, with the socket directory
    /// percent-encoded as the host, as libpq, psql and sqlx accept it.
    pub fn url(&self, database: &str) -> String {
        self.connect_options(database).to_url_lossy().to_string()
    }

    /// The directory the cluster lives in, which is also its socket directory.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// The directory of the PostgreSQL binaries the cluster runs (and of
    /// client tools such as psql and pgbench).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The database superuser's name, for client tools.
    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// Stops the server with a fast shutdown (open sessions are ended) and, for
    /// a throwaway cluster, removes its directory.
    pub fn stop(mut self) -> Result<(), EmbeddedError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), EmbeddedError> {
        let Some(server) = self.server.take() else { return Ok(()) };
        let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
        pg_ctl
            .arg("stop")
            .arg("-D")
            .arg(self.options.dir.join("data"))
            .args(["-m", "fast", "-w", "-t"])
            .arg(STOP_TIMEOUT_SECS.to_string());
        run_to_completion(&mut pg_ctl, self.run_as, "pg_ctl stop")?;
        // pg_ctl waited for the server to exit; this only reaps it.
        let _ = server.join();
        if self.options.remove_on_stop {
            fs::remove_dir_all(&self.options.dir).map_err(io_error(format!(
                "removing the cluster directory {}",
                self.options.dir.display()
            )))?;
        }
        Ok(())
    }

    fn wait_until_ready(&mut self, log_path: &Path, server_pid: u32) -> Result<(), EmbeddedError> {
        let pid_file = self.options.dir.join("data").join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        // The server has no readiness notification but the status line it
        // writes into postmaster.pid, so this polls that line, bounded.
        while Instant::now() < deadline {
            if self.server.as_ref().is_some_and(|server| server.is_finished()) {
                let status = match self.server.take().map(thread::JoinHandle::join) {
                    Some(Ok(Ok(status))) => status.to_string(),
                    Some(Ok(Err(error))) => error.to_string(),
                    _ => "the supervisor thread panicked".into(),
                };
                return Err(EmbeddedError::Process {
                    what: "the PostgreSQL server".into(),
                    status,
                    log: log_tail(log_path),
                });
            }
            // A pid file left by an earlier server (or another process's) may
            // say "ready" too; only our own server's line counts.
            let ready = fs::read_to_string(&pid_file)
                .map(|text| {
                    let mut lines = text.lines();
                    lines.next().is_some_and(|pid| pid.trim() == server_pid.to_string())
                        && lines.nth(6).is_some_and(|status| status.trim() == "ready")
                })
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(EmbeddedError::StartTimeout { log: log_tail(log_path) })
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "stopping the embedded PostgreSQL failed");
        }
    }
}

/// Finds the directory with initdb, postgres and pg_ctl: `FERRY_PG_BINDIR`,
/// then `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`
/// (Debian installs the server there without putting it on the PATH).
fn find_bindir() -> Result<PathBuf, EmbeddedError> {
    let has_server =
        |dir: &Path| ["initdb", "postgres", "pg_ctl"].iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = std::env::var_os("FERRY_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) { Ok(dir) } else { Err(EmbeddedError::BinariesNotFound) };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or(EmbeddedError::BinariesNotFound)
}

/// Whether this process runs as root, in which case PostgreSQL runs as the
/// `postgres` user and its directories must be reachable by that user.
pub fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), EmbeddedError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_error("reading /etc/passwd"))?;
    passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[0] == "postgres")
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .next()
        .ok_or(EmbeddedError::NoPostgresUser)
}

/// Creates the cluster directory, private to the user that runs the server.
/// Missing parents are created world-traversable (0755), as the server's user
/// must be able to reach the directory.
fn prepare_dir(dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), EmbeddedError> {
    let what = || format!("preparing the cluster directory {}", dir.display());
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(io_error(what()))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io_error(what())(error));
        }
        _ => {}
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error(what()))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io_error(what()))?;
    }
    Ok(())
}

fn init_cluster(
    bindir: &Path,
    data_dir: &Path,
    run_as: Option<(u32, u32)>,
    options: &EmbeddedOptions,
) -> Result<(), EmbeddedError> {
    let mut initdb = Command::new(bindir.join("initdb"));
    initdb.arg("-D").arg(data_dir).args([
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--username",
        SUPERUSER,
    ]);
    if !options.durable {
        initdb.arg("--no-sync");
    }
    run_to_completion(&mut initdb, run_as, "initdb")
}

/// A started server: its process id, and the thread that waits for it and
/// ends with its exit status.
struct Server {
    supervisor: thread::JoinHandle<io::Result<ExitStatus>>,
    pid: u32,
}

/// Starts the server from a dedicated thread that waits for it.
fn spawn_server(
    bindir: &Path,
    options: &EmbeddedOptions,
    run_as: Option<(u32, u32)>,
    log_path: &Path,
) -> Result<Server, EmbeddedError> {
    let log = fs::File::create(log_path).map_err(io_error("creating the server log"))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(log_path, Some(uid), Some(gid))
            .map_err(io_error("handing the server log to the postgres user"))?;
    }
    let log_err = log.try_clone().map_err(io_error("opening the server log"))?;
    let durability = if options.durable { "on" } else { "off" };
    let mut server = Command::new(bindir.join("postgres"));
    server
        .arg("-D")
        .arg(options.dir.join("data"))
        .arg("-k")
        .arg(&options.dir)
        .args(["-c", "listen_addresses="])
        .args(["-c", "unix_socket_permissions=0700"])
        .args(["-c", "max_connections=200"])
        .args(["-c", &format!("fsync={durability}")])
        .args(["-c", &format!("synchronous_commit={durability}")])
        .args(["-c", &format!("full_page_writes={durability}")])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    set_user(&mut server, run_as);
    stop_with_parent(&mut server);

    let (started_tx, started_rx) = mpsc::channel();
    // The parent-death signal fires when the *thread* that spawned the child
    // ends, so the server gets a thread of its own that lives until it exits.
    let supervisor = thread::Builder::new()
        .name("embedded-postgres".into())
        .spawn(move || match server.spawn() {
            Ok(mut child) => {
                let _ = started_tx.send(Ok(child.id()));
                child.wait()
            }
            Err(error) => {
                let message = error.to_string();
                let _ = started_tx.send(Err(error));
                Err(io::Error::other(message))
            }
        })
        .map_err(io_error("starting the server's supervisor thread"))?;
    match started_rx.recv() {
        Ok(Ok(pid)) => Ok(Server { supervisor, pid }),
        Ok(Err(error)) => Err(io_error("starting the PostgreSQL server")(error)),
        Err(_) => Err(io_error("starting the PostgreSQL server")(io::Error::other(
            "the supervisor thread ended before starting the server",
        ))),
    }
}

fn set_user(command: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid).env("HOME", "/tmp").current_dir("/");
    }
}

/// Asks the kernel to send the server SIGINT (fast shutdown) when the thread
/// that started it ends, so a killed ferry never leaves a server behind.
#[allow(unsafe_code)]
fn stop_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // prctl and getppid, which are async-signal-safe. std applies uid/gid
    // before running it, so the signal survives the change of user.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the signal was armed.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("ferry exited while starting PostgreSQL"));
            }
            Ok(())
        });
    }
}

fn run_to_completion(
    command: &mut Command,
    run_as: Option<(u32, u32)>,
    what: &str,
) -> Result<(), EmbeddedError> {
    set_user(command, run_as);
    let output =
        command.stdin(Stdio::null()).output().map_err(io_error(format!("running {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(EmbeddedError::Process { what: what.into(), status: output.status.to_string(), log })
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn getrandom_fill(bytes: &mut [u8]) -> Result<(), EmbeddedError> {
    getrandom::fill(bytes)
        .map_err(|error| io_error("reading random bytes")(io::Error::other(error)))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes throwaway clusters under the temporary directory that were left by
/// processes that no longer exist (their servers stopped with their parent).
pub fn remove_stale_ephemeral_clusters(prefix: &str) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        let Some(pid) = rest.strip_prefix('-').and_then(|r| r.split('-').next()) else { continue };
        let owner_alive = Path::new("/proc").join(pid).exists();
        let server_alive = fs::read_to_string(entry.path().join("data").join("postmaster.pid"))
            .ok()
            .and_then(|text| {
                text.lines().next().map(|pid| Path::new("/proc").join(pid.trim()).exists())
            })
            .unwrap_or(false);
        if !owner_alive && !server_alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
