//! armada.v1 Watch: one watcher per call, on any table, served by
//! [`Node::serve_watch`](crate::node::Node::serve_watch) like etcd's Watch;
//! this module checks the request and converts messages.

use armada_core::watch::{EventKind, WatchEvent, WatchSpec};
use armada_core::Revision;
use armada_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::convert::{header, kv_out, rev_out, status};
use crate::node::watch::WatchInput;

pub type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Responses queued between the stream's task and the client.
const CHANNEL_DEPTH: usize = 16;

fn event_out(e: WatchEvent) -> pb::Event {
    let kind = match e.kind {
        EventKind::Put => pb::event::EventType::Put,
        EventKind::Delete => pb::event::EventType::Delete,
    };
    pb::Event { r#type: kind as i32, kv: Some(kv_out(e.kv)), prev_kv: e.prev_kv.map(kv_out) }
}

/// The request as core's watcher spec.
pub fn spec_in(r: &pb::WatchRequest) -> Result<WatchSpec, Status> {
    if r.key.is_empty() && r.range_end.is_empty() {
        return Err(Status::invalid_argument("key is empty (give a key, or a range)"));
    }
    if r.start_revision < 0 {
        return Err(Status::invalid_argument(format!("start_revision {} is negative", r.start_revision)));
    }
    Ok(WatchSpec {
        watch_id: None,
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        start_revision: (r.start_revision > 0).then_some(Revision(r.start_revision as u64)),
        prev_kv: r.prev_kv,
        no_put: r.no_put,
        no_delete: r.no_delete,
        progress_notify: r.progress_notify,
        fragment: false,
    })
}

impl Api {
    pub(super) async fn watch_stream(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        armada_core::command::validate_table_name(&r.table).map_err(|e| status(&e.into()))?;
        let spec = spec_in(&r)?;
        let group = self.node.table_group(&r.table).await.map_err(|e| status(&e))?;
        let (in_tx, in_rx) = mpsc::channel::<WatchInput>(1);
        let (out_tx, out_rx) = mpsc::channel(CHANNEL_DEPTH);
        in_tx.send(WatchInput::Create(spec)).await.map_err(|_| Status::internal("watch task gone"))?;
        let node = self.node.clone();
        let id = group.id;
        tokio::spawn(async move { node.serve_watch(id, in_rx, out_tx).await });
        let node = self.node.clone();
        // The request channel stays open as long as the client reads: the
        // task ends when the client goes away (both channels closed).
        let responses = futures::stream::unfold((out_rx, Some(in_tx), false), move |(mut out, tx, done)| {
            let node = node.clone();
            let group = group.clone();
            async move {
                if done {
                    return None;
                }
                let r = out.recv().await?;
                let canceled = r.canceled;
                if canceled && r.compact_revision.get() == 0 {
                    return Some((
                        Err(Status::internal(format!("watch cancelled: {}", r.cancel_reason))),
                        (out, tx, true),
                    ));
                }
                let msg = pb::WatchResponse {
                    header: header(node.header(&group), r.revision.get()),
                    created: r.created,
                    compact_revision: rev_out(r.compact_revision.get()),
                    events: r.events.into_iter().map(event_out).collect(),
                };
                Some((Ok(msg), (out, tx, canceled)))
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
