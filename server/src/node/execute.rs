//! Executing client requests on this node: table writes through Raft,
//! linearizable and serializable reads, table creation and deletion, and
//! the follower cluster's path (writes to the leader cluster, then wait for
//! the revision here).
//!
//! Invariant: a reply is sent only after its entry applied on this node;
//! a follower cluster answers a write only once it has applied the write's
//! revision itself (read-your-writes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use armada_core::command::{MetaReply, TableInfo, TableReply};
use armada_core::kv::{RangeRequest, RangeResponse};
use armada_core::mvcc::Mvcc;
use armada_core::raft::data_ns;
use armada_core::{Command, CommandResponse, GroupId, MetaCommand, NodeId, Revision, TableCommand};
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::ReadPolicy;

use crate::node::forward::Miss;
use crate::node::group::CATALOG_SYNC_INTERVAL;
use crate::node::wire::{ClientReply, ClientRequest};
use crate::node::{Group, Node};
use crate::types::{ApiError, HeaderInfo};

/// How long a follower read at a revision it has not applied yet waits.
pub const FOLLOWER_READ_WAIT: Duration = Duration::from_secs(1);

/// The query-skips-read-index canary: every range read but a plain
/// single-key one served as if serializable. Always `false` outside
/// simulation builds.
fn skips_read_index(req: &RangeRequest) -> bool {
    armada_core::canary::active(armada_core::canary::Canary::QuerySkipsReadIndex)
        && (!req.range_end.is_empty()
            || req.limit > 0
            || req.sort_order != armada_core::kv::SortOrder::None
            || req.keys_only
            || req.count_only)
}

impl Node {
    /// Executes a client request here, forwarding it further if another node
    /// leads (the transport handler calls this for forwarded requests).
    pub async fn execute(&self, req: ClientRequest) -> Result<ClientReply, ApiError> {
        if let Some(why) = self.failure() {
            return Err(ApiError::Unavailable(format!("node {} has stopped: {why}", self.cfg.id)));
        }
        let local = match &req {
            ClientRequest::Write { table, cmd, hops } => {
                self.write_local(table, cmd.clone(), *hops).await.map(|(r, h)| ClientReply::Write(r, h))
            }
            ClientRequest::Range { table, req: r, serializable, hops } => {
                self.range_local(table, r, *serializable, *hops).await.map(|(r, h)| ClientReply::Range(r, h))
            }
            // Catalog requests are rare: boxed, so that their futures do not
            // enlarge the future of every read and write.
            ClientRequest::CreateTable { name, hops } => {
                Box::pin(self.create_table_local(name, *hops)).await.map(ClientReply::Table)
            }
            ClientRequest::DeleteTable { name, hops } => {
                Box::pin(self.delete_table_local(name, *hops)).await.map(ClientReply::Table)
            }
            ClientRequest::ListTables { hops } => {
                Box::pin(self.list_tables_local(*hops)).await.map(ClientReply::Tables)
            }
            ClientRequest::Lease { table, query, hops } => {
                Box::pin(self.lease_local(table, query, *hops)).await.map(|(a, h)| ClientReply::Lease(a, h))
            }
            ClientRequest::Auth { by, cmd, hops } => {
                Box::pin(self.auth_change_local(by.clone(), cmd.clone(), *hops)).await.map(ClientReply::Auth)
            }
            ClientRequest::Members { cmd, hops } => {
                Box::pin(self.members_change_local(cmd.clone(), *hops)).await.map(ClientReply::Members)
            }
        };
        match local {
            Ok(reply) => Ok(reply),
            Err(Miss::Failed(e)) => Err(e),
            Err(Miss::Forward { raft_addr, .. }) => self.forward(&raft_addr, req.next_hop()).await,
        }
    }

    pub fn header(&self, group: &Group) -> HeaderInfo {
        let m = group.raft.metrics();
        let term = openraft::async_runtime::WatchReceiver::borrow_watched(&m).current_term;
        HeaderInfo { term, member_id: NodeId(self.cfg.id) }
    }

    /// A table of this node's applied catalog, from the cache when the
    /// catalog has not changed since it was filled. The epoch is read
    /// before the catalog: a change applied meanwhile moves the epoch on, so
    /// what is cached under the old one is never used again.
    pub(super) fn cached_table(&self, name: &str) -> Result<Option<TableInfo>, ApiError> {
        let epoch = self.notifier.catalog_epoch.load(std::sync::atomic::Ordering::SeqCst);
        {
            let cache = self.catalog_cache.read().unwrap_or_else(|p| p.into_inner());
            if cache.0 == epoch {
                if let Some(info) = cache.1.get(name) {
                    return Ok(Some(info.clone()));
                }
            }
        }
        let found = self.read_catalog(|c| c.get(name))?;
        if let Some(info) = &found {
            let mut cache = self.catalog_cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.0 != epoch {
                *cache = (epoch, BTreeMap::new());
            }
            cache.1.insert(name.to_string(), info.clone());
        }
        Ok(found)
    }

    /// The group of a table. A table missing from this node's catalog is
    /// looked up at the metadata leader, so a table created through another
    /// node is never reported missing.
    ///
    /// For callers that serve a request here only; the request path uses
    /// [`Node::routed_table_group`], which may send the request on.
    pub async fn table_group(&self, name: &str) -> Result<Arc<Group>, ApiError> {
        self.routed_table_group(name, 0).await.map_err(Miss::into_api)
    }

    /// The group of a table, or the node to send the request to when the
    /// table is not in this node's catalog and another node leads it.
    pub(super) async fn routed_table_group(&self, name: &str, hops: u32) -> Result<Arc<Group>, Miss> {
        // A name no table can have is the client's mistake (INVALID_ARGUMENT),
        // not a missing table.
        armada_core::command::validate_table_name(name)?;
        let info = match self.cached_table(name)? {
            Some(info) => info,
            None => {
                let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
                // Boxed, like `sync_groups` below: these rare paths would
                // otherwise be inlined into the future of every request
                // (kilobytes copied each time one is created or moved).
                Box::pin(self.linearize(&meta, hops, "the catalog")).await?;
                self.read_catalog(|c| c.get(name))?.ok_or_else(|| ApiError::TableNotFound(name.to_string()))?
            }
        };
        match self.group(info.id) {
            Some(g) => Ok(g),
            None => {
                Box::pin(self.sync_groups()).await;
                self.group(info.id).ok_or_else(|| ApiError::Unavailable(format!("table {name:?} is starting")).into())
            }
        }
    }

    /// Waits until this node has applied everything committed before the
    /// call (ReadIndex through the group's leader).
    pub(super) async fn linearize(&self, group: &Group, hops: u32, what: &str) -> Result<(), Miss> {
        let applied_before = {
            let m = group.raft.metrics();
            let m = openraft::async_runtime::WatchReceiver::borrow_watched(&m);
            m.last_applied.as_ref().map_or(0, |l| l.index)
        };
        let fut = group.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        match crate::rt::timeout(self.cfg.request_timeout, fut).await {
            Err(_) => Err(ApiError::Unavailable(format!("read index for {what} timed out")).into()),
            Ok(Ok(read)) => {
                if read.log_id().index > applied_before {
                    armada_core::probe!(ReadIndexWaitedForApply);
                }
                Ok(())
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(self.forward_or_unavailable(f.leader_id, f.leader_node, hops, what))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(ApiError::Unavailable(format!("{what}: {e}")).into())
            }
            Ok(Err(e)) => Err(ApiError::Unavailable(format!("{what}: {e}")).into()),
        }
    }

    pub(super) async fn propose(&self, group: &Group, cmd: Command, hops: u32) -> Result<CommandResponse, Miss> {
        let what = if group.name.is_empty() { "the catalog".to_string() } else { format!("table {:?}", group.name) };
        self.proposals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fut = group.raft.client_write(cmd);
        match crate::rt::timeout(self.cfg.request_timeout, fut).await {
            Err(_) => Err(ApiError::Indeterminate(format!("write to {what} timed out")).into()),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(self.forward_or_unavailable(f.leader_id, f.leader_node, hops, &what))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
                Err(ApiError::Indeterminate(format!("leader of {what} changed during the write")).into())
            }
            Ok(Err(e)) => Err(ApiError::Indeterminate(format!("{what}: {e}")).into()),
        }
    }

    /// Applies a write to a table through its Raft group.
    pub(super) async fn write_local(
        &self,
        table: &str,
        cmd: TableCommand,
        hops: u32,
    ) -> Result<(TableReply, HeaderInfo), Miss> {
        cmd.validate()?;
        let group = self.routed_table_group(table, hops).await?;
        let resp = self.propose(&group, Command::Table(cmd), hops).await?;
        match resp {
            CommandResponse::Table(Ok(r)) => Ok((r, self.header(&group))),
            CommandResponse::Table(Err(e)) => Err(e.into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    /// Serves a range read: linearizable through the leader's read index, or
    /// serializable from this node's applied state.
    pub(super) async fn range_local(
        &self,
        table: &str,
        req: &RangeRequest,
        serializable: bool,
        hops: u32,
    ) -> Result<(RangeResponse, HeaderInfo), Miss> {
        req.validate()?;
        let group = self.routed_table_group(table, hops).await?;
        if self.is_follower() && Revision(req.revision) > self.table_revision(group.id) {
            // A follower may not have reached a revision the client saw
            // elsewhere yet: wait briefly; past that, the read fails as a
            // future revision.
            self.wait_for_revision(group.id, Revision(req.revision), FOLLOWER_READ_WAIT).await;
        }
        if !serializable
            && !armada_core::canary::active(armada_core::canary::Canary::StaleRead)
            && !skips_read_index(req)
        {
            self.linearize(&group, hops, &format!("table {table:?}")).await?;
        }
        let store = Mvcc::new(&*self.engine, data_ns(group.id));
        // Holds at most the response limit in memory, whatever the range.
        match group.read(|| store.range_within(req, self.cfg.raft.max_response_bytes))? {
            Ok(mut r) => {
                if armada_core::canary::active(armada_core::canary::Canary::FollowerReadAhead) {
                    // The canary claims the leader's revision as the read's.
                    let lag = self.lag.read();
                    r.revision = r.revision.max(lag.get(table).map_or(0, |l| l.leader_revision.get()));
                }
                Ok((r, self.header(&group)))
            }
            Err(armada_core::mvcc::MvccError::Kv(e)) => Err(e.into()),
            Err(e) => Err(ApiError::Internal(e.to_string()).into()),
        }
    }

    /// A page of an `IterateRange` after its first: the key-values of
    /// `[start, end)` as of revision `rev` (the first page's), read from
    /// this node's applied state (waiting briefly if it has not reached
    /// `rev`), and whether more follow.
    pub async fn range_page(
        &self,
        table: &str,
        start: &[u8],
        end: Option<&[u8]>,
        rev: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> Result<(Vec<armada_core::kv::KeyValue>, bool), ApiError> {
        if let Some(why) = self.failure() {
            return Err(ApiError::Unavailable(format!("node {} has stopped: {why}", self.cfg.id)));
        }
        let group = self.table_group(table).await?;
        if self.table_revision(group.id) < Revision(rev) {
            self.wait_for_revision(group.id, Revision(rev), self.cfg.request_timeout).await;
        }
        let store = Mvcc::new(&*self.engine, data_ns(group.id));
        match group.read(|| store.page(start, end, rev, max_keys, max_bytes))? {
            Ok((kvs, more, _)) => Ok((kvs, more)),
            Err(armada_core::mvcc::MvccError::Kv(e)) => Err(e.into()),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// A backup of a table from a consistent image on this node. On the
    /// table's leader the image is taken after a read index (it holds every
    /// write acknowledged before the call); elsewhere it is this node's
    /// applied state, which may be a moment behind. The caller reads the
    /// writer at its own pace while the table keeps serving.
    pub async fn backup(&self, table: &str) -> Result<armada_core::backup::BackupWriter, ApiError> {
        armada_core::command::validate_table_name(table)?;
        let group = self.table_group(table).await?;
        if self.is_leader(&group) {
            self.linearize(&group, 0, &format!("table {table:?}")).await.map_err(Miss::into_api)?;
        }
        let view = group
            .read(|| armada_core::snapshot::GroupView::take_for_backup(&self.engine, group.id))?
            .map_err(|e| ApiError::Internal(format!("taking a view of table {table:?}: {e}")))?;
        armada_core::backup::BackupWriter::new(
            &view,
            table,
            self.id(),
            crate::rt::unix_time_ms(),
            self.cfg.raft.snapshot_chunk_bytes,
        )
        .map_err(|e| ApiError::Internal(format!("backup of table {table:?}: {e}")))
    }

    /// Creates a table and waits (bounded) until its group runs here.
    pub(super) async fn create_table_local(&self, name: &str, hops: u32) -> Result<TableInfo, Miss> {
        armada_core::command::validate_table_name(name)?;
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        let resp =
            self.propose(&meta, Command::Meta(MetaCommand::CreateTable { name: name.to_string() }), hops).await?;
        let info = match resp {
            CommandResponse::Meta(Ok(MetaReply::Created(info))) => info,
            CommandResponse::Meta(Err(e)) => return Err(e.into()),
            other => return Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        };
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if let Some(g) = self.group(info.id) {
                if g.raft.current_leader().await.is_some() {
                    return Ok(info);
                }
            } else {
                self.sync_groups().await;
            }
            if tokio::time::Instant::now() >= deadline {
                // The creation committed (a retry gets "already exists"), but
                // the table cannot serve yet: say so rather than succeed.
                return Err(ApiError::Lagging(format!(
                    "table {name:?} was created, but its Raft group had no leader on node {} after {:?}; it will \
                     serve once the group elects one",
                    self.cfg.id, self.cfg.request_timeout
                ))
                .into());
            }
            tokio::time::sleep(CATALOG_SYNC_INTERVAL).await;
        }
    }

    pub(super) async fn delete_table_local(&self, name: &str, hops: u32) -> Result<TableInfo, Miss> {
        armada_core::command::validate_table_name(name)?;
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        let resp =
            self.propose(&meta, Command::Meta(MetaCommand::DeleteTable { name: name.to_string() }), hops).await?;
        match resp {
            CommandResponse::Meta(Ok(MetaReply::Deleted(info))) => Ok(info),
            CommandResponse::Meta(Err(e)) => Err(e.into()),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    /// Every table, as of a linearizable read of the catalog.
    pub(super) async fn list_tables_local(&self, hops: u32) -> Result<Vec<TableInfo>, Miss> {
        let meta = self.group(GroupId::META).ok_or_else(|| ApiError::Internal("no metadata group".into()))?;
        self.linearize(&meta, hops, "the catalog").await?;
        Ok(self.catalog_list()?)
    }

    /// Applies a write to a table through its Raft group (forwarded to the
    /// group's leader when that is another node). On a follower cluster the
    /// write goes to the leader cluster, and the answer waits until this node
    /// has applied the write's revision, so the client reads its own write.
    pub async fn write(&self, table: &str, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), ApiError> {
        if let Some(up) = self.upstream.get() {
            if !cmd.is_client_write() {
                return Err(ApiError::Internal("replication commands are not client writes".into()));
            }
            cmd.validate()?;
            let group = self.table_group(table).await?;
            let reply = up.write(table, cmd).await?;
            let want = Revision(reply.revision());
            let ok = armada_core::canary::active(armada_core::canary::Canary::AnswerBeforeApply)
                || self.wait_for_revision(group.id, want, self.cfg.request_timeout).await;
            if !ok {
                return Err(ApiError::Lagging(format!(
                    "the write committed at the leader cluster at revision {want}, but this follower has applied only \
                     revision {} after {:?}; retry the read later",
                    self.table_revision(group.id),
                    self.cfg.request_timeout
                )));
            }
            return Ok((reply, self.header(&group)));
        }
        self.write_internal(table, cmd).await
    }

    /// A write through this cluster's Raft group, never to the leader
    /// cluster (replication workers, and every write on a leader cluster).
    pub async fn write_internal(&self, table: &str, cmd: TableCommand) -> Result<(TableReply, HeaderInfo), ApiError> {
        match self.execute(ClientRequest::Write { table: table.to_string(), cmd, hops: 0 }).await? {
            ClientReply::Write(r, h) => Ok((r, h)),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A range read: linearizable (through the leader's read index) or
    /// serializable (this node's applied state).
    pub async fn range(
        &self,
        table: &str,
        req: &RangeRequest,
        serializable: bool,
    ) -> Result<(RangeResponse, HeaderInfo), ApiError> {
        let r = ClientRequest::Range { table: table.to_string(), req: req.clone(), serializable, hops: 0 };
        match self.execute(r).await? {
            ClientReply::Range(r, h) => Ok((r, h)),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Creates a table; returns once its group runs on the node that
    /// applied the creation.
    pub async fn create_table(&self, name: &str) -> Result<TableInfo, ApiError> {
        self.refuse_on_follower("create")?;
        self.create_table_internal(name).await
    }

    pub(super) fn refuse_on_follower(&self, what: &str) -> Result<(), ApiError> {
        if self.upstream.get().is_some() {
            return Err(ApiError::ReadOnly(format!(
                "this is a follower cluster: {what} tables on the leader cluster; they reach followers by replication"
            )));
        }
        Ok(())
    }

    /// Creates a table in this cluster's catalog (followers: the catalog
    /// replication worker).
    pub async fn create_table_internal(&self, name: &str) -> Result<TableInfo, ApiError> {
        match self.execute(ClientRequest::CreateTable { name: name.to_string(), hops: 0 }).await? {
            ClientReply::Table(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn delete_table(&self, name: &str) -> Result<TableInfo, ApiError> {
        self.refuse_on_follower("delete")?;
        self.delete_table_internal(name).await
    }

    pub async fn delete_table_internal(&self, name: &str) -> Result<TableInfo, ApiError> {
        match self.execute(ClientRequest::DeleteTable { name: name.to_string(), hops: 0 }).await? {
            ClientReply::Table(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Every table, as of a linearizable read of the catalog.
    pub async fn list_tables(&self) -> Result<Vec<TableInfo>, ApiError> {
        match self.execute(ClientRequest::ListTables { hops: 0 }).await? {
            ClientReply::Tables(t) => Ok(t),
            other => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        }
    }
}
