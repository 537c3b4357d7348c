//! The AEAD under the peer streams' Noise records, measured on this
//! machine: snow's own transport on its default backend (RustCrypto)
//! against ferry's record cipher (`ferry_client::secure::RecordCipher`:
//! ring's ChaCha20-Poly1305 or AES-256-GCM, in place), each sealing and then sealing and
//! opening full-size records on one core for the same time, with the
//! copies each does.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_client::secure::{
    MAX_PLAINTEXT_BYTES, NOISE_PARAMS, RecordCipher, RecordSuite, TAG_BYTES,
};
use snow::{Builder, StatelessTransportState};

use super::Table;

/// How long each backend runs.
const RUN: Duration = Duration::from_millis(1500);

/// Adds one row per backend to `table`, with its ratio to snow's default.
pub fn rows(table: &mut Table) -> anyhow::Result<()> {
    let snow = snow_throughput()?;
    let chacha = ferry_throughput(RecordSuite::ChaChaPoly)?;
    let aes = ferry_throughput(RecordSuite::AesGcm)?;
    for (name, (sealed, both)) in [
        ("snow's transport (RustCrypto ChaCha20-Poly1305)", snow),
        ("ferry's record cipher (ring ChaCha20-Poly1305, in place)", chacha),
        (
            "ferry's record cipher (ring AES-256-GCM, in place; when both peers have AES instructions)",
            aes,
        ),
    ] {
        table.row(format!(
            "| AEAD, {name}: encrypt / encrypt and decrypt, {}-byte records, one core | \
             {sealed:.0} / {both:.0} MiB/s | snow: {:.0} / {:.0} MiB/s | {:.2}× / {:.2}× |",
            MAX_PLAINTEXT_BYTES,
            snow.0,
            snow.1,
            sealed / snow.0,
            both / snow.1,
        ));
    }
    Ok(())
}

/// MiB/s of plaintext that `record` (sealing, and opening when told)
/// handles in [`RUN`], first sealing alone, then both.
fn throughput(mut record: impl FnMut(bool) -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    let mut run = |open: bool| -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut bytes = 0u64;
        while started.elapsed() < RUN {
            record(open)?;
            bytes += MAX_PLAINTEXT_BYTES as u64;
        }
        Ok(bytes as f64 / started.elapsed().as_secs_f64() / f64::from(1 << 20))
    };
    Ok((run(false)?, run(true)?))
}

fn snow_throughput() -> anyhow::Result<(f64, f64)> {
    let (sender, receiver) = snow_pair().context("an in-memory handshake")?;
    let plaintext = vec![0x5a; MAX_PLAINTEXT_BYTES];
    let mut record = vec![0; MAX_PLAINTEXT_BYTES + TAG_BYTES];
    let mut opened = vec![0; MAX_PLAINTEXT_BYTES + TAG_BYTES];
    let mut nonce = 0;
    throughput(|open| {
        let length = sender.write_message(nonce, &plaintext, &mut record)?;
        if open {
            receiver.read_message(nonce, &record[..length], &mut opened)?;
        }
        nonce += 1;
        Ok(())
    })
}

/// As the link's writer and reader use it: the plaintext copied behind a
/// frame and sealed there, the record opened where it was read.
fn ferry_throughput(suite: RecordSuite) -> anyhow::Result<(f64, f64)> {
    let mut key = [0; 32];
    getrandom::fill(&mut key).context("a random key")?;
    let (mut sender, mut receiver) =
        (RecordCipher::with(suite, &key)?, RecordCipher::with(suite, &key)?);
    let plaintext = vec![0x5a; MAX_PLAINTEXT_BYTES];
    let mut record = Vec::with_capacity(MAX_PLAINTEXT_BYTES + TAG_BYTES);
    let mut opening = false;
    throughput(|open| {
        if open && !opening {
            // The run with opening starts both ciphers at nonce 0.
            (sender, opening) = (RecordCipher::with(suite, &key)?, true);
        }
        record.clear();
        record.extend_from_slice(&plaintext);
        record.resize(MAX_PLAINTEXT_BYTES + TAG_BYTES, 0);
        sender.seal(&mut record)?;
        if open {
            receiver.open(&mut record)?;
        }
        Ok(())
    })
}

/// Both ends of a finished Noise handshake with ferry's parameters, in
/// snow's transport mode.
fn snow_pair() -> Result<(StatelessTransportState, StatelessTransportState), snow::Error> {
    let builder = || Ok::<_, snow::Error>(Builder::new(NOISE_PARAMS.parse()?));
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
