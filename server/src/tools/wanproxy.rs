//! `armada wan-proxy`: a TCP proxy that adds WAN latency between a follower
//! cluster and the leader cluster (the simulator's WAN proxy, for real
//! processes and containers; this machine's kernel has no `tc netem`).
//!
//! Each `--route LISTEN=TARGET` accepts connections on LISTEN and connects
//! each to TARGET (a DNS name is resolved per connection). Bytes read in
//! either direction are delivered after `delay` plus a random jitter, in
//! order. A control listener (`--control`) takes one-line commands, so a
//! test harness can change the WAN while it runs:
//! - `delay MS [JITTER_MS]`: new latency for bytes read from now on;
//! - `cut`: every connection is closed and new ones are refused (a WAN
//!   partition); `heal`: accepted again;
//! - `status`: answers `delay MS JITTER_MS cut|ok`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// Options of `armada wan-proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct WanProxyArgs {
    /// LISTEN=TARGET, e.g. 0.0.0.0:9001=leader-1:8444 (repeatable).
    #[arg(long = "route", required = true, value_name = "LISTEN=TARGET")]
    pub routes: Vec<String>,
    /// One-way latency added to every byte, in ms.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Random extra latency of up to this many ms (order is kept).
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Where the control commands are accepted (delay, cut, heal, status).
    #[arg(long, value_name = "HOST:PORT")]
    pub control: Option<String>,
}

/// The WAN's current state, shared by every connection.
struct Wan {
    delay_ms: AtomicU64,
    jitter_ms: AtomicU64,
    cut: AtomicBool,
    /// Raised at every cut: connections opened before it close.
    generation: AtomicU64,
}

impl Wan {
    fn latency(&self) -> Duration {
        let jitter = self.jitter_ms.load(Ordering::Relaxed);
        let extra = if jitter == 0 {
            0
        } else {
            let r = crate::rt::random_bytes(8).ok().and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            r % (jitter + 1)
        };
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed) + extra)
    }
}

/// Runs the proxy until the process is stopped.
pub async fn run(args: WanProxyArgs) -> anyhow::Result<()> {
    let wan = Arc::new(Wan {
        delay_ms: AtomicU64::new(args.delay_ms),
        jitter_ms: AtomicU64::new(args.jitter_ms),
        cut: AtomicBool::new(false),
        generation: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for route in &args.routes {
        let (listen, target) =
            route.split_once('=').ok_or_else(|| anyhow::anyhow!("--route {route:?}: expected LISTEN=TARGET"))?;
        let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
        info!(listen, target, "wan-proxy route");
        tasks.push(tokio::spawn(serve(listener, target.to_string(), wan.clone())));
    }
    if let Some(addr) = &args.control {
        let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        tasks.push(tokio::spawn(control(listener, wan.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn serve(listener: TcpListener, target: String, wan: Arc<Wan>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if wan.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let (target, wan) = (target.clone(), wan.clone());
        tokio::spawn(async move {
            let generation = wan.generation.load(Ordering::SeqCst);
            let server = match TcpStream::connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(target, "wan-proxy: connecting: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = tokio::spawn(pump(cr, sw, wan.clone(), generation));
            let down = tokio::spawn(pump(sr, cw, wan.clone(), generation));
            let _ = up.await;
            let _ = down.await;
        });
    }
}

/// Copies `from` to `to`, each chunk delivered `latency` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    wan: Arc<Wan>,
    generation: u64,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer_wan = wan.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if writer_wan.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = tokio::time::Instant::now();
    loop {
        let n = tokio::select! {
            biased;
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if wan.generation.load(Ordering::SeqCst) != generation { break; }
                continue;
            }
        };
        if wan.generation.load(Ordering::SeqCst) != generation {
            break;
        }
        // In order: never before the previous chunk.
        let at = (tokio::time::Instant::now() + wan.latency()).max(last);
        last = at;
        if tx.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn control(listener: TcpListener, wan: Arc<Wan>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        let wan = wan.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let words: Vec<&str> = line.split_whitespace().collect();
                let answer = match words.as_slice() {
                    ["delay", ms] | ["delay", ms, _] => {
                        match (ms.parse::<u64>(), words.get(2).map(|j| j.parse::<u64>())) {
                            (Ok(ms), None) => {
                                wan.delay_ms.store(ms, Ordering::SeqCst);
                                "ok".to_string()
                            }
                            (Ok(ms), Some(Ok(j))) => {
                                wan.delay_ms.store(ms, Ordering::SeqCst);
                                wan.jitter_ms.store(j, Ordering::SeqCst);
                                "ok".to_string()
                            }
                            _ => "error: delay MS [JITTER_MS]".to_string(),
                        }
                    }
                    ["cut"] => {
                        wan.cut.store(true, Ordering::SeqCst);
                        wan.generation.fetch_add(1, Ordering::SeqCst);
                        "ok".to_string()
                    }
                    ["heal"] => {
                        wan.cut.store(false, Ordering::SeqCst);
                        "ok".to_string()
                    }
                    ["status"] => format!(
                        "delay {} {} {}",
                        wan.delay_ms.load(Ordering::SeqCst),
                        wan.jitter_ms.load(Ordering::SeqCst),
                        if wan.cut.load(Ordering::SeqCst) { "cut" } else { "ok" }
                    ),
                    _ => "error: delay MS [JITTER_MS] | cut | heal | status".to_string(),
                };
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `armada ready`: exits 0 when the node's `/readyz` answers 200 (a
/// container healthcheck for images without a shell or curl).
pub async fn ready(address: &str) -> anyhow::Result<()> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(address))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {address} timed out"))??;
    s.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {address}"))??;
    let code = out.split_whitespace().nth(1).unwrap_or("");
    if code == "200" {
        Ok(())
    } else {
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
        anyhow::bail!("not ready ({code}): {body}")
    }
}
