//! Conversions between armada.v1 wire messages and core types, and the
//! mapping of errors to gRPC status codes. Every client-supplied field is
//! checked here; nothing a client sends can panic the server.

use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::{self as kv};
use armada_proto::v1 as pb;
use tonic::Status;

pub use crate::types::status;
use crate::types::HeaderInfo;

fn rev_in(v: i64, what: &str) -> Result<u64, Status> {
    u64::try_from(v).map_err(|_| Status::invalid_argument(format!("{what} must not be negative, got {v}")))
}

pub fn rev_out(v: u64) -> i64 {
    // Revisions start at 1 and grow by one per write: i64 cannot overflow in
    // any realistic lifetime, but saturate rather than wrap if it ever did.
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn header(h: HeaderInfo, revision: u64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader { revision: rev_out(revision), raft_term: h.term, member_id: h.member_id.get() })
}

pub fn kv_out(k: kv::KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        create_revision: rev_out(k.create_revision),
        mod_revision: rev_out(k.mod_revision),
        version: rev_out(k.version),
        value: k.value,
        lease: k.lease,
    }
}

pub fn range_in(r: &pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    let sort_order = match pb::range_request::SortOrder::try_from(r.sort_order) {
        Ok(pb::range_request::SortOrder::None) => kv::SortOrder::None,
        Ok(pb::range_request::SortOrder::Ascend) => kv::SortOrder::Ascend,
        Ok(pb::range_request::SortOrder::Descend) => kv::SortOrder::Descend,
        Err(_) => return Err(Status::invalid_argument(format!("unknown sort_order {}", r.sort_order))),
    };
    let sort_target = match pb::range_request::SortTarget::try_from(r.sort_target) {
        Ok(pb::range_request::SortTarget::Key) => kv::SortTarget::Key,
        Ok(pb::range_request::SortTarget::Version) => kv::SortTarget::Version,
        Ok(pb::range_request::SortTarget::Create) => kv::SortTarget::Create,
        Ok(pb::range_request::SortTarget::Mod) => kv::SortTarget::Mod,
        Ok(pb::range_request::SortTarget::Value) => kv::SortTarget::Value,
        Err(_) => return Err(Status::invalid_argument(format!("unknown sort_target {}", r.sort_target))),
    };
    Ok(kv::RangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        limit: rev_in(r.limit, "limit")?,
        revision: rev_in(r.revision, "revision")?,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        ..Default::default()
    })
}

pub fn range_out(r: kv::RangeResponse, h: HeaderInfo) -> pb::RangeResponse {
    pb::RangeResponse {
        header: header(h, r.revision),
        kvs: r.kvs.into_iter().map(kv_out).collect(),
        more: r.more,
        count: rev_out(r.count),
    }
}

pub fn put_in(p: &pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: p.key.clone(),
        value: p.value.clone(),
        prev_kv: p.prev_kv,
        lease: p.lease,
        ..Default::default()
    }
}

pub fn put_out(r: kv::PutResponse, h: HeaderInfo) -> pb::PutResponse {
    pb::PutResponse { header: header(h, r.revision), prev_kv: r.prev_kv.map(kv_out), lease: 0 }
}

pub fn delete_in(d: &pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest { key: d.key.clone(), range_end: d.range_end.clone(), prev_kv: d.prev_kv }
}

pub fn delete_out(r: kv::DeleteRangeResponse, h: HeaderInfo) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: header(h, r.revision),
        deleted: rev_out(r.deleted),
        prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
    }
}

fn check_nested_table(txn_table: &str, table: &str) -> Result<(), Status> {
    if table.is_empty() || table == txn_table {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("operation names table {table:?} inside a txn on table {txn_table:?}")))
    }
}

fn op_in(txn_table: &str, op: &pb::RequestOp) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::RequestRange(r)) => {
            check_nested_table(txn_table, &r.table)?;
            Ok(kv::RequestOp::Range(range_in(r)?))
        }
        Some(Request::RequestPut(p)) => {
            check_nested_table(txn_table, &p.table)?;
            Ok(kv::RequestOp::Put(put_in(p)))
        }
        Some(Request::RequestDeleteRange(d)) => {
            check_nested_table(txn_table, &d.table)?;
            Ok(kv::RequestOp::DeleteRange(delete_in(d)))
        }
        None => Err(Status::invalid_argument("txn operation without a request")),
    }
}

fn compare_in(c: &pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let op = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => kv::CompareOp::Equal,
        Ok(CompareResult::NotEqual) => kv::CompareOp::NotEqual,
        Ok(CompareResult::Greater) => kv::CompareOp::Greater,
        Ok(CompareResult::Less) => kv::CompareOp::Less,
        Err(_) => return Err(Status::invalid_argument(format!("unknown compare result {}", c.result))),
    };
    let target = match (CompareTarget::try_from(c.target), &c.target_union) {
        (Ok(CompareTarget::Version), Some(TargetUnion::Version(v))) => kv::CompareTarget::Version(*v),
        (Ok(CompareTarget::Version), None) => kv::CompareTarget::Version(0),
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v))) => kv::CompareTarget::CreateRevision(*v),
        (Ok(CompareTarget::Create), None) => kv::CompareTarget::CreateRevision(0),
        (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v))) => kv::CompareTarget::ModRevision(*v),
        (Ok(CompareTarget::Mod), None) => kv::CompareTarget::ModRevision(0),
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => kv::CompareTarget::Value(v.clone()),
        (Ok(CompareTarget::Value), None) => kv::CompareTarget::Value(Vec::new()),
        (Ok(t), Some(_)) => {
            return Err(Status::invalid_argument(format!("compare target {t:?} does not match its operand")))
        }
        (Err(_), _) => return Err(Status::invalid_argument(format!("unknown compare target {}", c.target))),
    };
    Ok(kv::Compare { key: c.key.clone(), range_end: c.range_end.clone(), op, target })
}

pub fn txn_in(t: &pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    Ok(kv::TxnRequest {
        compare: t.compare.iter().map(compare_in).collect::<Result<_, _>>()?,
        success: t.success.iter().map(|o| op_in(&t.table, o)).collect::<Result<_, _>>()?,
        failure: t.failure.iter().map(|o| op_in(&t.table, o)).collect::<Result<_, _>>()?,
    })
}

pub fn txn_out(r: kv::TxnResponse, h: HeaderInfo) -> pb::TxnResponse {
    use pb::response_op::Response;
    pb::TxnResponse {
        header: header(h, r.revision),
        succeeded: r.succeeded,
        responses: r
            .responses
            .into_iter()
            .map(|op| pb::ResponseOp {
                response: Some(match op {
                    kv::ResponseOp::Range(x) => Response::ResponseRange(range_out(x, h)),
                    kv::ResponseOp::Put(x) => Response::ResponsePut(put_out(x, h)),
                    kv::ResponseOp::DeleteRange(x) => Response::ResponseDeleteRange(delete_out(x, h)),
                }),
            })
            .collect(),
    }
}

pub fn table_out(t: TableInfo) -> pb::Table {
    pb::Table { name: t.name, id: t.id.0 }
}

pub fn reply_revision(r: &TableReply) -> u64 {
    r.revision()
}
