//! Reading and writing model weights as safetensors, in the Hugging Face (PyTorch) layout.
//!
//! burn-store does the heavy lifting (memory-mapped reading, the PyTorch → burn transposition
//! of linear weights, LayerNorm `weight/bias` → `gamma/beta`). This module adds the two things
//! it leaves to callers: the key renames between HF names and our field names, and turning its
//! structured [`ApplyResult`] into one error that names the tensor as it is spelled *in the
//! file*, with shapes in the file's layout.

use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;

use crate::error::{Error, Result};

/// HF checkpoint key pattern → our module path. Rust cannot name a field `self`, and we keep
/// snake_case `layer_norm`; `encoder.layer.i` is flattened to `layers.i`.
const FILE_TO_MODULE: &[(&str, &str)] = &[
    (r"^bert\.", ""),
    (r"^encoder\.layer\.", "layers."),
    (r"\.attention\.self\.", ".attention.self_attention."),
    (r"LayerNorm\.", "layer_norm."),
];

/// The inverse of [`FILE_TO_MODULE`], used when saving and when reporting errors.
const MODULE_TO_FILE: &[(&str, &str)] = &[
    (r"^layers\.", "encoder.layer."),
    (r"\.attention\.self_attention\.", ".attention.self."),
    (r"layer_norm\.", "LayerNorm."),
    // burn's LayerNorm calls its parameters gamma/beta; the save adapter renames them itself,
    // these two make error messages use the file's names too.
    (r"LayerNorm\.gamma$", "LayerNorm.weight"),
    (r"LayerNorm\.beta$", "LayerNorm.bias"),
];

/// How floats are stored on disk. Compute is always f32: f16 storage halves the size of the
/// embedded model, and the cast back happens once, at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F16,
}

/// Loads `path` into `module`, failing on any missing, misshapen or mistyped tensor.
///
/// Tensors in the file that the module does not use (such as the checkpoint's
/// `embeddings.position_ids` buffer or a `pooler`) are ignored.
pub fn load<M: ModuleSnapshot>(module: &mut M, path: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_owned(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
    let mut store = FILE_TO_MODULE
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
    check_applied(&result, path)
}

/// Writes `module` to `path` in the HF layout, floats stored as `dtype`.
pub fn save<M: ModuleSnapshot>(module: &M, path: &Path, dtype: StorageDType) -> Result<()> {
    let to_adapter: Box<dyn ModuleAdapter> = match dtype {
        StorageDType::F32 => Box::new(BurnToPyTorchAdapter),
        StorageDType::F16 => Box::new(BurnToPyTorchAdapter.chain(FloatCastAdapter::to(DType::F16))),
    };
    let mut store = MODULE_TO_FILE
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

/// The key a module path is stored under in the file.
pub fn file_key(module_path: &str) -> String {
    static PATTERNS: LazyLock<Vec<(Regex, &str)>> = LazyLock::new(|| {
        MODULE_TO_FILE
            .iter()
            .map(|(from, to)| {
                (
                    Regex::new(from).expect("MODULE_TO_FILE patterns are valid"),
                    *to,
                )
            })
            .collect()
    });
    PATTERNS
        .iter()
        .fold(module_path.to_owned(), |key, (from, to)| {
            from.replace(&key, *to).into_owned()
        })
}

/// burn keeps linear weights as `[in, out]`, the file as `[out, in]`: report shapes as the
/// user will see them when they open the file.
fn file_shape(module_path: &str, shape: &[usize]) -> Vec<usize> {
    let is_linear_weight =
        shape.len() == 2 && module_path.ends_with(".weight") && !module_path.contains("embeddings");
    if is_linear_weight {
        shape.iter().rev().copied().collect()
    } else {
        shape.to_vec()
    }
}

fn check_applied(result: &ApplyResult, path: &Path) -> Result<()> {
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: tensor,
                expected,
                found,
            } => Error::ShapeMismatch {
                path: path.to_owned(),
                tensor: file_key(tensor),
                expected: file_shape(tensor, expected.as_slice()),
                found: file_shape(tensor, found.as_slice()),
            },
            ApplyError::DTypeMismatch {
                path: tensor,
                expected,
                found,
            } => Error::DTypeMismatch {
                path: path.to_owned(),
                tensor: file_key(tensor),
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
                tensor: file_key(tensor),
                message: message.clone(),
            },
        });
    }
    if !result.missing.is_empty() {
        let names: Vec<String> = result
            .missing
            .iter()
            .map(|(tensor, _)| file_key(tensor))
            .collect();
        return Err(Error::MissingTensor {
            path: path.to_owned(),
            tensor: names.join("`, `"),
        });
    }
    Ok(())
}
