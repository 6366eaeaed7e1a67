//! The etcd Cluster service: MemberList.

use armada_proto::etcd as pb;
use tonic::{Request, Response, Status};

use super::EtcdApi;
use crate::types::HeaderInfo;

#[tonic::async_trait]
impl pb::cluster_server::Cluster for EtcdApi {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.metrics
            .timed("etcd.MemberList", async move {
                let me = self.node.id();
                let members = self
                    .node
                    .config()
                    .members
                    .iter()
                    .map(|(id, n)| pb::Member {
                        id: *id,
                        name: format!("node-{id}"),
                        peer_ur_ls: vec![format!("quic://{}", n.raft_addr)],
                        // Other members' etcd addresses are not configured here.
                        client_ur_ls: if *id == me { vec![self.client_url.clone()] } else { Vec::new() },
                        is_learner: false,
                    })
                    .collect();
                let term = self.node.status().iter().find(|g| g.table == self.table).map_or(0, |g| g.term);
                Ok(Response::new(pb::MemberListResponse {
                    header: self.header(HeaderInfo { term, member_id: me.into() }, 0),
                    members,
                }))
            })
            .await
    }
}
