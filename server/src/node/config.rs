//! A node's configuration: its members and Raft tuning.

use std::collections::BTreeMap;
use std::time::Duration;

use armada_core::raft::ArmadaNode;

/// Default response limit (a client applies its own receive limit too:
/// 4 MiB by default in tonic and grpc-go, 2 GiB in etcd's Go client).
pub const MAX_RESPONSE_BYTES_DEFAULT: u64 = 48 << 20;

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
            revision_part_bytes: armada_core::mvcc::replication::BATCH_BYTES_MAX,
            compaction_step_records: armada_core::mvcc::COMPACTION_STEP_RECORDS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Every initial member (including this node, when it founds the
    /// cluster), by id.
    pub members: BTreeMap<u64, ArmadaNode>,
    pub raft: RaftTuning,
    /// How long a request may wait for a leader, a read index or a commit.
    pub request_timeout: Duration,
    /// Whether this node founds a new cluster with `members` (etcd's
    /// `--initial-cluster-state new`) or joins an existing one, whose
    /// leader adds it (`existing`): such a node never initialises a group.
    pub bootstrap: bool,
    /// This node's client addresses as it publishes them to the members
    /// record (MemberList).
    pub client_addrs: ClientAddrs,
}

/// Where clients reach a node ("" when not known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAddrs {
    pub api: String,
    pub etcd: String,
}

impl NodeConfig {
    /// A founding member's configuration with default tuning choices left
    /// to the caller.
    pub fn founding(id: u64, members: BTreeMap<u64, ArmadaNode>, raft: RaftTuning, request_timeout: Duration) -> Self {
        NodeConfig { id, members, raft, request_timeout, bootstrap: true, client_addrs: ClientAddrs::default() }
    }
}

impl NodeConfig {
    pub fn me(&self) -> Option<&ArmadaNode> {
        self.members.get(&self.id)
    }
}
