//! Model-core integration tests on the real all-MiniLM-L6-v2 weights in `../shared`.
//! One test binary (modules below) because each binary links all of burn.

mod composition;
mod parity;
mod weights_errors;

use std::path::PathBuf;

use burn::prelude::*;
use splitee_common::BackendChoice;

/// `../shared` seen from the repository root, which is where the README says tests read it.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        dir.join("models/all-MiniLM-L6-v2").is_dir(),
        "these tests need ../shared (pretrained weights and reference activations) beside the \
         repository root; not found at {}",
        dir.display()
    );
    dir
}

pub fn minilm_dir() -> PathBuf {
    shared_dir().join("models/all-MiniLM-L6-v2")
}

/// The CPU backends every test runs on.
pub fn cpu_devices() -> Vec<(BackendChoice, Device)> {
    [BackendChoice::Flex, BackendChoice::Ndarray]
        .into_iter()
        .map(|choice| {
            (
                choice,
                choice.device().expect("CPU backends are always built"),
            )
        })
        .collect()
}

pub fn to_vec(tensor: Tensor<3>) -> Vec<f32> {
    tensor.into_data().try_into_vec_as::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
