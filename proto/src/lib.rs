//! Keys, amounts and signed messages shared by every part of ferry.
//!
//! Everything that crosses a trust boundary is defined here once: ed25519
//! identities and their one text form, exact decimal amounts and per-byte
//! prices, and the byte layouts that are signed. The layouts are specified in
//! `docs/PROTOCOL.md`, and `tests/vectors.rs` holds the test vectors that a
//! client written in another language can check itself against.

pub mod admission;
mod advert;
mod amount;
mod home;
#[cfg(feature = "http-server")]
pub mod http;
mod keys;
pub mod rate;
mod request;
mod serde_str;
#[cfg(feature = "tls")]
pub mod tls;
mod voucher;
pub mod wire;

pub use advert::{
    ADVERT_TAG, AdvertError, MAX_ADDRESS_LEN, MAX_REGION_LEN, PROTOCOL_VERSION, RelayAdvert,
    SignedAdvert, check_region,
};
pub use amount::{
    AMOUNT_SCALE, Amount, AmountError, BYTES_PER_GIB, Balance, MAX_AMOUNT, PricePerByte, cost,
};
pub use home::{HOME_RELAYS_TAG, HomeRelays, HomeRelaysError, MAX_HOME_RELAYS, SignedHomeRelays};
pub use keys::{KeyError, PublicKey, SecretKey, Signature, SignatureError};
pub use request::{
    KEY_HEADER, NONCE_HEADER, REQUEST_TAG, SIGNATURE_HEADER, SignedRequest, TIMESTAMP_HEADER,
};
pub use voucher::{
    CHANNEL_ID_TAG, ChannelId, DecodeError, FieldError, MAX_SEQUENCE, SIGNED_VOUCHER_LEN,
    SignedVoucher, VOUCHER_TAG, Voucher,
};
