//! Fail-stop on storage failure. A write or sync the engine refuses means
//! this node can no longer tell what its disk holds: after a failed fsync
//! the kernel may have dropped the dirty pages (a later fsync succeeds
//! without them), and RocksDB refuses every write after such an error. So
//! the node stops serving at the first one, before any caller can learn
//! that the write "succeeded", and the process exits so that its supervisor
//! restarts it from what is durable (as etcd does).
//!
//! [`FailStopEngine`] and [`FailStopFlusher`] wrap the engine and the
//! flusher a node runs on and report every failed write or sync to the
//! node's [`FailStop`] as it happens, on the caller's path: no task polls.
//! Being on every write and sync, they also count them ([`IoStats`], in
//! `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use armada_core::engine::{EngineView, Pair, WriteBatch};
use armada_core::raft::{FlushDone, FlushReason, Flusher};
use armada_core::{Engine, EngineError};

/// Whether, and why, a node stopped.
#[derive(Default)]
pub struct FailStop {
    reason: OnceLock<String>,
    notify: tokio::sync::Notify,
}

impl FailStop {
    /// Stops the node for good (the first reason sticks).
    pub fn fail(&self, reason: String) {
        if armada_core::canary::active(armada_core::canary::Canary::StorageFailureIgnored) {
            return;
        }
        if self.reason.set(reason.clone()).is_ok() {
            tracing::error!("the node stops: {reason}; restart it to recover from what is durable");
            self.notify.notify_waiters();
        }
    }

    /// Why the node stopped, if it did.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Resolves with the reason once the node stops.
    pub async fn stopped(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(r) = self.reason.get() {
                return r.clone();
            }
            notified.await;
        }
    }

    /// Reports `e` if it is a storage failure (an abandoned call is not).
    fn check(&self, what: &str, e: &EngineError) {
        if !matches!(e, EngineError::Closed(_)) {
            self.fail(format!("storage {what} failed: {e}"));
        }
    }
}

/// A node's storage work since it started: what a benchmark divides by its
/// operations to get the cost of one.
#[derive(Default)]
pub struct IoStats {
    /// Write batches the engine took, and their bytes (keys, values and
    /// range bounds).
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Flush requests by reason (Raft log appends, votes, snapshots): each
    /// waits for a sync, and one sync answers every request waiting.
    pub flush_appends: AtomicU64,
    pub flush_votes: AtomicU64,
    pub flush_snapshots: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// An engine that stops its node at the first failed write or sync.
pub struct FailStopEngine {
    pub inner: Arc<dyn Engine>,
    pub stop: Arc<FailStop>,
    pub stats: Arc<IoStats>,
}

impl Engine for FailStopEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.inner.get(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        self.inner.scan(start, end, visit)
    }
    fn last(&self, start: &[u8], end: &[u8]) -> Result<Option<Pair>, EngineError> {
        self.inner.last(start, end)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        add(&self.stats.writes, 1);
        add(&self.stats.write_bytes, batch.size_bytes() as u64);
        self.inner.write(batch).inspect_err(|e| self.stop.check("write", e))
    }
    fn sync(&self) -> Result<(), EngineError> {
        self.inner.sync().inspect_err(|e| self.stop.check("sync", e))
    }
    fn approximate_size(&self, start: &[u8], end: &[u8]) -> Result<u64, EngineError> {
        self.inner.approximate_size(start, end)
    }
    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
        self.inner.view(start, end)
    }
    fn defragment(&self) -> Result<(), EngineError> {
        self.inner.defragment().inspect_err(|e| self.stop.check("defragmentation", e))
    }
}

/// A flusher that stops its node when a sync it ran failed, before the
/// failure reaches the caller waiting for it.
pub struct FailStopFlusher {
    pub inner: Arc<dyn Flusher>,
    pub stop: Arc<FailStop>,
    pub stats: Arc<IoStats>,
}

impl Flusher for FailStopFlusher {
    fn syncs(&self) -> (u64, u64) {
        self.inner.syncs()
    }

    fn flush(&self, reason: FlushReason, done: FlushDone) {
        add(
            match reason {
                FlushReason::Append => &self.stats.flush_appends,
                FlushReason::Vote => &self.stats.flush_votes,
                FlushReason::Snapshot => &self.stats.flush_snapshots,
            },
            1,
        );
        let stop = self.stop.clone();
        self.inner.flush(
            reason,
            FlushDone::new(move |r| {
                if let Err(e) = &r {
                    stop.check("sync", e);
                }
                done.done(r)
            }),
        )
    }
}
