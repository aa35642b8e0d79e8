//! Offline comparison of offloading policies for split early-exit BERT across network
//! conditions, driving the same `splitee_bandits` code as the live edge agent.
//!
//! Recorded per-exit confidences ([`matrix`]) are replayed against device and cloud clocks
//! ([`clock`]) and an uplink model ([`network`]: constant, Mahimahi packet traces, per-second
//! throughput traces, Gilbert–Elliott outages, step changes) in simulated time ([`sim`]).
//! [`experiment`] sweeps policies × links × λ/o × seeds in parallel from a TOML file and
//! writes CSVs, plots ([`plots`]) and a markdown report. [`synth`] generates a clearly
//! labelled synthetic matrix.
//!
//! The simulator core reads no clock and does no I/O; a run is a pure function of its
//! inputs and seed.
//!
//! Live, on real sockets: [`link`] emulates a network link in user space for real QUIC
//! traffic, and [`demo`] runs a cloud worker, the link and an edge agent together.

pub mod calibrate;
pub mod clock;
pub mod demo;
pub mod error;
pub mod experiment;
pub mod link;
pub mod matrix;
pub mod network;
pub mod plots;
pub mod record;
pub mod sim;
pub mod synth;
pub mod training;
