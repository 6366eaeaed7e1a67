//! When each group builds a Raft snapshot: drives
//! [`armada_core::snapshot::BuildPolicy`] with the runtime's clock and the
//! snapshot transfers this node has in flight (openraft's own policy is off,
//! see [`crate::node`]'s Raft configuration).

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use armada_core::snapshot::BuildPolicy;
use openraft::async_runtime::WatchReceiver;
use tracing::debug;

use crate::node::Node;

/// How often every group's log is checked against the build interval.
pub const BUILD_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long a snapshot transfer that failed still holds the next build: the
/// time openraft takes to retry it, which then resumes where it stopped.
/// The hold ends sooner when the target no longer needs the snapshot (it
/// caught up some other way) or this node stops leading.
pub const RESUME_GRACE: Duration = Duration::from_secs(10);

/// The snapshot transfers one group of this node is sending, by target.
#[derive(Debug, Default)]
pub struct Transfers {
    targets: Mutex<BTreeMap<u64, Transfer>>,
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    running: bool,
    since: tokio::time::Instant,
    /// The last log index the snapshot covers.
    index: u64,
}

impl Transfers {
    /// A transfer to `target` of a snapshot up to log index `index` starts
    /// (or resumes).
    pub fn started(&self, target: u64, index: u64) {
        let now = tokio::time::Instant::now();
        self.lock().insert(target, Transfer { running: true, since: now, index });
    }

    /// The transfer to `target` ended: installed (`done`), or broken, in
    /// which case it still counts for [`RESUME_GRACE`].
    pub fn ended(&self, target: u64, done: bool) {
        let mut t = self.lock();
        if done {
            t.remove(&target);
        } else if let Some(x) = t.get_mut(&target) {
            x.running = false;
            x.since = tokio::time::Instant::now();
        }
    }

    /// Whether a transfer is running, or broke recently enough to resume
    /// and its target still needs it (`matched`: the log index a target is
    /// known to hold, on a leader; `None` when this node does not lead).
    pub fn in_flight(&self, matched: impl Fn(u64) -> Option<u64>) -> bool {
        let now = tokio::time::Instant::now();
        let mut t = self.lock();
        t.retain(|target, x| {
            let needed = matched(*target).is_some_and(|m| m < x.index);
            x.running || (needed && now.duration_since(x.since) < RESUME_GRACE)
        });
        !t.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Transfer>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds snapshots for every group of the node, until it is dropped.
pub async fn run(node: Weak<Node>, policy: BuildPolicy) {
    loop {
        tokio::time::sleep(BUILD_CHECK_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        for g in node.groups() {
            let (applied, built, matched) = {
                let m = g.raft.metrics();
                let m = m.borrow_watched();
                let matched: Option<std::collections::BTreeMap<u64, u64>> = m
                    .replication
                    .as_ref()
                    .map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index))).collect());
                (m.last_applied.map_or(0, |l| l.index), m.snapshot.map_or(0, |l| l.index), matched)
            };
            let sending =
                g.transfers.in_flight(|target| matched.as_ref().map(|m| m.get(&target).copied().unwrap_or(0)));
            if policy.should_build(applied, built, sending) {
                debug!(group = %g.id, applied, built, sending, "building a snapshot");
                let _ = g.raft.trigger().snapshot().await;
            }
        }
    }
}
