//! Raft RPCs over an [`armada_net::Transport`]: one transport per node
//! carries every group, each message tagged with its [`GroupId`].

use std::future::Future;
use std::sync::{Arc, Weak};

use armada_core::raft::ArmadaNode;
use armada_core::GroupId;
use armada_net::{BoxFuture, Handler, Transport};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::RaftNetworkV2;
use serde::{Deserialize, Serialize};

use crate::node::{ApiError, ClientReply, ClientRequest, Node, C};

#[derive(Serialize, Deserialize)]
pub enum RaftRequest {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
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
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes in-memory Raft messages without failing")
}

/// Creates per-peer clients for one group.
pub struct NetworkFactory {
    pub transport: Arc<dyn Transport>,
    pub group: GroupId,
}

pub struct GroupNetwork {
    transport: Arc<dyn Transport>,
    group: GroupId,
    target_addr: String,
}

impl RaftNetworkFactory<C> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, _target: u64, node: &ArmadaNode) -> Self::Network {
        GroupNetwork { transport: self.transport.clone(), group: self.group, target_addr: node.raft_addr.clone() }
    }
}

impl GroupNetwork {
    async fn call(&self, request: RaftRequest, option: &RPCOption) -> Result<RaftReply, String> {
        let bytes = encode(&Envelope { group: self.group, request });
        let resp = self.transport.call(&self.target_addr, bytes, option.soft_ttl()).await.map_err(|e| e.to_string())?;
        postcard::from_bytes(&resp).map_err(|e| format!("malformed reply: {e}"))
    }
}

fn unreachable(msg: impl ToString) -> Unreachable<C> {
    Unreachable::from_string(msg)
}

impl RaftNetworkV2<C> for GroupNetwork {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        match self.call(RaftRequest::Append(rpc), &option).await {
            Ok(RaftReply::Append(r)) => Ok(r),
            Ok(RaftReply::Refused(m)) => Err(RPCError::Unreachable(unreachable(m))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("mismatched reply"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(RaftRequest::Vote(rpc), &option).await {
            Ok(RaftReply::Vote(r)) => Ok(r),
            Ok(RaftReply::Refused(m)) => Err(RPCError::Unreachable(unreachable(m))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("mismatched reply"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(RaftRequest::PreVote(rpc), &option).await {
            Ok(RaftReply::PreVote(r)) => Ok(r),
            Ok(RaftReply::Refused(m)) => Err(RPCError::Unreachable(unreachable(m))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("mismatched reply"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let req = RaftRequest::Snapshot { vote, meta: snapshot.meta, data: snapshot.snapshot };
        match self.call(req, &option).await {
            Ok(RaftReply::Snapshot(r)) => Ok(r),
            Ok(RaftReply::Refused(m)) => Err(StreamingError::Unreachable(unreachable(m))),
            Ok(_) => Err(StreamingError::Unreachable(unreachable("mismatched reply"))),
            Err(e) => Err(StreamingError::Unreachable(unreachable(e))),
        }
    }
}

/// Serves Raft RPCs for every group of a node.
pub struct RaftHandler {
    pub node: Weak<Node>,
}

impl Handler for RaftHandler {
    fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Option<Vec<u8>>> {
        let node = self.node.upgrade();
        Box::pin(async move {
            let Some(node) = node else {
                return Some(encode(&RaftReply::Refused("node stopping".into())));
            };
            let env: Envelope = match postcard::from_bytes(&request) {
                Ok(e) => e,
                Err(e) => return Some(encode(&RaftReply::Refused(format!("malformed request: {e}")))),
            };
            if let RaftRequest::Client { id, req } = env.request {
                // A duplicate delivery gets no answer: the original's answer
                // is the one the caller waits for.
                if !node.first_delivery(id) {
                    return None;
                }
                return Some(encode(&RaftReply::Client(node.execute(req).await)));
            }
            let Some(group) = node.group(env.group) else {
                return Some(encode(&RaftReply::Refused(format!("group {} not hosted here", env.group))));
            };
            let reply = match env.request {
                RaftRequest::Append(r) => {
                    group.raft.append_entries(r).await.map(RaftReply::Append).map_err(|e| e.to_string())
                }
                RaftRequest::Vote(r) => group.raft.vote(r).await.map(RaftReply::Vote).map_err(|e| e.to_string()),
                RaftRequest::PreVote(r) => {
                    group.raft.pre_vote(r).await.map(RaftReply::PreVote).map_err(|e| e.to_string())
                }
                RaftRequest::Snapshot { vote, meta, data } => group
                    .raft
                    .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: data })
                    .await
                    .map(RaftReply::Snapshot)
                    .map_err(|e| e.to_string()),
                RaftRequest::Client { .. } => Err("client request reached a group".into()),
            };
            Some(encode(&reply.unwrap_or_else(RaftReply::Refused)))
        })
    }
}
