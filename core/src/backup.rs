//! Online backups of a table, and their restore: the format, a writer that
//! produces it from a [`GroupView`] (a consistent image, read chunk by chunk
//! while the table keeps serving), and a reader that checks it as bytes
//! arrive. Sans-IO: callers move the bytes (a gRPC stream, a file).
//!
//! Format, version 2 (version 1, read too, differs only in the values: they
//! had no format version byte, and a reader adds it; see [`crate::codec`]):
//!
//! ```text
//! file   := "ARMADABK" version:u32be frame*
//! frame  := length:u32be postcard(Frame)
//! Frame  := Header { table, revision, compacted, source_node, taken_unix_ms }
//!         | Pairs [(key, value)]          keys relative to the table's data namespace,
//!                                         values as the engine stores them (versioned records)
//!         | End { pairs, checksum }       FNV-1a over the header frame's bytes and every pair
//! ```
//!
//! A backup holds the table's whole MVCC data (live keys, history above its
//! compaction revision, changelog) at one applied log entry: restoring it
//! gives a table that answers every read at or below `revision` (and above
//! `compacted`) exactly as the source did.

use serde::{Deserialize, Serialize};

use crate::command::{Catalog, GroupId, MetaCommand, MetaReply};
use crate::engine::{Engine, EngineError, Pair, WriteBatch};
use crate::mvcc::{Fnv64, Mvcc};
use crate::raft::data_ns;
use crate::snapshot::{ChunkReader, GroupView};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"ARMADABK";
/// The format this code writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this code reads.
pub const FORMAT_VERSION_OLDEST: u32 = 1;
/// Largest frame a reader accepts (a writer's frames are about one chunk).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// What a backup is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub table: String,
    /// The table's revision in the image.
    pub revision: u64,
    /// Its compaction revision (reads below fail as compacted).
    pub compacted: u64,
    /// The node the image was read on.
    pub source_node: u64,
    /// Wall-clock time of the backup, ms since the Unix epoch (from the
    /// driver; informational).
    pub taken_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Frame {
    Header(BackupHeader),
    Pairs(Vec<Pair>),
    End { pairs: u64, checksum: u64 },
}

/// Why a backup cannot be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not an Armada backup (the file does not start with {MAGIC:?})")]
    NotABackup,
    #[error(
        "backup format version {0} is not supported (this build reads versions {FORMAT_VERSION_OLDEST} to \
         {FORMAT_VERSION})"
    )]
    Version(u32),
    #[error("corrupt backup: {0}")]
    Corrupt(String),
    #[error("the backup ends early: {0}")]
    Truncated(String),
    #[error(
        "backup checksum mismatch: {pairs} pairs with checksum {checksum:016x} read, \
         {expected_pairs} pairs with checksum {expected_checksum:016x} written"
    )]
    Checksum { pairs: u64, checksum: u64, expected_pairs: u64, expected_checksum: u64 },
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let body = postcard::to_stdvec(frame).expect("postcard encodes a backup frame");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn hash_pair(h: &mut Fnv64, k: &[u8], v: &[u8]) {
    h.write_bytes(k);
    h.write_bytes(v);
}

/// Produces a backup's bytes, block by block, from a view of the table's
/// group: memory stays at one chunk.
pub struct BackupWriter {
    header: Option<BackupHeader>,
    revision: u64,
    chunks: ChunkReader,
    hash: Fnv64,
    pairs: u64,
    done: bool,
}

impl BackupWriter {
    /// `view` must be of the table's group; the header's revision and
    /// compaction revision are read from it.
    pub fn new(
        view: &GroupView,
        table: &str,
        source_node: u64,
        taken_unix_ms: u64,
        chunk_bytes: usize,
    ) -> Result<Self, EngineError> {
        let state = view.rev_state()?;
        let header = BackupHeader {
            table: table.to_string(),
            revision: state.current,
            compacted: state.compacted,
            source_node,
            taken_unix_ms,
        };
        Ok(Self {
            revision: header.revision,
            header: Some(header),
            chunks: view.reader(chunk_bytes),
            hash: Fnv64::new(),
            pairs: 0,
            done: false,
        })
    }

    /// The table's revision in the backup.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The next block of bytes, `None` after the last.
    pub fn next_block(&mut self) -> Result<Option<Vec<u8>>, EngineError> {
        if let Some(h) = self.header.take() {
            let frame = frame_bytes(&Frame::Header(h));
            self.hash.write_bytes(&frame);
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            out.extend_from_slice(&frame);
            return Ok(Some(out));
        }
        if self.done {
            return Ok(None);
        }
        match self.chunks.next_chunk()? {
            Some(chunk) => {
                for (k, v) in &chunk.pairs {
                    hash_pair(&mut self.hash, k, v);
                }
                self.pairs += chunk.pairs.len() as u64;
                let mut out = if chunk.pairs.is_empty() { Vec::new() } else { frame_bytes(&Frame::Pairs(chunk.pairs)) };
                if chunk.end.is_some() {
                    out.extend(frame_bytes(&Frame::End { pairs: self.pairs, checksum: self.hash.finish() }));
                    self.done = true;
                }
                Ok(Some(out))
            }
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }
}

/// What a [`BackupReader`] found in the bytes fed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    Header(BackupHeader),
    Pairs(Vec<Pair>),
    /// The checksum matched: the backup is complete.
    End {
        pairs: u64,
    },
}

/// Bytes etcd's `snapshot save` expects after the data: zero padding to a
/// multiple of 512 bytes, then a 32-byte SHA-256 of everything before it.
/// Armada's etcd `Maintenance.Snapshot` appends it; the reader accepts it.
pub const ETCD_TRAILER_ALIGN: u64 = 512;
pub const ETCD_TRAILER_HASH_BYTES: usize = 32;

/// Reads and checks a backup as its bytes arrive.
#[derive(Default)]
pub struct BackupReader {
    buf: Vec<u8>,
    started: bool,
    header_seen: bool,
    ended: bool,
    hash: Fnv64,
    pairs: u64,
    /// Bytes fed in all.
    total: u64,
    /// Bytes after the end frame (at most an etcd trailer).
    tail: Vec<u8>,
    /// The file's format version (known once the first 12 bytes are in).
    version: u32,
}

impl BackupReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next bytes; returns what they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<BackupEvent>, BackupError> {
        self.total += bytes.len() as u64;
        let mut events = Vec::new();
        if self.ended {
            self.tail.extend_from_slice(bytes);
            if self.tail.len() > ETCD_TRAILER_ALIGN as usize + ETCD_TRAILER_HASH_BYTES {
                return Err(BackupError::Corrupt("data after the end of the backup".into()));
            }
            return Ok(events);
        }
        self.buf.extend_from_slice(bytes);
        if !self.started {
            if self.buf.len() < 12 {
                if !MAGIC.starts_with(&self.buf[..self.buf.len().min(8)]) {
                    return Err(BackupError::NotABackup);
                }
                return Ok(events);
            }
            if &self.buf[..8] != MAGIC {
                return Err(BackupError::NotABackup);
            }
            let version = u32::from_be_bytes(self.buf[8..12].try_into().expect("4 bytes"));
            if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
                return Err(BackupError::Version(version));
            }
            self.version = version;
            self.buf.drain(..12);
            self.started = true;
        }
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len = u32::from_be_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > FRAME_BYTES_MAX {
                return Err(BackupError::Corrupt(format!("a frame of {len} bytes (at most {FRAME_BYTES_MAX})")));
            }
            if self.buf.len() - at - 4 < len {
                break;
            }
            let whole = &self.buf[at..at + 4 + len];
            let frame: Frame = postcard::from_bytes(&whole[4..])
                .map_err(|e| BackupError::Corrupt(format!("undecodable frame: {e}")))?;
            match frame {
                Frame::Header(h) => {
                    if self.header_seen {
                        return Err(BackupError::Corrupt("a second header".into()));
                    }
                    self.header_seen = true;
                    self.hash.write_bytes(whole);
                    events.push(BackupEvent::Header(h));
                }
                Frame::Pairs(mut p) if self.header_seen => {
                    for (k, v) in &p {
                        hash_pair(&mut self.hash, k, v);
                    }
                    self.pairs += p.len() as u64;
                    if self.version == 1 {
                        // Values from before records had format versions
                        // (the checksum covers them as written).
                        for (_, v) in p.iter_mut() {
                            *v = crate::codec::upgrade_v0(v);
                        }
                    }
                    events.push(BackupEvent::Pairs(p));
                }
                Frame::End { pairs, checksum } if self.header_seen => {
                    let ours = self.hash.finish();
                    if (pairs, checksum) != (self.pairs, ours) {
                        return Err(BackupError::Checksum {
                            pairs: self.pairs,
                            checksum: ours,
                            expected_pairs: pairs,
                            expected_checksum: checksum,
                        });
                    }
                    self.ended = true;
                    events.push(BackupEvent::End { pairs });
                    at += 4 + len;
                    // Whatever follows is a trailer (checked at the end).
                    self.tail = self.buf.split_off(at);
                    self.buf.clear();
                    if self.tail.len() > ETCD_TRAILER_ALIGN as usize + ETCD_TRAILER_HASH_BYTES {
                        return Err(BackupError::Corrupt("data after the end of the backup".into()));
                    }
                    return Ok(events);
                }
                _ => return Err(BackupError::Corrupt("data before the header".into())),
            }
            at += 4 + len;
        }
        self.buf.drain(..at);
        Ok(events)
    }

    /// The SHA-256 an etcd trailer carries (checked by [`BackupReader::finish`]
    /// for shape only: zero padding, alignment), if the backup has one. It
    /// covers every byte before it.
    pub fn etcd_sha256(&self) -> Option<&[u8]> {
        (self.tail.len() >= ETCD_TRAILER_HASH_BYTES).then(|| &self.tail[self.tail.len() - ETCD_TRAILER_HASH_BYTES..])
    }

    /// Call after the last bytes: an error unless the backup was complete.
    pub fn finish(&self) -> Result<(), BackupError> {
        if !self.started || !self.header_seen {
            return Err(BackupError::Truncated("no header".into()));
        }
        if !self.ended || !self.buf.is_empty() {
            return Err(BackupError::Truncated(format!("{} pairs read, no end frame", self.pairs)));
        }
        if !self.tail.is_empty() {
            let n = self.tail.len();
            let shaped = n >= ETCD_TRAILER_HASH_BYTES
                && self.tail[..n - ETCD_TRAILER_HASH_BYTES].iter().all(|b| *b == 0)
                && (self.total - ETCD_TRAILER_HASH_BYTES as u64).is_multiple_of(ETCD_TRAILER_ALIGN);
            if !shaped {
                return Err(BackupError::Corrupt("data after the end of the backup".into()));
            }
        }
        Ok(())
    }
}

/// Restores a backup into a node's storage that holds nothing yet (a new
/// data directory): every member of the new cluster is restored from the
/// same file, then started with the new cluster's members. Feed it the
/// reader's events in order.
pub struct Restorer<'e> {
    engine: &'e dyn Engine,
    table: Option<GroupId>,
    batch: WriteBatch,
}

/// Bytes per restore write.
const RESTORE_BATCH_BYTES: usize = 4 << 20;

impl<'e> Restorer<'e> {
    /// Fails unless the engine is empty.
    pub fn new(engine: &'e dyn Engine) -> Result<Self, BackupError> {
        let mut any = false;
        engine.scan(&[], &[0xff; 9], &mut |k, _| {
            // Only the format marker: an empty directory.
            any = k != crate::codec::FORMAT_KEY;
            !any
        })?;
        if any {
            return Err(BackupError::Restore(
                "the data directory already holds data; restore into a new, empty one".into(),
            ));
        }
        // Mark the directory with the format of the records restored into
        // it (an unmarked directory with data is taken for version 0).
        crate::codec::open_storage(engine).map_err(|e| BackupError::Restore(e.to_string()))?;
        Ok(Self { engine, table: None, batch: WriteBatch::new() })
    }

    /// Applies one event; returns the table's new id once the end is seen.
    pub fn apply(&mut self, event: BackupEvent) -> Result<Option<GroupId>, BackupError> {
        match event {
            BackupEvent::Header(h) => {
                let catalog = Catalog::new(self.engine, data_ns(GroupId::META));
                let (batch, reply) = catalog.execute(&MetaCommand::CreateTable { name: h.table.clone() })?;
                match reply {
                    Ok(MetaReply::Created(info)) => {
                        self.engine.write(batch)?;
                        self.table = Some(info.id);
                    }
                    Ok(other) => return Err(BackupError::Restore(format!("unexpected catalog reply {other:?}"))),
                    Err(e) => return Err(BackupError::Restore(format!("table {:?}: {e}", h.table))),
                }
                Ok(None)
            }
            BackupEvent::Pairs(pairs) => {
                let id = self.table.ok_or_else(|| BackupError::Corrupt("pairs before the header".into()))?;
                let ns = data_ns(id);
                for (k, v) in pairs {
                    let mut key = ns.clone();
                    key.extend_from_slice(&k);
                    self.batch.put(key, v);
                    if self.batch.size_bytes() >= RESTORE_BATCH_BYTES {
                        self.engine.write(std::mem::take(&mut self.batch))?;
                    }
                }
                Ok(None)
            }
            BackupEvent::End { .. } => {
                let id = self.table.ok_or_else(|| BackupError::Corrupt("an end before the header".into()))?;
                if !self.batch.is_empty() {
                    self.engine.write(std::mem::take(&mut self.batch))?;
                }
                self.engine.sync()?;
                // The restored table answers at its revision.
                Mvcc::new(self.engine, data_ns(id)).rev_state()?;
                Ok(Some(id))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::MemEngine;
    use crate::kv::{PutRequest, RangeRequest};
    use crate::TableCommand;

    /// A table with history: `n` puts over 20 keys, compacted halfway.
    fn source(n: u64) -> (Arc<dyn Engine>, GroupId) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let g = GroupId(5);
        let store = Mvcc::new(&*engine, data_ns(g));
        for i in 0..n {
            let put = TableCommand::Put(PutRequest {
                key: format!("key{:02}", i % 20).into_bytes(),
                value: format!("value-{i}-").repeat(5).into_bytes(),
                prev_kv: false,
                ..Default::default()
            });
            let (b, r) = put.execute(&store).unwrap();
            r.unwrap();
            engine.write(b).unwrap();
        }
        let (b, r) = TableCommand::Compact(n / 2).execute(&store).unwrap();
        r.unwrap();
        engine.write(b).unwrap();
        (engine, g)
    }

    fn backup_bytes(engine: &dyn Engine, g: GroupId, chunk: usize) -> (Vec<u8>, usize) {
        let view = GroupView::take(engine, g).unwrap();
        let mut w = BackupWriter::new(&view, "users", 1, 42, chunk).unwrap();
        let (mut out, mut blocks) = (Vec::new(), 0);
        while let Some(b) = w.next_block().unwrap() {
            out.extend(b);
            blocks += 1;
        }
        (out, blocks)
    }

    fn read_all(bytes: &[u8], step: usize) -> Result<Vec<BackupEvent>, BackupError> {
        let mut r = BackupReader::new();
        let mut events = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            events.extend(r.feed(piece)?);
        }
        r.finish()?;
        Ok(events)
    }

    fn range_at(engine: &dyn Engine, g: GroupId, revision: u64) -> crate::kv::RangeResponse {
        Mvcc::new(engine, data_ns(g))
            .range(&RangeRequest { key: vec![0], range_end: vec![0], revision, ..Default::default() })
            .unwrap()
    }

    #[test]
    fn a_backup_restores_to_a_table_that_answers_like_the_source() {
        let (src, g) = source(300);
        let (bytes, blocks) = backup_bytes(&*src, g, 2_000);
        assert!(blocks > 5, "written in blocks: {blocks}");
        // Fed in odd pieces, as a network or a file delivers them.
        let events = read_all(&bytes, 777).unwrap();
        let BackupEvent::Header(h) = &events[0] else { panic!("header first") };
        assert_eq!((h.table.as_str(), h.revision, h.compacted), ("users", 301, 150));
        let dst = MemEngine::new();
        let mut r = Restorer::new(&dst).unwrap();
        let mut id = None;
        for e in events {
            id = r.apply(e).unwrap().or(id);
        }
        let id = id.expect("restored");
        // Marked with the current format: a node opening it must not take
        // the restored records for unversioned ones.
        assert_eq!(crate::codec::open_storage(&dst).unwrap(), crate::codec::Opened::Current);
        assert_eq!(Catalog::new(&dst, data_ns(GroupId::META)).get("users").unwrap().map(|t| t.id), Some(id));
        for rev in [150, 200, 301, 0] {
            assert_eq!(range_at(&dst, id, rev), range_at(&*src, g, rev), "at revision {rev}");
        }
        // A restored table refuses what the source refuses.
        let below = RangeRequest { key: vec![0], range_end: vec![0], revision: 100, ..Default::default() };
        assert!(Mvcc::new(&dst, data_ns(id)).range(&below).is_err());
        // And restoring again into the same storage is refused.
        assert!(matches!(Restorer::new(&dst), Err(BackupError::Restore(_))));
    }

    /// A version-1 file (values without a format version byte, as releases
    /// before record versions wrote them) restores to the same table.
    #[test]
    fn a_version_1_backup_restores_like_the_current_format() {
        let (src, g) = source(120);
        let (bytes, _) = backup_bytes(&*src, g, 2_000);
        let events = read_all(&bytes, 4096).unwrap();
        // Rewrite it as version 1: the same frames, values unversioned.
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(&1u32.to_be_bytes());
        let mut hash = Fnv64::new();
        let mut pairs = 0u64;
        for e in &events {
            match e {
                BackupEvent::Header(h) => {
                    let f = frame_bytes(&Frame::Header(h.clone()));
                    hash.write_bytes(&f);
                    v1.extend(f);
                }
                BackupEvent::Pairs(p) => {
                    let old: Vec<Pair> = p.iter().map(|(k, v)| (k.clone(), v[1..].to_vec())).collect();
                    for (k, v) in &old {
                        hash_pair(&mut hash, k, v);
                    }
                    pairs += old.len() as u64;
                    v1.extend(frame_bytes(&Frame::Pairs(old)));
                }
                BackupEvent::End { .. } => v1.extend(frame_bytes(&Frame::End { pairs, checksum: hash.finish() })),
            }
        }
        let dst = MemEngine::new();
        let mut r = Restorer::new(&dst).unwrap();
        let mut id = None;
        for e in read_all(&v1, 333).unwrap() {
            id = r.apply(e).unwrap().or(id);
        }
        let id = id.expect("restored");
        for rev in [60, 100, 121, 0] {
            assert_eq!(range_at(&dst, id, rev), range_at(&*src, g, rev), "at revision {rev}");
        }
    }

    #[test]
    fn damaged_backups_are_refused_with_the_reason() {
        let (src, g) = source(100);
        let (bytes, _) = backup_bytes(&*src, g, 1_000);
        assert!(matches!(read_all(b"PK\x03\x04 not a backup", 3), Err(BackupError::NotABackup)));
        let mut v3 = bytes.clone();
        v3[11] = 3;
        assert!(matches!(read_all(&v3, 100), Err(BackupError::Version(3))));
        // Truncated anywhere: never accepted.
        for cut in [12, 40, bytes.len() / 2, bytes.len() - 1] {
            assert!(read_all(&bytes[..cut], 64).is_err(), "cut at {cut}");
        }
        // One flipped byte in the data: refused (checksum or framing).
        let mut flipped = bytes.clone();
        let at = bytes.len() * 2 / 3;
        flipped[at] ^= 0x20;
        assert!(read_all(&flipped, 64).is_err());
        assert!(read_all(&bytes, 64).is_ok());
    }

    #[test]
    fn an_etcd_trailer_is_accepted_and_nothing_else_after_the_end() {
        let (src, g) = source(50);
        let (bytes, _) = backup_bytes(&*src, g, 1_000);
        let mut etcd = bytes.clone();
        let pad = (512 - etcd.len() % 512) % 512;
        etcd.extend(std::iter::repeat_n(0u8, pad));
        etcd.extend([7u8; 32]);
        let mut r = BackupReader::new();
        for piece in etcd.chunks(100) {
            r.feed(piece).unwrap();
        }
        r.finish().unwrap();
        assert_eq!(r.etcd_sha256(), Some(&[7u8; 32][..]));
        // Misaligned, or not zero padding: refused.
        let mut bad = bytes.clone();
        bad.extend([1u8; 40]);
        assert!(read_all(&bad, 100).is_err());
        let mut short = bytes.clone();
        short.extend([0u8; 10]);
        assert!(read_all(&short, 100).is_err());
    }
}
