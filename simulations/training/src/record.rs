//! `simulations record`: run a model over a labelled dataset and write, per sample, every
//! exit's class probabilities and the measured compute time of every layer, in splitee's
//! confidence-matrix format ([`splitee_replay::matrix`]).
//!
//! Samples run one at a time (batch 1), as on an edge device answering requests as they come,
//! and the device is synchronised after each layer, so each `layer{j}_ms` is that layer's own
//! wall-clock time on this machine for this sample's length.

use anyhow::Context;
use burn::prelude::*;
use splitee_model::dataset::Dataset;
use splitee_model::profile::profile_forward;
use splitee_model::{BackendChoice, LoadedModel};

use splitee_replay::matrix::{ConfidenceMatrix, SampleRow};

pub fn record(
    loaded: &LoadedModel,
    dataset: &Dataset,
    backend: BackendChoice,
    device: &Device,
    limit: Option<usize>,
    mut on_sample: impl FnMut(usize, usize),
) -> anyhow::Result<ConfidenceMatrix> {
    let model = &loaded.model;
    let exits = model.exit_config();
    let mut matrix = ConfidenceMatrix::new(
        model.num_layers(),
        exits.layers.clone(),
        exits.num_labels,
        true,
    )
    .map_err(anyhow::Error::msg)?;
    for (key, value) in [
        ("model", loaded.fingerprint.short()),
        ("hidden", model.config().hidden_size.to_string()),
        ("layers", model.num_layers().to_string()),
        ("backend", backend.name().to_owned()),
        (
            "threads",
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .to_string(),
        ),
        (
            "dataset",
            dataset.path.file_name().map_or("unknown".into(), |n| {
                n.to_string_lossy().replace(char::is_whitespace, "_")
            }),
        ),
    ] {
        matrix
            .set_metadata(key, &value)
            .map_err(anyhow::Error::msg)?;
    }
    let examples = &dataset.examples[..limit.unwrap_or(usize::MAX).min(dataset.examples.len())];
    // One untimed pass so that the first sample does not pay thread-pool and allocator start-up.
    if let Some(first) = examples.first() {
        profile_forward(model, &loaded.tokenizer.batch(&[&first.text])?, device)?;
    }
    for (index, example) in examples.iter().enumerate() {
        let batch = loaded.tokenizer.batch(&[&example.text])?;
        let profile = profile_forward(model, &batch, device)
            .with_context(|| format!("sample {} ({})", index + 1, example.id))?;
        let probs: Vec<f32> = profile
            .exits
            .iter()
            .flat_map(|e| e.probs[0].iter().copied())
            .collect();
        let layer_ms: Vec<f64> = profile
            .layers
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        matrix
            .push(SampleRow {
                id: &example.id,
                label: example.label.map(|l| l as u32),
                tokens: batch.seq_len as u32,
                probs: &probs,
                layer_ms: &layer_ms,
            })
            .map_err(|e| anyhow::anyhow!("sample {}: {e}", example.id))?;
        on_sample(index + 1, examples.len());
    }
    Ok(matrix)
}
