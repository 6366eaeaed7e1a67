//! Node configuration: command-line flags, `ARMADA_*` environment
//! variables and a TOML file, resolved with the precedence
//! flag > environment > file > default. Everything is checked before the
//! node starts; a bad value is a clear error naming its source.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use armada_core::raft::ArmadaNode;
use serde::Deserialize;

use crate::node::{NodeConfig, RaftTuning};

pub const DEFAULT_DATA_DIR: &str = "./armada-data";
pub const DEFAULT_API_ADDRESS: &str = "127.0.0.1:8443";
pub const DEFAULT_RAFT_ADDRESS: &str = "127.0.0.1:5012";
pub const DEFAULT_REST_ADDRESS: &str = "127.0.0.1:8079";
pub const DEFAULT_ETCD_ADDRESS: &str = "127.0.0.1:2379";
pub const DEFAULT_REPLICATION_ADDRESS: &str = "127.0.0.1:8444";
pub const DEFAULT_ETCD_TABLE: &str = "default";
pub const DEFAULT_NODE_ID: u64 = 1;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often TLS files are checked for changes by default.
pub const TLS_RELOAD_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// Largest response limit: gRPC messages are capped at 64 MiB.
pub const MAX_RESPONSE_BYTES_MAX: u64 = 60 << 20;

/// Largest compaction step accepted: about a second of one table's apply
/// path.
pub const COMPACTION_STEP_RECORDS_MAX: usize = 1 << 20;
/// Largest snapshot chunk: well inside the Raft transport's message cap.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 64 << 20;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Options of `armada leader`, as given on the command line or in the
/// environment (clap reads `ARMADA_*` for each).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file; its keys are the long option names with `_`
    /// for `-` (e.g. `data_dir = "/var/lib/armada"`).
    #[arg(long, env = "ARMADA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding this node's data (RocksDB). [default: ./armada-data]
    #[arg(long, env = "ARMADA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id: a positive integer, unique in the cluster. [default: 1]
    #[arg(long, env = "ARMADA_NODE_ID", value_name = "ID")]
    pub node_id: Option<u64>,
    /// Take the node id from the host name's trailing number plus one
    /// (`armada-0` is node 1): a Kubernetes StatefulSet's pods.
    #[arg(long, env = "ARMADA_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// A running cluster's armada.v1 API (host:port) that this node asks to
    /// add it when it starts as a joining node (`existing`, or `auto` and
    /// not among --initial-members): it becomes a voter once caught up.
    /// Sent with --cluster-token when one is set. [default: added by an
    /// operator instead]
    #[arg(long, env = "ARMADA_JOIN", value_name = "HOST:PORT")]
    pub join: Option<String>,
    /// Raft addresses of all initial members, `id=host:port,...` (optionally
    /// `id=host:port@api_host:port` to also publish a member's API address).
    /// [default: this node alone]
    #[arg(long, env = "ARMADA_INITIAL_MEMBERS", value_name = "MEMBERS")]
    pub initial_members: Option<String>,
    /// `new`: this node founds a cluster with --initial-members (every
    /// founding member gives the same list); `existing`: it joins a running
    /// cluster, which must add it first (`armada cluster member add`, or
    /// etcd's MemberAdd, or --join); it never initialises anything itself;
    /// `auto`: `new` if this node is among --initial-members, else
    /// `existing` (one setting for every pod of a StatefulSet).
    /// [default: new]
    #[arg(long, env = "ARMADA_INITIAL_CLUSTER_STATE", value_name = "new|existing|auto")]
    pub initial_cluster_state: Option<String>,
    /// Where the other nodes reach this node's Raft address, when it is not
    /// the address it listens on (e.g. a StatefulSet pod's DNS name,
    /// `armada-0.armada.ns.svc:5012`, while listening on 0.0.0.0:5012).
    /// [default: this node's entry in --initial-members, else --raft-address]
    #[arg(long, env = "ARMADA_ADVERTISE_RAFT_ADDRESS", value_name = "HOST:PORT")]
    pub advertise_raft_address: Option<String>,
    /// Where clients reach this node's armada.v1 API, as member lists
    /// publish it. [default: --api-address unless it is 0.0.0.0 or ::]
    #[arg(long, env = "ARMADA_ADVERTISE_API_ADDRESS", value_name = "HOST:PORT")]
    pub advertise_api_address: Option<String>,
    /// Where clients reach this node's etcd v3 API, as etcd's MemberList
    /// publishes it (its clientURLs). [default: --etcd-address unless it
    /// is 0.0.0.0 or ::]
    #[arg(long, env = "ARMADA_ADVERTISE_ETCD_ADDRESS", value_name = "HOST:PORT")]
    pub advertise_etcd_address: Option<String>,
    /// On SIGTERM, how long the node hands the leadership of its Raft
    /// groups to other members before it stops serving (keep it below the
    /// supervisor's grace period, e.g. Kubernetes' 30 s). [default: 10000]
    #[arg(long, env = "ARMADA_DRAIN_TIMEOUT_MS", value_name = "MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Address of the armada.v1 gRPC API. [default: 127.0.0.1:8443]
    #[arg(long, env = "ARMADA_API_ADDRESS", value_name = "HOST:PORT")]
    pub api_address: Option<String>,
    /// Address of Raft traffic between the nodes (QUIC, UDP). [default: 127.0.0.1:5012]
    #[arg(long, env = "ARMADA_RAFT_ADDRESS", value_name = "HOST:PORT")]
    pub raft_address: Option<String>,
    /// Address of the HTTP endpoints (/metrics, /healthz, /readyz). [default: 127.0.0.1:8079]
    #[arg(long, env = "ARMADA_REST_ADDRESS", value_name = "HOST:PORT")]
    pub rest_address: Option<String>,
    /// Address of the etcd v3 gRPC API (etcdctl and etcd clients). [default: 127.0.0.1:2379]
    #[arg(long, env = "ARMADA_ETCD_ADDRESS", value_name = "HOST:PORT")]
    pub etcd_address: Option<String>,
    /// Also serve the armada.v1 API on a Unix socket: unix:///path
    /// (plaintext; the file's permissions, 0660, control access) or
    /// unixs:///path (TLS with the API listener's certificate).
    #[arg(long, env = "ARMADA_API_UNIX_SOCKET", value_name = "URL")]
    pub api_unix_socket: Option<String>,
    /// Also serve the etcd v3 API on a Unix socket (unix:///path or
    /// unixs:///path, as --api-unix-socket).
    #[arg(long, env = "ARMADA_ETCD_UNIX_SOCKET", value_name = "URL")]
    pub etcd_unix_socket: Option<String>,
    /// Table that the etcd v3 API reads and writes; created by a leader cluster when missing at start.
    /// [default: default]
    #[arg(long, env = "ARMADA_ETCD_TABLE", value_name = "TABLE")]
    pub etcd_table: Option<String>,
    /// Address of the replication service that follower clusters stream
    /// tables from. [default: 127.0.0.1:8444]
    #[arg(long, env = "ARMADA_REPLICATION_ADDRESS", value_name = "HOST:PORT")]
    pub replication_address: Option<String>,
    /// How long a request may wait for a leader or a commit, in ms. [default: 5000]
    #[arg(long, env = "ARMADA_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub request_timeout_ms: Option<u64>,
    /// Revisions of each table's change history kept for follower clusters
    /// (compaction does not shorten it); a follower further behind bootstraps
    /// from a snapshot. [default: 10000]
    #[arg(long, env = "ARMADA_HISTORY_RETENTION", value_name = "REVISIONS")]
    pub history_retention: Option<u64>,
    /// Take a Raft snapshot of a group (and purge its log) after this many
    /// applied entries. Snapshots are cheap views; a smaller value keeps
    /// less log on disk, and replicas further behind catch up by snapshot.
    /// [default: 50000]
    #[arg(long, env = "ARMADA_SNAPSHOT_AFTER_LOGS", value_name = "ENTRIES")]
    pub snapshot_after_logs: Option<u64>,
    /// Bytes per chunk of a streamed Raft snapshot: what one snapshot
    /// transfer holds in memory on the sender and on the receiver.
    /// [default: 1048576]
    #[arg(long, env = "ARMADA_SNAPSHOT_CHUNK_BYTES", value_name = "BYTES")]
    pub snapshot_chunk_bytes: Option<usize>,
    /// How --auto-compaction-retention counts: `periodic` (time) or
    /// `revision` (revisions), as etcd's flag. [default: periodic]
    #[arg(long, env = "ARMADA_AUTO_COMPACTION_MODE", value_name = "MODE")]
    pub auto_compaction_mode: Option<String>,
    /// History each table keeps; older revisions are compacted
    /// automatically on a leader cluster (follower clusters follow). `0`
    /// turns it off. Periodic mode: hours, or a duration such as `30m`,
    /// `12h`; revision mode: a number of revisions (compacted every 5
    /// minutes). [default: 0]
    #[arg(long, env = "ARMADA_AUTO_COMPACTION_RETENTION", value_name = "RETENTION")]
    pub auto_compaction_retention: Option<String>,
    /// Largest range answer (keys and values) a node sends; a larger range
    /// is refused with RESOURCE_EXHAUSTED, saying to ask for fewer keys.
    /// [default: 50331648 (48 MiB)]
    #[arg(long, env = "ARMADA_MAX_RESPONSE_BYTES", value_name = "BYTES")]
    pub max_response_bytes: Option<u64>,
    /// History records one compaction step removes (as etcd's compaction
    /// batch limit): a compaction holds a table's writes for one step at a
    /// time. Every member of a cluster should use the same value.
    /// [default: 4096]
    #[arg(long, env = "ARMADA_COMPACTION_STEP_RECORDS", value_name = "RECORDS")]
    pub compaction_step_records: Option<usize>,
    /// TLS on the armada.v1 API listener: PEM certificate chain (with
    /// --api-tls-key). [default: plaintext]
    #[arg(long, env = "ARMADA_API_TLS_CERT", value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of --api-tls-cert.
    #[arg(long, env = "ARMADA_API_TLS_KEY", value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients of the armada.v1 API must present a
    /// certificate issued by one (mutual TLS).
    #[arg(long, env = "ARMADA_API_TLS_CLIENT_CA", value_name = "FILE")]
    pub api_tls_client_ca: Option<PathBuf>,
    /// Client identities let in (certificate common name or subject
    /// alternative name), comma-separated; needs --api-tls-client-ca.
    /// [default: any client certificate the CA issued]
    #[arg(long, env = "ARMADA_API_TLS_ALLOWED_CLIENTS", value_name = "NAMES")]
    pub api_tls_allowed_clients: Option<String>,
    /// TLS on the etcd API listener: PEM certificate chain (with
    /// --etcd-tls-key). [default: plaintext]
    #[arg(long, env = "ARMADA_ETCD_TLS_CERT", value_name = "FILE")]
    pub etcd_tls_cert: Option<PathBuf>,
    /// PEM private key of --etcd-tls-cert.
    #[arg(long, env = "ARMADA_ETCD_TLS_KEY", value_name = "FILE")]
    pub etcd_tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients of the etcd API must present a
    /// certificate issued by one (mutual TLS).
    #[arg(long, env = "ARMADA_ETCD_TLS_CLIENT_CA", value_name = "FILE")]
    pub etcd_tls_client_ca: Option<PathBuf>,
    /// Client identities let in (certificate common name or subject
    /// alternative name), comma-separated; needs --etcd-tls-client-ca.
    /// [default: any client certificate the CA issued]
    #[arg(long, env = "ARMADA_ETCD_TLS_ALLOWED_CLIENTS", value_name = "NAMES")]
    pub etcd_tls_allowed_clients: Option<String>,
    /// TLS on the replication API listener: PEM certificate chain (with
    /// --replication-tls-key). [default: plaintext]
    #[arg(long, env = "ARMADA_REPLICATION_TLS_CERT", value_name = "FILE")]
    pub replication_tls_cert: Option<PathBuf>,
    /// PEM private key of --replication-tls-cert.
    #[arg(long, env = "ARMADA_REPLICATION_TLS_KEY", value_name = "FILE")]
    pub replication_tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients of the replication API must present a
    /// certificate issued by one (mutual TLS).
    #[arg(long, env = "ARMADA_REPLICATION_TLS_CLIENT_CA", value_name = "FILE")]
    pub replication_tls_client_ca: Option<PathBuf>,
    /// Client identities let in (certificate common name or subject
    /// alternative name), comma-separated; needs --replication-tls-client-ca.
    /// [default: any client certificate the CA issued]
    #[arg(long, env = "ARMADA_REPLICATION_TLS_ALLOWED_CLIENTS", value_name = "NAMES")]
    pub replication_tls_allowed_clients: Option<String>,
    /// TLS on the HTTP endpoint (metrics, health) listener: PEM certificate chain (with
    /// --rest-tls-key). [default: plaintext]
    #[arg(long, env = "ARMADA_REST_TLS_CERT", value_name = "FILE")]
    pub rest_tls_cert: Option<PathBuf>,
    /// PEM private key of --rest-tls-cert.
    #[arg(long, env = "ARMADA_REST_TLS_KEY", value_name = "FILE")]
    pub rest_tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients of the HTTP endpoint (metrics, health) must present a
    /// certificate issued by one (mutual TLS).
    #[arg(long, env = "ARMADA_REST_TLS_CLIENT_CA", value_name = "FILE")]
    pub rest_tls_client_ca: Option<PathBuf>,
    /// Client identities let in (certificate common name or subject
    /// alternative name), comma-separated; needs --rest-tls-client-ca.
    /// [default: any client certificate the CA issued]
    #[arg(long, env = "ARMADA_REST_TLS_ALLOWED_CLIENTS", value_name = "NAMES")]
    pub rest_tls_allowed_clients: Option<String>,
    /// Mutual TLS between the nodes (Raft over QUIC): this node's PEM
    /// certificate chain, issued by --raft-tls-ca (with --raft-tls-key).
    /// [default: a self-signed certificate, peers not verified]
    #[arg(long, env = "ARMADA_RAFT_TLS_CERT", value_name = "FILE")]
    pub raft_tls_cert: Option<PathBuf>,
    /// PEM private key of --raft-tls-cert.
    #[arg(long, env = "ARMADA_RAFT_TLS_KEY", value_name = "FILE")]
    pub raft_tls_key: Option<PathBuf>,
    /// PEM certificates of the cluster CA: a peer must present a certificate
    /// it issued, in both directions. Give the cluster a CA of its own.
    #[arg(long, env = "ARMADA_RAFT_TLS_CA", value_name = "FILE")]
    pub raft_tls_ca: Option<PathBuf>,
    /// Peers let in (certificate common name or subject alternative name),
    /// comma-separated. [default: any certificate of the cluster CA]
    #[arg(long, env = "ARMADA_RAFT_TLS_ALLOWED_PEERS", value_name = "NAMES")]
    pub raft_tls_allowed_peers: Option<String>,
    /// Bearer token every call of the KV API must carry
    /// (`authorization: Bearer TOKEN`). Prefer --kv-token-file.
    #[arg(long, env = "ARMADA_KV_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub kv_token: Option<String>,
    /// File holding the KV API's token (re-read when it changes).
    #[arg(long, env = "ARMADA_KV_TOKEN_FILE", value_name = "FILE")]
    pub kv_token_file: Option<PathBuf>,
    /// Bearer token every call of the Tables API must carry
    /// (`authorization: Bearer TOKEN`). Prefer --tables-token-file.
    #[arg(long, env = "ARMADA_TABLES_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub tables_token: Option<String>,
    /// File holding the Tables API's token (re-read when it changes).
    #[arg(long, env = "ARMADA_TABLES_TOKEN_FILE", value_name = "FILE")]
    pub tables_token_file: Option<PathBuf>,
    /// Bearer token every call of the Cluster API must carry
    /// (`authorization: Bearer TOKEN`). Prefer --cluster-token-file.
    #[arg(long, env = "ARMADA_CLUSTER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// File holding the Cluster API's token (re-read when it changes).
    #[arg(long, env = "ARMADA_CLUSTER_TOKEN_FILE", value_name = "FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Bearer token every call of the Maintenance API must carry
    /// (`authorization: Bearer TOKEN`). Prefer --maintenance-token-file.
    #[arg(long, env = "ARMADA_MAINTENANCE_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub maintenance_token: Option<String>,
    /// File holding the Maintenance API's token (re-read when it changes).
    #[arg(long, env = "ARMADA_MAINTENANCE_TOKEN_FILE", value_name = "FILE")]
    pub maintenance_token_file: Option<PathBuf>,
    /// Bearer token every call of the replication API must carry
    /// (`authorization: Bearer TOKEN`). Prefer --replication-token-file.
    #[arg(long, env = "ARMADA_REPLICATION_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub replication_token: Option<String>,
    /// File holding the replication API's token (re-read when it changes).
    #[arg(long, env = "ARMADA_REPLICATION_TOKEN_FILE", value_name = "FILE")]
    pub replication_token_file: Option<PathBuf>,
    /// Accept tokens on listeners without TLS (they then travel in the
    /// clear): for local testing only.
    #[arg(long, env = "ARMADA_ALLOW_TOKENS_OVER_PLAINTEXT")]
    pub allow_tokens_over_plaintext: bool,
    /// How often TLS certificate, key and CA files and token files are
    /// checked for changes (a change is used for new connections and calls
    /// without a restart), in ms.
    /// [default: 5000]
    #[arg(long, env = "ARMADA_TLS_RELOAD_INTERVAL_MS", value_name = "MS")]
    pub tls_reload_interval_ms: Option<u64>,
    /// Lifetime of the tokens etcd's Authenticate hands out, in seconds
    /// (etcd's --auth-token-ttl); clients log in again when one expires.
    /// [default: 300]
    #[arg(long, env = "ARMADA_ETCD_AUTH_TOKEN_TTL_S", value_name = "SECONDS")]
    pub etcd_auth_token_ttl_s: Option<u64>,
    /// Memory cost of hashing etcd users' passwords (Argon2id), in KiB:
    /// each login and password change takes this much memory and about
    /// 1-2 ms of CPU per MiB. [default: 19456]
    #[arg(long, env = "ARMADA_ETCD_AUTH_HASH_MEMORY_KIB", value_name = "KIB")]
    pub etcd_auth_hash_memory_kib: Option<u32>,
    /// Connections each gRPC listener (armada.v1, etcd, replication) holds
    /// at once, its TCP port and Unix socket together; past it a new one
    /// is refused ("too many connections"). [default: 4096]
    #[arg(long, env = "ARMADA_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Calls and streams one connection may have open at once (HTTP/2
    /// SETTINGS; clients queue the rest). [default: 1024]
    #[arg(long, env = "ARMADA_MAX_STREAMS_PER_CONNECTION", value_name = "N")]
    pub max_streams_per_connection: Option<u32>,
    /// Requests per second one client address may send to the armada.v1
    /// and etcd APIs; past it a call gets RESOURCE_EXHAUSTED. 0: no limit.
    /// [default: 0]
    #[arg(long, env = "ARMADA_REQUESTS_PER_SECOND", value_name = "N")]
    pub requests_per_second: Option<u32>,
    /// Requests a client address may send at once above its rate.
    /// [default: the rate]
    #[arg(long, env = "ARMADA_REQUEST_BURST", value_name = "N")]
    pub request_burst: Option<u32>,
    /// HTTP/2 keep-alive: a ping after this much silence on a connection,
    /// in ms; a connection whose ping goes unanswered for
    /// --keepalive-timeout-ms is closed. [default: 30000]
    #[arg(long, env = "ARMADA_KEEPALIVE_INTERVAL_MS", value_name = "MS")]
    pub keepalive_interval_ms: Option<u64>,
    /// [default: 10000]
    #[arg(long, env = "ARMADA_KEEPALIVE_TIMEOUT_MS", value_name = "MS")]
    pub keepalive_timeout_ms: Option<u64>,
    /// A connection that sends nothing for this long after it was accepted
    /// is closed, in ms (so unused connections cannot be hoarded).
    /// [default: 10000]
    #[arg(long, env = "ARMADA_FIRST_BYTES_TIMEOUT_MS", value_name = "MS")]
    pub first_bytes_timeout_ms: Option<u64>,
}

/// A Unix socket a listener also accepts on: `unix:///path` (plaintext) or
/// `unixs:///path` (TLS with the listener's certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketSpec {
    pub path: PathBuf,
    pub tls: bool,
}

impl UnixSocketSpec {
    /// Parses `unix:///abs/path`, `unix://rel/path`, `unix:path` and the
    /// same with `unixs` (etcd's spelling for TLS over a Unix socket).
    pub fn parse(url: &str) -> Result<UnixSocketSpec, String> {
        let (rest, tls) = if let Some(r) = url.strip_prefix("unixs:") {
            (r, true)
        } else if let Some(r) = url.strip_prefix("unix:") {
            (r, false)
        } else {
            return Err(format!("{url:?}: a Unix socket is given as unix:///path or unixs:///path"));
        };
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(format!("{url:?}: no socket path"));
        }
        // The kernel's limit on a socket path (sun_path), with its NUL.
        if path.len() > 107 {
            return Err(format!("{url:?}: a Unix socket path is at most 107 bytes"));
        }
        Ok(UnixSocketSpec { path: PathBuf::from(path), tls })
    }
}

impl std::fmt::Display for UnixSocketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls { "unixs" } else { "unix" }, self.path.display())
    }
}

/// The configuration file. Unknown keys and wrong types are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub node_id_from_hostname: Option<bool>,
    pub join: Option<String>,
    pub initial_members: Option<String>,
    pub initial_cluster_state: Option<String>,
    pub advertise_raft_address: Option<String>,
    pub advertise_api_address: Option<String>,
    pub advertise_etcd_address: Option<String>,
    pub drain_timeout_ms: Option<u64>,
    pub api_address: Option<String>,
    pub raft_address: Option<String>,
    pub rest_address: Option<String>,
    pub etcd_address: Option<String>,
    pub api_unix_socket: Option<String>,
    pub etcd_unix_socket: Option<String>,
    pub etcd_table: Option<String>,
    pub replication_address: Option<String>,
    pub request_timeout_ms: Option<u64>,
    pub history_retention: Option<u64>,
    pub snapshot_after_logs: Option<u64>,
    pub snapshot_chunk_bytes: Option<usize>,
    pub auto_compaction_mode: Option<String>,
    pub auto_compaction_retention: Option<String>,
    pub max_response_bytes: Option<u64>,
    pub compaction_step_records: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    pub api_tls_client_ca: Option<PathBuf>,
    pub api_tls_allowed_clients: Option<String>,
    pub etcd_tls_cert: Option<PathBuf>,
    pub etcd_tls_key: Option<PathBuf>,
    pub etcd_tls_client_ca: Option<PathBuf>,
    pub etcd_tls_allowed_clients: Option<String>,
    pub replication_tls_cert: Option<PathBuf>,
    pub replication_tls_key: Option<PathBuf>,
    pub replication_tls_client_ca: Option<PathBuf>,
    pub replication_tls_allowed_clients: Option<String>,
    pub rest_tls_cert: Option<PathBuf>,
    pub rest_tls_key: Option<PathBuf>,
    pub rest_tls_client_ca: Option<PathBuf>,
    pub rest_tls_allowed_clients: Option<String>,
    pub tls_reload_interval_ms: Option<u64>,
    pub raft_tls_cert: Option<PathBuf>,
    pub raft_tls_key: Option<PathBuf>,
    pub raft_tls_ca: Option<PathBuf>,
    pub raft_tls_allowed_peers: Option<String>,
    pub kv_token: Option<String>,
    pub kv_token_file: Option<PathBuf>,
    pub tables_token: Option<String>,
    pub tables_token_file: Option<PathBuf>,
    pub cluster_token: Option<String>,
    pub cluster_token_file: Option<PathBuf>,
    pub maintenance_token: Option<String>,
    pub maintenance_token_file: Option<PathBuf>,
    pub replication_token: Option<String>,
    pub replication_token_file: Option<PathBuf>,
    pub allow_tokens_over_plaintext: Option<bool>,
    pub etcd_auth_token_ttl_s: Option<u64>,
    pub etcd_auth_hash_memory_kib: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_streams_per_connection: Option<u32>,
    pub requests_per_second: Option<u32>,
    pub request_burst: Option<u32>,
    pub keepalive_interval_ms: Option<u64>,
    pub keepalive_timeout_ms: Option<u64>,
    pub first_bytes_timeout_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
}

fn invalid(what: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { what, value: value.into(), reason: reason.into() }
}

/// A node's resolved configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub api_address: SocketAddr,
    pub raft_address: SocketAddr,
    pub rest_address: SocketAddr,
    pub etcd_address: SocketAddr,
    /// Unix sockets the armada.v1 and etcd APIs also accept on.
    pub api_unix_socket: Option<UnixSocketSpec>,
    pub etcd_unix_socket: Option<UnixSocketSpec>,
    pub etcd_table: String,
    pub replication_address: SocketAddr,
    pub node: NodeConfig,
    pub log_format: Option<LogFormat>,
    /// TLS per listener (absent: plaintext).
    pub tls: ListenersTls,
    /// How often TLS files are checked for changes.
    pub tls_reload_interval: Duration,
    /// Bearer tokens per API.
    pub tokens: TokenSpecs,
    /// etcd authentication's token lifetime and password hashing.
    pub etcd_auth: crate::node::auth::EtcdAuthConfig,
    /// Connection, stream, rate and keep-alive limits.
    pub limits: crate::limits::Limits,
    /// How long a stopping node hands over its groups (0: it does not).
    pub drain_timeout: Duration,
    /// A running cluster's API this node asks to add it (a joining node).
    pub join: Option<String>,
}

/// Where each API's bearer token comes from (none: the API is open).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSpecs {
    pub kv: Option<crate::auth::TokenSpec>,
    pub tables: Option<crate::auth::TokenSpec>,
    pub cluster: Option<crate::auth::TokenSpec>,
    pub maintenance: Option<crate::auth::TokenSpec>,
    pub replication: Option<crate::auth::TokenSpec>,
}

fn token_spec(
    api: &'static str,
    value: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<crate::auth::TokenSpec>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid("token", api, format!("give --{api}-token or --{api}-token-file, not both"))),
        (Some(v), None) if v.trim().is_empty() => Err(invalid("token", api, "is empty")),
        (Some(v), None) => Ok(Some(crate::auth::TokenSpec::Value(crate::auth::Secret::new(v.trim())))),
        (None, Some(f)) => Ok(Some(crate::auth::TokenSpec::File(f))),
        (None, None) => Ok(None),
    }
}

/// A listener's TLS files (see `crate::tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the listener's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; set:
    /// every client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Client identities let in (common name or subject alternative
    /// name); empty: any certificate the CA issued.
    pub allowed_clients: Vec<String>,
}

/// TLS of each TCP listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenersTls {
    pub api: Option<TlsFiles>,
    pub etcd: Option<TlsFiles>,
    pub replication: Option<TlsFiles>,
    pub rest: Option<TlsFiles>,
    /// Mutual TLS between the nodes (`client_ca`: the cluster CA, always
    /// set; `allowed_clients`: the allowed peers).
    pub raft: Option<TlsFiles>,
}

/// One listener's TLS from its four settings (flag or file).
fn listener_tls(
    listener: &'static str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    allowed: Option<String>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let allowed_clients: Vec<String> =
        allowed.iter().flat_map(|a| a.split(',')).map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
    match (cert, key) {
        (Some(cert), Some(key)) => {
            if !allowed_clients.is_empty() && client_ca.is_none() {
                return Err(invalid(
                    "TLS allowed clients",
                    allowed_clients.join(","),
                    format!("the {listener} listener needs --{listener}-tls-client-ca to check client certificates"),
                ));
            }
            Ok(Some(TlsFiles { cert, key, client_ca, allowed_clients }))
        }
        (None, None) => match (client_ca, allowed_clients.is_empty()) {
            (None, true) => Ok(None),
            _ => Err(invalid(
                "TLS client CA",
                listener,
                format!("client certificates need TLS: give --{listener}-tls-cert and --{listener}-tls-key"),
            )),
        },
        (Some(cert), None) => {
            Err(invalid("TLS certificate", cert.display().to_string(), format!("--{listener}-tls-key is missing")))
        }
        (None, Some(key)) => {
            Err(invalid("TLS key", key.display().to_string(), format!("--{listener}-tls-cert is missing")))
        }
    }
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.into(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile { path: path.into(), message: e.to_string() })
}

/// A listen address: `ip:port`, or `name:port` resolved once at start
/// (the first address the resolver gives).
fn parse_addr(what: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let normalized = parse_peer(what, s)?;
    use std::net::ToSocketAddrs;
    let mut found =
        normalized.to_socket_addrs().map_err(|e| invalid(what, s, format!("cannot resolve the host name: {e}")))?;
    found.next().ok_or_else(|| invalid(what, s, "the host name resolves to no address"))
}

/// An address other nodes or clients dial: `ip:port`, `[ipv6]:port` or
/// `dns-name:port` (resolved by whoever dials, again at each reconnection,
/// so a rescheduled pod's new IP is found). Returned as given, trimmed.
pub fn parse_peer(what: &'static str, s: &str) -> Result<String, ConfigError> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a.to_string());
    }
    let hint = "expected host:port, e.g. 127.0.0.1:5012 or armada-0.armada.default.svc:5012";
    let (host, port) = s.rsplit_once(':').ok_or_else(|| invalid(what, s, format!("no port ({hint})")))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(invalid(what, s, format!("the port must be a number from 1 to 65535 ({hint})"))),
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(invalid(what, s, format!("{host:?} is neither an IP address nor a DNS name ({hint})")));
    }
    Ok(s.to_string())
}

/// The node id of a host named `<name>-<n>` (a StatefulSet's pod): n + 1.
pub fn node_id_from_hostname(host: &str) -> Result<u64, ConfigError> {
    let first = host.split('.').next().unwrap_or(host);
    let n: u64 = first
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| invalid("node id", host, "the host name does not end in -<number> (e.g. armada-0)"))?;
    n.checked_add(1).ok_or_else(|| invalid("node id", host, "the number is too large"))
}

/// Parses `id=host:port[@api_host:port],...`.
pub fn parse_members(s: &str) -> Result<BTreeMap<u64, ArmadaNode>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, rest) =
            part.split_once('=').ok_or_else(|| invalid("initial member", part, "expected id=host:port"))?;
        let id: u64 =
            id.trim().parse().map_err(|_| invalid("initial member", part, "the id must be a positive integer"))?;
        if id == 0 {
            return Err(invalid("initial member", part, "the id must be a positive integer"));
        }
        let (raft, api) = match rest.split_once('@') {
            Some((r, a)) => (r, Some(a)),
            None => (rest, None),
        };
        let raft_addr = parse_peer("initial member address", raft)?;
        let api_addr = match api {
            Some(a) => parse_peer("initial member API address", a)?,
            None => String::new(),
        };
        if out.insert(id, ArmadaNode { raft_addr, api_addr }).is_some() {
            return Err(invalid("initial members", s, format!("node id {id} appears twice")));
        }
    }
    if out.is_empty() {
        return Err(invalid("initial members", s, "no members given"));
    }
    Ok(out)
}

/// Resolves flags/environment (`args`) over the file over the defaults.
pub fn resolve(args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
    let file = match &args.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let node_id = if args.node_id_from_hostname || file.node_id_from_hostname.unwrap_or(false) {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()));
        let host = host.ok_or_else(|| invalid("node id", "", "the host name is unknown (set HOSTNAME)"))?;
        node_id_from_hostname(&host)?
    } else {
        args.node_id.or(file.node_id).unwrap_or(DEFAULT_NODE_ID)
    };
    if node_id == 0 {
        return Err(invalid("node id", "0", "must be a positive integer"));
    }
    let api_address = parse_addr(
        "API address",
        &args.api_address.clone().or(file.api_address).unwrap_or_else(|| DEFAULT_API_ADDRESS.into()),
    )?;
    let raft_address = parse_addr(
        "Raft address",
        &args.raft_address.clone().or(file.raft_address).unwrap_or_else(|| DEFAULT_RAFT_ADDRESS.into()),
    )?;
    let rest_address = parse_addr(
        "HTTP address",
        &args.rest_address.clone().or(file.rest_address).unwrap_or_else(|| DEFAULT_REST_ADDRESS.into()),
    )?;
    let etcd_address = parse_addr(
        "etcd address",
        &args.etcd_address.clone().or(file.etcd_address).unwrap_or_else(|| DEFAULT_ETCD_ADDRESS.into()),
    )?;
    let replication_address = parse_addr(
        "replication address",
        &args
            .replication_address
            .clone()
            .or(file.replication_address)
            .unwrap_or_else(|| DEFAULT_REPLICATION_ADDRESS.into()),
    )?;
    let etcd_table = args.etcd_table.clone().or(file.etcd_table).unwrap_or_else(|| DEFAULT_ETCD_TABLE.into());
    armada_core::command::validate_table_name(&etcd_table)
        .map_err(|e| invalid("etcd table", etcd_table.clone(), e.to_string()))?;
    let mut seen = BTreeMap::new();
    for (what, a) in [
        ("API address", api_address),
        ("Raft address", raft_address),
        ("HTTP address", rest_address),
        ("etcd address", etcd_address),
        ("replication address", replication_address),
    ] {
        // Raft runs over UDP, the others over TCP: only TCP ones may not share a port.
        if what == "Raft address" {
            continue;
        }
        if let Some(other) = seen.insert(a, what) {
            return Err(invalid(what, a.to_string(), format!("the {other} is the same")));
        }
    }
    let history_retention = args
        .history_retention
        .or(file.history_retention)
        .unwrap_or(armada_core::mvcc::replication::CHANGELOG_RETENTION_DEFAULT);
    if history_retention == 0 {
        return Err(invalid("history retention", "0", "must be at least 1 revision"));
    }
    let defaults = RaftTuning::default();
    let snapshot_after_logs =
        args.snapshot_after_logs.or(file.snapshot_after_logs).unwrap_or(defaults.snapshot_after_logs);
    if snapshot_after_logs < 2 {
        return Err(invalid("snapshot interval", snapshot_after_logs.to_string(), "must be at least 2 entries"));
    }
    let snapshot_chunk_bytes =
        args.snapshot_chunk_bytes.or(file.snapshot_chunk_bytes).unwrap_or(defaults.snapshot_chunk_bytes);
    if !(1024..=SNAPSHOT_CHUNK_BYTES_MAX).contains(&snapshot_chunk_bytes) {
        return Err(invalid(
            "snapshot chunk size",
            snapshot_chunk_bytes.to_string(),
            format!("must be between 1024 and {SNAPSHOT_CHUNK_BYTES_MAX} bytes"),
        ));
    }
    let mode = args.auto_compaction_mode.clone().or(file.auto_compaction_mode).unwrap_or_else(|| "periodic".into());
    let retention =
        args.auto_compaction_retention.clone().or(file.auto_compaction_retention).unwrap_or_else(|| "0".into());
    let auto_compaction = armada_core::compaction::parse_retention(&mode, &retention)
        .map_err(|reason| invalid("auto-compaction retention", format!("{mode} {retention}"), reason))?;
    let max_response_bytes = args.max_response_bytes.or(file.max_response_bytes).unwrap_or(defaults.max_response_bytes);
    if !(1024..=MAX_RESPONSE_BYTES_MAX).contains(&max_response_bytes) {
        return Err(invalid(
            "response limit",
            max_response_bytes.to_string(),
            format!("must be between 1024 and {MAX_RESPONSE_BYTES_MAX} bytes"),
        ));
    }
    let compaction_step_records =
        args.compaction_step_records.or(file.compaction_step_records).unwrap_or(defaults.compaction_step_records);
    if !(1..=COMPACTION_STEP_RECORDS_MAX).contains(&compaction_step_records) {
        return Err(invalid(
            "compaction step",
            compaction_step_records.to_string(),
            format!("must be between 1 and {COMPACTION_STEP_RECORDS_MAX} records"),
        ));
    }
    let timeout_ms =
        args.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(DEFAULT_REQUEST_TIMEOUT.as_millis() as u64);
    if timeout_ms == 0 {
        return Err(invalid("request timeout", "0", "must be positive"));
    }
    let initial_members_given = args.initial_members.clone().or(file.initial_members.clone());
    let bootstrap = match args.initial_cluster_state.clone().or(file.initial_cluster_state).as_deref() {
        None | Some("new") => true,
        Some("existing") => false,
        Some("auto") => match &initial_members_given {
            Some(m) => parse_members(m)?.contains_key(&node_id),
            None => true,
        },
        Some(other) => return Err(invalid("initial cluster state", other, "expected new, existing or auto")),
    };
    let join = match args.join.clone().or(file.join) {
        Some(j) => Some(parse_peer("join address", &j)?),
        None => None,
    };
    let advertise = |what: &'static str, given: Option<String>, listen: SocketAddr| -> Result<String, ConfigError> {
        match given {
            Some(a) => parse_peer(what, &a),
            None if listen.ip().is_unspecified() => Ok(String::new()),
            None => Ok(listen.to_string()),
        }
    };
    let advertise_api = advertise(
        "advertised API address",
        args.advertise_api_address.clone().or(file.advertise_api_address),
        api_address,
    )?;
    let advertise_etcd = advertise(
        "advertised etcd address",
        args.advertise_etcd_address.clone().or(file.advertise_etcd_address),
        etcd_address,
    )?;
    let given_advertise_raft = args.advertise_raft_address.is_some() || file.advertise_raft_address.is_some();
    let advertise_raft = advertise(
        "advertised Raft address",
        args.advertise_raft_address.clone().or(file.advertise_raft_address),
        raft_address,
    )?;
    let mut members = match args.initial_members.clone().or(file.initial_members) {
        Some(m) => parse_members(&m)?,
        None => BTreeMap::new(),
    };
    let ids: Vec<u64> = members.keys().copied().collect();
    match members.get_mut(&node_id) {
        Some(me) => {
            // The list is what the other nodes dial: it must agree with
            // what this node advertises and, for an IP literal, listens on.
            if given_advertise_raft && me.raft_addr != advertise_raft {
                return Err(invalid(
                    "advertised Raft address",
                    advertise_raft,
                    format!("initial members list node {node_id} at {}", me.raft_addr),
                ));
            }
            let literal = me.raft_addr.parse::<SocketAddr>().ok();
            if literal.is_some_and(|a| a != raft_address) && !raft_address.ip().is_unspecified() {
                return Err(invalid(
                    "Raft address",
                    raft_address.to_string(),
                    format!("initial members list node {node_id} at {}", me.raft_addr),
                ));
            }
            me.api_addr = advertise_api.clone();
        }
        None if bootstrap && !ids.is_empty() => {
            return Err(invalid(
                "initial members",
                format!("{ids:?}"),
                format!(
                    "this node ({node_id}) is not among them (a node joining a running cluster starts with \
                     --initial-cluster-state existing)"
                ),
            ));
        }
        None if bootstrap => {
            // A cluster of one: the others are added later, if ever.
            let raft_addr = if advertise_raft.is_empty() { raft_address.to_string() } else { advertise_raft.clone() };
            members.insert(node_id, ArmadaNode { raft_addr, api_addr: advertise_api.clone() });
        }
        None => {
            if advertise_raft.is_empty() {
                return Err(invalid(
                    "Raft address",
                    raft_address.to_string(),
                    "listening on every interface: give --advertise-raft-address, the address other nodes dial",
                ));
            }
            members.insert(node_id, ArmadaNode { raft_addr: advertise_raft.clone(), api_addr: advertise_api.clone() });
        }
    }
    let tls = ListenersTls {
        api: listener_tls(
            "api",
            args.api_tls_cert.clone().or(file.api_tls_cert),
            args.api_tls_key.clone().or(file.api_tls_key),
            args.api_tls_client_ca.clone().or(file.api_tls_client_ca),
            args.api_tls_allowed_clients.clone().or(file.api_tls_allowed_clients),
        )?,
        etcd: listener_tls(
            "etcd",
            args.etcd_tls_cert.clone().or(file.etcd_tls_cert),
            args.etcd_tls_key.clone().or(file.etcd_tls_key),
            args.etcd_tls_client_ca.clone().or(file.etcd_tls_client_ca),
            args.etcd_tls_allowed_clients.clone().or(file.etcd_tls_allowed_clients),
        )?,
        replication: listener_tls(
            "replication",
            args.replication_tls_cert.clone().or(file.replication_tls_cert),
            args.replication_tls_key.clone().or(file.replication_tls_key),
            args.replication_tls_client_ca.clone().or(file.replication_tls_client_ca),
            args.replication_tls_allowed_clients.clone().or(file.replication_tls_allowed_clients),
        )?,
        rest: listener_tls(
            "rest",
            args.rest_tls_cert.clone().or(file.rest_tls_cert),
            args.rest_tls_key.clone().or(file.rest_tls_key),
            args.rest_tls_client_ca.clone().or(file.rest_tls_client_ca),
            args.rest_tls_allowed_clients.clone().or(file.rest_tls_allowed_clients),
        )?,
        raft: listener_tls(
            "raft",
            args.raft_tls_cert.clone().or(file.raft_tls_cert),
            args.raft_tls_key.clone().or(file.raft_tls_key),
            args.raft_tls_ca.clone().or(file.raft_tls_ca),
            args.raft_tls_allowed_peers.clone().or(file.raft_tls_allowed_peers),
        )?,
    };
    if let Some(raft) = &tls.raft {
        if raft.client_ca.is_none() {
            return Err(invalid(
                "Raft TLS",
                raft.cert.display().to_string(),
                "nodes authenticate each other with the cluster CA: give --raft-tls-ca",
            ));
        }
    }
    let tokens = TokenSpecs {
        kv: token_spec(
            "kv",
            args.kv_token.clone().or(file.kv_token),
            args.kv_token_file.clone().or(file.kv_token_file),
        )?,
        tables: token_spec(
            "tables",
            args.tables_token.clone().or(file.tables_token),
            args.tables_token_file.clone().or(file.tables_token_file),
        )?,
        cluster: token_spec(
            "cluster",
            args.cluster_token.clone().or(file.cluster_token),
            args.cluster_token_file.clone().or(file.cluster_token_file),
        )?,
        maintenance: token_spec(
            "maintenance",
            args.maintenance_token.clone().or(file.maintenance_token),
            args.maintenance_token_file.clone().or(file.maintenance_token_file),
        )?,
        replication: token_spec(
            "replication",
            args.replication_token.clone().or(file.replication_token),
            args.replication_token_file.clone().or(file.replication_token_file),
        )?,
    };
    let allow_plaintext_tokens = args.allow_tokens_over_plaintext || file.allow_tokens_over_plaintext.unwrap_or(false);
    if !allow_plaintext_tokens {
        let api_tokens = [
            ("kv", &tokens.kv),
            ("tables", &tokens.tables),
            ("cluster", &tokens.cluster),
            ("maintenance", &tokens.maintenance),
        ];
        for (api, token) in api_tokens {
            if token.is_some() && tls.api.is_none() {
                return Err(invalid(
                    "token",
                    api,
                    "tokens would travel in the clear: give the API listener TLS (--api-tls-cert) or, for local testing, --allow-tokens-over-plaintext",
                ));
            }
        }
        if tokens.replication.is_some() && tls.replication.is_none() {
            return Err(invalid(
                "token",
                "replication",
                "tokens would travel in the clear: give the replication listener TLS (--replication-tls-cert) or, for local testing, --allow-tokens-over-plaintext",
            ));
        }
    }
    let reload_ms = args
        .tls_reload_interval_ms
        .or(file.tls_reload_interval_ms)
        .unwrap_or(TLS_RELOAD_INTERVAL_DEFAULT.as_millis() as u64);
    if reload_ms == 0 {
        return Err(invalid("TLS reload interval", "0", "must be positive"));
    }
    let unix_socket = |what: &'static str, url: Option<String>, tls: bool| {
        url.map(|u| {
            let spec = UnixSocketSpec::parse(&u).map_err(|e| invalid(what, u.clone(), e))?;
            if spec.tls && !tls {
                return Err(invalid(
                    what,
                    u,
                    "unixs:// serves TLS with the listener's certificate: configure its TLS too",
                ));
            }
            Ok(spec)
        })
        .transpose()
    };
    let api_unix_socket =
        unix_socket("API Unix socket", args.api_unix_socket.clone().or(file.api_unix_socket), tls.api.is_some())?;
    let etcd_unix_socket =
        unix_socket("etcd Unix socket", args.etcd_unix_socket.clone().or(file.etcd_unix_socket), tls.etcd.is_some())?;
    let mut etcd_auth = crate::node::auth::EtcdAuthConfig::default();
    if let Some(ttl) = args.etcd_auth_token_ttl_s.or(file.etcd_auth_token_ttl_s) {
        if ttl == 0 || ttl > 30 * 24 * 3600 {
            return Err(invalid("etcd auth token TTL", ttl.to_string(), "must be 1 s to 30 days"));
        }
        etcd_auth.token_ttl = Duration::from_secs(ttl);
    }
    if let Some(kib) = args.etcd_auth_hash_memory_kib.or(file.etcd_auth_hash_memory_kib) {
        // Argon2 needs at least 8 KiB per lane; above 1 GiB a login could
        // exhaust a node's memory.
        if !(8..=1 << 20).contains(&kib) {
            return Err(invalid("etcd auth hash memory", kib.to_string(), "must be 8 KiB to 1 GiB (in KiB)"));
        }
        etcd_auth.hash_memory_kib = kib;
    }
    let mut limits = crate::limits::Limits::default();
    if let Some(n) = args.max_connections.or(file.max_connections) {
        if n == 0 {
            return Err(invalid("max connections", "0", "must be positive"));
        }
        limits.max_connections = n;
    }
    if let Some(n) = args.max_streams_per_connection.or(file.max_streams_per_connection) {
        if n == 0 {
            return Err(invalid("max streams per connection", "0", "must be positive"));
        }
        limits.max_streams_per_connection = n;
    }
    if let Some(n) = args.requests_per_second.or(file.requests_per_second) {
        limits.requests_per_second = n;
        limits.request_burst = n;
    }
    if let Some(n) = args.request_burst.or(file.request_burst) {
        if limits.requests_per_second == 0 {
            return Err(invalid("request burst", n.to_string(), "needs --requests-per-second"));
        }
        limits.request_burst = n.max(1);
    }
    for (what, v, field) in [
        (
            "keepalive interval",
            args.keepalive_interval_ms.or(file.keepalive_interval_ms),
            &mut limits.keepalive_interval,
        ),
        ("keepalive timeout", args.keepalive_timeout_ms.or(file.keepalive_timeout_ms), &mut limits.keepalive_timeout),
        (
            "first bytes timeout",
            args.first_bytes_timeout_ms.or(file.first_bytes_timeout_ms),
            &mut limits.first_bytes_timeout,
        ),
    ] {
        if let Some(ms) = v {
            if ms == 0 {
                return Err(invalid(what, "0", "must be positive"));
            }
            *field = Duration::from_millis(ms);
        }
    }
    Ok(ServeConfig {
        data_dir,
        api_address,
        raft_address,
        rest_address,
        etcd_address,
        api_unix_socket,
        etcd_unix_socket,
        etcd_table,
        replication_address,
        node: NodeConfig {
            id: node_id,
            members,
            raft: RaftTuning {
                history_retention,
                snapshot_after_logs,
                // Entries kept behind a snapshot, for peers slightly behind.
                logs_kept_after_snapshot: defaults.logs_kept_after_snapshot.min(snapshot_after_logs / 2),
                snapshot_chunk_bytes,
                auto_compaction,
                max_response_bytes,
                compaction_step_records,
                ..defaults
            },
            request_timeout: Duration::from_millis(timeout_ms),
            bootstrap,
            client_addrs: crate::node::config::ClientAddrs { api: advertise_api, etcd: advertise_etcd },
        },
        log_format: file.log_format,
        tls,
        tls_reload_interval: Duration::from_millis(reload_ms),
        tokens,
        etcd_auth,
        limits,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms.or(file.drain_timeout_ms).unwrap_or(10_000)),
        join: if bootstrap { None } else { join },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_a_single_node_leader_on_loopback() {
        let c = resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.api_address.to_string(), DEFAULT_API_ADDRESS);
        assert_eq!(c.node.id, 1);
        assert_eq!(c.node.members.len(), 1);
        assert_eq!(c.node.members[&1].raft_addr, DEFAULT_RAFT_ADDRESS);
        assert_eq!(c.etcd_address.to_string(), DEFAULT_ETCD_ADDRESS);
        assert_eq!(c.etcd_table, DEFAULT_ETCD_TABLE);
        assert_eq!(c.replication_address.to_string(), DEFAULT_REPLICATION_ADDRESS);
        assert_eq!(c.node.raft.auto_compaction, armada_core::compaction::Retention::Off);
        assert_eq!(c.tls, ListenersTls::default(), "plaintext unless configured");
        let c = resolve(&ServeArgs {
            etcd_tls_cert: Some("c.pem".into()),
            etcd_tls_key: Some("k.pem".into()),
            etcd_tls_client_ca: Some("ca.pem".into()),
            etcd_tls_allowed_clients: Some(" app-1, app-2 ,".into()),
            ..Default::default()
        })
        .unwrap();
        let etcd = c.tls.etcd.expect("etcd TLS");
        assert_eq!(etcd.allowed_clients, ["app-1", "app-2"]);
        assert_eq!(etcd.client_ca, Some(PathBuf::from("ca.pem")));
        assert!(c.tls.api.is_none() && c.tls.rest.is_none());
        let c = resolve(&ServeArgs { auto_compaction_retention: Some("30m".into()), ..Default::default() }).unwrap();
        assert_eq!(c.node.raft.auto_compaction, armada_core::compaction::Retention::Period { ms: 1_800_000 });
    }

    #[test]
    fn flags_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("armada-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.toml");
        std::fs::write(
            &f,
            "node_id = 2\ndata_dir = \"/from/file\"\ninitial_members = \"1=127.0.0.1:1,2=127.0.0.1:5012\"\n",
        )
        .unwrap();
        let args = ServeArgs { config: Some(f.clone()), data_dir: Some("/from/flag".into()), ..Default::default() };
        let c = resolve(&args).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.node.id, 2, "the file fills what flags leave open");
        std::fs::write(&f, "node_id = \"two\"\n").unwrap();
        let e = resolve(&ServeArgs { config: Some(f.clone()), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("a.toml") && e.contains("node_id"), "{e}");
        std::fs::write(&f, "nodeid = 2\n").unwrap();
        let e = resolve(&ServeArgs { config: Some(f), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (args, needle) in [
            (ServeArgs { node_id: Some(0), ..Default::default() }, "node id"),
            (ServeArgs { api_address: Some("localhost".into()), ..Default::default() }, "API address"),
            (
                ServeArgs { initial_members: Some("1=127.0.0.1:5012,1=127.0.0.1:5013".into()), ..Default::default() },
                "twice",
            ),
            (ServeArgs { initial_members: Some("2=127.0.0.1:5012".into()), ..Default::default() }, "not among them"),
            (ServeArgs { initial_members: Some("x=1".into()), ..Default::default() }, "positive integer"),
            (ServeArgs { request_timeout_ms: Some(0), ..Default::default() }, "timeout"),
            (
                ServeArgs {
                    auto_compaction_mode: Some("revision".into()),
                    auto_compaction_retention: Some("1h".into()),
                    ..Default::default()
                },
                "not a number of revisions",
            ),
            (ServeArgs { auto_compaction_mode: Some("daily".into()), ..Default::default() }, "auto-compaction mode"),
            (ServeArgs { snapshot_chunk_bytes: Some(10), ..Default::default() }, "snapshot chunk size"),
            (ServeArgs { compaction_step_records: Some(0), ..Default::default() }, "compaction step"),
            (ServeArgs { snapshot_after_logs: Some(1), ..Default::default() }, "snapshot interval"),
            (ServeArgs { etcd_table: Some("no/slash".into()), ..Default::default() }, "etcd table"),
            (ServeArgs { etcd_address: Some("127.0.0.1:8443".into()), ..Default::default() }, "is the same"),
            (ServeArgs { etcd_tls_cert: Some("c.pem".into()), ..Default::default() }, "--etcd-tls-key is missing"),
            (ServeArgs { api_tls_key: Some("k.pem".into()), ..Default::default() }, "--api-tls-cert is missing"),
            (
                ServeArgs { rest_tls_client_ca: Some("ca.pem".into()), ..Default::default() },
                "client certificates need TLS",
            ),
            (
                ServeArgs {
                    replication_tls_cert: Some("c.pem".into()),
                    replication_tls_key: Some("k.pem".into()),
                    replication_tls_allowed_clients: Some("follower-1".into()),
                    ..Default::default()
                },
                "needs --replication-tls-client-ca",
            ),
            (ServeArgs { tls_reload_interval_ms: Some(0), ..Default::default() }, "TLS reload interval"),
            (ServeArgs { kv_token: Some("t".into()), ..Default::default() }, "travel in the clear"),
            (
                ServeArgs { kv_token: Some("t".into()), kv_token_file: Some("f".into()), ..Default::default() },
                "not both",
            ),
            (
                ServeArgs { tables_token: Some(" ".into()), allow_tokens_over_plaintext: true, ..Default::default() },
                "is empty",
            ),
            (
                ServeArgs {
                    raft_tls_cert: Some("c.pem".into()),
                    raft_tls_key: Some("k.pem".into()),
                    ..Default::default()
                },
                "give --raft-tls-ca",
            ),
        ] {
            let e = resolve(&args).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn peers_may_be_dns_names_and_bad_ones_are_refused() {
        assert_eq!(parse_peer("x", "armada-0.armada.ns.svc:5012").unwrap(), "armada-0.armada.ns.svc:5012");
        assert_eq!(parse_peer("x", "10.0.0.1:5012").unwrap(), "10.0.0.1:5012");
        assert_eq!(parse_peer("x", "[::1]:5012").unwrap(), "[::1]:5012");
        for bad in ["armada-0", "host:0", "host:70000", "-bad.host:1", "a..b:1", ":5012", "ho st:1"] {
            assert!(parse_peer("x", bad).is_err(), "{bad}");
        }
        let m = parse_members("1=armada-0.armada:5012,2=armada-1.armada:5012@armada-1.armada:8443").unwrap();
        assert_eq!(m[&2].api_addr, "armada-1.armada:8443");
    }

    #[test]
    fn node_ids_come_from_statefulset_host_names() {
        assert_eq!(node_id_from_hostname("armada-0").unwrap(), 1);
        assert_eq!(node_id_from_hostname("armada-edge-12.armada-headless.ns.svc").unwrap(), 13);
        assert!(node_id_from_hostname("armada").is_err());
        assert!(node_id_from_hostname("armada-x").is_err());
    }

    #[test]
    fn auto_founds_a_listed_node_and_joins_any_other() {
        let args = |id: u64, state: &str| ServeArgs {
            node_id: Some(id),
            initial_members: Some("1=a.svc:5012,2=b.svc:5012".into()),
            initial_cluster_state: Some(state.into()),
            advertise_raft_address: (id > 2).then(|| format!("n{id}.svc:5012")),
            raft_address: Some("0.0.0.0:5012".into()),
            join: Some("armada.svc:8443".into()),
            ..Default::default()
        };
        let founder = resolve(&args(2, "auto")).unwrap();
        assert!(founder.node.bootstrap);
        assert_eq!(founder.join, None, "a founding member joins nothing");
        assert_eq!(founder.node.members[&2].raft_addr, "b.svc:5012");
        let joiner = resolve(&args(3, "auto")).unwrap();
        assert!(!joiner.node.bootstrap);
        assert_eq!(joiner.join.as_deref(), Some("armada.svc:8443"));
        assert_eq!(joiner.node.members[&3].raft_addr, "n3.svc:5012");
        // A node outside the list must say where it is reached.
        let mut a = args(3, "existing");
        a.advertise_raft_address = None;
        assert!(resolve(&a).unwrap_err().to_string().contains("--advertise-raft-address"));
        assert!(resolve(&args(3, "new")).unwrap_err().to_string().contains("not among them"));
        assert!(resolve(&args(1, "sometimes")).unwrap_err().to_string().contains("new, existing or auto"));
    }
}
