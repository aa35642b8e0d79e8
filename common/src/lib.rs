//! splitee's shared core: the multi-exit encoder (BERT or MPNet) that both the edge agent and
//! the cloud worker run (each its own range of layers), its tokenizer, weights and identity.

pub mod config;
pub mod dataset;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod http;
pub mod logging;
pub mod model;
pub mod model_dir;
pub mod profile;
pub mod protocol;
pub mod settings;
pub mod signals;
pub mod tokenize;
pub mod transport;
pub mod weights;

pub use config::{Activation, BertConfig, ExitConfig, Family, Pooling};
pub use device::BackendChoice;
pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use model::{Hidden, MultiExitBert, PaddingMask};
pub use model_dir::{LoadedModel, ModelDir, save_exits, save_model};
/// The fetcher of cached backbones (`fetch-model`), re-exported for the binaries and tests.
pub use splitee_fetch as fetch;
pub use tokenize::{Batch, Encoding, Tokenizer};
