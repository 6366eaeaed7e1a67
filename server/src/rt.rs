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
use std::time::Duration;
#[cfg(not(madsim))]
use std::time::Instant;

use openraft::async_runtime::watch::{RecvError, SendError, Watch, WatchReceiver, WatchSender};
use openraft::{AsyncRuntime, OptionalSend, OptionalSync};
use rand_chacha::rand_core::SeedableRng;

/// The runtime Armada's Raft groups run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArmadaRt;

pub use armada_net::time::{timeout, Elapsed, Sleep, Timeout};

/// The clock Raft's timers (and leases) run on: the node's own (in
/// simulation, subject to the simulator's clock faults).
#[cfg(not(madsim))]
pub type RaftInstant = Instant;
#[cfg(madsim)]
pub type RaftInstant = clock::LocalInstant;

#[cfg(not(madsim))]
fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(madsim)]
fn until(deadline: clock::LocalInstant) -> Duration {
    clock::to_global(deadline - <clock::LocalInstant as openraft::Instant>::now())
}

#[cfg(not(madsim))]
fn raft_sleep(d: Duration) -> Sleep {
    armada_net::time::sleep(d)
}

#[cfg(madsim)]
fn raft_sleep(d: Duration) -> Sleep {
    armada_net::time::sleep(clock::to_global(d))
}

/// Each simulated node's Raft clock: the simulator's clock faults make a
/// node's Raft timers (elections, heartbeats, leader leases) run fast or
/// slow, or jump forward, while the rest of the world keeps simulated time.
/// Production uses `std::time::Instant` unchanged.
#[cfg(madsim)]
pub mod clock {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::ops::{Add, AddAssign, Sub, SubAssign};
    use std::time::{Duration, Instant};

    use madsim::task::NodeId;

    /// A node's Raft time: simulated time, scaled by the node's clock rate
    /// and moved by its jumps since the rate last changed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct LocalInstant(Instant);

    /// Where a node's clock stood when its rate last changed.
    #[derive(Clone, Copy)]
    struct Clock {
        global: Instant,
        local: Instant,
        /// Local nanoseconds per simulated nanosecond, in millionths.
        rate_ppm: u64,
    }

    thread_local! {
        static CLOCKS: RefCell<BTreeMap<NodeId, Clock>> = const { RefCell::new(BTreeMap::new()) };
    }

    fn local_of(c: &Clock, now: Instant) -> Instant {
        let elapsed = now.saturating_duration_since(c.global);
        c.local + scale(elapsed, c.rate_ppm, 1_000_000)
    }

    fn scale(d: Duration, num: u64, den: u64) -> Duration {
        Duration::from_nanos((d.as_nanos() * u128::from(num) / u128::from(den.max(1))) as u64)
    }

    fn current() -> Option<Clock> {
        let node = madsim::plugin::node();
        CLOCKS.with_borrow(|c| c.get(&node).copied())
    }

    /// Sets node `node`'s clock rate (1,000,000: real time) from now on,
    /// and moves it `jump` forward. A clock never goes back.
    pub fn set(node: NodeId, rate_ppm: u64, jump: Duration) {
        let now = Instant::now();
        CLOCKS.with_borrow_mut(|c| {
            let local = c.get(&node).map_or(now, |k| local_of(k, now)) + jump;
            c.insert(node, Clock { global: now, local, rate_ppm: rate_ppm.max(1) });
        });
    }

    /// Every node's clock back to simulated time (a new world).
    pub fn reset() {
        CLOCKS.with_borrow_mut(|c| c.clear());
    }

    /// The simulated time a local duration takes on this node.
    pub fn to_global(d: Duration) -> Duration {
        match current() {
            Some(c) => scale(d, 1_000_000, c.rate_ppm),
            None => d,
        }
    }

    impl openraft::Instant for LocalInstant {
        fn now() -> Self {
            let now = Instant::now();
            LocalInstant(match current() {
                Some(c) => local_of(&c, now),
                None => now,
            })
        }
    }

    impl Add<Duration> for LocalInstant {
        type Output = Self;
        fn add(self, d: Duration) -> Self {
            LocalInstant(self.0 + d)
        }
    }
    impl AddAssign<Duration> for LocalInstant {
        fn add_assign(&mut self, d: Duration) {
            self.0 += d;
        }
    }
    impl Sub<Duration> for LocalInstant {
        type Output = Self;
        fn sub(self, d: Duration) -> Self {
            LocalInstant(self.0 - d)
        }
    }
    impl SubAssign<Duration> for LocalInstant {
        fn sub_assign(&mut self, d: Duration) {
            self.0 -= d;
        }
    }
    impl Sub<LocalInstant> for LocalInstant {
        type Output = Duration;
        fn sub(self, earlier: LocalInstant) -> Duration {
            self.0.saturating_duration_since(earlier.0)
        }
    }
}

impl AsyncRuntime for ArmadaRt {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = Sleep;
    // Under madsim `std::time::Instant::now()` is simulated time, and each
    // node's Raft clock is its own (see `clock`).
    type Instant = RaftInstant;
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
        raft_sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        armada_net::time::sleep(until(deadline))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        #[cfg(madsim)]
        let duration = clock::to_global(duration);
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

/// Milliseconds since the Unix epoch by the clock tokens expire by: the
/// wall clock, and in simulation builds the simulated world's (seeded,
/// deterministic) wall clock.
pub fn token_clock_ms() -> u64 {
    #[cfg(madsim)]
    let now = madsim::time::TimeHandle::current().now_time();
    #[cfg(not(madsim))]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `n` bytes from the operating system's random source (salts, signing
/// keys); in simulation builds, from the seeded generator.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    #[cfg(madsim)]
    {
        Ok((0..n).map(|_| madsim::rand::random::<u8>()).collect())
    }
    #[cfg(not(madsim))]
    {
        let mut b = vec![0u8; n];
        getrandom::fill(&mut b).map_err(|e| format!("the operating system's random source failed: {e}"))?;
        Ok(b)
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
