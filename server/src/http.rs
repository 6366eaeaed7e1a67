//! HTTP endpoints for operators: `/healthz` (the process is alive),
//! `/readyz` (every local group knows a leader and has applied what it knows
//! to be committed) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::node::Node;

#[derive(Clone)]
struct Ctx {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, String) {
    let groups = ctx.node.status();
    let waiting: Vec<String> = groups
        .iter()
        .filter(|g| g.leader_id == 0 || g.applied_index < g.commit_index)
        .map(|g| if g.table.is_empty() { "(catalog)".to_string() } else { g.table.clone() })
        .collect();
    if groups.is_empty() || !waiting.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", waiting.join(", ")))
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    // Rendering reads storage sizes from the engine: keep it off the reactor.
    tokio::task::spawn_blocking(move || ctx.metrics.render(&ctx.node))
        .await
        .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"))
}

/// Serves the endpoints on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(Ctx { node, metrics });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
