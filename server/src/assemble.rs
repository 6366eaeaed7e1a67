//! Assembling a node: one function, [`assemble`], builds everything a node
//! runs from its configuration and its adapters: the flusher over the
//! engine, the node runtime over the transport, the gRPC services
//! (armada.v1, etcd v3, and replication on a leader cluster), the follower
//! cluster's replication workers, and the task that creates the etcd table.
//!
//! The production launcher (`crate::launch`, RocksDB, QUIC and TCP
//! listeners) and the simulated world (an engine over a simulated disk,
//! madsim's network) both call it, so what is simulated is what ships; they
//! differ only in the adapters they pass in and in how they serve what it
//! returns (bound listeners, or simulated addresses).
//!
//! Invariant: nothing here decides protocol; it wires parts together. A
//! capability that a node offers is added here once, for both worlds.

use std::sync::Arc;

use armada_core::Engine;
use armada_net::Transport;
use tokio::task::JoinHandle;

use crate::api;
use crate::node::handler::RaftHandler;
use crate::node::{Node, NodeConfig, NodeHooks};
use crate::ops::metrics::Metrics;
use crate::replication::{Follower, ReplicationService, UpstreamClient};
use crate::storage::flusher::{BatchingFlusher, DiskModel};
use crate::types::ApiError;

/// Which kind of cluster the node belongs to.
#[derive(Debug, Clone)]
pub enum Role {
    /// A leader cluster node: creates the etcd table, serves follower
    /// clusters on the replication listener.
    Leader,
    /// A follower cluster node streaming from these replication endpoints
    /// of the leader cluster (`http://host:port`, tried in turn).
    Follower {
        leader_endpoints: Vec<String>,
        /// TLS towards the leader cluster's replication listener (its
        /// endpoints are then `https://`).
        #[cfg(not(madsim))]
        leader_tls: Option<Arc<crate::tls::ClientTlsSource>>,
        /// The leader cluster's replication token, sent with every call.
        #[cfg(not(madsim))]
        leader_token: Option<Arc<crate::auth::TokenSource>>,
    },
}

/// What a node is, apart from its adapters.
#[derive(Debug, Clone)]
pub struct Spec {
    pub node: NodeConfig,
    pub role: Role,
    /// The table the etcd v3 API serves.
    pub etcd_table: String,
    /// This node's etcd API address, as the etcd member list publishes it.
    pub etcd_address: String,
    /// Bearer tokens of the armada.v1 and replication APIs.
    pub tokens: crate::auth::Tokens,
    /// etcd authentication's password hashing and token lifetime.
    pub etcd_auth: api::etcd::auth::EtcdAuthConfig,
    /// Stream, rate and keep-alive limits of the gRPC servers (the
    /// connection limit is the listeners'; real runtime only).
    pub limits: crate::limits::Limits,
}

/// The adapters that differ between production and simulation.
pub struct Parts {
    pub engine: Arc<dyn Engine>,
    /// How the flusher makes the engine durable (a real fsync, or the
    /// simulated disk's).
    pub disk: Arc<dyn DiskModel>,
    pub transport: Arc<dyn Transport>,
    /// Observers the simulated world attaches (none in production).
    pub hooks: NodeHooks,
}

/// A started node and what its caller serves.
pub struct Assembled {
    pub node: Arc<Node>,
    pub metrics: Arc<Metrics>,
    /// Handles every message the cluster transport delivers to this node.
    pub raft_handler: Arc<RaftHandler>,
    /// The armada.v1 services.
    pub api: tonic::transport::server::Router,
    /// The etcd v3 services over [`Spec::etcd_table`].
    pub etcd: tonic::transport::server::Router,
    /// Leader clusters: the replication service for follower clusters.
    pub replication: Option<tonic::transport::server::Router>,
    /// Follower clusters: the replication workers (they stop when dropped).
    pub follower: Option<Arc<Follower>>,
    /// Leader clusters: creates the etcd table once the cluster has a
    /// leader (abort it when stopping).
    pub ensure_table: Option<JoinHandle<()>>,
}

/// Starts a node from `spec` over `parts`: opens every group its storage
/// knows (the cluster elects leaders from here on) and builds its services
/// and workers. Serving the returned routers and handler is the caller's.
pub async fn assemble(spec: Spec, parts: Parts) -> Result<Assembled, ApiError> {
    let flusher = Arc::new(BatchingFlusher::start(parts.engine.clone(), parts.disk));
    let node = Node::start_with(spec.node.clone(), parts.engine, flusher, parts.transport, parts.hooks).await?;
    let metrics = Arc::new(Metrics::default());
    let raft_handler = Arc::new(RaftHandler { node: Arc::downgrade(&node) });
    let api = api::v1::router(api::v1::Api::with_metrics(node.clone(), metrics.clone()), &spec.tokens, &spec.limits);
    let etcd = api::etcd::router(
        api::etcd::EtcdApi::new(node.clone(), spec.etcd_table.clone(), metrics.clone(), &spec.etcd_address)
            .with_auth(spec.etcd_auth.clone()),
        &spec.limits,
    );
    let (replication, follower, ensure_table) = match spec.role {
        Role::Leader => {
            let node2 = node.clone();
            let table = spec.etcd_table.clone();
            let ensure = tokio::spawn(async move { api::etcd::ensure_table(&node2, &table).await });
            let repl = crate::replication::router(ReplicationService::new(node.clone()), &spec.tokens, &spec.limits);
            (Some(repl), None, Some(ensure))
        }
        #[cfg(not(madsim))]
        Role::Follower { leader_endpoints, leader_tls, leader_token } => {
            let up = Arc::new(
                UpstreamClient::new(leader_endpoints, spec.node.request_timeout)
                    .with_tls(leader_tls)
                    .with_token(leader_token),
            );
            (None, Some(Follower::start(node.clone(), up)), None)
        }
        #[cfg(madsim)]
        Role::Follower { leader_endpoints } => {
            let up = Arc::new(UpstreamClient::new(leader_endpoints, spec.node.request_timeout));
            (None, Some(Follower::start(node.clone(), up)), None)
        }
    };
    Ok(Assembled { node, metrics, raft_handler, api, etcd, replication, follower, ensure_table })
}
