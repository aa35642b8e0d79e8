//! The link emulator: the sans-IO shaper in simulated time, its configs, and the UDP relay
//! measured with real datagrams on loopback.
//!
//! Statistical tolerances are stated where they are used, as multiples of the estimator's
//! standard deviation (seeded, so a given build always draws the same numbers). Relay timing
//! tolerances allow for tokio's 1 ms timer and a loaded 2-core machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitee_link::BaseTrace;
use splitee_link::{
    BurstLoss, Direction, DirectionStats, Directions, DropCause, LinkConfig, LinkModel,
    LoadedLinkModel, Loss, QueueLimit, Shaper,
};
use splitee_testbed::link::{LinkEmulator, LinkHandle, bind_udp};
use tokio::net::UdpSocket;

// ---------------------------------------------------------------------------------------------
// Helpers

fn ms(v: f64) -> Duration {
    Duration::from_nanos((v * 1e6).round() as u64)
}

fn as_ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn mahimahi(stamps: &[u64], period_ms: u64) -> Arc<BaseTrace> {
    Arc::new(BaseTrace::Packets {
        stamps: stamps.to_vec(),
        period_ms,
    })
}

fn constant(mbps: f64) -> Arc<BaseTrace> {
    Arc::new(BaseTrace::constant(mbps).unwrap())
}

fn shaper(model: LoadedLinkModel) -> Shaper<u32> {
    Shaper::new(model, 7, Direction::Uplink).unwrap()
}

fn limited(trace: Arc<BaseTrace>) -> LoadedLinkModel {
    LinkModel {
        rate: Some(trace),
        ..LinkModel::default()
    }
}

/// Every delivery up to `until_ms`, as (payload, delivery time in ms).
fn drain(shaper: &mut Shaper<u32>, until_ms: f64) -> Vec<(u32, f64)> {
    std::iter::from_fn(|| shaper.poll_delivery(ms(until_ms)))
        .map(|d| (d.packet, as_ms(d.at)))
        .collect()
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A config whose relative paths start in the crate directory.
fn config(text: &str) -> LinkConfig {
    LinkConfig::from_toml(text, crate_dir()).unwrap()
}

fn config_error(text: &str) -> String {
    format!(
        "{:#}",
        LinkConfig::from_toml(text, crate_dir()).unwrap_err()
    )
}

const LTE_UP: &str = "data/traces/verizon-lte-60s.up";

mod configs;
mod relay;
mod shaper;
