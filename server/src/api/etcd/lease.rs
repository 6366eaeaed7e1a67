//! The etcd Lease service over the etcd table: grants and revocations are
//! writes of the table (forwarded like any write), keep-alives, times to
//! live and the list are answered by the lessor of the table's leader (see
//! `crate::node::lease`). Answers follow etcd 3.4: a keep-alive of an
//! unknown lease answers TTL 0 and a time to live of one answers TTL -1,
//! rather than failing.

use armada_core::auth::Access;
use armada_core::command::TableReply;
use armada_core::kv::KvError;
use armada_core::lease::{LeaseAnswer, LeaseQuery};
use armada_core::TableCommand;
use armada_proto::etcd as pb;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Caller;
use super::{etcd_status, EtcdApi};
use crate::types::ApiError;

type KeepAliveStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

/// Keep-alive answers queued for a client that reads slowly.
const KEEPALIVE_DEPTH: usize = 16;

fn unexpected<T: std::fmt::Debug>(r: &T) -> Status {
    Status::internal(format!("etcdserver: unexpected reply {r:?}"))
}

impl EtcdApi {
    async fn lease_query(&self, query: LeaseQuery) -> Result<(LeaseAnswer, crate::types::HeaderInfo), ApiError> {
        self.node.lease(&self.table, query).await
    }

    /// One keep-alive as etcd answers it.
    async fn keep_alive_once(&self, id: i64) -> Result<pb::LeaseKeepAliveResponse, Status> {
        let (ttl, h) = match self.lease_query(LeaseQuery::KeepAlive { id }).await {
            Ok((LeaseAnswer::KeptAlive { ttl, .. }, h)) => (ttl, h),
            Ok(other) => return Err(unexpected(&other)),
            Err(ApiError::Kv(KvError::LeaseNotFound { .. })) => {
                let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
                (0, self.node.header(&group))
            }
            Err(e) => return Err(etcd_status(&e)),
        };
        let revision = self.current_revision().await;
        Ok(pb::LeaseKeepAliveResponse { header: self.header(h, revision), id, ttl })
    }

    /// Checks `access` to every key attached to lease `id` (root, and
    /// everyone while authentication is disabled, need no lookup).
    async fn check_lease_keys(&self, caller: &Caller, id: i64, access: Access) -> Result<(), Status> {
        if caller.check_admin().is_ok() {
            return Ok(());
        }
        caller.check_user()?;
        match self.lease_query(LeaseQuery::TimeToLive { id, keys: true }).await {
            Ok((LeaseAnswer::TimeToLive { keys, .. }, _)) => keys.iter().try_for_each(|k| caller.check(access, k, &[])),
            Ok((other, _)) => Err(unexpected(&other)),
            // The revoke or the lookup itself reports the missing lease.
            Err(ApiError::Kv(KvError::LeaseNotFound { .. })) => Ok(()),
            Err(e) => Err(etcd_status(&e)),
        }
    }

    /// The etcd table's revision on this node, for response headers.
    async fn current_revision(&self) -> u64 {
        match self.node.table_group(&self.table).await {
            Ok(g) => self.node.table_revision(g.id).get(),
            Err(_) => 0,
        }
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for EtcdApi {
    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.metrics
            .timed("etcd.LeaseGrant", async move {
                self.caller(&request)?.check_user()?;
                let r = request.into_inner();
                match self.write(TableCommand::LeaseGrant { id: r.id, ttl: r.ttl }).await? {
                    (TableReply::LeaseGranted(g), h) => Ok(Response::new(pb::LeaseGrantResponse {
                        header: self.header(h, g.revision),
                        id: g.id,
                        ttl: g.ttl,
                        error: String::new(),
                    })),
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        self.metrics
            .timed("etcd.LeaseRevoke", async move {
                let caller = self.caller(&request)?;
                let r = request.into_inner();
                // Revoking deletes the lease's keys: as in etcd, a user
                // other than root needs write permission on every one.
                self.check_lease_keys(&caller, r.id, Access::Write).await?;
                match self.write(TableCommand::LeaseRevoke { id: r.id }).await? {
                    (TableReply::LeaseRevoked(x), h) => {
                        Ok(Response::new(pb::LeaseRevokeResponse { header: self.header(h, x.revision) }))
                    }
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.caller(&request)?.check_user()?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<pb::LeaseKeepAliveResponse, Status>>(KEEPALIVE_DEPTH);
        let api = self.clone();
        // Keep-alives of one stream are answered in order, one at a time.
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(req) = msg else { return };
                let started = std::time::Instant::now();
                let answer = api.keep_alive_once(req.id).await;
                api.metrics.observe("etcd.LeaseKeepAlive", answer.is_ok(), started.elapsed());
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        let responses = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        self.metrics
            .timed("etcd.LeaseTimeToLive", async move {
                let caller = self.caller(&request)?;
                caller.check_user()?;
                let r = request.into_inner();
                if r.keys {
                    // Listing the keys shows them: read permission on each.
                    self.check_lease_keys(&caller, r.id, Access::Read).await?;
                }
                let revision = self.current_revision().await;
                match self.lease_query(LeaseQuery::TimeToLive { id: r.id, keys: r.keys }).await {
                    Ok((LeaseAnswer::TimeToLive { id, ttl, granted, keys }, h)) => {
                        Ok(Response::new(pb::LeaseTimeToLiveResponse {
                            header: self.header(h, revision),
                            id,
                            ttl,
                            granted_ttl: granted,
                            keys,
                        }))
                    }
                    Ok((other, _)) => Err(unexpected(&other)),
                    Err(ApiError::Kv(KvError::LeaseNotFound { .. })) => {
                        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
                        Ok(Response::new(pb::LeaseTimeToLiveResponse {
                            header: self.header(self.node.header(&group), revision),
                            id: r.id,
                            ttl: -1,
                            granted_ttl: 0,
                            keys: Vec::new(),
                        }))
                    }
                    Err(e) => Err(etcd_status(&e)),
                }
            })
            .await
    }

    async fn lease_leases(
        &self,
        request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.metrics
            .timed("etcd.LeaseLeases", async move {
                self.caller(&request)?.check_user()?;
                let revision = self.current_revision().await;
                match self.lease_query(LeaseQuery::List).await.map_err(|e| etcd_status(&e))? {
                    (LeaseAnswer::Leases(ids), h) => Ok(Response::new(pb::LeaseLeasesResponse {
                        header: self.header(h, revision),
                        leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
                    })),
                    (other, _) => Err(unexpected(&other)),
                }
            })
            .await
    }
}
