//! Coverage probes: marks on risky paths (a log truncation, a snapshot
//! install finished after a crash, a duplicate replicated batch...) that
//! the simulator counts, so a sweep can say how many seeds reached each one
//! and fail when a path it must exercise was never taken (FoundationDB's
//! `CODE_PROBE`, Antithesis' "sometimes" assertions). A probe never changes
//! behaviour.
//!
//! Outside simulation builds [`hit`] compiles to nothing. In simulation
//! builds it counts, and calls the hook the simulator installed (which
//! knows the simulated node a probe fired on).

/// A path worth reaching. Append new probes at the end of the list (and of
/// [`Probe::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Probe {
    /// A follower removed log entries that conflict with its leader's (the
    /// uncommitted tail of a deposed leader).
    LogTruncated,
    /// Log entries covered by a snapshot were purged.
    LogPurged,
    /// A node crashed within 100 ms after making its vote durable.
    VoteSavedThenCrash,
    /// A node crashed within 100 ms after recording a committed index.
    CommittedSavedThenCrash,
    /// A Raft snapshot was built (a view taken).
    SnapshotBuilt,
    /// A streamed Raft snapshot reached its last chunk at the receiver.
    SnapshotSent,
    /// A snapshot transfer resumed after the receiver's last staged chunk.
    SnapshotSendResumed,
    /// A replica installed a Raft snapshot.
    SnapshotInstalled,
    /// A Raft snapshot install a crash interrupted was finished at restart.
    SnapshotInstallFinishedAfterCrash,
    /// A linearizable read waited for its read index to be applied.
    ReadIndexWaitedForApply,
    /// A forwarded client request delivered twice was dropped the second time.
    ForwardDuplicateDropped,
    /// A follower cluster swapped a leader snapshot in as its table.
    FollowerSnapshotSwapped,
    /// A follower snapshot swap a crash interrupted was finished at restart.
    FollowerSwapFinishedAfterCrash,
    /// A follower applied a replicated batch starting at its next revision.
    ReplicatedInOrder,
    /// A follower was offered a batch it had already applied (refused).
    ReplicatedDuplicate,
    /// A follower was offered a batch beyond its next revision (refused).
    ReplicatedGap,
    /// A revision sent in parts was reassembled by a follower.
    RevisionPartsAssembled,
    /// The changelog dropped its oldest revision at the retention boundary.
    ChangelogTrimmed,
    /// A compaction step resumed inside a table's history.
    CompactionStepResumed,
    /// A compaction kept a key's version written exactly at its revision.
    CompactionAtAVersion,
    /// A compaction kept a key's newest version below its revision, with a
    /// newer version above it.
    CompactionBetweenVersions,
    /// A compaction removed a key's newest version at or below its revision
    /// because it was a deletion.
    CompactionRemovedTombstone,
    /// A read at exactly the compaction revision was served.
    ReadAtCompactionRevision,
    /// A read below the compaction revision was refused.
    ReadBelowCompactionRefused,
    /// One DeleteRange removed three keys or more.
    RangeDeleteMany,
    /// A txn compare on a value held / failed.
    CompareValueTrue,
    CompareValueFalse,
    /// A txn compare on a version held / failed.
    CompareVersionTrue,
    CompareVersionFalse,
    /// A txn compare on a create revision held / failed.
    CompareCreateTrue,
    CompareCreateFalse,
    /// A txn compare on a mod revision held / failed.
    CompareModTrue,
    CompareModFalse,
    /// A follower cluster created a table the leader cluster created.
    FollowerTableCreated,
    /// A follower cluster deleted a table the leader cluster deleted.
    FollowerTableDeleted,
    /// A follower cluster replaced a table the leader cluster deleted and
    /// created again under the same name (a new id).
    FollowerTableRecreated,
    /// A node made its vote durable (the simulator times crashes after it).
    VoteSaved,
    /// A node recorded a committed index (likewise).
    CommittedSaved,
    /// A replica began copying a Raft snapshot into place (the simulator
    /// can crash it there).
    SnapshotInstallBegan,
    /// A follower cluster's replica began swapping a snapshot into place.
    FollowerSwapBegan,
    /// A node stopped serving because a storage write or sync failed.
    StorageFailureStopped,
    /// A crash kept some of the writes made since the last sync (a torn
    /// crash), not none.
    TornCrashKeptWrites,
    /// A sync waited on a slow or stalling disk (the simulator's slow-disk
    /// fault).
    SyncSlowed,
    /// A replica received a Raft snapshot no newer than what it had
    /// already applied (openraft answers without installing it; the
    /// replica syncs its log first, see `server/src/node/handler.rs`).
    SnapshotAlreadyApplied,
    /// The simulator made a node's Raft clock run fast, or slow, or jump
    /// forward (its clock fault).
    ClockFast,
    ClockSlow,
    ClockJumped,
    /// A state machine applied several log entries in one engine write
    /// (executing each over the staged writes of the ones before it).
    ApplyBatched,
    /// A watcher was answered as compacted (its start, or the history it
    /// was owed, is gone).
    WatchCompacted,
    /// A watcher behind the applied revisions was given history.
    WatchHistoryServed,
    /// A watch stream took applied revisions from the table's shared cache
    /// of recent revisions (another stream had read them).
    WatchRecentShared,
    /// A node refused a token issued from a newer auth state than its own
    /// (the client retried).
    AuthTokenAheadOfNode,
    /// A permission check refused an etcd request.
    AuthDenied,
    /// A follower cluster mirrored a newer auth state of the leader cluster.
    AuthMirrored,
    /// A group leader moved its group one step towards the recorded
    /// membership.
    MembershipStep,
    /// A node started a table's group without founding it (a member added
    /// after the table was created): the group's leader adds it.
    MembershipJoinedGroup,
    /// A read of the current revision raced an apply and was served again
    /// from the history (real threads only: never in simulation).
    ReadRacedApply,
}

/// Number of probes.
pub const COUNT: usize = Probe::ALL.len();

impl Probe {
    pub const ALL: [Probe; 57] = [
        Probe::LogTruncated,
        Probe::LogPurged,
        Probe::VoteSavedThenCrash,
        Probe::CommittedSavedThenCrash,
        Probe::SnapshotBuilt,
        Probe::SnapshotSent,
        Probe::SnapshotSendResumed,
        Probe::SnapshotInstalled,
        Probe::SnapshotInstallFinishedAfterCrash,
        Probe::ReadIndexWaitedForApply,
        Probe::ForwardDuplicateDropped,
        Probe::FollowerSnapshotSwapped,
        Probe::FollowerSwapFinishedAfterCrash,
        Probe::ReplicatedInOrder,
        Probe::ReplicatedDuplicate,
        Probe::ReplicatedGap,
        Probe::RevisionPartsAssembled,
        Probe::ChangelogTrimmed,
        Probe::CompactionStepResumed,
        Probe::CompactionAtAVersion,
        Probe::CompactionBetweenVersions,
        Probe::CompactionRemovedTombstone,
        Probe::ReadAtCompactionRevision,
        Probe::ReadBelowCompactionRefused,
        Probe::RangeDeleteMany,
        Probe::CompareValueTrue,
        Probe::CompareValueFalse,
        Probe::CompareVersionTrue,
        Probe::CompareVersionFalse,
        Probe::CompareCreateTrue,
        Probe::CompareCreateFalse,
        Probe::CompareModTrue,
        Probe::CompareModFalse,
        Probe::FollowerTableCreated,
        Probe::FollowerTableDeleted,
        Probe::FollowerTableRecreated,
        Probe::VoteSaved,
        Probe::CommittedSaved,
        Probe::SnapshotInstallBegan,
        Probe::FollowerSwapBegan,
        Probe::StorageFailureStopped,
        Probe::TornCrashKeptWrites,
        Probe::SyncSlowed,
        Probe::SnapshotAlreadyApplied,
        Probe::ClockFast,
        Probe::ClockSlow,
        Probe::ClockJumped,
        Probe::ApplyBatched,
        Probe::WatchCompacted,
        Probe::WatchHistoryServed,
        Probe::WatchRecentShared,
        Probe::AuthTokenAheadOfNode,
        Probe::AuthDenied,
        Probe::AuthMirrored,
        Probe::MembershipStep,
        Probe::MembershipJoinedGroup,
        Probe::ReadRacedApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Probe::LogTruncated => "log-truncated",
            Probe::LogPurged => "log-purged",
            Probe::VoteSavedThenCrash => "vote-saved-then-crash",
            Probe::CommittedSavedThenCrash => "committed-saved-then-crash",
            Probe::SnapshotBuilt => "snapshot-built",
            Probe::SnapshotSent => "snapshot-sent",
            Probe::SnapshotSendResumed => "snapshot-send-resumed",
            Probe::SnapshotInstalled => "snapshot-installed",
            Probe::SnapshotInstallFinishedAfterCrash => "snapshot-install-finished-after-crash",
            Probe::ReadIndexWaitedForApply => "read-index-waited-for-apply",
            Probe::ForwardDuplicateDropped => "forward-duplicate-dropped",
            Probe::FollowerSnapshotSwapped => "follower-snapshot-swapped",
            Probe::FollowerSwapFinishedAfterCrash => "follower-swap-finished-after-crash",
            Probe::ReplicatedInOrder => "replicated-in-order",
            Probe::ReplicatedDuplicate => "replicated-duplicate",
            Probe::ReplicatedGap => "replicated-gap",
            Probe::RevisionPartsAssembled => "revision-parts-assembled",
            Probe::ChangelogTrimmed => "changelog-trimmed",
            Probe::CompactionStepResumed => "compaction-step-resumed",
            Probe::CompactionAtAVersion => "compaction-at-a-version",
            Probe::CompactionBetweenVersions => "compaction-between-versions",
            Probe::CompactionRemovedTombstone => "compaction-removed-tombstone",
            Probe::ReadAtCompactionRevision => "read-at-compaction-revision",
            Probe::ReadBelowCompactionRefused => "read-below-compaction-refused",
            Probe::RangeDeleteMany => "range-delete-many",
            Probe::CompareValueTrue => "compare-value-true",
            Probe::CompareValueFalse => "compare-value-false",
            Probe::CompareVersionTrue => "compare-version-true",
            Probe::CompareVersionFalse => "compare-version-false",
            Probe::CompareCreateTrue => "compare-create-true",
            Probe::CompareCreateFalse => "compare-create-false",
            Probe::CompareModTrue => "compare-mod-true",
            Probe::CompareModFalse => "compare-mod-false",
            Probe::FollowerTableCreated => "follower-table-created",
            Probe::FollowerTableDeleted => "follower-table-deleted",
            Probe::FollowerTableRecreated => "follower-table-recreated",
            Probe::VoteSaved => "vote-saved",
            Probe::CommittedSaved => "committed-saved",
            Probe::SnapshotInstallBegan => "snapshot-install-began",
            Probe::FollowerSwapBegan => "follower-swap-began",
            Probe::StorageFailureStopped => "storage-failure-stopped",
            Probe::TornCrashKeptWrites => "torn-crash-kept-writes",
            Probe::SyncSlowed => "sync-slowed",
            Probe::SnapshotAlreadyApplied => "snapshot-already-applied",
            Probe::ClockFast => "clock-fast",
            Probe::ClockSlow => "clock-slow",
            Probe::ClockJumped => "clock-jumped",
            Probe::ApplyBatched => "apply-batched",
            Probe::WatchCompacted => "watch-compacted",
            Probe::WatchHistoryServed => "watch-history-served",
            Probe::WatchRecentShared => "watch-recent-shared",
            Probe::AuthTokenAheadOfNode => "auth-token-ahead-of-node",
            Probe::AuthDenied => "auth-denied",
            Probe::AuthMirrored => "auth-mirrored",
            Probe::MembershipStep => "membership-step",
            Probe::MembershipJoinedGroup => "membership-joined-group",
            Probe::ReadRacedApply => "read-raced-apply",
        }
    }

    pub fn from_name(s: &str) -> Option<Probe> {
        Probe::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Marks that the path of `$probe` (a [`Probe`] variant's name) was taken.
#[macro_export]
macro_rules! probe {
    ($probe:ident) => {
        $crate::probe::hit($crate::probe::Probe::$probe)
    };
}

/// Counts per thread: a simulated world runs on one thread, and tests run
/// several worlds at once on different threads.
#[cfg(madsim)]
mod counting {
    use std::cell::{Cell, RefCell};

    use super::{Probe, COUNT};

    thread_local! {
        static HITS: RefCell<[u64; COUNT]> = const { RefCell::new([0; COUNT]) };
        static HOOK: Cell<Option<fn(Probe)>> = const { Cell::new(None) };
    }

    pub fn hit(p: Probe) {
        HITS.with_borrow_mut(|h| h[p as usize] += 1);
        if let Some(h) = HOOK.get() {
            h(p);
        }
    }

    pub fn set_hook(h: fn(Probe)) {
        HOOK.set(Some(h));
    }

    pub fn take() -> Vec<(Probe, u64)> {
        let hits = HITS.with_borrow_mut(|h| std::mem::replace(h, [0; COUNT]));
        Probe::ALL.iter().map(|&p| (p, hits[p as usize])).collect()
    }
}

/// Marks that `p`'s path was taken (nothing outside simulation builds).
#[inline(always)]
pub fn hit(p: Probe) {
    #[cfg(madsim)]
    counting::hit(p);
    #[cfg(not(madsim))]
    let _ = p;
}

/// Simulation builds: calls `h` on every hit on this thread.
#[cfg(madsim)]
pub fn set_hook(h: fn(Probe)) {
    counting::set_hook(h)
}

/// Simulation builds: every probe's hits on this thread since the last
/// call, in [`Probe::ALL`] order; resets them.
#[cfg(madsim)]
pub fn take() -> Vec<(Probe, u64)> {
    counting::take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<&str> = Probe::ALL.iter().map(|p| p.name()).collect();
        for p in Probe::ALL {
            assert_eq!(Probe::from_name(p.name()), Some(p));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COUNT);
        for (i, p) in Probe::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "ALL lists the probes in declaration order");
        }
    }
}
