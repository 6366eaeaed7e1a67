//! Transport between the nodes of one Armada cluster: a request/response
//! byte pipe that carries Raft traffic for every group of a node.
//!
//! What this crate does not do: it does not interpret the bytes (the node
//! runtime in `armada-server` encodes Raft messages and multiplexes groups),
//! it does not retry (openraft retries with its own backoff), and it never
//! touches storage. Implementations: [`sim::SimTransport`] over madsim's
//! simulated network (only under `--cfg madsim`), [`local::LocalTransport`]
//! in-process for plain tests; QUIC (quinn) follows with the production
//! runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub mod local;
#[cfg(not(madsim))]
pub mod quic;
#[cfg(madsim)]
pub mod sim;
pub mod time;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Most requests one transport lets be in flight at once; further calls wait
/// for a slot, so a slow peer cannot make a node buffer without bound.
pub const CALLS_IN_FLIGHT_MAX: usize = 256;

/// Largest request or response carried, in bytes (a full Raft snapshot of a
/// table travels as one message until chunked snapshots arrive).
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("no response from {addr} within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
    #[error("message of {len} bytes exceeds the limit of {MESSAGE_BYTES_MAX}")]
    TooLarge { len: usize },
}

/// Refuses a request over [`MESSAGE_BYTES_MAX`]; every transport calls it
/// first.
pub fn check_message_size(request: &[u8]) -> Result<(), TransportError> {
    if request.len() > MESSAGE_BYTES_MAX {
        return Err(TransportError::TooLarge { len: request.len() });
    }
    Ok(())
}

/// The client side: one call, one response, with a deadline.
pub trait Transport: Send + Sync + 'static {
    fn call(&self, target: &str, request: Vec<u8>, timeout: Duration)
        -> BoxFuture<'_, Result<Vec<u8>, TransportError>>;
}

/// The server side: turns a request into a response, or into no response
/// at all (`None`: the caller sees a timeout or an error, as for a lost
/// packet; used to ignore duplicate deliveries). Must not panic on any
/// input: bytes from a peer are untrusted.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Option<Vec<u8>>>;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        (**self).call(target, request, timeout)
    }
}
