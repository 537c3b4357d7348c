//! Relay advertisements: a relay's signed offer to the market.
//!
//! The relay signs its own advertisement, so the registry (or anyone who
//! relays it) cannot change the price, the credit window or the address a
//! client sees: a client checks the signature against the relay's key.

use crate::amount::PricePerByte;
use crate::keys::{PublicKey, SecretKey, Signature, SignatureError};

/// Domain tag of an advertisement's signed bytes.
pub const ADVERT_TAG: &[u8] = b"ferry/relay-advert/v1\0";
/// The longest public address, in bytes (a DNS name's limit).
pub const MAX_ADDRESS_LEN: usize = 253;
/// The longest region name, in bytes.
pub const MAX_REGION_LEN: usize = 32;
/// The relay protocol version this code speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Why an advertisement is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    /// The address is empty, too long, or not `host:port` in printable ASCII.
    #[error("address must be host:port, 1 to {MAX_ADDRESS_LEN} printable ASCII characters")]
    Address,
    /// The region is empty, too long, or not lowercase letters, digits and `-`.
    #[error("region must be 1 to {MAX_REGION_LEN} characters of a-z, 0-9 and '-'")]
    Region,
    /// The signature is not the relay's.
    #[error("the advertisement is not signed by its relay")]
    Signature(#[from] SignatureError),
}

/// Checks a region name: 1 to [`MAX_REGION_LEN`] characters of `a-z`, `0-9`
/// and `-`. The one rule for an advert's region and a listing's filter.
pub fn check_region(region: &str) -> Result<(), AdvertError> {
    let region_ok = !region.is_empty()
        && region.len() <= MAX_REGION_LEN
        && region.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    if region_ok { Ok(()) } else { Err(AdvertError::Region) }
}

/// What a relay offers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RelayAdvert {
    /// The relay's key.
    pub relay: PublicKey,
    /// Where clients connect: `host:port`.
    pub address: String,
    /// The price of one byte carried.
    pub price_per_byte: PricePerByte,
    /// How many bytes the relay carries ahead of payment.
    pub credit_window_bytes: u64,
    /// The relay's capacity, in bytes per second.
    pub capacity_bytes_per_sec: u64,
    /// Where the relay is, e.g. `eu-west`.
    pub region: String,
    /// The relay protocol version it speaks.
    #[cfg_attr(feature = "openapi", schema(maximum = 65535))]
    pub protocol_version: u16,
    /// When the advertisement was made, in milliseconds since the Unix epoch;
    /// a newer one replaces an older one, never the reverse.
    pub issued_at_ms: u64,
}

impl RelayAdvert {
    /// Checks the address and region forms.
    pub fn validate(&self) -> Result<(), AdvertError> {
        if !is_valid_address(&self.address) {
            return Err(AdvertError::Address);
        }
        check_region(&self.region)
    }

    /// The exact bytes that are signed: `tag ‖ relay[32] ‖ u16 len ‖ address ‖
    /// price_attos[u128] ‖ credit_window_bytes[u64] ‖ capacity[u64] ‖ u16 len ‖
    /// region ‖ protocol_version[u16] ‖ issued_at_ms[u64]`, big-endian.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ADVERT_TAG.len() + 32 + 2 + self.address.len() + 46);
        bytes.extend_from_slice(ADVERT_TAG);
        bytes.extend_from_slice(self.relay.as_bytes());
        push_short_text(&mut bytes, &self.address);
        bytes.extend_from_slice(&self.price_per_byte.attos().to_be_bytes());
        bytes.extend_from_slice(&self.credit_window_bytes.to_be_bytes());
        bytes.extend_from_slice(&self.capacity_bytes_per_sec.to_be_bytes());
        push_short_text(&mut bytes, &self.region);
        bytes.extend_from_slice(&self.protocol_version.to_be_bytes());
        bytes.extend_from_slice(&self.issued_at_ms.to_be_bytes());
        bytes
    }

    /// Signs the advertisement with the relay's key.
    pub fn sign(self, relay: &SecretKey) -> SignedAdvert {
        let signature = relay.sign(&self.signing_bytes());
        SignedAdvert { advert: self, signature }
    }
}

/// An advertisement with its relay's signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedAdvert {
    /// The offer.
    pub advert: RelayAdvert,
    /// The relay's signature over [`RelayAdvert::signing_bytes`].
    pub signature: Signature,
}

impl SignedAdvert {
    /// Checks the forms and that the advertised relay signed it.
    pub fn verify(&self) -> Result<(), AdvertError> {
        self.advert.validate()?;
        self.advert.relay.verify(&self.advert.signing_bytes(), &self.signature)?;
        Ok(())
    }
}

/// Whether `address` is `host:port` in 1 to [`MAX_ADDRESS_LEN`] printable
/// ASCII characters.
pub(crate) fn is_valid_address(address: &str) -> bool {
    !address.is_empty()
        && address.len() <= MAX_ADDRESS_LEN
        && address.bytes().all(|b| b.is_ascii_graphic())
        && address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Appends `text` with a u16 length prefix; callers bound texts far below
/// 64 KiB by validation, and longer ones are cut, never wrapped.
pub(crate) fn push_short_text(bytes: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn advert(relay: &SecretKey) -> RelayAdvert {
        RelayAdvert {
            relay: relay.public(),
            address: "relay.example.net:7000".into(),
            price_per_byte: "0.00000000005".parse().unwrap(),
            credit_window_bytes: 1 << 20,
            capacity_bytes_per_sec: 100 << 20,
            region: "eu-west".into(),
            protocol_version: PROTOCOL_VERSION,
            issued_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn forms_are_checked() {
        let relay = SecretKey::from_seed(&[3; 32]);
        for address in [
            "",
            "nohost",
            ":80",
            "host:port",
            "host:70000",
            "a b:80",
            &format!("{}:1", "a".repeat(253)),
        ] {
            let bad = RelayAdvert { address: address.into(), ..advert(&relay) };
            assert_eq!(bad.validate(), Err(AdvertError::Address), "{address:?}");
        }
        for region in ["", "EU", "eu_west", &"a".repeat(33)] {
            let bad = RelayAdvert { region: region.into(), ..advert(&relay) };
            assert_eq!(bad.validate(), Err(AdvertError::Region), "{region:?}");
        }
        assert!(advert(&relay).sign(&relay).verify().is_ok());
        assert!(RelayAdvert { address: "[::1]:7000".into(), ..advert(&relay) }.validate().is_ok());
    }

    #[test]
    fn another_key_cannot_sign_for_a_relay() {
        let (relay, mallory) = (SecretKey::from_seed(&[3; 32]), SecretKey::from_seed(&[4; 32]));
        let forged = advert(&relay).sign(&mallory);
        assert!(matches!(forged.verify(), Err(AdvertError::Signature(_))));
    }

    proptest! {
        #[test]
        fn any_changed_field_fails_verification(field in 0usize..8, price in 0u128..1_000_000) {
            let relay = SecretKey::from_seed(&[3; 32]);
            let signed = advert(&relay).sign(&relay);
            let mut changed = signed.clone();
            let a = &mut changed.advert;
            match field {
                0 => a.address.push('0'),
                1 => a.price_per_byte = PricePerByte::from_attos(a.price_per_byte.attos() + 1 + price).unwrap(),
                2 => a.credit_window_bytes += 1,
                3 => a.capacity_bytes_per_sec += 1,
                4 => a.region.push('x'),
                5 => a.protocol_version += 1,
                6 => a.issued_at_ms += 1,
                _ => a.relay = SecretKey::from_seed(&[5; 32]).public(),
            }
            prop_assert!(changed.verify().is_err());
            let json = serde_json::to_string(&signed).unwrap();
            prop_assert_eq!(serde_json::from_str::<SignedAdvert>(&json).unwrap(), signed);
        }
    }
}
