//! splitee's cloud worker: a QUIC server that finishes split forward passes.
//!
//! Edge agents send the hidden states after their split layer `s` (see
//! [`splitee_protocol`]); the worker runs layers `s+1..L` in dynamic batches on a
//! dedicated compute thread and answers with the final exit's probabilities (or an earlier
//! cloud-side exit's, when the request asks for it), with its own queueing and compute time.
//!
//! * [`config`] – the TOML configuration and its defaults.
//! * [`server`] – connections, request streams, admission control, graceful shutdown.
//! * [`compute`] – the compute thread and the batching policy.
//! * [`metrics`] – Prometheus metrics.
//! * [`status`] – the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), bound before the
//!   model loads.
//! * [`certs`] – `gen-certs`: a development CA with server and client certificates.
//! * [`cid`] – routable connection IDs (QUIC-LB plaintext): the server ID a QUIC-aware load
//!   balancer routes by.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library.

pub mod certs;
pub mod cid;
pub mod compute;
pub mod config;
pub mod metrics;
pub mod server;
pub mod status;

/// The worker's policy for a backend that cannot run here: it never falls back. A worker asked
/// for a GPU and running on the CPU would look healthy to its load balancer while answering
/// many times slower than the fleet was sized for, so it refuses to start and says why
/// (Kubernetes then shows the pod failing instead of quietly slow).
pub const WHEN_BACKEND_UNAVAILABLE: splitee_model::WhenUnavailable =
    splitee_model::WhenUnavailable::Refuse;

pub use certs::{CertOptions, GeneratedCerts, gen_certs};
pub use config::WorkerConfig;
pub use server::Worker;
pub use status::StatusEndpoint;
