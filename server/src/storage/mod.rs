//! Storage adapters: the RocksDB engine (behind the default `rocksdb`
//! feature; simulation builds use core's `MemEngine` over a simulated disk)
//! and the flusher that makes writes durable in batches.
//!
//! Invariant: nothing here knows a record's meaning. Keys and values are
//! bytes laid out by `armada-core`; this module only stores and syncs them.

pub mod flusher;
#[cfg(feature = "rocksdb")]
pub mod rocks;
