//! The armada.v1 gRPC services. Each method checks and converts the request
//! and asks the node, which forwards to the leader itself when needed.
pub mod cluster;
pub mod convert;
pub mod kv;
pub mod maintenance;
pub mod tables;
pub mod watch;

pub use kv::{ITERATE_PAGE_BYTES, ITERATE_PAGE_KEYS_DEFAULT, ITERATE_PAGE_KEYS_MAX};

use std::sync::Arc;

use armada_core::command::TableReply;
use armada_core::kv::REQUEST_BYTES_MAX;
use armada_core::TableCommand;
use armada_proto::v1 as pb;
use prost::Message;
use tonic::Status;

use crate::api::v1::convert::status;
use crate::node::Node;
use crate::ops::metrics::Metrics;
use crate::types::{ApiError, HeaderInfo};

fn check_size<T: Message>(msg: &T) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > REQUEST_BYTES_MAX {
        return Err(status(&ApiError::Kv(armada_core::kv::KvError::RequestTooLarge { len: len as u64 })));
    }
    Ok(())
}

/// Shared by the three services.
#[derive(Clone)]
pub struct Api {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

impl Api {
    pub fn new(node: Arc<Node>) -> Self {
        Self::with_metrics(node, Arc::new(Metrics::default()))
    }

    pub fn with_metrics(node: Arc<Node>, metrics: Arc<Metrics>) -> Self {
        Self { node, metrics }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    async fn write(&self, table: &str, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), Status> {
        self.node.write(table, cmd).await.map_err(|e| status(&e))
    }

    /// A put with a TTL: grants the table a lease of that TTL for the key
    /// (before the put, as a write of its own: a put that then fails leaves
    /// a lease with no key, which expires harmlessly).
    async fn grant_for_ttl(&self, r: &pb::PutRequest) -> Result<i64, Status> {
        if r.lease != 0 {
            return Err(Status::invalid_argument("a put takes a ttl or a lease, not both"));
        }
        if r.ttl < 0 {
            return Err(Status::invalid_argument(format!("ttl {} is negative", r.ttl)));
        }
        match self.write(&r.table, TableCommand::LeaseGrant { id: 0, ttl: r.ttl }).await? {
            (TableReply::LeaseGranted(g), _) => Ok(g.id),
            (other, _) => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }
}

/// Builds a tonic router serving all armada.v1 services of `api`, each
/// behind its token when `tokens` has one.
#[cfg(not(madsim))]
pub fn router(
    api: Api,
    tokens: &crate::auth::Tokens,
    limits: &crate::limits::Limits,
) -> tonic::transport::server::Router {
    use crate::auth::gate;
    let rate = crate::limits::RateLimiter::new(limits);
    crate::limits::server(limits)
        .add_service(gate(pb::kv_server::KvServer::new(api.clone()), &tokens.kv, &rate))
        .add_service(gate(pb::tables_server::TablesServer::new(api.clone()), &tokens.tables, &rate))
        .add_service(gate(pb::maintenance_server::MaintenanceServer::new(api.clone()), &tokens.maintenance, &rate))
        .add_service(gate(pb::cluster_server::ClusterServer::new(api), &tokens.cluster, &rate))
}

/// Builds a tonic router serving all armada.v1 services of `api` (the
/// simulated world configures no tokens).
#[cfg(madsim)]
pub fn router(
    api: Api,
    _tokens: &crate::auth::Tokens,
    _limits: &crate::limits::Limits,
) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(pb::kv_server::KvServer::new(api.clone()))
        .add_service(pb::tables_server::TablesServer::new(api.clone()))
        .add_service(pb::maintenance_server::MaintenanceServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api))
}
