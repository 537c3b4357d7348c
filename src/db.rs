//! Choosing the database: a given URL, or a private cluster ferry starts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_ledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

/// The database ferry uses inside its own cluster.
pub const DATABASE_NAME: &str = "ferry";

/// Where the database is, and the cluster serving it if ferry started one.
pub struct Database {
    options: PgConnectOptions,
    cluster: Option<EmbeddedPostgres>,
}

impl Database {
    /// Uses `url`, or starts (creating if needed) the private cluster in
    /// `data_dir`.
    pub async fn open(url: Option<String>, data_dir: &Path) -> anyhow::Result<Database> {
        match url {
            Some(url) => {
                let options = url.parse().context("parsing the database URL")?;
                Ok(Database { options, cluster: None })
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

    /// Starts a private cluster with `options`, with a ferry database in it.
    pub async fn embedded(options: EmbeddedOptions) -> anyhow::Result<Database> {
        let cluster = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options))
            .await
            .context("starting the embedded PostgreSQL")??;
        create_database_if_missing(&cluster).await?;
        Ok(Database { options: cluster.connect_options(DATABASE_NAME), cluster: Some(cluster) })
    }

    /// How to connect to the database.
    pub fn options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// The private cluster, if ferry started one.
    pub fn cluster(&self) -> Option<&EmbeddedPostgres> {
        self.cluster.as_ref()
    }

    /// Stops the private cluster, if any (its sessions are ended).
    pub async fn close(self) -> anyhow::Result<()> {
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
    if ferry_ledger::embedded::running_as_root() {
        return PathBuf::from("/var/lib/ferry/postgres");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ferry/postgres")
}
