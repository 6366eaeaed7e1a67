//! The RocksDB engine: core's `Engine` over one RocksDB database.
//!
//! - `write` appends a batch to the WAL without syncing;
//! - `sync` syncs the WAL (`FlushWAL(sync = true)`), making every earlier
//!   write durable; the flusher calls it once for many writers (group commit);
//! - after a crash RocksDB recovers the WAL to a consistent point in time,
//!   which is the prefix durability the engine contract asks for;
//! - scans run on an iterator, which reads one consistent snapshot.

use std::path::Path;

use armada_core::engine::{BatchOp, Engine, EngineError, Pair, WriteBatch};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteOptions, DB};

fn backend(e: rocksdb::Error) -> EngineError {
    EngineError::Backend(e.into_string())
}

pub struct RocksEngine {
    db: DB,
}

impl RocksEngine {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Durability comes from syncing the WAL, so it must never be skipped.
        opts.set_manual_wal_flush(false);
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        let db = DB::open(&opts, dir).map_err(backend)?;
        Ok(Self { db })
    }

    fn bounded(start: &[u8], end: &[u8]) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        ro
    }
}

/// Above this many bytes in SST files, a range's size is RocksDB's estimate
/// instead of an exact count (which reads the whole range).
const EXACT_SIZE_BYTES_MAX: u64 = 8 << 20;

impl Engine for RocksEngine {
    /// Exact (keys plus values, including data not yet flushed from the
    /// memtable) for ranges up to 8 MiB on disk; RocksDB's SST estimate
    /// for larger ones, where a count would read too much.
    fn approximate_size(&self, start: &[u8], end: &[u8]) -> Result<u64, EngineError> {
        if start >= end {
            return Ok(0);
        }
        let on_disk = self.db.get_approximate_sizes(&[rocksdb::Range::new(start, end)]).first().copied().unwrap_or(0);
        if on_disk > EXACT_SIZE_BYTES_MAX {
            return Ok(on_disk);
        }
        armada_core::engine::exact_size(self, start, end)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.db.get(key).map_err(backend)
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        if start >= end {
            return Ok(());
        }
        let it = self.db.iterator_opt(IteratorMode::From(start, Direction::Forward), Self::bounded(start, end));
        for item in it {
            let (k, v) = item.map_err(backend)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<Pair>, EngineError> {
        if start >= end {
            return Ok(None);
        }
        let mut it = self.db.iterator_opt(IteratorMode::End, Self::bounded(start, end));
        match it.next() {
            Some(item) => {
                let (k, v) = item.map_err(backend)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut b = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                BatchOp::Put { key, value } => b.put(key, value),
                BatchOp::Delete { key } => b.delete(key),
                BatchOp::DeleteRange { start, end } => {
                    if start < end {
                        b.delete_range(start, end)
                    }
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(b, &wo).map_err(backend)
    }

    fn sync(&self) -> Result<(), EngineError> {
        self.db.flush_wal(true).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use armada_core::engine::conformance;

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("armada-rocks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rocks_engine_conforms() {
        let mut n = 0;
        conformance::run_all(&mut || {
            n += 1;
            Box::new(RocksEngine::open(&tempdir(&format!("conf{n}"))).expect("open"))
        });
    }

    #[test]
    fn synced_writes_survive_reopen() {
        let dir = tempdir("reopen");
        {
            let e = RocksEngine::open(&dir).unwrap();
            let mut b = WriteBatch::new();
            b.put(b"k".to_vec(), b"v".to_vec());
            e.write(b).unwrap();
            e.sync().unwrap();
        }
        let e = RocksEngine::open(&dir).unwrap();
        assert_eq!(e.get(b"k").unwrap(), Some(b"v".to_vec()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
