//! Differentiable building blocks of the Llama-family model and its loss, with the gradients candle's fused
//! ops lack.
//!
//! candle's `rms_norm`, `softmax_last_dim` and `rope` kernels record no backward. The functions here are what
//! the model code calls instead:
//!
//! | function | CPU f32 / f64 | elsewhere (other devices, bf16 / f16, unusual shapes) |
//! |---|---|---|
//! | [`rms_norm`] | custom op, analytic backward for `x` and `weight` | [`rms_norm_reference`] |
//! | [`softmax_last_dim`] | custom op, backward `y ⊙ (g − Σ g⊙y)` | [`softmax_last_dim_reference`] |
//! | [`rope`] | custom op, backward for `x` (the transposed rotation) | [`rope_reference`] |
//! | [`cross_entropy_rows`] | custom op, backward `g (softmax − onehot)` | [`cross_entropy_rows_reference`] |
//! | [`silu_mul`] | custom op, both gradients in one pass | [`silu_mul_reference`] |
//!
//! The ops the adapters need themselves (frozen linear, batched inverse) are in [`peft::ops`], and so are
//! the helpers every CPU custom op is built on ([`peft::ops::cpu`]). The `*_reference` functions are written
//! with candle primitives: correct on every device and dtype, with candle's autograd, and the yardstick the
//! custom ops are tested against (values, gradients, and finite differences in f64). The custom ops read
//! their inputs through any strides whose last dimension is contiguous (a transposed `q` / `k` needs no
//! copy), write contiguous outputs, and split rows over `candle_core::utils::get_num_threads()` scoped
//! threads when the work is large enough.

mod cross_entropy;
mod rms_norm;
mod rope;
mod silu_mul;
mod softmax;

pub use cross_entropy::{cross_entropy_rows, cross_entropy_rows_reference};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};
pub use silu_mul::{silu_mul, silu_mul_reference};
pub use softmax::{softmax_last_dim, softmax_last_dim_reference};

use candle_core::{Layout, Result, Tensor, bail};
use peft::ops::cpu::Real;

/// `t` itself when its last dimension is contiguous (what the row-wise custom ops read), a contiguous copy
/// otherwise (the copy is recorded, so gradients still flow through it).
fn rows_readable(t: &Tensor) -> Result<Tensor> {
    if t.rank() > 0 && (t.dims()[t.rank() - 1] <= 1 || t.layout().stride()[t.rank() - 1] == 1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The storage offset of the first element of every row (last dimension) of `layout`, in row-major order,
/// and the row length. An error when the last dimension is not contiguous.
fn row_offsets(layout: &Layout) -> Result<(Vec<usize>, usize)> {
    let dims = layout.dims();
    let stride = layout.stride();
    let Some((&d, lead)) = dims.split_last() else {
        bail!("row_offsets: a scalar has no rows");
    };
    if d > 1 && stride[dims.len() - 1] != 1 {
        bail!("row_offsets: the last dimension is not contiguous ({layout:?})");
    }
    let n: usize = lead.iter().product();
    let start = layout.start_offset();
    if layout.is_contiguous() {
        return Ok(((0..n).map(|r| start + r * d).collect(), d));
    }
    let mut offsets = Vec::with_capacity(n);
    let mut index = vec![0usize; lead.len()];
    let mut off = start;
    for _ in 0..n {
        offsets.push(off);
        // Odometer increment over the leading dimensions.
        for ax in (0..lead.len()).rev() {
            index[ax] += 1;
            off += stride[ax];
            if index[ax] < lead[ax] {
                break;
            }
            off -= stride[ax] * lead[ax];
            index[ax] = 0;
        }
    }
    Ok((offsets, d))
}

/// Sum of `a[i] · b[i]`, with eight accumulators so that the loop vectorises.
#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::zero();
    for (x, y) in ar.iter().zip(br) {
        tail += *x * *y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_offsets_of_strided_layouts() {
        let t = Tensor::arange(0f32, 24.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let v = t.transpose(0, 1).unwrap(); // [3, 2, 4], last dim contiguous
        let (offsets, d) = row_offsets(v.layout()).unwrap();
        assert_eq!(d, 4);
        assert_eq!(offsets, [0, 12, 4, 16, 8, 20]);
        let e = row_offsets(t.t().unwrap().layout()).unwrap_err();
        assert!(
            e.to_string()
                .contains("row_offsets: the last dimension is not contiguous"),
            "{e}"
        );
        let n = t.narrow(2, 1, 2).unwrap();
        assert_eq!(
            row_offsets(n.layout()).unwrap(),
            ((0..6).map(|r| 1 + 4 * r).collect(), 2)
        );
    }

    #[test]
    fn dot_with_tails() {
        for n in [0, 1, 7, 8, 9, 17, 64] {
            let a: Vec<f64> = (0..n).map(|i| i as f64 * 0.5).collect();
            let b: Vec<f64> = (0..n).map(|i| 1.0 - i as f64).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-9);
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Test helpers: random tensors from the crate's generator; comparisons and finite differences from
    //! `peft_test_support`.

    use candle_core::{DType, Device, Tensor};
    use peft::PeftRng;
    pub use peft_test_support::{fd_check, gapped, grads_of, max_diff, strided, vars};

    /// A standard-normal tensor.
    pub fn randn(rng: &mut PeftRng, shape: &[usize], dtype: DType) -> Tensor {
        rng.normal_tensor(shape, 0.0, 1.0, dtype, &Device::Cpu)
            .unwrap()
    }
}
