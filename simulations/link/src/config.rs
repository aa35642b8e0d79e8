//! The link config (TOML) and its checks; the format is described in the [module
//! docs](super).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{BaseTrace, TraceSource};

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Client (edge) → server (cloud).
    Uplink,
    /// Server → client.
    Downlink,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Uplink => "uplink",
            Direction::Downlink => "downlink",
        }
    }
}

/// The directions an outage cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Directions {
    #[default]
    Both,
    Uplink,
    Downlink,
}

impl Directions {
    pub fn includes(self, direction: Direction) -> bool {
        match self {
            Directions::Both => true,
            Directions::Uplink => direction == Direction::Uplink,
            Directions::Downlink => direction == Direction::Downlink,
        }
    }
}

/// A whole link config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Seeds the loss and jitter draws of both directions.
    #[serde(default)]
    pub seed: u64,
    pub uplink: LinkModel,
    pub downlink: LinkModel,
    #[serde(default)]
    pub outages: Vec<Outage>,
    #[serde(default)]
    pub switches: Vec<Switch>,
}

/// The model of one direction. `Rate` is where its capacity comes from: a [`TraceSource`] in
/// a config, the loaded trace in a [`LoadedLinkModel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkModel<Rate = TraceSource> {
    /// `None`: unlimited.
    pub rate: Option<Rate>,
    #[serde(default)]
    pub queue: QueueLimit,
    #[serde(default)]
    pub delay_ms: f64,
    /// Half-width of the uniform jitter around `delay_ms`.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Let a datagram with a shorter delay overtake an earlier one.
    #[serde(default)]
    pub reorder: bool,
    pub loss: Option<Loss>,
}

/// A link model whose trace is in memory: what a [`Shaper`] runs.
pub type LoadedLinkModel = LinkModel<Arc<BaseTrace>>;

impl<Rate> Default for LinkModel<Rate> {
    /// Unlimited, no queue limit, no delay, no loss.
    fn default() -> Self {
        LinkModel {
            rate: None,
            queue: QueueLimit::default(),
            delay_ms: 0.0,
            jitter_ms: 0.0,
            reorder: false,
            loss: None,
        }
    }
}

/// Drop-tail limits of the bottleneck queue; `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueLimit {
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

impl QueueLimit {
    /// Whether a datagram of `bytes` fits behind `queued_packets` holding `queued_bytes`.
    pub fn admits(&self, queued_packets: u64, queued_bytes: u64, bytes: u64) -> bool {
        self.packets.is_none_or(|limit| queued_packets < limit)
            && self.bytes.is_none_or(|limit| queued_bytes + bytes <= limit)
    }
}

/// Random loss, drawn per datagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Loss {
    Bernoulli { p: f64 },
    GilbertElliott(BurstLoss),
}

/// Bursty loss per datagram: a Gilbert–Elliott chain stepped once per datagram (netem's
/// `gemodel`): a datagram is lost with its state's loss probability, then the state changes
/// with its state's transition probability. The replay's counterpart over time, which scales
/// capacity instead of dropping datagrams, is [`crate::CapacitySpells`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstLoss {
    pub p_good_to_bad: f64,
    pub p_bad_to_good: f64,
    #[serde(default)]
    pub loss_good: f64,
    #[serde(default = "one")]
    pub loss_bad: f64,
}

fn one() -> f64 {
    1.0
}

fn probability(name: &str, v: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("{name} must be a probability in [0, 1], not {v}"))
    }
}

impl Loss {
    /// The long-run share of datagrams lost.
    pub fn mean_rate(&self) -> f64 {
        match self {
            Loss::Bernoulli { p } => *p,
            Loss::GilbertElliott(ge) => {
                (ge.p_bad_to_good * ge.loss_good + ge.p_good_to_bad * ge.loss_bad)
                    / (ge.p_good_to_bad + ge.p_bad_to_good)
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            Loss::Bernoulli { p } => probability("p", *p),
            Loss::GilbertElliott(ge) => {
                probability("p_good_to_bad", ge.p_good_to_bad)?;
                probability("p_bad_to_good", ge.p_bad_to_good)?;
                probability("loss_good", ge.loss_good)?;
                probability("loss_bad", ge.loss_bad)?;
                if ge.p_bad_to_good == 0.0 {
                    return Err("p_bad_to_good must be > 0, or a bad spell never ends".into());
                }
                Ok(())
            }
        }
    }
}

/// A scheduled cut of the link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub at_s: f64,
    pub duration_s: f64,
    #[serde(default)]
    pub direction: Directions,
}

/// A scheduled change to other link models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub at_s: f64,
    pub uplink: Option<LinkModel>,
    pub downlink: Option<LinkModel>,
}

impl Switch {
    pub fn model(&self, direction: Direction) -> Option<&LinkModel> {
        match direction {
            Direction::Uplink => self.uplink.as_ref(),
            Direction::Downlink => self.downlink.as_ref(),
        }
    }
}

impl<Rate> LinkModel<Rate> {
    /// Checks everything but the trace; errors start with the field's name.
    pub(super) fn check(&self) -> Result<(), String> {
        if !(self.delay_ms.is_finite() && self.delay_ms >= 0.0) {
            return Err(format!("delay_ms must be ≥ 0, not {}", self.delay_ms));
        }
        if !(self.jitter_ms >= 0.0 && self.jitter_ms <= self.delay_ms) {
            return Err(format!(
                "jitter_ms ({}) must be in [0, delay_ms = {}]: the delay is drawn uniformly \
                 from delay_ms ± jitter_ms",
                self.jitter_ms, self.delay_ms
            ));
        }
        if self.queue.packets == Some(0) || self.queue.bytes == Some(0) {
            return Err("queue: a limit of 0 drops everything (omit it for no limit)".into());
        }
        if let Some(loss) = &self.loss {
            loss.check().map_err(|e| format!("loss.{e}"))?;
        }
        Ok(())
    }
}

impl LinkModel {
    /// Checks the model and reads its trace.
    pub fn load(&self) -> anyhow::Result<LoadedLinkModel> {
        self.check().map_err(anyhow::Error::msg)?;
        let rate = match &self.rate {
            None => None,
            Some(source) => Some(Arc::new(source.load().context("rate")?)),
        };
        Ok(LinkModel {
            rate,
            queue: self.queue,
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            reorder: self.reorder,
            loss: self.loss,
        })
    }
}

impl LinkConfig {
    /// Reads and checks a config file (traces are read by [`shaper`](Self::shaper)).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        Self::from_toml(&text, base_dir).with_context(|| path.display().to_string())
    }

    /// Parses and checks a config; relative trace paths are taken from `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> anyhow::Result<Self> {
        let mut config: LinkConfig = toml::from_str(text)?;
        for model in config.models_mut() {
            if let Some(path) = model.rate.as_mut().and_then(TraceSource::path_mut)
                && path.is_relative()
            {
                *path = base_dir.join(&*path);
            }
        }
        config.check().map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    pub fn model(&self, direction: Direction) -> &LinkModel {
        match direction {
            Direction::Uplink => &self.uplink,
            Direction::Downlink => &self.downlink,
        }
    }

    fn models_mut(&mut self) -> impl Iterator<Item = &mut LinkModel> {
        let switched = self.switches.iter_mut().flat_map(|s| {
            [s.uplink.as_mut(), s.downlink.as_mut()]
                .into_iter()
                .flatten()
        });
        [&mut self.uplink, &mut self.downlink]
            .into_iter()
            .chain(switched)
    }

    /// Errors name the field, e.g. `switches[0].uplink.delay_ms`.
    pub(crate) fn check(&self) -> Result<(), String> {
        let time = |v: f64| v.is_finite() && v >= 0.0;
        for direction in [Direction::Uplink, Direction::Downlink] {
            self.model(direction)
                .check()
                .map_err(|e| format!("{}.{e}", direction.name()))?;
        }
        for (i, outage) in self.outages.iter().enumerate() {
            if !time(outage.at_s) {
                return Err(format!(
                    "outages[{i}].at_s must be ≥ 0, not {}",
                    outage.at_s
                ));
            }
            if !(time(outage.duration_s) && outage.duration_s > 0.0) {
                return Err(format!(
                    "outages[{i}].duration_s must be > 0, not {}",
                    outage.duration_s
                ));
            }
        }
        for (i, switch) in self.switches.iter().enumerate() {
            if !time(switch.at_s) {
                return Err(format!(
                    "switches[{i}].at_s must be ≥ 0, not {}",
                    switch.at_s
                ));
            }
            if switch.uplink.is_none() && switch.downlink.is_none() {
                return Err(format!("switches[{i}] names neither uplink nor downlink"));
            }
            for direction in [Direction::Uplink, Direction::Downlink] {
                if let Some(model) = switch.model(direction) {
                    model
                        .check()
                        .map_err(|e| format!("switches[{i}].{}.{e}", direction.name()))?;
                }
            }
        }
        Ok(())
    }
}
