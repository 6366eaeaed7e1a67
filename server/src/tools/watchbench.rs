//! `armada bench watchers`: what idle watchers cost a node, over etcd's
//! Watch protocol (so etcd can be measured the same way). Opens
//! `--streams` watch streams of `--watchers` watchers each (every watcher
//! on a key of its own, none of which is written), waits until every one is
//! created, and reads the server's resident memory from its `/metrics`
//! before and after; then, with all of them held, times `--samples` puts
//! to a watched key until the event arrives.

use std::time::{Duration, Instant};

use armada_proto::etcd as pb;
use serde_json::json;

use super::bench::{fetch_metrics, quantile};

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// etcd v3 endpoint of the node to hold the watchers.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub endpoint: String,
    /// The node's Prometheus endpoint (Armada: http://127.0.0.1:8079/metrics;
    /// etcd: http://127.0.0.1:2379/metrics), for its resident memory.
    #[arg(long)]
    pub metrics: String,
    /// Watch streams to open (each an HTTP/2 stream; spread over
    /// --connections connections).
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// Watchers on each stream.
    #[arg(long, default_value_t = 10)]
    pub watchers: usize,
    /// Connections the streams share.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Put-to-event round trips timed while the watchers are held.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn resident_bytes(metrics: &str) -> anyhow::Result<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no process_resident_memory_bytes in the metrics"))
}

fn create(key: Vec<u8>) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key,
            ..Default::default()
        })),
    }
}

/// An open stream with its request side kept open.
type Held = (tokio::sync::mpsc::Sender<pb::WatchRequest>, tonic::Streaming<pb::WatchResponse>);

/// Opens a stream whose first `n` requests create watchers on `keys`, and
/// waits until all are created.
async fn open(channel: tonic::transport::Channel, keys: Vec<Vec<u8>>) -> anyhow::Result<Held> {
    let n = keys.len();
    let (tx, rx) = tokio::sync::mpsc::channel(n.max(1) + 1);
    // Queued before the call: etcd sends a stream's headers with its first
    // response only.
    for k in keys {
        tx.send(create(k)).await?;
    }
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut responses = pb::watch_client::WatchClient::new(channel).watch(requests).await?.into_inner();
    let mut created = 0;
    while created < n {
        let r = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await
            .map_err(|_| anyhow::anyhow!("watchers not created within 30 s"))??
            .ok_or_else(|| anyhow::anyhow!("the watch stream ended"))?;
        anyhow::ensure!(!r.canceled, "a watcher was refused: {}", r.cancel_reason);
        created += usize::from(r.created);
    }
    Ok((tx, responses))
}

pub async fn watchers(args: &WatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.streams > 0 && args.watchers > 0 && args.connections > 0, "counts must be positive");
    let ep = crate::listen::endpoint(&args.endpoint).map_err(|e| anyhow::anyhow!("invalid endpoint: {e}"))?;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(ep.clone().connect().await?);
    }
    let before = resident_bytes(&fetch_metrics(&args.metrics).await?)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.streams);
    for s in 0..args.streams {
        let keys = (0..args.watchers).map(|w| format!("bench/watch/{s:05}/{w:05}").into_bytes()).collect();
        held.push(open(channels[s % channels.len()].clone(), keys).await?);
    }
    let setup = started.elapsed();
    // Let allocations settle before reading memory again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes(&fetch_metrics(&args.metrics).await?)?;
    let total = args.streams * args.watchers;
    // Event latency with every watcher held: puts to the first stream's
    // first key, each timed until its event arrives on that stream.
    let mut kv = pb::kv_client::KvClient::new(channels[0].clone());
    let (_, stream) = &mut held[0];
    let key = b"bench/watch/00000/00000".to_vec();
    let mut lat = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let t0 = Instant::now();
        kv.put(pb::PutRequest { key: key.clone(), value: format!("{i}").into_bytes(), ..Default::default() }).await?;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .map_err(|_| anyhow::anyhow!("no event within 10 s"))??
                .ok_or_else(|| anyhow::anyhow!("the watch stream ended"))?;
            if !r.events.is_empty() {
                break;
            }
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_watcher = (after - before) / total as f64;
    if args.json {
        println!(
            "{}",
            json!({"endpoint": args.endpoint, "streams": args.streams, "watchers": total,
                   "resident_before_bytes": before, "resident_after_bytes": after,
                   "bytes_per_watcher": per_watcher, "setup_s": setup.as_secs_f64(),
                   "event_p50_ms": ms(quantile(&lat, 0.5)), "event_p99_ms": ms(quantile(&lat, 0.99))})
        );
    } else {
        println!(
            "{total} idle watchers on {} streams: resident memory {:.1} -> {:.1} MiB ({per_watcher:.0} bytes per \
             watcher), created in {:.2} s; put to event p50 {:.3} ms, p99 {:.3} ms",
            args.streams,
            before / 1048576.0,
            after / 1048576.0,
            setup.as_secs_f64(),
            ms(quantile(&lat, 0.5)),
            ms(quantile(&lat, 0.99))
        );
    }
    drop(held);
    Ok(())
}
