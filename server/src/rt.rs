//! openraft's `AsyncRuntime` over the `tokio` alias: real tokio normally,
//! madsim's simulated runtime under `--cfg madsim`. The same code serves both
//! worlds.
//!
//! Two deliberate departures from openraft's own tokio runtime, both for
//! determinism under simulation:
//! - [`DetWatch`] replaces `tokio::sync::watch`, which picks the waiter to
//!   wake with tokio's thread-local random generator (seeded from a
//!   process-wide counter that madsim cannot reset);
//! - under simulation `spawn_blocking` runs the closure inline instead of on
//!   an OS thread, which the simulation forbids (natively it is tokio's).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::{RecvError, SendError, Watch, WatchReceiver, WatchSender};
use openraft::{AsyncRuntime, OptionalSend, OptionalSync};
use rand_chacha::rand_core::SeedableRng;

/// The runtime Armada's Raft groups run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArmadaRt;

pub use armada_net::time::{timeout, Elapsed, Sleep, Timeout};

fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

impl AsyncRuntime for ArmadaRt {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = Sleep;
    // Under madsim `std::time::Instant::now()` is simulated time.
    type Instant = Instant;
    type TimeoutError = Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<T>;
    type ThreadLocalRng = rand_chacha::ChaCha8Rng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        armada_net::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        armada_net::time::sleep(until(deadline))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        timeout(until(deadline), future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        // madsim's generator is seeded by the simulation; outside it this is
        // real randomness. Either way openraft's election jitter comes from here.
        rand_chacha::ChaCha8Rng::seed_from_u64(madsim::rand::random::<u64>())
    }

    type Mpsc = openraft_rt_tokio::TokioMpsc;
    type Watch = DetWatch;
    type Oneshot = openraft_rt_tokio::TokioOneshot;
    type Mutex<T: OptionalSend + 'static> = openraft_rt_tokio::TokioMutex<T>;

    fn new(_threads: usize) -> Self {
        ArmadaRt
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        #[cfg(madsim)]
        {
            madsim::runtime::Runtime::new().block_on(future)
        }
        #[cfg(not(madsim))]
        {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a current-thread tokio runtime only fails if the OS refuses a timer or I/O driver")
                .block_on(future)
        }
    }

    async fn spawn_blocking<F, T>(f: F) -> Result<T, std::io::Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        blocking(f).await.map_err(std::io::Error::other)
    }
}

/// A watch channel whose wake-ups are FIFO (one `Notify`), so which task runs
/// next depends only on the order tasks started waiting.
pub struct DetWatch;

struct Shared<T> {
    value: RwLock<T>,
    version: AtomicU64,
    notify: tokio::sync::Notify,
    senders: AtomicUsize,
    receivers: AtomicUsize,
}

impl<T> Shared<T> {
    fn read(&self) -> RwLockReadGuard<'_, T> {
        self.value.read().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct DetSender<T> {
    shared: Arc<Shared<T>>,
}

pub struct DetReceiver<T> {
    shared: Arc<Shared<T>>,
    seen: u64,
}

impl<T> Clone for DetSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for DetSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.notify.notify_waiters();
        }
    }
}

impl<T> Clone for DetReceiver<T> {
    fn clone(&self) -> Self {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        Self { shared: self.shared.clone(), seen: self.seen }
    }
}

impl<T> Drop for DetReceiver<T> {
    fn drop(&mut self) {
        self.shared.receivers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Watch for DetWatch {
    type Sender<T: OptionalSend + OptionalSync> = DetSender<T>;
    type Receiver<T: OptionalSend + OptionalSync> = DetReceiver<T>;
    type Ref<'a, T: OptionalSend + 'a> = RwLockReadGuard<'a, T>;

    fn channel<T: OptionalSend + OptionalSync>(init: T) -> (Self::Sender<T>, Self::Receiver<T>) {
        let shared = Arc::new(Shared {
            value: RwLock::new(init),
            version: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
            senders: AtomicUsize::new(1),
            receivers: AtomicUsize::new(1),
        });
        (DetSender { shared: shared.clone() }, DetReceiver { shared, seen: 0 })
    }
}

impl<T: OptionalSend + OptionalSync> WatchSender<DetWatch, T> for DetSender<T> {
    fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.shared.receivers.load(Ordering::SeqCst) == 0 {
            return Err(SendError(value));
        }
        *self.shared.value.write().unwrap_or_else(|p| p.into_inner()) = value;
        self.shared.version.fetch_add(1, Ordering::SeqCst);
        self.shared.notify.notify_waiters();
        Ok(())
    }

    fn send_if_modified<F>(&self, modify: F) -> bool
    where
        F: FnOnce(&mut T) -> bool,
    {
        let modified = {
            let mut guard = self.shared.value.write().unwrap_or_else(|p| p.into_inner());
            modify(&mut guard)
        };
        if modified {
            self.shared.version.fetch_add(1, Ordering::SeqCst);
            self.shared.notify.notify_waiters();
        }
        modified
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn subscribe(&self) -> DetReceiver<T> {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        DetReceiver { shared: self.shared.clone(), seen: self.shared.version.load(Ordering::SeqCst) }
    }
}

impl<T: OptionalSend + OptionalSync> WatchReceiver<DetWatch, T> for DetReceiver<T> {
    async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            // Register interest before checking, so a send in between is not missed.
            let notified = self.shared.notify.notified();
            let version = self.shared.version.load(Ordering::SeqCst);
            if version != self.seen {
                self.seen = version;
                return Ok(());
            }
            if self.shared.senders.load(Ordering::SeqCst) == 0 {
                return Err(RecvError(()));
            }
            notified.await;
        }
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn borrow_and_update(&mut self) -> RwLockReadGuard<'_, T> {
        self.seen = self.shared.version.load(Ordering::SeqCst);
        self.shared.read()
    }
}

/// Wall-clock milliseconds since the Unix epoch, for information only (a
/// backup's header). Always 0 in simulation builds: nothing there may read
/// the wall clock.
pub fn unix_time_ms() -> u64 {
    #[cfg(madsim)]
    {
        0
    }
    #[cfg(not(madsim))]
    {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// Runs a blocking storage job on a blocking thread, off the async workers
/// (inline in simulation builds, which have no real threads). `Err` only if
/// the runtime is shutting down.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    #[cfg(not(madsim))]
    {
        match tokio::task::spawn_blocking(f).await {
            Ok(v) => Ok(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(format!("node stopping: {e}")),
        }
    }
    #[cfg(madsim)]
    {
        Ok(f())
    }
}
