//! Client requests fuzzed: valid etcd v3 and armada.v1 requests are
//! encoded, damaged (flipped bytes, truncation) and taken through what a
//! node does with bytes from a client: protobuf decoding, conversion and
//! validation, then execution against a table (in memory), and a watch
//! stream's creation. Each step must answer an error or a result, never
//! panic.
//!
//! Cases: `ARMADA_FUZZ_CASES` (default 256; `ci/bench-fuzz` runs many
//! more).

use armada_core::engine::{Engine, MemEngine};
use armada_core::mvcc::Mvcc;
use armada_core::watch::{TableState, WatchStream};
use armada_proto::{etcd as epb, v1 as vpb};
use armada_server::api::{etcd, v1};
use proptest::prelude::*;
use prost::Message;

fn fuzz_cases() -> u32 {
    std::env::var("ARMADA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn engine() -> MemEngine {
    let engine = MemEngine::new();
    let store = Mvcc::new(&engine, b"t/".to_vec());
    for i in 0..5u8 {
        let mut txn = store.begin().unwrap();
        txn.put(&armada_core::kv::PutRequest::new(vec![b'a' + i], vec![i; 3])).unwrap();
        let (batch, _) = txn.finish();
        engine.write(batch).unwrap();
    }
    engine
}

fn run_txn(engine: &MemEngine, req: &armada_core::kv::TxnRequest) {
    if req.validate().is_err() {
        return;
    }
    let store = Mvcc::new(engine, b"t/".to_vec());
    let mut txn = store.begin().unwrap();
    if txn.txn(req).is_ok() {
        let (batch, _) = txn.finish();
        engine.write(batch).unwrap();
    }
}

fn run_range(engine: &MemEngine, req: &armada_core::kv::RangeRequest) {
    if req.validate().is_ok() {
        let _ = Mvcc::new(engine, b"t/".to_vec()).range(req);
    }
}

fn samples() -> Vec<(u8, Vec<u8>)> {
    let put = epb::PutRequest { key: b"a".to_vec(), value: b"v".to_vec(), prev_kv: true, ..Default::default() };
    let range = epb::RangeRequest {
        key: b"a".to_vec(),
        range_end: b"z".to_vec(),
        limit: 2,
        revision: 2,
        sort_order: 1,
        sort_target: 3,
        ..Default::default()
    };
    let txn = epb::TxnRequest {
        compare: vec![epb::Compare {
            result: 0,
            target: 1,
            key: b"a".to_vec(),
            range_end: b"c".to_vec(),
            target_union: Some(epb::compare::TargetUnion::Version(1)),
        }],
        success: vec![
            epb::RequestOp { request: Some(epb::request_op::Request::RequestPut(put.clone())) },
            epb::RequestOp { request: Some(epb::request_op::Request::RequestRange(range.clone())) },
        ],
        failure: vec![epb::RequestOp {
            request: Some(epb::request_op::Request::RequestDeleteRange(epb::DeleteRangeRequest {
                key: b"b".to_vec(),
                range_end: vec![0],
                prev_kv: true,
            })),
        }],
    };
    let watch = epb::WatchCreateRequest {
        key: b"a".to_vec(),
        range_end: b"z".to_vec(),
        start_revision: 2,
        prev_kv: true,
        filters: vec![0, 1],
        progress_notify: true,
        fragment: true,
        watch_id: 5,
    };
    let v1_txn = vpb::TxnRequest {
        table: "t".into(),
        compare: vec![vpb::Compare {
            result: 1,
            target: 3,
            key: b"a".to_vec(),
            range_end: Vec::new(),
            target_union: Some(vpb::compare::TargetUnion::ModRevision(3)),
        }],
        success: vec![vpb::RequestOp {
            request: Some(vpb::request_op::Request::RequestPut(vpb::PutRequest {
                table: "t".into(),
                key: b"q".to_vec(),
                value: b"w".to_vec(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    vec![
        (0, put.encode_to_vec()),
        (1, range.encode_to_vec()),
        (2, txn.encode_to_vec()),
        (3, watch.encode_to_vec()),
        (4, v1_txn.encode_to_vec()),
        (
            5,
            vpb::RangeRequest { table: "t".into(), key: b"a".to_vec(), range_end: vec![0], ..Default::default() }
                .encode_to_vec(),
        ),
    ]
}

/// What a node does with `bytes` arriving as message `kind`.
fn handle(engine: &MemEngine, kind: u8, bytes: &[u8]) {
    match kind {
        0 => {
            if let Ok(p) = epb::PutRequest::decode(bytes) {
                if let Ok(req) = etcd::convert::put_in(&p) {
                    let req = armada_core::kv::TxnRequest {
                        compare: Vec::new(),
                        success: vec![armada_core::kv::RequestOp::Put(req)],
                        failure: Vec::new(),
                    };
                    run_txn(engine, &req);
                }
            }
        }
        1 => {
            if let Ok(r) = epb::RangeRequest::decode(bytes) {
                if let Ok(req) = etcd::convert::range_in(&r) {
                    run_range(engine, &req);
                }
            }
        }
        2 => {
            if let Ok(t) = epb::TxnRequest::decode(bytes) {
                if let Ok(req) = etcd::convert::txn_in(&t) {
                    run_txn(engine, &req);
                }
            }
        }
        3 => {
            if let Ok(c) = epb::WatchCreateRequest::decode(bytes) {
                if let Ok(spec) = etcd::watch::create_in(c) {
                    let table = TableState { current: armada_core::Revision(6), compacted: armada_core::Revision(0) };
                    let mut stream = WatchStream::new(Default::default(), table);
                    stream.handle_create(spec, table);
                    while stream.poll_response().is_some() {}
                    let _ = stream.poll_history();
                }
            }
        }
        4 => {
            if let Ok(t) = vpb::TxnRequest::decode(bytes) {
                if let Ok(req) = v1::convert::txn_in(&t) {
                    run_txn(engine, &req);
                }
            }
        }
        _ => {
            if let Ok(r) = vpb::RangeRequest::decode(bytes) {
                if let Ok(req) = v1::convert::range_in(&r) {
                    run_range(engine, &req);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

    #[test]
    fn damaged_client_requests_give_errors_not_panics(
        which in any::<prop::sample::Index>(),
        flips in prop::collection::vec(any::<(usize, u8)>(), 1..6),
        cut in any::<usize>(),
    ) {
        let engine = engine();
        let samples = samples();
        let (kind, mut bytes) = which.get(&samples).clone();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        handle(&engine, kind, &bytes);
        bytes.truncate(cut % (bytes.len() + 1));
        handle(&engine, kind, &bytes);
    }

    #[test]
    fn random_client_bytes_give_errors_not_panics(kind in 0u8..6, bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        handle(&engine(), kind, &bytes);
    }
}

#[test]
fn the_undamaged_requests_run() {
    let engine = engine();
    for (kind, bytes) in samples() {
        handle(&engine, kind, &bytes);
    }
    let state = Mvcc::new(&engine, b"t/".to_vec()).rev_state().unwrap();
    assert!(state.current > 6, "the valid puts and txns were executed: {state:?}");
}
