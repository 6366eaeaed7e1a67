//! The armada.v1 gRPC services. Each method converts the request, asks the
//! node, and forwards to the leader the node names (at most
//! `FORWARD_HOPS_MAX` hops, counted in the `armada-hops` metadata entry).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::kv::REQUEST_BYTES_MAX;
use armada_core::TableCommand;
use armada_proto::v1 as pb;
use armada_proto::v1::cluster_server::Cluster;
use armada_proto::v1::kv_server::Kv;
use armada_proto::v1::tables_server::Tables;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::convert::*;
use crate::node::{ApiError, Node};

const HOPS_KEY: &str = "armada-hops";
/// How long a forwarding connection attempt may take.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(HOPS_KEY).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn check_size<T: Message>(msg: &T) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > REQUEST_BYTES_MAX {
        return Err(status(&ApiError::Kv(armada_core::kv::KvError::RequestTooLarge { len: len as u64 })));
    }
    Ok(())
}

/// Shared by the three services: the node and cached channels to peers.
#[derive(Clone)]
pub struct Api {
    node: Arc<Node>,
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
}

impl Api {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node, channels: Arc::new(Mutex::new(BTreeMap::new())) }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    async fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self.channels.lock().unwrap_or_else(|p| p.into_inner()).get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("bad peer address {addr}: {e}")))?
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .timeout(self.node.config().request_timeout * 2);
        let ch =
            endpoint.connect().await.map_err(|e| Status::unavailable(format!("leader {addr} unreachable: {e}")))?;
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn forward_request<T>(msg: T, hops: u32) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(HOPS_KEY, (hops + 1).to_string().parse().expect("a decimal number is valid metadata"));
        r
    }

    /// A forwarded call that failed in transit may or may not have been
    /// applied by the leader: say so, with `Unknown`.
    fn forward_error(&self, addr: &str, s: Status) -> Status {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                if !s.message().starts_with("no leader") =>
            {
                self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
                Status::unknown(format!("forwarding to {addr}: {}", s.message()))
            }
            _ => s,
        }
    }

    async fn write(&self, table: &str, cmd: TableCommand, hops: u32) -> Result<Result<TableReply, String>, Status> {
        match self.node.write(table, cmd, hops).await {
            Ok((r, _)) => Ok(Ok(r)),
            Err(ApiError::Forward { api_addr }) => Ok(Err(api_addr)),
            Err(e) => Err(status(&e)),
        }
    }
}

#[tonic::async_trait]
impl Kv for Api {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        check_size(&r)?;
        let req = range_in(&r)?;
        match self.node.range(&r.table, &req, r.serializable, hops).await {
            Ok((resp, h)) => Ok(Response::new(range_out(resp, h))),
            Err(ApiError::Forward { api_addr }) => {
                let mut c = pb::kv_client::KvClient::new(self.channel(&api_addr).await?);
                c.range(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&api_addr, s))
            }
            Err(e) => Err(status(&e)),
        }
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        check_size(&r)?;
        match self.write(&r.table, TableCommand::Put(put_in(&r)), hops).await? {
            Ok(TableReply::Put(p)) => {
                let h = self.node.table_group(&r.table, hops).await.map(|g| self.node.header(&g)).unwrap_or_default();
                Ok(Response::new(put_out(p, h)))
            }
            Ok(other) => Err(Status::internal(format!("unexpected reply {other:?}"))),
            Err(addr) => {
                let mut c = pb::kv_client::KvClient::new(self.channel(&addr).await?);
                c.put(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&addr, s))
            }
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        check_size(&r)?;
        match self.write(&r.table, TableCommand::DeleteRange(delete_in(&r)), hops).await? {
            Ok(TableReply::DeleteRange(d)) => {
                let h = self.node.table_group(&r.table, hops).await.map(|g| self.node.header(&g)).unwrap_or_default();
                Ok(Response::new(delete_out(d, h)))
            }
            Ok(other) => Err(Status::internal(format!("unexpected reply {other:?}"))),
            Err(addr) => {
                let mut c = pb::kv_client::KvClient::new(self.channel(&addr).await?);
                c.delete_range(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&addr, s))
            }
        }
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        check_size(&r)?;
        let txn = txn_in(&r)?;
        match self.write(&r.table, TableCommand::Txn(txn), hops).await? {
            Ok(TableReply::Txn(t)) => {
                let h = self.node.table_group(&r.table, hops).await.map(|g| self.node.header(&g)).unwrap_or_default();
                Ok(Response::new(txn_out(t, h)))
            }
            Ok(other) => Err(Status::internal(format!("unexpected reply {other:?}"))),
            Err(addr) => {
                let mut c = pb::kv_client::KvClient::new(self.channel(&addr).await?);
                c.txn(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&addr, s))
            }
        }
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        let rev = u64::try_from(r.revision)
            .map_err(|_| Status::invalid_argument(format!("revision must not be negative, got {}", r.revision)))?;
        match self.write(&r.table, TableCommand::Compact(rev), hops).await? {
            Ok(reply) => {
                let h = self.node.table_group(&r.table, hops).await.map(|g| self.node.header(&g)).unwrap_or_default();
                Ok(Response::new(pb::CompactionResponse { header: header(h, reply_revision(&reply)) }))
            }
            Err(addr) => {
                let mut c = pb::kv_client::KvClient::new(self.channel(&addr).await?);
                c.compact(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&addr, s))
            }
        }
    }
}

#[tonic::async_trait]
impl Tables for Api {
    async fn create(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        match self.node.create_table(&r.name, hops).await {
            Ok(t) => Ok(Response::new(pb::CreateTableResponse { table: Some(table_out(t)) })),
            Err(ApiError::Forward { api_addr }) => {
                let mut c = pb::tables_client::TablesClient::new(self.channel(&api_addr).await?);
                c.create(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&api_addr, s))
            }
            Err(e) => Err(status(&e)),
        }
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteTableRequest>,
    ) -> Result<Response<pb::DeleteTableResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        match self.node.delete_table(&r.name, hops).await {
            Ok(_) => Ok(Response::new(pb::DeleteTableResponse {})),
            Err(ApiError::Forward { api_addr }) => {
                let mut c = pb::tables_client::TablesClient::new(self.channel(&api_addr).await?);
                c.delete(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&api_addr, s))
            }
            Err(e) => Err(status(&e)),
        }
    }

    async fn list(&self, request: Request<pb::ListTablesRequest>) -> Result<Response<pb::ListTablesResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        match self.node.list_tables(hops).await {
            Ok(t) => Ok(Response::new(pb::ListTablesResponse { tables: t.into_iter().map(table_out).collect() })),
            Err(ApiError::Forward { api_addr }) => {
                let mut c = pb::tables_client::TablesClient::new(self.channel(&api_addr).await?);
                c.list(Self::forward_request(r, hops)).await.map_err(|s| self.forward_error(&api_addr, s))
            }
            Err(e) => Err(status(&e)),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let members = self
            .node
            .config()
            .members
            .iter()
            .map(|(id, n)| pb::Member {
                id: *id,
                name: format!("node-{id}"),
                raft_address: n.raft_addr.clone(),
                api_address: n.api_addr.clone(),
            })
            .collect();
        Ok(Response::new(pb::MemberListResponse { members }))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let groups = self
            .node
            .status()
            .into_iter()
            .map(|g| pb::GroupStatus {
                table: g.table,
                leader_id: g.leader_id,
                raft_term: g.term,
                raft_commit_index: g.commit_index,
                raft_applied_index: g.applied_index,
                revision: i64::try_from(g.revision).unwrap_or(i64::MAX),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse { member_id: self.node.id(), groups }))
    }
}

/// Builds a tonic router serving all armada.v1 services of `api`.
pub fn router(api: Api) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(pb::kv_server::KvServer::new(api.clone()))
        .add_service(pb::tables_server::TablesServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api))
}
