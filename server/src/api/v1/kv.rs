//! The armada.v1 KV service: Range, IterateRange, Put, DeleteRange, Txn
//! and Compact on any table.

use std::sync::Arc;

use armada_core::command::TableReply;
use armada_core::TableCommand;
use armada_proto::v1 as pb;
use armada_proto::v1::kv_server::Kv;
use tonic::{Request, Response, Status};

use super::{check_size, Api};
use crate::api::v1::convert::{
    delete_in, delete_out, header, kv_out, put_in, put_out, range_in, range_out, reply_revision, status, txn_in,
    txn_out,
};
use crate::node::Node;
use crate::types::HeaderInfo;

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
    type WatchStream = super::watch::WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.watch_stream(request).await
    }

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
        let group = self.node.table_group(&r.table).await.map_err(|e| status(&e))?;
        // The revision every page is read at: the one asked for; or this
        // node's applied revision (serializable); or, linearizable, the
        // table's revision after a read index at its leader (a one-key read
        // through the usual path, forwarded as needed). Pages are then read
        // here, so no page (not even the first) counts or scans the whole
        // range.
        let revision = if r.revision > 0 {
            r.revision as u64
        } else if r.serializable {
            self.node.table_revision(group.id).get()
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
                let mut put = put_in(&r);
                if r.ttl != 0 {
                    put.lease = self.grant_for_ttl(&r).await?;
                }
                match self.write(&r.table, TableCommand::Put(put.clone())).await? {
                    (TableReply::Put(p), h) => {
                        let mut out = put_out(p, h);
                        if r.ttl != 0 {
                            out.lease = put.lease;
                        }
                        Ok(Response::new(out))
                    }
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
