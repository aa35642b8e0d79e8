//! The worker's configuration: a TOML file (see `configs/cloud-worker.toml`), overridden by
//! command-line flags. Every key has a default, so an empty file is a valid configuration, and
//! the defaults are the secure ones: mutual TLS, and every share of the worker bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use splitee_model::BackendChoice;

use crate::cid::QuicLbConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Model directory. A relative path is relative to the current directory (the repository
    /// root in the README's commands), not to the config file.
    pub model: PathBuf,
    pub backend: BackendChoice,
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// TCP address of the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`; none
    /// when absent.
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    pub batching: BatchingConfig,
    pub limits: LimitsConfig,
    /// Routable connection IDs (QUIC-LB plaintext, [`crate::cid`]): the server ID a QUIC-aware
    /// load balancer routes by. Absent: quinn's random IDs. `--quic-lb-server-id` sets
    /// `server_id` (and creates the table with its defaults when the file has none).
    pub quic_lb: Option<QuicLbConfig>,
    /// How long a graceful shutdown waits for in-flight requests before closing connections.
    pub shutdown_timeout_ms: u64,
    /// Serve clients without certificates on an address beyond loopback. Only the command line
    /// sets it (`--insecure-no-client-auth`), never a file, so that it cannot be left behind
    /// in a configuration by accident.
    #[serde(skip)]
    pub insecure_no_client_auth: bool,
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
            quic_lb: None,
            shutdown_timeout_ms: 30_000,
            insecure_no_client_auth: false,
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
    /// of them. On by default; without it any client that trusts the worker could connect, so
    /// the worker then listens on loopback only, unless started with
    /// `--insecure-no-client-auth`.
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsConfig {
    /// The worker's directory of `cloud-worker gen-certs` (everything a worker mounts, and
    /// nothing more: the CA's key is elsewhere).
    fn default() -> Self {
        Self {
            cert: PathBuf::from("certs/worker/server.pem"),
            key: PathBuf::from("certs/worker/server.key.pem"),
            client_ca: Some(PathBuf::from("certs/worker/client-ca.pem")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most requests run in one forward pass.
    pub max_batch_size: usize,
    /// Longest a request waits for others to share its batch, counted from the oldest request
    /// in the queue; 0 runs whatever is queued at once.
    pub max_wait_us: u64,
    /// Most requests admitted at once (received whole, then queued or computing). Beyond it a
    /// request gets an immediate `busy` error frame. Also bounds the memory held by decoded
    /// hidden states.
    pub max_in_flight: usize,
    /// `/readyz` answers 503 (not ready: the Service sends new connections elsewhere) while
    /// the requests in flight are at least this fraction of `max_in_flight`; 1.0 = only at the
    /// bound, where requests are already answered `busy`. In (0, 1].
    pub ready_in_flight_fraction: f64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_wait_us: 2_000,
            max_in_flight: 256,
            ready_in_flight_fraction: 1.0,
        }
    }
}

impl BatchingConfig {
    /// In-flight requests from which `/readyz` says not ready: at least 1, at most the bound.
    pub fn not_ready_at(&self) -> usize {
        ((self.max_in_flight as f64 * self.ready_in_flight_fraction).ceil() as usize)
            .clamp(1, self.max_in_flight)
    }
}

/// What one client may hold of the worker. A request takes an in-flight slot only once its
/// whole frame has arrived; while it arrives it holds receive budget for the body its header
/// announced, and its bytes are allocated as they come. What does not fit is answered `busy` at
/// once. A peer is an IP address, which QUIC's address validation (a Retry for every new
/// connection) makes sure the client really has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest accepted sequence; the model's position limit when absent (and never above it).
    pub max_seq_len: Option<usize>,
    /// Concurrent request streams one connection may have open: its share of the worker
    /// (QUIC enforces it; the hello tells the client).
    pub max_streams_per_connection: u32,
    /// Milliseconds within which a request frame must arrive whole once its stream opened:
    /// a stalled or slow request cannot hold its stream and receive budget for longer.
    pub read_timeout_ms: u64,
    /// Bytes of announced request bodies one connection may be receiving at once.
    pub receive_bytes_per_connection: usize,
    /// Bytes of announced request bodies all connections together may be receiving at once.
    pub receive_bytes: usize,
    /// Open connections (handshakes included); more are refused.
    pub max_connections: usize,
    /// Open connections from one peer.
    pub max_connections_per_peer: usize,
    /// In-flight slots the connections of one peer may hold together.
    pub max_in_flight_per_peer: usize,
    /// Honour the requests' `cloud_exit_threshold` (early exits in the cloud); when false every
    /// request runs to the last layer.
    pub cloud_exits: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_seq_len: None,
            max_streams_per_connection: 32,
            read_timeout_ms: 3_000,
            receive_bytes_per_connection: 4 << 20,
            receive_bytes: 256 << 20,
            max_connections: 256,
            max_connections_per_peer: 16,
            max_in_flight_per_peer: 128,
            cloud_exits: true,
        }
    }
}

impl WorkerConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let config = Self::parse_file(path)?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// The file parsed but not yet validated: for a caller that overrides keys from its
    /// command line first (`--quic-lb-server-id` completing a `[quic_lb]` table), then calls
    /// [`Self::validate`].
    pub fn parse_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Values that parse but cannot work, and values past what the worker can honour (each
    /// range below says why it ends where it does); then the listen address against the TLS
    /// settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (b, l) = (&self.batching, &self.limits);
        splitee_service::settings::check_ranges(&[
            // The answer reports its batch size as a u16; a batch pads to one tensor.
            (
                "batching.max_batch_size",
                b.max_batch_size as u64,
                1..=1_024,
            ),
            ("batching.max_wait_us", b.max_wait_us, 0..=1_000_000),
            // Semaphores hold at most 2^61 permits; far fewer requests fit in memory.
            ("batching.max_in_flight", b.max_in_flight as u64, 1..=65_536),
            (
                "limits.max_streams_per_connection",
                u64::from(l.max_streams_per_connection),
                1..=65_536,
            ),
            ("limits.read_timeout_ms", l.read_timeout_ms, 1..=600_000),
            // Budgets are counted in u32 permits per request and u64 overall.
            (
                "limits.receive_bytes_per_connection",
                l.receive_bytes_per_connection as u64,
                1..=u64::from(u32::MAX),
            ),
            ("limits.receive_bytes", l.receive_bytes as u64, 1..=1 << 40),
            (
                "limits.max_connections",
                l.max_connections as u64,
                1..=1 << 20,
            ),
            (
                "limits.max_connections_per_peer",
                l.max_connections_per_peer as u64,
                1..=1 << 20,
            ),
            (
                "limits.max_in_flight_per_peer",
                l.max_in_flight_per_peer as u64,
                1..=65_536,
            ),
            (
                "limits.max_seq_len",
                l.max_seq_len.map_or(1, |len| len as u64),
                1..=1 << 20,
            ),
            (
                "shutdown_timeout_ms",
                self.shutdown_timeout_ms,
                0..=3_600_000,
            ),
        ])
        .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            b.ready_in_flight_fraction > 0.0 && b.ready_in_flight_fraction <= 1.0,
            "batching.ready_in_flight_fraction must be in (0, 1], got {}",
            b.ready_in_flight_fraction
        );
        if let Some(quic_lb) = &self.quic_lb {
            quic_lb.generator()?;
        }
        anyhow::ensure!(
            l.receive_bytes_per_connection <= l.receive_bytes,
            "limits.receive_bytes_per_connection ({}) is larger than limits.receive_bytes ({})",
            l.receive_bytes_per_connection,
            l.receive_bytes
        );
        if self.insecure_no_client_auth {
            anyhow::ensure!(
                self.tls.client_ca.is_none(),
                "--insecure-no-client-auth and a client CA ({}) contradict each other",
                self.tls
                    .client_ca
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display()
            );
        } else if self.tls.client_ca.is_none() && !self.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {} without tls.client_ca: any client that trusts the \
                 worker's certificate would get answers. Set tls.client_ca (mutual TLS, \
                 `cloud-worker gen-certs` writes certs/worker/client-ca.pem), listen on \
                 loopback, or pass --insecure-no-client-auth",
                self.listen
            );
        }
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
    fn beyond_loopback_the_worker_needs_a_client_ca_or_an_explicit_insecure_flag() {
        let open = WorkerConfig {
            tls: TlsConfig {
                client_ca: None,
                ..TlsConfig::default()
            },
            ..WorkerConfig::default()
        };
        let error = open.validate().unwrap_err().to_string();
        assert!(
            error.contains("0.0.0.0:4433 without tls.client_ca")
                && error.contains("--insecure-no-client-auth"),
            "{error}"
        );
        WorkerConfig {
            listen: "127.0.0.1:4433".parse().unwrap(),
            ..open.clone()
        }
        .validate()
        .unwrap();
        WorkerConfig {
            insecure_no_client_auth: true,
            ..open.clone()
        }
        .validate()
        .unwrap();
        let both = WorkerConfig {
            insecure_no_client_auth: true,
            ..WorkerConfig::default()
        };
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("contradict")
        );
        // The flag cannot come from a file.
        assert!(WorkerConfig::from_toml("insecure_no_client_auth = true\n").is_err());
    }

    #[test]
    fn values_past_what_the_worker_can_honour_are_errors_naming_the_key() {
        for (toml, key) in [
            (
                "[batching]\nmax_in_flight = 18446744073709551615\n",
                "batching.max_in_flight",
            ),
            (
                "[batching]\nmax_batch_size = 100000\n",
                "batching.max_batch_size",
            ),
            ("[limits]\nread_timeout_ms = 0\n", "limits.read_timeout_ms"),
            (
                "[limits]\nmax_streams_per_connection = 0\n",
                "limits.max_streams_per_connection",
            ),
            (
                "[limits]\nmax_connections_per_peer = 0\n",
                "limits.max_connections_per_peer",
            ),
            (
                "[limits]\nreceive_bytes = 1024\n",
                "limits.receive_bytes_per_connection",
            ),
            (
                "shutdown_timeout_ms = 18446744073709551615\n",
                "shutdown_timeout_ms",
            ),
        ] {
            let error = WorkerConfig::from_toml(toml).unwrap_err().to_string();
            assert!(error.contains(key), "{toml:?}: {error}");
        }
    }

    #[test]
    fn quic_lb_and_readiness_keys_parse_and_bad_values_name_the_key() {
        let config = WorkerConfig::from_toml(
            "[batching]\nmax_in_flight = 10\nready_in_flight_fraction = 0.75\n\
             [quic_lb]\nserver_id = \"10.0.0.7\"\nconfig_rotation = 2\n",
        )
        .unwrap();
        assert_eq!(config.batching.not_ready_at(), 8);
        let cids = config.quic_lb.unwrap().generator().unwrap();
        assert_eq!(cids.server_id(), &[10, 0, 0, 7]);
        assert_eq!((cids.config_rotation(), cids.len()), (2, 13));
        assert_eq!(WorkerConfig::default().batching.not_ready_at(), 256);
        for (toml, key) in [
            (
                "[batching]\nready_in_flight_fraction = 0.0\n",
                "batching.ready_in_flight_fraction",
            ),
            (
                "[batching]\nready_in_flight_fraction = 1.5\n",
                "batching.ready_in_flight_fraction",
            ),
            ("[quic_lb]\nserver_id = \"0xabc\"\n", "quic_lb.server_id"),
            (
                "[quic_lb]\nserver_id = \"0x01\"\nnonce_len = 2\n",
                "quic_lb.nonce_len",
            ),
            ("[quic_lb]\nconfig_rotation = 1\n", "quic_lb.server_id"),
        ] {
            let error = WorkerConfig::from_toml(toml).unwrap_err().to_string();
            assert!(error.contains(key), "{toml:?}: {error}");
        }
    }

    /// The Kubernetes manifests agree with the worker: the ConfigMap's file is a valid
    /// configuration once the Deployment's `--quic-lb-server-id $(POD_IP)` completes it, the
    /// probes ask the worker's routes, and the grace period outlasts the drain.
    #[test]
    fn the_kubernetes_manifests_fit_the_worker() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kubernetes");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let configmap = read("configmap.yaml");
        let (_, block) = configmap.split_once("cloud-worker.toml: |\n").unwrap();
        let text: Vec<&str> = block
            .lines()
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .collect();
        let mut config: WorkerConfig = toml::from_str(&text.join("\n")).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--quic-lb-server-id"), "{error}");
        config.quic_lb.as_mut().unwrap().server_id = "10.244.1.5".into();
        config.validate().unwrap();
        assert_eq!(config.listen.port(), 4433);
        assert_eq!(config.metrics_listen.map(|a| a.port()), Some(9433));

        let deployment = read("deployment.yaml");
        for needle in [
            "- --quic-lb-server-id\n            - $(POD_IP)",
            "fieldPath: status.podIP",
            "path: /readyz",
            "path: /healthz",
            "containerPort: 4433\n              protocol: UDP",
            "containerPort: 9433\n              protocol: TCP",
        ] {
            assert!(
                deployment.contains(needle),
                "deployment.yaml lacks {needle:?}"
            );
        }
        // The image's ENTRYPOINT already says `serve --config …`: args only append flags.
        assert!(
            !deployment.contains("- serve\n"),
            "args repeat the ENTRYPOINT"
        );
        let grace: u64 = deployment
            .split_once("terminationGracePeriodSeconds:")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(
            grace * 1000 >= config.shutdown_timeout_ms + 10_000,
            "grace {grace} s vs drain {} ms",
            config.shutdown_timeout_ms
        );
    }

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
        assert_eq!(
            WorkerConfig::default().tls.client_ca,
            Some(PathBuf::from("certs/worker/client-ca.pem"))
        );
        assert_eq!(config.backend, BackendChoice::Ndarray);
        assert_eq!(config.tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(config.max_wait(), Duration::from_micros(5));
    }
}
