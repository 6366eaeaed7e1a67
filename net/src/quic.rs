//! QUIC transport (quinn) between the nodes of a cluster, for the production
//! runtime (not compiled under `--cfg madsim`, where quinn has no runtime).
//!
//! One endpoint per node both serves and dials. Each call opens its own
//! bidirectional stream on a cached connection to the peer, so the Raft
//! groups multiplexed over it never block one another. A request is the
//! stream's bytes up to FIN; so is the response. Connections that fail are
//! dropped from the cache and re-dialled, no sooner than [`RECONNECT_BACKOFF`]
//! after the failure, so an unreachable peer costs a fast error, not a stall.
//!
//! Security: with [`ClusterTls`] (built by the server crate from a cluster
//! CA and the node's certificate), every connection is mutual TLS: a node
//! accepts only peers presenting a certificate the cluster CA issued, and
//! dials only peers whose certificate it issued; a node without one cannot
//! join, vote or read. [`QuicTransport::set_tls`] swaps the certificates
//! for new connections (rotation without restart). Without it, the node
//! generates a self-signed certificate and dials peers without verifying
//! theirs, so a local dev cluster just works; that authenticates nobody
//! (traffic is encrypted, but anyone can connect).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use tokio::sync::Semaphore;

use crate::{BoxFuture, Handler, Transport, TransportError, CALLS_IN_FLIGHT_MAX, MESSAGE_BYTES_MAX};

/// Least time between two dials of a peer whose connection failed.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// Longest time a dial may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with no traffic (keep-alives included) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests a node serves at once over all connections; more wait.
pub const SERVE_STREAMS_MAX: usize = 1024;
const SERVER_NAME: &str = "armada";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicSetupError {
    #[error("generating a self-signed certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Accepts any server certificate: the dev-mode default (see the module docs).
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The development default: a fresh self-signed certificate, no client
/// certificates, any server accepted.
fn self_signed() -> Result<ClusterTls, QuicSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| QuicSetupError::Certificate(e.to_string()))?;
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicSetupError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicSetupError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    Ok(ClusterTls { server, client })
}

/// quinn's server and client configurations over `tls`, with the
/// transport's limits and timers.
fn quic_configs(tls: ClusterTls) -> Result<(quinn::ServerConfig, quinn::ClientConfig), QuicSetupError> {
    let server_quic = QuicServerConfig::try_from(tls.server).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams((SERVE_STREAMS_MAX as u32).into());
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    // A silent peer's connection dies after this, not quinn's 30 s default.
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("a few seconds fit a QUIC idle timeout")));
    let transport = Arc::new(transport);
    server_config.transport_config(transport.clone());
    let client_quic = QuicClientConfig::try_from(tls.client).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_quic));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

/// Mutual TLS between the nodes of a cluster (TLS 1.3, as QUIC requires):
/// the server side must demand client certificates, the client side must
/// verify servers and present the node's certificate.
#[derive(Clone)]
pub struct ClusterTls {
    pub server: rustls::ServerConfig,
    pub client: rustls::ClientConfig,
}

struct Peer {
    conn: Option<Connection>,
    failed_at: Option<Instant>,
}

pub struct QuicTransport {
    endpoint: Endpoint,
    peers: Mutex<BTreeMap<String, Peer>>,
    slots: Semaphore,
    /// Set by [`QuicTransport::set_tls`]: the client side for new dials.
    client: Mutex<Option<quinn::ClientConfig>>,
}

impl QuicTransport {
    /// Binds a node's endpoint on `addr` with a fresh self-signed certificate
    /// (no peer authentication; see the module docs).
    pub fn bind(addr: SocketAddr) -> Result<Arc<Self>, QuicSetupError> {
        Self::bind_with(addr, None)
    }

    /// Binds a node's endpoint on `addr`, with mutual TLS when `tls` is
    /// given.
    pub fn bind_with(addr: SocketAddr, tls: Option<ClusterTls>) -> Result<Arc<Self>, QuicSetupError> {
        let tls = match tls {
            Some(t) => t,
            None => self_signed()?,
        };
        let (server_config, client_config) = quic_configs(tls)?;
        let mut endpoint =
            Endpoint::server(server_config, addr).map_err(|source| QuicSetupError::Bind { addr, source })?;
        endpoint.set_default_client_config(client_config);
        Ok(Arc::new(Self {
            endpoint,
            peers: Mutex::new(BTreeMap::new()),
            slots: Semaphore::new(CALLS_IN_FLIGHT_MAX),
            client: Mutex::new(None),
        }))
    }

    /// New certificates (a rotation): connections made from now on use
    /// them; established ones keep theirs.
    pub fn set_tls(&self, tls: ClusterTls) -> Result<(), QuicSetupError> {
        let (server_config, client_config) = quic_configs(tls)?;
        self.endpoint.set_server_config(Some(server_config));
        // The endpoint's default client configuration cannot be replaced
        // through a shared reference; dials pass it explicitly instead.
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client_config);
        Ok(())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    async fn connection(&self, target: &str) -> Result<Connection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { addr: target.to_string(), reason };
        {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = peers.get(target) {
                if let Some(c) = &p.conn {
                    if c.close_reason().is_none() {
                        return Ok(c.clone());
                    }
                }
                if p.failed_at.is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF) {
                    return Err(unreachable("recently failed; backing off".into()));
                }
            }
        }
        // A DNS name is resolved at every dial, so a peer that moved (a
        // rescheduled pod with a new IP) is found once its old connection
        // fails.
        let addr = match target.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(target)).await {
                Ok(Ok(mut found)) => match found.next() {
                    Some(a) => a,
                    None => return Err(self.failed(target, unreachable("the name resolves to no address".into()))),
                },
                Ok(Err(e)) => return Err(self.failed(target, unreachable(format!("resolving the name: {e}")))),
                Err(_) => return Err(self.failed(target, unreachable("resolving the name timed out".into()))),
            },
        };
        let dial = async {
            let rotated = self.client.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let connecting = match rotated {
                Some(config) => self.endpoint.connect_with(config, addr, SERVER_NAME),
                None => self.endpoint.connect(addr, SERVER_NAME),
            }
            .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(r) => r,
            Err(_) => Err("connect timed out".to_string()),
        };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(conn) => {
                peers.insert(target.to_string(), Peer { conn: Some(conn.clone()), failed_at: None });
                Ok(conn)
            }
            Err(e) => {
                peers.insert(target.to_string(), Peer { conn: None, failed_at: Some(Instant::now()) });
                Err(unreachable(e))
            }
        }
    }

    /// Records a failed dial of `target` (backing off before the next) and
    /// returns `e`.
    fn failed(&self, target: &str, e: TransportError) -> TransportError {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.insert(target.to_string(), Peer { conn: None, failed_at: Some(Instant::now()) });
        e
    }

    /// Drops `conn` (if it is still this peer's connection) and backs off
    /// before dialling again.
    fn forget(&self, target: &str, conn: &Connection) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let current =
            peers.get(target).and_then(|p| p.conn.as_ref()).is_some_and(|c| c.stable_id() == conn.stable_id());
        if current {
            peers.insert(target.to_string(), Peer { conn: None, failed_at: Some(Instant::now()) });
        }
        conn.close(0u32.into(), b"unresponsive");
    }

    /// Serves `handler` until the endpoint is closed.
    pub async fn serve(self: Arc<Self>, handler: Arc<dyn Handler>) {
        let streams = Arc::new(Semaphore::new(SERVE_STREAMS_MAX));
        while let Some(incoming) = self.endpoint.accept().await {
            let handler = handler.clone();
            let streams = streams.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(permit) = streams.clone().acquire_owned().await else { return };
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let Ok(request) = recv.read_to_end(MESSAGE_BYTES_MAX).await else { return };
                        match handler.handle(request).await {
                            Some(response) => {
                                if send.write_all(&response).await.is_ok() {
                                    let _ = send.finish();
                                }
                            }
                            // Refuse the stream: the caller gets an error at once.
                            None => {
                                let _ = send.reset(0u32.into());
                            }
                        }
                    });
                }
            });
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

impl Transport for QuicTransport {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let target = target.to_string();
        Box::pin(async move {
            crate::check_message_size(&request)?;
            // The deadline covers the whole call, waiting for a slot included.
            // The connection is shared by every group's calls to this peer,
            // so one failed call does not drop it: a stream error ends that
            // call only (a closed connection is redialled by the next call),
            // and a call that times out drops the connection only if nothing
            // at all arrived on it meanwhile (keep-alives are answered every
            // second, so a live peer is never silent that long). Dropping it
            // on every slow call (a snapshot chunk staged during a storage
            // stall) cut every group's heartbeats and broke transfers over
            // and over.
            let used: Mutex<Option<(Connection, u64)>> = Mutex::new(None);
            let exchange = async {
                let _slot = self.slots.acquire().await.map_err(|_| TransportError::Unreachable {
                    addr: target.clone(),
                    reason: "transport closed".into(),
                })?;
                let conn = self.connection(&target).await?;
                *used.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn.clone(), conn.stats().udp_rx.bytes));
                let fail = |e: String| TransportError::Unreachable { addr: target.clone(), reason: e };
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
                send.write_all(&request).await.map_err(|e| fail(e.to_string()))?;
                send.finish().map_err(|e| fail(e.to_string()))?;
                recv.read_to_end(MESSAGE_BYTES_MAX).await.map_err(|e| fail(e.to_string()))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => {
                    // A peer that restarted (same address, new endpoint) may
                    // never answer on the old connection: if the connection
                    // stayed silent for the whole call, drop it and dial
                    // again next time.
                    let used = used.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some((conn, rx_before)) = used {
                        if conn.stats().udp_rx.bytes == rx_before {
                            self.forget(&target, &conn);
                        }
                    }
                    Err(TransportError::Timeout { addr: target.clone(), timeout_ms: timeout.as_millis() as u64 })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Option<Vec<u8>>> {
            Box::pin(async move {
                let mut r = request;
                r.reverse();
                Some(r)
            })
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_round_trip_and_unreachable_peers_fail_fast() {
        let server = QuicTransport::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        tokio::spawn(server.clone().serve(Arc::new(Echo)));
        let client = QuicTransport::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        for i in 0..20u8 {
            let r = client.call(&addr, vec![1, 2, i], Duration::from_secs(5)).await.unwrap();
            assert_eq!(r, vec![i, 2, 1]);
        }
        // Many concurrent calls share one connection without blocking.
        let calls: Vec<_> = (0..50u8).map(|i| client.call(&addr, vec![i; 1000], Duration::from_secs(5))).collect();
        for (i, r) in futures::future::join_all(calls).await.into_iter().enumerate() {
            assert_eq!(r.unwrap(), vec![i as u8; 1000]);
        }
        let dead = client.call("127.0.0.1:1", vec![1], Duration::from_secs(5)).await;
        assert!(matches!(dead, Err(TransportError::Unreachable { .. } | TransportError::Timeout { .. })));
        let bad = client.call("not an address", vec![1], Duration::from_secs(1)).await;
        assert!(matches!(bad, Err(TransportError::Unreachable { .. })));
    }

    /// A peer that restarts on the same address (a new endpoint, as after
    /// kill -9) is reachable again within a few seconds.
    #[tokio::test(flavor = "current_thread")]
    async fn a_restarted_peer_on_the_same_address_is_reached_again() {
        let server = QuicTransport::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.clone().serve(Arc::new(Echo)));
        let client = QuicTransport::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(client.call(&addr.to_string(), vec![1, 2], Duration::from_secs(5)).await.unwrap(), vec![2, 1]);
        // The peer goes away; a new one binds the same address.
        task.abort();
        server.close();
        server.endpoint.wait_idle().await;
        drop(server);
        let rebind_deadline = std::time::Instant::now() + Duration::from_secs(5);
        let server = loop {
            match QuicTransport::bind(addr) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > rebind_deadline => panic!("cannot rebind {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        tokio::spawn(server.clone().serve(Arc::new(Echo)));
        // Calls come faster than the reconnect backoff, as heartbeats do.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut last = None;
        while std::time::Instant::now() < deadline {
            match client.call(&addr.to_string(), vec![3, 4], Duration::from_millis(500)).await {
                Ok(r) => {
                    assert_eq!(r, vec![4, 3]);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(RECONNECT_BACKOFF / 4).await;
        }
        panic!("restarted peer not reached within 15 s: {last:?}");
    }
}
