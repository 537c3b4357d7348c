//! The durable voucher store: every accepted voucher is appended to a log
//! file and synced to disk before it counts, so a relay killed at any moment
//! still holds (and settles) every voucher it acknowledged.
//!
//! Appends are group-committed: one writer task takes every voucher queued
//! while the previous sync ran, writes them together and syncs once, then
//! acknowledges each. Only the newest voucher of a channel matters (amounts
//! are cumulative), so the log is compacted to one voucher per channel when
//! it is opened.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_proto::{ChannelId, SIGNED_VOUCHER_LEN, SignedVoucher};
use tokio::sync::{mpsc, oneshot};

/// The most appends waiting for the writer; senders wait when it is full.
pub const STORE_QUEUE: usize = 4096;
/// The most vouchers written by one sync.
const MAX_GROUP: usize = 1024;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading, writing or syncing the log failed.
    #[error("voucher log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The writer has stopped (the relay is shutting down).
    #[error("the voucher store is closed")]
    Closed,
}

type Append = (SignedVoucher, oneshot::Sender<Result<(), String>>);

/// The log and, in memory, the newest voucher of each channel.
#[derive(Debug, Clone)]
pub struct VoucherStore {
    latest: Arc<Mutex<HashMap<ChannelId, SignedVoucher>>>,
    queue: mpsc::Sender<Append>,
    path: PathBuf,
}

impl VoucherStore {
    /// Opens (or creates) the log at `path`, recovers its vouchers, compacts
    /// it, and starts the writer task.
    pub fn open(path: &Path) -> Result<VoucherStore, StoreError> {
        let io = |source| StoreError::Io { path: path.to_owned(), source };
        let mut latest: HashMap<ChannelId, SignedVoucher> = HashMap::new();
        match File::open(path) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(io)?;
                // A torn last record (a crash mid-append, before its sync,
                // so never acknowledged) is shorter than a record: dropped.
                for record in bytes.chunks_exact(SIGNED_VOUCHER_LEN) {
                    if let Ok(voucher) = SignedVoucher::decode(record) {
                        let newer = latest
                            .get(&voucher.voucher.channel)
                            .is_none_or(|known| known.voucher.sequence < voucher.voucher.sequence);
                        if newer {
                            latest.insert(voucher.voucher.channel, voucher);
                        }
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        compact(path, &latest).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let (queue, appends) = mpsc::channel(STORE_QUEUE);
        let latest = Arc::new(Mutex::new(latest));
        tokio::spawn(write_loop(file, appends, Arc::clone(&latest)));
        Ok(VoucherStore { latest, queue, path: path.to_owned() })
    }

    /// Appends `voucher` and returns once it is on disk. The caller has
    /// checked it; from now on it counts.
    pub async fn append(&self, voucher: SignedVoucher) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.queue.send((voucher, done)).await.map_err(|_| StoreError::Closed)?;
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(message),
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// The newest stored voucher of `channel`.
    pub fn latest(&self, channel: &ChannelId) -> Option<SignedVoucher> {
        self.lock().get(channel).copied()
    }

    /// The newest stored voucher of every channel.
    pub fn all_latest(&self) -> Vec<SignedVoucher> {
        self.lock().values().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, SignedVoucher>> {
        // The map is updated in one insert; a panic elsewhere cannot leave
        // it half-written.
        self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Rewrites the log with one voucher per channel: to a temporary file,
/// synced, then renamed over the log, so a crash leaves one or the other.
fn compact(path: &Path, latest: &HashMap<ChannelId, SignedVoucher>) -> std::io::Result<()> {
    let temporary = path.with_extension("compacting");
    let mut file = File::create(&temporary)?;
    for voucher in latest.values() {
        file.write_all(&voucher.encode())?;
    }
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

async fn write_loop(
    file: File,
    mut appends: mpsc::Receiver<Append>,
    latest: Arc<Mutex<HashMap<ChannelId, SignedVoucher>>>,
) {
    let file = Arc::new(Mutex::new(file));
    let mut group = Vec::with_capacity(MAX_GROUP);
    while appends.recv_many(&mut group, MAX_GROUP).await > 0 {
        let bytes: Vec<u8> = group.iter().flat_map(|(voucher, _)| voucher.encode()).collect();
        let file = Arc::clone(&file);
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.write_all(&bytes)?;
            file.sync_data()
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|result| result.map_err(|error| error.to_string()));
        if written.is_ok() {
            let mut latest = latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (voucher, _) in &group {
                let newer = latest
                    .get(&voucher.voucher.channel)
                    .is_none_or(|known| known.voucher.sequence < voucher.voucher.sequence);
                if newer {
                    latest.insert(voucher.voucher.channel, *voucher);
                }
            }
        }
        for (_, done) in group.drain(..) {
            let _ = done.send(written.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::{Amount, SecretKey, Voucher};

    fn voucher(channel: u8, sequence: u64) -> SignedVoucher {
        Voucher {
            channel: ChannelId::from_bytes([channel; 32]),
            sequence,
            cumulative: Amount::from_attos(u128::from(sequence) * 1000).unwrap(),
        }
        .sign(&SecretKey::from_seed(&[1; 32]))
    }

    #[tokio::test]
    async fn vouchers_survive_a_reopen_and_the_log_is_compacted() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vouchers.log");
        let _ = std::fs::remove_file(&path);
        let store = VoucherStore::open(&path).unwrap();
        let appends: Vec<_> = (1..=50)
            .map(|sequence| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.append(voucher(sequence as u8 % 3, sequence)).await },
                )
            })
            .collect();
        for append in appends {
            append.await.unwrap().unwrap();
        }
        assert_eq!(store.latest(&ChannelId::from_bytes([0; 32])).unwrap().voucher.sequence, 48);
        drop(store);
        // A torn record at the end, as a crash mid-append leaves.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&voucher(0, 99).encode()[..50]).unwrap();
        drop(file);

        let reopened = VoucherStore::open(&path).unwrap();
        let mut sequences: Vec<u64> =
            reopened.all_latest().iter().map(|v| v.voucher.sequence).collect();
        sequences.sort_unstable();
        assert_eq!(sequences, [48, 49, 50]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * SIGNED_VOUCHER_LEN as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
