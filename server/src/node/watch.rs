//! The pump of a client watch stream: one task per stream carries out what
//! [`WatchStream`] (in `armada-core`) decides. It reads the revisions the
//! table applies on this node from its changelog as the group's revision
//! watch moves, answers the machine's history requests from the same
//! changelog, looks up `prev_kv` where a watcher asked for it, and sends the
//! machine's responses as the client reads them. The API services (etcd
//! Watch, armada.v1 Watch) only convert messages.
//!
//! The table's applied revisions are decoded once per node, not once per
//! stream: the first pump to need a revision reads it from the changelog
//! into the group's cache of recent revisions (`RecentRevisions`, bounded),
//! and the other pumps take it from there, with `prev_kv` looked up once
//! too.
//!
//! Invariant: the pump decides nothing about which events a watcher gets;
//! it never holds more than the machine's outbox bound plus one changelog
//! batch for a stream, so a slow client cannot grow a node's memory (the
//! shared cache is bounded per table, whatever the number of streams).

use std::time::Duration;

use armada_core::kv::{KeyValue, RangeRequest, REVISION_INITIAL};
use armada_core::mvcc::replication::{ChangesFrom, RevisionChanges, BATCH_BYTES_MAX};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::watch::{
    self, EventKind, History, HistoryRequest, RecentRevision, RecentRevisions, RevisionEvents, TableState, WatchEvent,
    WatchResponse, WatchSpec, WatchStream,
};
use armada_core::{GroupId, Revision};
use openraft::async_runtime::watch::WatchReceiver as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::node::Node;

/// What a client sends on a watch stream.
#[derive(Debug, Clone)]
pub enum WatchInput {
    Create(WatchSpec),
    Cancel(i64),
    Progress,
}

/// How long a stream's timer waits when the machine wants no tick.
const IDLE_TICK: Duration = Duration::from_secs(3600);

/// Most revisions read from the changelog at once.
const READ_REVISIONS_MAX: usize = 256;

impl Node {
    /// What the table of `group` holds here now.
    fn watch_table_state(&self, group: GroupId) -> TableState {
        let state = Mvcc::new(&*self.engine, data_ns(group)).rev_state().unwrap_or_default();
        TableState { current: Revision(state.current), compacted: Revision(state.compacted) }
    }

    /// Serves one client watch stream on the table of `group` until the
    /// client goes away (`input` closes or `output` is dropped) or the
    /// table is deleted.
    pub async fn serve_watch(
        &self,
        group: GroupId,
        mut input: mpsc::Receiver<WatchInput>,
        output: mpsc::Sender<WatchResponse>,
    ) {
        let mut revisions = self.revision_watch(group);
        let recent = self.group(group).map_or_else(Default::default, |g| g.recent.clone());
        let table = self.watch_table_state(group);
        let mut fed = table.current;
        let mut stream = WatchStream::new(watch::Config::default(), table);
        let epoch = Instant::now();
        // One timer for the stream's life, moved only when the machine's
        // next tick moves (re-registering a timer on every wake-up cost
        // a tenth of the CPU with a thousand streams on a table).
        let tick = tokio::time::sleep(IDLE_TICK);
        tokio::pin!(tick);
        let mut armed: Option<Option<Duration>> = None;
        loop {
            while let Some(request) = stream.poll_history() {
                let history = self.read_history(group, request);
                stream.handle_history(history, self.watch_table_state(group));
            }
            let pending = stream.has_responses();
            let due = stream.poll_timeout();
            if armed != Some(due) {
                armed = Some(due);
                tick.as_mut().reset(due.map_or_else(|| Instant::now() + IDLE_TICK, |t| epoch + t));
            }
            tokio::select! {
                biased;
                msg = input.recv() => match msg {
                    None => return,
                    Some(WatchInput::Create(spec)) => stream.handle_create(spec, self.watch_table_state(group)),
                    Some(WatchInput::Cancel(id)) => stream.handle_cancel(id),
                    Some(WatchInput::Progress) => stream.handle_progress_request(),
                },
                permit = output.reserve(), if pending => match (permit, stream.poll_response()) {
                    (Ok(permit), Some(r)) => permit.send(r),
                    (Err(_), _) => return,
                    (Ok(_), None) => {}
                },
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    fed = self.feed_applied(group, &recent, fed, &mut stream);
                }
                _ = &mut tick => {
                    armed = None;
                    stream.handle_tick(epoch.elapsed());
                }
            }
            if self.group(group).is_none() {
                return;
            }
        }
    }

    /// Passes the revisions applied after `fed` to the stream, from the
    /// table's shared cache of recent revisions where it has them, else
    /// from the changelog (and then into the cache for the other streams);
    /// returns the last revision passed.
    fn feed_applied(
        &self,
        group: GroupId,
        recent: &RecentRevisions,
        mut fed: Revision,
        stream: &mut WatchStream,
    ) -> Revision {
        loop {
            let table = self.watch_table_state(group);
            if fed >= table.current {
                return fed;
            }
            if !stream.accepts_applied() {
                // Not queued anyway: the watchers owed these revisions read
                // them from history once the client catches up.
                stream.handle_applied::<RevisionEvents>(&[], table);
                return table.current;
            }
            let mut batch = recent.after(fed, READ_REVISIONS_MAX);
            if !batch.is_empty() {
                armada_core::probe!(WatchRecentShared);
            } else {
                let mvcc = Mvcc::new(&*self.engine, data_ns(group));
                let read = if fed.next() >= table.compacted {
                    mvcc.changes_from(fed.get() + 1, READ_REVISIONS_MAX, BATCH_BYTES_MAX)
                } else {
                    Ok(ChangesFrom::Changes(Vec::new()))
                };
                match read {
                    Ok(ChangesFrom::Changes(changes)) if !changes.is_empty() => {
                        batch = recent.extend(changes.into_iter().map(|c| RecentRevision::new(events_of(c))).collect());
                    }
                    Ok(_) => {
                        // The table was compacted past revisions not passed
                        // on yet (this task ran behind the apply), or the
                        // changelog has a hole here (a snapshot was
                        // installed): watchers owed these revisions are
                        // answered as compacted when they ask for history,
                        // as etcd answers a watcher behind its compaction.
                        stream.handle_applied::<RevisionEvents>(&[], table);
                        return table.current;
                    }
                    Err(e) => {
                        debug!(%group, "watch: reading the changelog: {e}");
                        return fed;
                    }
                }
            }
            // Only what `table` says is applied: the stream is told that
            // state with these revisions (one read of it per wake-up).
            batch.retain(|r| r.revision() <= table.current);
            let Some(last) = batch.last().map(|r| r.revision()) else { return fed };
            if stream.wants_prev_kv() {
                let mvcc = Mvcc::new(&*self.engine, data_ns(group));
                let with_prev: Option<Vec<&RevisionEvents>> = batch
                    .iter()
                    .map(|r| match r.with_prev() {
                        Some(w) => Some(w),
                        None => with_prev_kv(&mvcc, &r.plain).map(|w| r.set_with_prev(w)),
                    })
                    .collect();
                let Some(with_prev) = with_prev else {
                    // Compacted past a previous value while it was read:
                    // as above.
                    stream.handle_applied::<RevisionEvents>(&[], table);
                    return table.current;
                };
                stream.handle_applied(&with_prev, table);
            } else {
                let plain: Vec<&RevisionEvents> = batch.iter().map(|r| &r.plain).collect();
                stream.handle_applied(&plain, table);
            }
            fed = last;
            if fed >= table.current {
                // Revisions applied since `table` was read moved the
                // revision watch again: the next wake-up reads them.
                return fed;
            }
        }
    }

    /// The machine's history request, from the changelog.
    fn read_history(&self, group: GroupId, request: HistoryRequest) -> History {
        let mvcc = Mvcc::new(&*self.engine, data_ns(group));
        let state = mvcc.rev_state().unwrap_or_default();
        let first_readable = mvcc.first_retained(state).max(state.compacted);
        if request.from.get() < first_readable {
            return History::Compacted { first_retained: Revision(first_readable) };
        }
        let max = usize::try_from(request.max_revisions).unwrap_or(usize::MAX).max(1);
        // A table's first revision is the empty table: no changelog entry,
        // no events (a watch from revision 1 starts with the first write).
        let mut history: Vec<RevisionEvents> = (request.from.get()..=REVISION_INITIAL.min(state.current))
            .map(|r| RevisionEvents { revision: Revision(r), events: Vec::new() })
            .collect();
        let from = request.from.get().max(REVISION_INITIAL + 1);
        if from > state.current || history.len() >= max {
            return History::Revisions(history);
        }
        match mvcc.changes_from(from, max - history.len(), BATCH_BYTES_MAX) {
            Ok(ChangesFrom::Changes(changes)) => match changes
                .into_iter()
                .map(|c| {
                    let plain = events_of(c);
                    if request.prev_kv {
                        with_prev_kv(&mvcc, &plain)
                    } else {
                        Some(plain)
                    }
                })
                .collect::<Option<Vec<_>>>()
            {
                Some(events) => {
                    history.extend(events);
                    History::Revisions(history)
                }
                // Compacted while it was read.
                None => History::Compacted { first_retained: self.watch_table_state(group).compacted.next() },
            },
            Ok(ChangesFrom::NeedSnapshot { first_retained }) => {
                History::Compacted { first_retained: Revision(first_retained) }
            }
            Err(e) => {
                debug!(%group, "watch: reading history: {e}");
                History::Revisions(Vec::new())
            }
        }
    }
}

/// The watch events of a changelog entry, without `prev_kv`.
fn events_of(c: RevisionChanges) -> RevisionEvents {
    let revision = c.revision;
    let events = c
        .mutations
        .into_iter()
        .map(|m| match m.value {
            Some(value) => WatchEvent {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: m.key,
                    create_revision: m.create_revision,
                    mod_revision: revision,
                    version: m.version,
                    value,
                    lease: m.lease,
                },
                prev_kv: None,
            },
            None => WatchEvent {
                kind: EventKind::Delete,
                kv: KeyValue { key: m.key, mod_revision: revision, ..KeyValue::default() },
                prev_kv: None,
            },
        })
        .collect();
    RevisionEvents { revision: Revision(revision), events }
}

/// `plain` with each event's previous value; `None` when a previous value
/// is needed and cannot be read.
fn with_prev_kv(mvcc: &Mvcc<'_>, plain: &RevisionEvents) -> Option<RevisionEvents> {
    let revision = plain.revision.get();
    let events = plain
        .events
        .iter()
        .map(|e| {
            // As etcd: a creation (a put at version 1) has no previous
            // value, even when the same revision deleted an older one first.
            let created = e.kind == EventKind::Put && e.kv.version == 1;
            let prev_kv = if created { None } else { previous(mvcc, &e.kv.key, revision)? };
            Some(WatchEvent { prev_kv, ..e.clone() })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(RevisionEvents { revision: plain.revision, events })
}

/// The key's value just before `revision` (`Some(None)`: it had none, or
/// that revision is compacted away: etcd then sends the event without
/// `prev_kv`, which happens only at the compaction revision itself); `None`
/// when it cannot be read.
fn previous(mvcc: &Mvcc<'_>, key: &[u8], revision: u64) -> Option<Option<KeyValue>> {
    if revision <= REVISION_INITIAL {
        return Some(None);
    }
    let at = if armada_core::canary::active(armada_core::canary::Canary::WatchPrevKvOwnRevision) {
        revision
    } else {
        revision - 1
    };
    let req = RangeRequest { key: key.to_vec(), revision: at, ..RangeRequest::default() };
    match mvcc.range(&req) {
        Ok(r) => Some(r.kvs.into_iter().next()),
        Err(armada_core::mvcc::MvccError::Kv(armada_core::kv::KvError::Compacted { .. })) => Some(None),
        Err(_) => None,
    }
}
