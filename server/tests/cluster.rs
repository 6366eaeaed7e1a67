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
use armada_server::network::RaftHandler;
use armada_server::node::{ApiError, Node, NodeConfig, RaftTuning};

async fn cluster(n: u64) -> Vec<Arc<Node>> {
    let router = LocalRouter::new();
    let members: BTreeMap<u64, ArmadaNode> =
        (1..=n).map(|i| (i, ArmadaNode { raft_addr: format!("raft-{i}"), api_addr: format!("api-{i}") })).collect();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let cfg = NodeConfig {
            id: i,
            members: members.clone(),
            raft: RaftTuning::default(),
            request_timeout: Duration::from_secs(5),
        };
        let node = Node::start(cfg, engine.clone(), Arc::new(InlineFlusher(engine)), Arc::new(router.transport()))
            .await
            .expect("node starts");
        router.register(&format!("raft-{i}"), Arc::new(RaftHandler { node: Arc::downgrade(&node) }));
        nodes.push(node);
    }
    nodes
}

/// Follows `Forward` answers the way the gRPC layer does.
fn by_api<'a>(nodes: &'a [Arc<Node>], api: &str) -> &'a Arc<Node> {
    nodes.iter().find(|n| n.config().me().map(|m| m.api_addr.as_str()) == Some(api)).expect("known member")
}

async fn retry<T, F, Fut>(nodes: &[Arc<Node>], f: F) -> Result<T, ApiError>
where
    F: FnMut(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    retry_from(nodes, 0, f).await
}

async fn retry_from<T, F, Fut>(nodes: &[Arc<Node>], start: usize, mut f: F) -> Result<T, ApiError>
where
    F: FnMut(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut target = nodes[start].clone();
    for _ in 0..200 {
        match f(target.clone()).await {
            Err(ApiError::Forward { api_addr }) => target = by_api(nodes, &api_addr).clone(),
            Err(ApiError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return other,
        }
    }
    Err(ApiError::Unavailable("gave up".into()))
}

#[tokio::test(flavor = "current_thread")]
async fn three_nodes_replicate_writes_and_serve_linearizable_reads() {
    let nodes = cluster(3).await;
    let info = retry(&nodes, |n| async move { n.create_table("t", 0).await }).await.expect("create table");
    assert_eq!(info.name, "t");
    for i in 0..5u8 {
        let put = TableCommand::Put(PutRequest { key: vec![b'k', i], value: vec![i], prev_kv: false });
        let (reply, _) = retry(&nodes, |n| {
            let put = put.clone();
            async move { n.write("t", put, 0).await }
        })
        .await
        .expect("put");
        assert!(matches!(reply, TableReply::Put(p) if p.revision == 2 + u64::from(i)));
    }
    // A linearizable read through every node sees all five writes.
    for start in 0..nodes.len() {
        let req = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
        let resp = retry_from(&nodes, start, |n| {
            let req = req.clone();
            async move { n.range("t", &req, false, 0).await }
        })
        .await;
        match resp {
            Ok((r, _)) => assert_eq!(r.count, 5),
            Err(e) => panic!("read failed: {e}"),
        }
    }
    let missing = retry(&nodes, |n| async move {
        n.range("nope", &RangeRequest { key: b"k".to_vec(), ..Default::default() }, false, 0).await
    })
    .await;
    assert_eq!(missing.err(), Some(ApiError::TableNotFound("nope".into())));
    let bad = retry(&nodes, |n| async move { n.write("t", TableCommand::Put(PutRequest::default()), 0).await }).await;
    assert_eq!(bad.err(), Some(ApiError::Kv(KvError::EmptyKey)));
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
