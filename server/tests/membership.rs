//! Membership changes with real processes on loopback, under a steady
//! write load: a 3-node cluster grows to 5 and shrinks to 3, then one node
//! loses its disk and is replaced under the same id. Every acknowledged
//! write must be readable at the end. Also etcdctl's member commands.
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use armada_proto::v1 as pb;
use tonic::transport::Channel;

mod common;
use common::*;

async fn channel(api: &str) -> Result<Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(8))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn cluster_client(api: &str) -> Result<pb::cluster_client::ClusterClient<Channel>, String> {
    Ok(pb::cluster_client::ClusterClient::new(channel(api).await?))
}

/// What the writer saw: acknowledged writes and failed requests.
#[derive(Default)]
struct Load {
    acked: BTreeMap<String, String>,
    failed: u64,
    /// The longest stretch without an acknowledged write.
    longest_gap: Duration,
}

/// Writes `k<n>` keys one after another to the API addresses in `targets`
/// (round robin) until `stop` is set.
fn writer(targets: Arc<Mutex<Vec<String>>>, load: Arc<Mutex<Load>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut last_ok = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let list = targets.lock().unwrap().clone();
            let api = &list[n as usize % list.len()];
            let key = format!("k{n:06}");
            let value = format!("v{n}");
            let req = pb::PutRequest {
                table: "t".into(),
                key: key.clone().into(),
                value: value.clone().into(),
                ..Default::default()
            };
            let ok = match channel(api).await {
                Ok(ch) => pb::kv_client::KvClient::new(ch).put(req).await.is_ok(),
                Err(_) => false,
            };
            {
                let mut l = load.lock().unwrap();
                if ok {
                    l.acked.insert(key, value);
                    l.longest_gap = l.longest_gap.max(last_ok.elapsed());
                    last_ok = Instant::now();
                } else {
                    l.failed += 1;
                }
            }
            if !ok {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n += 1;
        }
    });
}

async fn members(api: &str) -> Result<pb::MemberListResponse, String> {
    let mut c = cluster_client(api).await?;
    Ok(c.member_list(pb::MemberListRequest {}).await.map_err(|s| s.to_string())?.into_inner())
}

/// Sends a change to `api` (retrying while the cluster is busy) and waits
/// until every group has it.
async fn change(
    api: &str,
    what: &str,
    f: impl Fn(
        pb::cluster_client::ClusterClient<Channel>,
    ) -> futures::future::BoxFuture<'static, Result<tonic::Response<pb::MemberChangeResponse>, tonic::Status>>,
) {
    let epoch = eventually(Duration::from_secs(60), what, || async {
        let c = cluster_client(api).await?;
        match f(c).await {
            Ok(r) => Ok(r.into_inner().epoch),
            Err(s) => Err(format!("{}: {}", s.code(), s.message())),
        }
    })
    .await;
    eventually(Duration::from_secs(120), &format!("{what}: every group at epoch {epoch}"), || async {
        let m = members(api).await?;
        if m.settled_epoch >= epoch {
            Ok(())
        } else {
            Err(format!("settled at {} of {epoch}", m.settled_epoch))
        }
    })
    .await;
}

fn add(
    id: u64,
    raft: String,
    api: String,
) -> impl Fn(
    pb::cluster_client::ClusterClient<Channel>,
) -> futures::future::BoxFuture<'static, Result<tonic::Response<pb::MemberChangeResponse>, tonic::Status>> {
    move |mut c| {
        let req = pb::MemberAddRequest {
            id,
            raft_address: raft.clone(),
            api_address: api.clone(),
            etcd_address: String::new(),
            learner: false,
        };
        Box::pin(async move { c.member_add(req).await })
    }
}

fn remove(
    id: u64,
) -> impl Fn(
    pb::cluster_client::ClusterClient<Channel>,
) -> futures::future::BoxFuture<'static, Result<tonic::Response<pb::MemberChangeResponse>, tonic::Status>> {
    move |mut c| Box::pin(async move { c.member_remove(pb::MemberRemoveRequest { id }).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_to_five_shrinks_to_three_and_replaces_a_lost_disk_under_load() {
    let mut c = Cluster::new(3, "resize");
    let root = c.nodes[0].dir.parent().unwrap().to_path_buf();
    for id in 4..=5u64 {
        c.nodes.push(Node::new(id, root.join(format!("n{id}"))));
    }
    let api = |c: &Cluster, id: u64| c.nodes[id as usize - 1].api.clone();
    eventually(Duration::from_secs(30), "create table", || async {
        let mut t = pb::tables_client::TablesClient::new(channel(&api(&c, 1)).await?);
        match t.create(pb::CreateTableRequest { name: "t".into() }).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(s.to_string()),
        }
    })
    .await;
    let targets = Arc::new(Mutex::new((1..=3).map(|i| api(&c, i)).collect::<Vec<_>>()));
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    writer(targets.clone(), load.clone(), stop.clone());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3 -> 5: node 4 starts outside the cluster and an operator adds it;
    // node 5 asks to be added itself (--join).
    {
        let n = &mut c.nodes[3];
        n.extra = vec!["--initial-cluster-state".into(), "existing".into()];
        let own = format!("4={}", n.raft);
        n.start(&own);
        let (raft, a) = (n.raft.clone(), n.api.clone());
        change(&api(&c, 1), "add 4", add(4, raft, a)).await;
        targets.lock().unwrap().push(api(&c, 4));
    }
    {
        let at = api(&c, 2);
        let n = &mut c.nodes[4];
        n.extra = vec!["--initial-cluster-state".into(), "auto".into(), "--join".into(), at];
        // The founding members' list: node 5 is not in it, so `auto` joins.
        let m = c.members.clone();
        n.start(&m);
        eventually(Duration::from_secs(120), "node 5 joined and every group has it", || async {
            let m = members(&api(&c, 1)).await?;
            let voter = m.members.iter().any(|x| x.id == 5 && !x.learner);
            if voter && m.settled_epoch == m.epoch {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        })
        .await;
        targets.lock().unwrap().push(api(&c, 5));
    }
    let m = members(&api(&c, 4)).await.unwrap();
    assert_eq!(m.members.iter().filter(|m| !m.learner).count(), 5, "{m:?}");

    // 5 -> 3: the first two founding nodes leave.
    for id in 1..=2u64 {
        targets.lock().unwrap().retain(|a| *a != api(&c, id));
        change(&api(&c, 3), &format!("remove {id}"), remove(id)).await;
        c.nodes[id as usize - 1].terminate();
    }

    // Node 3 loses its disk: it is removed, started empty as a new node and
    // added back under the same id.
    targets.lock().unwrap().retain(|a| *a != api(&c, 3));
    c.nodes[2].kill9();
    std::fs::remove_dir_all(&c.nodes[2].dir).unwrap();
    change(&api(&c, 4), "remove 3 (lost disk)", remove(3)).await;
    {
        let n = &mut c.nodes[2];
        n.extra = vec!["--initial-cluster-state".into(), "existing".into()];
        let own = format!("3={}", n.raft);
        n.start(&own);
    }
    let (raft3, api3) = (c.nodes[2].raft.clone(), api(&c, 3));
    change(&api(&c, 4), "add 3 back", add(3, raft3, api3.clone())).await;
    targets.lock().unwrap().push(api3.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = started.elapsed();

    // Every acknowledged write, read linearizably at the replaced node.
    let load = std::mem::take(&mut *load.lock().unwrap());
    let stored = eventually(Duration::from_secs(30), "read everything at node 3", || async {
        let mut kv = pb::kv_client::KvClient::new(channel(&api3).await?);
        let r = kv
            .range(pb::RangeRequest {
                table: "t".into(),
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?;
        Ok(r.into_inner()
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), String::from_utf8_lossy(&kv.value).into_owned()))
            .collect::<BTreeMap<_, _>>())
    })
    .await;
    let lost: Vec<&String> = load.acked.iter().filter(|(k, v)| stored.get(*k) != Some(v)).map(|(k, _)| k).collect();
    eprintln!(
        "resize 3->5->3 and a lost-disk replacement in {:.1} s: {} writes acknowledged, {} requests failed, longest \
         gap between acknowledged writes {} ms, acknowledged writes lost {}",
        elapsed.as_secs_f64(),
        load.acked.len(),
        load.failed,
        load.longest_gap.as_millis(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(load.acked.len() > 50, "the writer made progress: {}", load.acked.len());
    let m = members(&api3).await.unwrap();
    let ids: Vec<u64> = m.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![3, 4, 5], "{m:?}");
    assert_eq!(m.epoch, m.settled_epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_drains_each_node_and_loses_no_write() {
    let mut c = Cluster::new(3, "rolling");
    let api = |c: &Cluster, id: u64| c.nodes[id as usize - 1].api.clone();
    eventually(Duration::from_secs(30), "create table", || async {
        let mut t = pb::tables_client::TablesClient::new(channel(&api(&c, 1)).await?);
        match t.create(pb::CreateTableRequest { name: "t".into() }).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(s.to_string()),
        }
    })
    .await;
    let targets = Arc::new(Mutex::new((1..=3).map(|i| api(&c, i)).collect::<Vec<_>>()));
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    writer(targets.clone(), load.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    for id in 1..=3u64 {
        // As a rolling update does it: the node leaves the clients' list
        // (its readiness fails), stops on SIGTERM, and comes back.
        targets.lock().unwrap().retain(|a| *a != api(&c, id));
        c.nodes[id as usize - 1].terminate();
        let m = c.members.clone();
        c.nodes[id as usize - 1].start(&m);
        let http = c.nodes[id as usize - 1].http.clone();
        eventually(Duration::from_secs(60), &format!("node {id} ready again"), || {
            let http = http.clone();
            async move {
                match http_get(&http, "/readyz") {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        targets.lock().unwrap().push(api(&c, id));
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load = std::mem::take(&mut *load.lock().unwrap());
    let stored = eventually(Duration::from_secs(30), "read everything", || async {
        let mut kv = pb::kv_client::KvClient::new(channel(&api(&c, 1)).await?);
        let r = kv
            .range(pb::RangeRequest {
                table: "t".into(),
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?;
        Ok(r.into_inner()
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), String::from_utf8_lossy(&kv.value).into_owned()))
            .collect::<BTreeMap<_, _>>())
    })
    .await;
    let lost = load.acked.iter().filter(|(k, v)| stored.get(*k) != Some(v)).count();
    eprintln!(
        "rolling restart of 3 nodes in {:.1} s: {} writes acknowledged, {} requests failed, longest gap between \
         acknowledged writes {} ms, acknowledged writes lost {lost}",
        elapsed.as_secs_f64(),
        load.acked.len(),
        load.failed,
        load.longest_gap.as_millis()
    );
    assert_eq!(lost, 0);
    assert!(load.acked.len() > 50, "the writer made progress: {}", load.acked.len());
}
