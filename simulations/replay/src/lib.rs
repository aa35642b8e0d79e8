//! Offline comparison of offloading policies for split early-exit encoders across network
//! conditions, driving the same `splitee_bandits` code as the live edge agent.
//!
//! Recorded per-exit confidences ([`matrix`]) are replayed against device and cloud clocks
//! ([`clock`]) and an uplink model (`splitee_link::Link`: constant, Mahimahi packet traces,
//! per-second throughput traces, capacity spells, step changes) in simulated time ([`sim`]).
//! [`experiment`] sweeps policies × links × λ/o × seeds in parallel from a TOML file and
//! writes CSVs, plots ([`plots`]) and a markdown report. [`synth`] generates a clearly
//! labelled synthetic matrix; [`calibrate`] certifies exit thresholds on a matrix.
//!
//! The simulator core reads no clock and does no I/O; a run is a pure function of its
//! inputs and seed. The crate has neither burn nor tokio among its dependencies.

pub mod calibrate;
pub mod clock;
pub mod experiment;
pub mod matrix;
pub mod plots;
pub mod sim;
pub mod synth;
