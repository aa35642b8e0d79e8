//! The feed-forward block's bias + exact GELU, computed in one pass on the flex backend.
//!
//! Why not burn's `gelu`: flex evaluates it one element at a time through libm's scalar
//! `erff`, which made GELU a quarter of a MiniLM layer's time at 64–128 tokens, and the bias
//! of the projection before it is one more pass over the same activations (docs/performance.md).
//! On flex a tensor's data moves out and back without a copy, so here both
//! run in one loop that the compiler vectorises (AVX2/FMA or NEON where the CPU has them,
//! chosen at run time), split over rayon's threads. Every other device — GPUs, ndarray, and
//! the autodiff device that trains the exits — keeps burn's own ops, so gradients and
//! backends are untouched; the parity tests compare the two paths.

use burn::prelude::*;
use rayon::prelude::*;

/// `gelu(x + bias)` with `gelu(v) = v·(1 + erf(v/√2))/2`; `x`: `[rows, width]`, `bias`:
/// `[width]`.
pub fn bias_gelu(x: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    if !runs_here(&x.device(), &x) || bias.dtype() != x.dtype() {
        return burn::tensor::activation::gelu(x + bias.unsqueeze());
    }
    let Ok(bias) = bias.into_data().try_into_vec::<f32>() else {
        unreachable!("only f32 tensors take this path")
    };
    in_one_pass(x, Some(&bias))
}

/// `gelu(x)`, for a product whose bias is already in it (a packed linear's).
pub fn gelu(x: Tensor<2>) -> Tensor<2> {
    if !runs_here(&x.device(), &x) {
        return burn::tensor::activation::gelu(x);
    }
    in_one_pass(x, None)
}

/// `gelu(x + bias)` over `x`'s values in place, vectorised and split over rayon's threads.
fn in_one_pass(x: Tensor<2>, bias: Option<&[f32]>) -> Tensor<2> {
    let device = x.device();
    let [rows, width] = x.dims();
    let Ok(mut values) = x.into_data().try_into_vec::<f32>() else {
        unreachable!("only f32 tensors take this path")
    };
    // Rows in chunks of about 16k values: enough work per rayon task to repay the hand-off.
    let rows_per_chunk = (16 * 1024 / width).max(1);
    let arch = pulp::Arch::new();
    values
        .par_chunks_mut(rows_per_chunk * width)
        .for_each(|chunk| {
            arch.dispatch(|| {
                for row in chunk.chunks_exact_mut(width) {
                    match bias {
                        Some(bias) => {
                            for (value, &shift) in row.iter_mut().zip(bias) {
                                *value = gelu_of(*value + shift);
                            }
                        }
                        None => {
                            for value in row.iter_mut() {
                                *value = gelu_of(*value);
                            }
                        }
                    }
                }
            })
        });
    Tensor::from_data(TensorData::new(values, [rows, width]), &device)
}

/// The fast path needs flex's zero-copy data hand-over and no autodiff graph to keep.
fn runs_here(device: &Device, x: &Tensor<2>) -> bool {
    *device == Device::flex() && !device.is_autodiff() && x.dtype() == burn::tensor::DType::F32
}

#[inline(always)]
fn gelu_of(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as an odd rational function, `x·P(x²)/Q(x²)` on `|x| ≤ 4` (beyond it erf is 1 to
/// within 2e-8). Branch-free, so it vectorises. The coefficients are a weighted
/// least-squares fit of this form (6 + 6 terms) to erf; in f32 the error stays below 5e-7
/// (the test below checks it against libm on a dense grid), against libm's ~1e-7: GELU moves
/// by at most 1e-6, far inside the 1e-4 per-layer parity the model tests hold.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let z = x * x;
    let p = ERF_NUMERATOR.iter().rev().fold(0.0, |acc, &c| acc * z + c);
    let q = ERF_DENOMINATOR
        .iter()
        .rev()
        .fold(0.0, |acc, &c| acc * z + c);
    x * p / q
}

const ERF_NUMERATOR: [f32; 6] = [
    1.128_379_2,
    0.192_457_44,
    0.055_774_44,
    0.004_219_464,
    0.000_414_603_65,
    6.933_605e-6,
];
const ERF_DENOMINATOR: [f32; 7] = [
    1.0,
    0.503_894_57,
    0.117_392_47,
    0.016_292_807,
    0.001_423_985_8,
    7.359_941e-5,
    2.679_823_9e-7,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e_7_of_libm_everywhere() {
        let mut worst = (0.0f32, 0.0f64);
        for i in -800_000..=800_000 {
            let x = i as f32 * 1e-5;
            let error = (erf(x) as f64 - libm::erf(x as f64)).abs();
            if error > worst.1 {
                worst = (x, error);
            }
        }
        assert!(worst.1 < 5e-7, "erf({}) is off by {:e}", worst.0, worst.1);
        assert_eq!(erf(f32::MAX), 1.0);
        assert_eq!(erf(f32::MIN), -1.0);
        assert!(
            erf(f32::NAN).is_nan(),
            "NaN must stay NaN, not turn into a number"
        );
    }

    #[test]
    fn fast_path_matches_burns_gelu() {
        let device = Device::flex();
        let [rows, width] = [37, 1536];
        let values: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 16.0)
            .collect();
        let bias: Vec<f32> = (0..width).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let x = Tensor::<2>::from_data(TensorData::new(values, [rows, width]), &device);
        let bias = Tensor::<1>::from_data(TensorData::new(bias, [width]), &device);
        assert!(runs_here(&device, &x));
        let expected = burn::tensor::activation::gelu(x.clone() + bias.clone().unsqueeze());
        let got = bias_gelu(x, bias);
        let difference: f32 = (got - expected).abs().max().into_scalar();
        assert!(
            difference < 2e-6,
            "fast GELU differs from burn's by {difference:e}"
        );
    }

    #[test]
    fn other_devices_and_autodiff_keep_burns_ops() {
        let x = Tensor::<2>::zeros([2, 3], &Device::flex().autodiff());
        assert!(!runs_here(&x.device(), &x));
        #[allow(deprecated)]
        let ndarray = Device::ndarray();
        assert!(!runs_here(&ndarray, &Tensor::<2>::zeros([2, 3], &ndarray)));
    }
}
