//! The per-sample loop: the bandit picks an arm, the device runs its layers and exits, a
//! sample that is not confident enough goes to the cloud, and what it cost goes back to the
//! bandit.
//!
//! # Pipelining
//!
//! One async driver owns the bandit and serialises the device's work; offloads run as tasks,
//! so the device computes the next samples while earlier ones travel. At most
//! `pipeline.window` samples are started and not yet given out: in input order ([`Agent::run`],
//! batch mode) that is the span between the oldest unanswered sample and the newest started,
//! and it bounds the offloads in flight (each holds its hidden states) and the answers held
//! back so that output keeps input order; as answered ([`Agent::run_as_answered`], the
//! `serve` API, whose requests are unrelated) a record goes out as soon as it is ready, so a
//! quick device answer never waits behind another request's offload.
//!
//! # Deadlines
//!
//! A sample may carry a deadline (`InputRecord::deadline`, from a `serve` request). One not
//! started by then is not run: it gets an error record and the bandit never sees it. An
//! offload still out at the deadline is cut there and answered by the split's exit, the
//! deepest the device already computed; past the deadline the device runs no more layers
//! after a failed offload. Either way the sample is settled once, like any failed offload,
//! charged the time it waited.
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
//! Nothing here: the agent reports what it measured (the exits its pass evaluated, the device
//! clock, the offload's round trip, the worker's compute time, bytes sent, or the failure and
//! the device's finish) and `splitee_bandits`' settlement prices it and computes the reward —
//! the same code the simulator calls. Each record carries that report (`observed`) and the
//! order the bandit learnt it in (`learned`), so a run can be replayed through the settlement.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use splitee_bandits::{
    Arm, ArmIndex, CloudAnswered, Controller, Decision, OffloadFailed, Reported, SampleLog,
    SampleReport, Settlement, max_prob,
};
use splitee_model::{Fingerprint, ModelDir};
use splitee_protocol::{OffloadRequest, PayloadEncoding, ReplyOptions, encode_hidden};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudAnswer, CloudLink, Unanswered};
use crate::config::AgentConfig;
use crate::edge::{EdgeModel, EdgePass, EdgeRuntime, ExitReading, LocalFinish};
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
    result: Result<CloudAnswer, Unanswered>,
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

        if let Some(device) = &config.device {
            device.validate(num_layers).context("in [device]")?;
        }
        let (reward, range) = config
            .reward
            .build(num_layers, config.device.as_ref())
            .context("in [reward]")?;
        let fresh = Controller::new(space, rule, reward, &config.policy, Some(range))?;
        let pass = fresh
            .device_pass(
                &dir.exits.layers,
                config.exits,
                config.arms.evaluate_all_heads,
            )
            .context("in [exits]")?;

        let loaded = dir
            .load_prefix(&device, edge_layers)
            .with_context(|| format!("loading the model {}", config.model.display()))?;
        let state = config
            .state_file
            .as_ref()
            .map(|path| {
                StateFile::open(path, loaded.fingerprint.to_string(), config.policy.clone())
            })
            .transpose()?;
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
            pass,
        })?;
        let cloud = match &config.cloud {
            Some(cloud) => Some(
                CloudLink::start(
                    cloud.clone(),
                    loaded.fingerprint.0,
                    config.pipeline.window,
                    metrics.clone(),
                )
                .await?,
            ),
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
            window: config.pipeline.window,
            next_request_id: 0,
            metrics,
        })
    }

    /// The model's fingerprint (the state file and the worker check it).
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
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

    /// The cloud's worker endpoints (host names resolved), and whether each is connected now.
    pub fn cloud_endpoints(&self) -> Vec<(std::net::SocketAddr, bool)> {
        self.cloud
            .as_ref()
            .map_or_else(Vec::new, |c| c.endpoint_states())
    }

    /// Answers every sample from `inputs` until it closes (or `stop` is cancelled: samples
    /// already started are still answered), calling `sink` with each record in input order.
    pub async fn run(
        &mut self,
        inputs: mpsc::Receiver<InputRecord>,
        stop: CancellationToken,
        sink: &mut dyn FnMut(&SampleRecord),
    ) -> anyhow::Result<Summary> {
        self.drive(inputs, stop, Order::Input, sink).await
    }

    /// [`Self::run`], calling `sink` with each record as soon as it is ready (the records'
    /// `line` says which input each answers).
    pub async fn run_as_answered(
        &mut self,
        inputs: mpsc::Receiver<InputRecord>,
        stop: CancellationToken,
        sink: &mut dyn FnMut(&SampleRecord),
    ) -> anyhow::Result<Summary> {
        self.drive(inputs, stop, Order::AsAnswered, sink).await
    }

    async fn drive(
        &mut self,
        mut inputs: mpsc::Receiver<InputRecord>,
        stop: CancellationToken,
        order: Order,
        sink: &mut dyn FnMut(&SampleRecord),
    ) -> anyhow::Result<Summary> {
        let mut tally = Tally::default();
        let mut offloads: JoinSet<OffloadDone> = JoinSet::new();
        let mut pending: HashMap<tokio::task::Id, Pending> = HashMap::new();
        let mut held: BTreeMap<u64, (SampleRecord, Option<&'static str>)> = BTreeMap::new();
        // Samples started, and records given out (in input order: those before `given_out`).
        let (mut next_seq, mut given_out) = (0u64, 0u64);
        let mut accepting = true;
        loop {
            let room = next_seq - given_out < self.window as u64;
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
                    tracing::info!(
                        started = next_seq,
                        in_flight = next_seq - given_out,
                        "stopping: answering the samples already started"
                    );
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
                            held.insert(seq, (*record, None));
                        }
                        Started::Offload(sample, request) => {
                            let cloud = self.cloud.clone().expect("offloading arms need a cloud");
                            let deadline = sample.input.deadline;
                            let task = offloads.spawn(async move {
                                let sent = Instant::now();
                                let result = cloud.offload(request, deadline).await;
                                OffloadDone { result, at: Instant::now(), sent }
                            });
                            self.metrics.in_flight.inc();
                            pending.insert(task.id(), *sample);
                        }
                    }
                }
                else => break,
            }
            loop {
                let ready = match order {
                    Order::Input => held.remove(&given_out),
                    Order::AsAnswered => held.pop_first().map(|(_, ready)| ready),
                };
                let Some((mut record, failure)) = ready else {
                    break;
                };
                record.prediction_name = record
                    .prediction
                    .and_then(|p| self.edge.labels().get(p as usize).cloned());
                tally.add(&record);
                self.metrics.record(&record, failure);
                sink(&record);
                given_out += 1;
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
            Err(error) => return Started::Answered(Box::new(failed(&input, error.clone()))),
        };
        if past(input.deadline) {
            // Nothing computed yet, so nothing to answer with; the bandit never sees it.
            let error = "deadline: it passed before the device started this sample".to_owned();
            return Started::Answered(Box::new(failed(&input, error)));
        }
        let (index, arm) = self.controller.select();
        let started = Instant::now();
        let mut pass = match self.edge.run(text, arm).await {
            Ok(pass) => pass,
            Err(error) => return Started::Answered(Box::new(failed(&input, format!("{error:#}")))),
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
                let report = pass
                    .pass
                    .report(index, pass.tokens, Reported::Exited { layer });
                let settled = self.settle(&report);
                Started::Answered(Box::new(answer(
                    &input,
                    &exit,
                    Answered::Device,
                    (index, arm),
                    &pass,
                    latency,
                    0,
                    settled,
                    None,
                )))
            }
            Decision::Offload { after } => {
                let hidden = pass
                    .hidden
                    .take()
                    .expect("an offload decision keeps the states");
                let request = OffloadRequest {
                    request_id: self.next_request_id,
                    fingerprint: self.fingerprint.0,
                    // The link sets it from its timeout and round trip when it sends.
                    deadline_ms: 0,
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
            mut pass,
            hidden,
            started,
            split,
            ..
        } = sample;
        match done.result {
            Ok(cloud) => {
                let probs = cloud.answer.probs.clone();
                let exit_layer = usize::from(cloud.answer.exit_layer);
                let outcome = Reported::Answered(CloudAnswered {
                    after: split,
                    exit_layer,
                    confidence: pass.pass.answer_confidence(&probs),
                    round_trip_ms: cloud.round_trip_ms,
                    cloud_compute_ms: cloud.answer.compute_us as f64 / 1e3,
                    bytes_sent: cloud.bytes_sent,
                });
                let settled = self.settle(&pass.pass.report(arm.0, pass.tokens, outcome));
                let exit = ExitReading {
                    layer: exit_layer,
                    confidence: max_prob(&probs),
                    probs,
                };
                let latency = Latency {
                    total: ms(done.at - started),
                    edge: pass.edge_ms(),
                    network: cloud.network_ms(),
                    cloud: cloud.cloud_ms(),
                    fallback: 0.0,
                };
                let mut record = answer(
                    &input,
                    &exit,
                    Answered::Cloud,
                    arm,
                    &pass,
                    latency,
                    cloud.bytes_sent,
                    settled,
                    None,
                );
                record.worker = Some(cloud.endpoint);
                (record, None)
            }
            Err(Unanswered {
                failure,
                attempts_sent,
            }) => {
                let local = if past(input.deadline) {
                    // The answer is due: the split's exit, already computed, answers.
                    LocalFinish {
                        layer: split,
                        probs: None,
                        extra_ms: 0.0,
                    }
                } else {
                    match self.edge.finish(hidden, pass.tokens, split).await {
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
                    }
                };
                let (exit, confidence) = match local.probs {
                    Some(probs) => {
                        let confidence = pass.pass.answer_confidence(&probs);
                        let reading = ExitReading {
                            layer: local.layer,
                            confidence: max_prob(&probs),
                            probs,
                        };
                        (reading, confidence)
                    }
                    None => {
                        let reading = pass
                            .exit(split)
                            .expect("an offload decision tested the split's exit")
                            .clone();
                        let confidence = reading.confidence;
                        (reading, confidence)
                    }
                };
                let waited_ms = ms(done.at - done.sent);
                let bytes_sent = self.encoding.payload_len(pass.tokens, self.hidden_size) as u64
                    * u64::from(attempts_sent);
                let outcome = Reported::Failed(OffloadFailed {
                    after: split,
                    waited_ms,
                    bytes_sent,
                    finish_layer: exit.layer,
                    confidence,
                    finish_ms: local.extra_ms,
                });
                let settled = self.settle(&pass.pass.report(arm.0, pass.tokens, outcome));
                let latency = Latency {
                    total: ms(started.elapsed()),
                    edge: pass.edge_ms(),
                    fallback: waited_ms + local.extra_ms,
                    ..Latency::default()
                };
                (
                    answer(
                        &input,
                        &exit,
                        Answered::DeviceFallback,
                        arm,
                        &pass,
                        latency,
                        bytes_sent,
                        settled,
                        Some(failure.to_string()),
                    ),
                    Some(failure.kind()),
                )
            }
        }
    }

    /// Prices the sample and updates the bandit; a sample it cannot price is logged, not
    /// fatal: it still has its answer.
    fn settle(&mut self, report: &SampleReport<'_>) -> Settled {
        let log = SampleLog::new(report);
        match self.controller.settle(report) {
            Ok(settlement) => {
                self.learned += 1;
                if self.learned.is_multiple_of(self.save_every)
                    && let Err(error) = self.save_state()
                {
                    tracing::warn!("{error:#}");
                }
                Settled {
                    settlement: Some((settlement, self.learned)),
                    log,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the bandit could not learn from a sample");
                Settled {
                    settlement: None,
                    log,
                }
            }
        }
    }
}

/// A sample's settlement (and the bandit's count of samples learnt after it), with the report
/// it was computed from.
struct Settled {
    settlement: Option<(Settlement, u64)>,
    log: SampleLog,
}

enum Started {
    Answered(Box<SampleRecord>),
    Offload(Box<Pending>, OffloadRequest),
}

/// The order records are given out in.
#[derive(Clone, Copy)]
enum Order {
    Input,
    AsAnswered,
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|deadline| Instant::now() >= deadline)
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
    settled: Settled,
    error: Option<String>,
) -> SampleRecord {
    let prediction = splitee_bandits::argmax(&exit.probs);
    let settlement = settled.settlement;
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
        cost_ms: settlement.map(|(s, _)| s.cost()),
        reward: settlement.map(|(s, _)| s.reward),
        learned: settlement.map(|(_, learned)| learned),
        observed: Some(settled.log),
        worker: None,
        error,
    }
}
