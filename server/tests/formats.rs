//! Compatibility of Armada's storage and wire formats with committed golden
//! fixtures (`tests/fixtures/format-*`): a data directory and inter-node
//! messages written by an earlier release must still open and decode.
//!
//! Each fixture directory holds `engine.txt` (every key and value of a
//! single node's engine after a fixed workload, hex, one pair per line),
//! `reads.txt` (what reads on that node answered before it stopped) and
//! `messages.txt` (named inter-node messages, hex). The test opens a node
//! over each engine dump and compares its reads, then decodes each message.
//!
//! `ARMADA_WRITE_FIXTURES=DIR cargo test -p armada-server --test formats`
//! writes a new fixture directory from the current build (done once per
//! format change; earlier directories stay, they are the point).
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::kv::{Compare, CompareOp, CompareTarget, DeleteRangeRequest, PutRequest, RangeRequest};
use armada_core::kv::{RequestOp, TxnRequest};
use armada_core::raft::{ArmadaNode, InlineFlusher};
use armada_core::{Engine, MemEngine, TableCommand};
use armada_net::local::LocalRouter;
use armada_server::node::handler::RaftHandler;
use armada_server::node::{ClientRequest, Node, NodeConfig, RaftTuning};
use armada_server::types::ApiError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("fixture is hex")).collect()
}

/// A single node over `engine` (its Raft group elects itself).
async fn node_over(engine: Arc<dyn Engine>) -> Arc<Node> {
    let router = LocalRouter::new();
    let members: BTreeMap<u64, ArmadaNode> =
        [(1, ArmadaNode { raft_addr: "raft-1".into(), api_addr: "api-1".into() })].into();
    // Frequent snapshots, so that the fixture holds a snapshot-purged log.
    let raft = RaftTuning { snapshot_after_logs: 8, logs_kept_after_snapshot: 2, ..RaftTuning::default() };
    let cfg = NodeConfig::founding(1, members, raft, Duration::from_secs(5));
    let node = Node::start(cfg, engine.clone(), Arc::new(InlineFlusher(engine)), Arc::new(router.transport()))
        .await
        .expect("node starts");
    router.register("raft-1", Arc::new(RaftHandler { node: Arc::downgrade(&node) }));
    node
}

/// Retries while the node elects itself.
async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    for _ in 0..200 {
        match f().await {
            Ok(v) => return v,
            Err(ApiError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    panic!("no leader after 5 s");
}

fn put(key: &str, value: &str) -> TableCommand {
    TableCommand::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        prev_kv: false,
        ..Default::default()
    })
}

/// The fixed workload: two tables, puts, a delete, a range delete, a
/// transaction, a compaction, enough entries for a snapshot.
async fn workload(node: &Node) {
    retry(|| node.create_table("alpha")).await;
    retry(|| node.create_table("beta")).await;
    for i in 0..12 {
        retry(|| node.write("alpha", put(&format!("k{i:02}"), &format!("value-{i}")))).await;
    }
    retry(|| node.write("alpha", put("k01", "second"))).await;
    retry(|| {
        node.write(
            "alpha",
            TableCommand::DeleteRange(DeleteRangeRequest { key: b"k05".to_vec(), ..Default::default() }),
        )
    })
    .await;
    retry(|| {
        node.write(
            "alpha",
            TableCommand::DeleteRange(DeleteRangeRequest {
                key: b"k08".to_vec(),
                range_end: b"k10".to_vec(),
                prev_kv: false,
            }),
        )
    })
    .await;
    let txn = TxnRequest {
        compare: vec![Compare {
            key: b"k01".to_vec(),
            range_end: Vec::new(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(b"second".to_vec()),
        }],
        success: vec![RequestOp::Put(PutRequest {
            key: b"k20".to_vec(),
            value: b"txn".to_vec(),
            prev_kv: false,
            ..Default::default()
        })],
        failure: Vec::new(),
    };
    retry(|| node.write("alpha", TableCommand::Txn(txn.clone()))).await;
    retry(|| node.write("alpha", TableCommand::Compact(4))).await;
    retry(|| node.write("beta", put("only", "one"))).await;
    // Leases (format 2): one with a key on it, one revoked with its key.
    for id in [7, 8] {
        retry(|| node.write("alpha", TableCommand::LeaseGrant { id, ttl: 1_000_000 })).await;
        let leased = PutRequest {
            key: format!("l{id}").into_bytes(),
            value: b"leased".to_vec(),
            lease: id,
            ..Default::default()
        };
        retry(|| node.write("alpha", TableCommand::Put(leased.clone()))).await;
    }
    retry(|| node.write("alpha", TableCommand::LeaseRevoke { id: 8 })).await;
}

/// A read's key-values as the fixtures record them: a key on no lease
/// prints as before leases existed, so answers recorded by earlier formats
/// compare unchanged.
fn kvs_text(r: &armada_core::kv::RangeResponse) -> String {
    format!("{:?}", (r.revision, r.count, &r.kvs)).replace(", lease: 0 }", " }")
}

/// Reads whose answers a fixture records: every key of each table now, and
/// table alpha at an earlier revision.
async fn reads(node: &Node) -> Vec<(String, String)> {
    let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
    let mut out = Vec::new();
    for table in ["alpha", "beta"] {
        let (r, _) = retry(|| node.range(table, &all, false)).await;
        out.push((format!("{table} all"), kvs_text(&r)));
    }
    let at = RangeRequest { key: vec![0], range_end: vec![0], revision: 10, ..Default::default() };
    let (r, _) = retry(|| node.range("alpha", &at, false)).await;
    out.push(("alpha at 10".into(), kvs_text(&r)));
    let tables = retry(|| node.list_tables()).await;
    out.push(("tables".into(), format!("{:?}", tables.iter().map(|t| (&t.name, t.id)).collect::<Vec<_>>())));
    out
}

fn dump(engine: &dyn Engine) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut pairs = Vec::new();
    engine
        .scan(&[], &[0xff; 16], &mut |k, v| {
            pairs.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan");
    pairs
}

/// Representative inter-node messages, by name, as this build sends them.
fn messages() -> Vec<(&'static str, Vec<u8>)> {
    use armada_server::node::wire::{encode_payload, encode_reply, encode_request, WIRE_FORMAT};
    use armada_server::node::wire::{Envelope, RaftReply, RaftRequest, RemoteError};
    let req = ClientRequest::Write { table: "alpha".into(), cmd: put("k", "v"), hops: 1 };
    let forward = Envelope { group: armada_core::GroupId(7), request: RaftRequest::Client { id: (42, 9), req } };
    let range = ClientRequest::Range {
        table: "alpha".into(),
        req: RangeRequest { key: b"a".to_vec(), range_end: b"z".to_vec(), limit: 3, ..Default::default() },
        serializable: true,
        hops: 0,
    };
    let forward_range =
        Envelope { group: armada_core::GroupId::META, request: RaftRequest::Client { id: (1, 2), req: range } };
    let reply_err = RaftReply::Client(Err(RemoteError::TableNotFound("gone".into())));
    let refused = RaftReply::Refused("stopping".into());
    let resume = Envelope { group: armada_core::GroupId(3), request: RaftRequest::SnapshotResume { stream: 77 } };
    let compacted = TableReply::Compact(armada_core::kv::CompactResponse { revision: 5 });
    let leased =
        TableCommand::Put(PutRequest { key: b"l".to_vec(), value: b"v".to_vec(), lease: 7, ..Default::default() });
    let lease_query = ClientRequest::Lease {
        table: "alpha".into(),
        query: armada_core::lease::LeaseQuery::KeepAlive { id: 7 },
        hops: 0,
    };
    let forward_lease =
        Envelope { group: armada_core::GroupId::META, request: RaftRequest::Client { id: (3, 4), req: lease_query } };
    vec![
        ("forward-write", encode_request(&forward)),
        ("forward-range", encode_request(&forward_range)),
        ("reply-error", encode_reply(&reply_err, WIRE_FORMAT)),
        ("reply-refused", encode_reply(&refused, WIRE_FORMAT)),
        ("snapshot-resume", encode_request(&resume)),
        ("replication-command", encode_payload(&put("key", "value"), WIRE_FORMAT)),
        ("replication-reply", encode_payload(&compacted, WIRE_FORMAT)),
        ("replication-error", encode_payload(&RemoteError::Unavailable("no leader".into()), WIRE_FORMAT)),
        // Format 2 on.
        ("replication-leased-put", encode_payload(&leased, WIRE_FORMAT)),
        ("forward-lease-query", encode_request(&forward_lease)),
    ]
}

fn write_fixture(dir: &Path, engine: &[(Vec<u8>, Vec<u8>)], reads: &[(String, String)]) {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let lines: String = engine.iter().map(|(k, v)| format!("{} {}\n", hex(k), hex(v))).collect();
    std::fs::write(dir.join("engine.txt"), lines).expect("write engine.txt");
    let lines: String = reads.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect();
    std::fs::write(dir.join("reads.txt"), lines).expect("write reads.txt");
    let lines: String = messages().iter().map(|(k, v)| format!("{k} {}\n", hex(v))).collect();
    std::fs::write(dir.join("messages.txt"), lines).expect("write messages.txt");
}

#[tokio::test(flavor = "current_thread")]
async fn fixtures_of_every_format_open_and_decode() {
    if let Ok(dir) = std::env::var("ARMADA_WRITE_FIXTURES") {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let node = node_over(engine.clone()).await;
        workload(&node).await;
        // Let the snapshot builder run, so the log is purged behind one.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answers = reads(&node).await;
        node.shutdown().await;
        write_fixture(&fixtures().join(dir), &dump(&*engine), &answers);
        return;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("tests/fixtures exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("format-")))
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no format fixtures found");
    for dir in dirs {
        check_fixture(&dir).await;
    }
}

async fn check_fixture(dir: &Path) {
    let name = dir.display();
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let text = std::fs::read_to_string(dir.join("engine.txt")).expect("engine.txt");
    let mut batch = armada_core::engine::WriteBatch::new();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').expect("key value");
        batch.put(unhex(k), unhex(v));
    }
    engine.write(batch).expect("load the dump");
    let node = node_over(engine.clone()).await;
    let want: Vec<(String, String)> = std::fs::read_to_string(dir.join("reads.txt"))
        .expect("reads.txt")
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').expect("name and answer");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(reads(&node).await, want, "{name}: reads over the fixture's data directory");
    // It still takes writes, at the next revision.
    let (reply, _) = retry(|| node.write("alpha", put("after", "upgrade"))).await;
    let TableReply::Put(p) = reply else { panic!("{name}: unexpected reply {reply:?}") };
    let last: u64 = want[0].1.trim_start_matches('(').split(',').next().and_then(|r| r.parse().ok()).expect("revision");
    assert_eq!(p.revision, last + 1, "{name}: the first write after opening");
    node.shutdown().await;
    check_messages(dir);
}

fn decoded<T>(r: Result<T, armada_server::node::wire::WireError>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn check_messages(dir: &Path) {
    use armada_server::node::wire::{decode_payload, decode_reply, decode_request, encode_payload, encode_reply};
    use armada_server::node::wire::{encode_request, RemoteError, WIRE_FORMAT};
    let name = dir.display();
    let text = std::fs::read_to_string(dir.join("messages.txt")).expect("messages.txt");
    let got: BTreeMap<&str, Vec<u8>> = text
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').expect("name bytes");
            (k, unhex(v))
        })
        .collect();
    let want: BTreeMap<&str, Vec<u8>> = messages().into_iter().collect();
    for k in got.keys() {
        assert!(want.contains_key(k), "{name}: message {k} is not one this build knows");
    }
    for (k, bytes) in &got {
        // Each decodes (whatever its version), and means what this build
        // means by it: re-encoded by this build, it is what this build sends.
        let what = format!("{name}: {k}");
        let again = match *k {
            "forward-write" | "forward-range" | "snapshot-resume" | "forward-lease-query" => {
                encode_request(&decoded(decode_request(bytes), &what).0)
            }
            "reply-error" | "reply-refused" => encode_reply(&decoded(decode_reply(bytes), &what), WIRE_FORMAT),
            "replication-command" | "replication-leased-put" => {
                let (c, _): (TableCommand, u8) = decoded(decode_payload(bytes), &what);
                encode_payload(&c, WIRE_FORMAT)
            }
            "replication-reply" => {
                let (c, _): (TableReply, u8) = decoded(decode_payload(bytes), &what);
                encode_payload(&c, WIRE_FORMAT)
            }
            "replication-error" => {
                let (c, _): (RemoteError, u8) = decoded(decode_payload(bytes), &what);
                encode_payload(&c, WIRE_FORMAT)
            }
            other => panic!("{name}: unknown message {other}"),
        };
        assert_eq!(&again, &want[k], "{name}: {k} decodes to what this build encodes");
    }
}

/// A data directory in a format this build does not know (a newer
/// release's) stops the node's start with a message saying so, and is left
/// as it was.
#[tokio::test(flavor = "current_thread")]
async fn a_data_directory_of_an_unknown_format_is_refused() {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let mut batch = armada_core::engine::WriteBatch::new();
    batch.put(armada_core::codec::FORMAT_KEY.to_vec(), vec![armada_core::codec::FORMAT + 1]);
    batch.put(b"g-something".to_vec(), b"\x03newer".to_vec());
    engine.write(batch).expect("write");
    let router = LocalRouter::new();
    let members: BTreeMap<u64, ArmadaNode> =
        [(1, ArmadaNode { raft_addr: "raft-1".into(), api_addr: "api-1".into() })].into();
    let cfg = NodeConfig::founding(1, members, RaftTuning::default(), Duration::from_secs(5));
    let err =
        match Node::start(cfg, engine.clone(), Arc::new(InlineFlusher(engine.clone())), Arc::new(router.transport()))
            .await
        {
            Ok(_) => panic!("a node started over a directory of format {}", armada_core::codec::FORMAT + 1),
            Err(e) => e.to_string(),
        };
    let newer = armada_core::codec::FORMAT + 1;
    assert!(err.contains(&format!("format version {newer}, which this build cannot read")), "{err}");
    assert_eq!(engine.get(b"g-something").expect("get"), Some(b"\x03newer".to_vec()), "the directory was changed");
}
