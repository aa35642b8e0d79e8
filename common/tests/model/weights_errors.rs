//! Broken model directories produce errors that name the file, the tensor and the shapes.

use std::collections::HashMap;
use std::path::Path;

use burn::nn::LinearConfig;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use splitee_model::model::{ExitHead, ExitHeads};
use splitee_model::weights::{self, StorageDType};
use splitee_model::{ExitConfig, Family, ModelDir};

use super::*;

/// A copy of MiniLM's directory whose `model.safetensors` has been rewritten by `edit`.
fn broken_model(edit: impl FnOnce(&mut HashMap<String, TensorView<'_>>)) -> tempfile::TempDir {
    broken_copy(&minilm_dir(), edit)
}

/// A copy of the model directory `source` (config, tokenizer) with its weights, wherever they
/// are kept, rewritten by `edit` into the copy's own `model.safetensors`.
fn broken_copy(
    source: &Path,
    edit: impl FnOnce(&mut HashMap<String, TensorView<'_>>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(ModelDir::open(source).unwrap().weights).unwrap();
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
    check_misshapen(
        &minilm_dir(),
        "encoder.layer.1.intermediate.dense.weight",
        [384, 1536],
        [1536, 384],
    );
}

/// Stores tensor `name` of `source`'s weights as `stored` (its bytes, another shape) and checks
/// that the error names it with both shapes as the file spells them.
fn check_misshapen(source: &Path, name: &str, stored: [usize; 2], expected: [usize; 2]) {
    let dir = broken_copy(source, |t| {
        let reshaped = TensorView::new(Dtype::F32, stored.to_vec(), t[name].data()).unwrap();
        t.insert(name.to_owned(), reshaped);
    });
    let error = load_error(dir.path());
    assert!(
        error.contains(&format!(
            "tensor `{name}` has shape {stored:?}, expected {expected:?}"
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

/// The MPNet checkpoint's own names in the error, not our module paths: the bias table, and an
/// attention weight that MPNet keeps under `attention.attn`.
#[test]
fn mpnet_missing_tensors_are_named_as_in_its_checkpoint() {
    let dir = broken_copy(&mpnet_dir(), |t| {
        t.remove("encoder.relative_attention_bias.weight");
        t.remove("encoder.layer.3.attention.attn.k.weight");
    });
    let error = load_error(dir.path());
    for name in [
        "encoder.relative_attention_bias.weight",
        "encoder.layer.3.attention.attn.k.weight",
    ] {
        assert!(error.contains(&format!("`{name}`")), "{error}");
    }
    assert!(error.contains("is missing"), "{error}");
}

/// A table is not a linear weight: its shapes are reported untransposed, as in the file.
#[test]
fn a_misshapen_mpnet_bias_table_names_both_shapes() {
    check_misshapen(
        &mpnet_dir(),
        "encoder.relative_attention_bias.weight",
        [12, 32],
        [32, 12],
    );
}

/// `config.json` alone decides the family: an unknown `model_type` or an MPNet config missing
/// what MPNet needs fails before any weight is read.
#[test]
fn bad_mpnet_configs_are_errors() {
    let config = std::fs::read_to_string(models_dir().join("mpnet-base/config.json")).unwrap();
    let cases = [
        (
            config.replace("\"model_type\": \"mpnet\"", "\"model_type\": \"roberta\""),
            "model_type is \"roberta\"; splitee runs \"bert\" and \"mpnet\" encoders only",
        ),
        (
            config.replace("\"relative_attention_num_buckets\": 32,", ""),
            "an MPNet config needs relative_attention_num_buckets",
        ),
        (
            config.replace(
                "\"relative_attention_num_buckets\": 32",
                "\"relative_attention_num_buckets\": 2",
            ),
            "relative_attention_num_buckets 2 must be in 4..512",
        ),
        (
            config.replace("\"pad_token_id\": 1,", ""),
            "an MPNet config needs pad_token_id",
        ),
    ];
    for (text, expected) in cases {
        assert_ne!(
            text, config,
            "the edit for {expected:?} must change the config"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let error = ModelDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("config.json") && error.contains(expected),
            "{error}"
        );
    }
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
        weights::save(&heads, &path, dtype, Family::Bert).unwrap();
        let mut loaded = ExitHeads::init(384, &config, &device);
        weights::load(&mut loaded, &path, Family::Bert).unwrap();
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
