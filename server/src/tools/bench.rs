//! `armada bench put|get|range|txn|mixed`: closed-loop benchmarks over
//! etcd's v3 protocol, so the same client measures Armada and etcd alike.
//! Each client sends one request at a time and records its latency;
//! throughput and percentiles cover the measured window only (after a
//! warm-up). Clients share `--connections` connections (HTTP/2 streams of
//! one connection), as etcd's own benchmark tool does with `--conns`.

use std::time::{Duration, Instant};

use armada_proto::etcd as pb;
use serde_json::json;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// etcd v3 endpoint to load (Armada's --etcd-address or an etcd
    /// server); several, comma-separated, share the connections round-robin.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub endpoint: String,
    /// PEM CA of the server's certificate, for https:// endpoints (the
    /// cost of TLS is measured this way).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Connections the clients share, round-robin (default: one per client).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Endpoint for the reads of `get`, `range` and `mixed` (default:
    /// --endpoint), e.g. a follower cluster's node while writes go to the
    /// leader cluster.
    #[arg(long)]
    pub read_endpoint: Option<String>,
    /// Measured duration in seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Warm-up in seconds, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Distinct keys: per client for `put` (overwritten round-robin); the
    /// shared pool that `get` and `mixed` read and write, written once
    /// before the run.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Send each of a client's keys once, then stop: a load of clients ×
    /// keys keys (a failed request is retried, up to 100 times). --seconds
    /// and --warmup are ignored; the whole load is measured.
    #[arg(long)]
    pub once: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The server's Prometheus endpoint (Armada: http://127.0.0.1:8079/metrics;
    /// etcd: http://127.0.0.1:2379/metrics), scraped when the measured window
    /// opens and closes, to report the server's CPU time and fsyncs per
    /// operation from its own counters. Several, comma-separated (every
    /// member of a cluster), are summed.
    #[arg(long)]
    pub metrics: Option<String>,
}

/// The counters a benchmark reads from a server's `/metrics`, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerCounters {
    /// `process_cpu_seconds_total` (Armada and etcd alike).
    pub cpu_seconds: f64,
    /// Syncs that make writes durable: Armada's engine syncs; etcd's WAL
    /// fsyncs plus its backend (bbolt) commits, which fsync too.
    pub fsyncs: f64,
}

/// Metric families whose series sum to [`ServerCounters::fsyncs`].
const FSYNC_FAMILIES: [&str; 3] = [
    "armada_engine_syncs_total",
    "etcd_disk_wal_fsync_duration_seconds_count",
    "etcd_disk_backend_commit_duration_seconds_count",
];

impl ServerCounters {
    /// Reads the counters from a Prometheus text exposition (every series
    /// of a family summed).
    pub fn parse(text: &str) -> Self {
        let family = |name: &str| -> f64 {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let rest = l.strip_prefix(name)?;
                    let rest = match rest.chars().next()? {
                        ' ' => rest,
                        '{' => &rest[rest.find('}')? + 1..],
                        _ => return None,
                    };
                    rest.split_whitespace().next()?.parse::<f64>().ok()
                })
                .sum()
        };
        Self {
            cpu_seconds: family("process_cpu_seconds_total"),
            fsyncs: FSYNC_FAMILIES.iter().map(|f| family(f)).sum(),
        }
    }

    /// Scrapes each of the comma-separated `urls` and sums the counters.
    pub async fn scrape_all(urls: &str) -> anyhow::Result<Self> {
        let mut sum = Self::default();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let c = Self::scrape(url).await?;
            sum.cpu_seconds += c.cpu_seconds;
            sum.fsyncs += c.fsyncs;
        }
        Ok(sum)
    }

    /// Scrapes `url` (plain HTTP).
    pub async fn scrape(url: &str) -> anyhow::Result<Self> {
        Ok(Self::parse(&fetch_metrics(url).await?))
    }
}

/// The body of a Prometheus endpoint (plain HTTP).
pub async fn fetch_metrics(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("--metrics must be an http:// URL"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host)).await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await??;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{url}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

/// Attempts per key in a `--once` load before it counts as an error.
const ONCE_ATTEMPTS: usize = 100;

/// The `q` quantile (0..=1) of sorted latencies.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// What each benchmark request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A durable put of a `value_size` value.
    Put,
    /// A single-key get of a pool key: serializable (local state) or
    /// linearizable.
    Get { serializable: bool },
    /// A range over `keys` keys (written once before the run), answered
    /// whole.
    Range { serializable: bool, keys: usize },
    /// A compare-and-put transaction: each client owns a key and puts it
    /// only if its mod revision is the one the client last wrote.
    Txn,
    /// Gets (`read_percent` of the requests, spread evenly) and puts of
    /// pool keys.
    Mixed { read_percent: u32, serializable: bool },
}

impl Op {
    fn name(self) -> String {
        let reads = |s: bool| if s { "serializable" } else { "linearizable" };
        match self {
            Op::Put => "puts".into(),
            Op::Get { serializable } => format!("{} gets", reads(serializable)),
            Op::Range { serializable, keys } => format!("{} ranges of {keys} keys", reads(serializable)),
            Op::Txn => "compare-and-put txns".into(),
            Op::Mixed { read_percent, serializable } => {
                format!("{read_percent}% {} gets, {}% puts", reads(serializable), 100 - read_percent)
            }
        }
    }

    /// Whether the run reads keys written before it starts.
    fn prefill(self, args: &BenchArgs) -> Option<Vec<Vec<u8>>> {
        match self {
            Op::Get { .. } | Op::Mixed { .. } => Some((0..args.keys).map(pool_key).collect()),
            Op::Range { keys, .. } => Some((0..keys).map(range_key).collect()),
            Op::Put | Op::Txn => None,
        }
    }

    /// Whether request `i` of a client is a read.
    fn reads(self, i: usize) -> bool {
        match self {
            Op::Get { .. } | Op::Range { .. } => true,
            Op::Put | Op::Txn => false,
            // Evenly spread: request i reads when the running share of reads
            // is below the goal.
            Op::Mixed { read_percent, .. } => {
                (i * read_percent as usize) / 100 != ((i + 1) * read_percent as usize) / 100
            }
        }
    }
}

fn pool_key(i: usize) -> Vec<u8> {
    format!("bench/pool/{i:06}").into_bytes()
}

fn range_key(i: usize) -> Vec<u8> {
    format!("bench/range/{i:06}").into_bytes()
}

/// Writes `keys` once, 16 at a time, before the measured run.
async fn prefill(
    client: &pb::kv_client::KvClient<tonic::transport::Channel>,
    keys: Vec<Vec<u8>>,
    value: &[u8],
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let results: Vec<Result<(), tonic::Status>> = futures::stream::iter(keys)
        .map(|key| {
            let mut c = client.clone();
            let value = value.to_vec();
            async move { c.put(pb::PutRequest { key, value, ..Default::default() }).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        anyhow::bail!("writing the keys the benchmark reads: {e}");
    }
    Ok(())
}

/// Connects `n` channels, round-robin over the comma-separated endpoints
/// in `urls` (the members of a cluster).
async fn channels(
    urls: &str,
    n: usize,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<Vec<tonic::transport::Channel>> {
    let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    anyhow::ensure!(!urls.is_empty(), "no endpoint given");
    let tls = match tls_ca {
        Some(ca) => Some(std::sync::Arc::new(crate::tls::client_config(ca, None, &[b"h2"])?)),
        None => None,
    };
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let url = urls[k % urls.len()];
        let ep = crate::listen::endpoint(url)
            .map_err(|e| anyhow::anyhow!("invalid endpoint {url}: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10));
        let tls = if url.starts_with("https://") { tls.clone() } else { None };
        out.push(crate::listen::connect(ep, tls).await?);
    }
    Ok(out)
}

/// One benchmark client: its number, its connections and its transaction
/// key's last written revision.
struct Client {
    c: usize,
    keys: usize,
    value: Vec<u8>,
    writer: pb::kv_client::KvClient<tonic::transport::Channel>,
    reader: pb::kv_client::KvClient<tonic::transport::Channel>,
    txn_rev: i64,
}

impl Client {
    /// Request `i`: `Ok(false)` when a transaction's compare failed.
    async fn request(&mut self, op: Op, i: usize) -> Result<bool, tonic::Status> {
        let Client { c, keys, value, writer, reader, txn_rev } = self;
        let (c, keys) = (*c, *keys);
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        let put = |key: Vec<u8>| pb::PutRequest { key, value: value.to_vec(), ..Default::default() };
        // Pool keys spread over clients so they do not move in step.
        let pool = || pool_key((c.wrapping_mul(7919) + i) % keys);
        match op {
            Op::Put => writer.put(put(format!("bench/{c:04}/{:06}", i % keys).into_bytes())).await.map(|_| true),
            Op::Get { serializable } | Op::Mixed { serializable, .. } if op.reads(i) => {
                reader.range(pb::RangeRequest { key: pool(), serializable, ..Default::default() }).await.map(|_| true)
            }
            Op::Get { .. } => unreachable!("every get reads"),
            Op::Mixed { .. } => writer.put(put(pool())).await.map(|_| true),
            Op::Range { serializable, .. } => reader
                .range(pb::RangeRequest {
                    key: b"bench/range/".to_vec(),
                    range_end: b"bench/range0".to_vec(),
                    serializable,
                    ..Default::default()
                })
                .await
                .map(|_| true),
            Op::Txn => {
                let key = format!("bench/txn/{c:04}").into_bytes();
                let r = writer
                    .txn(pb::TxnRequest {
                        compare: vec![pb::Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Mod as i32,
                            key: key.clone(),
                            target_union: Some(TargetUnion::ModRevision(*txn_rev)),
                            ..Default::default()
                        }],
                        success: vec![pb::RequestOp {
                            request: Some(pb::request_op::Request::RequestPut(put(key.clone()))),
                        }],
                        failure: vec![pb::RequestOp {
                            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                                key,
                                ..Default::default()
                            })),
                        }],
                    })
                    .await?
                    .into_inner();
                if r.succeeded {
                    *txn_rev = r.header.map_or(0, |h| h.revision);
                } else if let Some(pb::response_op::Response::ResponseRange(rr)) =
                    r.responses.first().and_then(|o| o.response.as_ref())
                {
                    *txn_rev = rr.kvs.first().map_or(0, |kv| kv.mod_revision);
                }
                Ok(r.succeeded)
            }
        }
    }
}

/// Waits (up to a minute) until the last key a run prefilled can be read
/// at `reader`.
async fn wait_for_key(reader: &pb::kv_client::KvClient<tonic::transport::Channel>, key: Vec<u8>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let r =
            reader.clone().range(pb::RangeRequest { key: key.clone(), serializable: true, ..Default::default() }).await;
        if r.is_ok_and(|r| !r.into_inner().kvs.is_empty()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the prefilled keys did not reach the read endpoint within 60 s")
}

pub async fn put(args: &BenchArgs) -> anyhow::Result<()> {
    run(args, Op::Put).await
}

/// Runs the closed loop of `op` and prints the result.
pub async fn run(args: &BenchArgs, op: Op) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.seconds > 0 && args.keys > 0,
        "clients, seconds and keys must be positive"
    );
    anyhow::ensure!(!matches!(op, Op::Range { keys: 0, .. }), "a range needs at least one key");
    let conns = args.connections.unwrap_or(args.clients).clamp(1, args.clients);
    let writers = channels(&args.endpoint, conns, args.tls_ca.as_deref()).await?;
    let readers = match &args.read_endpoint {
        Some(url) => channels(url, conns, args.tls_ca.as_deref()).await?,
        None => writers.clone(),
    };
    let value = vec![b'x'; args.value_size];
    if let Some(keys) = op.prefill(args) {
        let last = keys.last().cloned();
        prefill(&pb::kv_client::KvClient::new(writers[0].clone()), keys, &value).await?;
        if let (Some(key), Some(_)) = (last, &args.read_endpoint) {
            // Reads elsewhere (a follower cluster) start once the last
            // prefilled key is there.
            wait_for_key(&pb::kv_client::KvClient::new(readers[0].clone()), key).await?;
        }
    }
    let start = Instant::now();
    let once = args.once;
    let measure_from = if once { start } else { start + Duration::from_secs(args.warmup) };
    let stop_at = measure_from + Duration::from_secs(args.seconds);
    // The server's counters as the measured window opens and closes.
    let scrapes = args.metrics.clone().map(|url| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let first = ServerCounters::scrape_all(&url).await?;
            tokio::time::sleep_until(stop_at.into()).await;
            anyhow::Ok((first, ServerCounters::scrape_all(&url).await?))
        })
    });
    // This client's own CPU over the window: on one machine the client and
    // the server share the cores, and the client's cost per operation
    // bounds what any server can reach.
    let own_cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let first = crate::ops::metrics::ProcessStats::read().map(|p| p.cpu_seconds);
        tokio::time::sleep_until(stop_at.into()).await;
        first.zip(crate::ops::metrics::ProcessStats::read().map(|p| p.cpu_seconds))
    });
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = Client {
            c,
            keys: args.keys,
            value: value.clone(),
            writer: pb::kv_client::KvClient::new(writers[c % conns].clone()),
            reader: pb::kv_client::KvClient::new(readers[c % conns].clone()),
            txn_rev: 0,
        };
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut compare_failures = 0u64;
            // Failed requests in the measured window (retries included),
            // per gRPC code: how many, and the first message.
            let mut failures: std::collections::BTreeMap<String, (u64, String)> = Default::default();
            let mut i = 0usize;
            let mut attempts = 0usize;
            loop {
                let t0 = Instant::now();
                if (once && i >= keys) || (!once && t0 >= stop_at) {
                    break;
                }
                let result = client.request(op, i).await;
                if matches!(result, Ok(false)) && t0 >= measure_from {
                    compare_failures += 1;
                }
                let ok = result.is_ok();
                if let (Err(s), true) = (&result, t0 >= measure_from) {
                    let e = failures.entry(format!("{:?}", s.code())).or_insert((0u64, s.message().to_string()));
                    e.0 += 1;
                }
                attempts += 1;
                if once && !ok && attempts < ONCE_ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                if t0 >= measure_from {
                    if ok {
                        lat.push(t0.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                i += 1;
                attempts = 0;
            }
            (lat, errors, failures, compare_failures)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut failures: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    let mut compare_failures = 0u64;
    for t in tasks {
        let (lat, e, f, cf) = t.await?;
        all.extend(lat);
        errors += e;
        compare_failures += cf;
        for (code, (n, msg)) in f {
            failures.entry(code).or_insert((0, msg)).0 += n;
        }
    }
    let failures_json: serde_json::Map<String, serde_json::Value> =
        failures.iter().map(|(c, (n, m))| (c.clone(), json!({"count": n, "first": m}))).collect();
    all.sort();
    let seconds = if once { start.elapsed().as_secs_f64() } else { args.seconds as f64 };
    let ops_per_s = all.len() as f64 / seconds;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99, p999, max) =
        (quantile(&all, 0.5), quantile(&all, 0.99), quantile(&all, 0.999), all.last().copied().unwrap_or_default());
    // Per operation, from the server's counters over the window (a --once
    // load has no fixed window: not measured).
    let costs = match scrapes {
        Some(t) if !once => {
            let (a, b) = t.await??;
            let n = all.len().max(1) as f64;
            Some(((b.cpu_seconds - a.cpu_seconds) * 1e6 / n, (b.fsyncs - a.fsyncs) / n))
        }
        _ => None,
    };
    let client_cpu = match own_cpu.await? {
        Some((a, b)) if !once => Some((b - a) * 1e6 / all.len().max(1) as f64),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            json!({"endpoint": args.endpoint, "read_endpoint": args.read_endpoint, "op": op.name(),
                   "clients": args.clients, "connections": conns, "seconds": seconds,
                   "compare_failures": compare_failures,
                   "value_size": args.value_size, "ops": all.len(), "errors": errors,
                   "ops_per_second": ops_per_s, "p50_ms": ms(p50), "p99_ms": ms(p99),
                   "p999_ms": ms(p999), "max_ms": ms(max), "failures": failures_json,
                   "server_cpu_us_per_op": costs.map(|c| c.0), "fsyncs_per_op": costs.map(|c| c.1),
                   "client_cpu_us_per_op": client_cpu})
        );
    } else {
        if let Some((cpu, fsyncs)) = costs {
            println!("server: {cpu:.1} µs CPU and {fsyncs:.3} fsyncs per operation");
        }
        if let Some(cpu) = client_cpu {
            println!("client: {cpu:.1} µs CPU per operation");
        }
        if compare_failures > 0 {
            println!("{compare_failures} transactions found another revision than their client wrote");
        }
        println!(
            "{} clients on {conns} connections, {seconds:.1} s, {} B values: {} {} ({errors} errors), \
             {ops_per_s:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            args.clients,
            args.value_size,
            all.len(),
            op.name(),
            ms(p50),
            ms(p99),
            ms(p999),
            ms(max)
        );
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct LagArgs {
    /// etcd v3 endpoint of a leader cluster node (writes go here).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub leader: String,
    /// etcd v3 endpoint of a follower cluster node (reads poll here).
    #[arg(long)]
    pub follower: String,
    /// Writes to time, one at a time.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Most polls of the follower for one write before it counts as lost.
const LAG_POLLS_MAX: usize = 100_000;

/// `armada bench lag`: replication lag as a client sees it. Each sample
/// puts a key at the leader cluster, then polls the follower (serializable
/// reads, back to back) until the key appears at the put's revision; the
/// time from the put's answer to that read is the sample (one read's round
/// trip is the resolution).
pub async fn lag(args: &LagArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples > 0, "samples must be positive");
    let connect = |url: &str| {
        let ep = crate::listen::endpoint(url).map_err(|e| anyhow::anyhow!("invalid endpoint: {e}"));
        async move { anyhow::Ok(pb::kv_client::KvClient::new(ep?.timeout(Duration::from_secs(10)).connect().await?)) }
    };
    let mut leader = connect(&args.leader).await?;
    let mut follower = connect(&args.follower).await?;
    let mut lat = Vec::with_capacity(args.samples);
    let mut polls_total = 0usize;
    for i in 0..args.samples {
        let key = format!("bench/lag/{i:06}").into_bytes();
        let put = leader.put(pb::PutRequest { key: key.clone(), value: b"x".to_vec(), ..Default::default() }).await?;
        let rev = put.into_inner().header.map_or(0, |h| h.revision);
        let t0 = Instant::now();
        let mut seen = false;
        for _ in 0..LAG_POLLS_MAX {
            polls_total += 1;
            let r = follower
                .range(pb::RangeRequest { key: key.clone(), serializable: true, ..Default::default() })
                .await?
                .into_inner();
            if r.kvs.first().is_some_and(|kv| kv.mod_revision >= rev) {
                seen = true;
                break;
            }
        }
        anyhow::ensure!(seen, "revision {rev} did not reach the follower within {LAG_POLLS_MAX} reads");
        lat.push(t0.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99, max) = (quantile(&lat, 0.5), quantile(&lat, 0.99), lat.last().copied().unwrap_or_default());
    let polls = polls_total as f64 / args.samples as f64;
    if args.json {
        println!(
            "{}",
            json!({"leader": args.leader, "follower": args.follower, "samples": args.samples,
                   "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(max), "polls_per_sample": polls})
        );
    } else {
        println!(
            "{} writes: lag p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({polls:.1} follower reads per write)",
            args.samples,
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_counters_sum_their_families() {
        let armada = "# HELP process_cpu_seconds_total x\n# TYPE process_cpu_seconds_total counter\n\
                      process_cpu_seconds_total 12.5\narmada_engine_syncs_total 40\n\
                      armada_engine_syncs_total_extra 99\n";
        assert_eq!(ServerCounters::parse(armada), ServerCounters { cpu_seconds: 12.5, fsyncs: 40.0 });
        let etcd = "process_cpu_seconds_total 3\n\
                    etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 7\n\
                    etcd_disk_wal_fsync_duration_seconds_count 10\n\
                    etcd_disk_backend_commit_duration_seconds_count 2\n";
        assert_eq!(ServerCounters::parse(etcd), ServerCounters { cpu_seconds: 3.0, fsyncs: 12.0 });
        let labelled = "armada_engine_syncs_total{node=\"1\"} 5\narmada_engine_syncs_total{node=\"2\"} 6\n";
        assert_eq!(ServerCounters::parse(labelled).fsyncs, 11.0);
        assert_eq!(ServerCounters::parse(""), ServerCounters::default());
    }

    #[test]
    fn a_mixed_load_reads_its_share_evenly() {
        for pct in [0u32, 10, 50, 90, 100] {
            let op = Op::Mixed { read_percent: pct, serializable: false };
            let reads = (0..1000).filter(|&i| op.reads(i)).count();
            assert_eq!(reads, pct as usize * 10, "{pct}%");
            // Evenly: every window of 100 requests has the share.
            for w in 0..10 {
                assert_eq!((w * 100..(w + 1) * 100).filter(|&i| op.reads(i)).count(), pct as usize);
            }
        }
        assert!((0..10).all(|i| Op::Get { serializable: true }.reads(i)));
        assert!((0..10).all(|i| !Op::Put.reads(i)));
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }
}
