//! The worker's configuration: a TOML file (see `configs/cloud-worker.toml`), overridden by
//! command-line flags. Every key has a default, so an empty file is a valid configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use splitee_common::BackendChoice;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Model directory. A relative path is relative to the current directory (the repository
    /// root in the README's commands), not to the config file.
    pub model: PathBuf,
    pub backend: BackendChoice,
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// TCP address of the HTTP endpoint serving `/metrics` and `/healthz`; none when absent.
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    pub batching: BatchingConfig,
    pub limits: LimitsConfig,
    /// How long a graceful shutdown waits for in-flight requests before closing connections.
    pub shutdown_timeout_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from("models/default"),
            backend: BackendChoice::default(),
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9433))),
            tls: TlsConfig::default(),
            batching: BatchingConfig::default(),
            limits: LimitsConfig::default(),
            shutdown_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the worker, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the worker.
    pub key: PathBuf,
    /// PEM CA certificate(s) for mutual TLS: clients must present a certificate signed by one
    /// of them. Without it any client that trusts the worker may connect.
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: PathBuf::from("certs/server.pem"),
            key: PathBuf::from("certs/server.key.pem"),
            client_ca: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most requests run in one forward pass.
    pub max_batch_size: usize,
    /// Longest a request waits for others to share its batch, counted from the oldest request
    /// in the queue; 0 runs whatever is queued at once.
    pub max_wait_us: u64,
    /// Most requests admitted at once (read, queued or computing). Beyond it a request gets an
    /// immediate `busy` error frame. Also bounds the memory held by request bodies.
    pub max_in_flight: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_wait_us: 2_000,
            max_in_flight: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest accepted sequence; the model's position limit when absent (and never above it).
    pub max_seq_len: Option<usize>,
    /// Concurrent request streams one connection may have open.
    pub max_streams_per_connection: u32,
    /// Longest wait for the rest of a request once its stream opened: a client that stalls
    /// mid-frame cannot hold an in-flight slot for longer.
    pub read_timeout_ms: u64,
    /// Honour the requests' `cloud_exit_threshold` (early exits in the cloud); when false every
    /// request runs to the last layer.
    pub cloud_exits: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_seq_len: None,
            max_streams_per_connection: 256,
            read_timeout_ms: 10_000,
            cloud_exits: true,
        }
    }
}

impl WorkerConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Values that parse but cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        let b = &self.batching;
        anyhow::ensure!(
            b.max_batch_size >= 1,
            "batching.max_batch_size must be at least 1"
        );
        anyhow::ensure!(
            b.max_in_flight >= 1,
            "batching.max_in_flight must be at least 1"
        );
        anyhow::ensure!(
            b.max_batch_size <= usize::from(u16::MAX),
            "batching.max_batch_size must be at most {}",
            u16::MAX
        );
        anyhow::ensure!(
            self.limits.max_streams_per_connection >= 1,
            "limits.max_streams_per_connection must be at least 1"
        );
        anyhow::ensure!(
            self.limits.max_seq_len != Some(0),
            "limits.max_seq_len must be at least 1"
        );
        anyhow::ensure!(
            self.limits.read_timeout_ms >= 1,
            "limits.read_timeout_ms must be at least 1"
        );
        Ok(())
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.batching.max_wait_us)
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.read_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_is_the_default_configuration() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cloud-worker.toml");
        let config = WorkerConfig::from_file(&path).unwrap();
        assert_eq!(config, WorkerConfig::default());
    }

    #[test]
    fn an_empty_file_is_the_default_and_typos_are_errors() {
        assert_eq!(
            WorkerConfig::from_toml("").unwrap(),
            WorkerConfig::default()
        );
        let err = WorkerConfig::from_toml("[batching]\nmax_batch = 4\n").unwrap_err();
        assert!(err.to_string().contains("max_batch"), "{err}");
        let err = WorkerConfig::from_toml("[batching]\nmax_batch_size = 0\n").unwrap_err();
        assert!(err.to_string().contains("max_batch_size"), "{err}");
        let config = WorkerConfig::from_toml(
            "backend = \"ndarray\"\n[tls]\nclient_ca = \"ca.pem\"\n[batching]\nmax_wait_us = 5\n",
        )
        .unwrap();
        assert_eq!(config.backend, BackendChoice::Ndarray);
        assert_eq!(config.tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(config.max_wait(), Duration::from_micros(5));
    }
}
