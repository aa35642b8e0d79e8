//! splitee's model: the multi-exit encoder (BERT or MPNet) that both the edge agent and the
//! cloud worker run (each its own range of layers), its tokenizer, weights and identity, and
//! the choice of the burn device it runs on. No I/O beyond reading a model directory: the
//! wire format is `splitee-protocol`, the network `splitee-service`.

pub mod config;
pub mod dataset;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod model;
pub mod model_dir;
pub mod profile;
pub mod tokenize;
pub mod weights;

pub use config::{Activation, BertConfig, ExitConfig, Family, Pooling};
pub use device::{BackendChoice, SelectedDevice, WhenUnavailable};
pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use model::{Hidden, MultiExitBert, PaddingMask};
pub use model_dir::{LoadedModel, ModelDir, save_exits, save_model};
/// The fetcher of cached backbones (`fetch-model`), re-exported for the binaries and tests.
pub use splitee_fetch as fetch;
pub use tokenize::{Batch, Encoding, Tokenizer};
