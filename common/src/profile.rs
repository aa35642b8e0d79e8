//! Timing one forward pass layer by layer: what `inspect` prints, what the recorder stores
//! and what the simulator's device profiles are made of.

use std::time::{Duration, Instant};

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::model::MultiExitBert;
use crate::tokenize::Batch;

/// Wall-clock cost of each stage of one forward pass, and what each exit said.
#[derive(Debug, Clone)]
pub struct ForwardProfile {
    pub embed: Duration,
    /// `layers[i]`: encoder layer `i + 1`.
    pub layers: Vec<Duration>,
    pub exits: Vec<ExitReading>,
}

#[derive(Debug, Clone)]
pub struct ExitReading {
    /// 1-based layer the exit follows.
    pub layer: usize,
    pub duration: Duration,
    /// `[batch][num_labels]`.
    pub probs: Vec<Vec<f32>>,
}

/// Runs the whole model on `batch`, synchronising the device after every stage so that each
/// duration is the stage's own (GPU backends queue work asynchronously).
pub fn profile_forward(
    model: &MultiExitBert,
    batch: &Batch,
    device: &Device,
) -> Result<ForwardProfile> {
    let sync = || device.sync().map_err(|e| Error::Backend(format!("{e:?}")));
    let (ids, mask) = batch.to_tensors(device);
    sync()?;
    let start = Instant::now();
    let mut hidden = model.embed(ids, mask)?;
    sync()?;
    let embed = start.elapsed();
    let mut layers = Vec::with_capacity(model.num_layers());
    let mut exits = Vec::new();
    for layer in 1..=model.num_layers() {
        let start = Instant::now();
        hidden = model.run_layers(hidden, layer - 1..layer)?;
        sync()?;
        layers.push(start.elapsed());
        if model.exit_config().layers.contains(&layer) {
            let start = Instant::now();
            let probs = model.exit_probs(layer, &hidden)?;
            let [rows, labels] = probs.dims();
            let flat: Vec<f32> = probs
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| Error::Backend(format!("{e:?}")))?;
            exits.push(ExitReading {
                layer,
                duration: start.elapsed(),
                probs: (0..rows)
                    .map(|r| flat[r * labels..(r + 1) * labels].to_vec())
                    .collect(),
            });
        }
    }
    Ok(ForwardProfile {
        embed,
        layers,
        exits,
    })
}
