//! Coverage probes in the simulated world: the hook that knows which node a
//! probe fired on, the probes only the world can see (a crash right after a
//! vote or a committed index was persisted), and the probes a sweep must
//! reach.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use armada_core::probe::{self, Probe};
use madsim::task::NodeId;
use madsim::time::Instant;

/// A crash this soon after a node persisted its vote (or a committed index)
/// counts as "right after" it.
const RIGHT_AFTER: Duration = Duration::from_millis(100);

/// When each node last persisted its vote and a committed index. One run
/// per process (the sweep runs each seed in a child), so a global is safe.
static RECENT: Mutex<BTreeMap<NodeId, [Option<Instant>; 2]>> = Mutex::new(BTreeMap::new());

fn hook(p: Probe) {
    let slot = match p {
        Probe::VoteSaved => 0,
        Probe::CommittedSaved => 1,
        _ => return,
    };
    let node = madsim::plugin::node();
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).entry(node).or_default()[slot] = Some(Instant::now());
}

/// Starts counting for a run: installs the hook and clears every count.
pub fn start() {
    probe::set_hook(hook);
    let _ = probe::take();
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The world is about to crash `node`.
pub fn crashing(node: NodeId) {
    let now = Instant::now();
    let recent = RECENT.lock().unwrap_or_else(|p| p.into_inner()).remove(&node).unwrap_or_default();
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
pub const NOT_REQUIRED: &[(Probe, &str)] = &[];

/// Whether a sweep must reach `p`.
pub fn required(p: Probe) -> bool {
    !NOT_REQUIRED.iter().any(|(q, _)| *q == p)
}
