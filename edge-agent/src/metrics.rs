//! Prometheus metrics of the agent, served by [`splitee_common::http`] on `/metrics` beside
//! `/healthz`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

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
    /// 1 while a connection to the cloud worker is up.
    pub cloud_connected: Gauge,
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
            "1 while connected to the cloud worker",
            metrics.cloud_connected.clone(),
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

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
