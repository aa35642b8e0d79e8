//! Experiments: a TOML file names a matrix, a device, arms, a reward, links and policies; the
//! sweep runs every (link × λ × o × policy × seed) in parallel and writes CSVs, plots and a
//! markdown report.
//!
//! # Config format
//!
//! ```toml
//! name = "exp1-splitee"
//! description = "…"
//! samples = 2000                 # rounds per run
//! seeds = [1, 2, 3]              # one run per seed; same seed = same samples and times
//! series_every = 1               # time-series stride (series.csv, first seed only)
//!
//! [matrix]
//! path = "simulations/data/sentence-polarity-test.csv"
//! format = "splitee"             # | "uee-tsv" | "adaee-csv"
//!
//! [arrivals]
//! kind = "poisson"               # | "fixed" with interval_ms
//! rate_per_s = 10
//!
//! [device]                       # see `device` module
//! edge = "configs/devices/rpi4-minilm.toml"   # | "recorded"
//! edge_scale = 1.0
//! cloud_speedup = 10
//! encoding = "f32"               # | "f16" | "int8"
//! hidden = 384                   # default: the matrix's `hidden` metadata
//!
//! [arms]
//! splits = "exits"               # every exit layer; or a list [1, 2, 6]
//! thresholds = [0.9]             # grid splits × thresholds, split-major
//! check = "split-only"           # | "every-layer"
//! fallback = "offload"           # | "exit-at-split"
//! evaluate_all_heads = true
//!
//! [reward]
//! kind = "split-ee"              # | "ada-ee" | "uee-proxy"
//! costs = "abstract"             # cost_edge(i) = i, cost_offload = o; | "measured" (ms)
//! lambda = [0.1]                 # swept
//! offload = [0.1, 0.2]           # o, swept (abstract costs only)
//! # cost_scale_ms = 100          # measured: rewards are assumed ≥ −λ·cost_scale_ms
//!
//! [[links]]
//! name = "verizon-lte"
//! trace = { kind = "mahimahi", path = "../shared/traces/mahimahi/Verizon-LTE-short.up" }
//! rtt = { kind = "constant", ms = 40 }
//! steps = [{ at_s = 60, factor = 0.05 }]          # optional
//! loss = { mean_good_s = 30, mean_bad_s = 2 }      # optional Gilbert–Elliott
//!
//! [[policies]]
//! name = "SplitEE"
//! policy = { kind = "ucb1", c = 1.0 }   # any splitee_bandits::PolicyConfig
//!
//! [report]
//! baseline = "final"             # policy that cost cuts are measured against
//! reconvergence_window = 200
//! reconvergence_share = 0.8
//! ```
//!
//! Trace kinds: `constant` (`rate_mbps`), `mahimahi` (`path`), `norway` (`path`),
//! `fivegophers` (`path`, `column`). RTT kinds: `constant` (`ms`), `fivegophers` (`path`,
//! optional `carrier`, `server`). Relative paths are relative to the working directory (run
//! from the repository root). Randomised policies get their configured seed mixed with the
//! run seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use splitee_bandits::{
    ArmSpace, ArmsConfig, Controller, CostModel, DecisionRule, PolicyConfig, RewardKind,
    RewardModel, RewardRange,
};

use crate::device::DeviceConfig;
use crate::matrix::{ConfidenceMatrix, MatrixFormat};
use crate::network::{BaseTrace, GilbertElliott, Link, Rtt, StepChange};
use crate::plots;
use crate::sim::{self, Arrivals, RunResult, RunSpec, Workload};

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
    pub arrivals: Arrivals,
    pub device: DeviceConfig,
    pub arms: ArmsConfig,
    pub reward: RewardConfig,
    pub links: Vec<LinkConfig>,
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
}

fn default_format() -> MatrixFormat {
    MatrixFormat::Splitee
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CostUnits {
    Abstract,
    Measured,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    pub kind: RewardKind,
    pub costs: CostUnits,
    pub lambda: Vec<f64>,
    #[serde(default)]
    pub offload: Vec<f64>,
    pub cost_scale_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TraceSource {
    Constant { rate_mbps: f64 },
    Mahimahi { path: PathBuf },
    Norway { path: PathBuf },
    Fivegophers { path: PathBuf, column: String },
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub name: String,
    pub trace: TraceSource,
    pub rtt: RttSource,
    #[serde(default)]
    pub steps: Vec<StepChange>,
    pub loss: Option<GilbertElliott>,
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
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }
}

/// Loads the link's base trace and RTT model (shared by every run on it).
pub fn load_link_parts(link: &LinkConfig) -> anyhow::Result<(Arc<BaseTrace>, Arc<Rtt>)> {
    let base = match &link.trace {
        TraceSource::Constant { rate_mbps } => {
            BaseTrace::constant(*rate_mbps).map_err(anyhow::Error::msg)?
        }
        TraceSource::Mahimahi { path } => BaseTrace::read_mahimahi(path)?,
        TraceSource::Norway { path } => BaseTrace::read_norway(path)?,
        TraceSource::Fivegophers { path, column } => BaseTrace::read_fivegophers(path, column)?,
    };
    let rtt = match &link.rtt {
        RttSource::Constant { ms } => {
            anyhow::ensure!(
                ms.is_finite() && *ms >= 0.0,
                "link {}: rtt ms < 0",
                link.name
            );
            Rtt::Constant(*ms)
        }
        RttSource::Fivegophers {
            path,
            carrier,
            server,
        } => Rtt::read_fivegophers(path, carrier.as_deref(), server.as_deref())?,
    };
    Ok((Arc::new(base), Arc::new(rtt)))
}

/// One point of the λ/o sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    pub lambda: f64,
    pub offload: Option<f64>,
}

impl Param {
    pub fn tag(&self) -> String {
        match self.offload {
            Some(o) => format!("lambda{}_o{}", self.lambda, o),
            None => format!("lambda{}", self.lambda),
        }
    }
}

/// One finished run with its coordinates.
pub struct RunRecord {
    pub link: usize,
    pub param: usize,
    pub policy: usize,
    pub seed: u64,
    pub result: RunResult,
}

/// The columns that identify a run in every CSV: link, λ, o, policy, seed.
fn run_key(cfg: &ExperimentConfig, p: Param, r: &RunRecord) -> [String; 5] {
    [
        cfg.links[r.link].name.clone(),
        p.lambda.to_string(),
        p.offload.map(|o| o.to_string()).unwrap_or_default(),
        cfg.policies[r.policy].name.clone(),
        r.seed.to_string(),
    ]
}

/// Everything resolved from a config, ready to run.
pub struct Prepared {
    pub config: ExperimentConfig,
    pub matrix_synthetic: bool,
    pub workload: Workload,
    pub space: ArmSpace,
    pub rule: DecisionRule,
    pub params: Vec<Param>,
    pub links: Vec<(Arc<BaseTrace>, Arc<Rtt>)>,
    pub device_description: String,
}

impl Prepared {
    pub fn new(config: ExperimentConfig, matrix: &ConfidenceMatrix) -> anyhow::Result<Self> {
        anyhow::ensure!(config.samples > 0, "samples must be > 0");
        anyhow::ensure!(!config.seeds.is_empty(), "seeds is empty");
        anyhow::ensure!(!config.policies.is_empty(), "no policies");
        anyhow::ensure!(!config.links.is_empty(), "no links");
        config.arrivals.check().map_err(anyhow::Error::msg)?;
        let device = config.device.resolve(matrix)?;
        let workload = Workload::new(matrix, &device)?;
        let l = matrix.num_layers();
        let (space, rule) = config.arms.build(l, matrix.exit_layers())?;
        let r = &config.reward;
        anyhow::ensure!(!r.lambda.is_empty(), "reward.lambda is empty");
        let mut params = Vec::new();
        for &lambda in &r.lambda {
            match r.costs {
                CostUnits::Abstract => {
                    anyhow::ensure!(!r.offload.is_empty(), "abstract costs need reward.offload");
                    params.extend(r.offload.iter().map(|&o| Param {
                        lambda,
                        offload: Some(o),
                    }));
                }
                CostUnits::Measured => {
                    anyhow::ensure!(
                        r.offload.is_empty(),
                        "measured costs: reward.offload must be empty (o is measured)"
                    );
                    params.push(Param {
                        lambda,
                        offload: None,
                    });
                }
            }
        }
        let links = config
            .links
            .iter()
            .map(load_link_parts)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut names: Vec<&str> = config.policies.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        anyhow::ensure!(
            names.len() == config.policies.len(),
            "policy names must be unique"
        );
        Ok(Prepared {
            matrix_synthetic: matrix.is_synthetic(),
            workload,
            space,
            rule,
            params,
            links,
            device_description: device.description,
            config,
        })
    }

    fn reward_model(&self, p: Param) -> anyhow::Result<(RewardModel, Option<RewardRange>)> {
        let r = &self.config.reward;
        Ok(match r.costs {
            CostUnits::Abstract => (
                RewardModel::new(
                    r.kind,
                    CostModel::abstract_units(p.lambda, p.offload.unwrap_or(0.0))?,
                ),
                None,
            ),
            CostUnits::Measured => {
                // Exploration width: rewards are assumed ≥ −λ·scale (they may go below; UCB
                // only uses the width to scale its bonus).
                let scale = r
                    .cost_scale_ms
                    .unwrap_or(2.0 * self.workload.mean_full_edge_ms());
                anyhow::ensure!(
                    scale.is_finite() && scale > 0.0,
                    "cost_scale_ms must be > 0"
                );
                (
                    RewardModel::new(r.kind, CostModel::measured(p.lambda)?),
                    Some(RewardRange::new(-p.lambda * scale, 1.0)?),
                )
            }
        })
    }

    /// The policy config for one run: randomised policies get the run seed mixed in.
    fn policy_for(&self, policy: usize, seed: u64) -> PolicyConfig {
        let mix = |s: u64| s ^ sim::stream_seed(seed, 5);
        match self.config.policies[policy].policy.clone() {
            PolicyConfig::Random { seed: s } => PolicyConfig::Random { seed: mix(s) },
            PolicyConfig::Thompson { sigma, seed: s } => PolicyConfig::Thompson {
                sigma,
                seed: mix(s),
            },
            PolicyConfig::EpsilonGreedy { epsilon, seed: s } => PolicyConfig::EpsilonGreedy {
                epsilon,
                seed: mix(s),
            },
            other => other,
        }
    }

    /// Runs one (link, param, policy, seed).
    pub fn run_one(
        &self,
        link: usize,
        param: usize,
        policy: usize,
        seed: u64,
        series: bool,
    ) -> anyhow::Result<RunResult> {
        let cfg = &self.config;
        let (model, range) = self.reward_model(self.params[param])?;
        let controller = Controller::new(
            self.space.clone(),
            self.rule,
            model,
            &self.policy_for(policy, seed),
            range,
        )
        .with_context(|| format!("policy {}", cfg.policies[policy].name))?;
        let lc = &cfg.links[link];
        let (base, rtt) = &self.links[link];
        let horizon = cfg.samples as f64 * cfg.arrivals.mean_gap_ms() * 4.0 + 600_000.0;
        let mut ge_rng = ChaCha8Rng::seed_from_u64(sim::stream_seed(seed, 4));
        let link_model = Link::new(
            base.clone(),
            rtt.clone(),
            &lc.steps,
            lc.loss.as_ref(),
            horizon,
            &mut ge_rng,
        )
        .map_err(|m| anyhow::anyhow!("link {}: {m}", lc.name))?;
        sim::run(RunSpec {
            workload: &self.workload,
            controller,
            link: &link_model,
            arrivals: cfg.arrivals,
            samples: cfg.samples,
            seed,
            evaluate_all_heads: cfg.arms.evaluate_all_heads,
            keep_arm_rewards: !lc.steps.is_empty(),
            series_every: if series { cfg.series_every } else { 0 },
        })
    }

    /// A link with this run seed's Gilbert–Elliott draw (for plotting its rate).
    fn link_model(&self, link: usize, seed: u64) -> anyhow::Result<Link> {
        let cfg = &self.config;
        let lc = &cfg.links[link];
        let (base, rtt) = &self.links[link];
        let horizon = cfg.samples as f64 * cfg.arrivals.mean_gap_ms() * 4.0 + 600_000.0;
        let mut ge_rng = ChaCha8Rng::seed_from_u64(sim::stream_seed(seed, 4));
        Link::new(
            base.clone(),
            rtt.clone(),
            &lc.steps,
            lc.loss.as_ref(),
            horizon,
            &mut ge_rng,
        )
        .map_err(anyhow::Error::msg)
    }

    /// Runs the whole sweep in parallel; results are in job order whatever the thread count.
    pub fn run_all(&self, progress: bool) -> anyhow::Result<Vec<RunRecord>> {
        let cfg = &self.config;
        let mut jobs = Vec::new();
        for link in 0..cfg.links.len() {
            for param in 0..self.params.len() {
                for policy in 0..cfg.policies.len() {
                    for &seed in &cfg.seeds {
                        jobs.push((link, param, policy, seed));
                    }
                }
            }
        }
        let bar = if progress {
            ProgressBar::new(jobs.len() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} runs {elapsed_precise} eta {eta}")
                .expect("static template"),
        );
        let first_seed = cfg.seeds[0];
        let records = jobs
            .par_iter()
            .map(|&(link, param, policy, seed)| {
                let result = self.run_one(link, param, policy, seed, seed == first_seed)?;
                bar.inc(1);
                Ok(RunRecord {
                    link,
                    param,
                    policy,
                    seed,
                    result,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        bar.finish_and_clear();
        Ok(records)
    }
}

/// Means over seeds of one (link, param, policy).
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    pub runs: usize,
    pub accuracy: Option<f64>,
    pub offload_rate: f64,
    pub mean_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub cost_per_sample: f64,
    pub total_cost: f64,
    pub cum_reward: f64,
    pub pseudo_regret: f64,
    pub pseudo_regret_std: f64,
    pub realized_regret: f64,
    /// Mean pseudo-regret curve.
    pub regret_curve: Vec<f64>,
}

fn aggregate(runs: &[&RunResult]) -> Aggregate {
    let n = runs.len() as f64;
    let mean = |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / n;
    let accs: Vec<f64> = runs.iter().filter_map(|r| r.accuracy()).collect();
    let regrets: Vec<f64> = runs
        .iter()
        .map(|r| *r.pseudo_regret_curve().last().unwrap_or(&0.0))
        .collect();
    let regret_mean = regrets.iter().sum::<f64>() / n;
    let var = regrets
        .iter()
        .map(|r| (r - regret_mean).powi(2))
        .sum::<f64>()
        / n;
    let len = runs.iter().map(|r| r.samples()).min().unwrap_or(0);
    let mut curve = vec![0.0; len];
    for r in runs {
        for (c, v) in curve.iter_mut().zip(r.pseudo_regret_curve()) {
            *c += v / n;
        }
    }
    Aggregate {
        runs: runs.len(),
        accuracy: (accs.len() == runs.len()).then(|| accs.iter().sum::<f64>() / n),
        offload_rate: mean(&|r| r.offload_rate()),
        mean_latency_ms: mean(&|r| r.mean_latency_ms()),
        p95_latency_ms: mean(&|r| r.latency_percentile_ms(95.0)),
        p99_latency_ms: mean(&|r| r.latency_percentile_ms(99.0)),
        cost_per_sample: mean(&|r| r.cost_sum / r.samples() as f64),
        total_cost: mean(&|r| r.cost_sum),
        cum_reward: mean(&|r| r.reward_sum),
        pseudo_regret: regret_mean,
        pseudo_regret_std: var.sqrt(),
        realized_regret: mean(&|r| r.realized_regret()),
        regret_curve: curve,
    }
}

/// Re-convergence after a step change: samples (and seconds) from the change until the
/// policy plays the new best arm in at least `share` of a `window`-sample window.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconvergence {
    pub change_s: f64,
    pub best_before: usize,
    pub best_after: usize,
    pub samples: Option<usize>,
    pub seconds: Option<f64>,
}

pub fn reconvergence(
    result: &RunResult,
    steps: &[StepChange],
    window: usize,
    share: f64,
) -> Vec<Reconvergence> {
    let k = result.num_arms;
    let n = result.samples();
    if result.arm_rewards.len() != n * k || window == 0 {
        return Vec::new();
    }
    let index_at = |t_ms: f64| result.arrivals_ms.partition_point(|&a| a < t_ms);
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend(steps.iter().map(|s| index_at(s.at_s * 1000.0)));
    bounds.push(n);
    let best_in = |a: usize, b: usize| -> usize {
        let mut sums = vec![0.0f64; k];
        for t in a..b {
            for (s, &r) in sums.iter_mut().zip(&result.arm_rewards[t * k..(t + 1) * k]) {
                *s += r as f64;
            }
        }
        let mut best = 0;
        for (i, &s) in sums.iter().enumerate() {
            if s > sums[best] {
                best = i;
            }
        }
        best
    };
    let mut out = Vec::new();
    for (c, step) in steps.iter().enumerate() {
        let (prev, start, end) = (bounds[c], bounds[c + 1], bounds[c + 2]);
        if start >= end {
            continue;
        }
        let best_before = best_in(prev, start.max(prev + 1).min(n));
        let best_after = best_in(start, end);
        let hits: Vec<usize> = std::iter::once(0)
            .chain(result.arms[start..end].iter().scan(0, |acc, &a| {
                *acc += usize::from(a as usize == best_after);
                Some(*acc)
            }))
            .collect();
        let need = (share * window as f64).ceil() as usize;
        let found = (0..(end - start).saturating_sub(window - 1))
            .find(|&i| hits[i + window] - hits[i] >= need);
        out.push(Reconvergence {
            change_s: step.at_s,
            best_before,
            best_after,
            samples: found,
            seconds: found.map(|i| (result.arrivals_ms[start + i] / 1000.0 - step.at_s).max(0.0)),
        });
    }
    out
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// Runs an experiment and writes everything under `out`; returns the markdown report.
pub fn run_experiment(prepared: &Prepared, out: &Path, progress: bool) -> anyhow::Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cfg = &prepared.config;
    let records = prepared.run_all(progress)?;
    let synthetic = prepared.matrix_synthetic;
    let label = if synthetic {
        "SYNTHETIC matrix — "
    } else {
        ""
    };

    // runs.csv
    let mut runs_csv = csv::Writer::from_path(out.join("runs.csv"))?;
    runs_csv.write_record([
        "experiment",
        "synthetic",
        "link",
        "lambda",
        "offload",
        "policy",
        "seed",
        "samples",
        "accuracy",
        "offload_rate",
        "mean_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "total_cost",
        "cost_per_sample",
        "cum_reward",
        "pseudo_regret",
        "realized_regret",
        "best_arm",
        "best_split",
        "best_threshold",
        "bytes_sent",
    ])?;
    for r in &records {
        let p = prepared.params[r.param];
        let res = &r.result;
        let (best, _) = res.best_arm();
        let arm = prepared.space.arms()[best];
        runs_csv.write_record(
            [cfg.name.clone(), synthetic.to_string()]
                .into_iter()
                .chain(run_key(cfg, p, r))
                .chain([
                    res.samples().to_string(),
                    res.accuracy().map(|a| a.to_string()).unwrap_or_default(),
                    res.offload_rate().to_string(),
                    res.mean_latency_ms().to_string(),
                    res.latency_percentile_ms(95.0).to_string(),
                    res.latency_percentile_ms(99.0).to_string(),
                    res.cost_sum.to_string(),
                    (res.cost_sum / res.samples() as f64).to_string(),
                    res.reward_sum.to_string(),
                    res.pseudo_regret_curve()
                        .last()
                        .copied()
                        .unwrap_or(0.0)
                        .to_string(),
                    res.realized_regret().to_string(),
                    best.to_string(),
                    arm.split.to_string(),
                    arm.threshold.to_string(),
                    res.bytes_sent.to_string(),
                ]),
        )?;
    }
    runs_csv.flush()?;

    // series.csv (first seed)
    let mut series_csv = csv::Writer::from_path(out.join("series.csv"))?;
    series_csv.write_record([
        "link",
        "lambda",
        "offload",
        "policy",
        "seed",
        "t",
        "time_s",
        "arm",
        "split",
        "threshold",
        "reward",
        "cum_regret",
        "offloaded",
        "latency_ms",
        "link_mbps",
    ])?;
    for r in records.iter().filter(|r| r.seed == cfg.seeds[0]) {
        let p = prepared.params[r.param];
        let curve = r.result.pseudo_regret_curve();
        for s in &r.result.series {
            series_csv.write_record(run_key(cfg, p, r).into_iter().chain([
                s.t.to_string(),
                s.time_s.to_string(),
                s.arm.to_string(),
                s.split.to_string(),
                s.threshold.to_string(),
                s.reward.to_string(),
                curve[s.t].to_string(),
                u8::from(s.offloaded).to_string(),
                s.latency_ms.to_string(),
                s.link_mbps.to_string(),
            ]))?;
        }
    }
    series_csv.flush()?;

    // Aggregates per (link, param, policy).
    let mut groups: BTreeMap<(usize, usize, usize), Vec<&RunResult>> = BTreeMap::new();
    for r in &records {
        groups
            .entry((r.link, r.param, r.policy))
            .or_default()
            .push(&r.result);
    }
    let aggs: BTreeMap<(usize, usize, usize), Aggregate> =
        groups.iter().map(|(k, v)| (*k, aggregate(v))).collect();

    let mut summary_csv = csv::Writer::from_path(out.join("summary.csv"))?;
    summary_csv.write_record([
        "experiment",
        "synthetic",
        "link",
        "lambda",
        "offload",
        "policy",
        "runs",
        "accuracy",
        "offload_rate",
        "mean_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "cost_per_sample",
        "total_cost",
        "cum_reward",
        "pseudo_regret",
        "pseudo_regret_std",
        "realized_regret",
    ])?;
    for (&(link, param, policy), a) in &aggs {
        let p = prepared.params[param];
        summary_csv.write_record([
            cfg.name.clone(),
            synthetic.to_string(),
            cfg.links[link].name.clone(),
            p.lambda.to_string(),
            p.offload.map(|o| o.to_string()).unwrap_or_default(),
            cfg.policies[policy].name.clone(),
            a.runs.to_string(),
            a.accuracy.map(|x| x.to_string()).unwrap_or_default(),
            a.offload_rate.to_string(),
            a.mean_latency_ms.to_string(),
            a.p95_latency_ms.to_string(),
            a.p99_latency_ms.to_string(),
            a.cost_per_sample.to_string(),
            a.total_cost.to_string(),
            a.cum_reward.to_string(),
            a.pseudo_regret.to_string(),
            a.pseudo_regret_std.to_string(),
            a.realized_regret.to_string(),
        ])?;
    }
    summary_csv.flush()?;

    // Report.
    let mut md = String::new();
    writeln!(md, "# {}{}\n", label, cfg.name)?;
    if !cfg.description.is_empty() {
        writeln!(md, "{}\n", cfg.description.trim())?;
    }
    writeln!(
        md,
        "matrix `{}`{} ({} samples, {} layers, exits {:?}); device: {}; {} samples per run, seeds {:?}; arms: {} (splits {} × thresholds {:?}); mean payload {:.0} B\n",
        cfg.matrix.path.display(),
        if synthetic { " **SYNTHETIC**" } else { "" },
        prepared.workload.len(),
        prepared.workload.num_layers(),
        prepared
            .space
            .arms()
            .iter()
            .map(|a| a.split)
            .collect::<std::collections::BTreeSet<_>>(),
        prepared.device_description,
        cfg.samples,
        cfg.seeds,
        prepared.space.len(),
        cfg.arms.describe_splits(),
        cfg.arms.thresholds,
        prepared.workload.mean_bytes(),
    )?;
    for link in 0..cfg.links.len() {
        for (pi, p) in prepared.params.iter().enumerate() {
            writeln!(
                md,
                "## link `{}`, λ = {}{}\n",
                cfg.links[link].name,
                p.lambda,
                p.offload.map(|o| format!(", o = {o}")).unwrap_or_default()
            )?;
            writeln!(
                md,
                "| policy | accuracy | offload rate | mean / p95 / p99 latency (ms) | cost/sample | cum. reward | pseudo-regret (± sd) |"
            )?;
            writeln!(md, "|---|---|---|---|---|---|---|")?;
            for (qi, q) in cfg.policies.iter().enumerate() {
                let a = &aggs[&(link, pi, qi)];
                writeln!(
                    md,
                    "| {} | {} | {:.3} | {:.1} / {:.1} / {:.1} | {:.3} | {:.1} | {:.1} ± {:.1} |",
                    q.name,
                    fmt_opt(a.accuracy, 4),
                    a.offload_rate,
                    a.mean_latency_ms,
                    a.p95_latency_ms,
                    a.p99_latency_ms,
                    a.cost_per_sample,
                    a.cum_reward,
                    a.pseudo_regret,
                    a.pseudo_regret_std,
                )?;
            }
            writeln!(md)?;
        }
    }

    // Cost cut against a baseline policy.
    if let Some(base_name) = &cfg.report.baseline {
        let bi = cfg
            .policies
            .iter()
            .position(|p| &p.name == base_name)
            .with_context(|| format!("report.baseline `{base_name}` is not a policy"))?;
        writeln!(md, "## cost cut against `{base_name}`\n")?;
        writeln!(
            md,
            "| link | λ / o | policy | cost/sample | cost cut | accuracy | accuracy drop (points) |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for link in 0..cfg.links.len() {
            for (pi, p) in prepared.params.iter().enumerate() {
                let base = &aggs[&(link, pi, bi)];
                for (qi, q) in cfg.policies.iter().enumerate() {
                    if qi == bi {
                        continue;
                    }
                    let a = &aggs[&(link, pi, qi)];
                    let drop = a.accuracy.zip(base.accuracy).map(|(x, b)| 100.0 * (b - x));
                    writeln!(
                        md,
                        "| {} | {}{} | {} | {:.3} | {:.1} % | {} | {} |",
                        cfg.links[link].name,
                        p.lambda,
                        p.offload.map(|o| format!(" / {o}")).unwrap_or_default(),
                        q.name,
                        a.cost_per_sample,
                        100.0 * (1.0 - a.cost_per_sample / base.cost_per_sample),
                        fmt_opt(a.accuracy, 4),
                        fmt_opt(drop, 2),
                    )?;
                }
            }
        }
        writeln!(md)?;
    }

    // Re-convergence after step changes.
    let stepped: Vec<usize> = (0..cfg.links.len())
        .filter(|&l| !cfg.links[l].steps.is_empty())
        .collect();
    if !stepped.is_empty() {
        let mut rc_csv = csv::Writer::from_path(out.join("reconvergence.csv"))?;
        rc_csv.write_record([
            "link",
            "lambda",
            "offload",
            "policy",
            "seed",
            "change_s",
            "best_before",
            "best_after",
            "samples",
            "seconds",
        ])?;
        writeln!(
            md,
            "## re-convergence after step changes (window {}, share {})\n",
            cfg.report.reconvergence_window, cfg.report.reconvergence_share
        )?;
        writeln!(
            md,
            "| link | λ | policy | change at (s) | best arm before → after (split) | re-converged runs | mean samples | mean seconds |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let mut table: BTreeMap<(usize, usize, usize, usize), Vec<Reconvergence>> = BTreeMap::new();
        for r in records.iter().filter(|r| stepped.contains(&r.link)) {
            let p = prepared.params[r.param];
            let rcs = reconvergence(
                &r.result,
                &cfg.links[r.link].steps,
                cfg.report.reconvergence_window,
                cfg.report.reconvergence_share,
            );
            for (ci, rc) in rcs.into_iter().enumerate() {
                rc_csv.write_record(run_key(cfg, p, r).into_iter().chain([
                    rc.change_s.to_string(),
                    rc.best_before.to_string(),
                    rc.best_after.to_string(),
                    rc.samples.map(|s| s.to_string()).unwrap_or_default(),
                    rc.seconds.map(|s| s.to_string()).unwrap_or_default(),
                ]))?;
                table
                    .entry((r.link, r.param, r.policy, ci))
                    .or_default()
                    .push(rc);
            }
        }
        rc_csv.flush()?;
        for (&(link, param, policy, _), rcs) in &table {
            let done: Vec<&Reconvergence> = rcs.iter().filter(|r| r.samples.is_some()).collect();
            let mean = |f: &dyn Fn(&Reconvergence) -> f64| {
                (!done.is_empty())
                    .then(|| done.iter().map(|r| f(r)).sum::<f64>() / done.len() as f64)
            };
            let split = |a: usize| prepared.space.arms()[a].split;
            writeln!(
                md,
                "| {} | {} | {} | {} | {} → {} | {}/{} | {} | {} |",
                cfg.links[link].name,
                prepared.params[param].lambda,
                cfg.policies[policy].name,
                rcs[0].change_s,
                split(rcs[0].best_before),
                split(rcs[0].best_after),
                done.len(),
                rcs.len(),
                fmt_opt(mean(&|r| r.samples.unwrap_or(0) as f64), 0),
                fmt_opt(mean(&|r| r.seconds.unwrap_or(0.0)), 1),
            )?;
        }
        writeln!(md)?;
    }
    std::fs::write(out.join("report.md"), &md)?;

    // Plots.
    let text = plots::png_text_available();
    for link in 0..cfg.links.len() {
        for (pi, p) in prepared.params.iter().enumerate() {
            let curves: Vec<(String, Vec<f64>)> = cfg
                .policies
                .iter()
                .enumerate()
                .map(|(qi, q)| (q.name.clone(), aggs[&(link, pi, qi)].regret_curve.clone()))
                .collect();
            plots::regret(
                &out.join(format!("regret_{}_{}", cfg.links[link].name, p.tag())),
                &format!(
                    "{label}cumulative pseudo-regret — {} λ={}{}",
                    cfg.links[link].name,
                    p.lambda,
                    p.offload.map(|o| format!(" o={o}")).unwrap_or_default()
                ),
                &curves,
                text,
            )?;
            let link_model = prepared.link_model(link, cfg.seeds[0])?;
            let arms: Vec<(String, Vec<(f64, f64)>)> = records
                .iter()
                .filter(|r| r.link == link && r.param == pi && r.seed == cfg.seeds[0])
                .map(|r| {
                    (
                        cfg.policies[r.policy].name.clone(),
                        r.result
                            .series
                            .iter()
                            .map(|s| (s.time_s, s.split as f64))
                            .collect(),
                    )
                })
                .collect();
            let end_s = records
                .iter()
                .filter(|r| r.link == link && r.seed == cfg.seeds[0])
                .filter_map(|r| r.result.arrivals_ms.last())
                .fold(1.0f64, |a, &b| a.max(b / 1000.0));
            let rate: Vec<(f64, f64)> = (0..=600)
                .map(|i| {
                    let t = end_s * i as f64 / 600.0;
                    (t, link_model.rate_mbps(t * 1000.0))
                })
                .collect();
            plots::arms_over_link(
                &out.join(format!("arms_{}_{}", cfg.links[link].name, p.tag())),
                &format!(
                    "{label}chosen split over the link rate — {} λ={}{} (seed {})",
                    cfg.links[link].name,
                    p.lambda,
                    p.offload.map(|o| format!(" o={o}")).unwrap_or_default(),
                    cfg.seeds[0]
                ),
                &arms,
                &rate,
                prepared.workload.num_layers(),
                plots::ArmAxes {
                    time: "simulated time (s)",
                    rate: "link capacity (Mbit/s)",
                },
                text,
            )?;
        }
    }
    let mut points: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (qi, q) in cfg.policies.iter().enumerate() {
        let pts = aggs
            .iter()
            .filter(|((_, _, p), _)| *p == qi)
            .filter_map(|(_, a)| a.accuracy.map(|acc| (a.cost_per_sample, acc)))
            .collect();
        points.push((q.name.clone(), pts));
    }
    plots::tradeoff(
        &out.join("accuracy_vs_cost"),
        &format!("{label}accuracy vs cost per sample over the λ/o sweep and links"),
        &points,
        text,
    )?;
    Ok(md)
}
