//! Starting and stopping a production node: storage, the Raft transport,
//! every listener, the node runtime and its services, in one place. The
//! `armada` binary calls [`launch`] and [`Launched::run_until`]; tests call
//! the same functions in-process, so what they check is what ships.
//!
//! Order of start: open storage, bind the Raft transport and every TCP
//! listener (any bind failure stops the start with a clear error, before
//! the node joins its cluster), start the node, serve, and only then tell
//! readiness that the listeners are bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use armada_core::Engine;
use armada_net::quic::QuicTransport;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::assemble::{assemble, Assembled, Parts, Spec};
use crate::config::ServeConfig;
use crate::listen::{self, ListenerKind, ListenerStats};
use crate::node::Node;
use crate::ops::ready::Readiness;
use crate::storage::flusher::RealDisk;
use crate::storage::rocks::RocksEngine;
use crate::tls::TlsSource;

/// How long a stopping node lets in-flight requests and open streams
/// finish before it closes their connections.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub use crate::assemble::Role;

/// A node could not start, or a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    #[error("creating data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("opening storage in {path}: {message}")]
    Storage { path: String, message: String },
    #[error("binding the Raft address {addr}: {message}")]
    Raft { addr: SocketAddr, message: String },
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    #[error("TLS of the {listener} listener: {source}")]
    Tls { listener: &'static str, source: crate::tls::TlsError },
    #[error("starting the node: {0}")]
    Node(String),
    #[error("the {0} server failed: {1}")]
    Server(&'static str, String),
    #[error("final sync of storage: {0}")]
    Sync(String),
    /// The node stopped on a storage failure (see `Node::fail`); restart it.
    #[error("stopped: {0}")]
    Failed(String),
}

/// A running node and everything that serves it.
pub struct Launched {
    pub node: Arc<Node>,
    pub readiness: Arc<Readiness>,
    listeners: BTreeMap<ListenerKind, (SocketAddr, Arc<ListenerStats>)>,
    engine: Arc<dyn Engine>,
    transport: Arc<QuicTransport>,
    raft_server: JoinHandle<()>,
    /// gRPC and HTTP servers, each stopping gracefully when `stop` is set.
    servers: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    stop: watch::Sender<bool>,
    ensure_table: Option<JoinHandle<()>>,
    _follower: Option<Arc<crate::replication::Follower>>,
    /// How long a stopping node hands its groups over before it stops.
    drain_timeout: Duration,
}

/// Starts a node as `cfg` says. Returns once every listener serves; the
/// node may still be electing leaders (see [`Readiness`]).
pub async fn launch(cfg: &ServeConfig, role: Role) -> Result<Launched, LaunchError> {
    let dir = cfg.data_dir.display().to_string();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| LaunchError::DataDir { path: dir.clone(), source })?;
    let engine: Arc<dyn Engine> = Arc::new(
        RocksEngine::open(&cfg.data_dir.join("db"))
            .map_err(|e| LaunchError::Storage { path: dir.clone(), message: e.to_string() })?,
    );
    let cluster_tls = match &cfg.tls.raft {
        Some(files) => Some(
            crate::tls::cluster_source(files.clone())
                .map_err(|source| LaunchError::Tls { listener: "raft", source })?,
        ),
        None => None,
    };
    let transport = QuicTransport::bind_with(cfg.raft_address, cluster_tls.as_ref().map(|c| (*c.get()).clone()))
        .map_err(|e| LaunchError::Raft { addr: cfg.raft_address, message: e.to_string() })?;
    if let Some(source) = &cluster_tls {
        // New certificates go to the transport for its next connections.
        let transport = Arc::downgrade(&transport);
        source.spawn_reloader(cfg.tls_reload_interval, move |tls| {
            if let Some(t) = transport.upgrade() {
                if let Err(e) = t.set_tls((*tls).clone()) {
                    warn!("TLS: the new cluster certificate cannot be used by QUIC: {e}");
                }
            }
        });
    }
    let api_l = listen::bind(ListenerKind::Api, cfg.api_address).await?;
    let etcd_l = listen::bind(ListenerKind::Etcd, cfg.etcd_address).await?;
    let http_l = listen::bind(ListenerKind::Http, cfg.rest_address).await?;
    let repl_l = match &role {
        Role::Leader => Some(listen::bind(ListenerKind::Replication, cfg.replication_address).await?),
        Role::Follower { .. } => None,
    };
    // TLS where configured; a file that cannot be used stops the start.
    let tls = |listener: &'static str, files: &Option<crate::config::TlsFiles>, alpn: &'static [&'static [u8]]| {
        files
            .as_ref()
            .map(|f| {
                let source = crate::tls::listener_source(f.clone(), alpn)
                    .map_err(|source| LaunchError::Tls { listener, source })?;
                source.spawn_reloader(cfg.tls_reload_interval, |_| {});
                Ok::<_, LaunchError>(source)
            })
            .transpose()
    };
    let with_tls = |l: listen::Listener, source: Option<Arc<TlsSource>>| match source {
        Some(s) => l.with_tls(s),
        None => l,
    };
    let api_l = with_tls(api_l, tls("api", &cfg.tls.api, &[b"h2"])?);
    let etcd_l = with_tls(etcd_l, tls("etcd", &cfg.tls.etcd, &[b"h2"])?);
    let with_unix = |l: listen::Listener, spec: &Option<listen::UnixSocketSpec>| match spec {
        Some(s) => l.with_unix_socket(s.clone()),
        None => Ok(l),
    };
    let bounded = |l: listen::Listener| {
        l.with_max_connections(cfg.limits.max_connections).with_first_bytes_timeout(cfg.limits.first_bytes_timeout)
    };
    let api_l = bounded(with_unix(api_l, &cfg.api_unix_socket)?);
    let etcd_l = bounded(with_unix(etcd_l, &cfg.etcd_unix_socket)?);
    let repl_l = repl_l.map(bounded);
    let http_l = with_tls(http_l, tls("rest", &cfg.tls.rest, &[b"http/1.1"])?);
    let repl_l = match repl_l {
        Some(l) => Some(with_tls(l, tls("replication", &cfg.tls.replication, &[b"h2"])?)),
        None => None,
    };
    let mut listeners = BTreeMap::new();
    for l in [Some(&api_l), Some(&etcd_l), Some(&http_l), repl_l.as_ref()].into_iter().flatten() {
        listeners.insert(l.kind(), (l.local_addr(), l.stats()));
    }

    let etcd_addr = etcd_l.local_addr().to_string();
    let token = |api: &'static str, spec: &Option<crate::auth::TokenSpec>| {
        let source = spec
            .clone()
            .map(|s| crate::auth::TokenSource::load(s).map_err(|e| LaunchError::Node(format!("{api} token: {e}"))))
            .transpose()?;
        if let Some(s) = &source {
            s.spawn_reloader(cfg.tls_reload_interval);
        }
        Ok::<_, LaunchError>(source)
    };
    let t = &cfg.tokens;
    let tokens = crate::auth::Tokens {
        kv: token("KV", &t.kv)?,
        tables: token("Tables", &t.tables)?,
        cluster: token("Cluster", &t.cluster)?,
        maintenance: token("Maintenance", &t.maintenance)?,
        replication: token("replication", &t.replication)?,
    };
    let cluster_token = tokens.cluster.clone();
    let spec = Spec {
        node: cfg.node.clone(),
        role,
        etcd_table: cfg.etcd_table.clone(),
        etcd_address: etcd_addr,
        tokens,
        etcd_auth: cfg.etcd_auth.clone(),
        limits: cfg.limits.clone(),
    };
    let parts = Parts {
        engine: engine.clone(),
        disk: Arc::new(RealDisk),
        transport: transport.clone(),
        hooks: Default::default(),
    };
    let Assembled { node, metrics, raft_handler, api, etcd, replication, follower, ensure_table } =
        assemble(spec, parts).await.map_err(|e| LaunchError::Node(e.to_string()))?;
    let raft_server = tokio::spawn(transport.clone().serve(raft_handler));
    let readiness = Arc::new(Readiness::new(Some(cfg.etcd_table.clone())));
    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut servers: Vec<(&'static str, JoinHandle<Result<(), String>>)> = Vec::new();
    servers.push(spawn_grpc("armada.v1 API", api, api_l, stopped()));
    servers.push(spawn_grpc("etcd API", etcd, etcd_l, stopped()));
    let http = crate::ops::http::serve(http_l, node.clone(), metrics.clone(), readiness.clone(), stopped());
    servers.push(("HTTP", tokio::spawn(async move { http.await.map_err(|e| e.to_string()) })));
    if let (Some(repl), Some(listener)) = (replication, repl_l) {
        servers.push(spawn_grpc("replication", repl, listener, stopped()));
    }
    readiness.set_listeners_bound();
    if let Some(at) = cfg.join.clone() {
        // The API of the cluster serves TLS when this node's does: verified
        // with the API's client CA, else the cluster (Raft) CA, presenting
        // this node's API certificate.
        let tls = match &cfg.tls.api {
            Some(api) => {
                let ca = api.client_ca.clone().or_else(|| cfg.tls.raft.as_ref().and_then(|r| r.client_ca.clone()));
                let ca = ca.ok_or_else(|| {
                    LaunchError::Node(
                        "--join with a TLS API needs a CA to verify the cluster: --api-tls-client-ca or --raft-tls-ca"
                            .into(),
                    )
                })?;
                let config = crate::tls::client_config(&ca, Some((&api.cert, &api.key)), &[b"h2"])
                    .map_err(|source| LaunchError::Tls { listener: "join", source })?;
                Some(Arc::new(config))
            }
            None => None,
        };
        tokio::spawn(join(node.clone(), at, cluster_token.clone(), tls));
    }
    info!(
        node_id = cfg.node.id,
        api = %cfg.api_address,
        etcd = %cfg.etcd_address,
        etcd_table = %cfg.etcd_table,
        raft = %cfg.raft_address,
        http = %cfg.rest_address,
        data_dir = %cfg.data_dir.display(),
        members = cfg.node.members.len(),
        role = if follower.is_some() { "follower" } else { "leader" },
        replication = %cfg.replication_address,
        "armada node started"
    );
    Ok(Launched {
        node,
        readiness,
        listeners,
        engine,
        transport,
        raft_server,
        servers,
        stop,
        ensure_table,
        drain_timeout: cfg.drain_timeout,
        _follower: follower,
    })
}

/// How often a joining node asks to be added until it is.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// Asks the cluster at `at` (an armada.v1 API) to add this node as a voter,
/// until this node is in the cluster's recorded membership. A repeat after
/// a lost answer is recognised ("already exists").
async fn join(
    node: Arc<Node>,
    at: String,
    token: Option<Arc<crate::auth::TokenSource>>,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    use armada_proto::v1 as pb;
    let me = node.config().me().cloned().unwrap_or_default();
    let addrs = node.config().client_addrs.clone();
    loop {
        if let Ok(Some(r)) = node.members_record() {
            if r.members.contains_key(&node.id()) {
                info!(at = %at, "joined the cluster");
                return;
            }
        }
        let attempt = async {
            let url = format!("{}://{at}", if tls.is_some() { "https" } else { "http" });
            let ch = crate::listen::connect_url(&url, tls.clone(), Duration::from_secs(2)).await?;
            let mut req = tonic::Request::new(pb::MemberAddRequest {
                id: node.id(),
                raft_address: me.raft_addr.clone(),
                api_address: addrs.api.clone(),
                etcd_address: addrs.etcd.clone(),
                learner: false,
            });
            if let Some(t) = &token {
                let v = format!("Bearer {}", t.current().expose());
                let v = v.parse().map_err(|_| "the cluster token is not a valid header value".to_string())?;
                req.metadata_mut().insert("authorization", v);
            }
            match pb::cluster_client::ClusterClient::new(ch).member_add(req).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
                Err(s) => Err(format!("{}: {}", s.code(), s.message())),
            }
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(())) => info!(at = %at, "asked the cluster to add this node; waiting to be added"),
            Ok(Err(e)) => warn!(at = %at, "asking the cluster to add this node (retrying): {e}"),
            Err(_) => warn!(at = %at, "asking the cluster to add this node timed out (retrying)"),
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}

/// Serves `router` on `listener` in a task until `until` resolves.
fn spawn_grpc(
    name: &'static str,
    router: tonic::transport::server::Router,
    listener: listen::Listener,
    until: impl std::future::Future<Output = ()> + Send + 'static,
) -> (&'static str, JoinHandle<Result<(), String>>) {
    let incoming = listener.into_incoming();
    (
        name,
        tokio::spawn(
            async move { router.serve_with_incoming_shutdown(incoming, until).await.map_err(|e| e.to_string()) },
        ),
    )
}

impl Launched {
    /// The bound address of a listener (a configured port 0 is resolved).
    pub fn address(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners.get(&kind).map(|(a, _)| *a)
    }

    /// Counters of every listener.
    pub fn listener_stats(&self) -> Vec<(ListenerKind, Arc<ListenerStats>)> {
        self.listeners.iter().map(|(k, (_, s))| (*k, s.clone())).collect()
    }

    /// Serves until `shutdown` resolves or a server fails, then stops
    /// gracefully: servers finish in-flight requests, Raft stops, storage
    /// is synced.
    pub async fn run_until(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), LaunchError> {
        let node = self.node.clone();
        let mut storage_failure = None;
        let failed = {
            let servers = &mut self.servers;
            let first_exit = futures::future::select_all(servers.iter_mut().map(|(_, h)| h));
            tokio::select! {
                biased;
                _ = shutdown => None,
                why = node.failed() => {
                    storage_failure = Some(why);
                    None
                }
                (res, i, _) = first_exit => Some((i, res)),
            }
        };
        if failed.is_none() && storage_failure.is_none() {
            // Hand every group this node leads to another voter while the
            // servers still answer (requests are forwarded to the new leaders).
            let still = self.node.drain(self.drain_timeout).await;
            if still > 0 {
                warn!("drain: still leading {still} groups after {:?}; stopping anyway", self.drain_timeout);
            }
        }
        let _ = self.stop.send(true);
        if let Some(e) = self.ensure_table.take() {
            e.abort();
        }
        let mut error = None;
        if let Some((i, res)) = failed {
            let (name, _) = self.servers.remove(i);
            let msg = match res {
                Ok(Ok(())) => "stopped unexpectedly".to_string(),
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
            };
            error = Some(LaunchError::Server(name, msg));
        }
        // Streams (a follower's change stream, say) never end by themselves:
        // give in-flight requests a bounded grace, then cut what is left.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for (name, mut h) in self.servers.drain(..) {
            match tokio::time::timeout_at(deadline, &mut h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => warn!("{name} server: {e}"),
                Ok(Err(e)) => warn!("{name} server task: {e}"),
                Err(_) => {
                    warn!("{name} server: connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    h.abort();
                }
            }
        }
        // In-flight requests have finished; stop Raft, then make everything durable.
        self.node.shutdown().await;
        self.raft_server.abort();
        self.transport.close();
        if let Some(why) = storage_failure {
            // Nothing more is written or synced: what the disk holds is what
            // the restart recovers from.
            return Err(LaunchError::Failed(why));
        }
        self.engine.sync().map_err(|e| LaunchError::Sync(e.to_string()))?;
        match error {
            Some(e) => Err(e),
            None => {
                info!("shut down cleanly");
                Ok(())
            }
        }
    }
}
