//! The agent's configuration: a TOML file (`configs/edge-agent.toml` and the device presets in
//! `configs/edge/`). Every key but `[arms]` has a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use splitee_bandits::{ArmsConfig, DeviceProfile, ExitsConfig, PolicyConfig, RewardConfig};
use splitee_common::BackendChoice;
use splitee_common::protocol::PayloadEncoding;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Model directory. Relative paths are relative to the current directory.
    #[serde(default = "default_model")]
    pub model: PathBuf,
    #[serde(default)]
    pub backend: BackendChoice,
    /// Encoder layers the device loads (default: all). Fewer save memory; every arm's split
    /// must fit, and a sample the cloud cannot answer then ends at the deepest exit held.
    #[serde(default)]
    pub edge_layers: Option<usize>,
    /// Where the bandit's state is saved and restored; none: every start learns from zero.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Samples between two saves of the state (it is also saved at the end of a run).
    #[serde(default = "default_save_every")]
    pub save_state_every: u64,
    /// TCP address of `/metrics` and `/healthz`; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The cloud worker; without it every sample is answered on the device.
    #[serde(default)]
    pub cloud: Option<CloudConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub exits: ExitsConfig,
    #[serde(default)]
    pub input: InputConfig,
    /// `edge-agent serve`: the local API.
    #[serde(default)]
    pub serve: ServeConfig,
    pub arms: ArmsConfig,
    #[serde(default)]
    pub reward: RewardConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The device's measured per-layer cost, written by `edge-agent profile`; priced with
    /// `reward.edge_costs = "profile"`.
    #[serde(default)]
    pub device: Option<DeviceProfile>,
}

fn default_model() -> PathBuf {
    PathBuf::from("models/default")
}

fn default_save_every() -> u64 {
    100
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// UDP address of the worker (or of a link emulator in front of it).
    pub address: SocketAddr,
    /// Name in the worker's certificate (`localhost` for `cloud-worker gen-certs`).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// PEM CA certificate(s) the worker's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key, for workers that require mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default = "default_encoding")]
    pub encoding: PayloadEncoding,
    /// Ask the worker to stop at its first exit this confident (saves cloud compute).
    #[serde(default)]
    pub cloud_exit_threshold: Option<f32>,
    /// A request not answered within this is answered on the device.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Reconnection backoff: first wait, doubled after every failed attempt up to the max.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Consecutive timed-out requests after which the connection is presumed dead, closed
    /// and re-established (a silent link never closes a QUIC connection before its 30 s idle
    /// timeout).
    #[serde(default = "default_timeouts_before_reconnect")]
    pub timeouts_before_reconnect: u32,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}
fn default_encoding() -> PayloadEncoding {
    PayloadEncoding::F16
}
fn default_request_timeout() -> u64 {
    2_000
}
fn default_connect_timeout() -> u64 {
    2_000
}
fn default_backoff_initial() -> u64 {
    250
}
fn default_backoff_max() -> u64 {
    5_000
}
fn default_timeouts_before_reconnect() -> u32 {
    2
}

impl CloudConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Most samples between the oldest unanswered one and the newest started: bounds the
    /// offloads in flight and the answers held back to keep the output in input order.
    pub window: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self { window: 16 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    /// A longer input line is answered with an error record instead of being run.
    pub max_line_bytes: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            max_line_bytes: 64 * 1024,
        }
    }
}

/// The longest deadline a request may ask for (an hour; longer is surely a mistake, and it
/// keeps instants far from overflowing).
pub const MAX_DEADLINE_MS: u64 = 3_600_000;

/// `edge-agent serve`: the local HTTP/JSON API that programs on the device call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// TCP address of the API. Loopback by default: only programs on the device reach it.
    pub listen: SocketAddr,
    /// Listen on this Unix socket instead of `listen` (a stale socket file is replaced).
    pub unix_socket: Option<PathBuf>,
    /// Texts one request may carry; more is a 400.
    pub max_texts_per_request: usize,
    /// Bytes of one text (UTF-8); a longer one is a 400.
    pub max_text_bytes: usize,
    /// Bytes of a request body; a larger one is a 413.
    pub max_body_bytes: usize,
    /// Texts accepted and not yet answered, over all requests (those waiting for the pipeline
    /// and those in it); a request whose texts do not fit is refused whole with a 429.
    pub max_queued_texts: usize,
    /// The `Retry-After` of a 429 (and of a 503 while the model loads), seconds.
    pub retry_after_s: u64,
    /// A request's deadline when it names none (`deadline_ms`).
    pub default_deadline_ms: u64,
    /// How long after its deadline a request waits for answers being assembled (a device pass
    /// that began before the deadline, an offload cut at it) before giving up on them.
    pub deadline_grace_ms: u64,
    /// On SIGTERM/SIGINT, how long requests in flight may take to be answered before the
    /// agent stops anyway (systemd's TimeoutStopSec must be longer).
    pub drain_timeout_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8780)),
            unix_socket: None,
            max_texts_per_request: 64,
            max_text_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            max_queued_texts: 256,
            retry_after_s: 1,
            default_deadline_ms: 10_000,
            deadline_grace_ms: 100,
            drain_timeout_ms: 15_000,
        }
    }
}

impl ServeConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_texts_per_request >= 1 && self.max_text_bytes >= 1,
            "serve.max_texts_per_request and serve.max_text_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.max_texts_per_request <= self.max_queued_texts,
            "serve.max_texts_per_request ({}) must not exceed serve.max_queued_texts ({}): such \
             a request could never be accepted",
            self.max_texts_per_request,
            self.max_queued_texts
        );
        anyhow::ensure!(
            self.max_text_bytes < self.max_body_bytes,
            "serve.max_text_bytes ({}) must be below serve.max_body_bytes ({})",
            self.max_text_bytes,
            self.max_body_bytes
        );
        // One semaphore permit per queued text (tokio takes up to u32::MAX at once).
        anyhow::ensure!(
            self.max_queued_texts <= u32::MAX as usize,
            "serve.max_queued_texts must be at most {}",
            u32::MAX
        );
        anyhow::ensure!(
            (1..=MAX_DEADLINE_MS).contains(&self.default_deadline_ms),
            "serve.default_deadline_ms must be between 1 and {MAX_DEADLINE_MS}"
        );
        anyhow::ensure!(
            self.drain_timeout_ms >= 1,
            "serve.drain_timeout_ms must be at least 1"
        );
        Ok(())
    }

    pub fn default_deadline(&self) -> Duration {
        Duration::from_millis(self.default_deadline_ms)
    }
    pub fn deadline_grace(&self) -> Duration {
        Duration::from_millis(self.deadline_grace_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in the config {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Values that parse but cannot work. Checks against the model come when it is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.edge_layers != Some(0),
            "edge_layers must be at least 1"
        );
        anyhow::ensure!(
            self.pipeline.window >= 1,
            "pipeline.window must be at least 1"
        );
        anyhow::ensure!(
            self.save_state_every >= 1,
            "save_state_every must be at least 1"
        );
        anyhow::ensure!(
            self.input.max_line_bytes >= 1,
            "input.max_line_bytes must be at least 1"
        );
        self.serve.validate()?;
        self.exits.validate().map_err(anyhow::Error::msg)?;
        self.reward.validate(self.device.as_ref())?;
        if let Some(cloud) = &self.cloud {
            anyhow::ensure!(
                cloud.client_cert.is_some() == cloud.client_key.is_some(),
                "cloud.client_cert and cloud.client_key go together (mutual TLS)"
            );
            anyhow::ensure!(
                cloud.request_timeout_ms >= 1 && cloud.connect_timeout_ms >= 1,
                "cloud.request_timeout_ms and cloud.connect_timeout_ms must be at least 1"
            );
            anyhow::ensure!(
                cloud.backoff_initial_ms >= 1 && cloud.backoff_max_ms >= cloud.backoff_initial_ms,
                "cloud.backoff_initial_ms must be >= 1 and <= cloud.backoff_max_ms"
            );
            anyhow::ensure!(
                cloud.timeouts_before_reconnect >= 1,
                "cloud.timeouts_before_reconnect must be at least 1"
            );
            if let Some(t) = cloud.cloud_exit_threshold {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&t),
                    "cloud.cloud_exit_threshold must be in [0, 1], got {t}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[arms]\nsplits = \"exits\"\nthresholds = [0.9]\n";

    #[test]
    fn every_shipped_config_parses() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut paths = vec![configs.join("edge-agent.toml")];
        for entry in std::fs::read_dir(configs.join("edge")).unwrap() {
            paths.push(entry.unwrap().path());
        }
        assert!(paths.len() >= 5, "{paths:?}");
        for path in paths {
            AgentConfig::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let config = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(config.model, PathBuf::from("models/default"));
        assert!(config.cloud.is_none());
        assert_eq!(config.pipeline.window, 16);

        let typo = AgentConfig::from_toml(&format!("{MINIMAL}[pipeline]\nwindw = 3\n"));
        assert!(format!("{:#}", typo.unwrap_err()).contains("windw"));
        let zero = AgentConfig::from_toml(&format!("{MINIMAL}[pipeline]\nwindow = 0\n"));
        assert!(format!("{:#}", zero.unwrap_err()).contains("pipeline.window"));
        let no_arms = AgentConfig::from_toml("model = \"m\"\n");
        assert!(format!("{:#}", no_arms.unwrap_err()).contains("arms"));
        let profile =
            AgentConfig::from_toml(&format!("{MINIMAL}[reward]\nedge_costs = \"profile\"\n"));
        assert!(format!("{:#}", profile.unwrap_err()).contains("[device]"));
        let half_mtls = AgentConfig::from_toml(&format!(
            "{MINIMAL}[cloud]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\nclient_cert = \"c.pem\"\n"
        ));
        assert!(format!("{:#}", half_mtls.unwrap_err()).contains("client_key"));
        assert_eq!(config.serve, ServeConfig::default());
        let unfit = AgentConfig::from_toml(&format!(
            "{MINIMAL}[serve]\nmax_texts_per_request = 10\nmax_queued_texts = 4\n"
        ));
        assert!(format!("{:#}", unfit.unwrap_err()).contains("serve.max_queued_texts"));
    }
}
