//! Raft snapshots that stream, with memory bounded by [`SNAPSHOT_CHUNK_BYTES`]
//! whatever the size of the group.
//!
//! - **Send.** A snapshot is a [`GroupView`]: an engine view
//!   ([`Engine::view`]) of the group taken on the state machine's task, so it
//!   is consistent with the applied log id it carries. The state machine goes
//!   on applying while a [`ChunkReader`] reads the view chunk by chunk, each
//!   at most about [`SNAPSHOT_CHUNK_BYTES`], and the last chunk carries the
//!   pair count and a checksum of everything sent.
//! - **Receive.** A [`SnapshotReceiver`] writes each chunk, in order, into a
//!   staging namespace of the group (`g ++ id ++ T ++ stream(8) ++ key`) and
//!   checks the count and checksum at the end, which yields a
//!   [`StagedSnapshot`]. Only then is the snapshot handed to openraft.
//! - **Install** (on the state machine's task). [`begin_install`] records an
//!   install marker (`g ++ id ++ I`) and clears the group's data in one
//!   write; [`Installer::step`] copies the staged pairs into place a bounded
//!   batch at a time; [`Installer::finish`] writes the applied state,
//!   removes the marker and the staging data in one write. A node that
//!   crashes anywhere in between finds the marker when the group opens and
//!   [`recover`] redoes the copy from the staged pairs, which stay until the
//!   last write. Readers are kept out of the half-copied data by the
//!   group's [`InstallGate`].
//!
//! The engine persists a prefix of its writes, so no fsync is needed between
//! these steps for crash safety: if the marker's write survives, so do the
//! staged chunks written before it.

use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::command::GroupId;
use crate::engine::{prefix_end, Engine, EngineError, EngineView, Pair, WriteBatch};
use crate::layout::{data_ns, group_ns};
use crate::mvcc::Fnv64;

/// Bytes of keys and values per snapshot chunk (sent, staged or copied at
/// install): what one snapshot transfer holds in memory at a time, on the
/// sender and on the receiver.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// While this node is sending a snapshot, a new one is built only once the
/// log since the last one is this many times the build interval.
pub const SNAPSHOT_HOLD_FACTOR: u64 = 10;

/// When a group builds a new snapshot, which lets it purge the log behind
/// the snapshot.
///
/// Every `after_logs` applied entries, as openraft's own policy does, except
/// while this node is sending the current snapshot to a replica, or the
/// replica that installed it still catches up from the log: a new snapshot
/// would purge the log the replica needs after installing the one it
/// receives (openraft keeps log entries in flight, but not those a
/// snapshot in flight leads to), so a transfer that lasts longer than the
/// log takes to pass the next build ended with the replica behind the
/// purged log again, and under steady writes a large table never caught
/// up. A new snapshot would also restart an interrupted transfer from its
/// first chunk. The hold ends at `SNAPSHOT_HOLD_FACTOR` intervals, which
/// bounds the log a slow transfer keeps on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildPolicy {
    pub after_logs: u64,
}

impl BuildPolicy {
    /// Whether to build now, `applied` entries applied and the last snapshot
    /// built at `built`, `sending` whether a transfer of it is under way.
    pub fn should_build(&self, applied: u64, built: u64, sending: bool) -> bool {
        let since = applied.saturating_sub(built);
        let after = self.after_logs.max(1);
        since >= after && (!sending || since >= after.saturating_mul(SNAPSHOT_HOLD_FACTOR))
    }
}

/// Staging id used when a node installs a view of its own (never expected:
/// openraft installs only snapshots received from a leader).
const LOCAL_STAGING_ID: u64 = u64::MAX;

/// The key of a group's applied state (last applied log id and membership).
pub fn applied_key(group: GroupId) -> Vec<u8> {
    let mut k = group_ns(group);
    k.extend_from_slice(b"Sa");
    k
}

/// The state-machine range of a group: applied state and data.
fn state_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let mut lo = group_ns(group);
    lo.push(b'S');
    let hi = prefix_end(&lo).expect("a group namespace is never all 0xff");
    (lo, hi)
}

fn data_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let lo = data_ns(group);
    let hi = prefix_end(&lo).expect("a group namespace is never all 0xff");
    (lo, hi)
}

/// Every staged snapshot of a group.
fn staging_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let mut lo = group_ns(group);
    lo.push(b'T');
    let hi = prefix_end(&lo).expect("a group namespace is never all 0xff");
    (lo, hi)
}

/// One staged snapshot of a group.
fn stream_range(group: GroupId, id: u64) -> (Vec<u8>, Vec<u8>) {
    let mut lo = group_ns(group);
    lo.push(b'T');
    lo.extend_from_slice(&id.to_be_bytes());
    let hi = prefix_end(&lo).unwrap_or_else(|| staging_range(group).1);
    (lo, hi)
}

fn marker_key(group: GroupId) -> Vec<u8> {
    let mut k = group_ns(group);
    k.push(b'I');
    k
}

fn hash_pair(h: &mut Fnv64, key: &[u8], value: &[u8]) {
    h.write_bytes(key);
    h.write_bytes(value);
}

/// Why a received snapshot was refused. The sender starts over.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot chunk {got} arrived where chunk {expected} was expected")]
    OutOfOrder { expected: u64, got: u64 },
    #[error(
        "snapshot does not match its checksum: {pairs} pairs with checksum {checksum:016x} received, \
         {sent_pairs} pairs with checksum {sent_checksum:016x} sent"
    )]
    Checksum { pairs: u64, checksum: u64, sent_pairs: u64, sent_checksum: u64 },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The last chunk's summary of the whole snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    /// Pairs in the snapshot.
    pub pairs: u64,
    /// FNV-1a over every pair, each key and value length-prefixed.
    pub checksum: u64,
}

/// One piece of a streamed snapshot: the group's data pairs (keys relative
/// to the group's data namespace), in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// 0 for the first chunk of a stream, then 1, 2, ...
    pub seq: u64,
    pub pairs: Vec<Pair>,
    /// Present on the last chunk only.
    pub end: Option<SnapshotEnd>,
}

impl SnapshotChunk {
    /// A whole snapshot as one chunk (for snapshots received in the old,
    /// unchunked message).
    pub fn whole(pairs: Vec<Pair>) -> Self {
        let mut h = Fnv64::new();
        for (k, v) in &pairs {
            hash_pair(&mut h, k, v);
        }
        let end = SnapshotEnd { pairs: pairs.len() as u64, checksum: h.finish() };
        Self { seq: 0, pairs, end: Some(end) }
    }
}

/// Where an interrupted transfer stands on the receiver: the sender goes on
/// from here instead of from the first chunk (a transfer of gigabytes that
/// restarted at every broken connection never finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The next chunk expected.
    pub seq: u64,
    /// Pairs staged so far.
    pub pairs: u64,
    /// The checksum's state over the pairs staged so far.
    pub checksum: u64,
    /// The last key staged (relative to the group's data namespace).
    pub after: Vec<u8>,
    /// Bytes of keys and values staged so far.
    pub bytes: u64,
}

/// Snapshot data as openraft carries it.
pub enum SnapshotData {
    /// What a node sends: a read view of the group.
    View(GroupView),
    /// What a node installs: a received, verified, staged snapshot.
    Staged(StagedSnapshot),
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotData::View(v) => write!(f, "View(group {})", v.group),
            SnapshotData::Staged(s) => write!(f, "Staged(group {}, staging {})", s.group, s.id),
        }
    }
}

/// A consistent read-only image of one group's state machine.
#[derive(Clone)]
pub struct GroupView {
    group: GroupId,
    view: Arc<dyn EngineView>,
    applied: Option<Vec<u8>>,
    /// The engine itself, kept only for the `backup-not-consistent` canary.
    live: Option<Arc<dyn Engine>>,
}

impl GroupView {
    /// Takes the image now. Apply writes a command's effects and the
    /// applied log id in one batch, so the image is consistent anywhere,
    /// except while a snapshot install replaces the data in several writes:
    /// take it on the state machine's task, or through the group's
    /// [`InstallGate`].
    pub fn take(engine: &dyn Engine, group: GroupId) -> Result<Self, EngineError> {
        let (lo, hi) = state_range(group);
        let view = engine.view(&lo, &hi)?;
        let applied = view.get(&applied_key(group))?;
        Ok(Self { group, view, applied, live: None })
    }

    /// [`GroupView::take`] for a backup (keeps a handle on the engine, which
    /// only the `backup-not-consistent` canary reads).
    pub fn take_for_backup(engine: &Arc<dyn Engine>, group: GroupId) -> Result<Self, EngineError> {
        let mut v = Self::take(&**engine, group)?;
        v.live = Some(engine.clone());
        Ok(v)
    }

    /// The encoded applied state (last applied log id and membership), if
    /// the group applied anything.
    pub fn applied_state(&self) -> Option<&[u8]> {
        self.applied.as_deref()
    }

    /// The table's revision state in the image (for a table group).
    pub fn rev_state(&self) -> Result<crate::mvcc::RevState, EngineError> {
        crate::mvcc::Mvcc::decode_rev_state(self.view.get(&crate::mvcc::Mvcc::rev_state_key(&data_ns(self.group)))?)
    }

    /// Reads the data in chunks of about `chunk_bytes`.
    pub fn reader(&self, chunk_bytes: usize) -> ChunkReader {
        let (lo, hi) = data_range(self.group);
        ChunkReader {
            view: self.view.clone(),
            live: self.live.clone(),
            prefix_len: lo.len(),
            next: lo,
            end: hi,
            seq: 0,
            pairs: 0,
            bytes: 0,
            hash: Fnv64::new(),
            chunk_bytes: chunk_bytes.max(1),
            done: false,
        }
    }

    /// Reads the chunks that follow `from` (a receiver's
    /// [`SnapshotReceiver::resume_point`] for a transfer of this same view).
    pub fn reader_from(&self, chunk_bytes: usize, from: &ResumePoint) -> ChunkReader {
        let mut r = self.reader(chunk_bytes);
        if from.seq > 0 {
            r.next.truncate(r.prefix_len);
            r.next.extend_from_slice(&from.after);
            r.next.push(0);
            r.seq = from.seq;
            r.pairs = from.pairs;
            r.bytes = from.bytes;
            r.hash = Fnv64::resume(from.checksum);
        }
        r
    }
}

/// Produces the chunks of a [`GroupView`], in order.
pub struct ChunkReader {
    view: Arc<dyn EngineView>,
    live: Option<Arc<dyn Engine>>,
    prefix_len: usize,
    next: Vec<u8>,
    end: Vec<u8>,
    seq: u64,
    pairs: u64,
    bytes: u64,
    hash: Fnv64,
    chunk_bytes: usize,
    done: bool,
}

impl ChunkReader {
    /// Bytes of keys and values read so far (including those a resumed
    /// transfer skipped).
    pub fn bytes_so_far(&self) -> u64 {
        self.bytes
    }

    /// The next chunk, `None` after the last (the one with `end` set).
    pub fn next_chunk(&mut self) -> Result<Option<SnapshotChunk>, EngineError> {
        if self.done {
            return Ok(None);
        }
        let mut raw = match &self.live {
            Some(engine) if crate::canary::active(crate::canary::Canary::BackupNotConsistent) => {
                engine.view(&self.next, &self.end)?.chunk(&self.next, &self.end, self.chunk_bytes)?
            }
            _ => self.view.chunk(&self.next, &self.end, self.chunk_bytes)?,
        };
        let bytes: usize = raw.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.bytes += (bytes - raw.len() * self.prefix_len) as u64;
        if let Some((k, _)) = raw.last() {
            self.next = k.clone();
            self.next.push(0);
        }
        let exhausted = bytes < self.chunk_bytes;
        if self.seq == 1 && !exhausted && crate::canary::active(crate::canary::Canary::SnapshotChunkSkipped) {
            raw.clear();
        }
        let pairs: Vec<Pair> = raw.into_iter().map(|(k, v)| (k[self.prefix_len..].to_vec(), v)).collect();
        for (k, v) in &pairs {
            hash_pair(&mut self.hash, k, v);
        }
        self.pairs += pairs.len() as u64;
        let end = exhausted.then(|| SnapshotEnd { pairs: self.pairs, checksum: self.hash.finish() });
        self.done = exhausted;
        let chunk = SnapshotChunk { seq: self.seq, pairs, end };
        self.seq += 1;
        Ok(Some(chunk))
    }
}

/// Receives one stream of chunks into the staging namespace. Dropped before
/// the end, it deletes what it staged.
pub struct SnapshotReceiver {
    engine: Arc<dyn Engine>,
    group: GroupId,
    id: u64,
    next_seq: u64,
    pairs: u64,
    hash: Fnv64,
    last_key: Vec<u8>,
    bytes: u64,
    armed: bool,
}

impl SnapshotReceiver {
    /// `id` names the staging area: unique among the group's snapshots
    /// received since the node started.
    pub fn new(engine: Arc<dyn Engine>, group: GroupId, id: u64) -> Self {
        Self {
            engine,
            group,
            id,
            next_seq: 0,
            pairs: 0,
            hash: Fnv64::new(),
            last_key: Vec::new(),
            bytes: 0,
            armed: true,
        }
    }

    /// Where the sender of this transfer may go on from.
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            seq: self.next_seq,
            pairs: self.pairs,
            checksum: self.hash.finish(),
            after: self.last_key.clone(),
            bytes: self.bytes,
        }
    }

    /// Stages one chunk. After the last chunk, checks the whole stream and
    /// returns the staged snapshot.
    pub fn accept(&mut self, chunk: SnapshotChunk) -> Result<Option<StagedSnapshot>, SnapshotError> {
        self.accept_as(chunk, false)
    }

    /// [`SnapshotReceiver::accept`] for a chunk from a node of the release
    /// before record formats: its values are version 0. They are checked
    /// as sent and staged as current records (see [`crate::codec`]).
    pub fn accept_unversioned(&mut self, chunk: SnapshotChunk) -> Result<Option<StagedSnapshot>, SnapshotError> {
        self.accept_as(chunk, true)
    }

    fn accept_as(
        &mut self,
        chunk: SnapshotChunk,
        upgrade_values: bool,
    ) -> Result<Option<StagedSnapshot>, SnapshotError> {
        if chunk.seq != self.next_seq {
            return Err(SnapshotError::OutOfOrder { expected: self.next_seq, got: chunk.seq });
        }
        let (prefix, _) = stream_range(self.group, self.id);
        let mut b = WriteBatch::new();
        let (mut hash, mut pairs, mut bytes) = (self.hash.clone(), self.pairs, self.bytes);
        if let Some((k, _)) = chunk.pairs.first() {
            if self.pairs > 0 && k.as_slice() <= self.last_key.as_slice() {
                return Err(SnapshotError::OutOfOrder { expected: self.next_seq, got: chunk.seq });
            }
        }
        let last_key = chunk.pairs.last().map(|(k, _)| k.clone());
        for (k, v) in chunk.pairs {
            hash_pair(&mut hash, &k, &v);
            bytes += (k.len() + v.len()) as u64;
            let mut key = Vec::with_capacity(prefix.len() + k.len());
            key.extend_from_slice(&prefix);
            key.extend_from_slice(&k);
            b.put(key, if upgrade_values { crate::codec::upgrade_v0(&v) } else { v });
            pairs += 1;
        }
        if !b.is_empty() {
            self.engine.write(b)?;
        }
        // Only a staged chunk moves the resume point.
        self.hash = hash;
        self.pairs = pairs;
        self.bytes = bytes;
        if let Some(k) = last_key {
            self.last_key = k;
        }
        self.next_seq += 1;
        let Some(end) = chunk.end else { return Ok(None) };
        let checksum = self.hash.finish();
        if end.pairs != self.pairs || end.checksum != checksum {
            return Err(SnapshotError::Checksum {
                pairs: self.pairs,
                checksum,
                sent_pairs: end.pairs,
                sent_checksum: end.checksum,
            });
        }
        self.armed = false;
        Ok(Some(StagedSnapshot { engine: self.engine.clone(), group: self.group, id: self.id, armed: true }))
    }
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        if self.armed {
            discard(&*self.engine, self.group, self.id);
        }
    }
}

/// Deletes one staged snapshot (best effort: what is left is removed when
/// the group next opens).
fn discard(engine: &dyn Engine, group: GroupId, id: u64) {
    let (lo, hi) = stream_range(group, id);
    let mut b = WriteBatch::new();
    b.delete_range(lo, hi);
    let _ = engine.write(b);
}

/// A complete, verified snapshot in the staging namespace. Dropped without
/// being installed (openraft found it stale), it deletes itself.
pub struct StagedSnapshot {
    engine: Arc<dyn Engine>,
    group: GroupId,
    id: u64,
    armed: bool,
}

impl Drop for StagedSnapshot {
    fn drop(&mut self) {
        if self.armed {
            discard(&*self.engine, self.group, self.id);
        }
    }
}

/// Keeps readers out of a group's data while a snapshot replaces it, like a
/// sequence lock: the epoch is odd during an install, and a read that saw
/// the epoch change is discarded. Readers never block the installer, and
/// the installer never waits for readers.
#[derive(Debug, Default)]
pub struct InstallGate {
    epoch: AtomicU64,
}

impl InstallGate {
    /// Runs `read` and returns its result, or `None` if an install was
    /// running or started meanwhile (the result may mix old and new data).
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> Option<T> {
        let before = self.epoch.load(Ordering::SeqCst);
        if before % 2 == 1 {
            return None;
        }
        let out = read();
        fence(Ordering::SeqCst);
        (self.epoch.load(Ordering::SeqCst) == before).then_some(out)
    }

    /// Whether an install is running.
    pub fn installing(&self) -> bool {
        self.epoch.load(Ordering::SeqCst) % 2 == 1
    }

    pub(crate) fn close(&self) {
        if !self.installing() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn open(&self) {
        if self.installing() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// What the install marker records: which staged snapshot is being copied
/// in, and the applied state to write when the copy is complete.
#[derive(Serialize, Deserialize)]
struct InstallMarker {
    staging: u64,
    applied: Vec<u8>,
}

/// Starts installing `staged` as the group's state, with `applied` (the
/// encoded applied state) to be written at the end: closes `gate`, records
/// the marker and clears the group's data, in one write.
pub fn begin_install(
    engine: Arc<dyn Engine>,
    gate: Arc<InstallGate>,
    mut staged: StagedSnapshot,
    applied: Vec<u8>,
) -> Result<Installer, EngineError> {
    let group = staged.group;
    let marker = InstallMarker { staging: staged.id, applied };
    gate.close();
    let mut b = WriteBatch::new();
    b.put(marker_key(group), crate::codec::encode(&marker));
    let (lo, hi) = data_range(group);
    b.delete_range(lo, hi);
    engine.write(b)?;
    // From here the marker owns the staged pairs.
    staged.armed = false;
    let (cursor, _) = stream_range(group, marker.staging);
    Ok(Installer { engine, gate: Some(gate), group, staging: marker.staging, applied: marker.applied, cursor })
}

/// Copies a staged snapshot into place, a bounded batch at a time.
pub struct Installer {
    engine: Arc<dyn Engine>,
    gate: Option<Arc<InstallGate>>,
    group: GroupId,
    staging: u64,
    applied: Vec<u8>,
    cursor: Vec<u8>,
}

impl Installer {
    /// Copies the next pairs, about `max_bytes` of them. `Ok(true)` once
    /// every staged pair is in place (then call [`Installer::finish`]).
    pub fn step(&mut self, max_bytes: usize) -> Result<bool, EngineError> {
        let (prefix, end) = stream_range(self.group, self.staging);
        let data = data_ns(self.group);
        let mut b = WriteBatch::new();
        let mut bytes = 0usize;
        let mut last = None;
        self.engine.scan(&self.cursor, &end, &mut |k, v| {
            let mut key = data.clone();
            key.extend_from_slice(&k[prefix.len()..]);
            b.put(key, v.to_vec());
            bytes += k.len() + v.len();
            last = Some(k.to_vec());
            bytes < max_bytes.max(1)
        })?;
        if !b.is_empty() {
            self.engine.write(b)?;
        }
        match last {
            Some(mut k) if bytes >= max_bytes.max(1) => {
                k.push(0);
                self.cursor = k;
                Ok(false)
            }
            _ => {
                self.cursor = end;
                Ok(true)
            }
        }
    }

    /// Writes the applied state and removes the marker and every staged
    /// snapshot of the group, in one write; reopens the gate.
    pub fn finish(self) -> Result<(), EngineError> {
        let mut b = WriteBatch::new();
        b.put(applied_key(self.group), self.applied.clone());
        b.delete(marker_key(self.group));
        let (lo, hi) = staging_range(self.group);
        b.delete_range(lo, hi);
        self.engine.write(b)?;
        if let Some(g) = &self.gate {
            g.open();
        }
        Ok(())
    }
}

/// Run when a group opens, before anything reads it: finishes an install
/// that a crash interrupted (returns `true`), or deletes staged snapshots
/// that were never installed.
pub fn recover(engine: Arc<dyn Engine>, group: GroupId, batch_bytes: usize) -> Result<bool, EngineError> {
    let Some(bytes) = engine.get(&marker_key(group))? else {
        // Usually nothing is staged: then no write at all at start-up.
        let (lo, hi) = staging_range(group);
        if engine.last(&lo, &hi)?.is_some() {
            let mut b = WriteBatch::new();
            b.delete_range(lo, hi);
            engine.write(b)?;
        }
        return Ok(false);
    };
    let marker: InstallMarker = crate::codec::decode(&bytes, &format!("snapshot install marker of group {group}"))?;
    // The copy may have been partly done: start it over.
    let mut b = WriteBatch::new();
    let (lo, hi) = data_range(group);
    b.delete_range(lo, hi);
    engine.write(b)?;
    let (cursor, _) = stream_range(group, marker.staging);
    let mut installer =
        Installer { engine, gate: None, group, staging: marker.staging, applied: marker.applied, cursor };
    while !installer.step(batch_bytes)? {}
    installer.finish()?;
    crate::probe!(SnapshotInstallFinishedAfterCrash);
    Ok(true)
}

/// Stages a view of this node's own group, for the (unexpected) case of
/// installing a snapshot that was not received.
pub fn stage_view(
    engine: Arc<dyn Engine>,
    view: &GroupView,
    chunk_bytes: usize,
) -> Result<StagedSnapshot, SnapshotError> {
    discard(&*engine, view.group, LOCAL_STAGING_ID);
    let mut receiver = SnapshotReceiver::new(engine, view.group, LOCAL_STAGING_ID);
    let mut reader = view.reader(chunk_bytes);
    while let Some(chunk) = reader.next_chunk()? {
        if let Some(staged) = receiver.accept(chunk)? {
            return Ok(staged);
        }
    }
    Err(SnapshotError::Engine(EngineError::Backend("a snapshot view ended without its last chunk".into())))
}

/// Yields once to the async runtime, so that a long install lets other
/// tasks run (and, in the simulator, lets a crash land mid-install).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DurableImage, MemEngine};

    fn fill(engine: &dyn Engine, group: GroupId, n: u32, tag: &str) {
        let mut b = WriteBatch::new();
        for i in 0..n {
            let mut k = data_ns(group);
            k.extend_from_slice(format!("key{i:05}").as_bytes());
            b.put(k, format!("{tag}-{i}").repeat(7).into_bytes());
        }
        b.put(applied_key(group), tag.as_bytes().to_vec());
        engine.write(b).unwrap();
    }

    fn dump(engine: &dyn Engine, group: GroupId) -> Vec<Pair> {
        let (lo, hi) = state_range(group);
        let mut out = Vec::new();
        engine
            .scan(&lo, &hi, &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                true
            })
            .unwrap();
        out
    }

    fn keys_under(engine: &dyn Engine, lo: &[u8], hi: &[u8]) -> usize {
        let mut n = 0;
        engine
            .scan(lo, hi, &mut |_, _| {
                n += 1;
                true
            })
            .unwrap();
        n
    }

    /// Streams group 7 of `from` into `to` through the chunk protocol.
    fn transfer(from: &dyn Engine, to: Arc<dyn Engine>, chunk_bytes: usize) -> (StagedSnapshot, Vec<u8>, u64) {
        let g = GroupId(7);
        let view = GroupView::take(from, g).unwrap();
        let mut reader = view.reader(chunk_bytes);
        let mut receiver = SnapshotReceiver::new(to, g, 1);
        let mut chunks = 0;
        while let Some(chunk) = reader.next_chunk().unwrap() {
            chunks += 1;
            let bytes: usize = chunk.pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(bytes < chunk_bytes + 200, "a chunk holds about chunk_bytes");
            if let Some(staged) = receiver.accept(chunk).unwrap() {
                return (staged, view.applied_state().unwrap().to_vec(), chunks);
            }
        }
        panic!("no last chunk");
    }

    #[test]
    fn a_snapshot_streams_in_chunks_and_installs_exactly() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 500, "new");
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        fill(&*replica, g, 800, "old");
        let (staged, applied, chunks) = transfer(&leader, replica.clone(), 2_000);
        assert!(chunks > 10, "many chunks: {chunks}");
        let gate = Arc::new(InstallGate::default());
        let mut installer = begin_install(replica.clone(), gate.clone(), staged, applied).unwrap();
        assert!(gate.installing());
        assert_eq!(gate.read(|| 1), None, "reads are refused during an install");
        let mut steps = 0;
        while !installer.step(3_000).unwrap() {
            steps += 1;
        }
        assert!(steps > 5, "the copy is bounded per step: {steps}");
        installer.finish().unwrap();
        assert_eq!(gate.read(|| 1), Some(1));
        assert_eq!(dump(&*replica, g), dump(&leader, g), "the replica holds exactly the leader's state");
        let (lo, hi) = staging_range(g);
        assert_eq!(keys_under(&*replica, &lo, &hi), 0, "no staging left");
        assert_eq!(replica.get(&marker_key(g)).unwrap(), None);
    }

    /// Chunks from a node of the release before record formats (values
    /// without a version byte) pass the checksum as sent and are staged,
    /// then installed, as current records.
    #[test]
    fn unversioned_chunks_are_staged_as_current_records() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 300, "v0");
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let view = GroupView::take(&leader, g).unwrap();
        let mut reader = view.reader(1_000);
        let mut receiver = SnapshotReceiver::new(replica.clone(), g, 1);
        let staged = loop {
            let chunk = reader.next_chunk().unwrap().expect("the stream ends with a staged snapshot");
            if let Some(s) = receiver.accept_unversioned(chunk).unwrap() {
                break s;
            }
        };
        let applied = view.applied_state().unwrap().to_vec();
        let mut installer = begin_install(replica.clone(), Arc::new(InstallGate::default()), staged, applied).unwrap();
        while !installer.step(3_000).unwrap() {}
        installer.finish().unwrap();
        let want: Vec<Pair> = dump(&leader, g)
            .into_iter()
            .map(|(k, v)| if k == applied_key(g) { (k, v) } else { (k, crate::codec::upgrade_v0(&v)) })
            .collect();
        assert_eq!(dump(&*replica, g), want, "every data value gained its version byte, once");
    }

    #[test]
    fn an_interrupted_transfer_resumes_where_the_receiver_stands() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 600, "new");
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let view = GroupView::take(&leader, g).unwrap();
        let mut receiver = SnapshotReceiver::new(replica.clone(), g, 1);
        assert_eq!(receiver.resume_point().seq, 0, "nothing staged: start from the first chunk");
        // The first attempt breaks after 5 chunks; the 6th is lost in flight.
        let mut first = view.reader(1_500);
        let mut staged_chunks = Vec::new();
        for _ in 0..5 {
            let c = first.next_chunk().unwrap().unwrap();
            staged_chunks.push(c.clone());
            assert!(receiver.accept(c).unwrap().is_none());
        }
        let lost = first.next_chunk().unwrap().unwrap();
        let point = receiver.resume_point();
        assert_eq!((point.seq, point.after.clone()), (5, staged_chunks[4].pairs.last().unwrap().0.clone()));
        // A chunk that does not follow is refused and moves nothing: one
        // that skips ahead, and one already staged sent again as the next.
        let mut skipped = lost.clone();
        skipped.seq = 6;
        assert!(matches!(receiver.accept(skipped), Err(SnapshotError::OutOfOrder { .. })));
        let mut repeated = staged_chunks[2].clone();
        repeated.seq = 5;
        assert!(matches!(receiver.accept(repeated), Err(SnapshotError::OutOfOrder { .. })));
        assert_eq!(receiver.resume_point(), point);
        // The second attempt goes on from the receiver's resume point.
        let mut second = view.reader_from(1_500, &point);
        let mut sent = 0;
        let staged = loop {
            sent += 1;
            if let Some(s) = receiver.accept(second.next_chunk().unwrap().unwrap()).unwrap() {
                break s;
            }
        };
        assert!(sent > 3, "the rest of the transfer was sent: {sent} chunks");
        let gate = Arc::new(InstallGate::default());
        let mut installer =
            begin_install(replica.clone(), gate, staged, view.applied_state().unwrap().to_vec()).unwrap();
        while !installer.step(4_000).unwrap() {}
        installer.finish().unwrap();
        assert_eq!(dump(&*replica, g), dump(&leader, g), "the resumed transfer installs the source exactly");
    }

    #[test]
    fn a_snapshot_in_flight_holds_the_next_build_up_to_a_bound() {
        let p = BuildPolicy { after_logs: 100 };
        assert!(!p.should_build(99, 0, false));
        assert!(p.should_build(100, 0, false));
        assert!(p.should_build(1_250, 1_100, false));
        assert!(!p.should_build(1_000, 100, true), "held while a transfer runs");
        assert!(p.should_build(1_000, 100, false), "built once it ends");
        assert!(p.should_build(1_000 * SNAPSHOT_HOLD_FACTOR, 0, true), "but not held forever");
        assert!(!p.should_build(5, 10, false), "a snapshot ahead of the applied index (just installed)");
    }

    #[test]
    fn an_empty_group_streams_as_one_chunk() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(applied_key(g), b"a".to_vec());
        leader.write(b).unwrap();
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        fill(&*replica, g, 10, "old");
        let (staged, applied, chunks) = transfer(&leader, replica.clone(), 100);
        assert_eq!(chunks, 1);
        let mut i = begin_install(replica.clone(), Arc::new(InstallGate::default()), staged, applied).unwrap();
        while !i.step(100).unwrap() {}
        i.finish().unwrap();
        assert_eq!(dump(&*replica, g), dump(&leader, g));
    }

    #[test]
    fn the_view_is_the_state_when_taken_not_when_sent() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 100, "then");
        let before = dump(&leader, g);
        let view = GroupView::take(&leader, g).unwrap();
        fill(&leader, g, 150, "later");
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let mut reader = view.reader(500);
        let mut receiver = SnapshotReceiver::new(replica.clone(), g, 3);
        let staged = loop {
            if let Some(s) = receiver.accept(reader.next_chunk().unwrap().unwrap()).unwrap() {
                break s;
            }
        };
        let mut i = begin_install(
            replica.clone(),
            Arc::new(InstallGate::default()),
            staged,
            view.applied_state().unwrap().to_vec(),
        )
        .unwrap();
        while !i.step(500).unwrap() {}
        i.finish().unwrap();
        assert_eq!(dump(&*replica, g), before);
    }

    #[test]
    fn a_missing_or_altered_chunk_is_refused_and_its_staging_removed() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 200, "x");
        let view = GroupView::take(&leader, g).unwrap();
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let (lo, hi) = staging_range(g);
        // A chunk out of order.
        let mut reader = view.reader(1_000);
        let mut receiver = SnapshotReceiver::new(replica.clone(), g, 1);
        receiver.accept(reader.next_chunk().unwrap().unwrap()).unwrap();
        reader.next_chunk().unwrap();
        let err = receiver.accept(reader.next_chunk().unwrap().unwrap()).err().expect("refused");
        assert!(matches!(err, SnapshotError::OutOfOrder { expected: 1, got: 2 }), "{err}");
        drop(receiver);
        assert_eq!(keys_under(&*replica, &lo, &hi), 0, "an abandoned stream leaves nothing staged");
        // A pair altered on the way.
        let mut reader = view.reader(1_000);
        let mut receiver = SnapshotReceiver::new(replica.clone(), g, 2);
        let mut result = Ok(None);
        let mut n = 0;
        while let Some(mut chunk) = reader.next_chunk().unwrap() {
            n += 1;
            if n == 2 {
                chunk.pairs[0].1.push(b'!');
            }
            result = receiver.accept(chunk);
            if !matches!(result, Ok(None)) {
                break;
            }
        }
        assert!(matches!(result, Err(SnapshotError::Checksum { .. })), "{:?}", result.err());
        drop(receiver);
        assert_eq!(keys_under(&*replica, &lo, &hi), 0);
    }

    #[test]
    fn a_crash_at_any_point_of_an_install_is_finished_when_the_group_opens() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 300, "new");
        let new_state = dump(&leader, g);
        // Crash after each engine write of the install, synced up to there.
        for crash_after in 0..40 {
            let disk = DurableImage::new();
            let replica: Arc<dyn Engine> = Arc::new(MemEngine::open(disk.clone()));
            fill(&*replica, g, 450, "old");
            replica.sync().unwrap();
            let (staged, applied, _) = transfer(&leader, replica.clone(), 1_500);
            replica.sync().unwrap();
            let mut writes = 0;
            let mut done = false;
            let mut installer =
                Some(begin_install(replica.clone(), Arc::new(InstallGate::default()), staged, applied).unwrap());
            replica.sync().unwrap();
            while writes < crash_after {
                writes += 1;
                let i = installer.as_mut().unwrap();
                if i.step(2_000).unwrap() {
                    installer.take().unwrap().finish().unwrap();
                    replica.sync().unwrap();
                    done = true;
                    break;
                }
                replica.sync().unwrap();
            }
            drop(installer);
            // The crash: reopen the disk, then open the group.
            let reopened: Arc<dyn Engine> = Arc::new(MemEngine::open(disk));
            let redone = recover(reopened.clone(), g, 2_000).unwrap();
            assert_eq!(redone, !done, "crash after {crash_after}: recovery redoes an unfinished install");
            let after = dump(&*reopened, g);
            assert_eq!(after, new_state, "crash after {crash_after}: the marker was durable, so the install completes");
            let (lo, hi) = staging_range(g);
            assert_eq!(keys_under(&*reopened, &lo, &hi), 0);
            if done {
                break;
            }
        }
    }

    #[test]
    fn opening_a_group_removes_staging_that_was_never_installed() {
        let g = GroupId(7);
        let leader = MemEngine::new();
        fill(&leader, g, 50, "x");
        let replica: Arc<dyn Engine> = Arc::new(MemEngine::new());
        fill(&*replica, g, 20, "old");
        let before = dump(&*replica, g);
        let (staged, _, _) = transfer(&leader, replica.clone(), 300);
        std::mem::forget(staged); // as if the node stopped before installing
        assert!(!recover(replica.clone(), g, 300).unwrap());
        let (lo, hi) = staging_range(g);
        assert_eq!(keys_under(&*replica, &lo, &hi), 0);
        assert_eq!(dump(&*replica, g), before);
    }
}
