//! Clients of the etcd v3 API in the simulated world. Every node serves the
//! etcd API over [`ETCD_TABLE`](super::ETCD_TABLE), a table the workload
//! also reaches through armada.v1; operations on that table go through
//! either API (drawn from the seed), into one history, checked by the same
//! checkers. So linearizability, the model (M1, M2) and the revision
//! checks hold across the two front ends, not only within each.

use armada_proto::etcd as epb;

use super::*;

/// A client of one node's etcd KV service.
pub(super) type EtcdKv = epb::kv_client::KvClient<Channel>;

/// Percent of the workload's operations on the etcd table sent through the
/// etcd API (the rest use armada.v1).
pub(super) const ETCD_SHARE_PCT: u64 = 50;

fn header_rev(h: &Option<epb::ResponseHeader>) -> u64 {
    h.as_ref().map_or(0, |h| h.revision.max(0) as u64)
}

fn kv_in(kv: epb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        create_revision: kv.create_revision.max(0) as u64,
        mod_revision: kv.mod_revision.max(0) as u64,
        version: kv.version.max(0) as u64,
        value: kv.value,
        lease: kv.lease,
    }
}

fn range_out(req: &RangeRequest, serializable: bool) -> epb::RangeRequest {
    use epb::range_request::{SortOrder as O, SortTarget as T};
    epb::RangeRequest {
        key: req.key.clone(),
        range_end: req.range_end.clone(),
        limit: req.limit as i64,
        revision: req.revision as i64,
        sort_order: match req.sort_order {
            SortOrder::None => O::None,
            SortOrder::Ascend => O::Ascend,
            SortOrder::Descend => O::Descend,
        } as i32,
        sort_target: match req.sort_target {
            SortTarget::Key => T::Key,
            SortTarget::Version => T::Version,
            SortTarget::Create => T::Create,
            SortTarget::Mod => T::Mod,
            SortTarget::Value => T::Value,
        } as i32,
        serializable,
        keys_only: req.keys_only,
        count_only: req.count_only,
        ..Default::default()
    }
}

fn put_op(key: String, value: String) -> epb::RequestOp {
    epb::RequestOp {
        request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
            ..Default::default()
        })),
    }
}

/// The first key-value of a single-key read, as `(value, mod_revision)`.
fn first_value(kvs: Vec<epb::KeyValue>) -> Option<(String, u64)> {
    kvs.into_iter().next().map(|kv| (utf8(kv.value), kv.mod_revision.max(0) as u64))
}

/// Sends one operation through node `node`'s etcd API (on the etcd table)
/// and classifies its outcome as [`perform`](super::perform) does.
pub(super) async fn perform(conns: &mut Conns, node: u64, kind: &OpKind) -> Outcome {
    let Some(mut c) = conns.etcd(node).await else {
        return Outcome::Failed("cannot connect".into());
    };
    let is_write = kind.is_write();
    let fut = async {
        match kind.clone() {
            OpKind::Put { key, value } => c
                .put(epb::PutRequest { key: key.into_bytes(), value: value.into_bytes(), ..Default::default() })
                .await
                .map(|r| OpResult::Put { revision: header_rev(&r.into_inner().header) }),
            OpKind::PutPrev { key, value } => c
                .put(epb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    prev_kv: true,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::PutPrev { revision: header_rev(&r.header), prev: r.prev_kv.map(kv_in) }
                }),
            OpKind::Query { req, serializable } => c.range(range_out(&req, serializable)).await.map(|r| {
                let r = r.into_inner();
                OpResult::Query(RangeResponse {
                    revision: header_rev(&r.header),
                    kvs: r.kvs.into_iter().map(kv_in).collect(),
                    more: r.more,
                    count: r.count.max(0) as u64,
                })
            }),
            OpKind::Get { key, serializable } => c
                .range(epb::RangeRequest { key: key.into_bytes(), serializable, ..Default::default() })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Get { revision: header_rev(&r.header), value: first_value(r.kvs) }
                }),
            OpKind::GetAt { key, revision } => c
                .range(epb::RangeRequest { key: key.into_bytes(), revision: revision as i64, ..Default::default() })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Get { revision: header_rev(&r.header), value: first_value(r.kvs) }
                }),
            OpKind::Delete { key } => {
                c.delete_range(epb::DeleteRangeRequest { key: key.into_bytes(), ..Default::default() }).await.map(|r| {
                    let r = r.into_inner();
                    OpResult::Delete { deleted: r.deleted.max(0) as u64, revision: header_rev(&r.header) }
                })
            }
            OpKind::DeleteRange { from, to } => c
                .delete_range(epb::DeleteRangeRequest {
                    key: from.into_bytes(),
                    range_end: to.into_bytes(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Delete { deleted: r.deleted.max(0) as u64, revision: header_rev(&r.header) }
                }),
            OpKind::Cas { key, expect, new, by } => {
                use epb::compare::{CompareResult, CompareTarget, TargetUnion};
                let (target, union) = match by {
                    CasBy::Value => (CompareTarget::Value, TargetUnion::Value(expect.into_bytes())),
                    CasBy::ModRevision(r) => (CompareTarget::Mod, TargetUnion::ModRevision(r as i64)),
                    CasBy::VersionZero => (CompareTarget::Version, TargetUnion::Version(0)),
                    CasBy::CreateZero => (CompareTarget::Create, TargetUnion::CreateRevision(0)),
                };
                let cmp = epb::Compare {
                    result: CompareResult::Equal as i32,
                    target: target as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(union),
                    range_end: vec![],
                };
                c.txn(epb::TxnRequest { compare: vec![cmp], success: vec![put_op(key, new)], failure: vec![] })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        OpResult::Cas { succeeded: r.succeeded, revision: header_rev(&r.header) }
                    })
            }
            OpKind::Compact { revision } => c
                .compact(epb::CompactionRequest { revision: revision as i64, physical: false })
                .await
                .map(|r| OpResult::Compact { revision: header_rev(&r.into_inner().header) }),
            OpKind::Range => c
                .range(epb::RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let kvs = r
                        .kvs
                        .into_iter()
                        .map(|kv| (utf8(kv.key), utf8(kv.value), kv.mod_revision.max(0) as u64))
                        .collect();
                    OpResult::Range { kvs, revision: header_rev(&r.header) }
                }),
        }
    };
    let result = armada_net::time::timeout(CLIENT_TIMEOUT, fut).await;
    classify(conns, node, is_write, result)
}

/// One etcd transaction putting every pair (no compare: it always succeeds).
pub(super) async fn perform_many(conns: &mut Conns, node: u64, puts: &[(String, String)]) -> Outcome {
    let Some(mut c) = conns.etcd(node).await else {
        return Outcome::Failed("cannot connect".into());
    };
    let success = puts.iter().map(|(k, v)| put_op(k.clone(), v.clone())).collect();
    let req = epb::TxnRequest { compare: vec![], success, failure: vec![] };
    let result = armada_net::time::timeout(CLIENT_TIMEOUT, c.txn(req)).await;
    let result = result.map(|r| r.map(|r| OpResult::Put { revision: header_rev(&r.into_inner().header) }));
    classify(conns, node, true, result)
}
