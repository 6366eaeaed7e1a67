//! The client tools of the `armada` binary: the CLI (`armada kv`,
//! `armada table`, ...), the benchmark (`armada bench`) and backups
//! (`armada backup`, `armada restore`).
//!
//! Invariant: tools talk to nodes only through their public gRPC and HTTP
//! APIs (restore writes a data directory of a stopped node); they never
//! reach into the node runtime.

#[cfg(feature = "rocksdb")]
pub mod backup;
pub mod bench;
pub mod cli;
#[cfg(not(madsim))]
pub mod wanproxy;
pub mod watchbench;
