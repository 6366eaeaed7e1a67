//! Simulated disks and their faults: each node's durable image, the errors
//! and slowness the fault loop injects into it, and the engine the node runs
//! on, which fails the way RocksDB does.
//!
//! - A **failed disk** (`faults.disk_error`) returns errors for writes
//!   (an I/O error or a full disk) or for syncs (a failed fsync) while the
//!   fault lasts. After its first error an engine refuses every later write
//!   and sync, as RocksDB does after a background error: a node can no
//!   longer make anything durable and must stop (D1, below), and a restart
//!   recovers from what was synced.
//! - A **slow disk** (`faults.slow_disk`) adds `faults.slow_disk_ms` to each
//!   sync of one node while it lasts (long values are stalls).
//! - A **torn crash** (`faults.torn_crash` percent of crashes) keeps a
//!   seeded number of the batches written since the last sync instead of
//!   none: the durable state is still a prefix of the write history.
//!
//! D1 (fail-stop): a node whose engine returned a write or sync error stops
//! serving (`Node::fail`) by the time the fault ends. The world then kills
//! it, and restarts it once its disk works again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use armada_core::canary::{self, Canary};
use armada_core::engine::{DurableImage, EngineView, Pair, WriteBatch};
use armada_core::raft::FlushReason;
use armada_core::{Engine, EngineError, MemEngine};
use armada_server::storage::flusher::DiskModel;
use madsim::task::NodeId;

use super::rand_range;

/// A failure the fault loop gives a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiskFault {
    /// Every write fails with an I/O error.
    WriteError,
    /// Writes succeed; every sync fails (a failed fsync).
    SyncError,
    /// The disk is full: writes and syncs fail with "no space".
    Full,
}

impl DiskFault {
    pub const ALL: [DiskFault; 3] = [DiskFault::WriteError, DiskFault::SyncError, DiskFault::Full];

    fn message(self) -> &'static str {
        match self {
            DiskFault::WriteError => "injected write error: Input/output error (os error 5)",
            DiskFault::SyncError => "injected fsync error: Input/output error (os error 5)",
            DiskFault::Full => "injected: No space left on device (os error 28)",
        }
    }
}

/// One node's disk, kept by the world across the node's restarts.
pub(super) struct NodeDisk {
    image: Mutex<DurableImage>,
    /// The disk was lost and replaced by an empty one: the node starts as a
    /// new node joining the cluster (see `membership`).
    replaced: AtomicBool,
    /// The node stays down (its start does nothing) until released.
    held: AtomicBool,
    /// The base range of a sync's duration (ms), from the scenario.
    fsync_ms: [u64; 2],
    fault: Mutex<Option<DiskFault>>,
    /// Extra sync time while a slow-disk fault lasts (ms range).
    slow_ms: Mutex<Option<[u64; 2]>>,
    /// Whether the engine open on this disk has returned a write or sync
    /// error (cleared when the node restarts on a new engine).
    broken: AtomicBool,
    /// Whether the node running on that engine was killed (after stopping
    /// itself, or by a crash fault).
    killed: AtomicBool,
}

impl NodeDisk {
    pub fn new(fsync_ms: [u64; 2]) -> Arc<Self> {
        Arc::new(Self {
            image: Mutex::new(DurableImage::new()),
            replaced: AtomicBool::new(false),
            held: AtomicBool::new(false),
            fsync_ms,
            fault: Mutex::new(None),
            slow_ms: Mutex::new(None),
            broken: AtomicBool::new(false),
            killed: AtomicBool::new(false),
        })
    }

    /// The engine a (re)starting node runs on.
    pub fn open(self: &Arc<Self>) -> FaultyEngine {
        self.broken.store(false, Ordering::SeqCst);
        self.killed.store(false, Ordering::SeqCst);
        FaultyEngine { inner: MemEngine::open(self.image()), disk: self.clone() }
    }

    /// The durable image the node runs on.
    pub fn image(&self) -> DurableImage {
        self.image.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loses everything on the disk: the next start finds an empty one,
    /// and holds the node down until [`NodeDisk::release`].
    pub fn lose(&self) {
        *self.image.lock().unwrap_or_else(|p| p.into_inner()) = DurableImage::new();
        self.replaced.store(true, Ordering::SeqCst);
        self.held.store(true, Ordering::SeqCst);
    }

    pub fn replaced(&self) -> bool {
        self.replaced.load(Ordering::SeqCst)
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    pub fn set_fault(&self, f: Option<DiskFault>) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    pub fn set_slow(&self, ms: Option<[u64; 2]>) {
        *self.slow_ms.lock().unwrap_or_else(|p| p.into_inner()) = ms;
    }

    /// Whether the engine open now has failed a write or sync.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// The node on this disk was killed.
    pub fn set_killed(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    fn fault(&self) -> Option<DiskFault> {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sync timing of a node's disk (the flusher's [`DiskModel`]); canaries lie.
pub(super) struct SimDisk(pub Arc<NodeDisk>);

impl DiskModel for SimDisk {
    fn sync_delay(&self) -> Duration {
        let [lo, hi] = self.0.fsync_ms;
        let mut us = rand_range(lo * 1000, hi * 1000);
        if let Some([lo, hi]) = *self.0.slow_ms.lock().unwrap_or_else(|p| p.into_inner()) {
            us += rand_range(lo * 1000, hi * 1000);
            armada_core::probe!(SyncSlowed);
        }
        Duration::from_micros(us)
    }
    fn ack_before_sync(&self, reason: FlushReason) -> bool {
        reason == FlushReason::Append && canary::active(Canary::AckBeforeFsync)
    }
}

/// A [`MemEngine`] whose writes and syncs fail while its disk has a fault,
/// and for good after the first failure (RocksDB's background error).
pub(super) struct FaultyEngine {
    inner: MemEngine,
    disk: Arc<NodeDisk>,
}

impl FaultyEngine {
    /// Fails the call if the disk has (or had) a fault of a kind in `kinds`.
    fn check(&self, kinds: &[DiskFault]) -> Result<(), EngineError> {
        if self.disk.broken() {
            return Err(EngineError::Backend(
                "storage is read-only after an earlier write or sync error; restart the node".into(),
            ));
        }
        match self.disk.fault() {
            Some(f) if kinds.contains(&f) => {
                self.disk.broken.store(true, Ordering::SeqCst);
                Err(EngineError::Backend(f.message().into()))
            }
            _ => Ok(()),
        }
    }
}

impl Engine for FaultyEngine {
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
        self.check(&[DiskFault::WriteError, DiskFault::Full])?;
        self.inner.write(batch)
    }
    fn sync(&self) -> Result<(), EngineError> {
        self.check(&[DiskFault::SyncError, DiskFault::Full])?;
        self.inner.sync()
    }
    fn approximate_size(&self, start: &[u8], end: &[u8]) -> Result<u64, EngineError> {
        self.inner.approximate_size(start, end)
    }
    fn view(&self, start: &[u8], end: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
        self.inner.view(start, end)
    }
}

/// Every node's disk, by madsim node id.
#[derive(Default)]
pub(super) struct Disks {
    by_node: Mutex<BTreeMap<NodeId, Arc<NodeDisk>>>,
    /// Nodes that reported a stop (`Node::fail`) and await the reaper.
    stopped: Mutex<Vec<(NodeId, String)>>,
    wake: tokio::sync::Notify,
}

impl Disks {
    pub fn insert(&self, id: NodeId, disk: Arc<NodeDisk>) {
        self.by_node.lock().unwrap_or_else(|p| p.into_inner()).insert(id, disk);
    }
    pub fn get(&self, id: NodeId) -> Option<Arc<NodeDisk>> {
        self.by_node.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }
    /// A node stopped itself (storage failure).
    pub fn stopped(&self, id: NodeId, why: String) {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).push((id, why));
        self.wake.notify_one();
    }
    /// Resolves when a node has stopped since the last call.
    pub async fn wait_stopped(&self) {
        self.wake.notified().await
    }
    pub fn take_stopped(&self) -> Vec<(NodeId, String)> {
        std::mem::take(&mut *self.stopped.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
