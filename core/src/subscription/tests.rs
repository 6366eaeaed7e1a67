//! Tests of the subscription machine without a network: unit tests of each
//! decision, and a property test that drives it against a model of the
//! leader's streams and of the local group, with faults chosen by proptest.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::mvcc::replication::{kvs_digest, Mutation};

const MS: Duration = Duration::from_millis(1);

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn leading(applied: u64) -> Local {
    Local { leading: true, applied: Revision(applied), compacted: Revision(0), upstream_table: Some(GroupId(7)) }
}

fn r(revision: u64) -> Revision {
    Revision(revision)
}

fn rev(revision: u64, key: &[u8]) -> RevisionChanges {
    RevisionChanges {
        revision,
        mutations: vec![Mutation {
            key: key.to_vec(),
            value: Some(vec![revision as u8]),
            create_revision: 1,
            version: 1,
            lease: 0,
        }],
    }
}

fn part(revision: u64, continued: bool) -> RevisionPart {
    RevisionPart { revision, mutations: rev(revision, b"k").mutations, continued }
}

fn message(leader_revision: u64, revisions: Vec<RevisionPart>) -> Changes {
    Changes { leader_revision: Revision(leader_revision), revisions, table_id: Some(GroupId(7)), ..Changes::default() }
}

fn effects(s: &mut Subscription) -> Vec<Effect> {
    std::iter::from_fn(|| s.poll_effect()).collect()
}

fn events(s: &mut Subscription) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A subscription that has opened its stream at `now`, `applied` applied.
fn streaming(applied: u64) -> Subscription {
    let mut s = Subscription::new(Config::default(), Duration::ZERO);
    s.handle_tick(at(100), &leading(applied));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(applied + 1), rotate: false }]);
    s.handle_opened(at(101), Ok(()));
    events(&mut s);
    s
}

#[test]
fn waits_one_poll_then_subscribes_from_the_first_revision_not_applied() {
    let mut s = Subscription::new(Config::default(), at(5));
    assert_eq!(s.poll_timeout(), Some(at(105)));
    s.handle_tick(at(50), &leading(41));
    assert_eq!(effects(&mut s), vec![], "too early");
    s.handle_tick(at(105), &leading(41));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(42), rotate: false }]);
    assert_eq!(events(&mut s), vec![Event::Active(true)]);
    assert_eq!(s.poll_timeout(), None, "waiting for the answer");
}

#[test]
fn only_the_local_leader_subscribes() {
    let mut s = Subscription::new(Config::default(), Duration::ZERO);
    let follower = Local { leading: false, ..leading(0) };
    s.handle_tick(at(100), &follower);
    assert_eq!(effects(&mut s), vec![]);
    assert_eq!(s.poll_timeout(), Some(at(200)));
    s.handle_tick(at(200), &leading(0));
    assert_eq!(effects(&mut s).len(), 1);
    s.handle_opened(at(201), Ok(()));
    // Leadership lost: the stream ends at the next message, cleanly.
    s.handle_changes(at(300), &follower, message(5, vec![part(1, false)]));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    s.handle_tick(at(400), &follower);
    assert_eq!(events(&mut s), vec![Event::Active(true), Event::Active(false)]);
}

#[test]
fn proposes_whole_revisions_in_order_and_drops_incomplete_parts_with_the_stream() {
    let mut s = streaming(0);
    s.handle_changes(at(110), &leading(0), message(3, vec![part(1, false), part(2, true)]));
    let Some(Effect::Propose { batch, leader_revision: Revision(3) }) = s.poll_effect() else { panic!("no proposal") };
    assert_eq!(batch.iter().map(|r| r.revision).collect::<Vec<_>>(), vec![1]);
    s.handle_proposed(at(111), &leading(1), Ok(ReplicateOutcome { applied: true, revision: 1 }));
    assert_eq!(effects(&mut s), vec![]);
    // The stream fails while revision 2 is incomplete: the part is dropped,
    // and the next stream starts at 2 again.
    s.handle_closed(at(120), Some("reset".into()));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    let t = s.poll_timeout().unwrap();
    s.handle_tick(t, &leading(1));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(2), rotate: true }]);
    s.handle_opened(t, Ok(()));
    // A fresh part of revision 2 does not meet the dropped one.
    s.handle_changes(t, &leading(1), message(3, vec![part(2, true)]));
    s.handle_changes(t, &leading(1), message(3, vec![part(2, false), part(3, false)]));
    let Some(Effect::Propose { batch, .. }) = s.poll_effect() else { panic!("no proposal") };
    assert_eq!(batch.iter().map(|r| r.revision).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(batch[0].mutations.len(), 2, "both parts of revision 2");
}

#[test]
fn a_rejected_batch_restarts_from_what_is_applied() {
    let mut s = streaming(4);
    s.handle_changes(at(110), &leading(4), message(6, vec![part(5, false), part(6, false)]));
    assert!(matches!(s.poll_effect(), Some(Effect::Propose { .. })));
    // Another worker applied up to 6 meanwhile.
    s.handle_proposed(at(111), &leading(6), Ok(ReplicateOutcome { applied: false, revision: 6 }));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    assert!(!events(&mut s).iter().any(|e| matches!(e, Event::Failed(_))), "not a failure");
    s.handle_tick(at(211), &leading(6));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(7), rotate: false }]);
}

#[test]
fn a_silent_stream_fails_and_backoff_doubles_up_to_its_cap_with_rotation() {
    let config = Config::default();
    let mut s = streaming(0);
    let mut now = at(101);
    let mut backoff = config.backoff_min;
    for _ in 0..8 {
        assert_eq!(s.poll_timeout(), Some(now + config.stream_silence));
        now += config.stream_silence;
        s.handle_tick(now, &leading(0));
        assert_eq!(effects(&mut s), vec![Effect::Close]);
        assert_eq!(events(&mut s), vec![Event::Failed(SubscriptionError::StreamSilent(config.stream_silence))]);
        assert_eq!(s.poll_timeout(), Some(now + backoff + config.poll));
        now += backoff + config.poll;
        s.handle_tick(now, &leading(0));
        assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(1), rotate: true }]);
        s.handle_opened(now, Ok(()));
        backoff = (backoff * 2).min(config.backoff_max);
    }
    assert_eq!(backoff, config.backoff_max);
    // Heartbeats keep a stream alive.
    s.handle_changes(now + config.stream_silence - MS, &leading(0), message(0, vec![]));
    assert_eq!(s.poll_timeout(), Some(now + config.stream_silence * 2 - MS));
    // A clean end resets backoff and rotation.
    s.handle_closed(now + at(1), None);
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    let t = s.poll_timeout().unwrap();
    assert_eq!(t, now + at(1) + config.poll);
    s.handle_tick(t, &leading(0));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(1), rotate: false }]);
    s.handle_opened(t, Err("refused".into()));
    assert_eq!(s.poll_timeout(), Some(t + config.backoff_min + config.poll));
}

#[test]
fn history_gone_switches_to_a_snapshot_installed_chunk_by_chunk() {
    let mut s = streaming(3);
    let msg = Changes { snapshot_needed: Some(r(50)), ..message(90, vec![]) };
    s.handle_changes(at(110), &leading(3), msg);
    assert_eq!(effects(&mut s), vec![Effect::RequestSnapshot]);
    assert!(events(&mut s).contains(&Event::SnapshotStarted(SnapshotReason::HistoryGone { first_retained: r(50) })));
    s.handle_opened(at(111), Ok(()));
    let kv = |k: &[u8]| KeyValue {
        key: k.to_vec(),
        create_revision: 1,
        mod_revision: 1,
        version: 1,
        value: vec![1],
        ..Default::default()
    };
    s.handle_chunk(at(112), SnapshotChunk { revision: r(90), kvs: vec![kv(b"a")], ..SnapshotChunk::default() });
    assert_eq!(effects(&mut s), vec![Effect::ProposeChunk { revision: r(90), first: true, kvs: vec![kv(b"a")] }]);
    s.handle_done(at(113), &leading(3), Ok(()));
    // The snapshot stream has its own, longer silence.
    assert_eq!(s.poll_timeout(), Some(at(113) + Config::default().snapshot_silence));
    let last = SnapshotChunk { revision: r(90), count: 2, digest: 99, kvs: vec![kv(b"b")], last: true };
    s.handle_chunk(at(114), last);
    assert_eq!(effects(&mut s), vec![Effect::ProposeChunk { revision: r(90), first: false, kvs: vec![kv(b"b")] }]);
    s.handle_done(at(115), &leading(3), Ok(()));
    assert_eq!(effects(&mut s), vec![Effect::CommitSnapshot { revision: r(90), count: 2, digest: 99 }]);
    s.handle_committed(at(116), Ok(Ok(90)));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    assert!(events(&mut s).contains(&Event::SnapshotInstalled { revision: r(90), keys: 2 }));
    s.handle_tick(at(216), &leading(90));
    assert_eq!(effects(&mut s), vec![Effect::Subscribe { from_revision: r(91), rotate: false }]);
}

#[test]
fn snapshot_failures_and_refusals() {
    // Ended before the last chunk.
    let mut s = streaming(0);
    s.handle_changes(at(110), &leading(0), Changes { snapshot_needed: Some(r(5)), ..message(9, vec![]) });
    s.handle_opened(at(111), Ok(()));
    effects(&mut s);
    s.handle_closed(at(112), None);
    assert!(events(&mut s).contains(&Event::Failed(SubscriptionError::SnapshotEndedEarly)));
    // Already beyond the snapshot: not a failure.
    let mut s = streaming(0);
    s.handle_changes(at(110), &leading(0), Changes { snapshot_needed: Some(r(5)), ..message(9, vec![]) });
    s.handle_opened(at(111), Ok(()));
    s.handle_chunk(at(112), SnapshotChunk { revision: r(9), last: true, ..SnapshotChunk::default() });
    s.handle_done(at(113), &leading(0), Ok(()));
    s.handle_committed(at(114), Ok(Err(SnapshotRefusal::Behind { current: 12 })));
    let ev = events(&mut s);
    assert!(ev.contains(&Event::SnapshotNotNeeded { current: r(12) }));
    assert!(!ev.iter().any(|e| matches!(e, Event::Failed(_))));
    // A mismatch is a failure: the snapshot starts over after the backoff.
    let mut s = streaming(0);
    s.handle_changes(at(110), &leading(0), Changes { snapshot_needed: Some(r(5)), ..message(9, vec![]) });
    s.handle_opened(at(111), Ok(()));
    s.handle_chunk(at(112), SnapshotChunk { revision: r(9), last: true, ..SnapshotChunk::default() });
    s.handle_done(at(113), &leading(0), Ok(()));
    let refusal = SnapshotRefusal::Mismatch { staged: 1, expected: 2 };
    s.handle_committed(at(114), Ok(Err(refusal.clone())));
    assert!(events(&mut s).contains(&Event::Failed(SubscriptionError::SnapshotRefused(refusal))));
}

#[test]
fn a_revision_too_large_to_assemble_switches_to_a_snapshot() {
    let config = Config { assembled_bytes_max: 10, ..Config::default() };
    let mut s = Subscription::new(config, Duration::ZERO);
    s.handle_tick(at(100), &leading(0));
    s.handle_opened(at(100), Ok(()));
    effects(&mut s);
    let big = RevisionPart {
        revision: 1,
        mutations: vec![Mutation {
            key: vec![0; 8],
            value: Some(vec![0; 8]),
            create_revision: 1,
            version: 1,
            lease: 0,
        }],
        continued: true,
    };
    s.handle_changes(at(110), &leading(0), message(1, vec![big]));
    assert_eq!(effects(&mut s), vec![Effect::RequestSnapshot]);
    assert!(events(&mut s).iter().any(|e| matches!(e, Event::SnapshotStarted(SnapshotReason::TooLarge(_)))));
}

#[test]
fn interleaved_parts_are_a_failure() {
    let mut s = streaming(0);
    s.handle_changes(at(110), &leading(0), message(2, vec![part(1, true), part(2, false)]));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    let ev = events(&mut s);
    assert!(
        ev.contains(&Event::Failed(SubscriptionError::Assemble(AssembleError::Interleaved { expected: 1, got: 2 })))
    );
}

#[test]
fn records_the_leader_table_id_first_and_deletes_a_recreated_table() {
    let mut s = streaming(0);
    let fresh = Local { upstream_table: None, ..leading(0) };
    s.handle_changes(at(110), &fresh, message(1, vec![part(1, false)]));
    assert_eq!(effects(&mut s), vec![Effect::RecordUpstream { table_id: GroupId(7) }], "nothing proposed before");
    s.handle_done(at(111), &leading(0), Ok(()));
    assert!(matches!(s.poll_effect(), Some(Effect::Propose { .. })), "the held message goes on");
    s.handle_proposed(at(112), &leading(1), Ok(ReplicateOutcome { applied: true, revision: 1 }));
    // Later the leader streams another incarnation.
    s.handle_changes(at(113), &leading(1), Changes { table_id: Some(GroupId(8)), ..message(1, vec![part(2, false)]) });
    assert_eq!(effects(&mut s), vec![Effect::DeleteRecreated { was: GroupId(7), now: GroupId(8) }]);
    assert!(events(&mut s).contains(&Event::Recreated { was: GroupId(7), now: GroupId(8) }));
    s.handle_done(at(114), &leading(1), Ok(()));
    assert_eq!(effects(&mut s), vec![Effect::Close]);
    // A leader that predates table ids (0) is taken as it is.
    let mut s = streaming(0);
    s.handle_changes(at(110), &fresh, Changes { table_id: None, ..message(1, vec![part(1, false)]) });
    assert!(matches!(s.poll_effect(), Some(Effect::Propose { .. })));
}

#[test]
fn follows_the_leaders_compaction_once_applied() {
    let mut s = streaming(0);
    let msg = |c| Changes { compacted_revision: r(c), ..message(4, vec![]) };
    // Not applied yet: nothing.
    s.handle_changes(at(110), &leading(2), msg(3));
    assert_eq!(effects(&mut s), vec![]);
    s.handle_changes(at(111), &leading(3), msg(3));
    assert_eq!(effects(&mut s), vec![Effect::Compact { revision: r(3) }]);
    s.handle_done(at(112), &leading(3), Ok(()));
    // Already compacted here: nothing.
    s.handle_changes(at(113), &Local { compacted: r(3), ..leading(3) }, msg(3));
    assert_eq!(effects(&mut s), vec![]);
    s.handle_changes(at(114), &leading(4), msg(4));
    assert_eq!(effects(&mut s), vec![Effect::Compact { revision: r(4) }]);
    s.handle_done(at(115), &leading(4), Err("disk".into()));
    let want = SubscriptionError::Compact { revision: r(4), error: "disk".into() };
    assert!(events(&mut s).contains(&Event::Failed(want)));
}

#[test]
fn answers_that_do_not_fit_are_ignored() {
    let mut s = Subscription::new(Config::default(), Duration::ZERO);
    s.handle_opened(at(1), Ok(()));
    s.handle_changes(at(2), &leading(0), message(1, vec![part(1, false)]));
    s.handle_proposed(at(3), &leading(0), Ok(ReplicateOutcome { applied: true, revision: 1 }));
    s.handle_done(at(4), &leading(0), Ok(()));
    s.handle_chunk(at(5), SnapshotChunk::default());
    s.handle_committed(at(6), Ok(Ok(1)));
    s.handle_closed(at(7), None);
    assert_eq!(effects(&mut s), vec![]);
    assert_eq!(events(&mut s), vec![]);
    assert_eq!(s.poll_timeout(), Some(at(100)));
}

// ---- property test: the machine against a model of both ends ----

/// The leader cluster's table: its history, how much of it is retained, its
/// compaction revision.
#[derive(Debug, Clone)]
struct Leader {
    history: Vec<RevisionChanges>,
    first_retained: u64,
    compacted: u64,
}

impl Leader {
    fn head(&self) -> u64 {
        self.history.len() as u64
    }

    fn state_at(&self, revision: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut state = BTreeMap::new();
        for r in &self.history[..revision as usize] {
            for m in &r.mutations {
                match &m.value {
                    Some(v) => state.insert(m.key.clone(), v.clone()),
                    None => state.remove(&m.key),
                };
            }
        }
        state
    }

    fn grow(&mut self, key: u8, delete: bool) {
        let revision = self.head() + 1;
        let value = (!delete).then(|| vec![key, revision as u8, (revision >> 8) as u8]);
        let mutation = Mutation { key: vec![key], value, create_revision: 1, version: 1, lease: 0 };
        self.history.push(RevisionChanges { revision, mutations: vec![mutation.clone(), mutation] });
    }
}

/// The follower's local group.
#[derive(Debug, Default)]
struct LocalGroup {
    applied: u64,
    compacted: u64,
    upstream: Option<u64>,
    leading: bool,
    state: BTreeMap<Vec<u8>, Vec<u8>>,
    staged: Vec<KeyValue>,
}

impl LocalGroup {
    fn local(&self) -> Local {
        Local {
            leading: self.leading,
            applied: Revision(self.applied),
            compacted: Revision(self.compacted),
            upstream_table: self.upstream.map(GroupId),
        }
    }
}

#[derive(Debug)]
enum Open {
    None,
    /// Change-stream messages still to come; after them, heartbeats and
    /// whatever the leader appends.
    Changes {
        next: u64,
        queued: VecDeque<Changes>,
    },
    Snapshot(VecDeque<SnapshotChunk>),
}

/// Fault and scheduling choices, consumed one at a time; once they run out
/// the world is calm (no faults, this node leads) and the follower must
/// catch up.
struct Choices(VecDeque<u8>);

impl Choices {
    fn next(&mut self) -> Option<u8> {
        self.0.pop_front()
    }
    /// A fault with probability about `1 / every` while choices last.
    fn fault(&mut self, every: u8) -> bool {
        self.next().is_some_and(|c| c % every == 0)
    }
}

const TABLE: u64 = 7;

fn split(r: &RevisionChanges, choices: &mut Choices) -> Vec<RevisionPart> {
    let n = r.mutations.len();
    let cut = choices.next().map_or(n, |c| 1 + c as usize % n);
    let mut parts =
        vec![RevisionPart { revision: r.revision, mutations: r.mutations[..cut].to_vec(), continued: cut < n }];
    if cut < n {
        parts.push(RevisionPart { revision: r.revision, mutations: r.mutations[cut..].to_vec(), continued: false });
    }
    parts
}

/// Messages carrying revisions `from..=head`, packed a few parts at a time.
fn messages(leader: &Leader, from: u64, choices: &mut Choices) -> VecDeque<Changes> {
    let mut parts: VecDeque<RevisionPart> =
        leader.history[(from - 1) as usize..].iter().flat_map(|r| split(r, choices)).collect();
    let mut out = VecDeque::new();
    while !parts.is_empty() {
        let take = choices.next().map_or(parts.len(), |c| 1 + c as usize % 4).min(parts.len());
        out.push_back(Changes {
            leader_revision: Revision(leader.head()),
            revisions: parts.drain(..take).collect(),
            snapshot_needed: None,
            table_id: Some(GroupId(TABLE)),
            compacted_revision: Revision(leader.compacted),
        });
    }
    out
}

fn snapshot(leader: &Leader, choices: &mut Choices) -> VecDeque<SnapshotChunk> {
    let revision = Revision(leader.head());
    let kvs: Vec<KeyValue> = leader
        .state_at(revision.0)
        .into_iter()
        .map(|(key, value)| KeyValue {
            key,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            value,
            ..Default::default()
        })
        .collect();
    let (count, digest) = (kvs.len() as u64, kvs_digest(&kvs));
    let per_chunk = choices.next().map_or(kvs.len().max(1), |c| 1 + c as usize % 3);
    let mut chunks: VecDeque<SnapshotChunk> = kvs
        .chunks(per_chunk)
        .map(|c| SnapshotChunk { revision, count, digest, kvs: c.to_vec(), last: false })
        .collect();
    if chunks.is_empty() {
        chunks.push_back(SnapshotChunk { revision, count, digest, kvs: vec![], last: false });
    }
    chunks.back_mut().unwrap().last = true;
    chunks
}

/// Runs the machine against the model until the follower has caught up
/// in a calm world, checking every effect on the way.
fn run(initial: Leader, choices: Vec<u8>) -> Result<(), TestCaseError> {
    let config = Config::default();
    let mut leader = initial;
    let mut choices = Choices(choices.into());
    let mut group = LocalGroup { leading: true, ..LocalGroup::default() };
    let mut now = Duration::ZERO;
    let mut s = Subscription::new(config.clone(), now);
    let mut open = Open::None;
    // When the last attempt failed (and the backoff it set), or ended cleanly.
    let mut last_end: Option<(Duration, bool)> = None;
    let mut backoff = config.backoff_min;
    let mut calm_steps = 0;
    for _ in 0..20_000 {
        while let Some(effect) = s.poll_effect() {
            if effect.needs_answer() {
                prop_assert!(!s.effects.iter().any(Effect::needs_answer), "two answers outstanding");
            }
            match effect {
                Effect::Close => open = Open::None,
                Effect::Subscribe { from_revision, rotate } => {
                    let from_revision = from_revision.0;
                    prop_assert_eq!(from_revision, group.applied + 1, "resume point");
                    let (ended, failed) = last_end.take().unwrap_or((Duration::ZERO, false));
                    prop_assert_eq!(rotate, failed, "rotation after failures only");
                    if failed {
                        prop_assert!(now >= ended + backoff + config.poll, "backoff respected");
                        backoff = (backoff * 2).min(config.backoff_max);
                    } else {
                        backoff = config.backoff_min;
                    }
                    prop_assert!(group.leading, "subscribed without leading");
                    if choices.fault(5) {
                        s.handle_opened(now, Err("connection refused".into()));
                        continue;
                    }
                    open = if from_revision < leader.first_retained {
                        let needed = Changes {
                            leader_revision: Revision(leader.head()),
                            snapshot_needed: Some(Revision(leader.first_retained)),
                            table_id: Some(GroupId(TABLE)),
                            ..Changes::default()
                        };
                        Open::Changes { next: u64::MAX, queued: VecDeque::from([needed]) }
                    } else {
                        Open::Changes {
                            next: leader.head() + 1,
                            queued: messages(&leader, from_revision, &mut choices),
                        }
                    };
                    s.handle_opened(now, Ok(()));
                }
                Effect::RecordUpstream { table_id } => {
                    prop_assert_eq!(group.upstream, None);
                    prop_assert_eq!(table_id, GroupId(TABLE));
                    group.upstream = Some(table_id.0);
                    s.handle_done(now, &group.local(), Ok(()));
                }
                Effect::DeleteRecreated { .. } => prop_assert!(false, "the table was never re-created"),
                Effect::Propose { batch, leader_revision } => {
                    prop_assert_eq!(group.upstream, Some(TABLE), "proposed before recording the table id");
                    prop_assert!(leader_revision.0 <= leader.head());
                    for (i, r) in batch.iter().enumerate() {
                        prop_assert_eq!(r.revision, group.applied + 1 + i as u64, "not consecutive from applied + 1");
                        prop_assert_eq!(r, &leader.history[r.revision as usize - 1], "not the whole revision");
                    }
                    if choices.fault(9) {
                        s.handle_proposed(now, &group.local(), Err("not leader".into()));
                        continue;
                    }
                    for r in &batch {
                        for m in &r.mutations {
                            match &m.value {
                                Some(v) => group.state.insert(m.key.clone(), v.clone()),
                                None => group.state.remove(&m.key),
                            };
                        }
                    }
                    group.applied += batch.len() as u64;
                    let outcome = ReplicateOutcome { applied: true, revision: group.applied };
                    s.handle_proposed(now, &group.local(), Ok(outcome));
                }
                Effect::Compact { revision } => {
                    let revision = revision.0;
                    prop_assert!(revision > group.compacted && revision <= group.applied);
                    prop_assert!(revision <= leader.compacted);
                    group.compacted = revision;
                    s.handle_done(now, &group.local(), Ok(()));
                }
                Effect::RequestSnapshot => {
                    if choices.fault(5) {
                        s.handle_opened(now, Err("connection reset".into()));
                        continue;
                    }
                    open = Open::Snapshot(snapshot(&leader, &mut choices));
                    s.handle_opened(now, Ok(()));
                }
                Effect::ProposeChunk { first, kvs, .. } => {
                    if first {
                        group.staged.clear();
                    }
                    group.staged.extend(kvs);
                    s.handle_done(now, &group.local(), Ok(()));
                }
                Effect::CommitSnapshot { revision, count, digest } => {
                    let revision = revision.0;
                    let result = if revision <= group.applied {
                        Err(SnapshotRefusal::Behind { current: group.applied })
                    } else if group.staged.len() as u64 != count || kvs_digest(&group.staged) != digest {
                        Err(SnapshotRefusal::Mismatch { staged: group.staged.len() as u64, expected: count })
                    } else {
                        group.state = group.staged.drain(..).map(|kv| (kv.key, kv.value)).collect();
                        group.applied = revision;
                        group.compacted = revision;
                        Ok(revision)
                    };
                    s.handle_committed(now, Ok(result));
                }
            }
            prop_assert_eq!(&group.state, &leader.state_at(group.applied), "local state is not the leader's");
        }
        while let Some(event) = s.poll_event() {
            match event {
                Event::Failed(_) => last_end = Some((now, true)),
                Event::SnapshotStarted(_) | Event::Contact { .. } | Event::Active(_) => {}
                Event::SnapshotInstalled { .. } | Event::SnapshotNotNeeded { .. } => {}
                Event::Recreated { .. } => prop_assert!(false, "not re-created"),
            }
        }
        if matches!(s.phase, Phase::Idle { .. }) && last_end.is_none() {
            last_end = Some((now, false));
        }
        let calm = choices.0.is_empty();
        if calm {
            group.leading = true;
            calm_steps += 1;
            if group.applied == leader.head() && group.compacted >= leader.compacted.min(group.applied) {
                return Ok(());
            }
            prop_assert!(calm_steps < 2_000, "no progress in a calm world: {group:?} {leader:?}");
        }
        // The world moves: the leader writes, compacts, trims its history.
        match choices.next() {
            Some(c) if c % 7 == 0 => leader.grow(c / 7 % 5, c % 2 == 0),
            Some(c) if c % 23 == 0 => leader.compacted = leader.compacted.max(u64::from(c) % (leader.head() + 1)),
            Some(c) if c % 29 == 0 => {
                leader.first_retained = leader.first_retained.max(u64::from(c) % (leader.head() + 2)).max(1)
            }
            Some(c) if c % 31 == 0 => group.leading = !group.leading,
            _ => {}
        }
        // The next input: a message of the open stream, a fault, or time.
        let wanted = s.wants_message();
        match &mut open {
            Open::Changes { next, queued } if wanted => {
                if choices.fault(11) {
                    s.handle_closed(now, Some("stream reset".into()));
                    continue;
                }
                if choices.fault(13) {
                    // Silence: time passes with nothing on the stream.
                    now = s.poll_timeout().unwrap_or(now);
                    s.handle_tick(now, &group.local());
                    continue;
                }
                if queued.is_empty() && *next <= leader.head() {
                    let from = *next;
                    *next = leader.head() + 1;
                    *queued = messages(&leader, from, &mut choices);
                }
                now += MS;
                let msg = queued.pop_front().unwrap_or(Changes {
                    leader_revision: Revision(leader.head()),
                    table_id: Some(GroupId(TABLE)),
                    compacted_revision: Revision(leader.compacted),
                    ..Changes::default()
                });
                if msg.snapshot_needed.is_some() {
                    // The leader ends the stream after asking for a snapshot.
                    *next = u64::MAX;
                }
                s.handle_changes(now, &group.local(), msg);
            }
            Open::Snapshot(chunks) if wanted => {
                now += MS;
                if choices.fault(11) {
                    s.handle_closed(now, Some("snapshot stream reset".into()));
                    continue;
                }
                match chunks.pop_front() {
                    Some(c) => s.handle_chunk(now, c),
                    None => s.handle_closed(now, None),
                }
            }
            _ => {
                let Some(t) = s.poll_timeout() else {
                    return Err(TestCaseError::fail("stuck: no effect, no message wanted, no timeout"));
                };
                now = now.max(t);
                s.handle_tick(now, &group.local());
            }
        }
    }
    Err(TestCaseError::fail("did not finish"))
}

fn leader_strategy() -> impl Strategy<Value = Leader> {
    (proptest::collection::vec((0u8..5, any::<bool>()), 0..30), 0u64..40, 0u64..40).prop_map(
        |(writes, retained, compacted)| {
            let mut leader = Leader { history: Vec::new(), first_retained: 1, compacted: 0 };
            for (key, delete) in writes {
                leader.grow(key, delete);
            }
            leader.first_retained = (retained % (leader.head() + 2)).max(1);
            leader.compacted = compacted % (leader.head() + 1);
            leader
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the faults, the follower applies only whole revisions,
    /// consecutively from its resume point, so its state is always the
    /// leader's at its revision; it backs off and rotates after failures;
    /// and once the world is calm it catches up with the leader (by
    /// snapshot when the history is gone) and follows its compaction.
    #[test]
    fn converges_on_the_leader_without_ever_diverging(
        leader in leader_strategy(),
        choices in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        run(leader, choices)?;
    }
}
