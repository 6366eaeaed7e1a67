//! The messages nodes of one cluster exchange over the cluster transport:
//! Raft RPCs of every group (tagged with the group's id) and forwarded
//! client requests, with their replies.
//!
//! Invariant: a variant is only ever appended (postcard encodes an enum's
//! variant by its position), so that nodes of adjacent releases understand
//! each other during a rolling upgrade.

use armada_core::snapshot::{ResumePoint, SnapshotChunk};
use armada_core::GroupId;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use serde::{Deserialize, Serialize};

use crate::node::C;
use crate::types::{ApiError, HeaderInfo};
use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::{RangeRequest, RangeResponse};
use armada_core::TableCommand;

/// A client request as it travels between nodes when forwarded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ClientRequest {
    Write { table: String, cmd: TableCommand, hops: u32 },
    Range { table: String, req: RangeRequest, serializable: bool, hops: u32 },
    CreateTable { name: String, hops: u32 },
    DeleteTable { name: String, hops: u32 },
    ListTables { hops: u32 },
}

impl ClientRequest {
    pub(super) fn is_write(&self) -> bool {
        !matches!(self, ClientRequest::Range { .. } | ClientRequest::ListTables { .. })
    }

    pub(super) fn next_hop(&self) -> ClientRequest {
        let mut r = self.clone();
        match &mut r {
            ClientRequest::Write { hops, .. }
            | ClientRequest::Range { hops, .. }
            | ClientRequest::CreateTable { hops, .. }
            | ClientRequest::DeleteTable { hops, .. }
            | ClientRequest::ListTables { hops } => *hops += 1,
        }
        r
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ClientReply {
    Write(TableReply, HeaderInfo),
    Range(RangeResponse, HeaderInfo),
    Table(TableInfo),
    Tables(Vec<TableInfo>),
}

#[derive(Serialize, Deserialize)]
pub enum RaftRequest {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    /// A whole snapshot in one message (nodes before streamed snapshots
    /// sent these; still accepted, never sent).
    Snapshot {
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: Vec<u8>,
    },
    /// A client request forwarded to the node that leads its group, with an
    /// id unique to the sending node's incarnation: the receiver executes
    /// each id at most once, since a transport may deliver a request twice
    /// and a write is not idempotent.
    Client {
        id: (u64, u64),
        req: ClientRequest,
    },
    /// Raft's pre-vote: would the receiver grant a vote at the next term?
    /// Appended last, so earlier variants keep their wire tags.
    PreVote(VoteRequest<C>),
    /// One chunk of a streamed snapshot. `stream` is the sender's id for
    /// the transfer; chunk 0 starts a new one (replacing any transfer in
    /// progress). The last chunk carries the vote and metadata, and its
    /// reply is the install's.
    SnapshotChunk {
        stream: u64,
        chunk: SnapshotChunk,
        install: Option<(VoteOf<C>, SnapshotMetaOf<C>)>,
    },
    /// Where the receiver stands in snapshot stream `stream`, so that the
    /// sender resumes an interrupted transfer instead of starting over.
    SnapshotResume {
        stream: u64,
    },
}

#[derive(Serialize, Deserialize)]
pub struct Envelope {
    pub group: GroupId,
    pub request: RaftRequest,
}

#[derive(Serialize, Deserialize)]
pub enum RaftReply {
    Append(AppendEntriesResponse<C>),
    Vote(VoteResponse<C>),
    Snapshot(SnapshotResponse<C>),
    Client(Result<ClientReply, ApiError>),
    /// The receiver could not handle the request (unknown group, stopping,
    /// malformed bytes); the sender backs off and retries.
    Refused(String),
    PreVote(VoteResponse<C>),
    /// A snapshot chunk other than the last was staged.
    ChunkStaged,
    /// The answer to `SnapshotResume`: `None` when that stream is not in
    /// progress here (start from the first chunk).
    ResumeAt(Option<ResumePoint>),
    /// The answer to `SnapshotResume` while the stream's snapshot is being
    /// installed: ask again later (an install of gigabytes outlasts the
    /// last chunk's call when the connection breaks meanwhile).
    Installing,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes in-memory Raft messages without failing")
}
