//! A cluster's members as its metadata group records them: the *target*
//! membership that every Raft group of the cluster (the metadata group and
//! each table's group) is moved to, one change at a time.
//!
//! The record is one value of the metadata group, changed only by
//! [`MembersCommand`]s applied through its Raft log, so every node agrees on
//! it at every log index and a change survives any crash: whoever leads a
//! group after a restart keeps moving that group towards the record. The
//! moving itself (adding learners, waiting for them to catch up, replacing
//! the voters, dropping removed nodes) is the node runtime's
//! (`server::node::membership`); this module only decides which changes may
//! be recorded.
//!
//! Rules (checked when a command applies, so two racing requests are
//! ordered by the log and the second sees the first):
//! - **One change at a time.** Every change raises the record's `epoch`; the
//!   metadata group's leader records [`MembersCommand::Settled`] once every
//!   group's configuration equals the record. Until then `Add`, `Promote`
//!   and `Update` are refused with [`MembersError::InProgress`]. `Remove` is
//!   always allowed: it is how an operator backs out of an add whose node
//!   never came up, or drops a node that died mid-change.
//! - A node id is a positive integer used once at a time; two members never
//!   share a Raft address.
//! - The last voter cannot be removed; only a learner can be promoted.
//! - [`Member::since`] is the epoch a member was (last) added at. A node
//!   initialises a table's group from the table's recorded initial voters
//!   only if it has been a member since before the table was created
//!   ([`GroupMembers::may_initialize`]); a node removed and added back (a
//!   replaced disk) never initialises an old group, so it cannot vote with
//!   an empty log in a configuration it has lost: the group's leader adds it
//!   as a learner and it catches up first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, WriteBatch};

/// A cluster member as Raft knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArmadaNode {
    /// Where the node's Raft transport listens.
    pub raft_addr: String,
    /// Where the node's armada.v1 gRPC API listens (used to forward requests).
    pub api_addr: String,
}

/// Most members one cluster records (voters and learners).
pub const MEMBERS_MAX: usize = 64;
/// Longest address of a member, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 512;

/// One member of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where its Raft transport is reached (host:port; the host may be a
    /// DNS name).
    pub raft_addr: String,
    /// Its armada.v1 API address, as clients should reach it ("" if not
    /// known).
    pub api_addr: String,
    /// Its etcd v3 API address, as clients should reach it ("" if not
    /// known).
    pub etcd_addr: String,
    /// A learner receives every group's log but does not vote.
    pub learner: bool,
    /// The epoch this member was (last) added at (0: a founding member).
    pub since: u64,
}

impl Member {
    /// Its node as Raft groups record it.
    pub fn node(&self) -> ArmadaNode {
        ArmadaNode { raft_addr: self.raft_addr.clone(), api_addr: self.api_addr.clone() }
    }
}

/// The recorded membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub members: BTreeMap<u64, Member>,
    /// Raised by every change.
    pub epoch: u64,
    /// The last epoch every group was seen to have reached.
    pub settled: u64,
    /// The cluster's id (etcd's response headers carry it): a digest of
    /// the founding members, fixed when they are recorded.
    pub cluster_id: u64,
}

/// A cluster's id from its founding members: their ids and Raft addresses.
pub fn cluster_id_of<'a>(members: impl IntoIterator<Item = (u64, &'a str)>) -> u64 {
    // FNV-1a, 64 bits: stable across releases and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut write = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (id, raft_addr) in members {
        write(&id.to_le_bytes());
        // Length-prefixed: the digest earlier releases used.
        write(&(raft_addr.len() as u64).to_le_bytes());
        write(raft_addr.as_bytes());
    }
    h
}

impl Members {
    /// Whether a change is still being carried out.
    pub fn in_progress(&self) -> bool {
        self.settled < self.epoch
    }

    /// Every voter's id.
    pub fn voters(&self) -> std::collections::BTreeSet<u64> {
        self.members.iter().filter(|(_, m)| !m.learner).map(|(id, _)| *id).collect()
    }

    /// Every member's node (voters and learners).
    pub fn nodes(&self) -> BTreeMap<u64, ArmadaNode> {
        self.members.iter().map(|(id, m)| (*id, m.node())).collect()
    }

    /// Reads the record (`None` before the cluster recorded one).
    pub fn load(engine: &dyn Engine, key: &[u8]) -> Result<Option<Members>, EngineError> {
        match engine.get(key)? {
            Some(v) => crate::codec::decode(&v, "members record").map(Some).map_err(EngineError::from),
            None => Ok(None),
        }
    }

    pub fn store(&self, key: Vec<u8>, batch: &mut WriteBatch) {
        batch.put(key, crate::codec::encode(self));
    }

    /// Applies `cmd` to `current` (the stored record, if any): the new
    /// record to store, or why the command is refused. `Ok(None)` means
    /// nothing changes (an idempotent repeat).
    pub fn apply(current: Option<&Members>, cmd: &MembersCommand) -> Result<Option<Members>, MembersError> {
        let Some(cur) = current else {
            return match cmd {
                MembersCommand::Bootstrap { members } => {
                    check_members(members)?;
                    let mut members = members.clone();
                    for m in members.values_mut() {
                        m.since = 0;
                    }
                    // The founding configuration is every group's already.
                    let cluster_id = cluster_id_of(members.iter().map(|(id, m)| (*id, m.raft_addr.as_str())));
                    Ok(Some(Members { members, epoch: 1, settled: 1, cluster_id }))
                }
                _ => Err(MembersError::NotRecorded),
            };
        };
        let mut next = cur.clone();
        match cmd {
            MembersCommand::Bootstrap { .. } => return Ok(None),
            MembersCommand::Settled { epoch } => {
                if *epoch != cur.epoch || !cur.in_progress() {
                    return Ok(None);
                }
                next.settled = *epoch;
                return Ok(Some(next));
            }
            MembersCommand::Publish { id, api_addr, etcd_addr } => {
                let m = next.members.get_mut(id).ok_or(MembersError::NotFound(*id))?;
                check_address(api_addr)?;
                check_address(etcd_addr)?;
                if m.api_addr == *api_addr && m.etcd_addr == *etcd_addr {
                    return Ok(None);
                }
                m.api_addr = api_addr.clone();
                m.etcd_addr = etcd_addr.clone();
                // Client addresses only: no group's configuration changes,
                // so this is not a change to carry out.
                return Ok(Some(next));
            }
            MembersCommand::Add { id, member } => {
                if *id == 0 {
                    return Err(MembersError::InvalidId);
                }
                if cur.members.contains_key(id) {
                    return Err(MembersError::Exists(*id));
                }
                if next.members.len() >= MEMBERS_MAX {
                    return Err(MembersError::TooMany);
                }
                let mut m = member.clone();
                m.since = cur.epoch + 1;
                next.members.insert(*id, m);
            }
            MembersCommand::Promote { id } => {
                let m = next.members.get_mut(id).ok_or(MembersError::NotFound(*id))?;
                if !m.learner {
                    return Err(MembersError::NotLearner(*id));
                }
                m.learner = false;
            }
            MembersCommand::Remove { id } => {
                let m = next.members.remove(id).ok_or(MembersError::NotFound(*id))?;
                if !m.learner && next.voters().is_empty() {
                    return Err(MembersError::LastVoter(*id));
                }
            }
            MembersCommand::Update { id, raft_addr } => {
                let m = next.members.get_mut(id).ok_or(MembersError::NotFound(*id))?;
                if m.raft_addr == *raft_addr {
                    return Ok(None);
                }
                m.raft_addr = raft_addr.clone();
            }
        }
        check_members(&next.members)?;
        // After the checks of the change itself, so that a wrong request
        // hears what is wrong with it rather than "retry later".
        if !matches!(cmd, MembersCommand::Remove { .. }) {
            refuse_in_progress(cur)?;
        }
        next.epoch = cur.epoch + 1;
        Ok(Some(next))
    }
}

fn refuse_in_progress(cur: &Members) -> Result<(), MembersError> {
    if cur.in_progress() && !crate::canary::active(crate::canary::Canary::MembersConcurrentChanges) {
        return Err(MembersError::InProgress { epoch: cur.epoch, settled: cur.settled });
    }
    Ok(())
}

fn check_address(a: &str) -> Result<(), MembersError> {
    if a.len() > ADDRESS_BYTES_MAX {
        return Err(MembersError::InvalidAddress(format!("longer than {ADDRESS_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_members(members: &BTreeMap<u64, Member>) -> Result<(), MembersError> {
    if members.len() > MEMBERS_MAX {
        return Err(MembersError::TooMany);
    }
    if members.contains_key(&0) {
        return Err(MembersError::InvalidId);
    }
    if !members.values().any(|m| !m.learner) {
        return Err(MembersError::NoVoter);
    }
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, m) in members {
        for a in [&m.raft_addr, &m.api_addr, &m.etcd_addr] {
            check_address(a)?;
        }
        if m.raft_addr.is_empty() {
            return Err(MembersError::InvalidAddress(format!("member {id} has no Raft address")));
        }
        if let Some(other) = seen.insert(&m.raft_addr, *id) {
            return Err(MembersError::AddressInUse { addr: m.raft_addr.clone(), id: other });
        }
    }
    Ok(())
}

/// A change to the recorded membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembersCommand {
    /// Records the founding membership (what the metadata group was
    /// initialised with); a no-op once a record exists.
    Bootstrap { members: BTreeMap<u64, Member> },
    /// A new member: a learner, or a voter (which every group adds as a
    /// learner first and promotes once it has caught up).
    Add { id: u64, member: Member },
    /// A learner becomes a voter.
    Promote { id: u64 },
    /// A member leaves every group.
    Remove { id: u64 },
    /// A member's Raft address changes (etcd's MemberUpdate).
    Update { id: u64, raft_addr: String },
    /// A member's client addresses, as it publishes them at start.
    Publish { id: u64, api_addr: String, etcd_addr: String },
    /// Every group has reached `epoch`'s configuration.
    Settled { epoch: u64 },
}

impl MembersCommand {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MembersCommand::Bootstrap { .. } => "bootstrap",
            MembersCommand::Add { .. } => "add",
            MembersCommand::Promote { .. } => "promote",
            MembersCommand::Remove { .. } => "remove",
            MembersCommand::Update { .. } => "update",
            MembersCommand::Publish { .. } => "publish",
            MembersCommand::Settled { .. } => "settled",
        }
    }
}

/// Why a membership command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum MembersError {
    #[error("the cluster has not recorded its members yet; retry")]
    NotRecorded,
    #[error(
        "a membership change is in progress (epoch {epoch}, groups settled at {settled}); retry when it has \
         finished"
    )]
    InProgress { epoch: u64, settled: u64 },
    #[error("member {0} already exists")]
    Exists(u64),
    #[error("member {0} not found")]
    NotFound(u64),
    #[error("member {0} is not a learner")]
    NotLearner(u64),
    #[error("member {0} is the last voter and cannot be removed")]
    LastVoter(u64),
    #[error("a cluster needs at least one voter")]
    NoVoter,
    #[error("a member id must be a positive integer")]
    InvalidId,
    #[error("invalid address: {0}")]
    InvalidAddress(String),
    #[error("address {addr} is already member {id}'s")]
    AddressInUse { addr: String, id: u64 },
    #[error("a cluster has at most {MEMBERS_MAX} members")]
    TooMany,
}

/// A table group's founding configuration, recorded when the table is
/// created (tables created before the cluster recorded its members have
/// none: their groups were founded by the initial members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembers {
    /// The membership epoch the table was created at.
    pub epoch: u64,
    /// The voters its group is initialised with.
    pub voters: BTreeMap<u64, ArmadaNode>,
}

impl GroupMembers {
    /// The founding configuration of a table created under `members`: its
    /// voters as recorded then.
    /// A voter whose addition has not settled yet is left out (it may
    /// never come up): the group's leader adds it like any new member.
    pub fn at(members: &Members) -> GroupMembers {
        GroupMembers {
            epoch: members.epoch,
            voters: members
                .members
                .iter()
                .filter(|(_, m)| !m.learner && m.since <= members.settled)
                .map(|(id, m)| (*id, m.node()))
                .collect(),
        }
    }

    /// May node `id` initialise the group with [`GroupMembers::voters`]?
    /// Only a founding voter that has been a member ever since (by the
    /// current record): a node added back after a removal joins the group
    /// as a learner instead.
    pub fn may_initialize(&self, id: u64, current: Option<&Members>) -> bool {
        if !self.voters.contains_key(&id) {
            return false;
        }
        match current.and_then(|c| c.members.get(&id)) {
            Some(m) => m.since <= self.epoch,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(port: u16, learner: bool) -> Member {
        Member {
            raft_addr: format!("n{port}:5012"),
            api_addr: String::new(),
            etcd_addr: String::new(),
            learner,
            since: 0,
        }
    }

    fn founded(n: u16) -> Members {
        let members = (1..=n).map(|i| (u64::from(i), member(i, false))).collect();
        Members::apply(None, &MembersCommand::Bootstrap { members }).unwrap().unwrap()
    }

    fn settle(m: &Members) -> Members {
        Members::apply(Some(m), &MembersCommand::Settled { epoch: m.epoch }).unwrap().unwrap()
    }

    #[test]
    fn a_change_waits_for_the_previous_one_to_settle() {
        let m = founded(3);
        assert!(!m.in_progress());
        let m = Members::apply(Some(&m), &MembersCommand::Add { id: 4, member: member(4, false) }).unwrap().unwrap();
        assert!(m.in_progress());
        assert_eq!(m.members[&4].since, m.epoch);
        let err = Members::apply(Some(&m), &MembersCommand::Add { id: 5, member: member(5, false) }).unwrap_err();
        assert!(matches!(err, MembersError::InProgress { .. }));
        // A stale settlement changes nothing.
        assert_eq!(Members::apply(Some(&m), &MembersCommand::Settled { epoch: m.epoch - 1 }).unwrap(), None);
        let m = settle(&m);
        let m = Members::apply(Some(&m), &MembersCommand::Add { id: 5, member: member(5, true) }).unwrap().unwrap();
        assert_eq!(m.voters().len(), 4);
        // Remove is allowed mid-change (backing out of an add).
        let m = Members::apply(Some(&m), &MembersCommand::Remove { id: 5 }).unwrap().unwrap();
        assert!(!m.members.contains_key(&5));
    }

    #[test]
    fn the_cluster_id_is_the_digest_earlier_releases_used() {
        let mut h = crate::mvcc::Fnv64::new();
        for (id, a) in [(1u64, "10.0.0.1:5012"), (2, "10.0.0.2:5012")] {
            h.write_u64(id);
            h.write_bytes(a.as_bytes());
        }
        assert_eq!(cluster_id_of([(1, "10.0.0.1:5012"), (2, "10.0.0.2:5012")]), h.finish());
    }

    #[test]
    fn refusals() {
        let m = founded(1);
        let add = |m: &Members, id, mem| Members::apply(Some(m), &MembersCommand::Add { id, member: mem });
        assert_eq!(add(&m, 1, member(9, false)), Err(MembersError::Exists(1)));
        assert_eq!(add(&m, 0, member(9, false)), Err(MembersError::InvalidId));
        assert_eq!(add(&m, 2, member(1, false)), Err(MembersError::AddressInUse { addr: "n1:5012".into(), id: 1 }));
        assert_eq!(Members::apply(Some(&m), &MembersCommand::Remove { id: 1 }), Err(MembersError::LastVoter(1)));
        assert_eq!(Members::apply(Some(&m), &MembersCommand::Promote { id: 1 }), Err(MembersError::NotLearner(1)));
        assert_eq!(Members::apply(Some(&m), &MembersCommand::Remove { id: 7 }), Err(MembersError::NotFound(7)));
        assert_eq!(Members::apply(None, &MembersCommand::Remove { id: 1 }), Err(MembersError::NotRecorded));
        // A second bootstrap is a no-op.
        assert_eq!(Members::apply(Some(&m), &MembersCommand::Bootstrap { members: BTreeMap::new() }), Ok(None));
        let long = "x".repeat(ADDRESS_BYTES_MAX + 1);
        let bad = Members::apply(Some(&m), &MembersCommand::Publish { id: 1, api_addr: long, etcd_addr: "".into() });
        assert!(matches!(bad, Err(MembersError::InvalidAddress(_))));
    }

    #[test]
    fn learners_are_promoted_and_publishing_is_not_a_change() {
        let m = founded(3);
        let m = settle(
            &Members::apply(Some(&m), &MembersCommand::Add { id: 4, member: member(4, true) }).unwrap().unwrap(),
        );
        let p = MembersCommand::Publish { id: 4, api_addr: "a:1".into(), etcd_addr: "e:2".into() };
        let published = Members::apply(Some(&m), &p).unwrap().unwrap();
        assert!(!published.in_progress());
        assert_eq!(Members::apply(Some(&published), &p).unwrap(), None);
        let promoted = Members::apply(Some(&published), &MembersCommand::Promote { id: 4 }).unwrap().unwrap();
        assert!(promoted.voters().contains(&4));
        assert!(promoted.in_progress());
    }

    #[test]
    fn only_continuous_founding_voters_initialise_a_table_group() {
        let m = founded(3);
        let table = GroupMembers::at(&m);
        assert!(table.may_initialize(2, Some(&m)));
        assert!(!table.may_initialize(4, Some(&m)));
        // A voter still being added does not found new tables.
        let adding =
            Members::apply(Some(&m), &MembersCommand::Add { id: 4, member: member(4, false) }).unwrap().unwrap();
        assert!(!GroupMembers::at(&adding).voters.contains_key(&4));
        assert!(GroupMembers::at(&settle(&adding)).voters.contains_key(&4));
        // Node 2 is removed and added back (a lost disk): it joins old groups
        // as a learner instead of founding them again.
        let m = settle(&Members::apply(Some(&m), &MembersCommand::Remove { id: 2 }).unwrap().unwrap());
        assert!(!table.may_initialize(2, Some(&m)));
        let m = settle(
            &Members::apply(Some(&m), &MembersCommand::Add { id: 2, member: member(2, false) }).unwrap().unwrap(),
        );
        assert!(!table.may_initialize(2, Some(&m)));
        // A table created now counts it as founding.
        let newer = GroupMembers::at(&m);
        assert!(newer.may_initialize(2, Some(&m)));
        assert!(newer.may_initialize(1, Some(&m)));
    }
}
