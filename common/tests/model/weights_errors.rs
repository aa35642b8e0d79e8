//! Broken model directories produce errors that name the file, the tensor and the shapes.

use std::collections::HashMap;
use std::path::Path;

use burn::nn::LinearConfig;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use splitee_common::model::{ExitHead, ExitHeads};
use splitee_common::weights::{self, StorageDType};
use splitee_common::{ExitConfig, ModelDir};

use super::*;

/// A copy of MiniLM's directory whose `model.safetensors` has been rewritten by `edit`.
fn broken_model(edit: impl FnOnce(&mut HashMap<String, TensorView<'_>>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(minilm_dir().join(file), dir.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(minilm_dir().join("model.safetensors")).unwrap();
    let original = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, TensorView<'_>> = original.tensors().into_iter().collect();
    edit(&mut tensors);
    safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let device = cpu_devices().remove(0).1;
    match ModelDir::open(dir).and_then(|d| d.load_model(&device)) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = broken_model(|t| {
        t.remove("encoder.layer.3.attention.self.key.weight");
    });
    let error = load_error(dir.path());
    assert!(
        error.contains("tensor `encoder.layer.3.attention.self.key.weight` is missing"),
        "{error}"
    );
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let name = "encoder.layer.1.intermediate.dense.weight";
    let dir = broken_model(|t| {
        let view = &t[name];
        let transposed = TensorView::new(Dtype::F32, vec![384, 1536], view.data()).unwrap();
        t.insert(name.to_owned(), transposed);
    });
    let error = load_error(dir.path());
    assert!(
        error.contains(&format!(
            "tensor `{name}` has shape [384, 1536], expected [1536, 384]"
        )),
        "{error}"
    );
}

#[test]
fn a_wrong_dtype_is_named() {
    let name = "embeddings.LayerNorm.weight";
    let dir = broken_model(|t| {
        let view = &t[name];
        let as_ints = TensorView::new(Dtype::I32, vec![384], view.data()).unwrap();
        t.insert(name.to_owned(), as_ints);
    });
    let error = load_error(dir.path());
    assert!(
        error.contains(&format!("tensor `{name}` has dtype")),
        "{error}"
    );
}

#[test]
fn a_truncated_or_garbage_file_is_an_error_not_a_panic() {
    let dir = broken_model(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let error = load_error(dir.path());
    assert!(error.contains("model.safetensors"), "{error}");
    assert!(error.contains("truncated or corrupt"), "{error}");

    std::fs::write(&path, b"this is not a safetensors file").unwrap();
    let error = load_error(dir.path());
    assert!(error.contains("truncated or corrupt"), "{error}");

    std::fs::remove_file(&path).unwrap();
    let error = load_error(dir.path());
    assert!(
        error.contains("model.safetensors") && error.contains("no such file"),
        "{error}"
    );
}

#[test]
fn a_bad_config_is_an_error() {
    let dir = broken_model(|_| {});
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"num_attention_heads\": 12", "\"num_attention_heads\": 7"),
    )
    .unwrap();
    let error = load_error(dir.path());
    assert!(
        error.contains("not divisible by num_attention_heads 7"),
        "{error}"
    );

    std::fs::write(&config, "{ not json").unwrap();
    let error = load_error(dir.path());
    assert!(
        error.contains("invalid configuration") && error.contains("config.json"),
        "{error}"
    );
}

#[test]
fn exit_heads_round_trip_through_safetensors_in_f32_and_f16() {
    let device = cpu_devices().remove(0).1;
    let config = ExitConfig::every_layer(6, 3);
    let mut heads = ExitHeads::init(384, &config, &device);
    for head in &mut heads.heads {
        *head = ExitHead {
            classifier: LinearConfig::new(384, 3).init(&device),
        };
    }
    let original = weights_of(&heads);
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tolerance) in [(StorageDType::F32, 0.0), (StorageDType::F16, 1e-3)] {
        let path = dir.path().join("exits.safetensors");
        weights::save(&heads, &path, dtype).unwrap();
        let mut loaded = ExitHeads::init(384, &config, &device);
        weights::load(&mut loaded, &path).unwrap();
        let diff = max_abs_diff(&weights_of(&loaded), &original);
        assert!(diff <= tolerance, "{dtype:?}: {diff:e}");
    }
}

fn weights_of(heads: &ExitHeads) -> Vec<f32> {
    heads
        .heads
        .iter()
        .flat_map(|h| {
            h.classifier
                .weight
                .val()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap()
        })
        .collect()
}
