//! The relay's data directory: its voucher log and its debt book, locked so
//! that only one relay process uses them at a time. A second relay on the
//! same directory would rewrite the log under the first (it is compacted on
//! open) and lose vouchers the first acknowledged.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::debts::{DebtBook, DebtBookError};
use crate::store::{StoreError, VoucherStore};

/// The lock file's name; the lock is an advisory `flock` held while the
/// relay runs, released by the kernel when the process ends, however.
const LOCK_FILE: &str = "lock";

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Creating or locking the directory failed.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process holds the directory.
    #[error(
        "data directory {0} is in use by another relay; stop it, or give this one its own --data-dir"
    )]
    Locked(PathBuf),
    /// The voucher log could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The debt book could not be read.
    #[error(transparent)]
    Debts(#[from] DebtBookError),
}

/// An open, locked data directory.
#[derive(Debug)]
pub struct DataDir {
    pub(crate) store: VoucherStore,
    pub(crate) debts: DebtBook,
    /// Holds the lock while the relay runs.
    pub(crate) lock: File,
}

impl DataDir {
    /// Creates (if needed) and locks `path`, then opens its voucher log and
    /// debt book.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let io = |source| DataDirError::Io { path: path.to_owned(), source };
        std::fs::create_dir_all(path).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked(path.to_owned()));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
        }
        let store = VoucherStore::open(&path.join("vouchers.log"))?;
        let debts = DebtBook::open(&path.join("debts"))?;
        Ok(DataDir { store, debts, lock })
    }

    /// The voucher log.
    pub fn store(&self) -> &VoucherStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let error = DataDir::open(dir.path()).unwrap_err();
        assert!(matches!(error, DataDirError::Locked(_)), "{error}");
        assert!(error.to_string().contains("--data-dir"), "the error names the way out");
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }
}
