//! The etcd Cluster service: MemberList and the membership changes
//! (MemberAdd, MemberRemove, MemberUpdate, MemberPromote), served from the
//! cluster's recorded membership (`armada_core::members`).
//!
//! Differences from etcd, by design: a member added as a voter joins every
//! Raft group as a learner and becomes a voter once caught up (etcd makes
//! it a voter at once, which can cost the quorum until it starts); a new
//! member's id is one more than the largest in use (etcd draws a random
//! one); and a change other than a removal is refused while the previous
//! one is still being carried out.

use armada_core::command::MetaError;
use armada_core::members::{Member, Members, MembersCommand, MembersError};
use armada_proto::etcd as pb;
use tonic::{Request, Response, Status};

use super::{etcd_status, EtcdApi};
use crate::types::{ApiError, HeaderInfo};

/// etcd's answer to a refused membership change.
fn members_status(e: &ApiError) -> Status {
    let ApiError::Meta(MetaError::Members(m)) = e else { return etcd_status(e) };
    match m {
        MembersError::NotFound(_) => Status::not_found("etcdserver: member not found"),
        MembersError::Exists(_) => Status::failed_precondition("etcdserver: member ID already exist"),
        MembersError::AddressInUse { .. } => Status::failed_precondition("etcdserver: Peer URLs already exists"),
        MembersError::NotLearner(_) => Status::failed_precondition("etcdserver: can only promote a learner member"),
        MembersError::InvalidAddress(_) | MembersError::InvalidId => {
            Status::invalid_argument("etcdserver: given member URLs are invalid")
        }
        MembersError::NotRecorded => Status::unavailable(format!("etcdserver: {m}")),
        _ => Status::failed_precondition(format!("etcdserver: {m}")),
    }
}

/// The Raft address in an etcd peer URL (`quic://host:port`,
/// `http://host:port`, or just `host:port`).
fn peer_address(urls: &[String]) -> Result<String, Status> {
    let bad = || Status::invalid_argument("etcdserver: given member URLs are invalid");
    let [url] = urls else { return Err(bad()) };
    let hostport = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest).trim_end_matches('/');
    crate::config::parse_peer("peer URL", hostport).map_err(|_| bad())
}

impl EtcdApi {
    fn member_pb(&self, id: u64, m: &Member) -> pb::Member {
        // Every member of a cluster serves etcd the same way as this one.
        let scheme = self.client_url.split_once("://").map_or("http", |(s, _)| s);
        pb::Member {
            id,
            name: format!("node-{id}"),
            peer_ur_ls: vec![format!("quic://{}", m.raft_addr)],
            client_ur_ls: if m.etcd_addr.is_empty() {
                if id == self.node.id() {
                    vec![self.client_url.clone()]
                } else {
                    Vec::new()
                }
            } else {
                vec![format!("{scheme}://{}", m.etcd_addr)]
            },
            is_learner: m.learner,
        }
    }

    fn members_pb(&self, m: &Members) -> Vec<pb::Member> {
        m.members.iter().map(|(id, x)| self.member_pb(*id, x)).collect()
    }

    fn cluster_header(&self) -> Option<pb::ResponseHeader> {
        let me = self.node.id();
        let term = self.node.status().iter().find(|g| g.table == self.table).map_or(0, |g| g.term);
        self.header(HeaderInfo { term, member_id: me.into() }, 0)
    }

    async fn members_change(&self, cmd: MembersCommand) -> Result<Members, Status> {
        self.node.members_change(cmd).await.map_err(|e| members_status(&e))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for EtcdApi {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("etcd.MemberList", async move {
                let members = self.members_pb(&self.node.members_or_initial());
                Ok(Response::new(pb::MemberListResponse { header: self.cluster_header(), members }))
            })
            .await
    }

    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let r = request.into_inner();
        self.metrics
            .timed("etcd.MemberAdd", async move {
                let raft_addr = peer_address(&r.peer_ur_ls)?;
                let id = crate::api::v1::cluster::next_member_id(&self.node.members_or_initial());
                let member = Member {
                    raft_addr,
                    api_addr: String::new(),
                    etcd_addr: String::new(),
                    learner: r.is_learner,
                    since: 0,
                };
                let m = self.members_change(MembersCommand::Add { id, member }).await?;
                Ok(Response::new(pb::MemberAddResponse {
                    header: self.cluster_header(),
                    member: m.members.get(&id).map(|x| self.member_pb(id, x)),
                    members: self.members_pb(&m),
                }))
            })
            .await
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let id = request.into_inner().id;
        self.metrics
            .timed("etcd.MemberRemove", async move {
                let m = self.members_change(MembersCommand::Remove { id }).await?;
                Ok(Response::new(pb::MemberRemoveResponse {
                    header: self.cluster_header(),
                    members: self.members_pb(&m),
                }))
            })
            .await
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let r = request.into_inner();
        self.metrics
            .timed("etcd.MemberUpdate", async move {
                let raft_addr = peer_address(&r.peer_ur_ls)?;
                let m = self.members_change(MembersCommand::Update { id: r.id, raft_addr }).await?;
                Ok(Response::new(pb::MemberUpdateResponse {
                    header: self.cluster_header(),
                    members: self.members_pb(&m),
                }))
            })
            .await
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.caller(&request)?.check_admin()?;
        let id = request.into_inner().id;
        self.metrics
            .timed("etcd.MemberPromote", async move {
                let m = self.members_change(MembersCommand::Promote { id }).await.map_err(|s| {
                    if s.message().contains("in sync with leader") {
                        Status::failed_precondition(
                            "etcdserver: can only promote a learner member which is in sync with leader",
                        )
                    } else {
                        s
                    }
                })?;
                Ok(Response::new(pb::MemberPromoteResponse {
                    header: self.cluster_header(),
                    members: self.members_pb(&m),
                }))
            })
            .await
    }
}
