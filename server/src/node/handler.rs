//! The inbound half of the Raft transport: the handler that receives every
//! message for this node, hands Raft RPCs to their group, stages incoming
//! snapshot chunks, and executes forwarded client requests (once per id).
//!
//! Invariant: nothing a peer sends can panic the node: malformed bytes, an
//! unknown group or a stopped node are answered with `Refused`.

use std::sync::Weak;

use armada_core::snapshot::{SnapshotChunk, SnapshotData, SnapshotReceiver};
use armada_net::{BoxFuture, Handler};
use openraft::raft::SnapshotResponse;
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use tracing::{info, warn};

use crate::node::wire::{decode_request, encode_reply, RaftReply, RaftRequest, RemoteError, WIRE_FORMAT};
use crate::node::{Node, C};

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
    legacy_values: bool,
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
            let r = if legacy_values { receiver.accept_unversioned(chunk) } else { receiver.accept(chunk) };
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
                return Some(encode_reply(&RaftReply::Refused("node stopping".into()), WIRE_FORMAT));
            };
            let (env, version) = match decode_request(&request) {
                Ok(e) => e,
                // Refused in the oldest format: the sender may be of any release.
                Err(e) => return Some(encode_reply(&RaftReply::Refused(format!("malformed request: {e}")), 0)),
            };
            // Answer in the request's format; a request of the release
            // before formats carries snapshot values without theirs.
            let encode = |r: &RaftReply| encode_reply(r, version);
            let legacy_values = version == 0;
            if let RaftRequest::Client { id, req } = env.request {
                // A duplicate delivery gets no answer: the original's answer
                // is the one the caller waits for.
                if !node.first_delivery(id) {
                    armada_core::probe!(ForwardDuplicateDropped);
                    return None;
                }
                return Some(encode(&RaftReply::Client(node.execute(req).await.map_err(RemoteError::from))));
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
                            let chunk = SnapshotChunk::whole(pairs);
                            receive_chunk(&node, &group, stream, chunk, Some((vote, meta)), legacy_values).await
                        }
                        Err(e) => Err(format!("malformed snapshot: {e}")),
                    }
                }
                RaftRequest::SnapshotChunk { stream, chunk, install } => {
                    receive_chunk(&node, &group, stream, chunk, install, legacy_values).await
                }
                RaftRequest::SnapshotResume { stream } => Ok(resume_point(&group, stream).await),
                RaftRequest::TransferLeader(r) => {
                    group.raft.handle_transfer_leader(r).await.map(RaftReply::TransferLeader).map_err(|e| e.to_string())
                }
                RaftRequest::Client { .. } => Err("client request reached a group".into()),
            };
            Some(encode(&reply.unwrap_or_else(RaftReply::Refused)))
        })
    }
}
