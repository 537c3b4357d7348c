//! Home relays: where a client can be reached, signed by the client.
//!
//! A client listens on a few relays at once and publishes their keys (and,
//! optionally, a direct address) so that a peer who knows only its key can
//! find it. The client signs the list, so the registry cannot redirect its
//! peers to relays the client never chose.

use crate::advert::{MAX_ADDRESS_LEN, is_valid_address, push_short_text};
use crate::keys::{PublicKey, SecretKey, Signature, SignatureError};

/// Domain tag of a home relay list's signed bytes.
pub const HOME_RELAYS_TAG: &[u8] = b"ferry/home-relays/v1\0";
/// The most relays one list names.
pub const MAX_HOME_RELAYS: usize = 8;

/// Why a home relay list is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HomeRelaysError {
    /// The list is empty, too long, or names a relay twice.
    #[error("a home relay list names 1 to {MAX_HOME_RELAYS} distinct relays")]
    Relays,
    /// The direct address is not `host:port` in printable ASCII.
    #[error("direct_address must be host:port, 1 to {MAX_ADDRESS_LEN} printable ASCII characters")]
    Address,
    /// The signature is not the client's.
    #[error("the home relay list is not signed by its client")]
    Signature(#[from] SignatureError),
}

/// Where a client can be reached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HomeRelays {
    /// The client's key.
    pub client: PublicKey,
    /// The relays it listens on, best first.
    pub relays: Vec<PublicKey>,
    /// An address where the client accepts direct connections, if any.
    #[serde(default)]
    pub direct_address: Option<String>,
    /// When the list was made, in milliseconds since the Unix epoch; a newer
    /// one replaces an older one, never the reverse.
    pub issued_at_ms: u64,
}

impl HomeRelays {
    /// Checks the list's length, that no relay repeats, and the address form.
    pub fn validate(&self) -> Result<(), HomeRelaysError> {
        let distinct = self.relays.iter().enumerate().all(|(i, r)| !self.relays[..i].contains(r));
        if self.relays.is_empty() || self.relays.len() > MAX_HOME_RELAYS || !distinct {
            return Err(HomeRelaysError::Relays);
        }
        if self.direct_address.as_deref().is_some_and(|address| !is_valid_address(address)) {
            return Err(HomeRelaysError::Address);
        }
        Ok(())
    }

    /// The exact bytes that are signed: `tag ‖ client[32] ‖ count[u8] ‖
    /// relay[32] × count ‖ u16 len ‖ direct_address (empty when absent) ‖
    /// issued_at_ms[u64]`, big-endian.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let direct = self.direct_address.as_deref().unwrap_or("");
        let mut bytes = Vec::with_capacity(
            HOME_RELAYS_TAG.len() + 32 + 1 + 32 * self.relays.len() + 2 + direct.len() + 8,
        );
        bytes.extend_from_slice(HOME_RELAYS_TAG);
        bytes.extend_from_slice(self.client.as_bytes());
        // Validation bounds the count to MAX_HOME_RELAYS; an unvalidated
        // longer list signs a saturated count, which no verifier accepts.
        bytes.push(u8::try_from(self.relays.len()).unwrap_or(u8::MAX));
        for relay in &self.relays {
            bytes.extend_from_slice(relay.as_bytes());
        }
        push_short_text(&mut bytes, direct);
        bytes.extend_from_slice(&self.issued_at_ms.to_be_bytes());
        bytes
    }

    /// Signs the list with the client's key.
    pub fn sign(self, client: &SecretKey) -> SignedHomeRelays {
        let signature = client.sign(&self.signing_bytes());
        SignedHomeRelays { home: self, signature }
    }
}

/// A home relay list with its client's signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedHomeRelays {
    /// The list.
    pub home: HomeRelays,
    /// The client's signature over [`HomeRelays::signing_bytes`].
    pub signature: Signature,
}

impl SignedHomeRelays {
    /// Checks the forms and that the named client signed it.
    pub fn verify(&self) -> Result<(), HomeRelaysError> {
        self.home.validate()?;
        self.home.client.verify(&self.home.signing_bytes(), &self.signature)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn relay(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    fn home(client: &SecretKey) -> HomeRelays {
        HomeRelays {
            client: client.public(),
            relays: vec![relay(2), relay(3)],
            direct_address: None,
            issued_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn forms_are_checked() {
        let client = SecretKey::from_seed(&[1; 32]);
        for relays in [vec![], vec![relay(2), relay(2)], (0..9).map(relay).collect()] {
            let bad = HomeRelays { relays, ..home(&client) };
            assert_eq!(bad.validate(), Err(HomeRelaysError::Relays));
        }
        let bad = HomeRelays { direct_address: Some("nohost".into()), ..home(&client) };
        assert_eq!(bad.validate(), Err(HomeRelaysError::Address));
        let direct = HomeRelays { direct_address: Some("[::1]:4000".into()), ..home(&client) };
        assert!(direct.sign(&client).verify().is_ok());
    }

    #[test]
    fn another_key_cannot_sign_for_a_client() {
        let (client, mallory) = (SecretKey::from_seed(&[1; 32]), SecretKey::from_seed(&[9; 32]));
        let forged = home(&client).sign(&mallory);
        assert!(matches!(forged.verify(), Err(HomeRelaysError::Signature(_))));
    }

    proptest! {
        #[test]
        fn any_changed_field_fails_verification(field in 0usize..5, seed in 10u8..200) {
            let client = SecretKey::from_seed(&[1; 32]);
            let signed = home(&client).sign(&client);
            let mut changed = signed.clone();
            let h = &mut changed.home;
            match field {
                0 => h.relays.push(relay(seed)),
                1 => h.relays.swap(0, 1),
                2 => h.direct_address = Some(format!("h{seed}:1")),
                3 => h.issued_at_ms += u64::from(seed),
                _ => h.client = relay(seed),
            }
            prop_assert!(changed.verify().is_err());
            let json = serde_json::to_string(&signed).unwrap();
            prop_assert_eq!(serde_json::from_str::<SignedHomeRelays>(&json).unwrap(), signed);
        }
    }
}
