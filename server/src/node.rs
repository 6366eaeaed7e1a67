//! The node runtime: hosts the metadata group and one Raft group per table
//! on this node, keeps the set of groups in step with the table catalog, and
//! executes client requests (or says where to forward them).
//!
//! The runtime is the same in production and in simulation; only the
//! engine, the flusher's disk model and the transport differ.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use armada_core::command::{Catalog, MetaError, MetaReply, TableInfo, TableReply};
use armada_core::kv::{KvError, RangeRequest, RangeResponse};
use armada_core::mvcc::Mvcc;
use armada_core::raft::{
    data_ns, delete_group, ApplyObserver, ArmadaNode, ArmadaRaft, Flusher, GroupKind, LogStore, StateMachine,
};
use armada_core::snapshot::InstallGate;
use armada_core::{Command, CommandResponse, Engine, GroupId, MetaCommand, TableCommand};
use armada_net::Transport;
use openraft::async_runtime::watch::{Watch, WatchReceiver, WatchSender};
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{Config, ReadPolicy, ServerState, SnapshotPolicy};
use tracing::{debug, info, warn};

use crate::network::NetworkFactory;
use crate::rt::ArmadaRt;

/// Openraft's type configuration on Armada's runtime.
pub type C = ArmadaRaft<ArmadaRt>;
pub type GroupRaft = openraft::Raft<C, StateMachine<ArmadaRt>>;

/// How often the node reconciles its groups with the catalog.
pub const CATALOG_SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Most forwarding hops a request may take (to the metadata leader, then to
/// the table's leader).
pub const FORWARD_HOPS_MAX: u32 = 2;
/// Time a forwarded request may take beyond the request timeout (its
/// transit); a leader that does not answer by then is treated as lost.
pub const FORWARD_MARGIN: Duration = Duration::from_millis(500);
/// How many forwarded-request ids a node remembers to drop duplicate
/// deliveries (duplicates arrive within moments of the original).
pub const FORWARD_DEDUPE_WINDOW: usize = 4096;

/// Default response limit (a client applies its own receive limit too:
/// 4 MiB by default in tonic and grpc-go, 2 GiB in etcd's Go client).
pub const MAX_RESPONSE_BYTES_DEFAULT: u64 = 48 << 20;

/// How long a follower read at a revision it has not applied yet waits.
pub const FOLLOWER_READ_WAIT: Duration = Duration::from_secs(1);

/// Raft timing and log retention.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many applied entries.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, so slightly lagging peers catch
    /// up from the log instead of a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Purge the log in batches of at least this many entries.
    pub purge_batch_entries: u64,
    /// Revisions of each table's changelog kept for follower clusters; a
    /// follower further behind installs a snapshot.
    pub history_retention: u64,
    /// Bytes per chunk of a streamed Raft snapshot (and per batch when one
    /// is copied into place): what a snapshot transfer holds in memory.
    pub snapshot_chunk_bytes: usize,
    /// How long the sender waits for one chunk to be staged.
    pub snapshot_chunk_timeout: Duration,
    /// Largest range answer a node builds (keys and values, about); a
    /// larger one is refused with `ResponseTooLarge`.
    pub max_response_bytes: u64,
    /// Automatic compaction of every table (leader clusters only).
    pub auto_compaction: armada_core::compaction::Retention,
    /// The slowest install rate a sender allows for: after the last chunk
    /// it waits `snapshot_chunk_timeout` plus the bytes sent at this rate
    /// for the receiver to copy the snapshot into place. (A fixed long wait
    /// stalled replication to a receiver that crashed mid-install.)
    pub snapshot_install_bytes_per_sec: u64,
    /// A revision larger than this is sent to follower clusters in parts of
    /// about this size (each part one change-stream message).
    pub revision_part_bytes: usize,
    /// History records one compaction step visits: how long a compaction
    /// holds a table's apply path at a time (see `armada_core::mvcc`).
    pub compaction_step_records: usize,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            // etcd's defaults are 100 ms and 1000 ms; a shorter election
            // timeout keeps failover under a second.
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            // A Raft snapshot once copied the whole group on the state
            // machine's task, and taking one every 5,000 entries pushed the
            // p99 of durable puts at 64 clients from about 20 ms to 145-330 ms.
            // Snapshots are views now (no copy); the interval was kept.
            snapshot_after_logs: 50_000,
            logs_kept_after_snapshot: 5_000,
            purge_batch_entries: 256,
            history_retention: armada_core::mvcc::replication::CHANGELOG_RETENTION_DEFAULT,
            snapshot_chunk_bytes: armada_core::snapshot::SNAPSHOT_CHUNK_BYTES,
            snapshot_chunk_timeout: Duration::from_secs(5),
            snapshot_install_bytes_per_sec: 16 << 20,
            auto_compaction: armada_core::compaction::Retention::Off,
            max_response_bytes: MAX_RESPONSE_BYTES_DEFAULT,
            revision_part_bytes: crate::replication::BATCH_BYTES_MAX,
            compaction_step_records: armada_core::mvcc::COMPACTION_STEP_RECORDS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Every initial member (including this node), by id.
    pub members: BTreeMap<u64, ArmadaNode>,
    pub raft: RaftTuning,
    /// How long a request may wait for a leader, a read index or a commit.
    pub request_timeout: Duration,
}

impl NodeConfig {
    pub fn me(&self) -> Option<&ArmadaNode> {
        self.members.get(&self.id)
    }
}

/// A request's failure, as the service layer needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ApiError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("table {0:?} not found")]
    TableNotFound(String),
    /// No leader is known, or a leader could not reach a quorum; the request
    /// was not applied and can be retried.
    #[error("no leader available: {0}")]
    Unavailable(String),
    /// The request may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// Another node leads: the request goes to it over the cluster
    /// transport. Never returned by the public methods, which forward.
    #[error("forward to node {leader} at {raft_addr}")]
    Forward { leader: u64, raft_addr: String },
    #[error("internal error: {0}")]
    Internal(String),
    /// The operation is the leader cluster's alone (table creation and
    /// deletion on a follower cluster).
    #[error("{0}")]
    ReadOnly(String),
    /// A write committed at the leader cluster but this follower did not
    /// apply it within the request timeout.
    #[error("{0}")]
    Lagging(String),
}

/// A client request as it travels between nodes when forwarded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ClientRequest {
    Write { table: String, cmd: TableCommand, hops: u32 },
    Range { table: String, req: RangeRequest, serializable: bool, hops: u32 },
    CreateTable { name: String, hops: u32 },
    DeleteTable { name: String, hops: u32 },
    ListTables { hops: u32 },
}

impl ClientRequest {
    fn is_write(&self) -> bool {
        !matches!(self, ClientRequest::Range { .. } | ClientRequest::ListTables { .. })
    }

    fn next_hop(&self) -> ClientRequest {
        let mut r = self.clone();
        match &mut r {
            ClientRequest::Write { hops, .. }
            | ClientRequest::Range { hops, .. }
            | ClientRequest::CreateTable { hops, .. }
            | ClientRequest::DeleteTable { hops, .. }
            | ClientRequest::ListTables { hops } => *hops += 1,
        }
        r
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ClientReply {
    Write(TableReply, HeaderInfo),
    Range(RangeResponse, HeaderInfo),
    Table(TableInfo),
    Tables(Vec<TableInfo>),
}

/// A Raft group hosted on this node.
pub struct Group {
    pub id: GroupId,
    /// Table name; empty for the metadata group.
    pub name: String,
    pub raft: GroupRaft,
    /// Closed while a snapshot replaces the group's data: reads pass it.
    pub gate: Arc<InstallGate>,
    /// The snapshot stream being received, by the sender's stream id (held
    /// while a chunk is staged, so a sender asking where to resume waits for
    /// the chunk in progress).
    pub receiving: tokio::sync::Mutex<crate::network::Receiving>,
    /// Snapshot transfers this node is sending for the group.
    pub transfers: Arc<crate::snapshots::Transfers>,
}

impl Group {
    /// Runs a read of the group's data unless a snapshot install is
    /// replacing it (the read would mix old and new data).
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> Result<T, ApiError> {
        self.gate.read(read).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "this replica of group {} is installing a snapshot; retry, or read from another node",
                self.id
            ))
        })
    }
}

/// What the response header needs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct HeaderInfo {
    pub term: u64,
    pub member_id: u64,
}

/// Per-group state for `Cluster.Status`.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    pub table: String,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Last log index this replica holds.
    pub last_log_index: u64,
    /// Last log index purged here (covered by a snapshot); a replica behind
    /// it catches up by snapshot.
    pub purged_index: u64,
    pub revision: u64,
    /// The table's compaction revision (reads below it are refused).
    pub compacted: u64,
    /// Whether history of a compaction is still being removed, in steps.
    pub compaction_pending: bool,
    /// Follower clusters: see [`crate::replication::LagStats`].
    pub leader_revision: u64,
    pub lag_revisions: u64,
    pub lag_seconds: f64,
    /// Snapshots this node's replication worker installed.
    pub snapshots_installed: u64,
    /// Raft snapshots this replica installed since it started (it fell
    /// behind the leader's purged log).
    pub raft_snapshots_installed: u64,
    /// Follower clusters: the health of the table's replication worker, on
    /// the node running it.
    pub replication: crate::replication::ReplicationState,
}

/// Optional observers the simulated world attaches to a node.
#[derive(Clone, Default)]
pub struct NodeHooks {
    pub apply_observer: Option<Arc<dyn ApplyObserver>>,
}

/// Publishes every group's applied revision (the catalog's applied index
/// for the metadata group) to watchers, and passes applies on to the hooks'
/// observer.
struct Notifier {
    inner: Option<Arc<dyn ApplyObserver>>,
    /// Follower clusters: the leader cluster's revision carried by the last
    /// replicated batch applied, per group.
    leader_revisions: std::sync::Mutex<BTreeMap<GroupId, u64>>,
    revisions: std::sync::Mutex<BTreeMap<GroupId, crate::rt::DetSender<u64>>>,
    /// Raft snapshots installed per group since the start.
    raft_snapshots: std::sync::Mutex<BTreeMap<GroupId, u64>>,
    /// Changes whenever the catalog may have changed (the metadata group
    /// applied an entry or installed a snapshot): the version of
    /// [`Node::catalog_cache`].
    catalog_epoch: std::sync::atomic::AtomicU64,
}

impl Notifier {
    fn publish(&self, group: GroupId, value: u64) {
        let mut m = self.revisions.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&group) {
            Some(tx) => {
                tx.send_if_modified(|v| {
                    let changed = *v != value;
                    *v = value;
                    changed
                });
            }
            None => {
                m.insert(group, <crate::rt::DetWatch as Watch>::channel(value).0);
            }
        }
    }
}

impl ApplyObserver for Notifier {
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
        if group == GroupId::META {
            self.catalog_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(o) = &self.inner {
            o.applied(group, index, term, digest, revision, command, response);
        }
        if let Some(Command::Table(TableCommand::Replicate { leader_revision, .. })) = command {
            let mut m = self.leader_revisions.lock().unwrap_or_else(|p| p.into_inner());
            let e = m.entry(group).or_insert(0);
            *e = (*e).max(*leader_revision);
        }
        self.publish(group, revision.unwrap_or(index));
    }

    fn resumed_install(&self, group: GroupId) {
        if group == GroupId::META {
            self.catalog_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(o) = &self.inner {
            o.resumed_install(group);
        }
    }

    fn installed_snapshot(&self, group: GroupId, index: u64, revision: Option<u64>) {
        if group == GroupId::META {
            self.catalog_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(o) = &self.inner {
            o.installed_snapshot(group, index, revision);
        }
        *self.raft_snapshots.lock().unwrap_or_else(|p| p.into_inner()).entry(group).or_insert(0) += 1;
        self.publish(group, revision.unwrap_or(index));
    }

    fn wants_digest(&self) -> bool {
        // Only an outside observer (the simulator's checkers) compares
        // digests; the node itself needs revisions.
        self.inner.as_ref().is_some_and(|o| o.wants_digest())
    }
}

/// Where a follower cluster sends what only the leader cluster may do.
#[tonic::async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// Applies a write at the leader cluster; returns its reply there.
    async fn write(&self, table: &str, cmd: TableCommand) -> Result<TableReply, ApiError>;
}

pub struct Node {
    cfg: NodeConfig,
    notifier: Arc<Notifier>,
    /// Set on the nodes of a follower cluster.
    upstream: std::sync::OnceLock<Arc<dyn Upstream>>,
    /// A follower cluster node's replication workers (for lag reports).
    follower: std::sync::OnceLock<std::sync::Weak<crate::replication::Follower>>,
    engine: Arc<dyn Engine>,
    flusher: Arc<dyn Flusher>,
    transport: Arc<dyn Transport>,
    groups: RwLock<BTreeMap<GroupId, Arc<Group>>>,
    /// Random per start, so ids of a restarted node never repeat old ones.
    incarnation: u64,
    next_forward: std::sync::atomic::AtomicU64,
    seen_forwards: std::sync::Mutex<ForwardDedupe>,
    /// Names the staging area of each snapshot received since the start.
    next_staging: std::sync::atomic::AtomicU64,
    /// Held while groups are started or stopped: two concurrent
    /// `sync_groups` (the catalog watcher and a table creation) once both
    /// started the same group, two Raft instances over one storage (openraft
    /// panicked: "new membership has to have a greater log_id").
    syncing: tokio::sync::Mutex<()>,
    /// Set once a storage write or sync failed (see [`Node::fail`]);
    /// never cleared: only a restart recovers.
    stop: Arc<crate::failstop::FailStop>,
    /// Storage work since the node started (`/metrics`).
    io: Arc<crate::failstop::IoStats>,
    /// Commands proposed to Raft groups on this node (each becomes one log
    /// entry today; batching would make it more than one per entry).
    proposals: std::sync::atomic::AtomicU64,
    raft_stats: Arc<armada_core::raft::RaftStats>,
    /// Tables found in the catalog, valid while the notifier's catalog
    /// epoch is the one recorded: every request names a table, and a
    /// storage read per request to find it cost 6% of a put's CPU.
    catalog_cache: std::sync::RwLock<(u64, BTreeMap<String, TableInfo>)>,
}

/// The ids of recently received forwarded requests, oldest first.
#[derive(Default)]
struct ForwardDedupe {
    seen: std::collections::BTreeSet<(u64, u64)>,
    order: std::collections::VecDeque<(u64, u64)>,
}

impl Node {
    /// Opens every group this node's storage knows, starts the metadata
    /// group (initialising the cluster on first start) and the task that keeps
    /// table groups in step with the catalog.
    pub async fn start(
        cfg: NodeConfig,
        engine: Arc<dyn Engine>,
        flusher: Arc<dyn Flusher>,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Node>, ApiError> {
        Self::start_with(cfg, engine, flusher, transport, NodeHooks::default()).await
    }

    /// [`Node::start`] with observers attached.
    pub async fn start_with(
        cfg: NodeConfig,
        engine: Arc<dyn Engine>,
        flusher: Arc<dyn Flusher>,
        transport: Arc<dyn Transport>,
        hooks: NodeHooks,
    ) -> Result<Arc<Node>, ApiError> {
        if cfg.me().is_none() {
            return Err(ApiError::Internal(format!("node {} is not among the initial members", cfg.id)));
        }
        let notifier = Arc::new(Notifier {
            inner: hooks.apply_observer.clone(),
            leader_revisions: Default::default(),
            raft_snapshots: Default::default(),
            revisions: Default::default(),
            catalog_epoch: Default::default(),
        });
        // Every write and sync of the node goes through these, so the first
        // one that fails stops the node before anyone hears of it.
        let stop = Arc::new(crate::failstop::FailStop::default());
        let io = Arc::new(crate::failstop::IoStats::default());
        let engine: Arc<dyn Engine> =
            Arc::new(crate::failstop::FailStopEngine { inner: engine, stop: stop.clone(), stats: io.clone() });
        let flusher: Arc<dyn Flusher> =
            Arc::new(crate::failstop::FailStopFlusher { inner: flusher, stop: stop.clone(), stats: io.clone() });
        let node = Arc::new(Node {
            cfg,
            notifier,
            upstream: std::sync::OnceLock::new(),
            follower: std::sync::OnceLock::new(),
            engine,
            flusher,
            transport,
            groups: RwLock::new(BTreeMap::new()),
            incarnation: madsim::rand::random::<u64>(),
            next_forward: std::sync::atomic::AtomicU64::new(0),
            next_staging: std::sync::atomic::AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
            seen_forwards: std::sync::Mutex::new(Default::default()),
            stop,
            io,
            proposals: std::sync::atomic::AtomicU64::new(0),
            raft_stats: Arc::default(),
            catalog_cache: Default::default(),
        });
        node.open_group(GroupId::META, String::new(), GroupKind::Meta).await?;
        node.sync_groups().await;
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CATALOG_SYNC_INTERVAL).await;
                let Some(node) = weak.upgrade() else { return };
                node.sync_groups().await;
            }
        });
        tokio::spawn(crate::compactor::run(Arc::downgrade(&node), node.cfg.raft.auto_compaction));
        tokio::spawn(crate::compactor::run_steps(Arc::downgrade(&node)));
        tokio::spawn(crate::snapshots::run(
            Arc::downgrade(&node),
            armada_core::snapshot::BuildPolicy { after_logs: node.cfg.raft.snapshot_after_logs },
        ));
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// Stops serving for good (see `crate::failstop`): every later request
    /// is refused, and the process is expected to exit (see
    /// [`Node::failed`]) so that a supervisor restarts it from what is
    /// durable. Called by the node's engine and flusher at the first failed
    /// write or sync; the first reason sticks.
    pub fn fail(&self, reason: String) {
        self.stop.fail(reason)
    }

    /// Why the node stopped serving, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.stop.reason()
    }

    /// Resolves with the reason once the node stops.
    pub async fn failed(&self) -> String {
        self.stop.stopped().await
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Storage work since the node started.
    pub fn io_stats(&self) -> &crate::failstop::IoStats {
        &self.io
    }

    /// Syncs this node's flusher ran since it started, and their nanoseconds.
    pub fn syncs(&self) -> (u64, u64) {
        self.flusher.syncs()
    }

    /// Commands this node proposed to its Raft groups since it started.
    pub fn proposals(&self) -> u64 {
        self.proposals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Log appends and state-machine writes of all groups, with their entries.
    pub fn raft_stats(&self) -> &armada_core::raft::RaftStats {
        &self.raft_stats
    }

    /// Makes every write this node has made durable (one sync of the
    /// engine), and waits for it. A failed sync stops the node.
    pub async fn sync(&self) -> Result<(), std::io::Error> {
        armada_core::raft::flush_and_wait(&*self.flusher, armada_core::raft::FlushReason::Snapshot).await
    }

    fn raft_config(&self) -> Result<Arc<Config>, ApiError> {
        let t = &self.cfg.raft;
        let c = Config {
            cluster_name: "armada".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            // Snapshots are built by `crate::snapshots`, which holds a build
            // while this node sends the current snapshot.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: t.logs_kept_after_snapshot,
            purge_batch_size: t.purge_batch_entries.max(1),
            install_snapshot_timeout: t.snapshot_chunk_timeout.as_millis().try_into().unwrap_or(u64::MAX),
            // A restarted leader must win a new election. Restoring
            // leadership in the old term (openraft's default) lets a leader
            // that lost its unsynced log tail in a crash write different
            // entries at indices its followers already hold for that term,
            // breaking log matching. Found by the simulator: crashes-3 seed 2.
            enable_leader_restore: Some(false),
            // Pre-vote: a node whose election timer fires first asks whether
            // a quorum would vote for it, and only then raises its term. A
            // node cut off from the others (partition, pause) otherwise raises
            // its term on every timeout, and on its return the leader sees the
            // higher term in a reply and steps down: a real 3-node cluster
            // stopped serving for 1.9 s that way after a heal. Checked by
            // scenarios/isolate-heal-3.toml (R5) and its canary no-pre-vote.
            enable_pre_vote: Some(!armada_core::canary::active(armada_core::canary::Canary::NoPreVote)),
            ..Default::default()
        };
        c.validate().map(Arc::new).map_err(|e| ApiError::Internal(format!("raft config: {e}")))
    }

    async fn open_group(&self, id: GroupId, name: String, kind: GroupKind) -> Result<Arc<Group>, ApiError> {
        // Before anything reads the group: finish a snapshot install that a
        // crash interrupted, or drop snapshots received but never installed.
        match armada_core::snapshot::recover(self.engine.clone(), id, self.cfg.raft.snapshot_chunk_bytes) {
            Ok(true) => {
                info!(group = %id, "finished a snapshot install interrupted by a restart");
                self.notifier.resumed_install(id);
            }
            Ok(false) => {}
            Err(e) => return Err(ApiError::Internal(format!("group {id}: recovering a snapshot install: {e}"))),
        }
        // Likewise a follower cluster's snapshot swap (a table of a follower
        // cluster replaced by the leader cluster's snapshot).
        if kind == GroupKind::Table {
            match recover_swap(&*self.engine, id, self.cfg.raft.snapshot_chunk_bytes) {
                Ok(true) => info!(group = %id, "finished a follower snapshot swap interrupted by a restart"),
                Ok(false) => {}
                Err(e) => return Err(ApiError::Internal(format!("group {id}: recovering a snapshot swap: {e}"))),
            }
        }
        let gate = Arc::new(InstallGate::default());
        let log = LogStore::new(self.engine.clone(), id, self.flusher.clone()).with_stats(self.raft_stats.clone());
        let sm = StateMachine::new(self.engine.clone(), id, kind, self.flusher.clone())
            .with_stats(self.raft_stats.clone())
            .with_retention(self.cfg.raft.history_retention)
            .with_compaction_step(self.cfg.raft.compaction_step_records)
            .with_gate(gate.clone())
            .with_chunk_bytes(self.cfg.raft.snapshot_chunk_bytes)
            .with_observer(Some(self.notifier.clone() as Arc<dyn ApplyObserver>));
        let transfers = Arc::new(crate::snapshots::Transfers::default());
        let network = NetworkFactory {
            transport: self.transport.clone(),
            group: id,
            sender: self.cfg.id,
            transfers: transfers.clone(),
            chunk_bytes: self.cfg.raft.snapshot_chunk_bytes,
            install_bytes_per_sec: self.cfg.raft.snapshot_install_bytes_per_sec,
        };
        let raft = openraft::Raft::new(self.cfg.id, self.raft_config()?, network, log, sm)
            .await
            .map_err(|e| ApiError::Internal(format!("starting group {id}: {e}")))?;
        let initialized = raft.is_initialized().await.map_err(|e| ApiError::Internal(e.to_string()))?;
        if !initialized {
            // Every member initialises with the same membership, so the
            // first log entry is identical everywhere; the cluster needs no
            // designated bootstrap node.
            if let Err(e) = raft.initialize(self.cfg.members.clone()).await {
                debug!(group = %id, "initialize: {e}");
            }
        }
        let group = Arc::new(Group { id, name, raft, gate, receiving: Default::default(), transfers });
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(id, group.clone());
        Ok(group)
    }

    /// The group with this id, if hosted here.
    pub fn group(&self, id: GroupId) -> Option<Arc<Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    fn catalog(&self) -> Catalog<'_> {
        Catalog::new(&*self.engine, data_ns(GroupId::META))
    }

    /// Reads the catalog through the metadata group's install gate: while a
    /// snapshot replaces the catalog, a read could miss tables (and a
    /// missing table is deleted by `sync_groups`, or by a follower cluster
    /// reconciling with this node's catalog).
    fn read_catalog<T>(
        &self,
        f: impl FnOnce(&Catalog<'_>) -> Result<T, armada_core::EngineError>,
    ) -> Result<T, ApiError> {
        let catalog = self.catalog();
        let run = || f(&catalog).map_err(|e| ApiError::Internal(e.to_string()));
        match self.group(GroupId::META) {
            Some(meta) => meta.read(run)?,
            None => run(),
        }
    }

    /// Every table in this node's applied catalog (`Unavailable` while a
    /// snapshot replaces it).
    pub fn catalog_list(&self) -> Result<Vec<TableInfo>, ApiError> {
        self.read_catalog(|c| c.list())
    }

    /// Starts groups for new tables and stops and deletes the groups of
    /// deleted tables, according to this node's applied catalog.
    pub async fn sync_groups(&self) {
        let _one_at_a_time = self.syncing.lock().await;
        let tables = match self.catalog_list() {
            Ok(t) => t,
            Err(e) => {
                debug!("reading catalog (groups unchanged this round): {e}");
                return;
            }
        };
        let wanted: BTreeMap<GroupId, String> = tables.into_iter().map(|t| (t.id, t.name)).collect();
        let hosted: Vec<GroupId> = self.groups.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        for (id, name) in &wanted {
            if !hosted.contains(id) {
                info!(group = %id, table = %name, "starting table group");
                if let Err(e) = self.open_group(*id, name.clone(), GroupKind::Table).await {
                    warn!(group = %id, "{e}");
                }
            }
        }
        for id in hosted {
            if id != GroupId::META && !wanted.contains_key(&id) {
                let g = self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(g) = g {
                    info!(group = %id, table = %g.name, "stopping deleted table group");
                    let _ = g.raft.shutdown().await;
                    if let Err(e) = delete_group(&*self.engine, id) {
                        warn!(group = %id, "deleting group data: {e}");
                    }
                }
            }
        }
    }

    fn forward_or_unavailable(&self, leader: Option<u64>, node: Option<ArmadaNode>, hops: u32, what: &str) -> ApiError {
        let addr = node
            .map(|n| n.raft_addr)
            .or_else(|| leader.and_then(|l| self.cfg.members.get(&l)).map(|n| n.raft_addr.clone()));
        match (leader, addr) {
            (Some(leader), Some(raft_addr)) if hops < FORWARD_HOPS_MAX && leader != self.cfg.id => {
                ApiError::Forward { leader, raft_addr }
            }
            _ => ApiError::Unavailable(format!("no leader for {what}")),
        }
    }

    /// Sends a client request to the node at `raft_addr` over the cluster
    /// transport and returns its answer. A write whose forwarding fails in
    /// transit may have been applied: its outcome is indeterminate.
    async fn forward(&self, raft_addr: &str, req: ClientRequest) -> Result<ClientReply, ApiError> {
        let is_write = req.is_write();
        let id = (self.incarnation, self.next_forward.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let bytes = crate::network::encode(&crate::network::Envelope {
            group: GroupId::META,
            request: crate::network::RaftRequest::Client { id, req },
        });
        let failed = |e: String| {
            if is_write {
                ApiError::Indeterminate(format!("forwarding to {raft_addr}: {e}"))
            } else {
                ApiError::Unavailable(format!("forwarding to {raft_addr}: {e}"))
            }
        };
        let resp = self
            .transport
            .call(raft_addr, bytes, self.cfg.request_timeout + FORWARD_MARGIN)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match postcard::from_bytes::<crate::network::RaftReply>(&resp) {
            Ok(crate::network::RaftReply::Client(r)) => r,
            Ok(crate::network::RaftReply::Refused(m)) => Err(failed(m)),
            Ok(_) => Err(failed("mismatched reply".into())),
            Err(e) => Err(failed(format!("malformed reply: {e}"))),
        }
    }

    /// A staging id for a snapshot being received, unique since the start
    /// (a restart deletes staging left by the previous run).
    pub fn next_staging_id(&self) -> u64 {
        self.next_staging.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a forwarded request's id; false if it was seen before.
    pub fn first_delivery(&self, id: (u64, u64)) -> bool {
        let mut d = self.seen_forwards.lock().unwrap_or_else(|p| p.into_inner());
        if !d.seen.insert(id) {
            return false;
        }
        d.order.push_back(id);
        if d.order.len() > FORWARD_DEDUPE_WINDOW {
            if let Some(old) = d.order.pop_front() {
                d.seen.remove(&old);
            }
        }
        true
    }

    /// Executes a client request here, forwarding it further if another node
    /// leads (the transport handler calls this for forwarded requests).
    pub async fn execute(&self, req: ClientRequest) -> Result<ClientReply, ApiError> {
        if let Some(why) = self.failure() {
            return Err(ApiError::Unavailable(format!("node {} has stopped: {why}", self.cfg.id)));
        }
        let local = match &req {
            ClientRequest::Write { table, cmd, hops } => {
                self.write_local(table, cmd.clone(), *hops).await.map(|(r, h)| ClientReply::Write(r, h))
            }
            ClientRequest::Range { table, req: r, serializable, hops } => {
                self.range_local(table, r, *serializable, *hops).await.map(|(r, h)| ClientReply::Range(r, h))
            }
            // Catalog requests are rare: boxed, so that their futures do not
            // enlarge the future of every read and write.
            ClientRequest::CreateTable { name, hops } => {
                Box::pin(self.create_table_local(name, *hops)).await.map(ClientReply::Table)
            }
            ClientRequest::DeleteTable { name, hops } => {
                Box::pin(self.delete_table_local(name, *hops)).await.map(ClientReply::Table)
            }
            ClientRequest::ListTables { hops } => {
                Box::pin(self.list_tables_local(*hops)).await.map(ClientReply::Tables)
            }
        };
        match local {
            Err(ApiError::Forward { raft_addr, .. }) => self.forward(&raft_addr, req.next_hop()).await,
            other => other,
        }
    }

    pub fn header(&self, group: &Group) -> HeaderInfo {
        let m = group.raft.metrics();
        let term = openraft::async_runtime::WatchReceiver::borrow_watched(&m).current_term;
        HeaderInfo { term, member_id: self.cfg.id }
    }

    /// A table of this node's applied catalog, from the cache when the
    /// catalog has not changed since it was filled. The epoch is read
    /// before the catalog: a change applied meanwhile moves the epoch on, so
    /// what is cached under the old one is never used again.
    fn cached_table(&self, name: &str) -> Result<Option<TableInfo>, ApiError> {
        let epoch = self.notifier.catalog_epoch.load(std::sync::atomic::Ordering::SeqCst);
        {
            let cache = self.catalog_cache.read().unwrap_or_else(|p| p.into_inner());
            if cache.0 == epoch {
                if let Some(info) = cache.1.get(name) {
                    return Ok(Some(info.clone()));
                }
            }
        }
        let found = self.read_catalog(|c| c.get(name))?;
        if let Some(info) = &found {
            let mut cache = self.catalog_cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.0 != epoch {
                *cache = (epoch, BTreeMap::new());
            }
            cache.1.insert(name.to_string(), info.clone());
        }
        Ok(found)
    }

    /// The group of a table. A table missing from this node's catalog is
    /// looked up at the metadata leader, so a table created through another
    /// node is never reported missing.
    pub async fn table_group(&self, name: &str, hops: u32) -> Result<Arc<Group>, ApiError> {
        // A name no table can have is the client's mistake (INVALID_ARGUMENT),
        // not a missing table.
        armada_core::command::validate_table_name(name)?;
        let info = match self.cached_table(name)? {
            Some(info) => info,
            None => {
                let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
                // Boxed, like `sync_groups` below: these rare paths would
                // otherwise be inlined into the future of every request
                // (kilobytes copied each time one is created or moved).
                Box::pin(self.linearize(&meta, hops, "the catalog")).await?;
                self.read_catalog(|c| c.get(name))?.ok_or_else(|| ApiError::TableNotFound(name.to_string()))?
            }
        };
        match self.group(info.id) {
            Some(g) => Ok(g),
            None => {
                Box::pin(self.sync_groups()).await;
                self.group(info.id).ok_or_else(|| ApiError::Unavailable(format!("table {name:?} is starting")))
            }
        }
    }

    /// Waits until this node has applied everything committed before the
    /// call (ReadIndex through the group's leader).
    async fn linearize(&self, group: &Group, hops: u32, what: &str) -> Result<(), ApiError> {
        let applied_before = {
            let m = group.raft.metrics();
            let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
            m.last_applied.as_ref().map_or(0, |l| l.index)
        };
        let fut = group.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        match crate::rt::timeout(self.cfg.request_timeout, fut).await {
            Err(_) => Err(ApiError::Unavailable(format!("read index for {what} timed out"))),
            Ok(Ok(read)) => {
                if read.log_id().index > applied_before {
                    armada_core::probe!(ReadIndexWaitedForApply);
                }
                Ok(())
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(self.forward_or_unavailable(f.leader_id, f.leader_node, hops, what))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(ApiError::Unavailable(format!("{what}: {e}")))
            }
            Ok(Err(e)) => Err(ApiError::Unavailable(format!("{what}: {e}"))),
        }
    }

    async fn propose(&self, group: &Group, cmd: Command, hops: u32) -> Result<CommandResponse, ApiError> {
        let what = if group.name.is_empty() { "the catalog".to_string() } else { format!("table {:?}", group.name) };
        self.proposals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fut = group.raft.client_write(cmd);
        match crate::rt::timeout(self.cfg.request_timeout, fut).await {
            Err(_) => Err(ApiError::Indeterminate(format!("write to {what} timed out"))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(self.forward_or_unavailable(f.leader_id, f.leader_node, hops, &what))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
                Err(ApiError::Indeterminate(format!("leader of {what} changed during the write")))
            }
            Ok(Err(e)) => Err(ApiError::Indeterminate(format!("{what}: {e}"))),
        }
    }

    /// Applies a write to a table through its Raft group.
    async fn write_local(
        &self,
        table: &str,
        cmd: TableCommand,
        hops: u32,
    ) -> Result<(TableReply, HeaderInfo), ApiError> {
        cmd.validate()?;
        let group = self.table_group(table, hops).await?;
        let resp = self.propose(&group, Command::Table(cmd), hops).await?;
        match resp {
            CommandResponse::Table(Ok(r)) => Ok((r, self.header(&group))),
            CommandResponse::Table(Err(e)) => Err(e.into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
        }
    }

    /// Serves a range read: linearizable through the leader's read index, or
    /// serializable from this node's applied state.
    async fn range_local(
        &self,
        table: &str,
        req: &RangeRequest,
        serializable: bool,
        hops: u32,
    ) -> Result<(RangeResponse, HeaderInfo), ApiError> {
        req.validate()?;
        let group = self.table_group(table, hops).await?;
        if self.is_follower() && req.revision > self.table_revision(group.id) {
            // A follower may not have reached a revision the client saw
            // elsewhere yet: wait briefly; past that, the read fails as a
            // future revision.
            self.wait_for_revision(group.id, req.revision, FOLLOWER_READ_WAIT).await;
        }
        if !serializable
            && !armada_core::canary::active(armada_core::canary::Canary::StaleRead)
            && !skips_read_index(req)
        {
            self.linearize(&group, hops, &format!("table {table:?}")).await?;
        }
        let store = Mvcc::new(&*self.engine, data_ns(group.id));
        // Holds at most the response limit in memory, whatever the range.
        match group.read(|| store.range_within(req, self.cfg.raft.max_response_bytes))? {
            Ok(mut r) => {
                if armada_core::canary::active(armada_core::canary::Canary::FollowerReadAhead) {
                    // The canary claims the leader's revision as the read's.
                    let lag = self.follower.get().and_then(|w| w.upgrade()).map(|f| f.lag()).unwrap_or_default();
                    r.revision = r.revision.max(lag.get(table).map_or(0, |l| l.leader_revision));
                }
                Ok((r, self.header(&group)))
            }
            Err(armada_core::mvcc::MvccError::Kv(e)) => Err(e.into()),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// A page of an `IterateRange` after its first: the key-values of
    /// `[start, end)` as of revision `rev` (the first page's), read from
    /// this node's applied state (waiting briefly if it has not reached
    /// `rev`), and whether more follow.
    pub async fn range_page(
        &self,
        table: &str,
        start: &[u8],
        end: Option<&[u8]>,
        rev: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> Result<(Vec<armada_core::kv::KeyValue>, bool), ApiError> {
        if let Some(why) = self.failure() {
            return Err(ApiError::Unavailable(format!("node {} has stopped: {why}", self.cfg.id)));
        }
        let group = self.table_group(table, 0).await?;
        if self.table_revision(group.id) < rev {
            self.wait_for_revision(group.id, rev, self.cfg.request_timeout).await;
        }
        let store = Mvcc::new(&*self.engine, data_ns(group.id));
        match group.read(|| store.page(start, end, rev, max_keys, max_bytes))? {
            Ok((kvs, more, _)) => Ok((kvs, more)),
            Err(armada_core::mvcc::MvccError::Kv(e)) => Err(e.into()),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// A backup of a table from a consistent image on this node. On the
    /// table's leader the image is taken after a read index (it holds every
    /// write acknowledged before the call); elsewhere it is this node's
    /// applied state, which may be a moment behind. The caller reads the
    /// writer at its own pace while the table keeps serving.
    pub async fn backup(&self, table: &str) -> Result<armada_core::backup::BackupWriter, ApiError> {
        armada_core::command::validate_table_name(table)?;
        let group = self.table_group(table, 0).await?;
        if self.is_leader(&group) {
            self.linearize(&group, FORWARD_HOPS_MAX, &format!("table {table:?}")).await?;
        }
        let view = group
            .read(|| armada_core::snapshot::GroupView::take_for_backup(&self.engine, group.id))?
            .map_err(|e| ApiError::Internal(format!("taking a view of table {table:?}: {e}")))?;
        armada_core::backup::BackupWriter::new(
            &view,
            table,
            self.id(),
            crate::rt::unix_time_ms(),
            self.cfg.raft.snapshot_chunk_bytes,
        )
        .map_err(|e| ApiError::Internal(format!("backup of table {table:?}: {e}")))
    }

    /// Creates a table and waits (bounded) until its group runs here.
    async fn create_table_local(&self, name: &str, hops: u32) -> Result<TableInfo, ApiError> {
        armada_core::command::validate_table_name(name)?;
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        let resp =
            self.propose(&meta, Command::Meta(MetaCommand::CreateTable { name: name.to_string() }), hops).await?;
        let info = match resp {
            CommandResponse::Meta(Ok(MetaReply::Created(info))) => info,
            CommandResponse::Meta(Err(e)) => return Err(e.into()),
            other => return Err(ApiError::Internal(format!("unexpected response {other:?}"))),
        };
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if let Some(g) = self.group(info.id) {
                if g.raft.current_leader().await.is_some() {
                    return Ok(info);
                }
            } else {
                self.sync_groups().await;
            }
            if tokio::time::Instant::now() >= deadline {
                // The creation committed (a retry gets "already exists"), but
                // the table cannot serve yet: say so rather than succeed.
                return Err(ApiError::Lagging(format!(
                    "table {name:?} was created, but its Raft group had no leader on node {} after {:?}; it will \
                     serve once the group elects one",
                    self.cfg.id, self.cfg.request_timeout
                )));
            }
            tokio::time::sleep(CATALOG_SYNC_INTERVAL).await;
        }
    }

    async fn delete_table_local(&self, name: &str, hops: u32) -> Result<TableInfo, ApiError> {
        armada_core::command::validate_table_name(name)?;
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        let resp =
            self.propose(&meta, Command::Meta(MetaCommand::DeleteTable { name: name.to_string() }), hops).await?;
        match resp {
            CommandResponse::Meta(Ok(MetaReply::Deleted(info))) => Ok(info),
            CommandResponse::Meta(Err(e)) => Err(e.into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
        }
    }

    /// Every table, as of a linearizable read of the catalog.
    async fn list_tables_local(&self, hops: u32) -> Result<Vec<TableInfo>, ApiError> {
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        self.linearize(&meta, hops, "the catalog").await?;
        self.catalog_list()
    }

    /// Applies a write to a table through its Raft group (forwarded to the
    /// group's leader when that is another node). On a follower cluster the
    /// write goes to the leader cluster, and the answer waits until this node
    /// has applied the write's revision, so the client reads its own write.
    pub async fn write(&self, table: &str, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), ApiError> {
        if let Some(up) = self.upstream.get() {
            if !cmd.is_client_write() {
                return Err(ApiError::Internal("replication commands are not client writes".into()));
            }
            cmd.validate()?;
            let group = self.table_group(table, 0).await?;
            let reply = up.write(table, cmd).await?;
            let want = reply.revision();
            let ok = armada_core::canary::active(armada_core::canary::Canary::AnswerBeforeApply)
                || self.wait_for_revision(group.id, want, self.cfg.request_timeout).await;
            if !ok {
                return Err(ApiError::Lagging(format!(
                    "the write committed at the leader cluster at revision {want}, but this follower has applied only \
                     revision {} after {:?}; retry the read later",
                    self.table_revision(group.id),
                    self.cfg.request_timeout
                )));
            }
            return Ok((reply, self.header(&group)));
        }
        self.write_internal(table, cmd).await
    }

    /// A write through this cluster's Raft group, never to the leader
    /// cluster (replication workers, and every write on a leader cluster).
    pub async fn write_internal(&self, table: &str, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), ApiError> {
        match self.execute(ClientRequest::Write { table: table.to_string(), cmd, hops: 0 }).await? {
            ClientReply::Write(r, h) => Ok((r, h)),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A range read: linearizable (through the leader's read index) or
    /// serializable (this node's applied state).
    pub async fn range(
        &self,
        table: &str,
        req: &RangeRequest,
        serializable: bool,
    ) -> Result<(RangeResponse, HeaderInfo), ApiError> {
        let r = ClientRequest::Range { table: table.to_string(), req: req.clone(), serializable, hops: 0 };
        match self.execute(r).await? {
            ClientReply::Range(r, h) => Ok((r, h)),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Creates a table; returns once its group runs on the node that
    /// applied the creation.
    pub async fn create_table(&self, name: &str) -> Result<TableInfo, ApiError> {
        self.refuse_on_follower("create")?;
        self.create_table_internal(name).await
    }

    fn refuse_on_follower(&self, what: &str) -> Result<(), ApiError> {
        if self.upstream.get().is_some() {
            return Err(ApiError::ReadOnly(format!(
                "this is a follower cluster: {what} tables on the leader cluster; they reach followers by replication"
            )));
        }
        Ok(())
    }

    /// Creates a table in this cluster's catalog (followers: the catalog
    /// replication worker).
    pub async fn create_table_internal(&self, name: &str) -> Result<TableInfo, ApiError> {
        match self.execute(ClientRequest::CreateTable { name: name.to_string(), hops: 0 }).await? {
            ClientReply::Table(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn delete_table(&self, name: &str) -> Result<TableInfo, ApiError> {
        self.refuse_on_follower("delete")?;
        self.delete_table_internal(name).await
    }

    pub async fn delete_table_internal(&self, name: &str) -> Result<TableInfo, ApiError> {
        match self.execute(ClientRequest::DeleteTable { name: name.to_string(), hops: 0 }).await? {
            ClientReply::Table(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Every table, as of a linearizable read of the catalog.
    pub async fn list_tables(&self) -> Result<Vec<TableInfo>, ApiError> {
        match self.execute(ClientRequest::ListTables { hops: 0 }).await? {
            ClientReply::Tables(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Raft and revision state of every group hosted here.
    pub fn status(&self) -> Vec<GroupStatus> {
        let lag = self.follower.get().and_then(|w| w.upgrade()).map(|f| f.lag()).unwrap_or_default();
        let now = tokio::time::Instant::now();
        let raft_snapshots = self.notifier.raft_snapshots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.groups()
            .iter()
            .map(|g| {
                let m = g.raft.metrics();
                let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
                let (state, compaction_pending) = if g.id == GroupId::META {
                    (Default::default(), false)
                } else {
                    let store = Mvcc::new(&*self.engine, data_ns(g.id));
                    (store.rev_state().unwrap_or_default(), store.compaction_pending().is_ok_and(|p| p.is_some()))
                };
                let revision = if g.id == GroupId::META { 0 } else { state.current };
                // The worker's node hears every heartbeat; the others know
                // what the last replicated batch they applied carried.
                let applied_leader_rev = self
                    .notifier
                    .leader_revisions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&g.id)
                    .copied()
                    .unwrap_or(0);
                let leader_revision = lag.get(&g.name).map_or(0, |l| l.leader_revision).max(applied_leader_rev);
                let l = lag.get(&g.name);
                let replication = l.map(|l| l.state(now)).unwrap_or_default();
                let behind_s =
                    l.and_then(|l| l.behind_since).map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
                // A stalled stream carries no news of the leader's revision,
                // so the revision lag can read 0: report the silence as lag.
                let stalled_s = match &replication {
                    crate::replication::ReplicationState::Stalled(_) => {
                        l.and_then(|l| l.silent_for(now)).map_or(0.0, |d| d.as_secs_f64())
                    }
                    _ => 0.0,
                };
                GroupStatus {
                    table: g.name.clone(),
                    leader_id: m.current_leader.unwrap_or(0),
                    term: m.current_term,
                    commit_index: m.local_committed.as_ref().map_or(0, |l| l.index),
                    last_log_index: m.last_log_index.unwrap_or(0),
                    applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
                    purged_index: m.purged.as_ref().map_or(0, |l| l.index),
                    revision,
                    compacted: state.compacted,
                    compaction_pending,
                    leader_revision,
                    lag_revisions: leader_revision.saturating_sub(revision),
                    lag_seconds: behind_s.max(stalled_s),
                    snapshots_installed: l.map_or(0, |l| l.snapshots),
                    raft_snapshots_installed: raft_snapshots.get(&g.id).copied().unwrap_or(0),
                    replication,
                }
            })
            .collect()
    }

    /// Bytes stored per table on this node (its Raft log, MVCC data and
    /// snapshots), keyed by table name.
    pub fn storage_sizes(&self) -> Vec<(String, u64)> {
        self.groups()
            .iter()
            .filter(|g| g.id != GroupId::META)
            .map(|g| {
                let lo = armada_core::raft::group_ns(g.id);
                let size = match armada_core::engine::prefix_end(&lo) {
                    Some(hi) => self.engine.approximate_size(&lo, &hi).unwrap_or(0),
                    None => 0,
                };
                (g.name.clone(), size)
            })
            .collect()
    }

    /// Makes this node part of a follower cluster whose writes go to `up`.
    pub fn set_upstream(&self, up: Arc<dyn Upstream>) {
        let _ = self.upstream.set(up);
    }

    pub fn set_follower(&self, f: std::sync::Weak<crate::replication::Follower>) {
        let _ = self.follower.set(f);
    }

    pub fn is_follower(&self) -> bool {
        self.upstream.get().is_some()
    }

    /// The table's revision as applied on this node (0 for the catalog).
    pub fn table_revision(&self, group: GroupId) -> u64 {
        if group == GroupId::META {
            return 0;
        }
        Mvcc::new(&*self.engine, data_ns(group)).rev_state().map(|s| s.current).unwrap_or(0)
    }

    /// Watches the group's applied revision (for the metadata group: its
    /// applied log index, which moves on every catalog change).
    pub fn revision_watch(&self, group: GroupId) -> crate::rt::DetReceiver<u64> {
        let mut m = self.notifier.revisions.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(group)
            .or_insert_with(|| <crate::rt::DetWatch as Watch>::channel(self.table_revision(group)).0)
            .subscribe()
    }

    /// Waits until this node has applied `revision` of the group, at most
    /// `within`. Returns whether it has.
    pub async fn wait_for_revision(&self, group: GroupId, revision: u64, within: Duration) -> bool {
        let mut rx = self.revision_watch(group);
        if self.table_revision(group) >= revision {
            return true;
        }
        let wait = async {
            loop {
                if *rx.borrow_and_update() >= revision {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        crate::rt::timeout(within, wait).await.is_ok() || self.table_revision(group) >= revision
    }

    /// Whether this node leads the group (for checkers and status).
    pub fn is_leader(&self, group: &Group) -> bool {
        let m = group.raft.metrics();
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
        m.state == ServerState::Leader
    }

    /// Stops every group (graceful shutdown).
    pub async fn shutdown(&self) {
        for g in self.groups() {
            let _ = g.raft.shutdown().await;
        }
    }
}

/// Finishes a follower snapshot swap of table group `id` that a restart
/// interrupted (see `Mvcc::recover_swap`).
fn recover_swap(engine: &dyn Engine, id: GroupId, batch_bytes: usize) -> Result<bool, armada_core::EngineError> {
    Mvcc::new(engine, armada_core::raft::data_ns(id)).recover_swap(batch_bytes, &mut |b| engine.write(b))
}

/// The query-skips-read-index canary: every range read but a plain
/// single-key one served as if serializable. Always `false` outside
/// simulation builds.
fn skips_read_index(req: &RangeRequest) -> bool {
    armada_core::canary::active(armada_core::canary::Canary::QuerySkipsReadIndex)
        && (!req.range_end.is_empty()
            || req.limit > 0
            || req.sort_order != armada_core::kv::SortOrder::None
            || req.keys_only
            || req.count_only)
}
