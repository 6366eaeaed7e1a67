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
//! TLS: a listener given a [`TlsSource`] serves TLS only. Handshakes run
//! in tasks of their own (a slow or silent client never holds up the
//! accept loop) with a deadline; a client that speaks plaintext to a TLS
//! port is told so in its own protocol (an HTTP/2 GOAWAY with
//! `INADEQUATE_SECURITY` and a message, or an HTTP/1 400) and the
//! connection is closed at once, never left hanging.
//!
//! Not here yet: Unix sockets and connection limits (the security issue).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::tls::TlsSource;

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
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    plaintext_refused: AtomicU64,
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

    /// TLS handshakes completed.
    pub fn tls_handshakes(&self) -> u64 {
        self.tls_handshakes.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed (bad or missing client certificate,
    /// protocol errors, timeouts), plaintext clients not counted.
    pub fn tls_failures(&self) -> u64 {
        self.tls_failures.load(Ordering::Relaxed)
    }

    /// Clients that spoke plaintext to a TLS listener.
    pub fn plaintext_refused(&self) -> u64 {
        self.plaintext_refused.load(Ordering::Relaxed)
    }
}

/// A connection accepted by a listener.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

/// How long a client may take to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections completed (handshakes included) waiting for the server.
const READY_QUEUE: usize = 64;

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
    tls: Option<Arc<TlsSource>>,
}

/// Pause after an accept error that is not about one connection (out of
/// file descriptors, say), so the accept loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds `addr` for `kind` (port 0 picks a free port; see
/// [`Listener::local_addr`]).
pub async fn bind(kind: ListenerKind, addr: SocketAddr) -> Result<Listener, BindError> {
    let inner = TcpListener::bind(addr).await.map_err(|source| BindError { kind, addr, source })?;
    Ok(Listener { kind, inner, stats: Arc::new(ListenerStats::default()), tls: None })
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

    /// Serves TLS only, from `source`.
    pub fn with_tls(mut self, source: Arc<TlsSource>) -> Listener {
        self.tls = Some(source);
        self
    }

    /// Whether the listener serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accepts connections (and completes their TLS handshakes) in tasks
    /// of their own for as long as the returned [`Incoming`] is held.
    pub fn into_incoming(self) -> Incoming {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let local = self.local_addr();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    accepted = self.accept() => accepted,
                };
                match &self.tls {
                    None => {
                        if tx.send((Conn::Plain(stream), peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(source) => {
                        let config = source.get();
                        let (tx, kind, stats) = (tx.clone(), self.kind, self.stats.clone());
                        tokio::spawn(async move {
                            if let Some(conn) = handshake(kind, stream, peer, config, &stats).await {
                                let _ = tx.send((conn, peer)).await;
                            }
                        });
                    }
                }
            }
        });
        Incoming { rx, local }
    }
}

/// A listener's accepted connections, ready for the server: a stream for
/// tonic's `serve_with_incoming`, and an axum listener.
pub struct Incoming {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

impl futures::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx).map(|c| c.map(|(conn, _)| Ok(conn)))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (it only does when this is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// What a client that spoke plaintext to a TLS port is told.
const TLS_REQUIRED: &str = "this Armada port requires TLS: connect with https:// and the server's CA";

/// Completes the TLS handshake of an accepted connection; `None` when it
/// fails (logged, counted, and the client told when it spoke plaintext).
async fn handshake(
    kind: ListenerKind,
    mut stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    stats: &ListenerStats,
) -> Option<Conn> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return None,
        Err(_) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            debug!(listener = kind.name(), %peer, "TLS: the client sent nothing within the handshake deadline");
            return None;
        }
    }
    // Every TLS connection starts with a handshake record (content type 22).
    if first[0] != 0x16 {
        stats.plaintext_refused.fetch_add(1, Ordering::Relaxed);
        warn!(listener = kind.name(), %peer, "a client spoke plaintext to a TLS listener; refused");
        let answer = if first[0] == b'P' { http2_refusal() } else { http1_refusal() };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return None;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
            Some(Conn::Tls(Box::new(tls)))
        }
        Ok(Err(e)) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            warn!(listener = kind.name(), %peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            warn!(listener = kind.name(), %peer, "TLS handshake not completed within {TLS_HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// An HTTP/2 server preface (empty SETTINGS) then GOAWAY with
/// `INADEQUATE_SECURITY` and [`TLS_REQUIRED`] as its debug data: gRPC
/// clients report it instead of a bare reset.
fn http2_refusal() -> Vec<u8> {
    let frame = |kind: u8, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    };
    let mut goaway = vec![0, 0, 0, 0, 0, 0, 0, 0x0c];
    goaway.extend_from_slice(TLS_REQUIRED.as_bytes());
    let mut out = frame(0x4, &[]);
    out.extend(frame(0x7, &goaway));
    out
}

fn http1_refusal() -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{TLS_REQUIRED}\n",
        TLS_REQUIRED.len() + 1
    )
    .into_bytes()
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

/// An error with its causes, each once (a TLS failure under a transport
/// error is in the source chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// How long dialling a gRPC endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects `ep`: plaintext, or TLS with `tls` (the endpoint's URL then
/// starts with `https://`; the server's certificate must name its host).
pub async fn connect(
    ep: tonic::transport::Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    match tls {
        None => ep.connect().await,
        Some(config) => ep.connect_with_connector(tls_connector(config)).await,
    }
}

/// As [`connect`], connecting on first use.
pub fn connect_lazy(
    ep: tonic::transport::Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> tonic::transport::Channel {
    match tls {
        None => ep.connect_lazy(),
        Some(config) => ep.connect_with_connector_lazy(tls_connector(config)),
    }
}

/// Dials TCP (with `TCP_NODELAY`) and runs the TLS handshake.
fn tls_connector(
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let connector = tokio_rustls::TlsConnector::from(config);
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("{host}: not a server name: {e}")))?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

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
