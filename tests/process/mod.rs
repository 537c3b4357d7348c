//! `ferry` run as a process by the end-to-end tests: started with its
//! first output line read, and stopped by a signal.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_client::relay::RelayAddress;

/// Every wait here is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// Starts `ferry` with `args` and returns it with its first output line.
pub async fn spawn(args: Vec<String>) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Bounded by the child, which prints the line or exits.
    let line = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            // Later lines are read (and dropped) so the child never blocks.
            std::thread::spawn(move || {
                let mut rest = String::new();
                while reader.read_line(&mut rest).is_ok_and(|read| read > 0) {
                    rest.clear();
                }
            });
            line
        }),
    )
    .await
    .expect("ferry starts in time")
    .unwrap();
    assert!(!line.is_empty(), "ferry {args:?} exited before printing its address");
    (child, line)
}

pub async fn signal_and_wait(mut child: Child, signal: &str) -> std::process::ExitStatus {
    let sent = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait().unwrap()))
        .await
        .expect("ferry stops in time")
        .unwrap()
}

pub fn relay_args(registry: &str, dir: &Path, config: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "relay".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--registry".into(),
        registry.into(),
        "--key".into(),
        dir.join("relay.key").display().to_string(),
    ];
    if let Some(config) = config {
        args.extend(["--config".into(), config.display().to_string()]);
    }
    args
}

/// The relay's key and address from its first line:
/// `relay KEY listening on ADDR (...)`.
pub fn relay_address(line: &str) -> RelayAddress {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((words[0], words[2], words[3]), ("relay", "listening", "on"), "{line}");
    RelayAddress { key: words[1].parse().unwrap(), address: words[4].to_owned() }
}
