//! Real processes: clusters of the `armada` binary on loopback, with kill -9,
//! restarts and bad input. Every wait polls a condition against a deadline.
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use armada_proto::v1 as pb;
use tonic::transport::Channel;

mod common;
use common::*;

async fn kv(api: &str) -> Option<pb::kv_client::KvClient<Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(8));
    ep.connect().await.ok().map(pb::kv_client::KvClient::new)
}

async fn create_table(api: &str, name: &str) {
    eventually(Duration::from_secs(30), "create table", || async {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{api}")).map_err(|e| e.to_string())?;
        let ch = ep.connect().await.map_err(|e| e.to_string())?;
        let mut t = pb::tables_client::TablesClient::new(ch);
        match t.create(pb::CreateTableRequest { name: name.into() }).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(s.to_string()),
        }
    })
    .await
}

async fn put(api: &str, key: &str, value: &str) -> Result<i64, tonic::Status> {
    let Some(mut c) = kv(api).await else { return Err(tonic::Status::unavailable("connect")) };
    let r =
        c.put(pb::PutRequest { table: "t".into(), key: key.into(), value: value.into(), ..Default::default() }).await?;
    Ok(r.into_inner().header.map_or(0, |h| h.revision))
}

async fn read_all(api: &str, serializable: bool) -> Result<BTreeMap<String, String>, String> {
    read_range(api, 0, serializable).await
}

/// Every `k…` key of table `t` at `revision` (0: latest).
async fn read_range(api: &str, revision: i64, serializable: bool) -> Result<BTreeMap<String, String>, String> {
    let mut c = kv(api).await.ok_or("connect")?;
    let r = c
        .range(pb::RangeRequest {
            table: "t".into(),
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            revision,
            serializable,
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?;
    Ok(r.into_inner()
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), String::from_utf8_lossy(&kv.value).into_owned()))
        .collect())
}

async fn table_leader(api: &str) -> Result<u64, String> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{api}")).map_err(|e| e.to_string())?;
    let ch = ep.connect().await.map_err(|e| e.to_string())?;
    let s = pb::cluster_client::ClusterClient::new(ch).status(pb::StatusRequest {}).await.map_err(|e| e.to_string())?;
    s.into_inner()
        .groups
        .iter()
        .find(|g| g.table == "t" && g.leader_id != 0)
        .map(|g| g.leader_id)
        .ok_or("no leader".into())
}

/// Waits until a serializable read through `api` returns exactly `acked`.
async fn holds_eventually(api: &str, acked: &BTreeMap<String, String>, within: Duration, what: &str) {
    eventually(within, what, || {
        let (api, acked) = (api.to_string(), acked.clone());
        async move {
            let got = read_all(&api, true).await?;
            if got == acked {
                Ok(())
            } else {
                Err(format!("{} of {} keys", got.len(), acked.len()))
            }
        }
    })
    .await;
}

/// Writes `n` keys starting at `from`, round-robin over `apis`, retrying
/// each (idempotently: same key, same value) until acknowledged.
async fn write_keys(apis: &[String], from: usize, n: usize, acked: &mut BTreeMap<String, String>) {
    for i in from..from + n {
        let (k, v) = (format!("k{i:04}"), format!("v{i}"));
        let mut attempt = 0usize;
        eventually(Duration::from_secs(30), "acknowledged write", || {
            attempt += 1;
            let api = apis[(i + attempt) % apis.len()].clone();
            let (k, v) = (k.clone(), v.clone());
            async move { put(&api, &k, &v).await.map(|_| ()).map_err(|s| s.to_string()) }
        })
        .await;
        acked.insert(k, v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_kill9_of_the_leader_and_a_full_restart() {
    let mut cluster = Cluster::new(3, "kill9");
    let apis: Vec<String> = cluster.nodes.iter().map(|n| n.api.clone()).collect();
    create_table(&apis[0], "t").await;
    let mut acked = BTreeMap::new();
    write_keys(&apis, 0, 30, &mut acked).await;
    // Linearizable reads through every node see every acknowledged write.
    for api in &apis {
        let got = eventually(Duration::from_secs(10), "read", || read_all(api, false)).await;
        assert_eq!(got, acked, "linearizable read through {api}");
    }
    // kill -9 the table's leader; the others keep accepting writes.
    let leader = eventually(Duration::from_secs(10), "leader", || table_leader(&apis[0])).await;
    let idx = (leader - 1) as usize;
    cluster.nodes[idx].kill9();
    let survivors: Vec<String> = apis.iter().enumerate().filter(|(i, _)| *i != idx).map(|(_, a)| a.clone()).collect();
    let killed_at = Instant::now();
    write_keys(&survivors, 30, 1, &mut acked).await;
    let failover = killed_at.elapsed();
    assert!(failover < Duration::from_secs(10), "first write after kill -9 took {failover:?}");
    write_keys(&survivors, 31, 29, &mut acked).await;
    // The killed node restarts and catches up (its own applied state).
    let members = cluster.members.clone();
    cluster.nodes[idx].start(&members);
    let api = apis[idx].clone();
    holds_eventually(&api, &acked, Duration::from_secs(30), "restarted node catches up").await;
    // A full restart keeps every acknowledged write.
    for n in &mut cluster.nodes {
        n.terminate();
    }
    for i in 0..cluster.nodes.len() {
        cluster.nodes[i].start(&members);
    }
    for api in &apis {
        let got = eventually(Duration::from_secs(30), "read after full restart", || read_all(api, false)).await;
        assert_eq!(got, acked, "after full restart, through {api}");
    }
    eprintln!("failover after kill -9 of the leader: first acknowledged write after {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let cluster = Cluster::new(1, "badinput");
    let api = cluster.nodes[0].api.clone();
    create_table(&api, "t").await;
    let mut c = kv(&api).await.expect("connect");
    let big_key = vec![b'k'; 5000];
    let e = c
        .put(pb::PutRequest { table: "t".into(), key: big_key, value: vec![], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("key is too large"), "{e}");
    let big_value = vec![0u8; 2 * 1024 * 1024 + 1];
    let e = c
        .put(pb::PutRequest { table: "t".into(), key: b"k".to_vec(), value: big_value, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c
        .put(pb::PutRequest { table: "nope".into(), key: b"k".to_vec(), value: vec![], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // A name no table can have is the client's mistake, not a missing table.
    for bad in ["no/such", "", "has space"] {
        let e = c
            .put(pb::PutRequest { table: bad.into(), key: b"k".to_vec(), value: vec![], ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
        assert!(e.message().contains("invalid table name"), "{e}");
        let e = c.range(pb::RangeRequest { table: bad.into(), key: b"k".to_vec(), ..Default::default() }).await;
        assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let e = c
        .range(pb::RangeRequest { table: "t".into(), key: b"k".to_vec(), revision: 99, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    let e = c.range(pb::RangeRequest { table: "t".into(), key: vec![], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c
        .range(pb::RangeRequest { table: "t".into(), key: b"k".to_vec(), sort_order: 7, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // Still serving.
    let r = put(&api, "k", "v").await.expect("put after bad input");
    assert!(r > 1);
    // Operator endpoints.
    let http = cluster.nodes[0].http.clone();
    assert_eq!(http_get(&http, "/healthz").unwrap().0, 200);
    let ready = eventually(Duration::from_secs(10), "readyz", || {
        let http = http.clone();
        async move {
            match http_get(&http, "/readyz")? {
                (200, body) => Ok(body),
                (code, body) => Err(format!("{code}: {body}")),
            }
        }
    })
    .await;
    assert!(ready.contains("ready"));
    let (code, metrics) = http_get(&http, "/metrics").unwrap();
    assert_eq!(code, 200);
    // Three bad puts above, and three with invalid table names.
    assert!(metrics.contains("armada_grpc_requests_total{method=\"Put\",outcome=\"error\"} 6"), "{metrics}");
    assert!(metrics.contains("armada_grpc_request_duration_seconds_count{method=\"Put\"} 7"), "{metrics}");
    assert!(metrics.contains("armada_table_revision{table=\"t\"} 2"), "{metrics}");
    assert!(metrics.contains("armada_raft_leader_id{table=\"t\"} 1"), "{metrics}");
    // The counters a benchmark divides by its operations: the good put
    // above was proposed, written and synced.
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        line.and_then(|l| l[name.len()..].trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    for name in [
        "armada_raft_proposals_total",
        "armada_engine_writes_total",
        "armada_engine_write_bytes_total",
        "armada_engine_syncs_total",
        "armada_raft_flushes_total{reason=\"append\"}",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(value(name) > 0.0, "{name} is 0: {metrics}");
    }
    // One sync answers every flush waiting for it: never more syncs than
    // flushes.
    let flushes: f64 = ["append", "vote", "snapshot"]
        .iter()
        .map(|r| value(&format!("armada_raft_flushes_total{{reason=\"{r}\"}}")))
        .sum();
    assert!(value("armada_engine_syncs_total") <= flushes, "{metrics}");
}

/// Readiness means the node serves: an etcd put sent the moment `/readyz`
/// first answers 200 succeeds without a retry, on a fresh single node and on
/// every node of a fresh 3-node cluster. Before readiness covered the etcd
/// table, such a put failed with `NotFound: armada table "default" (the etcd
/// table) does not exist` (3 of 3 tries on a single node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_node_serves_etcd_requests_at_once() {
    for (n, name) in [(1, "ready-1"), (3, "ready-3")] {
        let cluster = Cluster::new(n, name);
        for node in &cluster.nodes {
            // Poll /readyz directly (no client set up in between), then put.
            let http = node.http.clone();
            eventually(Duration::from_secs(30), "readyz", || {
                let http = http.clone();
                async move {
                    match http_get(&http, "/readyz")? {
                        (200, _) => Ok(()),
                        (code, body) => Err(format!("{code}: {body}")),
                    }
                }
            })
            .await;
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", node.etcd)).unwrap();
            let mut c = armada_proto::etcd::kv_client::KvClient::new(ep.connect().await.expect("connect"));
            let r = c
                .put(armada_proto::etcd::PutRequest {
                    key: format!("ready-{}", node.id).into_bytes(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })
                .await;
            assert!(r.is_ok(), "{name} node {}: put right after readiness: {r:?}", node.id);
        }
        // Liveness is not readiness: /healthz answers regardless.
        assert_eq!(http_get(&cluster.nodes[0].http, "/healthz").unwrap().0, 200);
    }
}

/// (leader id, term) of every group, as node `api` sees them.
async fn leaders(api: &str) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{api}")).map_err(|e| e.to_string())?;
    let ch = ep.connect().await.map_err(|e| e.to_string())?;
    let s = pb::cluster_client::ClusterClient::new(ch).status(pb::StatusRequest {}).await.map_err(|e| e.to_string())?;
    Ok(s.into_inner().groups.into_iter().map(|g| (g.table, (g.leader_id, g.raft_term))).collect())
}

/// A follower that was paused (SIGSTOP) for several election timeouts and
/// resumes does not depose the leaders: with Raft pre-vote it first asks
/// whether it could win, the others still hear from their leader and say
/// no, so it never raises its term. Without pre-vote a real cluster lost
/// its leader 0.15 s after such a return ("HigherVote") and served nothing
/// for 1.9 s. The simulated counterpart is scenarios/isolate-heal-3.toml.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_follower_does_not_depose_the_leader() {
    let mut cluster = Cluster::new(3, "prevote");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let api = cluster.nodes[0].api.clone();
    create_table(&api, "t").await;
    cluster.wait_ready(Duration::from_secs(30)).await;
    let before = leaders(&api).await.expect("status");
    assert!(before.values().all(|(l, _)| *l != 0), "{before:?}");
    // Pause the node leading the fewest groups, for about three election
    // timeouts; the groups it leads elect anew (expected), the others must
    // keep their leader and term.
    let leads = |id: u64| before.values().filter(|(l, _)| *l == id).count();
    let victim = (0..3).min_by_key(|&i| leads(cluster.nodes[i].id)).unwrap();
    let victim_id = cluster.nodes[victim].id;
    let others: BTreeMap<String, (u64, u64)> =
        before.iter().filter(|(_, (l, _))| *l != victim_id).map(|(k, v)| (k.clone(), *v)).collect();
    assert!(!others.is_empty(), "node {victim_id} leads every group: {before:?}");
    let pid = cluster.nodes[victim].child.as_ref().unwrap().id().to_string();
    let observer = cluster.nodes[(victim + 1) % 3].api.clone();
    let mut watched_terms = Vec::new();
    for _ in 0..2 {
        assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        // Watch the leaders for a while after the return.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            watched_terms.push(leaders(&observer).await.expect("status"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for seen in &watched_terms {
        let seen: BTreeMap<String, (u64, u64)> =
            seen.iter().filter(|(k, _)| others.contains_key(*k)).map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(seen, others, "a leader changed after node {victim_id} resumed");
    }
    cluster.nodes[victim].kill9();
}

/// A replica that was down while the others wrote past their snapshot and
/// purged the log catches up by a streamed snapshot (many chunks, installed
/// chunk by chunk), and then holds exactly what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_log_catches_up_by_a_streamed_snapshot() {
    let mut cluster =
        Cluster::with_args(3, "snapcatch", &["--snapshot-after-logs", "100", "--snapshot-chunk-bytes", "16384"]);
    cluster.wait_ready(Duration::from_secs(60)).await;
    let apis: Vec<String> = cluster.nodes.iter().map(|n| n.api.clone()).collect();
    create_table(&apis[0], "t").await;
    cluster.wait_ready(Duration::from_secs(30)).await;
    let leader = eventually(Duration::from_secs(10), "leader", || table_leader(&apis[0])).await;
    let down = cluster.nodes.iter().position(|n| n.id != leader).unwrap();
    cluster.nodes[down].kill9();
    let live: Vec<String> = apis.iter().enumerate().filter(|(i, _)| *i != down).map(|(_, a)| a.clone()).collect();
    // About 1.2 MB of values in 600 entries: six snapshots' worth of log,
    // most of it purged; the snapshot spans dozens of 16 KiB chunks.
    let pad = "x".repeat(1000);
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let (live, pad) = (live.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            for i in (w..600).step_by(6) {
                let (k, v) = (format!("k{i:04}"), format!("v{i}-{pad}"));
                let mut attempt = 0usize;
                eventually(Duration::from_secs(30), "acknowledged write", || {
                    attempt += 1;
                    let api = live[(i + attempt) % live.len()].clone();
                    let (k, v) = (k.clone(), v.clone());
                    async move { put(&api, &k, &v).await.map(|_| ()).map_err(|s| s.to_string()) }
                })
                .await;
                acked.insert(k, v);
            }
            acked
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    // The leader purges lazily (not while a retry to the stopped node holds
    // those entries): write on until it has purged past what the stopped
    // node holds.
    let metric = |http: &str, name: &str| -> Option<u64> {
        let (_, m) = http_get(http, "/metrics").ok()?;
        m.lines().find_map(|l| l.strip_prefix(&format!("{name}{{table=\"t\"}} "))).and_then(|v| v.trim().parse().ok())
    };
    let leader_http = cluster.nodes.iter().find(|n| n.id == leader).unwrap().http.clone();
    let mut next = 600;
    while metric(&leader_http, "armada_raft_purged_index").unwrap_or(0) < 300 {
        assert!(next < 3000, "the leader never purged its log");
        write_keys(&live, next, 20, &mut acked).await;
        next += 20;
    }
    let members = cluster.members.clone();
    cluster.nodes[down].start(&members);
    let api = apis[down].clone();
    let started = Instant::now();
    holds_eventually(&api, &acked, Duration::from_secs(60), "the returning replica catches up").await;
    let caught_up = started.elapsed();
    let installed =
        metric(&cluster.nodes[down].http, "armada_raft_snapshots_installed").expect("the snapshot metric of table t");
    assert!(installed >= 1, "the replica caught up without a snapshot");
    eprintln!("returning replica caught up by {installed} streamed snapshot(s) in {caught_up:?}");
}

fn armada(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run armada");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An online backup taken while writes go on is a consistent image at one
/// revision: restored into a new data directory, the new node answers
/// exactly what the source answered at that revision. Damaged files and
/// non-empty directories are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_to_the_source_at_its_revision() {
    let cluster = Cluster::new(1, "backup");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let api = cluster.nodes[0].api.clone();
    create_table(&api, "t").await;
    let mut acked = BTreeMap::new();
    write_keys(std::slice::from_ref(&api), 0, 200, &mut acked).await;
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut more = BTreeMap::new();
            write_keys(&[api], 200, 300, &mut more).await;
        })
    };
    let dir = std::env::temp_dir().join(format!("armada-backup-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.backup");
    let endpoint = format!("http://{api}");
    let (ok, out, err) = armada(&["backup", "take", "t", "--file", file.to_str().unwrap(), "--endpoint", &endpoint]);
    assert!(ok, "backup take: {err}");
    writer.await.unwrap();
    let revision: i64 = out
        .split("at revision ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out:?}"));
    assert!(revision > 200, "the backup holds the first 200 writes: {out}");
    let (ok, out, err) = armada(&["backup", "verify", file.to_str().unwrap()]);
    assert!(ok && out.contains("complete backup"), "{out} {err}");
    // Restore into a new directory and start a node on it.
    let restored = dir.join("restored");
    let (ok, out, err) = armada(&["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "restore: {out} {err}");
    let (ok, _, err) = armada(&["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(!ok && err.contains("already holds"), "{err}");
    let mut node = common::Node::new(1, restored.clone());
    let members = format!("1={}", node.raft);
    node.start(&members);
    wait_ready(&node.http, Duration::from_secs(60)).await;
    let source = eventually(Duration::from_secs(10), "source read", || read_range(&api, revision, false)).await;
    let copy = eventually(Duration::from_secs(10), "restored read", || read_range(&node.api, 0, false)).await;
    assert_eq!(copy, source, "the restored table is the source at revision {revision}");
    assert!(copy.len() >= 200);
    // The restored table goes on from its revision.
    let put = eventually(Duration::from_secs(10), "write to the restored node", || {
        let api = node.api.clone();
        async move { put(&api, "k9999", "after").await.map_err(|s| s.to_string()) }
    })
    .await;
    assert_eq!(put, revision + 1);
    // Damaged files are refused.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    let damaged = dir.join("damaged.backup");
    std::fs::write(&damaged, &bytes).unwrap();
    let (ok, _, err) = armada(&["backup", "verify", damaged.to_str().unwrap()]);
    assert!(!ok && (err.contains("checksum") || err.contains("corrupt") || err.contains("ends early")), "{err}");
    let (ok, _, err) = armada(&["restore", damaged.to_str().unwrap(), "--data-dir", dir.join("r2").to_str().unwrap()]);
    assert!(!ok, "a damaged backup restored: {err}");
    // Truncated (the intact file: the flipped byte above may itself make a
    // frame undecodable, which is reported first).
    let intact = std::fs::read(&file).unwrap();
    std::fs::write(&damaged, &intact[..intact.len() - 10]).unwrap();
    let (ok, _, err) = armada(&["backup", "verify", damaged.to_str().unwrap()]);
    assert!(!ok && err.contains("ends early"), "{err}");
    node.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node whose address is taken does not start: it fails at once, naming
/// the listener and the address (before, the HTTP listener was bound,
/// dropped and bound again in a task whose error nobody read).
#[test]
fn a_taken_address_fails_the_start_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (flag, listener) in [("--rest-address", "http"), ("--etcd-address", "etcd"), ("--api-address", "api")] {
        let dir = std::env::temp_dir().join(format!("armada-taken-{listener}-{}", std::process::id()));
        let node = Node::new(1, dir.clone());
        let members = format!("1={}", node.raft);
        let mut args: BTreeMap<&str, String> = BTreeMap::from([
            ("--api-address", node.api.clone()),
            ("--rest-address", node.http.clone()),
            ("--etcd-address", node.etcd.clone()),
            ("--replication-address", node.replication.clone()),
        ]);
        args.insert(flag, addr.clone());
        let out = Command::new(BIN)
            .args(["leader", "--node-id", "1", "--initial-members", &members, "--raft-address", &node.raft])
            .args(args.iter().flat_map(|(k, v)| [k.to_string(), v.clone()]))
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}: started on a taken address");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("binding the {listener} address {addr}")), "{flag}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn invalid_configuration_fails_fast_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("armada-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "node_id = \"one\"\n").unwrap();
    let out = Command::new(BIN).arg("leader").arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("invalid type"), "{err}");
    let out = Command::new(BIN).args(["leader", "--initial-members", "2=127.0.0.1:1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not among them"));
    for bad in [" , ", "http://[::1"] {
        let out = Command::new(BIN).args(["follower", "--leader-address", bad]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid --leader-address"), "{bad:?}: {err}");
    }
    let out = Command::new(BIN).args(["leader", "--history-retention", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("history retention"));
}

/// `armada kv watch` prints a table's events from a past revision (the
/// armada.v1 Watch service), then stops after `--count`; bad input gets a
/// clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watches_a_table_from_a_past_revision() {
    let cluster = Cluster::new(1, "cli-watch");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let api = cluster.nodes[0].api.clone();
    create_table(&api, "t").await;
    let endpoint = format!("http://{api}");
    for (k, v) in [("k1", "a"), ("x", "b"), ("k2", "c"), ("k1", "d")] {
        let (ok, _, err) = armada(&["kv", "put", "t", k, v, "--endpoint", &endpoint]);
        assert!(ok, "put: {err}");
    }
    let (ok, out, err) = armada(&[
        "kv",
        "watch",
        "t",
        "k",
        "--prefix",
        "--rev",
        "1",
        "--prev-kv",
        "--count",
        "3",
        "-o",
        "json",
        "--endpoint",
        &endpoint,
    ]);
    assert!(ok, "watch: {err}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let summary: Vec<(String, String, i64, Option<String>)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["kv"]["key"].as_str().unwrap().to_string(),
                e["revision"].as_i64().unwrap(),
                e["prev_kv"]["value"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("PUT".into(), "k1".into(), 2, None),
            ("PUT".into(), "k2".into(), 4, None),
            ("PUT".into(), "k1".into(), 5, Some("a".into())),
        ]
    );
    let (ok, _, err) = armada(&["kv", "watch", "t", "", "--endpoint", &endpoint]);
    assert!(!ok && err.contains("key is empty"), "{err}");
    let (ok, _, err) = armada(&["kv", "watch", "nope", "k", "--count", "1", "--endpoint", &endpoint]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}
