//! The compute thread: fair dynamic batching, deadlines, and the forward passes.
//!
//! burn's operations block, so the model lives on one dedicated OS thread and async tasks
//! hand it [`Job`]s over a channel, each with a oneshot for its answer. Jobs queue per tenant
//! (the connection they came on), and tenants take turns: a batch starts from the oldest job
//! of the tenant whose turn it is, and fills with jobs at the same split layer taken one per
//! tenant in turn, so a connection that floods the worker gets its share of the compute and no
//! more. The thread waits (at most `max_wait`, counted from the first job's arrival) until
//! `max_batch_size` jobs at that split layer are queued. Under load the queue fills while a
//! batch computes, so batches form without waiting; when idle, a lone request waits at most
//! `max_wait`.
//!
//! Nothing is computed for nobody. Before a batch starts, a job whose client is gone (its
//! request task dropped the answer's receiver: the stream was reset or the connection lost)
//! is dropped, and so is a job whose deadline has passed or would pass before a batch at its
//! split layer is done (recent batches' time there, smoothed, is the estimate); that client is
//! told `deadline_exceeded` at once and answers on its device. The batch then runs one layer
//! at a time, and before each layer the same test drops the rows that would now miss their
//! deadline at the pace of the batch's own layers so far (the machine may have slowed down
//! since the estimate), so at most a layer's work is spent on an answer nobody gets. Under
//! overload this keeps the computed answers the ones that arrive in time, instead of the
//! oldest ones, which would all be late.
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
use splitee_model::{Hidden, MultiExitBert, PaddingMask};
use splitee_protocol::{Answer, ErrorCode, ProtocolError, ReplyOptions};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// One validated request, decoded to f32.
pub struct Job {
    pub request_id: u64,
    /// Whose turn it takes: jobs of one tenant (a connection) share one place in the rotation.
    pub tenant: u64,
    /// Last layer the edge ran: the cloud runs `split_layer..num_layers` (0-based range).
    pub split_layer: usize,
    pub seq_len: usize,
    /// `[seq_len, hidden]`, row-major.
    pub states: Vec<f32>,
    /// Cloud-side early exits, the threshold already checked to lie in `[0, 1]`.
    pub options: ReplyOptions,
    /// When the request finished arriving: queueing time counts from here.
    pub received: Instant,
    /// When its client stops waiting for the answer.
    pub deadline: Instant,
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

/// Queued jobs by tenant, in the order tenants take turns; each tenant's jobs in arrival order.
#[derive(Default)]
struct FairQueue {
    tenants: VecDeque<(u64, VecDeque<Job>)>,
}

impl FairQueue {
    fn push(&mut self, job: Job) {
        match self
            .tenants
            .iter_mut()
            .find(|(tenant, _)| *tenant == job.tenant)
        {
            Some((_, jobs)) => jobs.push_back(job),
            None => self.tenants.push_back((job.tenant, VecDeque::from([job]))),
        }
    }

    fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The job a batch starts from: the oldest of the tenant whose turn it is.
    fn head(&self) -> Option<&Job> {
        self.tenants.front().and_then(|(_, jobs)| jobs.front())
    }

    fn count_at(&self, split: usize) -> usize {
        self.tenants
            .iter()
            .flat_map(|(_, jobs)| jobs)
            .filter(|job| job.split_layer == split)
            .count()
    }

    /// Removes and returns the jobs `doomed` picks.
    fn remove_if(&mut self, mut doomed: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut removed = Vec::new();
        for (_, jobs) in &mut self.tenants {
            let (gone, kept): (VecDeque<Job>, VecDeque<Job>) =
                std::mem::take(jobs).into_iter().partition(&mut doomed);
            *jobs = kept;
            removed.extend(gone);
        }
        self.tenants.retain(|(_, jobs)| !jobs.is_empty());
        removed
    }

    /// Up to `max` jobs at `split`, one per tenant per round starting with the tenant whose
    /// turn it is; then the turn passes to the next tenant.
    fn take_batch(&mut self, split: usize, max: usize) -> Vec<Job> {
        let mut batch = Vec::with_capacity(max);
        loop {
            let before = batch.len();
            for (_, jobs) in &mut self.tenants {
                if batch.len() == max {
                    break;
                }
                if let Some(at) = jobs.iter().position(|job| job.split_layer == split) {
                    batch.extend(jobs.remove(at));
                }
            }
            if batch.len() == before || batch.len() == max {
                break;
            }
        }
        self.tenants.rotate_left(1.min(self.tenants.len()));
        self.tenants.retain(|(_, jobs)| !jobs.is_empty());
        batch
    }
}

/// Recent batch compute time per split layer: what a batch there is expected to take, as
/// TCP estimates its retransmission timeout (RFC 6298): the smoothed time plus a multiple of
/// its smoothed deviation, so that a machine whose speed varies (other work on its cores)
/// gets a margin in proportion.
struct Estimates(Vec<Option<(Duration, Duration)>>);

impl Estimates {
    /// Deviations of margin: enough that a batch rarely ends past an estimate it started on.
    const MARGIN: u32 = 2;

    fn get(&self, split: usize) -> Duration {
        self.0
            .get(split)
            .copied()
            .flatten()
            .map_or(Duration::ZERO, |(mean, deviation)| {
                mean + deviation * Self::MARGIN
            })
    }

    fn observe(&mut self, split: usize, took: Duration) {
        if let Some(estimate) = self.0.get_mut(split) {
            // RFC 6298's gains: 1/8 for the mean, 1/4 for the deviation.
            *estimate = Some(match *estimate {
                Some((mean, deviation)) => {
                    let error = if took > mean {
                        took - mean
                    } else {
                        mean - took
                    };
                    (mean * 7 / 8 + took / 8, deviation * 3 / 4 + error / 4)
                }
                None => (took, took / 2),
            });
        }
    }
}

impl Compute {
    fn run(self, receiver: Receiver<Job>) {
        let mut queue = FairQueue::default();
        let mut estimates = Estimates(vec![None; self.model.num_layers()]);
        let mut open = true;
        loop {
            if queue.is_empty() {
                match receiver.recv() {
                    Ok(job) => queue.push(job),
                    Err(_) => return,
                }
            }
            let Some(head) = queue.head() else { continue };
            let split = head.split_layer;
            let gather_until = head.received + self.policy.max_wait;
            // Gather until the first job's split layer has a full batch, its wait is over, or
            // no more requests can come.
            while open {
                loop {
                    match receiver.try_recv() {
                        Ok(job) => queue.push(job),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                let now = Instant::now();
                if !open
                    || queue.count_at(split) >= self.policy.max_batch_size
                    || now >= gather_until
                {
                    break;
                }
                match receiver.recv_timeout(gather_until - now) {
                    Ok(job) => queue.push(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            self.drop_hopeless(&mut queue, &estimates);
            let Some(head) = queue.head() else { continue };
            let split = head.split_layer;
            let batch = queue.take_batch(split, self.policy.max_batch_size);
            let took = self.run_batch(batch);
            estimates.observe(split, took);
        }
    }

    /// Drops the jobs whose client is gone or that cannot be answered in time, telling the
    /// latter's clients so.
    fn drop_hopeless(&self, queue: &mut FairQueue, estimates: &Estimates) {
        let now = Instant::now();
        let dropped = queue.remove_if(|job| {
            let expected = estimates.get(job.split_layer);
            // A job whose whole budget is shorter than the estimate runs anyway: otherwise a
            // single slow batch could make every later job look hopeless, and no batch would
            // ever run to correct the estimate.
            let could_have_made_it =
                job.deadline.saturating_duration_since(job.received) > expected;
            job.reply.is_closed()
                || now >= job.deadline
                || (could_have_made_it && now + expected > job.deadline)
        });
        for job in dropped {
            if job.reply.is_closed() {
                self.metrics.cancelled.inc();
                continue;
            }
            self.metrics.expired.inc();
            let waited = now.saturating_duration_since(job.received);
            let _ = job.reply.send(Err(ProtocolError::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "not computed: after {} ms in the queue, a batch at split layer {} (about {} \
                     ms now) would end past the request's deadline",
                    waited.as_millis(),
                    job.split_layer,
                    estimates.get(job.split_layer).as_millis()
                ),
            )));
        }
    }

    /// Runs a batch and answers its jobs; returns how long the forward pass took.
    fn run_batch(&self, jobs: Vec<Job>) -> Duration {
        let started = Instant::now();
        // burn reports most problems as errors, but a panic inside an operation must not take
        // the worker down with it: the batch gets `internal` errors and the thread lives on.
        let result = catch_unwind(AssertUnwindSafe(|| self.forward(&jobs, started)));
        let compute = started.elapsed();
        Metrics::observe_seconds(&self.metrics.compute, compute);
        self.metrics.batch_size.observe(jobs.len() as f64);
        let batch_size = jobs.len() as u16;
        let outcomes: Vec<Result<Outcome, ProtocolError>> = match result {
            Ok(Ok(outcomes)) => {
                let computed = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
                self.metrics.computed.inc_by(computed as u64);
                outcomes
            }
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
        compute
    }

    /// Runs layers `split..L` for a batch at one split layer, one layer at a time. Before each
    /// layer, rows whose client is gone, or whose deadline the batch would miss at the pace of
    /// its layers so far, leave the batch (their clients are told `deadline_exceeded`); after
    /// an exit layer, rows whose request asks for a cloud exit and is confident enough leave
    /// with that exit's answer. Per-request problems are `Err` entries; a model error fails
    /// the whole batch.
    fn forward(
        &self,
        jobs: &[Job],
        started: Instant,
    ) -> splitee_model::Result<Vec<Result<Outcome, ProtocolError>>> {
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
        let mut outcomes: Vec<Option<Result<Outcome, ProtocolError>>> =
            jobs.iter().map(|_| None).collect();
        // Indices into `jobs` of the rows still in `hidden`, in row order.
        let mut active: Vec<usize> = (0..jobs.len()).collect();
        let exit_layers = &model.exit_config().layers;
        for layer in split..num_layers {
            let run = layer - split;
            let rest = match run {
                0 => Duration::ZERO,
                run => started.elapsed() / run as u32 * (num_layers - layer) as u32,
            };
            let now = Instant::now();
            let keep: Vec<usize> = (0..active.len())
                .filter(|&row| {
                    let job = &jobs[active[row]];
                    let hopeless = job.reply.is_closed() || now + rest > job.deadline;
                    if hopeless {
                        outcomes[active[row]] = Some(Err(self.abandon(job, run, layer)));
                    }
                    !hopeless
                })
                .collect();
            hidden = self.keep_rows(hidden, &mut active, &keep, jobs, seq_len);
            if active.is_empty() {
                break;
            }
            hidden = model.run_layers(hidden, layer..layer + 1)?;
            let done = layer + 1;
            if done == num_layers
                || !exit_layers.contains(&done)
                || active
                    .iter()
                    .all(|&j| jobs[j].options.cloud_exit_threshold.is_none())
            {
                continue;
            }
            let probs = to_vec2(model.exit_probs(done, &hidden)?);
            let labels = probs.len() / active.len();
            let keep: Vec<usize> = (0..active.len())
                .filter(|&row| {
                    let p = &probs[row * labels..(row + 1) * labels];
                    let exits = jobs[active[row]].options.exits_at(p);
                    if exits {
                        outcomes[active[row]] = Some(Ok(Outcome {
                            probs: p.to_vec(),
                            exit_layer: done,
                        }));
                    }
                    !exits
                })
                .collect();
            hidden = self.keep_rows(hidden, &mut active, &keep, jobs, seq_len);
            if active.is_empty() {
                break;
            }
        }
        if !active.is_empty() {
            let probs = to_vec2(model.exit_probs(num_layers, &hidden)?);
            let labels = probs.len() / active.len();
            for (row, &j) in active.iter().enumerate() {
                outcomes[j] = Some(Ok(Outcome {
                    probs: probs[row * labels..(row + 1) * labels].to_vec(),
                    exit_layer: num_layers,
                }));
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(ProtocolError::new(
                        ErrorCode::Internal,
                        "request left the batch unanswered",
                    ))
                })
            })
            .collect())
    }

    /// Counts a job dropped from its batch after `run` of its layers (before `layer`), and the
    /// error its client is told, if it is still there.
    fn abandon(&self, job: &Job, run: usize, layer: usize) -> ProtocolError {
        self.metrics.abandoned_layers.inc_by(run as u64);
        if job.reply.is_closed() {
            self.metrics.cancelled.inc();
        } else {
            self.metrics.expired.inc();
        }
        ProtocolError::new(
            ErrorCode::DeadlineExceeded,
            format!(
                "dropped before layer {}: at this batch's pace it would end past the request's \
                 deadline",
                layer + 1
            ),
        )
    }

    /// The rows `keep` (positions in `active`) of a batch; `active` follows.
    fn keep_rows(
        &self,
        hidden: Hidden,
        active: &mut Vec<usize>,
        keep: &[usize],
        jobs: &[Job],
        seq_len: usize,
    ) -> Hidden {
        if keep.len() == active.len() || keep.is_empty() {
            if keep.is_empty() {
                active.clear();
            }
            return hidden;
        }
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                keep.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [keep.len()],
            ),
            &self.device,
        );
        *active = keep.iter().map(|&r| active[r]).collect();
        let lengths: Vec<usize> = active.iter().map(|&j| jobs[j].seq_len).collect();
        Hidden {
            states: hidden.states.select(0, index),
            mask: self.mask(&lengths, seq_len),
        }
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
