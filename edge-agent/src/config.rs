//! The agent's configuration: a TOML file (`configs/edge-agent.toml` and the device presets in
//! `configs/edge/`). Every key but `[arms]` has a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use splitee_bandits::{ArmsConfig, DeviceProfile, ExitsConfig, PolicyConfig, RewardConfig};
use splitee_model::BackendChoice;
use splitee_protocol::PayloadEncoding;

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
    /// The worker endpoints: one `ip:port` or `host:port`, or a list of them (a host name is
    /// resolved once, when the agent starts, and every address it resolves to is an endpoint).
    /// Each offload goes to a connected endpoint with the fewest offloads in flight; one that
    /// fails, is busy or is shutting down is left for another (see `cloud.rs`).
    pub address: Addresses,
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
    /// A connection that hears nothing from the worker this long is dead (keep-alives go out
    /// at a third of it), and the agent reconnects. A request that times out only resets its
    /// own stream: the connection, and what else is in flight on it, goes on.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// With several endpoints: a request that hears nothing at all from its worker this long
    /// (keep-alives then go out at a third of it, so a live worker is heard from meanwhile)
    /// ends that connection, and the request moves to another endpoint. With one endpoint
    /// this is not used (a request then waits for its timeout, as before).
    #[serde(default = "default_failover_silence")]
    pub failover_silence_ms: u64,
    /// With several endpoints: how long an endpoint that answered `busy` is passed over while
    /// another one is connected.
    #[serde(default = "default_busy_cooldown")]
    pub busy_cooldown_ms: u64,
}

/// Most endpoints one agent may name (each holds a connection and a UDP socket).
pub const MAX_ENDPOINTS: usize = 64;

/// One worker endpoint as the config names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkerAddress {
    Socket(SocketAddr),
    /// Resolved when the agent starts.
    Name {
        host: String,
        port: u16,
    },
}

impl std::str::FromStr for WorkerAddress {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(socket) = text.parse::<SocketAddr>() {
            return Ok(Self::Socket(socket));
        }
        let bad = |why: &str| {
            format!("cloud.address {text:?}: {why} (expected ip:port, [ipv6]:port or host:port)")
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || host.len() > 253 || !host.chars().all(name_char) {
            return Err(bad("not a host name"));
        }
        Ok(Self::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for WorkerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(socket) => write!(f, "{socket}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// `cloud.address`: a string (one endpoint) or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub Vec<WorkerAddress>);

impl From<SocketAddr> for Addresses {
    fn from(socket: SocketAddr) -> Self {
        Self(vec![WorkerAddress::Socket(socket)])
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, address) in self.0.iter().enumerate() {
            write!(f, "{}{address}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => serializer.collect_str(one),
            many => serializer.collect_seq(many.iter().map(ToString::to_string)),
        }
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address (\"ip:port\" or \"host:port\") or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Addresses, E> {
                text.parse().map(|a| Addresses(vec![a])).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Addresses, A::Error> {
                let mut addresses = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    addresses.push(text.parse().map_err(serde::de::Error::custom)?);
                }
                Ok(Addresses(addresses))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
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
fn default_idle_timeout() -> u64 {
    10_000
}
fn default_failover_silence() -> u64 {
    1_000
}
fn default_busy_cooldown() -> u64 {
    250
}

impl CloudConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn failover_silence(&self) -> Duration {
        Duration::from_millis(self.failover_silence_ms)
    }
    pub fn busy_cooldown(&self) -> Duration {
        Duration::from_millis(self.busy_cooldown_ms)
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

    /// Values that parse but cannot work, and values past what the agent can honour (each
    /// range says why it ends where it does). Checks against the model come when it is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut ranges = vec![
            (
                "edge_layers",
                self.edge_layers.map_or(1, |l| l as u64),
                1..=4_096,
            ),
            // Each sample in flight holds its hidden states (0.8 MB for MiniLM at 512 tokens).
            ("pipeline.window", self.pipeline.window as u64, 1..=1_024),
            ("save_state_every", self.save_state_every, 1..=u64::MAX),
            // A line is held whole while it is read.
            (
                "input.max_line_bytes",
                self.input.max_line_bytes as u64,
                1..=64 << 20,
            ),
        ];
        if let Some(cloud) = &self.cloud {
            // Timeouts and waits become `Instant`s, which cannot reach far into the future.
            const HOUR_MS: u64 = 3_600_000;
            ranges.extend([
                (
                    "cloud.request_timeout_ms",
                    cloud.request_timeout_ms,
                    1..=600_000,
                ),
                (
                    "cloud.connect_timeout_ms",
                    cloud.connect_timeout_ms,
                    1..=600_000,
                ),
                (
                    "cloud.backoff_initial_ms",
                    cloud.backoff_initial_ms,
                    1..=HOUR_MS,
                ),
                (
                    "cloud.backoff_max_ms",
                    cloud.backoff_max_ms,
                    cloud.backoff_initial_ms..=HOUR_MS,
                ),
                // QUIC carries at most an hour here (`transport::MAX_IDLE_TIMEOUT`).
                (
                    "cloud.idle_timeout_ms",
                    cloud.idle_timeout_ms,
                    100..=HOUR_MS,
                ),
                // Below a few round trips a live worker would look dead.
                (
                    "cloud.failover_silence_ms",
                    cloud.failover_silence_ms,
                    100..=HOUR_MS,
                ),
                (
                    "cloud.busy_cooldown_ms",
                    cloud.busy_cooldown_ms,
                    0..=HOUR_MS,
                ),
            ]);
        }
        splitee_service::settings::check_ranges(&ranges).map_err(anyhow::Error::msg)?;
        self.serve.validate()?;
        self.exits.validate().map_err(anyhow::Error::msg)?;
        self.reward.validate(self.device.as_ref())?;
        if let Some(cloud) = &self.cloud {
            let endpoints = cloud.address.0.len();
            anyhow::ensure!(
                (1..=MAX_ENDPOINTS).contains(&endpoints),
                "cloud.address names {endpoints} endpoints: name from 1 to {MAX_ENDPOINTS}"
            );
            for (i, address) in cloud.address.0.iter().enumerate() {
                anyhow::ensure!(
                    !cloud.address.0[..i].contains(address),
                    "cloud.address names {address} twice"
                );
            }
            anyhow::ensure!(
                cloud.client_cert.is_some() == cloud.client_key.is_some(),
                "cloud.client_cert and cloud.client_key go together (mutual TLS)"
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
        for (table, key) in [
            ("[pipeline]\nwindow = 0\n", "pipeline.window = 0"),
            (
                "[pipeline]\nwindow = 18446744073709551615\n",
                "pipeline.window = 18446744073709551615",
            ),
            ("[input]\nmax_line_bytes = 0\n", "input.max_line_bytes"),
            (
                "[cloud]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\nbackoff_max_ms = 18446744073709551615\n",
                "cloud.backoff_max_ms",
            ),
            (
                "[cloud]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\nrequest_timeout_ms = 0\n",
                "cloud.request_timeout_ms",
            ),
            (
                "[cloud]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\nbackoff_initial_ms = 900\nbackoff_max_ms = 800\n",
                "cloud.backoff_max_ms = 800 is outside 900..=",
            ),
        ] {
            let error = AgentConfig::from_toml(&format!("{MINIMAL}{table}")).unwrap_err();
            assert!(format!("{error:#}").contains(key), "{table:?}: {error:#}");
        }
        let gone = AgentConfig::from_toml(&format!(
            "{MINIMAL}[cloud]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\ntimeouts_before_reconnect = 2\n"
        ));
        assert!(format!("{:#}", gone.unwrap_err()).contains("timeouts_before_reconnect"));
        for (address, error) in [
            ("[]", "names 0 endpoints"),
            ("\"worker\"", "\"worker\": no port"),
            ("\"worker:99999\"", "the port is not a number"),
            ("\"wor ker:4433\"", "not a host name"),
            ("\"::1:4433\"", "not a host name"),
            (
                "[\"127.0.0.1:1\", \"127.0.0.1:1\"]",
                "names 127.0.0.1:1 twice",
            ),
            ("4433", "an address"),
        ] {
            let result = AgentConfig::from_toml(&format!(
                "{MINIMAL}[cloud]\naddress = {address}\nca = \"ca.pem\"\n"
            ));
            let message = format!("{:#}", result.unwrap_err());
            assert!(message.contains(error), "{address}: {message}");
        }
        let fleet = AgentConfig::from_toml(&format!(
            "{MINIMAL}[cloud]\naddress = [\"127.0.0.1:4433\", \"[::1]:4434\", \"workers.example:4433\"]\n\
             ca = \"ca.pem\"\n"
        ))
        .unwrap();
        let cloud = fleet.cloud.unwrap();
        assert_eq!(
            cloud.address.0,
            vec![
                WorkerAddress::Socket("127.0.0.1:4433".parse().unwrap()),
                WorkerAddress::Socket("[::1]:4434".parse().unwrap()),
                WorkerAddress::Name {
                    host: "workers.example".into(),
                    port: 4433
                },
            ]
        );
        assert_eq!(
            cloud.address.to_string(),
            "127.0.0.1:4433, [::1]:4434, workers.example:4433"
        );
        assert_eq!(cloud.failover_silence_ms, 1_000);
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
