//! Prometheus metrics of the worker, served by [`splitee_service::http`] on `/metrics` beside
//! `/healthz`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use splitee_protocol::ErrorCode;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// Everything the worker counts. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// Request streams accepted.
    pub requests: Counter,
    /// Requests answered with class probabilities.
    pub answers: Counter,
    errors: Family<CodeLabel, Counter>,
    /// From stream accept to the response written, seconds.
    pub latency: Histogram,
    /// From request received to its batch starting, seconds.
    pub queue: Histogram,
    /// Forward pass of one batch, seconds.
    pub compute: Histogram,
    pub batch_size: Histogram,
    /// Requests admitted and not yet answered.
    pub in_flight: Gauge,
    /// Requests run through the model to an answer.
    pub computed: Counter,
    /// Admitted requests dropped before their answer was computed (queued or mid-batch): their
    /// deadline passed or could not be met.
    pub expired: Counter,
    /// Admitted requests dropped before their answer was computed: their client reset the
    /// stream or left.
    pub cancelled: Counter,
    /// Layers run for requests dropped in the middle of their batch (expired or cancelled
    /// there): the compute spent on answers nobody got.
    pub abandoned_layers: Counter,
    /// Announced body bytes of the requests being received (the receive budget in use).
    pub receiving_bytes: Gauge,
    pub connections: Gauge,
    /// Connections refused at a connection cap (all peers' or one peer's).
    pub connections_refused: Counter,
    /// QUIC Retry packets sent: new connection attempts asked to prove their address.
    pub retries: Counter,
    /// TLS or QUIC handshakes that failed (unknown clients under mutual TLS among them).
    pub handshake_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("splitee_worker");
        // 50 µs … ~1.6 s by doubling: covers a one-layer batch on a GPU to a full model on a
        // slow CPU.
        let seconds = || Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        let metrics = Self {
            requests: Counter::default(),
            answers: Counter::default(),
            errors: Family::default(),
            latency: seconds(),
            queue: seconds(),
            compute: seconds(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            in_flight: Gauge::default(),
            computed: Counter::default(),
            expired: Counter::default(),
            cancelled: Counter::default(),
            abandoned_layers: Counter::default(),
            receiving_bytes: Gauge::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            retries: Counter::default(),
            handshake_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Request streams accepted",
            metrics.requests.clone(),
        );
        registry.register(
            "answers",
            "Requests answered with class probabilities",
            metrics.answers.clone(),
        );
        registry.register(
            "errors",
            "Requests answered with an error frame, by error code",
            metrics.errors.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "From stream accept to the response written",
            Unit::Seconds,
            metrics.latency.clone(),
        );
        registry.register_with_unit(
            "queue_duration",
            "From request received to its batch starting",
            Unit::Seconds,
            metrics.queue.clone(),
        );
        registry.register_with_unit(
            "batch_compute_duration",
            "Forward pass of one batch",
            Unit::Seconds,
            metrics.compute.clone(),
        );
        registry.register(
            "batch_size",
            "Requests per forward pass",
            metrics.batch_size.clone(),
        );
        registry.register(
            "in_flight",
            "Requests admitted and not yet answered",
            metrics.in_flight.clone(),
        );
        registry.register(
            "computed",
            "Requests run through the model to an answer",
            metrics.computed.clone(),
        );
        registry.register(
            "expired",
            "Requests dropped before their answer: the deadline passed or could not be met",
            metrics.expired.clone(),
        );
        registry.register(
            "cancelled",
            "Requests dropped before their answer: the client reset the stream or left",
            metrics.cancelled.clone(),
        );
        registry.register(
            "abandoned_layers",
            "Layers run for requests then dropped mid-batch (expired or cancelled there)",
            metrics.abandoned_layers.clone(),
        );
        registry.register_with_unit(
            "receiving",
            "Announced body bytes of the requests being received",
            Unit::Bytes,
            metrics.receiving_bytes.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at a connection cap",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "retries",
            "QUIC Retry packets sent (address validation of new connections)",
            metrics.retries.clone(),
        );
        registry.register(
            "handshake_failures",
            "Failed TLS/QUIC handshakes (including rejected client certificates)",
            metrics.handshake_failures.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel { code: code.name() })
            .inc();
    }

    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors
            .get_or_create(&CodeLabel { code: code.name() })
            .get()
    }

    pub fn observe_seconds(histogram: &Histogram, duration: Duration) {
        histogram.observe(duration.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
