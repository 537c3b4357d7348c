//! End-to-end encryption between two peers (docs/PROTOCOL.md, "Peer
//! streams"): a Noise XX handshake whose static keys are bound to the
//! peers' ed25519 identities, then records of ciphertext. A relay in
//! between sees only ciphertext and cannot pose as either peer.
//!
//! Each link makes a fresh X25519 static key. The handshake's second and
//! third messages carry, encrypted, the sender's ed25519 key and its
//! signature of that static key; Noise XX proves each side holds its static
//! key, and the signature proves the static key belongs to the identity.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::{PublicKey, SecretKey, Signature};
use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use snow::HandshakeState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// The Noise protocol a link runs.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake, so that only this protocol's peers agree.
pub const PROLOGUE: &[u8] = b"ferry/e2e/v1";
/// Domain tag of the signature that binds a Noise static key to an
/// ed25519 identity.
pub const STATIC_KEY_TAG: &[u8] = b"ferry/noise-static-key/v1\0";
/// The largest record on the wire: Noise's message bound.
pub const MAX_RECORD_BYTES: usize = 65_535;
/// Noise's authentication tag on every record.
pub const TAG_BYTES: usize = 16;
/// The most plaintext one record carries.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_RECORD_BYTES - TAG_BYTES;
/// The most a link's reader asks its connection for at once. Records it
/// returns are slices of this memory, so at most about twice their bytes
/// stay allocated while the application holds them.
pub const READ_AHEAD_BYTES: usize = 2 * (2 + MAX_RECORD_BYTES);
/// How long the whole handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An identity payload: ed25519 key and its signature of the static key.
const IDENTITY_BYTES: usize = 32 + 64;

/// Why an encrypted link failed.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The underlying connection failed or ended.
    #[error("link: {0}")]
    Io(#[from] std::io::Error),
    /// A record did not decrypt, or the handshake broke Noise's rules.
    #[error("encryption: {0}")]
    Noise(String),
    /// The peer's identity proof is malformed or does not verify.
    #[error("the peer did not prove its identity")]
    Identity,
    /// The peer proved a key other than the one dialled.
    #[error("expected peer {expected}, but {actual} answered")]
    WrongPeer {
        /// The key dialled.
        expected: PublicKey,
        /// The key that answered.
        actual: PublicKey,
    },
    /// A record's length is below a tag's or above [`MAX_RECORD_BYTES`].
    #[error("a record of {0} bytes is out of bounds")]
    RecordLength(usize),
    /// The handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("the encrypted handshake timed out")]
    Timeout,
}

/// A Noise builder for the handshake. Its cryptography is snow's default
/// (RustCrypto): the handshake is three small messages, and records do
/// not go through snow (see [`RecordCipher`]).
fn builder() -> Result<snow::Builder<'static>, SecureError> {
    Ok(snow::Builder::new(NOISE_PARAMS.parse().map_err(noise)?))
}

fn noise(error: snow::Error) -> SecureError {
    SecureError::Noise(error.to_string())
}

/// The AEAD that seals a link's records (docs/PROTOCOL.md, "Record
/// ciphers"): Noise's ChaChaPoly unless both peers have AES in hardware and
/// agreed on AES-256-GCM in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSuite {
    /// ChaCha20-Poly1305 with Noise's ChaChaPoly nonces: the protocol's
    /// own cipher, and the one of any peer that offers nothing.
    ChaChaPoly,
    /// AES-256-GCM with Noise's AESGCM nonces: about 4 times as fast
    /// where the CPU has AES instructions (docs/BENCHMARKS.md, "AEAD").
    AesGcm,
}

/// The byte that offers AES-256-GCM (message 1's payload) and that chooses
/// it (the last byte of message 2's payload).
const AES_GCM_BYTE: u8 = 1;
/// The byte that, in message 2, keeps ChaChaPoly after an offer.
const CHACHA_POLY_BYTE: u8 = 0;

impl RecordSuite {
    /// The suite this machine offers, and accepts when offered: AES-256-GCM
    /// only with AES (and carry-less multiply) instructions, where it is
    /// fast and constant-time.
    pub fn preferred() -> RecordSuite {
        #[cfg(target_arch = "x86_64")]
        let hardware = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(target_arch = "aarch64")]
        let hardware = std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let hardware = false;
        if hardware { RecordSuite::AesGcm } else { RecordSuite::ChaChaPoly }
    }
}

/// One direction of a link's record encryption: a Noise transport cipher
/// state (the key from the handshake's split, a 64-bit counter as the
/// nonce behind 32 zero bits, little-endian for ChaChaPoly and big-endian
/// for AESGCM as Noise says, no associated data), run on ring, which seals
/// and opens in place. snow's own transport copies every record once more
/// on each side, and ring's implementations are the fastest reviewed ones
/// we measured (docs/BENCHMARKS.md, "AEAD").
pub struct RecordCipher {
    key: LessSafeKey,
    suite: RecordSuite,
    nonce: u64,
}

impl RecordCipher {
    /// A cipher state of `suite` with `key`, at nonce 0.
    pub fn with(suite: RecordSuite, key: &[u8; 32]) -> Result<RecordCipher, SecureError> {
        let algorithm = match suite {
            RecordSuite::ChaChaPoly => &CHACHA20_POLY1305,
            RecordSuite::AesGcm => &AES_256_GCM,
        };
        let key = UnboundKey::new(algorithm, key)
            .map_err(|_| SecureError::Noise("ring refused a record key".into()))?;
        Ok(RecordCipher { key: LessSafeKey::new(key), suite, nonce: 0 })
    }

    /// The next record's nonce. Noise reserves the largest counter.
    fn next_nonce(&mut self) -> Result<Nonce, SecureError> {
        if self.nonce == u64::MAX {
            return Err(SecureError::Noise("the link used up its nonces".into()));
        }
        let mut nonce = [0; 12];
        nonce[4..].copy_from_slice(&match self.suite {
            RecordSuite::ChaChaPoly => self.nonce.to_le_bytes(),
            RecordSuite::AesGcm => self.nonce.to_be_bytes(),
        });
        self.nonce += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Seals `record` in place: its plaintext, then [`TAG_BYTES`] of room
    /// that the tag overwrites.
    pub fn seal(&mut self, record: &mut [u8]) -> Result<(), SecureError> {
        let plaintext_bytes =
            record.len().checked_sub(TAG_BYTES).ok_or(SecureError::RecordLength(record.len()))?;
        let (plaintext, tag) = record.split_at_mut(plaintext_bytes);
        let nonce = self.next_nonce()?;
        let sealed = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), plaintext)
            .map_err(|_| SecureError::Noise("a record did not seal".into()))?;
        tag.copy_from_slice(sealed.as_ref());
        Ok(())
    }

    /// Opens `record` in place and returns its plaintext's length.
    pub fn open(&mut self, record: &mut [u8]) -> Result<usize, SecureError> {
        let nonce = self.next_nonce()?;
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::empty(), record)
            .map_err(|_| SecureError::Noise("a record did not decrypt".into()))?;
        Ok(plaintext.len())
    }
}

/// Anything a link can run over: a relay tunnel or a direct TCP stream.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// The receiving half of an encrypted link.
pub struct SecureReader {
    inner: ReadHalf<Box<dyn Transport>>,
    cipher: RecordCipher,
    /// Bytes read from the link and not yet returned: whole records, then
    /// the start of the next. Each plaintext is split off it.
    buffer: BytesMut,
}

/// The sending half of an encrypted link.
pub struct SecureWriter {
    inner: WriteHalf<Box<dyn Transport>>,
    cipher: RecordCipher,
    /// The framed record being sealed and written.
    record: Vec<u8>,
}

impl std::fmt::Debug for SecureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureReader").field("nonce", &self.cipher.nonce).finish()
    }
}

impl std::fmt::Debug for SecureWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureWriter").field("nonce", &self.cipher.nonce).finish()
    }
}

/// Reads one length-prefixed handshake message into `record`.
async fn read_raw(
    inner: &mut (impl AsyncRead + Unpin),
    record: &mut Vec<u8>,
) -> Result<(), SecureError> {
    let length = usize::from(inner.read_u16().await?);
    if length == 0 {
        return Err(SecureError::RecordLength(length));
    }
    record.resize(length, 0);
    inner.read_exact(record).await?;
    Ok(())
}

/// Writes `record` with its length prefix, in one write.
async fn write_raw(
    inner: &mut (impl AsyncWrite + Unpin),
    framed: &mut [u8],
    record_len: usize,
) -> Result<(), SecureError> {
    let length = u16::try_from(record_len).map_err(|_| SecureError::RecordLength(record_len))?;
    framed[..2].copy_from_slice(&length.to_be_bytes());
    inner.write_all(&framed[..2 + record_len]).await?;
    Ok(())
}

impl SecureReader {
    /// The next record's plaintext, opened where it was read. Reads take
    /// what the connection has, up to [`READ_AHEAD_BYTES`], so that one
    /// read often brings several records.
    pub async fn read(&mut self) -> Result<Bytes, SecureError> {
        loop {
            if let Some(&[high, low]) = self.buffer.get(..2) {
                let length = usize::from(u16::from_be_bytes([high, low]));
                if length < TAG_BYTES {
                    return Err(SecureError::RecordLength(length));
                }
                if self.buffer.len() >= 2 + length {
                    let mut record = self.buffer.split_to(2 + length).split_off(2);
                    let plaintext_bytes = self.cipher.open(&mut record)?;
                    record.truncate(plaintext_bytes);
                    return Ok(record.freeze());
                }
            }
            if self.buffer.capacity() - self.buffer.len() < 2 + MAX_RECORD_BYTES {
                // Records returned earlier keep their part of the old
                // memory; only the start of the next one moves.
                self.buffer.reserve(READ_AHEAD_BYTES);
            }
            if self.inner.read_buf(&mut self.buffer).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }
}

impl SecureWriter {
    /// Encrypts and sends one record of at most [`MAX_PLAINTEXT_BYTES`].
    pub async fn write(&mut self, plaintext: &[u8]) -> Result<(), SecureError> {
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(SecureError::RecordLength(plaintext.len() + TAG_BYTES));
        }
        let record_bytes = plaintext.len() + TAG_BYTES;
        self.record.clear();
        // At most MAX_RECORD_BYTES, checked above.
        self.record.extend_from_slice(&(record_bytes as u16).to_be_bytes());
        self.record.extend_from_slice(plaintext);
        self.record.resize(2 + record_bytes, 0);
        self.cipher.seal(&mut self.record[2..])?;
        Ok(self.inner.write_all(&self.record).await?)
    }

    /// Ends the sending direction of the underlying connection.
    pub async fn shutdown(&mut self) -> Result<(), SecureError> {
        Ok(self.inner.shutdown().await?)
    }
}

/// What one side proves: its ed25519 key and its signature of the Noise
/// static key it uses on this link.
fn identity(me: &SecretKey, static_public: &[u8]) -> Vec<u8> {
    let mut payload = me.public().as_bytes().to_vec();
    payload.extend_from_slice(me.sign(&static_key_message(static_public)).as_bytes());
    payload
}

/// The bytes an identity proof signs: the tag and the Noise static key.
fn static_key_message(static_public: &[u8]) -> Vec<u8> {
    [STATIC_KEY_TAG, static_public].concat()
}

/// Checks the peer's identity payload against the static key the
/// handshake proved it holds.
fn verify_identity(payload: &[u8], handshake: &HandshakeState) -> Result<PublicKey, SecureError> {
    let (Ok(payload), Some(remote_static)) =
        (<&[u8; IDENTITY_BYTES]>::try_from(payload), handshake.get_remote_static())
    else {
        return Err(SecureError::Identity);
    };
    let (key, signature) = payload.split_at(32);
    let key = <&[u8; 32]>::try_from(key).map_err(|_| SecureError::Identity)?;
    let key = PublicKey::from_bytes(key).map_err(|_| SecureError::Identity)?;
    let signature = <&[u8; 64]>::try_from(signature).map_err(|_| SecureError::Identity)?;
    key.verify(&static_key_message(remote_static), &Signature::from_bytes(*signature))
        .map_err(|_| SecureError::Identity)?;
    Ok(key)
}

/// A handshake in progress over one transport.
struct Handshake {
    state: HandshakeState,
    static_public: Vec<u8>,
    reader: ReadHalf<Box<dyn Transport>>,
    writer: WriteHalf<Box<dyn Transport>>,
    buffer: Vec<u8>,
}

impl Handshake {
    fn new(transport: Box<dyn Transport>, initiator: bool) -> Result<Handshake, SecureError> {
        let builder = builder()?;
        let keypair = builder.generate_keypair().map_err(noise)?;
        let builder =
            builder.prologue(PROLOGUE).map_err(noise)?.local_private_key(&keypair.private);
        let builder = builder.map_err(noise)?;
        let state = if initiator { builder.build_initiator() } else { builder.build_responder() }
            .map_err(noise)?;
        let (reader, writer) = tokio::io::split(transport);
        let buffer = vec![0; 2 + MAX_RECORD_BYTES];
        Ok(Handshake { state, static_public: keypair.public, reader, writer, buffer })
    }

    async fn send(&mut self, payload: &[u8]) -> Result<(), SecureError> {
        let length = self.state.write_message(payload, &mut self.buffer[2..]).map_err(noise)?;
        write_raw(&mut self.writer, &mut self.buffer, length).await
    }

    async fn receive(&mut self) -> Result<Vec<u8>, SecureError> {
        let mut message = Vec::new();
        read_raw(&mut self.reader, &mut message).await?;
        let mut payload = vec![0; message.len()];
        let length = self.state.read_message(&message, &mut payload).map_err(noise)?;
        payload.truncate(length);
        Ok(payload)
    }

    fn finish(mut self, suite: RecordSuite) -> Result<(SecureReader, SecureWriter), SecureError> {
        if !self.state.is_handshake_finished() {
            return Err(SecureError::Noise("the handshake did not finish".into()));
        }
        // Noise's split: the initiator sends with the first key.
        let (first, second) = self.state.dangerously_get_raw_split();
        let (sending, receiving) =
            if self.state.is_initiator() { (first, second) } else { (second, first) };
        let reader = SecureReader {
            inner: self.reader,
            cipher: RecordCipher::with(suite, &receiving)?,
            buffer: BytesMut::new(),
        };
        let writer = SecureWriter {
            inner: self.writer,
            cipher: RecordCipher::with(suite, &sending)?,
            record: Vec::new(),
        };
        Ok((reader, writer))
    }
}

async fn bounded<T>(
    handshake: impl Future<Output = Result<T, SecureError>>,
) -> Result<T, SecureError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.map_err(|_| SecureError::Timeout)?
}

/// Runs the dialling side's handshake as `me` over `transport`; succeeds
/// only if the other side proves `peer`.
pub async fn initiate(
    transport: Box<dyn Transport>,
    me: &SecretKey,
    peer: &PublicKey,
) -> Result<(SecureReader, SecureWriter), SecureError> {
    initiate_offering(transport, me, peer, RecordSuite::preferred()).await
}

/// [`initiate`], offering `offer` for the records.
async fn initiate_offering(
    transport: Box<dyn Transport>,
    me: &SecretKey,
    peer: &PublicKey,
    offer: RecordSuite,
) -> Result<(SecureReader, SecureWriter), SecureError> {
    bounded(async {
        let mut handshake = Handshake::new(transport, true)?;
        // The offer rides in message 1, in the clear but hashed into the
        // handshake: a relay that strips it breaks message 2.
        let offered = offer == RecordSuite::AesGcm;
        handshake.send(if offered { &[AES_GCM_BYTE] } else { &[] }).await?;
        let payload = handshake.receive().await?;
        let (proof, suite) = answer(offered, &payload)?;
        let actual = verify_identity(proof, &handshake.state)?;
        if actual != *peer {
            return Err(SecureError::WrongPeer { expected: *peer, actual });
        }
        let proof = identity(me, &handshake.static_public);
        handshake.send(&proof).await?;
        handshake.finish(suite)
    })
    .await
}

/// Message 2's payload split into the callee's proof and the record suite.
/// The proof's fixed length tells an answer from none: a callee that does
/// not know the offer answers with its proof alone, whose last byte may be
/// anything.
fn answer(offered: bool, payload: &[u8]) -> Result<(&[u8], RecordSuite), SecureError> {
    match (offered, payload.split_at_checked(IDENTITY_BYTES)) {
        (true, Some((proof, &[AES_GCM_BYTE]))) => Ok((proof, RecordSuite::AesGcm)),
        (true, Some((proof, &[CHACHA_POLY_BYTE]))) => Ok((proof, RecordSuite::ChaChaPoly)),
        (true, Some((_, &[_]))) => {
            Err(SecureError::Noise("an unknown record cipher answer".into()))
        }
        _ => Ok((payload, RecordSuite::ChaChaPoly)),
    }
}

/// Runs the accepting side's handshake as `me` over `transport`; returns
/// the identity the dialler proved.
pub async fn respond(
    transport: Box<dyn Transport>,
    me: &SecretKey,
) -> Result<(PublicKey, SecureReader, SecureWriter), SecureError> {
    respond_accepting(transport, me, RecordSuite::preferred()).await
}

/// [`respond`], taking AES-256-GCM if offered only when `accept` is it.
async fn respond_accepting(
    transport: Box<dyn Transport>,
    me: &SecretKey,
    accept: RecordSuite,
) -> Result<(PublicKey, SecureReader, SecureWriter), SecureError> {
    bounded(async {
        let mut handshake = Handshake::new(transport, false)?;
        let offer = handshake.receive().await?;
        let mut proof = identity(me, &handshake.static_public);
        // Any other first payload is an offer of nothing this side knows.
        let suite = if offer == [AES_GCM_BYTE] {
            proof.push(match accept {
                RecordSuite::AesGcm => AES_GCM_BYTE,
                RecordSuite::ChaChaPoly => CHACHA_POLY_BYTE,
            });
            accept
        } else {
            RecordSuite::ChaChaPoly
        };
        handshake.send(&proof).await?;
        let payload = handshake.receive().await?;
        let peer = verify_identity(&payload, &handshake.state)?;
        let (reader, writer) = handshake.finish(suite)?;
        Ok((peer, reader, writer))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    async fn pair(
        dialled: &SecretKey,
        answering: &SecretKey,
    ) -> (
        Result<(SecureReader, SecureWriter), SecureError>,
        Result<(PublicKey, SecureReader, SecureWriter), SecureError>,
    ) {
        let (near, far) = tokio::io::duplex(4096);
        let me = key(1);
        let answering = answering.clone();
        let responder = tokio::spawn(async move { respond(Box::new(far), &answering).await });
        let initiated = initiate(Box::new(near), &me, &dialled.public()).await;
        (initiated, responder.await.unwrap())
    }

    /// A link between a dialler offering `offer` and an answerer accepting
    /// `accept`; both sides' record suites, after a record each way.
    async fn negotiated(offer: RecordSuite, accept: RecordSuite) -> (RecordSuite, RecordSuite) {
        let (near, far) = tokio::io::duplex(1 << 16);
        let responder =
            tokio::spawn(async move { respond_accepting(Box::new(far), &key(2), accept).await });
        let (mut dial_reader, mut dial_writer) =
            initiate_offering(Box::new(near), &key(1), &key(2).public(), offer).await.unwrap();
        let (caller, mut accept_reader, mut accept_writer) = responder.await.unwrap().unwrap();
        assert_eq!(caller, key(1).public());
        dial_writer.write(b"there").await.unwrap();
        assert_eq!(accept_reader.read().await.unwrap(), &b"there"[..]);
        accept_writer.write(b"and back").await.unwrap();
        assert_eq!(dial_reader.read().await.unwrap(), &b"and back"[..]);
        (dial_writer.cipher.suite, accept_writer.cipher.suite)
    }

    #[tokio::test]
    async fn aes_gcm_is_used_only_when_both_sides_take_it() {
        use RecordSuite::{AesGcm, ChaChaPoly};
        assert_eq!(negotiated(AesGcm, AesGcm).await, (AesGcm, AesGcm));
        // An answerer without AES instructions keeps ChaChaPoly, and so
        // does any dialler that offers nothing (an older one).
        assert_eq!(negotiated(AesGcm, ChaChaPoly).await, (ChaChaPoly, ChaChaPoly));
        assert_eq!(negotiated(ChaChaPoly, AesGcm).await, (ChaChaPoly, ChaChaPoly));
    }

    #[tokio::test]
    async fn an_answerer_that_knows_no_offer_is_still_reached_with_chachapoly() {
        older_answerer_handshake().await;
    }

    #[test]
    fn a_bare_proof_ending_in_an_answer_byte_is_still_a_bare_proof() {
        // An older callee's proof ends in a random byte, 01 or 00 one time
        // in 128: its length, not its last byte, says there is no answer.
        for last in [AES_GCM_BYTE, CHACHA_POLY_BYTE, 7] {
            let mut proof = vec![5u8; IDENTITY_BYTES];
            proof[IDENTITY_BYTES - 1] = last;
            let (bare, suite) = answer(true, &proof).unwrap();
            assert_eq!((bare.len(), suite), (IDENTITY_BYTES, RecordSuite::ChaChaPoly));
            let answered = [&proof[..], &[AES_GCM_BYTE]].concat();
            assert_eq!(answer(true, &answered).unwrap().1, RecordSuite::AesGcm);
            // Without an offer an extra byte is no answer: the proof check refuses it.
            assert_eq!(answer(false, &answered).unwrap().0.len(), IDENTITY_BYTES + 1);
        }
        let unknown = [&[5u8; IDENTITY_BYTES][..], &[9]].concat();
        assert!(matches!(answer(true, &unknown), Err(SecureError::Noise(_))));
    }

    /// An older answerer: it ignores message 1's payload and answers with
    /// its bare proof.
    async fn older_answerer_handshake() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let older = tokio::spawn(async move {
            let mut handshake = Handshake::new(Box::new(far), false)?;
            handshake.receive().await?;
            let proof = identity(&key(2), &handshake.static_public);
            handshake.send(&proof).await?;
            handshake.receive().await?;
            handshake.finish(RecordSuite::ChaChaPoly)
        });
        let (_, mut writer) =
            initiate_offering(Box::new(near), &key(1), &key(2).public(), RecordSuite::AesGcm)
                .await
                .unwrap();
        let (mut reader, _) = older.await.unwrap().unwrap();
        assert_eq!(writer.cipher.suite, RecordSuite::ChaChaPoly);
        writer.write(b"old friend").await.unwrap();
        assert_eq!(reader.read().await.unwrap(), &b"old friend"[..]);
    }

    #[tokio::test]
    async fn a_relay_that_strips_the_offer_breaks_the_handshake_instead_of_downgrading_it() {
        let (near, tap_far) = tokio::io::duplex(1 << 16);
        let (tap_near, far) = tokio::io::duplex(1 << 16);
        let responder = tokio::spawn(async move {
            respond_accepting(Box::new(far), &key(2), RecordSuite::AesGcm).await
        });
        let tap = tokio::spawn(async move {
            let (mut from_dialer, mut to_dialer) = tokio::io::split(tap_far);
            let (mut from_answerer, mut to_answerer) = tokio::io::split(tap_near);
            // Message 1 is the ephemeral key (32 bytes), then the offer.
            let mut message = Vec::new();
            read_raw(&mut from_dialer, &mut message).await.unwrap();
            assert_eq!(message.len(), 33, "an offer rides in message 1");
            message.truncate(32);
            to_answerer.write_u16(32).await.unwrap();
            to_answerer.write_all(&message).await.unwrap();
            let _ = tokio::io::copy(&mut from_answerer, &mut to_dialer).await;
        });
        let dialled =
            initiate_offering(Box::new(near), &key(1), &key(2).public(), RecordSuite::AesGcm).await;
        assert!(matches!(dialled, Err(SecureError::Noise(_))), "{dialled:?}");
        responder.abort();
        tap.abort();
    }

    #[tokio::test]
    async fn records_cross_encrypted_and_both_identities_are_proven() {
        let (initiated, responded) = pair(&key(2), &key(2)).await;
        let (mut dial_reader, mut dial_writer) = initiated.unwrap();
        let (caller, mut accept_reader, mut accept_writer) = responded.unwrap();
        assert_eq!(caller, key(1).public());
        dial_writer.write(b"hello").await.unwrap();
        assert_eq!(accept_reader.read().await.unwrap(), &b"hello"[..]);
        let large = vec![7u8; MAX_PLAINTEXT_BYTES];
        let (written, read) = tokio::join!(accept_writer.write(&large), dial_reader.read());
        written.unwrap();
        assert_eq!(read.unwrap(), large);
        assert!(matches!(
            dial_writer.write(&vec![0; MAX_PLAINTEXT_BYTES + 1]).await,
            Err(SecureError::RecordLength(_))
        ));
    }

    /// Records of assorted sizes, over pipes that cut them anywhere (a small
    /// buffer) or bring several in one read (a large one), arrive whole and
    /// in order.
    #[tokio::test]
    async fn records_arrive_whole_however_the_connection_cuts_them() {
        for pipe_bytes in [7, 1 << 20] {
            let (near, far) = tokio::io::duplex(pipe_bytes);
            let answering = key(2);
            let responder = tokio::spawn(async move { respond(Box::new(far), &answering).await });
            let (_, mut writer) =
                initiate(Box::new(near), &key(1), &key(2).public()).await.unwrap();
            let (_, mut reader, _) = responder.await.unwrap().unwrap();
            let sizes: Vec<usize> =
                (0..40).map(|i| [0, 1, 15, 16, 4096, MAX_PLAINTEXT_BYTES][i % 6]).collect();
            let records: Vec<Vec<u8>> =
                sizes.iter().enumerate().map(|(i, &size)| vec![i as u8; size]).collect();
            let sent = records.clone();
            let writing = tokio::spawn(async move {
                for record in &sent {
                    writer.write(record).await.unwrap();
                }
                writer
            });
            for record in &records {
                assert_eq!(reader.read().await.unwrap(), record[..], "pipe of {pipe_bytes} bytes");
            }
            drop(writing.await.unwrap());
            // The writer is gone: the next read ends, it does not hang.
            assert!(matches!(reader.read().await, Err(SecureError::Io(_))));
        }
    }

    #[tokio::test]
    async fn a_record_shorter_than_its_tag_or_cut_off_is_refused() {
        for (wire, too_short) in [(&[0u8, 15, 1, 2][..], true), (&[0, 40, 1, 2, 3][..], false)] {
            let (mut near, far) = tokio::io::duplex(1 << 10);
            let (reader, _) = tokio::io::split(Box::new(far) as Box<dyn Transport>);
            let mut reader = SecureReader {
                inner: reader,
                cipher: RecordCipher::with(RecordSuite::ChaChaPoly, &[9; 32]).unwrap(),
                buffer: BytesMut::new(),
            };
            near.write_all(wire).await.unwrap();
            drop(near);
            let refused = reader.read().await.unwrap_err();
            match refused {
                SecureError::RecordLength(15) if too_short => {}
                SecureError::Io(_) if !too_short => {}
                other => panic!("{wire:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_peer_proving_another_key_is_refused() {
        let (initiated, _) = pair(&key(2), &key(3)).await;
        match initiated {
            Err(SecureError::WrongPeer { expected, actual }) => {
                assert_eq!((expected, actual), (key(2).public(), key(3).public()));
            }
            other => panic!("expected WrongPeer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tampered_record_does_not_decrypt() {
        let (near, far) = tokio::io::duplex(1 << 16);
        // A tap between the two sides flips one ciphertext bit of the
        // first transport record.
        let (tap_near, tap_far) = tokio::io::duplex(1 << 16);
        let answering = key(2);
        let responder = tokio::spawn(async move { respond(Box::new(far), &answering).await });
        let forward = tokio::spawn(async move {
            let (mut from_dialer, mut to_dialer) = tokio::io::split(tap_far);
            let (mut from_responder, mut to_responder) = tokio::io::split(near);
            let backward =
                tokio::spawn(
                    async move { tokio::io::copy(&mut from_responder, &mut to_dialer).await },
                );
            // Three handshake messages pass, two of them this way.
            let mut record = Vec::new();
            for _ in 0..2 {
                read_raw(&mut from_dialer, &mut record).await.unwrap();
                to_responder.write_u16(record.len() as u16).await.unwrap();
                to_responder.write_all(&record).await.unwrap();
            }
            read_raw(&mut from_dialer, &mut record).await.unwrap();
            record[0] ^= 1;
            to_responder.write_u16(record.len() as u16).await.unwrap();
            to_responder.write_all(&record).await.unwrap();
            backward.abort();
        });
        let (_, mut writer) =
            initiate(Box::new(tap_near), &key(1), &key(2).public()).await.unwrap();
        let (_, mut reader, _) = responder.await.unwrap().unwrap();
        writer.write(b"secret").await.unwrap();
        assert!(matches!(reader.read().await, Err(SecureError::Noise(_))));
        forward.await.unwrap();
    }

    /// An in-memory handshake up to the responder's proof, which the
    /// initiator has not yet checked: returns its state and the proof.
    fn half_handshake() -> (HandshakeState, Vec<u8>) {
        let new_builder = || builder().unwrap();
        let keys =
            (new_builder().generate_keypair().unwrap(), new_builder().generate_keypair().unwrap());
        let mut initiator =
            new_builder().local_private_key(&keys.0.private).unwrap().build_initiator().unwrap();
        let mut responder =
            new_builder().local_private_key(&keys.1.private).unwrap().build_responder().unwrap();
        let (mut message, mut payload) = (vec![0; 1024], vec![0; 1024]);
        let length = initiator.write_message(&[], &mut message).unwrap();
        responder.read_message(&message[..length], &mut payload).unwrap();
        let length =
            responder.write_message(&identity(&key(2), &keys.1.public), &mut message).unwrap();
        let read = initiator.read_message(&message[..length], &mut payload).unwrap();
        payload.truncate(read);
        (initiator, payload)
    }

    /// Both ends of an in-memory handshake, each with the raw keys of
    /// its split, then in snow's own transport mode.
    fn snow_pair() -> ((RecordCipher, RecordCipher), snow::StatelessTransportState) {
        let keys = (
            builder().unwrap().generate_keypair().unwrap(),
            builder().unwrap().generate_keypair().unwrap(),
        );
        let mut near = builder()
            .unwrap()
            .local_private_key(&keys.0.private)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut far = builder()
            .unwrap()
            .local_private_key(&keys.1.private)
            .unwrap()
            .build_responder()
            .unwrap();
        let (mut message, mut payload) = (vec![0; 1024], vec![0; 1024]);
        for from_near in [true, false, true] {
            let (writer, reader) =
                if from_near { (&mut near, &mut far) } else { (&mut far, &mut near) };
            let length = writer.write_message(b"hi", &mut message).unwrap();
            assert_eq!(reader.read_message(&message[..length], &mut payload).unwrap(), 2);
        }
        let (first, second) = near.dangerously_get_raw_split();
        (
            (
                RecordCipher::with(RecordSuite::ChaChaPoly, &first).unwrap(),
                RecordCipher::with(RecordSuite::ChaChaPoly, &second).unwrap(),
            ),
            far.into_stateless_transport_mode().unwrap(),
        )
    }

    #[test]
    fn ferrys_records_are_noise_transport_messages() {
        // The dialler's side is ferry's record cipher, the callee's is snow's
        // transport mode: records cross both ways, so the wire is Noise's.
        let ((mut sending, mut receiving), far) = snow_pair();
        for nonce in 0..3 {
            let plaintext = vec![nonce as u8; MAX_PLAINTEXT_BYTES - nonce as usize];
            let mut record = [plaintext.as_slice(), &[0; TAG_BYTES]].concat();
            sending.seal(&mut record).unwrap();
            let mut opened = vec![0; MAX_RECORD_BYTES];
            let read = far.read_message(nonce, &record, &mut opened).unwrap();
            assert_eq!(opened[..read], plaintext[..]);
            let mut record = vec![0; MAX_RECORD_BYTES];
            let length = far.write_message(nonce, &plaintext[..100], &mut record).unwrap();
            record.truncate(length);
            let read = receiving.open(&mut record).unwrap();
            assert_eq!(record[..read], plaintext[..100]);
        }
        // A record opened out of order (a replay, say) does not decrypt.
        let mut record = vec![0; MAX_RECORD_BYTES];
        let length = far.write_message(1, b"again", &mut record).unwrap();
        record.truncate(length);
        assert!(matches!(receiving.open(&mut record), Err(SecureError::Noise(_))));
    }

    #[test]
    fn the_documented_identity_vector_holds() {
        let proof = hex::encode(identity(&key(1), &[9; 32]));
        let doc = include_str!("../../docs/PROTOCOL.md");
        assert!(doc.contains(&proof), "docs/PROTOCOL.md lacks the identity proof {proof}");
    }

    #[test]
    fn the_real_identity_proof_verifies() {
        let (initiator, proof) = half_handshake();
        assert_eq!(verify_identity(&proof, &initiator).unwrap(), key(2).public());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_proof_with_any_bit_flipped_or_cut_short_is_refused(bit in 0usize..IDENTITY_BYTES * 8, cut in 0usize..IDENTITY_BYTES) {
            let (initiator, proof) = half_handshake();
            let mut flipped = proof.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(matches!(verify_identity(&flipped, &initiator), Err(SecureError::Identity)));
            prop_assert!(matches!(verify_identity(&proof[..cut], &initiator), Err(SecureError::Identity)));
        }
    }
}
