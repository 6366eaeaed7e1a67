//! What operators look at: Prometheus metrics, readiness, and the HTTP
//! endpoint that serves both (with `/status`).
//!
//! Invariant: read-only. Nothing here changes a node's state; it reads the
//! node's status and counters.

#[cfg(not(madsim))]
pub mod http;
pub mod metrics;
pub mod ready;
