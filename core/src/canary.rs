//! Deliberate bugs for checking the checkers. They exist only in simulation
//! builds (`--cfg madsim`); in every other build [`active`] is the constant
//! `false` and the optimiser removes the faulty paths.
//!
//! The simulated world switches one canary on for a run and expects a
//! checker to catch it.

/// A deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Canary {
    /// Report a log append as durable before the fsync.
    AckBeforeFsync = 1,
    /// Serve a linearizable read from local state without a read index.
    StaleRead = 2,
    /// Give a write the table's current revision instead of the next one.
    ReuseRevision = 3,
    /// Evaluate value compares against the previous revision's state.
    CompareStaleRevision = 4,
    /// Lose the last log entry of every group when a node restarts.
    LoseLastLogEntry = 5,
    /// Never make the Raft vote durable.
    SkipVoteFsync = 6,
    /// Accept a replicated batch that does not start at `current + 1`.
    ReplicateTwice = 7,
    /// After installing a snapshot at `s`, claim revision `s + 1`.
    SnapshotSkipFirst = 8,
    /// Serve a follower read at a revision the follower has not applied.
    FollowerReadAhead = 9,
    /// Answer a write forwarded by a follower before the follower applied it.
    AnswerBeforeApply = 10,
    /// Run Raft elections without pre-vote.
    NoPreVote = 11,
    /// A streamed Raft snapshot leaves out its second chunk: the cursor
    /// moves past it, but its pairs are never sent (nor counted in the
    /// checksum, so the receiver cannot tell).
    SnapshotChunkSkipped = 12,
    /// Follower clusters ignore the leader's compaction revision.
    CompactionNotReplicated = 13,
    /// A backup reads each chunk from the live engine instead of the image
    /// taken when it began: not a consistent cut.
    BackupNotConsistent = 14,
    /// A follower applies each part of a revision split across change-stream
    /// messages as if it were the whole revision.
    RevisionPartApplied = 15,
    /// A compaction step that resumes inside a key's history takes the step
    /// boundary for the end of that key, and removes the version it carried
    /// over (the key's newest at or below the compaction revision).
    CompactionStepDropsVersion = 16,
    /// A txn compare on the mod revision compares the create revision.
    CompareModAsCreate = 17,
    /// A follower cluster keeps its table when the leader cluster deleted
    /// and re-created it under the same name (it deletes only tables whose
    /// name disappeared, and its table workers ignore the leader's table id).
    RecreatedTableKept = 18,
    /// A node whose storage failed goes on running: Raft stopped the group
    /// that hit the error, and nothing stops the node.
    StorageFailureIgnored = 19,
    /// A delete that finds nothing to delete still writes a tombstone, so
    /// it takes a revision (etcd creates none).
    EmptyDeleteTakesRevision = 20,
    /// A range at the latest revision sorted by key in either order reads
    /// only its first `limit + 1` keys, as an ascending one may, so a
    /// descending sort returns the first keys reversed instead of the last
    /// ones.
    LimitBeforeSort = 21,
    /// A linearizable range read of more than one key, or with options (a
    /// limit, a sort, keys or count only), takes the serializable path and
    /// skips the read index; a plain single-key read does not.
    QuerySkipsReadIndex = 22,
    /// The etcd API serves every Range as serializable (it ignores the
    /// request's `serializable = false`); armada.v1 reads stay linearizable.
    EtcdReadsSerializable = 23,
    /// A watch response with more than one event loses its last event.
    WatchDropsEvent = 24,
    /// A node that stops leading a table keeps its lease deadlines, and
    /// uses them when it leads again: it expires leases by its own old
    /// clock, not knowing the keep-alives another leader acknowledged
    /// meanwhile.
    LeaseKeepsDeadlines = 25,
    /// The leader revokes a lease when half its TTL is left.
    LeaseExpiresAtHalfTtl = 26,
    /// A progress notification claims the revision after the table's
    /// current one: a revision no watcher has been given.
    WatchProgressAhead = 27,
    /// A watch event's `prev_kv` is read at the event's own revision
    /// (the value it wrote) instead of the one before.
    WatchPrevKvOwnRevision = 28,
    /// An etcd permission check of a key range looks only at the range's
    /// first key: a user permitted `app/` can read `app/..zzz`.
    AuthChecksRangeStartOnly = 29,
    /// A node checks a token against whatever auth state it has applied,
    /// even one older than the state the token was issued from (so a
    /// user who logged in after a revocation may still use the revoked
    /// permission at a lagging node).
    AuthTokenFloorIgnored = 30,
    /// A membership change is recorded while the previous one is still
    /// being carried out (the one-change-at-a-time rule is off).
    MembersConcurrentChanges = 31,
    /// Group leaders never promote a new voter: a change that adds one
    /// never reaches every group.
    MembersNeverPromote = 32,
}

impl Canary {
    pub const ALL: [Canary; 32] = [
        Canary::AckBeforeFsync,
        Canary::StaleRead,
        Canary::ReuseRevision,
        Canary::CompareStaleRevision,
        Canary::LoseLastLogEntry,
        Canary::SkipVoteFsync,
        Canary::ReplicateTwice,
        Canary::SnapshotSkipFirst,
        Canary::FollowerReadAhead,
        Canary::AnswerBeforeApply,
        Canary::NoPreVote,
        Canary::SnapshotChunkSkipped,
        Canary::CompactionNotReplicated,
        Canary::BackupNotConsistent,
        Canary::RevisionPartApplied,
        Canary::CompactionStepDropsVersion,
        Canary::CompareModAsCreate,
        Canary::RecreatedTableKept,
        Canary::StorageFailureIgnored,
        Canary::EmptyDeleteTakesRevision,
        Canary::LimitBeforeSort,
        Canary::QuerySkipsReadIndex,
        Canary::EtcdReadsSerializable,
        Canary::WatchDropsEvent,
        Canary::LeaseKeepsDeadlines,
        Canary::LeaseExpiresAtHalfTtl,
        Canary::WatchProgressAhead,
        Canary::WatchPrevKvOwnRevision,
        Canary::AuthChecksRangeStartOnly,
        Canary::AuthTokenFloorIgnored,
        Canary::MembersConcurrentChanges,
        Canary::MembersNeverPromote,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::AckBeforeFsync => "ack-before-fsync",
            Canary::StaleRead => "stale-read",
            Canary::ReuseRevision => "reuse-revision",
            Canary::CompareStaleRevision => "compare-stale-revision",
            Canary::LoseLastLogEntry => "lose-last-log-entry",
            Canary::SkipVoteFsync => "skip-vote-fsync",
            Canary::ReplicateTwice => "replicate-twice",
            Canary::SnapshotSkipFirst => "snapshot-skip-first",
            Canary::FollowerReadAhead => "follower-read-ahead",
            Canary::AnswerBeforeApply => "answer-before-apply",
            Canary::NoPreVote => "no-pre-vote",
            Canary::SnapshotChunkSkipped => "snapshot-chunk-skipped",
            Canary::CompactionNotReplicated => "compaction-not-replicated",
            Canary::BackupNotConsistent => "backup-not-consistent",
            Canary::RevisionPartApplied => "revision-part-applied",
            Canary::CompactionStepDropsVersion => "compaction-step-drops-version",
            Canary::CompareModAsCreate => "compare-mod-as-create",
            Canary::RecreatedTableKept => "recreated-table-kept",
            Canary::StorageFailureIgnored => "storage-failure-ignored",
            Canary::EmptyDeleteTakesRevision => "empty-delete-takes-revision",
            Canary::LimitBeforeSort => "limit-before-sort",
            Canary::QuerySkipsReadIndex => "query-skips-read-index",
            Canary::EtcdReadsSerializable => "etcd-reads-serializable",
            Canary::WatchDropsEvent => "watch-drops-event",
            Canary::LeaseKeepsDeadlines => "lease-keeps-deadlines",
            Canary::LeaseExpiresAtHalfTtl => "lease-expires-at-half-ttl",
            Canary::WatchProgressAhead => "watch-progress-ahead",
            Canary::WatchPrevKvOwnRevision => "watch-prev-kv-own-revision",
            Canary::AuthChecksRangeStartOnly => "auth-checks-range-start-only",
            Canary::AuthTokenFloorIgnored => "auth-token-floor-ignored",
            Canary::MembersConcurrentChanges => "members-concurrent-changes",
            Canary::MembersNeverPromote => "members-never-promote",
        }
    }

    pub fn from_name(s: &str) -> Option<Canary> {
        Canary::ALL.into_iter().find(|c| c.name() == s)
    }
}

#[cfg(madsim)]
static ACTIVE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Switches `c` on (or all off with `None`). Simulation builds only.
#[cfg(madsim)]
pub fn set(c: Option<Canary>) {
    ACTIVE.store(c.map_or(0, |c| c as u32), std::sync::atomic::Ordering::SeqCst);
}

/// Whether canary `c` is on. Always `false` outside simulation builds.
#[inline(always)]
pub fn active(c: Canary) -> bool {
    #[cfg(madsim)]
    {
        ACTIVE.load(std::sync::atomic::Ordering::Relaxed) == c as u32
    }
    #[cfg(not(madsim))]
    {
        let _ = c;
        false
    }
}
