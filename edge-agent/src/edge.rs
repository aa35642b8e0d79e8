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
use splitee_bandits::{Arm, Decision, DevicePass, Step};
use splitee_model::{Hidden, MultiExitBert, Tokenizer};
use tokio::sync::oneshot;

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
    /// The bandits' record of the pass: the confidences seen and the device clock (from the
    /// start of the sample, tokenizing included, to the end of each layer and its head).
    pub pass: DevicePass,
    /// Exits evaluated, in layer order; the decision's exit is among them.
    pub exits: Vec<ExitReading>,
    /// Tokenizing and embedding, milliseconds.
    pub embed_ms: f64,
    /// Hidden states after the split, `[tokens, hidden]` row-major, when offloading.
    pub hidden: Option<Vec<f32>>,
}

impl EdgePass {
    pub fn exit(&self, layer: usize) -> Option<&ExitReading> {
        self.exits.iter().find(|e| e.layer == layer)
    }

    pub fn edge_ms(&self) -> f64 {
        self.pass
            .device_ms()
            .last()
            .copied()
            .unwrap_or(self.embed_ms)
    }
}

/// The device's answer for a sample the cloud did not answer: the exit after `layer`, whose
/// probabilities are new (`Some`) when the device ran layers past the split to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalFinish {
    pub layer: usize,
    pub probs: Option<Vec<f32>>,
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
    /// A fresh pass of the agent's controller (rule, exit heads, measure); each sample starts
    /// a copy.
    pub pass: DevicePass,
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

    /// Finishes an offloaded sample on the device at the deepest exit it holds past the split;
    /// without one, at the split's own exit.
    pub async fn finish(
        &self,
        hidden: Vec<f32>,
        tokens: usize,
        split: usize,
    ) -> anyhow::Result<LocalFinish> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Finish {
            hidden,
            tokens,
            split,
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
                reply,
            } => {
                let _ = reply.send(guarded(|| self.finish(hidden, tokens, split)));
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

        let mut pass = self.pass.clone();
        pass.start(arm);
        let mut exits = Vec::new();
        let decided = loop {
            let layer = pass.next_layer().expect("undecided until Step::Done");
            hidden = self.model.run_layers(hidden, layer - 1..layer)?;
            let probs = if pass.wants_head(layer) {
                Some(self.probs(layer, &hidden)?)
            } else {
                // GPU backends queue work: wait for the layer so its time is charged to it.
                self.device
                    .sync()
                    .map_err(|e| anyhow::anyhow!("synchronising the device: {e:?}"))?;
                None
            };
            let step = pass.observe(layer, probs.as_deref(), ms_since(started))?;
            if let Some(probs) = probs {
                exits.push(ExitReading {
                    layer,
                    confidence: pass.confidences()[layer - 1],
                    probs,
                });
            }
            if let Step::Done(d) = step {
                break d;
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
            pass,
            exits,
            embed_ms,
            hidden,
        })
    }

    fn finish(&self, rows: Vec<f32>, tokens: usize, split: usize) -> anyhow::Result<LocalFinish> {
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
                layer: split,
                probs: None,
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
        Ok(LocalFinish {
            layer: deepest,
            probs: Some(probs),
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
