//! The follower side: a catalog worker that mirrors table creation and
//! deletion, and one worker per table that tails the leader cluster's
//! change stream into the local Raft group (or installs a snapshot).
//!
//! Invariant: the workers decide nothing about ordering; the state
//! machine applies a replicated batch only at `applied_revision + 1`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::KeyValue;
use armada_core::mvcc::replication::{AssembleError, RevisionAssembler, RevisionChanges, SnapshotRefusal};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::{GroupId, TableCommand};
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

    fn note_leader_revision(&self, table: &str, leader_revision: u64, applied: u64) {
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
        Err(crate::types::ApiError::Kv(armada_core::kv::KvError::Compacted { .. })) => Ok(()),
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
            f.lag.update(table, |s| s.snapshots += 1);
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
