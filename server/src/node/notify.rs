//! Applied-revision notification: every group's applied revision, as a
//! watch channel, fed by the state machine's apply observer.
//!
//! Invariant: a published revision has been applied (and its reply
//! released); it never moves backwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::mvcc::Mvcc;
use armada_core::raft::{data_ns, ApplyObserver};
use armada_core::{Command, CommandResponse, GroupId, Revision, TableCommand};
use openraft::async_runtime::watch::{Watch, WatchReceiver, WatchSender};

use crate::node::Node;

/// Publishes every group's applied revision (the catalog's applied index
/// for the metadata group) to watchers, and passes applies on to the hooks'
/// observer.
pub(super) struct Notifier {
    pub(super) inner: Option<Arc<dyn ApplyObserver>>,
    /// Follower clusters: the leader cluster's revision carried by the last
    /// replicated batch applied, per group.
    pub(super) leader_revisions: std::sync::Mutex<BTreeMap<GroupId, u64>>,
    pub(super) revisions: std::sync::Mutex<BTreeMap<GroupId, crate::rt::DetSender<u64>>>,
    /// Raft snapshots installed per group since the start.
    pub(super) raft_snapshots: std::sync::Mutex<BTreeMap<GroupId, u64>>,
    /// Changes whenever the catalog may have changed (the metadata group
    /// applied an entry or installed a snapshot): the version of
    /// [`Node::catalog_cache`].
    pub(super) catalog_epoch: std::sync::atomic::AtomicU64,
    /// Every table group's leases as applied here (see `lease`).
    pub(super) lessors: std::sync::Mutex<BTreeMap<GroupId, armada_core::lease::Lessor>>,
    /// To reload a table's leases after a snapshot replaced it.
    pub(super) engine: Arc<dyn armada_core::Engine>,
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

impl Notifier {
    /// Tells the table's lessor about an applied lease command (other
    /// commands, the apply path's usual load, take no lock).
    fn lease_applied(&self, group: GroupId, cmd: &TableCommand, reply: &TableReply) {
        let with = |f: &dyn Fn(&mut armada_core::lease::Lessor)| {
            f(self.lessors.lock().unwrap_or_else(|p| p.into_inner()).entry(group).or_default())
        };
        match (cmd, reply) {
            (TableCommand::LeaseGrant { .. }, TableReply::LeaseGranted(g)) => with(&|l| l.handle_granted(g.id, g.ttl)),
            (TableCommand::LeaseRevoke { id }, TableReply::LeaseRevoked(_)) => with(&|l| l.handle_revoked(*id)),
            (TableCommand::LeaseCheckpoint(c), _) => with(&|l| l.handle_checkpointed(c)),
            _ => {}
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
        if let (Some(Command::Table(cmd)), CommandResponse::Table(Ok(reply))) = (command, response) {
            self.lease_applied(group, cmd, reply);
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
        if group != GroupId::META {
            // The table was replaced: so were its leases.
            match Mvcc::new(&*self.engine, data_ns(group)).leases() {
                Ok(leases) => {
                    let mut lessors = self.lessors.lock().unwrap_or_else(|p| p.into_inner());
                    lessors.entry(group).or_default().reload(leases);
                }
                Err(e) => tracing::error!(%group, "reading the leases of an installed snapshot: {e}"),
            }
        }
        self.publish(group, revision.unwrap_or(index));
    }

    fn wants_digest(&self) -> bool {
        // Only an outside observer (the simulator's checkers) compares
        // digests; the node itself needs revisions.
        self.inner.as_ref().is_some_and(|o| o.wants_digest())
    }
}

impl Node {
    /// The table's revision as applied on this node (0 for the catalog).
    pub fn table_revision(&self, group: GroupId) -> Revision {
        if group == GroupId::META {
            return Revision(0);
        }
        Revision(Mvcc::new(&*self.engine, data_ns(group)).rev_state().map(|s| s.current).unwrap_or(0))
    }

    /// Watches the group's applied revision (for the metadata group: its
    /// applied log index, which moves on every catalog change).
    pub fn revision_watch(&self, group: GroupId) -> crate::rt::DetReceiver<u64> {
        let mut m = self.notifier.revisions.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(group)
            .or_insert_with(|| <crate::rt::DetWatch as Watch>::channel(self.table_revision(group).get()).0)
            .subscribe()
    }

    /// Waits until this node has applied `revision` of the group, at most
    /// `within`. Returns whether it has.
    pub async fn wait_for_revision(&self, group: GroupId, revision: Revision, within: Duration) -> bool {
        let mut rx = self.revision_watch(group);
        if self.table_revision(group) >= revision {
            return true;
        }
        let wait = async {
            loop {
                if *rx.borrow_and_update() >= revision.get() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        crate::rt::timeout(within, wait).await.is_ok() || self.table_revision(group) >= revision
    }
}
