//! The ordered key-value `Engine` every piece of Armada state is stored in,
//! and `MemEngine`, its in-memory implementation with a simulated disk.
//!
//! Contract, which every implementation must keep (the conformance suite in
//! `engine::conformance` checks it and runs unchanged against each engine):
//! - `write` applies a whole batch atomically and makes it visible to every
//!   later read, but not necessarily durable;
//! - `sync` makes every write that returned before it durable;
//! - after a crash, the durable state is exactly the writes of some prefix of
//!   the write history that includes every write acknowledged by a `sync`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A failure of the storage backend. Backends box their own error types into
/// this one so that core never depends on a backend crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("storage backend error: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The engine, or the task that syncs it, was closed (a shutdown, or a
    /// simulated crash): the call was abandoned, no write or sync failed.
    #[error("storage closed: {0}")]
    Closed(String),
}

/// One operation of an atomic [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`.
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// A set of writes applied atomically, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put { key: key.into(), value: value.into() });
    }
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete { key: key.into() });
    }
    pub fn delete_range(&mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::DeleteRange { start: start.into(), end: end.into() });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Appends `other`'s writes, after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
    /// Bytes of keys and values carried, for accounting and bounds.
    pub fn size_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value } => key.len() + value.len(),
                BatchOp::Delete { key } => key.len(),
                BatchOp::DeleteRange { start, end } => start.len() + end.len(),
            })
            .sum()
    }
}

/// A key and its value, as returned by [`Engine::last`].
pub type Pair = (Vec<u8>, Vec<u8>);

/// An ordered byte-key store. Methods take `&self`: engines synchronise
/// internally because several Raft groups and readers share one engine.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;

    /// Visits every key in `[start, end)` in ascending order until `visit`
    /// returns `false`. `visit` must not call back into the engine.
    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError>;

    /// The greatest key in `[start, end)` with its value.
    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<Pair>, EngineError>;

    /// Applies `batch` atomically; visible to later reads, not yet durable.
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError>;

    /// Makes every write that returned before this call durable.
    fn sync(&self) -> Result<(), EngineError>;

    /// Bytes that `[start, end)` takes. The default counts every key and
    /// value exactly ([`exact_size`]); an engine may answer with an estimate.
    fn approximate_size(&self, start: &[u8], end: &[u8]) -> Result<u64, EngineError> {
        exact_size(self, start, end)
    }

    /// A consistent read-only image of `[start, end)` as it is now: later
    /// writes do not show in it. Streamed snapshots and backups read through
    /// one while writes go on. An engine should make this cheap in memory
    /// (RocksDB: a snapshot); [`MemEngine`], which holds everything in
    /// memory anyway, copies the range.
    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError>;

    /// Reclaims space left by deletions (etcd's Defragment). Blocking and
    /// possibly long; the default does nothing (nothing to reclaim).
    fn defragment(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// A point-in-time image of part of an engine (see [`Engine::view`]). Reads
/// outside the range the view was taken over see nothing.
pub trait EngineView: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;

    /// Pairs in `[start, end)` in ascending order: from `start`, up to and
    /// including the pair that brings their keys and values to `max_bytes`
    /// or more. Fewer bytes than `max_bytes` means the range is exhausted.
    fn chunk(&self, start: &[u8], end: &[u8], max_bytes: usize) -> Result<Vec<Pair>, EngineError>;
}

/// Takes pairs from an ordered iterator for [`EngineView::chunk`].
pub fn take_chunk<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>, max_bytes: usize) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for (k, v) in pairs {
        bytes += k.len() + v.len();
        out.push((k.to_vec(), v.to_vec()));
        if bytes >= max_bytes {
            break;
        }
    }
    out
}

/// [`MemEngine`]'s view: a copy of the range.
struct MemView {
    start: Vec<u8>,
    end: Vec<u8>,
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl EngineView for MemView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.map.get(key).cloned())
    }

    fn chunk(&self, start: &[u8], end: &[u8], max_bytes: usize) -> Result<Vec<Pair>, EngineError> {
        let lo = start.max(self.start.as_slice());
        let hi = end.min(self.end.as_slice());
        if lo >= hi {
            return Ok(Vec::new());
        }
        let range = self.map.range::<[u8], _>((std::ops::Bound::Included(lo), std::ops::Bound::Excluded(hi)));
        Ok(take_chunk(range.map(|(k, v)| (k.as_slice(), v.as_slice())), max_bytes))
    }
}

/// The bytes of every key and value in `[start, end)`, counted by a scan.
pub fn exact_size<E: Engine + ?Sized>(engine: &E, start: &[u8], end: &[u8]) -> Result<u64, EngineError> {
    let mut total = 0u64;
    engine.scan(start, end, &mut |k, v| {
        total += (k.len() + v.len()) as u64;
        true
    })?;
    Ok(total)
}

/// A simulated disk: what survives a crash. The simulated world keeps this
/// handle outside the node so that a restarted node opens what was fsynced
/// and nothing else.
///
/// It holds one ordered map with every write of the engine open on it, and
/// an undo record (key, value before) for each write since the last sync. A
/// crash rolls the undo records back, newest first, which leaves exactly the
/// synced writes. (It used to hold a second copy of the map that every sync
/// replayed the batches into: a tenth of the simulator's time.)
#[derive(Debug, Clone, Default)]
pub struct DurableImage {
    inner: Arc<Mutex<Disk>>,
}

#[derive(Debug, Default)]
struct Disk {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Writes since the last sync, oldest first: each key and its value
    /// before the write (`None`: it did not exist).
    undo: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Where each batch written since the last sync begins in `undo`,
    /// oldest first: a torn crash keeps whole batches only.
    batches: Vec<usize>,
    /// Incarnation of the engine that may use the disk; an engine opened
    /// before the latest crash is fenced off.
    owner: u64,
}

impl Disk {
    /// What a crash does: unsynced writes vanish, and the engine that made
    /// them can no longer touch the disk.
    fn crash(&mut self) {
        self.crash_keeping(0);
    }

    /// A crash that keeps the first `keep` of the batches written since the
    /// last sync (all of them when `keep` is larger) and loses the rest: the
    /// page cache had written some of them back when the power went. Still
    /// within the engine's contract (the durable state is a prefix of the
    /// write history that includes every synced write); a real engine's log
    /// keeps whole batches, so a torn batch is never half kept.
    fn crash_keeping(&mut self, keep: usize) {
        let cut = self.batches.get(keep).copied().unwrap_or(self.undo.len());
        self.batches.clear();
        while self.undo.len() > cut {
            let Some((key, before)) = self.undo.pop() else { break };
            match before {
                Some(v) => {
                    self.map.insert(key, v);
                }
                None => {
                    self.map.remove(&key);
                }
            }
        }
        self.undo.clear();
        self.owner += 1;
    }

    /// Applies one operation and records how to undo it.
    fn apply(&mut self, op: BatchOp) {
        match op {
            BatchOp::Put { key, value } => {
                let before = self.map.insert(key.clone(), value);
                self.undo.push((key, before));
            }
            BatchOp::Delete { key } => {
                if let Some(v) = self.map.remove(&key) {
                    self.undo.push((key, Some(v)));
                }
            }
            BatchOp::DeleteRange { start, end } => {
                if start < end {
                    let doomed: Vec<Vec<u8>> = self.map.range(start..end).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        if let Some(v) = self.map.remove(&k) {
                            self.undo.push((k, Some(v)));
                        }
                    }
                }
            }
        }
    }
}

impl DurableImage {
    pub fn new() -> Self {
        Self::default()
    }
    /// Crashes the disk (see [`Disk::crash`]), then changes the durable
    /// contents directly: for simulating disk faults (and, in canary runs,
    /// deliberate data loss) between a crash and a restart. Never used by a
    /// running engine, which it fences off.
    pub fn mutate(&self, f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>)) {
        let mut d = self.lock();
        d.crash();
        f(&mut d.map)
    }

    /// Batches written since the last sync (what a crash now may lose).
    pub fn unsynced_batches(&self) -> usize {
        self.lock().batches.len()
    }

    /// Crashes the disk now, keeping the first `keep` unsynced batches and
    /// losing the later ones (see [`Disk::crash_keeping`]); the engine open
    /// on it is fenced. Returns how many batches it lost.
    pub fn crash_keeping(&self, keep: usize) -> usize {
        let mut d = self.lock();
        let lost = d.batches.len().saturating_sub(keep);
        d.crash_keeping(keep);
        lost
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        // A poisoned lock means a thread panicked while applying a batch;
        // the map itself is still a consistent BTreeMap, so keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Upper bound on writes waiting for `sync` in a [`MemEngine`]; a driver
/// that never syncs is a bug, and this makes it loud instead of a slow leak.
pub const MEM_ENGINE_UNSYNCED_WRITES_MAX: usize = 1 << 22;

/// In-memory engine over a [`DurableImage`]. Writes are visible at once;
/// they become durable at `sync`, so a simulated crash (the disk reopened by
/// a new engine) loses exactly the writes that were never synced.
#[derive(Debug)]
pub struct MemEngine {
    disk: DurableImage,
    incarnation: u64,
}

impl MemEngine {
    /// A fresh engine over an empty disk.
    pub fn new() -> Self {
        Self::open(DurableImage::new())
    }

    /// Opens the engine over an existing disk, as a node restarting after a
    /// crash would: it sees the durable writes and nothing else. An engine
    /// still open on the disk is fenced: its every later call fails.
    pub fn open(disk: DurableImage) -> Self {
        let incarnation = {
            let mut d = disk.lock();
            d.crash();
            d.owner
        };
        Self { disk, incarnation }
    }

    /// The disk this engine syncs to.
    pub fn disk(&self) -> &DurableImage {
        &self.disk
    }

    /// Number of writes (keys changed) not yet synced.
    pub fn unsynced_writes(&self) -> usize {
        self.disk.lock().undo.len()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Disk>, EngineError> {
        let d = self.disk.lock();
        if d.owner != self.incarnation {
            return Err(EngineError::Closed("engine closed: its disk was reopened after a crash".into()));
        }
        Ok(d)
    }
}

impl Default for MemEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine for MemEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.lock()?.map.get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        if start >= end {
            return Ok(());
        }
        let d = self.lock()?;
        for (k, v) in d.map.range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end))) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<Pair>, EngineError> {
        if start >= end {
            return Ok(None);
        }
        let d = self.lock()?;
        Ok(d.map
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end)))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut d = self.lock()?;
        if d.undo.len().saturating_add(batch.ops.len()) > MEM_ENGINE_UNSYNCED_WRITES_MAX {
            return Err(EngineError::Backend(format!("more than {MEM_ENGINE_UNSYNCED_WRITES_MAX} unsynced writes")));
        }
        let start = d.undo.len();
        d.batches.push(start);
        for op in batch.ops {
            d.apply(op);
        }
        Ok(())
    }

    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
        let d = self.lock()?;
        let map = if start < end {
            d.map
                .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            BTreeMap::new()
        };
        Ok(Arc::new(MemView { start: start.to_vec(), end: end.to_vec(), map }))
    }

    fn sync(&self) -> Result<(), EngineError> {
        let mut d = self.lock()?;
        d.undo.clear();
        d.batches.clear();
        Ok(())
    }
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` if there is none (the prefix is all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Engine conformance checks. Every `Engine` implementation runs this same
/// suite from its own tests (`armada-server` runs it against RocksDB).
pub mod conformance {
    use super::*;

    fn collect(e: &dyn Engine, start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        e.scan(start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan of a healthy engine");
        out
    }

    /// Runs every check against engines produced by `fresh`. Panics (it is
    /// test code) with the name of the first property that fails.
    pub fn run_all(fresh: &mut dyn FnMut() -> Box<dyn Engine>) {
        put_get_delete(&*fresh());
        scan_is_ordered_and_bounded(&*fresh());
        scan_stops_when_told(&*fresh());
        batch_is_atomic_and_ordered(&*fresh());
        delete_range_is_half_open(&*fresh());
        last_finds_the_greatest_key(&*fresh());
        binary_keys_order_bytewise(&*fresh());
        view_is_a_point_in_time_image(&*fresh());
        view_chunks_cover_the_range_in_order(&*fresh());
    }

    pub fn view_is_a_point_in_time_image(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        b.put(b"a".to_vec(), b"1".to_vec());
        b.put(b"b".to_vec(), b"2".to_vec());
        b.put(b"z".to_vec(), b"outside".to_vec());
        e.write(b).unwrap();
        let v = e.view(b"a", b"c").unwrap();
        let mut b = WriteBatch::new();
        b.put(b"a".to_vec(), b"changed".to_vec());
        b.delete(b"b".to_vec());
        b.put(b"bb".to_vec(), b"new".to_vec());
        e.write(b).unwrap();
        assert_eq!(v.get(b"a").unwrap(), Some(b"1".to_vec()), "view: a later put does not show");
        assert_eq!(v.get(b"b").unwrap(), Some(b"2".to_vec()), "view: a later delete does not show");
        assert_eq!(v.get(b"bb").unwrap(), None, "view: a later insert does not show");
        assert_eq!(
            v.chunk(b"", b"\xff", usize::MAX).unwrap(),
            vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())],
            "view: a chunk sees the image, and only the viewed range"
        );
        assert_eq!(e.get(b"a").unwrap(), Some(b"changed".to_vec()), "view: the engine moves on");
    }

    pub fn view_chunks_cover_the_range_in_order(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        for i in 0u8..50 {
            b.put(vec![b'k', i], vec![i; 10]);
        }
        e.write(b).unwrap();
        let v = e.view(b"k", b"l").unwrap();
        let mut start = b"k".to_vec();
        let mut seen = Vec::new();
        loop {
            let c = v.chunk(&start, b"l", 35).unwrap();
            let bytes: usize = c.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(c.len() <= 3, "view chunk: stops at the pair that reaches max_bytes");
            let Some((last, _)) = c.last() else { break };
            start = last.clone();
            start.push(0);
            seen.extend(c.into_iter().map(|(k, _)| k[1]));
            if bytes < 35 {
                break;
            }
        }
        assert_eq!(seen, (0u8..50).collect::<Vec<_>>(), "view chunks: every key once, in order");
    }

    pub fn put_get_delete(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        b.put(b"a".to_vec(), b"1".to_vec());
        e.write(b).unwrap();
        assert_eq!(e.get(b"a").unwrap(), Some(b"1".to_vec()), "put_get_delete: read back");
        let mut b = WriteBatch::new();
        b.delete(b"a".to_vec());
        e.write(b).unwrap();
        assert_eq!(e.get(b"a").unwrap(), None, "put_get_delete: deleted");
        e.sync().unwrap();
    }

    pub fn scan_is_ordered_and_bounded(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        for k in [b"c".as_slice(), b"a", b"e", b"b", b"d"] {
            b.put(k.to_vec(), k.to_vec());
        }
        e.write(b).unwrap();
        let got: Vec<Vec<u8>> = collect(e, b"b", b"e").into_iter().map(|(k, _)| k).collect();
        assert_eq!(got, vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()], "scan order/bounds");
        assert!(collect(e, b"e", b"b").is_empty(), "scan with start >= end is empty");
    }

    pub fn scan_stops_when_told(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(vec![i], vec![i]);
        }
        e.write(b).unwrap();
        let mut seen = 0;
        e.scan(&[0], &[0xff], &mut |_, _| {
            seen += 1;
            seen < 3
        })
        .unwrap();
        assert_eq!(seen, 3, "scan stops when the visitor returns false");
    }

    pub fn batch_is_atomic_and_ordered(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        b.put(b"k".to_vec(), b"1".to_vec());
        b.put(b"k".to_vec(), b"2".to_vec());
        b.delete(b"gone".to_vec());
        b.put(b"gone".to_vec(), b"x".to_vec());
        e.write(b).unwrap();
        assert_eq!(e.get(b"k").unwrap(), Some(b"2".to_vec()), "later op in a batch wins");
        assert_eq!(e.get(b"gone").unwrap(), Some(b"x".to_vec()), "ops apply in order");
    }

    pub fn delete_range_is_half_open(e: &dyn Engine) {
        let mut b = WriteBatch::new();
        for k in [b"a".as_slice(), b"b", b"c", b"d"] {
            b.put(k.to_vec(), b"v".to_vec());
        }
        e.write(b).unwrap();
        let mut b = WriteBatch::new();
        b.delete_range(b"b".to_vec(), b"d".to_vec());
        e.write(b).unwrap();
        let got: Vec<Vec<u8>> = collect(e, b"a", b"z").into_iter().map(|(k, _)| k).collect();
        assert_eq!(got, vec![b"a".to_vec(), b"d".to_vec()], "delete_range is [start, end)");
    }

    pub fn last_finds_the_greatest_key(e: &dyn Engine) {
        assert_eq!(e.last(b"a", b"z").unwrap(), None, "last of an empty engine");
        let mut b = WriteBatch::new();
        for k in [b"a".as_slice(), b"b", b"c", b"d"] {
            b.put(k.to_vec(), k.to_vec());
        }
        e.write(b).unwrap();
        assert_eq!(e.last(b"a", b"d").unwrap(), Some((b"c".to_vec(), b"c".to_vec())), "last is end-exclusive");
        assert_eq!(e.last(b"b", b"b").unwrap(), None, "empty interval");
        assert_eq!(e.last(b"a", b"zz").unwrap().map(|x| x.0), Some(b"d".to_vec()));
    }

    pub fn binary_keys_order_bytewise(e: &dyn Engine) {
        let keys: Vec<Vec<u8>> = vec![vec![0xff], vec![0], vec![0, 0], vec![1, 0xff], vec![]];
        let mut b = WriteBatch::new();
        for k in &keys {
            b.put(k.clone(), b"v".to_vec());
        }
        e.write(b).unwrap();
        let got: Vec<Vec<u8>> = collect(e, &[], &[0xff, 0xff]).into_iter().map(|(k, _)| k).collect();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want, "keys order bytewise, empty key first");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain model of a batch: every op in order, on a map.
    fn model_apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &WriteBatch) {
        for op in &batch.ops {
            match op {
                BatchOp::Put { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                BatchOp::Delete { key } => {
                    map.remove(key);
                }
                BatchOp::DeleteRange { start, end } => map.retain(|k, _| !(k >= start && k < end)),
            }
        }
    }

    #[test]
    fn mem_engine_conforms() {
        conformance::run_all(&mut || Box::new(MemEngine::new()));
    }

    #[test]
    fn crash_loses_exactly_the_unsynced_writes() {
        let disk = DurableImage::new();
        let e = MemEngine::open(disk.clone());
        let mut b = WriteBatch::new();
        b.put(b"synced".to_vec(), b"1".to_vec());
        e.write(b).unwrap();
        e.sync().unwrap();
        let mut b = WriteBatch::new();
        b.put(b"lost".to_vec(), b"2".to_vec());
        e.write(b).unwrap();
        assert_eq!(e.unsynced_writes(), 1);
        drop(e);
        let e = MemEngine::open(disk);
        assert_eq!(e.get(b"synced").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(b"lost").unwrap(), None);
    }

    /// Random batches (puts, overwrites, deletes, range deletes) with syncs
    /// at random points, then a crash: the reopened engine holds exactly
    /// the state after the last synced batch, and a stale engine is fenced.
    #[test]
    fn crash_rolls_back_to_the_last_sync_exactly() {
        use proptest::prelude::*;
        let op = prop_oneof![
            (0u8..8, 0u8..4).prop_map(|(k, v)| BatchOp::Put { key: vec![k], value: vec![v] }),
            (0u8..8).prop_map(|k| BatchOp::Delete { key: vec![k] }),
            (0u8..8, 0u8..8).prop_map(|(a, b)| BatchOp::DeleteRange { start: vec![a], end: vec![b] }),
        ];
        let batches = proptest::collection::vec((proptest::collection::vec(op, 0..5), any::<bool>()), 0..30);
        proptest!(|(batches in batches)| {
            let disk = DurableImage::new();
            let e = MemEngine::open(disk.clone());
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut durable = model.clone();
            for (ops, sync) in batches {
                let batch = WriteBatch { ops };
                model_apply(&mut model, &batch);
                e.write(batch).unwrap();
                if sync {
                    e.sync().unwrap();
                    durable = model.clone();
                }
                let mut seen = BTreeMap::new();
                e.scan(&[], &[0xff], &mut |k, v| { seen.insert(k.to_vec(), v.to_vec()); true }).unwrap();
                prop_assert_eq!(&seen, &model);
            }
            let reopened = MemEngine::open(disk.clone());
            let mut seen = BTreeMap::new();
            reopened.scan(&[], &[0xff], &mut |k, v| { seen.insert(k.to_vec(), v.to_vec()); true }).unwrap();
            prop_assert_eq!(&seen, &durable);
            prop_assert!(e.get(&[0]).is_err(), "the engine from before the crash is fenced");
            prop_assert!(e.write(WriteBatch::new()).is_err());
        });
    }

    /// A torn crash keeps exactly the first `keep` unsynced batches: the
    /// reopened engine holds the state after the last sync plus those
    /// batches, whole, and nothing of the later ones.
    #[test]
    fn torn_crash_keeps_a_prefix_of_whole_batches() {
        use proptest::prelude::*;
        let op = prop_oneof![
            (0u8..6, 0u8..4).prop_map(|(k, v)| BatchOp::Put { key: vec![k], value: vec![v] }),
            (0u8..6).prop_map(|k| BatchOp::Delete { key: vec![k] }),
            (0u8..6, 0u8..6).prop_map(|(a, b)| BatchOp::DeleteRange { start: vec![a], end: vec![b] }),
        ];
        let batches = proptest::collection::vec((proptest::collection::vec(op, 0..4), any::<bool>()), 0..20);
        proptest!(|(batches in batches, keep in 0usize..8)| {
            let disk = DurableImage::new();
            let e = MemEngine::open(disk.clone());
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            // The state after the last sync, then after each later batch.
            let mut states = vec![model.clone()];
            for (ops, sync) in batches {
                let batch = WriteBatch { ops };
                model_apply(&mut model, &batch);
                e.write(batch).unwrap();
                states.push(model.clone());
                if sync {
                    e.sync().unwrap();
                    states = vec![model.clone()];
                }
            }
            prop_assert_eq!(disk.unsynced_batches(), states.len() - 1);
            let lost = disk.crash_keeping(keep);
            let kept = keep.min(states.len() - 1);
            prop_assert_eq!(lost, states.len() - 1 - kept);
            prop_assert!(e.get(&[0]).is_err(), "the engine from before the crash is fenced");
            let reopened = MemEngine::open(disk.clone());
            let mut seen = BTreeMap::new();
            reopened.scan(&[], &[0xff], &mut |k, v| { seen.insert(k.to_vec(), v.to_vec()); true }).unwrap();
            prop_assert_eq!(&seen, &states[kept]);
        });
    }

    #[test]
    fn prefix_end_cases() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
