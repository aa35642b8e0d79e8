//! `edge-agent profile`: measures what each layer costs on this device and writes it into the
//! agent's config as its `[device]` table, keeping the file's comments and layout.

use std::path::Path;

use anyhow::Context;
use burn::prelude::Device;
use splitee_model::profile::profile_forward;
use splitee_model::{Batch, ModelDir};

use splitee_bandits::DeviceProfile;

/// Median per-stage milliseconds of `runs` forward passes of one `tokens`-token sequence,
/// after one warm-up pass (allocator, thread pool).
pub fn measure(
    model_dir: &Path,
    device: &Device,
    tokens: usize,
    runs: usize,
    description: String,
) -> anyhow::Result<DeviceProfile> {
    anyhow::ensure!(tokens >= 2 && runs >= 1, "need at least 2 tokens and 1 run");
    let loaded = ModelDir::open(model_dir)?
        .load(device)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    anyhow::ensure!(
        tokens <= loaded.dir.config.max_tokens(),
        "{tokens} tokens exceed the model's {} positions",
        loaded.dir.config.max_tokens()
    );
    // Which ids does not matter for timing; a real word keeps it representative.
    let word = loaded.tokenizer.encode("good")?.ids[1];
    let sequence: Vec<u32> = std::iter::repeat_n(word, tokens).collect();
    let batch = Batch::pad(
        std::iter::once(sequence.as_slice()),
        loaded.tokenizer.pad_id(),
    );
    profile_forward(&loaded.model, &batch, device)?;
    let mut embed = Vec::with_capacity(runs);
    let mut layers = vec![Vec::with_capacity(runs); loaded.model.num_layers()];
    for _ in 0..runs {
        let profile = profile_forward(&loaded.model, &batch, device)?;
        embed.push(profile.embed.as_secs_f64() * 1e3);
        for (index, duration) in profile.layers.iter().enumerate() {
            let head = profile
                .exits
                .iter()
                .find(|e| e.layer == index + 1)
                .map_or(0.0, |e| e.duration.as_secs_f64());
            layers[index].push((duration.as_secs_f64() + head) * 1e3);
        }
    }
    Ok(DeviceProfile {
        name: String::new(),
        description,
        layer_ms: layers.iter_mut().map(|samples| median(samples)).collect(),
        embed_ms: median(&mut embed),
        ref_tokens: tokens as f64,
    })
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Replaces the `[device]` table of the TOML document `text` with `profile`; everything else
/// in the file is kept as it was.
pub fn write_into(text: &str, profile: &DeviceProfile) -> anyhow::Result<String> {
    let mut document: toml_edit::DocumentMut = text.parse().context("parsing the config")?;
    let mut table = toml_edit::Table::new();
    table.insert("description", toml_edit::value(&profile.description));
    let rounded = |ms: f64| (ms * 1000.0).round() / 1000.0;
    let mut layer_ms = toml_edit::Array::new();
    for &ms in &profile.layer_ms {
        layer_ms.push(rounded(ms));
    }
    table.insert("layer_ms", toml_edit::value(layer_ms));
    table.insert("embed_ms", toml_edit::value(rounded(profile.embed_ms)));
    table.insert("ref_tokens", toml_edit::value(profile.ref_tokens as i64));
    document.insert("device", toml_edit::Item::Table(table));
    Ok(document.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    #[test]
    fn writing_a_profile_keeps_comments_and_replaces_the_old_table() {
        let text = "# my agent\nmodel = \"models/default\" # the embedded one\n\n[arms]\nsplits = \"exits\"\nthresholds = [0.9]\n\n[device]\ndescription = \"ESTIMATE\"\nlayer_ms = [1.0]\nembed_ms = 0.5\nref_tokens = 8\n";
        let profile = DeviceProfile {
            name: String::new(),
            description: "measured".into(),
            layer_ms: vec![2.12345, 3.0],
            embed_ms: 0.25,
            ref_tokens: 32.0,
        };
        let written = write_into(text, &profile).unwrap();
        assert!(written.starts_with("# my agent\nmodel = \"models/default\" # the embedded one"));
        let config = AgentConfig::from_toml(&written).unwrap();
        let device = config.device.unwrap();
        assert_eq!(device.layer_ms, vec![2.123, 3.0]);
        assert_eq!(
            (device.ref_tokens, device.description.as_str()),
            (32.0, "measured")
        );
    }
}
