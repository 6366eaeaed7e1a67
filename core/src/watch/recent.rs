//! The recently applied revisions of one table, decoded once and shared by
//! every watch stream of the table on a node.
//!
//! Without it, each stream's pump reads each applied revision from the
//! changelog itself: with a thousand streams open on a table, one put cost
//! a thousand changelog reads (and as many `prev_kv` lookups) before the
//! last stream could send its event. With it, the first pump to need a
//! revision reads it and the others take the decoded events from here.
//!
//! Invariants:
//! - the cached revisions are consecutive (`first`, `first + 1`, …): a
//!   reader asking for the revisions after `r` gets a prefix of exactly
//!   those, or nothing (then it reads the changelog itself);
//! - an entry is a revision as it was applied: its events never change
//!   (the `prev_kv` variant is derived once from the same revision);
//! - the cache is bounded in revisions and in bytes, oldest out first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use crate::ids::Revision;
use crate::watch::RevisionEvents;

/// Bounds of a [`RecentRevisions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentLimits {
    pub revisions_max: usize,
    pub bytes_max: usize,
}

impl Default for RecentLimits {
    fn default() -> RecentLimits {
        RecentLimits { revisions_max: 4096, bytes_max: 4 << 20 }
    }
}

/// One applied revision, as watch streams deliver it.
#[derive(Debug)]
pub struct RecentRevision {
    /// The events without `prev_kv`.
    pub plain: RevisionEvents,
    /// The same events with `prev_kv`, once a stream needed them.
    with_prev: OnceLock<RevisionEvents>,
    bytes: usize,
}

impl RecentRevision {
    pub fn new(plain: RevisionEvents) -> RecentRevision {
        let bytes = plain.events.iter().map(|e| e.size_bytes(false)).sum::<usize>() + 64;
        RecentRevision { plain, with_prev: OnceLock::new(), bytes }
    }

    pub fn revision(&self) -> Revision {
        self.plain.revision
    }

    /// The events with `prev_kv`, when some stream derived them already.
    pub fn with_prev(&self) -> Option<&RevisionEvents> {
        self.with_prev.get()
    }

    /// Records the events with `prev_kv` (derived by the caller from the
    /// same revision); the first one recorded stays.
    pub fn set_with_prev(&self, events: RevisionEvents) -> &RevisionEvents {
        debug_assert_eq!(events.revision, self.plain.revision);
        let _ = self.with_prev.set(events);
        self.with_prev.get().expect("set above")
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: VecDeque<Arc<RecentRevision>>,
    bytes: usize,
}

impl Inner {
    fn last(&self) -> Option<Revision> {
        self.entries.back().map(|e| e.revision())
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RecentRevisions {
    limits: RecentLimits,
    inner: Mutex<Inner>,
}

impl RecentRevisions {
    pub fn new(limits: RecentLimits) -> RecentRevisions {
        RecentRevisions { limits, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached revisions right after `after`, at most `max` of them;
    /// empty unless `after + 1` is cached.
    pub fn after(&self, after: Revision, max: usize) -> Vec<Arc<RecentRevision>> {
        let inner = self.lock();
        let Some(first) = inner.entries.front().map(|e| e.revision()) else { return Vec::new() };
        if after.next() < first || Some(after) >= inner.last() {
            return Vec::new();
        }
        let skip = (after.next().get() - first.get()) as usize;
        inner.entries.iter().skip(skip).take(max).cloned().collect()
    }

    /// Adds revisions read from the changelog: consecutive ones, following
    /// the cache's last. Revisions the cache holds already are skipped; a
    /// run that starts after a gap replaces the cache (a snapshot skipped
    /// revisions, or nothing read them for a while). Returns what the cache
    /// holds for `revisions`, so concurrent readers share one copy.
    pub fn extend(&self, revisions: Vec<RecentRevision>) -> Vec<Arc<RecentRevision>> {
        let consecutive = revisions.windows(2).all(|w| w[1].revision() == w[0].revision().next());
        let mut out = Vec::with_capacity(revisions.len());
        if !consecutive {
            return revisions.into_iter().map(Arc::new).collect();
        }
        let mut inner = self.lock();
        for r in revisions {
            match inner.last() {
                Some(last) if r.revision() <= last => {
                    let first = inner.entries.front().map_or(last, |e| e.revision());
                    let cached = (r.revision() >= first)
                        .then(|| inner.entries.get((r.revision().get() - first.get()) as usize).cloned())
                        .flatten();
                    out.push(cached.unwrap_or_else(|| Arc::new(r)));
                    continue;
                }
                Some(last) if r.revision() != last.next() => {
                    inner.entries.clear();
                    inner.bytes = 0;
                }
                _ => {}
            }
            let r = Arc::new(r);
            inner.bytes += r.bytes;
            inner.entries.push_back(r.clone());
            out.push(r);
        }
        while inner.entries.len() > self.limits.revisions_max
            || (inner.bytes > self.limits.bytes_max && inner.entries.len() > 1)
        {
            if let Some(e) = inner.entries.pop_front() {
                inner.bytes -= e.bytes;
            }
        }
        out
    }

    /// How many revisions are cached (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KeyValue;
    use crate::watch::{EventKind, WatchEvent};

    fn rev(r: u64, value_len: usize) -> RecentRevision {
        let kv = KeyValue { key: b"k".to_vec(), value: vec![b'v'; value_len], mod_revision: r, ..KeyValue::default() };
        RecentRevision::new(RevisionEvents {
            revision: Revision(r),
            events: vec![WatchEvent { kind: EventKind::Put, kv, prev_kv: None }],
        })
    }

    fn revisions(v: &[Arc<RecentRevision>]) -> Vec<u64> {
        v.iter().map(|e| e.revision().get()).collect()
    }

    #[test]
    fn readers_get_consecutive_revisions_after_theirs_or_nothing() {
        let c = RecentRevisions::new(RecentLimits::default());
        assert!(c.after(Revision(0), 10).is_empty());
        c.extend((5..=8).map(|r| rev(r, 1)).collect());
        assert_eq!(revisions(&c.after(Revision(4), 10)), vec![5, 6, 7, 8]);
        assert_eq!(revisions(&c.after(Revision(6), 10)), vec![7, 8]);
        assert_eq!(revisions(&c.after(Revision(4), 2)), vec![5, 6]);
        // Revision 4 itself is not cached: a reader after 3 reads the
        // changelog; one at the end has nothing new.
        assert!(c.after(Revision(3), 10).is_empty());
        assert!(c.after(Revision(8), 10).is_empty());
        assert!(c.after(Revision(9), 10).is_empty());
    }

    #[test]
    fn overlapping_reads_share_the_cached_copy_and_a_gap_restarts_the_cache() {
        let c = RecentRevisions::new(RecentLimits::default());
        let first = c.extend((5..=7).map(|r| rev(r, 1)).collect());
        let again = c.extend((6..=9).map(|r| rev(r, 1)).collect());
        assert_eq!(revisions(&again), vec![6, 7, 8, 9]);
        assert!(Arc::ptr_eq(&first[1], &again[0]), "revision 6 is the cached one");
        assert_eq!(revisions(&c.after(Revision(4), 10)), vec![5, 6, 7, 8, 9]);
        c.extend(vec![rev(20, 1), rev(21, 1)]);
        assert!(c.after(Revision(4), 10).is_empty());
        assert_eq!(revisions(&c.after(Revision(19), 10)), vec![20, 21]);
        // Not consecutive: handed back, not cached.
        let odd = c.extend(vec![rev(22, 1), rev(24, 1)]);
        assert_eq!(revisions(&odd), vec![22, 24]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_cache_keeps_within_its_bounds_oldest_out_first() {
        let c = RecentRevisions::new(RecentLimits { revisions_max: 3, bytes_max: 1 << 20 });
        c.extend((1..=5).map(|r| rev(r, 1)).collect());
        assert_eq!(c.len(), 3);
        assert_eq!(revisions(&c.after(Revision(2), 10)), vec![3, 4, 5]);
        let c = RecentRevisions::new(RecentLimits { revisions_max: 100, bytes_max: 1000 });
        c.extend((1..=5).map(|r| rev(r, 400)).collect());
        assert_eq!(c.len(), 2, "two revisions of about 500 bytes fit in 1000");
        // One revision larger than the bound is still kept alone, so
        // readers in step share it.
        c.extend(vec![rev(6, 5000)]);
        assert_eq!(revisions(&c.after(Revision(5), 10)), vec![6]);
    }

    #[test]
    fn the_first_prev_kv_variant_recorded_stays() {
        let c = RecentRevisions::new(RecentLimits::default());
        let e = c.extend(vec![rev(3, 1)]).remove(0);
        assert!(e.with_prev().is_none());
        let mut with = e.plain.clone();
        with.events[0].prev_kv = Some(KeyValue { key: b"k".to_vec(), value: b"old".to_vec(), ..KeyValue::default() });
        let kept = e.set_with_prev(with.clone()).clone();
        let mut other = with.clone();
        other.events[0].prev_kv = None;
        assert_eq!(e.set_with_prev(other), &kept);
        assert_eq!(c.after(Revision(2), 1)[0].with_prev(), Some(&with));
    }
}
