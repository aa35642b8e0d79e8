//! Linear weights re-laid out once, at load, for the flex backend's matrix products.
//!
//! Why: burn keeps a linear weight as one row-major `[d_in, d_out]` matrix, and flex hands it
//! to the `gemm` crate as it is. With few rows of input (a sentence of 16–64 tokens on the
//! edge), `gemm` does not pack that operand: its kernels walk down narrow column strips of the
//! whole matrix, one cache line per row of the weight, `4·d_out` bytes apart (12 KiB for an
//! MPNet FFN), and flex runs any product under 192³ multiply-adds on one thread. Measured in
//! one run here (2 threads, 16 rows): `[768, 3072]` 1.98 ms with `gemm` called as flex calls
//! it, 0.66 ms with the same kernels on the layout below (docs/performance.md has the layer-level figures).
//!
//! The layout, as ONNX Runtime's MLAS does it at session creation: the weight cut into
//! [`PANEL`]-column panels, each stored contiguously as `[d_in, PANEL]`, so a kernel streams
//! through memory in order; panels are independent products, split over rayon's threads.
//! Q, K and V are packed into one operand, so the three projections are one parallel product.
//!
//! A pack is a copy: it doubles the memory of the linear weights (MiniLM-L6 +85 MB, MPNet-base
//! +340 MB) and is built from the weights as they are when [`super::Bert::pack_weights`] runs.
//! Only inference devices build one ([`packs_on`]), right after loading; the autodiff device
//! that fine-tunes the model never does, and a model trained there comes back (`valid()`)
//! without packs. Every other device, and inputs of more than [`MAX_ROWS`] rows (where
//! `gemm` packs the weight itself and its own threading is as good), keep burn's `Linear`.

use std::sync::Arc;

use burn::nn::Linear;
use burn::prelude::*;
use rayon::prelude::*;

/// Columns per panel. 64 was the fastest of 32, 64, 128 and 256 at 16 and 64 rows in the
/// measurement above; at 128 rows all four were within 10 %.
const PANEL: usize = 64;

/// Above this many rows the packed path stops paying: measured at 1024 rows, 1 thread, it
/// took 69.7 ms against flex's 59.0 ms (each panel re-packs the whole input).
pub const MAX_ROWS: usize = 512;

/// One or more linear layers with the same input, their outputs side by side, as panels.
#[derive(Debug)]
pub struct PackedLinear {
    d_in: usize,
    d_out: usize,
    /// Panel `p` holds output columns `p·PANEL..` (the last one may be narrower), row-major
    /// `[d_in, width]`, starting at `p·PANEL·d_in`.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

/// Whether `device` packs weights: plain flex (never autodiff), which hands f32 data in and
/// out of tensors without a copy.
pub fn packs_on(device: &Device) -> bool {
    *device == Device::flex() && !device.is_autodiff()
}

impl PackedLinear {
    /// Packs `linears` (all `[d_in, _]`, f32, on the same device) as one product whose output
    /// is their outputs concatenated in order. A missing bias counts as zeros.
    pub fn pack(linears: &[&Linear]) -> Arc<Self> {
        let weights: Vec<(Vec<f32>, usize)> = linears
            .iter()
            .map(|linear| {
                let weight = linear.weight.val();
                let [_, d_out] = weight.dims();
                (to_vec(weight), d_out)
            })
            .collect();
        let d_in = linears[0].weight.dims()[0];
        let d_out = weights.iter().map(|(_, width)| width).sum();
        // Column `c` of the concatenated weight: (part, column within that part).
        let mut column_source = Vec::with_capacity(d_out);
        for (part, (_, width)) in weights.iter().enumerate() {
            column_source.extend((0..*width).map(|column| (part, column)));
        }
        let mut panels = Vec::with_capacity(d_in * d_out);
        for first in (0..d_out).step_by(PANEL) {
            let columns = &column_source[first..(first + PANEL).min(d_out)];
            for row in 0..d_in {
                panels.extend(columns.iter().map(|&(part, column)| {
                    let (values, width) = &weights[part];
                    values[row * width + column]
                }));
            }
        }
        let bias = linears
            .iter()
            .zip(&weights)
            .flat_map(|(linear, (_, width))| match &linear.bias {
                Some(bias) => to_vec(bias.val()),
                None => vec![0.0; *width],
            })
            .collect();
        Arc::new(Self {
            d_in,
            d_out,
            panels,
            bias,
        })
    }

    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// `x·W + b` for `x`: `[batch, seq, d_in]` on a device that [`packs_on`]; at most
    /// [`MAX_ROWS`] rows (`batch·seq`) is the caller's choice, not a requirement.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        assert_eq!(d_in, self.d_in, "packed linear: input width");
        let rows = batch * seq;
        let device = x.device();
        let input = to_vec(x);
        // Every output row starts as the bias; the products add onto it.
        let mut output: Vec<f32> = (0..rows).flat_map(|_| self.bias.iter().copied()).collect();
        let destination = SharedOutput(output.as_mut_ptr());
        self.panels
            .par_chunks(PANEL * d_in)
            .enumerate()
            .for_each(|(panel, weights)| {
                let first = panel * PANEL;
                let width = weights.len() / d_in;
                // SAFETY: `input` is `[rows, d_in]` and `weights` `[d_in, width]`, both
                // row-major and alive for the call. Panel `panel` writes only columns
                // `first..first + width` of the `[rows, d_out]` output, so no two panels touch
                // the same element, and `output` outlives every task (`for_each` joins them).
                unsafe {
                    gemm::gemm(
                        rows,
                        width,
                        d_in,
                        destination.at(first),
                        1,
                        self.d_out as isize,
                        true,
                        input.as_ptr(),
                        1,
                        d_in as isize,
                        weights.as_ptr(),
                        1,
                        width as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
        Tensor::from_data(TensorData::new(output, [batch, seq, self.d_out]), &device)
    }
}

fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 just before")
}

/// The output buffer, written by many panels at once in disjoint columns (see `forward`).
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);

// SAFETY: tasks only write disjoint elements through it (see `forward`).
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    fn at(self, column: usize) -> *mut f32 {
        self.0.wrapping_add(column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;

    /// Widths that are not multiples of the panel, parts of different widths, one part
    /// without a bias, and rows from 1 to past a kernel's height.
    #[test]
    fn packed_products_match_burns_linear() {
        let device = Device::flex();
        let parts = [
            LinearConfig::new(100, 70).init(&device),
            LinearConfig::new(100, 128).with_bias(false).init(&device),
            LinearConfig::new(100, 5).init(&device),
        ];
        let packed = PackedLinear::pack(&parts.iter().collect::<Vec<_>>());
        assert_eq!(packed.d_out(), 203);
        for rows in [1, 7, 16, 50] {
            let x =
                Tensor::<3>::random([1, rows, 100], burn::tensor::Distribution::Default, &device);
            let expected = Tensor::cat(parts.iter().map(|p| p.forward(x.clone())).collect(), 2);
            let difference: f32 = (packed.forward(x) - expected).abs().max().into_scalar();
            assert!(difference < 1e-5, "{rows} rows: off by {difference:e}");
        }
    }
}
