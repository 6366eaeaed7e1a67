//! Scenario files: the topology, workload, fault mix and duration of a
//! simulated run. The seed picks everything else.

use std::path::Path;

use serde::Deserialize;

fn d_interval() -> [u64; 2] {
    [300, 1500]
}
fn d_latency() -> [u64; 2] {
    [1, 5]
}
fn d_downtime() -> [u64; 2] {
    [200, 3000]
}

/// Relative weights of client operations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub put: u32,
    #[serde(default)]
    pub get: u32,
    #[serde(default)]
    pub serializable_get: u32,
    #[serde(default)]
    pub delete: u32,
    #[serde(default)]
    pub cas: u32,
    #[serde(default)]
    pub range: u32,
    #[serde(default)]
    pub read_at_revision: u32,
    /// Compaction at a revision the client saw.
    #[serde(default)]
    pub compact: u32,
    /// One transaction that puts `put_many_keys` keys at once: a revision
    /// with many mutations (split into parts on the follower stream when
    /// larger than `revision_part_bytes`).
    #[serde(default)]
    pub put_many: u32,
    #[serde(default = "d_put_many_keys")]
    pub put_many_keys: u32,
    /// A txn that puts if the key's mod revision is one this client saw
    /// (etcd clients' optimistic-concurrency pattern).
    #[serde(default)]
    pub cas_mod_revision: u32,
    /// A txn that puts if the key is absent, by `version == 0` or
    /// `create_revision == 0` (etcd's lock and election recipes).
    #[serde(default)]
    pub cas_absent: u32,
    /// One DeleteRange over `delete_range_keys` consecutive keys.
    #[serde(default)]
    pub delete_range: u32,
    #[serde(default = "d_delete_range_keys")]
    pub delete_range_keys: u32,
    /// A put asking for the key's previous version (`prev_kv`).
    #[serde(default)]
    pub put_prev_kv: u32,
    /// A range read with random options: one key, a prefix, an open or a
    /// bounded interval; a limit; count only; keys only; every sort order
    /// and target; at the latest revision or one the client saw;
    /// serializable or not (checked whole by M2).
    #[serde(default)]
    pub query: u32,
    /// The first `readers` clients only read (the read kinds above, by
    /// their weights) and each stays on one node, client `i` on node
    /// `i % nodes + 1`, as an application reading near one replica does;
    /// the other clients then only write.
    /// Such a client's revisions only go back if its node's do, so S3
    /// (per client) cannot see a stale answer that follows another
    /// client's write; S1 (real time across clients) can.
    #[serde(default)]
    pub readers: u32,
}

fn d_delete_range_keys() -> u32 {
    3
}

fn d_put_many_keys() -> u32 {
    8
}

impl Workload {
    /// The operation weights in the order the clients draw them. New kinds
    /// go last: with a weight of 0 they leave older scenarios' random
    /// draws, and so their runs, unchanged.
    pub fn weights(&self) -> [u32; 14] {
        [
            self.put,
            self.get,
            self.serializable_get,
            self.delete,
            self.cas,
            self.range,
            self.read_at_revision,
            self.compact,
            self.put_many,
            self.cas_mod_revision,
            self.cas_absent,
            self.delete_range,
            self.put_prev_kv,
            self.query,
        ]
    }

    /// The weights client `cid` draws from: with `readers`, a reader's
    /// keep only the reads, a writer's only the writes (and compaction);
    /// all of them when that leaves none.
    pub fn weights_of(&self, cid: u32) -> [u32; 14] {
        const READS: [usize; 5] = [1, 2, 5, 6, 13];
        let mut w = self.weights();
        if self.readers == 0 {
            return w;
        }
        let reader = cid < self.readers;
        for (i, x) in w.iter_mut().enumerate() {
            if READS.contains(&i) != reader {
                *x = 0;
            }
        }
        if w.iter().all(|&x| x == 0) {
            return self.weights();
        }
        w
    }
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            put: 4,
            get: 4,
            serializable_get: 1,
            delete: 1,
            cas: 2,
            range: 1,
            read_at_revision: 1,
            compact: 0,
            put_many: 0,
            put_many_keys: d_put_many_keys(),
            cas_mod_revision: 0,
            cas_absent: 0,
            delete_range: 0,
            delete_range_keys: d_delete_range_keys(),
            put_prev_kv: 0,
            query: 0,
            readers: 0,
        }
    }
}

/// Relative weights of faults, and their ranges. All zero: a calm run.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    #[serde(default)]
    pub crash: u32,
    #[serde(default)]
    pub pause: u32,
    #[serde(default)]
    pub partition: u32,
    #[serde(default)]
    pub one_way: u32,
    #[serde(default)]
    pub isolate: u32,
    #[serde(default)]
    pub loss: u32,
    /// Swizzle-clog: clog a random subset of nodes one at a time, then
    /// unclog them in reverse order.
    #[serde(default)]
    pub swizzle: u32,
    /// Simulated ms between fault steps.
    #[serde(default = "d_interval")]
    pub interval_ms: [u64; 2],
    /// One-way network latency range (ms); the spread causes reordering.
    #[serde(default = "d_latency")]
    pub latency_ms: [u64; 2],
    /// Packet loss rate while a `loss` fault is active.
    #[serde(default)]
    pub loss_rate: f64,
    /// Probability that a Raft request is delivered twice.
    #[serde(default)]
    pub duplicate_rate: f64,
    /// Extra time each fsync takes (ms range).
    #[serde(default)]
    pub fsync_ms: [u64; 2],
    /// How long a crashed or paused node stays down (ms range).
    #[serde(default = "d_downtime")]
    pub downtime_ms: [u64; 2],
    /// R5 (heal disruption): when non-zero, after an isolated node is let
    /// back in (and nothing else is down), the fault loop waits this many
    /// simulated ms before its next fault and checks that every group that
    /// had a leader among the other nodes still has that leader in the same
    /// term. 0: off.
    #[serde(default)]
    pub heal_watch_ms: u64,
    /// Percent chance that a node beginning to copy a snapshot into place
    /// (a Raft install, or a follower cluster's swap) is crashed right
    /// there (within a simulated ms), for `downtime_ms`. 0: off.
    #[serde(default)]
    pub crash_in_install: u32,
    /// Weight of a failed disk: for `downtime_ms`, one node's writes fail
    /// (an I/O error), or its syncs fail (a failed fsync), or both (a full
    /// disk). The node must stop serving, never acknowledge what it could
    /// not make durable, and recover from what it synced when restarted
    /// (see `world::disk`, check D1).
    #[serde(default)]
    pub disk_error: u32,
    /// Weight of a slow disk: for `downtime_ms`, each sync of one node takes
    /// `slow_disk_ms` more (long values are stalls).
    #[serde(default)]
    pub slow_disk: u32,
    #[serde(default = "d_slow_disk")]
    pub slow_disk_ms: [u64; 2],
    /// Percent of crashes that are torn: the disk keeps a seeded number of
    /// the batches written since the last sync (whole batches, oldest
    /// first) instead of none.
    #[serde(default)]
    pub torn_crash: u32,
    /// Weight of a clock fault: for `downtime_ms`, one node's Raft clock
    /// (election and heartbeat timers, leader leases) runs at a rate drawn
    /// from `clock_rate_ppm` (millionths of real time), and half the time
    /// first jumps forward by `clock_jump_ms`; then it runs at real time
    /// again (a clock never goes back).
    #[serde(default)]
    pub clock: u32,
    #[serde(default = "d_clock_rate")]
    pub clock_rate_ppm: [u64; 2],
    #[serde(default = "d_clock_jump")]
    pub clock_jump_ms: [u64; 2],
}

fn d_slow_disk() -> [u64; 2] {
    [20, 1500]
}

fn d_clock_rate() -> [u64; 2] {
    [500_000, 2_000_000]
}

fn d_clock_jump() -> [u64; 2] {
    [100, 3000]
}

/// Follower clusters and the WAN between them and the leader cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Followers {
    /// Follower clusters, each streaming every table from the leader cluster.
    pub clusters: u32,
    /// Nodes per follower cluster.
    #[serde(default = "d_three")]
    pub nodes: u32,
    /// Clients per follower cluster; each sticks to one follower node.
    #[serde(default)]
    pub clients: u32,
    /// Workload weights of follower clients: forwarded puts, linearizable
    /// (within the follower cluster) and serializable reads.
    #[serde(default = "d_one")]
    pub put: u32,
    #[serde(default = "d_one")]
    pub get: u32,
    #[serde(default = "d_one")]
    pub serializable_get: u32,
    /// One-way WAN delay between clusters (ms range, per message).
    #[serde(default = "d_wan")]
    pub wan_latency_ms: [u64; 2],
    /// Relative weights of WAN faults: partition a follower cluster from the
    /// leader cluster, a delay spike, reset every WAN connection of a follower
    /// cluster, crash every node of a follower cluster at once (and
    /// `asymmetry`, below).
    #[serde(default)]
    pub partition: u32,
    #[serde(default)]
    pub delay: u32,
    #[serde(default)]
    pub reset: u32,
    #[serde(default)]
    pub cluster_crash: u32,
    /// Weight of WAN asymmetry: one direction of a follower cluster's WAN
    /// (to or from the leader cluster) stalls or slows down while the other
    /// flows.
    #[serde(default)]
    pub asymmetry: u32,
    /// Simulated ms between WAN fault steps.
    #[serde(default = "d_interval")]
    pub interval_ms: [u64; 2],
    /// How long a WAN fault lasts (ms range).
    #[serde(default = "d_downtime")]
    pub fault_ms: [u64; 2],
    /// Changelog revisions the leader cluster keeps; small values make
    /// followers that fall behind install snapshots.
    #[serde(default = "d_retention")]
    pub history_retention: u64,
    /// The last follower cluster starts this many simulated seconds late
    /// (0: with the others), so it may have to bootstrap from a snapshot.
    #[serde(default)]
    pub late_start_s: u64,
    /// Extra time each fsync takes on follower-cluster nodes (ms range);
    /// unset: as `faults.fsync_ms` (see [`Scenario::fsync_ms`]).
    #[serde(default)]
    pub fsync_ms: Option<[u64; 2]>,
    /// Bound, in simulated seconds, for every follower to reach the leader's
    /// state after faults heal.
    #[serde(default = "d_liveness")]
    pub liveness_s: u64,
}

fn d_three() -> u32 {
    3
}
fn d_one() -> u32 {
    1
}
fn d_wan() -> [u64; 2] {
    [20, 20]
}
fn d_retention() -> u64 {
    armada_core::mvcc::replication::CHANGELOG_RETENTION_DEFAULT
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub nodes: u32,
    pub tables: u32,
    pub clients: u32,
    pub keys: u32,
    /// Simulated seconds of workload (with faults).
    pub duration_s: u64,
    /// Bound, in simulated seconds, for the cluster to recover after faults.
    #[serde(default = "d_liveness")]
    pub liveness_s: u64,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub faults: Faults,
    /// Raft snapshot threshold (entries); small values exercise snapshots.
    #[serde(default = "d_snapshot")]
    pub snapshot_after_logs: u64,
    /// Bytes per chunk of a streamed Raft snapshot; small, so that the
    /// simulator's small tables still stream in many chunks.
    #[serde(default = "d_chunk")]
    pub snapshot_chunk_bytes: usize,
    /// Automatic compaction on the leader cluster, periodic mode: keep this
    /// many simulated ms of history (0: off).
    #[serde(default)]
    pub auto_compaction_ms: u64,
    /// Online backups taken while the workload runs (spread over the run),
    /// each restored into a fresh engine and checked against the source at
    /// its revision (B1).
    #[serde(default)]
    pub backups: u32,
    /// Follower clusters (none by default).
    #[serde(default)]
    pub followers: Option<Followers>,
    /// A revision larger than this goes to follower clusters in parts of
    /// about this size (0: the production default).
    #[serde(default)]
    pub revision_part_bytes: usize,
    /// History records one compaction step removes at most (0: the
    /// production default); small, so that compactions of the simulator's
    /// small tables take many steps with writes and faults between them.
    #[serde(default)]
    pub compaction_step_records: usize,
    /// When non-zero, a table named [`CHURN_TABLE`] is created, written
    /// (three keys), deleted and created again every this many simulated ms
    /// while the workload runs, so follower clusters see tables deleted and
    /// re-created under the same name while they stream. It ends created
    /// and written, and R4 requires every follower to end with its state.
    #[serde(default)]
    pub table_churn_ms: u64,
    /// Clients that watch the etcd table through the etcd Watch API, moving
    /// between the leader cluster's nodes and resuming where they left off
    /// (W1 checks every event they see).
    #[serde(default)]
    pub watchers: u32,
    /// Clients that grant leases on the etcd table, put keys on them, keep
    /// them alive at random nodes (follower clusters' too) and revoke them
    /// or let them run out (L1 checks every revocation).
    #[serde(default)]
    pub leases: u32,
    /// etcd users: an admin sets authentication up and keeps changing
    /// users' roles and permissions; two clients per user log in at random
    /// nodes and read and write with their tokens (A1 checks every
    /// permission decision). Watchers and lease clients use the etcd API
    /// anonymously, so they cannot run with it.
    #[serde(default)]
    pub auth_users: u32,
    /// Nodes of the leader cluster that start outside it (joining an
    /// existing cluster): the membership driver adds them as voters while
    /// faults run, then removes as many founding nodes (3 + 2 spare: the
    /// cluster goes 3 -> 5 -> 3), and C1 checks the changes.
    #[serde(default)]
    pub spare_nodes: u32,
}

/// The table [`Scenario::table_churn_ms`] deletes and re-creates (no client
/// of the workload uses it).
pub const CHURN_TABLE: &str = "churn";

fn d_liveness() -> u64 {
    30
}
fn d_snapshot() -> u64 {
    500
}
fn d_chunk() -> usize {
    256
}

/// Largest simulated cluster, clients and key set accepted.
pub const NODES_MAX: u32 = 7;
pub const CLIENTS_MAX: u32 = 200;
pub const KEYS_MAX: u32 = 1000;
pub const TABLES_MAX: u32 = 64;
pub const FOLLOWER_CLUSTERS_MAX: u32 = 8;

impl Faults {
    /// The sum of the fault weights (0: a calm world).
    pub fn total(&self) -> u32 {
        self.crash
            + self.pause
            + self.partition
            + self.one_way
            + self.isolate
            + self.loss
            + self.swizzle
            + self.disk_error
            + self.slow_disk
            + self.clock
            + self.crash_in_install
    }
}

impl Scenario {
    /// The fsync delay range of the nodes of `cluster` (0: the leader
    /// cluster; follower clusters may have their own).
    /// Every node id of the leader cluster: founding and spare.
    pub fn all_nodes(&self) -> u64 {
        u64::from(self.nodes + self.spare_nodes)
    }

    pub fn fsync_ms(&self, cluster: u64) -> [u64; 2] {
        match &self.followers {
            Some(fl) if cluster > 0 => fl.fsync_ms.unwrap_or(self.faults.fsync_ms),
            _ => self.faults.fsync_ms,
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
        s.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=NODES_MAX).contains(&self.nodes) {
            return Err(format!("nodes must be 1..={NODES_MAX}"));
        }
        if !(1..=TABLES_MAX).contains(&self.tables) {
            return Err(format!("tables must be 1..={TABLES_MAX}"));
        }
        if !(1..=CLIENTS_MAX).contains(&self.clients) {
            return Err(format!("clients must be 1..={CLIENTS_MAX}"));
        }
        if self.watchers > CLIENTS_MAX {
            return Err(format!("watchers must be at most {CLIENTS_MAX}"));
        }
        if self.leases > CLIENTS_MAX {
            return Err(format!("leases must be at most {CLIENTS_MAX}"));
        }
        if self.auth_users > CLIENTS_MAX / 2 {
            return Err(format!("auth_users must be at most {}", CLIENTS_MAX / 2));
        }
        if self.auth_users > 0 && (self.watchers > 0 || self.leases > 0) {
            return Err(
                "auth_users cannot be combined with watchers or leases (they use the etcd API anonymously)".into()
            );
        }
        if !(1..=KEYS_MAX).contains(&self.keys) {
            return Err(format!("keys must be 1..={KEYS_MAX}"));
        }
        if self.duration_s == 0 {
            return Err("duration_s must be positive".into());
        }
        let f = &self.faults;
        for (name, r) in [
            ("interval_ms", f.interval_ms),
            ("latency_ms", f.latency_ms),
            ("fsync_ms", f.fsync_ms),
            ("downtime_ms", f.downtime_ms),
            ("slow_disk_ms", f.slow_disk_ms),
            ("clock_rate_ppm", f.clock_rate_ppm),
            ("clock_jump_ms", f.clock_jump_ms),
        ] {
            if r[0] > r[1] {
                return Err(format!("faults.{name}: lower bound above upper bound"));
            }
        }
        if !(0.0..=1.0).contains(&f.loss_rate) || !(0.0..=1.0).contains(&f.duplicate_rate) {
            return Err("faults rates must be within 0..=1".into());
        }
        if f.torn_crash > 100 || f.crash_in_install > 100 {
            return Err("faults.torn_crash and faults.crash_in_install are percentages (0..=100)".into());
        }
        if let Some(fl) = &self.followers {
            if !(1..=FOLLOWER_CLUSTERS_MAX).contains(&fl.clusters) {
                return Err(format!("followers.clusters must be 1..={FOLLOWER_CLUSTERS_MAX}"));
            }
            if !(1..=NODES_MAX).contains(&fl.nodes) {
                return Err(format!("followers.nodes must be 1..={NODES_MAX}"));
            }
            if fl.clients > CLIENTS_MAX {
                return Err(format!("followers.clients must be at most {CLIENTS_MAX}"));
            }
            for (name, r) in [
                ("wan_latency_ms", fl.wan_latency_ms),
                ("interval_ms", fl.interval_ms),
                ("fault_ms", fl.fault_ms),
                ("fsync_ms", self.fsync_ms(1)),
            ] {
                if r[0] > r[1] {
                    return Err(format!("followers.{name}: lower bound above upper bound"));
                }
            }
            if fl.history_retention == 0 {
                return Err("followers.history_retention must be positive".into());
            }
            if fl.clients > 0 && fl.put + fl.get + fl.serializable_get == 0 {
                return Err("followers workload weights are all zero".into());
            }
        }
        if self.workload.weights().iter().map(|w| u64::from(*w)).sum::<u64>() == 0 {
            return Err("workload weights are all zero".into());
        }
        Ok(())
    }
}

/// Every `*.toml` under the given files or directories, sorted.
pub fn collect(paths: &[String]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let path = Path::new(p);
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            entries.sort();
            out.extend(entries);
        } else {
            out.push(path.to_path_buf());
        }
    }
    if out.is_empty() {
        anyhow::bail!("no scenario files found in {paths:?}");
    }
    Ok(out)
}
