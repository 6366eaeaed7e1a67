//! Multi-version store of one table over an [`Engine`].
//!
//! Layout under the table's namespace `ns` (every key starts with it):
//! - `ns ++ "r"`: the table's [`RevState`] (current and compacted revision);
//! - `ns ++ "h" ++ enc(key) ++ rev(8, big-endian)`: one version of `key` written
//!   at revision `rev` (a tombstone for a deletion). `enc` escapes `0x00` as
//!   `0x00 0xff` and terminates with `0x00 0x01`, so history sorts by key and
//!   then revision, and no encoded key is a prefix of another;
//! - `ns ++ "l" ++ key`: the latest live version of `key` (absent once
//!   deleted), so reads at the current revision touch only live keys;
//! - `ns ++ "p"`: while a compaction's history is still being removed, where
//!   its next step starts ([`CompactionCursor`]);
//! - `ns ++ "c"`, `ns ++ "z"` and `ns ++ "w"`: the changelog, a follower
//!   cluster's staged snapshot and the record of its swap into place (see
//!   [`replication`]).
//!
//! A compaction makes history below its revision unreadable at once, and
//! removes it in steps of at most [`COMPACTION_STEP_RECORDS`] history
//! records each (the first with the compaction, the rest through
//! [`Mvcc::compaction_step`], one command each), so compacting a
//! table of any size never holds its apply path for long. The records a
//! step has not reached yet are invisible to reads: no read below the
//! compaction revision is served, and a read at or above it finds the same
//! newest version either way.
//!
//! This module does not read the clock, does not sync, and never writes to
//! the engine itself: writes go into a caller-supplied [`WriteBatch`] that the
//! caller applies atomically together with its own bookkeeping (the Raft
//! applied index), so a crash can never leave half a transaction.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::engine::{prefix_end, Engine, EngineError, WriteBatch};
use crate::kv::*;

/// Current and compacted revision of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevState {
    pub current: u64,
    /// Reads below this revision fail with [`KvError::Compacted`]; 0 before
    /// any compaction.
    pub compacted: u64,
}

impl Default for RevState {
    fn default() -> Self {
        Self { current: REVISION_INITIAL, compacted: 0 }
    }
}

/// A stored version: `value == None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Version {
    create_revision: u64,
    version: u64,
    value: Option<Vec<u8>>,
    #[serde(default, with = "crate::codec::added_in_2")]
    lease: i64,
}

/// The latest live version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Latest {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    value: Vec<u8>,
    #[serde(default, with = "crate::codec::added_in_2")]
    lease: i64,
}

impl Latest {
    fn to_kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }
}

/// Errors of a store operation: a deterministic refusal, or a storage fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MvccError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A stored record (see [`crate::codec`]).
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    crate::codec::encode(v)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, EngineError> {
    Ok(crate::codec::decode(bytes, what)?)
}

/// Appends the order-preserving, prefix-free encoding of `key` to `out`.
fn push_escaped(out: &mut Vec<u8>, key: &[u8]) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// The revision at the end of a history record's engine key.
fn revision_of(history_key: &[u8]) -> u64 {
    let n = history_key.len();
    history_key.get(n.saturating_sub(8)..).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

/// Splits `enc(key) ++ rev` back into `(key, rev)`.
fn split_escaped(bytes: &[u8]) -> Result<(Vec<u8>, u64), EngineError> {
    let mut key = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i + 1 < bytes.len() {
        let b = bytes[i];
        if b == 0 {
            match bytes[i + 1] {
                0xff => key.push(0),
                1 => {
                    let rest = &bytes[i + 2..];
                    let rev: [u8; 8] =
                        rest.try_into().map_err(|_| EngineError::Corrupt("history key: bad revision".into()))?;
                    return Ok((key, u64::from_be_bytes(rev)));
                }
                _ => return Err(EngineError::Corrupt("history key: bad escape".into())),
            }
            i += 2;
        } else {
            key.push(b);
            i += 1;
        }
    }
    Err(EngineError::Corrupt("history key: no terminator".into()))
}

/// Most bytes of key-values a range inside a transaction answers with. It
/// is applied on every replica, so it is a constant, not a node's setting
/// (a replica that refused a transaction another one applied would
/// diverge); the same as the largest response limit a node accepts.
pub const TXN_RANGE_BYTES_MAX: u64 = 60 << 20;

/// History records one compaction step visits by default (etcd removes
/// compacted revisions in batches of 1,000 keys): a few milliseconds of the
/// apply path per step.
pub const COMPACTION_STEP_RECORDS: usize = 4096;

/// Where the removal of a compaction's history goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CompactionCursor {
    /// The compaction whose unreadable history is being removed.
    revision: u64,
    /// Engine key of the last history record visited (empty: none yet).
    after: Vec<u8>,
    /// The newest version at or below `revision` seen of the key the last
    /// step stopped inside: (key, engine key, is a tombstone). It is removed
    /// if a newer one at or below `revision` follows, or if it is a
    /// tombstone once the key's history ends.
    newest: Option<(Vec<u8>, Vec<u8>, bool)>,
}

/// What [`Mvcc::scan_history`] gives each record: its key, revision,
/// engine key and (at or below the revision asked for) decoded version.
type HistoryVisitor<'a> = dyn FnMut(Vec<u8>, u64, &[u8], Option<Version>) -> bool + 'a;

/// One table's multi-version store, borrowed over an engine.
pub struct Mvcc<'e> {
    engine: &'e dyn Engine,
    ns: Vec<u8>,
    /// Revisions of changelog kept (see [`replication`]).
    retention: u64,
    /// History records one compaction step visits.
    compaction_step: usize,
    /// [`TXN_RANGE_BYTES_MAX`], smaller in tests only.
    txn_range_bytes: u64,
}

impl<'e> Mvcc<'e> {
    /// The store whose keys all start with `ns`.
    pub fn new(engine: &'e dyn Engine, ns: Vec<u8>) -> Self {
        Self {
            engine,
            ns,
            retention: replication::CHANGELOG_RETENTION_DEFAULT,
            compaction_step: COMPACTION_STEP_RECORDS,
            txn_range_bytes: TXN_RANGE_BYTES_MAX,
        }
    }

    #[cfg(test)]
    fn with_txn_range_bytes(mut self, bytes: u64) -> Self {
        self.txn_range_bytes = bytes;
        self
    }

    /// Visits at most `records` (at least 1) history records per compaction step.
    pub fn with_compaction_step(mut self, records: usize) -> Self {
        self.compaction_step = records.max(1);
        self
    }

    /// Keeps `revisions` (at least 1) revisions of changelog.
    pub fn with_retention(mut self, revisions: u64) -> Self {
        self.retention = revisions.max(1);
        self
    }

    fn key_with(&self, tag: u8, rest: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.ns.len() + 1 + rest.len());
        k.extend_from_slice(&self.ns);
        k.push(tag);
        k.extend_from_slice(rest);
        k
    }

    fn rev_key(&self) -> Vec<u8> {
        self.key_with(b'r', &[])
    }

    fn cursor_key(&self) -> Vec<u8> {
        self.key_with(b'p', &[])
    }

    fn latest_key(&self, key: &[u8]) -> Vec<u8> {
        self.key_with(b'l', key)
    }

    fn history_key(&self, key: &[u8], rev: u64) -> Vec<u8> {
        let mut k = self.key_with(b'h', &[]);
        push_escaped(&mut k, key);
        k.extend_from_slice(&rev.to_be_bytes());
        k
    }

    /// The live version of `key` at `rev` (its newest version at or below
    /// `rev`, unless that is a deletion).
    fn key_at(&self, key: &[u8], rev: u64) -> Result<Option<KeyValue>, EngineError> {
        let lo = self.history_key(key, 0);
        let hi = self.history_key(key, rev.saturating_add(1));
        let Some(pair) = self.engine.last(&lo, &hi)? else { return Ok(None) };
        let (k, v) = (pair.0, pair.1);
        let at: [u8; 8] = k[k.len().saturating_sub(8)..]
            .try_into()
            .map_err(|_| EngineError::Corrupt("history key: bad revision".into()))?;
        let version: Version = decode(&v, "history record")?;
        Ok(version.value.map(|value| KeyValue {
            key: key.to_vec(),
            create_revision: version.create_revision,
            mod_revision: u64::from_be_bytes(at),
            version: version.version,
            value,
            lease: version.lease,
        }))
    }

    /// Engine bounds of the history of keys in `[start, end)` (`None`: to the end).
    fn history_bounds(&self, start: &[u8], end: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
        let mut lo = self.key_with(b'h', &[]);
        push_escaped(&mut lo, start);
        let hi = match end {
            Some(end) => {
                let mut hi = self.key_with(b'h', &[]);
                push_escaped(&mut hi, end);
                hi
            }
            None => self.key_with(b'h' + 1, &[]),
        };
        (lo, hi)
    }

    /// Engine bounds of the latest records of keys in `[start, end)`.
    fn latest_bounds(&self, start: &[u8], end: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
        let lo = self.key_with(b'l', start);
        let hi = match end {
            Some(end) => self.key_with(b'l', end),
            None => self.key_with(b'l' + 1, &[]),
        };
        (lo, hi)
    }

    fn lease_key(&self, id: i64) -> Vec<u8> {
        self.key_with(b'e', &id.to_be_bytes())
    }

    fn attachment_key(&self, id: i64, key: &[u8]) -> Vec<u8> {
        let mut k = self.key_with(b'a', &id.to_be_bytes());
        k.extend_from_slice(key);
        k
    }

    /// Lease `id`, if granted and not revoked.
    pub fn lease(&self, id: i64) -> Result<Option<crate::lease::StoredLease>, EngineError> {
        match self.engine.get(&self.lease_key(id))? {
            Some(b) => Ok(Some(decode(&b, "lease record")?)),
            None => Ok(None),
        }
    }

    /// Every lease of the table, by id.
    pub fn leases(&self) -> Result<Vec<(i64, crate::lease::StoredLease)>, EngineError> {
        let (lo, hi) = (self.key_with(b'e', &[]), self.key_with(b'e' + 1, &[]));
        let mut out = Vec::new();
        let mut err = None;
        self.engine.scan(&lo, &hi, &mut |k, v| {
            let id = k[k.len().saturating_sub(8)..].try_into().map(i64::from_be_bytes);
            match (id, decode(v, "lease record")) {
                (Ok(id), Ok(l)) => {
                    out.push((id, l));
                    true
                }
                (Err(_), _) => {
                    err = Some(EngineError::Corrupt("lease key: bad id".into()));
                    false
                }
                (_, Err(e)) => {
                    err = Some(e);
                    false
                }
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The keys attached to lease `id`, in order.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, EngineError> {
        let lo = self.key_with(b'a', &id.to_be_bytes());
        let hi = prefix_end(&lo).unwrap_or_else(|| self.key_with(b'a' + 1, &[]));
        let skip = lo.len();
        let mut keys = Vec::new();
        self.engine.scan(&lo, &hi, &mut |k, _| {
            keys.push(k[skip..].to_vec());
            true
        })?;
        Ok(keys)
    }

    /// The id a grant without one gets next (before skipping taken ones).
    fn next_lease_id(&self) -> Result<i64, EngineError> {
        match self.engine.get(&self.key_with(b'i', &[]))? {
            Some(b) => decode(&b, "next lease id"),
            None => Ok(1),
        }
    }

    /// The table's revision state.
    pub fn rev_state(&self) -> Result<RevState, EngineError> {
        Self::decode_rev_state(self.engine.get(&self.rev_key())?)
    }

    /// The key of the revision state of the table under `ns`.
    pub fn rev_state_key(ns: &[u8]) -> Vec<u8> {
        let mut k = ns.to_vec();
        k.push(b'r');
        k
    }

    /// Decodes a stored revision state (`None`: a table never written).
    pub fn decode_rev_state(bytes: Option<Vec<u8>>) -> Result<RevState, EngineError> {
        match bytes {
            Some(bytes) => decode(&bytes, "revision state"),
            None => Ok(RevState::default()),
        }
    }

    fn latest(&self, key: &[u8]) -> Result<Option<Latest>, EngineError> {
        match self.engine.get(&self.latest_key(key))? {
            Some(bytes) => Ok(Some(decode(&bytes, "latest record")?)),
            None => Ok(None),
        }
    }

    /// Live key-values of `[start, end)` at the current revision, ascending.
    fn live_now(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<KeyValue>, EngineError> {
        Ok(self.live_now_bounded(start, end, usize::MAX)?.0)
    }

    /// The first `keep` live key-values of `[start, end)` now, ascending,
    /// and how many live keys the interval holds: keys past the first `keep`
    /// are counted without decoding their records.
    fn live_now_bounded(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        keep: usize,
    ) -> Result<(Vec<KeyValue>, u64), EngineError> {
        let (lo, hi) = self.latest_bounds(start, end);
        let prefix_len = self.ns.len() + 1;
        let mut out = Vec::new();
        let mut count = 0u64;
        let mut err = None;
        self.engine.scan(&lo, &hi, &mut |k, v| {
            count += 1;
            if out.len() >= keep {
                return true;
            }
            match decode::<Latest>(v, "latest record") {
                Ok(l) => {
                    out.push(l.to_kv(&k[prefix_len..]));
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok((out, count)),
        }
    }

    /// Live key-values of `[start, end)` as of revision `rev`, ascending.
    fn live_at(&self, start: &[u8], end: Option<&[u8]>, rev: u64) -> Result<Vec<KeyValue>, EngineError> {
        let mut out = Vec::new();
        self.visit_at(start, end, rev, &mut |kv| {
            out.push(kv);
            true
        })?;
        Ok(out)
    }

    /// One page of `[start, end)` as of revision `requested` (0: the
    /// current one): at most `max_keys` key-values and about `max_bytes`
    /// (at least one), in key order, read only as far as the page goes.
    /// Returns the page, whether key-values follow it, and the revision
    /// read (pages of one scan pass the first page's revision on).
    pub fn page(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        requested: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> Result<(Vec<KeyValue>, bool, u64), MvccError> {
        let state = self.rev_state()?;
        let rev = self.resolve_read_revision(state, requested)?;
        let (max_keys, max_bytes) = (max_keys.max(1), max_bytes.max(1));
        let mut out: Vec<KeyValue> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        self.visit_live(start, end, rev, state.current, &mut |kv| {
            if out.len() >= max_keys || bytes >= max_bytes {
                more = true;
                return false;
            }
            bytes += kv.key.len() + kv.value.len();
            out.push(kv);
            true
        })?;
        Ok((out, more, rev))
    }

    /// Visits the key-values of `[start, end)` live at revision `rev`, in
    /// ascending key order, one at a time, until `visit` returns false. A
    /// single key seeks its newest version at or below `rev` instead of
    /// scanning its whole history.
    fn visit_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: u64,
        visit: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), EngineError> {
        if let Some(e) = end {
            if e.len() == start.len() + 1 && e.starts_with(start) && e[start.len()] == 0 {
                if let Some(kv) = self.key_at(start, rev)? {
                    visit(kv);
                }
                return Ok(());
            }
        }
        let (lo, hi) = self.history_bounds(start, end);
        // The newest version at or below `rev` of the key being scanned.
        let mut pending: Option<(Vec<u8>, u64, Version)> = None;
        let mut stopped = false;
        let flush = |p: Option<(Vec<u8>, u64, Version)>, visit: &mut dyn FnMut(KeyValue) -> bool| -> bool {
            match p {
                Some((key, mod_revision, v)) => match v.value {
                    Some(value) => visit(KeyValue {
                        key,
                        create_revision: v.create_revision,
                        mod_revision,
                        version: v.version,
                        value,
                        lease: v.lease,
                    }),
                    None => true,
                },
                None => true,
            }
        };
        self.scan_history(&lo, &hi, rev, &mut |key, at, _, version| {
            if pending.as_ref().is_some_and(|(pk, _, _)| *pk != key) && !flush(pending.take(), visit) {
                stopped = true;
                return false;
            }
            if let Some(version) = version {
                pending = Some((key, at, version));
            }
            true
        })?;
        if !stopped {
            flush(pending, visit);
        }
        Ok(())
    }

    /// Scans the history records with engine keys in `[from, to)`, in order,
    /// giving `visit` each record's key, revision and engine key, and its
    /// decoded version when the revision is at or below `decode_upto`
    /// (`None` above it), until `visit` returns false. A record that does
    /// not decode ends the scan with its error.
    fn scan_history(
        &self,
        from: &[u8],
        to: &[u8],
        decode_upto: u64,
        visit: &mut HistoryVisitor<'_>,
    ) -> Result<(), EngineError> {
        let prefix_len = self.ns.len() + 1;
        let mut err = None;
        self.engine.scan(from, to, &mut |k, v| {
            let record = split_escaped(&k[prefix_len..]).and_then(|(key, at)| {
                let version = if at <= decode_upto { Some(decode::<Version>(v, "history record")?) } else { None };
                Ok((key, at, version))
            });
            match record {
                Ok((key, at, version)) => visit(key, at, k, version),
                Err(e) => {
                    err = Some(e);
                    false
                }
            }
        })?;
        err.map_or(Ok(()), Err)
    }

    /// Visits the live key-values of `[start, end)` now, ascending, until
    /// `visit` returns false.
    fn visit_now(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), EngineError> {
        let (lo, hi) = self.latest_bounds(start, end);
        let prefix_len = self.ns.len() + 1;
        let mut err = None;
        self.engine.scan(&lo, &hi, &mut |k, v| match decode::<Latest>(v, "latest record") {
            Ok(l) => visit(l.to_kv(&k[prefix_len..])),
            Err(e) => {
                err = Some(e);
                false
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Visits the key-values of `[start, end)` live at `rev` (the current
    /// revision or an earlier one).
    fn visit_live(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: u64,
        current: u64,
        visit: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), EngineError> {
        if rev == current {
            self.visit_now(start, end, visit)
        } else {
            self.visit_at(start, end, rev, visit)
        }
    }

    /// Checks that `requested` (0 = current) can be read, and resolves it.
    fn resolve_read_revision(&self, state: RevState, requested: u64) -> Result<u64, KvError> {
        if requested == 0 {
            return Ok(state.current);
        }
        if requested > state.current {
            return Err(KvError::FutureRevision { requested, current: state.current });
        }
        if requested < state.compacted {
            crate::probe!(ReadBelowCompactionRefused);
            return Err(KvError::Compacted { requested, compacted: state.compacted });
        }
        if requested == state.compacted {
            crate::probe!(ReadAtCompactionRevision);
        }
        Ok(requested)
    }

    /// Serves a range read from the engine alone.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        self.range_within(req, u64::MAX)
    }

    /// A range read that holds at most about `max_bytes` of key-values in
    /// memory at any time, whatever the size of the range: only the
    /// key-values that can reach the answer are kept (the first `limit`, or
    /// the best `limit` by the sort order; the rest are only counted). An
    /// answer that would still exceed `max_bytes` is refused with
    /// [`KvError::ResponseTooLarge`] as soon as that is known.
    ///
    /// A read at the current revision is served from the latest versions,
    /// which an apply on another thread may change while they are read (the
    /// engine's reads are not one snapshot). So the revision is read again
    /// afterwards, seqlock-style: every apply that changes a key also moves
    /// the revision, so an unchanged revision means the answer is the table
    /// at it; a moved one means the read raced an apply, and it is served
    /// again from the history as of the revision read first, which later
    /// applies never change. (Found by the container fault tests: a node
    /// answered a key with mod revision 376 under a header revision of 375.)
    pub fn range_within(&self, req: &RangeRequest, max_bytes: u64) -> Result<RangeResponse, MvccError> {
        req.validate()?;
        let state = self.rev_state()?;
        let rev = self.resolve_read_revision(state, req.revision)?;
        let (start, end) = interval(&req.key, &req.range_end);
        if rev == state.current {
            let now = if let Some(keep) = keys_needed(req) {
                // Only the first keys can reach the answer: decode those and
                // merely count the rest (`limit = 1` or `count_only` over a
                // large table copies no other value).
                let (kvs, count) = self.live_now_bounded(&start, end.as_deref(), keep)?;
                within_limit(shape_range(req, kvs, count, state.current), max_bytes)
            } else {
                self.select(req, &start, end.as_deref(), rev, state.current, max_bytes)
            };
            if self.rev_state()?.current == state.current {
                return now;
            }
            crate::probe!(ReadRacedApply);
            return self.select(req, &start, end.as_deref(), rev, u64::MAX, max_bytes);
        }
        self.select(req, &start, end.as_deref(), rev, state.current, max_bytes)
    }

    /// The answer to `req` from the table as of `rev`: from the latest
    /// versions when `rev == current`, else from the history. The header
    /// revision is `rev` (the revision the read is at: the current one for
    /// a read of "now").
    fn select(
        &self,
        req: &RangeRequest,
        start: &[u8],
        end: Option<&[u8]>,
        rev: u64,
        current: u64,
        max_bytes: u64,
    ) -> Result<RangeResponse, MvccError> {
        let mut selection = Selection::new(req, max_bytes);
        let mut count = 0u64;
        self.visit_live(start, end, rev, current, &mut |kv| {
            count += 1;
            selection.offer(kv)
        })?;
        let header = if current == u64::MAX { rev } else { current };
        within_limit(shape_range(req, selection.finish()?, count, header), max_bytes)
    }

    /// A write transaction at the table's next revision. Nothing reaches the
    /// engine until the caller writes the batch returned by [`WriteTxn::finish`].
    pub fn begin(&self) -> Result<WriteTxn<'_, 'e>, EngineError> {
        let state = self.rev_state()?;
        Ok(WriteTxn {
            store: self,
            state,
            overlay: BTreeMap::new(),
            writes: Vec::new(),
            batch: WriteBatch::new(),
            compacted: false,
        })
    }

    /// Visits every raw engine pair of this table (for snapshots and hashing).
    pub fn scan_raw(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        let lo = self.ns.clone();
        match prefix_end(&self.ns) {
            Some(hi) => self.engine.scan(&lo, &hi, visit),
            None => Err(EngineError::Backend("table namespace has no upper bound".into())),
        }
    }

    /// The compaction whose history is still being removed, if any.
    pub fn compaction_pending(&self) -> Result<Option<u64>, EngineError> {
        Ok(self.compaction_cursor()?.map(|c| c.revision))
    }

    fn compaction_cursor(&self) -> Result<Option<CompactionCursor>, EngineError> {
        match self.engine.get(&self.cursor_key())? {
            Some(bytes) => Ok(Some(decode(&bytes, "compaction cursor")?)),
            None => Ok(None),
        }
    }

    /// The next step of removing compacted history: the batch to write, and
    /// whether steps remain. Nothing to do gives an empty batch and `false`.
    pub fn compaction_step(&self) -> Result<(WriteBatch, bool), EngineError> {
        let mut batch = WriteBatch::new();
        let more = match self.compaction_cursor()? {
            Some(cursor) => self.compact_into(&mut batch, cursor)?,
            None => false,
        };
        Ok((batch, more))
    }

    /// Removes, into `batch`, the history `cursor`'s compaction made
    /// unreadable, visiting at most [`Mvcc::with_compaction_step`] records
    /// from where the cursor stands: every version older than a key's newest
    /// one at or below the compaction revision, and that one too if it is a
    /// tombstone. Writes the advanced cursor (or removes it when done) and
    /// returns whether steps remain.
    fn compact_into(&self, batch: &mut WriteBatch, mut cursor: CompactionCursor) -> Result<bool, EngineError> {
        let (lo, hi) = self.history_bounds(&[], None);
        let from = if cursor.after.is_empty() {
            lo
        } else {
            let mut k = cursor.after.clone();
            k.push(0);
            k
        };
        let revision = cursor.revision;
        let budget = self.compaction_step;
        if crate::canary::active(crate::canary::Canary::CompactionStepDropsVersion) {
            // The canary takes a step boundary for the end of the key it
            // stopped inside, and drops the newest version it carried.
            if let Some((_, ek, _)) = cursor.newest.take() {
                batch.delete(ek);
            }
        }
        if !cursor.after.is_empty() {
            crate::probe!(CompactionStepResumed);
        }
        let mut visited = 0usize;
        let mut stopped = false;
        self.scan_history(&from, &hi, revision, &mut |key, at, k, version| {
            if cursor.newest.as_ref().is_some_and(|(nk, _, _)| *nk != key) {
                if let Some((_, ek, true)) = cursor.newest.take() {
                    crate::probe!(CompactionRemovedTombstone);
                    batch.delete(ek);
                }
                cursor.newest = None;
            }
            if at > revision && cursor.newest.as_ref().is_some_and(|(_, ek, tomb)| !tomb && revision_of(ek) < revision)
            {
                crate::probe!(CompactionBetweenVersions);
            }
            if at == revision {
                crate::probe!(CompactionAtAVersion);
            }
            if let Some(version) = version {
                let tomb = version.value.is_none();
                if let Some((_, ek, _)) = cursor.newest.replace((key, k.to_vec(), tomb)) {
                    batch.delete(ek);
                }
            }
            visited += 1;
            if visited >= budget {
                cursor.after = k.to_vec();
                stopped = true;
                return false;
            }
            true
        })?;
        if stopped {
            batch.put(self.cursor_key(), encode(&cursor));
            return Ok(true);
        }
        if let Some((_, ek, true)) = cursor.newest {
            crate::probe!(CompactionRemovedTombstone);
            batch.delete(ek);
        }
        batch.delete(self.cursor_key());
        Ok(false)
    }

    /// A 32-bit hash of the key-values live at `revision` (0: the current
    /// one), for etcd's HashKV: equal on replicas that agree. Returns the
    /// hash, the revision hashed and the compaction revision.
    pub fn hash_kv(&self, revision: u64) -> Result<(u32, u64, u64), MvccError> {
        let state = self.rev_state()?;
        let rev = self.resolve_read_revision(state, revision)?;
        let mut h = Fnv64::new();
        // One key-value in memory at a time, whatever the table's size.
        self.visit_live(&[], None, rev, state.current, &mut |kv| {
            h.write_bytes(&kv.key);
            h.write_u64(kv.create_revision);
            h.write_u64(kv.mod_revision);
            h.write_u64(kv.version);
            h.write_bytes(&kv.value);
            true
        })?;
        let x = h.finish();
        Ok(((x ^ (x >> 32)) as u32, rev, state.compacted))
    }

    /// A stable 64-bit digest (FNV-1a) of the live key-values and the current
    /// revision: equal digests mean equal readable state.
    pub fn state_digest(&self) -> Result<(u64, u64), EngineError> {
        let state = self.rev_state()?;
        let mut h = Fnv64::new();
        self.visit_now(&[], None, &mut |kv| {
            h.write_bytes(&kv.key);
            h.write_u64(kv.create_revision);
            h.write_u64(kv.mod_revision);
            h.write_u64(kv.version);
            h.write_bytes(&kv.value);
            true
        })?;
        Ok((state.current, h.finish()))
    }
}

/// FNV-1a, 64 bits: a stable hash (no random keys) for digests that are
/// printed and compared across runs.
#[derive(Debug, Clone)]
pub struct Fnv64(u64);

impl Fnv64 {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// Length-prefixed, so that ("ab","c") and ("a","bc") differ.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.write_u64(bytes.len() as u64);
        self.write(bytes);
    }
    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
    /// Continues a hash whose state so far is `state` (a [`Fnv64::finish`]).
    pub fn resume(state: u64) -> Self {
        Self(state)
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

fn sort_key_cmp(target: SortTarget, a: &KeyValue, b: &KeyValue) -> std::cmp::Ordering {
    match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    }
}

/// How many live keys, in ascending key order, a range needs to see to
/// answer (`None`: all of them). With no filter and key order (no sort
/// order, or ascending by key), only the first `limit + 1` can matter
/// (the extra one tells `more`); `count_only` needs none.
fn keys_needed(req: &RangeRequest) -> Option<usize> {
    if req.count_only {
        return Some(0);
    }
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let key_order = req.sort_order == SortOrder::None
        || (req.sort_order == SortOrder::Ascend && req.sort_target == SortTarget::Key)
        || (crate::canary::active(crate::canary::Canary::LimitBeforeSort) && req.sort_target == SortTarget::Key);
    if filtered || !key_order || req.limit == 0 {
        return None;
    }
    usize::try_from(req.limit.saturating_add(1)).ok()
}

/// The answer, unless it exceeds `max_bytes`.
fn within_limit(r: RangeResponse, max_bytes: u64) -> Result<RangeResponse, MvccError> {
    let bytes = crate::kv::response_bytes(&r.kvs);
    if bytes > max_bytes {
        return Err(KvError::ResponseTooLarge { bytes, keys: r.kvs.len() as u64, limit: max_bytes }.into());
    }
    Ok(r)
}

/// The key-values of a range that can reach its answer, chosen as the
/// range is scanned, with the bytes they hold bounded (see
/// [`Mvcc::range_within`]). What it keeps, given to [`shape_range`], gives
/// the same answer as the whole range would.
struct Selection<'r> {
    req: &'r RangeRequest,
    keep: Keep,
    filtered: bool,
    kept: Vec<KeyValue>,
    bytes: u64,
    /// The largest key-value kept so far (one kept beyond `limit` tells
    /// `more` and is not in the answer).
    largest: u64,
    max_bytes: u64,
    too_large: bool,
}

enum Keep {
    /// The first `n` in key order.
    First(usize),
    /// The best `n` by the request's sort order (ties: ascending key).
    Best(usize),
    /// Every key-value (no limit).
    All,
}

impl<'r> Selection<'r> {
    fn new(req: &'r RangeRequest, max_bytes: u64) -> Self {
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        let sorted = req.sort_order == SortOrder::Descend || req.sort_target != SortTarget::Key;
        let limit_plus_one = usize::try_from(req.limit.saturating_add(1)).unwrap_or(usize::MAX);
        let keep = match keys_needed(req) {
            Some(n) => Keep::First(n),
            None if req.limit > 0 && !sorted => Keep::First(limit_plus_one),
            None if req.limit > 0 => Keep::Best(limit_plus_one),
            None => Keep::All,
        };
        Self { req, keep, filtered, kept: Vec::new(), bytes: 0, largest: 0, max_bytes, too_large: false }
    }

    fn size(kv: &KeyValue) -> u64 {
        (kv.key.len() + kv.value.len() + 32) as u64
    }

    /// Takes the next key-value of the range (ascending key order); false
    /// once the answer is known to be too large (the scan can stop).
    fn offer(&mut self, mut kv: KeyValue) -> bool {
        let r = self.req;
        let within = |v: u64, min: u64, max: u64| (min == 0 || v >= min) && (max == 0 || v <= max);
        if self.filtered
            && !(within(kv.mod_revision, r.min_mod_revision, r.max_mod_revision)
                && within(kv.create_revision, r.min_create_revision, r.max_create_revision))
        {
            return true;
        }
        if r.keys_only && r.sort_target != SortTarget::Value {
            kv.value.clear();
        }
        match self.keep {
            Keep::First(n) if self.kept.len() >= n => return true,
            _ => {}
        }
        let size = Self::size(&kv);
        self.bytes += size;
        self.largest = self.largest.max(size);
        self.kept.push(kv);
        if let Keep::Best(n) = self.keep {
            if self.kept.len() >= n.saturating_mul(2).max(n + 1) || self.bytes > self.max_bytes {
                self.prune(n);
            }
        }
        // What the answer holds at least: with a limit, one key-value kept
        // may be the extra one beyond it.
        let at_least = match self.keep {
            Keep::All => self.bytes,
            _ => self.bytes.saturating_sub(self.largest),
        };
        if at_least > self.max_bytes {
            self.too_large = true;
            return false;
        }
        true
    }

    /// Keeps the best `n` by the sort order.
    fn prune(&mut self, n: usize) {
        let r = self.req;
        let descend = r.sort_order == SortOrder::Descend;
        self.kept.sort_by(|a, b| {
            let o = if descend { sort_key_cmp(r.sort_target, b, a) } else { sort_key_cmp(r.sort_target, a, b) };
            o.then_with(|| a.key.cmp(&b.key))
        });
        self.kept.truncate(n);
        self.kept.sort_by(|a, b| a.key.cmp(&b.key));
        self.bytes = self.kept.iter().map(Self::size).sum();
    }

    fn finish(mut self) -> Result<Vec<KeyValue>, KvError> {
        if self.too_large {
            return Err(KvError::ResponseTooLarge {
                bytes: self.bytes,
                keys: self.kept.len() as u64,
                limit: self.max_bytes,
            });
        }
        if let Keep::Best(n) = self.keep {
            self.prune(n);
        }
        Ok(self.kept)
    }
}

/// Applies sort, limit, keys-only and count-only to the live key-values of a
/// range (given in ascending key order). `kvs` may hold only the first keys
/// of the range when [`keys_needed`] says the rest cannot matter; `count` is
/// the number of live keys in the whole range. Ties keep ascending key order.
pub fn shape_range(req: &RangeRequest, mut kvs: Vec<KeyValue>, count: u64, current: u64) -> RangeResponse {
    if req.count_only {
        return RangeResponse { revision: current, kvs: Vec::new(), more: false, count };
    }
    // etcd 3.4 applies `limit` (plus one, to learn `more`) before sorting
    // when no sort order is given and no filter is set, so a sort by
    // another target then orders only the first keys; Armada does the same.
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    if req.sort_order == SortOrder::None && !filtered && req.limit > 0 {
        kvs.truncate(req.limit.saturating_add(1) as usize);
    }
    let within = |v: u64, min: u64, max: u64| (min == 0 || v >= min) && (max == 0 || v <= max);
    kvs.retain(|kv| {
        within(kv.mod_revision, req.min_mod_revision, req.max_mod_revision)
            && within(kv.create_revision, req.min_create_revision, req.max_create_revision)
    });
    let order = match (req.sort_order, req.sort_target) {
        (SortOrder::None, SortTarget::Key) => SortOrder::Ascend,
        (SortOrder::None, _) => SortOrder::Ascend,
        (o, _) => o,
    };
    match order {
        SortOrder::Descend => kvs.sort_by(|a, b| sort_key_cmp(req.sort_target, b, a)),
        _ if req.sort_target != SortTarget::Key => kvs.sort_by(|a, b| sort_key_cmp(req.sort_target, a, b)),
        _ => {}
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() as u64 > req.limit {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse { revision: current, kvs, more, count }
}

/// A write transaction in progress: reads see its own earlier writes.
pub struct WriteTxn<'s, 'e> {
    store: &'s Mvcc<'e>,
    state: RevState,
    /// Keys written by this transaction: `None` = deleted.
    overlay: BTreeMap<Vec<u8>, Option<Latest>>,
    /// Every write in the order the transaction made it (its changelog
    /// entry: a watcher gets one event per write, in this order, as etcd
    /// sends them; a key written twice, by a put and then a delete "from
    /// key", has two).
    writes: Vec<(Vec<u8>, Option<Latest>)>,
    batch: WriteBatch,
    /// A compaction changed `state.compacted`.
    compacted: bool,
}

impl WriteTxn<'_, '_> {
    /// The revision this transaction writes at.
    fn write_revision(&self) -> u64 {
        if crate::canary::active(crate::canary::Canary::ReuseRevision) {
            return self.state.current;
        }
        self.state.current + 1
    }

    fn changed(&self) -> bool {
        !self.overlay.is_empty()
    }

    /// The revision a reader sees: the write revision once anything changed.
    fn visible_revision(&self) -> u64 {
        if self.changed() {
            self.write_revision()
        } else {
            self.state.current
        }
    }

    fn latest(&self, key: &[u8]) -> Result<Option<Latest>, EngineError> {
        match self.overlay.get(key) {
            Some(l) => Ok(l.clone()),
            None => self.store.latest(key),
        }
    }

    /// Visits the live key-values of `[start, end)` as this transaction sees
    /// them (its own writes over the table's), in key order, until `visit`
    /// returns false.
    fn visit_now(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), EngineError> {
        if end.is_some_and(|e| e <= start) {
            return Ok(());
        }
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let mut written = self.overlay.range::<[u8], _>((Bound::Included(start), upper)).peekable();
        let mut go = true;
        self.store.visit_now(start, end, &mut |kv| {
            // This transaction's writes to keys before this one come first.
            while let Some((k, l)) = written.next_if(|(k, _)| k.as_slice() < kv.key.as_slice()) {
                if let Some(l) = l {
                    if !visit(l.to_kv(k)) {
                        go = false;
                        return false;
                    }
                }
            }
            go = match written.next_if(|(k, _)| k.as_slice() == kv.key.as_slice()) {
                Some((k, Some(l))) => visit(l.to_kv(k)),
                Some((_, None)) => true,
                None => visit(kv),
            };
            go
        })?;
        if go {
            for (k, l) in written {
                if let Some(l) = l {
                    if !visit(l.to_kv(k)) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that a range inside the transaction can be served, before any
    /// operation of the transaction runs.
    pub fn check_range(&self, req: &RangeRequest) -> Result<(), KvError> {
        req.validate()?;
        self.store.resolve_read_revision(self.state, req.revision).map(|_| ())
    }

    /// A range inside the transaction, holding at most about
    /// [`TXN_RANGE_BYTES_MAX`] in memory whatever the range's size (a
    /// larger answer refuses the transaction on every replica alike).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        req.validate()?;
        let rev = self.store.resolve_read_revision(self.state, req.revision)?;
        let (start, end) = interval(&req.key, &req.range_end);
        let limit = self.store.txn_range_bytes;
        let mut selection = Selection::new(req, limit);
        let mut count = 0u64;
        let mut offer = |kv: KeyValue| {
            count += 1;
            selection.offer(kv)
        };
        // Only a read at "latest" sees this transaction's own writes; an
        // explicit revision reads the table as it was at that revision.
        if req.revision == 0 {
            self.visit_now(&start, end.as_deref(), &mut offer)?;
        } else if rev == self.state.current {
            self.store.visit_now(&start, end.as_deref(), &mut offer)?;
        } else {
            self.store.visit_at(&start, end.as_deref(), rev, &mut offer)?;
        }
        let kvs = selection.finish()?;
        within_limit(shape_range(req, kvs, count, self.visible_revision()), limit)
    }

    /// Writes the key's next version (`None`: a deletion); `prev_lease` is
    /// the lease of the version it replaces, whose attachment moves to the
    /// new one's.
    fn record(&mut self, key: &[u8], latest: Option<Latest>, prev_lease: i64) {
        let rev = self.write_revision();
        let version = match &latest {
            Some(l) => Version {
                create_revision: l.create_revision,
                version: l.version,
                value: Some(l.value.clone()),
                lease: l.lease,
            },
            None => Version { create_revision: 0, version: 0, value: None, lease: 0 },
        };
        let lease = latest.as_ref().map_or(0, |l| l.lease);
        if lease != prev_lease {
            if prev_lease != 0 {
                self.batch.delete(self.store.attachment_key(prev_lease, key));
            }
            if lease != 0 {
                self.batch.put(self.store.attachment_key(lease, key), Vec::new());
            }
        }
        self.batch.put(self.store.history_key(key, rev), encode(&version));
        match &latest {
            Some(l) => self.batch.put(self.store.latest_key(key), encode(l)),
            None => self.batch.delete(self.store.latest_key(key)),
        }
        self.writes.push((key.to_vec(), latest.clone()));
        self.overlay.insert(key.to_vec(), latest);
    }

    pub fn put(&mut self, req: &PutRequest) -> Result<PutResponse, MvccError> {
        req.validate()?;
        // etcd's order for a put: the lease, then the key to keep.
        if req.lease != 0 && self.store.lease(req.lease)?.is_none() {
            return Err(KvError::LeaseNotFound { id: req.lease }.into());
        }
        let prev = self.latest(&req.key)?;
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(KvError::KeyNotFound.into());
        }
        let rev = self.write_revision();
        let prev_lease = prev.as_ref().map_or(0, |p| p.lease);
        let next = Latest {
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: match (&prev, req.ignore_value) {
                (Some(p), true) => p.value.clone(),
                _ => req.value.clone(),
            },
            lease: if req.ignore_lease { prev_lease } else { req.lease },
        };
        self.record(&req.key, Some(next), prev_lease);
        let prev_kv = if req.prev_kv { prev.map(|p| p.to_kv(&req.key)) } else { None };
        Ok(PutResponse { revision: rev, prev_kv })
    }

    pub fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse, MvccError> {
        req.validate()?;
        let (start, end) = interval(&req.key, &req.range_end);
        // The keys to delete (and their values only if asked for): the
        // batch holds a tombstone for each of them anyway.
        let mut doomed = Vec::new();
        self.visit_now(&start, end.as_deref(), &mut |mut kv| {
            if !req.prev_kv {
                kv.value = Vec::new();
            }
            doomed.push(kv);
            true
        })?;
        if doomed.len() >= 3 {
            crate::probe!(RangeDeleteMany);
        }
        for kv in &doomed {
            self.record(&kv.key, None, kv.lease);
        }
        if doomed.is_empty() && crate::canary::active(crate::canary::Canary::EmptyDeleteTakesRevision) {
            self.record(&req.key, None, 0);
        }
        Ok(DeleteRangeResponse {
            revision: self.visible_revision(),
            deleted: doomed.len() as u64,
            prev_kvs: if req.prev_kv { doomed } else { Vec::new() },
        })
    }

    /// Evaluates one compare against the transaction's view (etcd's rules: a
    /// value compare on a missing key is false; other targets compare a
    /// missing key as zero).
    pub fn compare(&self, c: &Compare) -> Result<bool, MvccError> {
        let kvs = if crate::canary::active(crate::canary::Canary::CompareStaleRevision)
            && matches!(c.target, CompareTarget::Value(_))
        {
            let (start, end) = interval(&c.key, &c.range_end);
            self.store.live_at(&start, end.as_deref(), self.state.current.saturating_sub(1))?
        } else if c.range_end.is_empty() {
            self.latest(&c.key)?.map(|l| l.to_kv(&c.key)).into_iter().collect()
        } else {
            // A range compare holds when every key in the range satisfies it:
            // checked key by key, stopping at the first that does not.
            let (start, end) = interval(&c.key, &c.range_end);
            let (mut seen, mut holds) = (false, true);
            self.visit_now(&start, end.as_deref(), &mut |kv| {
                seen = true;
                holds = compare_one(c, &kv);
                holds
            })?;
            if seen {
                probe_compare(c, holds);
                return Ok(holds);
            }
            Vec::new()
        };
        let holds = if kvs.is_empty() {
            !matches!(c.target, CompareTarget::Value(_)) && compare_one(c, &KeyValue::default())
        } else {
            kvs.iter().all(|kv| compare_one(c, kv))
        };
        probe_compare(c, holds);
        Ok(holds)
    }

    /// Runs a validated transaction.
    pub fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, MvccError> {
        req.validate()?;
        let mut succeeded = true;
        for c in &req.compare {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &req.success } else { &req.failure };
        // etcd checks the branch's puts first (each: the key to keep, then
        // the lease, against the table before the transaction), then its
        // ranges, and only then runs anything; so does this.
        for op in ops {
            if let RequestOp::Put(p) = op {
                if (p.ignore_value || p.ignore_lease) && self.latest(&p.key)?.is_none() {
                    return Err(KvError::KeyNotFound.into());
                }
                if p.lease != 0 && self.store.lease(p.lease)?.is_none() {
                    return Err(KvError::LeaseNotFound { id: p.lease }.into());
                }
            }
        }
        for op in ops {
            if let RequestOp::Range(r) = op {
                self.check_range(r)?;
            }
        }
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(r)?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete_range(d)?),
            });
        }
        // Each response carries the revision visible when it ran (etcd's
        // rule): a range before the first write sees the old revision.
        Ok(TxnResponse { revision: self.visible_revision(), succeeded, responses })
    }

    /// Compacts history below `revision`: reads below it are refused from
    /// now on, and its first removal step runs (see
    /// [`Mvcc::compaction_step`] for the rest; a compaction still being
    /// removed is superseded, since removing below `revision` covers it).
    /// Takes no revision of its own.
    pub fn compact(&mut self, revision: u64) -> Result<CompactResponse, MvccError> {
        if revision > self.state.current {
            return Err(KvError::FutureRevision { requested: revision, current: self.state.current }.into());
        }
        if revision <= self.state.compacted {
            return Err(KvError::Compacted { requested: revision, compacted: self.state.compacted }.into());
        }
        let cursor = CompactionCursor { revision, after: Vec::new(), newest: None };
        self.store.compact_into(&mut self.batch, cursor)?;
        self.state.compacted = revision;
        self.compacted = true;
        Ok(CompactResponse { revision: self.state.current })
    }

    /// Grants lease `id` (0: the next free id) for `ttl` seconds (at least
    /// [`crate::lease::LEASE_TTL_MIN`]). Takes no revision.
    pub fn lease_grant(&mut self, id: i64, ttl: i64) -> Result<crate::lease::GrantResponse, MvccError> {
        use crate::lease::{StoredLease, LEASE_TTL_MAX, LEASE_TTL_MIN};
        if ttl > LEASE_TTL_MAX {
            return Err(KvError::LeaseTtlTooLarge { ttl }.into());
        }
        let ttl = ttl.max(LEASE_TTL_MIN);
        let id = if id != 0 {
            if self.store.lease(id)?.is_some() {
                return Err(KvError::LeaseExists { id }.into());
            }
            id
        } else {
            let mut next = self.store.next_lease_id()?;
            while self.store.lease(next)?.is_some() {
                next = next.checked_add(1).unwrap_or(1);
            }
            self.batch.put(self.store.key_with(b'i', &[]), encode(&next.checked_add(1).unwrap_or(1)));
            next
        };
        self.batch.put(self.store.lease_key(id), encode(&StoredLease { ttl, remaining_ms: 0 }));
        Ok(crate::lease::GrantResponse { id, ttl, revision: self.state.current })
    }

    /// Revokes lease `id`: deletes every key attached to it (in one
    /// revision, if there is any) and the lease.
    pub fn lease_revoke(&mut self, id: i64) -> Result<crate::lease::RevokeResponse, MvccError> {
        if self.store.lease(id)?.is_none() {
            return Err(KvError::LeaseNotFound { id }.into());
        }
        for key in self.store.lease_keys(id)? {
            // The index is kept in the same batches as the keys; a key whose
            // latest version is on another lease would be a corrupt index,
            // and is left alone.
            if let Some(l) = self.latest(&key)? {
                if l.lease == id {
                    self.record(&key, None, id);
                }
            }
        }
        self.batch.delete(self.store.lease_key(id));
        Ok(crate::lease::RevokeResponse { revision: self.visible_revision() })
    }

    /// Records checkpointed remaining times (0 clears one) of the leases
    /// that exist.
    pub fn lease_checkpoint(&mut self, checkpoints: &[(i64, u64)]) -> Result<(), MvccError> {
        for &(id, remaining_ms) in checkpoints {
            if let Some(mut l) = self.store.lease(id)? {
                l.remaining_ms = remaining_ms;
                self.batch.put(self.store.lease_key(id), encode(&l));
            }
        }
        Ok(())
    }

    /// Ends the transaction: returns the batch to write (empty if nothing
    /// changed) and the table's revision after it.
    pub fn finish(mut self) -> (WriteBatch, RevState) {
        let mut state = self.state;
        if self.changed() {
            state.current = self.write_revision();
            let mutations: Vec<replication::Mutation> = self
                .writes
                .iter()
                .map(|(key, latest)| replication::Mutation {
                    key: key.clone(),
                    value: latest.as_ref().map(|l| l.value.clone()),
                    create_revision: latest.as_ref().map_or(0, |l| l.create_revision),
                    version: latest.as_ref().map_or(0, |l| l.version),
                    lease: latest.as_ref().map_or(0, |l| l.lease),
                })
                .collect();
            self.batch.put(self.store.changelog_key(state.current), encode(&mutations));
            if state.current > self.store.retention {
                crate::probe!(ChangelogTrimmed);
                self.batch.delete(self.store.changelog_key(state.current - self.store.retention));
            }
        }
        if self.changed() || self.compacted {
            self.batch.put(self.store.rev_key(), encode(&state));
        }
        (self.batch, state)
    }
}

fn probe_compare(c: &Compare, holds: bool) {
    use crate::probe::Probe;
    crate::probe::hit(match (&c.target, holds) {
        (CompareTarget::Value(_), true) => Probe::CompareValueTrue,
        (CompareTarget::Value(_), false) => Probe::CompareValueFalse,
        (CompareTarget::Version(_), true) => Probe::CompareVersionTrue,
        (CompareTarget::Version(_), false) => Probe::CompareVersionFalse,
        (CompareTarget::CreateRevision(_), true) => Probe::CompareCreateTrue,
        (CompareTarget::CreateRevision(_), false) => Probe::CompareCreateFalse,
        (CompareTarget::ModRevision(_), true) => Probe::CompareModTrue,
        (CompareTarget::ModRevision(_), false) => Probe::CompareModFalse,
        // The simulated workload compares no lease.
        (CompareTarget::Lease(_), _) => return,
    });
}

fn compare_one(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match &c.target {
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
        CompareTarget::Version(v) => (kv.version as i64).cmp(v),
        CompareTarget::CreateRevision(v) => (kv.create_revision as i64).cmp(v),
        CompareTarget::ModRevision(v) => {
            let compared = if crate::canary::active(crate::canary::Canary::CompareModAsCreate) {
                kv.create_revision
            } else {
                kv.mod_revision
            };
            (compared as i64).cmp(v)
        }
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.op {
        CompareOp::Equal => ord.is_eq(),
        CompareOp::NotEqual => ord.is_ne(),
        CompareOp::Greater => ord.is_gt(),
        CompareOp::Less => ord.is_lt(),
    }
}

pub mod replication;

#[cfg(test)]
pub(crate) mod fuzz_tests;

#[cfg(test)]
mod tests;
