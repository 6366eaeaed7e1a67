//! Status reports: Raft, revision and replication state of every group
//! hosted here (`Cluster.Status`, `/status`, metrics).

use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::{GroupId, LogIndex, NodeId, Revision};

use crate::node::Node;
use crate::types::GroupStatus;

impl Node {
    /// Raft and revision state of every group hosted here.
    pub fn status(&self) -> Vec<GroupStatus> {
        let lag = self.lag.read();
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
                let revision = Revision(if g.id == GroupId::META { 0 } else { state.current });
                // The worker's node hears every heartbeat; the others know
                // what the last replicated batch they applied carried.
                let applied_leader_rev = self
                    .notifier
                    .leader_revisions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&g.id)
                    .copied()
                    .unwrap_or_default();
                let leader_revision =
                    lag.get(&g.name).map_or(Revision(0), |l| l.leader_revision).max(Revision(applied_leader_rev));
                let l = lag.get(&g.name);
                let replication = l.map(|l| l.state(now)).unwrap_or_default();
                let behind_s =
                    l.and_then(|l| l.behind_since).map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
                // A stalled stream carries no news of the leader's revision,
                // so the revision lag can read 0: report the silence as lag.
                let stalled_s = match &replication {
                    crate::types::ReplicationState::Stalled(_) => {
                        l.and_then(|l| l.silent_for(now)).map_or(0.0, |d| d.as_secs_f64())
                    }
                    _ => 0.0,
                };
                GroupStatus {
                    table: g.name.clone(),
                    leader_id: m.current_leader.map(NodeId),
                    term: m.current_term,
                    commit_index: LogIndex(m.local_committed.as_ref().map_or(0, |l| l.index)),
                    last_log_index: LogIndex(m.last_log_index.unwrap_or(0)),
                    applied_index: LogIndex(m.last_applied.as_ref().map_or(0, |l| l.index)),
                    purged_index: LogIndex(m.purged.as_ref().map_or(0, |l| l.index)),
                    revision,
                    compacted: Revision(state.compacted),
                    compaction_pending,
                    leader_revision,
                    lag_revisions: leader_revision.get().saturating_sub(revision.get()),
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
}
