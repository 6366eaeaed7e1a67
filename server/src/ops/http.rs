//! HTTP endpoints for operators: `/healthz` (the process is alive),
//! `/readyz` (the node serves its APIs: see [`crate::ops::ready`]) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::listen::Listener;
use crate::node::Node;
use crate::ops::metrics::Metrics;
use crate::ops::ready::Readiness;

#[derive(Clone)]
struct Ctx {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, String) {
    match ctx.readiness.check(&ctx.node) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(waiting) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", waiting.join("\n"))),
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    // Rendering reads storage sizes from the engine: keep it off the reactor.
    tokio::task::spawn_blocking(move || ctx.metrics.render(&ctx.node))
        .await
        .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"))
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: Listener,
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(Ctx { node, metrics, readiness });
    axum::serve(listener.into_incoming(), app).with_graceful_shutdown(shutdown).await
}
