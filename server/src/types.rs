//! Types shared by the node runtime, the services, replication and the
//! operations endpoints: request errors, response headers and status
//! reports. A leaf module: it names nothing else of this crate.

use std::collections::BTreeMap;
use std::time::Duration;

use armada_core::command::MetaError;
use armada_core::kv::KvError;
use armada_core::{LogIndex, NodeId, Revision};
use tokio::time::Instant;
use tonic::{Code, Status};

/// A request's failure, as the service layer needs to know it. It is not
/// a wire type: between nodes it travels as `node::wire::RemoteError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// The gRPC status of a failed request on Armada's own APIs (armada.v1 and
/// replication; the etcd API answers with etcd's codes and texts).
pub fn status(e: &ApiError) -> Status {
    match e {
        ApiError::Kv(k) => match k {
            KvError::Compacted { .. } | KvError::FutureRevision { .. } => Status::out_of_range(k.to_string()),
            KvError::ResponseTooLarge { .. } => Status::resource_exhausted(k.to_string()),
            KvError::LeaseNotFound { .. } => Status::not_found(k.to_string()),
            KvError::LeaseExists { .. } => Status::already_exists(k.to_string()),
            KvError::LeaseTtlTooLarge { .. } => Status::out_of_range(k.to_string()),
            _ => Status::invalid_argument(k.to_string()),
        },
        ApiError::Meta(m) => match m {
            MetaError::TableExists(_) => Status::already_exists(m.to_string()),
            MetaError::TableNotFound(_) => Status::not_found(m.to_string()),
            MetaError::Members(e) => {
                use armada_core::members::MembersError as E;
                match e {
                    E::NotFound(_) => Status::not_found(m.to_string()),
                    E::Exists(_) | E::AddressInUse { .. } => Status::already_exists(m.to_string()),
                    E::NotRecorded => Status::unavailable(m.to_string()),
                    E::InvalidId | E::InvalidAddress(_) => Status::invalid_argument(m.to_string()),
                    _ => Status::failed_precondition(m.to_string()),
                }
            }
            _ => Status::invalid_argument(m.to_string()),
        },
        ApiError::TableNotFound(_) => Status::not_found(e.to_string()),
        ApiError::Unavailable(_) => Status::unavailable(e.to_string()),
        ApiError::Indeterminate(_) => Status::new(Code::Unknown, e.to_string()),
        ApiError::Internal(_) => Status::internal(e.to_string()),
        ApiError::ReadOnly(_) => Status::failed_precondition(e.to_string()),
        ApiError::Lagging(_) => Status::deadline_exceeded(e.to_string()),
    }
}

/// What the response header needs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct HeaderInfo {
    pub term: u64,
    pub member_id: NodeId,
}

/// Per-group state for `Cluster.Status`.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    pub table: String,
    /// The group's leader as known here.
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub commit_index: LogIndex,
    pub applied_index: LogIndex,
    /// Last log index this replica holds.
    pub last_log_index: LogIndex,
    /// Last log index purged here (covered by a snapshot); a replica behind
    /// it catches up by snapshot.
    pub purged_index: LogIndex,
    pub revision: Revision,
    /// The table's compaction revision (reads below it are refused).
    pub compacted: Revision,
    /// Whether history of a compaction is still being removed, in steps.
    pub compaction_pending: bool,
    /// Follower clusters: see [`crate::types::LagStats`].
    pub leader_revision: Revision,
    pub lag_revisions: u64,
    pub lag_seconds: f64,
    /// Snapshots this node's replication worker installed.
    pub snapshots_installed: u64,
    /// Raft snapshots this replica installed since it started (it fell
    /// behind the leader's purged log).
    pub raft_snapshots_installed: u64,
    /// Follower clusters: the health of the table's replication worker, on
    /// the node running it.
    pub replication: crate::types::ReplicationState,
}

/// A worker that has heard nothing from the leader cluster for this long
/// reports its table as stalled (status, metrics, readiness, a warning).
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

/// What a follower node knows about one table's replication.
#[derive(Debug, Clone, Default)]
pub struct LagStats {
    /// The leader cluster's latest revision, as last heard.
    pub leader_revision: Revision,
    /// Since when this follower has been behind a revision it knew of.
    pub behind_since: Option<Instant>,
    /// Snapshots installed by this node's worker.
    pub snapshots: u64,
    /// When this node's worker last heard from the leader cluster (any
    /// change-stream message, heartbeats included).
    pub last_contact: Option<Instant>,
    /// Since when this node's worker has been trying to stream (it leads
    /// the table's group here); `None` while another node runs it.
    pub active_since: Option<Instant>,
    /// The worker's last failure, cleared by the next message.
    pub last_error: Option<String>,
    /// Whether a stall has been logged (once per stall).
    pub stall_logged: bool,
}

/// Replication health of one table on the node that runs its worker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReplicationState {
    /// Another node of this cluster runs the table's worker (or this is not
    /// a follower cluster).
    #[default]
    Elsewhere,
    /// The worker started and has not heard from the leader cluster yet.
    Connecting,
    /// Messages arrive.
    Streaming,
    /// Nothing heard for [`STALLED_AFTER`]; the reason if one is known.
    Stalled(String),
}

impl ReplicationState {
    pub fn name(&self) -> &'static str {
        match self {
            ReplicationState::Elsewhere => "",
            ReplicationState::Connecting => "connecting",
            ReplicationState::Streaming => "streaming",
            ReplicationState::Stalled(_) => "stalled",
        }
    }

    /// Why replication is stalled ("" unless it is).
    pub fn error(&self) -> &str {
        match self {
            ReplicationState::Stalled(why) => why,
            _ => "",
        }
    }
}

impl LagStats {
    /// How long the worker running here has heard nothing from the leader
    /// cluster (since it started here, if it never has); `None` while it
    /// runs elsewhere.
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        let active = self.active_since?;
        let since = self.last_contact.filter(|t| *t >= active).unwrap_or(active);
        Some(now.saturating_duration_since(since))
    }

    /// The worker's health at `now`.
    pub fn state(&self, now: Instant) -> ReplicationState {
        let Some(silent) = self.silent_for(now) else { return ReplicationState::Elsewhere };
        if silent >= STALLED_AFTER {
            let why = self.last_error.clone().unwrap_or_else(|| "no message from the leader cluster".into());
            return ReplicationState::Stalled(why);
        }
        let active = self.active_since.expect("silent_for is Some only while active");
        if self.last_contact.is_some_and(|t| t >= active) {
            ReplicationState::Streaming
        } else {
            ReplicationState::Connecting
        }
    }
}

/// Replication progress of every table on a follower cluster node: written
/// by the node's replication workers, read by status reports (a value the
/// follower writes, so the node runtime never calls into replication).
#[derive(Debug, Default)]
pub struct LagBoard {
    tables: std::sync::Mutex<BTreeMap<String, LagStats>>,
}

impl LagBoard {
    /// Every table's stats, by table name.
    pub fn read(&self) -> BTreeMap<String, LagStats> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes one table's stats (created at their default on first use).
    pub fn update<T>(&self, table: &str, f: impl FnOnce(&mut LagStats) -> T) -> T {
        let mut m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(table.to_string()).or_default())
    }
}
