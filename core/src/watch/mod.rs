//! Watch: one client stream carrying many watchers of one table, as a
//! sans-IO state machine ([`WatchStream`]), with etcd v3's semantics.
//!
//! The driver (the etcd and armada.v1 Watch services in `armada-server`)
//! feeds it the client's requests ([`WatchStream::handle_create`],
//! [`WatchStream::handle_cancel`], [`WatchStream::handle_progress_request`]),
//! every batch of revisions the table applies on this node
//! ([`WatchStream::handle_applied`]), the history it asked for
//! ([`WatchStream::poll_history`] / [`WatchStream::handle_history`]) and
//! time ([`WatchStream::handle_tick`]); it sends what
//! [`WatchStream::poll_response`] returns, in order.
//!
//! - **Start.** A watcher starts at its `start_revision`, or at the next
//!   revision when it gives none. One whose start is at or below the
//!   table's compaction revision is created and then cancelled with the
//!   compaction revision (etcd's compacted answer).
//! - **No gap, no duplicate, in order.** Each watcher has the next revision
//!   it is owed (`next`). Applied revisions go only to watchers whose `next`
//!   they reach without a gap; a watcher behind them (started in the past,
//!   or skipped while its stream was full) is owed history first, which the
//!   machine asks the driver for, from `next`. A revision's events are in
//!   one response, in the order of its mutations (a response larger than
//!   the limit is cut into fragments only when the watcher asked for it).
//! - **Bounded memory.** Responses wait in the stream's outbox; while it
//!   holds more than [`Config::outbox_bytes_max`], applied revisions are not
//!   queued (the watchers owed them fall behind and catch up from history
//!   once the client reads). A watcher whose history was compacted away
//!   meanwhile is cancelled with the compaction revision, as etcd does. A
//!   slow client therefore costs its own stream a bounded outbox, and
//!   never holds up writers or other streams.
//! - **Progress.** A progress notification claims a revision only once
//!   every watcher it speaks for has been given everything up to it: the
//!   stream-wide progress request waits until no watcher is behind, and
//!   the periodic one (for watchers that asked) goes only to watchers that
//!   are in step and got no events since the last tick.
//!
//! `prev_kv` is the key's value before the event; the driver supplies it
//! with the revisions it passes in ([`Revision`]s of [`WatchEvent`]s), and
//! [`WatchStream::wants_prev_kv`] says whether any watcher needs it.

use std::borrow::Borrow;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::ids::Revision;
use crate::kv::KeyValue;

mod recent;
#[cfg(test)]
mod tests;

pub use recent::{RecentLimits, RecentRevision, RecentRevisions};

/// What a watcher watches, as etcd's `WatchCreateRequest` says it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchSpec {
    /// The client's id for the watcher; `None`: the stream chooses one.
    pub watch_id: Option<i64>,
    pub key: Vec<u8>,
    /// Empty: the key alone; `[0]`: every key from `key` on; otherwise the
    /// end (exclusive) of the range.
    pub range_end: Vec<u8>,
    /// The first revision to deliver; `None`: the next one applied.
    pub start_revision: Option<Revision>,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

impl WatchSpec {
    /// Whether `key` is in the watched range.
    pub fn covers(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else if self.range_end == [0] {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }

    fn passes(&self, e: &WatchEvent) -> bool {
        self.covers(&e.kv.key)
            && match e.kind {
                EventKind::Put => !self.no_put,
                EventKind::Delete => !self.no_delete,
            }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One key's change at one revision. A deletion's `kv` holds the key and
/// the revision of the deletion (its other fields are 0), as etcd's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The key's value before this event (when it had one), filled in by
    /// the driver when [`WatchStream::wants_prev_kv`].
    pub prev_kv: Option<KeyValue>,
}

impl WatchEvent {
    fn size_bytes(&self, with_prev: bool) -> usize {
        let kv = |k: &KeyValue| k.key.len() + k.value.len() + 32;
        kv(&self.kv) + if with_prev { self.prev_kv.as_ref().map_or(0, kv) } else { 0 }
    }
}

/// The events of one revision, in the order of the revision's mutations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionEvents {
    pub revision: Revision,
    pub events: Vec<WatchEvent>,
}

/// A response on the stream, as etcd's `WatchResponse` says it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchResponse {
    /// The watcher it is for; -1: the whole stream (a progress response).
    pub watch_id: i64,
    /// The header's revision.
    pub revision: Revision,
    pub created: bool,
    pub canceled: bool,
    pub cancel_reason: String,
    /// Non-zero: the watcher's history is compacted up to here (it is
    /// cancelled).
    pub compact_revision: Revision,
    /// More events of this response follow in the next one.
    pub fragment: bool,
    pub events: Vec<WatchEvent>,
}

/// Limits of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// While the outbox holds more than this, applied revisions are not
    /// queued (watchers owed them catch up from history later).
    pub outbox_bytes_max: usize,
    /// Most watchers on one stream.
    pub watchers_max: usize,
    /// A response with events larger than this is cut into fragments for a
    /// watcher that asked for fragments.
    pub response_bytes_max: usize,
    /// Most revisions asked for in one history request.
    pub history_revisions_max: u64,
    /// How often watchers that asked for it are told the revision when they
    /// got no events (etcd: 10 minutes).
    pub progress_interval: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            outbox_bytes_max: 4 << 20,
            watchers_max: 10_000,
            response_bytes_max: (3 << 20) / 2,
            history_revisions_max: 256,
            progress_interval: Duration::from_secs(600),
        }
    }
}

/// What the table holds on this node when an input arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableState {
    /// The last revision applied here.
    pub current: Revision,
    /// The compaction revision: history below it is gone (as in etcd, the
    /// revision itself is still served, without `prev_kv`).
    pub compacted: Revision,
}

/// The history the machine needs: revisions from `from` on (at most
/// `max_revisions` of them), with `prev_kv` when `prev_kv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRequest {
    pub from: Revision,
    pub max_revisions: u64,
    pub prev_kv: bool,
}

/// The driver's answer to a [`HistoryRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// Consecutive revisions from the request's `from` (possibly fewer than
    /// asked, never with a gap; empty when `from` is not applied yet).
    Revisions(Vec<RevisionEvents>),
    /// History before `first_retained` is gone.
    Compacted { first_retained: Revision },
}

/// Why a create request was refused.
pub const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
pub const TOO_MANY: &str = "too many watchers on this stream";

#[derive(Debug)]
struct Watcher {
    spec: WatchSpec,
    /// The next revision this watcher is owed.
    next: Revision,
    /// Events were sent since the last progress tick.
    sent_since_tick: bool,
}

/// The watchers of one client stream on one table.
#[derive(Debug)]
pub struct WatchStream {
    config: Config,
    watchers: BTreeMap<i64, Watcher>,
    next_auto_id: i64,
    table: TableState,
    outbox: VecDeque<WatchResponse>,
    outbox_bytes: usize,
    /// A stream-wide progress request waits for every watcher to catch up.
    progress_requested: bool,
    /// A history request is outstanding.
    history_pending: Option<HistoryRequest>,
    last_tick: Option<Duration>,
}

impl WatchStream {
    pub fn new(config: Config, table: TableState) -> WatchStream {
        WatchStream {
            config,
            watchers: BTreeMap::new(),
            next_auto_id: 0,
            table,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            progress_requested: false,
            history_pending: None,
            last_tick: None,
        }
    }

    /// Number of watchers on the stream.
    pub fn watchers(&self) -> usize {
        self.watchers.len()
    }

    /// Whether events passed in need `prev_kv` filled in.
    pub fn wants_prev_kv(&self) -> bool {
        self.watchers.values().any(|w| w.spec.prev_kv)
    }

    /// Whether responses wait to be sent.
    pub fn has_responses(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Whether applied revisions are queued now (the outbox is within its
    /// bound); when not, the driver need not read them.
    pub fn accepts_applied(&self) -> bool {
        self.outbox_bytes <= self.config.outbox_bytes_max
    }

    /// The next response to send.
    pub fn poll_response(&mut self) -> Option<WatchResponse> {
        let r = self.outbox.pop_front()?;
        self.outbox_bytes -= response_bytes(&r);
        Some(r)
    }

    /// History to read for watchers that are behind (at most one request
    /// outstanding; none while the outbox is full).
    pub fn poll_history(&mut self) -> Option<HistoryRequest> {
        if self.history_pending.is_some() || self.outbox_bytes > self.config.outbox_bytes_max {
            return None;
        }
        let from = self.behind().map(|w| w.next).min()?;
        let prev_kv = self.behind().any(|w| w.spec.prev_kv);
        let request = HistoryRequest { from, max_revisions: self.config.history_revisions_max, prev_kv };
        self.history_pending = Some(request);
        Some(request)
    }

    /// A client's create request.
    pub fn handle_create(&mut self, spec: WatchSpec, table: TableState) {
        self.observe(table);
        let refuse = |id: i64, reason: &str| WatchResponse {
            watch_id: id,
            revision: table.current,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..WatchResponse::default()
        };
        let id = match spec.watch_id {
            Some(id) if self.watchers.contains_key(&id) => return self.push(refuse(id, DUPLICATE_ID)),
            Some(id) => id,
            None => {
                while self.watchers.contains_key(&self.next_auto_id) {
                    self.next_auto_id += 1;
                }
                self.next_auto_id += 1;
                self.next_auto_id - 1
            }
        };
        if self.watchers.len() >= self.config.watchers_max {
            return self.push(refuse(id, TOO_MANY));
        }
        self.push(WatchResponse { watch_id: id, revision: table.current, created: true, ..WatchResponse::default() });
        let next = spec.start_revision.filter(|r| r.get() > 0).unwrap_or(table.current.next());
        // etcd's rule: the compaction revision itself is still served (a
        // client told "compacted at R" resumes at R).
        if next < table.compacted {
            crate::probe!(WatchCompacted);
            return self.push(compacted(id, table));
        }
        self.watchers.insert(id, Watcher { spec, next, sent_since_tick: false });
    }

    /// A client's cancel request; an unknown id is ignored (as etcd does).
    pub fn handle_cancel(&mut self, watch_id: i64) {
        if self.watchers.remove(&watch_id).is_some() {
            let r = self.table.current;
            self.push(WatchResponse { watch_id, revision: r, canceled: true, ..WatchResponse::default() });
            self.progress_if_due();
        }
    }

    /// A client's progress request: answered once every watcher has been
    /// given everything up to the revision it claims.
    pub fn handle_progress_request(&mut self) {
        self.progress_requested = true;
        self.progress_if_due();
    }

    /// Revisions just applied on this node, consecutive, with `table` as it
    /// is after them.
    pub fn handle_applied<R: Borrow<RevisionEvents>>(&mut self, revisions: &[R], table: TableState) {
        self.observe(table);
        if let (Some(first), false) = (revisions.first(), self.outbox_bytes > self.config.outbox_bytes_max) {
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                self.deliver(id, first.borrow().revision, revisions);
            }
        }
        self.progress_if_due();
    }

    /// The answer to the outstanding [`HistoryRequest`].
    pub fn handle_history(&mut self, history: History, table: TableState) {
        self.observe(table);
        let Some(request) = self.history_pending.take() else { return };
        match history {
            History::Revisions(revisions) => {
                if let Some(last) = revisions.last() {
                    crate::probe!(WatchHistoryServed);
                    self.table.current = self.table.current.max(last.revision);
                }
                let ids: Vec<i64> = self.watchers.keys().copied().collect();
                for id in ids {
                    self.deliver(id, request.from, &revisions);
                }
            }
            History::Compacted { first_retained } => {
                let gone: Vec<i64> =
                    self.watchers.iter().filter(|(_, w)| w.next < first_retained).map(|(id, _)| *id).collect();
                for id in gone {
                    crate::probe!(WatchCompacted);
                    self.watchers.remove(&id);
                    let t = TableState { compacted: first_retained, ..self.table };
                    self.push(compacted(id, t));
                }
            }
        }
        self.progress_if_due();
    }

    /// Time passes: watchers that asked for progress notifications and got
    /// no events since the last tick, and are in step, are told the
    /// revision, once every [`Config::progress_interval`].
    pub fn handle_tick(&mut self, now: Duration) {
        let Some(last) = self.last_tick else {
            self.last_tick = Some(now);
            return;
        };
        if now < last + self.config.progress_interval {
            return;
        }
        self.last_tick = Some(now);
        let current = self.table.current;
        let due: Vec<i64> = self
            .watchers
            .iter_mut()
            .filter_map(|(id, w)| {
                let quiet = !std::mem::take(&mut w.sent_since_tick);
                (w.spec.progress_notify && quiet && w.next == current.next()).then_some(*id)
            })
            .collect();
        for id in due {
            self.push(WatchResponse { watch_id: id, revision: current, ..WatchResponse::default() });
        }
    }

    /// When to call [`WatchStream::handle_tick`] next (only while a watcher
    /// asked for progress notifications).
    pub fn poll_timeout(&self) -> Option<Duration> {
        let interval = self.config.progress_interval;
        self.watchers
            .values()
            .any(|w| w.spec.progress_notify)
            .then(|| self.last_tick.map_or(interval, |t| t + interval))
    }

    fn observe(&mut self, table: TableState) {
        self.table.current = self.table.current.max(table.current);
        self.table.compacted = self.table.compacted.max(table.compacted);
    }

    /// Watchers owed revisions that no longer come as they apply.
    fn behind(&self) -> impl Iterator<Item = &Watcher> {
        let current = self.table.current;
        self.watchers.values().filter(move |w| w.next <= current)
    }

    /// Gives watcher `id` the events it is owed among `revisions` (which
    /// start at `first`), if they continue where it stands.
    fn deliver<R: Borrow<RevisionEvents>>(&mut self, id: i64, first: Revision, revisions: &[R]) {
        let Some(w) = self.watchers.get(&id) else { return };
        let last = first.get() + revisions.len() as u64;
        if w.next < first || w.next.get() >= last {
            return;
        }
        let skip = (w.next.get() - first.get()) as usize;
        let spec = &w.spec;
        let mut events = Vec::new();
        for r in &revisions[skip..] {
            for e in r.borrow().events.iter().filter(|e| spec.passes(e)) {
                let mut e = e.clone();
                if !spec.prev_kv {
                    e.prev_kv = None;
                }
                events.push(e);
            }
        }
        if crate::canary::active(crate::canary::Canary::WatchDropsEvent) && events.len() > 1 {
            events.pop();
        }
        let (fragment, limit) = (spec.fragment, self.config.response_bytes_max);
        let revision = Revision(last - 1);
        let w = self.watchers.get_mut(&id).expect("present above");
        w.next = Revision(last);
        if events.is_empty() {
            return;
        }
        w.sent_since_tick = true;
        let response = WatchResponse { watch_id: id, revision, events, ..WatchResponse::default() };
        if fragment {
            for part in fragments(response, limit) {
                self.push(part);
            }
        } else {
            self.push(response);
        }
    }

    fn progress_if_due(&mut self) {
        if self.progress_requested && self.behind().next().is_none() {
            self.progress_requested = false;
            let r = if crate::canary::active(crate::canary::Canary::WatchProgressAhead) {
                self.table.current.next()
            } else {
                self.table.current
            };
            self.push(WatchResponse { watch_id: -1, revision: r, ..WatchResponse::default() });
        }
    }

    fn push(&mut self, r: WatchResponse) {
        self.outbox_bytes += response_bytes(&r);
        self.outbox.push_back(r);
    }
}

fn compacted(watch_id: i64, table: TableState) -> WatchResponse {
    WatchResponse {
        watch_id,
        revision: table.current,
        canceled: true,
        compact_revision: table.compacted,
        ..WatchResponse::default()
    }
}

fn response_bytes(r: &WatchResponse) -> usize {
    64 + r.cancel_reason.len() + r.events.iter().map(|e| e.size_bytes(true)).sum::<usize>()
}

/// Cuts a response into parts of at most `limit` bytes of events (at
/// least one event each); every part but the last says `fragment`.
fn fragments(r: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if response_bytes(&r) <= limit || r.events.len() < 2 {
        return vec![r];
    }
    let mut template = r;
    let events = std::mem::take(&mut template.events);
    let mut parts: Vec<WatchResponse> = Vec::new();
    let mut current = template.clone();
    let mut bytes = 0;
    for e in events {
        let size = e.size_bytes(true);
        if !current.events.is_empty() && bytes + size > limit {
            parts.push(std::mem::replace(&mut current, template.clone()));
            bytes = 0;
        }
        bytes += size;
        current.events.push(e);
    }
    parts.push(current);
    let n = parts.len();
    for (i, p) in parts.iter_mut().enumerate() {
        p.fragment = i + 1 < n;
    }
    parts
}
