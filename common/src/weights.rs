//! Reading and writing model weights as safetensors, in the Hugging Face (PyTorch) layout.
//!
//! burn-store does the heavy lifting (memory-mapped reading, the PyTorch → burn transposition
//! of linear weights, LayerNorm `weight/bias` → `gamma/beta`). This module adds the two things
//! it leaves to callers: the key renames between HF names and our field names (one set per
//! [`Family`]: MPNet names the same attention weights differently), and turning its structured
//! [`ApplyResult`] into one error that names the tensor as it is spelled *in the file*, with
//! shapes in the file's layout.

use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;

use crate::config::Family;
use crate::error::{Error, Result};

/// One family's key renames, applied in order to every key.
struct Layout {
    /// HF checkpoint key pattern → our module path.
    file_to_module: &'static [(&'static str, &'static str)],
    /// The inverse, used when saving and when reporting errors.
    module_to_file: &'static [(&'static str, &'static str)],
}

/// BERT: Rust cannot name a field `self`, and we keep snake_case `layer_norm`;
/// `encoder.layer.i` is flattened to `layers.i`.
const BERT: Layout = Layout {
    file_to_module: &[
        (r"^bert\.", ""),
        (r"^encoder\.layer\.", "layers."),
        (r"\.attention\.self\.", ".attention.self_attention."),
        (r"LayerNorm\.", "layer_norm."),
    ],
    module_to_file: &[
        (r"^layers\.", "encoder.layer."),
        (r"\.attention\.self_attention\.", ".attention.self."),
        (r"layer_norm\.", "LayerNorm."),
        // burn's LayerNorm calls its parameters gamma/beta; the save adapter renames them
        // itself, these two make error messages use the file's names too.
        (r"LayerNorm\.gamma$", "LayerNorm.weight"),
        (r"LayerNorm\.beta$", "LayerNorm.bias"),
    ],
};

/// MPNet keeps its attention projections in `attention.attn.{q,k,v,o}` and the attention
/// block's LayerNorm in `attention.LayerNorm`; the shared bias table sits beside the layers.
const MPNET: Layout = Layout {
    file_to_module: &[
        (r"^encoder\.layer\.", "layers."),
        (
            r"^encoder\.relative_attention_bias\.",
            "relative_attention_bias.",
        ),
        (
            r"\.attention\.attn\.q\.",
            ".attention.self_attention.query.",
        ),
        (r"\.attention\.attn\.k\.", ".attention.self_attention.key."),
        (
            r"\.attention\.attn\.v\.",
            ".attention.self_attention.value.",
        ),
        (r"\.attention\.attn\.o\.", ".attention.output.dense."),
        (r"\.attention\.LayerNorm\.", ".attention.output.layer_norm."),
        (r"LayerNorm\.", "layer_norm."),
    ],
    module_to_file: &[
        (r"^layers\.", "encoder.layer."),
        (
            r"^relative_attention_bias\.",
            "encoder.relative_attention_bias.",
        ),
        (
            r"\.attention\.self_attention\.query\.",
            ".attention.attn.q.",
        ),
        (r"\.attention\.self_attention\.key\.", ".attention.attn.k."),
        (
            r"\.attention\.self_attention\.value\.",
            ".attention.attn.v.",
        ),
        (r"\.attention\.output\.dense\.", ".attention.attn.o."),
        (
            r"\.attention\.output\.layer_norm\.",
            ".attention.layer_norm.",
        ),
        (r"layer_norm\.", "LayerNorm."),
        (r"LayerNorm\.gamma$", "LayerNorm.weight"),
        (r"LayerNorm\.beta$", "LayerNorm.bias"),
    ],
};

fn layout(family: Family) -> &'static Layout {
    match family {
        Family::Bert => &BERT,
        Family::MPNet => &MPNET,
    }
}

/// How floats are stored on disk. Compute is always f32: f16 storage halves the size of the
/// embedded model, and the cast back happens once, at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F16,
}

/// Loads `path`, a checkpoint in `family`'s layout, into `module`, failing on any missing,
/// misshapen or mistyped tensor.
///
/// Tensors in the file that the module does not use (such as the checkpoint's
/// `embeddings.position_ids` buffer or a `pooler`) are ignored. Exit heads have the same names
/// in both layouts; they are loaded with their backbone's family.
pub fn load<M: ModuleSnapshot>(module: &mut M, path: &Path, family: Family) -> Result<()> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_owned(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
    let mut store = layout(family)
        .file_to_module
        .iter()
        .fold(SafetensorsStore::from_file(path), |store, (from, to)| {
            store.with_key_remapping(*from, *to)
        })
        .with_from_adapter(adapter)
        .validate(false)
        .allow_partial(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| Error::WeightsFile {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    check_applied(&result, path, family)
}

/// Writes `module` to `path` in `family`'s HF layout, floats stored as `dtype`.
pub fn save<M: ModuleSnapshot>(
    module: &M,
    path: &Path,
    dtype: StorageDType,
    family: Family,
) -> Result<()> {
    let to_adapter: Box<dyn ModuleAdapter> = match dtype {
        StorageDType::F32 => Box::new(BurnToPyTorchAdapter),
        StorageDType::F16 => Box::new(BurnToPyTorchAdapter.chain(FloatCastAdapter::to(DType::F16))),
    };
    let mut store = layout(family)
        .module_to_file
        .iter()
        .fold(SafetensorsStore::from_file(path), |store, (from, to)| {
            store.with_key_remapping(*from, *to)
        })
        .with_to_adapter(BoxedAdapter(to_adapter))
        .overwrite(true)
        .metadata("producer", concat!("splitee ", env!("CARGO_PKG_VERSION")));
    module
        .save_into(&mut store)
        .map_err(|e| Error::WeightsFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Lets a runtime-chosen adapter go where burn-store wants a concrete one.
#[derive(Clone)]
struct BoxedAdapter(Box<dyn ModuleAdapter>);

impl ModuleAdapter for BoxedAdapter {
    fn adapt(
        &self,
        tensor: burn::store::burn_pack::Tensor,
        ctx: burn::store::ModuleContext<'_>,
    ) -> burn::store::burn_pack::Tensor {
        self.0.adapt(tensor, ctx)
    }

    fn get_alternative_param_name(&self, param_name: &str, module_type: &str) -> Option<String> {
        self.0.get_alternative_param_name(param_name, module_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// The key a module path is stored under in a `family` checkpoint.
pub fn file_key(module_path: &str, family: Family) -> String {
    static PATTERNS: LazyLock<[Vec<(Regex, &str)>; 2]> = LazyLock::new(|| {
        [Family::Bert, Family::MPNet].map(|family| {
            layout(family)
                .module_to_file
                .iter()
                .map(|(from, to)| (Regex::new(from).expect("layout patterns are valid"), *to))
                .collect()
        })
    });
    let patterns = &PATTERNS[match family {
        Family::Bert => 0,
        Family::MPNet => 1,
    }];
    patterns
        .iter()
        .fold(module_path.to_owned(), |key, (from, to)| {
            from.replace(&key, *to).into_owned()
        })
}

/// burn keeps linear weights as `[in, out]`, the file as `[out, in]`: report shapes as the
/// user will see them when they open the file. Embedding tables (the `embeddings` and MPNet's
/// bias table) are not transposed.
fn file_shape(module_path: &str, shape: &[usize]) -> Vec<usize> {
    let is_table =
        module_path.contains("embeddings") || module_path.starts_with("relative_attention_bias");
    let is_linear_weight = shape.len() == 2 && module_path.ends_with(".weight") && !is_table;
    if is_linear_weight {
        shape.iter().rev().copied().collect()
    } else {
        shape.to_vec()
    }
}

fn check_applied(result: &ApplyResult, path: &Path, family: Family) -> Result<()> {
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: tensor,
                expected,
                found,
            } => Error::ShapeMismatch {
                path: path.to_owned(),
                tensor: file_key(tensor, family),
                expected: file_shape(tensor, expected.as_slice()),
                found: file_shape(tensor, found.as_slice()),
            },
            ApplyError::DTypeMismatch {
                path: tensor,
                expected,
                found,
            } => Error::DTypeMismatch {
                path: path.to_owned(),
                tensor: file_key(tensor, family),
                expected: format!("{expected:?}"),
                found: format!("{found:?}"),
            },
            ApplyError::AdapterError {
                path: tensor,
                message,
            }
            | ApplyError::LoadError {
                path: tensor,
                message,
            } => Error::TensorLoad {
                path: path.to_owned(),
                tensor: file_key(tensor, family),
                message: message.clone(),
            },
        });
    }
    if !result.missing.is_empty() {
        let names: Vec<String> = result
            .missing
            .iter()
            .map(|(tensor, _)| file_key(tensor, family))
            .collect();
        return Err(Error::MissingTensor {
            path: path.to_owned(),
            tensor: names.join("`, `"),
        });
    }
    Ok(())
}
