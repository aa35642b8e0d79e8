//! A model's identity: edge and cloud compare fingerprints so that hidden states computed by
//! one model are never finished by another.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{BertConfig, ExitConfig};
use crate::error::{Error, Result};

/// SHA-256 over the canonical configs and the exact bytes of the weight files.
///
/// Configs are hashed in their parsed, re-serialised form, so reformatting `config.json`
/// keeps the fingerprint while any change of a value the model uses alters it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn compute(
        config: &BertConfig,
        exits: &ExitConfig,
        weight_files: &[&Path],
    ) -> Result<Fingerprint> {
        let mut hasher = Sha256::new();
        hasher.update(b"splitee-model-v1\0");
        hash_json(&mut hasher, config);
        hash_json(&mut hasher, exits);
        for path in weight_files {
            let mut file = std::fs::File::open(path).map_err(|error| Error::Io {
                path: path.to_path_buf(),
                error,
            })?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            hasher.update(len.to_le_bytes());
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let read = file.read(&mut buffer).map_err(|error| Error::Io {
                    path: path.to_path_buf(),
                    error,
                })?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
            }
        }
        Ok(Fingerprint(hasher.finalize().into()))
    }

    /// The first 8 bytes in hex: enough to tell models apart in logs.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hash_json<T: Serialize>(hasher: &mut Sha256, value: &T) {
    let bytes = serde_json::to_vec(value).expect("configs serialise to JSON");
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes);
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}
