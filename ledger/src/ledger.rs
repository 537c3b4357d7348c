//! The ledger's operations: deposits, withdrawals, channels and statements.
//! Settlement lives in `settle.rs`, the invariant check in `check.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_proto::{Amount, Balance, ChannelId, PublicKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use crate::error::LedgerError;
use crate::model::{
    AccountKind, AccountRef, BalanceSummary, ChannelInfo, ChannelState, IdempotencyKey, Statement,
    StatementEntry, TransferKind, TransferReceipt,
};
use crate::postings::{Postings, parse_db};

/// The most vouchers one settlement batch may carry.
pub const MAX_SETTLEMENT_BATCH: usize = 10_000;
/// The most entries one statement page may hold.
pub const MAX_STATEMENT_PAGE: u32 = 1_000;
/// The most channels [`Ledger::channels_of`] lists.
pub const MAX_CHANNELS_LISTED: u32 = 1_000;
/// The longest dispute window the ledger accepts: one year.
pub const MAX_DISPUTE_WINDOW: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// The ledger operator's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Connections in the ledger's pool.
    pub max_connections: u32,
    /// The registry's fee on every settled amount, in basis points (1/100 of a
    /// percent), at most 10,000.
    pub fee_basis_points: u16,
    /// How long a relay may still settle after the client asks to close.
    pub dispute_window: Duration,
}

impl Default for LedgerConfig {
    fn default() -> LedgerConfig {
        LedgerConfig {
            max_connections: 16,
            fee_basis_points: 100,
            dispute_window: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// The ledger, over a Postgres pool. Cheap to clone; stateless beyond the
/// database, so any number of processes may share one database.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(crate) pool: PgPool,
    pub(crate) config: LedgerConfig,
    pub(crate) world: i64,
    pub(crate) treasury: i64,
}

/// Whether an idempotent operation is new or a repeat.
pub(crate) enum Claim<T> {
    /// First time: the operation's row is claimed in its open transaction.
    New(Operation),
    /// A repeat of a finished operation: its stored answer.
    Replay(T),
}

/// A new operation: its transaction, which holds the claim on its row.
pub(crate) struct Operation {
    /// The transaction everything the operation does runs in.
    pub(crate) tx: Transaction<'static, Postgres>,
    /// The operation's row id, which its transfers reference.
    pub(crate) id: i64,
    /// The transaction's time, the one clock every deadline is compared with.
    pub(crate) now: DateTime<Utc>,
}

impl Ledger {
    /// Connects to the database at `options`, applies the migrations and
    /// opens the ledger.
    ///
    /// The pool's sessions plan every statement for its actual parameters
    /// (`plan_cache_mode = force_custom_plan`): a cached generic plan cannot
    /// see how many rows an `unnest` of a parameter array yields and chooses
    /// sequential scans, which made single settlements several times slower
    /// once tables grew. Connections are not pinged before use, which would
    /// add a round trip to every operation; an operation on a dead connection
    /// fails cleanly and is retried under its idempotency key.
    pub async fn connect(
        options: PgConnectOptions,
        config: LedgerConfig,
    ) -> Result<Ledger, LedgerError> {
        if config.fee_basis_points > 10_000 {
            return Err(LedgerError::InvalidConfig(format!(
                "a fee of {} basis points is above 100%",
                config.fee_basis_points
            )));
        }
        if config.dispute_window > MAX_DISPUTE_WINDOW {
            return Err(LedgerError::InvalidConfig(format!(
                "a dispute window of {:?} is longer than the maximum of {MAX_DISPUTE_WINDOW:?}",
                config.dispute_window
            )));
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .test_before_acquire(false)
            .connect_with(options.options([("plan_cache_mode", "force_custom_plan")]))
            .await?;
        crate::MIGRATOR
            .run(&pool)
            .await
            .map_err(|error| LedgerError::Database(sqlx::Error::Migrate(Box::new(error))))?;
        let system: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, kind FROM accounts WHERE kind IN ('world', 'treasury')")
                .fetch_all(&pool)
                .await?;
        let find = |kind: &str| {
            system
                .iter()
                .find(|(_, k)| k == kind)
                .map(|(id, _)| *id)
                .ok_or_else(|| LedgerError::Corrupt(format!("the {kind} account is missing")))
        };
        Ok(Ledger { world: find("world")?, treasury: find("treasury")?, pool, config })
    }

    /// The Postgres pool the ledger uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool, waiting for operations in flight.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The ledger's settings.
    pub fn config(&self) -> LedgerConfig {
        self.config
    }

    /// Moves `amount` from the outside world into `holder`'s account. In a
    /// deployment the registry operator (`signer`) signs this when a payment
    /// arrives. The idempotency key is the signer's, not the holder's, so a
    /// holder cannot use up the key a deposit gateway will use.
    pub async fn deposit(
        &self,
        key: &IdempotencyKey,
        signer: &PublicKey,
        holder: &PublicKey,
        amount: Amount,
    ) -> Result<TransferReceipt, LedgerError> {
        require_positive(amount)?;
        let holder_account = self.ensure_holder(holder).await?;
        let scope = Scope { signer, holder, holder_account };
        self.transfer_with_world(TransferKind::Deposit, key, scope, amount).await
    }

    /// Moves `amount` from `holder`'s account to the outside world.
    pub async fn withdraw(
        &self,
        key: &IdempotencyKey,
        holder: &PublicKey,
        amount: Amount,
    ) -> Result<TransferReceipt, LedgerError> {
        require_positive(amount)?;
        let Some(holder_account) = self.holder_id(holder).await? else {
            return Err(LedgerError::InsufficientBalance {
                available: Balance::ZERO,
                needed: amount,
            });
        };
        let scope = Scope { signer: holder, holder, holder_account };
        self.transfer_with_world(TransferKind::Withdrawal, key, scope, amount).await
    }

    /// A deposit or a withdrawal: one transfer between the holder's account
    /// and the outside world, in the direction `kind` says.
    async fn transfer_with_world(
        &self,
        kind: TransferKind,
        key: &IdempotencyKey,
        Scope { signer, holder, holder_account }: Scope<'_>,
        amount: Amount,
    ) -> Result<TransferReceipt, LedgerError> {
        let request = (kind, holder, amount);
        let mut op = match begin(&self.pool, kind.as_str(), signer, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(receipt) => return Ok(receipt),
        };
        let (debit, credit) = match kind {
            TransferKind::Deposit => (self.world, holder_account),
            _ => (holder_account, self.world),
        };
        let mut postings = Postings::lock(&mut op.tx, &[self.world, holder_account]).await?;
        postings.transfer(kind, debit, credit, amount, None)?;
        let receipt =
            TransferReceipt { operation_id: op.id, balance: postings.balance(holder_account)? };
        op.commit(postings, &[], receipt).await
    }

    /// Opens a channel from `client` to `relay`, escrowing `amount` from the
    /// client's account. The channel id is derived from both keys and `nonce`.
    pub async fn open_channel(
        &self,
        key: &IdempotencyKey,
        client: &PublicKey,
        relay: &PublicKey,
        nonce: u64,
        amount: Amount,
    ) -> Result<ChannelInfo, LedgerError> {
        require_positive(amount)?;
        if client == relay {
            return Err(LedgerError::SameKey);
        }
        let id = ChannelId::derive(client, relay, nonce);
        // A client without an account has no money to escrow. The relay's
        // account is created (empty) in its own statement before the
        // transaction, which keeps account creation out of the locking order.
        let Some(client_account) = self.holder_id(client).await? else {
            return Err(LedgerError::InsufficientBalance {
                available: Balance::ZERO,
                needed: amount,
            });
        };
        self.ensure_holder(relay).await?;

        let request = ("open_channel", client, relay, nonce, amount);
        let mut op = match begin(&self.pool, "open_channel", client, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(channel) => return Ok(channel),
        };
        let escrow: i64 =
            sqlx::query_scalar("INSERT INTO accounts (kind) VALUES ('escrow') RETURNING id")
                .fetch_one(&mut *op.tx)
                .await?;
        let inserted = sqlx::query(
            "INSERT INTO channels (id, client_key, relay_key, nonce, escrow_account, state, deposited) \
             VALUES ($1, $2, $3, $4, $5, 'open', $6::numeric) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_bytes().as_slice())
        .bind(client.as_bytes().as_slice())
        .bind(relay.as_bytes().as_slice())
        .bind(nonce.to_be_bytes().as_slice())
        .bind(escrow)
        .bind(amount.to_string())
        .execute(&mut *op.tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(LedgerError::ChannelExists(id));
        }
        let mut postings = Postings::lock(&mut op.tx, &[client_account, escrow]).await?;
        postings.transfer(TransferKind::Funding, client_account, escrow, amount, Some(id))?;
        let row = load_channel(&mut op.tx, &id, false).await?;
        let info = row.clone().into_info()?;
        op.commit(postings, &[&row], info).await
    }

    /// Adds `amount` from the client's account to an open channel's escrow.
    pub async fn top_up(
        &self,
        key: &IdempotencyKey,
        client: &PublicKey,
        channel: &ChannelId,
        amount: Amount,
    ) -> Result<ChannelInfo, LedgerError> {
        require_positive(amount)?;
        let request = ("top_up", client, channel, amount);
        let mut op = match begin(&self.pool, "top_up", client, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(channel) => return Ok(channel),
        };
        let mut row = load_channel(&mut op.tx, channel, true).await?;
        row.require_client(client)?;
        row.require_state(ChannelState::Open)?;
        let mut postings =
            Postings::lock(&mut op.tx, &[row.client_account, row.escrow_account]).await?;
        postings.transfer(
            TransferKind::Funding,
            row.client_account,
            row.escrow_account,
            amount,
            Some(*channel),
        )?;
        row.deposited = row.deposited.checked_add(amount)?;
        let info = row.clone().into_info()?;
        op.commit(postings, &[&row], info).await
    }

    /// The client asks to close an open channel. The relay may still settle
    /// until the dispute deadline (now + the dispute window); after it,
    /// [`Ledger::finalize`] returns the rest to the client.
    pub async fn request_close(
        &self,
        key: &IdempotencyKey,
        client: &PublicKey,
        channel: &ChannelId,
    ) -> Result<ChannelInfo, LedgerError> {
        let request = ("request_close", client, channel);
        let mut op = match begin(&self.pool, "request_close", client, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(channel) => return Ok(channel),
        };
        let mut row = load_channel(&mut op.tx, channel, true).await?;
        row.require_client(client)?;
        row.require_state(ChannelState::Open)?;
        let window = chrono::Duration::from_std(self.config.dispute_window)
            .map_err(|_| LedgerError::InvalidConfig("dispute window out of range".into()))?;
        row.state = ChannelState::Closing;
        row.close_requested_at = Some(op.now);
        row.dispute_deadline =
            Some(op.now.checked_add_signed(window).ok_or_else(|| {
                LedgerError::InvalidConfig("dispute deadline out of range".into())
            })?);
        let info = row.clone().into_info()?;
        op.commit(Postings::none(), &[&row], info).await
    }

    /// Closes a closing channel whose dispute window has passed and returns
    /// what its escrow holds to the client. Anyone may ask: the money can
    /// only go to the client. The operation is idempotent in the namespace of
    /// `caller`, the key that asks.
    pub async fn finalize(
        &self,
        key: &IdempotencyKey,
        caller: &PublicKey,
        channel: &ChannelId,
    ) -> Result<ChannelInfo, LedgerError> {
        let request = ("finalize", channel);
        let mut op = match begin(&self.pool, "finalize", caller, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(channel) => return Ok(channel),
        };
        let mut row = load_channel(&mut op.tx, channel, true).await?;
        row.require_state(ChannelState::Closing)?;
        if let Some(deadline) = row.dispute_deadline.filter(|deadline| op.now <= *deadline) {
            return Err(LedgerError::DisputeWindowOpen { deadline });
        }
        let mut postings =
            Postings::lock(&mut op.tx, &[row.client_account, row.escrow_account]).await?;
        self.refund_and_close(&mut postings, &mut row, op.now)?;
        let info = row.clone().into_info()?;
        op.commit(postings, &[&row], info).await
    }

    /// A channel's current state.
    pub async fn channel(&self, channel: &ChannelId) -> Result<ChannelInfo, LedgerError> {
        load_channel(&mut *self.pool.acquire().await?, channel, false).await?.into_info()
    }

    /// The newest [`MAX_CHANNELS_LISTED`] channels where `key` is the
    /// client or the relay, newest first.
    pub async fn channels_of(&self, key: &PublicKey) -> Result<Vec<ChannelInfo>, LedgerError> {
        let rows = sqlx::query(select_channels!(
            "WHERE c.client_key = $1 OR c.relay_key = $1 ORDER BY c.opened_at DESC, c.id LIMIT $2"
        ))
        .bind(key.as_bytes().as_slice())
        .bind(i64::from(MAX_CHANNELS_LISTED))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| ChannelRow::from_row(row)?.into_info()).collect()
    }

    /// A key's money at a glance: available, in escrow as a client, and earned
    /// as a relay.
    pub async fn balance(&self, holder: &PublicKey) -> Result<BalanceSummary, LedgerError> {
        let row = sqlx::query(
            "SELECT \
               (SELECT balance FROM accounts WHERE holder_key = $1)::text AS available, \
               (SELECT coalesce(sum(a.balance), 0) FROM channels c \
                  JOIN accounts a ON a.id = c.escrow_account \
                 WHERE c.client_key = $1)::text AS in_escrow, \
               (SELECT coalesce(sum(t.amount), 0) FROM transfers t \
                  JOIN accounts a ON a.id = t.credit_account \
                 WHERE a.holder_key = $1 AND t.kind = 'settlement')::text AS earned",
        )
        .bind(holder.as_bytes().as_slice())
        .fetch_one(&self.pool)
        .await?;
        let available: Option<String> = row.try_get("available")?;
        Ok(BalanceSummary {
            available: available.as_deref().map(parse_db).transpose()?.unwrap_or(Balance::ZERO),
            in_escrow: parse_db(&row.try_get::<String, _>("in_escrow")?)?,
            earned: parse_db(&row.try_get::<String, _>("earned")?)?,
        })
    }

    /// A page of an account's transfers, newest first: at most `limit`
    /// entries older than transfer `before` (or the newest when `None`).
    pub async fn statement(
        &self,
        account: AccountRef,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Statement, LedgerError> {
        if limit == 0 || limit > MAX_STATEMENT_PAGE {
            return Err(LedgerError::PageSize { got: limit, max: MAX_STATEMENT_PAGE });
        }
        // One snapshot for the balance and the entries, so they agree.
        let mut conn = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *conn)
            .await?;
        let account_id = match account {
            AccountRef::World => Some(self.world),
            AccountRef::Treasury => Some(self.treasury),
            AccountRef::Holder { key } => {
                sqlx::query_scalar("SELECT id FROM accounts WHERE holder_key = $1")
                    .bind(key.as_bytes().as_slice())
                    .fetch_optional(&mut *conn)
                    .await?
            }
            AccountRef::Escrow { channel } => {
                Some(load_channel(&mut conn, &channel, false).await?.escrow_account)
            }
        };
        let Some(account_id) = account_id else {
            // A key that never had money has an empty statement.
            return Ok(Statement {
                account,
                balance: Balance::ZERO,
                entries: Vec::new(),
                next_before: None,
            });
        };
        let balance: String =
            sqlx::query_scalar("SELECT balance::text FROM accounts WHERE id = $1")
                .bind(account_id)
                .fetch_one(&mut *conn)
                .await?;
        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.amount::text AS amount, t.created_at, \
                    (t.debit_account = $1) AS outgoing, \
                    (CASE WHEN t.debit_account = $1 THEN t.debit_balance_after \
                          ELSE t.credit_balance_after END)::text AS balance_after, \
                    o.kind AS other_kind, o.holder_key AS other_holder, c.id AS other_channel \
             FROM transfers t \
             JOIN accounts o ON o.id = CASE WHEN t.debit_account = $1 \
                                            THEN t.credit_account ELSE t.debit_account END \
             LEFT JOIN channels c ON c.escrow_account = o.id \
             WHERE (t.debit_account = $1 OR t.credit_account = $1) AND t.id < $2 \
             ORDER BY t.id DESC LIMIT $3",
        )
        .bind(account_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let amount: Amount = parse_db(&row.try_get::<String, _>("amount")?)?;
            let change = if row.try_get("outgoing")? {
                Balance::ZERO.checked_sub(amount)?
            } else {
                Balance::from(amount)
            };
            entries.push(StatementEntry {
                transfer_id: row.try_get("id")?,
                kind: row.try_get::<String, _>("kind")?.parse().map_err(LedgerError::Corrupt)?,
                change,
                balance_after: parse_db(&row.try_get::<String, _>("balance_after")?)?,
                counterparty: account_ref(
                    &row.try_get::<String, _>("other_kind")?,
                    row.try_get("other_holder")?,
                    row.try_get("other_channel")?,
                )?,
                at: row.try_get("created_at")?,
            });
        }
        let next_before = if entries.len() == limit as usize {
            entries.last().map(|entry| entry.transfer_id)
        } else {
            None
        };
        conn.commit().await?;
        Ok(Statement { account, balance: parse_db(&balance)?, entries, next_before })
    }

    /// Returns the escrow's remainder to the client and marks the channel
    /// closed. The caller has locked the channel, the escrow and the client.
    pub(crate) fn refund_and_close(
        &self,
        postings: &mut Postings,
        row: &mut ChannelRow,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let rest = row.escrow()?;
        postings.transfer(
            TransferKind::Refund,
            row.escrow_account,
            row.client_account,
            rest,
            Some(row.id),
        )?;
        row.refunded = row.refunded.checked_add(rest)?;
        row.state = ChannelState::Closed;
        row.closed_at = Some(now);
        Ok(())
    }

    /// The id of `key`'s holder account, creating the account if needed.
    pub(crate) async fn ensure_holder(&self, key: &PublicKey) -> Result<i64, LedgerError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO accounts (kind, holder_key) VALUES ('holder', $1) \
             ON CONFLICT (holder_key) DO NOTHING RETURNING id",
        )
        .bind(key.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => Ok(id),
            None => self.holder_id(key).await?.ok_or_else(|| {
                LedgerError::Corrupt(format!("the account of {key} vanished after creation"))
            }),
        }
    }

    /// The id of `key`'s holder account, if it has one.
    pub(crate) async fn holder_id(&self, key: &PublicKey) -> Result<Option<i64>, LedgerError> {
        Ok(sqlx::query_scalar("SELECT id FROM accounts WHERE holder_key = $1")
            .bind(key.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?)
    }
}

fn require_positive(amount: Amount) -> Result<(), LedgerError> {
    if amount.is_zero() { Err(LedgerError::ZeroAmount) } else { Ok(()) }
}

fn account_ref(
    kind: &str,
    holder: Option<Vec<u8>>,
    channel: Option<Vec<u8>>,
) -> Result<AccountRef, LedgerError> {
    Ok(match kind.parse().map_err(LedgerError::Corrupt)? {
        AccountKind::World => AccountRef::World,
        AccountKind::Treasury => AccountRef::Treasury,
        AccountKind::Holder => AccountRef::Holder { key: key_from_db(holder.as_deref())? },
        AccountKind::Escrow => {
            AccountRef::Escrow { channel: channel_id_from_db(channel.as_deref())? }
        }
    })
}

impl Operation {
    /// Writes everything the operation decided (`postings`, the new state of
    /// `channels`, and `answer` for replays), commits, and returns `answer`.
    pub(crate) async fn commit<T: Serialize>(
        mut self,
        postings: Postings,
        channels: &[&ChannelRow],
        answer: T,
    ) -> Result<T, LedgerError> {
        postings.write(&mut self.tx, self.id, channels, &answer).await?;
        self.tx.commit().await?;
        Ok(answer)
    }
}

/// Whose money a deposit or withdrawal moves, and who signed it (the
/// namespace of its idempotency key).
struct Scope<'a> {
    signer: &'a PublicKey,
    holder: &'a PublicKey,
    holder_account: i64,
}

/// Begins an operation: opens its transaction and claims the idempotency key
/// `key` in `scope`'s namespace for this request, or returns the stored answer
/// of the same request made before. A concurrent twin waits on the claimed
/// row until this transaction ends.
pub(crate) async fn begin<T: DeserializeOwned>(
    pool: &PgPool,
    kind: &str,
    scope: &PublicKey,
    key: &IdempotencyKey,
    request: &impl Serialize,
) -> Result<Claim<T>, LedgerError> {
    let mut tx = pool.begin().await?;
    let body = serde_json::to_vec(request)
        .map_err(|error| LedgerError::Corrupt(format!("encoding a request: {error}")))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(kind.as_bytes()).update(&[0]).update(&body);
    let request_hash = hasher.finalize();
    let claimed: Option<(i64, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO operations (scope_key, idempotency_key, kind, request_hash) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (scope_key, idempotency_key) DO NOTHING \
         RETURNING id, created_at",
    )
    .bind(scope.as_bytes().as_slice())
    .bind(key.as_str())
    .bind(kind)
    .bind(request_hash.as_bytes().as_slice())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((id, now)) = claimed {
        return Ok(Claim::New(Operation { tx, id, now }));
    }
    let (stored_kind, stored_hash, response): (String, Vec<u8>, Option<serde_json::Value>) =
        sqlx::query_as(
            "SELECT kind, request_hash, response FROM operations \
             WHERE scope_key = $1 AND idempotency_key = $2",
        )
        .bind(scope.as_bytes().as_slice())
        .bind(key.as_str())
        .fetch_one(&mut *tx)
        .await?;
    if stored_kind != kind || stored_hash.as_slice() != request_hash.as_bytes() {
        return Err(LedgerError::IdempotencyConflict(key.to_string()));
    }
    let response =
        response.ok_or_else(|| LedgerError::Corrupt(format!("operation {key} has no response")))?;
    serde_json::from_value(response)
        .map(Claim::Replay)
        .map_err(|error| LedgerError::Corrupt(format!("stored response of {key}: {error}")))
}

/// `SELECT`s the columns of channel rows (table alias `c`), with the ids of
/// both parties' accounts, in the form [`ChannelRow::from_row`] reads,
/// followed by the rest of the query (a string literal). Lock with
/// `FOR UPDATE OF c`: the parties' accounts are locked later, in id order.
macro_rules! select_channels {
    ($rest:literal) => {
        concat!(
            "SELECT c.id, c.client_key, c.relay_key, c.nonce, c.escrow_account, c.state, ",
            "c.deposited::text AS deposited, c.settled::text AS settled, ",
            "c.refunded::text AS refunded, c.last_sequence, c.opened_at, c.close_requested_at, ",
            "c.dispute_deadline, c.closed_at, ",
            "client_account.id AS client_account, relay_account.id AS relay_account ",
            "FROM channels c ",
            "JOIN accounts client_account ON client_account.holder_key = c.client_key ",
            "JOIN accounts relay_account ON relay_account.holder_key = c.relay_key ",
            $rest
        )
    };
}
pub(crate) use select_channels;

/// A channel row, read (and usually locked) by the current transaction.
#[derive(Debug, Clone)]
pub(crate) struct ChannelRow {
    pub(crate) id: ChannelId,
    pub(crate) client: PublicKey,
    pub(crate) relay: PublicKey,
    pub(crate) nonce: u64,
    pub(crate) escrow_account: i64,
    pub(crate) client_account: i64,
    pub(crate) relay_account: i64,
    pub(crate) state: ChannelState,
    pub(crate) deposited: Amount,
    pub(crate) settled: Amount,
    pub(crate) refunded: Amount,
    pub(crate) last_sequence: u64,
    pub(crate) opened_at: DateTime<Utc>,
    pub(crate) close_requested_at: Option<DateTime<Utc>>,
    pub(crate) dispute_deadline: Option<DateTime<Utc>>,
    pub(crate) closed_at: Option<DateTime<Utc>>,
}

impl ChannelRow {
    pub(crate) fn from_row(row: &PgRow) -> Result<ChannelRow, LedgerError> {
        let nonce: Vec<u8> = row.try_get("nonce")?;
        let nonce: [u8; 8] = nonce
            .try_into()
            .map_err(|_| LedgerError::Corrupt("channel nonce is not 8 bytes".into()))?;
        let last_sequence: i64 = row.try_get("last_sequence")?;
        Ok(ChannelRow {
            id: channel_id_from_db(Some(&row.try_get::<Vec<u8>, _>("id")?))?,
            client: key_from_db(Some(&row.try_get::<Vec<u8>, _>("client_key")?))?,
            relay: key_from_db(Some(&row.try_get::<Vec<u8>, _>("relay_key")?))?,
            nonce: u64::from_be_bytes(nonce),
            escrow_account: row.try_get("escrow_account")?,
            client_account: row.try_get("client_account")?,
            relay_account: row.try_get("relay_account")?,
            state: row.try_get::<String, _>("state")?.parse().map_err(LedgerError::Corrupt)?,
            deposited: parse_db(&row.try_get::<String, _>("deposited")?)?,
            settled: parse_db(&row.try_get::<String, _>("settled")?)?,
            refunded: parse_db(&row.try_get::<String, _>("refunded")?)?,
            last_sequence: u64::try_from(last_sequence)
                .map_err(|_| LedgerError::Corrupt("negative channel sequence".into()))?,
            opened_at: row.try_get("opened_at")?,
            close_requested_at: row.try_get("close_requested_at")?,
            dispute_deadline: row.try_get("dispute_deadline")?,
            closed_at: row.try_get("closed_at")?,
        })
    }

    /// What the escrow holds: deposited - settled - refunded.
    pub(crate) fn escrow(&self) -> Result<Amount, LedgerError> {
        Ok(self.deposited.checked_sub(self.settled)?.checked_sub(self.refunded)?)
    }

    pub(crate) fn require_client(&self, client: &PublicKey) -> Result<(), LedgerError> {
        if self.client != *client {
            return Err(LedgerError::NotParticipant { role: "client" });
        }
        Ok(())
    }

    pub(crate) fn require_state(&self, state: ChannelState) -> Result<(), LedgerError> {
        if self.state != state {
            return Err(LedgerError::WrongState { channel: self.id, state: self.state });
        }
        Ok(())
    }

    pub(crate) fn into_info(self) -> Result<ChannelInfo, LedgerError> {
        Ok(ChannelInfo {
            escrow: self.escrow()?,
            id: self.id,
            client: self.client,
            relay: self.relay,
            nonce: self.nonce,
            state: self.state,
            deposited: self.deposited,
            settled: self.settled,
            refunded: self.refunded,
            last_sequence: self.last_sequence,
            opened_at: self.opened_at,
            close_requested_at: self.close_requested_at,
            dispute_deadline: self.dispute_deadline,
            closed_at: self.closed_at,
        })
    }
}

/// Reads a channel, locking it (`FOR UPDATE`) when `lock` is set.
pub(crate) async fn load_channel(
    conn: &mut PgConnection,
    channel: &ChannelId,
    lock: bool,
) -> Result<ChannelRow, LedgerError> {
    let query = if lock {
        select_channels!("WHERE c.id = $1 FOR UPDATE OF c")
    } else {
        select_channels!("WHERE c.id = $1")
    };
    let row = sqlx::query(query)
        .bind(channel.as_bytes().as_slice())
        .fetch_optional(conn)
        .await?
        .ok_or(LedgerError::UnknownChannel(*channel))?;
    ChannelRow::from_row(&row)
}

pub(crate) fn key_from_db(bytes: Option<&[u8]>) -> Result<PublicKey, LedgerError> {
    let bytes: &[u8; 32] = bytes
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| LedgerError::Corrupt("a stored key is not 32 bytes".into()))?;
    PublicKey::from_bytes(bytes)
        .map_err(|error| LedgerError::Corrupt(format!("stored key: {error}")))
}

pub(crate) fn channel_id_from_db(bytes: Option<&[u8]>) -> Result<ChannelId, LedgerError> {
    bytes
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(ChannelId::from_bytes)
        .ok_or_else(|| LedgerError::Corrupt("a stored channel id is not 32 bytes".into()))
}
