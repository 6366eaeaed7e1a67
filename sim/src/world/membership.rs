//! Membership changes in the simulated world, and checker C1.
//!
//! A scenario with `spare_nodes = s` starts `s` more nodes in the leader
//! cluster that found nothing (`initial-cluster-state existing`). While
//! faults run, the driver resizes the cluster through the armada.v1
//! Cluster API at random nodes: it adds each spare node as a voter, then
//! removes the first `s` founding members, so a 3-node cluster goes
//! 3 → 5 → 3 and ends on nodes that hold none of the founding disks. Each
//! change is retried until recorded (a repeat after a lost answer is
//! recognised: "exists" or "not found") and waited for until every group
//! has it. Between changes, it also tries a change too early (right after
//! the previous one), which the one-change-at-a-time rule must refuse.
//!
//! C1 (every seed with spare nodes):
//! - one change at a time: in the leader cluster's applied membership
//!   records, in log order, every add, promote and update was recorded
//!   when the previous change had settled (rebuilt from the applied
//!   records, not from `armada_core::members`);
//! - the plan finished: the final record holds exactly the expected
//!   members, all voters, and has settled;
//! - every group (the metadata group and every table's) on every final
//!   member has the record's configuration committed, with no removed
//!   node in it.
//!
//! Linearizability, Raft safety and the replica checks run as in every
//! scenario; the liveness checks (every final member applies the last
//! write, replicas agree) use the final members.

use std::collections::{BTreeMap, BTreeSet};

use armada_core::members::{Members, MembersCommand};

use super::*;

const CALL: Duration = Duration::from_secs(3);

/// The membership records the leader cluster applied, by metadata-group
/// log index.
#[derive(Default)]
pub(crate) struct MembersLog {
    pub(crate) records: BTreeMap<u64, (MembersCommand, Members)>,
    /// Set by the driver when its plan finished: the members it expects.
    pub(crate) expected: Option<BTreeSet<u64>>,
    /// Changes the driver completed, and early changes refused.
    pub(crate) changes: u64,
    pub(crate) refused_early: u64,
}

impl MembersLog {
    pub(crate) fn applied(&mut self, index: u64, cmd: &MembersCommand, record: &Members) {
        self.records.entry(index).or_insert_with(|| (cmd.clone(), record.clone()));
    }
}

/// The nodes the scenario ends with (all founding nodes when it changes no
/// membership).
pub(super) fn final_members(shared: &Shared, sc: &Scenario) -> BTreeSet<u64> {
    let log = shared.members.lock().unwrap_or_else(|p| p.into_inner());
    log.expected.clone().unwrap_or_else(|| (1..=u64::from(sc.nodes)).collect())
}

async fn cluster_client(id: u64) -> Option<pb::cluster_client::ClusterClient<Channel>> {
    let addr = format!("{}:8443", node_ip(id));
    let ch = tokio::time::timeout(CALL, connect(&addr)).await.ok()??;
    Some(pb::cluster_client::ClusterClient::new(ch))
}

/// Sends `cmd` to random nodes of `around` until it is recorded (or was
/// already); returns the record's epoch after it.
async fn change(shared: &Shared, around: &[u64], cmd: &MembersCommand, deadline_ns: u64) -> Option<u64> {
    while shared.now_ns() < deadline_ns {
        let node = pick(around);
        if let Some(mut c) = cluster_client(node).await {
            let r = match cmd {
                MembersCommand::Add { id, member } => {
                    let req = pb::MemberAddRequest {
                        id: *id,
                        raft_address: member.raft_addr.clone(),
                        api_address: member.api_addr.clone(),
                        etcd_address: member.etcd_addr.clone(),
                        learner: member.learner,
                    };
                    tokio::time::timeout(CALL, c.member_add(req)).await
                }
                MembersCommand::Remove { id } => {
                    tokio::time::timeout(CALL, c.member_remove(pb::MemberRemoveRequest { id: *id })).await
                }
                _ => unreachable!("the driver adds and removes"),
            };
            tracing::debug!(node, ?cmd, "membership change: {r:?}");
            match r {
                Ok(Ok(r)) => return Some(r.into_inner().epoch),
                // A repeat of a change whose answer was lost.
                Ok(Err(s)) if matches!(s.code(), tonic::Code::AlreadyExists | tonic::Code::NotFound) => {
                    return epoch_at(around).await;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn list(node: u64) -> Option<pb::MemberListResponse> {
    let mut c = cluster_client(node).await?;
    Some(tokio::time::timeout(CALL, c.member_list(pb::MemberListRequest {})).await.ok()?.ok()?.into_inner())
}

async fn epoch_at(around: &[u64]) -> Option<u64> {
    for _ in 0..20 {
        if let Some(l) = list(pick(around)).await {
            if l.epoch > 0 {
                return Some(l.epoch);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until a node of `around` reports every group at `epoch`.
async fn settled(shared: &Shared, around: &[u64], epoch: u64, deadline_ns: u64) -> bool {
    while shared.now_ns() < deadline_ns {
        if let Some(l) = list(pick(around)).await {
            if l.settled_epoch >= epoch {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Adds every spare node, then removes as many founding nodes, while the
/// faults run; gives up (leaving C1 to report it) at the liveness bound.
pub(super) async fn driver(sc: Scenario, shared: Arc<Shared>, until_ns: u64, handle: Handle, ids: Vec<NodeId>) {
    let founding: Vec<u64> = (1..=u64::from(sc.nodes)).collect();
    let spares: Vec<u64> = (u64::from(sc.nodes) + 1..=u64::from(sc.nodes + sc.spare_nodes)).collect();
    let deadline_ns = until_ns + sc.liveness_s * 1_000_000_000;
    let mut members: Vec<u64> = founding.clone();
    // Let the tables grow past a few snapshots first, so new members catch
    // up from snapshots as well as from the log.
    tokio::time::sleep(Duration::from_secs(sc.duration_s / 5 + 1)).await;
    let mut plan: Vec<MembersCommand> = spares
        .iter()
        .map(|id| MembersCommand::Add {
            id: *id,
            member: armada_core::members::Member {
                raft_addr: format!("{}:5012", node_ip(*id)),
                api_addr: format!("{}:8443", node_ip(*id)),
                etcd_addr: String::new(),
                learner: false,
                since: 0,
            },
        })
        .collect();
    plan.extend(founding.iter().take(spares.len()).map(|id| MembersCommand::Remove { id: *id }));
    for (i, cmd) in plan.iter().enumerate() {
        let Some(epoch) = change(&shared, &members, cmd, deadline_ns).await else { return };
        match cmd {
            MembersCommand::Add { id, .. } => members.push(*id),
            MembersCommand::Remove { id } => members.retain(|m| m != id),
            _ => {}
        }
        shared.trace(&[0x6d656d, i as u64, epoch]);
        // Too early: the previous change cannot have reached every group
        // yet (a promotion needs a learner to catch up). A removal is
        // always allowed, so try an add of a node that never starts, and
        // back it out if it was recorded anyway.
        if let Some(next) = plan.get(i + 1) {
            if matches!(next, MembersCommand::Add { .. }) || rand_range(0, 1) == 0 {
                let ghost = 90 + i as u64;
                let early = MembersCommand::Add {
                    id: ghost,
                    member: armada_core::members::Member {
                        raft_addr: format!("10.0.9.{ghost}:5012"),
                        api_addr: String::new(),
                        etcd_addr: String::new(),
                        learner: true,
                        since: 0,
                    },
                };
                if let Some(mut c) = cluster_client(pick(&members)).await {
                    if let MembersCommand::Add { id, member } = &early {
                        let req = pb::MemberAddRequest {
                            id: *id,
                            raft_address: member.raft_addr.clone(),
                            api_address: String::new(),
                            etcd_address: String::new(),
                            learner: true,
                        };
                        match tokio::time::timeout(CALL, c.member_add(req)).await {
                            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                                shared.members.lock().unwrap_or_else(|p| p.into_inner()).refused_early += 1;
                            }
                            Ok(Ok(_)) => {
                                let _ =
                                    change(&shared, &members, &MembersCommand::Remove { id: ghost }, deadline_ns).await;
                            }
                            _ => {
                                // Unknown: make sure it is gone.
                                let _ =
                                    change(&shared, &members, &MembersCommand::Remove { id: ghost }, deadline_ns).await;
                            }
                        }
                    }
                }
            }
        }
        // The early change may have moved the epoch on (a node may answer
        // from an older record: never below the change's own epoch).
        let epoch = epoch_at(&members).await.map_or(epoch, |e| e.max(epoch));
        if !settled(&shared, &members, epoch, deadline_ns).await {
            return;
        }
        shared.members.lock().unwrap_or_else(|p| p.into_inner()).changes += 1;
    }
    // A lost disk: a member goes down and loses its disk; the operator
    // removes it, starts it again empty (as a node joining the cluster) and
    // adds it back under the same id.
    let x = pick(&members);
    let Some(disk) = ids.get(x as usize - 1).and_then(|n| shared.disks.get(*n)) else { return };
    let node = ids[x as usize - 1];
    handle.kill(node);
    disk.set_killed();
    disk.lose();
    shared.trace(&[0x6c6f7374, x]);
    members.retain(|m| *m != x);
    let Some(epoch) = change(&shared, &members, &MembersCommand::Remove { id: x }, deadline_ns).await else { return };
    if !settled(&shared, &members, epoch, deadline_ns).await {
        return;
    }
    disk.release();
    handle.restart(node);
    let add = MembersCommand::Add {
        id: x,
        member: armada_core::members::Member {
            raft_addr: format!("{}:5012", node_ip(x)),
            api_addr: format!("{}:8443", node_ip(x)),
            etcd_addr: String::new(),
            learner: false,
            since: 0,
        },
    };
    let Some(epoch) = change(&shared, &members, &add, deadline_ns).await else { return };
    members.push(x);
    if !settled(&shared, &members, epoch, deadline_ns).await {
        return;
    }
    shared.members.lock().unwrap_or_else(|p| p.into_inner()).changes += 2;
    shared.members.lock().unwrap_or_else(|p| p.into_inner()).expected = Some(members.into_iter().collect());
}

/// C1: see the module docs. Returns failures and (changes, early changes
/// refused).
pub(super) fn check(shared: &Shared, sc: &Scenario) -> (Vec<String>, (u64, u64)) {
    let mut failures = Vec::new();
    if sc.spare_nodes == 0 {
        return (failures, (0, 0));
    }
    let log = shared.members.lock().unwrap_or_else(|p| p.into_inner());
    // One change at a time.
    let mut prev: Option<&Members> = None;
    for (index, (cmd, record)) in &log.records {
        if let Some(p) = prev {
            let consecutive = record.epoch == p.epoch + 1;
            let guarded = matches!(cmd, MembersCommand::Add { .. } | MembersCommand::Promote { .. })
                || matches!(cmd, MembersCommand::Update { .. });
            if consecutive && guarded && p.settled < p.epoch {
                failures.push(format!(
                    "C1 {} recorded at metadata index {index} (epoch {}) while epoch {} had not settled (settled {})",
                    cmd.kind(),
                    record.epoch,
                    p.epoch,
                    p.settled
                ));
            }
        }
        prev = Some(record);
    }
    let Some(expected) = log.expected.clone() else {
        failures.push(format!(
            "C1 the membership plan did not finish within the liveness bound ({} changes done){}",
            log.changes,
            diagnose(shared)
        ));
        return (failures, (log.changes, log.refused_early));
    };
    let counts = (log.changes, log.refused_early);
    drop(log);
    for (key, node) in shared.nodes() {
        if followers::cluster_of(key) != 0 || !expected.contains(&key) {
            continue;
        }
        let record = match node.members_record() {
            Ok(Some(r)) => r,
            other => {
                failures.push(format!("C1 node {key} has no membership record: {other:?}"));
                continue;
            }
        };
        let ids: BTreeSet<u64> = record.members.keys().copied().collect();
        if ids != expected || !record.voters().eq(&expected) || record.in_progress() {
            failures.push(format!(
                "C1 node {key}'s record is {ids:?} (voters {:?}, epoch {}, settled {}), expected {expected:?} settled",
                record.voters(),
                record.epoch,
                record.settled
            ));
            continue;
        }
        for g in node.groups() {
            let (_, committed) = g.configs();
            if !committed.matches(&record) {
                failures.push(format!(
                    "C1 node {key}, group {}: committed configuration {committed:?} is not the record's {expected:?}",
                    g.id
                ));
            }
        }
    }
    (failures, counts)
}
