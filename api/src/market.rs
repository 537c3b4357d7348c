//! The relay market in memory: listings are served from a snapshot of every
//! registered relay, pre-rendered as JSON and kept in the three listing
//! orders, because listings are the registry's hottest read and a database
//! query per listing is 30 times slower than serving from memory
//! (docs/BENCHMARKS.md).
//!
//! Freshness: this instance's own writes (advertisements, heartbeats) update
//! the snapshot at once; other instances' writes, reputation changes and
//! relays going quiet are picked up by a full reload when a listing finds
//! the snapshot older than [`SNAPSHOT_MAX_AGE`]. One request reloads while
//! the others go on serving the previous snapshot.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ferry_proto::PricePerByte;
use serde_json::value::RawValue;
use sqlx::PgPool;

use crate::ApiError;
use crate::relays::{RelayView, SortBy};

/// The oldest snapshot a listing is served from before it is reloaded.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// One relay, ready to list.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: [u8; 32],
    pub(crate) price: PricePerByte,
    pub(crate) reputation: f64,
    pub(crate) value_score: f64,
    pub(crate) region: String,
    pub(crate) live: bool,
    /// Which of two entries of one relay is newer: heartbeats and
    /// advertisements only move forward.
    version: (Option<DateTime<Utc>>, u64),
    /// The relay's view, rendered.
    pub(crate) json: Box<RawValue>,
}

impl Entry {
    pub(crate) fn new(view: &RelayView) -> Result<Entry, ApiError> {
        let json = serde_json::value::to_raw_value(view)
            .map_err(|_| ApiError::internal("rendering a relay view"))?;
        Ok(Entry {
            key: view.key_bytes,
            price: view.price_per_byte,
            reputation: view.reputation.score,
            value_score: view.value_score,
            region: view.region.clone(),
            live: view.live,
            version: (view.last_heartbeat, view.issued_at_ms),
            json,
        })
    }

    /// A position in the listing orders, before its sort fields are set.
    pub(crate) fn position(key: [u8; 32]) -> Entry {
        Entry {
            key,
            price: PricePerByte::default(),
            reputation: 0.0,
            value_score: 0.0,
            region: String::new(),
            live: false,
            version: (None, 0),
            json: RawValue::NULL.to_owned(),
        }
    }

    /// Whether `self` comes before `other` in `sort`'s order.
    pub(crate) fn order(&self, other: &Entry, sort: SortBy) -> Ordering {
        match sort {
            SortBy::Price => (self.price, self.key).cmp(&(other.price, other.key)),
            SortBy::Reputation => {
                other.reputation.total_cmp(&self.reputation).then_with(|| other.key.cmp(&self.key))
            }
            SortBy::Value => other
                .value_score
                .total_cmp(&self.value_score)
                .then_with(|| other.key.cmp(&self.key)),
        }
    }
}

/// Every relay, in each listing order.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    taken_at: Option<Instant>,
    by_price: Vec<Arc<Entry>>,
    by_reputation: Vec<Arc<Entry>>,
    by_value: Vec<Arc<Entry>>,
}

impl Snapshot {
    fn new(taken_at: Instant, entries: Vec<Arc<Entry>>) -> Snapshot {
        let sorted = |sort: SortBy| {
            let mut list = entries.clone();
            list.sort_by(|a, b| a.order(b, sort));
            list
        };
        Snapshot {
            taken_at: Some(taken_at),
            by_price: sorted(SortBy::Price),
            by_reputation: sorted(SortBy::Reputation),
            by_value: sorted(SortBy::Value),
        }
    }

    /// The relays in `sort`'s order.
    pub(crate) fn ordered(&self, sort: SortBy) -> &[Arc<Entry>] {
        match sort {
            SortBy::Price => &self.by_price,
            SortBy::Reputation => &self.by_reputation,
            SortBy::Value => &self.by_value,
        }
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.taken_at.is_some_and(|at| now.duration_since(at) < SNAPSHOT_MAX_AGE)
    }

    /// A copy with `entry` in place of the relay's older entry, if any.
    fn with(&self, entry: Arc<Entry>) -> Snapshot {
        let place = |list: &[Arc<Entry>], sort: SortBy| {
            let mut list: Vec<Arc<Entry>> =
                list.iter().filter(|e| e.key != entry.key).cloned().collect();
            let at = list.partition_point(|e| e.order(&entry, sort) == Ordering::Less);
            list.insert(at, Arc::clone(&entry));
            list
        };
        Snapshot {
            taken_at: self.taken_at,
            by_price: place(&self.by_price, SortBy::Price),
            by_reputation: place(&self.by_reputation, SortBy::Reputation),
            by_value: place(&self.by_value, SortBy::Value),
        }
    }
}

/// The shared, swappable snapshot.
#[derive(Debug, Default)]
pub(crate) struct Market {
    current: RwLock<Arc<Snapshot>>,
    reloading: tokio::sync::Mutex<()>,
}

impl Market {
    fn get(&self) -> Arc<Snapshot> {
        // A poisoned lock held a complete Arc all along: use it.
        Arc::clone(&self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// A snapshot no older than [`SNAPSHOT_MAX_AGE`], or the previous one
    /// while another request reloads it.
    pub(crate) async fn snapshot(&self, pool: &PgPool) -> Result<Arc<Snapshot>, ApiError> {
        let snapshot = self.get();
        if snapshot.is_fresh(Instant::now()) {
            return Ok(snapshot);
        }
        let _reloading = match self.reloading.try_lock() {
            Ok(guard) => guard,
            Err(_) if snapshot.taken_at.is_some() => return Ok(snapshot),
            // Nothing to serve yet: wait for the first load.
            Err(_) => self.reloading.lock().await,
        };
        let snapshot = self.get();
        if snapshot.is_fresh(Instant::now()) {
            return Ok(snapshot);
        }
        let started = Instant::now();
        let loaded = crate::relays::load_all(pool).await?;
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Writes this instance made while the query ran are newer than what
        // it read: keep them.
        let mut entries: HashMap<[u8; 32], Arc<Entry>> =
            loaded.into_iter().map(|entry| (entry.key, Arc::new(entry))).collect();
        for mine in current.ordered(SortBy::Price) {
            match entries.get(&mine.key) {
                Some(read) if read.version >= mine.version => {}
                _ => {
                    entries.insert(mine.key, Arc::clone(mine));
                }
            }
        }
        *current = Arc::new(Snapshot::new(started, entries.into_values().collect()));
        Ok(Arc::clone(&current))
    }

    /// Puts this instance's own write into the snapshot at once.
    pub(crate) fn update(&self, entry: Entry) {
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.taken_at.is_none() {
            return; // The first load will read it.
        }
        let newer_known = current
            .ordered(SortBy::Price)
            .iter()
            .any(|e| e.key == entry.key && e.version > entry.version);
        if !newer_known {
            *current = Arc::new(current.with(Arc::new(entry)));
        }
    }
}
