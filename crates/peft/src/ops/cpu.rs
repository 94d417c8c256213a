//! What a CPU custom op needs besides candle: the float types it is written for, the device and dtype check,
//! the contiguous slice of a storage and row-parallel execution.
//!
//! The ops of [`crate::ops`] are built on these, and so are the model-only ops outside this crate
//! (`peft_models::ops`: RMSNorm, softmax, RoPE, SwiGLU, cross-entropy), which is why they are public.

use candle_core::{DType, Layout, Result, Tensor, WithDType, bail};

/// The float types the CPU custom ops are written for (f32 and f64).
pub trait Real: WithDType + std::ops::Neg<Output = Self> + std::iter::Sum {
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

/// `gemm` with the crate's usual parallelism: rayon over candle's thread count.
pub fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// Whether the custom ops take tensors of this device and dtype (CPU, f32 or f64).
pub fn custom_supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous elements of `s` a layout addresses, or an error when it is not contiguous or exceeds `s`.
pub fn contiguous_part<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
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
pub fn par_rows<T: Send, R: Send>(
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
}
