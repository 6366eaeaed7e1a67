//! Request metrics of the gRPC services, rendered in Prometheus' text
//! format together with each Raft group's state.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::node::Node;
use crate::types::ReplicationState;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct MethodStats {
    ok: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    sum_us: AtomicU64,
}

/// Counters and latency histograms per gRPC method.
#[derive(Default)]
pub struct Metrics {
    methods: Mutex<BTreeMap<&'static str, std::sync::Arc<MethodStats>>>,
}

impl Metrics {
    /// Runs one request, recording its outcome and latency under `method`.
    /// A plain future around `f` rather than an `async fn`, which would hold
    /// `f` twice (as its argument and as the awaited future) and double the
    /// size of every request's future.
    pub fn timed<F, T, E>(&self, method: &'static str, f: F) -> Timed<'_, F>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        Timed { metrics: self, method, start: std::time::Instant::now(), fut: f }
    }

    pub fn observe(&self, method: &'static str, ok: bool, elapsed: Duration) {
        let stats = self.methods.lock().unwrap_or_else(|p| p.into_inner()).entry(method).or_default().clone();
        if ok {
            stats.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
            if secs <= *le {
                stats.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition of the request metrics and `node`'s groups.
    pub fn render(&self, node: &Node) -> String {
        let mut out = String::new();
        out.push_str("# HELP armada_grpc_requests_total gRPC requests by method and outcome.\n");
        out.push_str("# TYPE armada_grpc_requests_total counter\n");
        let methods: Vec<(&'static str, std::sync::Arc<MethodStats>)> =
            self.methods.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, v.clone())).collect();
        for (m, s) in &methods {
            let _ = writeln!(
                out,
                "armada_grpc_requests_total{{method=\"{m}\",outcome=\"ok\"}} {}",
                s.ok.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "armada_grpc_requests_total{{method=\"{m}\",outcome=\"error\"}} {}",
                s.errors.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP armada_grpc_request_duration_seconds gRPC request latency by method.\n");
        out.push_str("# TYPE armada_grpc_request_duration_seconds histogram\n");
        for (m, s) in &methods {
            for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "armada_grpc_request_duration_seconds_bucket{{method=\"{m}\",le=\"{le}\"}} {}",
                    s.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = s.ok.load(Ordering::Relaxed) + s.errors.load(Ordering::Relaxed);
            let _ = writeln!(out, "armada_grpc_request_duration_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "armada_grpc_request_duration_seconds_sum{{method=\"{m}\"}} {}",
                s.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "armada_grpc_request_duration_seconds_count{{method=\"{m}\"}} {count}");
        }
        let groups = node.status();
        for (name, help, get) in [
            (
                "armada_raft_term",
                "Raft term of the group on this node.",
                (|g: &crate::types::GroupStatus| g.term) as fn(&crate::types::GroupStatus) -> u64,
            ),
            ("armada_raft_leader_id", "Node id of the group's leader as known here (0: none).", |g| {
                g.leader_id.map_or(0, u64::from)
            }),
            ("armada_raft_commit_index", "Committed log index known here.", |g| g.commit_index.get()),
            ("armada_raft_applied_index", "Log index applied here.", |g| g.applied_index.get()),
            ("armada_raft_last_log_index", "Last log index this replica holds.", |g| g.last_log_index.get()),
            ("armada_raft_purged_index", "Last log index purged here (covered by a snapshot).", |g| {
                g.purged_index.get()
            }),
            ("armada_table_revision", "The table's current revision on this node.", |g| g.revision.get()),
            ("armada_table_compacted_revision", "The table's compaction revision on this node.", |g| g.compacted.get()),
            (
                "armada_table_compaction_pending",
                "1 while history a compaction made unreadable is still being removed, in steps.",
                |g| u64::from(g.compaction_pending),
            ),
            (
                "armada_raft_snapshots_installed",
                "Raft snapshots this replica installed since it started (it was behind the purged log).",
                |g| g.raft_snapshots_installed,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for g in &groups {
                let table = if g.table.is_empty() { "(catalog)" } else { g.table.as_str() };
                let _ = writeln!(out, "{name}{{table=\"{table}\"}} {}", get(g));
            }
        }
        if node.is_follower() {
            for (name, help, get) in [
                (
                    "armada_replication_leader_revision",
                    "Follower: the leader cluster's latest revision of the table as last heard here.",
                    (|g: &crate::types::GroupStatus| g.leader_revision.get() as f64)
                        as fn(&crate::types::GroupStatus) -> f64,
                ),
                ("armada_replication_lag_revisions", "Follower: revisions this node is behind the leader.", |g| {
                    g.lag_revisions as f64
                }),
                ("armada_replication_lag_seconds", "Follower: how long this node has been behind, in seconds.", |g| {
                    g.lag_seconds
                }),
                (
                    "armada_replication_snapshots_installed",
                    "Follower: snapshots this node's replication worker installed.",
                    |g| g.snapshots_installed as f64,
                ),
                (
                    "armada_replication_stalled",
                    "Follower: 1 while this node's replication worker has heard nothing from the leader for 5 s.",
                    |g| f64::from(u8::from(matches!(g.replication, ReplicationState::Stalled(_)))),
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for g in groups.iter().filter(|g| !g.table.is_empty()) {
                    let _ = writeln!(out, "{name}{{table=\"{}\"}} {}", g.table, get(g));
                }
            }
        }
        render_costs(&mut out, node);
        out.push_str("# HELP armada_table_storage_bytes Bytes the table takes on this node (log, data, history).\n");
        out.push_str("# TYPE armada_table_storage_bytes gauge\n");
        for (table, bytes) in node.storage_sizes() {
            let _ = writeln!(out, "armada_table_storage_bytes{{table=\"{table}\"}} {bytes}");
        }
        out
    }
}

/// The node's counters of work done, for per-operation costs: divide their
/// change over a benchmark by the operations it ran (`armada bench` does).
fn render_costs(out: &mut String, node: &Node) {
    let io = node.io_stats();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (syncs, sync_nanos) = node.syncs();
    let raft = node.raft_stats();
    let counters = [
        ("armada_engine_writes_total", "Write batches the storage engine took.", get(&io.writes) as f64),
        ("armada_engine_write_bytes_total", "Bytes of the engine's write batches.", get(&io.write_bytes) as f64),
        ("armada_engine_syncs_total", "Syncs (fsyncs) of the storage engine.", syncs as f64),
        ("armada_engine_sync_seconds_total", "Time spent in engine syncs.", sync_nanos as f64 / 1e9),
        (
            "armada_raft_proposals_total",
            "Commands proposed to Raft groups on this node (one log entry each).",
            node.proposals() as f64,
        ),
        ("armada_raft_appends_total", "Raft log appends (one engine write each).", get(&raft.appends) as f64),
        ("armada_raft_appended_entries_total", "Raft log entries appended.", get(&raft.appended_entries) as f64),
        (
            "armada_raft_apply_writes_total",
            "State-machine engine writes (each applies one or more committed entries).",
            get(&raft.apply_writes) as f64,
        ),
        ("armada_raft_applied_entries_total", "Raft log entries applied.", get(&raft.applied_entries) as f64),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let name = "armada_raft_flushes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Waits for a sync, by reason; one sync answers all waiting.\n# TYPE {name} counter"
    );
    for (reason, c) in [("append", &io.flush_appends), ("vote", &io.flush_votes), ("snapshot", &io.flush_snapshots)] {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", get(c));
    }
    if let Some(p) = ProcessStats::read() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time of the process.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            p.cpu_seconds
        );
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory of the process.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            p.resident_bytes
        );
    }
}

/// The process's CPU time and resident memory, from `/proc` (Linux only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

impl ProcessStats {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse(&stat, &status)
    }

    /// `stat`: `/proc/self/stat` (utime and stime are fields 14 and 15, in
    /// clock ticks of 1/100 s, the kernel's fixed USER_HZ); `status`:
    /// `/proc/self/status` (`VmRSS:` in kB).
    fn parse(stat: &str, status: &str) -> Option<Self> {
        // The command name (field 2) is in parentheses and may hold spaces.
        let after = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // `after` starts at field 3.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let rss_kb: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(Self { cpu_seconds: (utime + stime) as f64 / 100.0, resident_bytes: rss_kb * 1024 })
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics::timed`].
    pub struct Timed<'a, F> {
        metrics: &'a Metrics,
        method: &'static str,
        start: std::time::Instant,
        #[pin]
        fut: F,
    }
}

impl<F, T, E> std::future::Future for Timed<'_, F>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let r = std::task::ready!(this.fut.poll(cx));
        this.metrics.observe(this.method, r.is_ok(), this.start.elapsed());
        std::task::Poll::Ready(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_parse_proc_files() {
        let stat = "4242 (armada (node 1)) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 130 0 0 20 0 9 0 100 1000 50";
        let status = "Name:\tarmada\nVmPeak:\t  99999 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        let p = ProcessStats::parse(stat, status).unwrap();
        assert_eq!(p, ProcessStats { cpu_seconds: 3.8, resident_bytes: 20480 * 1024 });
        assert_eq!(ProcessStats::parse("garbage", status), None);
        assert_eq!(ProcessStats::parse(stat, "Name: x\n"), None);
        #[cfg(target_os = "linux")]
        assert!(ProcessStats::read().is_some_and(|p| p.resident_bytes > 0));
    }

    #[test]
    fn buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("Put", true, Duration::from_millis(3));
        m.observe("Put", false, Duration::from_secs(2));
        let s = m.methods.lock().unwrap()["Put"].clone();
        assert_eq!(s.ok.load(Ordering::Relaxed), 1);
        assert_eq!(s.errors.load(Ordering::Relaxed), 1);
        // 3 ms falls in every bucket from 5 ms up; 2 s only in the 5 s one.
        let counts: Vec<u64> = s.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2]);
    }
}
