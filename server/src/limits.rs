//! Limits against abuse on the gRPC listeners (armada.v1, etcd v3,
//! replication): how many connections a listener holds, how many streams a
//! connection may open, how fast one client address may send requests, and
//! how long a silent connection lives. Each is named, has a default, and
//! answers with a clear refusal when hit (see `docs/security.md`).
//!
//! What this module does **not** limit: message sizes (the services do:
//! `armada_core::kv::REQUEST_BYTES_MAX` and `--max-response-bytes`, gRPC's
//! decoding limit above them) and the HTTP listener (probes and metrics).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server knows of a connection, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address (none on a Unix socket).
    pub remote_addr: Option<SocketAddr>,
    /// The connection is past its listener's connection limit.
    pub over_limit: bool,
}

/// What a connection past the listener's limit is told.
pub const TOO_MANY_CONNECTIONS: &str =
    "this Armada listener has too many connections open (--max-connections); retry later";

/// The limits of one node's gRPC listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Connections one listener holds at once; past it a new connection is
    /// told "too many connections" (an HTTP/2 GOAWAY) and closed.
    pub max_connections: usize,
    /// HTTP/2 streams (calls, watch and keep-alive streams) one connection
    /// may have open at once; the client queues the rest (gRPC clients
    /// honour the server's SETTINGS).
    pub max_streams_per_connection: u32,
    /// Requests per second one client address may send (0: no limit), with
    /// bursts of up to `request_burst`; past it a call is answered
    /// `RESOURCE_EXHAUSTED` at once.
    pub requests_per_second: u32,
    pub request_burst: u32,
    /// HTTP/2 keep-alive: a ping after this much silence, and the
    /// connection closed when the answer does not come within the timeout
    /// (a vanished client frees its connection and streams).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection that sends nothing for this long after it was accepted
    /// is closed (TLS: the handshake must complete within 10 s instead).
    pub first_bytes_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // An idle HTTP/2 connection costs about 35 KiB here (buffers,
            // HTTP/2 state): `ci/bench-limits` measured 4,096 of them at
            // +143 MiB of resident memory.
            max_connections: 4096,
            max_streams_per_connection: 1024,
            requests_per_second: 0,
            request_burst: 0,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            first_bytes_timeout: Duration::from_secs(10),
        }
    }
}

/// A tonic server with the stream and keep-alive limits of `limits` (the
/// connection limit is the listener's, the rate limit the services').
#[cfg(not(madsim))]
pub fn server(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
}

/// Client addresses whose buckets are kept; past it the least recently
/// seen are forgotten (their clients start again with a full bucket).
pub const RATE_ADDRESSES_MAX: usize = 65_536;

/// A token bucket per client address.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// (tokens, last refill, last use stamp) per address.
    by_address: BTreeMap<IpAddr, (f64, Instant, u64)>,
    stamp: u64,
}

impl RateLimiter {
    /// `None` when `limits` sets no rate.
    pub fn new(limits: &Limits) -> Option<Arc<RateLimiter>> {
        (limits.requests_per_second > 0).then(|| {
            Arc::new(RateLimiter {
                per_second: f64::from(limits.requests_per_second),
                burst: f64::from(limits.request_burst.max(limits.requests_per_second)),
                buckets: Mutex::new(Buckets::default()),
            })
        })
    }

    /// Takes one request's token for `address` at `now`; `false` when its
    /// bucket is empty.
    pub fn admit(&self, address: IpAddr, now: Instant) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.stamp += 1;
        let stamp = b.stamp;
        let (per_second, burst) = (self.per_second, self.burst);
        let entry = b.by_address.entry(address).or_insert((burst, now, stamp));
        let elapsed = now.saturating_duration_since(entry.1).as_secs_f64();
        entry.0 = (entry.0 + elapsed * per_second).min(burst);
        entry.1 = now;
        entry.2 = stamp;
        let admitted = entry.0 >= 1.0;
        if admitted {
            entry.0 -= 1.0;
        }
        if b.by_address.len() > RATE_ADDRESSES_MAX {
            // Forget the least recently seen tenth (rare: a linear scan).
            let mut stamps: Vec<u64> = b.by_address.values().map(|e| e.2).collect();
            stamps.sort_unstable();
            let cut = stamps[stamps.len() / 10];
            b.by_address.retain(|_, e| e.2 > cut);
        }
        admitted
    }

    /// Addresses with a bucket now.
    pub fn addresses(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).by_address.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_holds_at_most_its_burst() {
        let l = RateLimiter::new(&Limits { requests_per_second: 10, request_burst: 20, ..Default::default() }).unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!((0..25).filter(|_| l.admit(a, t0)).count(), 20, "the burst");
        assert!(l.admit(b, t0), "another address has its own bucket");
        assert!(!l.admit(a, t0 + Duration::from_millis(50)), "half a token is not a request");
        assert!(l.admit(a, t0 + Duration::from_millis(100)));
        assert_eq!(
            (0..100).filter(|_| l.admit(a, t0 + Duration::from_secs(100))).count(),
            20,
            "never more than the burst"
        );
        assert!(RateLimiter::new(&Limits::default()).is_none(), "no rate by default");
    }

    #[test]
    fn forgotten_addresses_keep_the_map_bounded() {
        let l = RateLimiter::new(&Limits { requests_per_second: 1, ..Default::default() }).unwrap();
        let t0 = Instant::now();
        for i in 0..(RATE_ADDRESSES_MAX as u32 + 10) {
            l.admit(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.addresses() <= RATE_ADDRESSES_MAX, "{}", l.addresses());
    }
}
