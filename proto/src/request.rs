//! Signed HTTP requests: the bytes a client signs to act for its key on the
//! registry's API.
//!
//! A request is signed over its method, its path with the query, a
//! timestamp, a random nonce and the blake3 hash of its body. Variable-length
//! fields are length-prefixed, so no two requests share signed bytes; the
//! registry rejects stale timestamps and replayed nonces.

use crate::keys::{PublicKey, SecretKey, Signature, SignatureError};

/// Domain tag of a request's signed bytes.
pub const REQUEST_TAG: &[u8] = b"ferry/request/v1\0";
/// Header naming the key a request acts for (64 lowercase hex digits).
pub const KEY_HEADER: &str = "ferry-key";
/// Header with the request's Unix time in seconds.
pub const TIMESTAMP_HEADER: &str = "ferry-timestamp";
/// Header with the request's nonce (32 lowercase hex digits: 16 bytes).
pub const NONCE_HEADER: &str = "ferry-nonce";
/// Header with the signature (128 lowercase hex digits).
pub const SIGNATURE_HEADER: &str = "ferry-signature";

/// The parts of an HTTP request that its signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedRequest<'a> {
    /// The HTTP method, upper case (`GET`, `POST`).
    pub method: &'a str,
    /// The path and query exactly as sent, e.g. `/v1/relays?limit=10`.
    pub path_and_query: &'a str,
    /// Seconds since the Unix epoch when the request was made.
    pub timestamp: u64,
    /// 16 random bytes, never reused by the same key within the time window.
    pub nonce: [u8; 16],
    /// The request body (empty for GET).
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    /// The exact bytes that are signed:
    /// `tag ‖ u32 len ‖ method ‖ u32 len ‖ path_and_query ‖ u64 timestamp ‖
    /// nonce[16] ‖ blake3(body)[32]`, integers big-endian.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(
            REQUEST_TAG.len() + 8 + self.method.len() + self.path_and_query.len() + 8 + 16 + 32,
        );
        bytes.extend_from_slice(REQUEST_TAG);
        for field in [self.method, self.path_and_query] {
            // HTTP limits keep both far below 4 GiB; saturating keeps this total.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(field.as_bytes());
        }
        bytes.extend_from_slice(&self.timestamp.to_be_bytes());
        bytes.extend_from_slice(&self.nonce);
        bytes.extend_from_slice(blake3::hash(self.body).as_bytes());
        bytes
    }

    /// Signs the request with `key`.
    pub fn sign(&self, key: &SecretKey) -> Signature {
        key.sign(&self.signing_bytes())
    }

    /// Checks that `key` signed this request.
    pub fn verify(&self, key: &PublicKey, signature: &Signature) -> Result<(), SignatureError> {
        key.verify(&self.signing_bytes(), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(body: &[u8]) -> SignedRequest<'_> {
        SignedRequest {
            method: "POST",
            path_and_query: "/v1/settlements",
            timestamp: 1_700_000_000,
            nonce: [7; 16],
            body,
        }
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_signed_bytes() {
        let a = SignedRequest { method: "GET", path_and_query: "/v1/x", ..request(b"") };
        let b = SignedRequest { method: "GE", path_and_query: "T/v1/x", ..request(b"") };
        assert_ne!(a.signing_bytes(), b.signing_bytes());
    }

    proptest! {
        #[test]
        fn any_changed_part_fails_verification(
            seed in any::<[u8; 32]>(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            flip in 0usize..5,
        ) {
            let key = SecretKey::from_seed(&seed);
            let original = request(&body);
            let signature = original.sign(&key);
            prop_assert!(original.verify(&key.public(), &signature).is_ok());
            let mut other_body = body.clone();
            other_body.push(0);
            let changed = match flip {
                0 => SignedRequest { method: "PUT", ..original },
                1 => SignedRequest { path_and_query: "/v1/settlements?x=1", ..original },
                2 => SignedRequest { timestamp: original.timestamp + 1, ..original },
                3 => SignedRequest { nonce: [8; 16], ..original },
                _ => SignedRequest { body: &other_body, ..original },
            };
            prop_assert!(changed.verify(&key.public(), &signature).is_err());
        }
    }
}
