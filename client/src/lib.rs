//! The ferry client SDK.
//!
//! [`RegistryClient`] speaks the registry's signed web API
//! (`docs/PROTOCOL.md`, "Registry API (v1)"): it signs each request for its
//! key with a fresh timestamp and nonce, and turns the registry's JSON errors
//! into [`RegistryError`]s. [`relay`] speaks the relay protocol: sessions
//! that listen and pay, and tunnels that dial or accept. [`Endpoint`] puts
//! them together: a peer reachable by its key through its home relays that
//! dials other peers' keys over encrypted streams ([`secure`], [`stream`])
//! which survive the loss of a relay, choosing relays ([`select`]) and
//! paying them from its [`wallet`].

pub mod endpoint;
mod registry;
pub mod relay;
pub mod secure;
pub mod select;
pub mod stream;
pub mod wallet;

pub use endpoint::{Endpoint, EndpointConfig, EndpointError};
pub use registry::{ChannelView, REQUEST_TIMEOUT, RegistryClient, RegistryError, next_nonce};
