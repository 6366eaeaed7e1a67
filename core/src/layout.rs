//! Where things live in a node's engine: every Raft group owns the keys
//! under its namespace (`g` + group id), with its Raft log and vote beside
//! its state-machine data (`Sd`: the MVCC table or the catalog).
//!
//! Invariant: namespaces of different groups never overlap, so a group is
//! deleted, snapshotted or sized by one key range.

use crate::GroupId;

/// The namespace of a group's keys in the node's engine.
pub fn group_ns(group: GroupId) -> Vec<u8> {
    let mut ns = vec![b'g'];
    ns.extend_from_slice(&group.0.to_be_bytes());
    ns
}

/// The namespace of a group's state-machine data (MVCC table or catalog).
pub fn data_ns(group: GroupId) -> Vec<u8> {
    let mut ns = group_ns(group);
    ns.extend_from_slice(b"Sd");
    ns
}
