//! ed25519 identities: public keys, secret keys, signatures and key files.
//!
//! Every relay and client is an ed25519 key. A public key has one text form,
//! 64 lowercase hex digits, used by people, URLs and JSON alike. Keys are
//! checked when they are parsed (a point on the curve, not of small order), and
//! signatures are checked with `verify_strict`, which rejects the malleable and
//! weak-key forgeries that plain ed25519 verification accepts.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::serde_str::serde_via_str;

/// Why bytes or text are not a usable key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not exactly the expected number of lowercase hex digits.
    #[error("expected {expected} lowercase hex digits, got {got:?}")]
    Malformed {
        /// How many hex digits the form has.
        expected: usize,
        /// The start of what was given instead.
        got: String,
    },
    /// The bytes are not a point on the curve.
    #[error("not a valid ed25519 public key")]
    NotOnCurve,
    /// The point has small order: any message would verify against it.
    #[error("weak ed25519 public key (small order) rejected")]
    Weak,
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify for this key and message")]
pub struct SignatureError;

/// A verified-to-be-usable ed25519 public key: the identity of a relay or client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// The key with these 32 bytes, if they are a point on the curve that is
    /// not of small order.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::NotOnCurve)?;
        if key.is_weak() {
            return Err(KeyError::Weak);
        }
        Ok(PublicKey { bytes: *bytes })
    }

    /// The key's 32 bytes, as they are signed and stored.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Checks that `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        // The bytes were checked in `from_bytes`, so decompression cannot fail.
        let key = VerifyingKey::from_bytes(&self.bytes).map_err(|_| SignatureError)?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.bytes);
        key.verify_strict(message, &signature).map_err(|_| SignatureError)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PublicKey, KeyError> {
        PublicKey::from_bytes(&parse_lower_hex(text)?)
    }
}

serde_via_str!(PublicKey, "an ed25519 public key as 64 lowercase hex digits", "^[0-9a-f]{64}$");

/// An ed25519 signature (64 bytes); whether it is valid is only known against
/// a key and a message.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature {
    bytes: [u8; 64],
}

impl Signature {
    /// The signature with these bytes.
    pub fn from_bytes(bytes: [u8; 64]) -> Signature {
        Signature { bytes }
    }

    /// The signature's 64 bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Signature, KeyError> {
        Ok(Signature { bytes: parse_lower_hex(text)? })
    }
}

serde_via_str!(Signature, "an ed25519 signature as 128 lowercase hex digits", "^[0-9a-f]{128}$");

/// An ed25519 secret key. It never prints its secret; `Debug` shows the public
/// key only.
#[derive(Clone)]
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> io::Result<SecretKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(io::Error::other)?;
        Ok(SecretKey::from_seed(&seed))
    }

    /// The key derived from a 32-byte seed (RFC 8032's "private key").
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey { key: SigningKey::from_bytes(seed) }
    }

    /// The seed, for storing the key.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        // A key derived from a seed is a valid point of large order; the public
        // bytes therefore need no re-validation.
        PublicKey { bytes: self.key.verifying_key().to_bytes() }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature { bytes: self.key.sign(message).to_bytes() }
    }

    /// Creates a key file at `path` holding a new key, readable and writable by
    /// its owner only. Fails if the file exists, so no key is ever overwritten.
    pub fn create_file(path: &Path) -> io::Result<SecretKey> {
        let key = SecretKey::generate()?;
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        writeln!(file, "# ferry secret key (ed25519 seed, hex). Keep this file private.")?;
        writeln!(file, "{}", hex::encode(key.seed()))?;
        file.sync_all()?;
        Ok(key)
    }

    /// Reads a key file written by [`SecretKey::create_file`]. Refuses a file
    /// that others can read, as ssh does, because such a key may be stolen.
    pub fn read_file(path: &Path) -> io::Result<SecretKey> {
        let mode = fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "key file {} is accessible by other users (mode {:o}); run `chmod 600` on it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
        let text = fs::read_to_string(path)?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with('#'))
            .unwrap_or("");
        let seed: [u8; 32] = parse_lower_hex(line).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("key file {}: {error}", path.display()),
            )
        })?;
        Ok(SecretKey::from_seed(&seed))
    }

    /// Reads the key file at `path`, creating it with a new key if it does not
    /// exist yet; `true` with a key it created. For a server's own key on its
    /// first start, which should say that it made a new identity.
    pub fn read_or_create_file(path: &Path) -> io::Result<(SecretKey, bool)> {
        match SecretKey::create_file(path) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                Ok((SecretKey::read_file(path)?, false))
            }
            result => Ok((result?, true)),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {})", self.public())
    }
}

/// Parses exactly `2 * N` lowercase hex digits: the one text form of keys,
/// signatures and ids.
pub(crate) fn parse_lower_hex<const N: usize>(text: &str) -> Result<[u8; N], KeyError> {
    let malformed =
        || KeyError::Malformed { expected: N * 2, got: text.chars().take(N * 2 + 8).collect() };
    if text.len() != N * 2 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(malformed());
    }
    let mut bytes = [0u8; N];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| malformed())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    #[test]
    fn text_form_is_lowercase_hex_only() {
        let public = key(1).public();
        let text = public.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PublicKey>().unwrap(), public);
        assert!(matches!(
            text.to_uppercase().parse::<PublicKey>(),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(text[..62].parse::<PublicKey>(), Err(KeyError::Malformed { .. })));
        assert!(matches!(
            format!("{text}00").parse::<PublicKey>(),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            format!(" {}", &text[1..]).parse::<PublicKey>(),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn weak_and_invalid_keys_are_rejected() {
        // The identity point (small order): every signature would verify.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(KeyError::Weak));
        assert_eq!(PublicKey::from_bytes(&[0u8; 32]), Err(KeyError::Weak));
        // y = 2 is not the y-coordinate of any curve point.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(PublicKey::from_bytes(&off_curve), Err(KeyError::NotOnCurve));
    }

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let signer = key(7);
        let signature = signer.sign(b"message");
        assert!(signer.public().verify(b"message", &signature).is_ok());
        assert_eq!(signer.public().verify(b"massage", &signature), Err(SignatureError));
        assert_eq!(key(8).public().verify(b"message", &signature), Err(SignatureError));
    }

    #[test]
    fn secret_keys_do_not_print_their_secret() {
        let secret = key(9);
        let shown = format!("{secret:?}");
        assert!(!shown.contains(&hex::encode(secret.seed())));
        assert!(shown.contains(&secret.public().to_string()));
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("ferry-keytest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let _ = fs::remove_file(&path);
        let created = SecretKey::create_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SecretKey::read_file(&path).unwrap().public(), created.public());
        assert_eq!(SecretKey::create_file(&path).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let (read, created_now) = SecretKey::read_or_create_file(&path).unwrap();
        assert_eq!((read.public(), created_now), (created.public(), false));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            SecretKey::read_file(&path).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not a key\n").unwrap();
        assert_eq!(SecretKey::read_file(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn public_key_text_round_trips(seed in any::<[u8; 32]>()) {
            let public = SecretKey::from_seed(&seed).public();
            prop_assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);
        }

        #[test]
        fn signature_text_round_trips(bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let signature = Signature::from_bytes(bytes.try_into().unwrap());
            prop_assert_eq!(signature.to_string().parse::<Signature>().unwrap(), signature);
        }

        #[test]
        fn any_flipped_signature_bit_fails(seed in any::<[u8; 32]>(), bit in 0usize..512) {
            let signer = SecretKey::from_seed(&seed);
            let mut bytes = *signer.sign(b"ferry").as_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(signer.public().verify(b"ferry", &Signature::from_bytes(bytes)).is_err());
        }
    }
}
