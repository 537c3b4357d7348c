//! Channels handled for the client: one open channel per relay, opened with
//! a budget when first needed, topped up before the vouchers reach its
//! escrow, and closed for the refund when done.

use ferry_proto::{Amount, ChannelId, PublicKey};

use crate::registry::{ChannelView, RegistryClient, RegistryError, id_prefix, next_nonce};

/// How a client funds its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The escrow of a new channel.
    pub open: Amount,
    /// What one top-up adds (at least two credit windows' cost).
    pub top_up: Amount,
    /// Top up once the escrow left above the newest voucher is below this
    /// (at least two credit windows' cost).
    pub low_water: Amount,
}

/// How many credit windows' cost a channel keeps above its newest voucher:
/// the relay shrinks the window once less than one is left, so topping up
/// at two leaves a whole window of payments for the top-up to land.
pub const TOP_UP_WINDOWS: u128 = 2;

/// A channel's money as its client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMoney {
    /// The channel.
    pub channel: ChannelView,
    /// Paid by vouchers but not yet settled by the relay.
    pub pending: Amount,
}

/// The client's channels, through the registry.
#[derive(Debug, Clone)]
pub struct Wallet {
    registry: RegistryClient,
    budget: Budget,
}

impl Wallet {
    /// A wallet of `registry`'s signing key, funding channels by `budget`.
    pub fn new(registry: RegistryClient, budget: Budget) -> Wallet {
        Wallet { registry, budget }
    }

    /// The open channel to `relay`, opened with the budget if there is none.
    pub async fn channel_to(&self, relay: &PublicKey) -> Result<ChannelView, RegistryError> {
        let me = self.registry.key().public();
        let channels = self.registry.channels().await?;
        let open =
            channels.iter().find(|c| c.client == me && c.relay == *relay && c.state == "open");
        if let Some(open) = open {
            return Ok(open.clone());
        }
        let nonce = next_nonce(&channels, &me, relay);
        self.registry.open_channel(relay, nonce, self.budget.open).await
    }

    /// Tops `channel` up when the escrow above `paid` (the newest voucher's
    /// cumulative amount) is below the budget's low water, or below
    /// [`TOP_UP_WINDOWS`] × `window_cost` (what the relay's credit window
    /// costs), so the relay never shrinks the window for want of escrow;
    /// returns the channel as it now stands.
    pub async fn top_up_if_low(
        &self,
        channel: &ChannelView,
        paid: Amount,
        window_cost: Amount,
    ) -> Result<ChannelView, RegistryError> {
        let margin = Amount::from_attos(window_cost.attos().saturating_mul(TOP_UP_WINDOWS))
            .unwrap_or(Amount::MAX);
        let left = channel.deposited.checked_sub(paid).unwrap_or(Amount::ZERO);
        if left >= self.budget.low_water.max(margin) {
            return Ok(channel.clone());
        }
        // Named by the deposit it tops up, so a retry adds nothing twice.
        // 16 hex digits of the id leave room for a u128 of attos.
        let idempotency =
            format!("top-up-{}-{}", id_prefix(&channel.id, 16), channel.deposited.attos());
        self.registry.top_up(&channel.id, self.budget.top_up.max(margin), &idempotency).await
    }

    /// Asks to close `channel`; the refund follows the relay's close or,
    /// after the dispute window, [`Wallet::finalize`].
    pub async fn close(&self, channel: &ChannelId) -> Result<ChannelView, RegistryError> {
        self.registry.request_close(channel).await
    }

    /// Closes a channel whose dispute window has passed, refunding the rest.
    pub async fn finalize(&self, channel: &ChannelId) -> Result<ChannelView, RegistryError> {
        self.registry.finalize(channel).await
    }

    /// Every channel this client pays through, with what is pending given
    /// `paid`, the newest voucher amount per channel this client knows of.
    pub async fn money(
        &self,
        paid: impl Fn(&ChannelId) -> Option<Amount>,
    ) -> Result<Vec<ChannelMoney>, RegistryError> {
        let me = self.registry.key().public();
        let channels = self.registry.channels().await?;
        Ok(channels
            .into_iter()
            .filter(|channel| channel.client == me)
            .map(|channel| {
                let pending = paid(&channel.id)
                    .and_then(|paid| paid.checked_sub(channel.settled).ok())
                    .unwrap_or(Amount::ZERO);
                ChannelMoney { channel, pending }
            })
            .collect())
    }
}
