//! One encoder layer at a time, on the default CPU backend (flex), f32: the splitee side of
//! the ONNX Runtime comparison (`common/benches/peer/run.sh` runs both, interleaved) and a
//! profile of where a layer's time goes.
//!
//! ```sh
//! cargo bench --workspace --bench layer                # table: batch 1 and 8, seq 16/64/128
//! cargo bench --workspace --bench layer -- --json      # the same, one JSON object a line
//! cargo bench --workspace --bench layer -- --profile   # per operation, batch 1
//! ```
//!
//! Threads: `RAYON_NUM_THREADS` (every core if unset). MiniLM runs the embedded default
//! model's weights (`models/default`); MPNet runs random weights of its geometry
//! (`models/mpnet-base/config.json`): time does not depend on the values, so the benchmark
//! needs no download. MPNet's relative-position bias is computed once per forward, not per
//! layer, so it is computed outside the timed layer here.

mod support;

use std::path::Path;
use std::time::Duration;

use burn::prelude::*;
use splitee_model::model::EncoderLayer;
use splitee_model::{BackendChoice, BertConfig, ExitConfig, ModelDir, MultiExitBert};
use support::{layer_flops, median_of, ms, token_ids};

const SEQUENCE_LENGTHS: [usize; 3] = [16, 64, 128];
const BATCH_SIZES: [usize; 2] = [1, 8];
/// Shorter than `forward`'s: the peer script repeats every measurement in several rounds.
const TIME_BUDGET: Duration = Duration::from_millis(1500);
/// The profile times a dozen operations per shape, in [`PROFILE_ROUNDS`] interleaved rounds
/// whose medians it takes the median of: the parts then come from the same moments as the
/// whole, on a machine whose speed drifts.
const PROFILE_BUDGET: Duration = Duration::from_millis(250);
const PROFILE_ROUNDS: usize = 5;

enum Output {
    Table,
    Json,
    Profile,
}

fn main() {
    // `cargo bench` passes `--bench` to every harness-less bench; only our flags count.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let output = if args.iter().any(|a| a == "--json") {
        Output::Json
    } else if args.iter().any(|a| a == "--profile") {
        Output::Profile
    } else {
        Output::Table
    };
    let device = BackendChoice::default()
        .device()
        .expect("the default CPU backend is always available");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let minilm = ModelDir::open(&root.join("models/default"))
        .and_then(|dir| dir.load_model(&device))
        .expect("the embedded default model loads");
    let mpnet_config = BertConfig::from_file(&root.join("models/mpnet-base/config.json"))
        .expect("models/mpnet-base/config.json parses");
    let mpnet = MultiExitBert::init(
        &mpnet_config,
        &ExitConfig::every_layer(mpnet_config.num_hidden_layers, 2),
        &device,
    )
    .pack_weights();
    let models = [("minilm", &minilm), ("mpnet", &mpnet)];
    match output {
        Output::Json | Output::Table => {
            if let Output::Table = output {
                println!("one encoder layer, f32, flex; {}", support::threads_line());
                println!(
                    "{:<7} {:>5} {:>5} {:>10} {:>9} {:>14}",
                    "model", "batch", "seq", "ms", "GFLOP/s", "unpacked ms"
                );
            }
            let threads = rayon::current_num_threads();
            for (name, model) in models {
                for batch in BATCH_SIZES {
                    for seq in SEQUENCE_LENGTHS {
                        let time = time_layer(model, &device, batch, seq);
                        let gflops = batch as f64 * layer_flops(model.config(), seq)
                            / time.as_secs_f64()
                            / 1e9;
                        match output {
                            Output::Json => println!(
                                "{{\"model\":\"{name}\",\"batch\":{batch},\"seq\":{seq},\
                                 \"threads\":{threads},\"ms\":{:.4}}}",
                                ms(time)
                            ),
                            _ => println!(
                                "{name:<7} {batch:>5} {seq:>5} {:>10.3} {gflops:>9.1} {:>14.3}",
                                ms(time),
                                ms(time_layer(&without_packs(model), &device, batch, seq))
                            ),
                        }
                    }
                }
            }
        }
        Output::Profile => {
            println!(
                "one encoder layer by operation, batch 1, f32, flex; {}; ms (share of the layer)",
                support::threads_line()
            );
            for (name, model) in models {
                print_profile(name, model, &device);
            }
        }
    }
}

/// The inputs one layer sees in a forward pass: layer-0 hidden states and MPNet's bias.
fn layer_inputs(
    model: &MultiExitBert,
    device: &Device,
    batch: usize,
    seq: usize,
) -> (Tensor<3>, Option<Tensor<4>>) {
    let hidden = model.embed(token_ids(batch, seq, device), None).unwrap();
    (hidden.states, model.bert.attention_bias(seq))
}

fn time_layer(model: &MultiExitBert, device: &Device, batch: usize, seq: usize) -> Duration {
    let (x, bias) = layer_inputs(model, device, batch, seq);
    let layer = &model.bert.layers[0];
    median_of(TIME_BUDGET, || {
        layer.forward(x.clone(), None, bias.as_ref()).into_data();
    })
}

/// `model` as burn's `Linear`s alone run it: what packing buys, measured in the same run.
fn without_packs(model: &MultiExitBert) -> MultiExitBert {
    let mut model = model.clone();
    for layer in &mut model.bert.layers {
        layer.attention.self_attention.packed = None;
        layer.attention.output.packed = None;
        layer.intermediate.packed = None;
        layer.output.packed = None;
    }
    model
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// What a profile row times.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// A step of the layer's forward pass: the steps sum to (about) the whole layer.
    Step,
    /// What a step replaced, timed beside it for comparison.
    Replaced,
    /// A bare matrix product of the layer's shapes.
    Gemm,
}

/// One row of the profile: an operation and its median time at each sequence length.
struct ProfileRow {
    part: Part,
    operation: &'static str,
    times: Vec<Duration>,
}

fn print_profile(name: &str, model: &MultiExitBert, device: &Device) {
    let mut rows: Vec<ProfileRow> = Vec::new();
    let mut whole = Vec::new();
    for seq in SEQUENCE_LENGTHS {
        let (x, bias) = layer_inputs(model, device, 1, seq);
        let layer = &model.bert.layers[0];
        let mut rounds: Vec<Vec<(Part, &'static str, Duration)>> = Vec::new();
        let mut whole_rounds = Vec::new();
        for _ in 0..PROFILE_ROUNDS {
            rounds.push(profile_layer(layer, x.clone(), bias.as_ref()));
            whole_rounds.push(median_of(PROFILE_BUDGET, || {
                // No read-back here or in the parts: flex computes eagerly, and a copy per
                // part would inflate their sum.
                drop(layer.forward(x.clone(), None, bias.as_ref()));
            }));
        }
        whole.push(median(whole_rounds));
        for index in 0..rounds[0].len() {
            let time = median(rounds.iter().map(|round| round[index].2).collect());
            match rows.get_mut(index) {
                Some(row) => row.times.push(time),
                None => rows.push(ProfileRow {
                    part: rounds[0][index].0,
                    operation: rounds[0][index].1,
                    times: vec![time],
                }),
            }
        }
    }
    let config = model.config();
    println!(
        "\n{name}: hidden {}, heads {}, FFN {}",
        config.hidden_size, config.num_attention_heads, config.intermediate_size
    );
    let header: String = SEQUENCE_LENGTHS
        .iter()
        .map(|seq| format!(" {:>16}", format!("seq {seq}")))
        .collect();
    println!("{:<46}{header}", "operation");
    let cell = |time: Duration, of: Duration| {
        format!(
            " {:>16}",
            format!(
                "{:.3} ({:.0} %)",
                ms(time),
                100.0 * time.as_secs_f64() / of.as_secs_f64()
            )
        )
    };
    let print_row = |label: &str, times: &[Duration]| {
        let cells: String = times
            .iter()
            .zip(&whole)
            .map(|(&time, &of)| cell(time, of))
            .collect();
        println!("{label:<46}{cells}");
    };
    for row in &rows {
        print_row(row.operation, &row.times);
    }
    let total = |part: Part| -> Vec<Duration> {
        (0..SEQUENCE_LENGTHS.len())
            .map(|i| {
                rows.iter()
                    .filter(|row| row.part == part)
                    .map(|row| row.times[i])
                    .sum()
            })
            .collect()
    };
    print_row("sum of the operations", &total(Part::Step));
    print_row("whole layer", &whole);
    let outside: Vec<Duration> = whole
        .iter()
        .zip(total(Part::Gemm))
        .map(|(&layer, gemm)| layer.saturating_sub(gemm))
        .collect();
    print_row("outside the bare GEMMs (layer − GEMM rows)", &outside);
}

/// Median time of each step of `layer` on its real inputs, in forward order, then the bare
/// matrix products of the same shapes.
fn profile_layer(
    layer: &EncoderLayer,
    x: Tensor<3>,
    bias: Option<&Tensor<4>>,
) -> Vec<(Part, &'static str, Duration)> {
    let time = |run: &dyn Fn()| median_of(PROFILE_BUDGET, run);
    let self_attention = &layer.attention.self_attention;
    let heads = self_attention.project(x.clone());
    let context = self_attention.attend(heads.clone(), None, bias);
    let attention_out = &layer.attention.output;
    let projected = attention_out.project(context.clone());
    let attended = attention_out.forward(context.clone(), x.clone());
    let inner = layer.expand(attended.clone());
    let up = layer.intermediate.dense.forward(attended.clone());
    let down = layer.output.project(inner.clone());

    let [batch, seq, _] = x.dims();
    let rows = |t: &Tensor<3>| {
        let [_, _, width] = t.dims();
        t.clone().reshape([batch * seq, width])
    };
    let weight = |linear: &burn::nn::Linear| linear.weight.val();
    let projections = [
        (rows(&x), weight(&self_attention.query)),
        (rows(&x), weight(&self_attention.key)),
        (rows(&x), weight(&self_attention.value)),
        (rows(&context), weight(&attention_out.dense)),
    ];
    let key_t = heads.key.clone().swap_dims(2, 3);
    let [_, num_heads, _, _] = heads.query.dims();
    let probs = Tensor::<4>::ones([batch, num_heads, seq, seq], &x.device()) / seq as f32;
    vec![
        (
            Part::Step,
            "Q, K, V projections + head split",
            time(&|| drop(self_attention.project(x.clone()))),
        ),
        (
            Part::Step,
            "attention (scores, softmax, context, merge)",
            time(&|| drop(self_attention.attend(heads.clone(), None, bias))),
        ),
        (
            Part::Step,
            "attention output projection",
            time(&|| drop(attention_out.project(context.clone()))),
        ),
        (
            Part::Step,
            "residual + LayerNorm",
            time(&|| {
                drop(
                    attention_out
                        .layer_norm
                        .forward(projected.clone() + x.clone()),
                )
            }),
        ),
        (
            Part::Step,
            "FFN up projection + bias + GELU",
            time(&|| drop(layer.expand(attended.clone()))),
        ),
        (
            Part::Replaced,
            "(burn's way: FFN up projection, bias…",
            time(&|| drop(layer.intermediate.dense.forward(attended.clone()))),
        ),
        (
            Part::Replaced,
            "(… then burn's GELU)",
            time(&|| drop(burn::tensor::activation::gelu(up.clone()))),
        ),
        (
            Part::Step,
            "FFN down projection",
            time(&|| drop(layer.output.project(inner.clone()))),
        ),
        (
            Part::Step,
            "residual + LayerNorm",
            time(&|| {
                drop(
                    layer
                        .output
                        .layer_norm
                        .forward(down.clone() + attended.clone()),
                )
            }),
        ),
        (
            Part::Gemm,
            "GEMM: Q, K, V, output (x·W, no bias)",
            time(&|| {
                for (input, weight) in &projections {
                    drop(input.clone().matmul(weight.clone()));
                }
            }),
        ),
        (
            Part::Gemm,
            "GEMM: FFN up and down (x·W, no bias)",
            time(&|| {
                drop(rows(&attended).matmul(weight(&layer.intermediate.dense)));
                drop(rows(&inner).matmul(weight(&layer.output.dense)));
            }),
        ),
        (
            Part::Gemm,
            "GEMM: q·kᵀ and p·v, all heads batched",
            time(&|| {
                drop(heads.query.clone().matmul(key_t.clone()));
                drop(probs.clone().matmul(heads.value.clone()));
            }),
        ),
    ]
}
