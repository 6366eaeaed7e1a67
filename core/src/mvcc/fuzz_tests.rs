//! Stored records fuzzed: a table's records (versions, latest records,
//! the changelog, leases and their attachments, the revision state, the
//! compaction cursor) are damaged one at a time (random bytes, truncated,
//! a flipped bit, trailing garbage) and every read and write path runs
//! over them. Each must answer an error or a value, never panic: a disk
//! that returns damaged bytes costs a clear error, not the node.
//!
//! Cases: `ARMADA_FUZZ_CASES` (default 256; `ci/bench-fuzz` runs many
//! more).

use proptest::prelude::*;

use super::*;
use crate::engine::MemEngine;
use crate::kv::{DeleteRangeRequest, PutRequest, RangeRequest};

const NS: &[u8] = b"t1/";

pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("ARMADA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// A table with every kind of record: versions of several keys, a
/// deletion, leases with keys attached, a compaction.
fn populated() -> MemEngine {
    let engine = MemEngine::new();
    let store = Mvcc::new(&engine, NS.to_vec());
    let step = |f: &mut dyn FnMut(&mut WriteTxn<'_, '_>)| {
        let mut txn = store.begin().unwrap();
        f(&mut txn);
        let (batch, _) = txn.finish();
        engine.write(batch).unwrap();
    };
    for round in 0..3u8 {
        for k in 0..6u8 {
            step(&mut |t| {
                t.put(&PutRequest::new(vec![b'k', k], vec![round; 1 + k as usize])).unwrap();
            });
        }
    }
    step(&mut |t| {
        t.lease_grant(7, 60).unwrap();
    });
    step(&mut |t| {
        t.put(&PutRequest { lease: 7, ..PutRequest::new(b"leased".to_vec(), b"v".to_vec()) }).unwrap();
    });
    step(&mut |t| {
        t.delete_range(&DeleteRangeRequest { key: b"k\x01".to_vec(), ..Default::default() }).unwrap();
    });
    step(&mut |t| {
        t.compact(5).unwrap();
    });
    engine
}

#[derive(Debug, Clone)]
enum Damage {
    Replace(Vec<u8>),
    Truncate(usize),
    FlipBit(usize),
    Append(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Damage::Replace),
        any::<usize>().prop_map(Damage::Truncate),
        any::<usize>().prop_map(Damage::FlipBit),
        prop::collection::vec(any::<u8>(), 1..8).prop_map(Damage::Append),
    ]
}

fn apply(d: &Damage, mut v: Vec<u8>) -> Vec<u8> {
    match d {
        Damage::Replace(b) => b.clone(),
        Damage::Truncate(n) => {
            v.truncate(n % (v.len() + 1));
            v
        }
        Damage::FlipBit(i) if !v.is_empty() => {
            let bit = i % (v.len() * 8);
            v[bit / 8] ^= 1 << (bit % 8);
            v
        }
        Damage::FlipBit(_) => vec![0xFF],
        Damage::Append(b) => {
            v.extend_from_slice(b);
            v
        }
    }
}

/// Every read and write path of the table.
fn exercise(engine: &MemEngine) {
    let store = Mvcc::new(engine, NS.to_vec());
    let state = store.rev_state();
    let current = state.as_ref().map_or(40, |s| s.current);
    let _ = store.leases();
    let _ = store.compaction_pending();
    let _ = store.compaction_step();
    for revision in 0..=current.min(64) {
        let _ = store.range(&RangeRequest { key: vec![0], range_end: vec![0], revision, ..RangeRequest::default() });
        let _ = store.range(&RangeRequest { key: b"k\x02".to_vec(), revision, ..RangeRequest::default() });
    }
    let _ = store.changes_from(1, 1000, 1 << 20);
    let _ = store.changes_from(current.saturating_sub(3), 10, 1 << 20);
    if let Ok(mut txn) = store.begin() {
        let _ = txn.put(&PutRequest::new(b"k\x03".to_vec(), b"new".to_vec()));
        let _ = txn.put(&PutRequest { lease: 7, ..PutRequest::new(b"k\x04".to_vec(), b"new".to_vec()) });
        let _ = txn.delete_range(&DeleteRangeRequest { key: vec![0], range_end: vec![0], prev_kv: true });
        let _ = txn.lease_revoke(7);
        let _ = txn.compact(current.saturating_sub(1));
        let _ = txn.finish();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

    #[test]
    fn damaged_stored_records_give_errors_not_panics(which in any::<prop::sample::Index>(), damage in damage()) {
        let engine = populated();
        let mut keys = Vec::new();
        engine.scan(&[], &[0xFF; 8], &mut |k, _| { keys.push(k.to_vec()); true }).unwrap();
        prop_assume!(!keys.is_empty());
        let key = which.get(&keys).clone();
        let old = engine.get(&key).unwrap().unwrap_or_default();
        let mut batch = WriteBatch::default();
        batch.put(key, apply(&damage, old));
        engine.write(batch).unwrap();
        exercise(&engine);
    }
}

#[test]
fn the_undamaged_table_passes_every_path() {
    let engine = populated();
    exercise(&engine);
    let store = Mvcc::new(&engine, NS.to_vec());
    assert!(store.rev_state().unwrap().current > 20);
    assert_eq!(store.leases().unwrap().len(), 1, "lease 7 (the exercise's revoke was not written)");
}
