//! `ferry relay` and `ferry registry` as processes: one data directory,
//! one relay. (What a relay killed with SIGKILL loses is attacked in
//! tests/hostile.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod process;

use ferry_proto::SecretKey;
use process::{WAIT, relay_args, signal_and_wait, spawn};
use sqlx::ConnectOptions;

/// A `ferry registry` process on a fresh database, with its operator key in
/// `dir`; returns it, its URL and the operator key.
async fn start_registry(dir: &std::path::Path) -> (process::Process, String, SecretKey) {
    let options = ferry_ledger::testing::fresh_database().await.unwrap();
    let url = options.to_url_lossy().to_string();
    let operator_path = dir.join("operator.key");
    let (registry_process, line) = spawn(vec![
        "registry".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        url,
        "--operator-key".into(),
        operator_path.display().to_string(),
    ])
    .await;
    let base = line.strip_prefix("listening on ").unwrap().split_whitespace().next().unwrap();
    let operator = SecretKey::read_file(&operator_path).unwrap();
    (registry_process, base.to_owned(), operator)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_data_directory_in_use_is_refused() {
    let dir = scratch("locked");
    let (registry_process, base, _) = start_registry(&dir).await;
    let data = dir.join("data");
    let mut args = relay_args(&base, &dir, None);
    args.extend(["--data-dir".into(), data.display().to_string()]);
    let (first, _) = spawn(args.clone()).await;
    // The second one binds its own port and key, but not the directory.
    let mut second = relay_args(&base, &dir.join("second"), None);
    second.extend(["--data-dir".into(), data.display().to_string()]);
    std::fs::create_dir_all(dir.join("second")).unwrap();
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry")).args(&second).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second relay must not run: {stderr}");
    assert!(
        stderr.contains("is in use by another relay") && stderr.contains("--data-dir"),
        "the error names the cause and the way out: {stderr}"
    );
    // The first one goes on, and once it has stopped the directory is free.
    assert!(signal_and_wait(first, "-TERM").await.success());
    let (again, _) = spawn(args).await;
    assert!(signal_and_wait(again, "-TERM").await.success());
    assert!(signal_and_wait(registry_process, "-TERM").await.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
