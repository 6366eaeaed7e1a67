//! Watchers of the etcd table in the simulated world, and checker W1.
//!
//! Each watcher is a client of the etcd Watch API or of armada.v1's Watch
//! (half each) on the leader cluster's nodes. It watches one key or every key of the workload, with or without
//! `prev_kv`, from the table's first revision or from "now"; it moves to
//! another node from time to time (and whenever its stream breaks),
//! resuming at the revision after the last event it saw, as etcd clients
//! do. Every stream it opens is a segment of its record.
//!
//! W1 (safety, every seed): each segment's events are exactly the table's
//! history restricted to the watcher's range, from the segment's start, in
//! order, with no gap or duplicate, each with the `prev_kv` the history
//! gives (the key's value before the event); a segment cancelled as
//! compacted was still owed a revision below the compaction revision
//! it names. The
//! history is the leader cluster's: every revision's mutations as first
//! applied there, read from the applying node's changelog.

use armada_proto::etcd as epb;

use super::*;

/// One event as a watcher saw it: (revision, key, put?, value, prev value).
pub(super) type Seen = (u64, String, bool, String, Option<String>);

/// One stream of one watcher.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub watcher: u32,
    /// The cluster watched (0: the leader cluster) and its node.
    pub cluster: u64,
    pub node: u64,
    /// When the stream was opened, and when each event arrived.
    pub opened_ns: u64,
    pub arrived_ns: Vec<u64>,
    /// The API it watched through.
    pub api: &'static str,
    /// `None`: every key of the workload; `Some(k)`: the key `k` alone.
    pub key: Option<String>,
    pub prev_kv: bool,
    /// The first revision the stream owes (known once created).
    pub start: u64,
    pub events: Vec<Seen>,
    /// The stream was cancelled as compacted at this revision.
    pub compacted: Option<u64>,
    /// Progress notifications: (events received before it, its revision).
    pub progress: Vec<(usize, u64)>,
}

impl Segment {
    /// Where the stream was served.
    fn place(&self) -> String {
        match self.cluster {
            0 => format!("node {}", self.node),
            c => format!("follower cluster {c} node {}", self.node),
        }
    }
}

/// Watch latency at follower clusters, in milliseconds: for each event a
/// follower-cluster stream received live (its revision first applied on
/// the leader cluster after the stream opened), from that apply to the
/// event's arrival.
pub(super) fn follower_latency_ms(shared: &Shared) -> Vec<f64> {
    let log = shared.watch.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for seg in log.segments.iter().filter(|s| s.cluster > 0) {
        for (e, arrived) in seg.events.iter().zip(&seg.arrived_ns) {
            if let Some(&applied) = log.applied_ns.get(&e.0) {
                if applied >= seg.opened_ns && *arrived >= applied {
                    out.push((*arrived - applied) as f64 / 1e6);
                }
            }
        }
    }
    out
}

/// What the watchers saw, and the history to compare it with.
#[derive(Debug, Default)]
pub(super) struct WatchLog {
    pub segments: Vec<Segment>,
    /// The etcd table's mutations per revision, as first applied on the
    /// leader cluster.
    pub history: BTreeMap<u64, Vec<armada_core::mvcc::replication::Mutation>>,
    /// When each revision was first applied on the leader cluster.
    pub applied_ns: BTreeMap<u64, u64>,
    pub events_seen: u64,
    /// Progress notifications received (W2 checks each).
    pub progress_seen: u64,
}

impl WatchLog {
    /// Records revision `revision` of the etcd table as applied on a leader
    /// cluster node (the first record of a revision wins).
    pub fn applied(&mut self, engine: &dyn Engine, group: GroupId, revision: u64, now_ns: u64) {
        if self.history.contains_key(&revision) {
            return;
        }
        self.applied_ns.entry(revision).or_insert(now_ns);
        let store = Mvcc::new(engine, data_ns(group));
        if let Ok(armada_core::mvcc::replication::ChangesFrom::Changes(cs)) =
            store.changes_from(revision, 1, usize::MAX)
        {
            if let Some(c) = cs.into_iter().next().filter(|c| c.revision == revision) {
                self.history.insert(revision, c.mutations);
            }
        }
    }
}

/// The key and range end a watcher asks for: its key alone, or every key
/// of the workload ("k0000" .. "k9999").
fn key_range(key: &Option<String>) -> (Vec<u8>, Vec<u8>) {
    match key {
        Some(k) => (k.clone().into_bytes(), Vec::new()),
        None => (b"k".to_vec(), b"l".to_vec()),
    }
}

fn create(key: &Option<String>, start: u64, prev_kv: bool) -> epb::WatchRequest {
    let (key, range_end) = key_range(key);
    epb::WatchRequest {
        request_union: Some(epb::watch_request::RequestUnion::CreateRequest(epb::WatchCreateRequest {
            key,
            range_end,
            start_revision: start as i64,
            prev_kv,
            ..Default::default()
        })),
    }
}

/// A response of either API, as the watcher needs it.
struct Resp {
    created: bool,
    canceled: bool,
    compact_revision: u64,
    /// The header's revision.
    revision: u64,
    events: Vec<Seen>,
    /// A progress notification (etcd: the answer to a progress request).
    progress: bool,
}

/// An open watch stream of either API.
enum Stream {
    /// The etcd stream, and the sender of its requests (kept open; progress
    /// requests go through it).
    Etcd(tonic::Streaming<epb::WatchResponse>, tokio::sync::mpsc::Sender<epb::WatchRequest>),
    V1(tonic::Streaming<pb::WatchResponse>),
}

/// What a watcher records of one event.
fn seen(put: bool, key: Vec<u8>, value: Vec<u8>, mod_revision: i64, prev_value: Option<Vec<u8>>) -> Seen {
    (mod_revision.max(0) as u64, utf8(key), put, utf8(value), prev_value.map(utf8))
}

impl Stream {
    /// Asks an etcd stream for a progress notification (armada.v1 has no
    /// such request).
    fn request_progress(&self) {
        if let Stream::Etcd(_, tx) = self {
            let req = epb::WatchRequest {
                request_union: Some(epb::watch_request::RequestUnion::ProgressRequest(epb::WatchProgressRequest {})),
            };
            let _ = tx.try_send(req);
        }
    }

    /// The next response; `None` when the stream ended or failed.
    async fn next(&mut self) -> Option<Resp> {
        let rev = |v: i64| v.max(0) as u64;
        match self {
            Stream::Etcd(s, _) => {
                let r = s.message().await.ok()??;
                let put = epb::event::EventType::Put as i32;
                let events: Vec<Seen> = r
                    .events
                    .into_iter()
                    .map(|e| {
                        let kv = e.kv.unwrap_or_default();
                        seen(e.r#type == put, kv.key, kv.value, kv.mod_revision, e.prev_kv.map(|p| p.value))
                    })
                    .collect();
                Some(Resp {
                    progress: r.watch_id == -1 && events.is_empty() && !r.created && !r.canceled,
                    created: r.created,
                    canceled: r.canceled,
                    compact_revision: rev(r.compact_revision),
                    revision: r.header.map_or(0, |h| rev(h.revision)),
                    events,
                })
            }
            Stream::V1(s) => {
                let r = s.message().await.ok()??;
                let put = pb::event::EventType::Put as i32;
                let events = r
                    .events
                    .into_iter()
                    .map(|e| {
                        let kv = e.kv.unwrap_or_default();
                        seen(e.r#type == put, kv.key, kv.value, kv.mod_revision, e.prev_kv.map(|p| p.value))
                    })
                    .collect();
                Some(Resp {
                    progress: false,
                    created: r.created,
                    canceled: r.compact_revision > 0,
                    compact_revision: rev(r.compact_revision),
                    revision: r.header.map_or(0, |h| rev(h.revision)),
                    events,
                })
            }
        }
    }
}

/// Opens a watch stream on `host` through either API.
async fn open(host: &str, via_v1: bool, key: &Option<String>, start: u64, prev_kv: bool) -> Option<Stream> {
    if via_v1 {
        let channel = connect(&format!("{host}:8443")).await?;
        let (key, range_end) = key_range(key);
        let req = pb::WatchRequest {
            table: ETCD_TABLE.to_string(),
            key,
            range_end,
            start_revision: start as i64,
            prev_kv,
            ..Default::default()
        };
        let mut client = pb::kv_client::KvClient::new(channel);
        let resp = tokio::time::timeout(Duration::from_secs(2), client.watch(req)).await.ok()?.ok()?;
        return Some(Stream::V1(resp.into_inner()));
    }
    let channel = connect(&format!("{host}:{ETCD_PORT}")).await?;
    let mut client = epb::watch_client::WatchClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    tx.send(create(key, start, prev_kv)).await.ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.watch(requests)).await.ok()?.ok()?;
    Some(Stream::Etcd(resp.into_inner(), tx))
}

/// How long a watcher stays on one stream before it moves to another node.
const STREAM_MS: [u64; 2] = [500, 4000];

/// One watcher: streams from the leader cluster's nodes until `until_ns`
/// plus a moment for the last writes to arrive.
pub(super) async fn watcher_main(
    wid: u32,
    sc: Scenario,
    members: BTreeMap<u64, ArmadaNode>,
    shared: Arc<Shared>,
    until_ns: u64,
) {
    let key = (rand_range(0, 1) == 0).then(|| key_name(rand_range(0, u64::from(sc.keys.max(1) - 1)) as u32));
    let prev_kv = rand_range(0, 1) == 0;
    // Half the watchers use the etcd Watch API, half armada.v1's.
    let via_v1 = rand_range(0, 1) == 0;
    // 0: from the next revision; 1: from the table's first.
    let mut next: u64 = rand_range(0, 1);
    let stop_ns = until_ns + 2_000_000_000;
    while shared.now_ns() < stop_ns {
        // Now and then a watcher starts over from the table's first
        // revision (a client that lists from scratch): below the
        // compaction once there is one.
        if rand_range(0, 4) == 0 {
            next = 1;
        }
        // A third of the streams (with follower clusters) at a follower
        // cluster's node: it serves the leader cluster's revisions.
        let (cluster, node, host) = match &sc.followers {
            Some(fl) if rand_range(0, 2) == 0 => {
                let (c, n) = (rand_range(1, u64::from(fl.clusters)), rand_range(1, u64::from(fl.nodes)));
                (c, n, followers::cluster_ip(c, n))
            }
            _ => {
                let node = rand_range(1, sc.nodes as u64);
                let Some(host) = members.get(&node).and_then(|m| m.api_addr.split(':').next().map(str::to_string))
                else {
                    return;
                };
                (0, node, host)
            }
        };
        let opened_ns = shared.now_ns();
        let Some(mut stream) = open(&host, via_v1, &key, next, prev_kv).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut seg = Segment {
            watcher: wid,
            cluster,
            node,
            opened_ns,
            arrived_ns: vec![],
            progress: vec![],
            api: if via_v1 { "armada.v1" } else { "etcd" },
            key: key.clone(),
            prev_kv,
            start: next,
            events: vec![],
            compacted: None,
        };
        let leave_at = shared.now_ns() + rand_range(STREAM_MS[0], STREAM_MS[1]) * 1_000_000;
        let mut created = false;
        // Sometimes a progress request right behind the create: a watcher
        // starting in the past is still owed history then.
        if rand_range(0, 2) == 0 {
            stream.request_progress();
        }
        while shared.now_ns() < leave_at.min(stop_ns) {
            // Now and then (etcd streams) ask for a progress notification.
            if created && rand_range(0, 7) == 0 {
                stream.request_progress();
            }
            let r = match tokio::time::timeout(Duration::from_millis(250), stream.next()).await {
                Err(_) => continue,
                Ok(Some(r)) => r,
                Ok(None) => break,
            };
            if r.progress {
                seg.progress.push((seg.events.len(), r.revision));
                continue;
            }
            if r.created {
                created = true;
                if seg.start == 0 {
                    seg.start = r.revision + 1;
                }
                if r.canceled {
                    break;
                }
                continue;
            }
            if r.canceled {
                if r.compact_revision > 0 {
                    seg.compacted = Some(r.compact_revision);
                }
                break;
            }
            let now = shared.now_ns();
            seg.arrived_ns.extend(r.events.iter().map(|_| now));
            seg.events.extend(r.events);
        }
        drop(stream);
        if !created {
            continue;
        }
        // Resume after the last event seen; a compacted start begins anew
        // from the next revision.
        next = match (seg.compacted, seg.events.last()) {
            (Some(_), _) => 0,
            (None, Some(e)) => e.0 + 1,
            (None, None) => seg.start,
        };
        shared.trace(&[u64::from(wid), seg.start, seg.events.len() as u64]);
        let mut log = shared.watch.lock().unwrap_or_else(|p| p.into_inner());
        log.events_seen += seg.events.len() as u64;
        log.progress_seen += seg.progress.len() as u64;
        log.segments.push(seg);
    }
}

/// W1: every segment saw exactly its share of the history.
pub(super) fn check(shared: &Shared) -> Vec<String> {
    // The etcd table's compaction revision at the end: an event at a
    // revision no later than it may come without `prev_kv` (etcd sends the
    // event at the compaction revision without it: the version before is
    // gone).
    let compacted = shared
        .nodes()
        .iter()
        .filter(|(k, _)| cluster_of(*k) == 0)
        .filter_map(|(_, n)| {
            let info =
                armada_core::command::Catalog::new(&**n.engine(), data_ns(GroupId::META)).get(ETCD_TABLE).ok()??;
            Mvcc::new(&**n.engine(), data_ns(info.id)).rev_state().ok().map(|s| s.compacted)
        })
        .max()
        .unwrap_or(0);
    let log = shared.watch.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = Vec::new();
    for seg in &log.segments {
        if let Some(c) = seg.compacted {
            // The first revision it was still owed must be compacted away
            // (the compaction revision itself is still served).
            let owed = seg.events.last().map_or(seg.start, |e| e.0 + 1);
            if owed >= c {
                failures.push(format!(
                    "W1 watcher {} on {}: cancelled as compacted at {c}, but it was owed revision {owed} on",
                    seg.watcher,
                    seg.place()
                ));
            }
        }
        // Replay the history to the segment's start, then compare event by
        // event.
        let mut state: BTreeMap<String, String> = BTreeMap::new();
        let mut want: Vec<Seen> = Vec::new();
        let last = seg.events.last().map_or(0, |e| e.0);
        let mut expected_rev = REVISION_FIRST;
        for (&rev, mutations) in log.history.range(..=last.max(seg.start)) {
            if rev != expected_rev {
                failures.push(format!("W1: the recorded history has no revision {expected_rev} (next is {rev})"));
                return failures;
            }
            expected_rev = rev + 1;
            // `prev_kv` is the key before the revision (etcd reads it at the
            // revision before), none for a creation.
            let before = state.clone();
            for m in mutations {
                let k = utf8(m.key.clone());
                let created = m.value.is_some() && m.version == 1;
                let prev = if created { None } else { before.get(&k).cloned() };
                match &m.value {
                    Some(v) => {
                        state.insert(k.clone(), utf8(v.clone()));
                    }
                    None => {
                        state.remove(&k);
                    }
                }
                let (lo, hi) = key_range(&seg.key);
                if rev < seg.start || rev > last || !armada_core::kv::in_interval(&m.key, &lo, &hi) {
                    continue;
                }
                let value = m.value.clone().map(utf8).unwrap_or_default();
                let seen_without = seg.events.get(want.len()).is_some_and(|e| e.0 == rev && e.1 == k && e.4.is_none());
                let prev = if seg.prev_kv && !(seen_without && rev <= compacted) { prev } else { None };
                want.push((rev, k, m.value.is_some(), value, prev));
            }
        }
        // W2: a progress notification at R claims every event up to R was
        // delivered: exactly the history's events in range from the start
        // through R, and R no further than the leader cluster has applied.
        let (lo, hi) = key_range(&seg.key);
        let top = log.history.keys().next_back().copied().unwrap_or(0);
        for &(n, r) in &seg.progress {
            let from = seg.start.max(REVISION_FIRST);
            let owed = if r < from {
                0
            } else {
                log.history
                    .range(from..=r)
                    .flat_map(|(_, ms)| ms.iter())
                    .filter(|m| armada_core::kv::in_interval(&m.key, &lo, &hi))
                    .count()
            };
            if (r > top || owed != n) && failures.len() < 5 {
                failures.push(format!(
                    "W2 watcher {} on {} ({}) from revision {}: a progress notification at revision {r} came after \
                     {n} events, but the history owes {owed} by then (the leader cluster applied up to {top})",
                    seg.watcher,
                    seg.place(),
                    seg.api,
                    seg.start
                ));
            }
        }
        if seg.events != want {
            let at = seg.events.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(seg.events.len().min(want.len()));
            failures.push(format!(
                "W1 watcher {} on {} ({}) from revision {} ({}): event {at} is {:?}, the history gives {:?} ({} \
                 events seen, {} in the history to revision {last})",
                seg.watcher,
                seg.place(),
                seg.api,
                seg.start,
                seg.key.as_deref().unwrap_or("every key"),
                seg.events.get(at),
                want.get(at),
                seg.events.len(),
                want.len()
            ));
        }
        if failures.len() >= 5 {
            break;
        }
    }
    failures
}

/// The first revision with mutations (revision 1 is the empty table).
const REVISION_FIRST: u64 = armada_core::kv::REVISION_INITIAL + 1;
