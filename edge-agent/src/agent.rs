//! The per-sample loop: the bandit picks an arm, the device runs its layers and exits, a
//! sample that is not confident enough goes to the cloud, and what it cost goes back to the
//! bandit.
//!
//! # Pipelining
//!
//! One async driver owns the bandit and serialises the device's work; offloads run as tasks,
//! so the device computes the next samples while earlier ones travel. At most
//! `pipeline.window` samples lie between the oldest unanswered one and the newest started:
//! that bounds the offloads in flight (each holds its hidden states) and the answers held
//! back so that output keeps input order.
//!
//! # Exactly one answer per sample
//!
//! Every accepted sample gets exactly one record: its edge pass ends in an exit (answered on
//! the device), or in an offload task whose result is either the cloud's answer or a failure,
//! after which the device finishes the sample from the hidden states it kept. A late cloud
//! answer after a timeout is never read: the request's stream was dropped with its future.
//! A sample whose offload task died unexpectedly still gets an error record (tasks are
//! tracked by id).
//!
//! # What the bandit is charged
//!
//! Edge cost: measured milliseconds up to each layer (or the `[device]` profile's). Offload
//! cost: the round trip the device waited (network + the worker's queue and compute), plus
//! `ms_per_kb` per kilobyte sent. A failed offload costs the time until the failure was known
//! plus the device's extra layers (priced like the layers before the split: measured, or from
//! the `[device]` profile); its "final confidence" is the device's deepest exit's
//! top probability, which is `C_L` when the device holds the whole model.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use splitee_bandits::{
    Arm, ArmIndex, Controller, CostModel, Decision, EdgeCost, NOT_EVALUATED, Observation,
    OffloadCost, RewardModel, RewardRange,
};
use splitee_common::protocol::{OffloadRequest, PayloadEncoding, ReplyOptions, encode_hidden};
use splitee_common::{Fingerprint, ModelDir};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudAnswer, CloudLink, OffloadFailure};
use crate::config::{AgentConfig, EdgeCosts};
use crate::edge::{EdgeModel, EdgePass, EdgeRuntime, ExitReading, argmax, max_prob};
use crate::input::InputRecord;
use crate::metrics::Metrics;
use crate::report::{Answered, ArmRecord, Latency, SampleRecord, Summary, Tally};
use crate::state::StateFile;

/// A sample between its edge pass and its cloud answer.
struct Pending {
    seq: u64,
    input: InputRecord,
    arm: (ArmIndex, Arm),
    pass: EdgePass,
    hidden: Vec<f32>,
    started: Instant,
    split: usize,
}

/// What an offload task reports.
struct OffloadDone {
    result: Result<CloudAnswer, OffloadFailure>,
    /// When the answer (or the failure) was known.
    at: Instant,
    sent: Instant,
}

pub struct Agent {
    edge: EdgeRuntime,
    cloud: Option<Arc<CloudLink>>,
    controller: Controller,
    state: Option<StateFile>,
    learned: u64,
    save_every: u64,
    fingerprint: Fingerprint,
    hidden_size: usize,
    encoding: PayloadEncoding,
    cloud_exit_threshold: Option<f32>,
    ms_per_kb: f64,
    window: usize,
    next_request_id: u64,
    metrics: Arc<Metrics>,
}

impl Agent {
    /// Loads the model onto `device`, builds or restores the bandit, and connects to the
    /// cloud (without waiting for it if it is not there). `fresh_state` ignores a saved state.
    pub async fn start(
        config: &AgentConfig,
        device: Device,
        metrics: Arc<Metrics>,
        fresh_state: bool,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let dir = ModelDir::open(&config.model)
            .with_context(|| format!("opening the model {}", config.model.display()))?;
        let num_layers = dir.config.num_hidden_layers;
        let hidden_size = dir.config.hidden_size;
        let (space, rule) = config
            .arms
            .build(num_layers, &dir.exits.layers)
            .context("in [arms]")?;
        let deepest_split = space.arms().iter().map(|a| a.split).max().unwrap_or(1);
        let edge_layers = config.edge_layers.unwrap_or(num_layers);
        anyhow::ensure!(
            edge_layers <= num_layers && deepest_split <= edge_layers,
            "edge_layers = {edge_layers}: it must be between the deepest split ({deepest_split}) \
             and the model's {num_layers} layers"
        );
        let offloads = rule.fallback == splitee_bandits::Fallback::Offload
            && space.arms().iter().any(|a| a.split < num_layers);
        anyhow::ensure!(
            !offloads || config.cloud.is_some(),
            "the arms offload (splits below {num_layers} with fallback = \"offload\") but there is \
             no [cloud]: add one, or set arms.fallback = \"exit-at-split\""
        );

        let edge_cost = match config.reward.edge_costs {
            EdgeCosts::Measured => EdgeCost::Measured,
            EdgeCosts::Profile => {
                let profile = config.device.as_ref().expect("validated with the config");
                anyhow::ensure!(
                    profile.layer_ms.len() == num_layers,
                    "[device] layer_ms has {} entries but the model has {num_layers} layers",
                    profile.layer_ms.len()
                );
                let cumulative = profile
                    .layer_ms
                    .iter()
                    .scan(profile.embed_ms, |total, ms| {
                        *total += ms;
                        Some(*total)
                    })
                    .collect();
                EdgeCost::Profile(cumulative)
            }
        };
        let lambda = config.reward.lambda;
        let cost = CostModel {
            lambda,
            edge: edge_cost,
            offload: OffloadCost::Measured,
        };
        let range = RewardRange::new(-lambda * config.reward.cost_scale_ms, 1.0)?;
        let fresh = Controller::new(
            space,
            rule,
            RewardModel::new(config.reward.kind, cost),
            &config.policy,
            Some(range),
        )?;

        let loaded = dir
            .load_prefix(&device, edge_layers)
            .with_context(|| format!("loading the model {}", config.model.display()))?;
        let state = config.state_file.as_ref().map(|path| {
            StateFile::new(path, loaded.fingerprint.to_string(), config.policy.clone())
        });
        let (controller, learned) = match &state {
            Some(file) if !fresh_state => match file.restore(&fresh)? {
                Some((controller, learned)) => {
                    tracing::info!(path = %file.path().display(), learned, "restored the bandit state");
                    (controller, learned)
                }
                None => (fresh, 0),
            },
            _ => (fresh, 0),
        };

        let labels_len = loaded.dir.exits.labels.len();
        tracing::info!(
            model = %loaded.fingerprint.short(),
            edge_layers,
            num_layers,
            arms = controller.space().len(),
            labels = labels_len,
            "edge model loaded"
        );
        let edge = EdgeRuntime::spawn(EdgeModel {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            device,
            rule,
            num_layers,
            measure: config.exits.measure,
            patience: config.exits.patience,
            evaluate_all_heads: config.arms.evaluate_all_heads,
        })?;
        let cloud = match &config.cloud {
            Some(cloud) => {
                let gauge = metrics.cloud_connected.clone();
                let on_change = Box::new(move |up: bool| {
                    gauge.set(i64::from(up));
                });
                Some(CloudLink::start(cloud.clone(), on_change).await?)
            }
            None => None,
        };
        Ok(Self {
            edge,
            cloud,
            controller,
            state,
            learned,
            save_every: config.save_state_every,
            fingerprint: loaded.fingerprint,
            hidden_size,
            encoding: config
                .cloud
                .as_ref()
                .map_or(PayloadEncoding::F16, |c| c.encoding),
            cloud_exit_threshold: config.cloud.as_ref().and_then(|c| c.cloud_exit_threshold),
            ms_per_kb: config.reward.ms_per_kb,
            window: config.pipeline.window,
            next_request_id: 0,
            metrics,
        })
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Samples the bandit has learnt from, including before a restart.
    pub fn learned(&self) -> u64 {
        self.learned
    }

    pub fn cloud_connected(&self) -> bool {
        self.cloud.as_ref().is_some_and(|c| c.is_connected())
    }

    /// Answers every sample from `inputs` until it closes (or `stop` is cancelled: samples
    /// already started are still answered), calling `sink` with each record in input order.
    pub async fn run(
        &mut self,
        mut inputs: mpsc::Receiver<InputRecord>,
        stop: CancellationToken,
        sink: &mut dyn FnMut(&SampleRecord),
    ) -> anyhow::Result<Summary> {
        let mut tally = Tally::default();
        let mut offloads: JoinSet<OffloadDone> = JoinSet::new();
        let mut pending: HashMap<tokio::task::Id, Pending> = HashMap::new();
        let mut held: BTreeMap<u64, (SampleRecord, Option<&'static str>)> = BTreeMap::new();
        let (mut next_seq, mut next_out) = (0u64, 0u64);
        let mut accepting = true;
        loop {
            let room = next_seq - next_out < self.window as u64;
            tokio::select! {
                biased;
                Some(joined) = offloads.join_next_with_id(), if !offloads.is_empty() => {
                    let (id, done) = match joined {
                        Ok((id, done)) => (id, Ok(done)),
                        Err(error) => (error.id(), Err(error)),
                    };
                    let sample = pending.remove(&id).expect("every task is tracked");
                    let seq = sample.seq;
                    let finished = match done {
                        Ok(done) => self.complete_offload(sample, done).await,
                        Err(error) => (
                            failed(&sample.input, format!("offload task failed: {error}")),
                            None,
                        ),
                    };
                    self.metrics.in_flight.dec();
                    held.insert(seq, finished);
                }
                () = stop.cancelled(), if accepting => {
                    tracing::info!("stopping: answering the samples already started");
                    accepting = false;
                }
                input = inputs.recv(), if accepting && room => {
                    let Some(input) = input else {
                        accepting = false;
                        continue;
                    };
                    let seq = next_seq;
                    next_seq += 1;
                    match self.start_sample(seq, input).await {
                        Started::Answered(record) => {
                            held.insert(seq, (record, None));
                        }
                        Started::Offload(sample, request) => {
                            let cloud = self.cloud.clone().expect("offloading arms need a cloud");
                            let task = offloads.spawn(async move {
                                let sent = Instant::now();
                                let result = cloud.offload(&request).await;
                                OffloadDone { result, at: Instant::now(), sent }
                            });
                            self.metrics.in_flight.inc();
                            pending.insert(task.id(), *sample);
                        }
                    }
                }
                else => break,
            }
            while let Some((mut record, failure)) = held.remove(&next_out) {
                record.prediction_name = record
                    .prediction
                    .and_then(|p| self.edge.labels().get(p as usize).cloned());
                tally.add(&record);
                self.metrics.record(&record, failure);
                sink(&record);
                next_out += 1;
            }
        }
        debug_assert!(held.is_empty() && pending.is_empty());
        self.save_state()?;
        Ok(tally.summary())
    }

    /// Saves the bandit state (if configured) and closes the cloud connection.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.save_state()?;
        if let Some(cloud) = &self.cloud {
            cloud.close().await;
        }
        Ok(())
    }

    fn save_state(&self) -> anyhow::Result<()> {
        match &self.state {
            Some(file) => file.save(&self.controller, self.learned),
            None => Ok(()),
        }
    }

    async fn start_sample(&mut self, seq: u64, input: InputRecord) -> Started {
        let text = match &input.text {
            Ok(text) => text.clone(),
            Err(error) => return Started::Answered(failed(&input, error.clone())),
        };
        let (index, arm) = self.controller.select();
        let started = Instant::now();
        let mut pass = match self.edge.run(text, arm).await {
            Ok(pass) => pass,
            Err(error) => return Started::Answered(failed(&input, format!("{error:#}"))),
        };
        match pass.decision {
            Decision::Exit { layer } => {
                let exit = pass
                    .exit(layer)
                    .expect("an exit decision has its reading")
                    .clone();
                let latency = Latency {
                    total: ms(started.elapsed()),
                    edge: pass.edge_ms(),
                    ..Latency::default()
                };
                let (confidences, edge_costs) = observed(&pass);
                let obs = Observation::exited(&confidences, layer).with_edge_costs(&edge_costs);
                let reward = self.learn(index, &obs);
                let cost = self.edge_cost(&obs, layer);
                Started::Answered(answer(
                    &input,
                    &exit,
                    Answered::Device,
                    (index, arm),
                    &pass,
                    latency,
                    0,
                    cost,
                    reward,
                    None,
                ))
            }
            Decision::Offload { after } => {
                let hidden = pass
                    .hidden
                    .take()
                    .expect("an offload decision keeps the states");
                let request = OffloadRequest {
                    request_id: self.next_request_id,
                    fingerprint: self.fingerprint.0,
                    split_layer: after as u16,
                    seq_len: pass.tokens as u32,
                    encoding: self.encoding,
                    options: ReplyOptions {
                        cloud_exit_threshold: self.cloud_exit_threshold,
                    },
                    payload: encode_hidden(&hidden, self.hidden_size, self.encoding),
                };
                self.next_request_id += 1;
                Started::Offload(
                    Box::new(Pending {
                        seq,
                        input,
                        arm: (index, arm),
                        pass,
                        hidden,
                        started,
                        split: after,
                    }),
                    request,
                )
            }
        }
    }

    async fn complete_offload(
        &mut self,
        sample: Pending,
        done: OffloadDone,
    ) -> (SampleRecord, Option<&'static str>) {
        let Pending {
            input,
            arm,
            pass,
            hidden,
            started,
            split,
            ..
        } = sample;
        let (confidences, edge_costs) = observed(&pass);
        match done.result {
            Ok(cloud) => {
                let probs = cloud.answer.probs.clone();
                let final_confidence = max_prob(&probs);
                let offload_ms = cloud.round_trip_ms + self.byte_cost(cloud.bytes_sent);
                let obs = Observation::offloaded(&confidences, split, final_confidence)
                    .with_edge_costs(&edge_costs)
                    .with_offload_cost(offload_ms);
                let reward = self.learn(arm.0, &obs);
                let cost = self.edge_cost(&obs, split).map(|edge| edge + offload_ms);
                let exit = ExitReading {
                    layer: usize::from(cloud.answer.exit_layer),
                    probs,
                    confidence: final_confidence,
                };
                let latency = Latency {
                    total: ms(done.at - started),
                    edge: pass.edge_ms(),
                    network: cloud.network_ms(),
                    cloud: cloud.cloud_ms(),
                    fallback: 0.0,
                };
                (
                    answer(
                        &input,
                        &exit,
                        Answered::Cloud,
                        arm,
                        &pass,
                        latency,
                        cloud.bytes_sent,
                        cost,
                        reward,
                        None,
                    ),
                    None,
                )
            }
            Err(failure) => {
                let best = pass
                    .exits
                    .iter()
                    .max_by(|a, b| a.confidence.total_cmp(&b.confidence))
                    .cloned()
                    .expect("an offload decision tested an exit");
                let local = match self.edge.finish(hidden, pass.tokens, split, best).await {
                    Ok(local) => local,
                    Err(error) => {
                        return (
                            failed(
                                &input,
                                format!("{failure}; finishing on the device failed: {error:#}"),
                            ),
                            Some(failure.kind()),
                        );
                    }
                };
                let waited_ms = ms(done.at - done.sent);
                let bytes_sent = match failure {
                    OffloadFailure::Unreachable(_) => 0,
                    _ => self.encoding.payload_len(pass.tokens, self.hidden_size) as u64,
                };
                // The layers the device ran after the failure, priced like its other layers.
                let finish_ms = self
                    .controller
                    .reward_model()
                    .cost
                    .device_finish_cost(split, local.exit.layer, local.extra_ms)
                    .unwrap_or_else(|error| {
                        tracing::warn!(%error, "charging the measured device time instead");
                        local.extra_ms
                    });
                let offload_ms = waited_ms + finish_ms + self.byte_cost(bytes_sent);
                let obs = Observation::offloaded(&confidences, split, local.exit.confidence)
                    .with_edge_costs(&edge_costs)
                    .with_offload_cost(offload_ms);
                let reward = self.learn(arm.0, &obs);
                let cost = self.edge_cost(&obs, split).map(|edge| edge + offload_ms);
                let latency = Latency {
                    total: ms(started.elapsed()),
                    edge: pass.edge_ms(),
                    fallback: waited_ms + local.extra_ms,
                    ..Latency::default()
                };
                (
                    answer(
                        &input,
                        &local.exit,
                        Answered::DeviceFallback,
                        arm,
                        &pass,
                        latency,
                        bytes_sent,
                        cost,
                        reward,
                        Some(failure.to_string()),
                    ),
                    Some(failure.kind()),
                )
            }
        }
    }

    /// Updates the bandit; a reward it cannot compute is logged, not fatal: the sample still
    /// has its answer.
    fn learn(&mut self, index: ArmIndex, obs: &Observation<'_>) -> Option<f64> {
        match self.controller.learn(index, obs) {
            Ok(reward) => {
                self.learned += 1;
                if self.learned.is_multiple_of(self.save_every)
                    && let Err(error) = self.save_state()
                {
                    tracing::warn!("{error:#}");
                }
                Some(reward)
            }
            Err(error) => {
                tracing::warn!(%error, "the bandit could not learn from a sample");
                None
            }
        }
    }

    /// The device cost the bandit charged for layers `1..=layer`.
    fn edge_cost(&self, obs: &Observation<'_>, layer: usize) -> Option<f64> {
        self.controller
            .reward_model()
            .cost
            .edge_cost(layer, obs)
            .ok()
    }

    fn byte_cost(&self, bytes: u64) -> f64 {
        self.ms_per_kb * bytes as f64 / 1024.0
    }
}

enum Started {
    Answered(SampleRecord),
    Offload(Box<Pending>, OffloadRequest),
}

/// Per-layer confidences (NaN where no head was evaluated) and cumulative edge milliseconds.
fn observed(pass: &EdgePass) -> (Vec<f64>, Vec<f64>) {
    let mut confidences = vec![NOT_EVALUATED; pass.cumulative_ms.len()];
    for exit in &pass.exits {
        confidences[exit.layer - 1] = exit.confidence;
    }
    (confidences, pass.cumulative_ms.clone())
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn failed(input: &InputRecord, error: String) -> SampleRecord {
    SampleRecord::failed(input.id.clone(), input.line, input.label, error)
}

#[allow(clippy::too_many_arguments)] // one record, assembled from its parts in one place
fn answer(
    input: &InputRecord,
    exit: &ExitReading,
    answered: Answered,
    (index, arm): (ArmIndex, Arm),
    pass: &EdgePass,
    latency_ms: Latency,
    bytes_sent: u64,
    cost_ms: Option<f64>,
    reward: Option<f64>,
    error: Option<String>,
) -> SampleRecord {
    let prediction = argmax(&exit.probs);
    SampleRecord {
        id: input.id.clone(),
        line: input.line,
        label: input.label,
        prediction: Some(prediction),
        prediction_name: None,
        confidence: Some(max_prob(&exit.probs)),
        answered,
        exit_layer: Some(exit.layer),
        arm: Some(ArmRecord {
            index: index.0,
            split: arm.split,
            threshold: arm.threshold,
        }),
        tokens: Some(pass.tokens),
        truncated_from: pass.truncated_from,
        latency_ms,
        bytes_sent,
        cost_ms,
        reward,
        error,
    }
}
