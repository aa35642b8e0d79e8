//! Experiments: a TOML file names a matrix, the simulated agent (an edge-agent config, or its
//! tables inline), links and policies; the sweep runs every (link × λ/o × policy × seed) in
//! parallel, and every arm of the agent's arm space as a fixed policy on the same samples and
//! link — the best of those is the best fixed arm in hindsight, the reference of every regret
//! and share in the report. Writes CSVs, plots and a markdown report.
//!
//! # Config format
//!
//! ```toml
//! name = "exp1-splitee"
//! description = "…"
//! samples = 2000                 # samples per run
//! seeds = [1, 2, 3]              # one run per seed; same seed = same samples and times
//! series_every = 1               # time-series stride (series.csv, first seed only)
//! order = "shuffled"             # | "sequential": the matrix's order, as a file is streamed
//!
//! [matrix]
//! path = "simulations/data/sentence-polarity-test.csv"
//! format = "splitee"             # | "uee-tsv" | "adaee-csv"
//! # exit_layers = [2, 4, 6]      # uee-tsv / adaee-csv: the layer of each exit
//! # num_layers = 6
//!
//! [arrivals]
//! kind = "poisson"               # | "fixed" with interval_ms
//! rate_per_s = 10
//!
//! [clock]                        # the simulated clocks (`clock` module); optional
//! edge = "configs/devices/rpi4-minilm.toml"   # | "recorded" | "profile" ([agent.device]) | "none"
//! edge_scale = 1.0
//! cloud_speedup = 10
//! # hidden = 384                 # default: the matrix's `hidden` metadata
//!
//! [agent]                        # the simulated edge agent, exactly as an agent config says:
//! config = "configs/demo.toml"   # read from an edge-agent config file, or inline:
//! # [agent.arms] / [agent.reward] / [agent.policy] / [agent.exits] / [agent.pipeline] /
//! # [agent.cloud] (encoding, request_timeout_ms, cloud_exit_threshold) / [agent.device] /
//! # agent.edge_layers
//!
//! [sweep]                        # optional: overrides agent.reward's λ and o
//! lambda = [0.1]
//! offload = [0.1, 0.2]
//!
//! [[links]]
//! name = "verizon-lte"
//! trace = { kind = "mahimahi", path = "../shared/traces/mahimahi/Verizon-LTE-short.up" }
//! rtt = { kind = "constant", ms = 40 }
//! steps = [{ at_s = 60, factor = 0.05 }]          # optional
//! loss = { mean_good_s = 30, mean_bad_s = 2 }      # optional Gilbert–Elliott
//!
//! [[links]]
//! name = "lte-emulated"
//! emulator = "configs/links/lte.toml"   # a link emulator config, replayed
//!
//! [[policies]]                   # compared with the agent's own [policy] (named "agent")
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

mod config;
mod report;

use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use splitee_bandits::{ArmSpace, Controller, DecisionRule, PolicyConfig, RewardConfig};

pub use config::{
    AgentTables, CloudTable, ExperimentConfig, LinkEntry, MatrixSource, PipelineTable, PolicyEntry,
    ReplayLink, ReportConfig, RttSource, Sweep, replay_emulator,
};
pub use report::run_experiment;

use crate::clock::ClockConfig;
use crate::matrix::ConfidenceMatrix;
use crate::sim::{self, AgentModel, RunResult, RunSpec, Workload};
use splitee_link::{BaseTrace, Link, Rtt, StepChange};

impl MatrixSource {
    /// Reads the matrix (from `path`, when given, instead of the config's) and places its
    /// exits as configured.
    pub fn load(&self, path: Option<&std::path::Path>) -> anyhow::Result<ConfidenceMatrix> {
        let path = path.unwrap_or(&self.path);
        let mut matrix = self.format.read(path)?;
        match (&self.exit_layers, self.num_layers) {
            (None, None) => {}
            (Some(layers), num_layers) => {
                let num_layers = num_layers.or(layers.last().copied()).unwrap_or(0);
                matrix
                    .place_exits(layers.clone(), num_layers)
                    .map_err(|e| anyhow::anyhow!("matrix.exit_layers: {e}"))?;
            }
            (None, Some(_)) => anyhow::bail!("matrix.num_layers needs matrix.exit_layers"),
        }
        Ok(matrix)
    }
}

impl RttSource {
    pub fn load(&self) -> anyhow::Result<Rtt> {
        Ok(match self {
            RttSource::Constant { ms } => {
                anyhow::ensure!(ms.is_finite() && *ms >= 0.0, "rtt ms must be ≥ 0");
                Rtt::Constant(*ms)
            }
            RttSource::Fivegophers {
                path,
                carrier,
                server,
            } => Rtt::read_fivegophers(path, carrier.as_deref(), server.as_deref())?,
        })
    }
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

/// Who plays a run: one of the compared policies, or one arm always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Player {
    Policy(usize),
    Arm(usize),
}

/// One finished run with its coordinates.
pub struct RunRecord {
    pub link: usize,
    pub param: usize,
    pub player: Player,
    pub seed: u64,
    pub result: RunResult,
}

/// A loaded link: the shared trace and RTT model, and what the config said.
pub struct PreparedLink {
    pub base: Arc<BaseTrace>,
    pub rtt: Arc<Rtt>,
    pub steps: Vec<StepChange>,
    pub replay: ReplayLink,
}

/// Everything resolved from a config, ready to run.
pub struct Prepared {
    pub config: ExperimentConfig,
    pub agent: AgentTables,
    /// The compared policies: the agent's own (named "agent") first, then `[[policies]]`.
    pub policies: Vec<PolicyEntry>,
    pub matrix_synthetic: bool,
    pub workload: Workload,
    pub space: ArmSpace,
    pub rule: DecisionRule,
    pub params: Vec<Param>,
    pub links: Vec<PreparedLink>,
    pub clock_description: String,
}

impl Prepared {
    pub fn new(config: ExperimentConfig, matrix: &ConfidenceMatrix) -> anyhow::Result<Self> {
        anyhow::ensure!(config.samples > 0, "samples must be > 0");
        anyhow::ensure!(!config.seeds.is_empty(), "seeds is empty");
        anyhow::ensure!(!config.links.is_empty(), "no links");
        config.arrivals.check().map_err(anyhow::Error::msg)?;
        let agent = config.agent_tables()?;
        let mut policies: Vec<PolicyEntry> = agent
            .policy
            .iter()
            .map(|policy| PolicyEntry {
                name: "agent".into(),
                policy: policy.clone(),
            })
            .collect();
        policies.extend(config.policies.iter().cloned());
        anyhow::ensure!(
            !policies.is_empty(),
            "no policy: give the agent a [policy] or list [[policies]]"
        );
        let mut names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        anyhow::ensure!(
            names.len() == policies.len(),
            "policy names must be unique (the agent's own is named \"agent\")"
        );

        let clock = config.clock.clone().unwrap_or_else(|| ClockConfig {
            edge: if matrix.has_layer_ms() {
                "recorded"
            } else {
                "none"
            }
            .into(),
            ..ClockConfig::default()
        });
        let clocks = clock
            .resolve(matrix, agent.device.as_ref(), agent.cloud.encoding)
            .context("in [clock]")?;
        let workload = Workload::new(matrix, &clocks)?;
        let l = matrix.num_layers();
        let (space, rule) = agent
            .arms
            .build(l, matrix.exit_layers())
            .context("in [agent.arms]")?;

        let sweep = &config.sweep;
        let lambdas = if sweep.lambda.is_empty() {
            vec![agent.reward.lambda]
        } else {
            sweep.lambda.clone()
        };
        let offloads: Vec<Option<f64>> = if sweep.offload.is_empty() {
            vec![agent.reward.offload]
        } else {
            sweep.offload.iter().copied().map(Some).collect()
        };
        let params: Vec<Param> = lambdas
            .iter()
            .flat_map(|&lambda| {
                offloads
                    .iter()
                    .map(move |&offload| Param { lambda, offload })
            })
            .collect();
        let prepared_without_links = |links| Prepared {
            matrix_synthetic: matrix.is_synthetic(),
            workload: workload.clone(),
            space: space.clone(),
            rule,
            params: params.clone(),
            links,
            clock_description: clocks.description.clone(),
            agent: agent.clone(),
            policies: policies.clone(),
            config: config.clone(),
        };
        // Every parameter point must build (a sweep value out of range is a config error,
        // not a failed run among hundreds).
        let check = prepared_without_links(Vec::new());
        for &param in &params {
            check.reward(param).context("in [agent.reward] / [sweep]")?;
        }
        let links = config
            .links
            .iter()
            .map(|entry| {
                let replay = entry.resolve()?;
                let base = replay
                    .trace
                    .load()
                    .with_context(|| format!("link {}", entry.name))?;
                let rtt = replay
                    .rtt
                    .load()
                    .with_context(|| format!("link {}", entry.name))?;
                Ok(PreparedLink {
                    base: Arc::new(base),
                    rtt: Arc::new(rtt),
                    steps: replay.steps.clone(),
                    replay,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(prepared_without_links(links))
    }

    /// The `[reward]` table at one sweep point.
    fn reward(
        &self,
        p: Param,
    ) -> anyhow::Result<(splitee_bandits::RewardModel, splitee_bandits::RewardRange)> {
        let reward = RewardConfig {
            lambda: p.lambda,
            offload: p.offload,
            ..self.agent.reward.clone()
        };
        Ok(reward.build(self.workload.num_layers(), self.agent.device.as_ref())?)
    }

    /// What the simulated agent lives with.
    pub fn agent_model(&self) -> AgentModel {
        AgentModel {
            exits: self.agent.exits,
            evaluate_all_heads: self.agent.arms.evaluate_all_heads,
            window: self.agent.pipeline.window,
            request_timeout_ms: self.agent.cloud.request_timeout_ms as f64,
            cloud_exit_threshold: self.agent.cloud.cloud_exit_threshold,
            edge_layers: self.agent.edge_layers.unwrap_or(self.workload.num_layers()),
        }
    }

    /// The policy for one run: randomised policies get the run seed mixed in.
    fn policy_for(&self, player: Player, seed: u64) -> PolicyConfig {
        let mix = |s: u64| s ^ sim::stream_seed(seed, 5);
        match player {
            Player::Arm(arm) => PolicyConfig::Fixed { arm },
            Player::Policy(policy) => match self.policies[policy].policy.clone() {
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
            },
        }
    }

    pub fn player_name(&self, player: Player) -> String {
        match player {
            Player::Policy(p) => self.policies[p].name.clone(),
            Player::Arm(a) => {
                let arm = self.space.arms()[a];
                format!("fixed arm {a} (split {}, α {})", arm.split, arm.threshold)
            }
        }
    }

    /// Runs one (link, param, player, seed).
    pub fn run_one(
        &self,
        link: usize,
        param: usize,
        player: Player,
        seed: u64,
    ) -> anyhow::Result<RunResult> {
        let (model, range) = self.reward(self.params[param])?;
        let controller = Controller::new(
            self.space.clone(),
            self.rule,
            model,
            &self.policy_for(player, seed),
            Some(range),
        )
        .with_context(|| self.player_name(player))?;
        let link_model = self.link_model(link, seed)?;
        sim::run(RunSpec {
            workload: &self.workload,
            controller,
            agent: self.agent_model(),
            link: &link_model,
            arrivals: self.config.arrivals,
            order: self.config.order,
            samples: self.config.samples,
            seed,
        })
        .with_context(|| {
            format!(
                "{} on {}",
                self.player_name(player),
                self.config.links[link].name
            )
        })
    }

    /// A link with this run seed's Gilbert–Elliott draw.
    pub fn link_model(&self, link: usize, seed: u64) -> anyhow::Result<Link> {
        let cfg = &self.config;
        let prepared = &self.links[link];
        let horizon = cfg.samples as f64 * cfg.arrivals.mean_gap_ms() * 4.0 + 600_000.0;
        let mut ge_rng = ChaCha8Rng::seed_from_u64(sim::stream_seed(seed, 4));
        Link::new(
            prepared.base.clone(),
            prepared.rtt.clone(),
            &prepared.steps,
            prepared.replay.loss.as_ref(),
            horizon,
            &mut ge_rng,
        )
        .map_err(|m| anyhow::anyhow!("link {}: {m}", cfg.links[link].name))
    }

    /// Runs the whole sweep, the fixed arms included, in parallel; results are in job order
    /// whatever the thread count.
    pub fn run_all(&self, progress: bool) -> anyhow::Result<Vec<RunRecord>> {
        let cfg = &self.config;
        let players: Vec<Player> = (0..self.policies.len())
            .map(Player::Policy)
            .chain((0..self.space.len()).map(Player::Arm))
            .collect();
        let mut jobs = Vec::new();
        for link in 0..cfg.links.len() {
            for param in 0..self.params.len() {
                for &player in &players {
                    for &seed in &cfg.seeds {
                        jobs.push((link, param, player, seed));
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
        let records = jobs
            .par_iter()
            .map(|&(link, param, player, seed)| {
                let result = self.run_one(link, param, player, seed)?;
                bar.inc(1);
                Ok(RunRecord {
                    link,
                    param,
                    player,
                    seed,
                    result,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        bar.finish_and_clear();
        Ok(records)
    }
}

/// The best fixed arm in hindsight of one (link, param, seed), and every arm's run there.
pub struct Hindsight<'a> {
    /// `fixed[k]`: arm `k` played on every sample.
    pub fixed: Vec<&'a RunResult>,
    pub best_arm: usize,
    /// The best of the arms that never offloaded a sample (early exit on the device alone),
    /// when there is one: what the split itself adds is measured against it.
    pub best_local_arm: Option<usize>,
}

impl<'a> Hindsight<'a> {
    pub fn new(fixed: Vec<&'a RunResult>) -> Self {
        let best = |candidates: &mut dyn Iterator<Item = usize>| {
            candidates.fold(None, |best: Option<usize>, k| match best {
                Some(b) if fixed[b].reward_sum >= fixed[k].reward_sum => Some(b),
                _ => Some(k),
            })
        };
        let best_arm = best(&mut (0..fixed.len())).expect("at least one arm");
        let best_local_arm = best(&mut (0..fixed.len()).filter(|&k| fixed[k].offloaded == 0));
        Hindsight {
            fixed,
            best_arm,
            best_local_arm,
        }
    }

    pub fn best_reward(&self) -> f64 {
        self.fixed[self.best_arm].reward_sum
    }

    /// `best − Σ r_t`: what the policy gave up against always playing the best arm.
    pub fn regret(&self, run: &RunResult) -> f64 {
        self.best_reward() - run.reward_sum
    }

    /// The policy's reward as a share of the best fixed arm's (`None` unless that is > 0).
    pub fn share(&self, run: &RunResult) -> Option<f64> {
        let best = self.best_reward();
        (best > 0.0).then(|| run.reward_sum / best)
    }

    /// `R(t) = Σ_{τ ≤ t} (μ* − μ_{a_τ})`, `μ_k` = arm `k`'s mean reward over its own run.
    pub fn pseudo_regret_curve(&self, run: &RunResult) -> Vec<f64> {
        let means: Vec<f64> = self
            .fixed
            .iter()
            .map(|r| r.reward_sum / r.samples() as f64)
            .collect();
        let best = means[self.best_arm];
        let mut acc = 0.0;
        run.arms
            .iter()
            .map(|&a| {
                acc += best - means[a as usize];
                acc
            })
            .collect()
    }
}

/// Re-convergence after a step change: samples (and seconds) from the change until the
/// policy plays the new best arm in at least `share` of a `window`-sample window. The best
/// arm of a stretch is the fixed arm with the highest reward over its samples.
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
    hindsight: &Hindsight<'_>,
    steps: &[StepChange],
    window: usize,
    share: f64,
) -> Vec<Reconvergence> {
    let n = result.samples();
    if window == 0 || hindsight.fixed.iter().any(|r| r.samples() != n) {
        return Vec::new();
    }
    let index_at = |t_ms: f64| result.arrivals_ms.partition_point(|&a| a < t_ms);
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend(steps.iter().map(|s| index_at(s.at_s * 1000.0)));
    bounds.push(n);
    let best_in = |a: usize, b: usize| -> usize {
        let sums: Vec<f64> = hindsight
            .fixed
            .iter()
            .map(|r| r.rewards[a..b].iter().sum())
            .collect();
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
