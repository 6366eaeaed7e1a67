//! Transport over madsim's simulated network (`madsim::net::Endpoint`
//! datagrams). Every fault of the simulated network applies to it: node and
//! link clogging (partitions), packet loss and random latency (reordering).
//! On top of that it can deliver a request twice, drawn from the simulation's
//! seeded generator, to check that duplicate delivery is harmless.
//!
//! Wire: a request is sent with tag [`REQUEST_TAG`] as `(call id, bytes)`;
//! the response comes back tagged with the call id, which is unique per
//! client endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use madsim::net::Endpoint;
use tokio::sync::Semaphore;

use crate::{BoxFuture, Handler, Transport, TransportError, CALLS_IN_FLIGHT_MAX};

/// Tag of requests; call ids (response tags) have the top bit set, so they
/// never equal it.
pub const REQUEST_TAG: u64 = 1;
const CALL_ID_BIT: u64 = 1 << 63;

/// Fault knobs that the simulated world sets from its seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimFaults {
    /// Probability that a request is delivered twice.
    pub duplicate_rate: f64,
}

pub struct SimTransport {
    ep: Endpoint,
    next_call: AtomicU64,
    slots: Semaphore,
    faults: SimFaults,
}

impl SimTransport {
    /// A client endpoint on the current simulated node.
    pub async fn new(faults: SimFaults) -> std::io::Result<Self> {
        let ep = Endpoint::bind("0.0.0.0:0").await?;
        // Call ids start at a random point (drawn from the seed): a restarted
        // node may get its old port back, and a late response to one of its
        // previous incarnation's calls must not match a new call. (Counters
        // starting at a fixed value did exactly that: crashes-3 seed 1 saw a
        // write answered with a months-old revision.)
        let first = madsim::rand::random::<u64>() >> 2;
        Ok(Self { ep, next_call: AtomicU64::new(first), slots: Semaphore::new(CALLS_IN_FLIGHT_MAX), faults })
    }
}

fn parse(addr: &str) -> Result<SocketAddr, TransportError> {
    addr.parse()
        .map_err(|e| TransportError::Unreachable { addr: addr.to_string(), reason: format!("bad address: {e}") })
}

impl Transport for SimTransport {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let target = target.to_string();
        // The deadline covers the whole call (waiting for a slot, sending and
        // receiving), so no step of it can hold a caller forever.
        Box::pin(async move {
            let addr = target.clone();
            match crate::time::timeout(timeout, self.exchange(target, request)).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::Timeout { addr, timeout_ms: timeout.as_millis() as u64 }),
            }
        })
    }
}

impl SimTransport {
    async fn exchange(&self, target: String, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        crate::check_message_size(&request)?;
        let dst = parse(&target)?;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| TransportError::Unreachable { addr: target.clone(), reason: "transport closed".into() })?;
        let id = self.next_call.fetch_add(1, Ordering::Relaxed) | CALL_ID_BIT;
        let unreachable =
            |e: std::io::Error| TransportError::Unreachable { addr: target.clone(), reason: e.to_string() };
        let copies = if self.faults.duplicate_rate > 0.0 && madsim::rand::random::<f64>() < self.faults.duplicate_rate {
            2
        } else {
            1
        };
        if copies == 2 {
            self.ep.send_to_raw(dst, REQUEST_TAG, Box::new((id, request.clone()))).await.map_err(unreachable)?;
        }
        self.ep.send_to_raw(dst, REQUEST_TAG, Box::new((id, request))).await.map_err(unreachable)?;
        // No deadline of its own: the caller's covers the whole exchange
        // (one timer per call; every timer stays in the simulator's queue
        // until it fires, so a second one was pure cost).
        match self.ep.recv_from_raw(id).await {
            Err(e) => Err(unreachable(e)),
            Ok((payload, _)) => match payload.downcast::<Vec<u8>>() {
                Ok(bytes) => Ok(*bytes),
                Err(_) => {
                    Err(TransportError::Unreachable { addr: target.clone(), reason: "malformed response".into() })
                }
            },
        }
    }
}

/// Serves `handler` on `addr` of the current simulated node until the node
/// stops. Each request is handled in its own task.
pub async fn serve(addr: SocketAddr, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    let ep = Arc::new(Endpoint::bind(addr).await?);
    loop {
        let (payload, from) = ep.recv_from_raw(REQUEST_TAG).await?;
        let Ok(msg) = payload.downcast::<(u64, Vec<u8>)>() else {
            // Not one of ours: ignore, as a real server ignores garbage.
            continue;
        };
        let (id, request) = *msg;
        let ep = ep.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            // No response, or a lost one, is the caller's timeout, by design.
            if let Some(response) = handler.handle(request).await {
                let _ = ep.send_to_raw(from, id, Box::new(response)).await;
            }
        });
    }
}
