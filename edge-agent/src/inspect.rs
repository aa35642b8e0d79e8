use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use splitee_model::profile::profile_forward;
use splitee_model::{BackendChoice, ModelDir};

pub fn run(
    model_dir: &Path,
    backend: BackendChoice,
    device: &Device,
    text: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = ModelDir::open(model_dir)
        .with_context(|| format!("cannot open model {}", model_dir.display()))?;
    let loaded = dir
        .load(device)
        .with_context(|| format!("cannot load model {}", model_dir.display()))?;
    let load_time = started.elapsed();
    let config = &loaded.dir.config;
    let (backbone_params, exit_params) = loaded.model.param_counts();
    println!("model        {}", model_dir.display());
    println!(
        "architecture {}, {} layers, hidden {}, {} heads, FFN {}, vocab {}, max {} tokens",
        config.family().name(),
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size,
        config.max_tokens()
    );
    println!(
        "parameters   {backbone_params} backbone + {exit_params} in {} exits (after layers {:?}, {} pooling{})",
        loaded.dir.exits.layers.len(),
        loaded.dir.exits.layers,
        match loaded.dir.exits.pooling {
            splitee_model::Pooling::Cls => "[CLS]",
            splitee_model::Pooling::MaskedMean => "masked-mean",
        },
        if loaded.dir.exits_trained {
            ""
        } else {
            ", untrained: uniform"
        }
    );
    println!("fingerprint  {}", loaded.fingerprint);
    println!(
        "backend      {backend} (loaded in {:.0} ms)",
        load_time.as_secs_f64() * 1e3
    );

    let encoding = loaded.tokenizer.encode(text)?;
    let truncated = if encoding.untruncated_len > encoding.ids.len() {
        format!(", truncated from {}", encoding.untruncated_len)
    } else {
        String::new()
    };
    println!(
        "\ntokens ({}{truncated}): {}",
        encoding.ids.len(),
        encoding.tokens.join(" ")
    );

    let batch = loaded.tokenizer.batch(&[text])?;
    // The first pass pays one-off costs (allocator warm-up, thread pool start); time the second.
    profile_forward(&loaded.model, &batch, device)?;
    let profile = profile_forward(&loaded.model, &batch, device)?;
    println!(
        "\n{:<10} {:>9}  {}",
        "stage", "time ms", "exit probabilities"
    );
    println!("{:<10} {:>9.3}", "embed", profile.embed.as_secs_f64() * 1e3);
    for (index, duration) in profile.layers.iter().enumerate() {
        let layer = index + 1;
        let exit = profile
            .exits
            .iter()
            .find(|e| e.layer == layer)
            .map(|e| {
                let labels = &loaded.dir.exits.labels;
                let probs: Vec<String> = e.probs[0]
                    .iter()
                    .enumerate()
                    .map(|(class, p)| match labels.get(class) {
                        Some(name) => format!("{name} {p:.4}"),
                        None => format!("{p:.4}"),
                    })
                    .collect();
                format!(
                    "[{}]  (+{:.3} ms)",
                    probs.join(", "),
                    e.duration.as_secs_f64() * 1e3
                )
            })
            .unwrap_or_default();
        println!(
            "{:<10} {:>9.3}  {exit}",
            format!("layer {layer}"),
            duration.as_secs_f64() * 1e3
        );
    }
    let total = profile.embed + profile.layers.iter().sum::<std::time::Duration>();
    println!("{:<10} {:>9.3}", "total", total.as_secs_f64() * 1e3);
    Ok(())
}
