//! One simulated run: a leader cluster on madsim nodes running the real node
//! runtime, clients on their own nodes, faults drawn from the seed, then a
//! liveness phase with faults healed, then the checkers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use armada_core::canary::{self, Canary};
use armada_core::command::TableReply;
use armada_core::engine::DurableImage;
use armada_core::kv::{KeyValue, RangeRequest, RangeResponse, RequestOp, SortOrder, SortTarget};
use armada_core::mvcc::{Fnv64, Mvcc};
use armada_core::raft::{data_ns, ApplyObserver, ArmadaNode};
use armada_core::{Command, CommandResponse, Engine, GroupId, TableCommand};
use armada_net::sim::{SimFaults, SimTransport};
use armada_proto::v1 as pb;
use armada_server::assemble::{assemble, Assembled, Parts, Role, Spec};
use armada_server::node::{Node, NodeConfig, NodeHooks, RaftTuning};
use madsim::net::NetSim;
use madsim::runtime::Handle;
use madsim::task::NodeId;
use tonic::transport::Channel;

use crate::checks::{self, ApplyLog, LeaderLog};

mod auth;
mod disk;
mod etcd;
mod followers;
mod leases;
mod membership;
pub mod probes;
mod watchers;
use crate::history::{CasBy, Op, OpKind, OpResult, Outcome};
use crate::linearizability;
use crate::scenario::{Scenario, CHURN_TABLE};
use disk::{DiskFault, NodeDisk, SimDisk};
use followers::{cluster_ip, cluster_of, global_group, node_key};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Safety,
    Liveness,
    Crash,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Safety => "safety",
            Verdict::Liveness => "liveness",
            Verdict::Crash => "crash",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub verdict: Verdict,
    pub trace: u64,
    pub failures: Vec<String>,
    pub sim_secs: f64,
    pub real_secs: f64,
    pub ops: usize,
    pub ops_ok: usize,
    pub indefinite: usize,
    pub applied: u64,
    pub snapshots: u64,
    /// Wall-clock seconds spent in the checkers (part of `real_secs`).
    pub check_secs: f64,
    /// Replication lag (leader cluster's first apply to a follower
    /// cluster's first apply of a revision), simulated ms: p50, p99, samples.
    pub lag_ms: Option<(f64, f64, usize)>,
    /// Snapshots installed by follower clusters.
    pub follower_snapshots: u64,
    /// Raft snapshot installs interrupted by a crash and finished when the
    /// node restarted.
    pub installs_resumed: u64,
    /// Backups restored and checked against the source (B1).
    pub backups_checked: u64,
    /// Table commands M1 compared with the model, and reads M2 checked.
    pub model_checked: (u64, u64),
    /// Hits of every coverage probe, in `Probe::ALL` order.
    pub probes: Vec<(armada_core::probe::Probe, u64)>,
    /// Client operations sent through the etcd v3 API (the rest used
    /// armada.v1).
    pub etcd_ops: u64,
    /// Events the watchers received (W1 checks every one).
    pub watch_events: u64,
    /// Progress notifications the watchers received (W2).
    pub watch_progress: u64,
    /// Leases the lease clients used, of them revoked by expiry (L1 held
    /// them to never early), and held to never late (calm).
    pub leases: (usize, usize, usize),
    /// Watch latency at follower clusters (leader-cluster apply to event
    /// arrival): p50, p99 in ms, and the number of live events measured.
    pub follower_watch_ms: Option<(f64, f64, usize)>,
    /// Permission decisions A1 checked, auth revisions applied, logins,
    /// and answers that were no decision.
    pub auth_checked: (usize, u64, u64, u64),
    /// Membership changes the driver completed, and changes C1 saw refused
    /// for coming too early.
    pub members_checked: (u64, u64),
}

/// A client request's deadline; past it the outcome is indefinite.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the election-safety sampler looks at every group.
const LEADER_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Client id of the final reads.
const CHECKER_CLIENT: u32 = linearizability::FINAL_READER;

/// A backup restored into its own engine: (table, revision, engine, the
/// table's id there).
type Restored = (String, u64, Arc<dyn Engine>, GroupId);

struct Shared {
    t0: Instant,
    history: Mutex<Vec<Op>>,
    apply: Mutex<ApplyLog>,
    leaders: Mutex<LeaderLog>,
    registry: Mutex<BTreeMap<u64, Weak<Node>>>,
    trace: Mutex<Fnv64>,
    liveness: Mutex<Vec<String>>,
    /// R6 failures (replicas that differ).
    replicas: Mutex<Vec<String>>,
    /// Backups taken and restored: (table, revision, restored engine, the
    /// table's id in it).
    backups: Mutex<Vec<Restored>>,
    backups_checked: Mutex<u64>,
    repl: Mutex<followers::ReplLog>,
    follower_ops: Mutex<Vec<followers::FOp>>,
    /// Every node's disk, and nodes that stopped on a storage failure.
    disks: disk::Disks,
    /// D1 failures (a node that went on serving on a failed disk).
    stops: Mutex<Vec<String>>,
    /// M1: the leader cluster's table logs run through the reference model.
    models: Mutex<checks::ModelLog>,
    /// Client operations sent through the etcd v3 API.
    etcd_ops: Mutex<u64>,
    /// W1: what the watchers saw, and the etcd table's history.
    watch: Mutex<watchers::WatchLog>,
    /// L1: what the lease clients did, and the revocations applied.
    leases: Mutex<leases::LeaseLog>,
    /// A1: what the auth clients saw, and the auth changes applied.
    auth: Mutex<auth::AuthLog>,
    /// etcd authentication runs in this world: anonymous clients stay off
    /// the etcd API.
    etcd_closed: bool,
    /// C1: the membership records applied, and the driver's plan.
    members: Mutex<membership::MembersLog>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn trace(&self, parts: &[u64]) {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        for p in parts {
            t.write_u64(*p);
        }
    }
    fn trace_str(&self, s: &str) {
        self.trace.lock().unwrap_or_else(|p| p.into_inner()).write_bytes(s.as_bytes());
    }
    fn nodes(&self) -> Vec<(u64, Arc<Node>)> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(id, w)| w.upgrade().map(|n| (*id, n)))
            .collect()
    }
    fn record(&self, op: Op) {
        let outcome_tag = match &op.outcome {
            Outcome::Ok(r) => 1 + r.revision(),
            Outcome::Failed(_) => 0,
            Outcome::Indefinite(_) => u64::MAX,
        };
        self.trace(&[op.client as u64, op.invoke_ns, op.complete_ns, outcome_tag]);
        self.history.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }
}

struct Observer {
    node: u64,
    shared: Arc<Shared>,
    repl: followers::ReplObserver,
    /// Record the etcd table's history for W1 (worlds with watchers).
    watch: bool,
}

impl ApplyObserver for Observer {
    fn applied(
        &self,
        group: GroupId,
        index: u64,
        term: u64,
        digest: u64,
        revision: Option<u64>,
        command: Option<&Command>,
        response: &CommandResponse,
    ) {
        self.shared.trace(&[self.node, group.0, index, digest]);
        self.repl.applied(&self.shared, group, command, response);
        if let (true, 0, Some(Command::Table(cmd)), CommandResponse::Table(Ok(reply))) =
            (self.watch, self.repl.cluster, command, response)
        {
            if cmd.is_client_write() && self.repl.table_name(group).as_deref() == Some(ETCD_TABLE) {
                let mut log = self.shared.watch.lock().unwrap_or_else(|p| p.into_inner());
                log.applied(self.repl.engine(), group, reply.revision(), self.shared.now_ns());
            }
        }
        if let (0, Some(Command::Table(TableCommand::LeaseRevoke { id })), CommandResponse::Table(Ok(reply))) =
            (self.repl.cluster, command, response)
        {
            if self.repl.table_name(group).as_deref() == Some(ETCD_TABLE) {
                let now = self.shared.now_ns();
                self.shared.leases.lock().unwrap_or_else(|p| p.into_inner()).revoked(*id, now, reply.revision());
            }
        }
        if let (
            0,
            Some(Command::Meta(armada_core::command::MetaCommand::Auth { cmd, .. })),
            CommandResponse::Meta(Ok(armada_core::command::MetaReply::Auth(armada_core::auth::AuthReply::Changed {
                revision,
            }))),
        ) = (self.repl.cluster, command, response)
        {
            let now = self.shared.now_ns();
            self.shared.auth.lock().unwrap_or_else(|p| p.into_inner()).applied(*revision, now, cmd);
        }
        if let (
            0,
            Some(Command::Meta(armada_core::command::MetaCommand::Members(cmd))),
            CommandResponse::Meta(Ok(armada_core::command::MetaReply::Members(record))),
        ) = (self.repl.cluster, command, response)
        {
            self.shared.members.lock().unwrap_or_else(|p| p.into_inner()).applied(index, cmd, record);
        }
        let group = global_group(self.repl.cluster, group);
        if let (0, Some(rev)) = (self.repl.cluster, revision) {
            let mut models = self.shared.models.lock().unwrap_or_else(|p| p.into_inner());
            models.applied(self.node, group, index, rev, command, response);
        }
        let mut log = self.shared.apply.lock().unwrap_or_else(|p| p.into_inner());
        if log.record(self.node, group, index, term, digest, revision, self.repl.cluster != 0) {
            // First application of this index: note the values it wrote.
            for v in written_values(command, response) {
                log.committed_values.insert(v);
            }
        }
    }

    fn resumed_install(&self, group: GroupId) {
        self.shared.trace(&[self.node, group.0, u64::MAX - 1]);
        self.shared.apply.lock().unwrap_or_else(|p| p.into_inner()).installs_resumed += 1;
    }

    fn installed_snapshot(&self, group: GroupId, index: u64, revision: Option<u64>) {
        self.shared.trace(&[self.node, group.0, index, u64::MAX]);
        let group = global_group(self.repl.cluster, group);
        self.shared.apply.lock().unwrap_or_else(|p| p.into_inner()).record_snapshot(self.node, group, index, revision);
    }
}

/// The (unique) values a committed command wrote: a put's value, and the
/// puts of the branch a txn took.
fn written_values(command: Option<&Command>, response: &CommandResponse) -> Vec<String> {
    let utf8 = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let puts = |ops: &[RequestOp]| -> Vec<String> {
        ops.iter()
            .filter_map(|o| match o {
                RequestOp::Put(p) => Some(utf8(&p.value)),
                _ => None,
            })
            .collect()
    };
    match (command, response) {
        (Some(Command::Table(TableCommand::Put(p))), CommandResponse::Table(Ok(_))) => vec![utf8(&p.value)],
        (Some(Command::Table(TableCommand::Txn(t))), CommandResponse::Table(Ok(TableReply::Txn(r)))) => {
            if r.succeeded {
                puts(&t.success)
            } else {
                puts(&t.failure)
            }
        }
        _ => Vec::new(),
    }
}

/// A seeded random number in `[lo, hi]`.
fn rand_range(lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        return lo;
    }
    lo + madsim::rand::random::<u64>() % (hi - lo + 1)
}

/// An index drawn with probability proportional to its weight (seeded).
/// The weights must not all be zero.
fn weighted_choice(weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut roll = (madsim::rand::random::<u64>() % u64::from(total.max(1))) as u32;
    for (i, w) in weights.iter().enumerate() {
        if roll < *w {
            return i;
        }
        roll -= w;
    }
    weights.len().saturating_sub(1)
}

fn pick<T: Copy>(items: &[T]) -> T {
    items[(madsim::rand::random::<u64>() % items.len() as u64) as usize]
}

fn node_ip(i: u64) -> String {
    format!("10.0.0.{i}")
}

fn key_name(i: u32) -> String {
    format!("k{i:04}")
}

/// The table every node's etcd v3 API serves: the scenario's first table,
/// so that clients of both APIs meet on it (and the same checkers cover it).
const ETCD_TABLE: &str = "t0";
/// The etcd v3 API's port on every node.
const ETCD_PORT: u16 = 2379;

fn table_name(i: u32) -> String {
    format!("t{i}")
}

/// Mangles a crashed node's disk as the active canary dictates.
fn canary_on_restart(disk: &DurableImage) {
    if canary::active(Canary::LoseLastLogEntry) {
        disk.mutate(|m| {
            let mut last: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for k in m.keys() {
                if k.len() == 18 && k[0] == b'g' && k[9] == b'L' {
                    last.insert(k[..9].to_vec(), k.clone());
                }
            }
            for k in last.values() {
                m.remove(k);
            }
        });
    }
    if canary::active(Canary::SkipVoteFsync) {
        disk.mutate(|m| m.retain(|k, _| !(k.len() == 10 && k[0] == b'g' && k[9] == b'V')));
    }
}

/// S4d: the Raft log of every group on a restarting node's disk (see
/// `ApplyLog::check_stored_log`).
fn check_stored_logs(shared: &Shared, cluster: u64, id: u64, engine: &dyn Engine) {
    let mut apply = shared.apply.lock().unwrap_or_else(|p| p.into_inner());
    for group in apply.groups_with_prefix(cluster) {
        let local = GroupId(group.0 & 0xffff_ffff);
        match armada_core::raft::stored_log(engine, local) {
            Ok(log) => apply.check_stored_log(node_key(cluster, id), group, &log),
            Err(e) => apply
                .violations
                .push(format!("S4d node {} cannot read group {group}'s log: {e}", node_key(cluster, id))),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn node_main(
    id: u64,
    cluster: u64,
    leader_nodes: u64,
    cfg: NodeConfig,
    disk: Arc<NodeDisk>,
    starts: Arc<AtomicU32>,
    sc: Scenario,
    shared: Arc<Shared>,
) {
    if disk.held() {
        // A node whose disk was lost, down until the membership driver
        // brings it back as a new node.
        return;
    }
    let mut cfg = cfg;
    if disk.replaced() {
        // Started again on an empty disk: it joins the cluster as a node
        // that founds nothing (the operator removed it and adds it back).
        let me = cfg.me().cloned().expect("the node is a member");
        cfg.bootstrap = false;
        cfg.members = BTreeMap::from([(id, me)]);
    }
    if starts.fetch_add(1, Ordering::SeqCst) > 0 {
        canary_on_restart(&disk.image());
    }
    let engine: Arc<dyn Engine> = Arc::new(disk.open());
    if starts.load(Ordering::SeqCst) > 1 {
        check_stored_logs(&shared, cluster, id, &*engine);
    }
    let transport = Arc::new(
        SimTransport::new(SimFaults { duplicate_rate: sc.faults.duplicate_rate })
            .await
            .expect("binding a simulated endpoint"),
    );
    let key = node_key(cluster, id);
    let observer = Observer {
        node: key,
        shared: shared.clone(),
        repl: followers::ReplObserver::new(cluster, engine.clone(), sc.followers.is_some()),
        watch: sc.watchers > 0,
    };
    let me = cfg.me().cloned().expect("the node is a member");
    let ip = me.api_addr.split(':').next().expect("simulated addresses are host:port").to_string();
    // Leader cluster nodes serve follower clusters; follower nodes stream
    // through their cluster's WAN proxy.
    let role = if cluster == 0 {
        Role::Leader
    } else {
        Role::Follower { leader_endpoints: followers::upstream_endpoints(cluster, leader_nodes) }
    };
    let spec = Spec {
        node: cfg,
        role,
        etcd_table: ETCD_TABLE.to_string(),
        etcd_address: format!("{ip}:{ETCD_PORT}"),
        tokens: Default::default(),
        // Cheap hashing: the simulated world logs in often, and the cost
        // of a hash is real time, not simulated time.
        etcd_auth: armada_server::api::etcd::auth::EtcdAuthConfig {
            token_ttl: std::time::Duration::from_secs(300),
            hash_memory_kib: 64,
            hash_passes: 1,
        },
        limits: Default::default(),
    };
    let parts = Parts {
        engine,
        disk: Arc::new(SimDisk(disk.clone())),
        transport,
        hooks: NodeHooks { apply_observer: Some(Arc::new(observer)) },
    };
    let Assembled { node, raft_handler, api, etcd, replication, follower, ensure_table, .. } =
        match assemble(spec, parts).await {
            Ok(a) => a,
            Err(e) => {
                // Only a failed disk may stop a start (the reaper checks).
                shared.disks.stopped(madsim::plugin::node(), format!("start failed: {e}"));
                return;
            }
        };
    // Dropped (and aborted) with this task when the node is killed.
    let _follower = follower;
    let _ensure_table = ensure_table.map(AbortOnDrop);
    shared.registry.lock().unwrap_or_else(|p| p.into_inner()).insert(key, Arc::downgrade(&node));
    if let Some(repl) = replication {
        let addr: SocketAddr = format!("{ip}:{}", followers::REPLICATION_PORT).parse().expect("valid address");
        tokio::spawn(async move {
            if let Err(e) = repl.serve(addr).await {
                tracing::warn!("replication server stopped: {e}");
            }
        });
    }
    let raft_addr: SocketAddr = me.raft_addr.parse().expect("simulated addresses are well-formed");
    tokio::spawn(async move {
        if let Err(e) = armada_net::sim::serve(raft_addr, raft_handler).await {
            tracing::warn!("raft transport stopped: {e}");
        }
    });
    let etcd_addr: SocketAddr = format!("{ip}:{ETCD_PORT}").parse().expect("valid address");
    tokio::spawn(async move {
        if let Err(e) = etcd.serve(etcd_addr).await {
            tracing::warn!("etcd server stopped: {e}");
        }
    });
    let api_addr: SocketAddr = me.api_addr.parse().expect("simulated addresses are well-formed");
    let failed = node.clone();
    // Biased: an unbiased select picks its first branch from tokio's own
    // generator, seeded outside the simulation (disks-3 seed 1 ran two ways
    // in two processes; see `ci/check-modules`).
    tokio::select! {
        biased;
        r = api.serve(api_addr) => {
            if let Err(e) = r {
                tracing::warn!("api server stopped: {e:?}");
            }
        }
        why = failed.failed() => {
            // The process would exit here; the world's reaper kills it.
            shared.disks.stopped(madsim::plugin::node(), why);
        }
    }
}

/// Aborts a task when dropped (a killed node's tasks end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client's connections, one per node and API, made on first use.
struct Conns {
    members: BTreeMap<u64, ArmadaNode>,
    kv: BTreeMap<u64, pb::kv_client::KvClient<Channel>>,
    etcd: BTreeMap<u64, etcd::EtcdKv>,
}

/// A channel to `addr`, or `None` if it cannot be made in time.
async fn connect(addr: &str) -> Option<Channel> {
    let ep =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect_timeout(Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(2), ep.connect()).await.ok()?.ok()
}

impl Conns {
    fn new(members: BTreeMap<u64, ArmadaNode>) -> Self {
        Conns { members, kv: BTreeMap::new(), etcd: BTreeMap::new() }
    }
    async fn kv(&mut self, node: u64) -> Option<pb::kv_client::KvClient<Channel>> {
        if let Some(c) = self.kv.get(&node) {
            return Some(c.clone());
        }
        let c = pb::kv_client::KvClient::new(connect(&self.members.get(&node)?.api_addr).await?);
        self.kv.insert(node, c.clone());
        Some(c)
    }
    /// The node's etcd v3 KV service (same host as its armada.v1 API).
    async fn etcd(&mut self, node: u64) -> Option<etcd::EtcdKv> {
        if let Some(c) = self.etcd.get(&node) {
            return Some(c.clone());
        }
        let api = &self.members.get(&node)?.api_addr;
        let host = api.split(':').next()?;
        let c = etcd::EtcdKv::new(connect(&format!("{host}:{ETCD_PORT}")).await?);
        self.etcd.insert(node, c.clone());
        Some(c)
    }
    fn drop_conn(&mut self, node: u64) {
        self.kv.remove(&node);
        self.etcd.remove(&node);
    }
}

fn definite(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, InvalidArgument | NotFound | OutOfRange | AlreadyExists | FailedPrecondition)
}

fn utf8(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn rev(h: &Option<pb::ResponseHeader>) -> u64 {
    h.as_ref().map_or(0, |h| h.revision.max(0) as u64)
}

/// Sends one operation and classifies its outcome.
async fn perform(conns: &mut Conns, node: u64, table: &str, kind: &OpKind) -> Outcome {
    let Some(mut c) = conns.kv(node).await else {
        return Outcome::Failed("cannot connect".into());
    };
    let is_write = kind.is_write();
    let t = table.to_string();
    let fut = async {
        match kind.clone() {
            OpKind::Put { key, value } => c
                .put(pb::PutRequest {
                    table: t,
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    ..Default::default()
                })
                .await
                .map(|r| OpResult::Put { revision: rev(&r.into_inner().header) }),
            OpKind::PutPrev { key, value } => c
                .put(pb::PutRequest {
                    table: t,
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    prev_kv: true,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::PutPrev { revision: rev(&r.header), prev: r.prev_kv.map(core_kv) }
                }),
            OpKind::Query { req, serializable } => c
                .range(pb::RangeRequest {
                    table: t,
                    key: req.key,
                    range_end: req.range_end,
                    limit: req.limit as i64,
                    revision: req.revision as i64,
                    sort_order: match req.sort_order {
                        SortOrder::None => pb::range_request::SortOrder::None,
                        SortOrder::Ascend => pb::range_request::SortOrder::Ascend,
                        SortOrder::Descend => pb::range_request::SortOrder::Descend,
                    } as i32,
                    sort_target: match req.sort_target {
                        SortTarget::Key => pb::range_request::SortTarget::Key,
                        SortTarget::Version => pb::range_request::SortTarget::Version,
                        SortTarget::Create => pb::range_request::SortTarget::Create,
                        SortTarget::Mod => pb::range_request::SortTarget::Mod,
                        SortTarget::Value => pb::range_request::SortTarget::Value,
                    } as i32,
                    serializable,
                    keys_only: req.keys_only,
                    count_only: req.count_only,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Query(RangeResponse {
                        revision: rev(&r.header),
                        kvs: r.kvs.into_iter().map(core_kv).collect(),
                        more: r.more,
                        count: r.count.max(0) as u64,
                    })
                }),
            OpKind::Get { key, serializable } => c
                .range(pb::RangeRequest { table: t, key: key.into_bytes(), serializable, ..Default::default() })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let value = r.kvs.into_iter().next().map(|kv| (utf8(kv.value), kv.mod_revision.max(0) as u64));
                    OpResult::Get { value, revision: rev(&r.header) }
                }),
            OpKind::GetAt { key, revision } => c
                .range(pb::RangeRequest {
                    table: t,
                    key: key.into_bytes(),
                    revision: revision as i64,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let value = r.kvs.into_iter().next().map(|kv| (utf8(kv.value), kv.mod_revision.max(0) as u64));
                    OpResult::Get { value, revision: rev(&r.header) }
                }),
            OpKind::Delete { key } => c
                .delete_range(pb::DeleteRangeRequest { table: t, key: key.into_bytes(), ..Default::default() })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Delete { deleted: r.deleted.max(0) as u64, revision: rev(&r.header) }
                }),
            OpKind::DeleteRange { from, to } => c
                .delete_range(pb::DeleteRangeRequest {
                    table: t,
                    key: from.into_bytes(),
                    range_end: to.into_bytes(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    OpResult::Delete { deleted: r.deleted.max(0) as u64, revision: rev(&r.header) }
                }),
            OpKind::Cas { key, expect, new, by } => {
                use pb::compare::{CompareResult, CompareTarget, TargetUnion};
                let (target, union) = match by {
                    CasBy::Value => (CompareTarget::Value, TargetUnion::Value(expect.into_bytes())),
                    CasBy::ModRevision(r) => (CompareTarget::Mod, TargetUnion::ModRevision(r as i64)),
                    CasBy::VersionZero => (CompareTarget::Version, TargetUnion::Version(0)),
                    CasBy::CreateZero => (CompareTarget::Create, TargetUnion::CreateRevision(0)),
                };
                let cmp = pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: target as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(union),
                    range_end: vec![],
                };
                let put = pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: key.into_bytes(),
                        value: new.into_bytes(),
                        ..Default::default()
                    })),
                };
                c.txn(pb::TxnRequest { table: t, compare: vec![cmp], success: vec![put], failure: vec![] }).await.map(
                    |r| {
                        let r = r.into_inner();
                        OpResult::Cas { succeeded: r.succeeded, revision: rev(&r.header) }
                    },
                )
            }
            OpKind::Compact { revision } => c
                .compact(pb::CompactionRequest { table: t, revision: revision as i64 })
                .await
                .map(|r| OpResult::Compact { revision: rev(&r.into_inner().header) }),
            OpKind::Range => c
                .range(pb::RangeRequest {
                    table: t,
                    key: b"k".to_vec(),
                    range_end: b"l".to_vec(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let kvs = r
                        .kvs
                        .into_iter()
                        .map(|kv| (utf8(kv.key), utf8(kv.value), kv.mod_revision.max(0) as u64))
                        .collect();
                    OpResult::Range { kvs, revision: rev(&r.header) }
                }),
        }
    };
    let result = armada_net::time::timeout(CLIENT_TIMEOUT, fut).await;
    classify(conns, node, is_write, result)
}

/// A key-value as the checkers compare it.
fn core_kv(kv: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        create_revision: kv.create_revision.max(0) as u64,
        mod_revision: kv.mod_revision.max(0) as u64,
        version: kv.version.max(0) as u64,
        value: kv.value,
        lease: kv.lease,
    }
}

/// A range read with random options over the key set (or a prefix of it),
/// at the latest revision or at one in `seen` (the client saw it).
fn random_query(keys: u32, seen: Option<&Vec<u64>>) -> RangeRequest {
    let (key, range_end) = match rand_range(0, 3) {
        // Every key of the table's key set, as a prefix.
        0 => (b"k".to_vec(), b"l".to_vec()),
        // One key.
        1 => (key_name(rand_range(0, u64::from(keys) - 1) as u32).into_bytes(), Vec::new()),
        // Every key from one on ("\0": no end).
        2 => (key_name(rand_range(0, u64::from(keys) - 1) as u32).into_bytes(), vec![0]),
        _ => {
            let a = rand_range(0, u64::from(keys)) as u32;
            let b = rand_range(0, u64::from(keys)) as u32;
            (key_name(a.min(b)).into_bytes(), key_name(a.max(b) + 1).into_bytes())
        }
    };
    let sort_order = [SortOrder::None, SortOrder::Ascend, SortOrder::Descend][rand_range(0, 2) as usize];
    let sort_target = [SortTarget::Key, SortTarget::Version, SortTarget::Create, SortTarget::Mod, SortTarget::Value]
        [rand_range(0, 4) as usize];
    RangeRequest {
        key,
        range_end,
        limit: if rand_range(0, 1) == 0 { 0 } else { rand_range(1, u64::from(keys)) },
        revision: match seen.filter(|v| !v.is_empty() && rand_range(0, 2) == 0) {
            Some(v) => pick(v),
            None => 0,
        },
        sort_order,
        sort_target,
        keys_only: rand_range(0, 4) == 0,
        count_only: rand_range(0, 9) == 0,
        ..Default::default()
    }
}

/// A client call's outcome: an error that may mean the connection broke
/// drops it; a write that got no definite answer may have taken effect.
fn classify<E>(
    conns: &mut Conns,
    node: u64,
    is_write: bool,
    result: Result<Result<OpResult, tonic::Status>, E>,
) -> Outcome {
    match result {
        Ok(Ok(r)) => Outcome::Ok(r),
        Ok(Err(s)) => {
            if !definite(s.code()) {
                conns.drop_conn(node);
            }
            if is_write && !definite(s.code()) {
                Outcome::Indefinite(format!("{:?}: {}", s.code(), s.message()))
            } else {
                Outcome::Failed(format!("{:?}: {}", s.code(), s.message()))
            }
        }
        Err(_) => {
            conns.drop_conn(node);
            if is_write {
                Outcome::Indefinite("client timeout".into())
            } else {
                Outcome::Failed("client timeout".into())
            }
        }
    }
}

/// One transaction putting every pair (no compare: it always succeeds).
async fn perform_many(conns: &mut Conns, node: u64, table: &str, puts: &[(String, String)]) -> Outcome {
    let Some(mut c) = conns.kv(node).await else {
        return Outcome::Failed("cannot connect".into());
    };
    let success = puts
        .iter()
        .map(|(k, v)| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: k.clone().into_bytes(),
                value: v.clone().into_bytes(),
                ..Default::default()
            })),
        })
        .collect();
    let req = pb::TxnRequest { table: table.to_string(), compare: vec![], success, failure: vec![] };
    let result = armada_net::time::timeout(CLIENT_TIMEOUT, c.txn(req)).await;
    let result = result.map(|r| r.map(|r| OpResult::Put { revision: rev(&r.into_inner().header) }));
    classify(conns, node, true, result)
}

/// Whether an operation on `table` goes through the etcd API (part of the
/// operations on the etcd table, drawn from the seed); counts those.
fn via_etcd(shared: &Shared, table: &str) -> bool {
    // With etcd authentication on, the etcd API refuses anonymous clients:
    // the workload then reaches the etcd table through armada.v1 only.
    if table != ETCD_TABLE || shared.etcd_closed || rand_range(1, 100) > etcd::ETCD_SHARE_PCT {
        return false;
    }
    *shared.etcd_ops.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    true
}

async fn client_main(cid: u32, sc: Scenario, members: BTreeMap<u64, ArmadaNode>, shared: Arc<Shared>, until_ns: u64) {
    let mut conns = Conns::new(members);
    let w = &sc.workload;
    let reader = cid < w.readers;
    let weights = w.weights_of(cid);
    let mut seq = 0u64;
    // Last value and revisions this client saw, to make CAS and reads at a
    // revision meaningful.
    let mut seen_value: BTreeMap<(String, String), (String, u64)> = BTreeMap::new();
    let mut seen_revs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while shared.now_ns() < until_ns {
        let table = table_name(rand_range(0, sc.tables as u64 - 1) as u32);
        let key = key_name(rand_range(0, sc.keys as u64 - 1) as u32);
        let node = rand_range(1, sc.all_nodes());
        let node = if reader { u64::from(cid) % sc.all_nodes() + 1 } else { node };
        seq += 1;
        let fresh = format!("c{cid}-{seq}");
        let kind = match weighted_choice(&weights) {
            0 => OpKind::Put { key: key.clone(), value: fresh },
            1 => OpKind::Get { key: key.clone(), serializable: false },
            2 => OpKind::Get { key: key.clone(), serializable: true },
            3 => OpKind::Delete { key: key.clone() },
            4 => {
                let expect =
                    seen_value.get(&(table.clone(), key.clone())).map_or_else(|| "none".into(), |s| s.0.clone());
                OpKind::Cas { key: key.clone(), expect, new: fresh, by: CasBy::Value }
            }
            9 => match seen_value.get(&(table.clone(), key.clone())).cloned() {
                Some((expect, r)) => OpKind::Cas { key: key.clone(), expect, new: fresh, by: CasBy::ModRevision(r) },
                None => OpKind::Cas { key: key.clone(), expect: "none".into(), new: fresh, by: CasBy::Value },
            },
            10 => {
                let by = if madsim::rand::random::<bool>() { CasBy::VersionZero } else { CasBy::CreateZero };
                OpKind::Cas { key: key.clone(), expect: String::new(), new: fresh, by }
            }
            11 => {
                let first = rand_range(0, sc.keys as u64 - 1) as u32;
                let n = w.delete_range_keys.max(1);
                OpKind::DeleteRange { from: key_name(first), to: key_name(first.saturating_add(n)) }
            }
            12 => OpKind::PutPrev { key: key.clone(), value: fresh },
            13 => {
                OpKind::Query { req: random_query(sc.keys, seen_revs.get(&table)), serializable: rand_range(0, 1) == 0 }
            }
            5 => OpKind::Range,
            6 => match seen_revs.get(&table).filter(|v| !v.is_empty()) {
                Some(v) => OpKind::GetAt { key: key.clone(), revision: pick(v) },
                None => OpKind::Get { key: key.clone(), serializable: false },
            },
            7 => match seen_revs.get(&table).filter(|v| !v.is_empty()) {
                Some(v) => OpKind::Compact { revision: pick(v) },
                None => OpKind::Get { key: key.clone(), serializable: false },
            },
            _ => {
                // put_many (8): consecutive keys from a random one, each its own unique
                // value; recorded as one put per key, all at the revision of
                // the transaction.
                let first = rand_range(0, sc.keys as u64 - 1) as u32;
                let n = w.put_many_keys.clamp(1, sc.keys);
                let puts: Vec<(String, String)> =
                    (0..n).map(|i| (key_name((first + i) % sc.keys), format!("{fresh}/{i}"))).collect();
                let invoke_ns = shared.now_ns();
                let outcome = if via_etcd(&shared, &table) {
                    etcd::perform_many(&mut conns, node, &puts).await
                } else {
                    perform_many(&mut conns, node, &table, &puts).await
                };
                let complete_ns = shared.now_ns();
                for (key, value) in puts {
                    if let Outcome::Ok(r) = &outcome {
                        seen_value.insert((table.clone(), key.clone()), (value.clone(), r.revision()));
                    }
                    let kind = OpKind::Put { key, value };
                    shared.record(Op {
                        client: cid,
                        table: table.clone(),
                        kind,
                        invoke_ns,
                        complete_ns,
                        outcome: outcome.clone(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(rand_range(0, 20))).await;
                continue;
            }
        };
        let invoke_ns = shared.now_ns();
        let outcome = if via_etcd(&shared, &table) {
            etcd::perform(&mut conns, node, &kind).await
        } else {
            perform(&mut conns, node, &table, &kind).await
        };
        let complete_ns = shared.now_ns();
        if let Outcome::Ok(r) = &outcome {
            let revs = seen_revs.entry(table.clone()).or_default();
            if revs.len() < 64 {
                revs.push(r.revision());
            } else {
                let slot = (madsim::rand::random::<u64>() % 64) as usize;
                revs[slot] = r.revision();
            }
            match (&kind, r) {
                (OpKind::Get { key, .. }, OpResult::Get { value: Some((v, m)), .. }) => {
                    seen_value.insert((table.clone(), key.clone()), (v.clone(), *m));
                }
                (OpKind::Put { key, value }, OpResult::Put { revision })
                | (OpKind::PutPrev { key, value }, OpResult::PutPrev { revision, .. }) => {
                    seen_value.insert((table.clone(), key.clone()), (value.clone(), *revision));
                }
                _ => {}
            }
        }
        shared.record(Op { client: cid, table, kind, invoke_ns, complete_ns, outcome });
        tokio::time::sleep(Duration::from_millis(rand_range(0, 20))).await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Down {
    Crashed,
    Paused,
    /// Its disk fails (`faults.disk_error`); the node stops itself and the
    /// reaper kills it.
    DiskFailed,
}

/// Crashes node `id`: `torn_pct` percent of crashes are torn (the disk
/// keeps a seeded number of the batches written since its last sync).
fn crash_node(shared: &Shared, handle: &Handle, id: NodeId, torn_pct: u32) {
    probes::crashing(id);
    handle.kill(id);
    let disk = shared.disks.get(id);
    if let Some(d) = &disk {
        d.set_killed();
    }
    if torn_pct > 0 && rand_range(1, 100) <= u64::from(torn_pct) {
        if let Some(d) = disk {
            let image = d.image();
            let unsynced = image.unsynced_batches();
            let keep = rand_range(0, unsynced as u64) as usize;
            image.crash_keeping(keep);
            shared.trace(&[0x7042, unsynced as u64, keep as u64]);
            if keep > 0 {
                armada_core::probe!(TornCrashKeptWrites);
            }
        }
    }
}

/// How long after a disk fault ends a node whose engine failed has to have
/// been killed (D1). The node stops on the failing call itself; this covers
/// its report reaching the reaper.
const FAIL_STOP_GRACE: Duration = Duration::from_millis(200);

/// Kills every node that stopped itself on a storage failure, as its
/// process exiting would; the disk fault's window restarts it (a node that
/// stops with no disk fault is a finding).
async fn reaper(shared: Arc<Shared>, handle: Handle, torn_pct: u32) {
    loop {
        shared.disks.wait_stopped().await;
        for (id, why) in shared.disks.take_stopped() {
            if shared.disks.get(id).is_some_and(|d| d.broken()) {
                armada_core::probe!(StorageFailureStopped);
            } else {
                shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                    "node {id:?} stopped at {:.3}s with no disk fault: {why}",
                    shared.now_ns() as f64 / 1e9
                ));
            }
            crash_node(&shared, &handle, id, torn_pct);
        }
    }
}

/// The end of a disk fault on node index `victim`: the disk works again;
/// a node whose engine failed must have stopped (D1) and is restarted.
async fn end_disk_fault(shared: &Shared, handle: &Handle, id: NodeId, disk: &NodeDisk) {
    disk.set_fault(None);
    if !disk.broken() {
        return;
    }
    tokio::time::sleep(FAIL_STOP_GRACE).await;
    if disk.broken() && !disk.killed() {
        shared.stops.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
            "D1 fail-stop: node {id:?}'s storage failed, and {FAIL_STOP_GRACE:?} after the disk fault ended \
             (at {:.3}s) the node was still serving",
            shared.now_ns() as f64 / 1e9
        ));
    }
    restart(handle, id);
}

/// Injects faults until `until_ns`, then heals everything.
/// The leader (node key, term) of every group, among the live nodes of
/// `cluster` other than the one at index `except`; a group with two
/// claimants (an old leader that has not heard of the new term yet) counts
/// the one with the higher term.
fn leaders_without(shared: &Shared, cluster: u64, except: Option<usize>) -> BTreeMap<GroupId, (u64, u64)> {
    let skip = except.map(|i| node_key(cluster, i as u64 + 1));
    let mut out: BTreeMap<GroupId, (u64, u64)> = BTreeMap::new();
    for (key, node) in shared.nodes() {
        if cluster_of(key) != cluster || Some(key) == skip {
            continue;
        }
        for g in node.groups() {
            if node.is_leader(&g) {
                let term = node.header(&g).term;
                let e = out.entry(g.id).or_insert((key, term));
                if term > e.1 {
                    *e = (key, term);
                }
            }
        }
    }
    out
}

/// R5: after the isolation of node index `isolated` healed, every leader
/// recorded in `before` still leads its group in the same term. A node that
/// could not win an election while cut off must not depose a healthy leader
/// when it returns (Raft pre-vote).
fn check_heal(shared: &Shared, cluster: u64, isolated: usize, before: &BTreeMap<GroupId, (u64, u64)>) {
    let now = leaders_without(shared, cluster, None);
    for (group, (key, term)) in before {
        let still = now.get(group).is_some_and(|(k, t)| k == key && t == term);
        if !still {
            let after = now.get(group).map_or("no leader".to_string(), |(k, t)| format!("node {k} in term {t}"));
            shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                "R5 heal disruption: at {:.3}s, letting isolated node {} back in deposed node {key}, leader of group \
                 {group} in term {term}; now {after}",
                shared.now_ns() as f64 / 1e9,
                node_key(cluster, isolated as u64 + 1),
            ));
        }
    }
}

/// Crashes nodes of one cluster as they begin copying a snapshot into place
/// (`faults.crash_in_install` percent of the time), so that the restart
/// path that finishes an interrupted install is taken in most runs rather
/// than by luck. Shares the fault loop's record of nodes down.
async fn crash_installers(
    f: crate::scenario::Faults,
    handle: Handle,
    ids: Vec<NodeId>,
    down: Arc<Mutex<BTreeMap<usize, Down>>>,
    max_down: usize,
    shared: Arc<Shared>,
    until_ns: u64,
) {
    while shared.now_ns() < until_ns {
        tokio::time::sleep(Duration::from_millis(1)).await;
        for id in probes::take_began(&ids) {
            let Some(victim) = ids.iter().position(|x| *x == id) else { continue };
            if rand_range(1, 100) > u64::from(f.crash_in_install) {
                continue;
            }
            {
                // One more node than the fault loop takes down: installs
                // happen on replicas returning from a fault, usually while
                // another one is down.
                let mut d = down.lock().unwrap_or_else(|p| p.into_inner());
                if d.len() > max_down || d.contains_key(&victim) {
                    continue;
                }
                d.insert(victim, Down::Crashed);
            }
            crash_node(&shared, &handle, id, f.torn_crash);
            let (down, handle) = (down.clone(), handle.clone());
            let downtime = Duration::from_millis(rand_range(f.downtime_ms[0], f.downtime_ms[1]));
            tokio::spawn(async move {
                tokio::time::sleep(downtime).await;
                if down.lock().unwrap_or_else(|p| p.into_inner()).remove(&victim) == Some(Down::Crashed) {
                    restart(&handle, id);
                }
            });
        }
    }
}

async fn fault_loop(sc: Scenario, cluster: u64, handle: Handle, ids: Vec<NodeId>, shared: Arc<Shared>, until_ns: u64) {
    let f = &sc.faults;
    let weights =
        [f.crash, f.pause, f.partition, f.one_way, f.isolate, f.loss, f.swizzle, f.disk_error, f.slow_disk, f.clock];
    let total: u32 = weights.iter().sum();
    let net = NetSim::current();
    let n = ids.len();
    let down: Arc<Mutex<BTreeMap<usize, Down>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let max_down = ((n - 1) / 2).max(1);
    if f.crash_in_install > 0 {
        tokio::spawn(crash_installers(
            f.clone(),
            handle.clone(),
            ids.clone(),
            down.clone(),
            max_down,
            shared.clone(),
            until_ns,
        ));
    }
    let heal_net = |net: &NetSim| {
        for a in &ids {
            net.unclog_node(*a);
            for b in &ids {
                if a != b {
                    net.unclog_link(*a, *b);
                }
            }
        }
        net.update_config(|c| c.packet_loss_rate = 0.0);
    };
    let mut isolated: Option<usize> = None;
    while total > 0 && shared.now_ns() < until_ns {
        tokio::time::sleep(Duration::from_millis(rand_range(f.interval_ms[0], f.interval_ms[1]))).await;
        // R5 watches a heal only when the isolation was the one fault in
        // place: a crashed or paused node coming back may legitimately
        // change leaders.
        let watched = isolated
            .take()
            .filter(|_| f.heal_watch_ms > 0 && down.lock().unwrap_or_else(|p| p.into_inner()).is_empty())
            .map(|v| (v, leaders_without(&shared, cluster, Some(v))));
        heal_net(&net);
        if let Some((v, before)) = watched {
            tokio::time::sleep(Duration::from_millis(f.heal_watch_ms)).await;
            check_heal(&shared, cluster, v, &before);
        }
        let choice = weighted_choice(&weights);
        let victim = rand_range(0, n as u64 - 1) as usize;
        shared.trace(&[0xfa17, choice as u64, victim as u64]);
        match choice {
            0 | 1 => {
                let mut d = down.lock().unwrap_or_else(|p| p.into_inner());
                if d.len() >= max_down || d.contains_key(&victim) {
                    continue;
                }
                let kind = if choice == 0 { Down::Crashed } else { Down::Paused };
                d.insert(victim, kind);
                drop(d);
                if kind == Down::Crashed {
                    crash_node(&shared, &handle, ids[victim], f.torn_crash);
                } else {
                    handle.pause(ids[victim]);
                }
                let (down, handle, id) = (down.clone(), handle.clone(), ids[victim]);
                let downtime = Duration::from_millis(rand_range(f.downtime_ms[0], f.downtime_ms[1]));
                tokio::spawn(async move {
                    tokio::time::sleep(downtime).await;
                    let k = down.lock().unwrap_or_else(|p| p.into_inner()).remove(&victim);
                    match k {
                        Some(Down::Crashed) => restart(&handle, id),
                        Some(Down::Paused) => handle.resume(id),
                        Some(Down::DiskFailed) | None => {}
                    }
                });
            }
            7 => {
                let Some(disk) = shared.disks.get(ids[victim]) else { continue };
                {
                    let mut d = down.lock().unwrap_or_else(|p| p.into_inner());
                    if d.len() >= max_down || d.contains_key(&victim) {
                        continue;
                    }
                    d.insert(victim, Down::DiskFailed);
                }
                let fault = DiskFault::ALL[rand_range(0, DiskFault::ALL.len() as u64 - 1) as usize];
                shared.trace(&[0xd15c, fault as u64]);
                disk.set_fault(Some(fault));
                let (down, handle, id, shared) = (down.clone(), handle.clone(), ids[victim], shared.clone());
                let lasting = Duration::from_millis(rand_range(f.downtime_ms[0], f.downtime_ms[1]));
                tokio::spawn(async move {
                    tokio::time::sleep(lasting).await;
                    let mine = down.lock().unwrap_or_else(|p| p.into_inner()).remove(&victim);
                    if mine == Some(Down::DiskFailed) {
                        end_disk_fault(&shared, &handle, id, &disk).await;
                    }
                });
            }
            8 => {
                let Some(disk) = shared.disks.get(ids[victim]) else { continue };
                disk.set_slow(Some(f.slow_disk_ms));
                let lasting = Duration::from_millis(rand_range(f.downtime_ms[0], f.downtime_ms[1]));
                tokio::spawn(async move {
                    tokio::time::sleep(lasting).await;
                    disk.set_slow(None);
                });
            }
            9 => {
                // A clock fault: the node's Raft timers run fast or slow,
                // after an optional jump forward.
                let rate = rand_range(f.clock_rate_ppm[0], f.clock_rate_ppm[1]);
                let jump = if madsim::rand::random::<bool>() {
                    Duration::from_millis(rand_range(f.clock_jump_ms[0], f.clock_jump_ms[1]))
                } else {
                    Duration::ZERO
                };
                shared.trace(&[0xc10c, rate, jump.as_millis() as u64]);
                armada_server::rt::clock::set(ids[victim], rate, jump);
                if rate > 1_000_000 {
                    armada_core::probe!(ClockFast);
                } else if rate < 1_000_000 {
                    armada_core::probe!(ClockSlow);
                }
                if !jump.is_zero() {
                    armada_core::probe!(ClockJumped);
                    let now = shared.now_ns();
                    shared.leases.lock().unwrap_or_else(|p| p.into_inner()).clock_jumps.push(now);
                }
                let id = ids[victim];
                let lasting = Duration::from_millis(rand_range(f.downtime_ms[0], f.downtime_ms[1]));
                tokio::spawn(async move {
                    tokio::time::sleep(lasting).await;
                    armada_server::rt::clock::set(id, 1_000_000, Duration::ZERO);
                });
            }
            2 => {
                let side: BTreeSet<usize> = (0..n).filter(|_| madsim::rand::random::<bool>()).collect();
                for a in 0..n {
                    for b in 0..n {
                        if side.contains(&a) != side.contains(&b) {
                            net.clog_link(ids[a], ids[b]);
                        }
                    }
                }
            }
            3 => {
                let other = rand_range(0, n as u64 - 1) as usize;
                if other != victim {
                    net.clog_link(ids[victim], ids[other]);
                }
            }
            4 => {
                net.clog_node(ids[victim]);
                isolated = Some(victim);
            }
            5 => {
                let rate = f.loss_rate;
                net.update_config(|c| c.packet_loss_rate = rate);
            }
            _ => {
                // Swizzle-clog (after FoundationDB): clog a random subset one
                // node at a time, then unclog in reverse order, so the
                // cluster passes through many partial connectivity states.
                let subset: Vec<NodeId> = ids.iter().copied().filter(|_| madsim::rand::random::<bool>()).collect();
                // Runs inline, so no later heal can race with it.
                let step = Duration::from_millis(rand_range(10, 200));
                for id in &subset {
                    net.clog_node(*id);
                    tokio::time::sleep(step).await;
                }
                for id in subset.iter().rev() {
                    net.unclog_node(*id);
                    tokio::time::sleep(step).await;
                }
            }
        }
    }
    heal_net(&net);
    for id in &ids {
        if let Some(d) = shared.disks.get(*id) {
            d.set_slow(None);
        }
        if f.clock > 0 {
            armada_server::rt::clock::set(*id, 1_000_000, Duration::ZERO);
        }
    }
    let pending: Vec<(usize, Down)> =
        std::mem::take(&mut *down.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
    for (i, k) in pending {
        match k {
            Down::Crashed => restart(&handle, ids[i]),
            Down::Paused => handle.resume(ids[i]),
            Down::DiskFailed => {
                if let Some(d) = shared.disks.get(ids[i]) {
                    end_disk_fault(&shared, &handle, ids[i], &d).await;
                }
            }
        }
    }
}

/// Restarts a crashed node. Killing first resets its sockets: another fault
/// loop (a follower cluster crash) may have restarted it already, and
/// madsim's restart of a running node keeps the old incarnation's sockets.
fn restart(handle: &Handle, id: NodeId) {
    handle.kill(id);
    handle.restart(id);
}

/// Samples which node leads each group, for election safety.
async fn leader_sampler(shared: Arc<Shared>, until_ns: u64) {
    while shared.now_ns() < until_ns {
        for (id, node) in shared.nodes() {
            for g in node.groups() {
                if node.is_leader(&g) {
                    let term = node.header(&g).term;
                    let group = global_group(cluster_of(id), g.id);
                    shared.leaders.lock().unwrap_or_else(|p| p.into_inner()).record(group, term, id);
                }
            }
        }
        tokio::time::sleep(LEADER_SAMPLE_INTERVAL).await;
    }
}

/// Raft state of every group on every live node, for liveness reports.
fn diagnose(shared: &Shared) -> String {
    let mut out = String::new();
    for (id, node) in shared.nodes() {
        for g in node.groups() {
            let m = g.raft.metrics();
            let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
            out.push_str(&format!(
                "\n    node {id} group {} state {:?} term {} leader {:?} last_log {:?} committed {:?} applied {:?} purged {:?} running {:?}",
                g.id,
                m.state,
                m.current_term,
                m.current_leader,
                m.last_log_index,
                m.local_committed.as_ref().map(|l| l.index),
                m.last_applied.as_ref().map(|l| l.index),
                m.purged.as_ref().map(|l| l.index),
                m.running_state,
            ));
        }
    }
    out
}

/// After faults heal: every table commits a write, every node applies it,
/// and the final state of every key is read linearizably.
async fn liveness_and_final_reads(sc: Scenario, members: BTreeMap<u64, ArmadaNode>, shared: Arc<Shared>) {
    let mut conns = Conns::new(members);
    let fail = |m: String| shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).push(m);
    for t in 0..sc.tables {
        let table = table_name(t);
        // Each table has the whole liveness time: a table that missed it
        // must not make the next one look stuck too.
        let deadline_ns = shared.now_ns() + sc.liveness_s * 1_000_000_000;
        // A committed write in every table.
        let mut committed = None;
        let mut node = 1;
        while committed.is_none() && shared.now_ns() < deadline_ns {
            let kind = OpKind::Put { key: "sentinel".into(), value: format!("s{t}") };
            if let Outcome::Ok(OpResult::Put { revision }) = perform(&mut conns, node, &table, &kind).await {
                committed = Some(revision);
            } else {
                node = node % sc.all_nodes() + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let Some(revision) = committed else {
            fail(format!(
                "liveness: table {table} committed no write within {}s after faults healed{}",
                sc.liveness_s,
                diagnose(&shared)
            ));
            continue;
        };
        // Every node applies it.
        loop {
            let behind: Vec<u64> = membership::final_members(&shared, &sc)
                .into_iter()
                .filter(|id| {
                    let nodes = shared.nodes();
                    let Some((_, n)) = nodes.iter().find(|(i, _)| i == id) else { return true };
                    let Ok(Some(info)) =
                        armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META)).get(&table)
                    else {
                        return true;
                    };
                    Mvcc::new(&**n.engine(), data_ns(info.id)).rev_state().map_or(true, |s| s.current < revision)
                })
                .collect();
            if behind.is_empty() {
                break;
            }
            if shared.now_ns() >= deadline_ns {
                fail(format!("liveness: nodes {behind:?} did not apply revision {revision} of table {table}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(m) = replicas_agree(&shared, &table, sc.all_nodes()) {
            shared.replicas.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        }
        if let Err(m) = backups_match(&shared, &table, sc.all_nodes()) {
            shared.replicas.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        }
        if sc.auto_compaction_ms > 0 && sc.duration_s * 1000 > 2 * sc.auto_compaction_ms {
            // Automatic compaction ran: some replica compacted the table.
            let compacted = shared
                .nodes()
                .iter()
                .filter(|(id, _)| *id <= sc.nodes as u64)
                .filter_map(|(_, n)| {
                    let info = armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META))
                        .get(&table)
                        .ok()??;
                    Mvcc::new(&**n.engine(), data_ns(info.id)).rev_state().ok().map(|s| s.compacted)
                })
                .max()
                .unwrap_or(0);
            if compacted == 0 {
                fail(format!(
                    "liveness: auto-compaction (keep {} ms) never compacted table {table} in {} s",
                    sc.auto_compaction_ms, sc.duration_s
                ));
            }
        }
        // Final linearizable reads of every key.
        for k in 0..sc.keys {
            let kind = OpKind::Get { key: key_name(k), serializable: false };
            loop {
                let invoke_ns = shared.now_ns();
                let outcome = perform(&mut conns, node, &table, &kind).await;
                let complete_ns = shared.now_ns();
                let ok = matches!(outcome, Outcome::Ok(_));
                if ok {
                    shared.record(Op {
                        client: CHECKER_CLIENT,
                        table: table.clone(),
                        kind: kind.clone(),
                        invoke_ns,
                        complete_ns,
                        outcome,
                    });
                    break;
                }
                if shared.now_ns() >= deadline_ns {
                    fail(format!("liveness: final read of {} in {table} kept failing", key_name(k)));
                    break;
                }
                node = node % sc.all_nodes() + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Takes `sc.backups` online backups over the run, each of a random table
/// from a random node, and restores each into a fresh engine.
async fn backup_main(sc: Scenario, members: BTreeMap<u64, ArmadaNode>, shared: Arc<Shared>, until_ns: u64) {
    let start = shared.now_ns();
    for b in 0..sc.backups as u64 {
        let at = start + (until_ns.saturating_sub(start)) * (b + 1) / (sc.backups as u64 + 1);
        let now = shared.now_ns();
        if at > now {
            tokio::time::sleep(Duration::from_nanos(at - now)).await;
        }
        let table = table_name(rand_range(0, sc.tables as u64 - 1) as u32);
        let node = rand_range(1, sc.nodes as u64);
        let Some(addr) = members.get(&node).map(|m| m.api_addr.clone()) else { continue };
        // Every other backup reads the node's image directly, slowly (a
        // consumer that takes a millisecond per block), so writes go on
        // while it is read; the others go through the Maintenance API.
        let restored = if b % 2 == 1 {
            let target = shared.nodes().into_iter().find(|(k, _)| *k == node).map(|(_, n)| n);
            match target {
                Some(n) => tokio::time::timeout(Duration::from_secs(10), read_slowly_and_restore(n, &table))
                    .await
                    .ok()
                    .flatten(),
                None => None,
            }
        } else {
            take_and_restore(&addr, &table).await
        };
        shared.trace_str(&format!("backup {table} from node {node}: {:?}", restored.as_ref().map(|r| r.0)));
        if let Some((revision, engine, id)) = restored {
            shared.backups.lock().unwrap_or_else(|p| p.into_inner()).push((table, revision, engine, id));
        }
    }
}

/// One backup over the Maintenance API, restored into a fresh engine as it
/// streams: (revision, engine, table id), or `None` if the stream failed
/// (faults may break it; that is not a finding).
async fn take_and_restore(addr: &str, table: &str) -> Option<(u64, Arc<dyn Engine>, GroupId)> {
    let ep =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect_timeout(Duration::from_secs(1));
    let ch = tokio::time::timeout(Duration::from_secs(2), ep.connect()).await.ok()?.ok()?;
    let mut client = pb::maintenance_client::MaintenanceClient::new(ch);
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), client.backup(pb::BackupRequest { table: table.to_string() }))
            .await
            .ok()?
            .ok()?
            .into_inner();
    let mut blocks = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.ok()?.ok()? {
        blocks.push(chunk.data);
    }
    restore(&blocks)
}

/// A backup read from `node`'s image a block per simulated millisecond,
/// restored into a fresh engine.
async fn read_slowly_and_restore(node: Arc<Node>, table: &str) -> Option<(u64, Arc<dyn Engine>, GroupId)> {
    let mut writer = node.backup(table).await.ok()?;
    let mut blocks = Vec::new();
    while let Some(block) = writer.next_block().ok()? {
        blocks.push(block);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    restore(&blocks)
}

/// Checks a backup's bytes and restores them into a fresh engine:
/// (revision, engine, table id), or `None` if they are not a whole backup.
fn restore(blocks: &[Vec<u8>]) -> Option<(u64, Arc<dyn Engine>, GroupId)> {
    let engine: Arc<dyn Engine> = Arc::new(armada_core::MemEngine::new());
    let mut reader = armada_core::backup::BackupReader::new();
    let mut restorer = armada_core::backup::Restorer::new(&*engine).ok()?;
    let (mut revision, mut id) = (None, None);
    for block in blocks {
        for ev in reader.feed(block).ok()? {
            if let armada_core::backup::BackupEvent::Header(h) = &ev {
                revision = Some(h.revision);
            }
            id = restorer.apply(ev).ok()?.or(id);
        }
    }
    reader.finish().ok()?;
    drop(restorer);
    Some((revision?, engine, id?))
}

/// B1: a restored backup of `table` at revision R answers a read of every
/// key exactly as the leader cluster answers a read at R (checked on a
/// replica whose history still reaches R).
fn backups_match(shared: &Shared, table: &str, nodes: u64) -> Result<(), String> {
    let backups: Vec<Restored> =
        shared.backups.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|b| b.0 == table).cloned().collect();
    let all =
        |revision| armada_core::kv::RangeRequest { key: vec![0], range_end: vec![0], revision, ..Default::default() };
    for (_, revision, engine, id) in backups {
        let restored = Mvcc::new(&*engine, data_ns(id)).range(&all(0)).map_err(|e| format!("B1 restored read: {e}"))?;
        let source = shared.nodes().into_iter().filter(|(k, _)| *k <= nodes).find_map(|(_, n)| {
            let info = armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META)).get(table).ok()??;
            Mvcc::new(&**n.engine(), data_ns(info.id)).range(&all(revision)).ok()
        });
        let Some(source) = source else { continue };
        if restored.kvs != source.kvs {
            let diff = restored
                .kvs
                .iter()
                .zip(source.kvs.iter())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("restored {a:?}, source {b:?}"))
                .unwrap_or_else(|| format!("{} keys restored, {} at the source", restored.kvs.len(), source.kvs.len()));
            return Err(format!(
                "B1 a backup of table {table} at revision {revision} is not the table at that revision: {diff}"
            ));
        }
        *shared.backups_checked.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }
    Ok(())
}

/// R6: the replicas of a table that reached the same revision hold the same
/// bytes: every key of the table's data (live keys, history, changelog),
/// whether a replica applied each entry or installed a snapshot.
fn replicas_agree(shared: &Shared, table: &str, nodes: u64) -> Result<(), String> {
    // Replicas are compared at the same applied log entry (a compaction
    // takes no revision, so equal revisions are not enough): grouped by
    // the bytes of their applied state. The world is single-threaded, so
    // nothing applies between reading the applied state and the data.
    let mut by_applied: BTreeMap<Vec<u8>, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for (id, n) in shared.nodes() {
        if id > nodes {
            continue;
        }
        let Ok(Some(info)) = armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META)).get(table)
        else {
            continue;
        };
        let Ok(Some(applied)) = n.engine().get(&armada_core::snapshot::applied_key(info.id)) else { continue };
        let ns = data_ns(info.id);
        let Some(hi) = armada_core::engine::prefix_end(&ns) else { continue };
        let mut h = armada_core::mvcc::Fnv64::new();
        let mut pairs = 0u64;
        let scanned = n.engine().scan(&ns, &hi, &mut |k, v| {
            h.write_bytes(k);
            h.write_bytes(v);
            pairs += 1;
            true
        });
        if scanned.is_err() {
            continue;
        }
        by_applied.entry(applied).or_default().push((id, pairs, h.finish()));
    }
    for replicas in by_applied.values() {
        let Some((first, pairs, digest)) = replicas.first() else { continue };
        for (id, p, d) in &replicas[1..] {
            if (p, d) != (pairs, digest) {
                let rev = |id: u64| {
                    shared.nodes().iter().find(|(i, _)| *i == id).and_then(|(_, n)| {
                        let info = armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META))
                            .get(table)
                            .ok()??;
                        Mvcc::new(&**n.engine(), data_ns(info.id)).rev_state().ok().map(|s| s.current)
                    })
                };
                return Err(format!(
                    "R6 replicas of table {table} at the same applied entry (revision {:?}) differ: node {first} \
                     holds {pairs} keys (digest {digest:016x}), node {id} holds {p} keys (digest {d:016x})",
                    rev(*first)
                ));
            }
        }
    }
    Ok(())
}

/// Creates the madsim nodes of one cluster (0: the leader cluster) and
/// returns their ids.
fn build_cluster(handle: &Handle, sc: &Scenario, cluster: u64, nodes: u64, shared: &Arc<Shared>) -> Vec<NodeId> {
    let members: BTreeMap<u64, ArmadaNode> = (1..=nodes)
        .map(|i| {
            let ip = cluster_ip(cluster, i);
            (i, ArmadaNode { raft_addr: format!("{ip}:5012"), api_addr: format!("{ip}:8443") })
        })
        .collect();
    let tuning = RaftTuning {
        snapshot_after_logs: sc.snapshot_after_logs,
        logs_kept_after_snapshot: sc.snapshot_after_logs / 2,
        purge_batch_entries: (sc.snapshot_after_logs / 4).max(1),
        snapshot_chunk_bytes: sc.snapshot_chunk_bytes,
        revision_part_bytes: if sc.revision_part_bytes == 0 {
            RaftTuning::default().revision_part_bytes
        } else {
            sc.revision_part_bytes
        },
        compaction_step_records: if sc.compaction_step_records == 0 {
            RaftTuning::default().compaction_step_records
        } else {
            sc.compaction_step_records
        },
        auto_compaction: if sc.auto_compaction_ms == 0 {
            armada_core::compaction::Retention::Off
        } else {
            armada_core::compaction::Retention::Period { ms: sc.auto_compaction_ms }
        },
        history_retention: sc
            .followers
            .as_ref()
            .map_or(RaftTuning::default().history_retention, |f| f.history_retention),
        ..RaftTuning::default()
    };
    let mut ids = Vec::new();
    // Spare nodes of the leader cluster start outside it (see
    // `membership`).
    let spare = if cluster == 0 { u64::from(sc.spare_nodes) } else { 0 };
    for i in 1..=nodes + spare {
        let ip = cluster_ip(cluster, i);
        let me = ArmadaNode { raft_addr: format!("{ip}:5012"), api_addr: format!("{ip}:8443") };
        let cfg = NodeConfig {
            id: i,
            members: if i > nodes { BTreeMap::from([(i, me)]) } else { members.clone() },
            raft: tuning.clone(),
            request_timeout: Duration::from_secs(2),
            bootstrap: i <= nodes,
            client_addrs: armada_server::node::config::ClientAddrs {
                api: format!("{ip}:8443"),
                etcd: format!("{ip}:{ETCD_PORT}"),
            },
        };
        let disk = NodeDisk::new(sc.fsync_ms(cluster));
        let registered = disk.clone();
        let starts = Arc::new(AtomicU32::new(0));
        let (sc2, shared2) = (sc.clone(), shared.clone());
        let leader_nodes = sc.nodes as u64;
        let node = handle
            .create_node()
            .name(if cluster == 0 { format!("node-{i}") } else { format!("f{cluster}-node-{i}") })
            .ip(cluster_ip(cluster, i).parse().expect("valid ip"))
            .init(move || {
                node_main(
                    i,
                    cluster,
                    leader_nodes,
                    cfg.clone(),
                    disk.clone(),
                    starts.clone(),
                    sc2.clone(),
                    shared2.clone(),
                )
            })
            .build();
        shared.disks.insert(node.id(), registered);
        ids.push(node.id());
    }
    ids
}

async fn world(sc: Scenario, shared: Arc<Shared>) {
    let handle = Handle::current();
    let members: BTreeMap<u64, ArmadaNode> = (1..=sc.all_nodes())
        .map(|i| {
            (i, ArmadaNode { raft_addr: format!("{}:5012", node_ip(i)), api_addr: format!("{}:8443", node_ip(i)) })
        })
        .collect();
    let ids = build_cluster(&handle, &sc, 0, sc.nodes as u64, &shared);
    // Setup: create the tables (retrying until the cluster has a leader).
    let setup = handle.create_node().name("setup").ip("10.1.0.1".parse().expect("valid ip")).build();
    let (sc2, members2) = (sc.clone(), members.clone());
    let created = setup
        .spawn(async move {
            for t in 0..sc2.tables {
                let mut done = false;
                for attempt in 0..200u64 {
                    let node = attempt % sc2.nodes as u64 + 1;
                    let addr = &members2[&node].api_addr;
                    if let Ok(mut c) = pb::tables_client::TablesClient::connect(format!("http://{addr}")).await {
                        match c.create(pb::CreateTableRequest { name: table_name(t) }).await {
                            Ok(_) => done = true,
                            Err(s) if s.code() == tonic::Code::AlreadyExists => done = true,
                            Err(_) => {}
                        }
                    }
                    if done {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !done {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
    if !created {
        shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).push("liveness: tables could not be created".into());
        return;
    }
    let until_ns = shared.now_ns() + sc.duration_s * 1_000_000_000;
    shared.leases.lock().unwrap_or_else(|p| p.into_inner()).faults_end_ns = until_ns;
    let sampler = tokio::spawn(leader_sampler(shared.clone(), u64::MAX));
    let reaper = tokio::spawn(reaper(shared.clone(), handle.clone(), sc.faults.torn_crash));
    let faults = tokio::spawn(fault_loop(sc.clone(), 0, handle.clone(), ids.clone(), shared.clone(), until_ns));
    // Follower clusters, each behind its own WAN proxy; the last one may
    // start late.
    let mut side_tasks = Vec::new();
    if let Some(fl) = sc.followers.clone() {
        let mut wans = Vec::new();
        let clusters: Arc<Mutex<Vec<Vec<NodeId>>>> = Arc::new(Mutex::new(Vec::new()));
        for c in 1..=fl.clusters as u64 {
            let wan = Arc::new(followers::Wan::new(fl.wan_latency_ms));
            wans.push(wan.clone());
            let proxy = handle
                .create_node()
                .name(format!("wan-{c}"))
                .ip(followers::proxy_ip(c).parse().expect("valid ip"))
                .build();
            proxy.spawn(followers::proxy_main(sc.nodes as u64, wan));
        }
        for c in 1..=fl.clusters as u64 {
            let late = c == fl.clusters as u64 && fl.late_start_s > 0;
            let (handle2, sc2, shared2, clusters2) = (handle.clone(), sc.clone(), shared.clone(), clusters.clone());
            let start = async move {
                let ids = build_cluster(&handle2, &sc2, c, fl.nodes as u64, &shared2);
                clusters2.lock().unwrap_or_else(|p| p.into_inner()).push(ids.clone());
                // Faults inside the follower cluster, as inside the leader's.
                fault_loop(sc2, c, handle2, ids, shared2, until_ns).await;
            };
            if late {
                let late_s = fl.late_start_s;
                side_tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(late_s)).await;
                    start.await;
                }));
            } else {
                side_tasks.push(tokio::spawn(start));
            }
            for k in 0..fl.clients {
                let cid = 1000 * c as u32 + k;
                let home = u64::from(k % fl.nodes) + 1;
                let ip = format!("10.{}.{}.{}", 30 + c, k / 200, k % 200 + 1);
                let client =
                    handle.create_node().name(format!("f{c}-client-{k}")).ip(ip.parse().expect("valid ip")).build();
                side_tasks.push(client.spawn(followers::follower_client(
                    cid,
                    c,
                    home,
                    sc.clone(),
                    shared.clone(),
                    until_ns,
                )));
            }
        }
        // WAN faults need every cluster's node ids: start once all exist.
        let (sc2, handle2, shared2) = (sc.clone(), handle.clone(), shared.clone());
        side_tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(fl.late_start_s)).await;
            let ids = clusters.lock().unwrap_or_else(|p| p.into_inner()).clone();
            followers::wan_fault_loop(sc2, handle2, wans, ids, shared2, until_ns).await;
        }));
    }
    let mut clients = Vec::new();
    for c in 0..sc.clients {
        let ip = format!("10.2.{}.{}", c / 200, c % 200 + 1);
        let node = handle.create_node().name(format!("client-{c}")).ip(ip.parse().expect("valid ip")).build();
        clients.push(node.spawn(client_main(c, sc.clone(), members.clone(), shared.clone(), until_ns)));
    }
    if sc.table_churn_ms > 0 {
        let node = handle.create_node().name("churn").ip("10.1.0.4".parse().expect("valid ip")).build();
        clients.push(node.spawn(churn_main(sc.clone(), members.clone(), shared.clone(), until_ns)));
    }
    for w in 0..sc.watchers {
        let ip = format!("10.3.{}.{}", w / 200, w % 200 + 1);
        let node = handle.create_node().name(format!("watcher-{w}")).ip(ip.parse().expect("valid ip")).build();
        clients.push(node.spawn(watchers::watcher_main(w, sc.clone(), members.clone(), shared.clone(), until_ns)));
    }
    for c in 0..sc.leases {
        let ip = format!("10.4.{}.{}", c / 200, c % 200 + 1);
        let node = handle.create_node().name(format!("leases-{c}")).ip(ip.parse().expect("valid ip")).build();
        clients.push(node.spawn(leases::lease_main(c, sc.clone(), members.clone(), shared.clone(), until_ns)));
    }
    if sc.auth_users > 0 {
        let node = handle.create_node().name("auth-admin").ip("10.5.0.1".parse().expect("valid ip")).build();
        clients.push(node.spawn(auth::admin_main(sc.clone(), shared.clone(), until_ns)));
        for c in 0..sc.auth_users * 2 {
            let ip = format!("10.5.{}.{}", 1 + c / 200, c % 200 + 1);
            let node = handle.create_node().name(format!("auth-{c}")).ip(ip.parse().expect("valid ip")).build();
            clients.push(node.spawn(auth::user_main(c, sc.clone(), shared.clone(), until_ns)));
        }
    }
    if sc.spare_nodes > 0 {
        let node = handle.create_node().name("membership").ip("10.1.0.5".parse().expect("valid ip")).build();
        clients.push(node.spawn(membership::driver(sc.clone(), shared.clone(), until_ns, handle.clone(), ids.clone())));
    }
    if sc.backups > 0 {
        let node = handle.create_node().name("backup").ip("10.1.0.3".parse().expect("valid ip")).build();
        clients.push(node.spawn(backup_main(sc.clone(), members.clone(), shared.clone(), until_ns)));
    }
    for c in clients {
        let _ = c.await;
    }
    let _ = faults.await;
    for t in side_tasks {
        let _ = t.await;
    }
    let checker = handle.create_node().name("checker").ip("10.1.0.2".parse().expect("valid ip")).build();
    let _ = checker.spawn(liveness_and_final_reads(sc.clone(), members.clone(), shared.clone())).await;
    if sc.followers.is_some() {
        let _ = checker.spawn(followers::follower_liveness(sc.clone(), shared.clone())).await;
    }
    sampler.abort();
    reaper.abort();
}

/// Deletes and re-creates [`CHURN_TABLE`] every `table_churn_ms` until
/// `until_ns`, writing three keys into each incarnation (values name the
/// incarnation); then leaves it created and written. Failures (faults,
/// no leader) are retried; nothing here is recorded in the history, the
/// followers' final state is what R4 checks.
async fn churn_main(sc: Scenario, members: BTreeMap<u64, ArmadaNode>, shared: Arc<Shared>, until_ns: u64) {
    let mut generation = 0u64;
    let mut attempt = 0u64;
    let addr = |attempt: u64| format!("http://{}", members[&(attempt % sc.nodes as u64 + 1)].api_addr);
    let mut step = |create: bool| {
        attempt += 1;
        let addr = addr(attempt);
        async move {
            let Ok(mut c) = pb::tables_client::TablesClient::connect(addr).await else { return false };
            let name = CHURN_TABLE.to_string();
            let r = if create {
                c.create(pb::CreateTableRequest { name }).await.map(|_| ())
            } else {
                c.delete(pb::DeleteTableRequest { name }).await.map(|_| ())
            };
            match r {
                Ok(()) => true,
                Err(s) => {
                    (create && s.code() == tonic::Code::AlreadyExists) || (!create && s.code() == tonic::Code::NotFound)
                }
            }
        }
    };
    let fill = |generation: u64, attempt: u64| {
        let addr = addr(attempt);
        async move {
            let Ok(mut c) = pb::kv_client::KvClient::connect(addr).await else { return false };
            for k in ["a", "b", "c"] {
                let put = pb::PutRequest {
                    table: CHURN_TABLE.into(),
                    key: k.as_bytes().to_vec(),
                    value: format!("g{generation}-{k}").into_bytes(),
                    ..Default::default()
                };
                if c.put(put).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    loop {
        // Create and fill (retrying), then hold it for a while.
        while !step(true).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        generation += 1;
        let mut tries = 0;
        while !fill(generation, generation + tries).await && tries < 50 {
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if shared.now_ns() >= until_ns {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rand_range(sc.table_churn_ms / 2, sc.table_churn_ms))).await;
        while !step(false).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand_range(0, sc.table_churn_ms / 2))).await;
    }
}

/// Runs one seed of a scenario, with `canary` switched on (if any).
pub fn run(sc: &Scenario, seed: u64, canary_on: Option<Canary>) -> Report {
    canary::set(canary_on);
    probes::start();
    armada_server::rt::clock::reset();
    let real_start = std::time::SystemTime::now();
    let mut config = madsim::Config::default();
    config.net.send_latency = Duration::from_millis(sc.faults.latency_ms[0])
        ..Duration::from_millis(sc.faults.latency_ms[1].max(sc.faults.latency_ms[0] + 1));
    let rt = madsim::runtime::Runtime::with_seed_and_config(seed, config);
    let sc2 = sc.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        rt.block_on(async move {
            let shared = Arc::new(Shared {
                t0: Instant::now(),
                history: Mutex::new(Vec::new()),
                apply: Mutex::new(ApplyLog::default()),
                leaders: Mutex::new(LeaderLog::default()),
                registry: Mutex::new(BTreeMap::new()),
                trace: Mutex::new(Fnv64::new()),
                liveness: Mutex::new(Vec::new()),
                replicas: Mutex::new(Vec::new()),
                backups: Mutex::new(Vec::new()),
                backups_checked: Mutex::new(0),
                repl: Mutex::new(Default::default()),
                follower_ops: Mutex::new(Vec::new()),
                disks: Default::default(),
                stops: Mutex::new(Vec::new()),
                models: Mutex::new(Default::default()),
                etcd_ops: Mutex::new(0),
                watch: Mutex::new(Default::default()),
                leases: Mutex::new(Default::default()),
                auth: Mutex::new(Default::default()),
                etcd_closed: sc2.auth_users > 0,
                members: Mutex::new(Default::default()),
            });
            shared.trace_str(&sc2.name);
            world(sc2, shared.clone()).await;
            let sim_ns = shared.now_ns();
            shared.trace(&[sim_ns]);
            (shared, sim_ns)
        })
    }));
    canary::set(None);
    // Taken before the checkers run: they read tables too.
    let probe_hits = probes::finish();
    let real_secs = real_start.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let (shared, sim_ns) = match result {
        Ok(s) => s,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            return Report {
                seed,
                verdict: Verdict::Crash,
                trace: 0,
                failures: vec![format!("crash: {msg}")],
                sim_secs: 0.0,
                real_secs,
                ops: 0,
                ops_ok: 0,
                indefinite: 0,
                applied: 0,
                snapshots: 0,
                check_secs: 0.0,
                lag_ms: None,
                follower_snapshots: 0,
                installs_resumed: 0,
                backups_checked: 0,
                model_checked: (0, 0),
                probes: probe_hits,
                etcd_ops: 0,
                watch_events: 0,
                watch_progress: 0,
                leases: (0, 0, 0),
                follower_watch_ms: None,
                auth_checked: (0, 0, 0, 0),
                members_checked: (0, 0),
            };
        }
    };
    let check_start = std::time::SystemTime::now();
    let history = std::mem::take(&mut *shared.history.lock().unwrap_or_else(|p| p.into_inner()));
    let keys: Vec<String> = (0..sc.keys).map(key_name).collect();
    let mut safety = Vec::new();
    safety.extend(shared.apply.lock().unwrap_or_else(|p| p.into_inner()).violations.iter().take(5).cloned());
    safety.extend(shared.leaders.lock().unwrap_or_else(|p| p.into_inner()).violations.iter().take(5).cloned());
    safety.extend(shared.replicas.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
    safety.extend(shared.stops.lock().unwrap_or_else(|p| p.into_inner()).iter().take(5).cloned());
    safety.extend(shared.models.lock().unwrap_or_else(|p| p.into_inner()).violations.iter().cloned());
    if let Err(e) = checks::revisions(&history) {
        safety.push(e);
    }
    if let Err(e) = checks::reads_at_revision(&history) {
        safety.push(e);
    }
    let committed = std::mem::take(&mut shared.apply.lock().unwrap_or_else(|p| p.into_inner()).committed_values);
    if let Err(e) = checks::failed_writes_not_applied(&history, &committed) {
        safety.push(e);
    }
    if let Err(e) = linearizability::check(&history, &keys, &committed) {
        safety.push(e.to_string());
    }
    let mut reads_checked = 0;
    {
        // M2: the leader cluster's group of each table the clients used.
        let mut groups = BTreeMap::new();
        for t in 0..sc.tables {
            let name = table_name(t);
            let id = shared.nodes().iter().filter(|(k, _)| cluster_of(*k) == 0).find_map(|(_, n)| {
                armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META)).get(&name).ok()?.map(|i| i.id)
            });
            if let Some(id) = id {
                groups.insert(name, global_group(0, id));
            }
        }
        let models = shared.models.lock().unwrap_or_else(|p| p.into_inner());
        match models.check_reads(&history, &groups) {
            Ok(n) => reads_checked = n,
            Err(e) => safety.push(e),
        }
    }
    let model_checked = (shared.models.lock().unwrap_or_else(|p| p.into_inner()).checked, reads_checked);
    safety.extend(watchers::check(&shared));
    let mut watch_lag = watchers::follower_latency_ms(&shared);
    watch_lag.sort_by(f64::total_cmp);
    let wpct = |q: f64| watch_lag[((watch_lag.len() as f64 - 1.0) * q).round() as usize];
    let follower_watch_ms = if watch_lag.is_empty() { None } else { Some((wpct(0.5), wpct(0.99), watch_lag.len())) };
    let (lease_failures, leases) = leases::check(&shared, sc, sim_ns);
    safety.extend(lease_failures);
    let (auth_failures, auth_checked) = auth::check(&shared);
    safety.extend(auth_failures);
    let (member_failures, members_checked) = membership::check(&shared, sc);
    safety.extend(member_failures);
    let (repl_failures, mut lag) = followers::check(&shared);
    safety.extend(repl_failures);
    lag.sort_by(f64::total_cmp);
    let pct = |q: f64| lag[((lag.len() as f64 - 1.0) * q).round() as usize];
    let lag_ms = if lag.is_empty() { None } else { Some((pct(0.5), pct(0.99), lag.len())) };
    let follower_snapshots = shared.repl.lock().unwrap_or_else(|p| p.into_inner()).snapshots;
    let liveness = shared.liveness.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let verdict = if !safety.is_empty() {
        Verdict::Safety
    } else if !liveness.is_empty() {
        Verdict::Liveness
    } else {
        Verdict::Pass
    };
    let trace = shared.trace.lock().unwrap_or_else(|p| p.into_inner()).finish();
    let check_secs = check_start.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let real_secs = real_secs + check_secs;
    let sim_secs = sim_ns as f64 / 1e9;
    let (applied, snapshots, installs_resumed) = {
        let a = shared.apply.lock().unwrap_or_else(|p| p.into_inner());
        (a.applied_count, a.snapshots_installed, a.installs_resumed)
    };
    let backups_checked = *shared.backups_checked.lock().unwrap_or_else(|p| p.into_inner());
    let etcd_ops = *shared.etcd_ops.lock().unwrap_or_else(|p| p.into_inner());
    let (watch_events, watch_progress) = {
        let w = shared.watch.lock().unwrap_or_else(|p| p.into_inner());
        (w.events_seen, w.progress_seen)
    };
    Report {
        seed,
        verdict,
        trace,
        failures: safety.into_iter().chain(liveness).collect(),
        sim_secs,
        real_secs,
        ops: history.len(),
        ops_ok: history.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).count(),
        indefinite: history.iter().filter(|o| matches!(o.outcome, Outcome::Indefinite(_))).count(),
        applied,
        snapshots,
        check_secs,
        lag_ms,
        follower_snapshots,
        installs_resumed,
        backups_checked,
        model_checked,
        probes: probe_hits,
        etcd_ops,
        watch_events,
        watch_progress,
        leases,
        follower_watch_ms,
        auth_checked,
        members_checked,
    }
}
