//! Cross-cluster replication (hub and spoke).
//!
//! Leader side: [`ReplicationService`] serves the `armada.replication.v1`
//! API from any node of the leader cluster: the catalog, each table's change
//! stream (pushed as revisions apply on the serving node, batched, with
//! heartbeats), snapshots, and writes sent on by followers.
//!
//! Follower side: [`Follower::start`] makes a node part of a follower
//! cluster. Writes go upstream ([`UpstreamClient`]); a catalog worker (on the
//! follower's metadata leader) mirrors table creation and deletion; a table
//! worker per table (on the follower's leader of that table) tails the change
//! stream and proposes what arrives as `Replicate` commands into the local
//! group, or installs a snapshot when the leader no longer has the history.
//! Applying is idempotent and ordered by the state machine itself (a batch
//! applies only at `applied_revision + 1`), so a deposed worker or a
//! duplicated message can never apply twice.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::KeyValue;
use armada_core::mvcc::replication::{
    digest_kv, AssembleError, ChangesFrom, Mutation, RevisionAssembler, RevisionChanges, RevisionPart, SnapshotRefusal,
};
use armada_core::mvcc::{Fnv64, Mvcc};
use armada_core::raft::data_ns;
use armada_core::{GroupId, TableCommand};
use armada_proto::replication as pb;
use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::node::{ApiError, Node, Upstream};
use crate::rt::DetReceiver;
use openraft::async_runtime::watch::WatchReceiver;

/// Most revisions in one change-stream message.
pub const BATCH_REVISIONS_MAX: usize = 256;
/// About the most bytes of mutations in one change-stream message.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// Heartbeat interval of an idle change stream or catalog stream.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Keys per snapshot chunk (and about the most bytes, below).
pub const SNAPSHOT_CHUNK_KEYS: usize = 1000;
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Reconnect backoff of follower workers.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often follower workers check whether they should run.
pub const WORKER_POLL: Duration = Duration::from_millis(100);
/// Largest replication message either end accepts (decoding) or sends
/// (encoding). gRPC's default of 4 MiB is below what one revision can
/// carry: a DeleteRange over 6,000 keys of 1 KiB is about 6 MiB, and with
/// the default the follower refused that message on every retry and
/// replication of the table stopped for good.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// To a follower that cannot put parts back together (an older version), a
/// revision larger than this is not sent on the change stream: it is told
/// to install a snapshot instead (snapshots stream in bounded pages). Half
/// of [`MESSAGE_BYTES_MAX`] leaves room for protobuf's framing overhead.
pub const STREAM_REVISION_BYTES_MAX: usize = MESSAGE_BYTES_MAX / 2;
/// The most a follower holds of one revision sent in parts. A revision is
/// one Raft entry of the leader cluster, so this is far above any revision
/// a leader cluster accepts; past it the follower installs a snapshot.
pub const ASSEMBLED_REVISION_BYTES_MAX: usize = 1 << 30;
/// A worker that has heard nothing from the leader cluster for this long
/// reports its table as stalled (status, metrics, readiness, a warning).
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn api_status(e: &ApiError) -> Status {
    crate::convert::status(e)
}

fn changes_out(c: RevisionChanges) -> pb::Revision {
    part_out(RevisionPart { revision: c.revision, mutations: c.mutations, continued: false })
}

fn part_out(c: RevisionPart) -> pb::Revision {
    pb::Revision {
        revision: c.revision,
        continued: c.continued,
        mutations: c
            .mutations
            .into_iter()
            .map(|m| pb::Mutation {
                deleted: m.value.is_none(),
                value: m.value.unwrap_or_default(),
                key: m.key,
                create_revision: m.create_revision,
                version: m.version,
            })
            .collect(),
    }
}

fn part_in(r: pb::Revision) -> RevisionPart {
    RevisionPart {
        revision: r.revision,
        continued: r.continued,
        mutations: r
            .mutations
            .into_iter()
            .map(|m| Mutation {
                key: m.key,
                value: if m.deleted { None } else { Some(m.value) },
                create_revision: m.create_revision,
                version: m.version,
            })
            .collect(),
    }
}

/// The leader cluster's replication API.
#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn catalog(node: &Node) -> Result<pb::CatalogUpdate, Status> {
        let tables = node.catalog_list().map_err(|e| api_status(&e))?;
        Ok(pb::CatalogUpdate {
            tables: tables.into_iter().map(|t| pb::TableRef { name: t.name, id: t.id.0 }).collect(),
        })
    }
}

/// Waits until `rx` changes or `within` passes.
async fn changed_or_timeout(rx: &mut DetReceiver<u64>, within: Duration) {
    let _ = crate::rt::timeout(within, rx.changed()).await;
}

struct ChangesState {
    node: Arc<Node>,
    group: GroupId,
    next: u64,
    rx: DetReceiver<u64>,
    done: bool,
    /// The follower puts revisions sent in parts back together.
    accepts_parts: bool,
    /// Parts of a large revision still to send, in order.
    parts: std::collections::VecDeque<RevisionPart>,
}

/// A change-stream message, with the serving node's `(revision, compaction
/// revision)` of the table.
fn changes_response(
    group: GroupId,
    (leader_revision, compacted_revision): (u64, u64),
    revisions: Vec<pb::Revision>,
    snapshot_needed: u64,
) -> pb::ChangesResponse {
    pb::ChangesResponse { leader_revision, revisions, snapshot_needed, table_id: group.0, compacted_revision }
}

impl ChangesState {
    /// The serving node's latest applied revision of the table and its
    /// compaction revision, as every message carries them.
    fn state_now(&self) -> (u64, u64) {
        let compacted = Mvcc::new(&**self.node.engine(), data_ns(self.group)).rev_state().map_or(0, |s| s.compacted);
        (self.node.table_revision(self.group), compacted)
    }

    async fn next_message(&mut self) -> Option<Result<pb::ChangesResponse, Status>> {
        if self.done {
            return None;
        }
        if let Some(part) = self.parts.pop_front() {
            return Some(Ok(changes_response(self.group, self.state_now(), vec![part_out(part)], 0)));
        }
        loop {
            if self.node.group(self.group).is_none() {
                self.done = true;
                return Some(Err(Status::not_found("the table was deleted")));
            }
            drop(self.rx.borrow_and_update());
            let store = Mvcc::new(&**self.node.engine(), data_ns(self.group))
                .with_retention(self.node.config().raft.history_retention);
            let state = self.state_now();
            let group = self.group;
            let msg = |revisions, snapshot_needed| changes_response(group, state, revisions, snapshot_needed);
            match store.changes_from(self.next, BATCH_REVISIONS_MAX, BATCH_BYTES_MAX) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(Status::internal(e.to_string())));
                }
                Ok(ChangesFrom::NeedSnapshot { first_retained }) => {
                    self.done = true;
                    return Some(Ok(msg(Vec::new(), first_retained)));
                }
                Ok(ChangesFrom::Changes(mut c)) if !c.is_empty() => {
                    // `changes_from` stops a batch after the revision that
                    // crossed its byte budget (`BATCH_BYTES_MAX`), so only the
                    // last revision can be large: a huge one goes alone in
                    // the next message(s), and alone it is checked below.
                    let part_bytes = self.node.config().raft.revision_part_bytes.max(1);
                    let limit = if self.accepts_parts { part_bytes } else { STREAM_REVISION_BYTES_MAX };
                    let too_large = |r: &RevisionChanges| r.size_bytes() > limit;
                    if c.len() > 1 && c.last().is_some_and(too_large) {
                        c.pop();
                    }
                    if self.accepts_parts && c.len() == 1 && c[0].size_bytes() > part_bytes {
                        let only = c.pop().expect("one revision");
                        self.next = only.revision + 1;
                        self.parts = only.into_parts(part_bytes).into();
                        let first = self.parts.pop_front().expect("a revision has at least one part");
                        return Some(Ok(msg(vec![part_out(first)], 0)));
                    }
                    if let [only] = c.as_slice() {
                        let bytes = only.size_bytes();
                        if bytes > STREAM_REVISION_BYTES_MAX {
                            let rev = only.revision;
                            warn!(
                                table_id = self.group.0,
                                revision = rev,
                                bytes,
                                "revision too large for the change stream: the follower installs a snapshot"
                            );
                            self.done = true;
                            return Some(Ok(msg(Vec::new(), rev + 1)));
                        }
                    }
                    self.next = c.last().map_or(self.next, |l| l.revision + 1);
                    return Some(Ok(msg(c.into_iter().map(changes_out).collect(), 0)));
                }
                Ok(ChangesFrom::Changes(_)) => {
                    let before = *self.rx.borrow_watched();
                    changed_or_timeout(&mut self.rx, HEARTBEAT).await;
                    if *self.rx.borrow_watched() == before {
                        return Some(Ok(msg(Vec::new(), 0)));
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type CatalogStream = BoxStream<pb::CatalogUpdate>;
    type ChangesStream = BoxStream<pb::ChangesResponse>;
    type SnapshotStream = BoxStream<pb::SnapshotResponse>;

    async fn catalog(&self, _request: Request<pb::CatalogRequest>) -> Result<Response<Self::CatalogStream>, Status> {
        let node = self.node.clone();
        let rx = node.revision_watch(GroupId::META);
        let stream = futures::stream::unfold((node, rx, true), |(node, mut rx, first)| async move {
            if !first {
                changed_or_timeout(&mut rx, HEARTBEAT).await;
            }
            drop(rx.borrow_and_update());
            let update = ReplicationService::catalog(&node);
            Some((update, (node, rx, false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn changes(&self, request: Request<pb::ChangesRequest>) -> Result<Response<Self::ChangesStream>, Status> {
        let r = request.into_inner();
        let group = self.node.table_group(&r.table, 0).await.map_err(|e| api_status(&e))?;
        let state = ChangesState {
            node: self.node.clone(),
            group: group.id,
            next: r.from_revision.max(1),
            rx: self.node.revision_watch(group.id),
            done: false,
            accepts_parts: r.accepts_parts,
            parts: Default::default(),
        };
        let stream = futures::stream::unfold(state, |mut st| async move { st.next_message().await.map(|m| (m, st)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let r = request.into_inner();
        let group = self.node.table_group(&r.table, 0).await.map_err(|e| api_status(&e))?;
        let revision = Mvcc::new(&**self.node.engine(), data_ns(group.id))
            .rev_state()
            .map_err(|e| Status::internal(e.to_string()))?
            .current;
        info!(table = %r.table, revision, "serving a snapshot");
        // Pages are read at `revision` as the stream is pulled, so memory
        // stays at one chunk however large the table is; the count and the
        // digest go out with the last chunk.
        let state = SnapshotState {
            node: self.node.clone(),
            group: group.id,
            revision,
            after: None,
            digest: Fnv64::new(),
            count: 0,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move { st.next_chunk().map(|c| (c, st)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(&self, request: Request<pb::WriteRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = request.into_inner();
        let cmd: TableCommand = match postcard::from_bytes(&r.command) {
            Ok(c) => c,
            Err(e) => return Err(Status::invalid_argument(format!("malformed command: {e}"))),
        };
        if !cmd.is_client_write() {
            return Err(Status::invalid_argument("only client writes can be sent on"));
        }
        let resp = match self.node.write(&r.table, cmd).await {
            Ok((reply, _)) => pb::WriteResponse { reply: encode(&reply), error: Vec::new() },
            Err(e) => pb::WriteResponse { reply: Vec::new(), error: encode(&e) },
        };
        Ok(Response::new(resp))
    }
}

/// A snapshot being streamed: the next page starts after `after`.
struct SnapshotState {
    node: Arc<Node>,
    group: GroupId,
    revision: u64,
    after: Option<Vec<u8>>,
    digest: Fnv64,
    count: u64,
    done: bool,
}

impl SnapshotState {
    fn next_chunk(&mut self) -> Option<Result<pb::SnapshotResponse, Status>> {
        if self.done {
            return None;
        }
        if self.node.group(self.group).is_none() {
            self.done = true;
            return Some(Err(Status::not_found("the table was deleted")));
        }
        let store = Mvcc::new(&**self.node.engine(), data_ns(self.group));
        let (kvs, more) = match store.snapshot_page(
            self.revision,
            self.after.as_deref(),
            SNAPSHOT_CHUNK_KEYS,
            SNAPSHOT_CHUNK_BYTES,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Compacted past the snapshot's revision while streaming:
                // the follower starts over.
                self.done = true;
                return Some(Err(Status::aborted(format!("snapshot at revision {}: {e}", self.revision))));
            }
        };
        for kv in &kvs {
            digest_kv(&mut self.digest, kv);
        }
        self.count += kvs.len() as u64;
        if let Some(last) = kvs.last() {
            self.after = Some(last.key.clone());
        }
        let last = !more;
        self.done = last;
        Some(Ok(pb::SnapshotResponse {
            revision: self.revision,
            count: if last { self.count } else { 0 },
            digest: if last { self.digest.finish() } else { 0 },
            kvs: kvs
                .into_iter()
                .map(|kv| pb::SnapshotKeyValue {
                    key: kv.key,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    value: kv.value,
                })
                .collect(),
            last,
        }))
    }
}

/// Postcard encoding of plain owned data (cannot fail; empty if it did).
fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// A router serving the replication API.
pub fn router(svc: ReplicationService) -> tonic::transport::server::Router {
    tonic::transport::Server::builder().add_service(
        pb::replication_server::ReplicationServer::new(svc)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX),
    )
}

/// The leader cluster as a follower reaches it: a list of replication
/// endpoints (`http://host:port`), tried in turn.
pub struct UpstreamClient {
    endpoints: Vec<String>,
    next: Mutex<usize>,
    timeout: Duration,
}

impl UpstreamClient {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        Self { endpoints, next: Mutex::new(0), timeout }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client for the current endpoint; `rotate` moves to the next first.
    async fn client(
        &self,
        rotate: bool,
    ) -> Result<pb::replication_client::ReplicationClient<tonic::transport::Channel>, String> {
        let ep = {
            let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
            if rotate {
                *n = (*n + 1) % self.endpoints.len().max(1);
            }
            self.endpoints.get(*n).cloned().ok_or("no leader cluster address configured")?
        };
        #[cfg(not(madsim))]
        let endpoint = crate::listen::endpoint(&ep)?;
        // The simulated network has no socket options.
        #[cfg(madsim)]
        let endpoint = tonic::transport::Endpoint::from_shared(ep.clone())
            .map_err(|e| format!("{ep}: {e}"))?
            .connect_timeout(Duration::from_secs(1));
        let endpoint = endpoint.timeout(self.timeout);
        let ch = endpoint.connect().await.map_err(|e| format!("{ep}: {e}"))?;
        Ok(pb::replication_client::ReplicationClient::new(ch)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}

#[tonic::async_trait]
impl Upstream for UpstreamClient {
    async fn write(&self, table: &str, cmd: TableCommand) -> Result<TableReply, ApiError> {
        let command = postcard::to_stdvec(&cmd).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut last = String::new();
        for attempt in 0..self.endpoints.len().max(1) {
            let mut c = match self.client(attempt > 0).await {
                Ok(c) => c,
                // Not connected: nothing was sent, another endpoint may do.
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let resp = c
                .write(pb::WriteRequest { table: table.to_string(), command: command.clone() })
                .await
                .map_err(|s| ApiError::Indeterminate(format!("write sent to the leader cluster: {}", s.message())))?
                .into_inner();
            if !resp.error.is_empty() {
                let e: ApiError = postcard::from_bytes(&resp.error)
                    .map_err(|e| ApiError::Internal(format!("malformed error from the leader cluster: {e}")))?;
                return Err(e);
            }
            return postcard::from_bytes(&resp.reply)
                .map_err(|e| ApiError::Internal(format!("malformed reply from the leader cluster: {e}")));
        }
        Err(ApiError::Unavailable(format!("cannot reach the leader cluster: {last}")))
    }
}

/// What a follower node knows about one table's replication.
#[derive(Debug, Clone, Default)]
pub struct LagStats {
    /// The leader cluster's latest revision, as last heard.
    pub leader_revision: u64,
    /// Since when this follower has been behind a revision it knew of.
    pub behind_since: Option<Instant>,
    /// Snapshots installed by this node's worker.
    pub snapshots: u64,
    /// When this node's worker last heard from the leader cluster (any
    /// change-stream message, heartbeats included).
    pub last_contact: Option<Instant>,
    /// Since when this node's worker has been trying to stream (it leads
    /// the table's group here); `None` while another node runs it.
    pub active_since: Option<Instant>,
    /// The worker's last failure, cleared by the next message.
    pub last_error: Option<String>,
    /// Whether a stall has been logged (once per stall).
    pub stall_logged: bool,
}

/// Replication health of one table on the node that runs its worker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReplicationState {
    /// Another node of this cluster runs the table's worker (or this is not
    /// a follower cluster).
    #[default]
    Elsewhere,
    /// The worker started and has not heard from the leader cluster yet.
    Connecting,
    /// Messages arrive.
    Streaming,
    /// Nothing heard for [`STALLED_AFTER`]; the reason if one is known.
    Stalled(String),
}

impl ReplicationState {
    pub fn name(&self) -> &'static str {
        match self {
            ReplicationState::Elsewhere => "",
            ReplicationState::Connecting => "connecting",
            ReplicationState::Streaming => "streaming",
            ReplicationState::Stalled(_) => "stalled",
        }
    }

    /// Why replication is stalled ("" unless it is).
    pub fn error(&self) -> &str {
        match self {
            ReplicationState::Stalled(why) => why,
            _ => "",
        }
    }
}

impl LagStats {
    /// How long the worker running here has heard nothing from the leader
    /// cluster (since it started here, if it never has); `None` while it
    /// runs elsewhere.
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        let active = self.active_since?;
        let since = self.last_contact.filter(|t| *t >= active).unwrap_or(active);
        Some(now.saturating_duration_since(since))
    }

    /// The worker's health at `now`.
    pub fn state(&self, now: Instant) -> ReplicationState {
        let Some(silent) = self.silent_for(now) else { return ReplicationState::Elsewhere };
        if silent >= STALLED_AFTER {
            let why = self.last_error.clone().unwrap_or_else(|| "no message from the leader cluster".into());
            return ReplicationState::Stalled(why);
        }
        let active = self.active_since.expect("silent_for is Some only while active");
        if self.last_contact.is_some_and(|t| t >= active) {
            ReplicationState::Streaming
        } else {
            ReplicationState::Connecting
        }
    }
}

/// A follower cluster node's replication workers.
pub struct Follower {
    node: Arc<Node>,
    upstream: Arc<UpstreamClient>,
    lag: Mutex<BTreeMap<String, LagStats>>,
    workers: Mutex<BTreeMap<GroupId, tokio::task::JoinHandle<()>>>,
}

impl Follower {
    /// Makes `node` a follower of the leader cluster at `upstream`, and
    /// starts the catalog worker and the table workers' supervisor.
    pub fn start(node: Arc<Node>, upstream: Arc<UpstreamClient>) -> Arc<Follower> {
        node.set_upstream(upstream.clone());
        let f = Arc::new(Follower {
            node,
            upstream,
            lag: Mutex::new(BTreeMap::new()),
            workers: Mutex::new(BTreeMap::new()),
        });
        f.node.set_follower(Arc::downgrade(&f));
        let weak = Arc::downgrade(&f);
        tokio::spawn(async move {
            loop {
                let Some(f) = weak.upgrade() else { return };
                f.clone().supervise();
                drop(f);
                tokio::time::sleep(WORKER_POLL).await;
            }
        });
        let weak = Arc::downgrade(&f);
        tokio::spawn(async move { catalog_worker(weak).await });
        f
    }

    /// Lag of every table known here, by table name.
    pub fn lag(&self) -> BTreeMap<String, LagStats> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The worker of `table` runs here from now on (`true`), or stopped.
    fn note_active(&self, table: &str, active: bool) {
        let mut m = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(table.to_string()).or_default();
        match (active, s.active_since) {
            (true, None) => {
                s.active_since = Some(Instant::now());
                s.stall_logged = false;
            }
            (false, Some(_)) => {
                s.active_since = None;
                s.last_error = None;
            }
            _ => {}
        }
    }

    /// A worker's failure: logged at warn when it is new, and once more if
    /// the table stalls.
    fn note_error(&self, table: &str, error: &str) {
        let mut m = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(table.to_string()).or_default();
        if s.last_error.as_deref() != Some(error) {
            warn!(table, "replication from the leader cluster failed (retrying): {error}");
            s.last_error = Some(error.to_string());
        }
        if let ReplicationState::Stalled(why) = s.state(Instant::now()) {
            if !s.stall_logged {
                s.stall_logged = true;
                warn!(table, "replication stalled: nothing from the leader cluster for {STALLED_AFTER:?}: {why}");
            }
        }
    }

    fn note_leader_revision(&self, table: &str, leader_revision: u64, applied: u64) {
        let mut m = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(table.to_string()).or_default();
        s.last_contact = Some(Instant::now());
        if s.last_error.take().is_some() || s.stall_logged {
            info!(table, "replication from the leader cluster resumed");
            s.stall_logged = false;
        }
        s.leader_revision = s.leader_revision.max(leader_revision);
        if applied >= s.leader_revision {
            s.behind_since = None;
        } else if s.behind_since.is_none() {
            s.behind_since = Some(Instant::now());
        }
    }

    /// Starts a worker for every table group hosted here; forgets workers
    /// of deleted tables.
    fn supervise(self: Arc<Self>) {
        let groups = self.node.groups();
        let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|id, h| !h.is_finished() && groups.iter().any(|g| g.id == *id));
        for g in groups {
            if g.id == GroupId::META || w.contains_key(&g.id) {
                continue;
            }
            let weak = Arc::downgrade(&self);
            let (id, name) = (g.id, g.name.clone());
            w.insert(id, tokio::spawn(async move { table_worker(weak, id, name).await }));
        }
    }
}

/// Mirrors the leader cluster's catalog while this node leads the
/// follower's metadata group.
async fn catalog_worker(f: std::sync::Weak<Follower>) {
    let mut backoff = BACKOFF_MIN;
    let mut rotate = false;
    // Leader table ids of the tables created here, to notice re-creation.
    let mut known: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep(WORKER_POLL).await;
        let Some(this) = f.upgrade() else { return };
        let Some(meta) = this.node.group(GroupId::META) else { continue };
        if !this.node.is_leader(&meta) {
            continue;
        }
        let mut client = match this.upstream.client(rotate).await {
            Ok(c) => c,
            Err(e) => {
                note_catalog_error(&mut last_error, e);
                rotate = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let mut stream = match client.catalog(pb::CatalogRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                note_catalog_error(&mut last_error, e.message().to_string());
                rotate = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        drop(this);
        loop {
            let msg = match crate::rt::timeout(HEARTBEAT * 8, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    note_catalog_error(&mut last_error, e.message().to_string());
                    break;
                }
                Err(_) => {
                    note_catalog_error(&mut last_error, "catalog stream silent".into());
                    break;
                }
            };
            if last_error.take().is_some() {
                info!("catalog replication from the leader cluster resumed");
            }
            backoff = BACKOFF_MIN;
            let Some(this) = f.upgrade() else { return };
            if !this.node.is_leader(&meta) {
                break;
            }
            reconcile_catalog(&this.node, &msg, &mut known).await;
        }
        rotate = true;
    }
}

/// Logs a catalog worker failure at warn the first time it is seen.
fn note_catalog_error(last: &mut Option<String>, error: String) {
    if last.as_deref() != Some(error.as_str()) {
        warn!("catalog replication from the leader cluster failed (retrying): {error}");
    } else {
        debug!("catalog: {error}");
    }
    *last = Some(error);
}

async fn reconcile_catalog(node: &Node, update: &pb::CatalogUpdate, known: &mut BTreeMap<String, u64>) {
    let local: Vec<TableInfo> = match node.catalog_list() {
        Ok(t) => t,
        Err(e) => {
            debug!("reading the local catalog (nothing reconciled this round): {e}");
            return;
        }
    };
    let upstream: BTreeMap<&str, u64> = update.tables.iter().map(|t| (t.name.as_str(), t.id)).collect();
    for t in &local {
        let recreated = matches!((known.get(&t.name), upstream.get(t.name.as_str())), (Some(a), Some(b)) if a != b)
            && !armada_core::canary::active(armada_core::canary::Canary::RecreatedTableKept);
        if !upstream.contains_key(t.name.as_str()) || recreated {
            info!(table = %t.name, "table deleted on the leader cluster; deleting it here");
            match node.delete_table_internal(&t.name).await {
                Ok(_) => {
                    armada_core::probe!(FollowerTableDeleted);
                    if recreated {
                        armada_core::probe!(FollowerTableRecreated);
                    }
                    known.remove(&t.name);
                }
                Err(e) => debug!(table = %t.name, "delete: {e}"),
            }
        }
    }
    for (name, id) in upstream {
        if !local.iter().any(|t| t.name == name) {
            info!(table = %name, "table created on the leader cluster; creating it here");
            match node.create_table_internal(name).await {
                Ok(_) => {
                    armada_core::probe!(FollowerTableCreated);
                    known.insert(name.to_string(), id);
                }
                Err(ApiError::Meta(armada_core::command::MetaError::TableExists(_))) => {}
                Err(e) => debug!(table = %name, "create: {e}"),
            }
        } else {
            known.entry(name.to_string()).or_insert(id);
        }
    }
}

/// Tails one table's change stream while this node leads the follower's
/// group of the table.
async fn table_worker(f: std::sync::Weak<Follower>, group: GroupId, table: String) {
    let mut backoff = BACKOFF_MIN;
    let mut rotate = false;
    loop {
        tokio::time::sleep(WORKER_POLL).await;
        let Some(this) = f.upgrade() else { return };
        let Some(g) = this.node.group(group) else {
            this.note_active(&table, false);
            return;
        };
        if !this.node.is_leader(&g) {
            this.note_active(&table, false);
            continue;
        }
        this.note_active(&table, true);
        match tail(&this, group, &table, rotate).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                rotate = false;
            }
            Err(e) => {
                this.note_error(&table, &e);
                rotate = true;
                drop(this);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One subscription: tails until the stream ends, leadership is lost, or
/// the leader asks for a snapshot (which is then installed).
async fn tail(f: &Follower, group: GroupId, table: &str, rotate: bool) -> Result<(), String> {
    let from = f.node.table_revision(group) + 1;
    let mut client = f.upstream.client(rotate).await?;
    let mut stream = client
        .changes(pb::ChangesRequest { table: table.to_string(), from_revision: from, accepts_parts: true })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    // A revision sent in parts is applied once whole; parts of a revision
    // left incomplete when the stream ends are dropped with it (the next
    // stream starts at the first revision not applied).
    let mut assembler = RevisionAssembler::default();
    loop {
        let msg = match crate::rt::timeout(HEARTBEAT * 8, stream.message()).await {
            Err(_) => return Err("change stream silent".into()),
            Ok(Err(s)) => return Err(s.message().to_string()),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(m))) => m,
        };
        let g = f.node.group(group).ok_or("table gone")?;
        if !f.node.is_leader(&g) {
            return Ok(());
        }
        if !same_incarnation(f, group, table, msg.table_id).await? {
            return Ok(());
        }
        f.note_leader_revision(table, msg.leader_revision, f.node.table_revision(group));
        if msg.snapshot_needed != 0 {
            info!(table, first_retained = msg.snapshot_needed, "behind the leader's history: installing a snapshot");
            install_snapshot(f, table, &mut client).await?;
            return Ok(());
        }
        let mut batch: Vec<RevisionChanges> = Vec::with_capacity(msg.revisions.len());
        for r in msg.revisions {
            match assembler.accept(part_in(r), ASSEMBLED_REVISION_BYTES_MAX) {
                Ok(Some(rev)) => batch.push(rev),
                Ok(None) => {}
                Err(e @ AssembleError::TooLarge { .. }) => {
                    warn!(table, "{e}: installing a snapshot instead");
                    install_snapshot(f, table, &mut client).await?;
                    return Ok(());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !batch.is_empty() {
            let cmd = TableCommand::Replicate { batch, leader_revision: msg.leader_revision };
            match f.node.write_internal(table, cmd).await {
                Ok((TableReply::Replicated(o), _)) => {
                    f.note_leader_revision(table, msg.leader_revision, o.revision);
                    if !o.applied {
                        // A gap or a duplicate: start over from what is applied.
                        return Ok(());
                    }
                }
                Ok((other, _)) => return Err(format!("unexpected reply {other:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        follow_compaction(f, group, table, msg.compacted_revision).await?;
    }
}

/// Whether this follower's table mirrors the leader-cluster table
/// `table_id` streams from. The first stream records the id (before
/// anything is applied). A different id means the leader cluster deleted
/// the table and created it again under the same name, which the catalog
/// worker may never see (its memory of ids does not survive a restart or a
/// move to another node): the old incarnation is deleted here, and the
/// catalog worker creates the table afresh, which then streams from the
/// start. (A follower kept the old incarnation at the same revision as the
/// new one, with other contents; found by followers-churn.)
async fn same_incarnation(f: &Follower, group: GroupId, table: &str, table_id: u64) -> Result<bool, String> {
    if table_id == 0 {
        return Ok(true);
    }
    let recorded = Mvcc::new(&**f.node.engine(), data_ns(group)).upstream_table().map_err(|e| e.to_string())?;
    match recorded {
        Some(id) if id == table_id => Ok(true),
        Some(_) if armada_core::canary::active(armada_core::canary::Canary::RecreatedTableKept) => Ok(true),
        Some(id) => {
            warn!(table, was = id, now = table_id, "the leader cluster re-created this table: deleting this copy");
            f.node.delete_table_internal(table).await.map_err(|e| e.to_string())?;
            armada_core::probe!(FollowerTableRecreated);
            Ok(false)
        }
        None => {
            f.node.write_internal(table, TableCommand::SetUpstream { table_id }).await.map_err(|e| e.to_string())?;
            Ok(true)
        }
    }
}

/// Compacts this follower's table to the leader cluster's compaction
/// revision once it has applied that revision (a later message retries
/// until then), through the table's Raft group like any write.
async fn follow_compaction(f: &Follower, group: GroupId, table: &str, leader_compacted: u64) -> Result<(), String> {
    if leader_compacted == 0 || armada_core::canary::active(armada_core::canary::Canary::CompactionNotReplicated) {
        return Ok(());
    }
    let state = Mvcc::new(&**f.node.engine(), data_ns(group)).rev_state().map_err(|e| e.to_string())?;
    if leader_compacted <= state.compacted || leader_compacted > state.current {
        return Ok(());
    }
    match f.node.write_internal(table, TableCommand::Compact(leader_compacted)).await {
        Ok(_) => Ok(()),
        // Compacted meanwhile (by a previous worker of this table).
        Err(crate::node::ApiError::Kv(armada_core::kv::KvError::Compacted { .. })) => Ok(()),
        Err(e) => Err(format!("compacting to the leader's revision {leader_compacted}: {e}")),
    }
}

async fn install_snapshot(
    f: &Follower,
    table: &str,
    client: &mut pb::replication_client::ReplicationClient<tonic::transport::Channel>,
) -> Result<(), String> {
    let mut stream = client
        .snapshot(pb::SnapshotRequest { table: table.to_string() })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut first = true;
    let (revision, count, digest) = loop {
        let chunk = match crate::rt::timeout(HEARTBEAT * 40, stream.message()).await {
            Err(_) => return Err("snapshot stream silent".into()),
            Ok(Err(s)) => return Err(s.message().to_string()),
            Ok(Ok(None)) => return Err("snapshot stream ended early".into()),
            Ok(Ok(Some(c))) => c,
        };
        let kvs: Vec<KeyValue> = chunk
            .kvs
            .into_iter()
            .map(|k| KeyValue {
                key: k.key,
                create_revision: k.create_revision,
                mod_revision: k.mod_revision,
                version: k.version,
                value: k.value,
            })
            .collect();
        let header = (chunk.revision, chunk.count, chunk.digest);
        let cmd = TableCommand::SnapshotChunk { revision: chunk.revision, first, kvs };
        f.node.write_internal(table, cmd).await.map_err(|e| e.to_string())?;
        first = false;
        if chunk.last {
            break header;
        }
    };
    match f.node.write_internal(table, TableCommand::SnapshotCommit { revision, count, digest }).await {
        Ok((TableReply::SnapshotCommitted(Ok(rev)), _)) => {
            info!(table, revision = rev, keys = count, "snapshot installed");
            let mut m = f.lag.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(table.to_string()).or_default().snapshots += 1;
            Ok(())
        }
        Ok((TableReply::SnapshotCommitted(Err(SnapshotRefusal::Behind { current })), _)) => {
            debug!(table, current, "snapshot not needed any more");
            Ok(())
        }
        Ok((TableReply::SnapshotCommitted(Err(r)), _)) => Err(format!("snapshot refused: {r:?}")),
        Ok((other, _)) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
