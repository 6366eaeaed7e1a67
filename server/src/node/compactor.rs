//! Automatic compaction on a leader cluster: drives
//! [`armada_core::compaction::AutoCompactor`] with the runtime's clock and
//! proposes each compaction it decides through the table's Raft group, on
//! the node that leads the table. Follower clusters do not run it: they
//! compact to the leader cluster's revision (see `replication`).
//!
//! On every cluster, [`run_steps`] finishes what each compaction leaves to
//! remove, one bounded [`TableCommand::CompactStep`] at a time.

use std::sync::Weak;
use std::time::Duration;

use crate::node::Node;
use crate::types::ApiError;
use armada_core::compaction::{AutoCompactor, Retention};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::{GroupId, TableCommand};
use tracing::{debug, info, warn};

/// Runs until the node is dropped or turns out to be a follower-cluster
/// node. Does nothing with [`Retention::Off`].
pub async fn run(node: Weak<Node>, retention: Retention) {
    let Some(tick_ms) = retention.tick_ms() else { return };
    let mut policy = AutoCompactor::new(retention);
    let start = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(tick_ms)).await;
        let Some(node) = node.upgrade() else { return };
        if node.is_follower() {
            info!(retention = %retention, "auto-compaction is off on a follower cluster: it compacts as the leader cluster does");
            return;
        }
        let now_ms = start.elapsed().as_millis() as u64;
        let groups = node.groups();
        let hosted: std::collections::BTreeSet<GroupId> = groups.iter().map(|g| g.id).collect();
        policy.retain(|id| hosted.contains(&id));
        for g in groups {
            if g.id == GroupId::META {
                continue;
            }
            // Every node samples its tables' revisions (a replica's applied
            // revision is at most the leader's, so its samples compact no
            // further), and the leader proposes: a node that just became
            // leader compacts on time instead of sampling for a whole period
            // first. With leaders changing every second or so, a table went
            // uncompacted for 25 s that way (snapshots-crash-3, seed 2).
            let Ok(state) = Mvcc::new(&**node.engine(), data_ns(g.id)).rev_state() else { continue };
            let target = policy.tick(now_ms, g.id, state.current, state.compacted);
            let Some(target) = target.filter(|_| node.is_leader(&g)) else { continue };
            match node.write_internal(&g.name, TableCommand::Compact(target)).await {
                Ok(_) => info!(table = %g.name, revision = target, retention = %retention, "auto-compacted"),
                // Compacted meanwhile by a client, or leadership moved.
                Err(ApiError::Kv(armada_core::kv::KvError::Compacted { .. })) => {}
                Err(e) => warn!(table = %g.name, revision = target, "auto-compaction failed: {e}"),
            }
        }
    }
}

/// How often each table this node leads is checked for compacted history
/// still to remove.
pub const COMPACTION_STEP_CHECK: Duration = Duration::from_millis(250);

/// Proposes [`TableCommand::CompactStep`]s for every table this node leads
/// until no compacted history is left to remove; runs until the node is
/// dropped. One step at a time through Raft, so client writes interleave
/// with a long removal and every replica removes the same records at the
/// same log entry.
pub async fn run_steps(node: Weak<Node>) {
    loop {
        tokio::time::sleep(COMPACTION_STEP_CHECK).await;
        let Some(node) = node.upgrade() else { return };
        for g in node.groups() {
            if g.id == GroupId::META {
                continue;
            }
            loop {
                let pending = Mvcc::new(&**node.engine(), data_ns(g.id)).compaction_pending();
                if !matches!(pending, Ok(Some(_))) || !node.is_leader(&g) {
                    break;
                }
                match node.write_internal(&g.name, TableCommand::CompactStep).await {
                    Ok((armada_core::command::TableReply::CompactStepped { more: true }, _)) => {}
                    Ok(_) => break,
                    Err(e) => {
                        debug!(table = %g.name, "compaction step failed (retried later): {e}");
                        break;
                    }
                }
            }
        }
    }
}
