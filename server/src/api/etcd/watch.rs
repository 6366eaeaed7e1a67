//! The etcd Watch service over the etcd table: each client stream is served
//! by [`Node::serve_watch`](crate::node::Node::serve_watch); this module only
//! converts etcd's messages. A request the stream cannot use (an unknown
//! filter, a malformed message) ends the stream with an error, as etcd's
//! server does for a broken stream.

use armada_core::auth::Access;
use armada_core::watch::{EventKind, WatchEvent, WatchResponse, WatchSpec};
use armada_core::Revision;
use armada_proto::etcd as pb;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert::kv_out;
use super::{etcd_status, to_i64, EtcdApi};
use crate::node::watch::WatchInput;

type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Requests queued between the client and its stream's task, and responses
/// between the task and the client (the task's own outbox is the bound that
/// matters; these only decouple the two).
const CHANNEL_DEPTH: usize = 16;

/// An etcd create request as core's watcher spec.
pub fn create_in(c: pb::WatchCreateRequest) -> Result<WatchSpec, Status> {
    use pb::watch_create_request::FilterType;
    let mut spec = WatchSpec {
        watch_id: (c.watch_id != 0).then_some(c.watch_id),
        key: c.key,
        range_end: c.range_end,
        // etcd reads 0 as "from the next revision"; a negative start is
        // read as the oldest revision (answered as compacted once there is
        // a compaction).
        start_revision: match c.start_revision {
            0 => None,
            r => Some(Revision(u64::try_from(r).unwrap_or(1))),
        },
        prev_kv: c.prev_kv,
        progress_notify: c.progress_notify,
        fragment: c.fragment,
        ..WatchSpec::default()
    };
    for f in c.filters {
        match FilterType::try_from(f) {
            Ok(FilterType::Noput) => spec.no_put = true,
            Ok(FilterType::Nodelete) => spec.no_delete = true,
            Err(_) => return Err(Status::invalid_argument(format!("etcdserver: unknown watch filter {f}"))),
        }
    }
    Ok(spec)
}

fn event_out(e: WatchEvent) -> pb::Event {
    let kind = match e.kind {
        EventKind::Put => pb::event::EventType::Put,
        EventKind::Delete => pb::event::EventType::Delete,
    };
    pb::Event { r#type: kind as i32, kv: Some(kv_out(e.kv)), prev_kv: e.prev_kv.map(kv_out) }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for EtcdApi {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let group = self.node.table_group(&self.table).await.map_err(|e| etcd_status(&e))?;
        // The stream's token is checked again at every create (it may have
        // expired, the user's permissions may have changed), as etcd does.
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (in_tx, in_rx) = mpsc::channel::<WatchInput>(CHANNEL_DEPTH);
        let (out_tx, out_rx) = mpsc::channel::<WatchResponse>(CHANNEL_DEPTH);
        let (err_tx, err_rx) = mpsc::channel::<Status>(1);
        let (denied_tx, denied_rx) = mpsc::channel::<String>(CHANNEL_DEPTH);
        let api = std::sync::Arc::new(self.clone());
        let checker = api.clone();
        let node = self.node.clone();
        let id = group.id;
        tokio::spawn(async move { node.serve_watch(id, in_rx, out_tx).await });
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                use pb::watch_request::RequestUnion;
                let input = match msg.map(|m| m.request_union) {
                    Ok(Some(RequestUnion::CreateRequest(c))) => match create_in(c) {
                        Ok(spec) => {
                            let permitted = checker
                                .caller_from(&metadata)
                                .and_then(|who| who.check(Access::Read, &spec.key, &spec.range_end));
                            if let Err(s) = permitted {
                                // etcd answers a refused create on the
                                // stream (created and canceled, with the
                                // reason) and keeps the stream open.
                                if denied_tx.send(s.message().to_string()).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            WatchInput::Create(spec)
                        }
                        Err(s) => {
                            let _ = err_tx.send(s).await;
                            return;
                        }
                    },
                    Ok(Some(RequestUnion::CancelRequest(c))) => WatchInput::Cancel(c.watch_id),
                    Ok(Some(RequestUnion::ProgressRequest(_))) => WatchInput::Progress,
                    // etcd ignores a request with nothing in it.
                    Ok(None) => continue,
                    Err(_) => return,
                };
                if in_tx.send(input).await.is_err() {
                    return;
                }
            }
        });
        // Shared by every response of the stream (an `EtcdApi` holds strings).
        let state = (out_rx, err_rx, denied_rx, group);
        let responses = futures::stream::unfold(state, move |(mut out, mut err, mut denied, group)| {
            let api = api.clone();
            async move {
                tokio::select! {
                    biased;
                    Some(s) = err.recv() => Some((Err(s), (out, err, denied, group))),
                    Some(reason) = denied.recv() => {
                        let h = api.node.header(&group);
                        let msg = pb::WatchResponse {
                            header: api.header(h, api.node.table_revision(group.id).get()),
                            watch_id: -1,
                            created: true,
                            canceled: true,
                            cancel_reason: reason,
                            ..Default::default()
                        };
                        Some((Ok(msg), (out, err, denied, group)))
                    }
                    r = out.recv() => {
                        let r = r?;
                        let h = api.node.header(&group);
                        let msg = pb::WatchResponse {
                            header: api.header(h, r.revision.get()),
                            watch_id: r.watch_id,
                            created: r.created,
                            canceled: r.canceled,
                            compact_revision: to_i64(r.compact_revision.get()),
                            cancel_reason: r.cancel_reason,
                            fragment: r.fragment,
                            events: r.events.into_iter().map(event_out).collect(),
                        };
                        Some((Ok(msg), (out, err, denied, group)))
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
