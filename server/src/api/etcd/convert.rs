//! Conversions between etcd's `etcdserverpb` messages and core's requests
//! and answers. etcd reads a negative revision or limit as "none"; every
//! client-supplied field is checked here, and nothing a client sends can
//! panic the server.

use armada_core::kv::{self as kv};
use armada_proto::etcd as pb;
use tonic::Status;

use super::{non_negative, to_i64, unsupported, EtcdApi};
use crate::types::HeaderInfo;

pub(super) fn kv_out(k: kv::KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        create_revision: to_i64(k.create_revision),
        mod_revision: to_i64(k.mod_revision),
        version: to_i64(k.version),
        value: k.value,
        lease: k.lease,
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
    Ok(kv::PutRequest {
        key: p.key.clone(),
        value: p.value.clone(),
        prev_kv: p.prev_kv,
        lease: p.lease,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    })
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
        (Ok(CompareTarget::Lease), Some(TargetUnion::Lease(v))) => kv::CompareTarget::Lease(*v),
        (Ok(CompareTarget::Lease), None) => kv::CompareTarget::Lease(0),
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

impl EtcdApi {
    pub(super) fn range_out(&self, r: kv::RangeResponse, h: HeaderInfo) -> pb::RangeResponse {
        pb::RangeResponse {
            header: self.header(h, r.revision),
            kvs: r.kvs.into_iter().map(kv_out).collect(),
            more: r.more,
            count: to_i64(r.count),
        }
    }

    pub(super) fn put_out(&self, r: kv::PutResponse, h: HeaderInfo) -> pb::PutResponse {
        pb::PutResponse { header: self.header(h, r.revision), prev_kv: r.prev_kv.map(kv_out) }
    }

    pub(super) fn delete_out(&self, r: kv::DeleteRangeResponse, h: HeaderInfo) -> pb::DeleteRangeResponse {
        pb::DeleteRangeResponse {
            header: self.header(h, r.revision),
            deleted: to_i64(r.deleted),
            prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
        }
    }

    pub(super) fn txn_out(&self, r: kv::TxnResponse, h: HeaderInfo) -> pb::TxnResponse {
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
}
