//! Every TCP listener and every outbound gRPC channel of a node, made in one
//! place so that each carries the same socket options.
//!
//! Why this exists: gRPC answers are small writes, and a socket without
//! `TCP_NODELAY` holds a small write back until the previous one is
//! acknowledged (Nagle's algorithm) while the peer delays its
//! acknowledgement (delayed ACK, 40 ms on Linux). Listeners served through
//! `serve_with_incoming` get no socket options from tonic, so every etcd
//! request and every change-stream message used to wait about 40 ms: etcd's
//! benchmark tool measured 27 puts/s at one client. Every accepted socket
//! here gets `TCP_NODELAY`, and each listener counts the sockets on which
//! the option reads back as set, so a test can check it without timing.
//!
//! What this module does not do: TLS, Unix sockets and connection limits
//! belong to the security issue and will be added here, in one place.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The listeners of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListenerKind {
    /// armada.v1 gRPC API.
    Api,
    /// etcd v3 gRPC API.
    Etcd,
    /// Replication API for follower clusters (leader cluster nodes only).
    Replication,
    /// HTTP: health, readiness, metrics.
    Http,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Api => "api",
            ListenerKind::Etcd => "etcd",
            ListenerKind::Replication => "replication",
            ListenerKind::Http => "http",
        }
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    accepted: AtomicU64,
    nodelay: AtomicU64,
}

impl ListenerStats {
    /// Connections accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Accepted connections whose `TCP_NODELAY` read back as set.
    pub fn with_nodelay(&self) -> u64 {
        self.nodelay.load(Ordering::Relaxed)
    }
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding the {} address {addr}: {source}", kind.name())]
pub struct BindError {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A bound TCP listener whose accepted sockets carry `TCP_NODELAY`.
pub struct Listener {
    kind: ListenerKind,
    inner: TcpListener,
    stats: Arc<ListenerStats>,
}

/// Pause after an accept error that is not about one connection (out of
/// file descriptors, say), so the accept loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds `addr` for `kind` (port 0 picks a free port; see
/// [`Listener::local_addr`]).
pub async fn bind(kind: ListenerKind, addr: SocketAddr) -> Result<Listener, BindError> {
    let inner = TcpListener::bind(addr).await.map_err(|source| BindError { kind, addr, source })?;
    Ok(Listener { kind, inner, stats: Arc::new(ListenerStats::default()) })
}

impl Listener {
    pub fn kind(&self) -> ListenerKind {
        self.kind
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr().expect("a bound TCP listener has a local address")
    }

    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    /// The next connection, configured. Errors about one connection are
    /// skipped; others pause briefly and are logged.
    pub async fn accept(&self) -> (TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    configure(self.kind, &stream, &self.stats);
                    return (stream, peer);
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    warn!(listener = self.kind.name(), "accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    /// Accepted connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_incoming(self) -> impl futures::Stream<Item = io::Result<TcpStream>> + Send + 'static {
        futures::stream::unfold(self, |l| async move {
            let (stream, _) = l.accept().await;
            Some((Ok(stream), l))
        })
    }
}

impl axum::serve::Listener for Listener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl std::future::Future<Output = (Self::Io, Self::Addr)> + Send {
        Listener::accept(self)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn configure(kind: ListenerKind, stream: &TcpStream, stats: &ListenerStats) {
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = stream.set_nodelay(true) {
        warn!(listener = kind.name(), "cannot set TCP_NODELAY: {e}");
    }
    if stream.nodelay().unwrap_or(false) {
        stats.nodelay.fetch_add(1, Ordering::Relaxed);
    }
}

/// Errors that concern one connection only (the peer gave up before the
/// accept completed); the listener itself is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// An outbound gRPC endpoint with the node's socket options: `TCP_NODELAY`
/// (tonic's default today, set explicitly so that a change of default
/// cannot bring the 40 ms delay back) and a connect timeout.
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, String> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|e| format!("{url}: {e}"))?;
    Ok(ep.tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT))
}

/// How long dialling a gRPC endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_carry_nodelay() {
        let l = bind(ListenerKind::Etcd, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let stats = l.stats();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server_side, _) = l.accept().await;
        let _client = client.await.unwrap();
        assert!(server_side.nodelay().unwrap(), "accepted socket without TCP_NODELAY");
        assert_eq!((stats.accepted(), stats.with_nodelay()), (1, 1));
    }

    #[test]
    fn dialled_endpoints_carry_nodelay() {
        let ep = endpoint("http://127.0.0.1:1").unwrap();
        assert!(ep.get_tcp_nodelay());
        assert!(endpoint("not a url\n").is_err());
    }
}
