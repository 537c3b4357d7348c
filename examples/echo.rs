//! An echo service over ferry, in two roles:
//!
//! ```text
//! cargo run --example echo -- serve REGISTRY_URL KEY_FILE
//! cargo run --example echo -- dial REGISTRY_URL KEY_FILE PEER_KEY MESSAGE
//! ```
//!
//! `serve` listens on home relays chosen from the registry, prints
//! `echoing as KEY`, and sends every stream back to its sender. `dial`
//! opens a stream to PEER_KEY through a relay, paying it from KEY_FILE's
//! balance, sends MESSAGE, and prints the echo and what it paid.
//! docs/CLIENT.md, "Examples", sets up a market to run it against.

use std::path::Path;

use anyhow::Context;
use ferry_client::wallet::Budget;
use ferry_client::{Endpoint, EndpointConfig, RegistryClient};
use ferry_proto::{Amount, PublicKey, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", registry, key_file] => serve(endpoint(registry, key_file, None)?).await,
        ["dial", registry, key_file, peer, message] => {
            let budget =
                Budget { open: "0.1".parse()?, top_up: "0.1".parse()?, low_water: "0.01".parse()? };
            let peer: PublicKey = peer.parse().context("PEER_KEY is a key in hex")?;
            dial(endpoint(registry, key_file, Some(budget))?, peer, message).await
        }
        _ => anyhow::bail!(
            "usage: echo serve REGISTRY_URL KEY_FILE | echo dial REGISTRY_URL KEY_FILE PEER_KEY MESSAGE"
        ),
    }
}

/// An endpoint on the market at `registry` as the key in `key_file`; with
/// a budget it opens and tops up channels to pay the relays it dials
/// through.
fn endpoint(registry: &str, key_file: &str, budget: Option<Budget>) -> anyhow::Result<Endpoint> {
    let key = SecretKey::read_file(Path::new(key_file))
        .with_context(|| format!("key file {key_file} (`ferry key new {key_file}` makes one)"))?;
    let registry = RegistryClient::new(registry, key, RegistryClient::http()?);
    Ok(Endpoint::new(registry, EndpointConfig { budget, ..EndpointConfig::default() }))
}

async fn serve(endpoint: Endpoint) -> anyhow::Result<()> {
    endpoint.listen().await?;
    println!("echoing as {}", endpoint.key());
    while let Some(stream) = endpoint.accept().await {
        tokio::spawn(async move {
            let (mut from_peer, mut to_peer) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut from_peer, &mut to_peer).await;
            let _ = to_peer.shutdown().await;
        });
    }
    Ok(())
}

async fn dial(endpoint: Endpoint, peer: PublicKey, message: &str) -> anyhow::Result<()> {
    let mut stream = endpoint.dial(peer).await?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).await?;
    drop(stream);
    // Closing pays for the last bytes carried.
    endpoint.close().await;
    let paid =
        endpoint.paid().values().try_fold(Amount::ZERO, |total, paid| total.checked_add(*paid));
    println!("{echoed}");
    println!("paid {}", paid.context("the total paid overflows")?);
    Ok(())
}
