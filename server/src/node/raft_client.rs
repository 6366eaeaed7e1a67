//! The outbound half of the Raft transport: openraft's network for one
//! group, sending each RPC to a peer over the node's [`Transport`] and
//! streaming snapshots in resumable chunks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::node::snapshots::Transfers;
use armada_core::raft::ArmadaNode;
use armada_core::snapshot::SnapshotData;
use armada_core::GroupId;
use armada_net::Transport;
use futures::FutureExt;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::RaftNetworkV2;
use tracing::{info, warn};

use crate::node::wire::{decode_reply, encode_request, Envelope, RaftReply, RaftRequest};
use crate::node::C;

/// Creates per-peer clients for one group.
pub struct NetworkFactory {
    pub transport: Arc<dyn Transport>,
    pub group: GroupId,
    /// This node's id (part of every snapshot stream id it sends).
    pub sender: u64,
    /// The snapshot transfers this node is sending for the group.
    pub transfers: Arc<Transfers>,
    pub chunk_bytes: usize,
    pub install_bytes_per_sec: u64,
}

pub struct GroupNetwork {
    transport: Arc<dyn Transport>,
    group: GroupId,
    target: u64,
    target_addr: String,
    sender: u64,
    transfers: Arc<Transfers>,
    chunk_bytes: usize,
    install_bytes_per_sec: u64,
}

impl RaftNetworkFactory<C> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: u64, node: &ArmadaNode) -> Self::Network {
        GroupNetwork {
            transport: self.transport.clone(),
            group: self.group,
            target,
            target_addr: node.raft_addr.clone(),
            sender: self.sender,
            transfers: self.transfers.clone(),
            chunk_bytes: self.chunk_bytes,
            install_bytes_per_sec: self.install_bytes_per_sec,
        }
    }
}

impl GroupNetwork {
    async fn call(&self, request: RaftRequest, option: &RPCOption) -> Result<RaftReply, String> {
        self.call_within(request, option.soft_ttl()).await
    }

    async fn call_within(&self, request: RaftRequest, timeout: Duration) -> Result<RaftReply, String> {
        let bytes = encode_request(&Envelope { group: self.group, request });
        let resp = self.transport.call(&self.target_addr, bytes, timeout).await.map_err(|e| e.to_string())?;
        decode_reply(&resp).map_err(|e| e.to_string())
    }
}

fn unreachable(msg: impl ToString) -> Unreachable<C> {
    Unreachable::from_string(msg)
}

impl RaftNetworkV2<C> for GroupNetwork {
    type SnapshotData = SnapshotData;

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

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<C>, RPCError<C>> {
        match self.call(RaftRequest::TransferLeader(req), &option).await {
            Ok(RaftReply::TransferLeader(r)) => Ok(r),
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

    /// Streams the snapshot chunk by chunk (each about `chunk_bytes`), read
    /// from the view as it goes: memory stays at one chunk whatever the
    /// size of the group, and the state machine keeps applying meanwhile.
    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let SnapshotData::View(view) = snapshot.snapshot else {
            return Err(StreamingError::Unreachable(unreachable("a received snapshot cannot be sent on")));
        };
        // The same snapshot sent by the same node is the same stream: a
        // transfer that broke goes on from what the receiver staged, and one
        // whose install outlasted the last call waits for that install.
        let stream = stream_id(self.sender, &snapshot.meta);
        let mut cancel = std::pin::pin!(cancel);
        let resume = loop {
            if let Some(closed) = cancel.as_mut().now_or_never() {
                return Err(StreamingError::Closed(closed));
            }
            match self.call_within(RaftRequest::SnapshotResume { stream }, option.soft_ttl()).await {
                Ok(RaftReply::ResumeAt(p)) => break p,
                Ok(RaftReply::Installing) => armada_net::time::sleep(INSTALL_POLL).await,
                Ok(RaftReply::Snapshot(r)) => {
                    info!(group = %self.group, target = self.target, "the snapshot sent before was installed");
                    return Ok(r);
                }
                // A node that does not know the request: start over.
                Ok(_) => break None,
                Err(e) => return Err(StreamingError::Unreachable(unreachable(e))),
            }
        };
        let mut reader = match &resume {
            Some(p) => {
                info!(group = %self.group, target = self.target, chunk = p.seq, "resuming a snapshot transfer");
                armada_core::probe!(SnapshotSendResumed);
                view.reader_from(self.chunk_bytes, p)
            }
            None => view.reader(self.chunk_bytes),
        };
        self.transfers.started(self.target, snapshot.meta.last_log_id.map_or(0, |l| l.index));
        let result = self.send_chunks(stream, vote, &snapshot.meta, &mut reader, cancel.as_mut(), option).await;
        self.transfers.ended(self.target, result.is_ok());
        result
    }
}

/// How often a sender asks whether the receiver finished installing.
const INSTALL_POLL: Duration = Duration::from_secs(1);

/// A snapshot stream's id: the sender and the snapshot's last log id.
fn stream_id(sender: u64, meta: &SnapshotMetaOf<C>) -> u64 {
    let mut h = armada_core::mvcc::Fnv64::new();
    h.write_u64(sender);
    // Plain postcard: hashed here, never sent or stored.
    h.write_bytes(&postcard::to_stdvec(&meta.last_log_id).expect("postcard encodes a log id"));
    h.finish()
}

impl GroupNetwork {
    async fn send_chunks(
        &mut self,
        stream: u64,
        vote: VoteOf<C>,
        meta: &SnapshotMetaOf<C>,
        reader: &mut armada_core::snapshot::ChunkReader,
        mut cancel: std::pin::Pin<&mut impl Future<Output = ReplicationClosed>>,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let (mut chunks, mut bytes) = (0u64, reader.bytes_so_far());
        loop {
            if let Some(closed) = cancel.as_mut().now_or_never() {
                return Err(StreamingError::Closed(closed));
            }
            let chunk = match reader.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return Err(StreamingError::Unreachable(unreachable("snapshot ended without a last chunk")))
                }
                Err(e) => return Err(StreamingError::Unreachable(unreachable(format!("reading the snapshot: {e}")))),
            };
            chunks += 1;
            bytes += chunk.pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
            let last = chunk.end.is_some();
            let install = last.then(|| (vote, meta.clone()));
            let timeout = if last {
                option.soft_ttl() + Duration::from_secs_f64(bytes as f64 / self.install_bytes_per_sec.max(1) as f64)
            } else {
                option.soft_ttl()
            };
            let reply = self.call_within(RaftRequest::SnapshotChunk { stream, chunk, install }, timeout).await;
            match reply {
                Ok(RaftReply::ChunkStaged) if !last => {}
                Ok(RaftReply::Snapshot(r)) if last => {
                    info!(group = %self.group, target = self.target, chunks, bytes, "sent a snapshot");
                    armada_core::probe!(SnapshotSent);
                    return Ok(r);
                }
                Ok(RaftReply::Refused(m)) => {
                    warn!(group = %self.group, target = self.target, "snapshot refused at chunk {chunks}: {m}");
                    return Err(StreamingError::Unreachable(unreachable(m)));
                }
                Ok(_) => return Err(StreamingError::Unreachable(unreachable("mismatched reply"))),
                Err(e) => {
                    info!(group = %self.group, target = self.target, "snapshot transfer failed at chunk {chunks}: {e}");
                    return Err(StreamingError::Unreachable(unreachable(e)));
                }
            }
        }
    }
}
