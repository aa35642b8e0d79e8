//! splitee's model tooling: exit training for a multi-exit encoder (`simulations train`, this
//! module) and recording its per-exit confidences as a matrix for the replay
//! (`simulations record`, [`record`]). Training runs on burn's autodiff device.
//!
//! Two strategies, as in the early-exit literature:
//!
//! * **Separate** (DeeBERT / FastBERT style). Optionally fine-tune the backbone with the final
//!   exit first; then freeze the backbone and train the exit heads only, optionally distilling
//!   the final exit into each earlier one (`α·T²·KL(p_T‖q_T) + (1−α)·CE`). With the backbone
//!   frozen, each sample's pooled hidden states never change, so they are computed once per
//!   run (and, with `feature_cache`, once across runs) and the heads train on those features:
//!   epochs cost milliseconds instead of minutes. Without a fine-tune the backbone is never
//!   trained at all: the final exit is trained first, on the last layer's features, and the
//!   run writes exit heads only, beside the base's backbone ([`save_exits`]), so a fetched
//!   backbone stays in the cache. Heads keep one best epoch together or each their own
//!   ([`HeadSelection`]).
//! * **Joint**. Backbone and every exit together, `loss = Σᵢ wᵢ·CEᵢ` with `wᵢ = i / Σⱼ j`.
//!
//! Runs are deterministic for a seed (shuffling uses a seeded ChaCha generator, dropout the
//! seeded device), checkpoint after every epoch, and stop early when dev accuracy has not
//! improved for `patience` epochs, keeping the best epoch's weights.

mod config;
pub mod evaluate;
mod features;
pub mod loss;
pub mod record;

pub use config::{Distillation, HeadSelection, Stage, Storage, Strategy, TrainConfig};

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use splitee_model::dataset::Dataset;
use splitee_model::model::{ExitHead, ExitHeads, pool};
use splitee_model::weights::StorageDType;
use splitee_model::{
    Batch, ExitConfig, ModelDir, MultiExitBert, Tokenizer, save_exits, save_model,
};

use evaluate::ExitOutputs;
use features::FeatureCache;

/// What a finished run reports.
pub struct TrainReport {
    pub test: ExitOutputs,
    pub dev_accuracy: Vec<f64>,
    pub history: Vec<EpochRecord>,
    pub train_examples: usize,
    pub seconds: f64,
}

pub struct EpochRecord {
    pub stage: &'static str,
    pub epoch: usize,
    pub train_loss: f64,
    pub dev_accuracy: f64,
}

/// Token ids and labels of one dataset, tokenized once.
struct Encoded {
    ids: Vec<Vec<u32>>,
    labels: Vec<usize>,
}

fn encode(dataset: &Dataset, tokenizer: &Tokenizer) -> anyhow::Result<Encoded> {
    let mut ids = Vec::with_capacity(dataset.examples.len());
    let mut labels = Vec::with_capacity(dataset.examples.len());
    for example in &dataset.examples {
        let label = example.label.with_context(|| {
            format!(
                "{}: example {} has no label",
                dataset.path.display(),
                example.id
            )
        })?;
        ids.push(tokenizer.encode(&example.text)?.ids);
        labels.push(label);
    }
    Ok(Encoded { ids, labels })
}

/// Shuffled batches of similar-length sequences: shuffle, sort within windows of 50 batches by
/// length, cut into batches, shuffle the batches. Padding waste drops sharply while every
/// epoch still sees a different order.
fn batches(lengths: &[usize], batch_size: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size * 50)
        .flat_map(|window| {
            let mut window = window.to_vec();
            window.sort_by_key(|&i| lengths[i]);
            window
                .chunks(batch_size)
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    batches.shuffle(rng);
    batches
}

fn batch_of(encoded: &Encoded, rows: &[usize], pad_id: u32) -> Batch {
    Batch::pad(rows.iter().map(|&i| encoded.ids[i].as_slice()), pad_id)
}

fn labels_tensor(encoded: &Encoded, rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = rows.iter().map(|&i| encoded.labels[i] as i64).collect();
    Tensor::from_data(TensorData::new(labels, [rows.len()]), device)
}

/// Logits of every exit for one batch.
fn exit_logits(
    model: &MultiExitBert,
    batch: &Batch,
    device: &Device,
) -> anyhow::Result<Vec<Tensor<2>>> {
    let (ids, mask) = batch.to_tensors(device);
    let mut hidden = model.embed(ids, mask)?;
    let mut logits = Vec::new();
    for layer in 1..=model.num_layers() {
        hidden = model.run_layers(hidden, layer - 1..layer)?;
        if model.exit_config().layers.contains(&layer) {
            logits.push(model.exit_logits(layer, &hidden)?);
        }
    }
    Ok(logits)
}

fn to_f32(tensor: Tensor<2>) -> anyhow::Result<Vec<f32>> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor back: {e:?}"))
}

/// Sample indices ordered by token count, so that fixed-size inference batches pad little.
fn by_length(encoded: &Encoded) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..encoded.ids.len()).collect();
    rows.sort_by_key(|&i| encoded.ids[i].len());
    rows
}

/// Exit probabilities of every sample (inference mode, no autodiff).
fn predict(
    model: &MultiExitBert,
    encoded: &Encoded,
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<ExitOutputs> {
    let exits = model.exit_config().layers.clone();
    let mut probs = vec![Vec::with_capacity(exits.len()); encoded.ids.len()];
    for chunk in by_length(encoded).chunks(64) {
        let batch = batch_of(encoded, chunk, pad_id);
        for logits in exit_logits(model, &batch, device)? {
            let [_, classes] = logits.dims();
            let values = to_f32(burn::tensor::activation::softmax(logits, 1))?;
            for (k, &row) in chunk.iter().enumerate() {
                probs[row].push(values[k * classes..(k + 1) * classes].to_vec());
            }
        }
    }
    Ok(ExitOutputs {
        exit_layers: exits,
        probs,
        labels: encoded.labels.clone(),
    })
}

/// Exit probabilities of a saved model on a labelled TSV (batched inference): what the model
/// card's tables are computed from (`simulations evaluate`).
pub fn evaluate(model_dir: &Path, data: &Path, device: &Device) -> anyhow::Result<ExitOutputs> {
    let dir = ModelDir::open(model_dir)?;
    let model = dir.load_model(device)?;
    let tokenizer = dir.tokenizer()?;
    let encoded = encode(&Dataset::read_tsv(data)?.require_clean()?, &tokenizer)?;
    predict(&model, &encoded, tokenizer.pad_id(), device)
}

/// A progress bar on a terminal; in a log (no terminal), a line every 5% so that long runs
/// still show loss and throughput.
struct Progress {
    bar: ProgressBar,
    label: String,
    len: usize,
    done: usize,
    log_lines: bool,
}

impl Progress {
    fn new(len: usize, label: String, show: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if show && terminal {
            let bar = ProgressBar::new(len as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>18} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            label,
            len,
            done: 0,
            log_lines: show && !terminal,
        }
    }

    fn step(&mut self, message: impl FnOnce() -> String) {
        self.done += 1;
        let every = (self.len / 20).max(1);
        if self.log_lines && (self.done.is_multiple_of(every) || self.done == self.len) {
            eprintln!("{} {}/{} {}", self.label, self.done, self.len, message());
        } else if !self.bar.is_hidden() {
            self.bar.set_message(message());
        }
        self.bar.inc(1);
    }

    fn finish(self) {
        self.bar.finish();
    }
}

/// Keeps the best model seen on dev, and says when patience has run out.
struct EarlyStopping<M> {
    best: Option<(f64, M)>,
    patience: usize,
    since_best: usize,
}

impl<M> EarlyStopping<M> {
    fn new(patience: usize) -> Self {
        Self {
            best: None,
            patience,
            since_best: 0,
        }
    }

    /// Returns true when training should stop.
    fn observe(&mut self, accuracy: f64, model: impl FnOnce() -> M) -> bool {
        if self.best.as_ref().is_none_or(|(best, _)| accuracy > *best) {
            self.best = Some((accuracy, model()));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        self.since_best >= self.patience
    }
}

pub struct Trainer<'a> {
    config: &'a TrainConfig,
    /// Plain device for inference; `autodiff` is the same hardware with gradients.
    device: Device,
    autodiff: Device,
    rng: ChaCha8Rng,
    pad_id: u32,
    history: Vec<EpochRecord>,
    show_progress: bool,
    /// The base model, when its backbone is never trained: what exits are saved beside.
    frozen_base: Option<ModelDir>,
}

/// Pooled hidden states after every exit layer (`[n × hidden]` each) of the train and dev
/// samples, from the frozen backbone.
struct HeadFeatures {
    train: Vec<Vec<f32>>,
    dev: Vec<Vec<f32>>,
}

impl<'a> Trainer<'a> {
    pub fn new(config: &'a TrainConfig, device: Device, show_progress: bool) -> Self {
        device.seed(config.seed);
        let autodiff = device.clone().autodiff();
        autodiff.seed(config.seed);
        Self {
            config,
            device,
            autodiff,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            pad_id: 0,
            history: Vec::new(),
            show_progress,
            frozen_base: None,
        }
    }

    pub fn run(mut self) -> anyhow::Result<TrainReport> {
        let started = Instant::now();
        let config = self.config;
        let base = ModelDir::open(&config.base_model)?;
        let tokenizer = Tokenizer::from_file(
            &config.base_model.join("tokenizer.json"),
            config.max_seq_len,
        )?;
        self.pad_id = tokenizer.pad_id();
        let read = |path: &Path| -> anyhow::Result<Dataset> {
            Ok(Dataset::read_tsv(path)?.require_clean()?)
        };
        let mut train_data = read(&config.train)?;
        if let Some(limit) = config.max_train_examples {
            train_data.examples.truncate(limit);
        }
        let dev_data = read(&config.dev)?;
        let num_labels = train_data
            .num_classes()
            .unwrap_or(2)
            .max(config.labels.len())
            .max(2);
        let train = encode(&train_data, &tokenizer)?;
        let dev = encode(&dev_data, &tokenizer)?;

        let layers = base.config.num_hidden_layers;
        let exit_config = ExitConfig {
            layers: config
                .exit_layers
                .clone()
                .unwrap_or_else(|| (1..=layers).collect()),
            num_labels,
            pooling: config.pooling,
            labels: config.labels.clone(),
        };
        exit_config.validate(layers).map_err(anyhow::Error::msg)?;
        let mut model = base.load_model(&self.autodiff)?;
        model.exits = ExitHeads::init(base.config.hidden_size, &exit_config, &self.autodiff);

        match &config.strategy {
            Strategy::Joint { stage } => {
                let weights = loss::joint_weights(&exit_config.layers);
                model = self.train_end_to_end("joint", model, &train, &dev, stage, &weights)?;
            }
            Strategy::Separate {
                finetune,
                heads,
                distillation,
                head_selection,
            } => {
                let exits = exit_config.layers.len();
                let students: Vec<usize> = (0..exits - 1).collect();
                if let Some(stage) = finetune {
                    let mut final_only = vec![0.0; exits];
                    final_only[exits - 1] = 1.0;
                    model = self.train_end_to_end(
                        "fine-tune",
                        model,
                        &train,
                        &dev,
                        stage,
                        &final_only,
                    )?;
                } else {
                    // The backbone stays as fetched or given: the output is exit heads beside
                    // it, and checkpoints are exit heads too.
                    self.frozen_base = Some(base.clone());
                }
                // The backbone is frozen from here on, so each sample's pooled states after
                // every layer are computed once, for every head stage below.
                let frozen = model.valid();
                let features = HeadFeatures {
                    train: self.features(&frozen, &train, "train")?,
                    dev: self.features(&frozen, &dev, "dev")?,
                };
                if finetune.is_none() {
                    model = self.train_heads(
                        "final head",
                        model,
                        &features,
                        (&train, &dev),
                        heads,
                        &[exits - 1],
                        None,
                        *head_selection,
                    )?;
                }
                model = self.train_heads(
                    "exit heads",
                    model,
                    &features,
                    (&train, &dev),
                    heads,
                    &students,
                    distillation.as_ref(),
                    *head_selection,
                )?;
            }
        }

        let storage = match config.storage {
            Storage::F32 => StorageDType::F32,
            Storage::F16 => StorageDType::F16,
        };
        self.save(&model.valid(), &config.output, storage)?;

        // Everything reported comes from the model as saved (f16 storage included).
        let saved = ModelDir::open(&config.output)?;
        let saved_model = saved.load_model(&self.device)?;
        let test = encode(&read(&config.test)?, &saved.tokenizer()?)?;
        let dev_full = encode(&dev_data, &saved.tokenizer()?)?;
        Ok(TrainReport {
            test: predict(&saved_model, &test, self.pad_id, &self.device)?,
            dev_accuracy: predict(&saved_model, &dev_full, self.pad_id, &self.device)?
                .exit_accuracy(),
            history: self.history,
            train_examples: train.ids.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Trains backbone and exits end to end with `loss = Σ weights[e]·CE_e` (exits with weight
    /// 0 are not even evaluated).
    fn train_end_to_end(
        &mut self,
        name: &'static str,
        mut model: MultiExitBert,
        train: &Encoded,
        dev: &Encoded,
        stage: &Stage,
        weights: &[f64],
    ) -> anyhow::Result<MultiExitBert> {
        let mut optimizer = AdamWConfig::new()
            .with_weight_decay(stage.weight_decay as f32)
            .init();
        let lengths: Vec<usize> = train.ids.iter().map(Vec::len).collect();
        let mut stopping = EarlyStopping::new(stage.patience);
        for epoch in 1..=stage.epochs {
            let batches = batches(&lengths, self.config.batch_size, &mut self.rng);
            let mut bar = self.progress(batches.len(), format!("{name} {epoch}/{}", stage.epochs));
            let (mut loss_sum, mut seen, started) = (0.0, 0usize, Instant::now());
            for rows in &batches {
                let batch = batch_of(train, rows, self.pad_id);
                let labels = labels_tensor(train, rows, &self.autodiff);
                let logits = exit_logits(&model, &batch, &self.autodiff)?;
                let loss = logits
                    .into_iter()
                    .zip(weights)
                    .filter(|(_, w)| **w > 0.0)
                    .map(|(logits, w)| loss::cross_entropy(logits, labels.clone()).mul_scalar(*w))
                    .reduce(|a, b| a + b)
                    .context("no exit has a positive loss weight")?;
                let value = f64::from(loss.clone().into_scalar::<f32>());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optimizer.step(stage.learning_rate, model, grads);
                loss_sum += value * rows.len() as f64;
                seen += rows.len();
                bar.step(|| {
                    format!(
                        "loss {:.4}, {:.1} samples/s",
                        loss_sum / seen as f64,
                        seen as f64 / started.elapsed().as_secs_f64()
                    )
                });
            }
            bar.finish();
            let dev_outputs = predict(&model.valid(), dev, self.pad_id, &self.device)?;
            let accuracy = dev_outputs.exit_accuracy();
            // Weighted like the loss, so the stopping criterion tracks what is optimised.
            let dev_accuracy = accuracy
                .iter()
                .zip(weights)
                .map(|(a, w)| a * w)
                .sum::<f64>()
                / weights.iter().sum::<f64>();
            self.record(name, epoch, loss_sum / seen as f64, dev_accuracy, &model)?;
            if stopping.observe(dev_accuracy, || model.clone()) {
                break;
            }
        }
        Ok(stopping.best.map(|(_, m)| m).unwrap_or(model))
    }

    /// Trains the exit heads `targets` (indices into the exit list) on pooled features of the
    /// frozen backbone. With `distillation`, the final exit is the teacher.
    #[allow(clippy::too_many_arguments)]
    fn train_heads(
        &mut self,
        name: &'static str,
        model: MultiExitBert,
        features: &HeadFeatures,
        (train, dev): (&Encoded, &Encoded),
        stage: &Stage,
        targets: &[usize],
        distillation: Option<&Distillation>,
        selection: HeadSelection,
    ) -> anyhow::Result<MultiExitBert> {
        if targets.is_empty() {
            return Ok(model);
        }
        let (train_features, dev_features) = (&features.train, &features.dev);
        let hidden = model.config().hidden_size;
        let exits = model.exit_config().layers.len();
        let classes = model.exit_config().num_labels;
        let teacher = distillation
            .map(|_| self.final_logits(&model.valid(), train_features))
            .transpose()?;

        let MultiExitBert { bert, exits: heads } = model;
        let mut heads = heads;
        let mut optimizer = AdamWConfig::new()
            .with_weight_decay(stage.weight_decay as f32)
            .init();
        let mut stopping = EarlyStopping::new(stage.patience);
        let mut each: Vec<EarlyStopping<ExitHead>> = targets
            .iter()
            .map(|_| EarlyStopping::new(stage.patience))
            .collect();
        let n = train.ids.len();
        for epoch in 1..=stage.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut self.rng);
            let (mut loss_sum, mut seen) = (0.0, 0usize);
            for rows in order.chunks(self.config.batch_size) {
                let labels = labels_tensor(train, rows, &self.autodiff);
                let mut total = None;
                for &exit in targets {
                    let x = gather_rows(&train_features[exit], rows, hidden, &self.autodiff);
                    let logits = heads.heads[exit].classifier.forward(x);
                    let hard = loss::cross_entropy(logits.clone(), labels.clone());
                    let loss = match (distillation, &teacher) {
                        (Some(d), Some(teacher)) => {
                            let teacher = gather_rows(teacher, rows, classes, &self.autodiff);
                            loss::distillation(logits, teacher, d.temperature).mul_scalar(d.alpha)
                                + hard.mul_scalar(1.0 - d.alpha)
                        }
                        _ => hard,
                    };
                    total = Some(match total {
                        None => loss,
                        Some(sum) => sum + loss,
                    });
                }
                let loss = total.expect("targets is not empty");
                let value = f64::from(loss.clone().into_scalar::<f32>());
                let grads = GradientsParams::from_grads(loss.backward(), &heads);
                heads = optimizer.step(stage.learning_rate, heads, grads);
                loss_sum += value * rows.len() as f64;
                seen += rows.len();
            }
            let accuracy =
                self.heads_accuracy(&heads.valid(), dev_features, dev, targets, exits)?;
            let dev_accuracy = accuracy.iter().sum::<f64>() / accuracy.len() as f64;
            if self.show_progress && targets.len() > 1 {
                let each: Vec<String> = accuracy
                    .iter()
                    .map(|a| format!("{:.2}", a * 100.0))
                    .collect();
                eprintln!(
                    "{name} epoch {epoch}: dev accuracy per head {}",
                    each.join(" ")
                );
            }
            let snapshot = MultiExitBert {
                bert: bert.clone(),
                exits: heads.clone(),
            };
            self.record(name, epoch, loss_sum / seen as f64, dev_accuracy, &snapshot)?;
            let done = match selection {
                HeadSelection::Mean => stopping.observe(dev_accuracy, || heads.clone()),
                // `fold`, not `all`: every head must see this epoch's accuracy.
                HeadSelection::Each => targets.iter().zip(&mut each).zip(&accuracy).fold(
                    true,
                    |done, ((&exit, stopping), &a)| {
                        stopping.observe(a, || heads.heads[exit].clone()) && done
                    },
                ),
            };
            if done {
                break;
            }
        }
        let heads = match selection {
            HeadSelection::Mean => stopping.best.map(|(_, h)| h).unwrap_or(heads),
            HeadSelection::Each => {
                let mut heads = heads;
                for (&exit, stopping) in targets.iter().zip(each) {
                    if let Some((_, best)) = stopping.best {
                        heads.heads[exit] = best;
                    }
                }
                heads
            }
        };
        Ok(MultiExitBert { bert, exits: heads })
    }

    /// Pooled hidden states `[n × hidden]` after every exit layer, for every sample: from the
    /// feature cache when it holds them, else computed (and then cached).
    fn features(
        &self,
        model: &MultiExitBert,
        data: &Encoded,
        name: &str,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let cached = match (&self.config.feature_cache, &self.frozen_base) {
            (Some(dir), Some(base)) => Some(FeatureCache::new(dir, base, model, data)?),
            _ => None,
        };
        if let Some(cache) = &cached
            && let Some(features) = cache.read()
        {
            if self.show_progress {
                eprintln!("{name}: features from {}", cache.path.display());
            }
            return Ok(features);
        }
        let features = self.compute_features(model, data, name)?;
        if let Some(cache) = &cached {
            cache.write(&features)?;
        }
        Ok(features)
    }

    fn compute_features(
        &self,
        model: &MultiExitBert,
        data: &Encoded,
        name: &str,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let exit_layers = model.exit_config().layers.clone();
        let pooling = model.exit_config().pooling;
        let width = model.config().hidden_size;
        let mut features = vec![vec![0.0; data.ids.len() * width]; exit_layers.len()];
        let rows = by_length(data);
        let chunks: Vec<&[usize]> = rows.chunks(64).collect();
        let mut bar = self.progress(chunks.len(), format!("{name}: features"));
        for chunk in chunks {
            let batch = batch_of(data, chunk, self.pad_id);
            let (ids, mask) = batch.to_tensors(&self.device);
            let mut hidden = model.embed(ids, mask)?;
            for layer in 1..=model.num_layers() {
                hidden = model.run_layers(hidden, layer - 1..layer)?;
                if let Some(exit) = exit_layers.iter().position(|&l| l == layer) {
                    let pooled = to_f32(pool(pooling, &hidden))?;
                    for (k, &row) in chunk.iter().enumerate() {
                        features[exit][row * width..(row + 1) * width]
                            .copy_from_slice(&pooled[k * width..(k + 1) * width]);
                    }
                }
            }
            bar.step(String::new);
        }
        bar.finish();
        Ok(features)
    }

    fn final_logits(
        &self,
        model: &MultiExitBert,
        features: &[Vec<f32>],
    ) -> anyhow::Result<Vec<f32>> {
        let last = features.len() - 1;
        let hidden = model.config().hidden_size;
        let x = Tensor::<2>::from_data(
            TensorData::new(
                features[last].clone(),
                [features[last].len() / hidden, hidden],
            ),
            &self.device,
        );
        to_f32(model.exits.heads[last].classifier.forward(x))
    }

    fn heads_accuracy(
        &self,
        heads: &ExitHeads,
        features: &[Vec<f32>],
        data: &Encoded,
        targets: &[usize],
        exits: usize,
    ) -> anyhow::Result<Vec<f64>> {
        debug_assert_eq!(features.len(), exits);
        let n = data.ids.len();
        let hidden = features[0].len() / n.max(1);
        let mut accuracy = Vec::with_capacity(targets.len());
        for &exit in targets {
            let x = Tensor::<2>::from_data(
                TensorData::new(features[exit].clone(), [n, hidden]),
                &self.device,
            );
            let logits = to_f32(heads.heads[exit].classifier.forward(x))?;
            let classes = logits.len() / n.max(1);
            let correct = (0..n)
                .filter(|&i| {
                    evaluate::argmax(&logits[i * classes..(i + 1) * classes]) == data.labels[i]
                })
                .count();
            accuracy.push(correct as f64 / n as f64);
        }
        Ok(accuracy)
    }

    fn record(
        &mut self,
        stage: &'static str,
        epoch: usize,
        train_loss: f64,
        dev_accuracy: f64,
        model: &MultiExitBert,
    ) -> anyhow::Result<()> {
        if self.show_progress {
            eprintln!(
                "{stage} epoch {epoch}: train loss {train_loss:.4}, dev accuracy {:.2}%",
                dev_accuracy * 100.0
            );
        }
        if let Some(dir) = &self.config.checkpoint_dir {
            let path = dir.join(format!("{}-epoch-{epoch}", stage.replace(' ', "-")));
            self.save(&model.valid(), &path, StorageDType::F32)?;
        }
        self.history.push(EpochRecord {
            stage,
            epoch,
            train_loss,
            dev_accuracy,
        });
        Ok(())
    }

    /// Writes `model` as a model directory: exit heads beside the base's backbone when it was
    /// frozen ([`save_exits`]), else the whole model.
    fn save(&self, model: &MultiExitBert, out: &Path, storage: StorageDType) -> anyhow::Result<()> {
        match &self.frozen_base {
            Some(base) => save_exits(base, &model.exits, out, storage)?,
            None => save_model(
                model,
                &self.config.base_model.join("tokenizer.json"),
                out,
                storage,
            )?,
        }
        Ok(())
    }

    fn progress(&self, len: usize, label: String) -> Progress {
        Progress::new(len, label, self.show_progress)
    }
}

/// Rows `rows` of a row-major `[n × width]` matrix, as a tensor.
fn gather_rows(matrix: &[f32], rows: &[usize], width: usize, device: &Device) -> Tensor<2> {
    let mut data = Vec::with_capacity(rows.len() * width);
    for &row in rows {
        data.extend_from_slice(&matrix[row * width..(row + 1) * width]);
    }
    Tensor::from_data(TensorData::new(data, [rows.len(), width]), device)
}
