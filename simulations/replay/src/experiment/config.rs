//! The experiment file: what to replay (matrix, clocks, arrivals), which agent (its tables,
//! inline or from an edge-agent config file), over which links, with which policies.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use splitee_bandits::{ArmsConfig, DeviceProfile, ExitsConfig, PolicyConfig, RewardConfig};
use splitee_protocol::PayloadEncoding;

use crate::clock::ClockConfig;
use crate::matrix::MatrixFormat;
use crate::sim::{Arrivals, SampleOrder};
use splitee_link::LinkConfig as EmulatorConfig;
use splitee_link::{CapacitySpells, StepChange, TraceSource};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub matrix: MatrixSource,
    pub samples: usize,
    pub seeds: Vec<u64>,
    #[serde(default = "default_series_every")]
    pub series_every: usize,
    #[serde(default)]
    pub order: SampleOrder,
    pub arrivals: Arrivals,
    /// The simulated clocks; absent: the matrix's recorded layer times, or none (every layer
    /// instantaneous: abstract-cost experiments) when it has none.
    pub clock: Option<ClockConfig>,
    /// The simulated edge agent: `config = "configs/demo.toml"` (an edge-agent config, read
    /// as the agent reads it), or the agent's tables inline (`[agent.arms]`,
    /// `[agent.reward]`, …; see [`AgentTables`]).
    pub agent: toml::Table,
    #[serde(default)]
    pub sweep: Sweep,
    pub links: Vec<LinkEntry>,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    #[serde(default)]
    pub report: ReportConfig,
}

fn default_series_every() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixSource {
    pub path: PathBuf,
    #[serde(default = "default_format")]
    pub format: MatrixFormat,
    /// For formats that only number their exits (`uee-tsv`, `adaee-csv`): the layer of each
    /// exit, and the model's layer count (default: the deepest exit's layer).
    pub exit_layers: Option<Vec<usize>>,
    pub num_layers: Option<usize>,
}

fn default_format() -> MatrixFormat {
    MatrixFormat::Splitee
}

/// The parts of an edge-agent config that decide what a sample does and costs: the tables
/// the simulated agent reads. In an agent file the keys only the live agent uses (model path,
/// addresses, certificates, reconnection, state file, metrics, input limits) are skipped;
/// any other key is an error, as in the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTables {
    pub arms: ArmsConfig,
    #[serde(default)]
    pub reward: RewardConfig,
    pub policy: Option<PolicyConfig>,
    #[serde(default)]
    pub exits: ExitsConfig,
    #[serde(default)]
    pub pipeline: PipelineTable,
    #[serde(default)]
    pub cloud: CloudTable,
    pub device: Option<DeviceProfile>,
    pub edge_layers: Option<usize>,
}

/// Keys of an agent config the simulation has no use for.
const LIVE_ONLY: [&str; 7] = [
    "model",
    "serve",
    "backend",
    "state_file",
    "save_state_every",
    "metrics_listen",
    "input",
];
const LIVE_ONLY_CLOUD: [&str; 11] = [
    "address",
    "server_name",
    "ca",
    "client_cert",
    "client_key",
    "connect_timeout_ms",
    "backoff_initial_ms",
    "backoff_max_ms",
    "idle_timeout_ms",
    // Failover between worker endpoints: the simulator models one link to one cloud.
    "failover_silence_ms",
    "busy_cooldown_ms",
];

/// `[pipeline]`, as the agent reads it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineTable {
    pub window: usize,
}

impl Default for PipelineTable {
    fn default() -> Self {
        Self { window: 16 }
    }
}

/// `[cloud]`, the keys that shape an offload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudTable {
    pub encoding: PayloadEncoding,
    pub request_timeout_ms: u64,
    pub cloud_exit_threshold: Option<f32>,
}

impl Default for CloudTable {
    fn default() -> Self {
        Self {
            encoding: PayloadEncoding::F16,
            request_timeout_ms: 2_000,
            cloud_exit_threshold: None,
        }
    }
}

impl AgentTables {
    /// Reads an edge-agent config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the agent config {}", path.display()))?;
        Self::from_agent_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses an edge-agent config, skipping what only the live agent uses.
    pub fn from_agent_toml(text: &str) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        for key in LIVE_ONLY {
            table.remove(key);
        }
        if let Some(cloud) = table.get_mut("cloud").and_then(toml::Value::as_table_mut) {
            for key in LIVE_ONLY_CLOUD {
                cloud.remove(key);
            }
        }
        let mut tables: Self = table.try_into()?;
        // An agent without a [policy] plays the default one.
        tables.policy.get_or_insert_with(PolicyConfig::default);
        Ok(tables)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.exits.validate().map_err(anyhow::Error::msg)?;
        self.reward.validate(self.device.as_ref())?;
        anyhow::ensure!(
            self.pipeline.window >= 1,
            "pipeline.window must be at least 1"
        );
        anyhow::ensure!(
            self.cloud.request_timeout_ms >= 1,
            "cloud.request_timeout_ms must be at least 1"
        );
        if let Some(t) = self.cloud.cloud_exit_threshold {
            anyhow::ensure!(
                (0.0..=1.0).contains(&t),
                "cloud.cloud_exit_threshold must be in [0, 1], got {t}"
            );
        }
        anyhow::ensure!(
            self.edge_layers != Some(0),
            "edge_layers must be at least 1"
        );
        Ok(())
    }
}

/// `[sweep]`: runs for every λ (and constant offload cost `o`) listed, in place of the
/// agent's own `reward.lambda` (`reward.offload`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sweep {
    pub lambda: Vec<f64>,
    pub offload: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RttSource {
    Constant {
        ms: f64,
    },
    Fivegophers {
        path: PathBuf,
        carrier: Option<String>,
        server: Option<String>,
    },
}

/// One `[[links]]` entry: a trace and an RTT model, or a link emulator config
/// (`configs/links/*.toml`) replayed as one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntry {
    pub name: String,
    pub trace: Option<TraceSource>,
    pub rtt: Option<RttSource>,
    #[serde(default)]
    pub steps: Vec<StepChange>,
    pub loss: Option<CapacitySpells>,
    /// A link emulator config: its uplink's rate trace, the two directions' delays as the
    /// RTT, its outages as the uplink's capacity falling to 0.
    pub emulator: Option<PathBuf>,
}

/// A link as the simulator models it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayLink {
    pub trace: TraceSource,
    pub rtt: RttSource,
    pub steps: Vec<StepChange>,
    pub loss: Option<CapacitySpells>,
}

impl LinkEntry {
    pub fn resolve(&self) -> anyhow::Result<ReplayLink> {
        let name = &self.name;
        match (&self.emulator, &self.trace, &self.rtt) {
            (None, Some(trace), Some(rtt)) => Ok(ReplayLink {
                trace: trace.clone(),
                rtt: rtt.clone(),
                steps: self.steps.clone(),
                loss: self.loss,
            }),
            (Some(path), None, None) if self.steps.is_empty() && self.loss.is_none() => {
                let config = EmulatorConfig::load(path)?;
                replay_emulator(&config).with_context(|| format!("link {name}: {}", path.display()))
            }
            _ => anyhow::bail!(
                "link {name}: give `trace` and `rtt` (optionally `steps`, `loss`), or only \
                 `emulator`"
            ),
        }
    }
}

/// The replay of a link emulator config. What the emulator does per datagram (loss, queue
/// drops, jitter, reordering, a switch to another model) has no counterpart here and is
/// refused, except jitter, whose mean is 0, and the drop-tail queue, which only drops when a
/// burst overflows it; an outage holds the uplink's payloads until it ends, where the live
/// QUIC stream retransmits them after it.
pub fn replay_emulator(config: &EmulatorConfig) -> anyhow::Result<ReplayLink> {
    anyhow::ensure!(
        config.switches.is_empty(),
        "the replay has no model switches: simulate each model as its own link"
    );
    anyhow::ensure!(
        config.uplink.loss.is_none() && config.downlink.loss.is_none(),
        "the replay models no per-datagram loss"
    );
    let trace = config
        .uplink
        .rate
        .clone()
        .context("the replay needs an uplink rate")?;
    let mut cuts: Vec<(f64, f64)> = config
        .outages
        .iter()
        .map(|o| (o.at_s, o.at_s + o.duration_s))
        .collect();
    cuts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut steps = Vec::new();
    for (from, to) in cuts {
        anyhow::ensure!(
            steps
                .last()
                .is_none_or(|last: &StepChange| last.at_s <= from),
            "overlapping outages"
        );
        steps.push(StepChange {
            at_s: from,
            factor: 0.0,
        });
        steps.push(StepChange {
            at_s: to,
            factor: 1.0,
        });
    }
    Ok(ReplayLink {
        trace,
        rtt: RttSource::Constant {
            ms: config.uplink.delay_ms + config.downlink.delay_ms,
        },
        steps,
        loss: None,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    pub name: String,
    pub policy: PolicyConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The policy that cost cuts are measured against.
    pub baseline: Option<String>,
    #[serde(default = "default_window")]
    pub reconvergence_window: usize,
    #[serde(default = "default_share")]
    pub reconvergence_share: f64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            baseline: None,
            reconvergence_window: default_window(),
            reconvergence_share: default_share(),
        }
    }
}

fn default_window() -> usize {
    200
}

fn default_share() -> f64 {
    0.8
}

impl ExperimentConfig {
    /// The `[agent]` tables, from the file it names or inline.
    pub fn agent_tables(&self) -> anyhow::Result<AgentTables> {
        let tables = match self.agent.get("config") {
            Some(path) => {
                anyhow::ensure!(
                    self.agent.len() == 1,
                    "[agent]: with `config` the agent's tables come from that file; move the \
                     others there"
                );
                let path = path
                    .as_str()
                    .context("[agent] config must be a path (a string)")?;
                AgentTables::from_file(Path::new(path))?
            }
            None => self.agent.clone().try_into().context("in [agent]")?,
        };
        tables.validate().context("in [agent]")?;
        Ok(tables)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }
}
