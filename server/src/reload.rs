//! Values built from files and rebuilt when the files change: TLS
//! configurations (listeners, the cluster's QUIC, a follower's client) and
//! token files. One mechanism for all of them.
//!
//! - A change is a file's modification time or length changing.
//! - A rebuild that fails (a certificate written but not yet its key)
//!   keeps the previous value, is logged and counted, and is tried again
//!   at the next check.
//! - Reading the value ([`Reloading::get`]) touches no file: checks run
//!   from a periodic task ([`Reloading::spawn_reloader`]) or where a caller
//!   asks ([`Reloading::reload_if_changed`], e.g. before dialling), never on
//!   a request's path.
//!
//! Invariant: a value in use was built whole from one reading of its files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

/// When each file was last modified and how long it was.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

type Build<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;

/// A value kept current with the files it is built from.
pub struct Reloading<T> {
    what: String,
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: RwLock<Arc<T>>,
    seen: Mutex<Stamp>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("what", &self.what).field("paths", &self.paths).finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value from `paths` with `build`; an error here is the
    /// caller's (a node does not start with files it cannot use).
    pub fn load<E: std::fmt::Display + 'static>(
        what: impl Into<String>,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Arc<Reloading<T>>, E> {
        let seen = stamp(&paths);
        let first = build()?;
        Ok(Arc::new(Reloading {
            what: what.into(),
            paths,
            build: Box::new(move || build().map_err(|e| e.to_string())),
            current: RwLock::new(Arc::new(first)),
            seen: Mutex::new(seen),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    /// The value now.
    pub fn get(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the value when a file changed. Returns whether a new one is
    /// in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.paths);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        match (self.build)() {
            Ok(value) => {
                *seen = now;
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                info!(what = %self.what, "files changed; the new ones are in use");
                true
            }
            Err(e) => {
                // Not recorded as seen: tried again at the next check.
                self.failures.fetch_add(1, Ordering::Relaxed);
                warn!(what = %self.what, "files changed but cannot be used (yet), keeping the previous ones: {e}");
                false
            }
        }
    }

    /// Rebuilds after changes.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Changes whose files could not be used.
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Checks the files every `interval` for as long as the value is in
    /// use; `on_change` gets each new value.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration, on_change: impl Fn(Arc<T>) + Send + 'static) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(source) = weak.upgrade() else { return };
                if source.reload_if_changed() {
                    on_change(source.get());
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_used_and_a_broken_one_keeps_the_previous_value_until_fixed() {
        let dir = std::env::temp_dir().join(format!("armada-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("n");
        std::fs::write(&f, "1").unwrap();
        let path = f.clone();
        let r = Reloading::load("number", vec![f.clone()], move || {
            std::fs::read_to_string(&path).unwrap_or_default().trim().parse::<u32>().map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(*r.get(), 1);
        assert!(!r.reload_if_changed(), "nothing changed");
        std::fs::write(&f, "22").unwrap();
        assert!(r.reload_if_changed());
        assert_eq!(*r.get(), 22);
        std::fs::write(&f, "x").unwrap();
        assert!(!r.reload_if_changed());
        assert_eq!((*r.get(), r.reload_failures()), (22, 1), "the broken file keeps the previous value");
        assert!(!r.reload_if_changed());
        assert_eq!(r.reload_failures(), 2, "a failed change is tried again");
        std::fs::write(&f, "333").unwrap();
        assert!(r.reload_if_changed());
        assert_eq!((*r.get(), r.reloads()), (333, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
