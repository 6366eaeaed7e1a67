//! etcd v3 compatibility: the `etcdserverpb` KV, Watch, Lease and Auth
//! services, Maintenance and Cluster.MemberList, served over one Armada table
//! (`--etcd-table`); its leases are that table's.
//!
//! Requests become the same core commands as armada.v1 requests, so
//! revisions, versions and transaction semantics are the table's. What
//! differs is the edge: negative revisions and limits mean "none" (as in
//! etcd), errors carry etcd's gRPC codes and messages (clients such as
//! etcdctl and clientv3 recognise errors by their text), and the features
//! Armada does not have (nested transactions, Alarm, MoveLeader) are
//! refused with a clear error instead of being half-done.

pub mod auth;
pub mod cluster;
pub mod convert;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

pub use convert::{delete_in, put_in, range_in, txn_in};

use std::sync::Arc;

use armada_core::command::{MetaError, TableReply};
use armada_core::kv::{KvError, REQUEST_BYTES_MAX};
use armada_core::TableCommand;
use armada_proto::etcd as pb;
use prost::Message;
use tonic::{Code, Status};

use crate::node::Node;
use crate::ops::metrics::Metrics;
use crate::types::{ApiError, HeaderInfo};

/// The etcd API version Armada answers to (`etcdctl endpoint status`).
pub const ETCD_API_VERSION: &str = "3.4.0";

/// etcd's error text for each failure, with its gRPC code.
pub fn etcd_status(e: &ApiError) -> Status {
    match e {
        ApiError::Kv(k) => match k {
            KvError::EmptyKey => Status::invalid_argument("etcdserver: key is not provided"),
            KvError::Compacted { .. } => Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
            KvError::FutureRevision { .. } => {
                Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
            }
            KvError::DuplicateKey => Status::invalid_argument("etcdserver: duplicate key given in txn request"),
            KvError::TooManyTxnOps { .. } => Status::invalid_argument("etcdserver: too many operations in txn request"),
            KvError::RequestTooLarge { .. } => Status::invalid_argument("etcdserver: request is too large"),
            KvError::ResponseTooLarge { .. } => Status::resource_exhausted(format!("etcdserver: {k}")),
            KvError::LeaseNotFound { .. } => Status::not_found("etcdserver: requested lease not found"),
            KvError::LeaseExists { .. } => Status::failed_precondition("etcdserver: lease already exists"),
            KvError::LeaseTtlTooLarge { .. } => Status::out_of_range("etcdserver: too large lease TTL"),
            other => Status::invalid_argument(format!("etcdserver: {other}")),
        },
        ApiError::TableNotFound(t) | ApiError::Meta(MetaError::TableNotFound(t)) => {
            Status::not_found(format!("etcdserver: armada table {t:?} (the etcd table) does not exist"))
        }
        ApiError::Meta(MetaError::Auth(a)) => auth::auth_status(a),
        ApiError::Meta(m) => Status::invalid_argument(format!("etcdserver: {m}")),
        ApiError::Unavailable(_) => Status::unavailable("etcdserver: no leader"),
        ApiError::Indeterminate(_) => Status::unavailable("etcdserver: request timed out"),
        ApiError::ReadOnly(_) => Status::failed_precondition(format!("etcdserver: {e}")),
        ApiError::Lagging(_) => Status::deadline_exceeded(format!("etcdserver: {e}")),
        ApiError::Internal(_) => Status::internal(format!("etcdserver: {e}")),
    }
}

fn unsupported(what: &str) -> Status {
    Status::new(Code::Unimplemented, format!("etcdserver: {what} is not supported by Armada"))
}

fn check_size<T: Message>(msg: &T) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > REQUEST_BYTES_MAX {
        return Err(etcd_status(&ApiError::Kv(KvError::RequestTooLarge { len: len as u64 })));
    }
    Ok(())
}

/// etcd reads a non-positive revision, limit or filter bound as "none".
fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The etcd v3 services over one table.
#[derive(Clone)]
pub struct EtcdApi {
    node: Arc<Node>,
    table: String,
    metrics: Arc<Metrics>,
    /// This node's etcd address, as member list publishes it.
    client_url: String,
    cluster_id: u64,
    /// The recorded cluster id, once this node has the record (a node that
    /// joined later has no founding members of its own).
    recorded_cluster_id: std::sync::OnceLock<u64>,
    /// The catalog epoch at which no record was found: the record is looked
    /// for again only once the catalog has changed (not on every answer).
    unrecorded_at: Arc<std::sync::atomic::AtomicU64>,
    /// Password hashing and token lifetime of etcd authentication.
    auth: auth::EtcdAuthConfig,
}

impl EtcdApi {
    pub fn new(node: Arc<Node>, table: String, metrics: Arc<Metrics>, etcd_address: &str) -> Self {
        // Until the cluster records its members: a digest of the initial
        // ones (the same digest the record keeps).
        let cluster_id = armada_core::members::cluster_id_of(
            node.config().members.iter().map(|(id, m)| (*id, m.raft_addr.as_str())),
        );
        Self {
            node,
            table,
            metrics,
            client_url: format!("http://{etcd_address}"),
            cluster_id,
            recorded_cluster_id: std::sync::OnceLock::new(),
            unrecorded_at: Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            auth: auth::EtcdAuthConfig::default(),
        }
    }

    /// Sets how passwords are hashed and how long tokens live.
    pub fn with_auth(mut self, auth: auth::EtcdAuthConfig) -> Self {
        self.auth = auth;
        self
    }

    fn header(&self, h: HeaderInfo, revision: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id(),
            member_id: h.member_id.get(),
            revision: to_i64(revision),
            raft_term: h.term,
        })
    }

    /// The cluster's id: the recorded one, or the initial members' digest
    /// before the record exists.
    fn cluster_id(&self) -> u64 {
        use std::sync::atomic::Ordering;
        if let Some(id) = self.recorded_cluster_id.get() {
            return *id;
        }
        // Read before the record: a change applied meanwhile moves it on.
        let epoch = self.node.catalog_epoch();
        if self.unrecorded_at.load(Ordering::Relaxed) == epoch {
            return self.cluster_id;
        }
        match self.node.members_record() {
            Ok(Some(r)) => *self.recorded_cluster_id.get_or_init(|| r.cluster_id),
            _ => {
                self.unrecorded_at.store(epoch, Ordering::Relaxed);
                self.cluster_id
            }
        }
    }

    async fn write(&self, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), Status> {
        self.node.write(&self.table, cmd).await.map_err(|e| etcd_status(&e))
    }
}

/// A tonic router serving the etcd v3 services of `api`, each behind the
/// request rate of `limits` (real runtime).
#[cfg(not(madsim))]
pub fn router(api: EtcdApi, limits: &crate::limits::Limits) -> tonic::transport::server::Router {
    use crate::auth::gate;
    let rate = crate::limits::RateLimiter::new(limits);
    crate::limits::server(limits)
        .add_service(gate(pb::kv_server::KvServer::new(api.clone()), &None, &rate))
        .add_service(gate(pb::maintenance_server::MaintenanceServer::new(api.clone()), &None, &rate))
        .add_service(gate(pb::cluster_server::ClusterServer::new(api.clone()), &None, &rate))
        .add_service(gate(pb::lease_server::LeaseServer::new(api.clone()), &None, &rate))
        .add_service(gate(pb::auth_server::AuthServer::new(api.clone()), &None, &rate))
        .add_service(gate(pb::watch_server::WatchServer::new(api), &None, &rate))
}

/// A tonic router serving the etcd v3 services of `api` (the simulated
/// world sets no limits).
#[cfg(madsim)]
pub fn router(api: EtcdApi, _limits: &crate::limits::Limits) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(pb::kv_server::KvServer::new(api.clone()))
        .add_service(pb::maintenance_server::MaintenanceServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api.clone()))
        .add_service(pb::lease_server::LeaseServer::new(api.clone()))
        .add_service(pb::auth_server::AuthServer::new(api.clone()))
        .add_service(pb::watch_server::WatchServer::new(api))
}

/// Creates the etcd table unless it exists, retrying while the cluster has
/// no leader yet. Returns once the table exists.
pub async fn ensure_table(node: &Node, table: &str) {
    loop {
        match node.create_table(table).await {
            Ok(_) => {
                tracing::info!(table, "created the etcd table");
                return;
            }
            Err(ApiError::Meta(MetaError::TableExists(_))) => return,
            Err(e) => {
                tracing::debug!(table, "etcd table not created yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}
