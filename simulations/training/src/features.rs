//! The frozen backbone's pooled features, cached between runs: a frozen backbone gives every
//! sample the same features in every run, so they are computed once and kept under a name that
//! hashes everything they depend on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use splitee_model::{Fingerprint, ModelDir, MultiExitBert};

use crate::Encoded;

/// One dataset's features in the feature cache: raw little-endian f32, exit after exit.
pub(crate) struct FeatureCache {
    pub(crate) path: PathBuf,
    exits: usize,
    len: usize,
}

impl FeatureCache {
    pub(crate) fn new(
        dir: &Path,
        base: &ModelDir,
        model: &MultiExitBert,
        data: &Encoded,
    ) -> anyhow::Result<Self> {
        // The backbone's identity with this run's exit layers and pooling (not the exits the
        // base directory may hold: those change with every run into it).
        let backbone = Fingerprint::compute(&base.config, model.exit_config(), &[&base.weights])?;
        let mut hasher = Sha256::new();
        hasher.update(b"splitee-features-v1\0");
        hasher.update(backbone.0);
        for ids in &data.ids {
            hasher.update((ids.len() as u64).to_le_bytes());
            for id in ids {
                hasher.update(id.to_le_bytes());
            }
        }
        let digest = hasher.finalize();
        let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let width = model.config().hidden_size;
        Ok(Self {
            path: dir.join(format!("{name}.f32")),
            exits: model.exit_config().layers.len(),
            len: data.ids.len() * width,
        })
    }

    /// The cached features, or `None` when there are none (or a file of the wrong size, which
    /// is then recomputed and replaced).
    pub(crate) fn read(&self) -> Option<Vec<Vec<f32>>> {
        let bytes = std::fs::read(&self.path).ok()?;
        if bytes.len() != self.exits * self.len * 4 {
            return None;
        }
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(values.chunks(self.len).map(<[f32]>::to_vec).collect())
    }

    /// Written under a temporary name and renamed, so a reader never sees half a file.
    pub(crate) fn write(&self, features: &[Vec<f32>]) -> anyhow::Result<()> {
        let dir = self.path.parent().expect("a file in the cache directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let bytes: Vec<u8> = features
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let partial = self.path.with_extension("partial");
        std::fs::write(&partial, bytes)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}
