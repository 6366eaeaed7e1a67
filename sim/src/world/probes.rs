//! Coverage probes in the simulated world: the hook that knows which node a
//! probe fired on, the probes only the world can see (a crash right after a
//! vote or a committed index was persisted), and the probes a sweep must
//! reach.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use armada_core::probe::{self, Probe};
use madsim::task::NodeId;
use madsim::time::Instant;

/// A crash this soon after a node persisted its vote (or a committed index)
/// counts as "right after" it.
const RIGHT_AFTER: Duration = Duration::from_millis(100);

thread_local! {
    /// When each node last persisted its vote and a committed index. Per
    /// thread, as the probe counts: one world runs on one thread.
    static RECENT: RefCell<BTreeMap<NodeId, [Option<Instant>; 2]>> = const { RefCell::new(BTreeMap::new()) };
    /// Nodes that began a snapshot install or swap since the fault loop
    /// last looked (`faults.crash_in_install`).
    static BEGAN: RefCell<Vec<NodeId>> = const { RefCell::new(Vec::new()) };
}

fn hook(p: Probe) {
    if matches!(p, Probe::SnapshotInstallBegan | Probe::FollowerSwapBegan) {
        BEGAN.with_borrow_mut(|b| b.push(madsim::plugin::node()));
        return;
    }
    let slot = match p {
        Probe::VoteSaved => 0,
        Probe::CommittedSaved => 1,
        _ => return,
    };
    let node = madsim::plugin::node();
    RECENT.with_borrow_mut(|r| r.entry(node).or_default()[slot] = Some(Instant::now()));
}

/// Starts counting for a run: installs the hook and clears every count.
pub fn start() {
    probe::set_hook(hook);
    let _ = probe::take();
    RECENT.with_borrow_mut(|r| r.clear());
    BEGAN.with_borrow_mut(|b| b.clear());
}

/// The nodes among `ids` that began an install or swap since the last call.
pub fn take_began(ids: &[NodeId]) -> Vec<NodeId> {
    BEGAN.with_borrow_mut(|began| {
        let (mine, others): (Vec<NodeId>, Vec<NodeId>) = began.drain(..).partition(|id| ids.contains(id));
        *began = others;
        mine
    })
}

/// The world is about to crash `node`.
pub fn crashing(node: NodeId) {
    let now = Instant::now();
    let recent = RECENT.with_borrow_mut(|r| r.remove(&node)).unwrap_or_default();
    let soon = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) <= RIGHT_AFTER);
    if soon(recent[0]) {
        probe::hit(Probe::VoteSavedThenCrash);
    }
    if soon(recent[1]) {
        probe::hit(Probe::CommittedSavedThenCrash);
    }
}

/// Every probe's hits in this run, in [`Probe::ALL`] order.
pub fn finish() -> Vec<(Probe, u64)> {
    probe::take()
}

/// Probes a CI sweep need not reach yet, each with the reason; every other
/// probe is required (`sweep --require-probes`).
pub const NOT_REQUIRED: &[(Probe, &str)] = &[
    (
        Probe::ReplicatedGap,
        "a follower's worker asks from its applied revision + 1 over an ordered stream: a gap needs a stale \
         worker or a lost change-stream message, and no fault makes either yet",
    ),
    (
        Probe::ReadRacedApply,
        "a read and an apply interleave only on real threads; the simulated world runs one task at a time and \
         a read takes no await (the container fault tests reach it)",
    ),
];

/// Whether a sweep must reach `p`.
pub fn required(p: Probe) -> bool {
    !NOT_REQUIRED.iter().any(|(q, _)| *q == p)
}
