//! Real processes: a leader cluster and follower clusters started from the
//! binary on loopback. Writes at the leader reach the follower; a write sent
//! to the follower is readable there as soon as it returns; a killed follower
//! catches up; a follower started after the leader moved past its retained
//! history and compacted bootstraps from a snapshot and ends with the
//! leader's exact state.
//!
//! `ARMADA_BOOTSTRAP_KEYS` sets how many keys the snapshot bootstrap copies
//! (default 3000); the time it takes is printed.
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use armada_proto::v1 as pb;
use tonic::transport::Channel;

mod common;
use common::*;

type State = BTreeMap<Vec<u8>, (i64, i64, i64, Vec<u8>)>;

async fn channel(api: &str) -> Result<Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn kv(api: &str) -> Result<pb::kv_client::KvClient<Channel>, String> {
    Ok(pb::kv_client::KvClient::new(channel(api).await?).max_decoding_message_size(64 << 20))
}

/// The whole table (every key with its revisions and version) and its revision.
async fn scan(api: &str, serializable: bool) -> Result<(i64, State), String> {
    let r = kv(api)
        .await?
        .range(pb::RangeRequest {
            table: "t".into(),
            key: vec![0],
            range_end: vec![0],
            serializable,
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let state = r.kvs.into_iter().map(|k| (k.key, (k.create_revision, k.mod_revision, k.version, k.value))).collect();
    Ok((r.header.map_or(0, |h| h.revision), state))
}

/// Writes keys `prefix{from..to}` in transactions of 100 puts.
async fn fill(api: &str, prefix: &str, from: usize, to: usize) {
    let mut c = kv(api).await.expect("connect");
    let mut i = from;
    while i < to {
        let end = (i + 100).min(to);
        let success = (i..end)
            .map(|n| pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: format!("{prefix}{n:07}").into_bytes(),
                    value: format!("value-{n}-{}", "x".repeat(64)).into_bytes(),
                    ..Default::default()
                })),
            })
            .collect();
        c.txn(pb::TxnRequest { table: "t".into(), success, ..Default::default() }).await.expect("fill txn");
        i = end;
    }
}

/// Waits until the follower serves exactly the leader's state.
async fn converged(leader: &str, follower: &str, within: Duration) -> (i64, usize) {
    eventually(within, "follower reaches the leader's state", || async {
        let (lrev, l) = scan(leader, false).await?;
        let (frev, f) = scan(follower, true).await?;
        if lrev == frev && l == f {
            Ok((frev, f.len()))
        } else {
            Err(format!("leader at {lrev} with {} keys, follower at {frev} with {} keys", l.len(), f.len()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cluster_streams_forwards_catches_up_and_bootstraps_from_a_snapshot() {
    let leader = Cluster::with_args(1, "repl-leader", &["--history-retention", "20"]);
    let lapi = leader.nodes[0].api.clone();
    let lrepl = leader.nodes[0].replication.clone();
    eventually(Duration::from_secs(30), "create table", || async {
        let mut t = pb::tables_client::TablesClient::new(channel(&lapi).await?);
        t.create(pb::CreateTableRequest { name: "t".into() }).await.map(|_| ()).map_err(|s| s.to_string())
    })
    .await;
    fill(&lapi, "a", 0, 300).await;

    // A follower cluster attaches without any change to the leader.
    let root = std::env::temp_dir().join(format!("armada-proc-followers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut f1 = start_follower(&root, "f1", &lrepl);
    let fapi = f1.nodes[0].api.clone();
    let (rev, keys) = converged(&lapi, &fapi, Duration::from_secs(60)).await;
    assert_eq!(keys, 300);
    eprintln!("follower caught up: revision {rev}, {keys} keys");

    // A write sent to the follower is readable there as soon as it returns.
    let mut fc = kv(&fapi).await.unwrap();
    for i in 0..20 {
        let key = format!("rw{i}").into_bytes();
        let put = fc
            .put(pb::PutRequest { table: "t".into(), key: key.clone(), value: b"mine".to_vec(), ..Default::default() })
            .await
            .expect("write through the follower")
            .into_inner();
        let wrote = put.header.unwrap().revision;
        for serializable in [true, false] {
            let r = fc
                .range(pb::RangeRequest { table: "t".into(), key: key.clone(), serializable, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            assert!(r.header.unwrap().revision >= wrote, "read below the client's own write");
            assert_eq!(r.kvs.first().map(|k| k.value.as_slice()), Some(b"mine".as_slice()), "read your writes");
        }
    }
    // A read at a revision the follower has not reached waits briefly for
    // it: a revision just written at the leader is served...
    let at = kv(&lapi)
        .await
        .unwrap()
        .put(pb::PutRequest { table: "t".into(), key: b"fresh".to_vec(), value: b"1".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let r = fc
        .range(pb::RangeRequest {
            table: "t".into(),
            key: b"fresh".to_vec(),
            revision: at,
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("a read at the leader's new revision waits for it")
        .into_inner();
    assert_eq!(r.kvs.len(), 1);
    // ...one that does not exist yet fails clearly.
    let e = fc
        .range(pb::RangeRequest {
            table: "t".into(),
            key: b"fresh".to_vec(),
            revision: at + 1000,
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("future revision"), "{e}");
    // The etcd v3 API works on the follower the same way (its table,
    // `default`, was created on the leader cluster and replicated).
    let fetcd = f1.nodes[0].etcd.clone();
    let mut ec = eventually(Duration::from_secs(30), "etcd table on the follower", || async {
        let ch = channel(&fetcd).await?;
        let mut c = armada_proto::etcd::kv_client::KvClient::new(ch);
        c.range(armada_proto::etcd::RangeRequest { key: b"probe".to_vec(), ..Default::default() })
            .await
            .map_err(|s| s.to_string())?;
        Ok(c)
    })
    .await;
    let put = ec
        .put(armada_proto::etcd::PutRequest { key: b"via-etcd".to_vec(), value: b"1".to_vec(), ..Default::default() })
        .await
        .expect("etcd put through the follower")
        .into_inner();
    let got = ec
        .range(armada_proto::etcd::RangeRequest { key: b"via-etcd".to_vec(), serializable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.first().map(|k| k.mod_revision), put.header.map(|h| h.revision), "read your etcd write");
    // Table management belongs to the leader cluster.
    let e = pb::tables_client::TablesClient::new(channel(&fapi).await.unwrap())
        .create(pb::CreateTableRequest { name: "other".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("follower cluster"), "{e}");
    // Lag is visible.
    let status = pb::cluster_client::ClusterClient::new(channel(&fapi).await.unwrap())
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.role, "follower");
    let g = status.groups.iter().find(|g| g.table == "t").expect("table t on the follower");
    assert!(g.leader_revision > 0, "{g:?}");
    let (_, metrics) = http_get(&f1.nodes[0].http, "/metrics").unwrap();
    assert!(metrics.contains("armada_replication_lag_revisions{table=\"t\"}"), "{metrics}");

    // Tables created and deleted on the leader appear and disappear here.
    let tables = |api: String| async move {
        let mut t = pb::tables_client::TablesClient::new(channel(&api).await?);
        let list = t.list(pb::ListTablesRequest {}).await.map_err(|s| s.to_string())?.into_inner();
        Ok::<Vec<String>, String>(list.tables.into_iter().map(|t| t.name).collect())
    };
    pb::tables_client::TablesClient::new(channel(&lapi).await.unwrap())
        .create(pb::CreateTableRequest { name: "t2".into() })
        .await
        .expect("create t2 on the leader");
    eventually(Duration::from_secs(30), "t2 appears on the follower", || async {
        let t = tables(fapi.clone()).await?;
        if t.contains(&"t2".to_string()) {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    pb::tables_client::TablesClient::new(channel(&lapi).await.unwrap())
        .delete(pb::DeleteTableRequest { name: "t2".into() })
        .await
        .expect("delete t2 on the leader");
    eventually(Duration::from_secs(30), "t2 disappears from the follower", || async {
        let t = tables(fapi.clone()).await?;
        if t.contains(&"t2".to_string()) {
            Err(format!("{t:?}"))
        } else {
            Ok(())
        }
    })
    .await;

    // kill -9 of the follower, writes meanwhile, restart: it catches up.
    f1.nodes[0].kill9();
    fill(&lapi, "b", 0, 200).await;
    f1.start_all();
    converged(&lapi, &fapi, Duration::from_secs(60)).await;

    // The leader moves past its retained history (20 revisions) and
    // compacts: a new follower must bootstrap from a snapshot, while the
    // running one keeps tailing.
    let n: usize = std::env::var("ARMADA_BOOTSTRAP_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    fill(&lapi, "c", 0, n).await;
    let (now, _) = scan(&lapi, false).await.unwrap();
    kv(&lapi).await.unwrap().compact(pb::CompactionRequest { table: "t".into(), revision: now }).await.unwrap();
    let started = Instant::now();
    let f2 = start_follower(&root, "f2", &lrepl);
    let (rev, keys) = converged(&lapi, &f2.nodes[0].api, Duration::from_secs(300)).await;
    eprintln!("fresh follower bootstrapped {keys} keys (revision {rev}) from a snapshot in {:.2?}", started.elapsed());
    let (_, metrics) = http_get(&f2.nodes[0].http, "/metrics").unwrap();
    assert!(metrics.contains("armada_replication_snapshots_installed{table=\"t\"} 1"), "{metrics}");
    // The first follower is still in step, and both answer like the leader.
    converged(&lapi, &fapi, Duration::from_secs(60)).await;
}

/// One revision larger than gRPC's default 4 MiB message limit (a
/// DeleteRange over 6,000 keys of 1 KiB, about 6 MiB on the change stream)
/// reaches the follower in parts of about 1 MiB, applied whole, and
/// replication goes on after it. Before, the
/// follower refused that message on every retry: it stayed at the revision
/// before the delete for good, while its status said lag 0 and nothing was
/// logged above debug. When the leader cluster goes away, the follower says
/// so: status and metrics report the table as stalled, and it is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_above_the_grpc_default_limit_replicates_and_a_stall_is_reported() {
    let mut leader = Cluster::new(1, "repl-big");
    leader.wait_ready(Duration::from_secs(30)).await;
    let lapi = leader.nodes[0].api.clone();
    pb::tables_client::TablesClient::new(channel(&lapi).await.unwrap())
        .create(pb::CreateTableRequest { name: "t".into() })
        .await
        .expect("create table on a ready leader");
    let root = std::env::temp_dir().join(format!("armada-proc-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let f = start_follower(&root, "f", &leader.nodes[0].replication);
    let fapi = f.nodes[0].api.clone();
    f.wait_ready(Duration::from_secs(30)).await;

    let prefix = "k".repeat(1016);
    fill(&lapi, &prefix, 0, 6000).await;
    converged(&lapi, &fapi, Duration::from_secs(120)).await;
    let del = kv(&lapi)
        .await
        .unwrap()
        .delete_range(pb::DeleteRangeRequest {
            table: "t".into(),
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
        .await
        .expect("delete everything")
        .into_inner();
    assert_eq!(del.deleted, 6000);
    kv(&lapi)
        .await
        .unwrap()
        .put(pb::PutRequest { table: "t".into(), key: b"after".to_vec(), value: b"1".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let (_, keys) = converged(&lapi, &fapi, Duration::from_secs(60)).await;
    assert_eq!(keys, 1, "only the key written after the delete remains");
    let status = pb::cluster_client::ClusterClient::new(channel(&fapi).await.unwrap())
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let g = status.groups.iter().find(|g| g.table == "t").expect("table t");
    assert_eq!(g.replication_state, "streaming", "{g:?}");
    let (_, metrics) = http_get(&f.nodes[0].http, "/metrics").unwrap();
    assert!(
        metrics.contains("armada_replication_snapshots_installed{table=\"t\"} 0"),
        "the 6 MiB revision came in parts on the change stream, not by a snapshot:\n{metrics}"
    );

    // The leader cluster goes away: the follower reports the stall.
    leader.nodes[0].kill9();
    let g = eventually(Duration::from_secs(30), "the follower reports the stall", || async {
        let s = pb::cluster_client::ClusterClient::new(channel(&fapi).await?)
            .status(pb::StatusRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let g = s.groups.into_iter().find(|g| g.table == "t").ok_or("no table t")?;
        if g.replication_state == "stalled" {
            Ok(g)
        } else {
            Err(format!("{g:?}"))
        }
    })
    .await;
    assert!(!g.replication_error.is_empty(), "{g:?}");
    assert!(g.lag_seconds >= 5.0, "the silence counts as lag: {g:?}");
    let (code, body) = http_get(&f.nodes[0].http, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("replication stalled"), "{body}");
    let (_, metrics) = http_get(&f.nodes[0].http, "/metrics").unwrap();
    assert!(metrics.contains("armada_replication_stalled{table=\"t\"} 1"), "{metrics}");
    let log = std::fs::read_to_string(root.join("f.log")).unwrap_or_default();
    assert!(log.contains("WARN") && log.contains("replication"), "no warning logged:\n{log}");
}

/// A follower cluster serves etcd watches from its own applied state, with
/// the leader cluster's revisions: history from a past revision, then live
/// events as writes at the leader arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_serves_watches_with_the_leaders_revisions() {
    use armada_proto::etcd as epb;
    let leader = Cluster::new(1, "watch-leader");
    wait_ready(&leader.nodes[0].http, Duration::from_secs(30)).await;
    let etcd_kv = |ep: String| async move {
        let ch = channel(&ep).await?;
        Ok::<_, String>(epb::kv_client::KvClient::new(ch))
    };
    let mut lkv = etcd_kv(leader.nodes[0].etcd.clone()).await.unwrap();
    let put = |k: String, v: &str| epb::PutRequest { key: k.into_bytes(), value: v.into(), ..Default::default() };
    let mut revisions = Vec::new();
    for i in 0..5 {
        let r = lkv.put(put(format!("w{i}"), "x")).await.unwrap().into_inner();
        revisions.push(r.header.unwrap().revision);
    }
    let root = std::env::temp_dir().join(format!("armada-proc-watch-followers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let follower = start_follower(&root, "wf", &leader.nodes[0].replication);
    let fep = follower.nodes[0].etcd.clone();
    let last = *revisions.last().unwrap();
    eventually(Duration::from_secs(60), "the follower reaches the leader's revision", || {
        let fep = fep.clone();
        async move {
            let mut f = etcd_kv(fep).await?;
            let r = f
                .range(epb::RangeRequest { key: b"w0".to_vec(), serializable: true, ..Default::default() })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let rev = r.header.map_or(0, |h| h.revision);
            if rev >= last {
                Ok(())
            } else {
                Err(format!("at revision {rev}"))
            }
        }
    })
    .await;
    let mut wc = epb::watch_client::WatchClient::new(channel(&fep).await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut responses = wc.watch(requests).await.expect("watch at the follower").into_inner();
    tx.send(epb::WatchRequest {
        request_union: Some(epb::watch_request::RequestUnion::CreateRequest(epb::WatchCreateRequest {
            key: b"w".to_vec(),
            range_end: b"x".to_vec(),
            start_revision: revisions[0],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    // A write at the leader after the watch started: a live event.
    let r = lkv.put(put("w9".into(), "live")).await.unwrap().into_inner();
    revisions.push(r.header.unwrap().revision);
    let mut seen: Vec<(String, i64)> = Vec::new();
    while seen.len() < revisions.len() {
        let r = tokio::time::timeout(Duration::from_secs(20), responses.message())
            .await
            .expect("events within 20 s")
            .expect("the stream stays up")
            .expect("the stream does not end");
        assert!(!r.canceled, "{r:?}");
        for e in r.events {
            let kv = e.kv.unwrap();
            seen.push((String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision));
        }
    }
    let keys = ["w0", "w1", "w2", "w3", "w4", "w9"];
    let want: Vec<(String, i64)> = keys.iter().zip(&revisions).map(|(k, r)| (k.to_string(), *r)).collect();
    assert_eq!(seen, want, "the follower's events carry the leader's revisions, in order");
}

/// Lease requests at a follower cluster go to the leader cluster (grant,
/// put on the lease, keep-alive, time to live, list, revoke); an expiry
/// decided there deletes the key at the follower with the leader's
/// revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_lease_requests_and_applies_expiries() {
    use armada_proto::etcd as epb;
    let leader = Cluster::new(1, "lease-leader");
    wait_ready(&leader.nodes[0].http, Duration::from_secs(30)).await;
    let root = std::env::temp_dir().join(format!("armada-proc-lease-followers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let follower = start_follower(&root, "lf", &leader.nodes[0].replication);
    let fep = follower.nodes[0].etcd.clone();
    let lep = leader.nodes[0].etcd.clone();
    let mut leases = eventually(Duration::from_secs(60), "the follower grants a lease", || {
        let fep = fep.clone();
        async move {
            let mut c = epb::lease_client::LeaseClient::new(channel(&fep).await?);
            c.lease_grant(epb::LeaseGrantRequest { ttl: 600, id: 0 }).await.map_err(|s| s.to_string())?;
            Ok(c)
        }
    })
    .await;
    let mut kv = epb::kv_client::KvClient::new(channel(&fep).await.unwrap());
    let put = |key: &str, lease: i64| epb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    };
    // A long lease: put, keep-alive, time to live, list, revoke, all at
    // the follower.
    let long = leases.lease_grant(epb::LeaseGrantRequest { ttl: 600, id: 0 }).await.unwrap().into_inner();
    assert_eq!(long.ttl, 600);
    kv.put(put("long", long.id)).await.expect("a put on a lease at the follower");
    let ka = leases
        .lease_keep_alive(futures::stream::iter([epb::LeaseKeepAliveRequest { id: long.id }]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("a keep-alive answer");
    assert_eq!((ka.id, ka.ttl), (long.id, 600));
    let ttl =
        leases.lease_time_to_live(epb::LeaseTimeToLiveRequest { id: long.id, keys: true }).await.unwrap().into_inner();
    assert_eq!((ttl.granted_ttl, &ttl.keys), (600, &vec![b"long".to_vec()]));
    assert!(ttl.ttl > 590 && ttl.ttl <= 600, "{ttl:?}");
    let list = leases.lease_leases(epb::LeaseLeasesRequest {}).await.unwrap().into_inner();
    assert!(list.leases.iter().any(|l| l.id == long.id), "{list:?}");
    leases.lease_revoke(epb::LeaseRevokeRequest { id: long.id }).await.expect("a revoke at the follower");
    let r = kv.range(epb::RangeRequest { key: b"long".to_vec(), serializable: true, ..Default::default() });
    assert!(r.await.unwrap().into_inner().kvs.is_empty(), "the revoke answered after the follower applied it");
    // A short lease runs out at the leader cluster; the follower deletes
    // the key at the same revision.
    let short = leases.lease_grant(epb::LeaseGrantRequest { ttl: 2, id: 0 }).await.unwrap().into_inner();
    let written = kv.put(put("short", short.id)).await.unwrap().into_inner().header.unwrap().revision;
    let lkv = epb::kv_client::KvClient::new(channel(&lep).await.unwrap());
    let gone = |mut c: epb::kv_client::KvClient<Channel>| async move {
        let r = c
            .range(epb::RangeRequest { key: b"short".to_vec(), serializable: true, ..Default::default() })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        let rev = r.header.map_or(0, |h| h.revision);
        if r.kvs.is_empty() {
            Ok(rev)
        } else {
            Err(format!("still there at revision {rev}"))
        }
    };
    let at_leader =
        eventually(Duration::from_secs(20), "the leader deletes the expired key", || gone(lkv.clone())).await;
    let at_follower =
        eventually(Duration::from_secs(20), "the follower deletes the expired key", || gone(kv.clone())).await;
    assert_eq!(at_leader, written + 1, "the expiry is the revision after the put");
    assert_eq!(at_follower, at_leader, "the same revision at the follower");
}
