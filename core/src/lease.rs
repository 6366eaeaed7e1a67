//! Leases, the etcd way: a lease is a TTL that keys are attached to; when
//! it expires (or is revoked) its keys are deleted in one revision.
//!
//! What the table stores (every replica, through Raft): each lease's id,
//! granted TTL and last *checkpointed* remaining time, and which keys are
//! attached to it (see [`crate::mvcc`]). What it does not store: when a
//! lease expires. Expiry is the business of the [`Lessor`] on the node that
//! leads the table's group, from its own clock: when a lease runs out there,
//! it proposes [`crate::TableCommand::LeaseRevoke`], an ordinary command,
//! so every replica and every follower cluster deletes the same keys at the
//! same revision. Apply never reads a clock.
//!
//! Keep-alives renew a lease in the leader's memory only (no Raft entry),
//! after the leader has confirmed its leadership with a quorum. A new
//! leader knows no deadlines: it gives every lease its checkpointed
//! remaining time, or its whole TTL, counted from its promotion. A lease
//! therefore never expires earlier than its TTL after the last acknowledged
//! keep-alive (a renewal of a lease with a checkpointed remaining time first
//! clears it through Raft, as etcd 3.4 does), and a failover makes it
//! expire later by at most the time to elect a leader plus the smaller of
//! its TTL and [`CHECKPOINT_INTERVAL`].
//!
//! Invariant: the lessor only decides while leading, and forgets every
//! deadline as soon as it stops leading.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest TTL a lease gets, in seconds (a grant asking for less gets
/// this; etcd's is 1.5 election timeouts, rounded up).
pub const LEASE_TTL_MIN: i64 = 2;
/// The longest TTL a grant may ask for, in seconds (etcd's limit).
pub const LEASE_TTL_MAX: i64 = 9_000_000_000;
/// How often the leader records remaining times of long leases, so that a
/// new leader does not restart them from their whole TTL.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// Most leases in one checkpoint entry (etcd's batch size).
pub const CHECKPOINT_BATCH_MAX: usize = 1000;

/// A lease as the table stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    /// Granted TTL, in seconds.
    pub ttl: i64,
    /// Remaining time recorded by the last checkpoint, in milliseconds; 0:
    /// none (a new leader counts the whole TTL).
    pub remaining_ms: u64,
}

/// The result of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantResponse {
    pub id: i64,
    /// The TTL granted (at least [`LEASE_TTL_MIN`]).
    pub ttl: i64,
    /// The table's revision (a grant takes none).
    pub revision: u64,
}

/// The result of a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The table's revision after it (new only if keys were deleted).
    pub revision: u64,
}

/// What a lease request that is no write asks of the leader's lessor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseQuery {
    KeepAlive { id: i64 },
    TimeToLive { id: i64, keys: bool },
    List,
}

/// The answer to a [`LeaseQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseAnswer {
    /// The lease was renewed to `ttl` seconds.
    KeptAlive {
        id: i64,
        ttl: i64,
    },
    /// `ttl`: whole seconds left; `granted`: the lease's TTL; `keys`: the
    /// attached keys, in order, when asked for.
    TimeToLive {
        id: i64,
        ttl: i64,
        granted: i64,
        keys: Vec<Vec<u8>>,
    },
    Leases(Vec<i64>),
}

/// What the lessor asks its driver to propose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEffect {
    /// The lease ran out: propose its revocation.
    Revoke(i64),
    /// Record these remaining times (milliseconds).
    Checkpoint(Vec<(i64, u64)>),
}

/// The answer of [`Lessor::renew`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: the lease now runs `ttl` seconds from `now`.
    Renewed {
        ttl: i64,
    },
    NotFound,
    /// The lease has a checkpointed remaining time: clear it through Raft
    /// (a checkpoint of 0) first, then renew.
    ClearCheckpointFirst,
    NotLeading,
}

#[derive(Debug, Clone)]
struct Tracked {
    ttl: i64,
    remaining_ms: u64,
    /// When the lease runs out, while leading; `None` until the next tick
    /// (a lease granted since) or while following.
    expiry: Option<Duration>,
    /// Its revocation is proposed and not applied yet.
    revoking: bool,
}

/// One table's leases as a node knows them, and, while the node leads the
/// table's group, their deadlines (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Lessor {
    leases: BTreeMap<i64, Tracked>,
    /// The term this node leads in, once promoted.
    leading: Option<u64>,
    next_checkpoint: Option<Duration>,
    /// Where the last checkpoint batch stopped (the next starts after it).
    checkpoint_after: i64,
}

impl Lessor {
    /// The lessor of a table whose stored leases are `leases`.
    pub fn load(leases: impl IntoIterator<Item = (i64, StoredLease)>) -> Lessor {
        let mut l = Lessor::default();
        l.reload(leases);
        l
    }

    /// Replaces what is known of the leases (the table was replaced by a
    /// snapshot). Deadlines are recomputed as after a promotion.
    pub fn reload(&mut self, leases: impl IntoIterator<Item = (i64, StoredLease)>) {
        self.leases = leases
            .into_iter()
            .map(|(id, s)| (id, Tracked { ttl: s.ttl, remaining_ms: s.remaining_ms, expiry: None, revoking: false }))
            .collect();
    }

    /// Applied: a lease was granted.
    pub fn handle_granted(&mut self, id: i64, ttl: i64) {
        self.leases.insert(id, Tracked { ttl, remaining_ms: 0, expiry: None, revoking: false });
    }

    /// Applied: a lease was revoked.
    pub fn handle_revoked(&mut self, id: i64) {
        self.leases.remove(&id);
    }

    /// Applied: remaining times were checkpointed (0 clears one).
    pub fn handle_checkpointed(&mut self, checkpoints: &[(i64, u64)]) {
        for (id, remaining) in checkpoints {
            if let Some(t) = self.leases.get_mut(id) {
                t.remaining_ms = *remaining;
            }
        }
    }

    /// This node leads the group in `term` and has applied everything
    /// committed before: from `now`, every lease runs its checkpointed
    /// remaining time or its whole TTL. Nothing changes if already leading
    /// in `term`.
    pub fn handle_leading(&mut self, now: Duration, term: u64) {
        if self.leading == Some(term) {
            return;
        }
        let refresh = !crate::canary::active(crate::canary::Canary::LeaseKeepsDeadlines);
        for t in self.leases.values_mut() {
            if refresh || t.expiry.is_none() {
                t.expiry = Some(now + full_or_remaining(t));
            }
            t.revoking = false;
        }
        self.leading = Some(term);
        self.next_checkpoint = Some(now + CHECKPOINT_INTERVAL);
    }

    /// This node does not lead the group (any more): deadlines are
    /// forgotten.
    pub fn handle_following(&mut self) {
        if self.leading.is_none() {
            return;
        }
        self.leading = None;
        self.next_checkpoint = None;
        if crate::canary::active(crate::canary::Canary::LeaseKeepsDeadlines) {
            return;
        }
        for t in self.leases.values_mut() {
            t.expiry = None;
            t.revoking = false;
        }
    }

    /// The term this node leads in, once promoted.
    pub fn leading(&self) -> Option<u64> {
        self.leading
    }

    /// A keep-alive, after this node confirmed its leadership.
    pub fn renew(&mut self, now: Duration, id: i64) -> Renewal {
        if self.leading.is_none() {
            return Renewal::NotLeading;
        }
        let Some(t) = self.leases.get_mut(&id) else { return Renewal::NotFound };
        if t.revoking || t.expiry.is_some_and(|e| e <= now) {
            // Run out: its revocation is (or is about to be) proposed.
            return Renewal::NotFound;
        }
        if t.remaining_ms != 0 {
            return Renewal::ClearCheckpointFirst;
        }
        t.expiry = Some(now + secs(t.ttl));
        Renewal::Renewed { ttl: t.ttl }
    }

    /// (granted TTL, whole seconds left) of a lease, while leading.
    pub fn time_to_live(&self, now: Duration, id: i64) -> Option<(i64, i64)> {
        let t = self.leases.get(&id)?;
        let left = t.expiry.unwrap_or(now + full_or_remaining(t)).saturating_sub(now);
        if left.is_zero() {
            return None;
        }
        Some((t.ttl, i64::try_from(left.as_secs()).unwrap_or(i64::MAX)))
    }

    /// Every lease's id, ascending.
    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// A proposed revocation failed (it may be proposed again).
    pub fn handle_revoke_failed(&mut self, id: i64) {
        if let Some(t) = self.leases.get_mut(&id) {
            t.revoking = false;
        }
    }

    /// The next thing to propose at `now`, while leading: a revocation of a
    /// lease that ran out, else a due checkpoint.
    pub fn poll_effect(&mut self, now: Duration) -> Option<LeaseEffect> {
        self.leading?;
        for t in self.leases.values_mut() {
            if t.expiry.is_none() {
                t.expiry = Some(now + full_or_remaining(t));
            }
        }
        let early = crate::canary::active(crate::canary::Canary::LeaseExpiresAtHalfTtl);
        if let Some((&id, t)) = self.leases.iter_mut().find(|(_, t)| {
            !t.revoking
                && t.expiry.is_some_and(|e| {
                    let e = if early { e.saturating_sub(secs(t.ttl) / 2) } else { e };
                    e <= now
                })
        }) {
            t.revoking = true;
            return Some(LeaseEffect::Revoke(id));
        }
        if self.next_checkpoint.is_some_and(|at| at <= now) {
            self.next_checkpoint = Some(now + CHECKPOINT_INTERVAL);
            let batch = self.checkpoint_batch(now);
            if !batch.is_empty() {
                return Some(LeaseEffect::Checkpoint(batch));
            }
        }
        None
    }

    /// Remaining times of leases that will outlive the next checkpoint
    /// (shorter ones expire before it, or restart from a TTL no longer
    /// than the interval after a failover), at most
    /// [`CHECKPOINT_BATCH_MAX`], continuing after the last batch.
    fn checkpoint_batch(&mut self, now: Duration) -> Vec<(i64, u64)> {
        let after = self.checkpoint_after;
        let due = |t: &Tracked| !t.revoking && t.expiry.is_some_and(|e| e.saturating_sub(now) > CHECKPOINT_INTERVAL);
        let mut batch: Vec<(i64, u64)> = Vec::new();
        let order = self.leases.range(after.saturating_add(1)..).chain(self.leases.range(..=after));
        for (&id, t) in order {
            if batch.len() >= CHECKPOINT_BATCH_MAX {
                break;
            }
            if due(t) {
                let left = t.expiry.map_or(0, |e| e.saturating_sub(now).as_millis());
                batch.push((id, u64::try_from(left).unwrap_or(u64::MAX).max(1)));
            }
        }
        self.checkpoint_after = batch.last().map_or(0, |(id, _)| *id);
        batch
    }

    /// When [`Lessor::poll_effect`] has something next, while leading.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.leading?;
        let expiry = self.leases.values().filter(|t| !t.revoking).filter_map(|t| t.expiry).min();
        match (expiry, self.next_checkpoint) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

fn full_or_remaining(t: &Tracked) -> Duration {
    if t.remaining_ms != 0 {
        Duration::from_millis(t.remaining_ms)
    } else {
        secs(t.ttl)
    }
}

#[cfg(test)]
mod tests;
