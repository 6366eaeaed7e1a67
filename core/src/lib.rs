//! Armada's sans-IO core: the MVCC store, the storage `Engine` trait with an
//! in-memory implementation, the commands replicated through Raft, and the
//! openraft storage adapters built on them.
//!
//! What this crate does **not** do: it never spawns a task, sleeps, reads the
//! clock, opens a socket or a file, or draws unseeded randomness. It does not
//! depend on tokio, madsim, quinn, tonic servers or RocksDB (CI checks the
//! dependency tree). Time, randomness and durability enter from the driver:
//! the node runtime in `armada-server` feeds inputs, carries out effects and
//! decides when to fsync (see [`raft::Flusher`]).
//!
//! Order of use: open an [`engine::Engine`]; build a [`raft::LogStore`] and a
//! [`raft::StateMachine`] per Raft group over it; hand them to openraft.
//! Reads are served by [`mvcc::Mvcc`] over the same engine.

pub mod auth;
pub mod backup;
pub mod canary;
pub mod codec;
pub mod command;
pub mod compaction;
pub mod engine;
pub mod ids;
pub mod kv;
pub mod layout;
pub mod lease;
pub mod members;
pub mod model;
pub mod mvcc;
pub mod overlay;
pub mod probe;
pub mod raft;
pub mod snapshot;
pub mod subscription;
pub mod watch;

pub use command::{Command, CommandResponse, GroupId, MetaCommand, TableCommand};
pub use engine::{Engine, EngineError, MemEngine, WriteBatch};
pub use ids::{LogIndex, NodeId, Revision};
