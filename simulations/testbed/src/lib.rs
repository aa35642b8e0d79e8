//! splitee's live test bed, on real sockets: [`link`] is the user-space link emulator (a UDP
//! relay that drives `splitee_link`'s per-datagram [`Shaper`](splitee_link::Shaper) for real
//! QUIC traffic, for kernels without netem), and [`demo`] runs a cloud worker, the link and an
//! edge agent together in one process. The fault tests (`simulations/tests/faults.rs`,
//! `link/`, `replay.rs`) build on both.

pub mod demo;
pub mod link;
