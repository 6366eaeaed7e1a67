//! The follower side: a catalog worker that mirrors table creation and
//! deletion, and one worker per table that tails the leader cluster's
//! change stream into the local Raft group (or installs a snapshot).
//!
//! The table worker is a pump: what to request, when to switch to a
//! snapshot, back off or rotate endpoints is decided by the sans-IO
//! [`Subscription`] in `armada-core`; the worker carries out its effects
//! against the leader cluster and the local group.
//!
//! Invariant: the workers decide nothing about ordering; the state
//! machine applies a replicated batch only at `applied_revision + 1`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::{KeyValue, KvError};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::subscription::{self, Effect, Event, Local, SnapshotReason, Subscription};
use armada_core::{GroupId, Revision, TableCommand};
use armada_proto::replication as pb;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{part_in, ASSEMBLED_REVISION_BYTES_MAX, BACKOFF_MAX, BACKOFF_MIN, HEARTBEAT, WORKER_POLL};
use crate::node::Node;
use crate::replication::upstream::UpstreamClient;
use crate::types::{ApiError, LagBoard, ReplicationState, STALLED_AFTER};

/// A follower cluster node's replication workers.
pub struct Follower {
    node: Arc<Node>,
    upstream: Arc<UpstreamClient>,
    /// The node's lag board: what this node's workers write for status.
    lag: Arc<LagBoard>,
    workers: Mutex<BTreeMap<GroupId, tokio::task::JoinHandle<()>>>,
}

impl Follower {
    /// Makes `node` a follower of the leader cluster at `upstream`, and
    /// starts the catalog worker and the table workers' supervisor.
    pub fn start(node: Arc<Node>, upstream: Arc<UpstreamClient>) -> Arc<Follower> {
        node.set_upstream(upstream.clone());
        let lag = node.lag_board().clone();
        let f = Arc::new(Follower { node, upstream, lag, workers: Mutex::new(BTreeMap::new()) });
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

    /// The worker of `table` runs here from now on (`true`), or stopped.
    fn note_active(&self, table: &str, active: bool) {
        self.lag.update(table, |s| match (active, s.active_since) {
            (true, None) => {
                s.active_since = Some(Instant::now());
                s.stall_logged = false;
            }
            (false, Some(_)) => {
                s.active_since = None;
                s.last_error = None;
            }
            _ => {}
        })
    }

    /// A worker's failure: logged at warn when it is new, and once more if
    /// the table stalls.
    fn note_error(&self, table: &str, error: &str) {
        self.lag.update(table, |s| {
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
        })
    }

    fn note_leader_revision(&self, table: &str, leader_revision: Revision, applied: Revision) {
        self.lag.update(table, |s| {
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
        })
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
            if !reconcile_catalog(&this.node, &msg, &mut known).await {
                // The stream carries the auth state only when it changes:
                // a new stream starts with it again.
                break;
            }
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

/// Mirrors the leader cluster's auth state when it is newer than this
/// cluster's (the state machine never lets it go back). `false` when a
/// state that was sent could not be mirrored.
async fn reconcile_auth(node: &Node, update: &pb::CatalogUpdate) -> bool {
    if update.auth_state.is_empty() {
        return true;
    }
    match node.auth_view() {
        Ok(v) if v.state.revision >= update.auth_revision => return true,
        Ok(_) => {}
        Err(e) => {
            debug!("reading the local auth state (not mirrored this round): {e}");
            return false;
        }
    }
    let state: armada_core::auth::AuthState = match armada_core::codec::decode(&update.auth_state, "auth state") {
        Ok(s) => s,
        Err(e) => {
            warn!("the leader cluster's auth state cannot be decoded (not mirrored): {e}");
            return false;
        }
    };
    let revision = state.revision;
    match node.auth_change_internal(None, armada_core::auth::AuthCommand::Mirror { state }).await {
        Ok(_) => {
            armada_core::probe!(AuthMirrored);
            info!(revision, "mirrored the leader cluster's authentication state");
            true
        }
        Err(e) => {
            debug!("mirroring the auth state: {e}");
            false
        }
    }
}

/// Brings the local catalog and auth state in line with `update`; `false`
/// when the auth state it carried could not be mirrored.
async fn reconcile_catalog(node: &Node, update: &pb::CatalogUpdate, known: &mut BTreeMap<String, u64>) -> bool {
    let auth_mirrored = reconcile_auth(node, update).await;
    let local: Vec<TableInfo> = match node.catalog_list() {
        Ok(t) => t,
        Err(e) => {
            debug!("reading the local catalog (nothing reconciled this round): {e}");
            return auth_mirrored;
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
    auth_mirrored
}

/// How a table worker's subscription is timed and bounded.
fn subscription_config() -> subscription::Config {
    subscription::Config {
        poll: WORKER_POLL,
        stream_silence: HEARTBEAT * 8,
        snapshot_silence: HEARTBEAT * 40,
        backoff_min: BACKOFF_MIN,
        backoff_max: BACKOFF_MAX,
        assembled_bytes_max: ASSEMBLED_REVISION_BYTES_MAX,
    }
}

type Client = super::upstream::UpClient;

/// The stream a table worker has open.
enum Open {
    None,
    Changes(tonic::Streaming<pb::ChangesResponse>),
    Snapshot(tonic::Streaming<pb::SnapshotResponse>),
}

/// What a table worker waited for.
enum Input {
    Changes(pb::ChangesResponse),
    Chunk(pb::SnapshotResponse),
    Closed(Option<String>),
    Tick,
}

/// Runs the subscription of `table` (the protocol decisions are in
/// [`Subscription`]): carries out its effects against the leader cluster and
/// the local group, reports its events, and feeds it stream messages and
/// time, until the table is deleted here or the follower stops.
async fn table_worker(f: std::sync::Weak<Follower>, group: GroupId, table: String) {
    let epoch = Instant::now();
    let mut sub = Subscription::new(subscription_config(), Duration::ZERO);
    let mut client: Option<Client> = None;
    let mut open = Open::None;
    loop {
        {
            let Some(this) = f.upgrade() else { return };
            loop {
                // Events first: status learns the leader's revision before
                // the batch that message carried is proposed.
                while let Some(event) = sub.poll_event() {
                    this.report(&table, event);
                }
                let Some(effect) = sub.poll_effect() else { break };
                this.perform(&mut sub, effect, epoch, group, &table, &mut client, &mut open).await;
            }
            let gone = this.node.group(group).is_none();
            if gone {
                sub.handle_stopped();
            }
            while let Some(event) = sub.poll_event() {
                this.report(&table, event);
            }
            if gone {
                return;
            }
        }
        let wait = sub.poll_timeout().map_or(WORKER_POLL, |t| t.saturating_sub(epoch.elapsed()));
        let input = next_input(&mut open, sub.wants_message(), wait).await;
        let Some(this) = f.upgrade() else { return };
        let now = epoch.elapsed();
        let local = match this.local(group) {
            Ok(l) => l,
            Err(e) => {
                sub.handle_failed(now, e);
                continue;
            }
        };
        match input {
            Input::Tick => sub.handle_tick(now, &local),
            Input::Closed(error) => sub.handle_closed(now, error),
            Input::Changes(m) => sub.handle_changes(now, &local, changes_in(m)),
            Input::Chunk(c) => sub.handle_chunk(now, chunk_in(c)),
        }
    }
}

/// The next message of the open stream if the subscription waits for one,
/// or a tick after `wait`.
async fn next_input(open: &mut Open, wants_message: bool, wait: Duration) -> Input {
    let closed = |r: Result<Option<()>, tonic::Status>| match r {
        Ok(_) => Input::Closed(None),
        Err(s) => Input::Closed(Some(s.message().to_string())),
    };
    match open {
        Open::Changes(s) if wants_message => match crate::rt::timeout(wait, s.message()).await {
            Err(_) => Input::Tick,
            Ok(Ok(Some(m))) => Input::Changes(m),
            Ok(r) => closed(r.map(|_| None)),
        },
        Open::Snapshot(s) if wants_message => match crate::rt::timeout(wait, s.message()).await {
            Err(_) => Input::Tick,
            Ok(Ok(Some(c))) => Input::Chunk(c),
            Ok(r) => closed(r.map(|_| None)),
        },
        _ => {
            tokio::time::sleep(wait).await;
            Input::Tick
        }
    }
}

fn changes_in(m: pb::ChangesResponse) -> subscription::Changes {
    subscription::Changes {
        leader_revision: Revision(m.leader_revision),
        revisions: m.revisions.into_iter().map(part_in).collect(),
        // 0: absent (proto3 has no optional scalars here).
        snapshot_needed: (m.snapshot_needed != 0).then_some(Revision(m.snapshot_needed)),
        table_id: (m.table_id != 0).then_some(GroupId(m.table_id)),
        compacted_revision: Revision(m.compacted_revision),
    }
}

fn chunk_in(c: pb::SnapshotResponse) -> subscription::SnapshotChunk {
    subscription::SnapshotChunk {
        revision: Revision(c.revision),
        count: c.count,
        digest: c.digest,
        last: c.last,
        kvs: c
            .kvs
            .into_iter()
            .map(|k| KeyValue {
                key: k.key,
                create_revision: k.create_revision,
                mod_revision: k.mod_revision,
                version: k.version,
                value: k.value,
                lease: k.lease,
            })
            .collect(),
    }
}

impl Follower {
    /// What the subscription of `group` needs to know of the local table.
    fn local(&self, group: GroupId) -> Result<Local, String> {
        let g = self.node.group(group).ok_or("table gone")?;
        let mvcc = Mvcc::new(&**self.node.engine(), data_ns(group));
        let state = mvcc.rev_state().map_err(|e| e.to_string())?;
        Ok(Local {
            leading: self.node.is_leader(&g),
            applied: Revision(state.current),
            compacted: Revision(state.compacted),
            upstream_table: mvcc.upstream_table().map_err(|e| e.to_string())?.map(GroupId),
        })
    }

    /// Carries out one effect of the subscription and feeds it the answer.
    #[allow(clippy::too_many_arguments)]
    async fn perform(
        &self,
        sub: &mut Subscription,
        effect: Effect,
        epoch: Instant,
        group: GroupId,
        table: &str,
        client: &mut Option<Client>,
        open: &mut Open,
    ) {
        let write = |cmd| self.node.write_internal(table, cmd);
        let done = |r: Result<(TableReply, crate::types::HeaderInfo), ApiError>| r.map(drop).map_err(|e| e.to_string());
        match effect {
            Effect::Close => *open = Open::None,
            Effect::Subscribe { from_revision, rotate } => {
                let request = pb::ChangesRequest {
                    table: table.to_string(),
                    from_revision: from_revision.get(),
                    accepts_parts: true,
                };
                let result = match self.upstream.client(rotate).await {
                    Ok(mut c) => match c.changes(request).await {
                        Ok(s) => {
                            *open = Open::Changes(s.into_inner());
                            *client = Some(c);
                            Ok(())
                        }
                        Err(s) => Err(s.message().to_string()),
                    },
                    Err(e) => Err(e),
                };
                sub.handle_opened(epoch.elapsed(), result);
            }
            Effect::RequestSnapshot => {
                *open = Open::None;
                let request = pb::SnapshotRequest { table: table.to_string() };
                let result = match client.as_mut() {
                    Some(c) => match c.snapshot(request).await {
                        Ok(s) => {
                            *open = Open::Snapshot(s.into_inner());
                            Ok(())
                        }
                        Err(s) => Err(s.message().to_string()),
                    },
                    None => Err("no connection to the leader cluster".to_string()),
                };
                sub.handle_opened(epoch.elapsed(), result);
            }
            Effect::RecordUpstream { table_id } => {
                let result = done(write(TableCommand::SetUpstream { table_id: table_id.0 }).await);
                self.answer(sub, epoch, group, result);
            }
            Effect::DeleteRecreated { .. } => {
                let result = self.node.delete_table_internal(table).await.map(drop).map_err(|e| e.to_string());
                if result.is_ok() {
                    armada_core::probe!(FollowerTableRecreated);
                }
                self.answer(sub, epoch, group, result);
            }
            Effect::Compact { revision } => {
                let result = match write(TableCommand::Compact(revision.get())).await {
                    // Compacted meanwhile (by a previous worker of this table).
                    Err(ApiError::Kv(KvError::Compacted { .. })) => Ok(()),
                    r => done(r),
                };
                self.answer(sub, epoch, group, result);
            }
            Effect::ProposeChunk { revision, first, kvs } => {
                let result = done(write(TableCommand::SnapshotChunk { revision: revision.get(), first, kvs }).await);
                self.answer(sub, epoch, group, result);
            }
            Effect::Propose { batch, leader_revision } => {
                let result =
                    match write(TableCommand::Replicate { batch, leader_revision: leader_revision.get() }).await {
                        Ok((TableReply::Replicated(o), _)) => Ok(o),
                        Ok((other, _)) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                match self.local(group) {
                    Ok(local) => sub.handle_proposed(epoch.elapsed(), &local, result),
                    Err(e) => sub.handle_failed(epoch.elapsed(), e),
                }
            }
            Effect::CommitSnapshot { revision, count, digest } => {
                let result = match write(TableCommand::SnapshotCommit { revision: revision.get(), count, digest }).await
                {
                    Ok((TableReply::SnapshotCommitted(r), _)) => Ok(r),
                    Ok((other, _)) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(e.to_string()),
                };
                sub.handle_committed(epoch.elapsed(), result);
            }
        }
    }

    /// Feeds `result` to the subscription with what the table holds now.
    fn answer(&self, sub: &mut Subscription, epoch: Instant, group: GroupId, result: Result<(), String>) {
        match self.local(group) {
            Ok(local) => sub.handle_done(epoch.elapsed(), &local, result),
            Err(e) => sub.handle_failed(epoch.elapsed(), e),
        }
    }

    /// Status and logs of what the subscription of `table` reported.
    fn report(&self, table: &str, event: Event) {
        match event {
            Event::Active(active) => self.note_active(table, active),
            Event::Contact { leader_revision, applied } => self.note_leader_revision(table, leader_revision, applied),
            Event::Failed(e) => self.note_error(table, &e.to_string()),
            Event::SnapshotStarted(SnapshotReason::HistoryGone { first_retained }) => {
                info!(
                    table,
                    first_retained = first_retained.get(),
                    "behind the leader's history: installing a snapshot"
                )
            }
            Event::SnapshotStarted(SnapshotReason::TooLarge(e)) => warn!(table, "{e}: installing a snapshot instead"),
            Event::SnapshotInstalled { revision, keys } => {
                info!(table, revision = revision.get(), keys, "snapshot installed");
                self.lag.update(table, |s| s.snapshots += 1);
            }
            Event::SnapshotNotNeeded { current } => {
                debug!(table, current = current.get(), "snapshot not needed any more")
            }
            Event::Recreated { was, now } => {
                warn!(table, was = was.0, now = now.0, "the leader cluster re-created this table: deleting this copy")
            }
        }
    }
}
