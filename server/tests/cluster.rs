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
        let put = TableCommand::Put(PutRequest { key: vec![b'k', i], value: vec![i], prev_kv: false });
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
