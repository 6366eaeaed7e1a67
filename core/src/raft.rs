//! Openraft glue: the type configuration, and the log store and state machine
//! of every Raft group, implemented over an [`Engine`].
//!
//! Nothing here runs a task, reads a clock or syncs by itself: durability is
//! requested from a [`Flusher`] supplied by the driver (the node runtime), so
//! the driver decides how fsyncs are batched, delayed (slow simulated disks)
//! or, in canary builds, skipped. The log store reports an append as flushed
//! only when the flusher says the sync finished.
//!
//! Key layout under a group's namespace `g ++ id(8, big-endian)`:
//! `L ++ index(8)` log entries, `V` vote, `C` committed log id, `P` last purged
//! log id, `Sa` applied state, `Sd ++ …` the state machine's data (an MVCC
//! table, or the catalog for the metadata group), `T ++ …` snapshots being
//! received and `I` the marker of a snapshot install in progress (see
//! [`crate::snapshot`]).

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{AsyncRuntime, EntryPayload, LogState, RaftLogReader, RaftSnapshotBuilder, RaftTypeConfig};
use serde::{Deserialize, Serialize};

use crate::command::{Catalog, Command, CommandResponse, GroupId, TableCommand, TableReply};
use crate::engine::{prefix_end, Engine, EngineError, WriteBatch};
pub use crate::layout::{data_ns, group_ns};
use crate::mvcc::Mvcc;
use crate::overlay::Overlay;
use crate::snapshot::{begin_install, GroupView, InstallGate, SnapshotData, SNAPSHOT_CHUNK_BYTES};

pub use crate::members::ArmadaNode;

/// Openraft's type configuration, generic over the async runtime so that
/// core does not depend on one. The node runtime fixes `RT`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArmadaRaft<RT>(PhantomData<RT>);

/// Bounds every runtime used with [`ArmadaRaft`] must meet.
pub trait Runtime: AsyncRuntime + Debug + Clone + Copy + Default + Eq + Ord + Send + Sync + 'static {}
impl<T> Runtime for T where T: AsyncRuntime + Debug + Clone + Copy + Default + Eq + Ord + Send + Sync + 'static {}

// Standard Raft leader ids: at most one leader per term, which the
// simulator's election-safety checker relies on.
type LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>;

impl<RT: Runtime> RaftTypeConfig for ArmadaRaft<RT> {
    type D = Command;
    type R = CommandResponse;
    type NodeId = u64;
    type Node = ArmadaNode;
    type Term = u64;
    type LeaderId = LeaderId;
    type Vote = openraft::impls::Vote<LeaderId>;
    type Payload = EntryPayload<Command, u64, ArmadaNode>;
    type Entry = openraft::Entry<<LeaderId as openraft::vote::RaftLeaderId>::Committed, Self::Payload>;
    type AsyncRuntime = RT;
    type Responder<T>
        = openraft::impls::ProgressResponder<Self, T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// A log entry as the log store keeps it: openraft's entry over this
/// crate's command (it does not depend on the runtime).
type StoredEntry =
    openraft::Entry<<LeaderId as openraft::vote::RaftLeaderId>::Committed, EntryPayload<Command, u64, ArmadaNode>>;
type StoredLogId = openraft::LogId<<LeaderId as openraft::vote::RaftLeaderId>::Committed>;

/// A group's Raft log as its node's storage holds it (for checkers and
/// tools): the last purged and the recorded committed index, and every
/// entry left as (term, index, digest), the digest being the one
/// [`ApplyObserver::applied`] reports for the entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredLog {
    pub purged: Option<u64>,
    pub committed: Option<u64>,
    pub entries: Vec<(u64, u64, u64)>,
}

/// Reads group `group`'s Raft log from `engine` (see [`StoredLog`]).
pub fn stored_log(engine: &dyn Engine, group: GroupId) -> Result<StoredLog, io::Error> {
    let mut out = StoredLog::default();
    let ns = group_ns(group);
    let key = |tag: u8| {
        let mut k = ns.clone();
        k.push(tag);
        k
    };
    if let Some(b) = engine.get(&key(b'P')).map_err(io_err)? {
        out.purged = Some(dec::<StoredLogId>(&b, "last purged log id")?.index);
    }
    if let Some(b) = engine.get(&key(b'C')).map_err(io_err)? {
        out.committed = dec::<Option<StoredLogId>>(&b, "committed log id")?.map(|l| l.index);
    }
    decode_entries(engine, &key(b'L'), &key(b'L' + 1), |e: StoredEntry| {
        out.entries.push((e.log_id.leader_id.term, e.log_id.index, entry_digest(&e.log_id, &e.payload)))
    })?;
    Ok(out)
}

/// Decodes every log entry stored in `[start, end)`, in index order.
fn decode_entries<T: for<'a> Deserialize<'a>>(
    engine: &dyn Engine,
    start: &[u8],
    end: &[u8],
    mut each: impl FnMut(T),
) -> Result<(), io::Error> {
    let mut err = None;
    engine
        .scan(start, end, &mut |_, v| match dec(v, "log entry") {
            Ok(e) => {
                each(e);
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        })
        .map_err(io_err)?;
    err.map_or(Ok(()), Err)
}

/// The digest of a log entry that [`ApplyObserver::applied`] reports (and
/// [`stored_log`] gives for the stored copy).
fn entry_digest<L: Serialize, P: Serialize>(log_id: &L, payload: &P) -> u64 {
    let mut h = crate::mvcc::Fnv64::new();
    // Plain postcard: a digest compares entries in memory and is never
    // stored, so it does not carry a format version.
    h.write_bytes(&postcard::to_stdvec(log_id).expect("postcard encodes a log id"));
    h.write_bytes(&postcard::to_stdvec(payload).expect("postcard encodes a log entry's payload"));
    h.finish()
}

/// Deletes every key of a group (after its table was deleted).
pub fn delete_group(engine: &dyn Engine, group: GroupId) -> Result<(), EngineError> {
    let ns = group_ns(group);
    let mut b = WriteBatch::new();
    b.delete_range(ns.clone(), prefix_end(&ns).expect("group namespaces start with 'g', never all 0xff"));
    engine.write(b)
}

/// Why a flush is requested; lets a driver (and simulation canaries) tell
/// the log's durability points apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    Vote,
    Append,
    Snapshot,
}

/// Counts of a node's Raft storage work, shared by the log stores and state
/// machines of all its groups (for metrics: entries per append and per
/// apply write).
#[derive(Debug, Default)]
pub struct RaftStats {
    /// Log appends (one engine write each) and the entries they carried.
    pub appends: std::sync::atomic::AtomicU64,
    pub appended_entries: std::sync::atomic::AtomicU64,
    /// State-machine engine writes and the entries they applied.
    pub apply_writes: std::sync::atomic::AtomicU64,
    pub applied_entries: std::sync::atomic::AtomicU64,
}

impl RaftStats {
    fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Completion of a flush. Dropping it without calling [`FlushDone::done`]
/// reports a failure, so a waiter can never hang on an abandoned flush.
pub struct FlushDone(Option<FlushCallback>);

type FlushCallback = Box<dyn FnOnce(Result<(), EngineError>) + Send>;
/// A flush result and the waker of the task waiting for it.
type FlushSlot = Arc<Mutex<(Option<Result<(), EngineError>>, Option<Waker>)>>;

impl FlushDone {
    pub fn new(f: impl FnOnce(Result<(), EngineError>) + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
    pub fn done(mut self, result: Result<(), EngineError>) {
        if let Some(f) = self.0.take() {
            f(result)
        }
    }
}

impl Drop for FlushDone {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(EngineError::Closed("flush abandoned (node shutting down)".into())))
        }
    }
}

/// Makes earlier engine writes durable, then reports through `done`.
/// Completions must be reported in request order.
pub trait Flusher: Send + Sync + 'static {
    fn flush(&self, reason: FlushReason, done: FlushDone);
    /// Syncs run so far and the nanoseconds they took (for metrics; a
    /// flusher that does not count says zero).
    fn syncs(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// A flusher that syncs the engine inline: for tests and tools.
pub struct InlineFlusher(pub Arc<dyn Engine>);

impl Flusher for InlineFlusher {
    fn flush(&self, _reason: FlushReason, done: FlushDone) {
        done.done(self.0.sync());
    }
}

/// A future that resolves when a [`FlushDone`] reports. Runtime-agnostic.
struct FlushWait {
    slot: FlushSlot,
}

impl Future for FlushWait {
    type Output = Result<(), EngineError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Makes every write made so far durable, and waits for it.
pub async fn flush_and_wait(flusher: &dyn Flusher, reason: FlushReason) -> Result<(), io::Error> {
    let slot: FlushSlot = Arc::new(Mutex::new((None, None)));
    let s2 = slot.clone();
    flusher.flush(
        reason,
        FlushDone::new(move |r| {
            let mut g = s2.lock().unwrap_or_else(|p| p.into_inner());
            g.0 = Some(r);
            if let Some(w) = g.1.take() {
                w.wake();
            }
        }),
    );
    FlushWait { slot }.await.map_err(io_err)
}

fn io_err(e: EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

/// A stored record (see [`crate::codec`]).
fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    crate::codec::encode(v)
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8], what: &str) -> Result<T, io::Error> {
    crate::codec::decode(b, what).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The Raft log of one group. Cheap to clone; clones share the engine.
pub struct LogStore<RT> {
    engine: Arc<dyn Engine>,
    ns: Vec<u8>,
    flusher: Arc<dyn Flusher>,
    stats: Arc<RaftStats>,
    _rt: PhantomData<fn() -> RT>,
}

impl<RT> Clone for LogStore<RT> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            ns: self.ns.clone(),
            flusher: self.flusher.clone(),
            stats: self.stats.clone(),
            _rt: PhantomData,
        }
    }
}

impl<RT: Runtime> LogStore<RT> {
    pub fn new(engine: Arc<dyn Engine>, group: GroupId, flusher: Arc<dyn Flusher>) -> Self {
        Self { engine, ns: group_ns(group), flusher, stats: Arc::default(), _rt: PhantomData }
    }

    /// Counts appends into `stats` (shared with other groups).
    pub fn with_stats(mut self, stats: Arc<RaftStats>) -> Self {
        self.stats = stats;
        self
    }

    fn key(&self, tag: u8) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(tag);
        k
    }

    fn entry_key(&self, index: u64) -> Vec<u8> {
        let mut k = self.key(b'L');
        k.extend_from_slice(&index.to_be_bytes());
        k
    }

    fn read_opt<T: for<'a> Deserialize<'a>>(&self, tag: u8, what: &str) -> Result<Option<T>, io::Error> {
        match self.engine.get(&self.key(tag)).map_err(io_err)? {
            Some(b) => Ok(Some(dec(&b, what)?)),
            None => Ok(None),
        }
    }
}

impl<RT: Runtime> RaftLogReader<ArmadaRaft<RT>> for LogStore<RT> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<ArmadaRaft<RT>>>, io::Error> {
        let lo = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi_key = match range.end_bound() {
            Bound::Included(i) => match i.checked_add(1) {
                Some(j) => self.entry_key(j),
                None => self.key(b'L' + 1),
            },
            Bound::Excluded(i) => self.entry_key(*i),
            Bound::Unbounded => self.key(b'L' + 1),
        };
        let mut out = Vec::new();
        decode_entries(&*self.engine, &self.entry_key(lo), &hi_key, |e| out.push(e))?;
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<ArmadaRaft<RT>>>, io::Error> {
        self.read_opt(b'V', "vote")
    }
}

impl<RT: Runtime> RaftLogStorage<ArmadaRaft<RT>> for LogStore<RT> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<ArmadaRaft<RT>>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<ArmadaRaft<RT>>> = self.read_opt(b'P', "last purged log id")?;
        let last = self.engine.last(&self.key(b'L'), &self.key(b'L' + 1)).map_err(io_err)?;
        let last_log_id = match last {
            Some((_, v)) => {
                let e: EntryOf<ArmadaRaft<RT>> = dec(&v, "log entry")?;
                Some(e.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<ArmadaRaft<RT>>) -> Result<(), io::Error> {
        let mut b = WriteBatch::new();
        b.put(self.key(b'V'), enc(vote));
        self.engine.write(b).map_err(io_err)?;
        // Raft's safety rests on a node never forgetting its vote.
        flush_and_wait(&*self.flusher, FlushReason::Vote).await?;
        crate::probe!(VoteSaved);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<ArmadaRaft<RT>>>) -> Result<(), io::Error> {
        // Not synced: a lost committed index only means re-learning it from
        // the leader; it is an optimisation for applying on restart.
        let mut b = WriteBatch::new();
        b.put(self.key(b'C'), enc(&committed));
        self.engine.write(b).map_err(io_err)?;
        crate::probe!(CommittedSaved);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<ArmadaRaft<RT>>>, io::Error> {
        Ok(self.read_opt::<Option<LogIdOf<ArmadaRaft<RT>>>>(b'C', "committed log id")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<ArmadaRaft<RT>>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<ArmadaRaft<RT>>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut b = WriteBatch::new();
        for e in entries {
            b.put(self.entry_key(e.log_id.index), enc(&e));
        }
        RaftStats::add(&self.stats.appends, 1);
        RaftStats::add(&self.stats.appended_entries, b.ops.len() as u64);
        self.engine.write(b).map_err(io_err)?;
        self.flusher.flush(FlushReason::Append, FlushDone::new(move |r| callback.io_completed(r.map_err(io_err))));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<ArmadaRaft<RT>>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        // The probe's extra read is made only where probes count.
        #[cfg(madsim)]
        if self.engine.last(&self.entry_key(from), &self.key(b'L' + 1)).map_err(io_err)?.is_some() {
            crate::probe!(LogTruncated);
        }
        let mut b = WriteBatch::new();
        b.delete_range(self.entry_key(from), self.key(b'L' + 1));
        self.engine.write(b).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogIdOf<ArmadaRaft<RT>>) -> Result<(), io::Error> {
        // Not synced on its own: the engine persists a prefix of its writes,
        // so if this purge survives a crash, so did the state-machine writes
        // (made before it) that cover the purged entries.
        let mut b = WriteBatch::new();
        // Stored as a bare log id: `get_log_state` decodes it as one. (It
        // once stored `Some(log_id)`, which decoded as a wrong index and left
        // restarted groups unable to start; found by the simulator,
        // crashes-3 seed 1, pinned in `sim/tests`.)
        b.put(self.key(b'P'), enc(&log_id));
        b.delete_range(self.entry_key(0), self.entry_key(log_id.index.saturating_add(1)));
        self.engine.write(b).map_err(io_err)?;
        crate::probe!(LogPurged);
        Ok(())
    }
}

/// Sees every entry a state machine applies: how the simulated world checks
/// that replicas agree (same entry and revision at every index) and that
/// revisions never skip or repeat.
pub trait ApplyObserver: Send + Sync + 'static {
    /// `digest` covers the entry's log id and payload; `revision` is the
    /// table's revision after the entry (`None` for the metadata group);
    /// `command` is the entry's command (`None` for blank and membership
    /// entries) and `response` what applying it returned.
    #[allow(clippy::too_many_arguments)]
    fn applied(
        &self,
        group: GroupId,
        index: u64,
        term: u64,
        digest: u64,
        revision: Option<u64>,
        command: Option<&Command>,
        response: &CommandResponse,
    );

    /// The state machine replaced its state with a snapshot taken at
    /// `index`, after which the table is at `revision`.
    fn installed_snapshot(&self, _group: GroupId, _index: u64, _revision: Option<u64>) {}

    /// A snapshot install that a crash interrupted was finished as the
    /// group opened (see [`crate::snapshot::recover`]).
    fn resumed_install(&self, _group: GroupId) {}

    /// Whether [`ApplyObserver::applied`] needs the entry's `digest` (it
    /// costs a second encoding of every entry); without it the digest is 0.
    fn wants_digest(&self) -> bool {
        true
    }
}

/// What a group's state machine holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Meta,
    Table,
}

/// The state machine of one group: applies commands to the MVCC table (or to
/// the catalog) in the same atomic engine write as the applied log id.
pub struct StateMachine<RT> {
    engine: Arc<dyn Engine>,
    group: GroupId,
    kind: GroupKind,
    flusher: Arc<dyn Flusher>,
    observer: Option<Arc<dyn ApplyObserver>>,
    retention: u64,
    /// History records one compaction step visits.
    compaction_step: usize,
    gate: Arc<InstallGate>,
    chunk_bytes: usize,
    /// The last snapshot built: what is sent to a replica that fell behind
    /// the purged log, until the next one is built. Sending the same view on
    /// every attempt lets a broken transfer resume where it stopped.
    current: Option<GroupView>,
    stats: Arc<RaftStats>,
    _rt: PhantomData<fn() -> RT>,
}

/// Copy batches of a snapshot install between fsyncs.
const INSTALL_STEPS_PER_FLUSH: u64 = 16;

type AppliedState<RT> = (Option<LogIdOf<ArmadaRaft<RT>>>, StoredMembershipOf<ArmadaRaft<RT>>);

impl<RT: Runtime> StateMachine<RT> {
    pub fn new(engine: Arc<dyn Engine>, group: GroupId, kind: GroupKind, flusher: Arc<dyn Flusher>) -> Self {
        Self {
            engine,
            group,
            kind,
            flusher,
            observer: None,
            retention: crate::mvcc::replication::CHANGELOG_RETENTION_DEFAULT,
            compaction_step: crate::mvcc::COMPACTION_STEP_RECORDS,
            gate: Arc::default(),
            chunk_bytes: SNAPSHOT_CHUNK_BYTES,
            current: None,
            stats: Arc::default(),
            _rt: PhantomData,
        }
    }

    /// Counts apply writes into `stats` (shared with other groups).
    pub fn with_stats(mut self, stats: Arc<RaftStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The gate readers of this group pass (closed while a snapshot is
    /// being installed).
    pub fn with_gate(mut self, gate: Arc<InstallGate>) -> Self {
        self.gate = gate;
        self
    }

    /// Bytes per batch when a snapshot is copied into place.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.max(1);
        self
    }

    /// Revisions of changelog each table keeps (see [`crate::mvcc::replication`]).
    pub fn with_retention(mut self, revisions: u64) -> Self {
        self.retention = revisions.max(1);
        self
    }

    /// History records each compaction step visits (see [`crate::mvcc`]).
    pub fn with_compaction_step(mut self, records: usize) -> Self {
        self.compaction_step = records.max(1);
        self
    }

    /// Reports every applied entry to `observer`.
    pub fn with_observer(mut self, observer: Option<Arc<dyn ApplyObserver>>) -> Self {
        self.observer = observer;
        self
    }

    /// The table's current revision (`None` for the metadata group).
    fn table_revision(&self) -> Result<Option<u64>, io::Error> {
        self.revision_in(&*self.engine)
    }

    fn applied_key(&self) -> Vec<u8> {
        crate::snapshot::applied_key(self.group)
    }

    fn read_applied(&self) -> Result<AppliedState<RT>, io::Error> {
        match self.engine.get(&self.applied_key()).map_err(io_err)? {
            Some(b) => dec(&b, "applied state"),
            None => Ok((None, Default::default())),
        }
    }

    /// Executes `cmd` against the state `engine` holds (the engine itself,
    /// or an [`Overlay`] of the writes of earlier entries not yet written).
    fn execute(&self, engine: &dyn Engine, cmd: &Command) -> Result<(WriteBatch, CommandResponse), io::Error> {
        let ns = data_ns(self.group);
        match (self.kind, cmd) {
            (GroupKind::Table, Command::Table(t)) => {
                let (b, r) = t
                    .execute(
                        &Mvcc::new(engine, ns)
                            .with_retention(self.retention)
                            .with_compaction_step(self.compaction_step),
                    )
                    .map_err(io_err)?;
                Ok((b, CommandResponse::Table(r)))
            }
            (GroupKind::Meta, Command::Meta(m)) => {
                let (b, r) = Catalog::new(engine, ns).execute(m).map_err(io_err)?;
                Ok((b, CommandResponse::Meta(r)))
            }
            _ => Ok((WriteBatch::new(), CommandResponse::WrongGroup)),
        }
    }

    /// Applies a follower cluster's snapshot commit: checks the staged
    /// snapshot and copies it into place a bounded batch at a time, on
    /// blocking threads, with the group's read gate closed (a half-copied
    /// table is never read). Returns the last batch (to be written with the
    /// applied index), the reply, and whether the gate is to be reopened
    /// after that write. A crash in between is finished when the group
    /// reopens ([`crate::mvcc::Mvcc::recover_swap`]).
    // Not `async fn`: see the comment in the body.
    #[allow(clippy::manual_async_fn)]
    fn swap_in(
        &mut self,
        revision: u64,
        count: u64,
        digest: u64,
    ) -> impl Future<Output = Result<(WriteBatch, CommandResponse, bool), io::Error>> + Send + '_ {
        // An explicit `Send` future: the compiler cannot prove an inferred
        // one `Send` for every caller's lifetimes.
        async move { self.swap_in_inner(revision, count, digest).await }
    }

    async fn swap_in_inner(
        &mut self,
        revision: u64,
        count: u64,
        digest: u64,
    ) -> Result<(WriteBatch, CommandResponse, bool), io::Error> {
        let reply = |r| CommandResponse::Table(Ok(TableReply::SnapshotCommitted(r)));
        let (engine, group, chunk_bytes) = (self.engine.clone(), self.group, self.chunk_bytes);
        let checked = RT::spawn_blocking(move || {
            let store = Mvcc::new(&*engine, data_ns(group));
            store.check_staged(revision, count, digest).map(|c| c.map_err(|r| (store.refuse_staged(&r), r)))
        })
        .await?
        .map_err(io_err)?;
        if let Err((batch, refusal)) = checked {
            return Ok((batch, reply(Err(refusal)), false));
        }
        self.gate.close();
        let (batch, mut swap) = Mvcc::new(&*self.engine, data_ns(group)).begin_swap(revision);
        self.engine.write(batch).map_err(io_err)?;
        crate::probe!(FollowerSwapBegan);
        loop {
            let engine = self.engine.clone();
            let (back, done) = RT::spawn_blocking(move || {
                let step = Mvcc::new(&*engine, data_ns(group)).swap_step(&mut swap, chunk_bytes);
                let done = step.and_then(|(batch, done)| engine.write(batch).map(|_| done));
                (swap, done)
            })
            .await?;
            swap = back;
            if done.map_err(io_err)? {
                break;
            }
            crate::snapshot::yield_now().await;
        }
        let batch = Mvcc::new(&*self.engine, data_ns(group)).finish_swap(&swap);
        crate::probe!(FollowerSnapshotSwapped);
        Ok((batch, reply(Ok(swap.current())), true))
    }

    /// A view as an openraft snapshot (its metadata is the view's applied state).
    fn snapshot_of(view: GroupView) -> Result<SnapshotOf<ArmadaRaft<RT>, SnapshotData>, io::Error> {
        let (last_log_id, last_membership): AppliedState<RT> = match view.applied_state() {
            Some(b) => dec(b, "applied state")?,
            None => (None, Default::default()),
        };
        Ok(openraft::Snapshot {
            meta: openraft::SnapshotMeta { last_log_id, last_membership },
            snapshot: SnapshotData::View(view),
        })
    }
    /// Whether an entry is applied through the overlay (see [`RaftStateMachine::apply`]).
    fn stages(&self, payload: &EntryPayload<Command, u64, ArmadaNode>) -> bool {
        match payload {
            EntryPayload::Blank | EntryPayload::Membership(_) => true,
            EntryPayload::Normal(Command::Table(t)) => {
                self.kind == GroupKind::Table
                    && matches!(
                        t,
                        TableCommand::Put(_)
                            | TableCommand::DeleteRange(_)
                            | TableCommand::Txn(_)
                            | TableCommand::Replicate { .. }
                    )
            }
            EntryPayload::Normal(_) => false,
        }
    }

    /// The table's revision as `engine` holds it (`None` for the metadata group).
    fn revision_in(&self, engine: &dyn Engine) -> Result<Option<u64>, io::Error> {
        match self.kind {
            GroupKind::Table => Ok(Some(Mvcc::new(engine, data_ns(self.group)).rev_state().map_err(io_err)?.current)),
            GroupKind::Meta => Ok(None),
        }
    }

    /// Writes what `overlay` staged in one engine write, then reports the
    /// staged entries.
    fn write_staged(&self, overlay: &Overlay, staged: &mut Vec<Applied<RT>>) -> Result<(), io::Error> {
        if staged.is_empty() {
            return Ok(());
        }
        overlay.write_through().map_err(io_err)?;
        if staged.len() > 1 {
            crate::probe!(ApplyBatched);
        }
        RaftStats::add(&self.stats.apply_writes, 1);
        RaftStats::add(&self.stats.applied_entries, staged.len() as u64);
        for a in staged.drain(..) {
            self.report(a);
        }
        Ok(())
    }

    /// Tells the observer about an applied entry and answers its client.
    fn report(&self, a: Applied<RT>) {
        let Applied { entry, responder, response, revision } = a;
        let log_id = entry.log_id;
        if let Some(obs) = &self.observer {
            let digest = if obs.wants_digest() { entry_digest(&log_id, &entry.payload) } else { 0 };
            let command = match &entry.payload {
                EntryPayload::Normal(c) => Some(c),
                _ => None,
            };
            obs.applied(self.group, log_id.index, log_id.leader_id.term, digest, revision, command, &response);
        }
        if let Some(r) = responder {
            r.send(response);
        }
    }
}

/// An entry applied (or staged to be) with its reply, waiting to be reported.
struct Applied<RT: Runtime> {
    entry: EntryOf<ArmadaRaft<RT>>,
    responder: Option<openraft::storage::ApplyResponder<ArmadaRaft<RT>>>,
    response: CommandResponse,
    revision: Option<u64>,
}

/// Most entries applied in one engine write.
const APPLY_BATCH_ENTRIES_MAX: usize = 512;
/// Bytes staged after which the staged entries are written.
const APPLY_BATCH_BYTES_MAX: usize = 4 << 20;

/// Builds a snapshot captured when the builder was created.
pub struct SnapshotBuilder<RT: Runtime> {
    snapshot: Option<SnapshotOf<ArmadaRaft<RT>, SnapshotData>>,
}

impl<RT: Runtime> RaftSnapshotBuilder<ArmadaRaft<RT>> for SnapshotBuilder<RT> {
    type SnapshotData = SnapshotData;
    async fn build_snapshot(&mut self) -> Result<SnapshotOf<ArmadaRaft<RT>, SnapshotData>, io::Error> {
        self.snapshot.take().ok_or_else(|| io::Error::other("snapshot builder used twice"))
    }
}

impl<RT: Runtime> RaftStateMachine<ArmadaRaft<RT>> for StateMachine<RT> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<RT>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<ArmadaRaft<RT>>>, StoredMembershipOf<ArmadaRaft<RT>>), io::Error> {
        self.read_applied()
    }

    /// Applies a run of committed entries. Entries that only change table
    /// data (puts, deletes, transactions, replicated batches, and blank and
    /// membership entries) are executed one after another over an
    /// [`Overlay`] and written together, with the applied log id, in one
    /// engine write; replies are sent (and the observer told) after that
    /// write. Every other entry writes what is staged first, then applies
    /// on its own as before.
    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<ArmadaRaft<RT>>, io::Error>> + Unpin + openraft::OptionalSend,
    {
        let (_, mut membership) = self.read_applied()?;
        let overlay = Overlay::new(self.engine.clone());
        let mut staged: Vec<Applied<RT>> = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id;
            if self.stages(&entry.payload) {
                let (batch, response) = match &entry.payload {
                    EntryPayload::Blank => (WriteBatch::new(), CommandResponse::Empty),
                    EntryPayload::Normal(cmd) => self.execute(&overlay, cmd)?,
                    EntryPayload::Membership(m) => {
                        membership = openraft::StoredMembership::new(Some(log_id), m.clone());
                        (WriteBatch::new(), CommandResponse::Empty)
                    }
                };
                overlay.stage(batch);
                let mut applied = WriteBatch::new();
                applied.put(self.applied_key(), enc(&(Some(log_id), membership.clone())));
                overlay.stage(applied);
                let revision = match &self.observer {
                    Some(_) => self.revision_in(&overlay)?,
                    None => None,
                };
                staged.push(Applied { entry, responder, response, revision });
                if staged.len() >= APPLY_BATCH_ENTRIES_MAX || overlay.staged_bytes() >= APPLY_BATCH_BYTES_MAX {
                    self.write_staged(&overlay, &mut staged)?;
                }
                continue;
            }
            self.write_staged(&overlay, &mut staged)?;
            let swap = match &entry.payload {
                EntryPayload::Normal(Command::Table(TableCommand::SnapshotCommit { revision, count, digest }))
                    if self.kind == GroupKind::Table =>
                {
                    Some((*revision, *count, *digest))
                }
                _ => None,
            };
            let mut swapped = false;
            let (mut batch, response) = if let Some((revision, count, digest)) = swap {
                let (b, r, s) = self.swap_in(revision, count, digest).await?;
                swapped = s;
                (b, r)
            } else {
                match &entry.payload {
                    EntryPayload::Normal(cmd) => self.execute(&*self.engine, cmd)?,
                    // Staged above.
                    EntryPayload::Blank | EntryPayload::Membership(_) => (WriteBatch::new(), CommandResponse::Empty),
                }
            };
            batch.put(self.applied_key(), enc(&(Some(log_id), membership.clone())));
            self.engine.write(batch).map_err(io_err)?;
            RaftStats::add(&self.stats.apply_writes, 1);
            RaftStats::add(&self.stats.applied_entries, 1);
            if swapped {
                self.gate.open();
            }
            let revision = match &self.observer {
                Some(_) => self.table_revision()?,
                None => None,
            };
            self.report(Applied { entry, responder, response, revision });
        }
        self.write_staged(&overlay, &mut staged)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured here, on the state machine's own task, so the snapshot is
        // consistent with the applied index. A failure yields a builder that
        // reports it.
        let view = GroupView::take(&*self.engine, self.group);
        if view.is_ok() {
            crate::probe!(SnapshotBuilt);
        }
        self.current = view.as_ref().ok().cloned();
        SnapshotBuilder { snapshot: view.ok().and_then(|v| Self::snapshot_of(v).ok()) }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<ArmadaRaft<RT>>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let staged = match snapshot {
            SnapshotData::Staged(s) => s,
            SnapshotData::View(v) => crate::snapshot::stage_view(self.engine.clone(), &v, self.chunk_bytes)
                .map_err(|e| io::Error::other(e.to_string()))?,
        };
        // The state is replaced: the last snapshot built no longer describes it.
        self.current = None;
        let applied = enc(&(meta.last_log_id, meta.last_membership.clone()));
        let mut installer = begin_install(self.engine.clone(), self.gate.clone(), staged, applied).map_err(io_err)?;
        // The marker and the cleared data are made durable first, so a
        // crash from here on finishes the install when the group reopens.
        flush_and_wait(&*self.flusher, FlushReason::Snapshot).await?;
        crate::probe!(SnapshotInstallBegan);
        let mut steps = 0u64;
        let chunk_bytes = self.chunk_bytes;
        loop {
            // Each copy batch runs on a blocking thread (inline under
            // simulation): gigabytes of writes meet storage write stalls,
            // and a stalled write on an async worker starved the node's
            // transport until its peers' connections timed out.
            let (back, done) = RT::spawn_blocking(move || {
                let done = installer.step(chunk_bytes);
                (installer, done)
            })
            .await?;
            installer = back;
            if done.map_err(io_err)? {
                break;
            }
            steps += 1;
            if steps.is_multiple_of(INSTALL_STEPS_PER_FLUSH) {
                // Bounds the unsynced tail of a long install (and gives the
                // simulator crash points inside it).
                flush_and_wait(&*self.flusher, FlushReason::Snapshot).await?;
            } else {
                crate::snapshot::yield_now().await;
            }
        }
        installer.finish().map_err(io_err)?;
        flush_and_wait(&*self.flusher, FlushReason::Snapshot).await?;
        crate::probe!(SnapshotInstalled);
        if let Some(obs) = &self.observer {
            let revision = self.table_revision()?;
            obs.installed_snapshot(self.group, meta.last_log_id.map_or(0, |l| l.index), revision);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<ArmadaRaft<RT>, SnapshotData>>, io::Error> {
        let view = match &self.current {
            Some(v) => v.clone(),
            // None built since this node started (or since it installed
            // one): the state now, kept as the current snapshot.
            None => GroupView::take(&*self.engine, self.group).map_err(io_err)?,
        };
        let s = Self::snapshot_of(view.clone())?;
        if s.meta.last_log_id.is_none() {
            return Ok(None);
        }
        self.current = Some(view);
        Ok(Some(s))
    }
}
