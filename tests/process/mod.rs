//! `ferry` run as a process by the end-to-end tests: started with its
//! first output line read, and stopped by a signal. A test that fails
//! leaves no process behind: each is killed when its handle is dropped,
//! as it is when the test panics.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use ferry_client::relay::RelayAddress;

/// Every wait here is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// A running `ferry` process, killed (SIGKILL) and reaped when dropped
/// unless it was waited for.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (at most [`WAIT`]) for the process to exit by itself.
    pub async fn wait(mut self) -> ExitStatus {
        let id = self.id();
        let mut child = self.child.take().expect("a process is waited for once");
        let waited = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                let status = child.wait();
                (child, status)
            }),
        )
        .await;
        match waited {
            Ok(joined) => joined.unwrap().1.unwrap(),
            Err(_) => {
                // The child is with the waiting thread: kill it by its id.
                let _ = Command::new("kill").args(["-KILL", &id.to_string()]).status();
                panic!("ferry {id} did not exit in time");
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `ferry` with `args` and returns it with its first output line.
pub async fn spawn(args: Vec<String>) -> (Process, String) {
    spawn_program(Path::new(env!("CARGO_BIN_EXE_ferry")), args).await
}

/// One of the workspace's examples, as `cargo test` built it beside the
/// test binaries (`target/<profile>/examples/`).
pub fn example(name: &str) -> std::path::PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let profile = test_binary.parent().and_then(Path::parent).unwrap();
    let path = profile.join("examples").join(name);
    assert!(path.exists(), "{} is not built: `cargo test` builds the examples", path.display());
    path
}

/// Starts `program` with `args` and returns it with its first output line.
pub async fn spawn_program(program: &Path, args: Vec<String>) -> (Process, String) {
    let child = Command::new(program)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Owned before anything can fail, so a failure below kills it.
    let mut process = Process { child: Some(child) };
    let stdout = process.child.as_mut().and_then(|child| child.stdout.take()).unwrap();
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
    .expect("the process starts in time")
    .unwrap();
    assert!(
        !line.is_empty(),
        "{} {args:?} exited before printing its first line",
        program.display()
    );
    (process, line)
}

/// Runs `ferry` with `args` to completion, bounded by [`WAIT`].
pub async fn run(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output(),
    )
    .await
    .expect("ferry finishes in time")
    .unwrap()
}

/// A finished command's standard output, then its standard error.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `ferry` with `args` and returns its standard output, failing the
/// test with its whole output if it fails.
pub async fn run_ok(args: &[&str]) -> String {
    let output = run(args).await;
    assert!(output.status.success(), "ferry {args:?} failed:\n{}", output_text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ferry` with `args` and `--json`; it must succeed.
pub async fn run_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run_ok(&[args, &["--json"]].concat()).await).unwrap()
}

/// Sends `signal` (as `kill` names it: `-TERM`, `-KILL`) and waits for
/// the process to exit.
pub async fn signal_and_wait(process: Process, signal: &str) -> ExitStatus {
    let sent = Command::new("kill").args([signal, &process.id().to_string()]).status().unwrap();
    assert!(sent.success());
    process.wait().await
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

/// The client's side of the relay handshake on `stream`, as `me` with
/// `nonce`, checking that the relay proves `relay.key`; the purpose frame
/// (OpenSession, Dial) is the caller's to send.
pub async fn authenticate(
    stream: &mut tokio::net::TcpStream,
    relay: &RelayAddress,
    me: &ferry_proto::SecretKey,
    nonce: [u8; 32],
) {
    use ferry_proto::wire::io::{read_frame, write_frame};
    use ferry_proto::wire::{Frame, WIRE_VERSION, transcript};
    let hello = Frame::ClientHello { version: WIRE_VERSION, client: me.public(), nonce };
    write_frame(stream, &hello).await.unwrap();
    let Frame::RelayHello { version, relay: key, nonce: relay_nonce, .. } =
        read_frame(stream).await.unwrap()
    else {
        panic!("expected a RelayHello")
    };
    assert_eq!(key, relay.key);
    let signed = transcript(b'C', version, &me.public(), &nonce, &key, &relay_nonce);
    write_frame(stream, &Frame::ClientAuth { signature: me.sign(&signed) }).await.unwrap();
}
