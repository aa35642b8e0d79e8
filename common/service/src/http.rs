//! The small HTTP endpoint both binaries serve: `/metrics` (OpenMetrics text, which Prometheus
//! scrapes natively) and `/healthz` (200 `ok` while serving, 503 `shutting down` once a
//! graceful shutdown began, so a load balancer or supervisor stops sending work first), and,
//! for a server that says when it should get work, `/readyz` ([`readiness_route`]: 200 or 503
//! with a small JSON body).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Renders the current metrics as OpenMetrics text.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct HttpState {
    render: RenderMetrics,
    shutting_down: CancellationToken,
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The `/metrics` and `/healthz` routes, for a server that has more (the edge agent's local
/// API merges them into its own).
pub fn routes(render: RenderMetrics, shutting_down: CancellationToken) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(health))
        .with_state(HttpState {
            render,
            shutting_down,
        })
}

/// What `/readyz` answers: 200 when `ready`, else 503; `body` is sent as JSON either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub body: serde_json::Value,
}

/// Tells the current [`Readiness`]; called on every `/readyz` request, so it must be cheap.
pub type CheckReadiness = Arc<dyn Fn() -> Readiness + Send + Sync>;

/// The `/readyz` route, to merge beside [`routes`].
pub fn readiness_route(check: CheckReadiness) -> Router {
    Router::new().route(
        "/readyz",
        get(move || {
            let check = check.clone();
            async move {
                let readiness = check();
                let status = if readiness.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    [(header::CONTENT_TYPE, "application/json")],
                    format!("{}\n", readiness.body),
                )
            }
        }),
    )
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` is cancelled.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: RenderMetrics,
    shutting_down: CancellationToken,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, routes(render, shutting_down), stop).await
}

/// Serves `router` on `listener` until `stop` is cancelled.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics_page(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (state.render)(),
    )
}

async fn health(State(state): State<HttpState>) -> impl IntoResponse {
    if state.shutting_down.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}
