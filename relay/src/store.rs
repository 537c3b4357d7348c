//! The durable voucher store: every accepted voucher is appended to a log
//! file, synced to disk in group commits, and held in memory as the newest
//! voucher of its channel.
//!
//! A voucher counts once it is verified ([`VoucherStore::submit`]); it does
//! not wait for the disk. One writer thread syncs whatever was queued at
//! most every [`SYNC_INTERVAL`] (and at once when [`VoucherStore::sync`]
//! asks, before a settlement round), writing every queued voucher and
//! calling `fdatasync` once. Vouchers are cumulative, so a crash loses only
//! each channel's increment since its last synced voucher; the meter bounds
//! that increment in bytes ([`crate::meter::MAX_UNSYNCED_BYTES`]). Only the
//! newest voucher of a channel matters, so the log is compacted to one
//! voucher per channel when it is opened.
//!
//! The log is preallocated: zero-filled space is written (and synced) ahead
//! of the records, so an append overwrites bytes already on disk and its
//! `fdatasync` flushes data alone, with no file-size metadata to journal.
//! That halves the sync on the machines we measured. Each record carries a
//! checksum, so zeros and a torn record mark the end of the log.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::{Amount, ChannelId, SIGNED_VOUCHER_LEN, SignedVoucher};
use tokio::sync::{mpsc, oneshot};

/// The most appends waiting for the writer; senders wait when it is full.
pub const STORE_QUEUE: usize = 4096;
/// The longest a verified voucher waits for its sync while the disk keeps
/// up: the writer syncs what was queued at most this often (and at once
/// for [`VoucherStore::sync`]), so one sync serves every voucher of the
/// interval.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(2);
/// The most vouchers written by one sync.
const MAX_GROUP: usize = 1024;
/// Bytes of a record: a signed voucher, then the first bytes of its blake3
/// hash.
const RECORD_LEN: usize = SIGNED_VOUCHER_LEN + CHECKSUM_LEN;
const CHECKSUM_LEN: usize = 8;
/// The log grows by this much zero-filled space at a time (8,192 records).
const PREALLOCATE_BYTES: u64 = 1 << 20;

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

/// A voucher to write, or (none) a barrier: answered once everything
/// queued before it is synced.
type Append = (Option<SignedVoucher>, oneshot::Sender<Result<(), String>>);

/// Vouchers of one channel kept in memory, oldest first: the newest, and
/// while its client pays ahead, the few before it, so that a settlement
/// can take the newest one the relay has earned
/// ([`VoucherStore::to_settle`]).
type Recent = VecDeque<SignedVoucher>;

/// The most vouchers kept in memory per channel. A client paying ahead
/// sends one per half its prepayment, so about three are ahead of what the
/// relay carried.
const RECENT_VOUCHERS: usize = 8;

/// The log and, in memory, the newest vouchers of each channel.
#[derive(Debug, Clone)]
pub struct VoucherStore {
    latest: Arc<Mutex<HashMap<ChannelId, Recent>>>,
    queue: mpsc::Sender<Append>,
    path: PathBuf,
}

impl VoucherStore {
    /// Opens (or creates) the log at `path`, recovers its vouchers, compacts
    /// it, and starts the writer thread.
    pub fn open(path: &Path) -> Result<VoucherStore, StoreError> {
        let io = |source| StoreError::Io { path: path.to_owned(), source };
        let mut latest: HashMap<ChannelId, Recent> = HashMap::new();
        match File::open(path) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(io)?;
                // The first record that fails its checksum is preallocated
                // zeros or a record torn by a crash mid-append (before its
                // sync, so never acknowledged): the log ends there.
                for record in bytes.chunks_exact(RECORD_LEN) {
                    let Some(voucher) = parse_record(record) else { break };
                    remember(&mut latest, voucher, 1);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        let log =
            Log::compact(path, latest.values().filter_map(|recent| recent.back())).map_err(io)?;
        let (queue, appends) = mpsc::channel(STORE_QUEUE);
        std::thread::Builder::new()
            .name("ferry-voucher-log".into())
            .spawn(move || write_loop(log, appends))
            .map_err(io)?;
        let latest = Arc::new(Mutex::new(latest));
        Ok(VoucherStore { latest, queue, path: path.to_owned() })
    }

    /// Takes `voucher`, which the caller has checked: it is the channel's
    /// newest at once (for settlement and for sessions that resume), and it
    /// is queued for the disk, where [`Stored::durable`] says it is synced.
    /// Waits while [`STORE_QUEUE`] appends are queued.
    pub async fn submit(&self, voucher: SignedVoucher) -> Result<Stored, StoreError> {
        let (done, written) = oneshot::channel();
        self.queue.send((Some(voucher), done)).await.map_err(|_| StoreError::Closed)?;
        remember(&mut self.lock(), voucher, RECENT_VOUCHERS);
        Ok(Stored { written, path: self.path.clone() })
    }

    /// Waits until every voucher submitted so far is synced.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.queue.send((None, done)).await.map_err(|_| StoreError::Closed)?;
        Stored { written, path: self.path.clone() }.durable().await
    }

    /// The newest stored voucher of `channel`.
    pub fn latest(&self, channel: &ChannelId) -> Option<SignedVoucher> {
        self.lock().get(channel).and_then(|recent| recent.back()).copied()
    }

    /// The newest stored voucher of every channel.
    pub fn all_latest(&self) -> Vec<SignedVoucher> {
        self.lock().values().filter_map(|recent| recent.back()).copied().collect()
    }

    /// The voucher to settle for each channel: the newest, or for a channel
    /// in `earned`, the newest that pays at most that amount (none if no
    /// such voucher is kept). What is older than the chosen voucher is
    /// forgotten: it will not be settled.
    pub fn to_settle(&self, earned: &HashMap<ChannelId, Amount>) -> Vec<SignedVoucher> {
        let mut latest = self.lock();
        let mut chosen = Vec::with_capacity(latest.len());
        for (channel, recent) in latest.iter_mut() {
            let at_most = earned.get(channel).copied().unwrap_or(Amount::MAX);
            let Some(index) = recent.iter().rposition(|v| v.voucher.cumulative <= at_most) else {
                continue;
            };
            recent.drain(..index);
            chosen.extend(recent.front().copied());
        }
        chosen
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, Recent>> {
        // The map is updated in one insert; a panic elsewhere cannot leave
        // it half-written.
        self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A voucher queued for the disk.
#[derive(Debug)]
pub struct Stored {
    written: oneshot::Receiver<Result<(), String>>,
    path: PathBuf,
}

impl Stored {
    /// A voucher that names the amount of one already queued under an older
    /// sequence: the ledger settles that one for the same money, so nothing
    /// is written, and it is durable once the vouchers queued before it are
    /// (acknowledgements wait for them in order). Without this a client
    /// could grow the log, and its syncs, without paying anything.
    pub fn nothing_new() -> Stored {
        let (done, written) = oneshot::channel();
        let _ = done.send(Ok(()));
        Stored { written, path: PathBuf::new() }
    }

    /// Waits until the voucher is synced to disk (or the write failed).
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => {
                Err(StoreError::Io { path: self.path, source: std::io::Error::other(message) })
            }
            Err(_) => Err(StoreError::Closed),
        }
    }
}

/// Keeps `voucher` as its channel's newest if it is newer (by sequence)
/// than the newest kept, with at most `keep` vouchers per channel.
fn remember(latest: &mut HashMap<ChannelId, Recent>, voucher: SignedVoucher, keep: usize) {
    let recent = latest.entry(voucher.voucher.channel).or_default();
    if recent.back().is_none_or(|newest| newest.voucher.sequence < voucher.voucher.sequence) {
        recent.push_back(voucher);
        while recent.len() > keep {
            recent.pop_front();
        }
    }
}

fn record(voucher: &SignedVoucher) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    let (body, checksum) = record.split_at_mut(SIGNED_VOUCHER_LEN);
    body.copy_from_slice(&voucher.encode());
    checksum.copy_from_slice(&blake3::hash(body).as_bytes()[..CHECKSUM_LEN]);
    record
}

fn parse_record(record: &[u8]) -> Option<SignedVoucher> {
    let (body, checksum) = record.split_at_checked(SIGNED_VOUCHER_LEN)?;
    if blake3::hash(body).as_bytes()[..CHECKSUM_LEN] != *checksum {
        return None;
    }
    SignedVoucher::decode(body).ok()
}

/// The open log: records up to `written`, zeros up to `allocated`.
struct Log {
    file: File,
    written: u64,
    allocated: u64,
}

impl Log {
    /// Rewrites the log with `vouchers` (one per channel): to a temporary
    /// file, preallocated and synced, then renamed over the log, so a crash
    /// leaves one or the other.
    fn compact<'a>(
        path: &Path,
        vouchers: impl Iterator<Item = &'a SignedVoucher>,
    ) -> std::io::Result<Log> {
        let temporary = path.with_extension("compacting");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)?;
        let records: Vec<u8> = vouchers.flat_map(record).collect();
        let mut log = Log { file, written: 0, allocated: 0 };
        log.append(&records)?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(log)
    }

    /// Writes `records` after the last and syncs them. Only when the
    /// preallocated space runs out does the file grow, by whole
    /// [`PREALLOCATE_BYTES`], and that sync includes the new size.
    fn append(&mut self, records: &[u8]) -> std::io::Result<()> {
        let end = self.written + records.len() as u64;
        let grow = end > self.allocated || self.allocated == 0;
        if grow {
            let allocated = end.div_ceil(PREALLOCATE_BYTES).max(1) * PREALLOCATE_BYTES;
            let zeros = vec![0u8; usize::try_from(allocated - self.allocated).unwrap_or(0)];
            self.file.write_all_at(&zeros, self.allocated)?;
            self.allocated = allocated;
        }
        self.file.write_all_at(records, self.written)?;
        if grow {
            self.file.sync_all()?
        } else {
            self.file.sync_data()?
        }
        self.written = end;
        Ok(())
    }
}

/// The writer: a thread of its own, so that a sync costs the vouchers
/// waiting for it one thread wake-up rather than a trip through the
/// runtime's blocking pool. It ends when every handle to the store is gone.
fn write_loop(mut log: Log, mut appends: mpsc::Receiver<Append>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut last_sync = Instant::now();
    while let Some(first) = appends.blocking_recv() {
        // A barrier is synced at once; vouchers gather for the interval.
        if first.0.is_some() {
            std::thread::sleep(SYNC_INTERVAL.saturating_sub(last_sync.elapsed()));
        }
        group.push(first);
        while group.len() < MAX_GROUP
            && let Ok(next) = appends.try_recv()
        {
            group.push(next);
        }
        let records: Vec<u8> =
            group.iter().filter_map(|(voucher, _)| voucher.as_ref()).flat_map(record).collect();
        // Everything queued before a lone barrier was synced already.
        let written = if records.is_empty() {
            Ok(())
        } else {
            last_sync = Instant::now();
            log.append(&records).map_err(|error| error.to_string())
        };
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

    /// A directory of its own for a test's log, and the log's path in it
    /// (no log there yet).
    fn fresh_log(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vouchers.log");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    #[test]
    fn a_damaged_record_ends_the_log() {
        let good = record(&voucher(1, 7));
        assert_eq!(parse_record(&good), Some(voucher(1, 7)));
        assert_eq!(parse_record(&[0u8; RECORD_LEN]), None, "preallocated zeros");
        for index in [0, SIGNED_VOUCHER_LEN - 1, RECORD_LEN - 1] {
            let mut damaged = good;
            damaged[index] ^= 1;
            assert_eq!(parse_record(&damaged), None, "a flipped bit at {index}");
        }
    }

    #[tokio::test]
    async fn a_voucher_is_the_newest_at_once_and_sync_waits_for_the_disk() {
        let (dir, path) = fresh_log("ferry-store-sync");
        let store = VoucherStore::open(&path).unwrap();
        store.sync().await.unwrap();
        let channel = ChannelId::from_bytes([1; 32]);
        let stored = store.submit(voucher(1, 5)).await.unwrap();
        assert_eq!(store.latest(&channel), Some(voucher(1, 5)), "counted before its sync");
        store.submit(voucher(1, 4)).await.unwrap();
        assert_eq!(store.latest(&channel), Some(voucher(1, 5)), "an older one is not the newest");
        store.sync().await.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(parse_record(&bytes[..RECORD_LEN]), Some(voucher(1, 5)), "on disk after sync");
        assert_eq!(parse_record(&bytes[RECORD_LEN..2 * RECORD_LEN]), Some(voucher(1, 4)));
        stored.durable().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_settlement_takes_the_newest_earned_voucher_and_forgets_older_ones() {
        let (dir, path) = fresh_log("ferry-store-settle");
        let store = VoucherStore::open(&path).unwrap();
        // Channel 1 pays ahead: sequences 1..=10 pay 1,000 each up to 10,000.
        for sequence in 1..=10 {
            store.submit(voucher(1, sequence)).await.unwrap();
        }
        store.submit(voucher(2, 3)).await.unwrap();
        let (one, two) = (ChannelId::from_bytes([1; 32]), ChannelId::from_bytes([2; 32]));
        let sequences = |chosen: Vec<SignedVoucher>| {
            let mut found: Vec<_> =
                chosen.iter().map(|v| (v.voucher.channel, v.voucher.sequence)).collect();
            found.sort_unstable_by_key(|(channel, _)| *channel);
            found
        };
        // Earned 6,500 on channel 1: sequence 6 (6,000); channel 2's newest.
        let earned = HashMap::from([(one, Amount::from_attos(6_500).unwrap())]);
        assert_eq!(sequences(store.to_settle(&earned)), [(one, 6), (two, 3)]);
        // Only the last RECENT_VOUCHERS are kept: below them, nothing.
        let earned = HashMap::from([(one, Amount::from_attos(2_000).unwrap())]);
        assert_eq!(sequences(store.to_settle(&earned)), [(two, 3)]);
        // Without a limit the newest, and only it is kept from then on.
        assert_eq!(sequences(store.to_settle(&HashMap::new())), [(one, 10), (two, 3)]);
        let earned = HashMap::from([(one, Amount::from_attos(9_500).unwrap())]);
        assert_eq!(sequences(store.to_settle(&earned)), [(two, 3)], "older ones were forgotten");
        assert_eq!(store.latest(&one), Some(voucher(1, 10)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn vouchers_survive_a_reopen_and_the_log_is_compacted() {
        let (dir, path) = fresh_log("ferry-store");
        let store = VoucherStore::open(&path).unwrap();
        let appends: Vec<_> = (1..=50)
            .map(|sequence| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.submit(voucher(sequence as u8 % 3, sequence)).await?.durable().await
                })
            })
            .collect();
        for append in appends {
            append.await.unwrap().unwrap();
        }
        assert_eq!(store.latest(&ChannelId::from_bytes([0; 32])).unwrap().voucher.sequence, 48);
        drop(store);
        // A torn record after the last, as a crash mid-append leaves.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&record(&voucher(0, 99))[..50], 50 * RECORD_LEN as u64).unwrap();
        drop(file);

        let reopened = VoucherStore::open(&path).unwrap();
        let mut sequences: Vec<u64> =
            reopened.all_latest().iter().map(|v| v.voucher.sequence).collect();
        sequences.sort_unstable();
        assert_eq!(sequences, [48, 49, 50]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, PREALLOCATE_BYTES, "compacted into fresh zeros");
        assert!(bytes[3 * RECORD_LEN..].iter().all(|&byte| byte == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
