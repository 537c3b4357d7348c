//! Databases for tests: one embedded cluster per test process, a fresh
//! database per test.
//!
//! When `DATABASE_URL` is set, tests create their databases on that server
//! instead (its role needs CREATEDB). Nothing has to be started by hand.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use crate::embedded::{EmbeddedOptions, EmbeddedPostgres, remove_stale_ephemeral_clusters};

/// The directory-name prefix of test clusters under the temporary directory.
const TEST_CLUSTER_PREFIX: &str = "ferry-test-pg";

static CLUSTER: OnceLock<Result<EmbeddedPostgres, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// Why a test database could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestDatabaseError {
    /// The embedded cluster did not start.
    #[error("starting the test cluster: {0}")]
    Cluster(String),
    /// The server refused a step.
    #[error("preparing a test database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Connection options of a new, empty database for one test.
///
/// Uses `DATABASE_URL`'s server when set, else this process's embedded cluster
/// (started on first use, stopped with the process).
pub async fn fresh_database() -> Result<PgConnectOptions, TestDatabaseError> {
    let server = match std::env::var("DATABASE_URL") {
        Ok(url) => url.parse::<PgConnectOptions>()?,
        Err(_) => cluster()?.connect_options("postgres"),
    };
    let name =
        format!("ferry_test_{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
    let mut admin = server.connect().await?;
    // The name is built from numbers only, so it needs no quoting.
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
        .execute(&mut admin)
        .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    admin.close().await?;
    Ok(server.database(&name))
}

fn cluster() -> Result<&'static EmbeddedPostgres, TestDatabaseError> {
    CLUSTER
        .get_or_init(|| {
            remove_stale_ephemeral_clusters(TEST_CLUSTER_PREFIX);
            // Test clusters skip fsync: they are thrown away with the process.
            EmbeddedOptions::ephemeral(TEST_CLUSTER_PREFIX, false)
                .and_then(EmbeddedPostgres::start)
                .map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(|error| TestDatabaseError::Cluster(error.clone()))
}
