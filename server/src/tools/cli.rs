//! Client subcommands: `armada table|kv|cluster …` against a running node's
//! armada.v1 API. Human-readable output by default, `-o json` for scripts.

use armada_proto::v1 as pb;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The node to talk to (its armada.v1 API address: http://, https://,
    /// or a Unix socket, unix:///path or unixs:///path for TLS).
    #[arg(long, env = "ARMADA_ENDPOINT", default_value = "http://127.0.0.1:8443", global = true)]
    pub endpoint: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "human", global = true)]
    pub output: Output,
    #[command(flatten)]
    pub tls: ClientTls,
    /// Bearer token sent with every call (for a node that requires one).
    #[arg(long, env = "ARMADA_TOKEN", value_name = "TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "ARMADA_TOKEN_FILE", value_name = "FILE", global = true, conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Bearer {
    /// Sends `token` (none: nothing).
    pub fn new(token: Option<&crate::auth::Secret>) -> Bearer {
        Bearer(token.and_then(|t| format!("Bearer {}", t.expose()).parse().ok()))
    }
}

impl ClientArgs {
    fn bearer(&self) -> anyhow::Result<Bearer> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("token file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        match token {
            None => Ok(Bearer(None)),
            Some(t) => {
                anyhow::ensure!(!t.is_empty(), "the token is empty");
                let v = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token has characters a header cannot carry"))?;
                Ok(Bearer(Some(v)))
            }
        }
    }
}

/// TLS towards a node (an `https://` or `unixs://` endpoint).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTls {
    /// PEM CA certificates that verify the node's certificate (an
    /// `https://` endpoint needs it).
    #[arg(long, env = "ARMADA_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate to present (mutual TLS), with --tls-key.
    #[arg(long, env = "ARMADA_TLS_CERT", value_name = "FILE", global = true, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ARMADA_TLS_KEY", value_name = "FILE", global = true, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// The rustls configuration for `endpoint`: `None` for `http://`; an
    /// error for `https://` without a CA, or for a CA with `http://`.
    pub fn config(&self, endpoint: &str) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        let https = endpoint.starts_with("https://") || endpoint.starts_with("unixs:");
        match (&self.tls_ca, https) {
            (None, false) => {
                anyhow::ensure!(self.tls_cert.is_none(), "--tls-cert needs an https:// endpoint and --tls-ca");
                Ok(None)
            }
            (None, true) => anyhow::bail!("{endpoint} is TLS: give the CA that issued its certificate with --tls-ca"),
            (Some(_), false) => {
                anyhow::bail!("--tls-ca is for TLS endpoints: use https:// in the endpoint ({endpoint})")
            }
            (Some(ca), true) => {
                let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
                Ok(Some(std::sync::Arc::new(crate::tls::client_config(ca, identity, &[b"h2"])?)))
            }
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum TableCmd {
    /// Create a table.
    Create { name: String },
    /// Delete a table and all its data.
    Delete { name: String },
    /// List tables.
    List,
}

#[derive(Debug, clap::Subcommand)]
pub enum KvCmd {
    /// Set a key's value.
    Put {
        table: String,
        key: String,
        value: String,
        /// Delete the key after this many seconds (it gets a lease of its own).
        #[arg(long, default_value_t = 0)]
        ttl: i64,
    },
    /// Read a key, or every key with a prefix.
    Get {
        table: String,
        key: String,
        /// Read every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Read the table as of this revision.
        #[arg(long = "rev", default_value_t = 0)]
        revision: i64,
        /// Return at most this many keys (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Answer from the contacted node's state (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Only count the keys.
        #[arg(long)]
        count_only: bool,
    },
    /// Read every key (or every key with a prefix) of a table of any size,
    /// streamed in pages that are all read at one revision (IterateRange).
    Scan {
        table: String,
        /// Only keys starting with this (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Read the table as of this revision (default: the latest).
        #[arg(long = "rev", default_value_t = 0)]
        revision: i64,
        /// Key-values per page (default 1000).
        #[arg(long, default_value_t = 0)]
        page_keys: u32,
        /// Answer from the contacted node's state (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Print only the revision, the key count and a SHA-256 over every
        /// key-value (key, value, create and mod revision, version), to
        /// compare two scans byte for byte.
        #[arg(long)]
        digest: bool,
    },
    /// Print the events of a key (or of every key with a prefix) as they
    /// happen, from a past revision first when `--rev` is given, until
    /// interrupted (or `--count` events were printed).
    Watch {
        table: String,
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (default: the next one).
        #[arg(long = "rev", default_value_t = 0)]
        revision: i64,
        /// Print each event's previous value too.
        #[arg(long)]
        prev_kv: bool,
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Delete a key, or every key with a prefix.
    Del {
        table: String,
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// A transaction: if every `--if` holds, run the `--then` operations,
    /// otherwise the `--else` ones.
    ///
    /// Conditions: `KEY value|version|create|mod =|!=|>|< OPERAND`.
    /// Operations: `put KEY VALUE`, `get KEY`, `del KEY`.
    Txn {
        table: String,
        #[arg(long = "if")]
        compares: Vec<String>,
        #[arg(long = "then")]
        then: Vec<String>,
        #[arg(long = "else")]
        otherwise: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCmd {
    /// Raft state of every group on the contacted node.
    Status,
    /// The cluster's members (the same as `member list`).
    Members,
    /// Lists and changes the cluster's members.
    #[command(subcommand)]
    Member(MemberCmd),
}

#[derive(Debug, clap::Subcommand)]
pub enum MemberCmd {
    /// Every member, with the membership epoch and the epoch every Raft
    /// group has reached.
    List,
    /// Adds a node (start it with --initial-cluster-state existing). As a
    /// voter, it joins every group as a learner and is promoted once caught
    /// up.
    Add {
        /// Where the other nodes reach its Raft address (host:port; a DNS
        /// name is fine).
        raft_address: String,
        /// Its node id [default: one more than the largest in use].
        #[arg(long, default_value_t = 0)]
        id: u64,
        #[arg(long, default_value = "")]
        api_address: String,
        #[arg(long, default_value = "")]
        etcd_address: String,
        /// Add it as a learner (promote it later).
        #[arg(long)]
        learner: bool,
        /// Wait until every group has the new membership.
        #[arg(long)]
        wait: bool,
    },
    /// Removes a member from every group.
    Remove {
        id: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Makes a learner a voter.
    Promote {
        id: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Changes a member's Raft address.
    Update {
        id: u64,
        raft_address: String,
        #[arg(long)]
        wait: bool,
    },
}

/// How long `--wait` waits for a membership change to reach every group.
const MEMBER_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The CLI's endpoint is plaintext (`http://`): a transport failure then
/// gets a hint about TLS.
static PLAINTEXT_ENDPOINT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn channel(
    args: &ClientArgs,
) -> anyhow::Result<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    let bearer = args.bearer()?;
    Ok(tonic::service::interceptor::InterceptedService::new(connect(args).await?, bearer))
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Channel> {
    let endpoint = &args.endpoint;
    let tls = args.tls.config(endpoint)?;
    PLAINTEXT_ENDPOINT.store(tls.is_none(), std::sync::atomic::Ordering::Relaxed);
    crate::listen::connect_url(endpoint, tls, std::time::Duration::from_secs(3))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {endpoint}: {e}"))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    use std::error::Error as _;
    match s.source() {
        // A transport failure (the call never reached the service): its
        // causes say why, e.g. a TLS port's refusal of a plaintext client.
        Some(cause) => {
            let why = crate::listen::error_chain(cause);
            let hint = if PLAINTEXT_ENDPOINT.load(std::sync::atomic::Ordering::Relaxed) {
                " (if the node serves TLS on this port, it refuses plaintext: use https:// and --tls-ca)"
            } else {
                ""
            };
            anyhow::anyhow!("{:?}: {}: {why}{hint}", s.code(), s.message())
        }
        None => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
    }
}

fn prefix_end(key: &[u8]) -> Vec<u8> {
    armada_core::engine::prefix_end(key).unwrap_or_else(|| vec![0])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kv_json(kv: &pb::KeyValue) -> serde_json::Value {
    json!({"key": text(&kv.key), "value": text(&kv.value), "create_revision": kv.create_revision,
           "mod_revision": kv.mod_revision, "version": kv.version, "lease": kv.lease})
}

fn header_rev(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

pub async fn table(args: &ClientArgs, cmd: TableCmd) -> anyhow::Result<()> {
    let mut c = pb::tables_client::TablesClient::new(channel(args).await?);
    match cmd {
        TableCmd::Create { name } => {
            let t = c.create(pb::CreateTableRequest { name }).await.map_err(status_err)?.into_inner().table;
            let t = t.ok_or_else(|| anyhow::anyhow!("server returned no table"))?;
            match args.output {
                Output::Human => println!("created table {} (id {})", t.name, t.id),
                Output::Json => println!("{}", json!({"name": t.name, "id": t.id})),
            }
        }
        TableCmd::Delete { name } => {
            c.delete(pb::DeleteTableRequest { name: name.clone() }).await.map_err(status_err)?;
            match args.output {
                Output::Human => println!("deleted table {name}"),
                Output::Json => println!("{}", json!({"deleted": name})),
            }
        }
        TableCmd::List => {
            let ts = c.list(pb::ListTablesRequest {}).await.map_err(status_err)?.into_inner().tables;
            match args.output {
                Output::Human => ts.iter().for_each(|t| println!("{}", t.name)),
                Output::Json => {
                    let v: Vec<_> = ts.iter().map(|t| json!({"name": t.name, "id": t.id})).collect();
                    println!("{}", serde_json::Value::Array(v))
                }
            }
        }
    }
    Ok(())
}

fn parse_op(table: &str, s: &str) -> anyhow::Result<pb::RequestOp> {
    use pb::request_op::Request;
    let words: Vec<&str> = s.split_whitespace().collect();
    let req = match words.as_slice() {
        ["put", k, v] => Request::RequestPut(pb::PutRequest {
            table: table.into(),
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            ..Default::default()
        }),
        ["get", k] => Request::RequestRange(pb::RangeRequest {
            table: table.into(),
            key: k.as_bytes().to_vec(),
            ..Default::default()
        }),
        ["del", k] => Request::RequestDeleteRange(pb::DeleteRangeRequest {
            table: table.into(),
            key: k.as_bytes().to_vec(),
            ..Default::default()
        }),
        _ => anyhow::bail!("cannot parse operation {s:?}: expected `put KEY VALUE`, `get KEY` or `del KEY`"),
    };
    Ok(pb::RequestOp { request: Some(req) })
}

fn parse_compare(s: &str) -> anyhow::Result<pb::Compare> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let words: Vec<&str> = s.split_whitespace().collect();
    let [key, target, op, operand] = words.as_slice() else {
        anyhow::bail!("cannot parse condition {s:?}: expected `KEY value|version|create|mod =|!=|>|< OPERAND`");
    };
    let result = match *op {
        "=" | "==" => CompareResult::Equal,
        "!=" => CompareResult::NotEqual,
        ">" => CompareResult::Greater,
        "<" => CompareResult::Less,
        _ => anyhow::bail!("unknown comparison {op:?} in {s:?}"),
    };
    let int = || operand.parse::<i64>().map_err(|_| anyhow::anyhow!("{operand:?} is not an integer in {s:?}"));
    let (target, union) = match *target {
        "value" => (CompareTarget::Value, TargetUnion::Value(operand.as_bytes().to_vec())),
        "version" => (CompareTarget::Version, TargetUnion::Version(int()?)),
        "create" => (CompareTarget::Create, TargetUnion::CreateRevision(int()?)),
        "mod" => (CompareTarget::Mod, TargetUnion::ModRevision(int()?)),
        _ => anyhow::bail!("unknown compare target {target:?} in {s:?}"),
    };
    Ok(pb::Compare {
        result: result as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(union),
        range_end: vec![],
    })
}

pub async fn kv(args: &ClientArgs, cmd: KvCmd) -> anyhow::Result<()> {
    let mut c = pb::kv_client::KvClient::new(channel(args).await?);
    match cmd {
        KvCmd::Put { table, key, value, ttl } => {
            let r = c
                .put(pb::PutRequest {
                    table,
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    ttl,
                    ..Default::default()
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match (args.output, r.lease) {
                (Output::Human, 0) => println!("OK (revision {})", header_rev(&r.header)),
                (Output::Human, l) => println!("OK (revision {}, lease {l:x}, {ttl} s)", header_rev(&r.header)),
                (Output::Json, _) => println!("{}", json!({"revision": header_rev(&r.header), "lease": r.lease})),
            }
        }
        KvCmd::Scan { table, prefix, revision, page_keys, serializable, digest } => {
            use sha2::Digest;
            let key = if prefix.is_empty() { vec![0] } else { prefix.clone().into_bytes() };
            let req = pb::IterateRangeRequest {
                table,
                key,
                range_end: prefix_end(prefix.as_bytes()),
                revision,
                serializable,
                page_keys,
                ..Default::default()
            };
            let mut stream = c.iterate_range(req).await.map_err(status_err)?.into_inner();
            let (mut hash, mut keys, mut rev) = (sha2::Sha256::new(), 0u64, 0i64);
            while let Some(page) = stream.message().await.map_err(status_err)? {
                rev = header_rev(&page.header);
                for kv in &page.kvs {
                    keys += 1;
                    if digest {
                        for part in [&kv.key, &kv.value] {
                            hash.update((part.len() as u64).to_le_bytes());
                            hash.update(part);
                        }
                        for n in [kv.create_revision, kv.mod_revision, kv.version] {
                            hash.update(n.to_le_bytes());
                        }
                        continue;
                    }
                    match args.output {
                        Output::Human => println!("{}\n{}", text(&kv.key), text(&kv.value)),
                        Output::Json => println!("{}", kv_json(kv)),
                    }
                }
            }
            if digest {
                let sum: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
                match args.output {
                    Output::Human => println!("revision {rev}: {keys} keys, sha256 {sum}"),
                    Output::Json => println!("{}", json!({"revision": rev, "keys": keys, "sha256": sum})),
                }
            }
        }
        KvCmd::Get { table, key, prefix, revision, limit, serializable, count_only } => {
            let range_end = if prefix { prefix_end(key.as_bytes()) } else { vec![] };
            // An empty prefix is every key (etcd's "\0" start).
            let key = if prefix && key.is_empty() { vec![0] } else { key.into_bytes() };
            let r = c
                .range(pb::RangeRequest {
                    table,
                    key,
                    range_end,
                    revision,
                    limit,
                    serializable,
                    count_only,
                    ..Default::default()
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match args.output {
                Output::Human => {
                    for kv in &r.kvs {
                        println!("{}\n{}", text(&kv.key), text(&kv.value));
                    }
                }
                Output::Json => println!(
                    "{}",
                    json!({"revision": header_rev(&r.header), "count": r.count, "more": r.more,
                           "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>()})
                ),
            }
        }
        KvCmd::Watch { table, key, prefix, revision, prev_kv, count } => {
            let range_end = if prefix { prefix_end(key.as_bytes()) } else { vec![] };
            let key = if prefix && key.is_empty() { vec![0] } else { key.into_bytes() };
            let req =
                pb::WatchRequest { table, key, range_end, start_revision: revision, prev_kv, ..Default::default() };
            let mut stream = c.watch(req).await.map_err(status_err)?.into_inner();
            let mut printed = 0u64;
            while let Some(r) = stream.message().await.map_err(status_err)? {
                if r.compact_revision > 0 {
                    anyhow::bail!(
                        "the watch's start is compacted (compaction revision {}): start at a later revision",
                        r.compact_revision
                    );
                }
                for e in &r.events {
                    let put = e.r#type == pb::event::EventType::Put as i32;
                    let kind = if put { "PUT" } else { "DELETE" };
                    let kv = e.kv.clone().unwrap_or_default();
                    match args.output {
                        Output::Human => {
                            println!("{kind}");
                            if let Some(p) = &e.prev_kv {
                                println!("{}\n{}", text(&p.key), text(&p.value));
                            }
                            println!("{}\n{}", text(&kv.key), text(&kv.value));
                        }
                        Output::Json => println!(
                            "{}",
                            json!({"type": kind, "revision": kv.mod_revision, "kv": kv_json(&kv),
                                   "prev_kv": e.prev_kv.as_ref().map(kv_json)})
                        ),
                    }
                    printed += 1;
                    if count > 0 && printed >= count {
                        return Ok(());
                    }
                }
            }
        }
        KvCmd::Del { table, key, prefix } => {
            let range_end = if prefix { prefix_end(key.as_bytes()) } else { vec![] };
            let r = c
                .delete_range(pb::DeleteRangeRequest { table, key: key.into_bytes(), range_end, prev_kv: false })
                .await
                .map_err(status_err)?
                .into_inner();
            match args.output {
                Output::Human => println!("{}", r.deleted),
                Output::Json => println!("{}", json!({"deleted": r.deleted, "revision": header_rev(&r.header)})),
            }
        }
        KvCmd::Txn { table, compares, then, otherwise } => {
            let req = pb::TxnRequest {
                compare: compares.iter().map(|s| parse_compare(s)).collect::<anyhow::Result<_>>()?,
                success: then.iter().map(|s| parse_op(&table, s)).collect::<anyhow::Result<_>>()?,
                failure: otherwise.iter().map(|s| parse_op(&table, s)).collect::<anyhow::Result<_>>()?,
                table,
            };
            let r = c.txn(req).await.map_err(status_err)?.into_inner();
            match args.output {
                Output::Human => {
                    println!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
                    for op in &r.responses {
                        if let Some(pb::response_op::Response::ResponseRange(rr)) = &op.response {
                            for kv in &rr.kvs {
                                println!("{}\n{}", text(&kv.key), text(&kv.value));
                            }
                        }
                    }
                }
                Output::Json => println!("{}", json!({"succeeded": r.succeeded, "revision": header_rev(&r.header)})),
            }
        }
    }
    Ok(())
}

pub async fn cluster(args: &ClientArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    let mut c = pb::cluster_client::ClusterClient::new(channel(args).await?);
    match cmd {
        ClusterCmd::Status => {
            let s = c.status(pb::StatusRequest {}).await.map_err(status_err)?.into_inner();
            match args.output {
                Output::Human => {
                    println!("member {} ({} cluster)", s.member_id, s.role);
                    for g in &s.groups {
                        let name = if g.table.is_empty() { "(catalog)" } else { g.table.as_str() };
                        print!(
                            "{name:<24} leader {} term {} commit {} applied {} revision {}",
                            g.leader_id, g.raft_term, g.raft_commit_index, g.raft_applied_index, g.revision
                        );
                        if s.role == "follower" && !g.table.is_empty() {
                            print!(
                                " leader-revision {} lag {} revisions {:.3} s",
                                g.leader_revision, g.lag_revisions, g.lag_seconds
                            );
                            if !g.replication_state.is_empty() {
                                print!(" replication {}", g.replication_state);
                            }
                            if !g.replication_error.is_empty() {
                                print!(" ({})", g.replication_error);
                            }
                        }
                        println!();
                    }
                }
                Output::Json => {
                    let groups: Vec<_> = s
                        .groups
                        .iter()
                        .map(|g| {
                            json!({"table": g.table, "leader_id": g.leader_id, "raft_term": g.raft_term,
                                        "raft_commit_index": g.raft_commit_index,
                                        "raft_applied_index": g.raft_applied_index, "revision": g.revision,
                                        "leader_revision": g.leader_revision, "lag_revisions": g.lag_revisions,
                                        "lag_seconds": g.lag_seconds,
                                        "replication_state": g.replication_state,
                                        "replication_error": g.replication_error})
                        })
                        .collect();
                    println!("{}", json!({"member_id": s.member_id, "role": s.role, "groups": groups}))
                }
            }
        }
        ClusterCmd::Members | ClusterCmd::Member(MemberCmd::List) => {
            let r = c.member_list(pb::MemberListRequest {}).await.map_err(status_err)?.into_inner();
            print_members(args.output, &r.members, r.epoch, r.settled_epoch);
        }
        ClusterCmd::Member(cmd) => {
            let (r, wait) = match cmd {
                MemberCmd::List => unreachable!("listed above"),
                MemberCmd::Add { raft_address, id, api_address, etcd_address, learner, wait } => {
                    let req = pb::MemberAddRequest { id, raft_address, api_address, etcd_address, learner };
                    (c.member_add(req).await, wait)
                }
                MemberCmd::Remove { id, wait } => (c.member_remove(pb::MemberRemoveRequest { id }).await, wait),
                MemberCmd::Promote { id, wait } => (c.member_promote(pb::MemberPromoteRequest { id }).await, wait),
                MemberCmd::Update { id, raft_address, wait } => {
                    (c.member_update(pb::MemberUpdateRequest { id, raft_address }).await, wait)
                }
            };
            let r = r.map_err(status_err)?.into_inner();
            if let (Output::Human, Some(m)) = (args.output, &r.member) {
                println!("member {} ({})", m.id, if m.learner { "learner" } else { "voter" });
            }
            let (mut epoch, mut settled, mut members) = (r.epoch, r.settled_epoch, r.members);
            if wait {
                let deadline = std::time::Instant::now() + MEMBER_WAIT;
                while settled < epoch {
                    if std::time::Instant::now() > deadline {
                        anyhow::bail!(
                            "the change (epoch {epoch}) has not reached every group after {MEMBER_WAIT:?}; \
                             `armada cluster member list` shows its progress"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let l = c.member_list(pb::MemberListRequest {}).await.map_err(status_err)?.into_inner();
                    // A later change may have followed; ours is done once
                    // the settled epoch passes it.
                    settled = l.settled_epoch;
                    members = l.members;
                    epoch = epoch.min(l.epoch);
                }
            }
            print_members(args.output, &members, epoch, settled);
        }
    }
    Ok(())
}

fn print_members(output: Output, members: &[pb::Member], epoch: u64, settled: u64) {
    match output {
        Output::Human => {
            for m in members {
                let role = if m.learner { "learner" } else { "voter" };
                println!(
                    "{} {} {role} raft={} api={} etcd={}",
                    m.id, m.name, m.raft_address, m.api_address, m.etcd_address
                );
            }
            let state = if settled >= epoch { "settled" } else { "in progress" };
            println!("epoch {epoch} ({state}; every group has reached epoch {settled})");
        }
        Output::Json => {
            let v: Vec<_> = members
                .iter()
                .map(|m| {
                    json!({"id": m.id, "name": m.name, "raft_address": m.raft_address, "api_address": m.api_address,
                           "etcd_address": m.etcd_address, "learner": m.learner})
                })
                .collect();
            println!("{}", json!({"members": v, "epoch": epoch, "settled_epoch": settled}))
        }
    }
}
