//! Model test: random operation sequences run against the store and against
//! a plain reference model (every key's full history in a map), comparing
//! every response.

use super::*;
use crate::engine::MemEngine;
use proptest::prelude::*;

/// The reference: [`crate::model::KvModel`], driven by this test's ops.
struct Model(crate::model::KvModel);

impl Model {
    fn new() -> Self {
        Self(crate::model::KvModel::new())
    }

    fn current(&self) -> u64 {
        self.0.current()
    }

    fn apply(&mut self, op: &Op) -> Result<Resp, KvError> {
        match op {
            Op::Range(r) => self.0.range(r).map(Resp::Range),
            Op::Compact(rev) => self.0.compact(*rev).map(Resp::Compact),
            Op::Txn(t) => self.0.txn(t).map(Resp::Txn),
            Op::Grant(id, ttl) => self.0.lease_grant(*id, *ttl).map(Resp::Grant),
            Op::Revoke(id) => self.0.lease_revoke(*id).map(Resp::Revoke),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Range(RangeRequest),
    Txn(TxnRequest),
    Compact(u64),
    Grant(i64, i64),
    Revoke(i64),
}

#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Range(RangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    Grant(crate::lease::GrantResponse),
    Revoke(crate::lease::RevokeResponse),
}

/// Runs `op` against the store, writing its batch only on success.
fn store_apply(engine: &MemEngine, op: &Op) -> Result<Resp, KvError> {
    store_apply_with(engine, op, COMPACTION_STEP_RECORDS)
}

/// [`store_apply`] with compaction steps of `step` history records.
fn store_apply_with(engine: &MemEngine, op: &Op, step: usize) -> Result<Resp, KvError> {
    let store = Mvcc::new(engine, b"t1/".to_vec()).with_compaction_step(step);
    let unwrap = |r: Result<Resp, MvccError>| match r {
        Ok(x) => Ok(x),
        Err(MvccError::Kv(e)) => Err(e),
        Err(MvccError::Engine(e)) => panic!("engine failed: {e}"),
    };
    if let Op::Range(r) = op {
        return unwrap(store.range(r).map(Resp::Range));
    }
    let mut txn = store.begin().unwrap();
    let resp = match op {
        Op::Txn(t) => txn.txn(t).map(Resp::Txn),
        Op::Compact(rev) => txn.compact(*rev).map(Resp::Compact),
        Op::Grant(id, ttl) => txn.lease_grant(*id, *ttl).map(Resp::Grant),
        Op::Revoke(id) => txn.lease_revoke(*id).map(Resp::Revoke),
        Op::Range(_) => unreachable!("handled above"),
    };
    let resp = unwrap(resp)?;
    let (batch, _) = txn.finish();
    engine.write(batch).unwrap();
    Ok(resp)
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"a\0".to_vec()),
        Just(b"ab".to_vec()),
        Just(b"b".to_vec()),
        Just(vec![0u8]),
        Just(vec![0xffu8]),
        Just(b"c".to_vec()),
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => Just(vec![]), 1 => Just(vec![0]), 2 => key(), 1 => Just(vec![0xff, 0xff])]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(vec![]), Just(b"x".to_vec()), Just(b"y".to_vec()), Just(vec![0, 1])]
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        key(),
        range_end(),
        0u64..4,
        prop_oneof![3 => Just(0u64), 2 => 1u64..12],
        prop_oneof![Just(SortOrder::None), Just(SortOrder::Ascend), Just(SortOrder::Descend)],
        prop_oneof![
            Just(SortTarget::Key),
            Just(SortTarget::Version),
            Just(SortTarget::Create),
            Just(SortTarget::Mod),
            Just(SortTarget::Value)
        ],
        any::<bool>(),
        prop::bool::weighted(0.1),
        // Filters: mostly none; otherwise bounds among the first revisions.
        prop_oneof![3 => Just([0u64; 4]), 1 => [0u64..8, 0u64..8, 0u64..8, 0u64..8]],
    )
        .prop_map(|(key, range_end, limit, revision, sort_order, sort_target, keys_only, count_only, f)| {
            RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                keys_only,
                count_only,
                min_mod_revision: f[0],
                max_mod_revision: f[1],
                min_create_revision: f[2],
                max_create_revision: f[3],
            }
        })
}

fn request_op() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        1 => range_req().prop_map(RequestOp::Range),
        3 => (key(), value(), any::<bool>(), lease_id(), prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(key, value, prev_kv, lease, ignore_value, ignore_lease)| RequestOp::Put(PutRequest {
                key,
                // A flag with a value or lease given is refused by validation.
                value: if ignore_value { Vec::new() } else { value },
                prev_kv,
                lease: if ignore_lease { 0 } else { lease },
                ignore_value,
                ignore_lease,
            })),
        2 => (key(), range_end(), any::<bool>())
            .prop_map(|(key, range_end, prev_kv)| RequestOp::DeleteRange(DeleteRangeRequest { key, range_end, prev_kv })),
    ]
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop_oneof![4 => Just(vec![]), 1 => range_end()],
        prop_oneof![Just(CompareOp::Equal), Just(CompareOp::NotEqual), Just(CompareOp::Greater), Just(CompareOp::Less)],
        prop_oneof![
            (-1i64..4).prop_map(CompareTarget::Version),
            (-1i64..10).prop_map(CompareTarget::CreateRevision),
            (-1i64..10).prop_map(CompareTarget::ModRevision),
            value().prop_map(CompareTarget::Value),
            lease_id().prop_map(CompareTarget::Lease),
        ],
    )
        .prop_map(|(key, range_end, op, target)| Compare { key, range_end, op, target })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range_req().prop_map(Op::Range),
        5 => request_op().prop_filter("writes only", |o| !matches!(o, RequestOp::Range(_)))
            .prop_map(|o| Op::Txn(TxnRequest { compare: vec![], success: vec![o], failure: vec![] })),
        3 => (prop::collection::vec(compare(), 0..3),
              prop::collection::vec(request_op(), 0..4),
              prop::collection::vec(request_op(), 0..3))
            .prop_map(|(compare, success, failure)| Op::Txn(TxnRequest { compare, success, failure })),
        1 => (0u64..12).prop_map(Op::Compact),
        1 => (prop_oneof![2 => Just(0i64), 1 => 1i64..4], prop_oneof![Just(1i64), Just(5), Just(9_000_000_001)])
            .prop_map(|(id, ttl)| Op::Grant(id, ttl)),
        1 => (1i64..4).prop_map(Op::Revoke),
    ]
}

/// Mostly no lease, else one of the first few ids (granted or not).
fn lease_id() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 1 => 1i64..4]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let engine = MemEngine::new();
        let mut model = Model::new();
        for (i, op) in ops.iter().enumerate() {
            let want = model.apply(op);
            let got = store_apply(&engine, op);
            prop_assert_eq!(&got, &want, "op #{}: {:?}", i, op);
            let state = Mvcc::new(&engine, b"t1/".to_vec()).rev_state().unwrap();
            prop_assert_eq!(state.current, model.current());
        }
    }

    /// Compactions removed in steps of 1 to 3 history records, with reads
    /// and writes between the steps: every answer is the model's, and once
    /// every step ran the stored pairs are exactly those of compactions
    /// done at once.
    #[test]
    fn compaction_in_steps_answers_and_ends_like_compaction_at_once(
        ops in prop::collection::vec(op(), 1..60),
        step in 1usize..4,
        steps_between in prop::collection::vec(0usize..3, 60),
    ) {
        let stepped = MemEngine::new();
        let at_once = MemEngine::new();
        let mut model = Model::new();
        let store = Mvcc::new(&stepped, b"t1/".to_vec()).with_compaction_step(step);
        for (i, op) in ops.iter().enumerate() {
            let want = model.apply(op);
            prop_assert_eq!(&store_apply_with(&stepped, op, step), &want, "op #{}: {:?}", i, op);
            prop_assert_eq!(&store_apply_with(&at_once, op, usize::MAX), &want, "op #{}: {:?}", i, op);
            for _ in 0..steps_between[i] {
                let (batch, _) = store.compaction_step().unwrap();
                stepped.write(batch).unwrap();
            }
        }
        let mut steps = 0;
        loop {
            let (batch, more) = store.compaction_step().unwrap();
            stepped.write(batch).unwrap();
            steps += 1;
            prop_assert!(steps < 1000, "compaction steps never end");
            if !more {
                break;
            }
        }
        prop_assert_eq!(store.compaction_pending().unwrap(), None);
        prop_assert_eq!(all_pairs(&stepped), all_pairs(&at_once));
    }
}

#[test]
fn revisions_versions_and_deletion_follow_etcd() {
    let engine = MemEngine::new();
    let put = |k: &str, v: &str| {
        let op = Op::Txn(TxnRequest {
            success: vec![RequestOp::Put(PutRequest {
                key: k.into(),
                value: v.into(),
                prev_kv: true,
                ..Default::default()
            })],
            ..Default::default()
        });
        store_apply(&engine, &op).unwrap()
    };
    put("k", "1");
    put("k", "2");
    let get = |rev: u64| {
        let r = RangeRequest { key: b"k".to_vec(), revision: rev, ..Default::default() };
        store_apply(&engine, &Op::Range(r))
    };
    let Ok(Resp::Range(r)) = get(0) else { panic!("range failed") };
    assert_eq!(r.revision, 3, "two writes after the initial revision 1");
    assert_eq!((r.kvs[0].create_revision, r.kvs[0].mod_revision, r.kvs[0].version), (2, 3, 2));
    let Ok(Resp::Range(r)) = get(2) else { panic!("range failed") };
    assert_eq!(r.kvs[0].value, b"1");
    // A delete of nothing takes no revision.
    let del = |k: &str| {
        Op::Txn(TxnRequest {
            success: vec![RequestOp::DeleteRange(DeleteRangeRequest { key: k.into(), ..Default::default() })],
            ..Default::default()
        })
    };
    let Ok(Resp::Txn(t)) = store_apply(&engine, &del("nothing")) else { panic!() };
    assert_eq!(t.revision, 3);
    let Ok(Resp::Txn(t)) = store_apply(&engine, &del("k")) else { panic!() };
    assert_eq!(t.revision, 4);
    put("k", "3");
    let Ok(Resp::Range(r)) = get(0) else { panic!() };
    assert_eq!((r.kvs[0].create_revision, r.kvs[0].version), (5, 1), "deletion resets version");
    assert_eq!(get(9), Err(KvError::FutureRevision { requested: 9, current: 5 }));
    store_apply(&engine, &Op::Compact(4)).unwrap();
    assert_eq!(get(3), Err(KvError::Compacted { requested: 3, compacted: 4 }));
    let Ok(Resp::Range(r)) = get(4) else { panic!() };
    assert!(r.kvs.is_empty(), "at revision 4 the key was deleted");
    assert_eq!(store_apply(&engine, &Op::Compact(4)), Err(KvError::Compacted { requested: 4, compacted: 4 }));
}

#[test]
fn history_key_encoding_round_trips_and_orders() {
    let engine = MemEngine::new();
    let m = Mvcc::new(&engine, b"x".to_vec());
    let keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], vec![0, 1], vec![1], vec![0xff], b"a\0b".to_vec()];
    let mut encoded: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().map(|k| (m.history_key(k, 7), k.clone())).collect();
    encoded.sort();
    let order: Vec<Vec<u8>> = encoded.iter().map(|(_, k)| k.clone()).collect();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(order, want, "encoding preserves key order");
    for (enc, k) in encoded {
        assert_eq!(split_escaped(&enc[2..]).unwrap(), (k, 7));
    }
    assert!(split_escaped(&[0, 7]).is_err(), "bad escapes are errors, not panics");
    assert!(split_escaped(&[1, 2]).is_err());
}

/// A range with a small `limit`, or `count_only`, decodes only the keys it
/// can answer with: a damaged record past them is never read, while a range
/// that does reach it reports the damage. (Before, every range loaded every
/// matching key and value, then applied `limit`.)
#[test]
fn bounded_ranges_read_only_the_keys_they_answer_with() {
    let engine = MemEngine::new();
    let store = Mvcc::new(&engine, b"t1/".to_vec());
    let mut txn = store.begin().unwrap();
    let success = (0..100u32)
        .map(|i| {
            RequestOp::Put(PutRequest {
                key: format!("k{i:03}").into_bytes(),
                value: vec![7; 64],
                prev_kv: false,
                ..Default::default()
            })
        })
        .collect();
    txn.txn(&TxnRequest { success, ..Default::default() }).unwrap();
    engine.write(txn.finish().0).unwrap();
    // Damage the latest record of k050.
    let mut batch = WriteBatch::new();
    batch.put(store.latest_key(b"k050"), vec![0xff; 3]);
    engine.write(batch).unwrap();

    let all = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let r = store.range(&RangeRequest { limit: 1, ..all.clone() }).unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more), (1, 100, true));
    assert_eq!(r.kvs[0].key, b"k000");
    // `limit + 1` keys are read (the extra one tells `more`): k000..k049.
    let r = store.range(&RangeRequest { limit: 49, ..all.clone() }).unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more), (49, 100, true), "k050 counted, never decoded");
    assert!(store.range(&RangeRequest { limit: 50, ..all.clone() }).is_err(), "limit 50 reads k050");
    let r = store.range(&RangeRequest { count_only: true, ..all.clone() }).unwrap();
    assert_eq!((r.kvs.len(), r.count), (0, 100));
    // Ranges that must see k050 find the damage.
    assert!(matches!(store.range(&all), Err(MvccError::Engine(_))));
    let by_value = RangeRequest { limit: 1, sort_order: SortOrder::Descend, ..all };
    assert!(matches!(store.range(&by_value), Err(MvccError::Engine(_))));
}

#[test]
fn ranges_hold_at_most_the_response_limit_whatever_the_range() {
    let engine = MemEngine::new();
    let store = Mvcc::new(&engine, b"t1/".to_vec());
    for round in 0..2u8 {
        let mut txn = store.begin().unwrap();
        for half in [0..100u32, 100..200] {
            let success = half
                .map(|i| {
                    let value = vec![b'a' + ((i * 7 + u32::from(round)) % 26) as u8; 100];
                    RequestOp::Put(PutRequest {
                        key: format!("k{i:03}").into_bytes(),
                        value,
                        prev_kv: false,
                        ..Default::default()
                    })
                })
                .collect();
            txn.txn(&TxnRequest { success, ..Default::default() }).unwrap();
        }
        engine.write(txn.finish().0).unwrap();
    }
    let all = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let too_large =
        |r: &Result<RangeResponse, MvccError>| matches!(r, Err(MvccError::Kv(KvError::ResponseTooLarge { .. })));
    // 200 keys of 100 bytes: about 27 KB of answer.
    assert!(too_large(&store.range_within(&all, 5_000)));
    let past = RangeRequest { revision: 2, ..all.clone() };
    let r = store.range_within(&past, 5_000);
    assert!(too_large(&r), "a past revision is bounded too: {:?}", r.map(|r| (r.count, r.kvs.len(), r.revision)));
    // With a limit, only the key-values that can reach the answer are kept.
    for req in [
        RangeRequest { limit: 3, ..past.clone() },
        RangeRequest { limit: 3, sort_order: SortOrder::Descend, sort_target: SortTarget::Value, ..all.clone() },
        RangeRequest { limit: 3, sort_order: SortOrder::Ascend, sort_target: SortTarget::Value, ..past.clone() },
        RangeRequest { limit: 3, min_mod_revision: 2, sort_target: SortTarget::Mod, ..all.clone() },
        RangeRequest { keys_only: true, ..all.clone() },
        RangeRequest { count_only: true, ..past.clone() },
    ] {
        let bounded = store.range_within(&req, 8_000).unwrap_or_else(|e| panic!("{req:?}: {e}"));
        assert_eq!(bounded, store.range(&req).unwrap(), "{req:?}");
        assert_eq!(bounded.count, 200);
    }
    let best = store
        .range_within(
            &RangeRequest { limit: 3, sort_order: SortOrder::Descend, sort_target: SortTarget::Value, ..past },
            5_000,
        )
        .unwrap();
    assert!(best.kvs.iter().all(|kv| kv.value[0] == b'z'), "the best three by value: {:?}", best.kvs);
    assert!(best.more);
}

fn all_pairs(engine: &MemEngine) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    engine
        .scan(&[], &[0xff; 8], &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
    out
}

#[test]
fn a_compaction_step_keeps_the_version_it_stopped_inside() {
    // One key with versions at 2, 3 and 4, compacted at 3, removed one
    // record per step: the step that stops on version 3 must keep it (the
    // newest at or below 3), and the next one must still drop version 2.
    let engine = MemEngine::new();
    let put = |v: &str| {
        let op = Op::Txn(TxnRequest {
            success: vec![RequestOp::Put(PutRequest {
                key: b"k".to_vec(),
                value: v.into(),
                prev_kv: false,
                ..Default::default()
            })],
            ..Default::default()
        });
        store_apply_with(&engine, &op, 1).unwrap();
    };
    put("a");
    put("b");
    put("c");
    store_apply_with(&engine, &Op::Compact(3), 1).unwrap();
    let store = Mvcc::new(&engine, b"t1/".to_vec()).with_compaction_step(1);
    assert_eq!(store.compaction_pending().unwrap(), Some(3));
    let history = |e: &MemEngine| {
        let (lo, hi) = store.history_bounds(&[], None);
        let mut revs = Vec::new();
        e.scan(&lo, &hi, &mut |k, _| {
            revs.push(u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()));
            true
        })
        .unwrap();
        revs
    };
    assert_eq!(history(&engine), vec![2, 3, 4], "the first step only visited version 2");
    while store.compaction_pending().unwrap().is_some() {
        let (batch, _) = store.compaction_step().unwrap();
        engine.write(batch).unwrap();
    }
    assert_eq!(history(&engine), vec![3, 4]);
    let r = RangeRequest { key: b"k".to_vec(), revision: 3, ..Default::default() };
    let Ok(Resp::Range(r)) = store_apply(&engine, &Op::Range(r)) else { panic!("range failed") };
    assert_eq!(r.kvs[0].value, b"b");
}

#[test]
fn a_range_inside_a_transaction_is_bounded_alike_on_every_replica() {
    // The bound is TXN_RANGE_BYTES_MAX (60 MiB); 5,000 bytes here.
    let engine = MemEngine::new();
    let store = Mvcc::new(&engine, b"t1/".to_vec()).with_txn_range_bytes(5_000);
    let run = |op: &TxnRequest| -> Result<TxnResponse, KvError> {
        let mut txn = store.begin().unwrap();
        match txn.txn(op) {
            Ok(r) => {
                engine.write(txn.finish().0).unwrap();
                Ok(r)
            }
            Err(MvccError::Kv(e)) => Err(e),
            Err(MvccError::Engine(e)) => panic!("engine failed: {e}"),
        }
    };
    let keys = 60u64;
    for i in 0..keys {
        let put = PutRequest {
            key: format!("big{i:03}").into_bytes(),
            value: vec![b'v'; 100],
            prev_kv: false,
            ..Default::default()
        };
        run(&TxnRequest { success: vec![RequestOp::Put(put)], ..Default::default() }).unwrap();
    }
    let before = all_pairs(&engine);
    let all = RangeRequest { key: b"big".to_vec(), range_end: b"bih".to_vec(), ..Default::default() };
    let put = RequestOp::Put(PutRequest {
        key: b"other".to_vec(),
        value: b"x".to_vec(),
        prev_kv: false,
        ..Default::default()
    });
    // The whole range is more than the bound: the transaction is refused,
    // its put included, and nothing is written.
    for range in [all.clone(), RangeRequest { revision: 50, ..all.clone() }] {
        let txn = TxnRequest { success: vec![put.clone(), RequestOp::Range(range)], ..Default::default() };
        assert!(matches!(run(&txn), Err(KvError::ResponseTooLarge { .. })));
        assert_eq!(all_pairs(&engine), before);
    }
    // With a limit it answers, counting every key, and the put applies.
    let limited = RangeRequest { limit: 2, ..all };
    let t = run(&TxnRequest { success: vec![put, RequestOp::Range(limited)], ..Default::default() }).unwrap();
    let ResponseOp::Range(r) = &t.responses[1] else { panic!("not a range response") };
    assert_eq!((r.kvs.len(), r.count, r.more), (2, keys, true));
    assert_ne!(all_pairs(&engine), before);
}

/// A revocation deletes exactly the keys still attached to the lease, in
/// one revision; a put onto another lease (or none) and a delete detach a
/// key; the attachment index follows.
#[test]
fn a_revoked_lease_deletes_its_keys_in_one_revision() {
    let engine = MemEngine::new();
    let put = |k: &str, lease: i64| {
        let p = PutRequest { key: k.into(), value: b"v".to_vec(), lease, ..Default::default() };
        store_apply(&engine, &Op::Txn(TxnRequest { success: vec![RequestOp::Put(p)], ..Default::default() })).unwrap();
    };
    let Ok(Resp::Grant(g)) = store_apply(&engine, &Op::Grant(0, 1)) else { panic!("grant") };
    assert_eq!((g.id, g.ttl), (1, crate::lease::LEASE_TTL_MIN), "ids start at 1; short TTLs are raised");
    let Ok(Resp::Grant(other)) = store_apply(&engine, &Op::Grant(7, 60)) else { panic!("grant") };
    assert_eq!(store_apply(&engine, &Op::Grant(7, 60)), Err(KvError::LeaseExists { id: 7 }));
    for k in ["a", "b", "c", "d"] {
        put(k, g.id);
    }
    put("c", other.id);
    put("d", 0);
    let store = Mvcc::new(&engine, b"t1/".to_vec());
    assert_eq!(store.lease_keys(g.id).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(store.lease_keys(other.id).unwrap(), vec![b"c".to_vec()]);
    let before = store.rev_state().unwrap().current;
    let Ok(Resp::Revoke(r)) = store_apply(&engine, &Op::Revoke(g.id)) else { panic!("revoke") };
    assert_eq!(r.revision, before + 1, "both keys go in one revision");
    let all = store.range(&RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }).unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| (kv.key.clone(), kv.lease)).collect();
    assert_eq!(keys, vec![(b"c".to_vec(), other.id), (b"d".to_vec(), 0)]);
    assert!(store.lease_keys(g.id).unwrap().is_empty());
    assert_eq!(store_apply(&engine, &Op::Revoke(g.id)), Err(KvError::LeaseNotFound { id: g.id }));
    assert_eq!(store.leases().unwrap().iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![other.id]);
    let Ok(Resp::Grant(next)) = store_apply(&engine, &Op::Grant(0, 5)) else { panic!("grant") };
    assert_eq!(next.id, 2, "an id is never handed out twice");
}
