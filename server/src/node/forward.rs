//! Forwarding: a request this node cannot serve goes to the node that
//! leads (over the cluster transport), at most [`FORWARD_HOPS_MAX`] hops.
//!
//! Invariant: a forwarded write whose answer is lost is reported as
//! indeterminate, never as failed; a duplicated delivery of a forwarded
//! request is executed once (within [`FORWARD_DEDUPE_WINDOW`]).

use std::time::Duration;

use armada_core::raft::ArmadaNode;
use armada_core::GroupId;
use armada_net::Transport;

use crate::node::wire::{ClientReply, ClientRequest};
use crate::node::Node;
use crate::types::ApiError;

/// Most forwarding hops a request may take (to the metadata leader, then to
/// the table's leader).
pub const FORWARD_HOPS_MAX: u32 = 2;
/// Time a forwarded request may take beyond the request timeout (its
/// transit); a leader that does not answer by then is treated as lost.
pub const FORWARD_MARGIN: Duration = Duration::from_millis(500);
/// How many forwarded-request ids a node remembers to drop duplicate
/// deliveries (duplicates arrive within moments of the original).
pub const FORWARD_DEDUPE_WINDOW: usize = 4096;

/// Why this node did not serve a request itself: it failed, or another
/// node leads the group the request needs (the request then goes there,
/// see [`Node::execute`]). Only the node's own request path sees the
/// second case; what leaves the node is an [`ApiError`].
#[derive(Debug)]
pub(crate) enum Miss {
    Failed(ApiError),
    /// Node `leader`, at `raft_addr`, leads the group of `what`.
    Forward {
        leader: u64,
        raft_addr: String,
        what: String,
    },
}

impl Miss {
    /// The error for a caller that cannot forward: a request served only
    /// by this node (a page of an iteration, a backup, a group lookup).
    pub(crate) fn into_api(self) -> ApiError {
        match self {
            Miss::Failed(e) => e,
            Miss::Forward { leader, what, .. } => ApiError::Unavailable(format!(
                "node {leader} leads {what} and this request is served only where it is sent: retry, or send it to                  node {leader}"
            )),
        }
    }
}

impl<E: Into<ApiError>> From<E> for Miss {
    fn from(e: E) -> Miss {
        Miss::Failed(e.into())
    }
}

/// The ids of recently received forwarded requests, oldest first.
#[derive(Default)]
pub(super) struct ForwardDedupe {
    pub(super) seen: std::collections::BTreeSet<(u64, u64)>,
    pub(super) order: std::collections::VecDeque<(u64, u64)>,
}

impl Node {
    pub(super) fn forward_or_unavailable(
        &self,
        leader: Option<u64>,
        node: Option<ArmadaNode>,
        hops: u32,
        what: &str,
    ) -> Miss {
        let addr = node
            .map(|n| n.raft_addr)
            .or_else(|| leader.and_then(|l| self.cfg.members.get(&l)).map(|n| n.raft_addr.clone()));
        match (leader, addr) {
            (Some(leader), Some(raft_addr)) if hops < FORWARD_HOPS_MAX && leader != self.cfg.id => {
                Miss::Forward { leader, raft_addr, what: what.to_string() }
            }
            _ => Miss::Failed(ApiError::Unavailable(format!("no leader for {what}"))),
        }
    }

    /// Sends a client request to the node at `raft_addr` over the cluster
    /// transport and returns its answer. A write whose forwarding fails in
    /// transit may have been applied: its outcome is indeterminate.
    pub(super) async fn forward(&self, raft_addr: &str, req: ClientRequest) -> Result<ClientReply, ApiError> {
        let is_write = req.is_write();
        let id = (self.incarnation, self.next_forward.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let bytes = crate::node::wire::encode_request(&crate::node::wire::Envelope {
            group: GroupId::META,
            request: crate::node::wire::RaftRequest::Client { id, req },
        });
        let failed = |e: String| {
            if is_write {
                ApiError::Indeterminate(format!("forwarding to {raft_addr}: {e}"))
            } else {
                ApiError::Unavailable(format!("forwarding to {raft_addr}: {e}"))
            }
        };
        let resp = self
            .transport
            .call(raft_addr, bytes, self.cfg.request_timeout + FORWARD_MARGIN)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match crate::node::wire::decode_reply(&resp) {
            Ok(crate::node::wire::RaftReply::Client(r)) => r.map_err(ApiError::from),
            Ok(crate::node::wire::RaftReply::Refused(m)) => Err(failed(m)),
            Ok(_) => Err(failed("mismatched reply".into())),
            Err(e) => Err(failed(format!("malformed reply: {e}"))),
        }
    }

    /// Records a forwarded request's id; false if it was seen before.
    pub fn first_delivery(&self, id: (u64, u64)) -> bool {
        let mut d = self.seen_forwards.lock().unwrap_or_else(|p| p.into_inner());
        if !d.seen.insert(id) {
            return false;
        }
        d.order.push_back(id);
        if d.order.len() > FORWARD_DEDUPE_WINDOW {
            if let Some(old) = d.order.pop_front() {
                d.seen.remove(&old);
            }
        }
        true
    }
}
