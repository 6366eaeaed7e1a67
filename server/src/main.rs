//! The `armada` binary: wiring only. `armada leader` runs a node of a
//! leader cluster; `armada table|kv|cluster` are clients of a running node.

use armada_server::config::{self, LogFormat, ServeArgs};
use armada_server::launch::{launch, Role};
use armada_server::tools::cli::{self, ClientArgs, ClusterCmd, KvCmd, TableCmd};
use clap::{Parser, Subcommand};
use tracing::info;

/// mimalloc instead of the system allocator: the request path allocates and
/// frees many small buffers (protobuf messages, write batches, futures), and
/// glibc's malloc and free took about a tenth of the server's CPU under a
/// put load (perf, 100 clients; see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Load generators over the etcd v3 protocol (work against etcd too):
    /// `bench put` (durable puts), `get` (single-key reads), `range`,
    /// `txn` (compare and put), `mixed` (gets and puts), `lag` (follower
    /// replication lag).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Online backups: `backup take TABLE --file F` streams a consistent
    /// image of a table from a running node; `backup verify F` checks a file.
    Backup {
        #[command(subcommand)]
        cmd: armada_server::tools::backup::BackupCmd,
    },
    /// Restore a backup into a new, empty data directory (offline; restore
    /// every member of the new cluster from the same file, then start them).
    Restore(armada_server::tools::backup::RestoreArgs),
    /// Cluster state.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A TCP proxy that adds WAN latency (and cuts) between a follower
    /// cluster and the leader cluster, for trying and testing on one
    /// machine (see deploy/compose).
    WanProxy(armada_server::tools::wanproxy::WanProxyArgs),
    /// Exits 0 when the node at --address (its HTTP address) is ready: a
    /// container healthcheck for images without a shell.
    Ready {
        #[arg(long, default_value = "127.0.0.1:8079")]
        address: String,
    },
}

#[derive(clap::Args)]
struct FollowerArgs {
    /// Replication addresses of the leader cluster's nodes (any subset),
    /// comma-separated, e.g. http://10.0.0.1:8444,http://10.0.0.2:8444.
    #[arg(long, env = "ARMADA_LEADER_ADDRESS", value_name = "URLS", required = true)]
    leader_address: String,
    /// PEM CA certificates that verify the leader cluster's replication
    /// certificate (its addresses are then https://).
    #[arg(long, env = "ARMADA_LEADER_TLS_CA", value_name = "FILE")]
    leader_tls_ca: Option<std::path::PathBuf>,
    /// PEM certificate this follower cluster presents to the leader
    /// cluster (mutual TLS), with --leader-tls-key.
    #[arg(long, env = "ARMADA_LEADER_TLS_CERT", value_name = "FILE", requires = "leader_tls_key")]
    leader_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --leader-tls-cert.
    #[arg(long, env = "ARMADA_LEADER_TLS_KEY", value_name = "FILE", requires = "leader_tls_cert")]
    leader_tls_key: Option<std::path::PathBuf>,
    /// The leader cluster's replication token (its --replication-token).
    #[arg(long, env = "ARMADA_LEADER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    leader_token: Option<String>,
    /// File holding the leader cluster's replication token (re-read when
    /// it changes).
    #[arg(long, env = "ARMADA_LEADER_TOKEN_FILE", value_name = "FILE", conflicts_with = "leader_token")]
    leader_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Closed-loop puts: throughput and latency percentiles.
    Put(armada_server::tools::bench::BenchArgs),
    /// Closed-loop single-key gets (linearizable unless --serializable).
    Get {
        #[command(flatten)]
        args: armada_server::tools::bench::BenchArgs,
        /// Serve from the contacted node's state, without a read index.
        #[arg(long)]
        serializable: bool,
    },
    /// Closed-loop ranges over a prefix of --range-keys keys (written once
    /// before the run), linearizable unless --serializable.
    Range {
        #[command(flatten)]
        args: armada_server::tools::bench::BenchArgs,
        #[arg(long)]
        serializable: bool,
        /// Keys in the range.
        #[arg(long, default_value_t = 100)]
        range_keys: usize,
    },
    /// Closed-loop compare-and-put transactions (each client owns a key and
    /// puts it if its mod revision is the one the client last wrote).
    Txn(armada_server::tools::bench::BenchArgs),
    /// Closed-loop mix of gets and puts over the shared pool of --keys keys.
    Mixed {
        #[command(flatten)]
        args: armada_server::tools::bench::BenchArgs,
        /// Share of requests that are gets, in percent (the rest are puts).
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(0..=100))]
        read_percent: u32,
        #[arg(long)]
        serializable: bool,
    },
    /// Replication lag as a client sees it: put at the leader cluster, poll
    /// a follower node until the write is there.
    Lag(armada_server::tools::bench::LagArgs),
    /// What idle watchers cost: resident memory per watcher, and put-to-event
    /// latency while they are held.
    Watchers(armada_server::tools::watchbench::WatchArgs),
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

/// The follower role from its flags: endpoints, and TLS towards them.
fn follower_role(args: &FollowerArgs) -> anyhow::Result<Role> {
    let leader_endpoints = leader_endpoints(&args.leader_address)?;
    let https = leader_endpoints.iter().filter(|e| e.starts_with("https://")).count();
    let leader_tls = match &args.leader_tls_ca {
        Some(ca) => {
            anyhow::ensure!(
                https == leader_endpoints.len(),
                "--leader-tls-ca is given: every --leader-address must be https://"
            );
            let files = armada_server::tls::ClientTlsFiles {
                ca: ca.clone(),
                identity: args.leader_tls_cert.clone().zip(args.leader_tls_key.clone()),
            };
            Some(armada_server::tls::client_source(files, &[b"h2"])?)
        }
        None => {
            anyhow::ensure!(
                https == 0,
                "an https:// --leader-address needs --leader-tls-ca (the CA of its certificate)"
            );
            anyhow::ensure!(args.leader_tls_cert.is_none(), "--leader-tls-cert needs --leader-tls-ca");
            None
        }
    };
    let spec = match (&args.leader_token, &args.leader_token_file) {
        (Some(t), _) => Some(armada_server::auth::TokenSpec::Value(armada_server::auth::Secret::new(t.trim()))),
        (None, Some(f)) => Some(armada_server::auth::TokenSpec::File(f.clone())),
        (None, None) => None,
    };
    if spec.is_some() && leader_tls.is_none() && !args.serve.allow_tokens_over_plaintext {
        anyhow::bail!(
            "--leader-token would travel in the clear: use https:// with --leader-tls-ca or, for local testing, --allow-tokens-over-plaintext"
        );
    }
    let leader_token = spec
        .map(armada_server::auth::TokenSource::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!("leader token: {e}"))?;
    Ok(Role::Follower { leader_endpoints, leader_tls, leader_token })
}

async fn serve(args: ServeArgs, log_format: Option<LogFormat>, role: Role) -> anyhow::Result<()> {
    let cfg = config::resolve(&args)?;
    init_logs(log_format.or(cfg.log_format).unwrap_or_default());
    let node = launch(&cfg, role).await?;
    node.run_until(shutdown_signal()).await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Leader(args) => serve(args, cli.log_format, Role::Leader).await,
        Cmd::Follower(args) => match follower_role(&args) {
            Ok(role) => serve(args.serve, cli.log_format, role).await,
            Err(e) => Err(e),
        },
        Cmd::Table { cmd, client } => cli::table(&client, cmd).await,
        Cmd::Kv { cmd, client } => cli::kv(&client, cmd).await,
        Cmd::Cluster { cmd, client } => cli::cluster(&client, cmd).await,
        Cmd::WanProxy(args) => armada_server::tools::wanproxy::run(args).await,
        Cmd::Ready { address } => armada_server::tools::wanproxy::ready(&address).await,
        Cmd::Backup { cmd } => armada_server::tools::backup::backup(cmd).await,
        Cmd::Restore(args) => armada_server::tools::backup::restore(args),
        Cmd::Bench { cmd: BenchCmd::Put(args) } => armada_server::tools::bench::put(&args).await,
        Cmd::Bench { cmd: BenchCmd::Lag(args) } => armada_server::tools::bench::lag(&args).await,
        Cmd::Bench { cmd: BenchCmd::Watchers(args) } => armada_server::tools::watchbench::watchers(&args).await,
        Cmd::Bench { cmd: BenchCmd::Get { args, serializable } } => {
            armada_server::tools::bench::run(&args, armada_server::tools::bench::Op::Get { serializable }).await
        }
        Cmd::Bench { cmd: BenchCmd::Range { args, serializable, range_keys } } => {
            armada_server::tools::bench::run(
                &args,
                armada_server::tools::bench::Op::Range { serializable, keys: range_keys },
            )
            .await
        }
        Cmd::Bench { cmd: BenchCmd::Txn(args) } => {
            armada_server::tools::bench::run(&args, armada_server::tools::bench::Op::Txn).await
        }
        Cmd::Bench { cmd: BenchCmd::Mixed { args, read_percent, serializable } } => {
            armada_server::tools::bench::run(
                &args,
                armada_server::tools::bench::Op::Mixed { read_percent, serializable },
            )
            .await
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
