//! The follower side's client of the leader cluster: a list of
//! replication endpoints, tried in turn, for forwarded writes.

use std::sync::Mutex;
use std::time::Duration;

use armada_core::command::TableReply;
use armada_core::lease::{LeaseAnswer, LeaseQuery};
use armada_core::TableCommand;
use armada_proto::replication as pb;

use super::MESSAGE_BYTES_MAX;
use crate::node::Upstream;
use crate::types::ApiError;

/// The channel to the leader cluster: with the follower's token on every
/// call in the real runtime (the simulated world configures none).
#[cfg(not(madsim))]
pub type UpChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, crate::tools::cli::Bearer>;
#[cfg(madsim)]
pub type UpChannel = tonic::transport::Channel;
/// A replication client of the leader cluster.
pub type UpClient = pb::replication_client::ReplicationClient<UpChannel>;

/// The leader cluster as a follower reaches it: a list of replication
/// endpoints (`http://host:port`), tried in turn.
pub struct UpstreamClient {
    endpoints: Vec<String>,
    next: Mutex<usize>,
    timeout: Duration,
    #[cfg(not(madsim))]
    tls: Option<std::sync::Arc<crate::tls::ClientTlsSource>>,
    #[cfg(not(madsim))]
    token: Option<std::sync::Arc<crate::auth::TokenSource>>,
}

impl UpstreamClient {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        Self {
            endpoints,
            next: Mutex::new(0),
            timeout,
            #[cfg(not(madsim))]
            tls: None,
            #[cfg(not(madsim))]
            token: None,
        }
    }

    /// Sends `token` with every call.
    #[cfg(not(madsim))]
    pub fn with_token(mut self, token: Option<std::sync::Arc<crate::auth::TokenSource>>) -> Self {
        self.token = token;
        self
    }

    /// Connects with TLS (`https://` endpoints).
    #[cfg(not(madsim))]
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<crate::tls::ClientTlsSource>>) -> Self {
        self.tls = tls;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client for the current endpoint; `rotate` moves to the next first.
    pub(super) async fn client(&self, rotate: bool) -> Result<UpClient, String> {
        let ep = {
            let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
            if rotate {
                *n = (*n + 1) % self.endpoints.len().max(1);
            }
            self.endpoints.get(*n).cloned().ok_or("no leader cluster address configured")?
        };
        #[cfg(not(madsim))]
        let endpoint = crate::listen::endpoint(&ep)?;
        // The simulated network has no socket options.
        #[cfg(madsim)]
        let endpoint = tonic::transport::Endpoint::from_shared(ep.clone())
            .map_err(|e| format!("{ep}: {e}"))?
            .connect_timeout(Duration::from_secs(1));
        let endpoint = endpoint.timeout(self.timeout);
        #[cfg(not(madsim))]
        let ch = {
            let tls = self.tls.as_ref().map(|t| {
                t.reload_if_changed();
                t.get()
            });
            crate::listen::connect(endpoint, tls)
                .await
                .map_err(|e| format!("{ep}: {}", crate::listen::error_chain(&e)))?
        };
        #[cfg(madsim)]
        let ch = endpoint.connect().await.map_err(|e| format!("{ep}: {e}"))?;
        #[cfg(not(madsim))]
        let ch = {
            let token = self.token.as_ref().map(|t| {
                t.refresh();
                t.current()
            });
            let bearer = crate::tools::cli::Bearer::new(token.as_deref());
            tonic::service::interceptor::InterceptedService::new(ch, bearer)
        };
        Ok(UpClient::new(ch).max_decoding_message_size(MESSAGE_BYTES_MAX).max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}

impl UpstreamClient {
    /// A client of the first endpoint that connects, trying each once from
    /// the current one (nothing was sent to those that did not).
    async fn connected(&self) -> Result<UpClient, ApiError> {
        let mut last = String::new();
        for attempt in 0..self.endpoints.len().max(1) {
            match self.client(attempt > 0).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(ApiError::Unavailable(format!("cannot reach the leader cluster: {last}")))
    }
}

/// The leader cluster's answer (`answer`), or its error when `error` is set.
fn answer<T: serde::de::DeserializeOwned>(answer: &[u8], error: &[u8], what: &str) -> Result<T, ApiError> {
    if !error.is_empty() {
        let (e, _): (crate::node::wire::RemoteError, u8) = crate::node::wire::decode_payload(error)
            .map_err(|e| ApiError::Internal(format!("malformed error from the leader cluster: {e}")))?;
        return Err(e.into());
    }
    crate::node::wire::decode_payload(answer)
        .map(|(r, _)| r)
        .map_err(|e| ApiError::Internal(format!("malformed {what} from the leader cluster: {e}")))
}

#[tonic::async_trait]
impl Upstream for UpstreamClient {
    async fn write(&self, table: &str, cmd: TableCommand) -> Result<TableReply, ApiError> {
        let command = crate::node::wire::encode_payload(&cmd, crate::node::wire::WIRE_FORMAT);
        let resp = self
            .connected()
            .await?
            .write(pb::WriteRequest { table: table.to_string(), command })
            .await
            .map_err(|s| ApiError::Indeterminate(format!("write sent to the leader cluster: {}", s.message())))?
            .into_inner();
        answer(&resp.reply, &resp.error, "reply")
    }

    async fn lease(&self, table: &str, query: LeaseQuery) -> Result<LeaseAnswer, ApiError> {
        let query = crate::node::wire::encode_payload(&query, crate::node::wire::WIRE_FORMAT);
        // A lease query changes nothing the client cannot retry (a
        // keep-alive renews at most once more): a failure is unavailability.
        let resp = self
            .connected()
            .await?
            .lease(pb::LeaseQueryRequest { table: table.to_string(), query })
            .await
            .map_err(|s| ApiError::Unavailable(format!("lease request sent to the leader cluster: {}", s.message())))?
            .into_inner();
        answer(&resp.answer, &resp.error, "answer")
    }
}
