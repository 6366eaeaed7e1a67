//! The `armada` binary: wiring only. `armada leader` runs a node of a
//! leader cluster; `armada table|kv|cluster` are clients of a running node.

use std::sync::Arc;

use anyhow::Context;
use armada_core::Engine;
use armada_net::quic::QuicTransport;
use armada_server::cli::{self, ClientArgs, ClusterCmd, KvCmd, TableCmd};
use armada_server::config::{self, LogFormat, ServeArgs};
use armada_server::flusher::{BatchingFlusher, RealDisk};
use armada_server::network::RaftHandler;
use armada_server::node::Node;
use armada_server::rocks::RocksEngine;
use armada_server::service::{router, Api};
use clap::{Parser, Subcommand};
use tracing::info;

#[derive(Parser)]
#[command(name = "armada", version, about = "Armada: a geo-replicated key-value store with etcd v3 semantics")]
struct Cli {
    /// Log format (log level from RUST_LOG, default `info`).
    #[arg(long, env = "ARMADA_LOG_FORMAT", value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node of the leader cluster. With no options: a single-node
    /// cluster with its data in ./armada-data, armada.v1 API on
    /// 127.0.0.1:8443, etcd v3 API on 127.0.0.1:2379, HTTP on 127.0.0.1:8079,
    /// replication (for follower clusters) on 127.0.0.1:8444.
    ///
    /// Precedence of settings: flag > ARMADA_* environment > --config file > default.
    Leader(ServeArgs),
    /// Run a node of a follower cluster: its own Raft cluster that streams
    /// every table from the leader cluster, serves reads locally and sends
    /// writes on to the leader cluster. Takes the same options as `leader`.
    Follower(FollowerArgs),
    /// Create, delete and list tables.
    Table {
        #[command(subcommand)]
        cmd: TableCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read and write keys.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load generators. `bench put`: durable puts at a fixed concurrency
    /// over the etcd v3 protocol (works against etcd too).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Cluster state.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Args)]
struct FollowerArgs {
    /// Replication addresses of the leader cluster's nodes (any subset),
    /// comma-separated, e.g. http://10.0.0.1:8444,http://10.0.0.2:8444.
    #[arg(long, env = "ARMADA_LEADER_ADDRESS", value_name = "URLS", required = true)]
    leader_address: String,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Closed-loop puts: throughput and latency percentiles.
    Put(armada_server::bench::BenchArgs),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down"),
        _ = term.recv() => info!("SIGTERM received, shutting down"),
    }
}

/// Parses `--leader-address`: comma-separated http(s) URLs.
fn leader_endpoints(s: &str) -> anyhow::Result<Vec<String>> {
    let eps: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
        .collect();
    anyhow::ensure!(!eps.is_empty(), "invalid --leader-address {s:?}: no address given");
    for e in &eps {
        tonic::transport::Endpoint::from_shared(e.clone())
            .map_err(|err| anyhow::anyhow!("invalid --leader-address {e:?}: {err}"))?;
    }
    Ok(eps)
}

async fn serve(args: ServeArgs, log_format: Option<LogFormat>, leader: Option<Vec<String>>) -> anyhow::Result<()> {
    let cfg = config::resolve(&args)?;
    init_logs(log_format.or(cfg.log_format).unwrap_or_default());
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let engine: Arc<dyn Engine> = Arc::new(
        RocksEngine::open(&cfg.data_dir.join("db")).with_context(|| format!("opening {}", cfg.data_dir.display()))?,
    );
    let flusher = Arc::new(BatchingFlusher::start(engine.clone(), Arc::new(RealDisk)));
    let transport = QuicTransport::bind(cfg.raft_address)?;
    let node = Node::start(cfg.node.clone(), engine.clone(), flusher, transport.clone())
        .await
        .map_err(|e| anyhow::anyhow!("starting node: {e}"))?;
    let raft_server = tokio::spawn(transport.clone().serve(Arc::new(RaftHandler { node: Arc::downgrade(&node) })));
    let metrics = Arc::new(armada_server::metrics::Metrics::default());
    let rest_listener = std::net::TcpListener::bind(cfg.rest_address)
        .with_context(|| format!("binding the HTTP address {}", cfg.rest_address))?;
    drop(rest_listener);
    let http = tokio::spawn(armada_server::http::serve(
        cfg.rest_address,
        node.clone(),
        metrics.clone(),
        std::future::pending(),
    ));
    let etcd_listener = tokio::net::TcpListener::bind(cfg.etcd_address)
        .await
        .with_context(|| format!("binding the etcd address {}", cfg.etcd_address))?;
    let etcd_api = armada_server::etcd::EtcdApi::new(
        node.clone(),
        cfg.etcd_table.clone(),
        metrics.clone(),
        &cfg.etcd_address.to_string(),
    );
    let (etcd_stop_tx, etcd_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let etcd = tokio::spawn(armada_server::etcd::router(etcd_api).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(etcd_listener),
        async move {
            let _ = etcd_stop_rx.await;
        },
    ));
    // A leader cluster creates the etcd table and serves follower clusters;
    // a follower cluster gets its tables from the leader cluster.
    let mut _follower = None;
    let (ensure, replication) = match &leader {
        None => {
            let node2 = node.clone();
            let table = cfg.etcd_table.clone();
            let ensure = tokio::spawn(async move { armada_server::etcd::ensure_table(&node2, &table).await });
            let listener = tokio::net::TcpListener::bind(cfg.replication_address)
                .await
                .with_context(|| format!("binding the replication address {}", cfg.replication_address))?;
            let svc = armada_server::replication::ReplicationService::new(node.clone());
            let server = tokio::spawn(
                armada_server::replication::router(svc)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (Some(ensure), Some(server))
        }
        Some(endpoints) => {
            let up =
                Arc::new(armada_server::replication::UpstreamClient::new(endpoints.clone(), cfg.node.request_timeout));
            _follower = Some(armada_server::replication::Follower::start(node.clone(), up));
            (None, None)
        }
    };
    info!(
        node_id = cfg.node.id,
        api = %cfg.api_address,
        etcd = %cfg.etcd_address,
        etcd_table = %cfg.etcd_table,
        raft = %cfg.raft_address,
        http = %cfg.rest_address,
        data_dir = %cfg.data_dir.display(),
        members = cfg.node.members.len(),
        role = if leader.is_some() { "follower" } else { "leader" },
        replication = %cfg.replication_address,
        "armada node started"
    );
    router(Api::with_metrics(node.clone(), metrics))
        .serve_with_shutdown(cfg.api_address, shutdown_signal())
        .await
        .with_context(|| format!("serving the API on {}", cfg.api_address))?;
    if let Some(e) = ensure {
        e.abort();
    }
    if let Some(r) = replication {
        r.abort();
    }
    let _ = etcd_stop_tx.send(());
    match etcd.await {
        Ok(Err(e)) => tracing::warn!("etcd API: {e}"),
        Err(e) => tracing::warn!("etcd API task: {e}"),
        Ok(Ok(())) => {}
    }
    // In-flight requests have finished; stop Raft, then make everything durable.
    node.shutdown().await;
    raft_server.abort();
    http.abort();
    transport.close();
    engine.sync().map_err(|e| anyhow::anyhow!("final sync: {e}"))?;
    info!("shut down cleanly");
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Leader(args) => serve(args, cli.log_format, None).await,
        Cmd::Follower(args) => match leader_endpoints(&args.leader_address) {
            Ok(eps) => serve(args.serve, cli.log_format, Some(eps)).await,
            Err(e) => Err(e),
        },
        Cmd::Table { cmd, client } => cli::table(&client, cmd).await,
        Cmd::Kv { cmd, client } => cli::kv(&client, cmd).await,
        Cmd::Cluster { cmd, client } => cli::cluster(&client, cmd).await,
        Cmd::Bench { cmd: BenchCmd::Put(args) } => armada_server::bench::put(&args).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
