//! A follower cluster's subscription to one table of the leader cluster: the
//! protocol decisions of cross-cluster replication on the follower side, as
//! a sans-IO state machine.
//!
//! The driver (the table worker in `armada-server`) owns the connections,
//! the local Raft group and the clock. It feeds the machine inputs
//! (`handle_*`, each with the current time and, where the decision depends
//! on it, what the local table holds: [`Local`]) and carries out what
//! [`Subscription::poll_effect`] asks: open the change stream from a
//! revision, propose a batch of revisions, record the leader's table id,
//! compact, stream and install a snapshot, close. It waits for the next
//! input no later than [`Subscription::poll_timeout`], and reports
//! [`Subscription::poll_event`]s (contact, failures, snapshots) to status
//! and logs.
//!
//! What the machine decides:
//!
//! - **Resume point.** A stream starts at the first revision not applied
//!   locally (`applied + 1`); nothing is remembered across streams except the
//!   backoff, so a restart, a change of local leader or a rejected batch all
//!   resume correctly.
//! - **Whole revisions only.** Parts of a revision sent in several messages
//!   are put together ([`RevisionAssembler`]); a revision is proposed only
//!   whole, and parts left incomplete when a stream ends are dropped with it.
//! - **Snapshot switch.** When the leader no longer has the history from
//!   the resume point, or a revision is larger than the follower assembles,
//!   the machine streams a snapshot and installs it chunk by chunk.
//! - **Incarnation.** The first stream records the leader cluster's id of
//!   the table; a different id later means the table was deleted and
//!   re-created there, and this copy is deleted (the catalog worker creates
//!   the new one).
//! - **Compaction.** The table is compacted to the leader's compaction
//!   revision once that revision is applied here.
//! - **Silence, backoff and rotation.** A stream silent for longer than
//!   [`Config::stream_silence`] (or a snapshot stream for
//!   [`Config::snapshot_silence`]) has failed. After a failure the next
//!   attempt waits a backoff that doubles from [`Config::backoff_min`] to
//!   [`Config::backoff_max`] and goes to the next endpoint of the leader
//!   cluster; a stream that ends cleanly resets both.
//! - **Leadership.** Only the local group's leader subscribes; a stream
//!   ends when this node stops leading.
//!
//! Invariant: at most one effect that needs an answer is outstanding at a
//! time (every effect but [`Effect::Close`]); the machine accepts only the
//! answer it waits for, and ignores inputs that do not fit its state.
//!
//! Safety does not rest on this machine alone: the state machine applies a
//! replicated batch only at `applied + 1` (see [`crate::mvcc::replication`]),
//! so a deposed or confused worker can never apply twice or out of order.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::canary::{self, Canary};
use crate::command::GroupId;
use crate::ids::Revision;
use crate::kv::KeyValue;
use crate::mvcc::replication::{
    AssembleError, ReplicateOutcome, RevisionAssembler, RevisionChanges, RevisionPart, SnapshotRefusal,
};

#[cfg(test)]
mod tests;

/// Timing and size limits of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long to wait before trying again after a stream ended cleanly,
    /// and how often to check whether this node leads the local group.
    pub poll: Duration,
    /// A change stream with no message for this long has failed (the leader
    /// sends a heartbeat every 250 ms).
    pub stream_silence: Duration,
    /// A snapshot stream with no chunk for this long has failed.
    pub snapshot_silence: Duration,
    /// Backoff after the first failure; it doubles with every failure in a
    /// row up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The most held of one revision sent in parts; past it the follower
    /// installs a snapshot instead.
    pub assembled_bytes_max: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            poll: Duration::from_millis(100),
            stream_silence: Duration::from_secs(2),
            snapshot_silence: Duration::from_secs(10),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            assembled_bytes_max: 1 << 30,
        }
    }
}

/// What the driver reads from the local node before an input that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Local {
    /// This node leads the table's local Raft group.
    pub leading: bool,
    /// The table's applied revision here.
    pub applied: Revision,
    /// The table's compaction revision here.
    pub compacted: Revision,
    /// The leader cluster's id of the table, once recorded.
    pub upstream_table: Option<GroupId>,
}

/// One message of the leader's change stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Changes {
    /// The serving node's applied revision of the table.
    pub leader_revision: Revision,
    /// Consecutive revisions or parts of them; empty in a heartbeat.
    pub revisions: Vec<RevisionPart>,
    /// The history from the requested revision is gone: its first retained
    /// revision.
    pub snapshot_needed: Option<Revision>,
    /// The leader cluster's id of the table (`None` from servers that
    /// predate it).
    pub table_id: Option<GroupId>,
    /// The leader's compaction revision of the table (0: never compacted).
    pub compacted_revision: Revision,
}

/// One chunk of the leader's snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotChunk {
    pub revision: Revision,
    /// Key count and digest of the whole snapshot (meaningful in the last
    /// chunk only).
    pub count: u64,
    pub digest: u64,
    pub kvs: Vec<KeyValue>,
    pub last: bool,
}

/// What the machine asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open the table's change stream from `from_revision`; on the next
    /// endpoint of the leader cluster when `rotate`. Answer:
    /// [`Subscription::handle_opened`].
    Subscribe { from_revision: Revision, rotate: bool },
    /// Record the leader cluster's table id through the local group
    /// (before anything is applied). Answer: [`Subscription::handle_done`].
    RecordUpstream { table_id: GroupId },
    /// The leader cluster re-created the table: delete this copy. Answer:
    /// [`Subscription::handle_done`].
    DeleteRecreated { was: GroupId, now: GroupId },
    /// Propose whole, consecutive revisions to the local group. Answer:
    /// [`Subscription::handle_proposed`].
    Propose { batch: Vec<RevisionChanges>, leader_revision: Revision },
    /// Compact the local table to `revision`. Answer (compacted already
    /// counts as done): [`Subscription::handle_done`].
    Compact { revision: Revision },
    /// Close the change stream and open the table's snapshot stream on the
    /// same endpoint. Answer: [`Subscription::handle_opened`].
    RequestSnapshot,
    /// Stage a snapshot chunk through the local group. Answer:
    /// [`Subscription::handle_done`].
    ProposeChunk { revision: Revision, first: bool, kvs: Vec<KeyValue> },
    /// Commit the staged snapshot. Answer: [`Subscription::handle_committed`].
    CommitSnapshot { revision: Revision, count: u64, digest: u64 },
    /// Close whatever stream is open. No answer.
    Close,
}

impl Effect {
    /// Whether the machine waits for an answer to this effect.
    pub fn needs_answer(&self) -> bool {
        !matches!(self, Effect::Close)
    }
}

/// Why the snapshot is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The leader's retained history starts at `first_retained`, after the
    /// resume point.
    HistoryGone { first_retained: Revision },
    /// A revision is larger than the follower assembles.
    TooLarge(AssembleError),
}

/// What happened, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The subscription runs on this node from now on (`true`), or stopped.
    Active(bool),
    /// A message arrived: the leader's revision, and the local one.
    Contact {
        leader_revision: Revision,
        applied: Revision,
    },
    /// The subscription failed; it retries after the backoff.
    Failed(SubscriptionError),
    /// A snapshot is being streamed.
    SnapshotStarted(SnapshotReason),
    SnapshotInstalled {
        revision: Revision,
        keys: u64,
    },
    /// The snapshot was refused because this copy is already at `current`
    /// (another worker got there first): nothing to do.
    SnapshotNotNeeded {
        current: Revision,
    },
    /// The leader cluster re-created the table; this copy is deleted.
    Recreated {
        was: GroupId,
        now: GroupId,
    },
}

/// Why a subscription failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The leader cluster could not be reached or refused the stream.
    Open(String),
    /// The stream failed.
    Stream(String),
    /// No message on the change stream for this long.
    StreamSilent(Duration),
    /// No chunk on the snapshot stream for this long.
    SnapshotSilent(Duration),
    /// The snapshot stream ended before its last chunk.
    SnapshotEndedEarly,
    /// The parts of a revision did not fit together.
    Assemble(AssembleError),
    /// The local group refused the staged snapshot.
    SnapshotRefused(SnapshotRefusal),
    /// A proposal to the local group failed.
    Local(String),
    /// Compacting to the leader's compaction revision failed.
    Compact { revision: Revision, error: String },
}

impl fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscriptionError::Open(e) | SubscriptionError::Stream(e) | SubscriptionError::Local(e) => f.write_str(e),
            SubscriptionError::StreamSilent(d) => write!(f, "change stream silent for {d:?}"),
            SubscriptionError::SnapshotSilent(d) => write!(f, "snapshot stream silent for {d:?}"),
            SubscriptionError::SnapshotEndedEarly => f.write_str("snapshot stream ended early"),
            SubscriptionError::Assemble(e) => write!(f, "{e}"),
            SubscriptionError::SnapshotRefused(r) => write!(f, "snapshot refused: {r:?}"),
            SubscriptionError::Compact { revision, error } => {
                write!(f, "compacting to the leader's revision {revision}: {error}")
            }
        }
    }
}

impl std::error::Error for SubscriptionError {}

/// Where the subscription stands.
#[derive(Debug)]
enum Phase {
    /// No stream; try again at `at` (if this node leads the group).
    Idle { at: Duration },
    /// [`Effect::Subscribe`] is outstanding.
    Opening,
    /// The change stream is open; the last message came at `heard`.
    Streaming { heard: Duration },
    /// [`Effect::RecordUpstream`] is outstanding; `held` is processed after.
    Recording { held: Changes },
    /// [`Effect::DeleteRecreated`] is outstanding.
    Deleting,
    /// [`Effect::Propose`] is outstanding.
    Proposing { leader_revision: Revision, compacted_revision: Revision },
    /// [`Effect::Compact`] is outstanding.
    Compacting { revision: Revision },
    /// [`Effect::RequestSnapshot`] is outstanding.
    SnapshotOpening,
    /// The snapshot stream is open; the last chunk came at `heard`.
    SnapshotStreaming { heard: Duration, first: bool },
    /// [`Effect::ProposeChunk`] is outstanding; `last` holds the snapshot's
    /// header when the chunk was the last one.
    ChunkProposing { last: Option<(Revision, u64, u64)> },
    /// [`Effect::CommitSnapshot`] is outstanding.
    Committing { keys: u64 },
}

/// A follower's subscription to one table of the leader cluster.
#[derive(Debug)]
pub struct Subscription {
    config: Config,
    phase: Phase,
    /// Backoff before the attempt after the next failure.
    backoff: Duration,
    /// The next attempt goes to another endpoint (the last one failed).
    rotate: bool,
    /// Whether the last [`Event::Active`] said `true`.
    active: bool,
    assembler: RevisionAssembler,
    effects: VecDeque<Effect>,
    events: VecDeque<Event>,
}

impl Subscription {
    /// A subscription created at `now`; it first tries after one poll.
    pub fn new(config: Config, now: Duration) -> Subscription {
        let phase = Phase::Idle { at: now + config.poll };
        Subscription {
            backoff: config.backoff_min,
            config,
            phase,
            rotate: false,
            active: false,
            assembler: RevisionAssembler::default(),
            effects: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The next thing that happened, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Subscription::handle_tick`] at the latest, if no other
    /// input comes first; `None` while an answer is outstanding.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.phase {
            Phase::Idle { at } => Some(*at),
            Phase::Streaming { heard } => Some(*heard + self.config.stream_silence),
            Phase::SnapshotStreaming { heard, .. } => Some(*heard + self.config.snapshot_silence),
            _ => None,
        }
    }

    /// Whether a stream is open and the machine waits for its next message
    /// (a change message while streaming changes, a chunk while streaming a
    /// snapshot).
    pub fn wants_message(&self) -> bool {
        matches!(self.phase, Phase::Streaming { .. } | Phase::SnapshotStreaming { .. })
    }

    /// Time passed (at least up to [`Subscription::poll_timeout`], or the
    /// driver checks in early).
    pub fn handle_tick(&mut self, now: Duration, local: &Local) {
        match self.phase {
            Phase::Idle { at } if now >= at => {
                if !local.leading {
                    self.set_active(false);
                    self.phase = Phase::Idle { at: now + self.config.poll };
                    return;
                }
                self.set_active(true);
                self.effects.push_back(Effect::Subscribe { from_revision: local.applied.next(), rotate: self.rotate });
                self.phase = Phase::Opening;
            }
            Phase::Streaming { heard } if now >= heard + self.config.stream_silence => {
                self.fail(now, SubscriptionError::StreamSilent(self.config.stream_silence))
            }
            Phase::SnapshotStreaming { heard, .. } if now >= heard + self.config.snapshot_silence => {
                self.fail(now, SubscriptionError::SnapshotSilent(self.config.snapshot_silence))
            }
            _ => {}
        }
    }

    /// The driver could not carry out an effect or read the local table:
    /// whatever was in progress is abandoned, and the subscription backs off
    /// as after any failure.
    pub fn handle_failed(&mut self, now: Duration, error: String) {
        self.fail(now, SubscriptionError::Local(error))
    }

    /// The driver stopped the subscription for good (the table is gone).
    pub fn handle_stopped(&mut self) {
        self.set_active(false);
    }

    /// Answer to [`Effect::Subscribe`] or [`Effect::RequestSnapshot`]: the
    /// stream is open, or why not.
    pub fn handle_opened(&mut self, now: Duration, result: Result<(), String>) {
        match (&self.phase, result) {
            (Phase::Opening, Ok(())) => self.phase = Phase::Streaming { heard: now },
            (Phase::SnapshotOpening, Ok(())) => self.phase = Phase::SnapshotStreaming { heard: now, first: true },
            (Phase::Opening | Phase::SnapshotOpening, Err(e)) => self.fail(now, SubscriptionError::Open(e)),
            _ => {}
        }
    }

    /// The open stream ended (`None`) or failed.
    pub fn handle_closed(&mut self, now: Duration, error: Option<String>) {
        match (&self.phase, error) {
            (Phase::Streaming { .. }, None) => self.end(now),
            (Phase::Streaming { .. } | Phase::SnapshotStreaming { .. }, Some(e)) => {
                self.fail(now, SubscriptionError::Stream(e))
            }
            (Phase::SnapshotStreaming { .. }, None) => self.fail(now, SubscriptionError::SnapshotEndedEarly),
            _ => {}
        }
    }

    /// A message of the change stream.
    pub fn handle_changes(&mut self, now: Duration, local: &Local, msg: Changes) {
        if !matches!(self.phase, Phase::Streaming { .. }) {
            return;
        }
        if !local.leading {
            return self.end(now);
        }
        if let Some(table_id) = msg.table_id {
            match local.upstream_table {
                Some(id) if id == table_id || canary::active(Canary::RecreatedTableKept) => {}
                Some(was) => {
                    self.events.push_back(Event::Recreated { was, now: table_id });
                    self.effects.push_back(Effect::DeleteRecreated { was, now: table_id });
                    self.phase = Phase::Deleting;
                    return;
                }
                None => {
                    self.effects.push_back(Effect::RecordUpstream { table_id });
                    self.phase = Phase::Recording { held: msg };
                    return;
                }
            }
        }
        self.process(now, local, msg)
    }

    /// Answer to [`Effect::Propose`]: what the local group did with the
    /// batch (`local` read afterwards).
    pub fn handle_proposed(&mut self, now: Duration, local: &Local, result: Result<ReplicateOutcome, String>) {
        let Phase::Proposing { leader_revision, compacted_revision } = self.phase else { return };
        match result {
            Ok(o) => {
                self.events.push_back(Event::Contact { leader_revision, applied: Revision(o.revision) });
                if !o.applied {
                    // A gap or a duplicate (another worker of this table was
                    // here first): start over from what is applied.
                    return self.end(now);
                }
                self.follow_compaction(now, local, compacted_revision)
            }
            Err(e) => self.fail(now, SubscriptionError::Local(e)),
        }
    }

    /// Answer to [`Effect::RecordUpstream`], [`Effect::DeleteRecreated`],
    /// [`Effect::Compact`] and [`Effect::ProposeChunk`] (`local` read
    /// afterwards).
    pub fn handle_done(&mut self, now: Duration, local: &Local, result: Result<(), String>) {
        let phase = std::mem::replace(&mut self.phase, Phase::Opening);
        match (phase, result) {
            (Phase::Recording { held }, Ok(())) => {
                self.phase = Phase::Streaming { heard: now };
                self.process(now, local, held)
            }
            (Phase::Deleting, Ok(())) => self.end(now),
            (Phase::Compacting { .. }, Ok(())) => self.phase = Phase::Streaming { heard: now },
            (Phase::ChunkProposing { last: Some((revision, count, digest)) }, Ok(())) => {
                self.effects.push_back(Effect::CommitSnapshot { revision, count, digest });
                self.phase = Phase::Committing { keys: count };
            }
            (Phase::ChunkProposing { last: None }, Ok(())) => {
                self.phase = Phase::SnapshotStreaming { heard: now, first: false }
            }
            (Phase::Compacting { revision }, Err(error)) => {
                self.fail(now, SubscriptionError::Compact { revision, error })
            }
            (Phase::Recording { .. } | Phase::Deleting | Phase::ChunkProposing { .. }, Err(e)) => {
                self.fail(now, SubscriptionError::Local(e))
            }
            (other, _) => self.phase = other,
        }
    }

    /// A chunk of the snapshot stream.
    pub fn handle_chunk(&mut self, _now: Duration, chunk: SnapshotChunk) {
        let Phase::SnapshotStreaming { first, .. } = self.phase else { return };
        let last = chunk.last.then_some((chunk.revision, chunk.count, chunk.digest));
        self.effects.push_back(Effect::ProposeChunk { revision: chunk.revision, first, kvs: chunk.kvs });
        self.phase = Phase::ChunkProposing { last };
    }

    /// Answer to [`Effect::CommitSnapshot`]: the table's revision after the
    /// install, or why the group refused it.
    pub fn handle_committed(&mut self, now: Duration, result: Result<Result<u64, SnapshotRefusal>, String>) {
        let Phase::Committing { keys } = self.phase else { return };
        match result {
            Ok(Ok(revision)) => {
                self.events.push_back(Event::SnapshotInstalled { revision: Revision(revision), keys });
                self.end(now)
            }
            Ok(Err(SnapshotRefusal::Behind { current })) => {
                self.events.push_back(Event::SnapshotNotNeeded { current: Revision(current) });
                self.end(now)
            }
            Ok(Err(r)) => self.fail(now, SubscriptionError::SnapshotRefused(r)),
            Err(e) => self.fail(now, SubscriptionError::Local(e)),
        }
    }

    /// A change message from a stream of the right incarnation.
    fn process(&mut self, now: Duration, local: &Local, msg: Changes) {
        self.events.push_back(Event::Contact { leader_revision: msg.leader_revision, applied: local.applied });
        if let Some(first_retained) = msg.snapshot_needed {
            return self.start_snapshot(SnapshotReason::HistoryGone { first_retained });
        }
        let mut batch: Vec<RevisionChanges> = Vec::with_capacity(msg.revisions.len());
        for part in msg.revisions {
            match self.assembler.accept(part, self.config.assembled_bytes_max) {
                Ok(Some(rev)) => batch.push(rev),
                Ok(None) => {}
                Err(e @ AssembleError::TooLarge { .. }) => return self.start_snapshot(SnapshotReason::TooLarge(e)),
                Err(e) => return self.fail(now, SubscriptionError::Assemble(e)),
            }
        }
        if !batch.is_empty() {
            self.effects.push_back(Effect::Propose { batch, leader_revision: msg.leader_revision });
            self.phase =
                Phase::Proposing { leader_revision: msg.leader_revision, compacted_revision: msg.compacted_revision };
            return;
        }
        self.follow_compaction(now, local, msg.compacted_revision)
    }

    /// Compacts to the leader's compaction revision once it is applied here
    /// (a later message retries until then); otherwise back to streaming.
    fn follow_compaction(&mut self, now: Duration, local: &Local, leader_compacted: Revision) {
        if leader_compacted == Revision(0)
            || canary::active(Canary::CompactionNotReplicated)
            || leader_compacted <= local.compacted
            || leader_compacted > local.applied
        {
            self.phase = Phase::Streaming { heard: now };
            return;
        }
        self.effects.push_back(Effect::Compact { revision: leader_compacted });
        self.phase = Phase::Compacting { revision: leader_compacted };
    }

    fn start_snapshot(&mut self, reason: SnapshotReason) {
        self.assembler = RevisionAssembler::default();
        self.events.push_back(Event::SnapshotStarted(reason));
        self.effects.push_back(Effect::RequestSnapshot);
        self.phase = Phase::SnapshotOpening;
    }

    /// The stream ended without a failure: try again soon, on the same
    /// endpoint, with the backoff reset.
    fn end(&mut self, now: Duration) {
        self.effects.push_back(Effect::Close);
        self.assembler = RevisionAssembler::default();
        self.backoff = self.config.backoff_min;
        self.rotate = false;
        self.phase = Phase::Idle { at: now + self.config.poll };
    }

    /// The subscription failed: back off (longer with every failure in a
    /// row) and try the next endpoint.
    fn fail(&mut self, now: Duration, error: SubscriptionError) {
        self.effects.push_back(Effect::Close);
        self.events.push_back(Event::Failed(error));
        self.assembler = RevisionAssembler::default();
        self.rotate = true;
        self.phase = Phase::Idle { at: now + self.backoff + self.config.poll };
        self.backoff = (self.backoff * 2).min(self.config.backoff_max);
    }

    fn set_active(&mut self, active: bool) {
        if self.active != active {
            self.active = active;
            self.events.push_back(Event::Active(active));
        }
    }
}
