//! The etcd KV service: Range, Put, DeleteRange, Txn and Compact over the
//! etcd table.

use armada_core::auth::Access;
use armada_core::command::TableReply;
use armada_core::kv::KvError;
use armada_core::TableCommand;
use armada_proto::etcd as pb;
use tonic::{Request, Response, Status};

use super::convert::{delete_in, put_in, range_in, txn_in};
use super::{check_size, etcd_status, EtcdApi};
use crate::types::ApiError;

fn unexpected(r: &TableReply) -> Status {
    Status::internal(format!("etcdserver: unexpected reply {r:?}"))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for EtcdApi {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        self.metrics
            .timed("etcd.Range", async move {
                let caller = self.caller(&request)?;
                let r = request.into_inner();
                check_size(&r)?;
                caller.check(Access::Read, &r.key, &r.range_end)?;
                let req = range_in(&r)?;
                let (resp, h) =
                    self.node.range(&self.table, &req, serializable(&r)).await.map_err(|e| etcd_status(&e))?;
                Ok(Response::new(self.range_out(resp, h)))
            })
            .await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.metrics
            .timed("etcd.Put", async move {
                let caller = self.caller(&request)?;
                let r = request.into_inner();
                check_size(&r)?;
                caller.check_put(&r)?;
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
                let caller = self.caller(&request)?;
                let r = request.into_inner();
                check_size(&r)?;
                caller.check_delete(&r)?;
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
                let caller = self.caller(&request)?;
                let r = request.into_inner();
                check_size(&r)?;
                caller.check_txn(&r)?;
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
                // As in etcd, any user may compact (it needs no key's
                // permission): only anonymous callers are refused.
                self.caller(&request)?.check_user()?;
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

/// Whether a Range may be served from this node's applied state (the etcd
/// reads serializable canary makes every Range so).
fn serializable(r: &pb::RangeRequest) -> bool {
    r.serializable || armada_core::canary::active(armada_core::canary::Canary::EtcdReadsSerializable)
}
