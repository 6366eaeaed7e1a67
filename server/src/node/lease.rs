//! Leases on this node: the driver of each table's
//! [`armada_core::lease::Lessor`] (promoting it when this node leads the
//! table's group, proposing the revocations and checkpoints it decides),
//! and the lease queries (keep-alive, time to live, list) that only the
//! table's leader answers.
//!
//! Every replica's lessor learns grants, revocations and checkpoints as they
//! apply (see `notify`); only the leader's holds deadlines, counted on its
//! Raft clock. A follower cluster sends lease queries to the leader cluster,
//! like its writes.
//!
//! Invariant: a keep-alive is acknowledged only after this node confirmed
//! with a quorum that it leads the group (a read index), so a deposed leader
//! never renews a lease that the new leader does not know was renewed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::kv::KvError;
use armada_core::lease::{LeaseAnswer, LeaseEffect, LeaseQuery, Lessor, Renewal};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::{Command, CommandResponse, GroupId, TableCommand};
use tracing::{debug, warn};

use crate::node::forward::Miss;
use crate::node::wire::{ClientReply, ClientRequest};
use crate::node::{Group, Node};
use crate::types::{ApiError, HeaderInfo};

/// Longest the lease driver sleeps: how soon it notices that this node
/// started or stopped leading a table (a revocation waits at most this
/// beyond its deadline).
pub const LEASE_TICK: Duration = Duration::from_millis(100);

/// Renewals a keep-alive tries when checkpoints keep intervening.
const RENEW_ATTEMPTS: usize = 3;

impl Node {
    /// The lessor of a table group, loaded from the table's stored leases
    /// the first time (before the group's Raft starts).
    pub(super) fn load_lessor(&self, group: GroupId) -> Result<(), ApiError> {
        let leases = Mvcc::new(&*self.engine, data_ns(group))
            .leases()
            .map_err(|e| ApiError::Internal(format!("group {group}: reading its leases: {e}")))?;
        self.notifier.lessors.lock().unwrap_or_else(|p| p.into_inner()).insert(group, Lessor::load(leases));
        Ok(())
    }

    /// Runs `f` on the lessor of `group` (a fresh one if none was loaded).
    pub(super) fn with_lessor<T>(&self, group: GroupId, f: impl FnOnce(&mut Lessor) -> T) -> T {
        let mut m = self.notifier.lessors.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(group).or_default())
    }

    /// This node's lease clock (its Raft clock) since the node started.
    pub(super) fn lease_now(&self) -> Duration {
        openraft::Instant::elapsed(&self.lease_origin)
    }

    /// A lease query, answered by the lessor of the table's leader (on a
    /// follower cluster: the leader cluster's).
    pub async fn lease(&self, table: &str, query: LeaseQuery) -> Result<(LeaseAnswer, HeaderInfo), ApiError> {
        if let Some(up) = self.upstream.get() {
            let group = self.table_group(table).await?;
            let answer = up.lease(table, query).await?;
            return Ok((answer, self.header(&group)));
        }
        match self.execute(ClientRequest::Lease { table: table.to_string(), query, hops: 0 }).await? {
            ClientReply::Lease(a, h) => Ok((a, h)),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Serves a lease query here if this node leads the table's group.
    pub(super) async fn lease_local(
        &self,
        table: &str,
        query: &LeaseQuery,
        hops: u32,
    ) -> Result<(LeaseAnswer, HeaderInfo), Miss> {
        let group = self.routed_table_group(table, hops).await?;
        let what = format!("table {table:?}");
        for _ in 0..RENEW_ATTEMPTS {
            // Confirms the leadership with a quorum, and that everything
            // committed before (grants, revocations, checkpoints) applied here.
            self.linearize(&group, hops, &what).await?;
            let term = self.leading_term(&group).ok_or_else(|| {
                Miss::Failed(ApiError::Unavailable(format!("{what}: leadership moved during a lease request")))
            })?;
            let now = self.lease_now();
            let answer = self.with_lessor(group.id, |l| {
                l.handle_leading(now, term);
                match query {
                    LeaseQuery::KeepAlive { id } => match l.renew(now, *id) {
                        Renewal::Renewed { ttl } => Ok(Some(LeaseAnswer::KeptAlive { id: *id, ttl })),
                        Renewal::NotFound => Err(Miss::from(KvError::LeaseNotFound { id: *id })),
                        Renewal::ClearCheckpointFirst => Ok(None),
                        Renewal::NotLeading => Err(Miss::Failed(ApiError::Unavailable(format!("{what}: not leading")))),
                    },
                    LeaseQuery::TimeToLive { id, .. } => match l.time_to_live(now, *id) {
                        Some((granted, ttl)) => {
                            Ok(Some(LeaseAnswer::TimeToLive { id: *id, ttl, granted, keys: Vec::new() }))
                        }
                        None => Err(Miss::from(KvError::LeaseNotFound { id: *id })),
                    },
                    LeaseQuery::List => Ok(Some(LeaseAnswer::Leases(l.ids()))),
                }
            })?;
            match answer {
                Some(LeaseAnswer::TimeToLive { id, ttl, granted, .. }) => {
                    let keys = match query {
                        LeaseQuery::TimeToLive { keys: true, .. } => {
                            let store = Mvcc::new(&*self.engine, data_ns(group.id));
                            group
                                .read(|| store.lease_keys(id))?
                                .map_err(|e| Miss::Failed(ApiError::Internal(e.to_string())))?
                        }
                        _ => Vec::new(),
                    };
                    return Ok((LeaseAnswer::TimeToLive { id, ttl, granted, keys }, self.header(&group)));
                }
                Some(a) => return Ok((a, self.header(&group))),
                None => {
                    // A renewal of a lease with a checkpointed remaining time:
                    // clear it through Raft first, so that a new leader counts
                    // the whole TTL from its promotion (etcd 3.4 does the same).
                    let LeaseQuery::KeepAlive { id } = query else { unreachable!("only renewals clear") };
                    let cmd = Command::Table(TableCommand::LeaseCheckpoint(vec![(*id, 0)]));
                    match self.propose(&group, cmd, hops).await? {
                        CommandResponse::Table(Ok(_)) => {}
                        CommandResponse::Table(Err(e)) => return Err(e.into()),
                        other => return Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
                    }
                }
            }
        }
        Err(ApiError::Unavailable(format!("{what}: the lease's checkpoint kept changing; retry")).into())
    }

    /// The term this node leads the group in, if it leads.
    fn leading_term(&self, group: &Group) -> Option<u64> {
        let m = group.raft.metrics();
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
        (m.state == openraft::ServerState::Leader && m.current_leader == Some(self.cfg.id)).then_some(m.current_term)
    }
}

/// Drives every table's lessor on this node until the node is dropped: a
/// lessor is promoted once this node leads the table's group (after a read
/// index, so that it knows every lease committed before), demoted when it
/// stops, and what it decides is proposed here, never forwarded (a
/// revocation decided by a deposed leader must not commit elsewhere).
pub async fn run(node: Weak<Node>) {
    loop {
        let next = {
            let Some(node) = node.upgrade() else { return };
            drive(&node).await
        };
        tokio::time::sleep(next.min(LEASE_TICK)).await;
    }
}

/// One round over the tables; returns how long until the next deadline.
async fn drive(node: &Arc<Node>) -> Duration {
    if node.is_follower() || node.failure().is_some() {
        return LEASE_TICK;
    }
    let mut next = LEASE_TICK;
    for g in node.groups() {
        if g.id == GroupId::META {
            continue;
        }
        let Some(term) = node.leading_term(&g) else {
            node.with_lessor(g.id, Lessor::handle_following);
            continue;
        };
        if node.with_lessor(g.id, |l| l.is_empty() && l.leading() != Some(term)) {
            // Nothing to decide: promote lazily, when a lease appears.
            continue;
        }
        if node.with_lessor(g.id, |l| l.leading() != Some(term)) {
            if let Err(e) = node.linearize(&g, crate::node::FORWARD_HOPS_MAX, "leases").await {
                debug!(group = %g.id, "lease promotion waits: {e:?}");
                continue;
            }
            let now = node.lease_now();
            node.with_lessor(g.id, |l| l.handle_leading(now, term));
        }
        let now = node.lease_now();
        while let Some(effect) = node.with_lessor(g.id, |l| l.poll_effect(now)) {
            let node = node.clone();
            let g = g.clone();
            // Proposed concurrently: a revocation must not wait for another.
            tokio::spawn(async move { perform(&node, &g, effect).await });
        }
        if let Some(at) = node.with_lessor(g.id, |l| l.poll_timeout()) {
            next = next.min(at.saturating_sub(node.lease_now()));
        }
    }
    next.max(Duration::from_millis(1))
}

async fn perform(node: &Node, g: &Group, effect: LeaseEffect) {
    let (cmd, revoked) = match effect {
        LeaseEffect::Revoke(id) => (TableCommand::LeaseRevoke { id }, Some(id)),
        LeaseEffect::Checkpoint(c) => (TableCommand::LeaseCheckpoint(c), None),
    };
    // Never forwarded: hops at the limit.
    match node.propose(g, Command::Table(cmd), crate::node::FORWARD_HOPS_MAX).await {
        Ok(CommandResponse::Table(Ok(TableReply::LeaseRevoked(r)))) => {
            debug!(table = %g.name, lease = revoked, revision = r.revision, "lease expired and revoked");
        }
        Ok(CommandResponse::Table(Ok(_))) => {}
        // Revoked meanwhile (by a client): nothing left to do.
        Ok(CommandResponse::Table(Err(KvError::LeaseNotFound { .. }))) => {}
        other => {
            if let Some(id) = revoked {
                warn!(table = %g.name, lease = id, "proposing an expired lease's revocation failed: {other:?}");
                node.with_lessor(g.id, |l| l.handle_revoke_failed(id));
            }
        }
    }
}
