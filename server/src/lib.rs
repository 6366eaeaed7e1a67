//! Armada's node runtime: the driver of core's state machines.
//!
//! What this crate does not do: it holds no consensus, storage or MVCC logic
//! of its own (that lives in `armada-core`); it decides nothing about the
//! network's shape (that is `armada-net`'s transport). It runs the same code
//! under real tokio and under madsim.
//!
//! Modules, from the bottom up (each names only modules listed before it,
//! checked by `ci/check-modules`):
//!
//! - [`rt`]: the async runtime seen by openraft and the node (tokio, or
//!   madsim's tokio in simulation), deterministic watch channels, the clock.
//! - [`types`]: what the node, the services and the tools share: errors,
//!   response headers, status reports.
//! - [`storage`]: the RocksDB engine and the flusher (durability).
//! - [`node`]: the node runtime: Raft groups, request execution,
//!   forwarding, the Raft transport's handlers, snapshots, compaction.
//! - [`replication`]: the leader side of cross-cluster replication (the
//!   change stream service) and the follower side (its pump and upstream).
//! - [`ops`]: metrics, readiness and the HTTP endpoint.
//! - [`api`]: the gRPC services: armada.v1 and etcd v3.
//! - [`auth`]: bearer tokens per API, checked on every call.
//! - [`listen`]: listeners and client endpoints.
//! - [`reload`]: values built from files, rebuilt when the files change.
//! - [`tls`]: TLS configurations of listeners and clients, re-read when
//!   their files change.
//! - [`assemble`]: builds a node and its services from a spec and its
//!   adapters; the production launcher and the simulated world both call it.
//! - [`config`], [`launch`]: the production node's configuration and its
//!   launcher (storage, listeners, serving, graceful stop).
//! - [`tools`]: the client tools of the `armada` binary (CLI, bench,
//!   backup); they talk to a node over gRPC and share no state with it.

pub mod api;
pub mod assemble;
pub mod auth;
pub mod config;
#[cfg(all(not(madsim), feature = "rocksdb"))]
pub mod launch;
pub mod limits;
#[cfg(not(madsim))]
pub mod listen;
pub mod node;
pub mod ops;
pub mod reload;
pub mod replication;
pub mod rt;
pub mod storage;
#[cfg(not(madsim))]
pub mod tls;
#[cfg(not(madsim))]
pub mod tools;
pub mod types;
