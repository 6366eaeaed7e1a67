//! Armada's node runtime: the driver of core's state machines.
//!
//! What this crate does not do: it holds no consensus, storage or MVCC logic
//! of its own (that lives in `armada-core`); it decides nothing about the
//! network's shape (that is `armada-net`'s transport). It runs the same code
//! under real tokio and under madsim.

#[cfg(not(madsim))]
pub mod backup_cli;
#[cfg(not(madsim))]
pub mod bench;
#[cfg(not(madsim))]
pub mod cli;
pub mod compactor;
pub mod config;
pub mod convert;
pub mod etcd;
pub mod failstop;
pub mod flusher;
#[cfg(not(madsim))]
pub mod http;
#[cfg(all(not(madsim), feature = "rocksdb"))]
pub mod launch;
#[cfg(not(madsim))]
pub mod listen;
pub mod metrics;
pub mod network;
pub mod node;
pub mod ready;
pub mod replication;
#[cfg(feature = "rocksdb")]
pub mod rocks;
pub mod rt;
pub mod service;
pub mod snapshots;
