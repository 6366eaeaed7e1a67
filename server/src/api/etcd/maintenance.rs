//! The etcd Maintenance service: Status, Hash, HashKV, Defragment and
//! Snapshot (a backup of the etcd table, in Armada's backup format).

use armada_core::mvcc::Fnv64;
use armada_proto::etcd as pb;
use tonic::{Request, Response, Status};

use super::{etcd_status, to_i64, EtcdApi, ETCD_API_VERSION};
use crate::types::{ApiError, HeaderInfo};

/// [`crate::rt::blocking`] with etcd's error text.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    crate::rt::blocking(f).await.map_err(|e| Status::internal(format!("etcdserver: {e}")))
}

type SnapshotStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for EtcdApi {
    type SnapshotStream = SnapshotStream;

    /// Reclaims the storage space of deleted data on this node.
    async fn defragment(
        &self,
        request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
        let engine = self.node.engine().clone();
        blocking(move || engine.defragment()).await?.map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::DefragmentResponse { header: self.header(h, self.node.table_revision(group.id).get()) }))
    }

    /// A hash of everything this node stores for the etcd table (live keys
    /// and history): equal on members that agree.
    async fn hash(&self, request: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
        let (node, id) = (self.node.clone(), group.id);
        let hash = blocking(move || {
            let mut h = Fnv64::new();
            armada_core::mvcc::Mvcc::new(&**node.engine(), armada_core::raft::data_ns(id)).scan_raw(&mut |k, v| {
                h.write_bytes(k);
                h.write_bytes(v);
                true
            })?;
            let x = h.finish();
            Ok::<u32, armada_core::EngineError>((x ^ (x >> 32)) as u32)
        })
        .await?
        .map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::HashResponse { header: self.header(h, self.node.table_revision(group.id).get()), hash }))
    }

    /// A hash of the key-values live at a revision (0: now), with the
    /// compaction revision.
    async fn hash_kv(&self, request: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let revision = u64::try_from(request.into_inner().revision)
            .map_err(|_| Status::invalid_argument("etcdserver: revision must not be negative"))?;
        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
        let (node, id) = (self.node.clone(), group.id);
        let (hash, rev, compacted) = blocking(move || {
            armada_core::mvcc::Mvcc::new(&**node.engine(), armada_core::raft::data_ns(id)).hash_kv(revision)
        })
        .await?
        .map_err(|e| match e {
            armada_core::mvcc::MvccError::Kv(k) => etcd_status(&ApiError::Kv(k)),
            other => Status::internal(format!("etcdserver: {other}")),
        })?;
        let h = self.node.header(&group);
        Ok(Response::new(pb::HashKvResponse { header: self.header(h, rev), hash, compact_revision: to_i64(compacted) }))
    }

    /// The etcd table's backup, in Armada's backup format.
    async fn snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        self.caller(&request)?.check_admin()?;
        let writer = self.node.backup(&self.table).await.map_err(|e| etcd_status(&e))?;
        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
        let mut header = self.header(self.node.header(&group), writer.revision());
        // etcdctl's `snapshot save` wants the stream to end with zero
        // padding to a multiple of 512 bytes and a SHA-256 of all before it.
        struct St {
            writer: Option<armada_core::backup::BackupWriter>,
            sha: sha2::Sha256,
            sent: u64,
        }
        let st = St { writer: Some(writer), sha: <sha2::Sha256 as sha2::Digest>::new(), sent: 0 };
        let stream = futures::stream::unfold(Some(st), move |st| {
            let first = header.take();
            async move {
                use sha2::Digest;
                let mut st = st?;
                let w = st.writer.as_mut()?;
                match w.next_block() {
                    Ok(Some(blob)) => {
                        st.sha.update(&blob);
                        st.sent += blob.len() as u64;
                        // The size is not known in advance: 1 until the last.
                        Some((Ok(pb::SnapshotResponse { header: first, remaining_bytes: 1, blob }), Some(st)))
                    }
                    Ok(None) => {
                        let align = armada_core::backup::ETCD_TRAILER_ALIGN;
                        let pad = (align - st.sent % align) % align;
                        let mut blob = vec![0u8; pad as usize];
                        st.sha.update(&blob);
                        blob.extend_from_slice(&st.sha.finalize());
                        Some((Ok(pb::SnapshotResponse { header: first, remaining_bytes: 0, blob }), None))
                    }
                    Err(e) => Some((Err(Status::internal(format!("etcdserver: {e}"))), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.metrics
            .timed("etcd.Status", async move {
                let table = &self.table;
                let groups = self.node.status();
                // Storage sizes read the engine: off the async workers.
                #[cfg(not(madsim))]
                let sizes = {
                    let node = self.node.clone();
                    tokio::task::spawn_blocking(move || node.storage_sizes())
                        .await
                        .map_err(|e| Status::internal(format!("etcdserver: {e}")))?
                };
                #[cfg(madsim)]
                let sizes = self.node.storage_sizes();
                let g = groups
                    .into_iter()
                    .find(|g| g.table == self.table)
                    .ok_or_else(|| etcd_status(&ApiError::TableNotFound(self.table.clone())))?;
                let db_size: u64 = sizes.iter().map(|(_, s)| s).sum();
                let in_use = sizes.iter().find(|(t, _)| t == table).map_or(0, |(_, s)| *s);
                let h = HeaderInfo { term: g.term, member_id: self.node.id().into() };
                let mut errors = Vec::new();
                if g.leader_id.is_none() {
                    errors.push("etcdserver: no leader".to_string());
                }
                Ok(Response::new(pb::StatusResponse {
                    header: self.header(h, g.revision.get()),
                    version: ETCD_API_VERSION.to_string(),
                    db_size: to_i64(db_size),
                    leader: g.leader_id.map_or(0, u64::from),
                    raft_index: g.commit_index.get(),
                    raft_term: g.term,
                    raft_applied_index: g.applied_index.get(),
                    errors,
                    db_size_in_use: to_i64(in_use),
                    is_learner: false,
                }))
            })
            .await
    }
}
