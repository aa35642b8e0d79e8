//! The device side of the model: tokenize, embed, run layers `1..=s` with their exits, and
//! finish a sample locally when the cloud cannot.
//!
//! burn's operations block, so the model lives on one dedicated OS thread; the async driver
//! hands it [`Job`]s and awaits a oneshot. One thread is also what a small board wants: the
//! tensor backend already spreads each layer over the cores.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use splitee_bandits::{Arm, Decision, DecisionRule, SampleDecision, Step};
use splitee_common::{Hidden, MultiExitBert, Tokenizer};
use tokio::sync::oneshot;

use crate::config::ConfidenceMeasure;

/// Turns exit probabilities into the confidence the exit test compares with `α`.
#[derive(Debug, Clone, Copy)]
pub struct Confidence {
    measure: ConfidenceMeasure,
    patience: usize,
    /// Class of the previous evaluated exit and how many exits in a row predicted it.
    run: Option<(u32, usize)>,
}

impl Confidence {
    pub fn new(measure: ConfidenceMeasure, patience: usize) -> Self {
        Self {
            measure,
            patience: patience.max(1),
            run: None,
        }
    }

    /// Patience counts agreeing exits in a row, so it must see every head up to the split.
    pub fn needs_every_head(&self) -> bool {
        self.measure == ConfidenceMeasure::Patience
    }

    /// Confidence of the next evaluated exit, whose class probabilities are `probs`.
    pub fn observe(&mut self, probs: &[f32]) -> f64 {
        let predicted = argmax(probs);
        let run = match self.run {
            Some((class, run)) if class == predicted => run + 1,
            _ => 1,
        };
        self.run = Some((predicted, run));
        match self.measure {
            ConfidenceMeasure::MaxProb => max_prob(probs),
            ConfidenceMeasure::Entropy => normalized_certainty(probs),
            ConfidenceMeasure::Patience => (run as f64 / self.patience as f64).min(1.0),
        }
    }
}

pub fn argmax(probs: &[f32]) -> u32 {
    let mut best = 0;
    for (class, &p) in probs.iter().enumerate() {
        if p > probs[best] {
            best = class;
        }
    }
    best as u32
}

pub fn max_prob(probs: &[f32]) -> f64 {
    f64::from(probs.iter().copied().fold(0.0, f32::max))
}

/// `1 − H(p) / ln K`, clamped to `[0, 1]` against rounding.
fn normalized_certainty(probs: &[f32]) -> f64 {
    if probs.len() < 2 {
        return 1.0;
    }
    let entropy: f64 = probs
        .iter()
        .map(|&p| f64::from(p))
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    (1.0 - entropy / (probs.len() as f64).ln()).clamp(0.0, 1.0)
}

/// One exit the device evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitReading {
    pub layer: usize,
    pub probs: Vec<f32>,
    pub confidence: f64,
}

/// What the device did with one sample under one arm.
#[derive(Debug, Clone)]
pub struct EdgePass {
    pub tokens: usize,
    /// Token count before truncation at the model's limit, when it was cut.
    pub truncated_from: Option<usize>,
    pub decision: Decision,
    /// Exits evaluated, in layer order; the decision's exit is among them.
    pub exits: Vec<ExitReading>,
    /// Tokenizing and embedding, milliseconds.
    pub embed_ms: f64,
    /// `cumulative_ms[j − 1]`: milliseconds from the start of the sample to the end of layer
    /// `j` and its exit head, when one was evaluated.
    pub cumulative_ms: Vec<f64>,
    /// Hidden states after the split, `[tokens, hidden]` row-major, when offloading.
    pub hidden: Option<Vec<f32>>,
}

impl EdgePass {
    pub fn exit(&self, layer: usize) -> Option<&ExitReading> {
        self.exits.iter().find(|e| e.layer == layer)
    }

    pub fn edge_ms(&self) -> f64 {
        self.cumulative_ms.last().copied().unwrap_or(self.embed_ms)
    }
}

/// The device's answer for a sample the cloud did not answer.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalFinish {
    pub exit: ExitReading,
    /// Milliseconds spent on layers after the split (0 when none were run).
    pub extra_ms: f64,
}

enum Job {
    Run {
        text: String,
        arm: Arm,
        reply: oneshot::Sender<anyhow::Result<EdgePass>>,
    },
    Finish {
        hidden: Vec<f32>,
        tokens: usize,
        split: usize,
        best_so_far: ExitReading,
        reply: oneshot::Sender<anyhow::Result<LocalFinish>>,
    },
}

/// The compute thread. Dropping it lets the thread drain its queue and stop.
pub struct EdgeRuntime {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    layers: usize,
    exit_layers: Vec<usize>,
    labels: Vec<String>,
}

/// Everything the compute thread owns.
pub struct EdgeModel {
    pub model: MultiExitBert,
    pub tokenizer: Tokenizer,
    pub device: Device,
    pub rule: DecisionRule,
    /// Layers of the whole model (the cloud's last layer).
    pub num_layers: usize,
    pub measure: ConfidenceMeasure,
    pub patience: usize,
    pub evaluate_all_heads: bool,
}

impl EdgeRuntime {
    pub fn spawn(edge: EdgeModel) -> anyhow::Result<Self> {
        let layers = edge.model.num_layers();
        let exit_layers = edge.model.exit_config().layers.clone();
        let labels = edge.model.exit_config().labels.clone();
        let (jobs, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("splitee-edge".into())
            .spawn(move || {
                for job in receiver {
                    edge.serve(job);
                }
            })
            .context("starting the edge compute thread")?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            layers,
            exit_layers,
            labels,
        })
    }

    /// Layers this device holds.
    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn exit_layers(&self) -> &[usize] {
        &self.exit_layers
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub async fn run(&self, text: String, arm: Arm) -> anyhow::Result<EdgePass> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Run { text, arm, reply })?;
        answer.await.context("the edge compute thread stopped")?
    }

    /// Finishes an offloaded sample on the device: the deepest exit it holds, else the best
    /// exit evaluated so far.
    pub async fn finish(
        &self,
        hidden: Vec<f32>,
        tokens: usize,
        split: usize,
        best_so_far: ExitReading,
    ) -> anyhow::Result<LocalFinish> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Finish {
            hidden,
            tokens,
            split,
            best_so_far,
            reply,
        })?;
        answer.await.context("the edge compute thread stopped")?
    }

    fn send(&self, job: Job) -> anyhow::Result<()> {
        self.jobs
            .as_ref()
            .expect("jobs is only taken in drop")
            .send(job)
            .map_err(|_| anyhow::anyhow!("the edge compute thread stopped"))
    }
}

impl Drop for EdgeRuntime {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the edge compute thread panicked");
        }
    }
}

impl EdgeModel {
    fn serve(&self, job: Job) {
        match job {
            Job::Run { text, arm, reply } => {
                let _ = reply.send(guarded(|| self.run(&text, arm)));
            }
            Job::Finish {
                hidden,
                tokens,
                split,
                best_so_far,
                reply,
            } => {
                let _ = reply.send(guarded(|| self.finish(hidden, tokens, split, best_so_far)));
            }
        }
    }

    fn run(&self, text: &str, arm: Arm) -> anyhow::Result<EdgePass> {
        let started = Instant::now();
        let encoding = self.tokenizer.encode(text)?;
        let tokens = encoding.ids.len();
        let ids: Vec<i64> = encoding.ids.iter().map(|&id| i64::from(id)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens]), &self.device);
        // A single sequence has no padding, so it needs no mask.
        let mut hidden = self.model.embed(ids, None)?;
        let embed_ms = ms_since(started);

        let mut decision = SampleDecision::new(arm, self.rule, self.num_layers);
        let mut confidence = Confidence::new(self.measure, self.patience);
        let evaluate_all = self.evaluate_all_heads || confidence.needs_every_head();
        let mut exits = Vec::new();
        let mut cumulative_ms = Vec::new();
        let decided = loop {
            let layer = decision.next_layer();
            hidden = self.model.run_layers(hidden, layer - 1..layer)?;
            let has_head = self.model.exit_config().layers.contains(&layer);
            let needed = decision.needs_confidence(layer) || layer == self.num_layers;
            let reading = if has_head && (needed || evaluate_all) {
                let probs = self.probs(layer, &hidden)?;
                let c = confidence.observe(&probs);
                exits.push(ExitReading {
                    layer,
                    probs,
                    confidence: c,
                });
                Some(c)
            } else {
                // GPU backends queue work: wait for the layer so its time is charged to it.
                self.device
                    .sync()
                    .map_err(|e| anyhow::anyhow!("synchronising the device: {e:?}"))?;
                None
            };
            cumulative_ms.push(ms_since(started));
            match decision.observe(layer, reading)? {
                Step::Continue => {}
                Step::Done(d) => break d,
            }
        };
        let hidden = match decided {
            Decision::Offload { .. } => Some(to_rows(&hidden)?),
            Decision::Exit { .. } => None,
        };
        Ok(EdgePass {
            tokens,
            truncated_from: (encoding.untruncated_len > tokens).then_some(encoding.untruncated_len),
            decision: decided,
            exits,
            embed_ms,
            cumulative_ms,
            hidden,
        })
    }

    fn finish(
        &self,
        rows: Vec<f32>,
        tokens: usize,
        split: usize,
        best_so_far: ExitReading,
    ) -> anyhow::Result<LocalFinish> {
        let deepest = self
            .model
            .exit_config()
            .layers
            .iter()
            .copied()
            .filter(|&l| l > split)
            .max();
        let Some(deepest) = deepest else {
            return Ok(LocalFinish {
                exit: best_so_far,
                extra_ms: 0.0,
            });
        };
        let started = Instant::now();
        let size = self.model.config().hidden_size;
        let states = Tensor::<3>::from_data(TensorData::new(rows, [1, tokens, size]), &self.device);
        let hidden = self
            .model
            .run_layers(Hidden { states, mask: None }, split..deepest)?;
        let probs = self.probs(deepest, &hidden)?;
        let confidence = max_prob(&probs);
        Ok(LocalFinish {
            exit: ExitReading {
                layer: deepest,
                probs,
                confidence,
            },
            extra_ms: ms_since(started),
        })
    }

    fn probs(&self, layer: usize, hidden: &Hidden) -> anyhow::Result<Vec<f32>> {
        let probs = self.model.exit_probs(layer, hidden)?;
        probs
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading exit {layer}: {e:?}"))
    }
}

/// A panic inside burn must not take the agent down: the sample gets an error record.
fn guarded<T>(work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the model panicked on this input")))
}

fn to_rows(hidden: &Hidden) -> anyhow::Result<Vec<f32>> {
    hidden
        .states
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading hidden states: {e:?}"))
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_prob_and_entropy_agree_on_the_extremes() {
        let mut c = Confidence::new(ConfidenceMeasure::MaxProb, 1);
        assert_eq!(c.observe(&[0.25, 0.75]), 0.75);
        let mut e = Confidence::new(ConfidenceMeasure::Entropy, 1);
        assert!((e.observe(&[0.5, 0.5]) - 0.0).abs() < 1e-12);
        assert!((e.observe(&[1.0, 0.0]) - 1.0).abs() < 1e-12);
        let mid = e.observe(&[0.9, 0.1]);
        assert!(mid > 0.5 && mid < 0.6, "{mid}");
    }

    #[test]
    fn patience_counts_agreeing_exits_in_a_row() {
        let mut c = Confidence::new(ConfidenceMeasure::Patience, 3);
        let pos = [0.1, 0.9];
        let neg = [0.8, 0.2];
        let seen: Vec<f64> = [pos, pos, neg, neg, neg, neg]
            .iter()
            .map(|p| c.observe(p))
            .collect();
        assert_eq!(seen, [1.0 / 3.0, 2.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]);
        assert!(c.needs_every_head());
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[0.5, 0.5]), 0);
        assert_eq!(argmax(&[0.1, 0.2, 0.7]), 2);
    }
}
