//! Differentiable building blocks for models, with the gradients candle's fused ops lack.
//!
//! candle's `rms_norm`, `softmax_last_dim` and `rope` kernels record no backward, and its matmul backward
//! always computes the weight gradient even for a frozen weight. The functions here are what model code
//! calls instead:
//!
//! | function | CPU f32 / f64 | elsewhere (other devices, bf16 / f16, unusual shapes) |
//! |---|---|---|
//! | [`rms_norm`] | custom op, analytic backward for `x` and `weight` | [`rms_norm_reference`] |
//! | [`softmax_last_dim`] | custom op, backward `y ⊙ (g − Σ g⊙y)` | [`softmax_last_dim_reference`] |
//! | [`rope`] | custom op, backward for `x` (the transposed rotation) | [`rope_reference`] |
//! | [`cross_entropy_rows`] | custom op, backward `g (softmax − onehot)` | [`cross_entropy_rows_reference`] |
//! | [`silu_mul`] | custom op, both gradients in one pass | [`silu_mul_reference`] |
//! | [`frozen_linear`] | custom op on `gemm`, backward `g W` only | [`frozen_linear_reference`] |
//! | [`batched_inverse`] | custom op (Gauss–Jordan, partial pivoting, f64 accumulation), backward `−A⁻ᵀ G A⁻ᵀ` | computed on the CPU in f32 / f64 and moved back |
//!
//! The `*_reference` functions are written with candle primitives: correct on every device and dtype, with
//! candle's autograd, and the yardstick the custom ops are tested against (values, gradients, and finite
//! differences in f64). The custom ops read their inputs through any strides whose last dimension is
//! contiguous (a transposed `q` / `k` needs no copy), write contiguous outputs, and split rows over
//! `candle_core::utils::get_num_threads()` scoped threads when the work is large enough.

mod cross_entropy;
mod frozen_linear;
mod inverse;
mod rms_norm;
mod rope;
mod silu_mul;
mod softmax;

pub use cross_entropy::{cross_entropy_rows, cross_entropy_rows_reference};
pub use frozen_linear::{frozen_linear, frozen_linear_reference};
pub use inverse::batched_inverse;
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::{rope, rope_reference};
pub use silu_mul::{silu_mul, silu_mul_reference};
pub use softmax::{softmax_last_dim, softmax_last_dim_reference};

use candle_core::{DType, Layout, Result, Tensor, WithDType, bail};

/// The float types the CPU custom ops are written for (f32 and f64).
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> + std::iter::Sum {
    /// `eˣ`.
    fn exp(self) -> Self;
    /// `√x`.
    fn sqrt(self) -> Self;
    /// `ln x`.
    fn ln(self) -> Self;
    /// −∞.
    const NEG_INFINITY: Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
}

/// Whether the custom ops take tensors of this device and dtype (CPU, f32 or f64).
fn custom_supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

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

/// The contiguous elements of `s` a layout addresses, or an error when it is not contiguous or exceeds `s`.
fn contiguous_part<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= s.len() => Ok(&s[a..b]),
        _ => bail!("expected a contiguous layout within its storage, got {l:?}"),
    }
}

/// Below this many elements of work per thread, one thread does everything (spawning costs ~10–50 µs).
const MIN_WORK_PER_THREAD: usize = 1 << 20;

/// Runs `f(first_row, rows)` over `out` cut into whole rows of `row_len`, on up to
/// `candle_core::utils::get_num_threads()` scoped threads (fewer when `work`, in elements, is small), and
/// returns each chunk's result in order.
fn par_rows<T: Send, R: Send>(
    out: &mut [T],
    row_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let n_rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = candle_core::utils::get_num_threads()
        .min(work / MIN_WORK_PER_THREAD)
        .min(n_rows)
        .max(1);
    if threads == 1 {
        return vec![f(0, out)];
    }
    let rows_per = n_rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = out.chunks_mut(rows_per * row_len);
        let first = chunks.next().expect("at least one chunk");
        let handles: Vec<_> = chunks
            .enumerate()
            .map(|(i, chunk)| scope.spawn(move || f((i + 1) * rows_per, chunk)))
            .collect();
        let mut results = vec![f(0, first)];
        results.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("an ops worker thread panicked")),
        );
        results
    })
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
    fn par_rows_splits_whole_rows_in_order() {
        for n_rows in [1, 2, 7, 64] {
            let mut out = vec![usize::MAX; n_rows * 3];
            let starts = par_rows(&mut out, 3, usize::MAX / 2, |r0, chunk| {
                for (i, row) in chunk.chunks_exact_mut(3).enumerate() {
                    row.fill(r0 + i);
                }
                r0
            });
            let want: Vec<usize> = (0..n_rows).flat_map(|r| [r; 3]).collect();
            assert_eq!(out, want);
            assert_eq!(starts[0], 0);
            assert!(starts.windows(2).all(|w| w[0] < w[1]));
            assert!(starts.len() <= candle_core::utils::get_num_threads().max(1));
        }
    }

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
        assert!(row_offsets(t.t().unwrap().layout()).is_err());
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
    //! Shared test helpers: random tensors, comparisons and finite differences.

    use crate::PeftRng;
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// A standard-normal tensor.
    pub fn randn(rng: &mut PeftRng, shape: &[usize], dtype: DType) -> Tensor {
        rng.normal_tensor(shape, 0.0, 1.0, dtype, &Device::Cpu)
            .unwrap()
    }

    /// `max |a − b|`, in f64.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A non-contiguous tensor with the same values as `t` (last two axes stored transposed), or `t` itself
    /// below two dimensions.
    pub fn strided(t: &Tensor) -> Tensor {
        let r = t.rank();
        if r < 2 {
            return t.clone();
        }
        let s = t
            .transpose(r - 2, r - 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(r - 2, r - 1)
            .unwrap();
        assert!(!s.is_contiguous() || t.dims()[r - 1] == 1 || t.dims()[r - 2] == 1);
        s
    }

    /// A view of `t` at a storage offset whose last dimension stays contiguous (every row after a gap).
    pub fn gapped(t: &Tensor) -> Tensor {
        let r = t.rank();
        let d = t.dims()[r - 1];
        let wide = Tensor::cat(&[&t.zeros_like().unwrap(), t], r - 1).unwrap();
        let v = wide.narrow(r - 1, d, d).unwrap();
        assert!(r == 1 || !v.is_contiguous());
        v
    }

    /// Central finite differences of `loss(inputs)` w.r.t. every element of `inputs[which]` (f64), compared
    /// with `analytic`; returns the largest absolute error.
    pub fn fd_check(
        inputs: &[Tensor],
        which: usize,
        analytic: &Tensor,
        loss: &dyn Fn(&[Tensor]) -> Result<f64>,
    ) -> f64 {
        let h = 1e-6;
        let base = inputs[which]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let an = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(base.len(), an.len());
        let mut worst = 0f64;
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut xs = inputs.to_vec();
                xs[which] = Tensor::from_vec(v, inputs[which].dims(), &Device::Cpu).unwrap();
                loss(&xs).unwrap()
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            worst = worst.max((num - an[i]).abs());
        }
        worst
    }

    /// Gradients of `sum(f(vars) ⊙ r)` w.r.t. each var.
    pub fn grads_of(
        vars: &[Var],
        r: &Tensor,
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Vec<Option<Tensor>> {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let loss = (y * r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        vars.iter().map(|v| g.get(v).cloned()).collect()
    }

    /// Vars holding copies of `ts`.
    pub fn vars(ts: &[&Tensor]) -> Vec<Var> {
        ts.iter().map(|t| Var::from_tensor(t).unwrap()).collect()
    }
}
