//! etcd v3 compatibility, against real processes:
//! - stock `etcdctl` (Debian's etcd-client 3.4) works against Armada;
//! - Armada and a real etcd 3.4 (Debian's etcd-server) answer the same
//!   seeded sequence of KV operations identically (differential test).
//!
//! Both tools come from `ci/install-deps`; a missing one fails the test
//! with a message naming the package.
#![cfg(not(madsim))]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use armada_proto::etcd as pb;
use tonic::transport::Channel;

mod common;
use common::*;

fn require(tool: &str, package: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(found.unwrap_or(false), "{tool} not found: run ci/install-deps (Debian package {package})");
}

/// Runs etcdctl against `endpoint`; returns (success, stdout, stderr).
///
/// The endpoint is given as `host:port`, without `http://`: etcdctl 3.4's
/// `endpoint status` dials a URL endpoint with the whole URL as the HTTP/2
/// `:authority`, which the HTTP/2 server under tonic rejects
/// (`PROTOCOL_ERROR`); etcd's Go server tolerates it. Every other command
/// works with either form.
fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn etcd_kv(endpoint: &str) -> Result<pb::kv_client::KvClient<Channel>, String> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10));
    Ok(pb::kv_client::KvClient::new(ep.connect().await.map_err(|e| e.to_string())?))
}

/// Waits until the node reports ready, then connects: readiness promises
/// the etcd table exists, so the first request must not need a retry.
async fn wait_ready_node(node: &common::Node) -> pb::kv_client::KvClient<Channel> {
    wait_ready(&node.http, Duration::from_secs(30)).await;
    etcd_kv(&node.etcd).await.expect("connect to a ready node")
}

/// Waits until a real etcd answers a read.
async fn wait_etcd(endpoint: &str) -> pb::kv_client::KvClient<Channel> {
    eventually(Duration::from_secs(30), "etcd answers", || async {
        let mut c = etcd_kv(endpoint).await?;
        c.range(pb::RangeRequest { key: b"probe".to_vec(), ..Default::default() }).await.map_err(|e| e.to_string())?;
        Ok(c)
    })
    .await
}

fn single_node(name: &str) -> Cluster {
    Cluster::new(1, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_against_armada_unchanged() {
    require("etcdctl", "etcd-client");
    let cluster = single_node("etcdctl");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    let mut transcript = String::new();
    let mut run = |args: &[&str], stdin: Option<&str>| {
        let (ok, out, err) = etcdctl(&ep, args, stdin);
        transcript.push_str(&format!("$ etcdctl {}\n{out}", args.join(" ")));
        if !ok {
            transcript.push_str(&format!("(exit 1) {}\n", err.lines().last().unwrap_or_default()));
        }
        (ok, out, err)
    };
    for (k, v) in [("foo", "bar"), ("foo1", "b1"), ("foo2", "b2"), ("zoo", "z")] {
        assert_eq!(run(&["put", k, v], None), (true, "OK\n".into(), String::new()));
    }
    assert_eq!(run(&["get", "foo"], None).1, "foo\nbar\n");
    assert_eq!(run(&["get", "foo", "--prefix"], None).1, "foo\nbar\nfoo1\nb1\nfoo2\nb2\n");
    assert_eq!(run(&["get", "foo", "--prefix", "--keys-only"], None).1, "foo\n\nfoo1\n\nfoo2\n\n");
    let (_, json, _) = run(&["get", "foo", "--prefix", "--limit", "2", "-w", "json"], None);
    assert!(json.contains("\"more\":true") && json.contains("\"count\":3"), "{json}");
    assert!(json.contains("\"revision\":5"), "four puts after the initial revision 1: {json}");
    assert_eq!(
        run(&["get", "", "--prefix", "--sort-by=MODIFY", "--order=DESCEND"], None).1,
        "zoo\nz\nfoo2\nb2\nfoo1\nb1\nfoo\nbar\n"
    );
    assert_eq!(
        run(&["get", "", "--prefix", "--sort-by=VALUE", "--order=ASCEND", "--keys-only"], None).1.lines().next(),
        Some("foo1")
    );
    assert_eq!(run(&["get", "foo", "--rev", "2"], None).1, "foo\nbar\n");
    assert_eq!(run(&["del", "foo", "--prev-kv"], None).1, "1\nfoo\nbar\n");
    assert_eq!(run(&["get", "foo"], None).1, "");
    let txn = "value(\"foo1\") = \"b1\"\n\nput foo1 ok\n\nput foo1 fail\n\n";
    assert_eq!(run(&["txn"], Some(txn)).1, "SUCCESS\n\nOK\n");
    assert_eq!(run(&["txn"], Some(txn)).1, "FAILURE\n\nOK\n", "the compare no longer holds");
    assert_eq!(run(&["get", "foo1", "--print-value-only"], None).1, "fail\n");
    assert_eq!(run(&["compaction", "3"], None).1, "compacted revision 3\n");
    let (ok, _, err) = run(&["get", "foo", "--rev", "2"], None);
    assert!(!ok && err.contains("etcdserver: mvcc: required revision has been compacted"), "{err}");
    let (ok, _, err) = run(&["get", "foo", "--rev", "99"], None);
    assert!(!ok && err.contains("etcdserver: mvcc: required revision is a future revision"), "{err}");
    let (ok, _, err) = run(&["put", "", "x"], None);
    assert!(!ok && err.contains("etcdserver: key is not provided"), "{err}");
    let (ok, status, err) = run(&["endpoint", "status"], None);
    assert!(ok, "endpoint status failed: {err}");
    // endpoint, member id (hex), version, db size, is leader, is learner, term, index, applied, errors
    let fields: Vec<&str> = status.trim().split(", ").collect();
    assert_eq!(fields[0], ep, "{status}");
    assert_eq!(fields[1], "1", "member id 1 in hex: {status}");
    assert_eq!(fields[2], "3.4.0", "{status}");
    assert_eq!(fields[4], "true", "a single node leads: {status}");
    let (ok, members, err) = run(&["member", "list"], None);
    assert!(ok, "member list failed: {err}");
    assert_eq!(members.trim(), format!("1, started, node-1, quic://{}, http://{ep}, false", cluster.nodes[0].raft));
    eprintln!("--- etcdctl transcript ---\n{transcript}");
}

/// A small seeded generator (splitmix64): the operation sequence is the same
/// on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn key(&mut self) -> Vec<u8> {
        const KEYS: [&str; 8] = ["a", "a1", "a2", "b", "b1", "c", "d", "e"];
        KEYS[self.below(KEYS.len() as u64) as usize].as_bytes().to_vec()
    }
    /// (key, range_end) in etcd's conventions: single key, prefix, from-key,
    /// everything, an explicit interval or an inverted (empty) one.
    fn interval(&mut self) -> (Vec<u8>, Vec<u8>) {
        let k = self.key();
        match self.below(6) {
            0 | 1 => (k, vec![]),
            2 => {
                let mut end = k.clone();
                *end.last_mut().unwrap() += 1;
                (k, end)
            }
            3 => (k, vec![0]),
            4 => (vec![0], vec![0]),
            _ => {
                let other = self.key();
                (k, other)
            }
        }
    }
    fn value(&mut self) -> Vec<u8> {
        format!("v{}", self.below(5)).into_bytes()
    }
    fn revision(&mut self, current: i64, allow_negative: bool) -> i64 {
        match self.below(4) {
            0 => 0,
            1 if allow_negative => -1,
            1 => 0,
            _ => 1 + self.below(current as u64 + 2) as i64,
        }
    }
    /// A top-level range; inside a txn, etcd 3.4 treats a negative revision
    /// as compacted once anything was compacted (a quirk Armada does not
    /// copy: it reads a negative revision as "latest" everywhere).
    fn range(&mut self, current: i64) -> pb::RangeRequest {
        self.range_with(current, true)
    }
    fn range_with(&mut self, current: i64, allow_negative: bool) -> pb::RangeRequest {
        let (key, range_end) = self.interval();
        let filter = |g: &mut Gen| if g.chance(15) { 1 + g.below(current as u64 + 1) as i64 } else { 0 };
        pb::RangeRequest {
            key,
            range_end,
            limit: if self.chance(30) { self.below(4) as i64 } else { 0 },
            revision: self.revision(current, allow_negative),
            sort_order: self.below(3) as i32,
            sort_target: self.below(5) as i32,
            serializable: false,
            keys_only: self.chance(20),
            count_only: self.chance(10),
            min_mod_revision: filter(self),
            max_mod_revision: filter(self),
            min_create_revision: filter(self),
            max_create_revision: filter(self),
        }
    }
    fn put(&mut self) -> pb::PutRequest {
        self.put_with(true)
    }
    /// `keeping`: may ask to keep the value or lease. Not inside a
    /// transaction: etcd 3.4 panics (the server stops) on one that deletes
    /// a key and then puts it with `ignore_value`; Armada refuses it with
    /// "key not found".
    fn put_with(&mut self, keeping: bool) -> pb::PutRequest {
        let mut p =
            pb::PutRequest { key: self.key(), value: self.value(), prev_kv: self.chance(50), ..Default::default() };
        if self.chance(20) {
            p.lease = self.lease_id();
        }
        if !keeping {
            return p;
        }
        if self.chance(5) {
            p.ignore_value = true;
            p.value = if self.chance(80) { vec![] } else { b"given".to_vec() };
        }
        if self.chance(5) {
            p.ignore_lease = true;
            p.lease = if self.chance(80) { 0 } else { self.lease_id() };
        }
        p
    }
    /// One of a few lease ids, granted or not.
    fn lease_id(&mut self) -> i64 {
        1 + self.below(5) as i64
    }
    fn delete(&mut self) -> pb::DeleteRangeRequest {
        let (key, range_end) = self.interval();
        pb::DeleteRangeRequest { key, range_end, prev_kv: self.chance(50) }
    }
    fn op(&mut self, current: i64) -> pb::RequestOp {
        use pb::request_op::Request;
        let request = match self.below(3) {
            0 => Request::RequestRange(self.range_with(current, false)),
            1 => Request::RequestPut(self.put_with(false)),
            _ => Request::RequestDeleteRange(self.delete()),
        };
        pb::RequestOp { request: Some(request) }
    }
    fn compare(&mut self, current: i64) -> pb::Compare {
        use pb::compare::TargetUnion;
        let (key, range_end) = if self.chance(20) { self.interval() } else { (self.key(), vec![]) };
        let target = self.below(5) as i32;
        let union = match target {
            0 => TargetUnion::Version(self.below(4) as i64),
            1 => TargetUnion::CreateRevision(self.below(current as u64 + 1) as i64),
            2 => TargetUnion::ModRevision(self.below(current as u64 + 1) as i64),
            3 => TargetUnion::Value(self.value()),
            _ => TargetUnion::Lease(self.below(6) as i64),
        };
        pb::Compare { result: self.below(4) as i32, target, key, target_union: Some(union), range_end }
    }
    fn txn(&mut self, current: i64) -> pb::TxnRequest {
        let n = |g: &mut Gen| g.below(4) as usize;
        let (c, s, f) = (n(self), n(self), n(self));
        pb::TxnRequest {
            compare: (0..c).map(|_| self.compare(current)).collect(),
            success: (0..s).map(|_| self.op(current)).collect(),
            failure: (0..f).map(|_| self.op(current)).collect(),
        }
    }
}

/// One operation's outcome, without the fields that name the server
/// (cluster id, member id, Raft term).
/// Every event of a watch of all keys from `start` (with prev_kv) up to the
/// table's current revision, (type, revision, text) each; or one line
/// (type -1) "compacted at R" when the start is compacted.
async fn watch_history(endpoint: &str, start: i64) -> Vec<(i32, i64, String)> {
    let create = pb::WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        start_revision: start,
        prev_kv: true,
        ..Default::default()
    };
    // The create request goes first: etcd sends the stream's headers only
    // with its first response.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) })
        .await
        .unwrap();
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap();
    let mut client = pb::watch_client::WatchClient::new(ep.connect().await.expect("connect"));
    let mut responses = client.watch(requests).await.expect("watch stream").into_inner();
    let mut out = Vec::new();
    let mut until = None;
    loop {
        let r = next(&mut responses).await;
        if r.compact_revision != 0 {
            return vec![(-1, r.compact_revision, format!("compacted at {}", r.compact_revision))];
        }
        if r.created {
            until = r.header.map(|h| h.revision);
        }
        for e in &r.events {
            let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            out.push((e.r#type, rev, format!("{} {:?} prev {:?}", e.r#type, e.kv, e.prev_kv)));
        }
        let last = r.events.last().and_then(|e| e.kv.as_ref()).map_or(0, |kv| kv.mod_revision);
        if until.is_some_and(|u| last >= u || u < start) {
            return out;
        }
    }
}

/// One keep-alive on its own stream, normalized.
async fn keep_alive_once(c: &mut pb::lease_client::LeaseClient<Channel>, id: i64) -> String {
    let stream = futures::stream::iter([pb::LeaseKeepAliveRequest { id }]);
    match c.lease_keep_alive(stream).await {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(Some(m)) => normalize::<pb::LeaseKeepAliveResponse>(Ok(tonic::Response::new(m))),
            Ok(None) => "stream ended".into(),
            Err(s) => normalize::<()>(Err(s)),
        },
        Err(s) => normalize::<()>(Err(s)),
    }
}

/// A time-to-live answer with the remaining seconds reduced to live (> 0)
/// or not (they depend on when each server was asked), keys in order.
fn time_to_live_text(r: Result<tonic::Response<pb::LeaseTimeToLiveResponse>, tonic::Status>) -> String {
    match r {
        Ok(resp) => {
            let mut m = resp.into_inner();
            m.ttl = m.ttl.signum();
            // etcd lists the keys in its map's order.
            m.keys.sort();
            normalize::<pb::LeaseTimeToLiveResponse>(Ok(tonic::Response::new(m)))
        }
        Err(s) => normalize::<()>(Err(s)),
    }
}

/// The lease list in id order (etcd lists in its map's order).
fn leases_text(r: Result<tonic::Response<pb::LeaseLeasesResponse>, tonic::Status>) -> String {
    match r {
        Ok(resp) => {
            let mut ids: Vec<i64> = resp.into_inner().leases.iter().map(|l| l.id).collect();
            ids.sort();
            format!("leases {ids:?}")
        }
        Err(s) => normalize::<()>(Err(s)),
    }
}

fn normalize<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(resp) => {
            let s = format!("{:?}", resp.into_inner());
            // Header fields that identify the server differ by design.
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("header: Some(ResponseHeader { ") {
                out.push_str(&rest[..i]);
                let after = &rest[i..];
                let end = after.find(" })").unwrap() + 3;
                let header = &after[..end];
                let rev = header.split("revision: ").nth(1).and_then(|x| x.split(',').next()).unwrap_or("?");
                out.push_str(&format!("header(revision {rev})"));
                rest = &after[end..];
            }
            out.push_str(rest);
            out
        }
        Err(s) => format!("error {:?}: {}", s.code(), s.message()),
    }
}

struct Etcd {
    child: Child,
    client: String,
    _dir: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_named("ref")
    }

    /// A fresh etcd with its own directory (tests run in parallel).
    fn start_named(name: &str) -> Etcd {
        require("etcd", "etcd-server");
        let dir = std::env::temp_dir().join(format!("armada-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let client = format!("127.0.0.1:{}", free_tcp_port());
        let peer = format!("127.0.0.1:{}", free_tcp_port());
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", "ref", "--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("ref=http://{peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        Etcd { child, client, _dir: dir }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Operations compared per run (override: ARMADA_DIFF_OPS), from a fixed
/// seed (override: ARMADA_DIFF_SEED).
const DIFF_OPS: usize = 1500;
const DIFF_SEED: u64 = 0x00a7_3ada;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armada_answers_like_etcd_3_4() {
    let etcd = Etcd::start();
    let cluster = single_node("etcd-diff");
    let mut theirs = wait_etcd(&etcd.client).await;
    let mut ours = wait_ready_node(&cluster.nodes[0]).await;
    let lease_client = |ep: String| async move {
        pb::lease_client::LeaseClient::new(
            Channel::from_shared(format!("http://{ep}")).unwrap().connect().await.unwrap(),
        )
    };
    let mut theirs_lease = lease_client(etcd.client.clone()).await;
    let mut ours_lease = lease_client(cluster.nodes[0].etcd.clone()).await;
    let (ops, seed) = (env_or("ARMADA_DIFF_OPS", DIFF_OPS), env_or("ARMADA_DIFF_SEED", DIFF_SEED));
    let mut g = Gen(seed);
    let mut current = 1i64;
    let mut mismatches = Vec::new();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..ops {
        let (kind, req, a, b) = match g.below(24) {
            0..=5 => {
                let r = g.range(current);
                ("range", format!("{r:?}"), normalize(theirs.range(r.clone()).await), normalize(ours.range(r).await))
            }
            6..=10 => {
                let r = g.put();
                ("put", format!("{r:?}"), normalize(theirs.put(r.clone()).await), normalize(ours.put(r).await))
            }
            11..=13 => {
                let r = g.delete();
                let (a, b) =
                    (normalize(theirs.delete_range(r.clone()).await), normalize(ours.delete_range(r.clone()).await));
                ("delete", format!("{r:?}"), a, b)
            }
            14..=18 => {
                let r = g.txn(current);
                ("txn", format!("{r:?}"), normalize(theirs.txn(r.clone()).await), normalize(ours.txn(r).await))
            }
            20 => {
                // Explicit ids (etcd picks its own otherwise); TTLs long
                // enough that nothing expires during the run, or too long.
                let ttl = if g.chance(10) { 9_000_000_001 } else { 600 };
                let r = pb::LeaseGrantRequest { ttl, id: g.lease_id() };
                let (a, b) = (normalize(theirs_lease.lease_grant(r).await), normalize(ours_lease.lease_grant(r).await));
                ("lease-grant", format!("{r:?}"), a, b)
            }
            21 => {
                let r = pb::LeaseRevokeRequest { id: g.lease_id() };
                let (a, b) =
                    (normalize(theirs_lease.lease_revoke(r).await), normalize(ours_lease.lease_revoke(r).await));
                ("lease-revoke", format!("{r:?}"), a, b)
            }
            22 => {
                let id = g.lease_id();
                let (a, b) = (keep_alive_once(&mut theirs_lease, id).await, keep_alive_once(&mut ours_lease, id).await);
                ("lease-keepalive", format!("{id}"), a, b)
            }
            23 => {
                let r = pb::LeaseTimeToLiveRequest { id: g.lease_id(), keys: g.chance(50) };
                let (a, b) = (
                    time_to_live_text(theirs_lease.lease_time_to_live(r).await),
                    time_to_live_text(ours_lease.lease_time_to_live(r).await),
                );
                let (la, lb) = (
                    leases_text(theirs_lease.lease_leases(pb::LeaseLeasesRequest {}).await),
                    leases_text(ours_lease.lease_leases(pb::LeaseLeasesRequest {}).await),
                );
                ("lease-timetolive+leases", format!("{r:?}"), format!("{a} {la}"), format!("{b} {lb}"))
            }
            _ => {
                // Mostly valid compactions, some at or below the last one.
                let r = pb::CompactionRequest { revision: 1 + g.below(current as u64 + 1) as i64, physical: false };
                let (a, b) = (normalize(theirs.compact(r).await), normalize(ours.compact(r).await));
                ("compact", format!("{r:?}"), a, b)
            }
        };
        *kinds.entry(kind).or_default() += 1;
        if a != b {
            mismatches.push(format!("op {i} ({kind}): {req}\n  etcd:   {a}\n  armada: {b}"));
        }
        // Track etcd's revision to aim reads and compares at real revisions.
        let probe = theirs.range(pb::RangeRequest { key: b"probe".to_vec(), ..Default::default() }).await.unwrap();
        current = probe.into_inner().header.unwrap().revision;
    }
    // Plus fixed edge cases.
    let edge_puts = [
        pb::PutRequest { key: vec![], value: b"x".to_vec(), ..Default::default() },
        pb::PutRequest { key: b"k".to_vec(), value: b"x".to_vec(), lease: 42, ..Default::default() },
    ];
    for r in edge_puts {
        let (a, b) = (normalize(theirs.put(r.clone()).await), normalize(ours.put(r).await));
        if a != b {
            mismatches.push(format!("edge put:\n  etcd:   {a}\n  armada: {b}"));
        }
    }
    let dup = pb::TxnRequest {
        success: vec![
            pb::RequestOp { request: Some(pb::request_op::Request::RequestPut(g.put())) },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    prev_kv: false,
                })),
            },
        ],
        ..Default::default()
    };
    let (a, b) = (normalize(theirs.txn(dup.clone()).await), normalize(ours.txn(dup).await));
    if a != b {
        mismatches.push(format!("duplicate-key txn:\n  etcd:   {a}\n  armada: {b}"));
    }
    // Watch streams over the whole run's history, event by event: from
    // revision 1 both must answer "compacted" at the same revision, and from
    // there the same events (with prev_kv) up to the last revision.
    let (mut theirs_watch, mut ours_watch) =
        (watch_history(&etcd.client, 1).await, watch_history(&cluster.nodes[0].etcd, 1).await);
    if theirs_watch != ours_watch {
        mismatches.push(format!("watch from 1:\n  etcd:   {theirs_watch:?}\n  armada: {ours_watch:?}"));
    }
    let compacted = theirs_watch.first().filter(|e| e.0 == -1).map(|e| e.1);
    let mut watch_events = 0;
    if let Some(from) = compacted {
        theirs_watch = watch_history(&etcd.client, from).await;
        ours_watch = watch_history(&cluster.nodes[0].etcd, from).await;
        // etcd's quirk: its compaction at R removes the tombstones of
        // revision R, so a watch from R misses R's deletions; Armada sends
        // them (its watch history is the changelog).
        ours_watch.retain(|e| !(e.0 == pb::event::EventType::Delete as i32 && e.1 == from));
        watch_events = theirs_watch.len();
        for (i, (a, b)) in theirs_watch.iter().map(|e| &e.2).zip(ours_watch.iter().map(|e| &e.2)).enumerate() {
            if a != b {
                mismatches.push(format!("watch event {i} from {from}:\n  etcd:   {a}\n  armada: {b}"));
                break;
            }
        }
        if theirs_watch.len() != ours_watch.len() {
            mismatches.push(format!(
                "watch from {from}: etcd sent {} events, armada {}",
                theirs_watch.len(),
                ours_watch.len()
            ));
        }
    }
    // The shortest TTL: both raise 1 s to 2 s.
    let short = pb::LeaseGrantRequest { ttl: 1, id: 99 };
    let (a, b) = (normalize(theirs_lease.lease_grant(short).await), normalize(ours_lease.lease_grant(short).await));
    if a != b {
        mismatches.push(format!("short lease:\n  etcd:   {a}\n  armada: {b}"));
    }
    eprintln!(
        "differential test: {ops} seeded operations (seed {seed}) {kinds:?} + 4 edge cases + {watch_events} watch \
         events compared; mismatches: {}",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first ones:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(10)].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_etcd_requests_get_clear_errors() {
    let cluster = single_node("etcd-bad");
    let ep = cluster.nodes[0].etcd.clone();
    let mut c = wait_ready_node(&cluster.nodes[0]).await;
    let e = c
        .txn(pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest::default())),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    assert!(e.message().contains("nested transaction"), "{e}");
    let e = c.range(pb::RangeRequest { key: b"k".to_vec(), sort_order: 9, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c.put(pb::PutRequest { key: vec![b'k'; 5000], ..Default::default() }).await.unwrap_err();
    assert!(e.message().contains("key is too large"), "{e}");
    // Bytes that are not a protobuf message at all.
    let bad = raw_grpc_call(&ep, "/etcdserverpb.KV/Put", &[0xff, 0xff, 0xff, 0xff, 0x0f]).await;
    assert!(bad.contains("grpc-status: 13") || bad.contains("grpc-status: 3"), "{bad}");
    // Still serving.
    let r = c.put(pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    assert!(r.into_inner().header.unwrap().revision >= 2);
    let (code, metrics) = http_get(&cluster.nodes[0].http, "/metrics").unwrap();
    assert_eq!(code, 200);
    let size_line = metrics.lines().find(|l| l.starts_with("armada_table_storage_bytes{table=\"default\"}"));
    let size: u64 = size_line.and_then(|l| l.split(' ').nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(size > 0, "the etcd table's storage size is reported: {metrics}");
}

/// Sends one gRPC request with an arbitrary body over plain HTTP/2 and
/// returns the response trailers as text.
async fn raw_grpc_call(endpoint: &str, path: &str, body: &[u8]) -> String {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let codec = RawCodec;
    let mut framed = Vec::new();
    framed.extend_from_slice(body);
    let r = grpc
        .unary(tonic::Request::new(framed), tonic::codegen::http::uri::PathAndQuery::from_static(leak(path)), codec)
        .await;
    match r {
        Ok(_) => "grpc-status: 0".into(),
        Err(s) => format!("grpc-status: {} {}", s.code() as i32, s.message()),
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// A codec that sends and receives raw bytes.
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_status_and_member_list_answer() {
    let cluster = single_node("etcd-status");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{ep}")).unwrap().connect().await.unwrap();
    let s = pb::maintenance_client::MaintenanceClient::new(ch.clone())
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.leader, 1);
    assert_eq!(s.version, "3.4.0");
    assert!(s.db_size > 0, "{s:?}");
    let m =
        pb::cluster_client::ClusterClient::new(ch).member_list(pb::MemberListRequest {}).await.unwrap().into_inner();
    assert_eq!(m.members.len(), 1);
    assert_eq!(m.members[0].client_ur_ls, vec![format!("http://{ep}")]);
}

/// etcdctl's maintenance commands: `endpoint hashkv` (equal hashes for an
/// equal state), `defrag`, and `snapshot save`, whose file is an Armada
/// backup of the etcd table that `armada backup verify` accepts and
/// `armada restore` turns into a working node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_maintenance_commands_work_against_armada() {
    require("etcdctl", "etcd-client");
    let cluster = single_node("etcdctl-maint");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        assert!(etcdctl(&ep, &["put", k, v], None).0);
    }
    let hash = |rev: &str| {
        let (ok, out, err) = etcdctl(&ep, &["endpoint", "hashkv", "--rev", rev, "-w", "json"], None);
        assert!(ok, "hashkv: {err}");
        let at = out.find("\"hash\":").unwrap_or_else(|| panic!("{out}"));
        out[at + 7..].split([',', '}']).next().unwrap().to_string()
    };
    let (h3, h4) = (hash("3"), hash("4"));
    assert_ne!(h3, h4, "different states hash differently");
    assert!(etcdctl(&ep, &["put", "d", "4"], None).0);
    assert_eq!(hash("4"), h4, "a past revision's hash does not change");
    let (ok, out, err) = etcdctl(&ep, &["defrag"], None);
    assert!(ok && out.contains("Finished defragmenting"), "{out} {err}");
    let dir = std::env::temp_dir().join(format!("armada-etcd-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snap.db");
    let (ok, out, err) = etcdctl(&ep, &["snapshot", "save", file.to_str().unwrap()], None);
    assert!(ok, "snapshot save: {out} {err}");
    let verify = Command::new(common::BIN).args(["backup", "verify", file.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && text.contains("at revision 5"), "{text}");
    let restored = dir.join("restored");
    let r = Command::new(common::BIN)
        .args(["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut node = common::Node::new(1, restored);
    let members = format!("1={}", node.raft);
    node.start(&members);
    wait_ready_node(&node).await;
    let (ok, out, _) = etcdctl(&node.etcd, &["get", "", "--prefix"], None);
    assert!(ok);
    assert_eq!(out, "a\n1\nb\n2\nc\n3\nd\n4\n");
    node.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens an etcd watch stream: a sender of requests and the responses.
async fn watch_stream(
    endpoint: &str,
) -> (tokio::sync::mpsc::Sender<pb::WatchRequest>, tonic::Streaming<pb::WatchResponse>) {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap();
    let mut client = pb::watch_client::WatchClient::new(ep.connect().await.expect("connect"));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let responses = client.watch(requests).await.expect("watch stream").into_inner();
    (tx, responses)
}

fn create(key: &str, range_end: &str, start: i64, prev_kv: bool) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: key.into(),
            range_end: range_end.into(),
            start_revision: start,
            prev_kv,
            ..Default::default()
        })),
    }
}

async fn next(responses: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a watch response within 10 s")
        .expect("the stream stays up")
        .expect("the stream does not end")
}

/// (type, key, value, mod revision, prev value) of each event.
fn events(r: &pb::WatchResponse) -> Vec<(i32, String, String, i64, Option<String>)> {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    r.events
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            (e.r#type, s(&kv.key), s(&kv.value), kv.mod_revision, e.prev_kv.as_ref().map(|p| s(&p.value)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_history_and_live_events() {
    let cluster = single_node("watch");
    let ep = cluster.nodes[0].etcd.clone();
    let mut kv = wait_ready_node(&cluster.nodes[0]).await;
    let put = |k: &str, v: &str| pb::PutRequest { key: k.into(), value: v.into(), ..Default::default() };
    // Revisions 2, 3, 4 (1 is the table's creation).
    for (k, v) in [("a", "1"), ("b", "2"), ("a", "3")] {
        kv.put(put(k, v)).await.unwrap();
    }
    let (tx, mut rx) = watch_stream(&ep).await;
    // From the past, with prev_kv, on the key "a".
    tx.send(create("a", "", 2, true)).await.unwrap();
    let r = next(&mut rx).await;
    assert!(r.created && r.watch_id == 0 && r.header.as_ref().unwrap().revision == 4, "{r:?}");
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(events(&next(&mut rx).await));
    }
    assert_eq!(got, vec![(0, "a".into(), "1".into(), 2, None), (0, "a".into(), "3".into(), 4, Some("1".into()))]);
    // From now, on every key from "" on; then a live put and a delete.
    tx.send(create("", "\0", 0, false)).await.unwrap();
    let r = next(&mut rx).await;
    assert!(r.created && r.watch_id == 1, "{r:?}");
    kv.put(put("c", "4")).await.unwrap();
    kv.delete_range(pb::DeleteRangeRequest { key: "a".into(), ..Default::default() }).await.unwrap();
    let mut by_watcher: std::collections::BTreeMap<i64, Vec<_>> = Default::default();
    while by_watcher.values().map(Vec::len).sum::<usize>() < 3 {
        let r = next(&mut rx).await;
        by_watcher.entry(r.watch_id).or_default().extend(events(&r));
    }
    assert_eq!(by_watcher[&0], vec![(1, "a".into(), String::new(), 6, Some("3".into()))]);
    assert_eq!(by_watcher[&1], vec![(0, "c".into(), "4".into(), 5, None), (1, "a".into(), String::new(), 6, None)]);
    // Cancel: answered, then nothing more for that watcher.
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(pb::WatchCancelRequest { watch_id: 1 })),
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert!(r.canceled && r.watch_id == 1, "{r:?}");
    // Progress: the stream-wide answer carries the revision.
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(pb::WatchProgressRequest {})),
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert!(r.watch_id == -1 && r.header.as_ref().unwrap().revision == 6 && r.events.is_empty(), "{r:?}");
    // Compacted: a watcher from below the compaction is cancelled with it.
    kv.compact(pb::CompactionRequest { revision: 5, ..Default::default() }).await.unwrap();
    tx.send(create("a", "", 3, false)).await.unwrap();
    let created = next(&mut rx).await;
    assert!(created.created && !created.canceled, "{created:?}");
    let r = next(&mut rx).await;
    assert!(r.canceled && r.compact_revision == 5 && r.watch_id == created.watch_id, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_works_against_armada() {
    require("etcdctl", "etcd-client");
    let cluster = single_node("etcdctl-watch");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    for (k, v) in [("foo", "bar"), ("foo1", "b1"), ("zoo", "z")] {
        assert!(etcdctl(&ep, &["put", k, v], None).0);
    }
    // etcdctl watch runs until killed: give it the history and stop it.
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["watch", "foo", "--prefix", "--rev", "1", "--prev-kv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut out = String::new();
        let mut buf = [0u8; 256];
        while !out.contains("b2") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        out
    });
    // A live event after the history.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(etcdctl(&ep, &["put", "foo1", "b2"], None).0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let stderr = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    let out = reader.join().unwrap();
    assert_eq!(
        out, "PUT\nfoo\nbar\nPUT\nfoo1\nb1\nPUT\nfoo1\nb1\nfoo1\nb2\n",
        "etcdctl watch printed (stderr: {stderr})"
    );
}

/// The first hexadecimal lease id in etcdctl's output ("lease 1a granted ...").
fn lease_id_in(out: &str) -> String {
    out.split_whitespace().nth(1).unwrap_or_default().to_string()
}

/// etcdctl's lease commands, `put --lease`, and an expiry: the leased key
/// is there until its TTL has passed since the last keep-alive, then gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_leases_work_against_armada() {
    require("etcdctl", "etcd-client");
    let cluster = single_node("etcdctl-lease");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    let (ok, out, err) = etcdctl(&ep, &["lease", "grant", "60"], None);
    assert!(ok && out.contains("granted with TTL(60s)"), "{out} {err}");
    let id = lease_id_in(&out);
    assert!(etcdctl(&ep, &["put", "--lease", &id, "leased", "v"], None).0);
    let (ok, out, err) = etcdctl(&ep, &["lease", "timetolive", &id, "--keys"], None);
    assert!(ok && out.contains("granted with TTL(60s)") && out.contains("attached keys([leased])"), "{out} {err}");
    let (ok, out, err) = etcdctl(&ep, &["lease", "keep-alive", "--once", &id], None);
    assert!(ok && out.contains(&format!("lease {id} keepalived with TTL(60)")), "{out} {err}");
    let (ok, out, _) = etcdctl(&ep, &["lease", "list"], None);
    assert!(ok && out.contains("found 1 leases") && out.contains(&id), "{out}");
    let (ok, out, _) = etcdctl(&ep, &["get", "leased", "-w", "json"], None);
    assert!(ok && out.contains(&format!("\"lease\":{}", i64::from_str_radix(&id, 16).unwrap())), "{out}");
    let (ok, out, err) = etcdctl(&ep, &["lease", "revoke", &id], None);
    assert!(ok && out.contains(&format!("lease {id} revoked")), "{out} {err}");
    let (_, out, _) = etcdctl(&ep, &["get", "leased"], None);
    assert_eq!(out, "", "the revoked lease's key is gone");
    let (ok, out, _) = etcdctl(&ep, &["lease", "timetolive", &id], None);
    assert!(ok && out.contains("already expired"), "{out}");
    let (ok, _, err) = etcdctl(&ep, &["put", "--lease", &id, "leased", "v"], None);
    assert!(!ok && err.contains("requested lease not found"), "{err}");
    let (ok, out, err) = etcdctl(&ep, &["lease", "keep-alive", "--once", &id], None);
    assert!(!ok || out.contains("expired or revoked"), "keep-alive of a revoked lease: {out} {err}");

    // Expiry: a 3-second lease (etcd's minimum TTL here is 2 s).
    let (ok, out, _) = etcdctl(&ep, &["lease", "grant", "3"], None);
    assert!(ok, "{out}");
    let id = lease_id_in(&out);
    let granted = std::time::Instant::now();
    assert!(etcdctl(&ep, &["put", "--lease", &id, "short", "v"], None).0);
    let mut gone_after = None;
    while granted.elapsed() < Duration::from_secs(20) {
        let (_, out, _) = etcdctl(&ep, &["get", "short", "--print-value-only"], None);
        if out.trim().is_empty() {
            gone_after = Some(granted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = gone_after.expect("the key of an expired lease is deleted");
    assert!(gone_after >= Duration::from_secs(3), "deleted after {gone_after:?}, before its TTL");
}

/// etcdctl's lock recipe (etcd's client-side `concurrency` package: a
/// session lease kept alive, one key per waiter under the lock's prefix, a
/// range sorted by creation revision, a watch on the predecessor's
/// deletion) excludes a second holder until the first releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_excludes_a_second_holder() {
    use std::io::BufRead;
    require("etcdctl", "etcd-client");
    let cluster = single_node("etcdctl-lock");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    let released = std::env::temp_dir().join(format!("armada-lock-released-{}", std::process::id()));
    let _ = std::fs::remove_file(&released);
    let locker = |script: String| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={ep}"))
            .args(["lock", "the-lock", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl lock")
    };
    let path = released.display().to_string();
    // The first holder keeps the lock until the file exists.
    let mut first = locker(format!("echo held; while [ ! -e {path} ]; do sleep 0.05; done; echo released"));
    let mut first_out = std::io::BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    tokio::task::block_in_place(|| first_out.read_line(&mut line)).unwrap();
    assert_eq!(line.trim(), "held", "the first locker runs its command");
    // The second runs its command only once it holds the lock, which must
    // be after the first released it (after the file exists).
    let second = locker(format!("if [ -e {path} ]; then echo after-release; else echo while-held; fi"));
    eventually(Duration::from_secs(20), "the second locker queues", || async {
        let (_, out, _) = etcdctl(&ep, &["get", "the-lock", "--prefix", "--keys-only"], None);
        let waiters = out.lines().filter(|l| !l.is_empty()).count();
        if waiters == 2 {
            Ok(())
        } else {
            Err(format!("{waiters} keys under the lock"))
        }
    })
    .await;
    // Give a broken lock time to let the second in while the first holds
    // it; a working one keeps it waiting however long this is.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&released, b"").unwrap();
    let out = tokio::task::block_in_place(|| second.wait_with_output()).unwrap();
    let _ = std::fs::remove_file(&released);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after-release");
    let status = tokio::task::block_in_place(|| first.wait()).unwrap();
    assert!(status.success());
    let (_, out, _) = etcdctl(&ep, &["get", "the-lock", "--prefix", "--keys-only"], None);
    assert_eq!(out.trim(), "", "both lockers removed their keys");
}

/// etcdctl's auth commands, run in the same order against a real etcd 3.4
/// and against Armada: every command's success, output and error line must
/// be the same (users, roles, prefix and single-key permissions, logins,
/// permission refusals, anonymous and wrong-password requests, a password
/// change, revoking a permission, disabling authentication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_auth_answers_like_etcd_3_4() {
    require("etcdctl", "etcd-client");
    let etcd = Etcd::start_named("auth");
    let cluster = single_node("etcd-auth");
    wait_etcd(&etcd.client).await;
    wait_ready_node(&cluster.nodes[0]).await;
    let script: &[(&[&str], Option<&str>)] = &[
        (&["user", "add", "root:rootpw"], None),
        (&["user", "grant-role", "root", "root"], None),
        (&["role", "add", "app"], None),
        (&["role", "add", "app"], None),
        (&["role", "grant-permission", "app", "readwrite", "app/", "--prefix=true"], None),
        (&["role", "grant-permission", "app", "read", "cfg"], None),
        (&["role", "grant-permission", "app", "write", "logs/a", "logs/m"], None),
        (&["role", "get", "app"], None),
        (&["user", "add", "alice:alicepw"], None),
        (&["user", "add", "alice:again"], None),
        (&["user", "grant-role", "alice", "app"], None),
        (&["user", "grant-role", "alice", "nosuchrole"], None),
        (&["user", "get", "alice"], None),
        (&["user", "list"], None),
        (&["role", "list"], None),
        (&["auth", "enable"], None),
        (&["--user", "alice:alicepw", "put", "app/x", "1"], None),
        (&["--user", "alice:alicepw", "put", "cfg", "1"], None),
        (&["--user", "root:rootpw", "put", "cfg", "c"], None),
        (&["--user", "alice:alicepw", "get", "cfg"], None),
        (&["--user", "alice:alicepw", "get", "app/", "--prefix"], None),
        (&["--user", "alice:alicepw", "get", "a", "--prefix"], None),
        (&["--user", "alice:alicepw", "put", "logs/b", "1"], None),
        (&["--user", "alice:alicepw", "get", "logs/b"], None),
        (&["--user", "alice:alicepw", "put", "logs/m", "1"], None),
        (&["--user", "alice:alicepw", "get", "app/", "--prefix", "--keys-only"], None),
        (&["--user", "alice:alicepw", "txn"], Some("value(\"cfg\") = \"c\"\n\nput app/y 2\n\nput cfg d\n\n")),
        (&["--user", "alice:alicepw", "txn"], Some("value(\"cfg\") = \"c\"\n\nput cfg d\n\nput app/y 2\n\n")),
        (&["get", "app/x"], None),
        (&["--user", "alice:wrong", "get", "app/x"], None),
        (&["--user", "bob:x", "get", "app/x"], None),
        (&["--user", "alice:alicepw", "user", "list"], None),
        (&["--user", "alice:alicepw", "user", "get", "alice"], None),
        (&["--user", "alice:alicepw", "role", "add", "x"], None),
        (&["--user", "alice:alicepw", "auth", "disable"], None),
        (&["--user", "alice:alicepw", "del", "app/x"], None),
        (&["--user", "root:rootpw", "role", "revoke-permission", "app", "cfg"], None),
        (&["--user", "root:rootpw", "role", "revoke-permission", "app", "cfg"], None),
        (&["--user", "alice:alicepw", "get", "cfg"], None),
        (&["--user", "root:rootpw", "user", "passwd", "alice", "--interactive=false"], Some("newpw\n")),
        (&["--user", "alice:alicepw", "get", "app/y"], None),
        (&["--user", "alice:newpw", "get", "app/y"], None),
        (&["--user", "root:rootpw", "user", "revoke-role", "alice", "app"], None),
        (&["--user", "alice:newpw", "get", "app/y"], None),
        (&["--user", "root:rootpw", "user", "delete", "root"], None),
        (&["--user", "root:rootpw", "role", "delete", "app"], None),
        (&["--user", "root:rootpw", "auth", "disable"], None),
        (&["get", "app/", "--prefix"], None),
        (&["user", "delete", "alice"], None),
        (&["user", "list"], None),
    ];
    let mut mismatches = Vec::new();
    let mut transcript = String::new();
    for (args, stdin) in script {
        let answer = |ep: &str| {
            let (ok, out, err) = etcdctl(ep, args, *stdin);
            // The error's last line carries the server's message; earlier
            // lines hold timestamps.
            let err = err.lines().last().unwrap_or_default().split("Error: ").last().unwrap_or_default().to_string();
            (ok, out, err)
        };
        let (theirs, ours) = (answer(&etcd.client), answer(&cluster.nodes[0].etcd));
        transcript.push_str(&format!("$ etcdctl {}\n{}{}\n", args.join(" "), ours.1, ours.2));
        if theirs != ours {
            mismatches.push(format!("etcdctl {}:\n  etcd:   {theirs:?}\n  armada: {ours:?}", args.join(" ")));
        }
    }
    println!("{transcript}");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}\n\ntranscript:\n{transcript}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // The script really exercised refusals (a test that cannot fail is no
    // test): the transcript holds each kind.
    for needle in ["permission denied", "user name is empty", "authentication failed", "invalid auth management"] {
        assert!(transcript.contains(needle), "no {needle:?} in:\n{transcript}");
    }
}

/// etcdctl's member commands: add a learner, start it, promote it once it
/// has caught up, list, remove, and etcd's refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_adds_promotes_lists_and_removes_members() {
    require("etcdctl", "etcd-client");
    let mut cluster = single_node("etcd-members");
    let ep = cluster.nodes[0].etcd.clone();
    wait_ready_node(&cluster.nodes[0]).await;
    let hex_id = |out: &str| -> String { out.split_whitespace().nth(1).expect("Member <id> ...").to_string() };
    // Before any change: the initial members.
    let list = eventually(Duration::from_secs(20), "member list", || async {
        let (ok, out, err) = etcdctl(&ep, &["member", "list", "-w", "json"], None);
        if ok && out.contains("clientURLs") {
            Ok(out)
        } else {
            Err(format!("{out}{err}"))
        }
    })
    .await;
    assert!(list.contains(&format!("http://{ep}")), "{list}");

    let root = cluster.nodes[0].dir.parent().unwrap().to_path_buf();
    let mut n2 = common::Node::new(2, root.join("n2"));
    let peer = format!("http://{}", n2.raft);
    let added = eventually(Duration::from_secs(20), "member add", || async {
        let (ok, out, err) = etcdctl(&ep, &["member", "add", "n2", "--peer-urls", &peer, "--learner"], None);
        if ok {
            Ok(out)
        } else {
            Err(err)
        }
    })
    .await;
    assert!(added.starts_with("Member ") && added.contains("added to cluster"), "{added}");
    let id = hex_id(&added);
    assert_eq!(u64::from_str_radix(&id, 16).unwrap(), 2, "{added}");
    let (ok, out, _) = etcdctl(&ep, &["member", "list"], None);
    assert!(ok && out.contains(&format!("{}, true", n2.raft)) || out.contains("true"), "the learner is listed: {out}");
    // The same peer address twice, an unknown member, promoting a voter.
    let (ok, _, err) = etcdctl(&ep, &["member", "add", "again", "--peer-urls", &peer], None);
    assert!(!ok && err.contains("Peer URLs already exists"), "{err}");
    let (ok, _, err) = etcdctl(&ep, &["member", "remove", "7"], None);
    assert!(!ok && err.contains("member not found"), "{err}");
    let (ok, _, err) = etcdctl(&ep, &["member", "promote", "1"], None);
    assert!(!ok && err.contains("can only promote a learner member"), "{err}");

    n2.extra = vec!["--initial-cluster-state".into(), "existing".into()];
    let own = format!("2={}", n2.raft);
    n2.start(&own);
    let promoted = eventually(Duration::from_secs(60), "member promote", || async {
        let (ok, out, err) = etcdctl(&ep, &["member", "promote", &id], None);
        if ok {
            Ok(out)
        } else {
            Err(err)
        }
    })
    .await;
    assert!(promoted.contains("promoted in cluster"), "{promoted}");
    // Both voters serve: a write at the first is read at the second.
    let (ok, _, err) = etcdctl(&ep, &["put", "m", "1"], None);
    assert!(ok, "{err}");
    let ep2 = n2.etcd.clone();
    let got = eventually(Duration::from_secs(30), "read at the new member", || async {
        let (ok, out, err) = etcdctl(&ep2, &["get", "m", "--print-value-only"], None);
        if ok && out == "1\n" {
            Ok(out)
        } else {
            Err(format!("{out}{err}"))
        }
    })
    .await;
    assert_eq!(got, "1\n");
    // Removing it, once the promotion has reached every group.
    let removed = eventually(Duration::from_secs(60), "member remove", || async {
        let (ok, out, err) = etcdctl(&ep, &["member", "remove", &id], None);
        if ok {
            Ok(out)
        } else {
            Err(err)
        }
    })
    .await;
    assert!(removed.contains("removed from cluster"), "{removed}");
    let (ok, out, _) = etcdctl(&ep, &["member", "list"], None);
    assert!(ok && out.lines().count() == 1, "{out}");
    cluster.nodes.push(n2);
}
