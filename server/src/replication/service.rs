//! The leader side: the `armada.replication.v1` service, served by every
//! node of the leader cluster from its own applied state.
//!
//! Invariant: a change stream sends each revision once, in order, from
//! the revision asked for; a revision the stream cannot serve (compacted
//! away from the changelog) is answered with the snapshot switch, never
//! skipped.

use std::sync::Arc;
use std::time::Duration;

use armada_core::mvcc::replication::{digest_kv, ChangesFrom, RevisionChanges, RevisionPart};
use armada_core::mvcc::{Fnv64, Mvcc};
use armada_core::raft::data_ns;
use armada_core::{GroupId, TableCommand};
use armada_proto::replication as pb;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    changes_out, part_out, BoxStream, BATCH_BYTES_MAX, BATCH_REVISIONS_MAX, HEARTBEAT, MESSAGE_BYTES_MAX,
    SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNK_KEYS, STREAM_REVISION_BYTES_MAX,
};
use crate::node::Node;
use crate::rt::DetReceiver;
use crate::types::status;
use openraft::async_runtime::watch::WatchReceiver;

/// The leader cluster's replication API.
#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The catalog now, with the auth state when its revision is not
    /// `sent_auth` (the one this stream last carried): the state can be
    /// megabytes, and the stream repeats itself every heartbeat.
    fn catalog(node: &Node, sent_auth: &mut Option<u64>) -> Result<pb::CatalogUpdate, Status> {
        let tables = node.catalog_list().map_err(|e| status(&e))?;
        let auth = node.auth_view().map_err(|e| status(&e))?;
        // An empty, never-changed state is not sent (nothing to mirror).
        let auth_state = if auth.state.revision == 0 || *sent_auth == Some(auth.state.revision) {
            Vec::new()
        } else {
            *sent_auth = Some(auth.state.revision);
            armada_core::codec::encode(&auth.state)
        };
        Ok(pb::CatalogUpdate {
            tables: tables.into_iter().map(|t| pb::TableRef { name: t.name, id: t.id.0 }).collect(),
            auth_state,
            auth_revision: auth.state.revision,
        })
    }
}

/// Waits until `rx` changes or `within` passes.
async fn changed_or_timeout(rx: &mut DetReceiver<u64>, within: Duration) {
    let _ = crate::rt::timeout(within, rx.changed()).await;
}

struct ChangesState {
    node: Arc<Node>,
    group: GroupId,
    next: u64,
    rx: DetReceiver<u64>,
    done: bool,
    /// The follower puts revisions sent in parts back together.
    accepts_parts: bool,
    /// Parts of a large revision still to send, in order.
    parts: std::collections::VecDeque<RevisionPart>,
}

/// A change-stream message, with the serving node's `(revision, compaction
/// revision)` of the table.
fn changes_response(
    group: GroupId,
    (leader_revision, compacted_revision): (u64, u64),
    revisions: Vec<pb::Revision>,
    snapshot_needed: u64,
) -> pb::ChangesResponse {
    pb::ChangesResponse { leader_revision, revisions, snapshot_needed, table_id: group.0, compacted_revision }
}

impl ChangesState {
    /// The serving node's latest applied revision of the table and its
    /// compaction revision, as every message carries them.
    fn state_now(&self) -> (u64, u64) {
        let compacted = Mvcc::new(&**self.node.engine(), data_ns(self.group)).rev_state().map_or(0, |s| s.compacted);
        (self.node.table_revision(self.group).get(), compacted)
    }

    async fn next_message(&mut self) -> Option<Result<pb::ChangesResponse, Status>> {
        if self.done {
            return None;
        }
        if let Some(part) = self.parts.pop_front() {
            return Some(Ok(changes_response(self.group, self.state_now(), vec![part_out(part)], 0)));
        }
        loop {
            if self.node.group(self.group).is_none() {
                self.done = true;
                return Some(Err(Status::not_found("the table was deleted")));
            }
            drop(self.rx.borrow_and_update());
            let store = Mvcc::new(&**self.node.engine(), data_ns(self.group))
                .with_retention(self.node.config().raft.history_retention);
            let state = self.state_now();
            let group = self.group;
            let msg = |revisions, snapshot_needed| changes_response(group, state, revisions, snapshot_needed);
            match store.changes_from(self.next, BATCH_REVISIONS_MAX, BATCH_BYTES_MAX) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(Status::internal(e.to_string())));
                }
                Ok(ChangesFrom::NeedSnapshot { first_retained }) => {
                    self.done = true;
                    return Some(Ok(msg(Vec::new(), first_retained)));
                }
                Ok(ChangesFrom::Changes(mut c)) if !c.is_empty() => {
                    // `changes_from` stops a batch after the revision that
                    // crossed its byte budget (`BATCH_BYTES_MAX`), so only the
                    // last revision can be large: a huge one goes alone in
                    // the next message(s), and alone it is checked below.
                    let part_bytes = self.node.config().raft.revision_part_bytes.max(1);
                    let limit = if self.accepts_parts { part_bytes } else { STREAM_REVISION_BYTES_MAX };
                    let too_large = |r: &RevisionChanges| r.size_bytes() > limit;
                    if c.len() > 1 && c.last().is_some_and(too_large) {
                        c.pop();
                    }
                    if self.accepts_parts && c.len() == 1 && c[0].size_bytes() > part_bytes {
                        let only = c.pop().expect("one revision");
                        self.next = only.revision + 1;
                        self.parts = only.into_parts(part_bytes).into();
                        let first = self.parts.pop_front().expect("a revision has at least one part");
                        return Some(Ok(msg(vec![part_out(first)], 0)));
                    }
                    if let [only] = c.as_slice() {
                        let bytes = only.size_bytes();
                        if bytes > STREAM_REVISION_BYTES_MAX {
                            let rev = only.revision;
                            warn!(
                                table_id = self.group.0,
                                revision = rev,
                                bytes,
                                "revision too large for the change stream: the follower installs a snapshot"
                            );
                            self.done = true;
                            return Some(Ok(msg(Vec::new(), rev + 1)));
                        }
                    }
                    self.next = c.last().map_or(self.next, |l| l.revision + 1);
                    return Some(Ok(msg(c.into_iter().map(changes_out).collect(), 0)));
                }
                Ok(ChangesFrom::Changes(_)) => {
                    let before = *self.rx.borrow_watched();
                    changed_or_timeout(&mut self.rx, HEARTBEAT).await;
                    if *self.rx.borrow_watched() == before {
                        return Some(Ok(msg(Vec::new(), 0)));
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type CatalogStream = BoxStream<pb::CatalogUpdate>;
    type ChangesStream = BoxStream<pb::ChangesResponse>;
    type SnapshotStream = BoxStream<pb::SnapshotResponse>;

    async fn catalog(&self, _request: Request<pb::CatalogRequest>) -> Result<Response<Self::CatalogStream>, Status> {
        let node = self.node.clone();
        let rx = node.revision_watch(GroupId::META);
        let stream = futures::stream::unfold((node, rx, true, None), |(node, mut rx, first, mut sent)| async move {
            if !first {
                changed_or_timeout(&mut rx, HEARTBEAT).await;
            }
            drop(rx.borrow_and_update());
            let update = ReplicationService::catalog(&node, &mut sent);
            Some((update, (node, rx, false, sent)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn changes(&self, request: Request<pb::ChangesRequest>) -> Result<Response<Self::ChangesStream>, Status> {
        let r = request.into_inner();
        let group = self.node.table_group(&r.table).await.map_err(|e| status(&e))?;
        let state = ChangesState {
            node: self.node.clone(),
            group: group.id,
            next: r.from_revision.max(1),
            rx: self.node.revision_watch(group.id),
            done: false,
            accepts_parts: r.accepts_parts,
            parts: Default::default(),
        };
        let stream = futures::stream::unfold(state, |mut st| async move { st.next_message().await.map(|m| (m, st)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let r = request.into_inner();
        let group = self.node.table_group(&r.table).await.map_err(|e| status(&e))?;
        let revision = Mvcc::new(&**self.node.engine(), data_ns(group.id))
            .rev_state()
            .map_err(|e| Status::internal(e.to_string()))?
            .current;
        info!(table = %r.table, revision, "serving a snapshot");
        // Pages are read at `revision` as the stream is pulled, so memory
        // stays at one chunk however large the table is; the count and the
        // digest go out with the last chunk.
        let state = SnapshotState {
            node: self.node.clone(),
            group: group.id,
            revision,
            after: None,
            digest: Fnv64::new(),
            count: 0,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move { st.next_chunk().map(|c| (c, st)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(&self, request: Request<pb::WriteRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = request.into_inner();
        let (cmd, version): (TableCommand, u8) = match crate::node::wire::decode_payload(&r.command) {
            Ok(c) => c,
            Err(e) => return Err(Status::invalid_argument(format!("malformed command: {e}"))),
        };
        if !cmd.is_client_write() {
            return Err(Status::invalid_argument("only client writes can be sent on"));
        }
        let resp = match self.node.write(&r.table, cmd).await {
            // Answered in the command's format (a follower of the previous
            // release reads only its own).
            Ok((reply, _)) => {
                pb::WriteResponse { reply: crate::node::wire::encode_payload(&reply, version), error: Vec::new() }
            }
            Err(e) => pb::WriteResponse {
                reply: Vec::new(),
                error: crate::node::wire::encode_payload(&crate::node::wire::RemoteError::from(e), version),
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease(&self, request: Request<pb::LeaseQueryRequest>) -> Result<Response<pb::LeaseQueryResponse>, Status> {
        let r = request.into_inner();
        let (query, version): (armada_core::lease::LeaseQuery, u8) = crate::node::wire::decode_payload(&r.query)
            .map_err(|e| Status::invalid_argument(format!("malformed lease query: {e}")))?;
        let resp = match self.node.lease(&r.table, query).await {
            Ok((answer, _)) => pb::LeaseQueryResponse {
                answer: crate::node::wire::encode_payload(&answer, version),
                error: Vec::new(),
            },
            Err(e) => pb::LeaseQueryResponse {
                answer: Vec::new(),
                error: crate::node::wire::encode_payload(&crate::node::wire::RemoteError::from(e), version),
            },
        };
        Ok(Response::new(resp))
    }
}

/// A snapshot being streamed: the next page starts after `after`.
struct SnapshotState {
    node: Arc<Node>,
    group: GroupId,
    revision: u64,
    after: Option<Vec<u8>>,
    digest: Fnv64,
    count: u64,
    done: bool,
}

impl SnapshotState {
    fn next_chunk(&mut self) -> Option<Result<pb::SnapshotResponse, Status>> {
        if self.done {
            return None;
        }
        if self.node.group(self.group).is_none() {
            self.done = true;
            return Some(Err(Status::not_found("the table was deleted")));
        }
        let store = Mvcc::new(&**self.node.engine(), data_ns(self.group));
        let (kvs, more) = match store.snapshot_page(
            self.revision,
            self.after.as_deref(),
            SNAPSHOT_CHUNK_KEYS,
            SNAPSHOT_CHUNK_BYTES,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Compacted past the snapshot's revision while streaming:
                // the follower starts over.
                self.done = true;
                return Some(Err(Status::aborted(format!("snapshot at revision {}: {e}", self.revision))));
            }
        };
        for kv in &kvs {
            digest_kv(&mut self.digest, kv);
        }
        self.count += kvs.len() as u64;
        if let Some(last) = kvs.last() {
            self.after = Some(last.key.clone());
        }
        let last = !more;
        self.done = last;
        Some(Ok(pb::SnapshotResponse {
            revision: self.revision,
            count: if last { self.count } else { 0 },
            digest: if last { self.digest.finish() } else { 0 },
            kvs: kvs
                .into_iter()
                .map(|kv| pb::SnapshotKeyValue {
                    key: kv.key,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    value: kv.value,
                    lease: kv.lease,
                })
                .collect(),
            last,
        }))
    }
}

/// A router serving the replication API (behind its token when `tokens`
/// has one; the simulated world configures none), with the stream and
/// keep-alive limits of `limits` (no request rate: follower clusters are
/// authenticated peers).
pub fn router(
    svc: ReplicationService,
    tokens: &crate::auth::Tokens,
    limits: &crate::limits::Limits,
) -> tonic::transport::server::Router {
    let server = pb::replication_server::ReplicationServer::new(svc)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    #[cfg(not(madsim))]
    {
        let server = crate::auth::gate(server, &tokens.replication, &None);
        crate::limits::server(limits).add_service(server)
    }
    #[cfg(madsim)]
    {
        let _ = (tokens, limits);
        tonic::transport::Server::builder().add_service(server)
    }
}
