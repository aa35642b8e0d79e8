//! Prometheus metrics of the agent, served by [`splitee_service::http`] on `/metrics` beside
//! `/healthz` (on `metrics_listen`, and by `serve` on its API too, with [`ApiMetrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::report::{Answered, SampleRecord};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredLabel {
    answered: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ArmLabel {
    arm: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointResultLabel {
    endpoint: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabel {
    route: &'static str,
    status: u16,
}

/// What the `serve` API counts, beside the agent's own metrics.
#[derive(Clone)]
pub struct ApiMetrics {
    requests: Family<RouteStatusLabel, Counter>,
    duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Texts accepted.
    pub texts: Counter,
    /// Texts accepted and not yet answered.
    pub queued: Gauge,
    /// Answers whose request had already been answered or had gone.
    pub unclaimed: Counter,
}

impl ApiMetrics {
    /// One response on `route` (a route's path, or `"unmatched"`: a closed set of labels).
    pub fn observe(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteStatusLabel { route, status })
            .inc();
        self.duration
            .get_or_create(&RouteLabel { route })
            .observe(seconds);
    }
}

/// Everything the agent counts.
pub struct Metrics {
    registry: Registry,
    samples: Family<AnsweredLabel, Counter>,
    offload_failures: Family<ReasonLabel, Counter>,
    arm_pulls: Family<ArmLabel, Counter>,
    latency: Histogram,
    edge: Histogram,
    network: Histogram,
    bytes_sent: Counter,
    /// 1 while a connection to some cloud worker is up.
    pub cloud_connected: Gauge,
    endpoint_up: Family<EndpointLabel, Gauge>,
    endpoint_offloads: Family<EndpointResultLabel, Counter>,
    offloads_moved: Counter,
    /// Each endpoint's state, behind `cloud_connected`.
    endpoints: Mutex<BTreeMap<SocketAddr, bool>>,
    /// Offloads waiting for the cloud.
    pub in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("splitee_agent");
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let metrics = Self {
            samples: Family::default(),
            offload_failures: Family::default(),
            arm_pulls: Family::default(),
            latency: seconds(),
            edge: seconds(),
            network: seconds(),
            bytes_sent: Counter::default(),
            cloud_connected: Gauge::default(),
            endpoint_up: Family::default(),
            endpoint_offloads: Family::default(),
            offloads_moved: Counter::default(),
            endpoints: Mutex::default(),
            in_flight: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "samples",
            "Samples answered, by where",
            metrics.samples.clone(),
        );
        registry.register(
            "offload_failures",
            "Offloads the cloud did not answer (finished on the device), by reason",
            metrics.offload_failures.clone(),
        );
        registry.register(
            "arm_pulls",
            "Samples played with each arm (split/threshold)",
            metrics.arm_pulls.clone(),
        );
        registry.register_with_unit(
            "latency",
            "From the start of a sample's edge pass to its answer",
            Unit::Seconds,
            metrics.latency.clone(),
        );
        registry.register_with_unit(
            "edge_compute",
            "Tokenizing, embedding, device layers and exits of one sample",
            Unit::Seconds,
            metrics.edge.clone(),
        );
        registry.register_with_unit(
            "network",
            "Offload round trip minus the worker's reported time",
            Unit::Seconds,
            metrics.network.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Request bytes sent to the cloud",
            Unit::Bytes,
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "cloud_connected",
            "1 while connected to at least one cloud worker",
            metrics.cloud_connected.clone(),
        );
        registry.register(
            "cloud_endpoint_up",
            "1 while connected to this worker endpoint",
            metrics.endpoint_up.clone(),
        );
        registry.register(
            "cloud_endpoint_offloads",
            "Offload attempts sent to each worker endpoint, by result (answered, or the failure)",
            metrics.endpoint_offloads.clone(),
        );
        registry.register(
            "cloud_offloads_moved",
            "Offload attempts on another endpoint after one failed, was busy or shutting down",
            metrics.offloads_moved.clone(),
        );
        registry.register(
            "offloads_in_flight",
            "Offloads waiting for the cloud",
            metrics.in_flight.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A worker endpoint's connection came up or went down.
    pub fn endpoint_up(&self, endpoint: SocketAddr, up: bool) {
        let label = EndpointLabel {
            endpoint: endpoint.to_string(),
        };
        self.endpoint_up.get_or_create(&label).set(i64::from(up));
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.insert(endpoint, up);
        let any = endpoints.values().any(|&up| up);
        self.cloud_connected.set(i64::from(any));
    }

    /// Each worker endpoint (by address) and whether it is connected.
    pub fn endpoint_states(&self) -> Vec<(SocketAddr, bool)> {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.iter().map(|(&a, &up)| (a, up)).collect()
    }

    /// One offload attempt on `endpoint` ended: `"answered"` or the failure's kind.
    pub fn endpoint_offload(&self, endpoint: SocketAddr, result: &'static str) {
        self.endpoint_offloads
            .get_or_create(&EndpointResultLabel {
                endpoint: endpoint.to_string(),
                result,
            })
            .inc();
    }

    /// An offload attempt on another endpoint after the previous one's failure.
    pub fn offload_moved(&self) {
        self.offloads_moved.inc();
    }

    pub fn record(&self, record: &SampleRecord, failure: Option<&'static str>) {
        self.samples
            .get_or_create(&AnsweredLabel {
                answered: record.answered.name(),
            })
            .inc();
        if let Some(reason) = failure {
            self.offload_failures
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        if record.answered == Answered::Error {
            return;
        }
        if let Some(arm) = record.arm {
            self.arm_pulls
                .get_or_create(&ArmLabel {
                    arm: format!("{}:{}", arm.split, arm.threshold),
                })
                .inc();
        }
        let latency = &record.latency_ms;
        self.latency.observe(latency.total / 1e3);
        self.edge.observe(latency.edge / 1e3);
        if record.answered == Answered::Cloud {
            self.network.observe(latency.network / 1e3);
        }
        self.bytes_sent.inc_by(record.bytes_sent);
    }

    /// Adds the `serve` API's metrics to this registry.
    pub fn register_api(&mut self) -> ApiMetrics {
        let api = ApiMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            texts: Counter::default(),
            queued: Gauge::default(),
            unclaimed: Counter::default(),
        };
        let registry = self.registry.sub_registry_with_prefix("api");
        registry.register(
            "requests",
            "API requests answered, by route and HTTP status",
            api.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "From a request's arrival to its response, by route",
            Unit::Seconds,
            api.duration.clone(),
        );
        registry.register("texts", "Texts accepted by /v1/classify", api.texts.clone());
        registry.register(
            "queued_texts",
            "Texts accepted and not yet answered by the agent",
            api.queued.clone(),
        );
        registry.register(
            "unclaimed_answers",
            "Answers that came after their request had been answered (deadline) or had gone",
            api.unclaimed.clone(),
        );
        api
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `/metrics` and `/healthz` on `addr` (the config's `metrics_listen`) until `stop`;
/// `/healthz` turns 503 once `shutting_down` is cancelled.
pub async fn spawn_endpoint(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutting_down: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let listener = splitee_service::http::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    Ok(tokio::spawn(splitee_service::http::serve_metrics(
        listener,
        Arc::new(move || metrics.encode()),
        shutting_down,
        stop,
    )))
}
