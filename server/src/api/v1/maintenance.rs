//! The armada.v1 Maintenance service: Backup of one table, streamed.

use armada_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::convert::status;

type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for Api {
    type BackupStream = BackupStream;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<BackupStream>, Status> {
        let table = request.into_inner().table;
        let writer = self.node.backup(&table).await.map_err(|e| status(&e))?;
        // The view stays alive with the writer (its reader holds it).
        let stream = futures::stream::unfold(Some(writer), |w| async move {
            let mut w = w?;
            match w.next_block() {
                Ok(Some(data)) => Some((Ok(pb::BackupChunk { data }), Some(w))),
                Ok(None) => None,
                Err(e) => Some((Err(Status::internal(format!("reading the backup image: {e}"))), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
