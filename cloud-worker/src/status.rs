//! The worker's HTTP endpoint: `/metrics`, `/healthz` and `/readyz`
//! ([`splitee_service::http`]).
//!
//! It is bound before the model loads ([`StatusEndpoint::bind`], then
//! [`crate::Worker::start_with_status`]), so that an orchestrator sees the worker alive
//! (`/healthz` 200) but not ready while it loads. `/readyz` answers 200 only while the worker
//! serves and has room; 503 with the reason otherwise:
//!
//! | `state` | status | when |
//! |---|---|---|
//! | `loading` | 503 | the model is loading, the QUIC endpoint not yet bound |
//! | `serving` | 200 | serving, in flight below `not_ready_at` |
//! | `busy` | 503 | in flight ≥ `not_ready_at` (`batching.ready_in_flight_fraction` × `batching.max_in_flight`) |
//! | `draining` | 503 | a graceful shutdown began (SIGTERM): the admitted requests are finishing |
//!
//! The body is one JSON object: `{"ready": …, "state": …, "in_flight": …, "not_ready_at": …,
//! "max_in_flight": …, "model": …}` (`model`, the fingerprint's short form, once loaded).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use splitee_service::http::{self, Readiness};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::metrics::Metrics;

/// What `/readyz` reads: cheap atomics, updated by the worker.
pub struct Status {
    pub(crate) metrics: Arc<Metrics>,
    serving: AtomicBool,
    pub(crate) shutting_down: CancellationToken,
    not_ready_at: usize,
    max_in_flight: usize,
    model: OnceLock<String>,
}

impl Status {
    fn new(config: &WorkerConfig) -> Self {
        Self {
            metrics: Arc::new(Metrics::new()),
            serving: AtomicBool::new(false),
            shutting_down: CancellationToken::new(),
            not_ready_at: config.batching.not_ready_at(),
            max_in_flight: config.batching.max_in_flight,
            model: OnceLock::new(),
        }
    }

    /// The model is loaded and the QUIC endpoint serves.
    pub(crate) fn set_serving(&self, model: String) {
        let _ = self.model.set(model);
        self.serving.store(true, Ordering::Release);
    }

    pub fn readiness(&self) -> Readiness {
        let in_flight = self.metrics.in_flight.get().max(0) as usize;
        let (ready, state) = if !self.serving.load(Ordering::Acquire) {
            (false, "loading")
        } else if self.shutting_down.is_cancelled() {
            (false, "draining")
        } else if in_flight >= self.not_ready_at {
            (false, "busy")
        } else {
            (true, "serving")
        };
        Readiness {
            ready,
            body: serde_json::json!({
                "ready": ready,
                "state": state,
                "in_flight": in_flight,
                "not_ready_at": self.not_ready_at,
                "max_in_flight": self.max_in_flight,
                "model": self.model.get(),
            }),
        }
    }
}

/// The HTTP endpoint, serving from [`Self::bind`] on; a worker takes it over
/// ([`crate::Worker::start_with_status`]). Dropped without a worker, it stops serving.
pub struct StatusEndpoint {
    pub(crate) status: Arc<Status>,
    addr: Option<SocketAddr>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    stop: CancellationToken,
}

impl StatusEndpoint {
    /// Binds `config.metrics_listen` (nothing when absent) and serves `/metrics`, `/healthz`
    /// and `/readyz` (`loading`) at once. Must be called inside a tokio runtime.
    pub async fn bind(config: &WorkerConfig) -> anyhow::Result<Self> {
        let status = Arc::new(Status::new(config));
        let stop = CancellationToken::new();
        let (addr, task) = match config.metrics_listen {
            Some(addr) => {
                let listener = http::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics endpoint {addr}"))?;
                let addr = listener.local_addr()?;
                let render = {
                    let metrics = status.metrics.clone();
                    Arc::new(move || metrics.encode())
                };
                let check = {
                    let status = status.clone();
                    Arc::new(move || status.readiness())
                };
                let router = http::routes(render, status.shutting_down.clone())
                    .merge(http::readiness_route(check));
                let task = tokio::spawn(http::serve_router(listener, router, stop.clone()));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            status,
            addr,
            task,
            stop,
        })
    }

    /// The bound HTTP address (port 0 resolved), if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The serving task and what stops it, for the worker to stop last.
    pub(crate) fn take_task(
        &mut self,
    ) -> Option<(JoinHandle<std::io::Result<()>>, CancellationToken)> {
        self.task.take().map(|task| (task, self.stop.clone()))
    }
}

impl Drop for StatusEndpoint {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.cancel();
        }
    }
}
