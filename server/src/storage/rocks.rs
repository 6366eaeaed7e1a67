//! The RocksDB engine: core's `Engine` over one RocksDB database.
//!
//! - `write` appends a batch to the WAL without syncing;
//! - `sync` syncs the WAL (`FlushWAL(sync = true)`), making every earlier
//!   write durable; the flusher calls it once for many writers (group commit);
//! - after a crash RocksDB recovers the WAL to a consistent point in time,
//!   which is the prefix durability the engine contract asks for (retired
//!   WAL files are recycled, which makes each sync one I/O; a test crashes
//!   a child process across many recycled WALs and checks every synced
//!   write);
//! - scans run on an iterator, which reads one consistent snapshot;
//! - a view ([`Engine::view`]) is a RocksDB snapshot, held by a thread of
//!   its own for as long as the view lives (RocksDB keeps the versions it
//!   needs; memory does not grow with the data).

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use armada_core::engine::{BatchOp, Engine, EngineError, EngineView, Pair, WriteBatch};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteOptions, DB};

fn backend(e: rocksdb::Error) -> EngineError {
    EngineError::Backend(e.into_string())
}

pub struct RocksEngine {
    db: Arc<DB>,
}

impl RocksEngine {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        Self::open_with(dir, None)
    }

    /// [`RocksEngine::open`] with another memtable size (tests use a tiny
    /// one to roll the WAL over quickly).
    fn open_with(dir: &Path, write_buffer_bytes: Option<usize>) -> Result<Self, EngineError> {
        let mut opts = Options::default();
        if let Some(bytes) = write_buffer_bytes {
            opts.set_write_buffer_size(bytes);
        }
        opts.create_if_missing(true);
        // Durability comes from syncing the WAL, so it must never be skipped.
        opts.set_manual_wal_flush(false);
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Every put reads the key's latest version and the table's revision
        // first, and a profile of puts spent an eighth of their CPU in
        // lookups that searched SST indexes: bloom filters let a lookup skip
        // files (and the memtable) that do not hold the key, and a block
        // cache keeps the blocks read recently.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
        table.set_block_cache(&rocksdb::Cache::new_hyper_clock_cache(BLOCK_CACHE_BYTES, 0));
        opts.set_block_based_table_factory(&table);
        opts.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
        opts.set_memtable_whole_key_filtering(true);
        // Overwrite retired WAL files instead of appending to new ones: an
        // append that grows a file makes each fdatasync write the file's
        // inode as well as the data (two I/Os per sync on ext4), while an
        // overwrite inside the file's size writes the data alone. RocksDB
        // supports recycling with point-in-time recovery (it tells a
        // recycled file's stale records from new ones by their log number).
        opts.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        let db = DB::open(&opts, dir).map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn bounded(start: &[u8], end: &[u8]) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        ro
    }
}

/// Bloom filter bits per key in SST files (about 1% false positives).
const BLOOM_BITS_PER_KEY: f64 = 10.0;
/// The block cache shared by every table of a node.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Retired WAL files kept to be overwritten by later WALs.
const WAL_FILES_RECYCLED: usize = 4;
/// Share of the memtable's size given to its whole-key bloom filter.
const MEMTABLE_BLOOM_RATIO: f64 = 0.1;

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

    /// A full manual compaction: rewrites every SST file, dropping deleted
    /// and overwritten data.
    fn defragment(&self) -> Result<(), EngineError> {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }

    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
        RocksView::open(self.db.clone(), start, end).map(|v| Arc::new(v) as Arc<dyn EngineView>)
    }
}

type Reply<T> = mpsc::SyncSender<Result<T, EngineError>>;

enum ViewRequest {
    Get(Vec<u8>, Reply<Option<Vec<u8>>>),
    Chunk { start: Vec<u8>, end: Vec<u8>, max_bytes: usize, reply: Reply<Vec<Pair>> },
}

/// A RocksDB snapshot. The rocksdb crate's snapshot borrows the database,
/// so it cannot be stored next to it without `unsafe`; instead a thread
/// owns a handle to the database and the snapshot, and answers reads sent
/// over a channel. Dropping the view ends the thread and releases the
/// snapshot.
struct RocksView {
    start: Vec<u8>,
    end: Vec<u8>,
    requests: Mutex<Option<mpsc::Sender<ViewRequest>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for RocksView {
    /// Closes the channel and waits for the thread, so the snapshot is
    /// released before the view is gone (a thread still releasing it while
    /// the process exits made RocksDB abort: "pthread lock: Invalid
    /// argument").
    fn drop(&mut self) {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl RocksView {
    fn open(db: Arc<DB>, start: &[u8], end: &[u8]) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel::<ViewRequest>();
        let (taken_tx, taken_rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("armada-view".into())
            .spawn(move || {
                let snapshot = db.snapshot();
                // The view is taken before `open` returns: writes after it
                // do not show.
                let _ = taken_tx.send(());
                for request in rx {
                    match request {
                        ViewRequest::Get(key, reply) => {
                            let _ = reply.send(snapshot.get(&key).map_err(backend));
                        }
                        ViewRequest::Chunk { start, end, max_bytes, reply } => {
                            let it = snapshot.iterator_opt(
                                IteratorMode::From(&start, Direction::Forward),
                                RocksEngine::bounded(&start, &end),
                            );
                            let mut pairs: Vec<Pair> = Vec::new();
                            let mut bytes = 0usize;
                            let mut out = Ok(());
                            for item in it {
                                match item {
                                    Ok((k, v)) => {
                                        bytes += k.len() + v.len();
                                        pairs.push((k.into_vec(), v.into_vec()));
                                    }
                                    Err(e) => {
                                        out = Err(backend(e));
                                        break;
                                    }
                                }
                                if bytes >= max_bytes {
                                    break;
                                }
                            }
                            let out = out.map(|()| pairs);
                            let _ = reply.send(out);
                        }
                    }
                }
            })
            .map_err(|e| EngineError::Backend(format!("cannot start a snapshot reader thread: {e}")))?;
        taken_rx.recv().map_err(|_| EngineError::Backend("the snapshot reader thread stopped".into()))?;
        Ok(Self {
            start: start.to_vec(),
            end: end.to_vec(),
            requests: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> ViewRequest) -> Result<T, EngineError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let stopped = || EngineError::Backend("the snapshot reader thread stopped".into());
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(stopped)?
            .send(make(reply))
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| EngineError::Backend("the snapshot reader thread stopped".into()))?
    }
}

impl EngineView for RocksView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if key < self.start.as_slice() || key >= self.end.as_slice() {
            return Ok(None);
        }
        self.ask(|reply| ViewRequest::Get(key.to_vec(), reply))
    }

    fn chunk(&self, start: &[u8], end: &[u8], max_bytes: usize) -> Result<Vec<Pair>, EngineError> {
        let lo = start.max(self.start.as_slice()).to_vec();
        let hi = end.min(self.end.as_slice()).to_vec();
        if lo >= hi {
            return Ok(Vec::new());
        }
        self.ask(|reply| ViewRequest::Chunk { start: lo, end: hi, max_bytes, reply })
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

    /// A child process (this test binary, re-run) writes and syncs enough
    /// to roll a tiny memtable's WAL over many times, so later WALs
    /// overwrite recycled files, reports each synced batch, then aborts
    /// without closing the database. Reopened, the database must hold
    /// every batch the child reported synced.
    #[test]
    fn synced_writes_survive_a_crash_with_recycled_wal_files() {
        const CHILD: &str = "ARMADA_ROCKS_CRASH_CHILD";
        const WRITE_BUFFER: usize = 64 << 10;
        if let Ok(dir) = std::env::var(CHILD) {
            let e = RocksEngine::open_with(Path::new(&dir), Some(WRITE_BUFFER)).unwrap();
            for i in 0u32..4000 {
                let mut b = WriteBatch::new();
                b.put(format!("k{i:06}").into_bytes(), vec![b'v'; 200]);
                e.write(b).unwrap();
                if i % 10 == 9 {
                    e.sync().unwrap();
                    println!("synced {i}");
                }
            }
            // Unsynced writes after the last report, then a crash.
            let mut b = WriteBatch::new();
            b.put(b"unsynced".to_vec(), b"x".to_vec());
            e.write(b).unwrap();
            std::process::abort();
        }
        let dir = tempdir("crash-recycled");
        // This test's name, from wherever the module sits (a stale name once
        // made the child run no test and exit 0).
        let (_, module) = module_path!().split_once("::").expect("a crate-qualified module path");
        let name = format!("{module}::synced_writes_survive_a_crash_with_recycled_wal_files");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name.as_str(), "--nocapture"])
            .env(CHILD, &dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the child was to abort");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: u32 = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("synced "))
            .filter_map(|n| n.trim().parse().ok())
            .next_back()
            .expect("the child reported synced writes");
        assert_eq!(last, 3999);
        let logs = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|f| f.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
            .count();
        let e = RocksEngine::open_with(&dir, Some(WRITE_BUFFER)).unwrap();
        for i in 0..=last {
            assert_eq!(
                e.get(format!("k{i:06}").as_bytes()).unwrap(),
                Some(vec![b'v'; 200]),
                "synced key {i} lost ({logs} WAL files)"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
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
