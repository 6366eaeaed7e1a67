//! Group lifecycle: opening a Raft group over this node's storage, keeping
//! the set of table groups in step with the catalog, reading the catalog.
//!
//! Invariant: one Raft instance per group and node (`Node::sync_groups` runs
//! one at a time), and a group's data is never read while a snapshot
//! replaces it (the group's install gate).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use armada_core::command::{Catalog, TableInfo};
use armada_core::mvcc::Mvcc;
use armada_core::raft::{data_ns, delete_group, ApplyObserver, GroupKind, LogStore, StateMachine};
use armada_core::snapshot::InstallGate;
use armada_core::{Engine, GroupId};
use openraft::{Config, SnapshotPolicy};
use tracing::{debug, info, warn};

use crate::node::raft_client::NetworkFactory;
use crate::node::{Group, Node};
use crate::types::ApiError;

/// How often the node reconciles its groups with the catalog.
pub const CATALOG_SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// Finishes a follower snapshot swap of table group `id` that a restart
/// interrupted (see `Mvcc::recover_swap`).
fn recover_swap(engine: &dyn Engine, id: GroupId, batch_bytes: usize) -> Result<bool, armada_core::EngineError> {
    Mvcc::new(engine, armada_core::raft::data_ns(id)).recover_swap(batch_bytes, &mut |b| engine.write(b))
}

impl Node {
    pub(super) fn raft_config(&self) -> Result<Arc<Config>, ApiError> {
        let t = &self.cfg.raft;
        let c = Config {
            cluster_name: "armada".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            // Snapshots are built by `crate::node::snapshots`, which holds a build
            // while this node sends the current snapshot.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: t.logs_kept_after_snapshot,
            purge_batch_size: t.purge_batch_entries.max(1),
            install_snapshot_timeout: t.snapshot_chunk_timeout.as_millis().try_into().unwrap_or(u64::MAX),
            // A restarted leader must win a new election. Restoring
            // leadership in the old term (openraft's default) lets a leader
            // that lost its unsynced log tail in a crash write different
            // entries at indices its followers already hold for that term,
            // breaking log matching. Found by the simulator: crashes-3 seed 2.
            enable_leader_restore: Some(false),
            // Pre-vote: a node whose election timer fires first asks whether
            // a quorum would vote for it, and only then raises its term. A
            // node cut off from the others (partition, pause) otherwise raises
            // its term on every timeout, and on its return the leader sees the
            // higher term in a reply and steps down: a real 3-node cluster
            // stopped serving for 1.9 s that way after a heal. Checked by
            // scenarios/isolate-heal-3.toml (R5) and its canary no-pre-vote.
            enable_pre_vote: Some(!armada_core::canary::active(armada_core::canary::Canary::NoPreVote)),
            ..Default::default()
        };
        c.validate().map(Arc::new).map_err(|e| ApiError::Internal(format!("raft config: {e}")))
    }

    /// Opens group `id`; when its log is empty and `founding` is given,
    /// initialises it with those voters (every founding member does so with
    /// the same voters, so the first log entry is identical everywhere and
    /// the group needs no designated bootstrap node). Without `founding`, an
    /// empty group waits for its leader to add this node.
    pub(super) async fn open_group(
        &self,
        id: GroupId,
        name: String,
        kind: GroupKind,
        founding: Option<BTreeMap<u64, armada_core::raft::ArmadaNode>>,
    ) -> Result<Arc<Group>, ApiError> {
        // Before anything reads the group: finish a snapshot install that a
        // crash interrupted, or drop snapshots received but never installed.
        match armada_core::snapshot::recover(self.engine.clone(), id, self.cfg.raft.snapshot_chunk_bytes) {
            Ok(true) => {
                info!(group = %id, "finished a snapshot install interrupted by a restart");
                self.notifier.resumed_install(id);
            }
            Ok(false) => {}
            Err(e) => return Err(ApiError::Internal(format!("group {id}: recovering a snapshot install: {e}"))),
        }
        // Likewise a follower cluster's snapshot swap (a table of a follower
        // cluster replaced by the leader cluster's snapshot).
        if kind == GroupKind::Table {
            match recover_swap(&*self.engine, id, self.cfg.raft.snapshot_chunk_bytes) {
                Ok(true) => info!(group = %id, "finished a follower snapshot swap interrupted by a restart"),
                Ok(false) => {}
                Err(e) => return Err(ApiError::Internal(format!("group {id}: recovering a snapshot swap: {e}"))),
            }
        }
        if kind == GroupKind::Table {
            self.load_lessor(id)?;
        }
        let gate = Arc::new(InstallGate::default());
        let log = LogStore::new(self.engine.clone(), id, self.flusher.clone()).with_stats(self.raft_stats.clone());
        let sm = StateMachine::new(self.engine.clone(), id, kind, self.flusher.clone())
            .with_stats(self.raft_stats.clone())
            .with_retention(self.cfg.raft.history_retention)
            .with_compaction_step(self.cfg.raft.compaction_step_records)
            .with_gate(gate.clone())
            .with_chunk_bytes(self.cfg.raft.snapshot_chunk_bytes)
            .with_observer(Some(self.notifier.clone() as Arc<dyn ApplyObserver>));
        let transfers = Arc::new(crate::node::snapshots::Transfers::default());
        let network = NetworkFactory {
            transport: self.transport.clone(),
            group: id,
            sender: self.cfg.id,
            transfers: transfers.clone(),
            chunk_bytes: self.cfg.raft.snapshot_chunk_bytes,
            install_bytes_per_sec: self.cfg.raft.snapshot_install_bytes_per_sec,
        };
        let raft = openraft::Raft::new(self.cfg.id, self.raft_config()?, network, log, sm)
            .await
            .map_err(|e| ApiError::Internal(format!("starting group {id}: {e}")))?;
        let initialized = raft.is_initialized().await.map_err(|e| ApiError::Internal(e.to_string()))?;
        if !initialized {
            match founding {
                Some(voters) => {
                    if let Err(e) = raft.initialize(voters).await {
                        debug!(group = %id, "initialize: {e}");
                    }
                }
                None => {
                    if kind == GroupKind::Table {
                        armada_core::probe!(MembershipJoinedGroup);
                    }
                    info!(group = %id, "waiting for the group's leader to add this node");
                }
            }
        }
        let group = Arc::new(Group {
            id,
            name,
            raft,
            gate,
            receiving: Default::default(),
            transfers,
            recent: Default::default(),
        });
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(id, group.clone());
        Ok(group)
    }

    /// The voters this node initialises table group `id` with, if it is
    /// one of its founders (see `armada_core::members::GroupMembers`).
    /// Tables created before the cluster recorded its members were founded
    /// by the initial members, while they were the only ones.
    fn table_founders(&self, id: GroupId) -> Result<Option<BTreeMap<u64, armada_core::raft::ArmadaNode>>, ApiError> {
        let (founding, record) = self.read_catalog(|c| Ok((c.group_members(id)?, c.members()?)))?;
        Ok(match founding {
            Some(f) => f.may_initialize(self.cfg.id, record.as_ref()).then_some(f.voters),
            None => {
                let founder = record.as_ref().is_none_or(|r| r.members.get(&self.cfg.id).is_some_and(|m| m.since == 0));
                (self.cfg.bootstrap && founder && self.cfg.members.contains_key(&self.cfg.id))
                    .then(|| self.cfg.members.clone())
            }
        })
    }

    /// The group with this id, if hosted here.
    pub fn group(&self, id: GroupId) -> Option<Arc<Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub(super) fn catalog(&self) -> Catalog<'_> {
        Catalog::new(&*self.engine, data_ns(GroupId::META))
    }

    /// Reads the catalog through the metadata group's install gate: while a
    /// snapshot replaces the catalog, a read could miss tables (and a
    /// missing table is deleted by `sync_groups`, or by a follower cluster
    /// reconciling with this node's catalog).
    pub(super) fn read_catalog<T>(
        &self,
        f: impl FnOnce(&Catalog<'_>) -> Result<T, armada_core::EngineError>,
    ) -> Result<T, ApiError> {
        let catalog = self.catalog();
        let run = || f(&catalog).map_err(|e| ApiError::Internal(e.to_string()));
        match self.group(GroupId::META) {
            Some(meta) => meta.read(run)?,
            None => run(),
        }
    }

    /// Every table in this node's applied catalog (`Unavailable` while a
    /// snapshot replaces it).
    pub fn catalog_list(&self) -> Result<Vec<TableInfo>, ApiError> {
        self.read_catalog(|c| c.list())
    }

    /// Starts groups for new tables and stops and deletes the groups of
    /// deleted tables, according to this node's applied catalog.
    pub async fn sync_groups(&self) {
        let _one_at_a_time = self.syncing.lock().await;
        let tables = match self.catalog_list() {
            Ok(t) => t,
            Err(e) => {
                debug!("reading catalog (groups unchanged this round): {e}");
                return;
            }
        };
        let wanted: BTreeMap<GroupId, String> = tables.into_iter().map(|t| (t.id, t.name)).collect();
        let hosted: Vec<GroupId> = self.groups.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        for (id, name) in &wanted {
            if !hosted.contains(id) {
                let founding = match self.table_founders(*id) {
                    Ok(f) => f,
                    Err(e) => {
                        debug!(group = %id, "reading the table's founding members (retried): {e}");
                        continue;
                    }
                };
                info!(group = %id, table = %name, founding = founding.is_some(), "starting table group");
                if let Err(e) = self.open_group(*id, name.clone(), GroupKind::Table, founding).await {
                    warn!(group = %id, "{e}");
                }
            }
        }
        for id in hosted {
            if id != GroupId::META && !wanted.contains_key(&id) {
                let g = self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(g) = g {
                    info!(group = %id, table = %g.name, "stopping deleted table group");
                    let _ = g.raft.shutdown().await;
                    self.notifier.lessors.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    if let Err(e) = delete_group(&*self.engine, id) {
                        warn!(group = %id, "deleting group data: {e}");
                    }
                }
            }
        }
    }
}
