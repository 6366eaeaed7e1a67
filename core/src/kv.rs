//! Requests, responses, limits and errors of the per-table KV API.
//!
//! Semantics are etcd v3's (see `docs/api.md`): every write transaction that
//! changes something takes the table's next revision; reads can be served at
//! any retained revision.

use serde::{Deserialize, Serialize};

/// Largest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 4 * 1024;
/// Largest value accepted, in bytes.
pub const VALUE_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Largest encoded request accepted, in bytes.
pub const REQUEST_BYTES_MAX: usize = 3 * 1024 * 1024;
/// Most compares, and most operations per branch, in one transaction.
pub const TXN_OPS_MAX: usize = 128;
/// Revision of a table that has seen no write (etcd starts at 1 as well, so
/// the first write gets revision 2).
pub const REVISION_INITIAL: u64 = 1;

/// One version of one key, as returned to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none); see [`crate::lease`].
    #[serde(default, with = "crate::codec::added_in_2")]
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// A range read. Key interval conventions (etcd's): `range_end` empty means
/// the single key `key`; `range_end == [0]` means every key `>= key`;
/// otherwise `[key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0: no limit.
    pub limit: u64,
    /// 0: the latest revision.
    pub revision: u64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    /// Filters (0: none): only keys whose mod / create revision lies within
    /// the bounds are returned. As in etcd, `count` is taken before filtering.
    pub min_mod_revision: u64,
    pub max_mod_revision: u64,
    pub min_create_revision: u64,
    pub max_create_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeResponse {
    /// The table's current revision when the read was served.
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed to return.
    pub more: bool,
    /// Number of keys in the range, regardless of `limit`.
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub prev_kv: bool,
    /// Attaches the key to this lease (0: to none, detaching it from any).
    #[serde(default, with = "crate::codec::added_in_2")]
    pub lease: i64,
    /// Keeps the key's current value (`value` must be empty; the key must
    /// exist).
    #[serde(default, with = "crate::codec::added_in_2")]
    pub ignore_value: bool,
    /// Keeps the key's current lease (`lease` must be 0; the key must exist).
    #[serde(default, with = "crate::codec::added_in_2")]
    pub ignore_lease: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutResponse {
    pub revision: u64,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteRangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteRangeResponse {
    pub revision: u64,
    pub deleted: u64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// What a compare looks at, with the operand to compare against. Operands are
/// signed, as in etcd, so a client may compare against any integer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
    /// The key's lease id (0: none).
    Lease(i64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Vec<u8>,
    /// Empty: only `key`. Otherwise the compare must hold for every existing
    /// key of the interval (same conventions as [`RangeRequest`]).
    pub range_end: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnResponse {
    pub revision: u64,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CompactResponse {
    pub revision: u64,
}

/// A deterministic refusal of a request. It is part of a command's result, so
/// every replica computes the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    #[error("key is not provided")]
    EmptyKey,
    #[error("key is too large: {len} bytes, limit {KEY_BYTES_MAX}")]
    KeyTooLarge { len: u64 },
    #[error("value is too large: {len} bytes, limit {VALUE_BYTES_MAX}")]
    ValueTooLarge { len: u64 },
    #[error("request is too large: {len} bytes, limit {REQUEST_BYTES_MAX}")]
    RequestTooLarge { len: u64 },
    #[error("too many operations in txn request: {len}, limit {TXN_OPS_MAX}")]
    TooManyTxnOps { len: u64 },
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("required revision {requested} has been compacted (compacted up to {compacted})")]
    Compacted { requested: u64, compacted: u64 },
    #[error("required revision {requested} is a future revision (current {current})")]
    FutureRevision { requested: u64, current: u64 },
    /// A range whose answer would exceed the node's response limit: the
    /// read stops as soon as the first `keys` key-values (`bytes`) crossed it.
    #[error(
        "range response too large: over the {limit}-byte limit ({bytes} bytes in its first {keys} keys); ask for \
         fewer keys (limit, a narrower range, keys_only, count_only) or raise --max-response-bytes"
    )]
    ResponseTooLarge { bytes: u64, keys: u64, limit: u64 },
    #[error("requested lease not found (lease {id}: never granted, revoked, or expired)")]
    LeaseNotFound { id: i64 },
    #[error("lease already exists (lease {id})")]
    LeaseExists { id: i64 },
    #[error("too large lease TTL ({ttl} s; at most {max} s)", max = crate::lease::LEASE_TTL_MAX)]
    LeaseTtlTooLarge { ttl: i64 },
    /// `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
}

/// Bytes a range response's key-values take on the wire, about.
pub fn response_bytes(kvs: &[KeyValue]) -> u64 {
    kvs.iter().map(|kv| (kv.key.len() + kv.value.len() + 32) as u64).sum()
}

/// The key interval named by `(key, range_end)`: `None` as the end means
/// unbounded. A single key `k` is the interval `[k, k ++ [0])`.
pub fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), Some(end))
    } else if range_end == [0] {
        (key.to_vec(), None)
    } else {
        (key.to_vec(), Some(range_end.to_vec()))
    }
}

/// Whether `k` lies in the interval of `(key, range_end)`.
pub fn in_interval(k: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return k == key;
    }
    if k < key {
        return false;
    }
    range_end == [0] || k < range_end
}

fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(KvError::KeyTooLarge { len: key.len() as u64 });
    }
    Ok(())
}

fn check_range_end(range_end: &[u8]) -> Result<(), KvError> {
    if range_end.len() > KEY_BYTES_MAX {
        return Err(KvError::KeyTooLarge { len: range_end.len() as u64 });
    }
    Ok(())
}

impl RangeRequest {
    pub fn validate(&self) -> Result<(), KvError> {
        check_key(&self.key)?;
        check_range_end(&self.range_end)
    }
}

impl PutRequest {
    /// A put of `value` at `key`, with no lease and no flags.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        PutRequest { key: key.into(), value: value.into(), ..Default::default() }
    }

    pub fn validate(&self) -> Result<(), KvError> {
        check_key(&self.key)?;
        if self.value.len() > VALUE_BYTES_MAX {
            return Err(KvError::ValueTooLarge { len: self.value.len() as u64 });
        }
        if self.ignore_value && !self.value.is_empty() {
            return Err(KvError::ValueProvided);
        }
        if self.ignore_lease && self.lease != 0 {
            return Err(KvError::LeaseProvided);
        }
        Ok(())
    }
}

impl DeleteRangeRequest {
    pub fn validate(&self) -> Result<(), KvError> {
        check_key(&self.key)?;
        check_range_end(&self.range_end)
    }
}

impl RequestOp {
    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            RequestOp::Range(r) => r.validate(),
            RequestOp::Put(p) => p.validate(),
            RequestOp::DeleteRange(d) => d.validate(),
        }
    }
}

impl TxnRequest {
    /// Checks sizes, counts and etcd's rule that within one branch no key is
    /// written twice (two puts of one key, or a put inside a deleted range).
    pub fn validate(&self) -> Result<(), KvError> {
        for len in [self.compare.len(), self.success.len(), self.failure.len()] {
            if len > TXN_OPS_MAX {
                return Err(KvError::TooManyTxnOps { len: len as u64 });
            }
        }
        for c in &self.compare {
            check_key(&c.key)?;
            check_range_end(&c.range_end)?;
            if let CompareTarget::Value(v) = &c.target {
                if v.len() > VALUE_BYTES_MAX {
                    return Err(KvError::ValueTooLarge { len: v.len() as u64 });
                }
            }
        }
        for branch in [&self.success, &self.failure] {
            for op in branch.iter() {
                op.validate()?;
            }
            check_branch_writes(branch)?;
        }
        Ok(())
    }
}

fn check_branch_writes(ops: &[RequestOp]) -> Result<(), KvError> {
    let mut put_keys = std::collections::BTreeSet::new();
    for op in ops {
        if let RequestOp::Put(p) = op {
            if !put_keys.insert(p.key.as_slice()) {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    for op in ops {
        if let RequestOp::DeleteRange(d) = op {
            // etcd 3.4 checks a delete as the interval [key, range_end) even
            // when range_end is "\0" ("every key from `key`"), which makes
            // that interval empty: a put beside a from-key delete passes.
            // Armada accepts what etcd accepts; the operations still apply in
            // order, so the put key is deleted by the later delete.
            if d.range_end == [0] {
                continue;
            }
            if put_keys.iter().any(|k| in_interval(k, &d.key, &d.range_end)) {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &[u8]) -> RequestOp {
        RequestOp::Put(PutRequest { key: k.to_vec(), value: b"v".to_vec(), prev_kv: false, ..Default::default() })
    }
    fn del(k: &[u8], end: &[u8]) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest { key: k.to_vec(), range_end: end.to_vec(), prev_kv: false })
    }

    #[test]
    fn intervals_follow_etcd_conventions() {
        assert!(in_interval(b"a", b"a", b""));
        assert!(!in_interval(b"ab", b"a", b""));
        assert!(in_interval(b"zzz", b"a", &[0]));
        assert!(in_interval(b"b", b"a", b"c"));
        assert!(!in_interval(b"c", b"a", b"c"));
        assert!(!in_interval(b"a", b"b", b"a"), "an inverted interval is empty");
    }

    #[test]
    fn limits_are_typed_errors() {
        let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
        let p = PutRequest { key: big_key, value: vec![], prev_kv: false, ..Default::default() };
        assert_eq!(p.validate(), Err(KvError::KeyTooLarge { len: KEY_BYTES_MAX as u64 + 1 }));
        let p = PutRequest {
            key: b"k".to_vec(),
            value: vec![0; VALUE_BYTES_MAX + 1],
            prev_kv: false,
            ..Default::default()
        };
        assert!(matches!(p.validate(), Err(KvError::ValueTooLarge { .. })));
        let p = PutRequest { key: vec![], value: vec![], prev_kv: false, ..Default::default() };
        assert_eq!(p.validate(), Err(KvError::EmptyKey));
        let t = TxnRequest { success: vec![put(b"a"); TXN_OPS_MAX + 1], ..Default::default() };
        assert!(matches!(t.validate(), Err(KvError::TooManyTxnOps { .. })));
    }

    #[test]
    fn txn_rejects_duplicate_writes_per_branch() {
        let t = TxnRequest { success: vec![put(b"a"), put(b"a")], ..Default::default() };
        assert_eq!(t.validate(), Err(KvError::DuplicateKey));
        let t = TxnRequest { success: vec![put(b"b"), del(b"a", b"c")], ..Default::default() };
        assert_eq!(t.validate(), Err(KvError::DuplicateKey));
        let t = TxnRequest { success: vec![put(b"a")], failure: vec![put(b"a")], ..Default::default() };
        assert_eq!(t.validate(), Ok(()), "the two branches are checked separately");
        let t = TxnRequest { success: vec![del(b"a", b"c"), del(b"b", b"d")], ..Default::default() };
        assert_eq!(t.validate(), Ok(()), "overlapping deletes are allowed");
    }
}
