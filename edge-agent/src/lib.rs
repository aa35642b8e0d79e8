//! splitee's edge agent: runs the first layers of a multi-exit model on the device, answers
//! confident samples there, offloads the others to a cloud worker over QUIC, and lets a
//! bandit choose the split layer and exit threshold from what it measures.
//!
//! * [`config`] – the TOML configuration.
//! * [`input`] – TSV/CSV, JSON lines and text lines, with per-line errors.
//! * [`edge`] – the compute thread: edge passes and local finishes.
//! * [`cloud`] – the worker connection: deadlines, reconnection with backoff.
//! * [`agent`] – the per-sample loop, pipelining, bandit feedback.
//! * [`state`] – the bandit state on disk.
//! * [`report`] – per-sample records and the summary.
//! * [`metrics`] – Prometheus metrics.
//! * [`profile`] – per-layer cost on this device, written into the config.
//! * [`serve`] – `edge-agent serve`: the local HTTP/JSON API apps on the device call.
//!
//! The binary (`src/main.rs`) parses the command line, picks the device and wires these up.

pub mod agent;
pub mod cloud;
pub mod config;
pub mod edge;
pub mod input;
pub mod metrics;
pub mod profile;
pub mod report;
pub mod serve;
pub mod state;

pub use agent::Agent;

/// The agent's policy for a backend that cannot run here: asked for wgpu without a usable GPU
/// adapter (a build without the feature, no driver, or only a software rasterizer), it says why
/// and runs on the CPU. A device in the field should answer slowly rather than not at all. The
/// demo, which plays an agent, follows it too.
pub const WHEN_BACKEND_UNAVAILABLE: splitee_model::WhenUnavailable =
    splitee_model::WhenUnavailable::FallBackToCpu;
pub use config::AgentConfig;
pub use report::{Answered, SampleRecord, Summary};
