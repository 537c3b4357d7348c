//! The debt book: one [`Meter`] per client key that has a session or owes
//! the relay bytes, so the credit window is per key across every session,
//! tunnel and channel of the key, and survives restarts.
//!
//! What each key owes is written to `debts` in the data directory every
//! [`DEBT_SNAPSHOT_INTERVAL`] (when it changed) and at shutdown, atomically
//! (a new file, synced, renamed over the old one). A graceful restart
//! re-grants nothing. A crash forgets what keys ran up since the last
//! snapshot: at most one credit window per key, since no key ever owes more.
//!
//! The file: the magic `FERRYDB1`, a u64 count (little-endian), `count`
//! records of a 32-byte client key and a u64 debt in bytes, then the blake3
//! hash of everything before it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::PublicKey;

use crate::meter::{Binding, Meter};
use crate::server::lock;

/// How often what keys owe is written to disk when it changed.
pub const DEBT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);
const MAGIC: &[u8; 8] = b"FERRYDB1";
const RECORD_LEN: usize = 32 + 8;
const HASH_LEN: usize = 32;

/// Why the debt book could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DebtBookError {
    /// Reading or writing the file failed.
    #[error("debt book {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a debt book this relay wrote whole.
    #[error(
        "debt book {path} is damaged ({why}); move it away to start (the keys it lists may then be carried one more credit window unpaid)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// A key's place in the book.
#[derive(Debug)]
enum Entry {
    /// A meter, held by the key's session (or kept while it owes).
    Live(Arc<Meter>),
    /// A debt recovered from disk, for a key with no session yet.
    Owed(u64),
}

/// Every client key the relay carries for or is owed by.
#[derive(Debug)]
pub(crate) struct DebtBook {
    path: PathBuf,
    entries: Mutex<HashMap<PublicKey, Entry>>,
    /// The debts last written, to skip writes that change nothing.
    written: Mutex<Vec<(PublicKey, u64)>>,
}

/// The book has no room for another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BookFull;

impl DebtBook {
    /// Opens the book at `path` (empty when there is no file yet).
    pub(crate) fn open(path: &Path) -> Result<DebtBook, DebtBookError> {
        let debts = match std::fs::read(path) {
            Ok(bytes) => parse(&bytes)
                .map_err(|why| DebtBookError::Damaged { path: path.to_owned(), why })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(DebtBookError::Io { path: path.to_owned(), source }),
        };
        let entries = debts.iter().map(|&(key, debt)| (key, Entry::Owed(debt))).collect();
        Ok(DebtBook {
            path: path.to_owned(),
            entries: Mutex::new(entries),
            written: Mutex::new(debts),
        })
    }

    /// The meter of `client`'s new session on `binding`: the key's own
    /// meter if it has one (rebound, its debt kept), else a new one that
    /// starts from the key's recorded debt. The book holds at most
    /// `max_keys` keys.
    pub(crate) fn meter(
        &self,
        client: PublicKey,
        credit_window_bytes: u64,
        binding: Binding,
        max_keys: usize,
    ) -> Result<Arc<Meter>, BookFull> {
        let mut entries = lock(&self.entries);
        if !entries.contains_key(&client) && entries.len() >= max_keys {
            forget_settled(&mut entries);
            if entries.len() >= max_keys {
                return Err(BookFull);
            }
        }
        let meter = match entries.remove(&client) {
            Some(Entry::Live(meter)) => {
                meter.rebind(binding);
                meter
            }
            Some(Entry::Owed(debt)) => {
                Arc::new(Meter::new(client, credit_window_bytes, binding, debt))
            }
            None => Arc::new(Meter::new(client, credit_window_bytes, binding, 0)),
        };
        entries.insert(client, Entry::Live(Arc::clone(&meter)));
        Ok(meter)
    }

    /// What `client` owes now, in bytes.
    pub(crate) fn owed(&self, client: &PublicKey) -> u64 {
        match lock(&self.entries).get(client) {
            Some(Entry::Live(meter)) => meter.unpaid_bytes(),
            Some(Entry::Owed(debt)) => *debt,
            None => 0,
        }
    }

    /// Every key that owes something, and how much, in key order.
    fn debts(&self) -> Vec<(PublicKey, u64)> {
        let mut entries = lock(&self.entries);
        forget_settled(&mut entries);
        let mut debts: Vec<(PublicKey, u64)> = entries
            .iter()
            .map(|(key, entry)| match entry {
                Entry::Live(meter) => (*key, meter.unpaid_bytes()),
                Entry::Owed(debt) => (*key, *debt),
            })
            .filter(|(_, debt)| *debt > 0)
            .collect();
        debts.sort_unstable_by_key(|(key, _)| *key.as_bytes());
        debts
    }

    /// Writes the debts if they changed since the last write.
    pub(crate) fn snapshot(&self) -> Result<(), DebtBookError> {
        let debts = self.debts();
        let mut written = lock(&self.written);
        if *written == debts {
            return Ok(());
        }
        write(&self.path, &debts)
            .map_err(|source| DebtBookError::Io { path: self.path.clone(), source })?;
        *written = debts;
        Ok(())
    }
}

/// Drops the meters no session holds and nothing is owed on, and the
/// recovered debts that were paid off: only keys that owe, or are being
/// carried, take room.
fn forget_settled(entries: &mut HashMap<PublicKey, Entry>) {
    entries.retain(|_, entry| match entry {
        Entry::Live(meter) => Arc::strong_count(meter) > 1 || meter.unpaid_bytes() > 0,
        Entry::Owed(debt) => *debt > 0,
    });
}

/// Writes the book until the relay shuts down, every
/// [`DEBT_SNAPSHOT_INTERVAL`]; a failed write is retried on the next tick.
pub(crate) async fn run(book: Arc<DebtBook>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut timer = tokio::time::interval(DEBT_SNAPSHOT_INTERVAL);
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = shutdown.changed() => return,
        }
        let book = Arc::clone(&book);
        match tokio::task::spawn_blocking(move || book.snapshot()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot write the debt book"),
            Err(error) => tracing::error!(%error, "the debt book writer failed"),
        }
    }
}

fn parse(bytes: &[u8]) -> Result<Vec<(PublicKey, u64)>, &'static str> {
    let body_len = bytes.len().checked_sub(HASH_LEN).ok_or("too short")?;
    let (body, hash) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != hash {
        return Err("checksum mismatch");
    }
    let records = body.strip_prefix(MAGIC.as_slice()).ok_or("not a debt book")?;
    let (count, records) = records.split_first_chunk::<8>().ok_or("too short")?;
    let count = usize::try_from(u64::from_le_bytes(*count)).map_err(|_| "bad count")?;
    if records.len() != count.checked_mul(RECORD_LEN).ok_or("bad count")? {
        return Err("length does not match the count");
    }
    records
        .chunks_exact(RECORD_LEN)
        .map(|record| {
            let (key, debt) = record.split_at(32);
            let key: [u8; 32] = key.try_into().map_err(|_| "bad record")?;
            let key = PublicKey::from_bytes(&key).map_err(|_| "a key is not valid")?;
            let debt: [u8; 8] = debt.try_into().map_err(|_| "bad record")?;
            Ok((key, u64::from_le_bytes(debt)))
        })
        .collect()
}

fn write(path: &Path, debts: &[(PublicKey, u64)]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + debts.len() * RECORD_LEN + HASH_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(debts.len() as u64).to_le_bytes());
    for (key, debt) in debts {
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&debt.to_le_bytes());
    }
    let hash = blake3::hash(&bytes);
    bytes.extend_from_slice(hash.as_bytes());
    let fresh = path.with_extension("new");
    let mut file = std::fs::File::create(&fresh)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&fresh, path)?;
    // The rename is durable once the directory is synced.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::{Amount, ChannelId, PricePerByte, SecretKey};

    fn binding() -> Binding {
        Binding {
            channel: ChannelId::from_bytes([1; 32]),
            price: PricePerByte::from_attos(10).unwrap(),
            paid: Amount::ZERO,
            sequence: 0,
            deposited: Amount::from_attos(1 << 60).unwrap(),
        }
    }

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    #[test]
    fn debts_survive_a_restart_and_only_debtors_take_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("debts");
        let book = DebtBook::open(&path).unwrap();
        let owing = book.meter(key(1), 1000, binding(), 2).unwrap();
        assert_eq!(owing.reserve(700), 700);
        owing.commit(700, 700);
        let paying = book.meter(key(2), 1000, binding(), 2).unwrap();
        assert!(
            matches!(book.meter(key(3), 1000, binding(), 2), Err(BookFull)),
            "two sessions fill it"
        );
        drop(paying);
        let third = book.meter(key(3), 1000, binding(), 2).unwrap();
        drop((owing, third));
        book.snapshot().unwrap();

        let reopened = DebtBook::open(&path).unwrap();
        assert_eq!(reopened.owed(&key(1)), 700);
        assert_eq!(reopened.owed(&key(2)), 0);
        let meter = reopened.meter(key(1), 1000, binding(), 2).unwrap();
        assert_eq!(meter.reserve(1000), 300, "the restart granted no fresh window");
    }

    #[test]
    fn a_damaged_book_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("debts");
        let book = DebtBook::open(&path).unwrap();
        let meter = book.meter(key(1), 1000, binding(), 10).unwrap();
        meter.reserve(10);
        book.snapshot().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), MAGIC.len() + 8 + RECORD_LEN + HASH_LEN);
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = DebtBook::open(&path).unwrap_err().to_string();
        assert!(error.contains("checksum mismatch") && error.contains("move it away"), "{error}");
        std::fs::write(&path, b"short").unwrap();
        assert!(DebtBook::open(&path).is_err());
    }
}
