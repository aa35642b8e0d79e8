//! The compute thread: dynamic batching and the forward passes.
//!
//! burn's operations block, so the model lives on one dedicated OS thread and async tasks
//! hand it [`Job`]s over a channel, each with a oneshot for its answer. The thread forms
//! batches of requests at the same split layer: it takes the oldest queued request and waits
//! (at most `max_wait`, counted from that request's arrival) until `max_batch_size` requests
//! at its split layer are queued. Under load the queue fills while a batch computes, so
//! batches form without waiting; when idle, a lone request waits at most `max_wait`.
//! Requests at other split layers keep their place in the queue and are served in arrival
//! order of their oldest request.
//!
//! A batch is padded to its longest sequence with zeros and a [`PaddingMask`]; the model's
//! "padding is invisible" invariant makes each answer equal to running the request alone.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::prelude::*;
use splitee_common::protocol::{Answer, ErrorCode, ProtocolError, ReplyOptions};
use splitee_common::{Hidden, MultiExitBert, PaddingMask};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// One validated request, decoded to f32.
pub struct Job {
    pub request_id: u64,
    /// Last layer the edge ran: the cloud runs `split_layer..num_layers` (0-based range).
    pub split_layer: usize,
    pub seq_len: usize,
    /// `[seq_len, hidden]`, row-major.
    pub states: Vec<f32>,
    /// Cloud-side early exits, the threshold already checked to lie in `[0, 1]`.
    pub options: ReplyOptions,
    /// When the request finished arriving: queueing time counts from here.
    pub received: Instant,
    pub reply: oneshot::Sender<Result<Answer, ProtocolError>>,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_wait: Duration,
}

/// The sending side of the compute thread. Dropping every clone of the sender (held by
/// [`ComputeHandle`] and whoever it was cloned to) lets the thread finish the queue and stop.
pub struct ComputeHandle {
    pub jobs: Sender<Job>,
    thread: JoinHandle<()>,
}

impl ComputeHandle {
    /// Stops accepting jobs and waits until every queued job is answered.
    pub fn join(self) {
        drop(self.jobs);
        if self.thread.join().is_err() {
            tracing::error!("the compute thread panicked outside a batch");
        }
    }
}

pub fn spawn(
    model: MultiExitBert,
    device: Device,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
) -> std::io::Result<ComputeHandle> {
    let (jobs, receiver) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("splitee-compute".into())
        .spawn(move || {
            Compute {
                model,
                device,
                policy,
                metrics,
            }
            .run(receiver)
        })?;
    Ok(ComputeHandle { jobs, thread })
}

struct Compute {
    model: MultiExitBert,
    device: Device,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
}

/// A finished request: probabilities of the exit that answered.
struct Outcome {
    probs: Vec<f32>,
    exit_layer: usize,
}

impl Compute {
    fn run(self, receiver: Receiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut open = true;
        loop {
            if queue.is_empty() {
                match receiver.recv() {
                    Ok(job) => queue.push_back(job),
                    Err(_) => return,
                }
            }
            let split = queue[0].split_layer;
            let deadline = queue[0].received + self.policy.max_wait;
            // Gather until the oldest request's split layer has a full batch, its wait is
            // over, or no more requests can come.
            while open {
                loop {
                    match receiver.try_recv() {
                        Ok(job) => queue.push_back(job),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                let ready = queue.iter().filter(|j| j.split_layer == split).count();
                let now = Instant::now();
                if !open || ready >= self.policy.max_batch_size || now >= deadline {
                    break;
                }
                match receiver.recv_timeout(deadline - now) {
                    Ok(job) => queue.push_back(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            let mut batch = Vec::with_capacity(self.policy.max_batch_size);
            let mut rest = VecDeque::with_capacity(queue.len());
            for job in queue.drain(..) {
                if job.split_layer == split && batch.len() < self.policy.max_batch_size {
                    batch.push(job);
                } else {
                    rest.push_back(job);
                }
            }
            queue = rest;
            self.run_batch(batch);
        }
    }

    fn run_batch(&self, jobs: Vec<Job>) {
        let started = Instant::now();
        // burn reports most problems as errors, but a panic inside an operation must not take
        // the worker down with it: the batch gets `internal` errors and the thread lives on.
        let result = catch_unwind(AssertUnwindSafe(|| self.forward(&jobs)));
        let compute = started.elapsed();
        Metrics::observe_seconds(&self.metrics.compute, compute);
        self.metrics.batch_size.observe(jobs.len() as f64);
        let batch_size = jobs.len() as u16;
        let outcomes: Vec<Result<Outcome, ProtocolError>> = match result {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(error)) => {
                tracing::error!(%error, "batch failed");
                jobs.iter()
                    .map(|_| {
                        Err(ProtocolError::new(
                            ErrorCode::Internal,
                            format!("model error: {error}"),
                        ))
                    })
                    .collect()
            }
            Err(_) => {
                tracing::error!(batch_size, "a forward pass panicked");
                jobs.iter()
                    .map(|_| {
                        Err(ProtocolError::new(
                            ErrorCode::Internal,
                            "the forward pass failed",
                        ))
                    })
                    .collect()
            }
        };
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            let queue = started.saturating_duration_since(job.received);
            Metrics::observe_seconds(&self.metrics.queue, queue);
            let answer = outcome.and_then(|outcome| {
                if outcome.probs.iter().any(|p| !p.is_finite()) {
                    return Err(ProtocolError::new(
                        ErrorCode::NonFinite,
                        "the model produced non-finite probabilities from these hidden states",
                    ));
                }
                // First maximum; NaN was excluded just above.
                let predicted = outcome.probs.iter().enumerate().fold(0, |best, (i, p)| {
                    if *p > outcome.probs[best] { i } else { best }
                });
                Ok(Answer {
                    request_id: job.request_id,
                    probs: outcome.probs,
                    predicted: predicted as u32,
                    exit_layer: outcome.exit_layer as u16,
                    compute_us: compute.as_micros() as u64,
                    queue_us: queue.as_micros() as u64,
                    batch_size,
                })
            });
            // The requester may have gone (stream reset): nobody to tell.
            let _ = job.reply.send(answer);
        }
    }

    /// Runs layers `split..L` for a batch at one split layer, with cloud-side early exits
    /// when requests ask for them. Per-request problems are `Err` entries; a model error
    /// fails the whole batch.
    fn forward(&self, jobs: &[Job]) -> splitee_common::Result<Vec<Result<Outcome, ProtocolError>>> {
        let model = &self.model;
        let num_layers = model.num_layers();
        let hidden_size = model.config().hidden_size;
        let split = jobs[0].split_layer;
        let lengths: Vec<usize> = jobs.iter().map(|j| j.seq_len).collect();
        let seq_len = lengths.iter().copied().max().unwrap_or(0);
        let mut padded = vec![0.0f32; jobs.len() * seq_len * hidden_size];
        for (row, job) in padded.chunks_exact_mut(seq_len * hidden_size).zip(jobs) {
            row[..job.states.len()].copy_from_slice(&job.states);
        }
        let states = Tensor::<3>::from_data(
            TensorData::new(padded, [jobs.len(), seq_len, hidden_size]),
            &self.device,
        );
        let mut hidden = Hidden {
            states,
            mask: self.mask(&lengths, seq_len),
        };
        let mut outcomes: Vec<Option<Outcome>> = jobs.iter().map(|_| None).collect();
        // Indices into `jobs` of the rows still in `hidden`, in row order.
        let mut active: Vec<usize> = (0..jobs.len()).collect();
        let mut layer = split;
        let exits: Vec<usize> = model
            .exit_config()
            .layers
            .iter()
            .copied()
            .filter(|&l| l > split && l < num_layers)
            .collect();
        for exit in exits {
            if active
                .iter()
                .all(|&j| jobs[j].options.cloud_exit_threshold.is_none())
            {
                break;
            }
            hidden = model.run_layers(hidden, layer..exit)?;
            layer = exit;
            let probs = to_vec2(model.exit_probs(exit, &hidden)?);
            let labels = probs.len() / active.len();
            let mut keep = Vec::with_capacity(active.len());
            for (row, &j) in active.iter().enumerate() {
                let p = &probs[row * labels..(row + 1) * labels];
                if jobs[j].options.exits_at(p) {
                    outcomes[j] = Some(Outcome {
                        probs: p.to_vec(),
                        exit_layer: exit,
                    });
                } else {
                    keep.push(row);
                }
            }
            if keep.is_empty() {
                active.clear();
                break;
            }
            if keep.len() < active.len() {
                // Drop the answered rows so later layers compute only what is left.
                let index = Tensor::<1, Int>::from_data(
                    TensorData::new(
                        keep.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                        [keep.len()],
                    ),
                    &self.device,
                );
                active = keep.iter().map(|&r| active[r]).collect();
                let lengths: Vec<usize> = active.iter().map(|&j| jobs[j].seq_len).collect();
                hidden = Hidden {
                    states: hidden.states.select(0, index),
                    mask: self.mask(&lengths, seq_len),
                };
            }
        }
        if !active.is_empty() {
            hidden = model.run_layers(hidden, layer..num_layers)?;
            let probs = to_vec2(model.exit_probs(num_layers, &hidden)?);
            let labels = probs.len() / active.len();
            for (row, &j) in active.iter().enumerate() {
                outcomes[j] = Some(Outcome {
                    probs: probs[row * labels..(row + 1) * labels].to_vec(),
                    exit_layer: num_layers,
                });
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.ok_or_else(|| {
                    ProtocolError::new(ErrorCode::Internal, "request left the batch unanswered")
                })
            })
            .collect())
    }

    /// `None` when no row is padded: attention then needs no mask.
    fn mask(&self, lengths: &[usize], seq_len: usize) -> Option<PaddingMask> {
        lengths
            .iter()
            .any(|&len| len != seq_len)
            .then(|| PaddingMask::from_lengths(lengths, seq_len, &self.device))
    }
}

fn to_vec2(tensor: Tensor<2>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 tensors read back as f32")
}
