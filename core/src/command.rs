//! Commands replicated through Raft, their results, and the table catalog
//! kept by the metadata group.
//!
//! Every command is applied deterministically: the same log gives the same
//! results and byte-identical state on every replica.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, WriteBatch};
use crate::kv::*;
use crate::mvcc::replication::{ReplicateOutcome, RevisionChanges, SnapshotRefusal};
use crate::mvcc::{Mvcc, MvccError};

/// Identifies a Raft group on a node: 0 is the metadata group, every table has
/// its own id (never reused, so a re-created table never sees old data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl GroupId {
    pub const META: GroupId = GroupId(0);
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == GroupId::META {
            write!(f, "meta")
        } else {
            write!(f, "t{}", self.0)
        }
    }
}

/// A write to one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableCommand {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(u64),
    /// Follower clusters: leader revisions, applied only if the batch starts
    /// at the table's next revision (see [`crate::mvcc::replication`]).
    Replicate {
        batch: Vec<RevisionChanges>,
        /// The leader cluster's latest revision when the batch was sent, so
        /// every follower replica knows how far behind it is.
        leader_revision: u64,
    },
    /// Follower clusters: one chunk of a snapshot being installed.
    SnapshotChunk {
        revision: u64,
        first: bool,
        kvs: Vec<KeyValue>,
    },
    /// Follower clusters: swap the staged snapshot in as the table at `revision`.
    SnapshotCommit {
        revision: u64,
        count: u64,
        digest: u64,
    },
    /// The next step of removing the history a compaction made unreadable
    /// (see [`crate::mvcc`]); proposed by the group's leader while one is
    /// pending. Takes no revision.
    CompactStep,
    /// Follower clusters: records which leader-cluster table (its id) this
    /// table mirrors, before anything of it is applied; a later incarnation
    /// of the same name (deleted and re-created on the leader cluster) is
    /// then told apart.
    SetUpstream {
        table_id: u64,
    },
    /// Grants a lease (`id` 0: the table picks the next free id) of `ttl`
    /// seconds (see [`crate::lease`]).
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// Revokes a lease, deleting its keys in one revision: a client's
    /// request, or the leader's when the lease ran out.
    LeaseRevoke {
        id: i64,
    },
    /// The leader's record of leases' remaining times (milliseconds; 0
    /// clears one), so that a new leader does not restart them.
    LeaseCheckpoint(Vec<(i64, u64)>),
}

/// The result of a [`TableCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableReply {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    Replicated(ReplicateOutcome),
    SnapshotStaged,
    SnapshotCommitted(Result<u64, SnapshotRefusal>),
    /// A compaction step ran; `more`: steps remain.
    CompactStepped {
        more: bool,
    },
    UpstreamSet,
    LeaseGranted(crate::lease::GrantResponse),
    LeaseRevoked(crate::lease::RevokeResponse),
    LeaseCheckpointed,
}

impl TableReply {
    /// The table's revision after the command.
    pub fn revision(&self) -> u64 {
        match self {
            TableReply::Put(r) => r.revision,
            TableReply::DeleteRange(r) => r.revision,
            TableReply::Txn(r) => r.revision,
            TableReply::Compact(r) => r.revision,
            TableReply::Replicated(r) => r.revision,
            TableReply::SnapshotStaged => 0,
            TableReply::SnapshotCommitted(r) => r.clone().unwrap_or(0),
            TableReply::CompactStepped { .. } | TableReply::UpstreamSet | TableReply::LeaseCheckpointed => 0,
            TableReply::LeaseGranted(g) => g.revision,
            TableReply::LeaseRevoked(r) => r.revision,
        }
    }
}

impl TableCommand {
    /// Whether a client may send this command (the others are the
    /// replication machinery's own).
    pub fn is_client_write(&self) -> bool {
        matches!(
            self,
            TableCommand::Put(_)
                | TableCommand::DeleteRange(_)
                | TableCommand::Txn(_)
                | TableCommand::Compact(_)
                | TableCommand::LeaseGrant { .. }
                | TableCommand::LeaseRevoke { .. }
        )
    }

    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            TableCommand::Put(p) => p.validate(),
            TableCommand::DeleteRange(d) => d.validate(),
            TableCommand::Txn(t) => t.validate(),
            TableCommand::Compact(_)
            | TableCommand::Replicate { .. }
            | TableCommand::SnapshotChunk { .. }
            | TableCommand::SnapshotCommit { .. }
            | TableCommand::CompactStep
            | TableCommand::SetUpstream { .. }
            | TableCommand::LeaseRevoke { .. }
            | TableCommand::LeaseCheckpoint(_) => Ok(()),
            TableCommand::LeaseGrant { ttl, .. } => {
                if *ttl > crate::lease::LEASE_TTL_MAX {
                    return Err(KvError::LeaseTtlTooLarge { ttl: *ttl });
                }
                Ok(())
            }
        }
    }

    /// Runs the command against `store`, returning the batch to write (with
    /// nothing written on refusal) and the reply.
    pub fn execute(&self, store: &Mvcc<'_>) -> Result<(WriteBatch, Result<TableReply, KvError>), EngineError> {
        let mut txn = store.begin()?;
        let reply = match self {
            TableCommand::Put(p) => txn.put(p).map(TableReply::Put),
            TableCommand::DeleteRange(d) => txn.delete_range(d).map(TableReply::DeleteRange),
            TableCommand::Txn(t) => txn.txn(t).map(TableReply::Txn),
            TableCommand::Compact(rev) => txn.compact(*rev).map(TableReply::Compact),
            TableCommand::LeaseGrant { id, ttl } => txn.lease_grant(*id, *ttl).map(TableReply::LeaseGranted),
            TableCommand::LeaseRevoke { id } => txn.lease_revoke(*id).map(TableReply::LeaseRevoked),
            TableCommand::LeaseCheckpoint(c) => txn.lease_checkpoint(c).map(|()| TableReply::LeaseCheckpointed),
            TableCommand::Replicate { batch, .. } => {
                let (wb, outcome) = store.apply_replicated(batch)?;
                return Ok((wb, Ok(TableReply::Replicated(outcome))));
            }
            TableCommand::SnapshotChunk { first, kvs, .. } => {
                return Ok((store.stage_snapshot_chunk(*first, kvs)?, Ok(TableReply::SnapshotStaged)));
            }
            TableCommand::SnapshotCommit { revision, count, digest } => {
                let (wb, r) = store.commit_snapshot(*revision, *count, *digest)?;
                return Ok((wb, Ok(TableReply::SnapshotCommitted(r))));
            }
            TableCommand::CompactStep => {
                let (wb, more) = store.compaction_step()?;
                return Ok((wb, Ok(TableReply::CompactStepped { more })));
            }
            TableCommand::SetUpstream { table_id } => {
                return Ok((store.set_upstream_table(*table_id), Ok(TableReply::UpstreamSet)));
            }
        };
        match reply {
            Ok(r) => Ok((txn.finish().0, Ok(r))),
            Err(MvccError::Kv(e)) => Ok((WriteBatch::new(), Err(e))),
            Err(MvccError::Engine(e)) => Err(e),
        }
    }
}

/// Longest table name, in bytes.
pub const TABLE_NAME_BYTES_MAX: usize = 128;

/// A table of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub name: String,
    pub id: GroupId,
}

/// A change to the table catalog (the metadata group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    CreateTable {
        name: String,
    },
    DeleteTable {
        name: String,
    },
    /// A change to the authentication state, requested by `by` (the
    /// authenticated user, checked when it applies; `None` when there is
    /// none).
    Auth {
        by: Option<String>,
        cmd: crate::auth::AuthCommand,
    },
    /// A change to the recorded membership (`crate::members`). Appended:
    /// a node of an older release cannot read it, so it is only proposed
    /// when an operator asks for a membership change (after an upgrade).
    Members(crate::members::MembersCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    Created(TableInfo),
    Deleted(TableInfo),
    Auth(crate::auth::AuthReply),
    /// The membership record after the command (unchanged if it was a
    /// repeat).
    Members(crate::members::Members),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("table {0:?} already exists")]
    TableExists(String),
    #[error("table {0:?} not found")]
    TableNotFound(String),
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName { name: String, reason: String },
    #[error("{0}")]
    Auth(crate::auth::AuthError),
    #[error("{0}")]
    Members(crate::members::MembersError),
}

/// Checks a table name: 1 to 128 bytes of `[A-Za-z0-9_.-]`.
pub fn validate_table_name(name: &str) -> Result<(), MetaError> {
    let bad = |reason: &str| MetaError::InvalidTableName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > TABLE_NAME_BYTES_MAX {
        return Err(bad("longer than 128 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
        return Err(bad("only letters, digits, '_', '-' and '.' are allowed"));
    }
    Ok(())
}

/// The table catalog stored under a namespace of the metadata group.
pub struct Catalog<'e> {
    engine: &'e dyn Engine,
    ns: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct CatalogCounters {
    next_table_id: u64,
}

impl<'e> Catalog<'e> {
    pub fn new(engine: &'e dyn Engine, ns: Vec<u8>) -> Self {
        Self { engine, ns }
    }

    fn table_key(&self, name: &str) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(b't');
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Where the authentication state is kept.
    pub fn auth_key(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(b'a');
        k
    }

    /// The authentication state (empty and disabled if never changed).
    pub fn auth_state(&self) -> Result<crate::auth::AuthState, EngineError> {
        crate::auth::AuthState::load(self.engine, &self.auth_key())
    }

    /// Where the membership record is kept.
    pub fn members_key(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(b'c');
        k
    }

    /// The recorded membership (`None` before the cluster recorded it).
    pub fn members(&self) -> Result<Option<crate::members::Members>, EngineError> {
        crate::members::Members::load(self.engine, &self.members_key())
    }

    fn group_members_key(&self, id: GroupId) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(b'g');
        k.extend_from_slice(&id.0.to_be_bytes());
        k
    }

    /// A table group's founding configuration (`None` for tables created
    /// before the cluster recorded its members).
    pub fn group_members(&self, id: GroupId) -> Result<Option<crate::members::GroupMembers>, EngineError> {
        match self.engine.get(&self.group_members_key(id))? {
            Some(v) => crate::codec::decode(&v, "group members").map(Some).map_err(EngineError::from),
            None => Ok(None),
        }
    }

    fn counters_key(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.push(b'n');
        k
    }

    pub fn get(&self, name: &str) -> Result<Option<TableInfo>, EngineError> {
        match self.engine.get(&self.table_key(name))? {
            Some(v) => crate::codec::decode(&v, "catalog entry").map(Some).map_err(EngineError::from),
            None => Ok(None),
        }
    }

    /// Every table, by name.
    pub fn list(&self) -> Result<Vec<TableInfo>, EngineError> {
        let mut lo = self.ns.clone();
        lo.push(b't');
        let mut hi = self.ns.clone();
        hi.push(b't' + 1);
        let mut out = Vec::new();
        let mut err = None;
        self.engine.scan(&lo, &hi, &mut |_, v| match crate::codec::decode(v, "catalog entry") {
            Ok(t) => {
                out.push(t);
                true
            }
            Err(e) => {
                err = Some(EngineError::from(e));
                false
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub fn execute(&self, cmd: &MetaCommand) -> Result<(WriteBatch, Result<MetaReply, MetaError>), EngineError> {
        let mut batch = WriteBatch::new();
        let reply = match cmd {
            MetaCommand::CreateTable { name } => {
                if let Err(e) = validate_table_name(name) {
                    return Ok((batch, Err(e)));
                }
                if self.get(name)?.is_some() {
                    return Ok((batch, Err(MetaError::TableExists(name.clone()))));
                }
                let counters = match self.engine.get(&self.counters_key())? {
                    Some(v) => crate::codec::decode(&v, "catalog counters").map_err(EngineError::from)?,
                    None => CatalogCounters { next_table_id: 1 },
                };
                let info = TableInfo { name: name.clone(), id: GroupId(counters.next_table_id) };
                let next = CatalogCounters { next_table_id: counters.next_table_id + 1 };
                batch.put(self.counters_key(), crate::codec::encode(&next));
                batch.put(self.table_key(name), crate::codec::encode(&info));
                if let Some(members) = self.members()? {
                    let founding = crate::members::GroupMembers::at(&members);
                    batch.put(self.group_members_key(info.id), crate::codec::encode(&founding));
                }
                Ok(MetaReply::Created(info))
            }
            MetaCommand::DeleteTable { name } => match self.get(name)? {
                None => Err(MetaError::TableNotFound(name.clone())),
                Some(info) => {
                    batch.delete(self.table_key(name));
                    batch.delete(self.group_members_key(info.id));
                    Ok(MetaReply::Deleted(info))
                }
            },
            MetaCommand::Auth { by, cmd } => {
                let mut state = self.auth_state()?;
                match state.apply(by.as_deref(), cmd) {
                    Ok(reply) => {
                        if matches!(reply, crate::auth::AuthReply::Changed { .. }) {
                            state.store(self.auth_key(), &mut batch);
                        }
                        Ok(MetaReply::Auth(reply))
                    }
                    Err(e) => Err(MetaError::Auth(e)),
                }
            }
            MetaCommand::Members(cmd) => {
                let current = self.members()?;
                match crate::members::Members::apply(current.as_ref(), cmd) {
                    Ok(Some(next)) => {
                        next.store(self.members_key(), &mut batch);
                        Ok(MetaReply::Members(next))
                    }
                    Ok(None) => match current {
                        Some(c) => Ok(MetaReply::Members(c)),
                        None => Err(MetaError::Members(crate::members::MembersError::NotRecorded)),
                    },
                    Err(e) => Err(MetaError::Members(e)),
                }
            }
        };
        Ok((batch, reply))
    }
}

/// The application data of every Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Meta(MetaCommand),
    Table(TableCommand),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Auth commands carry password hashes and signing keys: only
            // their kind is ever printed.
            Command::Meta(MetaCommand::Auth { cmd, .. }) => write!(f, "meta:auth:{}", cmd.kind()),
            Command::Meta(m) => write!(f, "meta:{m:?}"),
            Command::Table(TableCommand::Put(p)) => write!(f, "put({} bytes key)", p.key.len()),
            Command::Table(TableCommand::DeleteRange(_)) => write!(f, "delete_range"),
            Command::Table(TableCommand::Txn(t)) => write!(f, "txn({} compares)", t.compare.len()),
            Command::Table(TableCommand::Compact(r)) => write!(f, "compact({r})"),
            Command::Table(TableCommand::Replicate { batch: b, .. }) => match (b.first(), b.last()) {
                (Some(a), Some(z)) => write!(f, "replicate({}..={})", a.revision, z.revision),
                _ => write!(f, "replicate(empty)"),
            },
            Command::Table(TableCommand::SnapshotChunk { revision, kvs, .. }) => {
                write!(f, "snapshot_chunk(@{revision}, {} keys)", kvs.len())
            }
            Command::Table(TableCommand::SnapshotCommit { revision, .. }) => write!(f, "snapshot_commit(@{revision})"),
            Command::Table(TableCommand::CompactStep) => write!(f, "compact_step"),
            Command::Table(TableCommand::SetUpstream { table_id }) => write!(f, "set_upstream({table_id})"),
            Command::Table(TableCommand::LeaseGrant { id, ttl }) => write!(f, "lease_grant({id}, {ttl}s)"),
            Command::Table(TableCommand::LeaseRevoke { id }) => write!(f, "lease_revoke({id})"),
            Command::Table(TableCommand::LeaseCheckpoint(c)) => write!(f, "lease_checkpoint({} leases)", c.len()),
        }
    }
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    /// Blank and membership entries.
    #[default]
    Empty,
    Meta(Result<MetaReply, MetaError>),
    Table(Result<TableReply, KvError>),
    /// The command was proposed to a group of the other kind; nothing applied.
    WrongGroup,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    #[test]
    fn catalog_creates_lists_and_deletes() {
        let e = MemEngine::new();
        let c = Catalog::new(&e, b"m".to_vec());
        let run = |cmd: MetaCommand| {
            let (b, r) = c.execute(&cmd).unwrap();
            e.write(b).unwrap();
            r
        };
        let a = run(MetaCommand::CreateTable { name: "a".into() }).unwrap();
        assert_eq!(a, MetaReply::Created(TableInfo { name: "a".into(), id: GroupId(1) }));
        assert_eq!(run(MetaCommand::CreateTable { name: "a".into() }), Err(MetaError::TableExists("a".into())));
        run(MetaCommand::CreateTable { name: "b".into() }).unwrap();
        assert_eq!(c.list().unwrap().len(), 2);
        run(MetaCommand::DeleteTable { name: "a".into() }).unwrap();
        assert_eq!(run(MetaCommand::DeleteTable { name: "a".into() }), Err(MetaError::TableNotFound("a".into())));
        let again = run(MetaCommand::CreateTable { name: "a".into() }).unwrap();
        assert_eq!(again, MetaReply::Created(TableInfo { name: "a".into(), id: GroupId(3) }), "ids are never reused");
        assert!(matches!(
            run(MetaCommand::CreateTable { name: "bad name".into() }),
            Err(MetaError::InvalidTableName { .. })
        ));
    }
}
