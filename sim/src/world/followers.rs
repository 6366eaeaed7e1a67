//! Follower clusters in the simulated world: the WAN between clusters (a
//! proxy per follower cluster that delays, partitions and resets), follower
//! clients, the replication records kept while the world runs, and the
//! replication checkers and liveness check.
//!
//! Checks (every seed):
//! - R1 a follower only ever applies revisions the leader cluster committed;
//! - R2 identical revisions: every revision a follower applied has the same
//!   mutations as at the leader (per-revision digests, a hash chain), and at
//!   equal revisions the same state hash, snapshot seams included;
//! - R3 follower reads: the value read at a follower at revision R is the
//!   leader's value at R (prefix consistency), revisions seen by one client
//!   never go back (monotonic reads) and never fall below that client's own
//!   acknowledged forwarded write (read your writes); an acknowledged
//!   forwarded write is the leader's revision with that value;
//! - R4 liveness: after faults heal, every node of every follower cluster
//!   reaches the leader's revision with an equal state hash.

use std::sync::atomic::AtomicU64;

use armada_core::mvcc::replication::{ChangesFrom, Mutation};

use super::*;

/// First simulated port of a follower cluster's WAN proxy: port
/// `PROXY_PORT_BASE + i` leads to leader node `i`'s replication address.
pub(super) const PROXY_PORT_BASE: u16 = 9000;
pub(super) const REPLICATION_PORT: u16 = 8444;

/// Registry id of node `i` of cluster `c` (0: the leader cluster).
pub(super) fn node_key(cluster: u64, i: u64) -> u64 {
    cluster * 100 + i
}

pub(super) fn cluster_of(key: u64) -> u64 {
    key / 100
}

pub(super) fn cluster_ip(cluster: u64, i: u64) -> String {
    if cluster == 0 {
        node_ip(i)
    } else {
        format!("10.{}.0.{i}", 10 + cluster)
    }
}

pub(super) fn proxy_ip(cluster: u64) -> String {
    format!("10.{}.9.1", 10 + cluster)
}

/// A group id made unique across clusters (table ids are per cluster).
pub(super) fn global_group(cluster: u64, group: GroupId) -> GroupId {
    GroupId(cluster << 32 | group.0)
}

/// What one cluster recorded about one revision of one table.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RevRecord {
    /// Digest of the revision's mutations (`None`: arrived by snapshot).
    digest: Option<u64>,
    /// Digest of the table's state right after the revision, when known.
    state: Option<u64>,
    /// Simulated time of the cluster's first application.
    first_ns: u64,
}

/// Replication facts recorded while the world runs.
#[derive(Default)]
pub(super) struct ReplLog {
    revs: BTreeMap<(u64, String, u64), RevRecord>,
    /// The leader cluster's mutations by (table, revision).
    leader_mutations: BTreeMap<(String, u64), Vec<Mutation>>,
    pub violations: Vec<String>,
    pub snapshots: u64,
}

impl ReplLog {
    fn record(&mut self, cluster: u64, table: &str, revision: u64, digest: Option<u64>, state: Option<u64>, now: u64) {
        let e = self.revs.entry((cluster, table.to_string(), revision)).or_insert(RevRecord {
            digest: None,
            state: None,
            first_ns: now,
        });
        for (mine, new, what) in [(&mut e.digest, digest, "mutations"), (&mut e.state, state, "state")] {
            match (*mine, new) {
                (Some(a), Some(b)) if a != b => self.violations.push(format!(
                    "R2 nodes of cluster {cluster} disagree on the {what} of revision {revision} of table {table}"
                )),
                (None, Some(b)) => *mine = Some(b),
                _ => {}
            }
        }
    }
}

/// The observer's replication bookkeeping for one node.
pub(super) struct ReplObserver {
    pub cluster: u64,
    pub engine: Arc<dyn Engine>,
    /// Only worlds with follower clusters keep replication records.
    enabled: bool,
    names: Mutex<BTreeMap<GroupId, String>>,
}

impl ReplObserver {
    pub fn new(cluster: u64, engine: Arc<dyn Engine>, enabled: bool) -> Self {
        Self { cluster, engine, enabled, names: Mutex::new(BTreeMap::new()) }
    }

    /// The node's engine.
    pub fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    /// The name of the table of `group` in this node's catalog.
    pub fn table_name(&self, group: GroupId) -> Option<String> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = names.get(&group) {
            return Some(n.clone());
        }
        let tables = armada_core::command::Catalog::new(&*self.engine, data_ns(GroupId::META)).list().ok()?;
        for t in tables {
            names.insert(t.id, t.name);
        }
        names.get(&group).cloned()
    }

    /// Records what an applied table command did to the table's revisions.
    pub fn applied(&self, shared: &Shared, group: GroupId, command: Option<&Command>, response: &CommandResponse) {
        if !self.enabled {
            return;
        }
        let Some(Command::Table(cmd)) = command else { return };
        let CommandResponse::Table(Ok(reply)) = response else { return };
        let Some(mut table) = self.table_name(group) else { return };
        let store = Mvcc::new(&*self.engine, data_ns(group));
        // R1-R3 key revisions by table name. The churned table restarts its
        // revisions with every incarnation, so its records are keyed by
        // incarnation: the leader cluster's table id (a follower table
        // records the one it mirrors before it applies anything).
        if table == CHURN_TABLE {
            let incarnation = if self.cluster == 0 { Some(group.0) } else { store.upstream_table().ok().flatten() };
            let Some(id) = incarnation else { return };
            table = format!("{CHURN_TABLE}@{id}");
        }
        let state = || store.state_digest().ok();
        let now = shared.now_ns();
        let mut log = shared.repl.lock().unwrap_or_else(|p| p.into_inner());
        match (cmd, reply) {
            (TableCommand::Replicate { batch, .. }, TableReply::Replicated(o)) if o.applied => {
                for c in batch {
                    log.record(self.cluster, &table, c.revision, Some(c.digest()), None, now);
                }
                if let Some((rev, h)) = state() {
                    log.record(self.cluster, &table, rev, None, Some(h), now);
                }
            }
            (TableCommand::SnapshotCommit { .. }, TableReply::SnapshotCommitted(Ok(_))) => {
                if let Some((rev, h)) = state() {
                    log.record(self.cluster, &table, rev, None, Some(h), now);
                    log.snapshots += 1;
                }
            }
            (c, r) if self.cluster == 0 && c.is_client_write() => {
                let rev = r.revision();
                if log.revs.contains_key(&(0, table.clone(), rev)) {
                    // Re-applied after a restart, or a write that changed
                    // nothing: check the state only.
                    if let Some((srev, h)) = state() {
                        if srev == rev {
                            log.record(0, &table, rev, None, Some(h), now);
                        }
                    }
                    return;
                }
                if let Ok(ChangesFrom::Changes(cs)) = store.changes_from(rev, 1, usize::MAX) {
                    if let Some(c) = cs.into_iter().next().filter(|c| c.revision == rev) {
                        let st = state().filter(|(srev, _)| *srev == rev).map(|(_, h)| h);
                        log.record(0, &table, rev, Some(c.digest()), st, now);
                        log.leader_mutations.insert((table, rev), c.mutations);
                    }
                }
            }
            _ => {}
        }
    }
}

/// One follower client operation.
#[derive(Debug, Clone)]
pub(super) struct FOp {
    pub client: u32,
    pub cluster: u64,
    pub table: String,
    pub key: String,
    /// `Some(value)`: a forwarded put; `None`: a read.
    pub put: Option<String>,
    pub serializable: bool,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    /// Header revision and, for reads, the key's (value, mod revision).
    pub result: Option<(u64, Option<(String, u64)>)>,
}

/// The WAN between one follower cluster and the leader cluster.
pub(super) struct Wan {
    /// Extra one-way delay in ms (range).
    pub latency_ms: Mutex<[u64; 2]>,
    pub partitioned: std::sync::atomic::AtomicBool,
    /// Bumped to drop every open connection.
    pub epoch: AtomicU64,
    /// Asymmetry, per direction ([`UP`]: follower to leader, [`DOWN`]):
    /// extra delay (ms range) and whether the direction stalls (messages
    /// wait, in order, until it clears, as TCP retransmits into a one-way
    /// black hole), while the other direction flows.
    pub extra_ms: [Mutex<Option<[u64; 2]>>; 2],
    pub stalled: [std::sync::atomic::AtomicBool; 2],
}

/// Directions of a WAN link.
pub(super) const UP: usize = 0;
pub(super) const DOWN: usize = 1;

impl Wan {
    pub fn new(latency_ms: [u64; 2]) -> Self {
        Self {
            latency_ms: Mutex::new(latency_ms),
            partitioned: std::sync::atomic::AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            extra_ms: [Mutex::new(None), Mutex::new(None)],
            stalled: [std::sync::atomic::AtomicBool::new(false), std::sync::atomic::AtomicBool::new(false)],
        }
    }

    fn delay(&self, dir: usize) -> Duration {
        let [lo, hi] = *self.latency_ms.lock().unwrap_or_else(|p| p.into_inner());
        let mut us = rand_range(lo * 1000, hi * 1000);
        if let Some([lo, hi]) = *self.extra_ms[dir].lock().unwrap_or_else(|p| p.into_inner()) {
            us += rand_range(lo * 1000, hi * 1000);
        }
        Duration::from_micros(us)
    }
}

/// Forwards messages from `rx` to `tx`, each delayed by the WAN, in order,
/// until either side closes or the WAN's epoch moves past `epoch`.
async fn pump(mut rx: madsim::net::Receiver, tx: madsim::net::Sender, wan: Arc<Wan>, epoch: u64, dir: usize) {
    let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, madsim::net::Payload)>();
    let wan2 = wan.clone();
    let sender = tokio::spawn(async move {
        while let Some((at, msg)) = qrx.recv().await {
            tokio::time::sleep_until(at).await;
            while wan2.stalled[dir].load(Ordering::SeqCst) && wan2.epoch.load(Ordering::SeqCst) == epoch {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if wan2.epoch.load(Ordering::SeqCst) != epoch || tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    loop {
        let msg = tokio::select! {
            biased;
            m = rx.recv() => m,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if wan.epoch.load(Ordering::SeqCst) != epoch { break }
                continue;
            }
        };
        match msg {
            Ok(m) if wan.epoch.load(Ordering::SeqCst) == epoch => {
                if qtx.send((tokio::time::Instant::now() + wan.delay(dir), m)).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    drop(qtx);
    let _ = sender.await;
}

/// The WAN proxy of follower cluster `cluster`: port `PROXY_PORT_BASE + i`
/// relays to leader node `i`.
pub(super) async fn proxy_main(leader_nodes: u64, wan: Arc<Wan>) {
    let mut tasks = Vec::new();
    for i in 1..=leader_nodes {
        let wan = wan.clone();
        tasks.push(tokio::spawn(async move {
            let me: SocketAddr = format!("0.0.0.0:{}", PROXY_PORT_BASE + i as u16).parse().expect("valid address");
            let Ok(listener) = madsim::net::Endpoint::bind(me).await else { return };
            let target: SocketAddr = format!("{}:{REPLICATION_PORT}", node_ip(i)).parse().expect("valid address");
            loop {
                let Ok((c_tx, c_rx, _)) = listener.accept1().await else { continue };
                if wan.partitioned.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees a broken connection
                }
                let wan = wan.clone();
                tokio::spawn(async move {
                    let Ok(out) = madsim::net::Endpoint::bind("0.0.0.0:0").await else { return };
                    let Ok((l_tx, l_rx)) = out.connect1(target).await else { return };
                    let epoch = wan.epoch.load(Ordering::SeqCst);
                    let up = tokio::spawn(pump(c_rx, l_tx, wan.clone(), epoch, UP));
                    pump(l_rx, c_tx, wan, epoch, DOWN).await;
                    up.abort();
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The leader cluster's replication endpoints as follower cluster
/// `cluster` reaches them: through its WAN proxy.
pub(super) fn upstream_endpoints(cluster: u64, leader_nodes: u64) -> Vec<String> {
    (1..=leader_nodes).map(|i| format!("http://{}:{}", proxy_ip(cluster), PROXY_PORT_BASE + i as u16)).collect()
}

/// A follower client: sticks to one node of its follower cluster.
pub(super) async fn follower_client(
    cid: u32,
    cluster: u64,
    home: u64,
    sc: Scenario,
    shared: Arc<Shared>,
    until_ns: u64,
) {
    let fl = sc.followers.clone().expect("follower scenario");
    let api = format!("{}:8443", cluster_ip(cluster, home));
    let members = BTreeMap::from([(home, ArmadaNode { raft_addr: String::new(), api_addr: api })]);
    let mut conns = Conns::new(members);
    let weights = [fl.put, fl.get, fl.serializable_get];
    let mut seq = 0u64;
    while shared.now_ns() < until_ns {
        let table = table_name(rand_range(0, sc.tables as u64 - 1) as u32);
        let key = follower_key(rand_range(0, sc.keys as u64 - 1) as u32);
        seq += 1;
        let (kind, put) = match weighted_choice(&weights) {
            0 => {
                let value = format!("f{cid}-{seq}");
                (OpKind::Put { key: key.clone(), value: value.clone() }, Some(value))
            }
            1 => (OpKind::Get { key: key.clone(), serializable: false }, None),
            _ => (OpKind::Get { key: key.clone(), serializable: true }, None),
        };
        let serializable = matches!(kind, OpKind::Get { serializable: true, .. });
        let invoke_ns = shared.now_ns();
        let outcome = perform(&mut conns, home, &table, &kind).await;
        let complete_ns = shared.now_ns();
        let result = match outcome {
            Outcome::Ok(OpResult::Put { revision }) => Some((revision, None)),
            Outcome::Ok(OpResult::Get { value, revision }) => Some((revision, value)),
            _ => None,
        };
        shared.trace(&[0xf0, cid as u64, invoke_ns, complete_ns, result.as_ref().map_or(0, |r| r.0 + 1)]);
        shared.follower_ops.lock().unwrap_or_else(|p| p.into_inner()).push(FOp {
            client: cid,
            cluster,
            table,
            key,
            put,
            serializable,
            invoke_ns,
            complete_ns,
            result,
        });
        tokio::time::sleep(Duration::from_millis(rand_range(0, 20))).await;
    }
}

/// Keys of follower clients: disjoint from the leader clients' keys, whose
/// histories the linearizability checker sees in full.
pub(super) fn follower_key(i: u32) -> String {
    format!("m{i:04}")
}

/// Injects WAN faults until `until_ns`, then heals.
pub(super) async fn wan_fault_loop(
    sc: Scenario,
    handle: Handle,
    wans: Vec<Arc<Wan>>,
    clusters: Vec<Vec<NodeId>>,
    shared: Arc<Shared>,
    until_ns: u64,
) {
    let fl = sc.followers.clone().expect("follower scenario");
    let weights = [fl.partition, fl.delay, fl.reset, fl.cluster_crash, fl.asymmetry];
    if weights.iter().sum::<u32>() == 0 {
        return;
    }
    while shared.now_ns() < until_ns {
        tokio::time::sleep(Duration::from_millis(rand_range(fl.interval_ms[0], fl.interval_ms[1]))).await;
        let f = rand_range(0, wans.len() as u64 - 1) as usize;
        let wan = &wans[f];
        let choice = weighted_choice(&weights);
        let lasting = Duration::from_millis(rand_range(fl.fault_ms[0], fl.fault_ms[1]));
        shared.trace(&[0xa17, choice as u64, f as u64]);
        match choice {
            0 => {
                wan.partitioned.store(true, Ordering::SeqCst);
                wan.epoch.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(lasting).await;
                wan.partitioned.store(false, Ordering::SeqCst);
            }
            1 => {
                let normal = *wan.latency_ms.lock().unwrap_or_else(|p| p.into_inner());
                *wan.latency_ms.lock().unwrap_or_else(|p| p.into_inner()) = [normal[0] * 5, normal[1] * 10 + 50];
                tokio::time::sleep(lasting).await;
                *wan.latency_ms.lock().unwrap_or_else(|p| p.into_inner()) = normal;
            }
            2 => {
                wan.epoch.fetch_add(1, Ordering::SeqCst);
            }
            4 => {
                // One direction only: it stalls (half the time) or is slowed
                // while the other flows, e.g. requests arrive and answers do not.
                let dir = if madsim::rand::random::<bool>() { UP } else { DOWN };
                if madsim::rand::random::<bool>() {
                    wan.stalled[dir].store(true, Ordering::SeqCst);
                    tokio::time::sleep(lasting).await;
                    wan.stalled[dir].store(false, Ordering::SeqCst);
                } else {
                    let normal = *wan.latency_ms.lock().unwrap_or_else(|p| p.into_inner());
                    *wan.extra_ms[dir].lock().unwrap_or_else(|p| p.into_inner()) =
                        Some([normal[1] * 2, normal[1] * 10 + 200]);
                    tokio::time::sleep(lasting).await;
                    *wan.extra_ms[dir].lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
            _ => {
                for id in &clusters[f] {
                    super::crash_node(&shared, &handle, *id, sc.faults.torn_crash);
                }
                tokio::time::sleep(lasting).await;
                for id in &clusters[f] {
                    super::restart(&handle, *id);
                }
            }
        }
    }
}

/// The table's revision and state digest on a node, if it has the table.
fn table_state(node: &Node, table: &str) -> Option<(u64, u64)> {
    let info = armada_core::command::Catalog::new(&**node.engine(), data_ns(GroupId::META)).get(table).ok()??;
    Mvcc::new(&**node.engine(), data_ns(info.id)).state_digest().ok()
}

/// The table's compaction revision on `node`.
fn table_compacted(node: &Node, table: &str) -> Option<u64> {
    let info = armada_core::command::Catalog::new(&**node.engine(), data_ns(GroupId::META)).get(table).ok()??;
    Mvcc::new(&**node.engine(), data_ns(info.id)).rev_state().ok().map(|s| s.compacted)
}

/// R4: every node of every follower cluster reaches the leader cluster's
/// revision of every table, with an equal state hash, and has compacted at
/// least as far as the leader cluster (it never answers a read the leader
/// cluster refuses as compacted; a follower that bootstrapped from a
/// snapshot has no history below it, so it may be further).
pub(super) async fn follower_liveness(sc: Scenario, shared: Arc<Shared>) {
    let fl = sc.followers.clone().expect("follower scenario");
    let deadline_ns = shared.now_ns() + fl.liveness_s * 1_000_000_000;
    let mut tables: Vec<String> = (0..sc.tables).map(table_name).collect();
    if sc.table_churn_ms > 0 {
        tables.push(CHURN_TABLE.to_string());
    }
    for table in tables {
        loop {
            let nodes = shared.nodes();
            let leader = nodes
                .iter()
                .filter(|(k, _)| cluster_of(*k) == 0)
                .filter_map(|(_, n)| table_state(n, &table))
                .max_by_key(|(rev, _)| *rev);
            let leader_compacted = nodes
                .iter()
                .filter(|(k, _)| cluster_of(*k) == 0)
                .filter_map(|(_, n)| table_compacted(n, &table))
                .max()
                .unwrap_or(0);
            let mut lagging = Vec::new();
            for c in 1..=fl.clusters as u64 {
                for i in 1..=fl.nodes as u64 {
                    let node = nodes.iter().find(|(k, _)| *k == node_key(c, i));
                    let got = node.and_then(|(_, n)| table_state(n, &table));
                    let compacted = node.and_then(|(_, n)| table_compacted(n, &table)).unwrap_or(0);
                    if got.is_none() || got != leader || compacted < leader_compacted {
                        let state = match node {
                            None => "not running".to_string(),
                            Some((_, n)) => format!(
                                "{got:?} compacted at {compacted} (the leader cluster at {leader_compacted}), tables {:?}",
                                armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META))
                                    .list()
                                    .map(|t| t.into_iter().map(|t| t.name).collect::<Vec<_>>())
                            ),
                        };
                        lagging.push(format!("cluster {c} node {i}: {state}"));
                    }
                }
            }
            if lagging.is_empty() {
                break;
            }
            if shared.now_ns() >= deadline_ns {
                shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                    "R4 liveness: followers did not reach the leader's state of table {table} (leader {leader:?}) \
                     within {}s after faults healed: {}",
                    fl.liveness_s,
                    lagging.join("; ")
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The leader's value of `key` at `revision`: `Ok(None)` if absent,
/// `Err` if the leader never reached `revision`.
fn leader_value_at(
    muts: &BTreeMap<(String, u64), Vec<Mutation>>,
    table: &str,
    key: &str,
    revision: u64,
    leader_max: u64,
) -> Result<Option<(String, u64)>, ()> {
    if revision > leader_max {
        return Err(());
    }
    let lo = (table.to_string(), 0);
    let hi = (table.to_string(), revision);
    for ((_, rev), ms) in muts.range(lo..=hi).rev() {
        if let Some(m) = ms.iter().find(|m| m.key == key.as_bytes()) {
            return Ok(m.value.as_ref().map(|v| (String::from_utf8_lossy(v).into_owned(), *rev)));
        }
    }
    Ok(None)
}

/// Runs R1–R3 and measures replication lag. Returns (violations, lag
/// samples in simulated ms).
pub(super) fn check(shared: &Shared) -> (Vec<String>, Vec<f64>) {
    let log = shared.repl.lock().unwrap_or_else(|p| p.into_inner());
    let ops = shared.follower_ops.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<String> = log.violations.iter().take(5).cloned().collect();
    let mut lag = Vec::new();
    // Lag counts revisions committed once a follower cluster was tailing the
    // table (its first application of the table), not its initial catch-up.
    let mut tailing_since: BTreeMap<(u64, &str), u64> = BTreeMap::new();
    for ((c, t, _), rec) in &log.revs {
        if *c != 0 {
            let e = tailing_since.entry((*c, t.as_str())).or_insert(u64::MAX);
            *e = (*e).min(rec.first_ns);
        }
    }
    let mut leader_max: BTreeMap<&str, u64> = BTreeMap::new();
    for (c, t, r) in log.revs.keys() {
        if *c == 0 {
            let m = leader_max.entry(t.as_str()).or_insert(0);
            *m = (*m).max(*r);
        }
    }
    for ((c, t, r), rec) in &log.revs {
        if *c == 0 {
            continue;
        }
        let Some(lead) = log.revs.get(&(0, t.clone(), *r)) else {
            out.push(format!(
                "R1 follower cluster {c} applied revision {r} of table {t}, never committed at the leader"
            ));
            continue;
        };
        if let (Some(a), Some(b)) = (rec.digest, lead.digest) {
            if a != b {
                out.push(format!("R2 revision {r} of table {t}: follower cluster {c} applied different mutations"));
            }
            if lead.first_ns >= tailing_since.get(&(*c, t.as_str())).copied().unwrap_or(u64::MAX) {
                lag.push((rec.first_ns.saturating_sub(lead.first_ns)) as f64 / 1e6);
            }
        }
        if let (Some(a), Some(b)) = (rec.state, lead.state) {
            if a != b {
                out.push(format!("R2 state of table {t} at revision {r} differs: follower cluster {c} vs leader"));
            }
        }
    }
    // R3 on follower clients' operations, per client in invocation order.
    let mut by_client: BTreeMap<u32, Vec<&FOp>> = BTreeMap::new();
    for op in ops.iter() {
        by_client.entry(op.client).or_default().push(op);
    }
    for (cid, list) in by_client {
        let mut last_read: BTreeMap<&str, u64> = BTreeMap::new();
        let mut own_write: BTreeMap<&str, u64> = BTreeMap::new();
        for op in list {
            let Some((rev, value)) = &op.result else { continue };
            let max = leader_max.get(op.table.as_str()).copied().unwrap_or(0);
            match &op.put {
                Some(v) => {
                    let at = leader_value_at(&log.leader_mutations, &op.table, &op.key, *rev, max);
                    if at != Ok(Some((v.clone(), *rev))) {
                        out.push(format!(
                            "R3 client {cid} (follower cluster {}) put {}={v} acknowledged at revision {rev} of {}, \
                             but the leader has {at:?} there",
                            op.cluster, op.key, op.table
                        ));
                    }
                    let w = own_write.entry(op.table.as_str()).or_insert(0);
                    *w = (*w).max(*rev);
                }
                None => {
                    let at = leader_value_at(&log.leader_mutations, &op.table, &op.key, *rev, max);
                    if at.as_ref() != Ok(value) {
                        out.push(format!(
                            "R3 client {cid} (follower cluster {}) read {}={value:?} at revision {rev} of {} \
                             (sim time {}..{} ns), but the leader had {at:?} at that revision",
                            op.cluster, op.key, op.table, op.invoke_ns, op.complete_ns
                        ));
                    }
                    // Read your writes and monotonic reads hold for reads
                    // through the follower cluster's Raft group; a
                    // serializable read of a node that just restarted may
                    // legitimately be older.
                    if let (Some(w), false) = (own_write.get(op.table.as_str()), op.serializable) {
                        if rev < w {
                            out.push(format!(
                                "R3 client {cid} read {} at revision {rev} (sim time {} ns) after its own write at \
                                 revision {w} (read your writes)",
                                op.table, op.invoke_ns
                            ));
                        }
                    }
                    if !op.serializable {
                        let seen = last_read.entry(op.table.as_str()).or_insert(0);
                        if rev < seen {
                            out.push(format!(
                                "R3 client {cid} saw table {} go back from revision {seen} to {rev} (monotonic reads)",
                                op.table
                            ));
                        }
                        *seen = (*seen).max(*rev);
                    }
                }
            }
            if out.len() > 20 {
                return (out, lag);
            }
        }
    }
    (out, lag)
}
