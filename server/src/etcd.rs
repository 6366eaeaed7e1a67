//! etcd v3 compatibility: the `etcdserverpb` KV service, Maintenance.Status
//! and Cluster.MemberList, served over one Armada table (`--etcd-table`).
//!
//! Requests become the same core commands as armada.v1 requests, so
//! revisions, versions and transaction semantics are the table's. What
//! differs is the edge: negative revisions and limits mean "none" (as in
//! etcd), errors carry etcd's gRPC codes and messages (clients such as
//! etcdctl and clientv3 recognise errors by their text), and the features
//! Armada does not have (leases, nested transactions, `ignore_value`) are
//! refused with a clear error instead of being half-done.

use std::sync::Arc;

use armada_core::command::{MetaError, TableReply};
use armada_core::kv::{self as kv, KvError, REQUEST_BYTES_MAX};
use armada_core::mvcc::Fnv64;
use armada_core::TableCommand;
use armada_proto::etcd as pb;
use prost::Message;
use tonic::{Code, Request, Response, Status};

use crate::metrics::Metrics;
use crate::node::{ApiError, HeaderInfo, Node};

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
            other => Status::invalid_argument(format!("etcdserver: {other}")),
        },
        ApiError::TableNotFound(t) | ApiError::Meta(MetaError::TableNotFound(t)) => {
            Status::not_found(format!("etcdserver: armada table {t:?} (the etcd table) does not exist"))
        }
        ApiError::Meta(m) => Status::invalid_argument(format!("etcdserver: {m}")),
        ApiError::Unavailable(_) => Status::unavailable("etcdserver: no leader"),
        ApiError::Indeterminate(_) => Status::unavailable("etcdserver: request timed out"),
        ApiError::ReadOnly(_) => Status::failed_precondition(format!("etcdserver: {e}")),
        ApiError::Lagging(_) => Status::deadline_exceeded(format!("etcdserver: {e}")),
        ApiError::Forward { .. } | ApiError::Internal(_) => Status::internal(format!("etcdserver: {e}")),
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

fn kv_out(k: kv::KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        create_revision: to_i64(k.create_revision),
        mod_revision: to_i64(k.mod_revision),
        version: to_i64(k.version),
        value: k.value,
        lease: 0,
    }
}

pub fn range_in(r: &pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    use pb::range_request::{SortOrder, SortTarget};
    let sort_order = match SortOrder::try_from(r.sort_order) {
        Ok(SortOrder::None) => kv::SortOrder::None,
        Ok(SortOrder::Ascend) => kv::SortOrder::Ascend,
        Ok(SortOrder::Descend) => kv::SortOrder::Descend,
        Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown sort order {}", r.sort_order))),
    };
    let sort_target = match SortTarget::try_from(r.sort_target) {
        Ok(SortTarget::Key) => kv::SortTarget::Key,
        Ok(SortTarget::Version) => kv::SortTarget::Version,
        Ok(SortTarget::Create) => kv::SortTarget::Create,
        Ok(SortTarget::Mod) => kv::SortTarget::Mod,
        Ok(SortTarget::Value) => kv::SortTarget::Value,
        Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown sort target {}", r.sort_target))),
    };
    Ok(kv::RangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        limit: non_negative(r.limit),
        revision: non_negative(r.revision),
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: non_negative(r.min_mod_revision),
        max_mod_revision: non_negative(r.max_mod_revision),
        min_create_revision: non_negative(r.min_create_revision),
        max_create_revision: non_negative(r.max_create_revision),
    })
}

pub fn put_in(p: &pb::PutRequest) -> Result<kv::PutRequest, Status> {
    if p.lease != 0 {
        // Armada has no leases, so no lease id exists.
        return Err(Status::not_found("etcdserver: requested lease not found"));
    }
    if p.ignore_value {
        return Err(unsupported("put with ignore_value"));
    }
    if p.ignore_lease {
        return Err(unsupported("put with ignore_lease"));
    }
    Ok(kv::PutRequest { key: p.key.clone(), value: p.value.clone(), prev_kv: p.prev_kv })
}

pub fn delete_in(d: &pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest { key: d.key.clone(), range_end: d.range_end.clone(), prev_kv: d.prev_kv }
}

fn op_in(op: &pb::RequestOp) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::RequestRange(r)) => Ok(kv::RequestOp::Range(range_in(r)?)),
        Some(Request::RequestPut(p)) => Ok(kv::RequestOp::Put(put_in(p)?)),
        Some(Request::RequestDeleteRange(d)) => Ok(kv::RequestOp::DeleteRange(delete_in(d))),
        Some(Request::RequestTxn(_)) => Err(unsupported("a nested transaction")),
        None => Err(Status::invalid_argument("etcdserver: txn operation without a request")),
    }
}

fn compare_in(c: &pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let op = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => kv::CompareOp::Equal,
        Ok(CompareResult::NotEqual) => kv::CompareOp::NotEqual,
        Ok(CompareResult::Greater) => kv::CompareOp::Greater,
        Ok(CompareResult::Less) => kv::CompareOp::Less,
        Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown compare result {}", c.result))),
    };
    // As in etcd, a missing operand is the zero value of the target's type.
    let target = match (CompareTarget::try_from(c.target), &c.target_union) {
        (Ok(CompareTarget::Version), Some(TargetUnion::Version(v))) => kv::CompareTarget::Version(*v),
        (Ok(CompareTarget::Version), None) => kv::CompareTarget::Version(0),
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v))) => kv::CompareTarget::CreateRevision(*v),
        (Ok(CompareTarget::Create), None) => kv::CompareTarget::CreateRevision(0),
        (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v))) => kv::CompareTarget::ModRevision(*v),
        (Ok(CompareTarget::Mod), None) => kv::CompareTarget::ModRevision(0),
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => kv::CompareTarget::Value(v.clone()),
        (Ok(CompareTarget::Value), None) => kv::CompareTarget::Value(Vec::new()),
        (Ok(CompareTarget::Lease), _) => return Err(unsupported("a compare on leases")),
        (Ok(t), Some(_)) => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: compare target {t:?} does not match its operand"
            )))
        }
        (Err(_), _) => {
            return Err(Status::invalid_argument(format!("etcdserver: unknown compare target {}", c.target)))
        }
    };
    Ok(kv::Compare { key: c.key.clone(), range_end: c.range_end.clone(), op, target })
}

pub fn txn_in(t: &pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    Ok(kv::TxnRequest {
        compare: t.compare.iter().map(compare_in).collect::<Result<_, _>>()?,
        success: t.success.iter().map(op_in).collect::<Result<_, _>>()?,
        failure: t.failure.iter().map(op_in).collect::<Result<_, _>>()?,
    })
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
}

impl EtcdApi {
    pub fn new(node: Arc<Node>, table: String, metrics: Arc<Metrics>, etcd_address: &str) -> Self {
        // A stable cluster id: a digest of the initial membership.
        let mut h = Fnv64::new();
        for (id, m) in &node.config().members {
            h.write_u64(*id);
            h.write_bytes(m.raft_addr.as_bytes());
        }
        let cluster_id = h.finish();
        Self { node, table, metrics, client_url: format!("http://{etcd_address}"), cluster_id }
    }

    fn header(&self, h: HeaderInfo, revision: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: h.member_id,
            revision: to_i64(revision),
            raft_term: h.term,
        })
    }

    fn range_out(&self, r: kv::RangeResponse, h: HeaderInfo) -> pb::RangeResponse {
        pb::RangeResponse {
            header: self.header(h, r.revision),
            kvs: r.kvs.into_iter().map(kv_out).collect(),
            more: r.more,
            count: to_i64(r.count),
        }
    }

    fn put_out(&self, r: kv::PutResponse, h: HeaderInfo) -> pb::PutResponse {
        pb::PutResponse { header: self.header(h, r.revision), prev_kv: r.prev_kv.map(kv_out) }
    }

    fn delete_out(&self, r: kv::DeleteRangeResponse, h: HeaderInfo) -> pb::DeleteRangeResponse {
        pb::DeleteRangeResponse {
            header: self.header(h, r.revision),
            deleted: to_i64(r.deleted),
            prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
        }
    }

    fn txn_out(&self, r: kv::TxnResponse, h: HeaderInfo) -> pb::TxnResponse {
        use pb::response_op::Response;
        pb::TxnResponse {
            header: self.header(h, r.revision),
            succeeded: r.succeeded,
            responses: r
                .responses
                .into_iter()
                .map(|op| pb::ResponseOp {
                    response: Some(match op {
                        kv::ResponseOp::Range(x) => Response::ResponseRange(self.range_out(x, h)),
                        kv::ResponseOp::Put(x) => Response::ResponsePut(self.put_out(x, h)),
                        kv::ResponseOp::DeleteRange(x) => Response::ResponseDeleteRange(self.delete_out(x, h)),
                    }),
                })
                .collect(),
        }
    }

    async fn write(&self, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), Status> {
        self.node.write(&self.table, cmd).await.map_err(|e| etcd_status(&e))
    }
}

fn unexpected(r: &TableReply) -> Status {
    Status::internal(format!("etcdserver: unexpected reply {r:?}"))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for EtcdApi {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        self.metrics
            .timed("etcd.Range", async move {
                let r = request.into_inner();
                check_size(&r)?;
                let req = range_in(&r)?;
                let (resp, h) =
                    self.node.range(&self.table, &req, r.serializable).await.map_err(|e| etcd_status(&e))?;
                Ok(Response::new(self.range_out(resp, h)))
            })
            .await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.metrics
            .timed("etcd.Put", async move {
                let r = request.into_inner();
                check_size(&r)?;
                match self.write(TableCommand::Put(put_in(&r)?)).await? {
                    (TableReply::Put(p), h) => Ok(Response::new(self.put_out(p, h))),
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.metrics
            .timed("etcd.DeleteRange", async move {
                let r = request.into_inner();
                check_size(&r)?;
                match self.write(TableCommand::DeleteRange(delete_in(&r))).await? {
                    (TableReply::DeleteRange(d), h) => Ok(Response::new(self.delete_out(d, h))),
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        self.metrics
            .timed("etcd.Txn", async move {
                let r = request.into_inner();
                check_size(&r)?;
                match self.write(TableCommand::Txn(txn_in(&r)?)).await? {
                    (TableReply::Txn(t), h) => Ok(Response::new(self.txn_out(t, h))),
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        self.metrics
            .timed("etcd.Compact", async move {
                let r = request.into_inner();
                // etcd answers a compaction at or below the compacted revision,
                // negative ones included, with "compacted".
                let rev = u64::try_from(r.revision)
                    .map_err(|_| etcd_status(&ApiError::Kv(KvError::Compacted { requested: 0, compacted: 0 })))?;
                let (reply, h) = self.write(TableCommand::Compact(rev)).await?;
                Ok(Response::new(pb::CompactionResponse { header: self.header(h, reply.revision()) }))
            })
            .await
    }
}

/// [`crate::rt::blocking`] with etcd's error text.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    crate::rt::blocking(f).await.map_err(|e| Status::internal(format!("etcdserver: {e}")))
}

type SnapshotStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for EtcdApi {
    type SnapshotStream = SnapshotStream;

    /// Reclaims the storage space of deleted data on this node.
    async fn defragment(
        &self,
        _request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let group = self.node.table_group(&self.table, 0).await.map_err(|e| etcd_status(&e))?;
        let engine = self.node.engine().clone();
        blocking(move || engine.defragment()).await?.map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::DefragmentResponse { header: self.header(h, self.node.table_revision(group.id)) }))
    }

    /// A hash of everything this node stores for the etcd table (live keys
    /// and history): equal on members that agree.
    async fn hash(&self, _request: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        let group = self.node.table_group(&self.table, 0).await.map_err(|e| etcd_status(&e))?;
        let (node, id) = (self.node.clone(), group.id);
        let hash = blocking(move || {
            let mut h = Fnv64::new();
            armada_core::mvcc::Mvcc::new(&**node.engine(), armada_core::raft::data_ns(id)).scan_raw(&mut |k, v| {
                h.write_bytes(k);
                h.write_bytes(v);
                true
            })?;
            let x = h.finish();
            Ok::<u32, armada_core::EngineError>((x ^ (x >> 32)) as u32)
        })
        .await?
        .map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::HashResponse { header: self.header(h, self.node.table_revision(group.id)), hash }))
    }

    /// A hash of the key-values live at a revision (0: now), with the
    /// compaction revision.
    async fn hash_kv(&self, request: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        let revision = u64::try_from(request.into_inner().revision)
            .map_err(|_| Status::invalid_argument("etcdserver: revision must not be negative"))?;
        let group = self.node.table_group(&self.table, 0).await.map_err(|e| etcd_status(&e))?;
        let (node, id) = (self.node.clone(), group.id);
        let (hash, rev, compacted) = blocking(move || {
            armada_core::mvcc::Mvcc::new(&**node.engine(), armada_core::raft::data_ns(id)).hash_kv(revision)
        })
        .await?
        .map_err(|e| match e {
            armada_core::mvcc::MvccError::Kv(k) => etcd_status(&ApiError::Kv(k)),
            other => Status::internal(format!("etcdserver: {other}")),
        })?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::HashKvResponse { header: self.header(h, rev), hash, compact_revision: to_i64(compacted) }))
    }

    /// The etcd table's backup, in Armada's backup format.
    async fn snapshot(&self, _request: Request<pb::SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        let writer = self.node.backup(&self.table).await.map_err(|e| etcd_status(&e))?;
        let group = self.node.table_group(&self.table, 0).await.map_err(|e| etcd_status(&e))?;
        let mut header = self.header(self.node.header(&group), writer.revision());
        // etcdctl's `snapshot save` wants the stream to end with zero
        // padding to a multiple of 512 bytes and a SHA-256 of all before it.
        struct St {
            writer: Option<armada_core::backup::BackupWriter>,
            sha: sha2::Sha256,
            sent: u64,
        }
        let st = St { writer: Some(writer), sha: <sha2::Sha256 as sha2::Digest>::new(), sent: 0 };
        let stream = futures::stream::unfold(Some(st), move |st| {
            let first = header.take();
            async move {
                use sha2::Digest;
                let mut st = st?;
                let w = st.writer.as_mut()?;
                match w.next_block() {
                    Ok(Some(blob)) => {
                        st.sha.update(&blob);
                        st.sent += blob.len() as u64;
                        // The size is not known in advance: 1 until the last.
                        Some((Ok(pb::SnapshotResponse { header: first, remaining_bytes: 1, blob }), Some(st)))
                    }
                    Ok(None) => {
                        let align = armada_core::backup::ETCD_TRAILER_ALIGN;
                        let pad = (align - st.sent % align) % align;
                        let mut blob = vec![0u8; pad as usize];
                        st.sha.update(&blob);
                        blob.extend_from_slice(&st.sha.finalize());
                        Some((Ok(pb::SnapshotResponse { header: first, remaining_bytes: 0, blob }), None))
                    }
                    Err(e) => Some((Err(Status::internal(format!("etcdserver: {e}"))), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.metrics
            .timed("etcd.Status", async move {
                let table = &self.table;
                let groups = self.node.status();
                // Storage sizes read the engine: off the async workers.
                #[cfg(not(madsim))]
                let sizes = {
                    let node = self.node.clone();
                    tokio::task::spawn_blocking(move || node.storage_sizes())
                        .await
                        .map_err(|e| Status::internal(format!("etcdserver: {e}")))?
                };
                #[cfg(madsim)]
                let sizes = self.node.storage_sizes();
                let g = groups
                    .into_iter()
                    .find(|g| g.table == self.table)
                    .ok_or_else(|| etcd_status(&ApiError::TableNotFound(self.table.clone())))?;
                let db_size: u64 = sizes.iter().map(|(_, s)| s).sum();
                let in_use = sizes.iter().find(|(t, _)| t == table).map_or(0, |(_, s)| *s);
                let h = HeaderInfo { term: g.term, member_id: self.node.id() };
                let mut errors = Vec::new();
                if g.leader_id == 0 {
                    errors.push("etcdserver: no leader".to_string());
                }
                Ok(Response::new(pb::StatusResponse {
                    header: self.header(h, g.revision),
                    version: ETCD_API_VERSION.to_string(),
                    db_size: to_i64(db_size),
                    leader: g.leader_id,
                    raft_index: g.commit_index,
                    raft_term: g.term,
                    raft_applied_index: g.applied_index,
                    errors,
                    db_size_in_use: to_i64(in_use),
                    is_learner: false,
                }))
            })
            .await
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for EtcdApi {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("etcd.MemberList", async move {
                let me = self.node.id();
                let members = self
                    .node
                    .config()
                    .members
                    .iter()
                    .map(|(id, n)| pb::Member {
                        id: *id,
                        name: format!("node-{id}"),
                        peer_ur_ls: vec![format!("quic://{}", n.raft_addr)],
                        // Other members' etcd addresses are not configured here.
                        client_ur_ls: if *id == me { vec![self.client_url.clone()] } else { Vec::new() },
                        is_learner: false,
                    })
                    .collect();
                let term = self.node.status().iter().find(|g| g.table == self.table).map_or(0, |g| g.term);
                Ok(Response::new(pb::MemberListResponse {
                    header: self.header(HeaderInfo { term, member_id: me }, 0),
                    members,
                }))
            })
            .await
    }
}

/// A tonic router serving the etcd v3 services of `api`.
pub fn router(api: EtcdApi) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(pb::kv_server::KvServer::new(api.clone()))
        .add_service(pb::maintenance_server::MaintenanceServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api))
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
