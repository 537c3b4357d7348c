//! A paid download over ferry, in two roles:
//!
//! ```text
//! cargo run --example paid_download -- serve REGISTRY_URL KEY_FILE FILE
//! cargo run --example paid_download -- fetch REGISTRY_URL KEY_FILE PEER_KEY OUT_FILE
//! ```
//!
//! `serve` listens on home relays, prints `serving FILE as KEY`, and sends
//! every peer that dials it the file's blake3 hash, then the file. `fetch`
//! dials PEER_KEY through a relay, which it pays per byte from KEY_FILE's
//! balance, writes the file to OUT_FILE only if its hash matches, and
//! prints its size and what it paid. docs/CLIENT.md, "Examples", sets up a
//! market to run it against.

use std::path::Path;

use anyhow::Context;
use ferry_client::wallet::Budget;
use ferry_client::{Endpoint, EndpointConfig, RegistryClient};
use ferry_proto::{Amount, PublicKey, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest file this example sends or takes, so that it fits in memory.
const MAX_FILE_BYTES: u64 = 1 << 30;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", registry, key_file, file] => {
            serve(endpoint(registry, key_file, None)?, Path::new(file)).await
        }
        ["fetch", registry, key_file, peer, out] => {
            let budget =
                Budget { open: "0.5".parse()?, top_up: "0.5".parse()?, low_water: "0.1".parse()? };
            let peer: PublicKey = peer.parse().context("PEER_KEY is a key in hex")?;
            fetch(endpoint(registry, key_file, Some(budget))?, peer, Path::new(out)).await
        }
        _ => anyhow::bail!(
            "usage: paid_download serve REGISTRY_URL KEY_FILE FILE | paid_download fetch REGISTRY_URL KEY_FILE PEER_KEY OUT_FILE"
        ),
    }
}

/// An endpoint on the market at `registry` as the key in `key_file`; with
/// a budget it pays the relays it dials through.
fn endpoint(registry: &str, key_file: &str, budget: Option<Budget>) -> anyhow::Result<Endpoint> {
    let key = SecretKey::read_file(Path::new(key_file))
        .with_context(|| format!("key file {key_file} (`ferry key new {key_file}` makes one)"))?;
    let registry = RegistryClient::new(registry, key, RegistryClient::http()?);
    Ok(Endpoint::new(registry, EndpointConfig { budget, ..EndpointConfig::default() }))
}

async fn serve(endpoint: Endpoint, file: &Path) -> anyhow::Result<()> {
    let contents =
        tokio::fs::read(file).await.with_context(|| format!("reading {}", file.display()))?;
    anyhow::ensure!(contents.len() as u64 <= MAX_FILE_BYTES, "the file is over 1 GiB");
    let hash = blake3::hash(&contents);
    let contents = std::sync::Arc::new(contents);
    endpoint.listen().await?;
    println!("serving {} as {}", file.display(), endpoint.key());
    while let Some(mut stream) = endpoint.accept().await {
        let contents = std::sync::Arc::clone(&contents);
        tokio::spawn(async move {
            let sent = async {
                stream.write_all(hash.as_bytes()).await?;
                stream.write_all(&contents).await?;
                stream.shutdown().await?;
                // Reading to the peer's end lets the last bytes be acknowledged.
                stream.read_to_end(&mut Vec::new()).await
            };
            if let Err(error) = sent.await {
                eprintln!("a download to {} failed: {error}", stream.peer());
            }
        });
    }
    Ok(())
}

async fn fetch(endpoint: Endpoint, peer: PublicKey, out: &Path) -> anyhow::Result<()> {
    let mut stream = endpoint.dial(peer).await?;
    let mut claimed = [0u8; 32];
    stream.read_exact(&mut claimed).await.context("the peer sent no hash")?;
    let mut contents = Vec::new();
    (&mut stream).take(MAX_FILE_BYTES + 1).read_to_end(&mut contents).await?;
    stream.shutdown().await?;
    drop(stream);
    // Closing pays for the last bytes carried.
    endpoint.close().await;
    anyhow::ensure!(contents.len() as u64 <= MAX_FILE_BYTES, "the peer sent more than 1 GiB");
    let hash = blake3::hash(&contents);
    anyhow::ensure!(
        *hash.as_bytes() == claimed,
        "the download does not match its blake3; nothing was written"
    );
    tokio::fs::write(out, &contents).await.with_context(|| format!("writing {}", out.display()))?;
    let paid =
        endpoint.paid().values().try_fold(Amount::ZERO, |total, paid| total.checked_add(*paid));
    println!("fetched {} bytes, blake3 {hash}, into {}", contents.len(), out.display());
    println!("paid {}", paid.context("the total paid overflows")?);
    Ok(())
}
