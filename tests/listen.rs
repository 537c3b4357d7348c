//! A listen is in force when `Session::listen` returns: the relay confirms
//! each Listen frame (Listening) once it applies, and the SDK waits for
//! that. A dial that reaches the relay the moment `listen` returns, over a
//! connection already through its handshake, is let through every time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../relay/tests/common/mod.rs"]
mod common;
mod process;

use std::sync::Arc;

use common::{Registry, RunningRelay, WAIT, key, store_dir};
use ferry_client::relay::{self, Event, Payer, RelayAddress, Session};
use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{Frame, ListenPolicy};
use ferry_proto::{PublicKey, SecretKey};
use tokio::net::TcpStream;

/// How many listen-then-dial rounds.
const ROUNDS: usize = 100;

/// A connection to `relay` through its handshake as `me`, its purpose
/// frame not yet sent: sending Dial on it is the fastest dial there is.
async fn authenticated(relay: &RelayAddress, me: &SecretKey) -> TcpStream {
    let mut stream = TcpStream::connect(&relay.address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    process::authenticate(&mut stream, relay, me, [3u8; 32]).await;
    stream
}

/// Accepts the first incoming tunnel on `session`.
async fn accept_one(relay: RelayAddress, me: SecretKey, session: Arc<Session>) -> TcpStream {
    loop {
        match session.next_event().await.expect("the session is open") {
            Event::Incoming { tunnel, .. } => {
                return relay::accept(&relay, &me, tunnel).await.unwrap();
            }
            Event::Closed { reason, message } => panic!("the session closed: {reason:?} {message}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_right_after_listen_returns_is_never_refused_as_not_listening() {
    let registry = Registry::start().await;
    let (relay_key, caller, callee) = (key(30), key(31), key(32));
    let relay = RunningRelay::start(&registry, &relay_key, |_| {}, store_dir("listen")).await;
    let channel = registry.fund(&caller, &relay_key.public(), "10").await;
    let at = relay.address.clone();
    let payer = Payer::new(channel, caller.clone());
    let paying = Session::open(&at, &caller, Some(channel), Some(payer)).await.unwrap();
    let callee_key: PublicKey = callee.public();

    for round in 0..ROUNDS {
        let mut dial = authenticated(&at, &caller).await;
        // A new listening session each round: a session starts closed.
        let listener = Arc::new(Session::open(&at, &callee, None, None).await.unwrap());
        tokio::time::timeout(WAIT, listener.listen(ListenPolicy::Open)).await.unwrap().unwrap();
        write_frame(&mut dial, &Frame::Dial { peer: callee_key }).await.unwrap();
        let accepting = tokio::spawn(accept_one(at.clone(), callee.clone(), Arc::clone(&listener)));
        match tokio::time::timeout(WAIT, read_frame(&mut dial)).await.unwrap().unwrap() {
            Frame::Connected { peer, .. } => assert_eq!(peer, callee_key),
            other => panic!("round {round}: the dial got {other:?}, not Connected"),
        }
        let far = tokio::time::timeout(WAIT, accepting).await.unwrap().unwrap();
        drop((dial, far));
        listener.close().await.unwrap();
    }
    paying.close().await.unwrap();
    relay.shutdown().await;
}
