//! Group commit: one background task makes engine writes durable. Every
//! flush request that arrives while a sync is running is answered by the next
//! sync, so concurrent writers share fsyncs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use armada_core::raft::{FlushDone, FlushReason, Flusher};
use armada_core::{Engine, EngineError};
use tokio::sync::mpsc;

/// Most flush requests waiting for the sync task. Openraft bounds its own
/// in-flight I/O far below this; reaching it means the disk is stuck.
pub const FLUSH_QUEUE_MAX: usize = 4096;

/// Most requests answered by one sync (keeps one slow sync from starving
/// the callers' progress reports).
pub const FLUSH_BATCH_MAX: usize = 1024;

/// How the disk behaves. The simulated world supplies one that delays syncs
/// and, in canary builds, misbehaves; production uses [`RealDisk`].
pub trait DiskModel: Send + Sync + 'static {
    /// Extra time the next sync takes.
    fn sync_delay(&self) -> Duration {
        Duration::ZERO
    }
    /// Whether to report a flush of this kind before the sync is done.
    /// Only canaries answer yes.
    fn ack_before_sync(&self, _reason: FlushReason) -> bool {
        false
    }
}

/// The disk as it is: no delay, no lies.
pub struct RealDisk;
impl DiskModel for RealDisk {}

pub struct BatchingFlusher {
    tx: mpsc::Sender<(FlushReason, FlushDone)>,
    disk: Arc<dyn DiskModel>,
    /// Syncs run, and their nanoseconds (the sync alone, not the wait).
    stats: Arc<(AtomicU64, AtomicU64)>,
}

impl BatchingFlusher {
    /// Starts the sync task on the current runtime.
    pub fn start(engine: Arc<dyn Engine>, disk: Arc<dyn DiskModel>) -> Self {
        let (tx, mut rx) = mpsc::channel::<(FlushReason, FlushDone)>(FLUSH_QUEUE_MAX);
        let for_task = disk.clone();
        let stats = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let counts = stats.clone();
        tokio::spawn(async move {
            let disk = for_task;
            let mut batch = Vec::with_capacity(FLUSH_BATCH_MAX);
            while rx.recv_many(&mut batch, FLUSH_BATCH_MAX).await > 0 {
                let waiting: Vec<FlushDone> = batch.drain(..).map(|(_, done)| done).collect();
                let delay = disk.sync_delay();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let began = std::time::Instant::now();
                let result = engine.sync();
                counts.0.fetch_add(1, Ordering::Relaxed);
                counts.1.fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
                for done in waiting {
                    done.done(result.as_ref().map(|_| ()).map_err(|e| match e {
                        EngineError::Closed(m) => EngineError::Closed(m.clone()),
                        e => EngineError::Backend(e.to_string()),
                    }));
                }
            }
        });
        Self { tx, disk, stats }
    }
}

impl Flusher for BatchingFlusher {
    fn syncs(&self) -> (u64, u64) {
        (self.stats.0.load(Ordering::Relaxed), self.stats.1.load(Ordering::Relaxed))
    }

    fn flush(&self, reason: FlushReason, done: FlushDone) {
        let done = if self.disk.ack_before_sync(reason) {
            // The lying disk (canaries only): reports the write durable at
            // once, while the sync is still to come.
            done.done(Ok(()));
            FlushDone::new(|_| {})
        } else {
            done
        };
        match self.tx.try_send((reason, done)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((_, done))) => {
                done.done(Err(EngineError::Backend(format!("flush queue full ({FLUSH_QUEUE_MAX}): the disk is stuck"))))
            }
            Err(mpsc::error::TrySendError::Closed((_, done))) => {
                done.done(Err(EngineError::Closed("the sync task has stopped".into())))
            }
        }
    }
}
