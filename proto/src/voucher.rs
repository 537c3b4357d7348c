//! Payment channel ids and vouchers, and the exact bytes that are signed.
//!
//! Every signed message is a domain tag followed by fixed-width fields. Tags
//! are distinct ASCII strings ending in a NUL byte, so no tag is a prefix of
//! another and two different messages can never be the same bytes.

use std::fmt;
use std::str::FromStr;

use crate::amount::Amount;
use crate::keys::{KeyError, PublicKey, SecretKey, Signature, SignatureError, parse_lower_hex};
use crate::serde_str::serde_via_str;

/// Domain tag of a channel id's hash input.
pub const CHANNEL_ID_TAG: &[u8] = b"ferry/channel-id/v1\0";
/// Domain tag of a voucher's signed bytes.
pub const VOUCHER_TAG: &[u8] = b"ferry/voucher/v1\0";

const VOUCHER_FIELDS_LEN: usize = 32 + 8 + 16;
/// Length of a signed voucher on the wire: channel id, sequence, cumulative
/// amount, signature.
pub const SIGNED_VOUCHER_LEN: usize = VOUCHER_FIELDS_LEN + 64;

/// The highest voucher sequence: the ledger stores sequences as a signed
/// 64-bit integer (Postgres `BIGINT`).
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// Why a voucher's fields are outside what the ledger can settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// Sequences start at 1, so 0 is below every settled voucher.
    #[error("a voucher's sequence is 1 to {MAX_SEQUENCE}, got 0")]
    SequenceZero,
    /// Above [`MAX_SEQUENCE`].
    #[error("a voucher's sequence is 1 to {MAX_SEQUENCE}, got {0}")]
    SequenceTooLarge(u64),
}

/// Why bytes are not a signed voucher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is not exactly [`SIGNED_VOUCHER_LEN`] bytes.
    #[error("a signed voucher is {SIGNED_VOUCHER_LEN} bytes, got {0}")]
    Length(usize),
    /// The amount field is above the maximum amount.
    #[error("voucher amount: {0}")]
    Amount(#[from] crate::amount::AmountError),
}

/// The id of a payment channel: blake3 over the channel id tag, the client
/// key, the relay key and the client's nonce, so a client cannot claim
/// another's channel and ids never collide by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId {
    bytes: [u8; 32],
}

impl ChannelId {
    /// The id of the channel from `client` to `relay` opened with `nonce`.
    pub fn derive(client: &PublicKey, relay: &PublicKey, nonce: u64) -> ChannelId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(CHANNEL_ID_TAG);
        hasher.update(client.as_bytes());
        hasher.update(relay.as_bytes());
        hasher.update(&nonce.to_be_bytes());
        ChannelId { bytes: *hasher.finalize().as_bytes() }
    }

    /// The id with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> ChannelId {
        ChannelId { bytes }
    }

    /// The id's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.bytes))
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({self})")
    }
}

impl FromStr for ChannelId {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<ChannelId, KeyError> {
        parse_lower_hex(text).map(ChannelId::from_bytes)
    }
}

serde_via_str!(ChannelId, "a channel id as 64 lowercase hex digits", "^[0-9a-f]{64}$");

/// A client's promise that it owes the channel's relay `cumulative` in total.
///
/// Vouchers are cumulative so that only the newest matters: a relay keeps the
/// one with the highest `sequence` and settles it, and a lost or repeated
/// voucher can never make a client pay twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Voucher {
    /// The channel this voucher pays on.
    pub channel: ChannelId,
    /// Strictly increasing per channel; the ledger only accepts a higher one.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64))]
    pub sequence: u64,
    /// Everything the client owes the relay on this channel, so far.
    pub cumulative: Amount,
}

impl Voucher {
    /// The exact bytes that are signed: the voucher tag, then the channel id,
    /// the sequence (u64 big-endian) and the cumulative amount in 10^-18 units
    /// (u128 big-endian).
    pub fn signing_bytes(&self) -> [u8; VOUCHER_TAG.len() + VOUCHER_FIELDS_LEN] {
        let mut bytes = [0u8; VOUCHER_TAG.len() + VOUCHER_FIELDS_LEN];
        bytes[..VOUCHER_TAG.len()].copy_from_slice(VOUCHER_TAG);
        bytes[VOUCHER_TAG.len()..].copy_from_slice(&self.fields());
        bytes
    }

    /// Checks the fields against the ranges the ledger settles: the one rule
    /// that a relay (before it counts a voucher) and the ledger (before it
    /// pays one) both apply, so a relay never counts what cannot settle. The
    /// amount's range, at most [`crate::MAX_AMOUNT`], holds by construction.
    pub fn check_fields(&self) -> Result<(), FieldError> {
        match self.sequence {
            0 => Err(FieldError::SequenceZero),
            sequence if sequence > MAX_SEQUENCE => Err(FieldError::SequenceTooLarge(sequence)),
            _ => Ok(()),
        }
    }

    /// Signs the voucher with the channel client's key.
    pub fn sign(self, client: &SecretKey) -> SignedVoucher {
        let signature = client.sign(&self.signing_bytes());
        SignedVoucher { voucher: self, signature }
    }

    fn fields(&self) -> [u8; VOUCHER_FIELDS_LEN] {
        let mut fields = [0u8; VOUCHER_FIELDS_LEN];
        fields[..32].copy_from_slice(self.channel.as_bytes());
        fields[32..40].copy_from_slice(&self.sequence.to_be_bytes());
        fields[40..].copy_from_slice(&self.cumulative.attos().to_be_bytes());
        fields
    }
}

/// A voucher with its client's signature. Holding one proves nothing until
/// [`SignedVoucher::verify`] succeeds against the channel's client key.
///
/// Its JSON form is the voucher's fields and the signature in one object;
/// any other field is refused, like everywhere else in ferry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(from = "FlatSignedVoucher")]
pub struct SignedVoucher {
    /// What is promised.
    #[serde(flatten)]
    pub voucher: Voucher,
    /// The client's signature over [`Voucher::signing_bytes`].
    pub signature: Signature,
}

/// The JSON form of a [`SignedVoucher`], read field by field: serde cannot
/// refuse unknown fields through `flatten`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatSignedVoucher {
    channel: ChannelId,
    sequence: u64,
    cumulative: Amount,
    signature: Signature,
}

impl From<FlatSignedVoucher> for SignedVoucher {
    fn from(flat: FlatSignedVoucher) -> SignedVoucher {
        let FlatSignedVoucher { channel, sequence, cumulative, signature } = flat;
        SignedVoucher { voucher: Voucher { channel, sequence, cumulative }, signature }
    }
}

impl SignedVoucher {
    /// Checks that the channel's client signed this voucher.
    pub fn verify(&self, client: &PublicKey) -> Result<(), SignatureError> {
        client.verify(&self.voucher.signing_bytes(), &self.signature)
    }

    /// The wire form: the voucher's fields as signed (without the tag), then
    /// the 64-byte signature.
    pub fn encode(&self) -> [u8; SIGNED_VOUCHER_LEN] {
        let mut bytes = [0u8; SIGNED_VOUCHER_LEN];
        bytes[..VOUCHER_FIELDS_LEN].copy_from_slice(&self.voucher.fields());
        bytes[VOUCHER_FIELDS_LEN..].copy_from_slice(self.signature.as_bytes());
        bytes
    }

    /// Parses the wire form. This checks the layout only, not the signature.
    pub fn decode(bytes: &[u8]) -> Result<SignedVoucher, DecodeError> {
        let bytes: &[u8; SIGNED_VOUCHER_LEN] =
            bytes.try_into().map_err(|_| DecodeError::Length(bytes.len()))?;
        let (fields, signature) = bytes.split_at(VOUCHER_FIELDS_LEN);
        let mut channel = [0u8; 32];
        channel.copy_from_slice(&fields[..32]);
        let mut sequence = [0u8; 8];
        sequence.copy_from_slice(&fields[32..40]);
        let mut cumulative = [0u8; 16];
        cumulative.copy_from_slice(&fields[40..]);
        let mut signature_bytes = [0u8; 64];
        signature_bytes.copy_from_slice(signature);
        Ok(SignedVoucher {
            voucher: Voucher {
                channel: ChannelId::from_bytes(channel),
                sequence: u64::from_be_bytes(sequence),
                cumulative: Amount::from_attos(u128::from_be_bytes(cumulative))?,
            },
            signature: Signature::from_bytes(signature_bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_signed_voucher() -> impl Strategy<Value = (SecretKey, SignedVoucher)> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            0..=Amount::from_units(crate::MAX_AMOUNT).unwrap().attos(),
        )
            .prop_map(|(seed, channel, sequence, attos)| {
                let client = SecretKey::from_seed(&seed);
                let voucher = Voucher {
                    channel: ChannelId::from_bytes(channel),
                    sequence,
                    cumulative: Amount::from_attos(attos).unwrap(),
                };
                let signed = voucher.sign(&client);
                (client, signed)
            })
    }

    #[test]
    fn tags_are_distinct_and_prefix_free() {
        let tags = [CHANNEL_ID_TAG, VOUCHER_TAG, crate::REQUEST_TAG, crate::ADVERT_TAG];
        for (i, a) in tags.iter().enumerate() {
            assert_eq!(a.last(), Some(&0));
            assert_eq!(a.iter().filter(|&&b| b == 0).count(), 1);
            for b in &tags[i + 1..] {
                assert!(!a.starts_with(b) && !b.starts_with(a));
            }
        }
    }

    #[test]
    fn decode_rejects_wrong_lengths_and_amounts() {
        assert_eq!(SignedVoucher::decode(&[0; 119]), Err(DecodeError::Length(119)));
        assert_eq!(SignedVoucher::decode(&[0; 121]), Err(DecodeError::Length(121)));
        let mut too_much = [0u8; SIGNED_VOUCHER_LEN];
        too_much[40..56].copy_from_slice(&u128::MAX.to_be_bytes());
        assert!(matches!(SignedVoucher::decode(&too_much), Err(DecodeError::Amount(_))));
    }

    #[test]
    fn channel_ids_bind_both_keys_and_nonce() {
        let a = SecretKey::from_seed(&[1; 32]).public();
        let b = SecretKey::from_seed(&[2; 32]).public();
        let id = ChannelId::derive(&a, &b, 1);
        assert_ne!(id, ChannelId::derive(&b, &a, 1));
        assert_ne!(id, ChannelId::derive(&a, &b, 2));
        assert_eq!(id.to_string().parse::<ChannelId>().unwrap(), id);
        assert!(id.to_string().to_uppercase().parse::<ChannelId>().is_err());
    }

    #[test]
    fn fields_are_checked_at_their_edges() {
        let at = |sequence| Voucher {
            channel: ChannelId::from_bytes([1; 32]),
            sequence,
            cumulative: Amount::MAX,
        };
        assert_eq!(at(0).check_fields(), Err(FieldError::SequenceZero));
        assert_eq!(at(1).check_fields(), Ok(()));
        assert_eq!(at(MAX_SEQUENCE).check_fields(), Ok(()));
        assert_eq!(at(MAX_SEQUENCE + 1).check_fields(), Err(FieldError::SequenceTooLarge(1 << 63)));
        assert_eq!(at(u64::MAX).check_fields(), Err(FieldError::SequenceTooLarge(u64::MAX)));
    }

    proptest! {
        #[test]
        fn wire_form_round_trips((client, signed) in arb_signed_voucher()) {
            let decoded = SignedVoucher::decode(&signed.encode()).unwrap();
            prop_assert_eq!(decoded, signed);
            prop_assert!(decoded.verify(&client.public()).is_ok());
        }

        #[test]
        fn json_form_round_trips((_client, signed) in arb_signed_voucher()) {
            let json = serde_json::to_string(&signed).unwrap();
            prop_assert_eq!(serde_json::from_str::<SignedVoucher>(&json).unwrap(), signed);
        }

        #[test]
        fn json_with_an_unknown_field_is_refused(
            (_client, signed) in arb_signed_voucher(),
            name in "[a-z_]{1,12}",
        ) {
            prop_assume!(!["channel", "sequence", "cumulative", "signature"].contains(&name.as_str()));
            let mut json = serde_json::to_value(signed).unwrap();
            json[&name] = serde_json::Value::from(1);
            let error = serde_json::from_value::<SignedVoucher>(json).unwrap_err();
            prop_assert!(error.to_string().contains("unknown field"), "{}", error);
        }

        #[test]
        fn any_changed_byte_fails_verification(
            (client, signed) in arb_signed_voucher(),
            index in 0..SIGNED_VOUCHER_LEN,
            flip in 1u8..=255,
        ) {
            let mut bytes = signed.encode();
            bytes[index] ^= flip;
            // A changed amount may exceed the maximum and not decode at all;
            // either way the tampered voucher is never accepted.
            if let Ok(tampered) = SignedVoucher::decode(&bytes) {
                prop_assert!(tampered.verify(&client.public()).is_err());
            }
        }

        #[test]
        fn another_key_never_verifies((_client, signed) in arb_signed_voucher(), seed in any::<[u8; 32]>()) {
            let other = SecretKey::from_seed(&seed).public();
            prop_assume!(other != _client.public());
            prop_assert!(signed.verify(&other).is_err());
        }
    }
}
