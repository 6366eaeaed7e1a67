//! The armada.v1 Cluster service: members (list and changes) and status.

use armada_core::members::{Member, Members, MembersCommand};
use armada_proto::v1 as pb;
use armada_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::convert::status;
use super::Api;

fn member_pb(id: u64, m: &Member) -> pb::Member {
    pb::Member {
        id,
        name: format!("node-{id}"),
        raft_address: m.raft_addr.clone(),
        api_address: m.api_addr.clone(),
        etcd_address: m.etcd_addr.clone(),
        learner: m.learner,
    }
}

fn change_pb(id: u64, m: &Members) -> pb::MemberChangeResponse {
    pb::MemberChangeResponse {
        member: m.members.get(&id).map(|x| member_pb(id, x)),
        members: m.members.iter().map(|(id, x)| member_pb(*id, x)).collect(),
        epoch: m.epoch,
        settled_epoch: m.settled,
    }
}

fn address(what: &'static str, a: &str, required: bool) -> Result<String, Status> {
    if a.is_empty() && !required {
        return Ok(String::new());
    }
    crate::config::parse_peer(what, a).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The id a new member gets when none is asked for: one more than the
/// largest recorded.
pub fn next_member_id(m: &Members) -> u64 {
    m.members.keys().next_back().map_or(1, |id| id + 1)
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("MemberList", async move {
                let m = self.node.members_or_initial();
                let members = m.members.iter().map(|(id, x)| member_pb(*id, x)).collect();
                Ok(Response::new(pb::MemberListResponse { members, epoch: m.epoch, settled_epoch: m.settled }))
            })
            .await
    }

    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let r = request.into_inner();
        self.metrics
            .timed("MemberAdd", async move {
                let member = Member {
                    raft_addr: address("Raft address", &r.raft_address, true)?,
                    api_addr: address("API address", &r.api_address, false)?,
                    etcd_addr: address("etcd address", &r.etcd_address, false)?,
                    learner: r.learner,
                    since: 0,
                };
                let id = match r.id {
                    0 => next_member_id(&self.node.members_or_initial()),
                    id => id,
                };
                let m = self.node.members_change(MembersCommand::Add { id, member }).await.map_err(|e| status(&e))?;
                Ok(Response::new(change_pb(id, &m)))
            })
            .await
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let id = request.into_inner().id;
        self.metrics
            .timed("MemberRemove", async move {
                let m = self.node.members_change(MembersCommand::Remove { id }).await.map_err(|e| status(&e))?;
                Ok(Response::new(change_pb(id, &m)))
            })
            .await
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let id = request.into_inner().id;
        self.metrics
            .timed("MemberPromote", async move {
                let m = self.node.members_change(MembersCommand::Promote { id }).await.map_err(|e| status(&e))?;
                Ok(Response::new(change_pb(id, &m)))
            })
            .await
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let r = request.into_inner();
        self.metrics
            .timed("MemberUpdate", async move {
                let raft_addr = address("Raft address", &r.raft_address, true)?;
                let m = self
                    .node
                    .members_change(MembersCommand::Update { id: r.id, raft_addr })
                    .await
                    .map_err(|e| status(&e))?;
                Ok(Response::new(change_pb(r.id, &m)))
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
