//! The armada.v1 Tables service: Create, Delete and List (creation and
//! deletion at the leader cluster only).

use armada_proto::v1 as pb;
use armada_proto::v1::tables_server::Tables;
use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::convert::{status, table_out};

#[tonic::async_trait]
impl Tables for Api {
    async fn create(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        self.metrics
            .timed("TablesCreate", async move {
                let t = self.node.create_table(&request.into_inner().name).await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::CreateTableResponse { table: Some(table_out(t)) }))
            })
            .await
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteTableRequest>,
    ) -> Result<Response<pb::DeleteTableResponse>, Status> {
        self.metrics
            .timed("TablesDelete", async move {
                self.node.delete_table(&request.into_inner().name).await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::DeleteTableResponse {}))
            })
            .await
    }

    async fn list(&self, _request: Request<pb::ListTablesRequest>) -> Result<Response<pb::ListTablesResponse>, Status> {
        self.metrics
            .timed("TablesList", async move {
                let t = self.node.list_tables().await.map_err(|e| status(&e))?;
                Ok(Response::new(pb::ListTablesResponse { tables: t.into_iter().map(table_out).collect() }))
            })
            .await
    }
}
