//! The node runtime: hosts the metadata group and one Raft group per table
//! on this node, keeps the set of groups in step with the table catalog, and
//! executes client requests (or says where to forward them).
//!
//! The runtime is the same in production and in simulation; only the
//! engine, the flusher's disk model and the transport differ.
//!
//! Submodules: [`config`] (members and tuning), [`group`] (group
//! lifecycle and the catalog), [`execute`] (client requests), [`forward`]
//! (to the node that leads), [`notify`] (applied revisions), [`status`],
//! [`wire`] (messages between nodes), [`raft_client`] and [`handler`]
//! (the Raft transport's outbound and inbound halves),
//! [`snapshots`] (building and sending Raft snapshots), [`compactor`], and
//! [`failstop`] (a failed write or sync stops the node).

pub mod auth;
pub mod compactor;
pub mod config;
pub mod execute;
pub mod failstop;
pub mod forward;
pub mod group;
pub mod handler;
pub mod lease;
pub mod membership;
pub mod notify;
pub mod raft_client;
pub mod snapshots;
pub mod status;
pub mod watch;
pub mod wire;

pub use config::{NodeConfig, RaftTuning, MAX_RESPONSE_BYTES_DEFAULT};
pub use forward::FORWARD_HOPS_MAX;
pub use wire::{ClientReply, ClientRequest};

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use armada_core::command::{TableInfo, TableReply};
use armada_core::raft::{ApplyObserver, ArmadaRaft, Flusher, GroupKind, StateMachine};
use armada_core::snapshot::InstallGate;
use armada_core::{Engine, GroupId, TableCommand};
use armada_net::Transport;
use openraft::ServerState;

use crate::node::forward::ForwardDedupe;
use crate::node::group::CATALOG_SYNC_INTERVAL;
use crate::node::notify::Notifier;
use crate::rt::ArmadaRt;
use crate::types::ApiError;

/// Openraft's type configuration on Armada's runtime.
pub type C = ArmadaRaft<ArmadaRt>;
pub type GroupRaft = openraft::Raft<C, StateMachine<ArmadaRt>>;

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
    pub receiving: tokio::sync::Mutex<crate::node::handler::Receiving>,
    /// Snapshot transfers this node is sending for the group.
    pub transfers: Arc<crate::node::snapshots::Transfers>,
    /// The table's recently applied revisions, decoded once for all of its
    /// watch streams on this node (see `watch`).
    pub recent: Arc<armada_core::watch::RecentRevisions>,
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

/// Optional observers the simulated world attaches to a node.
#[derive(Clone, Default)]
pub struct NodeHooks {
    pub apply_observer: Option<Arc<dyn ApplyObserver>>,
}

/// Where a follower cluster sends what only the leader cluster may do.
#[tonic::async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// Applies a write at the leader cluster; returns its reply there.
    async fn write(&self, table: &str, cmd: TableCommand) -> Result<TableReply, ApiError>;
    /// Answers a lease query at the leader cluster.
    async fn lease(
        &self,
        table: &str,
        query: armada_core::lease::LeaseQuery,
    ) -> Result<armada_core::lease::LeaseAnswer, ApiError>;
}

pub struct Node {
    cfg: NodeConfig,
    notifier: Arc<Notifier>,
    /// Set on the nodes of a follower cluster.
    upstream: std::sync::OnceLock<Arc<dyn Upstream>>,
    /// Replication progress, written by a follower cluster node's
    /// replication workers (for status reports).
    lag: Arc<crate::types::LagBoard>,
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
    stop: Arc<crate::node::failstop::FailStop>,
    /// Storage work since the node started (`/metrics`).
    io: Arc<crate::node::failstop::IoStats>,
    /// Commands proposed to Raft groups on this node (each becomes one log
    /// entry today; batching would make it more than one per entry).
    proposals: std::sync::atomic::AtomicU64,
    raft_stats: Arc<armada_core::raft::RaftStats>,
    /// Tables found in the catalog, valid while the notifier's catalog
    /// epoch is the one recorded: every request names a table, and a
    /// storage read per request to find it cost 6% of a put's CPU.
    catalog_cache: std::sync::RwLock<(u64, BTreeMap<String, TableInfo>)>,
    /// Where this node's lease clock starts (see `lease`).
    lease_origin: crate::rt::RaftInstant,
    /// Set when the node starts draining before it stops.
    draining: std::sync::atomic::AtomicBool,
    /// The applied auth state, valid while the catalog epoch is the one
    /// recorded (see `auth`).
    auth_cache: std::sync::RwLock<(u64, Arc<auth::AuthView>)>,
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
        if cfg.bootstrap && cfg.me().is_none() {
            return Err(ApiError::Internal(format!("node {} is not among the initial members", cfg.id)));
        }
        // Before anything reads the engine: check (or upgrade) the format
        // of its values.
        match armada_core::codec::open_storage(&*engine) {
            Ok(armada_core::codec::Opened::Upgraded { values }) => {
                engine.sync().map_err(|e| ApiError::Internal(format!("syncing the upgraded storage: {e}")))?;
                tracing::info!(values, "upgraded the data directory to format {}", armada_core::codec::FORMAT);
            }
            Ok(armada_core::codec::Opened::Marked { from }) => {
                engine.sync().map_err(|e| ApiError::Internal(format!("syncing the format marker: {e}")))?;
                tracing::info!("marked the format-{from} data directory as format {}", armada_core::codec::FORMAT);
            }
            Ok(_) => {}
            Err(e) => return Err(ApiError::Internal(format!("opening storage: {e}"))),
        }
        let notifier = Arc::new(Notifier {
            inner: hooks.apply_observer.clone(),
            leader_revisions: Default::default(),
            raft_snapshots: Default::default(),
            revisions: Default::default(),
            catalog_epoch: Default::default(),
            lessors: Default::default(),
            engine: engine.clone(),
        });
        // Every write and sync of the node goes through these, so the first
        // one that fails stops the node before anyone hears of it.
        let stop = Arc::new(crate::node::failstop::FailStop::default());
        let io = Arc::new(crate::node::failstop::IoStats::default());
        let engine: Arc<dyn Engine> =
            Arc::new(crate::node::failstop::FailStopEngine { inner: engine, stop: stop.clone(), stats: io.clone() });
        let flusher: Arc<dyn Flusher> =
            Arc::new(crate::node::failstop::FailStopFlusher { inner: flusher, stop: stop.clone(), stats: io.clone() });
        let node = Arc::new(Node {
            cfg,
            notifier,
            upstream: std::sync::OnceLock::new(),
            lag: Arc::default(),
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
            auth_cache: std::sync::RwLock::new((u64::MAX, Default::default())),
            lease_origin: <crate::rt::RaftInstant as openraft::Instant>::now(),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        // Only a founding member of a new cluster initialises the metadata
        // group; a node joining an existing cluster waits for its leader.
        let founding = node.cfg.bootstrap.then(|| node.cfg.members.clone());
        node.open_group(GroupId::META, String::new(), GroupKind::Meta, founding).await?;
        node.sync_groups().await;
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CATALOG_SYNC_INTERVAL).await;
                let Some(node) = weak.upgrade() else { return };
                node.sync_groups().await;
            }
        });
        tokio::spawn(crate::node::compactor::run(Arc::downgrade(&node), node.cfg.raft.auto_compaction));
        tokio::spawn(crate::node::compactor::run_steps(Arc::downgrade(&node)));
        tokio::spawn(crate::node::lease::run(Arc::downgrade(&node)));
        tokio::spawn(crate::node::membership::run(Arc::downgrade(&node)));
        tokio::spawn(crate::node::snapshots::run(
            Arc::downgrade(&node),
            armada_core::snapshot::BuildPolicy { after_logs: node.cfg.raft.snapshot_after_logs },
        ));
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// Stops serving for good (see `crate::node::failstop`): every later request
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
    pub fn io_stats(&self) -> &crate::node::failstop::IoStats {
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

    /// A staging id for a snapshot being received, unique since the start
    /// (a restart deletes staging left by the previous run).
    pub fn next_staging_id(&self) -> u64 {
        self.next_staging.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes this node part of a follower cluster whose writes go to `up`.
    pub fn set_upstream(&self, up: Arc<dyn Upstream>) {
        let _ = self.upstream.set(up);
    }

    /// Where this node's replication workers report progress.
    pub fn lag_board(&self) -> &Arc<crate::types::LagBoard> {
        &self.lag
    }

    pub fn is_follower(&self) -> bool {
        self.upstream.get().is_some()
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
