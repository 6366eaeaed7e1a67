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
//! Unix sockets: the armada.v1 and etcd listeners may also accept on a Unix
//! socket (`unix:///path`, plaintext; `unixs:///path`, TLS with the
//! listener's certificate), served by the same server as their TCP port.
//! Access to a plaintext socket is governed by the file's permissions
//! (created `0660`). Outbound, [`connect`] dials `unix://` and `unixs://`
//! endpoints too.
//!
//! Not here yet: connection limits (the security issue).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub use crate::config::UnixSocketSpec;
pub use crate::limits::{ConnInfo, TOO_MANY_CONNECTIONS};
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
    unix_accepted: AtomicU64,
    connections_refused: AtomicU64,
}

impl ListenerStats {
    /// Connections refused because the listener held its maximum.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Connections accepted on the listener's Unix socket (also counted in
    /// [`ListenerStats::accepted`]).
    pub fn unix_accepted(&self) -> u64 {
        self.unix_accepted.load(Ordering::Relaxed)
    }

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

/// A connected byte stream: TCP or a Unix socket.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixConn),
}

/// A Unix socket stream that can give back the first byte it read (tokio's
/// Unix streams cannot peek).
pub struct UnixConn {
    stream: UnixStream,
    /// A byte read ahead, returned by the next read.
    pending: Option<u8>,
}

impl UnixConn {
    fn new(stream: UnixStream) -> UnixConn {
        UnixConn { stream, pending: None }
    }
}

impl Socket {
    /// The first byte the peer sent, without consuming it.
    async fn peek_first(&mut self) -> io::Result<Option<u8>> {
        match self {
            Socket::Tcp(s) => {
                let mut first = [0u8; 1];
                Ok((s.peek(&mut first).await? == 1).then_some(first[0]))
            }
            Socket::Unix(u) => {
                if u.pending.is_none() {
                    let mut first = [0u8; 1];
                    if tokio::io::AsyncReadExt::read(&mut u.stream, &mut first).await? == 1 {
                        u.pending = Some(first[0]);
                    }
                }
                Ok(u.pending)
            }
        }
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(b) = this.pending {
            if buf.remaining() > 0 {
                buf.put_slice(&[b]);
                this.pending = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

macro_rules! on_socket {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Socket::Tcp($s) => $e,
            Socket::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_socket!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_socket!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_socket!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A connection accepted by a listener, holding its place under the
/// listener's connection limit until it closes.
pub struct Conn {
    io: ConnIo,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Admitted past the listener's limit only to be told so: every call
    /// is answered `RESOURCE_EXHAUSTED`, and the connection ends (reads see
    /// the end of the stream) at this deadline.
    over_limit: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Until the client's first bytes arrive: when it sends nothing by
    /// then, the connection ends (a client holding connections it never
    /// uses does not keep them).
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a connection past the limit lives to receive its refusals.
const OVER_LIMIT_GRACE: Duration = Duration::from_secs(1);

enum ConnIo {
    Plain(Socket),
    Tls(Box<tokio_rustls::server::TlsStream<Socket>>),
}

impl Conn {
    fn socket(&self) -> &Socket {
        match &self.io {
            ConnIo::Plain(s) => s,
            ConnIo::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.over_limit {
            if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                // The end of the stream: the server closes the connection.
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        let read = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(deadline) = &mut this.silent_until {
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.silent_until = None,
                Poll::Pending if std::future::Future::poll(deadline.as_mut(), cx).is_ready() => {
                    // Nothing from the client since it connected: the end of
                    // the stream, and the server closes the connection.
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let remote_addr = match self.socket() {
            Socket::Tcp(s) => s.peer_addr().ok(),
            // A Unix socket's peer has no IP address.
            Socket::Unix(_) => None,
        };
        ConnInfo { remote_addr, over_limit: self.over_limit.is_some() }
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
    pub addr: String,
    #[source]
    pub source: io::Error,
}

/// A bound TCP listener whose accepted sockets carry `TCP_NODELAY`.
pub struct Listener {
    kind: ListenerKind,
    inner: TcpListener,
    stats: Arc<ListenerStats>,
    tls: Option<Arc<TlsSource>>,
    /// A Unix socket served alongside (see [`Listener::with_unix_socket`]).
    unix: Option<(UnixListener, UnixSocketSpec)>,
    /// Connections held at once, the TCP port's and the socket's together.
    max_connections: Option<usize>,
    /// A plaintext connection that sends nothing for this long after the
    /// accept is closed (TLS ones: the handshake deadline).
    first_bytes_timeout: Option<Duration>,
}

/// Pause after an accept error that is not about one connection (out of
/// file descriptors, say), so the accept loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds `addr` for `kind` (port 0 picks a free port; see
/// [`Listener::local_addr`]).
pub async fn bind(kind: ListenerKind, addr: SocketAddr) -> Result<Listener, BindError> {
    let inner = TcpListener::bind(addr).await.map_err(|source| BindError { kind, addr: addr.to_string(), source })?;
    Ok(Listener {
        kind,
        inner,
        stats: Arc::new(ListenerStats::default()),
        tls: None,
        unix: None,
        max_connections: None,
        first_bytes_timeout: None,
    })
}

/// The next connection of `inner`, configured. Errors about one connection
/// are skipped; others pause briefly and are logged.
async fn accept_tcp(inner: &TcpListener, kind: ListenerKind, stats: &ListenerStats) -> (TcpStream, SocketAddr) {
    loop {
        match inner.accept().await {
            Ok((stream, peer)) => {
                configure(kind, &stream, stats);
                return (stream, peer);
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                warn!(listener = kind.name(), "accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Binds a Unix socket at `path`: a socket file left by an earlier run is
/// replaced; any other file there is an error. The socket is made `0660`
/// (owner and group): on a plaintext socket the file's permissions are the
/// access control.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
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
        accept_tcp(&self.inner, self.kind, &self.stats).await
    }

    /// Also accepts on the Unix socket `spec` (TLS needs [`Listener::with_tls`]
    /// first: the socket uses the listener's certificate).
    pub fn with_unix_socket(mut self, spec: UnixSocketSpec) -> Result<Listener, BindError> {
        let addr = spec.to_string();
        if spec.tls && self.tls.is_none() {
            return Err(BindError {
                kind: self.kind,
                addr,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unixs:// serves TLS with the listener's certificate: configure its TLS too",
                ),
            });
        }
        let l = bind_unix(&spec.path).map_err(|source| BindError { kind: self.kind, addr, source })?;
        self.unix = Some((l, spec));
        Ok(self)
    }

    /// Holds at most `n` connections at once (TCP and Unix socket together);
    /// past it new ones are refused ("too many connections").
    pub fn with_max_connections(mut self, n: usize) -> Listener {
        self.max_connections = Some(n);
        self
    }

    /// Closes a plaintext connection that sends nothing within `t` of being
    /// accepted.
    pub fn with_first_bytes_timeout(mut self, t: Duration) -> Listener {
        self.first_bytes_timeout = Some(t);
        self
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
    /// of their own for as long as the returned [`Incoming`] is held: from
    /// the TCP port and, if there is one, the Unix socket.
    pub fn into_incoming(self) -> Incoming {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let local = self.local_addr();
        let Listener { kind, inner, stats, tls, unix, max_connections, first_bytes_timeout } = self;
        let slots = max_connections.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        // An eighth of the limit (at least 16) more, each for a second.
        let grace = max_connections.map(|n| Arc::new(tokio::sync::Semaphore::new((n / 8).max(16))));
        if let Some((unix, spec)) = unix {
            let shared = Shared {
                stats: stats.clone(),
                tls: if spec.tls { tls.clone() } else { None },
                slots: slots.clone(),
                grace: grace.clone(),
                first_bytes_timeout,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                // A Unix peer has no address: connections carry this one.
                let peer = SocketAddr::from(([0, 0, 0, 0], 0));
                loop {
                    let stream = tokio::select! {
                        biased;
                        _ = tx.closed() => break,
                        accepted = unix.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(e) => {
                                warn!(listener = kind.name(), socket = %spec, "accept failed: {e}");
                                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                                continue;
                            }
                        },
                    };
                    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    shared.stats.unix_accepted.fetch_add(1, Ordering::Relaxed);
                    if !dispatch(kind, Socket::Unix(UnixConn::new(stream)), peer, &shared, &tx).await {
                        break;
                    }
                }
                // The socket file goes with the listener.
                let _ = std::fs::remove_file(&spec.path);
            });
        }
        let shared = Shared { stats, tls, slots, grace, first_bytes_timeout };
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    accepted = accept_tcp(&inner, kind, &shared.stats) => accepted,
                };
                if !dispatch(kind, Socket::Tcp(stream), peer, &shared, &tx).await {
                    return;
                }
            }
        });
        Incoming { rx, local }
    }
}

type Ready = mpsc::Sender<(Conn, SocketAddr)>;

/// Hands an accepted socket to the server: at once without TLS, after a
/// handshake in a task of its own with it. Past the listener's connection
/// limit, a few connections more are served briefly so that their calls are
/// told why in gRPC terms (`RESOURCE_EXHAUSTED`); past those, a connection
/// is refused at once. `false` once the server is gone.
async fn dispatch(kind: ListenerKind, mut socket: Socket, peer: SocketAddr, shared: &Shared, tx: &Ready) -> bool {
    let (slot, over_limit) = match &shared.slots {
        None => (None, None),
        Some(slots) => match slots.clone().try_acquire_owned() {
            Ok(p) => (Some(p), None),
            Err(_) => {
                shared.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                match shared.grace.as_ref().and_then(|g| g.clone().try_acquire_owned().ok()) {
                    Some(p) => (Some(p), Some(Box::pin(tokio::time::sleep(OVER_LIMIT_GRACE)))),
                    None => {
                        debug!(listener = kind.name(), %peer, "connection refused: too many connections");
                        // Told in HTTP/2 when it speaks plaintext; a TLS
                        // client cannot read anything before a handshake.
                        if shared.tls.is_none() {
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                    let _ = socket.write_all(&http2_goaway(0x0b, TOO_MANY_CONNECTIONS)).await;
                                    let _ = socket.shutdown().await;
                                })
                                .await;
                            });
                        }
                        return !tx.is_closed();
                    }
                }
            }
        },
    };
    match &shared.tls {
        None => {
            let silent_until = shared.first_bytes_timeout.map(|t| Box::pin(tokio::time::sleep(t)));
            tx.send((Conn { io: ConnIo::Plain(socket), _slot: slot, over_limit, silent_until }, peer)).await.is_ok()
        }
        Some(source) => {
            let config = source.get();
            let (tx, stats) = (tx.clone(), shared.stats.clone());
            tokio::spawn(async move {
                if let Some(io) = handshake(kind, socket, peer, config, &stats).await {
                    // The handshake proved the client talks (its deadline
                    // covered the silence).
                    let _ = tx.send((Conn { io, _slot: slot, over_limit, silent_until: None }, peer)).await;
                }
            });
            true
        }
    }
}

/// What both accept loops of a listener share.
struct Shared {
    stats: Arc<ListenerStats>,
    tls: Option<Arc<TlsSource>>,
    /// One permit per connection the listener may hold (none: no limit).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Connections past the limit served briefly to be told so.
    grace: Option<Arc<tokio::sync::Semaphore>>,
    /// How long a plaintext connection may stay silent after the accept.
    first_bytes_timeout: Option<Duration>,
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
    mut stream: Socket,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    stats: &ListenerStats,
) -> Option<ConnIo> {
    let first = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek_first()).await {
        Ok(Ok(Some(b))) => b,
        Ok(_) => return None,
        Err(_) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            debug!(listener = kind.name(), %peer, "TLS: the client sent nothing within the handshake deadline");
            return None;
        }
    };
    // Every TLS connection starts with a handshake record (content type 22).
    if first != 0x16 {
        stats.plaintext_refused.fetch_add(1, Ordering::Relaxed);
        warn!(listener = kind.name(), %peer, "a client spoke plaintext to a TLS listener; refused");
        let answer = if first == b'P' { http2_refusal() } else { http1_refusal() };
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
            Some(ConnIo::Tls(Box::new(tls)))
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
    http2_goaway(0x0c, TLS_REQUIRED)
}

/// An HTTP/2 server preface (empty SETTINGS) then GOAWAY with `code` and
/// `message` as its debug data.
fn http2_goaway(code: u8, message: &str) -> Vec<u8> {
    let frame = |kind: u8, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    };
    let mut goaway = vec![0, 0, 0, 0, 0, 0, 0, code];
    goaway.extend_from_slice(message.as_bytes());
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

/// Connects to `url`: `http://` or `https://` as [`connect`] does, or a
/// Unix socket: `unix:///path` (plaintext) or `unixs:///path` (TLS with
/// `tls`; the server's certificate must name `localhost`).
pub async fn connect_url(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    if !url.starts_with("unix") {
        let ep = endpoint(url)?.connect_timeout(timeout);
        return connect(ep, tls).await.map_err(|e| error_chain(&e));
    }
    let spec = UnixSocketSpec::parse(url)?;
    // The URI only names the server for TLS and HTTP/2; the connector
    // dials the socket whatever it says.
    let ep = endpoint(if spec.tls { "https://localhost" } else { "http://localhost" })?.connect_timeout(timeout);
    let path = spec.path.clone();
    let config = match (spec.tls, tls) {
        (true, Some(c)) => Some(c),
        (true, None) => return Err(format!("{url}: TLS over a Unix socket needs the server's CA")),
        (false, _) => None,
    };
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (path, config) = (path.clone(), config.clone());
        async move {
            let stream = UnixStream::connect(&path).await?;
            let io: Box<dyn IoStream> = match config {
                None => Box::new(stream),
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost")
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                    Box::new(tokio_rustls::TlsConnector::from(config).connect(name, stream).await?)
                }
            };
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    });
    ep.connect_with_connector(connector).await.map_err(|e| format!("{url}: {}", error_chain(&e)))
}

/// A client byte stream of either kind (plain or TLS) behind one type.
trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

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

    /// A client that says nothing after connecting is cut off at the first
    /// bytes deadline; one that speaks is not.
    #[tokio::test]
    async fn a_silent_connection_ends_at_its_first_bytes_deadline() {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;
        let l = bind(ListenerKind::Etcd, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let mut incoming = l.with_first_bytes_timeout(Duration::from_millis(200)).into_incoming();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let n =
            tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await.expect("cut off in time").unwrap();
        assert_eq!(n, 0, "the silent connection ends");
        let mut talker = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"P").await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        // Past the deadline, a connection that spoke stays open.
        tokio::time::sleep(Duration::from_millis(400)).await;
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"RI").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
    }

    #[test]
    fn dialled_endpoints_carry_nodelay() {
        let ep = endpoint("http://127.0.0.1:1").unwrap();
        assert!(ep.get_tcp_nodelay());
        assert!(endpoint("not a url\n").is_err());
    }
}
