//! The relay protocol's frames and handshake (docs/PROTOCOL.md, "Relay
//! protocol").
//!
//! Every connection to a relay starts with frames: `len[u32] ‖ type[u8] ‖
//! payload`, where `len` counts the type byte and the payload and is at most
//! [`MAX_FRAME_LEN`]. Integers are big-endian, keys and ids 32 raw bytes,
//! amounts 16-byte attos. A tunnel connection stops speaking frames after its
//! `Connected` frame and carries raw bytes from then on.

use crate::amount::{Amount, PricePerByte};
use crate::keys::{PublicKey, Signature};
use crate::voucher::{ChannelId, SIGNED_VOUCHER_LEN, SignedVoucher};

/// The largest frame, type byte and payload, in bytes. It fits the largest
/// allow-list ([`MAX_ALLOW_LIST`] keys) with room to spare.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// The most keys a listener's allow-list holds.
pub const MAX_ALLOW_LIST: usize = 1024;
/// The longest text in a `Close` frame, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Domain tag of the handshake transcript that both sides sign.
pub const HANDSHAKE_TAG: &[u8] = b"ferry/relay-handshake/v1\0";
/// The relay protocol version this code speaks (also in advertisements).
pub const WIRE_VERSION: u16 = crate::advert::PROTOCOL_VERSION;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is zero or above [`MAX_FRAME_LEN`].
    #[error("frame length {0} is outside 1..={MAX_FRAME_LEN}")]
    Length(usize),
    /// The type byte names no frame.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The payload does not have the frame's layout.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

/// Who a listener accepts tunnels from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenPolicy {
    /// Nobody: not listening.
    Closed,
    /// Anyone; the client still sees each `Incoming` and may reject it.
    Open,
    /// Only these keys (at most [`MAX_ALLOW_LIST`]).
    Allow(Vec<PublicKey>),
}

/// Defines a one-byte wire enum with its code table and a snake_case
/// label (for metrics and logs), so each value is named in one place.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $code:literal => $label:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_meta])* $variant = $code,)+
        }

        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value with this wire code.
            pub fn from_code(code: u8) -> Option<$name> {
                match code {
                    $($code => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// The value's name in metrics and logs.
            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

wire_enum! {
    /// Why a dial did not become a tunnel.
    DialFailure {
        /// No client with that key holds a session on this relay.
        UnknownPeer = 1 => "unknown_peer",
        /// The peer refused, or its listen policy does not allow the caller.
        Rejected = 2 => "rejected",
        /// The caller has no session with an open, funded channel.
        NotPaid = 3 => "not_paid",
        /// The relay is at its capacity, or the caller at its tunnel limit.
        OverCapacity = 4 => "over_capacity",
        /// The peer did not accept within the pairing time.
        Timeout = 5 => "pairing_timeout",
    }
}

wire_enum! {
    /// What a relay did with a voucher.
    VoucherVerdict {
        /// Stored durably and counted.
        Accepted = 0 => "accepted",
        /// Not signed by the channel's client.
        Forged = 1 => "forged",
        /// Its sequence is not above the last accepted one.
        Replayed = 2 => "replayed",
        /// Its cumulative amount is below the last accepted one.
        Stale = 3 => "stale",
        /// For another channel than the session's.
        WrongChannel = 4 => "wrong_channel",
        /// More than the channel's escrow.
        OverEscrow = 5 => "over_escrow",
        /// A sequence or amount beyond what the ledger settles
        /// (`Voucher::check_fields`).
        OutOfRange = 6 => "out_of_range",
        /// The channel is closing: the relay takes no more vouchers on it
        /// and ends the session.
        ChannelClosing = 7 => "channel_closing",
    }
}

wire_enum! {
    /// Why a relay or a client ends a connection.
    CloseReason {
        /// An orderly end.
        Normal = 0 => "normal",
        /// The peer broke the protocol.
        Protocol = 1 => "protocol",
        /// The handshake failed.
        Unauthenticated = 2 => "unauthenticated",
        /// The channel is unknown, not open, or not this client's to this relay.
        BadChannel = 3 => "bad_channel",
        /// No voucher came within the payment grace time.
        NotPaid = 4 => "not_paid",
        /// Nothing came within the idle time.
        Idle = 5 => "idle",
        /// A limit was reached (sessions, connections per IP).
        Limit = 6 => "limit",
        /// The relay is shutting down.
        Shutdown = 7 => "shutdown",
        /// Another session of the same key replaced this one.
        Replaced = 8 => "replaced",
        /// The relay could not check the channel (the registry is unreachable).
        Unavailable = 9 => "unavailable",
    }
}

/// One frame of the relay protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → relay, first: who the client is, and its fresh nonce.
    ClientHello {
        /// The protocol version the client speaks.
        version: u16,
        /// The client's key.
        client: PublicKey,
        /// 32 random bytes.
        nonce: [u8; 32],
    },
    /// Relay → client: the relay's key, its nonce, and its signature of the
    /// transcript (role `R`).
    RelayHello {
        /// The protocol version the relay speaks.
        version: u16,
        /// The relay's key; the client checks it is the advertised one.
        relay: PublicKey,
        /// 32 random bytes.
        nonce: [u8; 32],
        /// The relay's signature over [`transcript`] with role `R`.
        signature: Signature,
    },
    /// Client → relay: the client's signature of the transcript (role `C`).
    ClientAuth {
        /// The client's signature over [`transcript`] with role `C`.
        signature: Signature,
    },
    /// Client → relay: make this connection the client's control session,
    /// paying through `channel` (none: it may listen but not dial).
    OpenSession {
        /// The channel that pays for the client's tunnels.
        channel: Option<ChannelId>,
    },
    /// Relay → client: the session is open, on these terms.
    SessionReady {
        /// The price of a byte for this session's tunnels.
        price_per_byte: PricePerByte,
        /// Bytes carried ahead of payment.
        credit_window_bytes: u64,
        /// The channel's cumulative amount the relay already holds a
        /// voucher for (a client resumes its count from here).
        paid: Amount,
        /// That voucher's sequence: the next voucher must be above it.
        sequence: u64,
    },
    /// Client → relay: who may reach the client.
    Listen {
        /// The policy.
        policy: ListenPolicy,
    },
    /// Relay → client: the session's oldest unconfirmed `Listen` applies
    /// now; a dial from then on is judged by it. No payload: the relay
    /// confirms every Listen, in order.
    Listening,
    /// Client → relay, first frame after the handshake on a new connection:
    /// make this connection a tunnel to `peer`.
    Dial {
        /// The key to reach.
        peer: PublicKey,
    },
    /// Relay → listener: `caller` wants a tunnel.
    Incoming {
        /// The tunnel's id, to accept or reject.
        tunnel: u64,
        /// Who is calling.
        caller: PublicKey,
    },
    /// Listener → relay, first frame after the handshake on a new
    /// connection: make this connection the far end of `tunnel`.
    Accept {
        /// The tunnel to accept.
        tunnel: u64,
    },
    /// Listener → relay, on the control session: refuse `tunnel`.
    Reject {
        /// The tunnel to refuse.
        tunnel: u64,
    },
    /// Relay → both ends of a tunnel: paired; raw bytes follow.
    Connected {
        /// The tunnel.
        tunnel: u64,
        /// The key at the other end.
        peer: PublicKey,
    },
    /// Relay → caller, on its control session: a tunnel ended, and why.
    TunnelClosed {
        /// The tunnel.
        tunnel: u64,
        /// Why.
        reason: CloseReason,
    },
    /// Relay → caller: no tunnel, and why.
    DialFailed {
        /// Why.
        reason: DialFailure,
    },
    /// Relay → client: what the client owes on its channel so far.
    Invoice {
        /// The channel.
        channel: ChannelId,
        /// Bytes carried for the client in this session, both directions.
        carried_bytes: u64,
        /// The cumulative amount a voucher should now carry.
        due: Amount,
    },
    /// Client → relay: a payment.
    Voucher(SignedVoucher),
    /// Relay → client: what happened to the voucher with this sequence.
    VoucherResult {
        /// The voucher's sequence.
        sequence: u64,
        /// What the relay did with it.
        verdict: VoucherVerdict,
    },
    /// Either way: are you there?
    Ping(u64),
    /// Either way: the answer to a `Ping` with the same number.
    Pong(u64),
    /// Either way: the connection ends, and why.
    Close {
        /// Why.
        reason: CloseReason,
        /// Details for people (at most [`MAX_REASON_LEN`] bytes).
        message: String,
    },
}

/// The bytes both sides of a handshake sign, each with its own role byte
/// (`R` for the relay, `C` for the client): `tag ‖ role ‖ version[u16] ‖
/// client_key ‖ client_nonce ‖ relay_key ‖ relay_nonce`.
pub fn transcript(
    role: u8,
    version: u16,
    client: &PublicKey,
    client_nonce: &[u8; 32],
    relay: &PublicKey,
    relay_nonce: &[u8; 32],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HANDSHAKE_TAG.len() + 1 + 2 + 128);
    bytes.extend_from_slice(HANDSHAKE_TAG);
    bytes.push(role);
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(client.as_bytes());
    bytes.extend_from_slice(client_nonce);
    bytes.extend_from_slice(relay.as_bytes());
    bytes.extend_from_slice(relay_nonce);
    bytes
}

mod kind {
    pub const CLIENT_HELLO: u8 = 0x01;
    pub const RELAY_HELLO: u8 = 0x02;
    pub const CLIENT_AUTH: u8 = 0x03;
    pub const OPEN_SESSION: u8 = 0x10;
    pub const SESSION_READY: u8 = 0x11;
    pub const LISTEN: u8 = 0x12;
    pub const LISTENING: u8 = 0x13;
    pub const DIAL: u8 = 0x20;
    pub const ACCEPT: u8 = 0x21;
    pub const CONNECTED: u8 = 0x22;
    pub const DIAL_FAILED: u8 = 0x23;
    pub const TUNNEL_CLOSED: u8 = 0x24;
    pub const INCOMING: u8 = 0x30;
    pub const REJECT: u8 = 0x31;
    pub const INVOICE: u8 = 0x40;
    pub const VOUCHER: u8 = 0x41;
    pub const VOUCHER_RESULT: u8 = 0x42;
    pub const PING: u8 = 0x50;
    pub const PONG: u8 = 0x51;
    pub const CLOSE: u8 = 0x7f;
}

impl Frame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::ClientHello { .. } => "ClientHello",
            Frame::RelayHello { .. } => "RelayHello",
            Frame::ClientAuth { .. } => "ClientAuth",
            Frame::OpenSession { .. } => "OpenSession",
            Frame::SessionReady { .. } => "SessionReady",
            Frame::Listen { .. } => "Listen",
            Frame::Listening => "Listening",
            Frame::Dial { .. } => "Dial",
            Frame::Incoming { .. } => "Incoming",
            Frame::Accept { .. } => "Accept",
            Frame::Reject { .. } => "Reject",
            Frame::Connected { .. } => "Connected",
            Frame::DialFailed { .. } => "DialFailed",
            Frame::TunnelClosed { .. } => "TunnelClosed",
            Frame::Invoice { .. } => "Invoice",
            Frame::Voucher(_) => "Voucher",
            Frame::VoucherResult { .. } => "VoucherResult",
            Frame::Ping(_) => "Ping",
            Frame::Pong(_) => "Pong",
            Frame::Close { .. } => "Close",
        }
    }

    /// The frame's wire form: `len[u32] ‖ type ‖ payload`. Callers keep
    /// allow-lists and reasons within their bounds; longer ones are cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0, 0, 0, 0];
        match self {
            Frame::ClientHello { version, client, nonce } => {
                out.push(kind::CLIENT_HELLO);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(client.as_bytes());
                out.extend_from_slice(nonce);
            }
            Frame::RelayHello { version, relay, nonce, signature } => {
                out.push(kind::RELAY_HELLO);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(relay.as_bytes());
                out.extend_from_slice(nonce);
                out.extend_from_slice(signature.as_bytes());
            }
            Frame::ClientAuth { signature } => {
                out.push(kind::CLIENT_AUTH);
                out.extend_from_slice(signature.as_bytes());
            }
            Frame::OpenSession { channel } => {
                out.push(kind::OPEN_SESSION);
                match channel {
                    Some(channel) => {
                        out.push(1);
                        out.extend_from_slice(channel.as_bytes());
                    }
                    None => out.push(0),
                }
            }
            Frame::SessionReady { price_per_byte, credit_window_bytes, paid, sequence } => {
                out.push(kind::SESSION_READY);
                out.extend_from_slice(&price_per_byte.attos().to_be_bytes());
                out.extend_from_slice(&credit_window_bytes.to_be_bytes());
                out.extend_from_slice(&paid.attos().to_be_bytes());
                out.extend_from_slice(&sequence.to_be_bytes());
            }
            Frame::Listen { policy } => {
                out.push(kind::LISTEN);
                match policy {
                    ListenPolicy::Closed => out.push(0),
                    ListenPolicy::Open => out.push(1),
                    ListenPolicy::Allow(keys) => {
                        out.push(2);
                        let keys = &keys[..keys.len().min(MAX_ALLOW_LIST)];
                        // MAX_ALLOW_LIST fits a u16.
                        out.extend_from_slice(&(keys.len() as u16).to_be_bytes());
                        for key in keys {
                            out.extend_from_slice(key.as_bytes());
                        }
                    }
                }
            }
            Frame::Listening => out.push(kind::LISTENING),
            Frame::Dial { peer } => {
                out.push(kind::DIAL);
                out.extend_from_slice(peer.as_bytes());
            }
            Frame::Incoming { tunnel, caller } => {
                out.push(kind::INCOMING);
                out.extend_from_slice(&tunnel.to_be_bytes());
                out.extend_from_slice(caller.as_bytes());
            }
            Frame::Accept { tunnel } => {
                out.push(kind::ACCEPT);
                out.extend_from_slice(&tunnel.to_be_bytes());
            }
            Frame::Reject { tunnel } => {
                out.push(kind::REJECT);
                out.extend_from_slice(&tunnel.to_be_bytes());
            }
            Frame::Connected { tunnel, peer } => {
                out.push(kind::CONNECTED);
                out.extend_from_slice(&tunnel.to_be_bytes());
                out.extend_from_slice(peer.as_bytes());
            }
            Frame::DialFailed { reason } => {
                out.push(kind::DIAL_FAILED);
                out.push(*reason as u8);
            }
            Frame::TunnelClosed { tunnel, reason } => {
                out.push(kind::TUNNEL_CLOSED);
                out.extend_from_slice(&tunnel.to_be_bytes());
                out.push(*reason as u8);
            }
            Frame::Invoice { channel, carried_bytes, due } => {
                out.push(kind::INVOICE);
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(&carried_bytes.to_be_bytes());
                out.extend_from_slice(&due.attos().to_be_bytes());
            }
            Frame::Voucher(voucher) => {
                out.push(kind::VOUCHER);
                out.extend_from_slice(&voucher.encode());
            }
            Frame::VoucherResult { sequence, verdict } => {
                out.push(kind::VOUCHER_RESULT);
                out.extend_from_slice(&sequence.to_be_bytes());
                out.push(*verdict as u8);
            }
            Frame::Ping(value) => {
                out.push(kind::PING);
                out.extend_from_slice(&value.to_be_bytes());
            }
            Frame::Pong(value) => {
                out.push(kind::PONG);
                out.extend_from_slice(&value.to_be_bytes());
            }
            Frame::Close { reason, message } => {
                out.push(kind::CLOSE);
                out.push(*reason as u8);
                let mut end = message.len().min(MAX_REASON_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
        }
        // Every frame above is far below MAX_FRAME_LEN, which fits a u32.
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Parses one frame's type and payload (the bytes after the length
    /// prefix). Keys are validated; trailing bytes are an error.
    pub fn decode(frame_type: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        let mut reader = Reader { bytes: payload, name: "" };
        let frame = match frame_type {
            kind::CLIENT_HELLO => {
                reader.name = "ClientHello";
                Frame::ClientHello {
                    version: reader.u16()?,
                    client: reader.key()?,
                    nonce: reader.array()?,
                }
            }
            kind::RELAY_HELLO => {
                reader.name = "RelayHello";
                Frame::RelayHello {
                    version: reader.u16()?,
                    relay: reader.key()?,
                    nonce: reader.array()?,
                    signature: Signature::from_bytes(reader.array()?),
                }
            }
            kind::CLIENT_AUTH => {
                reader.name = "ClientAuth";
                Frame::ClientAuth { signature: Signature::from_bytes(reader.array()?) }
            }
            kind::OPEN_SESSION => {
                reader.name = "OpenSession";
                let channel = match reader.u8()? {
                    0 => None,
                    1 => Some(ChannelId::from_bytes(reader.array()?)),
                    _ => return Err(reader.malformed()),
                };
                Frame::OpenSession { channel }
            }
            kind::SESSION_READY => {
                reader.name = "SessionReady";
                Frame::SessionReady {
                    price_per_byte: PricePerByte::from_attos(reader.u128()?)
                        .map_err(|_| reader.malformed())?,
                    credit_window_bytes: reader.u64()?,
                    paid: reader.amount()?,
                    sequence: reader.u64()?,
                }
            }
            kind::LISTEN => {
                reader.name = "Listen";
                let policy = match reader.u8()? {
                    0 => ListenPolicy::Closed,
                    1 => ListenPolicy::Open,
                    2 => {
                        let count = usize::from(reader.u16()?);
                        if count > MAX_ALLOW_LIST {
                            return Err(reader.malformed());
                        }
                        let mut keys = Vec::with_capacity(count);
                        for _ in 0..count {
                            keys.push(reader.key()?);
                        }
                        ListenPolicy::Allow(keys)
                    }
                    _ => return Err(reader.malformed()),
                };
                Frame::Listen { policy }
            }
            kind::LISTENING => {
                reader.name = "Listening";
                Frame::Listening
            }
            kind::DIAL => {
                reader.name = "Dial";
                Frame::Dial { peer: reader.key()? }
            }
            kind::INCOMING => {
                reader.name = "Incoming";
                Frame::Incoming { tunnel: reader.u64()?, caller: reader.key()? }
            }
            kind::ACCEPT => {
                reader.name = "Accept";
                Frame::Accept { tunnel: reader.u64()? }
            }
            kind::REJECT => {
                reader.name = "Reject";
                Frame::Reject { tunnel: reader.u64()? }
            }
            kind::CONNECTED => {
                reader.name = "Connected";
                Frame::Connected { tunnel: reader.u64()?, peer: reader.key()? }
            }
            kind::DIAL_FAILED => {
                reader.name = "DialFailed";
                let reason =
                    DialFailure::from_code(reader.u8()?).ok_or_else(|| reader.malformed())?;
                Frame::DialFailed { reason }
            }
            kind::TUNNEL_CLOSED => {
                reader.name = "TunnelClosed";
                Frame::TunnelClosed { tunnel: reader.u64()?, reason: reader.close_reason()? }
            }
            kind::INVOICE => {
                reader.name = "Invoice";
                Frame::Invoice {
                    channel: ChannelId::from_bytes(reader.array()?),
                    carried_bytes: reader.u64()?,
                    due: reader.amount()?,
                }
            }
            kind::VOUCHER => {
                reader.name = "Voucher";
                let bytes: [u8; SIGNED_VOUCHER_LEN] = reader.array()?;
                Frame::Voucher(SignedVoucher::decode(&bytes).map_err(|_| reader.malformed())?)
            }
            kind::VOUCHER_RESULT => {
                reader.name = "VoucherResult";
                let sequence = reader.u64()?;
                let verdict =
                    VoucherVerdict::from_code(reader.u8()?).ok_or_else(|| reader.malformed())?;
                Frame::VoucherResult { sequence, verdict }
            }
            kind::PING => {
                reader.name = "Ping";
                Frame::Ping(reader.u64()?)
            }
            kind::PONG => {
                reader.name = "Pong";
                Frame::Pong(reader.u64()?)
            }
            kind::CLOSE => {
                reader.name = "Close";
                let reason = reader.close_reason()?;
                let len = usize::from(reader.u16()?);
                if len > MAX_REASON_LEN {
                    return Err(reader.malformed());
                }
                let text = reader.take(len)?;
                let message = std::str::from_utf8(text).map_err(|_| reader.malformed())?.to_owned();
                Frame::Close { reason, message }
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        if !reader.bytes.is_empty() {
            return Err(reader.malformed());
        }
        Ok(frame)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    name: &'static str,
}

impl<'a> Reader<'a> {
    fn malformed(&self) -> FrameError {
        FrameError::Malformed(self.name)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < len {
            return Err(self.malformed());
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn u128(&mut self) -> Result<u128, FrameError> {
        Ok(u128::from_be_bytes(self.array()?))
    }

    fn amount(&mut self) -> Result<Amount, FrameError> {
        Amount::from_attos(self.u128()?).map_err(|_| self.malformed())
    }

    fn close_reason(&mut self) -> Result<CloseReason, FrameError> {
        CloseReason::from_code(self.u8()?).ok_or_else(|| self.malformed())
    }

    fn key(&mut self) -> Result<PublicKey, FrameError> {
        PublicKey::from_bytes(&self.array()?).map_err(|_| self.malformed())
    }
}

/// Reading and writing frames on async streams.
#[cfg(feature = "io")]
pub mod io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{Frame, FrameError, MAX_FRAME_LEN};

    /// Why a frame could not be read.
    #[derive(Debug, thiserror::Error)]
    pub enum ReadError {
        /// The connection failed or closed.
        #[error("connection: {0}")]
        Io(#[from] std::io::Error),
        /// The bytes are not a frame.
        #[error("{0}")]
        Frame(#[from] FrameError),
    }

    /// Reads one frame. The length is checked before anything is allocated,
    /// so a peer cannot make the reader buffer more than [`MAX_FRAME_LEN`].
    pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, ReadError> {
        let len = reader.read_u32().await? as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(FrameError::Length(len).into());
        }
        let frame_type = reader.read_u8().await?;
        let mut payload = vec![0u8; len - 1];
        reader.read_exact(&mut payload).await?;
        Ok(Frame::decode(frame_type, &payload)?)
    }

    /// Writes one frame and flushes it.
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        writer: &mut W,
        frame: &Frame,
    ) -> std::io::Result<()> {
        writer.write_all(&frame.encode()).await?;
        writer.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::voucher::Voucher;
    use proptest::prelude::*;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    fn round_trip(frame: &Frame) -> Result<Frame, FrameError> {
        let bytes = frame.encode();
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - 4);
        Frame::decode(bytes[4], &bytes[5..])
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let seed = any::<u8>().prop_filter("seed 0 is fine too", |_| true);
        let bytes32 = any::<[u8; 32]>();
        prop_oneof![
            (any::<u16>(), seed.clone(), bytes32).prop_map(|(version, s, nonce)| {
                Frame::ClientHello { version, client: key(s), nonce }
            }),
            (any::<u16>(), seed.clone(), bytes32, any::<[u8; 32]>()).prop_map(
                |(version, s, nonce, half)| {
                    let mut sig = [0u8; 64];
                    sig[..32].copy_from_slice(&half);
                    Frame::RelayHello {
                        version,
                        relay: key(s),
                        nonce,
                        signature: Signature::from_bytes(sig),
                    }
                }
            ),
            proptest::option::of(bytes32)
                .prop_map(|c| Frame::OpenSession { channel: c.map(ChannelId::from_bytes) }),
            (
                0u128..=1_000_000_000_000_000_000u128,
                any::<u64>(),
                0u128..=Amount::MAX.attos(),
                any::<u64>()
            )
                .prop_map(|(p, w, a, sequence)| Frame::SessionReady {
                    price_per_byte: PricePerByte::from_attos(p).unwrap(),
                    credit_window_bytes: w,
                    paid: Amount::from_attos(a).unwrap(),
                    sequence,
                }),
            proptest::collection::vec(seed.clone(), 0..20).prop_map(|seeds| Frame::Listen {
                policy: ListenPolicy::Allow(seeds.into_iter().map(key).collect())
            }),
            Just(Frame::Listen { policy: ListenPolicy::Open }),
            Just(Frame::Listen { policy: ListenPolicy::Closed }),
            Just(Frame::Listening),
            seed.clone().prop_map(|s| Frame::Dial { peer: key(s) }),
            (any::<u64>(), seed.clone())
                .prop_map(|(t, s)| Frame::Incoming { tunnel: t, caller: key(s) }),
            any::<u64>().prop_map(|tunnel| Frame::Accept { tunnel }),
            any::<u64>().prop_map(|tunnel| Frame::Reject { tunnel }),
            (any::<u64>(), seed.clone())
                .prop_map(|(t, s)| Frame::Connected { tunnel: t, peer: key(s) }),
            proptest::sample::select(DialFailure::ALL)
                .prop_map(|reason| Frame::DialFailed { reason }),
            (bytes32, any::<u64>(), 0u128..=Amount::MAX.attos()).prop_map(|(c, b, d)| {
                Frame::Invoice {
                    channel: ChannelId::from_bytes(c),
                    carried_bytes: b,
                    due: Amount::from_attos(d).unwrap(),
                }
            }),
            (bytes32, any::<u64>(), 0u128..=Amount::MAX.attos()).prop_map(|(c, s, a)| {
                Frame::Voucher(
                    Voucher {
                        channel: ChannelId::from_bytes(c),
                        sequence: s,
                        cumulative: Amount::from_attos(a).unwrap(),
                    }
                    .sign(&SecretKey::from_seed(&[7; 32])),
                )
            }),
            (any::<u64>(), proptest::sample::select(VoucherVerdict::ALL))
                .prop_map(|(sequence, verdict)| Frame::VoucherResult { sequence, verdict }),
            (any::<u64>(), proptest::sample::select(CloseReason::ALL))
                .prop_map(|(tunnel, reason)| Frame::TunnelClosed { tunnel, reason }),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
            (proptest::sample::select(CloseReason::ALL), ".{0,100}")
                .prop_map(|(reason, message)| Frame::Close { reason, message }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in any_frame()) {
            prop_assert_eq!(round_trip(&frame), Ok(frame.clone()));
            let bytes = frame.encode();
            prop_assert!(bytes.len() - 4 <= MAX_FRAME_LEN);
        }

        #[test]
        fn truncated_or_extended_payloads_are_refused(frame in any_frame(), extra in 1usize..4) {
            let bytes = frame.encode();
            let payload = &bytes[5..];
            if !payload.is_empty() {
                prop_assert!(Frame::decode(bytes[4], &payload[..payload.len() - 1]).is_err());
            }
            let mut longer = payload.to_vec();
            longer.extend(std::iter::repeat_n(0u8, extra));
            prop_assert!(Frame::decode(bytes[4], &longer).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(frame_type in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(frame_type, &payload);
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert_eq!(Frame::decode(0x99, &[]), Err(FrameError::UnknownType(0x99)));
        // An off-curve key in a Dial.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert!(PublicKey::from_bytes(&off_curve).is_err());
        assert_eq!(Frame::decode(0x20, &off_curve), Err(FrameError::Malformed("Dial")));
        // An allow-list longer than the bound.
        let mut listen = vec![2u8];
        listen.extend_from_slice(&((MAX_ALLOW_LIST + 1) as u16).to_be_bytes());
        assert_eq!(Frame::decode(0x12, &listen), Err(FrameError::Malformed("Listen")));
        // An unknown enum value.
        assert_eq!(Frame::decode(0x23, &[9]), Err(FrameError::Malformed("DialFailed")));
        // A message that is not UTF-8.
        assert_eq!(Frame::decode(0x7f, &[0, 0, 1, 0xff]), Err(FrameError::Malformed("Close")));
    }

    #[test]
    fn the_largest_allow_list_fits_a_frame() {
        let frame = Frame::Listen { policy: ListenPolicy::Allow(vec![key(1); MAX_ALLOW_LIST]) };
        assert!(frame.encode().len() - 4 <= MAX_FRAME_LEN);
    }
}
