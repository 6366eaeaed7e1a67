//! Plain-tokio tests of the node runtime: three nodes in one process over the
//! in-process transport. (The simulated world tests the same runtime under
//! faults; these catch wiring regressions fast.)
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::kv::{KvError, PutRequest, RangeRequest};
use armada_core::raft::{ArmadaNode, InlineFlusher};
use armada_core::{Engine, MemEngine, TableCommand};
use armada_net::local::LocalRouter;
use armada_server::node::handler::RaftHandler;
use armada_server::node::{Node, NodeConfig, RaftTuning};
use armada_server::types::ApiError;

mod common;

async fn cluster(n: u64) -> Vec<Arc<Node>> {
    cluster_with(n, RaftTuning::default(), Duration::from_secs(5)).await
}

async fn cluster_with(n: u64, raft: RaftTuning, request_timeout: Duration) -> Vec<Arc<Node>> {
    let router = LocalRouter::new();
    let members: BTreeMap<u64, ArmadaNode> =
        (1..=n).map(|i| (i, ArmadaNode { raft_addr: format!("raft-{i}"), api_addr: format!("api-{i}") })).collect();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let cfg = NodeConfig::founding(i, members.clone(), raft.clone(), request_timeout);
        let node = Node::start(cfg, engine.clone(), Arc::new(InlineFlusher(engine)), Arc::new(router.transport()))
            .await
            .expect("node starts");
        router.register(&format!("raft-{i}"), Arc::new(RaftHandler { node: Arc::downgrade(&node) }));
        nodes.push(node);
    }
    nodes
}

/// Retries while no leader is available (elections at start-up).
async fn retry<T, F, Fut>(mut f: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    for _ in 0..200 {
        match f().await {
            Err(ApiError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return other,
        }
    }
    Err(ApiError::Unavailable("gave up".into()))
}

#[tokio::test(flavor = "current_thread")]
async fn three_nodes_replicate_writes_and_serve_linearizable_reads() {
    let nodes = cluster(3).await;
    let info = retry(|| nodes[0].create_table("t")).await.expect("create table");
    assert_eq!(info.name, "t");
    // Writes through every node: followers forward to the leader.
    for i in 0..6u8 {
        let put =
            TableCommand::Put(PutRequest { key: vec![b'k', i], value: vec![i], prev_kv: false, ..Default::default() });
        let node = &nodes[usize::from(i) % nodes.len()];
        let (reply, _) = retry(|| node.write("t", put.clone())).await.expect("put");
        assert!(matches!(reply, TableReply::Put(p) if p.revision == 2 + u64::from(i)));
    }
    // A linearizable read through every node sees all writes.
    for n in &nodes {
        let req = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
        let (r, _) = retry(|| n.range("t", &req, false)).await.expect("read");
        assert_eq!(r.count, 6);
    }
    let tables = retry(|| nodes[2].list_tables()).await.expect("list");
    assert_eq!(tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["t"]);
    let probe = RangeRequest { key: b"k".to_vec(), ..Default::default() };
    let missing = retry(|| nodes[1].range("nope", &probe, false)).await;
    assert_eq!(missing.err(), Some(ApiError::TableNotFound("nope".into())));
    let bad = retry(|| nodes[1].write("t", TableCommand::Put(PutRequest::default()))).await;
    assert_eq!(bad.err(), Some(ApiError::Kv(KvError::EmptyKey)));
}

/// A table whose Raft group has not elected a leader when the creation's
/// wait ends is reported as such, not as a plain success: the creation
/// committed (a retry says it exists) and the table serves once the group
/// elects. Before, `Tables.Create` returned success after the wait timed out.
#[tokio::test(flavor = "current_thread")]
async fn a_create_whose_group_has_no_leader_in_time_says_so() {
    // Three nodes (a single voter elects itself at once) whose elections
    // take 3 s or more; a request may wait 1 s.
    let raft = RaftTuning {
        heartbeat_ms: 500,
        election_timeout_min_ms: 3000,
        election_timeout_max_ms: 3500,
        ..RaftTuning::default()
    };
    let nodes = cluster_with(3, raft, Duration::from_secs(1)).await;
    let node = &nodes[0];
    retry(|| node.list_tables()).await.expect("the metadata group elects");
    match node.create_table("t").await {
        Err(ApiError::Lagging(m)) => assert!(m.contains("was created") && m.contains("no leader"), "{m}"),
        other => panic!("expected a report that the group has no leader yet, got {other:?}"),
    }
    let again = node.create_table("t").await;
    assert!(matches!(again, Err(ApiError::Meta(armada_core::command::MetaError::TableExists(_)))), "{again:?}");
    let put = TableCommand::Put(PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        prev_kv: false,
        ..Default::default()
    });
    retry(|| node.write("t", put.clone())).await.expect("the table serves once its group elects");
}

mod storage_suite {
    use std::sync::Arc;

    use armada_core::raft::{GroupKind, InlineFlusher, LogStore, StateMachine};
    use armada_core::{Engine, GroupId, MemEngine};
    use armada_server::node::C;
    use armada_server::rt::ArmadaRt;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::StorageError;

    struct Builder;

    impl StoreBuilder<C, LogStore<ArmadaRt>, StateMachine<ArmadaRt>> for Builder {
        async fn build(&self) -> Result<((), LogStore<ArmadaRt>, StateMachine<ArmadaRt>), StorageError<C>> {
            let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
            let flusher = Arc::new(InlineFlusher(engine.clone()));
            let log = LogStore::new(engine.clone(), GroupId(7), flusher.clone());
            let sm = StateMachine::new(engine, GroupId(7), GroupKind::Table, flusher);
            Ok(((), log, sm))
        }
    }

    /// openraft's own conformance suite for log stores and state machines,
    /// run against Armada's adapters over the in-memory engine. (It covers,
    /// among others, the purge marker that once decoded with the wrong type.)
    #[tokio::test(flavor = "current_thread")]
    async fn openraft_storage_suite_passes() {
        Suite::test_all(Builder).await.expect("storage suite");
    }
}

/// Every listener of a launched node (armada.v1, etcd, replication, HTTP)
/// sets TCP_NODELAY on the sockets it accepts. Without it, each small gRPC
/// answer waited for the client's delayed ACK: 40 ms per request (etcd's
/// benchmark tool: 27 puts/s at one client). The check reads the option back
/// from each accepted socket, so it does not depend on the machine's speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_sets_nodelay_on_accepted_sockets() {
    use armada_proto::{etcd as epb, replication as rpb, v1 as pb};
    use armada_server::listen::{endpoint, ListenerKind};

    let (node, dir) = common::launch_in_process("launch-nodelay").await;
    let url = |k: ListenerKind| format!("http://{}", node.address(k).expect("listener bound"));

    let ch = endpoint(&url(ListenerKind::Api)).unwrap().connect().await.unwrap();
    pb::cluster_client::ClusterClient::new(ch).status(pb::StatusRequest {}).await.expect("armada.v1 Status");
    let ch = endpoint(&url(ListenerKind::Etcd)).unwrap().connect().await.unwrap();
    epb::kv_client::KvClient::new(ch)
        .put(epb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })
        .await
        .expect("etcd put right after readiness");
    let ch = endpoint(&url(ListenerKind::Replication)).unwrap().connect().await.unwrap();
    let mut catalog =
        rpb::replication_client::ReplicationClient::new(ch).catalog(rpb::CatalogRequest {}).await.unwrap().into_inner();
    let first = catalog.message().await.unwrap().expect("a catalog update");
    assert!(first.tables.iter().any(|t| t.name == "default"), "{first:?}");
    drop(catalog);
    let http = node.address(ListenerKind::Http).unwrap().to_string();
    let (code, _) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&http).unwrap();
        write!(s, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (out.split_whitespace().nth(1).unwrap_or("").to_string(), out)
    })
    .await
    .unwrap();
    assert_eq!(code, "200");

    let stats = node.listener_stats();
    assert_eq!(stats.len(), 4, "api, etcd, replication and http listeners");
    for (kind, s) in stats {
        assert!(s.accepted() >= 1, "{kind:?}: no connection accepted");
        assert_eq!(s.with_nodelay(), s.accepted(), "{kind:?}: an accepted socket without TCP_NODELAY");
    }
    node.run_until(async {}).await.expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Creating tables back to back on one node: each creation starts its group
/// while the catalog watcher may be starting it too. Both once opened the
/// same group (two Raft instances over one storage), and openraft panicked
/// in one of them ("new membership has to have a greater log_id"), leaving
/// the table unable to commit. Groups now start one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_back_to_back_all_accept_writes() {
    let nodes = cluster_with(1, RaftTuning::default(), Duration::from_secs(3)).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // More starters racing the creations, as the watcher does.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (node, done) = (nodes[0].clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    node.sync_groups().await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut opened = Vec::new();
    for i in 0..30 {
        let name = format!("t{i}");
        let info = retry(|| nodes[0].create_table(&name)).await.expect("create table");
        opened.push((info.id, nodes[0].group(info.id).expect("the group runs once created")));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in racers {
        r.await.unwrap();
    }
    for (id, first) in &opened {
        let now = nodes[0].group(*id).expect("still running");
        assert!(Arc::ptr_eq(first, &now), "group {id} was started a second time over the same storage");
    }
    for i in 0..30 {
        let put =
            TableCommand::Put(PutRequest { key: b"k".to_vec(), value: vec![1], prev_kv: false, ..Default::default() });
        let name = format!("t{i}");
        retry(|| nodes[0].write(&name, put.clone())).await.unwrap_or_else(|e| panic!("write to {name}: {e}"));
    }
}

/// A range whose answer would exceed the node's response limit is refused
/// with a clear error naming the limit and what to do; asking for fewer
/// keys (limit, count_only, keys_only) answers as usual.
#[tokio::test(flavor = "current_thread")]
async fn a_range_over_the_response_limit_is_refused_clearly() {
    let tuning = RaftTuning { max_response_bytes: 4096, ..RaftTuning::default() };
    let nodes = cluster_with(1, tuning, Duration::from_secs(5)).await;
    retry(|| nodes[0].create_table("t")).await.expect("create table");
    for i in 0..10u8 {
        let put = TableCommand::Put(PutRequest {
            key: vec![b'k', i],
            value: vec![b'v'; 1024],
            prev_kv: false,
            ..Default::default()
        });
        retry(|| nodes[0].write("t", put.clone())).await.expect("put");
    }
    let all = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let Err(e) = retry(|| nodes[0].range("t", &all, false)).await else {
        panic!("a range over the limit was answered")
    };
    match &e {
        // The read stops at the key that crossed the limit: never more than
        // about the limit is held in memory.
        ApiError::Kv(KvError::ResponseTooLarge { keys: 4, limit: 4096, bytes }) if *bytes > 4096 => {}
        other => panic!("unexpected: {other:?}"),
    }
    assert!(e.to_string().contains("ask for fewer keys"), "{e}");
    let limited = RangeRequest { limit: 3, ..all.clone() };
    let (r, _) = retry(|| nodes[0].range("t", &limited, false)).await.expect("limit");
    assert_eq!((r.kvs.len(), r.more, r.count), (3, true, 10));
    let counted = RangeRequest { count_only: true, ..all.clone() };
    let (r, _) = retry(|| nodes[0].range("t", &counted, false)).await.expect("count");
    assert_eq!(r.count, 10);
    let keys = RangeRequest { keys_only: true, ..all.clone() };
    let (r, _) = retry(|| nodes[0].range("t", &keys, false)).await.expect("keys");
    assert_eq!(r.kvs.len(), 10);
}

/// An engine whose writes start failing when told to (a disk gone bad).
struct FailingEngine {
    inner: MemEngine,
    fail: std::sync::atomic::AtomicBool,
}

impl Engine for FailingEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, armada_core::EngineError> {
        self.inner.get(key)
    }
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), armada_core::EngineError> {
        self.inner.scan(start, end, visit)
    }
    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<armada_core::engine::Pair>, armada_core::EngineError> {
        self.inner.last(start, end)
    }
    fn write(&self, batch: armada_core::engine::WriteBatch) -> Result<(), armada_core::EngineError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(armada_core::EngineError::Backend("No space left on device".into()));
        }
        self.inner.write(batch)
    }
    fn sync(&self) -> Result<(), armada_core::EngineError> {
        self.inner.sync()
    }
    fn view(
        &self,
        start: &[u8],
        end: &[u8],
    ) -> Result<Arc<dyn armada_core::engine::EngineView>, armada_core::EngineError> {
        self.inner.view(start, end)
    }
}

/// A node whose storage fails stops: the failed write is not acknowledged,
/// `failed()` resolves with the reason, and every later request is refused
/// (the process then exits and its supervisor restarts it).
#[tokio::test(flavor = "current_thread")]
async fn a_node_whose_storage_fails_stops_and_acknowledges_nothing() {
    let engine = Arc::new(FailingEngine { inner: MemEngine::new(), fail: std::sync::atomic::AtomicBool::new(false) });
    let members = BTreeMap::from([(1, ArmadaNode { raft_addr: "raft-1".into(), api_addr: "api-1".into() })]);
    let cfg = NodeConfig::founding(1, members, RaftTuning::default(), Duration::from_secs(2));
    let router = LocalRouter::new();
    let dyn_engine: Arc<dyn Engine> = engine.clone();
    let node = Node::start(cfg, dyn_engine.clone(), Arc::new(InlineFlusher(dyn_engine)), Arc::new(router.transport()))
        .await
        .expect("node starts");
    retry(|| node.create_table("t")).await.expect("create table");
    let put = |v: &str| {
        TableCommand::Put(PutRequest { key: b"k".to_vec(), value: v.as_bytes().to_vec(), ..Default::default() })
    };
    retry(|| node.write("t", put("1"))).await.expect("a write before the failure");
    assert!(node.failure().is_none());
    engine.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = node.write("t", put("2")).await;
    assert!(r.is_err(), "a write the disk refused was acknowledged: {r:?}");
    let why = tokio::time::timeout(Duration::from_secs(5), node.failed()).await.expect("the node stops");
    assert!(why.contains("No space left on device"), "reason: {why}");
    match node.write("t", put("3")).await {
        Err(ApiError::Unavailable(m)) => assert!(m.contains("has stopped"), "{m}"),
        other => panic!("a stopped node answered {other:?}"),
    }
    let read = node.range("t", &RangeRequest { key: b"k".to_vec(), ..Default::default() }, true).await;
    assert!(matches!(read, Err(ApiError::Unavailable(_))), "a stopped node served a read: {read:?}");
}
