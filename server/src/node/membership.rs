//! Membership changes: the recorded target membership
//! (`armada_core::members`, a record of the metadata group) and the task
//! that moves every Raft group of the node towards it.
//!
//! How a change is carried out:
//! - A client asks any node (armada.v1 Cluster API, etcd's Member calls); the
//!   change is proposed to the metadata group like any catalog change and
//!   checked when it applies (one change at a time, see
//!   `armada_core::members`).
//! - Every node runs [`run`]: for each group it *leads* (the metadata group
//!   and each table's), it takes one step towards the record per round: add
//!   a missing node as a learner; correct a changed Raft address; once every
//!   new voter's log is within [`CATCH_UP_ENTRIES`] of the leader's, replace
//!   the voters (openraft's joint consensus); drop nodes no longer recorded.
//!   A group left in a joint configuration by a crash is finished the same
//!   way by its next leader, since the record still says where to go.
//! - The metadata group's leader records `Settled` once the committed
//!   configuration of every group it hosts equals the record; only then is
//!   the next change accepted.
//! - The first change an operator asks for records the founding membership
//!   first (`Bootstrap`, from the metadata group's own configuration); from
//!   then on every node publishes its client addresses (`Publish`) so that
//!   MemberList can list them. Nothing is recorded before: a node of the
//!   previous release cannot read the record, so a rolling upgrade finishes
//!   before the first membership change.
//!
//! Invariant: a node never changes the configuration of a group it does not
//! lead, and changes it only towards the applied record (which every node
//! agrees on at each log index).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::Duration;

use armada_core::command::{MetaCommand, MetaReply};
use armada_core::members::{Member, Members, MembersCommand};
use armada_core::raft::ArmadaNode;
use armada_core::{Command, CommandResponse, GroupId};
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState};
use tracing::{debug, info};

use super::forward::Miss;
use super::wire::{ClientReply, ClientRequest};
use super::{Group, Node};
use crate::types::ApiError;

/// How often a node looks at the groups it leads.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// A new voter is promoted in a group once its log is within this many
/// entries of the leader's: promoting a far-behind node would leave the
/// group without a quorum until it caught up.
pub const CATCH_UP_ENTRIES: u64 = 256;

/// What one group's configuration is, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub voters: BTreeSet<u64>,
    pub nodes: BTreeMap<u64, ArmadaNode>,
    /// Still in joint consensus (two voter sets).
    pub joint: bool,
}

impl GroupConfig {
    /// Whether it is `target`'s configuration: the same voters and the
    /// same members at the same Raft addresses.
    pub fn matches(&self, target: &Members) -> bool {
        !self.joint
            && self.voters == target.voters()
            && self.nodes.len() == target.members.len()
            && target.members.iter().all(|(id, m)| self.nodes.get(id).is_some_and(|n| n.raft_addr == m.raft_addr))
    }
}

/// One group's next step towards the record (pure: decided from its
/// configuration, its leader's replication progress and the record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    AddLearner(u64, ArmadaNode),
    SetAddress(u64, ArmadaNode),
    ReplaceVoters(BTreeSet<u64>),
    /// New voters are not caught up yet: wait.
    WaitCatchUp(Vec<u64>),
    RemoveNodes(BTreeSet<u64>),
}

/// The next step for a group with configuration `cur` whose leader's last
/// log index is `last` and whose members have `matched` log indexes.
pub fn next_step(cur: &GroupConfig, target: &Members, last: u64, matched: &BTreeMap<u64, u64>) -> Option<Step> {
    let want_nodes = target.nodes();
    let want_voters = target.voters();
    for (id, n) in &want_nodes {
        if !cur.nodes.contains_key(id) {
            return Some(Step::AddLearner(*id, n.clone()));
        }
    }
    for (id, n) in &want_nodes {
        if cur.nodes.get(id).is_some_and(|c| c.raft_addr != n.raft_addr) {
            return Some(Step::SetAddress(*id, n.clone()));
        }
    }
    if cur.joint || cur.voters != want_voters {
        let behind: Vec<u64> = want_voters
            .difference(&cur.voters)
            .copied()
            .filter(|id| matched.get(id).is_none_or(|m| m + CATCH_UP_ENTRIES < last))
            .collect();
        if !behind.is_empty() {
            return Some(Step::WaitCatchUp(behind));
        }
        if armada_core::canary::active(armada_core::canary::Canary::MembersNeverPromote)
            && !want_voters.is_subset(&cur.voters)
        {
            return Some(Step::WaitCatchUp(want_voters.difference(&cur.voters).copied().collect()));
        }
        return Some(Step::ReplaceVoters(want_voters));
    }
    let extra: BTreeSet<u64> = cur.nodes.keys().filter(|id| !want_nodes.contains_key(id)).copied().collect();
    if !extra.is_empty() {
        return Some(Step::RemoveNodes(extra));
    }
    None
}

/// The founding members as the metadata group's configuration has them
/// (`None` while it is joint or not yet committed).
fn founding_members(meta: &Group) -> Option<BTreeMap<u64, Member>> {
    let (cur, committed) = meta.configs();
    if cur.joint || cur != committed {
        return None;
    }
    let members = cur
        .nodes
        .iter()
        .map(|(id, n)| {
            let m = Member {
                raft_addr: n.raft_addr.clone(),
                api_addr: n.api_addr.clone(),
                etcd_addr: String::new(),
                learner: !cur.voters.contains(id),
                since: 0,
            };
            (*id, m)
        })
        .collect();
    Some(members)
}

fn config_of(m: &openraft::Membership<u64, ArmadaNode>) -> GroupConfig {
    GroupConfig {
        voters: m.voter_ids().collect(),
        nodes: m.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        joint: m.get_joint_config().len() > 1,
    }
}

impl Group {
    /// This group's latest configuration and its committed one, as this
    /// node knows them.
    pub fn configs(&self) -> (GroupConfig, GroupConfig) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (config_of(m.membership_config.membership()), config_of(m.committed_membership_config.membership()))
    }
}

impl Node {
    /// Moves on whenever the metadata group applies anything: what was read
    /// from the catalog under an earlier value may be stale.
    pub fn catalog_epoch(&self) -> u64 {
        self.notifier.catalog_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The membership this node has applied (`None` before the cluster
    /// recorded one).
    pub fn members_record(&self) -> Result<Option<Members>, ApiError> {
        self.read_catalog(|c| c.members())
    }

    /// Records a membership change through the metadata group of this
    /// cluster (forwarded to its leader). Follower clusters manage their own
    /// members, so this works on either kind of cluster.
    pub async fn members_change(&self, cmd: MembersCommand) -> Result<Members, ApiError> {
        match self.execute(ClientRequest::Members { cmd, hops: 0 }).await? {
            ClientReply::Members(m) => Ok(m),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub(super) async fn members_change_local(&self, cmd: MembersCommand, hops: u32) -> Result<Members, Miss> {
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        if let MembersCommand::Promote { id } = &cmd {
            // etcd's rule: only a learner in step with the leader is promoted.
            if self.is_leader(&meta) {
                let m = meta.raft.metrics();
                let m = m.borrow_watched();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m.replication.as_ref().and_then(|r| r.get(id)).and_then(|l| l.as_ref()).map(|l| l.index);
                if matched.is_none_or(|i| i + CATCH_UP_ENTRIES < last) {
                    return Err(ApiError::ReadOnly(format!(
                        "can only promote a learner member which is in sync with leader (member {id} has {} of {last} \
                         entries)",
                        matched.unwrap_or(0)
                    ))
                    .into());
                }
            }
        }
        let change = !matches!(
            cmd,
            MembersCommand::Bootstrap { .. } | MembersCommand::Settled { .. } | MembersCommand::Publish { .. }
        );
        if change && self.members_record()?.is_none() {
            // The first change: record the founding members first (the
            // metadata group's configuration). Only a change asked for by
            // an operator records them, never the node by itself: a node of
            // the previous release cannot read the record, so membership is
            // changed once every member runs this one (as authentication).
            let members = founding_members(&meta).ok_or_else(|| {
                ApiError::Unavailable("the metadata group is changing its configuration; retry".into())
            })?;
            let bootstrap = Command::Meta(MetaCommand::Members(MembersCommand::Bootstrap { members }));
            match self.propose(&meta, bootstrap, hops).await? {
                CommandResponse::Meta(Ok(_)) => info!("membership: recorded the founding members"),
                other => return Err(ApiError::Internal(format!("recording the founding members: {other:?}")).into()),
            }
        }
        match self.propose(&meta, Command::Meta(MetaCommand::Members(cmd)), hops).await? {
            CommandResponse::Meta(Ok(MetaReply::Members(m))) => Ok(m),
            CommandResponse::Meta(Err(e)) => Err(ApiError::Meta(e).into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    /// Every member, from the record, or from the initial members before
    /// the cluster recorded them.
    pub fn members_or_initial(&self) -> Members {
        if let Ok(Some(m)) = self.members_record() {
            return m;
        }
        let members = self
            .cfg
            .members
            .iter()
            .map(|(id, n)| {
                let (api, etcd) = if *id == self.cfg.id {
                    (self.cfg.client_addrs.api.clone(), self.cfg.client_addrs.etcd.clone())
                } else {
                    (n.api_addr.clone(), String::new())
                };
                (
                    *id,
                    Member { raft_addr: n.raft_addr.clone(), api_addr: api, etcd_addr: etcd, learner: false, since: 0 },
                )
            })
            .collect();
        let cluster_id =
            armada_core::members::cluster_id_of(self.cfg.members.iter().map(|(id, n)| (*id, n.raft_addr.as_str())));
        Members { members, epoch: 0, settled: 0, cluster_id }
    }

    /// One round of [`run`].
    async fn reconcile(&self) {
        let Some(meta) = self.group(GroupId::META) else { return };
        let leads_meta = self.is_leader(&meta);
        let record = match self.members_record() {
            Ok(r) => r,
            Err(e) => {
                debug!("membership: reading the record: {e}");
                return;
            }
        };
        // No record: no change has been asked for yet; the groups keep
        // the founding configuration.
        let Some(target) = record else { return };
        self.publish(&target).await;
        let mut groups = vec![meta.clone()];
        groups.extend(self.groups().into_iter().filter(|g| g.id != GroupId::META));
        for g in &groups {
            if self.is_leader(g) {
                self.step(g, &target).await;
            }
        }
        if leads_meta && target.in_progress() {
            self.settle(&target).await;
        }
    }

    /// Publishes this node's client addresses when the record's differ.
    async fn publish(&self, target: &Members) {
        let addrs = &self.cfg.client_addrs;
        let Some(me) = target.members.get(&self.cfg.id) else { return };
        if (addrs.api.is_empty() && addrs.etcd.is_empty()) || (me.api_addr == addrs.api && me.etcd_addr == addrs.etcd) {
            return;
        }
        let cmd =
            MembersCommand::Publish { id: self.cfg.id, api_addr: addrs.api.clone(), etcd_addr: addrs.etcd.clone() };
        if let Err(e) = self.members_change(cmd).await {
            debug!("membership: publishing this node's client addresses: {e}");
        }
    }

    /// One step of one group this node leads.
    async fn step(&self, g: &Group, target: &Members) {
        let (cur, matched, last) = {
            let m = g.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader {
                return;
            }
            let matched: BTreeMap<u64, u64> = m
                .replication
                .as_ref()
                .map(|r| r.iter().filter_map(|(id, l)| l.as_ref().map(|l| (*id, l.index))).collect())
                .unwrap_or_default();
            (config_of(m.membership_config.membership()), matched, m.last_log_index.unwrap_or(0))
        };
        let Some(step) = next_step(&cur, target, last, &matched) else { return };
        if g.id == GroupId::META {
            // The metadata group drops a node last: until then the node
            // still learns the record, and if it leads a table's group it
            // takes that group to the record itself (a node removed from
            // the metadata group first would never hear of its removal and
            // keep leading its table groups in the old configuration).
            let dropping: BTreeSet<u64> = match &step {
                Step::ReplaceVoters(v) => cur.nodes.keys().filter(|id| !v.contains(id)).copied().collect(),
                Step::RemoveNodes(ids) => ids.clone(),
                _ => BTreeSet::new(),
            };
            if dropping.contains(&self.cfg.id) {
                // A leader being dropped stops seeing the table groups that
                // have dropped it: it hands the metadata group to the most
                // caught-up voter that stays, which finishes the change.
                if let Some(to) = target.voters().into_iter().max_by_key(|id| (matched.get(id).copied(), *id)) {
                    if let Err(e) = g.raft.trigger().transfer_leader(to).await {
                        debug!("membership: handing the metadata group to {to}: {e}");
                    }
                }
                return;
            }
            if !dropping.is_empty() && !self.tables_exclude(&dropping) {
                return;
            }
        }
        let timeout = self.cfg.request_timeout;
        let result = match &step {
            Step::WaitCatchUp(_) => return,
            Step::AddLearner(id, n) => {
                tokio::time::timeout(timeout, g.raft.add_learner(*id, n.clone(), false)).await.map(|r| r.map(|_| ()))
            }
            Step::SetAddress(id, n) => tokio::time::timeout(
                timeout,
                g.raft.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(*id, n.clone())])), true),
            )
            .await
            .map(|r| r.map(|_| ())),
            Step::ReplaceVoters(v) => tokio::time::timeout(
                timeout,
                g.raft.change_membership(ChangeMembers::ReplaceAllVoters(v.clone()), false),
            )
            .await
            .map(|r| r.map(|_| ())),
            Step::RemoveNodes(ids) => {
                tokio::time::timeout(timeout, g.raft.change_membership(ChangeMembers::RemoveNodes(ids.clone()), false))
                    .await
                    .map(|r| r.map(|_| ()))
            }
        };
        match result {
            Ok(Ok(())) => {
                armada_core::probe!(MembershipStep);
                info!(group = %g.id, epoch = target.epoch, "membership: {step:?}");
            }
            Ok(Err(e)) => debug!(group = %g.id, "membership: {step:?}: {e}"),
            Err(_) => debug!(group = %g.id, "membership: {step:?}: timed out"),
        }
    }

    /// Whether every table group's committed configuration, as this node
    /// knows it, leaves `ids` out.
    fn tables_exclude(&self, ids: &BTreeSet<u64>) -> bool {
        let Ok(tables) = self.catalog_list() else { return false };
        tables.iter().all(|t| {
            self.group(t.id).is_some_and(|g| {
                let (_, committed) = g.configs();
                !committed.joint && ids.iter().all(|id| !committed.nodes.contains_key(id))
            })
        })
    }

    /// Records `Settled` once every group's committed configuration is the
    /// record's.
    async fn settle(&self, target: &Members) {
        let tables = match self.catalog_list() {
            Ok(t) => t,
            Err(_) => return,
        };
        let mut ids: Vec<GroupId> = vec![GroupId::META];
        ids.extend(tables.iter().map(|t| t.id));
        for id in ids {
            let Some(g) = self.group(id) else { return };
            let (cur, committed) = g.configs();
            if !cur.matches(target) || !committed.matches(target) {
                return;
            }
        }
        match self.members_change(MembersCommand::Settled { epoch: target.epoch }).await {
            Ok(_) => info!(epoch = target.epoch, "membership: every group has the recorded members"),
            Err(e) => debug!("membership: recording the settlement: {e}"),
        }
    }
}

impl Node {
    /// Hands the leadership of every group this node leads to another
    /// voter (the most caught-up one), before the node stops: its clients
    /// then see one leader change per group instead of an election timeout.
    /// Returns how many groups it still leads after `within`.
    pub async fn drain(&self, within: Duration) -> usize {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut led = 0;
            for g in self.groups() {
                let to = {
                    let m = g.raft.metrics();
                    let m = m.borrow_watched();
                    if m.state != ServerState::Leader {
                        continue;
                    }
                    let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
                    let matched = |id: &u64| {
                        m.replication.as_ref().and_then(|r| r.get(id)).and_then(|l| l.as_ref()).map(|l| l.index)
                    };
                    voters.iter().filter(|id| **id != self.cfg.id).max_by_key(|id| (matched(id), **id)).copied()
                };
                led += 1;
                if let Some(to) = to {
                    if let Err(e) = g.raft.trigger().transfer_leader(to).await {
                        debug!(group = %g.id, "drain: handing leadership to {to}: {e}");
                    }
                }
            }
            if led == 0 || tokio::time::Instant::now() >= deadline {
                if led == 0 {
                    info!("drained: this node leads no group");
                }
                return led;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the node is draining (it will stop soon).
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Moves this node's groups towards the recorded membership until the node
/// is dropped.
pub async fn run(node: Weak<Node>) {
    loop {
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        if node.failure().is_some() || node.is_draining() {
            continue;
        }
        node.reconcile().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use armada_core::members::MembersCommand as C;

    fn node(i: u64) -> ArmadaNode {
        ArmadaNode { raft_addr: format!("n{i}:1"), api_addr: String::new() }
    }

    fn record(voters: &[u64], learners: &[u64]) -> Members {
        let mut members = BTreeMap::new();
        for (ids, learner) in [(voters, false), (learners, true)] {
            for id in ids {
                let n = node(*id);
                let m = Member {
                    raft_addr: n.raft_addr,
                    api_addr: String::new(),
                    etcd_addr: String::new(),
                    learner,
                    since: 0,
                };
                members.insert(*id, m);
            }
        }
        Members::apply(None, &C::Bootstrap { members }).unwrap().unwrap()
    }

    fn config(voters: &[u64], nodes: &[u64]) -> GroupConfig {
        GroupConfig {
            voters: voters.iter().copied().collect(),
            nodes: nodes.iter().map(|i| (*i, node(*i))).collect(),
            joint: false,
        }
    }

    #[test]
    fn a_new_voter_is_added_as_a_learner_and_promoted_once_caught_up() {
        let target = record(&[1, 2, 3, 4], &[]);
        let cur = config(&[1, 2, 3], &[1, 2, 3]);
        assert_eq!(next_step(&cur, &target, 1000, &BTreeMap::new()), Some(Step::AddLearner(4, node(4))));
        let cur = config(&[1, 2, 3], &[1, 2, 3, 4]);
        let far = BTreeMap::from([(4, 10)]);
        assert_eq!(next_step(&cur, &target, 1000, &far), Some(Step::WaitCatchUp(vec![4])));
        let near = BTreeMap::from([(4, 1000 - CATCH_UP_ENTRIES)]);
        assert_eq!(next_step(&cur, &target, 1000, &near), Some(Step::ReplaceVoters([1, 2, 3, 4].into())));
        let done = config(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(next_step(&done, &target, 1000, &near), None);
        assert!(done.matches(&target));
    }

    #[test]
    fn removal_replaces_voters_then_drops_leftover_nodes() {
        let target = record(&[1, 2, 3], &[]);
        let cur = config(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
        assert_eq!(next_step(&cur, &target, 5, &BTreeMap::new()), Some(Step::ReplaceVoters([1, 2, 3].into())));
        let cur = config(&[1, 2, 3], &[1, 2, 3, 5]);
        assert_eq!(next_step(&cur, &target, 5, &BTreeMap::new()), Some(Step::RemoveNodes([5].into())));
        // A joint configuration left by a crash is finished.
        let mut joint = config(&[1, 2, 3], &[1, 2, 3]);
        joint.joint = true;
        assert!(!joint.matches(&target));
        assert_eq!(next_step(&joint, &target, 5, &BTreeMap::new()), Some(Step::ReplaceVoters([1, 2, 3].into())));
    }

    #[test]
    fn learners_stay_learners_and_addresses_follow_the_record() {
        let target = record(&[1, 2, 3], &[4]);
        let cur = config(&[1, 2, 3], &[1, 2, 3, 4]);
        assert_eq!(next_step(&cur, &target, 5, &BTreeMap::new()), None);
        let mut moved = target.clone();
        moved.members.get_mut(&2).unwrap().raft_addr = "elsewhere:1".into();
        let expect = ArmadaNode { raft_addr: "elsewhere:1".into(), api_addr: String::new() };
        assert_eq!(next_step(&cur, &moved, 5, &BTreeMap::new()), Some(Step::SetAddress(2, expect)));
    }
}
