//! Armada's wire types: prost messages and tonic services generated from
//! `proto/*.proto`.
//!
//! This crate does not contain logic and depends on nothing of Armada's. The
//! generated services come from madsim-tonic, so they run on the real network
//! normally and on madsim's simulated network under `--cfg madsim`.

#![allow(clippy::all, missing_docs)]

/// armada.v1: the table-aware client API.
pub mod v1 {
    tonic::include_proto!("armada.v1");
}

/// etcd v3's client protocol (package `etcdserverpb`): the subset Armada
/// serves so that etcd tools and clients work against it.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Cross-cluster replication between Armada clusters (internal).
pub mod replication {
    tonic::include_proto!("armada.replication.v1");
}
