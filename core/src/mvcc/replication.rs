//! Cross-cluster replication support in the table store.
//!
//! - The **changelog**: every write transaction that takes a revision also
//!   records its mutations under `c + revision`, in the same batch. A leader
//!   serves its change stream from it. The changelog keeps the last
//!   `retention` revisions. Compaction (of the readable history) leaves it
//!   alone: it respects the retention that followers rely on.
//! - **Replicated apply** on a follower: a batch of revisions is applied
//!   only if it starts exactly at `current + 1` and is contiguous; anything
//!   else (a duplicate, a gap) is ignored, so a deposed or retrying worker can
//!   never apply twice or out of order. Keys are stamped with the leader's
//!   revisions, create revisions and versions.
//! - **Snapshot install** on a follower: chunks are staged under `z`, then a
//!   commit checks their count and digest and swaps them in as the table at
//!   revision `s` (history below `s` is not available: `compacted = s`).

use serde::{Deserialize, Serialize};

use super::{decode, encode, Fnv64, Latest, Mvcc, RevState, Version};
use crate::engine::{EngineError, WriteBatch};
use crate::kv::KeyValue;

/// Revisions of changelog a leader keeps by default.
pub const CHANGELOG_RETENTION_DEFAULT: u64 = 10_000;

/// Most revisions in one change-stream message.
pub const BATCH_REVISIONS_MAX: usize = 256;
/// About the most bytes of mutations in one change-stream message (a larger
/// revision is sent in parts of about this size).
pub const BATCH_BYTES_MAX: usize = 1 << 20;

/// One key's change in a revision: its new value (`None`: deleted) with the
/// create revision and version it has after the change (0 when deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutation {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub create_revision: u64,
    pub version: u64,
    /// The key's lease after the change (0: none, and for a deletion).
    #[serde(default, with = "crate::codec::added_in_2")]
    pub lease: i64,
}

/// Every mutation of one write transaction, in the order it made them
/// (applied in that order, the last write of a key is its state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionChanges {
    pub revision: u64,
    pub mutations: Vec<Mutation>,
}

impl RevisionChanges {
    /// A stable digest of the revision's content, for hash chains.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv64::new();
        h.write_u64(self.revision);
        for m in &self.mutations {
            h.write_bytes(&m.key);
            match &m.value {
                Some(v) => {
                    h.write_u64(1);
                    h.write_bytes(v);
                }
                None => h.write_u64(0),
            }
            h.write_u64(m.create_revision);
            h.write_u64(m.version);
            // Only when set, so digests of lease-free revisions are what they
            // were before leases existed.
            if m.lease != 0 {
                h.write_u64(m.lease as u64);
            }
        }
        h.finish()
    }

    /// Encoded size, for batching by bytes.
    pub fn size_bytes(&self) -> usize {
        self.mutations.iter().map(mutation_bytes).sum::<usize>() + 16
    }

    /// Splits the revision into parts of about `part_bytes` each (at least
    /// one mutation per part), in mutation order. Every part but the last is
    /// marked as continued. A revision within `part_bytes` is one part.
    pub fn into_parts(self, part_bytes: usize) -> Vec<RevisionPart> {
        let revision = self.revision;
        let mut parts = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0usize;
        for m in self.mutations {
            let b = mutation_bytes(&m);
            if !current.is_empty() && bytes + b > part_bytes {
                parts.push(RevisionPart { revision, mutations: std::mem::take(&mut current), continued: true });
                bytes = 0;
            }
            bytes += b;
            current.push(m);
        }
        parts.push(RevisionPart { revision, mutations: current, continued: false });
        parts
    }
}

fn mutation_bytes(m: &Mutation) -> usize {
    m.key.len() + m.value.as_ref().map_or(0, Vec::len) + 24
}

/// A piece of one revision on the change stream: a revision larger than a
/// message is sent in several parts, and applied only once all arrived, so
/// no revision is too large to replicate and none is applied in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionPart {
    pub revision: u64,
    pub mutations: Vec<Mutation>,
    /// More parts of this revision follow.
    pub continued: bool,
}

/// Why the parts of a revision could not be put together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("a part of revision {got} arrived while revision {expected} was incomplete")]
    Interleaved { expected: u64, got: u64 },
    #[error("revision {revision} is larger than {max_bytes} bytes, the most a follower assembles")]
    TooLarge { revision: u64, max_bytes: usize },
}

/// Puts the parts of revisions back together on the follower side.
#[derive(Debug, Default)]
pub struct RevisionAssembler {
    pending: Option<RevisionChanges>,
    bytes: usize,
}

impl RevisionAssembler {
    /// Takes the next part; returns the revision once its last part arrived.
    /// `max_bytes` bounds what is held for one incomplete revision.
    pub fn accept(&mut self, part: RevisionPart, max_bytes: usize) -> Result<Option<RevisionChanges>, AssembleError> {
        let part_bytes: usize = part.mutations.iter().map(mutation_bytes).sum();
        let mut rev = match self.pending.take() {
            Some(p) if p.revision != part.revision => {
                self.bytes = 0;
                return Err(AssembleError::Interleaved { expected: p.revision, got: part.revision });
            }
            Some(p) => p,
            None => {
                self.bytes = 0;
                RevisionChanges { revision: part.revision, mutations: Vec::new() }
            }
        };
        let part_mutations = part.mutations.len();
        self.bytes += part_bytes;
        if self.bytes > max_bytes {
            self.bytes = 0;
            return Err(AssembleError::TooLarge { revision: part.revision, max_bytes });
        }
        rev.mutations.extend(part.mutations);
        if part.continued && !crate::canary::active(crate::canary::Canary::RevisionPartApplied) {
            self.pending = Some(rev);
            return Ok(None);
        }
        self.bytes = 0;
        if part.continued || rev.mutations.len() > part_mutations {
            crate::probe!(RevisionPartsAssembled);
        }
        Ok(Some(rev))
    }

    /// Whether a revision is incomplete (its other parts are still due).
    pub fn in_progress(&self) -> bool {
        self.pending.is_some()
    }
}

/// What the changelog holds from a revision on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesFrom {
    /// Revisions `from..` (possibly empty: `from` is not committed yet).
    Changes(Vec<RevisionChanges>),
    /// `from` is older than the retained changelog: install a snapshot.
    NeedSnapshot { first_retained: u64 },
}

/// Outcome of a replicated batch on a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateOutcome {
    pub applied: bool,
    /// The table's revision afterwards.
    pub revision: u64,
}

/// Why a snapshot commit was refused (the worker starts the snapshot over).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotRefusal {
    /// The staged chunks are not the announced snapshot.
    Mismatch { staged: u64, expected: u64 },
    /// The follower is already at or beyond the snapshot's revision.
    Behind { current: u64 },
}

/// Digest of a table's live state, as [`Mvcc::state_digest`] computes it,
/// over key-values in key order.
pub fn kvs_digest<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> u64 {
    let mut h = Fnv64::new();
    for kv in kvs {
        digest_kv(&mut h, kv);
    }
    h.finish()
}

/// Adds one key-value to a running [`kvs_digest`].
pub fn digest_kv(h: &mut Fnv64, kv: &KeyValue) {
    h.write_bytes(&kv.key);
    h.write_u64(kv.create_revision);
    h.write_u64(kv.mod_revision);
    h.write_u64(kv.version);
    h.write_bytes(&kv.value);
    if kv.lease != 0 {
        h.write_u64(kv.lease as u64);
    }
}

impl Mvcc<'_> {
    pub(super) fn changelog_key(&self, revision: u64) -> Vec<u8> {
        self.key_with(b'c', &revision.to_be_bytes())
    }

    fn staging_key(&self, key: &[u8]) -> Vec<u8> {
        self.key_with(b'z', key)
    }

    /// The oldest revision whose changes the changelog still holds.
    pub fn first_retained(&self, state: RevState) -> u64 {
        state.current.saturating_sub(self.retention) + 1
    }

    /// Changelog entries from `from` on: at most `max_revisions` and about
    /// `max_bytes` (always at least one revision when one is available).
    pub fn changes_from(&self, from: u64, max_revisions: usize, max_bytes: usize) -> Result<ChangesFrom, EngineError> {
        let state = self.rev_state()?;
        let from = from.max(1);
        if from > state.current {
            return Ok(ChangesFrom::Changes(Vec::new()));
        }
        let first = self.first_retained(state);
        if from < first {
            return Ok(ChangesFrom::NeedSnapshot { first_retained: first });
        }
        let lo = self.changelog_key(from);
        let hi = self.changelog_key(state.current.saturating_add(1));
        let mut out: Vec<RevisionChanges> = Vec::new();
        let mut bytes = 0usize;
        let mut err = None;
        let prefix = self.ns.len() + 1;
        self.engine.scan(&lo, &hi, &mut |k, v| {
            let rev = match <[u8; 8]>::try_from(&k[prefix..]) {
                Ok(b) => u64::from_be_bytes(b),
                Err(_) => {
                    err = Some(EngineError::Corrupt("changelog key".into()));
                    return false;
                }
            };
            let mutations: Vec<Mutation> = match decode(v, "changelog entry") {
                Ok(m) => m,
                Err(e) => {
                    err = Some(e);
                    return false;
                }
            };
            let c = RevisionChanges { revision: rev, mutations };
            bytes += c.size_bytes();
            out.push(c);
            out.len() < max_revisions && bytes < max_bytes
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        // A hole (a trimmed or never-written entry) means the history is not
        // complete from `from`: the follower must use a snapshot.
        match out.first() {
            Some(c) if c.revision == from => {}
            _ => return Ok(ChangesFrom::NeedSnapshot { first_retained: first.max(from + 1) }),
        }
        if out.windows(2).any(|w| w[1].revision != w[0].revision + 1) {
            let upto = out.windows(2).position(|w| w[1].revision != w[0].revision + 1).map_or(out.len(), |i| i + 1);
            out.truncate(upto);
        }
        Ok(ChangesFrom::Changes(out))
    }

    /// The live key-values at `revision` (for a snapshot), in key order.
    pub fn snapshot_at(&self, revision: u64) -> Result<Vec<KeyValue>, super::MvccError> {
        let state = self.rev_state()?;
        let rev = self.resolve_read_revision(state, revision)?;
        if rev == state.current {
            Ok(self.live_now(&[], None)?)
        } else {
            Ok(self.live_at(&[], None, rev)?)
        }
    }

    /// One page of the table at `revision` for a snapshot: live key-values
    /// with keys after `after` (from the first key when `None`), at most
    /// `max_keys` or about `max_bytes`, in key order, and whether more may
    /// follow. Pages read at one revision fit together as long as the table
    /// is not compacted past it (that read fails as compacted).
    pub fn snapshot_page(
        &self,
        revision: u64,
        after: Option<&[u8]>,
        max_keys: usize,
        max_bytes: usize,
    ) -> Result<(Vec<KeyValue>, bool), super::MvccError> {
        let start = match after {
            Some(a) => {
                let mut s = a.to_vec();
                s.push(0);
                s
            }
            None => Vec::new(),
        };
        let (kvs, more, _) = self.page(&start, None, revision, max_keys, max_bytes)?;
        Ok((kvs, more))
    }

    /// Applies a replicated batch (see the module docs).
    pub fn apply_replicated(&self, batch: &[RevisionChanges]) -> Result<(WriteBatch, ReplicateOutcome), EngineError> {
        let mut state = self.rev_state()?;
        let first_ok = batch.first().is_some_and(|c| c.revision == state.current + 1);
        let contiguous = batch.windows(2).all(|w| w[1].revision == w[0].revision + 1);
        // The canary applies every batch it gets, stamped with the table's
        // next revisions: right for a fresh batch, wrong for a duplicate.
        let restamp = crate::canary::active(crate::canary::Canary::ReplicateTwice);
        if (!first_ok || !contiguous) && !restamp {
            match batch.first() {
                Some(c) if c.revision <= state.current => crate::probe!(ReplicatedDuplicate),
                Some(_) => crate::probe!(ReplicatedGap),
                None => {}
            }
            return Ok((WriteBatch::new(), ReplicateOutcome { applied: false, revision: state.current }));
        }
        crate::probe!(ReplicatedInOrder);
        let restamped: Vec<RevisionChanges>;
        let batch = if restamp {
            restamped = batch
                .iter()
                .enumerate()
                .map(|(i, c)| RevisionChanges {
                    revision: state.current + 1 + i as u64,
                    mutations: c.mutations.clone(),
                })
                .collect();
            &restamped[..]
        } else {
            batch
        };
        let mut wb = WriteBatch::new();
        for c in batch {
            for m in &c.mutations {
                let version = Version {
                    create_revision: m.create_revision,
                    version: m.version,
                    value: m.value.clone(),
                    lease: m.lease,
                };
                wb.put(self.history_key(&m.key, c.revision), encode(&version));
                match &m.value {
                    Some(v) => wb.put(
                        self.latest_key(&m.key),
                        encode(&Latest {
                            create_revision: m.create_revision,
                            mod_revision: c.revision,
                            version: m.version,
                            value: v.clone(),
                            lease: m.lease,
                        }),
                    ),
                    None => wb.delete(self.latest_key(&m.key)),
                }
            }
            wb.put(self.changelog_key(c.revision), encode(&c.mutations));
            if c.revision > self.retention {
                crate::probe!(ChangelogTrimmed);
                wb.delete(self.changelog_key(c.revision - self.retention));
            }
            state.current = state.current.max(c.revision);
        }
        wb.put(self.rev_key(), encode(&state));
        Ok((wb, ReplicateOutcome { applied: true, revision: state.current }))
    }

    /// Stages one chunk of a snapshot at `revision`; `first` discards any
    /// earlier staging.
    pub fn stage_snapshot_chunk(&self, first: bool, kvs: &[KeyValue]) -> Result<WriteBatch, EngineError> {
        let mut wb = WriteBatch::new();
        if first {
            let lo = self.key_with(b'z', &[]);
            let hi = self.key_with(b'z' + 1, &[]);
            wb.delete_range(lo, hi);
        }
        for kv in kvs {
            wb.put(self.staging_key(&kv.key), encode(kv));
        }
        Ok(wb)
    }

    /// Swaps the staged snapshot in as the table at `revision` if it has
    /// `count` keys with `digest` (see [`kvs_digest`]), all in one batch:
    /// [`Mvcc::check_staged`], then [`Mvcc::begin_swap`], every
    /// [`Mvcc::swap_step`] and [`Mvcc::finish_swap`]. A replica's state
    /// machine runs those pieces as separate writes instead (behind its read
    /// gate), so that swapping in a table of any size holds a bounded batch.
    pub fn commit_snapshot(
        &self,
        revision: u64,
        count: u64,
        digest: u64,
    ) -> Result<(WriteBatch, Result<u64, SnapshotRefusal>), EngineError> {
        if let Err(refusal) = self.check_staged(revision, count, digest)? {
            return Ok((self.refuse_staged(&refusal), Err(refusal)));
        }
        let (mut wb, mut swap) = self.begin_swap(revision);
        loop {
            let (b, done) = self.swap_step(&mut swap, usize::MAX)?;
            wb.extend(b);
            if done {
                break;
            }
        }
        let current = swap.current;
        wb.extend(self.finish_swap(&swap));
        Ok((wb, Ok(current)))
    }

    /// Whether the staged snapshot may replace the table at `revision`: the
    /// table is behind it, and the staged key-values are `count` with
    /// `digest`. Reads the staging one key-value at a time.
    pub fn check_staged(
        &self,
        revision: u64,
        count: u64,
        digest: u64,
    ) -> Result<Result<(), SnapshotRefusal>, EngineError> {
        let state = self.rev_state()?;
        if state.current >= revision {
            return Ok(Err(SnapshotRefusal::Behind { current: state.current }));
        }
        let (lo, hi) = (self.key_with(b'z', &[]), self.key_with(b'z' + 1, &[]));
        let mut h = Fnv64::new();
        let mut staged = 0u64;
        let mut err = None;
        self.engine.scan(&lo, &hi, &mut |_, v| match decode::<KeyValue>(v, "staged snapshot entry") {
            Ok(kv) => {
                digest_kv(&mut h, &kv);
                staged += 1;
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        if staged != count || h.finish() != digest {
            return Ok(Err(SnapshotRefusal::Mismatch { staged, expected: count }));
        }
        Ok(Ok(()))
    }

    /// The batch that goes with a refusal: a mismatched staging is dropped.
    pub fn refuse_staged(&self, refusal: &SnapshotRefusal) -> WriteBatch {
        let mut wb = WriteBatch::new();
        if matches!(refusal, SnapshotRefusal::Mismatch { .. }) {
            wb.delete_range(self.key_with(b'z', &[]), self.key_with(b'z' + 1, &[]));
        }
        wb
    }

    /// Starts swapping a checked staging in as the table at `revision`: the
    /// batch records the swap (so that a restart finishes it, see
    /// [`Mvcc::recover_swap`]) and removes everything of the old table
    /// (latest records, history, changelog, a compaction in progress).
    /// Until [`Mvcc::finish_swap`]'s batch is written the table is half
    /// copied: its readers must be kept out.
    pub fn begin_swap(&self, revision: u64) -> (WriteBatch, SnapshotSwap) {
        // The canary claims one revision more than the snapshot holds, so
        // the follower skips the first revision after the seam.
        let skip_first = crate::canary::active(crate::canary::Canary::SnapshotSkipFirst);
        let current = if skip_first { revision + 1 } else { revision };
        let swap = SnapshotSwap { revision, current, cursor: self.key_with(b'z', &[]) };
        let mut wb = WriteBatch::new();
        wb.put(self.swap_key(), encode(&(swap.revision, swap.current)));
        for tag in [b'l', b'h', b'c', b'p'] {
            wb.delete_range(self.key_with(tag, &[]), self.key_with(tag + 1, &[]));
        }
        (wb, swap)
    }

    /// Copies the next staged key-values into place, about `max_bytes` of
    /// them (at least one); `true` once all are.
    pub fn swap_step(&self, swap: &mut SnapshotSwap, max_bytes: usize) -> Result<(WriteBatch, bool), EngineError> {
        let hi = self.key_with(b'z' + 1, &[]);
        let mut wb = WriteBatch::new();
        let mut bytes = 0usize;
        let mut last = None;
        let mut err = None;
        self.engine.scan(&swap.cursor, &hi, &mut |k, v| {
            let kv = match decode::<KeyValue>(v, "staged snapshot entry") {
                Ok(kv) => kv,
                Err(e) => {
                    err = Some(e);
                    return false;
                }
            };
            let latest = Latest {
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                version: kv.version,
                value: kv.value,
                lease: kv.lease,
            };
            let version = Version {
                create_revision: kv.create_revision,
                version: kv.version,
                value: Some(latest.value.clone()),
                lease: kv.lease,
            };
            wb.put(self.history_key(&kv.key, kv.mod_revision), encode(&version));
            wb.put(self.latest_key(&kv.key), encode(&latest));
            bytes += k.len() + v.len();
            last = Some(k.to_vec());
            bytes < max_bytes
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        match last {
            Some(mut k) if bytes >= max_bytes => {
                k.push(0);
                swap.cursor = k;
                Ok((wb, false))
            }
            _ => {
                swap.cursor = hi;
                Ok((wb, true))
            }
        }
    }

    /// Ends a swap whose every [`Mvcc::swap_step`] is written: drops the
    /// staging and the swap record, and sets the table's revision.
    pub fn finish_swap(&self, swap: &SnapshotSwap) -> WriteBatch {
        let mut wb = WriteBatch::new();
        wb.delete_range(self.key_with(b'z', &[]), self.key_with(b'z' + 1, &[]));
        wb.delete(self.swap_key());
        wb.put(self.rev_key(), encode(&RevState { current: swap.current, compacted: swap.revision }));
        wb
    }

    /// Finishes a swap a restart interrupted (run when the group opens,
    /// before anything reads the table), writing each batch through
    /// `write`. Returns whether there was one.
    pub fn recover_swap(
        &self,
        max_bytes: usize,
        write: &mut dyn FnMut(WriteBatch) -> Result<(), EngineError>,
    ) -> Result<bool, EngineError> {
        let Some(bytes) = self.engine.get(&self.swap_key())? else { return Ok(false) };
        let (revision, current): (u64, u64) = decode(&bytes, "snapshot swap record")?;
        // Part of the copy may be done: start it over.
        let (wb, mut swap) = self.begin_swap(revision);
        swap.current = current;
        write(wb)?;
        loop {
            let (wb, done) = self.swap_step(&mut swap, max_bytes)?;
            write(wb)?;
            if done {
                break;
            }
        }
        write(self.finish_swap(&swap))?;
        crate::probe!(FollowerSwapFinishedAfterCrash);
        Ok(true)
    }

    fn swap_key(&self) -> Vec<u8> {
        self.key_with(b'w', &[])
    }

    fn upstream_key(&self) -> Vec<u8> {
        self.key_with(b'u', &[])
    }

    /// Follower clusters: the id of the leader-cluster table this table
    /// mirrors, once recorded.
    pub fn upstream_table(&self) -> Result<Option<u64>, EngineError> {
        match self.engine.get(&self.upstream_key())? {
            Some(b) => Ok(Some(decode(&b, "upstream table id")?)),
            None => Ok(None),
        }
    }

    /// The batch recording the leader-cluster table this table mirrors.
    pub fn set_upstream_table(&self, table_id: u64) -> WriteBatch {
        let mut wb = WriteBatch::new();
        wb.put(self.upstream_key(), encode(&table_id));
        wb
    }
}

/// A checked follower snapshot being copied into place (see
/// [`Mvcc::begin_swap`]).
#[derive(Debug, Clone)]
pub struct SnapshotSwap {
    revision: u64,
    /// The table's revision once swapped in.
    current: u64,
    /// The next staged key to copy.
    cursor: Vec<u8>,
}

impl SnapshotSwap {
    /// The table's revision once the swap is finished.
    pub fn current(&self) -> u64 {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, MemEngine};
    use crate::kv::{DeleteRangeRequest, PutRequest, TxnRequest};
    use crate::TableCommand;
    use proptest::prelude::*;

    fn revision(n: u64, keys: usize, value_len: usize) -> RevisionChanges {
        RevisionChanges {
            revision: n,
            mutations: (0..keys)
                .map(|i| Mutation {
                    key: format!("key{i:04}").into_bytes(),
                    value: (i % 5 != 0).then(|| vec![i as u8; value_len]),
                    create_revision: n,
                    version: 1,
                    lease: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_large_revision_splits_into_parts_that_reassemble_exactly() {
        let rev = revision(9, 300, 100);
        let parts = rev.clone().into_parts(1_000);
        assert!(parts.len() > 20, "{} parts", parts.len());
        for p in &parts {
            let bytes: usize = p.mutations.iter().map(mutation_bytes).sum();
            assert!(bytes <= 1_000 && !p.mutations.is_empty(), "a part holds at most part_bytes");
            assert_eq!(p.revision, 9);
        }
        assert!(parts[..parts.len() - 1].iter().all(|p| p.continued) && !parts.last().unwrap().continued);
        let mut a = RevisionAssembler::default();
        let mut out = None;
        for p in parts {
            assert!(out.is_none(), "nothing is applied before the last part");
            out = a.accept(p, usize::MAX).unwrap();
        }
        assert_eq!(out, Some(rev), "the parts put together are the revision");
        assert!(!a.in_progress());
        // A small revision is one part; a mutation larger than a part is a
        // part of its own.
        assert_eq!(revision(3, 2, 10).into_parts(1_000).len(), 1);
        assert_eq!(revision(3, 4, 2_000).into_parts(1_000).len(), 4);
    }

    #[test]
    fn parts_of_different_revisions_or_too_many_bytes_are_refused() {
        let mut a = RevisionAssembler::default();
        let first = revision(4, 50, 100).into_parts(500);
        assert_eq!(a.accept(first[0].clone(), usize::MAX), Ok(None));
        let other = revision(5, 1, 1).into_parts(500).remove(0);
        assert_eq!(a.accept(other, usize::MAX), Err(AssembleError::Interleaved { expected: 4, got: 5 }));
        assert!(!a.in_progress(), "the incomplete revision is dropped");
        let mut b = RevisionAssembler::default();
        let mut refused = None;
        for p in revision(6, 50, 100).into_parts(500) {
            if let Err(e) = b.accept(p, 2_000) {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(AssembleError::TooLarge { revision: 6, max_bytes: 2_000 }));
    }

    fn run(engine: &MemEngine, retention: u64, cmd: &TableCommand) {
        let store = Mvcc::new(engine, b"t".to_vec()).with_retention(retention);
        let (wb, _) = cmd.execute(&store).unwrap();
        engine.write(wb).unwrap();
    }

    fn digest(engine: &MemEngine) -> (u64, u64) {
        Mvcc::new(engine, b"t".to_vec()).state_digest().unwrap()
    }

    fn op() -> impl Strategy<Value = TableCommand> {
        let key = prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        prop_oneof![
            4 => (key.clone(), 0u8..4).prop_map(|(key, v)| TableCommand::Put(PutRequest { key, value: vec![v], prev_kv: false, ..Default::default() })),
            1 => key.clone().prop_map(|key| TableCommand::DeleteRange(DeleteRangeRequest { key, range_end: vec![], prev_kv: false })),
            1 => Just(TableCommand::DeleteRange(DeleteRangeRequest { key: b"a".to_vec(), range_end: b"c".to_vec(), prev_kv: false })),
            1 => (key, 0u8..4).prop_map(|(key, v)| TableCommand::Txn(TxnRequest {
                success: vec![
                    crate::kv::RequestOp::Put(PutRequest { key, value: vec![v], prev_kv: false, ..Default::default() }),
                    crate::kv::RequestOp::DeleteRange(DeleteRangeRequest { key: b"d".to_vec(), range_end: vec![], prev_kv: false }),
                ],
                ..Default::default()
            })),
        ]
    }

    proptest! {
        /// A follower fed the leader's changelog in random batches, with
        /// duplicates and stale batches mixed in, always holds the leader's
        /// state at its revision; reads at every revision agree.
        #[test]
        fn replaying_the_changelog_reproduces_the_leader(
            ops in prop::collection::vec(op(), 1..40),
            batch_sizes in prop::collection::vec(1usize..5, 1..40),
            replays in prop::collection::vec(any::<bool>(), 1..40),
        ) {
            let leader = MemEngine::new();
            let mut states = std::collections::BTreeMap::new();
            states.insert(1, digest(&leader));
            for cmd in &ops {
                run(&leader, 1000, cmd);
                let d = digest(&leader);
                states.insert(d.0, d);
            }
            let follower = MemEngine::new();
            let fstore = || Mvcc::new(&follower, b"t".to_vec());
            let mut i = 0;
            let mut sent: Vec<Vec<RevisionChanges>> = Vec::new();
            loop {
                let from = fstore().rev_state().unwrap().current + 1;
                let n = batch_sizes[i % batch_sizes.len()];
                let batch = match Mvcc::new(&leader, b"t".to_vec()).changes_from(from, n, usize::MAX).unwrap() {
                    ChangesFrom::Changes(c) if c.is_empty() => break,
                    ChangesFrom::Changes(c) => c,
                    ChangesFrom::NeedSnapshot { .. } => panic!("history is retained"),
                };
                prop_assert!(batch.len() <= n);
                // Sometimes an old batch arrives again first: it must be ignored.
                if replays[i % replays.len()] {
                    if let Some(old) = sent.last() {
                        let before = digest(&follower);
                        run(&follower, 1000, &TableCommand::Replicate { batch: old.clone(), leader_revision: 0 });
                        prop_assert_eq!(digest(&follower), before);
                    }
                }
                run(&follower, 1000, &TableCommand::Replicate { batch: batch.clone(), leader_revision: 0 });
                let d = digest(&follower);
                prop_assert_eq!(Some(&d), states.get(&d.0), "follower at {} differs from the leader", d.0);
                sent.push(batch);
                i += 1;
            }
            prop_assert_eq!(digest(&follower), digest(&leader));
            // The changelogs are identical too (a hash chain over revisions).
            let chain = |e: &MemEngine| match Mvcc::new(e, b"t".to_vec()).changes_from(1, usize::MAX, usize::MAX).unwrap() {
                ChangesFrom::Changes(c) => c.iter().fold(0u64, |h, c| h.rotate_left(5) ^ c.digest()),
                ChangesFrom::NeedSnapshot { .. } => 0,
            };
            prop_assert_eq!(chain(&follower), chain(&leader));
        }
    }

    #[test]
    fn retention_trims_the_changelog_and_compaction_respects_it() {
        let leader = MemEngine::new();
        for v in 0..20u8 {
            run(
                &leader,
                5,
                &TableCommand::Put(PutRequest {
                    key: vec![b'k', v % 3],
                    value: vec![v],
                    prev_kv: false,
                    ..Default::default()
                }),
            );
        }
        let store = Mvcc::new(&leader, b"t".to_vec()).with_retention(5);
        // Revisions 2..=21 were written; the last 5 (17..=21) are kept.
        assert_eq!(store.changes_from(16, 100, usize::MAX).unwrap(), ChangesFrom::NeedSnapshot { first_retained: 17 });
        match store.changes_from(17, 100, usize::MAX).unwrap() {
            ChangesFrom::Changes(c) => {
                assert_eq!(c.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![17, 18, 19, 20, 21])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.changes_from(22, 100, usize::MAX).unwrap(), ChangesFrom::Changes(vec![]));
        // Compaction respects the retention: a follower can still tail from
        // a revision below the compacted one.
        run(&leader, 5, &TableCommand::Compact(21));
        let store = Mvcc::new(&leader, b"t".to_vec()).with_retention(5);
        match store.changes_from(18, 100, usize::MAX).unwrap() {
            ChangesFrom::Changes(c) => {
                assert_eq!(c.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![18, 19, 20, 21])
            }
            other => panic!("{other:?}"),
        }
        let mut kept = 0;
        leader
            .scan(&store.changelog_key(0), &store.changelog_key(22), &mut |_, _| {
                kept += 1;
                true
            })
            .unwrap();
        assert_eq!(kept, 5, "exactly the retained revisions are kept");
    }

    #[test]
    fn a_snapshot_joins_the_changelog_without_gap_or_duplicate() {
        let leader = MemEngine::new();
        for v in 0..12u8 {
            run(
                &leader,
                3,
                &TableCommand::Put(PutRequest {
                    key: vec![b'k', v % 4],
                    value: vec![v],
                    prev_kv: false,
                    ..Default::default()
                }),
            );
        }
        run(
            &leader,
            3,
            &TableCommand::DeleteRange(DeleteRangeRequest { key: vec![b'k', 1], range_end: vec![], prev_kv: false }),
        );
        let lstore = Mvcc::new(&leader, b"t".to_vec()).with_retention(3);
        let s = lstore.rev_state().unwrap().current;
        let kvs = lstore.snapshot_at(s).unwrap();
        // Paged reads at s (as the leader streams them) give the same keys.
        let mut paged: Vec<KeyValue> = Vec::new();
        loop {
            let after = paged.last().map(|kv| kv.key.clone());
            let (page, more) = lstore.snapshot_page(s, after.as_deref(), 1, usize::MAX).unwrap();
            paged.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(paged, kvs);
        let follower = MemEngine::new();
        // Stale staging from an abandoned attempt is discarded by `first`.
        run(&follower, 3, &TableCommand::SnapshotChunk { revision: s, first: true, kvs: kvs[..1].to_vec() });
        for (i, chunk) in kvs.chunks(2).enumerate() {
            run(&follower, 3, &TableCommand::SnapshotChunk { revision: s, first: i == 0, kvs: chunk.to_vec() });
        }
        // A wrong digest is refused and clears the staging.
        let fstore = Mvcc::new(&follower, b"t".to_vec());
        let (_, r) = fstore.commit_snapshot(s, kvs.len() as u64, 1).unwrap();
        assert!(matches!(r, Err(SnapshotRefusal::Mismatch { .. })));
        run(
            &follower,
            3,
            &TableCommand::SnapshotCommit { revision: s, count: kvs.len() as u64, digest: kvs_digest(&kvs) },
        );
        assert_eq!(digest(&follower), digest(&leader));
        // Tail from s + 1.
        for v in 0..3u8 {
            run(
                &leader,
                3,
                &TableCommand::Put(PutRequest {
                    key: vec![b'k', v],
                    value: vec![100 + v],
                    prev_kv: false,
                    ..Default::default()
                }),
            );
        }
        let lstore = Mvcc::new(&leader, b"t".to_vec()).with_retention(3);
        let ChangesFrom::Changes(batch) = lstore.changes_from(s + 1, 100, usize::MAX).unwrap() else { panic!() };
        assert_eq!(batch.first().map(|c| c.revision), Some(s + 1));
        run(&follower, 3, &TableCommand::Replicate { batch, leader_revision: 0 });
        assert_eq!(digest(&follower), digest(&leader));
        // A second commit of the same snapshot is refused: the follower is past it.
        let (_, r) = Mvcc::new(&follower, b"t".to_vec()).commit_snapshot(s, 0, 0).unwrap();
        assert!(matches!(r, Err(SnapshotRefusal::Behind { .. })));
    }

    #[test]
    fn a_snapshot_swap_cut_short_by_a_restart_is_finished_exactly() {
        let leader = MemEngine::new();
        for v in 0..40u8 {
            let put = PutRequest { key: vec![b'k', v % 13], value: vec![v; 50], prev_kv: false, ..Default::default() };
            run(&leader, 100, &TableCommand::Put(put));
        }
        let lstore = Mvcc::new(&leader, b"t".to_vec());
        let s = lstore.rev_state().unwrap().current;
        let kvs = lstore.snapshot_at(s).unwrap();
        // The follower holds an older table, with a compaction still being
        // removed in steps: the swap replaces all of it.
        let follower = MemEngine::new();
        for v in 0..6u8 {
            let put = PutRequest { key: vec![b'k', v % 2], value: vec![v], prev_kv: false, ..Default::default() };
            run(&follower, 100, &TableCommand::Put(put));
        }
        let fstore = Mvcc::new(&follower, b"t".to_vec()).with_compaction_step(1);
        let mut txn = fstore.begin().unwrap();
        txn.compact(5).unwrap();
        follower.write(txn.finish().0).unwrap();
        assert_eq!(fstore.compaction_pending().unwrap(), Some(5));
        for (i, chunk) in kvs.chunks(4).enumerate() {
            run(&follower, 100, &TableCommand::SnapshotChunk { revision: s, first: i == 0, kvs: chunk.to_vec() });
        }
        assert_eq!(fstore.check_staged(s, kvs.len() as u64, kvs_digest(&kvs)).unwrap(), Ok(()));
        let (wb, mut swap) = fstore.begin_swap(s);
        follower.write(wb).unwrap();
        let (wb, done) = fstore.swap_step(&mut swap, 200).unwrap();
        assert!(!done, "200 bytes is a few of {} key-values", kvs.len());
        follower.write(wb).unwrap();
        // The restart: the group reopens and finishes the swap in small batches.
        let mut batches = 0;
        let recovered = fstore
            .recover_swap(200, &mut |b| {
                batches += 1;
                follower.write(b)
            })
            .unwrap();
        assert!(recovered && batches > 3, "{batches} batches");
        assert_eq!(digest(&follower), digest(&leader));
        assert_eq!(fstore.rev_state().unwrap(), RevState { current: s, compacted: s });
        assert_eq!(fstore.compaction_pending().unwrap(), None, "the old table's compaction went with it");
        assert!(!fstore.recover_swap(200, &mut |b| follower.write(b)).unwrap(), "nothing left to finish");
        // Only the new table's records are left: its latest records, one
        // history record per key and the revision state.
        let mut pairs = 0;
        follower
            .scan(b"t", b"u", &mut |_, _| {
                pairs += 1;
                true
            })
            .unwrap();
        assert_eq!(pairs, 2 * kvs.len() + 1);
    }
}
