//! armada.v1 `IterateRange` on a launched node: a range of any size streams
//! in pages that are all read at the revision of the first.
#![cfg(not(madsim))]

mod common;

use armada_proto::v1 as pb;
use armada_server::listen::{endpoint, ListenerKind};

fn put(key: String, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into_bytes(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

async fn txn(c: &mut pb::kv_client::KvClient<tonic::transport::Channel>, success: Vec<pb::RequestOp>) -> i64 {
    let r = c.txn(pb::TxnRequest { table: "t".into(), compare: vec![], success, failure: vec![] }).await.unwrap();
    r.into_inner().header.unwrap().revision
}

async fn scan(
    c: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
    req: pb::IterateRangeRequest,
) -> Vec<pb::IterateRangeResponse> {
    let mut s = c.iterate_range(req).await.unwrap().into_inner();
    let mut pages = Vec::new();
    while let Some(p) = s.message().await.unwrap() {
        pages.push(p);
    }
    pages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_range_streams_in_pages_read_at_one_revision() {
    let (node, dir) = common::launch_in_process("scan").await;
    let ch =
        endpoint(&format!("http://{}", node.address(ListenerKind::Api).unwrap())).unwrap().connect().await.unwrap();
    pb::tables_client::TablesClient::new(ch.clone()).create(pb::CreateTableRequest { name: "t".into() }).await.unwrap();
    let mut c = pb::kv_client::KvClient::new(ch);
    // 2,000 keys, then a second version of every even one.
    for batch in 0..20 {
        txn(&mut c, (0..100).map(|i| put(format!("k{:05}", batch * 100 + i), "v1")).collect()).await;
    }
    for batch in 0..10 {
        txn(&mut c, (0..100).map(|i| put(format!("k{:05}", batch * 200 + i * 2), "v2")).collect()).await;
    }
    let all = pb::IterateRangeRequest {
        table: "t".into(),
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
        page_keys: 300,
        ..Default::default()
    };

    // Writes after the first page do not show in the later ones.
    let mut s = c.iterate_range(all.clone()).await.unwrap().into_inner();
    let first = s.message().await.unwrap().expect("a first page");
    let at = first.header.as_ref().unwrap().revision;
    assert_eq!((first.kvs.len(), first.more), (300, true));
    txn(&mut c, (0..100).map(|i| put(format!("k{:05}", 1900 + i), "v3")).collect()).await;
    let gone = c
        .delete_range(pb::DeleteRangeRequest {
            table: "t".into(),
            key: b"k00500".to_vec(),
            range_end: b"k00600".to_vec(),
            prev_kv: false,
        })
        .await
        .unwrap();
    assert!(gone.into_inner().header.unwrap().revision > at);
    let mut kvs = first.kvs;
    let mut pages = 1;
    while let Some(p) = s.message().await.unwrap() {
        assert!(p.kvs.len() <= 300, "a page holds at most page_keys");
        assert_eq!(p.header.as_ref().unwrap().revision, at, "every page is read at the first one's revision");
        kvs.extend(p.kvs);
        pages += 1;
        if !p.more {
            break;
        }
    }
    assert!(s.message().await.unwrap().is_none(), "the stream ends after the last page");
    assert_eq!(pages, 7);
    assert_eq!(kvs.len(), 2000);
    for (i, kv) in kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("k{i:05}").into_bytes(), "in key order, each key once");
        let expected: &[u8] = if i % 2 == 0 { b"v2" } else { b"v1" };
        assert_eq!(kv.value, expected, "{:?}", String::from_utf8_lossy(&kv.key));
    }

    // The same at an explicit past revision, with a total limit and keys only.
    let pages =
        scan(&mut c, pb::IterateRangeRequest { revision: at, limit: 650, keys_only: true, ..all.clone() }).await;
    let kvs: Vec<_> = pages.iter().flat_map(|p| p.kvs.iter()).collect();
    assert_eq!(kvs.len(), 650);
    assert!(kvs.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(kvs[649].key, b"k00649");
    assert!(!pages.last().unwrap().more);

    // The latest revision now: 1,900 keys, the last 100 rewritten.
    let pages = scan(&mut c, all).await;
    let kvs: Vec<_> = pages.iter().flat_map(|p| p.kvs.iter()).collect();
    assert_eq!(kvs.len(), 1900);
    assert_eq!(kvs.last().unwrap().value, b"v3");
    let _ = std::fs::remove_dir_all(&dir);
}
