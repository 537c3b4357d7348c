//! The AEAD under the peer streams' Noise records, measured on this
//! machine: snow's default resolver (RustCrypto) against the one ferry
//! uses (`ferry_client::secure::resolver`), each encrypting and then
//! decrypting full-size records on one core for the same time.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_client::secure::{MAX_PLAINTEXT_BYTES, NOISE_PARAMS, resolver};
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver};
use snow::{Builder, StatelessTransportState};

use super::Table;

/// How long each backend runs.
const RUN: Duration = Duration::from_millis(1500);

/// Adds one row per backend to `table`, with its ratio to snow's default.
pub fn rows(table: &mut Table) -> anyhow::Result<()> {
    let default = throughput(|| Box::new(DefaultResolver))?;
    let ferry = throughput(resolver)?;
    for (name, (sealed, both)) in [
        ("snow's default resolver (RustCrypto ChaCha20-Poly1305)", default),
        ("ferry's resolver (ring ChaCha20-Poly1305)", ferry),
    ] {
        table.row(format!(
            "| AEAD, {name}: encrypt / encrypt and decrypt, {}-byte records, one core | \
             {sealed:.0} / {both:.0} MiB/s | snow's default: {:.0} / {:.0} MiB/s | {:.2}× / {:.2}× |",
            MAX_PLAINTEXT_BYTES,
            default.0,
            default.1,
            sealed / default.0,
            both / default.1,
        ));
    }
    Ok(())
}

/// MiB/s of plaintext sealed alone, then sealed and opened, on transport
/// states that `resolver` builds.
fn throughput(resolver: impl Fn() -> BoxedCryptoResolver) -> anyhow::Result<(f64, f64)> {
    let (sender, receiver) = transport_pair(&resolver).context("an in-memory handshake")?;
    let plaintext = vec![0x5a; MAX_PLAINTEXT_BYTES];
    let mut record = vec![0; MAX_PLAINTEXT_BYTES + 16];
    let mut opened = vec![0; MAX_PLAINTEXT_BYTES + 16];
    let mut nonce = 0;
    let mut run = |open: bool| -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut bytes = 0u64;
        while started.elapsed() < RUN {
            let length = sender.write_message(nonce, &plaintext, &mut record)?;
            if open {
                receiver.read_message(nonce, &record[..length], &mut opened)?;
            }
            nonce += 1;
            bytes += plaintext.len() as u64;
        }
        Ok(bytes as f64 / started.elapsed().as_secs_f64() / f64::from(1 << 20))
    };
    Ok((run(false)?, run(true)?))
}

/// Both ends of a finished Noise handshake with ferry's parameters.
fn transport_pair(
    resolver: &impl Fn() -> BoxedCryptoResolver,
) -> Result<(StatelessTransportState, StatelessTransportState), snow::Error> {
    let builder =
        || Ok::<_, snow::Error>(Builder::with_resolver(NOISE_PARAMS.parse()?, resolver()));
    let (near_keys, far_keys) = (builder()?.generate_keypair()?, builder()?.generate_keypair()?);
    let mut near = builder()?.local_private_key(&near_keys.private)?.build_initiator()?;
    let mut far = builder()?.local_private_key(&far_keys.private)?.build_responder()?;
    let (mut message, mut payload) = (vec![0; 1024], vec![0; 1024]);
    for from_near in [true, false, true] {
        let (writer, reader) =
            if from_near { (&mut near, &mut far) } else { (&mut far, &mut near) };
        let length = writer.write_message(&[], &mut message)?;
        reader.read_message(&message[..length], &mut payload)?;
    }
    Ok((near.into_stateless_transport_mode()?, far.into_stateless_transport_mode()?))
}
