//! What splitee's long-running processes (the cloud worker, `edge-agent run` and `serve`, the
//! link emulator) run on, apart from the model: the QUIC + TLS 1.3 transport that moves
//! [`splitee_protocol`] frames, the `/metrics` + `/healthz` endpoint, SIGTERM/SIGINT handling,
//! the `tracing` set-up, and range checks for the numbers a configuration sets.

pub mod http;
pub mod logging;
pub mod settings;
pub mod signals;
pub mod transport;
