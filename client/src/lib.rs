//! The ferry client SDK.
//!
//! [`RegistryClient`] speaks the registry's signed web API
//! (`docs/PROTOCOL.md`, "Registry API (v1)"): it signs each request for its
//! key with a fresh timestamp and nonce, and turns the registry's JSON errors
//! into [`RegistryError`]s. [`relay`] speaks the relay protocol: sessions
//! that listen and pay, and tunnels that dial or accept.

mod registry;
pub mod relay;
pub mod select;
pub mod wallet;

pub use registry::{ChannelView, REQUEST_TIMEOUT, RegistryClient, RegistryError};
