//! The armada.v1 Cluster service: MemberList and Status.

use armada_proto::v1 as pb;
use armada_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::Api;

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("MemberList", async move {
                let members = self
                    .node
                    .config()
                    .members
                    .iter()
                    .map(|(id, n)| pb::Member {
                        id: *id,
                        name: format!("node-{id}"),
                        raft_address: n.raft_addr.clone(),
                        api_address: n.api_addr.clone(),
                    })
                    .collect();
                Ok(Response::new(pb::MemberListResponse { members }))
            })
            .await
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.metrics
            .timed("Status", async move {
                let groups = self
                    .node
                    .status()
                    .into_iter()
                    .map(|g| pb::GroupStatus {
                        table: g.table,
                        leader_id: g.leader_id.map_or(0, u64::from),
                        raft_term: g.term,
                        raft_commit_index: g.commit_index.get(),
                        raft_applied_index: g.applied_index.get(),
                        revision: i64::try_from(g.revision.get()).unwrap_or(i64::MAX),
                        leader_revision: g.leader_revision.get(),
                        lag_revisions: g.lag_revisions,
                        lag_seconds: g.lag_seconds,
                        replication_state: g.replication.name().to_string(),
                        replication_error: g.replication.error().to_string(),
                    })
                    .collect();
                let role = if self.node.is_follower() { "follower" } else { "leader" }.to_string();
                Ok(Response::new(pb::StatusResponse { member_id: self.node.id(), groups, role }))
            })
            .await
    }
}
