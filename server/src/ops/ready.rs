//! Readiness: whether a node serves its APIs, as `/readyz` reports it.
//!
//! A node is ready when all of these hold:
//!
//! 1. every listener is bound (the launcher says so once it has bound them
//!    all, before it serves any);
//! 2. the metadata group and every table group of the node's catalog run
//!    here, know a leader, and have applied everything known to be
//!    committed;
//! 3. the etcd table (`--etcd-table`) exists in the node's catalog, so an
//!    etcd request sent right after readiness does not fail with NotFound
//!    (a leader cluster creates it at first start; a follower cluster gets it
//!    from the leader cluster, so a follower whose etcd table the leader
//!    cluster does not have never becomes ready);
//! 4. the node is a member of the cluster's recorded membership, and not
//!    draining before it stops;
//! 5. on a follower cluster node, every table whose replication worker runs
//!    here (the node leads the table's group) has heard from the leader
//!    cluster: not "connecting", not "stalled" (nothing heard for
//!    [`crate::types::STALLED_AFTER`]).
//!
//! `/healthz` is only liveness (the process answers) and never looks at any
//! of this.
//!
//! What this does not promise: that a quorum is reachable at the moment of
//! the next request (a partition can start right after the check), or that a
//! follower is within any given lag of the leader cluster.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::node::Node;
use crate::types::ReplicationState;

/// What the readiness check needs beyond the node's own state.
#[derive(Debug)]
pub struct Readiness {
    listeners_bound: AtomicBool,
    etcd_table: Option<String>,
}

impl Readiness {
    /// `etcd_table`: the table the node's etcd API serves (`None`: no etcd
    /// API, as in the simulator).
    pub fn new(etcd_table: Option<String>) -> Self {
        Self { listeners_bound: AtomicBool::new(false), etcd_table }
    }

    /// Every listener is bound.
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::SeqCst);
    }

    /// `Ok` when the node serves its APIs; otherwise every reason it does
    /// not, one per line of `/readyz`.
    pub fn check(&self, node: &Node) -> Result<(), Vec<String>> {
        let mut waiting = Vec::new();
        if !self.listeners_bound.load(Ordering::SeqCst) {
            waiting.push("listeners are not bound yet".to_string());
        }
        if let Some(why) = node.failure() {
            waiting.push(format!("the node has stopped: {why}"));
        }
        if node.is_draining() {
            waiting.push("the node is draining: it hands over its groups before it stops".to_string());
        }
        match node.members_record() {
            Ok(Some(r)) if !r.members.contains_key(&node.id()) => waiting.push(format!(
                "node {} is not a member of the cluster (not added yet, or removed): `armada cluster member add`",
                node.id()
            )),
            _ => {}
        }
        let groups = node.status();
        let name = |t: &str| if t.is_empty() { "(catalog)".to_string() } else { format!("table {t:?}") };
        if !groups.iter().any(|g| g.table.is_empty()) {
            waiting.push("the metadata group has not started".to_string());
        }
        for g in &groups {
            if g.leader_id.is_none() {
                waiting.push(format!("{}: no Raft leader known", name(&g.table)));
            } else if g.applied_index < g.commit_index {
                waiting.push(format!(
                    "{}: applying the log ({} of {} applied)",
                    name(&g.table),
                    g.applied_index,
                    g.commit_index
                ));
            }
            match &g.replication {
                ReplicationState::Connecting => {
                    waiting.push(format!("{}: replication has not heard from the leader cluster yet", name(&g.table)))
                }
                ReplicationState::Stalled(why) => {
                    waiting.push(format!("{}: replication stalled: {why}", name(&g.table)))
                }
                ReplicationState::Elsewhere | ReplicationState::Streaming => {}
            }
        }
        match node.catalog_list() {
            Err(e) => waiting.push(format!("reading the catalog: {e}")),
            Ok(tables) => {
                for t in &tables {
                    if !groups.iter().any(|g| g.table == t.name) {
                        waiting.push(format!("table {:?}: its group has not started here", t.name));
                    }
                }
                if let Some(etcd) = &self.etcd_table {
                    if !tables.iter().any(|t| &t.name == etcd) {
                        waiting.push(format!("the etcd table {etcd:?} does not exist yet"));
                    }
                }
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting)
        }
    }
}
