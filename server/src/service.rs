//! The armada.v1 gRPC services. Each method checks and converts the request
//! and asks the node, which forwards to the leader itself when needed.

use std::sync::Arc;

use armada_core::command::TableReply;
use armada_core::kv::REQUEST_BYTES_MAX;
use armada_core::TableCommand;
use armada_proto::v1 as pb;
use armada_proto::v1::cluster_server::Cluster;
use armada_proto::v1::kv_server::Kv;
use armada_proto::v1::tables_server::Tables;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::convert::*;
use crate::metrics::Metrics;
use crate::node::{ApiError, HeaderInfo, Node};

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
}

/// Key-values per `IterateRange` page by default, and at most.
pub const ITERATE_PAGE_KEYS_DEFAULT: usize = 1000;
pub const ITERATE_PAGE_KEYS_MAX: usize = 100_000;
/// About the most bytes of keys and values in one `IterateRange` page.
pub const ITERATE_PAGE_BYTES: usize = 1 << 20;

type IterateStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::IterateRangeResponse, Status>> + Send>>;

/// Where an `IterateRange` stands between pages.
struct Iteration {
    node: Arc<Node>,
    table: String,
    next: Vec<u8>,
    end: Option<Vec<u8>>,
    revision: u64,
    header: HeaderInfo,
    page_keys: usize,
    /// Key-values still allowed by the request's limit (`None`: no limit).
    left: Option<u64>,
    keys_only: bool,
}

impl Iteration {
    async fn next_page(&mut self) -> Result<pb::IterateRangeResponse, Status> {
        let max_keys = self.left.map_or(self.page_keys, |l| self.page_keys.min(l as usize));
        let (mut kvs, more) = self
            .node
            .range_page(&self.table, &self.next, self.end.as_deref(), self.revision, max_keys, ITERATE_PAGE_BYTES)
            .await
            .map_err(|e| status(&e))?;
        Ok(self.advance(&mut kvs, more))
    }

    /// Moves past `kvs` and builds their message.
    fn advance(&mut self, kvs: &mut Vec<armada_core::kv::KeyValue>, more: bool) -> pb::IterateRangeResponse {
        if let Some(last) = kvs.last() {
            self.next = last.key.clone();
            self.next.push(0);
        }
        if let Some(l) = &mut self.left {
            *l = l.saturating_sub(kvs.len() as u64);
        }
        let more = more && self.left != Some(0);
        if self.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value.clear());
        }
        pb::IterateRangeResponse {
            header: header(self.header, self.revision),
            kvs: std::mem::take(kvs).into_iter().map(kv_out).collect(),
            more,
            count: 0,
        }
    }
}

#[tonic::async_trait]
impl Kv for Api {
    type IterateRangeStream = IterateStream;

    async fn iterate_range(
        &self,
        request: Request<pb::IterateRangeRequest>,
    ) -> Result<Response<Self::IterateRangeStream>, Status> {
        let r = request.into_inner();
        check_size(&r)?;
        let page_keys = match r.page_keys as usize {
            0 => ITERATE_PAGE_KEYS_DEFAULT,
            n => n.min(ITERATE_PAGE_KEYS_MAX),
        };
        let left = (r.limit > 0).then_some(r.limit as u64);
        if r.limit < 0 || r.revision < 0 {
            return Err(Status::invalid_argument("limit and revision must not be negative"));
        }
        let group = self.node.table_group(&r.table, 0).await.map_err(|e| status(&e))?;
        // The revision every page is read at: the one asked for; or this
        // node's applied revision (serializable); or, linearizable, the
        // table's revision after a read index at its leader (a one-key read
        // through the usual path, forwarded as needed). Pages are then read
        // here, so no page (not even the first) counts or scans the whole
        // range.
        let revision = if r.revision > 0 {
            r.revision as u64
        } else if r.serializable {
            self.node.table_revision(group.id)
        } else {
            let probe = armada_core::kv::RangeRequest { key: r.key.clone(), keys_only: true, ..Default::default() };
            self.node.range(&r.table, &probe, false).await.map_err(|e| status(&e))?.0.revision
        };
        let (_, end) = armada_core::kv::interval(&r.key, &r.range_end);
        let it = Iteration {
            node: self.node.clone(),
            table: r.table,
            next: r.key,
            end,
            revision,
            header: self.node.header(&group),
            page_keys,
            left,
            keys_only: r.keys_only,
        };
        let pages = futures::stream::unfold((it, true), |(mut it, more)| async move {
            if !more {
                return None;
            }
            match it.next_page().await {
                Ok(page) => {
                    let more = page.more;
                    Some((Ok(page), (it, more)))
                }
                Err(e) => Some((Err(e), (it, false))),
            }
        });
        Ok(Response::new(Box::pin(pages)))
    }

    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        self.metrics
            .timed("Range", async move {
                let r = request.into_inner();
                check_size(&r)?;
                let req = range_in(&r)?;
                let (resp, h) = self.node.range(&r.table, &req, r.serializable).await.map_err(|e| status(&e))?;
                Ok(Response::new(range_out(resp, h)))
            })
            .await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.metrics
            .timed("Put", async move {
                let r = request.into_inner();
                check_size(&r)?;
                match self.write(&r.table, TableCommand::Put(put_in(&r))).await? {
                    (TableReply::Put(p), h) => Ok(Response::new(put_out(p, h))),
                    (other, _) => Err(Status::internal(format!("unexpected reply {other:?}"))),
                }
            })
            .await
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.metrics
            .timed("DeleteRange", async move {
                let r = request.into_inner();
                check_size(&r)?;
                match self.write(&r.table, TableCommand::DeleteRange(delete_in(&r))).await? {
                    (TableReply::DeleteRange(d), h) => Ok(Response::new(delete_out(d, h))),
                    (other, _) => Err(Status::internal(format!("unexpected reply {other:?}"))),
                }
            })
            .await
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        self.metrics
            .timed("Txn", async move {
                let r = request.into_inner();
                check_size(&r)?;
                let txn = txn_in(&r)?;
                match self.write(&r.table, TableCommand::Txn(txn)).await? {
                    (TableReply::Txn(t), h) => Ok(Response::new(txn_out(t, h))),
                    (other, _) => Err(Status::internal(format!("unexpected reply {other:?}"))),
                }
            })
            .await
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        self.metrics
            .timed("Compact", async move {
                let r = request.into_inner();
                let rev = u64::try_from(r.revision).map_err(|_| {
                    Status::invalid_argument(format!("revision must not be negative, got {}", r.revision))
                })?;
                let (reply, h) = self.write(&r.table, TableCommand::Compact(rev)).await?;
                Ok(Response::new(pb::CompactionResponse { header: header(h, reply_revision(&reply)) }))
            })
            .await
    }
}

#[tonic::async_trait]
impl Tables for Api {
    async fn create(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        self.metrics
            .timed("TablesCreate", async move {
                let t = self.node.create_table(&request.into_inner().name).await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::CreateTableResponse { table: Some(table_out(t)) }))
            })
            .await
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteTableRequest>,
    ) -> Result<Response<pb::DeleteTableResponse>, Status> {
        self.metrics
            .timed("TablesDelete", async move {
                self.node.delete_table(&request.into_inner().name).await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::DeleteTableResponse {}))
            })
            .await
    }

    async fn list(&self, _request: Request<pb::ListTablesRequest>) -> Result<Response<pb::ListTablesResponse>, Status> {
        self.metrics
            .timed("TablesList", async move {
                let t = self.node.list_tables().await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::ListTablesResponse { tables: t.into_iter().map(table_out).collect() }))
            })
            .await
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("MemberList", async move {
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
            })
            .await
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.metrics
            .timed("Status", async move {
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
                        leader_revision: g.leader_revision,
                        lag_revisions: g.lag_revisions,
                        lag_seconds: g.lag_seconds,
                        replication_state: g.replication.name().to_string(),
                        replication_error: g.replication.error().to_string(),
                    })
                    .collect();
                let role = if self.node.is_follower() { "follower" } else { "leader" }.to_string();
                Ok(Response::new(pb::StatusResponse { member_id: self.node.id(), groups, role }))
            })
            .await
    }
}

type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for Api {
    type BackupStream = BackupStream;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<BackupStream>, Status> {
        let table = request.into_inner().table;
        let writer = self.node.backup(&table).await.map_err(|e| status(&e))?;
        // The view stays alive with the writer (its reader holds it).
        let stream = futures::stream::unfold(Some(writer), |w| async move {
            let mut w = w?;
            match w.next_block() {
                Ok(Some(data)) => Some((Ok(pb::BackupChunk { data }), Some(w))),
                Ok(None) => None,
                Err(e) => Some((Err(Status::internal(format!("reading the backup image: {e}"))), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Builds a tonic router serving all armada.v1 services of `api`.
pub fn router(api: Api) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(pb::kv_server::KvServer::new(api.clone()))
        .add_service(pb::tables_server::TablesServer::new(api.clone()))
        .add_service(pb::maintenance_server::MaintenanceServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api))
}
