//! Model directories: where the weights are found, and the identity that edge and cloud compare.

use splitee_model::ModelDir;
use splitee_model::fetch::{self, BackboneSpec};

use super::*;

/// Recorded confidences (simulations/data/*.csv) and models/default/README.md carry this
/// fingerprint: supporting a second family must not change the first family's identity.
#[test]
fn the_default_models_fingerprint_is_unchanged() {
    let dir = ModelDir::open(&models_dir().join("default")).unwrap();
    assert!(
        dir.backbone.is_none(),
        "models/default holds its own weights"
    );
    assert_eq!(
        dir.fingerprint().unwrap().to_string(),
        "4d7189175b70954060e95a3e763744460df6931873881785c4472e998565e324"
    );
}

/// The repository keeps the small upstream files itself; they must be the very bytes that
/// backbone.json pins (and the fetch verifies), so the config read is the weights' own.
#[test]
fn mpnet_config_and_tokenizer_are_the_pinned_upstream_files() {
    let dir = models_dir().join("mpnet-base");
    let spec = BackboneSpec::from_file(&dir.join(fetch::SPEC_FILE)).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        fetch::verify_file(&dir.join(file), &spec.files[file]).unwrap();
    }
}

/// The weights come from the cache entry backbone.json names, checked against its pin, and
/// the fingerprint covers them as it covers a directory's own file.
#[test]
fn mpnet_weights_resolve_to_the_verified_cache_entry() {
    let dir = ModelDir::open(&mpnet_dir()).unwrap();
    let spec = dir
        .backbone
        .clone()
        .expect("models/mpnet-base names a cached backbone");
    assert_eq!(
        dir.weights,
        spec.entry(&fetch::cache_dir().unwrap())
            .join("model.safetensors")
    );
    let fingerprint = dir.fingerprint().unwrap();
    println!("models/mpnet-base fingerprint {fingerprint}");

    // The same bytes under another name in a directory of their own (the trained exits
    // included): the same identity.
    let copy = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "exits.json",
        "exits.safetensors",
    ] {
        std::fs::copy(mpnet_dir().join(file), copy.path().join(file)).unwrap();
    }
    std::fs::hard_link(&dir.weights, copy.path().join("model.safetensors"))
        .or_else(|_| std::fs::copy(&dir.weights, copy.path().join("model.safetensors")).map(drop))
        .unwrap();
    assert_eq!(
        ModelDir::open(copy.path()).unwrap().fingerprint().unwrap(),
        fingerprint
    );
}

/// A backbone that is not in the cache: the error says which command fetches it. Both a local
/// file and backbone.json: an error, not a silent preference.
#[test]
fn a_missing_or_ambiguous_backbone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", fetch::SPEC_FILE] {
        std::fs::copy(
            models_dir().join("mpnet-base").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    let spec_path = dir.path().join(fetch::SPEC_FILE);
    let text = std::fs::read_to_string(&spec_path).unwrap();
    let renamed = text.replace(
        "\"name\": \"all-mpnet-base-v2-e8c3b32e\"",
        "\"name\": \"never-fetched-by-any-test\"",
    );
    assert_ne!(renamed, text);
    std::fs::write(&spec_path, renamed).unwrap();
    let error = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("never-fetched-by-any-test")
            && error.contains("is not fetched")
            && error.contains(&format!("fetch-model --model {}", dir.path().display())),
        "{error}"
    );

    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let error = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(error.contains("keep one source of the weights"), "{error}");
}

/// Exit heads saved beside a fetched backbone carry no weights of it: the new directory names
/// the same cache entry (its `backbone.json`), so the backbone's identity is unchanged and the
/// repository never holds the 438 MB. Writing into a directory that holds other weights is
/// refused rather than leaving one that does not open.
#[test]
fn exits_saved_beside_a_fetched_backbone_name_it() {
    use burn::module::Module;
    use splitee_model::weights::StorageDType;
    use splitee_model::{ExitConfig, save_exits};

    let base = ModelDir::open(&mpnet_dir()).unwrap();
    let device = BackendChoice::Flex.device().unwrap();
    let mut exits = ExitConfig::every_layer(12, 2);
    exits.layers = vec![3, 12];
    exits.labels = vec!["negative".into(), "positive".into()];
    let mut heads = splitee_model::model::ExitHeads::init(768, &exits, &device);
    assert_eq!(heads.num_params(), 2 * (768 * 2 + 2));
    // Weights of their own (init's are zeros), so that reading them back shows they are these.
    for (index, head) in heads.heads.iter_mut().enumerate() {
        let values: Vec<f32> = (0..768 * 2)
            .map(|j| ((index * 7 + j) % 13) as f32 / 13.0 - 0.5)
            .collect();
        head.classifier.weight = burn::module::Param::from_tensor(Tensor::<2>::from_data(
            TensorData::new(values, [768, 2]),
            &device,
        ));
    }

    let out = tempfile::tempdir().unwrap();
    save_exits(&base, &heads, out.path(), StorageDType::F32).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "backbone.json",
            "config.json",
            "exits.json",
            "exits.safetensors",
            "tokenizer.json"
        ]
    );
    let saved = ModelDir::open(out.path()).unwrap();
    assert_eq!(saved.weights, base.weights);
    assert_eq!(saved.exits, exits);
    let model = saved.load_model(&device).unwrap();
    assert_eq!(model.exit_config().layers, [3, 12]);
    for (loaded, written) in model.exits.heads.iter().zip(&heads.heads) {
        assert_eq!(
            loaded.classifier.weight.val().into_data(),
            written.classifier.weight.val().into_data()
        );
    }

    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("model.safetensors"), b"other weights").unwrap();
    let error = save_exits(&base, &heads, other.path(), StorageDType::F32)
        .unwrap_err()
        .to_string();
    assert!(error.contains("backbone.json"), "{error}");
    assert!(!other.path().join("exits.json").exists());
}
