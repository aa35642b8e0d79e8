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
//! * [`signals`] – graceful shutdown on SIGTERM/SIGINT, at once on a second signal.
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
pub mod signals;
pub mod state;

pub use agent::Agent;
pub use config::AgentConfig;
pub use report::{Answered, SampleRecord, Summary};
