//! Fault tests across real hosts: the Armada image runs as a leader cluster
//! of three containers on one Docker network and a follower cluster of
//! three on another, which reaches the leader cluster only through a WAN
//! proxy container (`armada wan-proxy`). A seeded schedule kills, pauses,
//! disconnects, firewalls (iptables in the container's network namespace)
//! and gracefully restarts leader nodes, slows and cuts the WAN, and kills
//! follower nodes, while clients put and read keys at the leader cluster
//! and read at the follower cluster through published ports, recording
//! every operation. At the end faults heal,
//! a final reader reads every key, and:
//! - the history is written as JSON lines (`armada_sim::history` format) for
//!   the simulator's linearizability checker (`ci/sim check-history FILE`,
//!   which `ci/container-faults` runs);
//! - the acknowledged-write audit runs here: an acknowledged put is lost if
//!   the key's final value was written by a put that finished before it
//!   began, or the key is gone (the workload never deletes);
//! - replication (as the simulator's R3 and R4): every follower read equals
//!   the leader cluster's state at the revision it was read at (read back
//!   at that revision; nothing is compacted), and every follower node ends
//!   at the leader cluster's final revision with its values.
//!
//! Runs only when `ARMADA_CONTAINER_FAULTS_S` (seconds of faults) is set,
//! Docker answers and the image (`ARMADA_IMAGE`, default armada:dev)
//! exists; otherwise it says why and passes. `ARMADA_FAULT_SEED` picks the
//! schedule (default: the time); a failing run prints its seed.
#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use armada_proto::v1 as pb;
use serde_json::json;
use tonic::transport::Channel;

mod common;
use common::*;

const NODES: u64 = 3;
const KEYS: u64 = 5;
const CLIENTS: u64 = 4;

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// splitmix64: the fault schedule's generator (seeded, printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One container node and its published ports on loopback.
struct Box_ {
    name: String,
    api: String,
    http: String,
}

/// Removes the containers and the network however the test ends.
struct Cleanup {
    names: Vec<String>,
    networks: Vec<String>,
}
impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = docker(&["rm", "-f", n]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
    }
}

/// An acknowledged put: key, value, invoked and completed (ns).
type Acked = (String, String, u64, u64);
/// A read at the follower cluster: key, (value, mod revision), the
/// revision it was read at.
type FollowerRead = (String, Option<(String, i64)>, i64);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Pause,
    Disconnect,
    Firewall,
    Restart,
    /// The WAN between the clusters slows down (the proxy's delay).
    WanDelay,
    /// The WAN is cut (a partition between the clusters).
    WanCut,
    /// A follower-cluster node is killed and started again.
    FollowerKill,
}

/// Sends one command to the WAN proxy's control port.
fn wan(control: &str, cmd: &str) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(control).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    writeln!(s, "{cmd}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
    Ok(line.trim().to_string())
}

/// A read of one key at a node: (value, mod revision) and the header revision.
async fn get(api: &str, key: &str, revision: i64) -> Result<(Option<(String, i64)>, i64), String> {
    let mut kv = pb::kv_client::KvClient::new(channel(api).await?);
    let r = kv
        .range(pb::RangeRequest { table: "t".into(), key: key.as_bytes().to_vec(), revision, ..Default::default() })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let value = r.kvs.first().map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision));
    Ok((value, r.header.map_or(0, |h| h.revision)))
}

async fn channel(api: &str) -> Result<Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// A recorded operation, in the simulator's history format.
fn op(
    client: u64,
    kind: serde_json::Value,
    invoke: u64,
    complete: u64,
    outcome: serde_json::Value,
) -> serde_json::Value {
    json!({"client": client, "table": "t", "kind": kind, "invoke_ns": invoke, "complete_ns": complete, "outcome": outcome})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_under_faults_stay_linearizable_and_keep_acknowledged_writes() {
    let Some(seconds) = std::env::var("ARMADA_CONTAINER_FAULTS_S").ok().and_then(|s| s.parse::<u64>().ok()) else {
        eprintln!("skipped: set ARMADA_CONTAINER_FAULTS_S (ci/container-faults does)");
        return;
    };
    if let Err(e) = docker(&["version", "--format", "{{.Server.Version}}"]) {
        eprintln!("skipped: Docker is not available here ({e})");
        return;
    }
    let image = std::env::var("ARMADA_IMAGE").unwrap_or_else(|_| "armada:dev".into());
    if docker(&["image", "inspect", &image]).is_err() {
        eprintln!("skipped: image {image} not found (build it with deploy/build-image)");
        return;
    }
    let seed: u64 = std::env::var("ARMADA_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    eprintln!(
        "container faults: seed {seed}, {seconds} s (replay: ARMADA_FAULT_SEED={seed} ci/container-faults {seconds})"
    );
    let mut rng = Rng(seed);
    let project = format!("armada-faults-{}", std::process::id());
    let network = project.clone();
    docker(&["network", "create", &network]).unwrap();
    let mut cleanup = Cleanup { names: Vec::new(), networks: vec![network.clone()] };
    let members = (1..=NODES).map(|i| format!("{i}=n{i}:5012")).collect::<Vec<_>>().join(",");
    let mut boxes = Vec::new();
    for i in 1..=NODES {
        let name = format!("{project}-n{i}");
        cleanup.names.push(name.clone());
        let id = i.to_string();
        let alias = format!("n{i}");
        // Fixed host ports: a restarted container keeps them.
        let (api_port, http_port) = (free_tcp_port(), free_tcp_port());
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &alias,
            "--network",
            &network,
            "--network-alias",
            &alias,
            "-p",
            &format!("127.0.0.1:{api_port}:8443"),
            "-p",
            &format!("127.0.0.1:{http_port}:8079"),
            &image,
            "leader",
            "--node-id",
            &id,
            "--initial-members",
            &members,
            "--raft-address",
            "0.0.0.0:5012",
            "--api-address",
            "0.0.0.0:8443",
            "--rest-address",
            "0.0.0.0:8079",
            "--etcd-address",
            "0.0.0.0:2379",
            "--replication-address",
            "0.0.0.0:8444",
            "--advertise-api-address",
            &format!("{alias}:8443"),
            "--request-timeout-ms",
            "2000",
        ])
        .unwrap();
        boxes.push(Box_ { name, api: format!("127.0.0.1:{api_port}"), http: format!("127.0.0.1:{http_port}") });
    }
    for b in &boxes {
        wait_ready(&b.http, Duration::from_secs(60)).await;
    }
    eventually(Duration::from_secs(30), "create table", || async {
        let mut t = pb::tables_client::TablesClient::new(channel(&boxes[0].api).await?);
        match t.create(pb::CreateTableRequest { name: "t".into() }).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(s.to_string()),
        }
    })
    .await;

    // A follower cluster on its own network, reaching the leader cluster's
    // replication listeners only through the WAN proxy.
    let edge = format!("{project}-edge");
    docker(&["network", "create", &edge]).unwrap();
    cleanup.networks.push(edge.clone());
    let wan_name = format!("{project}-wan");
    cleanup.names.push(wan_name.clone());
    let control_port = free_tcp_port();
    let control = format!("127.0.0.1:{control_port}");
    docker(&[
        "run",
        "-d",
        "--name",
        &wan_name,
        "--hostname",
        "wan",
        "--network",
        &network,
        "-p",
        &format!("{control}:9100"),
        &image,
        "wan-proxy",
        "--route",
        "0.0.0.0:9001=n1:8444",
        "--route",
        "0.0.0.0:9002=n2:8444",
        "--route",
        "0.0.0.0:9003=n3:8444",
        "--delay-ms",
        "20",
        "--jitter-ms",
        "10",
        "--control",
        "0.0.0.0:9100",
    ])
    .unwrap();
    docker(&["network", "connect", "--alias", "wan", &edge, &wan_name]).unwrap();
    let fmembers = (1..=NODES).map(|i| format!("{i}=f{i}:5012")).collect::<Vec<_>>().join(",");
    let mut followers = Vec::new();
    for i in 1..=NODES {
        let name = format!("{project}-f{i}");
        cleanup.names.push(name.clone());
        let alias = format!("f{i}");
        let (api_port, http_port) = (free_tcp_port(), free_tcp_port());
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &alias,
            "--network",
            &edge,
            "--network-alias",
            &alias,
            "-p",
            &format!("127.0.0.1:{api_port}:8443"),
            "-p",
            &format!("127.0.0.1:{http_port}:8079"),
            &image,
            "follower",
            "--leader-address",
            "http://wan:9001,http://wan:9002,http://wan:9003",
            "--node-id",
            &i.to_string(),
            "--initial-members",
            &fmembers,
            "--raft-address",
            "0.0.0.0:5012",
            "--api-address",
            "0.0.0.0:8443",
            "--rest-address",
            "0.0.0.0:8079",
            "--etcd-address",
            "0.0.0.0:2379",
            "--request-timeout-ms",
            "2000",
        ])
        .unwrap();
        followers.push(Box_ { name, api: format!("127.0.0.1:{api_port}"), http: format!("127.0.0.1:{http_port}") });
    }
    for f in &followers {
        wait_ready(&f.http, Duration::from_secs(90)).await;
    }
    eventually(Duration::from_secs(30), "table t at the follower cluster", || async {
        get(&followers[0].api, "k0", 0).await.map(|_| ())
    })
    .await;

    let t0 = Instant::now();
    let ns = move || t0.elapsed().as_nanos() as u64;
    let history: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let writes: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let apis: Vec<String> = boxes.iter().map(|b| b.api.clone()).collect();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (history, acked, writes, apis) = (history.clone(), acked.clone(), writes.clone(), apis.clone());
        let mut r = Rng(seed ^ (c + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let api = &apis[r.range(0, NODES - 1) as usize];
                let key = format!("k{}", r.range(0, KEYS - 1));
                let invoke = ns();
                let Ok(ch) = channel(api).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut kv = pb::kv_client::KvClient::new(ch);
                if r.range(0, 1) == 0 {
                    n += 1;
                    let value = format!("c{c}-{n}");
                    let req = pb::PutRequest {
                        table: "t".into(),
                        key: key.clone().into(),
                        value: value.clone().into(),
                        ..Default::default()
                    };
                    let res = kv.put(req).await;
                    let complete = ns();
                    writes.lock().unwrap().insert(value.clone(), (invoke, complete));
                    let outcome = match res {
                        Ok(r) => {
                            let rev = r.into_inner().header.map_or(0, |h| h.revision) as u64;
                            acked.lock().unwrap().push((key.clone(), value.clone(), invoke, complete));
                            json!({"Ok": {"Put": {"revision": rev}}})
                        }
                        Err(s) if s.code() == tonic::Code::InvalidArgument => json!({"Failed": s.message()}),
                        Err(s) => json!({"Indefinite": s.message()}),
                    };
                    history.lock().unwrap().push(op(
                        c,
                        json!({"Put": {"key": key, "value": value}}),
                        invoke,
                        complete,
                        outcome,
                    ));
                } else {
                    let req = pb::RangeRequest { table: "t".into(), key: key.clone().into(), ..Default::default() };
                    let res = kv.range(req).await;
                    let complete = ns();
                    let outcome = match res {
                        Ok(r) => {
                            let r = r.into_inner();
                            let rev = r.header.map_or(0, |h| h.revision) as u64;
                            let value = r
                                .kvs
                                .first()
                                .map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision as u64));
                            json!({"Ok": {"Get": {"value": value, "revision": rev}}})
                        }
                        Err(s) => json!({"Failed": s.message()}),
                    };
                    history.lock().unwrap().push(op(
                        c,
                        json!({"Get": {"key": key, "serializable": false}}),
                        invoke,
                        complete,
                        outcome,
                    ));
                }
            }
        }));
    }

    // Readers at the follower cluster: (key, value and mod revision, the
    // revision the answer was read at); each is compared with the leader
    // cluster's state at that revision afterwards.
    let follower_reads: Arc<Mutex<Vec<FollowerRead>>> = Arc::default();
    let fapis: Vec<String> = followers.iter().map(|b| b.api.clone()).collect();
    for c in 0..2u64 {
        let (reads, fapis) = (follower_reads.clone(), fapis.clone());
        let mut r = Rng(seed ^ (c + 101).wrapping_mul(0x2545_f491_4f6c_dd1d));
        clients.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let api = &fapis[r.range(0, NODES - 1) as usize];
                let key = format!("k{}", r.range(0, KEYS - 1));
                match get(api, &key, 0).await {
                    Ok((value, rev)) => reads.lock().unwrap().push((key, value, rev)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }

    // The fault schedule: one fault at a time, each held 1-4 s.
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    while Instant::now() + Duration::from_secs(2) < deadline {
        tokio::time::sleep(Duration::from_millis(rng.range(500, 2000))).await;
        let b = &boxes[rng.range(0, NODES - 1) as usize];
        let kinds = [
            Fault::Kill,
            Fault::Pause,
            Fault::Disconnect,
            Fault::Firewall,
            Fault::Restart,
            Fault::WanDelay,
            Fault::WanCut,
            Fault::FollowerKill,
        ];
        let fault = kinds[rng.range(0, kinds.len() as u64 - 1) as usize];
        let hold = Duration::from_millis(rng.range(1000, 4000));
        *injected.entry(format!("{fault:?}").to_lowercase()).or_default() += 1;
        let alias = b.name.rsplit('-').next().unwrap().to_string();
        match fault {
            Fault::Kill => {
                let _ = docker(&["kill", &b.name]);
                tokio::time::sleep(hold).await;
                docker(&["start", &b.name]).unwrap();
            }
            Fault::Pause => {
                docker(&["pause", &b.name]).unwrap();
                tokio::time::sleep(hold).await;
                docker(&["unpause", &b.name]).unwrap();
            }
            Fault::Disconnect => {
                docker(&["network", "disconnect", &network, &b.name]).unwrap();
                tokio::time::sleep(hold).await;
                docker(&["network", "connect", "--alias", &alias, &network, &b.name]).unwrap();
            }
            Fault::Firewall => {
                // Raft traffic (QUIC over UDP) dropped both ways, inside
                // the container's network namespace.
                let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &b.name]).unwrap();
                let rule = |op: &str, chain: &str, dir: &str| {
                    Command::new("nsenter")
                        .args(["-t", &pid, "-n", "iptables", op, chain, "-p", "udp", dir, "5012", "-j", "DROP"])
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false)
                };
                if rule("-A", "INPUT", "--dport") && rule("-A", "OUTPUT", "--dport") {
                    tokio::time::sleep(hold).await;
                    rule("-D", "INPUT", "--dport");
                    rule("-D", "OUTPUT", "--dport");
                } else {
                    eprintln!("container faults: iptables unavailable (nsenter or iptables missing); pausing instead");
                    docker(&["pause", &b.name]).unwrap();
                    tokio::time::sleep(hold).await;
                    docker(&["unpause", &b.name]).unwrap();
                }
            }
            Fault::Restart => {
                // A graceful restart: SIGTERM (the node drains), then start.
                docker(&["restart", "-t", "20", &b.name]).unwrap();
            }
            Fault::WanDelay => {
                let ms = rng.range(100, 400);
                wan(&control, &format!("delay {ms} {}", ms / 4)).unwrap();
                tokio::time::sleep(hold).await;
                wan(&control, "delay 20 10").unwrap();
            }
            Fault::WanCut => {
                wan(&control, "cut").unwrap();
                tokio::time::sleep(hold).await;
                wan(&control, "heal").unwrap();
            }
            Fault::FollowerKill => {
                let f = &followers[rng.range(0, NODES - 1) as usize];
                let _ = docker(&["kill", &f.name]);
                tokio::time::sleep(hold).await;
                docker(&["start", &f.name]).unwrap();
            }
        }
    }
    for c in clients {
        let _ = c.await;
    }
    // Healed: every node serves again, then the final reads.
    for b in &boxes {
        wait_ready(&b.http, Duration::from_secs(60)).await;
    }
    let mut finals = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let (invoke, value, rev) = eventually(Duration::from_secs(30), "final read", || async {
            let invoke = ns();
            let mut kv = pb::kv_client::KvClient::new(channel(&boxes[0].api).await?);
            let r = kv
                .range(pb::RangeRequest { table: "t".into(), key: key.clone().into(), ..Default::default() })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let value =
                r.kvs.first().map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision as u64));
            Ok((invoke, value, r.header.map_or(0, |h| h.revision) as u64))
        })
        .await;
        history.lock().unwrap().push(op(
            u32::MAX as u64,
            json!({"Get": {"key": key, "serializable": false}}),
            invoke,
            ns(),
            json!({"Ok": {"Get": {"value": value, "revision": rev}}}),
        ));
        finals.insert(key, value.map(|(v, _)| v));
    }

    // The acknowledged-write audit.
    let writes = writes.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let mut lost = Vec::new();
    for (key, value, invoke, _) in &acked {
        match finals.get(key).cloned().flatten() {
            None => lost.push(format!("{key}={value} (the key is gone)")),
            Some(v) if v == *value => {}
            Some(v) => {
                let (_, done) = writes.get(&v).copied().unwrap_or((0, u64::MAX));
                if done < *invoke {
                    lost.push(format!("{key}={value} (overwritten by the older {v})"));
                }
            }
        }
    }
    let history = history.lock().unwrap().clone();
    let path = std::env::var("ARMADA_FAULT_HISTORY").unwrap_or_else(|_| {
        std::env::temp_dir().join(format!("armada-container-faults-{seed}.jsonl")).display().to_string()
    });
    let text: String = history.iter().map(|o| format!("{o}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let ok = history.iter().filter(|o| o["outcome"].get("Ok").is_some()).count();
    eprintln!(
        "container faults: seed {seed}, {seconds} s, faults {injected:?}, {} operations ({ok} ok, {} puts acknowledged), \
         acknowledged writes lost {}; history in {path}",
        history.len(),
        acked.len(),
        lost.len()
    );
    // Replication: every follower read is the leader cluster's state at the
    // revision it was read at; then every follower node reaches the leader
    // cluster's final revision with the same keys.
    let reads = follower_reads.lock().unwrap().clone();
    let mut at_leader: BTreeMap<(String, i64), Option<(String, i64)>> = BTreeMap::new();
    let mut stale = Vec::new();
    for (key, value, rev) in &reads {
        let want = match at_leader.get(&(key.clone(), *rev)) {
            Some(w) => w.clone(),
            None => {
                let (w, _) = eventually(Duration::from_secs(20), "a leader read at a past revision", || async {
                    get(&boxes[0].api, key, *rev).await
                })
                .await;
                at_leader.insert((key.clone(), *rev), w.clone());
                w
            }
        };
        if want != *value {
            stale.push(format!("{key}@{rev}: follower {value:?}, leader {want:?}"));
        }
    }
    let (_, final_rev) = get(&boxes[0].api, "k0", 0).await.unwrap();
    for f in &followers {
        wait_ready(&f.http, Duration::from_secs(90)).await;
        for k in 0..KEYS {
            let key = format!("k{k}");
            let leader = finals.get(&key).cloned().flatten();
            eventually(Duration::from_secs(60), "a follower reaches the leader cluster", || async {
                let (v, rev) = get(&f.api, &key, 0).await?;
                let v = v.map(|(v, _)| v);
                if rev >= final_rev && v == leader {
                    Ok(())
                } else {
                    Err(format!("{} {key}: {v:?} at {rev}, leader {leader:?} at {final_rev}", f.name))
                }
            })
            .await;
        }
    }
    eprintln!(
        "container faults: {} follower reads checked against the leader cluster's state at their revision, {} \
         differ; every follower node reached revision {final_rev}",
        reads.len(),
        stale.len()
    );
    assert!(lost.is_empty(), "seed {seed}: acknowledged writes lost: {lost:?}");
    assert!(stale.is_empty(), "seed {seed}: follower reads that no leader state explains: {stale:?}");
    assert!(!reads.is_empty(), "seed {seed}: the follower readers read something");
    assert!(acked.len() > 10, "seed {seed}: the clients made progress ({} puts acknowledged)", acked.len());
    drop(cleanup);
}
