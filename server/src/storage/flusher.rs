//! Group commit: one background thread (a task under simulation) makes
//! engine writes durable. Every
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
    #[cfg(not(madsim))]
    inline: Inline,
    /// The sync thread, joined when the flusher is dropped: it holds the
    /// engine, and a RocksDB still open on it while the process exits
    /// aborted the process (SIGABRT after SIGTERM, `tests/processes.rs`).
    #[cfg(not(madsim))]
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(not(madsim))]
impl Drop for BatchingFlusher {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.tx = mpsc::channel(1).0;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What lets a flush sync on the caller's thread when the sync thread is
/// idle (native only): at one client, handing every sync to the thread and
/// back cost two thread wake-ups per put.
#[cfg(not(madsim))]
struct Inline {
    engine: Arc<dyn Engine>,
    /// Held by whoever syncs and answers (the thread or an inline caller),
    /// from taking requests until every one is answered, so answers keep
    /// the order of requests.
    syncing: Arc<std::sync::Mutex<()>>,
    /// Requests sent to the thread and not yet taken by it.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// The sync loop: takes every waiting request, syncs once, answers them all.
fn sync_round(engine: &dyn Engine, stats: &(AtomicU64, AtomicU64), batch: &mut Vec<(FlushReason, FlushDone)>) {
    let began = std::time::Instant::now();
    let result = engine.sync();
    stats.0.fetch_add(1, Ordering::Relaxed);
    stats.1.fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
    for (_, done) in batch.drain(..) {
        done.done(result.as_ref().map(|_| ()).map_err(|e| match e {
            EngineError::Closed(m) => EngineError::Closed(m.clone()),
            e => EngineError::Backend(e.to_string()),
        }));
    }
}

impl BatchingFlusher {
    /// Starts the sync loop: natively on a thread of its own, so an fsync
    /// never blocks one of the runtime's worker threads (with two workers,
    /// a sync task held one of them for most of every second under write
    /// load); under simulation as a task of the simulated node.
    #[cfg(madsim)]
    pub fn start(engine: Arc<dyn Engine>, disk: Arc<dyn DiskModel>) -> Self {
        let (tx, rx) = mpsc::channel::<(FlushReason, FlushDone)>(FLUSH_QUEUE_MAX);
        let stats = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        Self::run(engine, disk.clone(), rx, stats.clone());
        Self { tx, disk, stats }
    }

    /// Natively, a flush that finds the thread idle and nothing queued
    /// syncs on the caller's thread (see [`Inline`]); the others queue for
    /// the thread, which answers all that wait with one sync.
    #[cfg(not(madsim))]
    pub fn start(engine: Arc<dyn Engine>, disk: Arc<dyn DiskModel>) -> Self {
        let (tx, rx) = mpsc::channel::<(FlushReason, FlushDone)>(FLUSH_QUEUE_MAX);
        let stats = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let inline = Inline { engine: engine.clone(), syncing: Arc::default(), queued: Arc::default() };
        let thread = Self::run(engine, disk.clone(), rx, stats.clone(), inline.syncing.clone(), inline.queued.clone());
        Self { tx, disk, stats, inline, thread }
    }

    #[cfg(madsim)]
    fn run(
        engine: Arc<dyn Engine>,
        disk: Arc<dyn DiskModel>,
        mut rx: mpsc::Receiver<(FlushReason, FlushDone)>,
        stats: Arc<(AtomicU64, AtomicU64)>,
    ) {
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(FLUSH_BATCH_MAX);
            while rx.recv_many(&mut batch, FLUSH_BATCH_MAX).await > 0 {
                let delay = disk.sync_delay();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                sync_round(&*engine, &stats, &mut batch);
            }
        });
    }

    #[cfg(not(madsim))]
    fn run(
        engine: Arc<dyn Engine>,
        disk: Arc<dyn DiskModel>,
        mut rx: mpsc::Receiver<(FlushReason, FlushDone)>,
        stats: Arc<(AtomicU64, AtomicU64)>,
        syncing: Arc<std::sync::Mutex<()>>,
        queued: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let spawned = std::thread::Builder::new().name("armada-sync".into()).spawn(move || {
            let mut batch = Vec::with_capacity(FLUSH_BATCH_MAX);
            // Ends when every sender is gone (the node stopped).
            while let Some(first) = rx.blocking_recv() {
                let _turn = syncing.lock().unwrap_or_else(|p| p.into_inner());
                batch.push(first);
                while batch.len() < FLUSH_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                queued.fetch_sub(batch.len(), Ordering::SeqCst);
                let delay = disk.sync_delay();
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                sync_round(&*engine, &stats, &mut batch);
            }
        });
        // Without the thread nothing is ever made durable: requests then
        // fail (the channel's receiver is gone) and the node fail-stops.
        spawned.map_err(|e| tracing::error!("cannot start the sync thread: {e}")).ok()
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
        #[cfg(not(madsim))]
        let done = match self.inline.try_sync(&self.stats, reason, done) {
            None => return,
            Some(done) => done,
        };
        #[cfg(not(madsim))]
        self.inline.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send((reason, done)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((_, done))) => {
                #[cfg(not(madsim))]
                self.inline.queued.fetch_sub(1, Ordering::SeqCst);
                done.done(Err(EngineError::Backend(format!("flush queue full ({FLUSH_QUEUE_MAX}): the disk is stuck"))))
            }
            Err(mpsc::error::TrySendError::Closed((_, done))) => {
                #[cfg(not(madsim))]
                self.inline.queued.fetch_sub(1, Ordering::SeqCst);
                done.done(Err(EngineError::Closed("the sync task has stopped".into())))
            }
        }
    }
}

#[cfg(not(madsim))]
impl Inline {
    /// Syncs and answers `done` here if nothing is queued and no sync is
    /// running; otherwise gives `done` back to be queued. Answers keep the
    /// order of requests: a request queued earlier is either still counted
    /// in `queued` (so this one queues behind it) or was taken by the
    /// thread, which answers it before releasing `syncing`.
    fn try_sync(&self, stats: &(AtomicU64, AtomicU64), reason: FlushReason, done: FlushDone) -> Option<FlushDone> {
        if self.queued.load(Ordering::SeqCst) != 0 {
            return Some(done);
        }
        let Ok(_turn) = self.syncing.try_lock() else { return Some(done) };
        if self.queued.load(Ordering::SeqCst) != 0 {
            return Some(done);
        }
        sync_round(&*self.engine, stats, &mut vec![(reason, done)]);
        None
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use armada_core::engine::{EngineView, Pair};
    use armada_core::{MemEngine, WriteBatch};
    use std::sync::Mutex;

    /// A memory engine that counts writes and remembers how many writes the
    /// last sync covered.
    #[derive(Default)]
    struct Counting {
        inner: MemEngine,
        writes: AtomicU64,
        synced: AtomicU64,
    }

    impl Engine for Counting {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
            self.inner.get(key)
        }
        fn scan(&self, s: &[u8], e: &[u8], v: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
            self.inner.scan(s, e, v)
        }
        fn last(&self, s: &[u8], e: &[u8]) -> Result<Option<Pair>, EngineError> {
            self.inner.last(s, e)
        }
        fn write(&self, b: WriteBatch) -> Result<(), EngineError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.inner.write(b)
        }
        fn sync(&self) -> Result<(), EngineError> {
            let covered = self.writes.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            self.synced.fetch_max(covered, Ordering::SeqCst);
            Ok(())
        }
        fn view(&self, s: &[u8], e: &[u8]) -> Result<Arc<dyn EngineView>, EngineError> {
            self.inner.view(s, e)
        }
    }

    /// Writers on several threads each write, then flush, many times: every
    /// flush is answered only once its write is synced, and each writer
    /// hears its answers in the order it asked (the thread and the inline
    /// path take turns).
    #[test]
    fn every_answer_follows_its_sync_and_each_writer_hears_in_order() {
        let engine = Arc::new(Counting::default());
        let flusher = Arc::new(BatchingFlusher::start(engine.clone(), Arc::new(RealDisk)));
        let heard: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); 4]));
        let violations = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (engine, flusher, heard, violations) =
                    (engine.clone(), flusher.clone(), heard.clone(), violations.clone());
                std::thread::spawn(move || {
                    let (tx, rx) = std::sync::mpsc::channel();
                    for i in 0..200u64 {
                        let mut b = WriteBatch::new();
                        b.put(format!("{w}/{i}").into_bytes(), b"v".to_vec());
                        engine.write(b).unwrap();
                        let mine = engine.writes.load(Ordering::SeqCst);
                        let (e, h, v, tx) = (engine.clone(), heard.clone(), violations.clone(), tx.clone());
                        flusher.flush(
                            FlushReason::Append,
                            FlushDone::new(move |r| {
                                if r.is_err() || e.synced.load(Ordering::SeqCst) < mine {
                                    v.fetch_add(1, Ordering::SeqCst);
                                }
                                h.lock().unwrap()[w].push(i);
                                let _ = tx.send(());
                            }),
                        );
                        // Keep a few flushes in flight, as Raft does.
                        if i >= 3 {
                            rx.recv().unwrap();
                        }
                    }
                    for _ in 0..3 {
                        rx.recv().unwrap();
                    }
                })
            })
            .collect();
        for t in writers {
            t.join().unwrap();
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0, "an answer came before its write was synced");
        for (w, order) in heard.lock().unwrap().iter().enumerate() {
            assert_eq!(order, &(0..200).collect::<Vec<u64>>(), "writer {w} heard its answers out of order");
        }
        let (syncs, _) = flusher.syncs();
        assert!((1..=800).contains(&syncs), "{syncs} syncs for 800 flushes");
    }

    /// Dropping the flusher ends and joins its thread, which lets go of the
    /// engine (a RocksDB still held by it aborted the process at exit).
    #[test]
    fn dropping_the_flusher_releases_the_engine() {
        let engine = Arc::new(Counting::default());
        let flusher = BatchingFlusher::start(engine.clone(), Arc::new(RealDisk));
        let (tx, rx) = std::sync::mpsc::channel();
        flusher.flush(FlushReason::Vote, FlushDone::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.recv().unwrap());
        drop(flusher);
        assert_eq!(Arc::strong_count(&engine), 1, "the sync thread still holds the engine");
    }
}
