//! Tests of the watch stream: unit tests of each rule, and a property test
//! that drives a stream against a model table with a slow client, history
//! that is trimmed meanwhile, cancels and progress requests.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;

fn kv(key: &[u8], value: &[u8], revision: u64, create: u64, version: u64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        create_revision: create,
        mod_revision: revision,
        version,
        value: value.to_vec(),
        ..Default::default()
    }
}

fn put(key: &[u8], revision: u64) -> WatchEvent {
    WatchEvent { kind: EventKind::Put, kv: kv(key, b"v", revision, revision, 1), prev_kv: None }
}

fn del(key: &[u8], revision: u64) -> WatchEvent {
    WatchEvent { kind: EventKind::Delete, kv: kv(key, b"", revision, 0, 0), prev_kv: None }
}

fn rev(revision: u64, events: Vec<WatchEvent>) -> RevisionEvents {
    RevisionEvents { revision: Revision(revision), events }
}

fn table(current: u64, compacted: u64) -> TableState {
    TableState { current: Revision(current), compacted: Revision(compacted) }
}

fn drain(s: &mut WatchStream) -> Vec<WatchResponse> {
    std::iter::from_fn(|| s.poll_response()).collect()
}

fn watch(key: &[u8]) -> WatchSpec {
    WatchSpec { key: key.to_vec(), ..WatchSpec::default() }
}

#[test]
fn ranges_cover_a_key_a_range_or_everything_from_a_key() {
    let one = watch(b"b");
    assert!(one.covers(b"b") && !one.covers(b"ba") && !one.covers(b"a"));
    let range = WatchSpec { range_end: b"c".to_vec(), ..watch(b"b") };
    assert!(range.covers(b"b") && range.covers(b"bzz") && !range.covers(b"c"));
    let from = WatchSpec { range_end: vec![0], ..watch(b"b") };
    assert!(from.covers(b"zzz") && !from.covers(b"a"));
}

#[test]
fn a_watcher_gets_events_from_the_next_revision_with_ids_chosen_in_order() {
    let mut s = WatchStream::new(Config::default(), table(5, 0));
    s.handle_create(watch(b"a"), table(5, 0));
    s.handle_create(WatchSpec { watch_id: Some(7), ..watch(b"b") }, table(5, 0));
    s.handle_create(watch(b"a"), table(5, 0));
    let created = drain(&mut s);
    assert_eq!(
        created.iter().map(|r| (r.watch_id, r.created, r.revision)).collect::<Vec<_>>(),
        vec![(0, true, Revision(5)), (7, true, Revision(5)), (1, true, Revision(5))]
    );
    s.handle_applied(&[rev(6, vec![put(b"a", 6), put(b"b", 6)]), rev(7, vec![del(b"a", 7)])], table(7, 0));
    let r = drain(&mut s);
    assert_eq!(r.iter().map(|r| r.watch_id).collect::<Vec<_>>(), vec![0, 1, 7]);
    assert_eq!((r[0].watch_id, r[0].revision), (0, Revision(7)));
    assert_eq!(r[0].events, vec![put(b"a", 6), del(b"a", 7)]);
    assert_eq!(r[1].events, r[0].events);
    assert_eq!(r[2].events, vec![put(b"b", 6)]);
    // A duplicate id is refused; the stream goes on.
    s.handle_create(WatchSpec { watch_id: Some(7), ..watch(b"x") }, table(7, 0));
    let r = drain(&mut s);
    assert!(r[0].created && r[0].canceled && r[0].cancel_reason == DUPLICATE_ID);
    assert_eq!(s.watchers(), 3);
}

#[test]
fn filters_and_prev_kv() {
    let mut s = WatchStream::new(Config::default(), table(1, 0));
    s.handle_create(WatchSpec { no_put: true, ..watch(b"a") }, table(1, 0));
    s.handle_create(WatchSpec { no_delete: true, prev_kv: true, ..watch(b"a") }, table(1, 0));
    s.handle_create(watch(b"a"), table(1, 0));
    drain(&mut s);
    assert!(s.wants_prev_kv());
    let prev = kv(b"a", b"old", 1, 1, 1);
    let mut p = put(b"a", 2);
    p.prev_kv = Some(prev.clone());
    let mut d = del(b"a", 3);
    d.prev_kv = Some(kv(b"a", b"v", 2, 1, 2));
    s.handle_applied(&[rev(2, vec![p.clone()]), rev(3, vec![d.clone()])], table(3, 0));
    let r = drain(&mut s);
    assert_eq!(r[0].events, vec![WatchEvent { prev_kv: None, ..d.clone() }], "deletes only, no prev_kv");
    assert_eq!(r[1].events, vec![p.clone()], "puts with prev_kv");
    assert_eq!(r[2].events, vec![WatchEvent { prev_kv: None, ..p }, WatchEvent { prev_kv: None, ..d }]);
}

#[test]
fn a_start_in_the_past_is_served_from_history_then_joins_the_applied_revisions() {
    let mut s = WatchStream::new(Config::default(), table(10, 2));
    s.handle_create(WatchSpec { start_revision: Some(Revision(4)), ..watch(b"a") }, table(10, 2));
    drain(&mut s);
    // Applied revisions do not skip what it is owed.
    s.handle_applied(&[rev(11, vec![put(b"a", 11)])], table(11, 2));
    assert_eq!(drain(&mut s), vec![]);
    let req = s.poll_history().expect("history asked for");
    assert_eq!(req.from, Revision(4));
    assert_eq!(s.poll_history(), None, "one request at a time");
    s.handle_history(History::Revisions((4..=8).map(|r| rev(r, vec![put(b"a", r)])).collect()), table(11, 2));
    let r = drain(&mut s);
    assert_eq!(r[0].events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
    assert_eq!(r[0].revision, Revision(8));
    assert_eq!(s.poll_history().unwrap().from, Revision(9));
    s.handle_history(History::Revisions((9..=11).map(|r| rev(r, vec![put(b"a", r)])).collect()), table(11, 2));
    let r = drain(&mut s);
    assert_eq!(r[0].events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(), vec![9, 10, 11]);
    assert_eq!(s.poll_history(), None, "in step now");
    s.handle_applied(&[rev(12, vec![put(b"a", 12)])], table(12, 2));
    assert_eq!(drain(&mut s)[0].events, vec![put(b"a", 12)]);
}

#[test]
fn a_start_below_the_compaction_is_answered_compacted() {
    let mut s = WatchStream::new(Config::default(), table(10, 5));
    s.handle_create(WatchSpec { start_revision: Some(Revision(4)), ..watch(b"a") }, table(10, 5));
    let r = drain(&mut s);
    assert!(r[0].created && !r[0].canceled);
    assert!(r[1].canceled && r[1].compact_revision == Revision(5), "{r:?}");
    assert_eq!(s.watchers(), 0);
    // At the compaction revision itself: served (etcd's rule), so a client
    // told "compacted at 5" resumes at 5.
    s.handle_create(WatchSpec { start_revision: Some(Revision(5)), ..watch(b"a") }, table(10, 5));
    let r = drain(&mut s);
    assert!(r[0].created && !r[0].canceled && r.len() == 1, "{r:?}");
    assert_eq!(s.watchers(), 1);
    s.handle_cancel(r[0].watch_id);
    drain(&mut s);
    // History trimmed while a watcher was behind: cancelled the same way.
    s.handle_create(WatchSpec { start_revision: Some(Revision(6)), ..watch(b"a") }, table(10, 5));
    drain(&mut s);
    assert_eq!(s.poll_history().unwrap().from, Revision(6));
    s.handle_history(History::Compacted { first_retained: Revision(8) }, table(10, 7));
    let r = drain(&mut s);
    assert!(r[0].canceled && r[0].compact_revision == Revision(8), "resume at the first revision still there");
}

#[test]
fn a_full_outbox_stops_queueing_and_the_watcher_catches_up_from_history() {
    let config = Config { outbox_bytes_max: 300, ..Config::default() };
    let mut s = WatchStream::new(config, table(0, 0));
    s.handle_create(watch(b"a"), table(0, 0));
    drain(&mut s);
    let big = |r| WatchEvent { kind: EventKind::Put, kv: kv(b"a", &[7; 200], r, 1, r), prev_kv: None };
    s.handle_applied(&[rev(1, vec![big(1)])], table(1, 0));
    s.handle_applied(&[rev(2, vec![big(2)])], table(2, 0));
    s.handle_applied(&[rev(3, vec![big(3)])], table(3, 0));
    // Revision 2 went in (the outbox was not over the limit yet); 3 did not.
    assert_eq!(s.poll_history(), None, "not while the outbox is full");
    let r = drain(&mut s);
    assert_eq!(r.iter().flat_map(|r| &r.events).map(|e| e.kv.mod_revision).collect::<Vec<_>>(), vec![1, 2]);
    let req = s.poll_history().unwrap();
    assert_eq!(req.from, Revision(3));
    s.handle_history(History::Revisions(vec![rev(3, vec![big(3)])]), table(3, 0));
    assert_eq!(drain(&mut s)[0].events, vec![big(3)]);
}

#[test]
fn large_responses_are_fragmented_for_watchers_that_ask() {
    let config = Config { response_bytes_max: 400, ..Config::default() };
    let mut s = WatchStream::new(config, table(0, 0));
    s.handle_create(WatchSpec { fragment: true, range_end: vec![0], ..watch(b"") }, table(0, 0));
    s.handle_create(WatchSpec { range_end: vec![0], ..watch(b"") }, table(0, 0));
    drain(&mut s);
    let events: Vec<WatchEvent> = (0..5u8)
        .map(|i| WatchEvent { kind: EventKind::Put, kv: kv(&[i], &[1; 100], 1, 1, 1), prev_kv: None })
        .collect();
    s.handle_applied(&[rev(1, events.clone())], table(1, 0));
    let r = drain(&mut s);
    let (frag, whole): (Vec<_>, Vec<_>) = r.into_iter().partition(|r| r.watch_id == 0);
    assert!(frag.len() > 1);
    assert!(frag[..frag.len() - 1].iter().all(|r| r.fragment) && !frag.last().unwrap().fragment);
    assert_eq!(frag.into_iter().flat_map(|r| r.events).collect::<Vec<_>>(), events);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].events, events);
}

#[test]
fn progress_waits_until_every_watcher_is_in_step() {
    let mut s = WatchStream::new(Config::default(), table(10, 0));
    s.handle_create(watch(b"a"), table(10, 0));
    s.handle_create(WatchSpec { start_revision: Some(Revision(9)), ..watch(b"b") }, table(10, 0));
    drain(&mut s);
    s.handle_progress_request();
    assert_eq!(drain(&mut s), vec![], "watcher 1 is owed revisions 9 and 10");
    s.poll_history().unwrap();
    s.handle_history(History::Revisions(vec![rev(9, vec![]), rev(10, vec![put(b"b", 10)])]), table(10, 0));
    let r = drain(&mut s);
    assert_eq!(r.len(), 2);
    assert_eq!((r[1].watch_id, r[1].revision), (-1, Revision(10)));
}

#[test]
fn periodic_progress_goes_to_quiet_watchers_in_step_that_asked() {
    let config = Config { progress_interval: Duration::from_secs(10), ..Config::default() };
    let mut s = WatchStream::new(config, table(3, 0));
    s.handle_create(WatchSpec { progress_notify: true, ..watch(b"a") }, table(3, 0));
    s.handle_create(WatchSpec { progress_notify: true, ..watch(b"b") }, table(3, 0));
    s.handle_create(watch(b"c"), table(3, 0));
    drain(&mut s);
    s.handle_tick(Duration::from_secs(1));
    assert_eq!(s.poll_timeout(), Some(Duration::from_secs(11)));
    s.handle_applied(&[rev(4, vec![put(b"a", 4)])], table(4, 0));
    drain(&mut s);
    s.handle_tick(Duration::from_secs(5));
    assert_eq!(drain(&mut s), vec![], "not yet");
    s.handle_tick(Duration::from_secs(11));
    let r = drain(&mut s);
    assert_eq!(
        r.iter().map(|r| (r.watch_id, r.revision, r.events.len())).collect::<Vec<_>>(),
        vec![(1, Revision(4), 0)]
    );
}

#[test]
fn cancel_answers_once_and_stops_events() {
    let mut s = WatchStream::new(Config::default(), table(0, 0));
    s.handle_create(watch(b"a"), table(0, 0));
    drain(&mut s);
    s.handle_cancel(0);
    s.handle_cancel(0);
    s.handle_cancel(42);
    let r = drain(&mut s);
    assert_eq!(r.len(), 1);
    assert!(r[0].canceled && r[0].watch_id == 0);
    s.handle_applied(&[rev(1, vec![put(b"a", 1)])], table(1, 0));
    assert_eq!(drain(&mut s), vec![]);
}

// ---- property test ----

/// The table: its revisions (index i is revision i + 1), how many are
/// applied, and the first revision whose history is still readable.
struct Model {
    history: Vec<RevisionEvents>,
    applied: u64,
    first_retained: u64,
}

impl Model {
    fn new(writes: &[(u8, bool, u8)]) -> Model {
        let mut state: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        let mut history = Vec::new();
        for (i, &(key, delete, also)) in writes.iter().enumerate() {
            let revision = i as u64 + 1;
            let mut events = Vec::new();
            let mut keys = vec![vec![b'a' + key % 5]];
            if also % 3 == 0 && also % 5 != key % 5 {
                keys.push(vec![b'a' + also % 5]);
            }
            for k in keys {
                let prev = state.get(&k).cloned();
                if delete {
                    if let Some(prev) = prev {
                        state.remove(&k);
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv: kv(&k, b"", revision, 0, 0),
                            prev_kv: Some(prev),
                        });
                    }
                } else {
                    let (create, version) = prev.as_ref().map_or((revision, 1), |p| (p.create_revision, p.version + 1));
                    let new = kv(&k, &[revision as u8; 40], revision, create, version);
                    state.insert(k.clone(), new.clone());
                    events.push(WatchEvent { kind: EventKind::Put, kv: new, prev_kv: prev });
                }
            }
            history.push(RevisionEvents { revision: Revision(revision), events });
        }
        Model { history, applied: 0, first_retained: 1 }
    }

    fn table(&self) -> TableState {
        TableState { current: Revision(self.applied), compacted: Revision(self.first_retained) }
    }

    /// What a watcher with `spec` starting at `from` is owed, through `to`.
    fn expected(&self, spec: &WatchSpec, from: u64, to: u64) -> Vec<WatchEvent> {
        self.history[(from.max(1) - 1) as usize..to as usize]
            .iter()
            .flat_map(|r| r.events.iter().filter(|e| spec.passes(e)))
            .map(|e| WatchEvent { prev_kv: if spec.prev_kv { e.prev_kv.clone() } else { None }, ..e.clone() })
            .collect()
    }
}

/// What the client knows of one watcher.
struct Seen {
    spec: WatchSpec,
    from: u64,
    events: Vec<WatchEvent>,
    /// Events of a response still arriving in fragments.
    partial: Vec<WatchEvent>,
    canceled: bool,
}

fn spec_strategy() -> impl Strategy<Value = (WatchSpec, u8)> {
    (0u8..5, 0u8..4, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0u8..8).prop_map(
        |(key, range, no_put, no_delete, prev_kv, fragment, progress_notify, start)| {
            let key_bytes = vec![b'a' + key];
            let range_end = match range {
                0 => vec![],
                1 => vec![0],
                2 => vec![b'a' + key + 2],
                _ => vec![b'a' + key],
            };
            let spec = WatchSpec {
                watch_id: None,
                key: key_bytes,
                range_end,
                start_revision: None,
                prev_kv,
                no_put,
                no_delete,
                progress_notify,
                fragment,
            };
            (spec, start)
        },
    )
}

fn run(writes: Vec<(u8, bool, u8)>, specs: Vec<(WatchSpec, u8)>, choices: Vec<u8>) -> Result<(), TestCaseError> {
    let mut model = Model::new(&writes);
    let head = model.history.len() as u64;
    let config = Config {
        outbox_bytes_max: 600,
        response_bytes_max: 250,
        history_revisions_max: 3,
        progress_interval: Duration::from_secs(1),
        ..Config::default()
    };
    let mut s = WatchStream::new(config, model.table());
    let mut choices: VecDeque<u8> = choices.into();
    let mut specs: VecDeque<(WatchSpec, u8)> = specs.into();
    let mut seen: BTreeMap<i64, Seen> = BTreeMap::new();
    // Creates in flight: the client matches each created response to them in order.
    let mut creating: VecDeque<(WatchSpec, u64)> = VecDeque::new();
    let mut now = Duration::ZERO;
    for step in 0..20_000 {
        let calm = choices.is_empty() && specs.is_empty();
        // Once the choices run out: create what is left, apply the rest,
        // read everything, and trim nothing more.
        let c = match choices.pop_front() {
            Some(c) => c,
            None if !specs.is_empty() => 2,
            None => 0,
        };
        match c % 8 {
            // The table applies a few revisions.
            0 | 1 if model.applied < head => {
                let n = (1 + u64::from(c / 8) % 3).min(head - model.applied);
                let batch = model.history[model.applied as usize..(model.applied + n) as usize].to_vec();
                model.applied += n;
                s.handle_applied(&batch, model.table());
            }
            // A watcher is created.
            2 if !specs.is_empty() => {
                let (mut spec, start) = specs.pop_front().unwrap();
                let from = match start {
                    0..=2 => model.applied + 1,
                    s => (model.applied + 2).saturating_sub(u64::from(s) * 2).max(1),
                };
                spec.start_revision = (start > 2).then_some(Revision(from));
                creating.push_back((spec.clone(), from));
                s.handle_create(spec, model.table());
            }
            // History is trimmed.
            3 if c % 5 == 0 && model.first_retained <= model.applied && !choices.is_empty() => {
                model.first_retained += 1
            }
            // The client cancels a watcher, or asks for progress.
            4 if c % 3 == 0 => {
                if let Some((&id, _)) = seen.iter().find(|(_, w)| !w.canceled) {
                    s.handle_cancel(id);
                }
            }
            4 => s.handle_progress_request(),
            5 => {
                now += Duration::from_millis(700);
                s.handle_tick(now);
            }
            // The client reads (slowly unless calm).
            _ => {}
        }
        let reads = if calm { usize::MAX } else { usize::from(c % 3) };
        for _ in 0..reads {
            let Some(r) = s.poll_response() else { break };
            check_response(&r, &mut seen, &mut creating, &model)?;
        }
        if let Some(req) = s.poll_history() {
            prop_assert!(req.from.get() >= 1 && req.from.get() <= model.applied, "history beyond applied: {req:?}");
            let answer = if req.from.get() < model.first_retained {
                History::Compacted { first_retained: Revision(model.first_retained) }
            } else {
                let to = (req.from.get() + req.max_revisions - 1).min(model.applied);
                History::Revisions(model.history[(req.from.get() - 1) as usize..to as usize].to_vec())
            };
            s.handle_history(answer, model.table());
        }
        if calm && model.applied == head && s.history_pending.is_none() {
            // Drain and check that every live watcher has everything.
            while let Some(r) = s.poll_response() {
                check_response(&r, &mut seen, &mut creating, &model)?;
            }
            if s.behind().next().is_none() {
                for (id, w) in &seen {
                    if !w.canceled {
                        let want = model.expected(&w.spec, w.from, head);
                        prop_assert_eq!(&w.events, &want, "watcher {} did not get everything", id);
                    }
                }
                return Ok(());
            }
        }
        prop_assert!(step < 19_999, "no end");
    }
    Ok(())
}

fn check_response(
    r: &WatchResponse,
    seen: &mut BTreeMap<i64, Seen>,
    creating: &mut VecDeque<(WatchSpec, u64)>,
    model: &Model,
) -> Result<(), TestCaseError> {
    prop_assert!(r.revision.get() <= model.applied, "a header beyond what is applied");
    if r.created {
        let (spec, from) = creating.pop_front().expect("a created response answers a create");
        prop_assert!(!r.canceled, "refused: {r:?}");
        prop_assert!(!seen.contains_key(&r.watch_id), "id {} reused", r.watch_id);
        seen.insert(r.watch_id, Seen { spec, from, events: vec![], partial: vec![], canceled: false });
        return Ok(());
    }
    if r.watch_id == -1 {
        // Stream-wide progress: every watcher has everything up to it.
        for (id, w) in seen.iter().filter(|(_, w)| !w.canceled) {
            let want = model.expected(&w.spec, w.from, r.revision.get().max(w.from.saturating_sub(1)));
            prop_assert!(w.partial.is_empty());
            prop_assert_eq!(&w.events, &want, "progress at {} claims more than watcher {} got", r.revision, id);
        }
        return Ok(());
    }
    let w = seen.get_mut(&r.watch_id).expect("a response for a known watcher");
    prop_assert!(!w.canceled, "a response after the cancel");
    if r.canceled {
        if r.compact_revision.get() > 0 {
            // Only when what it is owed is gone.
            let next = w.events.last().map_or(w.from, |e| e.kv.mod_revision + 1);
            prop_assert!(next < r.compact_revision.get() || next < model.first_retained, "compacted too eagerly");
        }
        w.canceled = true;
        return Ok(());
    }
    w.partial.extend(r.events.iter().cloned());
    if r.fragment {
        prop_assert!(w.spec.fragment, "fragments without asking");
        return Ok(());
    }
    let events = std::mem::take(&mut w.partial);
    if events.is_empty() {
        // A progress notification for this watcher.
        let want = model.expected(&w.spec, w.from, r.revision.get());
        prop_assert_eq!(&w.events, &want, "progress claims more than delivered");
        return Ok(());
    }
    w.events.extend(events);
    // A whole response ends on a revision boundary: the client then has
    // exactly what it is owed through the response's revision.
    let through = w.events.last().unwrap().kv.mod_revision;
    prop_assert!(r.revision.get() >= through);
    let want = model.expected(&w.spec, w.from, r.revision.get());
    prop_assert_eq!(&w.events, &want, "watcher {} through revision {}", r.watch_id, r.revision);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every watcher sees exactly the table's history restricted to its
    /// range and filters, from its start, with the right prev_kv, in whole
    /// revisions, whatever the pace of the client and the trimming of
    /// history (or is cancelled as compacted when its history is gone);
    /// progress never claims more than was delivered; once calm, every
    /// watcher has everything.
    #[test]
    fn watchers_see_exactly_the_history_of_their_range(
        writes in proptest::collection::vec((0u8..5, any::<bool>(), any::<u8>()), 1..40),
        specs in proptest::collection::vec(spec_strategy(), 1..6),
        choices in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        run(writes, specs, choices)?;
    }
}
