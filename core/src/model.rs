//! The reference model of a table's KV semantics (etcd v3's): every key's
//! whole history in a map, with nothing shared with [`crate::mvcc`] but the
//! request and response types. The MVCC store's property tests compare it
//! with the store answer by answer, and the simulator's M1 check runs it
//! over each table's committed log, so every reply a replica gives (the
//! revision it creates or not, `prev_kv`, deleted counts, each compare's
//! outcome) and every read a client gets (values, create and mod revisions,
//! versions, `count`, `more`) is checked against it.
//!
//! Slow on purpose (every read scans the key map): for tests only.

use std::collections::BTreeMap;

use crate::command::{TableCommand, TableReply};
use crate::kv::{
    in_interval, CompactResponse, Compare, CompareOp, CompareTarget, DeleteRangeResponse, KeyValue, KvError,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, SortOrder, SortTarget, TxnRequest, TxnResponse,
    REVISION_INITIAL,
};

/// One key's history: (revision, `None` = deleted | `Some((create, version, value, lease))`).
pub type KeyHistory = Vec<(u64, Option<(u64, u64, Vec<u8>, i64)>)>;

/// A table as the model sees it: full histories, and the compaction
/// revision (which limits reads, not what the model keeps).
#[derive(Debug, Clone)]
pub struct KvModel {
    hist: BTreeMap<Vec<u8>, KeyHistory>,
    current: u64,
    compacted: u64,
    /// Granted leases: id -> TTL.
    leases: BTreeMap<i64, i64>,
    /// Where a grant without an id starts looking.
    next_lease: i64,
}

impl Default for KvModel {
    fn default() -> Self {
        Self::new()
    }
}

impl KvModel {
    pub fn new() -> Self {
        Self { hist: BTreeMap::new(), current: REVISION_INITIAL, compacted: 0, leases: BTreeMap::new(), next_lease: 1 }
    }

    /// The table's revision.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// The compaction revision (0: never compacted).
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// The version of `key` live at revision `rev`, if any.
    pub fn get_at(&self, key: &[u8], rev: u64) -> Option<KeyValue> {
        let h = self.hist.get(key)?;
        let (mod_revision, v) = h.iter().rev().find(|(r, _)| *r <= rev)?;
        let (create_revision, version, value, lease) = v.clone()?;
        Some(KeyValue { key: key.to_vec(), create_revision, mod_revision: *mod_revision, version, value, lease })
    }

    /// Every key of the interval live at `rev`, in key order.
    pub fn live(&self, key: &[u8], end: &[u8], rev: u64) -> Vec<KeyValue> {
        self.hist.keys().filter(|k| in_interval(k, key, end)).filter_map(|k| self.get_at(k, rev)).collect()
    }

    fn check_rev(&self, requested: u64) -> Result<u64, KvError> {
        if requested == 0 {
            Ok(self.current)
        } else if requested > self.current {
            Err(KvError::FutureRevision { requested, current: self.current })
        } else if requested < self.compacted {
            Err(KvError::Compacted { requested, compacted: self.compacted })
        } else {
            Ok(requested)
        }
    }

    /// The answer to `r` as the table stood at revision `at` (a client's
    /// read whose header said `at`; `r.revision`, if set, is the revision
    /// read). The header revision is set to `at`.
    pub fn range_at(&self, r: &RangeRequest, at: u64) -> RangeResponse {
        let read_at = if r.revision == 0 { at } else { r.revision };
        let mut resp = self.answer(r, read_at);
        resp.revision = at;
        resp
    }

    /// The kvs, `count` and `more` of `r` read at `read_at` (revision 0 in
    /// the answer).
    fn answer(&self, r: &RangeRequest, read_at: u64) -> RangeResponse {
        let mut kvs = self.live(&r.key, &r.range_end, read_at);
        let count = kvs.len() as u64;
        if r.count_only {
            return RangeResponse { revision: 0, kvs: vec![], more: false, count };
        }
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        if r.sort_order == SortOrder::None && !filtered && r.limit > 0 {
            kvs.truncate(r.limit as usize + 1);
        }
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        });
        let key_of = |kv: &KeyValue| -> (Vec<u8>, u64) {
            match r.sort_target {
                SortTarget::Key => (kv.key.clone(), 0),
                SortTarget::Version => (vec![], kv.version),
                SortTarget::Create => (vec![], kv.create_revision),
                SortTarget::Mod => (vec![], kv.mod_revision),
                SortTarget::Value => (kv.value.clone(), 0),
            }
        };
        // Stable sorts over key order: ties stay in key order either way.
        let mut sorted = kvs;
        match r.sort_order {
            SortOrder::Descend => sorted.sort_by_key(|kv| std::cmp::Reverse(key_of(kv))),
            _ => sorted.sort_by_key(key_of),
        }
        let more = r.limit > 0 && sorted.len() as u64 > r.limit;
        if more {
            sorted.truncate(r.limit as usize);
        }
        if r.keys_only {
            sorted.iter_mut().for_each(|kv| kv.value.clear());
        }
        RangeResponse { revision: 0, kvs: sorted, more, count }
    }

    /// A range read now (the store's `range`).
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        r.validate()?;
        let rev = self.check_rev(r.revision)?;
        let mut resp = self.answer(r, rev);
        resp.revision = self.current;
        Ok(resp)
    }

    fn write(&mut self, key: &[u8], v: Option<(Vec<u8>, i64)>) {
        let rev = self.current + 1;
        let prev = self.get_at(key, rev);
        let rec = v.map(|(value, lease)| match &prev {
            Some(p) => (p.create_revision, p.version + 1, value, lease),
            None => (rev, 1, value, lease),
        });
        let h = self.hist.entry(key.to_vec()).or_default();
        if h.last().is_some_and(|(r, _)| *r == rev) {
            h.pop();
        }
        h.push((rev, rec));
    }

    /// etcd's compare: over every live key of the interval; with none, a
    /// value compare fails and the others compare zeros.
    fn compare(&self, c: &Compare) -> bool {
        let kvs = self.live(&c.key, &c.range_end, self.current + 1);
        if kvs.is_empty() {
            if matches!(c.target, CompareTarget::Value(_)) {
                return false;
            }
            return holds(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| holds(c, kv))
    }

    /// Compacts at `rev`.
    pub fn compact(&mut self, rev: u64) -> Result<CompactResponse, KvError> {
        if rev > self.current {
            return Err(KvError::FutureRevision { requested: rev, current: self.current });
        }
        if rev <= self.compacted {
            return Err(KvError::Compacted { requested: rev, compacted: self.compacted });
        }
        self.compacted = rev;
        Ok(CompactResponse { revision: self.current })
    }

    /// Runs a transaction; on a refusal nothing changes.
    pub fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        // Every refusal is found before anything changes: validation covers
        // every operation of both branches; a range's revision is checked
        // against the revision before the transaction.
        t.validate()?;
        let succeeded = t.compare.iter().all(|c| self.compare(c));
        let ops = if succeeded { &t.success } else { &t.failure };
        // etcd's order: the puts' own checks against the table before the
        // transaction (the key to keep, then the lease), then the ranges'.
        for o in ops {
            if let RequestOp::Put(p) = o {
                if (p.ignore_value || p.ignore_lease) && self.get_at(&p.key, self.current).is_none() {
                    return Err(KvError::KeyNotFound);
                }
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(KvError::LeaseNotFound { id: p.lease });
                }
            }
        }
        for o in ops {
            if let RequestOp::Range(r) = o {
                self.check_rev(r.revision)?;
            }
        }
        // A put's own refusals (a missing lease, or a missing key to keep
        // the value or lease of), found with the keys' existence as the
        // operations before it leave them.
        let mut exists: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        for o in ops {
            match o {
                RequestOp::Put(p) => {
                    let live = match exists.get(&p.key) {
                        Some(e) => *e,
                        None => self.get_at(&p.key, self.current).is_some(),
                    };
                    if (p.ignore_value || p.ignore_lease) && !live {
                        return Err(KvError::KeyNotFound);
                    }
                    if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                        return Err(KvError::LeaseNotFound { id: p.lease });
                    }
                    exists.insert(p.key.clone(), true);
                }
                RequestOp::DeleteRange(d) => {
                    let mut keys: Vec<Vec<u8>> =
                        self.live(&d.key, &d.range_end, self.current).into_iter().map(|kv| kv.key).collect();
                    keys.extend(exists.keys().filter(|k| in_interval(k, &d.key, &d.range_end)).cloned());
                    for k in keys {
                        exists.insert(k, false);
                    }
                }
                RequestOp::Range(_) => {}
            }
        }
        let mut changed = false;
        let mut responses = vec![];
        for o in ops {
            responses.push(match o {
                RequestOp::Range(r) => {
                    let read_at = if r.revision == 0 && changed { self.current + 1 } else { r.revision };
                    let read_at = if read_at == 0 { self.current } else { read_at };
                    let mut resp = self.answer(r, read_at);
                    resp.revision = self.current + u64::from(changed);
                    ResponseOp::Range(resp)
                }
                RequestOp::Put(p) => {
                    let prev = self.get_at(&p.key, self.current + 1);
                    let value = match (&prev, p.ignore_value) {
                        (Some(kv), true) => kv.value.clone(),
                        _ => p.value.clone(),
                    };
                    let lease = match (&prev, p.ignore_lease) {
                        (Some(kv), true) => kv.lease,
                        _ => p.lease,
                    };
                    self.write(&p.key, Some((value, lease)));
                    changed = true;
                    ResponseOp::Put(PutResponse {
                        revision: self.current + 1,
                        prev_kv: if p.prev_kv { prev } else { None },
                    })
                }
                RequestOp::DeleteRange(d) => {
                    let doomed = self.live(&d.key, &d.range_end, self.current + 1);
                    for kv in &doomed {
                        self.write(&kv.key, None);
                        changed = true;
                    }
                    ResponseOp::DeleteRange(DeleteRangeResponse {
                        revision: self.current + u64::from(changed),
                        deleted: doomed.len() as u64,
                        prev_kvs: if d.prev_kv { doomed } else { vec![] },
                    })
                }
            });
        }
        if changed {
            self.current += 1;
        }
        Ok(TxnResponse { revision: self.current, succeeded, responses })
    }

    /// Grants a lease: a taken id is refused; id 0 takes the next free one.
    pub fn lease_grant(&mut self, id: i64, ttl: i64) -> Result<crate::lease::GrantResponse, KvError> {
        if ttl > crate::lease::LEASE_TTL_MAX {
            return Err(KvError::LeaseTtlTooLarge { ttl });
        }
        let ttl = ttl.max(crate::lease::LEASE_TTL_MIN);
        let id = if id == 0 {
            let mut next = self.next_lease;
            while self.leases.contains_key(&next) {
                next += 1;
            }
            self.next_lease = next + 1;
            next
        } else if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists { id });
        } else {
            id
        };
        self.leases.insert(id, ttl);
        Ok(crate::lease::GrantResponse { id, ttl, revision: self.current })
    }

    /// Revokes a lease: its live keys are deleted in one revision.
    pub fn lease_revoke(&mut self, id: i64) -> Result<crate::lease::RevokeResponse, KvError> {
        if self.leases.remove(&id).is_none() {
            return Err(KvError::LeaseNotFound { id });
        }
        let doomed: Vec<Vec<u8>> = self
            .hist
            .keys()
            .filter_map(|k| self.get_at(k, self.current))
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key)
            .collect();
        for k in &doomed {
            self.write(k, None);
        }
        if !doomed.is_empty() {
            self.current += 1;
        }
        Ok(crate::lease::RevokeResponse { revision: self.current })
    }

    /// Applies a committed table command as the state machine must, and
    /// returns the reply it must give; `None` for commands the model does
    /// not cover (follower-cluster replication, compaction steps, which
    /// change no key a client can read).
    pub fn apply(&mut self, cmd: &TableCommand) -> Option<Result<TableReply, KvError>> {
        let single = |r: Result<TxnResponse, KvError>| r.map(|t| t.responses.into_iter().next());
        Some(match cmd {
            TableCommand::Put(p) if p.lease != 0 && !self.leases.contains_key(&p.lease) && p.validate().is_ok() => {
                // A put on its own checks its lease first (etcd's order).
                Err(KvError::LeaseNotFound { id: p.lease })
            }
            TableCommand::Put(p) => {
                let t = TxnRequest { compare: vec![], success: vec![RequestOp::Put(p.clone())], failure: vec![] };
                single(self.txn(&t)).map(|r| match r {
                    Some(ResponseOp::Put(p)) => TableReply::Put(p),
                    _ => unreachable!("a put answers with a put"),
                })
            }
            TableCommand::DeleteRange(d) => {
                let t =
                    TxnRequest { compare: vec![], success: vec![RequestOp::DeleteRange(d.clone())], failure: vec![] };
                single(self.txn(&t)).map(|r| match r {
                    Some(ResponseOp::DeleteRange(d)) => TableReply::DeleteRange(d),
                    _ => unreachable!("a delete answers with a delete"),
                })
            }
            TableCommand::Txn(t) => self.txn(t).map(TableReply::Txn),
            TableCommand::Compact(rev) => self.compact(*rev).map(TableReply::Compact),
            TableCommand::LeaseGrant { id, ttl } => self.lease_grant(*id, *ttl).map(TableReply::LeaseGranted),
            TableCommand::LeaseRevoke { id } => self.lease_revoke(*id).map(TableReply::LeaseRevoked),
            TableCommand::LeaseCheckpoint(_) => Ok(TableReply::LeaseCheckpointed),
            _ => return None,
        })
    }
}

/// Whether compare `c` holds for `kv`.
fn holds(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match &c.target {
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
        CompareTarget::Version(v) => i128::from(kv.version).cmp(&i128::from(*v)),
        CompareTarget::CreateRevision(v) => i128::from(kv.create_revision).cmp(&i128::from(*v)),
        CompareTarget::ModRevision(v) => i128::from(kv.mod_revision).cmp(&i128::from(*v)),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Greater => ord == Ordering::Greater,
        CompareOp::Less => ord == Ordering::Less,
    }
}
