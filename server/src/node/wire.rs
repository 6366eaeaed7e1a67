//! The messages nodes of one cluster exchange over the cluster transport:
//! Raft RPCs of every group (tagged with the group's id) and forwarded
//! client requests, with their replies; and the postcard payloads inside
//! the replication API's protobuf messages (a forwarded write, its reply
//! or error).
//!
//! Format (see `docs/formats.md`): `mark ++ version:u8 ++ postcard(value)`.
//! The mark is one a decoder of the release before versions cannot read as
//! a message, so such a node refuses a versioned message instead of
//! misreading it: a request ([`Envelope`]) starts with [`REQUEST_MARK`]
//! (group 0, then an enum variant of at least 127, which `RaftRequest` does
//! not have); a reply or payload (enums of fewer than 127 variants) starts
//! with [`REPLY_MARK`] (a variant of at least 127). Bytes without the mark
//! are version 0 (that release's), still read; a node answers a request in
//! the version it came in, so nodes of the previous release can talk to it
//! during a rolling upgrade.
//!
//! Invariant: a variant is only ever appended (postcard encodes an enum's
//! variant by its position); an unknown version is refused, never guessed.

use armada_core::snapshot::{ResumePoint, SnapshotChunk};
use armada_core::GroupId;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use serde::{Deserialize, Serialize};

use crate::node::C;
use crate::types::{ApiError, HeaderInfo};
use armada_core::command::{TableInfo, TableReply};
use armada_core::kv::{RangeRequest, RangeResponse};
use armada_core::lease::{LeaseAnswer, LeaseQuery};
use armada_core::TableCommand;

/// A client request as it travels between nodes when forwarded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ClientRequest {
    Write {
        table: String,
        cmd: TableCommand,
        hops: u32,
    },
    Range {
        table: String,
        req: RangeRequest,
        serializable: bool,
        hops: u32,
    },
    CreateTable {
        name: String,
        hops: u32,
    },
    DeleteTable {
        name: String,
        hops: u32,
    },
    ListTables {
        hops: u32,
    },
    /// A lease request served by the lessor of the table's leader.
    Lease {
        table: String,
        query: LeaseQuery,
        hops: u32,
    },
    /// A change to the authentication state (the metadata group's leader
    /// proposes it). Appended: a previous release refuses it, so upgrade
    /// every node before using authentication.
    Auth {
        by: Option<String>,
        cmd: armada_core::auth::AuthCommand,
        hops: u32,
    },
    /// A change to the recorded membership (the metadata group's leader
    /// proposes it). Appended, like `Auth`.
    Members {
        cmd: armada_core::members::MembersCommand,
        hops: u32,
    },
}

impl ClientRequest {
    pub(super) fn is_write(&self) -> bool {
        !matches!(self, ClientRequest::Range { .. } | ClientRequest::ListTables { .. } | ClientRequest::Lease { .. })
    }

    pub(super) fn next_hop(&self) -> ClientRequest {
        let mut r = self.clone();
        match &mut r {
            ClientRequest::Write { hops, .. }
            | ClientRequest::Range { hops, .. }
            | ClientRequest::CreateTable { hops, .. }
            | ClientRequest::DeleteTable { hops, .. }
            | ClientRequest::ListTables { hops }
            | ClientRequest::Lease { hops, .. }
            | ClientRequest::Auth { hops, .. }
            | ClientRequest::Members { hops, .. } => *hops += 1,
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
    Lease(LeaseAnswer, HeaderInfo),
    Auth(armada_core::auth::AuthReply),
    Members(armada_core::members::Members),
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
    /// A leader hands its leadership of the group to the receiver (a
    /// draining node, or a node leaving the cluster). Appended.
    TransferLeader(openraft::raft::TransferLeaderRequest<C>),
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
    Client(Result<ClientReply, RemoteError>),
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
    /// The answer to `TransferLeader`.
    TransferLeader(openraft::raft::TransferLeaderResponse<C>),
}

/// A request's failure as it travels between nodes (the answer to a
/// forwarded request, or a follower's write sent to the leader cluster).
/// Its own type, so that [`ApiError`] can change without changing the wire:
/// a variant is only appended, and [`RemoteError::Forward`] keeps the place of
/// a variant the first release sent (no release sends it any more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteError {
    Kv(armada_core::kv::KvError),
    Meta(armada_core::command::MetaError),
    TableNotFound(String),
    Unavailable(String),
    Indeterminate(String),
    /// Reserved: the first release's "forward to the leader", which never
    /// left a node in practice. Read as an internal error.
    Forward {
        leader: u64,
        raft_addr: String,
    },
    Internal(String),
    ReadOnly(String),
    Lagging(String),
}

impl From<ApiError> for RemoteError {
    fn from(e: ApiError) -> RemoteError {
        match e {
            ApiError::Kv(k) => RemoteError::Kv(k),
            ApiError::Meta(m) => RemoteError::Meta(m),
            ApiError::TableNotFound(t) => RemoteError::TableNotFound(t),
            ApiError::Unavailable(m) => RemoteError::Unavailable(m),
            ApiError::Indeterminate(m) => RemoteError::Indeterminate(m),
            ApiError::Internal(m) => RemoteError::Internal(m),
            ApiError::ReadOnly(m) => RemoteError::ReadOnly(m),
            ApiError::Lagging(m) => RemoteError::Lagging(m),
        }
    }
}

impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> ApiError {
        match e {
            RemoteError::Kv(k) => ApiError::Kv(k),
            RemoteError::Meta(m) => ApiError::Meta(m),
            RemoteError::TableNotFound(t) => ApiError::TableNotFound(t),
            RemoteError::Unavailable(m) => ApiError::Unavailable(m),
            RemoteError::Indeterminate(m) => ApiError::Indeterminate(m),
            RemoteError::Forward { leader, raft_addr } => {
                ApiError::Internal(format!("the answering node asked to forward to node {leader} at {raft_addr}"))
            }
            RemoteError::Internal(m) => ApiError::Internal(m),
            RemoteError::ReadOnly(m) => ApiError::ReadOnly(m),
            RemoteError::Lagging(m) => ApiError::Lagging(m),
        }
    }
}

/// The wire format this build sends. Version 2 carries the fields record
/// format 2 added (lease ids); versions 0 and 1 have record format 1's.
pub const WIRE_FORMAT: u8 = 2;

/// The record layout (see [`armada_core::codec::with_layout`]) of wire
/// format `version`.
fn layout_of(version: u8) -> u8 {
    if version >= 2 {
        2
    } else {
        1
    }
}
/// The first bytes of a versioned request (see the module docs).
pub const REQUEST_MARK: [u8; 2] = [0x00, 0xFF];
/// The first byte of a versioned reply or replication payload.
pub const REPLY_MARK: [u8; 1] = [0xFF];

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("wire format version {0} is not one this build reads (0 to {WIRE_FORMAT}); is the peer a newer Armada?")]
    Unknown(u8),
    #[error("malformed message (wire format {version}): {reason}")]
    Malformed { version: u8, reason: String },
}

fn encode_marked<T: Serialize>(mark: &[u8], version: u8, v: &T) -> Vec<u8> {
    armada_core::codec::with_layout(layout_of(version), || {
        if version == 0 {
            return postcard::to_stdvec(v).expect("postcard encodes in-memory messages without failing");
        }
        let mut out = mark.to_vec();
        out.push(version);
        postcard::to_extend(v, out).expect("postcard encodes in-memory messages without failing")
    })
}

fn decode_marked<'a, T: Deserialize<'a>>(mark: &[u8], bytes: &'a [u8]) -> Result<(T, u8), WireError> {
    let (version, body) = match bytes.strip_prefix(mark) {
        Some(rest) => match rest.split_first() {
            Some((&v, body)) if (1..=WIRE_FORMAT).contains(&v) => (v, body),
            Some((&v, _)) => return Err(WireError::Unknown(v)),
            None => return Err(WireError::Malformed { version: 0, reason: "no version after the mark".into() }),
        },
        None => (0, bytes),
    };
    let v = armada_core::codec::with_layout(layout_of(version), || postcard::from_bytes(body))
        .map_err(|e| WireError::Malformed { version, reason: e.to_string() })?;
    Ok((v, version))
}

/// A request as this build sends it.
pub fn encode_request(env: &Envelope) -> Vec<u8> {
    encode_marked(&REQUEST_MARK, WIRE_FORMAT, env)
}

/// A request of any version this build reads, with its version.
pub fn decode_request(bytes: &[u8]) -> Result<(Envelope, u8), WireError> {
    decode_marked(&REQUEST_MARK, bytes)
}

/// A reply in `version` (the version of the request it answers).
pub fn encode_reply(reply: &RaftReply, version: u8) -> Vec<u8> {
    encode_marked(&REPLY_MARK, version, reply)
}

/// A reply of any version this build reads.
pub fn decode_reply(bytes: &[u8]) -> Result<RaftReply, WireError> {
    decode_marked(&REPLY_MARK, bytes).map(|(r, _)| r)
}

/// A replication payload (a forwarded write, its reply or error) in
/// `version`.
pub fn encode_payload<T: Serialize>(v: &T, version: u8) -> Vec<u8> {
    encode_marked(&REPLY_MARK, version, v)
}

/// A replication payload of any version this build reads, with its version.
pub fn decode_payload<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, u8), WireError> {
    decode_marked(&REPLY_MARK, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward() -> Envelope {
        let req = ClientRequest::Write {
            table: "t".into(),
            cmd: TableCommand::Put(armada_core::kv::PutRequest::new(b"k".to_vec(), vec![1; 300])),
            hops: 1,
        };
        Envelope { group: GroupId(3), request: RaftRequest::Client { id: (1, 2), req } }
    }

    #[test]
    fn versioned_messages_round_trip_and_version_0_is_still_read() {
        let bytes = encode_request(&forward());
        assert!(bytes.starts_with(&REQUEST_MARK));
        let (env, v) = decode_request(&bytes).unwrap();
        assert_eq!((env.group, v), (GroupId(3), WIRE_FORMAT));
        let legacy = postcard::to_stdvec(&forward()).unwrap();
        let (env, v) = decode_request(&legacy).unwrap();
        assert_eq!((env.group, v), (GroupId(3), 0));
        let reply = RaftReply::Client(Err(RemoteError::Unavailable("x".into())));
        for version in [0, WIRE_FORMAT] {
            assert!(matches!(decode_reply(&encode_reply(&reply, version)), Ok(RaftReply::Client(Err(_)))));
        }
        let cmd = TableCommand::Compact(7);
        let (back, v): (TableCommand, u8) = decode_payload(&encode_payload(&cmd, WIRE_FORMAT)).unwrap();
        assert_eq!((back, v), (cmd, WIRE_FORMAT));
    }

    /// A node of the release before versions refuses a versioned message
    /// (its decoder fails on the mark) rather than misreading it.
    #[test]
    fn the_previous_release_cannot_misread_a_versioned_message() {
        assert!(postcard::from_bytes::<Envelope>(&encode_request(&forward())).is_err());
        let reply = encode_reply(&RaftReply::Refused("r".into()), WIRE_FORMAT);
        assert!(postcard::from_bytes::<RaftReply>(&reply).is_err());
        for payload in [
            encode_payload(&TableCommand::Compact(7), WIRE_FORMAT),
            encode_payload(&TableReply::UpstreamSet, WIRE_FORMAT),
            encode_payload(&RemoteError::Internal("e".into()), WIRE_FORMAT),
        ] {
            assert!(postcard::from_bytes::<TableCommand>(&payload).is_err());
            assert!(postcard::from_bytes::<TableReply>(&payload).is_err());
            assert!(postcard::from_bytes::<RemoteError>(&payload).is_err());
        }
    }

    /// A peer of wire format 1 gets messages without the fields format 2
    /// added (lease ids): exactly what it would have sent itself.
    #[test]
    fn a_version_1_peer_gets_version_1_layouts() {
        let leased =
            armada_core::kv::PutRequest { lease: 9, ..armada_core::kv::PutRequest::new(b"k".to_vec(), b"v".to_vec()) };
        let plain = armada_core::kv::PutRequest::new(b"k".to_vec(), b"v".to_vec());
        let v1 = encode_payload(&TableCommand::Put(leased.clone()), 1);
        let v2 = encode_payload(&TableCommand::Put(leased.clone()), 2);
        assert!(v2.len() > v1.len());
        let (back, version): (TableCommand, u8) = decode_payload(&v1).unwrap();
        assert_eq!((back, version), (TableCommand::Put(plain), 1), "version 1 has no lease");
        let (back, version): (TableCommand, u8) = decode_payload(&v2).unwrap();
        assert_eq!((back, version), (TableCommand::Put(leased), 2));
    }

    fn fuzz_cases() -> u32 {
        std::env::var("ARMADA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }

    /// Valid messages of every decoder, damaged: decoding answers an error
    /// or a message, never panics (inter-node messages come off the
    /// network).
    fn samples() -> Vec<Vec<u8>> {
        let leased =
            armada_core::kv::PutRequest { lease: 9, ..armada_core::kv::PutRequest::new(b"k".to_vec(), b"v".to_vec()) };
        let mut out = vec![encode_request(&forward()), postcard::to_stdvec(&forward()).unwrap()];
        for version in [0, 1, WIRE_FORMAT] {
            out.push(encode_reply(&RaftReply::Client(Err(RemoteError::Unavailable("x".into()))), version));
            out.push(encode_reply(&RaftReply::Refused("r".into()), version));
            out.push(encode_payload(&TableCommand::Put(leased.clone()), version));
            out.push(encode_payload(&TableCommand::LeaseGrant { id: 3, ttl: 10 }, version));
            out.push(encode_payload(&TableReply::UpstreamSet, version));
        }
        out
    }

    fn decode_all(bytes: &[u8]) {
        let _ = decode_request(bytes);
        let _ = decode_reply(bytes);
        let _ = decode_payload::<TableCommand>(bytes);
        let _ = decode_payload::<TableReply>(bytes);
        let _ = decode_payload::<RemoteError>(bytes);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: fuzz_cases(), ..Default::default() })]

        #[test]
        fn damaged_messages_give_errors_not_panics(
            which in proptest::prelude::any::<proptest::sample::Index>(),
            flips in proptest::collection::vec(proptest::prelude::any::<(usize, u8)>(), 1..6),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let samples = samples();
            let mut bytes = which.get(&samples).clone();
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            decode_all(&bytes);
            bytes.truncate(cut % (bytes.len() + 1));
            decode_all(&bytes);
        }

        #[test]
        fn random_bytes_give_errors_not_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            decode_all(&bytes);
            let mut marked = REQUEST_MARK.to_vec();
            marked.push(WIRE_FORMAT);
            marked.extend_from_slice(&bytes);
            decode_all(&marked);
        }
    }

    #[test]
    fn unknown_versions_are_refused() {
        let mut bytes = encode_request(&forward());
        bytes[REQUEST_MARK.len()] = WIRE_FORMAT + 1;
        assert!(matches!(decode_request(&bytes), Err(WireError::Unknown(3))));
        assert!(matches!(decode_reply(&[0xFF]), Err(WireError::Malformed { .. })));
        assert!(matches!(decode_reply(&[0xFF, 9, 0]), Err(WireError::Unknown(9))));
    }
}
