//! Raft RPCs over an [`armada_net::Transport`]: one transport per node
//! carries every group, each message tagged with its [`GroupId`].

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::snapshots::Transfers;
use armada_core::raft::ArmadaNode;
use armada_core::snapshot::{ResumePoint, SnapshotChunk, SnapshotData, SnapshotReceiver};
use armada_core::GroupId;
use armada_net::{BoxFuture, Handler, Transport};
use futures::FutureExt;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::RaftNetworkV2;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::node::{ApiError, ClientReply, ClientRequest, Node, C};

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

/// Where a group's incoming snapshot stands on the receiver.
#[derive(Default)]
pub enum Receiving {
    #[default]
    Idle,
    /// Chunks of stream `.0` are being staged.
    Staging(u64, SnapshotReceiver),
    /// Stream `.0` was received whole and is being installed.
    Installing(u64),
    /// Stream `.0` was installed, with this answer (given again to a sender
    /// that lost the first one).
    Installed(u64, SnapshotResponse<C>),
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes in-memory Raft messages without failing")
}

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
        let bytes = encode(&Envelope { group: self.group, request });
        let resp = self.transport.call(&self.target_addr, bytes, timeout).await.map_err(|e| e.to_string())?;
        postcard::from_bytes(&resp).map_err(|e| format!("malformed reply: {e}"))
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
    h.write_bytes(&encode(&meta.last_log_id));
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

/// Where this node stands in snapshot stream `stream` of `group`.
async fn resume_point(group: &crate::node::Group, stream: u64) -> RaftReply {
    // Waits for a chunk being staged, so the answer includes it.
    let state = group.receiving.lock().await;
    match &*state {
        Receiving::Staging(s, r) if *s == stream => RaftReply::ResumeAt(Some(r.resume_point())),
        Receiving::Installing(s) if *s == stream => RaftReply::Installing,
        Receiving::Installed(s, r) if *s == stream => RaftReply::Snapshot(r.clone()),
        _ => RaftReply::ResumeAt(None),
    }
}

/// Stages one chunk of a snapshot stream for `group`; after the last,
/// hands the snapshot to openraft, which installs it.
async fn receive_chunk(
    node: &Node,
    group: &crate::node::Group,
    stream: u64,
    chunk: SnapshotChunk,
    install: Option<(VoteOf<C>, SnapshotMetaOf<C>)>,
) -> Result<RaftReply, String> {
    let seq = chunk.seq;
    let staged = {
        // Held while the chunk is staged: chunks of a stream are staged one
        // at a time, and a resume request waits for the one in progress.
        let mut state = group.receiving.lock().await;
        if let Receiving::Installing(s) = &*state {
            return Err(format!("snapshot chunk {seq} refused: snapshot stream {s:016x} is being installed"));
        }
        if seq == 0 {
            // A new transfer replaces one in progress (a new leader, or a
            // new snapshot); dropping the old receiver deletes what it staged.
            if let Receiving::Staging(old, _) = &*state {
                info!(group = %group.id, old, new = stream, "a new snapshot transfer replaces an unfinished one");
            }
            *state = Receiving::Staging(
                stream,
                SnapshotReceiver::new(node.engine().clone(), group.id, node.next_staging_id()),
            );
        }
        let mut receiver = match std::mem::take(&mut *state) {
            Receiving::Staging(current, r) if current == stream => r,
            other @ Receiving::Staging(..) => {
                *state = other;
                return Err(format!("snapshot chunk {seq} of a transfer replaced by another"));
            }
            other => {
                *state = other;
                return Err(format!("snapshot chunk {seq} of a transfer that is not in progress"));
            }
        };
        // The engine write runs off the async workers: a storage write stall
        // on a large transfer must not starve the transport (QUIC
        // keep-alives) or the node's other groups.
        let (receiver, result) = crate::rt::blocking(move || {
            let r = receiver.accept(chunk);
            (receiver, r)
        })
        .await?;
        match result {
            Ok(None) => {
                *state = Receiving::Staging(stream, receiver);
                return Ok(RaftReply::ChunkStaged);
            }
            Ok(Some(staged)) => {
                if install.is_some() {
                    *state = Receiving::Installing(stream);
                }
                staged
            }
            Err(e @ armada_core::snapshot::SnapshotError::OutOfOrder { .. }) => {
                // Nothing was staged: the transfer can still resume.
                *state = Receiving::Staging(stream, receiver);
                return Err(e.to_string());
            }
            Err(e) => {
                drop(receiver);
                warn!(group = %group.id, "snapshot transfer refused: {e}");
                return Err(e.to_string());
            }
        }
    };
    let Some((vote, meta)) = install else {
        return Err("the last snapshot chunk came without its metadata".into());
    };
    let applied = openraft::async_runtime::WatchReceiver::borrow_watched(&group.raft.metrics()).last_applied;
    if applied >= meta.last_log_id {
        armada_core::probe!(SnapshotAlreadyApplied);
    }
    let result = match group
        .raft
        .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: SnapshotData::Staged(staged) })
        .await
    {
        // The reply tells the leader this node holds everything up to the
        // snapshot's last log id, and the leader never sends those entries
        // again. openraft answers at once, installing nothing, when the
        // snapshot is older than what this node already committed, and
        // some of those entries may still wait for their sync: make them
        // durable before answering. (Without this a crash right after the
        // answer lost entries the leader counted as held, and the leader
        // kept sending from past them forever: found by the simulator,
        // disks-3 seed 407, pinned in `sim/tests`.)
        Ok(r) => node.sync().await.map(|()| r).map_err(|e| format!("snapshot installed but not synced: {e}")),
        Err(e) => Err(e.to_string()),
    };
    let mut state = group.receiving.lock().await;
    if matches!(&*state, Receiving::Installing(s) if *s == stream) {
        *state = match &result {
            Ok(r) => Receiving::Installed(stream, r.clone()),
            Err(_) => Receiving::Idle,
        };
    }
    result.map(RaftReply::Snapshot)
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
                    armada_core::probe!(ForwardDuplicateDropped);
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
                RaftRequest::Snapshot { vote, meta, data } => {
                    // The old format: the group's data pairs, postcard-encoded.
                    match postcard::from_bytes::<Vec<(Vec<u8>, Vec<u8>)>>(&data) {
                        Ok(pairs) => {
                            let stream = u64::MAX - node.next_staging_id();
                            receive_chunk(&node, &group, stream, SnapshotChunk::whole(pairs), Some((vote, meta))).await
                        }
                        Err(e) => Err(format!("malformed snapshot: {e}")),
                    }
                }
                RaftRequest::SnapshotChunk { stream, chunk, install } => {
                    receive_chunk(&node, &group, stream, chunk, install).await
                }
                RaftRequest::SnapshotResume { stream } => Ok(resume_point(&group, stream).await),
                RaftRequest::Client { .. } => Err("client request reached a group".into()),
            };
            Some(encode(&reply.unwrap_or_else(RaftReply::Refused)))
        })
    }
}
