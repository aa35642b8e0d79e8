//! Invariants that split computing relies on: the edge half and the cloud half compose to the
//! whole model, and padding never leaks into a real token. Both families: MPNet's attention
//! bias is recomputed by every `run_layers` call, and must compose and pad like BERT's none.

use std::path::{Path, PathBuf};

use burn::nn::LinearConfig;
use burn::prelude::*;
use splitee_model::model::{ExitHead, Hidden};
use splitee_model::{ModelDir, MultiExitBert};

use super::*;

/// The models every invariant is checked on.
fn models() -> [(&'static str, PathBuf); 2] {
    [("MiniLM", minilm_dir()), ("MPNet", mpnet_dir())]
}

/// The model in `path` with randomly initialised (not zero) exit heads, so that exit
/// probabilities differ between inputs and layers and comparing them means something.
fn model_with_random_exits(path: &Path, device: &Device) -> (ModelDir, MultiExitBert) {
    let dir = ModelDir::open(path).unwrap();
    let mut model = dir.load_model(device).unwrap();
    for head in &mut model.exits.heads {
        *head = ExitHead {
            classifier: LinearConfig::new(dir.config.hidden_size, dir.exits.num_labels)
                .init(device),
        };
    }
    (dir, model)
}

const TEXTS: [&str; 4] = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot meanders for two hours and the ending, when it finally comes, explains nothing",
    "",
];

#[test]
fn split_at_any_layer_equals_the_full_forward() {
    for ((name, path), (backend, device)) in cross(models(), cpu_devices()) {
        let (dir, model) = model_with_random_exits(&path, &device);
        let tokenizer = dir.tokenizer().unwrap();
        let layers = model.num_layers();
        let batch = tokenizer.batch(&TEXTS).unwrap();
        let (ids, mask) = batch.to_tensors(&device);
        let embedded = model.embed(ids, mask).unwrap();
        let full = model.run_layers(embedded.clone(), 0..layers).unwrap();
        let full_states = to_vec(full.states.clone());
        let full_probs = probs(&model, layers, &full);
        for split in 0..=layers {
            let edge = model.run_layers(embedded.clone(), 0..split).unwrap();
            let cloud = model.run_layers(edge, split..layers).unwrap();
            assert_eq!(
                max_abs_diff(&to_vec(cloud.states.clone()), &full_states),
                0.0,
                "{name} on {backend}: split at {split}: hidden states differ from the full forward"
            );
            assert_eq!(
                probs(&model, layers, &cloud),
                full_probs,
                "{name} on {backend}: split {split}"
            );
        }
    }
}

#[test]
fn padding_never_changes_a_real_tokens_output() {
    for ((name, path), (backend, device)) in cross(models(), cpu_devices()) {
        let (dir, model) = model_with_random_exits(&path, &device);
        let hidden_size = dir.config.hidden_size;
        let tokenizer = dir.tokenizer().unwrap();
        let layers = model.num_layers();
        let batch = tokenizer.batch(&TEXTS).unwrap();
        assert!(
            batch.lengths.iter().any(|&l| l < batch.seq_len),
            "the batch must be padded"
        );
        let (ids, mask) = batch.to_tensors(&device);
        let padded = model.embed(ids, mask).unwrap();
        let mut padded_layers = vec![padded.clone()];
        for layer in 0..layers {
            let next = model
                .run_layers(padded_layers[layer].clone(), layer..layer + 1)
                .unwrap();
            padded_layers.push(next);
        }
        for (row, text) in TEXTS.iter().enumerate() {
            let single = tokenizer.batch(&[text]).unwrap();
            let len = single.seq_len;
            let (ids, mask) = single.to_tensors(&device);
            let mut alone = model.embed(ids, mask).unwrap();
            for (layer, padded) in padded_layers.iter().enumerate() {
                if layer > 0 {
                    alone = model.run_layers(alone, layer - 1..layer).unwrap();
                }
                let in_batch = padded
                    .states
                    .clone()
                    .slice([row..row + 1, 0..len, 0..hidden_size]);
                let diff = max_abs_diff(&to_vec(in_batch), &to_vec(alone.states.clone()));
                assert!(
                    diff <= 1e-5,
                    "{name} on {backend}: text {row} layer {layer}: padding changed real tokens by {diff:e}"
                );
                if let Ok(batch_probs) = model.exit_probs(layer, padded) {
                    let batch_probs: Vec<f32> = batch_probs
                        .slice([row..row + 1, 0..2])
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .unwrap();
                    let alone_probs = probs(&model, layer, &alone);
                    let diff = max_abs_diff(&batch_probs, &alone_probs);
                    assert!(
                        diff <= 1e-5,
                        "{name} on {backend}: text {row} exit {layer}: {diff:e}"
                    );
                }
            }
        }
    }
}

/// Every pair of an `a` and a `b`.
fn cross<A: Clone, B: Clone>(
    a: impl IntoIterator<Item = A>,
    b: impl IntoIterator<Item = B> + Clone,
) -> impl Iterator<Item = (A, B)> {
    a.into_iter()
        .flat_map(move |a| b.clone().into_iter().map(move |b| (a.clone(), b)))
}

fn probs(model: &MultiExitBert, layer: usize, hidden: &Hidden) -> Vec<f32> {
    model
        .exit_probs(layer, hidden)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap()
}

#[test]
fn out_of_range_layers_and_missing_exits_are_errors() {
    let device = cpu_devices().remove(0).1;
    let (dir, model) = model_with_random_exits(&minilm_dir(), &device);
    let batch = dir.tokenizer().unwrap().batch(&["ok"]).unwrap();
    let (ids, mask) = batch.to_tensors(&device);
    let hidden = model.embed(ids, mask).unwrap();
    let error = model.run_layers(hidden.clone(), 2..7).unwrap_err();
    assert_eq!(
        error.to_string(),
        "layer range 2..7 is outside the model's 0..6"
    );
    let error = model.exit_probs(0, &hidden).unwrap_err();
    assert!(
        error.to_string().contains("layer 0 has no exit head"),
        "{error}"
    );
}
