//! Choosing the database: a given URL, or a private cluster ferry starts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_ledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};

/// Connections in a command's pool.
const POOL_CONNECTIONS: u32 = 16;
/// The database ferry uses inside its own cluster.
pub const DATABASE_NAME: &str = "ferry";

/// A connected database, and the cluster serving it if ferry started one.
pub struct Database {
    pool: PgPool,
    cluster: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `url`, or starts (creating if needed) the private cluster
    /// in `data_dir`.
    pub async fn open(url: Option<String>, data_dir: &Path) -> anyhow::Result<Database> {
        match url {
            Some(url) => {
                let options: PgConnectOptions = url.parse().context("parsing the database URL")?;
                Database::connect(options, None).await
            }
            None => {
                let options = EmbeddedOptions {
                    dir: data_dir.to_owned(),
                    remove_on_stop: false,
                    durable: true,
                };
                Database::embedded(options).await
            }
        }
    }

    /// Starts a private cluster with `options` and connects to its ferry database.
    pub async fn embedded(options: EmbeddedOptions) -> anyhow::Result<Database> {
        let cluster = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options))
            .await
            .context("starting the embedded PostgreSQL")??;
        create_database_if_missing(&cluster).await?;
        let options = cluster.connect_options(DATABASE_NAME);
        Database::connect(options, Some(cluster)).await
    }

    async fn connect(
        options: PgConnectOptions,
        cluster: Option<EmbeddedPostgres>,
    ) -> anyhow::Result<Database> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .connect_with(options)
            .await
            .context("connecting to the database")?;
        Ok(Database { pool, cluster })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The private cluster, if ferry started one.
    pub fn cluster(&self) -> Option<&EmbeddedPostgres> {
        self.cluster.as_ref()
    }

    /// Closes the pool and stops the private cluster, if any.
    pub async fn close(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if let Some(cluster) = self.cluster {
            tokio::task::spawn_blocking(move || cluster.stop())
                .await
                .context("stopping the embedded PostgreSQL")??;
        }
        Ok(())
    }
}

async fn create_database_if_missing(cluster: &EmbeddedPostgres) -> anyhow::Result<()> {
    let mut admin = cluster.connect_options("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE_NAME)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        // DATABASE_NAME is a constant identifier.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {DATABASE_NAME}")))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(())
}

/// Where ferry keeps its private cluster by default: /var/lib/ferry for root
/// (the postgres user must be able to reach it, and root's home is closed),
/// else the XDG data directory.
pub fn default_data_dir() -> PathBuf {
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root.unwrap_or(false) {
        return PathBuf::from("/var/lib/ferry/postgres");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ferry/postgres")
}
