//! When each group builds a Raft snapshot: drives
//! [`armada_core::snapshot::BuildPolicy`] with the runtime's clock and the
//! snapshot transfers this node has in flight (openraft's own policy is off,
//! see [`crate::node`]'s Raft configuration).

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use crate::node::Node;
use armada_core::snapshot::BuildPolicy;
use openraft::async_runtime::WatchReceiver;
use tracing::debug;

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
    /// The target installed the snapshot and is catching up from the log.
    installed: bool,
    since: tokio::time::Instant,
    /// The last log index the snapshot covers.
    index: u64,
}

impl Transfers {
    /// A transfer to `target` of a snapshot up to log index `index` starts
    /// (or resumes).
    pub fn started(&self, target: u64, index: u64) {
        let now = tokio::time::Instant::now();
        self.lock().insert(target, Transfer { running: true, installed: false, since: now, index });
    }

    /// The transfer to `target` ended: installed (`done`; the target then
    /// catches up from the log written meanwhile), or broken, in which case
    /// it still counts for [`RESUME_GRACE`].
    pub fn ended(&self, target: u64, done: bool) {
        let mut t = self.lock();
        if let Some(x) = t.get_mut(&target) {
            x.running = false;
            x.installed = done;
            x.since = tokio::time::Instant::now();
        }
    }

    /// Whether the next build must wait: a transfer is running; or broke
    /// recently enough to resume and its target still needs it; or its
    /// target installed it but is still more than `keep` entries behind
    /// `applied` (a build now would purge the log it is catching up from:
    /// a 4 GB transfer under writes left 230,000 entries to apply, and the
    /// build that followed the install purged them). `matched` is the log
    /// index a target is known to hold, on a leader; `None` when this node
    /// does not lead.
    pub fn hold(&self, matched: impl Fn(u64) -> Option<u64>, applied: u64, keep: u64) -> bool {
        let now = tokio::time::Instant::now();
        let mut t = self.lock();
        t.retain(|target, x| {
            let m = matched(*target);
            if x.running {
                true
            } else if x.installed {
                m.is_some_and(|m| m.saturating_add(keep) < applied)
            } else {
                m.is_some_and(|m| m < x.index) && now.duration_since(x.since) < RESUME_GRACE
            }
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
            let keep = node.config().raft.logs_kept_after_snapshot;
            let sending = g.transfers.hold(
                |target| matched.as_ref().map(|m| m.get(&target).copied().unwrap_or(0)),
                applied,
                keep,
            );
            if policy.should_build(applied, built, sending) {
                debug!(group = %g.id, applied, built, sending, "building a snapshot");
                let _ = g.raft.trigger().snapshot().await;
            }
        }
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_build_waits_for_a_transfer_and_for_its_target_to_catch_up() {
        let t = Transfers::default();
        let behind = |m: u64| move |_| Some(m);
        assert!(!t.hold(behind(0), 1_000, 100), "nothing sent: no hold");
        t.started(3, 500);
        assert!(t.hold(behind(0), 1_000, 100), "held while the transfer runs");
        t.ended(3, true);
        assert!(t.hold(behind(500), 1_000, 100), "installed at 500, the log after it is still needed");
        assert!(t.hold(behind(899), 1_000, 100));
        assert!(!t.hold(behind(900), 1_000, 100), "within `keep` of the leader: released");
        assert!(!t.hold(behind(0), 1_000, 100), "and forgotten");
        t.started(2, 500);
        t.ended(2, false);
        assert!(t.hold(behind(10), 1_000, 100), "broken: held for a resume while the target needs it");
        assert!(!t.hold(behind(600), 1_000, 100), "the target caught up some other way");
        t.started(2, 500);
        t.ended(2, false);
        assert!(!t.hold(|_| None, 1_000, 100), "this node no longer leads");
    }
}
